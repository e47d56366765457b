"""The asset-training recipe runs (two steps per part) and writes loadable folders."""

from __future__ import annotations

import json

import pytest
import torch

from dcgen.toy import assets as A
from dcgen.toy import train_assets as T


def test_every_training_part_runs_and_saves(tmp_path):
    torch.manual_seed(0)
    T.train(
        tmp_path, ("vae", "evaluator", "dcae", "flux"), scale=0.0005, progress=False,
        low_res_every=3,
    )  # fmt: skip
    for folder in A.FOLDERS.values():
        assert (tmp_path / folder).is_dir(), folder
    log = json.loads((tmp_path / "training.json").read_text())
    assert set(log) == {"vae", "evaluator", "dcae", "flux"}
    # The base model also trained on half-size images (3 steps: the third is low-res).
    assert log["flux"]["low_res_every"] == 3
    assert log["flux"]["low_res_shift"] < log["flux"]["shift"]  # fewer tokens, smaller shift
    vae = T._load_part(tmp_path, "vae")
    # The latent statistics were written into the config (FLUX's shift/scale convention).
    assert vae.config.scaling_factor != 1.0
    transformer, text = T._load_part(tmp_path, "flux")
    assert transformer.config["_dcgen_latent_patch_size"] == 2
    assert text.config.max_length == 16


def test_training_set_pairs_full_and_half_size_latents():
    vae = A.build_vae().eval()
    full, half, captions = T.encode_training_set(vae, 3, progress=False, low_res=True)
    assert full.shape == (3, 4, A.IMAGE_SIZE // 8, A.IMAGE_SIZE // 8)
    assert half.shape == (3, 4, A.IMAGE_SIZE // 16, A.IMAGE_SIZE // 16)
    assert len(captions) == 3
    assert T.encode_training_set(vae, 2, progress=False)[1] is None  # single resolution


def test_unknown_part_is_named(tmp_path):
    with pytest.raises(ValueError, match="unknown part"):
        T.train(tmp_path, parts=("vae", "gan"))


def test_vae_recipe_is_deterministic_at_a_fixed_thread_count():
    # The shipped files are reproduced by rerunning the recipe at the same thread count, which
    # needs every random draw to come from the recipe's own seeds (not from the caller's state).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(123)
        first, _ = T.train_vae(3, progress=False)
        torch.manual_seed(456)
        second, _ = T.train_vae(3, progress=False)
    finally:
        torch.set_num_threads(threads)
    for (name, a), (_, b) in zip(first.state_dict().items(), second.state_dict().items()):
        assert torch.equal(a, b), name
    assert first.config.scaling_factor == second.config.scaling_factor


def test_threads_must_be_positive(tmp_path, capsys):
    with pytest.raises(SystemExit):
        T.main(["--out", str(tmp_path), "--parts", "manifest", "--threads", "0"])
    assert "--threads" in capsys.readouterr().err


def test_device_must_be_cpu_or_cuda(tmp_path, capsys):
    with pytest.raises(SystemExit):
        T.main(["--out", str(tmp_path), "--parts", "vae", "--device", "tpu"])
    assert "--device: expected cpu or cuda[:N], got 'tpu'" in capsys.readouterr().err
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit):
            T.main(["--out", str(tmp_path), "--parts", "vae", "--device", "cuda"])
        assert "sees no CUDA GPU" in capsys.readouterr().err


@pytest.mark.cuda
def test_the_recipe_trains_on_a_gpu_and_saves_cpu_loadable_parts(tmp_path):
    """Every part, the manifest included, on CUDA: the minutes-not-hours path. The saved
    folders load on the CPU and the manifest measured every model."""
    manifest = T.train(tmp_path, T.PARTS, scale=0.0005, progress=False, device="cuda")
    log = json.loads((tmp_path / "training.json").read_text())
    assert {entry["device"] for entry in log.values()} == {"cuda"}
    assets = A.load_toy_assets(tmp_path, torch.device("cpu"))
    assert next(assets.transformer.parameters()).device.type == "cpu"
    for key in ("vae_psnr_db", "dcae_psnr_db", "base_prompt_accuracy"):
        value = manifest["metrics"][key]
        assert isinstance(value, float) and value == value, key  # measured, not NaN
    assert manifest["command"].endswith("--device cuda")


def test_resume_keeps_the_finished_parts(tmp_path, monkeypatch):
    T.train(tmp_path, ("vae",), scale=0.0005, progress=False)
    first = json.loads((tmp_path / "training.json").read_text())["vae"]

    def no_retraining(*args, **kwargs):
        raise AssertionError("the finished VAE was trained again")

    monkeypatch.setattr(T, "train_vae", no_retraining)
    T.train(tmp_path, ("vae", "evaluator"), scale=0.0005, progress=False, resume=True)
    log = json.loads((tmp_path / "training.json").read_text())
    assert log["vae"] == first and "evaluator" in log
    # Another step count is another recipe: the part is trained again, not kept.
    with pytest.raises(AssertionError, match="trained again"):
        T.train(tmp_path, ("vae",), scale=0.001, progress=False, resume=True)


def _kill_after(monkeypatch, step: int) -> None:
    """The next training part raises KeyboardInterrupt right after its checkpoint of ``step``."""
    from dcgen.toy.part_checkpoint import PartCheckpoint

    real = PartCheckpoint.step_done

    def step_done(self, n, steps, losses):
        real(self, n, steps, losses)
        if n == step:
            raise KeyboardInterrupt

    monkeypatch.setattr(PartCheckpoint, "step_done", step_done)


@pytest.mark.parametrize("part", ["vae", "flux"])
def test_a_killed_part_resumes_exactly(tmp_path, monkeypatch, part):
    # The VAE draws from the global RNG and its own generator; the base model has EMA copies
    # and low-resolution steps: all of it must come back for the resumed run to match.
    monkeypatch.setattr(T, "CHECKPOINT_EVERY", 1)
    parts = ("vae", "flux") if part == "flux" else ("vae",)
    kwargs = dict(scale=0.001, progress=False, low_res_every=2)
    T.train(tmp_path / "whole", parts, **kwargs)

    out = tmp_path / "killed"
    if part == "flux":
        T.train(out, ("vae",), **kwargs)
    with monkeypatch.context() as m:
        _kill_after(m, 2)
        with pytest.raises(KeyboardInterrupt):
            T.train(out, (part,), **kwargs)
    assert (out / ".partial" / f"{part}.pt").is_file()
    T.train(out, parts, resume=True, **kwargs)
    assert not (out / ".partial" / f"{part}.pt").exists()  # removed once the part is saved

    whole = json.loads((tmp_path / "whole" / "training.json").read_text())
    resumed = json.loads((out / "training.json").read_text())
    assert resumed[part]["final_loss"] == whole[part]["final_loss"]
    a, b = T._load_part(tmp_path / "whole", part), T._load_part(out, part)
    pairs = zip(a, b) if part == "flux" else [(a, b)]
    for x, y in pairs:
        for (name, u), (_, v) in zip(x.state_dict().items(), y.state_dict().items()):
            assert torch.equal(u, v), (part, name)


def test_a_stale_part_checkpoint_is_not_resumed_by_another_recipe(tmp_path, monkeypatch):
    monkeypatch.setattr(T, "CHECKPOINT_EVERY", 1)
    with monkeypatch.context() as m:
        _kill_after(m, 2)
        with pytest.raises(KeyboardInterrupt):
            T.train(tmp_path, ("dcae",), scale=0.001, progress=False)
    calls = []
    from dcgen.toy.part_checkpoint import PartCheckpoint

    real = PartCheckpoint.restore

    def restore(self, steps):
        first, losses = real(self, steps)
        calls.append((first, list(losses)))  # a copy: training appends to the list
        return first, losses

    monkeypatch.setattr(PartCheckpoint, "restore", restore)
    # Another --scale is another step count: the saved state is not continued.
    T.train(tmp_path, ("dcae",), scale=0.002, progress=False, resume=True)
    assert calls == [(0, [])]


def test_ctrl_c_checkpoints_the_part_at_its_step_and_resume_is_exact(tmp_path, monkeypatch):
    """Ctrl-C used to lose every step since the part's last checkpoint (250 steps apart): now
    the part checkpoints at the step it was in and stops; --resume continues to the same VAE."""
    import os
    import signal

    from dcgen.toy.part_checkpoint import PartCheckpoint
    from dcgen.train.interrupt import TrainingInterrupted

    kwargs = dict(scale=0.001, progress=False)  # 3 steps, no checkpoint before the end
    T.train(tmp_path / "whole", ("vae",), **kwargs)
    real = PartCheckpoint.step_done

    def step_done(self, n, steps, losses):
        real(self, n, steps, losses)
        if n == 1:
            os.kill(os.getpid(), signal.SIGINT)  # during step 1's bookkeeping: step 2 is next

    out = tmp_path / "stopped"
    with monkeypatch.context() as m:
        m.setattr(PartCheckpoint, "step_done", step_done)
        with pytest.raises(TrainingInterrupted) as info:
            T.train(out, ("vae",), **kwargs)
    assert info.value.tag == "vae"
    assert (info.value.step, info.value.steps) == (2, 3)
    state = torch.load(out / ".partial" / "vae.pt", weights_only=False)
    assert state["step"] == 2
    T.train(out, ("vae",), resume=True, **kwargs)
    whole = json.loads((tmp_path / "whole" / "training.json").read_text())["vae"]
    assert (
        json.loads((out / "training.json").read_text())["vae"]["final_loss"] == whole["final_loss"]
    )
    a, b = T._load_part(tmp_path / "whole", "vae"), T._load_part(out, "vae")
    for (name, u), (_, v) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(u, v), name


def test_the_recipe_command_exits_with_the_signal_status_and_a_resume_hint(
    tmp_path, monkeypatch, capsys
):
    import signal

    from dcgen.train.interrupt import TrainingInterrupted

    def stopped(out, *args, **kwargs):
        raise TrainingInterrupted("vae", 3, 6, tmp_path / ".partial", signal.SIGTERM)

    monkeypatch.setattr(T, "train", stopped)
    assert T.main(["--out", str(tmp_path)]) == 128 + signal.SIGTERM
    err = capsys.readouterr().err
    assert "vae: stopped by SIGTERM after step 3 of 6" in err and "--resume" in err
