//! `palisade plan -f FILES`: what applying FirewallPolicy manifests would
//! change on a live cluster, before anything is applied — as `terraform
//! plan` does for infrastructure. Reads only ([`super::live`]); writes
//! nothing anywhere.
//!
//! For the manifests as a whole (applied together, as a GitOps sync does):
//! - per policy, its Security Group: the authorizations, revocations and
//!   description changes the controller would make
//!   ([`diff_security_group`] against the group the live policy of that name
//!   uses, or against a new group), and the interfaces it would be attached
//!   to or detached from;
//! - per node a manifest selects (before or after): the openings added and
//!   removed (the `render` summary) and the exact iptables / ipset lines
//!   added and removed, compiled as the node's agent compiles them;
//! - per such node, the effective exposure before and after
//!   ([`exposure`]): what the whole of `0.0.0.0/0`, `::/0` (and any extra
//!   scope) reaches inbound through the union of the interface's groups and
//!   the node layer.
//!
//! Deleting a policy is not planned: only the manifests given are compared
//! with their live versions.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::path::PathBuf;

use ipnet::IpNet;
use kube::ResourceExt;
use serde::Serialize;

use super::live::{Live, NodeSettings, ruleset};
use super::{Error, check_policy, expand_paths, is_policy, read_documents};
use crate::api::{FirewallPolicy, Layer, PolicyMode};
use crate::cloud::Ec2;
use crate::node::render::render_ruleset;
use crate::policy::effective::{Exposed, Intent, covered, exposure, traffic};
use crate::policy::{
    CurrentSgRule, Direction, Facts, GroupOwnership, NodeRuleset, SgPermission, ValidPolicy,
    diff_security_group, plan_cloud, validate,
};

/// How `plan` runs besides the files.
#[derive(Debug, Clone, Default)]
pub struct PlanSettings {
    /// The agent's settings (failsafe, allow verdict), as for `explain`.
    pub node: NodeSettings,
    /// Scopes of the exposure besides `0.0.0.0/0` and `::/0` (the VPC).
    pub extra_scopes: Vec<IpNet>,
}

/// What a plan found, for the exit code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PlanOutcome {
    /// Something would change (a rule, an attachment, a node rule).
    pub changes: bool,
    /// Some node would be reachable from the whole of `0.0.0.0/0` or
    /// `::/0` on traffic it is not reachable on now.
    pub internet_widened: bool,
}

/// The plan of one policy's group.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct GroupPlan {
    /// The policy.
    pub policy: String,
    /// Where its manifest came from.
    pub origin: String,
    /// `sg-...`, or `None` for a group to be created.
    pub group_id: Option<String>,
    /// Its name (empty for a group to be created).
    pub group_name: String,
    /// Created for the policy, or adopted.
    pub ownership: GroupOwnership,
    /// `+ ingress tcp/443 from 0.0.0.0/0 "palisade:web/https"`, `- ...`, `~ ...`.
    pub changes: Vec<String>,
    /// Nodes whose interface would get the group.
    pub attach: Vec<String>,
    /// Nodes whose interface would lose it.
    pub detach: Vec<String>,
    /// The cloud plan's warnings.
    pub warnings: Vec<String>,
}

/// The plan of one node.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct NodePlan {
    /// The node.
    pub node: String,
    /// Openings added (`+`) and removed (`-`), as the summary shows them.
    pub openings: Vec<String>,
    /// iptables/ip6tables/ipset lines added (`+`) and removed (`-`).
    pub rules: Vec<String>,
    /// Exposure now (`None`: not known, the node is not on EC2).
    pub exposure_before: Option<Vec<String>>,
    /// Exposure after.
    pub exposure_after: Option<Vec<String>>,
    /// Exposure entries to the whole internet that are new.
    pub widened: Vec<String>,
}

/// The whole plan.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Plan {
    /// Per policy of the manifests.
    pub groups: Vec<GroupPlan>,
    /// Per node selected before or after.
    pub nodes: Vec<NodePlan>,
    /// Notes (live policies left out as invalid).
    pub problems: Vec<String>,
}

impl Plan {
    /// What it found.
    pub fn outcome(&self) -> PlanOutcome {
        PlanOutcome {
            changes: self.groups.iter().any(|g| {
                !g.changes.is_empty()
                    || !g.attach.is_empty()
                    || !g.detach.is_empty()
                    || g.group_id.is_none()
            }) || self
                .nodes
                .iter()
                .any(|n| !n.rules.is_empty() || n.exposure_before != n.exposure_after),
            internet_widened: self.nodes.iter().any(|n| !n.widened.is_empty()),
        }
    }
}

/// The FirewallPolicy manifests of `files`; every invalid one is printed
/// on `out` and makes it fail.
pub fn read_manifests(
    files: &[PathBuf],
    out: &mut impl Write,
) -> Result<Vec<(String, FirewallPolicy)>, Error> {
    let mut found = Vec::new();
    let mut invalid = 0;
    for file in &expand_paths(files)? {
        for doc in read_documents(file)? {
            if !is_policy(&doc.value) {
                continue;
            }
            let problems = check_policy(&doc.value);
            if !problems.is_empty() {
                invalid += 1;
                for p in problems {
                    writeln!(out, "{}: {p}", doc.origin)?;
                }
                continue;
            }
            let p: FirewallPolicy = serde_json::from_value(doc.value)
                .map_err(|e| Error::Render(format!("{}: {e}", doc.origin)))?;
            found.push((doc.origin, p));
        }
    }
    if invalid > 0 {
        return Err(Error::Invalid(invalid));
    }
    if found.is_empty() {
        return Err(Error::Render(
            "no FirewallPolicy found in the files given".into(),
        ));
    }
    Ok(found)
}

/// Reads the live state the manifests touch.
pub async fn read_for<E: Ec2>(
    client: &kube::Client,
    ec2: &E,
    manifests: &[(String, FirewallPolicy)],
) -> Result<Live, Error> {
    let mut live = Live::read_cluster(client).await?;
    let mut extra = Vec::new();
    let mut problems = Vec::new();
    let mut valid = live.active(&mut problems);
    for (_, p) in manifests {
        if let Some(id) = p.spec.security_group.as_ref().and_then(|s| s.id.clone()) {
            extra.push(id);
        }
        if let Some(g) = live
            .policy(&p.name_any())
            .and_then(|l| l.status.as_ref()?.security_group.clone())
        {
            extra.push(g.id);
        }
        valid.extend(validate(p).ok());
    }
    // The interfaces carrying each known group (what may be detached).
    for id in &extra {
        if !live.carrying.contains_key(id) {
            let enis = ec2.enis_in_group(id).await?;
            live.carrying.insert(id.clone(), enis);
        }
    }
    // Only the instances a manifest can change: nodes its policy selects
    // now or after, and those carrying its group.
    let carriers: BTreeSet<String> = live
        .carrying
        .values()
        .flatten()
        .filter_map(|e| e.instance_id.clone())
        .collect();
    let mut touched: BTreeSet<String> = BTreeSet::new();
    for (_, p) in manifests {
        let after = validate(p).ok();
        let before = live.policy(&p.name_any()).and_then(|l| validate(l).ok());
        for n in &live.nodes {
            let selected = after.iter().chain(&before).any(|v| v.selects(n));
            let holds = n.instance_id().is_some_and(|i| carriers.contains(i));
            if selected || holds {
                touched.insert(n.name.clone());
            }
        }
    }
    let touched: Vec<String> = touched.into_iter().collect();
    live.read_cloud(ec2, Some(&touched), &extra, &valid).await?;
    Ok(live)
}

/// Plans `manifests` against `live` (pure).
pub fn plan(
    live: &Live,
    manifests: &[(String, FirewallPolicy)],
    settings: &PlanSettings,
) -> Result<Plan, Error> {
    let mut problems = Vec::new();
    let before = live.active(&mut problems);
    let names: BTreeSet<String> = manifests.iter().map(|(_, p)| p.name_any()).collect();
    let mut after: Vec<ValidPolicy> = before
        .iter()
        .filter(|p| !names.contains(p.name()))
        .cloned()
        .collect();
    let mut new = Vec::new();
    for (origin, p) in manifests {
        let v = validate(p).map_err(|e| Error::Render(format!("{origin}: {e}")))?;
        new.push((origin.clone(), p, v.clone()));
        after.push(v);
    }
    let facts = live.facts(&settings.node);

    // Groups: their rules after, and the interfaces they join or leave.
    let mut groups = Vec::new();
    let mut rules_after: BTreeMap<String, Vec<CurrentSgRule>> = BTreeMap::new();
    let mut joins: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut leaves: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (origin, p, v) in &new {
        let (g, after_rules) = group_plan(live, &facts, origin, p, v)?;
        let key = g
            .group_id
            .clone()
            .unwrap_or_else(|| format!("(new group of {})", g.policy));
        rules_after.insert(key.clone(), after_rules);
        for n in &g.attach {
            joins.entry(n.clone()).or_default().push(key.clone());
        }
        for n in &g.detach {
            leaves.entry(n.clone()).or_default().push(key.clone());
        }
        groups.push(g);
    }

    let mut scopes: Vec<IpNet> = vec![
        "0.0.0.0/0"
            .parse()
            .map_err(|_| Error::Render("scope".into()))?,
        "::/0".parse().map_err(|_| Error::Render("scope".into()))?,
    ];
    scopes.extend(settings.extra_scopes.iter().copied());

    // Nodes: every node a manifest's policy selects, before or after.
    let mut touched: BTreeSet<String> = BTreeSet::new();
    for n in &live.nodes {
        for (_, _, v) in &new {
            let was = before.iter().any(|b| b.name() == v.name() && b.selects(n));
            if was || v.selects(n) {
                touched.insert(n.name.clone());
            }
        }
    }
    let mut nodes = Vec::new();
    for name in touched {
        let rs_before = ruleset(&name, &before, &facts)?;
        let rs_after = ruleset(&name, &after, &facts)?;
        let selected_before: Vec<&ValidPolicy> = before
            .iter()
            .filter(|p| rs_before.policies.iter().any(|d| d.name == p.name()))
            .collect();
        let selected_after: Vec<&ValidPolicy> = after
            .iter()
            .filter(|p| rs_after.policies.iter().any(|d| d.name == p.name()))
            .collect();
        let openings = line_diff(
            &opening_lines(&selected_before),
            &opening_lines(&selected_after),
        );
        let rules = line_diff(&restore_lines(&rs_before), &restore_lines(&rs_after));
        let (exposure_before, exposure_after, widened) = match live.instance(&name) {
            None => (None, None, Vec::new()),
            Some(instance) => {
                let before_groups: Vec<String> = instance.eni_groups.clone();
                let mut after_groups: Vec<String> = before_groups
                    .iter()
                    .filter(|g| !leaves.get(&name).is_some_and(|l| l.contains(g)))
                    .cloned()
                    .collect();
                after_groups.extend(joins.get(&name).cloned().unwrap_or_default());
                let union = |ids: &[String], changed: bool| -> Vec<SgPermission> {
                    ids.iter()
                        .flat_map(|id| {
                            let rules = match rules_after.get(id) {
                                Some(r) if changed => r.clone(),
                                _ => live
                                    .groups
                                    .get(id)
                                    .map(|g| g.rules.clone())
                                    .unwrap_or_default(),
                            };
                            rules
                                .into_iter()
                                .filter(|r| r.direction == Direction::Ingress)
                                .map(|r| r.permission)
                        })
                        .collect()
                };
                let node_intent = |selected: &[&ValidPolicy]| node_ingress(selected, &facts);
                let (b, _) = exposure(
                    &union(&before_groups, false),
                    node_intent(&selected_before).as_deref(),
                    &scopes,
                );
                let (a, more) = exposure(
                    &union(&after_groups, true),
                    node_intent(&selected_after).as_deref(),
                    &scopes,
                );
                let before_perms: Vec<SgPermission> = b.iter().map(|e| e.traffic.clone()).collect();
                let widened: Vec<String> = a
                    .iter()
                    .filter(|e| world(e) && !covered(&e.traffic, &before_perms))
                    .map(ToString::to_string)
                    .collect();
                let mut after_text: Vec<String> = a.iter().map(ToString::to_string).collect();
                if more > 0 {
                    after_text.push(format!("... and {more} more"));
                }
                (
                    Some(b.iter().map(ToString::to_string).collect()),
                    Some(after_text),
                    widened,
                )
            }
        };
        nodes.push(NodePlan {
            node: name,
            openings,
            rules,
            exposure_before,
            exposure_after,
            widened,
        });
    }
    Ok(Plan {
        groups,
        nodes,
        problems,
    })
}

fn world(e: &Exposed) -> bool {
    match &e.traffic.peer {
        crate::policy::SgPeer::Ipv4(n) => n.prefix_len() == 0,
        crate::policy::SgPeer::Ipv6(n) => n.prefix_len() == 0,
        _ => false,
    }
}

/// What the Enforce policies governing inbound traffic admit on the node
/// layer (`None`: none governs it, the node layer drops nothing).
fn node_ingress(selected: &[&ValidPolicy], facts: &Facts) -> Option<Vec<SgPermission>> {
    let mut out: Option<Vec<SgPermission>> = None;
    for p in selected.iter().filter(|p| p.mode() == PolicyMode::Enforce) {
        if let Some(perms) = Intent::of(p, facts, Layer::Node).ingress {
            out.get_or_insert_with(Vec::new).extend(perms);
        }
    }
    out
}

/// The group plan of one manifest, and the group's rules after it.
fn group_plan(
    live: &Live,
    facts: &Facts,
    origin: &str,
    p: &FirewallPolicy,
    v: &ValidPolicy,
) -> Result<(GroupPlan, Vec<CurrentSgRule>), Error> {
    let name = p.name_any();
    let target = p.spec.security_group.clone().unwrap_or_default();
    let live_status = live
        .policy(&name)
        .and_then(|l| l.status.as_ref())
        .and_then(|s| s.security_group.clone());
    let (group_id, ownership, current) = match &target.id {
        Some(id) => {
            let g = live.groups.get(id).ok_or_else(|| {
                Error::Live(format!(
                    "{origin}: the Security Group {id} named in spec.securityGroup.id does not exist"
                ))
            })?;
            (Some(id.clone()), GroupOwnership::Adopted, g.rules.clone())
        }
        None => match live_status
            .as_ref()
            .filter(|s| s.owned)
            .and_then(|s| live.groups.get(&s.id))
        {
            Some(g) => (
                Some(g.info.id.clone()),
                GroupOwnership::Created,
                g.rules.clone(),
            ),
            // A new group holds AWS's default egress rule.
            None => (
                None,
                GroupOwnership::Created,
                vec![CurrentSgRule {
                    rule_id: "(default)".into(),
                    direction: Direction::Egress,
                    permission: SgPermission::default_egress()[0].clone(),
                    description: None,
                }],
            ),
        },
    };
    let cloud = plan_cloud(v, facts).map_err(|e| Error::Render(format!("{origin}: {e}")))?;
    let diff = diff_security_group(&cloud.applied(), &current, ownership);
    let mut changes = Vec::new();
    for direction in [Direction::Ingress, Direction::Egress] {
        let way = match direction {
            Direction::Ingress => "from",
            Direction::Egress => "to",
        };
        let d = diff.direction(direction);
        for a in &d.authorize {
            changes.push(format!(
                "+ {direction} {} {way} {}  \"{}\"",
                traffic(&a.permission),
                a.permission.peer,
                a.description
            ));
        }
        for id in &d.revoke {
            let what = current
                .iter()
                .find(|r| &r.rule_id == id)
                .map(|r| {
                    format!(
                        "{} {way} {}  \"{}\"",
                        traffic(&r.permission),
                        r.permission.peer,
                        r.description.as_deref().unwrap_or_default()
                    )
                })
                .unwrap_or_default();
            changes.push(format!("- {direction} {what} (rule {id})"));
        }
        for (id, desc) in &d.update_descriptions {
            changes.push(format!("~ {direction} rule {id}: description \"{desc}\""));
        }
    }
    // Attachments: on the selected nodes' primary interfaces, in Enforce
    // only; off every other interface carrying the group where Palisade
    // put it (any, for a group it created; those tagged for this policy
    // when attached, for an adopted one) — as the controller does.
    let attaches = target.attaches() && v.mode() == PolicyMode::Enforce;
    let owned = ownership == GroupOwnership::Created;
    let (mut attach, mut wanted_enis) = (Vec::new(), BTreeSet::new());
    for n in &live.nodes {
        let Some(instance) = live.instance(&n.name) else {
            continue;
        };
        let Some(eni) = &instance.primary_eni else {
            continue;
        };
        if attaches && v.selects(n) {
            wanted_enis.insert(eni.clone());
            let has = group_id
                .as_ref()
                .is_some_and(|g| instance.eni_groups.contains(g));
            if !has {
                attach.push(n.name.clone());
            }
        }
    }
    let mut detach = Vec::new();
    if let Some(id) = &group_id {
        let uid = live
            .policy(&name)
            .and_then(|l| l.metadata.uid.clone())
            .unwrap_or_default();
        let tag = crate::cloud::tags::attached(id, &uid);
        for eni in live.carrying.get(id).into_iter().flatten() {
            if wanted_enis.contains(&eni.id) || !(owned || eni.tags.contains_key(&tag)) {
                continue;
            }
            let instance = eni.instance_id.clone().unwrap_or_default();
            let node = live
                .nodes
                .iter()
                .find(|n| n.instance_id() == Some(instance.as_str()))
                .map_or_else(|| format!("instance {instance}"), |n| n.name.clone());
            detach.push(node);
        }
    }
    Ok((
        GroupPlan {
            policy: name,
            origin: origin.to_string(),
            group_name: group_id
                .as_ref()
                .and_then(|id| live.groups.get(id))
                .map(|g| g.info.name.clone())
                .unwrap_or_default(),
            group_id,
            ownership,
            changes,
            attach,
            detach,
            warnings: cloud.warnings.iter().map(ToString::to_string).collect(),
        },
        diff.apply_to(&current),
    ))
}

/// The summary's openings as one line each.
fn opening_lines(selected: &[&ValidPolicy]) -> Vec<String> {
    super::summary::openings(selected)
        .into_iter()
        .map(|o| {
            let (dir, way) = match o.direction {
                Direction::Ingress => ("in", "from"),
                Direction::Egress => ("out", "to"),
            };
            let audit = if o.audit {
                " (Audit: not enforced)"
            } else {
                ""
            };
            format!(
                "{dir} {} {way} {} [{}] {}{audit}",
                o.traffic, o.peers, o.layers, o.rule
            )
        })
        .collect()
}

/// The restore input of a ruleset, one line per rule, set entry or chain
/// declaration, each prefixed with its tool.
fn restore_lines(rs: &NodeRuleset) -> Vec<String> {
    let scripts = render_ruleset(rs);
    let mut out = Vec::new();
    for (tool, part) in [
        ("ipset", &scripts.sets),
        ("iptables", &scripts.ipv4),
        ("ip6tables", &scripts.ipv6),
    ] {
        for line in part.iter().flat_map(|t| t.lines()) {
            if line.is_empty() || line == "*filter" || line == "COMMIT" {
                continue;
            }
            out.push(format!("{tool}: {line}"));
        }
    }
    out
}

/// `-` for lines only in `before` (in its order), then `+` for lines only
/// in `after` (in its order).
fn line_diff(before: &[String], after: &[String]) -> Vec<String> {
    let b: BTreeSet<&String> = before.iter().collect();
    let a: BTreeSet<&String> = after.iter().collect();
    before
        .iter()
        .filter(|l| !a.contains(l))
        .map(|l| format!("- {l}"))
        .chain(
            after
                .iter()
                .filter(|l| !b.contains(l))
                .map(|l| format!("+ {l}")),
        )
        .collect()
}

/// Writes `plan` as text.
pub fn write_text(plan: &Plan, out: &mut impl Write) -> Result<(), Error> {
    for g in &plan.groups {
        let group = match &g.group_id {
            Some(id) => format!(
                "{id} ({}, {})",
                g.group_name,
                match g.ownership {
                    GroupOwnership::Created => "created by Palisade",
                    GroupOwnership::Adopted => "adopted: only its palisade:-marked rules change",
                }
            ),
            None => "a new Security Group (created on apply)".to_string(),
        };
        writeln!(out, "Policy {} ({}): {group}", g.policy, g.origin)?;
        if g.changes.is_empty() && g.attach.is_empty() && g.detach.is_empty() {
            writeln!(out, "  no change to the group")?;
        }
        for c in &g.changes {
            writeln!(out, "  {c}")?;
        }
        for n in &g.attach {
            writeln!(out, "  + attach to the interface of node {n}")?;
        }
        for n in &g.detach {
            writeln!(out, "  - detach from the interface of node {n}")?;
        }
        for w in &g.warnings {
            writeln!(out, "  warning: {w}")?;
        }
        writeln!(out)?;
    }
    for n in &plan.nodes {
        writeln!(out, "Node {}:", n.node)?;
        if n.openings.is_empty() && n.rules.is_empty() {
            writeln!(out, "  node layer: no change")?;
        } else {
            writeln!(out, "  openings:")?;
            for o in &n.openings {
                writeln!(out, "    {o}")?;
            }
            writeln!(out, "  node rules:")?;
            for r in &n.rules {
                writeln!(out, "    {r}")?;
            }
        }
        match (&n.exposure_before, &n.exposure_after) {
            (Some(b), Some(a)) => {
                writeln!(
                    out,
                    "  exposure (what the whole of each scope reaches inbound, both layers):"
                )?;
                let list = |l: &[String]| {
                    if l.is_empty() {
                        "nothing".to_string()
                    } else {
                        l.join(", ")
                    }
                };
                writeln!(out, "    before: {}", list(b))?;
                writeln!(out, "    after:  {}", list(a))?;
                for w in &n.widened {
                    writeln!(out, "    WIDENED: {w}")?;
                }
            }
            _ => writeln!(out, "  exposure: unknown (the node is not an EC2 instance)")?,
        }
        writeln!(out)?;
    }
    for p in &plan.problems {
        writeln!(out, "note: {p}")?;
    }
    let o = plan.outcome();
    writeln!(
        out,
        "{}",
        match (o.changes, o.internet_widened) {
            (false, _) => "No changes.",
            (true, false) => "Changes planned.",
            (true, true) => "Changes planned; exposure to the whole internet WIDENS.",
        }
    )?;
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::cloud::{GroupInfo, InstanceInfo};
    use crate::policy::{NodeFacts, SgPeer, SgProtocol};

    fn world_ssh() -> CurrentSgRule {
        CurrentSgRule {
            rule_id: "sgr-0wide".into(),
            direction: Direction::Ingress,
            permission: SgPermission {
                protocol: SgProtocol::Tcp,
                from_port: 22,
                to_port: 22,
                peer: SgPeer::Ipv4("0.0.0.0/0".parse().unwrap()),
            },
            description: Some("ssh anywhere".into()),
        }
    }

    /// One node on EC2 whose interface carries a node-group group allowing
    /// SSH from anywhere; no policy yet.
    fn live() -> Live {
        let mut live = Live {
            nodes: vec![NodeFacts {
                name: "web-1".into(),
                labels: [("role".to_string(), "web".to_string())].into(),
                addresses: vec!["10.0.1.10".parse().unwrap()],
                provider_id: Some("aws:///eu-west-1a/i-0123456789abcdef0".into()),
            }],
            ..Default::default()
        };
        live.instances.insert(
            "i-0123456789abcdef0".into(),
            InstanceInfo {
                id: "i-0123456789abcdef0".into(),
                primary_eni: Some("eni-1".into()),
                eni_groups: vec!["sg-0123456789abcdef1".into()],
                ..Default::default()
            },
        );
        live.groups.insert(
            "sg-0123456789abcdef1".into(),
            super::super::live::LiveGroup {
                info: GroupInfo {
                    id: "sg-0123456789abcdef1".into(),
                    name: "nodegroup".into(),
                    ..Default::default()
                },
                rules: vec![world_ssh()],
            },
        );
        live
    }

    fn manifest(yaml: &str) -> Vec<(String, FirewallPolicy)> {
        vec![("web.yaml#1".into(), serde_yaml::from_str(yaml).unwrap())]
    }

    #[test]
    fn a_first_policy_creates_and_attaches_a_group_and_moves_the_exposure() {
        let m = manifest(
            "apiVersion: palisade.dev/v1alpha1\nkind: FirewallPolicy\nmetadata: {name: web}\nspec:\n  nodeSelector: {matchLabels: {role: web}}\n  policyTypes: [Ingress]\n  ingress:\n    - {name: https, protocol: TCP, ports: [{port: 443}], peers: [{cidr: 0.0.0.0/0}]}\n",
        );
        let p = plan(&live(), &m, &PlanSettings::default()).unwrap();
        assert_eq!(p.groups.len(), 1);
        let g = &p.groups[0];
        assert_eq!(g.group_id, None, "a new group");
        assert_eq!(
            g.changes,
            ["+ ingress tcp/443 from 0.0.0.0/0  \"palisade:web/https\""]
        );
        assert_eq!(g.attach, ["web-1"]);
        let n = &p.nodes[0];
        assert_eq!(
            n.openings,
            ["+ in tcp/443 from 0.0.0.0/0 [cloud+node] web/https"]
        );
        assert!(
            n.rules
                .iter()
                .any(|r| r.starts_with("+ iptables: -A PAL-I-")),
            "{:#?}",
            n.rules
        );
        // SSH from anywhere was open (no node policy); the node layer now
        // closes it, and HTTPS opens.
        assert_eq!(
            n.exposure_before.as_deref(),
            Some(&["tcp/22 from 0.0.0.0/0".to_string()][..])
        );
        assert_eq!(
            n.exposure_after.as_deref(),
            Some(&["tcp/443 from 0.0.0.0/0".to_string()][..])
        );
        assert_eq!(n.widened, ["tcp/443 from 0.0.0.0/0"]);
        assert_eq!(
            p.outcome(),
            PlanOutcome {
                changes: true,
                internet_widened: true
            }
        );
    }

    #[test]
    fn an_adopted_group_only_loses_the_policys_own_rules() {
        let mut live = live();
        let mut ours = world_ssh();
        ours.rule_id = "sgr-0ours".into();
        ours.permission.from_port = 8080;
        ours.permission.to_port = 8080;
        ours.description = Some("palisade:web/admin".into());
        live.groups
            .get_mut("sg-0123456789abcdef1")
            .unwrap()
            .rules
            .push(ours);
        let m = manifest(
            "apiVersion: palisade.dev/v1alpha1\nkind: FirewallPolicy\nmetadata: {name: web}\nspec:\n  securityGroup: {id: sg-0123456789abcdef1}\n  nodeSelector: {matchLabels: {role: web}}\n  policyTypes: [Ingress]\n  ingress:\n    - {name: ssh, protocol: TCP, ports: [{port: 22}], peers: [{cidr: 203.0.113.0/24}]}\n",
        );
        let p = plan(&live, &m, &PlanSettings::default()).unwrap();
        let g = &p.groups[0];
        assert_eq!(g.group_id.as_deref(), Some("sg-0123456789abcdef1"));
        assert_eq!(g.ownership, GroupOwnership::Adopted);
        assert_eq!(
            g.changes,
            [
                "+ ingress tcp/22 from 203.0.113.0/24  \"palisade:web/ssh\"",
                "- ingress tcp/8080 from 0.0.0.0/0  \"palisade:web/admin\" (rule sgr-0ours)"
            ]
        );
        // The foreign SSH rule stays; the node layer now narrows it.
        assert!(p.nodes[0].widened.is_empty());
        assert_eq!(p.nodes[0].exposure_after, Some(Vec::new()));
    }

    #[test]
    fn a_created_group_leaves_the_nodes_no_longer_selected() {
        let mut live = live();
        let id = "sg-0123456789abcdef2";
        let mut http = world_ssh();
        http.rule_id = "sgr-0http".into();
        http.permission.from_port = 80;
        http.permission.to_port = 80;
        http.description = Some("palisade:web/http".into());
        live.groups.insert(
            id.into(),
            super::super::live::LiveGroup {
                info: GroupInfo {
                    id: id.into(),
                    name: "palisade-prod-web".into(),
                    ..Default::default()
                },
                rules: vec![http],
            },
        );
        live.instances
            .get_mut("i-0123456789abcdef0")
            .unwrap()
            .eni_groups
            .push(id.into());
        live.carrying.insert(
            id.into(),
            vec![crate::cloud::EniInfo {
                id: "eni-1".into(),
                groups: vec!["sg-0123456789abcdef1".into(), id.into()],
                instance_id: Some("i-0123456789abcdef0".into()),
                ..Default::default()
            }],
        );
        let yaml = |role: &str| {
            format!(
                "apiVersion: palisade.dev/v1alpha1\nkind: FirewallPolicy\nmetadata: {{name: web}}\nspec:\n  nodeSelector: {{matchLabels: {{role: {role}}}}}\n  policyTypes: [Ingress]\n  ingress:\n    - {{name: http, protocol: TCP, ports: [{{port: 80}}], peers: [{{cidr: 0.0.0.0/0}}]}}\n"
            )
        };
        let mut current: FirewallPolicy = serde_yaml::from_str(&yaml("web")).unwrap();
        current.status = Some(crate::api::FirewallPolicyStatus {
            security_group: Some(crate::api::SecurityGroupStatus {
                id: id.into(),
                owned: true,
                ..Default::default()
            }),
            ..Default::default()
        });
        live.policies.push(current);
        // The same policy: nothing to do.
        let same = plan(&live, &manifest(&yaml("web")), &PlanSettings::default()).unwrap();
        assert_eq!(same.outcome(), PlanOutcome::default(), "{same:#?}");
        // Moved to other nodes: the group leaves web-1, whose node layer
        // is no longer governed (SSH from anywhere is open again).
        let moved = plan(&live, &manifest(&yaml("db")), &PlanSettings::default()).unwrap();
        let g = &moved.groups[0];
        assert_eq!(g.group_id.as_deref(), Some(id));
        assert!(g.changes.is_empty(), "{:?}", g.changes);
        assert_eq!(g.detach, ["web-1"]);
        let n = &moved.nodes[0];
        assert_eq!(
            n.exposure_before.as_deref(),
            Some(&["tcp/80 from 0.0.0.0/0".to_string()][..])
        );
        assert_eq!(
            n.exposure_after.as_deref(),
            Some(&["tcp/22 from 0.0.0.0/0".to_string()][..])
        );
        assert_eq!(n.widened, ["tcp/22 from 0.0.0.0/0"]);
    }
}
