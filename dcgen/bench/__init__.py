"""Speed benchmarks: the DC-Gen paper's latency table (base FLUX.1 vs DC-Gen-FLUX at 1K/2K/4K)
on random-weight models, as a markdown table, JSON and a PNG bar chart (``dcgen bench``)."""

from .report import bar_chart, format_markdown, write_report
from .speed import (
    MODELS,
    BenchSettings,
    CudaClock,
    WallClock,
    dcae_preset_for,
    extrapolate_denoise,
    run_speed_bench,
    token_counts,
)

__all__ = [
    "MODELS",
    "BenchSettings",
    "CudaClock",
    "WallClock",
    "bar_chart",
    "dcae_preset_for",
    "extrapolate_denoise",
    "format_markdown",
    "run_speed_bench",
    "token_counts",
    "write_report",
]
