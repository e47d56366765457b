"""The DC-AE blocks' fused inference path computes the same decode/encode as the plain path.

On a CPU the fused path is forced (fused_inference(True)) and its ops run their references; on
a GPU with the kernels built the automatic rule takes it and the compiled kernels run.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from dcae_helpers import assert_close_scaled, perturb_norms, small_config, well_conditioned_latent

import dcgen.autoencoders.blocks as blocks_mod
import dcgen.autoencoders.coders as coders_mod
from dcgen.autoencoders import DCAE
from dcgen.autoencoders.blocks import nearest_up_conv_as_subpixel
from dcgen.autoencoders.fused import fused_inference, use_fused
from dcgen.autoencoders.norms import ChannelRMSNorm
from dcgen.ops import has_kernel

# pixel_shuffle/unshuffle resampling with ResBlocks + EfficientViT (f64c128), interpolate/conv
# resampling (SANA), BatchNorm ResBlocks (in-1.0), the 1.5 structured-latent decoder.
PRESETS = [
    "dc-ae-f64c128-in-1.0",
    "dc-ae-f32c32-sana-1.1",
    "dc-ae-f32c32-in-1.0",
    "dc-ae-1.5-f32c128",
]


def _model(name: str, **kwargs: int) -> DCAE:
    return perturb_norms(DCAE(small_config(name, **kwargs))).eval()


def _spy(monkeypatch, module, name: str, calls: dict[str, int]) -> None:
    original = getattr(module, name)

    def wrapped(*args, **kwargs):
        calls[name] = calls.get(name, 0) + 1
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, wrapped)


def _spy_fused_ops(monkeypatch) -> dict[str, int]:
    calls: dict[str, int] = {}
    for name in ("up_block_shortcut", "down_block_shortcut", "glu_depthwise_conv"):
        _spy(monkeypatch, blocks_mod, name, calls)
    original = ChannelRMSNorm.fused

    def fused(self, *args, **kwargs):
        calls["channel_rms_norm_fused"] = calls.get("channel_rms_norm_fused", 0) + 1
        return original(self, *args, **kwargs)

    monkeypatch.setattr(ChannelRMSNorm, "fused", fused)
    return calls


@pytest.mark.parametrize("name", PRESETS)
def test_fused_decode_and_encode_match_plain_path(name, monkeypatch):
    # End to end in fp64: a random decoder can be ill-conditioned (a ReLU linear attention
    # query whose positive part is nearly zero divides by nearly zero: on 2026-11-28 a 1e-5
    # input change moved the SANA preset's fp32 decode by 0.57), so fp32 rounding differences
    # between two equivalent paths say nothing there; in fp64 they stay near 1e-15.
    model = _model(name).double()
    f = model.spatial_compression_ratio
    z = torch.randn(2, model.latent_channels, 3, 2, dtype=torch.float64)
    x = torch.randn(1, model.config.in_channels, 2 * f, 2 * f, dtype=torch.float64)
    with torch.no_grad():
        with fused_inference(False):
            plain_dec, plain_enc = model.decode(z), model.encode(x)
        calls = _spy_fused_ops(monkeypatch)
        with fused_inference(True):
            fused_dec, fused_enc = model.decode(z), model.encode(x)
    assert fused_dec.dtype == torch.float64
    assert_close_scaled(fused_dec, plain_dec, rel=1e-10)
    assert_close_scaled(fused_enc, plain_enc, rel=1e-10)
    # The fused path was really taken: every preset has up blocks with shortcuts, down blocks
    # with shortcuts, and the decoder head's norm + activation.
    assert calls.get("up_block_shortcut", 0) > 0, calls
    assert calls.get("down_block_shortcut", 0) > 0, calls
    assert calls.get("channel_rms_norm_fused", 0) > 0, calls
    if "EfficientViTBlock" in model.config.decoder_block_types:
        assert calls.get("glu_depthwise_conv", 0) > 0, calls


@pytest.mark.parametrize("name", PRESETS)
def test_fused_decoder_layers_match_plain_layers_in_fp32(name):
    """fp32, the dtype the kernels run in: each decoder layer, fused and plain, from the same
    input (the layer-by-layer form of the check above, immune to the conditioning of the whole
    decoder). Everything but one rewrite is bit-identical here: interpolate-mode up blocks
    (SANA) run as the equivalent sub-pixel conv, whose fp32 sums round differently (exact in
    fp64: test_nearest_up_conv_as_subpixel_is_exact)."""
    model = _model(name)
    decoder = model.decoder
    layers = [layer for stage in reversed(decoder.stages) for layer in stage]
    with torch.no_grad():
        h = decoder._stem(torch.randn(2, model.latent_channels, 3, 2))
        for layer in layers:
            with fused_inference(False):
                plain, _ = coders_mod.run_layer(layer, h.clone(), True)
            with fused_inference(True):
                fused, _ = coders_mod.run_layer(layer, h.clone(), True)
            assert_close_scaled(fused, plain, rel=1e-5)
            h = plain
        with fused_inference(False):
            plain = decoder.head(decoder._head_in(h.clone()))
        with fused_inference(True):
            fused = decoder.head(decoder._head_in(h.clone()))
        assert_close_scaled(fused, plain, rel=1e-5)


@pytest.mark.parametrize("bias", [True, False])
def test_nearest_up_conv_as_subpixel_is_exact(bias, rng):
    x = torch.randn(2, 6, 5, 7, generator=rng, dtype=torch.float64)
    w = torch.randn(4, 6, 3, 3, generator=rng, dtype=torch.float64)
    b = torch.randn(4, generator=rng, dtype=torch.float64) if bias else None
    want = F.conv2d(F.interpolate(x, scale_factor=2, mode="nearest"), w, b, padding=1)
    sub_w, sub_b = nearest_up_conv_as_subpixel(w, b)
    assert sub_w.shape == (16, 6, 3, 3) and sub_w.dtype == w.dtype
    got = F.pixel_shuffle(F.conv2d(x, sub_w, sub_b, padding=1), 2)
    torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-12)


def test_fused_path_after_batchnorm_folding():
    # Folded BatchNorm leaves an Identity norm: the fused path adds the residual in place.
    model = _model("dc-ae-f32c32-in-1.0").fold_batchnorm()
    z = torch.randn(1, model.latent_channels, 2, 3)
    with torch.no_grad():
        with fused_inference(False):
            plain = model.decode(z)
        with fused_inference(True):
            fused = model.decode(z)
    assert_close_scaled(fused, plain, rel=1e-5)


def test_fused_path_keeps_gradients():
    # Forced on while autograd records, the fused path must not modify anything in place and
    # its gradients must equal the plain path's.
    model = _model("dc-ae-f64c128-in-1.0")
    z = torch.randn(1, model.latent_channels, 2, 2)
    grads = []
    for enabled in (False, True):
        model.zero_grad()
        with fused_inference(enabled):
            model.decode(z).square().mean().backward()
        grads.append([p.grad.clone() for p in model.parameters() if p.grad is not None])
    assert len(grads[0]) == len(grads[1]) > 0
    for a, b in zip(*grads):
        assert_close_scaled(b, a, rel=1e-4)


def test_fused_path_trains_a_bias_whose_weight_is_frozen():
    # The interpolating up block's sub-pixel conv was rebuilt without gradients whenever its
    # weight was frozen: a trainable bias got none (a partial fine-tune, e.g. biases only).
    from dcgen.autoencoders.blocks import UpBlock

    torch.manual_seed(0)
    block = UpBlock(8, 4, "interpolate", shortcut=True).double()
    block.conv.weight.requires_grad_(False)
    x = torch.randn(1, 8, 5, 5, dtype=torch.float64)
    grads = []
    for enabled in (False, True):
        block.conv.bias.grad = None
        with fused_inference(enabled):
            block(x).square().sum().backward()
        grads.append(block.conv.bias.grad)
    assert grads[1] is not None
    torch.testing.assert_close(grads[1], grads[0])


def test_automatic_rule_keeps_training_and_cpu_on_plain_path():
    x = torch.randn(1, 4, 2, 2)
    assert not use_fused(x, "channel_rms_norm_fused")  # CPU
    with torch.no_grad():
        assert not use_fused(x, "channel_rms_norm_fused")  # CPU, even without grad
    with fused_inference(True):
        assert use_fused(x, "anything")


def test_forced_setting_holds_in_its_own_thread_only():
    # fused_inference is a context variable: while one thread forces the fused path, a decode
    # in another thread that forced it off stays off, and neither undoes the other's setting.
    import threading

    x = torch.ones(2)
    other_in, main_in, other_checked = threading.Event(), threading.Event(), threading.Event()
    seen: dict[str, bool] = {}

    def other() -> None:
        with fused_inference(False):
            other_in.set()
            main_in.wait(5)
            seen["other"] = use_fused(x, "anything")  # main is inside fused_inference(True)
            other_checked.set()

    t = threading.Thread(target=other)
    t.start()
    other_in.wait(5)
    with fused_inference(True):
        main_in.set()
        other_checked.wait(5)
        seen["main"] = use_fused(x, "anything")
    t.join(5)
    assert seen == {"main": True, "other": False}
    assert not use_fused(x, "anything")  # automatic again: CPU


@pytest.mark.cuda
def test_cuda_automatic_rule_takes_kernels_in_inference_only():
    if not has_kernel("up_block_shortcut", "cuda"):
        pytest.skip("dcgen._C has no CUDA kernels for the fused DC-AE path")
    xc = torch.randn(1, 4, 2, 2, device="cuda")
    assert not use_fused(xc, "up_block_shortcut")  # grad mode on: training path
    with torch.inference_mode():
        assert use_fused(xc, "up_block_shortcut")
        with torch.autocast("cuda", dtype=torch.bfloat16):
            assert not use_fused(xc, "up_block_shortcut")  # autocast: plain path


def test_decoder_head_act_without_fused_name_stays_plain(monkeypatch):
    # GELU has no fused-norm code: the head keeps norm -> act as modules.
    cfg = small_config("dc-ae-f32c32-sana-1.1").replace(decoder_conv_act_fn="gelu")
    model = perturb_norms(DCAE(cfg)).eval()
    z = torch.randn(1, cfg.latent_channels, 2, 2)
    with torch.no_grad():
        with fused_inference(False):
            plain = model.decode(z)
        with fused_inference(True):
            fused = model.decode(z)
    assert_close_scaled(fused, plain, rel=1e-5)
    assert coders_mod.fusable_act_name(model.decoder.head_act) is None


def test_well_conditioned_latent_avoids_ill_conditioned_points():
    """The helper the fp32 CUDA comparisons draw their latents from: a draw known to be
    ill-conditioned (the one this file's fp32 end-to-end check failed on, 2026-11-28) shows what
    it guards against; the latent it returns is well-conditioned."""
    torch.manual_seed(0)
    # head dim 2 (reduced_config's own), where the failure was; the tests now use TEST_HEAD_DIM
    model = _model("dc-ae-f32c32-sana-1.1", attention_head_dim=2)
    bad = torch.randn(2, model.latent_channels, 3, 2)  # the draw of 2026-11-28's failure
    with torch.no_grad(), fused_inference(False):
        a = model.decode(bad)
        b = model.decode(bad + 1e-5 * torch.randn(bad.shape))
    assert (a - b).abs().max() > 0.01  # 1e-5 in, > 1e-2 out: ill-conditioned
    z = well_conditioned_latent(model, (2, model.latent_channels, 3, 2))
    with torch.no_grad(), fused_inference(False):
        a = model.decode(z)
        b = model.decode(z + 1e-5 * torch.randn(z.shape))
    assert (a - b).abs().max() < 1e-3


@pytest.mark.cuda
@pytest.mark.parametrize("name", ["dc-ae-f64c128-in-1.0", "dc-ae-f32c32-sana-1.1"])
def test_cuda_kernels_decode_matches_plain_path(name, monkeypatch):
    if not has_kernel("up_block_shortcut", "cuda"):
        pytest.skip("dcgen._C has no CUDA kernels for the fused DC-AE path")
    # TF32 convs would round both paths to ~1e-3; compare the fp32 math itself.
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    model = _model(name).cuda()
    z = well_conditioned_latent(model, (1, model.latent_channels, 4, 4), "cuda")
    with torch.inference_mode():
        with fused_inference(False):
            plain = model.decode(z)
        calls = _spy_fused_ops(monkeypatch)
        fused = model.decode(z)  # automatic rule: kernels
        assert calls.get("up_block_shortcut", 0) > 0, calls  # the fused path really ran
        assert_close_scaled(fused, plain, rel=1e-4)
        model.to(torch.bfloat16)
        zb = z.bfloat16()
        with fused_inference(False):
            plain_bf16 = model.decode(zb).float()
        fused_bf16 = model.decode(zb).float()
    # bf16 rounds differently on the two paths (the fused ops round once); the fused path must
    # be about as close to the fp32 result as the plain bf16 path is.
    ref = plain.float()
    err_fused = (fused_bf16 - ref).pow(2).mean().sqrt().item()
    err_plain = (plain_bf16 - ref).pow(2).mean().sqrt().item()
    assert err_fused <= 1.5 * err_plain + 1e-3 * ref.abs().max().item(), (err_fused, err_plain)


def _batchnorm_calls(monkeypatch) -> list[int]:
    """Counts BatchNorm2d calls by patching the class (a forward hook would put the hooked
    blocks on the plain path, where every hook sees its module's call)."""
    calls = [0]
    forward = torch.nn.BatchNorm2d.forward

    def counted(self, x):  # noqa: ANN001, ANN202
        calls[0] += 1
        return forward(self, x)

    monkeypatch.setattr(torch.nn.BatchNorm2d, "forward", counted)
    return calls


def test_fused_path_folds_batchnorm_on_the_fly(monkeypatch):
    # in-1.0 ResBlocks end in BatchNorm: the fused path folds it into conv2 (cached) instead
    # of running a norm pass, and the module keeps its BatchNorm and checkpoint format.
    model = _model("dc-ae-f32c32-in-1.0")
    calls = _batchnorm_calls(monkeypatch)
    z = torch.randn(1, model.latent_channels, 2, 3)
    with torch.no_grad():
        with fused_inference(False):
            plain = model.decode(z)
        assert calls[0] > 0
        calls[0] = 0
        with fused_inference(True):
            fused = model.decode(z)
    assert calls[0] == 0
    assert_close_scaled(fused, plain, rel=1e-5)
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())


def test_on_the_fly_fold_follows_running_statistics():
    # A changed running mean (or any folded tensor) must rebuild the cached fold.
    model = _model("dc-ae-f32c32-in-1.0")
    z = torch.randn(1, model.latent_channels, 2, 3)
    with torch.no_grad(), fused_inference(True):
        before = model.decode(z)
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.add_(0.5)
        after = model.decode(z)
        with fused_inference(False):
            plain = model.decode(z)
    assert (after - before).abs().max() > 1e-3
    assert_close_scaled(after, plain, rel=1e-5)


def test_batchnorm_in_training_mode_is_not_folded(monkeypatch):
    # Training-mode BatchNorm normalises with batch statistics; folding would be wrong.
    model = _model("dc-ae-f32c32-in-1.0").train()
    calls = _batchnorm_calls(monkeypatch)
    z = torch.randn(2, model.latent_channels, 2, 3)
    with torch.no_grad(), fused_inference(True):
        model.decode(z)
    assert calls[0] > 0


@pytest.mark.parametrize("name", ["dc-ae-f32c32-in-1.0", "dc-ae-f32c32-sana-1.1"])
def test_fused_path_with_inference_mode_tensors(name):
    # Weights and buffers made under inference_mode have no version counter: the fused path's
    # derived weights (BatchNorm fold, sub-pixel conv) are then computed per call, not cached,
    # instead of raising. The model built, then cast, inside inference_mode (buffers replaced).
    with torch.inference_mode():
        model = _model(name).double().float()
        z = torch.randn(1, model.latent_channels, 2, 3)
        assert any(b.is_inference() for b in model.buffers()) or "sana" in name
        with fused_inference(False):
            plain = model.decode(z)
        with fused_inference(True):
            fused = model.decode(z)
            again = model.decode(z)
    assert_close_scaled(fused, plain, rel=1e-4 if "sana" in name else 1e-5)
    assert torch.equal(fused, again)


def test_fused_path_steps_aside_under_autocast():
    # An fp32 model under autocast: 16-bit conv outputs meet fp32 residuals, which the fused ops
    # do not take; the plain path promotes. So autocast runs the plain path.
    model = _model("dc-ae-f32c32-in-1.0")
    z = torch.randn(1, model.latent_channels, 2, 3)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        with fused_inference(False):
            plain = model.decode(z)
        with fused_inference(True):
            fused = model.decode(z)
    assert torch.equal(fused, plain)


@pytest.mark.parametrize("name", ["dc-ae-f32c32-in-1.0", "dc-ae-f32c32-sana-1.1"])
def test_clear_caches_after_writes_through_data(name):
    # Writes through .data bypass the version counter the caches key on; clear_caches() (and
    # .to(), load_state_dict) drop the derived weights so the next decode uses the new ones.
    model = _model(name)
    z = torch.randn(1, model.latent_channels, 2, 3)
    with torch.no_grad(), fused_inference(True):
        before = model.decode(z)
        for m in model.modules():
            if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (3, 3):
                m.weight.data.mul_(1.5)
        model.clear_caches()
        after = model.decode(z)
        with fused_inference(False):
            plain = model.decode(z)
        assert (after - before).abs().max() > 1e-3
        assert_close_scaled(after, plain, rel=1e-4 if "sana" in name else 1e-5)
        model.decode(z)  # caches filled again
        model.to(torch.float64)
        cached = [m for m in model.modules() if getattr(m, "_folded", None) is not None]
        cached += [m for m in model.modules() if getattr(m, "_subpixel", None) is not None]
        assert not cached  # .to() dropped them (and their old-dtype memory)
        model.load_state_dict(model.state_dict())


def test_building_the_fold_draws_nothing_from_the_global_rng():
    model = _model("dc-ae-f32c32-in-1.0")
    z = torch.randn(1, model.latent_channels, 2, 3)
    with torch.no_grad(), fused_inference(True):
        torch.manual_seed(0)
        model.decode(z)  # cold caches: every ResBlock folds its BatchNorm
        drawn = torch.rand(3)
    torch.manual_seed(0)
    assert torch.equal(drawn, torch.rand(3))


@pytest.mark.parametrize("bad", ["false", "0", 0, 1])
def test_fused_inference_takes_only_a_bool_or_none(bad):
    # "false" is a truthy string: it forced the fused path on
    with pytest.raises(TypeError, match=r"expected True, False or None, got"):
        with fused_inference(bad):
            pass
    assert use_fused(torch.zeros(1), "channel_rms_norm") is False  # nothing was left forced
