"""DPM-Solver++ (multistep, order 1 or 2) for flow-matching models: SANA's sampler.

SANA checkpoints are sampled with DPM-Solver++ 2M on flow sigmas (diffusers' SanaPipeline with a
DPMSolverMultistepScheduler, ``use_flow_sigmas``, ``prediction_type="flow_prediction"``); Euler
steps on the same model give other, usually softer, images at 20 steps. This module is dcgen's
own implementation of that sampler, written from the solver's definition (Lu et al. 2022,
"DPM-Solver++"), with the conventions of diffusers' scheduler where they decide the result:

* the grid: ``num_steps`` sigmas 1 - linspace(1, 1/T, num_steps + 1), the last dropped, each
  shifted by ``shift`` (s' = shift s / (1 + (shift - 1) s)), then a terminal 0; the first sigma
  is 1 - 1/T (not 1: the data-prediction form needs alpha = 1 - sigma > 0);
* what the model sees: the integer timestep floor(sigma T) (diffusers casts the float timesteps
  to int64) and hands to the model as is, so ``model_sigmas`` = floor(sigma T) / 1000 on the
  adapters' 0..1000 timestep scale (floor(sigma T) / T for SANA's T = 1000), while the solver
  uses the float sigma;
* the order schedule: first order on the first step (no history yet) and on the last (to sigma 0,
  where the update is the data prediction itself), second order in between.

In flow matching x_s = (1 - s) x0 + s noise and the model predicts v = noise - x0, so the data
prediction is x0 = x - s v; with alpha = 1 - s and lambda = log(alpha / s) the first-order step
from s to t is x_t = (t / s) x - alpha_t (e^{-h} - 1) x0, h = lambda_t - lambda_s, and the
second-order multistep one adds a correction from the previous step's data prediction.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from .._checks import is_int
from .flow import after_step, check_scheduler_config, check_steps
from .shift import check_shift, shift_sigmas

SOLVER_TYPES = ("midpoint", "heun")


@dataclass(frozen=True)
class DPMSettings:
    """What a DPM-Solver++ run needs besides the shift: ``order`` (1 or 2), ``solver_type`` of
    the second-order correction ('midpoint' as SANA ships, or 'heun'), ``train_timesteps`` T
    and ``integer_timesteps``: whether the model sees the integer timestep floor(sigma T)
    (diffusers' scheduler convention, what SANA checkpoints are sampled with) or the solver's
    own sigma."""

    order: int = 2
    solver_type: str = "midpoint"
    train_timesteps: int = 1000
    integer_timesteps: bool = True

    def __post_init__(self) -> None:
        if self.order not in (1, 2):
            raise ValueError(f"DPM-Solver++ order: expected 1 or 2, got {self.order!r}")
        if self.solver_type not in SOLVER_TYPES:
            raise ValueError(
                f"DPM-Solver++ solver_type: expected one of {SOLVER_TYPES}, "
                f"got {self.solver_type!r}"
            )
        if not isinstance(self.train_timesteps, int) or self.train_timesteps < 2:
            raise ValueError(f"train_timesteps: expected an int >= 2, got {self.train_timesteps!r}")


# Scheduler-config entries and the values dcgen's solver implements: anything else would sample
# differently from the scheduler the folder names, so dpm_settings_from_config refuses it.
_REQUIRED = {
    "algorithm_type": ("dpmsolver++",),
    "prediction_type": ("flow_prediction",),
    "use_flow_sigmas": (True,),
    "final_sigmas_type": ("zero", None),
    "thresholding": (False, None),
    "use_karras_sigmas": (False, None),
    "use_exponential_sigmas": (False, None),
    "use_beta_sigmas": (False, None),
    "use_lu_lambdas": (False, None),
    "variance_type": (None,),
}


def dpm_settings_from_config(config: Mapping[str, Any]) -> DPMSettings:
    """DPMSettings from a DPMSolverMultistepScheduler config (a SANA folder's scheduler), or a
    ValueError naming the entry dcgen's solver does not implement. The flow shift is not read
    here: the pipeline's shift rule supplies it (``flow_shift`` for SANA)."""
    check_scheduler_config(config, _REQUIRED, "DPM-Solver++", "sample with sampler='euler' instead")
    return DPMSettings(
        order=int(config.get("solver_order", 2)),
        solver_type=str(config.get("solver_type", "midpoint")),
        train_timesteps=int(config.get("num_train_timesteps", 1000)),
    )


def dpm_flow_sigmas(
    num_steps: int,
    shift: float = 1.0,
    train_timesteps: int = 1000,
    device: torch.device | str | None = None,
    integer_timesteps: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(sigmas, model_sigmas) for ``num_steps`` DPM-Solver++ steps on flow sigmas.

    ``sigmas``: ``num_steps + 1`` float32 values from (shifted) 1 - 1/T down to a terminal 0, the
    solver's grid. ``model_sigmas``: the ``num_steps`` values the model is conditioned on,
    floor(sigma T) / 1000 (the integer timestep of a SANA checkpoint's sampling, which the
    adapter scales by 1000 again; floor(sigma T) / T for SANA's T = 1000) or, without
    ``integer_timesteps``, the grid's own."""
    num_steps = check_steps(num_steps)
    shift = check_shift(shift)
    # T = 1 would put the whole grid at sigma 0 (1 - 1/T), T = 0 divides by zero.
    if not is_int(train_timesteps) or train_timesteps < 2:
        raise ValueError(f"train_timesteps: expected an int >= 2, got {train_timesteps!r}")
    t = float(train_timesteps)
    base = 1.0 - torch.linspace(1.0, 1.0 / t, num_steps + 1, dtype=torch.float64)
    grid = shift_sigmas(base.flip(0)[:-1], float(shift))
    # The integer timestep floor(sigma T) reaches the model as diffusers hands it over: as is,
    # on the 0..1000 scale the adapters' sigma maps to (the same as floor(sigma T) / T at T =
    # 1000, SANA's; a config with another T gets the model the timesteps diffusers gives it).
    model = torch.floor(grid * t) / 1000.0 if integer_timesteps else grid
    sigmas = torch.cat([grid, grid.new_zeros(1)]).to(device=device, dtype=torch.float32)
    return sigmas, model.to(device=device, dtype=torch.float32)


def _lam(sigma: float) -> float:
    """Half log-SNR of the flow path at ``sigma`` (alpha = 1 - sigma)."""
    return math.log(1.0 - sigma) - math.log(sigma)


def dpm_step(
    x: torch.Tensor,
    x0: torch.Tensor,
    prev_x0: torch.Tensor | None,
    sigmas: tuple[float | None, float, float],
    solver_type: str = "midpoint",
) -> torch.Tensor:
    """One DPM-Solver++ step from sigma s to t in float32.

    ``sigmas`` = (s_prev, s, t): s_prev and ``prev_x0`` (the previous step's data prediction)
    are None for a first-order step. t = 0 returns ``x0``: the update's limit there."""
    s_prev, s, t = sigmas
    x0 = x0.float()
    if t == 0.0:
        return x0
    h = _lam(t) - _lam(s)
    # Coefficients in float64 (Python floats), the tensors in float32.
    decay = t / s
    phi = (1.0 - t) * math.expm1(-h)  # alpha_t (e^{-h} - 1), negative
    out = decay * x.float() - phi * x0
    if prev_x0 is None:
        return out
    if s_prev is None:
        raise ValueError("dpm_step: a second-order step needs the previous sigma")
    r = (_lam(s) - _lam(s_prev)) / h
    d1 = (x0 - prev_x0.float()) / r
    if solver_type == "midpoint":
        return out - 0.5 * phi * d1
    # heun: alpha_t ((e^{-h} - 1) / h + 1) D1
    return out + (1.0 - t) * (math.expm1(-h) / h + 1.0) * d1


def sample_dpm_solver(
    velocity_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    noise: torch.Tensor,
    sigmas: torch.Tensor,
    model_sigmas: torch.Tensor | None = None,
    settings: DPMSettings | None = None,
    on_step: Callable[[int, torch.Tensor], torch.Tensor | None] | None = None,
) -> torch.Tensor:
    """Integrate from ``noise`` (at sigmas[0]) to sigmas[-1] = 0 with DPM-Solver++.

    velocity_fn(x, sigma_batch) -> v as for sample_euler; it is called with ``model_sigmas[i]``
    (default: the solver's sigmas) while the data prediction x0 = x - sigma v uses sigmas[i].
    First order on the first and last steps, ``settings.order`` in between. ``on_step(i, x)``
    as in sample_euler (a tensor it returns replaces x). Returns float32."""
    settings = settings or DPMSettings()
    grid = [float(s) for s in sigmas]
    if len(grid) < 2 or grid[-1] != 0.0:
        raise ValueError(f"sigmas: expected at least 2 values ending in 0, got {grid}")
    if not all(1.0 > a > b for a, b in zip(grid[:-1], grid[1:], strict=True)):
        raise ValueError(f"sigmas: expected strictly decreasing values below 1, got {grid}")
    steps = len(grid) - 1
    if model_sigmas is None:
        model_sigmas = sigmas[:-1]
    # A list of floats is accepted like the grid itself (each value is expanded to the batch).
    if not isinstance(model_sigmas, torch.Tensor):
        model_sigmas = torch.as_tensor(model_sigmas, dtype=torch.float32)
    if model_sigmas.ndim != 1 or len(model_sigmas) != steps:
        raise ValueError(
            f"model_sigmas: expected {steps} values, got shape {tuple(model_sigmas.shape)}"
        )
    x = noise.float()
    batch = x.shape[0]
    prev_x0 = None
    for i in range(steps):
        s = grid[i]
        v = velocity_fn(x, model_sigmas[i].expand(batch).to(x.device))
        x0 = x - s * v.float()
        second = settings.order == 2 and prev_x0 is not None and i < steps - 1
        x = dpm_step(
            x, x0, prev_x0 if second else None,
            (grid[i - 1] if second else None, s, grid[i + 1]), settings.solver_type,
        )  # fmt: skip
        prev_x0 = x0
        x = after_step(on_step, i, x)
    return x
