"""quantize_(model, NVFP4Config()) and friends: the whole quantization API (torchao style).

- :class:`NVFP4Config`: mode, SVDQuant rank, include / exclude regexes on module names
  (``re.search``; anchor them), smoothing alpha.
- :class:`FP8Config`: FP8 (E4M3) W8A8 with per-row or 1x128-block scales, same patterns.
- :func:`quantize_`: swaps matching ``nn.Linear`` modules for :class:`NVFP4Linear` or
  :class:`FP8Linear` in place and returns the replaced names. Linears whose in_features is not
  a multiple of 16 are SKIPPED with a logged warning (the NVFP4 GEMMs need whole 16-element
  blocks along K; the FP8 GEMMs, cuBLAS's 16-element alignment).
- LoRA: peft's ``lora_A`` / ``lora_B`` linears are excluded by default, so quantizing a model
  that already carries a LoRA adapter quantizes each wrapped ``base_layer``, keeps the
  adapter in 16/32-bit (QLoRA style) and turns the wrapper into a QuantizedLoraLinear (later
  adapters stay fp32, merging is refused); DoRA / lora_bias adapters are refused (they need
  the base weight in full precision). FP8Linear passes gradients through to its input.
  ``save_quantized`` refuses a model with adapters: save them with ``save_lora``.
- :func:`save_quantized` / :func:`load_quantized`: one safetensors file with the whole
  state dict (quantized layers in the ModelOpt / vLLM layouts) and metadata naming the format
  (``dcgen-nvfp4``, ``dcgen-fp8``, or ``dcgen-quant`` when both kinds are present), mode,
  rank and every quantized module (with its ``kind``); loading swaps the layers of a fresh
  model first.
- :func:`quality_report`: per-layer and end-to-end error of a quantized model vs the original.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from dcgen._checks import is_int
from dcgen._compiled import sees_through_compile, unwrap_compiled
from dcgen._files import atomic_write, safetensors_ready
from dcgen.ops.quantize_fp8 import check_granularity

from .fp8 import check_fast_accum
from .fp8_linear import FP8Linear, share_input_quantization
from .linear import NVFP4Linear, check_mode, smoothing_factors
from .lora import adopt_quantized_bases, check_lora_before_quantize
from .nvfp4 import BLOCK

logger = logging.getLogger(__name__)

FORMAT = "dcgen-nvfp4"
FORMAT_FP8 = "dcgen-fp8"
FORMAT_MIXED = "dcgen-quant"
FORMATS = (FORMAT, FORMAT_FP8, FORMAT_MIXED)
FORMAT_VERSION = "1"
QUANTIZED_TYPES = (NVFP4Linear, FP8Linear)

# Kept in 16-bit by default: embedders facing the latent / text / time and AdaLN modulation
# linears (norm1.linear, norm1_context.linear, single blocks' norm.linear, norm_out.linear).
# The DiT's output head is kept by identity (``keep_latent_layers``), not by a name pattern:
# the head is called `proj_out`, but so is every FLUX single block's output projection, which
# IS quantized, also when a block is quantized on its own.
DEFAULT_EXCLUDE = (
    r"^x_embedder$",
    r"^context_embedder$",
    r"(^|\.)patch_embed(\.|$)",
    r"(^|\.)(time_text_embed|time_embed|timestep_embedder|guidance_embedder)(\.|$)",
    r"(^|\.)(text_embedder|caption_projection)(\.|$)",
    r"(^|\.)norm[^.]*\.linear$",
    r"(^|\.)norm_out(\.|$)",
    # peft LoRA adapters (lora_A / lora_B / lora_embedding_*): kept in 16/32-bit.
    r"(^|\.)lora_(A|B|embedding_A|embedding_B|magnitude_vector)(\.|$)",
)


def _check_patterns(owner: str, include: tuple[str, ...], exclude: tuple[str, ...]) -> None:
    for name, patterns in (("include", include), ("exclude", exclude)):
        if isinstance(patterns, str):  # iterating it would make each character a pattern
            raise TypeError(
                f"{owner}: expected {name} as a tuple of regex strings, got the string "
                f"{patterns!r} (write ({patterns!r},))"
            )
    for pat in (*include, *exclude):
        if not isinstance(pat, str):
            raise TypeError(f"{owner}: expected regex strings, got {type(pat).__name__} {pat!r}")
        try:
            re.compile(pat)
        except re.error as e:
            raise ValueError(f"{owner}: invalid regex {pat!r}: {e}") from e


def _check_flag(owner: str, name: str, value: object) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{owner}: expected {name} True or False, got {value!r}")


def _matches(name: str, include: tuple[str, ...], exclude: tuple[str, ...]) -> bool:
    return any(re.search(p, name) for p in include) and not any(re.search(p, name) for p in exclude)


@dataclass(frozen=True)
class NVFP4Config:
    """What to quantize and how. ``include`` / ``exclude``: regexes matched with ``re.search``
    on the module's qualified name; a Linear is quantized when some include matches and no
    exclude does. ``smoothing_alpha``: when set, :func:`quantize_` needs a calibration
    callable and folds ``s_j = max|x_j|^a / max|W_j|^(1-a)`` into each weight.
    ``keep_latent_layers``: a whole DiT's latent embedder and output head (found through its
    adapter, whatever their names) stay in 16-bit."""

    mode: str = "w4a16"
    rank: int = 0
    include: tuple[str, ...] = (r".*",)
    exclude: tuple[str, ...] = DEFAULT_EXCLUDE
    smoothing_alpha: float | None = None
    keep_latent_layers: bool = True

    def __post_init__(self) -> None:
        check_mode(self.mode)
        if not is_int(self.rank) or self.rank < 0:
            raise ValueError(f"NVFP4Config: expected rank >= 0, got {self.rank!r}")
        alpha = self.smoothing_alpha
        if alpha is not None and (
            not isinstance(alpha, int | float) or isinstance(alpha, bool) or not 0.0 <= alpha <= 1.0
        ):
            raise ValueError(
                f"NVFP4Config: expected smoothing_alpha in [0, 1] or None, "
                f"got {self.smoothing_alpha}"
            )
        _check_patterns("NVFP4Config", self.include, self.exclude)
        _check_flag("NVFP4Config", "keep_latent_layers", self.keep_latent_layers)

    def matches(self, name: str) -> bool:
        return _matches(name, self.include, self.exclude)


@dataclass(frozen=True)
class FP8Config:
    """FP8 (E4M3) W8A8. ``granularity``: ``"row"`` (a scale per weight output row and per
    activation token) or ``"block128"`` (per 1x128 block along K, weight and activation).
    Activation scales are dynamic (computed on every call). ``include`` / ``exclude`` as in
    :class:`NVFP4Config` (same defaults), ``keep_latent_layers`` too. ``fast_accum`` (row
    scales only): the GEMMs accumulate in the FP8 tensor cores' own precision instead of
    promoting to fp32 every few K steps (faster on Hopper, a larger summation error; the quality
    report measures it; :mod:`dcgen.quant.fp8`)."""

    granularity: str = "row"
    include: tuple[str, ...] = (r".*",)
    exclude: tuple[str, ...] = DEFAULT_EXCLUDE
    keep_latent_layers: bool = True
    fast_accum: bool = False

    def __post_init__(self) -> None:
        check_granularity(self.granularity)
        _check_patterns("FP8Config", self.include, self.exclude)
        _check_flag("FP8Config", "keep_latent_layers", self.keep_latent_layers)
        _check_flag("FP8Config", "fast_accum", self.fast_accum)
        check_fast_accum(self.granularity, self.fast_accum)

    def matches(self, name: str) -> bool:
        return _matches(name, self.include, self.exclude)


QuantConfig = NVFP4Config | FP8Config


def _shared_layers(model: nn.Module) -> dict[int, tuple[nn.Module, list[str]]]:
    """Modules registered under more than one name (tied layers), by id, with every name:
    one scan of the model for all of a swap's _set_module calls (named_modules lists such a
    module once)."""
    names: dict[int, tuple[nn.Module, list[str]]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        names.setdefault(id(module), (module, []))[1].append(name)
    return {key: entry for key, entry in names.items() if len(entry[1]) > 1}


def _set_module(
    model: nn.Module,
    name: str,
    module: nn.Module,
    shared: dict[int, tuple[nn.Module, list[str]]],
) -> None:
    """Put ``module`` where ``name`` is, and under every other name of the same layer
    (``shared``: ``_shared_layers(model)``), so a tied layer stays one layer."""
    old = model.get_submodule(name)
    entry = shared.get(id(old))
    for alias in entry[1] if entry is not None and entry[0] is old else [name]:
        parent_name, _, child = alias.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, module)


def _latent_layer_names(model: nn.Module) -> tuple[str, ...]:
    """Qualified names of a DiT's latent-facing embedder and output head (what DC-Gen replaces
    and trains in full precision); () for a module no adapter knows, such as a single block."""
    from dcgen.adapters import adapter_for

    try:
        layers = adapter_for(model).latent_layers()
    except TypeError:
        return ()
    wanted = [layers.embedder, layers.head]
    return tuple(n for n, m in model.named_modules() if any(m is w for w in wanted))


def _targets(model: nn.Module, config: QuantConfig, name_prefix: str = "") -> list[str]:
    kept = _latent_layer_names(model) if config.keep_latent_layers else ()
    names = []
    if name_prefix and not name_prefix.endswith("."):
        name_prefix += "."  # "blocks.0" + "norm.linear": the patterns anchor on the dots
    for name, mod in model.named_modules():
        if type(mod) is not nn.Linear or not config.matches(name_prefix + name):
            continue
        if any(name == k or name.startswith(k + ".") for k in kept):
            continue
        if mod.in_features % BLOCK:
            logger.warning(
                "quantize_: skipping %s: in_features %d is not a multiple of %d",
                name,
                mod.in_features,
                BLOCK,
            )
            continue
        names.append(name)
    return names


def _check_model(name: str, model: object) -> None:
    """accelerate's check and wording (a pipeline gets the pipe.transformer hint); imported
    on use: dcgen.attention imports this package's layers."""
    from dcgen.attention.install import _check_model as check

    check(name, model)


def _check_calibration(calibrate: object, activation_amax: object) -> None:
    """``calibrate`` a callable and ``activation_amax`` a Mapping[str, Tensor], where given: a
    list as activation_amax had every layer quantized without smoothing, warning per layer."""
    if calibrate is not None and not callable(calibrate):
        raise TypeError(
            "quantize_: calibrate: expected a callable run as calibrate(model), got "
            f"{type(calibrate).__name__} {calibrate!r}"
        )
    if activation_amax is None:
        return
    if not isinstance(activation_amax, Mapping):
        raise TypeError(
            "quantize_: activation_amax: expected a Mapping[str, Tensor] (module name -> "
            f"per-channel max |x|), got {type(activation_amax).__name__}"
        )
    for name, amax in activation_amax.items():
        if not isinstance(name, str):
            raise TypeError(
                f"quantize_: activation_amax: expected str keys (module names), got "
                f"{type(name).__name__} {name!r}"
            )
        if not isinstance(amax, torch.Tensor):
            raise TypeError(
                f"quantize_: activation_amax[{name!r}]: expected a tensor (per-channel max "
                f"|x|), got {type(amax).__name__}"
            )


def _linear_input(args: tuple, kwargs: dict) -> torch.Tensor:
    """A linear's input as its forward hook sees it: positional, or ``input=`` by keyword."""
    return args[0] if args else kwargs["input"]


@torch.no_grad()
def _activation_amax(
    model: nn.Module, names: Sequence[str], calibrate: Callable[[nn.Module], Any]
) -> dict[str, torch.Tensor]:
    stats: dict[str, torch.Tensor] = {}

    def hook(name: str):  # noqa: ANN202
        def fn(mod: nn.Module, args: tuple, kwargs: dict, out: torch.Tensor) -> None:
            x = _linear_input(args, kwargs).detach()
            a = x.float().abs().reshape(-1, x.shape[-1]).amax(dim=0)  # 1-D inputs too
            stats[name] = torch.maximum(stats[name], a) if name in stats else a

        return fn

    handles = [
        model.get_submodule(n).register_forward_hook(hook(n), with_kwargs=True) for n in names
    ]
    try:
        calibrate(model)
    finally:
        for h in handles:
            h.remove()
    return stats


@torch.no_grad()
@sees_through_compile
def quantize_(
    model: nn.Module,
    config: QuantConfig | None = None,
    calibrate: Callable[[nn.Module], Any] | None = None,
    *,
    name_prefix: str = "",
    activation_amax: Mapping[str, torch.Tensor] | None = None,
) -> list[str]:
    """Replace matching Linears of ``model`` by :class:`NVFP4Linear` (NVFP4Config, the
    default) or :class:`FP8Linear` (FP8Config) in place; returns their names.
    ``calibrate(model)`` runs representative inputs (needed for NVFP4 smoothing).

    For quantizing a model part by part: ``name_prefix`` is ``model``'s qualified name in
    the whole model (``"blocks.0"``, with or without the trailing dot; include / exclude
    patterns match the whole-model names), and
    ``activation_amax`` (name within ``model`` -> per-channel max |x|, as measured on the
    16-bit model) replaces ``calibrate``."""
    _check_model("quantize_", model)
    config = config or NVFP4Config()
    if not isinstance(config, NVFP4Config | FP8Config):
        raise TypeError(
            f"quantize_: expected an NVFP4Config or FP8Config, got {type(config).__name__}"
        )
    if isinstance(config, FP8Config):
        if calibrate is not None or activation_amax is not None:
            raise ValueError(
                "quantize_: FP8Config scales activations dynamically; got calibrate or activation_amax"
            )
        names = _targets(model, config, name_prefix)
        check_lora_before_quantize(model, names)
        shared = _shared_layers(model)
        for name in names:
            lin = model.get_submodule(name)
            q = FP8Linear.from_linear(
                lin, config.granularity, _kept_dtype(lin), fast_accum=config.fast_accum
            )
            _set_module(model, name, q, shared)
        adopt_quantized_bases(model, names)
        share_input_quantization(model)  # one quantize pass per input read by several linears
        logger.info("quantize_: %d linears to FP8 (%s)", len(names), config.granularity)
        return names
    _check_calibration(calibrate, activation_amax)
    names = _targets(model, config, name_prefix)
    check_lora_before_quantize(model, names)
    stats: Mapping[str, torch.Tensor] = {}
    if config.smoothing_alpha is not None:
        if activation_amax is not None:
            stats = activation_amax
        elif calibrate is None:
            raise ValueError(
                "quantize_: smoothing_alpha is set, expected a calibrate(model) callable"
            )
        else:
            stats = _activation_amax(model, names, calibrate)
    shared = _shared_layers(model)
    for name in names:
        lin = model.get_submodule(name)
        smooth = None
        if config.smoothing_alpha is not None:
            if name not in stats:
                logger.warning("quantize_: %s saw no calibration input; no smoothing", name)
            else:
                smooth = smoothing_factors(stats[name], lin.weight, config.smoothing_alpha)
        rank = min(config.rank, lin.in_features, lin.out_features)
        q = NVFP4Linear.from_linear(lin, config.mode, rank, smooth, _kept_dtype(lin))
        _set_module(model, name, q, shared)
    adopt_quantized_bases(model, names)
    logger.info("quantize_: %d linears to NVFP4 (%s)", len(names), config.mode)
    return names


@sees_through_compile
def quantized_modules(model: nn.Module) -> dict[str, NVFP4Linear | FP8Linear]:
    """Every NVFP4Linear / FP8Linear of ``model`` by qualified name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, QUANTIZED_TYPES)}


def _layer_spec(m: NVFP4Linear | FP8Linear) -> dict:
    if isinstance(m, FP8Linear):
        spec = {"kind": "fp8", "granularity": m.granularity, "bias": m.bias is not None}
        return spec | ({"fast_accum": True} if m.fast_accum else {})
    return {
        "kind": "nvfp4",
        "mode": m.mode,
        "rank": m.rank,
        "smooth": m.smooth is not None,
        "bias": m.bias is not None,
    }


def _mode(m: NVFP4Linear | FP8Linear) -> str:
    return m.mode if isinstance(m, NVFP4Linear) else f"fp8-{m.granularity}"


@sees_through_compile
def save_quantized(model: nn.Module, path: str | Path) -> None:
    """Write the whole state dict (quantized layers in the ModelOpt / vLLM layouts) to
    safetensors, with metadata: format, format_version, mode (``w4a16`` / ``w4a4`` /
    ``fp8-row`` / ``fp8-block128``, comma-joined), rank and ``modules`` (JSON: name ->
    {kind: "nvfp4", mode, rank, smooth, bias} or {kind: "fp8", granularity, bias} plus
    ``fast_accum: true`` where a layer has it)."""
    _check_model("save_quantized", model)
    mods = quantized_modules(model)
    if not mods:
        raise ValueError(
            "save_quantized: expected a model with FP8Linear or NVFP4Linear layers, found none"
        )
    from peft.tuners.tuners_utils import BaseTunerLayer

    wrapped = [n for n, m in model.named_modules() if isinstance(m, BaseTunerLayer)]
    if wrapped:
        # Its keys would name peft's base_layer, which a fresh model (load_quantized) lacks.
        raise ValueError(
            f"save_quantized: expected a model without LoRA adapters, got peft layers at "
            f"{wrapped[:3]}{' ...' if len(wrapped) > 3 else ''}: save the adapter with "
            "dcgen.train.lora.save_lora, remove it (transformer.unload_lora()), then save the "
            "quantized model; load_quantized + load_lora rebuild it"
        )
    layers = {n: _layer_spec(m) for n, m in mods.items()}
    kinds = {spec["kind"] for spec in layers.values()}
    fmt = FORMAT_MIXED if len(kinds) > 1 else (FORMAT_FP8 if kinds == {"fp8"} else FORMAT)
    modes = sorted({_mode(m) for m in mods.values()})
    ranks = sorted({getattr(m, "rank", 0) for m in mods.values()})
    meta = {
        "format": fmt,
        "format_version": FORMAT_VERSION,
        "mode": ",".join(modes),
        "rank": ",".join(map(str, ranks)),
        "modules": json.dumps(layers),
    }
    tensors = safetensors_ready(model.state_dict().items())
    # Written next to the target and renamed: an interrupted save never leaves a truncated
    # file under the checkpoint's name.
    atomic_write(Path(path), lambda tmp: save_file(tensors, tmp, metadata=meta))


def read_metadata(path: str | Path) -> dict[str, str]:
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        if meta.get("format") not in FORMATS:
            # A checkpoint quantized elsewhere (BFL's, in FLUX's original key names) is
            # converted once, not read here.
            keys = list(f.keys())
            bfl = any(k.startswith(("double_blocks.", "single_blocks.")) for k in keys) and any(
                k.endswith(".weight_scale") for k in keys
            )
            hint = (
                "; it looks like a Black Forest Labs quantized FLUX checkpoint: convert it with "
                "`dcgen convert-quantized FILE --pipeline DIR --out OUT`"
                if bfl
                else ""
            )
            raise ValueError(
                f"load_quantized: expected a file of format {' / '.join(FORMATS)}, "
                f"got format {meta.get('format')!r} in {path}{hint}"
            )
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"load_quantized: expected format_version {FORMAT_VERSION!r}, "
            f"got {meta.get('format_version')!r} in {path}"
        )
    return meta


def _kept_dtype(lin: nn.Module) -> torch.dtype:
    """The dtype a quantized layer keeps its bias and low-rank factors in: the linear's own
    (they were made bf16 whatever the model: an fp32 model's biases rounded)."""
    dtype = lin.weight.dtype
    return dtype if dtype in (torch.float32, torch.float16, torch.bfloat16) else torch.bfloat16


# The fields each kind of layer is rebuilt from (save_quantized writes them all).
_SPEC_FIELDS = {"fp8": ("bias", "granularity"), "nvfp4": ("bias", "mode", "rank", "smooth")}


def _module_specs(meta: Mapping[str, str], path: str | Path) -> dict[str, dict]:
    """The file's table of quantized layers, each entry checked for the fields its kind is
    rebuilt from (a bare KeyError named neither the file nor the layer)."""
    if "modules" not in meta:
        raise ValueError(f"load_quantized: {path} has no 'modules' table in its metadata")
    try:
        layers = json.loads(meta["modules"])
    except ValueError:
        layers = None
    if not isinstance(layers, dict) or not all(isinstance(v, dict) for v in layers.values()):
        raise ValueError(
            f"load_quantized: {path}'s 'modules' table: expected a JSON object of "
            f"{{layer name: {{field: value}}}}, got {meta['modules'][:80]!r}"
        )
    for name, spec in layers.items():
        kind = spec.get("kind", "nvfp4")  # files written before FP8 existed have no kind
        missing = [f for f in _SPEC_FIELDS.get(kind, ()) if f not in spec]
        if missing:
            raise ValueError(
                f"load_quantized: {path}, module {name}: missing {missing} (a {kind} layer is "
                f"rebuilt from {list(_SPEC_FIELDS[kind])})"
            )
    return layers


def _loaded_layer_target(model: nn.Module, name: str) -> nn.Module:
    """The layer of ``model`` that load_quantized replaces for the file's module ``name``."""
    try:
        lin = model.get_submodule(name)
    except AttributeError as e:
        raise ValueError(f"load_quantized: the model has no module {name!r}") from e
    if not isinstance(lin, (nn.Linear, *QUANTIZED_TYPES)):
        raise TypeError(f"load_quantized: expected {name} to be a Linear, got {type(lin).__name__}")
    return lin


def _quantized_layer(
    name: str, spec: dict, lin: nn.Module, state: Mapping[str, torch.Tensor], dev: torch.device
) -> NVFP4Linear | FP8Linear:
    """An empty NVFP4Linear / FP8Linear of ``lin``'s shape, as the metadata ``spec`` says."""
    # the 16-bit parts (bias, low-rank factors) in the dtype they were saved in
    stored = state.get(f"{name}.bias", state.get(f"{name}.lora_down"))
    dtype = stored.dtype if stored is not None else torch.bfloat16
    kind = spec.get("kind", "nvfp4")  # files written before FP8 existed have no kind
    if kind == "fp8":
        return FP8Linear(
            lin.in_features,
            lin.out_features,
            bias=spec["bias"],
            granularity=spec["granularity"],
            dtype=dtype,
            device=dev,
            fast_accum=spec.get("fast_accum", False),
        )
    if kind == "nvfp4":
        return NVFP4Linear(
            lin.in_features,
            lin.out_features,
            bias=spec["bias"],
            mode=spec["mode"],
            rank=spec["rank"],
            smooth=spec["smooth"],
            dtype=dtype,
            device=dev,
        )
    raise ValueError(f"load_quantized: expected kind 'nvfp4' or 'fp8' for {name}, got {kind!r}")


def _check_loaded_state(
    expected: Mapping[str, torch.Size], state: Mapping[str, torch.Tensor], path: str | Path
) -> None:
    """The file's tensors against the converted model's (names and shapes; the dtype is cast
    by load_state_dict, as before)."""
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        raise ValueError(
            f"load_quantized: state dict mismatch with {path}: missing {missing[:8]}, "
            f"unexpected {unexpected[:8]}"
        )
    for key, shape in expected.items():
        if state[key].shape != shape:
            raise ValueError(
                f"load_quantized: {path} does not fit the model: {key}: the model expects "
                f"{tuple(shape)}, the file has {tuple(state[key].shape)}"
            )


@torch.no_grad()
@sees_through_compile
def load_quantized(model: nn.Module, path: str | Path) -> list[str]:
    """Swap the layers named in ``path``'s metadata for NVFP4Linear / FP8Linear and load every
    tensor (strict). ``model`` is a freshly built (unquantized) model of the same config."""
    _check_model("load_quantized", model)
    meta = read_metadata(path)
    layers = _module_specs(meta, path)
    state = load_file(str(path), device=str(next(model.parameters()).device))
    shared = _shared_layers(model)
    # Every layer is built and the file checked against the converted model's state dict first,
    # on the meta device (no memory): a file that does not fit (another config, another model)
    # is refused before the first swap, instead of by load_state_dict with the model half
    # converted.
    swapped: dict[str, dict[str, torch.Tensor]] = {}  # every name of a layer: its new tensors
    targets = {name: _loaded_layer_target(model, name) for name in layers}
    for name, spec in layers.items():
        lin = targets[name]
        fresh = _quantized_layer(name, spec, lin, state, torch.device("meta")).state_dict()
        for alias in shared.get(id(lin), (None, [name]))[1]:
            swapped[alias] = fresh
    # the swapped layers are leaves: a key's module is all but its last part
    expected = {
        k: v.shape for k, v in model.state_dict().items() if k.rpartition(".")[0] not in swapped
    }
    for alias, fresh in swapped.items():
        expected |= {f"{alias}.{k}": v.shape for k, v in fresh.items()}
    _check_loaded_state(expected, state, path)
    for name, spec in layers.items():
        # popped: once swapped out, each full-precision layer is freed before the next one is
        # built (all of them lived until the end, beside every new layer)
        lin = targets.pop(name)
        dev = next(lin.buffers(), lin.weight).device
        _set_module(model, name, _quantized_layer(name, spec, lin, state, dev), shared)
        del lin
    model.load_state_dict(state)  # names and shapes checked above
    share_input_quantization(model)
    return list(layers)


def _first_tensor(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "sample"):
        return out.sample
    if isinstance(out, tuple | list):
        return _first_tensor(out[0])
    if isinstance(out, dict):
        return _first_tensor(next(iter(out.values())))
    raise TypeError(f"quality_report: cannot find a tensor in the output {type(out).__name__}")


def _errors(ref: torch.Tensor, got: torch.Tensor) -> dict[str, float]:
    r, g = ref.detach().float().flatten(), got.detach().float().flatten()
    denom = r.norm().clamp_min(1e-12)
    cos = torch.nn.functional.cosine_similarity(r, g, dim=0, eps=1e-12)
    return {"rel_err": float((g - r).norm() / denom), "cosine": float(cos)}


@torch.no_grad()
def quality_report(
    model_fp: nn.Module, model_q: nn.Module, inputs_fn: Callable[[], Any]
) -> dict[str, Any]:
    """Compare ``model_q`` to ``model_fp`` on ``inputs_fn()`` (a dict of kwargs, a tuple of
    args, one tensor, or an object whose ``run(model)`` makes the call; called once, the same
    inputs go to both models).

    Returns ``{"layers": {name: {"rel_err", "cosine", "rel_err_in_model", "cosine_in_model"}},
    "output": {"rel_err", "cosine"}, "unreached": [names]}``: ``rel_err = ||y_q - y_fp|| /
    ||y_fp||``; ``unreached`` lists the quantized layers whose forward did not run in one of the
    two models (their error is only in the output's). The plain
    pair isolates the layer (the quantized layer fed the fp model's input to that layer); the
    ``_in_model`` pair compares the two models' outputs at that layer (errors accumulated
    upstream included).
    """
    # a torch.compile wrapper prefixes every module name: compare the modules it wraps
    model_fp, model_q = unwrap_compiled(model_fp), unwrap_compiled(model_q)
    qmods = quantized_modules(model_q)
    fp_mods = dict(model_fp.named_modules())
    missing = [n for n in qmods if n not in fp_mods]
    if missing:
        raise ValueError(f"quality_report: model_fp has no modules {missing[:8]}")
    fp_io: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    q_out: dict[str, torch.Tensor] = {}

    def fp_hook(name: str):  # noqa: ANN202
        def fn(mod: nn.Module, args: tuple, kwargs: dict, out: torch.Tensor) -> None:
            fp_io.setdefault(name, (_linear_input(args, kwargs).detach(), out.detach()))

        return fn

    def q_hook(name: str):  # noqa: ANN202
        def fn(mod: nn.Module, args: tuple, out: torch.Tensor) -> None:
            q_out.setdefault(name, out.detach())

        return fn

    # the inputs first: hooks registered before a failing inputs_fn() stayed on both models
    inputs = inputs_fn()
    handles = [fp_mods[n].register_forward_hook(fp_hook(n), with_kwargs=True) for n in qmods]
    handles += [m.register_forward_hook(q_hook(n)) for n, m in qmods.items()]

    def call(model: nn.Module) -> torch.Tensor:
        if callable(getattr(inputs, "run", None)):  # a recorded call (pipeline_quant)
            return _first_tensor(inputs.run(model))
        if isinstance(inputs, dict):
            return _first_tensor(model(**inputs))
        if isinstance(inputs, tuple | list):
            return _first_tensor(model(*inputs))
        return _first_tensor(model(inputs))

    try:
        y_fp = call(model_fp)
        y_q = call(model_q)
    finally:
        for h in handles:
            h.remove()
    layers = {}
    unreached = []
    for name, mod in qmods.items():
        if name not in fp_io or name not in q_out:
            unreached.append(name)
            continue
        x_fp, o_fp = fp_io[name]
        local = _errors(o_fp, mod(x_fp))
        in_model = _errors(o_fp, q_out[name])
        layers[name] = {
            **local,
            "rel_err_in_model": in_model["rel_err"],
            "cosine_in_model": in_model["cosine"],
        }
    if unreached:
        logger.warning(
            "quality_report: %d quantized layers never ran their forward (first: %s); their "
            "error shows only in the output's",
            len(unreached),
            unreached[0],
        )
    return {"layers": layers, "output": _errors(y_fp, y_q), "unreached": unreached}
