"""Quantizing a pipeline's transformer from its own sampling (what ``dcgen quantize`` runs).

A DiT's activations depend on the timestep and the resolution, so calibration inputs come from
the pipeline itself: a few denoising steps on the user's prompt embeddings, every transformer
call recorded (:func:`capture_transformer_inputs`). Those calls drive SVDQuant's smoothing
statistics (NVFP4 with ``smoothing_alpha``) and the quality report, which compares the
quantized transformer with a 16-bit copy of itself on the middle step's inputs
(:func:`quantize_transformer`). The checkpoint is :func:`dcgen.quant.save_quantized`'s
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

from .api import FP8Config, NVFP4Config, QuantConfig, quality_report, quantize_

logger = logging.getLogger(__name__)


@dataclass
class TransformerCall:
    """One forward call's keyword arguments (detached copies), replayable."""

    kwargs: dict[str, Any] = field(default_factory=dict)

    def run(self, model: nn.Module) -> Any:
        return model(**self.kwargs)


def _detached(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, dict):
        return {k: _detached(v) for k, v in value.items()}
    return value


class CallRecorder:
    """Records every forward call of ``module`` while installed (a forward pre-hook)."""

    def __init__(self, module: nn.Module) -> None:
        self.calls: list[TransformerCall] = []
        self._handle = module.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if args:
            raise TypeError(
                f"CallRecorder: expected {type(module).__name__} to be called with keyword "
                f"arguments only (as dcgen's adapters call it), got {len(args)} positional"
            )
        self.calls.append(TransformerCall(_detached(kwargs)))

    def remove(self) -> None:
        self._handle.remove()


@torch.no_grad()
def capture_transformer_inputs(
    pipe: Any, steps: int, height: int, width: int, seed: int = 0, **prompt_kwargs: Any
) -> list[TransformerCall]:
    """Every transformer call of ``steps`` denoising steps of ``pipe`` (a DCGenFluxPipeline or
    DCGenSanaPipeline) at ``height`` x ``width`` on the given prompt embeddings; no decode."""
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"calibration steps: expected a positive integer, got {steps!r}")
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


def _replay(calls: list[TransformerCall]) -> Callable[[nn.Module], None]:
    """A ``quantize_`` calibration callable that runs every recorded call through the model."""

    def run(model: nn.Module) -> None:
        for call in calls:
            call.run(model)

    return run


def needs_calibration(config: QuantConfig) -> bool:
    """Whether ``quantize_`` needs calibration inputs for ``config`` (NVFP4 smoothing)."""
    return isinstance(config, NVFP4Config) and config.smoothing_alpha is not None


@torch.no_grad()
def quantize_transformer(
    transformer: nn.Module,
    config: QuantConfig,
    calls: list[TransformerCall] | None = None,
    report: bool = True,
) -> tuple[list[str], dict[str, Any] | None]:
    """Quantize ``transformer`` in place with ``config``; returns the quantized layer names and,
    with ``report``, :func:`dcgen.quant.quality_report` against a 16-bit copy taken first (on
    the middle recorded call: a mid-trajectory noise level). The copy doubles the transformer's
    memory for the duration; ``report=False`` skips it."""
    if not isinstance(config, NVFP4Config | FP8Config):
        raise TypeError(
            f"quantize_transformer: expected an NVFP4Config or FP8Config, got "
            f"{type(config).__name__}"
        )
    if (report or needs_calibration(config)) and not calls:
        what = "NVFP4 smoothing" if needs_calibration(config) else "the quality report"
        raise ValueError(f"quantize_transformer: {what} needs recorded transformer calls, got none")
    reference = copy.deepcopy(transformer) if report else None
    calibrate = _replay(calls) if needs_calibration(config) and calls else None
    names = quantize_(transformer, config, calibrate=calibrate)
    if not names:
        raise ValueError(
            "quantize_transformer: no linear matched the config's include / exclude patterns"
        )
    if reference is None:
        return names, None
    assert calls is not None
    probe = calls[len(calls) // 2]
    rep = quality_report(reference, transformer, lambda: dict(probe.kwargs))
    del reference
    return names, rep


def summarize_report(rep: dict[str, Any], worst: int = 5) -> dict[str, Any]:
    """The end-to-end error and the ``worst`` layers by isolated relative error."""
    layers = sorted(rep["layers"].items(), key=lambda kv: -kv[1]["rel_err"])
    return {
        "output": rep["output"],
        "layers": len(rep["layers"]),
        "worst_layers": [{"name": n, **v} for n, v in layers[:worst]],
        "unreached": rep["unreached"],
    }


__all__ = [
    "CallRecorder",
    "TransformerCall",
    "capture_transformer_inputs",
    "needs_calibration",
    "quantize_transformer",
    "summarize_report",
]
