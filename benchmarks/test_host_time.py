"""Host time per call of dcgen's hot inference paths: the public, validating form against the
form dcgen's own modules call.

What is timed is Python and dispatch, not arithmetic: the dcgen ops run as CPU kernels that
return preallocated outputs (and ``torch._scaled_mm`` as a function that does the same), so the
timings show what each form spends before and between its kernels. Where a model's step is
host-bound (eager mode at 1K / 2K, where DC-Gen's small token counts make the GPU work short),
these microseconds, times some hundreds of calls per step, are the step time.

- FP8Linear: the general path (``fp8_gemm`` and the ops' public wrappers) against the direct
  inference route. On a GPU, a FLUX linear's FP8 GEMM at 4,608 tokens takes about 0.1-0.4 ms
  (docs/benchmark-log.md, low precision).
- NVFP4Linear W4A4 (static and dynamic activation scale): the general path against the direct
  route (Blackwell's native GEMM; Hopper opt-in). On an RTX 5090 a FLUX linear's FP4 GEMM at
  4,608 tokens is some tens of microseconds, so there the host time is the step time.
- FLUX attention from a fused block: the module call (diffusers' FluxAttention.forward inspects
  the processor's signature on every call) against the fused blocks' direct processor call in
  inference; the processor is a stub that returns its input (57 attention calls per FLUX step).
- adaln_modulate / gated_residual: the public functions against the ``_trusted`` forms the
  fused FLUX / SANA blocks call (8 calls per FLUX double block, 2 per single block).
- whole FLUX double and single blocks: diffusers' block with its stock processor against
  ``dcgen.accelerate(blocks=True)``, GEMMs and attention stubbed on both sides.

Both rows of a group run on the CPU wherever this file runs (the GPU machine included): host
work is the same code either way, minus CUDA's own launch cost, which both forms pay.
"""

from __future__ import annotations

import pytest
import torch
from _harness import rounds
from torch import nn

import dcgen.ops.nvfp4_gemm as nvfp4_gemm_module
import dcgen.quant.dequant_path as dequant_path_module
import dcgen.quant.fp8 as fp8_module
from dcgen.ops import _extension, adaln_modulate, gated_residual
from dcgen.ops.modulation import adaln_modulate_trusted, gated_residual_trusted
from dcgen.quant import FP8Linear, NVFP4Linear

STUBBED = (
    "quantize_fp8",
    "fp8_scale_epilogue",
    "adaln_modulate",
    "gated_residual",
    "quantize_nvfp4",
    "nvfp4_gemm",
)
pytestmark = pytest.mark.skipif(
    not all(_extension.has_schema(op) for op in STUBBED),
    reason="dcgen._C is not built: no dcgen ops to stub",
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
    lib.impl("adaln_modulate", lambda x, shift, scale, rows, eps: x, "CPU")
    lib.impl("gated_residual", lambda x, gate, y_, rows: x, "CPU")
    packed = torch.zeros(M, K // 2, dtype=torch.uint8)
    swizzled = torch.zeros(128 * K // 16, dtype=torch.float8_e4m3fn)
    lib.impl("quantize_nvfp4", lambda x, gs: (packed, swizzled), "CPU")
    lib.impl("nvfp4_gemm", lambda a, sa, b, sb, alpha: y, "CPU")
    # the GEMM counts as available (as on Blackwell), the Hopper / Ampere dequantize path not
    monkeypatch.setattr(nvfp4_gemm_module, "kernel_available", lambda device, n, k: True)
    monkeypatch.setattr(dequant_path_module, "available", lambda device: False)
    monkeypatch.setattr(_extension, "_KERNELS", _extension._KERNELS | {(n, "CPU") for n in STUBBED})
    monkeypatch.setattr(fp8_module, "_REJECTED", set())
    monkeypatch.setattr(torch, "_scaled_mm", lambda *a, **k: y)
    monkeypatch.setenv("DCGEN_FP8_GEMM", "tensor")  # the route CUDA takes ("auto" there)
    monkeypatch.delenv("DCGEN_DISABLE_KERNELS", raising=False)
    try:
        yield
    finally:
        lib._destroy()


def _time_calls(benchmark, call) -> None:  # noqa: ANN001
    """CALLS calls per round in inference mode (one untimed call first: route decisions and
    memos are made there), and the median per call in microseconds."""

    def calls() -> None:
        for _ in range(CALLS):
            call()

    with torch.inference_mode():
        call()
        benchmark.pedantic(calls, rounds=rounds(20, 10), warmup_rounds=1)
    if benchmark.stats:
        benchmark.extra_info["us_per_call"] = benchmark.stats.stats.median / CALLS * 1e6


@pytest.mark.parametrize("impl", ["baseline", "dcgen"])
def test_fp8_linear_host_time(benchmark, impl, stubbed, monkeypatch):
    torch.manual_seed(0)
    layer = FP8Linear.from_linear(nn.Linear(K, N).bfloat16())
    x = torch.randn(M, K, dtype=torch.bfloat16)
    if impl == "baseline":  # the general path: fp8_gemm and the ops' public wrappers
        monkeypatch.setattr(FP8Linear, "_direct", lambda self, x: False)
    benchmark.group = "fp8 linear host time per call (stubbed kernels)"
    benchmark.extra_info.update(impl=impl, baseline_name="FP8Linear general path")
    _time_calls(benchmark, lambda: layer(x))


@pytest.mark.parametrize("scale", ["static", "dynamic"])
@pytest.mark.parametrize("impl", ["baseline", "dcgen"])
def test_nvfp4_linear_host_time(benchmark, impl, scale, stubbed, monkeypatch):
    torch.manual_seed(0)
    layer = NVFP4Linear.from_linear(nn.Linear(K, N).bfloat16(), "w4a4")
    if scale == "static":
        layer.input_scale.fill_(1e-3)
    x = torch.randn(M, K, dtype=torch.bfloat16)
    if impl == "baseline":  # the general path: native GEMM through the public wrappers
        monkeypatch.setattr(NVFP4Linear, "_direct", lambda self, x: False)
    benchmark.group = f"nvfp4 w4a4 linear ({scale} scale) host time per call (stubbed kernels)"
    benchmark.extra_info.update(impl=impl, baseline_name="NVFP4Linear general path")
    _time_calls(benchmark, lambda: layer(x))


@pytest.mark.parametrize("impl", ["baseline", "dcgen"])
def test_flux_attention_call_host_time(benchmark, impl):
    from diffusers.models.transformers.transformer_flux import FluxAttention

    from dcgen.attention import fused_blocks
    from dcgen.attention.processors import FluxFusedAttnProcessor

    class StubProcessor(FluxFusedAttnProcessor):  # the real processor's signature, no work
        def __call__(  # noqa: ANN204
            self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,  # noqa: ANN001
            image_rotary_emb=None,  # noqa: ANN001
        ):  # fmt: skip
            return hidden_states

    attn = FluxAttention(query_dim=64, heads=2, dim_head=32, processor=StubProcessor())
    h = torch.zeros(1, 4, 64)
    benchmark.group = "flux attention call host time (stub processor)"
    benchmark.extra_info.update(impl=impl, baseline_name="FluxAttention module call")
    if impl == "baseline":
        _time_calls(benchmark, lambda: attn(hidden_states=h, image_rotary_emb=None))
    else:
        _time_calls(benchmark, lambda: fused_blocks._attention(attn, h, None, None, None))


# FLUX's double block at DC-Gen 1K: 1,024 image tokens; here 4 rows of 64 (the stubs make the
# size irrelevant), bf16, (1, D) modulation chunks of a (1, 6D) output as the blocks pass them.
MOD_FORMS = {
    "adaln_modulate": (adaln_modulate, adaln_modulate_trusted),
    "gated_residual": (gated_residual, gated_residual_trusted),
}


@pytest.mark.parametrize("op", sorted(MOD_FORMS))
@pytest.mark.parametrize("impl", ["baseline", "dcgen"])
def test_modulation_host_time(benchmark, impl, op, stubbed):
    x = torch.randn(1, 4, 64, dtype=torch.bfloat16)
    chunk = torch.randn(1, 6 * 64, dtype=torch.bfloat16).chunk(6, dim=1)[1]
    fn = MOD_FORMS[op][impl == "dcgen"]
    args = (x, chunk, chunk, 1e-6) if op == "adaln_modulate" else (x, chunk, x)
    benchmark.group = f"{op} host time per call (stubbed kernel)"
    benchmark.extra_info.update(impl=impl, baseline_name=f"dcgen.ops.{op} (validating)")
    _time_calls(benchmark, lambda: fn(*args))


# A whole FLUX block at tiny widths (64 wide, 2 heads, 16 image + 4 text tokens, bf16). The
# GEMMs and attention are stubs on both sides (they return empty outputs of the right shape and
# layout: a bf16 GEMM on this CPU costs tens of microseconds of arithmetic, more than the whole
# Python path around it, and on the GPU these are timed as kernels); dcgen's modulation ops are
# stubbed as above; the stock block's own elementwise ops run for real on tiny tensors (a few
# microseconds each, about a CUDA launch). What remains is each block's host work per call,
# which an eager FLUX step pays 57 times and which sets the step time where the GPU's work is
# shorter (DC-Gen at 1K and 2K).
def _stub_gemms_and_attention(monkeypatch) -> None:  # noqa: ANN001
    """Attention (dcgen's processor and diffusers' dispatch) and the bf16 GEMMs (F.linear,
    addmm, addmm + activation) as stubs returning outputs of the right shapes."""
    import diffusers.models.transformers.transformer_flux as tf

    import dcgen.attention.processors as processors

    def attention_stub(q, k, v, **_):  # noqa: ANN001, ANN003, ANN202
        b, h, s, d = q.shape
        return q.new_zeros(b, s, h, d).transpose(1, 2)

    def stock_attention_stub(query, key, value, *_, **__):  # noqa: ANN001, ANN002, ANN003, ANN202
        return torch.zeros_like(query)  # (B, S, H, D), as diffusers' dispatch returns it

    def linear_stub(x, weight, bias=None):  # noqa: ANN001, ANN202
        return x.new_empty(*x.shape[:-1], weight.shape[0])

    def addmm_stub(bias, x, weight_t, *_, out=None, **__):  # noqa: ANN001, ANN002, ANN003, ANN202
        return out if out is not None else x.new_empty(x.shape[0], weight_t.shape[1])

    monkeypatch.setattr(processors, "fused_attention", attention_stub)
    monkeypatch.setattr(tf, "dispatch_attention_fn", stock_attention_stub)
    monkeypatch.setattr(torch.nn.functional, "linear", linear_stub)
    monkeypatch.setattr(torch, "addmm", addmm_stub)
    monkeypatch.setattr(torch, "_addmm_activation", addmm_stub)


def _flux_block(kind: str) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """A small bf16 FLUX double or single block (random weights) and its inputs."""
    import diffusers.models.transformers.transformer_flux as tf

    torch.manual_seed(0)
    cls = tf.FluxTransformerBlock if kind == "double" else tf.FluxSingleTransformerBlock
    block = cls(64, 2, 32).eval().bfloat16()
    g = torch.Generator().manual_seed(0)
    inputs = dict(
        hidden_states=torch.randn(1, 16, 64, generator=g).bfloat16(),
        encoder_hidden_states=torch.randn(1, 4, 64, generator=g).bfloat16(),
        temb=torch.randn(1, 64, generator=g).bfloat16(),
    )
    return block, inputs


@pytest.mark.parametrize("kind", ["double", "single"])
@pytest.mark.parametrize("impl", ["baseline", "dcgen"])
def test_flux_block_host_time(benchmark, impl, kind, stubbed, monkeypatch):
    from dcgen.attention import accelerate

    _stub_gemms_and_attention(monkeypatch)
    block, inputs = _flux_block(kind)
    if impl == "dcgen":
        block = accelerate(block, blocks=True)
    benchmark.group = f"flux {kind} block host time per call (stubbed attention and kernels)"
    benchmark.extra_info.update(impl=impl, baseline_name="diffusers block, stock processor")
    _time_calls(benchmark, lambda: block(**inputs))


@pytest.fixture
def fp8_stubbed(monkeypatch):
    """Shape-true stubs of every kernel a quantized FLUX block calls (an FP8 block's linears
    have several shapes, unlike the single-shape stubs above) and of torch._scaled_mm; the
    "rowwise" GEMM route, Hopper's default with torch built for CUDA >= 12.9."""
    fp8 = torch.float8_e4m3fn

    def quantize(x, block):  # noqa: ANN001, ANN202
        return torch.empty(x.shape, dtype=fp8), torch.ones(x.shape[0], 1)

    def epilogue_fp8(y, rs, cs, bias, act):  # noqa: ANN001, ANN202
        return y, torch.empty(y.shape, dtype=fp8), torch.ones(y.shape[0], 1)

    def modulate_fp8(x, shift, scale, rows, eps):  # noqa: ANN001, ANN202
        return x, torch.empty(x.shape, dtype=fp8), torch.ones(x.shape[0], 1)

    def scaled_mm(a, b, scale_a=None, scale_b=None, bias=None, out_dtype=None, **_):  # noqa: ANN001, ANN003, ANN202
        return torch.empty(a.shape[0], b.shape[1], dtype=out_dtype or torch.bfloat16)

    ops = {
        "quantize_fp8": quantize,
        "fp8_scale_epilogue": lambda y, rs, cs, bias, act: y,
        "fp8_scale_epilogue_fp8": epilogue_fp8,
        "fp8_scale_epilogue_into": lambda y, rs, cs, bias, act, out: None,
        "adaln_modulate": lambda x, shift, scale, rows, eps: x,
        "adaln_modulate_fp8": modulate_fp8,
        "gated_residual": lambda x, gate, y, rows: x,
    }
    if not all(_extension.has_schema(op) for op in ops):
        pytest.skip("dcgen._C is not built: no dcgen ops to stub")
    lib = torch.library.Library("dcgen", "IMPL")
    for name, fn in ops.items():
        lib.impl(name, fn, "CPU")
    monkeypatch.setattr(_extension, "_KERNELS", _extension._KERNELS | {(n, "CPU") for n in ops})
    monkeypatch.setattr(fp8_module, "_REJECTED", set())
    monkeypatch.setattr(torch, "_scaled_mm", scaled_mm)
    monkeypatch.setenv("DCGEN_FP8_GEMM", "rowwise")
    monkeypatch.delenv("DCGEN_DISABLE_KERNELS", raising=False)
    try:
        yield
    finally:
        lib._destroy()


# An FP8 FLUX block's host work against the same block in bf16, both through
# dcgen.accelerate(blocks=True), GEMMs (bf16 linear / addmm, FP8 _scaled_mm), attention and
# dcgen's kernels stubbed. On the H200 (2026-11-27) the FP8 double block ran 2.23 ms eager
# against 1.83 ms CUDA-graphed while the bf16 block ran 2.24 / 2.22: the FP8 block's eager time
# is its host time. On this project's CPU the FP8 / bf16 host-time ratio was 2.27x (double)
# and 2.79x (single) at 171a1be, 1.62x and 1.76x after session 20 (docs/benchmark-log.md).
@pytest.mark.parametrize("kind", ["double", "single"])
@pytest.mark.parametrize("impl", ["baseline", "dcgen"])
def test_flux_fp8_block_host_time(benchmark, impl, kind, fp8_stubbed, monkeypatch):
    from dcgen.attention import accelerate
    from dcgen.quant import FP8Config, quantize_

    _stub_gemms_and_attention(monkeypatch)
    block, inputs = _flux_block(kind)
    block = accelerate(block, blocks=True)
    if impl == "dcgen":
        quantize_(block, FP8Config(exclude=()))
        assert any(type(m) is FP8Linear for m in block.modules())
    benchmark.group = f"flux {kind} block FP8 host time per call (stubbed attention and kernels)"
    benchmark.extra_info.update(
        impl=impl, baseline_name="bf16 block, dcgen.accelerate(blocks=True)"
    )
    _time_calls(benchmark, lambda: block(**inputs))
