"""channel_rms_norm_fused: the reference against norm -> act -> + residual composed from the
plain op, the CPU and CUDA kernels against the reference, the plain op unchanged by the
extension, tracing and input errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dcgen.ops import (
    channel_rms_norm,
    channel_rms_norm_fused,
    channel_rms_norm_fused_reference,
    channel_rms_norm_reference,
    has_kernel,
)
from dcgen.ops._extension import compiled_op
from tests.conftest import poison_cuda_allocator

# C = 32 / 64 / 128 / 512 / 2048 channels_last: the packet kernel with 4 / 8 / 16 lanes a pixel
# (16-bit) and 32 lanes of 2 / 8 packets; C = 130 and 3 take the per-element kernels.
SHAPES = [(1, 1, 1, 1), (2, 3, 5, 7), (1, 32, 16, 16), (3, 130, 9, 11), (2, 8, 33), (2, 64, 8, 6),
          (2, 128, 4, 5), (1, 512, 3, 5), (1, 2048, 2, 3)]  # fmt: skip
ACTS = ["none", "relu", "silu"]
TOL = {torch.float32: (4e-6, 4e-6), torch.float16: (2e-3, 2e-3), torch.bfloat16: (1.6e-2, 1.6e-2)}
_ACT_FN = {"none": lambda t: t, "relu": F.relu, "silu": F.silu}


def _inputs(shape, dtype, device, gen, residual=True):
    x = torch.randn(shape, generator=gen).mul_(3).add_(0.5).to(dtype).to(device)
    c = shape[1]
    w = torch.randn(c, generator=gen).to(device)
    b = torch.randn(c, generator=gen).to(device)
    r = torch.randn(shape, generator=gen).to(dtype).to(device) if residual else None
    return x, w, b, r


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_reference_is_norm_then_act_then_residual(act, dtype, rng):
    x, w, b, r = _inputs((2, 12, 4, 5), dtype, "cpu", rng)
    want = _ACT_FN[act](channel_rms_norm_reference(x, w, b, 1e-5)) + r
    torch.testing.assert_close(channel_rms_norm_fused_reference(x, w, b, 1e-5, act, r), want)
    want = _ACT_FN[act](channel_rms_norm_reference(x, w, b, 1e-5))
    torch.testing.assert_close(channel_rms_norm_fused_reference(x, w, b, 1e-5, act), want)


def test_bf16_reference_rounds_once(rng):
    x, w, b, r = _inputs((2, 16, 4, 4), torch.bfloat16, "cpu", rng)
    got = channel_rms_norm_fused_reference(x, w, b, 1e-5, "silu", r)
    want = channel_rms_norm_fused_reference(x.float(), w, b, 1e-5, "silu", r.float())
    torch.testing.assert_close(got, want.to(torch.bfloat16), atol=0, rtol=0)


def _layouts(x, r):
    yield "contiguous", x, r
    if x.ndim == 4:
        cl = torch.channels_last
        yield "channels_last", x.to(memory_format=cl), r.to(memory_format=cl)
        yield "mixed", x.to(memory_format=cl), r  # residual copied to x's layout
        yield "strided", x.transpose(2, 3), r.transpose(2, 3)
        if x.shape[2] > 1:  # a band of rows of an NHWC batch (banded decode): strided NHWC
            yield "channels_last band", x.to(memory_format=cl)[:, :, 1:], r[:, :, 1:]


def _check_kernel(device, dtype, gen):
    kernel = compiled_op("channel_rms_norm_fused")
    for shape in SHAPES:
        for act in ACTS:
            for with_res in (True, False):
                x, w, b, r = _inputs(shape, dtype, device, gen)
                for layout, xl, rl in _layouts(x, r):
                    rl = rl if with_res else None
                    if device == "cuda":
                        poison_cuda_allocator()
                    got = kernel(xl, w, b, rl, act, 1e-5)
                    want = channel_rms_norm_fused_reference(
                        xl.cpu().float(), w.cpu(), b.cpu(), 1e-5, act,
                        None if rl is None else rl.cpu().float(),
                    )  # fmt: skip
                    msg = f"{layout} {shape} {act} residual={with_res}"
                    assert got.shape == xl.shape and got.dtype == dtype, msg
                    assert not got.isnan().any(), f"unwritten or NaN output ({msg})"
                    atol, rtol = TOL[dtype]
                    torch.testing.assert_close(
                        got.cpu().float(), want, atol=atol, rtol=rtol, msg=msg
                    )
                    if layout in ("channels_last", "mixed", "channels_last band"):
                        assert got.is_contiguous(memory_format=torch.channels_last), msg


@pytest.mark.skipif(not has_kernel("channel_rms_norm_fused", "cpu"), reason="dcgen._C not built")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cpu_kernel_matches_reference(dtype, rng):
    _check_kernel("cpu", dtype, rng)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cuda_kernel_matches_reference(dtype, rng):
    if not has_kernel("channel_rms_norm_fused", "cuda"):
        pytest.skip("dcgen._C has no CUDA kernel for channel_rms_norm_fused")
    _check_kernel("cuda", dtype, rng)


@pytest.mark.cuda
def test_cuda_misaligned_residual_takes_scalar_path(rng):
    # x aligned, residual one element into its storage: the 16-byte path must not be used.
    if not has_kernel("channel_rms_norm_fused", "cuda"):
        pytest.skip("dcgen._C has no CUDA kernel for channel_rms_norm_fused")
    shape = (2, 16, 8, 8)
    x = torch.randn(shape, generator=rng).bfloat16().cuda()
    base = torch.randn(x.numel() + 1, generator=rng).bfloat16().cuda()
    r = base[1:].view(shape)
    w, b = torch.randn(16, generator=rng).cuda(), torch.randn(16, generator=rng).cuda()
    poison_cuda_allocator()
    got = channel_rms_norm_fused(x, w, b, 1e-5, "relu", r)
    want = channel_rms_norm_fused_reference(x.float(), w, b, 1e-5, "relu", r.float())
    torch.testing.assert_close(got.float(), want, atol=1.6e-2, rtol=1.6e-2)


def _check_out_kernel(device, dtype, gen):
    # channel_rms_norm_fused_out into a fresh poisoned tensor, into the residual (the banded
    # ResBlock ending) and into x itself (the head): the out-of-place kernel's bits each time.
    out_kernel = compiled_op("channel_rms_norm_fused_out")
    kernel = compiled_op("channel_rms_norm_fused")
    for shape in SHAPES:
        for act in ACTS:
            x, w, b, r = _inputs(shape, dtype, device, gen)
            for layout, xl, rl in _layouts(x, r):
                if layout in ("strided", "mixed"):
                    continue  # out must have x's dense layout; those go through a copy
                want = kernel(xl, w, b, rl, act, 1e-5)
                msg = f"{layout} {shape} {act}"
                out = torch.full_like(xl, float("nan"))  # poisoned, in x's layout
                out_kernel(xl, w, b, rl, act, 1e-5, out)
                assert torch.equal(out, want), msg
                res = torch.empty_like(xl).copy_(rl)  # the residual, in x's dense layout
                out_kernel(xl, w, b, res, act, 1e-5, res)  # out is the residual
                assert torch.equal(res, want), msg
                xc = xl.clone()
                out_kernel(xc, w, b, None, act, 1e-5, xc)  # out is x itself
                assert torch.equal(xc, kernel(xl, w, b, None, act, 1e-5)), msg


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def test_out_kernel_writes_the_fused_kernels_bits_in_place(device, dtype, rng):
    if not has_kernel("channel_rms_norm_fused_out", device):
        pytest.skip(f"dcgen._C has no {device} kernel for channel_rms_norm_fused_out")
    _check_out_kernel(device, dtype, rng)


@pytest.mark.skipif(
    not has_kernel("channel_rms_norm_fused_out", "cpu"), reason="dcgen._C not built"
)
def test_public_out_argument_writes_in_place_or_copies(rng):
    # out= returns out with the result: the kernel writes a band of an NHWC map in place; an
    # out laid out otherwise (NCHW for a channels_last x) gets the result copied in; autograd
    # takes the reference and copies too.
    x, w, b, r = _inputs((1, 16, 12, 6), torch.bfloat16, "cpu", rng)
    big = x.to(memory_format=torch.channels_last)
    band, rband = big[:, :, 2:7], r.to(memory_format=torch.channels_last)[:, :, 2:7]
    want = channel_rms_norm_fused(band, w, b, 1e-5, "silu", rband)
    before = big.clone()
    got = channel_rms_norm_fused(band, w, b, 1e-5, "silu", rband, out=band)
    assert got is band and torch.equal(big[:, :, 2:7], want)
    assert torch.equal(big[:, :, :2], before[:, :, :2]) and torch.equal(
        big[:, :, 7:], before[:, :, 7:]
    )
    nchw = torch.empty(band.shape, dtype=band.dtype)
    assert channel_rms_norm_fused(band, w, b, 1e-5, "silu", rband, out=nchw) is nchw
    assert torch.equal(nchw, channel_rms_norm_fused(band, w, b, 1e-5, "silu", rband))
    xg = x.float().requires_grad_()
    out = torch.empty(x.shape)
    got = channel_rms_norm_fused(xg, w, b, 1e-5, "relu", None, out=out)
    assert got is out and got.requires_grad  # the reference, copied in (differentiably)
    want = channel_rms_norm_fused_reference(x.float(), w, b, 1e-5, "relu")
    torch.testing.assert_close(got.detach(), want)


@pytest.mark.skipif(
    not has_kernel("channel_rms_norm_fused_out", "cpu"), reason="dcgen._C not built"
)
def test_out_kernel_rejects_a_bad_out():
    x = torch.randn(2, 4, 3, 5)
    op = compiled_op("channel_rms_norm_fused_out")
    with pytest.raises(RuntimeError, match=r"expected out of shape \[2, 4, 3, 5\]"):
        op(x, None, None, None, "none", 1e-5, torch.empty(2, 4, 3, 4))
    with pytest.raises(RuntimeError, match="expected out of x's dtype Float, got BFloat16"):
        op(x, None, None, None, "none", 1e-5, torch.empty(2, 4, 3, 5, dtype=torch.bfloat16))
    with pytest.raises(RuntimeError, match="expected out laid out as x"):
        op(x, None, None, None, "none", 1e-5, torch.empty(2, 4, 5, 3).transpose(2, 3))
    with pytest.raises(ValueError, match=r"expected out of x's shape \(2, 4, 3, 5\)"):
        channel_rms_norm_fused(x, out=torch.empty(2, 4, 3))


@pytest.mark.skipif(not has_kernel("channel_rms_norm", "cpu"), reason="dcgen._C not built")
def test_plain_op_unchanged_by_fusion(rng):
    # The plain op runs the fused kernel with neither act nor residual: identical results.
    x, w, b, _ = _inputs((2, 24, 7, 5), torch.bfloat16, "cpu", rng, residual=False)
    plain = compiled_op("channel_rms_norm")(x, w, b, 1e-5)
    fused = compiled_op("channel_rms_norm_fused")(x, w, b, None, "none", 1e-5)
    torch.testing.assert_close(plain, fused, atol=0, rtol=0)
    torch.testing.assert_close(
        plain.float(), channel_rms_norm_reference(x.float(), w, b), atol=1.6e-2, rtol=1.6e-2
    )


@pytest.mark.skipif(not has_kernel("channel_rms_norm_fused", "cpu"), reason="dcgen._C not built")
def test_opcheck_schema_fake_and_compile(rng):
    op = torch.ops.dcgen.channel_rms_norm_fused.default
    x, w, b, r = _inputs((2, 8, 5, 3), torch.float32, "cpu", rng)
    band = torch.randn(2, 8, 9, 3, generator=rng).to(memory_format=torch.channels_last)[:, :, 2:7]
    for xl, rl in ((x, r), (x.to(memory_format=torch.channels_last), r), (x, None), (band, None)):
        torch.library.opcheck(
            op, (xl, w, b, rl, "silu", 1e-5), test_utils=("test_schema", "test_faketensor")
        )
    fn = torch.compile(
        lambda x: channel_rms_norm_fused(x, w, b, 1e-5, "relu", r) * 2,
        fullgraph=True,
        backend="eager",
    )
    torch.testing.assert_close(
        fn(x), channel_rms_norm_fused_reference(x, w, b, 1e-5, "relu", r) * 2
    )


def test_public_op_differentiable_through_reference(rng):
    x, w, b, r = _inputs((1, 6, 2, 2), torch.float64, "cpu", rng)
    x.requires_grad_(True)
    r.requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda x, r: channel_rms_norm_fused(x, w, b, 1e-5, "silu", r), (x, r)
    )
    # the plain public op is still there with its old signature
    torch.testing.assert_close(
        channel_rms_norm(x.detach(), w, b), channel_rms_norm_reference(x.detach(), w, b)
    )


@pytest.mark.parametrize(
    "kwargs, err, match",
    [
        (dict(act="gelu"), ValueError, "expected act in"),
        (dict(residual=torch.randn(2, 3, 5)), ValueError, "residual of x's shape"),
        (dict(residual=torch.randn(2, 3, 4).half()), TypeError, "expected dtype"),
        (dict(eps=0.0), ValueError, "eps > 0"),
        (dict(weight=torch.ones(4)), ValueError, r"shape \(3,\)"),
    ],
)
def test_bad_input_errors(kwargs, err, match):
    with pytest.raises(err, match=match):
        channel_rms_norm_fused(torch.randn(2, 3, 4), **kwargs)


@pytest.mark.skipif(not has_kernel("channel_rms_norm_fused", "cpu"), reason="dcgen._C not built")
def test_kernel_rejects_unknown_act():
    with pytest.raises(RuntimeError, match="expected act 'none', 'relu' or 'silu', got 'tanh'"):
        compiled_op("channel_rms_norm_fused")(torch.randn(2, 3, 4), None, None, None, "tanh", 1e-5)
