"""dcgen's environment switches, read by one rule: case and surrounding spaces do not matter,
an empty value is the default, and a value a switch does not know is refused naming the
switch (``!= "0"`` / ``== "1"`` tests read DCGEN_DISABLE_KERNELS=true as off and
DCGEN_DCAE_CUDNN_CONV_RELU=false as on)."""

from __future__ import annotations

import os
from collections.abc import Sequence

_ON = ("1", "on", "true", "yes")
_OFF = ("0", "off", "false", "no")


def env_flag(name: str, default: bool) -> bool:
    """The on / off switch ``name``: 1 / on / true / yes or 0 / off / false / no."""
    raw = os.environ.get(name)
    value = (raw or "").strip().lower()
    if not value:
        return default
    if value in _ON:
        return True
    if value in _OFF:
        return False
    raise ValueError(f"{name}: expected 1 or 0 (or on/off, true/false, yes/no), got {raw!r}")


def env_choice(name: str, choices: Sequence[str], default: str) -> str:
    """The switch ``name`` as one of ``choices`` (lower case)."""
    raw = os.environ.get(name)
    value = (raw or "").strip().lower()
    if not value:
        return default
    if value not in choices:
        raise ValueError(f"{name}: expected one of {tuple(choices)}, got {raw!r}")
    return value
