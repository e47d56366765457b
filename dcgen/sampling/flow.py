"""Rectified-flow (flow-matching) conventions and the Euler sampler.

Forward process: x_t = (1 - t) * x0 + t * noise, t = sigma in [0, 1]. The model predicts the
velocity v = noise - x0 (dx_t/dt), so sampling integrates from sigma = 1 (pure noise) to 0 with
Euler steps x <- x + (sigma_next - sigma) * v. These are the conventions of FLUX.1, SANA and
diffusers' FlowMatchEulerDiscreteScheduler (non-stochastic); training code uses the same helpers.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from .._checks import is_int, is_real
from .shift import check_shift, shift_sigmas


def add_noise(x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """x_t = (1 - sigma) x0 + sigma noise; ``sigma`` is (B,) or a scalar, broadcast per sample."""
    sigma = _per_sample(sigma, x0)
    return (1 - sigma) * x0 + sigma * noise


def velocity_target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """The flow-matching regression target v = noise - x0."""
    return noise - x0


def check_steps(num_steps: object) -> int:
    """``num_steps`` as an int when it is a positive integer (numpy ints count, a bool does
    not), else a ValueError that says what came."""
    if not is_int(num_steps) or num_steps < 1:
        raise ValueError(f"num_steps: expected a positive int, got {num_steps!r}")
    return int(num_steps)


def flow_sigmas(
    num_steps: int,
    shift: float = 1.0,
    device: torch.device | str | None = None,
    base: Sequence[float] | torch.Tensor | None = None,
) -> torch.Tensor:
    """``num_steps + 1`` sigmas from 1 to 0: uniform in [1, 1/num_steps] (the FLUX.1 schedule),
    then shifted by ``shift``, then a terminal 0. float32 (fp32 keeps step sizes exact).

    ``base`` replaces the uniform grid with custom unshifted sigmas, as ``sigmas=`` does in
    diffusers' FluxPipeline (shifted the same way; ``num_steps`` must be their count)."""
    num_steps = check_steps(num_steps)
    shift = check_shift(shift)
    if base is None:
        grid = torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float64)[:-1]
    else:
        grid = check_custom_sigmas(base)
        if len(grid) != num_steps:
            raise ValueError(f"sigmas: {len(grid)} values for {num_steps} steps")
    sigmas = shift_sigmas(grid, shift)
    sigmas = torch.cat([sigmas, sigmas.new_zeros(1)])
    return sigmas.to(device=device, dtype=torch.float32)


def strength_start(steps: int, strength: float) -> int:
    """How many of ``steps`` steps an image-to-image run at ``strength`` skips:
    ``int(steps - steps * strength)``, as diffusers' FluxImg2ImgPipeline counts them (strength 1
    keeps every step: pure noise; small strengths start close to the input image, with at least
    one step left). A ValueError when the strength is outside (0, 1] or leaves no step (a
    strength too small to move ``steps - steps * strength`` below ``steps`` in floating
    point)."""
    if (
        not is_real(strength) or not 0.0 < strength <= 1.0
    ):  # numpy scalars too, as diffusers takes them
        raise ValueError(f"strength: expected a number in (0, 1], got {strength!r}")
    strength = float(strength)
    start = int(steps - steps * strength)  # in [0, steps] for a strength in (0, 1]
    if start >= steps:
        raise ValueError(
            f"strength {strength:g} of {steps} steps leaves no step to sample (it skips "
            "int(steps - steps x strength) of them); raise the strength"
        )
    return start


def check_custom_sigmas(sigmas: Sequence[float] | torch.Tensor) -> torch.Tensor:
    """Custom unshifted sigmas as float64: one per step, finite, in (0, 1], strictly
    decreasing (the sampler appends the terminal 0 itself)."""
    try:
        grid = torch.as_tensor(sigmas, dtype=torch.float64).detach().cpu()
    except (TypeError, ValueError, RuntimeError) as err:
        raise ValueError(f"sigmas: expected a list of numbers, got {sigmas!r}") from err
    if grid.ndim != 1 or grid.numel() == 0:
        raise ValueError(f"sigmas: expected a non-empty 1-D list, got shape {tuple(grid.shape)}")
    if not torch.isfinite(grid).all() or (grid <= 0).any() or (grid > 1).any():
        raise ValueError(f"sigmas: expected values in (0, 1], got {grid.tolist()}")
    if (grid[1:] >= grid[:-1]).any():
        raise ValueError(f"sigmas: expected strictly decreasing values, got {grid.tolist()}")
    return grid


def euler_step(
    x: torch.Tensor,
    velocity: torch.Tensor,
    sigma: float | torch.Tensor,
    sigma_next: float | torch.Tensor,
) -> torch.Tensor:
    """One Euler step of the flow ODE, in float32 (low-precision steps drift over 20+ steps)."""
    return x.float() + (sigma_next - sigma) * velocity.float()


def sample_euler(
    velocity_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    noise: torch.Tensor,
    sigmas: torch.Tensor,
    on_step: Callable[[int, torch.Tensor], torch.Tensor | None] | None = None,
) -> torch.Tensor:
    """Integrate from ``noise`` (sigma = sigmas[0]) to sigmas[-1] with Euler steps.

    velocity_fn(x, sigma_batch) -> v, with sigma_batch of shape (B,). ``on_step(i, x)`` runs after
    each step (progress bars, callbacks); a tensor it returns replaces x (anything else is
    ignored). Returns float32 latents.
    """
    x = noise.float()
    batch = x.shape[0]
    for i in range(len(sigmas) - 1):
        sigma = sigmas[i]
        v = velocity_fn(x, sigma.expand(batch).to(x.device))
        x = after_step(on_step, i, euler_step(x, v, sigma, sigmas[i + 1]))
    return x


def after_step(
    on_step: Callable[[int, torch.Tensor], torch.Tensor | None] | None, i: int, x: torch.Tensor
) -> torch.Tensor:
    """``x`` after the samplers' per-step hook: the hook's tensor if it returns one (a callback
    editing the latents), else ``x`` (a progress bar's update returns other things)."""
    out = on_step(i, x) if on_step is not None else None
    if not isinstance(out, torch.Tensor):
        return x
    if out.shape != x.shape:
        raise ValueError(
            f"on_step: the latents it returns must keep their shape {tuple(x.shape)}, "
            f"got {tuple(out.shape)}"
        )
    return out.to(device=x.device, dtype=torch.float32)


def _per_sample(sigma: torch.Tensor | float, like: torch.Tensor) -> torch.Tensor:
    sigma = torch.as_tensor(sigma, dtype=like.dtype, device=like.device)
    if sigma.ndim == 0:
        return sigma
    if sigma.ndim != 1 or sigma.shape[0] != like.shape[0]:
        raise ValueError(
            f"sigma: expected a scalar or shape ({like.shape[0]},), got {tuple(sigma.shape)}"
        )
    return sigma.view(-1, *([1] * (like.ndim - 1)))


def check_scheduler_config(
    config: Mapping[str, Any], required: Mapping[str, tuple[Any, ...]], sampler: str, advice: str
) -> None:
    """A ValueError naming the first entry of a diffusers scheduler ``config`` whose value is not
    one of ``required[entry]`` (an absent entry takes the first allowed value): dcgen's
    ``sampler`` does not implement it, and sampling on would give other images than diffusers'
    pipeline with the same folder, with no sign of it."""
    for key, allowed in required.items():
        value = config.get(key, allowed[0])
        if value not in allowed:
            raise ValueError(
                f"scheduler config {key}={value!r}: dcgen's {sampler} implements {key} in "
                f"{allowed}; {advice}"
            )


# FlowMatchEulerDiscreteScheduler entries that change its sigmas or its steps, with the values
# under which dcgen's Euler steps (shifted flow sigmas, deterministic) are the same schedule.
_EULER_REQUIRED = {
    "time_shift_type": ("exponential", None),  # "linear" shifts by mu instead of e^mu
    "shift_terminal": (None, 0, 0.0),  # stretches the schedule to end at this sigma
    "use_karras_sigmas": (False, None),
    "use_exponential_sigmas": (False, None),
    "use_beta_sigmas": (False, None),
    "stochastic_sampling": (False, None),  # re-noises at every step
    "invert_sigmas": (False, None),
}


def check_flow_euler_config(config: Mapping[str, Any]) -> None:
    """:func:`check_scheduler_config` for a FlowMatchEulerDiscreteScheduler's config."""
    check_scheduler_config(
        config,
        _EULER_REQUIRED,
        "Euler sampler (shifted flow sigmas, deterministic steps)",
        "set it so in the scheduler's config to sample with dcgen",
    )
