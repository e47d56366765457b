"""The three DC-Gen post-training stages (docs/method.md section 1) and the ``run`` entry point.

- stage 1, ``align``: :func:`align_embedder`. The new embedder (DC-AE latents, 1x1 patches) is
  fitted to the base embedder's token map downsampled onto the new grid: closed-form ridge
  over every cached token (streamed through :class:`RidgeAccumulator`), then refinement with
  the shared training loop. DiT frozen. Reports the per-block feature distance to the base model
  before (random embedder) and after.
- stage 2, ``output``: :func:`train_output_layer`. DiT frozen; head (and embedder) trained with
  the flow-matching loss on DC-AE latents.
- stage 3, ``finetune``: :func:`finetune_lora`. LoRA on the blocks, embedder and head fully
  trained, flow-matching loss, guidance values sampled for guidance-distilled bases.

Each stage function works on in-memory objects (a diffusers transformer and any dataset of
dicts with ``dcae_latent`` / ``base_latent`` / ``prompt_embeds`` / ``pooled_prompt_embeds``
tensors, e.g. a :class:`LatentCache`); :func:`run` adds the files: it loads the transformer and
cache named by a :class:`TrainConfig` and writes the run folder::

    out_dir/config.json                      the config as run
    out_dir/inputs.json                      the latent cache's fingerprint (resume checks it)
    out_dir/log.jsonl                        one JSON line per step (tag, step, loss, lr, ...)
    out_dir/loss.png                         loss curve
    out_dir/checkpoints/step-XXXXXXXX/       resumable checkpoints (trainable params only)
    out_dir/latent_layers.safetensors        new embedder + head, "embedder.*" / "head.*" keys,
                                             metadata: format, family, latent_channels,
                                             patch_size, position_scale (when not 1),
                                             dcae_factor (the DC-AE stage 1 aligned to), stage
    out_dir/transformer/                     stages 1-2: the adapted transformer (save_pretrained)
    out_dir/scheduler/                       stages 1-2: the source pipeline's scheduler/, where
                                             it has one (export samples with its solver, shift)
    out_dir/pytorch_lora_weights.safetensors stage 3: the LoRA (dcgen.train.lora.save_lora)
    out_dir/summary.json                     what run() returns
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dcgen._files import atomic_write, naming_write_errors, swap_in
from dcgen._json import dumps
from dcgen.adapters import DiTAdapter, adapter_for, pack_latents
from dcgen.adapters.provenance import dcae_factor_mismatch, record_dcae_factor
from dcgen.sampling.shift import resolve_shift

from .align import RidgeAccumulator, alignment_loss, downsample_tokens, init_from_ridge
from .buckets import BucketBatchSampler
from .cache import CacheError, LatentCache
from .checkpoint import keeps_rng_state, latest_checkpoint
from .config import PATH_FIELDS, ConfigError, TrainConfig
from .distributed import DistContext, init_distributed
from .ema import EMA
from .features import feature_distance
from .latent_layers import (
    LATENT_LAYERS_FORMAT,
    LATENT_LAYERS_NAME,
    load_latent_layers,
    save_latent_layers,
)
from .loop import CHECKPOINT_DIR, LOG_NAME, LoopResult, StepRandom, read_log, train_loop
from .lora import add_lora, save_lora
from .losses import flow_matching_loss
from .null_text import drop_captions, load_null_text, null_text_path

logger = logging.getLogger(__name__)

__all__ = [
    "LATENT_LAYERS_FORMAT",
    "LATENT_LAYERS_NAME",
    "TRANSFORMER_DIR",
    "FlowMatchingModule",
    "align_embedder",
    "dcae_facts",
    "finetune_lora",
    "load_latent_layers",
    "load_transformer",
    "open_cache",
    "run",
    "save_latent_layers",
    "train_output_layer",
]


TRANSFORMER_DIR = "transformer"
DEFAULT_GUIDANCE = 3.5  # FLUX-dev's default, used when guidance_range is None

OnStep = Callable[[int, float], None]


# ---------------------------------------------------------------------------------- file helpers


def _copy_source_scheduler(source: str | Path, folder: Path) -> bool:
    """Copy the source pipeline's ``scheduler/`` (beside its transformer folder) into ``folder``
    (the stage's staged outputs, swapped in whole): export reads the solver and flow shift from
    there, and an export from a stage's output fell back to the family default (SANA: flow
    shift 3.0 whatever the base model sampled with). False where the source has none."""
    src = Path(source).parent / "scheduler"
    if not (src / "scheduler_config.json").is_file():
        return False
    shutil.copytree(src, folder / "scheduler")
    return True


def transformer_folder(path: str | Path) -> Path:
    """The diffusers transformer folder ``path`` names: the folder itself, or the
    ``transformer/`` it holds (a stage's out_dir, or a pipeline folder)."""
    path = Path(path)
    # transformer/ first: a stage's out_dir has a config.json of its own (the training config),
    # which a stage given that folder read as the model's ("names class None")
    if (path / "transformer" / "config.json").is_file():
        return path / "transformer"
    return path


def load_transformer(
    path: str | Path,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    class_name: str | None = None,
) -> nn.Module:
    """A diffusers transformer folder (class from config.json's ``_class_name`` unless
    ``class_name`` forces one), fp32 by default: training keeps fp32 master weights and
    autocasts to bf16. The one transformer loader; export.py adds folder and family rules."""
    import diffusers

    path = transformer_folder(path)
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise FileNotFoundError(f"transformer: no config.json in {path} (a diffusers folder)")
    name = class_name or json.loads(cfg_file.read_text()).get("_class_name")
    cls = getattr(diffusers, str(name), None)
    if cls is None:
        raise ValueError(f"transformer: {cfg_file} names class {name!r}, not a diffusers model")
    model = cls.from_pretrained(str(path), dtype=dtype)
    return model.to(device)


def dcae_facts(spec: str) -> tuple[int, int]:
    """(latent_channels, spatial factor) of a DC-AE folder (config.json) or preset name,
    without loading weights."""
    from dcgen.autoencoders import DCAEConfig, get_preset

    path = Path(spec)
    if path.is_dir():
        cfg_file = path / "config.json"
        if not cfg_file.is_file():
            raise FileNotFoundError(f"dcae: no config.json in {path}")
        data = json.loads(cfg_file.read_text())
        cfg = get_preset(data["model_name"]) if "model_name" in data else DCAEConfig.from_dict(data)
    else:
        try:
            cfg = get_preset(spec)
        except KeyError as err:
            raise ConfigError(f"dcae: {spec!r} is neither a folder nor a preset: {err}") from err
    return int(cfg.latent_channels), int(cfg.spatial_compression_ratio)


def cache_dcae_factor(cache: LatentCache) -> int:
    """The spatial factor of the DC-AE a cache's ``dcae_latent`` came from: its first sample's
    image height over its latent height (from the index; no tensor is read)."""
    record = cache.samples[0]
    shape = record.get("shapes", {}).get("dcae_latent")
    if not shape or len(shape) != 3 or not shape[-2]:
        raise CacheError(f"{cache.root}: sample 0 has no (C, h, w) dcae_latent, got {shape}")
    return int(record["size"][0]) // int(shape[-2])


def _require(sample: dict[str, Any], names: Sequence[str], where: str) -> None:
    missing = [n for n in names if n not in sample]
    if missing:
        raise CacheError(
            f"{where} has no {missing} tensor(s) (has {sorted(k for k in sample)}); precompute "
            "the cache with those encoders"
        )


def _check_channels(adapter: DiTAdapter, dataset: Any, where: str = "the data") -> None:
    _require(dataset[0], ["dcae_latent"], where)
    c = int(dataset[0]["dcae_latent"].shape[0])
    if c != adapter.latent_channels:
        raise ValueError(
            f"DC-AE latents in {where} have {c} channels but the transformer expects "
            f"{adapter.latent_channels}: run stage 1 (align) first, or use the matching DC-AE"
        )


def _ctx(ctx: DistContext | None) -> DistContext:
    return ctx if ctx is not None else DistContext()


def _sample_writer(
    transformer: nn.Module, dataset: Any, cfg: TrainConfig, ctx: DistContext, run_dir: Path
) -> Callable[[int], Any] | None:
    """A SampleWriter when ``cfg.sample_every`` is set and this rank takes part (rank 0, or
    every rank under FSDP, whose forward is collective); None otherwise."""
    if cfg.sample_every is None:
        return None
    if "prompt_embeds" not in dataset[0]:
        logger.warning("sample_every: the data have no prompt_embeds, so no samples are written")
        return None
    from .samples import SampleWriter

    collective = ctx.enabled and cfg.parallel == "fsdp"
    if not (ctx.is_main or collective):
        return None
    return SampleWriter(
        transformer, dataset, cfg, run_dir, is_main=ctx.is_main, collective=collective,
        device=ctx.device,
    )  # fmt: skip


# ------------------------------------------------------------------------------ stage modules


def _embed(embedder: nn.Module, latents: torch.Tensor, patch_size: int) -> torch.Tensor:
    """Token map (B, N, D) of a Linear (FLUX, on packed latents) or kernel=stride Conv2d (SANA)
    embedder, the same computation as ``adapter.embed_tokens``."""
    w = embedder.weight
    if isinstance(embedder, nn.Conv2d):
        return embedder(latents.to(w.dtype)).flatten(2).transpose(1, 2)
    return embedder(pack_latents(latents, patch_size).to(w.dtype))


class _EmbedderAlign(nn.Module):
    """Stage-1 refinement: forward(latents, target) = MSE(new embedder tokens, target)."""

    def __init__(self, embedder: nn.Module) -> None:
        super().__init__()
        self.embedder = embedder

    def forward(self, latents: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return alignment_loss(_embed(self.embedder, latents, 1), target)


class FlowMatchingModule(nn.Module):
    """forward(x0, noise, sigmas, prompt_embeds, ...) = flow-matching loss of the transformer
    through its adapter (one module, so DistributedDataParallel can wrap it)."""

    def __init__(self, transformer: nn.Module) -> None:
        super().__init__()
        self.transformer = transformer
        self.adapter = adapter_for(transformer)

    def forward(
        self,
        x0: torch.Tensor,
        noise: torch.Tensor,
        sigmas: torch.Tensor,
        prompt_embeds: torch.Tensor,
        pooled_prompt_embeds: torch.Tensor | None = None,
        guidance: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        def model_fn(x_t: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
            return self.adapter.predict(
                x_t, s, prompt_embeds, pooled_prompt_embeds, guidance, attention_mask=attention_mask
            )

        return flow_matching_loss(model_fn, x0, sigmas, noise=noise)


def _flow_inputs(
    adapter: DiTAdapter,
    cfg: TrainConfig,
    latent_key: str = "dcae_latent",
    null_text: dict[str, torch.Tensor] | None = None,
) -> Callable[[dict[str, Any], StepRandom], dict[str, Any]]:
    """The training step's inputs from a batch; with ``null_text``, each sample's text is the
    empty prompt's with probability ``cfg.caption_dropout`` (drawn after the others)."""
    guided = bool(getattr(adapter, "has_guidance_embeds", False))

    def make_inputs(batch: dict[str, Any], rnd: StepRandom) -> dict[str, Any]:
        x0 = batch[latent_key].float()
        _, c, h, w = x0.shape
        shift = resolve_shift(
            cfg.shift_rule, adapter.num_tokens(h, w), c, constant=cfg.shift_constant
        )
        # Draw order is part of the determinism contract: sigmas, noise, guidance.
        sigmas = rnd.sigmas(cfg.timestep_sampling, shift)
        noise = rnd.randn(c, h, w)
        guidance = None
        if guided:
            lo, hi = cfg.guidance_range or (DEFAULT_GUIDANCE, DEFAULT_GUIDANCE)
            guidance = rnd.guidance(lo, hi)
        pooled = batch.get("pooled_prompt_embeds")
        inputs = {
            "x0": x0,
            "noise": noise,
            "sigmas": sigmas,
            "prompt_embeds": batch["prompt_embeds"].float(),
            "pooled_prompt_embeds": None if pooled is None else pooled.float(),
            "guidance": guidance,
            # padded text (SANA's Gemma embeddings): the mask the pipelines sample with
            "attention_mask": batch.get("prompt_attention_mask"),
        }
        if null_text is not None:
            inputs = drop_captions(inputs, rnd.uniform() < cfg.caption_dropout, null_text)
        return inputs

    return make_inputs


def _null_text(cfg: TrainConfig) -> dict[str, torch.Tensor] | None:
    """The empty prompt's embeddings when ``cfg.caption_dropout`` asks for them."""
    if not cfg.caption_dropout:
        return None
    return load_null_text(null_text_path(cfg))


# ---------------------------------------------------------------------------------- stage 1


@torch.no_grad()
def _block_features(
    adapter: DiTAdapter,
    latents: torch.Tensor,
    batch: dict[str, Any],
    layers: Sequence[int],
    sigma: float,
) -> dict[int, torch.Tensor]:
    """Image hidden states after ``layers`` for clean-ish latents (noise-free x_t at sigma:
    the two latent spaces have unrelated noise, so only the signal part is comparable)."""
    b = latents.shape[0]
    x = latents * (1.0 - sigma)
    guidance = None
    if getattr(adapter, "has_guidance_embeds", False):
        guidance = torch.full((b,), DEFAULT_GUIDANCE, device=latents.device)
    pooled = batch.get("pooled_prompt_embeds")
    with adapter.capture_hidden_states(layers) as feats:
        adapter.predict(
            x,
            torch.full((b,), sigma, device=latents.device),
            batch["prompt_embeds"].float(),
            None if pooled is None else pooled.float(),
            guidance,
            attention_mask=batch.get("prompt_attention_mask"),
        )
    return {i: feats[i].float() for i in layers}


def _gather_ridge(acc: RidgeAccumulator, ctx: DistContext) -> RidgeAccumulator:
    """Every rank's ridge statistics merged (each rank streamed its own share of the data)."""
    if not ctx.enabled:
        return acc
    merged = RidgeAccumulator(acc.in_features, acc.out_features)
    state = {
        k: (v.cpu() if isinstance(v, torch.Tensor) else v) for k, v in acc.state_dict().items()
    }
    for st in ctx.all_gather_object(state):
        part = RidgeAccumulator(acc.in_features, acc.out_features)
        part.load_state_dict(st)
        merged.merge(part)
    return merged


def _warn_unused_in_stage1(cfg: TrainConfig) -> None:
    """Stage 1 runs a ridge fit and ``align_sgd_steps`` refinement steps: a ``steps`` or
    ``ema_decay`` set for it would otherwise be ignored without a word."""
    if cfg.steps != TrainConfig.steps:  # the dataclass default
        logger.warning(
            "stage 1 (align) does not use steps=%d: it runs align_sgd_steps=%d refinement "
            "steps after the ridge fit; set align_sgd_steps instead",
            cfg.steps,
            cfg.align_sgd_steps,
        )
    if cfg.ema_decay is not None:
        logger.warning("stage 1 (align) keeps no EMA: ema_decay=%s is not used", cfg.ema_decay)


@keeps_rng_state
def align_embedder(
    transformer: nn.Module,
    dataset: Any,
    cfg: TrainConfig,
    *,
    ctx: DistContext | None = None,
    run_dir: str | Path | None = None,
    progress: bool = True,
    on_step: OnStep | None = None,
) -> dict[str, Any]:
    """Stage 1 on a base transformer (in place): replace the latent layers for the dataset's
    DC-AE latents, fit the embedder (ridge + refinement), return the report.

    ``dataset[i]`` needs ``base_latent`` (C_base, H, W), ``dcae_latent`` (C, h, w) of the same
    image, and text embeddings for the feature-distance report. The new grid must be the base
    token grid (H / p_base) divided by an integer factor (2 for f32, 4 for f64).
    """
    ctx = _ctx(ctx)
    _warn_unused_in_stage1(cfg)
    run_dir = Path(run_dir if run_dir is not None else cfg.out_dir)
    device = ctx.device
    adapter = adapter_for(transformer)
    first = dataset[0]
    _require(first, ["base_latent", "dcae_latent"], "the stage-1 data")
    p_base, c_base = adapter.patch_size, adapter.latent_channels
    base_shape, new_shape = tuple(first["base_latent"].shape), tuple(first["dcae_latent"].shape)
    if base_shape[0] != c_base:
        raise ValueError(
            f"base_latent has {base_shape[0]} channels but the base transformer expects {c_base}"
            " (stage 1 starts from the base model)"
        )
    grid_h, grid_w = base_shape[1] // p_base, base_shape[2] // p_base
    factor = grid_h // new_shape[1]
    if factor < 1 or (grid_h, grid_w) != (new_shape[1] * factor, new_shape[2] * factor):
        raise ValueError(
            f"the base token grid {grid_h}x{grid_w} (base_latent {base_shape[1:]} / patch "
            f"{p_base}) is not an integer multiple of the DC-AE grid {new_shape[1:]}"
        )
    n_blocks = len(adapter.blocks())
    layers = [i for i in cfg.align_feature_layers]
    bad = [i for i in layers if not 0 <= i < n_blocks]
    if bad:
        raise ConfigError(f"align_feature_layers: {bad} out of range for {n_blocks} blocks")
    transformer.requires_grad_(False)

    # Fixed report batch: the first samples that share the first sample's shapes.
    report_idx = [
        i
        for i in range(min(len(dataset), 64))
        if tuple(dataset[i]["dcae_latent"].shape) == new_shape
        and tuple(dataset[i]["base_latent"].shape) == base_shape
    ][: cfg.batch_size]
    from .data import collate_samples

    report = {
        k: v.to(device) if isinstance(v, torch.Tensor) else v
        for k, v in collate_samples([dataset[i] for i in report_idx]).items()
    }
    has_text = "prompt_embeds" in report
    if not has_text:
        logger.warning("no prompt_embeds in the data: skipping the feature-distance report")
    base_feats = (
        _block_features(
            adapter, report["base_latent"].float(), report, layers, cfg.align_eval_sigma
        )
        if has_text
        else {}
    )

    def distances() -> dict[int, float]:
        if not has_text:
            return {}
        new = _block_features(
            adapter, report["dcae_latent"].float(), report, layers, cfg.align_eval_sigma
        )
        hw = (grid_h, grid_w)
        return {
            i: feature_distance(base_feats[i], new[i], "sq_l2", hw, factor, cfg.align_downsample)
            for i in layers
        }

    # New layers, seeded so every rank (and a resumed run) starts from the same random init.
    torch.manual_seed(cfg.seed)
    old = adapter.replace_latent_layers(new_shape[0], 1, init="zero_head")
    if cfg.align_positions == "base":
        if not hasattr(adapter, "set_position_scale"):
            raise ConfigError(
                f"align_positions='base' needs a RoPE model (FLUX family), got "
                f"{type(transformer).__name__}"
            )
        adapter.set_position_scale(factor)
    base_embedder = old.embedder.to(device)
    layers_new = adapter.latent_layers()
    layers_new.embedder.to(device)
    layers_new.head.to(device)
    dist_before = distances()

    def target_tokens(base_latent: torch.Tensor, new_hw: tuple[int, int]) -> torch.Tensor:
        # The grid of this batch: a bucketed cache holds several sizes and aspect ratios (the
        # first sample's grid reshaped transposed buckets wrongly and crashed on others).
        hw = (base_latent.shape[-2] // p_base, base_latent.shape[-1] // p_base)
        if hw != (new_hw[0] * factor, new_hw[1] * factor):
            raise ValueError(
                f"a base token grid {hw[0]}x{hw[1]} (base_latent {tuple(base_latent.shape[-2:])}"
                f" / patch {p_base}) is not {factor}x the DC-AE grid {tuple(new_hw)} (the "
                "factor of the first sample): every sample needs the same compression ratio"
            )
        tokens = _embed(base_embedder, base_latent.float(), p_base).float()
        return downsample_tokens(tokens, hw, factor, cfg.align_downsample)  # type: ignore[arg-type]

    # ---- closed form: ridge over every cached token, each rank streaming its own share.
    acc = RidgeAccumulator(new_shape[0], adapter.inner_dim)
    with torch.no_grad():
        for i in range(ctx.rank, len(dataset), ctx.world_size):
            s = dataset[i]
            x = pack_latents(s["dcae_latent"][None].to(device).float(), 1)
            new_hw = tuple(s["dcae_latent"].shape[-2:])
            acc.update(x, target_tokens(s["base_latent"][None].to(device), new_hw))
    acc = _gather_ridge(acc, ctx)
    embedder = layers_new.embedder

    def embedder_mse() -> float:
        return acc.mse(embedder.weight.detach().flatten(1).double(), embedder.bias)

    mse_random = embedder_mse()
    weight, bias = acc.solve(cfg.align_ridge_l2)
    init_from_ridge(embedder, weight, bias)
    mse_ridge = embedder_mse()
    logger.info(
        "stage 1 ridge over %d tokens: alignment MSE %.5g (random) -> %.5g (R^2 %.4f)",
        acc.count,
        mse_random,
        mse_ridge,
        _r2(acc, mse_ridge),
    )

    # ---- refinement with the shared loop (checkpointed, multi-process like the other stages).
    loop: LoopResult | None = None
    if cfg.align_sgd_steps > 0:
        embedder.requires_grad_(True)
        module = _EmbedderAlign(embedder)

        def make_inputs(batch: dict[str, Any], rnd: StepRandom) -> dict[str, Any]:
            with torch.no_grad():
                target = target_tokens(batch["base_latent"], batch["dcae_latent"].shape[-2:])
            return {"latents": batch["dcae_latent"].float(), "target": target}

        loop = train_loop(
            module,
            make_inputs,
            dataset,
            cfg,
            ctx,
            run_dir,
            steps=cfg.align_sgd_steps,
            tag="align",
            progress=progress,
            on_step=on_step,
            on_sample=_sample_writer(transformer, dataset, cfg, ctx, run_dir),
        )
        embedder.requires_grad_(False)
    mse_after = embedder_mse()
    dist_after = distances()
    rank = _embedder_rank(embedder.weight.detach().flatten(1))
    base_rank = _embedder_rank(base_embedder.weight.detach().flatten(1))
    _report_embedder_rank(rank, new_shape[0], base_rank)
    head_fit = _fit_head_ridge(adapter, dataset, cfg, ctx) if cfg.align_head == "ridge" else None
    return {
        "stage": "align",
        "tokens": acc.count,
        "downsample_factor": factor,
        "align_mse": {"random": mse_random, "ridge": mse_ridge, "after": mse_after},
        "embedder_rank": rank,
        "base_embedder_rank": base_rank,
        "latent_channels": new_shape[0],
        "feature_distance": {
            "layers": layers,
            "before": [dist_before[i] for i in layers] if dist_before else [],
            "after": [dist_after[i] for i in layers] if dist_after else [],
        },
        "steps": loop.steps if loop else 0,
        "final_loss": loop.final_loss if loop else mse_after,
        "head": {"init": cfg.align_head, **(head_fit or {})},
    }


def _report_embedder_rank(rank: int, channels: int, base_rank: int) -> None:
    """Say how much of the new latent the frozen blocks see after stage 1. The targets lie in
    the span of the base embedder, so an aligned rank up to min(channels, base rank) is all
    stage 1 can reach: below the latent's channels the unseen directions (noise included) are
    left to stages 2 and 3, a fact of the two models (logged); below the reachable rank the
    alignment itself fell short (a warning). Every toy run warned of the first, which no
    setting changes."""
    if rank >= channels:
        return
    if rank < min(channels, base_rank):
        logger.warning(
            "stage 1: the aligned embedder has rank %d, below the %d that the base embedder "
            "(rank %d) and the %d latent channels allow: part of the new latent that the frozen "
            "blocks could see is dropped", rank, min(channels, base_rank), base_rank, channels,
        )  # fmt: skip
        return
    logger.info(
        "stage 1: the aligned embedder has rank %d for %d latent channels (the base embedder's "
        "rank is %d); the frozen blocks see only that part of the new latent",
        rank, channels, base_rank,
    )  # fmt: skip


def _embedder_rank(weight: torch.Tensor, rtol: float = 1e-3) -> int:
    """Numerical rank of an embedder weight (out, in): singular values above ``rtol`` times
    the largest."""
    sv = torch.linalg.svdvals(weight.double())
    return int((sv > rtol * sv[0]).sum()) if sv.numel() and sv[0] > 0 else 0


@torch.no_grad()
def _head_readout(
    adapter: DiTAdapter,
    dataset: Any,
    cfg: TrainConfig,
    ctx: DistContext,
    latent_key: str = "dcae_latent",
) -> RidgeAccumulator:
    """Ridge statistics of the linear map from the DiT's last hidden states (the head's input)
    to the flow velocity (noise - x0) of ``dataset[i][latent_key]``, over
    ``cfg.align_head_samples`` samples at training-distribution noise levels."""
    from .data import collate_samples

    head = adapter.latent_layers().head
    if not isinstance(head, nn.Linear):
        raise ConfigError(f"align_head='ridge' needs a Linear head, got {type(head).__name__}")
    device = ctx.device
    # The velocity's features: a learned-sigma head (a SANA base) emits as many again.
    acc = RidgeAccumulator(head.in_features, adapter.latent_channels * adapter.patch_size**2)
    captured: list[torch.Tensor] = []
    hook = head.register_forward_hook(lambda m, args, out: captured.append(args[0].float()))
    make_inputs = _flow_inputs(adapter, cfg, latent_key)
    n = min(len(dataset), cfg.align_head_samples)
    # Batches of one bucket each (a bucketed cache holds several latent sizes), in the order of
    # the samples, none dropped; with one bucket these are the consecutive index ranges. Rank r
    # takes every world_size-th batch.
    buckets = list(getattr(dataset, "bucket_ids", None) or [None] * len(dataset))[:n]
    order = BucketBatchSampler(buckets, cfg.batch_size, shuffle=False, drop_last=False) if n else []
    batches = list(order)
    try:
        # The noise of a batch is seeded by its global number, so any world size draws the
        # same noise for it (numbering each rank's own batches gave rank 1 rank 0's noise).
        for step in range(ctx.rank, len(batches), ctx.world_size):
            idx = batches[step]
            batch = collate_samples([dataset[i] for i in idx])
            batch = {
                k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()
            }
            rnd = StepRandom(cfg.seed + 7919, step, len(idx), slice(None), device)
            inp = make_inputs(batch, rnd)
            x0, noise, sigmas = inp["x0"], inp["noise"], inp["sigmas"]
            s = sigmas.view(-1, *([1] * (x0.ndim - 1)))
            captured.clear()
            adapter.predict(
                (1 - s) * x0 + s * noise, sigmas, inp["prompt_embeds"],
                inp["pooled_prompt_embeds"], inp["guidance"], attention_mask=inp["attention_mask"],
            )  # fmt: skip
            acc.update(captured[-1], adapter.pack_velocity(noise - x0))
    finally:
        hook.remove()
    return _gather_ridge(acc, ctx)


def readout_r2(
    transformer: nn.Module,
    dataset: Any,
    cfg: TrainConfig,
    latent_key: str = "dcae_latent",
    ctx: DistContext | None = None,
) -> float:
    """How much of the flow velocity a linear head can read from the model's last hidden states
    (1 - ridge MSE / velocity variance; the head itself is not changed). On the base model
    (``latent_key="base_latent"``) it is the ceiling a stage-1 head on frozen blocks aims at."""
    acc = _head_readout(adapter_for(transformer), dataset, cfg, _ctx(ctx), latent_key)
    return _r2(acc, acc.mse(*acc.solve(cfg.align_ridge_l2)))


def _r2(acc: RidgeAccumulator, mse: float) -> float:
    return 1.0 - mse / max(acc.target_variance(), 1e-30)


@torch.no_grad()
def _fit_head_ridge(
    adapter: DiTAdapter, dataset: Any, cfg: TrainConfig, ctx: DistContext
) -> dict[str, Any]:
    """Closed-form stage-1 head: the linear map from the frozen DiT's last hidden states to the
    flow velocity of the DC-AE latents (:func:`_head_readout`). The embedder is the aligned
    one, so this is the best linear readout of what the untouched blocks compute."""
    acc = _head_readout(adapter, dataset, cfg, ctx)
    weight, bias = acc.solve(cfg.align_ridge_l2)
    init_from_ridge(adapter.latent_layers().head, weight, bias)
    mse = acc.mse(weight, bias)
    logger.info("stage 1 ridge head over %d tokens: velocity MSE %.5g", acc.count, mse)
    return {
        "tokens": acc.count,
        "velocity_mse": mse,
        "target_variance": acc.target_variance(),
        "readout_r2": _r2(acc, mse),
    }


# ------------------------------------------------------------------------------ stages 2, 3


@keeps_rng_state
def train_output_layer(
    transformer: nn.Module,
    dataset: Any,
    cfg: TrainConfig,
    *,
    ctx: DistContext | None = None,
    run_dir: str | Path | None = None,
    progress: bool = True,
    on_step: OnStep | None = None,
) -> dict[str, Any]:
    """Stage 2 (in place): DiT frozen, head (and embedder when
    ``cfg.train_embedder_in_stage2``) trained with the flow-matching loss. With ``ema_decay``
    the EMA weights are loaded into the model at the end (what gets saved), as in stage 3."""
    ctx = _ctx(ctx)
    adapter = adapter_for(transformer)
    _check_channels(adapter, dataset)
    _require(dataset[0], ["prompt_embeds"], "the stage-2 data")
    transformer.requires_grad_(False)
    layers = adapter.latent_layers()
    layers.head.requires_grad_(True)
    if cfg.train_embedder_in_stage2:
        layers.embedder.requires_grad_(True)
    loop = _train_flow(transformer, dataset, cfg, ctx, run_dir, "output", progress, on_step)
    transformer.requires_grad_(False)
    return {"stage": "output", "steps": loop.steps, "final_loss": loop.final_loss}


def _train_flow(
    transformer: nn.Module,
    dataset: Any,
    cfg: TrainConfig,
    ctx: DistContext,
    run_dir: str | Path | None,
    tag: str,
    progress: bool,
    on_step: OnStep | None,
) -> LoopResult:
    """The flow-matching loop of stages 2 and 3 over the parameters that require grad, with
    ``cfg.gradient_checkpointing`` on for its duration and, with ``cfg.ema_decay``, the EMA
    weights loaded into the model at the end (what gets saved); returns the loop's result."""
    adapter = adapter_for(transformer)
    if cfg.gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
    ema = None
    if cfg.ema_decay is not None:
        named = {n: p for n, p in transformer.named_parameters() if p.requires_grad}
        ema = EMA(named, cfg.ema_decay, warmup=cfg.ema_warmup)
    run_dir = Path(run_dir if run_dir is not None else cfg.out_dir)
    try:
        loop = train_loop(
            FlowMatchingModule(transformer),
            _flow_inputs(adapter, cfg, null_text=_null_text(cfg)),
            dataset,
            cfg,
            ctx,
            run_dir,
            steps=cfg.steps,
            tag=tag,
            ema=ema,
            progress=progress,
            on_step=on_step,
            on_sample=_sample_writer(transformer, dataset, cfg, ctx, run_dir),
        )
    finally:
        if cfg.gradient_checkpointing:
            transformer.disable_gradient_checkpointing()
    if ema is not None:
        with torch.no_grad():
            for n, p in ema.params.items():
                p.copy_(ema.shadow[n].to(p.dtype))
    return loop


def _module_name(transformer: nn.Module, module: nn.Module) -> str:
    for name, m in transformer.named_modules():
        if m is module:
            return name
    raise KeyError(f"{type(module).__name__} is not a submodule of the transformer")


@keeps_rng_state
def finetune_lora(
    transformer: nn.Module,
    dataset: Any,
    cfg: TrainConfig,
    *,
    ctx: DistContext | None = None,
    run_dir: str | Path | None = None,
    progress: bool = True,
    on_step: OnStep | None = None,
) -> dict[str, Any]:
    """Stage 3 (in place): LoRA (``cfg.lora_rank`` / ``lora_alpha`` / ``lora_targets``) on the
    blocks plus the embedder and head fully trained, flow-matching loss. With ``ema_decay`` the
    EMA weights are loaded into the model at the end (what gets saved)."""
    ctx = _ctx(ctx)
    adapter = adapter_for(transformer)
    _check_channels(adapter, dataset)
    _require(dataset[0], ["prompt_embeds"], "the stage-3 data")
    layers = adapter.latent_layers()
    train_modules = (
        _module_name(transformer, layers.embedder),
        _module_name(transformer, layers.head),
    )
    # Seeded: LoRA A is random, and every rank / a resumed run must start from the same one.
    torch.manual_seed(cfg.seed)
    add_lora(
        transformer,
        cfg.lora_rank,
        cfg.lora_alpha,
        cfg.lora_targets,
        train_modules=train_modules,
    )
    transformer.to(ctx.device)
    loop = _train_flow(transformer, dataset, cfg, ctx, run_dir, "finetune", progress, on_step)
    return {"stage": "finetune", "steps": loop.steps, "final_loss": loop.final_loss}


# --------------------------------------------------------------------------------------- run

_STAGE_FNS = {"align": align_embedder, "output": train_output_layer, "finetune": finetune_lora}
_STAGE_TENSORS = {
    "align": ["base_latent", "dcae_latent"],
    "output": ["dcae_latent", "prompt_embeds"],
    "finetune": ["dcae_latent", "prompt_embeds"],
}


def open_cache(cfg: TrainConfig) -> LatentCache:
    """The cache with the tensors the stage reads; a missing tensor is a clear CacheError."""
    cache = LatentCache(cfg.cache_dir)
    need = _STAGE_TENSORS[cfg.stage]
    missing = [n for n in need if n not in cache.tensor_names]
    if missing:
        raise CacheError(
            f"cache_dir {cfg.cache_dir} has no {missing} tensor(s) (has {cache.tensor_names}); "
            f"stage {cfg.stage!r} needs {need}"
        )
    # (SANA's padded captions carry prompt_attention_mask: the model must see it in training
    # as the pipelines pass it in sampling)
    optional = ("prompt_embeds", "pooled_prompt_embeds", "prompt_attention_mask")
    wanted = need + [n for n in optional if n in cache.tensor_names]
    return cache.with_tensors(list(dict.fromkeys(wanted)))


@keeps_rng_state
def run(config: TrainConfig, progress: bool = True, *, on_step: OnStep | None = None) -> dict:
    """Run the configured stage end to end (see the module docstring for the files written).

    Under torchrun every process calls this; only rank 0 writes files. Returns a summary
    (stage, steps, final_loss, paths, and for stage 1 alignment MSE and feature distances).
    """
    cfg = config.validate()
    ctx = init_distributed(cfg.device)
    try:
        return _run(cfg, ctx, progress, on_step)
    finally:
        ctx.close()


def _recorded_config(cfg: TrainConfig) -> dict[str, Any]:
    """The config a run writes beside its checkpoints, with the paths that exist made absolute:
    the resume check compares them with a later run's, which may start in another working
    directory (relative paths named other files from there and the same run was refused)."""
    record = cfg.to_dict()
    for name in PATH_FIELDS:
        value = record.get(name)
        if isinstance(value, str) and Path(value).exists():  # ~ expanded by validate()
            record[name] = str(Path(value).resolve())
    return record


#: beside config.json: what a run's inputs were, for the resume check (config.json stays a
#: config file that loads as one, so this is kept apart from it)
INPUTS_NAME = "inputs.json"


def _check_resume_inputs(cfg: TrainConfig, run_dir: Path, cache: LatentCache) -> None:
    """Refuse to continue a run's checkpoints on another cache at the same path (a cache
    precomputed again with another DC-AE or text encoder): the paths compare equal, so the
    config check passed it and the run went on training on other latents. Called by
    _check_resume_settings once it found checkpoints to continue."""
    try:
        earlier = json.loads((run_dir / INPUTS_NAME).read_text()).get("cache_fingerprint")
    except (OSError, ValueError, AttributeError):
        return  # a run from before this record (or none): nothing to compare
    if earlier is not None and earlier != cache.fingerprint:
        raise ConfigError(
            f"{run_dir} holds checkpoints of a run on another latent cache: cache_dir "
            f"{cfg.cache_dir} has fingerprint {cache.fingerprint[:12]}..., the run's had "
            f"{str(earlier)[:12]}... (precomputed again with other encoders or data?): "
            "continue on that cache, or set resume = false to start over"
        )


def _check_resume_settings(cfg: TrainConfig, run_dir: Path, cache: LatentCache) -> None:
    """Refuse to continue a run's checkpoints under settings that shaped its steps differently
    (its config.json is the config they were made with): the result would match neither run,
    and the config.json written next would describe steps that did not run that way. Then
    the same for the latent cache (_check_resume_inputs)."""
    earlier_file = run_dir / "config.json"
    if not cfg.resume or latest_checkpoint(run_dir / CHECKPOINT_DIR) is None:
        return
    if earlier_file.is_file():
        try:
            earlier = json.loads(earlier_file.read_text())
        except (OSError, ValueError) as err:
            raise ConfigError(f"{earlier_file}: could not read the run's config: {err}") from err
        changed = cfg.changed_for_resume(earlier) if isinstance(earlier, dict) else []
        if changed:
            raise ConfigError(
                f"{run_dir} holds checkpoints of a run with other settings "
                f"({'; '.join(changed)}): continue it with its own settings (only steps and the "
                "logging, checkpoint and sample settings may change), or set resume = false to "
                "start over (its checkpoints are then moved aside)"
            )
    _check_resume_inputs(cfg, run_dir, cache)


def _write_outputs(
    transformer: nn.Module, summary: dict[str, Any], cfg: TrainConfig, run_dir: Path
) -> dict[str, str]:
    """Write a finished stage's outputs into ``run_dir`` as one unit; returns their paths (also
    put in ``summary``, written last as summary.json). Everything is written into a staging
    folder beside them and then swapped in together (swap_in: all or none): a failed write (a
    full disk) or rename leaves the earlier run's outputs whole, where it used to leave this
    run's latent layers beside the earlier run's LoRA and summary (a pair export would join)."""
    for stale in run_dir.glob(".outputs.*.tmp"):  # a killed run's
        shutil.rmtree(stale, ignore_errors=True)
    staging = Path(tempfile.mkdtemp(prefix=".outputs.", suffix=".tmp", dir=run_dir))
    paths: dict[str, str] = {}  # where each output lands once swapped in
    try:
        with naming_write_errors(run_dir, staging):
            save_latent_layers(transformer, staging / LATENT_LAYERS_NAME, {"stage": cfg.stage})
            paths["latent_layers"] = str(run_dir / LATENT_LAYERS_NAME)
            if cfg.stage == "finetune":
                paths["lora"] = str(run_dir / save_lora(transformer, staging).name)
            else:
                transformer.save_pretrained(staging / TRANSFORMER_DIR)
                paths["transformer"] = str(run_dir / TRANSFORMER_DIR)
                if _copy_source_scheduler(transformer_folder(cfg.transformer), staging):
                    paths["scheduler"] = str(run_dir / "scheduler")
            losses = [float(e["loss"]) for e in read_log(run_dir / LOG_NAME)]
            if losses:
                from dcgen.toy.images import plot_curve

                plot_curve(losses, f"dcgen {cfg.stage}: loss").save(staging / "loss.png")
                paths["loss_curve"] = str(run_dir / "loss.png")
            paths["log"] = str(run_dir / LOG_NAME)
            paths["config"] = str(run_dir / "config.json")
            summary["paths"] = paths
            (staging / "summary.json").write_text(dumps(summary, indent=1))
            swap_in([(staging / entry.name, run_dir / entry.name)
                     for entry in sorted(staging.iterdir())])  # fmt: skip
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return paths


def _run(cfg: TrainConfig, ctx: DistContext, progress: bool, on_step: OnStep | None) -> dict:
    run_dir = Path(cfg.out_dir)
    cache = open_cache(cfg)
    c_cache = int(cache[0]["dcae_latent"].shape[0])
    f_cache = cache_dcae_factor(cache)
    if cfg.dcae is not None:
        c_ae, f_ae = dcae_facts(cfg.dcae)
        if c_ae != c_cache:
            raise ValueError(
                f"dcae {cfg.dcae!r} has {c_ae} latent channels but the cache's dcae_latent has "
                f"{c_cache}: the cache was made with another DC-AE"
            )
        if f_ae != f_cache:  # same channels, another grid: an f64c32 passed as an f32c32
            raise ValueError(
                f"dcae {cfg.dcae!r} is f{f_ae} but the cache's dcae_latent is f{f_cache} (image "
                f"{cache.sizes[0][0]}x{cache.sizes[0][1]}, latent "
                f"{tuple(cache[0]['dcae_latent'].shape[-2:])}): the cache was made with another "
                "DC-AE"
            )
    if cfg.stage != "align" or cfg.align_sgd_steps > 0:
        ctx.shard(cfg.batch_size)  # an uneven batch fails now, not after stage 1's ridge fit
    _check_resume_settings(cfg, run_dir, cache)
    ctx.barrier()  # every rank has read the earlier config.json before it is replaced
    if ctx.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        text = json.dumps(_recorded_config(cfg), indent=1)
        atomic_write(run_dir / "config.json", lambda tmp: Path(tmp).write_text(text))
        inputs = dumps({"cache_fingerprint": cache.fingerprint}, indent=1)
        atomic_write(run_dir / INPUTS_NAME, lambda tmp: Path(tmp).write_text(inputs))
    torch.manual_seed(cfg.seed)
    transformer = load_transformer(cfg.transformer, ctx.device)
    if type(transformer).__name__ == "SanaTransformer2DModel" and cfg.shift_rule == "flux":
        # SANA samples at its scheduler's constant flow_shift: training (and the previews) at
        # FLUX's resolution-dependent shift, the config default, sees other noise levels
        logger.warning(
            "shift_rule = 'flux' (the default) on a SANA transformer: SANA samples at a constant "
            "flow shift; set shift_rule = 'constant' and shift_constant to its scheduler's "
            "flow_shift (3.0 for SANA 1K, examples/sana_dcgen_f64c128.toml)"
        )
    if cfg.latent_layers:
        load_latent_layers(transformer, cfg.latent_layers)
        transformer.to(ctx.device)  # replaced layers are created on the CPU
    if cfg.stage != "align":
        mismatch = dcae_factor_mismatch(transformer, f_cache, f"the cache {cfg.cache_dir}")
        if mismatch:
            raise ConfigError(mismatch)
    summary = _STAGE_FNS[cfg.stage](
        transformer, cache, cfg, ctx=ctx, run_dir=run_dir, progress=progress, on_step=on_step
    )
    if cfg.stage == "align":  # later stages, export and pipelines check the DC-AE against it
        record_dcae_factor(transformer, f_cache)
    paths: dict[str, str] = {}
    if ctx.is_main:
        paths = _write_outputs(transformer, summary, cfg, run_dir)
    ctx.barrier()
    summary.setdefault("paths", paths)
    logger.info("stage %s done: %s", cfg.stage, {k: summary[k] for k in ("steps", "final_loss")})
    return summary
