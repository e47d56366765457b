"""Banded decode and encode (dcgen/autoencoders/banding.py): the full-frame result, at lower
peak memory."""

from __future__ import annotations

import pytest
import torch
from dcae_helpers import peak_cpu_bytes, perturb_norms, small_config
from torch import nn

from dcgen.autoencoders import DCAE
from dcgen.autoencoders.banding import (
    LocalStep,
    band_ranges,
    local_prefix,
    local_step,
    local_suffix,
)
from dcgen.autoencoders.blocks import EfficientViTBlock, ResBlock, UpBlock

# Every decoder family: ResBlock stages with BatchNorm (f64c128, pixel_shuffle up blocks and an
# UpBlock head), RMSNorm + interpolate up blocks and a conv head (SANA 1.1), Lite, 1.5.
PRESETS = ["dc-ae-f64c128-in-1.0", "dc-ae-f32c32-sana-1.1", "dc-ae-lite-f32c32-sana-1.1",
           "dc-ae-1.5-f64c128"]  # fmt: skip


def _model(name: str) -> DCAE:
    return perturb_norms(DCAE(small_config(name))).eval()


def _latents(model: DCAE, pixels: tuple[int, int], batch: int = 1) -> torch.Tensor:
    f = model.spatial_compression_ratio
    return torch.randn(batch, model.latent_channels, pixels[0] // f, pixels[1] // f)


@pytest.mark.parametrize("name", PRESETS)
def test_banded_decode_equals_full_frame(name):
    """Bands smaller than a stage row, uneven bands, a batch, a non-square image: same output as
    the full-frame pass (up to the conv algorithm's summation order; exact on this CPU)."""
    model = _model(name)
    f = model.spatial_compression_ratio
    z = _latents(model, (4 * f, 3 * f), batch=2)
    with torch.no_grad():
        full = model.decode(z)
        for rows in (1, 7, 48, 4 * f + 5):
            banded = model.decode(z, band_rows=rows)
            assert banded.shape == full.shape and banded.is_contiguous()
            torch.testing.assert_close(banded, full, rtol=1e-5, atol=1e-5, msg=f"{name} {rows}")


def test_banded_decode_lowers_peak_memory():
    """The high-resolution tail holds one band at a time: measured on CPU, fp32, 512 px, widths
    / 16: full 75.5 MB vs 23.0 MB at 128-row bands (f32c32 SANA 1.1)."""
    model = _model("dc-ae-f32c32-sana-1.1")
    z = _latents(model, (512, 512))
    with torch.inference_mode():
        full = peak_cpu_bytes(lambda: model.decode(z))
        banded = peak_cpu_bytes(lambda: model.decode(z, band_rows=128))
    assert banded < 0.5 * full, (banded, full)


def test_enable_banded_decode_and_errors():
    model = _model("dc-ae-f32c32-sana-1.1")
    z = _latents(model, (64, 64))
    with torch.no_grad():
        full = model.decode(z)
        model.enable_banded_decode(16)
        assert model._band_rows == 16
        torch.testing.assert_close(model.decode(z), full, rtol=1e-5, atol=1e-5)
        model.disable_banded_decode()
        assert model._band_rows is None
    for bad in (0, -3, 2.5, True, "64"):
        with pytest.raises(ValueError, match="band_rows: expected a positive int"):
            model.decode(z, band_rows=bad)
        with pytest.raises(ValueError, match="band_rows"):
            model.enable_banded_decode(bad)


def test_banding_composes_with_tiling():
    model = _model("dc-ae-f32c32-sana-1.1")
    z = _latents(model, (128, 96))
    with torch.no_grad():
        tiled = model.decode(z, tile_size=64, tile_overlap=32)
        both = model.decode(z, tile_size=64, tile_overlap=32, band_rows=24)
    torch.testing.assert_close(both, tiled, rtol=1e-5, atol=1e-5)


def test_locality_rules():
    """Attention is never banded; a BatchNorm in training mode (batch statistics) is not local;
    the suffix is the longest all-local run at the end."""
    res = ResBlock(8, "batch_norm", "silu").eval()
    up = UpBlock(8, 4, "pixel_shuffle", True)
    vit = EfficientViTBlock(8, 4, (5,), "rms_norm")
    assert local_step(res) == LocalStep(res, 2, 1)
    assert local_step(up) == LocalStep(up, 1, 2)
    assert local_step(vit) is None
    assert local_step(nn.Conv2d(4, 4, 5, padding=2)) is None  # only 3x3 'same' convs are known
    assert local_suffix([vit, res, up, nn.SiLU()]) == 1
    assert local_suffix([res, vit]) == 2
    res.train()
    assert local_step(res) is None


def test_band_ranges_include_the_halo_and_stop_at_borders():
    conv = LocalStep(nn.Identity(), 1, 1)
    up = LocalStep(nn.Identity(), 1, 2)
    # output rows [8, 12) of conv(up(conv(x))), x 10 rows high -> 20 -> 20
    ranges = band_ranges([conv, up, conv], [10, 10, 20, 20], 8, 12)
    assert ranges == [(1, 9), (2, 8), (7, 13), (8, 12)]  # 13/2 rounds up to 7, +1 halo
    assert band_ranges([conv, up, conv], [10, 10, 20, 20], 0, 4)[0] == (0, 5)  # clipped at 0
    assert band_ranges([conv, up, conv], [10, 10, 20, 20], 16, 20)[0] == (5, 10)  # bottom


# Every encoder family: pixel_unshuffle down blocks (in-1.0, 1.5; f64 and f32) and the SANA
# encoder's conv stem with stride-2 conv down blocks (SANA 1.1, Lite).
ENCODERS = ["dc-ae-f64c128-in-1.0", "dc-ae-f32c32-in-1.0", "dc-ae-f32c32-sana-1.1",
            "dc-ae-lite-f32c32-sana-1.1", "dc-ae-1.5-f64c128"]  # fmt: skip


@pytest.mark.parametrize("name", ENCODERS)
def test_banded_encode_equals_full_frame(name):
    """Bands of one row, uneven bands, bands taller than the image, a batch, a non-square
    image, the structured-latent channel slice: the full-frame latents (exact on this CPU)."""
    model = _model(name)
    f = model.spatial_compression_ratio
    x = torch.randn(2, 3, 4 * f, 3 * f)
    with torch.no_grad():
        full = model.encode(x)
        for rows in (1, 7, 48, 2 * f, 4 * f + 5):
            banded = model.encode(x, band_rows=rows)
            assert banded.shape == full.shape
            torch.testing.assert_close(banded, full, rtol=1e-5, atol=1e-5, msg=f"{name} {rows}")
        c = max(1, model.latent_channels // 2)
        part = model.encode(x, channels=c, band_rows=16)
    torch.testing.assert_close(part, full[:, :c], rtol=1e-5, atol=1e-5)


def test_the_encoder_bands_its_local_head_up_to_the_first_attention_block():
    model = _model("dc-ae-f32c32-sana-1.1")
    enc = model.encoder
    layers = [enc.stem, *(m for stage in enc.stages for m in stage)]
    k = local_prefix(layers)
    assert 0 < k < len(layers) and isinstance(layers[k], EfficientViTBlock)
    downs = [local_step(m).down for m in layers[:k]]
    assert downs.count(2) == 3  # three stride-2 down blocks before the attention stages
    # a down block's input slice starts on a whole row pair: the halo is rounded up to 2
    steps = [local_step(m) for m in layers[:k]]
    heights = [64]
    for st in steps:
        heights.append(heights[-1] // st.down)
    ranges = band_ranges(steps, heights, 3, 5)
    assert all(lo % 2 == 0 for (lo, _), st in zip(ranges, steps, strict=False) if st.down == 2)


def test_banded_encode_lowers_peak_memory():
    """The encoder's full-resolution head one band at a time: measured on CPU, fp32, 512 px,
    widths / 16 (f32c32 SANA 1.1): full 33.6 MB vs 10.3 MB at 64-row bands."""
    model = _model("dc-ae-f32c32-sana-1.1")
    x = torch.randn(1, 3, 512, 512)
    with torch.inference_mode():
        full = peak_cpu_bytes(lambda: model.encode(x))
        banded = peak_cpu_bytes(lambda: model.encode(x, band_rows=64))
    assert banded < 0.5 * full, (banded, full)


def test_banded_encode_rejects_bad_band_rows():
    model = _model("dc-ae-f32c32-sana-1.1")
    x = torch.randn(1, 3, 64, 64)
    for bad in (0, -3, 2.5, True, "64"):
        with pytest.raises(ValueError, match="band_rows: expected a positive int"):
            model.encode(x, band_rows=bad)


def test_hooked_coders_run_full_frame_so_hooks_see_what_they_would():
    # Bands run a stage's layers outside the stage's call and a banded layer once per band: a
    # stage hook never fired and a layer hook saw partial maps. Hooked coders run full frame
    # (same output); offloading wrappers do not count as hooks.
    model = _model("dc-ae-f32c32-sana-1.1")
    f = model.spatial_compression_ratio
    z, x = _latents(model, (2 * f, 2 * f)), torch.randn(1, 3, 2 * f, 2 * f)
    seen: list[tuple[str, tuple[int, ...]]] = []

    def hook(name: str):  # noqa: ANN202
        return lambda mod, args, out: seen.append((name, tuple(out.shape)))

    handles = [
        model.decoder.stages[0].register_forward_hook(hook("dec stage 0")),
        model.decoder.stages[0][-1].register_forward_hook(hook("dec layer")),
        model.encoder.stages[0].register_forward_hook(hook("enc stage 0")),
    ]
    with torch.no_grad():
        plain = (model.decode(z), model.encode(x))
        calls = list(seen)
        seen.clear()
        banded = (model.decode(z, band_rows=8), model.encode(x, band_rows=8))
    assert seen == calls and len(calls) == 3
    for a, b in zip(banded, plain, strict=True):
        torch.testing.assert_close(a, b)
    for h in handles:
        h.remove()
