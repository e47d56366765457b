"""Shared helpers for the DC-AE tests (random non-trivial weights, comparisons)."""

from __future__ import annotations

import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile


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


def well_conditioned_latent(
    model: nn.Module,
    shape: tuple[int, ...],
    device: str | torch.device = "cpu",
    rel: float = 1e-4,
    tries: int = 8,
) -> torch.Tensor:
    """A latent of ``shape`` at which ``model``'s plain fp32 decode is well-conditioned: a
    relative 1e-6 change of the latent moves the image by under a tenth of ``rel`` x its scale.

    A random DC-AE has ill-conditioned points (a ReLU linear attention query whose positive part
    is nearly zero divides by nearly zero: on 2026-11-28 a 1e-5 input change moved a SANA
    preset's fp32 decode by 0.57). There two equivalent fp32 paths (a kernel and its reference,
    banded and unbanded sums) differ by far more than their rounding, which says nothing about
    the kernel; so comparisons at ``rel`` draw their latent here (seeded draws, first that
    qualifies)."""
    from dcgen.autoencoders.fused import fused_inference

    g = torch.Generator().manual_seed(0)
    for _ in range(tries):
        z = torch.randn(shape, generator=g)
        nudge = 1 + 1e-6 * torch.randn(shape, generator=g)
        with torch.no_grad(), fused_inference(False):
            a = model.decode(z.to(device)).float()
            b = model.decode((z * nudge).to(device)).float()
        scale = max(1.0, a.abs().max().item())
        if (a - b).abs().max().item() <= rel * scale / 10:
            return z.to(device)
    raise AssertionError(f"no well-conditioned latent of {shape} in {tries} draws")


def rel_rms(actual: torch.Tensor, expected: torch.Tensor) -> float:
    diff = (actual.float() - expected.float()).pow(2).mean().sqrt()
    return (diff / expected.float().pow(2).mean().sqrt()).item()


def assert_matches_reference(actual, ref_model, call, inp, rel: float = 1e-5) -> None:
    """``actual`` equals ``call(ref_model, inp)`` within ``rel`` of the output scale, or, where
    the reference itself is that far off in fp32 (random-weight linear attention with head dim 2
    has near-zero normalisers on some samples), is at least as close to the reference's fp64
    result as the reference's own fp32 result is (within a factor 2)."""
    import copy
    import warnings

    expected = call(ref_model, inp)
    scale = max(1.0, expected.abs().max().item())
    err = (actual.float() - expected.float()).abs().max().item()
    if err <= rel * scale:
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        exact = call(copy.deepcopy(ref_model).double(), inp.double())
    ref_err = (expected.double() - exact).abs().max().item()
    our_err = (actual.double() - exact).abs().max().item()
    assert our_err <= max(rel * scale, 2 * ref_err), (
        f"max abs error vs diffusers {err:.3g} > {rel:g} * {scale:.3g}; vs diffusers in fp64 "
        f"{our_err:.3g} > 2 * diffusers' own fp32 error {ref_err:.3g}"
    )


def ref_encode(model, x):
    return model.encode(x).latent


def ref_decode(model, z):
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
