"""A stage-3 run SIGKILLed right after a checkpoint (no Python clean-up at all: no finally, no
atexit, no flush) resumes in a fresh process to the same final weights, bit for bit, as an
uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import torch

from tests.train.stage_utils import config, make_cache, save_adapted, trainable_weights

REPO = Path(__file__).resolve().parents[2]

# argv: config JSON, step to die at (0: never). The kill happens in on_step, which runs after
# the checkpoint of that step is on disk.
_SCRIPT = """
import json, os, signal, sys
import torch
torch.set_num_threads(1)
from dcgen.train.config import TrainConfig
from dcgen.train.stages import run
cfg = TrainConfig.from_dict(json.loads(sys.argv[1]))
kill_at = int(sys.argv[2])
def on_step(step, loss):
    if step == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)
run(cfg, progress=False, on_step=on_step)
"""


def _start(cfg_dict: dict, kill_at: int) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.Popen(
        [sys.executable, "-c", _SCRIPT, json.dumps(cfg_dict), str(kill_at)],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip


def _wait(proc: subprocess.Popen) -> tuple[int, str]:
    out, _ = proc.communicate(timeout=120)
    return proc.returncode, out


def test_sigkill_after_checkpoint_then_resume_matches_straight_run(tmp_path: Path) -> None:
    cache = make_cache(tmp_path)
    adapted = save_adapted(tmp_path)
    kw = dict(steps=4, checkpoint_every=2, warmup_steps=1, keep_checkpoints=2)
    straight = config(tmp_path, "finetune", adapted, cache, out_dir=str(tmp_path / "a"), **kw)
    broken = config(tmp_path, "finetune", adapted, cache, out_dir=str(tmp_path / "b"), **kw)

    # The uninterrupted run and the one that dies run side by side.
    procs = [_start(straight.to_dict(), 0), _start(broken.to_dict(), 2)]
    (rc_a, out_a), (rc_b, out_b) = (_wait(p) for p in procs)
    assert rc_a == 0, out_a
    assert rc_b == -signal.SIGKILL, out_b  # really killed, not a clean exit
    ckpts = sorted(p.name for p in (tmp_path / "b" / "checkpoints").iterdir())
    assert ckpts[-1] == "step-00000002", ckpts
    assert not (tmp_path / "b" / "pytorch_lora_weights.safetensors").exists()

    rc, out = _wait(_start(broken.to_dict(), 0))  # resumes from step-00000002
    assert rc == 0, out

    a, b = trainable_weights(tmp_path / "a"), trainable_weights(tmp_path / "b")
    assert a.keys() == b.keys() and any("lora" in k for k in a)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    steps = [json.loads(x)["step"] for x in (tmp_path / "b" / "log.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 5))
