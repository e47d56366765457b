"""Shared benchmark plumbing: device and sizes, CUDA-synchronised timing, peak memory, and the
baseline-vs-dcgen ratio table printed at the end of every run (and by summarize.py from JSON).

Convention: every benchmark sets ``benchmark.group`` to the case and
``benchmark.extra_info["impl"]`` to "baseline" or "dcgen" (plus a readable "baseline_name"),
so each group holds one baseline and one candidate measured in the same run.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping

import torch

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
ON_GPU = DEVICE.type == "cuda"


def sync() -> None:
    if ON_GPU:
        torch.cuda.synchronize()


def rounds(default_gpu: int, default_cpu: int = 2) -> int:
    env = os.environ.get("DCGEN_BENCH_ROUNDS")
    return int(env) if env else (default_gpu if ON_GPU else default_cpu)


def measure_peak_memory(fn: Callable[[], object]) -> dict[str, float]:
    """Run fn once; report peak allocated memory (GB) in total and above what was live before
    (the activations). CPU runs report nothing: torch has no CPU peak counter."""
    if not ON_GPU:
        fn()
        return {}
    sync()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    sync()
    peak = torch.cuda.max_memory_allocated()
    return {"peak_memory_gb": peak / 1e9, "peak_activation_gb": (peak - before) / 1e9}


def time_it(  # noqa: ANN001
    benchmark, fn: Callable[[], object], n_rounds: int, warmup: int = 1, back_to_back: int = 1
) -> None:
    """Time ``fn`` with the device synchronised at the end of every measurement.

    ``back_to_back`` > 1 (GPU): each measurement runs fn that many times and synchronises once,
    and the reported time is per call. For kernels of tens of microseconds a sync per call
    would add the host's launch and sync latency to every number; back to back, the GPU time
    is measured the way a model's stream of kernels runs."""
    n = back_to_back if ON_GPU else 1
    calls = [0]

    def run() -> None:
        fn()
        calls[0] += 1
        if calls[0] % n == 0:
            sync()

    if n > 1:
        benchmark.extra_info["calls_per_sync"] = n
    benchmark.pedantic(run, rounds=n_rounds, warmup_rounds=warmup, iterations=n)


def relative_error(got: object, want: object) -> float:
    """||got - want|| / ||want|| in fp32 (Frobenius), the largest over paired outputs when the
    functions return tuples. Shapes must match: a kernel that returns another shape is wrong."""
    gots = got if isinstance(got, tuple | list) else (got,)
    wants = want if isinstance(want, tuple | list) else (want,)
    if len(gots) != len(wants):
        raise AssertionError(f"expected {len(wants)} outputs like the baseline, got {len(gots)}")
    errs = []
    for a, b in zip(gots, wants):
        if a.shape != b.shape:
            raise AssertionError(
                f"expected the baseline's shape {tuple(b.shape)}, got {tuple(a.shape)}"
            )
        b = b.float()
        errs.append(float((a.float() - b).norm() / b.norm().clamp_min(1e-30)))
    return max(errs)


def record_rel_err(  # noqa: ANN001
    benchmark,
    ours: Callable[[], object],
    baseline: Callable[[], object],
    restore: Iterable[torch.Tensor] = (),
    limit: float | None = 2e-2,
) -> float:
    """Run dcgen's function and the baseline's once each on the same inputs, record dcgen's
    relative error against the baseline as extra_info["rel_err"] (the table's last column) and
    fail above ``limit`` (None: record only): a speed-up of a wrong result is no result.

    Tensors in ``restore`` (inputs that the functions change in place, outputs written into
    them included) are snapshotted first and put back after each run, so both functions see the
    same values and the benchmark's inputs are left as they were. Call it after the timing:
    its extra allocations stay out of the peak-memory reading."""
    restore = list(restore)
    with torch.inference_mode():
        saved = [t.clone() for t in restore]

    def run(fn: Callable[[], object]) -> object:
        with torch.inference_mode():
            out = fn()
            out = tuple(o.clone() for o in out) if isinstance(out, tuple | list) else out.clone()
            for t, s in zip(restore, saved):
                t.copy_(s)
        return out

    err = relative_error(run(ours), run(baseline))
    benchmark.extra_info["rel_err"] = err
    if limit is not None:
        assert err <= limit, (
            f"dcgen's output differs from the baseline's: relative error {err:.2e} > {limit:g}"
        )
    return err


def ratio_rows(entries: Iterable[Mapping]) -> list[dict]:
    """Group entries ({group, impl, median_s, extra}) into rows baseline vs dcgen."""
    groups: dict[str, dict] = {}
    for e in entries:
        row = groups.setdefault(e["group"], {"group": e["group"]})
        impl = e["impl"]
        row[f"{impl}_ms"] = e["median_s"] * 1e3 if e["median_s"] is not None else None
        for key in ("peak_memory_gb", "peak_activation_gb", "tflops", "gbps", "rel_err"):
            if key in e["extra"]:
                row[f"{impl}_{key}"] = e["extra"][key]
        if impl == "baseline":
            row["baseline_name"] = e["extra"].get("baseline_name", "baseline")
    rows = []
    for row in groups.values():
        b, d = row.get("baseline_ms"), row.get("dcgen_ms")
        row["speedup"] = (b / d) if b and d else None
        rows.append(row)
    return rows


def format_table(rows: list[dict]) -> str:
    """Markdown table. Peak memory is the activation peak (allocated above what was live before
    the call): both models stay resident during a run, so the total would count the other one.
    Bandwidth (GB/s) counts each side's own bytes, so where the two move different amounts (a
    quantize against a copy of its input) the bandwidth ratio, not the speed-up, is the
    comparison. The last column is dcgen's output error against the baseline where a benchmark
    records it (a speed-up never reads without its quality)."""

    def f(v: object, spec: str, unit: str = "") -> str:
        return "-" if v is None else format(v, spec) + unit

    lines = [
        "| case | baseline | baseline ms | dcgen ms | speedup | baseline peak act. GB "
        "| dcgen peak act. GB | baseline GB/s | dcgen GB/s | GB/s ratio | dcgen rel. error |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        b_bw, d_bw = r.get("baseline_gbps"), r.get("dcgen_gbps")
        bw_ratio = d_bw / b_bw if b_bw and d_bw else None
        lines.append(
            f"| {r['group']} | {r.get('baseline_name', '-')} | {f(r.get('baseline_ms'), '.2f')} "
            f"| {f(r.get('dcgen_ms'), '.2f')} | {f(r.get('speedup'), '.2f', 'x')} "
            f"| {f(r.get('baseline_peak_activation_gb'), '.2f')} "
            f"| {f(r.get('dcgen_peak_activation_gb'), '.2f')} | {f(b_bw, '.0f')} "
            f"| {f(d_bw, '.0f')} | {f(bw_ratio, '.2f', 'x')} | {f(r.get('dcgen_rel_err'), '.1e')} |"
        )
    return "\n".join(lines)
