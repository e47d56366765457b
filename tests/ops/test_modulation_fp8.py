"""adaln_modulate_fp8: AdaLN modulation with the FP8 row quantization of its output in the same
kernel. On CPU: the public op's contract (shapes, errors, the quantization's error bound); where
a GPU exists: the kernel bit for bit against adaln_modulate followed by quantize_fp8, on
poisoned memory, over odd widths, multi-pass rows, batches, strided and fp32 parameters and
non-finite rows."""

from __future__ import annotations

import pytest
import torch

from dcgen.ops import (
    adaln_modulate,
    adaln_modulate_fp8,
    adaln_modulate_fp8_reference,
    adaln_modulate_reference,
    has_kernel,
)
from dcgen.ops.modulation import adaln_modulate_fp8_trusted
from dcgen.ops.quantize_fp8 import dequantize_fp8, quantize_fp8, quantize_fp8_reference
from tests.conftest import poison_cuda_allocator

# (B, S, D): D below one 8-wide group, not a multiple of 8, one CTA pass (D <= 2,048) and
# several (FLUX's 3,072; 4,100 with a tail), one row, many rows per batch element.
SHAPES = [(1, 1, 5), (2, 3, 24), (1, 7, 13), (3, 33, 3072), (2, 4, 1000), (1, 3, 4100)]


def _inputs(b, s, d, g, dtype=torch.bfloat16, param_dtype=None):
    x = (torch.randn(b, s, d, generator=g) * 3 + 1).to(dtype)
    emb = torch.randn(b, 3 * d, generator=g).to(param_dtype or dtype)
    shift, scale = emb[:, :d], emb[:, d : 2 * d]  # chunks: row stride 3 * d
    return x, shift, scale


# ----------------------------------------------------------------------------- CPU


def test_outputs_are_the_modulation_and_its_row_quantization(rng):
    x, shift, scale = _inputs(2, 5, 40, rng)
    out, q, q_scales = adaln_modulate_fp8(x, shift, scale, eps=1e-6)
    assert out.shape == x.shape and out.dtype == x.dtype
    assert q.shape == x.shape and q.dtype == torch.float8_e4m3fn
    assert q_scales.shape == (2, 5, 1) and q_scales.dtype == torch.float32
    assert torch.equal(out, adaln_modulate(x, shift, scale, eps=1e-6))
    want_q, want_s = quantize_fp8(out, "row")
    assert torch.equal(q.view(torch.uint8), want_q.view(torch.uint8))
    assert torch.equal(q_scales, want_s)
    # E4M3 keeps 3 mantissa bits: each dequantized element is within half a step (2^-4
    # relative) of the stored value, or within the subnormal spacing 2^-9 * scale of zero.
    deq = dequantize_fp8(q, q_scales)
    bound = out.float().abs() * 2**-4 + q_scales * 2**-9
    assert bool(((deq - out.float()).abs() <= bound).all())


def test_reference_quantizes_the_rounded_output(rng):
    # The quantize reads the stored bf16 values, as the two-op path does, not the fp32 ones.
    x, shift, scale = _inputs(1, 4, 64, rng)
    out, q, q_scales = adaln_modulate_fp8_reference(x, shift, scale, 1e-6)
    assert torch.equal(out, adaln_modulate_reference(x, shift, scale, 1e-6))
    want_q, want_s = quantize_fp8_reference(out, "row")
    assert torch.equal(q.view(torch.uint8), want_q.view(torch.uint8))
    assert torch.equal(q_scales, want_s)


def test_trusted_form_matches_public_op(rng):
    x, shift, scale = _inputs(2, 3, 16, rng)
    for a, b in zip(adaln_modulate_fp8_trusted(x, shift, scale, 1e-6),
                    adaln_modulate_fp8(x, shift, scale, 1e-6)):  # fmt: skip
        assert torch.equal(a.view(torch.uint8), b.view(torch.uint8))


def test_bad_inputs_name_what_was_expected(rng):
    x, shift, scale = _inputs(2, 3, 16, rng)
    with pytest.raises(ValueError, match=r"adaln_modulate_fp8: expected shift of shape \(2, 16\)"):
        adaln_modulate_fp8(x, shift[:, :8], scale)
    with pytest.raises(ValueError, match="expected eps > 0, got 0"):
        adaln_modulate_fp8(x, shift, scale, eps=0.0)
    with pytest.raises((TypeError, ValueError), match="adaln_modulate_fp8: x"):
        adaln_modulate_fp8(x.to(torch.int32), shift, scale)


def test_fake_impl_gives_the_kernel_outputs():
    # torch.compile traces the op (DCGEN_COMPILE_OPS=kernels) through its fake impl: the same
    # shapes and dtypes as the CUDA host function returns, [M, D] x2 and [M, 1].
    from torch._subclasses.fake_tensor import FakeTensorMode

    from dcgen.ops._extension import has_schema

    if not has_schema("adaln_modulate_fp8"):
        pytest.skip("dcgen._C is not built with adaln_modulate_fp8")
    with FakeTensorMode():
        x = torch.empty(6, 40, dtype=torch.float16, device="cuda")
        p = torch.empty(2, 40, dtype=torch.float32, device="cuda")
        out, q, q_scales = torch.ops.dcgen.adaln_modulate_fp8(x, p, p, 3, 1e-6)
    assert (out.shape, out.dtype) == ((6, 40), torch.float16)
    assert (q.shape, q.dtype) == ((6, 40), torch.float8_e4m3fn)
    assert (q_scales.shape, q_scales.dtype) == ((6, 1), torch.float32)


# ----------------------------------------------------------------------------- CUDA


def _need_kernel() -> None:
    if not has_kernel("adaln_modulate_fp8", "cuda"):
        pytest.skip("dcgen._C has no CUDA adaln_modulate_fp8 kernel")


def _same_bits(a: torch.Tensor, b: torch.Tensor, msg: str) -> None:
    """Bit-equal except that any NaN matches any NaN (sign and payload may differ)."""
    nan_a, nan_b = a.float().isnan().cpu(), b.float().isnan().cpu()
    assert torch.equal(nan_a, nan_b), msg
    bits = (
        torch.uint8
        if a.element_size() == 1
        else torch.int16
        if a.element_size() == 2
        else torch.int32
    )  # noqa: E501
    assert torch.equal(a.cpu().view(bits)[~nan_a], b.cpu().view(bits)[~nan_b]), msg


def _fused_equals_two_ops(x, shift, scale, eps: float, msg: str = "") -> tuple:  # noqa: ANN001
    """adaln_modulate_fp8 on poisoned memory against the two-op path it replaces
    (adaln_modulate, then quantize_fp8 of the rounded output): the same bits in all three
    outputs. Returns the fused outputs for further checks."""
    poison_cuda_allocator()
    out, q, q_scales = adaln_modulate_fp8(x, shift, scale, eps=eps)
    torch.cuda.synchronize()
    want_out = adaln_modulate(x, shift, scale, eps=eps)
    want_q, want_s = quantize_fp8(want_out, "row")
    _same_bits(out, want_out, msg + " (out)")
    _same_bits(q, want_q, msg + " (q)")
    _same_bits(q_scales, want_s, msg + " (scales)")
    return out, q, q_scales


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("param_dtype", ["same", torch.float32])
def test_cuda_kernel_is_modulate_then_quantize_bit_for_bit(dtype, param_dtype, rng):
    _need_kernel()
    for b, s, d in SHAPES:
        pd = dtype if param_dtype == "same" else param_dtype
        x, shift, scale = (t.cuda() for t in _inputs(b, s, d, rng, dtype, pd))
        msg = f"{dtype} params {pd} shape {(b, s, d)}"
        out, _, _ = _fused_equals_two_ops(x, shift, scale, 1e-6, msg)
        # and the fp32 spec within one rounding of the output dtype
        ref_out, _, _ = adaln_modulate_fp8_reference(x.cpu(), shift.cpu(), scale.cpu(), 1e-6)
        torch.testing.assert_close(out.cpu().float(), ref_out.float(), rtol=1e-2, atol=2e-2)


@pytest.mark.cuda
def test_cuda_kernel_zero_and_non_finite_rows(rng):
    _need_kernel()
    d = 300
    x, shift, scale = _inputs(1, 5, d, rng)
    shift, scale = shift.clone(), scale.clone()
    x[0, 1] = 0  # a constant row: LayerNorm gives 0, so the output is the shift
    shift[0, :] = 0  # ... and 0 with a zero shift: amax 0, scale 1, zero codes
    x[0, 2, 17] = float("nan")
    x[0, 3, 250] = float("inf")
    x, shift, scale = x.cuda(), shift.cuda(), scale.cuda()
    _, q, q_scales = _fused_equals_two_ops(x, shift, scale, 1e-6)
    assert float(q_scales[0, 1]) == 1.0 and not q[0, 1].view(torch.uint8).any()
    assert bool(q_scales[0, 2].isnan()) and bool(q_scales[0, 3].isnan())


@pytest.mark.cuda
def test_cuda_kernel_misaligned_rows(rng):
    # x viewed at an odd element offset: no 16-byte vector path, same bytes.
    _need_kernel()
    d = 64
    base = (torch.randn(1, 3 * d + 1, generator=rng) * 2).bfloat16().cuda()
    x = base[:, 1:].reshape(1, 3, d)
    shift = torch.randn(1, d, generator=rng).bfloat16().cuda()
    scale = torch.randn(1, d, generator=rng).bfloat16().cuda()
    _fused_equals_two_ops(x, shift, scale, 1e-5)


@pytest.mark.cuda
def test_cuda_kernel_broadcast_parameters_and_fp16_overflow(rng):
    # (1, D) shift / scale shared by a batch of 2 (stride-0 rows per batch element), and fp16
    # rows whose modulated values pass 65,504: inf in the output, so that row's scale is inf
    # and its codes come from the division path, as quantize_fp8 does on the two-op path.
    _need_kernel()
    d = 256
    x = (torch.randn(2, 4, d, generator=rng) * 2).half().cuda()
    shift = torch.randn(1, d, generator=rng).half().cuda()
    scale = torch.randn(1, d, generator=rng).half().cuda()
    x[..., 7] = 50.0  # normalized to about 13 in every row ...
    scale[0, 7] = 30000.0  # ... times 1 + scale: past fp16's range in column 7
    out, _, _ = _fused_equals_two_ops(x, shift, scale, 1e-6)
    assert out[..., 7].isinf().any(), "no overflow: the case tests nothing"
