"""`dcgen demo` (preview): a DC-AE round trip on the bundled image, end to end on a CPU.

No pretrained weights can be downloaded, so the demo fits a narrow f32c32 DC-AE (the in-1.0
block structure: ResBlocks, EfficientViT blocks with linear attention, BatchNorm decoder stages)
to random crops of the bundled 512x512 picture for a few hundred steps, then shows what the
library does with it: full and tiled decode, save / load in diffusers format, BatchNorm folding,
latent shape and token counts. Everything lands in one run folder with a report.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from dcgen._files import atomic_write
from dcgen._json import dumps
from dcgen.autoencoders import DCAE
from dcgen.train.checkpoint import keeps_rng_state

from .assets import dcae_config
from .images import bundled_image_path, load_image, plot_curve, psnr, side_by_side, to_pil

logger = logging.getLogger(__name__)


@dataclass
class RoundTripSettings:
    steps: int = 300
    crop: int = 128
    batch: int = 4
    lr: float = 2e-3
    seed: int = 0
    device: str = "cpu"
    image: Path | None = None  # default: the bundled picture


def _random_crops(img: torch.Tensor, n: int, size: int, gen: torch.Generator) -> torch.Tensor:
    _, _, h, w = img.shape
    ys = torch.randint(0, h - size + 1, (n,), generator=gen).tolist()
    xs = torch.randint(0, w - size + 1, (n,), generator=gen).tolist()
    crops = torch.cat([img[:, :, y : y + size, x : x + size] for y, x in zip(ys, xs)])
    flip = torch.rand(n, generator=gen) < 0.5
    crops[flip] = crops[flip].flip(-1)
    return crops


def _timed(
    fn: Callable[[], torch.Tensor], device: str, repeats: int = 3
) -> tuple[torch.Tensor, float]:
    out, best = None, math.inf
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = fn()
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return out, best


@keeps_rng_state
def run_dcae_roundtrip(
    out_dir: str | Path, settings: RoundTripSettings | None = None, progress: bool = True
) -> dict:
    """Train, evaluate and report; returns the report dict (also written as report.json)."""
    s = settings or RoundTripSettings()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(s.seed)
    gen = torch.Generator().manual_seed(s.seed)
    image = load_image(s.image or bundled_image_path())
    f = 32
    h, w = image.shape[-2:]
    image = image[:, :, : h // f * f, : w // f * f]
    if min(image.shape[-2:]) < s.crop:
        raise ValueError(
            f"demo image must be at least {s.crop}px per side, got {tuple(image.shape[-2:])}"
        )
    image = image.to(s.device)

    model = DCAE(dcae_config()).to(s.device)  # the toy world's f32c32 structure
    with torch.no_grad():
        psnr_init = psnr(model.eval()(image), image)

    opt = torch.optim.AdamW(model.parameters(), lr=s.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=s.lr, total_steps=max(s.steps, 1), pct_start=0.1
    )
    losses: list[float] = []
    model.train()
    from tqdm.auto import tqdm

    bar = tqdm(range(s.steps), desc="fitting DC-AE f32c32", disable=not progress, unit="step")
    t_train = time.perf_counter()
    for _ in bar:
        x = _random_crops(image, s.batch, s.crop, gen)
        recon = model(x)
        loss = (recon - x).abs().mean() + (recon - x).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
    train_s = time.perf_counter() - t_train
    model.eval()

    with torch.inference_mode():
        latent, enc_s = _timed(lambda: model.encode(image), s.device)
        recon, dec_s = _timed(lambda: model.decode(latent), s.device)
        tile = min(256, image.shape[-1] // 2 // f * f) or f
        overlap = max(f, tile // 4 // f * f)  # tile sizes and overlaps are multiples of f
        tiled = model.decode(latent, tile_size=tile, tile_overlap=overlap)
        model.save_pretrained(out / "model")
        reloaded = DCAE.from_pretrained(out / "model", device=s.device)
        reload_diff = (reloaded.decode(latent) - recon).abs().max().item()
        folded = DCAE.from_pretrained(out / "model", device=s.device).fold_batchnorm()
        fold_diff = (folded.decode(latent) - recon).abs().max().item()

    comparison = side_by_side(
        [to_pil(image), to_pil(recon), to_pil(tiled)],
        ["input", f"full decode {psnr(recon, image):.1f} dB", "tiled decode"],
    )
    curve = plot_curve(losses, "training loss (L1 + MSE), log scale")
    for name, picture in [("input.png", to_pil(image)), ("reconstruction.png", to_pil(recon)),
                          ("comparison.png", comparison), ("loss.png", curve)]:  # fmt: skip
        atomic_write(out / name, lambda tmp, picture=picture: picture.save(tmp, format="PNG"))
    csv = "step,loss\n" + "".join(f"{i},{v:.6f}\n" for i, v in enumerate(losses))
    atomic_write(out / "loss.csv", lambda tmp: Path(tmp).write_text(csv))

    hp, wp = image.shape[-2:]
    report = {
        "what": "DC-AE round trip (preview demo): narrow f32c32 in-1.0-structure DC-AE fit to the image",
        "image": str(s.image or "bundled demo.png"),
        "image_size": [hp, wp],
        "latent_shape": list(latent.shape),
        "compression": f"{hp * wp * 3} values -> {latent.numel()} ({hp * wp * 3 / latent.numel():.0f}x)",
        "tokens_dcae_f32_1x1": (hp // 32) * (wp // 32),
        "tokens_flux_vae_f8_2x2": (hp // 16) * (wp // 16),
        "tokens_at_4096px": {
            "flux_f8_2x2": 65536,
            "dcae_f32c32_1x1": 16384,
            "dcae_f64c128_1x1": 4096,
        },
        "parameters_million": sum(p.numel() for p in model.parameters()) / 1e6,
        "train_steps": s.steps,
        "train_seconds": round(train_s, 1),
        "loss_first": losses[0] if losses else None,
        "loss_last": losses[-1] if losses else None,
        "psnr_random_init_db": round(psnr_init, 2),
        "psnr_trained_db": round(psnr(recon, image), 2),
        "psnr_tiled_decode_db": round(psnr(tiled, image), 2),
        "tiled_vs_full_max_abs": (tiled - recon).abs().max().item(),
        "encode_ms": round(enc_s * 1e3, 1),
        "decode_ms": round(dec_s * 1e3, 1),
        "reload_max_abs_diff": reload_diff,
        "batchnorm_fold_max_abs_diff": fold_diff,
        "device": s.device,
    }
    text, markdown = dumps(report, indent=2) + "\n", _markdown(report)
    atomic_write(out / "report.json", lambda tmp: Path(tmp).write_text(text))
    atomic_write(out / "report.md", lambda tmp: Path(tmp).write_text(markdown))
    return report


def _markdown(r: dict) -> str:
    rows = "\n".join(f"| {k} | {v} |" for k, v in r.items() if not isinstance(v, dict))
    return (
        "# dcgen demo: DC-AE round trip\n\n"
        "A narrow DC-AE (f32c32, in-1.0 block structure) fit to one picture on this machine, then\n"
        "encoded, decoded full and tiled, saved in diffusers format, reloaded and BatchNorm-folded.\n"
        "Files: input.png, reconstruction.png, comparison.png, loss.png, loss.csv, model/.\n\n"
        "| quantity | value |\n|---|---|\n" + rows + "\n"
    )
