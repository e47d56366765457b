"""A killed `dcgen demo` resumes from its checkpoints to the report of an uninterrupted run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import dcgen.toy.demo as demo
from dcgen.toy.demo import DemoSettings, run_demo

# The report's numbers that training decides (timings differ between any two runs).
QUALITY = ("prompt_accuracy", "frechet_distance", "feature_distance", "shape_accuracy")


def _settings(**overrides) -> DemoSettings:
    """`dcgen demo --fast`'s settings, with a checkpoint after every step."""
    return DemoSettings.fast(**{"checkpoint_every": 1, **overrides})


def _kill_phase_after(monkeypatch, folder: str, step: int) -> None:
    """The LoRA phase trained in ``folder`` raises KeyboardInterrupt (a Ctrl-C) after ``step``
    (after that step's checkpoint and snapshot, as a real kill between steps)."""
    real = demo.finetune_lora

    def finetune(model, data, cfg, *, run_dir, progress, on_step):
        def step_done(n: int, loss: float) -> None:
            on_step(n, loss)
            if Path(run_dir).name == folder and n == step:
                raise KeyboardInterrupt

        return real(model, data, cfg, run_dir=run_dir, progress=progress, on_step=step_done)

    monkeypatch.setattr(demo, "finetune_lora", finetune)


def test_a_killed_demo_resumes_to_the_uninterrupted_report(fast_run, tmp_path, monkeypatch):
    _, reference = fast_run  # `dcgen demo --fast`: one checkpoint per phase, at its end
    assert reference["resumed_from_step"] == {}

    out = tmp_path / "killed"
    _kill_phase_after(monkeypatch, "naive", 1)
    # No latency sweep: timings are not compared, and it would only add time.
    with pytest.raises(KeyboardInterrupt):
        run_demo(out, _settings(latency_sizes=()), progress=False)
    assert not (out / "report.json").exists()
    monkeypatch.undo()

    resumed = run_demo(out, _settings(latency_sizes=()), progress=False, resume=True)
    # Stages 1-3 had finished (their last checkpoint reloads them), the naive run stopped at
    # step 1 of 2.
    fast = _settings()
    assert resumed["resumed_from_step"] == {
        "stage1": fast.align_sgd_steps,
        "stage2": fast.output_steps,
        "stage3": fast.lora_steps,
        "naive": 1,
    }
    for name, row in reference["rows"].items():
        for key in QUALITY:
            assert resumed["rows"][name][key] == row[key], (name, key)
    for name, summary in reference["stages"].items():
        assert resumed["stages"][name]["final_loss"] == summary["final_loss"], name
    assert resumed["lora_curve"] == reference["lora_curve"]
    assert resumed["alignment"] == reference["alignment"]
    # The resumed phase's log holds every step once: the killed run's entry and the rest.
    steps = [json.loads(line)["step"] for line in (out / "naive" / "log.jsonl").open()]
    assert steps == list(range(1, fast.lora_steps + 1))


def test_resuming_with_other_settings_is_refused(tmp_path):
    demo._start_run_folder(tmp_path, _settings(), resume=False)
    with pytest.raises(ValueError, match=r"other settings \(lora_steps: 2 then, 5 now\)"):
        demo._start_run_folder(tmp_path, _settings(lora_steps=5), resume=True)
    # The checkpoint interval changes no number of the report: resuming with another is fine.
    assert demo._start_run_folder(tmp_path, _settings(checkpoint_every=7), resume=True)


def test_resume_without_a_run_starts_over(tmp_path):
    assert not demo._start_run_folder(tmp_path, _settings(), resume=True)
    assert (tmp_path / demo.SETTINGS_NAME).is_file()


def _fake_checkpoint(folder: Path, step: int) -> None:
    ckpt = folder / "checkpoints" / f"step-{step:08d}"
    ckpt.mkdir(parents=True)
    (ckpt / "state.json").write_text("{}")


def test_a_phase_resumes_from_its_checkpoint_only_with_the_snapshots_before_it(tmp_path):
    from dcgen.toy.demo_analysis import snapshot_path

    phase = tmp_path / "stage3"
    _fake_checkpoint(phase, 4)
    (phase / "log.jsonl").write_text("{}\n")
    snapshot_path(phase / demo.SNAPSHOT_DIR, 2).parent.mkdir(parents=True)
    snapshot_path(phase / demo.SNAPSHOT_DIR, 2).write_bytes(b"")
    assert demo._phase_dir(phase, resume=True, snapshot_steps=[2, 6]) == 4
    assert (phase / "log.jsonl").is_file()
    # Killed after the step-4 checkpoint but before the step-4 snapshot: the curve would miss
    # a point, so the phase starts over, clean.
    assert demo._phase_dir(phase, resume=True, snapshot_steps=[2, 4]) == 0
    assert not (phase / "checkpoints").exists()
    assert not (phase / demo.SNAPSHOT_DIR).exists()
    assert not (phase / "log.jsonl").exists()


def test_starting_over_clears_every_phase(tmp_path):
    for folder in demo.PHASES:
        _fake_checkpoint(tmp_path / folder, 3)
    demo._start_run_folder(tmp_path, _settings(), resume=False)
    for folder in demo.PHASES:
        assert demo._phase_dir(tmp_path / folder, resume=True) == 0, folder


def test_cli_resume_with_other_settings_is_a_clear_error(tmp_path, capsys):
    from dcgen.cli import main

    demo._start_run_folder(tmp_path, DemoSettings.fast(), resume=False)
    args = ["demo", "--fast", "--out", str(tmp_path), "--device", "cpu", "--no-progress"]
    assert main([*args, "--resume", "--lora-steps", "5"]) == 2
    err = capsys.readouterr().err
    assert "dcgen demo: error: cannot resume the demo" in err and "lora_steps: 2 then, 5 now" in err
