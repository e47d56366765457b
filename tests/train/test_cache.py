"""precompute / LatentCache: round trip, resume, stale caches, corrupt shards, a real DC-AE."""

from __future__ import annotations

import json
import logging

import pytest
import torch
import torch.nn.functional as F

from dcgen.train import (
    BucketBatchSampler,
    CacheError,
    ImageCaptionFolder,
    LatentCache,
    collate_samples,
    make_buckets,
    precompute,
)
from dcgen.train import cache as cache_mod


class Counting:
    """A stand-in encoder (average pooling) that counts the images it saw."""

    def __init__(self, factor: int, channels: int) -> None:
        self.factor, self.channels, self.seen = factor, channels, 0

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.seen += x.shape[0]
        z = F.avg_pool2d(x, self.factor)
        return z.repeat(1, self.channels // 3 + 1, 1, 1)[:, : self.channels]


def text_encoder(captions: list[str]) -> dict[str, torch.Tensor]:
    codes = torch.zeros(len(captions), 8, 4)
    for i, c in enumerate(captions):
        for j, ch in enumerate(c[:8]):
            codes[i, j] = ord(ch)
    return {"prompt_embeds": codes, "pooled_prompt_embeds": codes.mean(1)}


def encoders() -> dict[str, Counting]:
    return {"base_latent": Counting(8, 16), "dcae_latent": Counting(32, 32)}


@pytest.fixture
def dataset(make_folder):
    return ImageCaptionFolder(make_folder(), buckets=make_buckets(64 * 64, 32), factor=32)


def test_round_trip(dataset, tmp_path):
    enc = encoders()
    cache = precompute(
        dataset, enc, text_encoder, tmp_path / "c", shard_size=2, batch_size=2, progress=False
    )
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == [
        "index.json",
        "shard-00000.safetensors",
        "shard-00001.safetensors",
        "shard-00002.safetensors",
    ]
    assert len(cache) == len(dataset) and cache.keys == dataset.keys
    assert cache.bucket_ids == dataset.bucket_ids
    for i in range(len(dataset)):
        s, c = dataset[i], cache[i]
        assert c["key"] == s["key"] and c["caption"] == s["caption"]
        img = s["image"][None]
        # Batched and single-image encoding agree exactly for pooling.
        assert torch.equal(c["base_latent"], enc["base_latent"](img)[0])
        assert torch.equal(c["dcae_latent"], enc["dcae_latent"](img)[0])
        assert torch.equal(c["prompt_embeds"], text_encoder([s["caption"]])["prompt_embeds"][0])
        assert c["pooled_prompt_embeds"].shape == (4,)
    index = json.loads((tmp_path / "c" / "index.json").read_text())
    assert index["tensors"] == [
        "base_latent",
        "dcae_latent",
        "pooled_prompt_embeds",
        "prompt_embeds",
    ]
    assert index["dataset_fingerprint"] == dataset.fingerprint()
    rec = index["samples"][1]
    assert rec["key"] == "b.png" and rec["shard"] == 0 and rec["slot"] == 1
    assert rec["shapes"]["dcae_latent"] == [32, *(d // 32 for d in rec["size"])]

    only = LatentCache(tmp_path / "c", tensors=["dcae_latent"])
    assert set(only[0]) == {"key", "caption", "dcae_latent"}
    sampler = BucketBatchSampler(only.bucket_ids, batch_size=2, seed=0)
    loader = torch.utils.data.DataLoader(only, batch_sampler=sampler, collate_fn=collate_samples)
    for batch in loader:
        assert batch["dcae_latent"].ndim == 4 and batch["dcae_latent"].shape[0] == 2


def test_dtype_and_no_text(dataset, tmp_path):
    cache = precompute(
        dataset,
        {"dcae_latent": Counting(32, 4)},
        None,
        tmp_path,
        dtype=torch.bfloat16,
        progress=False,
    )
    assert cache[0]["dcae_latent"].dtype == torch.bfloat16
    assert cache.tensor_names == ["dcae_latent"]


def test_resume_skips_finished_shards(dataset, tmp_path, monkeypatch):
    out = tmp_path / "c"
    real_write = cache_mod._write_shard
    calls = []

    def crash_on_second(path, *args):
        calls.append(path.name)
        if len(calls) == 2:
            raise KeyboardInterrupt("killed while writing shard 1")
        real_write(path, *args)

    monkeypatch.setattr(cache_mod, "_write_shard", crash_on_second)
    with pytest.raises(KeyboardInterrupt):
        precompute(dataset, encoders(), text_encoder, out, shard_size=2, progress=False)
    monkeypatch.setattr(cache_mod, "_write_shard", real_write)
    # Shard 0 is complete, no temp file or index is left behind.
    assert sorted(p.name for p in out.iterdir()) == ["shard-00000.safetensors"]
    with pytest.raises(CacheError, match="no index.json"):
        LatentCache(out)

    enc = encoders()
    cache = precompute(dataset, enc, text_encoder, out, shard_size=2, progress=False)
    assert enc["dcae_latent"].seen == len(dataset) - 2  # shard 0 was not recomputed
    assert len(cache) == len(dataset)
    reference = precompute(
        dataset, encoders(), text_encoder, tmp_path / "ref", shard_size=2, progress=False
    )
    for i in range(len(dataset)):
        for name in cache.tensor_names:
            assert torch.equal(cache[i][name], reference[i][name])

    enc = encoders()
    precompute(dataset, enc, text_encoder, out, shard_size=2, progress=False)
    assert enc["dcae_latent"].seen == 0  # complete cache: nothing to do


def test_stale_cache_detected(dataset, make_folder, tmp_path):
    out = tmp_path / "c"
    precompute(dataset, encoders(), text_encoder, out, shard_size=2, progress=False)
    with pytest.raises(CacheError, match="other data or settings"):
        precompute(dataset, encoders(), None, out, shard_size=2, progress=False)
    other = ImageCaptionFolder(make_folder(images=[("z", 64, 64)], name="other"), resolution=32)
    cache = precompute(other, encoders(), None, out, shard_size=2, overwrite=True, progress=False)
    assert cache.keys == ["z.png"]
    assert sorted(p.name for p in out.iterdir()) == ["index.json", "shard-00000.safetensors"]


def test_generic_dataset_without_fingerprint_warns(tmp_path, caplog):
    class Tiny:
        def __len__(self):
            return 3

        def __getitem__(self, i):
            return {"image": torch.full((3, 32, 32), i / 3), "caption": f"c{i}", "key": f"k{i}"}

    with caplog.at_level(logging.WARNING, logger="dcgen.train.cache"):
        cache = precompute(Tiny(), {"z": Counting(32, 3)}, None, tmp_path, progress=False)
    assert "fingerprint" in caplog.text
    assert cache.keys == ["k0", "k1", "k2"]
    assert torch.allclose(cache[2]["z"], torch.full((3, 1, 1), 2 / 3))


def test_encoder_output_checked(dataset, tmp_path):
    with pytest.raises(ValueError, match="batch size"):
        precompute(dataset, {"bad": lambda x: x[0]}, None, tmp_path, progress=False)


def test_truncated_shard_named(dataset, tmp_path):
    out = tmp_path / "c"
    precompute(dataset, encoders(), text_encoder, out, shard_size=2, progress=False)
    shard = out / "shard-00001.safetensors"
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(CacheError, match=r"shard-00001\.safetensors is \d+ bytes .*truncated"):
        LatentCache(out)


def test_corrupt_shard_named(dataset, tmp_path):
    out = tmp_path / "c"
    precompute(dataset, encoders(), text_encoder, out, shard_size=2, progress=False)
    shard = out / "shard-00001.safetensors"
    data = bytearray(shard.read_bytes())
    data[:8] = (10**12).to_bytes(8, "little")  # absurd header length, same file size
    shard.write_bytes(bytes(data))
    cache = LatentCache(out)  # lazy: shard 0 still reads
    assert cache[0]["key"] == "a.png"
    with pytest.raises(CacheError, match=r"shard-00001\.safetensors is corrupt"):
        cache[2]


def test_index_not_matching_shards(dataset, tmp_path):
    out = tmp_path / "c"
    precompute(dataset, encoders(), text_encoder, out, shard_size=2, progress=False)
    s0, s1 = out / "shard-00000.safetensors", out / "shard-00001.safetensors"
    if s0.stat().st_size != s1.stat().st_size:
        index = json.loads((out / "index.json").read_text())
        index["shards"][0]["bytes"], index["shards"][1]["bytes"] = (
            index["shards"][1]["bytes"],
            index["shards"][0]["bytes"],
        )
        (out / "index.json").write_text(json.dumps(index))
    tmp = out / "swap"
    s0.rename(tmp)
    s1.rename(s0)
    tmp.rename(s1)
    with pytest.raises(CacheError, match=r"does not match shard .*shard-00000"):
        LatentCache(out)[0]

    (out / "shard-00002.safetensors").unlink()
    with pytest.raises(CacheError, match=r"shard-00002\.safetensors listed in .* is missing"):
        LatentCache(out)
    (out / "index.json").write_text("{not json")
    with pytest.raises(CacheError, match="could not read cache index"):
        LatentCache(out)


def test_verify_checks_each_tensors_dtype_against_the_index(dataset, tmp_path):
    # verify() said it checked dtypes and compared shapes only: a shard rewritten in float16
    # under an index saying float32 passed, and training read float16 latents.
    from safetensors.torch import save_file

    out = tmp_path / "c"
    precompute(dataset, encoders(), text_encoder, out, shard_size=2, progress=False)
    LatentCache(out).verify()
    shard = out / "shard-00001.safetensors"
    with cache_mod.safe_open(str(shard), "pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    name = next(k for k in tensors if k.endswith("/base_latent"))
    tensors[name] = tensors[name].half()
    save_file(tensors, str(shard), metadata=meta)
    index = json.loads((out / "index.json").read_text())
    index["shards"][1]["bytes"] = shard.stat().st_size  # past the size check: the dtype is left
    (out / "index.json").write_text(json.dumps(index))
    with pytest.raises(CacheError, match=r"shard-00001\.safetensors: .*/base_latent is stored as "
                       r"float16, index says float32"):  # fmt: skip
        LatentCache(out).verify()


def test_with_dcae(dataset, tmp_path):
    """The documented encoder: DCAE.encode(x, scaled=True) on a narrow f32 model."""
    from dcgen.autoencoders.config import reduced_config
    from dcgen.autoencoders.dcae import DCAE

    torch.manual_seed(0)
    ae = DCAE.from_config(
        reduced_config("dc-ae-f32c32-sana-1.1", width_divisor=32, max_layers=1)
    ).eval()
    cache = precompute(
        dataset,
        {"dcae_latent": lambda x: ae.encode(x, scaled=True)},
        None,
        tmp_path,
        progress=False,
    )
    with torch.no_grad():
        want = ae.encode(dataset[3]["image"][None], scaled=True)[0]
    got = cache[3]["dcae_latent"]
    assert got.shape == want.shape and got.shape[-2:] == tuple(
        d // 32 for d in dataset.target_size(3)
    )
    torch.testing.assert_close(got, want)


class _PidCaptions(torch.utils.data.Dataset):
    """Samples whose caption names the process that read them (a DataLoader worker)."""

    def __len__(self) -> int:
        return 6

    def __getitem__(self, i: int) -> dict:
        import os

        return {"image": torch.zeros(3, 64, 64), "caption": f"pid {os.getpid()}", "key": f"k{i}"}

    def fingerprint(self) -> str:
        return "pid-captions-6"


def test_workers_start_once_for_every_shard_to_compute(tmp_path):
    # a DataLoader per shard restarted its workers each shard: about 5 s apiece where worker
    # processes spawn (macOS, Windows), more than the encoding itself for small shards
    cache = precompute(_PidCaptions(), encoders(), None, tmp_path / "c", shard_size=2,
                       batch_size=2, num_workers=1, progress=False)  # fmt: skip
    captions = {cache[i]["caption"] for i in range(len(cache))}
    assert len(captions) == 1 and captions != {f"pid {__import__('os').getpid()}"}
    # resumed with one shard missing: only that shard's samples are read again
    (tmp_path / "c" / "shard-00001.safetensors").unlink()
    (tmp_path / "c" / "index.json").unlink()
    again = precompute(_PidCaptions(), encoders(), None, tmp_path / "c", shard_size=2,
                       batch_size=2, num_workers=1, progress=False)  # fmt: skip
    assert [again[i]["key"] for i in range(6)] == [f"k{i}" for i in range(6)]
    assert again[2]["caption"] != again[0]["caption"]  # read by the new run's worker


def test_a_killed_runs_temp_files_are_removed_on_rerun(dataset, tmp_path):
    # what SIGKILL leaves mid-write (no Python clean-up): shard-sized temp files, never swept
    out = tmp_path / "c"
    out.mkdir()
    leftovers = [out / ".shard-00001.safetensors.k1ll3d.tmp", out / ".index.json.k1ll3d.tmp"]
    for t in leftovers:
        t.write_bytes(b"half")
    mine = out / ".notes.txt.tmp"  # not a name precompute writes: left alone
    mine.write_text("mine")
    precompute(dataset, encoders(), text_encoder, out, shard_size=2, progress=False)
    assert not [t for t in leftovers if t.exists()] and mine.exists()
    assert not [p.name for p in out.glob(".*.tmp") if p != mine]


def test_duplicate_keys_are_named(tmp_path):
    class Twice(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return 6

        def __getitem__(self, i: int) -> dict:
            g = torch.Generator().manual_seed(i)
            key = ["a", "b", "a", "c", "b", "d"][i]
            return {"image": torch.rand(3, 32, 32, generator=g), "caption": key, "key": key}

        def fingerprint(self) -> str:
            return "twice"

    with pytest.raises(CacheError, match=r"dataset keys must be unique; duplicated: \['a', 'b'\]"):
        precompute(Twice(), {"dcae_latent": Counting(32, 32)}, None, tmp_path / "c",
                   shard_size=4, batch_size=2, progress=False)  # fmt: skip


def test_a_restricted_view_shares_the_parsed_index(dataset, tmp_path):
    cache = precompute(dataset, encoders(), text_encoder, tmp_path / "c", shard_size=2,
                       batch_size=2, progress=False)  # fmt: skip
    view = cache.with_tensors(["dcae_latent"])
    assert view.samples is cache.samples and view.keys is cache.keys  # not parsed again
    direct = LatentCache(tmp_path / "c", tensors=["dcae_latent"])
    for i in range(len(cache)):
        a, b = view[i], direct[i]
        assert a.keys() == b.keys() and "prompt_embeds" not in a
        assert torch.equal(a["dcae_latent"], b["dcae_latent"])
    assert "prompt_embeds" in cache[0]  # the full cache keeps every tensor
    with pytest.raises(CacheError, match=r"not \['nope'\]"):
        cache.with_tensors(["dcae_latent", "nope"])
