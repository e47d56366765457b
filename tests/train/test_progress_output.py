"""The training bar into a log file (nohup, SLURM, CI): a frame per step filled it (the loss
postfix redrew the bar on every step, around tqdm's rate limit)."""

from __future__ import annotations

import time

import torch
from torch import nn

from dcgen.train import loop
from dcgen.train.config import TrainConfig
from dcgen.train.distributed import DistContext


class _Pairs:
    def __len__(self) -> int:
        return 8

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"x": torch.full((4,), float(i)), "y": torch.zeros(2)}


def test_the_bar_draws_at_its_rate_not_every_step(tmp_path, capsys) -> None:
    steps = 300
    cfg = TrainConfig.from_dict(dict(
        stage="finetune", transformer="t", cache_dir="c", out_dir=str(tmp_path), steps=steps,
        batch_size=2, mixed_precision="no", checkpoint_every=1000, device="cpu",
    ))  # fmt: skip
    lin = nn.Linear(4, 2)
    model = nn.ModuleDict({"lin": lin})
    model.forward = lambda x, y: ((lin(x) - y) ** 2).mean()  # type: ignore[method-assign]
    capsys.readouterr()
    t0 = time.perf_counter()
    loop.train_loop(model, lambda b, r: {"x": b["x"], "y": b["y"]}, _Pairs(), cfg,
                    DistContext(), tmp_path, steps=steps, bucket_key="x", progress=True)  # fmt: skip
    elapsed = time.perf_counter() - t0
    err = capsys.readouterr().err
    frames = err.count("\r")
    assert f"{steps}/{steps}" in err and "loss=" in err  # the bar ends complete, with the loss
    # tqdm's default rate: a frame per 0.1 s at most (plus the first and the closing ones),
    # whatever the machine's speed; it was one or two a step
    assert frames <= elapsed / 0.1 + 5, (frames, elapsed)
