"""The toy world's text encoder: a word tokenizer over the caption grammar and a two-layer
transformer, trained together with the toy FLUX model.

It plays both of FLUX's text encoders at once: ``forward`` returns the per-token sequence
(``prompt_embeds``, T5's role, fed to the joint attention) and a pooled vector
(``pooled_prompt_embeds``, CLIP's role, fed to the timestep/guidance embedding).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ._folder import load_module, save_module
from .shapes import COLOUR_NAMES, SHAPES, SIZES

PAD = "<pad>"
VOCAB: tuple[str, ...] = (
    PAD,
    "<unk>",
    "a",
    "and",
    *SHAPES,
    *COLOUR_NAMES,
    *SIZES,
    "top",
    "bottom",
    "left",
    "right",
)


def tokenize(captions: Sequence[str], max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Word ids (B, max_length) padded with 0, and the boolean mask of real tokens. Unknown
    words map to ``<unk>``; captions longer than ``max_length`` words are truncated."""
    index = {w: i for i, w in enumerate(VOCAB)}
    ids = torch.zeros(len(captions), max_length, dtype=torch.long)
    for row, caption in enumerate(captions):
        words = caption.lower().split()[:max_length]
        ids[row, : len(words)] = torch.tensor([index.get(w, 1) for w in words], dtype=torch.long)
    return ids, ids != 0


@dataclass
class TextEncoderConfig:
    dim: int = 64
    layers: int = 2
    heads: int = 4
    max_length: int = 16
    pooled_dim: int = 64


class ToyTextEncoder(nn.Module):
    def __init__(self, config: TextEncoderConfig | None = None) -> None:
        super().__init__()
        self.config = cfg = config or TextEncoderConfig()
        self.embed = nn.Embedding(len(VOCAB), cfg.dim)
        self.position = nn.Parameter(torch.randn(cfg.max_length, cfg.dim) * 0.02)
        layer = nn.TransformerEncoderLayer(
            cfg.dim, cfg.heads, 2 * cfg.dim, dropout=0.0, batch_first=True, norm_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, cfg.layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(cfg.dim)
        self.pool = nn.Linear(cfg.dim, cfg.pooled_dim)

    @property
    def device(self) -> torch.device:
        return self.embed.weight.device

    @property
    def dtype(self) -> torch.dtype:  # diffusers' pipeline.to() reads it of every component
        return self.embed.weight.dtype

    def forward(self, captions: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(prompt_embeds (B, max_length, dim), pooled_prompt_embeds (B, pooled_dim))."""
        ids, mask = tokenize(captions, self.config.max_length)
        ids, mask = ids.to(self.device), mask.to(self.device)
        x = self.embed(ids) + self.position
        # An empty caption masks every key; torch's fused (no-grad) encoder path then returns
        # NaN rows, which the zeroing below would keep. Letting such a row attend to its first
        # (padding) position keeps it finite; its outputs are zeroed anyway, so the sequence is
        # all zeros and the pooled vector is pool.bias, as on the autograd path.
        key_padding = ~mask
        key_padding[~mask.any(1), 0] = False
        x = self.norm(self.encoder(x, src_key_padding_mask=key_padding))
        # Padding positions are zeroed so the sequence FLUX sees depends only on the words.
        x = x * mask[..., None]
        pooled = self.pool(x.sum(1) / mask.sum(1, keepdim=True).clamp(min=1))
        return x, pooled

    @torch.no_grad()
    def encode(self, captions: Sequence[str], batch_size: int = 256) -> tuple[torch.Tensor, ...]:
        outs = [self(captions[i : i + batch_size]) for i in range(0, len(captions), batch_size)]
        return torch.cat([o[0] for o in outs]), torch.cat([o[1] for o in outs])

    def save_pretrained(self, path: str | Path) -> None:
        save_module(self, self.config, path)

    @classmethod
    def from_pretrained(cls, path: str | Path, dtype: torch.dtype | None = None) -> ToyTextEncoder:
        """The encoder saved in ``path``; ``dtype`` casts it (as transformers' ``dtype=``)."""
        model = load_module(cls, TextEncoderConfig, path, "toy text encoder")
        return model if dtype is None else model.to(dtype)
