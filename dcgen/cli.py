"""The `dcgen` command.

dcgen demo [--out DIR] [--steps N]    the main job (today: DC-AE round trip preview)
dcgen info                             build info: compiled kernels, CUDA archs, torch
dcgen presets                          the DC-AE presets and their scaling factors
dcgen convert-dcae SRC DST [--preset NAME] [--dtype bf16]
                                       original or diffusers DC-AE checkpoint -> diffusers folder
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _cmd_demo(args: argparse.Namespace) -> int:
    from dcgen.toy.dcae_roundtrip import RoundTripSettings, run_dcae_roundtrip

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    settings = RoundTripSettings(
        steps=args.steps,
        seed=args.seed,
        device=device,
        image=Path(args.image) if args.image else None,
    )
    print(
        f"dcgen demo: DC-AE round trip on {'the bundled image' if not args.image else args.image}, "
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


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="dcgen", description="DC-Gen: DiTs in deep-compression latent spaces"
    )
    p.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("demo", help="run the main job end to end on this machine")
    d.add_argument("--out", default="dcgen_demo", help="run folder (default: ./dcgen_demo)")
    d.add_argument("--steps", type=int, default=300, help="training steps (default 300)")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--device", choices=["cpu", "cuda"], default=None)
    d.add_argument("--image", default=None, help="use this image instead of the bundled one")
    d.set_defaults(fn=_cmd_demo)

    sub.add_parser("info", help="how dcgen._C was built").set_defaults(fn=_cmd_info)
    sub.add_parser("presets", help="list DC-AE presets").set_defaults(fn=_cmd_presets)

    c = sub.add_parser(
        "convert-dcae", help="DC-AE checkpoint (original or diffusers) -> diffusers folder"
    )
    c.add_argument("src")
    c.add_argument("dst")
    c.add_argument("--preset", default=None, help="config preset when SRC has no config.json")
    c.add_argument("--dtype", choices=sorted(DTYPES), default=None)
    c.set_defaults(fn=_cmd_convert)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        return args.fn(args)
    except (ValueError, TypeError, KeyError, FileNotFoundError) as err:
        print(f"dcgen {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
