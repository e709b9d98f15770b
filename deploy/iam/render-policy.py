#!/usr/bin/env python3
"""Fills in controller-policy.json for one cluster and prints it.

    python3 deploy/iam/render-policy.py --region eu-west-1 \\
        --account-id 111122223333 --cluster-name prod-eu-1 --vpc-id vpc-0abc... \\
        [--adopted-group sg-0123... ...] > palisade-controller-policy.json

Each `--adopted-group` (a group id or its ARN; repeat it, or give several)
becomes one entry of the ManageRulesInAdoptedGroups statement's Resource
list; without any, that statement is left out. The placeholders are
replaced inside each JSON string and the result is written by a JSON
encoder, so it is valid JSON whatever is filled in. Python 3 standard
library only.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

TEMPLATE = Path(__file__).resolve().parent / "controller-policy.json"
ADOPTED_SID = "ManageRulesInAdoptedGroups"

CHECKS = {
    "region": (r"^[a-z]{2}(-[a-z]+)+-[0-9]+$", "an AWS region such as eu-west-1"),
    "account_id": (r"^[0-9]{12}$", "a 12-digit AWS account id"),
    # As the chart's values.schema.json checks clusterName.
    "cluster_name": (r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$", "the chart's clusterName"),
    "vpc_id": (r"^vpc-[0-9a-f]{8,17}$", "a VPC id such as vpc-0123456789abcdef0"),
}
GROUP_ID = re.compile(r"^sg-[0-9a-f]{8,17}$")
GROUP_ARN = re.compile(r"^arn:aws[a-z-]*:ec2:[a-z0-9-]+:[0-9]{12}:security-group/sg-[0-9a-f]{8,17}$")


def fail(message: str) -> None:
    print(f"render-policy: {message}", file=sys.stderr)
    sys.exit(2)


def substitute(value, fill: dict[str, str], partition: str):
    """`value` with every ${NAME} in its strings replaced from `fill`."""
    if isinstance(value, dict):
        return {k: substitute(v, fill, partition) for k, v in value.items()}
    if isinstance(value, list):
        return [substitute(v, fill, partition) for v in value]
    if isinstance(value, str):
        for name, text in fill.items():
            value = value.replace("${" + name + "}", text)
        if partition != "aws" and value.startswith("arn:aws:"):
            value = f"arn:{partition}:" + value[len("arn:aws:") :]
        return value
    return value


def adopted_arns(groups: list[str], region: str, account: str, partition: str) -> list[str]:
    arns = []
    for g in groups:
        if GROUP_ID.match(g):
            arns.append(f"arn:{partition}:ec2:{region}:{account}:security-group/{g}")
        elif GROUP_ARN.match(g):
            arns.append(g)
        else:
            fail(f"--adopted-group {g!r}: expected a group id (sg-...) or its ARN")
    return sorted(set(arns))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--region", required=True)
    ap.add_argument("--account-id", required=True)
    ap.add_argument("--cluster-name", required=True)
    ap.add_argument("--vpc-id", required=True)
    ap.add_argument(
        "--adopted-group",
        action="extend",
        nargs="+",
        default=[],
        metavar="SG",
        help="an existing group a policy adopts (securityGroup.id); repeatable",
    )
    ap.add_argument(
        "--partition",
        default="aws",
        choices=["aws", "aws-cn", "aws-us-gov"],
        help="the ARN partition (default aws)",
    )
    args = ap.parse_args()
    for field, (pattern, what) in CHECKS.items():
        value = getattr(args, field)
        if not re.match(pattern, value):
            fail(f"--{field.replace('_', '-')} {value!r}: expected {what}")

    policy = json.loads(TEMPLATE.read_text())
    fill = {
        "REGION": args.region,
        "ACCOUNT_ID": args.account_id,
        "CLUSTER_NAME": args.cluster_name,
        "VPC_ID": args.vpc_id,
    }
    arns = adopted_arns(args.adopted_group, args.region, args.account_id, args.partition)
    statements = []
    for statement in policy["Statement"]:
        if statement.get("Sid") == ADOPTED_SID:
            if not arns:
                continue
            statement = dict(statement, Resource=arns)
        statements.append(substitute(statement, fill, args.partition))
    policy["Statement"] = statements

    text = json.dumps(policy, indent=2)
    left = sorted(set(re.findall(r"\$\{[A-Z_]+\}", text)))
    if left:
        fail(f"placeholders left unfilled: {', '.join(left)}")
    print(text)


if __name__ == "__main__":
    main()
