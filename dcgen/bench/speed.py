"""Latency of base FLUX.1 (f8c16 VAE, 2x2 patches) vs DC-Gen-FLUX (DC-AE, 1x1 patches).

Random weights, random precomputed text embeddings (text encoding is excluded, as in the
paper's table). Per resolution and per pipeline the run times, after a warm-up:

- ``denoise``: N Euler steps through the pipeline's ``__call__`` (``output_type="latent"``),
- ``decode``: the autoencoder decode of those latents (no tiling),

at batch 1 (latency) and, when ``batch > 1``, at batch N (throughput, images/s), plus the peak
GPU memory. Both pipelines share ONE transformer: the latent-facing layers are swapped with
``replace_latent_layers`` between cases (random weights either way), so the 12B blocks are
resident once.

Quick mode builds the transformer with only K double + K single blocks, runs S steps with a
clock around every block, and extrapolates (measured = the S-step run and the block times):

    step_full   = step_measured + (D - K) * t_double + (S_full - K) * t_single
    denoise     = step_full * steps

where step_measured = (S-step time) / S includes everything outside the blocks (embedders,
RoPE, the head, the sampler). The decode is always measured in full.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from diffusers import AutoencoderKL, FluxTransformer2DModel

from ..adapters import adapter_for
from ..autoencoders import DCAE
from ..autoencoders.config import get_preset, reduced_config
from ..pipelines import BaseFluxPipeline, DCGenFluxPipeline

logger = logging.getLogger(__name__)

# -- model specs ----------------------------------------------------------------------------------

#: FLUX.1 VAE (f8c16): four stages, 16 latent channels, published scaling / shift.
FLUX_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=16,
    block_out_channels=(128, 256, 512, 512), layers_per_block=2, norm_num_groups=32,
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False,
)  # fmt: skip


@dataclass(frozen=True)
class ModelSpec:
    """A benchmarkable model family: transformer config, base VAE, DC-AE choice, text length."""

    name: str
    transformer: dict[str, Any]
    vae: dict[str, Any]
    text_tokens: int
    #: DC-AE f32c32 up to this resolution, f64c128 above (the paper: f32 at 1K, f64 at 2K/4K)
    f32_max_resolution: int
    default_resolutions: tuple[int, ...]
    #: DC-AE widths divided by this (1 = the published presets)
    dcae_width_divisor: int = 1
    dcae_max_layers: int | None = None

    @property
    def depth(self) -> tuple[int, int]:
        return int(self.transformer["num_layers"]), int(self.transformer["num_single_layers"])


MODELS: dict[str, ModelSpec] = {
    "flux": ModelSpec(
        name="flux",
        transformer=dict(
            patch_size=1,
            in_channels=64,
            num_layers=19,
            num_single_layers=38,
            attention_head_dim=128,
            num_attention_heads=24,
            joint_attention_dim=4096,
            pooled_projection_dim=768,
            guidance_embeds=True,
            axes_dims_rope=(16, 56, 56),
        ),  # fmt: skip
        vae=FLUX_VAE,
        text_tokens=512,
        f32_max_resolution=1024,
        default_resolutions=(1024, 2048, 4096),
    ),
    # CPU smoke size: every code path, nothing meaningful timed.
    "tiny": ModelSpec(
        name="tiny",
        transformer=dict(
            patch_size=1,
            in_channels=64,
            num_layers=2,
            num_single_layers=2,
            attention_head_dim=16,
            num_attention_heads=2,
            joint_attention_dim=32,
            pooled_projection_dim=32,
            guidance_embeds=True,
            axes_dims_rope=(4, 6, 6),
        ),  # fmt: skip
        vae=dict(FLUX_VAE, block_out_channels=(8, 8, 8, 8), layers_per_block=1, norm_num_groups=4),
        text_tokens=8,
        f32_max_resolution=64,
        default_resolutions=(64, 128, 256),
        dcae_width_divisor=16,
        dcae_max_layers=1,
    ),
}

F32_PRESET = "dc-ae-f32c32-sana-1.1"
F64_PRESET = "dc-ae-f64c128-in-1.0"
BASE_FACTOR = 8  # FLUX VAE
BASE_PATCH = 2


def get_model_spec(name: str) -> ModelSpec:
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; expected one of {sorted(MODELS)}")
    return MODELS[name]


def dcae_preset_for(spec: ModelSpec, resolution: int) -> str:
    """The paper's choice: f32c32 at 1K, f64c128 at 2K and 4K (thresholds scale for 'tiny')."""
    return F32_PRESET if resolution <= spec.f32_max_resolution else F64_PRESET


def dcae_factor(preset: str) -> int:
    return get_preset(preset).spatial_compression_ratio


def token_counts(resolution: int, dcae_factor: int) -> tuple[int, int]:
    """(base tokens, DC-Gen tokens) for a square image: base = 2x2 patches of the f8 latent,
    (H/16)^2; DC-Gen = 1x1 patches of the DC-AE latent, (H/f)^2."""
    base_side = BASE_FACTOR * BASE_PATCH
    return (resolution // base_side) ** 2, (resolution // dcae_factor) ** 2


def check_resolution(spec: ModelSpec, resolution: int) -> None:
    f = dcae_factor(dcae_preset_for(spec, resolution))
    need = math.lcm(BASE_FACTOR * BASE_PATCH, f)
    if not isinstance(resolution, int) or resolution <= 0 or resolution % need:
        raise ValueError(
            f"resolution {resolution!r}: must be a positive multiple of {need} (base FLUX needs "
            f"{BASE_FACTOR * BASE_PATCH}; DC-Gen at this size uses {dcae_preset_for(spec, resolution)}"
            f", factor {f})"
        )


# -- the pure arithmetic of quick mode ------------------------------------------------------------


def extrapolate_denoise(
    step_ms: float,
    double_ms: float,
    single_ms: float,
    measured_blocks: tuple[int, int],
    full_blocks: tuple[int, int],
    steps: int,
) -> float:
    """Full-depth denoise time for ``steps`` steps from a truncated model's step time and its
    per-block times: (step + (D - d) * t_double + (S - s) * t_single) * steps."""
    (d, s), (dd, ss) = measured_blocks, full_blocks
    if d > dd or s > ss:
        raise ValueError(f"measured blocks {measured_blocks} exceed the full depth {full_blocks}")
    return (step_ms + (dd - d) * double_ms + (ss - s) * single_ms) * steps


# -- clocks --------------------------------------------------------------------------------------


class WallClock:
    """perf_counter marks (CPU)."""

    def mark(self) -> float:
        return time.perf_counter()

    def sync(self) -> None:
        pass

    def elapsed_ms(self, start: Any, end: Any) -> float:
        return (end - start) * 1e3


class CudaClock:
    """CUDA events (read after ``sync``): device time without host stalls between marks."""

    def mark(self) -> torch.cuda.Event:
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def sync(self) -> None:
        torch.cuda.synchronize()

    def elapsed_ms(self, start: Any, end: Any) -> float:
        return float(start.elapsed_time(end))


# -- settings ------------------------------------------------------------------------------------

ATTENTION_BACKENDS = ("default", "flash", "efficient", "cudnn", "math")


@dataclass
class BenchSettings:
    model: str = "tiny"
    resolutions: tuple[int, ...] | None = None  # None: the model's defaults
    steps: int = 20
    batch: int = 1
    quick: bool = False
    quick_blocks: int = 1  # K double + K single blocks in quick mode
    quick_steps: int = 2  # S steps timed in quick mode
    repeats: int = 1  # timed runs per case (median)
    warmup: int = 1
    device: str | None = None  # None: cuda when available
    dtype: str | None = None  # None: bf16 on cuda, fp32 on cpu
    attention: str = "default"
    kernels: bool = True
    seed: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def resolved(self) -> BenchSettings:
        spec = get_model_spec(self.model)
        out = BenchSettings(**asdict(self))
        out.resolutions = tuple(self.resolutions or spec.default_resolutions)
        out.device = self.device or ("cuda" if torch.cuda.is_available() else "cpu")
        out.dtype = self.dtype or ("bf16" if out.device.startswith("cuda") else "fp32")
        for name in ("steps", "batch", "quick_blocks", "quick_steps", "repeats"):
            v = getattr(out, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name}: expected a positive int, got {v!r}")
        if out.warmup < 0:
            raise ValueError(f"warmup: expected >= 0, got {out.warmup!r}")
        if out.attention not in ATTENTION_BACKENDS:
            raise ValueError(
                f"attention: expected one of {ATTENTION_BACKENDS}, got {out.attention!r}"
            )
        if out.dtype not in _DTYPES:
            raise ValueError(f"dtype: expected one of {sorted(_DTYPES)}, got {out.dtype!r}")
        for r in out.resolutions:
            check_resolution(spec, r)
        if out.quick:
            d, s = spec.depth
            if out.quick_blocks > min(d, s):
                raise ValueError(
                    f"quick_blocks {out.quick_blocks} exceeds the model depth ({d} double, "
                    f"{s} single)"
                )
        return out


_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


# -- context managers ----------------------------------------------------------------------------


@contextlib.contextmanager
def build_context(device: torch.device, dtype: torch.dtype) -> Iterator[None]:
    """Parameters are created on ``device`` in ``dtype`` directly (no fp32 CPU init + copy)."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            yield
    finally:
        torch.set_default_dtype(old)


@contextlib.contextmanager
def kernels_enabled(enabled: bool) -> Iterator[None]:
    """DCGEN_DISABLE_KERNELS=1 while ``enabled`` is False (dcgen ops fall back to references)."""
    old = os.environ.get("DCGEN_DISABLE_KERNELS")
    if not enabled:
        os.environ["DCGEN_DISABLE_KERNELS"] = "1"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("DCGEN_DISABLE_KERNELS", None)
        else:
            os.environ["DCGEN_DISABLE_KERNELS"] = old


def attention_backend(name: str) -> contextlib.AbstractContextManager:
    """torch SDPA backend selection (diffusers' default attention goes through SDPA)."""
    if name == "default":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = {
        "flash": SDPBackend.FLASH_ATTENTION,
        "efficient": SDPBackend.EFFICIENT_ATTENTION,
        "cudnn": SDPBackend.CUDNN_ATTENTION,
        "math": SDPBackend.MATH,
    }[name]
    return sdpa_kernel(backend)


# -- the harness ---------------------------------------------------------------------------------


class SpeedBench:
    """Models for one settings object; ``case(impl, resolution)`` readies a pipeline."""

    def __init__(self, settings: BenchSettings, clock: Any = None) -> None:
        self.settings = settings.resolved()
        self.spec = get_model_spec(self.settings.model)
        self.device = torch.device(self.settings.device)
        self.dtype = _DTYPES[self.settings.dtype]
        self.on_cuda = self.device.type == "cuda"
        self.clock = clock or (CudaClock() if self.on_cuda else WallClock())
        cfg = dict(self.spec.transformer)
        if self.settings.quick:
            cfg.update(num_layers=self.settings.quick_blocks)
            cfg.update(num_single_layers=self.settings.quick_blocks)
        torch.manual_seed(self.settings.seed)
        with build_context(self.device, self.dtype):
            self.transformer = FluxTransformer2DModel(**cfg).eval().requires_grad_(False)
            self.vae = AutoencoderKL(**self.spec.vae).eval().requires_grad_(False)
        self.adapter = adapter_for(self.transformer)
        self.measured_blocks = (int(cfg["num_layers"]), int(cfg["num_single_layers"]))
        self._dcae: dict[str, DCAE] = {}

    def dcae(self, preset: str) -> DCAE:
        if preset not in self._dcae:
            self._dcae.clear()  # one DC-AE resident at a time
            spec = self.spec
            cfg = (
                get_preset(preset)
                if spec.dcae_width_divisor == 1
                else reduced_config(
                    preset, width_divisor=spec.dcae_width_divisor, max_layers=spec.dcae_max_layers
                )
            )
            with build_context(self.device, self.dtype):
                self._dcae[preset] = DCAE.from_config(cfg).eval().requires_grad_(False)
        return self._dcae[preset]

    def pipeline(self, impl: str, resolution: int) -> Any:
        """The pipeline for ``impl`` ('baseline' = base FLUX, 'dcgen' = DC-Gen-FLUX), with the
        shared transformer's latent layers set for it (random weights)."""
        if impl == "baseline":
            c, p = int(self.spec.vae["latent_channels"]), BASE_PATCH
            if (self.adapter.latent_channels, self.adapter.patch_size) != (c, p):
                self.adapter.replace_latent_layers(c, patch_size=p)
            pipe = BaseFluxPipeline(self.transformer, self.vae)
        elif impl == "dcgen":
            ae = self.dcae(dcae_preset_for(self.spec, resolution))
            c = ae.latent_channels
            if (self.adapter.latent_channels, self.adapter.patch_size) != (c, 1):
                self.adapter.replace_latent_layers(c, patch_size=1)
            pipe = DCGenFluxPipeline(self.transformer, vae=ae)
        else:
            raise ValueError(f"impl: expected 'baseline' or 'dcgen', got {impl!r}")
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def text(self, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        cfg = self.spec.transformer
        g = torch.Generator(device=self.device).manual_seed(self.settings.seed)
        shape = (batch, self.spec.text_tokens, cfg["joint_attention_dim"])
        embeds = torch.randn(shape, generator=g, device=self.device, dtype=self.dtype)
        pooled = torch.randn(
            (batch, cfg["pooled_projection_dim"]), generator=g, device=self.device,
            dtype=self.dtype,
        )  # fmt: skip
        return embeds, pooled

    def runner(self, impl: str, resolution: int, batch: int, steps: int) -> Callable[[], Any]:
        """A zero-argument call running denoise + decode once (for pytest-benchmark)."""
        pipe = self.pipeline(impl, resolution)
        embeds, pooled = self.text(batch)

        def run() -> Any:
            with self._contexts():
                lat = pipe(
                    prompt_embeds=embeds, pooled_prompt_embeds=pooled, height=resolution,
                    width=resolution, num_inference_steps=steps, output_type="latent",
                    generator=torch.Generator(device=self.device).manual_seed(0),
                ).images  # fmt: skip
                return pipe.decode_latents(lat, None, 0)

        return run

    def _contexts(self) -> contextlib.ExitStack:
        stack = contextlib.ExitStack()
        stack.enter_context(torch.inference_mode())
        stack.enter_context(kernels_enabled(self.settings.kernels))
        stack.enter_context(attention_backend(self.settings.attention))
        return stack

    @contextlib.contextmanager
    def _block_marks(self) -> Iterator[dict[str, list[tuple[Any, Any]]]]:
        """Clock marks around every block call: {'double': [(start, end)], 'single': [...]}."""
        marks: dict[str, list[tuple[Any, Any]]] = {"double": [], "single": []}
        handles = []
        t = self.transformer
        for kind, blocks in (
            ("double", t.transformer_blocks), ("single", t.single_transformer_blocks)
        ):  # fmt: skip
            for block in blocks:
                pending: list[Any] = []

                def pre(module: Any, args: Any, pending: list = pending) -> None:
                    pending.append(self.clock.mark())

                def post(
                    module: Any, args: Any, out: Any, pending: list = pending, kind: str = kind
                ) -> None:
                    marks[kind].append((pending.pop(), self.clock.mark()))

                handles.append(block.register_forward_pre_hook(pre))
                handles.append(block.register_forward_hook(post))
        try:
            yield marks
        finally:
            for h in handles:
                h.remove()

    def measure(self, impl: str, resolution: int, batch: int) -> dict[str, Any]:
        """Warm-up, then ``repeats`` timed runs; medians of denoise / decode (and block) times."""
        s = self.settings
        steps = s.quick_steps if s.quick else s.steps
        pipe = self.pipeline(impl, resolution)
        embeds, pooled = self.text(batch)
        clock = self.clock

        def once(n_steps: int, blocks: bool) -> dict[str, float]:
            with self._contexts(), self._block_marks() if blocks else _null_marks() as marks:
                clock.sync()
                t0 = clock.mark()
                lat = pipe(
                    prompt_embeds=embeds, pooled_prompt_embeds=pooled, height=resolution,
                    width=resolution, num_inference_steps=n_steps, output_type="latent",
                    generator=torch.Generator(device=self.device).manual_seed(0),
                ).images  # fmt: skip
                t1 = clock.mark()
                pipe.decode_latents(lat, None, 0)
                t2 = clock.mark()
                clock.sync()
            out = {"denoise_ms": clock.elapsed_ms(t0, t1), "decode_ms": clock.elapsed_ms(t1, t2)}
            for kind, pairs in marks.items():
                if pairs:
                    out[f"{kind}_block_ms"] = statistics.mean(
                        clock.elapsed_ms(a, b) for a, b in pairs
                    )
            return out

        peak: dict[str, float] = {}
        if self.on_cuda:
            clock.sync()
            torch.cuda.reset_peak_memory_stats(self.device)
            before = torch.cuda.memory_allocated(self.device)
        for _ in range(s.warmup):
            once(min(steps, 2), blocks=s.quick)
        runs = [once(steps, blocks=s.quick) for _ in range(s.repeats)]
        if self.on_cuda:
            clock.sync()
            top = torch.cuda.max_memory_allocated(self.device)
            peak = {"peak_memory_gb": top / 1e9, "peak_activation_gb": (top - before) / 1e9}
        res = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
        res.update(peak)
        res["measured_steps"] = steps
        full = self.spec.depth
        if s.quick:
            step_ms = res["denoise_ms"] / steps
            res["measured_step_ms"] = step_ms
            res["denoise_ms"] = extrapolate_denoise(
                step_ms, res["double_block_ms"], res["single_block_ms"], self.measured_blocks,
                full, s.steps,
            )  # fmt: skip
        res["total_ms"] = res["denoise_ms"] + res["decode_ms"]
        res["images_per_s"] = batch / (res["total_ms"] / 1e3) if res["total_ms"] > 0 else None
        return res

    def close(self) -> None:
        self._dcae.clear()
        del self.transformer, self.vae
        if self.on_cuda:
            torch.cuda.empty_cache()


@contextlib.contextmanager
def _null_marks() -> Iterator[dict[str, list]]:
    yield {}


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a and b else None


def run_speed_bench(settings: BenchSettings, clock: Any = None) -> dict[str, Any]:
    """Run every resolution for both pipelines; returns the report dict (see dcgen.bench.report
    for the table, JSON and chart)."""
    bench = SpeedBench(settings, clock=clock)
    s, spec = bench.settings, bench.spec
    rows = []
    try:
        for res in s.resolutions:
            preset = dcae_preset_for(spec, res)
            base_tokens, dc_tokens = token_counts(res, dcae_factor(preset))
            row: dict[str, Any] = {
                "resolution": res, "dcae": preset, "base_tokens": base_tokens,
                "dcgen_tokens": dc_tokens,
                "mode": "extrapolated" if s.quick else "measured",
            }  # fmt: skip
            for impl, key in (("baseline", "base"), ("dcgen", "dcgen")):
                logger.info("bench %s %dpx batch 1", impl, res)
                lat = bench.measure(impl, res, 1)
                row[key] = lat
                if s.batch > 1:
                    logger.info("bench %s %dpx batch %d", impl, res, s.batch)
                    row[f"{key}_batch"] = bench.measure(impl, res, s.batch)
            row["speedup"] = _ratio(row["base"]["total_ms"], row["dcgen"]["total_ms"])
            tput = (row.get("base_batch", row["base"]), row.get("dcgen_batch", row["dcgen"]))
            row["throughput_speedup"] = _ratio(tput[1]["images_per_s"], tput[0]["images_per_s"])
            rows.append(row)
    finally:
        bench.close()
    full_d, full_s = spec.depth
    mdl_d, mdl_s = bench.measured_blocks
    how = (
        f"quick: measured {mdl_d} double + {mdl_s} single blocks over {s.quick_steps} steps and "
        f"the full decode; denoise = (measured step + ({full_d} - {mdl_d}) x double-block time + "
        f"({full_s} - {mdl_s}) x single-block time) x {s.steps} steps"
        if s.quick
        else f"measured: full depth ({full_d} double + {full_s} single), {s.steps} steps, decode"
    )
    return {
        "settings": asdict(s),
        "device": _device_name(bench.device),
        "torch": torch.__version__,
        "method": how,
        "timer": type(bench.clock).__name__,
        "rows": rows,
    }


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({os.cpu_count()} cores visible)"


__all__ = [
    "ATTENTION_BACKENDS",
    "MODELS",
    "BenchSettings",
    "CudaClock",
    "ModelSpec",
    "SpeedBench",
    "WallClock",
    "check_resolution",
    "dcae_factor",
    "dcae_preset_for",
    "extrapolate_denoise",
    "get_model_spec",
    "run_speed_bench",
    "token_counts",
]
