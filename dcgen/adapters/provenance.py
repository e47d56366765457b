"""What a transformer's latent layers were trained for, kept in its config.

Stage 1 aligns the new embedder to one DC-AE's latents. Its channel count shows in the layers'
shapes, but its spatial factor does not: an f64c32 DC-AE passes every channel check of an f32c32
model, and a stage, an export or a pipeline that paired them trained or sampled silently on the
wrong grid. Stage 1 records the factor under a ``_``-key of the transformer config (diffusers
keeps those through save_pretrained / from_pretrained), the latent-layers file carries it, and
each later consumer compares it with the DC-AE it is given. Models adapted before the record
existed have none and are not checked.
"""

from __future__ import annotations

from typing import Any

from .._checks import is_int

#: transformer config key: the spatial factor of the DC-AE whose latents the layers were fit to
DCAE_FACTOR_KEY = "_dcgen_dcae_factor"


def recorded_dcae_factor(transformer: Any) -> int | None:
    """The DC-AE spatial factor stage 1 recorded in ``transformer``'s config, or None."""
    value = getattr(transformer, "config", {}).get(DCAE_FACTOR_KEY)
    return int(value) if value is not None else None


def record_dcae_factor(transformer: Any, factor: int | None) -> None:
    """Record (or, for None, forget) the DC-AE spatial factor of ``transformer``'s latent
    layers in its config."""
    if factor is not None and (not is_int(factor) or factor < 1):
        raise ValueError(f"DC-AE spatial factor: expected a positive int, got {factor!r}")
    transformer.register_to_config(**{DCAE_FACTOR_KEY: None if factor is None else int(factor)})


def dcae_factor_mismatch(transformer: Any, factor: int, what: str) -> str | None:
    """Why ``transformer`` cannot take latents of a DC-AE of spatial factor ``factor`` (``what``
    names where they come from), or None: the factors agree or none is recorded. The caller
    raises it as its own error."""
    recorded = recorded_dcae_factor(transformer)
    if recorded is None or recorded == int(factor):
        return None
    return (
        f"the transformer's latent layers were aligned to an f{recorded} DC-AE's latents "
        f"(stage 1), but {what} is f{int(factor)}: use the DC-AE (and latents) the model was "
        "trained with"
    )
