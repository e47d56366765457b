"""Shared text-to-image flow-matching pipeline over an adapter (diffusers DiffusionPipeline).

What the subclasses decide: the autoencoder (DC-AE or the base VAE), how prompts become
embeddings, and the default shift rule. Everything else is here: input checks, initial noise,
the sampling loop with guidance embedding and true CFG, decoding (tiled above a size threshold),
post-processing and the output object.

Sampling uses dcgen.sampling (our shift rules, Euler and DPM-Solver++), not ``scheduler.step``:
the registered scheduler supplies the shift parameters from its config (FLUX: use_dynamic_shifting
with base/max shift and sequence lengths; SANA: a constant ``shift`` or ``flow_shift``) and, by its
class, the default solver: Euler for a FlowMatchEulerDiscreteScheduler, DPM-Solver++ 2M for the
DPMSolverMultistepScheduler SANA folders ship (dcgen.sampling.dpm follows its grid, its integer
model timesteps and its order schedule). Stock scheduler folders load and keep meaning the same
thing, while the sampling math stays ours.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
import torch
from diffusers import DiffusionPipeline
from diffusers.image_processor import VaeImageProcessor
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor

from .._checks import is_int, is_real
from .._files import atomic_write
from ..adapters import DiTAdapter, adapter_for
from ..adapters.provenance import dcae_factor_mismatch
from ..sampling import SHIFT_RULES, flow_sigmas, resolve_shift, sample_euler
from ..sampling.dpm import DPMSettings, dpm_flow_sigmas, dpm_settings_from_config, sample_dpm_solver
from ..sampling.flow import check_custom_sigmas, check_flow_euler_config, strength_start
from .lora import text_encoder_lora_scale

logger = logging.getLogger(__name__)

#: the guidance-embedding value FLUX.1-dev samples with (diffusers' FluxPipeline default)
DEFAULT_GUIDANCE_SCALE = 3.5

#: image-to-image strength when none is given: diffusers' FluxImg2ImgPipeline's default
DEFAULT_STRENGTH = 0.6

OUTPUT_TYPES = ("pil", "np", "pt", "latent")
#: "auto": the registered scheduler's kind (DPM-Solver++ for a DPMSolverMultistepScheduler,
#: Euler otherwise); "euler" / "dpm" force one.
SAMPLERS = ("auto", "euler", "dpm")
#: scheduler classes whose sampling is dcgen's Euler loop (they supply only the shift)
EULER_SCHEDULERS = ("FlowMatchEulerDiscreteScheduler",)


@dataclass
class DCGenPipelineOutput(BaseOutput):
    """``images``: list of PIL images, a (B, H, W, 3) numpy array in [0, 1], a (B, 3, H, W)
    tensor in [0, 1], or the final latents (B, C, h, w) in the DiT's (scaled) space."""

    images: list[PIL.Image.Image] | np.ndarray | torch.Tensor


class FlowTextToImagePipeline(DiffusionPipeline):
    """Base class; use DCGenFluxPipeline, DCGenSanaPipeline or BaseFluxPipeline."""

    model_cpu_offload_seq = "text_encoder->text_encoder_2->transformer->vae"
    #: default shift rule when ``shift_rule="auto"``
    default_shift_rule = "flux"
    #: the constant shift of a pipeline built without a scheduler (FLUX's rule does not use it)
    default_flow_shift = 1.0
    #: whether encode_images samples from the generator (a KL VAE's posterior; a DC-AE
    #: encodes deterministically)
    encode_draws_noise = False

    # -- set-up -------------------------------------------------------------------------------

    def _init_common(self, shift_rule: str) -> None:
        if shift_rule != "auto" and shift_rule not in SHIFT_RULES:
            raise ValueError(
                f"shift_rule: expected 'auto' or one of {SHIFT_RULES}, got {shift_rule!r}"
            )
        self.register_to_config(shift_rule=shift_rule)
        # Only postprocess() is used (denormalise, convert), which ignores the scale factor.
        self.image_processor = VaeImageProcessor(vae_scale_factor=1)

    @property
    def adapter(self) -> DiTAdapter:
        # Built on demand: the transformer may be swapped (pipe.transformer = ...).
        cached = getattr(self, "_adapter", None)
        if cached is None or cached.transformer is not self.transformer:
            cached = adapter_for(self.transformer)
            self._adapter = cached
        return cached

    @property
    def ae_factor(self) -> int:
        """Pixels per latent cell."""
        raise NotImplementedError

    @property
    def spatial_factor(self) -> int:
        """Pixels per token side: AE factor x patch size (height/width must be multiples)."""
        return self.ae_factor * self.adapter.patch_size

    @property
    def ae_latent_channels(self) -> int:
        raise NotImplementedError

    def decode_latents(
        self,
        latents: torch.Tensor,
        tile_size: int | None,
        tile_overlap: int,
        band_rows: int | None = None,
    ) -> torch.Tensor:
        """Scaled latents -> images in about [-1, 1]. ``band_rows`` (DC-AE only): the exact
        banded decode (dcgen.autoencoders.banding), which then replaces tiling."""
        raise NotImplementedError

    def _decode_finite(
        self,
        latents: torch.Tensor,
        tile_size: int | None,
        tile_overlap: int,
        band_rows: int | None,
    ) -> torch.Tensor:
        """decode_latents, as fp32 images, never an image of NaN / Inf written as a black
        picture: an fp16 autoencoder whose activations overflow (fp16 tops out at 65,504; a
        DC-AE's GLU products pass that) decodes again in fp32, as diffusers' ``force_upcast``
        does for such VAEs, and this pipeline then decodes in fp32 straight away; non-finite
        latents, or pixels from an fp32 / bf16 decode, raise. The latents are only looked at
        when the pixels are not finite (non-finite latents never decode to finite pixels): one
        finiteness pass per call, not two."""
        vae_dtype = self.vae.dtype
        upcast = vae_dtype == torch.float16 and getattr(self, "_fp16_vae_overflows", False)
        if not upcast:
            decoded = self.decode_latents(latents, tile_size, tile_overlap, band_rows).float()
            if torch.isfinite(decoded).all():
                return decoded
            self._check_finite_latents(latents)
            if vae_dtype != torch.float16:
                raise FloatingPointError(
                    f"the autoencoder ({type(self.vae).__name__}, {vae_dtype}) decoded finite "
                    "latents to non-finite pixels; expected finite images"
                )
            logger.warning(
                "%s overflowed in float16 (non-finite pixels); decoding again in float32, and "
                "in float32 from now on",
                type(self.vae).__name__,
            )
            self._fp16_vae_overflows = True
        self.vae.to(torch.float32)
        try:
            decoded = self.decode_latents(latents, tile_size, tile_overlap, band_rows).float()
        finally:
            self.vae.to(vae_dtype)
        if not torch.isfinite(decoded).all():
            self._check_finite_latents(latents)
            raise FloatingPointError(
                f"the autoencoder ({type(self.vae).__name__}) decoded finite latents to "
                "non-finite pixels, in float16 and again in float32; expected finite images"
            )
        return decoded

    def _check_finite_latents(self, latents: torch.Tensor) -> None:
        if not torch.isfinite(latents).all():
            raise FloatingPointError(
                "sampling produced non-finite latents (NaN / Inf) with the transformer in "
                f"{self.transformer.dtype}; expected finite values: run it in bfloat16 or "
                "float32"
            )

    def encode_images(
        self,
        images: torch.Tensor,
        generator: torch.Generator | list[torch.Generator] | None = None,
        tiles: tuple[int, int] | None = None,
        band_rows: int | None = None,
    ) -> torch.Tensor:
        """Images (B, 3, H, W) in [-1, 1] -> latents in the DiT's (scaled) space, with bounded
        memory when asked: ``band_rows`` (a DC-AE's exact banded encode) or ``tiles``
        (tile_size, tile_overlap)."""
        raise NotImplementedError

    def encode_prompt(
        self,
        prompt: list[str],
        device: torch.device,
        max_sequence_length: int,
        negative: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """(prompt_embeds, pooled_prompt_embeds, attention_mask) for text prompts; ``negative``:
        they are negative prompts (SANA encodes those without its instruction prefix)."""
        raise NotImplementedError

    def _has_text_encoders(self) -> bool:
        raise NotImplementedError

    # -- checks -----------------------------------------------------------------------------------

    def check_components(self) -> None:
        c_model, c_ae = self.adapter.latent_channels, self.ae_latent_channels
        if c_model != c_ae:
            raise ValueError(
                f"the transformer expects {c_model}-channel latents but the autoencoder "
                f"({type(self.vae).__name__}) has {c_ae} latent channels; adapt the transformer "
                f"with adapter.replace_latent_layers({c_ae}) or use the matching autoencoder"
            )
        if getattr(self, "vae", None) is not None:  # same channels, another grid (an f64c32
            # DC-AE beside an f32c32 model) sampled silently on the wrong token grid
            named = f"the autoencoder ({type(self.vae).__name__})"
            mismatch = dcae_factor_mismatch(self.transformer, self.ae_factor, named)
            if mismatch:
                raise ValueError(mismatch)

    def check_size(self, height: int, width: int) -> None:
        f = self.spatial_factor
        for name, value in (("height", height), ("width", width)):
            if not is_int(value) or value <= 0 or value % f:
                raise ValueError(
                    f"{name} must be a positive multiple of {f} (autoencoder factor "
                    f"{self.ae_factor} x patch size {self.adapter.patch_size}), got {value!r}"
                )

    # -- the call ------------------------------------------------------------------------------

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        negative_prompt: str | list[str] | None = None,
        *,
        height: int = 1024,
        width: int = 1024,
        num_inference_steps: int = 20,
        guidance_scale: float | None = None,
        true_cfg_scale: float | None = None,
        num_images_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        image: Any = None,
        strength: float | None = None,
        mask_image: Any = None,
        mask_blur: float | None = None,
        prompt_embeds: torch.Tensor | None = None,
        pooled_prompt_embeds: torch.Tensor | None = None,
        prompt_attention_mask: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        negative_pooled_prompt_embeds: torch.Tensor | None = None,
        negative_prompt_attention_mask: torch.Tensor | None = None,
        shift: float | None = None,
        sigmas: Sequence[float] | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        max_sequence_length: int | None = None,
        tile_threshold: int | None = 2048,
        tile_size: int = 1024,
        tile_overlap: int = 128,
        band_rows: int | None = 512,
        sampler: str = "auto",
        joint_attention_kwargs: dict[str, Any] | None = None,
        attention_kwargs: dict[str, Any] | None = None,
        callback_on_step_end: Callable[[Any, int, torch.Tensor, dict], dict] | None = None,
        callback_on_step_end_tensor_inputs: list[str] | None = None,
    ) -> DCGenPipelineOutput | tuple[Any]:
        """Generate images.

        Prompts come as text (needs the pipeline's text encoders) or as embeddings
        (``prompt_embeds`` (B, T, D), plus ``pooled_prompt_embeds`` (B, D') for FLUX).
        guidance_scale feeds the guidance embedding of guidance-distilled models (None: 3.5, as
        FluxPipeline; a value given to a model without one is not used, with a warning);
        true_cfg_scale > 1 runs classifier-free guidance against the negative prompt
        (text or embeddings), doubling the cost; None = the model's default (SANA without
        guidance embeddings: 4.5 as diffusers' SanaPipeline, when a negative prompt can be had;
        otherwise 1). ``max_sequence_length``: the text tokens a prompt encodes to (FLUX's T5:
        1 to 512, default 512, as FluxPipeline; SANA's Gemma: at least 2, default 300; the toy
        encoder: unset, it has its own length); a value outside raises a ValueError.
        ``shift`` overrides the config's shift rule. ``sigmas``: custom unshifted
        sigmas, one per step (decreasing, in (0, 1]), shifted and ended with 0 as diffusers'
        FluxPipeline does with its ``sigmas=``; they set the step count (Euler sampler only).
        ``sampler``: one of SAMPLERS. ``image`` (PIL image(s), arrays or (B, 3, H, W) tensors in
        [0, 1]; resized to height x width) turns the call into image-to-image as diffusers'
        FluxImg2ImgPipeline: the schedule's first int(steps - steps x ``strength``) steps are
        skipped (``strength`` None: 0.6, FluxImg2ImgPipeline's; given without ``image``: an
        error), the image's latents noised to the first sigma left, the rest sampled (either
        sampler; ``latents`` is then the noise mixed in). One image for every prompt, one
        per prompt or one per output image. ``mask_image`` (with ``image``; white = repaint)
        inpaints as diffusers' FluxInpaintPipeline: the mask is binarized and resized (nearest)
        to the latent grid, and after every step the kept region is reset to the image's
        latents noised to the next sigma (the clean latents after the last). A DC-AE's latent
        cell is 32 or 64 pixels wide, so that mask is coarse and the kept cells come back through
        the autoencoder; ``mask_blur`` (pixels, >= 0) composites in pixel space instead: every
        latent cell the mask touches is repainted, and the decoded image is blended with the input
        image through the full-resolution mask feathered by a Gaussian of that standard deviation
        (cut at 3 sigma; 0 = a hard edge), so pixels farther than that from the mask are the input
        image's own.
        ``joint_attention_kwargs`` (FLUX's name) or ``attention_kwargs`` (SANA's; either works
        for both) go to the transformer; ``{"scale": s}`` scales unfused LoRAs, their
        text-encoder layers too while the prompts encode (as diffusers' pipelines do).
        ``callback_on_step_end(pipe, i, t, {"latents": x})`` runs after each step, as in
        diffusers (t: the step's timestep, sigma x 1000; x: (B, C, h, w) float32 latents in the
        DiT's space); a "latents" entry in the dict it returns replaces them, and setting
        ``pipe._interrupt = True`` there ends the sampling after that step (diffusers' way).
        Images whose larger side exceeds ``tile_threshold`` pixels decode with bounded memory:
        a DC-AE in bands of ``band_rows`` output rows (the same image as a full-frame decode),
        or, with ``band_rows=None``, tile by tile with blended overlaps of ``tile_size`` /
        ``tile_overlap`` (approximate); the base FLUX VAE always tiles, with AutoencoderKL's own
        tiling and tile sizes (``tile_size`` / ``tile_overlap`` do not apply to it). An
        image-to-image input encodes the same way (a DC-AE: the full-frame latents, band by
        band).
        """
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type: expected one of {OUTPUT_TYPES}, got {output_type!r}")
        max_sequence_length = self.resolve_max_sequence_length(max_sequence_length)
        if not is_int(num_inference_steps) or num_inference_steps < 1:
            raise ValueError(
                f"num_inference_steps: expected a positive int, got {num_inference_steps!r}"
            )
        if not is_int(num_images_per_prompt) or num_images_per_prompt < 1:
            raise ValueError(
                f"num_images_per_prompt: expected a positive int, got {num_images_per_prompt!r}"
            )
        # numpy integers work, as diffusers' pipelines take them
        num_inference_steps, num_images_per_prompt = (
            int(num_inference_steps),
            int(num_images_per_prompt),
        )
        dpm = self.dpm_settings(sampler)  # None: Euler
        if sigmas is not None:
            if dpm is not None:
                chosen = (
                    "sampler='dpm' selects"
                    if sampler == "dpm"
                    else "this pipeline's scheduler selects"
                )
                raise ValueError(
                    f"sigmas: custom sigmas need the Euler sampler; {chosen} DPM-Solver++ (pass "
                    "sampler='euler')"
                )
            num_inference_steps = len(check_custom_sigmas(sigmas))
        if strength is not None and image is None:
            # it was dropped silently: the call sampled text-to-image as if it were not there
            raise ValueError(
                "strength: sets how much of an image-to-image input is repainted; pass image=... "
                "with it, or leave strength unset for text-to-image"
            )
        if strength is None:
            strength = DEFAULT_STRENGTH
        skip = strength_start(num_inference_steps, strength) if image is not None else 0
        if mask_image is not None and image is None:
            raise ValueError("mask_image: inpainting needs the image to inpaint (image=...)")
        _check_mask_blur(mask_blur, mask_image, output_type)
        _check_scalars(guidance_scale, true_cfg_scale, latents, tile_threshold, tile_size,
                       tile_overlap, band_rows)  # fmt: skip
        if joint_attention_kwargs is not None and attention_kwargs is not None:
            raise ValueError("pass joint_attention_kwargs or attention_kwargs, not both")
        attn_kwargs = joint_attention_kwargs if attention_kwargs is None else attention_kwargs
        callback_inputs = _callback_inputs(callback_on_step_end_tensor_inputs)
        self.check_components()
        self.check_size(height, width)
        height, width = int(height), int(width)
        device = self._execution_device
        adapter = self.adapter

        # the strength of an unfused LoRA: the transformer's and its text-encoder part's
        lora_scale = None if attn_kwargs is None else attn_kwargs.get("scale")
        cond = self._embeddings(
            prompt, prompt_embeds, pooled_prompt_embeds, prompt_attention_mask, device,
            max_sequence_length, "prompt", lora_scale,
        )  # fmt: skip
        batch = cond[0].shape[0]
        if true_cfg_scale is None:
            true_cfg_scale = self._default_true_cfg(negative_prompt, negative_prompt_embeds)
        do_cfg = true_cfg_scale > 1.0
        uncond = None
        if do_cfg:
            if negative_prompt_embeds is None and negative_prompt is None:
                if not self._has_text_encoders():
                    raise ValueError(
                        "true_cfg_scale > 1 needs a negative prompt: pass "
                        "negative_prompt_embeds (this pipeline has no text encoders)"
                    )
                negative_prompt = ""
            if isinstance(negative_prompt, str):
                negative_prompt = [negative_prompt] * batch
            uncond = self._embeddings(
                negative_prompt, negative_prompt_embeds, negative_pooled_prompt_embeds,
                negative_prompt_attention_mask, device, max_sequence_length, "negative_prompt",
                lora_scale,
            )  # fmt: skip
            if uncond[0].shape[0] != batch:
                raise ValueError(
                    f"negative prompt batch {uncond[0].shape[0]} != prompt batch {batch}"
                )
        n = num_images_per_prompt
        cond = _repeat(cond, n)
        uncond = _repeat(uncond, n) if uncond is not None else None
        total = batch * n
        if isinstance(generator, list) and len(generator) != total:
            raise ValueError(
                f"generator: a list of {len(generator)} generators for {total} image(s) "
                f"({batch} prompt(s) x {n} per prompt); pass one generator or a list of {total}"
            )

        h, w = height // self.ae_factor, width // self.ae_factor
        c = adapter.latent_channels
        model_dtype = next(self.transformer.parameters()).dtype
        use_tiles = tile_threshold is not None and max(height, width) > tile_threshold
        image_latents = pixels = None
        if image is not None:  # encoded first: a VAE posterior sample draws from the generator
            pixels = self._image_pixels(image, height, width, batch, n)
            encoded = pixels
            if isinstance(generator, list) and self.encode_draws_noise:
                # One row per output, so output i's posterior sample comes from generator[i],
                # as when it is sampled alone: with one shared image, generator[0] alone drew
                # it and every other output's noise moved (`--batch-size` changed the images).
                encoded = _per_output(pixels, batch, n)
            image_latents = self.encode_images(
                encoded.to(device), generator,
                (tile_size, tile_overlap) if use_tiles else None,
                band_rows if use_tiles else None,
            ).to(device, torch.float32)  # fmt: skip
            image_latents = _per_output(image_latents, batch, n)
        if latents is None:
            noise = randn_tensor(
                (total, c, h, w), generator=generator, device=device, dtype=torch.float32
            )
        else:
            if tuple(latents.shape) != (total, c, h, w):
                raise ValueError(
                    f"latents: expected shape {(total, c, h, w)}, got {tuple(latents.shape)}"
                )
            noise = latents.to(device=device, dtype=torch.float32)

        if shift is None:
            shift = self._shift_for(adapter.num_tokens(h, w), c)
        if dpm is None:
            if sigmas is None:
                sigmas = self._euler_grid(num_inference_steps)
            schedule = flow_sigmas(num_inference_steps, shift, device=device, base=sigmas)
            model_sigmas = None
        else:
            schedule, model_sigmas = dpm_flow_sigmas(
                num_inference_steps, shift, dpm.train_timesteps, device, dpm.integer_timesteps
            )
        start = noise
        if image_latents is not None:  # start at step `skip`: DPM-Solver++ then has no history
            schedule = schedule[skip:]
            model_sigmas = None if model_sigmas is None else model_sigmas[skip:]
            start = schedule[0] * noise + (1 - schedule[0]) * image_latents
        keep = None  # inpainting: where the image's own latents are put back after each step
        pixel_mask = None  # mask_blur: the full-resolution mask(s) (1 = repaint), for the composite
        if mask_image is not None:
            pixel_mask = self._pixel_mask(mask_image, height, width, batch, n)
            cells = _latent_cells(pixel_mask, (h, w), cover=mask_blur is not None)
            keep = 1 - _per_output(cells, batch, n).to(device)
            pixel_mask = None if mask_blur is None else pixel_mask
        logger.info(
            "sampling %d image(s) at %dx%d: %d tokens, shift %.4g, %d %s steps",
            total, height, width, adapter.num_tokens(h, w), shift, len(schedule) - 1,
            "Euler" if dpm is None else "DPM-Solver++",
        )  # fmt: skip

        guidance = None
        if getattr(adapter, "has_guidance_embeds", False):
            if guidance_scale is None:  # FLUX.1-dev's value, FluxPipeline's default
                guidance_scale = DEFAULT_GUIDANCE_SCALE
            guidance = torch.full((total,), float(guidance_scale), device=device)
        elif guidance_scale is not None:
            # None, not 3.5, means "not given": a passed 3.5 (FLUX's default) was unused unsaid
            # diffusers' SanaPipeline calls its CFG scale guidance_scale: say where it went
            logger.warning(
                "guidance_scale=%g is not used: this transformer has no guidance embedding; "
                "classifier-free guidance is true_cfg_scale (now %g)",
                guidance_scale,
                true_cfg_scale,
            )

        # what diffusers' pipelines expose to callbacks (pipe.num_timesteps, ...), set before
        # the loop as there: num_timesteps = the denoising steps this call runs
        self._num_timesteps = len(schedule) - 1
        self._guidance_scale = None if guidance is None else float(guidance_scale)
        self._do_classifier_free_guidance = do_cfg
        self._attention_kwargs = attn_kwargs
        extra = {} if attn_kwargs is None else {adapter.attention_kwargs_name: attn_kwargs}
        # CFG's two predictions as one batch [negative, positive] where the embeddings stack
        both = _stacked(uncond, cond) if uncond is not None and self.cfg_in_one_batch else None
        both_guidance = None if guidance is None else torch.cat([guidance, guidance])

        def velocity(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
            x = x.to(model_dtype)
            if both is not None:
                v_neg, v = adapter.predict(
                    torch.cat([x, x]), torch.cat([sigma, sigma]), both[0], both[1],
                    guidance=both_guidance, attention_mask=both[2], **extra,
                ).chunk(2)  # fmt: skip
            else:
                v = adapter.predict(
                    x, sigma, cond[0], cond[1], guidance=guidance, attention_mask=cond[2], **extra
                )
                if uncond is None:
                    return v.float()
                v_neg = adapter.predict(
                    x, sigma, uncond[0], uncond[1], guidance=guidance, attention_mask=uncond[2],
                    **extra,
                )  # fmt: skip
            return v_neg.float() + true_cfg_scale * (v.float() - v_neg.float())

        model_t = schedule[:-1] if model_sigmas is None else model_sigmas
        timesteps = model_t * 1000.0  # each step's model timestep, as callbacks see it

        with self.progress_bar(total=len(schedule) - 1) as bar:

            def on_step(i: int, x: torch.Tensor) -> torch.Tensor | None:
                bar.update()
                if keep is not None:
                    # the kept region at this step's end: noised to the next sigma, or clean
                    s = schedule[i + 1]
                    known = (
                        s * noise + (1 - s) * image_latents
                        if i < len(schedule) - 2
                        else image_latents
                    )
                    x = keep * known + (1 - keep) * x
                if callback_on_step_end is None:
                    self._current_timestep = timesteps[i + 1] if i + 1 < len(timesteps) else None
                    return x if keep is not None else None
                given = {"latents": x} if callback_inputs else {}
                returned = callback_on_step_end(self, i, timesteps[i], given) or {}
                # the callback saw step i's; the next model call runs at step i + 1's
                self._current_timestep = timesteps[i + 1] if i + 1 < len(timesteps) else None
                x = returned.get("latents", x)
                if self._interrupt:  # set by the callback: stop here, keep these latents
                    raise _Interrupted(x)
                return x

            self._interrupt = False
            self._current_timestep = timesteps[0]
            try:
                if dpm is None:
                    out = sample_euler(velocity, start, schedule, on_step=on_step)
                else:
                    out = sample_dpm_solver(
                        velocity, start, schedule, model_sigmas, dpm, on_step=on_step
                    )
            except _Interrupted as stop:
                out = stop.latents.float()
            finally:
                self._current_timestep = None  # as FluxPipeline after its loop

        if output_type == "latent":
            images: Any = out
        else:
            decoded = self._decode_finite(
                out, tile_size if use_tiles else None, tile_overlap,
                band_rows if use_tiles else None,
            )  # fmt: skip
            if pixel_mask is not None:
                decoded = _composite(decoded, pixels, pixel_mask, mask_blur, batch, n)
            images = self.image_processor.postprocess(decoded, output_type=output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (images,)
        return DCGenPipelineOutput(images=images)

    # -- helpers --------------------------------------------------------------------------------

    def dpm_settings(self, sampler: str = "auto") -> DPMSettings | None:
        """The DPM-Solver++ settings ``sampler`` asks for, or None for Euler steps. "auto" follows
        the registered scheduler: a DPMSolverMultistepScheduler (SANA folders) gives DPM-Solver++
        with its order and solver type, or a ValueError if its config asks for something dcgen's
        solver does not implement; anything else (or no scheduler) gives Euler."""
        if sampler not in SAMPLERS:
            raise ValueError(f"sampler: expected one of {SAMPLERS}, got {sampler!r}")
        if sampler == "euler":
            return None
        sched = getattr(self, "scheduler", None)
        kind = type(sched).__name__
        is_dpm = kind == "DPMSolverMultistepScheduler"
        if sampler == "auto" and not is_dpm:
            if sched is not None and kind not in EULER_SCHEDULERS:
                # e.g. SANA-Sprint's SCMScheduler: its own few-step rule, which dcgen lacks
                logger.warning(
                    "scheduler %s: dcgen samples with Euler or DPM-Solver++ only; using Euler "
                    "steps at its shift (pass sampler='euler' or 'dpm' to choose)", kind,
                )  # fmt: skip
            return None
        if is_dpm:
            return dpm_settings_from_config(sched.config)
        # forced on an Euler scheduler's model (FLUX): the model keeps its float timesteps
        cfg = sched.config if sched is not None else {}
        steps = int(cfg.get("num_train_timesteps", 1000) or 1000)
        return DPMSettings(train_timesteps=steps, integer_timesteps=False)

    _interrupt = False
    _num_timesteps: int | None = None
    _guidance_scale: float | None = None
    _current_timestep: torch.Tensor | None = None
    _do_classifier_free_guidance = False
    _attention_kwargs: dict[str, Any] | None = None

    # diffusers' FluxPipeline / SanaPipeline properties, which callbacks read (e.g.
    # ``if i == int(pipe.num_timesteps * 0.5)``); each holds the latest call's value (None
    # before the first call)

    @property
    def num_timesteps(self) -> int | None:
        """The denoising steps of the call (after image-to-image's skipped ones)."""
        return self._num_timesteps

    @property
    def guidance_scale(self) -> float | None:
        """The guidance-embedding value the call samples with; None for a model without a
        guidance embedding (its classifier-free guidance scale is true_cfg_scale)."""
        return self._guidance_scale

    @property
    def current_timestep(self) -> torch.Tensor | None:
        """The model timestep (sigma x 1000) of the step being sampled; None outside the loop."""
        return self._current_timestep

    @property
    def do_classifier_free_guidance(self) -> bool:
        """Whether the call runs classifier-free guidance (true_cfg_scale > 1)."""
        return self._do_classifier_free_guidance

    @property
    def attention_kwargs(self) -> dict[str, Any] | None:
        """The call's attention_kwargs / joint_attention_kwargs (either name)."""
        return self._attention_kwargs

    @property
    def joint_attention_kwargs(self) -> dict[str, Any] | None:
        """FLUX's name for :attr:`attention_kwargs`."""
        return self._attention_kwargs

    @property
    def interrupt(self) -> bool:
        """diffusers' early stop: a callback_on_step_end that sets ``pipe._interrupt = True``
        ends the sampling after that step; the latents so far are decoded."""
        return self._interrupt

    #: classifier-free guidance when true_cfg_scale is None (SANA: 4.5)
    default_true_cfg_scale = 1.0
    #: CFG's negative and positive predictions in one transformer call of twice the batch (as
    #: diffusers' pipelines do: larger GEMMs, half the launches) when their embeddings have the
    #: same shapes; False: two calls (half the activation memory)
    cfg_in_one_batch = True

    @classmethod
    def model_cfg_scale(cls, transformer_config: Any) -> float:
        """The CFG scale this class samples a transformer of ``transformer_config`` (its
        config, or a config.json's dict) with by default: ``default_true_cfg_scale``, or 1
        (none) for a guidance-distilled one (guidance embeddings). The one rule: the CLI reads
        it from a folder's config.json before the model loads."""
        if transformer_config.get("guidance_embeds", False):
            return 1.0
        return float(cls.default_true_cfg_scale)

    def _default_true_cfg(self, negative_prompt: Any, negative_prompt_embeds: Any) -> float:
        """true_cfg_scale=None: the class default where the model samples with CFG (no guidance
        embedding) and a negative prompt can be had (given, or "" through text encoders)."""
        cfg = self.model_cfg_scale(self.transformer.config)
        if cfg <= 1.0:
            return 1.0
        has_negative = negative_prompt is not None or negative_prompt_embeds is not None
        if not has_negative and not self._has_text_encoders():
            logger.warning(
                "true_cfg_scale: this model samples with classifier-free guidance %g by default, "
                "which needs a negative prompt; without text encoders or negative_prompt_embeds "
                "it runs without guidance (true_cfg_scale=1)", cfg,
            )  # fmt: skip
            return 1.0
        return cfg

    def _euler_grid(self, num_steps: int) -> torch.Tensor | None:
        """The unshifted Euler grid without ``sigmas=``: None for FluxPipeline's
        linspace(1, 1/N) (it passes its scheduler those sigmas); a pipeline whose diffusers
        counterpart lets the scheduler choose returns that choice."""
        return None

    def _shift_for(self, num_tokens: int, latent_channels: int) -> float:
        rule = self.config.shift_rule
        sched = getattr(self, "scheduler", None)
        cfg = sched.config if sched is not None else {}
        if type(sched).__name__ in EULER_SCHEDULERS:
            check_flow_euler_config(cfg)
        if rule == "auto":
            rule = self.default_shift_rule
            if rule == "flux" and sched is not None and not cfg.get("use_dynamic_shifting", False):
                rule = "constant"
            elif rule == "constant" and cfg.get("use_dynamic_shifting", False):
                # SanaPipeline refuses this config (it passes the scheduler no mu); dcgen keeps
                # the model's fixed shift, and says so
                logger.warning(
                    "scheduler config use_dynamic_shifting=True: %s samples at the fixed shift "
                    "%g (the config's shift / flow_shift), not a resolution-dependent one",
                    type(self).__name__, scheduler_constant_shift(cfg),
                )  # fmt: skip
        constant = scheduler_constant_shift(cfg) if sched is not None else self.default_flow_shift
        return resolve_shift(
            rule,
            num_tokens,
            latent_channels,
            constant=constant,
            # a missing (or null) value takes FLUX.1's default; a 0 stays 0, as in diffusers
            base_tokens=int(_setting(cfg, "base_image_seq_len", 256)),
            max_tokens=int(_setting(cfg, "max_image_seq_len", 4096)),
            base_shift=float(_setting(cfg, "base_shift", 0.5)),
            max_shift=float(_setting(cfg, "max_shift", 1.15)),
        )

    def _image_pixels(
        self, image: Any, height: int, width: int, batch: int, n: int
    ) -> torch.Tensor:
        """The image-to-image input(s) as float32 (k, 3, height, width) in [-1, 1] on the CPU,
        k = 1, batch or batch * n (checked)."""
        pixels = self.image_processor.preprocess(image, height=height, width=width)
        _check_per_output(pixels.shape[0], batch, n, "image", "images")
        return pixels.float()

    def _pixel_mask(
        self, mask_image: Any, height: int, width: int, batch: int, n: int
    ) -> torch.Tensor:
        """The inpainting mask(s) as float32 (k, 1, height, width), 1 = repaint, k = 1, batch or
        batch * n (checked): the mask image(s) to grayscale, binarized at 0.5, as
        FluxInpaintPipeline makes it."""
        processor = VaeImageProcessor(
            vae_scale_factor=1, do_normalize=False, do_binarize=True, do_convert_grayscale=True
        )
        mask = processor.preprocess(mask_image, height=height, width=width)
        _check_per_output(mask.shape[0], batch, n, "mask_image", "masks")
        empty = [i for i in range(mask.shape[0]) if not mask[i].any()]
        if empty:  # the output would be the input image: say so (an RGBA mask's alpha is not read)
            logger.warning(
                "mask_image %s selects no pixel to repaint (white = repaint, read as grayscale; "
                "an alpha channel is ignored): those outputs keep the input image",
                empty,
            )
        return mask.float()

    def _embeddings(
        self,
        prompt: str | list[str] | None,
        embeds: torch.Tensor | None,
        pooled: torch.Tensor | None,
        mask: torch.Tensor | None,
        device: torch.device,
        max_sequence_length: int,
        what: str,
        lora_scale: float | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        if embeds is not None:
            if prompt is not None:
                raise ValueError(f"pass either {what} or {what}_embeds, not both")
            if embeds.ndim != 3:
                raise ValueError(
                    f"{what}_embeds: expected (batch, tokens, dim), got {tuple(embeds.shape)}"
                )
            if self.needs_pooled and pooled is None:
                raise ValueError(
                    f"{what}_embeds given without pooled_{what}_embeds"
                    if what == "prompt"
                    else "negative_prompt_embeds given without negative_pooled_prompt_embeds"
                )
            _check_companions(what, embeds, pooled, mask)
            return (
                embeds.to(device),
                None if pooled is None else pooled.to(device),
                None if mask is None else mask.to(device),
            )
        if prompt is None:
            raise ValueError(
                f"no {what}: pass {what} (text) or {what}_embeds"
                + (" and pooled embeddings" if self.needs_pooled else "")
            )
        if not self._has_text_encoders():
            raise ValueError(
                f"{what} was given as text but this pipeline has no text encoders/tokenizers; "
                f"pass {what}_embeds instead (or build the pipeline with its text encoders)"
            )
        prompts = [prompt] if isinstance(prompt, str) else prompt
        if (
            not isinstance(prompts, list | tuple)
            or not prompts
            or not all(isinstance(p, str) for p in prompts)
        ):
            raise ValueError(
                f"{what}: expected a string or a non-empty list of strings, got {prompt!r}"
            )
        # A LoRA's text-encoder layers at the call's scale, as diffusers' FluxPipeline /
        # SanaPipeline encode_prompt scale them: {"scale": 0} kept the LoRA's full text part.
        encoders = [getattr(self, name, None) for name in ("text_encoder", "text_encoder_2")]
        with text_encoder_lora_scale(encoders, lora_scale):
            return self.encode_prompt(
                list(prompts), device, max_sequence_length, negative=what == "negative_prompt"
            )

    needs_pooled = False
    #: text tokens when max_sequence_length is None: FLUX.1's T5 512, SANA's Gemma 300
    default_max_sequence_length = 512
    #: the max_sequence_length values the text encoding can honour, (lowest, highest or None);
    #: outside them 0 failed as a reshape deep in the transformer and -3 as an OverflowError
    sequence_length_bounds: tuple[int, int | None] = (1, None)

    def resolve_max_sequence_length(self, max_sequence_length: Any) -> int:
        """``max_sequence_length`` checked against ``sequence_length_bounds`` (a ValueError
        naming the expected range), or the pipeline's default for None."""
        if max_sequence_length is None:
            return self.default_max_sequence_length
        low, high = self.sequence_length_bounds
        if not is_int(max_sequence_length) or not (
            low <= max_sequence_length and (high is None or max_sequence_length <= high)
        ):
            expected = f"an int >= {low}" if high is None else f"an int in [{low}, {high}]"
            raise ValueError(
                f"max_sequence_length: expected {expected} for {type(self).__name__}, got "
                f"{max_sequence_length!r}"
            )
        return int(max_sequence_length)  # a numpy integer too, as num_inference_steps


def register_components(folder: str | os.PathLike, entries: dict[str, list[str]]) -> None:
    """Record components a pipeline saved itself (``name -> [library, class]``) in the
    folder's model_index.json, replaced atomically: a killed save never leaves a torn index."""
    index_path = Path(folder) / "model_index.json"
    index = json.loads(index_path.read_text())
    index.update(entries)
    text = json.dumps(index, indent=2, sort_keys=True) + "\n"
    atomic_write(index_path, lambda tmp: Path(tmp).write_text(text))


def _check_companions(
    what: str, embeds: torch.Tensor, pooled: torch.Tensor | None, mask: torch.Tensor | None
) -> None:
    """The pooled embedding and the text mask belong to ``embeds`` row for row (and the mask
    token for token): a mismatch broadcast silently or failed deep inside the transformer."""
    negative = "negative_" if what == "negative_prompt" else ""
    batch, tokens = embeds.shape[:2]
    if pooled is not None and (pooled.ndim != 2 or pooled.shape[0] != batch):
        raise ValueError(
            f"{negative}pooled_prompt_embeds: expected ({batch}, dim) for {what}_embeds of "
            f"shape {tuple(embeds.shape)}, got {tuple(pooled.shape)}"
        )
    if mask is not None and tuple(mask.shape) != (batch, tokens):
        raise ValueError(
            f"{negative}prompt_attention_mask: expected shape {(batch, tokens)} for "
            f"{what}_embeds of shape {tuple(embeds.shape)}, got {tuple(mask.shape)}"
        )


def _setting(cfg: Any, key: str, default: float) -> Any:
    """A scheduler config value, ``default`` only when it is missing or None."""
    value = cfg.get(key)
    return default if value is None else value


def _check_scalars(
    guidance_scale: Any,
    true_cfg_scale: Any,
    latents: Any,
    tile_threshold: Any,
    tile_size: Any,
    tile_overlap: Any,
    band_rows: Any,
) -> None:
    """The call's number and tensor options, before any model runs: None, a string or an
    array failed deep inside sampling (a bare TypeError / AttributeError), and a negative
    tile size was taken."""

    def real(value: Any) -> bool:
        return is_real(value) and math.isfinite(value)

    if guidance_scale is not None and not real(guidance_scale):
        raise ValueError(
            f"guidance_scale: expected a finite number or None, got {guidance_scale!r}"
        )
    if true_cfg_scale is not None and not real(true_cfg_scale):
        raise ValueError(
            f"true_cfg_scale: expected a finite number or None, got {true_cfg_scale!r}"
        )
    if latents is not None and not isinstance(latents, torch.Tensor):
        raise TypeError(f"latents: expected a torch.Tensor or None, got {type(latents).__name__}")
    for name, value in (("tile_threshold", tile_threshold), ("band_rows", band_rows)):
        if value is not None and (not is_int(value) or value < 1):
            raise ValueError(f"{name}: expected a positive int or None, got {value!r}")
    if not is_int(tile_size) or tile_size < 1:
        raise ValueError(f"tile_size: expected a positive int, got {tile_size!r}")
    if not is_int(tile_overlap) or not 0 <= tile_overlap < tile_size:
        raise ValueError(
            f"tile_overlap: expected an int in [0, tile_size={tile_size}), got {tile_overlap!r}"
        )


#: the largest mask_blur (pixels): wider Gaussians (cut at 3 sigma) only add taps, a 1e9 one
#: allocated 24 GB of them after the whole sampling had run
MAX_MASK_BLUR = 16384.0


def _check_mask_blur(mask_blur: float | None, mask_image: Any, output_type: str) -> None:
    if mask_blur is None:
        return
    if mask_image is None:
        raise ValueError("mask_blur: feathers the inpainting mask; pass mask_image (and image)")
    if not is_real(mask_blur) or not 0 <= mask_blur <= MAX_MASK_BLUR:  # NaN and inf too
        raise ValueError(
            f"mask_blur: expected a number of pixels in [0, {MAX_MASK_BLUR:g}], got {mask_blur!r}"
        )
    if output_type == "latent":
        raise ValueError(
            "mask_blur: blends decoded images with the input image; output_type='latent' has "
            "none (leave mask_blur=None for the latent-grid inpainting alone)"
        )


def _latent_cells(mask: torch.Tensor, grid: tuple[int, int], cover: bool) -> torch.Tensor:
    """The pixel mask on the latent grid: nearest resize (FluxInpaintPipeline's cells), or with
    ``cover`` every cell that holds any masked pixel (the pixel composite repaints those)."""
    if cover:
        return torch.nn.functional.adaptive_max_pool2d(mask, grid)
    return torch.nn.functional.interpolate(mask, size=grid)


def _feathered(mask: torch.Tensor, sigma: float) -> torch.Tensor:
    """``mask`` (B, 1, H, W) blurred by a Gaussian of standard deviation ``sigma`` pixels, cut at
    3 sigma (so the blend weight is exactly 0 beyond that) and normalised; the borders are
    extended, so a mask that touches the frame stays 1 there."""
    radius = math.ceil(3 * sigma)
    if radius == 0:
        return mask
    x = torch.arange(-radius, radius + 1, dtype=torch.float32, device=mask.device)
    taps = torch.exp(-0.5 * (x / sigma) ** 2)
    taps = taps / taps.sum()
    # two 1-D passes; edge padding, not zeros, so the frame does not fade the mask
    out = torch.nn.functional.pad(mask, (radius, radius, 0, 0), mode="replicate")
    out = torch.nn.functional.conv2d(out, taps.view(1, 1, 1, -1))
    out = torch.nn.functional.pad(out, (0, 0, radius, radius), mode="replicate")
    out = torch.nn.functional.conv2d(out, taps.view(1, 1, -1, 1))
    return out.clamp_(0.0, 1.0)


def _composite(
    decoded: torch.Tensor,
    pixels: torch.Tensor,
    masks: torch.Tensor,
    sigma: float,
    batch: int,
    n: int,
) -> torch.Tensor:
    """The decoded images (batch * n) where the feathered mask is 1, the input images where it
    is 0 (both in [-1, 1]); ``pixels`` and ``masks`` as given (1, batch or batch * n rows).
    One image at a time (a 4K mask's blur is 16M pixels), each mask feathered once: the
    outputs that share it are adjacent (prompt-major)."""
    out = torch.empty_like(decoded)
    feathered: tuple[int, torch.Tensor] | None = None  # (mask row, its feathered weight)
    for i in range(decoded.shape[0]):
        row = _source_row(i, masks.shape[0], batch, n)
        if feathered is None or feathered[0] != row:
            feathered = (row, _feathered(masks[row : row + 1].to(decoded.device), sigma))
        src = _source_row(i, pixels.shape[0], batch, n)
        picture = pixels[src : src + 1].to(decoded.device)
        out[i : i + 1] = torch.lerp(picture, decoded[i : i + 1], feathered[1])
    return out


def _check_per_output(k: int, batch: int, n: int, what: str, items: str) -> None:
    """An image-to-image input comes once for every prompt, once per prompt or per output."""
    if k not in (1, batch, batch * n):
        raise ValueError(
            f"{what}: {k} {items} for {batch} prompt(s) x {n} image(s) per prompt; expected "
            f"1, {batch} or {batch * n}"
        )


def _source_row(i: int, k: int, batch: int, n: int) -> int:
    """The row of a k-row input (1, batch or batch * n) that output ``i`` takes: the rule
    _per_output applies to whole tensors."""
    return 0 if k == 1 else i // n if k == batch else i


def _per_output(t: torch.Tensor, batch: int, n: int) -> torch.Tensor:
    """``t`` (1, batch or batch * n rows) as one row per output image, prompt-major."""
    if t.shape[0] == 1:
        return t.expand(batch * n, *t.shape[1:])
    return t.repeat_interleave(n, dim=0) if t.shape[0] == batch and n > 1 else t


class _Interrupted(Exception):
    """Raised out of the sampler by the step hook when the callback set ``_interrupt``."""

    def __init__(self, latents: torch.Tensor) -> None:
        super().__init__("sampling interrupted by callback_on_step_end")
        self.latents = latents


def _stacked(
    first: tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None],
    second: tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None],
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None] | None:
    """Two (embeds, pooled, mask) triples as one batch, or None where they do not stack (text
    lengths differ, or one has a pooled embedding or a mask and the other not)."""
    out = []
    for a, b in zip(first, second, strict=True):
        if (a is None) != (b is None) or (a is not None and a.shape[1:] != b.shape[1:]):
            return None
        if a is None:
            out.append(None)
            continue
        # the wider of the two dtypes: neither half rounded (the two-call path rounds neither)
        dtype = torch.promote_types(a.dtype, b.dtype)
        out.append(torch.cat([a.to(dtype), b.to(dtype)]))
    return tuple(out)  # type: ignore[return-value]


def _callback_inputs(names: list[str] | None) -> list[str]:
    """callback_on_step_end_tensor_inputs, checked: the latents are the one tensor offered."""
    names = ["latents"] if names is None else list(names)
    if set(names) - {"latents"}:
        raise ValueError(
            f"callback_on_step_end_tensor_inputs: expected a subset of ['latents'], got {names}"
        )
    return names


def scheduler_constant_shift(config: Any) -> float:
    """The constant flow shift a scheduler config holds: ``shift`` (FlowMatchEulerDiscrete
    Scheduler) or ``flow_shift`` (DPMSolverMultistepScheduler with flow sigmas, what diffusers'
    SANA conversion writes into SANA pipeline folders); 1.0 when neither is set. dcgen samples
    with its own Euler steps and takes only this number from the scheduler."""
    shift, flow_shift = config.get("shift"), config.get("flow_shift")
    if shift is not None and float(shift) != 1.0:
        return float(shift)
    return 1.0 if flow_shift is None else float(flow_shift)


def _repeat(
    embeds: tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None], n: int
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    if n == 1:
        return embeds
    return tuple(None if t is None else t.repeat_interleave(n, dim=0) for t in embeds)  # type: ignore[return-value]
