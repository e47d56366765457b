"""The smallest thing train_loop trains: a linear regression on 8 random pairs (tests of the
loop's own behaviour: skipped steps, stop requests)."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dcgen.train.config import TrainConfig


class Pairs:
    """8 (x, y) samples; the ``bad`` ones carry an inf (a corrupt cached latent)."""

    def __init__(self, bad: Iterable[int] = (), n: int = 8) -> None:
        g = torch.Generator().manual_seed(0)
        self.x, self.y = torch.randn(n, 4, generator=g), torch.randn(n, 2, generator=g)
        for i in bad:
            self.x[i, 0] = float("inf")

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"x": self.x[i], "y": self.y[i]}


class Regression(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return ((self.lin(x) - y) ** 2).mean()


def loop_config(root: Path, steps: int, **overrides: Any) -> TrainConfig:
    """A CPU fp32 config for these models (batches of 2, lr 1e-2), ``overrides`` on top."""
    settings = dict(stage="finetune", transformer="t", cache_dir="c", out_dir=str(root),
                    steps=steps, batch_size=2, lr=1e-2, mixed_precision="no", device="cpu")  # fmt: skip
    return TrainConfig.from_dict({**settings, **overrides})
