"""LoRAs made for the base model on DC-Gen pipelines: diffusers' load_lora_weights applies the
block layers' deltas exactly and skips the latent-facing layers DC-Gen replaced (FLUX and SANA);
the base pipeline takes them whole; `generate` / `quantize --lora` fuse them, and on a quantized
transformer they stay unmerged beside the 4- / 8-bit weights."""

from __future__ import annotations

import logging
import warnings

import numpy as np
import pytest
import torch
from diffusers import FluxPipeline, SanaPipeline
from PIL import Image

from dcgen.adapters import adapter_for
from dcgen.cli import main
from dcgen.pipelines import BaseFluxPipeline, DCGenFluxPipeline, DCGenSanaPipeline
from dcgen.pipelines.lora import drop_latent_layer_keys, load_lora_on_quantized
from dcgen.quant import FP8Config, NVFP4Config, quantize_

from ..adapters.tiny import text, tiny_dcae, tiny_flux, tiny_sana
from .tiny_text import save_flux_pipeline

peft = pytest.importorskip("peft")

FLUX_TARGETS = ["to_q", "to_k", "to_v", "x_embedder", "proj_out"]  # proj_out: head and blocks
SANA_TARGETS = ["to_q", "to_k", "to_v", "proj", "proj_out"]  # proj: patch_embed.proj (a conv)


def _base_lora(model: torch.nn.Module, targets: list[str], folder, saver) -> dict:  # noqa: ANN001
    """A random rank-4 LoRA (alpha 8: scale 2) trained, as it were, on the base model; saved
    where diffusers' save_lora_weights puts it. Returns its transformer state dict."""
    from peft.utils import get_peft_model_state_dict

    torch.manual_seed(5)
    config = peft.LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, target_modules=targets)
    model.add_adapter(config)
    state = get_peft_model_state_dict(model)
    saver.save_lora_weights(folder, transformer_lora_layers=state,
                            transformer_lora_adapter_metadata=config.to_dict())  # fmt: skip
    return state


def _delta(state: dict, module: str) -> torch.Tensor:
    return 2.0 * state[f"{module}.lora_B.weight"] @ state[f"{module}.lora_A.weight"]


def _latents(pipe, **extra) -> torch.Tensor:  # noqa: ANN001
    e, p = text(1)
    kw = dict(prompt_embeds=e, height=64, width=64, num_inference_steps=2, output_type="latent",
              generator=torch.Generator().manual_seed(0), **extra)  # fmt: skip
    if isinstance(pipe, DCGenSanaPipeline):
        kw["true_cfg_scale"] = 1.0
    else:
        kw["pooled_prompt_embeds"] = p
    with torch.no_grad():
        return pipe(**kw).images


def _dcgen(cls, model: torch.nn.Module):  # noqa: ANN001, ANN202
    """A DC-Gen pipeline of ``cls`` on the tiny DC-AE, and a copy of its weights."""
    ae = tiny_dcae()
    adapter_for(model).replace_latent_layers(ae.latent_channels)
    pipe = cls(model, ae)
    pipe.set_progress_bar_config(disable=True)
    return pipe, {n: p.detach().clone() for n, p in model.named_parameters()}


def _load_logged(pipe, folder, caplog) -> str:  # noqa: ANN001
    """load_lora_weights(folder); the warnings it logged."""
    with (
        caplog.at_level(logging.WARNING, logger="dcgen.pipelines.lora"),
        warnings.catch_warnings(record=True) as seen,
    ):
        warnings.simplefilter("always")
        pipe.load_lora_weights(folder, weight_name="pytorch_lora_weights.safetensors")
    # dcgen's one line says what was skipped; PEFT added an "inconsistency" RuntimeWarning (the
    # file's target modules matched the skipped layers), and excluding them instead made it
    # warn that nothing was excluded: no PEFT warning at all
    from_peft = [str(w.message) for w in seen if "peft" in w.filename]
    assert not from_peft, from_peft
    return caplog.text


def test_flux_lora_on_dcgen_skips_the_latent_layers(tmp_path, caplog):
    state = _base_lora(tiny_flux(), FLUX_TARGETS, tmp_path, FluxPipeline)
    pipe, before = _dcgen(DCGenFluxPipeline, tiny_flux())
    model, plain = pipe.transformer, _latents(pipe)
    assert "transformer.proj_out, transformer.x_embedder skipped" in _load_logged(
        pipe, tmp_path, caplog
    )
    # the new latent layers keep their shape (diffusers would widen x_embedder to 64 inputs)
    assert type(model.x_embedder) is torch.nn.Linear and model.x_embedder.in_features == 2
    assert type(model.proj_out) is torch.nn.Linear
    with_lora = _latents(pipe)
    assert (with_lora - plain).abs().max() > 1e-3
    pipe.fuse_lora()
    pipe.unload_lora_weights()
    torch.testing.assert_close(_latents(pipe), with_lora, rtol=0, atol=1e-5)
    weights = dict(model.named_parameters())
    for name in ("transformer_blocks.0.attn.to_q", "single_transformer_blocks.0.proj_out"):
        want = before[f"{name}.weight"] + _delta(state, name)
        torch.testing.assert_close(weights[f"{name}.weight"], want, rtol=0, atol=1e-6)
    for name in (
        "x_embedder.weight",
        "proj_out.weight",
        "transformer_blocks.0.attn.to_out.0.weight",
    ):
        assert torch.equal(weights[name], before[name]), name  # skipped, or not a target


def test_flux_lora_on_the_base_pipeline_loads_whole(tmp_path):
    state = _base_lora(tiny_flux(in_channels=64), FLUX_TARGETS, tmp_path, FluxPipeline)
    model = tiny_flux(in_channels=64)
    x_before = model.x_embedder.weight.detach().clone()
    pipe = BaseFluxPipeline(model, vae=None)
    pipe.load_lora_weights(tmp_path, weight_name="pytorch_lora_weights.safetensors")
    pipe.fuse_lora()
    pipe.unload_lora_weights()
    want = x_before + _delta(state, "x_embedder")
    torch.testing.assert_close(model.x_embedder.weight, want, rtol=0, atol=1e-6)


def test_sana_lora_on_dcgen_skips_the_latent_layers(tmp_path, caplog):
    state = _base_lora(tiny_sana(), SANA_TARGETS, tmp_path, SanaPipeline)
    assert "patch_embed.proj.lora_A.weight" in state  # the LoRA does train the embedder
    pipe, before = _dcgen(DCGenSanaPipeline, tiny_sana())
    model, plain = pipe.transformer, _latents(pipe)
    assert "transformer.patch_embed.proj, transformer.proj_out skipped" in _load_logged(
        pipe, tmp_path, caplog
    )
    assert (_latents(pipe) - plain).abs().max() > 1e-3
    pipe.fuse_lora()
    pipe.unload_lora_weights()
    weights = dict(model.named_parameters())
    name = "transformer_blocks.0.attn1.to_q"
    want = before[f"{name}.weight"] + _delta(state, name)
    torch.testing.assert_close(weights[f"{name}.weight"], want, rtol=0, atol=1e-6)
    for name in ("patch_embed.proj.weight", "proj_out.weight"):
        assert torch.equal(weights[name], before[name]), name


def test_drop_latent_layer_keys_keeps_other_entries_and_alphas():
    t = torch.zeros(1)
    state = {"transformer.x_embedder.lora_A.weight": t, "transformer.proj_out.lora_B.weight": t,
             "transformer.single_transformer_blocks.0.proj_out.lora_A.weight": t,
             "x_embedder.lora_A.weight": t}  # fmt: skip
    alphas = {"transformer.x_embedder.alpha": 4.0, "transformer.blocks.0.alpha": 4.0}
    kept, kept_alphas, meta = drop_latent_layer_keys(
        (state, alphas, {"r": 4}), ("x_embedder", "proj_out")
    )
    assert list(kept) == ["transformer.single_transformer_blocks.0.proj_out.lora_A.weight"]
    assert kept_alphas == {"transformer.blocks.0.alpha": 4.0} and meta == {"r": 4}
    plain = {"transformer.blocks.0.lora_A.weight": t}
    assert drop_latent_layer_keys(plain, ("x_embedder",)) is plain
    only_latent = {"transformer.x_embedder.lora_A.weight": t}
    with pytest.raises(ValueError, match="holds entries for transformer.x_embedder only"):
        drop_latent_layer_keys(only_latent, ("x_embedder", "proj_out"))


@pytest.fixture(scope="module")
def lora_folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora_cli")
    pipe = save_flux_pipeline(root / "pipe", with_text=False)
    _base_lora(tiny_flux(), FLUX_TARGETS, root / "lora", FluxPipeline)
    e, p = text(1)
    from safetensors.torch import save_file

    save_file({"prompt_embeds": e[0].contiguous(), "pooled_prompt_embeds": p[0].contiguous()},
              str(root / "embeds.safetensors"))  # fmt: skip
    return root, pipe


def _generate(root, pipe, out, *extra) -> np.ndarray:  # noqa: ANN001
    embeds = str(root / "embeds.safetensors")
    argv = ["generate", "--pipeline", str(pipe), "--prompt-embeds", embeds, "--height", "64",
            "--width", "64", "--steps", "2", "--no-progress", "--device", "cpu", "--out",
            str(out), *extra]  # fmt: skip
    assert main(argv) == 0
    return np.asarray(Image.open(out), dtype=np.int16)


def test_generate_fuses_loras(lora_folders, tmp_path, capsys):
    root, pipe = lora_folders
    plain = _generate(root, pipe, tmp_path / "plain.png")
    folder = str(root / "lora")
    file = str(root / "lora" / "pytorch_lora_weights.safetensors")
    styled = _generate(root, pipe, tmp_path / "lora.png", "--lora", folder)
    assert "fused 1 LoRA(s)" in capsys.readouterr().out
    assert np.abs(styled - plain).max() > 0
    # a file path, and the same LoRA stacked at half strength twice: the same deltas
    halves = _generate(root, pipe, tmp_path / "halves.png", "--lora", file, "--lora", folder,
                       "--lora-scale", "0.5")  # fmt: skip
    assert np.abs(halves - styled).max() <= 1
    off = _generate(root, pipe, tmp_path / "off.png", "--lora", folder, "--lora-scale", "0")
    assert np.abs(off - plain).max() <= 1


def test_lora_option_errors(lora_folders, tmp_path, capsys):
    root, pipe = lora_folders
    base = ["generate", "--pipeline", str(pipe), "--prompt-embeds",
            str(root / "embeds.safetensors"), "--out", str(tmp_path / "x.png")]  # fmt: skip
    cases = [
        (["--lora", str(tmp_path / "none")], "no such file or folder"),
        (["--lora-scale", "0.5"], "--lora-scale goes with --lora PATH"),
        (
            ["--lora", str(root / "lora")] * 2
            + ["--lora-scale", "1", "--lora-scale", "1", "--lora-scale", "1"],
            "one value or one per --lora (2), got 3",
        ),  # fmt: skip
    ]
    for extra, message in cases:
        assert main(base + extra) == 2, extra
        assert message in capsys.readouterr().err, extra


def test_quantize_fuses_the_lora_first(lora_folders, tmp_path):
    from safetensors.torch import load_file

    root, pipe = lora_folders
    argv = ["quantize", "--pipeline", str(pipe), "--format", "fp8-row", "--no-report",
            "--device", "cpu", "--no-progress"]  # fmt: skip
    outs = {}
    for name, extra in (("plain", []), ("lora", ["--lora", str(root / "lora")]),
                        ("off", ["--lora", str(root / "lora"), "--lora-scale", "0"])):  # fmt: skip
        outs[name] = tmp_path / f"{name}.safetensors"
        assert main([*argv, *extra, "--out", str(outs[name])]) == 0, name
    plain, lora, off = (load_file(str(outs[n])) for n in ("plain", "lora", "off"))
    key = next(k for k in plain if "transformer_blocks.0.attn.to_q" in k and "weight" in k)
    assert not torch.equal(plain[key], lora[key])  # the checkpoint holds the styled weights
    assert all(torch.equal(plain[k], off[k]) for k in plain)


QUANT_CONFIGS = [NVFP4Config(mode="w4a16"), NVFP4Config(mode="w4a4"), FP8Config()]
QUANT_IDS = ["nvfp4-w4a16", "nvfp4-w4a4", "fp8"]


@pytest.mark.parametrize("config", QUANT_CONFIGS, ids=QUANT_IDS)
def test_lora_on_a_quantized_transformer_stays_unmerged(tmp_path, config):
    state = _base_lora(tiny_flux(), FLUX_TARGETS, tmp_path, FluxPipeline)
    ae, model = tiny_dcae(), tiny_flux()
    adapter_for(model).replace_latent_layers(ae.latent_channels)
    quantize_(model, config)
    pipe = DCGenFluxPipeline(model, ae)
    load_lora_on_quantized(pipe, str(tmp_path), "style", "pytorch_lora_weights.safetensors")
    torch.manual_seed(0)
    for name in ("transformer_blocks.0.attn.to_q", "single_transformer_blocks.0.proj_out"):
        layer = model.get_submodule(name)
        assert type(layer.get_base_layer()).__name__ in ("NVFP4Linear", "FP8Linear")
        x = torch.randn(3, layer.in_features)
        with torch.no_grad():
            base = layer.get_base_layer()(x)
            delta = x @ state[f"{name}.lora_A.weight"].T @ state[f"{name}.lora_B.weight"].T
            # measured: equal to the last bit on this CPU (the same ops in the same order)
            torch.testing.assert_close(layer(x), base + 2.0 * delta, rtol=0, atol=1e-5)
    assert type(model.x_embedder) is torch.nn.Linear  # skipped, and kept in 16-bit by quantize_


@pytest.mark.parametrize("embedder", ["kept", "quantized"])
def test_lora_adapters_on_a_quantized_model_take_its_16_bit_dtype(tmp_path, embedder):
    # "quantized" (keep_latent_layers=False, x_embedder FP8 too): its weight's float8 dtype
    # was taken for "the model's dtype", and every LoRA factor was cast to float8
    _base_lora(tiny_flux(), FLUX_TARGETS, tmp_path, FluxPipeline)
    ae, model = tiny_dcae(), tiny_flux()
    if embedder == "kept":
        adapter_for(model).replace_latent_layers(ae.latent_channels)
        quantize_(model.to(torch.bfloat16), FP8Config())
    else:
        adapter_for(model).replace_latent_layers(16)  # 16 inputs: wide enough for an FP8 layer
        quantize_(model.to(torch.bfloat16), FP8Config(keep_latent_layers=False, exclude=()))
        assert model.x_embedder.weight.dtype == torch.float8_e4m3fn
    pipe = DCGenFluxPipeline(model, ae)
    load_lora_on_quantized(pipe, str(tmp_path), "style", "pytorch_lora_weights.safetensors")
    lora = {n: p.dtype for n, p in model.named_parameters() if ".lora_" in n}
    assert lora and set(lora.values()) == {torch.bfloat16}
    layer = model.transformer_blocks[0].attn.to_q
    out = layer(torch.randn(2, layer.in_features, dtype=torch.bfloat16))
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()


def test_text_encoder_parts_left_out_on_a_quantized_transformer_are_named(tmp_path, caplog):
    """A LoRA with CLIP layers too: the transformer part loads unmerged, the text-encoder part
    (which the quantized path cannot apply) is named in a warning, not dropped silently."""
    state = _base_lora(tiny_flux(), FLUX_TARGETS, tmp_path / "plain", FluxPipeline)
    clip = {"text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight": torch.randn(4, 32),
            "text_model.encoder.layers.0.self_attn.q_proj.lora_B.weight": torch.randn(32, 4)}  # fmt: skip
    FluxPipeline.save_lora_weights(tmp_path / "both", transformer_lora_layers=state,
                                   text_encoder_lora_layers=clip)  # fmt: skip
    for folder, warned in (("plain", False), ("both", True)):
        ae, model = tiny_dcae(), tiny_flux()
        adapter_for(model).replace_latent_layers(ae.latent_channels)
        quantize_(model, FP8Config())
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="dcgen.pipelines.lora"):
            load_lora_on_quantized(DCGenFluxPipeline(model, ae), str(tmp_path / folder), "s")
        assert ("text_encoder entries are not loaded" in caplog.text) == warned
        assert any(".lora_A.s." in n for n, _ in model.named_parameters())
    # a text-encoder-only LoRA: peft's "Adapter name(s) ... not in the list" after the load
    FluxPipeline.save_lora_weights(tmp_path / "clip_only", text_encoder_lora_layers=clip)
    with pytest.raises(
        ValueError, match="expected transformer entries in the LoRA, got only text_encoder"
    ):
        load_lora_on_quantized(DCGenFluxPipeline(model, ae), str(tmp_path / "clip_only"), "t")


def test_generate_attaches_loras_to_a_quantized_checkpoint(lora_folders, tmp_path, capsys):
    root, pipe = lora_folders
    ckpt = tmp_path / "fp8.safetensors"
    argv = ["quantize", "--pipeline", str(pipe), "--format", "fp8-row", "--no-report",
            "--device", "cpu", "--no-progress", "--out", str(ckpt)]  # fmt: skip
    assert main(argv) == 0
    lora = str(root / "lora")
    quant = _generate(root, pipe, tmp_path / "q.png", "--quantized", str(ckpt))
    styled = _generate(root, pipe, tmp_path / "ql.png", "--quantized", str(ckpt), "--lora", lora)
    assert "attached 1 LoRA(s) to the quantized transformer" in capsys.readouterr().out
    assert np.abs(styled - quant).max() > 0
    off = _generate(root, pipe, tmp_path / "q0.png", "--quantized", str(ckpt), "--lora", lora,
                    "--lora-scale", "0")  # fmt: skip
    assert np.abs(off - quant).max() <= 1


def test_fused_blocks_keep_the_lora_of_quantized_layers(tmp_path):
    """dcgen.accelerate(blocks=True) calls some FP8 linears in special ways (shared input
    quantization, GELU epilogues, proj_out in halves): with LoRA wrappers on them, the
    accelerated model must still add every delta (the same output as the plain forward)."""
    import dcgen

    _base_lora(tiny_flux(), FLUX_TARGETS + ["proj_mlp", "to_out.0", "net.2"], tmp_path,
               FluxPipeline)  # fmt: skip
    ae, model = tiny_dcae(), tiny_flux()
    adapter_for(model).replace_latent_layers(ae.latent_channels)
    quantize_(model, FP8Config())
    pipe = DCGenFluxPipeline(model, ae)
    pipe.set_progress_bar_config(disable=True)
    quantized_only = _latents(pipe)
    load_lora_on_quantized(pipe, str(tmp_path), "style", "pytorch_lora_weights.safetensors")
    plain = _latents(pipe)
    assert (plain - quantized_only).abs().max() > 1e-3
    dcgen.accelerate(model, blocks=True)
    try:
        blocks = [*model.transformer_blocks, *model.single_transformer_blocks]
        assert all("forward" in vars(b) for b in blocks)  # the fused forwards are installed
        fused = _latents(pipe)
    finally:
        dcgen.unaccelerate(model)
    # measured: 0 on this CPU; the fused glue may round differently from the stock code
    torch.testing.assert_close(fused, plain, rtol=0, atol=1e-4)


@pytest.mark.cuda
@pytest.mark.parametrize("config", QUANT_CONFIGS, ids=QUANT_IDS)
def test_lora_on_a_quantized_transformer_on_cuda(tmp_path, config):
    """The same sum through the CUDA paths (FP8 GEMMs, the NVFP4 W4A16 and W4A4 GEMMs) in
    bf16: the adapters in bf16 too, so the tolerance is bf16's on the delta."""
    state = _base_lora(tiny_flux(), FLUX_TARGETS, tmp_path, FluxPipeline)
    ae, model = tiny_dcae(), tiny_flux()
    adapter_for(model).replace_latent_layers(ae.latent_channels)
    quantize_(model.to("cuda", torch.bfloat16), config)
    pipe = DCGenFluxPipeline(model, ae.to("cuda"))
    load_lora_on_quantized(pipe, str(tmp_path), "style", "pytorch_lora_weights.safetensors")
    g = torch.Generator(device="cuda").manual_seed(0)
    for name in ("transformer_blocks.0.attn.to_q", "single_transformer_blocks.0.proj_out"):
        layer = model.get_submodule(name)
        x = torch.randn(64, layer.in_features, device="cuda", dtype=torch.bfloat16, generator=g)
        with torch.no_grad():
            base = layer.get_base_layer()(x).float()
            a, b = (state[f"{name}.lora_{k}.weight"].cuda() for k in "AB")
            delta = 2.0 * x.float() @ a.T @ b.T
            got = layer(x).float()
        assert torch.isfinite(got).all()
        # bf16 adapters and a bf16 output: about 3 significant digits of base + delta
        scale = (base + delta).abs().max().item()
        torch.testing.assert_close(got, base + delta, rtol=2e-2, atol=1e-2 * scale)


@pytest.mark.parametrize("family", ["flux", "sana"])
def test_the_lora_scale_goes_through_attention_kwargs(tmp_path, family):
    """diffusers' runtime LoRA strength, {"scale": s} in (joint_)attention_kwargs, reaches the
    transformer from the DC-Gen pipelines (either name works for both families)."""
    if family == "flux":
        _base_lora(tiny_flux(), FLUX_TARGETS, tmp_path, FluxPipeline)
        pipe, _ = _dcgen(DCGenFluxPipeline, tiny_flux())
    else:
        _base_lora(tiny_sana(), SANA_TARGETS, tmp_path, SanaPipeline)
        pipe, _ = _dcgen(DCGenSanaPipeline, tiny_sana())
    plain = _latents(pipe)
    pipe.load_lora_weights(tmp_path, weight_name="pytorch_lora_weights.safetensors")
    full = _latents(pipe)
    off = _latents(pipe, joint_attention_kwargs={"scale": 0.0})
    torch.testing.assert_close(off, plain, rtol=0, atol=1e-6)
    half = _latents(pipe, attention_kwargs={"scale": 0.5})
    assert (half - plain).abs().max() > 1e-4 and (half - full).abs().max() > 1e-4
    import dcgen

    dcgen.accelerate(pipe.transformer, blocks=True)  # the fused forwards pass it on too
    try:
        torch.testing.assert_close(_latents(pipe, attention_kwargs={"scale": 0.5}), half)
    finally:
        dcgen.unaccelerate(pipe.transformer)
    with pytest.raises(ValueError, match="not both"):
        _latents(pipe, attention_kwargs={}, joint_attention_kwargs={})


def test_generate_applies_a_loras_text_encoder_part(tmp_path, capsys):
    # diffusers' fuse_lora fuses the transformer alone by default, and unload_lora_weights then
    # dropped the text-encoder layers: "fused 1 LoRA(s)", and the image of no LoRA at all
    import peft
    from peft.utils import get_peft_model_state_dict

    from .tiny_text import tiny_clip

    pipe = save_flux_pipeline(tmp_path / "pipe", with_text=True)
    torch.manual_seed(0)
    clip = peft.inject_adapter_in_model(
        peft.LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                        target_modules=["q_proj", "k_proj", "v_proj"]),
        tiny_clip(),
    )  # fmt: skip
    FluxPipeline.save_lora_weights(
        tmp_path / "lora_te", text_encoder_lora_layers=get_peft_model_state_dict(clip)
    )
    argv = ["generate", "--pipeline", str(pipe), "--prompt", "a red square", "--height", "64",
            "--width", "64", "--steps", "2", "--no-progress", "--device", "cpu"]  # fmt: skip
    assert main([*argv, "--out", str(tmp_path / "plain.png")]) == 0
    assert (
        main([*argv, "--lora", str(tmp_path / "lora_te"), "--out", str(tmp_path / "te.png")]) == 0
    )
    assert "fused 1 LoRA(s)" in capsys.readouterr().out
    plain, styled = (
        np.asarray(Image.open(tmp_path / n), dtype=np.int16) for n in ("plain.png", "te.png")
    )
    assert np.abs(styled - plain).max() > 0


def _text_latents(pipe, **extra) -> torch.Tensor:  # noqa: ANN001
    """Latents from a text prompt (the text encoders run), one seed."""
    kw = dict(height=64, width=64, num_inference_steps=1, output_type="latent",
              generator=torch.Generator().manual_seed(0), **extra)  # fmt: skip
    if isinstance(pipe, DCGenSanaPipeline):
        kw["true_cfg_scale"] = 1.0
    return pipe("a red square on the left", **kw).images


@pytest.mark.parametrize("family", ["flux", "sana"])
def test_the_lora_scale_reaches_the_text_encoders_lora_layers(tmp_path, family):
    """{"scale": s} scales a LoRA's text-encoder layers while the prompts encode, as
    diffusers' FluxPipeline / SanaPipeline encode_prompt do (scale_lora_layers), and leaves
    them as they were afterwards; it reached only the transformer, so scale 0 still applied the
    LoRA's whole text part."""
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils import get_peft_model_state_dict

    from .tiny_text import flux_text_components, sana_text_components, tiny_clip

    ae = tiny_dcae()
    model = tiny_flux() if family == "flux" else tiny_sana()
    adapter_for(model).replace_latent_layers(ae.latent_channels)
    if family == "flux":
        pipe = DCGenFluxPipeline(model, ae, **flux_text_components())
    else:
        pipe = DCGenSanaPipeline(model, ae, **sana_text_components())
    pipe.set_progress_bar_config(disable=True)
    plain = _text_latents(pipe)
    torch.manual_seed(0)
    # CLIP's attention projections (FLUX) and T5's (the tiny SANA encoder)
    targets = ["q_proj", "k_proj", "v_proj", "q", "k", "v"]
    config = peft.LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, target_modules=targets)
    if family == "flux":  # a FLUX LoRA file with a CLIP part, through load_lora_weights
        clip = peft.inject_adapter_in_model(config, tiny_clip())
        FluxPipeline.save_lora_weights(
            tmp_path, text_encoder_lora_layers=get_peft_model_state_dict(clip)
        )
        pipe.load_lora_weights(tmp_path, weight_name="pytorch_lora_weights.safetensors")
    else:  # SanaLoraLoaderMixin loads transformer LoRAs only: peft layers put on the encoder
        pipe.text_encoder = peft.inject_adapter_in_model(config, pipe.text_encoder)
    layers = [m for m in pipe.text_encoder.modules() if isinstance(m, BaseTunerLayer)]
    assert layers
    scalings = [dict(m.scaling) for m in layers]
    full = _text_latents(pipe)
    assert (full - plain).abs().max() > 1e-4  # the LoRA's text part changes the image
    off = _text_latents(pipe, joint_attention_kwargs={"scale": 0.0})
    torch.testing.assert_close(off, plain, rtol=0, atol=0)
    half = _text_latents(pipe, attention_kwargs={"scale": 0.5})
    assert (half - plain).abs().max() > 1e-4 and (half - full).abs().max() > 1e-4
    torch.testing.assert_close(_text_latents(pipe, attention_kwargs={"scale": 1.0}), full)
    # afterwards the encoder is as loaded: same scalings, same images
    assert [dict(m.scaling) for m in layers] == scalings
    torch.testing.assert_close(_text_latents(pipe), full, rtol=0, atol=0)
