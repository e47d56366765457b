"""NVFP4 activation quantization for the block-scaled GEMMs: x [M, K] -> packed E2M1 codes and
E4M3 block scales already in the 128x4 swizzled layout (Blackwell's operand format).

The recipe is :mod:`dcgen.quant.nvfp4`'s, op for op: the reference here is ``quantize_nvfp4``
followed by ``swizzle_scales``, and the CUDA kernel does both in one pass, bit-identically.
The tensor (decode) scale is an input: a static calibrated ``input_scale``, or, when None,
``amax / (6 * 448)`` of ``x`` computed first (one reduction, no host sync).

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


def quantize_nvfp4_activation(
    x: torch.Tensor, global_scale: torch.Tensor | None = None, check_finite: bool = True
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantize ``x`` [M, K] to NVFP4; returns ``(packed, swizzled_scales, global_scale)``.

    ``global_scale``: fp32 scalar decode scale (static); None computes ``amax / 2688``.
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
        check_tensor(
            "quantize_nvfp4_activation: global_scale", global_scale, dtypes=(torch.float32,)
        )
        if global_scale.numel() != 1:
            raise ValueError(
                "quantize_nvfp4_activation: expected global_scale with one element, "
                f"got shape {tuple(global_scale.shape)}"
            )
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
