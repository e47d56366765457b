"""DC-AE's residual-autoencoding shortcuts (non-parametric, docs/method.md section 3).

Down: space-to-channel (pixel_unshuffle by the factor) then average groups of channels.
Up: duplicate channels (repeat_interleave) then depth-to-space (pixel_shuffle).
These are the training path and the spec; dcgen.ops.block_shortcuts fuses them with the main
path for inference.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._validate import FLOAT_DTYPES, check_tensor

# Pure reshapes and means: any float width works, fp64 included (the fused ops' gradchecks).
_DTYPES = (*FLOAT_DTYPES, torch.float64)


def _check_sizes(op: str, x: torch.Tensor, out_channels: int, factor: int) -> None:
    for name, value in (("out_channels", out_channels), ("factor", factor)):
        if isinstance(value, bool) or not isinstance(value, int | torch.SymInt) or value < 1:
            raise ValueError(f"{op}: expected {name} a positive int, got {value!r}")
    if x.shape[1] < 1:
        raise ValueError(f"{op}: expected x with at least one channel, got shape {tuple(x.shape)}")


def unshuffle(x: torch.Tensor, factor: int) -> torch.Tensor:
    """pixel_unshuffle, also for an empty x (torch returns an empty input unchanged)."""
    if x.numel():
        return F.pixel_unshuffle(x, factor)
    n, c, h, w = x.shape
    return x.new_empty((n, c * factor * factor, h // factor, w // factor))


def space_to_channel_average(x: torch.Tensor, out_channels: int, factor: int = 2) -> torch.Tensor:
    """(N, C, H, W) -> (N, out_channels, H/f, W/f): pixel_unshuffle(f), then mean over groups
    of C*f*f/out_channels consecutive channels. factor=1 is pure channel averaging."""
    check_tensor("space_to_channel_average: x", x, ndim=4, dtypes=_DTYPES)
    _check_sizes("space_to_channel_average", x, out_channels, factor)
    n, c, h, w = x.shape
    if h % factor or w % factor:
        raise ValueError(
            f"space_to_channel_average: spatial size must be divisible by {factor}, got {h}x{w}"
        )
    if factor > 1:
        x = unshuffle(x, factor)
    c_in = c * factor * factor
    if c_in % out_channels:
        raise ValueError(
            f"space_to_channel_average: {c_in} channels after space-to-channel are not a "
            f"multiple of out_channels={out_channels}"
        )
    group = c_in // out_channels
    if group == 1:
        return x
    return x.unflatten(1, (out_channels, group)).mean(dim=2)


def channel_duplicate_to_space(x: torch.Tensor, out_channels: int, factor: int = 2) -> torch.Tensor:
    """(N, C, H, W) -> (N, out_channels, H*f, W*f): repeat each channel
    out_channels*f*f/C times (adjacent copies), then pixel_shuffle(f). factor=1 is pure
    channel duplication."""
    check_tensor("channel_duplicate_to_space: x", x, ndim=4, dtypes=_DTYPES)
    _check_sizes("channel_duplicate_to_space", x, out_channels, factor)
    c = x.shape[1]
    c_out = out_channels * factor * factor
    if c_out % c:
        raise ValueError(
            f"channel_duplicate_to_space: out_channels*{factor}^2={c_out} is not a multiple of "
            f"the input's {c} channels"
        )
    repeats = c_out // c
    if repeats > 1:
        x = x.repeat_interleave(repeats, dim=1)
    return F.pixel_shuffle(x, factor) if factor > 1 else x
