"""SANA (diffusers ``SanaTransformer2DModel``).

Latent-facing layers: ``patch_embed.proj`` Conv2d(C -> inner, kernel = stride = p) and
``proj_out`` Linear(inner -> p * p * C). SANA takes spatial (B, C, H, W) latents and patchifies
inside, so ``predict`` passes latents as they are; ``pack`` / ``unpack`` exist for token-level
work (alignment) and follow the conv's (C, p, p) feature order. The head emits (p, p, C) per
token (the model unpatchifies that itself): ``pack_velocity`` packs a velocity in that order.

Timesteps: SANA's embedding expects [0, 1000] (times ``timestep_scale``, as SanaPipeline does);
``predict`` converts sigma in [0, 1]. Guidance-embedding variants (SANA-Sprint) take
``guidance * guidance_embeds_scale``. SANA-Sprint's TrigFlow parametrisation is not covered.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from .base import DiTAdapter, LatentLayers, register_adapter
from .structured import StructuredConv2d, StructuredLinear

logger = logging.getLogger(__name__)


@register_adapter
class SanaAdapter(DiTAdapter):
    transformer_class_names = ("SanaTransformer2DModel",)

    @property
    def patch_size(self) -> int:
        return int(self.config.patch_size)

    @property
    def latent_channels(self) -> int:
        return int(self.transformer.patch_embed.proj.in_channels)

    @property
    def has_guidance_embeds(self) -> bool:
        return bool(self.config.get("guidance_embeds", False))

    def latent_layers(self) -> LatentLayers:
        return LatentLayers(self.transformer.patch_embed.proj, self.transformer.proj_out)

    def blocks(self) -> list[nn.Module]:
        return list(self.transformer.transformer_blocks)

    def _image_hidden_states(self, block_output: Any) -> torch.Tensor:
        return block_output

    def _install_latent_layers(
        self, old: LatentLayers, latent_channels: int, patch_size: int
    ) -> None:
        t = self.transformer
        ref = old.embedder.weight
        embed = t.patch_embed
        embed.proj = nn.Conv2d(
            latent_channels,
            self.inner_dim,
            kernel_size=patch_size,
            stride=patch_size,
            bias=old.embedder.bias is not None,
            device=ref.device,
            dtype=ref.dtype,
        )
        t.proj_out = self._new_linear(
            old.head, self.inner_dim, patch_size * patch_size * latent_channels
        )
        # PatchEmbed keeps its own patch size and grid (used only with sincos positions).
        embed.patch_size = patch_size
        embed.height = embed.width = embed.base_size = t.config.sample_size // patch_size
        if embed.pos_embed is not None:
            # its table is for the old grid, and diffusers recomputes it only for inputs of
            # another grid: rebuilt for the new one, as PatchEmbed builds it (and as a
            # save / load round trip would)
            from diffusers.models.embeddings import get_2d_sincos_pos_embed

            table = get_2d_sincos_pos_embed(
                self.inner_dim, embed.height, base_size=embed.base_size,
                interpolation_scale=embed.interpolation_scale, output_type="pt",
            )  # fmt: skip
            persistent = "pos_embed" not in embed._non_persistent_buffers_set
            embed.register_buffer(
                "pos_embed",
                table.float().unsqueeze(0).to(embed.pos_embed.device),
                persistent=persistent,
            )
        t.register_to_config(
            in_channels=latent_channels, out_channels=latent_channels, patch_size=patch_size
        )
        logger.info(
            "SANA latent layers replaced: %d-channel latents, %dx%d patches",
            latent_channels,
            patch_size,
            patch_size,
        )

    def enable_structured_latents(self) -> None:
        t = self.transformer
        self._check_structurable(**{"patch_embed.proj": t.patch_embed.proj, "proj_out": t.proj_out})
        if not isinstance(t.patch_embed.proj, StructuredConv2d):
            t.patch_embed.proj = StructuredConv2d.from_conv(t.patch_embed.proj)
        if not isinstance(t.proj_out, StructuredLinear):
            c, area = self.latent_channels, self.patch_size**2
            # The head's features are (p, p, C): channel-minor.
            t.proj_out = StructuredLinear.from_linear(t.proj_out, c, area, "out", False)

    def pack_velocity(self, velocity: torch.Tensor) -> torch.Tensor:
        """Tokens in the head's (p, p, C) feature order, the order the model unpatchifies."""
        b, c, h, w = velocity.shape
        p = self.patch_size
        tokens = velocity.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 3, 5, 1)
        return tokens.reshape(b, (h // p) * (w // p), p * p * c)

    def embed_tokens(self, latents: torch.Tensor) -> torch.Tensor:
        """The conv patch embedding as tokens (B, tokens, inner), before any sincos positions."""
        latents = self.check_latents(latents)
        proj = self.transformer.patch_embed.proj
        return proj(latents.to(proj.weight.dtype)).flatten(2).transpose(1, 2)

    def predict(
        self,
        latents: torch.Tensor,
        sigma: torch.Tensor,
        prompt_embeds: torch.Tensor,
        pooled_prompt_embeds: torch.Tensor | None = None,
        guidance: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        attention_kwargs: dict[str, Any] | None = None,
    ) -> torch.Tensor:
        """Velocity for (B, C, H, W) latents; ``attention_mask`` (B, text_tokens) masks padded
        text tokens in cross-attention. SANA has no pooled embedding (ignored if given)."""
        latents = self.check_latents(latents)
        b, c = latents.shape[:2]
        if self.has_guidance_embeds and guidance is None:
            raise ValueError("this SANA transformer has guidance embeddings: pass guidance")
        if not self.has_guidance_embeds and guidance is not None:
            raise ValueError("this SANA transformer has no guidance embeddings; use true CFG")
        self.check_text(prompt_embeds, attention_mask, b, int(self.config.caption_channels))
        sigma = self._check_sigma(sigma, b, latents)
        # the patch embedder's conv stays in 16/32 bits; a quantized head's weight does not
        dtype = self.transformer.patch_embed.proj.weight.dtype
        timestep = sigma * 1000.0 * float(self.config.timestep_scale)
        if guidance is not None:
            guidance = self._check_sigma(guidance, b, latents, "guidance")
            guidance = (guidance * float(self.config.guidance_embeds_scale)).to(dtype)
        head = self.transformer.proj_out
        if isinstance(head, StructuredLinear):
            head.active_channels = c
        try:
            out = self._model_to_call()(
                hidden_states=latents.to(dtype),
                encoder_hidden_states=prompt_embeds.to(dtype),
                timestep=timestep,
                guidance=guidance,
                encoder_attention_mask=attention_mask,
                attention_kwargs=attention_kwargs,
                return_dict=False,
            )[0]
        finally:
            if isinstance(head, StructuredLinear):
                head.active_channels = None
        if out.shape[1] == 2 * c:
            # a learned-sigma head (out_channels = 2 x in_channels): the velocity is the first
            # half, as SanaPipeline reads it (the sampler failed on the doubled channels)
            out = out[:, :c]
        return out
