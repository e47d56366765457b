"""How `dcgen demo` samples and times a row: a model with the autoencoder that decodes its
latents (:class:`Space`), Euler sampling from fixed seeds, and batch-1 latency (split into
denoising and decoding) and batch throughput."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

from dcgen.adapters import adapter_for
from dcgen.sampling.flow import flow_sigmas, sample_euler
from dcgen.sampling.shift import resolve_shift
from dcgen.train.stages import DEFAULT_GUIDANCE

from . import assets as A


def progress_bar(it: Sequence[Any], desc: str, enabled: bool) -> Any:
    """``it`` behind a tqdm bar when ``enabled``."""
    if not enabled:
        return it
    from tqdm.auto import tqdm

    return tqdm(it, desc=desc, dynamic_ncols=True, leave=False)


@dataclass
class Space:
    """How a row samples: its transformer and the autoencoder that decodes its latents."""

    transformer: nn.Module
    channels: int
    size: int  # latent side
    decode: Callable[[torch.Tensor], torch.Tensor]
    factor: int  # image pixels per latent pixel (per side)

    def at(self, image_size: int) -> Space:
        """The same model sampling ``image_size`` x ``image_size`` images."""
        return replace(self, size=image_size // self.factor)


def model_spaces(assets: A.ToyAssets, models: dict[str, nn.Module]) -> dict[str, Space]:
    """One :class:`Space` per model: "base" samples the f8 VAE's latents, every other name the
    DC-AE's."""
    s = assets.image_size
    vae_c = int(assets.vae.config.latent_channels)
    dcae_c = int(assets.dcae.latent_channels)
    f = assets.dcae.spatial_compression_ratio
    out = {}
    for name, model in models.items():
        if name == "base":
            out[name] = Space(model, vae_c, s // 8, lambda z: A.vae_decode(assets.vae, z), 8)
        else:
            out[name] = Space(
                model,
                dcae_c,
                s // f,
                lambda z: assets.dcae.decode(z, scaled=True).clamp(-1, 1),
                f,
            )
    return out


@torch.no_grad()
def denoise(
    space: Space,
    embeds: torch.Tensor,
    pooled: torch.Tensor,
    seeds: Sequence[int],
    steps: int,
    device: torch.device,
) -> torch.Tensor:
    """Latents (B, C, h, w) after ``steps`` Euler steps; image i starts from noise seeded by
    ``seeds[i]``, so every row of the report starts from the same seeds."""
    adapter = adapter_for(space.transformer)
    shift = resolve_shift("flux", adapter.num_tokens(space.size, space.size), space.channels)
    sigmas = flow_sigmas(steps, shift, device=device)
    noise = torch.stack(
        [
            torch.randn(
                space.channels,
                space.size,
                space.size,
                generator=torch.Generator().manual_seed(int(s)),
            )  # fmt: skip
            for s in seeds
        ]
    ).to(device)
    e, p = embeds.to(device), pooled.to(device)
    guidance = torch.full((len(noise),), DEFAULT_GUIDANCE, device=device)

    def velocity(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        return adapter.predict(x, sigma, e, p, guidance)

    return sample_euler(velocity, noise, sigmas)


@torch.no_grad()
def generate(
    space: Space,
    embeds: torch.Tensor,
    pooled: torch.Tensor,
    seeds: Sequence[int],
    steps: int,
    device: torch.device,
    batch_size: int = 32,
) -> torch.Tensor:
    """Images (B, 3, H, W) in [-1, 1]; image i starts from noise seeded by ``seeds[i]``."""
    out = []
    for start in range(0, len(seeds), batch_size):
        idx = slice(start, start + batch_size)
        z = denoise(space, embeds[idx], pooled[idx], seeds[idx], steps, device)
        out.append(space.decode(z).float().cpu())
    return torch.cat(out)


def _timed(fn: Callable[[], Any], device: torch.device) -> tuple[Any, float]:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return out, time.perf_counter() - t0


def measure_latency(
    space: Space,
    embeds: torch.Tensor,
    pooled: torch.Tensor,
    steps: int,
    repeats: int,
    device: torch.device,
    warmup_steps: int = 1,
) -> dict[str, float]:
    """Median seconds for one image at batch 1 after one warm-up run (of ``warmup_steps``
    Euler steps: it only has to touch every kernel once): ``denoise`` (the transformer's Euler
    steps, where the token count matters), ``decode`` (the autoencoder) and ``total``."""
    parts: dict[str, list[float]] = {"denoise": [], "decode": [], "total": []}
    for r in range(repeats + 1):
        n = steps if r > 0 else warmup_steps
        z, t_denoise = _timed(
            lambda r=r, n=n: denoise(space, embeds[:1], pooled[:1], [r], n, device), device
        )
        _, t_decode = _timed(lambda z=z: space.decode(z), device)
        if r > 0:
            parts["denoise"].append(t_denoise)
            parts["decode"].append(t_decode)
            parts["total"].append(t_denoise + t_decode)
    return {k: statistics.median(v) for k, v in parts.items()}


def measure_latencies(
    spaces: dict[str, Space],
    embeds: torch.Tensor,
    pooled: torch.Tensor,
    steps: int,
    repeats: int,
    device: torch.device,
) -> dict[str, dict[str, float]]:
    """:func:`measure_latency` for several models, interleaved: each repeat times every model
    once, so a slow phase of a shared machine hits all rows alike instead of one."""
    times: dict[str, dict[str, list[float]]] = {
        n: {"denoise": [], "decode": [], "total": []} for n in spaces
    }
    for _ in range(repeats):
        for name, space in spaces.items():
            t = measure_latency(space, embeds, pooled, steps, 1, device)
            for k, v in t.items():
                times[name][k].append(v)
    return {n: {k: statistics.median(v) for k, v in parts.items()} for n, parts in times.items()}


def latency_by_resolution(
    base: Space,
    new: Space,
    sizes: Sequence[int],
    embeds: torch.Tensor,
    pooled: torch.Tensor,
    steps: int,
    repeats: int,
    device: torch.device,
    progress: bool = False,
) -> list[dict[str, Any]]:
    """Batch-1 latency of the base and the DC-AE model at larger images than the toy was trained
    on. The weights do not change the cost, only the token count does: at the training size a
    tiny model is bound by per-step overhead and the fixed text tokens, at higher resolution
    the image tokens dominate and the speed-up grows past the 4x token ratio (attention is
    quadratic), which is the regime DC-Gen is for. The images themselves are not evaluated."""
    text_tokens = int(embeds.shape[1])
    out = []
    for size in progress_bar(list(sizes), "latency by resolution", progress):
        row: dict[str, Any] = {"image_size": int(size)}
        for key, space in (("base", base.at(size)), ("dcgen", new.at(size))):
            tokens = adapter_for(space.transformer).num_tokens(space.size, space.size)
            t = measure_latency(space, embeds, pooled, steps, repeats, device)
            row[key] = {
                "tokens_per_image": tokens,
                "sequence_length": tokens + text_tokens,
                "latency_s": t["total"],
                "denoise_latency_s": t["denoise"],
                "decode_latency_s": t["decode"],
            }
        row["token_ratio"] = row["base"]["tokens_per_image"] / row["dcgen"]["tokens_per_image"]
        row["speedup"] = row["base"]["latency_s"] / row["dcgen"]["latency_s"]
        row["denoise_speedup"] = (
            row["base"]["denoise_latency_s"] / row["dcgen"]["denoise_latency_s"]
        )
        out.append(row)
    return out


def measure_throughput(
    space: Space,
    embeds: torch.Tensor,
    pooled: torch.Tensor,
    steps: int,
    batch: int,
    device: torch.device,
) -> float:
    """Images per second at ``batch`` images per call (denoise + decode), after a warm-up:
    where the token count, not per-call overhead, sets the time."""
    seeds = list(range(batch))
    e, p = embeds[:batch], pooled[:batch]

    def run() -> torch.Tensor:
        return generate(space, e, p, seeds, steps, device, batch_size=batch)

    run()
    _, seconds = _timed(run, device)
    return len(seeds) / seconds
