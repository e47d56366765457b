"""A training log whose last append stopped part way (a full disk, a kill) is read without that
line and mended before the next append; a damaged line elsewhere is an error naming it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dcgen.train import loop


def _entry(step: int) -> str:
    return json.dumps({"tag": "train", "step": step, "loss": 0.5, "lr": 1e-3, "grad_norm": 1.0})


def test_a_log_cut_off_mid_line_is_read_without_that_line_and_mended(tmp_path: Path) -> None:
    # an append that stopped part way (a full disk, a kill) made every later resume fail with
    # "Unterminated string starting at: line 1 column 21", naming no file
    log = tmp_path / loop.LOG_NAME
    log.write_text(_entry(1) + "\n" + _entry(2) + "\n" + _entry(3)[:20])
    assert [e["step"] for e in loop.read_log(log)] == [1, 2]
    loop._truncate_log(log, "train", 2)  # what a resume from step 2 does before appending
    assert log.read_text() == _entry(1) + "\n" + _entry(2) + "\n"
    # a complete last entry without its newline is kept, and the next append starts a line
    log.write_text(_entry(1) + "\n" + _entry(2))
    loop._truncate_log(log, "train", 2)
    assert log.read_text().endswith("\n") and len(loop.read_log(log)) == 2


def test_a_damaged_line_inside_the_log_is_named(tmp_path: Path) -> None:
    log = tmp_path / loop.LOG_NAME
    log.write_text(_entry(1) + "\n" + "garbage\n" + _entry(3) + "\n")
    with pytest.raises(ValueError, match=rf"{loop.LOG_NAME}: line 2 is not a log entry"):
        loop.read_log(log)
