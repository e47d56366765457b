"""sample_every writes PNG grids at the right steps without changing what training computes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dcgen.train.samples import latent_preview
from dcgen.train.stages import run
from tests.train.stage_utils import config, make_cache, save_adapted, trainable_weights


def test_sample_every_writes_grids_and_keeps_training_exact(tmp_path: Path) -> None:
    cache = make_cache(tmp_path)
    adapted = save_adapted(tmp_path)
    kw = dict(steps=5, checkpoint_every=5)
    plain = config(tmp_path, "output", adapted, cache, out_dir=str(tmp_path / "plain"), **kw)
    run(plain, progress=False)
    sampled = config(
        tmp_path, "output", adapted, cache, out_dir=str(tmp_path / "sampled"),
        sample_every=2, sample_steps=2, sample_count=3, **kw,
    )  # fmt: skip
    run(sampled, progress=False)

    # Every 2 steps and at the end (step 5); no decoder configured: latent previews.
    files = sorted(p.name for p in (tmp_path / "sampled" / "samples").iterdir())
    assert files == [f"step-{s:08d}.png" for s in (2, 4, 5)]
    for name in files:
        with Image.open(tmp_path / "sampled" / "samples" / name) as im:
            im.verify()
        with Image.open(tmp_path / "sampled" / "samples" / name) as im:
            assert im.format == "PNG" and im.mode == "RGB"
            assert im.size == (3 * 64, 64 + 24)  # 3 images of 64 px + caption strip
            assert im.text["dcgen:decoded"] == "latent-preview"
            assert len(np.unique(np.asarray(im).reshape(-1, 3), axis=0)) > 10  # not blank
    assert not (tmp_path / "plain" / "samples").exists()

    # Sampling draws from its own generators: the training result is bit-identical.
    a, b = trainable_weights(tmp_path / "plain"), trainable_weights(tmp_path / "sampled")
    assert a.keys() == b.keys() and a
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_latent_preview_shapes() -> None:
    x = torch.randn(2, 4, 4, 4)
    y = latent_preview(x)
    assert y.shape == (2, 3, 64, 64) and y.abs().max() <= 1
    y2 = latent_preview(torch.randn(1, 1, 8, 8), min_size=16)  # one channel repeated
    assert y2.shape == (1, 3, 16, 16) and torch.equal(y2[:, 0], y2[:, 1])


def test_sana_previews_use_its_guidance_when_the_empty_prompt_exists(tmp_path: Path) -> None:
    """SANA samples with CFG: previews too, against the empty prompt precompute wrote; without
    that file they stay unguided."""
    from dcgen.train.cache import LatentCache
    from dcgen.train.null_text import NULL_TEXT_NAME, save_null_text
    from dcgen.train.samples import SampleWriter
    from dcgen.train.stages import load_transformer
    from tests.train.stage_utils import save_sana_adapted, text_encoder

    cache = make_cache(tmp_path)
    adapted = save_sana_adapted(tmp_path)
    transformer = load_transformer(adapted)
    cfg = config(tmp_path, "output", adapted, cache, sample_every=1, sample_steps=2,
                 sample_count=3)  # fmt: skip
    batches: list[int] = []
    transformer.register_forward_pre_hook(
        lambda m, args, kwargs: batches.append(kwargs["hidden_states"].shape[0]), with_kwargs=True
    )
    unguided = SampleWriter(transformer, LatentCache(cache), cfg, tmp_path / "a")
    assert unguided(1).is_file() and batches == [3, 3]
    save_null_text(cache, {k: v[0] for k, v in text_encoder([""]).items()}, torch.float32)
    assert (cache / NULL_TEXT_NAME).is_file()
    batches.clear()
    guided = SampleWriter(transformer, LatentCache(cache), cfg, tmp_path / "b")
    assert guided(1).is_file() and batches == [6, 6]  # negative and positive, one call a step
    with Image.open(guided.path(1)) as a, Image.open(unguided.path(1)) as b:
        assert not np.array_equal(np.asarray(a), np.asarray(b))


def test_a_sample_that_cannot_be_written_leaves_no_file(tmp_path: Path, monkeypatch) -> None:
    # the grid went to a visible step-N.tmp.png first, left behind when the save failed
    import errno

    from dcgen.train.cache import LatentCache
    from dcgen.train.samples import SampleWriter
    from dcgen.train.stages import load_transformer
    from tests.train.stage_utils import save_adapted

    cache, adapted = make_cache(tmp_path), save_adapted(tmp_path)
    cfg = config(tmp_path, "output", adapted, cache, sample_every=1, sample_steps=1,
                 sample_count=1)  # fmt: skip
    writer = SampleWriter(load_transformer(adapted), LatentCache(cache), cfg, tmp_path / "run")

    def full_disk(self, fp, *args, **kwargs):
        Path(fp).write_bytes(b"\x89PNG cut off")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Image.Image, "save", full_disk)
    with pytest.raises(OSError, match=r"cannot write .*step-00000001"):
        writer(1)
    assert [p.name for p in writer.dir.iterdir()] == []
