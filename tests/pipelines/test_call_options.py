"""__call__ options checked and exposed as diffusers' pipelines do: max_sequence_length
bounds, the text encoders' LoRA scale, guidance_scale on models without a guidance embedding,
strength without an image, and the properties callbacks read (num_timesteps, ...)."""

from __future__ import annotations

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from dcgen.adapters import adapter_for
from dcgen.pipelines import DCGenFluxPipeline, DCGenSanaPipeline, DCGenToyPipeline

from ..adapters.tiny import TEXT_DIM, tiny_dcae, tiny_flux, tiny_sana
from .tiny_text import PROMPT, flux_text_components, sana_text_components


def _flux(**text_components) -> DCGenFluxPipeline:  # noqa: ANN003
    ae, model = tiny_dcae(), tiny_flux()
    adapter_for(model).replace_latent_layers(ae.latent_channels)
    scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True)
    pipe = DCGenFluxPipeline(model, ae, scheduler, **text_components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _sana(**text_components) -> DCGenSanaPipeline:  # noqa: ANN003
    ae, model = tiny_dcae(), tiny_sana()
    adapter_for(model).replace_latent_layers(ae.latent_channels)
    pipe = DCGenSanaPipeline(model, ae, FlowMatchEulerDiscreteScheduler(shift=3.0),
                             **text_components)  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _toy() -> DCGenToyPipeline:
    from dcgen.toy.text import TextEncoderConfig, ToyTextEncoder

    ae, model = tiny_dcae(), tiny_flux()
    adapter_for(model).replace_latent_layers(ae.latent_channels)
    torch.manual_seed(0)
    encoder = ToyTextEncoder(TextEncoderConfig(dim=TEXT_DIM, layers=1, heads=2,
                                               pooled_dim=TEXT_DIM))  # fmt: skip
    pipe = DCGenToyPipeline(model, ae, FlowMatchEulerDiscreteScheduler(), text_encoder=encoder)
    pipe.set_progress_bar_config(disable=True)
    return pipe


SMALL = dict(height=64, width=64, num_inference_steps=1, output_type="latent")


@pytest.mark.parametrize("value", [0, -3, 1.5, "8", 513, True])
def test_flux_max_sequence_length_outside_t5s_range_is_named(value):
    # 0 failed as a reshape inside the transformer, -3 as an OverflowError, 1.5 / "8" as a
    # TypeError in the tokenizer, and 600 ran (diffusers' FluxPipeline refuses > 512)
    pipe = _flux(**flux_text_components())
    with pytest.raises(ValueError, match=r"max_sequence_length: expected an int in \[1, 512\]"):
        pipe(PROMPT, max_sequence_length=value, **SMALL)


def test_flux_max_sequence_length_in_range_sets_the_t5_tokens():
    pipe = _flux(**flux_text_components())
    seen = []
    pipe.transformer.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["encoder_hidden_states"].shape[1]),
        with_kwargs=True,
    )
    pipe(PROMPT, max_sequence_length=7, **SMALL)
    assert seen == [7]


@pytest.mark.parametrize("value", [0, 1, 1.5, "8", 2.0])
def test_sana_max_sequence_length_below_its_bos_and_one_token_is_named(value):
    pipe = _sana(**sana_text_components())
    with pytest.raises(ValueError, match=r"max_sequence_length: expected an int >= 2"):
        pipe(PROMPT, max_sequence_length=value, **SMALL)


def test_the_toy_pipeline_refuses_a_max_sequence_length_it_cannot_honour():
    pipe = _toy()
    # the toy encoder pads to its own 16 words whatever is asked: 3 was silently ignored
    with pytest.raises(ValueError, match="max_sequence_length: the toy text encoder"):
        pipe("a red circle", max_sequence_length=3, **SMALL)
    assert pipe("a red circle", **SMALL).images.shape[0] == 1  # unset: its own length
