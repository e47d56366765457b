"""Compiling host C++ drivers for CUDA headers that also build on the host (csrc/nvfp4's
e2m1_bf16.h and grid_round.h): their tests run the exact header code on a CPU."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def build_driver(tmp_path_factory: pytest.TempPathFactory, name: str, source: str) -> Path:
    """Compile ``source`` (with csrc/ on the include path) into an executable; skips the test
    where no host C++ compiler exists. No FMA contraction: the headers' host paths stand for
    device code that rounds every product and sum."""
    cxx = shutil.which("c++") or shutil.which("g++")
    if cxx is None:
        pytest.skip("no host C++ compiler")
    work = tmp_path_factory.mktemp(name)
    src, exe = work / "driver.cpp", work / "driver"
    src.write_text(source)
    subprocess.run(
        [cxx, "-std=c++17", "-O2", "-ffp-contract=off", "-I", str(ROOT / "csrc"), str(src)]
        + ["-o", str(exe)],
        check=True,
        capture_output=True,
    )
    return exe
