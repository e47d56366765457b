"""Op-level benchmarks: each compiled kernel vs what users run today, same inputs."""

from __future__ import annotations

import pytest
import torch
from _harness import DEVICE, ON_GPU, record_rel_err, rounds, time_it

from dcgen.ops import (
    channel_rms_norm,
    has_kernel,
    relu_linear_attention,
    relu_linear_attention_reference,
)

diffusers_norm = pytest.importorskip("diffusers.models.normalization")


def _time_with_bandwidth(benchmark, fn, nbytes: int, n_rounds: int) -> None:  # noqa: ANN001
    """Time ``fn`` in inference mode and record the bandwidth its ``nbytes`` floor implies."""
    with torch.inference_mode():
        time_it(benchmark, fn, n_rounds=n_rounds)
    if benchmark.stats:
        benchmark.extra_info["gbps"] = nbytes / benchmark.stats.stats.median / 1e9


# DC-AE decoder stage-0 activation at 2048^2 output (f32c32 SANA: 128 channels); CPU: small.
SHAPE = (1, 128, 1024, 1024) if ON_GPU else (1, 128, 64, 64)
DTYPE = torch.bfloat16 if ON_GPU else torch.float32


@pytest.mark.parametrize("impl", ["baseline", "dcgen"])
def test_channel_rms_norm(benchmark, impl):
    if impl == "dcgen" and not has_kernel("channel_rms_norm", DEVICE):
        pytest.skip("no compiled channel_rms_norm kernel for this device")
    c = SHAPE[1]
    x = torch.randn(SHAPE, device=DEVICE).to(DTYPE)
    norm = diffusers_norm.RMSNorm(c, eps=1e-5, elementwise_affine=True, bias=True)
    norm = norm.to(DEVICE, DTYPE)

    def ours():
        return channel_rms_norm(x, norm.weight, norm.bias, 1e-5)

    def base():
        # diffusers' DC-AE applies its RMSNorm on a channels-last view, like this
        return norm(x.movedim(1, -1)).movedim(-1, 1)

    fn = ours if impl == "dcgen" else base

    nbytes = 2 * x.numel() * x.element_size()  # one read + one write is the floor
    benchmark.group = f"channel_rms_norm {tuple(SHAPE)} {str(DTYPE).removeprefix('torch.')}"
    benchmark.extra_info.update(
        impl=impl, baseline_name="diffusers RMSNorm (movedim)", bytes_floor=nbytes
    )
    _time_with_bandwidth(benchmark, fn, nbytes, rounds(50, 5))
    if impl == "dcgen":
        record_rel_err(benchmark, ours, base)


# The 4K decoders' largest linear-attention call: stage 3 of the f64c128 and SANA f32c32
# decoders runs at 512^2 tokens with 16 heads + 16 multi-scale heads of dim 32.
LA_SHAPE = (1, 32, 96, 512 * 512) if ON_GPU else (1, 4, 96, 64 * 64)


@pytest.mark.parametrize("impl", ["baseline", "dcgen"])
def test_relu_linear_attention(benchmark, impl):
    if impl == "dcgen" and not has_kernel("relu_linear_attention", DEVICE):
        pytest.skip("no compiled relu_linear_attention kernel for this device")
    qkv = torch.randn(LA_SHAPE, device=DEVICE).to(DTYPE)

    def ours():
        return relu_linear_attention(qkv)

    def base():
        # diffusers' / the reference math: fp32 copy, pad with ones, two batched matmuls
        return relu_linear_attention_reference(qkv)

    fn = ours if impl == "dcgen" else base

    nbytes = qkv.numel() * qkv.element_size() * 4 // 3  # read q, k, v once, write out once
    benchmark.group = f"relu_linear_attention {tuple(LA_SHAPE)} {str(DTYPE).removeprefix('torch.')}"
    benchmark.extra_info.update(
        impl=impl, baseline_name="PyTorch reference (fp32 matmuls)", bytes_floor=nbytes
    )
    _time_with_bandwidth(benchmark, fn, nbytes, rounds(30, 3))
    if impl == "dcgen":
        record_rel_err(benchmark, ours, base)


@pytest.mark.parametrize("impl", ["baseline", "dcgen"])
def test_relu_linear_attention_channels_last(benchmark, impl):
    # LiteMLA's call on the same shape, from its channels_last qkv conv output: what it ran up
    # to session 19 (the kernel made the qkv view contiguous, a transposing copy, and LiteMLA
    # copied the output back to channels_last) against the kernel reading the view in place and
    # writing channels_last (its register-tiled reduce included). Both rows run dcgen's kernel.
    if not has_kernel("relu_linear_attention", DEVICE):
        pytest.skip("no compiled relu_linear_attention kernel for this device")
    from dcgen.autoencoders.blocks import _attention_map

    b, heads, d3, n = LA_SHAPE
    side = int(n**0.5)
    conv_out = torch.randn(b, heads * d3, side, side, device=DEVICE).to(DTYPE)
    conv_out = conv_out.contiguous(memory_format=torch.channels_last)
    qkv = conv_out.reshape(b, heads, d3, n)  # a view, channel-fastest
    cl = torch.channels_last

    def ours():
        return _attention_map(relu_linear_attention(qkv), side, side)

    def base():
        out = relu_linear_attention(qkv.contiguous())
        return out.reshape(b, -1, side, side).contiguous(memory_format=cl)

    fn = ours if impl == "dcgen" else base

    nbytes = qkv.numel() * qkv.element_size() * 4 // 3  # read q, k, v once, write out once
    benchmark.group = (
        f"relu_linear_attention channels_last view {tuple(LA_SHAPE)} "
        f"{str(DTYPE).removeprefix('torch.')}"
    )
    benchmark.extra_info.update(
        impl=impl,
        baseline_name="contiguous() copy, kernel, copy back to channels_last",
        bytes_floor=nbytes,
    )
    _time_with_bandwidth(benchmark, fn, nbytes, rounds(30, 3))
    if impl == "dcgen":
        record_rel_err(benchmark, ours, base)


# FLUX attention's q / k prologue at DC-Gen-FLUX 4K: 4,608 tokens, 24 heads of 128 (B, S, H, D
# as the projections leave them); CPU: small.
QK_SHAPE = (1, 4608, 24, 128) if ON_GPU else (1, 80, 2, 32)


@pytest.mark.parametrize("impl", ["baseline", "dcgen"])
def test_qk_norm_rope(benchmark, impl):
    """Per-head RMSNorm + interleaved RoPE of q and k: torch.nn.RMSNorm modules (what
    diffusers' FluxAttention builds for norm_q / norm_k: one fused rms_norm op) then diffusers'
    apply_rotary_emb, as FluxAttention's processor runs them, against dcgen's one-pass kernel.
    dcgen's output error against the baseline goes to extra_info ("rel_err")."""
    from diffusers.models.embeddings import apply_rotary_emb

    from dcgen.ops import qk_norm_rope

    if impl == "dcgen" and not has_kernel("qk_norm_rope", DEVICE):
        pytest.skip("no compiled qk_norm_rope kernel for this device")
    b, s, h, d = QK_SHAPE
    g = torch.Generator().manual_seed(0)
    q, k = (torch.randn(b, s, h, d, generator=g).to(DEVICE, DTYPE) for _ in range(2))
    norm_q, norm_k = (torch.nn.RMSNorm(d, eps=1e-6).to(DEVICE, DTYPE) for _ in range(2))
    angles = torch.rand(s, d // 2, generator=g) * 6.28
    cos, sin = (t.repeat_interleave(2, dim=1).to(DEVICE) for t in (angles.cos(), angles.sin()))

    def kernel():
        return qk_norm_rope(q.transpose(1, 2), k.transpose(1, 2), q_norm_weight=norm_q.weight,
                            k_norm_weight=norm_k.weight, rope_cos=cos, rope_sin=sin)  # fmt: skip

    def stock():
        return (apply_rotary_emb(norm_q(q), (cos, sin), sequence_dim=1),
                apply_rotary_emb(norm_k(k), (cos, sin), sequence_dim=1))  # fmt: skip

    def kernel_in_stock_layout():  # (B, H, S, D) -> (B, S, H, D), for the error only
        return tuple(t.transpose(1, 2) for t in kernel())

    fn = kernel if impl == "dcgen" else stock

    nbytes = 4 * q.numel() * q.element_size()  # q and k read and written once
    benchmark.group = f"qk_norm_rope q, k {tuple(QK_SHAPE)} (B, S, H, D) {str(DTYPE)[6:]}"
    benchmark.extra_info.update(
        impl=impl, baseline_name="torch RMSNorm + diffusers apply_rotary_emb", bytes_floor=nbytes
    )
    _time_with_bandwidth(benchmark, fn, nbytes, rounds(50, 5))
    if impl == "dcgen":
        record_rel_err(benchmark, kernel_in_stock_layout, stock, limit=1e-2)
