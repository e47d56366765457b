"""Timing for ``dcgen bench``: quick mode's extrapolation from a truncated model, the split of a
pipeline call into per-step and fixed time, and the two clocks (host wall time, CUDA events)."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import torch

# -- the pure arithmetic of quick mode ------------------------------------------------------------


def extrapolate_denoise(
    step_ms: float,
    block_ms: Sequence[float],
    measured_blocks: Sequence[int],
    full_blocks: Sequence[int],
    steps: int,
    fixed_ms: float = 0.0,
    calls_per_step: int = 1,
) -> float:
    """Full-depth denoise time for ``steps`` steps from a truncated model's step time and its
    per-block times (the mean over block calls), one entry per block list (FLUX: double,
    single; SANA: one list), plus the pipeline call's fixed cost (latents, timesteps,
    positions; once per call, not per step); each block runs ``calls_per_step`` times a step
    (2 under classifier-free guidance):
    fixed + (step + calls_per_step * sum_i (full_i - measured_i) * t_i) * steps."""
    if not isinstance(calls_per_step, int) or calls_per_step < 1:
        raise ValueError(f"calls_per_step: expected a positive int, got {calls_per_step!r}")
    if not len(block_ms) == len(measured_blocks) == len(full_blocks):
        raise ValueError(
            f"expected one block time and count per block list, got {len(block_ms)} times, "
            f"{len(measured_blocks)} measured and {len(full_blocks)} full counts"
        )
    if any(m > f for m, f in zip(measured_blocks, full_blocks, strict=True)):
        raise ValueError(
            f"measured blocks {tuple(measured_blocks)} exceed the full depth {tuple(full_blocks)}"
        )
    extra = sum((f - m) * t for t, m, f in zip(block_ms, measured_blocks, full_blocks, strict=True))
    return fixed_ms + (step_ms + calls_per_step * extra) * steps


def split_step_time(
    call_ms: float, transformer_marks_ms: Sequence[float], steps: int
) -> tuple[float, float] | None:
    """(per-step ms, fixed ms) of one pipeline call of ``steps`` steps, from the call's time and
    the times (from the call's start) at which each transformer call began: a step is the
    interval from one step's first transformer call to the next's; what the call spends beyond
    ``steps`` of them is its fixed cost. None when that cannot be read (one step, or transformer
    calls that are not the same number every step)."""
    calls = len(transformer_marks_ms)
    if steps < 2 or calls == 0 or calls % steps:
        return None
    per = calls // steps  # transformer calls per step (two with unbatched guidance)
    step_ms = (transformer_marks_ms[-per] - transformer_marks_ms[0]) / (steps - 1)
    return step_ms, max(0.0, call_ms - steps * step_ms)


# -- clocks --------------------------------------------------------------------------------------


class WallClock:
    """perf_counter marks (CPU)."""

    def mark(self) -> float:
        return time.perf_counter()

    def sync(self) -> None:
        pass

    def elapsed_ms(self, start: Any, end: Any) -> float:
        return (end - start) * 1e3


class CudaClock:
    """CUDA events (read after ``sync``): device time without host stalls between marks, on
    ``device``'s current stream (the one the timed work runs on: with no device given, the
    current device's, which is cuda:0 unless set, whatever device the work is on)."""

    def __init__(self, device: torch.device | str | None = None) -> None:
        self.device = torch.device(device) if device is not None else None

    def mark(self) -> torch.cuda.Event:
        event = torch.cuda.Event(enable_timing=True)
        event.record(torch.cuda.current_stream(self.device))
        return event

    def sync(self) -> None:
        torch.cuda.synchronize(self.device)

    def elapsed_ms(self, start: Any, end: Any) -> float:
        return float(start.elapsed_time(end))
