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


def test_sana_names_a_passed_guidance_scale_of_3_5_it_does_not_use(caplog):
    # 3.5 was the "not passed" sentinel, so SanaPipeline's guidance_scale=3.5 (its CFG scale
    # there) was dropped silently while any other value was named
    pipe = _sana()
    kw = dict(prompt_embeds=torch.randn(1, 5, TEXT_DIM), true_cfg_scale=1.0, **SMALL)
    with caplog.at_level("WARNING", logger="dcgen.pipelines.base"):
        pipe(**kw)
        assert "guidance_scale" not in caplog.text  # not passed: nothing to say
        pipe(guidance_scale=3.5, **kw)
    assert "guidance_scale=3.5 is not used" in caplog.text
    assert "true_cfg_scale (now 1)" in caplog.text


def test_a_guidance_embedding_model_defaults_to_3_5():
    pipe = _flux()
    seen = []
    pipe.transformer.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["guidance"]), with_kwargs=True
    )
    embeds, pooled = torch.randn(1, 5, TEXT_DIM), torch.randn(1, TEXT_DIM)
    pipe(prompt_embeds=embeds, pooled_prompt_embeds=pooled, **SMALL)
    pipe(prompt_embeds=embeds, pooled_prompt_embeds=pooled, guidance_scale=2.0, **SMALL)
    assert [g.tolist() for g in seen] == [[3.5], [2.0]]


def test_callbacks_read_diffusers_pipeline_properties():
    # diffusers' callback pattern `if i == int(pipe.num_timesteps * 0.5)` raised AttributeError
    pipe = _flux()
    embeds, pooled = torch.randn(1, 5, TEXT_DIM), torch.randn(1, TEXT_DIM)
    seen, in_model = [], []
    pipe.transformer.register_forward_pre_hook(
        lambda module, args, kwargs: in_model.append(
            (pipe.current_timestep.item(), kwargs["timestep"].item() * 1000)
        ),
        with_kwargs=True,
    )

    def callback(p, i, t, kw):  # noqa: ANN001, ANN202
        seen.append((i, i == int(p.num_timesteps * 0.5), p.num_timesteps, p.current_timestep,
                     t, p.guidance_scale, p.do_classifier_free_guidance,
                     p.joint_attention_kwargs, p.attention_kwargs))  # fmt: skip
        return kw

    pipe(prompt_embeds=embeds, pooled_prompt_embeds=pooled, height=64, width=64,
         num_inference_steps=4, guidance_scale=2.0, output_type="latent",
         joint_attention_kwargs={"scale": 1.0}, callback_on_step_end=callback)  # fmt: skip
    assert [row[:3] for row in seen] == [(0, False, 4), (1, False, 4), (2, True, 4),
                                         (3, False, 4)]  # fmt: skip
    for _, _, _, current, t, guidance, cfg, joint, attention in seen:
        assert torch.equal(current, t) and guidance == 2.0 and cfg is False
        assert joint == attention == {"scale": 1.0}
    # during each model call: that step's timestep (the transformer gets sigma = t / 1000)
    assert len(in_model) == 4
    for current, passed in in_model:
        assert abs(current - passed) < 1e-3
    assert pipe.current_timestep is None  # outside the loop, as FluxPipeline

    # image-to-image runs the steps strength leaves; a SANA model has no guidance embedding
    # and samples with CFG (true_cfg_scale)
    sana = _sana()
    counts = []

    def count(p, i, t, kw):  # noqa: ANN001, ANN202
        counts.append((p.num_timesteps, p.guidance_scale, p.do_classifier_free_guidance))
        return kw

    sana(prompt_embeds=torch.randn(1, 5, TEXT_DIM),
         negative_prompt_embeds=torch.zeros(1, 5, TEXT_DIM), image=torch.rand(1, 3, 64, 64),
         strength=0.5, height=64, width=64, num_inference_steps=4, output_type="latent",
         sampler="euler", callback_on_step_end=count)  # fmt: skip
    assert counts == [(2, None, True)] * 2


def test_strength_without_an_image_is_named():
    # it was dropped silently: the call sampled text-to-image whatever strength said
    pipe = _flux()
    kw = dict(prompt_embeds=torch.randn(1, 5, TEXT_DIM), pooled_prompt_embeds=torch.randn(1, 32),
              **SMALL)  # fmt: skip
    with pytest.raises(ValueError, match=r"strength: .* pass image=\.\.\. with it"):
        pipe(strength=0.3, **kw)
    # with an image, None is FluxImg2ImgPipeline's 0.6
    image = torch.rand(1, 3, 64, 64)
    kw["num_inference_steps"] = 5
    default = pipe(image=image, generator=torch.Generator().manual_seed(0), **kw).images
    given = pipe(image=image, strength=0.6, generator=torch.Generator().manual_seed(0), **kw)
    torch.testing.assert_close(default, given.images, rtol=0, atol=0)
