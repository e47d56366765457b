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
    pipeline/                 the DC-Gen model as a diffusers folder (DCGenToyPipeline):
                              ``dcgen generate --pipeline <out>/pipeline --prompt "..."``
    stage1/ stage2/ stage3/ naive/   the stages' logs, checkpoints and LoRA-curve snapshots
    demo_settings.json        the settings, checked by ``resume=True`` (``dcgen demo --resume``)

A killed run resumes where it stopped (``resume=True``): finished phases reload their final
checkpoint, the interrupted one continues from its last (every ``checkpoint_every`` steps), and
the report is the one the uninterrupted run writes. The evaluation after training is not
checkpointed; it reruns (about a third of the default run).

This module runs it; ``demo_sampling`` samples and times the rows, ``demo_analysis`` holds the
measurements beside the samples, ``demo_report`` writes the report.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from dcgen._files import atomic_folder, atomic_write
from dcgen._json import dumps
from dcgen.adapters import adapter_for
from dcgen.train.checkpoint import checkpoint_step, keeps_rng_state, latest_checkpoint
from dcgen.train.config import TrainConfig
from dcgen.train.loop import CHECKPOINT_DIR, LOG_NAME
from dcgen.train.lora import fuse_lora
from dcgen.train.stages import (
    align_embedder,
    finetune_lora,
    readout_r2,
    train_output_layer,
)

from . import assets as A
from .demo_analysis import (
    BaseFeatures,
    coarse_base_latents,
    coarse_reference_r2,
    lora_curve,
    snapshot_path,
    weight_snapshots,
    with_weights,
)
from .demo_report import ROW_TITLES, ROWS, claims, image_grid, loss_curves, markdown_report
from .demo_sampling import (
    Space,
    generate,
    latency_by_resolution,
    measure_latencies,
    measure_throughput,
    model_spaces,
    progress_bar,
)
from .evaluator import ShapeEvaluator, frechet_distance, score_prompts
from .shapes import ShapesWorld

logger = logging.getLogger(__name__)

__all__ = ["DemoSettings", "ROWS", "build_training_data", "coarse_base_latents", "run_demo"]


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
    # Larger images at which the base and DC-Gen latency is also measured (batch 1, the median
    # of resolution_repeats timed runs each after a short warm-up): the speed-up as a function
    # of the token count.
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
    # Training steps between checkpoints (and at each phase's end): what a killed run loses.
    checkpoint_every: int = 100
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
            "resolution_repeats", "checkpoint_every",
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
        self.feature_layers = tuple(self.feature_layers)
        bad = [v for v in self.feature_layers if not isinstance(v, int) or v < 0]
        if bad:
            raise ValueError(f"demo setting feature_layers: expected block indices >= 0, got {bad}")
        dupes = sorted({v for v in self.feature_layers if self.feature_layers.count(v) > 1})
        if dupes:
            raise ValueError(
                f"demo setting feature_layers: expected distinct block indices, got duplicates "
                f"{dupes} in {list(self.feature_layers)}"
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
    for start in progress_bar(starts, "encode", progress):
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


def _check_feature_layers(layers: Sequence[int], assets: A.ToyAssets) -> None:
    """Every block index must exist in the base model: known once it is loaded, and checked
    then, before any training (a run used to drop the others silently)."""
    n = len(adapter_for(assets.transformer).blocks())
    bad = [i for i in layers if i >= n]
    if bad:
        raise ValueError(
            f"demo setting feature_layers: expected block indices in 0..{n - 1} (the base model "
            f"has {n} blocks), got {bad}"
        )


def quality_scores(
    evaluator: ShapeEvaluator,
    images: torch.Tensor,
    captions: Sequence[str],
    real_features: torch.Tensor,
    device: torch.device,
) -> dict[str, float]:
    """Prompt accuracies and the Frechet distance to ``real_features`` of one row's images.
    Non-finite images (a diverged model) count as wrong answers and make the distance inf,
    with their number in ``non_finite_images``: one diverged row is reported, not a crash of
    the whole run after its training."""
    scores = score_prompts(evaluator.predict(images.to(device)).cpu(), captions)
    features = evaluator.features(images.to(device)).cpu()
    bad = int((~torch.isfinite(features)).any(1).sum())
    fd = math.inf if bad else frechet_distance(features, real_features)
    return {**scores, "frechet_distance": fd, "non_finite_images": bad}


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


# ------------------------------------------------------------------------------------ run


SETTINGS_NAME = "demo_settings.json"
SNAPSHOT_DIR = "snapshots"
PIPELINE_DIR = "pipeline"  # the DC-Gen model as a DCGenToyPipeline folder
# Settings a resumed run may change: they change no number of the report.
_FREE_ON_RESUME = ("checkpoint_every",)


PHASES = ("stage1", "stage2", "stage3", "naive")


def _write_pipeline(path: Path, transformer: torch.nn.Module, assets: A.ToyAssets) -> None:
    """Save the trained DC-Gen model with the toy world's DC-AE, text encoder and the FLUX
    scheduler the demo samples with (its Euler steps and shift rule) as a pipeline folder.
    Written beside ``path`` and renamed into place, so a killed run leaves no half folder."""
    from dcgen.pipelines import DCGenToyPipeline
    from dcgen.train.export import default_scheduler

    pipe = DCGenToyPipeline(
        transformer=transformer,
        vae=assets.dcae,
        scheduler=default_scheduler("flux"),
        text_encoder=assets.text_encoder,
    )
    atomic_folder(path, lambda tmp: pipe.save_pretrained(tmp))


def _start_run_folder(out: Path, settings: DemoSettings, resume: bool) -> bool:
    """Write the run's settings and return whether there is a run to resume. Resuming first
    checks that the settings are the ones the run started with (a run resumed with other
    settings would report numbers of neither). Starting over clears every phase's folder up
    front, so no phase can later resume from an older run's checkpoints."""
    path = out / SETTINGS_NAME
    record = json.loads(json.dumps(asdict(settings)))  # tuples -> lists, as read back
    if resume and not path.is_file():
        logger.warning("%s has no %s: nothing to resume, starting over", out, SETTINGS_NAME)
        resume = False
    if resume:
        old = json.loads(path.read_text())
        changed = sorted(
            k
            for k in set(old) | set(record)
            if k not in _FREE_ON_RESUME and old.get(k) != record.get(k)
        )
        if changed:
            what = "; ".join(f"{k}: {old.get(k)!r} then, {record.get(k)!r} now" for k in changed)
            raise ValueError(
                f"cannot resume the demo in {out}: it was started with other settings ({what}). "
                "Resume with the same settings, or run without resume to start over."
            )
    else:
        for folder in PHASES:
            _phase_dir(out / folder, resume=False)
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(record, indent=1)))
    return resume


def _phase_dir(path: Path, resume: bool, snapshot_steps: Sequence[int] = ()) -> int:
    """Prepare one training phase's folder; return the step it resumes from (0: from scratch,
    after removing a previous run's log, checkpoints and snapshots). A phase whose checkpoint
    is past a LoRA-curve step without that step's snapshot starts over (a kill between the
    checkpoint and the snapshot), so that the curve is never missing a point."""
    path.mkdir(parents=True, exist_ok=True)
    start = 0
    if resume:
        latest = latest_checkpoint(path / CHECKPOINT_DIR)
        start = checkpoint_step(latest) if latest is not None else 0
        missing = [
            n
            for n in snapshot_steps
            if n <= start and not snapshot_path(path / SNAPSHOT_DIR, n).is_file()
        ]
        if missing:
            logger.warning(
                "%s: checkpoint at step %d but no snapshot of step(s) %s; the phase starts over",
                path, start, missing,
            )  # fmt: skip
            start = 0
    if start == 0:
        (path / LOG_NAME).unlink(missing_ok=True)
        shutil.rmtree(path / CHECKPOINT_DIR, ignore_errors=True)
        shutil.rmtree(path / SNAPSHOT_DIR, ignore_errors=True)
    return start


def _stage_config(
    settings: DemoSettings, stage: str, out_dir: Path, steps: int, resume: bool
) -> TrainConfig:
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
        checkpoint_every=settings.checkpoint_every,
        keep_checkpoints=1,
        log_every=1,
        resume=resume,
        device=settings.device,
    ).validate()


@keeps_rng_state
def run_demo(
    out_dir: str | Path,
    settings: DemoSettings | None = None,
    progress: bool = True,
    echo: Callable[[str], None] | None = None,
    resume: bool = False,
) -> dict[str, Any]:
    """The whole demo; returns the report dict (also written as report.json). ``resume``
    continues a killed run in ``out_dir`` (same settings) instead of starting over."""
    settings = (settings or DemoSettings()).validate()
    say = echo or (lambda msg: logger.info("%s", msg))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device(settings.device)
    t_start = time.perf_counter()
    torch.manual_seed(settings.seed)

    assets = A.load_toy_assets(settings.assets, device)
    _check_feature_layers(settings.feature_layers, assets)
    layers = list(settings.feature_layers)
    resume = _start_run_folder(out, settings, resume)
    say(f"toy world from {assets.root} ({assets.image_size}x{assets.image_size} images)")
    _check_latency_sizes(settings.latency_sizes, assets)
    data = build_training_data(assets, settings.train_images, device, progress)
    say(f"encoded {len(data)} training images into both latent spaces")

    timings: dict[str, float] = {}
    base = assets.transformer

    curve_steps = sorted({n for n in settings.curve_steps if n < settings.lora_steps})
    resumed: dict[str, int] = {}

    def phase(folder: str, stage_name: str, steps: int) -> tuple[TrainConfig, Path]:
        """The config and folder of one training phase, resuming it when asked and possible."""
        run_dir = out / folder
        snapshots = curve_steps if stage_name == "finetune" else ()
        # Without resume, _start_run_folder already cleared the folder.
        start = _phase_dir(run_dir, True, snapshots) if resume else 0
        if start:
            resumed[folder] = start
            total = settings.align_sgd_steps if stage_name == "align" else steps
            say(f"{folder}: resuming at step {start} of {total}")
        return _stage_config(settings, stage_name, run_dir, steps, resume and start > 0), run_dir

    def stage(name: str, fn: Callable[[], dict]) -> dict:
        t0 = time.perf_counter()
        say(f"{name} ...")
        result = fn()
        timings[name] = time.perf_counter() - t0
        say(f"{name}: done in {timings[name]:.0f} s")
        return result

    # Stage 1: new embedder (ridge fit + refinement) and a zero head; the DiT is not touched.
    s1 = copy.deepcopy(base)
    cfg1, dir1 = phase("stage1", "align", settings.output_steps)
    # Stage 1 runs align_sgd_steps (its warmup, from output_steps, as in every measured run);
    # steps back at its default, which stage 1 does not use (and warns about otherwise).
    cfg1 = replace(cfg1, steps=TrainConfig.steps)
    summary1 = stage(
        "stage 1 (align embedder)",
        lambda: align_embedder(s1, data, cfg1, run_dir=dir1, progress=progress),
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
            lambda: coarse_reference_r2(
                base, data, replace(cfg1, align_sgd_steps=0), summary1["downsample_factor"]
            ),
        ),
    }
    # Stage 2: the output layer (and the embedder) on the flow-matching loss, DiT frozen.
    s12 = copy.deepcopy(s1)
    cfg2, dir2 = phase("stage2", "output", settings.output_steps)
    summary2 = stage(
        "stage 2 (output layer)",
        lambda: train_output_layer(s12, data, cfg2, run_dir=dir2, progress=progress),
    )
    # Stage 3: LoRA on the blocks, embedder and head trained.
    full = copy.deepcopy(s12)
    cfg3, dir3 = phase("stage3", "finetune", settings.lora_steps)
    snap3, saved3 = weight_snapshots(full, curve_steps, dir3 / SNAPSHOT_DIR)
    summary3 = stage(
        "stage 3 (LoRA)",
        lambda: finetune_lora(full, data, cfg3, run_dir=dir3, progress=progress, on_step=snap3),
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
    cfgn, dirn = phase("naive", "finetune", settings.lora_steps)
    snapn, savedn = weight_snapshots(naive, curve_steps, dirn / SNAPSHOT_DIR)
    summary_naive = stage(
        "naive baseline (LoRA, no alignment)",
        lambda: finetune_lora(naive, data, cfgn, run_dir=dirn, progress=progress, on_step=snapn),
    )
    # The curve's intermediate models: the final ones with the snapshot weights (LoRA unfused).
    curve_models = {
        **{("naive", n): with_weights(naive, w) for n, w in savedn.items()},
        **{("dcgen", n): with_weights(full, w) for n, w in saved3.items()},
        ("naive", 0): naive_untrained,
    }

    # Inference form: LoRA folded into the weights (what `dcgen export` ships).
    fuse_lora(full)
    fuse_lora(naive)
    _write_pipeline(out / PIPELINE_DIR, full, assets)
    say(f"wrote the DC-Gen model to {out / PIPELINE_DIR} (dcgen generate --pipeline ...)")
    models = {"base": base, "naive": naive, "stage1": s1, "stage1+2": s12, "dcgen": full}
    for m in [*models.values(), *curve_models.values()]:
        m.eval().requires_grad_(False)
    spaces = model_spaces(assets, models)

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

    def quality(sp: Space, what: str) -> tuple[torch.Tensor, dict[str, float]]:
        imgs = generate(sp, embeds, pooled, seeds, settings.sampling_steps, device)
        scores = quality_scores(assets.evaluator, imgs, captions, real_features, device)
        if scores["non_finite_images"]:
            logger.warning(
                "%s: %d of %d images are not finite (diverged): scored wrong, Frechet distance "
                "inf", what, scores["non_finite_images"], len(imgs),
            )  # fmt: skip
        return imgs, scores

    for name in progress_bar(ROWS, "evaluate", progress):
        sp = spaces[name]
        images[name], scores = quality(sp, name)
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
        key: quality(model_spaces(assets, {key[0]: m})[key[0]], f"{key[0]} at step {key[1]}")[1]
        for key, m in progress_bar(list(curve_models.items()), "accuracy vs LoRA steps", progress)
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
    atomic_write(out / "grid.png", lambda tmp: grid.save(tmp, format="PNG"))
    curves = loss_curves(out, list(PHASES))
    atomic_write(out / "loss_curves.png", lambda tmp: curves.save(tmp, format="PNG"))
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
        # Training phases continued from a checkpoint (folder -> step), {} for one clean run.
        "resumed_from_step": resumed,
        "files": {
            "grid": "grid.png",
            "loss_curves": "loss_curves.png",
            "report": "report.md",
            "pipeline": PIPELINE_DIR,
        },
    }
    report["checks"] = claims(report)
    # each file whole or not at all: a failed write (a full disk) left a cut-off report.json
    # in place of the earlier run's
    text, markdown = dumps(report, indent=1, default=float), markdown_report(report)
    atomic_write(out / "report.json", lambda tmp: Path(tmp).write_text(text))
    atomic_write(out / "report.md", lambda tmp: Path(tmp).write_text(markdown))
    return report
