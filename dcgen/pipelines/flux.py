"""FLUX pipelines: DC-Gen FLUX on a DC-AE, and base FLUX.1 on its f8c16 VAE for comparison."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
from diffusers.loaders import FluxLoraLoaderMixin

from ..autoencoders import DCAE
from ..autoencoders.checkpoint import diffusers_weight_names
from .base import FlowTextToImagePipeline, register_components
from .lora import latent_safe_lora_state_dict

logger = logging.getLogger(__name__)

VAE_FOLDER = "vae"


class DCAEComponentMixin:
    """Saving and loading of a dcgen DCAE as the ``vae`` component.

    DCAE is not a diffusers ModelMixin, so diffusers cannot save or load it by itself. The
    pipeline writes it with ``DCAE.save_pretrained`` into ``vae/`` (a diffusers AutoencoderDC
    folder: ``AutoencoderDC.from_pretrained(path, subfolder="vae")`` also reads it), records
    ``"vae": ["diffusers", "AutoencoderDC"]`` in model_index.json, and ``from_pretrained`` loads
    it back with ``DCAE.from_pretrained`` (pass ``vae=`` to use your own instead).
    """

    _optional_components = ["vae"]

    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs: Any) -> None:
        vae = self.vae
        # Hide the DCAE from diffusers' saver (it would warn and drop it), save it ourselves.
        self.register_modules(vae=None)
        try:
            super().save_pretrained(save_directory, **kwargs)  # type: ignore[misc]
        finally:
            self.register_modules(vae=vae)
        if vae is None:
            return
        vae.save_pretrained(Path(save_directory) / VAE_FOLDER, variant=kwargs.get("variant"))
        register_components(save_directory, {"vae": ["diffusers", "AutoencoderDC"]})

    @classmethod
    def from_pretrained(
        cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs: Any
    ) -> Any:
        vae = kwargs.pop("vae", "load")
        folder = Path(pretrained_model_name_or_path)
        if isinstance(vae, str) and vae == "load":
            vae_dir = folder / VAE_FOLDER
            if not vae_dir.is_dir():
                raise FileNotFoundError(
                    f"{cls.__name__}.from_pretrained: no {VAE_FOLDER}/ folder in {folder}; pass "
                    "vae=DCAE.from_pretrained(...) or vae=None"
                )
            dtype = kwargs.get("dtype", kwargs.get("torch_dtype"))  # diffusers 0.42 renamed it
            if isinstance(dtype, dict):  # per component, as diffusers takes it
                dtype = dtype.get(VAE_FOLDER, dtype.get("default"))
            variant = kwargs.get("variant")
            if variant is not None and not any(
                (vae_dir / name).is_file() for name in diffusers_weight_names(variant)
            ):
                # As diffusers' pipeline loader does: a component without files of the
                # requested variant loads its plain weights.
                variant = None
            vae = DCAE.from_pretrained(
                vae_dir, dtype=dtype if isinstance(dtype, torch.dtype) else None, variant=variant
            )
        # vae=None keeps diffusers from trying to load the component itself.
        pipe = super().from_pretrained(pretrained_model_name_or_path, vae=None, **kwargs)  # type: ignore[misc]
        pipe.register_modules(vae=vae)
        return pipe


def encode_clip_t5(
    tokenizer: Any,
    text_encoder: Any,
    tokenizer_2: Any,
    text_encoder_2: Any,
    prompt: list[str],
    device: torch.device,
    max_sequence_length: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """FLUX.1's prompt encoding, as FluxPipeline does it: the CLIP text model's pooled output
    (its tokenizer's own length, 77) and T5's last hidden state over ``max_sequence_length``
    tokens (padded, no attention mask: FLUX.1 is trained on unmasked T5 outputs)."""
    clip_tok = tokenizer(
        prompt, padding="max_length", max_length=tokenizer.model_max_length,
        truncation=True, return_tensors="pt",
    )  # fmt: skip
    pooled = text_encoder(clip_tok.input_ids.to(device), output_hidden_states=False)
    pooled = pooled.pooler_output
    t5_tok = tokenizer_2(
        prompt, padding="max_length", max_length=max_sequence_length, truncation=True,
        return_tensors="pt",
    )  # fmt: skip
    embeds = text_encoder_2(t5_tok.input_ids.to(device), output_hidden_states=False)[0]
    return embeds, pooled


class _FluxText:
    """FLUX.1 prompt encoding: CLIP pooled output + T5 token embeddings."""

    needs_pooled = True
    #: T5's 512 positions: diffusers' FluxPipeline refuses a longer max_sequence_length too
    sequence_length_bounds = (1, 512)

    def _has_text_encoders(self) -> bool:
        names = ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2")
        return all(getattr(self, n, None) is not None for n in names)

    def encode_prompt(
        self,
        prompt: list[str],
        device: torch.device,
        max_sequence_length: int,
        negative: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        embeds, pooled = encode_clip_t5(
            self.tokenizer, self.text_encoder, self.tokenizer_2, self.text_encoder_2,
            prompt, device, max_sequence_length,
        )  # fmt: skip
        return embeds, pooled, None


class DCGenFluxPipeline(
    DCAEComponentMixin, _FluxText, FluxLoraLoaderMixin, FlowTextToImagePipeline
):
    """FLUX with DC-Gen latent layers on a DC-AE (1x1 patches by default).

    ``DCGenFluxPipeline(transformer, vae=DCAE, scheduler=FlowMatchEulerDiscreteScheduler(...))``;
    text encoders are optional (without them, pass prompt_embeds + pooled_prompt_embeds).
    shift_rule: 'auto' (FLUX mu rule if the scheduler uses dynamic shifting, else its constant
    shift), 'flux', 'sqrt' (the released DC-Gen 1K rule), 'constant', 'none'.
    FLUX.1 LoRAs load with diffusers' ``load_lora_weights`` / ``set_adapters`` / ``fuse_lora``;
    their x_embedder / proj_out entries are skipped (dcgen.pipelines.lora).
    """

    lora_state_dict = latent_safe_lora_state_dict(FluxLoraLoaderMixin, ("x_embedder", "proj_out"))

    _optional_components = [
        "vae", "scheduler", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2"
    ]  # fmt: skip

    def __init__(
        self,
        transformer: FluxTransformer2DModel,
        vae: DCAE | None = None,
        scheduler: FlowMatchEulerDiscreteScheduler | None = None,
        text_encoder: Any = None,
        tokenizer: Any = None,
        text_encoder_2: Any = None,
        tokenizer_2: Any = None,
        shift_rule: str = "auto",
    ) -> None:
        super().__init__()
        if vae is not None and not isinstance(vae, DCAE):
            raise TypeError(f"vae: expected a dcgen DCAE, got {type(vae).__name__}")
        self.register_modules(
            transformer=transformer, vae=vae, scheduler=scheduler, text_encoder=text_encoder,
            tokenizer=tokenizer, text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2,
        )  # fmt: skip
        self._init_common(shift_rule)

    @property
    def ae_factor(self) -> int:
        return self.vae.spatial_compression_ratio if self.vae is not None else 32

    @property
    def ae_latent_channels(self) -> int:
        self._require_vae()
        return self.vae.latent_channels

    def _require_vae(self) -> None:
        if self.vae is None:
            raise ValueError(f"{type(self).__name__} has no vae: set pipe.vae = DCAE(...)")

    def decode_latents(
        self,
        latents: torch.Tensor,
        tile_size: int | None,
        tile_overlap: int,
        band_rows: int | None = None,
    ) -> torch.Tensor:
        self._require_vae()
        z = latents.to(device=self.vae.device, dtype=self.vae.dtype)
        if band_rows is not None:
            return self.vae.decode(z, scaled=True, band_rows=band_rows)  # exact, lean
        if tile_size is None:
            return self.vae.decode(z, scaled=True)
        return self.vae.decode(z, scaled=True, **self._dcae_tiles(tile_size, tile_overlap))

    def _dcae_tiles(self, tile_size: int, tile_overlap: int) -> dict[str, int]:
        """DCAE tiles are multiples of f: the size rounded down, the overlap kept smaller."""
        f = self.vae.spatial_compression_ratio
        size = max(f, tile_size // f * f)
        return {"tile_size": size, "tile_overlap": min(tile_overlap // f * f, size - f)}

    def encode_images(
        self,
        images: torch.Tensor,
        generator: torch.Generator | list[torch.Generator] | None = None,
        tiles: tuple[int, int] | None = None,
        band_rows: int | None = None,
    ) -> torch.Tensor:
        self._require_vae()  # a DC-AE encodes deterministically: the generator is not used
        x = images.to(device=self.vae.device, dtype=self.vae.dtype)
        if band_rows is not None:  # exact: the full-frame latents, bounded memory
            return self.vae.encode(x, scaled=True, band_rows=band_rows)
        if tiles is None:
            return self.vae.encode(x, scaled=True)
        return self.vae.encode(x, scaled=True, **self._dcae_tiles(*tiles))

    def check_components(self) -> None:
        self._require_vae()
        super().check_components()


class BaseFluxPipeline(_FluxText, FluxLoraLoaderMixin, FlowTextToImagePipeline):
    """Base FLUX.1 (2x2 packing of the f8c16 AutoencoderKL latent) under the same call API,
    for side-by-side comparisons with DCGenFluxPipeline (FLUX.1 LoRAs load whole)."""

    encode_draws_noise = True  # the AutoencoderKL posterior is sampled

    _optional_components = [
        "scheduler",
        "text_encoder",
        "tokenizer",
        "text_encoder_2",
        "tokenizer_2",
    ]

    def __init__(
        self,
        transformer: FluxTransformer2DModel,
        vae: AutoencoderKL,
        scheduler: FlowMatchEulerDiscreteScheduler | None = None,
        text_encoder: Any = None,
        tokenizer: Any = None,
        text_encoder_2: Any = None,
        tokenizer_2: Any = None,
        shift_rule: str = "auto",
    ) -> None:
        super().__init__()
        self.register_modules(
            transformer=transformer, vae=vae, scheduler=scheduler, text_encoder=text_encoder,
            tokenizer=tokenizer, text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2,
        )  # fmt: skip
        self._init_common(shift_rule)

    @property
    def ae_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def ae_latent_channels(self) -> int:
        return int(self.vae.config.latent_channels)

    def encode_images(
        self,
        images: torch.Tensor,
        generator: torch.Generator | list[torch.Generator] | None = None,
        tiles: tuple[int, int] | None = None,
        band_rows: int | None = None,
    ) -> torch.Tensor:
        # As FluxImg2ImgPipeline: a posterior sample, image i from generator[i] given a list.
        cfg = self.vae.config
        x = images.to(device=self.vae.device, dtype=self.vae.dtype)
        # AutoencoderKL has no banded encode: bounded memory means its own tiling
        with self._kl_tiling(tiles is not None or band_rows is not None):
            if isinstance(generator, list):
                z = torch.cat([
                    self.vae.encode(x[i : i + 1]).latent_dist.sample(generator[i])
                    for i in range(len(x))
                ])  # fmt: skip
            else:
                z = self.vae.encode(x).latent_dist.sample(generator)
        return (z - (cfg.shift_factor or 0.0)) * cfg.scaling_factor

    def decode_latents(
        self,
        latents: torch.Tensor,
        tile_size: int | None,
        tile_overlap: int,
        band_rows: int | None = None,
    ) -> torch.Tensor:
        # band_rows is a DC-AE option; AutoencoderKL tiles (its own tiling) when asked to.
        cfg = self.vae.config
        z = latents / cfg.scaling_factor + (cfg.shift_factor or 0.0)
        z = z.to(device=self.vae.device, dtype=self.vae.dtype)
        with self._kl_tiling(tile_size is not None):
            return self.vae.decode(z, return_dict=False)[0]

    @contextlib.contextmanager
    def _kl_tiling(self, on: bool) -> Iterator[None]:
        """AutoencoderKL's own tiling (its tile size comes from its config) while ``on``."""
        if not on:
            yield
            return
        was_on = bool(getattr(self.vae, "use_tiling", False))  # the user's own setting stays
        self.vae.enable_tiling()
        try:
            yield
        finally:
            if not was_on:
                self.vae.disable_tiling()
