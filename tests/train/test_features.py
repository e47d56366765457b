"""Feature-distance analysis with hooks on a tiny diffusers FLUX transformer."""

from __future__ import annotations

import pytest
import torch

from dcgen.train.features import (
    FeatureCapture,
    block_list,
    capture_features,
    feature_distance,
    feature_distances,
)

from ..adapters.tiny import tiny_flux as shared_tiny_flux

diffusers = pytest.importorskip("diffusers")


def tiny_flux() -> torch.nn.Module:
    return shared_tiny_flux(in_channels=8, guidance_embeds=False, layers=2)


def flux_inputs(gen: torch.Generator, h: int = 4, w: int = 4, txt: int = 3) -> dict:
    ids = torch.stack(torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij"), -1)
    img_ids = torch.cat([torch.zeros(h * w, 1), ids.reshape(-1, 2).float()], dim=1)
    return dict(
        hidden_states=torch.randn(1, h * w, 8, generator=gen),
        encoder_hidden_states=torch.randn(1, txt, 32, generator=gen),
        pooled_projections=torch.randn(1, 32, generator=gen),
        timestep=torch.tensor([0.5]),
        img_ids=img_ids,
        txt_ids=torch.zeros(txt, 3),
        return_dict=False,
    )


def test_feature_distance_definitions():
    base = torch.zeros(2, 3, 4)
    new = torch.ones(2, 3, 4)
    assert feature_distance(base, new) == pytest.approx(4.0)  # sum over 4 channels of 1
    assert feature_distance(base, new, kind="mse") == pytest.approx(1.0)
    assert feature_distance(new, base, kind="relative") == pytest.approx(1.0)
    assert feature_distance(new, new) == 0.0
    # Base on a 2x finer grid: averaged onto the new grid first.
    fine = torch.arange(16.0).reshape(1, 16, 1)
    coarse = torch.tensor([2.5, 4.5, 10.5, 12.5]).reshape(1, 4, 1)
    assert feature_distance(fine, coarse, base_hw=(4, 4), factor=2) == pytest.approx(0.0)
    with pytest.raises(ValueError, match="shapes differ"):
        feature_distance(fine, coarse)


def test_flux_hooks_distance_zero_then_growing_and_removed():
    model = tiny_flux()
    blocks = block_list(model)
    assert len(blocks) == 4
    inputs = flux_inputs(torch.Generator().manual_seed(0))

    base = capture_features(lambda: model(**inputs), blocks)
    assert [f.shape for f in base] == [(1, 16, 32)] * 4  # image stream only
    same = capture_features(lambda: model(**inputs), blocks)
    assert feature_distances(base, same) == [0.0] * 4

    # Perturb the embedder output (what a mis-aligned new embedder does): the distance is
    # positive at every block and grows with the size of the perturbation. (Growth with depth
    # needs trained weights; a random tiny model mostly carries the perturbation through.)
    direction = torch.randn(1, 16, 32, generator=torch.Generator().manual_seed(1))

    def run_perturbed(scale: float) -> list[float]:
        handle = model.x_embedder.register_forward_hook(lambda _m, _a, out: out + scale * direction)
        try:
            return feature_distances(base, capture_features(lambda: model(**inputs), blocks))
        finally:
            handle.remove()

    small, large = run_perturbed(0.1), run_perturbed(0.5)
    assert all(d > 0 for d in small)
    assert all(lg > sm for sm, lg in zip(small, large))

    # Hooks are gone afterwards, also after an exception inside the context.
    assert all(len(b._forward_hooks) == 0 for b in blocks)
    with pytest.raises(RuntimeError, match="boom"):
        with FeatureCapture(blocks):
            raise RuntimeError("boom")
    assert all(len(b._forward_hooks) == 0 for b in blocks)
