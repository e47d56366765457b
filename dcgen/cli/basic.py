"""`dcgen demo`, `demo-dcae`, `info`, `presets` and `convert-dcae`."""

from __future__ import annotations

import argparse
import json
import math
import shlex
from pathlib import Path
from typing import Any

import torch

from .._files import atomic_folder
from .common import DTYPES, CLIError, check_out_path


def _cmd_demo(args: argparse.Namespace) -> int:
    from dcgen.toy.demo import PIPELINE_DIR, DemoSettings, run_demo

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    overrides: dict[str, Any] = {"device": device, "seed": args.seed, "assets": args.assets}
    for name in (
        "train_images", "eval_prompts", "align_sgd_steps", "output_steps", "lora_steps",
        "lora_rank", "sampling_steps", "batch_size", "lr", "checkpoint_every",
    ):  # fmt: skip
        value = getattr(args, name)
        if value is not None:
            overrides[name] = value
    if args.positions is not None:
        overrides["align_positions"] = args.positions
    for name in ("latency_sizes", "curve_steps"):
        if getattr(args, name) is not None:
            overrides[name] = getattr(args, name)
    if not (math.isfinite(args.scale) and args.scale > 0):
        raise CLIError(f"--scale: expected a positive number, got {args.scale:g}")
    check_out_path(Path(args.out), "--out", folder=True)
    settings = DemoSettings.fast(**overrides) if args.fast else DemoSettings(**overrides)
    if args.scale != 1.0:
        for name in ("align_sgd_steps", "output_steps", "lora_steps"):
            steps = getattr(settings, name)
            # at least one step stays one; none (stage 1 with the ridge fit alone) stays none
            setattr(settings, name, max(min(steps, 1), round(steps * args.scale)))
    settings.validate()
    print(
        f"dcgen demo: DC-Gen on the toy world ({device}): stage 1 {settings.align_sgd_steps} "
        f"refinement steps, stage 2 {settings.output_steps} steps, stage 3 {settings.lora_steps} "
        f"LoRA steps (and the naive baseline); "
        f"{'resuming' if args.resume else 'writing'} {args.out}/"
    )
    run_demo(args.out, settings, progress=not args.no_progress, echo=print, resume=args.resume)
    print()
    print((Path(args.out) / "report.md").read_text())
    pipeline = Path(args.out) / PIPELINE_DIR
    print(
        f"The DC-Gen model is a pipeline folder now ({pipeline}); sample it with\n"
        f"  dcgen generate --pipeline {shlex.quote(str(pipeline))} "
        '--prompt "a large red circle top left" '
        "--height 128 --width 128 --out circle.png"
    )
    return 0


def _cmd_demo_dcae(args: argparse.Namespace) -> int:
    from dcgen.toy.dcae_roundtrip import RoundTripSettings, run_dcae_roundtrip

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.steps < 0:
        raise CLIError(f"--steps: expected an integer >= 0, got {args.steps}")
    if args.image:  # read before anything is written, as generate reads --image
        from .sample import _read_image

        _read_image(Path(args.image))
    check_out_path(Path(args.out), "--out", folder=True)
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

    check_out_path(Path(args.dst), "DST", folder=True)
    # Loaded straight in the dtype written (the source's by default): loading in fp32 and
    # casting on save held an fp32 model plus the cast copy, 3x a bf16 checkpoint's size, and
    # wrote a bf16 source out as fp32 unless --dtype said otherwise.
    dtype = DTYPES[args.dtype] if args.dtype else "auto"
    try:
        model = DCAE.from_pretrained(args.src, config=args.preset, dtype=dtype)
    except ValueError as err:  # the library's advice names its keyword; here it is --preset
        raise CLIError(str(err).replace("pass config=<preset name or DCAEConfig>",
                                        "pass --preset NAME (dcgen presets lists them)")) from err  # fmt: skip
    # built beside DST and swapped in: a killed conversion leaves no half-written model there
    atomic_folder(Path(args.dst), lambda tmp: model.save_pretrained(tmp))
    print(f"wrote diffusers-format DC-AE to {args.dst}")
    return 0
