"""A convolution's bias, activation and residual in one pass over its output:

    out = act(x + bias[c]) (+ residual)       x: (N, C, H, W), act: "none" | "relu" | "silu"

in fp32, rounded once to x's dtype, written into ``out`` (which may be ``x`` itself or the
residual). The DC-AE blocks run their convolutions without the bias and call this instead of
PyTorch's own bias add (a broadcast add that never vectorizes: 82 of the f64c128 4K decode's
392 ms on the H200 run of 2026-11-27), a separate activation pass and the residual add.

The CUDA kernel runs when built, the tensors are on a GPU, no gradient is needed and x, out and
the residual are dense in one layout (channels_last or NCHW); otherwise the reference.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._extension import compiled_op, has_kernel
from ._validate import FLOAT_DTYPES, check_same_device, check_tensor, dense_as, dense_layout

ACTS = ("none", "relu", "silu")


def _check(out: torch.Tensor, x: torch.Tensor, bias: torch.Tensor, act: str, residual) -> None:  # noqa: ANN001
    check_tensor("bias_act_: x", x, ndim=4)
    check_tensor("bias_act_: out", out, ndim=4)
    check_tensor("bias_act_: bias", bias, ndim=1)
    tensors = {"out": out, "x": x, "bias": bias}
    if residual is not None:
        check_tensor("bias_act_: residual", residual, ndim=4)
        tensors["residual"] = residual
    check_same_device(**tensors)
    if act not in ACTS:
        raise ValueError(f"bias_act_: expected act in {ACTS}, got {act!r}")
    for name, t in tensors.items():
        if t.dtype != x.dtype:
            raise TypeError(f"bias_act_: expected {name} of x's dtype {x.dtype}, got {t.dtype}")
    if bias.shape[0] != x.shape[1]:
        raise ValueError(
            f"bias_act_: expected a bias of x's {x.shape[1]} channels, got {tuple(bias.shape)}"
        )
    for name, t in (("out", out), ("residual", residual)):
        if t is not None and t.shape != x.shape:
            raise ValueError(
                f"bias_act_: expected {name} of x's shape {tuple(x.shape)}, got {tuple(t.shape)}"
            )


def bias_act_reference(
    x: torch.Tensor, bias: torch.Tensor, act: str = "none", residual: torch.Tensor | None = None
) -> torch.Tensor:
    """Pure-PyTorch spec: act(x + bias) (+ residual) in fp32, one rounding to x's dtype."""
    _check(x, x, bias, act, residual)
    v = x.float() + bias.float().view(1, -1, 1, 1)
    if act == "relu":
        v = F.relu(v)
    elif act == "silu":
        v = F.silu(v)
    if residual is not None:
        v = v + residual.float()
    return v.to(x.dtype)


def kernel_takes(
    out: torch.Tensor, x: torch.Tensor, bias: torch.Tensor, residual: torch.Tensor | None
) -> bool:
    """Whether :func:`bias_act_` runs the CUDA kernel for these tensors (no checks)."""
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (out, x, bias, residual)
    )
    return (
        not needs_grad
        and x.is_cuda
        and x.dtype in FLOAT_DTYPES
        and bias.is_contiguous()
        and dense_layout(x)
        and dense_as(out, x)
        and (residual is None or dense_as(residual, x))
        and has_kernel("bias_act_", x.device)
    )


def bias_act_(
    out: torch.Tensor,
    x: torch.Tensor,
    bias: torch.Tensor,
    act: str = "none",
    residual: torch.Tensor | None = None,
) -> torch.Tensor:
    """``out[...] = act(x + bias[c]) (+ residual)``; returns ``out``. ``out`` may be ``x`` or
    ``residual`` (module doc: when the kernel runs)."""
    _check(out, x, bias, act, residual)
    if kernel_takes(out, x, bias, residual):
        compiled_op("bias_act_")(out, x, bias, act, residual)
        return out
    return out.copy_(bias_act_reference(x, bias, act, residual))
