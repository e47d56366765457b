"""`dcgen demo` in its fast mode on the shipped toy world: every report field and file."""

from __future__ import annotations

import json
import math

import pytest

from dcgen.cli import main
from dcgen.toy.demo import ROWS, DemoSettings

ROW_FIELDS = (
    "model",
    "tokens_per_image",
    "sequence_length",
    "latency_s",
    "denoise_latency_s",
    "decode_latency_s",
    "latency_ratio_to_base",
    "denoise_speedup_vs_base",
    "throughput_images_per_s",
    "throughput_vs_base",
    "speedup_vs_base",
    "prompt_accuracy",
    "prompt_accuracy_vs_base",
    "present_accuracy",
    "shape_accuracy",
    "colour_accuracy",
    "size_accuracy",
    "frechet_distance",
    "feature_distance",
)


@pytest.fixture(scope="module")
def fast_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    code = main(["demo", "--fast", "--out", str(out), "--device", "cpu", "--no-progress"])
    assert code == 0
    return out, json.loads((out / "report.json").read_text())


def test_fast_demo_writes_every_file(fast_run):
    out, _ = fast_run
    for name in ("report.md", "report.json", "grid.png", "loss_curves.png"):
        assert (out / name).is_file(), name
    for stage in ("stage1", "stage2", "stage3", "naive"):
        assert (out / stage / "log.jsonl").is_file(), stage


def test_fast_demo_report_has_every_row_and_field(fast_run):
    _, report = fast_run
    assert set(report["rows"]) == set(ROWS)
    for name, row in report["rows"].items():
        for field in ROW_FIELDS:
            assert field in row, (name, field)
        assert row["latency_s"] > 0
        # The total is the sum of its two timed parts (both positive).
        assert row["denoise_latency_s"] > 0 and row["decode_latency_s"] > 0
        assert row["latency_s"] == pytest.approx(
            row["denoise_latency_s"] + row["decode_latency_s"], rel=0.5
        )
        assert 0.0 <= row["prompt_accuracy"] <= 1.0
        assert math.isfinite(row["frechet_distance"])
        assert set(row["feature_distance"]) == {str(i) for i in report["alignment"]["layers"]}
    rows = report["rows"]
    assert rows["base"]["tokens_per_image"] == 4 * rows["dcgen"]["tokens_per_image"]
    text_tokens = rows["base"]["sequence_length"] - rows["base"]["tokens_per_image"]
    assert text_tokens > 0
    assert rows["dcgen"]["sequence_length"] == rows["dcgen"]["tokens_per_image"] + text_tokens
    assert all(v == 0 for v in rows["base"]["feature_distance"].values())
    align = report["alignment"]
    assert set(align["velocity_readout_r2"]) == {"base", "stage1"}
    assert all(r <= 1.0 and math.isfinite(r) for r in align["velocity_readout_r2"].values())
    assert 1 <= align["embedder_rank"] <= align["latent_channels"]
    assert len(align["feature_distance_random_embedder"]) == len(align["layers"]) >= 2
    # Even two refinement steps after the ridge fit bring the features far closer to the base.
    assert all(
        after < before
        for before, after in zip(
            align["feature_distance_random_embedder"], align["feature_distance_after_stage1"]
        )
    )
    for claim in ("stage1_beats_naive", "dcgen_reaches_90pct_of_base"):
        assert isinstance(report["checks"][claim]["holds"], bool)
    md = (fast_run[0] / "report.md").read_text()
    assert "| model | tokens / image |" in md and "## Claims" in md


def test_settings_reject_bad_values():
    with pytest.raises(ValueError, match="lora_steps"):
        DemoSettings(lora_steps=0).validate()
    with pytest.raises(ValueError, match="align_sgd_steps"):
        DemoSettings(align_sgd_steps=-1).validate()
