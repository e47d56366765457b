"""Fake (meta) implementations of the compiled ops, so torch.compile and FakeTensor tracing see
their output shapes without running them. Registered only when the extension is loaded."""

from __future__ import annotations

import torch

from ._extension import extension_loaded

if extension_loaded():

    @torch.library.register_fake("dcgen::channel_rms_norm")
    def _channel_rms_norm_fake(x, weight, bias, eps):  # noqa: ANN001
        # Same layout rule as the kernels: channels_last stays channels_last, anything else
        # comes back NCHW-contiguous.
        if x.ndim in (4, 5) and not x.is_contiguous():
            fmt = torch.channels_last if x.ndim == 4 else torch.channels_last_3d
            if x.is_contiguous(memory_format=fmt):
                return torch.empty_like(x, memory_format=fmt)
        return torch.empty_like(x, memory_format=torch.contiguous_format)

    @torch.library.register_fake("dcgen::relu_linear_attention")
    def _relu_linear_attention_fake(qkv, eps):  # noqa: ANN001
        b, h, d3, n = qkv.shape
        return qkv.new_empty((b, h, d3 // 3, n))
