"""The shipped toy world: every model loads with the documented shapes, the evaluator reads
real images and not noise, and the files fit the size budget."""

from __future__ import annotations

import json

import pytest
import torch

from dcgen.adapters import adapter_for
from dcgen.toy import assets as A
from dcgen.toy.evaluator import label_accuracy, score_prompts
from dcgen.toy.shapes import ShapesWorld, noise_images

SIZE_BUDGET_MB = 30


@pytest.fixture(scope="module")
def toy() -> A.ToyAssets:
    return A.load_toy_assets()


def test_shipped_files_fit_the_budget():
    root = A.default_assets_dir()
    weights = [p for p in root.rglob("*.safetensors")]
    assert len(weights) == len(A.FOLDERS)
    total = sum(p.stat().st_size for p in weights)
    assert total <= SIZE_BUDGET_MB * 2**20, f"{total / 2**20:.1f} MB of weights"
    manifest = json.loads((root / A.MANIFEST).read_text())
    assert manifest["format"] == "dcgen-toy-assets/1"
    assert manifest["image_size"] == A.IMAGE_SIZE


@torch.no_grad()
def test_models_have_the_documented_shapes(toy):
    x, captions, _ = ShapesWorld(A.EVAL_SEED, toy.image_size).batch(0, 2)
    base = A.vae_encode(toy.vae, x)
    assert base.shape == (2, 4, 16, 16)
    assert A.vae_decode(toy.vae, base).shape == x.shape
    z = toy.dcae.encode(x, scaled=True)
    assert z.shape == (2, 32, 4, 4)
    assert toy.dcae.decode(z, scaled=True).shape == x.shape
    embeds, pooled = toy.text_encoder(captions)
    ad = adapter_for(toy.transformer)
    assert (ad.patch_size, ad.latent_channels) == (2, 4)
    assert ad.num_tokens(16, 16) == 64
    v = ad.predict(base, torch.full((2,), 0.5), embeds, pooled, torch.full((2,), 3.5))
    assert v.shape == base.shape and torch.isfinite(v).all()
    # Latent statistics were set so both spaces are roughly unit scale.
    assert 0.3 < float(base.std()) < 3 and 0.3 < float(z.std()) < 3


@torch.no_grad()
def test_evaluator_reads_real_images_and_not_noise(toy):
    x, captions, labels = ShapesWorld(A.EVAL_SEED, toy.image_size).batch(0, 128)
    real = toy.evaluator.predict(x)
    assert label_accuracy(real, labels) > 0.98
    assert score_prompts(real, captions)["prompt_accuracy"] > 0.95
    noise = score_prompts(toy.evaluator.predict(noise_images(128, toy.image_size)), captions)
    assert noise["prompt_accuracy"] < 0.1
    # Attribute guesses on noise sit near chance (1/3 shapes, 1/4 colours, 1/2 sizes).
    assert noise["shape_accuracy"] < 1 / 3 + 0.2
    assert noise["colour_accuracy"] < 1 / 4 + 0.2
    assert noise["size_accuracy"] < 1 / 2 + 0.2


def test_missing_assets_give_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="train_toy_assets"):
        A.load_toy_assets(tmp_path)


def test_loading_the_toy_world_leaves_the_global_random_state_alone():
    # the text encoder and the evaluator were built with random initial weights (drawn from
    # torch's global generator) before their files were loaded: a seeded program that loaded
    # them drew other numbers afterwards than one that did not
    torch.manual_seed(123)
    before = torch.get_rng_state()
    world = A.load_toy_assets()
    assert torch.equal(torch.get_rng_state(), before)
    # and built that way they hold the files' values, nothing left unset
    for module in (world.text_encoder, world.evaluator):
        assert not [n for n, t in module.state_dict().items() if t.is_meta]


def test_random_assets_give_the_callers_torch_stream_back():
    # random_toy_assets(seed) seeded torch's global generator and left it so
    import torch

    from dcgen.toy.assets import random_toy_assets

    torch.manual_seed(5)
    want = torch.rand(3)
    torch.manual_seed(5)
    a = random_toy_assets(seed=1)
    assert torch.equal(torch.rand(3), want)
    b = random_toy_assets(seed=1)  # and the assets are still the seed's
    assert all(torch.equal(x, y) for x, y in zip(a.dcae.state_dict().values(),
                                                  b.dcae.state_dict().values(), strict=True))  # fmt: skip
