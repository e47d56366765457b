"""Dynamic FP8 (E4M3) activation quantization: per row (token) or per 1x128 block along K.

The recipe (the spec the CUDA kernel follows op for op; all arithmetic in fp32):

1. ``amax`` = max |x| over the row, or over each block of 128 consecutive elements along the
   last dim (K); the last block of a K that is not a multiple of 128 is shorter (zero padded).
2. ``scale = amax * fp32(1 / 448)`` (one fp32 multiplication by the rounded reciprocal);
   ``scale = 1`` where that product is 0: an all-zero row / block, or an amax so small
   (below about 448 x 2^-149) that the product underflows, which would otherwise divide by
   zero into NaN codes. This is the *decode* scale: x ~= float(q) * scale. A
   multiplication, not ``amax / 448``: PyTorch on CUDA (and Inductor) computes a division by a
   constant as exactly this product, while a CPU division rounds differently for about half of
   all values, so only the product gives every backend the same bits.
3. ``q = e4m3(clamp(x / scale, -448, 448))``: fp32 division, clamp, round-to-nearest-even
   cast to float8_e4m3fn.

Non-finite inputs are not checked (that would cost a device sync per call); they follow the
recipe as written: a NaN makes its row / block's amax and scale NaN, so every code there is
NaN; an Inf makes the scale Inf, finite elements become 0 and the Inf itself NaN. Either way
the dequantized row / block is all NaN, as a 16-bit matmul would poison it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import _quant_fake  # noqa: F401  (fake impls of the quantize ops)
from ._extension import compiled_op, has_kernel, inductor_fuses_instead
from ._validate import FLOAT_DTYPES, check_same_device, check_tensor

E4M3_MAX = 448.0
INV_E4M3_MAX = 1.0 / E4M3_MAX  # rounded once to fp32 where it multiplies an fp32 amax
BLOCK_K = 128
GRANULARITIES = ("row", "block128")


def check_granularity(granularity: str) -> str:
    if granularity not in GRANULARITIES:
        raise ValueError(f"FP8: expected granularity in {GRANULARITIES}, got {granularity!r}")
    return granularity


def fp8_scale_count(k: int, granularity: str) -> int:
    """Scales per row: 1 for "row", ceil(K / 128) for "block128"."""
    return 1 if check_granularity(granularity) == "row" else -(-k // BLOCK_K)


def quantize_fp8_reference(
    x: torch.Tensor, granularity: str = "row"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pure-PyTorch spec: x [..., K] -> (q float8_e4m3fn [..., K], scales fp32 [..., S]) with
    S = 1 ("row") or ceil(K / 128) ("block128")."""
    check_granularity(granularity)
    k = x.shape[-1]
    xf = x.detach().float()
    if granularity == "row":
        blocks = xf.unsqueeze(-2)  # one block: the whole row
    else:
        blocks = F.pad(xf, (0, (-k) % BLOCK_K)).unflatten(-1, (-1, BLOCK_K))
    amax = blocks.abs().amax(dim=-1)  # torch.amax propagates NaN
    scale = amax * INV_E4M3_MAX
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)  # zero or underflowed
    q = (blocks / scale.unsqueeze(-1)).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    return q.flatten(-2)[..., :k], scale


def dequantize_fp8(
    q: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """``float(q) * scale`` in fp32 (the scale of each row or 1x128 block), cast to ``dtype``.
    The granularity follows from the scales' last dim (1: per row)."""
    check_tensor("dequantize_fp8: q", q, min_ndim=1, dtypes=(torch.float8_e4m3fn,))
    check_tensor("dequantize_fp8: scales", scales, min_ndim=1, dtypes=(torch.float32,))
    check_same_device(q=q, scales=scales)
    k, s = q.shape[-1], scales.shape[-1]
    if tuple(scales.shape[:-1]) != tuple(q.shape[:-1]) or s not in (1, -(-k // BLOCK_K)):
        blocks = -(-k // BLOCK_K)
        # With K <= 128 one block is the whole row: the two shapes coincide, name it once.
        shapes = f"{(*q.shape[:-1], 1)} (per row)"
        if blocks != 1:
            shapes += f" or {(*q.shape[:-1], blocks)} (1x128 blocks)"
        raise ValueError(
            f"dequantize_fp8: expected scales of shape {shapes} for q {tuple(q.shape)}, "
            f"got {tuple(scales.shape)}"
        )
    qf = q.float()
    if s == 1:
        return (qf * scales).to(dtype)
    full = scales.repeat_interleave(BLOCK_K, dim=-1)[..., :k]
    return (qf * full).to(dtype)


def quantize_fp8(x: torch.Tensor, granularity: str = "row") -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize activations ``x`` [..., K] to FP8 with dynamic per-row or 1x128 scales.

    Returns ``(q, scales)`` as :func:`quantize_fp8_reference` does. Runs the fused CUDA kernel
    (one pass) when dcgen._C has one for ``x.device`` and x is fp32/fp16/bf16; otherwise, and
    under torch.compile (``inductor_fuses_instead``), the reference. No gradient flows through
    either (rounding has none).
    """
    check_tensor("quantize_fp8: x", x, min_ndim=1, dtypes=(*FLOAT_DTYPES, torch.float64))
    check_granularity(granularity)
    if x.shape[-1] == 0:
        raise ValueError(f"quantize_fp8: expected K >= 1, got shape {tuple(x.shape)}")
    if (
        x.dtype in FLOAT_DTYPES
        and x.numel() > 0
        and has_kernel("quantize_fp8", x.device)
        and not inductor_fuses_instead()
    ):
        lead, k = x.shape[:-1], x.shape[-1]
        x2 = x.detach().reshape(-1, k).contiguous()
        block = 0 if granularity == "row" else BLOCK_K
        q, s = compiled_op("quantize_fp8")(x2, block)
        return q.reshape(*lead, k), s.reshape(*lead, s.shape[-1])
    return quantize_fp8_reference(x, granularity)
