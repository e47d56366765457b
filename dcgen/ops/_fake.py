"""Fake (meta) implementations of the compiled ops, so torch.compile and FakeTensor tracing see
their output shapes without running them. Registered only when the extension is loaded."""

from __future__ import annotations

import torch

from ._extension import extension_loaded
from ._validate import kernel_layout, rms_norm_layout
from .linear_attention import token_major

if extension_loaded():

    @torch.library.register_fake("dcgen::channel_rms_norm")
    def _channel_rms_norm_fake(x, weight, bias, eps):  # noqa: ANN001
        return torch.empty_like(x, memory_format=rms_norm_layout(x))

    @torch.library.register_fake("dcgen::relu_linear_attention")
    def _relu_linear_attention_fake(qkv, eps):  # noqa: ANN001
        b, h, d3, n = qkv.shape
        if token_major(qkv):  # the kernel's output follows a channel-fastest qkv
            return qkv.new_empty((b, n, h, d3 // 3)).permute(0, 2, 3, 1)
        return qkv.new_empty((b, h, d3 // 3, n))

    def _registered(name: str) -> bool:
        # A _C built before an op existed (stale build) must not break the import.
        return hasattr(torch.ops.dcgen, name)

    def _empty(shape, like):  # noqa: ANN001, ANN202
        fmt = kernel_layout(like)
        return torch.empty(shape, dtype=like.dtype, device=like.device, memory_format=fmt)

    if _registered("channel_rms_norm_fused"):

        @torch.library.register_fake("dcgen::channel_rms_norm_fused")
        def _channel_rms_norm_fused_fake(x, weight, bias, residual, act, eps):  # noqa: ANN001
            return torch.empty_like(x, memory_format=rms_norm_layout(x))

    if _registered("channel_rms_norm_fused_out"):

        @torch.library.register_fake("dcgen::channel_rms_norm_fused_out")
        def _channel_rms_norm_fused_out_fake(x, weight, bias, residual, act, eps, out):  # noqa: ANN001
            return None

    if _registered("bias_act_"):

        @torch.library.register_fake("dcgen::bias_act_")
        def _bias_act_fake(out, x, bias, act, residual):  # noqa: ANN001
            return None

    if _registered("up_block_shortcut"):

        @torch.library.register_fake("dcgen::up_block_shortcut")
        def _up_block_shortcut_fake(y, x, shuffle_y):  # noqa: ANN001
            b, cin, h, w = x.shape
            cout = y.shape[1] // 4 if shuffle_y else y.shape[1]
            return _empty((b, cout, 2 * h, 2 * w), y)

    if _registered("up_block_shortcut_out"):

        @torch.library.register_fake("dcgen::up_block_shortcut_out")
        def _up_block_shortcut_out_fake(y, x, shuffle_y, bias, out):  # noqa: ANN001
            return None

    if _registered("down_block_shortcut"):

        @torch.library.register_fake("dcgen::down_block_shortcut")
        def _down_block_shortcut_fake(y, x, unshuffle_y):  # noqa: ANN001
            b, cin, h, w = x.shape
            cout = 4 * y.shape[1] if unshuffle_y else y.shape[1]
            return _empty((b, cout, h // 2, w // 2), y)

    if _registered("glu_depthwise_conv"):

        @torch.library.register_fake("dcgen::glu_depthwise_conv")
        def _glu_depthwise_conv_fake(x, weight, bias, expand_bias=None):  # noqa: ANN001
            b, c2, h, w = x.shape
            return _empty((b, c2 // 2, h, w), x)
