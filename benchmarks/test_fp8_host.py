"""Host time of one FP8Linear call: the general path against the direct inference route.

What is timed is Python and dispatch, not arithmetic: the two dcgen ops run as CPU kernels that
return preallocated outputs, and ``torch._scaled_mm`` is replaced by a function that does the
same, so the timings show what each route spends before and between its three kernels. On a
GPU, a FLUX linear's FP8 GEMM at 4,608 tokens takes about 0.1-0.4 ms (README low-precision
table), so some tens of microseconds of host time per linear decide whether the GPU waits.

Both rows run on the CPU wherever this file runs (the GPU machine included): host work is the
same code either way, minus CUDA's own launch cost, which both routes pay three times.
"""

from __future__ import annotations

import pytest
import torch
from _harness import rounds
from torch import nn

import dcgen.quant.fp8 as fp8_module
from dcgen.ops import _extension
from dcgen.quant import FP8Linear

pytestmark = pytest.mark.skipif(
    not (_extension.has_schema("quantize_fp8") and _extension.has_schema("fp8_scale_epilogue")),
    reason="dcgen._C is not built: no dcgen FP8 ops",
)

M, K, N = 8, 256, 256  # small: the stubs make the size irrelevant
CALLS = 200  # per timed round: one call is a few microseconds


@pytest.fixture
def stubbed(monkeypatch):
    q = torch.zeros(M, K, dtype=torch.float8_e4m3fn)
    s = torch.ones(M, 1)
    y = torch.zeros(M, N, dtype=torch.bfloat16)
    lib = torch.library.Library("dcgen", "IMPL")
    lib.impl("quantize_fp8", lambda x, block: (q, s), "CPU")
    lib.impl("fp8_scale_epilogue", lambda y_, rs, cs, bias, act: y_, "CPU")
    monkeypatch.setattr(
        _extension,
        "_KERNELS",
        _extension._KERNELS | {("quantize_fp8", "CPU"), ("fp8_scale_epilogue", "CPU")},
    )
    monkeypatch.setattr(fp8_module, "_REJECTED", set())
    monkeypatch.setattr(torch, "_scaled_mm", lambda *a, **k: y)
    monkeypatch.setenv("DCGEN_FP8_GEMM", "tensor")  # the route CUDA takes ("auto" there)
    monkeypatch.delenv("DCGEN_DISABLE_KERNELS", raising=False)
    try:
        yield
    finally:
        lib._destroy()


@pytest.mark.parametrize("impl", ["baseline", "dcgen"])
def test_fp8_linear_host_time(benchmark, impl, stubbed, monkeypatch):
    torch.manual_seed(0)
    layer = FP8Linear.from_linear(nn.Linear(K, N).bfloat16())
    x = torch.randn(M, K, dtype=torch.bfloat16)
    if impl == "baseline":  # the general path: fp8_gemm and the ops' public wrappers
        monkeypatch.setattr(FP8Linear, "_direct", lambda self, x: False)
    benchmark.group = "fp8 linear host time per call (stubbed kernels)"
    benchmark.extra_info.update(impl=impl, baseline_name="FP8Linear general path")

    def calls() -> None:
        for _ in range(CALLS):
            layer(x)

    with torch.inference_mode():
        layer(x)
        benchmark.pedantic(calls, rounds=rounds(20, 10), warmup_rounds=1)
    if benchmark.stats:
        benchmark.extra_info["us_per_call"] = benchmark.stats.stats.median / CALLS * 1e6
