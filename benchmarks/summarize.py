"""Print the baseline-vs-dcgen table from pytest-benchmark JSON files.

python benchmarks/summarize.py out.json [more.json ...] [--markdown table.md]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from _harness import format_table, ratio_rows  # noqa: E402


def load_entries(paths: list[str]) -> tuple[list[dict], dict]:
    entries, machine = [], {}
    for p in paths:
        try:
            data = json.loads(Path(p).read_text())
        except (OSError, ValueError) as err:
            # a benchmark process cut off by its time cap leaves an empty or partial JSON: the
            # other files' rows still make a table
            print(f"summarize: skipping {p} ({type(err).__name__}: {err})", file=sys.stderr)
            continue
        machine = data.get("machine_info", machine)
        for b in data.get("benchmarks", []):
            impl = b.get("extra_info", {}).get("impl")
            if impl is None:
                continue
            stats = b.get("stats") or {}
            entries.append(
                {
                    "group": b["group"],
                    "impl": impl,
                    "median_s": stats.get("median"),
                    "extra": b["extra_info"],
                }
            )
    return entries, machine


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("json", nargs="+")
    ap.add_argument("--markdown", help="also write the table to this file")
    args = ap.parse_args(argv)
    entries, _ = load_entries(args.json)
    table = format_table(ratio_rows(entries))
    print(table)
    if args.markdown:
        Path(args.markdown).write_text(table + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
