"""A new DiT family is one DiTAdapter subclass that fills in the abstract methods (the
adapters' contract): everything dcgen calls on an adapter must then exist. The stage-1 readout
packed velocities with ``adapter.pack``, which only FLUX's and SANA's adapters had."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from dcgen.adapters import DiTAdapter, FluxAdapter, base, register_adapter
from dcgen.train.cache import LatentCache
from dcgen.train.stages import load_transformer, readout_r2
from tests.train.stage_utils import config, make_cache, save_base


class WrappedDiT(nn.Module):
    """Another family's transformer (here a FLUX inside, so the numbers can be compared)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    @property
    def config(self):  # noqa: ANN201
        return self.inner.config

    def forward(self, *args, **kwargs):  # noqa: ANN002, ANN003, ANN201
        return self.inner(*args, **kwargs)


class WrappedAdapter(DiTAdapter):
    """Only the abstract methods, each delegated to FLUX's adapter of the inner model."""

    transformer_class_names = ("WrappedDiT",)

    def __init__(self, transformer: nn.Module) -> None:
        super().__init__(transformer)
        self._flux = FluxAdapter(transformer.inner)

    latent_channels = property(lambda self: self._flux.latent_channels)
    patch_size = property(lambda self: self._flux.patch_size)
    # optional (read with a default of False): the inner FLUX is guidance-distilled
    has_guidance_embeds = property(lambda self: self._flux.has_guidance_embeds)

    def latent_layers(self):  # noqa: ANN201
        return self._flux.latent_layers()

    def _install_latent_layers(self, old, channels, patch):  # noqa: ANN001, ANN202
        return self._flux._install_latent_layers(old, channels, patch)

    def embed_tokens(self, latents):  # noqa: ANN001, ANN201
        return self._flux.embed_tokens(latents)

    def predict(self, *args, **kwargs):  # noqa: ANN002, ANN003, ANN201
        return self._flux.predict(*args, **kwargs)

    def blocks(self):  # noqa: ANN201
        return self._flux.blocks()

    def _image_hidden_states(self, output):  # noqa: ANN001, ANN202
        return self._flux._image_hidden_states(output)

    def enable_structured_latents(self) -> None:
        self._flux.enable_structured_latents()


@pytest.fixture
def registered(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(base, "_REGISTRY", list(base._REGISTRY))  # undone after the test
    register_adapter(WrappedAdapter)


def test_the_abstract_methods_are_all_a_family_needs(registered, tmp_path: Path) -> None:
    assert not WrappedAdapter.__abstractmethods__
    cache = make_cache(tmp_path)
    cfg = config(tmp_path, "align", save_base(tmp_path), cache)
    flux = load_transformer(cfg.transformer)
    x = torch.randn(2, 16, 4, 6)
    adapter = base.adapter_for(WrappedDiT(flux))
    assert torch.equal(adapter.unpack(adapter.pack(x), 4, 6), x)
    # stage 1's readout (ridge head on the last block) through the new family: as FLUX's
    torch.manual_seed(0)
    wrapped = readout_r2(WrappedDiT(flux), LatentCache(cache), cfg, latent_key="base_latent")
    torch.manual_seed(0)
    direct = readout_r2(flux, LatentCache(cache), cfg, latent_key="base_latent")
    assert wrapped == pytest.approx(direct, rel=1e-6)
