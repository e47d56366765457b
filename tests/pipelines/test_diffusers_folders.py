"""The base models as users have them: diffusers' own FluxPipeline / SanaPipeline folders.

BaseFluxPipeline samples FLUX.1 as diffusers' FluxPipeline does (same noise, same embeddings:
the same image up to float rounding), both load such folders (text encoders included), and a
SANA folder's DPM-Solver scheduler gives its flow shift to dcgen's Euler sampling and to an
exported DC-Gen pipeline (from_pretrained into an Euler scheduler would silently drop it)."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import (
    AutoencoderDC,
    AutoencoderKL,
    DPMSolverMultistepScheduler,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    SanaPipeline,
)

from dcgen.autoencoders.checkpoint import dcgen_to_diffusers
from dcgen.cli import main
from dcgen.pipelines import BaseFluxPipeline, DCGenSanaPipeline

from ..adapters.tiny import text, tiny_dcae, tiny_flux, tiny_sana
from .tiny_text import PROMPT, flux_text_components, sana_text_components

pytest.importorskip("transformers")

# diffusers' FLUX.1 scheduler settings (dynamic shifting, mu 0.5 at 256 tokens to 1.15 at 4096)
FLUX_SCHEDULER = dict(use_dynamic_shifting=True, base_image_seq_len=256, max_image_seq_len=4096,
                      base_shift=0.5, max_shift=1.15, shift=3.0)  # fmt: skip


def _tiny_kl() -> AutoencoderKL:
    torch.manual_seed(3)
    return AutoencoderKL(
        block_out_channels=(8, 8), layers_per_block=1, latent_channels=16, norm_num_groups=8,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        scaling_factor=0.3611, shift_factor=0.1159,
    ).eval()  # fmt: skip


def _pack(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> FLUX's 2x2-packed tokens (B, H/2 * W/2, 4C)."""
    b, c, h, w = x.shape
    return x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, -1, 4 * c)


@pytest.mark.parametrize("steps", [2, 4])
def test_base_flux_samples_as_diffusers_flux_pipeline(steps):
    vae, model = _tiny_kl(), tiny_flux(in_channels=64)
    sched = FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER)
    ref = FluxPipeline(scheduler=sched, vae=vae, transformer=model, text_encoder=None,
                       tokenizer=None, text_encoder_2=None, tokenizer_2=None)  # fmt: skip
    ours = BaseFluxPipeline(model, vae, sched)
    for p in (ref, ours):
        p.set_progress_bar_config(disable=True)
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


@pytest.fixture(scope="module")
def base_folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("diffusers_folders")
    FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER), vae=_tiny_kl(),
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


def test_export_from_a_sana_folder_keeps_its_flow_shift(base_folders, tmp_path):
    from dcgen.train.export import default_scheduler

    sched = default_scheduler("sana", source=base_folders / "sana" / "transformer")
    assert type(sched).__name__ == "FlowMatchEulerDiscreteScheduler"
    assert sched.config.shift == 3.0
    out = tmp_path / "pipe"
    tiny_dcae().save_pretrained(tmp_path / "dcae")
    argv = ["export", "--transformer", str(base_folders / "sana"), "--dcae",
            str(tmp_path / "dcae"), "--out", str(out), "--dtype", "fp32"]  # fmt: skip
    assert main(argv) == 0
    config = json.loads((out / "scheduler" / "scheduler_config.json").read_text())
    assert config["shift"] == 3.0
    assert DCGenSanaPipeline.from_pretrained(out)._shift_for(4, 2) == 3.0
