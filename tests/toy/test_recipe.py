"""The toy world through the command line (dcgen.toy.recipe, scripts/toy_cli_recipe.sh): the
world written as files, the recipe's commands on them at a few steps, and the scorer, which
reproduces `dcgen demo`'s scoring of the same model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dcgen.cli import main
from dcgen.cli.train import _read_config_file, _stage_settings
from dcgen.toy import assets as A
from dcgen.toy.recipe import export_world, score_pipeline
from dcgen.toy.recipe import main as recipe_main
from dcgen.toy.shapes import ShapesWorld
from dcgen.train.config import TrainConfig

ROOT = Path(__file__).parents[2]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return export_world(tmp_path_factory.mktemp("toy") / "toy", images=24)


def test_the_world_as_files(world):
    pngs = sorted((world / "data").glob("*.png"))
    assert len(pngs) == 24
    x, captions, _ = ShapesWorld(A.TRAIN_SEED, 128, length=24).batch(0, 24)
    for i in (0, 23):  # the dataset's images (to 8 bits) and captions, in order
        got = torch.from_numpy(np.array(Image.open(pngs[i]))).permute(2, 0, 1).float()
        assert (got / 127.5 - 1 - x[i]).abs().max() <= 1 / 127.5
        assert pngs[i].with_suffix(".txt").read_text().strip() == captions[i]
    for folder in ("transformer", "vae", "dcae", "text/text_encoder"):
        assert (world / folder / "config.json").is_file(), folder
    index = json.loads((world / "text" / "model_index.json").read_text())
    assert index["text_encoder"] == ["dcgen.toy.text", "ToyTextEncoder"]


def test_export_refuses_bad_requests(tmp_path):
    with pytest.raises(ValueError, match="positive count"):
        export_world(tmp_path / "a", images=0)
    with pytest.raises(FileNotFoundError, match="not a toy world folder"):
        export_world(tmp_path / "b", images=2, root=tmp_path)
    assert recipe_main(["export", str(tmp_path / "c"), "--images", "0"]) == 2


@pytest.mark.parametrize("stage", ["align", "output", "finetune"])
def test_the_example_config_is_the_demos(stage):
    settings = _stage_settings(
        _read_config_file(ROOT / "examples" / "toy_dcgen_f32c32.toml"), stage
    )
    config = TrainConfig.from_dict({**settings, "stage": stage})
    assert (config.batch_size, config.lr, config.align_positions) == (32, 5e-4, "base")
    assert config.mixed_precision == "no"
    if stage == "finetune":
        assert (config.steps, config.lora_rank, config.lora_alpha) == (1000, 16, 16.0)
    if stage == "output":
        assert config.steps == 500
    if stage == "align":  # the demo fits a ridge head in stage 1; stage 2 starts from it
        assert (config.align_head, config.align_sgd_steps) == ("ridge", 200)


def test_the_recipe_runs_end_to_end_and_scores(world, tmp_path):
    """scripts/toy_cli_recipe.sh's commands, at a few steps."""
    w, cache, runs = str(world), str(tmp_path / "cache"), tmp_path / "runs"
    assert main(["precompute", "--data", f"{w}/data", "--dcae", f"{w}/dcae", "--base-vae",
                 f"{w}/vae", "--text-encoders", f"{w}/text", "--resolution", "128", "--dtype",
                 "fp32", "--encoder-dtype", "fp32", "--device", "cpu", "--out", cache,
                 "--no-progress"]) == 0  # fmt: skip
    config = str(ROOT / "examples" / "toy_dcgen_f32c32.toml")
    shared = ["--config", config, "--set", f"cache_dir={cache}", "--set", f"dcae={w}/dcae",
              "--set", "batch_size=4", "--no-progress"]  # fmt: skip
    previous = f"{w}/transformer"
    for stage, steps in (("align", "align_sgd_steps=1"), ("output", "steps=1"),
                         ("finetune", "steps=1")):  # fmt: skip
        out = runs / stage
        assert main([stage, *shared, "--set", f"transformer={previous}", "--set", steps,
                     "--out", str(out)]) == 0, stage  # fmt: skip
        previous = str(out / "transformer")
    ft, pipe = runs / "finetune", tmp_path / "pipeline"
    assert main(["export", "--transformer", str(runs / "output" / "transformer"),
                 "--latent-layers", str(ft / "latent_layers.safetensors"), "--lora", str(ft),
                 "--dcae", f"{w}/dcae", "--text-encoders", f"{w}/text", "--out", str(pipe)]) == 0  # fmt: skip
    assert json.loads((pipe / "model_index.json").read_text())["_class_name"] == "DCGenToyPipeline"
    scores = score_pipeline(pipe, prompts=3, steps=2, reference_images=8)
    assert set(scores) >= {"prompt_accuracy", "shape_accuracy", "frechet_distance"}
    assert 0.0 <= scores["prompt_accuracy"] <= 1.0 and np.isfinite(scores["frechet_distance"])


def test_the_scorer_scores_as_the_demo(fast_run):
    """The fast demo's DC-Gen model, scored from its pipeline folder with the demo's prompts,
    seeds and steps: the numbers the demo reported for that row."""
    out, report = fast_run
    settings = report["settings"]
    scores = score_pipeline(
        out / "pipeline", prompts=settings["eval_prompts"], steps=settings["sampling_steps"],
        reference_images=settings["reference_images"],
    )  # fmt: skip
    row = report["rows"]["dcgen"]
    assert scores["prompt_accuracy"] == row["prompt_accuracy"]
    assert scores["frechet_distance"] == pytest.approx(row["frechet_distance"], rel=1e-4)
