"""The toy world's evaluator: per-quadrant attribute classifiers and a feature space for a
Frechet distance.

The GenEval idea on a world whose ground truth we own: a small CNN, trained on dataset images
and their labels (``dcgen.toy.shapes.labels_of``), reads back for every quadrant whether an
object is there and its shape, colour and size. A generated image *answers* its prompt when
every object the caption asks for is found in its quadrant with all three attributes right.
Its 64-d quadrant embeddings, averaged, are the features of the Frechet distance between
generated and real images.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ._folder import load_module, save_module
from .shapes import COLOUR_NAMES, POSITIONS, SHAPES, SIZES, parse_caption

# Head name -> number of classes; the label column each head reads in labels_of's layout.
HEADS: dict[str, int] = {
    "present": 2,
    "shape": len(SHAPES),
    "colour": len(COLOUR_NAMES),
    "size": len(SIZES),
}


@dataclass
class EvaluatorConfig:
    width: int = 32
    feature_dim: int = 64
    image_size: int = 128


class ShapeEvaluator(nn.Module):
    def __init__(self, config: EvaluatorConfig | None = None) -> None:
        super().__init__()
        self.config = cfg = config or EvaluatorConfig()
        w = cfg.width

        def stage(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(
                nn.Conv2d(cin, cout, 3, stride=2, padding=1),
                nn.GroupNorm(8, cout),
                nn.SiLU(),
                nn.Conv2d(cout, cout, 3, padding=1),
                nn.GroupNorm(8, cout),
                nn.SiLU(),
            )

        self.trunk = nn.Sequential(
            stage(3, w), stage(w, 2 * w), stage(2 * w, 2 * w), stage(2 * w, 4 * w)
        )
        self.embed = nn.Sequential(nn.Linear(4 * w, cfg.feature_dim), nn.SiLU())
        self.heads = nn.ModuleDict({k: nn.Linear(cfg.feature_dim, n) for k, n in HEADS.items()})

    def quadrant_features(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 4, feature_dim): one embedding per quadrant, in POSITIONS order (row-major)."""
        size = self.config.image_size
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"evaluator: expected (B, 3, H, W) images, got {tuple(images.shape)}")
        if images.shape[-2:] != (size, size):
            images = F.interpolate(images, size=(size, size), mode="bilinear", antialias=True)
        fmap = self.trunk(images.clamp(-1, 1))
        quads = F.adaptive_avg_pool2d(fmap, 2).flatten(2).transpose(1, 2)  # (B, 4, C)
        return self.embed(quads)

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Logits per head, each (B, 4, classes)."""
        q = self.quadrant_features(images)
        return {k: head(q) for k, head in self.heads.items()}

    @torch.no_grad()
    def features(self, images: torch.Tensor, batch_size: int = 128) -> torch.Tensor:
        """(B, feature_dim) image features for the Frechet distance."""
        return torch.cat(
            [
                self.quadrant_features(images[i : i + batch_size]).mean(1)
                for i in range(0, len(images), batch_size)
            ]
        )

    @torch.no_grad()
    def predict(self, images: torch.Tensor, batch_size: int = 128) -> torch.Tensor:
        """(B, 4, 4) long in labels_of's layout: [present, shape, colour, size] per quadrant."""
        outs = []
        for i in range(0, len(images), batch_size):
            logits = self(images[i : i + batch_size])
            outs.append(torch.stack([logits[k].argmax(-1) for k in HEADS], dim=-1))
        return torch.cat(outs)

    def save_pretrained(self, path: str | Path) -> None:
        save_module(self, self.config, path)

    @classmethod
    def from_pretrained(cls, path: str | Path) -> ShapeEvaluator:
        return load_module(cls, EvaluatorConfig, path, "toy evaluator")


def evaluator_loss(logits: dict[str, torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of every head against (B, 4, 4) labels; attributes of empty quadrants
    (label -1) are ignored."""
    total = logits["present"].new_zeros(())
    for col, name in enumerate(HEADS):
        total = total + F.cross_entropy(
            logits[name].flatten(0, 1), labels[..., col].flatten(), ignore_index=-1
        )
    return total


def score_prompts(predicted: torch.Tensor, captions: Sequence[str]) -> dict[str, float]:
    """Prompt accuracy (every asked object found with every attribute right) and per-attribute
    accuracies over the asked objects, from :meth:`ShapeEvaluator.predict` output.

    Chance levels for a random guess are 1/2 (present), 1/3, 1/4, 1/2 per attribute; a prompt
    with two objects needs all eight right.
    """
    if len(predicted) != len(captions):
        raise ValueError(f"{len(predicted)} predictions for {len(captions)} captions")
    hits = {k: 0 for k in HEADS}
    objects = prompts_ok = 0
    for pred, caption in zip(predicted, captions):
        ok_all = True
        for obj in parse_caption(caption):
            s, c, z, p = obj.labels()
            row = pred[p]
            checks = {
                "present": int(row[0]) == 1,
                "shape": int(row[1]) == s,
                "colour": int(row[2]) == c,
                "size": int(row[3]) == z,
            }
            for k, ok in checks.items():
                hits[k] += ok
            ok_all &= all(checks.values())
            objects += 1
        prompts_ok += ok_all
    out = {"prompt_accuracy": prompts_ok / max(len(captions), 1)}
    out.update({f"{k}_accuracy": hits[k] / max(objects, 1) for k in HEADS})
    return out


def label_accuracy(predicted: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of (image, quadrant, head) entries right, ignoring empty quadrants' attributes."""
    valid = labels >= 0
    if not valid.any():
        raise ValueError(
            f"label_accuracy: no labelled entries to score (labels of shape {tuple(labels.shape)})"
        )
    return float(((predicted == labels) & valid).sum() / valid.sum())


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """Frechet distance between Gaussians fitted to two feature sets (N, D), in float64:
    |mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a^1/2 S_b S_a^1/2)^1/2)."""
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"frechet_distance: expected (N, D) features, got {a.shape}, {b.shape}")
    if len(a) < 2 or len(b) < 2:
        raise ValueError("frechet_distance: need at least 2 samples per set")
    a, b = a.double(), b.double()
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = torch.cov(a.T), torch.cov(b.T)

    def sqrtm_psd(m: torch.Tensor) -> torch.Tensor:
        vals, vecs = torch.linalg.eigh((m + m.T) / 2)
        return (vecs * vals.clamp(min=0).sqrt()) @ vecs.T

    root_a = sqrtm_psd(cov_a)
    cross = sqrtm_psd(root_a @ cov_b @ root_a)
    value = (mu_a - mu_b).pow(2).sum() + torch.trace(cov_a + cov_b - 2 * cross)
    return float(value.clamp(min=0))


__all__ = [
    "HEADS",
    "POSITIONS",
    "EvaluatorConfig",
    "ShapeEvaluator",
    "evaluator_loss",
    "frechet_distance",
    "label_accuracy",
    "score_prompts",
]
