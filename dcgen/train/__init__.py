"""Training: datasets, aspect buckets, latent caches and checkpoints (alignment stages build on
these)."""

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

__all__ = [
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
