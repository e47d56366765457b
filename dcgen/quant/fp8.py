"""FP8 (E4M3) W8A8: weight quantization and the scaled GEMM.

Granularities (the same for weight and activation, both along K):

- ``"row"``: one fp32 decode scale per weight output row and per activation row (token).
- ``"block128"``: one per 1x128 block along K, for both (the weight's scales are [N, K/128]).

The recipe is :mod:`dcgen.ops.quantize_fp8`'s (``scale = amax * fp32(1/448)``, ``q = e4m3(x / scale)``);
weights additionally must be finite (checked once, at quantization time).

GEMM (the spec, :func:`fp8_linear_reference`):
``y = (float(xq) * xs) @ (float(wq) * ws)^T + bias`` in fp32, rounded once to the output dtype.
:func:`fp8_gemm` runs it through ``torch._scaled_mm`` where that supports the case, else the
reference (exact dequantize, fp32 matmul), which gives the same numbers up to fp32 summation
order:

- CPU: row scales through ``_scaled_mm`` (any dtype); 1x128 blocks through the reference
  (torch's CPU ``_scaled_mm`` has no blockwise scaling).
- CUDA, compute capability >= 8.9, bf16 activations: row scales through ``_scaled_mm``;
  1x128 x 1x128 blocks on sm_90 / sm_100 when K is a multiple of 128 (cuBLAS block scaling).
  fp16 / fp32 activations, older GPUs and any case ``_scaled_mm`` rejects at run time (logged
  once per case) use the reference.

Row scales take one of two routes (``DCGEN_FP8_GEMM``; :func:`row_gemm_route`):

- ``"tensor"`` (the default where dcgen's kernel is built, except as below; bf16 outputs only, as the unscaled
  product would overflow fp16): ``_scaled_mm`` with unit scales,
  which is cuBLAS's fast per-tensor FP8 GEMM, into the bf16 output, then
  :func:`dcgen.ops.fp8_scale_epilogue` applies the row and column scales and the bias (and an
  activation) in one pass. The product is rounded to 16 bits before it is scaled, one extra
  rounding (module doc of dcgen/ops/fp8_epilogue.py).
- ``"rowwise"``: ``_scaled_mm`` with the row scales themselves. With torch built for CUDA
  >= 12.9 that is cuBLAS's outer-vector scaling with the bias fused, one kernel; the default
  there on Hopper: the H200 run of 2026-11-27 timed it faster than "tensor" + epilogue at every
  FLUX linear shape (1.19-1.58x bf16 against 0.91-1.29x; docs/benchmark-log.md). Older builds ran torch's
  own row-wise kernel, slower than "tensor" on Hopper (docs/benchmark-log.md). ``_scaled_mm``
  takes its bias in the output dtype: an fp32 bias under 16-bit activations (an FP8Linear
  built with ``dtype=torch.float32`` and fed bf16) is rounded to 16 bits first, one more
  rounding than the reference (1 bf16 ulp on some outputs); ``quantize_`` keeps each bias in
  the model's dtype, where this does not arise.

Fast accumulation (``fast_accum=True``, row scales only; ``FP8Config(fast_accum=True)``): the
GEMM runs with ``_scaled_mm(use_fast_accum=True)``, so Hopper's FP8 tensor cores keep their
partial sums in their own reduced-precision accumulator instead of promoting them to fp32 every
few K steps. Faster, with a larger summation error that grows with K; off by default, measured
by the quality report. CPU kernels ignore the flag (they sum in fp32 either way).
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from dcgen.ops import has_kernel
from dcgen.ops._validate import FLOAT_DTYPES, check_tensor
from dcgen.ops.fp8_epilogue import ACTIVATIONS, fp8_scale_epilogue
from dcgen.ops.quantize_fp8 import (
    BLOCK_K,
    check_granularity,
    dequantize_fp8,
    quantize_fp8_reference,
)

from .._env import env_choice
from .nvfp4 import ensure_finite

logger = logging.getLogger(__name__)

# (device type, capability, granularity, with bias) cases where _scaled_mm failed once: not
# retried. A rejected bias case still runs _scaled_mm without the bias and adds it afterwards.
_REJECTED: set[tuple] = set()
GEMM_ROUTES = ("auto", "tensor", "rowwise")
_UNIT_SCALES: dict[tuple[str, int | None], torch.Tensor] = {}


# Errors a GEMM call can raise that say nothing about whether _scaled_mm supports the case: out
# of memory, and a device error (an earlier kernel's fault surfacing here). They propagate; only
# other RuntimeErrors (cuBLAS refusing a layout, a missing kernel) are recorded as refusals.
_NOT_REFUSALS: tuple[type[BaseException], ...] = tuple(
    t for t in (getattr(torch, "OutOfMemoryError", None), getattr(torch, "AcceleratorError", None))
    if t is not None
)  # fmt: skip


def _record_refusal(err: RuntimeError, case: tuple, what: str) -> None:
    """In an ``except RuntimeError`` around a ``_scaled_mm`` call: re-raise ``err`` unless it
    says the case is unsupported (see _NOT_REFUSALS); else record the case (never tried
    again: route decisions compare :func:`route_generation`) and log it once."""
    if isinstance(err, _NOT_REFUSALS):
        raise err
    _REJECTED.add(case)
    logger.warning("fp8_gemm: %s rejected %s (%s)", what, case, err)


def row_gemm_route(device: torch.device) -> str:
    """How row-scaled FP8 GEMMs run on ``device``: ``"tensor"`` or ``"rowwise"`` (module doc).
    ``DCGEN_FP8_GEMM`` picks one; "auto" (default) takes "rowwise" on Hopper when torch's
    cuBLAS has outer-vector scaling, else "tensor" on CUDA when the epilogue kernel is built,
    else "rowwise"."""
    choice = env_choice("DCGEN_FP8_GEMM", GEMM_ROUTES, "auto")
    if choice == "auto":
        if device.type != "cuda":
            return "rowwise"
        if _hopper_outer_vector(device):
            return "rowwise"
        return "tensor" if has_kernel("fp8_scale_epilogue", device) else "rowwise"
    return choice


def _hopper_outer_vector(device: torch.device) -> bool:
    """A Hopper GPU with torch's row-scaled ``_scaled_mm`` on cuBLAS (outer-vector scaling)."""
    return device.type == "cuda" and _capability(device.index) // 10 == 9 and _outer_vector_cublas()


@torch.compiler.assume_constant_result
def _outer_vector_cublas() -> bool:
    """Whether torch was built for CUDA >= 12.9, where its row-scaled ``_scaled_mm`` is
    cuBLAS's outer-vector FP8 GEMM (torch's own row-wise kernel before)."""
    version = torch.version.cuda
    if not version:
        return False
    major, minor = (int(p) for p in version.split(".")[:2])
    return (major, minor) >= (12, 9)


def _unit_scale(device: torch.device) -> torch.Tensor:
    """A cached fp32 1.0 on ``device`` (no fill kernel per GEMM)."""
    key = (device.type, device.index)
    if key not in _UNIT_SCALES:
        _UNIT_SCALES[key] = torch.ones((), dtype=torch.float32, device=device)
    return _UNIT_SCALES[key]


_UNIT_COLUMNS: dict[tuple[str, int | None], torch.Tensor] = {}
# Buffers a longer one replaced: kept, since a captured CUDA graph may still read them.
_RETIRED_UNIT_COLUMNS: list[torch.Tensor] = []


def unit_column(device: torch.device, n: int) -> torch.Tensor:
    """An fp32 [n, 1] of ones on ``device``: unit row or column scales for the scale epilogue
    kernels (no fill kernel per call: a view of one cached buffer, 64K long at first, replaced
    by one at least twice as long when too short, the old one kept alive: doubling keeps the
    retired buffers together smaller than the live one, where growing to each new n kept one
    per batch size seen, 33.6 MiB for 1.1 MiB live). While a CUDA graph is being
    captured a buffer too short is not replaced: the new one would live in the graph's private
    pool, so that call gets a fresh tensor of its own."""
    key = (device.type, device.index)
    buf = _UNIT_COLUMNS.get(key)
    if buf is None or buf.numel() < n:
        grown = 1 << 16 if buf is None else 2 * buf.numel()
        ones = torch.ones(max(n, grown), dtype=torch.float32, device=device)
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            return ones[:n].view(n, 1)
        if buf is not None:
            _RETIRED_UNIT_COLUMNS.append(buf)
        _UNIT_COLUMNS[key] = buf = ones
    return buf[:n].view(n, 1)


def _apply_act(y: torch.Tensor, act: str) -> torch.Tensor:
    if act != "gelu_tanh":
        return y
    if y.dtype == torch.float16:
        # A pre-activation below fp16's range rounded to -inf, and GELU(-inf) is NaN (-inf x 0)
        # where the exact answer, GELU of a large negative number, is -0: clamp the low side
        # (the high side's inf is the true overflow, as in the fused epilogue).
        y = y.clamp_min(-torch.finfo(torch.float16).max)
    return F.gelu(y, approximate="tanh")


def quantize_fp8_weight(
    weight: torch.Tensor, granularity: str = "row"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Weight [N, K] -> (float8_e4m3fn [N, K], fp32 decode scales [N, 1] or [N, K/128])."""
    check_tensor(
        "quantize_fp8_weight: weight", weight, ndim=2, dtypes=(*FLOAT_DTYPES, torch.float64)
    )
    if weight.dtype == torch.float64:
        # the recipe runs in fp32: a float64 value past its range would be an Inf there (the
        # fp32 copy also holds every NaN / Inf of the weight: one check)
        ensure_finite(
            "quantize_fp8_weight: weight (in fp32, the recipe's precision)", weight.float()
        )
    else:
        ensure_finite("quantize_fp8_weight: weight", weight)
    return quantize_fp8_reference(weight, granularity)


def fp8_linear_reference(
    xq: torch.Tensor,
    x_scale: torch.Tensor,
    wq: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """The spec: dequantize both operands exactly, fp32 matmul and bias, one rounding."""
    y = dequantize_fp8(xq, x_scale) @ dequantize_fp8(wq, w_scale).t()
    if bias is not None:
        y = y + bias.float()
    return y.to(out_dtype)


@torch.compiler.assume_constant_result  # a device property: a constant to torch.compile
def _capability(index: int | None) -> int:
    """The compute capability as one int (9.0 -> 90). An int, not the (major, minor) tuple:
    torch 2.11's Dynamo fails on comparing a tuple constant from here (measured on the H200:
    InternalTorchDynamoError when compiling a block with FP8 linears)."""
    major, minor = torch.cuda.get_device_capability(index)
    return 10 * major + minor


def _case(device: torch.device, granularity: str, bias: bool = False) -> tuple:
    cap = _capability(device.index) if device.type == "cuda" else None
    return (device.type, cap, granularity, bias)


def scaled_mm_supported(
    device: torch.device, granularity: str, dtype: torch.dtype, n: int, k: int
) -> bool:
    """Whether :func:`fp8_gemm` sends this case to ``torch._scaled_mm`` (module doc)."""
    case = _case(device, granularity)
    if case in _REJECTED:
        return False
    if device.type == "cpu":
        return granularity == "row"
    if device.type != "cuda" or dtype != torch.bfloat16 or k % 16 or n % 16:
        return False
    cap = case[1]
    if granularity == "row":
        return cap >= 89
    return cap // 10 in (9, 10) and k % BLOCK_K == 0


def _scaled_mm(
    xq: torch.Tensor,
    x_scale: torch.Tensor,
    wq: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None,
    out_dtype: torch.dtype,
    granularity: str,
    fast_accum: bool = False,
) -> torch.Tensor:
    m = xq.shape[0]
    pad = 0
    if granularity == "row":
        sa, sb = x_scale.contiguous(), w_scale.reshape(1, -1).contiguous()
    else:
        # cuBLAS reads 1x128 scales outer-dim-major: A's as [M, K/128] with M fastest, B's as
        # [K/128, N] row-major (the layout torch's own blockwise tests pass). It also wants M a
        # multiple of 4 (M = 66 got CUBLAS_STATUS_NOT_SUPPORTED on the H200 of 2026-11-27 while
        # M = 4,608 ran): zero rows with unit scales pad A, and their outputs are dropped.
        pad = -m % 4
        if pad:  # padded as bytes: zero bytes are +0.0 codes, whatever float8 kernels exist
            xq = F.pad(xq.view(torch.uint8), (0, 0, 0, pad)).view(torch.float8_e4m3fn)
            x_scale = F.pad(x_scale, (0, 0, 0, pad), value=1.0)
        sa, sb = x_scale.t().contiguous().t(), w_scale.t().contiguous()
    b = bias.to(out_dtype) if bias is not None else None
    y = torch._scaled_mm(
        xq, wq.t(), scale_a=sa, scale_b=sb, bias=b, out_dtype=out_dtype, use_fast_accum=fast_accum
    )
    return y[:m] if pad else y


def fp8_gemm(
    xq: torch.Tensor,
    x_scale: torch.Tensor,
    wq: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None,
    out_dtype: torch.dtype,
    granularity: str,
    act: str = "none",
    fast_accum: bool = False,
) -> torch.Tensor:
    """``act(xq [M, K] e4m3 with x_scale [M, S] times (wq [N, K] with w_scale [N, S])^T +
    bias)`` -> [M, N] in ``out_dtype``; ``act`` is "none" or "gelu_tanh"; ``fast_accum`` (row
    scales only) lets the GEMM accumulate without fp32 promotion (module doc: which path runs
    where)."""
    check_granularity(granularity)
    if act not in ACTIVATIONS:
        raise ValueError(f"fp8_gemm: expected act in {ACTIVATIONS}, got {act!r}")
    check_fast_accum(granularity, fast_accum)
    n, k = wq.shape
    if not scaled_mm_supported(xq.device, granularity, out_dtype, n, k):
        return _apply_act(fp8_linear_reference(xq, x_scale, wq, w_scale, bias, out_dtype), act)
    if _takes_tensor_route(xq.device, granularity, out_dtype):
        y = unit_scale_gemm(xq, wq, out_dtype, fast_accum)
        if y is not None:
            return fp8_scale_epilogue(y, x_scale, w_scale, bias, act)
    y = _fp8_gemm_scaled(xq, x_scale, wq, w_scale, bias, out_dtype, granularity, fast_accum)
    return _apply_act(y, act)


def check_fast_accum(granularity: str, fast_accum: bool) -> None:
    """Fast accumulation is offered for row scales only (the routes that run cuBLAS's
    per-tensor or outer-vector FP8 GEMMs); 1x128 blocks keep the default accumulation."""
    if not isinstance(fast_accum, bool):
        raise TypeError(f"fast_accum: expected a bool, got {type(fast_accum).__name__}")
    if fast_accum and granularity != "row":
        raise ValueError(
            f"fast_accum: expected granularity 'row' with fast_accum=True, got {granularity!r}"
        )


def _takes_tensor_route(device: torch.device, granularity: str, out_dtype: torch.dtype) -> bool:
    """Whether a GEMM that ``_scaled_mm`` supports runs with unit scales, its scales applied by
    the epilogue kernel afterwards (module doc). bf16 only: the unit-scale product is unscaled
    (codes up to 448 each, summed over K), which overflows fp16's 65,504 long before bf16's
    range."""
    return (
        granularity == "row"
        and out_dtype == torch.bfloat16
        and _case(device, "tensor") not in _REJECTED
        and row_gemm_route(device) == "tensor"
    )


def unit_scale_gemm(
    xq: torch.Tensor, wq: torch.Tensor, out_dtype: torch.dtype, fast_accum: bool = False
) -> torch.Tensor | None:
    """The "tensor" route's GEMM: ``xq @ wq^T`` through ``_scaled_mm`` with unit scales. None
    when ``_scaled_mm`` rejects the case, which is then recorded and never tried again."""
    one = _unit_scale(xq.device)
    try:
        return torch._scaled_mm(
            xq, wq.t(), scale_a=one, scale_b=one, out_dtype=out_dtype, use_fast_accum=fast_accum
        )
    except RuntimeError as err:
        _record_refusal(err, _case(xq.device, "tensor"), "unit-scale _scaled_mm")
        return None


def direct_row_route(
    device: torch.device, dtype: torch.dtype, n: int, k: int, bias: torch.Tensor | None
) -> str:
    """Which route a row-scaled FP8 linear on ``device`` with ``dtype`` activations may call
    straight (FP8Linear's inference route), "" for none. "tensor": the quantize and epilogue
    kernels are built, :func:`fp8_gemm` would take the unit-scale route, and the bias is one
    the epilogue kernel reads (fp32 or the activations' dtype). "rowwise": the quantize kernel
    is built, :func:`fp8_gemm` would take the row-scaled ``_scaled_mm``, and the bias (fused
    into that GEMM) has the output's dtype, bf16."""
    if not has_kernel("quantize_fp8", device) or not scaled_mm_supported(
        device, "row", dtype, n, k
    ):
        return ""
    if _takes_tensor_route(device, "row", dtype):
        bias_ok = bias is None or bias.dtype in (torch.float32, dtype)
        return "tensor" if bias_ok and has_kernel("fp8_scale_epilogue", device) else ""
    if dtype != torch.bfloat16 or row_gemm_route(device) != "rowwise":
        return ""
    if bias is not None and (bias.dtype != dtype or _case(device, "row", True) in _REJECTED):
        return ""
    return "rowwise"


def rowwise_gemm(
    xq: torch.Tensor,
    x_scale: torch.Tensor,
    wq_t: torch.Tensor,
    w_scale_row: torch.Tensor,
    bias: torch.Tensor | None,
    fast_accum: bool = False,
    out: torch.Tensor | None = None,
) -> torch.Tensor | None:
    """The direct "rowwise" route's GEMM: ``_scaled_mm(xq, wq_t)`` with the row scales
    (x_scale [M, 1], ``w_scale_row`` [1, N]) and the bf16 bias fused, into bf16 (into ``out``,
    a bf16 [M, N] view with unit column stride, where given: the fused blocks' joint buffers).
    The operands come as ``_scaled_mm`` takes them (``wq_t`` the [N, K] weight's transposed
    view; FP8Linear keeps both views per weight), so the call adds no per-call reshapes (x's
    scales are made contiguous, a no-op for the quantize kernels' own [M, 1]: cuBLAS's row
    scaling wants them so, and a refusal here would be recorded as the GEMM's). None
    when ``_scaled_mm`` rejects the case, which is then recorded (the general path takes over
    from then on)."""
    kwargs = {} if out is None else {"out": out}
    try:
        return torch._scaled_mm(
            xq, wq_t, scale_a=x_scale.contiguous(), scale_b=w_scale_row, bias=bias,
            out_dtype=torch.bfloat16, use_fast_accum=fast_accum, **kwargs,
        )  # fmt: skip
    except RuntimeError as err:
        _record_refusal(err, _case(xq.device, "row", bias is not None), "row-scaled _scaled_mm")
        return None


def rowwise_writes_strided_rows(device: torch.device) -> bool:
    """Whether the row-scaled ``_scaled_mm(out=)`` may be handed an ``out`` whose rows lie
    further apart than its width (a column block of a wider buffer). torch passes such an
    ``out`` to cuBLAS with its row stride as the leading dimension; the CUTLASS row-wise kernel
    that older cuBLAS builds, pre-Hopper GPUs and Blackwell take instead was not checked for
    it, so there callers hand over contiguous rows only (or copy). The CPU kernel takes any
    strides."""
    return device.type == "cpu" or _hopper_outer_vector(device)


def route_generation() -> int:
    """Changes whenever a GEMM case is rejected: cached route decisions compare it."""
    return len(_REJECTED)


def _fp8_gemm_scaled(
    xq: torch.Tensor,
    x_scale: torch.Tensor,
    wq: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None,
    out_dtype: torch.dtype,
    granularity: str,
    fast_accum: bool = False,
) -> torch.Tensor:
    """``_scaled_mm`` with the operands' own scales (falls back to the reference once a case
    is rejected)."""
    with_bias = bias is not None and _case(xq.device, granularity, True) not in _REJECTED
    try:
        y = _scaled_mm(
            xq, x_scale, wq, w_scale, bias if with_bias else None, out_dtype, granularity,
            fast_accum,
        )  # fmt: skip
    except RuntimeError as err:
        _record_refusal(err, _case(xq.device, granularity, with_bias), "_scaled_mm (falling back)")
        return fp8_gemm(xq, x_scale, wq, w_scale, bias, out_dtype, granularity, "none", fast_accum)
    if bias is not None and not with_bias:
        y = y + bias.to(out_dtype)
    return y
