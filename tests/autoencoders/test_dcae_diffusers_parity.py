"""DCAE matches diffusers.AutoencoderDC numerically, for every preset family, both ways."""

from __future__ import annotations

import pytest
import torch
from dcae_helpers import assert_close_scaled, assert_computes_like, perturb_norms, small_config

from dcgen.autoencoders import DCAE, get_preset, list_presets
from dcgen.autoencoders.checkpoint import diffusers_to_dcgen

diffusers = pytest.importorskip("diffusers")
AutoencoderDC = diffusers.AutoencoderDC


def _inputs(cfg, batch=2):
    f = cfg.spatial_compression_ratio
    x = torch.randn(batch, cfg.in_channels, 2 * f, 2 * f)
    z = torch.randn(batch, cfg.latent_channels, 3, 2)
    return x, z


@pytest.mark.parametrize("name", list_presets())
def test_diffusers_folder_loads_and_matches(name, tmp_path):
    cfg = small_config(name)
    ref = perturb_norms(AutoencoderDC(**cfg.to_dict())).eval()
    ref.save_pretrained(tmp_path)
    model = DCAE.from_pretrained(tmp_path)
    assert model.config == cfg
    assert_computes_like(model, ref, *_inputs(cfg))


@pytest.mark.parametrize(
    "name", ["dc-ae-f32c32-sana-1.0", "dc-ae-f64c128-mix-1.0", "dc-ae-lite-f32c32-sana-1.1",
             "dc-ae-1.5-f32c128"]
)  # fmt: skip
def test_dcae_save_loads_in_diffusers(name, tmp_path):
    cfg = small_config(name)
    model = perturb_norms(DCAE(cfg)).eval()
    model.save_pretrained(tmp_path)
    assert not [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    ref = AutoencoderDC.from_pretrained(tmp_path).eval()
    assert_computes_like(model, ref, *_inputs(cfg))
    # and back: the saved folder reloads into DCAE bit-exactly
    again = DCAE.from_pretrained(tmp_path)
    for k, v in model.state_dict().items():
        assert torch.equal(again.state_dict()[k], v), k


def test_variant_files_roundtrip(tmp_path):
    cfg = small_config("dc-ae-f32c32-in-1.0")
    model = perturb_norms(DCAE(cfg)).eval()
    model.save_pretrained(tmp_path, variant="bf16", dtype=torch.bfloat16)
    assert (tmp_path / "diffusion_pytorch_model.bf16.safetensors").is_file()
    ref = AutoencoderDC.from_pretrained(tmp_path, variant="bf16", dtype=torch.bfloat16)
    loaded = DCAE.from_pretrained(tmp_path, variant="bf16", dtype=torch.bfloat16)
    assert loaded.dtype == torch.bfloat16
    x, _ = _inputs(cfg, batch=1)
    with torch.no_grad():
        latent = loaded.encode(x.bfloat16())
        assert latent.dtype == torch.bfloat16 and torch.isfinite(latent).all()
        # The same weights in both: compared in fp64 (bf16 weights widen exactly), where the
        # two libraries' different rounding orders (dcgen's RMSNorm rounds once, diffusers'
        # twice) are not amplified by a random encoder's ill-conditioned linear attention
        # into a bf16-sized difference (0.23 on 2026-11-28's CPU, 0.17 allowed). diffusers
        # takes its RMSNorm statistics in fp32 even for fp64 inputs: about 4e-7 remains.
        ours, theirs = loaded.double().encode(x.double()), ref.double().encode(x.double()).latent
    assert_close_scaled(ours, theirs, rel=1e-5)


@pytest.mark.slow
def test_full_width_preset_matches_diffusers():
    """A real-size model (dc-ae-f32c32-sana-1.0, 312M params) on a 64x64 image: the deep
    stages run at 4x4 .. 2x2, so both linear and quadratic attention paths are exercised."""
    cfg = get_preset("dc-ae-f32c32-sana-1.0")
    ref = perturb_norms(AutoencoderDC(**cfg.to_dict())).eval()
    with torch.device("meta"):
        model = DCAE(cfg)
    model.load_state_dict(diffusers_to_dcgen(ref.state_dict()), strict=True, assign=True)
    model.eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        z_ref = ref.encode(x).latent
        assert_close_scaled(model.encode(x), z_ref)
        assert_close_scaled(model.decode(z_ref), ref.decode(z_ref).sample)


def test_sharded_diffusers_folder(tmp_path):
    cfg = small_config("dc-ae-f32c32-in-1.0")
    ref = perturb_norms(AutoencoderDC(**cfg.to_dict())).eval()
    ref.save_pretrained(tmp_path, max_shard_size="100KB")
    assert (tmp_path / "diffusion_pytorch_model.safetensors.index.json").is_file()
    model = DCAE.from_pretrained(tmp_path)
    f = cfg.spatial_compression_ratio
    x, z = torch.randn(1, 3, f, f), torch.randn(1, cfg.latent_channels, 2, 2)
    assert_computes_like(model, ref, x, z)


@pytest.mark.parametrize("variant", [None, "fp16"])
@pytest.mark.parametrize("shard", [None, "100KB"])
def test_pickled_diffusers_folder(tmp_path, variant, shard):
    # save_pretrained(safe_serialization=False) writes diffusion_pytorch_model[.variant].bin
    # (or .bin shards and an index); diffusers loads those, so dcgen must too.
    cfg = small_config("dc-ae-f32c32-in-1.0")
    ref = perturb_norms(AutoencoderDC(**cfg.to_dict())).eval()
    kwargs = {"max_shard_size": shard} if shard else {}
    ref.save_pretrained(tmp_path, safe_serialization=False, variant=variant, **kwargs)
    assert not list(tmp_path.glob("*.safetensors"))
    assert list(tmp_path.glob("*.bin"))
    model = DCAE.from_pretrained(tmp_path, variant=variant)
    for k, v in diffusers_to_dcgen(ref.state_dict()).items():
        assert torch.equal(model.state_dict()[k], v), k


def test_saving_over_a_sharded_folder_leaves_no_stale_weights(tmp_path):
    # diffusers reads a shard index whenever one is there: an index left by an earlier sharded
    # save would make it load the old weights from a folder dcgen just saved new ones into.
    cfg = small_config("dc-ae-f32c32-in-1.0")
    old = perturb_norms(AutoencoderDC(**cfg.to_dict()), seed=2).eval()
    old.save_pretrained(tmp_path, max_shard_size="100KB")
    shards = [p.name for p in tmp_path.glob("*-of-*.safetensors")]
    assert len(shards) > 1
    (tmp_path / "notes.txt").write_text("a user's file stays")
    new = perturb_norms(DCAE(cfg), seed=3).eval()
    new.save_pretrained(tmp_path)
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == ["config.json", "diffusion_pytorch_model.safetensors", "notes.txt"]
    for loaded in (AutoencoderDC.from_pretrained(tmp_path), DCAE.from_pretrained(tmp_path)):
        state = loaded.state_dict()
        if isinstance(loaded, AutoencoderDC):
            state = diffusers_to_dcgen(state)
        for k, v in new.state_dict().items():
            assert torch.equal(state[k], v), k


def test_saving_one_variant_keeps_another_variants_shards(tmp_path):
    cfg = small_config("dc-ae-f32c32-in-1.0")
    old = perturb_norms(AutoencoderDC(**cfg.to_dict()), seed=2).eval()
    old.save_pretrained(tmp_path, max_shard_size="100KB", variant="fp16")
    before = sorted(p.name for p in tmp_path.iterdir())
    DCAE(cfg).save_pretrained(tmp_path)
    after = sorted(p.name for p in tmp_path.iterdir())
    assert set(before) <= set(after)
    assert "diffusion_pytorch_model.safetensors" in after
