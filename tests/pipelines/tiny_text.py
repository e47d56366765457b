"""Tiny random text components built in code (nothing downloaded): word-level tokenizers, a CLIP
text model and a T5 encoder of TEXT_DIM width, and pipeline folders holding them."""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from dcgen.adapters import adapter_for
from dcgen.pipelines import DCGenFluxPipeline, DCGenSanaPipeline

from ..adapters.tiny import TEXT_DIM, tiny_dcae, tiny_flux, tiny_sana

WORDS = ["[PAD]", "[UNK]", "a", "red", "blue", "square", "circle", "on", "the", "left"]
PROMPT = "a red square on the left"


def word_tokenizer(max_length: int):  # noqa: ANN201
    import tokenizers
    import transformers

    vocab = {w: i for i, w in enumerate(WORDS)}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", model_max_length=max_length
    )


def tiny_clip():  # noqa: ANN201
    import transformers

    torch.manual_seed(1)
    cfg = transformers.CLIPTextConfig(
        vocab_size=len(WORDS), hidden_size=TEXT_DIM, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=2, max_position_embeddings=16, projection_dim=TEXT_DIM,
        eos_token_id=1, bos_token_id=0,
    )  # fmt: skip
    return transformers.CLIPTextModel(cfg).eval()


def tiny_t5():  # noqa: ANN201
    import transformers

    torch.manual_seed(2)
    cfg = transformers.T5Config(
        vocab_size=len(WORDS), d_model=TEXT_DIM, d_kv=8, d_ff=64, num_layers=1, num_heads=2,
        decoder_start_token_id=0, pad_token_id=0,
    )  # fmt: skip
    return transformers.T5EncoderModel(cfg).eval()


def flux_text_components() -> dict:
    return {
        "text_encoder": tiny_clip(),
        "tokenizer": word_tokenizer(8),
        "text_encoder_2": tiny_t5(),
        "tokenizer_2": word_tokenizer(16),
    }


def sana_text_components() -> dict:
    return {"text_encoder": tiny_t5(), "tokenizer": word_tokenizer(12)}


def save_flux_pipeline(folder: Path, with_text: bool) -> Path:
    """A DC-Gen FLUX pipeline folder on the tiny DC-AE, with or without text components."""
    ae, model = tiny_dcae(), tiny_flux()
    adapter_for(model).replace_latent_layers(ae.latent_channels)
    text = flux_text_components() if with_text else {}
    scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True)
    DCGenFluxPipeline(model, ae, scheduler, **text).save_pretrained(folder)
    return folder


def save_sana_pipeline(folder: Path, with_text: bool) -> Path:
    ae, model = tiny_dcae(), tiny_sana()
    adapter_for(model).replace_latent_layers(ae.latent_channels)
    text = sana_text_components() if with_text else {}
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    DCGenSanaPipeline(model, ae, scheduler, **text).save_pretrained(folder)
    return folder
