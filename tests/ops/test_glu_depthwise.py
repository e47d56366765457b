"""glu_depthwise_conv: the reference against GLUMBConv's unfused middle, the CUDA kernel
against the reference (layouts, dtypes, with and without bias), tracing and input errors."""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F

from dcgen.ops import glu_depthwise_conv, glu_depthwise_conv_reference, has_kernel
from dcgen.ops._extension import compiled_op
from tests.conftest import misaligned_copy, poison_cuda_allocator, registered_cpu_kernel

# (B, 2*Ch, H, W): odd sizes, 1-pixel rows/columns (all-border), a single channel pair. On CUDA,
# channels_last 16-bit maps with Ch % 4 == 0 take the 4-channel strip kernel: rows longer than
# one strip with a partial last strip (W = 19, strips of 4), and a channel-group count that is
# not a multiple of the warp (Ch = 260: 65 groups), and rows or columns of 1 and 2 pixels
# (every tap at a border) with W % 4 of 1 and 2; Ch = 1 and 3 take the per-element kernel. A
# thread of the strip kernel walks 8 strips: rows of 10 strips (W = 40) make runs that carry
# their window from strip to strip and cross a row, and (3, 8, 3, 9) runs that cross images.
SHAPES = [(2, 8, 5, 7), (1, 2, 1, 1), (1, 6, 1, 9), (2, 16, 8, 8), (1, 64, 13, 3),
          (1, 8, 4, 19), (2, 520, 3, 10), (1, 8, 1, 5), (2, 8, 2, 1), (1, 8, 2, 2),
          (3, 8, 3, 9), (1, 16, 5, 40)]  # fmt: skip
TOL = {torch.float32: (2e-5, 2e-5), torch.float16: (2e-3, 2e-3), torch.bfloat16: (1.6e-2, 1.6e-2)}


def glu_expand_act(x: torch.Tensor, expand_bias: torch.Tensor) -> torch.Tensor:
    """silu(x + expand_bias) in fp32, rounded to x's dtype: bias_act_ "silu"'s stored values."""
    return F.silu(x.float() + expand_bias.float().view(1, -1, 1, 1)).to(x.dtype)


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
    # with and without the depthwise bias, and with the expand bias (x pre-activation); the
    # reference gets x in x's dtype with the expand bias, as its activated input is rounded there
    kernel = compiled_op("glu_depthwise_conv")
    for shape in SHAPES:
        for with_bias, with_expand in ((True, False), (False, False), (True, True)):
            x, w, b = _inputs(shape, dtype, gen, with_bias)
            eb = torch.randn(shape[1], generator=gen).to(dtype).cuda() if with_expand else None
            x, w = x.cuda(), w.cuda()
            b = None if b is None else b.cuda()
            b_cpu = None if b is None else b.cpu().float()
            if eb is None:
                want = glu_depthwise_conv_reference(x.cpu().float(), w.cpu().float(), b_cpu)
            else:
                act = glu_expand_act(x.cpu(), eb.cpu()).float()
                want = glu_depthwise_conv_reference(act, w.cpu().float(), b_cpu)
            layouts = {
                "contiguous": x,
                "channels_last": x.to(memory_format=torch.channels_last),
                "strided": x.transpose(2, 3).contiguous().transpose(2, 3),
            }
            for layout, xl in layouts.items():
                poison_cuda_allocator()
                got = kernel(xl, w, b, eb)
                msg = f"{layout} {shape} bias={with_bias} expand_bias={with_expand}"
                assert got.shape == want.shape and got.dtype == dtype, msg
                assert not got.isnan().any(), f"unwritten output ({msg})"
                atol, rtol = TOL[dtype]
                torch.testing.assert_close(got.cpu().float(), want, atol=atol, rtol=rtol, msg=msg)


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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES[:4])
def test_reference_expand_bias_is_the_activated_input(shape, dtype, rng):
    # glu(x, expand_bias=e) == glu(silu(x + e) rounded to x's dtype): bit for bit, so the fused
    # GLUMBConv gives what the bias_act_ pass it replaces gave.
    x, w, b = _inputs(shape, dtype, rng)
    e = torch.randn(shape[1], generator=rng).to(dtype)
    want = glu_depthwise_conv_reference(glu_expand_act(x, e), w, b)
    torch.testing.assert_close(glu_depthwise_conv_reference(x, w, b, e), want, atol=0, rtol=0)
    torch.testing.assert_close(glu_depthwise_conv(x, w, b, expand_bias=e), want, atol=0, rtol=0)


def test_expand_bias_zero_padding_is_of_the_activated_map(rng):
    # The conv's zero padding pads silu(x + e), not x: corner output (0, 0) sees 4 activated
    # inputs and 5 zeros (silu(0 + e) != 0 would leak into the border otherwise).
    x, w, _ = _inputs((1, 2, 4, 4), torch.float64, rng, with_bias=False)
    e = torch.tensor([0.7, -0.3], dtype=torch.float64)
    act = F.silu(x + e.view(1, -1, 1, 1))
    out = glu_depthwise_conv_reference(x, w, expand_bias=e)
    a = (act[0, 0, :2, :2] * w[0, 0, 1:, 1:]).sum()
    g = (act[0, 1, :2, :2] * w[1, 0, 1:, 1:]).sum()
    torch.testing.assert_close(out[0, 0, 0, 0], a * g * torch.sigmoid(g))


def test_expand_bias_errors():
    x, w = torch.randn(1, 4, 3, 3), torch.randn(4, 1, 3, 3)
    with pytest.raises(ValueError, match=r"expected expand_bias of shape \(4,\), got \(3,\)"):
        glu_depthwise_conv(x, w, expand_bias=torch.randn(3))
    with pytest.raises(TypeError, match="glu_depthwise_conv: expand_bias"):
        glu_depthwise_conv(x, w, expand_bias=torch.randint(0, 2, (4,)))


def test_expand_bias_is_differentiable(rng):
    x, w, b = _inputs((1, 4, 3, 3), torch.float64, rng)
    e = torch.randn(4, dtype=torch.float64, generator=rng, requires_grad=True)
    x.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x, e: glu_depthwise_conv(x, w, b, expand_bias=e), (x, e))


@pytest.fixture
def cpu_glu_kernel(monkeypatch):
    """A CPU kernel for dcgen::glu_depthwise_conv that runs the reference (the CUDA kernel is
    tested against the same reference above), visible to has_kernel; yields each call's
    expand_bias."""
    calls: list[torch.Tensor | None] = []

    def kernel(x, weight, bias, expand_bias=None):  # noqa: ANN001, ANN202
        calls.append(expand_bias)
        return glu_depthwise_conv_reference(x, weight, bias, expand_bias)

    with registered_cpu_kernel(monkeypatch, "glu_depthwise_conv", kernel):
        yield calls


@pytest.mark.parametrize("with_bias_act", [True, False])
def test_glumbconv_applies_its_expand_bias_before_the_depthwise_kernel(
    cpu_glu_kernel, monkeypatch, with_bias_act
):
    # The fused path feeds the depthwise kernel silu(expand(x)) and not expand_bias= (that
    # kernel form measured 2.5x slower on the H200: GLUMBConv._expand_act). Where bias_act_ has
    # a kernel, the expand conv runs without its bias and one bias_act_ "silu" pass adds it;
    # without one, the conv keeps its bias. Both equal the plain block.
    import dcgen.autoencoders.blocks as blocks
    from dcgen.autoencoders.fused import fused_inference
    from dcgen.ops import bias_act_reference

    acts: list[str] = []
    if with_bias_act:

        def bias_act(out, x, bias, act, residual):  # noqa: ANN001, ANN202
            acts.append(act)
            out.copy_(bias_act_reference(x, bias, act, residual))

        monkeypatch.setattr("dcgen.ops.bias_act.kernel_takes", lambda *a: True)
        stack = registered_cpu_kernel(monkeypatch, "bias_act_", bias_act)
    else:
        stack = contextlib.nullcontext()
    torch.manual_seed(0)
    block = blocks.GLUMBConv(8).eval()
    with torch.no_grad():
        block.expand.bias.normal_()
        block.norm.weight.normal_()
    x = torch.randn(1, 8, 7, 5)
    with stack, torch.inference_mode():
        with fused_inference(False):
            want = block(x)
        with fused_inference(True):
            got = block(x)
    assert cpu_glu_kernel == [None]  # the kernel ran, without expand_bias
    assert acts == (["silu"] if with_bias_act else [])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
