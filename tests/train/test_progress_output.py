"""The training bar into a log file (nohup, SLURM, CI): a frame per step filled it (the loss
postfix redrew the bar on every step, around tqdm's rate limit)."""

from __future__ import annotations

import time

from dcgen.train import loop
from dcgen.train.distributed import DistContext
from tests.train.loop_utils import Pairs, Regression, loop_config


def test_the_bar_draws_at_its_rate_not_every_step(tmp_path, capsys) -> None:
    steps = 300
    cfg = loop_config(tmp_path, steps, checkpoint_every=1000)
    capsys.readouterr()
    t0 = time.perf_counter()
    loop.train_loop(Regression(), lambda b, r: {"x": b["x"], "y": b["y"]}, Pairs(), cfg,
                    DistContext(), tmp_path, steps=steps, bucket_key="x", progress=True)  # fmt: skip
    elapsed = time.perf_counter() - t0
    err = capsys.readouterr().err
    frames = err.count("\r")
    assert f"{steps}/{steps}" in err and "loss=" in err  # the bar ends complete, with the loss
    # tqdm's default rate: a frame per 0.1 s at most (plus the first and the closing ones),
    # whatever the machine's speed; it was one or two a step
    assert frames <= elapsed / 0.1 + 5, (frames, elapsed)
