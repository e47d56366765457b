"""Quantization: the NVFP4 format, NVFP4Linear, FP8 (E4M3) W8A8 FP8Linear and the quantize_
API (pure-PyTorch reference paths; the CUDA kernels plug in behind the same functions), and
adopt_quantized for checkpoints quantized elsewhere (diffusers' BFL FP8 / NVFP4 layers)."""

from .adopt import adopt_quantized
from .api import (
    DEFAULT_EXCLUDE,
    FP8Config,
    NVFP4Config,
    load_quantized,
    quality_report,
    quantize_,
    quantized_modules,
    save_quantized,
)
from .fp8 import fp8_gemm, fp8_linear_reference, quantize_fp8_weight
from .fp8_linear import FP8Linear, share_input_quantization, unshare_input_quantization
from .linear import NVFP4Linear, smoothing_factors
from .nvfp4 import (
    NVFP4Tensor,
    dequantize_nvfp4,
    e2m1_decode,
    e2m1_encode,
    fake_quantize_nvfp4,
    pack_e2m1,
    quantize_nvfp4,
    swizzle_scales,
    unpack_e2m1,
    unswizzle_scales,
)
from .pipeline_quant import capture_transformer_inputs, quantize_transformer

__all__ = [
    "DEFAULT_EXCLUDE",
    "FP8Config",
    "FP8Linear",
    "NVFP4Config",
    "NVFP4Linear",
    "NVFP4Tensor",
    "adopt_quantized",
    "capture_transformer_inputs",
    "dequantize_nvfp4",
    "e2m1_decode",
    "e2m1_encode",
    "fake_quantize_nvfp4",
    "fp8_gemm",
    "fp8_linear_reference",
    "load_quantized",
    "pack_e2m1",
    "quality_report",
    "quantize_",
    "quantize_fp8_weight",
    "quantize_transformer",
    "quantize_nvfp4",
    "quantized_modules",
    "save_quantized",
    "share_input_quantization",
    "smoothing_factors",
    "swizzle_scales",
    "unpack_e2m1",
    "unshare_input_quantization",
    "unswizzle_scales",
]
