"""NVFP4Linear's dequantize + 16-bit GEMM path (Hopper / Ampere / W4A16): its algebra (global
scales moved to one alpha on the fp32 result, unit-scale dequantization) against the reference
on CPU, gradients, and on a GPU the real path (kernel + cuBLAS) against the reference."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dcgen.ops import has_kernel
from dcgen.quant import NVFP4Linear, smoothing_factors
from dcgen.quant import dequant_path as dq

CASES = [
    ("w4a16", 0, False),
    ("w4a16", 8, True),
    ("w4a4", 0, False),
    ("w4a4", 8, True),
]


def _layer(mode: str, rank: int, smooth: bool, k: int = 96, n: int = 40) -> NVFP4Linear:
    torch.manual_seed(0)
    lin = nn.Linear(k, n)
    s = smoothing_factors(torch.rand(k) * 5 + 0.1, lin.weight) if smooth else None
    return NVFP4Linear.from_linear(lin, mode, rank=rank, smooth=s)


def _smoothed(layer: NVFP4Linear, x: torch.Tensor) -> torch.Tensor:
    xf = x.float()
    return xf / layer.smooth if layer.smooth is not None else xf


@pytest.mark.parametrize("mode, rank, smooth", CASES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_dequant_path_equals_reference_up_to_summation_order(mode, rank, smooth, dtype, rng):
    layer = _layer(mode, rank, smooth)
    x = (torch.randn(3, 7, 96, generator=rng) * 3).to(dtype)
    xf = _smoothed(layer, x)
    with torch.no_grad():
        got = dq.forward_main(layer, x, xf, None)
        want = layer.reference_main(xf, None)
    assert got.shape == want.shape == (3, 7, 40) and got.dtype == torch.float32
    # Same products, fp32 sums in another order, alpha applied once instead of per element.
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_dequant_path_static_input_scale(rng):
    layer = _layer("w4a4", 0, False)
    x = torch.randn(5, 96, generator=rng)
    static = torch.tensor(0.002)  # saturates the largest activations, like a calibrated scale
    with torch.no_grad():
        got = dq.forward_main(layer, x, x.float(), static)
        want = layer.reference_main(x.float(), static)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_weight_16bit_is_exact(rng):
    layer = _layer("w4a16", 0, False)
    w32 = dq.weight_16bit(layer, torch.float32)
    assert torch.equal(dq.weight_16bit(layer, torch.bfloat16).float(), w32)
    torch.testing.assert_close(w32 * layer.weight_scale_2, layer.dequantized_weight())


@pytest.mark.parametrize("mode", ["w4a16", "w4a4"])
def test_input_gradient_is_straight_through(mode, rng):
    # dx = dy @ deq(W) (+ the low-rank branch's exact gradient) on both paths, so layers in
    # front of a quantized one still train (LoRA on a quantized model).
    layer = _layer(mode, 4, False)
    x = torch.randn(6, 96, generator=rng, requires_grad=True)
    dy = torch.randn(6, 40, generator=rng)
    w_full = layer.dequantized_weight() + layer.lora_up.float() @ layer.lora_down.float()
    want = dy @ w_full
    layer(x).backward(dy)
    torch.testing.assert_close(x.grad, want, atol=1e-4, rtol=1e-4)
    x2 = x.detach().clone().requires_grad_(True)
    y = dq.forward_main(layer, x2, x2, None)
    y.backward(dy)
    want = dy @ layer.dequantized_weight()
    # An fp32 dy is not rounded to W4A4's bf16 GEMM operands (it was: a 0.3% error); a bf16
    # one multiplies them exactly.
    assert float((x2.grad - want).norm() / want.norm()) < 1e-5
    x3 = x.detach().bfloat16().requires_grad_(True)
    dq.forward_main(layer, x3, x3, None).backward(dy.bfloat16())
    want = (dy.bfloat16().float() @ layer.dequantized_weight()).bfloat16()
    # one bf16 rounding of sums taken in another order (an element near 0 cancels: atol)
    torch.testing.assert_close(x3.grad, want, atol=1e-3 * float(want.abs().max()), rtol=1e-2)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dtype", [torch.bfloat16])
def test_forward_16bit_equals_the_general_form(bias, dtype, rng):
    # One GEMM in x's dtype (alpha and bias in its epilogue) against the fp32 general form plus
    # bias and cast: the same products, one rounding each.
    layer = _layer("w4a16", 0, False)
    if not bias:
        layer.bias = None
    layer = layer.to(dtype)
    x = (torch.randn(3, 7, 96, generator=rng) * 3).to(dtype)
    with torch.no_grad():
        got = dq.forward_16bit(layer, x)
        want = dq.forward_main(layer, x, x.float(), None)
        if bias:
            want = want + layer.bias.float()
    assert got.shape == (3, 7, 40) and got.dtype == dtype
    torch.testing.assert_close(got.float(), want, atol=2e-2, rtol=1e-2)


def test_forward_16bit_with_inference_mode_buffers_reads_no_host_scale(rng, monkeypatch):
    # A layer built under inference_mode has buffers without a version counter: a host copy of
    # the global scale could not be cached, so the scale stays on the device (no sync per call).
    with torch.inference_mode():
        layer = _layer("w4a16", 0, False).bfloat16()
        x = (torch.randn(6, 96, generator=rng) * 2).bfloat16()
        assert layer.weight_scale_2.is_inference()
        monkeypatch.setattr(layer, "_memo", lambda *a: pytest.fail("host read of the scale"))
        got = dq.forward_16bit(layer, x)
        want = dq.forward_main(layer, x, x.float(), None) + layer.bias.float()
    torch.testing.assert_close(got.float(), want, atol=2e-2, rtol=1e-2)


@pytest.mark.parametrize("mode", ["w4a16", "w4a4"])
def test_fp16_inputs_take_the_fp32_form_and_stay_finite(mode, rng, monkeypatch):
    # The 16-bit forms multiply unit-scale operands (up to 2688 each) and round before the
    # global scales: in fp16 those sums overflow (mostly Inf at K = 96). fp16 declines them.
    with torch.inference_mode():  # inference buffers: W4A16's scale-on-device branch too
        layer = _layer(mode, 8, False).half()
    x = (torch.randn(4, 96, generator=rng) * 3).half()
    assert dq.forward_16bit(layer, x) is None
    assert dq.forward_w4a4_16bit(layer, x, x, None) is None
    assert not layer._fused_lowrank_applies(x, True)
    monkeypatch.setattr(dq, "available", lambda device: True)
    with torch.no_grad():
        y = layer(x)
    assert y.dtype == torch.float16 and torch.isfinite(y).all()
    monkeypatch.undo()
    with torch.no_grad():
        ref = layer(x)  # the CPU reference
    torch.testing.assert_close(y, ref, atol=2e-2, rtol=2e-2)


def test_forward_16bit_declines_what_it_does_not_cover(rng):
    x = torch.randn(4, 96, generator=rng).bfloat16()
    assert dq.forward_16bit(_layer("w4a4", 0, False), x) is None
    assert dq.forward_16bit(_layer("w4a16", 0, False), x.float()) is None  # fp32 input
    fp32_bias = _layer("w4a16", 0, False)
    fp32_bias.bias.data = fp32_bias.bias.data.float()
    assert dq.forward_16bit(fp32_bias, x) is None  # adding it in bf16 would round it
    with torch.inference_mode():
        frozen = _layer("w4a16", 8, True)
    xg = x.clone().requires_grad_(True)
    assert dq.forward_16bit(frozen, xg) is None  # autograd cannot save inference buffers
    with torch.no_grad():
        assert dq.forward_16bit(frozen, xg) is not None


@pytest.mark.parametrize("rank, smooth, bias", [(8, False, True), (0, True, True),
                                                (8, True, False)])  # fmt: skip
@pytest.mark.parametrize("inference_buffers", [False, True])
def test_forward_16bit_with_low_rank_and_smoothing_matches_the_reference(
    rank, smooth, bias, inference_buffers, rng
):
    # W4A16 with an SVDQuant branch and / or smoothing in bf16 (x / s rounded once, the branch
    # in bf16 added in the GEMM's epilogue) against the fp32 reference layer: a few bf16
    # roundings, far below the weight's 4-bit error.
    with torch.inference_mode(inference_buffers):
        layer = _layer("w4a16", rank, smooth)
    if not bias:
        layer.bias = None
    x = (torch.randn(4, 9, 96, generator=rng) * 3).bfloat16()
    with torch.no_grad():
        got = dq.forward_16bit(layer, x)
        want = layer(x)  # the CPU reference: fp32 throughout, one rounding at the end
    assert got is not None and got.shape == (4, 9, 40) and got.dtype == torch.bfloat16
    err = float((got.float() - want.float()).norm() / want.float().norm())
    assert err < 1e-2, err
    torch.testing.assert_close(got.float(), want.float(), atol=5e-2, rtol=2e-2)


def test_forward_16bit_low_rank_trains_its_input(rng):
    # Not inference: the gradient reaches x through the main GEMM and the low-rank branch.
    layer = _layer("w4a16", 8, True)
    x = (torch.randn(5, 96, generator=rng) * 2).bfloat16().requires_grad_(True)
    dy = torch.randn(5, 40, generator=rng).bfloat16()
    dq.forward_16bit(layer, x).backward(dy)
    w_full = layer.dequantized_weight() + layer.lora_up.float() @ layer.lora_down.float()
    want = (dy.float() @ w_full) / layer.smooth  # d(x / s) / dx = 1 / s
    assert float((x.grad.float() - want).norm() / want.norm()) < 2e-2


def test_layer_takes_the_one_gemm_path_where_the_dequant_path_runs(rng, monkeypatch):
    # With the dequantize path available, a plain W4A16 layer on a bf16 input never builds the
    # fp32 result (forward_main) and still trains its input (straight-through gradient).
    layer = _layer("w4a16", 0, False)
    monkeypatch.setattr(dq, "available", lambda device: True)
    monkeypatch.setattr(dq, "forward_main", lambda *a: pytest.fail("fp32 general form ran"))
    x = (torch.randn(5, 96, generator=rng) * 2).bfloat16().requires_grad_(True)
    y = layer(x)
    assert y.dtype == torch.bfloat16
    dy = torch.randn(5, 40, generator=rng).bfloat16()
    y.backward(dy)
    want = dy.float() @ layer.dequantized_weight()
    assert float((x.grad.float() - want).norm() / want.norm()) < 1e-2
    monkeypatch.undo()
    with torch.no_grad():
        ref = layer(x)  # the CPU reference
    torch.testing.assert_close(y.float(), ref.float(), atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("rank, smooth, bias", [(0, False, True), (0, False, False),
                                                (8, True, True), (8, False, False)])  # fmt: skip
def test_w4a4_16bit_form_matches_the_reference(rank, smooth, bias, rng):
    # The W4A4 inference form in bf16 (GEMM result rounded once before the global scales, the
    # low-rank branch and bias in bf16) against the fp32 reference layer: a few bf16 roundings.
    layer = _layer("w4a4", rank, smooth)
    if not bias:
        layer.bias = None
    x = (torch.randn(4, 9, 96, generator=rng) * 3).bfloat16()
    xf = _smoothed(layer, x)
    with torch.no_grad():
        got = dq.forward_w4a4_16bit(layer, x, xf, None)
        want = layer.reference_main(xf, None)
        if rank:
            want = want + (xf @ layer.lora_down.float().t()) @ layer.lora_up.float().t()
        if bias:
            want = want + layer.bias.float()
    assert got.shape == (4, 9, 40) and got.dtype == torch.bfloat16
    err = float((got.float() - want).norm() / want.norm())
    assert err < 1e-2, err
    torch.testing.assert_close(got.float(), want, atol=5e-2, rtol=2e-2)


def test_w4a4_16bit_form_declines_training_and_fp32(rng):
    layer = _layer("w4a4", 0, False)
    x = torch.randn(4, 96, generator=rng).bfloat16()
    assert dq.forward_w4a4_16bit(layer, x.float(), x.float(), None) is None
    xg = x.clone().requires_grad_(True)
    assert dq.forward_w4a4_16bit(layer, xg, xg.float(), None) is None  # straight-through grad
    with torch.no_grad():
        assert dq.forward_w4a4_16bit(layer, xg, xg.float(), None) is not None
        assert dq.forward_w4a4_16bit(_layer("w4a16", 0, False), x, x.float(), None) is None


def test_w4a4_layer_takes_the_16bit_form_in_inference(rng, monkeypatch):
    layer = _layer("w4a4", 8, True)
    monkeypatch.setattr(dq, "available", lambda device: True)
    monkeypatch.setattr(dq, "forward_main", lambda *a: pytest.fail("fp32 form ran"))
    x = torch.randn(6, 96, generator=rng).bfloat16()
    with torch.no_grad():
        y = layer(x)
        monkeypatch.undo()
        ref = layer(x)  # the CPU reference
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), ref.float(), atol=5e-2, rtol=2e-2)


def test_w4a4_layer_quantizes_a_16bit_input_without_an_fp32_copy(rng, monkeypatch):
    # No smoothing: the activation quantize reads x itself (same codes as its fp32 copy), so
    # the 16-bit form makes no fp32 copy of x; with smoothing it reads x / s in fp32.
    seen = []
    quantize = dq._activation_16bit

    def spy(x2, static, dtype):  # noqa: ANN001, ANN202
        seen.append(x2.dtype)
        return quantize(x2, static, dtype)

    monkeypatch.setattr(dq, "available", lambda device: True)
    monkeypatch.setattr(dq, "_activation_16bit", spy)
    x = torch.randn(6, 96, generator=rng).bfloat16()
    with torch.no_grad():
        plain = _layer("w4a4", 8, False)
        y = plain(x)
        _layer("w4a4", 8, True)(x)
        monkeypatch.undo()
        ref = plain(x)  # the CPU reference (from the fp32 copy)
    assert seen == [torch.bfloat16, torch.float32]
    torch.testing.assert_close(y.float(), ref.float(), atol=5e-2, rtol=2e-2)


@pytest.mark.parametrize("calibrated", [True, False])
def test_w4a4_inference_buffers_choose_the_activation_scale_without_a_host_read(
    calibrated, rng, monkeypatch
):
    # An inference-mode input_scale has no version counter, so "is it calibrated" cannot be
    # cached: the layer chooses between it and the dynamic scale on the device (no sync per
    # call) and gives the result of a normal layer with the same buffers.
    normal = _layer("w4a4", 0, False)
    if calibrated:
        normal.input_scale.fill_(0.002)  # saturates the largest activations
    with torch.inference_mode():
        frozen = _layer("w4a4", 0, False)
        frozen.load_state_dict(normal.state_dict())
    assert frozen.input_scale.is_inference()
    monkeypatch.setattr(frozen, "_memo", lambda *a: pytest.fail("host read of input_scale"))
    x = torch.randn(6, 96, generator=rng) * 3
    with torch.no_grad():
        got = frozen(x)
        want = normal(x)
        other = normal.reference_main(x, None if calibrated else torch.tensor(0.002))
    torch.testing.assert_close(got, want, atol=0, rtol=0)
    assert not torch.allclose(got, other + normal.bias, atol=1e-3)  # the choice matters here


@pytest.mark.parametrize("mode", ["w4a16", "w4a4"])
def test_layer_forward_makes_no_finiteness_check(mode, rng, monkeypatch):
    # The NaN / Inf check of the activation quantize is a device sync: never on the layer's
    # hot path (NVFP4Linear's doc), on any of its paths.
    import dcgen.quant.nvfp4 as fmt

    layer = _layer(mode, 4, True)
    monkeypatch.setattr(dq, "available", lambda device: True)
    for name in ("ensure_finite", "ensure_global_scale"):
        monkeypatch.setattr(fmt, name, lambda *a, name=name: pytest.fail(f"{name} ran"))
    with torch.no_grad():
        y = layer(torch.randn(5, 96, generator=rng).bfloat16())
    assert torch.isfinite(y).all()


def test_not_available_on_cpu():
    assert not dq.available(torch.device("cpu"))


def _needs_path() -> None:
    if not has_kernel("nvfp4_dequantize", "cuda"):
        pytest.skip("dcgen._C built without the CUDA nvfp4_dequantize kernel")


@pytest.mark.cuda
@pytest.mark.parametrize("mode, rank, smooth", CASES)
@pytest.mark.parametrize("shape", [(1, 96), (300, 96), (4, 77, 96)])
def test_cuda_layer_matches_reference(mode, rank, smooth, shape, rng, monkeypatch):
    _needs_path()
    layer = _layer(mode, rank, smooth).cuda()
    x = torch.randn(*shape, generator=rng).mul(3).cuda().bfloat16()
    assert dq.available(x.device)
    with torch.no_grad():
        xf = _smoothed(layer, x)
        fast = dq.forward_main(layer, x, xf, None)
        y = layer(x)  # W4A4 on sm_100 / sm_120: the native GEMM (bf16 output)
        monkeypatch.setenv("DCGEN_DISABLE_KERNELS", "1")
        ref_main = layer.reference_main(xf, None)
        ref = layer(x)
    # fp32 results: only the summation order (cuBLAS vs CPU/torch fp32) differs.
    torch.testing.assert_close(fast, ref_main, atol=1e-4, rtol=1e-4)
    # the layer output in bf16: a few bf16 roundings (GEMM, branch, sum; the rank-8 smoothed
    # case's main product and branch nearly cancel on some outputs), as the CPU tests allow
    err = float((y.float() - ref.float()).norm() / ref.float().norm())
    assert err < 1e-2, err
    torch.testing.assert_close(y.float(), ref.float(), atol=5e-2, rtol=2e-2)


@pytest.mark.cuda
def test_cuda_flux_shape_and_grad(rng, monkeypatch):
    _needs_path()
    layer = _layer("w4a16", 0, False, k=3072, n=3072).cuda()
    x = torch.randn(2, 512, 3072, generator=rng).cuda().bfloat16().requires_grad_(True)
    y = layer(x)
    y.float().square().mean().backward()
    g = x.grad.clone()
    x.grad = None
    monkeypatch.setenv("DCGEN_DISABLE_KERNELS", "1")
    y_ref = layer(x)
    y_ref.float().square().mean().backward()
    torch.testing.assert_close(y.float(), y_ref.float(), atol=2e-2, rtol=2e-2)
    assert float((x.grad.float() - g.float()).norm() / g.float().norm()) < 1e-2
