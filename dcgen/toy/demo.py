"""`dcgen demo`: DC-Gen end to end on the toy world, on a laptop CPU in minutes.

The shipped toy world (``dcgen.toy.assets``) has a base text-to-image model in the space of an
f8 VAE with 2x2 patches (64 tokens per 128x128 image) and an f32c32 DC-AE (16 tokens). The
demo moves the base model into the DC-AE space with the library's own three stages
(``dcgen.train.stages``: embedder alignment, output layer, LoRA), trains a naive baseline with
the same LoRA budget and no alignment, then samples every model on the same held-out prompts and
seeds and measures what DC-Gen claims:

- prompt accuracy (the evaluator finds every object the caption asks for) and a Frechet
  distance on the evaluator's features against real images,
- tokens per image and the measured sampling latency per image at batch 1, split into
  denoising (the transformer) and decoding (the autoencoder),
- the feature distance to the base model after several blocks: DC-Gen's point is that
  alignment alone (DiT untouched) brings the new model's hidden states close to the base's,
- the base vs DC-Gen latency at larger images than the toy's (``latency_sizes``), where the image
  tokens rather than per-step overhead set the cost,
- prompt accuracy against LoRA steps for the naive run and DC-Gen's stage 3 (``curve_steps``).

The run folder::

    report.md / report.json   one row per model (base, naive, stage 1, stage 1+2, DC-Gen)
    grid.png                  same prompts and seeds, one column per model
    loss_curves.png           every training stage's loss
    stage1/ stage2/ stage3/ naive/   the stages' logs (and their checkpoints)
"""

from __future__ import annotations

import copy
import json
import logging
import math
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from torch import nn

from dcgen.adapters import adapter_for
from dcgen.sampling.flow import flow_sigmas, sample_euler
from dcgen.sampling.shift import resolve_shift
from dcgen.train.config import TrainConfig
from dcgen.train.features import feature_distance
from dcgen.train.loop import LOG_NAME, read_log
from dcgen.train.lora import fuse_lora
from dcgen.train.stages import (
    DEFAULT_GUIDANCE,
    _block_features,
    align_embedder,
    finetune_lora,
    readout_r2,
    train_output_layer,
)

from . import assets as A
from .evaluator import frechet_distance, score_prompts
from .images import plot_curve, to_pil
from .shapes import ShapesWorld

logger = logging.getLogger(__name__)

ROWS = ("base", "naive", "stage1", "stage1+2", "dcgen")
ROW_TITLES = {
    "base": "base (f8 VAE, 2x2 patches)",
    "naive": "naive (random embedder/head + LoRA)",
    "stage1": "stage 1 only (DiT untouched)",
    "stage1+2": "stage 1+2",
    "dcgen": "DC-Gen (stage 1+2+3)",
}


@dataclass
class DemoSettings:
    """Sizes of the run. The defaults fit 10 minutes on 2 CPU cores; ``fast()`` is the test
    suite's few-step version; raise the steps for better numbers with time or a GPU."""

    train_images: int = 2048
    eval_prompts: int = 128
    reference_images: int = 512
    batch_size: int = 32
    align_sgd_steps: int = 200
    output_steps: int = 500
    lora_steps: int = 1000
    lora_rank: int = 16
    lr: float = 5e-4
    sampling_steps: int = 20
    latency_repeats: int = 5
    # Larger images at which the base and DC-Gen latency is also measured (batch 1, one timed
    # run each after a short warm-up): the speed-up as a function of the token count.
    latency_sizes: tuple[int, ...] = (256, 512, 768, 1024)
    resolution_repeats: int = 1
    # LoRA steps at which the naive run and DC-Gen's stage 3 are also evaluated (snapshots of
    # the same runs; those >= lora_steps are skipped): how many steps each needs to reach a
    # given prompt accuracy.
    curve_steps: tuple[int, ...] = (100, 300)
    grid_prompts: int = 8
    feature_layers: tuple[int, ...] = (0, 1, 2, 3)
    # RoPE positions of the DC-AE models (naive included): "base" spaces them to span the base
    # grid; the toy base model was trained at one resolution, so on "grid" positions the frozen
    # blocks see the top-left quarter of a larger image (TrainConfig.align_positions).
    align_positions: str = "base"
    seed: int = 0
    device: str = "cpu"
    assets: str | None = None  # None: the shipped toy world
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def fast(cls, **overrides: Any) -> DemoSettings:
        values: dict[str, Any] = dict(
            train_images=64,
            eval_prompts=8,
            reference_images=16,
            batch_size=8,
            align_sgd_steps=2,
            output_steps=2,
            lora_steps=2,
            lora_rank=4,
            sampling_steps=2,
            latency_repeats=1,
            latency_sizes=(256,),
            curve_steps=(1,),
            grid_prompts=2,
        )
        values.update(overrides)
        return cls(**values)

    def validate(self) -> DemoSettings:
        for name in (
            "train_images", "eval_prompts", "reference_images", "batch_size", "lora_rank",
            "sampling_steps", "latency_repeats", "grid_prompts", "output_steps", "lora_steps",
            "resolution_repeats",
        ):  # fmt: skip
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"demo setting {name}: expected a positive integer, got {value!r}")
        if self.align_sgd_steps < 0:
            raise ValueError(
                f"demo setting align_sgd_steps: expected >= 0, got {self.align_sgd_steps}"
            )
        self.latency_sizes = tuple(self.latency_sizes)
        bad = [v for v in self.latency_sizes if not isinstance(v, int) or v < 1]
        if bad:
            raise ValueError(
                f"demo setting latency_sizes: expected positive image sizes in pixels, got {bad}"
            )
        self.curve_steps = tuple(self.curve_steps)
        bad = [v for v in self.curve_steps if not isinstance(v, int) or v < 1]
        if bad:
            raise ValueError(
                f"demo setting curve_steps: expected positive LoRA step counts, got {bad}"
            )
        if self.reference_images < 2 or self.eval_prompts < 2:
            raise ValueError("demo settings: the Frechet distance needs at least 2 images per set")
        if not self.lr > 0:
            raise ValueError(f"demo setting lr: expected > 0, got {self.lr}")
        if self.align_positions not in ("grid", "base"):
            raise ValueError(
                f"demo setting align_positions: expected 'grid' or 'base', got "
                f"{self.align_positions!r}"
            )
        return self


# ------------------------------------------------------------------------------------ data


@torch.no_grad()
def build_training_data(
    assets: A.ToyAssets, count: int, device: torch.device, progress: bool = True
) -> list[dict[str, torch.Tensor]]:
    """Paired latents of the same images in both spaces plus text embeddings: what a
    ``dcgen precompute`` cache holds, made in memory."""
    world = ShapesWorld(A.TRAIN_SEED, assets.image_size, length=count)
    samples: list[dict[str, torch.Tensor]] = []
    starts = range(0, count, 64)
    for start in _bar(starts, "encode", progress):
        x, captions, _ = world.batch(start, min(64, count - start))
        x = x.to(device)
        base = A.vae_encode(assets.vae, x)
        dcae = assets.dcae.encode(x, scaled=True)
        embeds, pooled = assets.text_encoder(captions)
        for i in range(len(captions)):
            samples.append(
                {
                    "base_latent": base[i].cpu(),
                    "dcae_latent": dcae[i].cpu(),
                    "prompt_embeds": embeds[i].cpu(),
                    "pooled_prompt_embeds": pooled[i].cpu(),
                }
            )
    return samples


def _bar(it: Sequence[Any], desc: str, enabled: bool) -> Any:
    if not enabled:
        return it
    from tqdm.auto import tqdm

    return tqdm(it, desc=desc, dynamic_ncols=True, leave=False)


# ---------------------------------------------------------------------------------- models


@dataclass
class Space:
    """How a row samples: its transformer and the autoencoder that decodes its latents."""

    transformer: nn.Module
    channels: int
    size: int  # latent side
    decode: Callable[[torch.Tensor], torch.Tensor]
    factor: int  # image pixels per latent pixel (per side)

    def at(self, image_size: int) -> Space:
        """The same model sampling ``image_size`` x ``image_size`` images."""
        return replace(self, size=image_size // self.factor)


def _spaces(assets: A.ToyAssets, models: dict[str, nn.Module]) -> dict[str, Space]:
    s = assets.image_size
    vae_c = int(assets.vae.config.latent_channels)
    dcae_c = int(assets.dcae.latent_channels)
    f = assets.dcae.spatial_compression_ratio
    out = {}
    for name, model in models.items():
        if name == "base":
            out[name] = Space(model, vae_c, s // 8, lambda z: A.vae_decode(assets.vae, z), 8)
        else:
            out[name] = Space(
                model,
                dcae_c,
                s // f,
                lambda z: assets.dcae.decode(z, scaled=True).clamp(-1, 1),
                f,
            )
    return out


@torch.no_grad()
def denoise(
    space: Space,
    embeds: torch.Tensor,
    pooled: torch.Tensor,
    seeds: Sequence[int],
    steps: int,
    device: torch.device,
) -> torch.Tensor:
    """Latents (B, C, h, w) after ``steps`` Euler steps; image i starts from noise seeded by
    ``seeds[i]``, so every row of the report starts from the same seeds."""
    adapter = adapter_for(space.transformer)
    shift = resolve_shift("flux", adapter.num_tokens(space.size, space.size), space.channels)
    sigmas = flow_sigmas(steps, shift, device=device)
    noise = torch.stack(
        [
            torch.randn(
                space.channels,
                space.size,
                space.size,
                generator=torch.Generator().manual_seed(int(s)),
            )  # fmt: skip
            for s in seeds
        ]
    ).to(device)
    e, p = embeds.to(device), pooled.to(device)
    guidance = torch.full((len(noise),), DEFAULT_GUIDANCE, device=device)

    def velocity(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        return adapter.predict(x, sigma, e, p, guidance)

    return sample_euler(velocity, noise, sigmas)


@torch.no_grad()
def generate(
    space: Space,
    embeds: torch.Tensor,
    pooled: torch.Tensor,
    seeds: Sequence[int],
    steps: int,
    device: torch.device,
    batch_size: int = 32,
) -> torch.Tensor:
    """Images (B, 3, H, W) in [-1, 1]; image i starts from noise seeded by ``seeds[i]``."""
    out = []
    for start in range(0, len(seeds), batch_size):
        idx = slice(start, start + batch_size)
        z = denoise(space, embeds[idx], pooled[idx], seeds[idx], steps, device)
        out.append(space.decode(z).float().cpu())
    return torch.cat(out)


def _timed(fn: Callable[[], Any], device: torch.device) -> tuple[Any, float]:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return out, time.perf_counter() - t0


def measure_latency(
    space: Space,
    embeds: torch.Tensor,
    pooled: torch.Tensor,
    steps: int,
    repeats: int,
    device: torch.device,
    warmup_steps: int = 1,
) -> dict[str, float]:
    """Median seconds for one image at batch 1 after one warm-up run (of ``warmup_steps``
    Euler steps: it only has to touch every kernel once): ``denoise`` (the transformer's Euler
    steps, where the token count matters), ``decode`` (the autoencoder) and ``total``."""
    parts: dict[str, list[float]] = {"denoise": [], "decode": [], "total": []}
    for r in range(repeats + 1):
        n = steps if r > 0 else warmup_steps
        z, t_denoise = _timed(
            lambda r=r, n=n: denoise(space, embeds[:1], pooled[:1], [r], n, device), device
        )
        _, t_decode = _timed(lambda z=z: space.decode(z), device)
        if r > 0:
            parts["denoise"].append(t_denoise)
            parts["decode"].append(t_decode)
            parts["total"].append(t_denoise + t_decode)
    return {k: statistics.median(v) for k, v in parts.items()}


def measure_latencies(
    spaces: dict[str, Space],
    embeds: torch.Tensor,
    pooled: torch.Tensor,
    steps: int,
    repeats: int,
    device: torch.device,
) -> dict[str, dict[str, float]]:
    """:func:`measure_latency` for several models, interleaved: each repeat times every model
    once, so a slow phase of a shared machine hits all rows alike instead of one."""
    times: dict[str, dict[str, list[float]]] = {
        n: {"denoise": [], "decode": [], "total": []} for n in spaces
    }
    for _ in range(repeats):
        for name, space in spaces.items():
            t = measure_latency(space, embeds, pooled, steps, 1, device)
            for k, v in t.items():
                times[name][k].append(v)
    return {n: {k: statistics.median(v) for k, v in parts.items()} for n, parts in times.items()}


def latency_by_resolution(
    base: Space,
    new: Space,
    sizes: Sequence[int],
    embeds: torch.Tensor,
    pooled: torch.Tensor,
    steps: int,
    repeats: int,
    device: torch.device,
    progress: bool = False,
) -> list[dict[str, Any]]:
    """Batch-1 latency of the base and the DC-AE model at larger images than the toy was trained
    on. The weights do not change the cost, only the token count does: at the training size a
    tiny model is bound by per-step overhead and the fixed text tokens, at higher resolution
    the image tokens dominate and the speed-up grows past the 4x token ratio (attention is
    quadratic), which is the regime DC-Gen is for. The images themselves are not evaluated."""
    text_tokens = int(embeds.shape[1])
    out = []
    for size in _bar(list(sizes), "latency by resolution", progress):
        row: dict[str, Any] = {"image_size": int(size)}
        for key, space in (("base", base.at(size)), ("dcgen", new.at(size))):
            tokens = adapter_for(space.transformer).num_tokens(space.size, space.size)
            t = measure_latency(space, embeds, pooled, steps, repeats, device)
            row[key] = {
                "tokens_per_image": tokens,
                "sequence_length": tokens + text_tokens,
                "latency_s": t["total"],
                "denoise_latency_s": t["denoise"],
                "decode_latency_s": t["decode"],
            }
        row["token_ratio"] = row["base"]["tokens_per_image"] / row["dcgen"]["tokens_per_image"]
        row["speedup"] = row["base"]["latency_s"] / row["dcgen"]["latency_s"]
        row["denoise_speedup"] = (
            row["base"]["denoise_latency_s"] / row["dcgen"]["denoise_latency_s"]
        )
        out.append(row)
    return out


def measure_throughput(
    space: Space,
    embeds: torch.Tensor,
    pooled: torch.Tensor,
    steps: int,
    batch: int,
    device: torch.device,
) -> float:
    """Images per second at ``batch`` images per call (denoise + decode), after a warm-up:
    where the token count, not per-call overhead, sets the time."""
    seeds = list(range(batch))
    e, p = embeds[:batch], pooled[:batch]

    def run() -> torch.Tensor:
        return generate(space, e, p, seeds, steps, device, batch_size=batch)

    run()
    _, seconds = _timed(run, device)
    return len(seeds) / seconds


def coarse_base_latents(
    data: Sequence[dict[str, torch.Tensor]], factor: int, patch_size: int
) -> list[dict[str, torch.Tensor]]:
    """``data`` with ``dcae_latent`` replaced by the base latent averaged over ``factor`` x
    ``factor`` tokens and unshuffled by the base patch size: a latent on the DC-AE's token grid
    that is a linear function of the base latent, the best case for stage 1's linear
    alignment."""
    out = []
    for d in data:
        z = F.avg_pool2d(d["base_latent"][None].float(), factor)
        out.append({**d, "dcae_latent": F.pixel_unshuffle(z, patch_size)[0]})
    return out


def _coarse_reference_r2(
    base: nn.Module, data: list[dict[str, torch.Tensor]], cfg: TrainConfig, factor: int
) -> float:
    """Stage 1 (ridge embedder, no refinement) on :func:`coarse_base_latents`: the velocity
    readout R^2 of the frozen blocks when the new latent carries nothing the base latent
    does not."""
    model = copy.deepcopy(base)
    coarse = coarse_base_latents(data, factor, adapter_for(base).patch_size)
    with tempfile.TemporaryDirectory() as tmp:
        summary = align_embedder(model, coarse, cfg, run_dir=tmp, progress=False)
    return float(summary["head"]["readout_r2"])


def _snapshots(
    model: nn.Module, steps: Sequence[int]
) -> tuple[Callable[[int, float], None], dict[int, dict[str, torch.Tensor]]]:
    """An ``on_step`` callback that copies the trainable weights after each of ``steps``, and
    the dict it fills (step -> weights)."""
    saved: dict[int, dict[str, torch.Tensor]] = {}
    wanted = set(steps)

    def on_step(step: int, loss: float) -> None:
        if step in wanted:
            saved[step] = {
                n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad
            }

    return on_step, saved


def _with_weights(model: nn.Module, weights: dict[str, torch.Tensor]) -> nn.Module:
    """A copy of ``model`` with ``weights`` (a :func:`_snapshots` entry) loaded."""
    out = copy.deepcopy(model)
    params = dict(out.named_parameters())
    with torch.no_grad():
        for name, value in weights.items():
            params[name].copy_(value)
    return out


def lora_curve(
    rows: dict[str, dict[str, Any]], snapshots: dict[tuple[str, int], dict[str, float]], steps: int
) -> dict[str, Any]:
    """Prompt accuracy of the naive run and of DC-Gen's stage 3 against LoRA steps: the
    snapshots plus the end points (naive at step 0 = random latent layers on the untouched
    DiT; DC-Gen at step 0 = stage 1+2; both at ``steps`` = the report rows)."""
    points = {
        ("naive", steps): rows["naive"],
        ("dcgen", 0): rows["stage1+2"],
        ("dcgen", steps): rows["dcgen"],
    }
    points.update(snapshots)
    out: dict[str, Any] = {"steps": sorted({n for _, n in points})}
    for run in ("naive", "dcgen"):
        out[run] = {
            str(n): {
                "prompt_accuracy": points[(run, n)]["prompt_accuracy"],
                "frechet_distance": points[(run, n)]["frechet_distance"],
            }
            for n in out["steps"]
            if (run, n) in points
        }

    def first_reaching(run: str, target: float) -> int | None:
        hits = [int(n) for n, v in out[run].items() if v["prompt_accuracy"] >= target]
        return min(hits) if hits else None

    stage1 = rows["stage1"]["prompt_accuracy"]
    out["stage1_accuracy"] = stage1
    out["naive_steps_to_reach_stage1"] = first_reaching("naive", stage1)
    out["dcgen_steps_to_reach_naive_final"] = first_reaching(
        "dcgen", rows["naive"]["prompt_accuracy"]
    )
    return out


def _check_latency_sizes(sizes: Sequence[int], assets: A.ToyAssets) -> None:
    """Every size must give a whole token grid in both spaces: f8 with 2x2 patches and the
    DC-AE's 1x1 patches."""
    step = math.lcm(16, assets.dcae.spatial_compression_ratio)
    bad = [v for v in sizes if v % step]
    if bad:
        raise ValueError(
            f"demo setting latency_sizes: expected multiples of {step} pixels (a whole token grid "
            f"for the f8 VAE with 2x2 patches and the f{assets.dcae.spatial_compression_ratio} "
            f"DC-AE), got {bad}"
        )


class BaseFeatures:
    """The base model's image hidden states on a fixed batch of training images, computed once
    and compared with each adapted model's on the DC-AE latents of the same images."""

    @torch.no_grad()
    def __init__(
        self,
        base: nn.Module,
        data: Sequence[dict[str, torch.Tensor]],
        layers: Sequence[int],
        device: torch.device,
        count: int = 32,
    ) -> None:
        self.layers = list(layers)
        self.batch = {k: torch.stack([d[k] for d in data[:count]]).to(device) for k in data[0]}
        ad = adapter_for(base)
        self.feats = _block_features(ad, self.batch["base_latent"], self.batch, layers, 0.0)
        self.grid = self.batch["base_latent"].shape[-1] // ad.patch_size
        self.factor = self.grid // self.batch["dcae_latent"].shape[-1]

    @torch.no_grad()
    def distances(self, model: nn.Module) -> dict[int, float]:
        """Relative squared distance ||h_base - h||^2 / ||h_base||^2 after each block, the base
        tokens averaged onto the DC-AE grid (as stage 1 compares them)."""
        b = self.batch
        feats = _block_features(adapter_for(model), b["dcae_latent"], b, self.layers, 0.0)
        hw = (self.grid, self.grid)
        return {
            i: feature_distance(self.feats[i], feats[i], "relative", hw, self.factor, "avg")
            for i in self.layers
        }


# ------------------------------------------------------------------------------------ run


def _stage_config(settings: DemoSettings, stage: str, out_dir: Path, steps: int) -> TrainConfig:
    return TrainConfig(
        stage=stage,
        transformer="(in memory: the toy base model)",
        cache_dir="(in memory: the demo's training data)",
        out_dir=str(out_dir),
        steps=steps,
        batch_size=settings.batch_size,
        lr=settings.lr,
        lora_rank=settings.lora_rank,
        lora_alpha=float(settings.lora_rank),
        warmup_steps=min(20, steps // 10),
        seed=settings.seed,
        mixed_precision="bf16" if settings.device.startswith("cuda") else "no",
        align_sgd_steps=settings.align_sgd_steps,
        align_feature_layers=tuple(settings.feature_layers),
        align_head="ridge",  # stage 1 alone must sample: a closed-form head on the frozen DiT
        align_head_samples=settings.train_images,
        align_positions=settings.align_positions,
        checkpoint_every=max(steps, settings.align_sgd_steps, 1),
        keep_checkpoints=1,
        log_every=1,
        resume=False,
        device=settings.device,
    ).validate()


def _fresh_dir(path: Path) -> Path:
    """A stage folder without a previous run's log (the demo always trains from scratch)."""
    path.mkdir(parents=True, exist_ok=True)
    (path / LOG_NAME).unlink(missing_ok=True)
    return path


def run_demo(
    out_dir: str | Path,
    settings: DemoSettings | None = None,
    progress: bool = True,
    echo: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """The whole demo; returns the report dict (also written as report.json)."""
    settings = (settings or DemoSettings()).validate()
    say = echo or (lambda msg: logger.info("%s", msg))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device(settings.device)
    t_start = time.perf_counter()
    torch.manual_seed(settings.seed)

    assets = A.load_toy_assets(settings.assets, device)
    layers = [
        i for i in settings.feature_layers if i < len(adapter_for(assets.transformer).blocks())
    ]
    settings.feature_layers = tuple(layers)
    say(f"toy world from {assets.root} ({assets.image_size}x{assets.image_size} images)")
    _check_latency_sizes(settings.latency_sizes, assets)
    data = build_training_data(assets, settings.train_images, device, progress)
    say(f"encoded {len(data)} training images into both latent spaces")

    timings: dict[str, float] = {}
    base = assets.transformer

    def stage(name: str, fn: Callable[[], dict]) -> dict:
        t0 = time.perf_counter()
        say(f"{name} ...")
        result = fn()
        timings[name] = time.perf_counter() - t0
        say(f"{name}: done in {timings[name]:.0f} s")
        return result

    # Stage 1: new embedder (ridge fit + refinement) and a zero head; the DiT is not touched.
    s1 = copy.deepcopy(base)
    cfg1 = _stage_config(settings, "align", out / "stage1", settings.output_steps)
    summary1 = stage(
        "stage 1 (align embedder)",
        lambda: align_embedder(
            s1, data, cfg1, run_dir=_fresh_dir(out / "stage1"), progress=progress
        ),
    )
    # How much of the velocity a linear head reads from the last hidden states: the frozen blocks
    # on the aligned embedder (stage 1's ridge head) vs the base model on its own latents.
    # A third point separates the two causes of the gap: stage 1 on an ideal coarse latent (the
    # base latent itself averaged onto the DC-AE grid, a linear function of it) costs only the
    # coarser grid; the rest is the DC-AE latent's non-linear relation to the base latent.
    readout = {
        "stage1": summary1["head"]["readout_r2"],
        "base": readout_r2(base, data, cfg1, latent_key="base_latent"),
        "coarse_base_latent": stage(
            "stage 1 on the averaged base latent (reference)",
            lambda: _coarse_reference_r2(
                base, data, replace(cfg1, align_sgd_steps=0), summary1["downsample_factor"]
            ),
        ),
    }
    # Stage 2: the output layer (and the embedder) on the flow-matching loss, DiT frozen.
    s12 = copy.deepcopy(s1)
    cfg2 = _stage_config(settings, "output", out / "stage2", settings.output_steps)
    summary2 = stage(
        "stage 2 (output layer)",
        lambda: train_output_layer(
            s12, data, cfg2, run_dir=_fresh_dir(out / "stage2"), progress=progress
        ),
    )
    # Stage 3: LoRA on the blocks, embedder and head trained.
    full = copy.deepcopy(s12)
    cfg3 = _stage_config(settings, "finetune", out / "stage3", settings.lora_steps)
    curve_steps = sorted({n for n in settings.curve_steps if n < settings.lora_steps})
    snap3, saved3 = _snapshots(full, curve_steps)
    summary3 = stage(
        "stage 3 (LoRA)",
        lambda: finetune_lora(
            full, data, cfg3, run_dir=_fresh_dir(out / "stage3"), progress=progress, on_step=snap3
        ),
    )
    # Naive: random new embedder and head, then the same LoRA budget.
    naive = copy.deepcopy(base)
    torch.manual_seed(settings.seed)
    naive_adapter = adapter_for(naive)
    naive_adapter.replace_latent_layers(int(assets.dcae.latent_channels), 1, init="random")
    if settings.align_positions == "base":
        # The same position layout as the aligned models, so the rows differ only by alignment.
        naive_adapter.set_position_scale(adapter_for(s1).position_scale)
    naive.to(device)
    # Before any training: random latent layers on the untouched DiT, stage 1's counterpart.
    naive_untrained = copy.deepcopy(naive)
    cfgn = _stage_config(settings, "finetune", out / "naive", settings.lora_steps)
    snapn, savedn = _snapshots(naive, curve_steps)
    summary_naive = stage(
        "naive baseline (LoRA, no alignment)",
        lambda: finetune_lora(
            naive, data, cfgn, run_dir=_fresh_dir(out / "naive"), progress=progress, on_step=snapn
        ),
    )
    # The curve's intermediate models: the final ones with the snapshot weights (LoRA unfused).
    curve_models = {
        **{("naive", n): _with_weights(naive, w) for n, w in savedn.items()},
        **{("dcgen", n): _with_weights(full, w) for n, w in saved3.items()},
        ("naive", 0): naive_untrained,
    }

    # Inference form: LoRA folded into the weights (what `dcgen export` ships).
    fuse_lora(full)
    fuse_lora(naive)
    models = {"base": base, "naive": naive, "stage1": s1, "stage1+2": s12, "dcgen": full}
    for m in [*models.values(), *curve_models.values()]:
        m.eval().requires_grad_(False)
    spaces = _spaces(assets, models)

    # ---- evaluation: held-out prompts, one fixed noise seed per prompt for every model.
    world = ShapesWorld(
        A.EVAL_SEED, assets.image_size, length=settings.eval_prompts + settings.reference_images
    )
    _, captions, _ = world.batch(0, settings.eval_prompts)
    real, _, _ = world.batch(settings.eval_prompts, settings.reference_images)
    with torch.no_grad():
        embeds, pooled = assets.text_encoder(captions)
        real_features = assets.evaluator.features(real.to(device)).cpu()
    seeds = [settings.seed * 100_003 + i for i in range(settings.eval_prompts)]
    base_features = BaseFeatures(base, data, layers, device)
    images: dict[str, torch.Tensor] = {}
    rows: dict[str, dict[str, Any]] = {}
    t_eval = time.perf_counter()

    def quality(sp: Space) -> tuple[torch.Tensor, dict[str, float]]:
        imgs = generate(sp, embeds, pooled, seeds, settings.sampling_steps, device)
        scores = score_prompts(assets.evaluator.predict(imgs.to(device)).cpu(), captions)
        fd = frechet_distance(assets.evaluator.features(imgs.to(device)).cpu(), real_features)
        return imgs, {**scores, "frechet_distance": fd}

    for name in _bar(ROWS, "evaluate", progress):
        sp = spaces[name]
        images[name], scores = quality(sp)
        throughput = measure_throughput(
            sp, embeds, pooled, settings.sampling_steps, min(32, len(captions)), device
        )
        ad = adapter_for(sp.transformer)
        dist = (
            {i: 0.0 for i in layers} if name == "base" else base_features.distances(sp.transformer)
        )
        rows[name] = {
            "model": ROW_TITLES[name],
            "tokens_per_image": ad.num_tokens(sp.size, sp.size),
            # Joint attention also carries the text tokens, which do not shrink.
            "sequence_length": ad.num_tokens(sp.size, sp.size) + int(embeds.shape[1]),
            "throughput_images_per_s": throughput,
            **scores,
            "feature_distance": {str(i): dist[i] for i in layers},
        }
    latencies = measure_latencies(
        {n: spaces[n] for n in ROWS},
        embeds,
        pooled,
        settings.sampling_steps,
        settings.latency_repeats,
        device,
    )
    for name, latency in latencies.items():
        rows[name]["latency_s"] = latency["total"]
        rows[name]["denoise_latency_s"] = latency["denoise"]
        rows[name]["decode_latency_s"] = latency["decode"]
    timings["evaluation"] = time.perf_counter() - t_eval
    t_curve = time.perf_counter()
    curve_scores = {
        key: quality(_spaces(assets, {key[0]: m})[key[0]])[1]
        for key, m in _bar(list(curve_models.items()), "accuracy vs LoRA steps", progress)
    }
    curve = lora_curve(rows, curve_scores, settings.lora_steps)
    timings["lora_curve"] = time.perf_counter() - t_curve
    t_sweep = time.perf_counter()
    by_size = latency_by_resolution(
        spaces["base"],
        spaces["dcgen"],
        settings.latency_sizes,
        embeds,
        pooled,
        settings.sampling_steps,
        settings.resolution_repeats,
        device,
        progress,
    )
    timings["latency_by_resolution"] = time.perf_counter() - t_sweep
    base_row = rows["base"]
    for row in rows.values():
        row["latency_ratio_to_base"] = row["latency_s"] / base_row["latency_s"]
        row["speedup_vs_base"] = base_row["latency_s"] / row["latency_s"]
        row["denoise_speedup_vs_base"] = base_row["denoise_latency_s"] / row["denoise_latency_s"]
        row["throughput_vs_base"] = (
            row["throughput_images_per_s"] / base_row["throughput_images_per_s"]
        )
        row["prompt_accuracy_vs_base"] = (
            row["prompt_accuracy"] / base_row["prompt_accuracy"]
            if base_row["prompt_accuracy"] > 0
            else math.nan
        )

    # ---- files
    grid = image_grid(
        [images[n][: settings.grid_prompts] for n in ROWS],
        [n for n in ROWS],
        captions[: settings.grid_prompts],
    )
    grid.save(out / "grid.png")
    curves = loss_curves(out, ["stage1", "stage2", "stage3", "naive"])
    curves.save(out / "loss_curves.png")
    timings["total"] = time.perf_counter() - t_start
    fd1 = summary1["feature_distance"]
    report = {
        "format": "dcgen-demo-report/1",
        "settings": asdict(settings),
        "device": str(device),
        "threads": torch.get_num_threads(),
        "image_size": assets.image_size,
        "assets": str(assets.root),
        "rows": rows,
        "latency_by_resolution": by_size,
        "lora_curve": curve,
        "alignment": {
            "layers": fd1["layers"],
            "feature_distance_random_embedder": fd1["before"],
            "feature_distance_after_stage1": fd1["after"],
            "align_mse": summary1["align_mse"],
            "embedder_rank": summary1["embedder_rank"],
            "latent_channels": summary1["latent_channels"],
            "velocity_readout_r2": readout,
        },
        "stages": {
            "stage1": summary1,
            "stage2": summary2,
            "stage3": summary3,
            "naive": summary_naive,
        },
        "timings_s": timings,
        "files": {"grid": "grid.png", "loss_curves": "loss_curves.png", "report": "report.md"},
    }
    report["checks"] = claims(report)
    (out / "report.json").write_text(json.dumps(report, indent=1, default=float))
    (out / "report.md").write_text(markdown_report(report))
    return report


# ---------------------------------------------------------------------------------- report


def claims(report: dict[str, Any]) -> dict[str, Any]:
    """DC-Gen's claims on this run, each with the numbers behind it (never tuned to pass)."""
    rows = report["rows"]
    fd_before = report["alignment"]["feature_distance_random_embedder"]
    fd_after = report["alignment"]["feature_distance_after_stage1"]
    drop = [b / a if a > 0 else math.inf for b, a in zip(fd_before, fd_after)]
    base_acc = rows["base"]["prompt_accuracy"]
    return {
        "stage1_beats_naive": {
            "stage1": rows["stage1"]["prompt_accuracy"],
            "naive": rows["naive"]["prompt_accuracy"],
            "holds": rows["stage1"]["prompt_accuracy"] > rows["naive"]["prompt_accuracy"],
        },
        "dcgen_reaches_90pct_of_base": {
            "dcgen": rows["dcgen"]["prompt_accuracy"],
            "base": base_acc,
            "holds": rows["dcgen"]["prompt_accuracy"] >= 0.9 * base_acc,
        },
        "token_ratio": rows["base"]["tokens_per_image"] / rows["dcgen"]["tokens_per_image"],
        "sequence_ratio": rows["base"]["sequence_length"] / rows["dcgen"]["sequence_length"],
        "latency_speedup": rows["dcgen"]["speedup_vs_base"],
        "denoise_latency_speedup": rows["dcgen"]["denoise_speedup_vs_base"],
        "throughput_speedup": rows["dcgen"]["throughput_vs_base"],
        "latency_matches_token_ratio": _latency_vs_tokens(report),
        # The same comparison at equal DiT training (none): aligned vs random latent layers.
        "stage1_beats_untrained_naive": {
            "stage1": rows["stage1"]["prompt_accuracy"],
            "naive_untrained": report["lora_curve"]["naive"]["0"]["prompt_accuracy"],
            "holds": rows["stage1"]["prompt_accuracy"]
            > report["lora_curve"]["naive"]["0"]["prompt_accuracy"],
        },
        "naive_lora_steps_to_reach_stage1": report["lora_curve"]["naive_steps_to_reach_stage1"],
        "dcgen_lora_steps_to_reach_naive_final": report["lora_curve"][
            "dcgen_steps_to_reach_naive_final"
        ],
        "feature_distance_drop_after_stage1": {
            "factor_per_layer": drop,
            "holds": bool(drop) and min(drop) >= 10.0,
        },
    }


def _latency_vs_tokens(report: dict[str, Any]) -> dict[str, Any]:
    """Does the measured batch-1 speed-up reach the token ratio: at the toy's own size, and at
    which of the larger sizes first."""
    rows = report["rows"]
    ratio = rows["base"]["tokens_per_image"] / rows["dcgen"]["tokens_per_image"]
    sweep = report.get("latency_by_resolution", [])
    reached = [r["image_size"] for r in sweep if r["speedup"] >= r["token_ratio"]]
    return {
        "token_ratio": ratio,
        "at_training_size": rows["dcgen"]["speedup_vs_base"],
        "holds_at_training_size": rows["dcgen"]["speedup_vs_base"] >= ratio,
        "by_size": {str(r["image_size"]): r["speedup"] for r in sweep},
        "first_size_reached": reached[0] if reached else None,
    }


def markdown_report(report: dict[str, Any]) -> str:
    rows = report["rows"]
    layers = report["alignment"]["layers"]
    head = (
        "| model | tokens / image | latency / image | vs base | denoise / image | vs base | "
        "decode / image | batch throughput | vs base | "
        "prompt accuracy | Frechet dist. | "
        + " | ".join(f"feat. dist. block {i}" for i in layers)
        + " |"
    )
    lines = [
        "# dcgen demo: DC-Gen on the toy world",
        "",
        f"Device {report['device']} ({report['threads']} threads), "
        f"{report['image_size']}x{report['image_size']} images, "
        f"{report['settings']['eval_prompts']} held-out prompts, "
        f"{report['settings']['sampling_steps']} Euler steps; total run "
        f"{report['timings_s']['total']:.0f} s.",
        "",
        head,
        "|" + "---|" * (11 + len(layers)),
    ]
    for name in ROWS:
        r = rows[name]
        lines.append(
            f"| {r['model']} | {r['tokens_per_image']} | {r['latency_s'] * 1000:.1f} ms | "
            f"{r['speedup_vs_base']:.2f}x | {r['denoise_latency_s'] * 1000:.1f} ms | "
            f"{r['denoise_speedup_vs_base']:.2f}x | {r['decode_latency_s'] * 1000:.1f} ms | "
            f"{r['throughput_images_per_s']:.1f} img/s | "
            f"{r['throughput_vs_base']:.2f}x | {r['prompt_accuracy']:.3f} | "
            f"{r['frechet_distance']:.3f} | "
            + " | ".join(f"{r['feature_distance'][str(i)]:.3f}" for i in layers)
            + " |"
        )
    a = report["alignment"]
    c = report["checks"]
    lines += [
        "",
        "Latency: median of batch-1 runs after a warm-up, split into denoise (the transformer's "
        "Euler steps, where the token count matters) and decode (the autoencoder); speed-up = "
        "base latency / this row's. Batch throughput: images per second at up to 32 images per call. Feature distance: ||h_base - h||^2 / ||h_base||^2 of the image "
        "hidden states after each block vs the base model on the same images (0 = identical; "
        "the new model's tokens compared with the base tokens averaged onto its grid).",
        "",
        "## Alignment (stage 1)",
        "",
        "Squared L2 per token between the base model's and the new model's image hidden states "
        "(clean latents of the same training images), with the new embedder random vs aligned:",
        "",
        "| block | random embedder | after stage 1 | drop |",
        "|---|---|---|---|",
    ]
    for i, b, f in zip(
        layers, a["feature_distance_random_embedder"], a["feature_distance_after_stage1"]
    ):
        lines.append(f"| {i} | {b:.4f} | {f:.4f} | {b / f if f > 0 else math.inf:.1f}x |")
    r2 = a["velocity_readout_r2"]
    lines += [
        "",
        f"A linear head on the frozen blocks reads R^2 = {r2['stage1']:.2f} of the flow velocity "
        f"from their last hidden states (the base model on its own latents: "
        f"{r2['base']:.2f}; stage 1 on the base latent averaged onto the DC-AE grid, which "
        f"costs only the coarser grid: {r2['coarse_base_latent']:.2f}). The aligned embedder "
        f"has rank {a['embedder_rank']} for {a['latent_channels']} latent channels.",
        "",
    ]
    lines += _resolution_section(report)
    lines += _curve_section(report)
    lat = c["latency_matches_token_ratio"]
    first = lat["first_size_reached"]
    by_size = ", ".join(f"{k} px {v:.1f}x" for k, v in lat["by_size"].items())
    lines += [
        "## Claims",
        "",
        f"- Stage 1 alone beats the naive baseline: {c['stage1_beats_naive']['stage1']:.3f} vs "
        f"{c['stage1_beats_naive']['naive']:.3f} -> {'yes' if c['stage1_beats_naive']['holds'] else 'NO'}"
        f" (with no DiT training on either side: {c['stage1_beats_untrained_naive']['stage1']:.3f}"
        f" vs {c['stage1_beats_untrained_naive']['naive_untrained']:.3f} -> "
        f"{'yes' if c['stage1_beats_untrained_naive']['holds'] else 'NO'})",
        f"- DC-Gen reaches 90% of the base prompt accuracy: "
        f"{c['dcgen_reaches_90pct_of_base']['dcgen']:.3f} vs base "
        f"{c['dcgen_reaches_90pct_of_base']['base']:.3f} -> "
        f"{'yes' if c['dcgen_reaches_90pct_of_base']['holds'] else 'NO'}",
        f"- Tokens per image {c['token_ratio']:.0f}x fewer (the joint sequence with the text "
        f"tokens {c['sequence_ratio']:.1f}x shorter); measured latency "
        f"{c['latency_speedup']:.2f}x lower at batch 1 ({c['denoise_latency_speedup']:.2f}x for "
        f"the denoising alone), throughput "
        f"{c['throughput_speedup']:.2f}x higher in batches",
        f"- Latency ratio matches the {lat['token_ratio']:.0f}x token ratio at the training size: "
        f"{'yes' if lat['holds_at_training_size'] else 'NO'} "
        f"({lat['at_training_size']:.2f}x); "
        + (f"reached from {first}x{first} px on" if first else "not reached at the measured sizes")
        + (f" ({by_size})" if by_size else ""),
        f"- Feature distance drops by >= 10x after stage 1 at every reported block: "
        f"{'yes' if c['feature_distance_drop_after_stage1']['holds'] else 'NO'} "
        f"({', '.join(f'{d:.1f}x' for d in c['feature_distance_drop_after_stage1']['factor_per_layer'])})",
        "",
        "Files: grid.png (rows: prompts; columns: " + ", ".join(ROWS) + "), loss_curves.png.",
        "",
    ]
    return "\n".join(lines)


def _resolution_section(report: dict[str, Any]) -> list[str]:
    sweep = report.get("latency_by_resolution", [])
    if not sweep:
        return []
    lines = [
        "## Latency by resolution",
        "",
        "The same base and DC-Gen models sampling larger images than the toy was trained on "
        "(batch 1, the same Euler steps, one timed run after a one-step warm-up; the images are "
        "not evaluated, only the cost, which the token count sets):",
        "",
        "| image | tokens base / DC-Gen | base latency | DC-Gen latency | speed-up | "
        "denoise speed-up |",
        "|---|---|---|---|---|---|",
    ]
    for r in sweep:
        b, d = r["base"], r["dcgen"]
        lines.append(
            f"| {r['image_size']}x{r['image_size']} | {b['tokens_per_image']} / "
            f"{d['tokens_per_image']} | {b['latency_s'] * 1000:.0f} ms | "
            f"{d['latency_s'] * 1000:.0f} ms | {r['speedup']:.2f}x | "
            f"{r['denoise_speedup']:.2f}x |"
        )
    return lines + [""]


def _curve_section(report: dict[str, Any]) -> list[str]:
    curve = report["lora_curve"]

    def cell(run: str, n: int) -> str:
        v = curve[run].get(str(n))
        return f"{v['prompt_accuracy']:.3f} ({v['frechet_distance']:.1f})" if v else "-"

    lines = [
        "## Prompt accuracy vs LoRA steps",
        "",
        "Snapshots of the naive run and of DC-Gen's stage 3 (the same runs as the rows above; "
        "Frechet distance in brackets). Step 0: naive = random latent layers on the untouched "
        "DiT, DC-Gen = stage 1+2. Stage 1 alone (no LoRA step): "
        f"{curve['stage1_accuracy']:.3f}.",
        "",
        "| LoRA steps | naive | DC-Gen |",
        "|---|---|---|",
    ]
    lines += [f"| {n} | {cell('naive', n)} | {cell('dcgen', n)} |" for n in curve["steps"]]
    reach = curve["naive_steps_to_reach_stage1"]
    catch = curve["dcgen_steps_to_reach_naive_final"]
    lines += [
        "",
        "The naive run reaches stage 1's accuracy "
        + (f"after {reach} LoRA steps" if reach is not None else "at none of these steps")
        + "; DC-Gen reaches the naive run's final accuracy "
        + (f"after {catch} LoRA steps." if catch is not None else "at none of these steps."),
        "",
    ]
    return lines


def image_grid(
    columns: Sequence[torch.Tensor], labels: Sequence[str], captions: Sequence[str]
) -> Image.Image:
    """One row per prompt (caption on the left), one column per model."""
    n = min(len(c) for c in columns)
    s = columns[0].shape[-1]
    text_w, head = 260, 22
    img = Image.new("RGB", (text_w + s * len(columns), head + s * n), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    for j, label in enumerate(labels):
        draw.text((text_w + j * s + 4, 4), label, fill=(0, 0, 0), font_size=13)
    for i in range(n):
        words = captions[i].split(" and ")
        for k, w in enumerate(words):
            draw.text((4, head + i * s + 6 + 16 * k), w, fill=(0, 0, 0), font_size=12)
        for j, col in enumerate(columns):
            img.paste(to_pil(col[i]), (text_w + j * s, head + i * s))
    return img


def loss_curves(out: Path, stages: Sequence[str]) -> Image.Image:
    panels = []
    for name in stages:
        losses = [float(e["loss"]) for e in read_log(out / name / LOG_NAME)]
        panels.append(plot_curve(losses if len(losses) > 1 else losses * 2, f"{name}: loss"))
    w, h = panels[0].size
    img = Image.new("RGB", (w * 2, h * math.ceil(len(panels) / 2)), (255, 255, 255))
    for k, p in enumerate(panels):
        img.paste(p, ((k % 2) * w, (k // 2) * h))
    return img
