"""Linear layers that write where the caller wants them: GELU in the GEMM's epilogue, and the
GEMM's output written straight into part of a larger buffer (cuBLAS with ``out=``), so that the
buffer a fused DiT block reads next is assembled without a ``torch.cat`` pass over it.

Direct writes need a plain nn.Linear with a bias in the input's dtype, no forward hooks (they
would be skipped) and no autocast, or an FP8Linear without hooks on its direct route (its scale
epilogue writes the result: FP8Linear.forward_into); every other layer (LoRA wrappers, hooked
layers) is called as usual and its result copied into place, which costs what the
concatenation did.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from dcgen._hooks import has_forward_hooks
from dcgen.quant.fp8_linear import FP8Linear


def _writes_directly(proj: nn.Module, x: torch.Tensor, out: torch.Tensor) -> bool:
    return (
        type(proj) is nn.Linear
        and proj.bias is not None
        and out.dtype == x.dtype == proj.weight.dtype
        and not has_forward_hooks(proj)
        and not torch.is_autocast_enabled(x.device.type)
    )


def _rows(out: torch.Tensor, n: int) -> torch.Tensor | None:
    """``out`` ([..., N]) as the 2-D [rows, N] view cuBLAS writes, or None when its rows are not
    one stride apart (a batch of row blocks inside a longer sequence, say)."""
    try:
        return out.view(-1, n)
    except RuntimeError:
        return None


def linear_gelu(proj: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``gelu_tanh(proj(x))`` with the GELU in the GEMM's epilogue where ``proj`` allows it.
    Not under a forward hook: the nn.Linear form skips proj's call and the FP8 form returns
    the activated output, so a hook (quant.quality_report's) would miss or misread the layer."""
    if not torch.is_grad_enabled():
        # (each branch checks proj's hooks once: _writes_directly for the nn.Linear form)
        if x.is_cuda and _writes_directly(proj, x, x):  # same dtypes, no autocast, no hooks
            y = torch._addmm_activation(
                proj.bias, x.reshape(-1, x.shape[-1]), proj.weight.t(), use_gelu=True
            )
            return y.reshape(*x.shape[:-1], proj.out_features)
        if type(proj) is FP8Linear and not has_forward_hooks(proj):
            return proj(x, act="gelu_tanh")
    return F.gelu(proj(x), approximate="tanh")


def linear_gelu_into(proj: nn.Module, x: torch.Tensor, out: torch.Tensor) -> None:
    """:func:`linear_gelu` written into ``out`` (a [..., N] view, e.g. part of a wider buffer;
    inference only). A 16-bit nn.Linear with a bias on CUDA has cuBLAS write there directly
    (on CUDA only: the CPU's fused GELU epilogue rounds differently from gelu(linear)), an
    FP8Linear its scale epilogue (``forward_into``), any other layer a copy of
    :func:`linear_gelu`'s result."""
    if x.is_cuda and _writes_directly(proj, x, out):
        rows = _rows(out, proj.out_features)
        if rows is not None:
            torch._addmm_activation(
                proj.bias, x.reshape(-1, x.shape[-1]), proj.weight.t(), use_gelu=True, out=rows
            )
            return
    if type(proj) is FP8Linear and not has_forward_hooks(proj):
        proj.forward_into(x, out, act="gelu_tanh")  # its scale epilogue writes there
        return
    out.copy_(linear_gelu(proj, x))


def splits_over_parts(proj: nn.Module, x: torch.Tensor) -> bool:
    """Whether :func:`linear_of_parts` may run ``proj``: inference, a plain nn.Linear with a bias
    in ``x``'s dtype, no forward hooks, no autocast, and not fp16 (a partial sum past fp16's
    range would become inf where the whole sum fits)."""
    return not torch.is_grad_enabled() and x.dtype != torch.float16 and _writes_directly(proj, x, x)


def linear_of_parts(proj: nn.Linear, parts: Sequence[torch.Tensor]) -> torch.Tensor:
    """``proj(torch.cat(parts, dim=-1))`` as one GEMM per part, each adding its product into the
    output (cuBLAS's beta = 1), so the concatenated input is never written (check
    :func:`splits_over_parts` first).

    Why: a FLUX single block's proj_out reads [attention | MLP]. Assembling that buffer means
    writing both halves into column blocks of a wider tensor, and on CUDA a GEMM cannot fuse
    its GELU into a strided output (PyTorch's _addmm_activation then runs the plain GEMM and a
    separate, non-vectorized gelu_ over the MLP half: about 0.17 ms a block at 4K on the H200,
    session 18's step profile). Here the MLP half keeps cuBLAS's fused bias + GELU. Numerics: the
    output dtype rounds once per part instead of once (one more bf16 rounding of a partial sum).
    """
    widths = [p.shape[-1] for p in parts]
    if sum(widths) != proj.in_features:
        raise ValueError(
            f"linear_of_parts: expected parts whose widths sum to in_features={proj.in_features}, "
            f"got {widths}"
        )
    out = None
    start = 0
    for part, width in zip(parts, widths):
        w = proj.weight[:, start : start + width].t()  # a transposed view: cuBLAS takes it as is
        rows = part.reshape(-1, width)
        if out is None:
            out = torch.addmm(proj.bias, rows, w)
        else:
            out.addmm_(rows, w)
        start += width
    return out.reshape(*parts[0].shape[:-1], proj.out_features)


def linear_into(proj: nn.Module, x: torch.Tensor, out: torch.Tensor) -> None:
    """``out[...] = proj(x)`` for ``out`` a [..., N] view of a larger buffer (inference only):
    written there by the GEMM itself where it can (module doc; ``torch.addmm(out=)`` gives the
    bits of ``F.linear``, on CPU too) or by an FP8Linear's scale epilogue, else a copy of
    ``proj(x)``."""
    if _writes_directly(proj, x, out):
        rows = _rows(out, proj.out_features)
        if rows is not None:
            torch.addmm(proj.bias, x.reshape(-1, x.shape[-1]), proj.weight.t(), out=rows)
            return
    if type(proj) is FP8Linear and not has_forward_hooks(proj):
        proj.forward_into(x, out)  # its scale epilogue writes there
        return
    out.copy_(proj(x))
