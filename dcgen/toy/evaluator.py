"""The toy world's evaluator: per-quadrant attribute classifiers and a feature space for a
Frechet distance.

The GenEval idea on a world whose ground truth we own: a small CNN, trained on dataset images
and their labels (``dcgen.toy.shapes.labels_of``), reads back for every quadrant whether an
object is there and its shape, colour and size. A generated image *answers* its prompt when
every object the caption asks for is found in its quadrant with all three attributes right.
Its 64-d quadrant embeddings, averaged, are the features of the Frechet distance between
generated and real images.

Images are float (B, 3, H, W) in [-1, 1], as the toy world's decoders return them. Images
clearly outside that range (e.g. [0, 255] pixels) are an error; [0, 1] images lie inside it and
cannot be told apart, so they are scored (wrongly) without one: convert with ``x * 2 - 1``.
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


# How far outside [-1, 1] an image may reach before it is an error rather than a decoder's
# overshoot (clamped as before): well below [0, 255] pixels, above float rounding and the
# few-hundredths overshoot of a decoder that does not clamp.
RANGE_TOLERANCE = 0.1


def _check_range(images: torch.Tensor) -> None:
    """Raise unless the finite values of ``images`` lie in [-1, 1] (within RANGE_TOLERANCE).
    Non-finite values are left to the callers, which score them as wrong."""
    finite = torch.isfinite(images)
    if not finite.any():
        return
    lo = float(images.where(finite, 0.0).amin())
    hi = float(images.where(finite, 0.0).amax())
    if lo < -1 - RANGE_TOLERANCE or hi > 1 + RANGE_TOLERANCE:
        raise ValueError(
            f"evaluator: expected images in [-1, 1], got values in [{lo:.4g}, {hi:.4g}] "
            "(convert [0, 255] pixels with x / 127.5 - 1)"
        )


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
        """(B, 4, feature_dim): one embedding per quadrant, in POSITIONS order (row-major).
        ``images``: float in [-1, 1] (see the module docstring)."""
        size = self.config.image_size
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"evaluator: expected (B, 3, H, W) images, got {tuple(images.shape)}")
        # The clamp below would turn [0, 255] pixels into a white image scored without a word.
        _check_range(images)
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
        """(B, feature_dim) image features for the Frechet distance; non-finite images give
        non-finite rows, which :func:`frechet_distance` names."""
        return torch.cat(
            [
                self.quadrant_features(images[i : i + batch_size]).mean(1)
                for i in range(0, len(images), batch_size)
            ]
        )

    @torch.no_grad()
    def predict(self, images: torch.Tensor, batch_size: int = 128) -> torch.Tensor:
        """(B, 4, 4) long in labels_of's layout: [present, shape, colour, size] per quadrant;
        -1 where the logits are not finite (a diverged model's NaN images), so that they match
        no label: argmax of NaN logits is 0, which is a real class (circle, red, ...)."""
        outs = []
        for i in range(0, len(images), batch_size):
            logits = self(images[i : i + batch_size])
            outs.append(
                torch.stack(
                    [
                        logits[k].argmax(-1).masked_fill(~logits[k].isfinite().all(-1), -1)
                        for k in HEADS
                    ],
                    dim=-1,
                )
            )
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
    with two objects needs all eight right. Predictions of -1 (non-finite images) are wrong.
    """
    if len(predicted) != len(captions):
        raise ValueError(f"{len(predicted)} predictions for {len(captions)} captions")
    if not captions:  # an accuracy of 0 / 0 is no measurement, as in label_accuracy
        raise ValueError("score_prompts: no prompts to score (0 captions)")
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
    out = {"prompt_accuracy": prompts_ok / len(captions)}
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
    |mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a^1/2 S_b S_a^1/2)^1/2).

    Non-finite features (a diverged model's images) are a ValueError naming how many rows:
    otherwise the result is NaN or eigh fails, depending on the data."""
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"frechet_distance: expected (N, D) features, got {a.shape}, {b.shape}")
    if len(a) < 2 or len(b) < 2:
        raise ValueError("frechet_distance: need at least 2 samples per set")
    for name, x in (("first", a), ("second", b)):
        bad = int((~torch.isfinite(x)).any(1).sum())
        if bad:
            raise ValueError(
                f"frechet_distance: expected finite features, got {bad} of {len(x)} rows with "
                f"NaN or inf in the {name} set"
            )
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
