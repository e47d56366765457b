"""`dcgen demo` in its fast mode on the shipped toy world: every report field and file."""

from __future__ import annotations

import copy
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
    assert set(align["velocity_readout_r2"]) == {"base", "stage1", "coarse_base_latent"}
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
    # The resolution sweep (fast mode: one size, twice the toy's): 4x fewer tokens at every
    # size, both models timed, and the speed-up consistent with the two latencies.
    sweep = report["latency_by_resolution"]
    assert [r["image_size"] for r in sweep] == [2 * report["image_size"]]
    for r in sweep:
        assert r["token_ratio"] == 4
        assert r["base"]["tokens_per_image"] == (r["image_size"] // 16) ** 2
        for key in ("base", "dcgen"):
            assert r[key]["latency_s"] > 0 and r[key]["denoise_latency_s"] > 0
            assert r[key]["sequence_length"] == r[key]["tokens_per_image"] + text_tokens
        assert r["speedup"] == pytest.approx(r["base"]["latency_s"] / r["dcgen"]["latency_s"])
    lat = report["checks"]["latency_matches_token_ratio"]
    assert lat["token_ratio"] == 4 and set(lat["by_size"]) == {str(sweep[0]["image_size"])}
    assert "## Latency by resolution" in (fast_run[0] / "report.md").read_text()
    # Accuracy vs LoRA steps (fast mode: 2 LoRA steps, a snapshot after 1): both runs at every
    # step, the end points are the report rows, and the snapshot is a different model.
    curve = report["lora_curve"]
    assert curve["steps"] == [0, 1, 2]
    for run in ("naive", "dcgen"):
        assert set(curve[run]) == {"0", "1", "2"}
    assert curve["dcgen"]["0"]["prompt_accuracy"] == rows["stage1+2"]["prompt_accuracy"]
    assert curve["dcgen"]["2"]["frechet_distance"] == rows["dcgen"]["frechet_distance"]
    assert curve["naive"]["2"]["frechet_distance"] == rows["naive"]["frechet_distance"]
    fds = [curve["naive"][k]["frechet_distance"] for k in ("0", "1", "2")]
    assert len(set(fds)) == 3, fds
    assert "## Prompt accuracy vs LoRA steps" in (fast_run[0] / "report.md").read_text()
    for claim in (
        "stage1_beats_naive", "dcgen_reaches_90pct_of_base", "stage1_beats_untrained_naive"
    ):  # fmt: skip
        assert isinstance(report["checks"][claim]["holds"], bool)
    md = (fast_run[0] / "report.md").read_text()
    assert "| model | tokens / image |" in md and "## Claims" in md


def test_settings_reject_bad_values():
    with pytest.raises(ValueError, match="lora_steps"):
        DemoSettings(lora_steps=0).validate()
    with pytest.raises(ValueError, match="align_sgd_steps"):
        DemoSettings(align_sgd_steps=-1).validate()
    with pytest.raises(ValueError, match="latency_sizes"):
        DemoSettings(latency_sizes=(256, -1)).validate()
    with pytest.raises(ValueError, match="curve_steps"):
        DemoSettings(curve_steps=(0, 100)).validate()


def test_snapshots_restore_the_weights_of_their_step():
    import torch

    from dcgen.toy.demo_analysis import weight_snapshots, with_weights

    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Linear(3, 1))
    model[1].requires_grad_(False)  # frozen weights are shared, not snapshotted
    on_step, saved = weight_snapshots(model, [2])
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(1, 4):
        opt.zero_grad()
        model(torch.randn(8, 3)).pow(2).mean().backward()
        opt.step()
        on_step(step, 0.0)
        if step == 2:
            at_two = copy.deepcopy(model.state_dict())
    assert set(saved) == {2} and set(saved[2]) == {"0.weight", "0.bias"}
    restored = with_weights(model, saved[2])
    for name, value in restored.state_dict().items():
        assert torch.equal(value, at_two[name]), name
    assert not torch.equal(model[0].weight, restored[0].weight)  # the model moved on


def test_coarse_base_latents_average_the_base_latent_onto_the_new_grid():
    import torch

    from dcgen.toy.demo import coarse_base_latents

    z = torch.randn(4, 16, 16)
    (out,) = coarse_base_latents([{"base_latent": z, "dcae_latent": torch.zeros(32, 4, 4)}], 2, 2)
    coarse = out["dcae_latent"]
    # f8 latent 16x16 with 2x2 patches = an 8x8 token grid; averaged 2x -> the 4x4 DC-AE grid.
    assert coarse.shape == (16, 4, 4)
    # Channel c * 4 + dy * 2 + dx of token (i, j) is the mean of latent channel c over the
    # 2x2 pixels at (4i + 2dy, 4j + 2dx).
    c, dy, dx, i, j = 3, 1, 0, 2, 1
    y, x = 4 * i + 2 * dy, 4 * j + 2 * dx
    assert torch.allclose(coarse[c * 4 + dy * 2 + dx, i, j], z[c, y : y + 2, x : x + 2].mean())
    assert torch.equal(out["base_latent"], z)


def test_latency_sizes_must_tile_both_token_grids(tmp_path):
    # 200 px is not a whole number of 2x2-patched f8 tokens nor of f32 DC-AE tokens.
    from dcgen.toy.demo import run_demo

    with pytest.raises(ValueError, match=r"multiples of 32 pixels.*\[200\]"):
        run_demo(tmp_path, DemoSettings.fast(latency_sizes=(256, 200)), progress=False)


def test_cli_rejects_a_bad_size_list(capsys):
    with pytest.raises(SystemExit):
        main(["demo", "--fast", "--latency-sizes", "256,big"])
    assert "comma-separated image sizes" in capsys.readouterr().err


def test_settings_reject_duplicate_or_negative_feature_layers():
    with pytest.raises(ValueError, match=r"feature_layers.*duplicates.*\[1\]"):
        DemoSettings(feature_layers=(1, 0, 1)).validate()
    with pytest.raises(ValueError, match=r"feature_layers.*>= 0.*\[-1\]"):
        DemoSettings(feature_layers=(0, -1)).validate()


def test_feature_layers_beyond_the_model_are_named_before_training(tmp_path):
    # Were dropped silently (the toy model has 4 blocks), after a whole run.
    from dcgen.toy.demo import run_demo

    with pytest.raises(ValueError, match=r"feature_layers.*0\.\.3.*\[7\]"):
        run_demo(tmp_path, DemoSettings.fast(feature_layers=(0, 7)), progress=False)
    assert not (tmp_path / "stage1" / "log.jsonl").exists()


def _table_widths(md: str) -> list[int]:
    table = [line for line in md.splitlines() if line.startswith("| model |")][0]
    lines = md.splitlines()
    i = lines.index(table)
    return [len(line.strip().strip("|").split("|")) for line in lines[i : i + 3]]


def test_report_without_feature_layers_has_a_valid_table_and_no_verdict(fast_run):
    from dcgen.toy.demo_report import claims, markdown_report

    report = copy.deepcopy(fast_run[1])
    a = report["alignment"]
    a["layers"], a["feature_distance_random_embedder"], a["feature_distance_after_stage1"] = (
        [],
        [],
        [],
    )
    for row in report["rows"].values():
        row["feature_distance"] = {}
    report["checks"] = claims(report)
    assert report["checks"]["feature_distance_drop_after_stage1"]["holds"] is None
    md = markdown_report(report)
    header, delimiter, first_row = _table_widths(md)
    assert header == delimiter == first_row == 11  # was 12 header cells (an empty one)
    claim = [line for line in md.splitlines() if "Feature distance drops" in line][0]
    assert claim.endswith("not measured (no feature_layers)"), claim  # was "NO ()"


def test_resolution_section_counts_the_timed_runs(fast_run):
    from dcgen.toy.demo_report import markdown_report

    report = copy.deepcopy(fast_run[1])
    assert "one timed run after" in markdown_report(report)
    report["settings"]["resolution_repeats"] = 5
    md = markdown_report(report)
    assert "median of 5 timed runs after" in md and "one timed run" not in md


def test_a_diverged_row_is_reported_not_a_crash(fast_run):
    import torch

    from dcgen.toy.demo import quality_scores
    from dcgen.toy.demo_report import markdown_report
    from dcgen.toy.evaluator import ShapeEvaluator
    from dcgen.toy.shapes import ShapesWorld

    torch.manual_seed(0)
    evaluator = ShapeEvaluator().eval()
    real, captions, _ = ShapesWorld(size=128).batch(0, 4)
    images = real.clone()
    images[1:3] = float("nan")  # what a diverged model decodes
    # Was a LinAlgError from the Frechet distance's eigh, after all the training.
    scores = quality_scores(
        evaluator, images, captions, evaluator.features(real), torch.device("cpu")
    )
    assert scores["frechet_distance"] == math.inf and scores["non_finite_images"] == 2
    assert scores["prompt_accuracy"] <= 0.5  # the two NaN images count wrong
    report = copy.deepcopy(fast_run[1])
    report["rows"]["naive"].update(frechet_distance=math.inf, non_finite_images=2)
    md = markdown_report(report)
    assert "naive (random embedder/head + LoRA): 2 of 8 images not finite" in md
