"""What every `dcgen` subcommand shares: the error type printed as one line, dtype and
device options, argparse helpers."""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class CLIError(ValueError):
    """Bad input found by the CLI itself; printed as one line, exit status 2."""


def _dtype(name: str | None) -> torch.dtype | None:
    return None if name is None else DTYPES[name]


def _device(name: str | None) -> str:
    device = name or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise CLIError("--device cuda: no CUDA device is available on this machine")
    return device


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
