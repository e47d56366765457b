"""DC-Gen post-training building blocks.

Data: datasets, aspect buckets, latent caches, checkpoints (data.py, buckets.py, cache.py,
checkpoint.py). Method: stage-1 embedder alignment math (align.py), flow-matching losses for
stages 2-3 (losses.py), LoRA through peft (lora.py), the feature-distance analysis (features.py).
"""

from .align import (
    RidgeAccumulator,
    alignment_loss,
    downsample_tokens,
    init_from_ridge,
    init_linear_from_ridge,
    patchify,
    refine_sgd,
)
from .buckets import Bucket, BucketBatchSampler, assign_buckets, make_buckets, nearest_bucket
from .cache import CacheError, LatentCache, precompute
from .checkpoint import (
    Checkpoint,
    Checkpointer,
    CheckpointError,
    RunState,
    capture_rng_state,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    load_latest_checkpoint,
    restore_rng_state,
    save_checkpoint,
)
from .data import (
    DataError,
    ImageCaptionDataset,
    ImageCaptionFolder,
    Sample,
    collate_samples,
    pil_to_tensor,
    resize_center_crop,
)
from .features import (
    FeatureCapture,
    block_list,
    capture_features,
    feature_distance,
    feature_distances,
)
from .lora import DEFAULT_TARGETS, add_lora, fuse_lora, load_lora, lora_parameters, save_lora
from .losses import flow_matching_loss, guidance_values, sample_timesteps, velocity_target

__all__ = [
    "DEFAULT_TARGETS",
    "FeatureCapture",
    "RidgeAccumulator",
    "add_lora",
    "alignment_loss",
    "block_list",
    "capture_features",
    "downsample_tokens",
    "feature_distance",
    "feature_distances",
    "flow_matching_loss",
    "fuse_lora",
    "guidance_values",
    "init_from_ridge",
    "init_linear_from_ridge",
    "load_lora",
    "lora_parameters",
    "patchify",
    "refine_sgd",
    "sample_timesteps",
    "save_lora",
    "velocity_target",
    "Bucket",
    "BucketBatchSampler",
    "CacheError",
    "Checkpoint",
    "CheckpointError",
    "Checkpointer",
    "DataError",
    "ImageCaptionDataset",
    "ImageCaptionFolder",
    "LatentCache",
    "RunState",
    "Sample",
    "assign_buckets",
    "capture_rng_state",
    "collate_samples",
    "latest_checkpoint",
    "list_checkpoints",
    "load_checkpoint",
    "load_latest_checkpoint",
    "make_buckets",
    "nearest_bucket",
    "pil_to_tensor",
    "precompute",
    "resize_center_crop",
    "restore_rng_state",
    "save_checkpoint",
]

# Stage training: config, the shared loop, multi-process setup, the three stages.
from .config import STAGES, ConfigError, TrainConfig, load_config  # noqa: E402
from .distributed import DistContext, init_distributed  # noqa: E402
from .ema import EMA  # noqa: E402
from .loop import LoopResult, StepRandom, train_loop  # noqa: E402
from .stages import (  # noqa: E402
    FlowMatchingModule,
    align_embedder,
    finetune_lora,
    load_latent_layers,
    load_transformer,
    save_latent_layers,
    train_output_layer,
)
from .stages import run as run_stage  # noqa: E402

__all__ += [
    "EMA",
    "STAGES",
    "ConfigError",
    "DistContext",
    "FlowMatchingModule",
    "LoopResult",
    "StepRandom",
    "TrainConfig",
    "align_embedder",
    "finetune_lora",
    "init_distributed",
    "load_config",
    "load_latent_layers",
    "load_transformer",
    "run_stage",
    "save_latent_layers",
    "train_loop",
    "train_output_layer",
]
