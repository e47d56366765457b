"""glu_depthwise_conv: the reference against GLUMBConv's unfused middle, the CUDA kernel
against the reference (layouts, dtypes, with and without bias), tracing and input errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dcgen.ops import glu_depthwise_conv, glu_depthwise_conv_reference, has_kernel
from dcgen.ops._extension import compiled_op
from tests.conftest import misaligned_copy, poison_cuda_allocator

# (B, 2*Ch, H, W): odd sizes, 1-pixel rows/columns (all-border), a single channel pair. On CUDA,
# channels_last 16-bit maps with Ch % 4 == 0 take the 4-channel strip kernel: rows longer than
# one strip with a partial last strip (W = 19, strips of 4), and a channel-group count that is
# not a multiple of the warp (Ch = 260: 65 groups), and rows or columns of 1 and 2 pixels
# (every tap at a border) with W % 4 of 1 and 2; Ch = 1 and 3 take the per-element kernel.
SHAPES = [(2, 8, 5, 7), (1, 2, 1, 1), (1, 6, 1, 9), (2, 16, 8, 8), (1, 64, 13, 3),
          (1, 8, 4, 19), (2, 520, 3, 10), (1, 8, 1, 5), (2, 8, 2, 1), (1, 8, 2, 2),
          (3, 8, 3, 9)]  # fmt: skip
TOL = {torch.float32: (2e-5, 2e-5), torch.float16: (2e-3, 2e-3), torch.bfloat16: (1.6e-2, 1.6e-2)}


def _inputs(shape, dtype, gen, with_bias=True):
    c2 = shape[1]
    x = torch.randn(shape, generator=gen).to(dtype)
    w = (torch.randn(c2, 1, 3, 3, generator=gen) / 3).to(dtype)
    b = torch.randn(c2, generator=gen).to(dtype) if with_bias else None
    return x, w, b


@pytest.mark.parametrize("shape", SHAPES)
def test_reference_equals_glumbconv_middle(shape, rng):
    # GLUMBConv's unfused code: depthwise conv module, chunk, y * silu(gate).
    x, w, b = _inputs(shape, torch.float32, rng)
    conv = torch.nn.Conv2d(shape[1], shape[1], 3, padding=1, groups=shape[1])
    with torch.no_grad():
        conv.weight.copy_(w)
        conv.bias.copy_(b)
        y, gate = conv(x).chunk(2, dim=1)
        want = y * F.silu(gate)
    torch.testing.assert_close(glu_depthwise_conv_reference(x, w, b), want)


def test_reference_zero_padding_at_corner(rng):
    # Output (0, 0) sees only the 2x2 top-left inputs: the 3x3 taps at offsets -1 read zeros.
    x, w, _ = _inputs((1, 2, 4, 4), torch.float64, rng, with_bias=False)
    out = glu_depthwise_conv_reference(x, w)
    a = (x[0, 0, :2, :2] * w[0, 0, 1:, 1:]).sum()
    g = (x[0, 1, :2, :2] * w[1, 0, 1:, 1:]).sum()
    torch.testing.assert_close(out[0, 0, 0, 0], a * g * torch.sigmoid(g))


def _check_kernel(dtype, gen):
    kernel = compiled_op("glu_depthwise_conv")
    for shape in SHAPES:
        for with_bias in (True, False):
            x, w, b = _inputs(shape, dtype, gen, with_bias)
            x, w = x.cuda(), w.cuda()
            b = None if b is None else b.cuda()
            b_cpu = None if b is None else b.cpu().float()
            want = glu_depthwise_conv_reference(x.cpu().float(), w.cpu().float(), b_cpu)
            layouts = {
                "contiguous": x,
                "channels_last": x.to(memory_format=torch.channels_last),
                "strided": x.transpose(2, 3).contiguous().transpose(2, 3),
            }
            for layout, xl in layouts.items():
                poison_cuda_allocator()
                got = kernel(xl, w, b)
                assert got.shape == want.shape and got.dtype == dtype, (layout, shape)
                assert not got.isnan().any(), f"unwritten output ({layout}, {shape})"
                atol, rtol = TOL[dtype]
                torch.testing.assert_close(
                    got.cpu().float(), want, atol=atol, rtol=rtol, msg=f"{layout} {shape}"
                )


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cuda_kernel_matches_reference(dtype, rng):
    if not has_kernel("glu_depthwise_conv", "cuda"):
        pytest.skip("dcgen._C has no CUDA kernel for glu_depthwise_conv")
    _check_kernel(dtype, rng)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_channels_last_views(dtype, rng):
    # Views of a channels_last batch: a later batch element (an offset that keeps the 8-byte
    # alignment: the 4-channel kernel) and a channels_last-dense view one element into its
    # storage (misaligned: the host gate must send it to the per-element kernel).
    if not has_kernel("glu_depthwise_conv", "cuda"):
        pytest.skip("dcgen._C has no CUDA kernel for glu_depthwise_conv")
    kernel = compiled_op("glu_depthwise_conv")
    x, w, b = _inputs((3, 16, 5, 9), dtype, rng)
    big = x.cuda().to(memory_format=torch.channels_last)
    views = {"offset": (big[1:], x[1:]), "misaligned": (misaligned_copy(big), x)}
    for name, (xv, xc) in views.items():
        assert xv.is_contiguous(memory_format=torch.channels_last), name
        poison_cuda_allocator()
        got = kernel(xv, w.cuda(), b.cuda())
        assert not got.isnan().any(), f"unwritten output ({name})"
        want = glu_depthwise_conv_reference(xc.float(), w.float(), b.float())
        atol, rtol = TOL[dtype]
        torch.testing.assert_close(got.cpu().float(), want, atol=atol, rtol=rtol, msg=name)


@pytest.mark.cuda
def test_cuda_opcheck_and_compile(rng):
    if not has_kernel("glu_depthwise_conv", "cuda"):
        pytest.skip("dcgen._C has no CUDA kernel for glu_depthwise_conv")
    x, w, b = (t.cuda() for t in _inputs((2, 8, 5, 6), torch.float32, rng))
    op = torch.ops.dcgen.glu_depthwise_conv.default
    for xl in (x, x.to(memory_format=torch.channels_last)):
        torch.library.opcheck(op, (xl, w, b), test_utils=("test_schema", "test_faketensor"))
    fn = torch.compile(lambda x: glu_depthwise_conv(x, w, b) + 1, fullgraph=True, backend="eager")
    torch.testing.assert_close(fn(x), glu_depthwise_conv_reference(x, w, b) + 1)


def test_public_op_falls_back_and_is_differentiable(rng):
    x, w, b = _inputs((1, 4, 3, 3), torch.float64, rng)
    x.requires_grad_(True)
    w.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x, w: glu_depthwise_conv(x, w, b), (x, w))


@pytest.mark.parametrize(
    "args, err, match",
    [
        ((torch.randn(1, 3, 4, 4), torch.randn(3, 1, 3, 3)), ValueError, "even channel count"),
        ((torch.randn(1, 4, 4, 4), torch.randn(4, 1, 5, 5)), ValueError, r"\(4, 1, 3, 3\)"),
        ((torch.randn(1, 4, 4, 4), torch.randn(4, 1, 3, 3), torch.randn(3)), ValueError, r"\(4,\)"),
        ((torch.randn(4, 4, 4), torch.randn(4, 1, 3, 3)), ValueError, "4 dims"),
        ((torch.randint(0, 2, (1, 4, 4, 4)), torch.randn(4, 1, 3, 3)), TypeError, "dtype"),
    ],
)
def test_bad_input_errors(args, err, match):
    with pytest.raises(err, match=match):
        glu_depthwise_conv(*args)
