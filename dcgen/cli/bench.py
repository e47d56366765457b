"""`dcgen bench`: the paper's speed table."""

from __future__ import annotations

import argparse
from pathlib import Path

from .common import CLIError, check_out_path


def _cmd_bench(args: argparse.Namespace) -> int:
    from dcgen.bench import BenchSettings, format_markdown, run_speed_bench, write_report

    try:
        resolutions = (
            tuple(int(r) for r in args.resolutions.split(",")) if args.resolutions else None
        )
    except ValueError:
        raise ValueError(
            f"--resolutions: expected comma-separated integers, got {args.resolutions!r}"
        ) from None
    if args.no_kernels and args.variants is not None:
        raise ValueError("--no-kernels is --variants stock: give one of them, not both")
    variants = "stock" if args.no_kernels else (args.variants or "kernels")
    settings = BenchSettings(
        model=args.model, resolutions=resolutions, steps=args.steps, batch=args.batch,
        quick=args.quick, quick_blocks=args.quick_blocks, quick_steps=args.quick_steps,
        repeats=args.repeats, warmup=args.warmup, device=args.device, dtype=args.dtype,
        attention=args.attention, variants=variants, fp8=args.fp8,
        fp8_granularity=args.fp8_granularity, fp8_fast_accum=args.fp8_fast_accum,
        nvfp4=args.nvfp4 or (), nvfp4_rank=args.nvfp4_rank, cfg=args.cfg,
    )  # fmt: skip
    resolved = settings.resolved()  # bad input fails before any model is built
    check_out_path(Path(args.out), "--out", folder=True)
    if "graphs" in resolved.variants and not resolved.device.startswith("cuda"):
        raise CLIError(
            f"--variants graphs replays CUDA graphs: it needs a CUDA device, got {resolved.device}"
        )
    if not args.fp8 and (args.fp8_fast_accum or args.fp8_granularity != "row"):
        raise CLIError("--fp8-granularity and --fp8-fast-accum go with --fp8")

    def partial(report: dict) -> None:  # after every row: a cut-off run keeps what it measured
        write_report(report, args.out, chart=False)

    report = run_speed_bench(settings, on_row=partial)
    paths = write_report(report, args.out)
    print(format_markdown(report))
    print(f"wrote {paths['md']}, {paths['json']}, {paths['png']}")
    if report["errors"]:
        print(f"{len(report['errors'])} row(s) failed: see the report's last section")
        return 1
    return 0
