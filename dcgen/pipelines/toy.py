"""The pipeline `dcgen demo` writes: the toy world's DC-Gen model as a diffusers folder.

It is :class:`DCGenFluxPipeline` (same sampling, same DC-AE ``vae/`` folder) with the toy
world's text encoder in place of CLIP + T5: one module that takes the captions themselves and
returns ``(prompt_embeds, pooled_prompt_embeds)`` (``dcgen.toy.text.ToyTextEncoder``, which
tokenizes by its own word list). So the model the demo trained samples from a text prompt with
``DCGenToyPipeline.from_pretrained(folder)`` or ``dcgen generate --pipeline folder --prompt``,
through the same code paths as an exported FLUX model.

Folder layout: ``transformer/``, ``vae/`` (DC-AE), ``scheduler/``, ``text_encoder/`` (the toy
encoder's ``config.json`` + ``model.safetensors``) and ``model_index.json``, whose
``text_encoder`` entry names the encoder's class. The encoder is not a diffusers or
transformers model, so this class saves and loads it itself, as the DC-AE mixin does the vae.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel

from ..autoencoders import DCAE
from .base import register_components
from .flux import DCGenFluxPipeline

TEXT_ENCODER_FOLDER = "text_encoder"
#: model_index.json entry of the one text encoder class this pipeline loads
TOY_TEXT_ENCODER = ("dcgen.toy.text", "ToyTextEncoder")


def _toy_text_encoder_class() -> type:
    from ..toy.text import ToyTextEncoder  # lazy: the toy package is not needed to import this

    return ToyTextEncoder


class DCGenToyPipeline(DCGenFluxPipeline):
    """DC-Gen FLUX on a DC-AE with a caption-level text encoder (the toy world's).

    ``DCGenToyPipeline(transformer, vae=DCAE, scheduler=..., text_encoder=ToyTextEncoder)``;
    ``pipe(prompt="a large red circle top left", height=128, width=128)``. Without a text
    encoder, pass prompt_embeds + pooled_prompt_embeds as with any dcgen pipeline.
    """

    _optional_components = ["vae", "scheduler", "text_encoder"]
    #: the toy encoder pads every caption to its own length (16 words); the value is unused
    default_max_sequence_length = 16

    def resolve_max_sequence_length(self, max_sequence_length: Any) -> int:
        """None only: the toy encoder cannot truncate or pad to another length, and a value
        given here was silently ignored (PipelineTextEncoder refuses one for the toy family)."""
        if max_sequence_length is not None:
            raise ValueError(
                "max_sequence_length: the toy text encoder pads every caption to its own "
                f"length; expected None (unset), got {max_sequence_length!r}"
            )
        return self.default_max_sequence_length

    def __init__(
        self,
        transformer: FluxTransformer2DModel,
        vae: DCAE | None = None,
        scheduler: FlowMatchEulerDiscreteScheduler | None = None,
        text_encoder: Any = None,
        shift_rule: str = "auto",
    ) -> None:
        # DCGenFluxPipeline.__init__ would register CLIP / T5 slots this pipeline does not have.
        super(DCGenFluxPipeline, self).__init__()
        if vae is not None and not isinstance(vae, DCAE):
            raise TypeError(f"vae: expected a dcgen DCAE, got {type(vae).__name__}")
        if text_encoder is not None and not callable(text_encoder):
            raise TypeError(
                "text_encoder: expected a module called on a list of captions (the toy "
                f"world's ToyTextEncoder), got {type(text_encoder).__name__}"
            )
        self.register_modules(
            transformer=transformer, vae=vae, scheduler=scheduler, text_encoder=text_encoder
        )
        self._init_common(shift_rule)

    # -- text ------------------------------------------------------------------------------

    def _has_text_encoders(self) -> bool:
        return getattr(self, "text_encoder", None) is not None

    def encode_prompt(
        self,
        prompt: list[str],
        device: torch.device,
        max_sequence_length: int,
        negative: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        embeds, pooled = self.text_encoder(list(prompt))
        return embeds.to(device), pooled.to(device), None

    # -- save / load -----------------------------------------------------------------------

    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs: Any) -> None:
        encoder = getattr(self, "text_encoder", None)
        # diffusers cannot save a plain nn.Module: hide it from the saver and write it here.
        self.register_modules(text_encoder=None)
        try:
            super().save_pretrained(save_directory, **kwargs)
        finally:
            self.register_modules(text_encoder=encoder)
        if encoder is None:
            return
        encoder.save_pretrained(Path(save_directory) / TEXT_ENCODER_FOLDER)
        entry = [type(encoder).__module__, type(encoder).__name__]
        register_components(save_directory, {"text_encoder": entry})

    @classmethod
    def from_pretrained(
        cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs: Any
    ) -> DCGenToyPipeline:
        folder = Path(pretrained_model_name_or_path)
        encoder = kwargs.pop("text_encoder", "load")
        if isinstance(encoder, str) and encoder == "load":
            # the dtype the other components load in (diffusers' dtype= / torch_dtype=, one
            # dtype or a per-component dict): the encoder stayed fp32 beside a bf16 pipeline
            dtype = kwargs.get("dtype", kwargs.get("torch_dtype"))
            if isinstance(dtype, dict):
                dtype = dtype.get("text_encoder", dtype.get("default"))
            encoder = _load_text_encoder(folder, dtype if isinstance(dtype, torch.dtype) else None)
        pipe = super().from_pretrained(folder, text_encoder=None, **kwargs)
        pipe.register_modules(text_encoder=encoder)
        return pipe


def _load_text_encoder(folder: Path, dtype: torch.dtype | None = None) -> Any:
    """The folder's toy text encoder (cast to ``dtype`` when given), or None where the folder
    registers none."""
    index = json.loads((folder / "model_index.json").read_text())
    entry = index.get("text_encoder")
    if entry is None or entry == [None, None]:
        return None
    if tuple(entry) != TOY_TEXT_ENCODER:
        raise ValueError(
            f"{folder / 'model_index.json'}: text_encoder is {entry}; DCGenToyPipeline loads "
            f"only {list(TOY_TEXT_ENCODER)}"
        )
    return _toy_text_encoder_class().from_pretrained(folder / TEXT_ENCODER_FOLDER, dtype=dtype)
