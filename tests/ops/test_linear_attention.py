"""relu_linear_attention: the reference against the N x N definition, the CUDA kernel against the
reference (fresh random inputs, poisoned outputs, several head dims and token counts), and
input errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dcgen.ops import has_kernel, relu_linear_attention, relu_linear_attention_reference
from dcgen.ops._extension import compiled_op
from dcgen.ops.linear_attention import token_major
from tests.conftest import poison_cuda_allocator, registered_cpu_kernel

# (B, heads, d, N): DC-AE head dim 32, reduced-test head dims, N below / at / above a tile,
# odd N and a 4K-decoder-like token count.
CASES = [(1, 1, 32, 1), (2, 3, 32, 17), (1, 2, 32, 64), (1, 2, 32, 65), (2, 4, 8, 1000),
         (1, 2, 2, 130), (1, 4, 32, 4097), (1, 2, 16, 20000)]  # fmt: skip
TOL = {torch.float32: (1e-4, 1e-4), torch.float16: (2e-3, 2e-3), torch.bfloat16: (1.6e-2, 1.6e-2)}


def _assert_close_scaled(got: torch.Tensor, want: torch.Tensor, dtype, msg: str) -> None:  # noqa: ANN001
    """Kernel output against the (fp32) reference: outputs are ratios of sums, so they are
    compared relative to the output's own scale, at the dtype's tolerance."""
    atol, rtol = TOL[dtype]
    scale = want.abs().max().item() + 1e-6
    torch.testing.assert_close(
        got.float().cpu() / scale, want / scale, atol=atol, rtol=rtol, msg=msg
    )


def _qkv(b, h, d, n, dtype, device, gen):
    return torch.randn(b, h, 3 * d, n, generator=gen).to(dtype).to(device)


def test_reference_equals_quadratic_definition(rng):
    # out_n = sum_m v_m (k_m . q_n) / sum_m (k_m . q_n), with relu on q and k, in float64.
    qkv = torch.randn(2, 3, 3 * 4, 50, generator=rng, dtype=torch.float64)
    q, k, v = qkv.split(4, dim=2)
    q, k = F.relu(q), F.relu(k)
    scores = torch.einsum("bhdm,bhdn->bhmn", k, q)  # (m: keys, n: queries)
    want = torch.einsum("bhdm,bhmn->bhdn", v, scores) / (scores.sum(dim=2, keepdim=True) + 1e-15)
    # The spec computes in fp32 (a float64 input too): fp32 rounding of sums over 50 tokens,
    # which float64's default tolerance (1e-7) rejected for some random inputs.
    torch.testing.assert_close(relu_linear_attention_reference(qkv), want, atol=1e-5, rtol=1e-5)


def test_public_op_on_cpu_is_the_reference(rng):
    qkv = torch.randn(1, 2, 96, 40, generator=rng)
    torch.testing.assert_close(relu_linear_attention(qkv), relu_linear_attention_reference(qkv))


def test_fp16_input_keeps_fp32_sums(rng):
    # 70k tokens of magnitude ~3: the sums overflow fp16 (max 65504) unless kept in fp32.
    qkv = (torch.randn(1, 1, 96, 70000, generator=rng) * 3).half()
    out = relu_linear_attention(qkv)
    assert out.dtype == torch.float16 and torch.isfinite(out).all()


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cuda_kernel_matches_reference(dtype, rng):
    if not has_kernel("relu_linear_attention", "cuda"):
        pytest.skip("dcgen._C has no CUDA kernel for relu_linear_attention")
    kernel = compiled_op("relu_linear_attention")
    for b, h, d, n in CASES:
        qkv = _qkv(b, h, d, n, dtype, "cuda", rng)
        poison_cuda_allocator()
        got = kernel(qkv, 1e-15)
        want = relu_linear_attention_reference(qkv.double().cpu()).float()
        assert got.shape == (b, h, d, n) and got.dtype == dtype
        assert not got.isnan().any(), f"unwritten or NaN output at {(b, h, d, n)}"
        _assert_close_scaled(got, want, dtype, f"{(b, h, d, n)} {dtype}")


@pytest.mark.cuda
def test_cuda_kernel_is_deterministic_and_traceable(rng):
    if not has_kernel("relu_linear_attention", "cuda"):
        pytest.skip("dcgen._C has no CUDA kernel for relu_linear_attention")
    qkv = _qkv(1, 8, 32, 100000, torch.bfloat16, "cuda", rng)
    a = relu_linear_attention(qkv)
    b = relu_linear_attention(qkv)
    assert torch.equal(a, b), "no atomics: the same input must give bit-identical output"
    # the channel-fastest layout's register-tiled reduce too
    cl = _channels_last_qkv(1, 8, 32, (250, 400), torch.bfloat16, "cuda", rng)
    assert torch.equal(relu_linear_attention(cl), relu_linear_attention(cl))
    torch.library.opcheck(
        torch.ops.dcgen.relu_linear_attention.default, (qkv[:, :2, :, :300].contiguous(), 1e-15),
        test_utils=("test_schema", "test_faketensor"),
    )  # fmt: skip


@pytest.mark.parametrize(
    "qkv, match",
    [
        (torch.randn(2, 96, 10), "expected a tensor with 4 dims"),
        (torch.randn(1, 2, 95, 10), "3\\*head_dim"),
        (torch.randn(1, 1, 0, 5), "head_dim >= 1"),  # was a tuple-unpacking error
    ],
)
def test_bad_input(qkv, match):
    with pytest.raises(ValueError, match=match):
        relu_linear_attention(qkv)


# ------------------------------------------------- the channel-fastest (channels_last) layout


def _channels_last_qkv(b, h, d, hw, dtype, device, gen):
    """LiteMLA's view of a channels_last qkv conv output: (B, heads, 3d, H*W), channel-fastest."""
    height, width = hw
    conv_out = torch.randn(b, h * 3 * d, height, width, generator=gen).to(dtype).to(device)
    conv_out = conv_out.contiguous(memory_format=torch.channels_last)
    return conv_out.reshape(b, h, 3 * d, height * width)


def test_channels_last_view_is_token_major_and_not_a_copy(rng):
    qkv = _channels_last_qkv(2, 3, 4, (5, 7), torch.float32, "cpu", rng)
    assert token_major(qkv) and qkv.stride() == (3 * 12 * 35, 12, 1, 36)
    assert not token_major(qkv.contiguous())
    assert not token_major(_channels_last_qkv(1, 2, 4, (1, 1), torch.float32, "cpu", rng))


def test_fake_output_follows_the_kernels_layout(rng):
    # The registered fake (what torch.compile traces) gives the kernel's strides: channel-fastest
    # for a channel-fastest qkv, contiguous otherwise.
    from torch._subclasses.fake_tensor import FakeTensorMode

    from dcgen.ops import _extension

    if not _extension.has_schema("relu_linear_attention"):
        pytest.skip("dcgen._C is not built: no fake registered")
    op = torch.ops.dcgen.relu_linear_attention.default
    with FakeTensorMode() as mode:
        cl = mode.from_tensor(_channels_last_qkv(2, 3, 4, (5, 7), torch.float32, "cpu", rng))
        plain = mode.from_tensor(torch.randn(2, 3, 12, 35))
        y_cl, y_plain = op(cl, 1e-15), op(plain, 1e-15)
    assert y_cl.shape == y_plain.shape == (2, 3, 4, 35)
    assert y_cl.stride() == (35 * 12, 4, 1, 12)
    assert y_cl.reshape(2, 12, 5, 7).is_contiguous(memory_format=torch.channels_last)
    assert y_plain.is_contiguous()


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cuda_kernel_reads_channels_last_in_place(dtype, rng):
    # Channel-fastest qkv (d = 32: 16-byte token loads and stores; d = 8: per element), batch
    # > 1, a slice of heads (another base offset), a misaligned storage offset (per element):
    # the reference's values, written channel-fastest into poisoned memory.
    if not has_kernel("relu_linear_attention", "cuda"):
        pytest.skip("dcgen._C has no CUDA kernel for relu_linear_attention")
    kernel = compiled_op("relu_linear_attention")
    views = {
        "d32": _channels_last_qkv(2, 3, 32, (33, 65), dtype, "cuda", rng),
        "d8": _channels_last_qkv(1, 4, 8, (40, 25), dtype, "cuda", rng),
        "heads-slice": _channels_last_qkv(1, 4, 32, (16, 16), dtype, "cuda", rng)[:, 1:3],
    }
    flat = torch.randn(1 + 50 * 2 * 96, generator=rng).to(dtype).cuda()
    views["misaligned"] = flat[1:].view(1, 50, 2, 96).permute(0, 2, 3, 1)  # (1, 2, 96, 50)
    for name, qkv in views.items():
        assert token_major(qkv), name
        poison_cuda_allocator()
        got = kernel(qkv, 1e-15)
        b, h, d3, n = qkv.shape
        assert got.shape == (b, h, d3 // 3, n), name
        assert got.stride() == (n * h * (d3 // 3), d3 // 3, 1, h * (d3 // 3)), name
        assert not got.isnan().any(), f"unwritten or NaN output ({name})"
        want = relu_linear_attention_reference(qkv.double().cpu()).float()
        _assert_close_scaled(got, want, dtype, f"{name} {dtype}")


@pytest.mark.cuda
def test_cuda_litemla_makes_no_layout_copy(rng):
    # A fused channels_last LiteMLA (multi-scale, as SANA's) runs the kernel on its qkv conv
    # output as it is and gets channels_last outputs back: no copy of a map-sized tensor.
    if not has_kernel("relu_linear_attention", "cuda"):
        pytest.skip("dcgen._C has no CUDA kernel for relu_linear_attention")
    from dcgen.autoencoders.blocks import LiteMLA

    torch.manual_seed(0)
    block = LiteMLA(256, 32, (5,), "rms_norm").cuda().bfloat16().eval()
    block = block.to(memory_format=torch.channels_last)
    x = torch.randn(1, 256, 64, 64, device="cuda").bfloat16()
    x = x.contiguous(memory_format=torch.channels_last)
    with torch.inference_mode(), torch.profiler.profile(record_shapes=True) as prof:
        y = block(x)
    assert y.is_contiguous(memory_format=torch.channels_last)
    # qkv's and the aggregated qkv's (B, heads, 3d, N) views, the attention outputs, and their
    # (B, C, H, W) views (a depthwise conv may copy its own input: not counted)
    watched = {(1, 8, 96, 4096), (1, 8, 32, 4096), (1, 256, 64, 64)}
    copies = [
        (e.name, e.input_shapes)
        for e in prof.events()
        if e.name in ("aten::copy_", "aten::contiguous", "aten::clone")
        and any(tuple(s) in watched for s in e.input_shapes)
    ]
    assert not copies, copies


@pytest.fixture
def token_major_cpu_kernel(monkeypatch):
    """A CPU kernel for dcgen::relu_linear_attention with the CUDA kernel's output layout (the
    reference's values, channel-fastest for a channel-fastest qkv), visible to has_kernel;
    yields whether each call's qkv was channel-fastest."""
    calls: list[bool] = []

    def kernel(qkv, eps):  # noqa: ANN001, ANN202
        calls.append(token_major(qkv))
        y = relu_linear_attention_reference(qkv, eps)
        if token_major(qkv):
            y = y.permute(0, 3, 1, 2).contiguous().permute(0, 2, 3, 1)
        return y

    with registered_cpu_kernel(monkeypatch, "relu_linear_attention", kernel):
        yield calls


@pytest.mark.parametrize("scales", [(), (5,)])
def test_litemla_takes_the_kernels_channels_last_output_as_it_is(token_major_cpu_kernel, scales):
    # On the fused channels_last path LiteMLA hands the kernel its qkv view unchanged and uses
    # the channel-fastest outputs (cat of several scales included) without a layout copy; the
    # block's result equals the plain block's.
    from dcgen.autoencoders.blocks import LiteMLA
    from dcgen.autoencoders.fused import fused_inference

    torch.manual_seed(0)
    block = LiteMLA(64, 8, scales, "rms_norm").eval().to(memory_format=torch.channels_last)
    x = torch.randn(1, 64, 6, 5).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        with fused_inference(False):
            want = block(x)
        token_major_cpu_kernel.clear()
        with fused_inference(True), torch.profiler.profile(record_shapes=True) as prof:
            got = block(x)
    assert token_major_cpu_kernel == [True] * (1 + len(scales))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # the attention outputs' (B, C, H, W) views, alone or concatenated (the reference's own
    # matmuls may copy their (B, heads, d, N) operands: not counted)
    outs = {(1, 64, 6, 5), (1, 64 * (1 + len(scales)), 6, 5)}
    copies = [
        e.input_shapes
        for e in prof.events()
        if e.name in ("aten::contiguous", "aten::clone")
        and any(tuple(s) in outs for s in e.input_shapes)
    ]
    assert not copies, copies
