"""DC-Gen SANA pipeline: SanaTransformer2DModel on a DC-AE (SANA's native autoencoder family)."""

from __future__ import annotations

import functools
from typing import Any

import torch
from diffusers import (
    DPMSolverMultistepScheduler,
    FlowMatchEulerDiscreteScheduler,
    SanaTransformer2DModel,
)
from diffusers.loaders import SanaLoraLoaderMixin

from ..autoencoders import DCAE
from ..sampling.shift import shift_sigmas
from .base import scheduler_constant_shift
from .flux import DCGenFluxPipeline
from .lora import latent_safe_lora_state_dict

#: diffusers' SanaPipeline samples with classifier-free guidance 4.5 by default.
SANA_CFG_SCALE = 4.5
#: the flow shift SANA's 1K checkpoints ship (scheduler flow_shift): what a pipeline without a
#: scheduler samples at, and export's default
SANA_FLOW_SHIFT = 3.0


@functools.cache
def _diffusers_instruction() -> tuple[str, ...]:
    import inspect

    from diffusers import SanaPipeline

    default = inspect.signature(SanaPipeline.__call__).parameters["complex_human_instruction"]
    return tuple(default.default or ())


def sana_instruction() -> list[str]:
    """The "complex human instruction" SANA prefixes to every (positive) prompt before Gemma
    encodes it: read (once) from diffusers' SanaPipeline defaults, the reference this recipe
    follows, so dcgen encodes what a SANA checkpoint is sampled with there and keeps no copy."""
    return list(_diffusers_instruction())


def prompt_instruction(enabled: bool, negative: bool) -> list[str] | None:
    """The instruction for one encode_gemma call: SANA's, on positive prompts only."""
    return sana_instruction() if enabled and not negative else None


def encode_gemma(
    tokenizer: Any,
    text_encoder: Any,
    prompt: list[str],
    device: torch.device,
    max_sequence_length: int,
    instruction: list[str] | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """SANA's prompt encoding: (embeds (B, max_sequence_length, D), attention mask).

    Each prompt is lower-cased and stripped; with ``instruction``, its lines joined by newlines
    are put in front and the token budget grows by the instruction's length, so the prompt
    itself keeps ``max_sequence_length`` - 2 tokens. The text encoder sees the whole
    right-padded sequence with its mask; the output keeps the first token (BOS) and the last
    ``max_sequence_length`` - 1 positions: the prompt's tokens and their padding, the
    instruction dropped (SANA paper, section 3.1)."""
    if max_sequence_length < 2:
        raise ValueError(f"max_sequence_length: expected at least 2, got {max_sequence_length}")
    tokenizer.padding_side = "right"
    texts = [p.lower().strip() for p in prompt]
    length = max_sequence_length
    if instruction:
        prefix = "\n".join(instruction)
        texts = [prefix + t for t in texts]
        length = len(tokenizer.encode(prefix)) + max_sequence_length - 2
    tok = tokenizer(
        texts, padding="max_length", max_length=length, truncation=True,
        add_special_tokens=True, return_tensors="pt",
    )  # fmt: skip
    mask = tok.attention_mask.to(device)
    embeds = text_encoder(tok.input_ids.to(device), attention_mask=mask)[0]
    keep = [0, *range(length - max_sequence_length + 1, length)]
    return embeds[:, keep], mask[:, keep]


class DCGenSanaPipeline(SanaLoraLoaderMixin, DCGenFluxPipeline):
    """SANA on a DC-AE. Text: ``tokenizer`` + ``text_encoder`` (e.g. Gemma-2) last hidden
    state with its attention mask (encode_gemma: SANA's instruction prefix on positive prompts
    unless ``complex_human_instruction=False``), or prompt_embeds (+ prompt_attention_mask).
    No pooled embedding. shift_rule 'auto' = the scheduler's constant ``shift`` (SANA's
    flow_shift; 3.0, as SANA 1K ships, without a scheduler); guidance_scale only feeds
    guidance-embedding variants, CFG is true_cfg_scale (default 4.5, as diffusers'
    SanaPipeline, for models without guidance embeddings). The
    sampler follows the scheduler: a SANA folder's DPMSolverMultistepScheduler gives
    DPM-Solver++ 2M (the images diffusers' SanaPipeline samples), an Euler scheduler Euler.
    SANA LoRAs load with diffusers' ``load_lora_weights`` (SanaLoraLoaderMixin); their
    patch_embed / proj_out entries are skipped (dcgen.pipelines.lora)."""

    lora_state_dict = latent_safe_lora_state_dict(SanaLoraLoaderMixin, ("patch_embed", "proj_out"))

    _optional_components = ["vae", "scheduler", "text_encoder", "tokenizer"]
    model_cpu_offload_seq = "text_encoder->transformer->vae"
    default_shift_rule = "constant"
    default_flow_shift = SANA_FLOW_SHIFT  # without a scheduler it sampled unshifted (1.0)
    needs_pooled = False
    default_max_sequence_length = 300  # Gemma tokens, as SanaPipeline
    #: encode_gemma keeps the BOS token and at least one prompt position
    sequence_length_bounds = (2, None)
    default_true_cfg_scale = SANA_CFG_SCALE

    def __init__(
        self,
        transformer: SanaTransformer2DModel,
        vae: DCAE | None = None,
        scheduler: FlowMatchEulerDiscreteScheduler | DPMSolverMultistepScheduler | None = None,
        text_encoder: Any = None,
        tokenizer: Any = None,
        shift_rule: str = "auto",
        complex_human_instruction: bool = True,
    ) -> None:
        # Skip DCGenFluxPipeline.__init__ (different components); keep the DCAE handling.
        super(DCGenFluxPipeline, self).__init__()
        if vae is not None and not isinstance(vae, DCAE):
            raise TypeError(f"vae: expected a dcgen DCAE, got {type(vae).__name__}")
        self.register_modules(
            transformer=transformer, vae=vae, scheduler=scheduler, text_encoder=text_encoder,
            tokenizer=tokenizer,
        )  # fmt: skip
        self.register_to_config(complex_human_instruction=bool(complex_human_instruction))
        self._init_common(shift_rule)

    def _has_text_encoders(self) -> bool:
        return self.text_encoder is not None and self.tokenizer is not None

    def _euler_grid(self, num_steps: int) -> torch.Tensor | None:
        """SanaPipeline passes its scheduler no sigmas: a FlowMatchEulerDiscreteScheduler then
        spaces them from 1 to its sigma_min, which is 1/T already shifted at construction, and
        shifts the grid again; dcgen follows it. A dynamic-shifting config (which SanaPipeline
        refuses) samples as the same config at its fixed shift, as _shift_for says."""
        sched = getattr(self, "scheduler", None)
        if type(sched).__name__ != "FlowMatchEulerDiscreteScheduler":
            return None
        cfg = sched.config
        # fp32 as diffusers computes it, whatever torch's default dtype
        steps = int(cfg.get("num_train_timesteps", 1000) or 1000)
        low = torch.tensor([1.0 / steps], dtype=torch.float32)
        low = shift_sigmas(low.double(), scheduler_constant_shift(cfg))
        return torch.linspace(1.0, float(low), num_steps, dtype=torch.float64)

    def encode_prompt(
        self,
        prompt: list[str],
        device: torch.device,
        max_sequence_length: int,
        negative: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        embeds, mask = encode_gemma(
            self.tokenizer, self.text_encoder, prompt, device, max_sequence_length,
            prompt_instruction(self.config.complex_human_instruction, negative),
        )  # fmt: skip
        return embeds, None, mask
