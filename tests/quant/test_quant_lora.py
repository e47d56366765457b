"""LoRA after quantize_ on a tiny FLUX: peft adapters over NVFP4Linear / FP8Linear stay full
precision, start at the quantized model, get the same gradients as on an equivalent float
model (straight-through base layers), train, and refuse to merge into a quantized weight."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from dcgen.quant import FP8Config, FP8Linear, NVFP4Config, NVFP4Linear, quantize_
from dcgen.quant.lora import QuantizedLoraLinear, add_quantized_lora, register_quantized_lora
from dcgen.train.lora import add_lora, load_lora, lora_parameters, save_lora

from .test_quantize_api import QUANTIZED, flux_inputs, rel, tiny_flux

CONFIGS = {
    "nvfp4-w4a16": NVFP4Config(mode="w4a16"),
    "nvfp4-w4a16-rank4": NVFP4Config(mode="w4a16", rank=4),
    "nvfp4-w4a4": NVFP4Config(mode="w4a4"),
    "fp8-row": FP8Config(granularity="row"),
}


def _quantized(cfg) -> nn.Module:  # noqa: ANN001
    torch.manual_seed(0)
    model = tiny_flux()
    quantize_(model, cfg)
    return model


def _float_twin(model: nn.Module) -> nn.Module:
    """A copy where every NVFP4Linear (W4A16) becomes the nn.Linear it computes:
    W = deq(R) + lora_up @ lora_down, same bias (the exact function of the quantized layer)."""
    twin = copy.deepcopy(model)
    for name, mod in list(twin.named_modules()):
        if isinstance(mod, NVFP4Linear):
            w = mod.dequantized_weight()
            if mod.rank:
                w = w + mod.lora_up.float() @ mod.lora_down.float()
            lin = nn.Linear(mod.in_features, mod.out_features, bias=mod.bias is not None)
            lin.weight.data.copy_(w)
            if mod.bias is not None:
                lin.bias.data.copy_(mod.bias.float())
            parent, _, child = name.rpartition(".")
            setattr(twin.get_submodule(parent), child, lin)
    return twin


@pytest.mark.parametrize("which", list(CONFIGS))
def test_lora_wraps_quantized_layers_and_starts_at_the_base(which):
    model = _quantized(CONFIGS[which])
    with torch.no_grad():
        base_out = model(**flux_inputs())[0]
    add_quantized_lora(model, rank=4)
    kind = FP8Linear if which.startswith("fp8") else NVFP4Linear
    wrapped = {n for n, m in model.named_modules() if isinstance(m, QuantizedLoraLinear)}
    assert wrapped == QUANTIZED
    for n in wrapped:
        assert isinstance(model.get_submodule(n).base_layer, kind)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_A" in n or "lora_B" in n for n in trainable)
    # adapters in full precision (never the base's uint8 / float8), base weights untouched
    assert all(p.dtype == torch.float32 for p in lora_parameters(model))
    with torch.no_grad():
        assert torch.equal(model(**flux_inputs())[0], base_out)  # B = 0 at init
    # the adapter state dict (what dcgen.train.lora.save_lora writes) holds only A and B, not
    # the quantized layers' own SVDQuant lora_down / lora_up buffers
    from peft.utils import get_peft_model_state_dict

    keys = set(get_peft_model_state_dict(model))
    assert keys == {f"{n}.lora_{ab}.weight" for n in QUANTIZED for ab in "AB"}


def test_lora_gradients_equal_the_float_twin():
    # LoRA gradients flow through every frozen quantized layer (straight through): they match a
    # float model computing the same function, adapters included.
    model = _quantized(NVFP4Config(mode="w4a16", rank=4))
    twin = _float_twin(model)
    add_quantized_lora(model, rank=4)
    add_quantized_lora(twin, rank=4)
    gen = torch.Generator().manual_seed(3)
    twin_params = dict(twin.named_parameters())
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.copy_(0.05 * torch.randn(p.shape, generator=gen))
                twin_params[n].copy_(p)
    for m in (model, twin):
        m(**flux_inputs())[0].square().mean().backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    grads_twin = {n: p.grad for n, p in twin.named_parameters() if p.requires_grad}
    assert grads.keys() == grads_twin.keys()
    first = "transformer_blocks.0.attn.to_q.lora_A.default.weight"
    assert float(grads[first].abs().max()) > 0  # reached the first block's adapters
    for n, g in grads.items():
        torch.testing.assert_close(g, grads_twin[n], atol=1e-5, rtol=1e-4, msg=n)


@pytest.mark.parametrize("which", ["nvfp4-w4a4", "fp8-row"])
def test_lora_training_recovers_float_output(which):
    # A few Adam steps on the adapters reduce the gap to the unquantized model's output.
    torch.manual_seed(0)
    ref_model = tiny_flux()
    with torch.no_grad():
        target = ref_model(**flux_inputs())[0]
    model = _quantized(CONFIGS[which])
    add_quantized_lora(model, rank=4)
    opt = torch.optim.Adam(lora_parameters(model), lr=3e-3)
    with torch.no_grad():
        before = rel(model(**flux_inputs())[0], target)
    for _ in range(30):
        opt.zero_grad()
        loss = (model(**flux_inputs())[0] - target).square().mean()
        loss.backward()
        opt.step()
    with torch.no_grad():
        after = rel(model(**flux_inputs())[0], target)
    # measured (seed 0): 0.0139 -> 0.0059 (w4a4), 0.0034 -> 0.0016 (fp8-row)
    assert after < 0.8 * before, (before, after)
    assert all(p.dtype == torch.float32 for p in lora_parameters(model))


def test_merge_refused_and_bad_inputs():
    model = _quantized(NVFP4Config(mode="w4a16"))
    add_quantized_lora(model, rank=2)
    layer = model.get_submodule("transformer_blocks.0.attn.to_q")
    with pytest.raises(NotImplementedError, match="re-quantize"):
        layer.merge()
    with pytest.raises(TypeError, match="LoraConfig"):
        register_quantized_lora({"r": 4})
    with pytest.raises(ValueError, match="rank >= 1"):
        add_quantized_lora(_quantized(NVFP4Config()), rank=0)
    with pytest.raises(ValueError, match="matches no linear"):
        add_quantized_lora(_quantized(NVFP4Config()), rank=2, targets=r"nothing\.here")
    with pytest.raises(TypeError, match="add_adapter"):
        add_quantized_lora(nn.Sequential(nn.Linear(16, 16)), rank=2)


def test_lora_on_quantized_model_saves_and_loads(tmp_path):
    model = _quantized(NVFP4Config(mode="w4a16"))
    add_lora(model, rank=4, alpha=8.0)
    with torch.no_grad():
        for p in lora_parameters(model):
            p.normal_(std=0.05)  # a non-zero B so the adapter changes the output
    inputs = flux_inputs()
    with torch.no_grad():
        expected = model(**inputs)[0]
    save_lora(model, tmp_path)
    fresh = _quantized(NVFP4Config(mode="w4a16"))
    with torch.no_grad():
        bare = fresh(**inputs)[0]
    load_lora(fresh, tmp_path)
    assert isinstance(fresh.get_submodule("transformer_blocks.0.attn.to_q"), QuantizedLoraLinear)
    with torch.no_grad():
        got = fresh(**inputs)[0]
    assert rel(bare, expected) > 1e-3  # the adapter matters
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("config", [FP8Config(), NVFP4Config(mode="w4a16")], ids=["fp8", "nvfp4"])
def test_a_lora_loaded_onto_a_quantized_bf16_model_is_bf16(tmp_path, config):
    # add_lora's fp32 factors stayed: peft then cast every adapted layer's input to fp32, where
    # the same file on a plain bf16 model loads in bf16
    source = tiny_flux().bfloat16()
    add_lora(source, rank=4, lora_dtype=None)
    save_lora(source, tmp_path)
    plain = tiny_flux().bfloat16()
    load_lora(plain, tmp_path)
    model = tiny_flux().bfloat16()
    quantize_(model, config)
    load_lora(model, tmp_path)
    assert {p.dtype for p in lora_parameters(plain)} == {torch.bfloat16}
    assert {p.dtype for p in lora_parameters(model)} == {torch.bfloat16}
    wide = tiny_flux().bfloat16()
    quantize_(wide, config)
    load_lora(wide, tmp_path, float32_factors=True)  # asked for: fp32, the file's values
    assert {p.dtype for p in lora_parameters(wide)} == {torch.float32}


@pytest.mark.parametrize(
    "options",
    [{"use_rslora": True}, {"alpha_pattern": {"transformer_blocks.0.attn.to_q": 32.0}},
     {"rank_pattern": {"transformer_blocks.0.attn.to_q": 8}}],
)  # fmt: skip
def test_a_lora_file_keeps_its_scaling_options_on_a_quantized_model(tmp_path, options):
    # the quantized path rebuilt the adapter from (r, alpha, targets) only: rsLoRA's
    # alpha / sqrt(r) became alpha / r, alpha_pattern was dropped, rank_pattern failed to load
    from peft import LoraConfig

    from dcgen.train.lora import DEFAULT_TARGETS

    source = tiny_flux()
    source.add_adapter(LoraConfig(r=4, lora_alpha=8.0, target_modules=DEFAULT_TARGETS, **options))
    save_lora(source, tmp_path)
    name = "transformer_blocks.0.attn.to_q"
    want = source.get_submodule(name)
    for model in (tiny_flux(), _quantized(FP8Config())):  # the float path is the reference
        load_lora(model, tmp_path)
        got = model.get_submodule(name)
        assert got.scaling == want.scaling and got.r == want.r, type(got.base_layer)


def test_lora_file_without_metadata_onto_quantized_model_is_a_clear_error(tmp_path):
    from safetensors.torch import save_file

    save_file(
        {"transformer.transformer_blocks.0.attn.to_q.lora_A.weight": torch.zeros(4, 32)},
        str(tmp_path / "pytorch_lora_weights.safetensors"),
    )
    with pytest.raises(ValueError, match="rank, alpha and targets"):
        load_lora(_quantized(NVFP4Config(mode="w4a16")), tmp_path)


def _float_with_lora(seed: int = 0) -> nn.Module:
    """A tiny float FLUX with a rank-4 LoRA whose B is non-zero (the adapter matters)."""
    torch.manual_seed(seed)
    model = tiny_flux()
    add_lora(model, rank=4)
    with torch.no_grad():
        for p in lora_parameters(model):
            p.normal_(std=0.2)
    return model


@pytest.mark.parametrize("which", ["nvfp4-w4a16", "fp8-row"])
def test_lora_added_before_quantize_keeps_working(which):
    # quantize_ swapped the base_layer inside peft's lora.Linear but left peft's class: a later
    # adapter was cast to float8 / uint8 and fuse_lora failed deep inside peft
    model = _float_with_lora()
    adapters = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
    plain = copy.deepcopy(model)
    plain.unload_lora()  # the same base without the adapter
    quantize_(model, CONFIGS[which])
    quantize_(plain, CONFIGS[which])
    kind = FP8Linear if which.startswith("fp8") else NVFP4Linear
    wrapped = {n for n, m in model.named_modules() if isinstance(m, QuantizedLoraLinear)}
    assert wrapped == QUANTIZED
    assert all(isinstance(model.get_submodule(n).base_layer, kind) for n in wrapped)
    # the adapter itself is untouched, and it still acts: with it disabled the output is the
    # quantized base's
    assert all(torch.equal(p, adapters[n]) for n, p in model.named_parameters() if "lora_" in n)
    inputs = flux_inputs()
    with torch.no_grad():
        with_lora = model(**inputs)[0]
        model.disable_adapters()
        without = model(**inputs)[0]
        model.enable_adapters()
        torch.testing.assert_close(without, plain(**inputs)[0], rtol=0, atol=0)
    assert rel(with_lora, without) > 1e-2
    # a second adapter stays fp32 (not the base's float8 / uint8); merging is refused clearly
    add_lora(model, rank=2, adapter_name="second")
    second = [p for n, p in model.named_parameters() if ".second." in n]
    assert second and all(p.dtype == torch.float32 and p.requires_grad for p in second)
    with pytest.raises(NotImplementedError, match="re-quantize"):
        model.fuse_lora()


def test_quantize_refuses_dora_under_lora_before_swapping_anything():
    from peft import LoraConfig

    from dcgen.train.lora import DEFAULT_TARGETS

    model = tiny_flux()
    model.add_adapter(LoraConfig(r=4, target_modules=DEFAULT_TARGETS, use_dora=True))
    with pytest.raises(ValueError, match="use_dora"):
        quantize_(model, NVFP4Config(mode="w4a16"))
    assert not any(isinstance(m, (NVFP4Linear, FP8Linear)) for m in model.modules())


def test_a_second_adapter_on_a_float_model():
    # lora_target_names skipped peft-wrapped layers, so a second add_lora matched nothing
    model = _float_with_lora()
    first = {n: p for n, p in model.named_parameters() if ".default." in n}
    with pytest.raises(ValueError, match="already has a LoRA adapter named 'default'"):
        add_lora(model, rank=2)
    add_lora(model, rank=2, adapter_name="style")
    layer = model.get_submodule("transformer_blocks.0.attn.to_q")
    assert set(layer.lora_A) == {"default", "style"} and layer.lora_A["style"].weight.shape[0] == 2
    # only the new adapter trains; the first one is frozen as it was
    assert not any(p.requires_grad for p in first.values())
    assert all(p.requires_grad for n, p in model.named_parameters() if ".style." in n)


def test_save_quantized_refuses_adapters_and_the_split_round_trip(tmp_path):
    from dcgen.quant import load_quantized, save_quantized

    model = _quantized(NVFP4Config(mode="w4a16"))
    add_lora(model, rank=4)
    with torch.no_grad():
        for p in lora_parameters(model):
            p.normal_(std=0.05)
        expected = model(**flux_inputs())[0]
    # the file would name peft's base_layer, which a fresh model does not have
    with pytest.raises(ValueError, match="without LoRA adapters.*save_lora"):
        save_quantized(model, tmp_path / "q.safetensors")
    assert not (tmp_path / "q.safetensors").exists()
    save_lora(model, tmp_path)
    model.unload_lora()
    save_quantized(model, tmp_path / "q.safetensors")
    fresh = tiny_flux()
    load_quantized(fresh, tmp_path / "q.safetensors")
    load_lora(fresh, tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(fresh(**flux_inputs())[0], expected, rtol=1e-5, atol=1e-5)


def test_overlapping_quantized_lora_loads_restore_diffusers():
    # Two overlapping loads (two threads) leaving in the order they came: each context put
    # back what it had found, so the second restored the first's wrapper into diffusers for
    # good. The last to leave now restores diffusers' own function.
    import diffusers.loaders.peft as loader

    from dcgen.quant.lora import quantized_lora_loading

    original = loader._create_lora_config
    first, second = quantized_lora_loading(), quantized_lora_loading()
    first.__enter__()
    second.__enter__()
    wrapped = loader._create_lora_config
    assert wrapped is not original
    first.__exit__(None, None, None)
    assert loader._create_lora_config is wrapped  # the second load is still running
    second.__exit__(None, None, None)
    assert loader._create_lora_config is original
