"""LoRA on a quantized model (QLoRA style): ``quantize_`` first, then peft adapters whose weights
stay in full precision on top of the frozen NVFP4Linear / FP8Linear layers.

peft only knows its own layer types; a custom base layer needs a LoRA layer class registered on
the LoraConfig (``LoraConfig._register_custom_module``, peft's documented custom-module hook).
:class:`QuantizedLoraLinear` is that class: peft's own ``lora.Linear`` (so forward, adapters,
dropout, scaling, enable / disable and state dicts behave exactly as on nn.Linear) with three
changes for a quantized base:

- in / out features come from the layer's ``in_features`` / ``out_features`` attributes;
- the adapters follow the base layer's device but never its dtype (peft would cast them to the
  weight's dtype: uint8 codes for NVFP4, ``float8_e4m3fn`` for FP8). They stay as created
  (fp32), 16-bit if the caller casts them;
- merging raises: folding a delta into a 4- or 8-bit weight would re-quantize it (a different,
  lossy layer); keep the adapter unmerged, or merge on the bf16 model and quantize after.

Gradients reach the adapters of every layer because both quantized layers pass the input
gradient straight through their rounding (``dx = dy @ deq(W)``), on the reference and the
kernel paths alike.

Usage (a diffusers FLUX / SANA transformer)::

    quantize_(transformer, NVFP4Config(mode="w4a16"))
    add_quantized_lora(transformer, rank=16)         # LoRA on the quantized and bf16 linears
    opt = torch.optim.AdamW(lora_parameters(transformer), lr=1e-4)
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Any

import torch
from peft import LoraConfig
from peft.tuners.lora.layer import Linear as _PeftLoraLinear
from torch import nn

from .fp8_linear import FP8Linear
from .linear import NVFP4Linear

QUANTIZED_LINEARS: tuple[type[nn.Module], ...] = (NVFP4Linear, FP8Linear)


class QuantizedLoraLinear(_PeftLoraLinear):
    """peft's LoRA Linear over a frozen NVFP4Linear / FP8Linear base (module doc)."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: LoraConfig, **kwargs: Any):
        base = base_layer.get_base_layer() if hasattr(base_layer, "get_base_layer") else base_layer
        if not isinstance(base, QUANTIZED_LINEARS):
            raise TypeError(
                "QuantizedLoraLinear: expected an NVFP4Linear or FP8Linear base layer, "
                f"got {type(base).__name__}"
            )
        if config.use_dora or config.lora_bias:
            raise ValueError(
                "QuantizedLoraLinear: expected use_dora=False and lora_bias=False (both need the "
                "base weight in full precision), got "
                f"use_dora={config.use_dora}, lora_bias={config.lora_bias}"
            )
        super().__init__(base_layer, adapter_name, config=config, **kwargs)

    def _get_in_out_features(self, module: nn.Module) -> tuple[int, int]:
        return module.in_features, module.out_features

    def _get_base_layer_device_and_dtype(self, base_layer: nn.Module):  # noqa: ANN202
        # The device of the quantized weight, no dtype: adapters never take uint8 / float8.
        return base_layer.weight.device, None

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        raise NotImplementedError(
            "QuantizedLoraLinear: merging a LoRA delta into an NVFP4 / FP8 weight would "
            "re-quantize it; keep the adapter unmerged, or merge into the bf16 model before "
            "quantize_"
        )

    def unmerge(self) -> None:
        raise NotImplementedError("QuantizedLoraLinear: adapters are never merged (see merge)")

    def __repr__(self) -> str:
        return "dcgen." + super().__repr__().replace("lora.Linear", "QuantizedLoraLinear")


def _lora_wrappers(model: nn.Module, names: list[str]) -> dict[str, nn.Module]:
    """The peft layers among the parents of ``names`` (linears ``quantize_`` will swap), by the
    parent's name: a model that carried LoRA before it was quantized."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    wrappers = {}
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        if child == "base_layer" and isinstance(parent, BaseTunerLayer):
            wrappers[parent_name] = parent
    return wrappers


def check_lora_before_quantize(model: nn.Module, names: list[str]) -> None:
    """Refuse, before anything is swapped, to quantize a linear under a peft layer that cannot
    run on a 4- or 8-bit base: another tuner than LoRA, or DoRA / lora_bias adapters (they need
    the base weight in full precision)."""
    for parent_name, wrapper in _lora_wrappers(model, names).items():
        if type(wrapper) not in (_PeftLoraLinear, QuantizedLoraLinear):
            raise TypeError(
                f"quantize_: {parent_name} is a {type(wrapper).__module__}."
                f"{type(wrapper).__name__} around the linear; expected peft's LoRA Linear (the "
                "only adapter dcgen runs over a quantized weight)"
            )
        dora = [a for a, on in getattr(wrapper, "use_dora", {}).items() if on]
        bias = [a for a, on in getattr(wrapper, "lora_bias", {}).items() if on]
        if dora or bias:
            raise ValueError(
                f"quantize_: {parent_name} carries adapters with use_dora {dora} / lora_bias "
                f"{bias}; expected plain LoRA over a quantized weight (both need the base "
                "weight in full precision): fuse them into the 16-bit model first"
            )


def adopt_quantized_bases(model: nn.Module, names: list[str]) -> int:
    """After ``quantize_`` swapped the ``base_layer`` of peft LoRA layers (LoRA added before
    quantizing), make each such layer a :class:`QuantizedLoraLinear`: the same object and
    adapters, with the quantized-base rules (adapters added later stay fp32 instead of taking
    the float8 / uint8 weight dtype; merging is refused). Returns how many were adopted."""
    wrappers = _lora_wrappers(model, names)
    for wrapper in wrappers.values():
        # QuantizedLoraLinear adds no state to peft's class, only overrides: re-classing keeps
        # every adapter, scaling and the merged flag as they are.
        wrapper.__class__ = QuantizedLoraLinear
    return len(wrappers)


def register_quantized_lora(config: LoraConfig) -> LoraConfig:
    """Teach ``config`` (a peft LoraConfig) to wrap dcgen's quantized linears; returns it."""
    if not isinstance(config, LoraConfig):
        raise TypeError(f"register_quantized_lora: expected a peft LoraConfig, got {type(config)}")
    config._register_custom_module(dict.fromkeys(QUANTIZED_LINEARS, QuantizedLoraLinear))
    return config


def add_quantized_lora(
    transformer: nn.Module,
    rank: int,
    alpha: float | None = None,
    targets: str | None = None,
    dropout: float = 0.0,
    adapter_name: str = "default",
    lora_dtype: torch.dtype | None = torch.float32,
) -> nn.Module:
    """Inject LoRA into a (partly) quantized diffusers transformer in place, the same way as
    :func:`dcgen.train.lora.add_lora` (same default targets, scale alpha / rank, A Kaiming, B
    zero, ``lora_dtype`` for the adapter weights), with the quantized linears registered.
    Afterwards only the LoRA parameters require grad. Returns ``transformer``."""
    from dcgen.train.lora import add_lora

    # One injection path for float and quantized models: add_lora registers the quantized
    # linears with peft and selects them by the same target regex.
    return add_lora(transformer, rank, alpha, targets, dropout, adapter_name, lora_dtype=lora_dtype)


@contextlib.contextmanager
def quantized_lora_loading() -> Iterator[None]:
    """While active, the LoraConfig that diffusers builds for every ``load_lora_weights`` /
    ``load_lora_adapter`` call knows dcgen's quantized linears, so a LoRA file (any format
    diffusers converts) loads onto a transformer whose linears ``quantize_`` replaced: the
    adapters stay unmerged beside the 4- or 8-bit weights (in fp32 as peft makes them;
    dcgen.pipelines.lora.load_lora_on_quantized casts them to the model's dtype). diffusers has no
    hook for custom peft layers, so this wraps its config builder (a private function of
    ``diffusers.loaders.peft``) for the duration, and fails clearly if that ever moves."""
    import diffusers.loaders.peft as loader

    with _LORA_PATCH_LOCK:
        if not _LORA_PATCH["users"]:
            _LORA_PATCH["original"] = _install_lora_patch(loader)
        _LORA_PATCH["users"] += 1
    try:
        yield
    finally:
        with _LORA_PATCH_LOCK:
            _LORA_PATCH["users"] -= 1
            if not _LORA_PATCH["users"]:
                loader._create_lora_config = _LORA_PATCH.pop("original")


# One wrapper installed while any quantized_lora_loading() is active, the original put back
# by the last to leave: each context saving and restoring what it found left the wrapper in
# diffusers for good when two overlapping loads (two threads) left in the order they came.
_LORA_PATCH_LOCK = threading.Lock()
_LORA_PATCH: dict[str, Any] = {"users": 0}


def _install_lora_patch(loader: Any) -> Any:
    """Wrap ``loader._create_lora_config``; returns the original."""
    import diffusers

    original = getattr(loader, "_create_lora_config", None)
    if original is None:
        raise RuntimeError(
            "quantized_lora_loading: diffusers.loaders.peft._create_lora_config is gone in "
            f"diffusers {diffusers.__version__}; load the LoRA on the 16-bit model and quantize "
            "after (dcgen quantize --lora)"
        )

    def create(*args: Any, **kwargs: Any) -> LoraConfig:
        return register_quantized_lora(original(*args, **kwargs))

    loader._create_lora_config = create
    return original
