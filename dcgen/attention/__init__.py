"""diffusers attention processors on dcgen's fused attention (QK-RMSNorm + RoPE + flash).

``accelerate(transformer)`` swaps the stock processors of FLUX (double and single blocks) and
SANA's cross-attention for the fused ones (``blocks=True``: FLUX and SANA blocks with their elementwise
glue fused too, fused_blocks.py); ``unaccelerate(transformer)`` puts them back.
"""

from . import fused_blocks
from .install import accelerate, is_accelerated, unaccelerate
from .processors import FluxFusedAttnProcessor, SanaFusedCrossAttnProcessor

__all__ = [
    "FluxFusedAttnProcessor",
    "SanaFusedCrossAttnProcessor",
    "accelerate",
    "fused_blocks",
    "is_accelerated",
    "unaccelerate",
]
