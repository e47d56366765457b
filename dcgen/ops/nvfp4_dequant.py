"""NVFP4 dequantization as one op: packed E2M1 codes + E4M3 block scales + fp32 decode scale ->
a bf16 / fp16 / fp32 matrix, in one pass on the GPU.

The reference is the format's own dequantization (:func:`dcgen.quant.nvfp4.dequantize_parts`:
``e2m1 * float(block_scale) * global_scale`` in fp32, one rounding to ``dtype``); the CUDA kernel
performs the same two fp32 products in the same order, so every element is bit-identical.

Scales come in either layout: ``swizzled=False`` the plain row-major [N, Kp/16] of ModelOpt
checkpoints (``NVFP4Linear.weight_scale``), ``swizzled=True`` the flat 128x4 tiled buffer of the
Blackwell GEMMs (what :func:`dcgen.ops.quantize_nvfp4.quantize_nvfp4_activation` writes).

Why it exists: GPUs without FP4 tensor cores (Hopper sm_90, Ampere sm_80) run NVFP4 layers as
dequantize-then-matmul. With ``global_scale = 1`` each value ``e2m1 * e4m3`` has at most 6
significant bits within [2^-10, 2688], so the bf16 / fp16 output is exact and a 16-bit GEMM with
fp32 accumulation (global scales applied to its fp32 result) reproduces Blackwell's NVFP4
numerics up to fp32 summation order.
"""

from __future__ import annotations

import torch

from .._checks import is_int
from . import _quant_fake  # noqa: F401  (fake impls of the quantize / dequantize ops)
from ._extension import compiled_op, has_kernel
from ._validate import FLOAT_DTYPES, check_same_device, check_tensor


def _fmt():  # noqa: ANN202
    from dcgen.quant import nvfp4  # lazy: dcgen.quant imports dcgen.ops at load time

    return nvfp4


def nvfp4_dequantize_reference(
    packed: torch.Tensor,
    scales: torch.Tensor,
    global_scale: torch.Tensor,
    k: int | None = None,
    dtype: torch.dtype = torch.bfloat16,
    swizzled: bool = False,
) -> torch.Tensor:
    """Pure-PyTorch spec (module doc): [N, k] of ``dtype`` (``k`` defaults to Kp)."""
    fmt = _fmt()
    kp = packed.shape[-1] * 2
    if swizzled:
        scales = fmt.unswizzle_scales(scales, packed.shape[0], kp)
    return fmt.dequantize_parts(packed, scales, global_scale, kp if k is None else k, dtype)


def _check(
    packed: torch.Tensor,
    scales: torch.Tensor,
    global_scale: torch.Tensor,
    k: int | None,
    dtype: torch.dtype,
    swizzled: bool,
) -> int:
    name = "nvfp4_dequantize"
    check_tensor(f"{name}: packed", packed, ndim=2, dtypes=(torch.uint8,))
    check_tensor(
        f"{name}: scales", scales, ndim=1 if swizzled else 2, dtypes=(torch.float8_e4m3fn,)
    )
    check_tensor(f"{name}: global_scale", global_scale, dtypes=(torch.float32,))
    check_same_device(packed=packed, scales=scales, global_scale=global_scale)
    if dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name}: expected dtype in {[str(d) for d in FLOAT_DTYPES]}, got {dtype}")
    if global_scale.numel() != 1:
        raise ValueError(
            f"{name}: expected global_scale with one element, got shape {tuple(global_scale.shape)}"
        )
    n, kp = packed.shape[0], packed.shape[1] * 2
    if kp == 0 or kp % 16:
        raise ValueError(
            f"{name}: expected packed [N, Kp/2] with Kp a positive multiple of 16, "
            f"got shape {tuple(packed.shape)}"
        )
    k = kp if k is None else k
    if not is_int(k):  # 20.0 reached the kernel's int argument as a bare TypeError
        raise TypeError(f"{name}: expected k an int or None, got {k!r}")
    if not kp - 16 < k <= kp:
        raise ValueError(f"{name}: expected k in ({kp - 16}, {kp}] for Kp={kp}, got {k}")
    kb = kp // 16
    if swizzled:
        want = -(-n // 128) * 128 * (-(-kb // 4) * 4)
        if scales.numel() != want:
            raise ValueError(
                f"{name}: expected swizzled scales with {want} elements (128x4 layout, {n} rows, "
                f"{kb} blocks), got {scales.numel()}"
            )
    elif tuple(scales.shape) != (n, kb):
        raise ValueError(
            f"{name}: expected plain scales of shape {(n, kb)}, got {tuple(scales.shape)}"
        )
    return k


def nvfp4_dequantize(
    packed: torch.Tensor,
    scales: torch.Tensor,
    global_scale: torch.Tensor,
    k: int | None = None,
    dtype: torch.dtype = torch.bfloat16,
    swizzled: bool = False,
) -> torch.Tensor:
    """Dequantize NVFP4 ``packed`` [N, Kp/2] with ``scales`` (plain [N, Kp/16], or the flat 128x4
    buffer when ``swizzled``) and the fp32 scalar ``global_scale`` to ``dtype`` [N, k].

    ``k`` (default Kp) drops the zero padding of a K that is not a multiple of 16. Runs the CUDA
    kernel when dcgen._C has one for the tensors' device, the reference otherwise; both give the
    same bits.
    """
    k = _check(packed, scales, global_scale, k, dtype, swizzled)
    if packed.shape[0] > 0 and has_kernel("nvfp4_dequantize", packed.device):
        return compiled_op("nvfp4_dequantize")(
            packed.contiguous(), scales.contiguous(), global_scale, k, swizzled, dtype
        )
    return nvfp4_dequantize_reference(packed, scales, global_scale, k, dtype, swizzled)
