"""DCAEConfig: presets, (de)serialisation, validation, key tables vs diffusers."""

from __future__ import annotations

import json

import pytest
import torch

from dcgen.autoencoders import (
    DCAE,
    PRESETS,
    UNKNOWN_SCALING_FACTOR,
    DCAEConfig,
    DCAEConfigError,
    get_preset,
    list_presets,
    reduced_config,
)
from dcgen.autoencoders.checkpoint import dcgen_to_diffusers, diffusers_to_dcgen

EXPECTED = {
    "dc-ae-f32c32-sana-1.0": (32, 32, 0.41407),
    "dc-ae-f32c32-sana-1.1": (32, 32, 0.41407),
    "dc-ae-f32c32-in-1.0": (32, 32, 0.3189),
    "dc-ae-f32c32-mix-1.0": (32, 32, 0.4552),
    "dc-ae-f64c128-in-1.0": (64, 128, 0.2889),
    "dc-ae-f64c128-mix-1.0": (64, 128, 0.4538),
    "dc-ae-f128c512-in-1.0": (128, 512, 0.4883),
    "dc-ae-f128c512-mix-1.0": (128, 512, 0.3620),
    "dc-ae-lite-f32c32-sana-1.1": (32, 32, 0.41407),
    "dc-ae-1.5-f32c128": (32, 128, None),
    "dc-ae-1.5-f64c128": (64, 128, None),
}


def test_every_preset_listed():
    assert set(list_presets()) == set(EXPECTED) == set(PRESETS)
    assert UNKNOWN_SCALING_FACTOR == {k for k, v in EXPECTED.items() if v[2] is None}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_preset_values(name):
    f, c, scale = EXPECTED[name]
    cfg = get_preset(name)
    assert cfg.spatial_compression_ratio == f and cfg.latent_channels == c
    if scale is not None:
        assert cfg.scaling_factor == scale
    assert get_preset(f"mit-han-lab/{name}-diffusers") == cfg


@pytest.mark.parametrize(
    "name, enc_m, dec_m",
    [("dc-ae-f64c128-in-1.0", 264.6, 412.3), ("dc-ae-f32c32-sana-1.0", 153.0, 159.2)],
)
def test_parameter_counts_match_published(name, enc_m, dec_m):
    with torch.device("meta"):
        model = DCAE.from_config(name)
    enc = sum(p.numel() for p in model.encoder.parameters()) / 1e6
    dec = sum(p.numel() for p in model.decoder.parameters()) / 1e6
    assert round(enc, 1) == enc_m and round(dec, 1) == dec_m


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_key_tables_match_diffusers_full_size(name):
    """Full-size presets on the meta device: dcgen <-> diffusers names and shapes agree."""
    diffusers = pytest.importorskip("diffusers")
    cfg = get_preset(name)
    with torch.device("meta"):
        ours = DCAE(cfg).state_dict()
        theirs = diffusers.AutoencoderDC(**cfg.to_dict()).state_dict()
    converted = dcgen_to_diffusers(ours)
    assert converted.keys() == theirs.keys()
    assert all(converted[k].shape == theirs[k].shape for k in theirs)
    back = diffusers_to_dcgen(theirs)
    assert back.keys() == ours.keys()
    assert all(back[k].shape == ours[k].shape for k in ours)


def test_dict_roundtrip_and_bookkeeping_keys():
    cfg = get_preset("dc-ae-f64c128-mix-1.0")
    data = json.loads(json.dumps(cfg.to_dict()))
    data.update(_class_name="AutoencoderDC", _diffusers_version="0.32.1", _name_or_path="x")
    assert DCAEConfig.from_dict(data) == cfg
    # strings for per-stage fields (diffusers style) expand to one entry per stage
    cfg2 = DCAEConfig.from_dict({**data, "decoder_norm_types": "rms_norm"})
    assert cfg2.decoder_norm_types == ("rms_norm",) * 7
    # legacy single width list
    legacy = {k: v for k, v in data.items() if not k.endswith("block_out_channels")}
    legacy["block_out_channels"] = data["encoder_block_out_channels"]
    assert DCAEConfig.from_dict(legacy) == cfg


def test_from_dict_errors():
    with pytest.raises(DCAEConfigError, match=r"unknown DC-AE config field\(s\) \['foo'\]"):
        DCAEConfig.from_dict({"foo": 1})
    with pytest.raises(DCAEConfigError, match="_class_name='AutoencoderKL'"):
        DCAEConfig.from_dict({"_class_name": "AutoencoderKL"})


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(encoder_layers_per_block=(2, 2)), r"encoder_layers_per_block: expected 6 entries"),
        (dict(decoder_act_fns=("silu",) * 5), r"decoder_act_fns: expected 6 entries"),
        (dict(decoder_norm_types="group_norm"), r"decoder_norm_types\[0\]: expected one of"),
        (dict(encoder_block_types="EViT_GLU"), r"encoder_block_types\[0\]: expected one of"),
        (dict(upsample_block_type="bilinear"), r"upsample_block_type: expected one of"),
        (dict(latent_channels=48), r"encoder_out_shortcut=True needs .*1024 .* latent_channels=48"),
        (dict(decoder_layers_per_block=(3, 0, 3, 3, 3, 3)), r"only stage 0 may have 0"),
        (
            dict(decoder_block_out_channels=(128, 256)),
            r"decoder_layers_per_block: expected 2 entries",
        ),
        (dict(scaling_factor=0.0), r"scaling_factor: expected a finite number > 0"),
        # wrong types: named by field (were bare int() / len() errors, or silently accepted)
        (dict(scaling_factor=float("inf")), r"scaling_factor: expected a finite number > 0"),
        (dict(scaling_factor=None), r"scaling_factor: expected a number, got None"),
        (dict(encoder_block_out_channels=64), r"encoder_block_out_channels: expected a list"),
        (dict(encoder_layers_per_block=["a"] * 6), r"encoder_layers_per_block: expected whole"),
        (dict(decoder_block_out_channels=(128.5,) * 6), r"expected whole numbers, got 128.5"),
        (dict(encoder_qkv_multiscales=[5] * 6), r"encoder_qkv_multiscales: expected a list"),
        (dict(encoder_out_shortcut="false"), r"encoder_out_shortcut: expected true or false"),
        (dict(decoder_in_shortcut=0.0), r"decoder_in_shortcut: expected true or false"),
        (dict(in_channels=True), r"in_channels: expected a positive int, got True"),
        (dict(encoder_qkv_multiscales=((),) * 3 + ((4,),) * 3), r"odd kernel sizes"),
    ],
)
def test_validation_errors(changes, message):
    base = get_preset("dc-ae-f32c32-sana-1.0")
    with pytest.raises(DCAEConfigError, match=message):
        base.replace(**changes)


def test_reduced_config_keeps_structure():
    full = get_preset("dc-ae-f128c512-mix-1.0")
    small = reduced_config(full, width_divisor=16, max_layers=2)
    assert small.encoder_block_types == full.encoder_block_types
    assert small.decoder_norm_types == full.decoder_norm_types
    assert small.encoder_block_out_channels == (8, 16, 32, 32, 64, 64, 128, 128)
    assert small.encoder_layers_per_block == (0, 2, 2, 2, 2, 2, 2, 2)
    assert small.attention_head_dim == 2 and small.latent_channels == 32
    assert small.spatial_compression_ratio == full.spatial_compression_ratio
