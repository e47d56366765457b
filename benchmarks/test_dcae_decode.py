"""DC-AE decode: dcgen.DCAE vs diffusers.AutoencoderDC with the same random weights, bf16.

GPU: full-width presets at 1024 / 2048 / 4096 px. CPU: narrow presets at 64 / 128 px (smoke run).
Peak memory (GPU) goes to extra_info. Models are built once per preset and freed afterwards.
"""

from __future__ import annotations

import contextlib
import os

import pytest
import torch
from _dcae_models import DTYPE, dcae_pair
from _harness import DEVICE, ON_GPU, measure_peak_memory, record_rel_err, rounds, time_it

diffusers = pytest.importorskip("diffusers")

PRESETS = ["dc-ae-f32c32-sana-1.1", "dc-ae-f64c128-in-1.0"]
if ON_GPU:
    SIZES = [int(s) for s in os.environ.get("DCGEN_BENCH_SIZES", "1024,2048,4096").split(",")]
else:
    SIZES = [64, 128]

_compiled: dict[str, object] = {}


def _models(preset: str):
    return dcae_pair(preset, on_free=_compiled.clear)


# At the largest size, two more groups, each with its own baseline run so each reads on its own
# beside the full-frame group:
# - banded: banded decode (dcgen/autoencoders/banding.py), the memory / time trade of bands;
# - nchw: dcgen with its convolutions in NCHW (set_memory_format("contiguous")) instead of the
#   automatic channels_last on CUDA, which isolates what the layout is worth;
# - autotune: dcgen's decode under torch.backends.cudnn.benchmark (cuDNN times its algorithms
#   per shape on the first call and keeps the fastest), the baseline as users run it. It says
#   whether dcgen's decode should switch autotuning on itself; the peak memory is the first
#   call's, algorithm search included. cuDNN's plan cache is looked up before the autotune
#   flag, and its key does not hold the flag: after the full group ran the same convolutions,
#   no search would happen. On a GPU this group therefore needs a process of its own
#   (DCGEN_DECODE_MODES=autotune; benchmarks/device_check.sh runs it so).
# - compiled: the baseline is diffusers' decode under torch.compile (the DC-AE issue's second
#   baseline; dcgen stays eager, its path must not need compiling). Compiled once per preset and
#   warmed up before the peak memory is read, so neither number holds the compile. Opt-in
#   (DCGEN_DECODE_MODES=compiled): inductor takes minutes per preset, on a GPU machine too.
# DCGEN_DECODE_PRESETS narrows the presets (comma-separated names from PRESETS).
BAND_ROWS = int(os.environ.get("DCGEN_BENCH_BAND_ROWS", "512" if ON_GPU else "32"))
ALL_MODES = ("full", "banded", "nchw", "autotune", "compiled")
DEFAULT_MODES = ("full", "banded", "nchw", "autotune")
MODES = os.environ.get("DCGEN_DECODE_MODES", ",".join(DEFAULT_MODES)).split(",")
if not set(MODES) <= set(ALL_MODES):
    raise ValueError(f"DCGEN_DECODE_MODES: expected names from {ALL_MODES}, got {MODES}")
_presets = os.environ.get("DCGEN_DECODE_PRESETS")
if _presets:
    if not set(_presets.split(",")) <= set(PRESETS):
        raise ValueError(f"DCGEN_DECODE_PRESETS: expected names from {PRESETS}, got {_presets}")
    PRESETS = _presets.split(",")


@contextlib.contextmanager
def _cudnn_benchmark(on: bool):
    before = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = on or before
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = before


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("impl", ["baseline", "dcgen"])
@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("preset", PRESETS)
def test_dcae_decode(benchmark, preset, size, impl, mode):
    if mode != "full" and size != max(SIZES):
        pytest.skip(f"the {mode} group is benchmarked at the largest size only")
    cfg, ours, theirs = _models(preset)
    f = cfg.spatial_compression_ratio
    gen = torch.Generator(device=DEVICE).manual_seed(size)
    z = torch.randn(1, cfg.latent_channels, size // f, size // f, generator=gen, device=DEVICE)
    z = z.to(DTYPE)

    if impl == "dcgen":
        band_rows = BAND_ROWS if mode == "banded" else None
        ours.set_memory_format("contiguous" if mode == "nchw" else "auto")

        def fn():
            with torch.inference_mode(), _cudnn_benchmark(mode == "autotune"):
                return ours.decode(z, band_rows=band_rows)
    elif mode == "compiled":
        if preset not in _compiled:
            # the bound method: a compiled module would compile only forward(), not decode()
            _compiled[preset] = torch.compile(theirs.decode)
        compiled_decode = _compiled[preset]

        def fn():
            with torch.inference_mode():
                return compiled_decode(z).sample

        fn()  # compile (and autotune) outside both the peak-memory read and the timing
    else:

        def fn():
            with torch.inference_mode():
                return theirs.decode(z).sample

    benchmark.group = f"decode {preset.removeprefix('dc-ae-')} {size}px"
    if mode == "banded":
        benchmark.group += f" (dcgen banded, {BAND_ROWS}-row bands)"
    elif mode == "nchw":
        benchmark.group += " (dcgen NCHW convolutions)"
    elif mode == "autotune":
        benchmark.group += " (dcgen with cudnn.benchmark)"
    elif mode == "compiled":
        benchmark.group += " (diffusers under torch.compile)"
    compiled_baseline = mode == "compiled"
    benchmark.extra_info.update(
        impl=impl,
        baseline_name=f"diffusers AutoencoderDC ({'torch.compile' if compiled_baseline else 'eager'})",
        preset=preset,
        size=size,
        dtype=str(DTYPE),
        device=str(DEVICE),
        narrow_model=not ON_GPU,
    )
    benchmark.extra_info.update(measure_peak_memory(fn))
    time_it(benchmark, fn, n_rounds=rounds(5 if size >= 4096 else 10))
    if impl == "dcgen":  # against diffusers' eager decode, whatever the group's baseline
        # record only: a deep random-weight decoder in bf16 amplifies rounding differently in
        # the two implementations; tests/autoencoders holds the parity tolerances
        record_rel_err(benchmark, fn, lambda: theirs.decode(z).sample, limit=None)
