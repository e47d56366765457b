"""Flow-matching conventions, the Euler sampler and timestep-shift rules (FLUX.1 mu rule,
DC-Gen sqrt rule, SANA constant shift)."""

from .flow import add_noise, euler_step, flow_sigmas, sample_euler, velocity_target
from .shift import (
    SHIFT_RULES,
    ShiftRule,
    flux_mu,
    flux_shift,
    resolve_shift,
    shift_sigmas,
    sqrt_shift,
)

__all__ = [
    "SHIFT_RULES",
    "ShiftRule",
    "add_noise",
    "euler_step",
    "flow_sigmas",
    "flux_mu",
    "flux_shift",
    "resolve_shift",
    "sample_euler",
    "shift_sigmas",
    "sqrt_shift",
    "velocity_target",
]
