"""Block-scaled NVFP4 x NVFP4 GEMM (Blackwell semantics):

    D[m, n] = alpha * sum_k (A[m, k] * SFA[m, k/16]) * (B[n, k] * SFB[n, k/16])

A [M, K] and B [N, K] (K-major, B laid out like ``nn.Linear.weight``) as packed E2M1 codes
[rows, K/2], their E4M3 block scales in the 128x4 swizzled layout (what
:func:`dcgen.ops.quantize_nvfp4.quantize_nvfp4_activation` writes, and ``swizzle_scales`` of
a weight's), ``alpha`` the product of the two fp32 global decode scales. fp32 accumulation,
bf16 output. The reference dequantizes both operands exactly (E2M1 x E4M3 products are exact
in fp32) and runs an fp32 matmul: the CUTLASS kernels (sm_100a, sm_120a) agree up to fp32 summation
order and the one bf16 rounding.

Hopper (sm_90a) has no FP4 tensor cores. Its kernels dequantize the E2M1 tiles to bf16 in the
mainloop, which is exact (every E2M1 x E4M3 product is a bf16 value), and multiply with bf16
wgmma: the same products and fp32 sums, so the same agreement. :func:`nvfp4_gemm_w4a16` is the
W4A16 form (a bf16 activation, an NVFP4 weight). Two kernels, chosen per call by
``DCGEN_NVFP4_SM90_KERNEL``:

- ``rs`` (default; csrc/nvfp4/nvfp4_gemm_rs_sm90.cuh): the weight is wgmma's register operand,
  converted by each thread for its own fragment, the activation arrives by TMA from a producer
  warp, 128 x 256 tiles. W4A4 first expands its activation to bf16 (exact, one extra pass).
  Written without a GPU (2026-11-28): compiled and its fragment mapping checked on the host,
  not yet run;
- ``mainloop`` (csrc/nvfp4/nvfp4_gemm_sm90.cuh): the first kernel, both operands converted into
  shared memory by the threads that issue the wgmmas. Passes its tests on an H200 at 0.29-0.35x of cuBLAS bf16
  (2026-11-27, benchmarks/test_quant.py, FLUX shapes).

The first measured kernel is slower than NVFP4Linear's dequantize + cuBLAS path and the new one
is unmeasured, so both stay opt-in: ``DCGEN_NVFP4_SM90=1`` (their tests run them regardless).
"""

from __future__ import annotations

import functools

import torch

from .._env import env_flag
from . import _quant_fake  # noqa: F401  (fake impls of the quantize / GEMM ops)
from ._extension import compiled_op, has_kernel
from ._validate import check_same_device, check_tensor


def _fmt():  # noqa: ANN202
    from dcgen.quant import nvfp4  # lazy: dcgen.quant imports dcgen.ops at load time

    return nvfp4


def _dequant(packed: torch.Tensor, swizzled: torch.Tensor, k: int) -> torch.Tensor:
    fmt = _fmt()
    scales = fmt.unswizzle_scales(swizzled, packed.shape[0], k)
    one = torch.ones((), device=packed.device)
    return fmt.dequantize_parts(packed, scales, one)


def nvfp4_gemm_reference(
    a: torch.Tensor,
    a_scales: torch.Tensor,
    b: torch.Tensor,
    b_scales: torch.Tensor,
    alpha: torch.Tensor,
) -> torch.Tensor:
    """Pure-PyTorch spec (module doc): [M, N] bf16."""
    k = a.shape[1] * 2
    y = _dequant(a, a_scales, k) @ _dequant(b, b_scales, k).t()
    return (y * alpha.float().reshape(())).to(torch.bfloat16)


# Capability majors with a compiled kernel: 10 = sm_100a (B200/GB200, UMMA), 12 = sm_120a
# (GeForce RTX 50xx, warp-level block-scaled MMA); one CUTLASS file each, one op.
NATIVE_MAJORS = (10, 12)
# 9 = sm_90a (H100/H200): mainloop dequantization + bf16 wgmma, opt-in (module doc).
HOPPER_MAJOR = 9
HOPPER_ENV = "DCGEN_NVFP4_SM90"


def hopper_enabled() -> bool:
    """Whether the sm_90a NVFP4 GEMMs are switched on (``DCGEN_NVFP4_SM90=1``)."""
    return env_flag(HOPPER_ENV, False)


@torch.compiler.assume_constant_result  # a device property: a constant to torch.compile
def _kernel_major(index: int | None) -> int | None:
    """The capability major of a card the arch-specific GEMMs (sm_90a, sm_100a, sm_120a) can
    run on, or None: such code loads on exactly its capability (X.0), so a 10.3 (B300) or 12.1
    card takes the reference (NVFP4Linear: its dequantize + cuBLAS path) instead."""
    major, minor = torch.cuda.get_device_capability(index)
    return major if minor == 0 else None


def kernel_available(device: torch.device, n: int, k: int) -> bool:
    """Whether :func:`nvfp4_gemm` runs the compiled kernel for B [n, k] on ``device``."""
    if device.type != "cuda" or not has_kernel("nvfp4_gemm", device) or k <= 0 or k % 32:
        return False
    major = _kernel_major(device.index)
    if major == HOPPER_MAJOR:
        return hopper_enabled()
    # Blackwell: 16-byte TMA rows of the bf16 output. Other cards (Ampere) take the reference
    # here (NVFP4Linear runs its dequantize + cuBLAS path there instead).
    return major in NATIVE_MAJORS and n % 8 == 0 and _built_for(f"sm_{major}0a")


@torch.compiler.assume_constant_result  # a build property: a constant to torch.compile
@functools.cache
def _built_for(arch: str) -> bool:
    """Whether the extension holds code for ``arch`` (a DCGEN_BLACKWELL=0 build has no sm_100a /
    sm_120a GEMM; the op would refuse, so callers take the reference instead)."""
    import dcgen

    return arch in dcgen.build_info().get("cuda_archs", [])


def w4a16_kernel_available(device: torch.device, k: int) -> bool:
    """Whether :func:`nvfp4_gemm_w4a16` runs the compiled sm_90a kernel for K = ``k``."""
    if device.type != "cuda" or not has_kernel("nvfp4_gemm_w4a16", device) or k <= 0 or k % 32:
        return False
    return _kernel_major(device.index) == HOPPER_MAJOR and hopper_enabled()


def _check_scales(op: str, name: str, rows: int, k: int, sw: torch.Tensor) -> None:
    kb = -(-k // 16)
    want = -(-rows // 128) * 128 * (-(-kb // 4) * 4)
    if sw.numel() != want:
        raise ValueError(
            f"{op}: expected {name} with {want} elements (128x4 swizzled, {rows} rows, "
            f"K={k}), got {sw.numel()}"
        )


# The kernels index rows x columns with 32-bit ints (the sm_90a epilogue's output offset is
# m * N + n): larger products run as several calls over row chunks (:func:`_row_chunks`).
INDEX_LIMIT = 2**31


def _row_chunks(m: int, n: int, k: int) -> list[tuple[int, int]]:
    """[start, end) row ranges, each a multiple of 128 rows long (an A operand's swizzled scales
    are 128-row tiles, so a chunk's scales are one contiguous slice), such that a chunk's
    rows x max(N, K) stays below :data:`INDEX_LIMIT`; one range when the whole fits."""
    if m * max(n, k) < INDEX_LIMIT:
        return [(0, m)]
    step = max(128, (INDEX_LIMIT - 1) // max(n, k) // 128 * 128)
    return [(r, min(r + step, m)) for r in range(0, m, step)]


def _aligned(t: torch.Tensor) -> torch.Tensor:
    """``t`` contiguous at a 16-byte aligned address, as the kernels load it (a contiguous view
    at an odd offset is copied: contiguous() would return it as it is)."""
    if torch.compiler.is_compiling():
        # a traced tensor has no address (data_ptr() breaks the graph); the op itself refuses
        # an unaligned operand or scale with a clear error
        return t.contiguous()
    if t.is_contiguous() and t.data_ptr() % 16 == 0:
        return t
    return t.clone(memory_format=torch.contiguous_format)


def _scale_rows(scales: torch.Tensor, r0: int, r1: int, k: int) -> torch.Tensor:
    """The swizzled scales of rows [r0, r1) (r0 a multiple of 128) of an operand with K = k."""
    k_blocks = -(-k // 16)
    tile = -(-k_blocks // 4) * 512  # bytes of one 128-row tile: ceil(K/16 / 4) * 4 * 128
    return scales[r0 // 128 * tile : -(-r1 // 128) * tile]


def nvfp4_gemm(
    a: torch.Tensor,
    a_scales: torch.Tensor,
    b: torch.Tensor,
    b_scales: torch.Tensor,
    alpha: torch.Tensor,
) -> torch.Tensor:
    """``alpha * A B^T`` of two NVFP4 operands -> bf16 [M, N] (module doc). Runs the CUTLASS
    kernel on sm_100 / sm_120 GPUs when built (K % 32 == 0, N % 8 == 0), the sm_90a kernel on
    Hopper when switched on (K % 32 == 0), the reference elsewhere."""
    for name, t in (("a", a), ("b", b)):
        check_tensor(f"nvfp4_gemm: {name}", t, ndim=2, dtypes=(torch.uint8,))
    for name, t in (("a_scales", a_scales), ("b_scales", b_scales)):
        check_tensor(f"nvfp4_gemm: {name}", t, ndim=1, dtypes=(torch.float8_e4m3fn,))
    check_tensor("nvfp4_gemm: alpha", alpha, dtypes=(torch.float32,))
    check_same_device(a=a, a_scales=a_scales, b=b, b_scales=b_scales, alpha=alpha)
    if a.shape[1] != b.shape[1]:
        raise ValueError(
            f"nvfp4_gemm: expected a and b with the same K/2, got {tuple(a.shape)} and "
            f"{tuple(b.shape)}"
        )
    if alpha.numel() != 1:
        raise ValueError(f"nvfp4_gemm: expected one alpha, got shape {tuple(alpha.shape)}")
    k = a.shape[1] * 2
    if k % 16:  # packed operands hold whole 16-element scale blocks (quantize_nvfp4 pads K)
        raise ValueError(
            f"nvfp4_gemm: expected packed a and b with K/2 a multiple of 8 (K padded to the "
            f"16-element block), got {tuple(a.shape)} and {tuple(b.shape)}"
        )
    for name, packed, sw in (("a_scales", a, a_scales), ("b_scales", b, b_scales)):
        _check_scales("nvfp4_gemm", name, packed.shape[0], k, sw)
    if kernel_available(a.device, b.shape[0], k):
        kernel = compiled_op("nvfp4_gemm")
        a, a_scales, b, b_scales = (_aligned(t) for t in (a, a_scales, b, b_scales))
        chunks = _row_chunks(a.shape[0], b.shape[0], k)
        if len(chunks) == 1:
            return kernel(a, a_scales, b, b_scales, alpha)
        out = torch.empty(a.shape[0], b.shape[0], device=a.device, dtype=torch.bfloat16)
        for r0, r1 in chunks:
            out[r0:r1] = kernel(a[r0:r1], _scale_rows(a_scales, r0, r1, k), b, b_scales, alpha)
        return out
    return nvfp4_gemm_reference(a, a_scales, b, b_scales, alpha)


def nvfp4_gemm_w4a16_reference(
    a: torch.Tensor, b: torch.Tensor, b_scales: torch.Tensor, alpha: torch.Tensor
) -> torch.Tensor:
    """Pure-PyTorch spec of :func:`nvfp4_gemm_w4a16`: [M, N] bf16."""
    y = a.float() @ _dequant(b, b_scales, a.shape[1]).t()
    return (y * alpha.float().reshape(())).to(torch.bfloat16)


def nvfp4_gemm_w4a16(
    a: torch.Tensor, b: torch.Tensor, b_scales: torch.Tensor, alpha: torch.Tensor
) -> torch.Tensor:
    """W4A16: ``alpha * A B^T`` with A bf16 [M, K] and B an NVFP4 weight (packed E2M1 [N, K/2],
    128x4 swizzled E4M3 scales) -> bf16 [M, N], fp32 accumulation. Runs the sm_90a kernel on
    Hopper when built and switched on (K % 32 == 0; the weight is dequantized in the mainloop
    and never exists in 16 bits in memory), the reference elsewhere."""
    check_tensor("nvfp4_gemm_w4a16: a", a, ndim=2, dtypes=(torch.bfloat16,))
    check_tensor("nvfp4_gemm_w4a16: b", b, ndim=2, dtypes=(torch.uint8,))
    check_tensor("nvfp4_gemm_w4a16: b_scales", b_scales, ndim=1, dtypes=(torch.float8_e4m3fn,))
    check_tensor("nvfp4_gemm_w4a16: alpha", alpha, dtypes=(torch.float32,))
    check_same_device(a=a, b=b, b_scales=b_scales, alpha=alpha)
    k = a.shape[1]
    if b.shape[1] * 2 != k:
        raise ValueError(
            f"nvfp4_gemm_w4a16: expected b with K/2 = {k / 2:g} columns for a of shape "
            f"{tuple(a.shape)}, got {tuple(b.shape)}"
        )
    if alpha.numel() != 1:
        raise ValueError(f"nvfp4_gemm_w4a16: expected one alpha, got shape {tuple(alpha.shape)}")
    if k % 16:
        raise ValueError(
            f"nvfp4_gemm_w4a16: expected K a multiple of 16 (whole scale blocks), got a of "
            f"shape {tuple(a.shape)}"
        )
    _check_scales("nvfp4_gemm_w4a16", "b_scales", b.shape[0], k, b_scales)
    if w4a16_kernel_available(a.device, k):
        kernel = compiled_op("nvfp4_gemm_w4a16")
        a, b, b_scales = (_aligned(t) for t in (a, b, b_scales))
        chunks = _row_chunks(a.shape[0], b.shape[0], k)
        if len(chunks) == 1:
            return kernel(a, b, b_scales, alpha)
        out = torch.empty(a.shape[0], b.shape[0], device=a.device, dtype=torch.bfloat16)
        for r0, r1 in chunks:
            out[r0:r1] = kernel(a[r0:r1], b, b_scales, alpha)
        return out
    return nvfp4_gemm_w4a16_reference(a, b, b_scales, alpha)
