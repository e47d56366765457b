"""The post-training subcommands: `precompute`, `align` / `output` / `finetune` and `export`."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import shlex
import sys
from pathlib import Path
from typing import Any

from tqdm.contrib.logging import logging_redirect_tqdm

from dcgen._json import dumps

from .common import DTYPES, CLIError, _device, _dtype, check_out_path

# -- precompute -------------------------------------------------------------------------------


def _cli_cache_errors(run: Any) -> Any:
    """``run()``, a CacheError's advice in the command's words: the library names its
    keyword arguments (overwrite=True, out_dir), the command line has --overwrite and --out."""
    from dcgen.train.cache import CacheError

    try:
        return run()
    except CacheError as err:
        text = str(err).replace("overwrite=True", "--overwrite")
        text = text.replace("another out_dir", "another --out")  # not inside a path
        raise CLIError(text) from err


def _cmd_precompute(args: argparse.Namespace) -> int:
    from dcgen.train.distributed import init_distributed
    from dcgen.train.prepare import run_precompute

    resolution = args.resolution
    if resolution is None and args.buckets is None:
        resolution = 1024
    if args.max_sequence_length is not None and args.text_encoders is None:
        raise CLIError("--max-sequence-length goes with --text-encoders DIR")
    # what run_precompute checks too, here before the DC-AE and the text encoders load
    if not Path(args.data).is_dir():
        raise CLIError(f"--data {args.data}: the folder does not exist")
    for option, value, least in (("--shard-size", args.shard_size, 1),
                                 ("--batch-size", args.batch_size, 1),
                                 ("--num-workers", args.num_workers, 0)):  # fmt: skip
        if value < least:
            raise CLIError(f"{option}: expected an integer >= {least}, got {value}")
    check_out_path(Path(args.out), "--out", folder=True)
    # under torchrun each process encodes every world_size-th shard on its own GPU
    ctx = init_distributed(_device(args.device))
    try:
        device = str(ctx.device)
        if ctx.is_main:
            print(f"dcgen precompute: {args.data} -> {args.out} on {device}"
                  + (f" (x{ctx.world_size} processes)" if ctx.enabled else ""),
                  file=sys.stderr)  # fmt: skip
        text_encoder: Any = args.text_encoder
        if args.text_encoders is not None:
            from dcgen.pipelines.text_encoders import PipelineTextEncoder, text_encoder_dtype

            text_encoder = PipelineTextEncoder(
                args.text_encoders, device=device,
                dtype=text_encoder_dtype(DTYPES[args.encoder_dtype]),
                max_sequence_length=args.max_sequence_length,
            )  # fmt: skip
        cache = _cli_cache_errors(lambda: run_precompute(
            args.data,
            args.dcae,
            args.out,
            base_vae=args.base_vae,
            base_patch_size=args.base_patch_size,
            text_embeddings=args.text_embeddings,
            text_encoder=text_encoder,
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
            ctx=ctx,
        ))  # fmt: skip
    finally:
        ctx.close()
    if not ctx.is_main:
        return 0
    first = cache.samples[0]
    print(f"latent cache {args.out}: {len(cache)} samples in {len(cache.shards)} shard(s)")
    for name in sorted(first["shapes"]):
        print(f"  {name:24s} {first['shapes'][name]} {first['dtypes'][name]}  (first sample)")
    return 0


# -- training stages --------------------------------------------------------------------------

STAGES = ("align", "output", "finetune")


def _read_config_file(path: Path) -> dict[str, Any]:
    # imported here, as the command line imports the training code only when a stage runs; a
    # ConfigError is a ValueError, which the command line reports in one line like its own
    from dcgen.train.config import read_config_file

    return read_config_file(path)


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
        if key.strip() == "stage":
            raise CLIError(
                f"--set stage: the command sets the stage ({stage}); run that stage's command"
            )
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
        where = f"{path} with --set" if args.set else str(path)
        raise CLIError(f"{where}: {err}") from err
    config.validate()
    return config


def _cmd_stage(args: argparse.Namespace) -> int:
    config = _train_config(args, args.command)
    try:
        from dcgen.train.stages import run
    except ImportError as err:
        raise CLIError(f"the training stages are not available in this install ({err})") from err
    print(f"dcgen {args.command}: {_start_line(config)}", file=sys.stderr)
    train_log = logging.getLogger("dcgen.train")
    level = train_log.level
    if args.no_progress:
        # Without a bar, the loop's log lines are the progress report (the loss every
        # log_every steps, each checkpoint); at the default level nothing showed for hours.
        train_log.setLevel(logging.INFO)
    try:
        # with a bar, log lines (-v) are printed above it instead of glued to its last frame
        with contextlib.nullcontext() if args.no_progress else logging_redirect_tqdm():
            summary = run(config, progress=not args.no_progress)
    finally:
        train_log.setLevel(level)
    print(dumps(summary, indent=2, default=str))
    return 0


def _start_line(config: Any) -> str:
    """What the run will do to its folder: write it, or continue it from a checkpoint (a resume
    showed nowhere at the default log level)."""
    from dcgen.train.checkpoint import checkpoint_step, latest_checkpoint
    from dcgen.train.loop import CHECKPOINT_DIR

    latest = latest_checkpoint(Path(config.out_dir) / CHECKPOINT_DIR) if config.resume else None
    if latest is None:
        return f"writing {config.out_dir}"
    return f"resuming {config.out_dir} from its checkpoint at step {checkpoint_step(latest)}"


# -- export -----------------------------------------------------------------------------------


def _cmd_export(args: argparse.Namespace) -> int:
    from dcgen.train.export import export_pipeline

    if args.shift is not None and not (math.isfinite(args.shift) and args.shift > 0):
        raise CLIError(f"--shift: expected a positive number, got {args.shift:g}")
    if not math.isfinite(args.lora_scale):  # NaN / inf would be fused into every weight
        raise CLIError(f"--lora-scale: expected a finite number, got {args.lora_scale:g}")
    if args.lora is None and args.lora_scale != 1.0:
        raise CLIError("--lora-scale goes with --lora DIR")
    if args.link_text_encoders and args.text_encoders is None:
        raise CLIError("--link-text-encoders goes with --text-encoders DIR")
    for option, value in (("--dcae", args.dcae), ("--lora", args.lora),
                          ("--latent-layers", args.latent_layers)):  # fmt: skip
        if value is not None and not Path(value).exists():  # before the transformer loads
            raise FileNotFoundError(f"{option} {value}: no such file or folder")
    check_out_path(Path(args.out), "--out", folder=True)
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
        text_encoders=args.text_encoders,
        link_text_encoders=args.link_text_encoders,
    )
    # quoted: the command is for copying into a shell, and folder names may hold spaces
    print(f"wrote pipeline folder {out} (load with dcgen generate --pipeline "
          f"{shlex.quote(str(out))})")  # fmt: skip
    return 0
