"""diffusers pipelines for DC-Gen models (and base FLUX.1 for comparison), one call API."""

from .base import OUTPUT_TYPES, DCGenPipelineOutput, FlowTextToImagePipeline
from .flux import BaseFluxPipeline, DCGenFluxPipeline
from .sana import DCGenSanaPipeline
from .text_encoders import PipelineTextEncoder, copy_text_components, load_text_components
from .toy import DCGenToyPipeline

__all__ = [
    "OUTPUT_TYPES",
    "BaseFluxPipeline",
    "DCGenFluxPipeline",
    "DCGenPipelineOutput",
    "DCGenSanaPipeline",
    "DCGenToyPipeline",
    "FlowTextToImagePipeline",
    "PipelineTextEncoder",
    "copy_text_components",
    "load_text_components",
]
