"""accelerate(transformer): install dcgen's fused attention processors in one call, and undo it.

Only modules running diffusers' stock processor are touched (FluxAttnProcessor on FLUX
attention, SanaAttnProcessor2_0 on SANA's cross-attention, SanaLinearAttnProcessor2_0 on its
self-attention), and FLUX attention only when its q/k norms are what the fused prologue
computes (per-head RMSNorm, one eps). Custom processors (IP-Adapter,
LoRA-specific, user-defined) are left alone, also when set after ``accelerate``: the original
processor kept on the module is put back by ``unaccelerate`` only where dcgen's still runs.
"""

from __future__ import annotations

import logging

import torch

from . import cuda_graphs as block_graphs
from . import fused_blocks
from .processors import (
    FluxFusedAttnProcessor,
    SanaFusedCrossAttnProcessor,
    SanaFusedLinearAttnProcessor,
)

logger = logging.getLogger(__name__)

_ORIGINAL = "_dcgen_original_processor"
_FUSED = (FluxFusedAttnProcessor, SanaFusedCrossAttnProcessor, SanaFusedLinearAttnProcessor)


def _runs_fused(module: torch.nn.Module) -> bool:
    """Whether ``module`` runs a processor ``accelerate`` installed (and nobody replaced since:
    set_attn_processor from other code leaves a stale saved original behind)."""
    return _ORIGINAL in module.__dict__ and isinstance(getattr(module, "processor", None), _FUSED)


def _is_rms_norm(norm: object, dim: int) -> bool:
    from diffusers.models.normalization import RMSNorm as DiffusersRMSNorm

    if isinstance(norm, torch.nn.RMSNorm):
        return tuple(norm.normalized_shape) == (dim,)
    if isinstance(norm, DiffusersRMSNorm):
        return getattr(norm, "bias", None) is None and tuple(norm.dim) == (dim,)
    return False


def _flux_fusable(attn: torch.nn.Module) -> bool:
    d = attn.head_dim
    norms = [attn.norm_q, attn.norm_k]
    if attn.added_kv_proj_dim is not None:
        norms += [attn.norm_added_q, attn.norm_added_k]
    if not all(_is_rms_norm(n, d) for n in norms):
        return False
    return len({n.eps for n in norms}) == 1  # one eps for the whole prologue


def _new_processor(module: torch.nn.Module) -> object | None:
    from diffusers.models.attention_processor import SanaLinearAttnProcessor2_0
    from diffusers.models.transformers.sana_transformer import SanaAttnProcessor2_0
    from diffusers.models.transformers.transformer_flux import FluxAttention, FluxAttnProcessor

    proc = getattr(module, "processor", None)
    if isinstance(module, FluxAttention) and type(proc) is FluxAttnProcessor:
        return FluxFusedAttnProcessor() if _flux_fusable(module) else None
    if type(proc) is SanaAttnProcessor2_0:
        return SanaFusedCrossAttnProcessor()
    if type(proc) is SanaLinearAttnProcessor2_0:
        return SanaFusedLinearAttnProcessor()
    return None


def _check_model(name: str, model: object) -> None:
    if not isinstance(model, torch.nn.Module):
        hint = " (a pipeline: pass pipe.transformer)" if hasattr(model, "transformer") else ""
        raise TypeError(
            f"{name}: expected a torch.nn.Module (a FLUX or SANA transformer), got "
            f"{type(model).__name__}{hint}"
        )


def accelerate(
    model: torch.nn.Module, blocks: bool = False, cuda_graphs: bool = False
) -> torch.nn.Module:
    """Swap the stock attention processors of ``model`` (a FLUX or SANA transformer, or any
    module holding their attention layers) for dcgen's fused ones. Returns ``model``.

    ``blocks=True`` also runs FLUX double / single and SANA blocks with their elementwise glue
    fused (fused_blocks.py: AdaLN modulation, gated residuals, FLUX's MLP GELU in its GEMM
    epilogue).

    ``cuda_graphs=True`` also replays each of those blocks from a CUDA graph in CUDA inference
    (cuda_graphs.py: one launch per block instead of a few dozen, captured on the first call of
    each input shape; a block's output is valid until that block runs again).

    Idempotent; ``unaccelerate(model)`` undoes it. Numerics: the fused path computes norm, RoPE
    and softmax statistics in fp32 (see dcgen.ops.attention), so outputs match the stock
    processors within the input dtype's rounding; graphs replay the same kernels.
    """
    _check_model("accelerate", model)
    for m in model.modules():  # a processor set by other code since: its saved original is stale
        if _ORIGINAL in m.__dict__ and not _runs_fused(m):
            del m.__dict__[_ORIGINAL]
    new_processors = [
        (m, p)
        for m in model.modules()
        if _ORIGINAL not in m.__dict__ and (p := _new_processor(m)) is not None
    ]
    if new_processors or (blocks and fused_blocks.pending(model)):
        # A graph replays what its block ran when it was captured: changes go underneath, so
        # the graphs are dropped first (and captured again on the next call when asked for).
        block_graphs.uninstall(model)
    if blocks:
        n = fused_blocks.install(model)
        logger.info("dcgen.accelerate: fused glue in %d DiT blocks", n)
    for module, new in new_processors:
        # Plain __dict__ entry: a processor that happens to be an nn.Module must not become a
        # registered submodule (that would change state_dict keys).
        module.__dict__[_ORIGINAL] = module.processor
        module.set_processor(new)
    logger.info("dcgen.accelerate: fused attention on %d attention modules", len(new_processors))
    if cuda_graphs:
        n = block_graphs.install(model)
        logger.info("dcgen.accelerate: CUDA graphs on %d DiT blocks", n)
    return model


def unaccelerate(model: torch.nn.Module) -> torch.nn.Module:
    """Restore the processors (and block forwards) ``accelerate`` replaced and drop its CUDA
    graphs. Returns ``model``."""
    _check_model("unaccelerate", model)
    block_graphs.uninstall(model)
    fused_blocks.restore(model)
    for module in model.modules():
        fused = _runs_fused(module)  # else another processor was set since: it stays
        original = module.__dict__.pop(_ORIGINAL, None)
        if original is not None and fused:
            module.set_processor(original)
    return model


def is_accelerated(model: torch.nn.Module) -> bool:
    """True when any attention module of ``model`` runs a dcgen fused processor or any block
    its fused forward."""
    return (
        fused_blocks.is_installed(model)
        or bool(block_graphs.graphs_of(model))
        or any(_runs_fused(m) for m in model.modules())
    )
