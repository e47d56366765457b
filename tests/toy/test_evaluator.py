"""Evaluator pieces that do not need the trained weights: scoring, Frechet distance, I/O."""

from __future__ import annotations

import pytest
import torch

from dcgen.toy.evaluator import (
    ShapeEvaluator,
    evaluator_loss,
    frechet_distance,
    label_accuracy,
    score_prompts,
)
from dcgen.toy.shapes import POSITIONS, ShapesWorld, labels_of, parse_caption


def test_score_prompts_counts_every_asked_attribute():
    captions = ["a small red circle top left and a large blue square bottom right"]
    truth = labels_of(parse_caption(captions[0]))[None]
    assert score_prompts(truth, captions)["prompt_accuracy"] == 1.0
    wrong = truth.clone()
    wrong[0, 3, 2] = (wrong[0, 3, 2] + 1) % 4  # bottom right: another colour
    s = score_prompts(wrong, captions)
    assert s["prompt_accuracy"] == 0.0
    assert s["colour_accuracy"] == 0.5 and s["shape_accuracy"] == 1.0
    # An extra object elsewhere is not asked about, so it does not count against the prompt.
    extra = truth.clone()
    extra[0, 1] = torch.tensor([1, 0, 0, 0])
    assert score_prompts(extra, captions)["prompt_accuracy"] == 1.0


def test_label_accuracy_ignores_empty_quadrant_attributes():
    labels = labels_of(parse_caption("a small red circle top left"))[None]
    pred = labels.clone()
    pred[labels < 0] = 2  # anything where the truth is "no attribute"
    assert label_accuracy(pred, labels) == 1.0
    empty = torch.zeros(0, len(POSITIONS), 4, dtype=torch.long)
    with pytest.raises(ValueError, match="no labelled entries"):  # was NaN (0 / 0)
        label_accuracy(empty, empty)


def test_frechet_distance_properties():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(400, 8, generator=g)
    b = torch.randn(400, 8, generator=g)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)
    same = frechet_distance(a, b)
    shifted = frechet_distance(a, b + 3.0)
    assert same < 0.5 < shifted
    assert shifted == pytest.approx(same + 9 * 8, rel=0.05)  # |mu difference|^2 dominates
    assert frechet_distance(a, b) == pytest.approx(frechet_distance(b, a), rel=1e-6)
    with pytest.raises(ValueError, match="expected \\(N, D\\)"):
        frechet_distance(a, b[:, :4])


def test_untrained_evaluator_shapes_loss_and_roundtrip(tmp_path):
    torch.manual_seed(0)
    model = ShapeEvaluator()
    x, _, labels = ShapesWorld(size=128).batch(0, 4)
    logits = model(x)
    assert logits["colour"].shape == (4, 4, 4)
    loss = evaluator_loss(logits, labels)
    assert torch.isfinite(loss)
    loss.backward()
    assert model.features(x).shape == (4, model.config.feature_dim)
    model.save_pretrained(tmp_path / "ev")
    again = ShapeEvaluator.from_pretrained(tmp_path / "ev")
    assert torch.equal(again.predict(x), model.eval().predict(x))
    with pytest.raises(ValueError, match="expected \\(B, 3, H, W\\)"):
        model(torch.zeros(2, 1, 128, 128))


def test_images_outside_minus_one_one_are_an_error_not_a_clamped_score():
    torch.manual_seed(0)
    model = ShapeEvaluator().eval()
    x, _, _ = ShapesWorld(size=128).batch(0, 2)
    # A decoder's small overshoot is clamped as before; [0, 255] pixels were clamped to a
    # white image and scored 0 accuracy without a word.
    overshoot = x.clone()
    overshoot[0, 0, 0, 0], overshoot[1, 2, 5, 5] = 1.05, -1.05
    assert model.features(overshoot).shape == (2, model.config.feature_dim)
    for call in (model.predict, model.features):
        with pytest.raises(ValueError, match=r"expected images in \[-1, 1\], got values in \[3"):
            call((x + 1) * 127.5)


def test_non_finite_images_score_wrong_not_as_class_0():
    torch.manual_seed(0)
    model = ShapeEvaluator().eval()
    images = torch.full((2, 3, 128, 128), float("nan"))
    pred = model.predict(images)
    assert (pred == -1).all()  # no class at all, not argmax(NaN) = 0
    # Class 0 of shape and colour is a circle and red: a NaN image scored 1.0 on both.
    s = score_prompts(pred, ["a large red circle top left"] * 2)
    assert all(v == 0.0 for v in s.values()), s


def test_frechet_distance_names_non_finite_rows():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(10, 4, generator=g), torch.randn(10, 4, generator=g)
    a[0, 0], a[3, 1] = float("nan"), float("inf")
    # Was NaN or a LinAlgError from eigh, depending on the data.
    with pytest.raises(ValueError, match="2 of 10 rows"):
        frechet_distance(a, b)
    with pytest.raises(ValueError, match="2 of 10 rows"):
        frechet_distance(b, a)


def test_score_prompts_rejects_an_empty_set():
    empty = torch.zeros(0, len(POSITIONS), 4, dtype=torch.long)
    with pytest.raises(ValueError, match="no prompts to score"):  # was 0.0 accuracy
        score_prompts(empty, [])
