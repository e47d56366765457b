"""image= / strength= on the DC-AE pipelines (image-to-image, as diffusers' FluxImg2ImgPipeline;
the base FLUX pipeline's parity with it is in test_diffusers_folders.py): the start latents,
the steps run, batching of the input images, and the errors."""

from __future__ import annotations

import math

import numpy as np
import PIL.Image
import pytest
import torch

from dcgen.sampling import flow_sigmas

from ..adapters.tiny import text
from .test_pipelines import dcgen_flux


@pytest.fixture(scope="module")
def pipe():
    return dcgen_flux()


def _first_inputs(pipe, monkeypatch) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Every (x, sigma) the transformer is called with, recorded."""
    calls: list[tuple[torch.Tensor, torch.Tensor]] = []
    predict = type(pipe.adapter).predict

    def spy(self, x, sigma, *args, **kwargs):
        calls.append((x.detach().clone(), sigma.detach().clone()))
        return predict(self, x, sigma, *args, **kwargs)

    monkeypatch.setattr(type(pipe.adapter), "predict", spy)
    return calls


def _image(batch: int = 1, seed: int = 0) -> torch.Tensor:
    return torch.rand(batch, 3, 64, 96, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize(
    ("steps", "strength", "kept"), [(10, 0.3, 3), (4, 0.6, 3), (5, 1.0, 5), (20, 0.01, 1)]
)
def test_start_latents_and_steps_follow_the_strength(pipe, monkeypatch, steps, strength, kept):
    calls = _first_inputs(pipe, monkeypatch)
    embeds, pooled = text(1)
    noise = torch.randn(1, 2, 2, 3, generator=torch.Generator().manual_seed(3))
    image = _image()
    pipe(prompt_embeds=embeds, pooled_prompt_embeds=pooled, image=image, strength=strength,
         latents=noise, height=64, width=96, num_inference_steps=steps, output_type="latent")  # fmt: skip
    assert len(calls) == kept  # steps - int(steps - steps x strength): diffusers' count
    full = flow_sigmas(steps, pipe._shift_for(6, 2))
    sigma0 = full[steps - kept]
    assert torch.allclose(calls[0][1], sigma0.expand(1))
    z = pipe.vae.encode(image * 2 - 1, scaled=True)  # the image in [-1, 1], as preprocess gives
    torch.testing.assert_close(calls[0][0], sigma0 * noise + (1 - sigma0) * z, rtol=0, atol=1e-6)


def test_strength_one_is_text_to_image(pipe):
    """At strength 1 the first sigma is 1: the image's weight is 0, the run is text-to-image."""
    embeds, pooled = text(1)
    kw = dict(prompt_embeds=embeds, pooled_prompt_embeds=pooled, height=64, width=96,
              num_inference_steps=3, output_type="latent")  # fmt: skip
    plain = pipe(generator=torch.Generator().manual_seed(5), **kw).images
    img2img = pipe(generator=torch.Generator().manual_seed(5), image=_image(), strength=1.0, **kw)
    torch.testing.assert_close(img2img.images, plain, rtol=0, atol=1e-6)
    lower = pipe(generator=torch.Generator().manual_seed(5), image=_image(), strength=0.5, **kw)
    assert (lower.images - plain).abs().max() > 1e-3


def test_input_images_pair_with_prompts(pipe, monkeypatch):
    """One image per prompt, repeated for that prompt's images; one for all; one per output."""
    calls = _first_inputs(pipe, monkeypatch)
    embeds, pooled = text(2)
    zeros = torch.zeros(4, 2, 2, 3)  # no noise: the start latents are the scaled image latents
    kw = dict(prompt_embeds=embeds, pooled_prompt_embeds=pooled, latents=zeros, strength=0.5,
              height=64, width=96, num_inference_steps=2, num_images_per_prompt=2,
              output_type="latent")  # fmt: skip
    pipe(image=_image(2), **kw)
    x = calls[0][0]
    assert torch.equal(x[0], x[1]) and torch.equal(x[2], x[3]) and not torch.equal(x[0], x[2])
    calls.clear()
    pipe(image=_image(1), **kw)
    assert all(torch.equal(calls[0][0][0], calls[0][0][i]) for i in range(4))
    calls.clear()
    pipe(image=_image(4), **kw)
    assert len({calls[0][0][i].sum().item() for i in range(4)}) == 4
    with pytest.raises(ValueError, match="3 images for 2 prompt"):
        pipe(image=_image(3), **kw)


@pytest.mark.parametrize(
    ("strength", "match"),
    [(0.0, r"in \(0, 1\]"), (1.5, r"in \(0, 1\]"), ("high", "a number"), (True, "a number"),
     (1e-17, "leaves no step")],
)  # fmt: skip
def test_bad_strengths_are_named(pipe, strength, match):
    embeds, pooled = text(1)
    with pytest.raises(ValueError, match=match):
        pipe(prompt_embeds=embeds, pooled_prompt_embeds=pooled, image=_image(), strength=strength,
             height=64, width=96, num_inference_steps=10)  # fmt: skip


def test_image_to_image_under_dpm_solver_starts_late_on_the_same_grid(monkeypatch):
    """SANA folders sample with DPM-Solver++: image-to-image skips the same steps on its grid,
    the model first sees the integer timestep of the first kept step (the solver's own late start is checked against diffusers' scheduler in
    tests/sampling/test_dpm.py)."""
    from diffusers import DPMSolverMultistepScheduler

    from dcgen.sampling.dpm import dpm_flow_sigmas

    pipe = dcgen_flux()
    pipe.scheduler = DPMSolverMultistepScheduler(use_flow_sigmas=True, flow_shift=3.0,
                                                 prediction_type="flow_prediction")  # fmt: skip
    calls = _first_inputs(pipe, monkeypatch)
    embeds, pooled = text(1)
    noise = torch.randn(1, 2, 2, 3, generator=torch.Generator().manual_seed(8))
    image = _image()
    kw = dict(prompt_embeds=embeds, pooled_prompt_embeds=pooled, latents=noise, height=64,
              width=96, num_inference_steps=10, output_type="latent")  # fmt: skip
    pipe(image=image, strength=0.45, **kw)  # skips int(10 - 4.5) = 5 steps
    assert len(calls) == 5
    sigmas, model_sigmas = dpm_flow_sigmas(10, 3.0)
    assert torch.allclose(calls[0][1], model_sigmas[5].expand(1))
    z = pipe.vae.encode(image * 2 - 1, scaled=True)
    s0 = sigmas[5]
    torch.testing.assert_close(calls[0][0], s0 * noise + (1 - s0) * z, rtol=0, atol=1e-6)
    # strength 1 runs every step from the grid's top, 1 - 1/1000: a trace of the image stays
    calls.clear()
    pipe(image=image, strength=1.0, **kw)
    assert len(calls) == 10
    top = sigmas[0]
    torch.testing.assert_close(calls[0][0], top * noise + (1 - top) * z, rtol=0, atol=1e-6)


def test_large_images_encode_in_exact_bands(pipe, monkeypatch):
    """Above tile_threshold the DC-AE encodes the input image in row bands (band_rows), which
    gives the full-frame latents; band_rows=None falls back to blended tiles."""
    embeds, pooled = text(1)
    kw = dict(prompt_embeds=embeds, pooled_prompt_embeds=pooled, image=_image(), strength=0.5,
              height=64, width=96, num_inference_steps=2, output_type="latent")  # fmt: skip
    seen: list[dict] = []
    encode = type(pipe.vae).encode

    def spy(self, x, **kwargs):
        seen.append(kwargs)
        return encode(self, x, **kwargs)

    monkeypatch.setattr(type(pipe.vae), "encode", spy)
    full = pipe(generator=torch.Generator().manual_seed(1), tile_threshold=None, **kw).images
    banded = pipe(generator=torch.Generator().manual_seed(1), tile_threshold=32, band_rows=16,
                  **kw).images  # fmt: skip
    tiled = pipe(generator=torch.Generator().manual_seed(1), tile_threshold=32, band_rows=None,
                 tile_size=64, tile_overlap=32, **kw).images  # fmt: skip
    assert "band_rows" not in seen[0] and seen[1]["band_rows"] == 16 and "tile_size" in seen[2]
    torch.testing.assert_close(banded, full, rtol=1e-5, atol=1e-5)
    assert torch.isfinite(tiled).all()


@pytest.mark.parametrize("sampler", ["euler", "dpm"])
def test_inpainting_keeps_the_unmasked_latents(pipe, sampler):
    """mask_image (white = repaint): after the last step the kept latent cells are the image's
    own latents; the masked ones are sampled (FluxInpaintPipeline's parity on base FLUX is in
    test_diffusers_folders.py)."""
    embeds, pooled = text(1)
    image = _image()
    mask = torch.zeros(1, 1, 64, 96)
    mask[..., :, 64:] = 1.0  # the right third: the last latent column of the 2 x 3 grid
    out = pipe(prompt_embeds=embeds, pooled_prompt_embeds=pooled, image=image, mask_image=mask,
               strength=0.8, height=64, width=96, num_inference_steps=4, sampler=sampler,
               output_type="latent", generator=torch.Generator().manual_seed(2)).images  # fmt: skip
    z = pipe.vae.encode(image * 2 - 1, scaled=True)
    torch.testing.assert_close(out[..., :2], z[..., :2], rtol=0, atol=1e-6)
    assert (out[..., 2] - z[..., 2]).abs().max() > 1e-3


def test_inpainting_errors_are_named(pipe):
    embeds, pooled = text(2)
    kw = dict(prompt_embeds=embeds, pooled_prompt_embeds=pooled, height=64, width=96,
              num_inference_steps=2, output_type="latent")  # fmt: skip
    mask = torch.ones(3, 1, 64, 96)
    with pytest.raises(ValueError, match="mask_image: inpainting needs the image"):
        pipe(mask_image=mask[:1], **kw)
    with pytest.raises(ValueError, match="3 masks for 2 prompt"):
        pipe(image=_image(), mask_image=mask, **kw)


def _distance_from(mask: torch.Tensor) -> torch.Tensor:
    """Each pixel's Chebyshev distance (in pixels) to the nearest masked pixel of (H, W)."""
    ys, xs = torch.nonzero(mask, as_tuple=True)
    h, w = mask.shape
    yy = torch.arange(h).view(h, 1, 1) - ys.view(1, 1, -1)
    xx = torch.arange(w).view(1, w, 1) - xs.view(1, 1, -1)
    return torch.maximum(yy.abs(), xx.abs()).amin(dim=-1)


@pytest.mark.parametrize("blur", [0.0, 2.0])
def test_mask_blur_repaints_every_touched_cell_and_keeps_the_pixels_beyond(pipe, monkeypatch, blur):
    """A mask smaller than one 32-pixel latent cell, off the cell's corner: the nearest resize
    (diffusers' cells) misses it, mask_blur repaints that cell, and every pixel farther than
    3 sigma from the mask is the input image's own, byte for byte, after the composite."""
    seen: list[torch.Tensor] = []
    decode = type(pipe).decode_latents

    def spy(self, latents, *args, **kwargs):
        seen.append(latents.detach().clone())
        return decode(self, latents, *args, **kwargs)

    monkeypatch.setattr(type(pipe), "decode_latents", spy)
    embeds, pooled = text(1)
    rng = np.random.default_rng(4)
    image = PIL.Image.fromarray(rng.integers(0, 256, (64, 96, 3), dtype=np.uint8))
    mask = torch.zeros(64, 96)
    mask[10:20, 70:80] = 1.0  # inside latent cell (0, 2), away from its top-left pixel
    kw = dict(prompt_embeds=embeds, pooled_prompt_embeds=pooled, image=image,
              mask_image=mask.view(1, 1, 64, 96), strength=0.9, height=64, width=96,
              num_inference_steps=3, generator=torch.Generator().manual_seed(5))  # fmt: skip
    out = np.asarray(pipe(mask_blur=blur, **kw).images[0]).astype(np.int16)
    z = pipe.vae.encode(torch.from_numpy(np.array(image)).permute(2, 0, 1)[None] / 127.5 - 1,
                        scaled=True)  # fmt: skip
    cells = (seen[0] - z).abs().amax(dim=1)[0]  # (2, 3): which cells were sampled
    assert cells[0, 2] > 1e-3
    assert cells[[0, 1, 1, 1, 0], [0, 0, 1, 2, 1]].max() < 1e-5
    far = (_distance_from(mask) > math.ceil(3 * blur)).numpy()
    np.testing.assert_array_equal(out[far], np.asarray(image)[far])
    inside = mask.bool().numpy()
    assert np.abs(out[inside] - np.asarray(image)[inside]).mean() > 2  # generated there
    pipe(**kw)  # without mask_blur: the nearest cells, none of which holds a masked pixel
    torch.testing.assert_close(seen[-1], z, rtol=0, atol=1e-5)


def test_feathered_mask_is_normalised_and_cut_at_three_sigma():
    from dcgen.pipelines.base import _feathered

    mask = torch.zeros(1, 1, 40, 50)
    mask[..., 15:25, 20:30] = 1.0
    soft = _feathered(mask, 1.5)
    far = _distance_from(mask[0, 0]) > 5  # ceil(3 x 1.5)
    assert (soft[0, 0][far] == 0).all() and (soft[0, 0][~far] > 0).all()
    torch.testing.assert_close(soft.sum(), mask.sum(), rtol=1e-5, atol=0)  # mass conserved
    torch.testing.assert_close(soft, soft.flip(-1).flip(-2))  # the box is centred: symmetric
    assert soft[0, 0, 20, 25] > 0.99
    half = torch.zeros(1, 1, 8, 30)
    half[..., 15:] = 1.0  # a straight edge: the two pixels beside it share the weight
    soft = _feathered(half, 2.0)
    torch.testing.assert_close(soft[..., 14] + soft[..., 15], torch.ones(1, 1, 8))
    ones = torch.ones(1, 1, 12, 12)  # the frame's edge does not fade a full mask
    torch.testing.assert_close(_feathered(ones, 3.0), ones)
    assert torch.equal(_feathered(mask, 0.0), mask)


def test_mask_blur_errors_are_named(pipe):
    embeds, pooled = text(1)
    kw = dict(prompt_embeds=embeds, pooled_prompt_embeds=pooled, height=64, width=96,
              num_inference_steps=2, image=_image())  # fmt: skip
    mask = torch.ones(1, 1, 64, 96)
    with pytest.raises(ValueError, match="mask_blur: feathers the inpainting mask"):
        pipe(mask_blur=2.0, **kw)
    # 1e9 allocated 24 GB of Gaussian taps after the whole sampling had run
    for bad in (-1.0, float("nan"), float("inf"), 1e9, "3", True):
        with pytest.raises(
            ValueError, match=r"mask_blur: expected a number of pixels in \[0, 16384\]"
        ):
            pipe(mask_image=mask, mask_blur=bad, **kw)
    with pytest.raises(ValueError, match="output_type='latent' has none"):
        pipe(mask_image=mask, mask_blur=1.0, output_type="latent", **kw)


def test_a_mask_that_selects_nothing_is_named(pipe, caplog):
    # an all-black mask (or an RGBA one whose region is only in its alpha) repainted nothing:
    # the input image back, silently
    embeds, pooled = text(1)
    kw = dict(prompt_embeds=embeds, pooled_prompt_embeds=pooled, height=64, width=96,
              num_inference_steps=1, image=_image(), output_type="latent")  # fmt: skip
    with caplog.at_level("WARNING", logger="dcgen.pipelines.base"):
        pipe(mask_image=torch.ones(1, 1, 64, 96), **kw)
        assert "selects no pixel" not in caplog.text
        rgba = PIL.Image.new("RGBA", (96, 64), (0, 0, 0, 255))
        pipe(mask_image=rgba, **kw)
    assert "mask_image [0] selects no pixel to repaint" in caplog.text
