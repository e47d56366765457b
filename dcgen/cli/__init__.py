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
import logging
import os
import shlex
import signal
import sys
import threading
import traceback

from safetensors import SafetensorError

from .common import DTYPES, CLIError, raise_terminated
from .parser import BENCH_MODELS, build_parser

#: what bad input raises: reported in one line, exit status 2. SafetensorError (a damaged or
#: foreign .safetensors among the inputs) is none of the others and printed a traceback.
INPUT_ERRORS = (
    ValueError,
    TypeError,
    KeyError,
    OSError,
    ImportError,
    RuntimeError,
    SafetensorError,
)

__all__ = ["BENCH_MODELS", "DTYPES", "CLIError", "build_parser", "main"]


def main(argv: list[str] | None = None) -> int:
    # A console that cannot encode a path's characters (cp1252 on Windows, a C locale) made a
    # status line raise UnicodeEncodeError mid-run: `generate` wrote the first image and
    # stopped. Such characters are printed escaped instead, for this call only (main() called
    # from a program left its streams reconfigured).
    restore = []
    for stream in (sys.stdout, sys.stderr):
        reconfigure = getattr(stream, "reconfigure", None)
        if reconfigure is not None:
            restore.append((reconfigure, stream.errors))
            reconfigure(errors="backslashreplace")
    try:
        return _main(argv)
    finally:
        for reconfigure, errors in restore:
            reconfigure(errors=errors)


def _main(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    # Logging as found is given back at the end (main() called twice in one program: a first
    # -v left every later call at INFO); where the program configured it already, -v still
    # shows dcgen's own INFO lines.
    root, ours = logging.getLogger(), logging.getLogger("dcgen")
    saved_logging = (root.level, list(root.handlers), ours.level)
    if not root.handlers:
        logging.basicConfig(
            level=logging.INFO if args.verbose else logging.WARNING,
            format="%(levelname)s %(name)s: %(message)s",
        )
    if args.verbose:
        ours.setLevel(logging.INFO)
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, raise_terminated) if in_main_thread else None
    try:
        return args.fn(args)
    except KeyboardInterrupt as stop:
        # Ctrl-C or SIGTERM: one line, not a traceback. Outputs already finished are whole
        # (atomic writes); a training run stopped after its current step with a checkpoint
        # (TrainingInterrupted, which says where) and continues when run again.
        if args.verbose:
            traceback.print_exc()
        print(f"dcgen {args.command}: {str(stop) or 'interrupted'}{_resume_hint(args, stop)}",
              file=sys.stderr)  # fmt: skip
        return int(getattr(stop, "exit_status", 128 + signal.SIGINT))
    except BrokenPipeError:
        # The reader went away (`dcgen presets | head -2`): not an error of ours. Point stdout
        # at /dev/null so the interpreter's final flush does not raise again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except INPUT_ERRORS as err:
        # Bad input is reported, not dumped: one line (no traceback unless -v).
        if args.verbose:
            traceback.print_exc()
        message = str(err.args[0]) if isinstance(err, KeyError) and err.args else str(err)
        message = " ".join(message.split())
        print(f"dcgen {args.command}: error: {message}", file=sys.stderr)
        return 2
    finally:
        if in_main_thread:  # main() called from a program of its own: give its handler back
            signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)
        root.setLevel(saved_logging[0])
        root.handlers[:] = saved_logging[1]
        ours.setLevel(saved_logging[2])


def _resume_hint(args: argparse.Namespace, stop: KeyboardInterrupt) -> str:
    if args.command == "demo":  # its finished phases and training checkpoints are kept
        out = shlex.quote(str(args.out))
        return f" (to continue: dcgen demo --resume --out {out} with the same options)"
    if args.command == "precompute":  # finished shards are kept and skipped when run again
        return " (to continue: run the same command again; finished shards are kept)"
    if hasattr(stop, "checkpoint_dir"):  # a training stage's clean stop
        return " (to continue: run the same command again, with resume on, its default)"
    return ""
