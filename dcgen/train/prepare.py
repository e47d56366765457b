"""Everything ``dcgen precompute`` assembles: autoencoders, text-embedding sources, the run.

Text encoders (T5-XXL, CLIP, Gemma) are big and model-specific, so dcgen does not run them
itself; it takes text embeddings from one of two pluggable sources.

1. A precomputed **text-embeddings file** (or a folder of them, merged)::

       tensors   "<i>/prompt_embeds"         (T, D)   e.g. FLUX T5 output (512, 4096)
                 "<i>/pooled_prompt_embeds"  (D',)    FLUX CLIP pooled output (768,); optional
                 "<i>/<other name>"          any extra per-caption tensor, e.g.
                                             "<i>/prompt_attention_mask" (T,) for SANA
       metadata  {"format": "dcgen.text_embeddings", "captions": JSON list of str}

   ``<i>`` is the caption's position in the ``captions`` list (captions are free text, so they
   are not used as tensor keys). Every caption must carry the same names and shapes (pad the
   text tokens to one length, as FLUX and SANA do), so a batch stacks. Write one with
   :func:`save_text_embeddings`.

2. A **callable entry point** ``"package.module:function"``: ``function(captions: list[str])``
   returns ``{"prompt_embeds": (B, T, D), "pooled_prompt_embeds": (B, D'), ...}`` for a batch of
   captions. It is called once per image batch; load its model once (module level or
   ``functools.cache``).

With both, the file is used where it has the caption and the callable for the rest.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import logging
import math
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .._files import atomic_write, sampled_digest
from .buckets import make_buckets
from .cache import INDEX_NAME, LatentCache, precompute
from .data import ImageCaptionFolder
from .null_text import encode_null_text, save_null_text

if TYPE_CHECKING:
    from .distributed import DistContext

logger = logging.getLogger(__name__)

__all__ = [
    "TEXT_EMBEDDINGS_FORMAT",
    "PrepareError",
    "TextEmbeddingTable",
    "BaseAutoencoder",
    "base_vae_encoder",
    "combine_text_sources",
    "load_base_vae",
    "load_dcae",
    "load_entry_point",
    "run_precompute",
    "save_text_embeddings",
]

TEXT_EMBEDDINGS_FORMAT = "dcgen.text_embeddings"
TextEncoderFn = Callable[[list[str]], Mapping[str, torch.Tensor]]


class PrepareError(ValueError):
    """Inputs to precompute that cannot work; the message names the file or caption."""


# -- text embeddings --------------------------------------------------------------------------


def save_text_embeddings(
    path: str | Path, embeddings: Mapping[str, Mapping[str, torch.Tensor]]
) -> Path:
    """Write ``{caption: {"prompt_embeds": (T, D), "pooled_prompt_embeds": (D',), ...}}`` in the
    text-embeddings format (module docstring)."""
    captions = list(embeddings)
    tensors = {
        # clone: safetensors refuses tensors sharing storage (one tensor reused for two captions)
        f"{i}/{name}": t.detach().cpu().contiguous().clone()
        for i, caption in enumerate(captions)
        for name, t in embeddings[caption].items()
    }
    path = Path(path)
    metadata = {"format": TEXT_EMBEDDINGS_FORMAT, "captions": json.dumps(captions)}
    # atomic: a TextEmbeddingTable over the folder never meets a half-written file
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))
    return path


class TextEmbeddingTable:
    """Caption -> embeddings lookup over one text-embeddings file or a folder of them.

    Called with a list of captions, returns the stacked batch (what ``precompute`` expects of a
    text encoder). Tensors are read lazily from memory-mapped files.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if self.path.is_dir():
            files = sorted(self.path.glob("*.safetensors"))
            if not files:
                raise PrepareError(f"no .safetensors text-embeddings files in {self.path}")
        elif self.path.is_file():
            files = [self.path]
        else:
            raise FileNotFoundError(f"text-embeddings file {self.path} does not exist")
        self.files = files
        self._where: dict[str, tuple[int, int]] = {}
        self._handles: list[Any] = []
        self.names: list[str] | None = None
        self.shapes: dict[str, tuple[int, ...]] = {}
        for fi, file in enumerate(files):
            try:
                handle = safe_open(str(file), framework="pt")
                meta = dict(handle.metadata() or {})
            except (SafetensorError, OSError) as err:
                raise PrepareError(f"{file} is not a readable safetensors file: {err}") from err
            if meta.get("format") != TEXT_EMBEDDINGS_FORMAT or "captions" not in meta:
                raise PrepareError(
                    f"{file} is not a dcgen text-embeddings file (metadata format="
                    f"{meta.get('format')!r}; expected {TEXT_EMBEDDINGS_FORMAT!r} with a "
                    "'captions' list)"
                )
            captions = json.loads(meta["captions"])
            self._handles.append(handle)
            # the tensor names of each caption index, grouped in one pass over the keys (a scan
            # of every key per caption made opening a table quadratic: 8k captions took 99 s)
            by_index: dict[str, list[str]] = {}
            for key in handle.keys():
                index, slash, name = key.partition("/")
                if slash:  # "<i>/<name>" keys only, as the scan matched them
                    by_index.setdefault(index, []).append(name)
            for i, caption in enumerate(captions):
                names = sorted(by_index.get(str(i), ()))
                # Shapes come from the header (no tensor data read); checked here so a bad file
                # fails before any image is encoded.
                shapes = {n: tuple(handle.get_slice(f"{i}/{n}").get_shape()) for n in names}
                if self.names is None:
                    self.names, self.shapes = names, shapes
                elif shapes != self.shapes:
                    raise PrepareError(
                        f"{file}: caption {caption[:60]!r} has tensors {shapes}, the first "
                        f"caption {self.shapes}; every caption needs the same names and shapes "
                        "(pad the text tokens to one length)"
                    )
                # Later files override earlier ones, as in a dict update.
                self._where[caption] = (fi, i)
        logger.info("text embeddings for %d captions from %d file(s)", len(self), len(files))

    def __len__(self) -> int:
        return len(self._where)

    @property
    def captions(self) -> list[str]:
        return list(self._where)

    def __contains__(self, caption: object) -> bool:
        return caption in self._where

    def missing(self, captions: Sequence[str]) -> list[str]:
        return [c for c in dict.fromkeys(captions) if c not in self._where]

    def get(self, caption: str) -> dict[str, torch.Tensor]:
        if caption not in self._where:
            raise PrepareError(f"no text embeddings for caption {caption[:80]!r} in {self.path}")
        fi, i = self._where[caption]
        return {name: self._handles[fi].get_tensor(f"{i}/{name}") for name in self.names or []}

    def __call__(self, captions: list[str]) -> dict[str, torch.Tensor]:
        rows = [self.get(c) for c in captions]
        return {name: torch.stack([r[name] for r in rows]) for name in self.names or []}


def _identity_digest(identity: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()


def _cache_data_fingerprint(out_dir: str | Path) -> str | None:
    """The data fingerprint a finished cache in ``out_dir`` was made with (None: none there)."""
    try:
        return json.loads((Path(out_dir) / INDEX_NAME).read_text()).get("dataset_fingerprint")
    except (OSError, ValueError, AttributeError):
        return None


def load_entry_point(spec: str) -> TextEncoderFn:
    """``"package.module:function"`` -> the callable (imported from sys.path, or else from the
    working directory)."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise PrepareError(
            f"text encoder entry point must look like 'module:function', got {spec!r}"
        )
    try:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as err:
            # `python -m dcgen` puts the working directory on sys.path, the installed `dcgen`
            # command does not: a module beside the user was found by one and not the other.
            here = os.getcwd()
            if err.name != module_name.partition(".")[0] or here in sys.path:
                raise
            sys.path.insert(0, here)
            try:
                module = importlib.import_module(module_name)
            except BaseException:
                sys.path.remove(here)  # kept only for a module found there (its own imports)
                raise
    except ImportError as err:
        raise PrepareError(f"cannot import {module_name!r} for --text-encoder: {err}") from err
    fn: Any = module
    for part in attr.split("."):
        fn = getattr(fn, part, None)
        if fn is None:
            raise PrepareError(f"{module_name!r} has no attribute {attr!r}")
    if not callable(fn):
        raise PrepareError(f"{spec!r} is not callable")
    return fn


def combine_text_sources(
    table: TextEmbeddingTable | None, fn: TextEncoderFn | None
) -> TextEncoderFn | None:
    """One text encoder: the table where it has the caption, the callable for the rest."""
    if table is None or fn is None:
        return table if fn is None else fn

    def encode(captions: list[str]) -> dict[str, torch.Tensor]:
        missing = table.missing(captions)
        if not missing:
            return table(captions)
        computed = fn(missing)
        shapes = {k: tuple(v.shape[1:]) for k, v in computed.items()}
        if table.names is not None and shapes != table.shapes:
            # mixed in one cache they would give samples of different tensors (the index
            # names those of the first), or a bare KeyError where one batch mixes both
            raise PrepareError(
                f"the text encoder gives tensors {shapes} per caption, the text embeddings "
                f"in {table.path} {table.shapes}; expected the same names and shapes (made "
                "with the same encoder and token length)"
            )
        per_caption = {c: {k: v[j] for k, v in computed.items()} for j, c in enumerate(missing)}
        rows = [table.get(c) if c in table else per_caption[c] for c in captions]
        return {name: torch.stack([r[name] for r in rows]) for name in rows[0]}

    return encode


# -- autoencoders -----------------------------------------------------------------------------


def load_dcae(spec: str | Path, dtype: torch.dtype | None = None, device: str = "cpu") -> Any:
    """A DC-AE folder / checkpoint, or a preset name (random weights: smoke tests only)."""
    from ..autoencoders import DCAE
    from ..autoencoders.config import find_preset

    path = Path(spec)
    if path.exists():
        return DCAE.from_pretrained(path, dtype=dtype, device=device)
    preset = find_preset(str(spec))
    if preset is None:
        raise FileNotFoundError(
            f"--dcae {spec!r} is neither an existing DC-AE folder/checkpoint nor a preset name "
            "(see `dcgen presets`)"
        )
    logger.warning("DC-AE preset %s has RANDOM weights: only useful for smoke tests", preset)
    return DCAE.from_config(preset).to(dtype=dtype or torch.float32, device=device).eval()


#: a base DiT's token packing on its autoencoder: FLUX packs 2x2 VAE pixels into a token, SANA
#: embeds each DC-AE pixel (patch size 1)
DEFAULT_BASE_PATCH = {"AutoencoderKL": 2, "DC-AE": 1}


@dataclass
class BaseAutoencoder:
    """The base DiT's autoencoder as precompute uses it: ``encode`` maps images to the latents
    the base DiT was trained on; one base token covers ``token_factor`` x ``token_factor``
    pixels (the autoencoder's spatial factor times the DiT's patch size)."""

    module: Any
    kind: str  # "AutoencoderKL" (FLUX) or "DC-AE" (SANA)
    encode: Callable[[torch.Tensor], torch.Tensor]
    spatial_factor: int
    patch_size: int

    @property
    def token_factor(self) -> int:
        return self.spatial_factor * self.patch_size


def load_base_vae(
    path: str | Path,
    dtype: torch.dtype | None = None,
    device: str = "cpu",
    patch_size: int | None = None,
) -> BaseAutoencoder:
    """The base model's autoencoder: a diffusers AutoencoderKL folder (FLUX), a DC-AE folder or
    original checkpoint (SANA: the base latent space is DC-AE f32c32), or a pipeline folder
    holding ``vae/``. ``patch_size``: the base DiT's token packing; default 2 for an
    AutoencoderKL, 1 for a DC-AE (:data:`DEFAULT_BASE_PATCH`)."""
    from diffusers import AutoencoderKL

    if patch_size is not None and (not isinstance(patch_size, int) or patch_size < 1):
        # checked before any weights load
        raise PrepareError(f"--base-patch-size: expected a positive integer, got {patch_size!r}")
    folder = Path(path)
    if not folder.exists():
        raise FileNotFoundError(f"--base-vae {folder} does not exist")
    if (
        folder.is_dir()
        and not (folder / "config.json").is_file()
        and (folder / "vae" / "config.json").is_file()
    ):
        folder = folder / "vae"
    config = json.loads((folder / "config.json").read_text()) if folder.is_dir() else {}
    name = config.get("_class_name")
    if name == "AutoencoderKL":
        vae = AutoencoderKL.from_pretrained(folder, dtype=dtype or torch.float32)
        vae = vae.to(device).eval()
        return BaseAutoencoder(
            vae, "AutoencoderKL", base_vae_encoder(vae), _base_vae_factor(vae),
            patch_size or DEFAULT_BASE_PATCH["AutoencoderKL"],
        )  # fmt: skip
    if name not in (None, "AutoencoderDC"):  # None: an original DC-AE checkpoint
        raise PrepareError(
            f"--base-vae {folder} holds a {name}, expected an AutoencoderKL (FLUX) or a DC-AE "
            "(SANA)"
        )
    try:
        ae = load_dcae(folder, dtype=dtype, device=device)
    except (OSError, ValueError, KeyError) as err:
        raise PrepareError(
            f"--base-vae {folder}: expected an AutoencoderKL folder (FLUX) or a DC-AE folder / "
            f"checkpoint (SANA), could not load it as either ({err})"
        ) from err
    return BaseAutoencoder(
        ae, "DC-AE", lambda x: ae.encode(x.to(ae.dtype), scaled=True),
        ae.spatial_compression_ratio, patch_size or DEFAULT_BASE_PATCH["DC-AE"],
    )  # fmt: skip


def base_vae_encoder(vae: Any) -> Callable[[torch.Tensor], torch.Tensor]:
    """Images -> the base DiT's latents for an AutoencoderKL, as FluxPipeline prepares them:
    the posterior mode, then (z - shift_factor) * scaling_factor. The mode (not a sample)
    keeps targets deterministic, which the stage-1 least-squares fit wants."""
    cfg = vae.config
    shift = float(cfg.shift_factor or 0.0)
    scale = float(cfg.scaling_factor)

    def encode(x: torch.Tensor) -> torch.Tensor:
        z = vae.encode(x.to(vae.dtype)).latent_dist.mode()
        return (z - shift) * scale

    return encode


def _base_vae_factor(vae: Any) -> int:
    return 2 ** (len(vae.config.block_out_channels) - 1)


# -- the run ----------------------------------------------------------------------------------


def _parse_buckets(area: str | int) -> int:
    """``1048576`` or ``1024x1024`` -> pixel area."""
    text = str(area).lower()
    try:
        if "x" in text:
            h, w = text.split("x", 1)
            value = int(h) * int(w)
        else:
            value = int(text)
    except ValueError as err:
        raise PrepareError(
            f"--buckets: expected a pixel area like 1048576 or 1024x1024, got {area!r}"
        ) from err
    if value <= 0:
        raise PrepareError(f"--buckets: area must be positive, got {area!r}")
    return value


def run_precompute(
    data: str | Path,
    dcae: str | Path,
    out_dir: str | Path,
    *,
    base_vae: str | Path | None = None,
    base_patch_size: int | None = None,
    text_embeddings: str | Path | None = None,
    text_encoder: str | TextEncoderFn | None = None,
    resolution: int | None = None,
    buckets: str | int | None = None,
    shard_size: int = 256,
    batch_size: int = 8,
    dtype: torch.dtype | None = torch.bfloat16,
    encoder_dtype: torch.dtype = torch.float32,
    device: str = "cpu",
    num_workers: int = 0,
    overwrite: bool = False,
    progress: bool = True,
    ctx: DistContext | None = None,
) -> LatentCache:
    """Build the latent cache the training stages read (see ``dcgen precompute --help``).

    Tensors: ``dcae_latent`` = ``DCAE.encode(x, scaled=True)``; ``base_latent`` (with
    ``base_vae``) = the base model's latents (:func:`load_base_vae`: an AutoencoderKL's as
    FluxPipeline makes them, or a base DC-AE's scaled latents for SANA); text tensors from the
    sources above. Images are sized so every autoencoder divides them: multiples of
    lcm(DC-AE factor, base factor x base patch size: 2x2 packing for FLUX, 1 for SANA). Inputs are checked (captions against the
    embeddings, sizes against the factors) before anything is encoded.
    """
    if resolution is not None and buckets is not None:
        raise PrepareError("pass either --resolution or --buckets, not both")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise PrepareError("--device cuda: no CUDA device is available on this machine")
    data = Path(data)
    if not data.is_dir():
        raise FileNotFoundError(f"data folder {data} does not exist or is not a directory")

    ae = load_dcae(dcae, dtype=encoder_dtype, device=device)
    factor = ae.spatial_compression_ratio
    vae = None
    if base_vae is not None:
        vae = load_base_vae(
            base_vae, dtype=encoder_dtype, device=device, patch_size=base_patch_size
        )
        factor = math.lcm(factor, vae.token_factor)
    if resolution is not None and resolution % factor:
        raise PrepareError(
            f"--resolution {resolution} is not a multiple of {factor} (the DC-AE's f"
            f"{ae.spatial_compression_ratio}"
            + (f" and the base model's {vae.token_factor}-pixel token" if vae else "")
            + f"); try {max(factor, resolution // factor * factor)}"
        )
    bucket_list = None
    if buckets is not None:
        bucket_list = make_buckets(_parse_buckets(buckets), factor)
    dataset = ImageCaptionFolder(data, resolution=resolution, buckets=bucket_list, factor=factor)

    table = TextEmbeddingTable(text_embeddings) if text_embeddings is not None else None
    fn = load_entry_point(text_encoder) if isinstance(text_encoder, str) else text_encoder
    if table is not None and fn is None:
        missing = table.missing(dataset.captions)
        if missing:
            shown = "; ".join(repr(c[:60]) for c in missing[:3])
            raise PrepareError(
                f"{len(missing)} caption(s) have no entry in {text_embeddings}, e.g. {shown} "
                "(add them, or pass --text-encoder to compute the rest)"
            )
    text_fn = combine_text_sources(table, fn)
    if text_fn is None:
        logger.warning("no text embeddings: the cache serves stage 1 (alignment) only")

    encoders: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
        "dcae_latent": lambda x: ae.encode(x.to(ae.dtype), scaled=True)
    }
    if vae is not None:
        encoders["base_latent"] = vae.encode

    # The cache's own fingerprint covers the data and tensor names, not which weights made
    # them; fold the autoencoders and text sources in so a rerun with others is refused.
    # Local files count by their contents ("contents" below), not where they are: absolute
    # paths made a copied or moved project refuse its own cache.
    identity = {
        "data": dataset.fingerprint(),
        "dcae": "local" if Path(dcae).exists() else str(dcae),
        "dcae_config": ae.config.to_dict(),
        "base_vae": None if base_vae is None else "local",
        "text_embeddings": None if text_embeddings is None else "local",
        "text_encoder": text_encoder
        if isinstance(text_encoder, str) or text_encoder is None
        else getattr(
            text_encoder,
            "fingerprint_name",  # e.g. PipelineTextEncoder: which folder, family, tokens
            getattr(text_encoder, "__qualname__", type(text_encoder).__qualname__),
        ),
        "encoder_dtype": str(encoder_dtype),
    }
    # The contents too (sampled), not only the paths: embeddings or weights rewritten at the
    # same path must not be taken for the ones the cache was made with.
    identity["contents"] = {
        name: sampled_digest(source)
        for name, source in (
            ("dcae", dcae),
            ("base_vae", base_vae),
            ("text_embeddings", text_embeddings),
        )
        if source is not None and Path(source).exists()
    }
    text_digest = getattr(text_encoder, "content_digest", None)  # PipelineTextEncoder's
    if text_digest is not None:
        identity["contents"]["text_encoder"] = text_digest
    if vae is not None and vae.patch_size != DEFAULT_BASE_PATCH[vae.kind]:
        # only when not the default, so caches made before the option keep their fingerprint
        identity["base_patch_size"] = vae.patch_size
    fingerprint = _identity_digest(identity)
    legacy = _identity_digest(identity | {  # how caches made before 2026-11-29 were named
        "dcae": str(Path(dcae).resolve()) if Path(dcae).exists() else str(dcae),
        "base_vae": None if base_vae is None else str(Path(base_vae).resolve()),
        "text_embeddings": None if text_embeddings is None else str(Path(text_embeddings).resolve()),
    })  # fmt: skip
    made_with = _cache_data_fingerprint(out_dir)
    if made_with == legacy:
        fingerprint = legacy  # the same inputs at the same place: the cache stays valid
    elif text_digest is not None and made_with is not None:
        # a cache made before the text components counted by contents (their folder's path
        # did): kept when made with the same inputs at the same place
        before = {k: v for k, v in identity["contents"].items() if k != "text_encoder"}
        earlier = _identity_digest(identity | {
            "text_encoder": getattr(text_encoder, "legacy_fingerprint_name", None),
            "contents": before,
        })  # fmt: skip
        if made_with == earlier:
            fingerprint = earlier
    cache = precompute(
        dataset,
        encoders,
        text_fn,
        out_dir,
        shard_size=shard_size,
        batch_size=batch_size,
        device=device,
        dtype=dtype,
        fingerprint=fingerprint,
        num_workers=num_workers,
        overwrite=overwrite,
        progress=progress,
        ctx=ctx,
    )
    if ctx is not None and not ctx.is_main:
        return cache  # rank 0 writes the cache's one extra file
    # the empty prompt's embeddings, for caption dropout in stages 2-3 (dcgen.train.null_text);
    # optional: an encoder that cannot take "" costs the cache nothing
    try:
        null = encode_null_text(table, fn)
    except (ValueError, RuntimeError, KeyError, TypeError, IndexError) as err:
        logger.warning("the text encoder failed on the empty prompt (%s): no null_text for "
                       "caption dropout", err)  # fmt: skip
        null = None
    if null is not None:
        save_null_text(out_dir, null, dtype)
    elif text_fn is not None:
        logger.info("no empty-prompt embeddings (the table has no \"\" entry): caption "
                    "dropout will need null_text")  # fmt: skip
    return cache
