"""diffusers pipelines for DC-Gen models (and base FLUX.1 for comparison), one call API."""

from .base import OUTPUT_TYPES, DCGenPipelineOutput, FlowTextToImagePipeline
from .flux import BaseFluxPipeline, DCGenFluxPipeline
from .sana import DCGenSanaPipeline

__all__ = [
    "OUTPUT_TYPES",
    "BaseFluxPipeline",
    "DCGenFluxPipeline",
    "DCGenPipelineOutput",
    "DCGenSanaPipeline",
    "FlowTextToImagePipeline",
]
