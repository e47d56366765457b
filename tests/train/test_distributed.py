"""Two CPU processes (gloo, DistributedDataParallel) train exactly like one process with the
same global batch: each rank takes a disjoint half of every global batch."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from dcgen.train.config import TrainConfig
from dcgen.train.stages import run
from tests.train.stage_utils import (
    config,
    make_cache,
    save_adapted,
    save_sana_adapted,
    trainable_weights,
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, cfg_dict: dict) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world),
    )
    torch.set_num_threads(1)  # two processes on two shared cores
    run(TrainConfig.from_dict(cfg_dict), progress=False)


@pytest.mark.parametrize("family", ["flux", "sana"])
def test_two_processes_match_one(tmp_path: Path, family: str) -> None:
    cache = make_cache(tmp_path)
    adapted = save_adapted(tmp_path) if family == "flux" else save_sana_adapted(tmp_path)
    kw = dict(steps=4, batch_size=4, checkpoint_every=4)
    single = config(tmp_path, "finetune", adapted, cache, out_dir=str(tmp_path / "one"), **kw)
    run(single, progress=False)

    multi = config(tmp_path, "finetune", adapted, cache, out_dir=str(tmp_path / "two"), **kw)
    mp.spawn(_worker, args=(2, _free_port(), multi.to_dict()), nprocs=2, join=True)

    one, two = trainable_weights(tmp_path / "one"), trainable_weights(tmp_path / "two")
    assert one.keys() == two.keys() and any("lora" in k for k in one)
    for k in one:
        # Same math on half-size matmuls: equal up to fp32 summation order.
        torch.testing.assert_close(two[k], one[k], rtol=1e-5, atol=1e-6, msg=k)
        if "lora_B" in k:  # B starts at zero: it really trained
            assert one[k].abs().max() > 0
    # Only rank 0 writes: one log line per step, one LoRA file.
    lines = (tmp_path / "two" / "log.jsonl").read_text().splitlines()
    assert len(lines) == 4
    assert (tmp_path / "two" / "pytorch_lora_weights.safetensors").is_file()


def test_two_processes_fit_the_same_ridge_head(tmp_path: Path) -> None:
    """Stage 1's closed-form head: every batch's noise is seeded by its global number, so two
    processes (each fitting every other batch) draw the noise one process does."""
    from safetensors.torch import load_file

    from tests.train.stage_utils import save_base

    cache, base = make_cache(tmp_path), save_base(tmp_path)
    # 8 samples, batch 4: two batches, one per rank
    kw = dict(align_head="ridge", align_sgd_steps=2, batch_size=4, checkpoint_every=2)
    run(config(tmp_path, "align", base, cache, out_dir=str(tmp_path / "one"), **kw),
        progress=False)  # fmt: skip
    multi = config(tmp_path, "align", base, cache, out_dir=str(tmp_path / "two"), **kw)
    mp.spawn(_worker, args=(2, _free_port(), multi.to_dict()), nprocs=2, join=True)
    one = load_file(str(tmp_path / "one" / "latent_layers.safetensors"))
    two = load_file(str(tmp_path / "two" / "latent_layers.safetensors"))
    assert one.keys() == two.keys() and any(k.startswith("head.") for k in one)
    for k in one:
        # measured before the fix: the head 6.0 apart (rank 1 reused rank 0's noise)
        torch.testing.assert_close(two[k], one[k], rtol=1e-4, atol=1e-5, msg=k)


def test_an_uneven_batch_fails_before_any_work(tmp_path: Path, monkeypatch) -> None:
    # batch_size 3 over 2 processes: refused at the start (it was refused at the first training
    # step, after config.json and, in stage 1, after the whole ridge fit)
    import dcgen.train.stages as stages
    from dcgen.train.distributed import DistContext

    cache, adapted = make_cache(tmp_path), save_adapted(tmp_path)
    monkeypatch.setattr(stages, "init_distributed", lambda device: DistContext(world_size=2))
    cfg = config(tmp_path, "output", adapted, cache, out_dir=str(tmp_path / "run"), batch_size=3)
    with pytest.raises(ValueError, match="batch_size 3 must be a multiple of the number of"):
        run(cfg, progress=False)
    assert not (tmp_path / "run").exists()
