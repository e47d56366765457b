"""A stage interrupted after a checkpoint and resumed ends with the same weights, bit for bit."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dcgen.train.checkpoint import CheckpointError, list_checkpoints
from dcgen.train.loop import read_log
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


def test_fresh_run_sets_an_earlier_runs_checkpoints_aside(tmp_path: Path) -> None:
    """resume = false where an earlier, longer run left checkpoints: they move to
    checkpoints.before-<time> (kept), the fresh run's own checkpoints survive keep_checkpoints,
    and an interrupted fresh run resumes from its own step, not the earlier run's."""
    cache, adapted = make_cache(tmp_path), save_adapted(tmp_path)
    out = str(tmp_path / "run")
    run(config(tmp_path, "output", adapted, cache, out_dir=out, steps=6, checkpoint_every=3,
               keep_checkpoints=2), progress=False)  # fmt: skip
    kw = dict(out_dir=out, steps=4, checkpoint_every=2, keep_checkpoints=2)

    def stop(step: int, loss: float) -> None:
        if step == 3:
            raise Interrupt

    with pytest.raises(Interrupt):
        run(config(tmp_path, "output", adapted, cache, resume=False, **kw), progress=False,
            on_step=stop)  # fmt: skip
    ckpts = tmp_path / "run" / "checkpoints"
    assert [p.name for p in list_checkpoints(ckpts)] == ["step-00000002"]
    (aside,) = (tmp_path / "run").glob("checkpoints.before-*")
    assert [p.name for p in list_checkpoints(aside)] == ["step-00000003", "step-00000006"]
    summary = run(config(tmp_path, "output", adapted, cache, **kw), progress=False)
    assert summary["steps"] == 4
    straight = config(tmp_path, "output", adapted, cache, **{**kw, "out_dir": str(tmp_path / "s")})
    run(straight, progress=False)
    a, b = trainable_weights(tmp_path / "run"), trainable_weights(tmp_path / "s")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_resume_errors_name_the_cause(tmp_path: Path) -> None:
    """A checkpoint past this run's steps, or one whose LoRA rank the config has since
    changed: a CheckpointError naming the step / the tensors and both shapes."""
    cache, adapted = make_cache(tmp_path), save_adapted(tmp_path)
    kw = dict(out_dir=str(tmp_path / "run"), checkpoint_every=2)
    run(config(tmp_path, "finetune", adapted, cache, steps=4, lora_rank=4, **kw), progress=False)
    with pytest.raises(CheckpointError, match="at step 4, past this run's steps=2"):
        run(config(tmp_path, "finetune", adapted, cache, steps=2, lora_rank=4, **kw),
            progress=False)  # fmt: skip
    with pytest.raises(CheckpointError, match=r"lora_A.*saved \(4, \d+\), now \(8, \d+\)"):
        run(config(tmp_path, "finetune", adapted, cache, steps=6, lora_rank=8, **kw),
            progress=False)  # fmt: skip


def test_the_log_records_the_lr_each_step_trained_with(tmp_path: Path) -> None:
    """log.jsonl's lr is the learning rate of that step's update (warm-up: 1/4, 2/4, ... of
    lr), not the next step's."""
    cache, adapted = make_cache(tmp_path), save_adapted(tmp_path)
    cfg = config(tmp_path, "output", adapted, cache, steps=4, warmup_steps=4, lr=1e-3)
    run(cfg, progress=False)
    logged = [e["lr"] for e in read_log(Path(cfg.out_dir) / "log.jsonl")]
    assert logged == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3])
