"""Timestep-shift rules for flow matching (pure functions).

Every rule produces one shift factor ``s``; the shift itself is always

    sigma' = s * sigma / (1 + (s - 1) * sigma)

which keeps 0 and 1 fixed and, for s > 1, spends more of the sampling steps at high noise. Larger
images (more tokens, more channels per token) carry more signal at a given sigma, so they need a
larger shift to destroy the same amount of structure; the rules below differ only in how s grows.

* ``flux_mu`` / ``flux_shift``: FLUX.1. mu is linear in the token count, 0.5 at 256 tokens and
  1.15 at 4096 tokens, s = e^mu. (Equal to diffusers' exponential ``time_shift`` with sigma = 1.)
* ``sqrt_shift``: the released DC-Gen 1K (f32c32) model, s = sqrt(tokens * C_lat / 4096), i.e.
  the square root of the number of latent values relative to a 4096-value reference.
* constant: SANA's ``flow_shift`` (e.g. 3.0), independent of the resolution.
"""

from __future__ import annotations

import math
from typing import Literal

import torch

from .._checks import is_real

ShiftRule = Literal["flux", "sqrt", "constant", "none"]
SHIFT_RULES: tuple[str, ...] = ("flux", "sqrt", "constant", "none")


def shift_sigmas(sigmas: torch.Tensor, shift: float) -> torch.Tensor:
    """sigma' = s * sigma / (1 + (s - 1) * sigma). ``shift`` must be positive (1 = identity)."""
    shift = check_shift(shift, "shift_sigmas")
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def check_shift(shift: object, name: str = "shift") -> float:
    """``shift`` as a float when it is a positive finite real number (numpy scalars count; a
    bool or a string does not), else a ValueError naming ``name`` and what came."""
    if not is_real(shift) or not math.isfinite(shift) or not shift > 0:
        raise ValueError(f"{name}: expected a positive finite shift, got {shift!r}")
    return float(shift)


def flux_mu(
    num_tokens: int,
    base_tokens: int = 256,
    max_tokens: int = 4096,
    base_shift: float = 0.5,
    max_shift: float = 1.15,
) -> float:
    """FLUX.1 resolution rule: mu linear in the image token count through (base_tokens,
    base_shift) and (max_tokens, max_shift); extrapolates linearly outside that range (as the
    FLUX.1 reference does)."""
    if max_tokens == base_tokens:
        raise ValueError("flux_mu: base_tokens and max_tokens must differ")
    slope = (max_shift - base_shift) / (max_tokens - base_tokens)
    return base_shift + slope * (num_tokens - base_tokens)


#: the largest mu whose e^mu is a finite float (e^709.78 is the largest double)
MAX_LOG_SHIFT = 709.0


def flux_shift(num_tokens: int, **kwargs: float) -> float:
    """s = e^mu with mu from :func:`flux_mu` (kwargs go to flux_mu)."""
    mu = flux_mu(num_tokens, **kwargs)
    if mu > MAX_LOG_SHIFT:  # math.exp raised a bare OverflowError
        raise ValueError(
            f"flux_shift: the FLUX resolution rule gives mu = {mu:.4g} at {num_tokens} image "
            f"tokens, a shift past {MAX_LOG_SHIFT:g} in log space; expected an image size the "
            "rule extrapolates to, or pass the shift itself"
        )
    return math.exp(mu)


def sqrt_shift(num_tokens: int, latent_channels: int, reference: int = 4096) -> float:
    """Released DC-Gen 1K rule: s = sqrt(num_tokens * latent_channels / reference).

    Example: 1024x1024 with DC-AE f32c32 -> 32*32 = 1024 tokens of 32 channels -> s = sqrt(8).
    """
    if num_tokens <= 0 or latent_channels <= 0 or reference <= 0:
        raise ValueError(
            f"sqrt_shift: expected positive arguments, got num_tokens={num_tokens}, "
            f"latent_channels={latent_channels}, reference={reference}"
        )
    return math.sqrt(num_tokens * latent_channels / reference)


def resolve_shift(
    rule: str,
    num_tokens: int,
    latent_channels: int,
    constant: float = 1.0,
    base_tokens: int = 256,
    max_tokens: int = 4096,
    base_shift: float = 0.5,
    max_shift: float = 1.15,
) -> float:
    """The shift factor s for ``rule`` in ``SHIFT_RULES`` ('flux', 'sqrt', 'constant', 'none')."""
    if rule == "flux":
        return flux_shift(
            num_tokens,
            base_tokens=base_tokens,
            max_tokens=max_tokens,
            base_shift=base_shift,
            max_shift=max_shift,
        )
    if rule == "sqrt":
        return sqrt_shift(num_tokens, latent_channels)
    if rule == "constant":
        return check_shift(constant, "resolve_shift: constant")
    if rule == "none":
        return 1.0
    raise ValueError(f"unknown shift rule {rule!r}; expected one of {SHIFT_RULES}")
