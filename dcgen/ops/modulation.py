"""The elementwise glue of a DiT block (FLUX's AdaLN-Zero blocks), one pass each.

diffusers runs ``norm(x) * (1 + scale) + shift`` as a LayerNorm and two more passes, and
``x + gate * y`` as two; with the activations of a 4K DC-Gen image (4,608 x 3,072 per block)
each pass is a full trip through memory. Here each is one op:

- :func:`adaln_modulate`: ``LayerNorm(x) * (1 + scale[b]) + shift[b]`` (LayerNorm without
  affine, biased variance, statistics in fp32);
- :func:`gated_residual`: ``x + gate[b] * y``;
- :func:`adaln_modulate_fp8`: :func:`adaln_modulate`'s output together with its FP8 (E4M3) row
  quantization (:func:`dcgen.ops.quantize_fp8`, "row"), for blocks whose next linears are FP8:
  the quantize reads the modulated row while the kernel still has it, instead of a second
  kernel reading it back from memory.

x and y are (B, S, D) (or (M, D) with B = 1); shift, scale and gate are (B, D), typically chunks
of the modulation linear's output, or (1, D) for all batch elements. The spec computes in fp32
and rounds once to x's dtype, where diffusers rounds after every op; the difference is within
the dtype's rounding.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from ._extension import compiled_op, has_kernel, has_schema, inductor_fuses_instead
from ._validate import FLOAT_DTYPES, check_same_device, check_tensor
from .quantize_fp8 import quantize_fp8_reference

KERNEL_DTYPES = (torch.bfloat16, torch.float16)
F32 = torch.float32


def _as_rows(name: str, x: torch.Tensor) -> tuple[torch.Tensor, int, int]:
    """(B, S, D) or (M, D) -> (x viewed as 3-D, B, S)."""
    check_tensor(f"{name}: x", x, ndim=(2, 3), dtypes=(*FLOAT_DTYPES, torch.float64))
    x3 = x if x.dim() == 3 else x.unsqueeze(0)
    return x3, x3.shape[0], x3.shape[1]


def _check_param(name: str, what: str, p: torch.Tensor, b: int, d: int) -> None:
    check_tensor(f"{name}: {what}", p, ndim=2, dtypes=(*FLOAT_DTYPES, torch.float64))
    if p.shape[1] != d or p.shape[0] not in (1, b):
        raise ValueError(
            f"{name}: expected {what} of shape ({b}, {d}) (B, D) or (1, {d}) (one row for "
            f"every batch element, as diffusers' blocks broadcast it), got {tuple(p.shape)}"
        )


def _use_kernel(op: str, x: torch.Tensor, *params: torch.Tensor) -> bool:
    """Whether ``op`` runs its kernel on x and its (B, D) parameters: no gradient wanted, a
    16-bit x, parameters of one dtype (x's or fp32), something to do, a kernel for x's device,
    not while Inductor traces. Called on every block glue op of an eager step (8 per FLUX
    double block), so written as plain comparisons: no generators or sets."""
    if torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in params)):
        return False
    param_dtype = params[0].dtype
    if x.dtype not in KERNEL_DTYPES or (param_dtype is not x.dtype and param_dtype is not F32):
        return False
    for p in params:
        if p.dtype is not param_dtype:
            return False
    return x.numel() > 0 and has_kernel(op, x.device) and not inductor_fuses_instead()


def _param_rows(p: torch.Tensor, b: int) -> torch.Tensor:
    """The kernels read a (B, D) parameter with any row stride (0 included: a (1, D) row
    expanded to B) but unit column stride."""
    p = p if p.stride(-1) == 1 else p.contiguous()
    return p if p.shape[0] == b else p.expand(b, -1)


def adaln_modulate_reference(
    x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float = 1e-6
) -> torch.Tensor:
    """Pure-PyTorch spec (module doc); returns x's shape and dtype."""
    x3, _, _ = _as_rows("adaln_modulate", x)
    normed = F.layer_norm(x3.float(), (x3.shape[-1],), eps=eps)
    out = normed * (1 + scale.float()[:, None]) + shift.float()[:, None]
    return out.to(x.dtype).reshape(x.shape)


def adaln_modulate(
    x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float = 1e-6
) -> torch.Tensor:
    """``LayerNorm(x) * (1 + scale) + shift`` per batch element, one pass (module doc).

    The CUDA kernel runs for bf16 / fp16 x (shift and scale in x's dtype or fp32) when built
    and no gradient is needed, except while torch.compile traces (the reference fuses there);
    otherwise the reference."""
    x3 = _check_adaln("adaln_modulate", x, shift, scale, eps)
    if _use_kernel("adaln_modulate", x, shift, scale):
        return _adaln_kernel(x, x3, shift, scale, eps)
    return adaln_modulate_reference(x, shift, scale, eps)


def _check_adaln(
    name: str, x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float
) -> torch.Tensor:
    """The public adaln ops' argument checks; returns x viewed 3-D."""
    x3, b, _ = _as_rows(name, x)
    d = x3.shape[-1]
    _check_param(name, "shift", shift, b, d)
    _check_param(name, "scale", scale, b, d)
    check_same_device(x=x, shift=shift, scale=scale)
    if not eps > 0:
        raise ValueError(f"{name}: expected eps > 0, got {eps}")
    return x3


def _adaln_call(
    op: str, x3: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float
) -> Any:
    """The compiled adaln op ``op`` on x3 (B, S, D) as [B * S, D] rows; its raw outputs."""
    b, s, d = x3.shape
    return compiled_op(op)(
        x3.reshape(b * s, d).contiguous(), _param_rows(shift, b), _param_rows(scale, b), s,
        float(eps),
    )  # fmt: skip


def _adaln_kernel(
    x: torch.Tensor, x3: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float
) -> torch.Tensor:
    """The compiled adaln_modulate on x (viewed 3-D as x3), returned in x's shape."""
    return _adaln_call("adaln_modulate", x3, shift, scale, eps).reshape(x.shape)


def adaln_modulate_fp8_reference(
    x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float = 1e-6
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pure-PyTorch spec of :func:`adaln_modulate_fp8`: the modulated ``out`` (x's shape and
    dtype) and ``quantize_fp8_reference(out, "row")`` of it, the stored (rounded) values."""
    out = adaln_modulate_reference(x, shift, scale, eps)
    q, q_scales = quantize_fp8_reference(out, "row")
    return out, q, q_scales


def adaln_modulate_fp8(
    x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float = 1e-6
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(out, q, q_scales)``: ``out = adaln_modulate(x, shift, scale, eps)`` and its FP8 row
    quantization, ``q`` float8_e4m3fn of x's shape, ``q_scales`` fp32 ``(*x.shape[:-1], 1)``
    decode scales, exactly as ``dcgen.ops.quantize_fp8(out, "row")`` gives them (module doc).

    One CUDA kernel for bf16 / fp16 x when built (inference; not while torch.compile traces),
    else the reference. No gradient: the quantized copy is for FP8 linears in inference (the
    output is the reference's, which autograd differentiates, where a gradient is needed)."""
    x3 = _check_adaln("adaln_modulate_fp8", x, shift, scale, eps)
    if _use_kernel("adaln_modulate_fp8", x, shift, scale):
        return _adaln_fp8_kernel(x, x3, shift, scale, eps)
    return adaln_modulate_fp8_reference(x, shift, scale, eps)


def _adaln_fp8_kernel(
    x: torch.Tensor, x3: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    out, q, q_scales = _adaln_call("adaln_modulate_fp8", x3, shift, scale, eps)
    lead = x.shape[:-1]
    return out.reshape(x.shape), q.reshape(x.shape), q_scales.reshape(*lead, 1)


def adaln_modulate_fp8_trusted(
    x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`adaln_modulate_fp8` for dcgen's own block forwards (see
    :func:`adaln_modulate_trusted`)."""
    if x.dim() == 3 and _use_kernel("adaln_modulate_fp8", x, shift, scale):
        return _adaln_fp8_kernel(x, x, shift, scale, eps)
    return adaln_modulate_fp8(x, shift, scale, eps)


def gated_residual_reference(x: torch.Tensor, gate: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Pure-PyTorch spec (module doc); returns x's shape and dtype."""
    x3, _, _ = _as_rows("gated_residual", x)
    out = x3.float() + gate.float()[:, None] * y.reshape(x3.shape).float()
    return out.to(x.dtype).reshape(x.shape)


def gated_residual(x: torch.Tensor, gate: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``x + gate * y`` per batch element, one pass (module doc). Dispatch as
    :func:`adaln_modulate`; y must have x's shape and dtype."""
    name = "gated_residual"
    x3, b, s = _as_rows(name, x)
    d = x3.shape[-1]
    _check_param(name, "gate", gate, b, d)
    check_tensor(f"{name}: y", y, dtypes=(x.dtype,))
    if y.shape != x.shape:
        raise ValueError(f"{name}: expected y of x's shape {tuple(x.shape)}, got {tuple(y.shape)}")
    check_same_device(x=x, gate=gate, y=y)
    if _use_kernel(name, x, gate) and not (torch.is_grad_enabled() and y.requires_grad):
        return _gated_kernel(x, x3, gate, y)
    return gated_residual_reference(x, gate, y)


def _gated_kernel(
    x: torch.Tensor, x3: torch.Tensor, gate: torch.Tensor, y: torch.Tensor
) -> torch.Tensor:
    """The compiled gated_residual on x (viewed 3-D as x3) and y of x's shape."""
    b, s, d = x3.shape
    out = compiled_op("gated_residual")(
        x3.reshape(b * s, d).contiguous(), _param_rows(gate, b), y.reshape(b * s, d).contiguous(),
        s,
    )  # fmt: skip
    return out.reshape(x.shape)


def adaln_modulate_trusted(
    x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float
) -> torch.Tensor:
    """:func:`adaln_modulate` for dcgen's own block forwards, which build the arguments
    themselves ((B, S, D) activations, (B, D) or (1, D) chunks of their modulation output, on
    one device): where the kernel runs, straight to it, without re-validating them in Python
    (about 15 us per call, more than the three stock ops it replaces cost to dispatch; the
    C++ op still checks). Anything else takes :func:`adaln_modulate` itself."""
    if x.dim() == 3 and _use_kernel("adaln_modulate", x, shift, scale):
        return _adaln_kernel(x, x, shift, scale, eps)
    return adaln_modulate(x, shift, scale, eps)


def gated_residual_trusted(x: torch.Tensor, gate: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """:func:`gated_residual` for dcgen's own block forwards (see
    :func:`adaln_modulate_trusted`); y must be x's shape and dtype, as those forwards make it."""
    if (
        x.dim() == 3
        and y.shape == x.shape
        and y.dtype == x.dtype
        and not (torch.is_grad_enabled() and y.requires_grad)
        and _use_kernel("gated_residual", x, gate)
    ):
        return _gated_kernel(x, x, gate, y)
    return gated_residual(x, gate, y)


# Fake (meta) implementations, so torch.compile traces the compiled ops (with
# DCGEN_COMPILE_OPS=kernels); only when dcgen._C is loaded and carries these schemas.
if has_schema("adaln_modulate") and has_schema("gated_residual"):

    @torch.library.register_fake("dcgen::adaln_modulate")
    def _adaln_modulate_fake(x, shift, scale, rows_per_batch, eps):  # noqa: ANN001
        return torch.empty_like(x, memory_format=torch.contiguous_format)

    @torch.library.register_fake("dcgen::gated_residual")
    def _gated_residual_fake(x, gate, y, rows_per_batch):  # noqa: ANN001
        return torch.empty_like(x, memory_format=torch.contiguous_format)


if has_schema("adaln_modulate_fp8"):

    @torch.library.register_fake("dcgen::adaln_modulate_fp8")
    def _adaln_modulate_fp8_fake(x, shift, scale, rows_per_batch, eps):  # noqa: ANN001
        m = x.shape[0]
        return (
            torch.empty_like(x, memory_format=torch.contiguous_format),
            x.new_empty(x.shape, dtype=torch.float8_e4m3fn),
            x.new_empty((m, 1), dtype=torch.float32),
        )
