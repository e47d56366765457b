"""sample_every writes PNG grids at the right steps without changing what training computes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
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
