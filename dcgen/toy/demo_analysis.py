"""What `dcgen demo` measures besides the samples: the feature distance of each model's hidden
states to the base model's, stage 1 on an ideal coarse latent (the reference that splits the
velocity readout's gap), and prompt accuracy against LoRA steps from weight snapshots."""

from __future__ import annotations

import copy
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from dcgen._files import atomic_write
from dcgen.adapters import adapter_for
from dcgen.train.config import TrainConfig
from dcgen.train.features import feature_distance
from dcgen.train.stages import _block_features, align_embedder


def coarse_base_latents(
    data: Sequence[dict[str, torch.Tensor]], factor: int, patch_size: int
) -> list[dict[str, torch.Tensor]]:
    """``data`` with ``dcae_latent`` replaced by the base latent averaged over ``factor`` x
    ``factor`` tokens and unshuffled by the base patch size: a latent on the DC-AE's token grid
    that is a linear function of the base latent, the best case for stage 1's linear
    alignment."""
    out = []
    for d in data:
        z = F.avg_pool2d(d["base_latent"][None].float(), factor)
        out.append({**d, "dcae_latent": F.pixel_unshuffle(z, patch_size)[0]})
    return out


def coarse_reference_r2(
    base: nn.Module, data: list[dict[str, torch.Tensor]], cfg: TrainConfig, factor: int
) -> float:
    """Stage 1 (ridge embedder, no refinement) on :func:`coarse_base_latents`: the velocity
    readout R^2 of the frozen blocks when the new latent carries nothing the base latent
    does not."""
    model = copy.deepcopy(base)
    coarse = coarse_base_latents(data, factor, adapter_for(base).patch_size)
    with tempfile.TemporaryDirectory() as tmp:
        summary = align_embedder(model, coarse, cfg, run_dir=tmp, progress=False)
    return float(summary["head"]["readout_r2"])


def weight_snapshots(
    model: nn.Module, steps: Sequence[int], folder: str | Path | None = None
) -> tuple[Callable[[int, float], None], dict[int, dict[str, torch.Tensor]]]:
    """An ``on_step`` callback that copies the trainable weights after each of ``steps``, and
    the dict it fills (step -> weights).

    With ``folder``, each copy is also written there (``step-N.safetensors``, atomically) and the
    dict starts with the copies already there: a resumed run that starts past a step still has
    that step's weights."""
    saved: dict[int, dict[str, torch.Tensor]] = {}
    wanted = set(steps)
    where = Path(folder) if folder is not None else None
    if where is not None:
        for step in sorted(wanted):
            if snapshot_path(where, step).is_file():
                saved[step] = load_file(str(snapshot_path(where, step)))

    def on_step(step: int, loss: float) -> None:
        if step in wanted:
            saved[step] = {
                n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad
            }
            if where is not None:
                weights = {n: t.contiguous().cpu() for n, t in saved[step].items()}
                atomic_write(snapshot_path(where, step), lambda tmp: save_file(weights, tmp))

    return on_step, saved


def snapshot_path(folder: Path, step: int) -> Path:
    """Where :func:`weight_snapshots` keeps the weights of ``step``."""
    return folder / f"step-{step:08d}.safetensors"


def with_weights(model: nn.Module, weights: dict[str, torch.Tensor]) -> nn.Module:
    """A copy of ``model`` with ``weights`` (a :func:`weight_snapshots` entry) loaded."""
    out = copy.deepcopy(model)
    params = dict(out.named_parameters())
    with torch.no_grad():
        for name, value in weights.items():
            params[name].copy_(value)
    return out


def lora_curve(
    rows: dict[str, dict[str, Any]], snapshots: dict[tuple[str, int], dict[str, float]], steps: int
) -> dict[str, Any]:
    """Prompt accuracy of the naive run and of DC-Gen's stage 3 against LoRA steps: the
    snapshots plus the end points (naive at step 0 = random latent layers on the untouched
    DiT; DC-Gen at step 0 = stage 1+2; both at ``steps`` = the report rows)."""
    points = {
        ("naive", steps): rows["naive"],
        ("dcgen", 0): rows["stage1+2"],
        ("dcgen", steps): rows["dcgen"],
    }
    points.update(snapshots)
    out: dict[str, Any] = {"steps": sorted({n for _, n in points})}
    for run in ("naive", "dcgen"):
        out[run] = {
            str(n): {
                "prompt_accuracy": points[(run, n)]["prompt_accuracy"],
                "frechet_distance": points[(run, n)]["frechet_distance"],
            }
            for n in out["steps"]
            if (run, n) in points
        }

    def first_reaching(run: str, target: float) -> int | None:
        hits = [int(n) for n, v in out[run].items() if v["prompt_accuracy"] >= target]
        return min(hits) if hits else None

    stage1 = rows["stage1"]["prompt_accuracy"]
    out["stage1_accuracy"] = stage1
    out["naive_steps_to_reach_stage1"] = first_reaching("naive", stage1)
    out["dcgen_steps_to_reach_naive_final"] = first_reaching(
        "dcgen", rows["naive"]["prompt_accuracy"]
    )
    return out


class BaseFeatures:
    """The base model's image hidden states on a fixed batch of training images, computed once
    and compared with each adapted model's on the DC-AE latents of the same images."""

    @torch.no_grad()
    def __init__(
        self,
        base: nn.Module,
        data: Sequence[dict[str, torch.Tensor]],
        layers: Sequence[int],
        device: torch.device,
        count: int = 32,
    ) -> None:
        self.layers = list(layers)
        self.batch = {k: torch.stack([d[k] for d in data[:count]]).to(device) for k in data[0]}
        ad = adapter_for(base)
        self.feats = _block_features(ad, self.batch["base_latent"], self.batch, layers, 0.0)
        self.grid = self.batch["base_latent"].shape[-1] // ad.patch_size
        self.factor = self.grid // self.batch["dcae_latent"].shape[-1]

    @torch.no_grad()
    def distances(self, model: nn.Module) -> dict[int, float]:
        """Relative squared distance ||h_base - h||^2 / ||h_base||^2 after each block, the base
        tokens averaged onto the DC-AE grid (as stage 1 compares them)."""
        b = self.batch
        feats = _block_features(adapter_for(model), b["dcae_latent"], b, self.layers, 0.0)
        hw = (self.grid, self.grid)
        return {
            i: feature_distance(self.feats[i], feats[i], "relative", hw, self.factor, "avg")
            for i in self.layers
        }
