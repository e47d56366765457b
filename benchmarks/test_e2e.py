"""End to end: base vs DC-Gen, denoise + decode, for FLUX.1 (f8c16 VAE 2x2 vs DC-AE 1x1) and
SANA 1.6B (DC-AE f32c32 vs f64c128, 1x1).

One group per model and resolution, impl=baseline / dcgen. The baseline is what users run today:
the base model with stock diffusers attention (SDPA, no dcgen kernels); SANA's base DC-AE there
is dcgen's own DCAE on its PyTorch reference ops (numerically diffusers' AutoencoderDC, not that
class: the DC-Gen pipeline decodes through a DCAE), so its decode time is the reference ops',
not diffusers' (on this project's CPU, 512 px at width / 16, 1.33 s against AutoencoderDC's
1.06 s, one noisy comparison; not measured on a GPU). dcgen is the DC-Gen model with dcgen's
kernels (``dcgen bench --variants stock,kernels`` separates the two effects).
GPU: FLUX.1 / SANA-1.6B size in bf16, in quick mode (one block per block list, DCGEN_BENCH_E2E_STEPS steps, default 2: the timed
call is that truncated run plus the full decode; the extrapolated full-depth 20-step latency
goes to extra_info). Resolutions from DCGEN_BENCH_SIZES (default 1024,2048,4096), each skipped
when the free GPU memory is below a rough need. CPU: the tiny models at 64 / 128 px (smoke run).
"""

from __future__ import annotations

import gc
import os

import pytest
import torch
from _harness import DEVICE, ON_GPU, measure_peak_memory, rounds, time_it

from dcgen.bench.speed import BenchSettings, SpeedBench, dcae_preset_for

MODELS = {"flux": "flux", "sana": "sana-1.6b"} if ON_GPU else {"flux": "tiny", "sana": "tiny-sana"}
#: stock diffusers for the baseline, dcgen's kernels for the DC-Gen model
VARIANTS = {"baseline": "stock", "dcgen": "kernels"}
BASELINES = {"flux": "base FLUX.1 (f8c16 VAE, 2x2)", "sana": "base SANA (DC-AE f32c32, 1x1)"}
STEPS = int(os.environ.get("DCGEN_BENCH_E2E_STEPS", "2"))
if ON_GPU:
    SIZES = [int(s) for s in os.environ.get("DCGEN_BENCH_SIZES", "1024,2048,4096").split(",")]
else:
    SIZES = [64, 128]
#: rough free memory (GB) a resolution needs with the quick model (base VAE decode dominates)
NEED_GB = {1024: 12, 2048: 20, 4096: 50}

_bench: dict[str, SpeedBench] = {}


def _harness(model: str) -> SpeedBench:
    """One model resident at a time (the previous one is closed first)."""
    if model not in _bench:
        for other in list(_bench):
            _bench.pop(other).close()
        gc.collect()
        settings = BenchSettings(
            model=model, resolutions=tuple(SIZES), steps=20, quick=True, quick_steps=STEPS,
            device=str(DEVICE),
        )  # fmt: skip
        _bench[model] = SpeedBench(settings)
    return _bench[model]


@pytest.mark.parametrize("impl", ["baseline", "dcgen"])
@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("family", ["flux", "sana"])
def test_e2e(benchmark, family, size, impl):
    if ON_GPU:
        free = torch.cuda.mem_get_info()[0] / 1e9
        need = NEED_GB.get(size, 50)
        if free < need:
            pytest.skip(f"{size}px needs about {need} GB free, {free:.0f} GB free")
    model = MODELS[family]
    bench = _harness(model)
    steps = bench.settings.quick_steps
    variant = VARIANTS[impl]
    run = bench.runner(impl, size, batch=1, steps=steps, variant=variant)
    blocks = "+".join("1" for _ in bench.spec.blocks)
    benchmark.group = f"e2e {model} {size}px ({steps} steps, {blocks} blocks, + decode)"
    benchmark.extra_info.update(
        impl=impl,
        baseline_name=BASELINES[family],
        dcae=dcae_preset_for(bench.spec, size),
        size=size,
        dtype=bench.settings.dtype,
        device=str(DEVICE),
        measured="truncated model, quick steps, full decode",
        variant=variant,
    )
    full = bench.measure(impl, size, 1, variant)
    benchmark.extra_info.update(
        extrapolated_total_ms=full["total_ms"],
        extrapolated_denoise_ms=full["denoise_ms"],
        decode_ms=full["decode_ms"],
    )
    benchmark.extra_info.update(measure_peak_memory(run))
    time_it(benchmark, run, n_rounds=rounds(3, 1))
