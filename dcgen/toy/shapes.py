"""The toy world's data: captioned images of coloured shapes on textured backgrounds.

Every sample is a pure function of ``(seed, index)``: the same pair gives the same image,
caption and ground truth on every machine, so the dataset needs no files. An image holds one or
two objects, each in its own quadrant, described by four attributes (shape, colour, size,
position); the caption names all four for every object, e.g.
``"a large red triangle top left and a small blue circle bottom right"``. The ground truth is
what the evaluator (``dcgen.toy.evaluator``) learns to read back.

Images are drawn at twice the size and box-filtered down, so edges are anti-aliased the same
way at every size.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageDraw

from .._checks import is_int

SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 45, 40),
    "green": (45, 170, 70),
    "blue": (45, 85, 215),
    "yellow": (235, 205, 45),
}
COLOUR_NAMES: tuple[str, ...] = tuple(COLOURS)
SIZES: tuple[str, ...] = ("small", "large")
POSITIONS: tuple[str, ...] = ("top left", "top right", "bottom left", "bottom right")
MAX_OBJECTS = 2
# Object half-extent as a fraction of the quadrant side, per size (before jitter).
_SIZE_FRACTION = {"small": 0.2, "large": 0.36}


@dataclass(frozen=True)
class ShapeObject:
    shape: str
    colour: str
    size: str
    position: str

    def words(self) -> str:
        return f"a {self.size} {self.colour} {self.shape} {self.position}"

    def labels(self) -> tuple[int, int, int, int]:
        """(shape, colour, size, position) class indices."""
        return (
            SHAPES.index(self.shape),
            COLOUR_NAMES.index(self.colour),
            SIZES.index(self.size),
            POSITIONS.index(self.position),
        )


def caption_of(objects: Sequence[ShapeObject]) -> str:
    return " and ".join(o.words() for o in objects)


def parse_caption(caption: str) -> list[ShapeObject]:
    """Inverse of :func:`caption_of` (raises ValueError on a caption outside the grammar)."""
    objects = []
    for part in caption.strip().split(" and "):
        words = part.split()
        if len(words) != 6 or words[0] != "a":
            raise ValueError(
                f"caption part {part!r}: expected 'a <size> <colour> <shape> <row> <column>'"
            )
        _, size, colour, shape, row, col = words
        obj = ShapeObject(shape, colour, size, f"{row} {col}")
        if (
            shape not in SHAPES
            or colour not in COLOURS
            or size not in SIZES
            or obj.position not in POSITIONS
        ):
            raise ValueError(f"caption part {part!r}: a word is outside the toy vocabulary")
        if any(o.position == obj.position for o in objects):
            # The world draws at most one object per quadrant, and labels_of keeps one row per
            # quadrant: a second object there would be silently dropped from the labels.
            raise ValueError(
                f"caption {caption!r}: two objects at {obj.position!r}; the toy world puts at "
                "most one object in each quadrant"
            )
        objects.append(obj)
    return objects


def _rng(seed: int, index: int) -> np.random.Generator:
    if not is_int(index) or index < 0:
        raise IndexError(f"sample index: expected an int >= 0, got {index!r}")
    # numpy's SeedSequence takes integers of any size, so seeds past 2**32 stay distinct
    # (they used to be masked to 32 bits, making seed 2**32 a copy of seed 0).
    return np.random.default_rng([int(seed), int(index)])


def sample_objects(rng: np.random.Generator) -> list[ShapeObject]:
    n = int(rng.integers(1, MAX_OBJECTS + 1))
    quadrants = sorted(rng.choice(len(POSITIONS), size=n, replace=False).tolist())
    return [
        ShapeObject(
            SHAPES[int(rng.integers(len(SHAPES)))],
            COLOUR_NAMES[int(rng.integers(len(COLOUR_NAMES)))],
            SIZES[int(rng.integers(len(SIZES)))],
            POSITIONS[q],
        )
        for q in quadrants
    ]


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A low-contrast greyish texture (stripes, checks or smooth noise), (size, size, 3) float."""
    level = rng.uniform(70, 180)
    tint = rng.uniform(-12, 12, size=3)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    kind = int(rng.integers(3))
    if kind == 0:  # stripes at a random angle and frequency
        angle = rng.uniform(0, np.pi)
        freq = rng.uniform(3, 9)
        pattern = np.sin(2 * np.pi * freq * (xx * np.cos(angle) + yy * np.sin(angle)))
    elif kind == 1:  # checks
        cells = int(rng.integers(3, 9))
        pattern = ((np.floor(xx * cells) + np.floor(yy * cells)) % 2) * 2 - 1
    else:  # smooth noise: a coarse random grid, bilinearly upsampled
        coarse = rng.standard_normal((5, 5)).astype(np.float32)
        pattern = np.asarray(
            Image.fromarray(coarse).resize((size, size), Image.Resampling.BILINEAR)
        )
        pattern = pattern / max(float(np.abs(pattern).max()), 1e-6)
    amplitude = rng.uniform(8, 22)
    bg = level + tint[None, None, :] + amplitude * pattern[..., None]
    return np.clip(bg, 0, 255).astype(np.float32)


def _draw(objects: Sequence[ShapeObject], bg: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    size = bg.shape[0]
    big = 2 * size  # supersample, then box-filter down
    canvas = Image.fromarray(bg.astype(np.uint8)).resize((big, big), Image.Resampling.NEAREST)
    draw = ImageDraw.Draw(canvas)
    quad = big / 2
    for obj in objects:
        row, col = divmod(POSITIONS.index(obj.position), 2)
        half = _SIZE_FRACTION[obj.size] * quad * rng.uniform(0.9, 1.1)
        slack = quad / 2 - half - 2
        cx = col * quad + quad / 2 + rng.uniform(-slack, slack) * 0.5
        cy = row * quad + quad / 2 + rng.uniform(-slack, slack) * 0.5
        shade = rng.uniform(0.88, 1.05)
        fill = tuple(int(np.clip(c * shade, 0, 255)) for c in COLOURS[obj.colour])
        box = (cx - half, cy - half, cx + half, cy + half)
        if obj.shape == "circle":
            draw.ellipse(box, fill=fill)
        elif obj.shape == "square":
            draw.rectangle(box, fill=fill)
        else:
            draw.polygon(
                [(cx, cy - half), (cx + half, cy + half * 0.85), (cx - half, cy + half * 0.85)],
                fill=fill,
            )
    return np.asarray(canvas.resize((size, size), Image.Resampling.BOX), dtype=np.float32)


@dataclass
class ShapeSample:
    image: torch.Tensor  # (3, H, W) in [-1, 1]
    caption: str
    objects: list[ShapeObject]


class ShapesWorld(torch.utils.data.Dataset):
    """Deterministic synthetic dataset: ``world[i]`` is a dict with ``pixel_values`` (3, H, W)
    in [-1, 1], ``caption`` and ``labels`` (a (4, 4) long tensor: one row per quadrant, columns
    present / shape / colour / size, -1 where the quadrant is empty).

    ``length`` only bounds ``len()`` (for loaders); any index >= 0 works with :meth:`sample`.
    Different ``seed`` values give disjoint-looking datasets (train vs evaluation prompts).
    """

    def __init__(self, seed: int = 0, size: int = 128, length: int = 10_000) -> None:
        if not is_int(seed) or seed < 0:
            raise ValueError(f"seed: expected a non-negative int, got {seed!r}")
        if not is_int(size) or size < 32 or size % 32:
            raise ValueError(f"size: expected a multiple of 32 (>= 32), got {size!r}")
        if not is_int(length) or length < 1:
            raise ValueError(f"length: expected an int >= 1, got {length!r}")
        self.seed, self.size, self.length = int(seed), int(size), int(length)

    def __len__(self) -> int:
        return self.length

    def sample(self, index: int) -> ShapeSample:
        rng = _rng(self.seed, index)
        objects = sample_objects(rng)
        bg = _background(rng, self.size)
        arr = _draw(objects, bg, rng)
        image = torch.from_numpy(arr).permute(2, 0, 1) / 127.5 - 1.0
        return ShapeSample(image, caption_of(objects), objects)

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < self.length:
            raise IndexError(
                f"index {index} out of range for a ShapesWorld of length {self.length}"
            )
        s = self.sample(index)
        return {"pixel_values": s.image, "caption": s.caption, "labels": labels_of(s.objects)}

    def batch(self, start: int, count: int) -> tuple[torch.Tensor, list[str], torch.Tensor]:
        """Samples ``start .. start+count-1`` stacked: (images, captions, labels)."""
        if not is_int(count) or count < 1:
            raise ValueError(f"count: expected a positive int, got {count!r}")
        items = [self.sample(i) for i in range(start, start + count)]
        return (
            torch.stack([s.image for s in items]),
            [s.caption for s in items],
            torch.stack([labels_of(s.objects) for s in items]),
        )

    def iter_batches(self, batch_size: int, start: int = 0) -> Iterator[tuple]:
        """Endless consecutive batches of ``batch_size`` from ``start`` (see :meth:`batch`)."""
        if not is_int(batch_size) or batch_size < 1:  # checked here, not at the first next()
            raise ValueError(f"batch_size: expected a positive int, got {batch_size!r}")
        return self._batches(batch_size, start)

    def _batches(self, batch_size: int, start: int) -> Iterator[tuple]:
        i = start
        while True:
            yield self.batch(i, batch_size)
            i += batch_size


def labels_of(objects: Sequence[ShapeObject]) -> torch.Tensor:
    """(4, 4) long: per quadrant [present, shape, colour, size], -1 for the attributes of an
    empty quadrant."""
    out = torch.full((len(POSITIONS), 4), -1, dtype=torch.long)
    out[:, 0] = 0
    for o in objects:
        s, c, z, p = o.labels()
        out[p] = torch.tensor([1, s, c, z])
    return out


def noise_images(count: int, size: int, seed: int = 0) -> torch.Tensor:
    """Uniform noise images in [-1, 1] (the evaluator's chance-level check)."""
    g = torch.Generator().manual_seed(seed)
    return torch.rand(count, 3, size, size, generator=g) * 2 - 1
