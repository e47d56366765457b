"""NVFP4Linear and the quantize_ / save / load / quality_report API on a tiny FLUX."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from diffusers import FluxTransformer2DModel
from torch import nn

from dcgen.quant import (
    FP8Config,
    FP8Linear,
    NVFP4Config,
    NVFP4Linear,
    load_quantized,
    quality_report,
    quantize_,
    save_quantized,
    smoothing_factors,
)

from ..adapters.tiny import tiny_flux as shared_tiny_flux

QUANTIZED = {
    "transformer_blocks.0.attn.to_q",
    "transformer_blocks.0.attn.to_k",
    "transformer_blocks.0.attn.to_v",
    "transformer_blocks.0.attn.to_out.0",
    "transformer_blocks.0.attn.add_q_proj",
    "transformer_blocks.0.attn.add_k_proj",
    "transformer_blocks.0.attn.add_v_proj",
    "transformer_blocks.0.attn.to_add_out",
    "transformer_blocks.0.ff.net.0.proj",
    "transformer_blocks.0.ff.net.2",
    "transformer_blocks.0.ff_context.net.0.proj",
    "transformer_blocks.0.ff_context.net.2",
    "single_transformer_blocks.0.proj_mlp",
    "single_transformer_blocks.0.proj_out",
    "single_transformer_blocks.0.attn.to_q",
    "single_transformer_blocks.0.attn.to_k",
    "single_transformer_blocks.0.attn.to_v",
}
KEPT = {
    "x_embedder",
    "context_embedder",
    "proj_out",
    "norm_out.linear",
    "transformer_blocks.0.norm1.linear",
    "transformer_blocks.0.norm1_context.linear",
    "single_transformer_blocks.0.norm.linear",
    "time_text_embed.timestep_embedder.linear_1",
    "time_text_embed.text_embedder.linear_2",
}


def tiny_flux() -> FluxTransformer2DModel:
    return shared_tiny_flux(in_channels=16, guidance_embeds=False)


def flux_inputs(seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    n_img, n_txt = 16, 8
    return {
        "hidden_states": torch.randn(2, n_img, 16, generator=g),
        "encoder_hidden_states": torch.randn(2, n_txt, 32, generator=g),
        "pooled_projections": torch.randn(2, 32, generator=g),
        "timestep": torch.tensor([0.5, 0.8]),
        "img_ids": torch.stack(
            [torch.zeros(n_img), torch.arange(n_img) // 4, torch.arange(n_img) % 4], dim=-1
        ),
        "txt_ids": torch.zeros(n_txt, 3),
        "return_dict": False,
    }


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().float(), b.detach().float()
    return float((a - b).norm() / b.norm())


@pytest.fixture(scope="module")
def fp_model() -> FluxTransformer2DModel:
    return tiny_flux()


@pytest.fixture(scope="module")
def fp_out(fp_model) -> torch.Tensor:
    with torch.no_grad():
        return fp_model(**flux_inputs())[0]


def test_quantize_replaces_expected_linears(fp_model):
    model = copy.deepcopy(fp_model)
    names = quantize_(model)
    assert set(names) == QUANTIZED
    for n in QUANTIZED:
        assert isinstance(model.get_submodule(n), NVFP4Linear)
    for n in KEPT:
        assert type(model.get_submodule(n)) is nn.Linear, n
    leftover = {n for n, m in model.named_modules() if type(m) is nn.Linear}
    assert not leftover & QUANTIZED


def test_a_single_block_alone_has_its_proj_out_quantized(fp_model):
    # The head is kept by identity, not by the name "proj_out": a FLUX single block quantized
    # on its own has a proj_out of its own, which the defaults mean to quantize.
    block = copy.deepcopy(fp_model.single_transformer_blocks[0])
    names = quantize_(block)
    assert "proj_out" in names
    assert isinstance(block.proj_out, NVFP4Linear)
    assert type(block.norm.linear) is nn.Linear  # AdaLN modulation stays 16-bit


def test_a_linear_registered_twice_stays_one_layer(tmp_path):
    """A tied linear (one module under two names): both names get the one quantized layer,
    and a saved checkpoint loads back into a fresh tied model with the tie kept."""

    def tied() -> nn.Module:
        torch.manual_seed(0)
        m = nn.Module()
        m.a = nn.Linear(64, 32)
        m.b = m.a
        return m

    m = tied()
    assert quantize_(m) == ["a"]
    assert m.b is m.a and isinstance(m.b, NVFP4Linear)
    save_quantized(m, tmp_path / "q.safetensors")
    fresh = tied()
    load_quantized(fresh, tmp_path / "q.safetensors")
    assert fresh.b is fresh.a and isinstance(fresh.a, NVFP4Linear)
    x = torch.randn(3, 64)
    with torch.no_grad():
        assert torch.equal(fresh.b(x), m.a(x))


@pytest.mark.parametrize("prefix", ["single_transformer_blocks.0", "single_transformer_blocks.0."])
def test_name_prefix_with_or_without_its_dot_matches_the_whole_model(fp_model, prefix):
    """A block quantized on its own under its whole-model name takes the layers the
    whole-model call takes in it: the patterns anchor on dots, so a prefix without its
    trailing dot must not glue "...0" onto "norm.linear" (which then escaped the exclude)."""
    whole = copy.deepcopy(fp_model)
    names = quantize_(whole)
    want = sorted(n.removeprefix("single_transformer_blocks.0.") for n in names
                  if n.startswith("single_transformer_blocks.0."))  # fmt: skip
    block = copy.deepcopy(fp_model.single_transformer_blocks[0])
    assert sorted(quantize_(block, name_prefix=prefix)) == want
    assert type(block.norm.linear) is nn.Linear


def test_keep_latent_layers_off_quantizes_the_head(fp_model):
    model = copy.deepcopy(fp_model)
    names = quantize_(model, NVFP4Config(keep_latent_layers=False))
    assert "proj_out" in names and isinstance(model.proj_out, NVFP4Linear)
    # x_embedder stays out through its own name pattern (an input-facing embedder).
    assert type(model.x_embedder) is nn.Linear


def test_replaced_head_is_kept_whatever_its_name(fp_model):
    from dcgen.adapters import adapter_for

    model = copy.deepcopy(fp_model)
    adapter_for(model).replace_latent_layers(32, 1, init="random")
    names = quantize_(model)
    assert "proj_out" not in names and type(model.proj_out) is nn.Linear
    assert model.proj_out.out_features == 32  # the new DC-AE head, still full precision


def test_keep_latent_layers_must_be_bool():
    with pytest.raises(TypeError, match="keep_latent_layers"):
        NVFP4Config(keep_latent_layers="yes")


# Measured on this tiny FLUX (fp32 reference, seed 0): relative L2 error of the final output
# 0.010 (w4a16), 0.014 (w4a4), 0.011 (w4a4, rank 4, smoothing 0.5); the residual stream keeps
# it far below the per-layer errors (up to ~0.12). Bounds leave ~3x headroom.
@pytest.mark.parametrize("mode, bound", [("w4a16", 0.03), ("w4a4", 0.04)])
def test_forward_error(fp_model, fp_out, mode, bound):
    model = copy.deepcopy(fp_model)
    quantize_(model, NVFP4Config(mode=mode))
    with torch.no_grad():
        out = model(**flux_inputs())[0]
    assert out.shape == fp_out.shape and torch.isfinite(out).all()
    err = rel(out, fp_out)
    assert 0 < err < bound, err


def test_linear_modes_and_bf16_input(rng):
    # Measured: 0.108 (w4a16), 0.141 (w4a4) for a default-init Linear and Gaussian input.
    torch.manual_seed(0)
    lin = nn.Linear(64, 48)
    x = torch.randn(5, 64, generator=rng)
    ref = lin(x).detach()
    for mode, bound in [("w4a16", 0.16), ("w4a4", 0.22)]:
        q = NVFP4Linear.from_linear(lin, mode)
        assert q.weight.dtype == torch.uint8 and q.weight.shape == (48, 32)
        assert q.weight_scale.dtype == torch.float8_e4m3fn and q.weight_scale.shape == (48, 4)
        assert q.weight_scale_2.shape == () and q.input_scale.shape == ()
        assert q.bias.dtype == torch.bfloat16
        assert rel(q(x), ref) < bound
        yb = q(x.bfloat16())
        assert yb.dtype == torch.bfloat16 and rel(yb, ref) < bound + 0.02


def test_model_to_dtype_keeps_format(rng):
    q = NVFP4Linear.from_linear(nn.Linear(32, 16), "w4a4", rank=2, smooth=torch.full((32,), 2.0))
    x = torch.randn(3, 32, generator=rng)
    ref = q(x).detach()
    q = q.to(torch.bfloat16)
    assert q.weight_scale.dtype == torch.float8_e4m3fn and q.weight.dtype == torch.uint8
    assert q.weight_scale_2.dtype == torch.float32 and q.smooth.dtype == torch.float32
    assert q.bias.dtype == torch.bfloat16 and q.lora_down.dtype == torch.bfloat16
    y = q(x.bfloat16())
    # bf16 input flips some E2M1 activation codes vs the fp32 run: the two quantized paths
    # differ by up to about one NVFP4 quantization error.
    assert y.dtype == torch.bfloat16 and rel(y, ref) < 0.12


def test_low_rank_branch_reduces_error(rng):
    n, k, r = 64, 128, 8
    low = torch.randn(n, r, generator=rng) @ torch.randn(r, k, generator=rng)
    w = low * 3 + 0.05 * torch.randn(n, k, generator=rng)
    w[:, 5] *= 20  # an outlier column too
    lin = nn.Linear(k, n, bias=False)
    lin.weight.data.copy_(w)
    x = torch.randn(32, k, generator=rng)
    ref = lin(x).detach()
    # Measured: 0.135 at rank 0, 0.0004 at rank 8 (the low-rank part leaves a tiny residual).
    e0 = rel(NVFP4Linear.from_linear(lin, "w4a4", rank=0)(x), ref)
    er = rel(NVFP4Linear.from_linear(lin, "w4a4", rank=r)(x), ref)
    assert er < 0.5 * e0, (e0, er)


def test_smoothing_helps_activation_outliers(rng):
    k, n = 64, 32
    torch.manual_seed(0)
    lin = nn.Linear(k, n, bias=False)
    x = torch.randn(64, k, generator=rng)
    x[:, 3] *= 50  # activation outlier channel
    ref = lin(x).detach()
    s = smoothing_factors(x.abs().amax(0), lin.weight, alpha=0.5)
    assert s.shape == (k,) and (s > 0).all()
    # Measured: 0.120 plain, 0.043 smoothed, 0.018 smoothed + rank 4.
    e_plain = rel(NVFP4Linear.from_linear(lin, "w4a4")(x), ref)
    e_smooth = rel(NVFP4Linear.from_linear(lin, "w4a4", rank=4, smooth=s)(x), ref)
    assert e_smooth < e_plain, (e_plain, e_smooth)


def test_quantize_with_smoothing_and_rank(fp_model, fp_out):
    model = copy.deepcopy(fp_model)
    cfg = NVFP4Config(mode="w4a4", rank=4, smoothing_alpha=0.5)
    with pytest.raises(ValueError, match="calibrate"):
        quantize_(copy.deepcopy(fp_model), cfg)
    names = quantize_(model, cfg, calibrate=lambda m: m(**flux_inputs(seed=7)))
    assert set(names) == QUANTIZED
    mod = model.get_submodule("single_transformer_blocks.0.proj_out")
    assert mod.rank == 4 and mod.smooth is not None
    with torch.no_grad():
        assert rel(model(**flux_inputs())[0], fp_out) < 0.04


def test_save_load_identical(fp_model, tmp_path):
    model = copy.deepcopy(fp_model)
    names = quantize_(model, NVFP4Config(mode="w4a4", rank=2))
    path = tmp_path / "q.safetensors"
    save_quantized(model, path)
    fresh = tiny_flux()
    loaded = load_quantized(fresh, path)
    assert set(loaded) == set(names)
    with torch.no_grad():
        a = model(**flux_inputs())[0]
        b = fresh(**flux_inputs())[0]
    assert torch.equal(a, b)
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        w = f.get_tensor("transformer_blocks.0.attn.to_q.weight")
        ws = f.get_tensor("transformer_blocks.0.attn.to_q.weight_scale")
    assert meta["format"] == "dcgen-nvfp4" and meta["mode"] == "w4a4" and meta["rank"] == "2"
    assert w.dtype == torch.uint8 and w.shape == (32, 16)
    assert ws.dtype == torch.float8_e4m3fn and ws.shape == (32, 2)


def test_quality_report(fp_model):
    model = copy.deepcopy(fp_model)
    quantize_(model, NVFP4Config(mode="w4a16"))
    rep = quality_report(fp_model, model, flux_inputs)
    assert set(rep) == {"layers", "output", "unreached"} and rep["unreached"] == []
    assert set(rep["layers"]) == QUANTIZED
    for name, v in rep["layers"].items():
        assert set(v) == {"rel_err", "cosine", "rel_err_in_model", "cosine_in_model"}
        assert 0 < v["rel_err"] < 0.2 and 0.98 < v["cosine"] <= 1.0 + 1e-6, (name, v)
    assert 0 < rep["output"]["rel_err"] < 0.03 and rep["output"]["cosine"] > 0.999


def test_bad_inputs(caplog):
    with pytest.raises(ValueError, match="mode"):
        NVFP4Config(mode="w4a8")
    with pytest.raises(ValueError, match="mode"):
        NVFP4Linear.from_linear(nn.Linear(32, 8), "int4")
    with pytest.raises(ValueError, match="rank"):
        NVFP4Config(rank=-1)
    with pytest.raises(ValueError, match="expected rank >= 0, got True"):
        NVFP4Config(rank=True)
    for alpha in (True, "0.5"):  # a bool was taken as 1, a string was a bare TypeError
        with pytest.raises(ValueError, match="expected smoothing_alpha in"):
            NVFP4Config(smoothing_alpha=alpha)
    smooth = torch.ones(32)
    smooth[3] = 0.0  # every later forward divided the activations by zero: NaN
    with pytest.raises(ValueError, match="expected finite, non-zero smooth factors, got 1 zero"):
        NVFP4Linear.from_linear(nn.Linear(32, 8), "w4a4", smooth=smooth)
    with pytest.raises(ValueError, match="multiple of 16"):
        NVFP4Linear.from_linear(nn.Linear(24, 8))
    model = nn.Sequential(nn.Linear(32, 24), nn.Linear(24, 16))
    with caplog.at_level(logging.WARNING, logger="dcgen.quant.api"):
        names = quantize_(model, NVFP4Config(exclude=()))
    assert names == ["0"] and type(model[1]) is nn.Linear
    assert "skipping 1: in_features 24" in caplog.text
    with pytest.raises(ValueError, match="last dim 32"):
        model[0](torch.randn(2, 16))
    with pytest.raises(ValueError, match="NVFP4Linear layers, found none"):
        save_quantized(nn.Linear(16, 16), "/nonexistent.safetensors")
    # an integer input came back as truncated integers, a list as a bare AttributeError
    with pytest.raises(TypeError, match="expected a floating-point .* got torch.int64"):
        model[0](torch.ones(2, 32, dtype=torch.int64))
    with pytest.raises(ValueError, match="last dim 32, got list"):
        model[0]([1.0] * 32)
    # float64 past fp32's range passed the finite check and became an Inf row scale
    from dcgen.quant.fp8 import quantize_fp8_weight

    w = torch.ones(2, 16, dtype=torch.float64)
    w[0, 0] = 1e39
    with pytest.raises(ValueError, match="in fp32, the recipe's precision"):
        quantize_fp8_weight(w)


class _PipelineLike:
    def __init__(self) -> None:
        self.transformer = tiny_flux()


@pytest.mark.parametrize(
    "call",
    [
        lambda model, path: quantize_(model, FP8Config()),
        lambda model, path: quantize_(model, NVFP4Config()),
        lambda model, path: save_quantized(model, path),
        lambda model, path: load_quantized(model, path),
    ],
    ids=["quantize_fp8", "quantize_nvfp4", "save_quantized", "load_quantized"],
)
def test_a_non_module_is_refused_like_accelerate(call, tmp_path):
    # None or a pipeline gave a bare AttributeError ("'NoneType' object has no attribute
    # 'named_modules'"); accelerate names what it expected and hints at pipe.transformer
    path = tmp_path / "q.safetensors"
    quantized = tiny_flux()
    quantize_(quantized, FP8Config())
    save_quantized(quantized, path)
    before = path.read_bytes()
    with pytest.raises(TypeError, match=r"expected a torch.nn.Module .*got NoneType$"):
        call(None, path)
    pipe = _PipelineLike()
    with pytest.raises(TypeError, match=r"got _PipelineLike \(a pipeline: pass pipe.transformer\)"):
        call(pipe, path)
    assert not any(isinstance(m, NVFP4Linear | FP8Linear) for m in pipe.transformer.modules())
    assert path.read_bytes() == before  # a refused save leaves the file alone


def test_activation_amax_and_calibrate_types_are_checked(fp_model):
    # A list as activation_amax was taken and every layer quantized without smoothing (a logged
    # warning each); calibrate="x" failed as "'str' object is not callable".
    config = NVFP4Config("w4a4", smoothing_alpha=0.5)
    cases = [
        (dict(activation_amax=[1, 2]), "activation_amax: expected a Mapping.*got list"),
        (dict(activation_amax={1: torch.ones(32)}), "activation_amax: expected str keys.*got int"),
        (
            dict(activation_amax={"transformer_blocks.0.attn.to_q": 1.0}),
            r"activation_amax\['transformer_blocks.0.attn.to_q'\]: expected a tensor.*got float",
        ),
        (dict(calibrate="x"), "calibrate: expected a callable.*got str 'x'"),
    ]
    for kwargs, match in cases:
        model = copy.deepcopy(fp_model)
        with pytest.raises(TypeError, match=match):
            quantize_(model, config, **kwargs)
        assert not any(isinstance(m, NVFP4Linear) for m in model.modules())  # left alone
    # the corrected call smooths: its layers carry smooth factors
    model = copy.deepcopy(fp_model)
    amax = {n: torch.ones(model.get_submodule(n).in_features) for n in QUANTIZED}
    quantize_(model, config, activation_amax=amax)
    assert all(model.get_submodule(n).smooth is not None for n in QUANTIZED)


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_a_file_that_does_not_fit_leaves_the_model_untouched(fp_model, tmp_path):
    # load_quantized swapped every layer, then load_state_dict found the mismatch: the model
    # was left half converted (17 NVFP4Linear layers with zero weights) after torch's error
    model = copy.deepcopy(fp_model)
    quantize_(model, NVFP4Config(mode="w4a4", rank=2))
    path = tmp_path / "q.safetensors"
    save_quantized(model, path)

    other_channels = shared_tiny_flux(in_channels=8, guidance_embeds=False)  # a kept layer
    other_width = tiny_flux()  # a quantized layer of another shape
    other_width.transformer_blocks[0].attn.to_q = nn.Linear(32, 48)
    two_blocks = shared_tiny_flux(in_channels=16, guidance_embeds=False, layers=2)  # more keys
    cases = [
        (
            other_channels,
            r"x_embedder.weight: the model expects \(32, 8\), the file has \(32, 16\)",
        ),
        (other_width, r"to_q.bias: the model expects \(48,\), the file has \(32,\)"),
        (two_blocks, r"missing \['transformer_blocks.1"),
    ]
    for target, match in cases:
        before = _state(target)
        types = [type(m) for m in target.modules()]
        with pytest.raises(ValueError, match=match):
            load_quantized(target, path)
        assert [type(m) for m in target.modules()] == types
        after = target.state_dict()
        assert after.keys() == before.keys()
        assert all(torch.equal(after[k], v) for k, v in before.items())
    fresh = tiny_flux()  # a fitting model still loads
    assert set(load_quantized(fresh, path)) == QUANTIZED


def test_a_file_whose_module_table_is_broken_is_named(fp_model, tmp_path):
    # A file without its module table, or a module missing a field, was a bare KeyError
    # ('modules', 'rank') naming neither the file nor the module.
    import json

    from safetensors import safe_open
    from safetensors.torch import save_file

    model = copy.deepcopy(fp_model)
    quantize_(model, NVFP4Config(mode="w4a4", rank=2))
    path = tmp_path / "q.safetensors"
    save_quantized(model, path)
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    table = json.loads(meta["modules"])
    name = "transformer_blocks.0.attn.to_q"
    no_rank = {**table, name: {k: v for k, v in table[name].items() if k != "rank"}}
    cases = [
        ({k: v for k, v in meta.items() if k != "modules"}, r"no 'modules' table"),
        ({**meta, "modules": "[1, 2]"}, r"'modules' table: expected a JSON object"),
        ({**meta, "modules": "{not json"}, r"'modules' table: expected a JSON object"),
        ({**meta, "modules": json.dumps(no_rank)}, rf"module {name}: missing \['rank'\]"),
    ]
    for broken, match in cases:
        save_file(tensors, str(tmp_path / "broken.safetensors"), metadata=broken)
        with pytest.raises(ValueError, match=match) as err:
            load_quantized(tiny_flux(), tmp_path / "broken.safetensors")
        assert "broken.safetensors" in str(err.value)


def test_one_inf_token_stays_in_its_row_under_w4a4():
    # the dynamic global scale became Inf, every finite block's scale 0, and its dequantized
    # 0 * 0 * Inf NaN: one overflowing token made the whole batch (both CFG halves) NaN
    torch.manual_seed(0)
    lin = nn.Linear(32, 4)
    x = torch.randn(3, 32)
    x[0, 0] = float("inf")
    for mode in ("w4a4", "w4a16"):
        y = NVFP4Linear.from_linear(lin, mode)(x)
        assert torch.isfinite(y[1:]).all(), mode
        assert rel(y[1:], lin(x)[1:].detach()) < 0.2, mode


def test_calibration_sees_one_dimensional_and_keyword_inputs():
    # the calibration hook flattened (0, -2) and read args[0]: a 1-D input was an IndexError,
    # a linear called as layer(input=x) a bare "tuple index out of range"
    class Calls(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(32, 16), nn.Linear(16, 16)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.b(input=self.a(x))

    torch.manual_seed(0)
    model, x = Calls(), torch.randn(32)
    reference = copy.deepcopy(model)
    names = quantize_(model, NVFP4Config(smoothing_alpha=0.5, exclude=()), calibrate=lambda m: m(x))
    assert names == ["a", "b"] and all(model.get_submodule(n).smooth is not None for n in names)
    rep = quality_report(reference, model, lambda: x)
    assert set(rep["layers"]) == {"a", "b"} and rep["output"]["rel_err"] < 0.2
    # both quantized layers take nn.Linear's keyword, as the model above calls b
    fp8 = copy.deepcopy(reference)
    quantize_(fp8, FP8Config(exclude=()))
    torch.testing.assert_close(fp8(x), fp8.b(fp8.a(x)), rtol=0, atol=0)


def test_host_side_values_follow_buffer_changes(rng):
    """NVFP4Linear caches the swizzled weight scales and whether a static input scale is set
    (a host read = a device sync per call otherwise); in-place writes, loads and device moves
    must invalidate them."""
    from dcgen.quant.nvfp4 import swizzle_scales

    lin = nn.Linear(64, 32)
    q = NVFP4Linear.from_linear(lin, "w4a4")
    first = q._swizzled_weight_scales()
    assert q._swizzled_weight_scales() is first  # cached
    assert torch.equal(first.view(torch.uint8), swizzle_scales(q.weight_scale).view(torch.uint8))
    q.weight_scale.copy_(q.weight_scale.flip(0))  # an in-place write (as load_state_dict does)
    again = q._swizzled_weight_scales()
    assert again is not first
    assert torch.equal(again.view(torch.uint8), swizzle_scales(q.weight_scale).view(torch.uint8))

    x = torch.randn(5, 64, generator=rng)
    with torch.no_grad():
        dynamic = q(x)
        # a static scale 3x the dynamic one (a power of two would shift every block scale
        # exactly and give the same values)
        q.input_scale.fill_(float(x.abs().max()) / 448 / 6 * 3)
        static = q(x)
        q.input_scale.zero_()
        back = q(x)
    assert not torch.equal(static, dynamic)  # the static scale took effect...
    assert torch.equal(back, dynamic)  # ...and zeroing it went back to dynamic scales
    # a write through .data moves no version counter: clear_cache() is the documented way
    q.input_scale.data.fill_(float(x.abs().max()) / 448 / 6 * 3)
    with torch.no_grad():
        assert torch.equal(q(x), dynamic)  # the cached choice, as documented...
        q.clear_cache()
        assert torch.equal(q(x), static)  # ...until the cache is cleared


def test_a_new_buffer_at_a_freed_ones_address_is_not_taken_for_it():
    """The cache compared (data pointer, device, version): a buffer assigned in place of
    another (load_state_dict(assign=True)) that the allocator put at the freed one's address,
    with the same version count, got the old buffer's derived values. Stood in for by a
    tensor aliasing the first one's memory (same address, its own version counter at 0)."""
    q = NVFP4Linear.from_linear(nn.Linear(64, 32), "w4a16")
    a = torch.zeros(4)
    assert q._memo("k", a, lambda: "from a") == "from a"
    assert q._memo("k", a, lambda: "again") == "from a"  # the same tensor: cached
    b = torch.from_numpy(a.numpy())
    assert (b.data_ptr(), b._version) == (a.data_ptr(), a._version)
    assert q._memo("k", b, lambda: "from b") == "from b"
    q.to(torch.float64)  # a move or cast: nothing derived from the old buffers is kept
    assert "_memo_cache" not in q.__dict__


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("mode", ["w4a4", "w4a16"])
def test_native_gemm_paths_stay_in_bf16(mode, bias, rng, monkeypatch):
    # Where the native NVFP4 GEMM runs (Blackwell W4A4; Hopper opt-in W4A4 / W4A16), a bf16
    # layer without low-rank branch or smoothing returns the GEMM's bf16 result with the bias
    # added in bf16: no fp32 round trip of the output. Stood in on the CPU by the GEMMs'
    # references, which round once to bf16 like the kernels; checked against the fp32 form.
    import dcgen.ops.nvfp4_gemm as g
    import dcgen.quant.linear as ql

    calls = []

    def ref(name, fn):  # noqa: ANN001, ANN202
        return lambda *a: calls.append(name) or fn(*a)

    monkeypatch.setattr(ql._gemm, "kernel_available", lambda device, n, k: True)
    monkeypatch.setattr(ql._gemm, "w4a16_kernel_available", lambda device, k: True)
    monkeypatch.setattr(ql._gemm, "nvfp4_gemm", ref("w4a4", g.nvfp4_gemm_reference))
    monkeypatch.setattr(ql._gemm, "nvfp4_gemm_w4a16", ref("w4a16", g.nvfp4_gemm_w4a16_reference))
    widened = []
    real_float = torch.Tensor.float
    torch.manual_seed(0)
    lin = nn.Linear(64, 48, bias=bias)
    q = NVFP4Linear.from_linear(lin, mode)
    x = (torch.randn(2, 5, 64, generator=rng) * 2).bfloat16()
    with torch.no_grad():
        want = q(x.float())  # fp32 input: the general form, rounded once
        calls.clear()
        monkeypatch.setattr(
            torch.Tensor, "float", lambda t: widened.append(t.shape) or real_float(t)
        )
        got = q(x)
    monkeypatch.undo()
    assert calls == [mode] and got.dtype == torch.bfloat16 and got.shape == (2, 5, 48)
    # the [..., N] output was never widened to fp32
    assert not [s for s in widened if len(s) and s[-1] == 48]
    # the GEMM's rounding and the bias add's: within two bf16 steps of the fp32 form
    torch.testing.assert_close(got.float(), want, rtol=2**-7, atol=2**-7 * want.abs().max())
    # a low-rank branch keeps the general form (branch and bias in fp32, one rounding)
    q2 = NVFP4Linear.from_linear(lin, mode, rank=2)
    with torch.no_grad():
        monkeypatch.setattr(ql._gemm, "kernel_available", lambda device, n, k: True)
        monkeypatch.setattr(ql._gemm, "w4a16_kernel_available", lambda device, k: True)
        monkeypatch.setattr(ql._gemm, "nvfp4_gemm", g.nvfp4_gemm_reference)
        monkeypatch.setattr(ql._gemm, "nvfp4_gemm_w4a16", g.nvfp4_gemm_w4a16_reference)
        y2 = q2(x)
    assert y2.dtype == torch.bfloat16
    torch.testing.assert_close(y2.float(), q2(x.float()), rtol=2**-7, atol=1e-2)


@pytest.mark.parametrize(
    "config", [NVFP4Config(keep_latent_layers=False), FP8Config(keep_latent_layers=False)]
)
def test_sana_predicts_with_a_quantized_head(config):
    # SanaAdapter took its compute dtype from proj_out.weight: uint8 / float8 once quantized
    from dcgen.adapters import adapter_for

    from ..adapters.tiny import tiny_sana

    model = tiny_sana()
    adapter = adapter_for(model)
    g = torch.Generator().manual_seed(0)
    latents, embeds = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 5, 32, generator=g)
    with torch.no_grad():
        want = adapter.predict(latents, torch.tensor([0.5]), embeds)
        assert "proj_out" in quantize_(model, config)
        got = adapter.predict(latents, torch.tensor([0.5]), embeds)
    assert got.dtype == torch.float32 and torch.isfinite(got).all()
    assert rel(got, want) < 0.3  # the head's quantization error only


@pytest.mark.parametrize("config_cls", [NVFP4Config, FP8Config])
def test_a_bare_string_pattern_is_refused(config_cls):
    # a string is iterable: each character used to become its own pattern ("to_q" -> t, o, _, q)
    with pytest.raises(
        TypeError, match=r"expected include as a tuple of regex strings, got the string 'to_q'"
    ):
        config_cls(include="to_q")
    with pytest.raises(
        TypeError, match=r"expected exclude as a tuple .* got the string 'proj_out'"
    ):
        config_cls(exclude="proj_out")


def test_a_failing_inputs_fn_leaves_no_hooks_behind():
    # quality_report hooked every quantized layer of both models, then called inputs_fn()
    # outside the try that removes the hooks: one failure left them on for good (holding the
    # next call's activations, and turning off the paths that skip hooked modules)
    fp = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64)).to(torch.bfloat16)
    q = copy.deepcopy(fp)
    quantize_(q)

    def hooks(m: nn.Module) -> int:
        return sum(len(x._forward_hooks) + len(x._forward_pre_hooks) for x in m.modules())

    before = hooks(fp), hooks(q)

    def failing() -> None:
        raise RuntimeError("no calibration prompts")

    with pytest.raises(RuntimeError, match="no calibration prompts"):
        quality_report(fp, q, failing)
    assert (hooks(fp), hooks(q)) == before
