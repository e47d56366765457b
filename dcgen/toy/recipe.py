"""The toy world as files, for the post-training commands a FLUX user runs.

`dcgen demo` runs DC-Gen's three stages in one process. This module lets the same run go
through the command line instead (``precompute`` -> ``align`` -> ``output`` -> ``finetune`` ->
``export`` -> ``generate``), on the files those commands take for a real model, so the recipe
can be tried, and checked, on a CPU in minutes (``scripts/toy_cli_recipe.sh``):

- ``export``: writes ``<out>/data`` (an image-caption folder of the toy dataset: PNG +
  ``.txt``), ``<out>/transformer`` (the base model), ``<out>/vae`` (its f8 AutoencoderKL),
  ``<out>/dcae`` (the f32c32 DC-AE) and ``<out>/text`` (a pipeline folder holding only the toy
  text encoder, what ``--text-encoders`` takes);
- ``score``: the prompt accuracy and Frechet distance of a pipeline folder (``dcgen export``'s
  output) on the demo's held-out prompts and seeds, with the toy evaluator.

``python -m dcgen.toy.recipe export OUT [--images N]`` / ``... score PIPELINE [--prompts N]``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from dcgen._json import dumps
from dcgen.pipelines.toy import TEXT_ENCODER_FOLDER, TOY_TEXT_ENCODER, DCGenToyPipeline

from . import assets as A
from .evaluator import frechet_distance, score_prompts
from .shapes import ShapesWorld

__all__ = ["export_world", "score_pipeline"]


def export_world(out: str | Path, images: int = 2048, root: str | Path | None = None) -> Path:
    """Write the toy world's models and ``images`` training images (the demo's: dataset seed
    ``TRAIN_SEED``) under ``out``; returns ``out``."""
    if images < 1:
        raise ValueError(f"images: expected a positive count, got {images}")
    out = Path(out)
    src = Path(root) if root is not None else A.default_assets_dir()
    if not (src / A.MANIFEST).is_file():
        raise FileNotFoundError(f"{src} is not a toy world folder (no {A.MANIFEST})")
    for name, folder in (("transformer", "transformer"), ("vae", "vae"), ("dcae", "dcae")):
        shutil.copytree(src / A.FOLDERS[name], out / folder, dirs_exist_ok=True)
    text = out / "text"
    # a folder holding only DCGenToyPipeline's text encoder: the family "toy" for --text-encoders
    shutil.copytree(src / A.FOLDERS["text_encoder"], text / TEXT_ENCODER_FOLDER, dirs_exist_ok=True)
    index = {"_class_name": DCGenToyPipeline.__name__, "text_encoder": list(TOY_TEXT_ENCODER)}
    (text / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    data = out / "data"
    data.mkdir(parents=True, exist_ok=True)
    size = int(json.loads((src / A.MANIFEST).read_text()).get("image_size", 128))
    world = ShapesWorld(A.TRAIN_SEED, size, length=images)
    from PIL import Image

    for start in range(0, images, 64):
        x, captions, _ = world.batch(start, min(64, images - start))
        pixels = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1)
        for i, (img, caption) in enumerate(zip(pixels.numpy(), captions, strict=True)):
            stem = data / f"{start + i:05d}"
            Image.fromarray(img).save(stem.with_suffix(".png"))
            stem.with_suffix(".txt").write_text(caption + "\n")
    return out


@torch.no_grad()
def score_pipeline(
    pipeline: str | Path,
    prompts: int = 128,
    steps: int = 20,
    reference_images: int = 512,
    root: str | Path | None = None,
    device: str = "cpu",
) -> dict[str, Any]:
    """Sample the demo's first ``prompts`` held-out prompts (seeds as the demo's, seed 0) with
    the pipeline folder and score them: prompt accuracy, per-attribute accuracies and the
    Frechet distance to ``reference_images`` real images (what `dcgen demo` reports)."""
    assets = A.load_toy_assets(root, device)
    pipe = DCGenToyPipeline.from_pretrained(pipeline).to(device)
    pipe.set_progress_bar_config(disable=True)
    world = ShapesWorld(A.EVAL_SEED, assets.image_size, length=prompts + reference_images)
    _, captions, _ = world.batch(0, prompts)
    real, _, _ = world.batch(prompts, reference_images)
    seeds = list(range(prompts))  # the demo's seeds at its default seed 0
    images = []
    for start in range(0, prompts, 32):
        chunk = slice(start, start + 32)
        out = pipe(
            prompt=captions[chunk],
            height=assets.image_size,
            width=assets.image_size,
            num_inference_steps=steps,
            generator=[torch.Generator().manual_seed(s) for s in seeds[chunk]],
            output_type="pt",
        ).images
        images.append(out.float().cpu() * 2 - 1)
    imgs = torch.cat(images)
    scores = score_prompts(assets.evaluator.predict(imgs.to(device)).cpu(), captions)
    fd = frechet_distance(
        assets.evaluator.features(imgs.to(device)).cpu(),
        assets.evaluator.features(real.to(device)).cpu(),
    )
    return {**scores, "frechet_distance": fd, "prompts": prompts, "steps": steps}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dcgen.toy.recipe", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    sub = parser.add_subparsers(dest="command", required=True)
    e = sub.add_parser("export", help="write the toy world's models and dataset as files")
    e.add_argument("out", help="output folder")
    e.add_argument("--images", type=int, default=2048, help="training images (default 2048)")
    s = sub.add_parser("score", help="prompt accuracy of a pipeline folder on held-out prompts")
    s.add_argument("pipeline", help="a DCGenToyPipeline folder (dcgen export's output)")
    s.add_argument("--prompts", type=int, default=128, help="held-out prompts (default 128)")
    s.add_argument("--steps", type=int, default=20, help="sampling steps (default 20)")
    args = parser.parse_args(argv)
    try:
        if args.command == "export":
            export_world(args.out, args.images)
            print(f"wrote the toy world to {args.out} ({args.images} training images)")
        else:
            result = score_pipeline(args.pipeline, args.prompts, args.steps)
            print(dumps(result, indent=1))
    except (ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
