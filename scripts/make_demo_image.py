"""Draw dcgen/assets/demo.png: a 512x512 procedural scene (gradients, hard edges, fine texture
and text) used by `dcgen demo` for a DC-AE round trip. Deterministic; rerun to regenerate."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

SIZE = 512


def draw() -> Image.Image:
    yy, xx = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32) / SIZE
    sky = np.stack([0.25 + 0.5 * yy, 0.45 + 0.4 * yy, 0.95 - 0.3 * yy], axis=-1)
    img = Image.fromarray((sky * 255).astype(np.uint8))
    d = ImageDraw.Draw(img)
    d.ellipse((360, 50, 450, 140), fill=(255, 214, 90))  # sun
    for k, (h, col) in enumerate([(0.55, (70, 96, 120)), (0.65, (52, 110, 70))]):  # ridges
        pts = [
            (x, SIZE * h + 40 * math.sin(x / (37 + 20 * k)) + 25 * math.sin(x / 11.0))
            for x in range(0, SIZE + 8, 8)
        ]
        d.polygon([(0, SIZE), *pts, (SIZE, SIZE)], fill=col)
    for i in range(8):  # a checker strip: the hardest case for an autoencoder
        for j in range(2):
            if (i + j) % 2 == 0:
                d.rectangle(
                    (32 + 24 * i, 400 + 24 * j, 56 + 24 * i, 424 + 24 * j), fill=(240, 240, 240)
                )
    d.rectangle((280, 330, 470, 470), fill=(180, 40, 50), outline=(20, 20, 20), width=4)
    d.polygon([(300, 460), (375, 345), (450, 460)], fill=(245, 200, 40))
    d.ellipse((60, 200, 180, 320), fill=(40, 80, 200), outline=(255, 255, 255), width=3)
    d.text((40, 40), "dcgen", fill=(255, 255, 255), font_size=48)
    d.text((40, 100), "deep compression", fill=(20, 20, 40), font_size=20)
    return img


if __name__ == "__main__":
    out = Path(__file__).resolve().parents[1] / "dcgen" / "assets" / "demo.png"
    draw().save(out, optimize=True)
    print(f"wrote {out} ({out.stat().st_size} bytes)")
