"""Tiny random DiTs and DC-AE shared by the adapter and pipeline tests (fast on 2 CPU cores)."""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL, FluxTransformer2DModel, SanaTransformer2DModel

from dcgen.autoencoders import DCAE, reduced_config

TEXT_DIM = 32


def tiny_flux(
    in_channels: int = 64, guidance_embeds: bool = True, layers: int = 1
) -> FluxTransformer2DModel:
    """``layers`` double and as many single blocks."""
    torch.manual_seed(0)
    return FluxTransformer2DModel(
        patch_size=1,
        in_channels=in_channels,
        num_layers=layers,
        num_single_layers=layers,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=TEXT_DIM,
        pooled_projection_dim=TEXT_DIM,
        guidance_embeds=guidance_embeds,
        axes_dims_rope=(4, 6, 6),
    ).eval()


def tiny_sana(
    in_channels: int = 4, patch_size: int = 1, out_channels: int | None = None
) -> SanaTransformer2DModel:
    """``out_channels`` 2 x ``in_channels``: a learned-sigma head (velocity first)."""
    torch.manual_seed(0)
    return SanaTransformer2DModel(
        patch_size=patch_size,
        in_channels=in_channels,
        out_channels=out_channels or in_channels,
        num_layers=2,
        num_attention_heads=2,
        attention_head_dim=8,
        num_cross_attention_heads=2,
        cross_attention_head_dim=8,
        cross_attention_dim=16,
        caption_channels=TEXT_DIM,
        sample_size=8,
    ).eval()


def tiny_dcae() -> DCAE:
    """f32, 2 latent channels (the f32c32 preset with widths / 16)."""
    torch.manual_seed(0)
    return DCAE(reduced_config("dc-ae-f32c32-in-1.0", width_divisor=16, max_layers=1)).eval()


def tiny_kl(seed: int = 0) -> AutoencoderKL:
    """A two-level f2 AutoencoderKL with FLUX.1's latent channels, scale and shift."""
    torch.manual_seed(seed)
    return AutoencoderKL(
        block_out_channels=(8, 8), layers_per_block=1, latent_channels=16, norm_num_groups=8,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        scaling_factor=0.3611, shift_factor=0.1159,
    ).eval()  # fmt: skip


def text(batch: int = 1, tokens: int = 5, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, tokens, TEXT_DIM, generator=g), torch.randn(
        batch, TEXT_DIM, generator=g
    )
