"""dcgen's DPM-Solver++ against diffusers' DPMSolverMultistepScheduler (the sampler SANA folders
name) step for step, and as an ODE solver on a flow whose exact solution is known."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import DPMSolverMultistepScheduler

from dcgen.sampling import flow_sigmas, sample_euler
from dcgen.sampling.dpm import (
    DPMSettings,
    dpm_flow_sigmas,
    dpm_settings_from_config,
    sample_dpm_solver,
)

FLOW = dict(use_flow_sigmas=True, prediction_type="flow_prediction")


def _field(seed: int):  # noqa: ANN202
    """A smooth non-linear velocity field of (x, sigma)."""
    a = torch.randn(4, 4, generator=torch.Generator().manual_seed(seed)) * 0.3

    def velocity(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x @ a) + sigma.view(-1, 1, 1, 1) * x

    return velocity


@pytest.mark.parametrize("shift", [1.0, 3.0, 6.5])
@pytest.mark.parametrize("steps", [1, 2, 7, 20, 50])
def test_grid_and_model_timesteps_are_diffusers(steps, shift):
    sched = DPMSolverMultistepScheduler(flow_shift=shift, **FLOW)
    sched.set_timesteps(steps)
    sigmas, model_sigmas = dpm_flow_sigmas(steps, shift)
    assert torch.equal(sigmas, sched.sigmas)
    assert torch.equal((model_sigmas.double() * 1000).round().long(), sched.timesteps)
    assert sigmas[0] < 1 and sigmas[-1] == 0
    # a model trained on float timesteps (FLUX) sees the grid itself
    _, float_sigmas = dpm_flow_sigmas(steps, shift, integer_timesteps=False)
    assert torch.equal(float_sigmas, sigmas[:-1])


@pytest.mark.parametrize("order,solver_type", [(2, "midpoint"), (2, "heun"), (1, "midpoint")])
@pytest.mark.parametrize("steps", [1, 2, 3, 14, 15, 20, 28])
def test_steps_equal_the_diffusers_scheduler(steps, order, solver_type):
    sched = DPMSolverMultistepScheduler(flow_shift=3.0, solver_order=order,
                                        solver_type=solver_type, **FLOW)  # fmt: skip
    sched.set_timesteps(steps)
    velocity = _field(steps)
    noise = torch.randn(2, 3, 4, 4)
    want = noise.clone()
    for t in sched.timesteps:  # the model sees the integer timestep / 1000, as in SanaPipeline
        want = sched.step(velocity(want, (t.float() / 1000).expand(2)), t, want).prev_sample
    settings = dpm_settings_from_config(sched.config)
    assert settings == DPMSettings(order, solver_type, 1000)
    got = sample_dpm_solver(velocity, noise, *dpm_flow_sigmas(steps, 3.0), settings)
    # measured: at most 1.1e-6 (values up to 2.7; this CPU)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


@pytest.mark.parametrize("order", [1, 2])
@pytest.mark.parametrize(("steps", "skip"), [(20, 8), (10, 9), (28, 5), (6, 0)])
def test_a_late_start_equals_the_scheduler_from_its_begin_index(steps, skip, order):
    """Image-to-image under DPM-Solver++: the solver run on the grid's tail equals diffusers'
    scheduler started at that step with set_begin_index (first order on its first step, no
    history)."""
    sched = DPMSolverMultistepScheduler(flow_shift=3.0, solver_order=order, **FLOW)
    sched.set_timesteps(steps)
    sched.set_begin_index(skip)
    velocity = _field(steps + skip)
    start = torch.randn(2, 3, 4, 4)
    want = start.clone()
    for t in sched.timesteps[skip:]:
        want = sched.step(velocity(want, (t.float() / 1000).expand(2)), t, want).prev_sample
    sigmas, model_sigmas = dpm_flow_sigmas(steps, 3.0)
    got = sample_dpm_solver(
        velocity, start, sigmas[skip:], model_sigmas[skip:], DPMSettings(order, "midpoint", 1000)
    )
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def test_second_order_converges_faster_than_euler():
    """Gaussian data N(0, c^2): the exact flow maps noise z at sigma to
    sqrt((1 - sigma)^2 c^2 + sigma^2) z, so the sample at sigma 0 must be c z."""
    c = 0.5

    def velocity(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        s, x = sigma.view(-1, 1).double(), x.double()
        x0 = (1 - s) * c * c / ((1 - s) ** 2 * c * c + s * s) * x  # E[x0 | x_sigma]
        return ((x - x0) / s).float()

    z = torch.randn(4, 1000, generator=torch.Generator().manual_seed(0))
    errors = {}
    for n in (20, 40):
        sigmas, _ = dpm_flow_sigmas(n, 3.0)
        start = z * math.hypot((1 - sigmas[0].item()) * c, sigmas[0].item())
        dpm = sample_dpm_solver(velocity, start, sigmas)
        euler = sample_euler(velocity, start, sigmas)
        errors[n] = ((dpm - c * z).abs().max().item(), (euler - c * z).abs().max().item())
    # measured: DPM 0.054 / 0.015, Euler 0.246 / 0.127 at 20 / 40 steps
    for n, (dpm_err, euler_err) in errors.items():
        assert dpm_err < 0.5 * euler_err, (n, errors)
    assert errors[40][0] < errors[20][0] / 3, errors  # Euler only halves
    assert errors[40][1] > errors[20][1] / 2.5, errors


def test_bad_inputs_are_named():
    velocity = _field(0)
    x = torch.randn(1, 3, 4, 4)
    with pytest.raises(ValueError, match="ending in 0"):
        sample_dpm_solver(velocity, x, torch.tensor([0.9, 0.5]))
    with pytest.raises(ValueError, match="strictly decreasing values below 1"):
        sample_dpm_solver(velocity, x, flow_sigmas(4))  # the Euler grid starts at 1
    sigmas, model_sigmas = dpm_flow_sigmas(4)
    with pytest.raises(ValueError, match=r"model_sigmas: expected 4 values, got shape \(3,\)"):
        sample_dpm_solver(velocity, x, sigmas, model_sigmas[:3])
    with pytest.raises(ValueError, match="order: expected 1 or 2, got 3"):
        DPMSettings(order=3)
    with pytest.raises(ValueError, match="solver_type"):
        DPMSettings(solver_type="bh2")
    with pytest.raises(ValueError, match="num_steps: expected a positive int"):
        dpm_flow_sigmas(0)
    with pytest.raises(ValueError, match="shift: expected a positive finite shift, got 0.0"):
        dpm_flow_sigmas(4, 0.0)
    with pytest.raises(ValueError, match="shift: expected a positive finite shift, got None"):
        dpm_flow_sigmas(4, None)
    for bad in (1, 0, 2.5, True):  # T = 1 collapses the grid to 0, T = 0 divides by zero
        with pytest.raises(ValueError, match=rf"train_timesteps: expected an int >= 2, got {bad}"):
            dpm_flow_sigmas(4, 1.0, bad)
    for key, value in (("algorithm_type", "dpmsolver"), ("prediction_type", "epsilon"),
                       ("use_flow_sigmas", False), ("final_sigmas_type", "sigma_min"),
                       ("thresholding", True), ("use_karras_sigmas", True)):  # fmt: skip
        config = {**FLOW, key: value}
        with pytest.raises(ValueError, match=f"{key}={value!r}.*sampler='euler'"):
            dpm_settings_from_config(config)


def test_model_sigmas_may_be_a_list_of_floats():
    velocity = _field(0)
    x = torch.randn(1, 3, 4, 4)
    sigmas, model_sigmas = dpm_flow_sigmas(4)
    from_tensor = sample_dpm_solver(velocity, x, sigmas, model_sigmas)
    from_list = sample_dpm_solver(velocity, x, sigmas, model_sigmas.tolist())
    torch.testing.assert_close(from_list, from_tensor, rtol=0, atol=0)
