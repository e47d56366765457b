"""Where a DC-Gen denoising step's time goes: a torch.profiler breakdown by kernel family.

    python benchmarks/profile_step.py [--model flux] [--resolution 4096] [--precision bf16,fp8]
                                      [--variant kernels] [--steps 2] [--out DIR]

The speed table (`dcgen bench`) says how long a step takes; this says why. It builds the same
truncated model as `dcgen bench --quick` (one block per block list, random weights), runs
``--steps`` denoising steps of the DC-Gen pipeline once to warm up, times them once without the
profiler (wall clock, synchronised), then once under torch.profiler, and reports per step:

- wall time, and the GPU's busy time (the sum of kernel times): their gap is time the GPU sat
  idle, waiting for the host (Python, dispatch, launches) or for a synchronisation;
- kernel time by family (GEMM, attention, dcgen kernels, the rest: elementwise, norms, copies)
  and the top kernels.

On a CPU (CI, tiny model) there are no kernels: the families are left empty and the top list is
of the host-side ops. Output: ``profile_<precision>.json`` and ``profile_<precision>.txt`` in
``--out``, and a one-line summary per precision on stdout.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path
from typing import Any

import torch

from dcgen.bench import BenchSettings
from dcgen.bench.speed import VARIANTS, SpeedBench, graphed_blocks

# Kernel families by name, first match wins (attention before GEMM: dcgen's Hopper attention
# kernels carry "sm90" and wgmma names too).
FAMILIES = (
    ("attention", re.compile(r"fmha|flash|attention|cudnn.*sdpa|sdpa", re.I)),
    ("gemm", re.compile(r"gemm|cutlass|xmma|nvjet|cublas|s16816|s1688|wgmma|scaled_mm", re.I)),
    ("dcgen", re.compile(r"dcgen|qk_norm_rope|modulat|gated_resid|quantize|fp8_scale|rms_norm")),
)


def family_of(name: str) -> str:
    for family, pattern in FAMILIES:
        if pattern.search(name):
            return family
    return "other"


def _device_time_us(entry: Any) -> float:
    # torch renamed the CUDA columns to "device" (2.4+); read whichever this torch has.
    for attr in ("self_device_time_total", "self_cuda_time_total"):
        value = getattr(entry, attr, None)
        if value is not None:
            return float(value)
    return 0.0


def profile_precision(
    bench: SpeedBench, precision: str, resolution: int, steps: int, variant: str
) -> dict[str, Any]:
    pipe = bench.pipeline("dcgen", resolution, precision)
    text = bench.text(1)
    on_cuda = bench.on_cuda

    def run() -> None:
        with bench._contexts(pipe.transformer, variant, "default"):
            bench._call(pipe, text, resolution, steps)

    def sync() -> None:
        if on_cuda:
            torch.cuda.synchronize(bench.device)

    activities = [torch.profiler.ProfilerActivity.CPU]
    if on_cuda:
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with graphed_blocks(pipe.transformer, variant):  # graphs: captured in the warm-up
        run()  # warm-up: kernel selection, caches, lazy init
        sync()
        t0 = time.perf_counter()
        run()
        sync()
        wall_ms = (time.perf_counter() - t0) * 1e3 / steps
        with torch.profiler.profile(activities=activities) as prof:
            run()
            sync()
    averages = prof.key_averages()

    kernels = []
    for entry in averages:
        us = _device_time_us(entry)
        # kernel rows have device time and no CPU-side self time of their own
        if us > 0 and getattr(entry, "self_cpu_time_total", 0) == 0:
            kernels.append((entry.key, us / 1e3 / steps, entry.count // steps))
    kernels.sort(key=lambda k: -k[1])
    families: dict[str, float] = {}
    for name, ms, _ in kernels:
        families[family_of(name)] = families.get(family_of(name), 0.0) + ms
    gpu_ms = sum(ms for _, ms, _ in kernels)
    return {
        "precision": precision,
        "resolution": resolution,
        "variant": variant,
        "steps": steps,
        "blocks": dict(zip(bench.spec.block_kinds, bench.measured_blocks, strict=True)),
        "device": torch.cuda.get_device_name(bench.device) if on_cuda else "cpu",
        "wall_ms_per_step": wall_ms,
        "gpu_busy_ms_per_step": gpu_ms if on_cuda else None,
        "gpu_idle_ms_per_step": wall_ms - gpu_ms if on_cuda else None,
        "families_ms_per_step": families,
        "top_kernels": [
            {"name": n[:160], "ms_per_step": ms, "calls_per_step": c} for n, ms, c in kernels[:30]
        ],
        "table": _table(averages, on_cuda),
    }


def _table(averages: Any, on_cuda: bool) -> str:
    keys = ("self_device_time_total", "self_cuda_time_total") if on_cuda else ()
    for key in (*keys, "self_cpu_time_total"):  # the device key's name depends on the torch
        try:
            return averages.table(sort_by=key, row_limit=30, max_name_column_width=80)
        except (AttributeError, KeyError, ValueError):
            continue
    return ""


def summary_line(result: dict[str, Any]) -> str:
    line = f"{result['precision']} {result['resolution']}px: wall {result['wall_ms_per_step']:.1f} ms/step"
    if result["gpu_busy_ms_per_step"] is not None:
        fams = ", ".join(f"{k} {v:.1f}" for k, v in sorted(result["families_ms_per_step"].items()))
        line += (
            f", GPU busy {result['gpu_busy_ms_per_step']:.1f} (idle "
            f"{result['gpu_idle_ms_per_step']:.1f}); kernels ms/step: {fams}"
        )
    return line


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", default="flux" if torch.cuda.is_available() else "tiny")
    ap.add_argument("--resolution", type=int, default=None, help="default: the model's largest")
    ap.add_argument("--precision", default="bf16", help="comma list of bf16, fp8")
    ap.add_argument("--variant", default="kernels", choices=VARIANTS)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--out", default="runs/profile")
    args = ap.parse_args(argv)
    precisions = [p.strip() for p in args.precision.split(",") if p.strip()]
    bad = [p for p in precisions if p not in ("bf16", "fp8")]
    if bad or not precisions:
        ap.error(f"--precision: expected a comma list of bf16, fp8, got {args.precision!r}")
    if args.steps < 1:
        ap.error(f"--steps: expected a positive int, got {args.steps}")
    settings = BenchSettings(
        model=args.model,
        resolutions=(args.resolution,) if args.resolution else None,
        quick=True,
        quick_steps=args.steps,
        variants=(args.variant,),
        fp8="fp8" in precisions,
    )
    bench = SpeedBench(settings)
    resolution = max(bench.settings.resolutions)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    try:
        for precision in precisions:
            if precision == "fp8":
                bench.build_fp8()
            result = profile_precision(bench, precision, resolution, args.steps, args.variant)
            (out / f"profile_{precision}.txt").write_text(result.pop("table") + "\n")
            (out / f"profile_{precision}.json").write_text(json.dumps(result, indent=1) + "\n")
            print(summary_line(result))
    finally:
        bench.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
