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
    # K = 40 packed raw (20 bytes a row), not padded to whole 16-element blocks by the quantizer
    raw = torch.zeros(4, 20, dtype=torch.uint8)
    scales = torch.zeros(128 * 4, dtype=torch.float8_e4m3fn)
    with pytest.raises(ValueError, match=r"nvfp4_gemm: expected packed a and b with K/2 a multi"):
        nvfp4_gemm(raw, scales, raw, scales, alpha)


@pytest.mark.cuda
@pytest.mark.parametrize("mnk", [(128, 128, 256), (4608, 3072, 3072), (1, 64, 64), (300, 200, 96)])
def test_cuda_kernel_matches_reference(mnk, rng):
    if not has_kernel("nvfp4_gemm", "cuda") or not _native_gpu():
        pytest.skip("needs the compiled nvfp4_gemm and an sm_100 / sm_120 GPU")
    _assert_w4a4_kernel_matches_reference(*mnk, rng)


def _assert_w4a4_kernel_matches_reference(m: int, n: int, k: int, rng) -> None:
    _, _, (a, sa, b, sb, alpha), _ = _operands(m, n, k, rng, "cuda")
    poison_cuda_allocator()
    y = nvfp4_gemm(a, sa, b, sb, alpha)
    ref = nvfp4_gemm_reference(a, sa, b, sb, alpha)
    assert not y.isnan().any()
    # identical (exact bf16) products, fp32 sums in another order, one bf16 rounding each
    torch.testing.assert_close(y.float(), ref.float(), atol=1e-2, rtol=1.6e-2)


def _assert_linear_kernel_matches_reference(
    mode: str, n: int, rng, monkeypatch, rank: int = 4
) -> None:
    """An NVFP4Linear (low-rank branch of ``rank``; 0: none) on its kernel path vs
    DCGEN_DISABLE_KERNELS=1."""
    from torch import nn

    from dcgen.quant import NVFP4Linear

    torch.manual_seed(0)
    q = NVFP4Linear.from_linear(nn.Linear(256, n).cuda(), mode, rank=rank)
    x = torch.randn(3, 50, 256, generator=rng).cuda().bfloat16()
    with torch.no_grad():
        native = q(x)
        monkeypatch.setenv("DCGEN_DISABLE_KERNELS", "1")
        ref = q(x)
    torch.testing.assert_close(native.float(), ref.float(), atol=2e-2, rtol=2e-2)


@pytest.mark.cuda
def test_cuda_nvfp4_linear_native_path_matches_reference(rng, monkeypatch):
    if not has_kernel("nvfp4_gemm", "cuda") or not _native_gpu():
        pytest.skip("needs the compiled nvfp4_gemm and an sm_100 / sm_120 GPU")
    _assert_linear_kernel_matches_reference("w4a4", 128, rng, monkeypatch)


# ---- W4A16 and the Hopper (sm_90a) kernels


def test_w4a16_reference_is_activation_times_dequantized_weight(rng):
    from dcgen.ops.nvfp4_gemm import nvfp4_gemm_w4a16

    x = torch.randn(19, 96, generator=rng).bfloat16()
    w = torch.randn(40, 96, generator=rng) * 0.05
    qw = quantize_nvfp4(w)
    y = nvfp4_gemm_w4a16(x, qw.packed, swizzle_scales(qw.scales), qw.global_scale)
    assert y.shape == (19, 40) and y.dtype == torch.bfloat16
    want = x.float() @ dequantize_nvfp4(qw).t()
    torch.testing.assert_close(y.float(), want, atol=1e-2, rtol=1e-2)


def test_w4a16_bad_inputs(rng):
    from dcgen.ops.nvfp4_gemm import nvfp4_gemm_w4a16

    x = torch.randn(4, 64, generator=rng).bfloat16()
    qw = quantize_nvfp4(torch.randn(8, 64, generator=rng))
    b, sb, g = qw.packed, swizzle_scales(qw.scales), qw.global_scale
    with pytest.raises(TypeError, match="bfloat16"):
        nvfp4_gemm_w4a16(x.float(), b, sb, g)
    with pytest.raises(ValueError, match="K/2 = 32"):
        nvfp4_gemm_w4a16(x, b[:, :16], sb, g)
    with pytest.raises(ValueError, match="128x4 swizzled"):
        nvfp4_gemm_w4a16(x, b, sb[:-1], g)
    with pytest.raises(ValueError, match="one alpha"):
        nvfp4_gemm_w4a16(x, b, sb, torch.ones(2))
    with pytest.raises(ValueError, match=r"nvfp4_gemm_w4a16: expected K a multiple of 16"):
        nvfp4_gemm_w4a16(x[:, :40], b[:, :20], sb, g)


def test_hopper_kernels_are_opt_in(monkeypatch):
    """On an sm_90 device with the kernels built, the mainloop-dequant GEMMs run only with
    DCGEN_NVFP4_SM90=1 (they have not been validated on a GPU yet), and only for K % 32 == 0."""
    import dcgen.ops.nvfp4_gemm as g

    monkeypatch.setattr(g, "has_kernel", lambda name, device: True)
    capability = [(9, 0)]
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: capability[0])
    cuda = torch.device("cuda", 0)
    monkeypatch.delenv(g.HOPPER_ENV, raising=False)
    assert not g.kernel_available(cuda, 24, 64) and not g.w4a16_kernel_available(cuda, 64)
    monkeypatch.setenv(g.HOPPER_ENV, "1")
    assert g.kernel_available(cuda, 24, 64) and g.w4a16_kernel_available(cuda, 64)
    assert not g.kernel_available(cuda, 24, 48) and not g.w4a16_kernel_available(cuda, 48)
    assert not g.kernel_available(torch.device("cpu"), 24, 64)
    # K = 0 (nothing to sum: zeros) is the reference's; the kernels prefetch a first tile
    assert not g.kernel_available(cuda, 24, 0) and not g.w4a16_kernel_available(cuda, 0)
    # Blackwell needs no switch but N % 8 == 0, and a build that holds its arch
    built = {"sm_100a"}
    monkeypatch.setattr(g, "_built_for", lambda arch: arch in built)
    capability[0] = (10, 0)
    monkeypatch.delenv(g.HOPPER_ENV)
    assert g.kernel_available(cuda, 24, 64) and not g.kernel_available(cuda, 20, 64)
    assert not g.w4a16_kernel_available(cuda, 64)
    # arch-specific code loads on exactly its capability: sm_100a has no image for a 10.3
    # (B300) card, sm_120a none for 12.1, so those take the reference
    built.add("sm_120a")
    for other in ((10, 3), (12, 1)):
        capability[0] = other
        assert not g.kernel_available(cuda, 24, 64), other
    capability[0] = (12, 0)
    assert g.kernel_available(cuda, 24, 64)
    capability[0] = (10, 0)
    built.clear()  # a DCGEN_BLACKWELL=0 build: the reference, not a refusing op
    assert not g.kernel_available(cuda, 24, 64)


def test_the_alignment_copy_traces_under_torch_compile():
    # data_ptr() of a traced tensor raised in a fullgraph compile (a graph break otherwise)
    from dcgen.ops.nvfp4_gemm import _aligned

    compiled = torch.compile(lambda t: _aligned(t) * 2, fullgraph=True, backend="eager")
    x = torch.randn(8)
    assert torch.equal(compiled(x), x * 2)


def _reference_as_kernels(monkeypatch, on_call) -> None:  # noqa: ANN001
    """Make both GEMM wrappers take their kernel route, with "the kernel" the reference
    behind ``on_call(*args)``, which sees the arguments the kernel would get."""
    import dcgen.ops.nvfp4_gemm as g

    def kernel(name):  # noqa: ANN001, ANN202
        def run(*args):  # noqa: ANN002, ANN202
            on_call(*args)
            if name == "nvfp4_gemm":
                return g.nvfp4_gemm_reference(*args)
            return g.nvfp4_gemm_w4a16_reference(*args)

        return run

    monkeypatch.setattr(g, "compiled_op", kernel)
    monkeypatch.setattr(g, "kernel_available", lambda *a: True)
    monkeypatch.setattr(g, "w4a16_kernel_available", lambda *a: True)


@pytest.mark.parametrize("m", [300, 257, 128])
def test_products_beyond_32_bit_indexing_run_in_row_chunks(m, rng, monkeypatch):
    # The kernels index with 32-bit ints: with the limit lowered, a GEMM whose M x max(N, K)
    # passes it runs as calls over 128-row-aligned chunks (each with its slice of A's swizzled
    # scales) whose results equal the one-call result exactly. Here "the kernel" is the
    # reference, with the check the C++ side makes.
    import dcgen.ops.nvfp4_gemm as g

    _, _, (a, sa, b, sb, alpha), _ = _operands(m, 40, 96, rng)
    x16 = torch.randn(m, 96, generator=rng).bfloat16()
    want = g.nvfp4_gemm_reference(a, sa, b, sb, alpha)
    want16 = g.nvfp4_gemm_w4a16_reference(x16, b, sb, alpha)
    monkeypatch.setattr(g, "INDEX_LIMIT", 100 * 96)  # chunks of 128 rows (100 rounds up)
    calls = []

    def on_call(*args):  # noqa: ANN002, ANN202
        rows = args[0].shape[0]
        assert rows % 128 == 0 or rows == m % 128, rows
        calls.append(rows)

    _reference_as_kernels(monkeypatch, on_call)
    assert g._row_chunks(m, 40, 96) == [(r, min(r + 128, m)) for r in range(0, m, 128)]
    assert torch.equal(nvfp4_gemm(a, sa, b, sb, alpha), want)
    assert torch.equal(g.nvfp4_gemm_w4a16(x16, b, sb, alpha), want16)
    assert calls == [r1 - r0 for r0, r1 in g._row_chunks(m, 40, 96)] * 2
    monkeypatch.setattr(g, "INDEX_LIMIT", 2**31)
    assert g._row_chunks(m, 40, 96) == [(0, m)]


def test_operands_reach_the_kernels_contiguous_and_16_byte_aligned(rng, monkeypatch):
    # The kernels load operands and scales in 16-byte vectors or by TMA: a contiguous view at
    # an odd offset (contiguous() returns it as it is) must arrive copied to an aligned buffer.
    import dcgen.ops.nvfp4_gemm as g

    _, _, (a, sa, b, sb, alpha), _ = _operands(40, 32, 64, rng)
    x16 = torch.randn(40, 64, generator=rng).bfloat16()

    def shifted(t: torch.Tensor) -> torch.Tensor:  # the same values, one byte into storage
        store = torch.empty(t.numel() * t.element_size() + 1, dtype=torch.uint8)
        view = store[1:].view(t.dtype).view(t.shape)
        return view.copy_(t)

    seen = []

    def on_call(*args):  # noqa: ANN002, ANN202
        seen.extend(t.is_contiguous() and t.data_ptr() % 16 == 0 for t in args[:-1])

    _reference_as_kernels(monkeypatch, on_call)
    a1, sa1, b1, sb1 = (shifted(t) for t in (a, sa, b, sb))
    assert b1.data_ptr() % 16 == 1 and sb1.is_contiguous()
    assert torch.equal(
        nvfp4_gemm(a1, sa1, b1, sb1, alpha), g.nvfp4_gemm_reference(a, sa, b, sb, alpha)
    )
    want16 = g.nvfp4_gemm_w4a16_reference(x16, b, sb, alpha)
    assert torch.equal(g.nvfp4_gemm_w4a16(x16, b1, sb1, alpha), want16)
    assert seen and all(seen), seen


def _hopper_or_skip(op: str) -> None:
    if not torch.cuda.is_available() or not has_kernel(op, "cuda"):
        pytest.skip(f"needs the compiled {op} and a CUDA GPU")
    if torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("needs an sm_90 (Hopper) GPU")


# M, N, K: one tile; ragged M and N with K a half tile (32) and a tile and a half (96); the FLUX
# attention-out shape at 4,608 tokens; a single row; N not a multiple of 8 (the register-operand
# kernel's element-wise store) with an odd K-tile count (2.5 tiles, padded to 4); M just past
# one 256-row tile with 16.5 K tiles (the 4-stage ring wraps several times).
SM90_SHAPES = [
    (128, 128, 64),
    (300, 200, 96),
    (77, 136, 32),
    (4608, 3072, 3072),
    (1, 64, 256),
    (33, 45, 160),
    (257, 384, 1056),
]
# The two Hopper kernels (csrc/nvfp4): the register-operand one (default) and the first one.
SM90_KERNELS = ["rs", "mainloop"]


@pytest.mark.cuda
@pytest.mark.parametrize("kernel", SM90_KERNELS)
@pytest.mark.parametrize("mnk", SM90_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_cuda_sm90_w4a4_matches_reference(mnk, kernel, rng, monkeypatch):
    _hopper_or_skip("nvfp4_gemm")
    monkeypatch.setenv("DCGEN_NVFP4_SM90", "1")
    monkeypatch.setenv("DCGEN_NVFP4_SM90_KERNEL", kernel)
    _assert_w4a4_kernel_matches_reference(*mnk, rng)


@pytest.mark.cuda
def test_cuda_sm90_kernel_choice_is_checked(rng, monkeypatch):
    _hopper_or_skip("nvfp4_gemm")
    _, _, (a, sa, b, sb, alpha), _ = _operands(4, 8, 32, rng, "cuda")
    monkeypatch.setenv("DCGEN_NVFP4_SM90", "1")
    monkeypatch.setenv("DCGEN_NVFP4_SM90_KERNEL", "fast")
    with pytest.raises(RuntimeError, match="expected 'rs' .* or 'mainloop', got 'fast'"):
        nvfp4_gemm(a, sa, b, sb, alpha)


@pytest.mark.cuda
@pytest.mark.parametrize("kernel", SM90_KERNELS)
@pytest.mark.parametrize("mnk", SM90_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_cuda_sm90_w4a16_matches_reference(mnk, kernel, rng, monkeypatch):
    from dcgen.ops.nvfp4_gemm import nvfp4_gemm_w4a16, nvfp4_gemm_w4a16_reference

    _hopper_or_skip("nvfp4_gemm_w4a16")
    monkeypatch.setenv("DCGEN_NVFP4_SM90", "1")
    monkeypatch.setenv("DCGEN_NVFP4_SM90_KERNEL", kernel)
    m, n, k = mnk
    x = torch.randn(m, k, generator=rng).cuda().bfloat16()
    qw = quantize_nvfp4(torch.randn(n, k, generator=rng).cuda() * 0.05)
    b, sb, alpha = qw.packed, swizzle_scales(qw.scales), qw.global_scale
    poison_cuda_allocator()
    y = nvfp4_gemm_w4a16(x, b, sb, alpha)
    ref = nvfp4_gemm_w4a16_reference(x, b, sb, alpha)
    assert not y.isnan().any()
    torch.testing.assert_close(y.float(), ref.float(), atol=1e-2, rtol=1.6e-2)


@pytest.mark.cuda
@pytest.mark.parametrize("mode", ["w4a4", "w4a16"])
@pytest.mark.parametrize("rank", [4, 16, 0])
def test_cuda_sm90_nvfp4_linear_matches_reference(mode, rank, rng, monkeypatch):
    # rank 4: the branch beside an unfused quantize; 16 (a LOWRANK_KERNEL_RANKS size): the fused
    # low-rank quantize kernel; 0: no branch, the GEMM's bf16 result with the bias added in bf16.
    _hopper_or_skip("nvfp4_gemm_w4a16" if mode == "w4a16" else "nvfp4_gemm")
    monkeypatch.setenv("DCGEN_NVFP4_SM90", "1")
    _assert_linear_kernel_matches_reference(mode, 136, rng, monkeypatch, rank)
