"""Precomputed latents and text embeddings, so training never runs an autoencoder or text encoder.

On-disk format (``out_dir``)::

    index.json                      written last; its presence means the cache is complete
    shard-00000.safetensors         samples [0, shard_size)
    shard-00001.safetensors         samples [shard_size, 2 * shard_size)
    ...

Each shard stores one tensor per sample and name, keyed ``"{slot}/{name}"`` where ``slot`` is
the sample's position inside the shard (e.g. ``"3/dcae_latent"``) and the leading batch
dimension is removed. Per-sample keys (rather than per-bucket stacks) let images of different
aspect buckets share a shard, and let a reader fetch one sample without touching the others:
``safe_open`` memory-maps the file and reads only the requested tensor. The shard's safetensors
metadata holds ``{"format", "version", "fingerprint", "start", "samples": <JSON list of
records>}``, so a finished shard describes itself; that is what makes ``precompute`` resumable
without any other state: a shard file exists only once it is complete (temp file + fsync +
``os.replace``), and re-running skips shards whose metadata carries the same fingerprint.

``index.json``::

    {"format": "dcgen.latent_cache", "version": 1, "fingerprint": <sha256 hex>,
     "dataset_fingerprint": str, "shard_size": int, "num_samples": int,
     "tensors": [names...],
     "shards": [{"file": "shard-00000.safetensors", "start": 0, "count": n, "bytes": size}],
     "samples": [{"key": str, "caption": str, "size": [h, w], "shard": int, "slot": int,
                  "shapes": {name: [...]}, "dtypes": {name: "float32" | ...}}]}

``size`` is the image size fed to the encoders (the bucket), so ``LatentCache.bucket_ids``
drives a ``BucketBatchSampler`` directly. Conventional tensor names: ``base_latent`` (base VAE),
``dcae_latent`` (DC-AE, ``DCAE.encode(x, scaled=True)``), ``prompt_embeds``,
``pooled_prompt_embeds``, ``text_ids``; any names work.
"""

from __future__ import annotations

import collections
import copy
import hashlib
import itertools
import json
import logging
from collections.abc import Callable, Hashable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from .._files import atomic_write
from ..autoencoders.checkpoint import SAFETENSORS_DTYPES
from .data import ImageCaptionDataset

if TYPE_CHECKING:
    from .distributed import DistContext

logger = logging.getLogger(__name__)

__all__ = ["CACHE_FORMAT", "CacheError", "LatentCache", "precompute"]

CACHE_FORMAT = "dcgen.latent_cache"
CACHE_VERSION = 1
INDEX_NAME = "index.json"

ImageEncoder = Callable[[torch.Tensor], torch.Tensor]
TextEncoder = Callable[[list[str]], Mapping[str, torch.Tensor]]


class CacheError(ValueError):
    """A cache that is corrupt, incomplete or inconsistent; the message names the file."""


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.safetensors"


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _dataset_fingerprint(dataset: ImageCaptionDataset, given: str | None) -> str:
    if given is not None:
        return given
    fn = getattr(dataset, "fingerprint", None)
    if callable(fn):
        return str(fn())
    # Without a fingerprint a changed dataset of the same length cannot be told apart.
    fallback = f"{type(dataset).__qualname__}:{len(dataset)}"
    logger.warning(
        "dataset has no fingerprint(); using %r. Pass fingerprint= to precompute so a changed "
        "dataset is not mistaken for the cached one",
        fallback,
    )
    return fallback


def _read_shard_metadata(path: Path) -> dict[str, str]:
    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except (SafetensorError, OSError) as err:
        raise CacheError(f"cache shard {path} is corrupt or truncated: {err}") from err


def precompute(
    dataset: ImageCaptionDataset,
    encoders: Mapping[str, ImageEncoder],
    text_encoder: TextEncoder | None,
    out_dir: str | Path,
    *,
    shard_size: int = 256,
    batch_size: int = 8,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    fingerprint: str | None = None,
    num_workers: int = 0,
    overwrite: bool = False,
    progress: bool = True,
    ctx: DistContext | None = None,
) -> LatentCache:
    """Encode every sample of ``dataset`` once and store the results under ``out_dir``.

    ``encoders`` map a tensor name to ``f(images) -> (B, ...)`` with images (B, 3, H, W) in
    [-1, 1] on ``device``, e.g. ``{"dcae_latent": lambda x: dcae.encode(x, scaled=True)}``.
    ``text_encoder(captions) -> {name: (B, ...)}`` adds text tensors (names must not collide).
    Outputs are moved to CPU; floating outputs are cast to ``dtype`` when given (bf16 halves
    the disk use of T5 embeddings). Images are batched only with images of the same size.

    Resumable: finished shards are kept on re-run when the fingerprint (dataset fingerprint,
    tensor names, shard size, dtype) matches; a different fingerprint raises unless
    ``overwrite=True``. A shard holds ``shard_size`` samples in memory before it is written.

    Several processes (``ctx`` from :func:`~dcgen.train.distributed.init_distributed`, under
    torchrun): rank r computes shards r, r + world_size, ...; after a barrier rank 0 reads the
    others' shard records and writes the index, and every rank returns once it is written.
    The cache is the one a single process makes (the same tensors and metadata values; the
    files' bytes can differ, safetensors writing metadata keys in hash order).
    """
    rank, world = (ctx.rank, ctx.world_size) if ctx is not None else (0, 1)
    if shard_size <= 0 or batch_size <= 0:
        raise ValueError(
            f"shard_size and batch_size must be positive, got {shard_size}, {batch_size}"
        )
    if not encoders and text_encoder is None:
        raise ValueError("nothing to compute: no encoders and no text_encoder")
    n = len(dataset)
    if n == 0:
        raise ValueError("dataset is empty")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    data_fp = _dataset_fingerprint(dataset, fingerprint)
    config = {
        "dataset": data_fp,
        "encoders": sorted(encoders),
        "text_encoder": text_encoder is not None,
        "shard_size": shard_size,
        "dtype": None if dtype is None else _dtype_name(dtype),
    }
    cache_fp = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()

    index_path = out / INDEX_NAME
    if index_path.exists():
        try:
            old_fp = json.loads(index_path.read_text()).get("fingerprint")
        except (OSError, ValueError):
            old_fp = None
        if old_fp == cache_fp:
            logger.info("latent cache %s is complete and up to date", out)
            return LatentCache(out)
        if not overwrite:
            raise CacheError(
                f"{out} holds a latent cache of other data or settings (fingerprint {old_fp} != "
                f"{cache_fp}); pass overwrite=True or choose another out_dir"
            )
        if rank == 0:
            index_path.unlink(missing_ok=True)

    n_shards = (n + shard_size - 1) // shard_size

    def bounds(s: int) -> tuple[int, int]:  # shard s holds samples [start, stop)
        return s * shard_size, min(n, (s + 1) * shard_size)

    mine = range(rank, n_shards, world)
    # A killed run's temp files (a shard is held in memory and written whole, so each can be as
    # large as a shard) were never removed. Each rank removes those of its own shards (no other
    # process writes them), rank 0 the index's (written only after every rank is done). One
    # listing of the folder, not one per shard (that was quadratic: 4,000 shards took 31 s);
    # a temp file of NAME is ".NAME.<random>.tmp" (dcgen._files.atomic_write).
    own = {shard_name(s) for s in mine}
    stale = [
        t for t in out.glob(".shard-*.safetensors.*.tmp") if t.name[1:].rsplit(".", 2)[0] in own
    ]
    if rank == 0:
        stale += out.glob(f".{INDEX_NAME}.*.tmp")
    for tmp in stale:
        tmp.unlink(missing_ok=True)
    by_shard: dict[int, list[dict[str, Any]]] = {}
    plan = [
        (
            s,
            *bounds(s),
            _finished_shard(out / shard_name(s), cache_fp, *_span(bounds(s)), overwrite),
        )
        for s in mine
    ]
    # One loader over every sample still to compute: its workers start once (a loader per
    # shard restarted them each shard, about 5 s apiece where processes spawn: macOS, Windows).
    todo = [i for _, start, stop, done in plan if done is None for i in range(start, stop)]
    samples = _samples(dataset, todo, num_workers)
    total = sum(stop - start for start, stop in map(bounds, mine))
    pbar = tqdm(total=total, desc="precompute", unit="img", disable=not progress)
    try:
        for s, start, stop, done in plan:
            path = out / shard_name(s)
            if done is None:
                done = _compute_shard(
                    samples,
                    range(start, stop),
                    s,
                    encoders,
                    text_encoder,
                    device,
                    dtype,
                    batch_size,
                    pbar,
                )
                _write_shard(path, done, cache_fp, start)
            else:
                logger.info("keeping finished shard %s", path.name)
                pbar.update(stop - start)
            by_shard[s] = done[0]
    finally:
        pbar.close()
    if world > 1:
        assert ctx is not None
        ctx.barrier()  # every shard is written
        if rank != 0:
            ctx.barrier()  # rank 0 has written the index
            return LatentCache(out)
        for s in range(n_shards):  # the other ranks' shards, from their own metadata
            if s not in by_shard:
                start, stop = bounds(s)
                done = _finished_shard(out / shard_name(s), cache_fp, start, stop - start, False)
                if done is None:
                    raise CacheError(f"shard {shard_name(s)} is missing after every rank finished")
                by_shard[s] = done[0]
    records = [r for s in range(n_shards) for r in by_shard[s]]

    # Extra shards from an earlier, larger run would otherwise sit unused next to the index.
    ours = {shard_name(s) for s in range(n_shards)}  # once (per file it was quadratic)
    for p in sorted(out.glob("shard-*.safetensors")):
        if p.name not in ours:
            if not overwrite:
                raise CacheError(f"{p} does not belong to this cache; remove it or overwrite=True")
            p.unlink()

    keys = [r["key"] for r in records]
    if len(set(keys)) != len(keys):
        # counted once (keys.count per key hung for hours on a million keys before the error)
        dup = sorted(k for k, c in collections.Counter(keys).items() if c > 1)[:5]
        raise CacheError(f"dataset keys must be unique; duplicated: {dup}")
    names = sorted(records[0]["shapes"])
    index = {
        "format": CACHE_FORMAT,
        "version": CACHE_VERSION,
        "fingerprint": cache_fp,
        "dataset_fingerprint": data_fp,
        "shard_size": shard_size,
        "num_samples": n,
        "tensors": names,
        "shards": [
            {
                "file": shard_name(s),
                "start": start,
                "count": stop - start,
                "bytes": (out / shard_name(s)).stat().st_size,
            }
            for s, (start, stop) in ((s, bounds(s)) for s in range(n_shards))
        ],
        "samples": records,
    }

    def write_index(tmp: str) -> None:
        Path(tmp).write_text(json.dumps(index, indent=1))

    atomic_write(index_path, write_index, durable=True)
    logger.info("latent cache %s: %d samples in %d shards", out, n, n_shards)
    if world > 1:
        assert ctx is not None
        ctx.barrier()  # the other ranks return once the index exists
    return LatentCache(out)


def _span(bounds: tuple[int, int]) -> tuple[int, int]:
    """(start, count) of a shard's [start, stop)."""
    return bounds[0], bounds[1] - bounds[0]


def _samples(dataset: ImageCaptionDataset, indices: list[int], num_workers: int) -> Iterator[Any]:
    """``dataset[i]`` for ``indices`` in order, read by ``num_workers`` DataLoader workers."""
    loader = torch.utils.data.DataLoader(
        torch.utils.data.Subset(dataset, indices),  # type: ignore[arg-type]
        batch_size=None,  # one sample at a time: sizes may differ, batching happens later
        num_workers=num_workers,
    )
    return _worker_errors_as_raised(loader)


def _finished_shard(
    path: Path, cache_fp: str, start: int, count: int, overwrite: bool
) -> tuple[list[dict[str, Any]], dict[str, torch.Tensor]] | None:
    """Records of a complete shard from an earlier run, or None when it must be (re)computed."""
    if not path.exists():
        return None
    try:
        meta = _read_shard_metadata(path)
        records = json.loads(meta["samples"])
        ok = (
            meta.get("fingerprint") == cache_fp
            and int(meta.get("start", -1)) == start
            and len(records) == count
        )
    except (CacheError, KeyError, ValueError) as err:
        # Atomic writes make this rare (disk errors, manual edits); recomputing is always safe.
        logger.warning("recomputing unreadable shard %s: %s", path, err)
        return None
    if ok:
        return records, {}
    if not overwrite:
        raise CacheError(
            f"{path} was written for other data or settings; pass overwrite=True or choose "
            "another out_dir"
        )
    return None


def _worker_errors_as_raised(loader: Iterable[Any]) -> Iterator[Any]:
    """``loader``'s items; an error raised in a DataLoader worker comes back with the message it
    was raised with. torch re-raises it with the worker's whole traceback as its message, which
    the command line would print flattened into one line instead of "could not read image
    <path>: ..."."""
    it = iter(loader)
    while True:
        try:
            item = next(it)
        except StopIteration:
            return
        except Exception as err:
            text = str(err)
            if not text.startswith(f"Caught {type(err).__name__} in DataLoader worker"):
                raise
            last = text.rstrip().splitlines()[-1]
            # the traceback's last line: "<module>.<Type>: <original message>"
            _, sep, original = last.partition(f"{type(err).__name__}: ")
            if not sep:
                raise
            try:
                clean = type(err)(original)
            except Exception:  # an exception type that takes other arguments
                raise err from None
            raise clean from err
        yield item


def _compute_shard(
    samples: Iterator[Any],
    indices: range,
    shard: int,
    encoders: Mapping[str, ImageEncoder],
    text_encoder: TextEncoder | None,
    device: str | torch.device,
    dtype: torch.dtype | None,
    batch_size: int,
    pbar: tqdm,
) -> tuple[list[dict[str, Any]], dict[str, torch.Tensor]]:
    """Encode the shard's samples, the next ``len(indices)`` items of ``samples``."""
    # Group by image size so each encoder call sees one stackable batch.
    pending: dict[tuple[int, ...], list[tuple[int, dict]]] = {}
    tensors: dict[str, torch.Tensor] = {}
    records: list[dict[str, Any] | None] = [None] * len(indices)

    def flush(group: list[tuple[int, dict]]) -> None:
        images = torch.stack([s["image"] for _, s in group]).to(device)
        captions = [s["caption"] for _, s in group]
        outputs: dict[str, torch.Tensor] = {}
        with torch.inference_mode():
            for name, enc in encoders.items():
                outputs[name] = enc(images)
            if text_encoder is not None:
                for name, t in text_encoder(captions).items():
                    if name in outputs:
                        raise ValueError(f"text_encoder output {name!r} collides with an encoder")
                    outputs[name] = t
        for name, t in outputs.items():
            if not isinstance(t, torch.Tensor) or t.ndim == 0 or t.shape[0] != len(group):
                got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
                raise ValueError(
                    f"{name!r} must be a tensor with batch size {len(group)} first, got {got}"
                )
        for j, (slot, sample) in enumerate(group):
            shapes, dtypes = {}, {}
            for name, t in outputs.items():
                v = t[j].detach().to("cpu")
                if dtype is not None and v.is_floating_point():
                    v = v.to(dtype)
                # clone: per-sample views share the batch's storage, which safetensors refuses.
                tensors[f"{slot}/{name}"] = v.contiguous().clone()
                shapes[name], dtypes[name] = list(v.shape), _dtype_name(v.dtype)
            records[slot] = {
                "key": str(sample["key"]),
                "caption": sample["caption"],
                "size": list(sample["image"].shape[-2:]),
                "shard": shard,
                "slot": slot,
                "shapes": shapes,
                "dtypes": dtypes,
            }
        pbar.update(len(group))

    for slot, sample in enumerate(itertools.islice(samples, len(indices))):
        if not isinstance(sample, Mapping) or not {"image", "caption", "key"} <= set(sample):
            raise ValueError(
                f"dataset[{indices[slot]}] must be a dict with image, caption, key; got "
                f"{type(sample).__name__} {sorted(sample) if isinstance(sample, Mapping) else ''}"
            )
        group = pending.setdefault(tuple(sample["image"].shape), [])
        group.append((slot, sample))
        if len(group) == batch_size:
            flush(group)
            pending[tuple(sample["image"].shape)] = []
    for group in pending.values():
        if group:
            flush(group)
    return [r for r in records if r is not None], tensors


def _write_shard(
    path: Path,
    done: tuple[list[dict[str, Any]], dict[str, torch.Tensor]],
    cache_fp: str,
    start: int,
) -> None:
    records, tensors = done
    metadata = {
        "format": CACHE_FORMAT,
        "version": str(CACHE_VERSION),
        "fingerprint": cache_fp,
        "start": str(start),
        "samples": json.dumps(records),
    }
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata), durable=True)


class LatentCache(torch.utils.data.Dataset):
    """Reads a cache written by ``precompute``: ``cache[i]`` -> ``{"key", "caption", <tensors>}``.

    Lazy: shards are opened (memory-mapped by safetensors) on first use, in each DataLoader
    worker separately, and only the requested tensors are read. ``tensors`` restricts which
    names are loaded (stage 1 needs no text embeddings). At construction every shard's file size
    is checked against the index; each shard's header and metadata are checked when it is
    first opened; ``verify()`` checks everything up front.
    """

    def __init__(self, root: str | Path, tensors: Sequence[str] | None = None) -> None:
        self.root = Path(root)
        index_path = self.root / INDEX_NAME
        if not index_path.is_file():
            raise CacheError(
                f"no {INDEX_NAME} in {self.root}: not a latent cache, or precompute did not finish"
            )
        try:
            index = json.loads(index_path.read_text())
        except (OSError, ValueError) as err:
            raise CacheError(f"could not read cache index {index_path}: {err}") from err
        if not isinstance(index, dict) or index.get("format") != CACHE_FORMAT:
            raise CacheError(f"{index_path} is not a {CACHE_FORMAT} index")
        if index.get("version") != CACHE_VERSION:
            raise CacheError(
                f"{index_path} has version {index.get('version')}, this dcgen reads {CACHE_VERSION}"
            )
        self.index = index
        self.fingerprint: str = index["fingerprint"]
        self.samples: list[dict[str, Any]] = index["samples"]
        self.shards: list[dict[str, Any]] = index["shards"]
        available = list(index["tensors"])
        if tensors is None:
            self.tensor_names = available
        else:
            unknown = [t for t in tensors if t not in available]
            if unknown:
                raise CacheError(f"cache {self.root} has tensors {available}, not {unknown}")
            self.tensor_names = list(tensors)
        if len(self.samples) != index["num_samples"] or sum(s["count"] for s in self.shards) != len(
            self.samples
        ):
            raise CacheError(
                f"{index_path} is inconsistent: {len(self.samples)} sample records, "
                f"num_samples={index['num_samples']}, shard counts sum to "
                f"{sum(s['count'] for s in self.shards)}"
            )
        for shard in self.shards:
            path = self.root / shard["file"]
            if not path.is_file():
                raise CacheError(f"cache shard {path} listed in {index_path} is missing")
            size = path.stat().st_size
            if size != shard["bytes"]:
                raise CacheError(
                    f"cache shard {path} is {size} bytes but {index_path} says {shard['bytes']} "
                    "(truncated copy, or an index from another run?)"
                )
        self.keys = [s["key"] for s in self.samples]
        self.sizes = [tuple(s["size"]) for s in self.samples]
        self.bucket_ids: list[Hashable] = list(self.sizes)
        self._handles: dict[int, Any] = {}

    def __len__(self) -> int:
        return len(self.samples)

    def with_tensors(self, tensors: Sequence[str]) -> LatentCache:
        """This cache restricted to ``tensors`` (as ``LatentCache(root, tensors)``), sharing the
        parsed index: opening it again parsed the whole index twice (a million samples: about
        35 s and 2 GB each)."""
        unknown = [t for t in tensors if t not in self.index["tensors"]]
        if unknown:
            raise CacheError(
                f"cache {self.root} has tensors {list(self.index['tensors'])}, not {unknown}"
            )
        view = copy.copy(self)
        view.tensor_names = list(tensors)
        view._handles = {}
        return view

    def __getstate__(self) -> dict[str, Any]:
        # Open file handles do not pickle; DataLoader workers reopen their own.
        state = self.__dict__.copy()
        state["_handles"] = {}
        return state

    def _open(self, shard_idx: int) -> Any:
        handle = self._handles.get(shard_idx)
        if handle is not None:
            return handle
        shard = self.shards[shard_idx]
        path = self.root / shard["file"]
        try:
            handle = safe_open(str(path), framework="pt")
            meta = handle.metadata() or {}
        except (SafetensorError, OSError) as err:
            raise CacheError(f"cache shard {path} is corrupt or truncated: {err}") from err
        problems = []
        if meta.get("fingerprint") != self.fingerprint:
            problems.append(f"fingerprint {meta.get('fingerprint')} != index {self.fingerprint}")
        if meta.get("start") != str(shard["start"]):
            problems.append(f"start {meta.get('start')} != index {shard['start']}")
        expected = {
            f"{s['slot']}/{name}"
            for s in self.samples[shard["start"] : shard["start"] + shard["count"]]
            for name in s["shapes"]
        }
        missing = expected - set(handle.keys())
        if missing:
            problems.append(f"missing tensors {sorted(missing)[:5]}")
        if problems:
            raise CacheError(
                f"cache index {self.root / INDEX_NAME} does not match shard {path}: "
                + "; ".join(problems)
            )
        self._handles[shard_idx] = handle
        return handle

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} cached samples")
        rec = self.samples[index]
        handle = self._open(rec["shard"])
        out: dict[str, Any] = {"key": rec["key"], "caption": rec["caption"]}
        for name in self.tensor_names:
            try:
                out[name] = handle.get_tensor(f"{rec['slot']}/{name}")
            except (SafetensorError, OSError) as err:
                path = self.root / self.shards[rec["shard"]]["file"]
                raise CacheError(
                    f"could not read {name!r} of {rec['key']!r} from {path}: {err}"
                ) from err
        return out

    def verify(self) -> None:
        """Open every shard and check each tensor's shape and dtype against the index."""
        for i in range(len(self.shards)):
            handle = self._open(i)
            path = self.root / self.shards[i]["file"]
            shard = self.shards[i]
            for rec in self.samples[shard["start"] : shard["start"] + shard["count"]]:
                for name, shape in rec["shapes"].items():
                    sl = handle.get_slice(f"{rec['slot']}/{name}")
                    if list(sl.get_shape()) != shape:
                        raise CacheError(
                            f"{path}: {rec['key']}/{name} has shape {sl.get_shape()}, index "
                            f"says {shape}"
                        )
                    want = rec.get("dtypes", {}).get(name)
                    code = sl.get_dtype()
                    dtype = SAFETENSORS_DTYPES.get(code)
                    stored = _dtype_name(dtype) if dtype is not None else code
                    if want is not None and stored != want:
                        raise CacheError(
                            f"{path}: {rec['key']}/{name} is stored as {stored}, index says {want}"
                        )
