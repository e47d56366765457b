"""Low-precision benchmarks: FP8 W8A8 linears vs bf16 linears at FLUX shapes (docs/baselines.md),
the activation-quantize kernels' bandwidth against a plain copy of the same input, and the
modulation and the GELU scale epilogue with their FP8 quantize fused against the two kernels,
and the epilogue writing into part of a larger buffer against writing a new tensor and copying.

On a GPU: M = 4,608 tokens (FLUX 1K = DC-Gen-f64c128 4K: 4,096 image + 512 text), bf16. On a CPU:
tiny shapes in fp32 so CI runs every case (timings meaningless there)."""

from __future__ import annotations

import pytest
import torch
from _harness import DEVICE, ON_GPU, record_rel_err, rounds, time_it
from torch import nn

from dcgen.ops import (
    adaln_modulate,
    adaln_modulate_fp8,
    fp8_scale_epilogue,
    fp8_scale_epilogue_fp8,
    fp8_scale_epilogue_into,
    has_kernel,
)
from dcgen.ops.quantize_fp8 import quantize_fp8
from dcgen.ops.quantize_nvfp4 import quantize_nvfp4_activation
from dcgen.quant import FP8Linear, fp8

DTYPE = torch.bfloat16 if ON_GPU else torch.float32
# Calls per synchronisation (_harness.time_it): these kernels run for tens to hundreds of
# microseconds, where a sync per call would time the host as much as the GPU.
BACK_TO_BACK = 10
M = 4608 if ON_GPU else 64
# (N, K) of FLUX's block linears: fused qkv, attention out, MLP up, MLP down, single-block
# fused qkv+mlp. CPU: two small stand-ins (one K not a multiple of 128).
LINEAR_SHAPES = (
    [(9216, 3072), (3072, 3072), (12288, 3072), (3072, 12288), (21504, 3072)]
    if ON_GPU
    else [(256, 256), (128, 320)]
)


# "row": per-row scales on the "tensor" route (DCGEN_FP8_GEMM=tensor; on CUDA with the kernel
# built: unit-scale _scaled_mm + dcgen's scale epilogue); "row-rowwise": the same scales inside
# torch._scaled_mm (DCGEN_FP8_GEMM=rowwise; cuBLAS's outer-vector scaling with the bias fused,
# one kernel; the default on Hopper since the H200 run of 2026-11-27), so one run shows which
# route is faster on the card; "-fast": the same with fast accumulation
# (FP8Config(fast_accum=True)).
VARIANTS = ["row", "row-rowwise", "row-fast", "row-rowwise-fast", "block128"]


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("nk", LINEAR_SHAPES, ids=lambda nk: f"{nk[0]}x{nk[1]}")
@pytest.mark.parametrize("impl", ["baseline", "dcgen"])
def test_fp8_linear(benchmark, impl, nk, variant, monkeypatch):
    n, k = nk
    granularity = variant.split("-")[0]
    # a GEMM case _scaled_mm rejects is recorded process-wide and re-routes every later one:
    # each case starts clean, and reports what it rejected
    monkeypatch.setattr(fp8, "_REJECTED", set())
    if granularity == "row":
        monkeypatch.setenv("DCGEN_FP8_GEMM", "rowwise" if "rowwise" in variant else "tensor")
    torch.manual_seed(0)
    lin = nn.Linear(k, n).to(DEVICE, DTYPE)
    x = torch.randn(M, k, device=DEVICE, dtype=DTYPE)
    fast = variant.endswith("-fast")
    layer = lin if impl == "baseline" else FP8Linear.from_linear(lin, granularity, DTYPE, fast)
    benchmark.group = f"linear M={M} N={n} K={k} fp8-{variant} {str(DTYPE)[6:]}"
    benchmark.extra_info.update(impl=impl, baseline_name=f"nn.Linear {str(DTYPE)[6:]}")
    with torch.inference_mode():
        time_it(benchmark, lambda: layer(x), n_rounds=rounds(50, 3), back_to_back=BACK_TO_BACK)
    if benchmark.stats:
        benchmark.extra_info["tflops"] = 2 * M * n * k / benchmark.stats.stats.median / 1e12
    if impl == "dcgen":
        benchmark.extra_info["rejected_gemm_cases"] = sorted(map(str, fp8._REJECTED))
        benchmark.extra_info["direct_route"] = bool(layer.__dict__.get("_route", (None, 0))[1])
        # record only: FP8's quantization error, not a kernel fault (tests/quant bound it)
        record_rel_err(benchmark, lambda: layer(x), lambda: lin(x), limit=None)


# Activations of FLUX's widest input (12,288 MLP hidden) at 4,608 tokens; CPU: small.
Q_SHAPE = (4608, 12288) if ON_GPU else (64, 1024)
QUANTIZERS = {
    "fp8-row": ("quantize_fp8", lambda x: quantize_fp8(x, "row"), 1.0),
    "fp8-block128": ("quantize_fp8", lambda x: quantize_fp8(x, "block128"), 1.0),
    # static global scale: the one-pass W4A4 path (packed 0.5 B + a scale per 16 elements)
    "nvfp4": (
        "quantize_nvfp4",
        lambda x: quantize_nvfp4_activation(x, _static_scale(x.device), check_finite=False),
        0.5 + 1 / 16,
    ),
    # no calibrated scale (NVFP4Linear W4A4's default): the amax reduction, the scale's small
    # ops and the quantize, against the same bytes (so x is read twice within this time)
    "nvfp4-dynamic": (
        "quantize_nvfp4",
        lambda x: quantize_nvfp4_activation(x, None, check_finite=False),
        0.5 + 1 / 16,
    ),
}
STATIC_SCALE = torch.tensor(1e-3)
_SCALES: dict[torch.device, torch.Tensor] = {}


def _static_scale(device: torch.device) -> torch.Tensor:
    """STATIC_SCALE on `device`, copied once. Copied per call, every timed quantize included a
    blocking host-to-device copy, after which torch synchronises the stream, so the 10 calls per
    synchronisation of `time_it` ran one at a time with the host's time between them (the H200
    run of 2026-11-26 had this case at 0.17 ms against 0.13-0.14 ms for the FP8 quantizes)."""
    if device not in _SCALES:
        _SCALES[device] = STATIC_SCALE.to(device)
    return _SCALES[device]


@pytest.mark.parametrize("what", list(QUANTIZERS))
@pytest.mark.parametrize("impl", ["baseline", "dcgen"])
def test_activation_quantize(benchmark, impl, what):
    op, fn, out_bytes = QUANTIZERS[what]
    if impl == "dcgen" and ON_GPU and not has_kernel(op, DEVICE):
        pytest.skip(f"no compiled {op} kernel for this device")
    x = torch.randn(Q_SHAPE, device=DEVICE, dtype=DTYPE)
    if impl == "baseline":
        nbytes = 2 * x.numel() * x.element_size()  # read + write

        def run():
            return x.clone()
    else:
        nbytes = x.numel() * (x.element_size() + out_bytes)

        def run():
            return fn(x)

    benchmark.group = f"quantize {what} {Q_SHAPE} {str(DTYPE)[6:]} (GB/s vs copy)"
    benchmark.extra_info.update(impl=impl, baseline_name="copy (x.clone)", bytes_moved=nbytes)
    with torch.inference_mode():
        time_it(benchmark, run, n_rounds=rounds(100, 3), back_to_back=BACK_TO_BACK)
    if benchmark.stats:
        benchmark.extra_info["gbps"] = nbytes / benchmark.stats.stats.median / 1e9


# A FLUX 4K block input: 4,608 tokens x 3,072 (CPU: small).
MOD_SHAPE = (4608, 3072) if ON_GPU else (64, 256)


@pytest.mark.parametrize("impl", ["baseline", "dcgen"])
def test_modulate_then_fp8_quantize(benchmark, impl):
    # What an FP8 block's modulated input costs: adaln_modulate, then quantize_fp8 over its
    # output (baseline: the two kernels, as before the fused op) against adaln_modulate_fp8.
    if impl == "dcgen" and ON_GPU and not has_kernel("adaln_modulate_fp8", DEVICE):
        pytest.skip("no compiled adaln_modulate_fp8 kernel for this device")
    m, d = MOD_SHAPE
    x = torch.randn(1, m, d, device=DEVICE, dtype=DTYPE)
    emb = torch.randn(1, 2 * d, device=DEVICE, dtype=DTYPE)
    shift, scale = emb[:, :d], emb[:, d:]

    def two_ops():
        out = adaln_modulate(x, shift, scale, 1e-6)
        return out, quantize_fp8(out, "row")

    def fused():
        return adaln_modulate_fp8(x, shift, scale, 1e-6)

    # bytes at the roofline: x read, the 16-bit output and the codes written (one pass)
    nbytes = x.numel() * (2 * x.element_size() + 1)
    group = f"adaln_modulate + fp8 row quantize {MOD_SHAPE} {str(DTYPE)[6:]}"
    _time_fused_pair(benchmark, impl, two_ops, fused, group, "adaln_modulate then quantize_fp8",
                     nbytes)  # fmt: skip


def _time_fused_pair(benchmark, impl, two_ops, fused, group, baseline_name, nbytes) -> None:  # noqa: ANN001
    """Time the two-kernel baseline or the fused op, with the bytes a single pass moves."""
    benchmark.group = group
    benchmark.extra_info.update(impl=impl, baseline_name=baseline_name, bytes_moved=nbytes)
    with torch.inference_mode():
        time_it(
            benchmark, two_ops if impl == "baseline" else fused, n_rounds=rounds(100, 3),
            back_to_back=BACK_TO_BACK,
        )  # fmt: skip
    if benchmark.stats:
        benchmark.extra_info["gbps"] = nbytes / benchmark.stats.stats.median / 1e9


# FLUX's MLP hidden state at 4K: 4,608 tokens x 12,288 (CPU: small).
EPI_SHAPE = (4608, 12288) if ON_GPU else (64, 512)


@pytest.mark.parametrize("impl", ["baseline", "dcgen"])
def test_gelu_epilogue_then_fp8_quantize(benchmark, impl):
    # The MLP's first FP8 linear feeding its second: the GELU scale epilogue, then quantize_fp8
    # over its output (baseline: the two kernels) against fp8_scale_epilogue_fp8 (one kernel).
    if impl == "dcgen" and ON_GPU and not has_kernel("fp8_scale_epilogue_fp8", DEVICE):
        pytest.skip("no compiled fp8_scale_epilogue_fp8 kernel for this device")
    m, n = EPI_SHAPE
    dtype = torch.bfloat16
    y = (torch.randn(m, n, device=DEVICE) * 1e3).to(dtype)
    rs = torch.rand(m, 1, device=DEVICE) * 1e-3
    cs = torch.rand(n, 1, device=DEVICE) * 1e-2
    bias = torch.randn(n, device=DEVICE).to(dtype)

    def two_ops():
        out = fp8_scale_epilogue(y, rs, cs, bias, "gelu_tanh")
        return out, quantize_fp8(out, "row")

    def fused():
        return fp8_scale_epilogue_fp8(y, rs, cs, bias, "gelu_tanh")

    nbytes = y.numel() * (2 + 2 + 1)  # y read, the bf16 output and the codes written
    group = f"gelu scale epilogue + fp8 row quantize {EPI_SHAPE} bfloat16"
    _time_fused_pair(benchmark, impl, two_ops, fused, group,
                     "fp8_scale_epilogue then quantize_fp8", nbytes)  # fmt: skip


@pytest.mark.parametrize("impl", ["baseline", "dcgen"])
def test_gelu_epilogue_into_buffer(benchmark, impl):
    # A FLUX single block's FP8 MLP output into its half of proj_out's [attention | MLP] input:
    # the epilogue into a new tensor, then copied in (baseline), against the epilogue writing
    # the strided column block itself (fp8_scale_epilogue_into).
    if impl == "dcgen" and ON_GPU and not has_kernel("fp8_scale_epilogue_into", DEVICE):
        pytest.skip("no compiled fp8_scale_epilogue_into kernel for this device")
    m, n = EPI_SHAPE
    y = (torch.randn(m, n, device=DEVICE) * 1e3).bfloat16()
    rs = torch.rand(m, 1, device=DEVICE) * 1e-3
    cs = torch.rand(n, 1, device=DEVICE) * 1e-2
    bias = torch.randn(n, device=DEVICE).bfloat16()
    joint = torch.empty(m, n // 4 + n, device=DEVICE, dtype=torch.bfloat16)  # [attn | MLP]
    out = joint[:, n // 4 :]

    def two_ops():
        out.copy_(fp8_scale_epilogue(y, rs, cs, bias, "gelu_tanh"))

    def fused():
        fp8_scale_epilogue_into(y, rs, cs, bias, "gelu_tanh", out)

    nbytes = y.numel() * (2 + 2)  # y read, the block written
    group = f"gelu scale epilogue into a column block {EPI_SHAPE} bfloat16"
    _time_fused_pair(benchmark, impl, two_ops, fused, group,
                     "fp8_scale_epilogue then copy", nbytes)  # fmt: skip


def _sm90_kernel_or_skip(kernel: str, monkeypatch) -> str:
    """Selects one of the two Hopper kernels (DCGEN_NVFP4_SM90_KERNEL); the first one's rows run
    on Hopper GPUs only. Returns the benchmark group's suffix."""
    if kernel == "rs":
        return ""
    if not ON_GPU or torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("the first Hopper kernel (mainloop) is compared on sm_90 GPUs only")
    monkeypatch.setenv("DCGEN_NVFP4_SM90_KERNEL", kernel)
    return f" ({kernel} kernel)"


@pytest.mark.parametrize("kernel", ["rs", "mainloop"])
@pytest.mark.parametrize("nk", LINEAR_SHAPES[:2], ids=lambda nk: f"{nk[0]}x{nk[1]}")
@pytest.mark.parametrize("impl", ["baseline", "dcgen"])
def test_nvfp4_gemm(benchmark, impl, nk, kernel, monkeypatch):
    """NVFP4 x NVFP4 (operands quantized beforehand) vs a bf16 matmul; on GPUs only where a
    kernel runs: sm_100a / sm_120a, or sm_90a (switched on here: the Hopper kernels are opt-in
    for users until validated; `kernel` picks which of the two, with the baseline timed again in
    each group). Elsewhere the reference would time an fp32 dequantize + matmul."""
    from dcgen.ops.nvfp4_gemm import HOPPER_ENV, kernel_available, nvfp4_gemm
    from dcgen.quant.nvfp4 import quantize_nvfp4, swizzle_scales

    n, k = nk
    monkeypatch.setenv(HOPPER_ENV, "1")
    if ON_GPU and not kernel_available(torch.device(DEVICE), n, k):
        pytest.skip("the NVFP4 GEMM kernels need an sm_90 / sm_100 / sm_120 GPU and their files")
    suffix = _sm90_kernel_or_skip(kernel, monkeypatch)
    x = torch.randn(M, k, device=DEVICE, dtype=DTYPE)
    w = torch.randn(n, k, device=DEVICE, dtype=DTYPE) * 0.02
    if impl == "baseline":

        def run():
            return x @ w.t()
    else:
        a, sa, ga = quantize_nvfp4_activation(x, check_finite=False)
        qw = quantize_nvfp4(w)
        b, sb, alpha = qw.packed, swizzle_scales(qw.scales), ga * qw.global_scale

        def run():
            return nvfp4_gemm(a, sa, b, sb, alpha)

    benchmark.group = f"gemm M={M} N={n} K={k} nvfp4 {str(DTYPE)[6:]}{suffix}"
    benchmark.extra_info.update(impl=impl, baseline_name=f"matmul {str(DTYPE)[6:]}")
    with torch.inference_mode():
        time_it(benchmark, run, n_rounds=rounds(50, 3), back_to_back=BACK_TO_BACK)
    if benchmark.stats:
        benchmark.extra_info["tflops"] = 2 * M * n * k / benchmark.stats.stats.median / 1e12


@pytest.mark.parametrize("kernel", ["rs", "mainloop"])
@pytest.mark.parametrize("nk", LINEAR_SHAPES[:2], ids=lambda nk: f"{nk[0]}x{nk[1]}")
@pytest.mark.parametrize("impl", ["baseline", "dcgen"])
def test_nvfp4_gemm_w4a16(benchmark, impl, nk, kernel, monkeypatch):
    """W4A16 on Hopper: bf16 activations x an NVFP4 weight dequantized in the GEMM's mainloop,
    vs a bf16 matmul (the issue's goal: 0.8x its TFLOP/s with 3.5x less weight memory). GPUs:
    sm_90 only; CPU: the reference at toy sizes."""
    from dcgen.ops.nvfp4_gemm import HOPPER_ENV, nvfp4_gemm_w4a16, w4a16_kernel_available
    from dcgen.quant.nvfp4 import quantize_nvfp4, swizzle_scales

    n, k = nk
    monkeypatch.setenv(HOPPER_ENV, "1")
    if ON_GPU and not w4a16_kernel_available(torch.device(DEVICE), k):
        pytest.skip("the W4A16 NVFP4 GEMM kernel needs an sm_90 GPU and its sm_90a file")
    suffix = _sm90_kernel_or_skip(kernel, monkeypatch)
    x = torch.randn(M, k, device=DEVICE, dtype=torch.bfloat16)
    w = torch.randn(n, k, device=DEVICE, dtype=torch.bfloat16) * 0.02
    if impl == "baseline":

        def run():
            return x @ w.t()
    else:
        qw = quantize_nvfp4(w)
        b, sb, alpha = qw.packed, swizzle_scales(qw.scales), qw.global_scale

        def run():
            return nvfp4_gemm_w4a16(x, b, sb, alpha)

    benchmark.group = f"gemm M={M} N={n} K={k} nvfp4 w4a16 bfloat16{suffix}"
    benchmark.extra_info.update(impl=impl, baseline_name="matmul bfloat16")
    with torch.inference_mode():
        time_it(benchmark, run, n_rounds=rounds(50, 3), back_to_back=BACK_TO_BACK)
    if benchmark.stats:
        benchmark.extra_info["tflops"] = 2 * M * n * k / benchmark.stats.stats.median / 1e12


def _weight_bytes(layer: nn.Module) -> int:
    """Bytes of the layer's weight storage at rest (parameters and buffers, bias included)."""
    return sum(t.numel() * t.element_size() for t in (*layer.parameters(), *layer.buffers()))


# FLUX shapes (N, K) for the Hopper NVFP4 path: attention out / MLP up (K = 3,072) and MLP
# down (K = 12,288), at 4,608 tokens and at M = 16 (weight-bandwidth bound). CPU: tiny.
DEQUANT_SHAPES = (
    [
        (4608, 3072, 3072),
        (4608, 12288, 3072),
        (4608, 3072, 12288),
        (16, 3072, 3072),
        (16, 12288, 3072),
        (16, 3072, 12288),
    ]
    if ON_GPU
    else [(64, 256, 256), (16, 128, 320)]
)


# "w4a4-svdquant": SVDQuant's configuration, rank-32 low-rank branch + smoothing (on CUDA the
# fused quantize + down-projection kernel feeds it).
@pytest.mark.parametrize("mode", ["w4a16", "w4a4", "w4a4-svdquant"])
@pytest.mark.parametrize("mnk", DEQUANT_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("impl", ["baseline", "dcgen"])
def test_nvfp4_linear_dequant_path(benchmark, impl, mnk, mode):
    """NVFP4Linear through the dequantize + cuBLAS path (Hopper / Ampere: dequant_path.py) vs a
    bf16 nn.Linear; extra_info.weight_bytes is each layer's storage at rest (the 16-bit copy
    of the NVFP4 weight exists only during the call). On sm_100 with the native GEMM, W4A4
    takes that instead (test_nvfp4_gemm); this case then measures the native layer."""
    from dcgen.quant import NVFP4Linear, dequant_path, smoothing_factors

    m, n, k = mnk
    if impl == "dcgen" and ON_GPU and not dequant_path.available(torch.device(DEVICE)):
        pytest.skip("no compiled nvfp4_dequantize kernel (or a pre-sm_80 GPU)")
    torch.manual_seed(0)
    lin = nn.Linear(k, n).to(DEVICE, DTYPE)
    x = torch.randn(m, k, device=DEVICE, dtype=DTYPE)
    if impl == "baseline":
        layer = lin
    elif mode == "w4a4-svdquant":
        smooth = smoothing_factors(x.float().abs().amax(0), lin.weight)
        layer = NVFP4Linear.from_linear(lin, "w4a4", rank=32, smooth=smooth, dtype=DTYPE)
    else:
        layer = NVFP4Linear.from_linear(lin, mode, dtype=DTYPE)
    benchmark.group = f"nvfp4 linear {mode} M={m} N={n} K={k} {str(DTYPE)[6:]}"
    benchmark.extra_info.update(
        impl=impl, baseline_name=f"nn.Linear {str(DTYPE)[6:]}", weight_bytes=_weight_bytes(layer)
    )
    with torch.inference_mode():
        time_it(benchmark, lambda: layer(x), n_rounds=rounds(50, 3), back_to_back=BACK_TO_BACK)
    if benchmark.stats:
        benchmark.extra_info["tflops"] = 2 * m * n * k / benchmark.stats.stats.median / 1e12


# One FLUX MLP weight (12,288 x 3,072); the dequantize op against a copy of its bf16 version.
DQ_SHAPE = (12288, 3072) if ON_GPU else (256, 512)


@pytest.mark.parametrize("impl", ["baseline", "dcgen"])
def test_nvfp4_dequantize(benchmark, impl):
    from dcgen.ops.nvfp4_dequant import nvfp4_dequantize
    from dcgen.quant.nvfp4 import quantize_nvfp4

    if impl == "dcgen" and ON_GPU and not has_kernel("nvfp4_dequantize", DEVICE):
        pytest.skip("no compiled nvfp4_dequantize kernel for this device")
    w = torch.randn(DQ_SHAPE, device=DEVICE, dtype=DTYPE)
    out_bytes = w.numel() * torch.tensor([], dtype=torch.bfloat16).element_size()
    if impl == "baseline":
        nbytes = 2 * w.numel() * w.element_size()

        def run():
            return w.clone()
    else:
        q = quantize_nvfp4(w)
        one = torch.ones((), device=DEVICE)
        nbytes = q.packed.numel() + q.scales.numel() + out_bytes

        def run():
            return nvfp4_dequantize(q.packed, q.scales, one, dtype=torch.bfloat16)

    benchmark.group = f"dequantize nvfp4 {DQ_SHAPE} -> bf16 (GB/s vs copy)"
    benchmark.extra_info.update(impl=impl, baseline_name="copy (w.clone)", bytes_moved=nbytes)
    with torch.inference_mode():
        time_it(benchmark, run, n_rounds=rounds(100, 3), back_to_back=BACK_TO_BACK)
    if benchmark.stats:
        benchmark.extra_info["gbps"] = nbytes / benchmark.stats.stats.median / 1e9


# The SVDQuant layer's activation side at FLUX's hidden width: NVFP4 quantize of x / s plus the
# rank-32 down-projection, unfused (fp32 x / s, the quantize op, a 16-bit GEMM: x read three
# times, x / s written once) against dcgen's fused kernel (one read of x). CPU: the references.
LR_SHAPE, LR_RANK = ((4608, 3072) if ON_GPU else (64, 256)), 32


@pytest.mark.parametrize("smooth", [True, False], ids=["smooth", "plain"])
@pytest.mark.parametrize("impl", ["baseline", "dcgen"])
def test_quantize_lowrank(benchmark, impl, smooth):
    from dcgen.ops.quantize_nvfp4 import quantize_nvfp4_lowrank

    if impl == "dcgen" and ON_GPU and not has_kernel("quantize_nvfp4_lowrank", DEVICE):
        pytest.skip("no compiled quantize_nvfp4_lowrank kernel for this device")
    m, k = LR_SHAPE
    x = torch.randn(m, k, device=DEVICE, dtype=torch.bfloat16)
    down = torch.randn(LR_RANK, k, device=DEVICE, dtype=torch.bfloat16) / k**0.5
    s = torch.rand(k, device=DEVICE) + 0.5 if smooth else None
    gs = STATIC_SCALE.to(DEVICE)
    if impl == "baseline":

        def run():
            xs = x.float() / s if smooth else x
            q = quantize_nvfp4_activation(xs, gs, check_finite=False)
            a = xs.to(down.dtype)
            if ON_GPU:
                return q, torch.mm(a, down.t(), out_dtype=torch.float32)
            return q, a.float() @ down.float().t()
    else:

        def run():
            return quantize_nvfp4_lowrank(x, down, gs, s, check_finite=False)

    nbytes = x.numel() * (x.element_size() + 0.5 + 1 / 16)  # one read of x, codes + scales out
    benchmark.group = f"quantize nvfp4 + low-rank down r={LR_RANK} {LR_SHAPE} bfloat16"
    benchmark.extra_info.update(
        impl=impl, baseline_name="unfused (x / s, quantize, GEMM)", bytes_moved=nbytes
    )
    with torch.inference_mode():
        time_it(benchmark, run, n_rounds=rounds(100, 3), back_to_back=BACK_TO_BACK)
    if benchmark.stats:
        benchmark.extra_info["gbps"] = nbytes / benchmark.stats.stats.median / 1e9


# A base-model LoRA on a quantized FLUX linear (generate --quantized --lora): it cannot be fused
# into FP8 weights, so it runs unmerged (dcgen.quant.lora's layer, adapters in the model dtype).
# Against the bf16 linear with the LoRA fused (what a bf16 user pays: nothing extra), and against
# the FP8 linear without a LoRA (the adapter's own cost).
LORA_RANK = 32


@pytest.mark.parametrize("against", ["bf16-fused", "fp8-plain"])
@pytest.mark.parametrize("nk", LINEAR_SHAPES[:2], ids=lambda nk: f"{nk[0]}x{nk[1]}")
@pytest.mark.parametrize("impl", ["baseline", "dcgen"])
def test_lora_on_fp8_linear(benchmark, impl, nk, against):
    from peft import LoraConfig, inject_adapter_in_model

    from dcgen.quant.lora import register_quantized_lora

    n, k = nk
    torch.manual_seed(0)
    lin = nn.Linear(k, n).to(DEVICE, DTYPE)
    x = torch.randn(M, k, device=DEVICE, dtype=DTYPE)
    holder = nn.Module()
    holder.proj = FP8Linear.from_linear(lin, "row", DTYPE)
    if impl == "dcgen":
        config = LoraConfig(r=LORA_RANK, lora_alpha=LORA_RANK, target_modules=["proj"],
                            init_lora_weights=False)  # fmt: skip
        inject_adapter_in_model(register_quantized_lora(config), holder)
        for name, p in holder.named_parameters():  # adapters in the model dtype, as loaded
            if ".lora_" in name:
                p.data = p.data.to(DEVICE, DTYPE)
    layer = holder.proj if impl == "dcgen" or against == "fp8-plain" else lin
    baseline = "nn.Linear (LoRA fused)" if against == "bf16-fused" else "FP8Linear, no LoRA"
    benchmark.group = f"LoRA r={LORA_RANK} on fp8-row linear M={M} N={n} K={k} vs {against}"
    benchmark.extra_info.update(impl=impl, baseline_name=f"{baseline} {str(DTYPE)[6:]}")
    with torch.inference_mode():
        time_it(benchmark, lambda: layer(x), n_rounds=rounds(50, 3), back_to_back=BACK_TO_BACK)
