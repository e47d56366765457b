"""The benchmarked model families: transformer configs, base autoencoders, DC-AE choice, tokens.

Two families, each at full size and at a tiny CPU size:

- FLUX.1 (``flux``, ``tiny``): base = FLUX VAE (f8c16) with 2x2 patches; DC-Gen = DC-AE f32c32
  up to 1K (the released 1K model), f64c128 above, 1x1 patches.
- SANA (``sana-1.6b``, ``sana-4.8b``, ``tiny-sana``): base = DC-AE f32c32 with 1x1 patches
  (SANA's own setting); DC-Gen = DC-AE f64c128 at every resolution (the only DC-AE step down
  that applies to a model already on f32).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from ..autoencoders.config import get_preset

#: FLUX.1 VAE (f8c16): four stages, 16 latent channels, published scaling / shift.
FLUX_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=16,
    block_out_channels=(128, 256, 512, 512), layers_per_block=2, norm_num_groups=32,
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False,
)  # fmt: skip

F32_PRESET = "dc-ae-f32c32-sana-1.1"
F64_PRESET = "dc-ae-f64c128-in-1.0"

FLUX_BLOCKS = (("double", "transformer_blocks", "num_layers"),
               ("single", "single_transformer_blocks", "num_single_layers"))  # fmt: skip
SANA_BLOCKS = (("sana", "transformer_blocks", "num_layers"),)

# SANA sizes: the per-model kwargs of diffusers' scripts/convert_sana_to_diffusers.py
# (SanaMS_1600M_P1_D20 and SanaMS1.5_4800M_P1_D60; the 4.8B model exists only as SANA 1.5, which
# adds qk_norm "rms_norm_across_heads"), on the SanaTransformer2DModel defaults that the
# published Sana_1600M_1024px_diffusers transformer/config.json also carries: 32 latent channels,
# 1x1 patches, caption_channels 2304 (Gemma-2 2B hidden size), mlp_ratio 2.5, no sincos
# positions at 1K (interpolation_scale None), text length 300 (model_max_length in SANA's
# configs). Both are 2240 wide: 70 linear-attention heads of 32, 20 cross-attention heads of 112.
SANA_COMMON = dict(
    in_channels=32, out_channels=32, patch_size=1, num_attention_heads=70, attention_head_dim=32,
    num_cross_attention_heads=20, cross_attention_head_dim=112, cross_attention_dim=2240,
    caption_channels=2304, mlp_ratio=2.5, sample_size=32,
)  # fmt: skip
SANA_TEXT_TOKENS = 300


@dataclass(frozen=True)
class ModelSpec:
    """A benchmarkable model family: transformer config, base autoencoder, DC-AE choice, text."""

    name: str
    family: str  # "flux" or "sana"
    transformer: dict[str, Any]
    text_tokens: int
    #: DC-AE f32c32 up to this resolution, f64c128 above (FLUX: f32 at 1K, f64 at 2K / 4K;
    #: SANA: 0, always f64 since the base already runs on f32)
    f32_max_resolution: int
    default_resolutions: tuple[int, ...]
    #: base autoencoder: AutoencoderKL kwargs (FLUX) or None with ``base_dcae`` (SANA)
    vae: dict[str, Any] | None = None
    base_dcae: str | None = None
    base_factor: int = 8
    base_patch: int = 2
    #: (kind, transformer attribute, config key) of each block list, in call order
    blocks: tuple[tuple[str, str, str], ...] = FLUX_BLOCKS
    #: DC-AE widths divided by this (1 = the published presets)
    dcae_width_divisor: int = 1
    dcae_max_layers: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def depth(self) -> tuple[int, ...]:
        """Blocks per block list at full size (FLUX: (double, single); SANA: (blocks,))."""
        return tuple(int(self.transformer[key]) for _, _, key in self.blocks)

    @property
    def block_kinds(self) -> tuple[str, ...]:
        return tuple(kind for kind, _, _ in self.blocks)

    @property
    def text_dim(self) -> int:
        key = "joint_attention_dim" if self.family == "flux" else "caption_channels"
        return int(self.transformer[key])

    @property
    def base_side(self) -> int:
        """Pixels per base-model token side (autoencoder factor x patch)."""
        return self.base_factor * self.base_patch

    @property
    def base_latent_channels(self) -> int:
        if self.vae is not None:
            return int(self.vae["latent_channels"])
        return int(self.transformer["in_channels"])

    @property
    def base_label(self) -> str:
        if self.family == "flux":
            return "FLUX VAE f8c16, 2x2 patches"
        return f"DC-AE {self.base_dcae.removeprefix('dc-ae-')}, 1x1 patches"


_FLUX_FULL = dict(
    patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
    num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768,
    guidance_embeds=True, axes_dims_rope=(16, 56, 56),
)  # fmt: skip


def _sana_spec(name: str, transformer: dict[str, Any], **overrides: Any) -> ModelSpec:
    """SANA on its own f32c32 DC-AE (1x1 patches), one block list; DC-Gen goes to f64c128 at
    every resolution (there is no f32 DC-Gen-SANA row)."""
    fields: dict[str, Any] = dict(
        family="sana",
        base_dcae=F32_PRESET,
        base_factor=32,
        base_patch=1,
        blocks=SANA_BLOCKS,
        text_tokens=SANA_TEXT_TOKENS,
        f32_max_resolution=0,
        default_resolutions=(1024, 2048, 4096),
    )
    fields.update(overrides)
    return ModelSpec(name=name, transformer=transformer, **fields)


MODELS: dict[str, ModelSpec] = {
    "flux": ModelSpec(
        name="flux",
        family="flux",
        transformer=_FLUX_FULL,
        vae=FLUX_VAE,
        text_tokens=512,
        f32_max_resolution=1024,
        default_resolutions=(1024, 2048, 4096),
    ),  # fmt: skip
    # CPU smoke size: every code path, nothing meaningful timed.
    "tiny": ModelSpec(
        name="tiny",
        family="flux",
        transformer=dict(
            patch_size=1,
            in_channels=64,
            num_layers=2,
            num_single_layers=2,
            attention_head_dim=16,
            num_attention_heads=2,
            joint_attention_dim=32,
            pooled_projection_dim=32,
            guidance_embeds=True,
            axes_dims_rope=(4, 6, 6),
        ),
        vae=dict(FLUX_VAE, block_out_channels=(8, 8, 8, 8), layers_per_block=1, norm_num_groups=4),
        text_tokens=8,
        f32_max_resolution=64,
        default_resolutions=(64, 128, 256),
        dcae_width_divisor=16,
        dcae_max_layers=1,
    ),  # fmt: skip
    "sana-1.6b": _sana_spec("sana-1.6b", dict(SANA_COMMON, num_layers=20)),
    "sana-4.8b": _sana_spec(
        "sana-4.8b", dict(SANA_COMMON, num_layers=60, qk_norm="rms_norm_across_heads")
    ),
    # CPU smoke size for the SANA path: the reduced f32 DC-AE has 32 // 16 = 2 latent channels.
    "tiny-sana": _sana_spec(
        "tiny-sana",
        dict(
            in_channels=2,
            out_channels=2,
            patch_size=1,
            num_layers=2,
            num_attention_heads=2,
            attention_head_dim=8,
            num_cross_attention_heads=2,
            cross_attention_head_dim=8,
            cross_attention_dim=16,
            caption_channels=32,
            sample_size=8,
        ),
        text_tokens=8,
        default_resolutions=(64, 128),
        dcae_width_divisor=16,
        dcae_max_layers=1,
    ),
}


def get_model_spec(name: str) -> ModelSpec:
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; expected one of {sorted(MODELS)}")
    return MODELS[name]


def dcae_preset_for(spec: ModelSpec, resolution: int) -> str:
    """The DC-Gen autoencoder: f32c32 up to ``spec.f32_max_resolution``, f64c128 above (FLUX:
    the paper's f32 at 1K, f64 at 2K and 4K; SANA: always f64)."""
    return F32_PRESET if resolution <= spec.f32_max_resolution else F64_PRESET


def dcae_factor(preset: str) -> int:
    return get_preset(preset).spatial_compression_ratio


def token_counts(resolution: int, dcae_factor: int, base_side: int = 16) -> tuple[int, int]:
    """(base tokens, DC-Gen tokens) for a square image: base = (H / base_side)^2 (FLUX: 2x2
    patches of the f8 latent, side 16; SANA: f32 latent, side 32); DC-Gen = 1x1 patches of the
    DC-AE latent, (H / f)^2."""
    return (resolution // base_side) ** 2, (resolution // dcae_factor) ** 2


def check_resolution(spec: ModelSpec, resolution: int) -> None:
    if not isinstance(resolution, int) or isinstance(resolution, bool) or resolution <= 0:
        raise ValueError(f"resolution: expected a positive int, got {resolution!r}")
    preset = dcae_preset_for(spec, resolution)
    f = dcae_factor(preset)
    need = math.lcm(spec.base_side, f)
    if resolution % need:
        raise ValueError(
            f"resolution {resolution!r}: must be a positive multiple of {need} (base {spec.name} "
            f"needs {spec.base_side}; DC-Gen at this size uses {preset}, factor {f})"
        )


__all__ = [
    "F32_PRESET",
    "F64_PRESET",
    "FLUX_VAE",
    "MODELS",
    "ModelSpec",
    "check_resolution",
    "dcae_factor",
    "dcae_preset_for",
    "get_model_spec",
    "token_counts",
]
