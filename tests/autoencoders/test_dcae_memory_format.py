"""DCAE.set_memory_format: channels_last convolutions compute the same encode / decode.

On a CPU both layouts run the plain path and (forced) the fused path's references; on a GPU with
the kernels built, the automatic rule picks channels_last and the kernels take NHWC inputs.
"""

from __future__ import annotations

import pytest
import torch
from dcae_helpers import assert_close_scaled, perturb_norms, small_config

from dcgen.autoencoders import DCAE
from dcgen.autoencoders.fused import fused_inference
from dcgen.ops import has_kernel

CL = torch.channels_last
PRESETS = [
    "dc-ae-f64c128-in-1.0",  # pixel_shuffle up blocks, EfficientViT stages
    "dc-ae-f32c32-sana-1.1",  # interpolate up blocks (sub-pixel conv on the fused path)
    "dc-ae-f32c32-in-1.0",  # BatchNorm ResBlocks
    "dc-ae-1.5-f32c128",  # structured latents
]


def _model(name: str) -> DCAE:
    return perturb_norms(DCAE(small_config(name))).eval()


def _conv_weights(model: DCAE) -> list[torch.Tensor]:
    # 1x1 and depthwise weights are contiguous in both layouts; the 3x3 convs tell them apart.
    return [p for p in model.parameters() if p.dim() == 4 and p.shape[1] > 1 and p.shape[-1] > 1]


def _conv_inputs(model: DCAE, fn) -> list[torch.Tensor]:
    seen: list[torch.Tensor] = []
    hooks = [
        m.register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
        for m in model.modules()
        if isinstance(m, torch.nn.Conv2d)
    ]
    try:
        fn()
    finally:
        for h in hooks:
            h.remove()
    return seen


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("name", PRESETS)
def test_channels_last_matches_contiguous(name, fused):
    model = _model(name)
    f = model.spatial_compression_ratio
    z = torch.randn(2, model.latent_channels, 3, 4)
    x = torch.randn(1, model.config.in_channels, 2 * f, 3 * f)
    with torch.no_grad(), fused_inference(fused):
        model.set_memory_format("contiguous")
        want_dec, want_enc = model.decode(z), model.encode(x)
        model.set_memory_format("channels_last")
        got_dec, got_enc = model.decode(z), model.encode(x)
        banded = model.decode(z, band_rows=f)
        # tiles and batch slices go through the same layout switch
        tiled = model.decode(z, tile_size=2 * f, tile_overlap=f, batch_size=1)
        assert all(w.is_contiguous(memory_format=CL) for w in _conv_weights(model))
        model.set_memory_format("contiguous")
        tiled_nchw = model.decode(z, tile_size=2 * f, tile_overlap=f, batch_size=1)
    # Different conv summation order only (mkldnn's NHWC kernels); SANA's sub-pixel rewrite
    # on the fused path rounds like test_dcae_fused_path says.
    assert_close_scaled(got_dec, want_dec, rel=1e-4)
    assert_close_scaled(got_enc, want_enc, rel=1e-4)
    assert_close_scaled(banded, want_dec, rel=1e-4)
    assert_close_scaled(tiled, tiled_nchw, rel=1e-4)
    for out in (got_dec, got_enc, banded, tiled):
        assert out.is_contiguous()  # callers get NCHW back whatever the inside ran in


@pytest.mark.parametrize("fused", [False, True])
def test_channels_last_run_is_unbroken(fused):
    # Every conv input is NHWC: no op in the chain hands an NCHW tensor to the next conv, which
    # would send that conv down cuDNN's transposing NCHW path on a GPU.
    model = _model("dc-ae-f32c32-sana-1.1")
    model.set_memory_format("channels_last")
    z = torch.randn(1, model.latent_channels, 4, 4)
    x = torch.randn(1, 3, 4 * model.spatial_compression_ratio, 128)
    with torch.no_grad(), fused_inference(fused):
        inputs = _conv_inputs(model, lambda: (model.decode(z), model.encode(x)))
    assert inputs
    nchw = [tuple(t.shape) for t in inputs if not t.is_contiguous(memory_format=CL)]
    assert not nchw, f"conv inputs not channels_last: {nchw}"


def test_contiguous_mode_restores_nchw_weights():
    model = _model("dc-ae-f64c128-in-1.0")
    z = torch.randn(1, model.latent_channels, 2, 2)
    with torch.no_grad():
        model.set_memory_format("channels_last")
        model.decode(z)
        model.set_memory_format("contiguous")
        model.decode(z)
    assert all(w.is_contiguous() for w in _conv_weights(model))
    inputs = _conv_inputs(model, lambda: model.decode(z))
    assert all(t.is_contiguous() for t in inputs)


def test_auto_is_nchw_on_cpu():
    model = _model("dc-ae-f64c128-in-1.0")
    assert model.memory_format == "auto"
    with torch.no_grad():
        model.decode(torch.randn(1, model.latent_channels, 2, 2))
    assert all(w.is_contiguous() for w in _conv_weights(model))


def test_weights_converted_under_inference_mode_still_train():
    # The layout switch happens inside decode; if that runs under inference_mode the new
    # weights must still be ordinary tensors autograd can use afterwards.
    model = _model("dc-ae-f64c128-in-1.0")
    model.set_memory_format("channels_last")
    z = torch.randn(1, model.latent_channels, 2, 2)
    with torch.inference_mode():
        model.decode(z)
    assert not any(p.is_inference() for p in model.parameters())
    model.decode(z).square().mean().backward()
    decoder_convs = [m.weight for m in model.decoder.modules() if isinstance(m, torch.nn.Conv2d)]
    assert all(w.grad is not None and w.grad.abs().sum() > 0 for w in decoder_convs)


def test_subpixel_weights_follow_the_conv_weights():
    # SANA's interpolate up blocks cache their sub-pixel rewrite; an in-place weight update
    # must rebuild it, or the fused decode would keep using stale weights.
    model = _model("dc-ae-f32c32-sana-1.1")
    z = torch.randn(1, model.latent_channels, 2, 2)
    with torch.no_grad(), fused_inference(True):
        before = model.decode(z)
        for m in model.decoder.modules():
            if hasattr(m, "_subpixel_conv"):
                m.conv.weight.mul_(1.5)
        after = model.decode(z)
        with fused_inference(False):
            plain = model.decode(z)
    assert (after - before).abs().max() > 1e-3
    assert_close_scaled(after, plain, rel=1e-4)


def test_set_memory_format_rejects_unknown_names():
    model = _model("dc-ae-f64c128-in-1.0")
    with pytest.raises(ValueError, match="memory_format: expected one of"):
        model.set_memory_format("nhwc")


@pytest.mark.cuda
@pytest.mark.parametrize("name", ["dc-ae-f64c128-in-1.0", "dc-ae-f32c32-sana-1.1"])
def test_cuda_auto_runs_channels_last_kernels(name, monkeypatch):
    if not has_kernel("up_block_shortcut", "cuda"):
        pytest.skip("dcgen._C has no CUDA kernels for the fused DC-AE path")
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    model = _model(name).cuda()
    z = torch.randn(1, model.latent_channels, 4, 4, device="cuda")
    import dcgen.autoencoders.blocks as blocks_mod

    calls = []
    shortcut = blocks_mod.up_block_shortcut
    monkeypatch.setattr(
        blocks_mod,
        "up_block_shortcut",
        lambda *a, **k: calls.append(a[0].is_contiguous(memory_format=CL)) or shortcut(*a, **k),
    )
    with torch.inference_mode():
        model.set_memory_format("contiguous")
        want = model.decode(z)
        model.set_memory_format("auto")
        calls.clear()
        got = model.decode(z)
    assert calls and all(calls)  # the fused kernels ran (automatic rule), on channels_last maps
    assert all(w.is_contiguous(memory_format=CL) for w in _conv_weights(model))
    assert got.is_contiguous()
    assert_close_scaled(got, want, rel=1e-4)
