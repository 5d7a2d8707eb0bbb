"""Build ``docs/reliability.md``'s outcome table from the reliability log the suite wrote.

    python -m tests.reliability.report [--log build/reliability/outcomes.jsonl] [--doc docs/reliability.md]

The document keeps its hand-written text; only the part between ``<!-- outcomes:begin -->`` and
``<!-- outcomes:end -->`` is replaced by a table with one line per scenario (the last record of each scenario wins).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from tests.reliability.outcomes import DEFAULT_LOG, LOG_ENV

BEGIN, END = "<!-- outcomes:begin -->", "<!-- outcomes:end -->"
DOC = Path(__file__).resolve().parents[2] / "docs" / "reliability.md"


def table(records: list[dict]) -> str:
    """The Markdown table of the last record per scenario, in first-seen order."""
    last: dict[str, dict] = {}
    for rec in records:
        last[rec["scenario"]] = rec
    lines = [
        "| scenario | guarantee | planned | written | errored | duplicated | missing | unexpected | exactly once | error types |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    for rec in last.values():
        types = ", ".join(f"{k} {v}" for k, v in sorted(rec.get("error_types", {}).items())) or "-"
        lines.append(
            f"| `{rec['scenario']}` | {rec['guarantee']} | {rec['planned']} | {rec['written']} | {rec['errored']} "
            f"| {rec['duplicated']} | {rec['missing']} | {rec['unexpected']} "
            f"| {'yes' if rec['exactly_once'] else '**no**'} | {types} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--log", default=os.environ.get(LOG_ENV) or str(DEFAULT_LOG))
    parser.add_argument("--doc", default=str(DOC))
    args = parser.parse_args(argv)
    records = [json.loads(line) for line in Path(args.log).read_text().splitlines() if line.strip()]
    doc = Path(args.doc)
    text = doc.read_text() if doc.exists() else f"# Reliability\n\n{BEGIN}\n{END}\n"
    if BEGIN not in text or END not in text:
        raise SystemExit(f"{doc}: no {BEGIN} ... {END} markers to fill")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    doc.write_text(f"{head}{BEGIN}\n{table(records)}\n{END}{tail}")
    print(f"{doc}: {len({r['scenario'] for r in records})} scenarios from {args.log}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
