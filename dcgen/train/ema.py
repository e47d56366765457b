"""Exponential moving average of the trainable parameters (optional, stages 2 and 3).

Only the parameters that train are averaged (LoRA + latent layers), so the EMA costs a few
hundred MB at 12B rather than a second copy of the model. The shadow copy is fp32 whatever the
parameter dtype, and it exposes ``state_dict`` / ``load_state_dict`` so the Checkpointer saves
and restores it like a module.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from .checkpoint import check_shapes

__all__ = ["EMA"]


class EMA:
    def __init__(self, named_params: dict[str, nn.Parameter], decay: float) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        self.decay = decay
        self.params = dict(named_params)
        self.shadow = {k: p.detach().float().clone() for k, p in self.params.items()}

    @torch.no_grad()
    def update(self) -> None:
        for k, p in self.params.items():
            self.shadow[k].lerp_(p.detach().float(), 1.0 - self.decay)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(self.shadow)

    def load_state_dict(self, state: dict[str, torch.Tensor], strict: bool = True) -> None:
        missing = set(self.shadow) - set(state)
        if strict and (missing or set(state) - set(self.shadow)):
            raise KeyError(f"EMA state does not match: missing {sorted(missing)[:5]}")
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
