"""channel_rms_norm: compiled kernels against the PyTorch reference, the reference against
diffusers' RMSNorm semantics, dispatch rules, tracing and input errors."""

from __future__ import annotations

import pytest
import torch

from dcgen.ops import channel_rms_norm, channel_rms_norm_reference, has_kernel
from dcgen.ops._extension import compiled_op
from tests.conftest import poison_cuda_allocator

# Plane sizes that are and are not multiples of the CUDA kernel's 16-byte packets.
SHAPES = [
    (1, 1, 1, 1),
    (2, 3, 5, 7),
    (1, 32, 16, 16),
    (3, 130, 9, 11),
    (2, 1024, 4, 4),
    (2, 8, 33),
    (2, 64, 32, 48),
    (1, 5, 2, 6),
    # channels_last 16-byte packet kernel: 16 lanes a pixel (128 channels of 16-bit), 32 lanes
    # of 8 packets (2048)
    (1, 128, 3, 5),
    (1, 2048, 2, 3),
]
TOL = {torch.float32: (2e-6, 2e-6), torch.float16: (2e-3, 2e-3), torch.bfloat16: (1.6e-2, 1.6e-2)}


def _inputs(shape, dtype, device, gen, affine=(True, True)):
    x = torch.randn(shape, generator=gen).mul_(3).add_(0.5).to(dtype).to(device)
    c = shape[1]
    w = torch.randn(c, generator=gen).to(device) if affine[0] else None
    b = torch.randn(c, generator=gen).to(device) if affine[1] else None
    return x, w, b


def _layouts(x):
    yield "contiguous", x
    if x.ndim == 4:
        yield "channels_last", x.to(memory_format=torch.channels_last)
        yield "strided", x.transpose(2, 3)  # neither layout: the kernel copies to NCHW
        if x.shape[2] > 1:  # a band of rows of an NHWC batch: one copy, NHWC kept
            yield "channels_last band", x.to(memory_format=torch.channels_last)[:, :, 1:]


def _check_kernel(device, dtype, gen):
    kernel = compiled_op("channel_rms_norm")
    for shape in SHAPES:
        for affine in [(True, True), (True, False), (False, False)]:
            x, w, b = _inputs(shape, dtype, device, gen, affine)
            for layout, xl in _layouts(x):
                if device == "cuda":
                    poison_cuda_allocator()
                got = kernel(xl, w, b, 1e-5)
                want = channel_rms_norm_reference(xl.cpu().float(), _cpu(w), _cpu(b), 1e-5)
                assert got.shape == xl.shape and got.dtype == dtype, (layout, shape)
                assert not got.isnan().any(), f"unwritten or NaN output ({layout}, {shape})"
                atol, rtol = TOL[dtype]
                torch.testing.assert_close(
                    got.cpu().float(), want, atol=atol, rtol=rtol, msg=f"{layout} {shape} {affine}"
                )
                if layout.startswith("channels_last"):
                    assert got.is_contiguous(memory_format=torch.channels_last), layout


def _cpu(t):
    return None if t is None else t.cpu()


@pytest.mark.skipif(not has_kernel("channel_rms_norm", "cpu"), reason="dcgen._C not built")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cpu_kernel_matches_reference(dtype, rng):
    _check_kernel("cpu", dtype, rng)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cuda_kernel_matches_reference(dtype, rng):
    if not has_kernel("channel_rms_norm", "cuda"):
        pytest.skip("dcgen._C has no CUDA kernel for channel_rms_norm")
    _check_kernel("cuda", dtype, rng)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_kernel_misaligned_storage_offset(dtype, rng):
    # A contiguous view starting one element into its storage is not 16-byte aligned: the
    # kernel must take its scalar path and still be right.
    if not has_kernel("channel_rms_norm", "cuda"):
        pytest.skip("dcgen._C has no CUDA kernel for channel_rms_norm")
    shape = (2, 16, 8, 8)
    n = 2 * 16 * 8 * 8
    base = torch.randn(n + 1, generator=rng).to(dtype).cuda()
    x = base[1:].view(shape)
    w, b = torch.randn(16, generator=rng).cuda(), torch.randn(16, generator=rng).cuda()
    poison_cuda_allocator()
    got = compiled_op("channel_rms_norm")(x, w, b, 1e-5)
    want = channel_rms_norm_reference(x.cpu().float(), w.cpu(), b.cpu(), 1e-5)
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(got.cpu().float(), want, atol=atol, rtol=rtol)


@pytest.mark.cuda
def test_cuda_fp16_large_values_do_not_overflow(rng):
    # x^2 of 300 overflows fp16 (max 65504); the statistics must stay in fp32.
    x = (torch.randn(1, 64, 8, 8, generator=rng) * 300).half().cuda()
    y = channel_rms_norm(x, torch.ones(64, device="cuda"), torch.zeros(64, device="cuda"))
    assert torch.isfinite(y).all()
    ref = channel_rms_norm_reference(x.float(), None, None).half()
    torch.testing.assert_close(y, ref, atol=2e-3, rtol=2e-3)


def test_reference_matches_diffusers_rmsnorm(rng):
    diffusers_norm = pytest.importorskip("diffusers.models.normalization")
    c = 24
    norm = diffusers_norm.RMSNorm(c, eps=1e-5, elementwise_affine=True, bias=True)
    with torch.no_grad():
        norm.weight.normal_(generator=rng)
        norm.bias.normal_(generator=rng)
    x = torch.randn(2, c, 6, 5, generator=rng)
    want = norm(x.movedim(1, -1)).movedim(-1, 1)
    got = channel_rms_norm_reference(x, norm.weight, norm.bias, 1e-5)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)


def test_public_op_matches_reference_and_is_differentiable(rng):
    x, w, b = _inputs((2, 12, 4, 4), torch.float32, "cpu", rng)
    torch.testing.assert_close(channel_rms_norm(x, w, b), channel_rms_norm_reference(x, w, b))
    # With grad required the reference runs, so autograd works; check a real gradient.
    x.requires_grad_(True)
    w.requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda x, w: channel_rms_norm(x.double(), w.double(), None).sum(dim=(2, 3)),
        (x[:1, :, :2, :2].detach().double().requires_grad_(), w.detach().double().requires_grad_()),
    )


def test_disabled_kernels_fall_back_to_reference(monkeypatch, rng):
    x, w, b = _inputs((2, 16, 3, 3), torch.float32, "cpu", rng)
    monkeypatch.setenv("DCGEN_DISABLE_KERNELS", "1")
    assert not has_kernel("channel_rms_norm", "cpu")
    torch.testing.assert_close(channel_rms_norm(x, w, b), channel_rms_norm_reference(x, w, b))


@pytest.mark.skipif(not has_kernel("channel_rms_norm", "cpu"), reason="dcgen._C not built")
def test_opcheck_schema_fake_and_strides(rng):
    op = torch.ops.dcgen.channel_rms_norm.default
    x, w, b = _inputs((2, 8, 5, 3), torch.float32, "cpu", rng)
    # a band of rows of a channels_last batch (B > 1: not dense in any layout), and every other
    # image: the kernel keeps channels_last for these too, so must the fake (a torch.compile'd
    # decoder head's band failed inductor's output stride check)
    cl = torch.randn(4, 8, 10, 3, generator=rng).to(memory_format=torch.channels_last)
    for xl in (
        x,
        x.to(memory_format=torch.channels_last),
        x.transpose(2, 3),
        cl[:, :, 2:7],
        cl[::2],
    ):
        torch.library.opcheck(op, (xl, w, b, 1e-5), test_utils=("test_schema", "test_faketensor"))


@pytest.mark.skipif(not has_kernel("channel_rms_norm", "cpu"), reason="dcgen._C not built")
def test_torch_compile_traces_without_graph_break(rng):
    x, w, b = _inputs((2, 8, 4, 4), torch.float32, "cpu", rng)
    fn = torch.compile(lambda x: channel_rms_norm(x, w, b) * 2, fullgraph=True, backend="eager")
    torch.testing.assert_close(fn(x), channel_rms_norm_reference(x, w, b) * 2)


@pytest.mark.parametrize(
    "args, err, match",
    [
        ((torch.randn(4),), ValueError, "at least 2 dims"),
        ((torch.randn(2, 3, 4), torch.ones(4)), ValueError, r"shape \(3,\).*got \(4,\)"),
        ((torch.randn(2, 3, 4), None, torch.ones(2, 3)), ValueError, "expected a tensor with 1"),
        ((torch.randint(0, 3, (2, 3, 4)),), TypeError, "expected dtype"),
        (([1.0, 2.0],), TypeError, "expected a torch.Tensor, got list"),
        ((torch.randn(2, 3, 4), None, None, 0.0), ValueError, "eps > 0"),
    ],
)
def test_bad_input_errors(args, err, match):
    with pytest.raises(err, match=match):
        channel_rms_norm(*args)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_device_mismatch_error():
    with pytest.raises(ValueError, match="one device"):
        channel_rms_norm(torch.randn(2, 3, 4, device="cuda"), torch.ones(3))
