"""Shared test helpers.

CUDA tests are marked ``cuda`` and skip where no GPU (or no compiled CUDA kernel) exists; they
run on the GPU machine through benchmarks/device_check.sh.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()


def benchmark_script(name: str):  # noqa: ANN201
    """benchmarks/<name>.py as a module (the scripts live outside the package)."""
    import importlib.util
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"dcgen_benchmarks_{name}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def pytest_collection_modifyitems(config, items):  # noqa: ANN001
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "cuda" in item.keywords and not HAS_CUDA:
            item.add_marker(skip)


def misaligned_copy(t: torch.Tensor) -> torch.Tensor:
    """A copy of ``t`` with its strides (its memory format) one element into a fresh storage:
    the same dense layout at a data pointer no vector path may assume aligned."""
    flat = torch.empty(t.numel() + 1, device=t.device, dtype=t.dtype)
    out = flat[1:].as_strided(t.shape, t.stride())
    out.copy_(t)
    return out


def poison_cuda_allocator(nbytes: int = 256 << 20) -> None:
    """Fill free blocks of the caching allocator with all-ones bytes so an op's freshly
    allocated output shows every element the kernel did not write: 0xFF... is NaN in fp32,
    bf16, fp16 and float8_e4m3fn, and 255 in uint8 (an fp32 NaN, 00 00 C0 7F, would read as
    0.0 in every other 16-bit element)."""
    if not HAS_CUDA:
        return
    torch.cuda.empty_cache()
    block = torch.full((nbytes // 4,), -1, dtype=torch.int32, device="cuda")
    # Allocations up to 1 MiB come from the caching allocator's small-block pool (2 MiB
    # segments), which the large block above never touches: fill 64 MiB of those too.
    small = [torch.full((1 << 18,), -1, dtype=torch.int32, device="cuda") for _ in range(64)]
    gaps = _fill_free_blocks()
    del block, small, gaps  # back to the cache; the next allocations reuse the poisoned memory


def _fill_free_blocks(rounds: int = 3, most: int = 4096) -> list[torch.Tensor]:
    """All-ones tensors over the free blocks of segments that live tensors still hold: those
    segments survive empty_cache, and a small output lands in one of their gaps before any
    fresh segment (the H200 run of 2026-11-27: a test's small buffer came back with stale,
    non-NaN bytes). Each free block is taken by an allocation of exactly its size (the
    allocator's best fit), so nothing it hands out next was left unpoisoned. Only the blocks
    this stream's allocations can take: not a CUDA graph's private pool, not another stream's
    (an allocation of their size would take fresh memory instead, round after round)."""
    stream = torch.cuda.current_stream().cuda_stream
    held: list[torch.Tensor] = []
    for _ in range(rounds):
        sizes = [
            blk.get("size", 0)
            for seg in torch.cuda.memory_snapshot()
            if seg.get("stream", stream) == stream
            and tuple(seg.get("segment_pool_id", (0, 0))) == (0, 0)
            for blk in seg.get("blocks", [])
            if blk.get("state") == "inactive"
        ]
        sizes = sorted((s for s in sizes if s > 0), reverse=True)[:most]
        if not sizes:
            break
        held += [torch.full((size,), 255, dtype=torch.uint8, device="cuda") for size in sizes]
    return held


@contextlib.contextmanager
def registered_cpu_kernel(monkeypatch, name: str, fn: Callable) -> Iterator[None]:  # noqa: ANN001
    """``fn`` registered as the CPU kernel of ``dcgen::<name>`` and visible to has_kernel while
    the context is open: CPU tests of the code paths that only take a compiled kernel (their
    ``fn`` runs the op's reference, against which the CUDA kernel is tested). Skips the test
    where dcgen._C is not built (no schema to register against)."""
    from dcgen.ops import _extension

    if not _extension.has_schema(name):
        pytest.skip(f"dcgen._C is not built: no dcgen::{name} schema")
    lib = torch.library.Library("dcgen", "IMPL")
    lib.impl(name, fn, "CPU")
    monkeypatch.setattr(_extension, "_KERNELS", _extension._KERNELS | {(name, "CPU")})
    try:
        yield
    finally:
        lib._destroy()


@pytest.fixture
def rng() -> torch.Generator:
    """A fresh seeded generator per test: inputs are random but reproducible on failure (the
    seed is printed; pytest shows a failing test's captured output)."""
    seed = torch.seed() % (2**31)
    print(f"rng seed: {seed}")
    return torch.Generator().manual_seed(seed)


def cat_dims(monkeypatch) -> list[int]:  # noqa: ANN001
    """Spy on torch.cat for the rest of a test: the dim of each call, in order (tests that a
    fast path concatenates nothing, or only along the dim it should)."""
    dims: list[int] = []
    real_cat = torch.cat

    def cat(tensors, dim=0, **kw):  # noqa: ANN001, ANN003, ANN202
        dims.append(dim)
        return real_cat(tensors, dim=dim, **kw)

    monkeypatch.setattr(torch, "cat", cat)
    return dims
