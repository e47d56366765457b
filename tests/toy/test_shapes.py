"""The toy dataset: deterministic, captions that parse back to the ground truth."""

from __future__ import annotations

import pytest
import torch

from dcgen.toy.shapes import (
    COLOURS,
    POSITIONS,
    SHAPES,
    ShapesWorld,
    caption_of,
    labels_of,
    parse_caption,
)


def test_same_seed_and_index_give_the_same_sample():
    a, b = ShapesWorld(seed=3), ShapesWorld(seed=3)
    for i in (0, 7, 12345):
        sa, sb = a.sample(i), b.sample(i)
        assert torch.equal(sa.image, sb.image)
        assert sa.caption == sb.caption


def test_different_seeds_and_indices_differ():
    w0, w1 = ShapesWorld(seed=0), ShapesWorld(seed=1)
    assert not torch.equal(w0.sample(0).image, w1.sample(0).image)
    assert not torch.equal(w0.sample(0).image, w0.sample(1).image)


def test_images_are_in_range_with_the_requested_size():
    x, captions, labels = ShapesWorld(size=64).batch(0, 6)
    assert x.shape == (6, 3, 64, 64)
    assert x.min() >= -1 and x.max() <= 1
    assert labels.shape == (6, len(POSITIONS), 4)
    assert len(captions) == 6


def test_captions_parse_back_to_the_drawn_objects():
    world = ShapesWorld(seed=5)
    for i in range(50):
        s = world.sample(i)
        assert parse_caption(s.caption) == s.objects
        assert caption_of(s.objects) == s.caption
        assert 1 <= len(s.objects) <= 2
        assert len({o.position for o in s.objects}) == len(s.objects)  # one object per quadrant


def test_labels_mark_occupied_quadrants():
    s = ShapesWorld(seed=2).sample(4)
    labels = labels_of(s.objects)
    occupied = {POSITIONS.index(o.position) for o in s.objects}
    for q in range(len(POSITIONS)):
        assert labels[q, 0] == int(q in occupied)
        if q not in occupied:
            assert (labels[q, 1:] == -1).all()
    for o in s.objects:
        row = labels[POSITIONS.index(o.position)]
        assert SHAPES[row[1]] == o.shape and list(COLOURS)[row[2]] == o.colour


def test_objects_are_visible_in_their_quadrant():
    # The object's colour dominates its quadrant's most saturated pixels.
    world = ShapesWorld(seed=0)
    for i in range(10):
        s = world.sample(i)
        img = (s.image + 1) * 127.5
        half = img.shape[-1] // 2
        for o in s.objects:
            r, c = divmod(POSITIONS.index(o.position), 2)
            quad = img[:, r * half : (r + 1) * half, c * half : (c + 1) * half].reshape(3, -1)
            sat = quad.max(0).values - quad.min(0).values
            top = quad[:, sat >= sat.max() - 1].mean(1)
            target = torch.tensor(COLOURS[o.colour], dtype=torch.float32)
            others = [
                torch.tensor(v, dtype=torch.float32) for k, v in COLOURS.items() if k != o.colour
            ]
            assert (top - target).norm() < min((top - t).norm() for t in others)


@pytest.mark.parametrize(
    "caption",
    ["a red circle top left", "a huge red circle top left", "a small red circle middle left"],
)
def test_parse_caption_rejects_text_outside_the_grammar(caption):
    with pytest.raises(ValueError, match="caption part"):
        parse_caption(caption)


def test_bad_arguments():
    with pytest.raises(ValueError, match="multiple of 32"):
        ShapesWorld(size=100)
    with pytest.raises(IndexError):
        ShapesWorld(length=3)[3]
    with pytest.raises(ValueError, match=r"size: expected a multiple of 32 \(>= 32\), got '64'"):
        ShapesWorld(size="64")
    with pytest.raises(ValueError, match="seed: expected a non-negative int, got -1"):
        ShapesWorld(seed=-1)
    with pytest.raises(ValueError, match="length: expected an int >= 1, got 2.5"):
        ShapesWorld(length=2.5)
    world = ShapesWorld(size=32)
    with pytest.raises(ValueError, match="count: expected a positive int, got 0"):
        world.batch(0, 0)
    with pytest.raises(ValueError, match="batch_size: expected a positive int, got 0"):
        world.iter_batches(0)  # raised on the call, not at the first next()
    with pytest.raises(IndexError, match="sample index: expected an int >= 0, got 1.5"):
        world.sample(1.5)


def test_seeds_past_32_bits_are_their_own_worlds():
    """Seeds used to be masked to 32 bits, so seed 2**32 silently repeated seed 0."""
    a, b = ShapesWorld(seed=0, size=32), ShapesWorld(seed=2**32, size=32)
    assert not torch.equal(a.sample(0).image, b.sample(0).image)


def test_parse_caption_rejects_two_objects_in_one_quadrant():
    # labels_of keeps one row per quadrant, so the second object would vanish from the labels
    with pytest.raises(ValueError, match="two objects at 'top left'"):
        parse_caption("a small red circle top left and a large blue square top left")
