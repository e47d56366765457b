"""LoRAs made for the base model (a FLUX.1 or SANA style LoRA) on DC-Gen pipelines.

DC-Gen keeps the base model's blocks and replaces only its latent-facing layers, so a LoRA on
the blocks' attention and MLP linears still finds the layers it was trained on, and diffusers'
own LoRA loading (``load_lora_weights``, with its conversions of kohya / xlabs / ... files,
``set_adapters``, ``fuse_lora``) works on a DC-Gen pipeline unchanged, except for one part:
a LoRA that also trains the latent-facing layers (``x_embedder`` / ``proj_out`` for FLUX,
``patch_embed`` / ``proj_out`` for SANA) has deltas for the base latent space, which a DC-Gen
model no longer has. diffusers would even widen the new embedder to the LoRA's input size
(its FLUX Control path). Those entries are dropped, with a warning naming them.

On a transformer whose linears ``quantize_`` replaced (FP8 / NVFP4), a LoRA cannot be fused
(the delta would have to be re-quantized into the 4- or 8-bit weight):
:func:`load_lora_on_quantized` loads it unmerged, in the model's 16-bit dtype, beside them.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch

logger = logging.getLogger(__name__)


def drop_latent_layer_keys(
    loaded: Any, modules: tuple[str, ...], prefix: str = "transformer"
) -> Any:
    """``lora_state_dict``'s result (a state dict, or a tuple whose first element is one and
    whose second, if a dict, holds the network alphas) without the entries of ``modules``
    (top-level transformer modules, with or without the ``prefix.`` of diffusers' keys)."""
    starts = tuple(f"{p}{m}." for m in modules for p in (f"{prefix}.", ""))

    def keep(state: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in state.items() if not k.startswith(starts)}

    state = loaded[0] if isinstance(loaded, tuple) else loaded
    dropped = sorted(
        {k.split(".lora")[0].split(".alpha")[0] for k in state if k.startswith(starts)}
    )
    if not dropped:
        return loaded
    if all(k.startswith(starts) for k in state):
        raise ValueError(
            f"this LoRA holds entries for {', '.join(dropped)} only: the latent-facing layers "
            "DC-Gen replaced, so nothing of it applies to a DC-Gen model"
        )
    logger.warning(
        "LoRA entries for %s skipped: DC-Gen replaced these latent-facing layers, so deltas "
        "trained for the base model's latent space do not apply (the LoRA's other layers load)",
        ", ".join(dropped),
    )
    if not isinstance(loaded, tuple):
        return keep(state)
    kept = keep(state)
    rest = [
        _targets_from(kept, part, prefix) if _is_lora_config(part, prefix)
        else keep(part) if isinstance(part, dict)
        else part
        for part in loaded[1:]
    ]  # fmt: skip
    return (kept, *rest)


def _is_lora_config(part: Any, prefix: str) -> bool:
    # the LoRA file's own config (diffusers' return_lora_metadata: LoraConfig keyword
    # arguments under the component's prefix), as opposed to network alphas keyed by module
    return isinstance(part, dict) and f"{prefix}.target_modules" in part


def _targets_from(state: dict[str, Any], config: dict[str, Any], prefix: str) -> dict[str, Any]:
    """The config with its target modules set to the modules ``state`` holds, as diffusers
    derives them for a file without a config. The file's own (suffixes such as "proj" or
    "proj_out") still matched the skipped latent layers, and PEFT added a RuntimeWarning
    ("an inconsistency ... additional target modules") to the line above."""
    names = {k.removeprefix(f"{prefix}.").split(".lora")[0] for k in state if ".lora" in k}
    return {**config, f"{prefix}.target_modules": sorted(names)}


def latent_safe_lora_state_dict(loader: type, modules: tuple[str, ...]) -> classmethod:
    """A ``lora_state_dict`` classmethod for a pipeline class: ``loader``'s (diffusers'
    FluxLoraLoaderMixin or SanaLoraLoaderMixin), then :func:`drop_latent_layer_keys`. Every
    loading path of the mixin (``load_lora_weights`` first of all) goes through it."""
    base: Callable[..., Any] = loader.lora_state_dict.__func__  # the classmethod's function

    def lora_state_dict(cls: type, *args: Any, **kwargs: Any) -> Any:
        return drop_latent_layer_keys(base(cls, *args, **kwargs), modules)

    lora_state_dict.__doc__ = (
        f"{loader.__name__}.lora_state_dict without the entries of the latent-facing layers "
        f"{modules} (dcgen.pipelines.lora)."
    )
    return classmethod(lora_state_dict)


def load_lora_on_quantized(
    pipe: Any,
    source: str,
    adapter_name: str,
    weight_name: str | None = None,
    dtype: torch.dtype | None = None,
) -> None:
    """Load a LoRA file onto ``pipe.transformer`` whose linears are (partly) dcgen's quantized
    ones, as adapter ``adapter_name``, unmerged. The pipeline class's ``lora_state_dict``
    converts the file (and skips the latent-facing layers); the transformer's own
    ``load_lora_adapter`` injects it, with dcgen's quantized LoRA layer registered
    (:func:`dcgen.quant.lora.quantized_lora_loading`). The pipeline-level
    ``load_lora_weights`` is not used: its FLUX branch compares each LoRA's input size with the
    stored weight's, which a packed 4-bit weight does not have. The adapter weights end in
    ``dtype`` (default: the transformer's 16-bit dtype, that of its latent embedder): peft
    would otherwise keep them in fp32 beside a bf16 model and cast every input up."""
    from ..quant.lora import quantized_lora_loading

    # FLUX returns (state, alphas, metadata); SANA, which has no alphas, (state, metadata)
    out = type(pipe).lora_state_dict(
        source, weight_name=weight_name, return_alphas=True, return_lora_metadata=True
    )
    state, metadata = out[0], out[-1]
    alphas = out[1] if len(out) == 3 else None
    # text-encoder parts (a kohya FLUX LoRA's CLIP layers): only the transformer's linears were
    # quantized and take adapters here, so say what is left out rather than drop it silently
    others = sorted({key.split(".", 1)[0] for key in state if not key.startswith("transformer.")})
    shown = source if weight_name is None else f"{source}/{weight_name}"
    if not any(key.startswith("transformer.") for key in state):
        # peft then failed later with "Adapter name(s) ... not in the list of present adapters"
        raise ValueError(
            f"{shown}: expected transformer entries in the LoRA, got only "
            f"{', '.join(others) or 'none'}: nothing of it applies to a quantized transformer"
        )
    if others:
        logger.warning(
            "%s: the LoRA's %s entries are not loaded: on a quantized transformer only its "
            "transformer part is applied (prompts encode without it)",
            shown, ", ".join(others),
        )  # fmt: skip
    transformer = pipe.transformer
    with quantized_lora_loading():
        transformer.load_lora_adapter(
            state, prefix="transformer", adapter_name=adapter_name, network_alphas=alphas,
            metadata=metadata,
        )  # fmt: skip
    if dtype is None:
        from ..adapters import DiTAdapter, adapter_for

        # the embedder's compute dtype, not its weight's: quantized too (keep_latent_layers=
        # False), that is float8 / uint8, and every LoRA factor was cast to it
        embedder = adapter_for(transformer).latent_layers().embedder
        dtype = DiTAdapter._compute_dtype(embedder)
    marks = (f".lora_A.{adapter_name}.", f".lora_B.{adapter_name}.")
    with torch.no_grad():
        for name, param in transformer.named_parameters():
            if any(m in name for m in marks) and param.dtype != dtype:
                param.data = param.data.to(dtype)


@contextlib.contextmanager
def text_encoder_lora_scale(encoders: Iterable[Any], scale: float | None) -> Iterator[None]:
    """The peft LoRA layers of ``encoders`` (modules; None entries skipped) scaled by ``scale``
    inside the block, as diffusers' FluxPipeline / SanaPipeline encode_prompt scale their text
    encoders with the call's ``{"scale": s}`` (scale_lora_layers ... unscale_lora_layers).
    Afterwards every layer gets its own scaling back exactly: diffusers divides by the scale
    (rounding) and resets a 0 scale to the rank default (dropping a set_adapters weight).
    None or 1: nothing to do; no peft installed: there are no LoRA layers."""
    if scale is None or scale == 1:
        yield
        return
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:
        yield
        return
    layers = [
        module
        for encoder in encoders
        if isinstance(encoder, torch.nn.Module)
        for module in encoder.modules()
        if isinstance(module, BaseTunerLayer) and isinstance(getattr(module, "scaling", None), dict)
    ]
    saved = [(layer, dict(layer.scaling)) for layer in layers]
    try:
        for layer in layers:
            layer.scale_layer(float(scale))
        yield
    finally:
        for layer, scaling in saved:
            layer.scaling.clear()
            layer.scaling.update(scaling)
