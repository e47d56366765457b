"""pytest-benchmark suite: baseline and dcgen side by side, ratios printed at the end.

On a GPU the cases run at real sizes (bf16); on a CPU at small sizes with narrow models, so CI
exercises every benchmark without timing anything meaningful."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import pytest  # noqa: E402
from _harness import format_table, ratio_rows  # noqa: E402


@pytest.hookimpl(trylast=True)  # after pytest-benchmark's own tables
def pytest_terminal_summary(terminalreporter, config):  # noqa: ANN001
    session = getattr(config, "_benchmarksession", None)
    if session is None or not session.benchmarks:
        return
    entries = []
    for m in session.benchmarks:
        impl = m.extra_info.get("impl")
        if impl is None:
            continue
        median = m.get("median") if m else None
        entries.append({"group": m.group, "impl": impl, "median_s": median, "extra": m.extra_info})
    if entries:
        terminalreporter.write_line("")
        terminalreporter.write_line("dcgen vs baseline (same run, median):")
        terminalreporter.write_line(format_table(ratio_rows(entries)))
