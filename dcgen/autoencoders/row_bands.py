"""Full-frame decode in less memory: big convolution outputs made one band of rows at a time.

Where a 4K decode's peak memory sits: the decoder's highest-resolution stages hold maps of
2.1 GB (f64c128: 2048^2 x 256, bf16) or 4.3 GB (SANA f32c32: 4096^2 x 128), and a ResBlock
``x + norm(conv2(act(conv1(x))))`` keeps three of them alive at once: its input x (for the
residual), conv1's output and conv2's output. An up block keeps its input, the full conv output
and the full depth-to-space result.

Inside the decoder (and the encoder) the block inputs are intermediates nobody else reads, so:

* a ResBlock makes conv2's output one band of rows at a time and adds each band (normalised,
  when the norm is an RMSNorm) into x in place: two maps plus a band instead of three maps;
* a shortcut up block runs its conv and depth-to-space + shortcut per band of input rows into a
  preallocated output: input + output + a band instead of input + two outputs;
* the decoder's head norm overwrites its input band by band instead of allocating a copy.

Every output pixel is computed from exactly the inputs of the full-frame pass (a band's conv
reads one halo row on each side; true image borders keep their zero padding), with the same
rounding points, so the result equals the unbanded fused path up to the convolution
algorithm's summation order. No FLOPs are added. This is different from banding.py's banded
decode, which runs the whole local tail per band and recomputes halos: here each layer still
sees the full frame, and only the transient buffers shrink.

When it applies: the blocks' fused inference path (fused.py), no autograd, inside
:func:`owned_activations` (set by the Encoder / Decoder forwards), on an input that is not a view
and a module without forward hooks (a hook could hold the input that gets overwritten), and
only for maps larger than the band size (``band_bytes``, default 256 MiB; ``DCGEN_DCAE_BAND_MB``
sets it, 0 turns banding off).
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

import torch
import torch.nn.functional as F
from torch import nn

from dcgen._hooks import watched

from .fused import can_modify_in_place

DEFAULT_BAND_BYTES = 256 * 2**20

# Context variables, not module globals: a decode in one thread must not let a block called
# directly in another thread overwrite its input.
_owned: ContextVar[bool] = ContextVar("dcgen_dcae_owned_activations", default=False)
# band_size()'s value; None: DCGEN_DCAE_BAND_MB or the default
_band_bytes_override: ContextVar[int | None] = ContextVar("dcgen_dcae_band_bytes", default=None)


def _env_band_bytes() -> int:
    raw = os.environ.get("DCGEN_DCAE_BAND_MB")
    if raw is None or raw.strip() == "":
        return DEFAULT_BAND_BYTES
    try:
        mb = float(raw)
    except ValueError:
        raise ValueError(
            f"DCGEN_DCAE_BAND_MB: expected a number of MiB (0 disables banding), got {raw!r}"
        ) from None
    if not (math.isfinite(mb) and mb >= 0) or mb * 2**20 > 2**62:
        raise ValueError(f"DCGEN_DCAE_BAND_MB: expected a finite number >= 0, got {raw!r}")
    return int(mb * 2**20)


def band_bytes() -> int:
    """The current band size in bytes (0: banding off)."""
    override = _band_bytes_override.get()
    return _env_band_bytes() if override is None else override


@contextmanager
def band_size(nbytes: int | None) -> Iterator[None]:
    """Use bands of about ``nbytes`` bytes (0 turns banding off; None restores the default)."""
    if nbytes is not None and (
        not isinstance(nbytes, int) or isinstance(nbytes, bool) or nbytes < 0
    ):
        raise ValueError(f"band_size: expected a byte count >= 0 or None, got {nbytes!r}")
    token = _band_bytes_override.set(nbytes)
    try:
        yield
    finally:
        _band_bytes_override.reset(token)


@contextmanager
def owned_activations(enabled: bool = True) -> Iterator[None]:
    """Declare that the block inputs passed while this is active belong to the caller's forward
    pass alone, so blocks may overwrite them (the Encoder / Decoder forwards set this)."""
    token = _owned.set(enabled)
    try:
        yield
    finally:
        _owned.reset(token)


def may_overwrite(module: nn.Module, x: torch.Tensor) -> bool:
    """Whether ``module`` may write its result into its input ``x`` (see the module doc)."""
    return (
        _owned.get()
        and can_modify_in_place()
        and x._base is None  # a view's storage belongs to someone else (banding.py's slices)
        and not x.requires_grad
        # a hook on the module or inside it (a conv of a ResBlock, say) is given x
        and not watched(module)
    )


def row_bands(x: torch.Tensor, row_bytes: int) -> list[tuple[int, int, int]] | None:
    """(sample, first row, end row) bands covering ``x`` (N, C, H, W), each about ``band_bytes()``
    when one row of one sample costs ``row_bytes``; None when x fits in one band (or banding is
    off), so the caller takes its unbanded path."""
    limit = band_bytes()
    n, height = x.shape[0], x.shape[2]
    if limit <= 0 or n * height * row_bytes <= limit:
        return None
    rows = max(1, limit // max(row_bytes, 1))
    return [(i, a, min(a + rows, height)) for i in range(n) for a in range(0, height, rows)]


def overwrite_bands(module: nn.Module, x: torch.Tensor) -> list[tuple[int, int, int]] | None:
    """The bands in which ``module`` may write its result into its own input ``x`` (same shape),
    or None when it may not (:func:`may_overwrite`) or x fits one band."""
    if not may_overwrite(module, x):
        return None
    return row_bands(x, x.shape[1] * x.shape[3] * x.element_size())


def conv3x3_rows(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, a: int, b: int
) -> torch.Tensor:
    """Rows [a, b) of ``conv2d(x, weight, bias, padding=1)`` (3x3, stride 1), reading only x's
    rows a - 1 .. b: an interior band takes its halo rows from x, a band at the image border
    gets the real zero padding there."""
    height = x.shape[2]
    lo, hi = max(a - 1, 0), min(b + 1, height)
    if lo == a - 1 and hi == b + 1:
        return F.conv2d(x[:, :, lo:hi], weight, bias, padding=(0, 1))
    # At a border: pad all round and drop the (at most two) rows next to an interior cut.
    y = F.conv2d(x[:, :, lo:hi], weight, bias, padding=1)
    return y[:, :, a - lo : b - lo]
