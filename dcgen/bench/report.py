"""The speed report: a markdown table like the DC-Gen paper's, the JSON, and a PNG bar chart."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

COLUMNS = (
    "resolution", "tokens base / DC-Gen", "DC-AE", "base latency", "DC-Gen latency", "speedup",
    "throughput speedup", "base denoise / decode", "DC-Gen denoise / decode",
    "peak GB base / DC-Gen", "numbers",
)  # fmt: skip


def _ms(v: float | None) -> str:
    if v is None:
        return "-"
    return f"{v / 1e3:.2f} s" if v >= 1e3 else f"{v:.1f} ms"


def _x(v: float | None) -> str:
    return "-" if v is None else f"{v:.1f}x"


def _gb(row: dict[str, Any], key: str) -> str:
    v = row[key].get("peak_memory_gb")
    return "-" if v is None else f"{v:.1f}"


def format_markdown(report: dict[str, Any]) -> str:
    s = report["settings"]
    lines = [
        f"# DC-Gen speed: base {s['model']} vs DC-Gen-{s['model']}",
        "",
        f"{report['device']}, torch {report['torch']}, {s['dtype']}, random weights; "
        f"{s['steps']} steps + decode, text encoding excluded; batch 1 latency, throughput at "
        f"batch {s['batch']}; attention {s['attention']}, dcgen kernels "
        f"{'on' if s['kernels'] else 'off'}; median of {s['repeats']} run(s) after "
        f"{s['warmup']} warm-up; timer {report['timer']}.",
        "",
        f"How: {report['method']}.",
        "",
        "| " + " | ".join(COLUMNS) + " |",
        "|" + "---|" * len(COLUMNS),
    ]
    for r in report["rows"]:
        b, d = r["base"], r["dcgen"]
        cells = [
            f"{r['resolution']}px",
            f"{r['base_tokens']:,} / {r['dcgen_tokens']:,}",
            r["dcae"].removeprefix("dc-ae-"),
            _ms(b["total_ms"]),
            _ms(d["total_ms"]),
            _x(r["speedup"]),
            _x(r["throughput_speedup"]),
            f"{_ms(b['denoise_ms'])} / {_ms(b['decode_ms'])}",
            f"{_ms(d['denoise_ms'])} / {_ms(d['decode_ms'])}",
            f"{_gb(r, 'base')} / {_gb(r, 'dcgen')}",
            r["mode"],
        ]
        lines.append("| " + " | ".join(cells) + " |")
    if any(r["mode"] == "extrapolated" for r in report["rows"]):
        lines += [
            "",
            "Extrapolated rows: decode times and the per-block / per-step times behind the "
            "denoise column are measured; the denoise column (and so latency, speedups) is "
            "computed from them as stated above. Peak memory is that of the truncated model.",
        ]
    return "\n".join(lines) + "\n"


def bar_chart(report: dict[str, Any], size: tuple[int, int] = (720, 360)) -> Image.Image:
    """Grouped bars per resolution (base vs DC-Gen latency, log scale) with the speedup."""
    w, h = size
    img = Image.new("RGB", size, (255, 255, 255))
    d = ImageDraw.Draw(img)
    rows = report["rows"]
    title = f"latency, {report['settings']['steps']} steps + decode (log scale)"
    d.text((8, 6), title, fill=(0, 0, 0), font_size=14)
    values = [v for r in rows for v in (r["base"]["total_ms"], r["dcgen"]["total_ms"]) if v > 0]
    if not values:
        return img
    lo = math.floor(math.log10(min(values))) - 0.2
    hi = math.log10(max(values)) + 0.1
    left, top, right, bottom = 60, 30, w - 10, h - 40
    d.line((left, bottom, right, bottom), fill=(120, 120, 120))
    d.line((left, top, left, bottom), fill=(120, 120, 120))
    for e in range(math.ceil(lo), math.floor(hi) + 1):
        y = bottom - (bottom - top) * (e - lo) / (hi - lo)
        d.line((left - 4, y, left, y), fill=(120, 120, 120))
        d.text((4, y - 7), _ms(10.0**e), fill=(0, 0, 0), font_size=11)
    slot = (right - left) / max(1, len(rows))
    colours = ((200, 80, 60), (40, 110, 200))
    for i, r in enumerate(rows):
        x0 = left + i * slot + slot * 0.15
        bw = slot * 0.3
        for j, key in enumerate(("base", "dcgen")):
            v = max(r[key]["total_ms"], 10.0**lo)
            y = bottom - (bottom - top) * (math.log10(v) - lo) / (hi - lo)
            d.rectangle((x0 + j * bw, y, x0 + (j + 1) * bw - 2, bottom), fill=colours[j])
        d.text((x0, bottom + 4), f"{r['resolution']}px", fill=(0, 0, 0), font_size=12)
        d.text((x0, bottom + 20), f"{_x(r['speedup'])}", fill=(0, 0, 0), font_size=12)
    for j, label in enumerate(("base", "DC-Gen")):
        d.rectangle((right - 140 + j * 70, 8, right - 128 + j * 70, 20), fill=colours[j])
        d.text((right - 124 + j * 70, 6), label, fill=(0, 0, 0), font_size=12)
    return img


def write_report(report: dict[str, Any], out: str | Path) -> dict[str, Path]:
    """speed.md, speed.json and speed.png in ``out``; returns their paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"md": out / "speed.md", "json": out / "speed.json", "png": out / "speed.png"}
    paths["md"].write_text(format_markdown(report))
    paths["json"].write_text(json.dumps(report, indent=2, default=str) + "\n")
    bar_chart(report).save(paths["png"])
    return paths
