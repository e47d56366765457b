"""Tiled encode / decode: exact blending, bounded tile size, closeness to the full pass."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from dcae_helpers import perturb_norms, rel_rms, small_config

from dcgen.autoencoders import DCAE
from dcgen.autoencoders.tiling import tile_starts, tiled_apply


def test_tile_starts_cover_and_end_flush():
    assert tile_starts(10, 4, 3) == [0, 3, 6]
    assert tile_starts(11, 4, 3) == [0, 3, 6, 7]
    assert tile_starts(3, 4, 3) == [0]


@pytest.mark.parametrize("overlap", [0, 1, 3])
def test_blend_weights_are_a_partition_of_unity(overlap):
    """For a local operator (nearest x4 upsampling) tiled output equals the full output
    exactly: the ramps of neighbouring tiles sum to one everywhere."""
    z = torch.randn(2, 5, 13, 11)

    def up(t):
        return F.interpolate(t, scale_factor=4, mode="nearest")

    out = tiled_apply(up, z, (13, 11), tile=5, overlap=overlap, in_scale=1, out_scale=4)
    torch.testing.assert_close(out, up(z), rtol=1e-6, atol=1e-6)


def _model(name="dc-ae-f32c32-in-1.0"):
    return perturb_norms(DCAE(small_config(name))).eval()


def test_tile_larger_than_image_is_exact():
    model = _model()
    x = torch.randn(1, 3, 128, 128)
    with torch.no_grad():
        z = model.encode(x)
        torch.testing.assert_close(model.encode(x, tile_size=128, tile_overlap=32), z)
        torch.testing.assert_close(model.decode(z, tile_size=256), model.decode(z))


def test_tiles_run_one_at_a_time_with_bounded_size():
    model = _model()
    seen = []
    hook = model.decoder.register_forward_pre_hook(lambda m, a: seen.append(tuple(a[0].shape)))
    hook2 = model.encoder.register_forward_pre_hook(lambda m, a: seen.append(tuple(a[0].shape)))
    z = torch.randn(2, model.latent_channels, 8, 6)
    with torch.no_grad():
        y = model.decode(z, tile_size=128, tile_overlap=64)
        assert y.shape == (2, 3, 256, 192)
        dec_calls, seen[:] = list(seen), []
        model.enable_tiling(tile_size=128, tile_overlap=32)
        lat = model.encode(torch.randn(1, 3, 256, 192))
        assert lat.shape == (1, model.latent_channels, 8, 6)
    hook.remove()
    hook2.remove()
    assert len(dec_calls) == 3 * 2 and all(s[2] <= 4 and s[3] <= 4 for s in dec_calls)
    assert len(seen) > 1 and all(s[2] <= 128 and s[3] <= 128 for s in seen)


@pytest.mark.slow
def test_tiled_close_to_full_and_no_worse_than_diffusers():
    """Documented in dcae.py: random weights, 512 px, tile 256 / overlap 64. Linear attention is
    global, so tiles differ from the full pass; the blend keeps the error below the bound and at
    most that of diffusers' own tiling of the same weights."""
    diffusers = pytest.importorskip("diffusers")
    from dcgen.autoencoders.checkpoint import dcgen_to_diffusers

    model = _model()
    ref = diffusers.AutoencoderDC(**model.config.to_dict()).eval()
    ref.load_state_dict(dcgen_to_diffusers(model.state_dict()))
    ref.enable_tiling(256, 256, 192, 192)
    x = torch.randn(1, 3, 512, 512)
    with torch.no_grad():
        z = model.encode(x)
        z_t = model.encode(x, tile_size=256, tile_overlap=64)
        y = model.decode(z)
        y_t = model.decode(z, tile_size=256, tile_overlap=64)
        z_ref = ref.tiled_encode(x, return_dict=False)[0]
        y_ref = ref.tiled_decode(z, return_dict=False)[0]
    assert rel_rms(z_t, z) < 0.4 and rel_rms(y_t, y) < 0.4
    assert rel_rms(z_t, z) <= 1.1 * rel_rms(z_ref, z)
    assert rel_rms(y_t, y) <= 1.1 * rel_rms(y_ref, y)


def test_a_call_tile_size_keeps_enable_tilings_overlap_and_a_lone_overlap_is_refused():
    # decode(z, tile_size=...) after enable_tiling(overlap=...) blended with no overlap (seams);
    # a tile_overlap without any tiling was ignored
    model = _model()
    z = torch.randn(1, model.latent_channels, 6, 6)
    with torch.no_grad():
        model.enable_tiling(tile_size=64, tile_overlap=32)
        enabled = model.decode(z)
        torch.testing.assert_close(model.decode(z, tile_size=64), enabled, rtol=0, atol=0)
        assert not torch.equal(model.decode(z, tile_size=64, tile_overlap=0), enabled)
        model.disable_tiling()
        for overlap in (-7, 32):
            with pytest.raises(ValueError, match=f"tile_overlap={overlap} needs tiling"):
                model.decode(z, tile_overlap=overlap)
        torch.testing.assert_close(model.decode(z, tile_overlap=0), model.decode(z))
