#!/usr/bin/env bash
# DC-Gen on the toy world through the command line, the way a FLUX user runs it on a real model:
# the world as files, precompute, the three stages (examples/toy_dcgen_f32c32.toml: the settings
# `dcgen demo` trains with), export, generate, and the toy evaluator's score of the exported
# pipeline on the demo's held-out prompts.
#
#   bash scripts/toy_cli_recipe.sh [WORK_DIR]        (default: toy; 3-6 minutes on a 2-core CPU)
#
# Environment: IMAGES (training images, default 2048), SCALE (multiplies the stage-2 / stage-3
# steps and the stage-1 refinement, default 1), PROMPTS (scored prompts, default 128).
set -euo pipefail
cd "$(dirname "$0")/.."
W=${1:-toy}
CONFIG=examples/toy_dcgen_f32c32.toml
scale() { python3 -c "print(max(1, round($1 * ${SCALE:-1})))"; }

python3 -m dcgen.toy.recipe export "$W" --images "${IMAGES:-2048}"
dcgen precompute --data "$W/data" --dcae "$W/dcae" --base-vae "$W/vae" --text-encoders "$W/text" \
    --resolution 128 --dtype fp32 --encoder-dtype fp32 --device cpu --out "$W/cache" --no-progress
shared=(--set "cache_dir=$W/cache" --set "dcae=$W/dcae" --no-progress)
dcgen align --config "$CONFIG" "${shared[@]}" --set "transformer=$W/transformer" \
    --set "align_sgd_steps=$(scale 200)" --out "$W/runs/align"
dcgen output --config "$CONFIG" "${shared[@]}" --set "transformer=$W/runs/align/transformer" \
    --set "steps=$(scale 500)" --out "$W/runs/output"
dcgen finetune --config "$CONFIG" "${shared[@]}" --set "transformer=$W/runs/output/transformer" \
    --set "steps=$(scale 1000)" --out "$W/runs/finetune"
dcgen export --transformer "$W/runs/output/transformer" \
    --latent-layers "$W/runs/finetune/latent_layers.safetensors" --lora "$W/runs/finetune" \
    --dcae "$W/dcae" --text-encoders "$W/text" --out "$W/pipeline"
dcgen generate --pipeline "$W/pipeline" --height 128 --width 128 --seed 0 1 2 3 \
    --prompt "a large red circle top left and a small blue square bottom right" \
    --out "$W/shapes.png" --no-progress
python3 -m dcgen.toy.recipe score "$W/pipeline" --prompts "${PROMPTS:-128}"
