"""The toy world's models: their architectures, and loading the trained copies dcgen ships.

The world is DC-Gen in miniature (128x128 images instead of 4096x4096):

=============== ============================================ ============================
role            model                                        latent / tokens per image
=============== ============================================ ============================
base VAE        diffusers AutoencoderKL, f8c4                16x16x4 -> 2x2 packing: 64
target DC-AE    dcgen DCAE (in-1.0 structure), f32c32        4x4x32 -> 1x1: 16
base DiT        diffusers FluxTransformer2DModel, 2 double + 2 single blocks, RoPE, guidance
text encoder    dcgen.toy.text.ToyTextEncoder (sequence + pooled)
evaluator       dcgen.toy.evaluator.ShapeEvaluator
=============== ============================================ ============================

``scripts/train_toy_assets.py`` (``dcgen.toy.train_assets``) trains all of them from the
synthetic data and writes one folder per model, diffusers-style, plus ``manifest.json``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dcgen._json import dumps
from dcgen.autoencoders import DCAE, reduced_config
from dcgen.autoencoders.config import DCAEConfig
from dcgen.train.checkpoint import keeps_rng_state

from .evaluator import ShapeEvaluator
from .text import TextEncoderConfig, ToyTextEncoder

IMAGE_SIZE = 128
TRAIN_SEED = 0  # dataset seed of every training set
EVAL_SEED = 1  # dataset seed of held-out prompts and reference images
MANIFEST = "manifest.json"
FOLDERS = {
    "vae": "vae",
    "dcae": "dcae_f32c32",
    "transformer": "transformer",
    "text_encoder": "text_encoder",
    "evaluator": "evaluator",
}


def default_assets_dir() -> Path:
    """The trained toy world inside the installed package."""
    return Path(str(resources.files("dcgen") / "assets" / "toy"))


# ---------------------------------------------------------------------------- architectures


def vae_config() -> dict[str, Any]:
    """A small f8c4 AutoencoderKL (FLUX's VAE class, four stages, one ResNet each)."""
    return dict(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 16, 32, 64),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=IMAGE_SIZE,
        scaling_factor=1.0,
        shift_factor=0.0,
    )


def build_vae() -> nn.Module:
    from diffusers import AutoencoderKL

    return AutoencoderKL(**vae_config())


def dcae_config() -> DCAEConfig:
    """f32c32 with DC-AE in-1.0's structure (ResBlock stages, EfficientViT stages with linear
    attention, pixel (un)shuffle resampling) at an eighth of its widths, one layer per stage."""
    return reduced_config(
        "dc-ae-f32c32-in-1.0",
        width_divisor=8,
        latent_channels=32,
        attention_head_dim=8,
        max_layers=1,
    )


def build_dcae() -> DCAE:
    return DCAE(dcae_config())


def transformer_config() -> dict[str, Any]:
    text = TextEncoderConfig()
    return dict(
        patch_size=1,
        in_channels=4 * vae_config()["latent_channels"],  # 2x2 packing of the f8c4 latent
        num_layers=2,
        num_single_layers=2,
        attention_head_dim=32,
        num_attention_heads=4,
        joint_attention_dim=text.dim,
        pooled_projection_dim=text.pooled_dim,
        guidance_embeds=True,
        axes_dims_rope=(8, 12, 12),
    )


def build_transformer() -> nn.Module:
    from diffusers import FluxTransformer2DModel

    from dcgen.adapters.flux import FluxAdapter

    model = FluxTransformer2DModel(**transformer_config())
    FluxAdapter(model, latent_patch_size=2)  # records the 2x2 packing in the config
    return model


# ------------------------------------------------------------------------------------ loading


@dataclass
class ToyAssets:
    vae: nn.Module
    dcae: DCAE
    transformer: nn.Module
    text_encoder: ToyTextEncoder
    evaluator: ShapeEvaluator
    manifest: dict[str, Any]
    root: Path

    @property
    def image_size(self) -> int:
        return int(self.manifest.get("image_size", IMAGE_SIZE))


def _require_dir(root: Path, name: str) -> Path:
    path = root / name
    if not path.is_dir():
        raise FileNotFoundError(
            f"toy assets: {path} is missing; train them with `python scripts/train_toy_assets.py "
            f"--out {root}` or reinstall dcgen"
        )
    return path


def load_toy_assets(
    root: str | Path | None = None, device: str | torch.device = "cpu"
) -> ToyAssets:
    """Every toy model in eval mode, fp32, on ``device`` (from the shipped folder by default)."""
    from diffusers import AutoencoderKL

    from dcgen.train.stages import load_transformer

    root = Path(root) if root is not None else default_assets_dir()
    manifest_file = root / MANIFEST
    if not manifest_file.is_file():
        raise FileNotFoundError(
            f"toy assets: no {MANIFEST} in {root}; train them with "
            f"`python scripts/train_toy_assets.py --out {root}`"
        )
    manifest = json.loads(manifest_file.read_text())
    vae = AutoencoderKL.from_pretrained(str(_require_dir(root, FOLDERS["vae"])))
    dcae = DCAE.from_pretrained(_require_dir(root, FOLDERS["dcae"]))
    transformer = load_transformer(_require_dir(root, FOLDERS["transformer"]))
    text_encoder = ToyTextEncoder.from_pretrained(_require_dir(root, FOLDERS["text_encoder"]))
    evaluator = ShapeEvaluator.from_pretrained(_require_dir(root, FOLDERS["evaluator"]))
    models = [vae, dcae, transformer, text_encoder, evaluator]
    for m in models:
        m.to(device).eval().requires_grad_(False)
    return ToyAssets(vae, dcae, transformer, text_encoder, evaluator, manifest, root)


@keeps_rng_state
def random_toy_assets(seed: int = 0) -> ToyAssets:
    """Untrained assets with the shipped architectures (tests, and the training script's
    starting point). The VAE's latent statistics are left at identity scaling."""
    torch.manual_seed(seed)
    return ToyAssets(
        build_vae().eval(),
        build_dcae().eval(),
        build_transformer().eval(),
        ToyTextEncoder().eval(),
        ShapeEvaluator().eval(),
        {"image_size": IMAGE_SIZE, "trained": False},
        Path("."),
    )


def save_toy_assets(assets: ToyAssets, root: str | Path, manifest: dict[str, Any]) -> Path:
    """Write every model folder and the manifest (the manifest last: a folder with a manifest
    is complete)."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    assets.vae.save_pretrained(str(root / FOLDERS["vae"]))
    assets.dcae.save_pretrained(root / FOLDERS["dcae"])
    assets.transformer.save_pretrained(str(root / FOLDERS["transformer"]))
    assets.text_encoder.save_pretrained(root / FOLDERS["text_encoder"])
    assets.evaluator.save_pretrained(root / FOLDERS["evaluator"])
    tmp = root / (MANIFEST + ".tmp")
    tmp.write_text(dumps(manifest, indent=1))
    tmp.replace(root / MANIFEST)
    return root


# ------------------------------------------------------------------------------ latent spaces


def vae_encode(vae: nn.Module, images: torch.Tensor, sample: bool = False) -> torch.Tensor:
    """Scaled f8 latents, FLUX's convention: (z - shift_factor) * scaling_factor."""
    dist = vae.encode(images).latent_dist
    z = dist.sample() if sample else dist.mean
    return (z - vae.config.shift_factor) * vae.config.scaling_factor


def vae_decode(vae: nn.Module, latents: torch.Tensor) -> torch.Tensor:
    z = latents / vae.config.scaling_factor + vae.config.shift_factor
    return vae.decode(z).sample.clamp(-1, 1)


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
