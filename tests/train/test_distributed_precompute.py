"""`dcgen precompute` under torchrun: two CPU processes (gloo) split the shards and write the
cache one process writes, shard files and index alike."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file

from dcgen.cli import main
from dcgen.train.cache import INDEX_NAME

from ..adapters.tiny import tiny_dcae, tiny_kl
from .conftest import write_image
from .test_distributed import _free_port

TEXT_ENCODER = "tests.test_cli_train:fake_text_encoder"


def _argv(root: Path, out: Path) -> list[str]:
    return ["precompute", "--data", str(root / "data"), "--dcae", str(root / "dcae"),
            "--base-vae", str(root / "vae"), "--text-encoder", TEXT_ENCODER, "--out", str(out),
            "--resolution", "64", "--shard-size", "2", "--batch-size", "2", "--device", "cpu",
            "--no-progress"]  # fmt: skip


def _worker(rank: int, world: int, port: int, argv: list[str]) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      LOCAL_RANK=str(rank), WORLD_SIZE=str(world))  # fmt: skip
    torch.set_num_threads(1)  # two processes on two shared cores
    if main(argv) != 0:
        raise SystemExit(f"rank {rank}: precompute failed")


def test_two_processes_write_the_cache_one_process_writes(tmp_path: Path) -> None:
    tiny_dcae().save_pretrained(tmp_path / "dcae")
    tiny_kl().save_pretrained(tmp_path / "vae")
    data = tmp_path / "data"
    data.mkdir()
    for i in range(7):  # 4 shards of 2: rank 0 takes shards 0 and 2, rank 1 shards 1 and 3
        write_image(data / f"img{i}.png", 64, 64, seed=i)
        (data / f"img{i}.txt").write_text(f"caption number {i}" + " long" * i)

    one, two = tmp_path / "one", tmp_path / "two"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each worker: the same conv summation order, the same bits
    try:
        assert main(_argv(tmp_path, one)) == 0
    finally:
        torch.set_num_threads(threads)
    mp.spawn(_worker, args=(2, _free_port(), _argv(tmp_path, two)), nprocs=2, join=True)

    index_one = json.loads((one / INDEX_NAME).read_text())
    index_two = json.loads((two / INDEX_NAME).read_text())
    assert index_two == index_one  # fingerprint, shards (sizes included), every sample record
    assert len(index_one["shards"]) == 4 and index_one["num_samples"] == 7
    for shard in index_one["shards"]:
        a, b = load_file(one / shard["file"]), load_file(two / shard["file"])
        assert a.keys() == b.keys()
        for key in a:
            torch.testing.assert_close(b[key], a[key], rtol=0, atol=0, msg=key)
    assert (two / "null_text.safetensors").is_file()  # written once, by rank 0
    assert sorted(p.name for p in two.iterdir()) == sorted(p.name for p in one.iterdir())


def test_launch_env_reads_torchrun_and_refuses_a_bad_rank(monkeypatch) -> None:
    from dcgen.train.distributed import launch_env

    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    assert launch_env() == (0, 1, 0)
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert launch_env() == (3, 4, 1)
    monkeypatch.setenv("RANK", "4")
    with pytest.raises(ValueError, match=r"RANK=4 is not in \[0, WORLD_SIZE=4\)"):
        launch_env()
