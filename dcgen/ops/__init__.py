"""The Python face of every dcgen kernel.

Each op is a function with the public signature, a ``*_reference`` pure-PyTorch version (the
spec, runs anywhere), and dispatch to ``torch.ops.dcgen.*`` when dcgen._C has a kernel for the
input's device. See ``_extension.py`` for the dispatch rules.
"""

from . import _fake  # noqa: F401  (fake/meta registrations so torch.compile traces the ops)
from ._extension import extension_error, extension_loaded, has_kernel
from .attention import (
    fused_attention,
    fused_attention_reference,
    qk_norm_rope,
    qk_norm_rope_reference,
)
from .bias_act import bias_act_, bias_act_reference
from .block_shortcuts import (
    down_block_shortcut,
    down_block_shortcut_reference,
    up_block_shortcut,
    up_block_shortcut_reference,
)
from .channel_rms_norm import (
    channel_rms_norm,
    channel_rms_norm_fused,
    channel_rms_norm_fused_reference,
    channel_rms_norm_reference,
)
from .fp8_epilogue import (
    fp8_scale_epilogue,
    fp8_scale_epilogue_fp8,
    fp8_scale_epilogue_fp8_reference,
    fp8_scale_epilogue_into,
    fp8_scale_epilogue_reference,
)
from .glu_depthwise import glu_depthwise_conv, glu_depthwise_conv_reference
from .linear_attention import relu_linear_attention, relu_linear_attention_reference
from .modulation import (
    adaln_modulate,
    adaln_modulate_fp8,
    adaln_modulate_fp8_reference,
    adaln_modulate_reference,
    gated_residual,
    gated_residual_reference,
)

# quantize_fp8 and nvfp4_gemm stay module attributes (dcgen.ops.quantize_fp8.quantize_fp8):
# exporting the functions under the same names would shadow their modules.
from .nvfp4_dequant import nvfp4_dequantize, nvfp4_dequantize_reference
from .nvfp4_gemm import nvfp4_gemm_reference
from .quantize_fp8 import dequantize_fp8, quantize_fp8_reference
from .quantize_nvfp4 import (
    quantize_nvfp4_activation,
    quantize_nvfp4_lowrank,
    quantize_nvfp4_lowrank_reference,
    quantize_nvfp4_reference,
)
from .shortcuts import channel_duplicate_to_space, space_to_channel_average

__all__ = [
    "adaln_modulate",
    "adaln_modulate_fp8",
    "adaln_modulate_fp8_reference",
    "adaln_modulate_reference",
    "gated_residual",
    "gated_residual_reference",
    "channel_duplicate_to_space",
    "dequantize_fp8",
    "fp8_scale_epilogue",
    "fp8_scale_epilogue_fp8",
    "fp8_scale_epilogue_fp8_reference",
    "fp8_scale_epilogue_into",
    "fp8_scale_epilogue_reference",
    "fused_attention",
    "fused_attention_reference",
    "nvfp4_dequantize",
    "nvfp4_dequantize_reference",
    "nvfp4_gemm_reference",
    "qk_norm_rope",
    "qk_norm_rope_reference",
    "quantize_fp8_reference",
    "quantize_nvfp4_activation",
    "quantize_nvfp4_lowrank",
    "quantize_nvfp4_lowrank_reference",
    "quantize_nvfp4_reference",
    "channel_rms_norm",
    "channel_rms_norm_reference",
    "channel_rms_norm_fused",
    "channel_rms_norm_fused_reference",
    "down_block_shortcut",
    "down_block_shortcut_reference",
    "bias_act_",
    "bias_act_reference",
    "glu_depthwise_conv",
    "glu_depthwise_conv_reference",
    "up_block_shortcut",
    "up_block_shortcut_reference",
    "extension_error",
    "extension_loaded",
    "has_kernel",
    "relu_linear_attention",
    "relu_linear_attention_reference",
    "space_to_channel_average",
]
