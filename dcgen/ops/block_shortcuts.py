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

The up block's op also takes the main-path conv's ``bias`` (one value per y channel, added to y
before the shuffle, in the same fp32 sum) and an ``out`` to write into: the fused decoder runs
its up-block convolutions without their bias and writes each row band straight into the full
output map, so neither a bias pass over y nor a copy of each band is needed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._extension import compiled_op, has_kernel
from ._validate import FLOAT_DTYPES, check_same_device, check_tensor, dense_as, kernel_layout
from .shortcuts import channel_duplicate_to_space, space_to_channel_average, unshuffle

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


def _check_up_bias(y: torch.Tensor, bias: torch.Tensor | None) -> None:
    if bias is None:
        return
    check_tensor("up_block_shortcut: bias", bias, ndim=1, dtypes=(y.dtype,))
    if bias.shape[0] != y.shape[1]:
        raise ValueError(
            f"up_block_shortcut: expected a bias of y's {y.shape[1]} channels, got "
            f"{tuple(bias.shape)}"
        )


def _check_up_out(y: torch.Tensor, x: torch.Tensor, cout: int, out: torch.Tensor) -> None:
    check_tensor("up_block_shortcut: out", out, ndim=4, dtypes=(y.dtype,))
    shape = (y.shape[0], cout, 2 * x.shape[2], 2 * x.shape[3])
    if tuple(out.shape) != shape:
        raise ValueError(
            f"up_block_shortcut: expected out of shape {shape}, got {tuple(out.shape)}"
        )


def up_block_shortcut_reference(
    y: torch.Tensor, x: torch.Tensor, shuffle_y: bool = True, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """Pure-PyTorch spec of :func:`up_block_shortcut`: (y + bias) + shortcut in fp32, rounded
    once."""
    cout = _up_out_channels(y, x, shuffle_y)
    _check_up_bias(y, bias)
    dt = _math_dtype(y)
    main = y.to(dt)
    if bias is not None:
        main = main + bias.to(dt).view(1, -1, 1, 1)
    if shuffle_y:
        main = F.pixel_shuffle(main, 2)
    return (main + channel_duplicate_to_space(x.to(dt), cout, 2)).to(y.dtype)


def down_block_shortcut_reference(
    y: torch.Tensor, x: torch.Tensor, unshuffle_y: bool = True
) -> torch.Tensor:
    """Pure-PyTorch spec of :func:`down_block_shortcut` (mean and sum in fp32, one rounding)."""
    cout = _down_out_channels(y, x, unshuffle_y)
    dt = _math_dtype(y)
    main = unshuffle(y, 2) if unshuffle_y else y
    return (main.to(dt) + space_to_channel_average(x.to(dt), cout, 2)).to(y.dtype)


def _use_kernel(name: str, y: torch.Tensor, x: torch.Tensor, *more: torch.Tensor | None) -> bool:
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (y, x, *more)
    )
    return (
        not needs_grad
        and y.dtype in FLOAT_DTYPES
        and y.numel() > 0
        and x.numel() > 0
        and has_kernel(name, y.device)
    )


def up_block_shortcut(
    y: torch.Tensor,
    x: torch.Tensor,
    shuffle_y: bool = True,
    bias: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Up block output: (pixel_shuffle(y + bias, 2) if shuffle_y else y + bias) + the
    channel-duplicating depth-to-space shortcut of x, shape (B, Cout, 2H, 2W), in y's dtype.

    ``bias`` (optional): the main-path conv's bias, one value per channel of y, in y's dtype.
    ``out`` (optional, the output's shape and y's dtype): the result is written there and
    ``out`` returned. Where ``out`` is laid out as the kernel's own output would be (a row band
    of a larger channels_last map qualifies) and shares no memory with y or x, the kernel
    writes it directly (``dcgen::up_block_shortcut_out``); otherwise the result is copied in.

    The CUDA kernel runs when built, the tensors are on a GPU and no gradient is needed;
    otherwise the reference. The output is channels_last when y is, else NCHW-contiguous.
    """
    cout = _up_out_channels(y, x, shuffle_y)
    _check_up_bias(y, bias)
    if out is not None:
        _check_up_out(y, x, cout, out)
    check_same_device(y=y, x=x, bias=bias, out=out)
    shuffle_y = bool(shuffle_y)
    if bias is None and out is None:
        if _use_kernel("up_block_shortcut", y, x):
            return compiled_op("up_block_shortcut")(y, x, shuffle_y)
    elif _use_kernel("up_block_shortcut_out", y, x, bias, out):
        target = out
        if out is None or not _kernel_writes(out, y, x):
            shape = (y.shape[0], cout, 2 * x.shape[2], 2 * x.shape[3])
            fmt = kernel_layout(y)
            target = torch.empty(shape, dtype=y.dtype, device=y.device, memory_format=fmt)
        compiled_op("up_block_shortcut_out")(y, x, shuffle_y, bias, target)
        return target if out is None or target is out else out.copy_(target)
    result = up_block_shortcut_reference(y, x, shuffle_y, bias)
    return result if out is None else out.copy_(result)


def _kernel_writes(out: torch.Tensor, y: torch.Tensor, x: torch.Tensor) -> bool:
    """Whether the out kernel takes ``out`` as it is: dense in the kernel's own output layout
    (sizes-1 dimensions aside), element-aligned for the NCHW kernel's paired stores, and in
    memory of its own (the kernel reads y and x while writing out)."""
    fmt = kernel_layout(y)
    like = torch.empty(out.shape, dtype=out.dtype, device="meta", memory_format=fmt)
    if not dense_as(out, like):
        return False
    if fmt == torch.contiguous_format and out.data_ptr() % (2 * out.element_size()):
        return False
    shared = out.untyped_storage().data_ptr()
    return all(t.untyped_storage().data_ptr() != shared for t in (y, x))


def down_block_shortcut(y: torch.Tensor, x: torch.Tensor, unshuffle_y: bool = True) -> torch.Tensor:
    """Down block output: (pixel_unshuffle(y, 2) if unshuffle_y else y) + the space-to-channel
    averaging shortcut of x, shape (B, Cout, H/2, W/2), in y's dtype.

    Dispatch and output layout as :func:`up_block_shortcut`.
    """
    _down_out_channels(y, x, unshuffle_y)
    if _use_kernel("down_block_shortcut", y, x):
        return compiled_op("down_block_shortcut")(y, x, bool(unshuffle_y))
    return down_block_shortcut_reference(y, x, unshuffle_y)
