"""A step with a non-finite loss or gradient is skipped, not taken: one made every weight NaN,
and the run went on checkpointing NaN weights (pruning the good checkpoints). And 16-bit
trainable weights, whose small updates are lost, are warned about."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from dcgen.train import loop
from dcgen.train.checkpoint import list_checkpoints, load_checkpoint
from dcgen.train.distributed import DistContext
from tests.train.loop_utils import Pairs, Regression, loop_config


def _run(
    root: Path, bad: list[int], steps: int = 12, dtype: torch.dtype = torch.float32
) -> tuple[nn.Module, list[dict]]:
    cfg = loop_config(root, steps, checkpoint_every=2, keep_checkpoints=3, grad_clip=1.0)
    torch.manual_seed(0)
    model = Regression().to(dtype)
    try:
        loop.train_loop(model, lambda b, r: {"x": b["x"].to(dtype), "y": b["y"].to(dtype)}, Pairs(bad), cfg,
                        DistContext(), root, steps=steps, bucket_key="x", progress=False)  # fmt: skip
    finally:
        lines = (root / loop.LOG_NAME).read_text().splitlines()
    return model, [json.loads(line, parse_constant=_not_json) for line in lines]


def _not_json(token: str) -> float:
    raise AssertionError(f"the log holds {token}, which is not JSON (jq, JSON.parse refuse it)")


def _checkpoints_finite(root: Path) -> bool:
    kept = list_checkpoints(root / loop.CHECKPOINT_DIR)
    assert kept
    return all(
        torch.isfinite(t).all()
        for p in kept
        for t in load_checkpoint(p, restore_rng=False).model_state["trainable"].values()
    )


def test_a_corrupt_sample_skips_its_steps_and_the_run_stays_finite(tmp_path):
    model, log = _run(tmp_path, bad=[5])
    skipped = [e["step"] for e in log if e.get("skipped")]
    assert skipped and len(skipped) < len(log)  # the corrupt batch's steps only
    assert all(e["loss"] == e["loss"] and abs(e["loss"]) != float("inf")
               for e in log if not e.get("skipped"))  # fmt: skip
    assert torch.isfinite(model.lin.weight).all() and torch.isfinite(model.lin.bias).all()
    assert _checkpoints_finite(tmp_path)
    # a skipped step's loss and norm are null in the file and NaN through read_log
    assert all(e["loss"] is None and e["grad_norm"] is None for e in log if e.get("skipped"))
    read = {e["step"]: e for e in loop.read_log(tmp_path / loop.LOG_NAME)}
    assert all(read[s]["loss"] != read[s]["loss"] for s in skipped)  # NaN


def test_a_run_that_keeps_diverging_stops_with_its_checkpoints_finite(tmp_path, monkeypatch):
    monkeypatch.setattr(loop, "MAX_NONFINITE_STEPS", 3)
    with pytest.raises(loop.TrainingDivergedError, match=r"3 steps in a row up to step \d+"):
        _run(tmp_path, bad=list(range(8)))  # every sample corrupt: every step skipped
    assert _checkpoints_finite(tmp_path)


def test_16_bit_trainable_weights_are_warned_about(tmp_path, caplog):
    # AdamW on bf16 weights keeps bf16 moments and loses updates below a weight's ulp (the
    # stage functions trained a bf16 model's new embedder and head so, without a word)
    with caplog.at_level("WARNING"):
        _run(tmp_path / "fp32", bad=[], steps=2)
    assert "trainable tensors are" not in caplog.text
    with caplog.at_level("WARNING"):
        _run(tmp_path / "bf16", bad=[], steps=2, dtype=torch.bfloat16)
    assert "2 trainable tensors are bfloat16" in caplog.text
