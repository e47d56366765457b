"""Shared helpers for the DC-AE tests (random non-trivial weights, comparisons)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

from dcgen.autoencoders import DCAEConfig, reduced_config

#: Attention head dim of the tests' reduced DC-AEs. reduced_config divides the presets' 32 by its
#: width divisor, to 2, where a ReLU linear-attention query (two numbers) is often nearly zero
#: and fp32 results of equivalent computations part (see well_conditioned_input). Measured on 12
#: random f64c128-mix models x 6 inputs x encode/decode, dcgen vs diffusers in fp32: 5 of 144
#: outputs off by over 1e-5 of their scale at head dim 2, 0 of 144 at 8 (2026-11-28, this CPU).
TEST_HEAD_DIM = 8


def small_config(name: str, **kwargs: Any) -> DCAEConfig:
    """reduced_config(name) with TEST_HEAD_DIM unless the caller gives attention_head_dim."""
    kwargs.setdefault("attention_head_dim", TEST_HEAD_DIM)
    return reduced_config(name, **kwargs)


def perturb_norms(model: nn.Module, seed: int = 1) -> nn.Module:
    """Make every norm non-identity: BatchNorm running stats and affine, RMSNorm weight/bias
    (diffusers' RMSNorm and dcgen's ChannelRMSNorm both hold ``weight`` and ``bias``)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, nn.BatchNorm2d):
                mod.running_mean.copy_(torch.randn(mod.running_mean.shape, generator=g) * 0.2)
                mod.running_var.copy_(torch.rand(mod.running_var.shape, generator=g) * 1.5 + 0.5)
                mod.weight.copy_(1 + 0.3 * torch.randn(mod.weight.shape, generator=g))
                mod.bias.copy_(0.2 * torch.randn(mod.bias.shape, generator=g))
            elif type(mod).__name__ in ("RMSNorm", "ChannelRMSNorm"):
                mod.weight.copy_(1 + 0.3 * torch.randn(mod.weight.shape, generator=g))
                mod.bias.copy_(0.2 * torch.randn(mod.bias.shape, generator=g))
    return model


def assert_close_scaled(actual: torch.Tensor, expected: torch.Tensor, rel: float = 1e-5) -> None:
    """|actual - expected| <= rel * max(1, max|expected|) everywhere."""
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    scale = max(1.0, expected.abs().max().item())
    err = (actual.float() - expected.float()).abs().max().item()
    assert err <= rel * scale, f"max abs error {err:.3g} > {rel:g} * {scale:.3g}"


def well_conditioned_input(
    fn: Callable[[torch.Tensor], torch.Tensor],
    shape: tuple[int, ...],
    device: str | torch.device = "cpu",
    max_gain: float = 100.0,
    tries: int = 16,
    seed: int = 0,
) -> torch.Tensor:
    """An fp32 input of ``shape`` at which ``fn`` is well-conditioned: nudging it by a relative
    1e-5 in one random direction, either way, moves ``fn``'s output by at most ``max_gain`` x
    1e-5 x its scale. ``fn`` should compute in fp64 (an fp64 copy of the model), so the probe
    sees the function and not its rounding.

    A random DC-AE has ill-conditioned points: a ReLU linear attention query with one component
    just above zero and the rest below divides by nearly zero, so which side of zero the
    component lands on (a matter of rounding) changes the output by O(1) (on 2026-11-28 a 1e-5
    input change moved a SANA preset's fp32 decode by 0.57; diffusers' and dcgen's fp32 encoders
    of one random f64c128 model differed by 0.1). Two equivalent fp32 computations differ there
    by far more than their rounding, which says nothing about either; comparisons draw their
    inputs here (seeded draws, the first that qualifies). Measured on the reduced presets
    (2026-11-28, this CPU): a 1e-6 nudge gains 0.3-50x at ordinary draws and over 1,000x at
    the ill-conditioned ones (a few in a hundred draws), nothing between. Probing both signs of
    the nudge catches every pre-activation nearer zero than the nudge moves it; rounding moves
    some that the one input direction does not, so this lowers the odds without removing them
    (dcgen vs diffusers fp32 on 48 filtered f64c128 draws: 2 of 96 outputs still off by up to
    1e-2). End-to-end comparisons that must not flake compare in fp64 (assert_computes_like)."""
    g = torch.Generator().manual_seed(seed)
    for _ in range(tries):
        x = torch.randn(shape, generator=g)
        nudge = 1e-5 * torch.randn(shape, generator=g)
        with torch.no_grad():
            outs = [fn((x * (1 + s * nudge)).double().to(device)) for s in (0, 1, -1)]
        scale = max(1.0, outs[0].abs().max().item())
        moved = max((o - outs[0]).abs().max().item() for o in outs[1:])
        if moved <= max_gain * 1e-5 * scale:
            return x.to(device)
    raise AssertionError(f"no well-conditioned input of {shape} in {tries} draws")


def well_conditioned_latent(
    model: nn.Module,
    shape: tuple[int, ...],
    device: str | torch.device = "cpu",
    tries: int = 16,
) -> torch.Tensor:
    """A latent of ``shape`` at which ``model``'s plain decode is well-conditioned (see
    well_conditioned_input; probed on an fp64 copy of the model)."""
    import copy

    from dcgen.autoencoders.fused import fused_inference

    exact = copy.deepcopy(model).double()

    def decode(z: torch.Tensor) -> torch.Tensor:
        with fused_inference(False):
            return exact.decode(z)

    return well_conditioned_input(decode, shape, device, tries=tries)


def rel_rms(actual: torch.Tensor, expected: torch.Tensor) -> float:
    diff = (actual.float() - expected.float()).pow(2).mean().sqrt()
    return (diff / expected.float().pow(2).mean().sqrt()).item()


def assert_computes_like(
    model: nn.Module, ref: nn.Module, x: torch.Tensor, z: torch.Tensor, rel: float = 2e-5
) -> None:
    """dcgen's ``model`` encodes ``x`` and decodes ``z`` as diffusers' ``ref`` does: both run
    in fp64 (fp64 copies; the fp32 weights widen exactly), and the fp32 outputs are finite.

    Why fp64: these tests check that two implementations and a weight mapping compute the same
    function. In fp32, a random DC-AE's ill-conditioned points (see well_conditioned_input) let
    the two libraries' rounding orders part (measured on 2026-11-28, head dim 2: 5 of 144
    f64c128 outputs off by over 1e-5 of their scale, one encode by 0.104), which says nothing
    about either; in fp64 what is left is diffusers' RMSNorm taking its statistics in fp32 even
    for fp64 inputs: at most 5.5e-6 of the output scale in 888 comparisons (every reduced
    preset, random models and inputs, this CPU), but 3e-5 at one ill-conditioned head-dim-2
    point, hence the tests' head dim 8 (small_config) as well. ``rel`` = 2e-5 still catches one
    bias off by 1e-3 in every preset, encoder and decoder (a 1e-4 bound let 3 of 22 through).
    The fp32 kernels' own numerics are compared layer by layer elsewhere
    (test_dcae_fused_path, tests/ops)."""
    import copy

    with torch.no_grad():
        assert torch.isfinite(model.encode(x)).all() and torch.isfinite(model.decode(z)).all()
        ours, theirs = copy.deepcopy(model).double(), copy.deepcopy(ref).double()
        assert_close_scaled(ours.encode(x.double()), _ref_encode(theirs, x.double()), rel)
        assert_close_scaled(ours.decode(z.double()), _ref_decode(theirs, z.double()), rel)


def _ref_encode(model, x):  # noqa: ANN001, ANN201
    return model.encode(x).latent


def _ref_decode(model, z):  # noqa: ANN001, ANN201
    return model.decode(z).sample


def peak_cpu_bytes(fn) -> int:  # noqa: ANN001
    """Peak live CPU bytes allocated while fn runs (the profiler's allocation events in time
    order: an op's own allocations at its start, frees as [memory] events)."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    deltas = sorted(
        (e.time_range.start, e.cpu_memory_usage if e.name == "[memory]" else e.self_cpu_memory_usage)
        for e in prof.events()
    )  # fmt: skip
    live = peak = 0
    for _, d in deltas:
        live += d
        peak = max(peak, live)
    return peak
