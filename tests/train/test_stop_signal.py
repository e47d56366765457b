"""Ctrl-C or a scheduler's SIGTERM stops a training run after the step it is in, with a
checkpoint at that step (it used to kill the run mid-step and lose every step since the last
scheduled checkpoint); running it again continues to the same weights, bit for bit. A second
signal acts at once. Every rank of a multi-process run stops at the same step."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from dcgen.train import loop
from dcgen.train.checkpoint import latest_checkpoint, list_checkpoints
from dcgen.train.config import TrainConfig
from dcgen.train.distributed import DistContext
from dcgen.train.interrupt import StopRequest, TrainingInterrupted
from dcgen.train.stages import run
from tests.train.loop_utils import Pairs, Regression, loop_config
from tests.train.stage_utils import config, make_cache, save_adapted, trainable_weights

REPO = Path(__file__).resolve().parents[2]


def _train(root: Path, on_step=None, steps: int = 9, ctx: DistContext | None = None) -> nn.Module:
    # checkpoint_every is longer than the run: any checkpoint before the end is the stop's
    cfg = loop_config(root, steps, checkpoint_every=100, keep_checkpoints=3, warmup_steps=2)
    torch.manual_seed(0)
    model = Regression()
    loop.train_loop(model, lambda b, r: {"x": b["x"], "y": b["y"]}, Pairs(), cfg,
                    ctx or DistContext(), root, steps=steps, bucket_key="x", progress=False,
                    on_step=on_step)  # fmt: skip
    return model


def _send_at(step_to_signal: int, *signums: int):
    def on_step(step: int, loss: float) -> None:
        if step == step_to_signal:
            for signum in signums:
                os.kill(os.getpid(), signum)

    return on_step


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_stops_after_the_step_with_a_checkpoint_and_resume_is_exact(
    tmp_path: Path, signum: int
) -> None:
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    straight = _train(tmp_path / "a")

    # Sent during step 3's hook: step 3 is done, so the step in progress when it is seen is 4.
    with pytest.raises(TrainingInterrupted) as info:
        _train(tmp_path / "b", on_step=_send_at(3, signum))
    stop = info.value
    assert (stop.step, stop.steps, stop.signum) == (4, 9, signum)
    assert stop.exit_status == 128 + signum
    assert signal.Signals(signum).name in str(stop) and "after step 4 of 9" in str(stop)
    assert [p.name for p in list_checkpoints(tmp_path / "b" / "checkpoints")] == ["step-00000004"]
    # the process's own handlers are back (a signal after the run acts as before it)
    assert {s: signal.getsignal(s) for s in handlers} == handlers

    resumed = _train(tmp_path / "b")
    for name, p in straight.named_parameters():
        assert torch.equal(p, dict(resumed.named_parameters())[name]), name
    log = loop.read_log(tmp_path / "b" / loop.LOG_NAME)
    assert [e["step"] for e in log] == list(range(1, 10))


def test_a_second_signal_acts_at_once(tmp_path: Path) -> None:
    # The first SIGINT is a stop request; the second finds the usual handler again and raises
    # a plain KeyboardInterrupt from where the program is (no wait for the step, no checkpoint)
    with pytest.raises(KeyboardInterrupt) as info:
        _train(tmp_path, on_step=_send_at(2, signal.SIGINT, signal.SIGINT))
    assert type(info.value) is KeyboardInterrupt
    assert list_checkpoints(tmp_path / "checkpoints") == []


def test_a_signal_at_the_last_step_still_stops_the_caller(tmp_path: Path) -> None:
    # a stage runner must not start its next stage after the user asked to stop
    with pytest.raises(TrainingInterrupted) as info:
        _train(tmp_path, on_step=_send_at(8, signal.SIGTERM))
    assert info.value.step == 9
    assert latest_checkpoint(tmp_path / "checkpoints").name == "step-00000009"


def test_a_signal_after_the_last_steps_poll_still_stops_the_caller(tmp_path: Path) -> None:
    # sent from the last step's on_step, after the loop had looked for a request: the run
    # used to return normally and a stage runner went on to its next phase
    with pytest.raises(TrainingInterrupted) as info:
        _train(tmp_path, on_step=_send_at(9, signal.SIGTERM))
    assert (info.value.step, info.value.steps) == (9, 9)
    assert latest_checkpoint(tmp_path / "checkpoints").name == "step-00000009"


def test_without_stop_on_signal_the_handlers_are_left_alone(tmp_path: Path) -> None:
    seen: list[object] = []

    def on_step(step: int, loss: float) -> None:
        seen.append(signal.getsignal(signal.SIGTERM))

    before = signal.getsignal(signal.SIGTERM)
    cfg = TrainConfig.from_dict(dict(
        stage="finetune", transformer="t", cache_dir="c", out_dir=str(tmp_path), steps=2,
        batch_size=2, mixed_precision="no", device="cpu",
    ))  # fmt: skip
    loop.train_loop(Regression(), lambda b, r: {"x": b["x"], "y": b["y"]}, Pairs(), cfg,
                    DistContext(), tmp_path, steps=2, bucket_key="x", progress=False,
                    on_step=on_step, stop_on_signal=False)  # fmt: skip
    assert seen == [before, before]


def test_an_ignored_signal_stays_ignored(tmp_path: Path) -> None:
    # e.g. SIGINT under nohup: the user asked for it to be ignored, a run does not take it over
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with StopRequest() as stop:
            assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
            os.kill(os.getpid(), signal.SIGINT)
        assert not stop.requested
    finally:
        signal.signal(signal.SIGINT, previous)


# -- the command line: SIGTERM from outside, a one-line message, status 143, resume ------------

_CLI = """
import os, signal, sys
import dcgen.train.stages as stages
from dcgen.cli import main
real_run = stages.run
def on_step(step, loss):
    if step == int(sys.argv[2]):
        os.kill(os.getpid(), signal.SIGTERM)  # as a scheduler would, from outside the loop
def run(config, progress=True, **kw):
    return real_run(config, progress=progress, on_step=on_step, **kw)
stages.run = run
sys.exit(main(["finetune", "--config", sys.argv[1], "--no-progress"]))
"""


def _cli(config_path: Path, signal_at: int) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run(
        [sys.executable, "-c", _CLI, str(config_path), str(signal_at)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip


def test_the_command_line_stops_on_sigterm_with_a_checkpoint_and_continues(
    tmp_path: Path,
) -> None:
    cache, adapted = make_cache(tmp_path), save_adapted(tmp_path)
    kw = dict(steps=5, checkpoint_every=100, warmup_steps=1)
    files = {}
    for name in ("a", "b"):
        cfg = config(tmp_path, "finetune", adapted, cache, out_dir=str(tmp_path / name), **kw)
        files[name] = tmp_path / f"{name}.json"
        files[name].write_text(json.dumps(cfg.to_dict()))

    run(TrainConfig.from_dict(json.loads(files["a"].read_text())), progress=False)  # in-process
    stopped = _cli(files["b"], 2)
    assert stopped.returncode == 128 + signal.SIGTERM, stopped.stderr
    assert "Traceback" not in stopped.stderr
    last = stopped.stderr.strip().splitlines()[-1]
    assert last.startswith("dcgen finetune: finetune: stopped by SIGTERM after step 3 of 5"), last
    assert "run the same command again" in last
    assert latest_checkpoint(tmp_path / "b" / "checkpoints").name == "step-00000003"
    assert not (tmp_path / "b" / "pytorch_lora_weights.safetensors").exists()

    resumed = _cli(files["b"], 0)
    assert resumed.returncode == 0, resumed.stderr
    # the resume is said, and without a bar (--no-progress) the loop's lines report progress
    assert f"dcgen finetune: resuming {tmp_path / 'b'} from its checkpoint at step 3" in (
        resumed.stderr
    )
    assert "finetune step 5/5: loss" in resumed.stderr, resumed.stderr
    a, b = trainable_weights(tmp_path / "a"), trainable_weights(tmp_path / "b")
    assert a.keys() == b.keys() and a
    for k in a:
        assert torch.equal(a[k], b[k]), k


# -- two processes: a signal that reaches one rank stops both at the same step ---------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank(rank: int, world: int, port: int, root: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      LOCAL_RANK=str(rank), WORLD_SIZE=str(world))  # fmt: skip
    torch.set_num_threads(1)
    import torch.distributed as dist

    # a short timeout: a rank left waiting fails the test instead of hanging it
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=60))
    try:
        # only rank 1 is signalled, during its step 2: without the agreement, rank 0 would go on
        # into step 3's all-reduce while rank 1 checkpointed, and both would hang
        _train(Path(root), on_step=_send_at(2, signal.SIGTERM) if rank == 1 else None,
               ctx=DistContext(rank=rank, world_size=world, device=torch.device("cpu")))  # fmt: skip
        outcome = "finished"
    except TrainingInterrupted as stop:
        outcome = f"stopped at {stop.step}"
    finally:
        dist.destroy_process_group()
    Path(root, f"rank{rank}.txt").write_text(outcome)


def test_every_rank_stops_at_the_same_step(tmp_path: Path) -> None:
    ctx, port = mp.get_context("spawn"), _free_port()
    procs = [ctx.Process(target=_rank, args=(r, 2, port, str(tmp_path))) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=180)
    hung = [p.pid for p in procs if p.is_alive()]
    for p in procs:
        if p.is_alive():
            p.kill()
    assert not hung, "a rank hung: the ranks did not agree on the step to stop at"
    assert [p.exitcode for p in procs] == [0, 0]
    outcomes = [(tmp_path / f"rank{r}.txt").read_text() for r in range(2)]
    assert outcomes == ["stopped at 3", "stopped at 3"]
    assert latest_checkpoint(tmp_path / "checkpoints").name == "step-00000003"
