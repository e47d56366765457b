"""Exponential moving average of the trainable parameters (optional, stages 2 and 3).

Only the parameters that train are averaged (LoRA + latent layers), so the EMA costs a few
hundred MB at 12B rather than a second copy of the model. The shadow copy is fp32 whatever the
parameter dtype; with ``warmup`` the decay ramps up over the first steps (:func:`warmup_decay`).
It exposes ``state_dict`` / ``load_state_dict`` so the Checkpointer saves
and restores it like a module.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from .checkpoint import check_shapes

__all__ = ["EMA", "warmup_decay"]


def warmup_decay(decay: float, step: int) -> float:
    """The decay after optimizer step ``step`` (1-based) under warmup: 0 at the first step (the
    average starts at the trained weights), then ``min(decay, step / (9 + step))``, as
    diffusers' ``EMAModel`` does by default. Without it a 0.9999 average of a 2,000-step run
    is still 82% the weights training started from (for LoRA: mostly no adapter)."""
    return 0.0 if step <= 1 else min(decay, step / (9.0 + step))


class EMA:
    def __init__(
        self, named_params: dict[str, nn.Parameter], decay: float, warmup: bool = False
    ) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        self.decay = decay
        self.warmup = warmup
        self.params = dict(named_params)
        self.shadow = {k: p.detach().float().clone() for k, p in self.params.items()}

    def decay_at(self, step: int) -> float:
        """The decay used after optimizer step ``step`` (1-based)."""
        return warmup_decay(self.decay, step) if self.warmup else self.decay

    @torch.no_grad()
    def update(self, step: int) -> None:
        """Average in the weights after optimizer step ``step`` (1-based; the step count, not
        a count of updates, so a resumed run continues the same decay schedule)."""
        weight = 1.0 - self.decay_at(step)
        for k, p in self.params.items():
            self.shadow[k].lerp_(p.detach().float(), weight)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(self.shadow)

    def load_state_dict(self, state: dict[str, torch.Tensor], strict: bool = True) -> None:
        missing, unexpected = set(self.shadow) - set(state), set(state) - set(self.shadow)
        if strict and (missing or unexpected):
            # both lists: a checkpoint of another model's EMA only had unexpected keys, and
            # the error read "missing []"
            raise KeyError(
                f"EMA state does not match the trained parameters: missing "
                f"{sorted(missing)[:5]} ({len(missing)}), unexpected {sorted(unexpected)[:5]} "
                f"({len(unexpected)})"
            )
        check_shapes(state, self.shadow, "EMA weights")
        for k in self.shadow:
            if k in state:
                self.shadow[k].copy_(state[k])

    @contextlib.contextmanager
    def applied(self) -> Iterator[None]:
        """Temporarily load the EMA weights into the model (for saving or sampling)."""
        backup = {k: p.detach().clone() for k, p in self.params.items()}
        with torch.no_grad():
            for k, p in self.params.items():
                p.copy_(self.shadow[k].to(p.dtype))
        try:
            yield
        finally:
            with torch.no_grad():
                for k, p in self.params.items():
                    p.copy_(backup[k])
