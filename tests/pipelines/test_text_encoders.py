"""The pipelines' own text-encoder path: tiny random CLIP + T5 (FLUX) and a tiny encoder (SANA)
with word-level tokenizers built in code (nothing downloaded; tests/pipelines/tiny_text.py). Encoding inside the pipeline must
give exactly what passing the same encoders' outputs as prompt embeddings gives."""

from __future__ import annotations

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from dcgen.adapters import adapter_for
from dcgen.pipelines import DCGenFluxPipeline, DCGenSanaPipeline

from ..adapters.tiny import tiny_dcae, tiny_flux, tiny_sana
from .tiny_text import PROMPT, tiny_clip, tiny_t5, word_tokenizer

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")


def _images(pipe, **kwargs):
    return pipe(
        height=64, width=64, num_inference_steps=2, output_type="pt",
        generator=torch.Generator().manual_seed(0), **kwargs,
    ).images  # fmt: skip


def test_flux_pipeline_encodes_prompts_itself():
    ae, model = tiny_dcae(), tiny_flux()
    adapter_for(model).replace_latent_layers(ae.latent_channels)
    clip_tok, t5_tok = word_tokenizer(8), word_tokenizer(16)
    clip, t5 = tiny_clip(), tiny_t5()
    pipe = DCGenFluxPipeline(
        model, ae, FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True),
        text_encoder=clip, tokenizer=clip_tok, text_encoder_2=t5, tokenizer_2=t5_tok,
    )  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        ids = clip_tok([PROMPT], padding="max_length", max_length=8, return_tensors="pt")
        pooled = clip(ids.input_ids).pooler_output
        ids2 = t5_tok([PROMPT], padding="max_length", max_length=16, return_tensors="pt")
        embeds = t5(ids2.input_ids)[0]
    by_text = _images(pipe, prompt=PROMPT, max_sequence_length=16)
    by_embeds = _images(pipe, prompt_embeds=embeds, pooled_prompt_embeds=pooled)
    assert torch.equal(by_text, by_embeds)
    other = _images(pipe, prompt="a blue circle", max_sequence_length=16)
    assert not torch.equal(by_text, other), "the prompt must reach the model"


def test_sana_pipeline_encodes_prompts_with_mask():
    ae, model = tiny_dcae(), tiny_sana()
    adapter_for(model).replace_latent_layers(ae.latent_channels)
    tok, enc = word_tokenizer(12), tiny_t5()  # any encoder with a last hidden state works
    pipe = DCGenSanaPipeline(
        model, ae, FlowMatchEulerDiscreteScheduler(shift=3.0), text_encoder=enc, tokenizer=tok,
        complex_human_instruction=False,
    )  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        ids = tok([PROMPT], padding="max_length", max_length=12, return_tensors="pt")
        embeds = enc(ids.input_ids, attention_mask=ids.attention_mask)[0]
    by_text = _images(pipe, true_cfg_scale=1.0, prompt=PROMPT, max_sequence_length=12)
    by_embeds = _images(
        pipe, true_cfg_scale=1.0, prompt_embeds=embeds, prompt_attention_mask=ids.attention_mask
    )
    assert torch.equal(by_text, by_embeds)
    # by default the pipeline encodes as diffusers' SanaPipeline does, instruction prefix included
    from diffusers import SanaPipeline

    from dcgen.pipelines.sana import sana_instruction

    pipe.register_to_config(complex_human_instruction=True)
    with torch.no_grad():
        e, m, _, _ = SanaPipeline(tokenizer=tok, text_encoder=enc, vae=None, transformer=None,
                                  scheduler=None).encode_prompt(
            PROMPT, do_classifier_free_guidance=False, max_sequence_length=12,
            complex_human_instruction=sana_instruction(),
        )  # fmt: skip
    by_text = _images(pipe, true_cfg_scale=1.0, prompt=PROMPT, max_sequence_length=12)
    assert torch.equal(
        by_text, _images(pipe, true_cfg_scale=1.0, prompt_embeds=e, prompt_attention_mask=m)
    )
    assert not torch.equal(by_text, by_embeds)
    # SANA's default is CFG 4.5 against the empty prompt, as diffusers' SanaPipeline samples
    default = _images(pipe, prompt=PROMPT, max_sequence_length=12)
    cfg = _images(pipe, prompt=PROMPT, negative_prompt="", true_cfg_scale=4.5,
                  max_sequence_length=12)  # fmt: skip
    assert torch.equal(default, cfg) and not torch.equal(default, by_text)
