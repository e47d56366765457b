"""A stage interrupted after a checkpoint and resumed ends with the same weights, bit for bit."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from dcgen.train.checkpoint import CheckpointError, list_checkpoints
from dcgen.train.config import ConfigError
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
    changed: a CheckpointError naming the step, a ConfigError naming the setting (or, without
    the run's config.json, a CheckpointError naming the tensors and both shapes)."""
    cache, adapted = make_cache(tmp_path), save_adapted(tmp_path)
    kw = dict(out_dir=str(tmp_path / "run"), checkpoint_every=2)
    run(config(tmp_path, "finetune", adapted, cache, steps=4, lora_rank=4, **kw), progress=False)
    with pytest.raises(CheckpointError, match="at step 4, past this run's steps=2"):
        run(config(tmp_path, "finetune", adapted, cache, steps=2, lora_rank=4, **kw),
            progress=False)  # fmt: skip
    with pytest.raises(ConfigError, match=r"other settings \(lora_rank: 4 then, 8 now\)"):
        run(config(tmp_path, "finetune", adapted, cache, steps=6, lora_rank=8, **kw),
            progress=False)  # fmt: skip
    # Without the run's config.json (a folder copied without it), the checkpoint's own shapes
    # still catch it.
    (tmp_path / "run" / "config.json").unlink()
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


def test_continuing_with_more_steps_follows_the_longer_schedule(tmp_path: Path) -> None:
    """A finished 3-step run continued to 6 steps (what the loop's error message suggests):
    from the first resumed step on, the learning rate is the 6-step schedule's, as in a
    straight 6-step run, not the lr the 3-step cosine had decayed to (0 at its end)."""
    cache, adapted = make_cache(tmp_path), save_adapted(tmp_path)
    kw = dict(checkpoint_every=3, warmup_steps=1, lr=3e-3)
    straight = config(tmp_path, "output", adapted, cache, out_dir=str(tmp_path / "a"), steps=6,
                      **kw)  # fmt: skip
    run(straight, progress=False)
    out = str(tmp_path / "b")
    run(config(tmp_path, "output", adapted, cache, out_dir=out, steps=3, **kw), progress=False)
    run(config(tmp_path, "output", adapted, cache, out_dir=out, steps=6, **kw), progress=False)
    ref = {e["step"]: e["lr"] for e in read_log(tmp_path / "a" / "log.jsonl")}
    got = {e["step"]: e["lr"] for e in read_log(tmp_path / "b" / "log.jsonl")}
    # (without the reset, step 4 ran at the 3-step cosine's end: lr 0)
    assert [got[s] for s in (4, 5, 6)] == [ref[s] for s in (4, 5, 6)]
    assert got[4] > 0


@pytest.mark.parametrize(
    ("changed", "value"),
    [("lr", 0.01), ("seed", 1), ("batch_size", 2), ("lora_alpha", 32.0), ("ema_decay", 0.5),
     ("ema_warmup", False)],
)  # fmt: skip
def test_resuming_with_changed_settings_is_refused(tmp_path, changed, value) -> None:
    cache, adapted = make_cache(tmp_path), save_adapted(tmp_path)
    kw = dict(out_dir=str(tmp_path / "run"), steps=4, checkpoint_every=2, ema_decay=0.8)

    def stop(step: int, loss: float) -> None:
        if step == 3:
            raise Interrupt

    with pytest.raises(Interrupt):
        run(config(tmp_path, "finetune", adapted, cache, **kw), progress=False, on_step=stop)
    before = (tmp_path / "run" / "config.json").read_text()
    with pytest.raises(ConfigError, match=rf"other settings \({changed}: .* then, .* now\)"):
        run(config(tmp_path, "finetune", adapted, cache, **{**kw, changed: value}),
            progress=False)  # fmt: skip
    assert (tmp_path / "run" / "config.json").read_text() == before  # still the run's own


def test_a_run_resumes_from_another_working_directory(tmp_path, monkeypatch) -> None:
    # config.json kept the paths as written, relative to where the run started; the resume
    # check read them from the new working directory and refused the same run
    cache, adapted = make_cache(tmp_path), save_adapted(tmp_path)
    monkeypatch.chdir(tmp_path)
    kw = dict(steps=4, checkpoint_every=2)

    def stop(step: int, loss: float) -> None:
        if step == 3:
            raise Interrupt

    first = config(tmp_path, "finetune", Path(adapted.name), Path(cache.name), out_dir="run", **kw)
    with pytest.raises(Interrupt):
        run(first, progress=False, on_step=stop)
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    again = config(tmp_path, "finetune", Path("..", adapted.name), Path("..", cache.name),
                   out_dir=str(Path("..", "run")), **kw)  # fmt: skip
    assert run(again, progress=False)["steps"] == 4
    assert [e["step"] for e in read_log(tmp_path / "run" / "log.jsonl")][-1] == 4


def test_a_run_from_before_ema_warmup_resumes_only_without_it(tmp_path) -> None:
    # its config.json has no ema_warmup: it averaged at ema_decay from the first step, and the
    # new default (warmup) would switch the decay schedule mid-run
    cfg = config(tmp_path, "finetune", tmp_path, tmp_path, ema_decay=0.9)
    old = {k: v for k, v in json.loads(json.dumps(cfg.to_dict())).items() if k != "ema_warmup"}
    assert cfg.changed_for_resume(old) == [
        "ema_warmup: absent then (no warmup), True now (continue with false)"
    ]
    assert config(tmp_path, "finetune", tmp_path, tmp_path, ema_decay=0.9,
                  ema_warmup=False).changed_for_resume(old) == []  # fmt: skip
    no_ema = {k: v for k, v in old.items() if k != "ema_decay"} | {"ema_decay": None}
    assert config(tmp_path, "finetune", tmp_path, tmp_path).changed_for_resume(no_ema) == []


def test_resuming_may_change_the_length_and_bookkeeping(tmp_path) -> None:
    cache, adapted = make_cache(tmp_path), save_adapted(tmp_path)
    kw = dict(out_dir=str(tmp_path / "run"), checkpoint_every=2)
    run(config(tmp_path, "output", adapted, cache, steps=2, **kw), progress=False)
    relative = os.path.relpath(kw["out_dir"])  # the same folder, named another way
    more = dict(steps=4, checkpoint_every=1, keep_checkpoints=5, log_every=1,
                out_dir=str(relative))  # fmt: skip
    summary = run(config(tmp_path, "output", adapted, cache, **more), progress=False)
    assert summary["steps"] == 4


def test_a_rerun_that_fails_to_save_leaves_the_earlier_outputs_whole(tmp_path: Path, monkeypatch):
    # A rerun with resume = false whose LoRA could not be written (a full disk) left its own
    # latent layers beside the earlier run's LoRA and summary: a pair export would have joined
    import errno

    from dcgen.train import stages

    cache, adapted = make_cache(tmp_path), save_adapted(tmp_path)
    out = tmp_path / "run"
    first = config(tmp_path, "finetune", adapted, cache, out_dir=str(out), steps=2)
    run(first, progress=False)
    names = ("latent_layers.safetensors", "pytorch_lora_weights.safetensors", "summary.json",
             "loss.png")  # fmt: skip
    before = {n: (out / n).read_bytes() for n in names}
    real = stages.save_lora

    def full_disk(transformer, directory, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        real(transformer, directory, *args, **kwargs)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(stages, "save_lora", full_disk)
    again = config(tmp_path, "finetune", adapted, cache, out_dir=str(out), steps=3, resume=False)
    with pytest.raises(OSError, match=rf"cannot write {out}: No space left"):
        run(again, progress=False)
    assert {n: (out / n).read_bytes() for n in names} == before
    assert not list(out.glob(".outputs.*"))
    monkeypatch.undo()
    summary = run(again, progress=False)  # the rerun completes: every output is the new run's
    assert summary["steps"] == 3
    assert json.loads((out / "summary.json").read_text())["steps"] == 3
    assert (out / "latent_layers.safetensors").read_bytes() != before["latent_layers.safetensors"]


def test_resuming_on_another_cache_at_the_same_path_is_refused(tmp_path: Path) -> None:
    """The cache precomputed again at the same path (another DC-AE or text encoder: another
    fingerprint): the resolved paths matched, so the run resumed and trained on other latents."""
    import shutil

    from dcgen.train import precompute
    from tests.train.stage_utils import ImageSet, dcae_encoder, text_encoder

    cache, adapted = make_cache(tmp_path), save_adapted(tmp_path)
    out = str(tmp_path / "run")
    run(config(tmp_path, "output", adapted, cache, out_dir=out, steps=2, checkpoint_every=2),
        progress=False)  # fmt: skip
    assert json.loads((Path(out) / "inputs.json").read_text())["cache_fingerprint"]
    longer = config(tmp_path, "output", adapted, cache, out_dir=out, steps=4, checkpoint_every=2)
    shutil.rmtree(cache)
    precompute(ImageSet(8), {"dcae_latent": dcae_encoder}, text_encoder, cache, shard_size=4,
               batch_size=4, fingerprint="encoded with another DC-AE", progress=False)  # fmt: skip
    with pytest.raises(ConfigError, match="holds checkpoints of a run on another latent cache"):
        run(longer, progress=False)
    assert len(list_checkpoints(Path(out) / "checkpoints")) == 1  # nothing was trained
    shutil.rmtree(cache)
    make_cache(tmp_path)  # the run's own cache again: it continues
    assert run(longer, progress=False)["steps"] == 4
