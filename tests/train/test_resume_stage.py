"""A stage interrupted after a checkpoint and resumed ends with the same weights, bit for bit."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dcgen.train.stages import run
from tests.train.stage_utils import config, make_cache, save_adapted, trainable_weights


class Interrupt(RuntimeError):
    pass


@pytest.mark.parametrize(("stage", "extra"), [("output", {}), ("finetune", {"ema_decay": 0.8})])
def test_interrupted_run_resumes_exactly(tmp_path: Path, stage: str, extra: dict) -> None:
    cache = make_cache(tmp_path)
    adapted = save_adapted(tmp_path)
    # 8 samples / batch 4 = 2 batches per epoch: 7 steps cross epoch boundaries, and the
    # interruption at step 5 loses step 5 (the last checkpoint is step 4) mid-epoch.
    kw = dict(steps=7, checkpoint_every=2, warmup_steps=2, keep_checkpoints=2, **extra)
    straight = config(tmp_path, stage, adapted, cache, out_dir=str(tmp_path / "a"), **kw)
    run(straight, progress=False)

    broken = config(tmp_path, stage, adapted, cache, out_dir=str(tmp_path / "b"), **kw)

    def stop(step: int, loss: float) -> None:
        if step == 5:
            raise Interrupt

    with pytest.raises(Interrupt):
        run(broken, progress=False, on_step=stop)
    summary = run(broken, progress=False)  # resumes from step-00000004
    assert summary["steps"] == 7

    a, b = trainable_weights(tmp_path / "a"), trainable_weights(tmp_path / "b")
    assert a.keys() == b.keys() and a
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # The replayed steps replace the lost ones in the log: same losses, once each.
    log = [json.loads(x) for x in (tmp_path / "b" / "log.jsonl").read_text().splitlines()]
    ref = [json.loads(x) for x in (tmp_path / "a" / "log.jsonl").read_text().splitlines()]
    assert [e["step"] for e in log] == list(range(1, 8))
    assert [e["loss"] for e in log] == [e["loss"] for e in ref]
