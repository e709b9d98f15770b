#!/usr/bin/env python3
"""Writes a Helm chart's README.md from its README.md.in and values.yaml.

The template's `@VALUES@` line becomes a table of every value: its key, its
default as values.yaml writes it, and the comment directly above it. The
template may also use `@VERSION@` and `@APP_VERSION@` (from Chart.yaml).

    hack/chart-readme.py [CHART_DIR]           # writes CHART_DIR/README.md
    hack/chart-readme.py [CHART_DIR] -o -      # prints it (make check-generated)

Standard library only, so CI needs nothing installed: values.yaml is read
with a small parser for the subset a values file uses, and refused with a
line number when it goes beyond it. The conventions it relies on:

- a comment directly above a key describes it (blank line: no comment);
  every key needs one, a map of settings included;
- a map in block style is a group of settings, each documented on its own;
  a map or list that is itself one value's default is written in flow style
  (`nodeSelector: {kubernetes.io/os: linux}`, `tolerations: []`); a block
  list of scalars or of flat maps is accepted too and shown in flow style.
"""

from __future__ import annotations

import argparse
import re
import sys
from dataclasses import dataclass
from pathlib import Path

MARKER = "@VALUES@"
KEY = re.compile(r"^(?P<indent> *)(?P<key>[A-Za-z0-9_][A-Za-z0-9_.\-/]*|\"[^\"]+\"|'[^']+'):(?:[ \t]+(?P<rest>.*))?$")
ITEM = re.compile(r"^(?P<indent> *)- ?(?P<rest>.*)$")


class ValuesError(Exception):
    """values.yaml uses YAML this script does not read, or lacks a comment."""


@dataclass
class Row:
    key: str
    default: str | None  # None for a group of settings
    description: str


def strip_comment(text: str) -> str:
    """The value part of `text`, without a trailing ` # comment`."""
    quote = None
    for i, ch in enumerate(text):
        if quote:
            if ch == quote:
                quote = None
        elif ch in "\"'":
            quote = ch
        elif ch == "#" and (i == 0 or text[i - 1] in " \t"):
            return text[:i].rstrip()
    return text.rstrip()


def unquote_key(key: str) -> str:
    return key[1:-1] if key[:1] in "\"'" else key


def flow_of_block_list(lines: list[tuple[int, str]], start: int, parent_indent: int):
    """Reads a block list starting at lines[start]; returns (flow text, next index)."""
    items: list[str] = []
    i = start
    end = start  # after the last line of the last item: comments below it belong to the next key
    item_indent = None
    while i < len(lines):
        lineno, line = lines[i]
        if not line.strip() or line.lstrip().startswith("#"):
            i += 1
            continue
        m = ITEM.match(line)
        indent = len(line) - len(line.lstrip(" "))
        if m and item_indent is None:
            item_indent = indent
        if m and indent == item_indent and indent >= parent_indent:
            first = strip_comment(m.group("rest"))
            if first.startswith("-"):
                raise ValuesError(f"line {lineno}: nested lists are not supported here; use flow style")
            pairs: list[str] = []
            km = KEY.match(" " * (indent + 2) + first)
            if km and not (km.group("rest") or "").strip():
                raise ValuesError(f"line {lineno}: nested maps in a list are not supported; use flow style")
            if km:
                pairs.append(first)
                i += 1
                end = i
                # Further keys of this item, aligned under the first one.
                while i < len(lines):
                    lineno2, line2 = lines[i]
                    if not line2.strip() or line2.lstrip().startswith("#"):
                        i += 1
                        continue
                    indent2 = len(line2) - len(line2.lstrip(" "))
                    if indent2 <= indent:
                        break
                    km = KEY.match(line2)
                    if indent2 != indent + 2 or not km or not (km.group("rest") or "").strip():
                        raise ValuesError(
                            f"line {lineno2}: nested values in a list item are not supported; "
                            "write this default in flow style"
                        )
                    pairs.append(strip_comment(line2.strip()))
                    i += 1
                    end = i
                items.append("{" + ", ".join(pairs) + "}")
            elif first:
                items.append(first)
                i += 1
                end = i
            else:
                raise ValuesError(f"line {lineno}: empty or nested list item; use flow style")
            continue
        if indent <= parent_indent or (item_indent is not None and indent < item_indent):
            break
        raise ValuesError(f"line {lineno}: unexpected indentation in a list")
    return "[" + ", ".join(items) + "]", end


def parse(text: str) -> list[Row]:
    """Every key of values.yaml, in file order, with its default and comment."""
    lines = list(enumerate(text.splitlines(), start=1))
    rows: list[Row] = []
    missing: list[str] = []
    stack: list[list] = []  # [indent, dotted key, indent of its keys] of open groups
    comment: list[str] = []
    i = 0
    while i < len(lines):
        lineno, line = lines[i]
        stripped = line.strip()
        if not stripped:
            comment = []
            i += 1
            continue
        if stripped.startswith("#"):
            comment.append(stripped[1:].strip())
            i += 1
            continue
        if "\t" in line[: len(line) - len(line.lstrip())]:
            raise ValuesError(f"line {lineno}: tab in indentation")
        m = KEY.match(line)
        if not m:
            raise ValuesError(f"line {lineno}: expected `key: value`, found {stripped!r}")
        indent = len(m.group("indent"))
        while stack and stack[-1][0] >= indent:
            stack.pop()
        if indent and not stack:
            raise ValuesError(f"line {lineno}: indented key outside any group")
        if stack:
            if stack[-1][2] is None:
                stack[-1][2] = indent
            if indent != stack[-1][2]:
                raise ValuesError(f"line {lineno}: inconsistent indentation")
        key = unquote_key(m.group("key"))
        path = f"{stack[-1][1]}.{key}" if stack else key
        description = " ".join(c for c in comment if c)
        comment = []
        if not description:
            missing.append(f"line {lineno}: {path}")
        rest = strip_comment(m.group("rest") or "")
        i += 1
        if rest:
            if rest[:1] in "|>&*!":
                raise ValuesError(f"line {lineno}: {path}: block scalars, anchors and tags are not supported")
            rows.append(Row(path, rest, description))
            continue
        # No inline value: a group of settings, a block list, or null.
        j = i
        while j < len(lines) and (not lines[j][1].strip() or lines[j][1].lstrip().startswith("#")):
            j += 1
        nxt = lines[j][1] if j < len(lines) else ""
        nxt_indent = len(nxt) - len(nxt.lstrip(" "))
        if nxt and ITEM.match(nxt) and nxt_indent >= indent:
            flow, i = flow_of_block_list(lines, i, indent)
            rows.append(Row(path, flow, description))
        elif nxt and nxt_indent > indent:
            rows.append(Row(path, None, description))
            stack.append([indent, path, None])
        else:
            rows.append(Row(path, "null", description))
    if missing:
        raise ValuesError(
            "these values have no comment directly above them (it becomes their row "
            "in the chart README):\n  " + "\n  ".join(missing)
        )
    return rows


def chart_field(chart_yaml: str, field: str) -> str:
    for line in chart_yaml.splitlines():
        m = re.match(rf"^{field}:\s*(.+?)\s*$", line)
        if m:
            return m.group(1).strip("\"'")
    raise ValuesError(f"Chart.yaml has no {field}")


def cell(text: str) -> str:
    return text.replace("|", "\\|")


def code(text: str) -> str:
    ticks = "``" if "`" in text else "`"
    pad = " " if "`" in text else ""
    return f"{ticks}{pad}{cell(text)}{pad}{ticks}"


def table(rows: list[Row]) -> str:
    out = ["| Key | Default | Description |", "|---|---|---|"]
    for r in rows:
        key = f"**{code(r.key)}**" if r.default is None else code(r.key)
        default = "" if r.default is None else code(r.default)
        out.append(f"| {key} | {default} | {cell(r.description)} |")
    return "\n".join(out)


def render(chart: Path) -> str:
    template = (chart / "README.md.in").read_text()
    if template.count(MARKER) != 1:
        raise ValuesError(f"{chart / 'README.md.in'} must hold {MARKER} exactly once")
    chart_yaml = (chart / "Chart.yaml").read_text()
    rows = parse((chart / "values.yaml").read_text())
    header = (
        "<!-- Generated by hack/chart-readme.py from README.md.in and values.yaml;"
        " edit those and run `make chart-readme`. -->\n"
    )
    body = (
        template.replace(MARKER, table(rows))
        .replace("@VERSION@", chart_field(chart_yaml, "version"))
        .replace("@APP_VERSION@", chart_field(chart_yaml, "appVersion"))
    )
    return header + body


def main() -> int:
    root = Path(__file__).resolve().parent.parent
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("chart", nargs="?", type=Path, default=root / "charts" / "palisade")
    ap.add_argument("-o", "--output", help="where to write (default CHART/README.md; - for stdout)")
    args = ap.parse_args()
    try:
        text = render(args.chart)
    except (ValuesError, OSError) as e:
        print(f"chart-readme: {e}", file=sys.stderr)
        return 1
    if args.output == "-":
        sys.stdout.write(text)
    else:
        Path(args.output or args.chart / "README.md").write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
