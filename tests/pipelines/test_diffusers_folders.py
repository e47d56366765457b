"""The base models as users have them: diffusers' own FluxPipeline / SanaPipeline folders.

BaseFluxPipeline samples FLUX.1 as diffusers' FluxPipeline does, and DCGenSanaPipeline on SANA's
own DC-AE samples as diffusers' SanaPipeline does (DPM-Solver++ 2M, integer model timesteps, CFG
4.5 by default): same noise, same embeddings, the same image up to float rounding. Both load such
folders (text encoders included), and a SANA folder's DPM-Solver scheduler gives its flow shift
and its solver to dcgen's sampling and to an exported DC-Gen pipeline (from_pretrained into an
Euler scheduler would silently drop the shift)."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from diffusers import (
    AutoencoderDC,
    DPMSolverMultistepScheduler,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    SanaPipeline,
)

from dcgen.autoencoders import DCAE
from dcgen.autoencoders.checkpoint import dcgen_to_diffusers
from dcgen.cli import main
from dcgen.pipelines import BaseFluxPipeline, DCGenSanaPipeline

from ..adapters.tiny import text, tiny_dcae, tiny_flux, tiny_kl, tiny_sana
from ..autoencoders.dcae_helpers import small_config
from .tiny_text import PROMPT, flux_text_components, sana_text_components

pytest.importorskip("transformers")

# diffusers' FLUX.1 scheduler settings (dynamic shifting, mu 0.5 at 256 tokens to 1.15 at 4096)
FLUX_SCHEDULER = dict(use_dynamic_shifting=True, base_image_seq_len=256, max_image_seq_len=4096,
                      base_shift=0.5, max_shift=1.15, shift=3.0)  # fmt: skip


def _pack(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> FLUX's 2x2-packed tokens (B, H/2 * W/2, 4C)."""
    b, c, h, w = x.shape
    return x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, -1, 4 * c)


def _flux_pair() -> tuple[FluxPipeline, BaseFluxPipeline]:
    """diffusers' FluxPipeline and dcgen's BaseFluxPipeline on the same tiny FLUX.1 and VAE."""
    vae, model = tiny_kl(seed=3), tiny_flux(in_channels=64)
    sched = FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER)
    ref = FluxPipeline(scheduler=sched, vae=vae, transformer=model, text_encoder=None,
                       tokenizer=None, text_encoder_2=None, tokenizer_2=None)  # fmt: skip
    ours = BaseFluxPipeline(model, vae, sched)
    for p in (ref, ours):
        p.set_progress_bar_config(disable=True)
    return ref, ours


@pytest.mark.parametrize("steps", [2, 4])
def test_base_flux_samples_as_diffusers_flux_pipeline(steps):
    ref, ours = _flux_pair()
    noise = torch.randn(1, 16, 32, 48)  # 64 x 96 pixels
    embeds, pooled = text(1)
    kw = dict(prompt_embeds=embeds, pooled_prompt_embeds=pooled, height=64, width=96,
              num_inference_steps=steps, guidance_scale=3.5)  # fmt: skip
    with torch.no_grad():
        want = ref(latents=_pack(noise), output_type="latent", **kw).images
        got = ours(latents=noise, output_type="latent", **kw).images
        # measured: at most 1e-6 (4 steps, this CPU); the images through the same VAE
        torch.testing.assert_close(_pack(got), want, rtol=0, atol=1e-5)
        want_img = ref(latents=_pack(noise), output_type="pt", **kw).images
        got_img = ours(latents=noise, output_type="pt", **kw).images
    torch.testing.assert_close(got_img, want_img, rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    "custom", [[1.0, 0.7, 0.3], [0.9, 0.85, 0.5, 0.1], [1.0]], ids=["three", "four", "one"]
)
def test_custom_sigmas_sample_as_diffusers_flux_pipeline(custom):
    """``sigmas=`` as FluxPipeline takes it: unshifted values, shifted by the token-count rule
    and ended with 0; their count sets the steps (num_inference_steps is overridden)."""
    ref, ours = _flux_pair()
    noise = torch.randn(1, 16, 32, 48)
    embeds, pooled = text(1)
    kw = dict(prompt_embeds=embeds, pooled_prompt_embeds=pooled, height=64, width=96,
              num_inference_steps=20, guidance_scale=3.5, sigmas=custom)  # fmt: skip
    with torch.no_grad():
        want = ref(latents=_pack(noise), output_type="latent", **kw).images
        got = ours(latents=noise, output_type="latent", **kw).images
        default = ours(latents=noise, output_type="latent", **{**kw, "sigmas": None}).images
    torch.testing.assert_close(_pack(got), want, rtol=0, atol=1e-5)
    assert (got - default).abs().max() > 1e-3  # the custom schedule is not the default one


@pytest.mark.parametrize(("steps", "strength"), [(4, 0.6), (5, 1.0), (10, 0.35)])
@pytest.mark.parametrize("batch", [1, 2])
def test_image_to_image_samples_as_diffusers_flux_img2img(steps, strength, batch):
    """image= / strength= as FluxImg2ImgPipeline: the VAE posterior sampled from the generator
    first, then the noise, the image noised to the first kept sigma, the last int(steps x
    strength) Euler steps."""
    from diffusers import FluxImg2ImgPipeline

    _, ours = _flux_pair()
    ref = FluxImg2ImgPipeline(scheduler=ours.scheduler, vae=ours.vae, transformer=ours.transformer,
                              text_encoder=None, tokenizer=None, text_encoder_2=None,
                              tokenizer_2=None)  # fmt: skip
    ref.set_progress_bar_config(disable=True)
    torch.manual_seed(7)
    image = torch.rand(batch, 3, 64, 96)  # in [0, 1], as diffusers takes tensors
    embeds, pooled = text(batch)
    kw = dict(prompt_embeds=embeds, pooled_prompt_embeds=pooled, image=image, height=64,
              width=96, num_inference_steps=steps, strength=strength, guidance_scale=3.5,
              output_type="latent")  # fmt: skip

    def gens():
        return [torch.Generator().manual_seed(40 + i) for i in range(batch)]

    with torch.no_grad():
        want = ref(generator=gens(), **kw).images
        got = ours(generator=gens(), **kw).images
    torch.testing.assert_close(_pack(got), want, rtol=0, atol=1e-5)


@pytest.mark.parametrize("rows", [1, 2])
def test_image_to_image_output_i_depends_on_generator_i_alone(rows):
    """One image (or one per prompt) shared by several outputs, a generator per output: each
    output is the image its generator gives alone (`dcgen generate --image X --seed 0 1
    --batch-size 2` passes exactly this). The posterior was sampled once per input row, from
    generator[0] only, so every other output's noise moved with the batch; diffusers'
    FluxImg2ImgPipeline does the same, and is not batch-invariant there."""
    _, ours = _flux_pair()
    torch.manual_seed(9)
    image = torch.rand(rows, 3, 32, 32)
    embeds, pooled = text(rows)
    kw = dict(strength=0.6, height=32, width=32, num_inference_steps=4, output_type="latent")
    n = 2  # images per prompt

    def gen(seed: int) -> torch.Generator:
        return torch.Generator().manual_seed(seed)

    with torch.no_grad():
        both = ours(prompt_embeds=embeds, pooled_prompt_embeds=pooled, image=image,
                    num_images_per_prompt=n, generator=[gen(i) for i in range(rows * n)],
                    **kw).images  # fmt: skip
        for i in range(rows * n):
            p = i // n
            alone = ours(prompt_embeds=embeds[p : p + 1], pooled_prompt_embeds=pooled[p : p + 1],
                         image=image[p : p + 1], generator=gen(i), **kw).images  # fmt: skip
            torch.testing.assert_close(both[i : i + 1], alone, rtol=0, atol=1e-5)


@pytest.mark.parametrize(("steps", "strength"), [(4, 1.0), (6, 0.6), (5, 0.3)])
def test_inpainting_samples_as_diffusers_flux_inpaint(steps, strength):
    """mask_image= as FluxInpaintPipeline: the binarized mask on the latent grid, the kept
    region reset to the image's latents noised to the next sigma after every step."""
    from diffusers import FluxInpaintPipeline

    _, ours = _flux_pair()
    ref = FluxInpaintPipeline(scheduler=ours.scheduler, vae=ours.vae, transformer=ours.transformer,
                              text_encoder=None, tokenizer=None, text_encoder_2=None,
                              tokenizer_2=None)  # fmt: skip
    ref.set_progress_bar_config(disable=True)
    torch.manual_seed(11)
    image = torch.rand(1, 3, 64, 96)
    mask = torch.zeros(1, 1, 64, 96)
    mask[..., 16:48, 40:] = 1.0  # repaint a block on the right
    mask[..., 0:8, 0:20] = 0.7  # above 0.5: binarized to 1
    embeds, pooled = text(1)
    kw = dict(prompt_embeds=embeds, pooled_prompt_embeds=pooled, image=image, mask_image=mask,
              height=64, width=96, num_inference_steps=steps, strength=strength,
              guidance_scale=3.5, output_type="latent")  # fmt: skip
    with torch.no_grad():
        want = ref(generator=torch.Generator().manual_seed(3), **kw).images
        got = ours(generator=torch.Generator().manual_seed(3), **kw).images
        plain = ours(generator=torch.Generator().manual_seed(3),
                     **{**kw, "mask_image": None}).images  # fmt: skip
    torch.testing.assert_close(_pack(got), want, rtol=0, atol=1e-5)
    assert (got - plain).abs().max() > 1e-3  # the mask changed the result


def _sana_pair(scheduler, learned_sigma: bool = False) -> tuple[SanaPipeline, DCGenSanaPipeline]:
    """diffusers' SanaPipeline and dcgen's on the same tiny transformer and DC-AE weights. The
    DC-AE has attention head dim 8: at tiny_dcae's 2 the two decoders' fp32 roundings differ by
    up to 1e-2 on these latents (an ill-conditioned linear attention, tests/autoencoders)."""
    torch.manual_seed(0)
    ae = DCAE(small_config("dc-ae-f32c32-in-1.0", width_divisor=16, max_layers=1)).eval()
    vae = AutoencoderDC(**ae.config.to_dict())
    vae.load_state_dict(dcgen_to_diffusers(ae.state_dict()))
    c = ae.latent_channels
    model = tiny_sana(in_channels=c, out_channels=2 * c if learned_sigma else None)
    ref = SanaPipeline(tokenizer=None, text_encoder=None, vae=vae.eval(), transformer=model,
                       scheduler=scheduler)  # fmt: skip
    ours = DCGenSanaPipeline(model, ae, scheduler)
    for p in (ref, ours):
        p.set_progress_bar_config(disable=True)
    return ref, ours


@pytest.mark.parametrize("steps", [1, 3, 20])
@pytest.mark.parametrize("solver_type", ["midpoint", "heun"])
def test_sana_samples_as_diffusers_sana_pipeline(steps, solver_type):
    sched = DPMSolverMultistepScheduler(flow_shift=3.0, use_flow_sigmas=True,
                                        prediction_type="flow_prediction", solver_type=solver_type)  # fmt: skip
    ref, ours = _sana_pair(sched)
    noise = torch.randn(2, 2, 2, 3)  # 64 x 96 pixels, two images
    (pos, _), (neg, _) = text(2, tokens=6, seed=1), text(2, tokens=6, seed=2)
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[1, 4:] = 0  # padded text tokens in the second prompt
    kw = dict(prompt_embeds=pos, prompt_attention_mask=mask, negative_prompt_embeds=neg,
              negative_prompt_attention_mask=mask, height=64, width=96,
              num_inference_steps=steps, latents=noise)  # fmt: skip
    with torch.no_grad():
        # both at their defaults: CFG 4.5, the scheduler's DPM-Solver++ (dcgen: sampler "auto")
        plain = dict(use_resolution_binning=False, negative_prompt=None)  # SanaPipeline's "" off
        want = ref(output_type="latent", **plain, **kw).images
        got = ours(output_type="latent", **kw).images
        # measured (this CPU, two noise draws, 1-20 steps): at most 7e-6 on latents reaching 3.8,
        # and 3e-6 on the images; Euler steps instead land 0.05-0.24 away
        torch.testing.assert_close(got, want, rtol=0, atol=3e-5)
        euler = ours(output_type="latent", sampler="euler", **kw).images
        assert (euler - want).abs().max() > 1e-2  # the solver is what makes them agree
        want_img = ref(output_type="pt", **plain, **kw).images
        got_img = ours(output_type="pt", **kw).images
    torch.testing.assert_close(got_img, want_img, rtol=0, atol=3e-5)


@pytest.mark.parametrize("steps", [1, 5, 20])
@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_sana_with_an_euler_scheduler_samples_as_diffusers_sana_pipeline(steps, shift):
    # SanaPipeline passes its scheduler no sigmas: the scheduler's own grid, linspace(1,
    # sigma_min, N) with sigma_min its shifted 1/T, shifted again. dcgen used FluxPipeline's
    # linspace(1, 1/N) for every Euler scheduler: 0.16-0.49 apart on the latents at 5 steps.
    ref, ours = _sana_pair(FlowMatchEulerDiscreteScheduler(shift=shift))
    (pos, _), (neg, _) = text(2, tokens=6, seed=1), text(2, tokens=6, seed=2)
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[1, 4:] = 0
    kw = dict(prompt_embeds=pos, prompt_attention_mask=mask, negative_prompt_embeds=neg,
              negative_prompt_attention_mask=mask, height=64, width=96,
              num_inference_steps=steps, latents=torch.randn(2, 2, 2, 3), output_type="latent")  # fmt: skip
    with torch.no_grad():
        want = ref(use_resolution_binning=False, negative_prompt=None, **kw).images
        got = ours(**kw).images
    torch.testing.assert_close(got, want, rtol=0, atol=3e-5)


def _assert_same_latents(ref: SanaPipeline, ours: DCGenSanaPipeline) -> None:
    """One prompt with CFG, 64 x 64, 3 steps, the same noise: the same latents within 3e-5."""
    (pos, _), (neg, _) = text(1, tokens=6, seed=1), text(1, tokens=6, seed=2)
    mask = torch.ones(1, 6, dtype=torch.long)
    kw = dict(prompt_embeds=pos, prompt_attention_mask=mask, negative_prompt_embeds=neg,
              negative_prompt_attention_mask=mask, height=64, width=64, num_inference_steps=3,
              latents=torch.randn(1, 2, 2, 2), output_type="latent")  # fmt: skip
    with torch.no_grad():
        want = ref(use_resolution_binning=False, negative_prompt=None, **kw).images
        got = ours(**kw).images
    torch.testing.assert_close(got, want, rtol=0, atol=3e-5)


def test_a_learned_sigma_sana_samples_as_diffusers_sana_pipeline():
    # out_channels = 2 x in_channels: SanaPipeline reads the velocity from the first half;
    # dcgen's sampler failed on the doubled channels ("size of tensor a (2) must match ... (4)")
    sched = DPMSolverMultistepScheduler(flow_shift=3.0, use_flow_sigmas=True,
                                        prediction_type="flow_prediction")  # fmt: skip
    _assert_same_latents(*_sana_pair(sched, learned_sigma=True))


@pytest.mark.parametrize("train_timesteps", [500, 1000])
def test_sana_with_other_train_timesteps_samples_as_diffusers(train_timesteps):
    # diffusers hands the model the integer timestep floor(sigma T) itself, whatever T is
    sched = DPMSolverMultistepScheduler(flow_shift=3.0, use_flow_sigmas=True,
                                        prediction_type="flow_prediction",
                                        num_train_timesteps=train_timesteps)  # fmt: skip
    _assert_same_latents(*_sana_pair(sched))  # measured before the fix at T = 500: 0.21 apart


def test_sana_default_cfg_needs_a_negative(caplog):
    """CFG 4.5 is SANA's default only where a negative prompt can be had: embeddings without
    negatives and no text encoders sample without guidance (a warning), as the CLI does."""
    ref, ours = _sana_pair(DPMSolverMultistepScheduler(
        flow_shift=3.0, use_flow_sigmas=True, prediction_type="flow_prediction"))  # fmt: skip
    pos, _ = text(1, tokens=6, seed=1)
    kw = dict(prompt_embeds=pos, height=64, width=64, num_inference_steps=2, output_type="latent",
              latents=torch.randn(1, 2, 2, 2))  # fmt: skip
    with torch.no_grad():
        default = ours(**kw).images
        torch.testing.assert_close(default, ours(true_cfg_scale=1.0, **kw).images)
        with pytest.raises(ValueError, match="needs a negative prompt"):
            ours(true_cfg_scale=4.5, **kw)
    assert ours.dpm_settings() is not None and ours.dpm_settings("euler") is None
    # a scheduler dcgen has no solver for: Euler, said out loud
    assert "it runs without guidance (true_cfg_scale=1)" in caplog.text  # the default call's
    caplog.clear()
    assert ours.dpm_settings().integer_timesteps  # SanaPipeline's int64 timesteps
    ours.scheduler = FlowMatchEulerDiscreteScheduler()
    assert ours.dpm_settings() is None and not caplog.records
    assert ours.dpm_settings("dpm").integer_timesteps is False  # forced: float timesteps
    from diffusers import SCMScheduler

    ours.scheduler = SCMScheduler()
    with caplog.at_level(logging.WARNING, logger="dcgen.pipelines.base"):
        assert ours.dpm_settings() is None
    assert "SCMScheduler: dcgen samples with Euler or DPM-Solver++ only" in caplog.text
    with pytest.raises(ValueError, match="sampler: expected one of"):
        ours.dpm_settings("ddim")


def test_unsupported_dpm_configs_are_refused():
    for bad in (dict(algorithm_type="sde-dpmsolver++"), dict(use_karras_sigmas=True),
                dict(solver_order=3), dict(use_flow_sigmas=False)):  # fmt: skip
        sched = DPMSolverMultistepScheduler(
            **{"flow_shift": 3.0, "use_flow_sigmas": True, "prediction_type": "flow_prediction",
               **bad})  # fmt: skip
        _, ours = _sana_pair(sched)
        with pytest.raises(ValueError, match="sampler='euler'|order: expected 1 or 2"):
            ours(prompt_embeds=text(1)[0], height=64, width=64, num_inference_steps=2,
                 true_cfg_scale=1.0, output_type="latent")  # fmt: skip
        # Euler remains available for such a folder
        ours(prompt_embeds=text(1)[0], height=64, width=64, num_inference_steps=2,
             true_cfg_scale=1.0, output_type="latent", sampler="euler")  # fmt: skip


@pytest.fixture(scope="module")
def base_folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("diffusers_folders")
    FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER), vae=tiny_kl(seed=3),
        transformer=tiny_flux(in_channels=64), **flux_text_components(),
    ).save_pretrained(root / "flux")  # fmt: skip
    ae = tiny_dcae()
    vae = AutoencoderDC(**ae.config.to_dict())
    vae.load_state_dict(dcgen_to_diffusers(ae.state_dict()))
    # what diffusers' SANA conversion writes: DPM-Solver++ on flow sigmas, flow_shift
    sched = DPMSolverMultistepScheduler(
        flow_shift=3.0, use_flow_sigmas=True, prediction_type="flow_prediction"
    )
    SanaPipeline(
        vae=vae, transformer=tiny_sana(in_channels=ae.latent_channels), scheduler=sched,
        **sana_text_components(),
    ).save_pretrained(root / "sana")  # fmt: skip
    return root


def test_diffusers_folders_load_with_their_text_encoders(base_folders):
    flux = BaseFluxPipeline.from_pretrained(base_folders / "flux")
    assert flux._has_text_encoders()
    sana = DCGenSanaPipeline.from_pretrained(base_folders / "sana")
    assert sana._has_text_encoders() and type(sana.vae).__name__ == "DCAE"
    # the SANA folder's DPM-Solver holds its shift as flow_shift: 3.0, not the Euler default 1
    assert sana._shift_for(num_tokens=4, latent_channels=2) == 3.0
    for pipe, max_len in ((flux, 16), (sana, 12)):
        pipe.set_progress_bar_config(disable=True)
        out = pipe(prompt=PROMPT, height=64, width=64, num_inference_steps=2, output_type="pt",
                   max_sequence_length=max_len).images  # fmt: skip
        assert out.shape == (1, 3, 64, 64) and torch.isfinite(out).all()


def test_generate_takes_diffusers_folders(base_folders, tmp_path):
    for name, max_len in (("flux", "16"), ("sana", "12")):
        out = tmp_path / f"{name}.png"
        argv = ["generate", "--pipeline", str(base_folders / name), "--prompt", PROMPT,
                "--max-sequence-length", max_len, "--height", "64", "--width", "64", "--steps",
                "2", "--no-progress", "--device", "cpu", "--out", str(out)]  # fmt: skip
        assert main(argv) == 0, name
        assert out.is_file()


def test_generate_sampler_option(base_folders, tmp_path):
    """--sampler: auto follows the folder's scheduler (SANA: DPM-Solver++), euler forces Euler."""
    import numpy as np
    from PIL import Image

    pixels = {}
    for sampler in ("auto", "dpm", "euler"):
        out = tmp_path / f"{sampler}.png"
        argv = ["generate", "--pipeline", str(base_folders / "sana"), "--prompt", PROMPT,
                "--max-sequence-length", "12", "--height", "64", "--width", "64", "--steps", "3",
                "--no-progress", "--device", "cpu", "--sampler", sampler, "--out", str(out)]  # fmt: skip
        assert main(argv) == 0, sampler
        pixels[sampler] = np.asarray(Image.open(out), dtype=np.int16)
    assert np.array_equal(pixels["auto"], pixels["dpm"])
    assert np.abs(pixels["auto"] - pixels["euler"]).max() > 0


def test_export_from_a_sana_folder_keeps_its_solver_and_flow_shift(base_folders, tmp_path):
    from dcgen.train.export import default_scheduler

    source = base_folders / "sana" / "transformer"
    sched = default_scheduler("sana", source=source)
    assert type(sched).__name__ == "DPMSolverMultistepScheduler"
    assert sched.config.flow_shift == 3.0 and sched.config.use_flow_sigmas
    assert default_scheduler("sana", source=source, shift=4.0).config.flow_shift == 4.0
    out = tmp_path / "pipe"
    tiny_dcae().save_pretrained(tmp_path / "dcae")
    argv = ["export", "--transformer", str(base_folders / "sana"), "--dcae",
            str(tmp_path / "dcae"), "--out", str(out), "--dtype", "fp32"]  # fmt: skip
    assert main(argv) == 0
    config = json.loads((out / "scheduler" / "scheduler_config.json").read_text())
    assert config["_class_name"] == "DPMSolverMultistepScheduler" and config["flow_shift"] == 3.0
    exported = DCGenSanaPipeline.from_pretrained(out)
    assert exported._shift_for(4, 2) == 3.0 and exported.dpm_settings() is not None


def test_a_sana_folder_gives_diffusers_image_from_a_text_prompt(base_folders):
    """The user's view: one SANA folder, loaded by diffusers' SanaPipeline and by dcgen, the same
    text prompt and seed, both at their defaults (Gemma-style encoding with the instruction,
    CFG 4.5 against the empty prompt, the folder's DPM-Solver++): the same image."""
    folder = base_folders / "sana"
    ref = SanaPipeline.from_pretrained(folder)
    ours = DCGenSanaPipeline.from_pretrained(folder)
    images = []
    for pipe, extra in ((ref, {"use_resolution_binning": False}), (ours, {})):
        pipe.set_progress_bar_config(disable=True)
        with torch.no_grad():
            images.append(pipe(prompt=PROMPT, height=64, width=96, num_inference_steps=6,
                               max_sequence_length=12, output_type="pt",
                               generator=torch.Generator().manual_seed(3), **extra).images)  # fmt: skip
    # measured: at most 5e-7 on this CPU (seeds 3-5)
    torch.testing.assert_close(images[1], images[0], rtol=0, atol=3e-5)


def test_a_flux_folder_gives_diffusers_image_from_a_text_prompt(base_folders):
    """The same for FLUX.1: FluxPipeline and BaseFluxPipeline on one folder, one text prompt."""
    folder = base_folders / "flux"
    images = []
    for pipe in (FluxPipeline.from_pretrained(folder), BaseFluxPipeline.from_pretrained(folder)):
        pipe.set_progress_bar_config(disable=True)
        with torch.no_grad():
            images.append(pipe(prompt=PROMPT, height=64, width=96, num_inference_steps=4,
                               guidance_scale=3.5, max_sequence_length=16, output_type="pt",
                               generator=torch.Generator().manual_seed(3)).images)  # fmt: skip
    torch.testing.assert_close(images[1], images[0], rtol=0, atol=3e-5)


def test_base_flux_true_cfg_as_diffusers_flux_pipeline():
    """FLUX.1 with true CFG against a negative prompt: dcgen's one-batch CFG gives FluxPipeline's
    result (which runs the negative as a second call)."""
    ref, ours = _flux_pair()
    noise = torch.randn(1, 16, 32, 32)
    (pos, pooled), (neg, neg_pooled) = text(1, seed=1), text(1, seed=2)
    kw = dict(prompt_embeds=pos, pooled_prompt_embeds=pooled, negative_prompt_embeds=neg,
              negative_pooled_prompt_embeds=neg_pooled, true_cfg_scale=3.0, height=64,
              width=64, num_inference_steps=3, guidance_scale=3.5, output_type="latent")  # fmt: skip
    with torch.no_grad():
        want = ref(latents=_pack(noise), **kw).images
        got = ours(latents=noise, **kw).images
        plain = ours(latents=noise, **{**kw, "true_cfg_scale": 1.0}).images
    # measured: at most 1.4e-6 on latents to 4.6 (three noise draws, this CPU)
    torch.testing.assert_close(_pack(got), want, rtol=0, atol=3e-5)
    assert (got - plain).abs().max() > 1e-3  # the guidance did something
