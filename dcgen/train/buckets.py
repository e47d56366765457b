"""Aspect-ratio buckets and a same-bucket batch sampler.

A bucket is an (height, width) pair whose sides are multiples of ``factor`` and whose area is at
most the target area. ``factor`` must be a multiple of every autoencoder's downsampling factor
the data goes through (DC-AE f32/f64 need 32/64; the base f8 VAE with 2x2 patches needs 16), so
choose the largest: one bucket list then serves both latent spaces of stage 1.

The sampler is a pure function of (bucket ids, batch size, seed, epoch): it owns its RNG, never
touches the global ones, and can start ``position`` batches into an epoch, which is what exact
resume needs (the training loop counts the batches it consumed and checkpoints that number).
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Hashable, Iterator, Sequence
from dataclasses import dataclass

from torch.utils.data import Sampler

logger = logging.getLogger(__name__)

__all__ = [
    "Bucket",
    "BucketBatchSampler",
    "assign_buckets",
    "make_buckets",
    "nearest_bucket",
]


@dataclass(frozen=True, order=True)
class Bucket:
    """An image size (height, width) in pixels."""

    height: int
    width: int

    @property
    def aspect(self) -> float:
        """width / height."""
        return self.width / self.height

    @property
    def area(self) -> int:
        return self.height * self.width

    def __str__(self) -> str:
        return f"{self.height}x{self.width}"


def _check_positive(name: str, value: int) -> None:
    if not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def make_buckets(
    area: int,
    factor: int,
    max_aspect: float = 4.0,
    min_side: int | None = None,
) -> list[Bucket]:
    """All (h, w) with h, w multiples of ``factor``, h * w <= ``area``, as large as possible.

    For every height on the ``factor`` grid, the widest width that keeps the area within budget is
    taken, and kept only if no taller bucket of that width fits either (so each bucket spends
    as much of the token budget as the grid allows). Buckets whose aspect ratio (long
    side / short side) exceeds ``max_aspect`` or whose short side is below ``min_side`` (default
    ``factor``) are dropped. Sorted by aspect ratio (width / height), then by size.

    ``area`` is in pixels: pass ``1024 * 1024`` for "1K".
    """
    _check_positive("area", area)
    _check_positive("factor", factor)
    if max_aspect < 1.0:
        raise ValueError(f"max_aspect is long side / short side, must be >= 1, got {max_aspect}")
    min_side = factor if min_side is None else min_side
    if area < factor * factor:
        raise ValueError(f"area {area} is smaller than one {factor}x{factor} cell")
    found: set[Bucket] = set()
    for h in range(factor, area // factor + 1, factor):
        w = (area // h) // factor * factor
        if w < factor:
            break
        if (h + factor) * w <= area:
            continue  # a taller bucket of the same width fits: this one wastes budget
        if min(h, w) < min_side or max(h, w) / min(h, w) > max_aspect + 1e-9:
            continue
        found.add(Bucket(h, w))
    if not found:
        raise ValueError(
            f"no bucket for area={area}, factor={factor}, max_aspect={max_aspect}, "
            f"min_side={min_side}"
        )
    return sorted(found, key=lambda b: (b.aspect, b.area))


def nearest_bucket(height: int, width: int, buckets: Sequence[Bucket]) -> Bucket:
    """The bucket whose aspect ratio is closest to ``width / height`` in log space (so 2:1 and
    1:2 are equally far from 1:1); ties go to the larger bucket, then the first listed."""
    if not buckets:
        raise ValueError("buckets is empty")
    if height <= 0 or width <= 0:
        raise ValueError(f"image size must be positive, got {height}x{width}")
    target = math.log(width / height)
    return min(buckets, key=lambda b: (round(abs(math.log(b.aspect) - target), 12), -b.area))


def assign_buckets(sizes: Sequence[tuple[int, int]], buckets: Sequence[Bucket]) -> list[Bucket]:
    """``nearest_bucket`` for every (height, width) in ``sizes``, computed once per distinct
    size: a dataset has few, and the search costs ~75 us (a million images took 74 s)."""
    found: dict[tuple[int, int], Bucket] = {}
    out = []
    for h, w in sizes:
        bucket = found.get((h, w))
        if bucket is None:
            bucket = found[(h, w)] = nearest_bucket(h, w, buckets)
        out.append(bucket)
    return out


class BucketBatchSampler(Sampler[list[int]]):
    """Yields lists of dataset indices whose samples share a bucket.

    Per epoch: indices are shuffled within each bucket, cut into batches of ``batch_size``, and
    the batches of all buckets are shuffled together, all from ``random.Random`` seeded by
    (seed, epoch) so an epoch's order is reproducible anywhere. With ``num_replicas > 1`` the
    batch list is cut to a multiple of ``num_replicas`` and rank r takes every r-th batch, so
    every rank runs the same number of steps.

    Resume: ``set_epoch(epoch, position)`` makes the next iteration skip the first ``position``
    batches of that epoch (``position`` counts batches this rank consumed). Later epochs start
    at 0. Use it as ``DataLoader(ds, batch_sampler=sampler, ...)``.
    """

    def __init__(
        self,
        bucket_ids: Sequence[Hashable],
        batch_size: int,
        *,
        seed: int = 0,
        shuffle: bool = True,
        drop_last: bool = True,
        num_replicas: int = 1,
        rank: int = 0,
    ) -> None:
        _check_positive("batch_size", batch_size)
        _check_positive("num_replicas", num_replicas)
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank must be in [0, {num_replicas}), got {rank}")
        if len(bucket_ids) == 0:
            raise ValueError("bucket_ids is empty: nothing to sample")
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.num_replicas = num_replicas
        self.rank = rank
        self.epoch = 0
        self.position = 0
        # Group in first-seen order of the bucket ids so the grouping does not depend on whether
        # the ids are sortable or on hash randomisation.
        groups: dict[Hashable, list[int]] = {}
        for i, b in enumerate(bucket_ids):
            groups.setdefault(b, []).append(i)
        self._groups = list(groups.values())

    def _epoch_batches(self, epoch: int) -> list[list[int]]:
        # String seeds hash deterministically in random.Random (unlike hash() of a tuple).
        rng = random.Random(f"dcgen-buckets:{self.seed}:{epoch}")
        batches: list[list[int]] = []
        for group in self._groups:
            idx = list(group)
            if self.shuffle:
                rng.shuffle(idx)
            for start in range(0, len(idx), self.batch_size):
                batch = idx[start : start + self.batch_size]
                if len(batch) < self.batch_size and self.drop_last:
                    continue
                batches.append(batch)
        if self.shuffle:
            rng.shuffle(batches)
        usable = len(batches) // self.num_replicas * self.num_replicas
        return batches[:usable][self.rank :: self.num_replicas]

    def set_epoch(self, epoch: int, position: int = 0) -> None:
        """Select the epoch (its shuffle) and how many of its batches were already consumed."""
        if epoch < 0 or position < 0:
            raise ValueError(f"epoch and position must be >= 0, got {epoch}, {position}")
        self.epoch = epoch
        self.position = position

    def __len__(self) -> int:
        """Batches per epoch for this rank (the full epoch, ignoring ``position``)."""
        return len(self._epoch_batches(self.epoch))

    def __iter__(self) -> Iterator[list[int]]:
        batches = self._epoch_batches(self.epoch)
        start = self.position
        if start > len(batches):
            raise ValueError(
                f"resume position {start} is past the end of epoch {self.epoch} "
                f"({len(batches)} batches): was the dataset or batch size changed?"
            )
        # The skip applies once: iterating again (next epoch without set_epoch) starts at 0.
        self.position = 0
        yield from batches[start:]

    def state_dict(self) -> dict[str, int]:
        return {"seed": self.seed, "epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if state.get("seed", self.seed) != self.seed:
            logger.warning(
                "sampler seed %s differs from checkpoint seed %s", self.seed, state["seed"]
            )
        self.set_epoch(int(state["epoch"]), int(state.get("position", 0)))
