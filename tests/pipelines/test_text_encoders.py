"""The pipelines' own text-encoder path: tiny random CLIP + T5 (FLUX) and a tiny encoder (SANA)
with word-level tokenizers built in code (nothing downloaded). Encoding inside the pipeline must
give exactly what passing the same encoders' outputs as prompt embeddings gives."""

from __future__ import annotations

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from dcgen.adapters import adapter_for
from dcgen.pipelines import DCGenFluxPipeline, DCGenSanaPipeline

from ..adapters.tiny import TEXT_DIM, tiny_dcae, tiny_flux, tiny_sana

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

WORDS = ["[PAD]", "[UNK]", "a", "red", "blue", "square", "circle", "on", "the", "left"]
PROMPT = "a red square on the left"


def word_tokenizer(max_length: int):
    vocab = {w: i for i, w in enumerate(WORDS)}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", model_max_length=max_length
    )


def tiny_clip():
    torch.manual_seed(1)
    cfg = transformers.CLIPTextConfig(
        vocab_size=len(WORDS), hidden_size=TEXT_DIM, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=2, max_position_embeddings=16, projection_dim=TEXT_DIM,
        eos_token_id=1,
    )  # fmt: skip
    return transformers.CLIPTextModel(cfg).eval()


def tiny_t5():
    torch.manual_seed(2)
    cfg = transformers.T5Config(
        vocab_size=len(WORDS), d_model=TEXT_DIM, d_kv=8, d_ff=64, num_layers=1, num_heads=2,
        decoder_start_token_id=0, pad_token_id=0,
    )  # fmt: skip
    return transformers.T5EncoderModel(cfg).eval()


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
        model, ae, FlowMatchEulerDiscreteScheduler(shift=3.0), text_encoder=enc, tokenizer=tok
    )
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        ids = tok([PROMPT], padding="max_length", max_length=12, return_tensors="pt")
        embeds = enc(ids.input_ids, attention_mask=ids.attention_mask)[0]
    by_text = _images(pipe, prompt=PROMPT, max_sequence_length=12)
    by_embeds = _images(pipe, prompt_embeds=embeds, prompt_attention_mask=ids.attention_mask)
    assert torch.equal(by_text, by_embeds)
