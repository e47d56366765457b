"""diffusers attention processors on dcgen's fused attention (QK-RMSNorm + RoPE + flash).

``accelerate(transformer)`` swaps the stock processors of FLUX (double and single blocks) and
SANA (cross-attention and linear self-attention) for the fused ones (``blocks=True``: FLUX and
SANA blocks with their elementwise glue fused too, fused_blocks.py; ``cuda_graphs=True``: each
block replayed from a CUDA graph, cuda_graphs.py); ``unaccelerate`` puts them back.
"""

from . import cuda_graphs, fused_blocks
from .install import accelerate, is_accelerated, unaccelerate
from .processors import (
    FluxFusedAttnProcessor,
    SanaFusedCrossAttnProcessor,
    SanaFusedLinearAttnProcessor,
)

__all__ = [
    "FluxFusedAttnProcessor",
    "SanaFusedCrossAttnProcessor",
    "SanaFusedLinearAttnProcessor",
    "accelerate",
    "cuda_graphs",
    "fused_blocks",
    "is_accelerated",
    "unaccelerate",
]
