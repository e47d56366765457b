"""fold_batchnorm, slicing, DC-AE 1.5 channel subsets, bf16, the scaling convention."""

from __future__ import annotations

import pytest
import torch
from dcae_helpers import assert_close_scaled, perturb_norms, rel_rms, small_config
from torch import nn

from dcgen.autoencoders import DCAE
from dcgen.autoencoders.norms import BatchNorm2dFP32


def _model(name: str, **kw) -> DCAE:
    return perturb_norms(DCAE(small_config(name, **kw))).eval()


def test_fold_batchnorm_matches():
    model = _model("dc-ae-f32c32-in-1.0")  # decoder stages 0-2 use BatchNorm
    z = torch.randn(2, model.latent_channels, 2, 2)
    with torch.no_grad():
        before = model.decode(z)
        model.fold_batchnorm()
        after = model.decode(z)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert_close_scaled(after, before, rel=1e-5)


def test_fold_batchnorm_in_attention_norm():
    """A decoder EfficientViT stage with batch_norm folds its LiteMLA projection too."""
    cfg = small_config("dc-ae-f32c32-in-1.0")
    cfg = cfg.replace(decoder_norm_types=("batch_norm",) * cfg.num_stages)
    model = perturb_norms(DCAE(cfg)).eval()
    z = torch.randn(1, cfg.latent_channels, 2, 2)
    with torch.no_grad():
        before = model.decode(z)
        after = model.fold_batchnorm().decode(z)
    assert_close_scaled(after, before, rel=1e-5)


def test_slicing_equals_full_batch():
    model = _model("dc-ae-f32c32-sana-1.0")
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        full = model.encode(x)
        sliced = model.encode(x, batch_size=1)
        model.enable_slicing(2)
        sliced2 = model.decode(full)
        model.disable_slicing()
        dec = model.decode(full)
    assert_close_scaled(sliced, full, rel=1e-5)
    assert_close_scaled(sliced2, dec, rel=1e-5)


def test_channel_subset_equals_zero_padding():
    model = _model("dc-ae-1.5-f32c128")
    c = model.latent_channels // 2
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        full = model.encode(x)
        part = model.encode(x, channels=c)
        assert part.shape[1] == c
        assert_close_scaled(part, full[:, :c], rel=1e-6)
        padded = torch.cat([part, torch.zeros_like(full[:, c:])], dim=1)
        assert_close_scaled(model.decode(part), model.decode(padded), rel=1e-5)


def test_channel_subset_with_shortcuts():
    """1.0 configs keep their shortcuts; the subset decode must still equal zero padding."""
    model = _model("dc-ae-f32c32-in-1.0", latent_channels=4)
    z = torch.randn(1, 4, 2, 2)
    z[:, 2:] = 0
    with torch.no_grad():
        assert_close_scaled(model.decode(z[:, :2]), model.decode(z), rel=1e-5)


def test_bf16_no_nan_and_close_to_fp32():
    # head dim 8: with head dim 2 random-weight attention is so ill-conditioned that bf16 is
    # ~15% off in diffusers as well (measured), which would test nothing.
    model = _model("dc-ae-f32c32-sana-1.0", width_divisor=8, attention_head_dim=8)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        z32 = model.encode(x)
        y32 = model.decode(z32)
        model.to(torch.bfloat16)
        z16 = model.encode(x.bfloat16())
        y16 = model.decode(z32.bfloat16())
    assert z16.dtype == y16.dtype == torch.bfloat16
    assert torch.isfinite(z16).all() and torch.isfinite(y16).all()
    assert rel_rms(z16, z32) < 0.05
    assert rel_rms(y16, y32) < 0.05


def test_batchnorm_statistics_stay_fp32_when_the_model_is_cast(tmp_path):
    # a running variance past fp16's 65,504 (the toy DC-AE has one of 1e9) became inf under
    # .half(), and every decode NaN; the statistics now stay fp32 while the convs go 16-bit
    model = _model("dc-ae-f32c32-in-1.0")  # decoder stages 0-2 use BatchNorm
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    with torch.no_grad():
        for bn in bns:
            bn.running_mean.mul_(1e3)
            bn.running_var.mul_(1e6).add_(1e5)
    z = torch.randn(1, model.latent_channels, 2, 2)
    with torch.no_grad():
        y32 = model.decode(z)
        for dtype in (torch.float16, torch.bfloat16):
            model.to(dtype)
            assert model.decoder.stem.weight.dtype == dtype
            assert all(t.dtype == torch.float32 for bn in bns for t in bn.state_dict().values()
                       if t.is_floating_point())  # fmt: skip
            y = model.decode(z.to(dtype))
            assert y.dtype == dtype and torch.isfinite(y).all(), dtype
            assert rel_rms(y, y32) < 0.05, dtype
            model.float()
    model.half().save_pretrained(tmp_path)  # and the saved statistics load back exactly
    back = DCAE.from_pretrained(tmp_path)
    for name, value in model.state_dict().items():
        assert torch.equal(back.state_dict()[name].to(value.dtype), value), name
    # a 16-bit file of the fp32 model keeps them fp32 too (they were written as inf)
    model.float().save_pretrained(tmp_path / "fp16", dtype=torch.float16)
    back = DCAE.from_pretrained(tmp_path / "fp16")
    for bn, saved in zip(bns, [m for m in back.modules() if isinstance(m, nn.BatchNorm2d)]):
        for key, value in bn.state_dict().items():
            assert torch.equal(saved.state_dict()[key], value), key


def test_large_activations_in_bf16_do_not_overflow():
    """Linear attention sums over all pixels; done in fp32 it stays finite for large inputs."""
    model = _model("dc-ae-f32c32-sana-1.0").to(torch.bfloat16)
    x = (torch.randn(1, 3, 128, 128) * 100).bfloat16()
    with torch.no_grad():
        assert torch.isfinite(model.encode(x)).all()


def test_scaling_convention():
    model = _model("dc-ae-f32c32-mix-1.0")
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        raw = model.encode(x)
        scaled = model.encode(x, scaled=True)
        assert_close_scaled(scaled, raw * model.scaling_factor, rel=1e-6)
        assert_close_scaled(model.decode(scaled, scaled=True), model.decode(raw), rel=1e-5)


def test_forward_roundtrip_shape():
    model = _model("dc-ae-f64c128-in-1.0")
    x = torch.randn(1, 3, 64, 128)
    with torch.no_grad():
        assert model(x).shape == x.shape
        assert model.encode(x).shape == (1, model.latent_channels, 1, 2)


def test_small_map_attention_stays_finite_in_fp16():
    """Maps of at most head_dim pixels take LiteMLA's N x N form; its k^T q scores reached
    1.6e5 here and overflowed fp16 (NaN outputs) when multiplied in 16 bits."""
    from dcgen.autoencoders.blocks import LiteMLA

    torch.manual_seed(0)
    block = LiteMLA(32, head_dim=32, kernel_sizes=(), norm_type="rms_norm").eval()
    x = torch.randn(1, 32, 4, 4) * 200  # 16 pixels <= head_dim 32
    with torch.no_grad():
        y32 = block(x)
        y16 = block.half()(x.half())
    assert torch.isfinite(y16).all()
    assert rel_rms(y16, y32) < 1e-2


def _overflowing_fold_block() -> nn.Module:
    """A BatchNorm ResBlock whose folded conv2 bias, (0 - mean) * gamma / sqrt(var), is -1e5:
    past fp16's 65,504, while the unfolded block's values all fit (conv2 = identity, its input
    near the running mean)."""
    from dcgen.autoencoders.blocks import ResBlock

    block = ResBlock(8, "batch_norm", "silu").eval()
    with torch.no_grad():
        block.conv1.weight.zero_()
        block.conv1.bias.fill_(1000.0)
        block.conv2.weight.zero_()
        block.conv2.weight[:, :, 1, 1] = torch.eye(8)
        block.norm.running_mean.fill_(1000.0)
        block.norm.running_var.fill_(1e-4)
        block.norm.weight.fill_(1.0)
        block.norm.bias.normal_()
    return block


def test_batchnorm_is_not_folded_where_the_fold_overflows_fp16(caplog):
    from dcgen.autoencoders.fused import fused_inference

    block = _overflowing_fold_block()
    x = torch.randn(1, 8, 4, 4)
    with torch.no_grad():
        want = block(x)
        block.half()
        for mode in (False, True):  # plain, then fused (which folds on the fly where it can)
            with fused_inference(mode):
                got = block(x.half())
            assert torch.isfinite(got).all(), mode
            assert rel_rms(got, want) < 0.05, mode
        # an explicit fold keeps that BatchNorm, says so, and the block stays finite
        with caplog.at_level("WARNING"):
            assert block.fold_batchnorm() is False
        assert isinstance(block.norm, nn.BatchNorm2d)
        assert "fp16" in caplog.text or "float16" in caplog.text
        assert torch.isfinite(block(x.half())).all()


@pytest.mark.parametrize("default", [torch.bfloat16, torch.float16])
def test_batchnorm_statistics_are_fp32_under_a_16bit_default_dtype(default):
    # BatchNorm2dFP32 took torch's default dtype: under fp16 a loaded running variance of 1e9
    # (the toy f32 DC-AE has one) became inf
    cfg = small_config("dc-ae-f32c32-in-1.0")  # decoder stages 0-2 use BatchNorm
    state = DCAE(cfg).state_dict()
    for key in state:
        if key.endswith("running_var"):
            state[key] = torch.full_like(state[key], 1e9)
    torch.set_default_dtype(default)
    try:
        model = DCAE(cfg)
        explicit = BatchNorm2dFP32(4, dtype=default)
    finally:
        torch.set_default_dtype(torch.float32)
    model.load_state_dict(state)
    bns = [m for m in model.modules() if isinstance(m, BatchNorm2dFP32)] + [explicit]
    assert len(bns) > 1
    for bn in bns:
        for key, t in bn.state_dict().items():
            assert not t.is_floating_point() or t.dtype == torch.float32, (key, t.dtype)
    assert all(torch.equal(bn.running_var, torch.full_like(bn.running_var, 1e9)) for bn in bns[:-1])


@pytest.mark.parametrize("default", [torch.float32, torch.bfloat16])
def test_a_meta_built_batchnorm_dcae_to_empty_then_loaded_equals_the_original(default):
    # under a bf16 default the meta-built BatchNorm held bf16 statistics, and to_empty's move to
    # fp32 copied out of the meta tensor ("Cannot copy out of meta tensor")
    cfg = small_config("dc-ae-f32c32-in-1.0")
    torch.set_default_dtype(default)
    try:
        torch.manual_seed(0)
        ref = perturb_norms(DCAE(cfg)).eval()
        with torch.device("meta"):
            model = DCAE(cfg)
        model.to_empty(device="cpu")
    finally:
        torch.set_default_dtype(torch.float32)
    model.load_state_dict(ref.state_dict(), strict=True)
    model.eval()
    got = model.state_dict()
    for key, want in ref.state_dict().items():
        assert got[key].dtype == want.dtype and torch.equal(got[key], want), key
    z = torch.randn(1, ref.latent_channels, 2, 2, dtype=default)
    with torch.no_grad():
        assert torch.equal(model.decode(z), ref.decode(z))


def test_to_empty_gives_a_meta_batchnorm_fp32_statistics():
    # keep_fp32 moved a 16-bit statistic with t.to(device, fp32): a meta tensor has nothing to
    # copy; to_empty gives it fresh fp32 storage instead
    with torch.device("meta"):
        bn = BatchNorm2dFP32(4)
    bn.running_var = torch.empty(4, device="meta", dtype=torch.bfloat16)
    bn.to_empty(device="cpu")
    for key, t in bn.state_dict().items():
        assert t.device.type == "cpu", key
        assert not t.is_floating_point() or t.dtype == torch.float32, (key, t.dtype)
