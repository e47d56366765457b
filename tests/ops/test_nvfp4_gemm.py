"""nvfp4_gemm: the reference against dequantize-then-matmul of the format, input errors, and the
CUTLASS sm_100a / sm_120a kernels against the reference where such a GPU exists."""

from __future__ import annotations

import pytest
import torch

from dcgen.ops import has_kernel
from dcgen.ops.nvfp4_gemm import nvfp4_gemm, nvfp4_gemm_reference
from dcgen.ops.quantize_nvfp4 import quantize_nvfp4_activation
from dcgen.quant.nvfp4 import dequantize_nvfp4, quantize_nvfp4, swizzle_scales
from tests.conftest import poison_cuda_allocator


def _native_gpu() -> bool:
    from dcgen.ops.nvfp4_gemm import NATIVE_MAJORS

    return torch.cuda.get_device_capability()[0] in NATIVE_MAJORS


def _operands(m: int, n: int, k: int, gen: torch.Generator, device: str = "cpu"):
    x = torch.randn(m, k, generator=gen).to(device)
    w = torch.randn(n, k, generator=gen).to(device) * 0.05
    a, sa, ga = quantize_nvfp4_activation(x)
    qw = quantize_nvfp4(w)
    b, sb = qw.packed, swizzle_scales(qw.scales)
    return x, w, (a, sa, b, sb, ga * qw.global_scale), qw


def test_reference_is_dequantize_then_matmul(rng):
    x, w, (a, sa, b, sb, alpha), qw = _operands(37, 24, 96, rng)
    y = nvfp4_gemm(a, sa, b, sb, alpha)
    assert y.shape == (37, 24) and y.dtype == torch.bfloat16
    want = dequantize_nvfp4(quantize_nvfp4(x)) @ dequantize_nvfp4(qw).t()
    torch.testing.assert_close(y.float(), want, atol=1e-2, rtol=1e-2)
    # W4A4 vs the fp32 product: measured ~0.13 relative for Gaussian data
    assert float((y.float() - x @ w.t()).norm() / (x @ w.t()).norm()) < 0.2


def test_bad_inputs(rng):
    _, _, (a, sa, b, sb, alpha), _ = _operands(4, 8, 32, rng)
    with pytest.raises(ValueError, match="same K/2"):
        nvfp4_gemm(a, sa, b[:, :8], sb, alpha)
    with pytest.raises(ValueError, match="128x4 swizzled"):
        nvfp4_gemm(a, sa[:-1], b, sb, alpha)
    with pytest.raises(TypeError, match="uint8"):
        nvfp4_gemm(a.float(), sa, b, sb, alpha)
    with pytest.raises(ValueError, match="one alpha"):
        nvfp4_gemm(a, sa, b, sb, torch.ones(2))


@pytest.mark.cuda
@pytest.mark.parametrize("mnk", [(128, 128, 256), (4608, 3072, 3072), (1, 64, 64), (300, 200, 96)])
def test_cuda_kernel_matches_reference(mnk, rng):
    if not has_kernel("nvfp4_gemm", "cuda") or not _native_gpu():
        pytest.skip("needs the compiled nvfp4_gemm and an sm_100 / sm_120 GPU")
    m, n, k = mnk
    _, _, (a, sa, b, sb, alpha), _ = _operands(m, n, k, rng, "cuda")
    poison_cuda_allocator()
    y = nvfp4_gemm(a, sa, b, sb, alpha)
    ref = nvfp4_gemm_reference(a, sa, b, sb, alpha)
    assert not y.isnan().any()
    # identical products, fp32 sums in another order, one bf16 rounding each
    torch.testing.assert_close(y.float(), ref.float(), atol=1e-2, rtol=1.6e-2)


@pytest.mark.cuda
def test_cuda_nvfp4_linear_native_path_matches_reference(rng, monkeypatch):
    if not has_kernel("nvfp4_gemm", "cuda") or not _native_gpu():
        pytest.skip("needs the compiled nvfp4_gemm and an sm_100 / sm_120 GPU")
    from torch import nn

    from dcgen.quant import NVFP4Linear

    torch.manual_seed(0)
    q = NVFP4Linear.from_linear(nn.Linear(256, 128).cuda(), "w4a4", rank=4)
    x = torch.randn(3, 50, 256, generator=rng).cuda().bfloat16()
    with torch.no_grad():
        native = q(x)
        monkeypatch.setenv("DCGEN_DISABLE_KERNELS", "1")
        ref = q(x)
    torch.testing.assert_close(native.float(), ref.float(), atol=2e-2, rtol=2e-2)
