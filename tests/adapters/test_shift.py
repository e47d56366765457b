import math

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from dcgen.sampling import (
    add_noise,
    euler_step,
    flow_sigmas,
    flux_mu,
    flux_shift,
    resolve_shift,
    shift_sigmas,
    sqrt_shift,
    velocity_target,
)


def test_shift_sigmas_hand_values():
    sigmas = torch.tensor([0.0, 0.25, 0.5, 1.0], dtype=torch.float64)
    # s = 3: 3 * 0.5 / (1 + 2 * 0.5) = 0.75; 3 * 0.25 / 1.5 = 0.5
    torch.testing.assert_close(
        shift_sigmas(sigmas, 3.0), torch.tensor([0.0, 0.5, 0.75, 1.0], dtype=torch.float64)
    )
    torch.testing.assert_close(shift_sigmas(sigmas, 1.0), sigmas)
    with pytest.raises(ValueError, match="positive"):
        shift_sigmas(sigmas, 0.0)
    torch.testing.assert_close(shift_sigmas(sigmas, np.float32(3.0)), shift_sigmas(sigmas, 3.0))


@pytest.mark.parametrize("shift", [None, "3", True, float("inf"), -1.0])
def test_a_bad_shift_is_named_not_a_type_error(shift):
    with pytest.raises(
        ValueError, match=rf"shift: expected a positive finite shift, got {shift!r}"
    ):
        flow_sigmas(4, shift)
    with pytest.raises(ValueError, match=r"resolve_shift: constant: expected a positive finite"):
        resolve_shift("constant", 1, 1, constant=shift)


@pytest.mark.parametrize("steps", [0, True, 2.0, "4"])
def test_flow_sigmas_steps_must_be_a_positive_int(steps):
    with pytest.raises(ValueError, match=r"num_steps: expected a positive int"):
        flow_sigmas(steps)


def test_flow_sigmas_accepts_numpy_ints():
    torch.testing.assert_close(flow_sigmas(np.int64(4), 2.0), flow_sigmas(4, 2.0))


def test_flux_mu_rule():
    assert flux_mu(256) == pytest.approx(0.5)
    assert flux_mu(4096) == pytest.approx(1.15)
    assert flux_mu(2176) == pytest.approx(0.825)  # midpoint
    assert flux_shift(4096) == pytest.approx(math.exp(1.15))
    # 4K with f64c128: 64x64 tokens, same shift as base FLUX at 1K (64x64 tokens of 2x2 f8).
    assert resolve_shift("flux", 64 * 64, 128) == pytest.approx(math.exp(1.15))
    # 100,000 px squared on f32 (9.8M tokens): math.exp raised a bare OverflowError, a
    # traceback out of `dcgen generate`
    with pytest.raises(ValueError, match=r"mu = 1653 at 9765625 image tokens"):
        flux_shift(3125 * 3125)


def test_sqrt_rule():
    # 1024^2 with f32c32: 32x32 tokens of 32 channels -> sqrt(1024 * 32 / 4096) = sqrt(8)
    assert sqrt_shift(1024, 32) == pytest.approx(math.sqrt(8))
    assert sqrt_shift(4096, 1) == pytest.approx(1.0)
    assert resolve_shift("sqrt", 1024, 32) == pytest.approx(2 * math.sqrt(2))
    assert resolve_shift("constant", 1, 1, constant=3.0) == 3.0
    assert resolve_shift("none", 1, 1) == 1.0
    with pytest.raises(ValueError, match="unknown shift rule"):
        resolve_shift("bogus", 1, 1)


def test_flow_sigmas_match_diffusers_flux_schedule():
    steps, tokens = 20, 1024
    ours = flow_sigmas(steps, flux_shift(tokens))
    sched = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True)
    sched.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=flux_mu(tokens))
    torch.testing.assert_close(ours, sched.sigmas.float(), atol=1e-6, rtol=0)
    assert ours[0] == 1.0 and ours[-1] == 0.0 and len(ours) == steps + 1


def test_flow_conventions_and_euler_exact_on_straight_path():
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(2, 3, 4, 4, generator=g), torch.randn(2, 3, 4, 4, generator=g)
    v = velocity_target(x0, noise)
    xt = add_noise(x0, noise, torch.tensor([1.0, 1.0]))
    torch.testing.assert_close(xt, noise)
    sig = flow_sigmas(5, 2.0)
    for i in range(5):  # the true velocity is constant along the straight path: Euler is exact
        xt = euler_step(xt, v, sig[i], sig[i + 1])
    torch.testing.assert_close(xt, x0, atol=1e-5, rtol=0)
