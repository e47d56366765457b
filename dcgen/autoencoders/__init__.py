"""DC-AE deep-compression autoencoders: one ``DCAE`` module for every published config,
named presets, diffusers / original checkpoint loading, tiled encode and decode."""

from .checkpoint import CheckpointError
from .config import (
    PRESETS,
    UNKNOWN_SCALING_FACTOR,
    DCAEConfig,
    DCAEConfigError,
    get_preset,
    list_presets,
    reduced_config,
)
from .dcae import DCAE

__all__ = [
    "DCAE",
    "PRESETS",
    "UNKNOWN_SCALING_FACTOR",
    "CheckpointError",
    "DCAEConfig",
    "DCAEConfigError",
    "get_preset",
    "list_presets",
    "reduced_config",
]
