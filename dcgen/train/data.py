"""Image-caption datasets for DC-Gen training and latent precomputation.

Any dataset works if it follows ``ImageCaptionDataset``: ``len(ds)`` and ``ds[i]`` returning
``{"image": (3, H, W) float tensor in [-1, 1], "caption": str, "key": str}``. ``key`` must be
unique and stable: the latent cache and resume logic identify samples by it. Optional extras the
rest of dcgen uses when present: ``bucket_ids`` (one hashable per sample, for
``BucketBatchSampler``) and ``fingerprint()`` (a string that changes when the data changes, so a
stale latent cache is detected).

``ImageCaptionFolder`` is the built-in implementation for a folder of images with captions.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import unicodedata
from collections.abc import Hashable, Sequence
from pathlib import Path
from typing import Literal, Protocol, TypedDict, runtime_checkable

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from .._images import wide_gray_to_8bit
from .buckets import Bucket, assign_buckets

logger = logging.getLogger(__name__)

__all__ = [
    "IMAGE_EXTENSIONS",
    "DataError",
    "ImageCaptionDataset",
    "ImageCaptionFolder",
    "Sample",
    "collate_samples",
    "pil_to_tensor",
    "resize_center_crop",
]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp")
METADATA_FILES = ("metadata.jsonl", "captions.jsonl")
# EXIF orientations that swap width and height (rotations by 90 / 270 degrees).
_TRANSPOSED_ORIENTATIONS = {5, 6, 7, 8}


class DataError(ValueError):
    """A dataset that cannot be used as given; the message names the offending file."""


class Sample(TypedDict):
    image: torch.Tensor
    caption: str
    key: str


@runtime_checkable
class ImageCaptionDataset(Protocol):
    """What dcgen's training and cache code need from a dataset."""

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> Sample: ...


def _nfc(name: str) -> str:
    """A file name in Unicode's composed form: macOS file systems and zips made there store
    names decomposed ("e" + combining accent), metadata files are usually written composed, and
    the two looked alike but did not match (the image "had no caption")."""
    return unicodedata.normalize("NFC", name)


def _read_text(path: Path) -> str:
    """A caption or metadata file as text: UTF-8, with the byte-order mark some editors write
    removed (str.strip keeps it, and it would reach the text encoder as part of the caption); a
    file in another encoding raises a DataError naming it."""
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: expected UTF-8 text, {err.reason} at byte {err.start}") from err


def _image_files(root: Path) -> list[Path]:
    """The image files under ``root``, following symlinked folders (Path.rglob does not, so a
    dataset split over disks by links lost those parts without a word); each real folder is
    entered once, so a link loop ends."""
    seen: set[tuple[int, int]] = set()
    out: list[Path] = []
    for folder, dirs, names in os.walk(root, followlinks=True):
        st = os.stat(folder)
        if (st.st_dev, st.st_ino) in seen:
            dirs.clear()
            continue
        seen.add((st.st_dev, st.st_ino))
        for name in names:
            path = Path(folder) / name
            if path.suffix.lower() in IMAGE_EXTENSIONS and path.is_file():
                out.append(path)
    return sorted(out, key=lambda p: p.relative_to(root).as_posix())


def _png_has_exif(path: Path) -> bool:
    """Whether the PNG file holds an eXIf chunk, from its chunk headers alone (8 bytes a chunk,
    the data skipped)."""
    with open(path, "rb") as f:
        if f.read(8) != b"\x89PNG\r\n\x1a\n":
            return False
        while True:
            head = f.read(8)
            if len(head) < 8:
                return False
            length, kind = int.from_bytes(head[:4], "big"), head[4:]
            if kind == b"eXIf":
                return True
            if kind == b"IEND":
                return False
            f.seek(length + 4, 1)  # the data and its CRC


def _as_size(resolution: int | tuple[int, int]) -> tuple[int, int]:
    if isinstance(resolution, int):
        return resolution, resolution
    h, w = resolution
    return int(h), int(w)


def _check_divisible(size: tuple[int, int], factor: int, what: str) -> None:
    h, w = size
    if h <= 0 or w <= 0:
        raise DataError(f"{what} must be positive, got {h}x{w}")
    if h % factor or w % factor:
        raise DataError(
            f"{what} {h}x{w} is not divisible by {factor} (the autoencoders' downsampling "
            f"factor); use a multiple of {factor}, e.g. {max(factor, h // factor * factor)}x"
            f"{max(factor, w // factor * factor)}"
        )


def resize_center_crop(
    img: Image.Image, size: tuple[int, int], resample: int = Image.Resampling.BICUBIC
) -> Image.Image:
    """Scale so the image covers ``size`` = (height, width), then crop the centre.

    Covering (rather than fitting) keeps every output pixel real image content; a crop loses at
    most the aspect mismatch, which bucketing keeps small. The crop is taken in the source's
    coordinates (the centred box of the target's aspect) and only that box is resampled, straight
    to ``size``: scaling the whole image first made a 3000x1 strip a 384,000 x 128 one on the
    way to a 128 x 128 crop (hundreds of MB, growing with the square of the resolution).
    """
    th, tw = size
    w, h = img.size
    if (w, h) == (tw, th):
        return img
    scale = max(th / h, tw / w)
    bw, bh = tw / scale, th / scale  # the box's size in source pixels (<= w, h)
    left, top = (w - bw) / 2, (h - bh) / 2
    return img.resize((tw, th), resample=resample, box=(left, top, left + bw, top + bh))


def pil_to_tensor(img: Image.Image) -> torch.Tensor:
    """PIL image (any mode) -> (3, H, W) float32 in [-1, 1]."""
    img = wide_gray_to_8bit(img)
    if img.mode in ("RGBA", "LA", "PA") or "transparency" in img.info:
        # Transparent pixels often carry arbitrary colour; compose on white as viewers show them
        # (alpha channels, palette transparency and the colour key of an L / RGB PNG's tRNS).
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)
    arr = np.asarray(img.convert("RGB"), dtype=np.float32)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1) / 127.5 - 1.0


def collate_samples(samples: Sequence[dict]) -> dict:
    """Stack tensors, keep strings (and anything else) as lists. Samples in one batch must share
    a shape: batch them with ``BucketBatchSampler`` when using buckets."""
    if not samples:
        raise ValueError("cannot collate an empty batch")
    out: dict = {}
    for name in samples[0]:
        values = [s[name] for s in samples]
        if isinstance(values[0], torch.Tensor):
            shapes = {tuple(v.shape) for v in values}
            if len(shapes) > 1:
                raise ValueError(
                    f"cannot stack {name!r}: shapes {sorted(shapes)} differ within the batch "
                    "(use BucketBatchSampler so each batch comes from one bucket)"
                )
            out[name] = torch.stack(values)
        else:
            out[name] = values
    return out


#: what PIL raises for an image it cannot read; DecompressionBombError (a header claiming more
#: than twice Image.MAX_IMAGE_PIXELS) is a plain Exception, so it got past a DataError and
#: precompute ended in a traceback that never named the file
_UNREADABLE = (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError)


class ImageCaptionFolder(torch.utils.data.Dataset):
    """Images under ``root`` (recursively, .png/.jpg/.jpeg/.webp) with their captions.

    Captions come from ``metadata.jsonl`` or ``captions.jsonl`` in ``root`` (lines of
    ``{"file_name": <path relative to root>, "text": <caption>}``), else from a ``.txt`` file
    with the image's stem next to it. Order is the sorted relative POSIX path, which is also the
    sample ``key``, so indices are stable across machines and runs.

    Sizing: with ``buckets``, each image goes to the bucket nearest its aspect ratio (image
    headers are read at construction; pixels only in ``__getitem__``); else every image is
    resized/cropped to ``resolution``; with neither, images keep their size (which must then
    be divisible by ``factor``). All target sizes must be divisible by ``factor``.

    ``missing_caption``: "error" (default) names the files without one; "empty" uses "" (for
    unconditional training); "skip" leaves those images out with a warning.
    """

    def __init__(
        self,
        root: str | Path,
        resolution: int | tuple[int, int] | None = None,
        *,
        buckets: Sequence[Bucket] | None = None,
        factor: int = 16,
        missing_caption: Literal["error", "empty", "skip"] = "error",
    ) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise DataError(f"dataset folder {self.root} does not exist or is not a directory")
        if resolution is not None and buckets is not None:
            raise DataError("pass either resolution or buckets, not both")
        if missing_caption not in ("error", "empty", "skip"):
            raise DataError(f"missing_caption must be error/empty/skip, got {missing_caption!r}")
        if factor <= 0:
            raise DataError(f"factor must be positive, got {factor}")
        self.factor = factor
        self.resolution = None if resolution is None else _as_size(resolution)
        if self.resolution is not None:
            _check_divisible(self.resolution, factor, "resolution")
        self.buckets = None if buckets is None else list(buckets)
        if self.buckets is not None:
            if not self.buckets:
                raise DataError("buckets is empty")
            for b in self.buckets:
                _check_divisible((b.height, b.width), factor, "bucket")

        files = _image_files(self.root)
        if not files:
            raise DataError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found under {self.root}")
        metadata = self._read_metadata()
        self.files: list[Path] = []
        self.captions: list[str] = []
        missing: list[str] = []
        for path in files:
            rel = path.relative_to(self.root).as_posix()
            caption = metadata.get(_nfc(rel))
            if caption is None and path.with_suffix(".txt").is_file():
                caption = _read_text(path.with_suffix(".txt")).strip()
            if caption is None:
                missing.append(rel)
                if missing_caption == "skip":
                    continue
                caption = ""
            self.files.append(path)
            self.captions.append(caption)
        if missing and missing_caption == "error":
            shown = ", ".join(missing[:10]) + (
                f" (+{len(missing) - 10} more)" if len(missing) > 10 else ""
            )
            raise DataError(
                f"{len(missing)} image(s) under {self.root} have no caption (no sibling .txt and "
                f"no entry in {' / '.join(METADATA_FILES)}): {shown}"
            )
        if missing and missing_caption == "skip":
            logger.warning(
                "skipping %d image(s) without a caption, e.g. %s", len(missing), missing[0]
            )
        if not self.files:
            raise DataError(f"no captioned images left under {self.root}")
        self.keys = [p.relative_to(self.root).as_posix() for p in self.files]

        self.sizes: list[tuple[int, int]] | None = None
        self.bucket_ids: list[Hashable]
        if self.buckets is not None:
            self.sizes = [self._header_size(p) for p in self.files]
            self._targets = [(b.height, b.width) for b in assign_buckets(self.sizes, self.buckets)]
            self.bucket_ids = list(self._targets)
        elif self.resolution is not None:
            self._targets = [self.resolution] * len(self.files)
            self.bucket_ids = [self.resolution] * len(self.files)
        else:
            self._targets = []
            self.sizes = [self._header_size(p) for p in self.files]
            for path, size in zip(self.files, self.sizes):
                _check_divisible(size, factor, f"image {path} size")
            self.bucket_ids = list(self.sizes)
        logger.info("ImageCaptionFolder %s: %d images", self.root, len(self.files))

    def _read_metadata(self) -> dict[str, str]:
        captions: dict[str, str] = {}
        for name in METADATA_FILES:
            path = self.root / name
            if not path.is_file():
                continue
            for lineno, line in enumerate(_read_text(path).splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                    file_name, text = row["file_name"], row.get("text", row.get("caption"))
                except (ValueError, KeyError, TypeError) as err:
                    raise DataError(
                        f"{path}:{lineno}: expected a JSON object with 'file_name' and 'text', "
                        f"got {line[:80]!r} ({err})"
                    ) from err
                if not isinstance(text, str):
                    raise DataError(f"{path}:{lineno}: 'text' must be a string, got {text!r}")
                # setdefault: the first metadata file listed in METADATA_FILES wins on duplicates.
                captions.setdefault(_nfc(Path(file_name).as_posix()), text)
        return captions

    @staticmethod
    def _header_size(path: Path) -> tuple[int, int]:
        """(height, width) as displayed, from the header only (no pixel decode)."""
        try:
            with Image.open(path) as img:
                w, h = img.size
                # Pillow decodes a whole PNG to look for an eXIf chunk after its pixel data;
                # walking the chunk headers finds out without decoding (most PNGs have none).
                no_exif = img.format == "PNG" and "exif" not in img.info and not _png_has_exif(path)
                orientation = 1 if no_exif else img.getexif().get(0x0112, 1)
        except _UNREADABLE as err:
            raise DataError(f"could not read image {path}: {err}") from err
        return (w, h) if orientation in _TRANSPOSED_ORIENTATIONS else (h, w)

    def __len__(self) -> int:
        return len(self.files)

    def target_size(self, index: int) -> tuple[int, int]:
        """(height, width) of ``self[index]["image"]``."""
        if self._targets:
            return self._targets[index]
        assert self.sizes is not None
        return self.sizes[index]

    def __getitem__(self, index: int) -> Sample:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} images")
        index %= len(self)
        path = self.files[index]
        try:
            with Image.open(path) as img:
                img.load()
                # Phone photos store rotation in EXIF; apply it so the pixels match the header size.
                img = wide_gray_to_8bit(ImageOps.exif_transpose(img))
        except _UNREADABLE as err:
            raise DataError(f"could not read image {path}: {err}") from err
        size = self.target_size(index)
        if (img.height, img.width) != size:
            img = resize_center_crop(img, size)
        return {
            "image": pil_to_tensor(img),
            "caption": self.captions[index],
            "key": self.keys[index],
        }

    def fingerprint(self) -> str:
        """Changes when the file list, file sizes, captions or sizing options change.

        Byte sizes rather than mtimes or content hashes: a copy to another machine keeps the
        fingerprint (mtimes would not survive it) and no pixel data has to be read."""
        h = hashlib.sha256()
        h.update(json.dumps({"res": self.resolution, "buckets": self._bucket_list()}).encode())
        for path, key, caption in zip(self.files, self.keys, self.captions):
            st = path.stat()
            h.update(json.dumps([key, st.st_size, caption]).encode())
        return h.hexdigest()

    def _bucket_list(self) -> list[list[int]] | None:
        return None if self.buckets is None else [[b.height, b.width] for b in self.buckets]
