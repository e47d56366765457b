"""NVFP4: the format, in pure PyTorch (the spec the CUDA kernels will be tested against).

Element: E2M1 (1 sign, 2 exponent bits with bias 1, 1 mantissa bit), no Inf/NaN. Codes
0x0..0x7 are +0, 0.5, 1, 1.5, 2, 3, 4, 6; 0x8..0xF the same negated. One FP8 E4M3 block scale
per 16 consecutive elements along the last dim (K), one FP32 tensor scale.

The recipe (docs KERNELS.md, "NVFP4"), followed op for op, all arithmetic in fp32:

1. ``x`` must be finite: NaN or +-Inf raise ``ValueError`` naming how many there are (E2M1
   has no encoding for them, and one Inf would make every other scale meaningless).
2. K is padded with zeros to a multiple of 16; the original shape (and K) are recorded and
   :func:`dequantize_nvfp4` trims the padding.
3. ``global_decode = amax * fp32(1 / (6 * 448))`` with ``amax = max|x|`` over the whole tensor
   (one fp32 multiplication by the rounded reciprocal of 2688: what PyTorch on CUDA computes
   for ``amax / 2688``, so every device gives the same bits). Where that is not a finite
   number > 0 (an all-zero tensor, an amax so small the product underflows, a NaN or Inf
   amax) ``global_decode = 1``. A caller may pass a
   static ``global_scale`` instead (the calibrated ``input_scale`` of a W4A4 layer).
4. ``block_scale = e4m3(min(block_amax / (6 * global_decode), 448))``: fp32 product
   ``6 * global_decode``, fp32 division, clamp to E4M3's max 448 (only reachable with a static
   global scale or through fp32 rounding), round-to-nearest-even cast to float8_e4m3fn.
5. ``q = rne_e2m1(x / (float(block_scale) * global_decode))``: fp32 product of the two scales,
   fp32 division, round-to-nearest-even onto the E2M1 grid with saturation to +-6. A block whose
   scale is 0 (an all-zero block, or one so small that its scale underflows E4M3) encodes to
   all +0 codes without dividing.
6. Dequant: ``x = e2m1 * float(block_scale) * global_decode`` (fp32, then the requested dtype).

Packing: two codes per byte, the element at the even index in the LOW nibble (the layout of
``torch.float4_e2m1fn_x2``: bits 7654 = element 2i+1, bits 3210 = element 2i).
The checkpoint layout is ModelOpt's: packed uint8 [..., K/2], block scales float8_e4m3fn
[..., K/16] (row-major, not swizzled), and the tensor scale as an fp32 scalar (the *decode*
scale, ``weight_scale_2``). :func:`swizzle_scales` gives the 128x4 tiled layout that
CUTLASS / cuBLAS block-scaled GEMMs read on sm_100 / sm_120.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dcgen._checks import is_int
from dcgen.ops._validate import FLOAT_DTYPES, check_tensor

BLOCK = 16
E2M1_MAX = 6.0
E4M3_MAX = 448.0
# 1 / (6 * 448), rounded once to fp32 where it multiplies an fp32 amax (global_decode_scale)
INV_GLOBAL_MAX = 1.0 / (E2M1_MAX * E4M3_MAX)
# Magnitudes of codes 0..7; codes 8..15 are the same negated.
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
# Midpoints between consecutive magnitudes. A tie at the midpoint after code i goes to the
# even code of the pair: up when i is odd (0.75 -> 1, 1.75 -> 2, 3.5 -> 4), down when i is even
# (0.25 -> 0, 1.25 -> 1, 2.5 -> 2, 5 -> 4).
_MIDPOINTS = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)


@dataclass
class NVFP4Tensor:
    """A quantized tensor: ``packed`` uint8 [..., Kp/2], ``scales`` float8_e4m3fn [..., Kp/16],
    ``global_scale`` fp32 scalar (decode scale), ``shape`` the original shape (its last entry is
    the original K; Kp is K padded to a multiple of 16)."""

    packed: torch.Tensor
    scales: torch.Tensor
    global_scale: torch.Tensor
    shape: tuple[int, ...]

    @property
    def orig_k(self) -> int:
        return self.shape[-1]

    @property
    def padded_k(self) -> int:
        return self.packed.shape[-1] * 2

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize_nvfp4(self, dtype)


# ----------------------------------------------------------------------------- elements


def e2m1_encode(v: torch.Tensor) -> torch.Tensor:
    """Round ``v`` (already divided by its scales) to the nearest E2M1 value, ties to even,
    saturating to +-6; returns the 4-bit codes as uint8 (sign in bit 3). NaN is not encodable:
    callers check for it first (here it would become +0)."""
    check_tensor("e2m1_encode: v", v, dtypes=(*FLOAT_DTYPES, torch.float64))
    # compared in the input's precision where it is wider than fp32: rounding a float64 to fp32
    # first can land a value just below a midpoint on it, and the tie then goes to even
    a = v.abs() if v.dtype == torch.float64 else v.abs().float()
    code = torch.zeros(v.shape, dtype=torch.uint8, device=v.device)
    for i, t in enumerate(_MIDPOINTS):
        up = a >= t if i % 2 == 1 else a > t
        code += up.to(torch.uint8)
    sign = torch.signbit(v).to(torch.uint8) << 3
    return code | sign


def e2m1_decode(codes: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Map 4-bit codes (uint8 holding 0..15) to their values."""
    check_tensor("e2m1_decode: codes", codes, dtypes=(torch.uint8,))
    mags = torch.tensor(E2M1_VALUES, dtype=torch.float32, device=codes.device)
    lut = torch.cat([mags, -mags])
    return lut[(codes & 0xF).long()].to(dtype)


def pack_e2m1(codes: torch.Tensor) -> torch.Tensor:
    """[..., K] uint8 codes (K even) -> [..., K/2] bytes, even index in the low nibble."""
    check_tensor("pack_e2m1: codes", codes, min_ndim=1, dtypes=(torch.uint8,))
    if codes.shape[-1] % 2:
        raise ValueError(f"pack_e2m1: expected an even last dim, got shape {tuple(codes.shape)}")
    return (codes[..., 0::2] & 0xF) | ((codes[..., 1::2] & 0xF) << 4)


def unpack_e2m1(packed: torch.Tensor) -> torch.Tensor:
    """[..., K/2] bytes -> [..., K] uint8 codes (inverse of :func:`pack_e2m1`)."""
    check_tensor("unpack_e2m1: packed", packed, min_ndim=1, dtypes=(torch.uint8,))
    lo = packed & 0xF
    hi = packed >> 4
    return torch.stack([lo, hi], dim=-1).flatten(-2)


# ----------------------------------------------------------------------------- tensors


def global_decode_scale(x: torch.Tensor) -> torch.Tensor:
    """``amax * fp32(1 / (6 * 448))`` over the whole tensor as an fp32 scalar; 1 where that is
    not a finite number > 0: an all-zero tensor, an amax whose product underflows, and a NaN or
    Inf amax (an Inf scale would zero every finite block, and their dequantized 0 * Inf be NaN:
    one Inf token made a whole W4A4 batch NaN). The amax is one reduction, the inf-norm:
    ``abs().amax()`` would first write |x| in full, a second pass over an activation that
    W4A4's dynamic scale reads on every call. Same value.

    A multiplication by the rounded reciprocal, not ``amax / 2688``: PyTorch on CUDA computes a
    division by a Python scalar that way, one rounding step away from the CPU's true division
    for about a quarter of tensors; this form gives the same bits on every device."""
    if x.numel():  # the max of |x| is exact in the input's dtype; taken in fp32 where it fits
        wide = x.dtype == torch.float64
        amax = torch.linalg.vector_norm(
            x.detach(), ord=float("inf"), dtype=None if wide else torch.float32
        ).float()
    else:
        amax = torch.zeros((), device=x.device)
    scale = amax * INV_GLOBAL_MAX
    return torch.where((scale > 0) & (scale < float("inf")), scale, 1.0)


def _one_scale(name: str, value: object, device: torch.device) -> torch.Tensor:
    """``value`` (a Python / numpy number or a one-element tensor) as an fp32 scalar tensor."""
    wrong = isinstance(value, bool) or (isinstance(value, torch.Tensor) and value.numel() != 1)
    if not wrong:
        try:
            return torch.as_tensor(value, dtype=torch.float32, device=device).reshape(())
        except (TypeError, ValueError, RuntimeError):
            pass
    shown = f"shape {tuple(value.shape)}" if isinstance(value, torch.Tensor) else repr(value)
    raise ValueError(f"{name}: expected one global_scale number, got {shown}")


def ensure_finite(name: str, x: torch.Tensor) -> None:
    """Raise ValueError naming how many NaN/Inf ``x`` holds (one device sync)."""
    bad = int((~torch.isfinite(x)).sum())
    if bad:
        raise ValueError(
            f"{name}: expected finite values, got {bad} NaN/Inf of {x.numel()} "
            "(E2M1 cannot encode them)"
        )


def ensure_global_scale(name: str, gd: torch.Tensor) -> None:
    """Raise ValueError unless ``gd`` is finite and > 0 (one device sync)."""
    if not (torch.isfinite(gd) and gd > 0):
        raise ValueError(f"{name}: expected a finite global_scale > 0, got {gd}")


def _pad_k(x: torch.Tensor) -> torch.Tensor:
    pad = (-x.shape[-1]) % BLOCK
    return torch.nn.functional.pad(x, (0, pad)) if pad else x


def quantize_nvfp4(
    x: torch.Tensor, global_scale: torch.Tensor | None = None, check_finite: bool = True
) -> NVFP4Tensor:
    """Quantize ``x`` [..., K] to NVFP4 along its last dim (module docstring: the recipe).

    ``global_scale``: an fp32 scalar decode scale to use instead of the dynamic one (step 3)
    (static activation scales); block scales then clamp at 448 and elements saturate at +-6.
    ``check_finite=False`` skips step 1 and the global-scale check (both sync the device); the
    recipe then runs as written on NaN/Inf: a NaN block amax gives a NaN block scale, whose
    ``denom > 0`` test fails, so the block is all +0 codes; an Inf under a finite global scale
    clamps its block scale to 448 and saturates to +-6. (The CUDA kernel matches this too.)
    """
    check_tensor("quantize_nvfp4: x", x, min_ndim=1, dtypes=(*FLOAT_DTYPES, torch.float64))
    if x.shape[-1] == 0:
        raise ValueError(f"quantize_nvfp4: expected K >= 1, got shape {tuple(x.shape)}")
    shape = tuple(x.shape)
    xf = _pad_k(x.detach().float())
    if check_finite:
        # one check, on what the recipe reads: the fp32 copy holds every NaN / Inf of x, and a
        # float64 value past fp32's range becomes an Inf there
        wide = x.dtype == torch.float64
        ensure_finite("quantize_nvfp4: x" + (" (in fp32, the recipe's precision)" if wide else ""),
                      xf if wide else x)  # fmt: skip
    if global_scale is None:
        gd = global_decode_scale(xf)
    else:
        gd = _one_scale("quantize_nvfp4", global_scale, x.device)
        if check_finite:
            ensure_global_scale("quantize_nvfp4", gd)
    blocks = xf.unflatten(-1, (-1, BLOCK))
    block_amax = blocks.abs().amax(dim=-1)
    scales = (block_amax / (E2M1_MAX * gd)).clamp(max=E4M3_MAX).to(torch.float8_e4m3fn)
    denom = scales.float() * gd
    nonzero = denom > 0
    safe = torch.where(nonzero, denom, torch.ones_like(denom))
    codes = e2m1_encode(blocks / safe.unsqueeze(-1))
    codes = torch.where(nonzero.unsqueeze(-1), codes, torch.zeros_like(codes))
    packed = pack_e2m1(codes.flatten(-2))
    return NVFP4Tensor(packed=packed, scales=scales, global_scale=gd, shape=shape)


def dequantize_nvfp4(q: NVFP4Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``e2m1 * float(block_scale) * global_decode`` in fp32, padding trimmed, cast to dtype."""
    if not isinstance(q, NVFP4Tensor):
        raise TypeError(f"dequantize_nvfp4: expected an NVFP4Tensor, got {type(q).__name__}")
    return dequantize_parts(q.packed, q.scales, q.global_scale, q.orig_k, dtype)


def dequantize_parts(
    packed: torch.Tensor,
    scales: torch.Tensor,
    global_scale: torch.Tensor,
    k: int | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Dequantize from the raw (checkpoint) tensors; ``k`` trims padding (default: none)."""
    check_tensor("dequantize_nvfp4: packed", packed, min_ndim=1, dtypes=(torch.uint8,))
    check_tensor("dequantize_nvfp4: scales", scales, min_ndim=1, dtypes=(torch.float8_e4m3fn,))
    kp = packed.shape[-1] * 2
    if kp % BLOCK or tuple(scales.shape) != (*packed.shape[:-1], kp // BLOCK):
        raise ValueError(
            f"dequantize_nvfp4: expected scales of shape {(*packed.shape[:-1], kp // BLOCK)} "
            f"for packed {tuple(packed.shape)} (K padded to a multiple of {BLOCK}), "
            f"got {tuple(scales.shape)}"
        )
    if k is not None and (not is_int(k) or not kp - BLOCK < k <= kp):
        raise ValueError(
            f"dequantize_nvfp4: expected k an int in ({kp - BLOCK}, {kp}] for packed "
            f"{tuple(packed.shape)}, got {k!r}"
        )
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dequantize_nvfp4: expected a floating dtype, got {dtype}")
    vals = e2m1_decode(unpack_e2m1(packed)).unflatten(-1, (-1, BLOCK))
    gd = _one_scale("dequantize_nvfp4", global_scale, packed.device)
    out = (vals * scales.float().unsqueeze(-1) * gd).flatten(-2)
    if k is not None:
        out = out[..., :k]
    return out.to(dtype)


def fake_quantize_nvfp4(x: torch.Tensor, global_scale: torch.Tensor | None = None) -> torch.Tensor:
    """``dequantize(quantize(x))`` in fp32 (the W4A4 activation path)."""
    return dequantize_nvfp4(quantize_nvfp4(x, global_scale), torch.float32)


# ----------------------------------------------------------------------------- swizzle


def _ceil(a: int, b: int) -> int:
    return -(-a // b)


def swizzled_offset(m: int, kb: int, k: int) -> int:
    """Byte offset of scale (row m, K-block kb) in the 128x4 layout for a matrix with K cols."""
    kb4 = _ceil(_ceil(k, BLOCK), 4)
    return ((m // 128) * kb4 + kb // 4) * 512 + (m % 32) * 16 + ((m % 128) // 32) * 4 + kb % 4


def swizzle_scales(scales: torch.Tensor) -> torch.Tensor:
    """Row-major block scales [M, ceil(K/16)] -> the flat CUTLASS/cuBLAS 128x4 tiled buffer
    (same dtype), padded with zeros to M multiple of 128 and K/16 multiple of 4."""
    check_tensor(
        "swizzle_scales: scales", scales, ndim=2, dtypes=(torch.float8_e4m3fn, torch.uint8)
    )
    m, kb = scales.shape
    mp, kbp = _ceil(m, 128) * 128, _ceil(kb, 4) * 4
    raw = scales.view(torch.uint8)
    buf = torch.zeros(mp, kbp, dtype=torch.uint8, device=scales.device)
    buf[:m, :kb] = raw
    # [m/128, (m%128)/32, m%32, kb/4, kb%4] -> [m/128, kb/4, m%32, (m%128)/32, kb%4]
    tiled = buf.view(mp // 128, 4, 32, kbp // 4, 4).permute(0, 3, 2, 1, 4)
    return tiled.reshape(-1).view(scales.dtype)


def unswizzle_scales(buf: torch.Tensor, m: int, k: int) -> torch.Tensor:
    """Inverse of :func:`swizzle_scales`: flat buffer -> [m, ceil(k/16)] (``k`` in elements)."""
    check_tensor("unswizzle_scales: buf", buf, ndim=1, dtypes=(torch.float8_e4m3fn, torch.uint8))
    kb = _ceil(k, BLOCK)
    mp, kbp = _ceil(m, 128) * 128, _ceil(kb, 4) * 4
    if buf.numel() != mp * kbp:
        raise ValueError(
            f"unswizzle_scales: expected {mp * kbp} bytes for M={m}, K={k} "
            f"(padded to {mp} x {kbp}), got {buf.numel()}"
        )
    tiled = buf.view(torch.uint8).view(mp // 128, kbp // 4, 32, 4, 4).permute(0, 3, 2, 1, 4)
    return tiled.reshape(mp, kbp)[:m, :kb].contiguous().view(buf.dtype)
