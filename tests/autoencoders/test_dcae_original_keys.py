"""Loading original mit-han-lab (efficientvit) checkpoints.

The original key names are produced here by an independent diffusers -> original mapping
written from the efficientvit module tree (ResidualBlock ``main`` wrappers, OpSequential
``op_list``, ConvLayer ``conv``/``norm``, LiteMLA ``qkv``/``aggreg``/``proj``, GLUMBConv
``inverted_conv``/``depth_conv``/``point_conv``), not from dcgen's tables.
"""

from __future__ import annotations

import re

import pytest
import torch
from dcae_helpers import assert_computes_like, perturb_norms, small_config
from safetensors.torch import save_file

from dcgen.autoencoders import DCAE

diffusers = pytest.importorskip("diffusers")

_EVIT_PARTS = {
    "attn.to_out.weight": "context_module.main.proj.conv.weight",
    "conv_out.conv_inverted.weight": "local_module.main.inverted_conv.conv.weight",
    "conv_out.conv_inverted.bias": "local_module.main.inverted_conv.conv.bias",
    "conv_out.conv_depth.weight": "local_module.main.depth_conv.conv.weight",
    "conv_out.conv_depth.bias": "local_module.main.depth_conv.conv.bias",
    "conv_out.conv_point.weight": "local_module.main.point_conv.conv.weight",
}


def _block_key(rest: str, block_type: str) -> str:
    if block_type == "ResBlock":
        if rest.startswith("conv1."):
            return "main.conv1.conv." + rest[len("conv1.") :]
        if rest.startswith("conv2."):
            return "main.conv2.conv." + rest[len("conv2.") :]
        if rest.startswith("norm."):
            return "main.conv2.norm." + rest[len("norm.") :]
    else:
        if rest in _EVIT_PARTS:
            return _EVIT_PARTS[rest]
        if rest.startswith("attn.norm_out."):
            return "context_module.main.proj.norm." + rest[len("attn.norm_out.") :]
        if rest.startswith("conv_out.norm."):
            return "local_module.main.point_conv.norm." + rest[len("conv_out.norm.") :]
        m = re.match(r"attn\.to_qkv_multiscale\.(\d+)\.proj_(in|out)\.weight", rest)
        if m:
            return (
                f"context_module.main.aggreg.{m.group(1)}.{0 if m.group(2) == 'in' else 1}.weight"
            )
    raise AssertionError(f"unmapped block key {rest}")


def diffusers_to_original(sd: dict, cfg) -> dict:
    out = {}
    n = cfg.num_stages
    wrap = "conv.conv." if cfg.downsample_block_type == "pixel_unshuffle" else "conv."
    # fuse the attention thirds back into the original qkv conv
    fused = {}
    for key in list(sd):
        m = re.match(r"(.*)\.attn\.to_(q|k|v)\.weight$", key)
        if m:
            fused.setdefault(m.group(1), {})[m.group(2)] = sd[key]
    for key, value in sd.items():
        if re.search(r"\.attn\.to_[qkv]\.weight$", key):
            continue
        if key.startswith("encoder.conv_in."):
            tail = key[len("encoder.conv_in.") :]
            if cfg.encoder_layers_per_block[0] > 0:
                new = "encoder.project_in.conv." + tail
            else:
                new = "encoder.project_in." + wrap + tail[len("conv.") :]
        elif key.startswith("encoder.conv_out."):
            mid = "main.op_list" if cfg.encoder_out_shortcut else "op_list"
            new = f"encoder.project_out.{mid}.0.conv." + key[len("encoder.conv_out.") :]
        elif key.startswith("decoder.conv_in."):
            mid = "main." if cfg.decoder_in_shortcut else ""
            new = f"decoder.project_in.{mid}conv." + key[len("decoder.conv_in.") :]
        elif key.startswith("decoder.norm_out."):
            new = "decoder.project_out.op_list.0." + key[len("decoder.norm_out.") :]
        elif key.startswith("decoder.conv_out."):
            tail = key[len("decoder.conv_out.") :]
            if cfg.decoder_layers_per_block[0] > 0:
                new = "decoder.project_out.op_list.2.conv." + tail
            else:  # ConvPixelShuffle / InterpolateConv wrap a ConvLayer
                new = "decoder.project_out.op_list.2.conv.conv." + tail[len("conv.") :]
        else:
            m = re.match(r"(encoder|decoder)\.(down_blocks|up_blocks)\.(\d+)\.(\d+)\.(.*)", key)
            assert m, key
            half, _, i, j, rest = (
                m.group(1),
                m.group(2),
                int(m.group(3)),
                int(m.group(4)),
                m.group(5),
            )
            depth = getattr(cfg, f"{half}_layers_per_block")[i]
            types = getattr(cfg, f"{half}_block_types")
            prefix = f"{half}.stages.{i}.op_list.{j}."
            if half == "encoder" and j == depth:  # the stage's downsample block
                new = prefix + "main." + wrap + rest[len("conv.") :]
            elif half == "decoder" and i < n - 1 and j == 0:  # the stage's upsample block
                new = prefix + "main.conv.conv." + rest[len("conv.") :]
            else:
                new = prefix + _block_key(rest, types[i])
        out[new] = value
    for prefix, parts in fused.items():
        m = re.match(r"(encoder|decoder)\.(?:down|up)_blocks\.(\d+)\.(\d+)$", prefix)
        new = f"{m.group(1)}.stages.{m.group(2)}.op_list.{m.group(3)}.context_module.main.qkv.conv.weight"
        out[new] = torch.cat([parts["q"], parts["k"], parts["v"]])[:, :, None, None]
    for key in list(out):  # the original stores the attention projection as a 1x1 conv
        if key.endswith("context_module.main.proj.conv.weight"):
            out[key] = out[key][:, :, None, None]
    return out


@pytest.mark.parametrize(
    "name", ["dc-ae-f32c32-sana-1.0", "dc-ae-f32c32-in-1.0", "dc-ae-lite-f32c32-sana-1.1",
             "dc-ae-1.5-f32c128"]
)  # fmt: skip
def test_original_checkpoint_loads(name, tmp_path):
    cfg = small_config(name)
    ref = perturb_norms(diffusers.AutoencoderDC(**cfg.to_dict())).eval()
    original = diffusers_to_original(ref.state_dict(), cfg)
    assert any(".op_list." in k for k in original)
    # a folder without config.json: the config comes from the config argument
    folder = tmp_path / "ckpt"
    folder.mkdir()
    save_file({k: v.contiguous() for k, v in original.items()}, str(folder / "model.safetensors"))
    model = DCAE.from_pretrained(folder, config=cfg)
    # a training-style torch pickle, nested under "state_dict"
    torch.save({"state_dict": original}, tmp_path / "model.pt")
    model_pt = DCAE.from_pretrained(tmp_path / "model.pt", config=cfg)
    f = cfg.spatial_compression_ratio
    x = torch.randn(1, 3, 2 * f, 2 * f)
    z = torch.randn(1, cfg.latent_channels, 2, 2)
    for m in (model, model_pt):
        assert_computes_like(m, ref, x, z)


def test_pickles_load_memory_mapped_and_in_the_legacy_format(tmp_path, monkeypatch):
    """A zip-format .pt is mapped (read whole, an original f64c128 checkpoint sat in memory
    beside the model); torch's legacy format cannot be and still loads."""
    cfg = small_config("dc-ae-f32c32-in-1.0")
    ref = perturb_norms(diffusers.AutoencoderDC(**cfg.to_dict())).eval()
    original = diffusers_to_original(ref.state_dict(), cfg)
    torch.save({"state_dict": original}, tmp_path / "zip.pt")
    torch.save(
        {"state_dict": original}, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False
    )
    mapped = []
    real = torch.load

    def spy(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        mapped.append(kwargs.get("mmap", False))
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    f = cfg.spatial_compression_ratio
    x, z = torch.randn(1, 3, 2 * f, 2 * f), torch.randn(1, cfg.latent_channels, 2, 2)
    assert_computes_like(DCAE.from_pretrained(tmp_path / "zip.pt", config=cfg), ref, x, z)
    assert mapped == [True]
    assert_computes_like(DCAE.from_pretrained(tmp_path / "legacy.pt", config=cfg), ref, x, z)
    assert mapped == [True, True, False]  # tried mapped, then read


def test_auto_dtype_keeps_the_stored_one(tmp_path):
    cfg = small_config("dc-ae-f32c32-in-1.0")
    model = DCAE(cfg).eval()
    model.save_pretrained(tmp_path / "bf16", dtype=torch.bfloat16)
    auto = DCAE.from_pretrained(tmp_path / "bf16", dtype="auto")
    from dcgen.autoencoders.norms import BatchNorm2dFP32

    bn = {id(p) for m in auto.modules() if isinstance(m, BatchNorm2dFP32) for p in m.parameters()}
    assert {p.dtype for p in auto.parameters() if id(p) not in bn} == {torch.bfloat16}
    for k, v in auto.state_dict().items():
        assert torch.equal(v.float(), model.state_dict()[k].to(torch.bfloat16).float()), k
    assert DCAE.from_pretrained(tmp_path / "bf16").dtype == torch.float32  # the default
    with pytest.raises(TypeError, match="expected a floating torch.dtype, 'auto' or None"):
        DCAE.from_pretrained(tmp_path / "bf16", dtype="bf16")


def test_config_from_folder_name(tmp_path):
    """Original hub folders carry no diffusers config; the folder name picks the preset."""

    folder = tmp_path / "mit-han-lab--dc-ae-f32c32-in-1.0"
    folder.mkdir()
    with torch.device("meta"):
        model = DCAE.from_config("dc-ae-f32c32-in-1.0")

    cfg = DCAE._find_config(folder, folder / "model.safetensors", None)
    assert cfg == model.config
