"""export_pipeline: latent layers + fused LoRA + DC-AE -> a folder that loads and samples the same."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from safetensors import safe_open

from dcgen.adapters import adapter_for
from dcgen.pipelines import DCGenFluxPipeline, DCGenSanaPipeline
from dcgen.train.export import (
    ExportError,
    default_scheduler,
    export_pipeline,
    load_latent_layers,
    save_latent_layers,
)
from dcgen.train.latent_layers import LatentLayersError
from dcgen.train.lora import add_lora, save_lora

from ..adapters.tiny import text, tiny_dcae, tiny_flux, tiny_sana


def _images(pipe, **kwargs) -> torch.Tensor:
    embeds, pooled = text(1)
    pipe.set_progress_bar_config(disable=True)
    return pipe(
        prompt_embeds=embeds, pooled_prompt_embeds=pooled, height=64, width=64,
        num_inference_steps=2, generator=torch.Generator().manual_seed(3), output_type="pt",
        **kwargs,
    ).images  # fmt: skip


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A base tiny FLUX on disk, and the in-memory "trained" model: new latent layers for the
    tiny DC-AE plus a LoRA with nonzero B (so the LoRA really changes the output)."""
    root = tmp_path_factory.mktemp("export")
    ae = tiny_dcae()
    ae.save_pretrained(root / "dcae")
    base = tiny_flux()
    base.save_pretrained(root / "base")
    model = tiny_flux()
    adapter = adapter_for(model)
    adapter.replace_latent_layers(ae.latent_channels)
    add_lora(model, rank=4, train_modules=("x_embedder", "proj_out"))
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
    save_lora(model, root / "lora")
    save_latent_layers(adapter, root / "latent_layers.safetensors")
    return root, model, ae


def test_latent_layers_file_format(trained):
    root, model, ae = trained
    with safe_open(str(root / "latent_layers.safetensors"), framework="pt") as f:
        meta, keys = f.metadata(), set(f.keys())
    assert keys == {"embedder.weight", "embedder.bias", "head.weight", "head.bias"}
    assert meta["family"] == "FluxTransformer2DModel" and meta["format"] == "dcgen.latent_layers"
    assert (meta["latent_channels"], meta["patch_size"]) == (str(ae.latent_channels), "1")
    # base model + file = the adapted model's layers
    fresh = tiny_flux()
    adapter = adapter_for(fresh)
    load_latent_layers(adapter, root / "latent_layers.safetensors")
    assert adapter.latent_channels == ae.latent_channels and adapter.patch_size == 1
    torch.testing.assert_close(fresh.x_embedder.weight, model.x_embedder.weight)
    with pytest.raises(LatentLayersError, match="flux latent layers but the transformer is sana"):
        load_latent_layers(adapter_for(tiny_sana()), root / "latent_layers.safetensors")


def test_latent_layers_carry_the_position_scale(tmp_path):
    # align_positions="base" sets a RoPE position scale in the transformer's config; the file
    # left it out, so base transformer + file was another model than the trained one
    model, ae = tiny_flux(), tiny_dcae()
    adapter = adapter_for(model)
    adapter.replace_latent_layers(ae.latent_channels)
    adapter.set_position_scale(2.0)
    path = save_latent_layers(adapter, tmp_path / "scaled.safetensors")
    rebuilt = adapter_for(tiny_flux())
    assert load_latent_layers(rebuilt, path)["position_scale"] == 2.0
    assert rebuilt.position_scale == 2.0
    e, p = text(1)
    x, sigma, g = torch.randn(1, ae.latent_channels, 4, 4), torch.tensor([0.7]), torch.tensor([3.5])
    with torch.no_grad():
        torch.testing.assert_close(
            rebuilt.predict(x, sigma, e, p, g), adapter.predict(x, sigma, e, p, g), rtol=0, atol=0
        )
    # a file of unscaled positions resets a scaled model: the file is the adapted layers' truth
    adapter.set_position_scale(1.0)
    plain = save_latent_layers(adapter, tmp_path / "plain.safetensors")
    assert load_latent_layers(rebuilt, plain)["position_scale"] == 1.0
    assert rebuilt.position_scale == 1.0


def test_a_latent_layers_file_of_another_format_or_with_clashing_extras_is_refused(
    trained, tmp_path
):
    # The format key was written but never read: any safetensors file with family / channels
    # / patch metadata loaded as latent layers. And extras were merged after the core keys, so
    # {"patch_size": ...} silently rewrote what the file says about its own tensors.
    from safetensors.torch import save_file

    root, model, _ = trained
    with safe_open(str(root / "latent_layers.safetensors"), framework="pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    for fmt, shown in (("dcgen.quantized", "'dcgen.quantized'"), (None, "None")):
        other = dict(meta, format=fmt) if fmt else {k: v for k, v in meta.items() if k != "format"}
        save_file(tensors, str(tmp_path / "other.safetensors"), metadata=other)
        with pytest.raises(
            LatentLayersError, match=rf"expected format 'dcgen.latent_layers', got {shown}"
        ):
            load_latent_layers(tiny_flux(), tmp_path / "other.safetensors")
    with pytest.raises(ValueError, match=r"extra metadata \['patch_size'\] would replace"):
        save_latent_layers(model, tmp_path / "x.safetensors", {"patch_size": "2", "stage": "a"})
    assert not (tmp_path / "x.safetensors").exists()


def test_export_round_trip_matches_unfused_model(trained, tmp_path):
    root, model, ae = trained
    # In memory, peft layers unfused; same scheduler config the export writes for FLUX.
    want = _images(DCGenFluxPipeline(model, ae, default_scheduler("flux")))
    out = export_pipeline(
        root / "base", root / "dcae", tmp_path / "pipe", lora_dir=root / "lora",
        latent_layers=root / "latent_layers.safetensors",
    )  # fmt: skip
    for name in ("model_index.json", "transformer/config.json", "vae/config.json",
                 "scheduler/scheduler_config.json"):  # fmt: skip
        assert (out / name).is_file(), name
    pipe = DCGenFluxPipeline.from_pretrained(out)
    assert not any("lora" in n for n, _ in pipe.transformer.named_parameters())
    assert pipe.scheduler.config.use_dynamic_shifting
    got = _images(pipe)
    torch.testing.assert_close(got, want, atol=2e-3, rtol=0)
    # the LoRA matters: without it the image differs
    no_lora = export_pipeline(
        root / "base", ae, tmp_path / "nolora",
        latent_layers=root / "latent_layers.safetensors",
    )  # fmt: skip
    assert (_images(DCGenFluxPipeline.from_pretrained(no_lora)) - want).abs().max() > 1e-2
    # a stage's out_dir (its own config.json is the training config, transformer/ beside it),
    # as --help says: its config.json was taken for the transformer's and refused
    stage = tmp_path / "runs" / "output"
    shutil.copytree(root / "base", stage / "transformer")
    (stage / "config.json").write_text(json.dumps({"stage": "output", "steps": 3}))
    from_stage = export_pipeline(
        stage, root / "dcae", tmp_path / "from_stage", lora_dir=root / "lora",
        latent_layers=root / "latent_layers.safetensors",
    )  # fmt: skip
    torch.testing.assert_close(_images(DCGenFluxPipeline.from_pretrained(from_stage)), got)


def test_a_stage_3_folder_exports_with_the_latent_layers_trained_with_its_lora(
    trained, tmp_path, caplog
):
    """Without --latent-layers, a stage-3 LoRA was paired with the transformer folder's (stage
    2's) embedder and head instead of the ones stage 3 trained with it and saved beside it."""
    root, _, ae = trained
    finetune = tmp_path / "finetune"
    shutil.copytree(root / "lora", finetune)
    shutil.copy(root / "latent_layers.safetensors", finetune / "latent_layers.safetensors")
    stage2 = tiny_flux()
    torch.manual_seed(7)  # other layers than the LoRA's: stage 2's, before stage 3 moved them
    adapter_for(stage2).replace_latent_layers(ae.latent_channels)
    stage2.save_pretrained(tmp_path / "stage2")
    right = export_pipeline(root / "base", ae, tmp_path / "right", lora_dir=finetune,
                            latent_layers=finetune / "latent_layers.safetensors")  # fmt: skip
    default = export_pipeline(tmp_path / "stage2", ae, tmp_path / "default", lora_dir=finetune)
    torch.testing.assert_close(
        _images(DCGenFluxPipeline.from_pretrained(default)),
        _images(DCGenFluxPipeline.from_pretrained(right)),
    )
    caplog.clear()
    other = tmp_path / "other.safetensors"
    save_latent_layers(adapter_for(stage2), other)
    export_pipeline(tmp_path / "stage2", ae, tmp_path / "explicit", lora_dir=finetune,
                    latent_layers=other)  # fmt: skip
    assert "are not the ones trained with the LoRA" in caplog.text


def _recorded_load_dtypes(monkeypatch: pytest.MonkeyPatch) -> list[torch.dtype]:
    """The dtypes export loads transformers in, recorded as it runs."""
    import dcgen.train.export as export

    loaded: list[torch.dtype] = []
    real = export.load_diffusers_transformer

    def spy(folder, dtype, class_name):  # noqa: ANN001, ANN202
        loaded.append(dtype)
        return real(folder, dtype=dtype, class_name=class_name)

    monkeypatch.setattr(export, "load_diffusers_transformer", spy)
    return loaded


def test_export_loads_in_the_target_dtype_and_rounds_fused_weights_once(
    trained, tmp_path, monkeypatch
):
    """export(dtype=bf16) loaded the transformer (and the DC-AE) in fp32 and cast at the end:
    twice a bf16 FLUX's size in memory (48 GB). It loads in bf16 now unless a LoRA is fused
    into weights stored wider, and the fused weights are still the fp32 sum rounded once."""
    root, _, _ = trained
    tiny_flux().to(torch.bfloat16).save_pretrained(tmp_path / "base_bf16")
    loaded = _recorded_load_dtypes(monkeypatch)
    layers = root / "latent_layers.safetensors"

    def weights(out, part="transformer"):  # noqa: ANN001, ANN202
        with safe_open(str(out / part / "diffusion_pytorch_model.safetensors"), "pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118

    def same_rounded_once(got_dir, want_dir):  # noqa: ANN001, ANN202
        for part in ("transformer", "vae"):
            got, want = weights(got_dir, part), weights(want_dir, part)
            assert got.keys() == want.keys()
            for k, v in want.items():  # the fp32 values rounded once (BatchNorm stats stay fp32)
                assert torch.equal(got[k], v.to(got[k].dtype)), (part, k)
            bf16 = sum(v.numel() for v in got.values() if v.dtype == torch.bfloat16)
            assert bf16 > 0.9 * sum(v.numel() for v in got.values()), part

    for base, lora in ((root / "base", None), (tmp_path / "base_bf16", root / "lora"),
                       (root / "base", root / "lora")):  # fmt: skip
        name = f"{base.name}-{lora is not None}"
        bf16 = export_pipeline(base, root / "dcae", tmp_path / name, dtype=torch.bfloat16,
                               latent_layers=layers, lora_dir=lora)  # fmt: skip
        fp32 = export_pipeline(base, root / "dcae", tmp_path / f"{name}-fp32",
                               latent_layers=layers, lora_dir=lora)  # fmt: skip
        same_rounded_once(bf16, fp32)
    # bf16 without a LoRA, bf16 into bf16-stored weights, fp32 for a LoRA on fp32-stored ones
    assert loaded[0::2] == [torch.bfloat16, torch.bfloat16, torch.float32]
    assert loaded[1::2] == [torch.float32] * 3


def test_a_variant_file_beside_the_weights_does_not_decide_how_they_load(
    trained, tmp_path, monkeypatch
):
    """The stored dtype was read from every *.safetensors in the folder: an fp16 variant file
    (diffusion_pytorch_model.fp16.safetensors, never loaded) made fp32 weights look fp16, so
    an fp16 export with a LoRA loaded them in fp16 and rounded twice."""
    root, _, _ = trained
    base = tmp_path / "base_with_variant"
    shutil.copytree(root / "base", base)
    tiny_flux().to(torch.float16).save_pretrained(base, variant="fp16")
    assert (base / "diffusion_pytorch_model.fp16.safetensors").is_file()
    loaded = _recorded_load_dtypes(monkeypatch)
    export_pipeline(base, root / "dcae", tmp_path / "out", dtype=torch.float16,
                    latent_layers=root / "latent_layers.safetensors", lora_dir=root / "lora")  # fmt: skip
    assert loaded == [torch.float32]  # the fp32 file is the one read: the fuse rounds once


def test_the_weight_files_of_a_sharded_folder_are_its_shards(tmp_path):
    from dcgen.train.export import _loaded_weight_files

    tiny_flux().save_pretrained(tmp_path, max_shard_size="20KB")
    index = tmp_path / "diffusion_pytorch_model.safetensors.index.json"
    shards = sorted(tmp_path.glob("diffusion_pytorch_model-*.safetensors"))
    assert len(shards) > 1 and _loaded_weight_files(tmp_path) == shards
    index.write_text('{"weight_map": ["not", "a", "map"]}')
    with pytest.raises(ExportError, match=f"could not read shard index {index}.*weight_map"):
        _loaded_weight_files(tmp_path)


def test_export_leaves_the_callers_dcae_as_it_was(tmp_path):
    # dtype=bf16 with a DCAE object cast the caller's model in place (a lossy cast)
    ae = tiny_dcae()
    before = {k: v.clone() for k, v in ae.state_dict().items()}
    model = tiny_sana()
    adapter_for(model).replace_latent_layers(ae.latent_channels)
    model.save_pretrained(tmp_path / "adapted")
    out = export_pipeline(tmp_path / "adapted", ae, tmp_path / "pipe", dtype=torch.bfloat16)
    assert ae.dtype == torch.float32
    assert all(torch.equal(v, before[k]) for k, v in ae.state_dict().items())
    with safe_open(str(out / "vae" / "diffusion_pytorch_model.safetensors"), "pt") as f:
        assert f.get_tensor(next(iter(f.keys()))).dtype in (torch.bfloat16, torch.float32)
        assert any(f.get_tensor(k).dtype == torch.bfloat16 for k in f.keys())  # noqa: SIM118


def test_export_refuses_a_dcae_of_another_factor_than_stage_1_aligned_to(tmp_path):
    """tiny_dcae is f32c2: a model aligned to an f64c2 DC-AE took it, channels being all that
    export compared, and the pipeline sampled on a grid twice too fine."""
    from dcgen.adapters.provenance import record_dcae_factor

    ae = tiny_dcae()
    model = tiny_flux()
    adapter_for(model).replace_latent_layers(ae.latent_channels)
    record_dcae_factor(model, 64)
    model.save_pretrained(tmp_path / "f64")
    with pytest.raises(ExportError, match="aligned to an f64 DC-AE.*but the DC-AE is f32"):
        export_pipeline(tmp_path / "f64", ae, tmp_path / "pipe")
    assert not (tmp_path / "pipe").exists()
    record_dcae_factor(model, 32)
    model.save_pretrained(tmp_path / "f32")
    out = export_pipeline(tmp_path / "f32", ae, tmp_path / "pipe")
    assert json.loads((out / "transformer" / "config.json").read_text())["_dcgen_dcae_factor"] == 32


def test_export_sana_and_dtype(tmp_path):
    ae = tiny_dcae()
    model = tiny_sana()
    adapter_for(model).replace_latent_layers(ae.latent_channels)
    model.save_pretrained(tmp_path / "adapted")  # stage 1-2 style: layers already adapted
    out = export_pipeline(tmp_path / "adapted", ae, tmp_path / "pipe", dtype=torch.bfloat16)
    pipe = DCGenSanaPipeline.from_pretrained(out, dtype=torch.bfloat16)
    # SANA's own sampler: DPM-Solver++ on flow sigmas at flow shift 3
    assert pipe.scheduler.config.flow_shift == 3.0 and pipe.dpm_settings() is not None
    assert pipe._shift_for(4, 2) == 3.0
    assert next(pipe.transformer.parameters()).dtype == torch.bfloat16
    # stored in bf16 (diffusers would upcast on load without dtype)
    with safe_open(str(out / "transformer" / "diffusion_pytorch_model.safetensors"), "pt") as f:
        assert f.get_tensor("proj_out.weight").dtype == torch.bfloat16


def test_export_errors(trained, tmp_path):
    root, _, _ = trained
    # base FLUX (16 channels in 2x2 patches) without latent layers does not fit the 2-channel DC-AE
    with pytest.raises(ExportError, match="16-channel latents but the DC-AE"):
        export_pipeline(root / "base", root / "dcae", tmp_path / "x")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        export_pipeline(tmp_path / "missing", root / "dcae", tmp_path / "x")
    (tmp_path / "junk").mkdir()
    with pytest.raises(ExportError, match="not a diffusers transformer folder"):
        export_pipeline(tmp_path / "junk", root / "dcae", tmp_path / "x")
    assert isinstance(default_scheduler("flux", shift=2.0), FlowMatchEulerDiscreteScheduler)
    assert default_scheduler("sana", shift=4.0).config.flow_shift == 4.0
