import math

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler

from dcgen.adapters import adapter_for
from dcgen.autoencoders import DCAE
from dcgen.pipelines import BaseFluxPipeline, DCGenFluxPipeline, DCGenSanaPipeline

from ..adapters.tiny import text, tiny_dcae, tiny_flux, tiny_sana

STEPS = 2


def dcgen_flux(dynamic: bool = True) -> DCGenFluxPipeline:
    ae = tiny_dcae()
    model = tiny_flux()
    adapter_for(model).replace_latent_layers(ae.latent_channels)
    scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=dynamic)
    pipe = DCGenFluxPipeline(model, ae, scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def flux_pipe() -> DCGenFluxPipeline:
    return dcgen_flux()


def run(pipe, seed=0, **kwargs):
    embeds, pooled = text(1)
    kwargs.setdefault("height", 64)
    kwargs.setdefault("width", 96)
    return pipe(
        prompt_embeds=embeds,
        pooled_prompt_embeds=pooled,
        num_inference_steps=STEPS,
        generator=torch.Generator().manual_seed(seed),
        **kwargs,
    ).images


def test_determinism_and_output_types(flux_pipe):
    a = run(flux_pipe, output_type="pt")
    b = run(flux_pipe, output_type="pt")
    c = run(flux_pipe, seed=1, output_type="pt")
    assert a.shape == (1, 3, 64, 96) and 0 <= a.min() and a.max() <= 1
    assert torch.equal(a, b) and not torch.equal(a, c)
    latents = run(flux_pipe, output_type="latent")
    assert latents.shape == (1, 2, 2, 3)
    arr = run(flux_pipe, output_type="np")
    assert isinstance(arr, np.ndarray) and arr.shape == (1, 64, 96, 3)
    np.testing.assert_allclose(arr, a.permute(0, 2, 3, 1).numpy(), atol=1e-6)
    pil = run(flux_pipe, output_type="pil")
    assert isinstance(pil[0], PIL.Image.Image) and pil[0].size == (96, 64)
    # the pipeline's latents decode like the DCAE decodes them itself (scaled space)
    decoded = flux_pipe.vae.decode(latents, scaled=True)
    torch.testing.assert_close(a, (decoded / 2 + 0.5).clamp(0, 1))


def test_true_cfg_batch_and_tiling(flux_pipe):
    embeds, pooled = text(1)
    neg, neg_pooled = text(1, seed=5)
    out = run(flux_pipe, output_type="latent", num_images_per_prompt=2, true_cfg_scale=3.0,
              negative_prompt_embeds=neg, negative_pooled_prompt_embeds=neg_pooled)  # fmt: skip
    plain = run(flux_pipe, output_type="latent", num_images_per_prompt=2)
    assert out.shape == (2, 2, 2, 3) and not torch.equal(out, plain)
    # above the threshold a DC-AE decodes in bands by default (the full-frame image) or, with
    # band_rows=None, tile by tile (same size, blended, not the same numbers)
    full = run(flux_pipe, output_type="pt", height=128, width=128)
    banded = run(flux_pipe, output_type="pt", height=128, width=128, tile_threshold=64,
                 band_rows=24)  # fmt: skip
    torch.testing.assert_close(banded, full, rtol=1e-5, atol=1e-5)
    tiled = run(flux_pipe, output_type="pt", height=128, width=128, tile_threshold=64,
                tile_size=64, tile_overlap=32, band_rows=None)  # fmt: skip
    assert tiled.shape == full.shape == (1, 3, 128, 128) and not torch.equal(tiled, full)


def test_bad_inputs(flux_pipe):
    embeds, pooled = text(1)
    with pytest.raises(ValueError, match="multiple of 32"):
        run(flux_pipe, height=48)
    with pytest.raises(ValueError, match="no text encoders"):
        flux_pipe("a cat", height=64, width=64, num_inference_steps=STEPS)
    with pytest.raises(ValueError, match="no prompt"):
        flux_pipe(height=64, width=64)
    with pytest.raises(ValueError, match="pooled"):
        flux_pipe(prompt_embeds=embeds, height=64, width=64)
    with pytest.raises(ValueError, match="negative"):
        run(flux_pipe, true_cfg_scale=2.0)
    with pytest.raises(ValueError, match="output_type"):
        run(flux_pipe, output_type="jpeg")
    # a DC-AE whose latent channels do not match the adapted transformer
    model = tiny_flux()
    adapter_for(model).replace_latent_layers(8)
    pipe = DCGenFluxPipeline(model, tiny_dcae(), FlowMatchEulerDiscreteScheduler())
    with pytest.raises(ValueError, match="expects 8-channel latents but the autoencoder"):
        run(pipe)
    with pytest.raises(TypeError, match="dcgen DCAE"):
        DCGenFluxPipeline(model, torch.nn.Linear(1, 1))


def test_a_dcae_of_another_factor_than_stage_1_aligned_to_is_refused():
    """Same channels, another grid: tiny_dcae is f32c2; a model aligned to an f64c2 DC-AE
    sampled beside it silently, on tokens twice too fine."""
    from dcgen.adapters.provenance import record_dcae_factor

    ae = tiny_dcae()
    model = tiny_flux()
    adapter_for(model).replace_latent_layers(ae.latent_channels)
    pipe = DCGenFluxPipeline(model, ae, FlowMatchEulerDiscreteScheduler())
    record_dcae_factor(model, 64)
    with pytest.raises(ValueError, match=r"aligned to an f64 DC-AE.*autoencoder \(DCAE\) is f32"):
        run(pipe)
    record_dcae_factor(model, 32)
    assert torch.isfinite(run(pipe, output_type="pt")).all()


@pytest.mark.parametrize(
    ("option", "value", "error", "match"),
    [
        # None is the default (3.5 for a guidance-embedding model); a string is not a scale
        ("guidance_scale", "2", ValueError, "guidance_scale: expected a finite number or None"),
        ("guidance_scale", float("nan"), ValueError, "guidance_scale: expected a finite number"),
        ("true_cfg_scale", "2", ValueError, "true_cfg_scale: expected a finite number or None"),
        ("latents", np.zeros((1, 2, 2, 3)), TypeError, "latents: expected a torch.Tensor"),
        ("tile_size", -64, ValueError, "tile_size: expected a positive int, got -64"),
        ("tile_overlap", 64, ValueError, r"tile_overlap: expected an int in \[0, tile_size=64\)"),
        ("tile_threshold", 0, ValueError, "tile_threshold: expected a positive int or None"),
        ("band_rows", 2.5, ValueError, "band_rows: expected a positive int or None"),
    ],
)  # fmt: skip
def test_bad_scalar_options_are_named_before_sampling(flux_pipe, option, value, error, match):
    # None / strings / arrays failed deep inside sampling; a negative tile size was taken
    kw = {"tile_size": 64, option: value}
    with pytest.raises(error, match=match):
        run(flux_pipe, output_type="latent", **kw)


def test_generator_lists_and_counts_are_checked(flux_pipe):
    """A generator list must hold one generator per output image (diffusers' rule): a short or
    long one is named, not an IndexError deep in the noise draw or silently truncated;
    num_images_per_prompt must be positive."""
    gens = [torch.Generator().manual_seed(s) for s in range(3)]
    embeds, pooled = text(1)
    kw = dict(prompt_embeds=embeds, pooled_prompt_embeds=pooled, height=64, width=64,
              num_inference_steps=1, output_type="latent")  # fmt: skip
    for k in (1, 2, 4):
        with pytest.raises(ValueError, match=f"a list of {k} generators for 3 image"):
            flux_pipe(generator=[torch.Generator()] * k, num_images_per_prompt=3, **kw)
    out = flux_pipe(generator=gens, num_images_per_prompt=3, **kw).images
    assert out.shape[0] == 3
    for bad in (0, -1, 1.5):
        with pytest.raises(ValueError, match="num_images_per_prompt: expected a positive int"):
            flux_pipe(num_images_per_prompt=bad, **kw)


def test_numpy_scalars_are_taken_as_their_values(flux_pipe):
    """Sizes, step counts and strengths given as numpy scalars (as diffusers takes them)."""
    embeds, pooled = text(1)
    kw = dict(prompt_embeds=embeds, pooled_prompt_embeds=pooled, output_type="latent")

    def call(**extra):  # noqa: ANN003, ANN202
        return flux_pipe(generator=torch.Generator().manual_seed(0), **kw, **extra).images

    plain = call(height=64, width=96, num_inference_steps=2, num_images_per_prompt=2)
    numpy = call(height=np.int64(64), width=np.int32(96), num_inference_steps=np.int64(2),
                 num_images_per_prompt=np.int64(2))  # fmt: skip
    assert torch.equal(plain, numpy)
    image = torch.rand(1, 3, 64, 96, generator=torch.Generator().manual_seed(1))
    a = call(height=64, width=96, num_inference_steps=4, image=image, strength=0.5)
    b = call(height=64, width=96, num_inference_steps=4, image=image, strength=np.float32(0.5))
    assert torch.equal(a, b)


@pytest.mark.parametrize(
    ("sigmas", "match"),
    [([], "non-empty"), ([1.0, 1.0], "strictly decreasing"), ([0.5, 0.7], "strictly decreasing"),
     ([1.2, 0.5], r"in \(0, 1\]"), ([0.5, 0.0], r"in \(0, 1\]"), ([1.0, float("nan")], "in"),
     ([[1.0, 0.5]], "1-D"), ("fast", "list of numbers")],
)  # fmt: skip
def test_bad_custom_sigmas_are_named(flux_pipe, sigmas, match):
    with pytest.raises(ValueError, match=match):
        run(flux_pipe, sigmas=sigmas)


def test_custom_sigmas_need_the_euler_sampler():
    from diffusers import DPMSolverMultistepScheduler

    ae = tiny_dcae()
    model = tiny_sana()
    adapter_for(model).replace_latent_layers(ae.latent_channels)
    sched = DPMSolverMultistepScheduler(flow_shift=3.0, use_flow_sigmas=True,
                                        prediction_type="flow_prediction")  # fmt: skip
    pipe = DCGenSanaPipeline(model, ae, sched)
    pipe.set_progress_bar_config(disable=True)
    kwargs = dict(prompt_embeds=torch.randn(1, 5, 32), height=64, width=64, true_cfg_scale=1.0,
                  output_type="latent", sigmas=[1.0, 0.5])  # fmt: skip
    with pytest.raises(ValueError, match="Euler sampler; this pipeline's scheduler selects"):
        pipe(**kwargs)
    with pytest.raises(ValueError, match="Euler sampler; sampler='dpm' selects"):
        pipe(sampler="dpm", **kwargs)
    out = pipe(sampler="euler", generator=torch.Generator().manual_seed(0), **kwargs).images
    assert torch.isfinite(out).all()


def test_a_guidance_scale_the_model_cannot_use_is_named(caplog):
    # diffusers' SanaPipeline calls its CFG scale guidance_scale; here that is true_cfg_scale,
    # and guidance_scale=7 on a model without a guidance embedding changed nothing, silently
    ae = tiny_dcae()
    model = tiny_sana()
    adapter_for(model).replace_latent_layers(ae.latent_channels)
    pipe = DCGenSanaPipeline(model, ae, FlowMatchEulerDiscreteScheduler(shift=3.0))
    pipe.set_progress_bar_config(disable=True)
    kw = dict(prompt_embeds=torch.randn(1, 5, 32), height=64, width=64, num_inference_steps=1,
              true_cfg_scale=1.0, output_type="latent")  # fmt: skip
    with caplog.at_level("WARNING", logger="dcgen.pipelines.base"):
        pipe(**kw)
        assert "guidance_scale" not in caplog.text  # the default says nothing
        pipe(guidance_scale=7.0, **kw)
    assert "guidance_scale=7 is not used" in caplog.text and "true_cfg_scale (now 1)" in caplog.text


def test_shift_rules_change_sampling():
    dynamic = run(dcgen_flux(dynamic=True), output_type="latent")
    constant = run(dcgen_flux(dynamic=False), output_type="latent")  # scheduler shift 1.0
    pipe = dcgen_flux(dynamic=True)
    pipe.register_to_config(shift_rule="none")
    assert torch.equal(run(pipe, output_type="latent"), constant)
    assert not torch.equal(dynamic, constant)
    assert torch.equal(run(pipe, output_type="latent", shift=1.0), constant)


def test_save_load_round_trip(flux_pipe, tmp_path):
    flux_pipe.register_to_config(shift_rule="sqrt")
    try:
        before = run(flux_pipe, output_type="pt")
        flux_pipe.save_pretrained(tmp_path)
    finally:
        flux_pipe.register_to_config(shift_rule="auto")
    assert (tmp_path / "vae" / "config.json").is_file()
    loaded = DCGenFluxPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    assert isinstance(loaded.vae, DCAE) and loaded.config.shift_rule == "sqrt"
    assert loaded.scheduler.config.use_dynamic_shifting
    torch.testing.assert_close(run(loaded, output_type="pt"), before)
    # the vae folder is a diffusers AutoencoderDC folder
    from diffusers import AutoencoderDC

    AutoencoderDC.from_pretrained(tmp_path / "vae")
    # a per-component dtype, as diffusers takes it: the DC-AE ignored it
    mixed = DCGenFluxPipeline.from_pretrained(
        tmp_path, dtype={"vae": torch.bfloat16, "default": torch.float32}
    )
    assert mixed.vae.dtype == torch.bfloat16 and mixed.transformer.dtype == torch.float32
    default = DCGenFluxPipeline.from_pretrained(tmp_path, dtype={"default": torch.bfloat16})
    assert default.vae.dtype == torch.bfloat16


def test_sana_pipeline():
    ae = tiny_dcae()
    model = tiny_sana()
    adapter_for(model).replace_latent_layers(ae.latent_channels)
    pipe = DCGenSanaPipeline(model, ae, FlowMatchEulerDiscreteScheduler(shift=3.0))
    pipe.set_progress_bar_config(disable=True)
    embeds = torch.randn(1, 5, 32)
    kwargs = dict(prompt_embeds=embeds, prompt_attention_mask=torch.ones(1, 5), height=64,
                  width=64, num_inference_steps=STEPS, output_type="pt")  # fmt: skip
    a = pipe(generator=torch.Generator().manual_seed(0), **kwargs).images
    b = pipe(generator=torch.Generator().manual_seed(0), **kwargs).images
    assert a.shape == (1, 3, 64, 64) and torch.equal(a, b)
    cfg = pipe(generator=torch.Generator().manual_seed(0), true_cfg_scale=4.5,
               negative_prompt_embeds=torch.randn(1, 5, 32), **kwargs).images  # fmt: skip
    assert not torch.equal(a, cfg)
    assert pipe._shift_for(4, 2) == 3.0  # SANA: the scheduler's constant flow shift


def test_base_flux_pipeline():
    torch.manual_seed(0)
    vae = AutoencoderKL(
        block_out_channels=(8, 8), layers_per_block=1, latent_channels=16, norm_num_groups=8,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        scaling_factor=0.3611, shift_factor=0.1159,
    ).eval()  # fmt: skip
    pipe = BaseFluxPipeline(
        tiny_flux(), vae, FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True)
    )
    pipe.set_progress_bar_config(disable=True)
    assert pipe.spatial_factor == 4  # f2 toy VAE x 2x2 packing
    out = run(pipe, output_type="pt", height=16, width=24)
    assert out.shape == (1, 3, 16, 24)
    with pytest.raises(ValueError, match="multiple of 4"):
        run(pipe, height=18)
    # a call above tile_threshold tiles the VAE for itself and leaves the user's setting as it
    # was (it used to switch off tiling the user had turned on)
    for user_tiling in (False, True):
        if user_tiling:
            vae.enable_tiling()
        run(pipe, output_type="pt", height=16, width=24, tile_threshold=8)
        assert vae.use_tiling is user_tiling
    # FLUX.1's shift rule reads the scheduler's values; a 0 is a value, not "use the default"
    pipe.scheduler.register_to_config(base_shift=0.0)
    tokens = 4 * 6
    mu = 0.0 + (1.15 - 0.0) / (4096 - 256) * (tokens - 256)
    assert pipe._shift_for(tokens, 16) == pytest.approx(math.exp(mu))


@pytest.mark.parametrize("sampler", ["euler", "dpm"])
def test_callback_on_step_end_sees_and_edits_the_latents(sampler):
    """diffusers' callback_on_step_end: called once a step with the step's timestep and the
    latents; the latents it returns replace the sampler's."""
    ae, model = tiny_dcae(), tiny_flux()
    adapter_for(model).replace_latent_layers(ae.latent_channels)
    pipe = DCGenFluxPipeline(model, ae)
    pipe.set_progress_bar_config(disable=True)
    e, p = text(1)
    kw = dict(prompt_embeds=e, pooled_prompt_embeds=p, height=64, width=64,
              num_inference_steps=3, output_type="latent", sampler=sampler,
              generator=torch.Generator().manual_seed(0))  # fmt: skip
    seen = []

    def watch(pipe_, i, t, kwargs):  # noqa: ANN001, ANN202
        seen.append((i, float(t), kwargs["latents"].clone()))
        return {}

    with torch.no_grad():
        out = pipe(callback_on_step_end=watch, **kw).images
    assert [i for i, _, _ in seen] == [0, 1, 2]
    assert all(a > b for (_, a, _), (_, b, _) in zip(seen, seen[1:]))  # timesteps fall
    assert 0 < seen[-1][1] < seen[0][1] <= 1000
    torch.testing.assert_close(seen[-1][2], out)  # the last step's latents are the output

    def zero_after_first(pipe_, i, t, kwargs):  # noqa: ANN001, ANN202
        return {"latents": torch.zeros_like(kwargs["latents"])} if i == 0 else {}

    kw["generator"] = torch.Generator().manual_seed(0)
    with torch.no_grad():
        edited = pipe(callback_on_step_end=zero_after_first, **kw).images
    assert (edited - out).abs().max() > 1e-3  # the edit changed the rest of the trajectory
    with pytest.raises(ValueError, match=r"expected a subset of \['latents'\]"):
        pipe(callback_on_step_end=watch, callback_on_step_end_tensor_inputs=["noise"], **kw)

    # diffusers' early stop: the callback sets _interrupt; the latents of that step come out
    def stop_after_first(pipe_, i, t, kwargs):  # noqa: ANN001, ANN202
        pipe_._interrupt = i == 0
        return {}

    seen.clear()
    kw["generator"] = torch.Generator().manual_seed(0)
    with torch.no_grad():
        stopped = pipe(callback_on_step_end=stop_after_first, **kw).images
        rerun = pipe(
            callback_on_step_end=watch, **{**kw, "generator": torch.Generator().manual_seed(0)}
        ).images
    torch.testing.assert_close(stopped, seen[0][2])  # the first step's latents
    assert pipe.interrupt is False and torch.equal(rerun, out)  # the next call runs whole


def test_a_sana_pipeline_without_a_scheduler_samples_at_sanas_flow_shift():
    # Built without a scheduler it sampled at shift 1.0 (no shift at all), where an exported
    # SANA folder and SANA's own checkpoints sample at flow shift 3.0.
    from diffusers import DPMSolverMultistepScheduler

    ae, model = tiny_dcae(), tiny_sana()
    adapter_for(model).replace_latent_layers(ae.latent_channels)
    assert DCGenSanaPipeline(model, ae)._shift_for(64, ae.latent_channels) == 3.0
    dpm = DPMSolverMultistepScheduler(flow_shift=6.0, use_flow_sigmas=True,
                                      prediction_type="flow_prediction")  # fmt: skip
    assert DCGenSanaPipeline(model, ae, dpm)._shift_for(64, ae.latent_channels) == 6.0


def test_cfg_runs_both_predictions_in_one_batch(monkeypatch):
    """CFG's negative and positive predictions go through one transformer call of twice the
    batch (as diffusers' pipelines run them), with the result of two calls; where the negative
    embeddings have another length they cannot stack and two calls run."""
    ae, model = tiny_dcae(), tiny_sana()
    adapter_for(model).replace_latent_layers(ae.latent_channels)
    pipe = DCGenSanaPipeline(model, ae)
    pipe.set_progress_bar_config(disable=True)
    (pos, _), (neg, _), (short, _) = text(2, 6, seed=1), text(2, 6, seed=2), text(2, 4, seed=3)
    batches = []
    model.register_forward_pre_hook(
        lambda m, args, kwargs: batches.append(kwargs["hidden_states"].shape[0]), with_kwargs=True
    )

    # padded text tokens, in other places for the negative and the positive prompts
    pos_mask, neg_mask = torch.ones(2, 6, dtype=torch.long), torch.ones(2, 6, dtype=torch.long)
    pos_mask[1, 3:], neg_mask[0, 2:] = 0, 0

    def run(negative: torch.Tensor) -> torch.Tensor:
        batches.clear()
        masks = {} if negative.shape[1] != 6 else {
            "prompt_attention_mask": pos_mask, "negative_prompt_attention_mask": neg_mask}  # fmt: skip
        with torch.no_grad():
            return pipe(prompt_embeds=pos, negative_prompt_embeds=negative, height=64, width=64,
                        num_inference_steps=3, true_cfg_scale=4.5, output_type="latent",
                        generator=torch.Generator().manual_seed(0), **masks).images  # fmt: skip

    together = run(neg)
    assert batches == [4, 4, 4]
    import dcgen

    dcgen.accelerate(model, blocks=True)  # the fused blocks and cross-attention, per-row masks
    try:
        torch.testing.assert_close(run(neg), together, rtol=0, atol=1e-5)
    finally:
        dcgen.unaccelerate(model)
    monkeypatch.setattr(DCGenSanaPipeline, "cfg_in_one_batch", False)
    apart = run(neg)
    assert batches == [2] * 6
    # measured: 6e-7 on latents up to 3.3, this CPU (batched GEMMs sum in another order)
    torch.testing.assert_close(together, apart, rtol=0, atol=1e-5)
    monkeypatch.setattr(DCGenSanaPipeline, "cfg_in_one_batch", True)
    run(short)
    assert batches == [2] * 6  # 6 vs 4 text tokens: two calls
    # negatives in bf16 beside fp32 prompts: the stacked batch takes the wider dtype, so the
    # prompts are not rounded to bf16 there (the two-call path never rounds them)
    together = run(neg.bfloat16())
    monkeypatch.setattr(DCGenSanaPipeline, "cfg_in_one_batch", False)
    torch.testing.assert_close(together, run(neg.bfloat16()), rtol=0, atol=1e-5)


def test_the_default_cfg_rule_reads_a_config():
    """One rule for the pipeline (its transformer's config) and the CLI (a folder's
    config.json, before loading): the class default unless the model is guidance-distilled."""
    assert DCGenSanaPipeline.model_cfg_scale({}) == 4.5
    assert DCGenSanaPipeline.model_cfg_scale({"guidance_embeds": True}) == 1.0
    assert DCGenFluxPipeline.model_cfg_scale({"guidance_embeds": False}) == 1.0
    model = tiny_sana()
    assert DCGenSanaPipeline.model_cfg_scale(model.config) == 4.5


def test_embeddings_and_their_companions_must_match(flux_pipe):
    """pooled embeddings and text masks are checked against prompt_embeds row for row: a
    batch-1 pooled for two prompts was broadcast silently, other mismatches failed deep in
    the transformer with a bare RuntimeError."""
    embeds, pooled = text(2)
    kw = dict(height=64, width=64, num_inference_steps=1, output_type="latent")
    with pytest.raises(
        ValueError, match=r"^pooled_prompt_embeds: expected \(2, dim\) for prompt_embeds"
    ):
        flux_pipe(prompt_embeds=embeds, pooled_prompt_embeds=pooled[:1], **kw)
    with pytest.raises(ValueError, match=r"^negative_pooled_prompt_embeds: expected \(2, dim\)"):
        flux_pipe(prompt_embeds=embeds, pooled_prompt_embeds=pooled, true_cfg_scale=2.0,
                  negative_prompt_embeds=embeds, negative_pooled_prompt_embeds=pooled[:1], **kw)  # fmt: skip
    sana = DCGenSanaPipeline(tiny_sana(), vae=tiny_dcae())
    sana.set_progress_bar_config(disable=True)
    adapter_for(sana.transformer).replace_latent_layers(tiny_dcae().latent_channels)
    sana_embeds = torch.randn(2, 5, 32)
    with pytest.raises(
        ValueError, match=r"^prompt_attention_mask: expected shape \(2, 5\) .* got \(2, 7\)"
    ):
        sana(prompt_embeds=sana_embeds, prompt_attention_mask=torch.ones(2, 7), **kw)
    with pytest.raises(
        ValueError, match=r"^negative_prompt_attention_mask: expected shape \(2, 5\)"
    ):
        sana(prompt_embeds=sana_embeds, prompt_attention_mask=torch.ones(2, 5),
             negative_prompt_embeds=sana_embeds, negative_prompt_attention_mask=torch.ones(1, 5),
             **kw)  # fmt: skip


@pytest.mark.parametrize("cls", [DCGenFluxPipeline, DCGenSanaPipeline])
def test_a_variant_missing_from_vae_loads_its_plain_weights(cls, tmp_path):
    # diffusers' pipeline loader hands a component the requested variant only where it has
    # files of that variant; a folder with a bf16 transformer and a plain vae/ loads as a whole.
    model = tiny_flux() if cls is DCGenFluxPipeline else tiny_sana()
    ae = tiny_dcae()
    adapter_for(model).replace_latent_layers(ae.latent_channels)
    cls(model, ae).save_pretrained(tmp_path)
    model.to(torch.bfloat16).save_pretrained(tmp_path / "transformer", variant="bf16")
    assert not list((tmp_path / "vae").glob("*bf16*"))
    pipe = cls.from_pretrained(tmp_path, variant="bf16")
    for k, v in ae.state_dict().items():
        assert torch.equal(pipe.vae.state_dict()[k], v), k
    # a vae/ with files of the variant still gets them
    other = tiny_dcae()
    with torch.no_grad():
        for t in other.parameters():
            t.add_(0.5)
    other.save_pretrained(tmp_path / "vae", variant="bf16")
    pipe = cls.from_pretrained(tmp_path, variant="bf16")
    for k, v in other.state_dict().items():
        assert torch.equal(pipe.vae.state_dict()[k], v), k


@pytest.mark.parametrize(
    ("setting", "value"),
    [
        ("time_shift_type", "linear"),
        ("shift_terminal", 0.1),
        ("use_karras_sigmas", True),
        ("use_exponential_sigmas", True),
        ("use_beta_sigmas", True),
        ("stochastic_sampling", True),
        ("invert_sigmas", True),
    ],
)
def test_euler_scheduler_settings_dcgen_does_not_implement_are_refused(setting, value):
    # Each of these gives diffusers' pipeline another schedule (or random steps); sampling on
    # would quietly give other images from the same folder.
    pipe = dcgen_flux()
    kwargs = {"use_dynamic_shifting": True, setting: value}
    if setting.startswith("use_") and setting.endswith("_sigmas"):
        pytest.importorskip("scipy")  # diffusers needs it for these schedules
    pipe.scheduler = FlowMatchEulerDiscreteScheduler(**kwargs)
    with pytest.raises(ValueError, match=rf"scheduler config {setting}={value!r}"):
        run(pipe)
    pipe.scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True)
    assert torch.isfinite(run(pipe, output_type="pt")).all()


def test_sana_with_a_dynamic_shifting_euler_scheduler_says_it_keeps_its_shift(caplog):
    ae = tiny_dcae()
    model = tiny_sana()
    adapter_for(model).replace_latent_layers(ae.latent_channels)
    pipe = DCGenSanaPipeline(model, ae, FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True,
                                                                        shift=3.0))  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    fixed = DCGenSanaPipeline(model, ae, FlowMatchEulerDiscreteScheduler(shift=3.0))
    fixed.set_progress_bar_config(disable=True)
    embeds, _ = text(1)
    kw = dict(prompt_embeds=embeds, height=64, width=64, num_inference_steps=2,
              output_type="latent", generator=torch.Generator().manual_seed(0))  # fmt: skip
    with torch.no_grad():
        got = pipe(**kw).images
    assert "use_dynamic_shifting=True" in caplog.text and "fixed shift 3" in caplog.text
    kw["generator"] = torch.Generator().manual_seed(0)
    with torch.no_grad():
        torch.testing.assert_close(got, fixed(**kw).images, rtol=0, atol=0)
