"""One configuration object for the three DC-Gen post-training stages (docs/method.md section 1).

A run is described by a :class:`TrainConfig`: which stage, which transformer and latent cache,
where to write, and the optimisation settings. It is read from TOML (always available through
``tomllib``) or YAML (when pyyaml is installed), can be overridden from the command line with
``key=value`` strings, and is written back to ``out_dir/config.json`` so a run documents itself.
``validate()`` checks every field and names the offending one in the error.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from dcgen.sampling.shift import SHIFT_RULES

try:
    import tomllib
except ImportError:  # Python 3.10: the backport (a dependency there, see pyproject.toml)
    import tomli as tomllib  # type: ignore[no-redef]

logger = logging.getLogger(__name__)

__all__ = ["STAGES", "ConfigError", "TrainConfig", "load_config", "read_config_file"]

#: stage names in pipeline order: 1 embedder alignment, 2 output layer, 3 LoRA fine-tuning
STAGES: tuple[str, ...] = ("align", "output", "finetune")
_STAGE_ALIASES = {
    "1": "align",
    "2": "output",
    "3": "finetune",
    "stage1": "align",
    "stage2": "output",
    "stage3": "finetune",
}
_REQUIRED = ("stage", "transformer", "cache_dir", "out_dir")


#: Settings a resumed run may change: its length and how it is logged, checkpointed, sampled
#: and reported. Every other setting must match the run being continued.
RESUMABLE_CHANGES = frozenset(
    {
        "steps",
        "resume",
        "device",
        "checkpoint_every",
        "keep_checkpoints",
        "log_every",
        "sample_every",
        "sample_steps",
        "sample_count",
        "gradient_checkpointing",  # recomputes activations; the gradients are the same
        "align_feature_layers",  # the stage-1 report's depths
        "align_eval_sigma",  # the stage-1 report's noise level
        "extra",
    }
)
PATH_FIELDS = ("transformer", "cache_dir", "out_dir", "dcae", "latent_layers", "null_text")


class ConfigError(ValueError):
    """A configuration that cannot run; the message names the field."""


@dataclass
class TrainConfig:
    stage: str
    transformer: str
    cache_dir: str
    out_dir: str
    dcae: str | None = None
    latent_layers: str | None = None
    lora_rank: int = 64
    lora_alpha: float | None = None
    lora_targets: str | None = None
    steps: int = 1000
    batch_size: int = 4
    lr: float = 1e-4
    weight_decay: float = 0.0
    warmup_steps: int = 0
    grad_clip: float = 1.0
    seed: int = 0
    mixed_precision: str = "bf16"
    gradient_checkpointing: bool = False
    ema_decay: float | None = None
    # Ramp the EMA decay up over the first steps (dcgen.train.ema.warmup_decay), as diffusers'
    # EMAModel does; false: ema_decay from the first step.
    ema_warmup: bool = True
    guidance_range: tuple[float, float] | None = (1.0, 5.0)
    # Stages 2-3: the fraction of samples whose text is replaced by the empty prompt's, so the
    # unconditional prediction CFG uses (SANA) is trained too; null_text: its embeddings
    # (default: <cache_dir>/null_text.safetensors, written by precompute). dcgen.train.null_text
    caption_dropout: float = 0.0
    null_text: str | None = None
    timestep_sampling: str = "logit_normal"
    shift_rule: str = "flux"
    align_downsample: str = "avg"
    align_ridge_l2: float = 1e-3
    align_sgd_steps: int = 200
    align_feature_layers: tuple[int, ...] = (0, 1)
    # Stage-1 head: "zero" (stage 2 trains it) or "ridge" (closed-form fit of the flow velocity
    # from the frozen DiT's last hidden states, so a stage-1 model already samples images).
    align_head: str = "zero"
    align_head_samples: int = 1024  # training samples streamed through the ridge head fit
    # Image RoPE positions of the new model: "grid" = (row, col) on the DC-AE token grid (the
    # released DC-Gen models); "base" = spaced by the downsample factor so the new grid spans
    # the base grid's position range (FLUX-family only; matters when the base model has never
    # seen the smaller grid, e.g. a single-resolution base).
    align_positions: str = "grid"
    train_embedder_in_stage2: bool = True
    checkpoint_every: int = 100
    keep_checkpoints: int = 3
    log_every: int = 10
    sample_every: int | None = None
    sample_steps: int = 4  # sampling steps per sample grid (see dcgen.train.samples)
    sample_count: int = 4  # images per sample grid (fixed seeds, first prompts of the data)
    parallel: str = "ddp"  # multi-process strategy: "ddp" or "fsdp" (FSDP2 fully_shard)
    # Extensions beyond the agreed surface (all optional).
    device: str | None = None  # None: cuda when available (cuda:LOCAL_RANK under torchrun)
    resume: bool = True  # continue from the newest checkpoint in out_dir/checkpoints
    shift_constant: float = 1.0  # shift factor for shift_rule = "constant"
    align_eval_sigma: float = 0.0  # noise level of the stage-1 feature-distance report
    extra: dict[str, Any] = field(default_factory=dict)  # free-form, stored in config.json

    # -- construction ----------------------------------------------------------------------------

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TrainConfig:
        """Build and validate; unknown keys and missing required keys raise ConfigError."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown config field(s) {unknown}; known fields: {sorted(known)}")
        missing = [k for k in _REQUIRED if data.get(k) in (None, "")]
        if missing:
            raise ConfigError(f"missing required config field(s) {missing}")
        kwargs = {k: _coerce(k, v) for k, v in data.items()}
        cfg = cls(**kwargs)
        cfg.validate()
        return cfg

    @classmethod
    def from_file(cls, path: str | Path) -> TrainConfig:
        """TOML (``.toml``) or YAML (``.yaml`` / ``.yml``, needs pyyaml) or JSON. A top-level
        ``[train]`` table, when present, is used as the config."""
        path = Path(path)
        data = read_config_file(path)
        if "train" in data and isinstance(data["train"], dict):
            data = data["train"]
        try:
            return cls.from_dict(data)
        except ConfigError as err:
            raise ConfigError(f"{path}: {err}") from err

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (tuples become lists); ``from_dict(to_dict())`` round-trips."""
        out = dataclasses.asdict(self)
        for k, v in out.items():
            if isinstance(v, tuple):
                out[k] = list(v)
        return out

    def changed_for_resume(self, earlier: Mapping[str, Any]) -> list[str]:
        """The settings in which this config differs from ``earlier`` (the ``config.json`` of
        the run whose checkpoints it would continue) that a resumed run cannot change: they
        shaped the steps already taken (data order, schedule, loss, model), so continuing under
        other values would give a run that matches neither. ``steps`` and the bookkeeping
        settings (:data:`RESUMABLE_CHANGES`) may change; paths compare as resolved paths;
        fields ``earlier`` lacks (a config from an older dcgen) are not compared."""
        now = json.loads(json.dumps(self.to_dict()))
        out = []
        for name, value in now.items():
            if name in RESUMABLE_CHANGES or name not in earlier:
                continue
            before = earlier[name]
            if name in PATH_FIELDS and isinstance(value, str) and isinstance(before, str):
                same = Path(value).expanduser().resolve() == Path(before).expanduser().resolve()
            else:
                same = value == before
            if not same:
                out.append(f"{name}: {before!r} then, {value!r} now")
        if (
            earlier.get("ema_decay") is not None
            and "ema_warmup" not in earlier
            and now.get("ema_warmup")
        ):
            # A dcgen from before EMA warmup averaged at ema_decay from the first step: going
            # on with warmup would switch the decay mid-run.
            out.append("ema_warmup: absent then (no warmup), True now (continue with false)")
        return out

    def with_overrides(self, overrides: Iterable[str]) -> TrainConfig:
        """A copy with ``"key=value"`` overrides applied; values are parsed as JSON when they
        parse (``steps=10``, ``guidance_range=[1,4]``, ``ema_decay=null``), else as strings."""
        data = self.to_dict()
        for item in overrides:
            key, sep, raw = item.partition("=")
            key = key.strip()
            if not sep or not key:
                raise ConfigError(f"override {item!r}: expected key=value")
            if key not in data:
                raise ConfigError(f"override {item!r}: unknown config field {key!r}")
            try:
                value = json.loads(raw)
            except ValueError:
                value = raw
            data[key] = value
        return TrainConfig.from_dict(data)

    # -- checks ----------------------------------------------------------------------------------

    def validate(self) -> TrainConfig:
        """Raise ConfigError naming the first bad field; normalises stage aliases ("1", ...)."""
        self.stage = _STAGE_ALIASES.get(str(self.stage).lower(), str(self.stage).lower())
        if self.stage not in STAGES:
            raise ConfigError(f"stage: expected one of {STAGES} (or 1/2/3), got {self.stage!r}")
        for name in PATH_FIELDS:
            value = getattr(self, name)
            if isinstance(value, str) and value.startswith("~"):
                # a shell expands ~ on a command line, a config file's value arrives as written
                # (cache_dir="~/x" was not found, out_dir="~/runs" made a folder named ~)
                setattr(self, name, os.path.expanduser(value))
        for name in _REQUIRED[1:]:
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise ConfigError(f"{name}: expected a non-empty path, got {getattr(self, name)!r}")
        positive = (
            "steps",
            "batch_size",
            "lora_rank",
            "checkpoint_every",
            "keep_checkpoints",
            "log_every",
            "sample_steps",
            "sample_count",
        )
        for name in positive:
            value = getattr(self, name)
            if not _is_int(value) or value < 1:
                raise ConfigError(f"{name}: expected a positive integer, got {value!r}")
        for name in ("warmup_steps", "align_sgd_steps", "seed"):
            value = getattr(self, name)
            if not _is_int(value) or value < 0:
                raise ConfigError(f"{name}: expected an integer >= 0, got {value!r}")
        if self.sample_every is not None and (
            not _is_int(self.sample_every) or self.sample_every < 1
        ):
            raise ConfigError(
                f"sample_every: expected a positive integer or null, got {self.sample_every!r}"
            )
        if self.parallel not in ("ddp", "fsdp"):
            raise ConfigError(f"parallel: expected 'ddp' or 'fsdp', got {self.parallel!r}")
        if self.parallel == "fsdp" and self.ema_decay is not None:
            raise ConfigError("ema_decay: not supported with parallel='fsdp' (use 'ddp')")
        _number("lr", self.lr, "> 0", lambda v: v > 0)
        dropout = self.caption_dropout
        _number("caption_dropout", dropout, "in [0, 1)", lambda v: 0 <= v < 1)
        for name in ("weight_decay", "grad_clip", "align_ridge_l2"):
            _number(name, getattr(self, name), ">= 0", lambda v: v >= 0)
        _number("shift_constant", self.shift_constant, "> 0", lambda v: v > 0)
        if self.lora_alpha is not None:
            _number("lora_alpha", self.lora_alpha, "> 0 or null", lambda v: v > 0)
        if self.lora_targets is not None:
            if not isinstance(self.lora_targets, str):
                raise ConfigError(
                    f"lora_targets: expected a regular expression string or null, got "
                    f"{self.lora_targets!r}"
                )
            try:  # a typo fails here, not after a 12B transformer has loaded
                re.compile(self.lora_targets)
            except re.error as err:
                raise ConfigError(
                    f"lora_targets: not a valid regular expression {self.lora_targets!r}: {err}"
                ) from err
        layers = self.align_feature_layers
        if not isinstance(layers, tuple | list) or not all(_is_int(i) and i >= 0 for i in layers):
            raise ConfigError(
                f"align_feature_layers: expected a list of block indices >= 0, got {layers!r}"
            )
        if self.mixed_precision not in ("no", "bf16"):
            raise ConfigError(
                f"mixed_precision: expected 'no' or 'bf16', got {self.mixed_precision!r}"
            )
        if self.ema_decay is not None:
            _number("ema_decay", self.ema_decay, "in (0, 1) or null", lambda v: 0 < v < 1)
        if self.guidance_range is not None:
            g = self.guidance_range
            if (
                not isinstance(g, tuple | list)
                or len(g) != 2
                or not all(_is_number(v) and math.isfinite(v) for v in g)
                or g[1] < g[0]
            ):
                raise ConfigError(
                    f"guidance_range: expected [low, high] numbers with low <= high, or null, "
                    f"got {g!r}"
                )
        if self.timestep_sampling not in ("logit_normal", "uniform"):
            raise ConfigError(
                f"timestep_sampling: expected 'logit_normal' or 'uniform', got "
                f"{self.timestep_sampling!r}"
            )
        if self.shift_rule not in SHIFT_RULES:
            raise ConfigError(f"shift_rule: expected one of {SHIFT_RULES}, got {self.shift_rule!r}")
        if self.align_downsample not in ("avg", "bilinear", "area"):
            raise ConfigError(
                f"align_downsample: expected 'avg', 'bilinear' or 'area', got "
                f"{self.align_downsample!r}"
            )
        if self.align_head not in ("zero", "ridge"):
            raise ConfigError(f"align_head: expected 'zero' or 'ridge', got {self.align_head!r}")
        if self.align_positions not in ("grid", "base"):
            raise ConfigError(
                f"align_positions: expected 'grid' or 'base', got {self.align_positions!r}"
            )
        if not _is_int(self.align_head_samples) or self.align_head_samples < 1:
            raise ConfigError(
                f"align_head_samples: expected a positive integer, got {self.align_head_samples!r}"
            )
        _number("align_eval_sigma", self.align_eval_sigma, "in [0, 1]", lambda v: 0 <= v <= 1)
        for name in ("resume", "gradient_checkpointing", "train_embedder_in_stage2", "ema_warmup"):
            # a string from --set resume=False would be truthy: only a real bool is taken
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name}: expected true or false, got {getattr(self, name)!r}")
        return self


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _number(name: str, value: Any, wanted: str, ok: Callable[[float], bool]) -> None:
    """A finite real number (not a string, bool or null) for which ``ok`` holds; NaN and
    infinity never do (lr = inf trained to NaN weights)."""
    if not _is_number(value) or not math.isfinite(value) or not ok(value):
        raise ConfigError(f"{name}: expected a finite number {wanted}, got {value!r}")


def _coerce(name: str, value: Any) -> Any:
    """TOML/YAML/JSON give lists where the dataclass wants tuples; ints where floats are fine."""
    hint = {f.name: f.type for f in fields(TrainConfig)}[name]
    if isinstance(value, list) and "tuple" in str(hint):
        try:
            return tuple(value)
        except TypeError as err:  # pragma: no cover - lists are always iterable
            raise ConfigError(f"{name}: expected a list, got {value!r}") from err
    return value


def read_config_file(path: str | Path) -> dict[str, Any]:
    """The table of settings in a TOML (``.toml``), YAML (``.yaml`` / ``.yml``, needs pyyaml) or
    JSON file; a file that does not parse, or holds something other than a table, raises
    :class:`ConfigError` naming the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    suffix = path.suffix.lower()
    if suffix not in (".toml", ".yaml", ".yml", ".json"):
        raise ConfigError(f"{path}: expected a .toml, .yaml/.yml or .json config file")
    text = path.read_text(encoding="utf-8")
    if suffix == ".toml":
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as err:
            raise ConfigError(f"{path}: invalid TOML: {err}") from err
    elif suffix == ".json":
        try:
            data = json.loads(text)
        except ValueError as err:
            raise ConfigError(f"{path}: invalid JSON: {err}") from err
    else:
        try:
            import yaml
        except ImportError as err:
            raise ConfigError(f"{path}: YAML configs need pyyaml (pip install pyyaml)") from err
        try:
            data = yaml.safe_load(text) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: invalid YAML: {err}") from err
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a table of settings, got {type(data).__name__}")
    return data


def load_config(path: str | Path) -> TrainConfig:
    """``TrainConfig.from_file(path)``."""
    return TrainConfig.from_file(path)
