"""DC-AE up/down blocks' main path + residual-autoencoding shortcut, added in one pass.

Up block (factor 2), y the main-path conv output, x the block input (Cin channels):

    out = pixel_shuffle(y, 2) + pixel_shuffle(repeat_interleave(x, 4*Cout/Cin, dim=1), 2)
    y: (B, 4*Cout, H, W) with ``shuffle_y`` (DC-AE's ``pixel_shuffle`` up blocks), or
       (B, Cout, 2H, 2W) already at output size (``interpolate`` up blocks: conv(nearest(x)))

Down block (factor 2):

    out = pixel_unshuffle(y, 2) + mean over groups of 4*Cin/Cout consecutive channels of
          pixel_unshuffle(x, 2)
    y: (B, Cout/4, H, W) with ``unshuffle_y`` (``pixel_unshuffle`` down blocks), or
       (B, Cout, H/2, W/2) already at output size (stride-2 ``conv`` down blocks)

The channel orders are those of dcgen.ops.shortcuts (= diffusers' AutoencoderDC). The sum (and
the channel mean) runs in fp32 and is rounded once to y's dtype; the shortcut tensor is never
materialised by the kernel.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._extension import compiled_op, has_kernel
from ._validate import FLOAT_DTYPES, check_same_device, check_tensor
from .shortcuts import channel_duplicate_to_space, space_to_channel_average

_DTYPES = (*FLOAT_DTYPES, torch.float64)


def _math_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.promote_types(t.dtype, torch.float32)  # fp32, or fp64 for fp64 input


def _check_pair(name: str, y: torch.Tensor, x: torch.Tensor) -> None:
    check_tensor(f"{name}: y", y, ndim=4, dtypes=_DTYPES)
    check_tensor(f"{name}: x", x, ndim=4, dtypes=_DTYPES)
    check_same_device(y=y, x=x)
    if x.dtype != y.dtype:
        raise TypeError(f"{name}: expected x and y of one dtype, got x {x.dtype}, y {y.dtype}")
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"{name}: expected one batch size, got x {x.shape[0]}, y {y.shape[0]}")


def _up_out_channels(y: torch.Tensor, x: torch.Tensor, shuffle_y: bool) -> int:
    """Validate shapes and return Cout."""
    _check_pair("up_block_shortcut", y, x)
    _, cin, h, w = x.shape
    if shuffle_y:
        if y.shape[1] % 4 or tuple(y.shape[2:]) != (h, w):
            raise ValueError(
                "up_block_shortcut: with shuffle_y expected y of shape (B, 4*Cout, H, W) with "
                f"x's H, W = {h}, {w}, got {tuple(y.shape)}"
            )
        cout = y.shape[1] // 4
    else:
        if tuple(y.shape[2:]) != (2 * h, 2 * w):
            raise ValueError(
                f"up_block_shortcut: without shuffle_y expected y of spatial size {2 * h}x{2 * w} "
                f"(twice x's), got {tuple(y.shape)}"
            )
        cout = y.shape[1]
    if cin == 0 or (4 * cout) % cin:
        raise ValueError(
            f"up_block_shortcut: 4*Cout={4 * cout} is not a multiple of x's {cin} channels"
        )
    return cout


def _down_out_channels(y: torch.Tensor, x: torch.Tensor, unshuffle_y: bool) -> int:
    _check_pair("down_block_shortcut", y, x)
    _, cin, h, w = x.shape
    if h % 2 or w % 2:
        raise ValueError(f"down_block_shortcut: x's spatial size must be even, got {h}x{w}")
    if unshuffle_y:
        if tuple(y.shape[2:]) != (h, w):
            raise ValueError(
                "down_block_shortcut: with unshuffle_y expected y of shape (B, Cout/4, H, W) "
                f"with x's H, W = {h}, {w}, got {tuple(y.shape)}"
            )
        cout = 4 * y.shape[1]
    else:
        if tuple(y.shape[2:]) != (h // 2, w // 2):
            raise ValueError(
                f"down_block_shortcut: without unshuffle_y expected y of spatial size "
                f"{h // 2}x{w // 2} (half x's), got {tuple(y.shape)}"
            )
        cout = y.shape[1]
    if cout == 0 or (4 * cin) % cout:
        raise ValueError(
            f"down_block_shortcut: x's 4*Cin={4 * cin} channels after space-to-channel are not "
            f"a multiple of Cout={cout}"
        )
    return cout


def up_block_shortcut_reference(y: torch.Tensor, x: torch.Tensor, shuffle_y: bool = True):
    """Pure-PyTorch spec of :func:`up_block_shortcut` (sum in fp32, one rounding)."""
    cout = _up_out_channels(y, x, shuffle_y)
    dt = _math_dtype(y)
    main = F.pixel_shuffle(y, 2) if shuffle_y else y
    return (main.to(dt) + channel_duplicate_to_space(x.to(dt), cout, 2)).to(y.dtype)


def down_block_shortcut_reference(y: torch.Tensor, x: torch.Tensor, unshuffle_y: bool = True):
    """Pure-PyTorch spec of :func:`down_block_shortcut` (mean and sum in fp32, one rounding)."""
    cout = _down_out_channels(y, x, unshuffle_y)
    dt = _math_dtype(y)
    main = F.pixel_unshuffle(y, 2) if unshuffle_y else y
    return (main.to(dt) + space_to_channel_average(x.to(dt), cout, 2)).to(y.dtype)


def _use_kernel(name: str, y: torch.Tensor, x: torch.Tensor) -> bool:
    needs_grad = torch.is_grad_enabled() and (y.requires_grad or x.requires_grad)
    return (
        not needs_grad
        and y.dtype in FLOAT_DTYPES
        and y.numel() > 0
        and x.numel() > 0
        and has_kernel(name, y.device)
    )


def up_block_shortcut(y: torch.Tensor, x: torch.Tensor, shuffle_y: bool = True) -> torch.Tensor:
    """Up block output: (pixel_shuffle(y, 2) if shuffle_y else y) + the channel-duplicating
    depth-to-space shortcut of x, shape (B, Cout, 2H, 2W), in y's dtype.

    The CUDA kernel runs when built, the tensors are on a GPU and no gradient is needed;
    otherwise the reference. The output is channels_last when y is, else NCHW-contiguous.
    """
    _up_out_channels(y, x, shuffle_y)
    if _use_kernel("up_block_shortcut", y, x):
        return compiled_op("up_block_shortcut")(y, x, bool(shuffle_y))
    return up_block_shortcut_reference(y, x, shuffle_y)


def down_block_shortcut(y: torch.Tensor, x: torch.Tensor, unshuffle_y: bool = True) -> torch.Tensor:
    """Down block output: (pixel_unshuffle(y, 2) if unshuffle_y else y) + the space-to-channel
    averaging shortcut of x, shape (B, Cout, H/2, W/2), in y's dtype.

    Dispatch and output layout as :func:`up_block_shortcut`.
    """
    _down_out_channels(y, x, unshuffle_y)
    if _use_kernel("down_block_shortcut", y, x):
        return compiled_op("down_block_shortcut")(y, x, bool(unshuffle_y))
    return down_block_shortcut_reference(y, x, unshuffle_y)
