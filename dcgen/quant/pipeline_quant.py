"""Quantizing a pipeline's transformer from its own sampling (what ``dcgen quantize`` runs).

A DiT's activations depend on the timestep and the resolution, so calibration inputs come from
the pipeline itself: a few denoising steps on the user's prompt embeddings, every transformer
call recorded (:func:`capture_transformer_inputs`). Those calls drive SVDQuant's smoothing
statistics (NVFP4 with ``smoothing_alpha``, measured on the 16-bit model) and the quality
report on the middle call (a mid-trajectory noise level).

Memory: the report never holds a second copy of the transformer. The blocks are quantized one
at a time in place, each compared with a 16-bit copy of itself (the only copy alive) on the
inputs it received in the 16-bit model's run of that call: per layer (isolated, and within the
block) and per block (its image hidden states). The end-to-end error compares the whole
model's output before and after. So a FLUX-size model (24 GB in bf16) needs one block copy
(about 0.4 GB) and each block's inputs of one call (4,608 tokens at 1024 px for base FLUX:
about 30 MB a block) beyond what sampling needs, not a second model. The checkpoint is :func:`dcgen.quant.save_quantized`'s
safetensors file, which ``dcgen generate --quantized`` (:func:`dcgen.quant.load_quantized`)
mounts on a freshly loaded pipeline.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from dcgen._compiled import sees_through_compile
from dcgen.adapters import adapter_for

from .api import (
    FP8Config,
    NVFP4Config,
    QuantConfig,
    _activation_amax,
    _errors,
    _first_tensor,
    _targets,
    quality_report,
    quantize_,
    quantized_modules,
)

logger = logging.getLogger(__name__)


@dataclass
class RecordedCall:
    """One forward call's arguments (detached copies), replayable on the same module or a
    copy of it."""

    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = field(default_factory=dict)

    def run(self, model: nn.Module) -> Any:
        return model(*self.args, **self.kwargs)


def _detached(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, dict):
        return {k: _detached(v) for k, v in value.items()}
    if isinstance(value, tuple | list):  # FLUX's rotary (cos, sin) pair
        return type(value)(_detached(v) for v in value)
    return value


class CallRecorder:
    """Records the forward calls of ``module`` while installed (a forward pre-hook); ``limit``
    keeps only the first ones."""

    def __init__(self, module: nn.Module, limit: int | None = None) -> None:
        self.calls: list[RecordedCall] = []
        self.limit = limit
        self._handle = module.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if self.limit is None or len(self.calls) < self.limit:
            self.calls.append(RecordedCall(_detached(args), _detached(kwargs)))

    def remove(self) -> None:
        self._handle.remove()


@torch.no_grad()
def capture_transformer_inputs(
    pipe: Any, steps: int, height: int, width: int, seed: int = 0, **prompt_kwargs: Any
) -> list[RecordedCall]:
    """Every transformer call of ``steps`` denoising steps of ``pipe`` (a DCGenFluxPipeline or
    DCGenSanaPipeline) at ``height`` x ``width`` on the given prompt embeddings; no decode."""
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"calibration steps: expected a positive integer, got {steps!r}")
    if "negative_prompt_embeds" not in prompt_kwargs:
        # no negative to guide against: calibrate unguided (SANA's default CFG would warn)
        prompt_kwargs.setdefault("true_cfg_scale", 1.0)
    recorder = CallRecorder(pipe.transformer)
    try:
        pipe(
            height=height,
            width=width,
            num_inference_steps=steps,
            generator=torch.Generator(device="cpu").manual_seed(seed),
            output_type="latent",
            **prompt_kwargs,
        )
    finally:
        recorder.remove()
    if not recorder.calls:
        raise RuntimeError("capture_transformer_inputs: the pipeline never called its transformer")
    return recorder.calls


def _replay(calls: list[RecordedCall]) -> Callable[[nn.Module], None]:
    """A ``quantize_`` calibration callable that runs every recorded call through the model."""

    def run(model: nn.Module) -> None:
        for call in calls:
            call.run(model)

    return run


def needs_calibration(config: QuantConfig) -> bool:
    """Whether ``quantize_`` needs calibration inputs for ``config`` (NVFP4 smoothing)."""
    return isinstance(config, NVFP4Config) and config.smoothing_alpha is not None


@torch.no_grad()
@sees_through_compile
def quantize_transformer(
    transformer: nn.Module,
    config: QuantConfig,
    calls: list[RecordedCall] | None = None,
    report: bool = True,
) -> tuple[list[str], dict[str, Any] | None]:
    """Quantize ``transformer`` in place with ``config``; returns the quantized layer names and,
    with ``report``, the quality report (module doc): ``{"layers": {name: {"rel_err",
    "cosine", "rel_err_in_model", "cosine_in_model"}}, "blocks": {name: {"rel_err",
    "cosine"}}, "output": {"rel_err", "cosine"}, "unreached": [names]}``, where a layer's
    "in model" error is the one accumulated within its block."""
    if not isinstance(config, NVFP4Config | FP8Config):
        raise TypeError(
            f"quantize_transformer: expected an NVFP4Config or FP8Config, got "
            f"{type(config).__name__}"
        )
    if (report or needs_calibration(config)) and not calls:
        what = "NVFP4 smoothing" if needs_calibration(config) else "the quality report"
        raise ValueError(f"quantize_transformer: {what} needs recorded transformer calls, got none")
    targets = _targets(transformer, config)
    if not targets:
        raise ValueError(
            "quantize_transformer: no linear matched the config's include / exclude patterns"
        )
    amax = None
    if needs_calibration(config):  # on the 16-bit model, before any layer changes
        assert calls is not None
        amax = _activation_amax(transformer, targets, _replay(calls))
    if not report:
        quantize_(transformer, config, activation_amax=amax)
        return sorted(quantized_modules(transformer)), None
    assert calls is not None
    probe = calls[len(calls) // 2]
    adapter = adapter_for(transformer)
    names = {id(m): n for n, m in transformer.named_modules()}
    blocks = [(names[id(b)], b) for b in adapter.blocks()]
    recorders = [CallRecorder(b, limit=1) for _, b in blocks]
    try:
        y_fp = _first_tensor(probe.run(transformer)).clone()
    finally:
        for r in recorders:
            r.remove()
    rep: dict[str, Any] = {"layers": {}, "blocks": {}, "unreached": []}
    for (name, block), recorder in zip(blocks, recorders, strict=True):
        prefix = name + "."
        local = None if amax is None else _within(amax, prefix)
        reference = copy.deepcopy(block)  # the one extra copy alive at a time
        done = quantize_(block, config, name_prefix=prefix, activation_amax=local)
        if done and recorder.calls:
            call = recorder.calls[0]
            part = quality_report(reference, block, lambda call=call: call)
            rep["layers"].update({prefix + n: v for n, v in part["layers"].items()})
            rep["unreached"] += [prefix + n for n in part["unreached"]]
            ref_h = adapter._image_hidden_states(call.run(reference))
            q_h = adapter._image_hidden_states(call.run(block))
            rep["blocks"][name] = _errors(ref_h, q_h)
        elif done:
            rep["unreached"] += [prefix + n for n in done]
        del reference
    # linears outside the blocks that the config takes (none with the default patterns)
    quantize_(transformer, config, activation_amax=amax)
    rep["output"] = _errors(y_fp, _first_tensor(probe.run(transformer)))
    return sorted(quantized_modules(transformer)), rep


def _within(stats: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The entries of ``stats`` under ``prefix``, named relative to it."""
    return {n[len(prefix) :]: v for n, v in stats.items() if n.startswith(prefix)}


def summarize_report(rep: dict[str, Any], worst: int = 5) -> dict[str, Any]:
    """The end-to-end error and the ``worst`` layers (by isolated relative error) and blocks."""
    layers = sorted(rep["layers"].items(), key=lambda kv: -kv[1]["rel_err"])
    blocks = sorted(rep.get("blocks", {}).items(), key=lambda kv: -kv[1]["rel_err"])
    return {
        "output": rep["output"],
        "layers": len(rep["layers"]),
        "worst_layers": [{"name": n, **v} for n, v in layers[:worst]],
        "worst_blocks": [{"name": n, **v} for n, v in blocks[:worst]],
        "unreached": rep["unreached"],
    }


__all__ = [
    "CallRecorder",
    "RecordedCall",
    "capture_transformer_inputs",
    "needs_calibration",
    "quantize_transformer",
    "summarize_report",
]
