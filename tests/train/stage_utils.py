"""Tiny stage-training setups shared by test_stages / test_distributed / test_resume_stage.

The data are synthetic but related like real ones: an "image" (3, 16, 16) is encoded by two
fixed random convolutions into a "base latent" (16, 16, 16) (f1 stand-in for the f8 VAE; 2x2
patches give an 8x8 token grid) and a "DC-AE latent" (4, 4, 4) (a 4x4 grid: factor 2, as for
f32 vs f8 + 2x2), so the base tokens are partly predictable from the DC-AE ones. Text
embeddings are deterministic per caption.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from dcgen.adapters import adapter_for
from dcgen.train import precompute
from dcgen.train.config import TrainConfig
from tests.adapters.tiny import TEXT_DIM, tiny_flux

DCAE_CHANNELS = 4


class ImageSet(torch.utils.data.Dataset):
    def __init__(self, n: int = 8, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        # Smooth images (upsampled noise), so neighbouring tokens are correlated.
        self.images = F.interpolate(torch.randn(n, 3, 4, 4, generator=g), size=16, mode="bilinear")

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"image": self.images[i], "caption": f"caption {i}", "key": f"s{i}"}

    def fingerprint(self) -> str:
        return f"imageset-{len(self)}"


_g = torch.Generator().manual_seed(1)
_BASE_W = torch.randn(16, 3, 1, 1, generator=_g)
_DCAE_W = torch.randn(DCAE_CHANNELS, 3, 4, 4, generator=_g) / 4


def base_encoder(x: torch.Tensor) -> torch.Tensor:
    return F.conv2d(x, _BASE_W)


def dcae_encoder(x: torch.Tensor) -> torch.Tensor:
    return F.conv2d(x, _DCAE_W, stride=4)


def text_encoder(captions: list[str]) -> dict[str, torch.Tensor]:
    out_e, out_p = [], []
    for c in captions:
        g = torch.Generator().manual_seed(sum(map(ord, c)))
        out_e.append(torch.randn(3, TEXT_DIM, generator=g))
        out_p.append(torch.randn(TEXT_DIM, generator=g))
    return {"prompt_embeds": torch.stack(out_e), "pooled_prompt_embeds": torch.stack(out_p)}


def make_cache(root: Path, n: int = 8, with_dcae: bool = True, with_base: bool = True) -> Path:
    encoders = {}
    if with_base:
        encoders["base_latent"] = base_encoder
    if with_dcae:
        encoders["dcae_latent"] = dcae_encoder
    out = root / "cache"
    precompute(ImageSet(n), encoders, text_encoder, out, shard_size=4, batch_size=4,
               progress=False)  # fmt: skip
    return out


def save_base(root: Path) -> Path:
    """Tiny guidance-distilled FLUX in the base layout (64 = 16 channels x 2x2)."""
    path = root / "base"
    tiny_flux().save_pretrained(str(path))
    return path


def save_adapted(root: Path) -> Path:
    """Tiny FLUX already moved to 4-channel DC-AE latents (what stage 1 produces)."""
    t = tiny_flux()
    torch.manual_seed(3)
    adapter_for(t).replace_latent_layers(DCAE_CHANNELS, 1)
    path = root / "adapted"
    t.save_pretrained(str(path))
    return path


SANA_BASE_CHANNELS = 16  # the base latent above: one SANA token per pixel (patch size 1)


def save_sana_base(root: Path) -> Path:
    """Tiny SANA in the base layout (16 latent channels, patch size 1)."""
    from tests.adapters.tiny import tiny_sana

    path = root / "sana_base"
    tiny_sana(in_channels=SANA_BASE_CHANNELS).save_pretrained(str(path))
    return path


def save_sana_adapted(root: Path) -> Path:
    """Tiny SANA already moved to 4-channel DC-AE latents."""
    from tests.adapters.tiny import tiny_sana

    model = tiny_sana(in_channels=SANA_BASE_CHANNELS)
    torch.manual_seed(3)
    adapter_for(model).replace_latent_layers(DCAE_CHANNELS, 1)
    path = root / "sana_adapted"
    model.save_pretrained(str(path))
    return path


def config(root: Path, stage: str, transformer: Path, cache: Path, **kw: Any) -> TrainConfig:
    base = dict(
        stage=stage,
        transformer=str(transformer),
        cache_dir=str(cache),
        out_dir=str(root / f"run-{stage}"),
        steps=6,
        batch_size=4,
        lr=3e-3,
        mixed_precision="no",
        checkpoint_every=3,
        log_every=100,
        lora_rank=4,
        align_sgd_steps=4,
        device="cpu",
    )
    base.update(kw)
    return TrainConfig.from_dict(base)


def trainable_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    """The final trainable parameters as saved in the newest checkpoint."""
    from dcgen.train.checkpoint import latest_checkpoint, load_checkpoint

    ckpt = load_checkpoint(latest_checkpoint(run_dir / "checkpoints"), restore_rng=False)
    return ckpt.model_state["trainable"]


@torch.no_grad()
def fixed_loss(transformer: torch.nn.Module, cache_dir: Path) -> float:
    """Flow-matching loss on a fixed batch, noise and sigmas (independent of training RNG);
    guidance 3.5 where the model has guidance embeddings (FLUX), none otherwise (SANA, which
    also ignores the pooled embedding)."""
    from dcgen.train.cache import LatentCache
    from dcgen.train.data import collate_samples
    from dcgen.train.stages import FlowMatchingModule

    batch = collate_samples([LatentCache(cache_dir)[i] for i in range(4)])
    x0 = batch["dcae_latent"]
    g = torch.Generator().manual_seed(123)
    noise = torch.randn(x0.shape, generator=g)
    sigmas = torch.tensor([0.2, 0.4, 0.6, 0.8])
    guided = getattr(adapter_for(transformer), "has_guidance_embeds", False)
    loss = FlowMatchingModule(transformer)(
        x0, noise, sigmas, batch["prompt_embeds"], batch.get("pooled_prompt_embeds"),
        torch.full((4,), 3.5) if guided else None,
    )  # fmt: skip
    return float(loss)


def assert_lora_round_trip(
    transformer: torch.nn.Module, base: Path, out: Path, loss: Any, expected: float
) -> None:
    """Stage 3's files (LoRA + latent layers) rebuild the trained model on a fresh copy of
    ``base``: ``loss(model)`` comes back as ``expected``."""
    import pytest

    from dcgen.train.lora import load_lora, save_lora
    from dcgen.train.stages import load_latent_layers, load_transformer, save_latent_layers

    save_lora(transformer, out)
    save_latent_layers(transformer, out / "latent_layers.safetensors")
    fresh = load_transformer(base)
    load_latent_layers(fresh, out / "latent_layers.safetensors")
    load_lora(fresh, out)
    assert loss(fresh) == pytest.approx(expected, rel=1e-6)


def tiny_dcae_f4() -> Any:
    """A DC-AE of the caches' geometry above (f4, DCAE_CHANNELS latent channels): the f32c32
    preset narrowed and cut to its first three stages, so an export of a stage-1 output gets
    the DC-AE factor the model was aligned to."""
    import dataclasses

    from dcgen.autoencoders import DCAE
    from dcgen.autoencoders.config import reduced_config

    cfg = reduced_config("dc-ae-f32c32-in-1.0", width_divisor=16, max_layers=1,
                         latent_channels=DCAE_CHANNELS)  # fmt: skip
    stages = cfg.num_stages
    per_stage = {
        f.name: getattr(cfg, f.name)[:3]
        for f in dataclasses.fields(cfg)
        if isinstance(getattr(cfg, f.name), tuple) and len(getattr(cfg, f.name)) == stages
    }
    torch.manual_seed(0)
    ae = DCAE(dataclasses.replace(cfg, **per_stage)).eval()
    assert ae.spatial_compression_ratio == 4
    return ae
