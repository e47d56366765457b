"""Stage 3 of DC-Gen: LoRA on the DiT blocks through peft (docs/method.md sections 1 and 5).

LoRA layers are injected in place, the way diffusers' own training scripts do it
(``ModelMixin.add_adapter`` -> ``peft.inject_adapter_in_model``), instead of wrapping the model
in a ``PeftModel``: the transformer stays a FluxTransformer2DModel / SanaTransformer2DModel
with its forward signature, its module names stay unprefixed, and the diffusers LoRA tooling
(state-dict export, ``load_lora_adapter``, ``fuse_lora``) works on it directly.

Targets are ONE regex string: peft full-matches a string ``target_modules`` against every
module name, whereas a list entry like "proj_out" suffix-matches and would also catch FLUX's
top-level ``proj_out`` (the new latent head, which is trained fully, outside peft).

File format (what diffusers' ``save_lora_weights`` writes and ``load_lora_weights`` reads):
``pytorch_lora_weights.safetensors`` with keys ``transformer.<module>.lora_A.weight`` /
``lora_B.weight`` and the peft LoraConfig (rank, alpha, targets) as JSON under the header key
``lora_adapter_metadata``, each config key prefixed ``transformer.``. Load it from the directory
with the weight name, or the alpha is lost. The new embedder/head are not in this file; the
caller saves them separately (e.g. with the checkpoint module).
"""

from __future__ import annotations

import json
import logging
import os
import re
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dcgen._checks import is_int
from dcgen._compiled import sees_through_compile
from dcgen._files import atomic_write

logger = logging.getLogger(__name__)

LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
LORA_PREFIX = "transformer"

# FLUX double-stream blocks: image and text attention projections, both MLPs. The AdaLN
# modulation linears (norm1.linear, norm1_context.linear) are left out: they act on the
# timestep embedding only, and the paper's suggestion is "attention and MLP linears".
FLUX_DOUBLE_TARGETS = (
    r"transformer_blocks\.\d+\.(?:"
    r"attn\.(?:to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|to_add_out)"
    r"|ff\.net\.(?:0\.proj|2)|ff_context\.net\.(?:0\.proj|2))"
)
# FLUX single-stream blocks. proj_out is anchored to the block so the top-level head is never
# matched (peft full-matches the regex against the whole module name).
FLUX_SINGLE_TARGETS = (
    r"single_transformer_blocks\.\d+\.(?:attn\.(?:to_q|to_k|to_v)|proj_mlp|proj_out)"
)
# SANA blocks: self- (attn1) and cross- (attn2) attention, and the pointwise (1x1) convs of
# GLUMBConv, which are per-token linears; the depthwise 3x3 conv_depth is left out.
SANA_TARGETS = (
    r"transformer_blocks\.\d+\.(?:attn[12]\.(?:to_q|to_k|to_v|to_out\.0)"
    r"|ff\.(?:conv_inverted|conv_point))"
)
# One regex for both families: names of the other family simply do not occur.
DEFAULT_TARGETS = rf"(?:{FLUX_DOUBLE_TARGETS}|{FLUX_SINGLE_TARGETS}|{SANA_TARGETS})"

__all__ = [
    "DEFAULT_TARGETS",
    "FLUX_DOUBLE_TARGETS",
    "FLUX_SINGLE_TARGETS",
    "LORA_WEIGHT_NAME",
    "SANA_TARGETS",
    "add_lora",
    "fuse_lora",
    "load_lora",
    "lora_parameters",
    "lora_target_names",
    "save_lora",
]


def _lora_module_kinds() -> tuple[type[nn.Module], ...]:
    # dcgen's quantized linears take LoRA too (16-bit adapters over the quantized weight).
    from dcgen.quant.lora import QUANTIZED_LINEARS

    return (nn.Linear, nn.Conv2d, *QUANTIZED_LINEARS)


@sees_through_compile
def lora_target_names(transformer: nn.Module, targets: str = DEFAULT_TARGETS) -> list[str]:
    """Names of the Linear / Conv2d (and dcgen quantized linear) modules the target regex
    selects (peft's full-match rule). A layer that already carries an adapter counts under its
    own name (peft adds a further adapter to the same wrapper), never its ``base_layer``."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    pattern = re.compile(targets)
    kinds = _lora_module_kinds()

    def lora_able(module: nn.Module) -> bool:
        if isinstance(module, BaseTunerLayer):
            module = module.get_base_layer()
        return isinstance(module, kinds)

    return [
        name
        for name, module in transformer.named_modules()
        if lora_able(module) and pattern.fullmatch(name)
    ]


def lora_parameters(transformer: nn.Module) -> list[nn.Parameter]:
    """The LoRA parameters (lora_A / lora_B / magnitude...) of an injected model."""
    return [p for name, p in transformer.named_parameters() if "lora_" in name]


def _adapter_parameters(transformer: nn.Module, adapter_name: str) -> list[nn.Parameter]:
    """The LoRA parameters of one adapter (peft names them ``lora_A.<adapter>.weight``)."""

    def of_adapter(name: str) -> bool:
        parts = name.split(".")
        return any(
            a.startswith("lora_") and b == adapter_name
            for a, b in zip(parts, parts[1:], strict=False)
        )

    return [p for name, p in transformer.named_parameters() if of_adapter(name)]


def _check_train_modules(transformer: nn.Module, train_modules: object) -> tuple[str, ...]:
    """``train_modules`` as a tuple of names of modules of ``transformer``, or an error."""
    if isinstance(train_modules, str):  # iterating it would name one module per letter
        raise TypeError(
            "train_modules: expected an iterable of module names (pass a tuple, e.g. "
            f"({train_modules!r},)), got str {train_modules!r}"
        )
    if not isinstance(train_modules, Iterable):
        raise TypeError(
            "train_modules: expected an iterable of module names, got "
            f"{type(train_modules).__name__}"
        )
    trained = tuple(train_modules)
    for name in trained:
        if not isinstance(name, str):
            raise TypeError(
                f"train_modules: expected module names (str), got {type(name).__name__} {name!r}"
            )
    modules = dict(transformer.named_modules())
    for name in trained:
        if name not in modules:
            raise KeyError(f"train_modules: no module named {name!r} in the transformer")
    return trained


@sees_through_compile
def add_lora(
    transformer: nn.Module,
    rank: int,
    alpha: float | None = None,
    targets: str | None = None,
    dropout: float = 0.0,
    adapter_name: str = "default",
    train_modules: Iterable[str] = (),
    lora_dtype: torch.dtype | None = torch.float32,
    config_extra: dict[str, Any] | None = None,
) -> nn.Module:
    """Inject LoRA (rank, alpha; scale = alpha / rank) into ``transformer`` in place.

    ``targets``: one regex full-matched against module names (default :data:`DEFAULT_TARGETS`).
    Afterwards only the LoRA parameters require grad, plus every parameter of the modules named
    in ``train_modules`` (exact names, e.g. ``("x_embedder", "proj_out")`` for DC-Gen's stage 3,
    which trains the new embedder and head fully). ``lora_dtype`` keeps the LoRA weights in fp32
    when the base is bf16 (peft casts activations to the LoRA dtype and back), None leaves them
    in the base dtype. ``config_extra``: further LoraConfig options. Returns ``transformer``
    (the same object, now carrying the adapter).
    """
    from peft import LoraConfig

    if not hasattr(transformer, "add_adapter"):
        raise TypeError(
            f"{type(transformer).__name__} has no add_adapter(); expected a diffusers ModelMixin "
            "with PeftAdapterMixin (FluxTransformer2DModel, SanaTransformer2DModel)"
        )
    # Every argument is checked before the model is touched: a refused call must leave it
    # unfrozen and without the adapter, or the corrected retry is refused ("already has ...").
    if not is_int(rank):
        raise TypeError(f"LoRA: expected a positive int rank, got {type(rank).__name__} {rank!r}")
    if rank < 1:
        raise ValueError(f"LoRA: expected rank >= 1, got {rank}")
    rank = int(rank)  # a numpy integer (read from a config) as the int peft and torch take
    trained = _check_train_modules(transformer, train_modules)
    targets = targets or DEFAULT_TARGETS
    names = lora_target_names(transformer, targets)
    if not names:
        raise ValueError(f"the LoRA target regex matches no linear or Conv2d module: {targets!r}")
    overlap = sorted(n for n in names for t in trained if n == t or n.startswith(t + "."))
    if overlap:
        # peft would wrap a fully trained module too: its saved keys (base_layer, lora_A/B)
        # then match neither the plain layer nor the LoRA file
        raise ValueError(
            f"the LoRA targets {targets!r} match {overlap}, which are trained fully "
            f"(train_modules {list(trained)}): leave them out of the targets"
        )

    existing = getattr(transformer, "peft_config", {})
    if adapter_name in existing:
        raise ValueError(
            f"the model already has a LoRA adapter named {adapter_name!r} (adapters: "
            f"{sorted(existing)}); expected a new adapter_name"
        )

    config = LoraConfig(
        r=rank,
        lora_alpha=float(alpha if alpha is not None else rank),
        lora_dropout=dropout,
        target_modules=targets,
        init_lora_weights=True,  # A Kaiming-uniform, B zero: training starts at the base model
        **(config_extra or {}),  # further LoraConfig options (a loaded file's rsLoRA, patterns)
    )
    from dcgen.quant.lora import register_quantized_lora

    register_quantized_lora(config)  # after quantize_: NVFP4Linear / FP8Linear get adapters too
    transformer.requires_grad_(False)
    transformer.add_adapter(config, adapter_name=adapter_name)

    # Only the new adapter's weights: an earlier adapter keeps its dtype, and stays frozen.
    for param in _adapter_parameters(transformer, adapter_name):
        param.requires_grad_(True)
        if lora_dtype is not None:
            param.data = param.data.to(lora_dtype)

    for name in trained:  # checked above: all present
        transformer.get_submodule(name).requires_grad_(True)

    n_lora = sum(p.numel() for p in _adapter_parameters(transformer, adapter_name))
    logger.info(
        "LoRA rank %d on %d modules, %d trainable LoRA parameters", rank, len(names), n_lora
    )
    return transformer


@sees_through_compile
def save_lora(
    transformer: nn.Module,
    directory: str | Path,
    adapter_name: str = "default",
    weight_name: str = LORA_WEIGHT_NAME,
) -> Path:
    """Write the adapter as diffusers does (see the module docstring); returns the file path."""
    from diffusers.loaders.lora_base import LoraBaseMixin, _pack_dict_with_prefix
    from peft.utils import get_peft_model_state_dict

    peft_config = getattr(transformer, "peft_config", {})
    if adapter_name not in peft_config:
        raise ValueError(
            f"no LoRA adapter named {adapter_name!r}; the model has {sorted(peft_config)}"
        )
    state = get_peft_model_state_dict(transformer, adapter_name=adapter_name)
    state = {k: v.detach().contiguous() for k, v in state.items()}
    metadata = peft_config[adapter_name].to_dict()
    path = Path(directory) / weight_name

    def write(tmp: str) -> None:
        # diffusers writes into a folder under a name: a private one beside the target, whose
        # file is renamed into place (a killed save leaves the old file, never half a new one)
        with tempfile.TemporaryDirectory(prefix=".lora.", dir=path.parent) as folder:
            LoraBaseMixin.write_lora_layers(
                state_dict=_pack_dict_with_prefix(state, LORA_PREFIX),
                save_directory=folder,
                is_main_process=True,
                weight_name=weight_name,
                save_function=None,
                safe_serialization=True,
                lora_adapter_metadata=_pack_dict_with_prefix(metadata, LORA_PREFIX),
            )
            os.replace(Path(folder) / weight_name, tmp)

    atomic_write(path, write)
    logger.info("saved %d LoRA tensors to %s", len(state), path)
    return path


@sees_through_compile
def load_lora(
    transformer: nn.Module,
    directory: str | Path,
    adapter_name: str = "default",
    weight_name: str = LORA_WEIGHT_NAME,
    trainable: bool = False,
    float32_factors: bool = False,
) -> nn.Module:
    """Load a file written by :func:`save_lora` (or diffusers) into ``transformer`` in place.

    Rank, alpha and targets come from the file's ``lora_adapter_metadata``. Every tensor in the
    file must land in the model; a mismatch raises with the offending keys. ``trainable=True``
    makes the LoRA parameters require grad (to resume training). ``float32_factors``: the LoRA
    factors are float32 with the file's values (peft makes them in the model's dtype, rounding
    them and the delta a fuse adds; export fuses into 16-bit weights with one rounding so).
    """
    from peft.utils import get_peft_model_state_dict
    from safetensors import safe_open

    path = Path(directory) / weight_name
    if not path.is_file():
        raise FileNotFoundError(f"no LoRA file at {path}")
    with safe_open(str(path), framework="pt") as f:
        file_keys = {k.removeprefix(f"{LORA_PREFIX}.") for k in f.keys()}
        header = f.metadata() or {}
    if "lora_adapter_metadata" not in header:
        logger.warning("%s has no lora_adapter_metadata: alpha defaults to the rank", path)

    if _has_quantized_linears(transformer):
        # diffusers' loader builds its own peft config, which cannot wrap quantized linears.
        _load_lora_on_quantized(transformer, path, header, adapter_name)
        if not float32_factors:
            # add_lora made them fp32 (a quantized base has no 16-bit weight for peft to follow),
            # so peft cast every adapted layer's input to fp32: the model's dtype, as on a
            # plain model (most of its parameters'; the quantized weights are buffers)
            from dcgen.autoencoders.checkpoint import stored_dtype

            dtype = stored_dtype(
                {n: p for n, p in transformer.named_parameters() if "lora_" not in n}
            )
            for param in _adapter_parameters(transformer, adapter_name):
                param.data = param.data.to(dtype)
    else:
        transformer.load_lora_adapter(
            str(directory), weight_name=weight_name, prefix=LORA_PREFIX, adapter_name=adapter_name
        )
    loaded = set(get_peft_model_state_dict(transformer, adapter_name=adapter_name))
    if loaded != file_keys:
        raise RuntimeError(
            f"LoRA file {path} does not match the model: missing in model "
            f"{sorted(file_keys - loaded)[:5]}, not in file {sorted(loaded - file_keys)[:5]}"
        )
    if float32_factors:
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        for param in _adapter_parameters(transformer, adapter_name):
            param.data = param.data.float()
        factors = {k.removeprefix(f"{LORA_PREFIX}."): v.float()
                   for k, v in load_file(str(path)).items() if "lora_" in k}  # fmt: skip
        set_peft_model_state_dict(transformer, factors, adapter_name=adapter_name)
    for param in lora_parameters(transformer):
        param.requires_grad_(trainable)
    return transformer


def _has_quantized_linears(transformer: nn.Module) -> bool:
    from dcgen.quant.lora import QUANTIZED_LINEARS

    return any(isinstance(m, QUANTIZED_LINEARS) for m in transformer.modules())


def _targets_regex(targets: str | list[str]) -> str:
    """peft's target_modules as one full-match regex (a list means: the name or a suffix after
    a dot, peft's rule)."""
    if isinstance(targets, str):
        return targets
    names = "|".join(re.escape(t) for t in targets)
    return rf"(?:.*\.)?(?:{names})"


# LoraConfig options that change an adapter's shape or scale beyond (r, lora_alpha): a file
# saved with them loads onto a quantized model with them (they were dropped: rsLoRA's
# alpha / sqrt(r) became alpha / r, per-module ranks failed to load).
_SCALING_OPTIONS = ("use_rslora", "rank_pattern", "alpha_pattern", "use_dora", "fan_in_fan_out")


def _scaling_options(meta: dict[str, Any]) -> dict[str, Any]:
    return {k: meta[k] for k in _SCALING_OPTIONS if meta.get(k) is not None}


def _load_lora_on_quantized(
    transformer: nn.Module, path: Path, header: dict[str, str], adapter_name: str
) -> None:
    """Inject the file's adapter (rank, alpha, targets from its metadata) with :func:`add_lora`,
    which registers the quantized layers, then load the tensors into it."""
    from peft.utils import set_peft_model_state_dict
    from safetensors.torch import load_file

    raw = json.loads(header.get("lora_adapter_metadata", "{}"))
    meta = {k.removeprefix(f"{LORA_PREFIX}."): v for k, v in raw.items()}
    missing = [k for k in ("r", "lora_alpha", "target_modules") if k not in meta]
    if missing:
        raise ValueError(
            f"{path}: loading a LoRA onto a quantized model needs the adapter's rank, alpha and "
            f"targets in lora_adapter_metadata (as save_lora writes them); missing {missing}"
        )
    add_lora(
        transformer,
        rank=int(meta["r"]),
        alpha=float(meta["lora_alpha"]),
        targets=_targets_regex(meta["target_modules"]),
        dropout=float(meta.get("lora_dropout") or 0.0),
        adapter_name=adapter_name,
        config_extra=_scaling_options(meta),
    )
    state = {k.removeprefix(f"{LORA_PREFIX}."): v for k, v in load_file(str(path)).items()}
    set_peft_model_state_dict(transformer, state, adapter_name=adapter_name)


@sees_through_compile
def fuse_lora(transformer: nn.Module, scale: float = 1.0, unload: bool = True) -> nn.Module:
    """Merge the LoRA deltas (times ``scale``) into the base weights, in place.

    With ``unload`` (default) the peft layers are then replaced by their (now merged) base
    layers, leaving a plain diffusers model with no peft dependency or per-call overhead.
    """
    if not getattr(transformer, "peft_config", None):
        raise ValueError("the model has no LoRA adapter to fuse")
    transformer.fuse_lora(lora_scale=scale)
    if unload:
        transformer.unload_lora()
    return transformer
