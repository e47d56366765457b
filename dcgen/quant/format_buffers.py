"""``_apply`` for the quantized linears' format buffers (FP8Linear, NVFP4Linear), and the
dtype they compute in (that of their other tensors).

``model.to(dtype)`` / ``.half()`` must not cast them: the uint8 / float8 weights and the fp32
scales are the format (float8 counts as floating point, so ``.to(bf16)`` would cast it). Every
other ``_apply`` (``to_empty``, ``share_memory``, a device move) must still reach them: moving
them with ``t.to(device)`` instead of ``fn`` copied out of a meta tensor under ``to_empty`` and
left them unshared under ``share_memory``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn


def _applied(t: torch.Tensor, fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """``fn(t)`` when ``fn`` keeps the dtype, else ``t`` moved to the device ``fn`` chose."""
    # fn on an empty probe of the same dtype says whether fn casts, without casting (and, for
    # a device move, copying) the whole weight only to throw the result away
    probe = fn(t.new_empty(0))
    if probe.dtype != t.dtype:
        return t.to(probe.device)  # the move, not the cast
    return fn(t)


def apply_keeping_format(
    module: nn.Module,
    names: Iterable[str],
    fn: Callable[[torch.Tensor], torch.Tensor],
    apply_rest: Callable[[], object],
) -> None:
    """Run ``apply_rest`` (``nn.Module._apply``) with the buffers ``names`` held aside, then
    apply ``fn`` to each of them, keeping its dtype. A failure (of ``apply_rest`` or of ``fn``)
    puts the original buffers back before it propagates: none is left None."""
    buffers = module._buffers
    keep = {n: buffers[n] for n in names if buffers.get(n) is not None}
    for n in keep:
        buffers[n] = None
    try:
        apply_rest()
        moved = {n: _applied(t, fn) for n, t in keep.items()}
    except BaseException:
        buffers.update(keep)
        raise
    buffers.update(moved)


def compute_dtype(module: nn.Module) -> torch.dtype:
    """The 16/32-bit dtype a quantized linear computes in: its bias's or NVFP4 low-rank
    factors' (``quantize_`` keeps the linear's own dtype there, and ``.to(dtype)`` casts them),
    else bf16 (the layers' default). Its weight's dtype is the format's (uint8 / float8)."""
    for name in ("bias", "lora_up"):
        t = getattr(module, name, None)
        if isinstance(t, torch.Tensor) and t.is_floating_point():
            return t.dtype
    return torch.bfloat16
