"""Fixtures for the training-data tests: small image folders drawn with PIL in tmp_path."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

# (stem, height, width): two squares, two wide, one tall, so aspect buckets get exercised.
DEFAULT_IMAGES = [
    ("a", 64, 64),
    ("b", 48, 96),
    ("c", 64, 64),
    ("d", 96, 48),
    ("e", 40, 80),
]


def write_image(path: Path, height: int, width: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    Image.fromarray(arr).save(path)


@pytest.fixture
def make_folder(tmp_path: Path) -> Callable[..., Path]:
    """make_folder(images=DEFAULT_IMAGES, ext=".png", captions="txt") -> folder path."""

    def make(
        images: list[tuple[str, int, int]] = DEFAULT_IMAGES,
        ext: str = ".png",
        captions: str = "txt",
        name: str = "data",
    ) -> Path:
        root = tmp_path / name
        root.mkdir()
        for i, (stem, h, w) in enumerate(images):
            write_image(root / f"{stem}{ext}", h, w, seed=i)
            if captions == "txt":
                (root / f"{stem}.txt").write_text(f"a photo of {stem}\n")
        return root

    return make
