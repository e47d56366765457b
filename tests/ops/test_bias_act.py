"""dcgen.ops.bias_act_: a convolution's bias, activation and residual in one pass (module doc
of dcgen/ops/bias_act.py), and the DC-AE ResBlocks that hand it their biases."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from dcgen.autoencoders import DCAE
from dcgen.autoencoders.fused import fused_inference
from dcgen.ops import bias_act_, bias_act_reference, has_kernel
from dcgen.ops._extension import compiled_op
from tests.conftest import poison_cuda_allocator, registered_cpu_kernel

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "autoencoders"))
from dcae_helpers import perturb_norms, small_config  # noqa: E402

ACTS = ["none", "relu", "silu"]


def _spec(x, bias, act, residual):  # noqa: ANN001, ANN202
    # float64 math: the reference's fp32 result rounded once is within an ulp of this
    v = x.double() + bias.double().view(1, -1, 1, 1)
    v = {"none": v, "relu": F.relu(v), "silu": F.silu(v)}[act]
    return v if residual is None else v + residual.double()


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("with_residual", [False, True])
def test_reference_is_the_fp32_formula_rounded_once(act, with_residual, rng):
    x = torch.randn(2, 6, 5, 7, generator=rng).bfloat16()
    bias = torch.randn(6, generator=rng).bfloat16()
    res = torch.randn(2, 6, 5, 7, generator=rng).bfloat16() if with_residual else None
    got = bias_act_reference(x, bias, act, res)
    assert got.dtype == torch.bfloat16 and got.shape == x.shape
    torch.testing.assert_close(got.double(), _spec(x, bias, act, res), rtol=2**-8, atol=1e-6)
    # one rounding: the fp32 result rounded to bf16, not a bf16 sum rounded twice
    v = x.float() + bias.float().view(1, -1, 1, 1)
    v = {"none": v, "relu": F.relu(v), "silu": F.silu(v)}[act]
    assert torch.equal(got, (v if res is None else v + res.float()).bfloat16())


def test_out_may_be_x_or_the_residual(rng):
    x = torch.randn(1, 4, 3, 5, generator=rng)
    bias, res = torch.randn(4, generator=rng), torch.randn(1, 4, 3, 5, generator=rng)
    want = bias_act_reference(x, bias, "silu", res)
    a, r = x.clone(), res.clone()
    assert bias_act_(a, a, bias, "silu", res) is a and torch.equal(a, want)
    assert bias_act_(r, x, bias, "silu", r) is r and torch.equal(r, want)


def test_bad_inputs_name_what_came():
    x, b = torch.randn(1, 4, 3, 5), torch.randn(4)
    with pytest.raises(ValueError, match=r"expected act in \('none', 'relu', 'silu'\), got 'gelu'"):
        bias_act_(x, x, b, "gelu")
    with pytest.raises(ValueError, match=r"expected a bias of x's 4 channels, got \(3,\)"):
        bias_act_(x, x, torch.randn(3), "none")
    with pytest.raises(
        TypeError, match="expected bias of x's dtype torch.float32, got torch.bfloat16"
    ):
        bias_act_(x, x, b.bfloat16(), "none")
    with pytest.raises(
        ValueError, match=r"expected residual of x's shape \(1, 4, 3, 5\), got \(1, 4, 3, 4\)"
    ):
        bias_act_(x, x, b, "none", torch.randn(1, 4, 3, 4))
    with pytest.raises(ValueError, match="bias_act_: x"):
        bias_act_(x[0], x[0], b, "none")


@pytest.fixture
def cpu_kernel(monkeypatch):
    """A CPU kernel for dcgen::bias_act_ that runs the reference (the CUDA kernel is tested
    against the same reference below), visible to has_kernel; yields the act of each call."""
    calls: list[str] = []

    def kernel(out, x, bias, act, residual):  # noqa: ANN001, ANN202
        calls.append(act)
        out.copy_(bias_act_reference(x, bias, act, residual))

    monkeypatch.setattr("dcgen.ops.bias_act.kernel_takes", lambda *a: True)
    with registered_cpu_kernel(monkeypatch, "bias_act_", kernel):
        yield calls


@pytest.mark.parametrize("preset", ["dc-ae-f64c128-in-1.0", "dc-ae-f32c32-sana-1.1"])
@pytest.mark.parametrize("bands", [False, True])
def test_resblocks_hand_their_biases_to_bias_act(cpu_kernel, preset, bands):
    # The fused decode with the bias_act_ kernel available equals the plain decode: conv1's
    # bias + activation (every ResBlock), the folded BatchNorm's bias + residual (the in-1.0
    # decoders' high-resolution stages) and the up blocks' conv bias, with and without row
    # bands.
    # Seeded: a random-weight decoder's head RMSNorm can meet a pixel whose channels nearly
    # cancel, and amplify the ~1e-6 rounding differences of the split bias past the tolerance
    # (measured on this project's CPU, 2026-11-27: 1 of 40 seeds for SANA, before and after
    # session 19's changes alike); that is the model's sensitivity, not the fused path's error.
    from dcgen.autoencoders.row_bands import band_size

    torch.manual_seed(0)
    model = perturb_norms(DCAE(small_config(preset))).eval()
    z = torch.randn(1, model.latent_channels, 8, 8)
    with torch.inference_mode():
        with fused_inference(False):
            want = model.decode(z)
        with fused_inference(True), band_size(48 * 3 if bands else 0):
            got = model.decode(z)
    assert cpu_kernel
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_up_blocks_add_their_conv_bias_with_bias_act(cpu_kernel):
    # Every biased conv an up block runs on the fused path goes through bias_act_ ("none"),
    # banded or not; the result equals the plain up block
    from dcgen.autoencoders.blocks import UpBlock
    from dcgen.autoencoders.row_bands import band_size

    acts = cpu_kernel
    torch.manual_seed(0)
    block = UpBlock(8, 8, "pixel_shuffle", shortcut=True).eval()
    x = torch.randn(1, 8, 12, 6)
    with torch.inference_mode():
        with fused_inference(False):
            want = block(x)
        for size in (0, 4 * 8 * 6 * 4 * 3):
            acts.clear()
            with fused_inference(True), band_size(size):
                got = block(x)
            assert len(acts) == (1 if size == 0 else 4) and set(acts) == {"none"}
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- CUDA


def _need_kernel() -> None:
    if not torch.cuda.is_available() or not has_kernel("bias_act_", "cuda"):
        pytest.skip("no CUDA device or bias_act_ kernel")


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("layout", ["channels_last", "nchw"])
@pytest.mark.parametrize("shape", [(2, 64, 9, 13), (1, 12, 5, 7), (1, 3, 4, 4)])
def test_cuda_kernel_matches_reference(dtype, layout, shape):
    # vector paths (C % 8 == 0 channels_last, H W % 8 == 0 NCHW) and scalar ones; a separate,
    # poisoned out, then in place into x and into the residual
    _need_kernel()
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    kernel = compiled_op("bias_act_")
    for act in ACTS:
        x = (torch.randn(shape, device="cuda") * 3).to(dtype).contiguous(memory_format=fmt)
        bias = torch.randn(shape[1], device="cuda").to(dtype)
        res = torch.randn(shape, device="cuda").to(dtype).contiguous(memory_format=fmt)
        for r in (None, res):
            want = bias_act_reference(x, bias, act, r)
            out = torch.full_like(x, float("nan"))
            kernel(out, x, bias, act, r)
            tol = {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {}
            torch.testing.assert_close(out, want, **tol, msg=f"{act} residual={r is not None}")
        a, b = x.clone(), res.clone()
        kernel(a, a, bias, act, None)
        kernel(b, x, bias, act, b)
        torch.testing.assert_close(a, bias_act_reference(x, bias, act, None))
        torch.testing.assert_close(b, bias_act_reference(x, bias, act, res))


@pytest.mark.cuda
def test_cuda_kernel_band_views_and_misaligned_pointers():
    # A row band of a one-image channels_last map (another batch stride) as out and residual,
    # and a storage offset that breaks 16-byte alignment (the scalar path)
    _need_kernel()
    poison_cuda_allocator()
    full = (
        torch.randn(1, 16, 12, 10, device="cuda")
        .bfloat16()
        .contiguous(memory_format=torch.channels_last)
    )
    band = full[:, :, 3:7]
    t = (
        torch.randn(1, 16, 4, 10, device="cuda")
        .bfloat16()
        .contiguous(memory_format=torch.channels_last)
    )
    bias = torch.randn(16, device="cuda").bfloat16()
    want = bias_act_reference(t, bias, "none", band.clone())
    before = full.clone()
    bias_act_(band, t, bias, "none", band)
    assert torch.equal(full[:, :, 3:7], want)
    assert torch.equal(full[:, :, :3], before[:, :, :3]) and torch.equal(
        full[:, :, 7:], before[:, :, 7:]
    )
    storage = torch.randn(1 + 2 * 8 * 4 * 4, device="cuda").bfloat16()
    x = storage[1:].view(2, 8, 4, 4)
    out = torch.full_like(x, float("nan"))
    compiled_op("bias_act_")(out, x, bias[:8].contiguous(), "silu", None)
    torch.testing.assert_close(out, bias_act_reference(x, bias[:8].contiguous(), "silu"))


@pytest.mark.cuda
@pytest.mark.parametrize("layout", ["channels_last", "nchw"])
def test_cuda_kernel_keeps_nan_through_every_act(layout):
    # NaN (and +-inf) inputs come out as the reference gives them: relu keeps NaN, as
    # torch.relu does (the kernel's own relu once turned NaN into 0), on the vector path
    # (C = 8) and the scalar one (C = 3)
    _need_kernel()
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    kernel = compiled_op("bias_act_")
    for c in (8, 3):
        x = torch.randn(1, c, 4, 4, device="cuda").bfloat16()
        x[0, :, 0, 0] = float("nan")
        x[0, :, 1, 1] = float("inf")
        x[0, :, 2, 2] = float("-inf")
        x = x.contiguous(memory_format=fmt)
        bias = torch.randn(c, device="cuda").bfloat16()
        for act in ACTS:
            out = torch.empty_like(x)
            kernel(out, x, bias, act, None)
            want = bias_act_reference(x, bias, act)
            torch.testing.assert_close(out, want, equal_nan=True, msg=f"{act} C={c}")
            assert out[0, :, 0, 0].isnan().all(), f"{act} C={c}: NaN lost"


# ------------------------------------------- cuDNN's fused conv + bias + ReLU for conv1


def test_relu_resblocks_opt_into_cudnn_fused_conv(cpu_kernel, monkeypatch):
    # A ReLU ResBlock's conv1 + bias + ReLU is one torch.cudnn_convolution_relu call (CUDA
    # only; stood in for here by the same math on the CPU, with the gate's device check
    # bypassed): called with conv1's own parameters, for the ReLU blocks only (SiLU ones keep
    # bias_act_), and the decode equals the plain one. A CPU input never qualifies.
    import dcgen.autoencoders.blocks as blocks

    calls = []

    def fused_conv(x, w, b, stride, padding, dilation, groups):  # noqa: ANN001, ANN202
        calls.append((w.shape, tuple(stride), tuple(padding), tuple(dilation), groups))
        return F.relu(F.conv2d(x, w, b, stride, padding, dilation, groups))

    real_gate = blocks._cudnn_conv_relu
    monkeypatch.setattr(torch, "cudnn_convolution_relu", fused_conv, raising=False)
    torch.manual_seed(0)
    model = perturb_norms(DCAE(small_config("dc-ae-f64c128-in-1.0"))).eval()
    z = torch.randn(1, model.latent_channels, 8, 8)
    with torch.inference_mode():
        with fused_inference(False):
            want = model.decode(z)
        # the real gate, by default and opted in: a CPU input never qualifies
        x = torch.randn(1, 4, 3, 3)
        conv = torch.nn.Conv2d(4, 4, 3, padding=1)
        monkeypatch.delenv(blocks.CUDNN_CONV_RELU_ENV, raising=False)
        assert not real_gate(x, conv)
        monkeypatch.setenv(blocks.CUDNN_CONV_RELU_ENV, "1")
        assert not real_gate(x, conv)
        with fused_inference(True):
            model.decode(z)
        assert not calls
        monkeypatch.setattr(blocks, "_cudnn_conv_relu", lambda x, conv: True)
        cpu_kernel.clear()
        with fused_inference(True):
            got = model.decode(z)
    relu_blocks = [
        m for m in model.decoder.modules()
        if isinstance(m, blocks.ResBlock) and isinstance(m.act, torch.nn.ReLU)
    ]  # fmt: skip
    assert relu_blocks and len(calls) == len(relu_blocks)
    assert all(c[1:] == ((1, 1), (1, 1), (1, 1), 1) for c in calls)
    assert "relu" not in cpu_kernel  # the ReLU conv1s no longer take bias_act_'s relu
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_cudnn_fused_conv_relu_is_nan_safe_and_matches(dtype, monkeypatch):
    # What DCGEN_DCAE_CUDNN_CONV_RELU's default rests on (held on the H200, 2026-11-28):
    # torch.cudnn_convolution_relu hands
    # cuDNN its own fresh output as the z input scaled by 0. With every free block of the
    # allocator NaN-poisoned, a cuDNN that reads z anyway returns NaN here. Then: the fused
    # conv1 equals conv + bias_act_ within one rounding of the 16-bit output (the two-kernel
    # form rounds the convolution before the bias).
    import dcgen.autoencoders.blocks as blocks

    if not torch.cuda.is_available() or not hasattr(torch, "cudnn_convolution_relu"):
        pytest.skip("no CUDA device or no torch.cudnn_convolution_relu")
    torch.manual_seed(0)
    block = blocks.ResBlock(64, "batch_norm", "relu").cuda().to(dtype).eval()
    block = block.to(memory_format=torch.channels_last)
    x = torch.randn(2, 64, 33, 40, device="cuda").to(dtype)
    x = x.contiguous(memory_format=torch.channels_last)
    monkeypatch.setenv(blocks.CUDNN_CONV_RELU_ENV, "0")  # the opt-out
    assert not blocks._cudnn_conv_relu(x, block.conv1)
    monkeypatch.delenv(blocks.CUDNN_CONV_RELU_ENV)  # the default
    assert blocks._cudnn_conv_relu(x, block.conv1)
    for _ in range(3):  # fresh outputs from poisoned blocks each time
        poison_cuda_allocator()
        with torch.inference_mode():
            got = block._conv1_act(x)
        assert got is not None and not got.isnan().any(), "cuDNN read the NaN z buffer"
    with torch.inference_mode():
        h = F.conv2d(x, block.conv1.weight, None, padding=1)
        want = bias_act_reference(h, block.conv1.bias, "relu")
    assert got.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(got, want, rtol=2**-7, atol=2e-2)
