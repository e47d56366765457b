"""Fake (meta) implementations of the quantize ops, so torch.compile traces them whole.
Registered only when the extension is loaded and carries these schemas (an older build may
not); imported by quantize_fp8.py and quantize_nvfp4.py."""

from __future__ import annotations

import torch

from ._extension import has_schema

if has_schema("quantize_fp8"):

    @torch.library.register_fake("dcgen::quantize_fp8")
    def _quantize_fp8_fake(x, block):  # noqa: ANN001
        m, k = x.shape
        nb = 1 if block == 0 else (k + block - 1) // block
        return x.new_empty((m, k), dtype=torch.float8_e4m3fn), x.new_empty(
            (m, nb), dtype=torch.float32
        )


if has_schema("fp8_scale_epilogue_into"):

    @torch.library.register_fake("dcgen::fp8_scale_epilogue_into")
    def _fp8_scale_epilogue_into_fake(y, row_scale, col_scale, bias, act, out):  # noqa: ANN001
        return None  # writes out in place


if has_schema("fp8_scale_epilogue_fp8"):

    @torch.library.register_fake("dcgen::fp8_scale_epilogue_fp8")
    def _fp8_scale_epilogue_fp8_fake(y, row_scale, col_scale, bias, act):  # noqa: ANN001
        m, n = y.shape
        return (
            torch.empty_like(y, memory_format=torch.contiguous_format),
            y.new_empty((m, n), dtype=torch.float8_e4m3fn),
            y.new_empty((m, 1), dtype=torch.float32),
        )


if has_schema("quantize_nvfp4"):

    @torch.library.register_fake("dcgen::quantize_nvfp4")
    def _quantize_nvfp4_fake(x, global_scale):  # noqa: ANN001
        m, k = x.shape
        kb = (k + 15) // 16
        padded = ((m + 127) // 128 * 128) * ((kb + 3) // 4 * 4)
        return x.new_empty((m, kb * 8), dtype=torch.uint8), x.new_empty(
            (padded,), dtype=torch.float8_e4m3fn
        )


if has_schema("quantize_nvfp4_lowrank"):

    @torch.library.register_fake("dcgen::quantize_nvfp4_lowrank")
    def _quantize_nvfp4_lowrank_fake(x, global_scale, smooth, down):  # noqa: ANN001
        packed, scales = _quantize_nvfp4_fake(x, global_scale)
        return packed, scales, x.new_empty((x.shape[0], down.shape[0]), dtype=torch.float32)


if has_schema("nvfp4_gemm"):

    @torch.library.register_fake("dcgen::nvfp4_gemm")
    def _nvfp4_gemm_fake(a, a_scales, b, b_scales, alpha):  # noqa: ANN001
        return a.new_empty((a.shape[0], b.shape[0]), dtype=torch.bfloat16)


if has_schema("nvfp4_gemm_w4a16"):

    @torch.library.register_fake("dcgen::nvfp4_gemm_w4a16")
    def _nvfp4_gemm_w4a16_fake(a, b, b_scales, alpha):  # noqa: ANN001
        return a.new_empty((a.shape[0], b.shape[0]), dtype=torch.bfloat16)


if has_schema("nvfp4_dequantize"):

    @torch.library.register_fake("dcgen::nvfp4_dequantize")
    def _nvfp4_dequantize_fake(packed, scales, global_scale, k, swizzled, dtype):  # noqa: ANN001
        return packed.new_empty((packed.shape[0], k), dtype=dtype)


if has_schema("fp8_scale_epilogue"):

    @torch.library.register_fake("dcgen::fp8_scale_epilogue")
    def _fp8_scale_epilogue_fake(y, row_scale, col_scale, bias, act):  # noqa: ANN001
        return torch.empty_like(y, memory_format=torch.contiguous_format)
