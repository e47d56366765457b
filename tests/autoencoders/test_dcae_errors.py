"""Every bad input raises ValueError/TypeError naming what was expected and what came."""

from __future__ import annotations

import json

import pytest
import torch

from dcgen.autoencoders import DCAE, CheckpointError, DCAEConfigError, reduced_config


@pytest.fixture(scope="module")
def model():
    return DCAE(reduced_config("dc-ae-f32c32-in-1.0")).eval()


def test_wrong_channel_count(model):
    with pytest.raises(ValueError, match=r"expected 3 input channels, got 4"):
        model.encode(torch.randn(1, 4, 32, 32))
    with pytest.raises(ValueError, match=r"expected 1 to 2 latent channels, got 5"):
        model.decode(torch.randn(1, 5, 1, 1))
    with pytest.raises(ValueError, match=r"expected 1 to 2 latent channels, got 0"):
        model.decode(torch.randn(1, 0, 1, 1))  # was an error from deep inside the decoder
    with pytest.raises(ValueError, match=r"channels must be an int in \[1, 2\], got 3"):
        model.encode(torch.randn(1, 3, 32, 32), channels=3)
    with pytest.raises(ValueError, match=r"channels must be an int in \[1, 2\], got True"):
        model.encode(torch.randn(1, 3, 32, 32), channels=True)  # was 1 channel, silently
    # a numpy int counts as an int, as everywhere in the public API (it was refused)
    import numpy as np

    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model.encode(x, channels=np.int64(1)), model.encode(x, channels=1))


def test_spatial_size_not_divisible(model):
    with pytest.raises(ValueError, match=r"multiples of the compression factor 32, got 48x32"):
        model.encode(torch.randn(1, 3, 48, 32))


def test_bad_rank_and_type(model):
    with pytest.raises(ValueError, match=r"4-D .* got shape \(3, 32, 32\)"):
        model.encode(torch.randn(3, 32, 32))
    with pytest.raises(TypeError, match=r"expected a torch.Tensor, got ndarray"):
        model.encode(torch.randn(1, 3, 32, 32).numpy())


def test_dtype_mismatch(model):
    with pytest.raises(
        TypeError, match=r"input dtype torch.bfloat16 does not match the model dtype torch.float32"
    ):
        model.decode(torch.randn(1, 2, 1, 1, dtype=torch.bfloat16))


def test_device_mismatch(model):
    with pytest.raises(ValueError, match=r"input is on meta but the model is on cpu"):
        model.decode(torch.empty(1, 2, 1, 1, device="meta"))


def test_bad_tiling_and_batch_options(model):
    z = torch.randn(1, 2, 2, 2)
    with pytest.raises(
        ValueError,
        match=r"tile_size: expected a positive multiple of the compression factor 32, got 48",
    ):
        model.decode(z, tile_size=48)
    with pytest.raises(
        ValueError, match=r"tile_overlap \(64\) must be smaller than tile_size \(64\)"
    ):
        model.decode(z, tile_size=64, tile_overlap=64)
    for bad in (0, True):
        with pytest.raises(
            ValueError, match=rf"batch_size: expected a positive int or None, got {bad}"
        ):
            model.decode(z, batch_size=bad)


def test_checkpoint_not_matching_config(tmp_path):
    cfg = reduced_config("dc-ae-f32c32-in-1.0")
    DCAE(cfg).save_pretrained(tmp_path)
    deeper = cfg.replace(decoder_layers_per_block=(0, 5, 10, 2, 2, 3))
    with pytest.raises(CheckpointError) as info:
        DCAE.from_pretrained(tmp_path, config=deeper)
    msg = str(info.value)
    assert "does not match the DC-AE config" in msg and "diffusion_pytorch_model" in msg
    assert "missing keys (" in msg and "decoder.stages.5.2.attn.qkv.weight" in msg
    wider = cfg.replace(latent_channels=4)
    with pytest.raises(CheckpointError) as info:
        DCAE.from_pretrained(tmp_path, config=wider)
    assert "shape mismatches (" in str(info.value)
    assert "encoder.head.weight: expected (4, 64, 3, 3), got (2, 64, 3, 3)" in str(info.value)
    # extra keys in the file are reported as unexpected
    shallower = cfg.replace(encoder_layers_per_block=(0, 4, 8, 2, 2, 1))
    with pytest.raises(CheckpointError, match=r"unexpected keys \(\d+\): encoder.stages.5.1"):
        DCAE.from_pretrained(tmp_path, config=shallower)


def test_checkpoint_with_integer_weights_or_extra_entries(tmp_path):
    # an integer tensor for a float weight got past the key / shape check and failed inside
    # load_state_dict; a pickle with one non-tensor entry was "got dict"
    from safetensors.torch import load_file, save_file

    from dcgen.autoencoders.checkpoint import read_weights

    cfg = reduced_config("dc-ae-f32c32-in-1.0")
    DCAE(cfg).save_pretrained(tmp_path)
    path = tmp_path / "diffusion_pytorch_model.safetensors"
    weights = load_file(str(path))
    key = next(k for k in weights if k.endswith("weight"))
    save_file({**weights, key: weights[key].to(torch.int32)}, str(path))
    with pytest.raises(CheckpointError, match=r"dtype mismatches \(1\): .*: expected a floating"):
        DCAE.from_pretrained(tmp_path)
    pickle = tmp_path / "model.pt"
    torch.save({**weights, "global_step": 1000}, pickle)
    with pytest.raises(CheckpointError, match=r"got 1 other entries: 'global_step' \(int\)"):
        read_weights(pickle)


def test_truncated_safetensors(tmp_path):
    DCAE(reduced_config("dc-ae-f32c32-in-1.0")).save_pretrained(tmp_path)
    path = tmp_path / "diffusion_pytorch_model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(
        CheckpointError,
        match=r"could not read safetensors file .*diffusion_pytorch_model.safetensors",
    ):
        DCAE.from_pretrained(tmp_path)
    path.write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="could not read safetensors file"):
        DCAE.from_pretrained(tmp_path)


def test_missing_files_and_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        DCAE.from_pretrained(tmp_path / "nope")
    with pytest.raises(CheckpointError, match=r"no DC-AE weights in .* found \[\]"):
        DCAE.from_pretrained(tmp_path)
    DCAE(reduced_config("dc-ae-f32c32-in-1.0")).save_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match=r"variant='fp16'"):
        DCAE.from_pretrained(tmp_path, variant="fp16")
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="could not read config file"):
        DCAE.from_pretrained(tmp_path)
    (tmp_path / "config.json").unlink()
    with pytest.raises(CheckpointError, match="pass config="):
        DCAE.from_pretrained(tmp_path)


def test_unknown_config_field_in_folder(tmp_path):
    DCAE(reduced_config("dc-ae-f32c32-in-1.0")).save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["encoder_norm_types"] = "rms_norm"
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(
        DCAEConfigError, match=r"unknown DC-AE config field\(s\) \['encoder_norm_types'\]"
    ):
        DCAE.from_pretrained(tmp_path)


def test_unrecognised_layout(tmp_path):
    from safetensors.torch import save_file

    save_file({"foo.weight": torch.zeros(1)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(
        CheckpointError, match=r"could not recognise the checkpoint layout.*foo.weight"
    ):
        DCAE.from_pretrained(tmp_path, config="dc-ae-f32c32-in-1.0")


def test_save_after_fold_is_refused(tmp_path):
    model = DCAE(reduced_config("dc-ae-f32c32-in-1.0")).eval().fold_batchnorm()
    with pytest.raises(ValueError, match="folded"):
        model.save_pretrained(tmp_path)


def test_constructor_and_from_config_types():
    with pytest.raises(TypeError, match="expected a DCAEConfig, got str"):
        DCAE("dc-ae-f32c32-in-1.0")
    with pytest.raises(TypeError, match="got int"):
        DCAE.from_config(3)
    with pytest.raises(KeyError, match="unknown DC-AE preset 'dc-ae-nope'"):
        DCAE.from_config("dc-ae-nope")
