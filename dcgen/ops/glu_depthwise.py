"""GLUMBConv's middle: depthwise 3x3 conv then the SiLU gate, in one op.

Input x is (B, 2*Ch, H, W) (the inverted 1x1 conv's output after its SiLU). Spec, in fp32:

    t = conv2d(x, weight, bias, padding=1, groups=2*Ch)     weight (2*Ch, 1, 3, 3)
    a, gate = t[:, :Ch], t[:, Ch:]
    out = a * SiLU(gate)                                     (B, Ch, H, W), rounded once

The 2*Ch-channel conv output is never written to memory by the kernel.

``expand_bias`` (optional, 2*Ch values): x is then the expand 1x1 conv's output *without* its
bias, and the depthwise input is silu(x + expand_bias), computed in fp32 and rounded to x's
dtype: what a separate bias + SiLU pass (bias_act_ "silu") would have stored, so the result is
the same, without that pass's read and write of the 2*Ch-channel map.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._extension import compiled_op, has_kernel
from ._validate import FLOAT_DTYPES, check_same_device, check_tensor

_DTYPES = (*FLOAT_DTYPES, torch.float64)


def _check(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    expand_bias: torch.Tensor | None = None,
) -> None:
    check_tensor("glu_depthwise_conv: x", x, ndim=4, dtypes=_DTYPES)
    c2 = x.shape[1]
    if c2 % 2:
        raise ValueError(
            f"glu_depthwise_conv: expected an even channel count (value and gate halves), got {c2}"
        )
    check_tensor("glu_depthwise_conv: weight", weight, ndim=4, dtypes=_DTYPES)
    if tuple(weight.shape) != (c2, 1, 3, 3):
        raise ValueError(
            f"glu_depthwise_conv: expected weight of shape ({c2}, 1, 3, 3), "
            f"got {tuple(weight.shape)}"
        )
    for name, b in (("bias", bias), ("expand_bias", expand_bias)):
        if b is None:
            continue
        check_tensor(f"glu_depthwise_conv: {name}", b, ndim=1, dtypes=_DTYPES)
        if b.shape[0] != c2:
            raise ValueError(
                f"glu_depthwise_conv: expected {name} of shape ({c2},), got {tuple(b.shape)}"
            )
    check_same_device(x=x, weight=weight, bias=bias, expand_bias=expand_bias)


def glu_depthwise_conv_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    expand_bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Pure-PyTorch spec (fp32 math, or fp64 for fp64 input; one rounding to x's dtype, after
    the expand bias + SiLU's own rounding)."""
    _check(x, weight, bias, expand_bias)
    dt = torch.promote_types(x.dtype, torch.float32)
    if expand_bias is not None:
        x = F.silu(x.to(dt) + expand_bias.to(dt).view(1, -1, 1, 1)).to(x.dtype)
    b = None if bias is None else bias.to(dt)
    t = F.conv2d(x.to(dt), weight.to(dt), b, padding=1, groups=x.shape[1])
    a, gate = t.chunk(2, dim=1)
    return (a * F.silu(gate)).to(x.dtype)


def glu_depthwise_conv(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    expand_bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Depthwise 3x3 (padding 1) of x (B, 2*Ch, H, W), then first half * SiLU(second half);
    with ``expand_bias``, of silu(x + expand_bias) (module doc).

    The CUDA kernel runs when built, x is on a GPU and no gradient is needed; otherwise the
    reference. The output is channels_last when x is, else NCHW-contiguous.
    """
    _check(x, weight, bias, expand_bias)
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, weight, bias, expand_bias)
    )
    use_kernel = not needs_grad and x.dtype in FLOAT_DTYPES and x.numel() > 0
    if use_kernel and has_kernel("glu_depthwise_conv", x.device):
        return compiled_op("glu_depthwise_conv")(x, weight, bias, expand_bias)
    return glu_depthwise_conv_reference(x, weight, bias, expand_bias)
