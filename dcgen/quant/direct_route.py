"""The gate of the quantized linears' direct inference routes (FP8Linear, NVFP4Linear).

A direct route calls a layer's kernels without the per-call checks and path decisions of the
general path, which cost more host time than a fast GPU spends on the GEMM (each layer's
module doc has the numbers). The decision is made once per layer and per key (device, dtype,
bias dtype, the environment variables that steer the kernels, whatever else the layer adds)
and cached on the layer; a layer drops it in ``_apply`` (a device move).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch import nn

from dcgen.ops._extension import environment


def takes_direct_route(
    layer: nn.Module,
    x: torch.Tensor,
    in_features: int,
    bias: torch.Tensor | None,
    key: tuple,
    env: tuple[str, ...],
    decide: Callable[[], bool],
) -> bool:
    """Whether this call of ``layer`` on ``x`` takes its direct route: inference (no gradient
    wanted for ``x`` or the bias) on a plain, non-empty tensor of width ``in_features``, not
    while compiling, and ``decide()`` (called again only when the key changes) said yes."""
    if type(x) is not torch.Tensor or torch.compiler.is_compiling():
        return False
    if torch.is_grad_enabled() and (x.requires_grad or (bias is not None and bias.requires_grad)):
        return False
    if x.ndim == 0 or x.shape[-1] != in_features or x.numel() == 0:
        return False
    full_key = (x.device, x.dtype, None if bias is None else bias.dtype, *key, *environment(env))
    route = layer.__dict__.get("_route")
    if route is None or route[0] != full_key:
        route = layer.__dict__["_route"] = (full_key, bool(decide()))
    return route[1]


@functools.cache
def direct_ops(*names: str) -> tuple:
    """The ``dcgen::<name>.default`` OpOverloads a direct route calls, looked up once (callers
    ask only after their route check found the kernels, so dcgen._C is loaded)."""
    return tuple(getattr(torch.ops.dcgen, name).default for name in names)
