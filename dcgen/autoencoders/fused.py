"""When the DC-AE blocks take their fused inference path.

The fused path replaces chains of PyTorch ops with one dcgen op each (norm + residual, norm +
activation, depthwise 3x3 + SiLU gate, up/down main path + shortcut) and adds in place where
nothing else reads the tensor. It computes the same function (the ops' references are the
unfused math in fp32, rounded once), so it only pays off where the ops have kernels:

* automatic (default): fused when no gradient is being recorded and the input is on CUDA with
  the op's compiled kernel (``DCGEN_DISABLE_KERNELS=1`` turns it off). Training keeps the
  plain PyTorch path untouched, and so does autocast (mixed dtypes the fused ops do not take).
* :func:`fused_inference` forces it on or off, e.g. to check on a CPU that the fused path
  (running the ops' references) equals the plain one. The setting is a context variable: it
  holds for the thread (or asyncio task) that entered the context, not for a decode that
  another thread runs at the same time.
* :func:`hooks_watching` (set by the Encoder / Decoder around a layer with a forward hook on it
  or inside it): the plain path, nothing in place, so every hook sees its module's own call and
  keeps the tensors it was given.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

import torch

from dcgen.ops import has_kernel

_forced: ContextVar[bool | None] = ContextVar("dcgen_fused_inference", default=None)
_watched: ContextVar[bool] = ContextVar("dcgen_hooks_watching", default=False)


@contextmanager
def fused_inference(enabled: bool | None = True) -> Iterator[None]:
    """Force the blocks' fused path on (True) or off (False); None restores the automatic rule."""
    if enabled is not None and not isinstance(enabled, bool):
        # a string was truthy: fused_inference("false") forced the fused path on
        raise TypeError(f"fused_inference: expected True, False or None, got {enabled!r}")
    token = _forced.set(enabled)
    try:
        yield
    finally:
        _forced.reset(token)


@contextmanager
def hooks_watching(enabled: bool = True) -> Iterator[None]:
    """Run what is inside on the plain path with nothing in place (enabled), because forward
    hooks watch a module in it: a fused op would skip a hooked module's call, and an in-place
    op would change a tensor a hook kept."""
    token = _watched.set(enabled)
    try:
        yield
    finally:
        _watched.reset(token)


def use_fused(x: torch.Tensor, op: str) -> bool:
    """Whether a block should call the fused dcgen op ``op`` for input ``x``."""
    if _watched.get():
        return False
    forced = _forced.get()
    if forced is not None:
        return forced and not _autocasting(x)
    return (
        not torch.is_grad_enabled()
        and x.device.type == "cuda"
        and not _autocasting(x)
        and has_kernel(op, x.device)
    )


def _autocasting(x: torch.Tensor) -> bool:
    """Under autocast an fp32 model's convs return 16-bit outputs while its residuals stay
    fp32; the fused ops take one dtype, the plain path promotes. So autocast runs plain."""
    return torch.is_autocast_enabled(x.device.type)


def can_modify_in_place() -> bool:
    """In-place adds on fresh intermediates are safe only when autograd records nothing and no
    hook may hold one of them (:func:`hooks_watching`)."""
    return not torch.is_grad_enabled() and not _watched.get()
