"""DC-AE encode: dcgen.DCAE vs diffusers.AutoencoderDC with the same random weights, and
dcgen's banded encode (the encoder's local high-resolution head in row bands: the same latents,
a fraction of the peak memory; what image-to-image uses above a pipeline's tile_threshold).

GPU: full-width presets at 1024 / 2048 / 4096 px (DCGEN_BENCH_SIZES), bf16, peak memory in
extra_info. CPU: narrow presets at 64 / 128 px (smoke run, fp32).
"""

from __future__ import annotations

import os

import pytest
import torch
from _dcae_models import DTYPE, dcae_pair
from _harness import DEVICE, ON_GPU, measure_peak_memory, record_rel_err, rounds, time_it

pytest.importorskip("diffusers")

PRESETS = ["dc-ae-f32c32-sana-1.1", "dc-ae-f64c128-in-1.0"]
if ON_GPU:
    SIZES = [int(s) for s in os.environ.get("DCGEN_BENCH_SIZES", "1024,2048,4096").split(",")]
else:
    SIZES = [64, 128]
# image rows per band (the encode's band_rows counts input rows)
BAND_ROWS = int(os.environ.get("DCGEN_BENCH_ENCODE_BAND_ROWS", "512" if ON_GPU else "32"))


@pytest.mark.parametrize("mode", ["full", "banded"])
@pytest.mark.parametrize("impl", ["baseline", "dcgen"])
@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("preset", PRESETS)
def test_dcae_encode(benchmark, preset, size, impl, mode):
    if mode == "banded" and size != max(SIZES):
        pytest.skip("the banded group is benchmarked at the largest size only")
    cfg, ours, theirs = dcae_pair(preset)
    gen = torch.Generator(device=DEVICE).manual_seed(size)
    x = (torch.rand(1, 3, size, size, generator=gen, device=DEVICE) * 2 - 1).to(DTYPE)

    if impl == "dcgen":
        band_rows = BAND_ROWS if mode == "banded" else None

        def fn():
            with torch.inference_mode():
                return ours.encode(x, band_rows=band_rows)
    else:

        def fn():
            with torch.inference_mode():
                return theirs.encode(x).latent

    benchmark.group = f"encode {preset.removeprefix('dc-ae-')} {size}px"
    if mode == "banded":
        benchmark.group += f" (dcgen banded, {BAND_ROWS}-row bands)"
    benchmark.extra_info.update(
        impl=impl,
        baseline_name="diffusers AutoencoderDC (eager)",
        preset=preset,
        size=size,
        dtype=str(DTYPE),
        device=str(DEVICE),
        narrow_model=not ON_GPU,
    )
    benchmark.extra_info.update(measure_peak_memory(fn))
    time_it(benchmark, fn, n_rounds=rounds(5 if size >= 4096 else 10))
    if impl == "dcgen":  # record only; tests/autoencoders holds the parity tolerances
        record_rel_err(benchmark, fn, lambda: theirs.encode(x).latent, limit=None)
