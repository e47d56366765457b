"""DC-Gen SANA pipeline: SanaTransformer2DModel on a DC-AE (SANA's native autoencoder family)."""

from __future__ import annotations

from typing import Any

import torch
from diffusers import FlowMatchEulerDiscreteScheduler, SanaTransformer2DModel

from ..autoencoders import DCAE
from .flux import DCGenFluxPipeline


class DCGenSanaPipeline(DCGenFluxPipeline):
    """SANA on a DC-AE. Text: ``tokenizer`` + ``text_encoder`` (e.g. Gemma-2) last hidden
    state with its attention mask, or prompt_embeds (+ prompt_attention_mask). No pooled
    embedding. shift_rule 'auto' = the scheduler's constant ``shift`` (SANA's flow_shift);
    guidance_scale only feeds guidance-embedding variants, CFG is true_cfg_scale."""

    _optional_components = ["vae", "scheduler", "text_encoder", "tokenizer"]
    model_cpu_offload_seq = "text_encoder->transformer->vae"
    default_shift_rule = "constant"
    needs_pooled = False

    def __init__(
        self,
        transformer: SanaTransformer2DModel,
        vae: DCAE | None = None,
        scheduler: FlowMatchEulerDiscreteScheduler | None = None,
        text_encoder: Any = None,
        tokenizer: Any = None,
        shift_rule: str = "auto",
    ) -> None:
        # Skip DCGenFluxPipeline.__init__ (different components); keep the DCAE handling.
        super(DCGenFluxPipeline, self).__init__()
        if vae is not None and not isinstance(vae, DCAE):
            raise TypeError(f"vae: expected a dcgen DCAE, got {type(vae).__name__}")
        self.register_modules(
            transformer=transformer, vae=vae, scheduler=scheduler, text_encoder=text_encoder,
            tokenizer=tokenizer,
        )  # fmt: skip
        self._init_common(shift_rule)

    def _has_text_encoders(self) -> bool:
        return self.text_encoder is not None and self.tokenizer is not None

    def encode_prompt(
        self, prompt: list[str], device: torch.device, max_sequence_length: int
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        tok = self.tokenizer(
            prompt, padding="max_length", max_length=max_sequence_length, truncation=True,
            add_special_tokens=True, return_tensors="pt",
        )  # fmt: skip
        mask = tok.attention_mask.to(device)
        embeds = self.text_encoder(tok.input_ids.to(device), attention_mask=mask)[0]
        return embeds, None, mask
