"""Flow-matching training objective (stages 2 and 3; docs/method.md section 2).

Convention (rectified flow, as in FLUX/SD3 and diffusers' FlowMatchEulerDiscreteScheduler):
x_t = (1 - sigma) * x0 + sigma * noise, sigma in (0, 1), sigma = 1 is pure noise, and the model
predicts the velocity v = d x_t / d sigma = noise - x0. Sampling integrates from sigma 1 to 0.

The model is passed in as a callable ``model_fn(x_t, sigmas) -> v_pred`` so the per-family
details (packing, timestep scale [0, 1] vs [0, 1000], guidance, text conditioning) stay in the
adapters; wrap them in a lambda or ``functools.partial``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal

import torch
from torch import Tensor

from dcgen.sampling import add_noise, shift_sigmas
from dcgen.sampling import velocity_target as _velocity

TimestepMode = Literal["logit_normal", "uniform"]
Weighting = Literal["none", "sigma_sqrt", "cosmap"]

__all__ = [
    "TimestepMode",
    "Weighting",
    "flow_matching_loss",
    "guidance_values",
    "interpolate",
    "loss_weights",
    "sample_timesteps",
    "shift_sigmas",
    "velocity_target",
]

# Keep sigmas strictly inside (0, 1): sigmoid of a large normal sample rounds to exactly 1.0 in
# fp32, and the "sigma_sqrt" weighting divides by sigma^2.
_SIGMA_EPS = 1e-5


def _device_of(generator: torch.Generator | None) -> torch.device:
    return generator.device if generator is not None else torch.device("cpu")


def sample_timesteps(
    batch: int,
    generator: torch.Generator | None = None,
    mode: TimestepMode = "logit_normal",
    shift: float = 1.0,
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
    device: torch.device | str | None = None,
) -> Tensor:
    """Training sigmas, shape (batch,), fp32, strictly inside (0, 1).

    - ``"logit_normal"``: sigma = sigmoid(z), z ~ N(logit_mean, logit_std^2) (SD3's default;
      concentrates on the middle of the trajectory).
    - ``"uniform"``: sigma ~ U(0, 1).

    Then :func:`shift_sigmas` with ``shift``, then a clamp to [1e-5, 1 - 1e-5]. Random numbers
    are drawn on the generator's device (so a seeded generator gives the same sigmas whatever
    ``device`` is) and the result is moved to ``device`` (default: the generator's).
    """
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    gen_device = _device_of(generator)
    if mode == "logit_normal":
        z = torch.randn(batch, generator=generator, device=gen_device, dtype=torch.float32)
        sigmas = torch.sigmoid(z * logit_std + logit_mean)
    elif mode == "uniform":
        sigmas = torch.rand(batch, generator=generator, device=gen_device, dtype=torch.float32)
    else:
        raise ValueError(f"mode must be 'logit_normal' or 'uniform', got {mode!r}")
    sigmas = shift_sigmas(sigmas, shift).clamp(_SIGMA_EPS, 1 - _SIGMA_EPS)
    return sigmas.to(device) if device is not None else sigmas


def guidance_values(
    batch: int,
    generator: torch.Generator | None = None,
    low: float = 1.0,
    high: float = 5.0,
    device: torch.device | str | None = None,
) -> Tensor:
    """Guidance scales for a guidance-distilled base (FLUX-dev's ``guidance`` input), shape
    (batch,), fp32, uniform in [low, high] (constant when low == high). Training over a range
    keeps the embedding meaningful for any scale used at sampling time (default 3.5)."""
    if high < low:
        raise ValueError(f"need low <= high, got low={low}, high={high}")
    u = torch.rand(batch, generator=generator, device=_device_of(generator), dtype=torch.float32)
    values = low + (high - low) * u
    return values.to(device) if device is not None else values


def _expand(sigmas: Tensor, like: Tensor) -> Tensor:
    """(B,) -> (B, 1, ..., 1) broadcastable against ``like``."""
    if sigmas.ndim != 1 or sigmas.shape[0] != like.shape[0]:
        raise ValueError(
            f"sigmas must be (B,) with B = {like.shape[0]}, got shape {tuple(sigmas.shape)}"
        )
    return sigmas.reshape(-1, *([1] * (like.ndim - 1)))


def interpolate(x0: Tensor, noise: Tensor, sigmas: Tensor) -> Tensor:
    """x_t = (1 - sigma) x0 + sigma noise, in the dtype of ``x0`` (sigmas must be (B,))."""
    _expand(sigmas, x0)  # shape check with a clear error
    return add_noise(x0, noise.to(x0.dtype), sigmas)


def velocity_target(x0: Tensor, noise: Tensor) -> Tensor:
    """The regression target v = noise - x0, in fp32 (the loss is computed in fp32)."""
    return _velocity(x0.float(), noise.float())


def loss_weights(sigmas: Tensor, weighting: Weighting = "none") -> Tensor:
    """Per-sample loss weights, (B,) fp32, with SD3's options:
    "none" = 1; "sigma_sqrt" = sigma^-2; "cosmap" = 2 / (pi (1 - 2 sigma + 2 sigma^2))."""
    s = sigmas.float()
    if weighting == "none":
        return torch.ones_like(s)
    if weighting == "sigma_sqrt":
        return s.pow(-2.0)
    if weighting == "cosmap":
        return 2.0 / (math.pi * (1 - 2 * s + 2 * s * s))
    raise ValueError(f"weighting must be 'none', 'sigma_sqrt' or 'cosmap', got {weighting!r}")


def flow_matching_loss(
    model_fn: Callable[[Tensor, Tensor], Tensor],
    x0: Tensor,
    sigmas: Tensor,
    noise: Tensor | None = None,
    weighting: Weighting = "none",
    generator: torch.Generator | None = None,
) -> Tensor:
    """Flow-matching loss: mean over the batch of w(sigma) * mean_elements (v_pred - v)^2.

    ``x0`` is the clean latent (any layout, batch first), ``sigmas`` (B,), ``noise`` like x0
    (drawn from ``generator`` when None). ``model_fn(x_t, sigmas)`` must return v_pred with
    x0's shape. The squared error and reduction run in fp32 whatever the model's dtype.
    """
    if noise is None:
        noise = torch.randn(
            x0.shape, generator=generator, device=_device_of(generator), dtype=torch.float32
        ).to(x0.device, x0.dtype)
    if noise.shape != x0.shape:
        raise ValueError(f"noise shape {tuple(noise.shape)} != x0 shape {tuple(x0.shape)}")
    x_t = interpolate(x0, noise, sigmas)
    pred = model_fn(x_t, sigmas)
    if pred.shape != x0.shape:
        raise ValueError(
            f"model_fn returned shape {tuple(pred.shape)}, expected x0's {tuple(x0.shape)}"
        )
    target = velocity_target(x0, noise)
    per_sample = (pred.float() - target).square().reshape(x0.shape[0], -1).mean(dim=1)
    weights = loss_weights(sigmas, weighting).to(per_sample.device)
    return (weights * per_sample).mean()
