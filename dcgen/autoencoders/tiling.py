"""Tiled application of the encoder or decoder with linear blending of overlapping tiles.

Tiles are laid out on the latent grid (so encoder tiles always start at a multiple of the
compression factor), run one at a time, and accumulated into the full-size output with weights
that ramp linearly across each overlap; dividing by the accumulated weight makes the blend a
partition of unity. Peak memory is one tile's activations plus the output and a weight map.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def tile_starts(size: int, tile: int, stride: int) -> list[int]:
    """Start offsets covering [0, size) with tiles of ``tile`` (the last one flush with the
    end, so every tile is full size whenever size >= tile)."""
    if size <= tile:
        return [0]
    starts = list(range(0, size - tile, stride))
    starts.append(size - tile)
    return starts


def _axis_weights(starts: list[int], tile: int, size: int, scale: int) -> list[torch.Tensor]:
    """Per tile, a 1-D blend weight in output units (latent units * scale)."""
    weights = []
    for idx, s in enumerate(starts):
        e = min(s + tile, size)
        w = torch.ones((e - s) * scale, dtype=torch.float32)
        if idx > 0:
            ramp = (starts[idx - 1] + tile - s) * scale  # overlap with the previous tile
            if ramp > 0:
                up = torch.arange(1, ramp + 1, dtype=torch.float32) / (ramp + 1)
                w[:ramp] = torch.minimum(w[:ramp], up)
        if idx + 1 < len(starts):
            ramp = (e - starts[idx + 1]) * scale  # overlap with the next tile
            if ramp > 0:
                down = torch.arange(ramp, 0, -1, dtype=torch.float32) / (ramp + 1)
                w[-ramp:] = torch.minimum(w[-ramp:], down)
        weights.append(w)
    return weights


def tiled_apply(
    fn: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    grid_hw: tuple[int, int],
    tile: int,
    overlap: int,
    in_scale: int,
    out_scale: int,
) -> torch.Tensor:
    """Run ``fn`` on overlapping tiles of ``x`` and blend.

    grid_hw: the latent grid size; tile / overlap: in latent units; in_scale / out_scale: how
    many input / output pixels one latent pixel spans (encode: f, 1; decode: 1, f).
    """
    gh, gw = grid_hw
    stride = max(1, tile - overlap)
    rows, cols = tile_starts(gh, tile, stride), tile_starts(gw, tile, stride)
    wy = _axis_weights(rows, tile, gh, out_scale)
    wx = _axis_weights(cols, tile, gw, out_scale)
    out: torch.Tensor | None = None
    total = torch.zeros(gh * out_scale, gw * out_scale, dtype=torch.float32, device=x.device)
    for r, sy in enumerate(rows):
        for c, sx in enumerate(cols):
            ey, ex = min(sy + tile, gh), min(sx + tile, gw)
            piece = x[..., sy * in_scale : ey * in_scale, sx * in_scale : ex * in_scale]
            y = fn(piece)
            if out is None:
                out = torch.zeros(
                    y.shape[0], y.shape[1], gh * out_scale, gw * out_scale,
                    dtype=torch.float32, device=y.device,
                )  # fmt: skip
            w = (wy[r][:, None] * wx[c][None, :]).to(y.device)
            oy, ox = slice(sy * out_scale, ey * out_scale), slice(sx * out_scale, ex * out_scale)
            out[..., oy, ox] += y.float() * w
            total[oy, ox] += w
            del y  # free the tile's output before the next tile runs
    assert out is not None
    return (out / total).to(x.dtype)
