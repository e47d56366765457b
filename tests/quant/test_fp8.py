"""FP8 (E4M3) W8A8: the recipe, FP8Linear (GEMM vs its pure-PyTorch spec), quantize_ with
FP8Config on a tiny FLUX, save / load, quality_report, LoRA composition and bad inputs."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from dcgen.ops.quantize_fp8 import dequantize_fp8, quantize_fp8, quantize_fp8_reference
from dcgen.quant import (
    FP8Config,
    FP8Linear,
    NVFP4Linear,
    fp8_gemm,
    fp8_linear_reference,
    load_quantized,
    quality_report,
    quantize_,
    save_quantized,
)
from dcgen.quant.fp8 import scaled_mm_supported

from .test_quantize_api import KEPT, QUANTIZED, flux_inputs, rel, tiny_flux

GRANS = ("row", "block128")


@pytest.fixture(scope="module")
def fp_model():
    return tiny_flux()


@pytest.fixture(scope="module")
def fp_out(fp_model):
    with torch.no_grad():
        return fp_model(**flux_inputs())[0]


# ----------------------------------------------------------------------------- recipe


def test_recipe_row_scales_and_codes():
    x = torch.tensor([[448.0, -224.0, 1.0, 0.0], [0.0, 0.0, 0.0, 0.0], [3.0, -1.5, 0.75, 17.0]])
    q, s = quantize_fp8_reference(x, "row")
    assert q.dtype == torch.float8_e4m3fn and s.dtype == torch.float32 and s.shape == (3, 1)
    assert s[:, 0].tolist() == [1.0, 1.0, (torch.tensor(17.0) * torch.tensor(1 / 448)).item()]
    assert q[0].float().tolist() == [448.0, -224.0, 1.0, 0.0]
    assert q[1].float().abs().sum() == 0  # all-zero row: scale 1, zero codes
    # row max maps to exactly 448; the other elements follow x / scale, RNE to E4M3
    want = (x[2] / s[2]).clamp(-448, 448).to(torch.float8_e4m3fn)
    assert torch.equal(q[2].view(torch.uint8), want.view(torch.uint8))
    assert q[2, 3].float() == 448.0


def test_scale_is_the_product_with_the_fp32_reciprocal():
    # The spec every backend computes alike: amax * fp32(1/448). CPU's amax / 448 differs for
    # about half of all values (CUDA and Inductor turn that division into this product).
    import numpy as np

    amax = torch.arange(1, 2**15, dtype=torch.int32).to(torch.int16).view(torch.bfloat16).float()
    amax = amax[torch.isfinite(amax)]
    _, s = quantize_fp8_reference(amax[:, None], "row")
    want = amax.numpy() * np.float32(1 / 448)
    assert np.array_equal(s[:, 0].numpy(), want)
    assert (s[:, 0] != amax / 448).any()  # the division would be another spec


@pytest.mark.parametrize("k", [1, 5, 127, 128, 129, 300])
def test_recipe_block128_tails(k, rng):
    x = torch.randn(3, k, generator=rng) * 10
    x[1, : min(k, 128)] = 0  # a zero block
    q, s = quantize_fp8_reference(x, "block128")
    nb = -(-k // 128)
    assert q.shape == (3, k) and s.shape == (3, nb)
    assert s[1, 0] == 1.0 and q[1, : min(k, 128)].float().abs().sum() == 0
    for b in range(nb):
        blk = x[:, b * 128 : (b + 1) * 128]
        amax = blk.abs().amax(-1)
        expect = torch.where(amax == 0, torch.ones_like(amax), amax * torch.tensor(1 / 448))
        assert torch.equal(s[:, b], expect)
    err = (dequantize_fp8(q, s) - x).abs()
    # E4M3 keeps 3 mantissa bits: relative rounding error <= 2^-4 (plus subnormal steps)
    assert (err <= x.abs() / 16 + s.repeat_interleave(128, -1)[:, :k] * 2**-9).all()


def test_an_underflowing_scale_is_one_not_nan():
    """A finite amax so small that amax * fp32(1/448) underflows to 0 (fp32 subnormals) gets
    scale 1, as an all-zero row does, not x / 0 = NaN codes; rows beside it are unchanged."""
    tiny = torch.tensor([[1e-43, -2e-44, 0.0, 5e-45], [1.0, -2.0, 0.5, 0.25]])
    assert (tiny[0].abs().amax() * torch.tensor(1 / 448)).item() == 0.0  # the case at hand
    for g in GRANS:
        q, s = quantize_fp8_reference(tiny, g)
        assert s[0].tolist() == [1.0] and s[1, 0] == torch.tensor(2.0) * torch.tensor(1 / 448)
        deq = dequantize_fp8(q, s)
        assert torch.isfinite(deq).all() and (deq[0] == 0).all()


def test_recipe_non_finite_poisons_row_or_block():
    x = torch.ones(4, 256)
    x[0, 3] = float("nan")
    x[1, 200] = float("inf")
    q, s = quantize_fp8_reference(x, "block128")
    deq = dequantize_fp8(q, s)
    assert deq[0, :128].isnan().all() and torch.isfinite(deq[0, 128:]).all()
    assert deq[1, 128:].isnan().all() and torch.isfinite(deq[1, :128]).all()
    assert torch.isfinite(deq[2:]).all()
    q, s = quantize_fp8_reference(x, "row")
    assert dequantize_fp8(q, s)[:2].isnan().all()


def test_dequantize_fp8_names_a_device_mix():
    # the scales on another device failed inside torch's multiply
    q = torch.zeros(4, 8, dtype=torch.float8_e4m3fn)
    with pytest.raises(ValueError, match="expected all tensors on one device, got q on cpu, "):
        dequantize_fp8(q, torch.ones(4, 1, device="meta"))


def test_public_op_matches_reference_and_shapes(rng):
    x = torch.randn(2, 3, 200, generator=rng).bfloat16()
    for g in GRANS:
        q, s = quantize_fp8(x, g)
        qr, sr = quantize_fp8_reference(x, g)
        assert torch.equal(q.view(torch.uint8), qr.view(torch.uint8)) and torch.equal(s, sr)
        assert q.shape == x.shape and s.shape[:2] == (2, 3)


# ----------------------------------------------------------------------------- layer


@pytest.mark.parametrize("granularity", GRANS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_gemm_matches_its_spec(granularity, dtype, rng):
    torch.manual_seed(0)
    lin = nn.Linear(256, 48)
    q = FP8Linear.from_linear(lin, granularity)
    assert q.weight.dtype == torch.float8_e4m3fn and q.weight.shape == (48, 256)
    assert q.weight_scale.shape == ((48, 1) if granularity == "row" else (48, 2))
    x = torch.randn(3, 7, 256, generator=rng).to(dtype)
    with torch.no_grad():
        y, ref = q(x), q.reference_forward(x)
    assert y.shape == (3, 7, 48) and y.dtype == dtype
    # Same quantized operands; only fp32 summation order and the one output rounding differ.
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(y.float(), ref.float(), atol=tol, rtol=tol)
    # vs the unquantized layer (measured 0.037 row / 0.038 block128: Gaussian input, default init)
    assert rel(y, lin(x.float())) < 0.06


@pytest.mark.parametrize("granularity", GRANS)
@pytest.mark.parametrize("shape", [(0, 256), (2, 0, 256)])
def test_linear_takes_an_empty_batch_like_nn_linear(granularity, shape):
    lin = nn.Linear(256, 8)
    q = FP8Linear.from_linear(lin, granularity)
    x = torch.randn(*shape)
    with torch.no_grad():
        assert q(x).shape == lin(x).shape == (*shape[:-1], 8)
    y = q(x.requires_grad_())  # the gradient path too
    y.sum().backward()
    assert x.grad.shape == x.shape


def test_fp8_gemm_paths_agree(rng):
    xq, xs = quantize_fp8_reference(torch.randn(9, 64, generator=rng), "row")
    wq, ws = quantize_fp8_reference(torch.randn(32, 64, generator=rng), "row")
    b = torch.randn(32, generator=rng)
    assert scaled_mm_supported(torch.device("cpu"), "row", torch.float32, 32, 64)
    assert not scaled_mm_supported(torch.device("cpu"), "block128", torch.float32, 32, 64)
    y = fp8_gemm(xq, xs, wq, ws, b, torch.float32, "row")
    torch.testing.assert_close(y, fp8_linear_reference(xq, xs, wq, ws, b, torch.float32))


def test_row_gemm_route_choice(monkeypatch):
    import dcgen.quant.fp8 as f

    cpu = torch.device("cpu")
    monkeypatch.delenv("DCGEN_FP8_GEMM", raising=False)
    assert f.row_gemm_route(cpu) == "rowwise"  # auto: the epilogue kernel is CUDA-only
    for route in ("tensor", "rowwise"):
        monkeypatch.setenv("DCGEN_FP8_GEMM", route)
        assert f.row_gemm_route(cpu) == route
    monkeypatch.setenv("DCGEN_FP8_GEMM", "fast")
    with pytest.raises(ValueError, match="DCGEN_FP8_GEMM: expected one of"):
        f.row_gemm_route(cpu)


@pytest.mark.parametrize("act", ["none", "gelu_tanh"])
@pytest.mark.parametrize("route", ["tensor", "rowwise"])
def test_fp8_gemm_routes_match_the_spec(route, act, rng, monkeypatch):
    # "tensor": a unit-scale _scaled_mm into bf16, then the scale epilogue; "rowwise": the scales
    # inside _scaled_mm. Both equal the spec up to summation order and (tensor) one more bf16
    # rounding of the unscaled product.
    import dcgen.quant.fp8 as f

    monkeypatch.setenv("DCGEN_FP8_GEMM", route)
    calls = []
    original = f.fp8_scale_epilogue
    monkeypatch.setattr(
        f, "fp8_scale_epilogue", lambda *a, **k: calls.append(a) or original(*a, **k)
    )
    xq, xs = quantize_fp8_reference(torch.randn(9, 64, generator=rng) * 3, "row")
    wq, ws = quantize_fp8_reference(torch.randn(40, 64, generator=rng) * 0.1, "row")
    b = torch.randn(40, generator=rng).bfloat16()
    y = fp8_gemm(xq, xs, wq, ws, b, torch.bfloat16, "row", act)
    want = fp8_linear_reference(xq, xs, wq, ws, b, torch.float32)
    if act == "gelu_tanh":
        want = torch.nn.functional.gelu(want, approximate="tanh")
    assert y.dtype == torch.bfloat16 and y.shape == (9, 40)
    assert len(calls) == (route == "tensor")
    torch.testing.assert_close(y.float(), want, rtol=2**-7, atol=2e-2)


@pytest.mark.parametrize("fast", [False, True])
@pytest.mark.parametrize("route", ["tensor", "rowwise"])
def test_fast_accum_reaches_scaled_mm_on_both_routes(route, fast, rng, monkeypatch):
    # fast_accum is _scaled_mm's use_fast_accum on either route (the CPU kernel sums in fp32
    # either way, so the bits are the same; on Hopper it is the faster, less exact sum).
    import dcgen.quant.fp8 as f

    monkeypatch.setenv("DCGEN_FP8_GEMM", route)
    monkeypatch.setattr(f, "_REJECTED", set())
    seen = []
    original = torch._scaled_mm
    monkeypatch.setattr(
        torch, "_scaled_mm", lambda *a, **k: seen.append(k["use_fast_accum"]) or original(*a, **k)
    )
    xq, xs = quantize_fp8_reference(torch.randn(9, 64, generator=rng) * 3, "row")
    wq, ws = quantize_fp8_reference(torch.randn(40, 64, generator=rng) * 0.1, "row")
    b = torch.randn(40, generator=rng).bfloat16()
    y = fp8_gemm(xq, xs, wq, ws, b, torch.bfloat16, "row", "none", fast)
    assert seen == [fast]
    assert torch.equal(y, fp8_gemm(xq, xs, wq, ws, b, torch.bfloat16, "row"))


@pytest.mark.parametrize("m", [66, 64, 1])
def test_block128_scaled_mm_gets_row_count_a_multiple_of_4(m, rng, monkeypatch):
    # cuBLAS's 1x128 blockwise GEMM rejects an M that is not a multiple of 4 (H200, torch 2.11):
    # _scaled_mm pads A with zero rows at unit scale and returns the first M rows. The CPU has no
    # blockwise _scaled_mm, so a stand-in with cuBLAS's condition computes the blockwise spec.
    import dcgen.quant.fp8 as f

    shapes = []

    def blockwise(a, b, scale_a, scale_b, bias=None, out_dtype=None, use_fast_accum=False):
        shapes.append(tuple(a.shape))
        if a.shape[0] % 4 or scale_a.stride(0) != 1:
            raise RuntimeError("CUBLAS_STATUS_NOT_SUPPORTED")
        da = a.float() * scale_a.repeat_interleave(128, 1)
        db = b.float() * scale_b.repeat_interleave(128, 0)
        return (da @ db + (0 if bias is None else bias.float())).to(out_dtype)

    monkeypatch.setattr(torch, "_scaled_mm", blockwise)
    xq, xs = quantize_fp8_reference(torch.randn(m, 256, generator=rng) * 3, "block128")
    wq, ws = quantize_fp8_reference(torch.randn(48, 256, generator=rng) * 0.1, "block128")
    b = torch.randn(48, generator=rng).bfloat16()
    y = f._scaled_mm(xq, xs, wq, ws, b, torch.bfloat16, "block128")
    assert shapes == [(m + (-m % 4), 256)] and y.shape == (m, 48)
    want = f.fp8_linear_reference(xq, xs, wq, ws, b, torch.bfloat16)
    torch.testing.assert_close(y.float(), want.float(), rtol=2**-7, atol=1e-2)


def test_fast_accum_is_checked():
    xq, xs = quantize_fp8_reference(torch.randn(2, 128), "block128")
    with pytest.raises(ValueError, match="fast_accum: expected granularity 'row'"):
        fp8_gemm(xq, xs, xq, xs, None, torch.float32, "block128", "none", True)
    with pytest.raises(ValueError, match="fast_accum: expected granularity 'row'"):
        FP8Config(granularity="block128", fast_accum=True)
    with pytest.raises(TypeError, match="expected fast_accum True or False"):
        FP8Config(fast_accum=1)
    with pytest.raises(ValueError, match="fast_accum: expected granularity 'row'"):
        FP8Linear(128, 8, granularity="block128", fast_accum=True)
    with pytest.raises(TypeError, match="fast_accum: expected a bool"):
        FP8Linear(128, 8, fast_accum="yes")


def test_fast_accum_config_reaches_layers_and_survives_save_load(fp_model, tmp_path, monkeypatch):
    from dcgen.quant import quantized_modules

    model = copy.deepcopy(fp_model)
    quantize_(model, FP8Config(fast_accum=True))
    layers = quantized_modules(model)
    assert layers and all(m.fast_accum for m in layers.values())
    assert "fast_accum=True" in repr(next(iter(layers.values())))
    seen = []
    original = torch._scaled_mm
    monkeypatch.setattr(
        torch, "_scaled_mm", lambda *a, **k: seen.append(k["use_fast_accum"]) or original(*a, **k)
    )
    with torch.no_grad():
        model(**flux_inputs())
    assert seen and all(seen)
    save_quantized(model, tmp_path / "q.safetensors")
    fresh = copy.deepcopy(fp_model)
    load_quantized(fresh, tmp_path / "q.safetensors")
    assert all(m.fast_accum for m in quantized_modules(fresh).values())
    # a file without the flag (written before it existed) loads with the default
    plain = copy.deepcopy(fp_model)
    quantize_(plain, FP8Config())
    save_quantized(plain, tmp_path / "p.safetensors")
    load_quantized(fresh, tmp_path / "p.safetensors")
    assert not any(m.fast_accum for m in quantized_modules(fresh).values())


def test_fp8_gemm_fp16_output_never_takes_the_unscaled_route(rng, monkeypatch):
    # Unit-scale codes of large activations and weights sum past fp16's 65,504: the "tensor"
    # route would return inf there, so an fp16 output keeps the scales inside the GEMM.
    import dcgen.quant.fp8 as f

    monkeypatch.setenv("DCGEN_FP8_GEMM", "tensor")
    calls = []
    monkeypatch.setattr(f, "fp8_scale_epilogue", lambda *a, **k: calls.append(a))
    xq, xs = quantize_fp8_reference(torch.ones(4, 512), "row")  # every code 448
    wq, ws = quantize_fp8_reference(torch.ones(8, 512), "row")  # 512 * 448^2 >> 65,504
    y = fp8_gemm(xq, xs, wq, ws, None, torch.float16, "row")
    assert not calls
    assert y.dtype == torch.float16 and torch.isfinite(y).all()
    torch.testing.assert_close(y.float(), torch.full((4, 8), 512.0), rtol=1e-3, atol=0)


def test_fp8_gemm_rejects_unknown_act(rng):
    xq, xs = quantize_fp8_reference(torch.randn(2, 16, generator=rng), "row")
    with pytest.raises(ValueError, match="act"):
        fp8_gemm(xq, xs, xq, xs, None, torch.float32, "row", "relu")


@pytest.mark.parametrize(
    "cap, row, block",
    [((8, 6), False, False), ((8, 9), True, False), ((9, 0), True, True), ((10, 0), True, True),
     ((12, 0), True, False)],
)  # fmt: skip
def test_scaled_mm_capability_gate(cap, row, block, monkeypatch):
    """Which cards send FP8 GEMMs to torch._scaled_mm: row scales from sm_89 (Ada) on, 1x128
    blocks on sm_90 / sm_100 only. The capability is one int (see fp8._capability)."""
    import dcgen.quant.fp8 as f

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: cap)
    cuda = torch.device("cuda", 0)
    assert f._capability(0) == 10 * cap[0] + cap[1]
    assert scaled_mm_supported(cuda, "row", torch.bfloat16, 32, 256) is row
    assert scaled_mm_supported(cuda, "block128", torch.bfloat16, 32, 256) is block
    assert not scaled_mm_supported(cuda, "block128", torch.bfloat16, 32, 200)  # K % 128
    assert not scaled_mm_supported(cuda, "row", torch.float16, 32, 256)  # bf16 output only


def test_lower_error_than_nvfp4(rng):
    torch.manual_seed(0)
    lin = nn.Linear(128, 64)
    x = torch.randn(16, 128, generator=rng)
    ref = lin(x).detach()
    e_fp8 = rel(FP8Linear.from_linear(lin, "row")(x), ref)
    e_fp4 = rel(NVFP4Linear.from_linear(lin, "w4a4")(x), ref)
    assert e_fp8 < 0.5 * e_fp4, (e_fp8, e_fp4)


def test_to_dtype_keeps_format(rng):
    q = FP8Linear.from_linear(nn.Linear(32, 16), "block128")
    x = torch.randn(3, 32, generator=rng)
    ref = q(x).detach()
    q = q.to(torch.bfloat16)
    assert q.weight.dtype == torch.float8_e4m3fn and q.weight_scale.dtype == torch.float32
    assert q.bias.dtype == torch.bfloat16
    # bf16 input moves some activations across E4M3 rounding boundaries, so the two quantized
    # paths differ by up to about one quantization error (~2-4% relative on 32 features).
    assert rel(q(x.bfloat16()), ref) < 0.06


def test_gradient_flows_to_input_straight_through(rng):
    lin = nn.Linear(64, 32)
    q = FP8Linear.from_linear(lin)
    x = torch.randn(5, 64, generator=rng, requires_grad=True)
    q(x).sum().backward()
    torch.testing.assert_close(x.grad, q.dequantized_weight().sum(0).expand(5, 64))
    assert q.bias.grad is not None and torch.equal(q.bias.grad.float(), torch.full((32,), 5.0))


# ----------------------------------------------------------------------------- model API


@pytest.mark.parametrize("granularity", GRANS)
def test_quantize_flux_forward_error(fp_model, fp_out, granularity):
    model = copy.deepcopy(fp_model)
    names = quantize_(model, FP8Config(granularity=granularity))
    assert set(names) == QUANTIZED
    for n in KEPT:
        assert type(model.get_submodule(n)) is nn.Linear, n
    with torch.no_grad():
        out = model(**flux_inputs())[0]
    # Measured on this tiny FLUX (fp32): 0.0034 (row), 0.0035 (block128); NVFP4 w4a4 is 0.014.
    err = rel(out, fp_out)
    assert 0 < err < 0.01, err


def test_include_exclude_respected(fp_model):
    model = copy.deepcopy(fp_model)
    names = quantize_(model, FP8Config(include=(r"^transformer_blocks\.",), exclude=(r"\.ff\.",)))
    assert names and all(n.startswith("transformer_blocks.") and ".ff." not in n for n in names)
    assert type(model.get_submodule("transformer_blocks.0.ff.net.2")) is nn.Linear
    assert type(model.get_submodule("single_transformer_blocks.0.proj_out")) is nn.Linear
    assert isinstance(model.get_submodule("transformer_blocks.0.attn.to_q"), FP8Linear)


@pytest.mark.parametrize("granularity", GRANS)
def test_save_load_round_trip(fp_model, tmp_path, granularity):
    model = copy.deepcopy(fp_model)
    names = quantize_(model, FP8Config(granularity=granularity))
    path = tmp_path / "fp8.safetensors"
    save_quantized(model, path)
    fresh = tiny_flux()
    assert set(load_quantized(fresh, path)) == set(names)
    with torch.no_grad():
        assert torch.equal(model(**flux_inputs())[0], fresh(**flux_inputs())[0])
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        w = f.get_tensor("transformer_blocks.0.attn.to_q.weight")
        ws = f.get_tensor("transformer_blocks.0.attn.to_q.weight_scale")
    assert meta["format"] == "dcgen-fp8" and meta["mode"] == f"fp8-{granularity}"
    assert w.dtype == torch.float8_e4m3fn and w.shape == (32, 32)
    assert ws.dtype == torch.float32 and ws.shape == (32, 1)


def test_save_writes_the_model_tensors_without_copying_them(fp_model, tmp_path, monkeypatch):
    # Every tensor was cloned before writing: a second full model in memory during the save
    # (12 GB more for an FP8 FLUX). Only tied / view tensors (which safetensors refuses) and
    # non-contiguous ones may be copied, and the file must still hold the right values.
    import dcgen.quant.api as api

    model = copy.deepcopy(fp_model)
    quantize_(model, FP8Config(granularity="row"))
    model.proj_out.weight = model.x_embedder.weight  # tied: shares the storage
    model.context_embedder.weight = nn.Parameter(
        model.context_embedder.weight.detach().t().contiguous().t()
    )
    state = model.state_dict()
    written = {}
    real = api.save_file

    def spy(tensors, filename, metadata=None):  # noqa: ANN001, ANN202
        written.update(tensors)
        return real(tensors, filename, metadata=metadata)

    monkeypatch.setattr(api, "save_file", spy)
    path = tmp_path / "fp8.safetensors"
    save_quantized(model, path)
    copied = {k for k, v in written.items() if v.data_ptr() != state[k].data_ptr()}
    assert copied == {"context_embedder.weight", "proj_out.weight"}
    from safetensors.torch import load_file

    for k, v in load_file(str(path)).items():
        assert torch.equal(v, state[k]), k


def test_load_frees_each_replaced_layer_before_building_the_next(fp_model, tmp_path, monkeypatch):
    # every full-precision layer lived until the end beside every new one (+0.35x a bf16
    # model's size for FP8, measured by a helper, for a model built in memory)
    import gc
    import weakref

    import dcgen.quant.api as api

    model = copy.deepcopy(fp_model)
    names = quantize_(model, FP8Config(granularity="row"))
    save_quantized(model, tmp_path / "fp8.safetensors")
    fresh = tiny_flux()
    old = {n: weakref.ref(fresh.get_submodule(n)) for n in names}
    alive_when_built = []
    real = api._quantized_layer

    def spy(name, spec, lin, state, device):  # noqa: ANN001, ANN202
        if device.type != "meta":
            gc.collect()
            alive_when_built.append(sum(ref() is not None for ref in old.values()))
        return real(name, spec, lin, state, device)

    monkeypatch.setattr(api, "_quantized_layer", spy)
    load_quantized(fresh, tmp_path / "fp8.safetensors")
    # building layer i: the i layers swapped out before are gone, layer i's own is still alive
    assert alive_when_built == [len(names) - i for i in range(len(names))]
    with torch.no_grad():
        assert torch.equal(model(**flux_inputs())[0], fresh(**flux_inputs())[0])


def test_mixed_nvfp4_and_fp8_round_trip(fp_model, tmp_path):
    from dcgen.quant import NVFP4Config

    model = copy.deepcopy(fp_model)
    quantize_(model, NVFP4Config(include=(r"^single_transformer_blocks\.",)))
    quantize_(model, FP8Config(include=(r"^transformer_blocks\.",)))
    path = tmp_path / "mixed.safetensors"
    save_quantized(model, path)
    fresh = tiny_flux()
    load_quantized(fresh, path)
    assert isinstance(fresh.get_submodule("single_transformer_blocks.0.proj_out"), NVFP4Linear)
    assert isinstance(fresh.get_submodule("transformer_blocks.0.attn.to_q"), FP8Linear)
    with torch.no_grad():
        assert torch.equal(model(**flux_inputs())[0], fresh(**flux_inputs())[0])


def test_quality_report(fp_model):
    model = copy.deepcopy(fp_model)
    quantize_(model, FP8Config())
    rep = quality_report(fp_model, model, flux_inputs)
    assert set(rep["layers"]) == QUANTIZED
    # Measured: worst layer 0.038 rel / cosine 0.9993; output 0.0034 / 0.999994.
    for name, v in rep["layers"].items():
        assert 0 < v["rel_err"] < 0.06 and v["cosine"] > 0.998, (name, v)
    assert 0 < rep["output"]["rel_err"] < 0.01 and rep["output"]["cosine"] > 0.9999


def test_quality_report_through_fused_blocks(fp_model):
    """dcgen.accelerate(blocks=True) runs the MLP's first linear with its GELU fused (the FP8
    linear's epilogue; on CUDA also torch's addmm + GELU for bf16). Under the report's hooks
    both models take the plain linear, so every layer is compared pre-GELU on both sides; before
    this the FP8 side's hook saw the activated output (in-model error about 0.57 on the GELU
    linears) and, on CUDA, the bf16 side's hook never fired (14 of 17 layers reported)."""
    import dcgen

    ref, model = copy.deepcopy(fp_model), copy.deepcopy(fp_model)
    quantize_(model, FP8Config())
    dcgen.accelerate(ref, blocks=True)
    dcgen.accelerate(model, blocks=True)
    with torch.no_grad():
        rep = quality_report(ref, model, flux_inputs)
    assert set(rep["layers"]) == QUANTIZED and rep["unreached"] == []
    for name, v in rep["layers"].items():
        assert v["rel_err_in_model"] < 0.1 and v["cosine_in_model"] > 0.995, (name, v)


def test_quality_report_names_unreached_layers(fp_model):
    ref = copy.deepcopy(fp_model)
    ref.spare = nn.Linear(32, 32)  # quantized like every linear, never called by forward
    model = copy.deepcopy(ref)
    quantize_(model, FP8Config())
    assert isinstance(model.spare, FP8Linear)
    rep = quality_report(ref, model, flux_inputs)
    assert rep["unreached"] == ["spare"]
    assert set(rep["layers"]) == QUANTIZED


def test_lora_then_quantize_keeps_adapter_trainable(fp_model):
    from dcgen.train.lora import add_lora, lora_parameters

    model = copy.deepcopy(fp_model)
    add_lora(model, rank=4)
    names = quantize_(model, FP8Config())
    assert names and all(n.endswith(".base_layer") for n in names)
    assert {n.removesuffix(".base_layer") for n in names} == QUANTIZED
    params = lora_parameters(model)
    with torch.no_grad():  # make lora_B non-zero so the adapter changes the output
        for p in params:
            p.add_(0.01)
    out = model(**flux_inputs())[0]
    out.float().pow(2).mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in params)
    assert all(not isinstance(m, FP8Linear) for n, m in model.named_modules() if "lora_" in n)


def test_bad_inputs():
    with pytest.raises(ValueError, match="granularity"):
        FP8Config(granularity="block64")
    with pytest.raises(ValueError, match="invalid regex"):
        FP8Config(include=("(",))
    with pytest.raises(ValueError, match="granularity"):
        FP8Linear.from_linear(nn.Linear(32, 8), "col")
    with pytest.raises(TypeError, match="nn.Linear"):
        FP8Linear.from_linear(nn.Conv2d(3, 3, 1))
    with pytest.raises(ValueError, match="calibrate"):
        quantize_(nn.Sequential(nn.Linear(32, 16)), FP8Config(exclude=()), calibrate=lambda m: 0)
    with pytest.raises(TypeError, match="FP8Config"):
        quantize_(nn.Linear(16, 16), "fp8")
    lin = nn.Linear(32, 16)
    with torch.no_grad():
        lin.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="finite"):
        FP8Linear.from_linear(lin)
    q = FP8Linear.from_linear(nn.Linear(32, 16))
    with pytest.raises(ValueError, match="last dim 32"):
        q(torch.randn(2, 16))
    with pytest.raises(TypeError, match="float32/float16/bfloat16"):
        q(torch.randn(2, 32, dtype=torch.float64))
    with pytest.raises(ValueError, match="K >= 1"):
        quantize_fp8(torch.randn(3, 0))
    with pytest.raises(TypeError, match="dtype"):
        quantize_fp8(torch.ones(3, 4, dtype=torch.int32))
    with pytest.raises(ValueError, match=r"scales of shape \(2, 1\) \(per row\) or \(2, 2\) \(1x"):
        dequantize_fp8(torch.zeros(2, 256, dtype=torch.float8_e4m3fn), torch.ones(2, 3))
    # K <= 128: one block is the row, so the message names one shape, not the same one twice
    with pytest.raises(ValueError, match=r"scales of shape \(2, 1\) \(per row\) for q"):
        dequantize_fp8(torch.zeros(2, 64, dtype=torch.float8_e4m3fn), torch.ones(2, 3))


@pytest.mark.parametrize("route", ["tensor", "rowwise"])
def test_fp8_linear_traces_without_graph_break(route, rng, monkeypatch):
    # torch.compile(fullgraph=True) of FP8 linears: the route choice, the compile-ops choice
    # and the quantize / GEMM / epilogue calls all trace (backend "eager": no codegen on CI).
    monkeypatch.setenv("DCGEN_FP8_GEMM", route)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 48), nn.GELU(approximate="tanh"), nn.Linear(48, 32))
    quantize_(model, FP8Config(exclude=()))
    model = model.bfloat16()
    x = torch.randn(5, 64, generator=rng).bfloat16()
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    with torch.no_grad():
        torch.testing.assert_close(compiled(x).float(), model(x).float(), rtol=2e-2, atol=2e-2)


def _count_quantize(monkeypatch) -> list[int]:
    import dcgen.quant.fp8_linear as fl

    calls = [0]
    original = fl._qop.quantize_fp8

    def counting(x, granularity):
        calls[0] += 1
        return original(x, granularity)

    monkeypatch.setattr(fl._qop, "quantize_fp8", counting)
    return calls


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
def test_shared_input_quantized_once_per_scope(fp_model, mode, monkeypatch):
    # In a FLUX transformer, to_q / to_k / to_v (and the text projections, and a single
    # block's MLP input) read one tensor: quantized once, same output as quantizing each time.
    import dcgen.quant.fp8_linear as fl

    model = copy.deepcopy(fp_model)
    quantize_(model, FP8Config())
    hooked = [m for m in model.modules() if hasattr(m, fl._HOOKED)]
    assert {type(m).__name__ for m in hooked} == {"FluxAttention", "FluxSingleTransformerBlock"}
    ctx = torch.no_grad() if mode == "no_grad" else torch.inference_mode()
    calls = _count_quantize(monkeypatch)
    with ctx:
        shared = model(**flux_inputs())[0]
    shared_calls = calls[0]
    assert fl.unshare_input_quantization(model) == len(hooked)
    assert not any(hasattr(m, fl._HOOKED) for m in model.modules())
    calls[0] = 0
    with ctx:
        each = model(**flux_inputs())[0]
    per_call = calls[0]  # without sharing: one quantize per FP8 linear call
    # Saved: per double block 2 + 2 (image and text q/k/v), per single block 3 (q/k/v + MLP).
    cfg = model.config
    assert shared_calls == per_call - 4 * cfg.num_layers - 3 * cfg.num_single_layers
    assert per_call == sum(isinstance(m, FP8Linear) for m in model.modules())
    assert torch.equal(shared, each)
    assert fl._shared._value is None  # nothing kept once the scope is left


def test_shared_input_quantization_survives_deepcopy_and_torch_save(fp_model, monkeypatch):
    # A copy of a quantized model (copy.deepcopy, torch.save + torch.load) reuses quantizations
    # like the original: its hooks must reach the module-global scope, not a private copy of it.
    import io

    import dcgen.quant.fp8_linear as fl

    model = copy.deepcopy(fp_model)
    quantize_(model, FP8Config())
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    copies = {"deepcopy": copy.deepcopy(model), "torch.load": torch.load(buf, weights_only=False)}
    calls = _count_quantize(monkeypatch)
    with torch.no_grad():
        want = model(**flux_inputs())[0]
    original_calls = calls[0]
    assert original_calls < sum(isinstance(m, FP8Linear) for m in model.modules())  # reuse on
    for name, other in copies.items():
        calls[0] = 0
        with torch.no_grad():
            got = other(**flux_inputs())[0]
        assert calls[0] == original_calls, name
        assert torch.equal(got, want), name
        assert fl._shared.depth == 0, name  # every scope entered was left


def test_shared_quantization_sees_in_place_changes(monkeypatch):
    # Inside a scope, an input modified in place (version counter) is quantized again.
    import dcgen.quant.fp8_linear as fl

    torch.manual_seed(0)
    a, b = (FP8Linear.from_linear(nn.Linear(32, 8)) for _ in range(2))
    x = torch.randn(4, 32)
    calls = _count_quantize(monkeypatch)
    with torch.no_grad():
        fl._shared.enter()
        try:
            ya = a(x)
            a(x)  # same tensor, unchanged: reused
            assert calls[0] == 1
            x.mul_(2)
            yb = b(x)
            assert calls[0] == 2
        finally:
            fl._shared.leave()
    torch.testing.assert_close(yb, b.reference_forward(x))
    torch.testing.assert_close(ya, a.reference_forward(x / 2))


def test_flux_block_with_shared_quantization_compiles_fullgraph(rng):
    flux = pytest.importorskip("diffusers.models.transformers.transformer_flux")
    torch.manual_seed(0)
    block = flux.FluxSingleTransformerBlock(64, 2, 32).eval()
    quantize_(block, FP8Config())
    x, txt = torch.randn(1, 12, 64, generator=rng), torch.randn(1, 5, 64, generator=rng)
    temb = torch.randn(1, 64, generator=rng)
    assert any(hasattr(m, "_dcgen_shared_quantization") for m in block.modules())
    torch._dynamo.reset()
    compiled = torch.compile(block, fullgraph=True, backend="eager")
    with torch.no_grad():
        want = block(x, txt, temb)
        got = compiled(x, txt, temb)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_shared_quantization_state_is_per_thread():
    # Two threads serving two FP8 models shared one scope counter, one remembered quantization
    # and one offer list: one thread's cached codes were returned for the other's input (16 of
    # 3,000 outputs wrong in a two-thread race). Each thread now sees only its own state.
    import threading

    import dcgen.quant.fp8_linear as fl

    x = torch.randn(4, 32)
    codes = quantize_fp8(x, "row")
    seen: dict = {}
    entered, checked = threading.Event(), threading.Event()

    def other() -> None:
        with torch.no_grad(), fl.offered_quantization(x, codes):  # this thread's offer
            fl._shared.enter()
            fl._shared.quantize(x, "row")
            entered.set()
            checked.wait(10)
            fl._shared.leave()

    t = threading.Thread(target=other)
    t.start()
    assert entered.wait(10)
    try:
        seen = {"depth": fl._shared.depth, "value": fl._shared._value,
                "offer": fl._shared._offer_for(x, "row")}  # fmt: skip
    finally:
        checked.set()
        t.join(10)
    assert seen == {"depth": 0, "value": None, "offer": None}
