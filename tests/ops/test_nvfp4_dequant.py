"""nvfp4_dequantize: the reference against the format's dequantization in both scale layouts,
input errors on CPU; the CUDA kernel bit-exactly against the reference (odd shapes, trimmed K,
NaN scales, both layouts, all output dtypes) where a GPU exists, outputs poisoned first."""

from __future__ import annotations

import pytest
import torch

from dcgen.ops import has_kernel
from dcgen.ops.nvfp4_dequant import nvfp4_dequantize, nvfp4_dequantize_reference
from dcgen.quant.nvfp4 import dequantize_nvfp4, quantize_nvfp4, swizzle_scales
from tests.conftest import poison_cuda_allocator

# (N, K): K with and without 16-padding, N around the 128-row tiles of the swizzled layout.
SHAPES = [(1, 16), (3, 7), (5, 40), (17, 100), (128, 64), (129, 136), (130, 257), (64, 3072)]
DTYPES = [torch.bfloat16, torch.float16, torch.float32]


def _quantized(n: int, k: int, gen: torch.Generator):
    w = torch.randn(n, k, generator=gen) * torch.rand(n, 1, generator=gen).mul(10)
    if n > 2 and k >= 16:
        w[1, :16] = 0  # a zero block
        w[2] = 0  # a zero row
    return quantize_nvfp4(w)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("swizzled", [False, True])
def test_reference_is_the_format_dequantization(shape, swizzled, rng):
    q = _quantized(*shape, rng)
    scales = swizzle_scales(q.scales) if swizzled else q.scales
    for dtype in DTYPES:
        got = nvfp4_dequantize(q.packed, scales, q.global_scale, q.orig_k, dtype, swizzled)
        assert got.shape == shape and got.dtype == dtype
        assert torch.equal(got, dequantize_nvfp4(q, dtype))


def test_default_k_keeps_the_padding(rng):
    q = _quantized(4, 20, rng)  # Kp = 32
    got = nvfp4_dequantize(q.packed, q.scales, q.global_scale)
    assert got.shape == (4, 32)
    assert torch.equal(got[:, 20:], torch.zeros(4, 12, dtype=got.dtype))


def test_unit_global_scale_is_exact_in_16_bit(rng):
    # The Hopper path's premise: e2m1 * e4m3 products are exact in bf16 and fp16.
    q = _quantized(33, 96, rng)
    one = torch.ones(())
    f32 = nvfp4_dequantize(q.packed, q.scales, one, dtype=torch.float32)
    for dtype in (torch.bfloat16, torch.float16):
        assert torch.equal(nvfp4_dequantize(q.packed, q.scales, one, dtype=dtype).float(), f32)


def test_bad_inputs(rng):
    q = _quantized(4, 32, rng)
    p, s, g = q.packed, q.scales, q.global_scale
    with pytest.raises(ValueError, match=r"plain scales of shape \(4, 2\)"):
        nvfp4_dequantize(p, s[:, :1], g)
    with pytest.raises(ValueError, match="512 elements"):
        nvfp4_dequantize(p, swizzle_scales(s)[:-1], g, swizzled=True)
    with pytest.raises(ValueError, match="1 dims"):
        nvfp4_dequantize(p, s, g, swizzled=True)
    with pytest.raises(TypeError, match="uint8"):
        nvfp4_dequantize(p.int(), s, g)
    with pytest.raises(TypeError, match="float8_e4m3fn"):
        nvfp4_dequantize(p, s.float(), g)
    with pytest.raises(ValueError, match=r"k in \(16, 32\]"):
        nvfp4_dequantize(p, s, g, k=16)
    for k in (20.0, True):  # 20.0 was a bare TypeError from a slice, True a k of 1
        with pytest.raises(TypeError, match=rf"expected k an int or None, got {k}"):
            nvfp4_dequantize(p, s, g, k=k)
    with pytest.raises(ValueError, match="one element"):
        nvfp4_dequantize(p, s, torch.ones(2))
    with pytest.raises(ValueError, match="dtype"):
        nvfp4_dequantize(p, s, g, dtype=torch.int32)
    with pytest.raises(ValueError, match="multiple of 16"):
        nvfp4_dequantize(p[:, :3], s[:, :1], g)


@pytest.mark.skipif(not has_kernel("nvfp4_dequantize", "cuda"), reason="no CUDA dequantize kernel")
def test_fake_impl_traces():
    # The fake (meta) impl torch.compile uses: shape [N, k] and the requested dtype.
    from torch._subclasses.fake_tensor import FakeTensorMode

    from dcgen.ops._extension import compiled_op

    with FakeTensorMode():
        p = torch.empty(130, 56, dtype=torch.uint8, device="cuda")
        s = torch.empty(256 * 8, dtype=torch.float8_e4m3fn, device="cuda")
        g = torch.empty((), device="cuda")
        out = compiled_op("nvfp4_dequantize")(p, s, g, 100, True, torch.float16)
        assert out.shape == (130, 100) and out.dtype == torch.float16


def _needs_kernel() -> None:
    if not has_kernel("nvfp4_dequantize", "cuda"):
        pytest.skip("dcgen._C built without the CUDA nvfp4_dequantize kernel")


def _same(a: torch.Tensor, b: torch.Tensor, msg: str) -> None:
    """Bit-equal, NaN matching NaN (whatever its sign bit)."""
    nan_a, nan_b = a.isnan(), b.isnan()
    assert torch.equal(nan_a, nan_b), msg
    assert torch.equal(a[~nan_a], b[~nan_b]), msg


@pytest.mark.cuda
@pytest.mark.parametrize("shape", [*SHAPES, (4608 // 4, 12288)])
@pytest.mark.parametrize("swizzled", [False, True])
def test_cuda_kernel_matches_reference_bit_exactly(shape, swizzled, rng):
    _needs_kernel()
    q = _quantized(*shape, rng)
    scales = (swizzle_scales(q.scales) if swizzled else q.scales).cuda()
    packed, gs = q.packed.cuda(), q.global_scale.cuda()
    for dtype in DTYPES:
        for k in sorted({q.orig_k, q.padded_k}):
            poison_cuda_allocator()
            got = nvfp4_dequantize(packed, scales, gs, k, dtype, swizzled)
            want = nvfp4_dequantize_reference(packed, scales, gs, k, dtype, swizzled)
            _same(got, want, f"{shape} {dtype} k={k} swizzled={swizzled}")


@pytest.mark.cuda
def test_cuda_kernel_nan_scales_and_all_codes(rng):
    _needs_kernel()
    # Every byte value (all code pairs), every E4M3 scale including the NaN encodings.
    packed = torch.arange(256, dtype=torch.uint8).reshape(32, 8).repeat(1, 2)  # Kp = 32
    scales = torch.arange(64, dtype=torch.uint8).mul(4).add(3).view(torch.float8_e4m3fn)
    scales = scales.reshape(32, 2)
    gs = torch.tensor(0.75)
    for swz in (False, True):
        sc = (swizzle_scales(scales) if swz else scales).cuda()
        poison_cuda_allocator()
        got = nvfp4_dequantize(packed.cuda(), sc, gs.cuda(), 30, torch.float32, swz)
        want = nvfp4_dequantize_reference(
            packed, swizzle_scales(scales) if swz else scales, gs, 30, torch.float32, swz
        )
        _same(got.cpu(), want, f"swizzled={swz}")


@pytest.mark.cuda
def test_cuda_kernel_unaligned_packed_view(rng):
    _needs_kernel()
    # A row slice of a bigger buffer whose start is not 8-byte aligned: the scalar load path.
    q = _quantized(9, 48, rng)
    buf = torch.zeros(q.packed.numel() + 3, dtype=torch.uint8, device="cuda")
    packed = buf[3:].view(9, 24)
    packed.copy_(q.packed.cuda())
    got = nvfp4_dequantize(packed, q.scales.cuda(), q.global_scale.cuda())
    assert torch.equal(got.cpu(), dequantize_nvfp4(q, torch.bfloat16))
