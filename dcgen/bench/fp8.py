"""The FP8 row: DC-Gen with FP8 (E4M3, W8A8) linears in the transformer blocks, without losing
the bf16 transformer it is compared against.

Memory. At FLUX size the bf16 transformer is 24 GB; quantizing it in place would lose the bf16
rows' model (and the reference for the quality report), and a deep copy first would need 24 GB
more. Here each block is copied and quantized ONE AT A TIME (peak: bf16 model + FP8 blocks so
far + one bf16 block), so the whole FP8 set costs about half the bf16 blocks (12 GB at FLUX
size; 36 GB resident in all, which fits an 80 GB card).

The FP8 blocks are mounted on a *view* of the bf16 transformer (:func:`fp8_view`): a shallow
module copy that shares every non-block module (embedders, RoPE, head: kept in 16-bit by
dcgen.quant's default exclude list anyway) and has the FP8 block lists. A view is made after
the latent layers were set for a case, so it always sees the current embedder and head.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ..quant import FP8Config, quality_report, quantize_

logger = logging.getLogger(__name__)


def quantize_block_copies(
    blocks: nn.ModuleList, granularity: str = "row"
) -> tuple[nn.ModuleList, int]:
    """FP8 copies of ``blocks`` (the originals are untouched); returns them and the number of
    linears quantized. Copies are made and quantized one block at a time (see module doc)."""
    config = FP8Config(granularity=granularity)
    out, count = [], 0
    for block in blocks:
        clone = copy.deepcopy(block)
        count += len(quantize_(clone, config))
        out.append(clone)
    return nn.ModuleList(out), count


class FP8Blocks:
    """The FP8 copies of every block list of one transformer, built once."""

    def __init__(
        self, transformer: nn.Module, attrs: Sequence[str], granularity: str = "row"
    ) -> None:
        self.granularity = granularity
        self.lists: dict[str, nn.ModuleList] = {}
        self.linears = 0
        for attr in attrs:
            self.lists[attr], n = quantize_block_copies(getattr(transformer, attr), granularity)
            self.linears += n
        logger.info("FP8 blocks: %d linears quantized (%s)", self.linears, granularity)

    def view(self, transformer: nn.Module) -> nn.Module:
        return fp8_view(transformer, self.lists)


def fp8_view(transformer: nn.Module, block_lists: dict[str, nn.ModuleList]) -> nn.Module:
    """A shallow copy of ``transformer`` whose block lists are ``block_lists``; every other
    submodule, parameter and buffer is shared (no tensor is copied)."""
    view = copy.copy(transformer)
    # copy.copy shares the registries themselves: give the view its own dicts, then swap.
    for name in ("_modules", "_parameters", "_buffers"):
        object.__setattr__(view, name, dict(getattr(transformer, name)))
    for attr, blocks in block_lists.items():
        view._modules[attr] = blocks
    return view


class InputCapture:
    """Records the keyword arguments of the first forward call of a module (one denoising step's
    transformer inputs), detached, so the same batch can be replayed."""

    def __init__(self, module: nn.Module) -> None:
        self.kwargs: dict[str, Any] | None = None
        self.args: tuple[Any, ...] = ()
        self._handle = module.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if self.kwargs is None:
            self.args = tuple(_detach(a) for a in args)
            self.kwargs = {k: _detach(v) for k, v in kwargs.items()}

    def remove(self) -> None:
        self._handle.remove()


def _detach(v: Any) -> Any:
    return v.detach().clone() if isinstance(v, torch.Tensor) else v


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


__all__ = ["FP8Blocks", "InputCapture", "fp8_view", "output_quality", "quantize_block_copies"]
