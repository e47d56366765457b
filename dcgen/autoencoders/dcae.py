"""DCAE: one module for every DC-AE configuration (1.0 SANA / in / mix, Lite, 1.5).

Numerically equivalent to diffusers' ``AutoencoderDC`` (same config, same outputs); reads and
writes diffusers-format folders and reads original mit-han-lab checkpoints.

Latent scaling convention (the ONE place it happens, ``_scale_latents``/``_unscale_latents``):
``encode(x)`` returns raw latents and ``decode(z)`` takes raw latents, exactly like diffusers'
``ae.encode(x).latent`` / ``ae.decode(z).sample``. Pass ``scaled=True`` to work in the
diffusion model's space instead: ``encode(x, scaled=True)`` returns ``latents * scaling_factor``
and ``decode(z, scaled=True)`` decodes ``z / scaling_factor`` (what diffusers pipelines do with
``ae.decode(latents / scaling_factor)``).

Tiled encode/decode (``tile_size`` / ``tile_overlap`` in pixels, multiples of the compression
factor f) runs one tile at a time and blends overlaps linearly, so peak activation memory is
bounded by the tile size. It is not bit-identical to a full pass: the EfficientViT blocks'
linear attention is global over whatever map it sees, and convolutions see zero padding at
tile borders. Measured with random weights (fp32, CPU, N(0,1) image; error = tiled - full,
relative RMS = RMS(error) / RMS(full output)):

* reduced ``dc-ae-f32c32-in-1.0`` (widths / 16, head dim 2), 512x512 image, tile 256 px,
  overlap 64 px: encode max abs 2.8, relative RMS 0.29; decode max abs 0.74 (outputs up to
  ~2), relative RMS 0.25. diffusers' own tiling of the same weights and tiles: 0.45 / 0.30.
  Tile 384 / overlap 128: 0.19 / 0.18. (tests/autoencoders/test_dcae_tiling.py checks < 0.4
  and no worse than diffusers.)
* full-width ``dc-ae-f32c32-sana-1.0``, 256x256 image (8x8 latents), tile 128 / overlap 64:
  encode max abs 3.6 (latents up to 13), relative RMS 0.28; decode max abs 0.46 (outputs up
  to 1.6), relative RMS 0.18. At 128x128 with tile 64 / overlap 32 (2x2-latent tiles, a worst
  case): relative RMS 0.60 (encode) / 0.41 (decode).

Random weights are not trained to be local, so these numbers are pessimistic; a trained
model's tiled error is expected to be much smaller but is not measured here (no pretrained
weights offline). Prefer tiles of
>= 512 px with >= 64 px overlap.

Banded decode (``band_rows``, :meth:`DCAE.enable_banded_decode`, banding.py) is the exact
alternative for memory: the global (attention) stages see the whole latent, and only the local
high-resolution tail runs band by band with halo rows, so the output equals the full-frame
decode (bit for bit on the CPU tests; up to convolution algorithm choice elsewhere).

Memory format (:meth:`DCAE.set_memory_format`): on CUDA the convolutions run channels_last
(NHWC) by default. cuDNN's tensor-core convolution kernels work in NHWC, so bf16 / fp16 convs on
NCHW tensors pay layout transposes around each call; the whole DC-AE decode is convolution
bound, so this is its largest single lever. Every fused dcgen op keeps its input's layout, the
weights are converted once, and encode / decode still return NCHW-contiguous tensors.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from .._checks import is_int
from .._files import atomic_write
from . import checkpoint as ckpt
from .banding import check_band_rows
from .config import DCAEConfig, find_preset, get_preset
from .norms import BatchNorm2dFP32
from .tiling import tiled_apply

logger = logging.getLogger(__name__)

ConfigLike = str | DCAEConfig | Mapping[str, Any]
MEMORY_FORMATS = ("auto", "channels_last", "contiguous")


def _clear_caches_after_load(module: nn.Module, incompatible_keys: object) -> None:
    module.clear_caches()  # new weights: nothing derived from the old ones may survive


def _resolve_config(spec: ConfigLike) -> DCAEConfig:
    if isinstance(spec, DCAEConfig):
        return dataclasses.replace(spec)
    if isinstance(spec, str):
        return get_preset(spec)
    if isinstance(spec, Mapping):
        return DCAEConfig.from_dict(spec)
    raise TypeError(
        f"expected a preset name, a DCAEConfig or a config dict, got {type(spec).__name__}"
    )


def _diffusers_version() -> str:
    try:
        import diffusers

        return str(diffusers.__version__)
    except ImportError:  # diffusers is optional; any recent version string loads
        return "0.32.0"


class DCAE(nn.Module):
    """DC-AE autoencoder. ``DCAE(config)``, ``DCAE.from_config("dc-ae-f32c32-sana-1.0")`` or
    ``DCAE.from_pretrained(folder)``; then ``encode`` / ``decode``."""

    def __init__(self, config: DCAEConfig) -> None:
        super().__init__()
        if not isinstance(config, DCAEConfig):
            raise TypeError(
                f"DCAE(config): expected a DCAEConfig, got {type(config).__name__}; use "
                "DCAE.from_config for preset names and dicts"
            )
        from .coders import Decoder, Encoder

        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self._bn_folded = False
        self._slice_batch_size: int | None = None
        self._tile_size: int | None = None
        self._tile_overlap: int = 0
        self._band_rows: int | None = None
        self._memory_format = "auto"
        self.register_load_state_dict_post_hook(_clear_caches_after_load)

    # -- construction / IO -------------------------------------------------------------------

    @classmethod
    def from_config(cls, config: ConfigLike) -> DCAE:
        """Random-weight model from a preset name, DCAEConfig or config.json-style dict."""
        return cls(_resolve_config(config))

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        dtype: torch.dtype | Literal["auto"] | None = None,
        device: str | torch.device | None = None,
        variant: str | None = None,
        config: ConfigLike | None = None,
    ) -> DCAE:
        """Load a diffusers-format folder (config.json + diffusion_pytorch_model[.variant]
        .safetensors, sharded or not, or the .bin files of a safe_serialization=False save) or
        an original mit-han-lab checkpoint (folder with model.safetensors / .pt, or the file
        itself).

        The config comes from ``config`` (preset name, DCAEConfig or dict) if given, else from
        config.json next to the weights (diffusers fields, or an original ``model_name``), else
        from a preset whose name matches the folder / file name. Key checking is strict:
        missing, unexpected and wrongly shaped tensors are all listed by name. ``dtype``
        defaults to float32 (like diffusers); ``"auto"`` keeps the dtype the checkpoint stores
        (its floating weights' most common one), so nothing is cast or copied; ``device``
        defaults to CPU.
        """
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"DCAE.from_pretrained: {path} does not exist")
        weights_file = cls._find_weights(path, variant)
        cfg = cls._find_config(path, weights_file, config)
        state = ckpt.read_weights(weights_file)
        converted, layout = ckpt.to_dcgen(state, cfg)
        del state
        with torch.device("meta"):
            model = cls(cfg)
        ckpt.check_state_dict(model.state_dict(), converted, source=f"{weights_file} ({layout})")
        model.load_state_dict(converted, strict=True, assign=True)
        if dtype == "auto":
            dtype = ckpt.stored_dtype(converted)
        elif dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise TypeError(f"DCAE.from_pretrained: dtype: expected a floating torch.dtype, "
                            f"'auto' or None, got {dtype!r}")  # fmt: skip
        # The model holds the tensors now: without the dict's references each one is freed as
        # soon as .to() has cast it (with them, both copies lived until the end).
        del converted
        model.to(dtype=dtype or torch.float32, device=device)
        logger.info("loaded DC-AE %s weights from %s", layout, weights_file)
        return model.eval()

    @staticmethod
    def _find_weights(path: Path, variant: str | None) -> Path:
        if path.is_file():
            return path
        names = ckpt.diffusers_weight_names(variant)
        if variant is None:
            names += list(ckpt.ORIGINAL_WEIGHT_NAMES)
        for name in names:
            if (path / name).is_file():
                return path / name
        present = sorted(p.name for p in path.iterdir())
        raise ckpt.CheckpointError(
            f"no DC-AE weights in {path}: expected one of {names}"
            + (f" for variant={variant!r}" if variant else "")
            + f", found {present}"
        )

    @staticmethod
    def _find_config(path: Path, weights_file: Path, config: ConfigLike | None) -> DCAEConfig:
        if config is not None:
            return _resolve_config(config)
        folder = path if path.is_dir() else path.parent
        cfg_file = folder / ckpt.CONFIG_NAME
        if cfg_file.is_file():
            data = ckpt.read_config_json(cfg_file)
            if "model_name" in data and "_class_name" not in data:
                # efficientvit's DCAE_HF hub folders store only the model name.
                return get_preset(str(data["model_name"]))
            return DCAEConfig.from_dict(data)
        for candidate in (weights_file.stem, folder.name):
            name = find_preset(candidate)
            if name is not None:
                logger.info("no config.json next to %s; using preset %s", weights_file, name)
                return get_preset(name)
        raise ckpt.CheckpointError(
            f"no config.json in {folder} and its name does not match a preset; pass "
            "config=<preset name or DCAEConfig>"
        )

    def save_pretrained(
        self, path: str | Path, variant: str | None = None, dtype: torch.dtype | None = None
    ) -> None:
        """Write a diffusers-format folder (config.json with ``_class_name: AutoencoderDC`` and
        diffusion_pytorch_model[.variant].safetensors), each file written atomically."""
        from safetensors.torch import save_file

        if self._bn_folded:
            raise ValueError(
                "save_pretrained: this model's BatchNorms were folded (fold_batchnorm), which "
                "diffusers cannot load; save the model before folding"
            )
        if dtype is not None and not dtype.is_floating_point:
            raise TypeError(f"save_pretrained: expected a floating dtype, got {dtype}")
        path = Path(path)
        # BatchNorm statistics stay fp32 in a 16-bit file too (a running variance past fp16's
        # 65,504 would be stored as inf): the model keeps them fp32 (BatchNorm2dFP32)
        keep = {
            ckpt.diffusers_key(f"{name}.{key}")
            for name, module in self.named_modules()
            if isinstance(module, BatchNorm2dFP32)
            for key in module.state_dict()
        }
        state = {}
        for key, value in ckpt.dcgen_to_diffusers(self.state_dict()).items():
            value = value.detach()
            if dtype is not None and value.is_floating_point() and key not in keep:
                value = value.to(dtype)
            state[key] = value.cpu().contiguous()
        cfg = {"_class_name": "AutoencoderDC", "_diffusers_version": _diffusers_version()}
        cfg.update(self.config.to_dict())
        weights = path / ckpt.weights_name(variant)
        atomic_write(weights, lambda tmp: save_file(state, tmp, metadata={"format": "pt"}))
        text = json.dumps(cfg, indent=2, sort_keys=True) + "\n"
        atomic_write(path / ckpt.CONFIG_NAME, lambda tmp: Path(tmp).write_text(text))
        ckpt.remove_stale_shards(path, variant, keep=weights)
        logger.info("saved DC-AE (diffusers format) to %s", path)

    # -- properties -----------------------------------------------------------------------------

    @property
    def spatial_compression_ratio(self) -> int:
        return self.config.spatial_compression_ratio

    @property
    def latent_channels(self) -> int:
        return self.config.latent_channels

    @property
    def scaling_factor(self) -> float:
        return self.config.scaling_factor

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    # -- options ----------------------------------------------------------------------------------

    def enable_slicing(self, batch_size: int = 1) -> None:
        """Encode / decode at most ``batch_size`` samples at a time (same outputs, less memory)."""
        self._slice_batch_size = self._check_batch_size(batch_size)

    def disable_slicing(self) -> None:
        self._slice_batch_size = None

    def enable_tiling(self, tile_size: int = 512, tile_overlap: int = 64) -> None:
        """Default tiling for encode/decode of images larger than ``tile_size`` pixels."""
        self._check_tiling(tile_size, tile_overlap)
        self._tile_size, self._tile_overlap = tile_size, tile_overlap

    def disable_tiling(self) -> None:
        self._tile_size, self._tile_overlap = None, 0

    def enable_banded_decode(self, band_rows: int = 512) -> None:
        """Decode the local high-resolution tail ``band_rows`` output rows at a time (banding.py:
        the full-frame result up to convolution summation order, at a fraction of the peak
        activation memory; each band recomputes a few halo rows)."""
        self._band_rows = check_band_rows(band_rows)

    def disable_banded_decode(self) -> None:
        self._band_rows = None

    def set_memory_format(self, memory_format: str = "auto") -> None:
        """Layout the convolutions run in: ``"channels_last"`` (NHWC), ``"contiguous"`` (NCHW)
        or ``"auto"`` (the default: channels_last for CUDA inputs, NCHW elsewhere, where the CPU
        results stay those of the plain NCHW model). Outputs are NCHW-contiguous either way."""
        if memory_format not in MEMORY_FORMATS:
            raise ValueError(
                f"memory_format: expected one of {MEMORY_FORMATS}, got {memory_format!r}"
            )
        self._memory_format = memory_format
        self.clear_caches()
        self._weights_to(self._layout_for(self.device))  # now, not inside the next timed call

    @property
    def memory_format(self) -> str:
        return self._memory_format

    def _layout_for(self, device: torch.device) -> torch.memory_format:
        fmt = self._memory_format
        if fmt == "auto":
            fmt = "channels_last" if device.type == "cuda" else "contiguous"
        return torch.channels_last if fmt == "channels_last" else torch.contiguous_format

    def _weights_to(self, layout: torch.memory_format) -> None:
        """Put every conv weight in ``layout`` (once; a no-op when they already are)."""
        weights = [p for p in self.parameters() if p.dim() == 4]
        if all(p.is_contiguous(memory_format=layout) for p in weights):
            return
        # Outside inference mode, so that parameters converted during an inference_mode decode
        # stay ordinary tensors that training can still use.
        with torch.inference_mode(False), torch.no_grad():
            for p in weights:
                p.data = p.data.contiguous(memory_format=layout)

    def clear_caches(self) -> None:
        """Drop the weights the fused CUDA path derives and caches (BatchNorm folded into its
        conv, the sub-pixel form of interpolate up-convs). They follow the weights by storage
        and version counter; ``.to()``, ``load_state_dict`` and :meth:`set_memory_format` clear
        them too. Call this after writing weights through ``.data`` (``p.data.copy_``, a LoRA
        merge's ``weight.data += delta``): such writes bypass the version counter."""
        for m in self.modules():
            if m is not self and hasattr(m, "clear_fused_cache"):
                m.clear_fused_cache()

    def _apply(self, fn, recurse=True):  # noqa: ANN001, ANN202
        # Caches are plain attributes that .to() / .half() would neither move nor cast: drop
        # them (their old-device memory included).
        self.clear_caches()
        return super()._apply(fn, recurse)

    @torch.no_grad()
    def fold_batchnorm(self) -> DCAE:
        """Fold every BatchNorm into the conv before it (inference only: uses the running
        statistics). Outputs stay equal within fp32 rounding; the model can no longer be saved
        in diffusers format."""
        # Blocks that can hold a BatchNorm (ResBlock, LiteMLA) know how to fold it.
        blocks = [m for m in self.modules() if m is not self and hasattr(m, "fold_batchnorm")]
        folded = sum(bool(block.fold_batchnorm()) for block in blocks)
        self._bn_folded = self._bn_folded or folded > 0
        logger.info("folded %d BatchNorm layers into their convolutions", folded)
        return self

    # -- checks --------------------------------------------------------------------------------

    @staticmethod
    def _check_batch_size(batch_size: int | None) -> int | None:
        if batch_size is not None and (
            isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1
        ):
            raise ValueError(f"batch_size: expected a positive int or None, got {batch_size!r}")
        return batch_size

    def _check_tiling(self, tile_size: int, tile_overlap: int) -> None:
        f = self.spatial_compression_ratio
        if not isinstance(tile_size, int) or tile_size < f or tile_size % f:
            raise ValueError(
                f"tile_size: expected a positive multiple of the compression factor {f}, "
                f"got {tile_size!r}"
            )
        if not isinstance(tile_overlap, int) or tile_overlap < 0 or tile_overlap % f:
            raise ValueError(
                f"tile_overlap: expected a non-negative multiple of {f}, got {tile_overlap!r}"
            )
        if tile_overlap >= tile_size:
            raise ValueError(
                f"tile_overlap ({tile_overlap}) must be smaller than tile_size ({tile_size})"
            )

    def _check_tensor(self, t: object, what: str) -> torch.Tensor:
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"DCAE.{what}: expected a torch.Tensor, got {type(t).__name__}")
        if t.ndim != 4:
            raise ValueError(
                f"DCAE.{what}: expected a 4-D (batch, channels, height, width) tensor, got shape "
                f"{tuple(t.shape)}"
            )
        if t.dtype != self.dtype:
            raise TypeError(
                f"DCAE.{what}: input dtype {t.dtype} does not match the model dtype {self.dtype}; "
                f"cast the input with .to({self.dtype}) or the model with .to(dtype)"
            )
        if t.device != self.device:
            raise ValueError(
                f"DCAE.{what}: input is on {t.device} but the model is on {self.device}"
            )
        if t.shape[0] == 0 or t.shape[2] == 0 or t.shape[3] == 0:
            raise ValueError(f"DCAE.{what}: got an empty tensor of shape {tuple(t.shape)}")
        return t

    # -- the scaling convention (only place scaling_factor is applied) ---------------------------

    def _scale_latents(self, z: torch.Tensor) -> torch.Tensor:
        return z * self.scaling_factor

    def _unscale_latents(self, z: torch.Tensor) -> torch.Tensor:
        return z / self.scaling_factor

    # -- encode / decode ---------------------------------------------------------------------------

    def _run(
        self,
        fn: Any,
        x: torch.Tensor,
        grid_hw: tuple[int, int],
        in_scale: int,
        out_scale: int,
        batch_size: int | None,
        tile_size: int | None,
        tile_overlap: int | None,
    ) -> torch.Tensor:
        batch_size = self._check_batch_size(batch_size) or self._slice_batch_size
        if tile_overlap is None:  # enable_tiling's overlap also under a tile_size of the call
            tile_overlap = self._tile_overlap if self._tile_size is not None else 0
        if tile_size is None:
            tile_size = self._tile_size
        if tile_size is not None:
            self._check_tiling(tile_size, tile_overlap)
        elif tile_overlap:  # it was ignored without a word
            raise ValueError(
                f"tile_overlap={tile_overlap!r} needs tiling: expected a tile_size with it (or "
                "enable_tiling), got none"
            )
        f = self.spatial_compression_ratio
        layout = self._layout_for(x.device)
        # Also here, not only in set_memory_format: the model may have moved device since.
        self._weights_to(layout)

        def in_layout(t: torch.Tensor) -> torch.Tensor:
            return fn(t.contiguous(memory_format=layout))

        def one(chunk: torch.Tensor) -> torch.Tensor:
            if tile_size is None or max(grid_hw) * f <= tile_size:
                return in_layout(chunk).contiguous()
            return tiled_apply(
                in_layout, chunk, grid_hw, tile_size // f, tile_overlap // f, in_scale, out_scale
            )

        if batch_size is None or x.shape[0] <= batch_size:
            return one(x)
        return torch.cat([one(chunk) for chunk in x.split(batch_size)])

    def encode(
        self,
        x: torch.Tensor,
        *,
        channels: int | None = None,
        scaled: bool = False,
        batch_size: int | None = None,
        tile_size: int | None = None,
        tile_overlap: int | None = None,
        band_rows: int | None = None,
    ) -> torch.Tensor:
        """Images (B, in_channels, H, W), H and W multiples of the compression factor f, ->
        latents (B, C, H/f, W/f).

        channels: emit only the first ``channels`` latent channels (DC-AE 1.5 structured
            latents; the encoder's last conv is sliced, so it is cheaper than slicing after).
        scaled: multiply by scaling_factor (diffusion-model space), see the module docstring.
        batch_size: process at most this many images at once (default: enable_slicing's).
        tile_size / tile_overlap: tiled encoding in pixels (default: enable_tiling's).
        band_rows: run the encoder's local high-resolution head about that many image rows at
            a time (banding.py): the full-frame latents at a fraction of the peak memory.
        """
        x = self._check_tensor(x, "encode")
        band_rows = check_band_rows(band_rows)
        cfg = self.config
        if x.shape[1] != cfg.in_channels:
            raise ValueError(
                f"DCAE.encode: expected {cfg.in_channels} input channels, got {x.shape[1]} "
                f"(shape {tuple(x.shape)})"
            )
        f = self.spatial_compression_ratio
        h, w = x.shape[-2:]
        if h % f or w % f:
            raise ValueError(
                f"DCAE.encode: height and width must be multiples of the compression factor {f}, "
                f"got {h}x{w} (pad or crop to {h // f * f or f}x{w // f * f or f})"
            )
        if channels is not None and (
            not is_int(channels) or not 1 <= channels <= cfg.latent_channels
        ):
            raise ValueError(
                f"DCAE.encode: channels must be an int in [1, {cfg.latent_channels}], got "
                f"{channels!r}"
            )
        channels = None if channels is None else int(channels)  # a numpy int, as elsewhere

        def fn(t: torch.Tensor) -> torch.Tensor:
            return self.encoder(t, channels, band_rows)

        z = self._run(fn, x, (h // f, w // f), f, 1, batch_size, tile_size, tile_overlap)
        return self._scale_latents(z) if scaled else z

    def decode(
        self,
        z: torch.Tensor,
        *,
        scaled: bool = False,
        batch_size: int | None = None,
        tile_size: int | None = None,
        tile_overlap: int | None = None,
        band_rows: int | None = None,
    ) -> torch.Tensor:
        """Latents (B, c, h, w) with c <= latent_channels -> images (B, in_channels, h*f, w*f).

        Fewer than latent_channels channels decode as if zero-padded (DC-AE 1.5). Output is in
        roughly [-1, 1] and not clamped. ``scaled=True`` divides by scaling_factor first.
        ``band_rows`` (or :meth:`enable_banded_decode`): run the decoder's local tail in bands
        of that many output rows, for memory (banding.py).
        """
        z = self._check_tensor(z, "decode")
        c = z.shape[1]
        if not 1 <= c <= self.latent_channels:
            raise ValueError(
                f"DCAE.decode: expected 1 to {self.latent_channels} latent channels, got {c} "
                f"(shape {tuple(z.shape)})"
            )
        if scaled:
            z = self._unscale_latents(z)
        f = self.spatial_compression_ratio
        grid = (z.shape[-2], z.shape[-1])
        band_rows = check_band_rows(band_rows) or self._band_rows
        decoder = self.decoder
        if band_rows is not None:
            decoder = functools.partial(self.decoder, band_rows=band_rows)
        return self._run(decoder, z, grid, 1, f, batch_size, tile_size, tile_overlap)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Reconstruction decode(encode(x))."""
        return self.decode(self.encode(x))
