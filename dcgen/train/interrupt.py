"""Stopping a training run cleanly on Ctrl-C or a scheduler's SIGTERM.

A cluster that preempts a job (SLURM, Kubernetes) sends SIGTERM and waits a grace period; a user
presses Ctrl-C. Either used to kill the run mid-step, losing every step since the last
scheduled checkpoint (100 by default). :class:`StopRequest` turns the first such signal into a
request: the loop finishes the step it is in, writes a checkpoint at it and raises
:class:`TrainingInterrupted`; running the same command again resumes there exactly. A second
signal is not caught: it acts as it would without dcgen (KeyboardInterrupt, or the default
SIGTERM exit), for a user who does not want to wait for the step.

Handlers can only be installed from the main thread; elsewhere (a run started from a worker
thread) the signals keep their handlers and a run stops as it did before.
"""

from __future__ import annotations

import logging
import signal
import threading
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any

logger = logging.getLogger(__name__)

__all__ = ["STOP_SIGNALS", "StopRequest", "TrainingInterrupted"]

#: the signals a run turns into a clean stop (SIGTERM is what schedulers send before a kill)
STOP_SIGNALS: tuple[signal.Signals, ...] = (signal.SIGINT, signal.SIGTERM)


class TrainingInterrupted(KeyboardInterrupt):
    """A run stopped at a signal's request after writing a checkpoint at ``step``.

    A KeyboardInterrupt, so ``except Exception`` in a caller does not swallow it and a
    notebook shows it as an interrupt. ``exit_status`` is the shell's convention for the
    signal (128 + its number: 130 for SIGINT, 143 for SIGTERM)."""

    def __init__(self, tag: str, step: int, steps: int, checkpoint_dir: Path, signum: int) -> None:
        self.tag = tag
        self.step = step
        self.steps = steps
        self.checkpoint_dir = Path(checkpoint_dir)
        self.signum = signum
        name = signal.Signals(signum).name
        super().__init__(
            f"{tag}: stopped by {name} after step {step} of {steps}; its checkpoint is in "
            f"{self.checkpoint_dir} and a resumed run continues from it"
        )

    @property
    def exit_status(self) -> int:
        return 128 + self.signum


class StopRequest:
    """Context manager: while active, the first SIGINT / SIGTERM sets :attr:`signum` (the loop
    polls it between steps) instead of interrupting; the previous handlers come back on exit,
    or at once after that first signal (so a second one acts as usual)."""

    def __init__(self, tag: str = "train", signals: tuple[int, ...] = STOP_SIGNALS) -> None:
        self.tag = tag
        self.signals = signals
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is not threading.main_thread():
            return self
        for sig in self.signals:
            previous = signal.getsignal(sig)
            if previous is signal.SIG_IGN:
                continue  # e.g. SIGINT under nohup: the user asked for it to be ignored
            self._previous[sig] = previous
            signal.signal(sig, self._handle)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._restore()

    def _restore(self) -> None:
        for sig, previous in self._previous.items():
            # None: installed from C (not by Python); the default is the nearest we can give back
            signal.signal(sig, signal.SIG_DFL if previous is None else previous)
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.signum = signum
        self._restore()
        logger.warning(
            "%s: %s received: stopping after the current step and writing a checkpoint "
            "(send it again to stop at once; the steps since the last checkpoint are then lost)",
            self.tag, signal.Signals(signum).name,
        )  # fmt: skip
