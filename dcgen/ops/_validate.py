"""Input checks shared by the ops: every error names what was expected and what came."""

from __future__ import annotations

from collections.abc import Sequence

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_tensor(
    name: str,
    t: object,
    *,
    ndim: int | Sequence[int] | None = None,
    min_ndim: int | None = None,
    dtypes: Sequence[torch.dtype] | None = FLOAT_DTYPES,
) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if ndim is not None:
        allowed = (ndim,) if isinstance(ndim, int) else tuple(ndim)
        if t.ndim not in allowed:
            raise ValueError(
                f"{name}: expected a tensor with {' or '.join(map(str, allowed))} dims, "
                f"got shape {tuple(t.shape)}"
            )
    if min_ndim is not None and t.ndim < min_ndim:
        raise ValueError(f"{name}: expected at least {min_ndim} dims, got shape {tuple(t.shape)}")
    if dtypes is not None and t.dtype not in dtypes:
        raise TypeError(f"{name}: expected dtype in {[str(d) for d in dtypes]}, got {t.dtype}")
    return t


def dense_layout(x: torch.Tensor) -> bool:
    """Dense in one of the two layouts the elementwise DC-AE kernels walk: NCHW-contiguous, or
    channels_last for a 4-d tensor."""
    return x.is_contiguous() or (
        x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last)
    )


def kernel_layout(x: torch.Tensor) -> torch.memory_format:
    """The layout the DC-AE kernels give their outputs for input ``x``: channels_last (3d for a
    5-d x) when x is, and is not also NCHW-contiguous (1-channel or 1x1 maps are both), else
    NCHW. The fakes and the Python callers that allocate outputs for the kernels follow it."""
    if x.ndim in (4, 5) and not x.is_contiguous():
        fmt = torch.channels_last if x.ndim == 4 else torch.channels_last_3d
        if x.is_contiguous(memory_format=fmt):
            return fmt
    return torch.contiguous_format


def rms_norm_layout(x: torch.Tensor) -> torch.memory_format:
    """The channel RMSNorm kernels' output layout (csrc/dcae/channel_rms_norm.h), wider than
    kernel_layout's: a strided channels_last view (a band of rows of an NHWC batch, every
    other image) is one too when torch's suggest_memory_format says so, since the kernel copies
    it into dense NHWC rather than round-trip through NCHW."""
    from torch._prims_common import suggest_memory_format

    if x.ndim in (4, 5) and not x.is_contiguous():
        fmt = torch.channels_last if x.ndim == 4 else torch.channels_last_3d
        if x.is_contiguous(memory_format=fmt) or suggest_memory_format(x) == fmt:
            return fmt
    return torch.contiguous_format


def dense_as(t: torch.Tensor, like: torch.Tensor) -> bool:
    """Same shape as ``like`` and the same strides on every dimension longer than 1: the rule
    the elementwise DC-AE kernels apply to the tensors they write (a band of rows of an NHWC
    image qualifies; the batch stride no element's address uses may differ)."""
    return t.shape == like.shape and all(
        n == 1 or a == b for n, a, b in zip(like.shape, t.stride(), like.stride(), strict=True)
    )


def check_same_device(**tensors: torch.Tensor | None) -> None:
    devices = {k: v.device for k, v in tensors.items() if v is not None}
    if len(set(devices.values())) > 1:
        desc = ", ".join(f"{k} on {d}" for k, d in devices.items())
        raise ValueError(f"expected all tensors on one device, got {desc}")


def check_channel_param(name: str, p: torch.Tensor | None, channels: int) -> None:
    if p is None:
        return
    check_tensor(name, p, ndim=1, dtypes=(*FLOAT_DTYPES, torch.float64))
    if p.shape[0] != channels:
        raise ValueError(
            f"{name}: expected shape ({channels},) to match the input's {channels} channels, "
            f"got {tuple(p.shape)}"
        )
