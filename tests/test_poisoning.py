"""The test suite's own poisoning helper: a fresh CUDA allocation after
``poison_cuda_allocator()`` holds only all-ones bytes, so an op's unwritten elements show."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import poison_cuda_allocator


@pytest.mark.cuda
@pytest.mark.parametrize("nbytes", [512, 4096, 3 << 20])
def test_fresh_allocations_after_poisoning_are_all_ones(nbytes):
    # A zeroed block freed between two live neighbours (small pool: a gap inside a segment that
    # empty_cache cannot release), then poison: the next allocation of that size, which the
    # allocator's best fit hands that gap or another free block, is all 0xFF either way.
    torch.cuda.empty_cache()
    before = torch.empty(512 << 10, dtype=torch.uint8, device="cuda")
    gap = torch.zeros(nbytes, dtype=torch.uint8, device="cuda")
    after = torch.empty(1 << 20, dtype=torch.uint8, device="cuda")
    del gap
    poison_cuda_allocator()
    fresh = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    assert bool((fresh == 255).all()), f"{int((fresh != 255).sum())} of {nbytes} bytes unpoisoned"
    del before, after
