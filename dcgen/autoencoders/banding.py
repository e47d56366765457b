"""Banded decode and encode: the high-resolution local layers run one horizontal band at a
time (the decoder's tail, the encoder's head).

Where the 4K decode's memory goes: the last stages work at 1024^2-2048^2 with 256-512 channels
(2.1 GB per bf16 map at 2048^2 x 256), and a ResBlock holds three or four such maps at once.
Those stages are *local*: convolutions, per-pixel norms and activations, depth-to-space. Only
the low-resolution EfficientViT stages (global linear attention) need the whole frame.

So the decoder runs its global prefix on the full map as usual, then the longest run of local
layers at its end band by band: for an output band [a, b) it derives, layer by layer backwards,
the input rows each layer needs (its radius of context on each side, divided by its upscale),
runs the layers forward on that slice and crops each output to the rows the next layer needs.
Rows next to an interior slice edge, where a convolution saw zero padding instead of the
neighbouring rows, are always cropped away, and the true image borders keep their real zero
padding, so every output row is computed from exactly the inputs of the full-frame pass. The
result equals the full-frame decode up to the convolution algorithm's summation order (cuDNN
and oneDNN may pick other algorithms for a smaller input); peak memory becomes the global
prefix's output plus one band's activations. Cost: each band recomputes its halo rows.

The encoder is the mirror image: its local layers come first (stem, ResBlocks, down blocks at
full resolution) and its global ones last, so the longest local *prefix* runs band by band
and the rest on the whole (small) map. A down block's output row y reads input rows
[2y - r, 2y + 2 + r); its input slices start on even rows (the halo is rounded up to whole
row pairs), so pixel_unshuffle and a stride-2 conv pair the rows as on the full map.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .blocks import DownBlock, ResBlock, UpBlock
from .norms import ChannelRMSNorm


@dataclass(frozen=True)
class LocalStep:
    """A layer whose output row y depends only on input rows within ``radius`` of y / scale
    (``scale`` output rows per input row), or, for a layer that halves the map (``down`` = 2),
    on input rows [down * y - radius, down * (y + 1) + radius)."""

    fn: Callable[[torch.Tensor], torch.Tensor]
    radius: int
    scale: int
    down: int = 1


_POINTWISE = (ChannelRMSNorm, nn.Identity, nn.ReLU, nn.SiLU, nn.GELU, nn.Mish)


def _is_conv3x3_same(m: nn.Module) -> bool:
    return (
        isinstance(m, nn.Conv2d)
        and m.kernel_size == (3, 3)
        and m.stride == (1, 1)
        and m.padding == (1, 1)
        and m.dilation == (1, 1)
        and m.padding_mode == "zeros"
    )


def local_step(module: nn.Module) -> LocalStep | None:
    """The band-safe description of ``module``, or None when it is not local (attention, or a
    layer whose locality is unknown)."""
    if isinstance(module, ResBlock):
        if isinstance(module.norm, nn.BatchNorm2d) and module.norm.training:
            return None  # batch statistics span the whole map
        return LocalStep(module, 2, 1)  # two 3x3 convs
    if isinstance(module, UpBlock):
        return LocalStep(module, 1, 2)  # one 3x3 conv (before or after the x2 upscale)
    if isinstance(module, DownBlock):
        return LocalStep(module, 1, 1, down=2)  # one 3x3 conv (stride 1 or 2) at the input
    if _is_conv3x3_same(module):
        return LocalStep(module, 1, 1)
    if isinstance(module, nn.BatchNorm2d) and not module.training:
        return LocalStep(module, 0, 1)  # running statistics: a per-channel affine map
    if isinstance(module, _POINTWISE):
        return LocalStep(module, 0, 1)
    return None


def local_suffix(modules: Sequence[nn.Module]) -> int:
    """Index of the first module of the longest all-local run at the end of ``modules``."""
    k = len(modules)
    while k > 0 and local_step(modules[k - 1]) is not None:
        k -= 1
    return k


def local_prefix(modules: Sequence[nn.Module]) -> int:
    """Length of the longest all-local run at the start of ``modules``."""
    k = 0
    while k < len(modules) and local_step(modules[k]) is not None:
        k += 1
    return k


def band_ranges(steps: Sequence[LocalStep], heights: Sequence[int], a: int, b: int) -> list:
    """Rows [lo, hi) each level needs for output rows [a, b): level 0 is the input of the first
    step, level len(steps) the output. ``heights`` are the full map heights per level."""
    ranges: list[tuple[int, int]] = [(0, 0)] * (len(steps) + 1)
    ranges[-1] = (a, b)
    for i in reversed(range(len(steps))):
        lo, hi = ranges[i + 1]
        s, r, d = steps[i].scale, steps[i].radius, steps[i].down
        if d > 1:  # whole groups of d rows: the slice starts where the full map's groups do
            halo = -(-r // d) * d
            ranges[i] = (max(lo * d - halo, 0), min(hi * d + halo, heights[i]))
        else:
            ranges[i] = (max(lo // s - r, 0), min(-(-hi // s) + r, heights[i]))
    return ranges


def check_band_rows(band_rows: int | None) -> int | None:
    """``band_rows`` itself when it is None or a positive int, else a ValueError."""
    if band_rows is not None and (
        not isinstance(band_rows, int) or isinstance(band_rows, bool) or band_rows < 1
    ):
        raise ValueError(f"band_rows: expected a positive int or None, got {band_rows!r}")
    return band_rows


def run_banded(steps: Sequence[LocalStep], x: torch.Tensor, band_rows: int) -> torch.Tensor:
    """Apply ``steps`` in order to ``x`` (B, C, H, W), ``band_rows`` output rows at a time."""
    if check_band_rows(band_rows) is None:
        raise ValueError("band_rows: expected a positive int, got None")
    heights = [x.shape[2]]
    for st in steps:
        if heights[-1] % st.down:
            raise ValueError(
                f"run_banded: a map of {heights[-1]} rows cannot be divided by {st.down}"
            )
        heights.append(heights[-1] * st.scale // st.down)
    out: torch.Tensor | None = None
    for a in range(0, heights[-1], band_rows):
        b = min(a + band_rows, heights[-1])
        ranges = band_ranges(steps, heights, a, b)
        h = x[:, :, ranges[0][0] : ranges[0][1]]
        for i, st in enumerate(steps):
            h = st.fn(h)
            first = ranges[i][0] * st.scale // st.down  # the full-map row of h's row 0
            lo, hi = ranges[i + 1]
            h = h[:, :, lo - first : hi - first]
        if out is None:
            shape = (h.shape[0], h.shape[1], heights[-1], h.shape[3])
            channels_last = h.dim() == 4 and h.is_contiguous(memory_format=torch.channels_last)
            fmt = torch.channels_last if channels_last else torch.contiguous_format
            out = torch.empty(shape, dtype=h.dtype, device=h.device, memory_format=fmt)
        out[:, :, a:b] = h
        del h  # the band's activations go before the next band's
    assert out is not None
    return out
