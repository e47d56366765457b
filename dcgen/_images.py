"""Image helpers shared by the command line and data preparation."""

from __future__ import annotations

from typing import Any

#: PIL modes of one wide channel: 16-bit (PNG), 32-bit integer, 32-bit float
WIDE_GRAY_MODES = ("I", "I;16", "I;16B", "I;16L", "F")


def wide_gray_to_8bit(image: Any) -> Any:
    """A 16-bit (or 32-bit int / float) grayscale PIL image as 8-bit "L", its range scaled:
    0-65535 for 16-bit PNGs (and any values past 255), 0-1 for a float image within it, else
    0-255. PIL's own convert("RGB") clips such values at 255, so all but the darkest pixels of
    a 16-bit greyscale PNG came out white. Other modes are returned as they are (PIL already
    reduces 16-bit RGB / RGBA to 8 bits when it opens them)."""
    if image.mode not in WIDE_GRAY_MODES:
        return image
    import numpy as np
    from PIL import Image

    values = np.asarray(image, dtype=np.float64)
    top = 65535.0 if image.mode.startswith("I;16") or values.max(initial=0) > 255 else 255.0
    if image.mode == "F" and values.max(initial=0) <= 1.0:
        top = 1.0  # a float image in [0, 1]
    return Image.fromarray(np.clip(np.rint(values / top * 255.0), 0, 255).astype(np.uint8))
