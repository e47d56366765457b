"""Numbers dcgen computes in fp32 stay fp32 under a user's torch.set_default_dtype."""

from __future__ import annotations

import pytest
import torch

from dcgen.adapters import adapter_for

from .adapters.tiny import tiny_dcae, tiny_sana


@pytest.mark.parametrize("default", [torch.bfloat16, torch.float16])
def test_the_sana_euler_grid_does_not_follow_the_default_dtype(default):
    # its last sigma was made in the default dtype (rounded to bf16 / fp16) before the shift
    from diffusers import FlowMatchEulerDiscreteScheduler

    from dcgen.pipelines import DCGenSanaPipeline

    ae, model = tiny_dcae(), tiny_sana()
    adapter_for(model).replace_latent_layers(ae.latent_channels)
    pipe = DCGenSanaPipeline(model, ae, FlowMatchEulerDiscreteScheduler(shift=3.0))
    want = pipe._euler_grid(4)
    torch.set_default_dtype(default)
    try:
        got = pipe._euler_grid(4)
    finally:
        torch.set_default_dtype(torch.float32)
    assert torch.equal(got, want)


@pytest.mark.parametrize("default", [torch.bfloat16, torch.float64])
def test_training_noise_does_not_follow_the_default_dtype(default):
    # the noise and caption-dropout draws came out in the default dtype, from another stream
    from dcgen.train.loop import StepRandom

    def draw() -> tuple[torch.Tensor, torch.Tensor]:
        r = StepRandom(seed=0, step=5, global_size=4, shard=slice(0, 4), device=torch.device("cpu"))
        return r.randn(2, 3), r.uniform()

    want = draw()
    torch.set_default_dtype(default)
    try:
        got = draw()
    finally:
        torch.set_default_dtype(torch.float32)
    for a, b in zip(got, want, strict=True):
        assert a.dtype == torch.float32 and torch.equal(a, b)
