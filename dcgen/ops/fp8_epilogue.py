"""The FP8 GEMM's scale epilogue: ``act(y * row_scale * col_scale + bias)`` in one pass.

On Hopper, cuBLAS's per-tensor FP8 GEMM runs near 1,360 TFLOP/s at the FLUX shapes, while
``torch._scaled_mm`` with per-row scales reached about 770 in dcgen's FP8 linears (H200,
docs/baselines.md and docs/benchmark-log.md). :func:`dcgen.quant.fp8.fp8_gemm` can
therefore run the GEMM with unit scales into the 16-bit output and apply the per-token and
per-channel decode scales here, with the bias and, for the MLP's first linear, the tanh GELU.
The price is one more read and write of the output and a second rounding: the product is
rounded to 16 bits before it is scaled (relative 2^-9 in bf16, far below the FP8 operands' own
rounding of about 2^-4).

The spec, per element in fp32: ``o = (float(y) * rs[m]) * cs[n]``, ``o = o + float(bias[n])``,
``o = gelu_tanh(o)`` when asked, then one rounding to y's dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import _quant_fake  # noqa: F401  (its fake impl, so torch.compile traces the op)
from ._extension import compiled_op, has_kernel, inductor_fuses_instead
from ._validate import check_same_device, check_tensor
from .quantize_fp8 import quantize_fp8_reference

ACTIVATIONS = ("none", "gelu_tanh")
_DTYPES = (torch.bfloat16, torch.float16)


def _check(
    y: torch.Tensor,
    row_scale: torch.Tensor,
    col_scale: torch.Tensor,
    bias: torch.Tensor | None,
    act: str,
) -> None:
    check_tensor("fp8_scale_epilogue: y", y, ndim=2, dtypes=_DTYPES)
    m, n = y.shape
    for name, t, count in (("row_scale", row_scale, m), ("col_scale", col_scale, n)):
        check_tensor(f"fp8_scale_epilogue: {name}", t, dtypes=(torch.float32,))
        if t.numel() != count:
            raise ValueError(
                f"fp8_scale_epilogue: expected {name} with {count} elements for y of shape "
                f"{tuple(y.shape)}, got shape {tuple(t.shape)}"
            )
    if bias is not None:
        check_tensor("fp8_scale_epilogue: bias", bias)
        if not bias.is_floating_point() or bias.numel() != n:
            raise ValueError(
                f"fp8_scale_epilogue: expected a floating bias of {n} elements, got "
                f"{bias.dtype} of shape {tuple(bias.shape)}"
            )
    if act not in ACTIVATIONS:
        raise ValueError(f"fp8_scale_epilogue: expected act in {ACTIVATIONS}, got {act!r}")
    check_same_device(y=y, row_scale=row_scale, col_scale=col_scale, bias=bias)


def _kernel_args(
    y: torch.Tensor, row_scale: torch.Tensor, col_scale: torch.Tensor, bias: torch.Tensor | None
) -> tuple:
    """The kernels' (y, row_scale, col_scale, bias): contiguous, the bias in fp32 unless it is
    y's dtype (the kernels read fp32 or y's dtype; exact for 16-bit values)."""
    if bias is not None and bias.dtype not in (torch.float32, y.dtype):
        bias = bias.float()
    return y.contiguous(), row_scale.contiguous(), col_scale.contiguous(), bias


def _takes_kernel(
    op: str, y: torch.Tensor, *params: torch.Tensor | None, traced: bool | None = None
) -> bool:
    """Whether an epilogue form runs its kernel: no gradient needed, something to do, built for
    y's device, and not ``traced`` (default: while torch.compile traces at all; the plain form
    passes :func:`inductor_fuses_instead`, since it keeps its op under
    ``DCGEN_COMPILE_OPS=kernels``)."""
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (y, *params)):
        return False
    if traced is None:
        traced = torch.compiler.is_compiling()
    return y.numel() > 0 and has_kernel(op, y.device) and not traced


def kernel_rows(out: torch.Tensor, n: int) -> torch.Tensor | None:
    """``out`` ([..., N]) as the [M, N] view ``dcgen::fp8_scale_epilogue_into`` writes: unit
    column stride and rows that do not overlap; None where it is not one such view (rows of
    several row blocks, a transposed buffer), which the callers copy into instead."""
    try:
        rows = out.view(-1, n)
    except RuntimeError:
        return None
    if rows.stride(1) == 1 and (rows.shape[0] <= 1 or rows.stride(0) >= rows.shape[1]):
        return rows
    return None


def fp8_scale_epilogue_reference(
    y: torch.Tensor,
    row_scale: torch.Tensor,
    col_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    act: str = "none",
) -> torch.Tensor:
    """Pure-PyTorch spec (module doc); returns y's shape and dtype."""
    o = y.float() * row_scale.reshape(-1, 1).float()
    o = o * col_scale.reshape(1, -1).float()
    if bias is not None:
        o = o + bias.reshape(1, -1).float()
    if act == "gelu_tanh":
        o = F.gelu(o, approximate="tanh")
    return o.to(y.dtype)


def fp8_scale_epilogue(
    y: torch.Tensor,
    row_scale: torch.Tensor,
    col_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    act: str = "none",
) -> torch.Tensor:
    """``act(y * row_scale[:, None] * col_scale[None, :] + bias)`` rounded once to y's dtype.

    y: bf16 / fp16 [M, N]; row_scale: fp32 with M elements ([M] or [M, 1]); col_scale: fp32
    with N elements; bias: N floats or None; act: "none" or "gelu_tanh". The CUDA kernel runs
    when built for y's device and nothing needs a gradient; otherwise, and under torch.compile
    (``inductor_fuses_instead``: Inductor fuses the reference into its neighbours), the
    reference.
    """
    _check(y, row_scale, col_scale, bias, act)
    traced = inductor_fuses_instead()
    if _takes_kernel("fp8_scale_epilogue", y, row_scale, col_scale, bias, traced=traced):
        return compiled_op("fp8_scale_epilogue")(*_kernel_args(y, row_scale, col_scale, bias), act)
    return fp8_scale_epilogue_reference(y, row_scale, col_scale, bias, act)


def fp8_scale_epilogue_into(
    y: torch.Tensor,
    row_scale: torch.Tensor,
    col_scale: torch.Tensor,
    bias: torch.Tensor | None,
    act: str,
    out: torch.Tensor,
) -> None:
    """:func:`fp8_scale_epilogue` written into ``out`` (inference): an [M, N] view of y's
    dtype with unit column stride and any row stride (a column block of a wider buffer, rows of
    a longer one), so the result lands where the next op reads it. The CUDA kernel writes it
    there directly when built (``dcgen::fp8_scale_epilogue_into``); otherwise the result is
    copied in."""
    _check(y, row_scale, col_scale, bias, act)
    check_tensor("fp8_scale_epilogue_into: out", out, ndim=2, dtypes=(y.dtype,))
    if tuple(out.shape) != tuple(y.shape) or out.device != y.device:
        raise ValueError(
            f"fp8_scale_epilogue_into: expected out of y's shape {tuple(y.shape)} on "
            f"{y.device}, got {tuple(out.shape)} on {out.device}"
        )
    rows_ok = kernel_rows(out, out.shape[1]) is not None
    if rows_ok and _takes_kernel("fp8_scale_epilogue_into", y, row_scale, col_scale, bias):
        args = _kernel_args(y, row_scale, col_scale, bias)
        compiled_op("fp8_scale_epilogue_into")(*args, act, out)
        return
    out.copy_(fp8_scale_epilogue(y, row_scale, col_scale, bias, act))


def fp8_scale_epilogue_fp8_reference(
    y: torch.Tensor,
    row_scale: torch.Tensor,
    col_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    act: str = "none",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Spec of :func:`fp8_scale_epilogue_fp8`: the epilogue's output and
    ``quantize_fp8_reference(out, "row")`` of it (the stored, rounded values)."""
    out = fp8_scale_epilogue_reference(y, row_scale, col_scale, bias, act)
    q, q_scales = quantize_fp8_reference(out, "row")
    return out, q, q_scales


def fp8_scale_epilogue_fp8(
    y: torch.Tensor,
    row_scale: torch.Tensor,
    col_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    act: str = "none",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(out, q, q_scales)``: ``out = fp8_scale_epilogue(...)`` and its FP8 row quantization
    (float8_e4m3fn [M, N] codes, fp32 [M, 1] decode scales), exactly as
    ``dcgen.ops.quantize_fp8(out, "row")`` gives them: for an FP8 linear whose output is the
    next FP8 linear's input (FLUX's MLP), so the quantize reads the row while the kernel has
    it. One CUDA kernel (one CTA per row) in inference when built; else the reference."""
    _check(y, row_scale, col_scale, bias, act)
    if _takes_kernel("fp8_scale_epilogue_fp8", y, row_scale, col_scale, bias):
        args = _kernel_args(y, row_scale, col_scale, bias)
        return compiled_op("fp8_scale_epilogue_fp8")(*args, act)
    return fp8_scale_epilogue_fp8_reference(y, row_scale, col_scale, bias, act)
