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
