"""Adopt checkpoints quantized elsewhere: diffusers' BFL FP8 / NVFP4 layers as dcgen's.

Black Forest Labs publishes FLUX checkpoints quantized to FP8 (per-row scales, "fp8r") and to
NVFP4. diffusers loads them with ``from_single_file(..., quantization_config=
BFLQuantizationConfig())`` into its own linear classes (``BFLFP8RLinear``,
``BFLNVFP4Linear``); on anything but a Blackwell GPU with FlashInfer, the NVFP4 one
dequantizes its whole weight to 16 bits on every call (no memory saved while it runs, no
speed gained).

Their buffers are the layouts dcgen's quantized layers already use (ModelOpt / vLLM):

- NVFP4: ``weight`` uint8 [N, K/2] (two E2M1 codes per byte, the even element in the low
  nibble), ``weight_scale`` float8_e4m3fn [N, K/16] (plain row-major), ``weight_scale_2`` fp32
  scalar (the weight's global decode scale) and ``input_scale`` fp32 scalar (the calibrated
  activation decode scale);
- FP8: ``weight`` float8_e4m3fn [N, K] and an fp32 decode scale per row [N].

So :func:`adopt_quantized` swaps each one for :class:`~dcgen.quant.NVFP4Linear` /
:class:`~dcgen.quant.FP8Linear` holding the same bytes: no re-quantization and no calibration.
The model then runs dcgen's kernels (the Hopper NVFP4 and FP8 paths, the Blackwell CUTLASS
GEMMs; the reference anywhere), saves with :func:`~dcgen.quant.save_quantized` and loads with
``dcgen generate --quantized``.

NVFP4 activations: ``"w4a4"`` (default) quantizes them with the checkpoint's calibrated
``input_scale`` as the static global scale, as BFL's layers run on Blackwell; ``"w4a16"`` keeps
them 16-bit, which is what diffusers' fallback computes on other GPUs and the CPU. FP8 layers
quantize each activation row on the fly, as BFL's do on FP8 GPUs (with fp32 accumulation, where
BFL's call asks cuBLAS for fast accumulation).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from dcgen._compiled import sees_through_compile

from .api import _errors, _set_module, _shared_layers, quantized_modules
from .fp8_linear import FP8Linear, share_input_quantization
from .linear import NVFP4Linear, check_mode
from .nvfp4 import BLOCK

logger = logging.getLogger(__name__)

__all__ = ["BFL_LINEARS", "adopt_quantized", "weight_errors"]

#: diffusers' BFL layer classes (diffusers.quantizers.bfl.utils) and the format of each
BFL_LINEARS = {"BFLNVFP4Linear": "nvfp4", "BFLFP8RLinear": "fp8"}


def _bfl_kind(module: nn.Module) -> str | None:
    cls = type(module)
    if cls.__module__.startswith("diffusers.quantizers.bfl"):
        return BFL_LINEARS.get(cls.__name__)
    return None


def _check(name: str, what: str, t: torch.Tensor, shape: tuple[int, ...], dtype: torch.dtype):
    if tuple(t.shape) != shape or t.dtype != dtype:
        raise ValueError(
            f"adopt_quantized: {name}.{what}: expected {dtype} of shape {shape}, got "
            f"{t.dtype} of shape {tuple(t.shape)}"
        )


def _bias_dtype(module: nn.Module) -> torch.dtype:
    if module.bias is not None:
        return module.bias.dtype
    return getattr(module, "compute_dtype", None) or torch.bfloat16


def _check_nvfp4(name: str, module: nn.Module, mode: str) -> None:
    n, k = module.out_features, module.in_features
    if k % BLOCK:
        raise ValueError(f"adopt_quantized: {name}: in_features {k} is not a multiple of {BLOCK}")
    _check(name, "weight", module.weight, (n, k // 2), torch.uint8)
    _check(name, "weight_scale", module.weight_scale, (n, k // BLOCK), torch.float8_e4m3fn)
    for s in ("weight_scale_2", "input_scale"):
        t = getattr(module, s).detach().float()
        if t.numel() != 1 or not torch.isfinite(t).all() or t.item() < 0:
            raise ValueError(
                f"adopt_quantized: {name}.{s}: expected a finite non-negative scalar, got {t}"
            )
    if mode == "w4a4" and module.input_scale.item() == 0:
        raise ValueError(
            f"adopt_quantized: {name} has no calibrated input_scale (0); adopt with "
            "nvfp4_mode='w4a16'"
        )


def _check_fp8(name: str, module: nn.Module) -> None:
    n, k = module.out_features, module.in_features
    _check(name, "weight", module.weight, (n, k), torch.float8_e4m3fn)
    scale = module.weight_scale.detach()
    if scale.numel() != n or not torch.isfinite(scale.float()).all():
        raise ValueError(
            f"adopt_quantized: {name}.weight_scale: expected {n} finite row scales, got shape "
            f"{tuple(scale.shape)}"
        )


@torch.no_grad()
def _nvfp4_layer(module: nn.Module, mode: str) -> NVFP4Linear:
    n, k = module.out_features, module.in_features
    bias, dtype = module.bias is not None, _bias_dtype(module)
    layer = NVFP4Linear(k, n, bias, mode, dtype=dtype, device=module.weight.device)
    layer.weight.copy_(module.weight)
    layer.weight_scale.copy_(module.weight_scale)
    layer.weight_scale_2.copy_(module.weight_scale_2.float().reshape(()))
    # w4a16 ignores the activation scale; it is kept so a w4a4 reload of the file has it.
    layer.input_scale.copy_(module.input_scale.float().reshape(()))
    if bias:
        layer.bias.data.copy_(module.bias)
    return layer


@torch.no_grad()
def _fp8_layer(module: nn.Module) -> FP8Linear:
    n, k = module.out_features, module.in_features
    bias = module.bias is not None
    layer = FP8Linear(k, n, bias, "row", _bias_dtype(module), module.weight.device)
    layer.weight.copy_(module.weight)
    layer.weight_scale.copy_(module.weight_scale.float().reshape(n, 1))
    if bias:
        layer.bias.data.copy_(module.bias)
    return layer


@sees_through_compile
def adopt_quantized(model: nn.Module, nvfp4_mode: str = "w4a4") -> list[str]:
    """Replace, in place, every diffusers BFL quantized linear of ``model`` (a transformer
    loaded with ``BFLQuantizationConfig``) by dcgen's layer with the same bytes; returns their
    names. ``nvfp4_mode``: "w4a4" (the checkpoint's static activation scale) or "w4a16".

    Every layer is checked before the first swap, so a bad one leaves the model as it was. The
    model then stops being a diffusers-quantized model (``hf_quantizer`` and ``is_quantized``
    cleared): dcgen's layers keep their format through ``.to(dtype)`` and save with
    :func:`~dcgen.quant.save_quantized`."""
    check_mode(nvfp4_mode)
    found = {n: k for n, m in model.named_modules() if (k := _bfl_kind(m)) is not None}
    if not found:
        raise ValueError(
            "adopt_quantized: found no diffusers BFL quantized linears (BFLNVFP4Linear / "
            "BFLFP8RLinear) in the model; load the checkpoint with "
            "from_single_file(..., quantization_config=BFLQuantizationConfig())"
        )
    for name, kind in found.items():
        module = model.get_submodule(name)
        if kind == "nvfp4":
            _check_nvfp4(name, module, nvfp4_mode)
        else:
            _check_fp8(name, module)
    shared = _shared_layers(model)
    for name, kind in found.items():
        module = model.get_submodule(name)
        layer = _nvfp4_layer(module, nvfp4_mode) if kind == "nvfp4" else _fp8_layer(module)
        _set_module(model, name, layer, shared)
    if any(isinstance(m, FP8Linear) for m in model.modules()):
        share_input_quantization(model)  # as quantize_ does: one activation pass per input
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    if getattr(model, "is_quantized", False):
        model.is_quantized = False
        model.quantization_method = None
    logger.info(
        "adopt_quantized: %d BFL linears now dcgen layers (NVFP4 %s)", len(found), nvfp4_mode
    )
    return list(found)


@torch.no_grad()
def weight_errors(
    model: nn.Module, reference: Callable[[str], torch.Tensor | None]
) -> dict[str, Any]:
    """How far each quantized layer's weight is from the 16-bit one it stands for:
    ``reference(name)`` returns the original ``<name>.weight`` (or None when it is missing),
    compared with the layer's dequantized weight (relative Frobenius error, cosine). For a
    checkpoint quantized elsewhere, whose calibration data is unknown, the weights are what
    can be checked without running the model; returns {"layers": {name: errors}, "summary"}.
    Layers with a low-rank branch are refused (their dequantized weight is only the residual);
    smoothed ones are compared after dividing the smoothing factors back out."""
    layers: dict[str, dict[str, float]] = {}
    missing = []
    for name, layer in quantized_modules(model).items():
        if getattr(layer, "rank", 0):
            raise ValueError(
                f"weight_errors: {name} has a low-rank branch; compare outputs instead"
            )
        ref = reference(f"{name}.weight")
        if ref is None:
            missing.append(name)
            continue
        got = layer.dequantized_weight()
        smooth = getattr(layer, "smooth", None)
        if smooth is not None:  # the stored weight is W * s per input channel
            got = got / smooth.float()
        if tuple(ref.shape) != tuple(got.shape):
            raise ValueError(
                f"weight_errors: {name}: the reference weight has shape {tuple(ref.shape)}, the "
                f"quantized layer {tuple(got.shape)}"
            )
        layers[name] = _errors(ref.to(got.device), got)
    rel = [e["rel_err"] for e in layers.values()]
    summary = {
        "layers": len(layers),
        "missing_reference": missing,
        "mean_rel_err": sum(rel) / len(rel) if rel else float("nan"),
        "max_rel_err": max(rel) if rel else float("nan"),
        "min_cosine": min((e["cosine"] for e in layers.values()), default=float("nan")),
    }
    return {"layers": layers, "summary": summary}
