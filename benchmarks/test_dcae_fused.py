"""The fused DC-AE block ops vs the PyTorch module path they replace, at 4K decoder shapes.

Baselines are exactly what the blocks run without the fused path (pixel_shuffle + shortcut
reference + add; depthwise conv + chunk + SiLU gate; norm then add / activation). GPU: bf16 at
the shapes of the f64c128 / SANA f32c32 decoders decoding 4096^2; CPU: tiny fp32 smoke shapes.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from _harness import DEVICE, ON_GPU, measure_peak_memory, record_rel_err, rounds, time_it

from dcgen.ops import (
    bias_act_,
    channel_duplicate_to_space,
    channel_rms_norm,
    channel_rms_norm_fused,
    down_block_shortcut,
    glu_depthwise_conv,
    has_kernel,
    space_to_channel_average,
    up_block_shortcut,
)

DTYPE = torch.bfloat16 if ON_GPU else torch.float32


def _rand(*shape: int) -> torch.Tensor:
    return torch.randn(shape, device=DEVICE).to(DTYPE)


# The decoders run channels_last on CUDA (DCAE's "auto" memory format); NCHW is what a plain
# module gets. The block ops take both; their first H100 rows were NCHW only.
LAYOUTS = ["channels_last", "nchw"]


def _in_layout(layout: str, *ts: torch.Tensor) -> tuple[torch.Tensor, ...]:
    if layout == "nchw":
        return ts
    return tuple(t.contiguous(memory_format=torch.channels_last) for t in ts)


def _skip_without(op: str, impl: str) -> None:
    if impl == "dcgen" and not has_kernel(op, DEVICE):
        pytest.skip(f"no compiled {op} kernel for this device")


def _run(benchmark, impl, group, baseline_name, fns, nbytes, n_rounds=None, restore=()):  # noqa: ANN001
    """Time dcgen's function or the baseline's (``fns`` = (ours, base)); dcgen's row also
    records its output error against the baseline (``restore``: the tensors they change)."""
    ours, base = fns
    fn = ours if impl == "dcgen" else base
    benchmark.group = f"{group} {str(DTYPE).removeprefix('torch.')}"
    benchmark.extra_info.update(impl=impl, baseline_name=baseline_name, bytes_floor=nbytes)
    with torch.inference_mode():
        benchmark.extra_info.update(measure_peak_memory(fn))
        time_it(benchmark, fn, n_rounds=n_rounds or rounds(20, 3))
    if benchmark.stats:
        benchmark.extra_info["gbps"] = nbytes / benchmark.stats.stats.median / 1e9
    if impl == "dcgen":
        record_rel_err(benchmark, ours, base, restore)


# f64c128 @ 4096^2: the stage-2 -> stage-1 up block, 512 ch @ 1024^2 -> 256 ch @ 2048^2.
UP_SHAPE = (512, 256, 1024) if ON_GPU else (32, 16, 32)  # (Cin, Cout, H)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("impl", ["baseline", "dcgen"])
def test_up_block_pixel_shuffle(benchmark, impl, layout):
    _skip_without("up_block_shortcut", impl)
    cin, cout, h = UP_SHAPE
    x, y = _rand(1, cin, h, h), _rand(1, 4 * cout, h, h)
    x, y = _in_layout(layout, x, y)

    def ours():
        return up_block_shortcut(y, x, True)

    def base():
        return F.pixel_shuffle(y, 2) + channel_duplicate_to_space(x, cout, 2)

    nbytes = (x.numel() + 2 * y.numel()) * x.element_size()  # read x, y; write out (= y)
    _run(
        benchmark, impl, f"up_block pixel_shuffle x{tuple(x.shape)} {layout}", "pixel_shuffle + shortcut",
        (ours, base), nbytes,
    )  # fmt: skip


@pytest.mark.parametrize("impl", ["baseline", "dcgen"])
def test_up_block_band_into_output(benchmark, impl):
    # A banded up block's work after its convolution (row_bands.py), on the shape above: the
    # conv bias by bias_act_, the shortcut op into a fresh band, then the band copied into the
    # full output map (what the fused decode did up to session 19), against one
    # up_block_shortcut_out pass that adds the bias and writes the output's rows itself.
    _skip_without("up_block_shortcut_out", impl)
    _skip_without("bias_act_", "dcgen")  # the baseline's bias pass is the bias_act_ kernel
    cin, cout, h = UP_SHAPE
    x, y = _in_layout("channels_last", _rand(1, cin, h, h), _rand(1, 4 * cout, h, h))
    b = _rand(4 * cout)
    (full,) = _in_layout("channels_last", _rand(1, cout, 4 * h, 2 * h))  # two bands tall
    rows = full[:, :, : 2 * h]

    def ours():
        return up_block_shortcut(y, x, True, bias=b, out=rows)

    def base():
        bias_act_(y, y, b, "none")
        return rows.copy_(up_block_shortcut(y, x, True))

    nbytes = (x.numel() + 2 * y.numel()) * x.element_size()  # read x, y; write the rows
    _run(
        benchmark, impl, f"up_block band + conv bias into out x{tuple(x.shape)} channels_last",
        "bias_act_, shortcut op, copy_ into out", (ours, base), nbytes, restore=(y, full),
    )  # fmt: skip


# SANA f32c32 @ 4096^2: the stage-1 -> stage-0 up block (interpolate mode), 256 ch @ 2048^2
# -> 128 ch @ 4096^2; the main path's conv output is already at full size.
UP_INTERP_SHAPE = (256, 128, 2048) if ON_GPU else (32, 16, 32)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("impl", ["baseline", "dcgen"])
def test_up_block_interpolate(benchmark, impl, layout):
    _skip_without("up_block_shortcut", impl)
    cin, cout, h = UP_INTERP_SHAPE
    x, y = _rand(1, cin, h, h), _rand(1, cout, 2 * h, 2 * h)
    x, y = _in_layout(layout, x, y)

    def ours():
        return up_block_shortcut(y, x, False)

    def base():
        return y + channel_duplicate_to_space(x, cout, 2)

    nbytes = (x.numel() + 2 * y.numel()) * x.element_size()
    _run(
        benchmark, impl, f"up_block interpolate x{tuple(x.shape)} {layout}", "y + shortcut", (ours, base), nbytes,
        n_rounds=rounds(10, 3),
    )  # fmt: skip


# The f64c128 encoder's stage-1 -> stage-2 down block at 4096^2 input: 256 ch @ 2048^2 ->
# 512 ch @ 1024^2 (conv output 128 ch @ 2048^2).
DOWN_SHAPE = (256, 512, 2048) if ON_GPU else (16, 32, 64)  # (Cin, Cout, H)


@pytest.mark.parametrize("impl", ["baseline", "dcgen"])
def test_down_block_pixel_unshuffle(benchmark, impl):
    _skip_without("down_block_shortcut", impl)
    cin, cout, h = DOWN_SHAPE
    x, y = _rand(1, cin, h, h), _rand(1, cout // 4, h, h)

    def ours():
        return down_block_shortcut(y, x, True)

    def base():
        return F.pixel_unshuffle(y, 2) + space_to_channel_average(x, cout, 2)

    nbytes = (x.numel() + 2 * y.numel()) * x.element_size()
    _run(
        benchmark, impl, f"down_block pixel_unshuffle x{tuple(x.shape)}",
        "pixel_unshuffle + shortcut", (ours, base), nbytes,
    )  # fmt: skip


# GLUMBConv of a 512-channel EfficientViT stage at 512^2 (f64c128 / SANA stage 3 at 4096^2):
# the depthwise conv sees 2 * 4 * 512 = 4096 channels.
GLU_SHAPE = (1, 4096, 512, 512) if ON_GPU else (1, 64, 32, 32)


# channels_last is what the decoders run on CUDA (DCAE's "auto" memory format) and what the
# 4-channel strip kernel serves; NCHW takes the per-element kernel.
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("impl", ["baseline", "dcgen"])
def test_glumbconv_depthwise_gate(benchmark, impl, layout):
    _skip_without("glu_depthwise_conv", impl)
    c2 = GLU_SHAPE[1]
    t = _rand(*GLU_SHAPE)
    conv = torch.nn.Conv2d(c2, c2, 3, padding=1, groups=c2).to(DEVICE, DTYPE)
    (t,) = _in_layout(layout, t)
    if layout == "channels_last":
        conv = conv.to(memory_format=torch.channels_last)

    def ours():
        return glu_depthwise_conv(t, conv.weight, conv.bias)

    def base():
        y, gate = conv(t).chunk(2, dim=1)
        return y * F.silu(gate)

    nbytes = t.numel() * t.element_size() * 3 // 2  # read t, write half
    group = f"glumbconv dw3x3+gate {GLU_SHAPE} {layout}"
    _run(benchmark, impl, group, "cuDNN depthwise + gate", (ours, base), nbytes)


@pytest.mark.parametrize("impl", ["baseline", "dcgen"])
def test_glumbconv_expand_bias_silu(benchmark, impl):
    # GLUMBConv's fused middle from the expand conv's bias-less output: the expand bias and
    # SiLU by a bias_act_ pass, then the depthwise + gate kernel (the fused decode's form: the
    # H200 measured 4.56 ms, 2026-11-28), against the depthwise + gate kernel applying them as
    # it loads (expand_bias=; the decode's form in sessions 19-27: 11.59 ms, 0.39x)
    _skip_without("glu_depthwise_conv", impl)
    _skip_without("glu_depthwise_conv", "dcgen")  # both rows run dcgen's depthwise kernel
    _skip_without("bias_act_", "dcgen")
    c2 = GLU_SHAPE[1]
    (t,) = _in_layout("channels_last", _rand(*GLU_SHAPE))
    w, b, eb = _rand(c2, 1, 3, 3) / 3, _rand(c2), _rand(c2)

    def ours():
        return glu_depthwise_conv(t, w, b, expand_bias=eb)

    def base():
        bias_act_(t, t, eb, "silu")  # in place, as the fused decode ran it
        return glu_depthwise_conv(t, w, b)

    nbytes = t.numel() * t.element_size() * 3 // 2  # read t, write half
    group = f"glumbconv expand bias+silu, dw3x3+gate {GLU_SHAPE} channels_last"
    _run(
        benchmark,
        impl,
        group,
        "bias_act_ silu pass, then the dw+gate kernel",
        (ours, base),
        nbytes,
        restore=(t,),
    )


# SANA f32c32 stage 0 at 4096^2: ResBlock's norm + residual over 128 ch @ 4096^2.
NORM_SHAPE = (1, 128, 4096, 4096) if ON_GPU else (1, 64, 64, 64)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("impl", ["baseline", "dcgen"])
def test_rms_norm_residual(benchmark, impl, layout):
    _skip_without("channel_rms_norm_fused", impl)
    c = NORM_SHAPE[1]
    h, x = _rand(*NORM_SHAPE), _rand(*NORM_SHAPE)
    h, x = _in_layout(layout, h, x)
    w, b = torch.randn(c, device=DEVICE), torch.randn(c, device=DEVICE)

    def ours():
        return channel_rms_norm_fused(h, w, b, 1e-5, "none", x)

    def base():
        return x + channel_rms_norm(h, w, b, 1e-5)

    nbytes = 3 * h.numel() * h.element_size()  # read h, x; write out
    _run(
        benchmark, impl, f"rms_norm + residual {NORM_SHAPE} {layout}", "dcgen norm then add", (ours, base), nbytes,
        n_rounds=rounds(10, 3),
    )  # fmt: skip


@pytest.mark.parametrize("impl", ["baseline", "dcgen"])
def test_rms_norm_residual_into_x(benchmark, impl):
    # The banded RMSNorm ResBlock ending (SANA's decoder): norm(conv2 band) + x written into
    # x's band. Before: the fused op into a new band, then a copy into x; now the out form.
    _skip_without("channel_rms_norm_fused_out", impl)
    c = NORM_SHAPE[1]
    h, x = _in_layout("channels_last", _rand(*NORM_SHAPE), _rand(*NORM_SHAPE))
    w, b = torch.randn(c, device=DEVICE), torch.randn(c, device=DEVICE)

    def ours():
        return channel_rms_norm_fused(h, w, b, 1e-5, "none", x, out=x)

    def base():
        return x.copy_(channel_rms_norm_fused(h, w, b, 1e-5, "none", x))

    nbytes = 3 * h.numel() * h.element_size()  # read h, x; write x
    _run(
        benchmark, impl, f"rms_norm + residual into x {NORM_SHAPE} channels_last",
        "fused norm into a new tensor, then copy_", (ours, base), nbytes, n_rounds=rounds(10, 3),
        restore=(x,),
    )  # fmt: skip


# f64c128 @ 4096^2, stage 1: a ResBlock's conv1 output, 256 ch @ 2048^2, channels_last.
CONV_OUT_SHAPE = (1, 256, 2048, 2048) if ON_GPU else (1, 32, 64, 64)


@pytest.mark.parametrize("impl", ["baseline", "dcgen"])
def test_conv_bias_relu(benchmark, impl):
    # What PyTorch runs after a cuDNN convolution (the broadcast bias add_, then the in-place
    # ReLU) against one bias_act_ pass; both in place on the conv output
    _skip_without("bias_act_", impl)
    (h,) = _in_layout("channels_last", _rand(*CONV_OUT_SHAPE))
    b = _rand(CONV_OUT_SHAPE[1])

    def ours():
        return bias_act_(h, h, b, "relu")

    def base():
        return torch.relu_(h.add_(b.view(1, -1, 1, 1)))

    nbytes = 2 * h.numel() * h.element_size()  # read and write h once
    name = "conv bias + relu in place"
    _run(
        benchmark,
        impl,
        f"{name} {CONV_OUT_SHAPE} channels_last",
        "add_ bias then relu_",
        (ours, base),
        nbytes,
        restore=(h,),
    )


# f64c128's ReLU ResBlocks' conv1 at 4K: 5 at (256, 2048^2) and 10 at (512, 1024^2)
CONV_RELU_SHAPES = [CONV_OUT_SHAPE, (1, 512, 1024, 1024) if ON_GPU else (1, 64, 32, 32)]


@pytest.mark.parametrize("shape", CONV_RELU_SHAPES, ids=["stage1", "stage2"])
@pytest.mark.parametrize("impl", ["baseline", "dcgen"])
def test_conv_relu_cudnn_fused(benchmark, impl, shape):
    # A ReLU ResBlock's whole conv1 (3x3, channels_last) as cuDNN's fused conv + bias + ReLU
    # (dcgen's default since 2026-11-28, DCGEN_DCAE_CUDNN_CONV_RELU in
    # dcgen/autoencoders/blocks.py) against the convolution then one bias_act_ pass (the
    # default before; the H200 measured 7.06 against 7.87 ms at (256, 2048^2)). CUDA only.
    if not ON_GPU or not hasattr(torch, "cudnn_convolution_relu"):
        pytest.skip("torch.cudnn_convolution_relu runs on CUDA only")
    _skip_without("bias_act_", "dcgen")
    c = shape[1]
    (x,) = _in_layout("channels_last", _rand(*shape))
    w = _rand(c, c, 3, 3).contiguous(memory_format=torch.channels_last) * 0.05
    b = _rand(c)

    def ours():
        return torch.cudnn_convolution_relu(x, w, b, (1, 1), (1, 1), (1, 1), 1)

    def base():
        h = torch.nn.functional.conv2d(x, w, None, padding=1)
        return bias_act_(h, h, b, "relu")

    nbytes = 2 * x.numel() * x.element_size()  # read x, write the output (the fused floor)
    _run(
        benchmark,
        impl,
        f"conv3x3 + bias + relu {shape} channels_last",
        "cuDNN conv then bias_act_",
        (ours, base),
        nbytes,
    )


@pytest.mark.parametrize("impl", ["baseline", "dcgen"])
def test_conv_bias_residual(benchmark, impl):
    # A ResBlock's ending with its BatchNorm folded into conv2 (the f64c128 decoder's ResBlock
    # stages, 95 of the 4K decode's 110 bias_act_ calls): PyTorch's broadcast bias add_ on the
    # conv output, then the residual add into x, against one bias_act_ pass written into x
    _skip_without("bias_act_", impl)
    t, x = _in_layout("channels_last", _rand(*CONV_OUT_SHAPE), _rand(*CONV_OUT_SHAPE))
    b = _rand(CONV_OUT_SHAPE[1])

    def ours():
        return bias_act_(x, t, b, "none", x)

    def base():
        return x.add_(t.add_(b.view(1, -1, 1, 1)))

    nbytes = 3 * t.numel() * t.element_size()  # read t and x, write x
    _run(
        benchmark,
        impl,
        f"conv bias + residual into x {CONV_OUT_SHAPE} channels_last",
        "add_ bias then add_ into x",
        (ours, base),
        nbytes,
        restore=(x, t),
    )


# The f64c128 decoder head at 4096^2: RMSNorm then ReLU over 256 ch @ 2048^2.
HEAD_SHAPE = (1, 256, 2048, 2048) if ON_GPU else (1, 32, 64, 64)


@pytest.mark.parametrize("impl", ["baseline", "dcgen"])
def test_rms_norm_act(benchmark, impl):
    _skip_without("channel_rms_norm_fused", impl)
    c = HEAD_SHAPE[1]
    h = _rand(*HEAD_SHAPE)
    w, b = torch.randn(c, device=DEVICE), torch.randn(c, device=DEVICE)

    def ours():
        return channel_rms_norm_fused(h, w, b, 1e-5, "relu")

    def base():
        return F.relu(channel_rms_norm(h, w, b, 1e-5))

    nbytes = 2 * h.numel() * h.element_size()
    _run(
        benchmark,
        impl,
        f"rms_norm + relu {HEAD_SHAPE}",
        "dcgen norm then relu",
        (ours, base),
        nbytes,
    )


# The whole decode, dcgen's plain module path vs its fused path (same model, same run).
DECODE_PRESETS = ["dc-ae-f64c128-in-1.0", "dc-ae-f32c32-sana-1.1"]
DECODE_SIZE = 4096 if ON_GPU else 64
_decode_models: dict[str, object] = {}


def _decode_model(preset: str):  # noqa: ANN202
    from dcgen.autoencoders import DCAE
    from dcgen.autoencoders.config import get_preset, reduced_config

    if preset not in _decode_models:  # both kept (about 2 GB in bf16): built once each
        cfg = get_preset(preset) if ON_GPU else reduced_config(preset, width_divisor=16)
        torch.manual_seed(0)
        with torch.device(DEVICE):
            model = DCAE(cfg).to(DTYPE).eval()
        model.fold_batchnorm()
        _decode_models[preset] = model
    return _decode_models[preset]


@pytest.mark.parametrize("impl", ["baseline", "dcgen"])
@pytest.mark.parametrize("preset", DECODE_PRESETS)
def test_decode_plain_vs_fused(benchmark, preset, impl):
    from dcgen.autoencoders.fused import fused_inference

    _skip_without("up_block_shortcut", impl)
    model = _decode_model(preset)
    f = model.spatial_compression_ratio
    z = torch.randn(1, model.latent_channels, DECODE_SIZE // f, DECODE_SIZE // f, device=DEVICE)
    z = z.to(DTYPE)
    # baseline: dcgen's own plain path (still its norm / linear-attention kernels); dcgen: the
    # automatic rule, i.e. the fused path wherever its kernels exist.
    mode = False if impl == "baseline" else None

    def fn():
        with fused_inference(mode):
            return model.decode(z)

    benchmark.group = f"decode {preset.removeprefix('dc-ae-')} {DECODE_SIZE}px plain vs fused"
    benchmark.extra_info.update(impl=impl, baseline_name="dcgen plain module path")
    with torch.inference_mode():
        benchmark.extra_info.update(measure_peak_memory(fn))
        time_it(benchmark, fn, n_rounds=rounds(3, 2))
    if impl == "dcgen":  # record only (a deep random-weight decoder; the tests hold tolerances)

        def plain():
            with fused_inference(False):
                return model.decode(z)

        record_rel_err(benchmark, fn, plain, limit=None)


# Row bands (dcgen/autoencoders/row_bands.py) in the fused decode: ResBlocks write conv2's
# output band by band into their input, up blocks fill a preallocated output band by band.
# Baseline: the same fused decode with bands off. What it costs in time for the memory.
ROW_BAND_BYTES = 256 * 2**20 if ON_GPU else 4096


@pytest.mark.parametrize("impl", ["baseline", "dcgen"])
@pytest.mark.parametrize("preset", DECODE_PRESETS)
def test_decode_row_bands(benchmark, preset, impl):
    from dcgen.autoencoders.fused import fused_inference
    from dcgen.autoencoders.row_bands import band_size

    _skip_without("up_block_shortcut", "dcgen")  # both rows are the fused path
    model = _decode_model(preset)
    f = model.spatial_compression_ratio
    z = torch.randn(1, model.latent_channels, DECODE_SIZE // f, DECODE_SIZE // f, device=DEVICE)
    z = z.to(DTYPE)
    nbytes = 0 if impl == "baseline" else ROW_BAND_BYTES

    def fn():
        with fused_inference(True), band_size(nbytes):
            return model.decode(z)

    benchmark.group = f"decode {preset.removeprefix('dc-ae-')} {DECODE_SIZE}px row bands"
    benchmark.extra_info.update(
        impl=impl, baseline_name="fused decode without row bands", band_bytes=nbytes
    )
    with torch.inference_mode():
        benchmark.extra_info.update(measure_peak_memory(fn))
        time_it(benchmark, fn, n_rounds=rounds(3, 2))
    if impl == "dcgen":  # record only, as above

        def unbanded():
            with fused_inference(True), band_size(0):
                return model.decode(z)

        record_rel_err(benchmark, fn, unbanded, limit=None)
