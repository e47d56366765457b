"""What every `dcgen` subcommand shares: the error type printed as one line, dtype and
device options, argparse helpers."""

from __future__ import annotations

import argparse
import os
import signal
from collections.abc import Callable
from pathlib import Path
from types import FrameType

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class CLIError(ValueError):
    """Bad input found by the CLI itself; printed as one line, exit status 2."""


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the program is (so temp files are removed and finished outputs
    stay whole, as after Ctrl-C) instead of the default immediate exit."""

    exit_status = 128 + signal.SIGTERM

    def __init__(self) -> None:
        super().__init__("stopped by SIGTERM")


def raise_terminated(signum: int, frame: FrameType | None) -> None:
    raise Terminated


def _dtype(name: str | None) -> torch.dtype | None:
    return None if name is None else DTYPES[name]


def _device(name: str | None) -> str:
    device = name or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise CLIError("--device cuda: no CUDA device is available on this machine")
    return device


def check_out_path(path: Path, option: str, folder: bool = False) -> None:
    """An output path that can be written, checked before the work that fills it: a file
    path is not an existing folder, a folder path not an existing file, and no part of the way
    there is a file."""
    if folder and path.exists() and not path.is_dir():
        raise CLIError(f"{option} {path}: expected a folder to write into, it is a file")
    if not folder and path.is_dir():
        raise CLIError(f"{option} {path}: expected a file path, it is a folder")
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise CLIError(f"{option} {path}: {parent} is a file, not a folder")
            # Outputs are written beside their name and renamed (or their folders made here):
            # a folder we cannot write in failed only after the work, naming a temp file.
            if not os.access(parent, os.W_OK | os.X_OK):
                raise CLIError(f"{option} {path}: cannot write in {parent} (permission denied)")
            break


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


def _add_progress(p: argparse.ArgumentParser) -> None:
    p.add_argument("--no-progress", action="store_true", help="hide the progress bars")
