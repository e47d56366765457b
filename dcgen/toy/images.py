"""Image I/O helpers shared by the demo and CLI: PIL <-> [-1, 1] tensors, PSNR, grids, curves."""

from __future__ import annotations

from collections.abc import Sequence
from importlib import resources
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw


def bundled_image_path() -> Path:
    """The 512x512 picture shipped with dcgen (scripts/make_demo_image.py draws it)."""
    return Path(str(resources.files("dcgen") / "assets" / "demo.png"))


def load_image(path: str | Path) -> torch.Tensor:
    """RGB image file -> (1, 3, H, W) float tensor in [-1, 1]."""
    arr = np.asarray(Image.open(path).convert("RGB"), dtype=np.float32)
    return torch.from_numpy(arr).permute(2, 0, 1).unsqueeze(0) / 127.5 - 1.0


def to_pil(x: torch.Tensor) -> Image.Image:
    """(1, 3, H, W) or (3, H, W) tensor in [-1, 1] -> PIL image (clamped)."""
    x = x.detach().float().cpu()
    if x.ndim == 4:
        x = x[0]
    arr = ((x.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
    return Image.fromarray(arr)


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB of two images in [-1, 1] (peak-to-peak range 2)."""
    mse = (a.float().clamp(-1, 1) - b.float().clamp(-1, 1)).pow(2).mean().item()
    return float("inf") if mse == 0 else 10 * np.log10(4.0 / mse)


def side_by_side(images: Sequence[Image.Image], labels: Sequence[str]) -> Image.Image:
    """Images in a row with a caption strip above each."""
    w, h = images[0].size
    out = Image.new("RGB", (w * len(images), h + 24), (255, 255, 255))
    d = ImageDraw.Draw(out)
    for i, (im, label) in enumerate(zip(images, labels)):
        out.paste(im, (i * w, 24))
        d.text((i * w + 6, 4), label, fill=(0, 0, 0), font_size=16)
    return out


def plot_curve(
    values: Sequence[float], title: str, size: tuple[int, int] = (480, 240)
) -> Image.Image:
    """A small log-scale line plot drawn with PIL (no plotting library needed)."""
    w, h = size
    img = Image.new("RGB", size, (255, 255, 255))
    d = ImageDraw.Draw(img)
    d.text((8, 4), title, fill=(0, 0, 0), font_size=14)
    vals = np.log10(np.maximum(np.asarray(values, dtype=np.float64), 1e-12))
    if len(vals) < 2:
        return img
    lo, hi = float(vals.min()), float(vals.max())
    span = hi - lo or 1.0
    left, top, right, bottom = 48, 24, w - 8, h - 20
    d.rectangle((left, top, right, bottom), outline=(160, 160, 160))
    pts = [
        (left + (right - left) * i / (len(vals) - 1), bottom - (bottom - top) * (v - lo) / span)
        for i, v in enumerate(vals)
    ]
    d.line(pts, fill=(30, 90, 200), width=2)
    d.text((4, top), f"{10**hi:.3g}", fill=(0, 0, 0), font_size=11)
    d.text((4, bottom - 12), f"{10**lo:.3g}", fill=(0, 0, 0), font_size=11)
    d.text((left, bottom + 4), f"step 0 .. {len(vals) - 1}", fill=(0, 0, 0), font_size=11)
    return img
