"""Fake (meta) implementations of the compiled ops, so torch.compile and FakeTensor tracing see
their output shapes without running them. Registered only when the extension is loaded."""

from __future__ import annotations

import torch

from ._extension import extension_loaded

if extension_loaded():

    @torch.library.register_fake("dcgen::channel_rms_norm")
    def _channel_rms_norm_fake(x, weight, bias, eps):  # noqa: ANN001
        return torch.empty_like(x)
