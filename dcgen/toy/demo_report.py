"""`dcgen demo`'s report: the claims checked on a run (never tuned to pass), report.md, the
image grid and the loss curves."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image, ImageDraw

from dcgen.train.loop import LOG_NAME, read_log

from .images import plot_curve, to_pil

ROWS = ("base", "naive", "stage1", "stage1+2", "dcgen")
ROW_TITLES = {
    "base": "base (f8 VAE, 2x2 patches)",
    "naive": "naive (random embedder/head + LoRA)",
    "stage1": "stage 1 only (DiT untouched)",
    "stage1+2": "stage 1+2",
    "dcgen": "DC-Gen (stage 1+2+3)",
}


def claims(report: dict[str, Any]) -> dict[str, Any]:
    """DC-Gen's claims on this run, each with the numbers behind it (never tuned to pass)."""
    rows = report["rows"]
    fd_before = report["alignment"]["feature_distance_random_embedder"]
    fd_after = report["alignment"]["feature_distance_after_stage1"]
    drop = [b / a if a > 0 else math.inf for b, a in zip(fd_before, fd_after)]
    base_acc = rows["base"]["prompt_accuracy"]
    return {
        "stage1_beats_naive": {
            "stage1": rows["stage1"]["prompt_accuracy"],
            "naive": rows["naive"]["prompt_accuracy"],
            "holds": rows["stage1"]["prompt_accuracy"] > rows["naive"]["prompt_accuracy"],
        },
        "dcgen_reaches_90pct_of_base": {
            "dcgen": rows["dcgen"]["prompt_accuracy"],
            "base": base_acc,
            "holds": rows["dcgen"]["prompt_accuracy"] >= 0.9 * base_acc,
        },
        "token_ratio": rows["base"]["tokens_per_image"] / rows["dcgen"]["tokens_per_image"],
        "sequence_ratio": rows["base"]["sequence_length"] / rows["dcgen"]["sequence_length"],
        "latency_speedup": rows["dcgen"]["speedup_vs_base"],
        "denoise_latency_speedup": rows["dcgen"]["denoise_speedup_vs_base"],
        "throughput_speedup": rows["dcgen"]["throughput_vs_base"],
        "latency_matches_token_ratio": _latency_vs_tokens(report),
        # The same comparison at equal DiT training (none): aligned vs random latent layers.
        "stage1_beats_untrained_naive": {
            "stage1": rows["stage1"]["prompt_accuracy"],
            "naive_untrained": report["lora_curve"]["naive"]["0"]["prompt_accuracy"],
            "holds": rows["stage1"]["prompt_accuracy"]
            > report["lora_curve"]["naive"]["0"]["prompt_accuracy"],
        },
        "naive_lora_steps_to_reach_stage1": report["lora_curve"]["naive_steps_to_reach_stage1"],
        "dcgen_lora_steps_to_reach_naive_final": report["lora_curve"][
            "dcgen_steps_to_reach_naive_final"
        ],
        # holds None: not measured (no feature_layers), rather than a failed claim.
        "feature_distance_drop_after_stage1": {
            "factor_per_layer": drop,
            "holds": min(drop) >= 10.0 if drop else None,
        },
    }


def _latency_vs_tokens(report: dict[str, Any]) -> dict[str, Any]:
    """Does the measured batch-1 speed-up reach the token ratio: at the toy's own size, and at
    which of the larger sizes first."""
    rows = report["rows"]
    ratio = rows["base"]["tokens_per_image"] / rows["dcgen"]["tokens_per_image"]
    sweep = report.get("latency_by_resolution", [])
    reached = [r["image_size"] for r in sweep if r["speedup"] >= r["token_ratio"]]
    return {
        "token_ratio": ratio,
        "at_training_size": rows["dcgen"]["speedup_vs_base"],
        "holds_at_training_size": rows["dcgen"]["speedup_vs_base"] >= ratio,
        "by_size": {str(r["image_size"]): r["speedup"] for r in sweep},
        "first_size_reached": reached[0] if reached else None,
    }


def markdown_report(report: dict[str, Any]) -> str:
    rows = report["rows"]
    layers = report["alignment"]["layers"]
    # Each cell carries its own trailing " |": no layers must leave no empty cell behind.
    head = (
        "| model | tokens / image | latency / image | vs base | denoise / image | vs base | "
        "decode / image | batch throughput | vs base | "
        "prompt accuracy | Frechet dist. |" + "".join(f" feat. dist. block {i} |" for i in layers)
    )
    lines = [
        "# dcgen demo: DC-Gen on the toy world",
        "",
        f"Device {report['device']} ({report['threads']} threads), "
        f"{report['image_size']}x{report['image_size']} images, "
        f"{report['settings']['eval_prompts']} held-out prompts, "
        f"{report['settings']['sampling_steps']} Euler steps; total run "
        f"{report['timings_s']['total']:.0f} s.",
        "",
        head,
        "|" + "---|" * (11 + len(layers)),
    ]
    for name in ROWS:
        r = rows[name]
        lines.append(
            f"| {r['model']} | {r['tokens_per_image']} | {r['latency_s'] * 1000:.1f} ms | "
            f"{r['speedup_vs_base']:.2f}x | {r['denoise_latency_s'] * 1000:.1f} ms | "
            f"{r['denoise_speedup_vs_base']:.2f}x | {r['decode_latency_s'] * 1000:.1f} ms | "
            f"{r['throughput_images_per_s']:.1f} img/s | "
            f"{r['throughput_vs_base']:.2f}x | {r['prompt_accuracy']:.3f} | "
            f"{r['frechet_distance']:.3f} |"
            + "".join(f" {r['feature_distance'][str(i)]:.3f} |" for i in layers)
        )
    diverged = [
        f"{rows[n]['model']}: {rows[n]['non_finite_images']} of "
        f"{report['settings']['eval_prompts']} images not finite"
        for n in ROWS
        if rows[n].get("non_finite_images")
    ]
    if diverged:
        lines += [
            "",
            "Diverged rows (their non-finite images count as wrong answers and their Frechet "
            "distance is inf): " + "; ".join(diverged) + ".",
        ]
    a = report["alignment"]
    c = report["checks"]
    lines += [
        "",
        "Latency: median of batch-1 runs after a warm-up, split into denoise (the transformer's "
        "Euler steps, where the token count matters) and decode (the autoencoder); speed-up = "
        "base latency / this row's. Batch throughput: images per second at up to 32 images per call. Feature distance: ||h_base - h||^2 / ||h_base||^2 of the image "
        "hidden states after each block vs the base model on the same images (0 = identical; "
        "the new model's tokens compared with the base tokens averaged onto its grid).",
        "",
        "## Alignment (stage 1)",
        "",
        "Squared L2 per token between the base model's and the new model's image hidden states "
        "(clean latents of the same training images), with the new embedder random vs aligned:",
        "",
        "| block | random embedder | after stage 1 | drop |",
        "|---|---|---|---|",
    ]
    for i, b, f in zip(
        layers, a["feature_distance_random_embedder"], a["feature_distance_after_stage1"]
    ):
        lines.append(f"| {i} | {b:.4f} | {f:.4f} | {b / f if f > 0 else math.inf:.1f}x |")
    r2 = a["velocity_readout_r2"]
    lines += [
        "",
        f"A linear head on the frozen blocks reads R^2 = {r2['stage1']:.2f} of the flow velocity "
        f"from their last hidden states (the base model on its own latents: "
        f"{r2['base']:.2f}; stage 1 on the base latent averaged onto the DC-AE grid, which "
        f"costs only the coarser grid: {r2['coarse_base_latent']:.2f}). The aligned embedder "
        f"has rank {a['embedder_rank']} for {a['latent_channels']} latent channels.",
        "",
    ]
    lines += _resolution_section(report)
    lines += _curve_section(report)
    lat = c["latency_matches_token_ratio"]
    first = lat["first_size_reached"]
    by_size = ", ".join(f"{k} px {v:.1f}x" for k, v in lat["by_size"].items())
    lines += [
        "## Claims",
        "",
        f"- Stage 1 alone beats the naive baseline: {c['stage1_beats_naive']['stage1']:.3f} vs "
        f"{c['stage1_beats_naive']['naive']:.3f} -> {'yes' if c['stage1_beats_naive']['holds'] else 'NO'}"
        f" (with no DiT training on either side: {c['stage1_beats_untrained_naive']['stage1']:.3f}"
        f" vs {c['stage1_beats_untrained_naive']['naive_untrained']:.3f} -> "
        f"{'yes' if c['stage1_beats_untrained_naive']['holds'] else 'NO'})",
        f"- DC-Gen reaches 90% of the base prompt accuracy: "
        f"{c['dcgen_reaches_90pct_of_base']['dcgen']:.3f} vs base "
        f"{c['dcgen_reaches_90pct_of_base']['base']:.3f} -> "
        f"{'yes' if c['dcgen_reaches_90pct_of_base']['holds'] else 'NO'}",
        f"- Tokens per image {c['token_ratio']:.0f}x fewer (the joint sequence with the text "
        f"tokens {c['sequence_ratio']:.1f}x shorter); measured latency "
        f"{c['latency_speedup']:.2f}x lower at batch 1 ({c['denoise_latency_speedup']:.2f}x for "
        f"the denoising alone), throughput "
        f"{c['throughput_speedup']:.2f}x higher in batches",
        f"- Latency ratio matches the {lat['token_ratio']:.0f}x token ratio at the training size: "
        f"{'yes' if lat['holds_at_training_size'] else 'NO'} "
        f"({lat['at_training_size']:.2f}x); "
        + (f"reached from {first}x{first} px on" if first else "not reached at the measured sizes")
        + (f" ({by_size})" if by_size else ""),
        "- Feature distance drops by >= 10x after stage 1 at every reported block: "
        + _feature_drop_verdict(c["feature_distance_drop_after_stage1"]),
        "",
        "Files: grid.png (rows: prompts; columns: " + ", ".join(ROWS) + "), loss_curves.png, "
        "pipeline/ (the DC-Gen model as a DCGenToyPipeline folder, for `dcgen generate "
        "--pipeline`).",
        "",
    ]
    return "\n".join(lines)


def _feature_drop_verdict(claim: dict[str, Any]) -> str:
    factors = claim["factor_per_layer"]
    if claim["holds"] is None or not factors:
        return "not measured (no feature_layers)"
    verdict = "yes" if claim["holds"] else "NO"
    return f"{verdict} ({', '.join(f'{d:.1f}x' for d in factors)})"


def _resolution_section(report: dict[str, Any]) -> list[str]:
    sweep = report.get("latency_by_resolution", [])
    if not sweep:
        return []
    repeats = int(report["settings"].get("resolution_repeats", 1))
    timed = "one timed run" if repeats == 1 else f"the median of {repeats} timed runs"
    lines = [
        "## Latency by resolution",
        "",
        "The same base and DC-Gen models sampling larger images than the toy was trained on "
        f"(batch 1, the same Euler steps, {timed} after a one-step warm-up; the images are "
        "not evaluated, only the cost, which the token count sets):",
        "",
        "| image | tokens base / DC-Gen | base latency | DC-Gen latency | speed-up | "
        "denoise speed-up |",
        "|---|---|---|---|---|---|",
    ]
    for r in sweep:
        b, d = r["base"], r["dcgen"]
        lines.append(
            f"| {r['image_size']}x{r['image_size']} | {b['tokens_per_image']} / "
            f"{d['tokens_per_image']} | {b['latency_s'] * 1000:.0f} ms | "
            f"{d['latency_s'] * 1000:.0f} ms | {r['speedup']:.2f}x | "
            f"{r['denoise_speedup']:.2f}x |"
        )
    return lines + [""]


def _curve_section(report: dict[str, Any]) -> list[str]:
    curve = report["lora_curve"]

    def cell(run: str, n: int) -> str:
        v = curve[run].get(str(n))
        return f"{v['prompt_accuracy']:.3f} ({v['frechet_distance']:.1f})" if v else "-"

    lines = [
        "## Prompt accuracy vs LoRA steps",
        "",
        "Snapshots of the naive run and of DC-Gen's stage 3 (the same runs as the rows above; "
        "Frechet distance in brackets). Step 0: naive = random latent layers on the untouched "
        "DiT, DC-Gen = stage 1+2. Stage 1 alone (no LoRA step): "
        f"{curve['stage1_accuracy']:.3f}.",
        "",
        "| LoRA steps | naive | DC-Gen |",
        "|---|---|---|",
    ]
    lines += [f"| {n} | {cell('naive', n)} | {cell('dcgen', n)} |" for n in curve["steps"]]
    reach = curve["naive_steps_to_reach_stage1"]
    catch = curve["dcgen_steps_to_reach_naive_final"]
    lines += [
        "",
        "The naive run reaches stage 1's accuracy "
        + (f"after {reach} LoRA steps" if reach is not None else "at none of these steps")
        + "; DC-Gen reaches the naive run's final accuracy "
        + (f"after {catch} LoRA steps." if catch is not None else "at none of these steps."),
        "",
    ]
    return lines


def image_grid(
    columns: Sequence[torch.Tensor], labels: Sequence[str], captions: Sequence[str]
) -> Image.Image:
    """One row per prompt (caption on the left), one column per model."""
    n = min(len(c) for c in columns)
    s = columns[0].shape[-1]
    text_w, head = 260, 22
    img = Image.new("RGB", (text_w + s * len(columns), head + s * n), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    for j, label in enumerate(labels):
        draw.text((text_w + j * s + 4, 4), label, fill=(0, 0, 0), font_size=13)
    for i in range(n):
        words = captions[i].split(" and ")
        for k, w in enumerate(words):
            draw.text((4, head + i * s + 6 + 16 * k), w, fill=(0, 0, 0), font_size=12)
        for j, col in enumerate(columns):
            img.paste(to_pil(col[i]), (text_w + j * s, head + i * s))
    return img


def loss_curves(out: Path, stages: Sequence[str]) -> Image.Image:
    panels = []
    for name in stages:
        losses = [float(e["loss"]) for e in read_log(out / name / LOG_NAME)]
        panels.append(plot_curve(losses if len(losses) > 1 else losses * 2, f"{name}: loss"))
    w, h = panels[0].size
    img = Image.new("RGB", (w * 2, h * math.ceil(len(panels) / 2)), (255, 255, 255))
    for k, p in enumerate(panels):
        img.paste(p, ((k % 2) * w, (k // 2) * h))
    return img
