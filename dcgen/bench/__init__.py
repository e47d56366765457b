"""Speed benchmarks: the DC-Gen paper's latency table (base FLUX.1 / SANA vs DC-Gen at 1K/2K/4K)
on random-weight models, as a markdown table, JSON and a PNG bar chart (``dcgen bench``)."""

from .models import MODELS, ModelSpec, dcae_preset_for, get_model_spec, token_counts
from .report import bar_chart, format_markdown, write_report
from .speed import (
    VARIANTS,
    BenchSettings,
    CudaClock,
    WallClock,
    extrapolate_denoise,
    run_speed_bench,
)

__all__ = [
    "MODELS",
    "VARIANTS",
    "BenchSettings",
    "CudaClock",
    "ModelSpec",
    "WallClock",
    "bar_chart",
    "dcae_preset_for",
    "extrapolate_denoise",
    "format_markdown",
    "get_model_spec",
    "run_speed_bench",
    "token_counts",
    "write_report",
]
