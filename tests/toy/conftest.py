"""The fast demo run that several test modules read (one run per session: it takes a while)."""

from __future__ import annotations

import json

import pytest

from dcgen.cli import main


@pytest.fixture(scope="session")
def fast_run(tmp_path_factory):
    """(run folder, report) of `dcgen demo --fast` on the CPU."""
    out = tmp_path_factory.mktemp("demo")
    code = main(["demo", "--fast", "--out", str(out), "--device", "cpu", "--no-progress"])
    assert code == 0
    return out, json.loads((out / "report.json").read_text())
