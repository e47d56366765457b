"""Exact resume inside one part of the toy world's asset recipe (``train_assets``).

A part trains for 8-30 minutes at one thread; a kill used to lose all of it. Every ``every``
steps this saves what the next step depends on, to ``<out>/.partial/<part>.pt`` (atomically):
the modules (EMA copies included), optimizer, LR schedule, the part's own random generator, the
global RNGs (the VAE samples its posterior from torch's; dcgen.train.checkpoint's
capture_rng_state, as the training loop's checkpoints keep them) and the losses so far. The data needs no
state: the recipe's batches are a pure function of the step. A resumed part therefore continues
with exactly the numbers the uninterrupted run would have used, and the file is removed once
the part is saved.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from dcgen._files import atomic_write
from dcgen.train.checkpoint import capture_rng_state, restore_rng_state
from dcgen.train.interrupt import StopRequest, TrainingInterrupted

PARTIAL_DIR = ".partial"
FORMAT = "dcgen.toy_part_checkpoint/1"


def partial_state_path(folder: str | Path, part: str) -> Path:
    """Where :class:`PartCheckpoint` keeps ``part``'s state under the recipe's ``folder``."""
    return Path(folder) / PARTIAL_DIR / f"{part}.pt"


class PartCheckpoint:
    """Save / restore one part's training state. ``folder=None`` turns it off (tests, callers
    that do not want files). With ``stop``, a requested stop (Ctrl-C, SIGTERM) saves at the
    step just done and raises :class:`~dcgen.train.interrupt.TrainingInterrupted`."""

    def __init__(
        self,
        folder: str | Path | None,
        part: str,
        every: int,
        modules: dict[str, nn.Module],
        optimizer: torch.optim.Optimizer,
        scheduler: Any,
        generator: torch.Generator | None = None,
        stop: StopRequest | None = None,
    ) -> None:
        if every < 1:
            raise ValueError(f"checkpoint every: expected a positive step count, got {every}")
        self.path = partial_state_path(folder, part) if folder is not None else None
        self.part, self.every = part, every
        self.modules, self.optimizer, self.scheduler = modules, optimizer, scheduler
        self.generator = generator
        self.stop = stop

    def start(self, steps: int, resume: bool) -> tuple[int, list[float]]:
        """(first step to run, losses so far): :meth:`restore` when resuming; else the part
        starts over and a previous run's state is removed."""
        if not resume:
            self.clear()
            return 0, []
        return self.restore(steps)

    def restore(self, steps: int) -> tuple[int, list[float]]:
        """(first step to run, losses so far): from the saved state when there is one for a run
        of ``steps`` steps, else (0, [])."""
        if self.path is None or not self.path.is_file():
            return 0, []
        state = torch.load(self.path, map_location="cpu", weights_only=False)
        if state.get("format") != FORMAT or state.get("total_steps") != steps:
            # Another recipe's (or another --scale's) state: not this run's to continue.
            return 0, []
        for name, module in self.modules.items():
            module.load_state_dict(state["modules"][name])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.generator is not None:
            self.generator.set_state(state["generator"])
        restore_rng_state(state["rng"])
        return int(state["step"]), list(state["losses"])

    def step_done(self, step: int, steps: int, losses: list[float]) -> None:
        """After optimizer step ``step`` (1-based) of ``steps``: save every ``every`` steps
        (not after the last: the finished part is saved by the recipe itself), and at once
        when a stop was requested."""
        signum = self.stop.signum if self.stop is not None else None
        if self.path is None or (step % self.every and signum is None) or step >= steps:
            return
        state = {
            "format": FORMAT,
            "part": self.part,
            "step": step,
            "total_steps": steps,
            "losses": list(losses),
            "modules": {n: m.state_dict() for n, m in self.modules.items()},
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "generator": self.generator.get_state() if self.generator is not None else None,
            "rng": capture_rng_state(),
        }
        path = self.path
        atomic_write(path, lambda tmp: torch.save(state, tmp))
        if signum is not None:
            raise TrainingInterrupted(self.part, step, steps, path.parent, signum)

    def clear(self) -> None:
        """Remove the saved state (the part is finished and saved, or starts over)."""
        if self.path is not None:
            self.path.unlink(missing_ok=True)
