"""Channel RMSNorm: RMSNorm over dim 1 of an (N, C, *spatial) tensor, per pixel.

This is DC-AE's norm (weight AND bias, eps 1e-5). Statistics and the affine are computed in
fp32 and the result is rounded once to the input dtype.
"""

from __future__ import annotations

import torch

from ._extension import compiled_op, has_kernel
from ._validate import (
    FLOAT_DTYPES,
    check_channel_param,
    check_same_device,
    check_tensor,
    dense_as,
    dense_layout,
)


def channel_rms_norm_reference(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float = 1e-5,
) -> torch.Tensor:
    """Pure-PyTorch spec: y = x * rsqrt(mean_c(x^2) + eps) * weight + bias, all in fp32."""
    return _normalize_wide(x, weight, bias, eps).to(x.dtype)


def _normalize_wide(
    x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float
) -> torch.Tensor:
    """The normalized, affine-applied ``x`` in fp32 (fp64 for fp64 input), not yet rounded."""
    xf = x.to(torch.promote_types(x.dtype, torch.float32))
    inv = torch.rsqrt(xf.pow(2).mean(dim=1, keepdim=True) + eps)
    y = xf * inv
    view = (1, -1) + (1,) * (x.ndim - 2)
    if weight is not None:
        y = y * weight.to(xf.dtype).view(view)
    if bias is not None:
        y = y + bias.to(xf.dtype).view(view)
    return y


def channel_rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
) -> torch.Tensor:
    """RMSNorm over channels (dim 1) of ``x`` shaped (N, C, *spatial), fp32 statistics.

    Runs the compiled kernel (CPU or CUDA) when dcgen._C has one for ``x.device``, no gradient
    is needed and x is fp32/fp16/bf16; otherwise the reference (which autograd differentiates).
    NCHW-contiguous and channels_last inputs are both handled without a copy.
    """
    check_tensor("channel_rms_norm: x", x, min_ndim=2, dtypes=(*FLOAT_DTYPES, torch.float64))
    channels = x.shape[1]
    check_channel_param("channel_rms_norm: weight", weight, channels)
    check_channel_param("channel_rms_norm: bias", bias, channels)
    check_same_device(x=x, weight=weight, bias=bias)
    if not eps > 0:
        raise ValueError(f"channel_rms_norm: expected eps > 0, got {eps}")
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, weight, bias)
    )
    # float64 (used by gradcheck and numerics studies) stays on the reference.
    use_kernel = not needs_grad and x.dtype in FLOAT_DTYPES and x.numel() > 0
    if use_kernel and has_kernel("channel_rms_norm", x.device):
        return compiled_op("channel_rms_norm")(x, weight, bias, float(eps))
    return channel_rms_norm_reference(x, weight, bias, eps)


NORM_ACTS = ("none", "relu", "silu")


def _apply_act(y: torch.Tensor, act: str) -> torch.Tensor:
    if act == "relu":
        return torch.relu(y)
    if act == "silu":
        return torch.nn.functional.silu(y)
    return y


def _check_act(act: object) -> str:
    if act not in NORM_ACTS:
        raise ValueError(f"channel_rms_norm_fused: expected act in {NORM_ACTS}, got {act!r}")
    return str(act)


def channel_rms_norm_fused_reference(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float = 1e-5,
    act: str = "none",
    residual: torch.Tensor | None = None,
) -> torch.Tensor:
    """Pure-PyTorch spec: act(channel RMSNorm(x)) + residual, all in fp32, rounded once."""
    act = _check_act(act)
    y = _apply_act(_normalize_wide(x, weight, bias, eps), act)
    if residual is not None:
        y = y + residual.to(y.dtype)
    return y.to(x.dtype)


def channel_rms_norm_fused(
    x: torch.Tensor,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
    act: str = "none",
    residual: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``act(channel_rms_norm(x, weight, bias, eps)) + residual`` in one pass, one rounding.

    ``act`` is "none", "relu" or "silu"; ``residual`` (optional) has x's shape and dtype. The
    DC-AE blocks use it as norm + residual (ResBlock, LiteMLA, GLUMBConv: x + norm(...)) and as
    norm + act (the decoder's head). Dispatch as :func:`channel_rms_norm`; the output follows
    x's layout (channels_last stays channels_last).

    ``out`` (optional, x's shape and dtype; may be x itself or the residual): the result is
    written there and ``out`` returned. Where x is dense and ``out`` has its strides, the kernel
    writes it directly (``dcgen::channel_rms_norm_fused_out``: every element is read, then
    written, by the same thread, after the statistics); otherwise the result is copied in.
    """
    check_tensor("channel_rms_norm_fused: x", x, min_ndim=2, dtypes=(*FLOAT_DTYPES, torch.float64))
    channels = x.shape[1]
    check_channel_param("channel_rms_norm_fused: weight", weight, channels)
    check_channel_param("channel_rms_norm_fused: bias", bias, channels)
    act = _check_act(act)
    for name, t in (("residual", residual), ("out", out)):
        if t is None:
            continue
        check_tensor(f"channel_rms_norm_fused: {name}", t, dtypes=(x.dtype,))
        if t.shape != x.shape:
            raise ValueError(
                f"channel_rms_norm_fused: expected {name} of x's shape {tuple(x.shape)}, "
                f"got {tuple(t.shape)}"
            )
    check_same_device(x=x, weight=weight, bias=bias, residual=residual, out=out)
    if not eps > 0:
        raise ValueError(f"channel_rms_norm_fused: expected eps > 0, got {eps}")
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, weight, bias, residual, out)
    )
    use_kernel = not needs_grad and x.dtype in FLOAT_DTYPES and x.numel() > 0
    if out is not None:
        if (
            use_kernel
            and _writes_in_place(out, x)
            and has_kernel("channel_rms_norm_fused_out", x.device)
        ):
            compiled_op("channel_rms_norm_fused_out")(
                x, weight, bias, residual, act, float(eps), out
            )
            return out
        result = channel_rms_norm_fused(x, weight, bias, eps, act, residual)
        return out.copy_(result)
    if use_kernel and has_kernel("channel_rms_norm_fused", x.device):
        return compiled_op("channel_rms_norm_fused")(x, weight, bias, residual, act, float(eps))
    return channel_rms_norm_fused_reference(x, weight, bias, eps, act, residual)


def _writes_in_place(out: torch.Tensor, x: torch.Tensor) -> bool:
    """Whether the out kernel takes ``out`` for ``x``: x dense (channels_last for a 4-d x that
    is not NCHW-contiguous, as the kernels choose) and out laid out as x (the kernels' check)."""
    return dense_layout(x) and dense_as(out, x)
