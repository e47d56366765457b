"""DiT adapters: what differs per diffusion-transformer family (latent-facing layers, packing,
position ids, timestep convention), behind one ``predict`` API. ``adapter_for(transformer)``
picks the family; a new family is one module with a registered ``DiTAdapter`` subclass."""

from .base import (
    DiTAdapter,
    LatentLayers,
    adapter_for,
    pack_latents,
    register_adapter,
    unpack_latents,
)
from .flux import FluxAdapter
from .sana import SanaAdapter
from .structured import StructuredConv2d, StructuredLinear, channel_feature_index

__all__ = [
    "DiTAdapter",
    "FluxAdapter",
    "LatentLayers",
    "SanaAdapter",
    "StructuredConv2d",
    "StructuredLinear",
    "adapter_for",
    "channel_feature_index",
    "pack_latents",
    "register_adapter",
    "unpack_latents",
]
