"""The latent-layers file: a DC-Gen model's new embedder and head, apart from the DiT.

Format: safetensors with keys ``embedder.<param>`` and ``head.<param>``; metadata
``format = "dcgen.latent_layers"``, ``family`` (the transformer class name, e.g.
``FluxTransformer2DModel``), ``latent_channels``, ``patch_size``, ``position_scale`` when it
is not 1, ``dcae_factor`` (the spatial factor of the DC-AE stage 1 aligned to; absent in older
files), and optional extras (the stages add ``stage``). Base transformer + this file = the
adapted model: loading replaces the base's latent layers first when their shape differs.
Stages 1-3 write it, export reads it.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from .._files import atomic_write
from ..adapters import DiTAdapter, FluxAdapter, SanaAdapter, adapter_for
from ..adapters.provenance import record_dcae_factor, recorded_dcae_factor

logger = logging.getLogger(__name__)

__all__ = [
    "LATENT_LAYERS_FORMAT",
    "LATENT_LAYERS_NAME",
    "LatentLayersError",
    "family_of",
    "load_latent_layers",
    "read_latent_layers_metadata",
    "save_latent_layers",
]


LATENT_LAYERS_FORMAT = "dcgen.latent_layers"
LATENT_LAYERS_NAME = "latent_layers.safetensors"
TRANSFORMER_CLASSES = {"flux": "FluxTransformer2DModel", "sana": "SanaTransformer2DModel"}
# Metadata the file keeps about its own layers: no extra may replace these.
_CORE_KEYS = frozenset(
    {"format", "family", "latent_channels", "patch_size", "position_scale", "dcae_factor"}
)


class LatentLayersError(ValueError):
    """A latent-layers file that cannot be read or does not fit the transformer."""


def family_of(adapter: DiTAdapter) -> str:
    """Short family name of the adapter: "flux" or "sana"."""
    if isinstance(adapter, FluxAdapter):
        return "flux"
    if isinstance(adapter, SanaAdapter):
        return "sana"
    raise LatentLayersError(f"no family name for {type(adapter).__name__}")


def _as_adapter(model: nn.Module | DiTAdapter) -> DiTAdapter:
    return model if isinstance(model, DiTAdapter) else adapter_for(model)


def save_latent_layers(
    model: nn.Module | DiTAdapter, path: str | Path, extra: dict[str, str] | None = None
) -> Path:
    """Write the current embedder and head of a transformer (or its adapter) to ``path``
    (format: module docstring); ``extra`` adds string metadata."""
    adapter = _as_adapter(model)
    clash = sorted(set(extra or {}) & _CORE_KEYS)
    if clash:
        raise ValueError(
            f"latent layers: extra metadata {clash} would replace what the file records about "
            f"its own layers; expected other keys (e.g. 'stage')"
        )
    layers = adapter.latent_layers()
    tensors: dict[str, torch.Tensor] = {}
    for prefix, module in (("embedder", layers.embedder), ("head", layers.head)):
        for name, value in module.state_dict().items():
            # contiguous + clone: safetensors refuses views and shared storage.
            tensors[f"{prefix}.{name}"] = value.detach().cpu().contiguous().clone()
    metadata = {
        "format": LATENT_LAYERS_FORMAT,
        "family": TRANSFORMER_CLASSES[family_of(adapter)],
        "latent_channels": str(adapter.latent_channels),
        "patch_size": str(adapter.patch_size),
        **(extra or {}),
    }
    scale = getattr(adapter, "position_scale", None)
    if scale is not None and scale != 1.0:
        # align_positions="base" spaces the RoPE positions (a FLUX config key): part of the
        # adapted model, so base transformer + this file must get it back
        metadata["position_scale"] = repr(float(scale))
    factor = recorded_dcae_factor(adapter.transformer)
    if factor is not None:  # the DC-AE factor stage 1 aligned to (adapters/provenance.py)
        metadata["dcae_factor"] = str(factor)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))
    logger.info("saved latent layers (%s) to %s", metadata, path)
    return path


def read_latent_layers_metadata(path: str | Path) -> dict[str, Any]:
    """{"family": "flux" | "sana", "latent_channels": int, "patch_size": int,
    "position_scale": float, "dcae_factor": int | None} of a latent-layers file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"latent-layers file {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
    except (SafetensorError, OSError) as err:
        raise LatentLayersError(f"{path} is not a readable safetensors file: {err}") from err
    if meta.get("format") != LATENT_LAYERS_FORMAT:
        raise LatentLayersError(
            f"{path}: expected format {LATENT_LAYERS_FORMAT!r}, got {meta.get('format')!r} "
            "(not a latent-layers file)"
        )
    short = {name: fam for fam, name in TRANSFORMER_CLASSES.items()}
    try:
        return {
            "family": short.get(meta["family"], meta["family"]),
            "latent_channels": int(meta["latent_channels"]),
            "patch_size": int(meta["patch_size"]),
            # absent: unscaled positions (files of grid-position runs, or older files)
            "position_scale": float(meta.get("position_scale", 1.0)),
            # absent: files written before stage 1 recorded it
            "dcae_factor": int(meta["dcae_factor"]) if "dcae_factor" in meta else None,
        }
    except (KeyError, ValueError) as err:
        raise LatentLayersError(
            f"{path} lacks latent-layers metadata (family, latent_channels, patch_size): got {meta}"
        ) from err


def load_latent_layers(model: nn.Module | DiTAdapter, path: str | Path) -> dict[str, Any]:
    """Load a latent-layers file into a transformer (or its adapter's transformer), in place.

    When the transformer's latent layers have another channel count or patch size than the
    file (e.g. the base model), they are first replaced (``replace_latent_layers``), so the
    base transformer + this file is the adapted model. Loading is strict. Returns the metadata.
    """
    adapter = _as_adapter(model)
    path = Path(path)
    meta = read_latent_layers_metadata(path)
    family = family_of(adapter)
    if meta["family"] != family:
        raise LatentLayersError(
            f"{path} holds {meta['family']} latent layers but the transformer is {family}"
        )
    c, p = meta["latent_channels"], meta["patch_size"]
    if (adapter.latent_channels, adapter.patch_size) != (c, p):
        logger.info(
            "replacing latent layers (%d channels, patch %d) -> (%d channels, patch %d)",
            adapter.latent_channels, adapter.patch_size, c, p,
        )  # fmt: skip
        adapter.replace_latent_layers(c, patch_size=p)
    layers = adapter.latent_layers()
    with safe_open(str(path), framework="pt") as f:
        keys = set(f.keys())
        for prefix, module in (("embedder", layers.embedder), ("head", layers.head)):
            own = module.state_dict()
            want = {f"{prefix}.{k}" for k in own}
            have = {k for k in keys if k.startswith(prefix + ".")}
            if want != have:
                raise LatentLayersError(
                    f"{path}: {prefix} tensors {sorted(have)} do not match the model's "
                    f"{sorted(want)}"
                )
            state = {}
            for k, ref in own.items():
                t = f.get_tensor(f"{prefix}.{k}")
                if t.shape != ref.shape:
                    raise LatentLayersError(
                        f"{path}: {prefix}.{k} has shape {tuple(t.shape)}, the model expects "
                        f"{tuple(ref.shape)}"
                    )
                state[k] = t.to(dtype=ref.dtype, device=ref.device)
            module.load_state_dict(state, strict=True)
    if hasattr(adapter, "set_position_scale"):
        adapter.set_position_scale(meta["position_scale"])
    elif meta["position_scale"] != 1.0:
        raise LatentLayersError(
            f"{path}: position_scale {meta['position_scale']:g} but {family} transformers "
            "have no scaled positions"
        )
    if meta["dcae_factor"] is not None:
        record_dcae_factor(adapter.transformer, meta["dcae_factor"])
    logger.info("loaded latent layers from %s", path)
    return meta
