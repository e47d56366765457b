"""DC-AE configuration: the fields of diffusers' ``AutoencoderDC`` config.json, validated.

One dataclass describes every published DC-AE (1.0 SANA / in / mix, Lite, 1.5). Field names and
meanings are those of diffusers' ``config.json`` so a file written by either library loads in
the other. Per-stage fields that diffusers accepts as a single string (block types, decoder
norms and activations) are normalised to one entry per stage here; ``to_dict`` writes lists,
which diffusers reads just as well.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from numbers import Real
from typing import Any

logger = logging.getLogger(__name__)

BLOCK_TYPES = ("ResBlock", "EfficientViTBlock")
NORM_TYPES = ("rms_norm", "batch_norm")
# The activations diffusers' get_activation knows (a config naming another one would not load
# in diffusers either).
ACT_FNS = ("relu", "silu", "swish", "gelu", "mish")
DOWNSAMPLE_TYPES = ("pixel_unshuffle", "conv")
UPSAMPLE_TYPES = ("pixel_shuffle", "interpolate")

# Keys diffusers (and the HF hub) add to config.json that are bookkeeping, not architecture.
_BOOKKEEPING_PREFIX = "_"
# Older diffusers releases used one width list for both halves.
_LEGACY_ALIASES = {
    "block_out_channels": ("encoder_block_out_channels", "decoder_block_out_channels")
}


class DCAEConfigError(ValueError):
    """A DC-AE configuration that cannot describe a working model (names the bad field)."""


def _sequence(name: str, value: Any) -> Sequence[Any]:
    """A config field's per-stage list (a list or tuple; a string is not one)."""
    if isinstance(value, str | bytes) or not isinstance(value, Sequence):
        raise DCAEConfigError(f"{name}: expected a list, got {value!r}")
    return value


def _whole(name: str, value: Any) -> int:
    """An integer entry of a config list: ints, and floats with no fraction (JSON 64.0)."""
    if (
        isinstance(value, bool)
        or not isinstance(value, Real)
        or not math.isfinite(value)
        or value != int(value)
    ):
        raise DCAEConfigError(f"{name}: expected whole numbers, got {value!r}")
    return int(value)


def _per_stage(name: str, value: Any, num_stages: int) -> tuple:
    """A string (same for all stages) or a sequence with one entry per stage -> tuple."""
    if isinstance(value, str):
        return (value,) * num_stages
    if not isinstance(value, Sequence):
        raise DCAEConfigError(
            f"{name}: expected a string or a list with one entry per stage, got "
            f"{type(value).__name__}"
        )
    return tuple(value)


@dataclass
class DCAEConfig:
    """Architecture of a DC-AE autoencoder (diffusers ``AutoencoderDC`` config fields).

    Defaults are diffusers' constructor defaults, so a config.json that omits a field means the
    same thing here as in diffusers. Stage 0 is the highest resolution; a depth of 0 at stage 0
    means the encoder's input conv downsamples straight to stage 1's width (and the decoder's
    output conv upsamples from it).
    """

    in_channels: int = 3
    latent_channels: int = 32
    attention_head_dim: int = 32
    encoder_block_types: Sequence[str] | str = "ResBlock"
    decoder_block_types: Sequence[str] | str = "ResBlock"
    encoder_block_out_channels: Sequence[int] = (128, 256, 512, 512, 1024, 1024)
    decoder_block_out_channels: Sequence[int] = (128, 256, 512, 512, 1024, 1024)
    encoder_layers_per_block: Sequence[int] = (2, 2, 2, 3, 3, 3)
    decoder_layers_per_block: Sequence[int] = (3, 3, 3, 3, 3, 3)
    encoder_qkv_multiscales: Sequence[Sequence[int]] = ((), (), (), (5,), (5,), (5,))
    decoder_qkv_multiscales: Sequence[Sequence[int]] = ((), (), (), (5,), (5,), (5,))
    upsample_block_type: str = "pixel_shuffle"
    downsample_block_type: str = "pixel_unshuffle"
    decoder_norm_types: Sequence[str] | str = "rms_norm"
    decoder_act_fns: Sequence[str] | str = "silu"
    encoder_out_shortcut: bool = True
    decoder_in_shortcut: bool = True
    decoder_conv_act_fn: str = "relu"
    scaling_factor: float = 1.0

    def __post_init__(self) -> None:
        self._normalise()
        self.validate()

    # -- construction helpers -------------------------------------------------------------

    def _normalise(self) -> None:
        n_enc = len(_sequence("encoder_block_out_channels", self.encoder_block_out_channels))
        n_dec = len(_sequence("decoder_block_out_channels", self.decoder_block_out_channels))
        for name in ("encoder_block_out_channels", "decoder_block_out_channels",
                     "encoder_layers_per_block", "decoder_layers_per_block"):  # fmt: skip
            setattr(
                self, name, tuple(_whole(name, v) for v in _sequence(name, getattr(self, name)))
            )
        self.encoder_block_types = _per_stage(
            "encoder_block_types", self.encoder_block_types, n_enc
        )
        self.decoder_block_types = _per_stage(
            "decoder_block_types", self.decoder_block_types, n_dec
        )
        self.decoder_norm_types = _per_stage("decoder_norm_types", self.decoder_norm_types, n_dec)
        self.decoder_act_fns = _per_stage("decoder_act_fns", self.decoder_act_fns, n_dec)
        for name in ("encoder_qkv_multiscales", "decoder_qkv_multiscales"):
            stages = _sequence(name, getattr(self, name))
            setattr(self, name, tuple(
                tuple(_whole(name, k) for k in _sequence(name, ks)) for ks in stages
            ))  # fmt: skip
        if isinstance(self.scaling_factor, bool) or not isinstance(self.scaling_factor, Real):
            raise DCAEConfigError(f"scaling_factor: expected a number, got {self.scaling_factor!r}")
        self.scaling_factor = float(self.scaling_factor)

    def validate(self) -> None:
        """Raise DCAEConfigError naming the field when the config cannot build a model."""
        for name in ("in_channels", "latent_channels", "attention_head_dim"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise DCAEConfigError(f"{name}: expected a positive int, got {value!r}")
        for name in ("encoder_out_shortcut", "decoder_in_shortcut"):
            if not isinstance(getattr(self, name), bool):
                raise DCAEConfigError(
                    f"{name}: expected true or false, got {getattr(self, name)!r}"
                )
        if not (math.isfinite(self.scaling_factor) and self.scaling_factor > 0):
            raise DCAEConfigError(
                f"scaling_factor: expected a finite number > 0, got {self.scaling_factor}"
            )
        if self.downsample_block_type not in DOWNSAMPLE_TYPES:
            raise DCAEConfigError(
                f"downsample_block_type: expected one of {DOWNSAMPLE_TYPES}, "
                f"got {self.downsample_block_type!r}"
            )
        if self.upsample_block_type not in UPSAMPLE_TYPES:
            raise DCAEConfigError(
                f"upsample_block_type: expected one of {UPSAMPLE_TYPES}, "
                f"got {self.upsample_block_type!r}"
            )
        if self.decoder_conv_act_fn not in ACT_FNS:
            raise DCAEConfigError(
                f"decoder_conv_act_fn: expected one of {ACT_FNS}, got {self.decoder_conv_act_fn!r}"
            )
        self._validate_half("encoder")
        self._validate_half("decoder")
        n_enc = len(self.encoder_block_out_channels)
        n_dec = len(self.decoder_block_out_channels)
        if n_enc != n_dec:
            # Both halves must agree on the compression factor 2**(stages-1).
            raise DCAEConfigError(
                f"encoder_block_out_channels has {n_enc} stages but decoder_block_out_channels "
                f"has {n_dec}; they set the compression factor and must agree"
            )
        for half, flag in (
            ("encoder", self.encoder_out_shortcut),
            ("decoder", self.decoder_in_shortcut),
        ):
            last = getattr(self, f"{half}_block_out_channels")[-1]
            if flag and last % self.latent_channels:
                name = "encoder_out_shortcut" if half == "encoder" else "decoder_in_shortcut"
                raise DCAEConfigError(
                    f"{name}=True needs {half}_block_out_channels[-1]={last} to be a multiple of "
                    f"latent_channels={self.latent_channels}"
                )

    def _validate_half(self, half: str) -> None:
        widths = getattr(self, f"{half}_block_out_channels")
        n = len(widths)
        if n < 2:
            raise DCAEConfigError(f"{half}_block_out_channels: expected at least 2 stages, got {n}")
        per_stage = {
            f"{half}_layers_per_block": getattr(self, f"{half}_layers_per_block"),
            f"{half}_block_types": getattr(self, f"{half}_block_types"),
            f"{half}_qkv_multiscales": getattr(self, f"{half}_qkv_multiscales"),
        }
        if half == "decoder":
            per_stage["decoder_norm_types"] = self.decoder_norm_types
            per_stage["decoder_act_fns"] = self.decoder_act_fns
        for name, values in per_stage.items():
            if len(values) != n:
                raise DCAEConfigError(
                    f"{name}: expected {n} entries (one per stage of "
                    f"{half}_block_out_channels), got {len(values)}"
                )
        depths = per_stage[f"{half}_layers_per_block"]
        for i, (w, d) in enumerate(zip(widths, depths)):
            if w < 1:
                raise DCAEConfigError(f"{half}_block_out_channels[{i}]: expected >= 1, got {w}")
            if d < 0 or (d == 0 and i > 0):
                # Only stage 0 may be empty: an empty later stage would also drop its resampling
                # block and break the compression factor (diffusers builds no working model).
                raise DCAEConfigError(
                    f"{half}_layers_per_block[{i}]: expected >= 1 (only stage 0 may have 0 "
                    f"layers), got {d}"
                )
        for i, bt in enumerate(per_stage[f"{half}_block_types"]):
            if bt not in BLOCK_TYPES:
                raise DCAEConfigError(
                    f"{half}_block_types[{i}]: expected one of {BLOCK_TYPES}, got {bt!r}"
                )
            if bt == "EfficientViTBlock" and depths[i] > 0 and widths[i] < self.attention_head_dim:
                raise DCAEConfigError(
                    f"{half} stage {i}: EfficientViTBlock width {widths[i]} is smaller than "
                    f"attention_head_dim={self.attention_head_dim} (no attention head fits)"
                )
        for i, ks in enumerate(per_stage[f"{half}_qkv_multiscales"]):
            if any(k < 1 or k % 2 == 0 for k in ks):
                raise DCAEConfigError(
                    f"{half}_qkv_multiscales[{i}]: expected odd kernel sizes >= 1, got {ks}"
                )
        if half == "decoder":
            for i, nt in enumerate(self.decoder_norm_types):
                if nt not in NORM_TYPES:
                    raise DCAEConfigError(
                        f"decoder_norm_types[{i}]: expected one of {NORM_TYPES}, got {nt!r}"
                    )
            for i, act in enumerate(self.decoder_act_fns):
                if act not in ACT_FNS:
                    raise DCAEConfigError(
                        f"decoder_act_fns[{i}]: expected one of {ACT_FNS}, got {act!r}"
                    )
        # Channel arithmetic of the resampling blocks and their shortcuts.
        for i in range(n - 1):
            c_hi, c_lo = widths[i], widths[i + 1]
            if depths[i] == 0:
                continue
            if half == "encoder":
                if (4 * c_hi) % c_lo:
                    raise DCAEConfigError(
                        f"encoder stage {i}->{i + 1}: the space-to-channel shortcut needs "
                        f"4*{c_hi} to be a multiple of {c_lo}"
                    )
                if self.downsample_block_type == "pixel_unshuffle" and c_lo % 4:
                    raise DCAEConfigError(
                        f"encoder stage {i}->{i + 1}: pixel_unshuffle downsampling needs the "
                        f"width {c_lo} to be a multiple of 4"
                    )
            elif (4 * c_hi) % c_lo:
                raise DCAEConfigError(
                    f"decoder stage {i + 1}->{i}: the channel-duplicating shortcut needs "
                    f"4*{c_hi} to be a multiple of {c_lo}"
                )
        if (
            half == "encoder"
            and depths[0] == 0
            and self.downsample_block_type == "pixel_unshuffle"
            and widths[1] % 4
        ):
            raise DCAEConfigError(
                f"encoder_block_out_channels[1]={widths[1]} must be a multiple of 4 when stage 0 "
                "has no layers (the input conv then pixel-unshuffles into it)"
            )

    # -- derived properties -----------------------------------------------------------------

    @property
    def num_stages(self) -> int:
        return len(self.encoder_block_out_channels)

    @property
    def spatial_compression_ratio(self) -> int:
        """Pixels per latent pixel along each side: 2**(stages-1) (32, 64, 128)."""
        return 2 ** (self.num_stages - 1)

    # -- (de)serialisation --------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict with diffusers' field names (lists, not tuples)."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, tuple):
                value = [list(v) if isinstance(v, tuple) else v for v in value]
            out[f.name] = value
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> DCAEConfig:
        """Build from a config.json dict. Keys starting with ``_`` (``_class_name``,
        ``_diffusers_version``, ``_name_or_path``) are ignored; any other unknown key is an
        error, because silently dropping an architecture field would build the wrong model."""
        if not isinstance(data, Mapping):
            raise TypeError(f"DCAEConfig.from_dict: expected a mapping, got {type(data).__name__}")
        class_name = data.get("_class_name")
        if class_name is not None and class_name != "AutoencoderDC":
            raise DCAEConfigError(
                f"config is for _class_name={class_name!r}, expected 'AutoencoderDC'"
            )
        known = {f.name for f in dataclasses.fields(cls)}
        kwargs: dict[str, Any] = {}
        unknown = []
        for key, value in data.items():
            if key.startswith(_BOOKKEEPING_PREFIX):
                continue
            if key in _LEGACY_ALIASES:
                for target in _LEGACY_ALIASES[key]:
                    if target not in data:
                        kwargs[target] = value
                continue
            if key not in known:
                unknown.append(key)
                continue
            kwargs[key] = value
        if unknown:
            raise DCAEConfigError(
                f"unknown DC-AE config field(s) {sorted(unknown)}; expected fields are "
                f"{sorted(known)}"
            )
        return cls(**kwargs)

    def replace(self, **changes: Any) -> DCAEConfig:
        """A validated copy with some fields changed."""
        return dataclasses.replace(self, **changes)


# ---------------------------------------------------------------------------------------------
# Published configurations (docs/method.md section 3).
# ---------------------------------------------------------------------------------------------

_R, _E = "ResBlock", "EfficientViTBlock"
_W6 = (128, 256, 512, 512, 1024, 1024)


def _sana(scaling_factor: float) -> dict[str, Any]:
    return dict(
        latent_channels=32,
        encoder_block_types=(_R, _R, _R, _E, _E, _E),
        decoder_block_types=(_R, _R, _R, _E, _E, _E),
        encoder_block_out_channels=_W6,
        decoder_block_out_channels=_W6,
        encoder_layers_per_block=(2, 2, 2, 3, 3, 3),
        decoder_layers_per_block=(3, 3, 3, 3, 3, 3),
        encoder_qkv_multiscales=((), (), (), (5,), (5,), (5,)),
        decoder_qkv_multiscales=((), (), (), (5,), (5,), (5,)),
        downsample_block_type="conv",
        upsample_block_type="interpolate",
        decoder_norm_types="rms_norm",
        decoder_act_fns="silu",
        decoder_conv_act_fn="relu",
        scaling_factor=scaling_factor,
    )


def _in_mix(widths: tuple[int, ...], latent: int, scaling_factor: float) -> dict[str, Any]:
    n = len(widths)
    rest = n - 3  # stages 3.. are EfficientViT stages with depth 2
    return dict(
        latent_channels=latent,
        encoder_block_types=(_R,) * 3 + (_E,) * rest,
        decoder_block_types=(_R,) * 3 + (_E,) * rest,
        encoder_block_out_channels=widths,
        decoder_block_out_channels=widths,
        encoder_layers_per_block=(0, 4, 8) + (2,) * rest,
        decoder_layers_per_block=(0, 5, 10) + (2,) * rest,
        encoder_qkv_multiscales=((),) * n,
        decoder_qkv_multiscales=((),) * n,
        downsample_block_type="pixel_unshuffle",
        upsample_block_type="pixel_shuffle",
        decoder_norm_types=("batch_norm",) * 3 + ("rms_norm",) * rest,
        decoder_act_fns=("relu",) * 3 + ("silu",) * rest,
        decoder_conv_act_fn="relu",
        scaling_factor=scaling_factor,
    )


def _lite(scaling_factor: float) -> dict[str, Any]:
    cfg = _sana(scaling_factor)
    cfg.update(
        decoder_block_types=(_R,) * 6,
        decoder_layers_per_block=(0, 3, 5, 4, 4, 4),
        decoder_qkv_multiscales=((),) * 6,
        upsample_block_type="pixel_shuffle",
        decoder_conv_act_fn="silu",
    )
    return cfg


def _v15(widths: tuple[int, ...], scaling_factor: float) -> dict[str, Any]:
    n = len(widths)
    depths = (0, 5, 10) + (4,) * (n - 3)
    return dict(
        latent_channels=128,
        encoder_block_types=(_R,) * n,
        decoder_block_types=(_R,) * n,
        encoder_block_out_channels=widths,
        decoder_block_out_channels=widths,
        encoder_layers_per_block=depths,
        decoder_layers_per_block=depths,
        encoder_qkv_multiscales=((),) * n,
        decoder_qkv_multiscales=((),) * n,
        downsample_block_type="pixel_unshuffle",
        upsample_block_type="pixel_shuffle",
        decoder_norm_types="rms_norm",
        decoder_act_fns="silu",
        encoder_out_shortcut=False,
        decoder_in_shortcut=False,
        decoder_conv_act_fn="silu",
        scaling_factor=scaling_factor,
    )


# Placeholder for presets whose published scaling factor is UNKNOWN (docs/method.md): 1.0 leaves the
# latents unscaled. Measure the real value as 1 / std(latents) over your data before training.
PLACEHOLDER_SCALING_FACTOR = 1.0

_W7 = _W6 + (2048,)
_W8 = _W6 + (2048, 2048)

_PRESET_KWARGS: dict[str, dict[str, Any]] = {
    "dc-ae-f32c32-sana-1.0": _sana(0.41407),
    # 1.1 retrains the same architecture; its diffusers config keeps 0.41407.
    "dc-ae-f32c32-sana-1.1": _sana(0.41407),
    "dc-ae-f32c32-in-1.0": _in_mix(_W6, 32, 0.3189),
    "dc-ae-f32c32-mix-1.0": _in_mix(_W6, 32, 0.4552),
    "dc-ae-f64c128-in-1.0": _in_mix(_W7, 128, 0.2889),
    "dc-ae-f64c128-mix-1.0": _in_mix(_W7, 128, 0.4538),
    "dc-ae-f128c512-in-1.0": _in_mix(_W8, 512, 0.4883),
    "dc-ae-f128c512-mix-1.0": _in_mix(_W8, 512, 0.3620),
    # Lite shares the SANA 1.1 encoder and latent space, hence its scaling factor.
    "dc-ae-lite-f32c32-sana-1.1": _lite(0.41407),
    "dc-ae-1.5-f32c128": _v15(_W6, PLACEHOLDER_SCALING_FACTOR),
    "dc-ae-1.5-f64c128": _v15(_W6 + (1024,), PLACEHOLDER_SCALING_FACTOR),
}

#: Presets whose scaling_factor is the placeholder above, not a published value.
UNKNOWN_SCALING_FACTOR = frozenset({"dc-ae-1.5-f32c128", "dc-ae-1.5-f64c128"})

#: Every published DC-AE configuration, by name. Scaling factors are the published ones
#: (docs/method.md section 3) except for the presets in UNKNOWN_SCALING_FACTOR. The 1.5 presets'
#: decoder norms/activations (rms_norm/silu everywhere) are also an assumption: the public record
#: gives only widths, depths, block types, the dropped shortcuts and the SiLU output activation.
PRESETS: dict[str, DCAEConfig] = {
    name: DCAEConfig(**kwargs) for name, kwargs in _PRESET_KWARGS.items()
}


def list_presets() -> list[str]:
    """Names accepted by ``get_preset`` / ``DCAE.from_config``."""
    return sorted(PRESETS)


def _normalise_preset_name(name: str) -> str:
    # Accept hub-style ids ("mit-han-lab/dc-ae-f32c32-in-1.0-diffusers") and folder names.
    base = name.rstrip("/").split("/")[-1].split("--")[-1]
    if base.endswith("-diffusers"):
        base = base[: -len("-diffusers")]
    return base


def find_preset(name: str) -> str | None:
    """The preset name a hub id or folder name refers to, or None."""
    base = _normalise_preset_name(name)
    return base if base in PRESETS else None


def get_preset(name: str) -> DCAEConfig:
    """A fresh copy of a named preset (also accepts hub ids such as
    ``mit-han-lab/dc-ae-f32c32-sana-1.0-diffusers``)."""
    key = find_preset(name)
    if key is None:
        raise KeyError(f"unknown DC-AE preset {name!r}; expected one of {list_presets()}")
    return dataclasses.replace(PRESETS[key])


def reduced_config(
    base: str | DCAEConfig,
    width_divisor: int = 16,
    attention_head_dim: int | None = None,
    latent_channels: int | None = None,
    max_layers: int | None = None,
) -> DCAEConfig:
    """A narrow copy of a preset for tests: the same stages, block types, norms, shortcuts and
    resampling, with every width (and by default the head dim and latent channels) divided by
    ``width_divisor``. ``max_layers`` caps each stage's depth (a depth of 0 stays 0)."""
    cfg = get_preset(base) if isinstance(base, str) else dataclasses.replace(base)
    if width_divisor < 1:
        raise ValueError(f"width_divisor: expected >= 1, got {width_divisor}")

    def shrink(widths: Sequence[int]) -> tuple[int, ...]:
        return tuple(max(1, w // width_divisor) for w in widths)

    def cap(depths: Sequence[int]) -> tuple[int, ...]:
        return tuple(depths) if max_layers is None else tuple(min(d, max_layers) for d in depths)

    return dataclasses.replace(
        cfg,
        encoder_block_out_channels=shrink(cfg.encoder_block_out_channels),
        decoder_block_out_channels=shrink(cfg.decoder_block_out_channels),
        encoder_layers_per_block=cap(cfg.encoder_layers_per_block),
        decoder_layers_per_block=cap(cfg.decoder_layers_per_block),
        attention_head_dim=attention_head_dim or max(1, cfg.attention_head_dim // width_divisor),
        latent_channels=latent_channels or max(1, cfg.latent_channels // width_divisor),
    )


__all__ = [
    "DCAEConfig",
    "DCAEConfigError",
    "PLACEHOLDER_SCALING_FACTOR",
    "PRESETS",
    "UNKNOWN_SCALING_FACTOR",
    "find_preset",
    "get_preset",
    "list_presets",
    "reduced_config",
]
