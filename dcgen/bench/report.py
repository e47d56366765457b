"""The speed report: a markdown table like the DC-Gen paper's, the JSON, and a PNG bar chart."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

from dcgen._json import dumps

from .quantized import QUANT_PRECISIONS

COLUMNS = (
    "resolution", "tokens base / DC-Gen", "DC-AE", "variant", "attention base / DC-Gen",
    "DC-Gen precision", "base latency", "DC-Gen latency", "speedup", "throughput speedup",
    "base denoise / decode", "DC-Gen denoise / decode", "peak GB base / DC-Gen",
    "DC-Gen block weights GB", "quality vs bf16 (rel err / cos)", "numbers",
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


def quantized(row: dict[str, Any]) -> bool:
    """Whether a row runs low-precision (FP8 / NVFP4) DC-Gen blocks against a 16-bit base."""
    return row["precision"] in QUANT_PRECISIONS


def _weights(row: dict[str, Any]) -> str:
    v = row.get("block_weights_gb")
    return "-" if v is None else f"{v:.3g}"


def _quality(q: dict[str, Any] | None) -> str:
    if not q:
        return "-"
    if "error" in q:
        return q["error"]
    return f"{q['rel_err']:.2e} / {q['cosine']:.5f}"


def _names(v: Any) -> str:
    return v if isinstance(v, str) else ",".join(v)


def _config(r: dict[str, Any], key: str) -> str:
    return f"{r['variant']}, {r[key]['attention_used']}, {r['precision']}"


def best_against_best(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per resolution: the fastest base row against the fastest DC-Gen row in the model dtype
    (the issue's "best against best") and against the fastest DC-Gen row of any precision
    (FP8 / NVFP4 included), each with the configuration that achieved it; plus the paper's setting
    (stock variant, SDPA flash for both) when such a row exists."""
    out = []
    for res in dict.fromkeys(r["resolution"] for r in rows):
        mine = [r for r in rows if r["resolution"] == res]
        full = [r for r in mine if not quantized(r)]
        base = min(full, key=lambda r: r["base"]["total_ms"])
        dc = min(full, key=lambda r: r["dcgen"]["total_ms"])
        dc_any = min(mine, key=lambda r: r["dcgen"]["total_ms"])
        b_ms = base["base"]["total_ms"]
        entry: dict[str, Any] = {
            "resolution": res,
            "base_ms": b_ms,
            "base_config": _config(base, "base"),
            "dcgen_ms": dc["dcgen"]["total_ms"],
            "dcgen_config": _config(dc, "dcgen"),
            "speedup": b_ms / dc["dcgen"]["total_ms"],
            "dcgen_any_ms": dc_any["dcgen"]["total_ms"],
            "dcgen_any_config": _config(dc_any, "dcgen"),
            "speedup_any": b_ms / dc_any["dcgen"]["total_ms"],
            "paper_setting_speedup": None,
        }
        paper = [r for r in full if r["variant"] == "stock" and r["attention"] == "flash"]
        if paper:
            entry["paper_setting_speedup"] = paper[0]["speedup"]
        out.append(entry)
    return out


def _guidance(cfg: float | None, one_batch: bool = True) -> str:
    """The caption's guidance clause (reports written before the setting existed: no CFG;
    before ``cfg_in_one_batch`` was recorded: one batch, the pipelines' only way then)."""
    if cfg is None or cfg <= 1.0:
        return "no classifier-free guidance"
    how = "in one batch" if one_batch else "as two transformer calls"
    return f"classifier-free guidance {cfg:g} (negative and positive prompt {how})"


def format_markdown(report: dict[str, Any]) -> str:
    s = report["settings"]
    model = report.get("model", {}).get("name", s["model"])
    base_ae = report.get("model", {}).get("base_ae", "")
    lines = [
        f"# DC-Gen speed: base {model} vs DC-Gen-{model}",
        "",
        f"{report['device']}, torch {report['torch']}, {s['dtype']}, random weights; base on "
        f"{base_ae}, DC-Gen on the DC-AE column with 1x1 patches; {s['steps']} steps + decode, "
        f"text encoding excluded; {_guidance(s.get('cfg'), report.get('cfg_in_one_batch', True))}; batch 1 latency, throughput at "
        f"batch {s['batch']}; SDPA "
        f"backends {_names(s['attention'])}, variants {_names(s['variants'])} (stock: diffusers "
        f"attention, dcgen ops on references; kernels: dcgen.accelerate(blocks=True) + "
        f"compiled kernels; graphs: kernels with each block replayed from a CUDA graph); "
        f"median of {s['repeats']} run(s) after {s['warmup']} warm-up; timer {report['timer']}.",
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
            r["variant"],
            f"{b['attention_used']} / {d['attention_used']}",
            r["precision"],
            _ms(b["total_ms"]),
            _ms(d["total_ms"]),
            _x(r["speedup"]),
            _x(r["throughput_speedup"]),
            f"{_ms(b['denoise_ms'])} / {_ms(b['decode_ms'])}",
            f"{_ms(d['denoise_ms'])} / {_ms(d['decode_ms'])}",
            f"{_gb(r, 'base')} / {_gb(r, 'dcgen')}",
            _weights(r),
            _quality(r.get("quality")),
            r["mode"],
        ]
        lines.append("| " + " | ".join(cells) + " |")
    summary = report.get("summary") or best_against_best(report["rows"])
    if summary:
        lines += [
            "",
            "Best against best (fastest base row vs fastest DC-Gen row; paper's setting = "
            "stock variant, SDPA flash for both):",
            "",
            "| resolution | best base | best DC-Gen (same dtype) | speedup | best DC-Gen (any "
            "precision) | speedup | paper's setting speedup |",
            "|---|---|---|---|---|---|---|",
        ]
        for e in summary:
            lines.append(
                f"| {e['resolution']}px | {_ms(e['base_ms'])} ({e['base_config']}) | "
                f"{_ms(e['dcgen_ms'])} ({e['dcgen_config']}) | {_x(e['speedup'])} | "
                f"{_ms(e['dcgen_any_ms'])} ({e['dcgen_any_config']}) | {_x(e['speedup_any'])} | "
                f"{_x(e['paper_setting_speedup'])} |"
            )
    if report.get("errors"):
        lines += ["", "Rows that failed (the traceback is in the log; the other rows stand):", ""]
        for e in report["errors"]:
            where = ", ".join(f"{k} {v}" for k, v in e.items() if k != "error")
            lines.append(f"- {where}: {e['error']}")
    if any(r["mode"] == "extrapolated" for r in report["rows"]):
        lines += [
            "",
            "Extrapolated rows: decode times and the per-block / per-step times behind the "
            "denoise column are measured; the denoise column (and so latency, speedups) is "
            "computed from them as stated above. Peak memory is that of the truncated model.",
        ]
    low = [r for r in report["rows"] if quantized(r)]
    if low:
        lines += [
            "",
            "Low-precision rows ("
            + ", ".join(dict.fromkeys(r["precision"] for r in low))
            + "): the base columns repeat the bf16 base of the same resolution, variant and "
            "attention (not re-measured); the DC-Gen peak memory leaves out the bf16 blocks "
            "kept resident beside the quantized ones (and every row's, the autoencoders it does "
            "not use); the block weights column, at full depth, shows what the format saves. "
            "Quality: relative error ||y_q - y|| / ||y||"
            " and cosine of the transformer output against the bf16 transformer on one batch "
            "(random weights: a numerics check, not an image-quality claim).",
        ]
        gemms = {r["quality"]["gemm"] for r in low if r.get("quality") and "gemm" in r["quality"]}
        if gemms:
            lines.append(f"NVFP4 GEMMs ran on: {', '.join(sorted(gemms))}.")
    return "\n".join(lines) + "\n"


def _row_tag(r: dict[str, Any]) -> str:
    """Short label of a row's configuration for the chart: variant, attention, precision."""
    tag = f"{r['variant']} {r['attention']}"
    return tag + (f" {r['precision']}" if quantized(r) else "")


def bar_chart(report: dict[str, Any], size: tuple[int, int] | None = None) -> Image.Image:
    """Grouped bars per row (base vs DC-Gen latency, log scale), labelled with resolution,
    configuration and speedup. The width grows with the number of rows."""
    rows = report["rows"]
    w, h = size or (max(720, 70 + 110 * len(rows)), 400)
    img = Image.new("RGB", (w, h), (255, 255, 255))
    d = ImageDraw.Draw(img)
    s = report["settings"]
    model = report.get("model", {}).get("name", s["model"])
    title = f"{model}: latency, {s['steps']} steps + decode (log scale)"
    d.text((8, 6), title, fill=(0, 0, 0), font_size=14)
    values = [v for r in rows for v in (r["base"]["total_ms"], r["dcgen"]["total_ms"]) if v > 0]
    if not values:
        return img
    lo = math.floor(math.log10(min(values))) - 0.2
    hi = math.log10(max(values)) + 0.1
    left, top, right, bottom = 60, 30, w - 10, h - 60
    d.line((left, bottom, right, bottom), fill=(120, 120, 120))
    d.line((left, top, left, bottom), fill=(120, 120, 120))
    for e in range(math.ceil(lo), math.floor(hi) + 1):
        y = bottom - (bottom - top) * (e - lo) / (hi - lo)
        d.line((left - 4, y, left, y), fill=(120, 120, 120))
        d.text((4, y - 7), _ms(10.0**e), fill=(0, 0, 0), font_size=11)
    slot = (right - left) / max(1, len(rows))
    colours = ((200, 80, 60), (40, 110, 200))
    for i, r in enumerate(rows):
        x0 = left + i * slot + slot * 0.1
        bw = slot * 0.35
        for j, key in enumerate(("base", "dcgen")):
            v = max(r[key]["total_ms"], 10.0**lo)
            y = bottom - (bottom - top) * (math.log10(v) - lo) / (hi - lo)
            d.rectangle((x0 + j * bw, y, x0 + (j + 1) * bw - 2, bottom), fill=colours[j])
        d.text((x0, bottom + 4), f"{r['resolution']}px", fill=(0, 0, 0), font_size=12)
        d.text((x0, bottom + 20), _row_tag(r), fill=(0, 0, 0), font_size=10)
        d.text((x0, bottom + 36), f"{_x(r['speedup'])}", fill=(0, 0, 0), font_size=12)
    for j, label in enumerate(("base", "DC-Gen")):
        d.rectangle((right - 140 + j * 70, 8, right - 128 + j * 70, 20), fill=colours[j])
        d.text((right - 124 + j * 70, 6), label, fill=(0, 0, 0), font_size=12)
    return img


def write_report(report: dict[str, Any], out: str | Path, chart: bool = True) -> dict[str, Path]:
    """speed.md, speed.json and (``chart``) speed.png in ``out``; returns their paths. Each
    file is written to a temporary name and renamed, so a run killed mid-write (the CLI
    rewrites the report after every row) leaves the previous complete version."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"md": out / "speed.md", "json": out / "speed.json", "png": out / "speed.png"}
    _write_atomic(paths["md"], format_markdown(report).encode())
    _write_atomic(paths["json"], (dumps(report, indent=2, default=str) + "\n").encode())
    if chart:
        tmp = paths["png"].with_suffix(".png.part")
        bar_chart(report).save(tmp, format="PNG")
        os.replace(tmp, paths["png"])
    return paths


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".part")
    tmp.write_bytes(data)
    os.replace(tmp, path)
