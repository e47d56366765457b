"""The `dcgen` command.

dcgen demo [--out DIR] [--fast] [...] the main job: DC-Gen end to end on the shipped toy world
dcgen demo-dcae [--out DIR]            DC-AE round trip on the bundled picture (fit, tile, save)
dcgen info                             build info: compiled kernels, CUDA archs, torch
dcgen presets                          the DC-AE presets and their scaling factors
dcgen convert-dcae SRC DST [--preset NAME] [--dtype bf16]
                                       original or diffusers DC-AE checkpoint -> diffusers folder

Post-training (README "Post-training recipe"):
dcgen precompute --data DIR --dcae DCAE --out CACHE [...]   images + captions -> latent cache
dcgen align|output|finetune --config run.toml [--set k=v]   DC-Gen stages 1 / 2 / 3
dcgen export --transformer DIR --dcae DIR --out DIR [...]   stage outputs -> pipeline folder
dcgen generate --pipeline DIR --prompt-embeds FILE [...]    pipeline folder -> PNG
dcgen quantize --pipeline DIR --format nvfp4-w4a4 --out F  transformer -> FP8 / NVFP4 checkpoint
dcgen bench [--model flux|sana-1.6b|...] [--quick] [--variants stock,kernels,graphs] [--fp8]
            [--nvfp4 w4a4,w4a16]       speed table, base vs DC-Gen (md/json/png)

Errors in the input print one line and exit with status 2 (-v adds the traceback).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
#: dcgen.bench.MODELS' names, spelled out so building the parser does not import diffusers
BENCH_MODELS = ("flux", "sana-1.6b", "sana-4.8b", "tiny", "tiny-sana")


def _int_list(what: str) -> Callable[[str], tuple[int, ...]]:
    """An argparse type: '256,512' -> (256, 512), '' -> (); anything else is a usage error
    naming ``what`` was expected."""

    def parse(text: str) -> tuple[int, ...]:
        try:
            return tuple(int(v) for v in text.split(",") if v.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected comma-separated {what}, got {text!r}"
            ) from None

    return parse


def _cmd_demo(args: argparse.Namespace) -> int:
    from dcgen.toy.demo import DemoSettings, run_demo

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    overrides: dict[str, Any] = {"device": device, "seed": args.seed, "assets": args.assets}
    for name in (
        "train_images", "eval_prompts", "align_sgd_steps", "output_steps", "lora_steps",
        "lora_rank", "sampling_steps", "batch_size", "lr",
    ):  # fmt: skip
        value = getattr(args, name)
        if value is not None:
            overrides[name] = value
    if args.positions is not None:
        overrides["align_positions"] = args.positions
    for name in ("latency_sizes", "curve_steps"):
        if getattr(args, name) is not None:
            overrides[name] = getattr(args, name)
    settings = DemoSettings.fast(**overrides) if args.fast else DemoSettings(**overrides)
    if args.scale != 1.0:
        for name in ("align_sgd_steps", "output_steps", "lora_steps"):
            setattr(settings, name, max(1, round(getattr(settings, name) * args.scale)))
    settings.validate()
    print(
        f"dcgen demo: DC-Gen on the toy world ({device}): stage 1 {settings.align_sgd_steps} "
        f"refinement steps, stage 2 {settings.output_steps} steps, stage 3 {settings.lora_steps} "
        f"LoRA steps (and the naive baseline); writing {args.out}/"
    )
    run_demo(args.out, settings, progress=not args.no_progress, echo=print)
    print()
    print((Path(args.out) / "report.md").read_text())
    return 0


def _cmd_demo_dcae(args: argparse.Namespace) -> int:
    from dcgen.toy.dcae_roundtrip import RoundTripSettings, run_dcae_roundtrip

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    settings = RoundTripSettings(
        steps=args.steps,
        seed=args.seed,
        device=device,
        image=Path(args.image) if args.image else None,
    )
    print(
        f"dcgen demo-dcae: DC-AE round trip on {'the bundled image' if not args.image else args.image}, "
        f"{args.steps} training steps on {device}; writing {args.out}/"
    )
    report = run_dcae_roundtrip(args.out, settings)
    print()
    for key in (
        "image_size",
        "latent_shape",
        "compression",
        "tokens_dcae_f32_1x1",
        "tokens_flux_vae_f8_2x2",
        "psnr_random_init_db",
        "psnr_trained_db",
        "psnr_tiled_decode_db",
        "encode_ms",
        "decode_ms",
        "reload_max_abs_diff",
        "batchnorm_fold_max_abs_diff",
        "train_seconds",
    ):
        print(f"  {key:30s} {report[key]}")
    print(f"\nreport: {Path(args.out) / 'report.md'}")
    return 0


def _cmd_info(args: argparse.Namespace) -> int:
    import dcgen

    info = dcgen.build_info()
    info["dcgen_version"] = dcgen.__version__
    info["runtime_torch"] = torch.__version__
    info["cuda_available"] = torch.cuda.is_available()
    print(json.dumps(info, indent=2))
    return 0


def _cmd_presets(args: argparse.Namespace) -> int:
    from dcgen.autoencoders import get_preset, list_presets

    for name in list_presets():
        cfg = get_preset(name)
        print(
            f"{name:32s} f{cfg.spatial_compression_ratio}c{cfg.latent_channels:<4d} "
            f"scaling_factor={cfg.scaling_factor}"
        )
    return 0


def _cmd_convert(args: argparse.Namespace) -> int:
    from dcgen.autoencoders import DCAE

    model = DCAE.from_pretrained(args.src, config=args.preset)
    model.save_pretrained(args.dst, dtype=DTYPES[args.dtype] if args.dtype else None)
    print(f"wrote diffusers-format DC-AE to {args.dst}")
    return 0


class CLIError(ValueError):
    """Bad input found by the CLI itself; printed as one line, exit status 2."""


def _dtype(name: str | None) -> torch.dtype | None:
    return None if name is None else DTYPES[name]


def _device(name: str | None) -> str:
    device = name or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise CLIError("--device cuda: no CUDA device is available on this machine")
    return device


# -- precompute -------------------------------------------------------------------------------


def _cmd_precompute(args: argparse.Namespace) -> int:
    from dcgen.train.prepare import run_precompute

    resolution = args.resolution
    if resolution is None and args.buckets is None:
        resolution = 1024
    device = _device(args.device)
    print(f"dcgen precompute: {args.data} -> {args.out} on {device}", file=sys.stderr)
    cache = run_precompute(
        args.data,
        args.dcae,
        args.out,
        base_vae=args.base_vae,
        text_embeddings=args.text_embeddings,
        text_encoder=args.text_encoder,
        resolution=resolution,
        buckets=args.buckets,
        shard_size=args.shard_size,
        batch_size=args.batch_size,
        dtype=_dtype(args.dtype),
        encoder_dtype=DTYPES[args.encoder_dtype],
        device=device,
        num_workers=args.num_workers,
        overwrite=args.overwrite,
        progress=not args.no_progress,
    )
    first = cache.samples[0]
    print(f"latent cache {args.out}: {len(cache)} samples in {len(cache.shards)} shard(s)")
    for name in sorted(first["shapes"]):
        print(f"  {name:24s} {first['shapes'][name]} {first['dtypes'][name]}  (first sample)")
    return 0


# -- training stages --------------------------------------------------------------------------

STAGES = ("align", "output", "finetune")


def _read_config_file(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    text = path.read_text(encoding="utf-8")
    suffix = path.suffix.lower()
    if suffix in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError as err:
            raise CLIError(f"{path}: YAML configs need pyyaml (pip install pyyaml)") from err
        try:
            data = yaml.safe_load(text) or {}
        except yaml.YAMLError as err:
            raise CLIError(f"{path}: invalid YAML: {err}") from err
    elif suffix == ".json":
        try:
            data = json.loads(text)
        except ValueError as err:
            raise CLIError(f"{path}: invalid JSON: {err}") from err
    else:
        try:
            import tomllib
        except ImportError:  # Python 3.10
            import tomli as tomllib  # type: ignore[no-redef]
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as err:
            raise CLIError(f"{path}: invalid TOML: {err}") from err
    if not isinstance(data, dict):
        raise CLIError(f"{path}: expected a table of settings, got {type(data).__name__}")
    return data


def _stage_settings(data: dict[str, Any], stage: str) -> dict[str, Any]:
    """The flat settings for one stage from a (possibly all-stage) config file."""
    if isinstance(data.get("train"), dict):
        # TrainConfig.from_file's convention: a [train] table holds the config.
        data = data["train"]
    # One file for all three stages: shared keys at the top level, per-stage keys in
    # [align] / [output] / [finetune] tables; the table of the stage being run wins.
    merged = {k: v for k, v in data.items() if not (k in STAGES and isinstance(v, dict))}
    section = data.get(stage)
    if isinstance(section, dict):
        merged.update(section)
    return merged


def _train_config(args: argparse.Namespace, stage: str) -> Any:
    try:
        from dcgen.train.config import TrainConfig
    except ImportError as err:
        raise CLIError(f"the training stages are not available in this install ({err})") from err
    path = Path(args.config)
    settings = _stage_settings(_read_config_file(path), stage)
    settings["stage"] = stage
    if args.out is not None:
        settings["out_dir"] = str(args.out)
    for item in args.set or []:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise CLIError(f"--set {item!r}: expected KEY=VALUE")
        # Same rule as TrainConfig.with_overrides: JSON when it parses (10, [1, 4], null,
        # true), else the raw string (paths). Applied before building so the config is
        # validated once, with the overrides in place.
        try:
            settings[key.strip()] = json.loads(raw)
        except ValueError:
            settings[key.strip()] = raw
    try:
        config = TrainConfig.from_dict(settings)
    except ValueError as err:
        raise CLIError(f"{path}: {err}") from err
    config.validate()
    return config


def _cmd_stage(args: argparse.Namespace) -> int:
    config = _train_config(args, args.command)
    try:
        from dcgen.train.stages import run
    except ImportError as err:
        raise CLIError(f"the training stages are not available in this install ({err})") from err
    print(f"dcgen {args.command}: writing {config.out_dir}", file=sys.stderr)
    summary = run(config, progress=not args.no_progress)
    print(json.dumps(summary, indent=2, default=str))
    return 0


# -- export -----------------------------------------------------------------------------------


def _cmd_export(args: argparse.Namespace) -> int:
    from dcgen.train.export import export_pipeline

    print(f"dcgen export: {args.transformer} -> {args.out}", file=sys.stderr)
    out = export_pipeline(
        args.transformer,
        args.dcae,
        args.out,
        lora_dir=args.lora,
        latent_layers=args.latent_layers,
        dtype=_dtype(args.dtype),
        family=args.family,
        shift_rule=args.shift_rule,
        shift=args.shift,
        lora_scale=args.lora_scale,
    )
    print(f"wrote pipeline folder {out} (load with dcgen generate --pipeline {out})")
    return 0


# -- generate ---------------------------------------------------------------------------------

PIPELINE_CLASSES = ("DCGenFluxPipeline", "DCGenSanaPipeline", "BaseFluxPipeline")
EMBED_NAMES = ("prompt_embeds", "pooled_prompt_embeds", "prompt_attention_mask")


def _load_pipeline(folder: Path, dtype: torch.dtype, device: str) -> Any:
    import dcgen.pipelines as pipelines

    index = folder / "model_index.json"
    if not index.is_file():
        raise FileNotFoundError(f"{folder} is not a pipeline folder (no model_index.json)")
    name = json.loads(index.read_text()).get("_class_name")
    if name not in PIPELINE_CLASSES:
        raise CLIError(f"{index}: pipeline class {name!r} is not one of {list(PIPELINE_CLASSES)}")
    pipe = getattr(pipelines, name).from_pretrained(folder, torch_dtype=dtype)
    return pipe.to(device)


def _batched(t: torch.Tensor, name: str, ndim: int) -> torch.Tensor:
    """Add the batch dimension to one caption's tensor; check the rank."""
    if t.ndim == ndim - 1:
        t = t.unsqueeze(0)
    if t.ndim != ndim:
        raise CLIError(f"{name}: expected {ndim - 1} or {ndim} dims, got shape {tuple(t.shape)}")
    return t


def _prompt_kwargs(args: argparse.Namespace) -> dict[str, torch.Tensor]:
    """Pipeline keyword arguments from --prompt-embeds (plain file or text-embeddings table)."""
    from safetensors import SafetensorError, safe_open

    from dcgen.train.prepare import TEXT_EMBEDDINGS_FORMAT, TextEmbeddingTable

    path = Path(args.prompt_embeds)
    if not path.is_file():
        raise FileNotFoundError(f"prompt-embeddings file {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
            plain = {k: f.get_tensor(k) for k in f.keys() if "/" not in k}
    except (SafetensorError, OSError) as err:
        raise CLIError(f"{path} is not a readable safetensors file: {err}") from err
    kwargs: dict[str, torch.Tensor] = {}
    if meta.get("format") == TEXT_EMBEDDINGS_FORMAT:
        table = TextEmbeddingTable(path)
        caption = args.caption
        if caption is None:
            if len(table) != 1:
                raise CLIError(f"{path} holds {len(table)} captions: pick one with --caption")
            caption = table.captions[0]
        for prefix, text in (("", caption), ("negative_", args.negative_caption)):
            if text is None:
                continue
            for name, t in table.get(text).items():
                kwargs[prefix + name] = t.unsqueeze(0)
    else:
        if args.caption is not None or args.negative_caption is not None:
            raise CLIError(f"--caption needs a text-embeddings table; {path} is a plain file")
        kwargs = dict(plain)
    if "prompt_embeds" not in kwargs:
        raise CLIError(f"{path}: no prompt_embeds tensor (keys: {sorted(kwargs)})")
    known = {p + n for p in ("", "negative_") for n in EMBED_NAMES}
    unknown = sorted(set(kwargs) - known)
    if unknown:
        raise CLIError(f"{path}: unexpected tensors {unknown}; expected some of {sorted(known)}")
    ranks = {"prompt_embeds": 3, "pooled_prompt_embeds": 2, "prompt_attention_mask": 2}
    return {k: _batched(v, k, ranks[k.removeprefix("negative_")]) for k, v in kwargs.items()}


def _grid(images: list[Any]) -> Any:
    from PIL import Image

    cols = math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / cols)
    w, h = images[0].size
    out = Image.new("RGB", (cols * w, rows * h), (255, 255, 255))
    for i, im in enumerate(images):
        out.paste(im, ((i % cols) * w, (i // cols) * h))
    return out


ACCELERATE_MODES = ("auto", "off", "attention", "blocks", "graphs")


def _accelerate(transformer: torch.nn.Module, mode: str, device: str) -> None:
    """dcgen.accelerate as ``--accelerate`` asks; "auto" is "blocks" on CUDA (fused attention
    and block glue) and "off" on the CPU, where dcgen's ops run their references anyway."""
    import dcgen

    if mode == "auto":
        mode = "blocks" if device == "cuda" else "off"
    if mode == "graphs" and device != "cuda":
        raise CLIError(
            f"--accelerate graphs replays CUDA graphs: it needs --device cuda, got {device}"
        )
    if mode == "off":
        return
    dcgen.accelerate(transformer, blocks=mode in ("blocks", "graphs"), cuda_graphs=mode == "graphs")
    print(f"dcgen.accelerate: {mode}")


def _cmd_generate(args: argparse.Namespace) -> int:
    device = _device(args.device)
    dtype = (
        DTYPES[args.dtype]
        if args.dtype
        else (torch.bfloat16 if device == "cuda" else torch.float32)
    )
    out = Path(args.out)
    if out.suffix.lower() != ".png":
        raise CLIError(f"--out {out}: expected a .png file name")
    kwargs = _prompt_kwargs(args)
    pipe = _load_pipeline(Path(args.pipeline), dtype, device)
    if args.quantized is not None:
        from dcgen.quant import load_quantized

        path = Path(args.quantized)
        if not path.is_file():
            raise FileNotFoundError(f"--quantized {path}: no such file")
        layers = load_quantized(pipe.transformer, path)
        print(f"loaded {len(layers)} quantized linears from {path}")
    _accelerate(pipe.transformer, args.accelerate, device)
    pipe.set_progress_bar_config(disable=args.no_progress)
    out.parent.mkdir(parents=True, exist_ok=True)
    images = []
    for seed in args.seed:
        generator = torch.Generator(device="cpu").manual_seed(seed)
        result = pipe(
            height=args.height,
            width=args.width,
            num_inference_steps=args.steps,
            guidance_scale=args.guidance,
            true_cfg_scale=args.true_cfg,
            generator=generator,
            shift=args.shift,
            **kwargs,
        )
        images.append(result.images[0])
    if len(images) == 1:
        images[0].save(out)
        print(f"wrote {out}")
        return 0
    for seed, image in zip(args.seed, images):
        path = out.with_name(f"{out.stem}-seed{seed}{out.suffix}")
        image.save(path)
        print(f"wrote {path}")
    _grid(images).save(out)
    print(f"wrote {out} ({len(images)} seeds in a grid)")
    return 0


QUANT_FORMATS = ("fp8-row", "fp8-block128", "nvfp4-w4a4", "nvfp4-w4a16")


def _quant_config(args: argparse.Namespace) -> Any:
    """The dcgen.quant config of ``dcgen quantize``'s options."""
    from dcgen.quant import FP8Config, NVFP4Config
    from dcgen.quant.api import DEFAULT_EXCLUDE

    include = tuple(args.include) or (r".*",)
    exclude = DEFAULT_EXCLUDE + tuple(args.exclude)
    if args.format.startswith("fp8-"):
        if args.rank or args.smoothing is not None:
            raise CLIError(f"--rank and --smoothing apply to the nvfp4 formats, got {args.format}")
        return FP8Config(
            granularity=args.format.removeprefix("fp8-"),
            include=include,
            exclude=exclude,
            fast_accum=args.fast_accum,
        )
    if args.fast_accum:
        raise CLIError(f"--fast-accum applies to fp8-row, got {args.format}")
    return NVFP4Config(
        mode=args.format.removeprefix("nvfp4-"),
        rank=args.rank,
        include=include,
        exclude=exclude,
        smoothing_alpha=args.smoothing,
    )


def _cmd_quantize(args: argparse.Namespace) -> int:
    from dcgen.autoencoders.checkpoint import atomic_write
    from dcgen.quant import save_quantized
    from dcgen.quant.pipeline_quant import (
        capture_transformer_inputs,
        needs_calibration,
        quantize_transformer,
        summarize_report,
    )

    device = _device(args.device)
    dtype = (
        DTYPES[args.dtype]
        if args.dtype
        else (torch.bfloat16 if device == "cuda" else torch.float32)
    )
    out = Path(args.out)
    if out.suffix != ".safetensors":
        raise CLIError(f"--out {out}: expected a .safetensors file name")
    if args.report is not None and args.no_report:
        raise CLIError("--report and --no-report: give one of them, not both")
    config = _quant_config(args)
    report = not args.no_report
    if (report or needs_calibration(config)) and args.prompt_embeds is None:
        raise CLIError(
            "--prompt-embeds is needed to calibrate (--smoothing) and for the quality report "
            "(skip the report with --no-report)"
        )
    kwargs = _prompt_kwargs(args) if args.prompt_embeds is not None else {}
    pipe = _load_pipeline(Path(args.pipeline), dtype, device)
    pipe.set_progress_bar_config(disable=args.no_progress)
    calls = None
    if kwargs:
        calls = capture_transformer_inputs(
            pipe, args.calibration_steps, args.height, args.width, seed=args.seed, **kwargs
        )
    names, rep = quantize_transformer(pipe.transformer, config, calls, report=report)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_quantized(pipe.transformer, out)
    print(f"quantized {len(names)} linears to {args.format}; wrote {out}")
    if rep is None:
        return 0
    summary = summarize_report(rep)
    o = summary["output"]
    print(
        f"transformer output vs {str(dtype).removeprefix('torch.')}: relative error "
        f"{o['rel_err']:.3g}, cosine {o['cosine']:.6f} ({len(calls or [])} calls recorded, "
        f"the middle one compared)"
    )
    for layer in summary["worst_layers"][:3]:
        print(f"  {layer['name']}: relative error {layer['rel_err']:.3g} (isolated)")
    report_path = Path(args.report) if args.report else out.with_suffix(".quality.json")
    text = json.dumps({"format": args.format, "summary": summary, "report": rep}, indent=1)
    atomic_write(report_path, lambda tmp: Path(tmp).write_text(text))
    print(f"wrote {report_path}")
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    from dcgen.bench import BenchSettings, format_markdown, run_speed_bench, write_report

    try:
        resolutions = (
            tuple(int(r) for r in args.resolutions.split(",")) if args.resolutions else None
        )
    except ValueError:
        raise ValueError(
            f"--resolutions: expected comma-separated integers, got {args.resolutions!r}"
        ) from None
    if args.no_kernels and args.variants is not None:
        raise ValueError("--no-kernels is --variants stock: give one of them, not both")
    variants = "stock" if args.no_kernels else (args.variants or "kernels")
    settings = BenchSettings(
        model=args.model, resolutions=resolutions, steps=args.steps, batch=args.batch,
        quick=args.quick, quick_blocks=args.quick_blocks, quick_steps=args.quick_steps,
        repeats=args.repeats, warmup=args.warmup, device=args.device, dtype=args.dtype,
        attention=args.attention, variants=variants, fp8=args.fp8,
        fp8_granularity=args.fp8_granularity, fp8_fast_accum=args.fp8_fast_accum,
        nvfp4=args.nvfp4 or (), nvfp4_rank=args.nvfp4_rank,
    )  # fmt: skip
    settings.resolved()  # bad input fails before any model is built

    def partial(report: dict) -> None:  # after every row: a cut-off run keeps what it measured
        write_report(report, args.out, chart=False)

    report = run_speed_bench(settings, on_row=partial)
    paths = write_report(report, args.out)
    print(format_markdown(report))
    print(f"wrote {paths['md']}, {paths['json']}, {paths['png']}")
    if report["errors"]:
        print(f"{len(report['errors'])} row(s) failed: see the report's last section")
        return 1
    return 0


# -- parser ------------------------------------------------------------------------------------


def _add_progress(p: argparse.ArgumentParser) -> None:
    p.add_argument("--no-progress", action="store_true", help="hide the progress bars")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="dcgen", description="DC-Gen: DiTs in deep-compression latent spaces"
    )
    p.add_argument(
        "-v", "--verbose", action="store_true", help="log at INFO level; tracebacks on errors"
    )
    sub = p.add_subparsers(dest="command", required=True)
    fmt = argparse.RawDescriptionHelpFormatter

    d = sub.add_parser(
        "demo",
        help="DC-Gen end to end on the shipped toy world (about 10 minutes on 2 CPU cores)",
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
    ):
        d.add_argument(flag, type=kind, default=None, help=what)
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
        "--dtype", choices=sorted(DTYPES), default=None, help="storage dtype (default: as loaded)"
    )
    c.set_defaults(fn=_cmd_convert)

    # -- precompute
    pc = sub.add_parser(
        "precompute",
        help="encode an image-caption folder once into a latent cache for the training stages",
        formatter_class=fmt,
        description="""\
Encode every image of an image-caption folder with the DC-AE (dcae_latent, scaled), optionally
the base model's AutoencoderKL (base_latent, (mode - shift_factor) * scaling_factor as FLUX
does; needed by stage 1), and attach text embeddings (prompt_embeds, pooled_prompt_embeds, ...;
needed by stages 2 and 3). Resumable: rerunning keeps finished shards.

Text embeddings (text encoders are pluggable, dcgen does not run them itself):
  --text-embeddings FILE|DIR  safetensors with tensors "<i>/prompt_embeds" (T, D),
                              "<i>/pooled_prompt_embeds" (D',) [, "<i>/<other>"] and metadata
                              {"format": "dcgen.text_embeddings", "captions": JSON list}, <i> =
                              the caption's index in that list; a DIR merges its files.
                              Write one with dcgen.train.prepare.save_text_embeddings.
  --text-encoder MOD:FUNC     FUNC(captions: list[str]) -> {"prompt_embeds": (B, T, D),
                              "pooled_prompt_embeds": (B, D'), ...}, imported from sys.path.
  Both: the file where it has the caption, the function for the rest. Neither: latents only
  (enough for stage 1).""",
    )
    pc.add_argument("--data", required=True, metavar="DIR",
                    help="image folder; captions in <stem>.txt or metadata.jsonl")  # fmt: skip
    pc.add_argument("--dcae", required=True, metavar="DCAE",
                    help="DC-AE folder/checkpoint, or a preset name (random weights: smoke "
                    "tests only)")  # fmt: skip
    pc.add_argument("--base-vae", default=None, metavar="DIR",
                    help="base model's AutoencoderKL folder (or a pipeline folder with vae/); "
                    "adds base_latent for stage 1")  # fmt: skip
    pc.add_argument("--text-embeddings", default=None, metavar="FILE_OR_DIR",
                    help="precomputed text-embeddings file or folder (format above)")  # fmt: skip
    pc.add_argument("--text-encoder", default=None, metavar="MODULE:FUNCTION",
                    help="callable that embeds a list of captions (contract above)")  # fmt: skip
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
                    help="dtype the autoencoders run in (default fp32)")  # fmt: skip
    pc.add_argument("--device", choices=["cpu", "cuda"], default=None,
                    help="where the autoencoders run (default: cuda when available)")  # fmt: skip
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

The config file (TOML, or YAML with pyyaml) holds TrainConfig keys. It may serve all three
stages: shared keys at the top level, per-stage keys in [align], [output] and [finetune]
tables (the table of the stage being run overrides the shared keys). The stage is forced to
'{stage}'. See examples/flux_dcgen_f64c128.toml.""",
        )
        sp.add_argument("--config", required=True, metavar="FILE",
                        help="TOML/YAML run config (TrainConfig keys)")  # fmt: skip
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
vae/ = the DC-AE, scheduler/, model_index.json) that DCGenFluxPipeline / DCGenSanaPipeline
.from_pretrained and `dcgen generate` load.""",
    )
    ex.add_argument("--transformer", required=True, metavar="DIR",
                    help="transformer folder (base or adapted), or a folder holding "
                    "transformer/ (a stage's out_dir, a diffusers pipeline)")  # fmt: skip
    ex.add_argument("--latent-layers", default=None, metavar="FILE",
                    help="latent_layers.safetensors from a stage (new embedder + head)")  # fmt: skip
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
    ex.set_defaults(fn=_cmd_export)

    # -- generate
    g = sub.add_parser(
        "generate",
        help="sample images from a saved pipeline folder with precomputed prompt embeddings",
        formatter_class=fmt,
        description="""\
Load a pipeline folder (DCGenFluxPipeline, DCGenSanaPipeline or BaseFluxPipeline, by the class in
model_index.json) and write PNGs. --prompt-embeds is a safetensors file with prompt_embeds
(T, D) or (1, T, D), pooled_prompt_embeds (FLUX), prompt_attention_mask (SANA, optional) and
optionally negative_* of each for --true-cfg; or a text-embeddings table from precompute's
format, with --caption choosing the entry. Several --seed values give one PNG per seed
(<out>-seed<N>.png) plus a grid at --out.""",
    )
    g.add_argument("--pipeline", required=True, metavar="DIR", help="pipeline folder")
    g.add_argument("--prompt-embeds", required=True, metavar="FILE",
                   help="safetensors prompt embeddings (format above)")  # fmt: skip
    g.add_argument("--caption", default=None,
                   help="entry of a text-embeddings table to use as the prompt")  # fmt: skip
    g.add_argument("--negative-caption", default=None,
                   help="entry of a text-embeddings table used as negative prompt (--true-cfg)")  # fmt: skip
    g.add_argument("--height", type=int, default=1024, help="image height in pixels (default 1024)")
    g.add_argument("--width", type=int, default=1024, help="image width in pixels (default 1024)")
    g.add_argument("--steps", type=int, default=20, help="Euler steps (default 20)")
    g.add_argument("--guidance", type=float, default=3.5,
                   help="guidance-embedding scale of guidance-distilled models (default 3.5)")  # fmt: skip
    g.add_argument("--true-cfg", type=float, default=1.0,
                   help="classifier-free guidance scale; > 1 needs negative embeddings "
                   "(default 1.0: off)")  # fmt: skip
    g.add_argument("--shift", type=float, default=None,
                   help="timestep shift override (default: the pipeline's shift rule)")  # fmt: skip
    g.add_argument("--seed", type=int, nargs="+", default=[0], metavar="N",
                   help="one or more seeds; several make a grid (default 0)")  # fmt: skip
    g.add_argument("--out", default="image.png", help="output PNG (default image.png)")
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
With --prompt-embeds (format of generate) the pipeline first runs --calibration-steps denoising
steps at --height x --width, recording every transformer call: NVFP4 smoothing (--smoothing,
SVDQuant) takes its activation statistics from them, and the quality report compares the
quantized transformer with a 16-bit copy on the middle call (per layer and end to end; JSON next
to --out unless --report; the copy doubles the transformer's memory, --no-report skips it).""",
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
                   help="NVFP4: activation smoothing exponent in [0, 1] (needs --prompt-embeds)")  # fmt: skip
    q.add_argument("--fast-accum", action="store_true",
                   help="fp8-row: accumulate in the tensor cores' own precision (faster on Hopper)")  # fmt: skip
    q.add_argument("--include", action="append", default=[], metavar="REGEX",
                   help="quantize only linears whose name matches (re.search; repeatable)")  # fmt: skip
    q.add_argument("--exclude", action="append", default=[], metavar="REGEX",
                   help="also keep these linears in 16-bit (repeatable)")  # fmt: skip
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
                   help="quality report JSON (default: <out>.quality.json)")  # fmt: skip
    q.add_argument("--no-report", action="store_true", help="skip the quality report")
    q.add_argument("--device", choices=["cpu", "cuda"], default=None,
                   help="default: cuda when available")  # fmt: skip
    q.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                   help="16-bit dtype of the kept layers (default bf16 on cuda, fp32 on cpu)")  # fmt: skip
    _add_progress(q)
    q.set_defaults(fn=_cmd_quantize, negative_caption=None)

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
    b.add_argument("--out", default="dcgen_bench", help="output folder (default ./dcgen_bench)")
    b.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if any)")
    b.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                   help="model dtype (default bf16 on cuda, fp32 on cpu)")  # fmt: skip
    b.set_defaults(fn=_cmd_bench)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        return args.fn(args)
    except (ValueError, TypeError, KeyError, OSError, ImportError, RuntimeError) as err:
        # Bad input is reported, not dumped: one line (no traceback unless -v).
        if args.verbose:
            traceback.print_exc()
        message = str(err.args[0]) if isinstance(err, KeyError) and err.args else str(err)
        message = " ".join(message.split())
        print(f"dcgen {args.command}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
