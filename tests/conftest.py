"""Shared test helpers.

CUDA tests are marked ``cuda`` and skip where no GPU (or no compiled CUDA kernel) exists; they
run on the GPU machine through benchmarks/device_check.sh.
"""

from __future__ import annotations

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):  # noqa: ANN001
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "cuda" in item.keywords and not HAS_CUDA:
            item.add_marker(skip)


def poison_cuda_allocator(nbytes: int = 256 << 20) -> None:
    """Fill free blocks of the caching allocator with NaN so an op's freshly allocated output
    shows every element the kernel did not write."""
    if not HAS_CUDA:
        return
    torch.cuda.empty_cache()
    block = torch.full((nbytes // 4,), float("nan"), device="cuda")
    # Allocations up to 1 MiB come from the caching allocator's small-block pool (2 MiB
    # segments), which the large block above never touches: fill 64 MiB of those too.
    small = [torch.full((1 << 18,), float("nan"), device="cuda") for _ in range(64)]
    del block, small  # back to the cache; the next allocations reuse the NaN-filled memory


@pytest.fixture
def rng() -> torch.Generator:
    """A fresh seeded generator per test: inputs are random but reproducible on failure."""
    return torch.Generator().manual_seed(torch.seed() % (2**31))
