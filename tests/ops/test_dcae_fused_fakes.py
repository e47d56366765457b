"""The fake (meta) impls of the fused DC-AE ops: shapes, dtypes and layouts as the kernels
return them, checked on meta tensors so they run without a GPU (the CUDA tests opcheck them
against the kernels)."""

from __future__ import annotations

import pytest
import torch

from dcgen.ops import extension_loaded

pytestmark = pytest.mark.skipif(
    not extension_loaded() or not hasattr(torch.ops.dcgen, "up_block_shortcut"),
    reason="dcgen._C not built (or built without the fused DC-AE schemas)",
)
CL = torch.channels_last


def _meta(*shape, fmt=torch.contiguous_format, dtype=torch.bfloat16):
    return torch.empty(shape, device="meta", dtype=dtype, memory_format=fmt)


@pytest.mark.parametrize("fmt", [torch.contiguous_format, CL])
def test_up_block_shortcut_fake(fmt):
    y, x = _meta(2, 16, 5, 7, fmt=fmt), _meta(2, 8, 5, 7)
    out = torch.ops.dcgen.up_block_shortcut(y, x, True)
    assert out.shape == (2, 4, 10, 14) and out.dtype == torch.bfloat16
    assert out.is_contiguous(memory_format=fmt)
    out = torch.ops.dcgen.up_block_shortcut(_meta(2, 4, 10, 14, fmt=fmt), x, False)
    assert out.shape == (2, 4, 10, 14) and out.is_contiguous(memory_format=fmt)


@pytest.mark.parametrize("fmt", [torch.contiguous_format, CL])
def test_down_block_shortcut_fake(fmt):
    y, x = _meta(2, 4, 6, 8, fmt=fmt), _meta(2, 8, 6, 8)
    out = torch.ops.dcgen.down_block_shortcut(y, x, True)
    assert out.shape == (2, 16, 3, 4) and out.is_contiguous(memory_format=fmt)
    out = torch.ops.dcgen.down_block_shortcut(_meta(2, 16, 3, 4, fmt=fmt), x, False)
    assert out.shape == (2, 16, 3, 4) and out.is_contiguous(memory_format=fmt)


@pytest.mark.parametrize("fmt", [torch.contiguous_format, CL])
def test_glu_depthwise_conv_fake(fmt):
    x = _meta(2, 12, 5, 6, fmt=fmt, dtype=torch.float16)
    out = torch.ops.dcgen.glu_depthwise_conv(x, _meta(12, 1, 3, 3, dtype=torch.float32), None)
    assert out.shape == (2, 6, 5, 6) and out.dtype == torch.float16
    assert out.is_contiguous(memory_format=fmt)


def test_channel_rms_norm_fused_fake():
    x = _meta(2, 8, 5, 3, fmt=CL)
    out = torch.ops.dcgen.channel_rms_norm_fused(x, None, None, _meta(2, 8, 5, 3), "relu", 1e-5)
    assert out.shape == x.shape and out.is_contiguous(memory_format=CL)
    strided = _meta(2, 8, 5, 3).transpose(2, 3)
    out = torch.ops.dcgen.channel_rms_norm_fused(strided, None, None, None, "none", 1e-5)
    assert out.shape == strided.shape and out.is_contiguous()
