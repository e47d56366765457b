"""Block-scaled NVFP4 x NVFP4 GEMM (Blackwell semantics):

    D[m, n] = alpha * sum_k (A[m, k] * SFA[m, k/16]) * (B[n, k] * SFB[n, k/16])

A [M, K] and B [N, K] (K-major, B laid out like ``nn.Linear.weight``) as packed E2M1 codes
[rows, K/2], their E4M3 block scales in the 128x4 swizzled layout (what
:func:`dcgen.ops.quantize_nvfp4.quantize_nvfp4_activation` writes, and ``swizzle_scales`` of
a weight's), ``alpha`` the product of the two fp32 global decode scales. fp32 accumulation,
bf16 output. The reference dequantizes both operands exactly (E2M1 x E4M3 products are exact
in fp32) and runs an fp32 matmul: the CUTLASS kernels (sm_100a, sm_120a) agree up to fp32 summation
order and the one bf16 rounding.
"""

from __future__ import annotations

import torch

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


@torch.compiler.assume_constant_result  # a device property: a constant to torch.compile
def _has_native_fp4(index: int | None) -> bool:
    return torch.cuda.get_device_capability(index)[0] in NATIVE_MAJORS


def kernel_available(device: torch.device, n: int, k: int) -> bool:
    """Whether :func:`nvfp4_gemm` runs the compiled kernel for B [n, k] on ``device``."""
    if device.type != "cuda" or not has_kernel("nvfp4_gemm", device):
        return False
    # Compiled for sm_100a and sm_120a; other cards (Hopper, Ampere) take the reference here
    # (NVFP4Linear runs its dequantize + cuBLAS path there instead).
    return _has_native_fp4(device.index) and k % 32 == 0 and n % 8 == 0


def nvfp4_gemm(
    a: torch.Tensor,
    a_scales: torch.Tensor,
    b: torch.Tensor,
    b_scales: torch.Tensor,
    alpha: torch.Tensor,
) -> torch.Tensor:
    """``alpha * A B^T`` of two NVFP4 operands -> bf16 [M, N] (module doc). Runs the CUTLASS
    kernel on sm_100 / sm_120 GPUs when built (K % 32 == 0, N % 8 == 0), the reference elsewhere."""
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
    for name, packed, sw in (("a_scales", a, a_scales), ("b_scales", b, b_scales)):
        rows, kb = packed.shape[0], -(-k // 16)
        want = -(-rows // 128) * 128 * (-(-kb // 4) * 4)
        if sw.numel() != want:
            raise ValueError(
                f"nvfp4_gemm: expected {name} with {want} elements (128x4 swizzled, {rows} rows, "
                f"K={k}), got {sw.numel()}"
            )
    if kernel_available(a.device, b.shape[0], k):
        return compiled_op("nvfp4_gemm")(
            a.contiguous(), a_scales.contiguous(), b.contiguous(), b_scales.contiguous(), alpha
        )
    return nvfp4_gemm_reference(a, a_scales, b, b_scales, alpha)
