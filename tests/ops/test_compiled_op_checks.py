"""The argument checks inside the compiled CUDA host functions of every dcgen op, run on a
machine without a GPU: bad input must raise a clean Python exception whose message names what
was expected and what came. Nothing may crash the process.

Why: on the H100 of 2026-11-27 two ops (``fp8_scale_epilogue`` and, by the evidence,
``adaln_modulate``) segfaulted instead of raising when a test fed them bad input on purpose
(docs/benchmark-log.md, benchmarks/throw_probe.py). The Python wrappers in dcgen.ops validate first, so only
direct ``torch.ops.dcgen`` calls reach these checks, and the CUDA tests that reach them run only
on a GPU machine. This file runs them everywhere the extension is built with its CUDA kernels
(CI builds it with nvcc).

How: a CUDA-device FakeTensor (``FakeTensorMode``) has no memory but answers ``is_cuda()``,
``sizes()``, ``strides()``, ``scalar_type()``, ``device()`` and ``data_ptr()`` (the storage
offset included) like a real one, and ``OpOverload.redispatch`` with the CUDA dispatch key calls
the op's CUDA host function directly, without touching a GPU. Plain CPU tensors reach it the same
way (and fail its first "expected ... on a CUDA device" check). Every case violates one check on
purpose: inputs that passed them all would launch a kernel on fake pointers.

Each case runs in a child process (all cases in one child while none crashes), so a crash turns
into a failure that names the case and carries the child's stderr, and the cases after it still
run in a fresh child.

What it cannot cover: the checks after the host function's ``CUDAGuard`` and those that ask the
device (compute capability, launch limits such as "output too large" or "at most 65535
batch*heads", norm-weight / RoPE / mask checks of the attention ops, the DC-AE layout checks):
without a GPU the guard raises first, and on a GPU a case past the guard would run kernels on
fake pointers (so no case here goes past it). The cases on two CUDA devices (``cuda:1``) are
skipped on a machine with GPUs but fewer than two, where FakeTensorMode cannot create them (on a
machine without GPUs it can).

A message must name what came; the expectation may be implicit where the context states it (the
"(CUDA)" tag of a device check, a mismatch that names both sides): those cases set
``says_expected_got=False`` and assert both sides instead. A message that names no value that
came is a defect, marked ``xfail(strict=True, raises=MessageDefect)``: the case still has to
reach its check (its substrings are asserted first), and the fix shows up as an XPASS.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from dcgen.ops import extension_loaded

ROOT = Path(__file__).resolve().parents[2]
CHILD_TIMEOUT_S = 120
MARK = "@@dcgen-case "  # prefix of the child's result lines (anything else on stdout is noise)


def _cuda_ops() -> list[str]:
    """Every dcgen op with a CUDA kernel, from the dispatcher (not dcgen.ops.has_kernel, which
    DCGEN_DISABLE_KERNELS=1 turns off)."""
    if not extension_loaded():
        return []
    return sorted(
        name.split("::", 1)[1]
        for name in torch._C._dispatch_get_all_op_names()
        if name.startswith("dcgen::")
        and torch._C._dispatch_has_kernel_for_dispatch_key(name, "CUDA")
    )


CUDA_OPS = _cuda_ops()
if __name__ != "__main__" and not CUDA_OPS:
    pytest.skip("dcgen._C is not built, or was built without CUDA kernels", allow_module_level=True)

BF, F16, F32, F64 = torch.bfloat16, torch.float16, torch.float32, torch.float64
U8, I32, E4 = torch.uint8, torch.int32, torch.float8_e4m3fn


def cu(*shape: int, dtype: torch.dtype = BF, device: str = "cuda") -> torch.Tensor:
    """An (inside the child: fake) tensor; no memory behind it."""
    return torch.empty(shape, dtype=dtype, device=device)


def cpu(*shape: int, dtype: torch.dtype = BF) -> torch.Tensor:
    return cu(*shape, dtype=dtype, device="cpu")


def at_offset(*shape: int, dtype: torch.dtype = BF, by: int = 1) -> torch.Tensor:
    """A contiguous view `by` elements into its storage: a misaligned data pointer."""
    n = 1
    for s in shape:
        n *= s
    return cu(n + by, dtype=dtype)[by:].view(shape)


@dataclass(frozen=True)
class Case:
    op: str
    name: str
    build: Callable[[], tuple[Any, ...]]  # the op's arguments, built under FakeTensorMode
    expect: tuple[str, ...]  # substrings of the message (the values that came, formatted)
    exc: str = "RuntimeError"  # TORCH_CHECK raises c10::Error -> RuntimeError
    says_expected_got: bool = True  # the C++ message spells out "expected ..., got ..."
    devices: int = 1  # real CUDA devices a GPU machine needs for the fakes (cuda:1 cases: 2)
    xfail: str | None = None  # a known defect of the message: the case xfails (strict) on it

    @property
    def id(self) -> str:
        return f"{self.op}-{self.name}"


def _c(op: str, name: str, build, *expect: str, **kw) -> Case:  # noqa: ANN001
    return Case(op, name, build, expect, **kw)


def _as_op(cases: list[Case], op: str, extra: Callable[[], tuple] | None = None) -> list[Case]:
    """``cases`` for another op whose host function runs the same checks first: its name in
    every message, and ``extra()`` (valid) arguments after theirs."""

    def renamed(c: Case) -> Case:
        old, new = f"dcgen::{c.op}", f"dcgen::{op}"
        build = c.build if extra is None else (lambda build=c.build: (*build(), *extra()))
        expect = tuple(
            e.replace(old + ":", new + ":").replace(old + " ", new + " ") for e in c.expect
        )
        return dataclasses.replace(c, op=op, build=build, expect=expect)

    return [renamed(c) for c in cases]


# --- fp8_scale_epilogue(y, row_scale, col_scale, bias, act): nvfp4/fp8_epilogue_cuda.cu ---
OP = "fp8_scale_epilogue"
P = "dcgen::fp8_scale_epilogue"
FP8_EPILOGUE = [
    _c(
        OP,
        "act",
        lambda: (cu(4, 8), cu(4, dtype=F32), cu(8, dtype=F32), None, "relu"),
        f"{P}: expected act 'none' or 'gelu_tanh', got 'relu'",
    ),
    _c(
        OP,
        "y-cpu",
        lambda: (cpu(4, 8), cpu(4, dtype=F32), cpu(8, dtype=F32), None, "none"),
        f"{P} (CUDA): expected y on a CUDA device, got cpu",
    ),
    _c(
        OP,
        "y-3d",
        lambda: (cu(2, 4, 8), cu(4, dtype=F32), cu(8, dtype=F32), None, "none"),
        f"{P}: expected y of shape [M, N], got [2, 4, 8]",
    ),
    _c(
        OP,
        "y-strided",
        lambda: (cu(8, 4).t(), cu(4, dtype=F32), cu(8, dtype=F32), None, "none"),
        f"{P}: expected a contiguous y, got strides [1, 4]",
    ),
    _c(
        OP,
        "y-dtype",
        lambda: (cu(4, 8, dtype=F32), cu(4, dtype=F32), cu(8, dtype=F32), None, "none"),
        f"{P}: expected y of dtype bfloat16 or float16, got Float",
    ),
    _c(
        OP,
        "row_scale-numel",
        lambda: (cu(4, 8), cu(3, dtype=F32), cu(8, dtype=F32), None, "none"),
        f"{P}: expected a contiguous float32 row_scale of 4 elements on cuda:0, got Float [3] on cuda:0",
    ),
    _c(
        OP,
        "row_scale-dtype",
        lambda: (cu(4, 8, dtype=F16), cu(4), cu(8, dtype=F32), None, "none"),
        "row_scale of 4 elements on cuda:0, got BFloat16 [4] on cuda:0",
    ),
    _c(
        OP,
        "row_scale-cpu",
        lambda: (cu(4, 8), cpu(4, dtype=F32), cu(8, dtype=F32), None, "none"),
        "row_scale of 4 elements on cuda:0, got Float [4] on cpu",
    ),
    _c(
        OP,
        "row_scale-strided",
        lambda: (cu(4, 8), cu(8, dtype=F32)[::2], cu(8, dtype=F32), None, "none"),
        "row_scale of 4 elements on cuda:0, got Float [4] on cuda:0",
    ),
    _c(
        OP,
        "col_scale-numel",
        lambda: (cu(4, 8), cu(4, dtype=F32), cu(2, 8, dtype=F32), None, "none"),
        f"{P}: expected a contiguous float32 col_scale of 8 elements on cuda:0, got Float [2, 8] on cuda:0",
    ),
    _c(
        OP,
        "bias-numel",
        lambda: (cu(4, 8), cu(4, dtype=F32), cu(8, dtype=F32), cu(9), "gelu_tanh"),
        f"{P}: expected a float32 or BFloat16 bias of 8 elements on cuda:0, got BFloat16 [9] on cuda:0",
    ),
    _c(
        OP,
        "bias-int",
        lambda: (cu(4, 8), cu(4, dtype=F32), cu(8, dtype=F32), cu(8, dtype=I32), "none"),
        "bias of 8 elements on cuda:0, got Int [8] on cuda:0",
    ),
    _c(
        OP,
        "bias-fp16",  # the kernel reads fp32 or y's dtype: a half bias beside bf16 y is refused
        lambda: (cu(4, 8), cu(4, dtype=F32), cu(8, dtype=F32), cu(8, dtype=F16), "none"),
        f"{P}: expected a float32 or BFloat16 bias of 8 elements on cuda:0, got Half [8] on cuda:0",
    ),
    _c(
        OP,
        "bias-cpu",
        lambda: (cu(4, 8), cu(4, dtype=F32), cu(8, dtype=F32), cpu(8), "none"),
        "bias of 8 elements on cuda:0, got BFloat16 [8] on cpu",
    ),
]

# --- fp8_scale_epilogue_into(y, row_scale, col_scale, bias, act, out): the same checks
# (check_epilogue) under its own name, then its own on out ---
P_INTO = P + "_into"
FP8_EPILOGUE_INTO = _as_op(FP8_EPILOGUE, "fp8_scale_epilogue_into", lambda: (cu(4, 8),)) + [
    _c(
        "fp8_scale_epilogue_into",
        "out-shape",
        lambda: (cu(4, 8), cu(4, dtype=F32), cu(8, dtype=F32), None, "none", cu(4, 9)),
        f"{P_INTO}: expected out of y's shape [4, 8], dtype BFloat16 and device cuda:0, got "
        "[4, 9] BFloat16 on cuda:0",
    ),
    _c(
        "fp8_scale_epilogue_into",
        "out-dtype",
        lambda: (cu(4, 8), cu(4, dtype=F32), cu(8, dtype=F32), None, "none", cu(4, 8, dtype=F16)),
        f"{P_INTO}: expected out of y's shape [4, 8], dtype BFloat16 and device cuda:0, got "
        "[4, 8] Half on cuda:0",
    ),
    _c(
        "fp8_scale_epilogue_into",
        "out-column-stride",
        lambda: (cu(4, 8), cu(4, dtype=F32), cu(8, dtype=F32), None, "none", cu(8, 4).t()),
        f"{P_INTO}: expected out rows with unit column stride, one row apart by at least 8 "
        "elements, got strides [1, 4]",
    ),
    _c(
        "fp8_scale_epilogue_into",
        "out-overlapping-rows",
        lambda: (
            cu(4, 8),
            cu(4, dtype=F32),
            cu(8, dtype=F32),
            None,
            "none",
            cu(40).as_strided((4, 8), (4, 1)),
        ),  # fmt: skip
        f"{P_INTO}: expected out rows with unit column stride, one row apart by at least 8 "
        "elements, got strides [4, 1]",
    ),
]

# --- fp8_scale_epilogue_fp8(y, row_scale, col_scale, bias, act): the same checks ---
P_FP8 = P + "_fp8"
FP8_EPILOGUE_FP8 = _as_op(FP8_EPILOGUE, "fp8_scale_epilogue_fp8") + [
    _c(
        "fp8_scale_epilogue_fp8",
        "no-columns",
        lambda: (cu(4, 0), cu(4, dtype=F32), cu(0, dtype=F32), None, "none"),
        f"{P_FP8}: expected y with at least one column, got [4, 0]",
    ),
]

# --- adaln_modulate(x, shift, scale, rows_per_batch, eps): dit/modulation_cuda.cu ---
OP = "adaln_modulate"
P = "dcgen::adaln_modulate"
ADALN = [
    _c(
        OP,
        "x-cpu",
        lambda: (cpu(6, 8), cpu(2, 8), cpu(2, 8), 3, 1e-6),
        f"{P} (CUDA): expected x on a CUDA device, got cpu",
    ),
    _c(
        OP,
        "x-3d",
        lambda: (cu(2, 3, 8), cu(2, 8), cu(2, 8), 3, 1e-6),
        f"{P}: expected a contiguous x of shape [M, D], got [2, 3, 8] strides [24, 8, 1]",
    ),
    _c(
        OP,
        "x-strided",
        lambda: (cu(8, 6).t(), cu(2, 8), cu(2, 8), 3, 1e-6),
        f"{P}: expected a contiguous x of shape [M, D], got [6, 8] strides [1, 6]",
    ),
    _c(
        OP,
        "x-dtype",
        lambda: (cu(6, 8, dtype=F32), cu(2, 8), cu(2, 8), 3, 1e-6),
        f"{P}: expected x of dtype bfloat16 or float16, got Float",
    ),
    _c(
        OP,
        "rows_per_batch-not-dividing",
        lambda: (cu(6, 8), cu(2, 8), cu(2, 8), 4, 1e-6),
        f"{P}: expected rows_per_batch >= 1 dividing M = 6, got 4",
    ),
    _c(
        OP,
        "rows_per_batch-zero",
        lambda: (cu(6, 8), cu(2, 8), cu(2, 8), 0, 1e-6),
        "expected rows_per_batch >= 1 dividing M = 6, got 0",
    ),
    _c(
        OP,
        "rows_per_batch-negative",
        lambda: (cu(6, 8), cu(2, 8), cu(2, 8), -3, 1e-6),
        "expected rows_per_batch >= 1 dividing M = 6, got -3",
    ),
    _c(
        OP,
        "shift-cpu",
        lambda: (cu(6, 8), cpu(2, 8), cu(2, 8), 3, 1e-6),
        f"{P}: shift is on cpu, x on cuda:0",
        says_expected_got=False,
    ),
    _c(
        OP,
        "shift-shape",
        lambda: (cu(6, 8), cu(3, 8), cu(2, 8), 3, 1e-6),
        f"{P}: expected shift of shape [2, 8] with unit column stride, got [3, 8] strides [8, 1]",
    ),
    _c(
        OP,
        "scale-column-stride",
        lambda: (cu(6, 8), cu(2, 8), cu(2, 16)[:, ::2], 3, 1e-6),
        f"{P}: expected scale of shape [2, 8] with unit column stride, got [2, 8] strides [16, 2]",
    ),
    _c(
        OP,
        "shift-dtype",
        lambda: (cu(6, 8), cu(2, 8, dtype=F16), cu(2, 8), 3, 1e-6),
        f"{P}: expected shift of x's dtype or float32, got Half",
    ),
    _c(
        OP,
        "shift-scale-dtypes",
        lambda: (cu(6, 8), cu(2, 8, dtype=F32), cu(2, 8), 3, 1e-6),
        f"{P}: shift is Float, scale BFloat16",
        says_expected_got=False,
    ),
    _c(
        OP,
        "eps-zero",
        lambda: (cu(6, 8), cu(2, 8), cu(2, 8), 3, 0.0),
        f"{P}: expected eps > 0, got 0",
    ),
    _c(
        OP,
        "eps-negative",
        lambda: (cu(6, 8), cu(2, 8), cu(2, 8), 3, -1e-6),
        f"{P}: expected eps > 0, got -1e-06",
    ),
    _c(
        OP,
        "eps-nan",
        lambda: (cu(6, 8), cu(2, 8), cu(2, 8), 3, float("nan")),
        f"{P}: expected eps > 0, got nan",
    ),
    _c(
        OP,
        "D-zero",
        lambda: (cu(6, 0), cu(2, 0), cu(2, 0), 3, 1e-6),
        f"{P}: expected D >= 1, got [6, 0]",
    ),
]

# --- adaln_modulate_fp8(x, shift, scale, rows_per_batch, eps): dit/modulation_cuda.cu ---
# The same host checks as adaln_modulate (check_adaln), each under its own op name.
ADALN_FP8 = _as_op(ADALN, "adaln_modulate_fp8")

# --- gated_residual(x, gate, y, rows_per_batch): dit/modulation_cuda.cu ---
OP = "gated_residual"
P = "dcgen::gated_residual"
GATED = [
    _c(
        OP,
        "x-cpu",
        lambda: (cpu(6, 8), cpu(2, 8), cpu(6, 8), 3),
        f"{P} (CUDA): expected x on a CUDA device, got cpu",
    ),
    _c(
        OP,
        "x-1d",
        lambda: (cu(48), cu(2, 8), cu(48), 3),
        f"{P}: expected a contiguous x of shape [M, D], got [48] strides [1]",
    ),
    _c(
        OP,
        "x-dtype",
        lambda: (cu(6, 8, dtype=F64), cu(2, 8), cu(6, 8, dtype=F64), 3),
        f"{P}: expected x of dtype bfloat16 or float16, got Double",
    ),
    _c(
        OP,
        "rows_per_batch",
        lambda: (cu(6, 8), cu(2, 8), cu(6, 8), 5),
        f"{P}: expected rows_per_batch >= 1 dividing M = 6, got 5",
    ),
    _c(
        OP,
        "gate-cpu",
        lambda: (cu(6, 8), cpu(2, 8), cu(6, 8), 3),
        f"{P}: gate is on cpu, x on cuda:0",
        says_expected_got=False,
    ),
    _c(
        OP,
        "gate-shape",
        lambda: (cu(6, 8), cu(2, 4), cu(6, 8), 3),
        f"{P}: expected gate of shape [2, 8] with unit column stride, got [2, 4] strides [4, 1]",
    ),
    _c(
        OP,
        "gate-dtype",
        lambda: (cu(6, 8, dtype=F16), cu(2, 8), cu(6, 8, dtype=F16), 3),
        f"{P}: expected gate of x's dtype or float32, got BFloat16",
    ),
    _c(
        OP,
        "y-shape",
        lambda: (cu(6, 8), cu(2, 8), cu(6, 4), 3),
        f"{P}: expected a contiguous y like x ([6, 8], BFloat16, cuda:0), got [6, 4], BFloat16, cuda:0",
    ),
    _c(
        OP,
        "y-dtype",
        lambda: (cu(6, 8), cu(2, 8), cu(6, 8, dtype=F16), 3),
        "expected a contiguous y like x ([6, 8], BFloat16, cuda:0), got [6, 8], Half, cuda:0",
    ),
    _c(
        OP,
        "y-cpu",
        lambda: (cu(6, 8), cu(2, 8), cpu(6, 8), 3),
        "expected a contiguous y like x ([6, 8], BFloat16, cuda:0), got [6, 8], BFloat16, cpu",
    ),
    _c(
        OP,
        "y-strided",
        lambda: (cu(6, 8), cu(2, 8), cu(8, 6).t(), 3),
        "expected a contiguous y like x ([6, 8], BFloat16, cuda:0), got [6, 8], BFloat16, cuda:0",
    ),
]

# --- quantize_fp8(x, block): nvfp4/quantize_fp8_cuda.cu ---
OP = "quantize_fp8"
P = "dcgen::quantize_fp8"
QUANTIZE_FP8 = [
    _c(OP, "x-cpu", lambda: (cpu(4, 32), 0), f"{P} (CUDA): expected x on a CUDA device, got cpu"),
    _c(OP, "x-3d", lambda: (cu(2, 4, 32), 0), f"{P}: expected x of shape [M, K], got [2, 4, 32]"),
    _c(
        OP,
        "x-strided",
        lambda: (cu(32, 4).t(), 128),
        f"{P}: expected a contiguous x, got strides [1, 4]",
    ),
    _c(
        OP,
        "x-dtype",
        lambda: (cu(4, 32, dtype=F64), 0),
        f"{P}: expected x of dtype bfloat16, float16 or float32, got Double",
    ),
    _c(OP, "block-64", lambda: (cu(4, 32), 64), f"{P}: expected block 0 (per row) or 128, got 64"),
    _c(
        OP,
        "block-negative",
        lambda: (cu(4, 32), -128),
        f"{P}: expected block 0 (per row) or 128, got -128",
    ),
    _c(OP, "K-zero", lambda: (cu(4, 0), 0), f"{P}: expected K >= 1, got shape [4, 0]"),
]

# --- quantize_nvfp4(x, global_scale): nvfp4/quantize_nvfp4_cuda.cu ---
OP = "quantize_nvfp4"
P = "dcgen::quantize_nvfp4"
QUANTIZE_NVFP4 = [
    _c(
        OP,
        "x-cpu",
        lambda: (cpu(4, 32), cpu(1, dtype=F32)),
        f"{P} (CUDA): expected x on a CUDA device, got cpu",
    ),
    _c(
        OP, "x-1d", lambda: (cu(32), cu(1, dtype=F32)), f"{P}: expected x of shape [M, K], got [32]"
    ),
    _c(
        OP,
        "x-strided",
        lambda: (cu(4, 64)[:, ::2], cu(1, dtype=F32)),
        f"{P}: expected a contiguous x, got strides [64, 2]",
    ),
    _c(
        OP,
        "x-dtype",
        lambda: (cu(4, 32, dtype=U8), cu(1, dtype=F32)),
        f"{P}: expected x of dtype bfloat16, float16 or float32, got Byte",
    ),
    _c(
        OP,
        "global_scale-numel",
        lambda: (cu(4, 32), cu(2, dtype=F32)),
        f"{P}: expected global_scale to be one float32 value, got Float of shape [2]",
    ),
    _c(
        OP,
        "global_scale-dtype",
        lambda: (cu(4, 32), cu(1, 1, dtype=F16)),
        f"{P}: expected global_scale to be one float32 value, got Half of shape [1, 1]",
    ),
    _c(
        OP,
        "global_scale-cpu",
        lambda: (cu(4, 32), cpu(1, dtype=F32)),
        f"{P}: global_scale is on cpu but x is on cuda:0",
        says_expected_got=False,
    ),
    _c(
        OP,
        "K-zero",
        lambda: (cu(4, 0), cu(1, dtype=F32)),
        f"{P}: expected K >= 1, got shape [4, 0]",
    ),
]

# --- quantize_nvfp4_lowrank(x, global_scale, smooth, down): nvfp4/quantize_nvfp4_lowrank_cuda.cu ---
OP = "quantize_nvfp4_lowrank"
P = "dcgen::quantize_nvfp4_lowrank"
GS = lambda: cu(1, dtype=F32)  # noqa: E731
LOWRANK = [
    _c(
        OP,
        "x-cpu",
        lambda: (cpu(4, 32), GS(), None, cu(16, 32)),
        f"{P} (CUDA): expected x on a CUDA device, got cpu",
    ),
    _c(
        OP,
        "x-3d",
        lambda: (cu(1, 4, 32), GS(), None, cu(16, 32)),
        f"{P}: expected x of shape [M, K], got [1, 4, 32]",
    ),
    _c(
        OP,
        "x-dtype",
        lambda: (cu(4, 32, dtype=F32), GS(), None, cu(16, 32, dtype=F32)),
        f"{P}: expected x of dtype bfloat16 or float16, got Float",
    ),
    _c(
        OP,
        "down-K",
        lambda: (cu(4, 32), GS(), None, cu(16, 48)),
        f"{P}: expected down of shape [r, K] with K = 32, got [16, 48]",
    ),
    _c(
        OP,
        "down-dtype",
        lambda: (cu(4, 32), GS(), None, cu(16, 32, dtype=F16)),
        f"{P}: expected down of x's dtype BFloat16, got Half",
    ),
    _c(
        OP,
        "K-multiple",
        lambda: (cu(4, 24), GS(), None, cu(16, 24)),
        f"{P}: expected K to be a positive multiple of 16, got 24",
    ),
    _c(
        OP,
        "rank",
        lambda: (cu(4, 32), GS(), None, cu(8, 32)),
        f"{P}: expected rank r in {{16, 32, 64, 128}}, got 8",
    ),
    _c(
        OP,
        "x-strided",
        lambda: (cu(4, 64)[:, ::2], GS(), None, cu(16, 32)),
        f"{P}: expected contiguous x and down, got strides [64, 2] and [32, 1]",
    ),
    _c(
        OP,
        "x-misaligned",
        lambda: (at_offset(4, 32), GS(), None, cu(16, 32)),
        f"{P}: expected x and down 4-byte aligned (element pairs are loaded as one word), got "
        "data pointers 2 and 0 bytes past a 4-byte boundary (storage offsets 1 and 0)",
    ),
    _c(
        OP,
        "global_scale-numel",
        lambda: (cu(4, 32), cu(2, dtype=F32), None, cu(16, 32)),
        f"{P}: expected global_scale to be one float32 value, got Float of shape [2]",
    ),
    _c(
        OP,
        "global_scale-cpu",
        lambda: (cu(4, 32), cpu(1, dtype=F32), None, cu(16, 32)),
        f"{P}: expected global_scale and down on x's device cuda:0, got cpu and cuda:0",
    ),
    _c(
        OP,
        "down-cpu",
        lambda: (cu(4, 32), GS(), None, cpu(16, 32)),
        f"{P}: expected global_scale and down on x's device cuda:0, got cuda:0 and cpu",
    ),
    _c(
        OP,
        "smooth-size",
        lambda: (cu(4, 32), GS(), cu(16, dtype=F32), cu(16, 32)),
        f"{P}: expected smooth as a contiguous float32 [32] on cuda:0, got Float [16] on cuda:0",
    ),
    _c(
        OP,
        "smooth-dtype",
        lambda: (cu(4, 32), GS(), cu(32), cu(16, 32)),
        f"{P}: expected smooth as a contiguous float32 [32] on cuda:0, got BFloat16 [32] on cuda:0",
    ),
    _c(
        OP,
        "smooth-cpu",
        lambda: (cu(4, 32), GS(), cpu(32, dtype=F32), cu(16, 32)),
        "expected smooth as a contiguous float32 [32] on cuda:0, got Float [32] on cpu",
    ),
]

# --- nvfp4_dequantize(packed, scales, global_scale, k, swizzled, dtype): nvfp4/nvfp4_dequantize_cuda.cu ---
OP = "nvfp4_dequantize"
P = "dcgen::nvfp4_dequantize"
PK = lambda: cu(4, 16, dtype=U8)  # noqa: E731  N=4 rows, Kp=32: 2 blocks of 16
SW = lambda: cu(512, dtype=E4)  # noqa: E731  swizzled: 128 rows x 4 blocks (padded)
DEQUANT = [
    _c(
        OP,
        "packed-cpu",
        lambda: (cpu(4, 16, dtype=U8), cpu(512, dtype=E4), cpu(1, dtype=F32), 32, True, BF),
        f"{P} (CUDA): expected packed on a CUDA device, got cpu",
    ),
    _c(
        OP,
        "packed-dtype",
        lambda: (cu(4, 16, dtype=torch.int8), SW(), GS(), 32, True, BF),
        f"{P}: expected packed as contiguous uint8 [N, Kp/2], got Char [4, 16] strides [16, 1]",
    ),
    _c(
        OP,
        "packed-strided",
        lambda: (cu(16, 4, dtype=U8).t(), SW(), GS(), 32, True, BF),
        f"{P}: expected packed as contiguous uint8 [N, Kp/2], got Byte [4, 16] strides [1, 4]",
    ),
    _c(
        OP,
        "Kp-multiple",
        lambda: (cu(4, 4, dtype=U8), SW(), GS(), 8, True, BF),
        f"{P}: expected Kp = 2 * packed.size(1) to be a positive multiple of 16, got 8",
    ),
    _c(
        OP,
        "Kp-zero",
        lambda: (cu(4, 0, dtype=U8), SW(), GS(), 0, True, BF),
        "to be a positive multiple of 16, got 0",
    ),
    _c(
        OP,
        "k-small",
        lambda: (PK(), SW(), GS(), 16, True, BF),
        f"{P}: expected k in (16, 32] for packed [4, 16], got 16",
    ),
    _c(
        OP,
        "k-large",
        lambda: (PK(), SW(), GS(), 33, True, BF),
        f"{P}: expected k in (16, 32] for packed [4, 16], got 33",
    ),
    _c(
        OP,
        "scales-dtype",
        lambda: (PK(), cu(512, dtype=U8), GS(), 32, True, BF),
        f"{P}: expected contiguous float8_e4m3fn scales on cuda:0, got Byte on cuda:0",
    ),
    _c(
        OP,
        "scales-cpu",
        lambda: (PK(), cpu(512, dtype=E4), GS(), 32, True, BF),
        f"{P}: expected contiguous float8_e4m3fn scales on cuda:0, got Float8_e4m3fn on cpu",
    ),
    _c(
        OP,
        "swizzled-size",
        lambda: (PK(), cu(8, dtype=E4), GS(), 32, True, BF),
        f"{P}: expected swizzled scales as a flat buffer of 512 (128x4 layout, 4 rows, 2 blocks), got [8]",
    ),
    _c(
        OP,
        "plain-shape",
        lambda: (PK(), cu(4, 3, dtype=E4), GS(), 32, False, BF),
        f"{P}: expected plain scales of shape [4, 2], got [4, 3]",
    ),
    _c(
        OP,
        "global_scale-numel",
        lambda: (PK(), cu(4, 2, dtype=E4), cu(2, dtype=F32), 32, False, BF),
        f"{P}: expected global_scale as one float32 on cuda:0, got Float of shape [2] on cuda:0",
    ),
    _c(
        OP,
        "global_scale-cpu",
        lambda: (PK(), SW(), cpu(1, dtype=F32), 32, True, BF),
        f"{P}: expected global_scale as one float32 on cuda:0, got Float of shape [1] on cpu",
    ),
    _c(
        OP,
        "dtype-int",
        lambda: (PK(), SW(), GS(), 32, True, I32),
        f"{P}: expected dtype bfloat16, float16 or float32, got Int",
    ),
    _c(
        OP,
        "dtype-double",
        lambda: (PK(), SW(), GS(), 32, True, F64),
        f"{P}: expected dtype bfloat16, float16 or float32, got Double",
    ),
]

# --- nvfp4_gemm(a, a_scales, b, b_scales, alpha): nvfp4/nvfp4_gemm_cuda.cpp ---
# a, b: packed [64, 16] (K = 32); their swizzled scales: 128 rows x 4 blocks = 512.
OP = "nvfp4_gemm"
P = "dcgen::nvfp4_gemm"
Q = lambda: cu(64, 16, dtype=U8)  # noqa: E731
SF = lambda: cu(512, dtype=E4)  # noqa: E731
GEMM = [
    _c(
        OP,
        "a-3d",
        lambda: (cu(1, 64, 16, dtype=U8), SF(), Q(), SF(), GS()),
        f"{P}: expected a of shape [M, K/2], got [1, 64, 16]",
    ),
    _c(
        OP,
        "a-cpu",
        lambda: (cpu(64, 16, dtype=U8), SF(), Q(), SF(), GS()),
        f"{P}: expected a as contiguous packed uint8 [rows, K/2] on CUDA, got Byte [64, 16] on cpu",
    ),
    _c(
        OP,
        "a-dtype",
        lambda: (cu(64, 16), SF(), Q(), SF(), GS()),
        f"{P}: expected a as contiguous packed uint8 [rows, K/2] on CUDA, got BFloat16 [64, 16] on cuda:0",
    ),
    _c(
        OP,
        "b-strided",
        lambda: (Q(), SF(), cu(16, 64, dtype=U8).t(), SF(), GS()),
        f"{P}: expected b as contiguous packed uint8 [rows, K/2] on CUDA, got Byte [64, 16] on cuda:0",
    ),
    _c(
        OP,
        "a-misaligned",
        lambda: (at_offset(64, 16, dtype=U8), SF(), Q(), SF(), GS()),
        f"{P}: expected a 16-byte aligned, got a data pointer at 1 bytes past a 16-byte boundary "
        "(storage offset 1",
    ),
    _c(
        OP,
        "b-K",
        lambda: (Q(), SF(), cu(64, 8, dtype=U8), SF(), GS()),
        f"{P}: expected b with K/2 = 16 columns, got [64, 8]",
    ),
    _c(
        OP,
        "a_scales-numel",
        lambda: (Q(), cu(256, dtype=E4), Q(), SF(), GS()),
        f"{P}: expected a's scales as 512 contiguous float8_e4m3fn (128x4 swizzled) on cuda:0, "
        "got Float8_e4m3fn [256] on cuda:0",
    ),
    _c(
        OP,
        "b_scales-dtype",
        lambda: (Q(), SF(), Q(), cu(512, dtype=U8), GS()),
        f"{P}: expected b's scales as 512 contiguous float8_e4m3fn (128x4 swizzled) on cuda:0, "
        "got Byte [512] on cuda:0",
    ),
    _c(
        OP,
        "b_scales-cpu",
        lambda: (Q(), SF(), Q(), cpu(512, dtype=E4), GS()),
        "expected b's scales as 512 contiguous float8_e4m3fn (128x4 swizzled) on cuda:0, "
        "got Float8_e4m3fn [512] on cpu",
    ),
    _c(
        OP,
        "a-b-devices",
        lambda: (
            Q(),
            SF(),
            cu(64, 16, dtype=U8, device="cuda:1"),
            cu(512, dtype=E4, device="cuda:1"),
            GS(),
        ),
        f"{P}: a is on cuda:0, b on cuda:1",
        says_expected_got=False,
        devices=2,
    ),
    _c(
        OP,
        "alpha-numel",
        lambda: (Q(), SF(), Q(), SF(), cu(2, dtype=F32)),
        f"{P}: expected alpha as one float32 on cuda:0, got Float [2] on cuda:0",
    ),
    _c(
        OP,
        "alpha-cpu",
        lambda: (Q(), SF(), Q(), SF(), cpu(1, dtype=F32)),
        f"{P}: expected alpha as one float32 on cuda:0, got Float [1] on cpu",
    ),
]

# --- nvfp4_gemm_w4a16(a, b, b_scales, alpha): nvfp4/nvfp4_gemm_cuda.cpp ---
OP = "nvfp4_gemm_w4a16"
P = "dcgen::nvfp4_gemm_w4a16"
W4A16 = [
    _c(
        OP,
        "a-cpu",
        lambda: (cpu(8, 32), Q(), SF(), GS()),
        f"{P}: expected a as contiguous bfloat16 [M, K] on CUDA, got BFloat16 [8, 32] on cpu",
    ),
    _c(
        OP,
        "a-dtype",
        lambda: (cu(8, 32, dtype=F16), Q(), SF(), GS()),
        f"{P}: expected a as contiguous bfloat16 [M, K] on CUDA, got Half [8, 32] on cuda:0",
    ),
    _c(
        OP,
        "a-strided",
        lambda: (cu(32, 8).t(), Q(), SF(), GS()),
        f"{P}: expected a as contiguous bfloat16 [M, K] on CUDA, got BFloat16 [8, 32] on cuda:0",
    ),
    _c(
        OP,
        "b-K",
        lambda: (cu(8, 64), Q(), SF(), GS()),
        f"{P}: expected b with K/2 = 32 columns, got [64, 16]",
    ),
    _c(
        OP,
        "b-cpu",
        lambda: (cu(8, 32), cpu(64, 16, dtype=U8), SF(), GS()),
        f"{P}: expected b as contiguous packed uint8 [rows, K/2] on CUDA, got Byte [64, 16] on cpu",
    ),
    _c(
        OP,
        "b_scales-numel",
        lambda: (cu(8, 32), Q(), cu(128, dtype=E4), GS()),
        f"{P}: expected b's scales as 512 contiguous float8_e4m3fn (128x4 swizzled) on cuda:0, "
        "got Float8_e4m3fn [128] on cuda:0",
    ),
    _c(
        OP,
        "a-b-devices",
        lambda: (
            cu(8, 32),
            cu(64, 16, dtype=U8, device="cuda:1"),
            cu(512, dtype=E4, device="cuda:1"),
            GS(),
        ),
        f"{P}: a is on cuda:0, b on cuda:1",
        says_expected_got=False,
        devices=2,
    ),
    _c(
        OP,
        "K-multiple",
        lambda: (cu(8, 48), cu(64, 24, dtype=U8), SF(), GS()),
        f"{P}: expected K % 32 == 0, got K=48",
    ),
    _c(
        OP,
        "a-misaligned",
        lambda: (at_offset(8, 32), Q(), SF(), GS()),
        f"{P}: expected a 16-byte aligned, got a data pointer at 2 bytes past a 16-byte boundary "
        "(storage offset 1",
    ),
    _c(
        OP,
        "alpha-dtype",
        lambda: (cu(8, 32), Q(), SF(), cu(1, dtype=F16)),
        f"{P}: expected alpha as one float32 on cuda:0, got Half [1] on cuda:0",
    ),
]

# --- qk_norm_rope(q, k, q_weight, k_weight, eps, cos, sin, norm_split): attention/qk_norm_rope_cuda.cu ---
OP = "qk_norm_rope"
P = "dcgen::qk_norm_rope"
H = lambda d=64, dtype=BF: cu(2, 4, 16, d, dtype=dtype)  # noqa: E731
QK = [
    _c(
        OP,
        "q-cpu",
        lambda: (cpu(2, 4, 16, 64), H(), None, None, 1e-6, None, None, 0),
        f"{P} (CUDA): got a tensor on cpu",
        says_expected_got=False,
    ),
    _c(
        OP,
        "k-cpu",
        lambda: (H(), cpu(2, 4, 16, 64), None, None, 1e-6, None, None, 0),
        f"{P} (CUDA): got a tensor on cpu",
        says_expected_got=False,
    ),
    _c(
        OP,
        "q-3d",
        lambda: (cu(4, 16, 64), H(), None, None, 1e-6, None, None, 0),
        f"{P}: expected (B, H, S, D) tensors, got shape [4, 16, 64]",
    ),
    _c(
        OP,
        "q-dtype",
        lambda: (H(dtype=F32), H(dtype=F32), None, None, 1e-6, None, None, 0),
        f"{P}: expected bfloat16 or float16, got Float",
    ),
    _c(
        OP,
        "head-dim-odd",
        lambda: (H(63), H(63), None, None, 1e-6, None, None, 0),
        f"{P}: expected an even head dim, got 63",
    ),
    _c(
        OP,
        "qk-dtypes",
        lambda: (H(), H(dtype=F16), None, None, 1e-6, None, None, 0),
        f"{P}: expected q and k on one device with one dtype and head dim, "
        "got cuda:0/cuda:0, BFloat16/Half, 64/64",
    ),
    _c(
        OP,
        "qk-head-dims",
        lambda: (H(), H(32), None, None, 1e-6, None, None, 0),
        "with one dtype and head dim, got cuda:0/cuda:0, BFloat16/BFloat16, 64/32",
    ),
    _c(
        OP,
        "qk-devices",
        lambda: (H(), cu(2, 4, 16, 64, device="cuda:1"), None, None, 1e-6, None, None, 0),
        "with one dtype and head dim, got cuda:0/cuda:1, BFloat16/BFloat16, 64/64",
        devices=2,
    ),
    _c(
        OP,
        "eps-zero",
        lambda: (H(), H(), None, None, 0.0, None, None, 0),
        f"{P}: expected eps > 0, got 0",
    ),
    _c(
        OP,
        "eps-nan",
        lambda: (H(), H(), None, None, float("nan"), None, None, 0),
        f"{P}: expected eps > 0, got nan",
    ),
]

# --- fused_attention(q, k, v, q_weight, k_weight, eps, cos, sin, norm_split, key_padding_mask,
#     scale): attention/flash_attention_cuda.cpp ---
OP = "fused_attention"
P = "dcgen::fused_attention"


def _fa(q, k, v, eps=1e-6):  # noqa: ANN001, ANN202
    return (q, k, v, None, None, eps, None, None, 0, None, 0.125)


ATTENTION = [
    _c(
        OP,
        "v-cpu",
        lambda: _fa(H(), H(), cpu(2, 4, 16, 64)),
        f"{P} (CUDA): got a tensor on cpu",
        says_expected_got=False,
    ),
    _c(
        OP,
        "q-5d",
        lambda: _fa(cu(1, 2, 4, 16, 64), H(), H()),
        f"{P}: expected (B, H, S, D) tensors, got shape [1, 2, 4, 16, 64]",
    ),
    _c(
        OP,
        "k-dtype",
        lambda: _fa(H(), H(dtype=F16), H()),
        f"{P}: expected q, k, v of one dtype on one device, got Half on cuda:0 and BFloat16 on cuda:0",
    ),
    _c(
        OP,
        "v-device",
        lambda: _fa(H(), H(), cu(2, 4, 16, 64, device="cuda:1")),
        "expected q, k, v of one dtype on one device, got BFloat16 on cuda:1 and BFloat16 on cuda:0",
        devices=2,
    ),
    _c(
        OP,
        "dtype",
        lambda: _fa(H(dtype=F32), H(dtype=F32), H(dtype=F32)),
        f"{P}: expected bfloat16 or float16, got Float",
    ),
    _c(
        OP,
        "head-dim",
        lambda: _fa(H(96), H(96), H(96)),
        f"{P}: expected head dim 64 or 128, got 96",
    ),
    _c(
        OP,
        "k-batch",
        lambda: _fa(H(), cu(3, 4, 16, 64), cu(3, 4, 16, 64)),
        f"{P}: expected k and v of shape (2, 4, Sk, 64), got [3, 4, 16, 64] and [3, 4, 16, 64]",
    ),
    _c(
        OP,
        "v-seqlen",
        lambda: _fa(H(), H(), cu(2, 4, 8, 64)),
        f"{P}: expected k and v of shape (2, 4, Sk, 64), got [2, 4, 16, 64] and [2, 4, 8, 64]",
    ),
    _c(OP, "eps-negative", lambda: _fa(H(), H(), H(), eps=-1.0), f"{P}: expected eps > 0, got -1"),
    _c(
        OP,
        "eps-inf",
        lambda: _fa(H(), H(), H(), eps=float("-inf")),
        f"{P}: expected eps > 0, got -inf",
    ),
    _c(
        OP,
        "q-seqlen",
        lambda: _fa(cu(2, 4, 1 << 30, 64), H(), H()),
        f"{P}: expected query and key lengths below 2^30, got Sq=1073741824 and Sk=16",
    ),
    _c(
        OP,
        "k-seqlen",
        lambda: _fa(H(), cu(2, 4, 1 << 30, 64), cu(2, 4, 1 << 30, 64)),
        f"{P}: expected query and key lengths below 2^30, got Sq=16 and Sk=1073741824",
    ),
]

# --- channel_rms_norm(x, weight, bias, eps) and channel_rms_norm_fused(x, weight, bias,
#     residual, act, eps): dcae/channel_rms_norm_cuda.cu, dcae/channel_rms_norm.h ---
OP = "channel_rms_norm"
P = "dcgen::channel_rms_norm"
X = lambda: cu(2, 8, 4, 4)  # noqa: E731
RMS = [
    _c(
        OP,
        "x-cpu",
        lambda: (cpu(2, 8, 4, 4), None, None, 1e-6),
        f"{P} (CUDA): x is on cpu",
        says_expected_got=False,
    ),
    _c(OP, "eps-zero", lambda: (X(), cu(8), None, 0.0), f"{P}: expected eps > 0, got 0"),
    _c(OP, "eps-negative", lambda: (X(), None, None, -0.5), f"{P}: expected eps > 0, got -0.5"),
    _c(OP, "eps-nan", lambda: (X(), None, None, float("nan")), f"{P}: expected eps > 0, got nan"),
]
OP = "channel_rms_norm_fused"
RMS_FUSED = [
    _c(
        OP,
        "x-cpu",
        lambda: (cpu(2, 8, 4, 4), None, None, None, "silu", 1e-6),
        f"{P} (CUDA): x is on cpu",
        says_expected_got=False,
    ),
    _c(
        OP, "eps-zero", lambda: (X(), None, None, X(), "relu", 0.0), f"{P}: expected eps > 0, got 0"
    ),
    _c(
        OP,
        "act",
        lambda: (X(), None, None, None, "gelu", 1e-6),
        "dcgen::channel_rms_norm_fused: expected act 'none', 'relu' or 'silu', got 'gelu'",
    ),
    _c(
        OP,
        "act-empty",
        lambda: (X(), None, None, X(), "", 1e-6),
        "dcgen::channel_rms_norm_fused: expected act 'none', 'relu' or 'silu', got ''",
    ),
]
OP = "channel_rms_norm_fused_out"
PO = "dcgen::channel_rms_norm_fused_out"
RMS_FUSED += [
    _c(
        OP,
        "x-cpu",
        lambda: (cpu(2, 8, 4, 4), None, None, None, "none", 1e-6, cpu(2, 8, 4, 4)),
        f"{P} (CUDA): x is on cpu",
        says_expected_got=False,
    ),
    _c(
        OP,
        "out-shape",
        lambda: (X(), None, None, None, "relu", 1e-6, cu(2, 8, 4, 3)),
        f"{PO}: expected out of shape [2, 8, 4, 4] (x's), got [2, 8, 4, 3]",
    ),
    _c(
        OP,
        "out-dtype",
        lambda: (X(), None, None, None, "relu", 1e-6, cu(2, 8, 4, 4, dtype=F16)),
        f"{PO}: expected out of x's dtype BFloat16, got Half",
    ),
    _c(
        OP,
        "out-layout",
        lambda: (X(), None, None, None, "none", 1e-6, cu(2, 8, 4, 4).transpose(2, 3)),
        f"{PO}: expected out laid out as x (strides [128, 16, 4, 1] where a dimension is longer "
        "than 1), got strides [128, 16, 1, 4]",
    ),
]

# --- up_block_shortcut(y, x, shuffle_y) and down_block_shortcut(y, x, unshuffle_y):
#     dcae/block_shortcuts_cuda.cu ---
OP = "up_block_shortcut"
P = "dcgen::up_block_shortcut"
UP = [
    _c(
        OP,
        "y-cpu",
        lambda: (cpu(2, 16, 5, 7), cpu(2, 8, 5, 7), True),
        f"{P} (CUDA): expected y and x on one CUDA device, got y on cpu, x on cpu",
    ),
    _c(
        OP,
        "x-cpu",
        lambda: (cu(2, 16, 5, 7), cpu(2, 8, 5, 7), True),
        f"{P} (CUDA): expected y and x on one CUDA device, got y on cuda:0, x on cpu",
    ),
    _c(
        OP,
        "y-3d",
        lambda: (cu(16, 5, 7), cu(2, 8, 5, 7), True),
        f"{P}: expected 4-d y and x, got 3 and 4 dims",
    ),
    _c(
        OP,
        "dtypes",
        lambda: (cu(2, 16, 5, 7), cu(2, 8, 5, 7, dtype=F16), True),
        f"{P}: expected x and y of one dtype, got y BFloat16, x Half",
    ),
    _c(
        OP,
        "dtype",
        lambda: (cu(2, 16, 5, 7, dtype=F64), cu(2, 8, 5, 7, dtype=F64), True),
        f"{P}: expected dtype float32, float16 or bfloat16, got Double",
    ),
    _c(
        OP,
        "batch",
        lambda: (cu(2, 16, 5, 7), cu(3, 8, 5, 7), True),
        f"{P}: expected one batch size, got y 2, x 3",
    ),
    _c(
        OP,
        "shuffle-shape",
        lambda: (cu(2, 6, 5, 7), cu(2, 8, 5, 7), True),
        f"{P}: with shuffle_y expected y of shape (B, 4*Cout, 5, 7), got [2, 6, 5, 7]",
    ),
    _c(
        OP,
        "no-shuffle-spatial",
        lambda: (cu(2, 4, 10, 13), cu(2, 8, 5, 7), False),
        f"{P}: without shuffle_y expected y of spatial size 10x14, got [2, 4, 10, 13]",
    ),
    # The message states the rule and both numbers, without "expected ... got".
    _c(
        OP,
        "channels",
        lambda: (cu(2, 12, 5, 7), cu(2, 8, 5, 7), True),
        f"{P}: 4*Cout=12 is not a multiple of x's 8 channels",
        says_expected_got=False,
    ),
    _c(
        OP,
        "x-no-channels",
        lambda: (cu(2, 4, 5, 7), cu(2, 0, 5, 7), True),
        f"{P}: 4*Cout=4 is not a multiple of x's 0 channels",
        says_expected_got=False,
    ),
]
# up_block_shortcut_out(y, x, shuffle_y, bias, out): the same checks first, then bias and out
OP = "up_block_shortcut_out"
P = "dcgen::up_block_shortcut_out"
UP_OUT = _as_op(UP, OP, lambda: (None, cu(2, 4, 10, 14))) + [
    _c(
        OP,
        "bias-channels",
        lambda: (cu(2, 16, 5, 7), cu(2, 8, 5, 7), True, cu(4), cu(2, 4, 10, 14)),
        f"{P}: expected a contiguous bias of y's 16 channels, dtype BFloat16 and device cuda:0, "
        "got BFloat16 [4] strides [1] on cuda:0",
    ),
    _c(
        OP,
        "bias-dtype",
        lambda: (cu(2, 16, 5, 7), cu(2, 8, 5, 7), True, cu(16, dtype=F32), cu(2, 4, 10, 14)),
        "got Float [16] strides [1] on cuda:0",
    ),
    _c(
        OP,
        "bias-strided",
        lambda: (cu(2, 16, 5, 7), cu(2, 8, 5, 7), True, cu(32)[::2], cu(2, 4, 10, 14)),
        "got BFloat16 [16] strides [2] on cuda:0",
    ),
    _c(
        OP,
        "bias-cpu",
        lambda: (cu(2, 16, 5, 7), cu(2, 8, 5, 7), True, cpu(16), cu(2, 4, 10, 14)),
        "got BFloat16 [16] strides [1] on cpu",
    ),
    _c(
        OP,
        "out-dtype",
        lambda: (cu(2, 16, 5, 7), cu(2, 8, 5, 7), True, None, cu(2, 4, 10, 14, dtype=F16)),
        f"{P}: expected out of y's dtype BFloat16 on cuda:0, got Half on cuda:0",
    ),
    _c(
        OP,
        "out-cpu",
        lambda: (cu(2, 16, 5, 7), cu(2, 8, 5, 7), True, None, cpu(2, 4, 10, 14)),
        "got BFloat16 on cpu",
    ),
    _c(
        OP,
        "out-shape",
        lambda: (cu(2, 16, 5, 7), cu(2, 8, 5, 7), True, None, cu(2, 4, 10, 12)),
        f"{P}: expected out of shape [2, 4, 10, 14] with strides [560, 140, 14, 1] (NCHW, as y; "
        "dimensions of size 1 may differ), got [2, 4, 10, 12] / [480, 120, 12, 1]",
    ),
    _c(
        OP,
        "out-layout",
        lambda: (
            cu(2, 16, 5, 7).to(memory_format=torch.channels_last),
            cu(2, 8, 5, 7),
            True,
            None,
            cu(2, 4, 10, 14),
        ),
        f"{P}: expected out of shape [2, 4, 10, 14] with strides [560, 1, 56, 4] (channels_last, "
        "as y; dimensions of size 1 may differ), got [2, 4, 10, 14] / [560, 140, 14, 1]",
    ),
    _c(
        OP,
        "out-misaligned",
        lambda: (cu(2, 16, 5, 7), cu(2, 8, 5, 7), True, None, at_offset(2, 4, 10, 14)),
        f"{P}: expected an NCHW out aligned to 4 bytes, got storage offset 1",
    ),
]
OP = "down_block_shortcut"
P = "dcgen::down_block_shortcut"
DOWN = [
    _c(
        OP,
        "y-cpu",
        lambda: (cpu(2, 4, 4, 4), cu(2, 8, 8, 8), False),
        f"{P} (CUDA): expected y and x on one CUDA device, got y on cpu, x on cuda:0",
    ),
    _c(
        OP,
        "x-5d",
        lambda: (cu(2, 4, 4, 4), cu(1, 2, 8, 8, 8), False),
        f"{P}: expected 4-d y and x, got 4 and 5 dims",
    ),
    _c(
        OP,
        "dtypes",
        lambda: (cu(2, 4, 4, 4, dtype=F32), cu(2, 8, 8, 8), False),
        f"{P}: expected x and y of one dtype, got y Float, x BFloat16",
    ),
    _c(
        OP,
        "dtype",
        lambda: (cu(2, 4, 4, 4, dtype=I32), cu(2, 8, 8, 8, dtype=I32), False),
        f"{P}: expected dtype float32, float16 or bfloat16, got Int",
    ),
    _c(
        OP,
        "batch",
        lambda: (cu(1, 4, 4, 4), cu(2, 8, 8, 8), False),
        f"{P}: expected one batch size, got y 1, x 2",
    ),
    # "must be even, got": the rule and the value, without the word "expected".
    _c(
        OP,
        "odd-spatial",
        lambda: (cu(2, 4, 2, 4), cu(2, 8, 5, 8), False),
        f"{P}: x's spatial size must be even, got 5x8",
        says_expected_got=False,
    ),
    _c(
        OP,
        "unshuffle-shape",
        lambda: (cu(2, 4, 4, 4), cu(2, 8, 8, 8), True),
        f"{P}: with unshuffle_y expected y of shape (B, Cout/4, 8, 8), got [2, 4, 4, 4]",
    ),
    _c(
        OP,
        "no-unshuffle-spatial",
        lambda: (cu(2, 4, 4, 5), cu(2, 8, 8, 8), False),
        f"{P}: without unshuffle_y expected y of spatial size 4x4, got [2, 4, 4, 5]",
    ),
    _c(
        OP,
        "channels",
        lambda: (cu(2, 3, 4, 4), cu(2, 2, 8, 8), False),
        f"{P}: x's 4*Cin=8 channels are not a multiple of Cout=3",
        says_expected_got=False,
    ),
    _c(
        OP,
        "y-no-channels",
        lambda: (cu(2, 0, 4, 4), cu(2, 8, 8, 8), False),
        f"{P}: x's 4*Cin=32 channels are not a multiple of Cout=0",
        says_expected_got=False,
    ),
]

# --- glu_depthwise_conv(x, weight, bias): dcae/glu_depthwise_cuda.cu ---
OP = "glu_depthwise_conv"
P = "dcgen::glu_depthwise_conv"
GX = lambda: cu(2, 8, 6, 6)  # noqa: E731
GW = lambda: cu(8, 1, 3, 3)  # noqa: E731
GLU = [
    _c(
        OP,
        "x-cpu",
        lambda: (cpu(2, 8, 6, 6), cpu(8, 1, 3, 3), None),
        f"{P} (CUDA): x is on cpu",
        says_expected_got=False,
    ),
    _c(
        OP,
        "x-3d",
        lambda: (cu(8, 6, 6), GW(), None),
        f"{P}: expected x of shape (B, 2*Ch, H, W), got [8, 6, 6]",
    ),
    _c(
        OP,
        "x-dtype",
        lambda: (cu(2, 8, 6, 6, dtype=F64), GW(), None),
        f"{P}: expected x of dtype float32, float16 or bfloat16, got Double",
    ),
    _c(
        OP,
        "odd-channels",
        lambda: (cu(2, 7, 6, 6), cu(7, 1, 3, 3), None),
        f"{P}: expected an even channel count (value and gate halves), got 7",
    ),
    _c(
        OP,
        "weight-shape",
        lambda: (GX(), cu(8, 1, 5, 5), None),
        f"{P}: expected weight of shape (8, 1, 3, 3), got [8, 1, 5, 5]",
    ),
    _c(
        OP,
        "weight-cpu",
        lambda: (GX(), cpu(8, 1, 3, 3), None),
        f"{P}: weight is on cpu but x is on cuda:0",
        says_expected_got=False,
    ),
    _c(OP, "bias-shape", lambda: (GX(), GW(), cu(4)), f"{P}: expected bias of shape (8), got [4]"),
    _c(
        OP,
        "bias-cpu",
        lambda: (GX(), GW(), cpu(8)),
        f"{P}: bias is on cpu but x is on cuda:0",
        says_expected_got=False,
    ),
    _c(
        OP,
        "expand_bias-shape",
        lambda: (GX(), GW(), None, cu(2, 4)),
        f"{P}: expected expand_bias of shape (8), got [2, 4]",
    ),
    _c(
        OP,
        "expand_bias-cpu",
        lambda: (GX(), GW(), cu(8), cpu(8)),
        f"{P}: expand_bias is on cpu but x is on cuda:0",
        says_expected_got=False,
    ),
]

# --- relu_linear_attention(qkv, eps): dcae/linear_attention_cuda.cu ---
OP = "relu_linear_attention"
P = "dcgen::relu_linear_attention"
LINEAR = [
    _c(
        OP,
        "qkv-cpu",
        lambda: (cpu(1, 2, 24, 16), 1e-15),
        f"{P} (CUDA): qkv is on cpu",
        says_expected_got=False,
    ),
    _c(
        OP,
        "qkv-3d",
        lambda: (cu(2, 24, 16), 1e-15),
        f"{P}: expected qkv of shape (B, heads, 3*d, N), got [2, 24, 16]",
    ),
    _c(
        OP,
        "qkv-not-3d",
        lambda: (cu(1, 2, 10, 16), 1e-15),
        f"{P}: expected qkv of shape (B, heads, 3*d, N), got [1, 2, 10, 16]",
    ),
    # "must be in [1, 32], got": the rule and the value, without the word "expected".
    _c(
        OP,
        "head-dim-large",
        lambda: (cu(1, 2, 99, 16), 1e-15),
        f"{P}: head dim must be in [1, 32], got 33",
        says_expected_got=False,
    ),
    _c(
        OP,
        "head-dim-zero",
        lambda: (cu(1, 2, 0, 16), 1e-15),
        f"{P}: head dim must be in [1, 32], got 0",
        says_expected_got=False,
    ),
    _c(OP, "eps-zero", lambda: (cu(1, 2, 24, 16), 0.0), f"{P}: expected eps > 0, got 0"),
    _c(OP, "eps-nan", lambda: (cu(1, 2, 24, 16), float("nan")), f"{P}: expected eps > 0, got nan"),
]

# --- bias_act_(out, x, bias, act, residual): dcae/bias_act_cuda.cu ---
OP = "bias_act_"
P = "dcgen::bias_act_"
BIAS_ACT = [
    _c(
        OP,
        "x-cpu",
        lambda: (cpu(2, 8, 5, 7), cpu(2, 8, 5, 7), cpu(8), "none", None),
        f"{P} (CUDA): expected out, x, bias and residual on one CUDA device, got x on cpu, "
        "out on cpu, bias on cpu",
    ),
    _c(
        OP,
        "x-3d",
        lambda: (cu(2, 8, 5), cu(2, 8, 5), cu(8), "none", None),
        f"{P}: expected a 4-d x (N, C, H, W), got 3 dims",
    ),
    _c(
        OP,
        "dtype",
        lambda: (
            cu(1, 8, 2, 2, dtype=F64),
            cu(1, 8, 2, 2, dtype=F64),
            cu(8, dtype=F64),
            "none",
            None,
        ),
        f"{P}: expected dtype float32, float16 or bfloat16, got Double",
    ),
    _c(
        OP,
        "bias-dtype",
        lambda: (cu(1, 8, 2, 2), cu(1, 8, 2, 2), cu(8, dtype=F16), "relu", None),
        f"{P}: expected out, bias and residual of x's dtype BFloat16, got out BFloat16, bias Half",
    ),
    _c(
        OP,
        "bias-shape",
        lambda: (cu(1, 8, 2, 2), cu(1, 8, 2, 2), cu(7), "relu", None),
        f"{P}: expected a contiguous bias of shape (8), got [7]",
    ),
    _c(
        OP,
        "x-strides",
        lambda: (cu(2, 8, 5, 7), cu(2, 8, 7, 5).transpose(2, 3), cu(8), "none", None),
        f"{P}: expected x dense in channels_last or NCHW, got strides [280, 35, 1, 5]",
    ),
    _c(
        OP,
        "out-shape",
        lambda: (cu(2, 8, 5, 6), cu(2, 8, 5, 7), cu(8), "none", None),
        f"{P}: expected out and residual with x's shape [2, 8, 5, 7] and strides "
        "[280, 35, 7, 1], got out [2, 8, 5, 6] / [240, 30, 6, 1]",
    ),
    _c(
        OP,
        "act",
        lambda: (cu(1, 8, 2, 2), cu(1, 8, 2, 2), cu(8), "gelu", None),
        f"{P}: expected act 'none', 'relu' or 'silu', got 'gelu'",
    ),
]

CASES: list[Case] = [
    *FP8_EPILOGUE, *FP8_EPILOGUE_INTO, *FP8_EPILOGUE_FP8, *ADALN, *ADALN_FP8, *GATED, *QUANTIZE_FP8, *QUANTIZE_NVFP4, *LOWRANK, *DEQUANT, *GEMM,
    *W4A16, *QK, *ATTENTION, *RMS, *RMS_FUSED, *UP, *UP_OUT, *DOWN, *GLU, *LINEAR, *BIAS_ACT,
]  # fmt: skip
BY_ID = {case.id: case for case in CASES}
assert len(BY_ID) == len(CASES), "case ids must be unique"


def _why_not_runnable(case: Case) -> str | None:
    if case.op not in CUDA_OPS:
        return f"this dcgen._C has no CUDA kernel for {case.op}"
    # A GPU machine's FakeTensorMode touches each fake's real device: cuda:1 needs two GPUs.
    if case.devices > 1 and torch.cuda.is_available() and torch.cuda.device_count() < case.devices:
        return f"needs {case.devices} CUDA devices on a machine that has GPUs"
    return None


# --- the child: python tests/ops/test_compiled_op_checks.py ID... ---


def _emit(record: dict[str, Any]) -> None:
    print(MARK + json.dumps(record), flush=True)


def _child(ids: list[str]) -> None:
    from torch._subclasses.fake_tensor import FakeTensorMode

    cuda_key = torch._C.DispatchKeySet(torch._C.DispatchKey.CUDA)
    for cid in ids:
        case = BY_ID[cid]
        _emit({"event": "start", "id": cid})
        try:
            with FakeTensorMode(allow_non_fake_inputs=True):
                args = case.build()
        except Exception as err:  # a broken case, not a finding about the op
            _emit({"event": "done", "id": cid, "outcome": "build-error", "type": type(err).__name__,
                   "message": str(err)})  # fmt: skip
            continue
        op = getattr(torch.ops.dcgen, case.op).default
        try:
            op.redispatch(cuda_key, *args)  # outside the mode: straight into the CUDA host code
        except Exception as err:
            record = {"outcome": "raised", "type": type(err).__name__, "message": str(err)}
        else:
            record = {"outcome": "returned", "type": None, "message": ""}
        _emit({"event": "done", "id": cid, **record})


# --- the parent ---


def _tail(text: str, n: int = 3000) -> str:
    return text if len(text) <= n else "..." + text[-n:]


def _run_children(ids: list[str]) -> dict[str, dict[str, Any]]:
    """Runs the cases in as few children as crashes allow: a child that dies takes the case it
    was running with it (recorded as a crash) and the rest go to a fresh child."""
    results: dict[str, dict[str, Any]] = {}
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    pending = list(ids)
    while pending:
        cmd = [sys.executable, "-X", "faulthandler", str(Path(__file__).resolve()), *pending]
        try:
            proc = subprocess.run(
                cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=CHILD_TIMEOUT_S
            )
            stdout, stderr, how = proc.stdout, proc.stderr, f"exit code {proc.returncode}"
            if proc.returncode < 0:
                how += f" (signal {-proc.returncode})"
        except subprocess.TimeoutExpired as err:

            def _text(b: bytes | str | None) -> str:
                return b.decode(errors="replace") if isinstance(b, bytes) else (b or "")

            stdout, stderr, how = (
                _text(err.stdout),
                _text(err.stderr),
                f"timeout {CHILD_TIMEOUT_S}s",
            )
        started: str | None = None
        for line in stdout.splitlines():
            if not line.startswith(MARK):
                continue
            record = json.loads(line[len(MARK) :])
            if record["event"] == "start":
                started = record["id"]
            else:
                results[record["id"]] = record
                started = None
        if started is not None:  # the child died inside this case
            results[started] = {"outcome": "crashed", "how": how, "stderr": _tail(stderr)}
        progressed = [cid for cid in pending if cid in results]
        pending = [cid for cid in pending if cid not in results]
        if pending and not progressed:  # died before its first case: no retry would do better
            for cid in pending:
                results[cid] = {"outcome": "no-child", "how": how, "stderr": _tail(stderr)}
            pending = []
    return results


@pytest.fixture(scope="module")
def results() -> dict[str, dict[str, Any]]:
    return _run_children([case.id for case in CASES if _why_not_runnable(case) is None])


class MessageDefect(Exception):
    """The op raised cleanly, from the intended check, but its message does not say what was
    expected and what came. Cases marked xfail expect exactly this: any other failure (a crash,
    another check firing, another exception type) still fails them."""


def _param(case: Case):  # noqa: ANN202
    marks = []
    if case.xfail:
        marks.append(pytest.mark.xfail(strict=True, raises=MessageDefect, reason=case.xfail))
    return pytest.param(case, id=case.id, marks=marks)


@pytest.mark.parametrize("case", [_param(case) for case in CASES])
def test_bad_input_raises_a_clear_error(case: Case, results: dict[str, dict[str, Any]]) -> None:
    why_not = _why_not_runnable(case)
    if why_not is not None:
        pytest.skip(why_not)
    r = results[case.id]
    outcome = r["outcome"]
    assert outcome != "crashed", (
        f"{case.id}: the process died ({r['how']}) in this case (dcgen::{case.op}'s CUDA host "
        f"code) instead of raising; child stderr:\n{r['stderr']}"
    )
    assert outcome != "no-child", f"the child process failed to start ({r['how']}):\n{r['stderr']}"
    assert outcome != "build-error", f"{case.id}: building the inputs failed: {r['message']}"
    assert outcome == "raised", (
        f"{case.id}: dcgen::{case.op} accepted the input (no check fired): the case must violate "
        "a check"
    )
    msg = r["message"]
    assert r["type"] == case.exc, f"{case.id}: raised {r['type']}, not {case.exc}: {msg}"
    for part in case.expect:
        assert part in msg, f"{case.id}: {part!r} not in the message:\n{msg}"
    if case.says_expected_got and not ("expected" in msg and "got" in msg):
        raise MessageDefect(
            f"{case.id}: the message does not say what was expected and what came:\n{msg}"
        )


def test_every_cuda_op_has_a_case() -> None:
    covered = {case.op for case in CASES}
    missing = sorted(set(CUDA_OPS) - covered)
    assert not missing, f"dcgen ops with a CUDA kernel but no case here: {missing}"


if __name__ == "__main__":
    _child(sys.argv[1:])
