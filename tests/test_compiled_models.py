"""dcgen's public API on a ``torch.compile(transformer)`` wrapper, the way diffusers documents
compiling a pipeline's transformer: the wrapper's module names carry an ``_orig_mod.`` prefix,
which made the anchored quantization exclusions miss (x_embedder quantized), wrote prefixed keys
a plain model could not load, and refused LoRA's fully trained modules."""

from __future__ import annotations

import torch
from safetensors import safe_open
from torch import nn

from dcgen.quant import (
    FP8Config,
    load_quantized,
    quality_report,
    quantize_,
    quantized_modules,
    save_quantized,
)
from dcgen.train.lora import add_lora, fuse_lora, lora_target_names, save_lora

from .adapters.tiny import text, tiny_flux


def _compiled(model: nn.Module) -> nn.Module:
    wrapper = torch.compile(model, backend="eager")
    assert type(wrapper) is not type(model)  # the OptimizedModule these tests are about
    return wrapper


def _inputs(model: nn.Module) -> dict[str, torch.Tensor]:
    embeds, pooled = text(1)
    return {
        "hidden_states": torch.randn(1, 4, model.config.in_channels),
        "encoder_hidden_states": embeds,
        "pooled_projections": pooled,
        "timestep": torch.tensor([0.5]),
        "img_ids": torch.zeros(4, 3),
        "txt_ids": torch.zeros(embeds.shape[1], 3),
        "guidance": torch.tensor([3.5]),
    }


def test_quantizing_a_compiled_model_names_its_layers_as_the_plain_model(tmp_path):
    plain, model = tiny_flux(), tiny_flux()
    wrapper = _compiled(model)
    expected = quantize_(plain, FP8Config())
    assert quantize_(wrapper, FP8Config()) == expected
    assert type(model.x_embedder) is nn.Linear  # the default exclusions still apply
    assert type(model.context_embedder) is nn.Linear
    assert sorted(quantized_modules(wrapper)) == sorted(expected)

    save_quantized(wrapper, tmp_path / "q.safetensors")
    with safe_open(str(tmp_path / "q.safetensors"), "pt") as f:
        assert not [k for k in f.keys() if k.startswith("_orig_mod")]
    fresh = tiny_flux()
    assert sorted(load_quantized(fresh, tmp_path / "q.safetensors")) == sorted(expected)
    fresh_wrapper = _compiled(tiny_flux())
    assert sorted(load_quantized(fresh_wrapper, tmp_path / "q.safetensors")) == sorted(expected)
    loaded, saved = fresh_wrapper._orig_mod.state_dict(), plain.state_dict()
    assert sorted(loaded) == sorted(saved)
    for k in saved:
        torch.testing.assert_close(loaded[k], saved[k], rtol=0, atol=0)

    report = quality_report(_compiled(tiny_flux()), wrapper, lambda: _inputs(model))
    plain_report = quality_report(tiny_flux(), plain, lambda: _inputs(model))
    assert sorted(report["layers"]) == sorted(plain_report["layers"])


def test_lora_on_a_compiled_model_trains_and_saves_the_plain_names(tmp_path):
    plain, model = tiny_flux(), tiny_flux()
    wrapper = _compiled(model)
    assert lora_target_names(wrapper) == lora_target_names(plain)
    trained = ("x_embedder", "proj_out")  # names of the wrapped model, as for a plain one
    assert add_lora(wrapper, 4, train_modules=trained) is wrapper
    add_lora(plain, 4, train_modules=trained)
    assert model.x_embedder.weight.requires_grad and model.proj_out.weight.requires_grad
    save_lora(wrapper, tmp_path / "wrapped")
    save_lora(plain, tmp_path / "plain")
    keys = {}
    for name in ("wrapped", "plain"):
        with safe_open(str(tmp_path / name / "pytorch_lora_weights.safetensors"), "pt") as f:
            keys[name] = sorted(f.keys())
    assert keys["wrapped"] == keys["plain"] and keys["plain"]
    assert fuse_lora(wrapper) is wrapper
    assert not [n for n, _ in model.named_modules() if "lora_" in n]


def test_fused_flux_blocks_with_fp8_linears_compile_into_one_graph():
    # accelerate(blocks=True) on an FP8 model stands in for the attention's input-sharing hooks
    # by reading their handles, which broke the graph at every FluxAttention under compile.
    from torch._dynamo.testing import CompileCounter

    import dcgen

    model = tiny_flux().eval()
    quantize_(model, FP8Config())
    dcgen.accelerate(model, blocks=True)
    counter = CompileCounter()
    compiled = torch.compile(model, backend=counter, fullgraph=True)
    inputs = _inputs(model)
    with torch.no_grad():
        out = compiled(**inputs).sample
        ref = model(**inputs).sample
    assert counter.frame_count == 1
    torch.testing.assert_close(out, ref)
