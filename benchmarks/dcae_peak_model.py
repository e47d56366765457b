"""Peak activation memory of a DC-AE decode, predicted on any machine (no GPU, no weights).

The decoder runs on the meta device (shapes only, nothing is computed) with the fused inference
path that CUDA takes, bf16 and channels_last, while a dispatch mode adds up the bytes of every
tensor the decode allocates and subtracts them when the tensor is freed. The fused ops are
replaced by one allocation of their output's shape, as their CUDA kernels allocate; inside-op
scratch (cuDNN workspaces) and allocator fragmentation are not counted.

Checked against the H100 (2026-11-27, ``benchmarks/test_dcae_fused.py``, peak allocation above
the weights, bf16, fused path, before row bands): measured 7.51 GB for f64c128 and 15.2 GB for
SANA f32c32 at 4096^2; this model gives 7.57 and 15.21 GB for that code. So at 4K the peak is
the activations themselves, and a change of the decode's memory plan can be judged here.

    python benchmarks/dcae_peak_model.py [--size 4096] [--band-mb 0,256]
"""

from __future__ import annotations

import argparse
import contextlib
import weakref
from collections.abc import Iterator

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import dcgen.autoencoders.blocks as blocks_mod
import dcgen.autoencoders.fused as fused_mod
import dcgen.autoencoders.norms as norms_mod
from dcgen.autoencoders import DCAE
from dcgen.autoencoders.config import get_preset
from dcgen.autoencoders.fused import fused_inference
from dcgen.autoencoders.row_bands import band_size

PRESETS = ["dc-ae-f64c128-in-1.0", "dc-ae-f32c32-sana-1.1"]


class LiveBytes(TorchDispatchMode):
    """Bytes of the storages that ops created and that are still alive, and their peak."""

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self.peak_op = ""
        self._sizes: dict[int, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor):
                continue
            storage = t.untyped_storage()
            key = storage._cdata
            if key in self._sizes:  # an in-place op or a view: nothing new
                continue
            self._sizes[key] = storage.nbytes()
            self.live += storage.nbytes()
            if self.live > self.peak:
                self.peak, self.peak_op = self.live, str(func)
            weakref.finalize(storage, self._free, key)
        return out

    def _free(self, key: int) -> None:
        self.live -= self._sizes.pop(key)


def _like(shape: tuple[int, ...], ref: torch.Tensor) -> torch.Tensor:
    last = ref.dim() == 4 and ref.is_contiguous(memory_format=torch.channels_last)
    fmt = torch.channels_last if last and not ref.is_contiguous() else torch.contiguous_format
    return torch.empty(shape, dtype=ref.dtype, device=ref.device, memory_format=fmt)


def _up(y: torch.Tensor, x: torch.Tensor, shuffle: bool = True) -> torch.Tensor:
    b, c, h, w = y.shape
    return _like((b, c // 4, 2 * h, 2 * w) if shuffle else (b, c, h, w), y)


def _down(y: torch.Tensor, x: torch.Tensor, unshuffle: bool = True) -> torch.Tensor:
    b, c, h, w = y.shape
    return _like((b, 4 * c, h // 2, w // 2) if unshuffle else (b, c, h, w), y)


def _norm(x: torch.Tensor, *args, **kwargs) -> torch.Tensor:  # noqa: ANN002, ANN003
    return _like(tuple(x.shape), x)


def _glu(x: torch.Tensor, *args, **kwargs) -> torch.Tensor:  # noqa: ANN002, ANN003
    b, c, h, w = x.shape
    return _like((b, c // 2, h, w), x)


def _linear_attention(qkv: torch.Tensor, eps: float) -> torch.Tensor:
    b, heads, c3, n = qkv.shape
    return torch.empty((b, heads, c3 // 3, n), dtype=qkv.dtype, device=qkv.device)


@contextlib.contextmanager
def _kernel_like_ops() -> Iterator[None]:
    """The fused ops as one output allocation each; fused path on for meta tensors."""
    patches = [
        (blocks_mod, "up_block_shortcut", _up),
        (blocks_mod, "down_block_shortcut", _down),
        (blocks_mod, "glu_depthwise_conv", _glu),
        (blocks_mod, "relu_linear_attention", _linear_attention),
        (norms_mod, "channel_rms_norm_fused", _norm),
        (fused_mod, "_autocasting", lambda x: False),  # meta has no autocast state
    ]
    saved = [(m, name, getattr(m, name)) for m, name, _ in patches]
    for m, name, fn in patches:
        setattr(m, name, fn)
    try:
        with fused_inference(True):
            yield
    finally:
        for m, name, fn in saved:
            setattr(m, name, fn)


def predicted_decode_peak(
    preset: str, size: int, band_mb: float | None = None, batch: int = 1
) -> dict[str, object]:
    """Peak live activation bytes of decoding one ``size`` x ``size`` image batch with the CUDA
    fused path (bf16, channels_last); ``band_mb``: row-band size (0 off, None the default)."""
    cfg = get_preset(preset)
    f = cfg.spatial_compression_ratio
    if size % f:
        raise ValueError(f"size: expected a multiple of {f} for {preset}, got {size}")
    with torch.device("meta"):
        model = DCAE(cfg).to(torch.bfloat16).eval()
    model.set_memory_format("channels_last")
    z = torch.empty(batch, cfg.latent_channels, size // f, size // f, device="meta")
    z = z.to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
    nbytes = None if band_mb is None else int(band_mb * 2**20)
    mode = LiveBytes()
    with torch.inference_mode(), _kernel_like_ops(), band_size(nbytes), mode:
        out = model.decoder(z)
    return {
        "preset": preset,
        "size": size,
        "band_mb": band_mb,
        "peak_bytes": mode.peak,
        "peak_op": mode.peak_op,
        "out_shape": tuple(out.shape),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=int, default=4096)
    ap.add_argument("--band-mb", default="0,256", help="comma list; 0 = no row bands")
    ap.add_argument("--presets", default=",".join(PRESETS))
    args = ap.parse_args()
    print(f"| preset | {args.size} px, row bands | predicted peak activations |")
    print("|---|---|---|")
    for preset in args.presets.split(","):
        for band in args.band_mb.split(","):
            r = predicted_decode_peak(preset, args.size, float(band))
            label = "off" if float(band) == 0 else f"{band} MiB"
            print(f"| {preset} | {label} | {r['peak_bytes'] / 1e9:.2f} GB |")


if __name__ == "__main__":
    main()
