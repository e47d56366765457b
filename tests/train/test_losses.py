"""Flow-matching objective: timestep sampling, interpolation, target, loss, guidance."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dcgen.train.losses import (
    flow_matching_loss,
    guidance_values,
    interpolate,
    loss_weights,
    sample_timesteps,
    shift_sigmas,
    velocity_target,
)


@pytest.mark.parametrize("mode", ["logit_normal", "uniform"])
@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_sample_timesteps_range_shape_determinism(mode, shift):
    a = sample_timesteps(4096, torch.Generator().manual_seed(1), mode=mode, shift=shift)
    b = sample_timesteps(4096, torch.Generator().manual_seed(1), mode=mode, shift=shift)
    assert a.shape == (4096,) and a.dtype == torch.float32
    assert bool((a > 0).all()) and bool((a < 1).all())
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    c = sample_timesteps(4096, torch.Generator().manual_seed(2), mode=mode, shift=shift)
    assert not torch.equal(a, c)


def test_sample_timesteps_shift_formula_and_direction():
    base = sample_timesteps(2048, torch.Generator().manual_seed(0), mode="uniform")
    shifted = sample_timesteps(2048, torch.Generator().manual_seed(0), mode="uniform", shift=3.0)
    torch.testing.assert_close(shifted, (3 * base / (1 + 2 * base)).clamp(1e-5, 1 - 1e-5))
    assert shifted.mean() > base.mean()  # s > 1 moves the mass toward noise
    s = torch.tensor([0.0, 0.5, 1.0])
    torch.testing.assert_close(shift_sigmas(s, 3.0), torch.tensor([0.0, 0.75, 1.0]))


def test_logit_normal_is_centred():
    s = sample_timesteps(20000, torch.Generator().manual_seed(0), mode="logit_normal")
    assert abs(float(s.median()) - 0.5) < 0.02


def test_interpolation_and_target_definition():
    x0 = torch.full((2, 3), 2.0)
    noise = torch.full((2, 3), -1.0)
    sig = torch.tensor([0.25, 1.0])
    xt = interpolate(x0, noise, sig)
    torch.testing.assert_close(xt[0], torch.full((3,), 0.75 * 2.0 + 0.25 * -1.0))
    torch.testing.assert_close(xt[1], noise[1])
    torch.testing.assert_close(velocity_target(x0, noise), noise - x0)


def test_oracle_model_has_zero_loss_and_shapes(rng):
    x0 = torch.randn(3, 16, 8, generator=rng)
    noise = torch.randn(3, 16, 8, generator=rng)
    sig = sample_timesteps(3, rng)
    seen = {}

    def oracle(x_t, sigmas):
        seen["shape"], seen["sigmas"] = x_t.shape, sigmas
        # Recover v from x_t and x0: x_t = x0 + sigma * v.
        return (x_t - x0) / sigmas.reshape(-1, 1, 1)

    loss = flow_matching_loss(oracle, x0, sig, noise)
    assert loss.ndim == 0 and loss.dtype == torch.float32
    assert float(loss) < 1e-9
    assert seen["shape"] == x0.shape and seen["sigmas"] is sig
    wrong = flow_matching_loss(lambda x_t, s: torch.zeros_like(x_t), x0, sig, noise)
    torch.testing.assert_close(wrong, (noise - x0).square().mean())


def test_loss_bf16_model_computes_in_fp32(rng):
    x0 = torch.randn(2, 4, 4, generator=rng).bfloat16()
    noise = torch.randn(2, 4, 4, generator=rng).bfloat16()
    loss = flow_matching_loss(lambda x, s: x, x0, torch.tensor([0.3, 0.6]), noise)
    assert loss.dtype == torch.float32


def test_loss_noise_from_generator_and_weighting(rng):
    x0 = torch.randn(4, 10, generator=rng)
    sig = torch.tensor([0.1, 0.4, 0.6, 0.9])
    model = lambda x, s: torch.zeros_like(x)  # noqa: E731
    a = flow_matching_loss(model, x0, sig, generator=torch.Generator().manual_seed(5))
    b = flow_matching_loss(model, x0, sig, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b)
    torch.testing.assert_close(loss_weights(sig, "sigma_sqrt"), sig.pow(-2))
    assert bool((loss_weights(sig, "cosmap") > 0).all())
    noise = torch.randn(4, 10, generator=rng)
    per = (noise - x0).square().mean(1)
    torch.testing.assert_close(
        flow_matching_loss(model, x0, sig, noise, weighting="sigma_sqrt"),
        (per / sig.square()).mean(),
    )
    with pytest.raises(ValueError, match="sigmas"):
        flow_matching_loss(model, x0, sig[:2], noise)
    with pytest.raises(ValueError, match="model_fn"):
        flow_matching_loss(lambda x, s: x[:, :3], x0, sig, noise)


def test_training_a_tiny_model_reduces_loss():
    gen = torch.Generator().manual_seed(0)
    # Data on a line: x0 = a * u for a fixed direction u, so v is learnable from (x_t, sigma).
    u = torch.randn(8, generator=gen)
    x0 = torch.randn(64, 1, generator=gen) * u
    noise = torch.randn(64, 8, generator=gen)
    sig = sample_timesteps(64, gen, mode="uniform")
    model = nn.Sequential(nn.Linear(9, 32), nn.SiLU(), nn.Linear(32, 8))

    def model_fn(x_t, sigmas):
        return model(torch.cat([x_t, sigmas[:, None]], dim=1))

    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    with torch.no_grad():
        first = float(flow_matching_loss(model_fn, x0, sig, noise))
    for _ in range(50):
        loss = flow_matching_loss(model_fn, x0, sig, noise)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        assert float(flow_matching_loss(model_fn, x0, sig, noise)) < 0.7 * first


def test_guidance_values():
    g = guidance_values(1000, torch.Generator().manual_seed(0), low=1.0, high=5.0)
    assert g.shape == (1000,) and bool((g >= 1).all()) and bool((g <= 5).all())
    assert torch.equal(g, guidance_values(1000, torch.Generator().manual_seed(0), 1.0, 5.0))
    torch.testing.assert_close(guidance_values(3, None, 3.5, 3.5), torch.full((3,), 3.5))
    with pytest.raises(ValueError):
        guidance_values(3, None, 5.0, 1.0)
