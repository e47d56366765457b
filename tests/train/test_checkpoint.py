"""Checkpoints: exact resume after SIGKILL, crash-safe writes, retention, RNG round trips.

Run as a script (``python test_checkpoint.py DIR STEPS EVERY KILL_AT``) it is the training
process that the resume test kills.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from dcgen.train import (
    BucketBatchSampler,
    Checkpointer,
    CheckpointError,
    capture_rng_state,
    list_checkpoints,
    load_latest_checkpoint,
    restore_rng_state,
    save_checkpoint,
)
from dcgen.train import checkpoint as ckpt_mod

REPO = Path(__file__).resolve().parents[2]
TOTAL_STEPS = 23  # crosses two epoch boundaries (8 batches per epoch)


def train(directory: Path, total: int, every: int, kill_at: int | None = None) -> dict:
    """A tiny run touching every RNG a real one does: a shuffled sampler, dropout (torch),
    augmentation noise (python + numpy), AdamW with an LR schedule."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # thread count can change float reduction order
    try:
        torch.manual_seed(0)
        random.seed(0)
        np.random.seed(0)
        data_gen = torch.Generator().manual_seed(1)
        x, y = torch.randn(32, 8, generator=data_gen), torch.randn(32, 2, generator=data_gen)
        dataset = torch.utils.data.TensorDataset(x, y)
        model = torch.nn.Sequential(
            torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Dropout(0.2), torch.nn.Linear(16, 2)
        )
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total)
        sampler = BucketBatchSampler([0] * len(dataset), batch_size=4, seed=7)
        # The loader's own generator keeps iterator creation off the global torch RNG.
        loader = torch.utils.data.DataLoader(
            dataset, batch_sampler=sampler, generator=torch.Generator().manual_seed(2)
        )
        ckpt = Checkpointer(directory, {"model": model}, opt, sched, keep_last=2)
        state = ckpt.resume()
        while state.step < total:
            sampler.set_epoch(state.epoch, state.position)
            for xb, yb in loader:
                noise = random.gauss(0, 0.01) + float(np.random.normal(0, 0.01))
                loss = torch.nn.functional.mse_loss(model(xb + noise), yb)
                opt.zero_grad()
                loss.backward()
                opt.step()
                sched.step()
                state.advance()
                if state.step % every == 0:
                    ckpt.save(state)
                    if state.step == kill_at:
                        # SIGKILL: no cleanup handlers, no flush, like a preempted node.
                        os.kill(os.getpid(), signal.SIGKILL)
                if state.step == total:
                    break
            else:
                state.next_epoch()
        return {k: v.clone() for k, v in model.state_dict().items()}
    finally:
        torch.set_num_threads(threads)


def assert_bit_identical(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_resume_after_sigkill_is_bit_identical(tmp_path):
    reference = train(tmp_path / "uninterrupted", TOTAL_STEPS, every=1000)
    run = tmp_path / "killed"
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.run(
        [sys.executable, __file__, str(run), str(TOTAL_STEPS), "3", "12"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert [p.name for p in list_checkpoints(run)] == ["step-00000009", "step-00000012"]
    resumed = train(run, TOTAL_STEPS, every=3)  # resumes at step 12, mid-epoch 1
    assert_bit_identical(reference, resumed)


def test_resume_after_exception_is_bit_identical(tmp_path, monkeypatch):
    reference = train(tmp_path / "a", TOTAL_STEPS, every=1000)

    def die(pid, sig):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "kill", die)
    with pytest.raises(KeyboardInterrupt):
        train(tmp_path / "b", TOTAL_STEPS, every=4, kill_at=16)  # at an epoch boundary
    monkeypatch.undo()
    assert_bit_identical(reference, train(tmp_path / "b", TOTAL_STEPS, every=4))


def _module() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Linear(3, 2)


def test_crash_during_write_keeps_previous(tmp_path, monkeypatch):
    model = _module()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    save_checkpoint(tmp_path, 1, {"m": model}, opt, data_position={"epoch": 0, "position": 1})
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        model.weight.add_(1.0)

    real_save = torch.save

    def failing_save(obj, f, *args, **kwargs):
        if str(f).endswith("rng.pt"):
            raise OSError("disk full")
        real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(ckpt_mod.torch, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(tmp_path, 2, {"m": model}, opt)
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-00000001"]

    fresh = torch.nn.Linear(3, 2)
    ckpt = load_latest_checkpoint(tmp_path, {"m": fresh})
    assert ckpt is not None and ckpt.step == 1
    assert ckpt.data_position == {"epoch": 0, "position": 1}
    assert_bit_identical(before, fresh.state_dict())


def test_killed_write_leftover_is_invisible_and_cleaned(tmp_path):
    model = _module()
    save_checkpoint(tmp_path, 5, {"m": model})
    # What a SIGKILL during a save leaves: a temp dir, possibly with files but no rename.
    stale = tmp_path / ".tmp-step-00000006-abcd"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"partial")
    # And a step dir without state.json (e.g. copied by hand, interrupted).
    (tmp_path / "step-00000007").mkdir()
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-00000005"]
    assert load_latest_checkpoint(tmp_path, {"m": _module()}).step == 5
    save_checkpoint(tmp_path, 6, {"m": model})
    assert not stale.exists()


def test_keep_last_and_resave(tmp_path):
    model = _module()
    for step in range(1, 6):
        save_checkpoint(tmp_path, step, {"m": model}, keep_last=3, extra={"loss": step / 10})
    assert [p.name for p in list_checkpoints(tmp_path)] == [f"step-0000000{i}" for i in (3, 4, 5)]
    with torch.no_grad():
        model.weight.zero_()
    save_checkpoint(tmp_path, 5, {"m": model}, keep_last=3, extra={"loss": 0.0})
    ckpt = load_latest_checkpoint(tmp_path)
    assert ckpt.extra == {"loss": 0.0} and torch.equal(
        ckpt.model_state["m"]["weight"], model.weight
    )
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert load_latest_checkpoint(tmp_path / "nothing") is None


def test_checkpoints_and_cache_files_get_the_modes_of_new_ones(tmp_path):
    """A checkpoint folder (made by mkdtemp, 0700) and an atomically written file (mkstemp,
    0600) end with the modes a plain new folder / file gets under the umask."""
    from dcgen._files import atomic_write

    mask = os.umask(0o022)
    try:
        final = save_checkpoint(tmp_path, 1, {"m": _module()})
        atomic_write(tmp_path / "index.json", lambda tmp: Path(tmp).write_text("{}"), durable=True)
    finally:
        os.umask(mask)
    assert final.stat().st_mode & 0o777 == 0o755
    assert (tmp_path / "index.json").stat().st_mode & 0o777 == 0o644
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_a_folder_that_cannot_be_written_is_named_in_the_error(tmp_path, monkeypatch):
    # the error named the temporary file beside the target ("Permission denied:
    # '.out.png.1ex6i460.tmp'"), a name the user never gave
    import tempfile

    from dcgen._files import atomic_folder, atomic_write

    def denied(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        raise PermissionError(13, "Permission denied", str(tmp_path / ".out.png.x1y2.tmp"))

    monkeypatch.setattr(tempfile, "mkstemp", denied)
    monkeypatch.setattr(tempfile, "mkdtemp", denied)
    with pytest.raises(PermissionError, match=r"cannot write .*out\.png: Permission denied") as err:
        atomic_write(tmp_path / "out.png", lambda tmp: None)
    assert ".tmp" not in str(err.value) and err.value.errno == 13
    with pytest.raises(PermissionError, match=r"cannot write .*pipe: Permission denied"):
        atomic_folder(tmp_path / "pipe", lambda tmp: None)


def test_checkpoint_step_reads_the_folder_name(tmp_path):
    model = _module()
    for step in (9, 120):
        save_checkpoint(tmp_path, step, {"m": model}, keep_last=None)
    latest = ckpt_mod.latest_checkpoint(tmp_path)
    assert ckpt_mod.checkpoint_step(latest) == 120 == load_latest_checkpoint(tmp_path).step
    with pytest.raises(CheckpointError, match="step-NNNNNNNN"):
        ckpt_mod.checkpoint_step(tmp_path / "final")


def test_rng_round_trip():
    state = capture_rng_state()
    draws = (random.random(), np.random.rand(), np.random.randn(), torch.rand(3))
    restore_rng_state(state)
    again = (random.random(), np.random.rand(), np.random.randn(), torch.rand(3))
    assert draws[:3] == again[:3] and torch.equal(draws[3], again[3])


def test_model_state_forms_and_errors(tmp_path):
    tied = torch.nn.Module()
    tied.a = torch.nn.Linear(2, 2)
    tied.b = torch.nn.Linear(2, 2)
    tied.b.weight = tied.a.weight  # tied weights share storage
    save_checkpoint(tmp_path, 1, lambda: {"tied": tied.state_dict()}, rng_state=False)
    ckpt = load_latest_checkpoint(tmp_path)
    assert ckpt.rng_state is None and ckpt.optimizer_state is None
    assert torch.equal(ckpt.model_state["tied"]["b.weight"], tied.a.weight)

    with pytest.raises(CheckpointError, match=r"saved modules \['tied'\], given \['other'\]"):
        load_latest_checkpoint(tmp_path, {"other": torch.nn.Linear(2, 2)})
    with pytest.raises(TypeError, match="JSON"):
        save_checkpoint(tmp_path, 2, {"m": _module()}, extra={"t": torch.zeros(1)})
    with pytest.raises(CheckpointError, match="holds no optimizer state"):
        load_latest_checkpoint(tmp_path, optimizer=torch.optim.SGD(_module().parameters(), lr=1))

    weights = tmp_path / "step-00000001" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-4])
    with pytest.raises(CheckpointError, match=r"step-00000001/model\.safetensors"):
        load_latest_checkpoint(tmp_path)


if __name__ == "__main__":
    directory, total, every, kill_at = sys.argv[1:5]
    train(Path(directory), int(total), int(every), int(kill_at))


@pytest.mark.parametrize("rng_state", [False, None, {}])
def test_a_checkpoint_without_rng_state_loads(tmp_path, rng_state):
    # None / {} stored no rng.pt but marked has_rng, so loading failed on the missing file
    model = torch.nn.Linear(3, 2)
    path = save_checkpoint(tmp_path, 5, {"model": model}, rng_state=rng_state)
    loaded = ckpt_mod.load_checkpoint(path, {"model": torch.nn.Linear(3, 2)})
    assert loaded.step == 5 and loaded.rng_state is None


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda s: s.update(version=2), r"version 1 to 1, got 2 \(written by a newer dcgen\?\)"),
        (lambda s: s.update(version="1"), r"version 1 to 1, got '1'"),
        (lambda s: s.pop("has_optimizer"), r"expected keys \['has_optimizer'\] too"),
        (lambda s: s.pop("step"), r"expected keys \['step'\] too"),
    ],
    ids=["newer", "string", "no-has_optimizer", "no-step"],
)
def test_a_state_file_of_another_version_or_missing_keys_is_refused(tmp_path, edit, message):
    # A newer version loaded by this version's rules without a word; a missing key was a bare
    # KeyError naming no file.
    import json

    path = save_checkpoint(tmp_path, 1, {"m": torch.nn.Linear(3, 2)}, rng_state=False)
    state = json.loads((path / "state.json").read_text())
    edit(state)
    (path / "state.json").write_text(json.dumps(state))
    with pytest.raises(CheckpointError, match=message) as err:
        ckpt_mod.load_checkpoint(path, {"m": torch.nn.Linear(3, 2)})
    assert str(path / "state.json") in str(err.value)


def test_a_module_without_state_round_trips_strictly(tmp_path):
    # A parameterless module (an activation) saved no key, so a strict load of the same dict
    # failed: "saved modules ['m'], given ['act', 'm']".
    model = torch.nn.Linear(3, 2)
    path = save_checkpoint(tmp_path, 1, {"m": model, "act": torch.nn.ReLU()}, rng_state=False)
    fresh = torch.nn.Linear(3, 2)
    ckpt_mod.load_checkpoint(path, {"m": fresh, "act": torch.nn.ReLU()})
    assert torch.equal(fresh.weight, model.weight)
    with pytest.raises(CheckpointError, match="has no module 'other'"):
        ckpt_mod.load_checkpoint(path, {"m": fresh, "other": torch.nn.Linear(1, 1)}, strict=False)


def test_a_large_seed_draws_and_stays_distinct():
    from dcgen.train.loop import StepRandom

    big = 20240601120000  # a date as a seed overflowed torch's seed range once multiplied
    a = StepRandom(big, 3, 2, slice(0, 2), torch.device("cpu")).generator.initial_seed()
    b = StepRandom(big, 4, 2, slice(0, 2), torch.device("cpu")).generator.initial_seed()
    assert a != b


def test_atomic_folder_swaps_whole_folders_and_keeps_the_old_one_on_failure(tmp_path):
    from dcgen._files import atomic_folder

    target = tmp_path / "model"
    mask = os.umask(0o022)
    try:
        atomic_folder(target, lambda d: (d / "a.txt").write_text("one"))
    finally:
        os.umask(mask)
    assert (target / "a.txt").read_text() == "one" and target.stat().st_mode & 0o777 == 0o755

    def killed(d: Path) -> None:
        (d / "a.txt").write_text("half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_folder(target, killed)
    assert [p.name for p in target.iterdir()] == ["a.txt"] and (
        target / "a.txt"
    ).read_text() == "one"
    # a previous save is swapped whole; the user's own files beside one are kept
    atomic_folder(target, lambda d: [(d / n).write_text("two") for n in ("a.txt", "b.txt")])
    assert {p.name: p.read_text() for p in target.iterdir()} == {"a.txt": "two", "b.txt": "two"}
    (target / "notes.md").write_text("mine")
    atomic_folder(target, lambda d: (d / "a.txt").write_text("three"))
    got = {p.name: p.read_text() for p in target.iterdir()}
    assert got == {"a.txt": "three", "b.txt": "two", "notes.md": "mine"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no temp or old folder left
    # a symlink is followed (the link stays a link); a file is not replaced by a folder
    (tmp_path / "link").symlink_to(target)
    atomic_folder(tmp_path / "link", lambda d: (d / "a.txt").write_text("four"))
    assert (tmp_path / "link").is_symlink() and (target / "a.txt").read_text() == "four"
    (tmp_path / "file").write_text("mine")
    with pytest.raises(NotADirectoryError, match="it is a file"):
        atomic_folder(tmp_path / "file", lambda d: (d / "a.txt").write_text("x"))
    assert (tmp_path / "file").read_text() == "mine"
