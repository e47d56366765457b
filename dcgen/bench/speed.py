"""Latency of a base model vs its DC-Gen version (FLUX.1 or SANA), the DC-Gen paper's table.

Random weights, random precomputed text embeddings (text encoding is excluded, as in the
paper's table). Guidance as each family samples by default: FLUX.1-dev's guidance embedding,
SANA's classifier-free guidance 4.5 against random negative embeddings (both predictions in one
call of twice the batch, as the pipelines run it); ``cfg`` overrides it. Per resolution, per
attention backend and per variant the run times, after a warm-up:

- ``denoise``: N sampling steps through the pipeline's ``__call__`` (``output_type="latent"``;
  FLUX Euler, SANA DPM-Solver++ as their folders name),
- ``decode``: the autoencoder decode of those latents (no tiling),

at batch 1 (latency) and, when ``batch > 1``, at batch N (throughput, images/s), plus the peak
GPU memory. Both pipelines share ONE transformer: the latent-facing layers are swapped with
``replace_latent_layers`` between cases (random weights either way), so the blocks are
resident once (models.py says which autoencoders each family compares).

Variants: ``stock`` = diffusers' attention processors and every dcgen op on its PyTorch
reference (DCGEN_DISABLE_KERNELS=1); ``kernels`` = ``dcgen.accelerate(blocks=True)`` (fused
attention processors, FLUX blocks with fused glue) and the compiled kernels (DC-AE linear
attention, channel RMSNorm, FP8 quantize); ``graphs`` = ``kernels`` with every transformer
block replayed from a CUDA graph (``dcgen.accelerate(cuda_graphs=True)``: installed once per
measurement, so the capture happens in the warm-up and the timed runs replay).
Attention: each name picks torch's SDPA backend for the transformer (``default`` = torch's
choice; the decode always keeps torch's choice); every row records what its softmax attention
ran on (``attention_used``). The low-precision rows (``fp8=True``, ``nvfp4=("w4a4", ...)``):
DC-Gen with FP8 or NVFP4 linears in the transformer blocks (dcgen.bench.quantized; built after
every bf16 row, on copies, one precision at a time), with the output error vs bf16 on one
batch and the blocks' weight memory beside the time.

Quick mode builds the transformer with only K blocks per block list, runs S steps with a clock
around every block, and extrapolates (measured = the S-step run and the block times):

    step_full   = step_measured + sum over block lists of (full_i - K) * t_block_i
    denoise     = step_full * steps      (block times x calls a step: 2 under unbatched CFG)

where step_measured = (S-step time) / S includes everything outside the blocks (embedders,
RoPE, the head, the sampler). The decode is always measured in full.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import statistics
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from diffusers import (
    AutoencoderKL,
    FluxTransformer2DModel,
    SanaTransformer2DModel,
)
from torch import nn

from ..adapters import adapter_for
from ..autoencoders import DCAE
from ..autoencoders.config import get_preset, reduced_config
from ..pipelines import BaseFluxPipeline, DCGenFluxPipeline, DCGenSanaPipeline
from ..pipelines.base import FlowTextToImagePipeline
from ..pipelines.sana import SANA_CFG_SCALE
from ..quant import FP8Config
from ..quant.pipeline_quant import CallRecorder
from ..train.export import default_scheduler
from .models import (
    MODELS,
    ModelSpec,
    check_resolution,
    dcae_factor,
    dcae_preset_for,
    get_model_spec,
    token_counts,
)
from .quantized import (
    NVFP4_MODES,
    QUANT_PRECISIONS,
    QuantizedBlocks,
    module_bytes,
    module_tensors,
    nvfp4_gemm_path,
    output_quality,
    quant_config,
)
from .report import best_against_best
from .timing import CudaClock, WallClock, extrapolate_denoise, split_step_time
from .variants import (
    SdpaChoices,
    attention_backend,
    attention_label,
    attention_processors,
    build_context,
    graphed_blocks,
    kernels_enabled,
    uses_kernels,
)

logger = logging.getLogger(__name__)

# -- settings ------------------------------------------------------------------------------------

ATTENTION_BACKENDS = ("default", "flash", "efficient", "cudnn", "math")
VARIANTS = ("stock", "kernels", "graphs")
FP8_GRANULARITIES = ("row", "block128")
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _names(field_name: str, value: Any, allowed: tuple[str, ...]) -> tuple[str, ...]:
    """A comma-separated string or a sequence of names -> a checked tuple (no repeats)."""
    items = value.split(",") if isinstance(value, str) else list(value)
    items = [str(v).strip() for v in items]
    if not items or any(v not in allowed for v in items):
        raise ValueError(f"{field_name}: expected names from {allowed}, got {value!r}")
    if len(set(items)) != len(items):
        raise ValueError(f"{field_name}: expected each name once, got {value!r}")
    return tuple(items)


@dataclass
class BenchSettings:
    model: str = "tiny"
    resolutions: tuple[int, ...] | None = None  # None: the model's defaults
    steps: int = 20
    batch: int = 1
    quick: bool = False
    quick_blocks: int = 1  # K blocks per block list in quick mode
    quick_steps: int = 2  # S steps timed in quick mode
    repeats: int = 1  # timed runs per case (median)
    warmup: int = 1
    device: str | None = None  # None: cuda when available
    dtype: str | None = None  # None: bf16 on cuda, fp32 on cpu
    #: SDPA backends, one set of rows each ("default,flash" = best available and the paper's)
    attention: tuple[str, ...] | str = ("default",)
    #: "stock", "kernels" and / or "graphs", one set of rows each
    variants: tuple[str, ...] | str = ("kernels",)
    fp8: bool = False  # add DC-Gen rows with FP8 transformer blocks and their quality
    fp8_granularity: str = "row"
    #: FP8 GEMMs without fp32 promotion of their partial sums (FP8Config.fast_accum; row only)
    fp8_fast_accum: bool = False
    #: NVFP4 modes ("w4a4", "w4a16"), one set of DC-Gen rows each, with their quality
    nvfp4: tuple[str, ...] | str = ()
    nvfp4_rank: int = 0  # the SVDQuant low-rank branch of the NVFP4 linears (0: none)
    seed: int = 0
    #: classifier-free guidance scale (> 1: twice the transformer work a step); None: the family's
    #: default sampling (SANA 4.5 as diffusers' SanaPipeline, FLUX.1-dev 1 = off)
    cfg: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def resolved(self) -> BenchSettings:
        spec = get_model_spec(self.model)
        out = BenchSettings(**asdict(self))
        if self.resolutions is not None and not isinstance(self.resolutions, list | tuple):
            raise ValueError(f"resolutions: expected a sequence of ints, got {self.resolutions!r}")
        out.resolutions = tuple(self.resolutions or spec.default_resolutions)
        out.device = self.device or ("cuda" if torch.cuda.is_available() else "cpu")
        if out.cfg is None:
            out.cfg = SANA_CFG_SCALE if spec.family == "sana" else 1.0
        cfg = out.cfg
        if isinstance(cfg, bool) or not isinstance(cfg, int | float) or not 1 <= cfg < math.inf:
            raise ValueError(f"cfg: expected a finite number >= 1 (1 = off), got {self.cfg!r}")
        out.cfg = float(out.cfg)
        out.dtype = self.dtype or ("bf16" if out.device.startswith("cuda") else "fp32")
        for name in ("steps", "batch", "quick_blocks", "quick_steps", "repeats"):
            v = getattr(out, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name}: expected a positive int, got {v!r}")
        if not isinstance(out.warmup, int) or out.warmup < 0:
            raise ValueError(f"warmup: expected an int >= 0, got {out.warmup!r}")
        out.attention = _names("attention", self.attention, ATTENTION_BACKENDS)
        out.variants = _names("variants", self.variants, VARIANTS)
        if out.fp8_granularity not in FP8_GRANULARITIES:
            raise ValueError(
                f"fp8_granularity: expected one of {FP8_GRANULARITIES}, got {out.fp8_granularity!r}"
            )
        if not isinstance(out.fp8_fast_accum, bool):
            raise ValueError(f"fp8_fast_accum: expected a bool, got {out.fp8_fast_accum!r}")
        if out.fp8_fast_accum and out.fp8_granularity != "row":
            raise ValueError(
                f"fp8_fast_accum: expected fp8_granularity 'row', got {out.fp8_granularity!r}"
            )
        out.nvfp4 = _names("nvfp4", self.nvfp4, NVFP4_MODES) if self.nvfp4 else ()
        if (
            not isinstance(out.nvfp4_rank, int)
            or isinstance(out.nvfp4_rank, bool)
            or (out.nvfp4_rank < 0)
        ):
            raise ValueError(f"nvfp4_rank: expected an int >= 0, got {out.nvfp4_rank!r}")
        if out.dtype not in _DTYPES:
            raise ValueError(f"dtype: expected one of {sorted(_DTYPES)}, got {out.dtype!r}")
        for r in out.resolutions:
            check_resolution(spec, r)
        if len(set(out.resolutions)) != len(out.resolutions):
            raise ValueError(f"resolutions: expected each size once, got {out.resolutions}")
        if out.quick and out.quick_blocks > min(spec.depth):
            raise ValueError(
                f"quick_blocks {out.quick_blocks} exceeds the model depth "
                f"({dict(zip(spec.block_kinds, spec.depth, strict=True))})"
            )
        return out

    @property
    def quant_precisions(self) -> tuple[str, ...]:
        """The low-precision labels asked for, in row order (dcgen.bench.quantized)."""
        modes = _names("nvfp4", self.nvfp4, NVFP4_MODES) if self.nvfp4 else ()
        return ("fp8",) * bool(self.fp8) + tuple(f"nvfp4-{m}" for m in modes)

    @property
    def quant_variants(self) -> tuple[str, ...]:
        """The variants the low-precision rows run with: every measured one that runs dcgen's
        kernels (kernels, graphs), else the one variant measured (stock)."""
        variants = _names("variants", self.variants, VARIANTS)
        return tuple(v for v in variants if uses_kernels(v)) or variants[:1]


# -- context managers ----------------------------------------------------------------------------


# -- the harness ---------------------------------------------------------------------------------


class SpeedBench:
    """Models for one settings object; ``pipeline(impl, resolution)`` readies a pipeline."""

    def __init__(self, settings: BenchSettings, clock: Any = None) -> None:
        self.settings = settings.resolved()
        self.spec: ModelSpec = get_model_spec(self.settings.model)
        self.device = torch.device(self.settings.device)
        self.dtype = _DTYPES[self.settings.dtype]
        self.on_cuda = self.device.type == "cuda"
        self.clock = clock or (CudaClock(self.device) if self.on_cuda else WallClock())
        cfg = dict(self.spec.transformer)
        if self.settings.quick:
            for _, _, key in self.spec.blocks:
                cfg[key] = self.settings.quick_blocks
        self._dcae: dict[str, DCAE] = {}
        self.quant: QuantizedBlocks | None = None  # one low-precision set at a time
        torch.manual_seed(self.settings.seed)
        with build_context(self.device, self.dtype):
            if self.spec.family == "flux":
                self.transformer = FluxTransformer2DModel(**cfg)
                self.vae: Any = AutoencoderKL(**self.spec.vae).eval().requires_grad_(False)
            else:
                self.transformer = SanaTransformer2DModel(**cfg)
                self.vae = self.dcae(self.spec.base_dcae)
        self.transformer.eval().requires_grad_(False)
        self.adapter = adapter_for(self.transformer)
        self.measured_blocks = tuple(int(cfg[key]) for _, _, key in self.spec.blocks)
        # the model-dtype blocks' weight GB at full depth (the bf16 rows' "block weights")
        self.block_weights_gb = self.full_depth_gb(
            {attr: module_bytes(getattr(self.transformer, attr)) for _, attr, _ in self.spec.blocks}
        )

    def dcae(self, preset: str) -> DCAE:
        """The DC-AE of ``preset`` (random weights); at most two resident (base + DC-Gen)."""
        if preset not in self._dcae:
            if len(self._dcae) >= 2:
                self._dcae.pop(next(p for p in self._dcae if p != self.spec.base_dcae))
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

    def transformer_for(self, precision: str) -> nn.Module:
        """The model-dtype transformer (``"bf16"``), or a view of it on the quantized blocks
        of a low-precision label (built first by :meth:`build_quant`)."""
        if precision == "bf16":
            return self.transformer
        if precision in QUANT_PRECISIONS:
            if self.quant is None or self.quant.precision != precision:
                raise ValueError(f"precision {precision!r}: call build_quant({precision!r}) first")
            return self.quant.view(self.transformer)
        raise ValueError(
            f"precision: expected 'bf16' or one of {QUANT_PRECISIONS}, got {precision!r}"
        )

    def build_quant(self, precision: str) -> QuantizedBlocks:
        """Quantized copies of every block list for ``precision`` (the bf16 blocks stay as they
        are). One set is resident at a time: another precision's set is dropped first."""
        if self.quant is not None and self.quant.precision != precision:
            self.drop_quant()
        if self.quant is None:
            from .. import unaccelerate

            s = self.settings
            config = quant_config(precision, s.fp8_granularity, s.nvfp4_rank, s.fp8_fast_accum)
            unaccelerate(self.transformer)  # copy stock blocks
            attrs = [attr for _, attr, _ in self.spec.blocks]
            with torch.inference_mode(False), torch.no_grad():
                self.quant = QuantizedBlocks(self.transformer, attrs, precision, config)
        return self.quant

    def _unused_bytes(self, pipe: Any) -> int:
        """Bytes of the resident weights (transformer, autoencoders, quantized block copies)
        that ``pipe`` does not use; tensors shared with it are not counted."""
        used = {id(t) for m in (pipe.transformer, pipe.vae) for t in module_tensors(m)}
        resident = [self.transformer, self.vae, *self._dcae.values()]
        if self.quant is not None:
            resident.extend(self.quant.lists.values())
        seen: dict[int, int] = {}
        for module in resident:
            for t in module_tensors(module):
                if id(t) not in used and t.device.type == self.device.type:
                    seen[id(t)] = t.numel() * t.element_size()
        return sum(seen.values())

    def drop_quant(self) -> None:
        self.quant = None
        if self.on_cuda:
            torch.cuda.empty_cache()

    def full_depth_gb(self, bytes_per_list: dict[str, int]) -> float:
        """Weight GB of every block list at the model's full depth (a quick-mode model holds
        ``measured_blocks`` per list; blocks of one list are the same size)."""
        total = 0.0
        for (_, attr, _), measured, full in zip(
            self.spec.blocks, self.measured_blocks, self.spec.depth, strict=True
        ):
            total += bytes_per_list[attr] / measured * full
        return total / 1e9

    def _set_latent_layers(self, channels: int, patch: int) -> None:
        if (self.adapter.latent_channels, self.adapter.patch_size) != (channels, patch):
            self.adapter.replace_latent_layers(channels, patch_size=patch)

    def pipeline(self, impl: str, resolution: int, precision: str = "bf16") -> Any:
        """The pipeline for ``impl`` ('baseline' = the base model on its own autoencoder,
        'dcgen' = DC-Gen on the DC-AE for ``resolution``), with the shared transformer's latent
        layers set for it (random weights)."""
        spec = self.spec
        if impl == "baseline":
            self._set_latent_layers(spec.base_latent_channels, spec.base_patch)
            ae = self.vae
        elif impl == "dcgen":
            ae = self.dcae(dcae_preset_for(spec, resolution))
            self._set_latent_layers(ae.latent_channels, 1)
        else:
            raise ValueError(f"impl: expected 'baseline' or 'dcgen', got {impl!r}")
        transformer = self.transformer_for(precision)
        if spec.family == "sana":
            # the scheduler SANA folders ship (DPM-Solver++ at flow shift 3.0, as at 1K; a
            # constant shift costs the same at any value)
            pipe = DCGenSanaPipeline(transformer, vae=ae, scheduler=default_scheduler("sana"))
        elif impl == "baseline":
            pipe = BaseFluxPipeline(transformer, ae)
        else:
            pipe = DCGenFluxPipeline(transformer, vae=ae)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    @property
    def guided(self) -> bool:
        """Whether the rows sample with classifier-free guidance (a negative prompt too)."""
        return self.settings.cfg > 1.0

    @property
    def calls_per_step(self) -> int:
        """Transformer calls per denoising step: 1, or 2 under classifier-free guidance when
        the pipelines run its two predictions as separate calls (``cfg_in_one_batch`` off;
        on, the default, one call of twice the batch)."""
        return 2 if self.guided and not FlowTextToImagePipeline.cfg_in_one_batch else 1

    def text(self, batch: int, attention: str = "default") -> dict[str, torch.Tensor]:
        """Random precomputed text inputs for the pipeline call (FLUX: T5 + pooled CLIP;
        SANA: Gemma-2 hidden states and an all-ones attention mask, left out for the ``flash``
        SDPA backend, which takes no mask: every token is kept either way), and under CFG the
        same again as the negative prompt."""
        g = torch.Generator(device=self.device).manual_seed(self.settings.seed)
        shape = (batch, self.spec.text_tokens, self.spec.text_dim)
        kw = dict(generator=g, device=self.device, dtype=self.dtype)
        out: dict[str, torch.Tensor] = {}
        for prefix in ("", "negative_")[: 1 + self.guided]:
            out[f"{prefix}prompt_embeds"] = torch.randn(shape, **kw)
            if self.spec.family == "flux":
                pooled = (batch, self.spec.transformer["pooled_projection_dim"])
                out[f"{prefix}pooled_prompt_embeds"] = torch.randn(pooled, **kw)
            elif attention != "flash":
                out[f"{prefix}prompt_attention_mask"] = torch.ones(shape[:2], device=self.device)
        return out

    def _call(self, pipe: Any, text: dict[str, torch.Tensor], resolution: int, steps: int) -> Any:
        return pipe(
            **text, height=resolution, width=resolution, num_inference_steps=steps,
            output_type="latent", max_sequence_length=self.spec.text_tokens,
            true_cfg_scale=self.settings.cfg,
            generator=torch.Generator(device=self.device).manual_seed(0),
        ).images  # fmt: skip

    @contextlib.contextmanager
    def _contexts(self, transformer: nn.Module, variant: str, attention: str) -> Iterator[None]:
        with contextlib.ExitStack() as stack:
            stack.enter_context(torch.inference_mode())
            stack.enter_context(kernels_enabled(uses_kernels(variant)))
            if variant == "graphs":
                # idempotent: graphs captured by earlier calls stay (graphed_blocks scopes them;
                # a runner keeps them), and come back if anything uninstalled them in between
                from .. import accelerate

                accelerate(transformer, blocks=True, cuda_graphs=True)
            else:
                stack.enter_context(attention_processors(transformer, uses_kernels(variant)))
            yield

    def runner(
        self, impl: str, resolution: int, batch: int, steps: int, variant: str = "kernels",
        attention: str = "default",
    ) -> Callable[[], Any]:  # fmt: skip
        """A zero-argument call running denoise + decode once (for pytest-benchmark). The
        ``graphs`` variant leaves its graphed blocks installed after each call (the captures
        must outlive the timed calls); ``dcgen.unaccelerate`` or any other variant's call
        removes them."""
        pipe = self.pipeline(impl, resolution)
        text = self.text(batch, attention)

        def run() -> Any:
            with self._contexts(pipe.transformer, variant, attention):
                with attention_backend(attention):  # the transformer's attention only
                    lat = self._call(pipe, text, resolution, steps)
                return pipe.decode_latents(lat, None, 0)

        return run

    @contextlib.contextmanager
    def _block_marks(self, transformer: nn.Module) -> Iterator[dict[str, list[tuple[Any, Any]]]]:
        """Clock marks around every block call: {kind: [(start, end), ...]} per block list."""
        marks: dict[str, list[tuple[Any, Any]]] = {kind: [] for kind in self.spec.block_kinds}
        handles = []
        for kind, attr, _ in self.spec.blocks:
            for block in getattr(transformer, attr):
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

    def measure(
        self, impl: str, resolution: int, batch: int, variant: str = "kernels",
        attention: str = "default", precision: str = "bf16",
    ) -> dict[str, Any]:  # fmt: skip
        """Warm-up, then ``repeats`` timed runs; medians of denoise / decode (and block) times."""
        s = self.settings
        steps = s.quick_steps if s.quick else s.steps
        pipe = self.pipeline(impl, resolution, precision)
        transformer = pipe.transformer
        text = self.text(batch, attention)
        clock = self.clock
        used: list[str] = []
        sdpa = SdpaChoices()
        # spied on the first warm-up call only (a function mode slows every op it sees); no
        # warm-up, no record
        spy_pending = [s.warmup > 0 or variant == "graphs"]

        def once(n_steps: int, blocks: bool) -> dict[str, float]:
            marks_cm = self._block_marks(transformer) if blocks else _null_marks()
            calls: list[Any] = []  # a mark as each transformer call begins (quick mode)
            hooks = contextlib.ExitStack()
            if blocks:
                hook = transformer.register_forward_pre_hook(lambda *_: calls.append(clock.mark()))
                hooks.callback(hook.remove)
            with hooks, self._contexts(transformer, variant, attention), marks_cm as marks:
                if not used:
                    fused = uses_kernels(variant)
                    used.append(
                        attention_label(transformer, attention, fused, self.device, self.dtype)
                    )
                # the first call also records the SDPA backends the attention resolves to
                spy = sdpa if spy_pending[0] else contextlib.nullcontext()
                spy_pending[0] = False
                clock.sync()
                t0 = clock.mark()
                with attention_backend(attention), spy:  # the transformer's attention only
                    lat = self._call(pipe, text, resolution, n_steps)
                t1 = clock.mark()
                pipe.decode_latents(lat, None, 0)
                t2 = clock.mark()
                clock.sync()
            out = {"denoise_ms": clock.elapsed_ms(t0, t1), "decode_ms": clock.elapsed_ms(t1, t2)}
            split = split_step_time(
                out["denoise_ms"], [clock.elapsed_ms(t0, c) for c in calls], n_steps
            )
            if split is not None:
                out["step_ms"], out["fixed_ms"] = split
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
        with graphed_blocks(transformer, variant):
            # graphs: at least one warm-up, so that the captures stay out of the timed runs
            for _ in range(max(s.warmup, int(variant == "graphs"))):
                once(min(steps, 2), blocks=s.quick)
            runs = [once(steps, blocks=s.quick) for _ in range(s.repeats)]
        if self.on_cuda:
            clock.sync()
            top = torch.cuda.max_memory_allocated(self.device)
            # the row's own peak: less the resident weights its pipeline never touches (the
            # other resolutions' autoencoders, the bf16 blocks under a quantized row), which
            # otherwise made a row's number depend on the rows before it
            rows_own = top - self._unused_bytes(pipe)
            peak = {"peak_memory_gb": rows_own / 1e9, "peak_activation_gb": (top - before) / 1e9}
        res: dict[str, Any] = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
        res.update(peak)
        res["attention_used"] = used[0]
        res["sdpa_chosen"] = sorted(sdpa.seen)  # [] without SDPA calls or without a warm-up
        res["measured_steps"] = steps
        if s.quick:
            # the step from one transformer call to the next, and the call's fixed cost counted
            # once (else, with one measured step, the call's time spread over its steps)
            step_ms = res.pop("step_ms", res["denoise_ms"] / steps)
            fixed_ms = res.pop("fixed_ms", 0.0)
            res["measured_step_ms"], res["fixed_ms"] = step_ms, fixed_ms
            res["denoise_ms"] = extrapolate_denoise(
                step_ms, [res[f"{k}_block_ms"] for k in self.spec.block_kinds],
                self.measured_blocks, self.spec.depth, s.steps, fixed_ms, self.calls_per_step,
            )  # fmt: skip
        res["total_ms"] = res["denoise_ms"] + res["decode_ms"]
        res["images_per_s"] = batch / (res["total_ms"] / 1e3) if res["total_ms"] > 0 else None
        return res

    def quant_quality(
        self, precision: str, resolution: int, variant: str, attention: str
    ) -> dict[str, Any]:
        """Output error of the ``precision`` transformer vs the bf16 one on one DC-Gen batch at
        ``resolution`` (the transformer inputs of the first denoising step, batch 1)."""
        pipe = self.pipeline("dcgen", resolution, "bf16")
        capture = CallRecorder(self.transformer, limit=1)
        try:
            with self._contexts(self.transformer, variant, attention):
                self._call(pipe, self.text(1, attention), resolution, 1)
        finally:
            capture.remove()
        view = self.transformer_for(precision)
        with (
            self._contexts(self.transformer, variant, attention),
            attention_processors(view, uses_kernels(variant)),
        ):
            inputs = capture.calls[0].kwargs if capture.calls else {}
            return output_quality(self.transformer, view, inputs)

    def close(self) -> None:
        self._dcae.clear()
        self.quant = None
        del self.transformer, self.vae
        if self.on_cuda:
            torch.cuda.empty_cache()


@contextlib.contextmanager
def _null_marks() -> Iterator[dict[str, list]]:
    yield {}


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a and b else None


def _speedups(row: dict[str, Any]) -> None:
    row["speedup"] = _ratio(row["base"]["total_ms"], row["dcgen"]["total_ms"])
    tput = (row.get("base_batch", row["base"]), row.get("dcgen_batch", row["dcgen"]))
    row["throughput_speedup"] = _ratio(tput[1]["images_per_s"], tput[0]["images_per_s"])


def _is_oom(err: BaseException) -> bool:
    return isinstance(err, torch.cuda.OutOfMemoryError) or "out of memory" in str(err)


def _row_failed(
    errors: list[dict[str, Any]], bench: SpeedBench, err: Exception, **where: Any
) -> None:
    """Record a row that raised (the table keeps the others), with its first error line; the
    traceback goes to the log. Frees cached device memory after an out-of-memory error."""
    logger.exception("bench row failed: %s", where)
    lines = str(err).strip().splitlines()
    message = f"{type(err).__name__}: {lines[0] if lines else ''}"
    errors.append({**where, "error": message[:300]})
    if bench.on_cuda and _is_oom(err):
        torch.cuda.empty_cache()


def run_speed_bench(
    settings: BenchSettings,
    clock: Any = None,
    on_row: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Run every (resolution, attention, variant) for both pipelines, then the FP8 rows when
    asked; returns the report dict (see dcgen.bench.report for the table, JSON and chart).

    A row that raises is recorded in the report's ``errors`` (the traceback logged) and the
    others still run: one failing configuration does not lose the table. ``on_row`` gets the
    partial report after every row (the CLI writes it, so a run cut off by a time limit keeps
    the rows it finished)."""
    bench = SpeedBench(settings, clock=clock)
    s, spec = bench.settings, bench.spec
    rows: list[dict[str, Any]] = []
    errors: list[dict[str, Any]] = []

    def report() -> dict[str, Any]:
        return _report(bench, rows, errors)

    try:
        for res in s.resolutions:
            preset = dcae_preset_for(spec, res)
            base_tokens, dc_tokens = token_counts(res, dcae_factor(preset), spec.base_side)
            common = {
                "resolution": res, "dcae": preset, "base_ae": spec.base_label,
                "base_tokens": base_tokens, "dcgen_tokens": dc_tokens,
                "mode": "extrapolated" if s.quick else "measured",
            }  # fmt: skip
            for attention in s.attention:
                for variant in s.variants:
                    row: dict[str, Any] = {
                        **common, "attention": attention, "variant": variant,
                        "precision": s.dtype, "quality": None,
                        "block_weights_gb": bench.block_weights_gb,
                    }  # fmt: skip
                    try:
                        for impl, key in (("baseline", "base"), ("dcgen", "dcgen")):
                            logger.info("bench %s %dpx %s %s", impl, res, variant, attention)
                            row[key] = bench.measure(impl, res, 1, variant, attention)
                            if s.batch > 1:
                                row[f"{key}_batch"] = bench.measure(
                                    impl, res, s.batch, variant, attention
                                )
                    except Exception as err:  # noqa: BLE001 (recorded, the table goes on)
                        _row_failed(errors, bench, err, resolution=res, attention=attention,
                                    variant=variant, precision=s.dtype)  # fmt: skip
                    else:
                        _speedups(row)
                        rows.append(row)
                    if on_row is not None:
                        on_row(report())
        for precision in s.quant_precisions:
            rows += _quant_rows(bench, precision, rows, errors, on_row)
            bench.drop_quant()
    finally:
        bench.close()
    return report()


def _report(
    bench: SpeedBench, rows: list[dict[str, Any]], errors: list[dict[str, Any]]
) -> dict[str, Any]:
    s, spec = bench.settings, bench.spec
    order = {
        (r, a): i for i, (r, a) in enumerate((r, a) for r in s.resolutions for a in s.attention)
    }
    rank = {p: i for i, p in enumerate((s.dtype, *s.quant_precisions))}
    ordered = sorted(
        rows, key=lambda r: (order[(r["resolution"], r["attention"])], rank[r["precision"]])
    )
    return {
        "settings": asdict(s),
        "model": {"name": spec.name, "family": spec.family, "base_ae": spec.base_label},
        "device": _device_name(bench.device),
        "torch": torch.__version__,
        "method": _method(s, spec, bench.measured_blocks),
        "timer": type(bench.clock).__name__,
        # How the rows ran CFG's two predictions (a class switch of the pipelines).
        "cfg_in_one_batch": FlowTextToImagePipeline.cfg_in_one_batch,
        "rows": ordered,
        "errors": list(errors),
        "summary": best_against_best(ordered),
    }


def _quant_rows(
    bench: SpeedBench,
    precision: str,
    earlier: list[dict[str, Any]],
    errors: list[dict[str, Any]],
    on_row: Callable[[dict[str, Any]], None] | None,
) -> list[dict[str, Any]]:
    """DC-Gen with ``precision`` blocks, per resolution, attention and variant
    (settings.quant_variants), beside the bf16 base of the same (resolution, attention,
    variant) row (the base is not re-measured). The quality check runs once per (resolution,
    attention): variants run the same arithmetic. Failures are recorded per row, as for the
    bf16 rows. ``earlier``: every row so far (the model-dtype rows are the references)."""
    s = bench.settings
    variants = s.quant_variants
    qualities: dict[tuple[int, str], dict[str, Any]] = {}
    try:
        quant = bench.build_quant(precision)
    except Exception as err:  # noqa: BLE001 (recorded: the bf16 table stands)
        _row_failed(errors, bench, err, precision=precision, stage="quantize the blocks")
        return []
    weights_gb = bench.full_depth_gb(quant.bytes_per_list)
    out: list[dict[str, Any]] = []
    for ref in earlier:
        if ref["precision"] != s.dtype or ref["variant"] not in variants:
            continue
        res, attention, variant = ref["resolution"], ref["attention"], ref["variant"]
        row = {k: v for k, v in ref.items() if k not in ("dcgen", "dcgen_batch")}
        row.update(
            precision=precision, base_precision=ref["precision"], base_from_row=True,
            block_weights_gb=weights_gb,
        )  # fmt: skip
        logger.info("bench dcgen %s %dpx %s %s", precision, res, variant, attention)
        try:
            row["dcgen"] = bench.measure("dcgen", res, 1, variant, attention, precision=precision)
            if s.batch > 1:
                row["dcgen_batch"] = bench.measure(
                    "dcgen", res, s.batch, variant, attention, precision=precision
                )
        except Exception as err:  # noqa: BLE001
            _row_failed(errors, bench, err, resolution=res, attention=attention,
                        variant=variant, precision=precision)  # fmt: skip
            continue
        _speedups(row)
        if (res, attention) not in qualities:
            qualities[res, attention] = _quant_quality(bench, precision, res, variant, attention)
        row["quality"] = dict(qualities[res, attention])
        out.append(row)
        if on_row is not None:
            on_row(_report(bench, earlier + out, errors))
    return out


def _quant_quality(
    bench: SpeedBench, precision: str, res: int, variant: str, attention: str
) -> dict[str, Any]:
    """The quality report of one (precision, resolution, attention), or why it failed (the
    timing stands either way), with what the quantization was. Graphs replay the same kernels:
    their check runs the kernels variant."""
    quant = bench.quant
    assert quant is not None and quant.precision == precision
    try:
        quality = bench.quant_quality(
            precision, res, "kernels" if variant == "graphs" else variant, attention
        )
    except Exception as err:  # noqa: BLE001
        logger.exception("%s quality report failed at %dpx", precision, res)
        if bench.on_cuda and _is_oom(err):
            torch.cuda.empty_cache()  # quality_report keeps every layer's in/out
        why = "out of memory" if _is_oom(err) else f"{type(err).__name__}: {err}"[:200]
        quality = {"error": f"{why} during quality_report at {res}px"}
    quality["linears"] = quant.linears
    config = quant.config
    if isinstance(config, FP8Config):
        quality["granularity"] = config.granularity
        quality["fast_accum"] = config.fast_accum
    else:
        width = int(bench.spec.transformer.get("num_attention_heads", 1)) * int(
            bench.spec.transformer.get("attention_head_dim", 1)
        )
        quality.update(rank=config.rank,
                       gemm=nvfp4_gemm_path(config.mode, bench.device, k=width, n=width))  # fmt: skip
    return quality


def _method(s: BenchSettings, spec: ModelSpec, measured: tuple[int, ...]) -> str:
    lists = " + ".join(f"{n} {k}" for n, k in zip(measured, spec.block_kinds, strict=True))
    full = " + ".join(f"{n} {k}" for n, k in zip(spec.depth, spec.block_kinds, strict=True))
    if s.quick:
        extra = " + ".join(
            f"({f} - {m}) x {k}-block time"
            for f, m, k in zip(spec.depth, measured, spec.block_kinds, strict=True)
        )
        if s.quick_steps > 1:
            step = (
                f"the call's fixed time + (measured step + {extra}) x {s.steps} steps (a step "
                f"timed from one transformer call to the next, the fixed time = the call less "
                f"its steps)"
            )
        else:  # one step: no call-to-call interval, so the fixed time rides on every step
            step = (
                f"(measured one-step call + {extra}) x {s.steps} steps (one measured step: the "
                f"call's fixed time is counted in every step, an overestimate)"
            )
        how = (
            f"quick: measured {lists} blocks over {s.quick_steps} steps and the full decode; "
            f"denoise = {step}"
        )
    else:
        how = f"measured: full depth ({full} blocks), {s.steps} steps, decode"
    kinds = []
    if s.fp8:
        fast = ", fast accumulation" if s.fp8_fast_accum else ""
        kinds.append(f"FP8 ({s.fp8_granularity} scales{fast}, W8A8)")
    for mode in s.quant_precisions:
        if mode.startswith("nvfp4-"):
            rank = f", rank-{s.nvfp4_rank} 16-bit branch" if s.nvfp4_rank else ""
            kinds.append(f"NVFP4 {mode.removeprefix('nvfp4-').upper()}{rank}")
    if kinds:
        how += (
            f"; low-precision rows: {', '.join(kinds)} linears in the transformer blocks of "
            f"DC-Gen, quality = dcgen.quant.quality_report of the transformer output vs bf16 on "
            f"one batch (first step's inputs, batch 1"
            + (f", the {lists}-block model" if s.quick else "")
            + "), block weights at full depth"
        )
    return how


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({os.cpu_count()} cores visible)"


__all__ = [
    "ATTENTION_BACKENDS",
    "FP8_GRANULARITIES",
    "NVFP4_MODES",
    "MODELS",
    "VARIANTS",
    "BenchSettings",
    "CudaClock",
    "ModelSpec",
    "SpeedBench",
    "WallClock",
    "attention_label",
    "check_resolution",
    "dcae_factor",
    "dcae_preset_for",
    "extrapolate_denoise",
    "get_model_spec",
    "run_speed_bench",
    "token_counts",
]
