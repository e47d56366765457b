"""NVFP4 activation quantization for the block-scaled GEMMs: x [M, K] -> packed E2M1 codes and
E4M3 block scales already in the 128x4 swizzled layout (Blackwell's operand format).

The recipe is :mod:`dcgen.quant.nvfp4`'s, op for op: the reference here is ``quantize_nvfp4``
followed by ``swizzle_scales``, and the CUDA kernel does both in one pass, bit-identically.
The tensor (decode) scale is an input: a static calibrated ``input_scale``, or, when None,
``amax * fp32(1 / (6 * 448))`` of ``x`` computed first (one reduction, no host sync).

Non-finite inputs: by default the public function raises, like the reference (one device sync
to count them). ``check_finite=False`` skips that; the recipe then runs as written: a block
holding a NaN gets a NaN scale and all +0 codes, an Inf saturates to +-6 under a finite global
scale (its block scale clamps at 448).
"""

from __future__ import annotations

import torch

from . import _quant_fake  # noqa: F401  (fake impls of the quantize ops)
from ._extension import compiled_op, has_kernel
from ._validate import FLOAT_DTYPES, check_same_device, check_tensor


def _fmt():  # noqa: ANN202
    # Imported lazily: dcgen.quant imports dcgen.ops at load time, not the other way round.
    from dcgen.quant import nvfp4

    return nvfp4


def quantize_nvfp4_reference(
    x: torch.Tensor, global_scale: torch.Tensor, check_finite: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pure-PyTorch spec: (packed uint8 [M, Kp/2], swizzled float8_e4m3fn scales, flat)."""
    fmt = _fmt()
    q = fmt.quantize_nvfp4(x, global_scale, check_finite=check_finite)
    return q.packed, fmt.swizzle_scales(q.scales)


def _check_static_scale(name: str, global_scale: torch.Tensor) -> None:
    check_tensor(f"{name}: global_scale", global_scale, dtypes=(torch.float32,))
    if global_scale.numel() != 1:
        raise ValueError(
            f"{name}: expected global_scale with one element, got shape {tuple(global_scale.shape)}"
        )


def quantize_nvfp4_activation(
    x: torch.Tensor, global_scale: torch.Tensor | None = None, check_finite: bool = True
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantize ``x`` [M, K] to NVFP4; returns ``(packed, swizzled_scales, global_scale)``.

    ``global_scale``: fp32 scalar decode scale (static); None computes ``amax * fp32(1/2688)``
    (:func:`dcgen.quant.nvfp4.global_decode_scale`).
    The fused CUDA kernel runs when dcgen._C has one for ``x.device`` and x is fp32/fp16/bf16;
    otherwise the reference. ``unswizzle_scales(scales, M, K)`` gives the [M, ceil(K/16)] view.
    """
    check_tensor("quantize_nvfp4_activation: x", x, ndim=2, dtypes=(*FLOAT_DTYPES, torch.float64))
    if x.shape[-1] == 0:
        raise ValueError(f"quantize_nvfp4_activation: expected K >= 1, got shape {tuple(x.shape)}")
    fmt = _fmt()
    if global_scale is None:
        gs = fmt.global_decode_scale(x)
    else:
        _check_static_scale("quantize_nvfp4_activation", global_scale)
        check_same_device(x=x, global_scale=global_scale)
        gs = global_scale.reshape(())
    if x.dtype in FLOAT_DTYPES and x.numel() > 0 and has_kernel("quantize_nvfp4", x.device):
        if check_finite:
            fmt.ensure_finite("quantize_nvfp4_activation: x", x)
            fmt.ensure_global_scale("quantize_nvfp4_activation", gs)
        packed, scales = compiled_op("quantize_nvfp4")(x.detach().contiguous(), gs)
        return packed, scales, gs
    packed, scales = quantize_nvfp4_reference(x, gs, check_finite=check_finite)
    return packed, scales, gs


# ------------------------------------------------- fused with the low-rank down-projection

LOWRANK_KERNEL_RANKS = (16, 32, 64, 128)
_HALF = (torch.bfloat16, torch.float16)


def _smoothed(x: torch.Tensor, smooth: torch.Tensor | None) -> torch.Tensor:
    return x.float() / smooth if smooth is not None else x.float()


def smoothed_decode_scale(x: torch.Tensor, smooth: torch.Tensor | None) -> torch.Tensor:
    """``amax(|x / smooth|) * fp32(1/2688)`` (the smoothed activation's dynamic global scale)
    without building ``x / smooth``: per column ``max_i |x_ij| / |s_j|``, bit-identical to the
    maximum of the divided values (IEEE division by a positive number is monotonic; a zero
    factor gives Inf or NaN either way)."""
    fmt = _fmt()
    if smooth is None:
        return fmt.global_decode_scale(x)
    if x.numel() == 0:
        return fmt.global_decode_scale(x.float())
    x2 = x.detach().reshape(-1, x.shape[-1])
    col = torch.linalg.vector_norm(x2, ord=float("inf"), dim=0).float() / smooth.abs()
    return fmt.global_decode_scale(col)


def quantize_nvfp4_lowrank_reference(
    x: torch.Tensor,
    global_scale: torch.Tensor,
    smooth: torch.Tensor | None,
    down: torch.Tensor,
    check_finite: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pure-PyTorch spec of the fused op: ``xs = x / smooth`` in fp32 (``x`` without smoothing)
    quantized exactly as :func:`quantize_nvfp4_reference` does, and the SVDQuant down-projection
    ``t = xs' @ down^T`` in fp32 [M, r], where ``xs'`` is ``xs`` rounded once to ``down``'s dtype
    (the 16-bit operand a tensor-core GEMM reads; ``x`` itself when ``x`` has that dtype and no
    smoothing). Returns ``(packed, swizzled scales, t)``."""
    xs = _smoothed(x, smooth)
    packed, scales = quantize_nvfp4_reference(xs, global_scale, check_finite=check_finite)
    t = xs.to(down.dtype).float() @ down.float().t()
    return packed, scales, t


def _word_aligned(t: torch.Tensor) -> torch.Tensor:
    """``t`` contiguous with a 4-byte aligned start (the kernel loads element pairs as words; a
    view at an odd element offset is copied). By storage offset, which torch.compile can trace
    (allocations themselves are aligned)."""
    t = t.contiguous()
    return t if (t.storage_offset() * t.element_size()) % 4 == 0 else t.clone()


def _lowrank_kernel_applies(x: torch.Tensor, down: torch.Tensor) -> bool:
    return (
        x.dtype in _HALF
        and down.dtype == x.dtype
        and x.shape[1] % 16 == 0
        and down.shape[0] in LOWRANK_KERNEL_RANKS
        and x.numel() > 0
        and has_kernel("quantize_nvfp4_lowrank", x.device)
    )


def quantize_nvfp4_lowrank(
    x: torch.Tensor,
    down: torch.Tensor,
    global_scale: torch.Tensor | None = None,
    smooth: torch.Tensor | None = None,
    check_finite: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantize ``x / smooth`` (``x`` [M, K] without smoothing) to NVFP4 and project it onto the
    low-rank branch's ``down`` [r, K] in one read of ``x`` (inference: no gradient); returns
    ``(packed, swizzled_scales, global_scale, t)`` with ``t`` fp32 [M, r] (spec:
    :func:`quantize_nvfp4_lowrank_reference`).

    ``global_scale``: fp32 scalar decode scale (static); None computes ``amax * fp32(1/2688)``
    of ``x / smooth``. ``smooth``: fp32 [K] smoothing factors or None. The fused CUDA kernel runs
    for a bf16 / fp16 ``x`` with ``down`` of its dtype, K a multiple of 16 and r in
    ``LOWRANK_KERNEL_RANKS``; otherwise the quantize op and a separate GEMM give the same
    result (the reference on CPU). ``check_finite`` as in :func:`quantize_nvfp4_activation`.
    """
    name = "quantize_nvfp4_lowrank"
    check_tensor(f"{name}: x", x, ndim=2, dtypes=FLOAT_DTYPES)
    x = x.detach()  # an inference op: no gradient flows through the codes or t
    check_tensor(f"{name}: down", down, ndim=2, dtypes=_HALF)
    k = x.shape[1]
    if k == 0 or down.shape[1] != k:
        raise ValueError(
            f"{name}: expected x [M, K >= 1] and down [r, K], got {tuple(x.shape)} and "
            f"{tuple(down.shape)}"
        )
    if smooth is not None:
        check_tensor(f"{name}: smooth", smooth, ndim=1, dtypes=(torch.float32,))
        if smooth.shape[0] != k:
            raise ValueError(f"{name}: expected smooth of shape ({k},), got {tuple(smooth.shape)}")
    if global_scale is not None:
        _check_static_scale(name, global_scale)
    check_same_device(x=x, down=down, smooth=smooth, global_scale=global_scale)
    fmt = _fmt()
    if global_scale is None:
        gs = smoothed_decode_scale(x, smooth)
    else:
        gs = global_scale.reshape(())
    if check_finite:  # what is quantized: x / smooth (a zero factor makes it non-finite)
        fmt.ensure_finite(
            f"{name}: x / smooth" if smooth is not None else f"{name}: x",
            _smoothed(x, smooth) if smooth is not None else x,
        )
        fmt.ensure_global_scale(name, gs)
    if _lowrank_kernel_applies(x, down):
        s = smooth.contiguous() if smooth is not None else None
        packed, scales, t = compiled_op(name)(_word_aligned(x), gs, s, _word_aligned(down))
        return packed, scales, gs, t
    if x.is_cuda:  # unfused: the quantize op, then the GEMM (fp32 accumulation) on xs'
        xs = _smoothed(x, smooth) if smooth is not None else x
        packed, scales, _ = quantize_nvfp4_activation(xs, gs, check_finite=False)
        t = torch.mm(xs.to(down.dtype), down.t(), out_dtype=torch.float32)
        return packed, scales, gs, t
    packed, scales, t = quantize_nvfp4_lowrank_reference(x, gs, smooth, down, check_finite=False)
    return packed, scales, gs, t
