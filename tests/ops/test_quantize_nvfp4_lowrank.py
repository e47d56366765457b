"""NVFP4 activation quantize fused with the SVDQuant down-projection: the reference against the
two ops it fuses, input errors, NVFP4Linear's use of it; on a GPU the kernel against the
reference (codes and scales bit-identical, t up to fp32 summation order, outputs poisoned)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dcgen.ops import has_kernel
from dcgen.ops._extension import compiled_op
from dcgen.ops.quantize_nvfp4 import (
    LOWRANK_KERNEL_RANKS,
    quantize_nvfp4_activation,
    quantize_nvfp4_lowrank,
    quantize_nvfp4_lowrank_reference,
    quantize_nvfp4_reference,
)
from dcgen.quant import NVFP4Linear, smoothing_factors
from dcgen.quant import dequant_path as dq
from dcgen.quant import linear as linear_mod
from dcgen.quant.nvfp4 import global_decode_scale
from tests.conftest import poison_cuda_allocator


def _inputs(m: int, k: int, r: int, dtype: torch.dtype, smooth: bool, rng: torch.Generator):
    x = (torch.randn(m, k, generator=rng) * 3).to(dtype)
    down = (torch.randn(r, k, generator=rng) / k**0.5).to(dtype)
    s = torch.rand(k, generator=rng) * 4 + 0.25 if smooth else None
    return x, down, s


@pytest.mark.parametrize("smooth", [False, True])
def test_reference_is_the_quantize_then_the_projection(smooth, rng):
    x, down, s = _inputs(37, 96, 16, torch.bfloat16, smooth, rng)
    gs = torch.tensor(0.004)
    packed, scales, t = quantize_nvfp4_lowrank_reference(x, gs, s, down)
    xs = x.float() / s if smooth else x.float()
    want_p, want_s = quantize_nvfp4_reference(xs, gs)
    assert torch.equal(packed, want_p) and torch.equal(
        scales.view(torch.uint8), want_s.view(torch.uint8)
    )
    # The projection reads xs rounded to the factor's dtype (x itself without smoothing).
    a = xs.bfloat16().float()
    assert torch.equal(a, x.float()) != smooth
    torch.testing.assert_close(t, a @ down.float().t(), atol=1e-5, rtol=1e-5)
    assert t.dtype == torch.float32 and t.shape == (37, 16)


@pytest.mark.parametrize("static", [False, True])
def test_public_op_scales_and_result_on_cpu(static, rng):
    x, down, s = _inputs(20, 64, 32, torch.bfloat16, True, rng)
    gs_in = torch.tensor(0.003) if static else None
    packed, scales, gs, t = quantize_nvfp4_lowrank(x, down, gs_in, s)
    xs = x.float() / s
    want_gs = gs_in if static else global_decode_scale(xs)
    assert torch.equal(gs, want_gs.reshape(()))
    want = quantize_nvfp4_lowrank_reference(x, want_gs, s, down)
    assert torch.equal(packed, want[0]) and torch.equal(t, want[2])
    p2, s2, _ = quantize_nvfp4_activation(xs, want_gs)
    assert torch.equal(packed, p2) and torch.equal(scales.view(torch.uint8), s2.view(torch.uint8))


def test_bad_inputs_name_what_was_expected(rng):
    x, down, s = _inputs(4, 32, 16, torch.bfloat16, True, rng)
    with pytest.raises(ValueError, match=r"down \[r, K\]"):
        quantize_nvfp4_lowrank(x, down[:, :16])
    with pytest.raises(TypeError, match="down: expected dtype"):
        quantize_nvfp4_lowrank(x, down.float())
    with pytest.raises(ValueError, match=r"smooth of shape \(32,\)"):
        quantize_nvfp4_lowrank(x, down, smooth=s[:8])
    with pytest.raises(TypeError, match="smooth: expected dtype"):
        quantize_nvfp4_lowrank(x, down, smooth=s.double())
    with pytest.raises(ValueError, match="one element"):
        quantize_nvfp4_lowrank(x, down, torch.ones(2))
    with pytest.raises(ValueError, match="with 2 dims, got shape"):
        quantize_nvfp4_lowrank(x[None], down)
    bad = x.clone()
    bad[1, 3] = float("nan")
    with pytest.raises(ValueError, match="NaN/Inf"):
        quantize_nvfp4_lowrank(bad, down)
    zero_factor = s.clone()
    zero_factor[5] = 0  # x / s is Inf (or NaN) in that column: what is quantized is checked
    with pytest.raises(ValueError, match=r"x / smooth: expected finite"):
        quantize_nvfp4_lowrank(x, down, torch.tensor(0.01), zero_factor)
    with pytest.raises(TypeError, match="global_scale: expected a torch.Tensor"):
        quantize_nvfp4_lowrank(x, down, 0.01)


def test_dynamic_scale_of_the_smoothed_input_without_building_it(rng):
    # max_i |x_ij| / |s_j| per column equals max |x / s| bit for bit (division by a positive
    # number is monotonic), so no fp32 copy x / s is needed for the dynamic scale.
    from dcgen.ops.quantize_nvfp4 import smoothed_decode_scale

    for _ in range(50):
        x = (torch.randn(7, 3, 48, generator=rng) * torch.rand(48, generator=rng) * 50).bfloat16()
        s = torch.rand(48, generator=rng) * 10 + 1e-3
        assert torch.equal(smoothed_decode_scale(x, s), global_decode_scale(x.float() / s))
    assert torch.equal(smoothed_decode_scale(x, None), global_decode_scale(x))


def _layer(rank: int, smooth: bool, bias: bool = True, k: int = 96, n: int = 40) -> NVFP4Linear:
    torch.manual_seed(0)
    lin = nn.Linear(k, n, bias=bias)
    s = smoothing_factors(torch.rand(k) * 5 + 0.1, lin.weight) if smooth else None
    return NVFP4Linear.from_linear(lin, "w4a4", rank=rank, smooth=s)


@pytest.mark.parametrize("smooth, bias", [(True, True), (False, False)])
def test_w4a4_layer_takes_the_fused_form_on_the_dequant_path(smooth, bias, rng, monkeypatch):
    # With the fused kernel "available" (its reference runs on CPU) and the dequantize path, a
    # low-rank W4A4 layer neither builds x / s in fp32 nor runs the unfused forms, and stays
    # within a few bf16 roundings of the fp32 reference layer.
    layer = _layer(32, smooth, bias)
    calls = []
    fused = linear_mod._qop.quantize_nvfp4_lowrank
    monkeypatch.setattr(linear_mod, "has_kernel", lambda name, device: True)
    monkeypatch.setattr(dq, "available", lambda device: True)
    monkeypatch.setattr(dq, "forward_w4a4_16bit", lambda *a: pytest.fail("unfused 16-bit form"))
    monkeypatch.setattr(dq, "forward_main", lambda *a: pytest.fail("fp32 form ran"))
    monkeypatch.setattr(
        linear_mod._qop,
        "quantize_nvfp4_lowrank",
        lambda *a, **kw: calls.append(1) or fused(*a, **kw),
    )
    x = torch.randn(3, 6, 96, generator=rng).bfloat16()
    with torch.no_grad():
        y = layer(x)
        monkeypatch.undo()
        ref = layer(x)  # the CPU reference
    assert calls == [1] and y.dtype == torch.bfloat16 and y.shape == (3, 6, 40)
    err = float((y.float() - ref.float()).norm() / ref.float().norm())
    assert err < 1e-2, err
    torch.testing.assert_close(y.float(), ref.float(), atol=5e-2, rtol=2e-2)


def test_fused_form_declines_training_odd_ranks_and_dtypes(rng, monkeypatch):
    monkeypatch.setattr(linear_mod, "has_kernel", lambda name, device: True)
    x = torch.randn(4, 96, generator=rng).bfloat16()
    layer = _layer(32, True)
    assert layer._fused_lowrank_applies(x, True)
    assert not layer._fused_lowrank_applies(x, False)  # no GEMM path to take the codes (CPU)
    assert not layer._fused_lowrank_applies(x.float(), True)
    assert not layer._fused_lowrank_applies(x.requires_grad_(True), True)  # straight-through
    assert not _layer(8, True)._fused_lowrank_applies(x.detach(), True)  # no kernel for r = 8
    assert not _layer(0, True)._fused_lowrank_applies(x.detach(), True)


def test_fake_impl_gives_the_output_shapes():
    # The registered fake (meta) implementation: what torch.compile traces the op with.
    from dcgen.ops._extension import has_schema

    if not has_schema("quantize_nvfp4_lowrank"):
        pytest.skip("dcgen._C not built")
    x = torch.empty(130, 96, dtype=torch.bfloat16, device="meta")
    down = torch.empty(32, 96, dtype=torch.bfloat16, device="meta")
    gs = torch.empty((), device="meta")
    p, sw, t = compiled_op("quantize_nvfp4_lowrank")(x, gs, None, down)
    assert p.shape == (130, 48) and sw.shape == (256 * 8,) and t.shape == (130, 32)
    assert p.dtype == torch.uint8 and sw.dtype == torch.float8_e4m3fn and t.dtype == torch.float32


# --------------------------------------------------------------------------------- CUDA kernel


def _needs_kernel() -> None:
    if not has_kernel("quantize_nvfp4_lowrank", "cuda"):
        pytest.skip("dcgen._C built without the CUDA quantize_nvfp4_lowrank kernel")


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("smooth", [False, True])
@pytest.mark.parametrize("static", [False, True])
def test_cuda_kernel_matches_reference(dtype, smooth, static, rng):
    _needs_kernel()
    for m, k in [(1, 16), (17, 48), (130, 96), (300, 3072)]:
        for r in LOWRANK_KERNEL_RANKS:
            x, down, s = _inputs(m, k, r, dtype, smooth, rng)
            x[m // 2, : min(k, 16)] = 0  # an all-zero block: scale 0, codes 0
            xc, dc = x.cuda(), down.cuda()
            sc = s.cuda() if smooth else None
            gs = torch.tensor(0.002 if static else 0.0, device="cuda")
            if not static:
                gs = global_decode_scale(xc.float() / sc if smooth else xc)
            poison_cuda_allocator()
            packed, scales, t = compiled_op("quantize_nvfp4_lowrank")(xc, gs, sc, dc)
            want_p, want_s, want_t = quantize_nvfp4_lowrank_reference(
                x, gs.cpu(), s, down, check_finite=False
            )
            case = f"m={m} k={k} r={r}"
            assert torch.equal(packed.cpu(), want_p), case
            assert torch.equal(scales.cpu().view(torch.uint8), want_s.view(torch.uint8)), case
            # fp32 sums of the same 16-bit products in another order.
            torch.testing.assert_close(t.cpu(), want_t, atol=2e-3, rtol=1e-4, msg=case)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_kernel_ties_bit_exact(dtype, rng):
    """Quotients on and next to every E2M1 decision point (ties included), so the kernel's
    reciprocal products and its division fallback both run (tests/ops/test_quantize.py)."""
    from tests.ops.test_quantize import _ties_nvfp4

    _needs_kernel()
    x, g = _ties_nvfp4(dtype, rng)
    down = (torch.randn(32, x.shape[1], generator=rng) / 16).to(dtype)
    xc, gc, dc = x.cuda(), g.cuda(), down.cuda()
    poison_cuda_allocator()
    packed, scales, t = compiled_op("quantize_nvfp4_lowrank")(xc, gc, None, dc)
    want_p, want_s, want_t = quantize_nvfp4_lowrank_reference(x, g, None, down)
    assert torch.equal(packed.cpu(), want_p)
    assert torch.equal(scales.cpu().view(torch.uint8), want_s.view(torch.uint8))
    torch.testing.assert_close(t.cpu(), want_t, atol=2e-3, rtol=1e-4)


@pytest.mark.cuda
def test_cuda_kernel_non_finite_block_and_misaligned_view(rng):
    _needs_kernel()
    flat = (torch.randn(40 * 64 + 1, generator=rng) * 3).bfloat16()
    flat[1 + 3 * 64 + 20] = float("nan")  # row 3, block 1
    x = flat[1:].view(40, 64)
    down = (torch.randn(32, 64, generator=rng) / 8).bfloat16()
    view = flat.cuda()[1:].view(40, 64)  # contiguous, at an odd element offset
    assert view.data_ptr() % 4 != 0
    gs = torch.tensor(0.003, device="cuda")
    poison_cuda_allocator()
    packed, scales, _, t = quantize_nvfp4_lowrank(view, down.cuda(), gs, check_finite=False)
    want_p, want_s, want_t = quantize_nvfp4_lowrank_reference(
        x, gs.cpu(), None, down, check_finite=False
    )
    assert torch.equal(packed.cpu(), want_p)
    assert torch.equal(scales.cpu().view(torch.uint8), want_s.view(torch.uint8))
    torch.testing.assert_close(t.cpu(), want_t, atol=2e-3, rtol=1e-4, equal_nan=True)
    assert torch.isnan(t[3]).all() and torch.isfinite(t[torch.arange(40) != 3]).all()


@pytest.mark.cuda
@pytest.mark.parametrize("smooth", [False, True])
def test_cuda_layer_fused_form_matches_reference(smooth, rng, monkeypatch):
    _needs_kernel()
    layer = _layer(32, smooth, k=256, n=192).cuda()
    x = torch.randn(3, 77, 256, generator=rng).cuda().bfloat16()
    assert layer._fused_lowrank_applies(x, dq.available(x.device))
    with torch.no_grad():
        y = layer(x)
        monkeypatch.setenv("DCGEN_DISABLE_KERNELS", "1")
        ref = layer(x)
    err = float((y.float() - ref.float()).norm() / ref.float().norm())
    assert err < 1e-2, err
    torch.testing.assert_close(y.float(), ref.float(), atol=5e-2, rtol=2e-2)
