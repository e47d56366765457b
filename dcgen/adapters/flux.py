"""FLUX.1 (diffusers ``FluxTransformer2DModel``).

Latent-facing layers: ``x_embedder`` Linear(C * p * p -> inner) and ``proj_out``
Linear(inner -> C * p * p). FLUX's transformer sees tokens only; packing is the caller's job:
p x p latent patches flattened channel-major ((C, p, p) per token). Base FLUX.1 uses p = 2 on
the 16-channel VAE latent (64 features); DC-Gen uses p = 1 on DC-AE latents.

The transformer multiplies ``timestep`` and ``guidance`` by 1000 itself, so timestep = sigma in
[0, 1] and guidance = the guidance scale as users write it (3.5), exactly as FluxPipeline does.

The patch size is not a FLUX config field (the stock config says patch_size = 1 and
in_channels = 64 for base FLUX), so dcgen records it under the private config key
``_dcgen_latent_patch_size`` (diffusers keeps ``_``-keys through save / load). Without it,
in_channels == 64 means the base FLUX.1 layout (p = 2) and anything else p = 1.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch
from torch import nn

from .._checks import is_int
from .base import DiTAdapter, LatentLayers, register_adapter
from .structured import StructuredLinear

logger = logging.getLogger(__name__)

PATCH_KEY = "_dcgen_latent_patch_size"
# Private config key: image RoPE positions are (index * scale + (scale - 1) / 2). A DC-Gen model
# whose token covers `scale` x `scale` base tokens can keep the base model's position range, so
# the frozen blocks see a full image instead of the top-left corner of a larger one.
POSITION_SCALE_KEY = "_dcgen_position_scale"
BASE_FLUX_IN_CHANNELS = 64


@register_adapter
class FluxAdapter(DiTAdapter):
    transformer_class_names = ("FluxTransformer2DModel",)
    attention_kwargs_name = "joint_attention_kwargs"

    def __init__(self, transformer: nn.Module, latent_patch_size: int | None = None) -> None:
        super().__init__(transformer)
        if latent_patch_size is not None:
            self._set_patch_size(latent_patch_size)

    # -- facts -----------------------------------------------------------------------------------

    @property
    def patch_size(self) -> int:
        p = self.config.get(PATCH_KEY)
        if p is None:
            # Stock FLUX.1 checkpoints: 2x2 patches of the 16-channel VAE latent.
            p = 2 if self.config.in_channels == BASE_FLUX_IN_CHANNELS else 1
        return int(p)

    def _set_patch_size(self, p: int) -> None:
        if not is_int(p) or p < 1:
            raise ValueError(f"latent_patch_size: expected a positive int, got {p!r}")
        if self.transformer.x_embedder.in_features % (p * p):
            raise ValueError(
                f"x_embedder has {self.transformer.x_embedder.in_features} input features, not a "
                f"multiple of patch area {p * p}"
            )
        self.transformer.register_to_config(**{PATCH_KEY: int(p)})

    @property
    def position_scale(self) -> float:
        """Spacing of image RoPE positions on the token grid (1.0: stock FLUX)."""
        return float(self.config.get(POSITION_SCALE_KEY) or 1.0)

    def set_position_scale(self, scale: float) -> None:
        """Space image positions ``scale`` apart, centred on the base tokens each new token
        covers: token i gets position i * scale + (scale - 1) / 2 (e.g. 0.5, 2.5, ... for 2).
        Stored in the transformer config, so save_pretrained / from_pretrained keep it."""
        scale = float(scale)
        if not math.isfinite(scale) or scale <= 0:
            raise ValueError(f"position scale: expected a positive finite number, got {scale}")
        self.transformer.register_to_config(**{POSITION_SCALE_KEY: scale})

    @property
    def latent_channels(self) -> int:
        return self.transformer.x_embedder.in_features // (self.patch_size**2)

    @property
    def has_guidance_embeds(self) -> bool:
        return bool(self.config.guidance_embeds)

    def latent_layers(self) -> LatentLayers:
        return LatentLayers(self.transformer.x_embedder, self.transformer.proj_out)

    def blocks(self) -> list[nn.Module]:
        t = self.transformer
        return list(t.transformer_blocks) + list(t.single_transformer_blocks)

    def _image_hidden_states(self, block_output: Any) -> torch.Tensor:
        # Both block kinds return (encoder_hidden_states, hidden_states).
        return block_output[1]

    def token_ids(
        self, latent_height: int, latent_width: int, device: torch.device | str | None = None
    ) -> torch.Tensor:
        """Image position ids on the token grid (latent size / patch size)."""
        p = self.patch_size
        ids = self.image_ids(latent_height // p, latent_width // p, device=device)
        scale = self.position_scale
        if scale != 1.0:
            ids[:, 1:] = ids[:, 1:] * scale + (scale - 1.0) / 2.0
        return ids

    # -- layer replacement -------------------------------------------------------------------

    def _install_latent_layers(
        self, old: LatentLayers, latent_channels: int, patch_size: int
    ) -> None:
        t = self.transformer
        features = latent_channels * patch_size * patch_size
        t.x_embedder = self._new_linear(old.embedder, features, self.inner_dim)
        t.proj_out = self._new_linear(old.head, self.inner_dim, features)
        # FLUX builds proj_out as Linear(inner, patch_size^2 * out_channels); keep its own
        # patch_size at 1 (packing lives outside the model) so the shapes rebuild on load.
        # New layers are a new token grid: positions start on it (unscaled) until a caller
        # spaces them again (stage 1's align_positions="base", a latent-layers file).
        t.register_to_config(
            in_channels=features,
            out_channels=features,
            patch_size=1,
            **{PATCH_KEY: patch_size, POSITION_SCALE_KEY: None},
        )
        t.out_channels = features
        logger.info(
            "FLUX latent layers replaced: %d-channel latents, %dx%d patches (%d features)",
            latent_channels,
            patch_size,
            patch_size,
            features,
        )

    def enable_structured_latents(self) -> None:
        t = self.transformer
        c, area = self.latent_channels, self.patch_size**2
        self._check_structurable(x_embedder=t.x_embedder, proj_out=t.proj_out)
        if not isinstance(t.x_embedder, StructuredLinear):
            t.x_embedder = StructuredLinear.from_linear(t.x_embedder, c, area, "in", True)
        if not isinstance(t.proj_out, StructuredLinear):
            t.proj_out = StructuredLinear.from_linear(t.proj_out, c, area, "out", True)

    # -- calls ----------------------------------------------------------------------------------

    def embed_tokens(self, latents: torch.Tensor) -> torch.Tensor:
        latents = self.check_latents(latents)
        return self.transformer.x_embedder(self.pack(latents))

    def predict(
        self,
        latents: torch.Tensor,
        sigma: torch.Tensor,
        prompt_embeds: torch.Tensor,
        pooled_prompt_embeds: torch.Tensor | None = None,
        guidance: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        joint_attention_kwargs: dict[str, Any] | None = None,
    ) -> torch.Tensor:
        """Velocity for (B, C, H, W) latents. ``guidance`` (B,) is the guidance scale (e.g. 3.5),
        required iff the model has guidance embeddings. ``attention_mask`` (B, text_tokens),
        1 = keep, masks text tokens in the joint attention (stock FLUX.1 uses none)."""
        latents = self.check_latents(latents)
        b, c, h, w = latents.shape
        if pooled_prompt_embeds is None:
            raise ValueError("FLUX needs pooled_prompt_embeds (the CLIP pooled text embedding)")
        if self.has_guidance_embeds and guidance is None:
            raise ValueError(
                "this FLUX transformer has guidance embeddings (guidance-distilled): pass "
                "guidance, e.g. torch.full((B,), 3.5)"
            )
        if not self.has_guidance_embeds and guidance is not None:
            raise ValueError(
                "this FLUX transformer has no guidance embeddings; use true CFG instead of guidance"
            )
        cfg = self.transformer.config
        self.check_text(prompt_embeds, attention_mask, b, int(cfg.joint_attention_dim),
                        pooled_prompt_embeds, int(cfg.pooled_projection_dim))  # fmt: skip
        sigma = self._check_sigma(sigma, b, latents)
        # not x_embedder.weight.dtype: a quantized embedder's is uint8 / float8 (the tokens
        # were cast to it, and the quantized layer refused them)
        dtype = self._compute_dtype(self.transformer.x_embedder)
        tokens = self.pack(latents).to(dtype)
        img_ids = self.token_ids(h, w, device=latents.device)
        txt_ids = torch.zeros(prompt_embeds.shape[1], 3, device=latents.device)
        kwargs = dict(joint_attention_kwargs or {})
        if attention_mask is not None:
            # Joint sequence is [text, image]; image tokens always attend.
            image_keep = attention_mask.new_ones(b, tokens.shape[1])
            joint = torch.cat([attention_mask, image_keep], dim=1).bool()
            kwargs["attention_mask"] = joint[:, None, None, :]
        head = self.transformer.proj_out
        if isinstance(head, StructuredLinear):
            head.active_channels = c
        try:
            out = self._model_to_call()(
                hidden_states=tokens,
                encoder_hidden_states=prompt_embeds.to(dtype),
                pooled_projections=pooled_prompt_embeds.to(dtype),
                timestep=sigma.to(dtype),  # FLUX multiplies by 1000 internally
                img_ids=img_ids,
                txt_ids=txt_ids,
                guidance=None
                if guidance is None
                else self._check_sigma(guidance, b, latents, "guidance").to(dtype),
                joint_attention_kwargs=kwargs or None,
                return_dict=False,
            )[0]
        finally:
            if isinstance(head, StructuredLinear):
                head.active_channels = None
        return self.unpack(out, h, w)
