"""fp8_scale_epilogue: act(y * row_scale * col_scale + bias), its spec and its CUDA kernel, and
its two other forms: written into part of a larger buffer (_into), and with the output's FP8 row
quantization (_fp8)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dcgen.ops import (
    fp8_scale_epilogue,
    fp8_scale_epilogue_fp8,
    fp8_scale_epilogue_into,
    fp8_scale_epilogue_reference,
    has_kernel,
)
from dcgen.ops._extension import compiled_op
from dcgen.ops.quantize_fp8 import quantize_fp8
from tests.conftest import poison_cuda_allocator

DTYPES = [torch.bfloat16, torch.float16]
# Odd N (scalar tail), N % 8 == 0 (vector path), one row, one column, a FLUX-like width.
SHAPES = [(5, 24), (3, 13), (1, 1), (7, 1), (1, 9), (33, 3072), (2, 1031)]


def _inputs(m, n, dtype, rng, device="cpu", bias=True):
    # y like an unscaled FP8 product: sums of e4m3 codes, up to ~1e5 in size (fp16: kept
    # finite, below its 65,504 limit; an inf would make GELU's NaN, in torch as in the kernel).
    y = torch.randn(m, n, generator=rng) * 3e4
    if dtype == torch.float16:
        y = y.clamp(-6e4, 6e4)
    y = y.to(dtype)
    rs = torch.rand(m, 1, generator=rng) * 1e-3 + 1e-5
    cs = torch.rand(n, 1, generator=rng) * 1e-2 + 1e-4
    b = torch.randn(n, generator=rng).to(dtype) if bias else None
    move = lambda t: None if t is None else t.to(device)  # noqa: E731
    return move(y), move(rs), move(cs), move(b)


@pytest.mark.parametrize("act", ["none", "gelu_tanh"])
def test_reference_is_the_documented_formula(act, rng):
    y, rs, cs, b = _inputs(4, 10, torch.bfloat16, rng)
    got = fp8_scale_epilogue_reference(y, rs, cs, b, act)
    o = y.double() * rs.double() * cs.double().T + b.double()
    if act == "gelu_tanh":
        o = F.gelu(o, approximate="tanh")
    assert got.dtype == torch.bfloat16 and got.shape == y.shape
    # fp32 math rounded once to bf16: within one bf16 rounding of the fp64 value.
    torch.testing.assert_close(got.double(), o, rtol=2**-8, atol=1e-6)


def test_public_op_without_bias_and_flat_scales(rng):
    y, rs, cs, _ = _inputs(6, 16, torch.float16, rng, bias=False)
    got = fp8_scale_epilogue(y, rs.flatten(), cs.flatten())
    want = (y.float() * rs * cs.T).half()
    assert torch.equal(got, want)


def test_bad_inputs(rng):
    y, rs, cs, b = _inputs(4, 8, torch.bfloat16, rng)
    with pytest.raises(TypeError, match="bfloat16"):
        fp8_scale_epilogue(y.float(), rs, cs)
    with pytest.raises(ValueError, match="row_scale with 4 elements"):
        fp8_scale_epilogue(y, rs[:3], cs)
    with pytest.raises(ValueError, match="col_scale with 8 elements"):
        fp8_scale_epilogue(y, rs, torch.ones(9))
    with pytest.raises(TypeError, match="float32"):
        fp8_scale_epilogue(y, rs.double(), cs)
    with pytest.raises(ValueError, match="floating bias of 8"):
        fp8_scale_epilogue(y, rs, cs, torch.ones(7))
    with pytest.raises(ValueError, match="act"):
        fp8_scale_epilogue(y, rs, cs, b, "relu")
    with pytest.raises(ValueError, match="2"):
        fp8_scale_epilogue(y[None], rs, cs)


@pytest.mark.parametrize("layout", ["columns", "rows"])
def test_into_writes_only_its_block_of_a_larger_buffer(layout, rng):
    # out as a column block of a wider buffer (a single block's [attention | MLP] input) or a
    # row block of a longer one (a joint [text, image] sequence): the block gets
    # fp8_scale_epilogue's values, everything around it stays as it was.
    y, rs, cs, b = _inputs(5, 24, torch.bfloat16, rng)
    if layout == "columns":
        buf = torch.full((5, 40), 7.0, dtype=torch.bfloat16)
        block = (slice(None), slice(10, 34))
    else:
        buf = torch.full((9, 24), 7.0, dtype=torch.bfloat16)
        block = (slice(2, 7), slice(None))
    before = buf.clone()
    fp8_scale_epilogue_into(y, rs, cs, b, "gelu_tanh", buf[block])
    assert torch.equal(buf[block], fp8_scale_epilogue(y, rs, cs, b, "gelu_tanh"))
    outside = torch.ones_like(buf, dtype=torch.bool)
    outside[block] = False
    assert torch.equal(buf[outside], before[outside])


def test_into_rejects_an_out_that_does_not_fit(rng):
    y, rs, cs, b = _inputs(4, 8, torch.bfloat16, rng)
    with pytest.raises(ValueError, match=r"expected out of y's shape \(4, 8\).*got \(4, 9\)"):
        fp8_scale_epilogue_into(y, rs, cs, b, "none", torch.empty(4, 9, dtype=torch.bfloat16))
    with pytest.raises(TypeError, match="fp8_scale_epilogue_into: out"):
        fp8_scale_epilogue_into(y, rs, cs, b, "none", torch.empty(4, 8, dtype=torch.float16))


@pytest.mark.parametrize("act", ["none", "gelu_tanh"])
def test_fp8_form_is_the_epilogue_and_its_row_quantization(act, rng):
    y, rs, cs, b = _inputs(6, 40, torch.bfloat16, rng)
    out, q, q_scales = fp8_scale_epilogue_fp8(y, rs, cs, b, act)
    assert torch.equal(out, fp8_scale_epilogue(y, rs, cs, b, act))
    want_q, want_s = quantize_fp8(out, "row")
    assert q.dtype == torch.float8_e4m3fn and q_scales.shape == (6, 1)
    assert torch.equal(q.view(torch.uint8), want_q.view(torch.uint8))
    assert torch.equal(q_scales, want_s)


def test_every_form_takes_its_kernel_unless_a_gradient_is_needed(monkeypatch, rng):
    # The plain, in-place and quantizing forms decide alike: the kernel whenever nothing that
    # requires grad is involved (grad mode on or off), the reference when something does. (The
    # in-place and quantizing forms once required grad mode off, so a CUDA test calling them
    # with grad on compared the reference with the kernels instead of testing its kernel.)
    import dcgen.ops.fp8_epilogue as ep

    calls = []

    def fake_op(name):
        def run(y, rs, cs, b, act, *out):  # noqa: ANN001, ANN002, ANN202
            calls.append(name)
            res = ep.fp8_scale_epilogue_reference(y, rs, cs, b, act)
            if name.endswith("_into"):
                return out[0].copy_(res)
            return (res, *quantize_fp8(res, "row")) if name.endswith("_fp8") else res

        return run

    monkeypatch.setattr(ep, "has_kernel", lambda name, device: True)
    monkeypatch.setattr(ep, "compiled_op", fake_op)
    y, rs, cs, b = _inputs(4, 16, torch.bfloat16, rng)
    forms = {
        "fp8_scale_epilogue": lambda y: ep.fp8_scale_epilogue(y, rs, cs, b),
        "fp8_scale_epilogue_into": lambda y: ep.fp8_scale_epilogue_into(
            y, rs, cs, b, "none", torch.empty(4, 16, dtype=torch.bfloat16)
        ),
        "fp8_scale_epilogue_fp8": lambda y: ep.fp8_scale_epilogue_fp8(y, rs, cs, b),
    }
    for name, form in forms.items():
        for grad_mode in (True, False):
            calls.clear()
            with torch.set_grad_enabled(grad_mode):
                form(y)
            assert calls == [name], (name, grad_mode)
        calls.clear()
        form(y.clone().requires_grad_())
        assert calls == [], name


def _need_kernel() -> None:
    if not has_kernel("fp8_scale_epilogue", "cuda"):
        pytest.skip("dcgen._C has no CUDA fp8_scale_epilogue kernel")


@pytest.mark.cuda
@pytest.mark.parametrize("act", ["none", "gelu_tanh"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_kernel_matches_reference(dtype, act, rng):
    _need_kernel()
    for m, n in SHAPES:
        for bias in (True, False):
            y, rs, cs, b = _inputs(m, n, dtype, rng, "cuda", bias)
            poison_cuda_allocator()
            got = compiled_op("fp8_scale_epilogue")(y, rs, cs, b, act)
            bc = None if b is None else b.cpu()
            want = fp8_scale_epilogue_reference(y.cpu(), rs.cpu(), cs.cpu(), bc, act)
            assert got.dtype == dtype and got.shape == (m, n)
            assert not got.isnan().any(), f"unwritten elements {m}x{n}"
            if act == "none":
                # Same fp32 operations in the same order, one rounding: bit-identical.
                assert torch.equal(got.cpu(), want), (m, n, dtype, bias)
            else:
                # tanhf vs torch's CPU tanh: a few fp32 ulps, at most one output rounding step.
                torch.testing.assert_close(got.cpu().float(), want.float(), rtol=2**-7, atol=1e-3)


@pytest.mark.cuda
@pytest.mark.parametrize("act", ["none", "gelu_tanh"])
def test_cuda_into_kernel_writes_its_block_bit_for_bit(act, rng):
    # dcgen::fp8_scale_epilogue_into into a poisoned wider buffer: its block equals
    # fp8_scale_epilogue's output bit for bit, the columns around it stay poisoned (NaN).
    # Both 16-bit types; the block starts one row down (a row offset) and, with pad 3, at an
    # odd column, so rows of odd N have an odd stride (M = 1 included).
    if not has_kernel("fp8_scale_epilogue_into", "cuda"):
        pytest.skip("dcgen._C has no CUDA fp8_scale_epilogue_into kernel")
    for dtype in DTYPES:
        for m, n in SHAPES:
            for pad in (0, 8, 3):  # 16-byte aligned rows, and rows that are not
                y, rs, cs, b = _inputs(m, n, dtype, rng, "cuda")
                want = fp8_scale_epilogue(y, rs, cs, b, act)
                # the buffer is the test's own, so poisoned by hand: the allocator poisoning
                # reaches only whole free segments, and a small buffer lands in a segment that
                # the inputs above already hold (on the H200, 2026-11-27: stale non-NaN bytes)
                buf = torch.full((m + 2, n + 2 * pad), float("nan"), dtype=dtype, device="cuda")
                out = buf[1 : m + 1, pad : pad + n]
                compiled_op("fp8_scale_epilogue_into")(y, rs, cs, b, act, out)
                case = (dtype, m, n, pad)
                _same_bits(out, want, case)
                assert buf[:, :pad].isnan().all() and buf[:, pad + n :].isnan().all(), case
                assert buf[0].isnan().all() and buf[m + 1].isnan().all(), case


def _same_bits(a: torch.Tensor, b: torch.Tensor, msg: object) -> None:
    """Bit-equal except that any NaN matches any NaN."""
    nan_a, nan_b = a.float().isnan().cpu(), b.float().isnan().cpu()
    assert torch.equal(nan_a, nan_b), msg
    bits = {1: torch.uint8, 2: torch.int16, 4: torch.int32}[a.element_size()]
    assert torch.equal(a.cpu().view(bits)[~nan_a], b.cpu().view(bits)[~nan_b]), msg


@pytest.mark.cuda
@pytest.mark.parametrize("act", ["none", "gelu_tanh"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_fp8_kernel_is_epilogue_then_quantize_bit_for_bit(dtype, act, rng):
    # dcgen::fp8_scale_epilogue_fp8 against the two kernels it replaces, on poisoned memory:
    # the same output and the same codes and scales (rows of one and several CTA passes, odd N,
    # with and without bias, a NaN row).
    if not has_kernel("fp8_scale_epilogue_fp8", "cuda"):
        pytest.skip("dcgen._C has no CUDA fp8_scale_epilogue_fp8 kernel")
    for m, n in [*SHAPES, (3, 12288), (2, 12288 + 5)]:
        for bias in (True, False):
            y, rs, cs, b = _inputs(m, n, dtype, rng, "cuda", bias)
            if m > 2:
                y[1, n // 2] = float("nan")
            poison_cuda_allocator()
            out, q, q_scales = fp8_scale_epilogue_fp8(y, rs, cs, b, act)
            torch.cuda.synchronize()
            want_out = fp8_scale_epilogue(y, rs, cs, b, act)
            want_q, want_s = quantize_fp8(want_out, "row")
            _same_bits(out, want_out, (m, n, bias, "out"))
            _same_bits(q, want_q, (m, n, bias, "q"))
            _same_bits(q_scales, want_s, (m, n, bias, "scales"))


@pytest.mark.cuda
def test_cuda_fp8_kernel_misaligned_y_and_fp16_overflow(rng):
    # y 2 bytes past a 16-byte boundary with N % 8 == 0: the scalar loads and stores beside the
    # vector FP8 stores; and fp16 rows whose scaled values pass 65,504 (inf output, inf scale,
    # the quantize's division path), against the two kernels it replaces.
    if not has_kernel("fp8_scale_epilogue_fp8", "cuda"):
        pytest.skip("dcgen._C has no CUDA fp8_scale_epilogue_fp8 kernel")
    for dtype in DTYPES:
        buf = (torch.randn(1 + 9 * 64, generator=rng) * 100).to(dtype).cuda()
        y = buf[1:].view(9, 64)
        rs, cs = torch.rand(9, device="cuda") + 0.5, torch.rand(64, device="cuda") + 0.5
        if dtype == torch.float16:
            rs[4] = 1e4  # row 4: 100 * 1e4 >> 65,504
        for act in ("none", "gelu_tanh"):
            poison_cuda_allocator()
            out, q, q_scales = fp8_scale_epilogue_fp8(y, rs, cs, None, act)
            want_out = fp8_scale_epilogue(y, rs, cs, None, act)
            want_q, want_s = quantize_fp8(want_out, "row")
            if dtype == torch.float16:
                assert want_out[4].isinf().any(), "no overflow: the case tests nothing"
            _same_bits(out, want_out, (dtype, act, "out"))
            _same_bits(q, want_q, (dtype, act, "q"))
            _same_bits(q_scales, want_s, (dtype, act, "scales"))


@pytest.mark.cuda
def test_cuda_kernel_misaligned_and_flat_inputs(rng):
    _need_kernel()
    # A y whose storage starts 2 bytes past a 16-byte boundary takes the scalar path.
    buf = (torch.randn(1 + 9 * 64, generator=rng) * 100).to(torch.bfloat16).cuda()
    y = buf[1:].view(9, 64)
    rs, cs = torch.rand(9, device="cuda") + 0.5, torch.rand(64, device="cuda") + 0.5
    poison_cuda_allocator()
    got = fp8_scale_epilogue(y, rs, cs)
    assert torch.equal(got.cpu(), fp8_scale_epilogue_reference(y.cpu(), rs.cpu(), cs.cpu()))


@pytest.mark.cuda
def test_cuda_kernel_takes_a_bias_of_another_16_bit_type(rng):
    # The kernel reads the bias as fp32 or as y's dtype; the public op widens any other (an fp16
    # bias beside bf16 y) to fp32 first, exactly, instead of letting it be read as bf16 bits.
    _need_kernel()
    y, rs, cs, b = _inputs(5, 24, torch.bfloat16, rng, "cuda", True)
    b16 = (torch.randn(24, generator=rng) * 3).half().cuda()
    poison_cuda_allocator()
    got = fp8_scale_epilogue(y, rs, cs, b16)
    want = fp8_scale_epilogue_reference(y.cpu(), rs.cpu(), cs.cpu(), b16.cpu())
    assert torch.equal(got.cpu(), want)
    with pytest.raises(RuntimeError, match="expected a float32 or BFloat16 bias of 24 elements"):
        compiled_op("fp8_scale_epilogue")(y, rs, cs, b16, "none")


@pytest.mark.cuda
def test_cuda_kernel_rejects_bad_inputs():
    _need_kernel()
    op = compiled_op("fp8_scale_epilogue")
    y = torch.ones(4, 8, device="cuda", dtype=torch.bfloat16)
    rs, cs = torch.ones(4, device="cuda"), torch.ones(8, device="cuda")
    with pytest.raises(RuntimeError, match="act"):
        op(y, rs, cs, None, "relu")
    with pytest.raises(RuntimeError, match="row_scale"):
        op(y, rs[:3], cs, None, "none")
    with pytest.raises(RuntimeError, match="contiguous y"):
        op(y.t(), cs, rs, None, "none")


@pytest.mark.parametrize("choice, expect_kernel", [("inductor", False), ("kernels", True)])
def test_compile_traces_the_reference_unless_asked(choice, expect_kernel, monkeypatch, rng):
    # Under torch.compile the quantize and epilogue ops trace their references by default (so
    # Inductor fuses them with neighbours); DCGEN_COMPILE_OPS=kernels keeps the custom ops.
    import dcgen.ops._extension as ext
    import dcgen.ops.fp8_epilogue as ep
    import dcgen.ops.quantize_fp8 as qf

    monkeypatch.setenv("DCGEN_COMPILE_OPS", choice)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    calls = []
    kernels = {  # stand-ins for the compiled ops: record the call, answer like the kernel
        "fp8_scale_epilogue": lambda y, rs, cs, b, act: ep.fp8_scale_epilogue_reference(
            y, rs, cs, b, act
        ),
        "quantize_fp8": lambda x, block: qf.quantize_fp8_reference(x, "row"),
    }

    def fake_op(name):
        return lambda *args: calls.append(name) or kernels[name](*args)

    for mod in (ep, qf):
        monkeypatch.setattr(mod, "has_kernel", lambda name, device: True)
        monkeypatch.setattr(mod, "compiled_op", fake_op)
    y, rs, cs, b = _inputs(3, 16, torch.bfloat16, rng)
    ep.fp8_scale_epilogue(y, rs, cs, b)
    qf.quantize_fp8(y, "row")
    assert calls == (["fp8_scale_epilogue", "quantize_fp8"] if expect_kernel else [])
    monkeypatch.setenv("DCGEN_COMPILE_OPS", "triton")
    with pytest.raises(ValueError, match="DCGEN_COMPILE_OPS: expected one of"):
        ext._compile_ops_choice()
