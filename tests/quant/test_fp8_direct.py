"""FP8Linear's direct inference route (dcgen/quant/fp8_linear.py module doc).

The route needs the quantize and epilogue kernels, which exist on CUDA only. To exercise it on
a CPU, each test registers CPU kernels for ``dcgen::quantize_fp8`` and
``dcgen::fp8_scale_epilogue`` that run the PyTorch references (the CUDA kernels are tested
bit-exact against the same references in tests/ops) and counts their calls, then compares the
direct route with the general path (``fp8_gemm``) on the same layer and input: same ops, same
arguments, so the same bits.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import dcgen.quant.fp8 as f
import dcgen.quant.fp8_linear as fl
from dcgen.ops import _extension, has_kernel
from dcgen.ops.fp8_epilogue import fp8_scale_epilogue_reference
from dcgen.ops.quantize_fp8 import quantize_fp8_reference
from dcgen.quant import FP8Linear
from tests.conftest import poison_cuda_allocator

if not all(_extension.has_schema(op) for op in ("quantize_fp8", "fp8_scale_epilogue_fp8")):
    pytest.skip("dcgen._C is not built: no dcgen FP8 ops to route to", allow_module_level=True)

OPS = ("quantize_fp8", "fp8_scale_epilogue", "fp8_scale_epilogue_into", "fp8_scale_epilogue_fp8")


@pytest.fixture
def cpu_kernels(monkeypatch):
    """CPU kernels for the two ops (the references), visible to has_kernel; yields the call
    counts per op and of direct-route calls ("direct"). The unit-scale GEMM route is forced
    ("auto" takes it on CUDA only)."""
    calls = dict.fromkeys((*OPS, "direct"), 0)

    def quantize(x: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
        calls["quantize_fp8"] += 1
        assert x.dim() == 2 and x.is_contiguous()
        return quantize_fp8_reference(x, "row" if block == 0 else "block128")

    def epilogue(y, row_scale, col_scale, bias, act):  # noqa: ANN001, ANN202
        calls["fp8_scale_epilogue"] += 1
        return fp8_scale_epilogue_reference(y, row_scale, col_scale, bias, act)

    def epilogue_into(y, row_scale, col_scale, bias, act, out):  # noqa: ANN001, ANN202
        calls["fp8_scale_epilogue_into"] += 1
        out.copy_(fp8_scale_epilogue_reference(y, row_scale, col_scale, bias, act))

    def epilogue_fp8(y, row_scale, col_scale, bias, act):  # noqa: ANN001, ANN202
        calls["fp8_scale_epilogue_fp8"] += 1
        out = fp8_scale_epilogue_reference(y, row_scale, col_scale, bias, act)
        return (out, *quantize_fp8_reference(out, "row"))

    direct = FP8Linear._direct_forward

    def counted(self, x, act):  # noqa: ANN001, ANN202
        calls["direct"] += 1
        return direct(self, x, act)

    monkeypatch.setattr(FP8Linear, "_direct_forward", counted)
    lib = torch.library.Library("dcgen", "IMPL")
    lib.impl("quantize_fp8", quantize, "CPU")
    lib.impl("fp8_scale_epilogue", epilogue, "CPU")
    lib.impl("fp8_scale_epilogue_into", epilogue_into, "CPU")
    lib.impl("fp8_scale_epilogue_fp8", epilogue_fp8, "CPU")
    monkeypatch.setattr(_extension, "_KERNELS", _extension._KERNELS | {(n, "CPU") for n in OPS})
    monkeypatch.setattr(f, "_REJECTED", set())
    monkeypatch.setenv("DCGEN_FP8_GEMM", "tensor")
    monkeypatch.delenv("DCGEN_DISABLE_KERNELS", raising=False)
    try:
        yield calls
    finally:
        lib._destroy()


def _layer(k: int = 64, n: int = 40, bias: bool = True, seed: int = 0) -> FP8Linear:
    torch.manual_seed(seed)
    lin = nn.Linear(k, n, bias=bias)
    lin.weight.data *= 3
    return FP8Linear.from_linear(lin)


def _general(layer: FP8Linear, x: torch.Tensor, act: str, monkeypatch) -> torch.Tensor:
    with monkeypatch.context() as m:
        m.setattr(FP8Linear, "_direct", lambda self, x: False)
        return layer(x, act)


@pytest.mark.parametrize("act", ["none", "gelu_tanh"])
@pytest.mark.parametrize("bias", [True, False])
def test_direct_route_gives_the_general_paths_bits(cpu_kernels, act, bias, monkeypatch):
    layer = _layer(bias=bias)
    x = (torch.randn(2, 5, 64) * 4).bfloat16()
    with torch.inference_mode():
        y = layer(x, act)
        assert cpu_kernels == {
            "quantize_fp8": 1, "fp8_scale_epilogue": 1, "fp8_scale_epilogue_into": 0,
            "fp8_scale_epilogue_fp8": 0, "direct": 1,
        }  # fmt: skip
        want = _general(layer, x, act, monkeypatch)
    # the general path ran the same two kernels, not the direct route
    assert cpu_kernels == {
        "quantize_fp8": 2, "fp8_scale_epilogue": 2, "fp8_scale_epilogue_into": 0,
        "fp8_scale_epilogue_fp8": 0, "direct": 1,
    }  # fmt: skip
    assert y.shape == (2, 5, 40) and y.dtype == torch.bfloat16
    assert torch.equal(y, want)
    # and both are the layer's spec up to the extra bf16 rounding of the unit-scale product
    spec = layer.reference_forward(x).float()
    if act == "gelu_tanh":
        spec = torch.nn.functional.gelu(spec, approximate="tanh")
    torch.testing.assert_close(y.float(), spec, rtol=2**-6, atol=5e-2)


def test_route_is_decided_once_then_again_when_the_environment_changes(cpu_kernels, monkeypatch):
    layer = _layer()
    x = torch.randn(3, 64).bfloat16()
    decisions = []
    real = f.direct_row_route
    monkeypatch.setattr(f, "direct_row_route", lambda *a: decisions.append(a) or real(*a))
    with torch.no_grad():
        a = layer(x)
        layer(x)
        assert len(decisions) == 1 and cpu_kernels["direct"] == 2
        monkeypatch.setenv("DCGEN_DISABLE_KERNELS", "1")  # every op on its reference
        b = layer(x)
    assert len(decisions) == 2 and cpu_kernels["direct"] == 2
    assert cpu_kernels["quantize_fp8"] == 2  # no kernel ran
    # the references path differs from the kernels path by the unit-scale product's rounding
    torch.testing.assert_close(a.float(), b.float(), rtol=2**-6, atol=5e-2)
    layer.to(torch.float32)  # .to() drops the decision (device or bias dtype may change)
    assert "_route" not in layer.__dict__
    monkeypatch.delenv("DCGEN_DISABLE_KERNELS")
    with torch.no_grad():
        layer(x)  # fp32 bias: a bias the kernel reads, direct
        assert cpu_kernels["direct"] == 3
        layer.bias.data = layer.bias.data.half()  # changed behind the cache's back
        layer(x)
    assert cpu_kernels["direct"] == 3 and len(decisions) == 4  # decided again: general path


def test_cases_the_direct_route_leaves_to_the_general_path(cpu_kernels):
    x = torch.randn(3, 64).bfloat16()
    layer = _layer()
    with torch.no_grad():
        layer(x.half())  # fp16: the unit-scale product could overflow
        FP8Linear.from_linear(nn.Linear(64, 40), granularity="block128")(x)
        fp16_bias = _layer()
        fp16_bias.bias.data = fp16_bias.bias.data.half()  # not a bias the kernel reads
        fp16_bias(x)
    assert cpu_kernels["direct"] == 0
    x.requires_grad_(True)
    y = layer(x)  # autograd: the straight-through path
    y.float().sum().backward()
    assert x.grad is not None and cpu_kernels["direct"] == 0
    with torch.no_grad():
        with pytest.raises(ValueError, match="FP8Linear: expected input with last dim 64, got"):
            layer(torch.randn(3, 32).bfloat16())
        with pytest.raises(
            ValueError, match=r"expected act in \('none', 'gelu_tanh'\), got 'relu'"
        ):
            layer(x.detach(), "relu")


def test_a_rejected_gemm_falls_back_for_good(cpu_kernels, monkeypatch):
    layer = _layer()
    x = torch.randn(4, 64).bfloat16()
    with torch.no_grad():
        want = layer(x)

        def refuse(*a, **k):  # noqa: ANN002, ANN003, ANN202
            raise RuntimeError("no such FP8 GEMM on this card")

        monkeypatch.setattr(torch, "_scaled_mm", refuse)
        got = layer(x)  # direct route refused -> general path -> its own fallbacks
        assert f._case(x.device, "tensor") in f._REJECTED
        assert cpu_kernels["direct"] == 2
        layer(x)
        assert cpu_kernels["direct"] == 2  # no direct attempt any more
    torch.testing.assert_close(got.float(), want.float(), rtol=2**-6, atol=5e-2)


@pytest.mark.parametrize("route", ["tensor", "rowwise"])
@pytest.mark.parametrize("error", ["OutOfMemoryError", "AcceleratorError"])
def test_out_of_memory_is_not_recorded_as_a_refusal(cpu_kernels, route, error, monkeypatch):
    # An out-of-memory or device error from _scaled_mm says nothing about the case: it reaches
    # the caller, and the layer keeps its route (a refusal would switch it for good, onto the
    # general path's fallbacks, which need more memory still).
    kind = getattr(torch, error, None)
    if kind is None:
        pytest.skip(f"torch.{error} does not exist in this torch")
    monkeypatch.setenv("DCGEN_FP8_GEMM", route)
    layer = _layer()
    x = torch.randn(4, 64).bfloat16()

    def fail(*a, **k):  # noqa: ANN002, ANN003, ANN202
        raise kind("out of memory")

    with torch.no_grad():
        want = layer(x)
        with monkeypatch.context() as m:
            m.setattr(torch, "_scaled_mm", fail)
            with pytest.raises(kind):
                layer(x)
            with pytest.raises(kind):  # the general path lets it through as well
                f.fp8_gemm(*_general_operands(layer, x), "none")
        assert not f._REJECTED
        assert torch.equal(layer(x), want)  # same route, same bits


def _general_operands(layer: FP8Linear, x: torch.Tensor) -> tuple:
    xq, xs = f.quantize_fp8_reference(x, "row")
    return (xq, xs, layer.weight, layer.weight_scale, layer.bias, torch.bfloat16, "row")


def test_direct_route_shares_one_quantize_per_scope(cpu_kernels):
    a, b = _layer(seed=1), _layer(seed=2)
    x = torch.randn(2, 7, 64).bfloat16()
    with torch.inference_mode():
        fl._shared.enter()
        try:
            ya, yb = a(x), b(x)
        finally:
            fl._shared.leave()
        assert cpu_kernels["quantize_fp8"] == 1 and cpu_kernels["direct"] == 2
        assert torch.equal(ya, a(x)) and torch.equal(yb, b(x))
    assert fl._shared._value is None


@pytest.mark.parametrize("act", ["none", "gelu_tanh"])
def test_forward_into_writes_the_layers_output_in_place(cpu_kernels, act):
    # On the direct route the scale epilogue writes the layer's output into the given block of
    # a larger buffer (a single block's [attention | MLP] input, say): the layer's own bits,
    # nothing around the block touched, no separate output and copy.
    layer = _layer()
    x = (torch.randn(1, 6, 64) * 4).bfloat16()
    buf = torch.full((1, 6, 100), 3.0, dtype=torch.bfloat16)
    with torch.inference_mode():
        want = layer(x, act)
        calls_before = dict(cpu_kernels)
        layer.forward_into(x, buf[..., 50:90], act)
    assert cpu_kernels["fp8_scale_epilogue_into"] == 1
    assert cpu_kernels["fp8_scale_epilogue"] == calls_before["fp8_scale_epilogue"]
    assert torch.equal(buf[..., 50:90], want)
    assert (buf[..., :50] == 3).all() and (buf[..., 90:] == 3).all()


def test_forward_quantized_gives_the_output_and_its_quantization(cpu_kernels):
    # On the direct route the epilogue also returns its output's row quantization (the same
    # bits as quantizing the output); off it (autograd here), only the output.
    layer = _layer()
    x = (torch.randn(2, 5, 64) * 4).bfloat16()
    with torch.inference_mode():
        want = layer(x, "gelu_tanh")
        y, quantized = layer.forward_quantized(x, act="gelu_tanh")
    assert cpu_kernels["fp8_scale_epilogue_fp8"] == 1
    assert torch.equal(y, want) and quantized is not None
    q, scales = quantized
    want_q, want_s = quantize_fp8_reference(want, "row")
    assert q.shape == (2, 5, 40) and scales.shape == (2, 5, 1)
    assert torch.equal(q.view(torch.uint8), want_q.view(torch.uint8))
    assert torch.equal(scales, want_s)
    xg = x.clone().requires_grad_()
    y, quantized = layer.forward_quantized(xg, act="gelu_tanh")
    assert quantized is None and cpu_kernels["fp8_scale_epilogue_fp8"] == 1
    assert torch.equal(y, layer(xg, "gelu_tanh"))  # the layer's own autograd path


def test_direct_forms_pass_fast_accum_to_the_gemm(cpu_kernels, monkeypatch):
    # A fast_accum layer's direct route (forward, forward_into, forward_quantized) runs its
    # unit-scale GEMM with use_fast_accum, and a plain layer without it.
    seen = []
    original = torch._scaled_mm
    monkeypatch.setattr(
        torch, "_scaled_mm", lambda *a, **k: seen.append(k["use_fast_accum"]) or original(*a, **k)
    )
    x = (torch.randn(2, 5, 64) * 4).bfloat16()
    for fast in (True, False):
        layer = _layer()
        layer.fast_accum = fast
        seen.clear()
        with torch.inference_mode():
            y = layer(x)
            layer.forward_into(x, torch.empty_like(y))
            layer.forward_quantized(x)
        assert seen == [fast] * 3
    assert cpu_kernels["direct"] == 2


@pytest.mark.parametrize("fast", [False, True])
@pytest.mark.parametrize("act", ["none", "gelu_tanh"])
@pytest.mark.parametrize("bias", [True, False])
def test_rowwise_direct_route_gives_the_general_paths_bits(
    cpu_kernels, act, bias, fast, monkeypatch
):
    # The "rowwise" route taken straight: the quantize kernel, then one _scaled_mm with the
    # row scales and the bias, then GELU; no epilogue kernel. The general path runs the same
    # ops on the same operands, so the same bits.
    monkeypatch.setenv("DCGEN_FP8_GEMM", "rowwise")
    gemms = []
    original = torch._scaled_mm
    monkeypatch.setattr(torch, "_scaled_mm", lambda *a, **k: gemms.append(k) or original(*a, **k))
    layer = _layer(bias=bias)
    layer.fast_accum = fast
    x = (torch.randn(2, 5, 64) * 4).bfloat16()
    with torch.inference_mode():
        y = layer(x, act)
        assert layer.__dict__["_direct_kind"] == "rowwise"
        assert cpu_kernels["direct"] == 1 and cpu_kernels["quantize_fp8"] == 1
        want = _general(layer, x, act, monkeypatch)
    assert cpu_kernels["fp8_scale_epilogue"] == 0
    assert [g["scale_a"].shape for g in gemms] == [(10, 1)] * 2  # row scales, both paths
    assert all(g["use_fast_accum"] is fast and (g["bias"] is not None) is bias for g in gemms)
    assert y.shape == (2, 5, 40) and torch.equal(y, want)
    spec = layer.reference_forward(x).float()
    if act == "gelu_tanh":
        spec = torch.nn.functional.gelu(spec, approximate="tanh")
    torch.testing.assert_close(y.float(), spec, rtol=2**-7, atol=2e-2)


def test_rowwise_direct_route_forms_and_its_limits(cpu_kernels, monkeypatch):
    # On "rowwise" forward_into has the GEMM write into the caller's view (then GELU in
    # place) and forward_quantized without GELU offers no quantization (the fused scale
    # epilogues belong to the "tensor" route); an fp32 bias (which _scaled_mm would not take
    # with a bf16 output) and a rejected GEMM leave the general path.
    monkeypatch.setenv("DCGEN_FP8_GEMM", "rowwise")
    layer = _layer()
    x = (torch.randn(1, 6, 64) * 4).bfloat16()
    buf = torch.full((1, 6, 100), 3.0, dtype=torch.bfloat16)
    original, outs = torch._scaled_mm, []

    def recording(*a, **k):  # noqa: ANN002, ANN003, ANN202
        outs.append(k.get("out"))
        return original(*a, **k)

    rows = torch.full((2, 6, 40), 3.0, dtype=torch.bfloat16)  # rows[1]: contiguous rows
    with torch.inference_mode():
        want = layer(x, "gelu_tanh")
        with monkeypatch.context() as m:
            m.setattr(torch, "_scaled_mm", recording)
            layer.forward_into(x, buf[..., 50:90], "gelu_tanh")  # CPU, strided: copied in
            layer.forward_into(x, buf[..., 10:50])
            layer.forward_into(x, rows[1], "gelu_tanh")
        y, quantized = layer.forward_quantized(x)
        want_plain = layer(x)
    assert torch.equal(buf[..., 50:90], want) and torch.equal(buf[..., 10:50], want_plain)
    assert torch.equal(rows[1], want[0]) and (rows[0] == 3).all()
    assert (buf[..., :10] == 3).all() and (buf[..., 90:] == 3).all()
    assert [None if o is None else o.data_ptr() for o in outs] == [
        None,
        buf[0, 0, 10].data_ptr(),
        rows[1].data_ptr(),
    ]
    assert torch.equal(y, want_plain) and quantized is None
    assert cpu_kernels["fp8_scale_epilogue_into"] == cpu_kernels["fp8_scale_epilogue_fp8"] == 0
    # layer calls: want, the strided GELU form's copy path, forward_quantized, want_plain (the
    # in-place forms do not call the layer)
    assert cpu_kernels["direct"] == 4
    fp32_bias = _layer()
    fp32_bias.bias.data = fp32_bias.bias.data.float()
    with torch.inference_mode():
        fp32_bias(x)
    assert fp32_bias.__dict__["_direct_kind"] == "" and cpu_kernels["direct"] == 4

    def refuse(*a, **k):  # noqa: ANN002, ANN003, ANN202
        raise RuntimeError("no such FP8 GEMM on this card")

    monkeypatch.setattr(torch, "_scaled_mm", refuse)
    with torch.inference_mode():
        got = layer(x)  # refused once: recorded, then the general path's own fallbacks
        assert f._case(x.device, "row", True) in f._REJECTED
        layer(x)
    assert cpu_kernels["direct"] == 5  # no direct attempt after the rejection
    torch.testing.assert_close(got.float(), layer.reference_forward(x).float(), rtol=0, atol=0)


def test_rowwise_forward_into_gives_strided_rows_only_where_checked(cpu_kernels, monkeypatch):
    # _scaled_mm(out=) gets a column block of a wider buffer (rows further apart than its
    # width) only where dcgen checked the GEMM honours that stride (cuBLAS on Hopper, the
    # CPU); elsewhere such a block is copied into, and contiguous rows are still written.
    monkeypatch.setenv("DCGEN_FP8_GEMM", "rowwise")
    monkeypatch.setattr(f, "rowwise_writes_strided_rows", lambda device: False)
    layer = _layer()
    x = (torch.randn(1, 6, 64) * 4).bfloat16()
    buf = torch.full((1, 6, 100), 3.0, dtype=torch.bfloat16)
    rows = torch.full((2, 6, 40), 3.0, dtype=torch.bfloat16)
    original, outs = torch._scaled_mm, []

    def recording(*a, **k):  # noqa: ANN002, ANN003, ANN202
        outs.append(k.get("out"))
        return original(*a, **k)

    with torch.inference_mode():
        want = layer(x)
        monkeypatch.setattr(torch, "_scaled_mm", recording)
        layer.forward_into(x, buf[..., 10:50])
        layer.forward_into(x, rows[1])
    assert outs[0] is None and outs[1].data_ptr() == rows[1].data_ptr()
    assert torch.equal(buf[..., 10:50], want) and torch.equal(rows[1], want[0])
    assert (buf[..., :10] == 3).all() and (buf[..., 50:] == 3).all() and (rows[0] == 3).all()


def test_rowwise_route_follows_a_new_or_updated_weight(cpu_kernels, monkeypatch):
    # The "rowwise" route keeps the weight's transposed view and its [1, N] scales per layer:
    # an in-place update shows through them, a new buffer (or a device move) makes new ones.
    monkeypatch.setenv("DCGEN_FP8_GEMM", "rowwise")
    layer, other = _layer(seed=0), _layer(seed=1)
    x = (torch.randn(3, 64) * 4).bfloat16()
    with torch.inference_mode():
        first = layer(x)
        layer.weight.copy_(other.weight)
        layer.weight_scale.copy_(other.weight_scale)
        updated = layer(x)
        layer.weight = other.weight.clone()
        assert "_rowwise_views" not in layer.__dict__  # not kept alive until the next call
        layer.weight_scale = other.weight_scale * 2
        replaced = layer(x)
        spec = _general(layer, x, "none", monkeypatch)
    assert cpu_kernels["direct"] == 3 and layer.__dict__["_direct_kind"] == "rowwise"
    assert layer.__dict__["_rowwise_views"][0] is layer.weight  # built for the clone
    layer.to("cpu")  # a device move drops the views
    assert "_rowwise_views" not in layer.__dict__
    layer.weight, layer.weight_scale = other.weight, other.weight_scale
    with torch.inference_mode():
        assert torch.equal(updated, _general(layer, x, "none", monkeypatch))
    assert not torch.equal(first, updated) and torch.equal(replaced, spec)


@pytest.mark.parametrize("fast", [False, True])
def test_rowwise_forward_quantized_runs_gelu_and_the_quantize_in_one_pass(
    cpu_kernels, fast, monkeypatch
):
    # "rowwise" with GELU: quantize kernel, one row-scaled _scaled_mm with the bias, then one
    # fp8_scale_epilogue_fp8 at unit scales (no separate GELU, no quantize for the next
    # layer). Its output is the layer's GELU output within one bf16 rounding (its own GELU);
    # the quantization is exactly quantize_fp8(out, "row"); a rejected GEMM leaves it.
    monkeypatch.setenv("DCGEN_FP8_GEMM", "rowwise")
    seen = []
    original = torch._scaled_mm
    monkeypatch.setattr(torch, "_scaled_mm", lambda *a, **k: seen.append(k) or original(*a, **k))
    layer = _layer()
    layer.fast_accum = fast
    x = (torch.randn(2, 5, 64) * 4).bfloat16()
    with torch.inference_mode():
        want = layer(x, "gelu_tanh")
        seen.clear()
        quantizes = cpu_kernels["quantize_fp8"]
        y, quantized = layer.forward_quantized(x, act="gelu_tanh")
    assert (
        cpu_kernels["fp8_scale_epilogue_fp8"] == 1 and cpu_kernels["quantize_fp8"] == quantizes + 1
    )
    assert len(seen) == 1 and seen[0]["scale_a"].shape == (10, 1) and seen[0]["bias"] is not None
    assert seen[0]["use_fast_accum"] is fast
    assert y.shape == (2, 5, 40) and quantized is not None
    torch.testing.assert_close(y, want, rtol=2**-8, atol=1e-3)
    q, scales = quantized
    want_q, want_s = quantize_fp8_reference(y.reshape(10, 40), "row")
    assert q.shape == (2, 5, 40) and scales.shape == (2, 5, 1)
    assert torch.equal(q.reshape(10, 40).view(torch.uint8), want_q.view(torch.uint8))
    assert torch.equal(scales.reshape(10, 1), want_s)

    def refuse(*a, **k):  # noqa: ANN002, ANN003, ANN202
        raise RuntimeError("no such FP8 GEMM on this card")

    monkeypatch.setattr(torch, "_scaled_mm", refuse)
    with torch.inference_mode():
        y, quantized = layer.forward_quantized(x, act="gelu_tanh")
    assert quantized is None and cpu_kernels["fp8_scale_epilogue_fp8"] == 1
    torch.testing.assert_close(y, want, rtol=0, atol=0)  # the general path's fallback


def test_unit_column_is_a_view_of_one_growing_buffer(monkeypatch):
    monkeypatch.setattr(f, "_UNIT_COLUMNS", {})
    monkeypatch.setattr(f, "_RETIRED_UNIT_COLUMNS", [])
    cpu = torch.device("cpu")
    a, b = f.unit_column(cpu, 3), f.unit_column(cpu, 5000)
    assert a.shape == (3, 1) and b.shape == (5000, 1) and b.data_ptr() == a.data_ptr()
    assert a.dtype == torch.float32 and a.is_contiguous() and bool((b == 1).all())
    c = f.unit_column(cpu, 100_000)  # longer than the buffer: a new one, the old one kept
    assert c.shape == (100_000, 1) and bool((c == 1).all()) and c.data_ptr() != a.data_ptr()
    assert f._RETIRED_UNIT_COLUMNS[0].data_ptr() == a.data_ptr()
    assert f.unit_column(cpu, 7).data_ptr() == c.data_ptr()


def test_unit_column_retired_buffers_stay_smaller_than_the_live_one(monkeypatch):
    # Rows growing by one FLUX 4K image (4,608 tokens) per call, batch 15 to 64, as a server
    # sees them: every replaced buffer was kept, one per size (33.6 MiB for 1.1 MiB live)
    monkeypatch.setattr(f, "_UNIT_COLUMNS", {})
    monkeypatch.setattr(f, "_RETIRED_UNIT_COLUMNS", [])
    cpu = torch.device("cpu")
    for batch in range(15, 65):
        assert bool((f.unit_column(cpu, 4608 * batch) == 1).all())
    live = f._UNIT_COLUMNS[("cpu", None)].numel()
    retired = sum(t.numel() for t in f._RETIRED_UNIT_COLUMNS)
    assert live >= 4608 * 64 and retired < live, (live, retired)
    assert len(f._RETIRED_UNIT_COLUMNS) <= 3


@pytest.mark.parametrize(
    ("cap", "cuda", "want"),
    [(90, "13.0", "rowwise"), (90, "12.9", "rowwise"), (90, "12.8", "tensor"),
     (100, "13.0", "tensor"), (89, "13.0", "tensor"), (90, None, "tensor")],
)  # fmt: skip
def test_auto_row_route_takes_rowwise_on_hopper_with_outer_vector_cublas(
    cap, cuda, want, monkeypatch
):
    # Measured on the H200 (torch 2.11, CUDA 13.0): the row-scaled _scaled_mm beat unit scales
    # + epilogue at every FLUX shape; elsewhere unmeasured, so the epilogue route stays.
    monkeypatch.delenv("DCGEN_FP8_GEMM", raising=False)
    monkeypatch.setattr(f, "_capability", lambda index: cap)
    monkeypatch.setattr(torch.version, "cuda", cuda)
    monkeypatch.setattr(f, "has_kernel", lambda name, device: True)
    assert f.row_gemm_route(torch.device("cuda", 0)) == want
    assert f.row_gemm_route(torch.device("cpu")) == "rowwise"
    # the same cases are the ones whose row-scaled GEMM takes a strided out (cuBLAS)
    assert f.rowwise_writes_strided_rows(torch.device("cuda", 0)) == (want == "rowwise")
    assert f.rowwise_writes_strided_rows(torch.device("cpu"))


def test_forward_into_copies_where_it_cannot_write_in_place(cpu_kernels):
    # Rows of two batch elements inside a longer sequence are not one [M, N] view, and the
    # general path (autograd) has no in-place form: both copy the layer's output in.
    layer = _layer()
    x = (torch.randn(2, 3, 64) * 4).bfloat16()
    buf = torch.zeros(2, 5, 40, dtype=torch.bfloat16)
    with torch.inference_mode():
        want = layer(x)
        layer.forward_into(x, buf[:, 2:])
    assert cpu_kernels["fp8_scale_epilogue_into"] == 0
    assert torch.equal(buf[:, 2:], want) and not buf[:, :2].any()
    # a column-major out (column stride 40 != 1) is one [M, N] view the kernel cannot write
    cols = torch.zeros(40, 6, dtype=torch.bfloat16)
    with torch.inference_mode():
        layer.forward_into(x.reshape(6, 64), cols.t())
    assert cpu_kernels["fp8_scale_epilogue_into"] == 0
    assert torch.equal(cols.t(), want.reshape(6, 40))
    with torch.no_grad():
        out = torch.empty(2, 3, 40, dtype=torch.bfloat16)
        layer.forward_into(x.float(), out)  # fp32 input: the general path, cast into out
    assert cpu_kernels["fp8_scale_epilogue_into"] == 0
    torch.testing.assert_close(out, layer(x.float()).bfloat16())


@pytest.mark.cuda
@pytest.mark.parametrize("route", ["tensor", "rowwise"])
@pytest.mark.parametrize("act", ["none", "gelu_tanh"])
def test_cuda_direct_route_gives_the_general_paths_bits(act, route, monkeypatch):
    # On a GPU with the kernels built the direct route is the default for bf16 inference: the
    # real kernels and cuBLAS, against fp8_gemm on the same layer and input, on both GEMM
    # routes.
    monkeypatch.setenv("DCGEN_FP8_GEMM", route)
    monkeypatch.setattr(f, "_REJECTED", set())
    if not torch.cuda.is_available() or (
        f.direct_row_route(torch.device("cuda"), torch.bfloat16, 3072, 3072, None) != route
    ):
        pytest.skip(f"no CUDA device, FP8 kernels or {route} FP8 GEMM here")
    torch.manual_seed(0)
    layer = FP8Linear.from_linear(nn.Linear(3072, 3072).cuda()).cuda()
    x = torch.randn(2, 300, 3072, device="cuda").bfloat16()
    entered = []
    direct = FP8Linear._direct_forward
    monkeypatch.setattr(
        FP8Linear, "_direct_forward", lambda self, x, a: entered.append(1) or direct(self, x, a)
    )
    poison_cuda_allocator()  # an unwritten output element reads NaN
    with torch.inference_mode():
        y = layer(x, act)
        want = _general(layer, x, act, monkeypatch)
    assert entered == [1] and not y.isnan().any()
    assert torch.equal(y, want)
    # forward_into: the epilogue kernel ("tensor") or _scaled_mm(out=) then GELU in place
    # ("rowwise") writes the same bits into a NaN buffer's columns (rows 3,088 apart)
    if has_kernel("fp8_scale_epilogue_into", "cuda"):
        # NaN-filled by hand: a 3.7 MB buffer can come from a fresh segment that the allocator
        # poisoning never touched (the H200 run of 2026-11-27 read stale fp32 data around it)
        buf = torch.full((2, 300, 3072 + 16), float("nan"), device="cuda", dtype=torch.bfloat16)
        with torch.inference_mode():
            layer.forward_into(x, buf[..., 8 : 8 + 3072], act)
        assert torch.equal(buf[..., 8 : 8 + 3072], y)
        assert buf[..., :8].isnan().all() and buf[..., 8 + 3072 :].isnan().all()


@pytest.mark.cuda
def test_cuda_rowwise_forward_quantized_matches_gelu_then_quantize(monkeypatch):
    # The real kernels on the "rowwise" route: forward_quantized's GELU output within one bf16
    # rounding of the layer's (PyTorch's GELU), and its quantization bit for bit
    # quantize_fp8(out, "row") of its own output; outputs poisoned first.
    monkeypatch.setenv("DCGEN_FP8_GEMM", "rowwise")
    monkeypatch.setattr(f, "_REJECTED", set())
    if not torch.cuda.is_available() or (
        f.direct_row_route(torch.device("cuda"), torch.bfloat16, 3072, 3072, None) != "rowwise"
        or not has_kernel("fp8_scale_epilogue_fp8", "cuda")
    ):
        pytest.skip("no CUDA device, FP8 kernels or rowwise FP8 GEMM here")
    torch.manual_seed(0)
    layer = FP8Linear.from_linear(nn.Linear(3072, 12288).cuda()).cuda()
    x = torch.randn(2, 300, 3072, device="cuda").bfloat16()
    poison_cuda_allocator()
    with torch.inference_mode():
        want = layer(x, "gelu_tanh")
        y, quantized = layer.forward_quantized(x, act="gelu_tanh")
    assert quantized is not None and not y.isnan().any()
    torch.testing.assert_close(y, want, rtol=2**-8, atol=1e-3)
    q, scales = quantized
    want_q, want_s = quantize_fp8_reference(y.reshape(-1, 12288), "row")
    assert torch.equal(q.reshape(-1, 12288).view(torch.uint8), want_q.view(torch.uint8))
    assert torch.equal(scales.reshape(-1, 1), want_s)


@pytest.mark.cuda
@pytest.mark.parametrize("k", [3072, 12288])
def test_cuda_fast_accum_stays_close_to_the_spec(k):
    # Fast accumulation changes how the tensor cores sum (no fp32 promotion), so the bits may
    # differ; the result must stay within a small relative error of the layer's fp32 spec at
    # FLUX's K (3,072 and the MLP's 12,288), with no NaN: at most 1e-2 (relative norm), or 2x
    # the default accumulation's error on the same input where that is larger. (The FP8 block
    # of docs/baselines.md is at 6.7e-3 against bf16, quantization included.)
    if not torch.cuda.is_available() or not f.scaled_mm_supported(
        torch.device("cuda"), "row", torch.bfloat16, 1024, k
    ):
        pytest.skip("no CUDA device with row-scaled FP8 _scaled_mm here")
    torch.manual_seed(0)
    lin = nn.Linear(k, 1024).cuda()
    x = torch.randn(512, k, device="cuda").bfloat16()
    with torch.inference_mode():
        plain = FP8Linear.from_linear(lin).cuda()
        fast = FP8Linear.from_linear(lin, fast_accum=True).cuda()
        spec = plain.reference_forward(x).float()
        err = {}
        for name, layer in (("plain", plain), ("fast", fast)):
            y = layer(x).float()
            assert not y.isnan().any()
            err[name] = ((y - spec).norm() / spec.norm()).item()
    assert err["fast"] <= max(2 * err["plain"], 1e-2), err


@pytest.mark.parametrize("kind", ["double", "single"])
def test_fused_flux_blocks_write_fp8_outputs_in_place(cpu_kernels, kind):
    # In accelerated FLUX blocks with FP8 linears on the direct route, the outputs that go into
    # a larger buffer are written there by the scale epilogue: a double block's six joint
    # q / k / v projections, a single block's MLP (its half of proj_out's input); and each FP8
    # input is quantized by the op that produces it where that op can. Same bits as the same
    # blocks copying each output in.
    from diffusers.models.transformers.transformer_flux import (
        FluxSingleTransformerBlock,
        FluxTransformerBlock,
    )

    from dcgen.attention import accelerate
    from dcgen.quant import FP8Config, quantize_

    torch.manual_seed(0)
    block = (FluxTransformerBlock if kind == "double" else FluxSingleTransformerBlock)(64, 2, 32)
    block = block.eval().bfloat16()
    quantize_(block, FP8Config())
    accelerate(block, blocks=True)
    g = torch.Generator().manual_seed(1)
    inputs = dict(
        hidden_states=torch.randn(1, 12, 64, generator=g).bfloat16(),
        encoder_hidden_states=torch.randn(1, 5, 64, generator=g).bfloat16(),
        temb=torch.randn(1, 64, generator=g).bfloat16(),
    )
    with torch.inference_mode():
        quantizes = cpu_kernels["quantize_fp8"]
        got = block(**inputs)
        quantizes = cpu_kernels["quantize_fp8"] - quantizes
        in_place = cpu_kernels["fp8_scale_epilogue_into"]
        with pytest.MonkeyPatch.context() as m:  # every output copied in instead
            m.setattr(FP8Linear, "forward_into", lambda self, x, out, act="none": out.copy_(
                self(x, act=act)))  # fmt: skip
            want = block(**inputs)
    assert in_place == (6 if kind == "double" else 1)
    # Quantized by their producers: every modulated input (adaln_modulate_fp8) and the MLPs'
    # GELU outputs (the first linear's epilogue). Left: the attention outputs (double: image and
    # text) and a single block's proj_out input.
    assert quantizes == (2 if kind == "double" else 1)
    assert cpu_kernels["fp8_scale_epilogue_fp8"] >= (2 if kind == "double" else 0)
    for a, b in zip(got, want, strict=True):
        assert torch.equal(a, b)


def test_fp16_gelu_of_a_pre_activation_below_the_range_is_zero_not_nan():
    # fp16 inputs of 3000 over K = 32: pre-activations of -96,000 / +96,000 / 48,000. The
    # first rounds to -inf in fp16, and GELU(-inf) was NaN; the exact answer rounds to -0.
    lin = nn.Linear(32, 4, bias=False)
    with torch.no_grad():
        lin.weight.zero_()
        lin.weight[0], lin.weight[1], lin.weight[2] = -1.0, 1.0, 0.5
    x = torch.full((2, 32), 3000.0, dtype=torch.float16)
    layer = FP8Linear.from_linear(lin, granularity="row", dtype=torch.float16)
    with torch.no_grad():
        y = layer(x, act="gelu_tanh")
    assert not y.isnan().any(), y
    assert (y[:, 0] == 0).all() and (y[:, 1] == float("inf")).all()
    assert (y[:, 2] == 48000).all() and (y[:, 3] == 0).all()
