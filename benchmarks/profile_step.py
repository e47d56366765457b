"""Where a DC-Gen denoising step's time goes: a torch.profiler breakdown by kernel family.

    python benchmarks/profile_step.py [--model flux] [--resolution 4096] [--precision bf16,fp8,nvfp4-w4a4]
                                      [--variant kernels] [--steps 2] [--out DIR]

The speed table (`dcgen bench`) says how long a step takes; this says why. It builds the same
truncated model as `dcgen bench --quick` (one block per block list, random weights), runs
``--steps`` denoising steps of the DC-Gen pipeline once to warm up, times them once without the
profiler (wall clock, synchronised), then once under torch.profiler, and reports per step:

- wall time, and the GPU's busy time (the sum of kernel times): their gap is time the GPU sat
  idle, waiting for the host (Python, dispatch, launches) or for a synchronisation;
- kernel time by family (GEMM, attention, dcgen kernels, the rest: elementwise, norms, copies)
  and the top kernels.

Families: attention, dcgen (dcgen's other kernels), conv (cuDNN convolutions), gemm, other
(elementwise, norms, copies). "Per step" is one pipeline call of ``--steps`` steps divided by
their number (one sample, per-call setup included); the idle time subtracts the profiled run's
kernel time from the unprofiled run's wall time, so it is approximate. On a CPU (CI, tiny
model) there are no kernels: the families and the top list stay empty, and the .txt table
lists the host-side ops. Output: ``profile_<precision>.json`` and ``profile_<precision>.txt`` in
``--out``, and a one-line summary per precision on stdout.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

# `python3 benchmarks/profile_step.py` puts benchmarks/ on the path, not the repo root, and the
# GPU machine has no installed dcgen (device_check.sh builds it in place)
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from dcgen.bench import BenchSettings  # noqa: E402
from dcgen.bench.quantized import QUANT_PRECISIONS  # noqa: E402
from dcgen.bench.speed import VARIANTS, SpeedBench  # noqa: E402
from dcgen.bench.variants import graphed_blocks, kernels_enabled, uses_kernels  # noqa: E402

# Kernel families by name, first match wins: attention first (dcgen's Hopper attention kernels
# carry wgmma names too), then dcgen's other kernels, then convolutions (cuDNN's implicit-GEMM
# convolution kernels carry "gemm" too), then GEMMs.
FAMILIES = (
    ("attention", re.compile(r"fmha|flash|attention|sdpa", re.I)),
    ("dcgen", re.compile(r"dcgen|qk_norm_rope|modulat|gated_resid|quantize|fp8_scale|rms_norm")),
    ("conv", re.compile(r"conv(?!ert)|fprop|dgrad|wgrad|implicit_gemm|winograd", re.I)),
    ("gemm", re.compile(r"gemm|cutlass|xmma|nvjet|cublas|s16816|s1688|wgmma|scaled_mm", re.I)),
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


def _measure(
    run: Callable[[], Any],
    sync: Callable[[], None],
    on_cuda: bool,
    per: int,
    call_sites: bool = False,
) -> dict:
    """Warm ``run`` up, time it once (wall clock), profile it once; per-``per`` numbers.
    ``call_sites``: also the op table by input shape and by Python call site (the profiled run
    records shapes and stacks; that costs host time, but the wall time is measured before,
    without the profiler, and the kernels' device times do not change)."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if on_cuda:
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    run()  # warm-up: kernel selection, caches, lazy init, graph captures
    sync()
    t0 = time.perf_counter()
    run()
    sync()
    wall_ms = (time.perf_counter() - t0) * 1e3 / per
    extra: dict[str, Any] = {}
    if call_sites:
        # Python frames reach the events only with the verbose experimental config (torch 2.11
        # and 2.14: with_stack alone records none)
        from torch._C._profiler import _ExperimentalConfig

        extra = dict(with_stack=True, experimental_config=_ExperimentalConfig(verbose=True))
    with torch.profiler.profile(activities=activities, record_shapes=call_sites, **extra) as prof:
        run()
        sync()
    averages = prof.key_averages()
    kernels = []
    for entry in averages:
        us = _device_time_us(entry)
        # device-side rows (kernels, copies, memsets): device time and no CPU-side self time;
        # user annotations (record_function ranges) span kernels already counted
        if getattr(entry, "is_user_annotation", False):
            continue
        if us > 0 and getattr(entry, "self_cpu_time_total", 0) == 0:
            kernels.append((entry.key, us / 1e3 / per, entry.count / per))
    kernels.sort(key=lambda k: -k[1])
    families: dict[str, float] = {}
    for name, ms, _ in kernels:
        families[family_of(name)] = families.get(family_of(name), 0.0) + ms
    gpu_ms = sum(ms for _, ms, _ in kernels)
    return {
        "wall_ms": wall_ms,
        "gpu_busy_ms": gpu_ms if on_cuda else None,
        "gpu_idle_ms": wall_ms - gpu_ms if on_cuda else None,
        "families_ms": families,
        "top_kernels": [{"name": n[:160], "ms": ms, "calls": c} for n, ms, c in kernels[:30]],
        "table": _table(averages, on_cuda),
        **(_call_site_tables(prof, on_cuda) if call_sites else {}),
    }


def _call_site_tables(prof: Any, on_cuda: bool) -> dict[str, str]:
    """Which shapes and which lines of Python the time goes to: the 2026-11-27 profiles had
    15 ms of layout copies and 10 ms of broadcast adds in the decode, and 0.26 ms a step of
    non-vectorized elementwise kernels in the FP8 step, whose kernels name no caller."""
    return {
        "table_by_shape": _table(prof.key_averages(group_by_input_shape=True), on_cuda),
        "table_by_stack": _table(prof.key_averages(group_by_stack_n=8), on_cuda),
    }


def profile_precision(
    bench: SpeedBench,
    precision: str,
    resolution: int,
    steps: int,
    variant: str,
    decode: bool = False,
) -> dict[str, Any]:
    """The denoising step (numbers per step) and, with ``decode``, the DC-AE decode of the
    image (per decode) of the DC-Gen pipeline."""
    pipe = bench.pipeline("dcgen", resolution, precision)
    text = bench.text(1)
    on_cuda = bench.on_cuda
    latents: list[torch.Tensor] = []

    def run() -> None:
        with bench._contexts(pipe.transformer, variant, "default"):
            latents[:] = [bench._call(pipe, text, resolution, steps)]

    def run_decode() -> None:
        with torch.inference_mode(), kernels_enabled(uses_kernels(variant)):
            pipe.decode_latents(latents[0], None, 0)

    sync = bench.clock.sync  # a device synchronisation on CUDA, nothing on the CPU

    with graphed_blocks(pipe.transformer, variant):  # graphs: captured in the warm-up
        step = _measure(run, sync, on_cuda, steps, call_sites=True)
    result = {
        "precision": precision,
        "resolution": resolution,
        "variant": variant,
        "steps": steps,
        "blocks": dict(zip(bench.spec.block_kinds, bench.measured_blocks, strict=True)),
        "device": torch.cuda.get_device_name(bench.device) if on_cuda else "cpu",
        "step": step,
    }
    if decode:
        result["decode"] = _measure(run_decode, sync, on_cuda, 1, call_sites=True)
    return result


def _table(averages: Any, on_cuda: bool) -> str:
    keys = ("self_device_time_total", "self_cuda_time_total") if on_cuda else ()
    for key in (*keys, "self_cpu_time_total"):  # the device key's name depends on the torch
        try:
            return averages.table(sort_by=key, row_limit=30, max_name_column_width=80)
        except (AttributeError, KeyError, ValueError):
            continue
    return ""


def summary_line(result: dict[str, Any]) -> str:
    parts = []
    for part, unit in (("step", "step"), ("decode", "decode")):
        r = result.get(part)
        if r is None:
            continue
        line = f"{part} {r['wall_ms']:.1f} ms/{unit}"
        if r["gpu_busy_ms"] is not None:
            fams = ", ".join(f"{k} {v:.1f}" for k, v in sorted(r["families_ms"].items()))
            line += f" (GPU busy {r['gpu_busy_ms']:.1f}, idle {r['gpu_idle_ms']:.1f}; {fams})"
        parts.append(line)
    return f"{result['precision']} {result['variant']} {result['resolution']}px: " + "; ".join(
        parts
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", default="flux" if torch.cuda.is_available() else "tiny")
    ap.add_argument("--resolution", type=int, default=None, help="default: the model's largest")
    ap.add_argument(
        "--precision", default="bf16", help=f"comma list of bf16, {', '.join(QUANT_PRECISIONS)}"
    )
    ap.add_argument("--variant", default="kernels", choices=VARIANTS)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--decode", action="store_true", help="also profile the DC-AE decode")
    ap.add_argument("--out", default="runs/profile")
    args = ap.parse_args(argv)
    precisions = [p.strip() for p in args.precision.split(",") if p.strip()]
    allowed = ("bf16", *QUANT_PRECISIONS)
    bad = [p for p in precisions if p not in allowed]
    if bad or not precisions:
        ap.error(
            f"--precision: expected a comma list of {', '.join(allowed)}, got {args.precision!r}"
        )
    if args.steps < 1:
        ap.error(f"--steps: expected a positive int, got {args.steps}")
    settings = BenchSettings(
        model=args.model,
        resolutions=(args.resolution,) if args.resolution else None,
        quick=True,
        quick_steps=args.steps,
        variants=(args.variant,),
        fp8="fp8" in precisions,
        nvfp4=tuple(p.removeprefix("nvfp4-") for p in precisions if p.startswith("nvfp4-")),
    )
    bench = SpeedBench(settings)
    resolution = max(bench.settings.resolutions)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    try:
        for precision in precisions:
            if precision in QUANT_PRECISIONS:
                bench.build_quant(precision)  # one quantized set resident at a time
            result = profile_precision(
                bench, precision, resolution, args.steps, args.variant, decode=args.decode
            )
            tables = [f"== {part} ==\n{result[part].pop('table')}" for part in ("step", "decode")
                      if part in result]  # fmt: skip
            for part in ("step", "decode"):  # the call-site tables after the summaries
                for key in ("table_by_shape", "table_by_stack"):
                    if key in result.get(part, {}):
                        tables.append(f"== {part}, {key[6:].replace('_', ' ')} ==\n"
                                      f"{result[part].pop(key)}")  # fmt: skip
            (out / f"profile_{precision}.txt").write_text("\n\n".join(tables) + "\n")
            (out / f"profile_{precision}.json").write_text(json.dumps(result, indent=1) + "\n")
            print(summary_line(result))
    finally:
        bench.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
