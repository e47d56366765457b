"""Caption dropout: training the unconditional prediction that classifier-free guidance uses.

SANA samples with CFG: every step also predicts the velocity for the empty negative prompt.
A DC-Gen fine-tune that only ever sees real captions moves the new embedder / head (and the
LoRA) for the conditional prediction alone, and the unconditional one in the new latent space
is never trained. Base models learn it by replacing a fraction of captions with the empty
prompt (caption dropout); ``TrainConfig.caption_dropout`` does the same in stages 2 and 3.

The "empty prompt" is what the pipelines encode as the default negative: "" through the base
model's own text encoders (SANA: without its instruction prefix). ``dcgen precompute`` writes it
next to the cache as ``null_text.safetensors`` (one caption's tensors, no batch dimension)
whenever it has a text encoder, or a text-embeddings table with a "" entry.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .._files import atomic_write

NULL_TEXT_NAME = "null_text.safetensors"
NULL_TEXT_FORMAT = "dcgen.null_text"


def encode_null_text(
    table: Any, fn: Callable[..., Mapping[str, torch.Tensor]] | None
) -> dict[str, torch.Tensor] | None:
    """The empty prompt's text tensors (no batch dimension), from ``fn`` (a
    PipelineTextEncoder encodes it as a negative prompt) or else a table's "" entry; None when
    neither can say."""
    from ..pipelines.text_encoders import PipelineTextEncoder

    if fn is not None:
        out = fn([""], negative=True) if isinstance(fn, PipelineTextEncoder) else fn([""])
    elif table is not None and "" in table:
        out = table([""])
    else:
        return None
    return {name: t[0].detach().cpu().contiguous() for name, t in out.items()}


def save_null_text(
    out_dir: str | Path, tensors: Mapping[str, torch.Tensor], dtype: torch.dtype | None
) -> Path:
    """Write ``null_text.safetensors`` into ``out_dir`` atomically; floating tensors in
    ``dtype`` (the cache's), masks as they are."""
    path = Path(out_dir) / NULL_TEXT_NAME
    stored = {
        k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).contiguous()
        for k, v in tensors.items()
    }
    atomic_write(
        path,
        lambda tmp: save_file(stored, tmp, metadata={"format": NULL_TEXT_FORMAT}),
        durable=True,
    )
    return path


def null_text_path(cfg: Any) -> Path:
    """Where a run's empty-prompt embeddings are: ``cfg.null_text``, else the file precompute
    writes next to ``cfg.cache_dir``."""
    return Path(cfg.null_text or Path(cfg.cache_dir) / NULL_TEXT_NAME)


def load_null_text(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors :func:`save_null_text` wrote; a clear error for a missing or foreign file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"caption_dropout needs the empty prompt's text embeddings, {path} does not exist: "
            "rerun `dcgen precompute` with the text encoders (it writes them next to the "
            "cache), or point null_text at such a file"
        )
    try:
        with safe_open(str(path), framework="pt") as f:
            if (f.metadata() or {}).get("format") != NULL_TEXT_FORMAT:
                raise ValueError(f"{path}: expected format {NULL_TEXT_FORMAT!r}")
            return {k: f.get_tensor(k) for k in f.keys()}
    except SafetensorError as err:
        raise ValueError(f"{path}: not a safetensors file ({err})") from err


def drop_captions(
    inputs: dict[str, Any], drop: torch.Tensor, null: Mapping[str, torch.Tensor]
) -> dict[str, Any]:
    """``inputs`` with the text of the rows where ``drop`` (B,) is True replaced by ``null``:
    prompt_embeds, pooled_prompt_embeds and attention_mask, each that the batch has. The
    null tensors must have the batch's per-row shapes (same text length)."""
    names = {"prompt_embeds": "prompt_embeds", "pooled_prompt_embeds": "pooled_prompt_embeds",
             "attention_mask": "prompt_attention_mask"}  # fmt: skip
    out = dict(inputs)
    for key, null_key in names.items():
        batch = inputs.get(key)
        if batch is None:
            continue
        if null_key not in null:
            raise ValueError(f"caption_dropout: the null text has no {null_key!r} for the batch's")
        value = null[null_key].to(device=batch.device, dtype=batch.dtype)
        if value.shape != batch.shape[1:]:
            raise ValueError(
                f"caption_dropout: the null text's {null_key} has shape {tuple(value.shape)}, "
                f"the batch's rows {tuple(batch.shape[1:])} (encode both with one text length)"
            )
        mask = drop.to(batch.device).view(-1, *([1] * value.dim()))
        out[key] = torch.where(mask, value.expand_as(batch), batch)
    return out
