"""The low-precision rows: DC-Gen with quantized linears in the transformer blocks (FP8 W8A8,
NVFP4 W4A4 or W4A16), without losing the bf16 transformer they are compared against.

Precisions are named by a label (:data:`QUANT_PRECISIONS`): ``fp8``, ``nvfp4-w4a4`` and
``nvfp4-w4a16``; :func:`quant_config` turns one into its dcgen.quant config.

Memory. At FLUX size the bf16 transformer is 24 GB; quantizing it in place would lose the bf16
rows' model (and the reference for the quality report), and a deep copy first would need 24 GB
more. Here each block is copied and quantized ONE AT A TIME (peak: bf16 model + quantized
blocks so far + one bf16 block), so the FP8 set costs about half the bf16 blocks (12 GB at
FLUX size) and an NVFP4 set about 0.28 of them (4.5 bits a weight). The speed bench keeps one
quantized set at a time.

The quantized blocks are mounted on a *view* of the bf16 transformer (:func:`blocks_view`): a
shallow module copy that shares every non-block module (embedders, RoPE, head: kept in 16-bit by
dcgen.quant's default exclude list anyway) and has the quantized block lists. A view is made
after the latent layers were set for a case, so it always sees the current embedder and head.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

from ..quant import FP8Config, NVFP4Config, quality_report, quantize_
from ..quant.api import QuantConfig

logger = logging.getLogger(__name__)

#: the low-precision labels a speed-bench row can carry
QUANT_PRECISIONS = ("fp8", "nvfp4-w4a4", "nvfp4-w4a16")
NVFP4_MODES = ("w4a4", "w4a16")


def quant_config(
    precision: str, fp8_granularity: str = "row", nvfp4_rank: int = 0, fp8_fast_accum: bool = False
) -> QuantConfig:
    """The dcgen.quant config of a precision label (see :data:`QUANT_PRECISIONS`)."""
    if precision == "fp8":
        return FP8Config(granularity=fp8_granularity, fast_accum=fp8_fast_accum)
    if precision.startswith("nvfp4-") and precision.removeprefix("nvfp4-") in NVFP4_MODES:
        return NVFP4Config(mode=precision.removeprefix("nvfp4-"), rank=nvfp4_rank)
    raise ValueError(f"precision: expected one of {QUANT_PRECISIONS}, got {precision!r}")


def module_tensors(module: nn.Module) -> Iterator[torch.Tensor]:
    """Every parameter and buffer of ``module``."""
    yield from module.parameters()
    yield from module.buffers()


def module_bytes(module: nn.Module) -> int:
    """Bytes of every parameter and buffer of ``module`` (shared tensors counted once)."""
    seen: dict[int, int] = {}
    for t in module_tensors(module):
        seen[id(t)] = t.numel() * t.element_size()
    return sum(seen.values())


def nvfp4_gemm_path(mode: str, device: torch.device, k: int = 3072, n: int = 3072) -> str:
    """Which GEMM an NVFP4 linear of ``mode`` (K = ``k``, N = ``n``) runs on ``device``, in the
    order NVFP4Linear.forward tries them: the native kernel (Blackwell; Hopper opt-in), the
    dequantize + cuBLAS path (other CUDA GPUs), else the PyTorch reference."""
    from ..ops import nvfp4_gemm as gemm
    from ..quant import dequant_path

    native = (
        gemm.kernel_available(device, n, k)
        if mode == "w4a4"
        else gemm.w4a16_kernel_available(device, k)
    )
    if native:
        return f"native {mode} kernel"
    if dequant_path.available(device):
        return "dequantize + cuBLAS bf16"
    return "PyTorch reference"


def quantize_block_copies(blocks: nn.ModuleList, config: QuantConfig) -> tuple[nn.ModuleList, int]:
    """Quantized copies of ``blocks`` (the originals are untouched); returns them and the number
    of linears quantized. Copies are made and quantized one block at a time (see module doc)."""
    out, count = [], 0
    for block in blocks:
        clone = copy.deepcopy(block)
        count += len(quantize_(clone, config))
        out.append(clone)
    return nn.ModuleList(out), count


class QuantizedBlocks:
    """The quantized copies of every block list of one transformer, built once per precision
    label. ``bytes_per_list``: weight bytes of each quantized list."""

    def __init__(self, transformer: nn.Module, attrs: Sequence[str], precision: str,
                 config: QuantConfig) -> None:  # fmt: skip
        self.precision = precision
        self.config = config
        self.lists: dict[str, nn.ModuleList] = {}
        self.bytes_per_list: dict[str, int] = {}
        self.linears = 0
        for attr in attrs:
            self.lists[attr], n = quantize_block_copies(getattr(transformer, attr), config)
            self.bytes_per_list[attr] = module_bytes(self.lists[attr])
            self.linears += n
        logger.info("%s blocks: %d linears quantized", precision, self.linears)

    def view(self, transformer: nn.Module) -> nn.Module:
        return blocks_view(transformer, self.lists)


def blocks_view(transformer: nn.Module, block_lists: dict[str, nn.ModuleList]) -> nn.Module:
    """A shallow copy of ``transformer`` whose block lists are ``block_lists``; every other
    submodule, parameter and buffer is shared (no tensor is copied)."""
    view = copy.copy(transformer)
    # copy.copy shares the registries themselves: give the view its own dicts, then swap.
    for name in ("_modules", "_parameters", "_buffers"):
        object.__setattr__(view, name, dict(getattr(transformer, name)))
    for attr, blocks in block_lists.items():
        view._modules[attr] = blocks
    return view


def output_quality(
    reference: nn.Module, quantized: nn.Module, inputs: dict[str, Any]
) -> dict[str, Any]:
    """dcgen.quant.quality_report of the transformer output on one captured batch, condensed:
    relative error and cosine of the output, and the worst layer (isolated error)."""
    rep = quality_report(reference, quantized, lambda: dict(inputs))
    out: dict[str, Any] = {
        "rel_err": rep["output"]["rel_err"],
        "cosine": rep["output"]["cosine"],
        "layers": len(rep["layers"]),
        "unreached_layers": list(rep["unreached"]),
    }
    if rep["layers"]:
        name, worst = max(rep["layers"].items(), key=lambda kv: kv[1]["rel_err"])
        out.update(worst_layer=name, worst_layer_rel_err=worst["rel_err"])
    return out


__all__ = [
    "NVFP4_MODES",
    "QUANT_PRECISIONS",
    "QuantizedBlocks",
    "blocks_view",
    "module_bytes",
    "module_tensors",
    "nvfp4_gemm_path",
    "output_quality",
    "quant_config",
    "quantize_block_copies",
]
