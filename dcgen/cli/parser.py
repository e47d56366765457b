"""The `dcgen` argument parser: every subcommand, its options and help."""

from __future__ import annotations

import argparse

from .basic import _cmd_convert, _cmd_demo, _cmd_demo_dcae, _cmd_info, _cmd_presets
from .bench import _cmd_bench
from .common import DTYPES, _add_progress, _int_list
from .sample import (
    ACCELERATE_MODES,
    QUANT_FORMATS,
    _cmd_convert_quantized,
    _cmd_generate,
    _cmd_quantize,
)
from .train import STAGES, _cmd_export, _cmd_precompute, _cmd_stage

#: dcgen.bench.MODELS' names, spelled out so building the parser does not import diffusers
BENCH_MODELS = ("flux", "sana-1.6b", "sana-4.8b", "tiny", "tiny-sana")


def _add_text_prompt(
    parser: argparse.ArgumentParser, prompt_help: str, repeatable: bool = False
) -> None:
    """--prompt TEXT and the options that say how it is encoded (generate, quantize)."""
    parser.add_argument("--prompt", default=None, metavar="TEXT", help=prompt_help,
                        action="append" if repeatable else "store")  # fmt: skip
    parser.add_argument("--text-encoders", default=None, metavar="DIR",
                        help="diffusers pipeline folder whose text encoders and tokenizers "
                        "encode --prompt (default: the pipeline folder's own)")  # fmt: skip
    parser.add_argument("--max-sequence-length", type=int, default=None, metavar="N",
                        help="text tokens of --prompt (default: 512 for FLUX, 300 for SANA)")  # fmt: skip


def _add_lora(parser: argparse.ArgumentParser, what: str) -> None:
    """--lora PATH (repeatable) and --lora-scale (generate, quantize)."""
    parser.add_argument("--lora", action="append", default=None, metavar="PATH",
                        help=f"a LoRA made for the base model (FLUX.1 or SANA; a .safetensors "
                        f"file or a folder with pytorch_lora_weights.safetensors; diffusers, "
                        f"kohya, xlabs formats), fused into the transformer {what}; repeat to "
                        f"stack several. Entries for the latent-facing layers are skipped")  # fmt: skip
    parser.add_argument("--lora-scale", action="append", type=float, default=None,
                        metavar="S", help="strength of each --lora (one value for all, or one "
                        "per --lora; default 1)")  # fmt: skip


VERBOSE_HELP = "log at INFO level; tracebacks on errors"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="dcgen", description="DC-Gen: DiTs in deep-compression latent spaces"
    )
    p.add_argument("-v", "--verbose", action="store_true", help=VERBOSE_HELP)
    sub = p.add_subparsers(dest="command", required=True)
    fmt = argparse.RawDescriptionHelpFormatter

    d = sub.add_parser(
        "demo",
        help="DC-Gen end to end on the shipped toy world (6-9 minutes on a 2-core CPU)",
    )
    d.add_argument("--out", default="dcgen_demo", help="run folder (default: ./dcgen_demo)")
    d.add_argument("--fast", action="store_true", help="a few steps of everything (smoke test)")
    d.add_argument(
        "--scale", type=float, default=1.0, help="multiply the three stages' step counts"
    )
    d.add_argument("--assets", default=None, help="toy world folder (default: the shipped one)")
    d.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    d.add_argument(
        "--device", choices=["cpu", "cuda"], default=None, help="default: cuda when available"
    )
    for flag, kind, what in (
        ("--train-images", int, "training images encoded into both latent spaces"),
        ("--eval-prompts", int, "held-out prompts sampled per model"),
        ("--align-sgd-steps", int, "stage-1 refinement steps after the ridge fit"),
        ("--output-steps", int, "stage-2 steps"),
        ("--lora-steps", int, "stage-3 (and naive baseline) LoRA steps"),
        ("--lora-rank", int, "LoRA rank"),
        ("--sampling-steps", int, "Euler steps per image"),
        ("--batch-size", int, "training batch size"),
        ("--lr", float, "learning rate of stages 2 and 3 and the refinement"),
        ("--checkpoint-every", int, "training steps between checkpoints (default 100)"),
    ):
        d.add_argument(flag, type=kind, default=None, help=what)
    d.add_argument(
        "--resume",
        action="store_true",
        help="continue a killed run in --out (same settings) from its checkpoints instead of "
        "starting over",
    )
    d.add_argument(
        "--positions",
        choices=["base", "grid"],
        default=None,
        help="RoPE positions of the DC-AE models: spaced to span the base grid (default) or "
        "on the DC-AE token grid",
    )
    d.add_argument(
        "--latency-sizes",
        type=_int_list("image sizes in pixels"),
        default=None,
        help="comma-separated larger image sizes for the base vs DC-Gen latency sweep "
        "(default 256,512,768,1024; '' for none)",
    )
    d.add_argument(
        "--curve-steps",
        type=_int_list("LoRA step counts"),
        default=None,
        help="LoRA steps at which the naive run and stage 3 are also evaluated (default "
        "100,300; '' for none)",
    )
    d.add_argument("--no-progress", action="store_true", help="no progress bars")
    d.set_defaults(fn=_cmd_demo)

    r = sub.add_parser(
        "demo-dcae", help="DC-AE round trip on the bundled picture: fit, tiled decode, save/load"
    )
    r.add_argument("--out", default="dcgen_demo_dcae", help="run folder")
    r.add_argument("--steps", type=int, default=300, help="training steps (default 300)")
    r.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    r.add_argument(
        "--device", choices=["cpu", "cuda"], default=None, help="default: cuda when available"
    )
    r.add_argument("--image", default=None, help="use this image instead of the bundled one")
    r.set_defaults(fn=_cmd_demo_dcae)

    sub.add_parser("info", help="how dcgen._C was built").set_defaults(fn=_cmd_info)
    sub.add_parser("presets", help="list DC-AE presets").set_defaults(fn=_cmd_presets)

    c = sub.add_parser(
        "convert-dcae", help="DC-AE checkpoint (original or diffusers) -> diffusers folder"
    )
    c.add_argument(
        "src", help="original mit-han-lab checkpoint (file or folder) or diffusers folder"
    )
    c.add_argument("dst", help="output diffusers AutoencoderDC folder")
    c.add_argument("--preset", default=None, help="config preset when SRC has no config.json")
    c.add_argument(
        "--dtype",
        choices=sorted(DTYPES),
        default=None,
        help="storage dtype (default: the source's)",
    )
    c.set_defaults(fn=_cmd_convert)

    # -- precompute
    pc = sub.add_parser(
        "precompute",
        help="encode an image-caption folder once into a latent cache for the training stages",
        formatter_class=fmt,
        description="""\
Encode every image of an image-caption folder with the DC-AE (dcae_latent, scaled), optionally
the base model's autoencoder (base_latent, needed by stage 1: for FLUX an AutoencoderKL's
(mode - shift_factor) * scaling_factor as FluxPipeline makes it, for SANA its DC-AE's scaled
latent), and attach text embeddings (prompt_embeds, pooled_prompt_embeds, ...;
needed by stages 2 and 3). Resumable: rerunning keeps finished shards. Under torchrun
(torchrun --nproc_per_node N -m dcgen.cli precompute ...) each process encodes every N-th
shard on its own GPU and rank 0 writes the index: the cache one process writes.

Text embeddings (from the base model's own text encoders, a file, or any function):
  --text-encoders DIR         the base model's diffusers pipeline folder (FLUX.1: CLIP + T5,
                              SANA: Gemma with its attention mask), run here on --device exactly
                              as the pipelines encode a prompt (--max-sequence-length tokens);
  --text-embeddings FILE|DIR  safetensors with tensors "<i>/prompt_embeds" (T, D),
                              "<i>/pooled_prompt_embeds" (D',) [, "<i>/<other>"] and metadata
                              {"format": "dcgen.text_embeddings", "captions": JSON list}, <i> =
                              the caption's index in that list; a DIR merges its files.
                              Write one with dcgen.train.prepare.save_text_embeddings.
  --text-encoder MOD:FUNC     FUNC(captions: list[str]) -> {"prompt_embeds": (B, T, D),
                              "pooled_prompt_embeds": (B, D'), ...}, imported from sys.path.
  A file and an encoder: the file where it has the caption, the encoder for the rest. None:
  latents only (enough for stage 1). With an encoder (or a file holding ""), the empty prompt's
  embeddings go to <out>/null_text.safetensors too, for caption_dropout in stages 2-3.""",
    )
    pc.add_argument("--data", required=True, metavar="DIR",
                    help="image folder, searched recursively (symlinked folders followed); "
                         "captions (UTF-8) in <stem>.txt or metadata.jsonl")  # fmt: skip
    pc.add_argument("--dcae", required=True, metavar="DCAE",
                    help="DC-AE folder/checkpoint, or a preset name (random weights: smoke "
                    "tests only)")  # fmt: skip
    pc.add_argument("--base-vae", default=None, metavar="DIR",
                    help="base model's autoencoder: an AutoencoderKL folder (FLUX), a DC-AE "
                    "folder or checkpoint (SANA), or a pipeline folder with vae/; adds "
                    "base_latent for stage 1")  # fmt: skip
    pc.add_argument("--base-patch-size", type=int, default=None, metavar="P",
                    help="the base DiT's token packing on --base-vae's latents (default: 2 for "
                    "an AutoencoderKL, FLUX's 2x2; 1 for a DC-AE, SANA's)")  # fmt: skip
    pc.add_argument("--text-embeddings", default=None, metavar="FILE_OR_DIR",
                    help="precomputed text-embeddings file or folder (format above)")  # fmt: skip
    text_src = pc.add_mutually_exclusive_group()
    text_src.add_argument("--text-encoders", default=None, metavar="DIR",
                          help="diffusers pipeline folder whose text encoders embed the "
                          "captions (above)")  # fmt: skip
    text_src.add_argument("--text-encoder", default=None, metavar="MODULE:FUNCTION",
                          help="callable that embeds a list of captions (contract above)")  # fmt: skip
    pc.add_argument("--max-sequence-length", type=int, default=None, metavar="N",
                    help="text tokens with --text-encoders (default: 512 for FLUX, 300 for "
                    "SANA)")  # fmt: skip
    pc.add_argument("--out", required=True, metavar="CACHE_DIR", help="latent cache folder")
    size = pc.add_mutually_exclusive_group()
    size.add_argument("--resolution", type=int, default=None, metavar="PIXELS",
                      help="resize + centre-crop every image to PIXELS x PIXELS (default 1024 "
                      "when --buckets is not given)")  # fmt: skip
    size.add_argument("--buckets", default=None, metavar="AREA",
                      help="aspect-ratio buckets of about AREA pixels (1048576 or 1024x1024); "
                      "each image goes to the nearest aspect")  # fmt: skip
    pc.add_argument("--shard-size", type=int, default=256, metavar="N",
                    help="samples per cache shard file (default 256)")  # fmt: skip
    pc.add_argument("--batch-size", type=int, default=8, metavar="N",
                    help="images per encoder call (default 8)")  # fmt: skip
    pc.add_argument("--dtype", choices=sorted(DTYPES), default="bf16",
                    help="storage dtype of the cached tensors (default bf16)")  # fmt: skip
    pc.add_argument("--encoder-dtype", choices=sorted(DTYPES), default="fp32",
                    help="dtype the autoencoders and --text-encoders run in (default fp32; fp16 "
                         "text encoders run in bf16)")  # fmt: skip
    pc.add_argument("--device", choices=["cpu", "cuda"], default=None,
                    help="where the autoencoders and --text-encoders run (default: cuda when "
                         "available)")  # fmt: skip
    pc.add_argument("--num-workers", type=int, default=0, metavar="N",
                    help="DataLoader workers decoding images (default 0)")  # fmt: skip
    pc.add_argument("--overwrite", action="store_true",
                    help="replace a cache made from other data or settings")  # fmt: skip
    _add_progress(pc)
    pc.set_defaults(fn=_cmd_precompute)

    # -- the three stages
    what = {
        "align": "stage 1: align the new patch embedder to the base model's tokens",
        "output": "stage 2: train the new output layer with flow matching, DiT frozen",
        "finetune": "stage 3: LoRA on the DiT blocks + embedder/head, flow matching",
    }
    for stage in STAGES:
        sp = sub.add_parser(
            stage,
            help=what[stage],
            formatter_class=fmt,
            description=f"""\
DC-Gen {what[stage]}.

The config file (TOML, JSON, or YAML with pyyaml) holds TrainConfig keys. It may serve all three
stages: shared keys at the top level, per-stage keys in [align], [output] and [finetune]
tables (the table of the stage being run overrides the shared keys). The stage is forced to
'{stage}'. See examples/flux_dcgen_f64c128.toml in the dcgen repository or source
distribution.""",
        )
        sp.add_argument("--config", required=True, metavar="FILE",
                        help="TOML / JSON / YAML run config (TrainConfig keys)")  # fmt: skip
        sp.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override one config key, e.g. --set steps=200 (repeatable)")  # fmt: skip
        sp.add_argument("--out", default=None, metavar="DIR",
                        help="run folder (overrides out_dir in the config)")  # fmt: skip
        _add_progress(sp)
        sp.set_defaults(fn=_cmd_stage)

    # -- export
    ex = sub.add_parser(
        "export",
        help="combine transformer + latent layers + LoRA + DC-AE into a pipeline folder",
        formatter_class=fmt,
        description="""\
Load the transformer, apply the latent-layers file (replacing the embedder/head when the channel
count differs), load and fuse the LoRA, and write a diffusers pipeline folder (transformer/,
vae/ = the DC-AE, scheduler/, model_index.json, and with --text-encoders the base model's text
encoders and tokenizers) that DCGenFluxPipeline / DCGenSanaPipeline .from_pretrained and
`dcgen generate` load.""",
    )
    ex.add_argument("--transformer", required=True, metavar="DIR",
                    help="transformer folder (base or adapted), or a folder holding "
                    "transformer/ (a stage's out_dir, a diffusers pipeline)")  # fmt: skip
    ex.add_argument("--latent-layers", default=None, metavar="FILE",
                    help="latent_layers.safetensors from a stage (new embedder + head; "
                    "default with --lora: the one in that folder)")  # fmt: skip
    ex.add_argument("--lora", default=None, metavar="DIR",
                    help="folder with pytorch_lora_weights.safetensors (stage 3); fused")  # fmt: skip
    ex.add_argument("--dcae", required=True, metavar="DIR",
                    help="the DC-AE the model was trained with (folder or checkpoint)")  # fmt: skip
    ex.add_argument("--out", required=True, metavar="DIR", help="pipeline folder to write")
    ex.add_argument("--dtype", choices=sorted(DTYPES), default="bf16",
                    help="storage dtype of the weights (default bf16; fusing runs in fp32)")  # fmt: skip
    ex.add_argument("--family", choices=["flux", "sana"], default=None,
                    help="DiT family (default: from the transformer's config.json)")  # fmt: skip
    ex.add_argument("--shift-rule", choices=["auto", "flux", "sqrt", "constant", "none"],
                    default="auto",
                    help="timestep-shift rule stored in the pipeline (default auto: FLUX mu "
                    "rule for FLUX, the scheduler's constant shift for SANA)")  # fmt: skip
    ex.add_argument("--shift", type=float, default=None,
                    help="constant scheduler shift (default: FLUX dynamic shifting; SANA 3.0)")  # fmt: skip
    ex.add_argument("--lora-scale", type=float, default=1.0,
                    help="scale of the LoRA delta when fusing (default 1.0)")  # fmt: skip
    ex.add_argument("--text-encoders", default=None, metavar="DIR",
                    help="base model's diffusers pipeline folder: its text encoders and "
                    "tokenizers are copied into the output, which then takes text prompts")  # fmt: skip
    ex.add_argument("--link-text-encoders", action="store_true",
                    help="symlink the --text-encoders subfolders instead of copying them "
                    "(T5-XXL alone is 9.5 GB)")  # fmt: skip
    ex.set_defaults(fn=_cmd_export)

    # -- generate
    g = sub.add_parser(
        "generate",
        help="sample images from a saved pipeline folder, from a text prompt or its embeddings",
        formatter_class=fmt,
        description="""\
Load a pipeline folder (DCGenFluxPipeline, DCGenSanaPipeline or BaseFluxPipeline, by the class in
model_index.json; a diffusers FluxPipeline folder such as FLUX.1-dev's loads as BaseFluxPipeline,
a SanaPipeline folder as DCGenSanaPipeline on its DC-AE: the base models, for comparisons; the
DCGenToyPipeline folder `dcgen demo` writes, <out>/pipeline, loads too) and write PNGs. The prompt is one of:
  --prompt TEXT        encoded by the text encoders of the pipeline folder (`dcgen export
                       --text-encoders` puts them there) or of --text-encoders DIR (the base
                       model's diffusers folder: FLUX.1's CLIP + T5, SANA's Gemma), once for
                       all seeds; the encoders are then dropped before sampling;
  --prompt-embeds FILE a safetensors file with prompt_embeds (T, D) or (1, T, D),
                       pooled_prompt_embeds (FLUX), prompt_attention_mask (SANA, optional) and
                       optionally negative_* of each for --true-cfg; or a text-embeddings table
                       from precompute's format, with --caption choosing the entry.
Several --seed values give one PNG per seed (<out>-seed<N>.png) plus a grid at --out. Under
torchrun each process samples every N-th (prompt, seed batch) on its own GPU and writes
those files; process 0 then waits for the others' and writes the grid.""",
    )
    g.add_argument("--pipeline", required=True, metavar="DIR", help="pipeline folder")
    _add_text_prompt(
        g, "text prompt (needs text encoders: see above); repeat it for several prompts, one "
        "image each (<out>-p<i>.png, a prompts x seeds grid at --out)", repeatable=True,
    )  # fmt: skip
    g.add_argument("--prompt-file", default=None, metavar="FILE",
                   help="text prompts, one per line (blank lines skipped), as repeated --prompt "
                   "(after any --prompt given)")  # fmt: skip
    g.add_argument("--negative-prompt", default=None, metavar="TEXT",
                   help="negative text prompt for --true-cfg (default there: the empty prompt)")  # fmt: skip
    g.add_argument("--prompt-embeds", default=None, metavar="FILE",
                   help="safetensors prompt embeddings (format above)")  # fmt: skip
    g.add_argument("--caption", default=None,
                   help="entry of a text-embeddings table to use as the prompt")  # fmt: skip
    g.add_argument("--negative-caption", default=None,
                   help="entry of a text-embeddings table used as negative prompt (--true-cfg)")  # fmt: skip
    g.add_argument("--height", type=int, default=1024, help="image height in pixels (default 1024)")
    g.add_argument("--width", type=int, default=1024, help="image width in pixels (default 1024)")
    g.add_argument("--steps", type=int, default=20, help="sampling steps (default 20)")
    g.add_argument("--sampler", choices=["auto", "euler", "dpm"], default="auto",
                   help="ODE solver: euler, or dpm (DPM-Solver++ 2M, SANA's); default auto: the "
                   "pipeline's scheduler decides (dpm for a DPMSolverMultistepScheduler, as SANA "
                   "folders ship; euler otherwise)")  # fmt: skip
    # None: the pipeline's default (3.5 where the model has a guidance embedding); a 3.5
    # default here made every SANA run warn that the guidance scale it never asked for is unused
    g.add_argument("--guidance", type=float, default=None,
                   help="guidance-embedding scale of guidance-distilled models (default 3.5)")  # fmt: skip
    g.add_argument("--true-cfg", type=float, default=None,
                   help="classifier-free guidance scale; > 1 needs a negative prompt (text, or "
                   "embeddings). Default: 4.5 for SANA without guidance embeddings (as "
                   "diffusers' SanaPipeline samples; 1.0 if the embeddings have no negative), "
                   "1.0 (off) for guidance-distilled FLUX")  # fmt: skip
    g.add_argument("--shift", type=float, default=None,
                   help="timestep shift override (default: the pipeline's shift rule)")  # fmt: skip
    g.add_argument("--image", default=None, metavar="FILE",
                   help="image-to-image: start from this picture (resized to --height x --width; "
                   "e.g. a 1K image re-rendered at native 4K) instead of pure noise")  # fmt: skip
    g.add_argument("--strength", type=float, default=None,
                   help="with --image: how far from the picture the sampling starts, in (0, 1]; "
                   "1 ignores it, small values keep it (default 0.6, as diffusers' "
                   "FluxImg2ImgPipeline)")  # fmt: skip
    g.add_argument("--mask", default=None, metavar="FILE",
                   help="with --image: inpaint, repainting where this picture is white (binarized "
                   "at half grey, resized to the latent grid) and keeping the rest")  # fmt: skip
    g.add_argument("--mask-blur", type=float, default=None, metavar="PX",
                   help="with --mask: blend in pixel space instead, the mask feathered by a "
                   "Gaussian of PX pixels (0 = hard edge): pixels away from the mask stay the "
                   "picture's own, byte for byte (default: the latent-grid mask alone)")  # fmt: skip
    g.add_argument("--seed", type=int, nargs="+", default=[0], metavar="N",
                   help="one or more seeds; several make a grid (default 0)")  # fmt: skip
    g.add_argument("--batch-size", type=int, default=1, metavar="N",
                   help="seeds sampled together in one call (faster on a GPU, N times the "
                   "activation memory; the same images; default 1)")  # fmt: skip
    g.add_argument("--out", default="image.png", help="output PNG (default image.png)")
    g.add_argument("--skip-existing", action="store_true",
                   help="keep the PNGs a killed (or earlier) run already wrote and sample only "
                   "the missing ones (each PNG is written as its call ends, atomically)")  # fmt: skip
    g.add_argument("--device", choices=["cpu", "cuda"], default=None,
                   help="default: cuda when available")  # fmt: skip
    g.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                   help="model dtype (default bf16 on cuda, fp32 on cpu)")  # fmt: skip
    g.add_argument("--accelerate", choices=ACCELERATE_MODES, default="auto",
                   help="dcgen's fused attention (attention), plus fused block glue (blocks), plus "
                   "each block replayed from a CUDA graph (graphs); default auto: blocks on "
                   "cuda, off on cpu")  # fmt: skip
    g.add_argument("--quantized", default=None, metavar="FILE",
                   help="a `dcgen quantize` checkpoint: its FP8 / NVFP4 linears replace the "
                   "transformer's")  # fmt: skip
    _add_lora(
        g,
        "before sampling (with --quantized: attached unmerged, in 16-bit, to the quantized layers)",
    )
    _add_progress(g)
    g.set_defaults(fn=_cmd_generate)

    # -- quantize
    q = sub.add_parser(
        "quantize",
        help="quantize a pipeline's transformer (FP8 / NVFP4) with a quality report",
        formatter_class=fmt,
        description="""\
Quantize the transformer of a pipeline folder (as generate loads it) and write one safetensors
checkpoint (dcgen.quant.save_quantized: ModelOpt-style layouts, metadata naming every quantized
layer) for `dcgen generate --quantized FILE`. The embedders, AdaLN modulation and the output head
stay in 16-bit (dcgen.quant's default exclude list; --exclude adds patterns, --include narrows).
With a prompt (--prompt TEXT or --prompt-embeds FILE, as in generate) the pipeline first runs
--calibration-steps denoising
steps at --height x --width, recording every transformer call: NVFP4 smoothing (--smoothing,
SVDQuant) takes its activation statistics from them, and the quality report compares the
quantized transformer with the 16-bit one on the middle call: per layer, per block and end to
end (JSON next to --out unless --report). The blocks are quantized one at a time, each compared
with a 16-bit copy of itself: the report holds one block copy and each block's inputs of one
call (tens of MB a block at 1024 px for FLUX), not a second model.""",
    )
    q.add_argument("--pipeline", required=True, metavar="DIR", help="pipeline folder")
    q.add_argument("--format", required=True, choices=QUANT_FORMATS,
                   help="fp8-row / fp8-block128 (W8A8, Hopper speed), nvfp4-w4a4 / nvfp4-w4a16")  # fmt: skip
    q.add_argument(
        "--out", required=True, metavar="FILE", help="checkpoint to write (.safetensors)"
    )
    q.add_argument("--rank", type=int, default=0, metavar="R",
                   help="NVFP4: rank of the 16-bit low-rank branch (SVDQuant; default 0: none)")  # fmt: skip
    q.add_argument("--smoothing", type=float, default=None, metavar="ALPHA",
                   help="NVFP4: activation smoothing exponent in [0, 1] (needs a prompt)")  # fmt: skip
    q.add_argument("--fast-accum", action="store_true",
                   help="fp8-row: accumulate in the tensor cores' own precision (faster on Hopper)")  # fmt: skip
    q.add_argument("--include", action="append", default=[], metavar="REGEX",
                   help="quantize only linears whose name matches (re.search; repeatable)")  # fmt: skip
    q.add_argument("--exclude", action="append", default=[], metavar="REGEX",
                   help="also keep these linears in 16-bit (repeatable)")  # fmt: skip
    _add_text_prompt(q, "calibration prompt as text (text encoders as in generate)")
    q.add_argument("--prompt-embeds", default=None, metavar="FILE",
                   help="calibration prompt embeddings (generate's format)")  # fmt: skip
    q.add_argument("--caption", default=None, help="entry of a text-embeddings table")
    q.add_argument(
        "--height", type=int, default=1024, help="calibration image height (default 1024)"
    )
    q.add_argument("--width", type=int, default=1024, help="calibration image width (default 1024)")
    q.add_argument("--calibration-steps", type=int, default=4, metavar="N",
                   help="denoising steps recorded for calibration (default 4)")  # fmt: skip
    q.add_argument("--seed", type=int, default=0, help="calibration noise seed (default 0)")
    q.add_argument("--report", default=None, metavar="FILE",
                   help="quality report JSON (default: <out> with .quality.json for its suffix)")  # fmt: skip
    q.add_argument("--no-report", action="store_true", help="skip the quality report")
    q.add_argument("--device", choices=["cpu", "cuda"], default=None,
                   help="default: cuda when available")  # fmt: skip
    q.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                   help="16-bit dtype of the kept layers (default bf16 on cuda, fp32 on cpu)")  # fmt: skip
    _add_lora(q, "before quantizing (the checkpoint then holds the styled model)")
    _add_progress(q)
    q.set_defaults(fn=_cmd_quantize, negative_caption=None, negative_prompt=None, true_cfg=1.0)

    # -- convert-quantized
    cq = sub.add_parser(
        "convert-quantized",
        help="a Black Forest Labs FP8 / NVFP4 FLUX checkpoint -> a dcgen quantized checkpoint",
        formatter_class=fmt,
        description="""\
Load a FLUX checkpoint Black Forest Labs quantized (FP8 with row scales, or NVFP4: ModelOpt
layout with a calibrated activation scale) through diffusers (from_single_file with
BFLQuantizationConfig, the transformer config of --pipeline), swap its quantized linears for
dcgen's with the same bytes (dcgen.quant.adopt_quantized: no re-quantization) and write a dcgen
checkpoint: `dcgen generate --pipeline DIR --quantized OUT` then samples it with dcgen's kernels
(Hopper's NVFP4 and FP8 paths too, where diffusers dequantizes every call).""",
    )
    cq.add_argument("src", help="the BFL single-file checkpoint (.safetensors)")
    cq.add_argument("--pipeline", required=True, metavar="DIR",
                    help="the matching FLUX.1 pipeline folder (its transformer/ config), or a "
                    "transformer folder")  # fmt: skip
    cq.add_argument("--out", required=True, metavar="FILE", help="dcgen checkpoint to write")
    cq.add_argument("--nvfp4-mode", choices=["w4a4", "w4a16"], default="w4a4",
                    help="NVFP4 activations: w4a4 with the checkpoint's calibrated scale "
                    "(default, as BFL runs it on Blackwell) or 16-bit (w4a16)")  # fmt: skip
    cq.add_argument("--dtype", choices=sorted(DTYPES), default="bf16",
                    help="dtype of the layers kept in 16-bit (default bf16)")  # fmt: skip
    cq.add_argument("--report", action="store_true",
                    help="also compare every quantized weight with the 16-bit one in --pipeline's "
                    "transformer (relative error, cosine): <out>.weights.json")  # fmt: skip
    cq.set_defaults(fn=_cmd_convert_quantized)

    # -- bench
    b = sub.add_parser(
        "bench",
        help="speed table: base FLUX / SANA vs DC-Gen latency per resolution (random weights)",
        formatter_class=fmt,
        description="""\
Time a base model against its DC-Gen version with random weights and random text embeddings:
denoise (N steps) and decode, batch-1 latency, batch-N throughput, peak GPU memory.
FLUX.1: base on the FLUX VAE with 2x2 patches vs DC-Gen-FLUX on DC-AE f32c32 at 1K, f64c128
above. SANA (1.6B / 4.8B configs): base on DC-AE f32c32 vs DC-Gen-SANA on f64c128, 1x1 patches.
Rows per resolution x --attention backend x --variants; --fp8 and --nvfp4 add DC-Gen rows with
FP8 / NVFP4 linears in the transformer blocks, their output error vs bf16 and weight memory. --quick builds K blocks per block list,
times S steps and extrapolates to the full depth and --steps. Writes speed.md/.json/.png.""",
    )
    b.add_argument("--model", default="flux", choices=BENCH_MODELS,
                   help="flux (FLUX.1 size), sana-1.6b, sana-4.8b, or the CPU smoke sizes tiny "
                        "(FLUX-like) and tiny-sana; default flux")  # fmt: skip
    b.add_argument("--resolutions", default=None, metavar="R1,R2",
                   help="square sizes in pixels (default: 1024,2048,4096; tiny: 64,128,256; "
                        "tiny-sana: 64,128)")  # fmt: skip
    b.add_argument("--quick", action="store_true",
                   help="time K blocks and S steps, extrapolate to full depth and --steps")  # fmt: skip
    b.add_argument("--quick-blocks", type=int, default=1, metavar="K",
                   help="blocks built per block list in quick mode (default 1)")  # fmt: skip
    b.add_argument("--quick-steps", type=int, default=2, metavar="S",
                   help="steps timed in quick mode (default 2)")  # fmt: skip
    b.add_argument("--steps", type=int, default=20, help="denoising steps (default 20)")
    b.add_argument("--batch", type=int, default=1, metavar="N",
                   help="batch for the throughput run (default 1: throughput = 1/latency)")  # fmt: skip
    b.add_argument("--repeats", type=int, default=1, help="timed runs per case, median (default 1)")
    b.add_argument("--warmup", type=int, default=1, help="warm-up runs per case (default 1)")
    b.add_argument("--attention", default="default", metavar="B1,B2",
                   help="SDPA backends, one set of rows each, from default, flash, efficient, "
                        "cudnn, math (default: torch's choice; 'default,flash' adds the paper's "
                        "FA2-class setting)")  # fmt: skip
    b.add_argument("--variants", default=None, metavar="V1,V2",
                   help="stock (diffusers attention, dcgen ops on references), kernels "
                        "(dcgen.accelerate(blocks=True) + compiled kernels) and/or graphs "
                        "(kernels, each block replayed from a CUDA graph); default kernels")  # fmt: skip
    b.add_argument("--no-kernels", action="store_true",
                   help="same as --variants stock (DCGEN_DISABLE_KERNELS=1)")  # fmt: skip
    b.add_argument("--fp8", action="store_true",
                   help="add DC-Gen rows with FP8 (E4M3 W8A8) transformer blocks, with the "
                        "output error vs bf16 (dcgen.quant.quality_report)")  # fmt: skip
    b.add_argument("--fp8-granularity", default="row", choices=["row", "block128"],
                   help="FP8 scales per row or per 1x128 block (default row)")  # fmt: skip
    b.add_argument("--fp8-fast-accum", action="store_true",
                   help="FP8 GEMMs accumulate without fp32 promotion (faster on Hopper, larger "
                        "summation error; row scales only)")  # fmt: skip
    b.add_argument("--nvfp4", default=None, metavar="M1,M2",
                   help="add DC-Gen rows with NVFP4 transformer blocks, one set per mode from "
                        "w4a4, w4a16, with the output error vs bf16 and the blocks' weight "
                        "memory")  # fmt: skip
    b.add_argument("--nvfp4-rank", type=int, default=0, metavar="R",
                   help="SVDQuant low-rank 16-bit branch of the NVFP4 linears (default 0: none)")  # fmt: skip
    b.add_argument("--cfg", type=float, default=None, metavar="SCALE",
                   help="classifier-free guidance scale, 1 = off (default: as the family samples: "
                   "SANA 4.5, the negative and positive prompt in one batch; FLUX.1-dev off, guidance "
                   "embedding)")  # fmt: skip
    b.add_argument("--out", default="dcgen_bench", help="output folder (default ./dcgen_bench)")
    b.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if any)")
    b.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                   help="model dtype (default bf16 on cuda, fp32 on cpu)")  # fmt: skip
    b.set_defaults(fn=_cmd_bench)
    for command in sub.choices.values():
        # -v after the command too (`dcgen presets -v` was refused); SUPPRESS: a command line
        # without it keeps the top-level value instead of resetting it to False
        command.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                             help=VERBOSE_HELP)  # fmt: skip
    return p
