"""NVFP4Linear's direct W4A4 inference route (dcgen/quant/linear.py module doc).

The route needs the quantize kernel and a native NVFP4 GEMM, which exist on Blackwell (and on
Hopper, opt-in) only. To exercise it on a CPU, each test registers CPU kernels for
``dcgen::quantize_nvfp4`` and ``dcgen::nvfp4_gemm`` that run the PyTorch references (the CUDA
kernels are tested against the same references in tests/ops), counts their calls, and makes
the GEMM count as available; then it compares the route with the general path on the same
layer and input: same ops, same arguments, so the same bits.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import dcgen.ops.nvfp4_gemm as gemm_mod
from dcgen.ops import _extension
from dcgen.ops.nvfp4_gemm import nvfp4_gemm_reference
from dcgen.ops.quantize_nvfp4 import quantize_nvfp4_reference
from dcgen.quant import NVFP4Linear
from dcgen.quant import dequant_path as dq
from tests.conftest import poison_cuda_allocator

if not _extension.has_schema("quantize_nvfp4") or not _extension.has_schema("nvfp4_gemm"):
    pytest.skip("dcgen._C is not built: no dcgen NVFP4 ops to route to", allow_module_level=True)

OPS = ("quantize_nvfp4", "nvfp4_gemm")


@pytest.fixture
def cpu_kernels(monkeypatch):
    """The two ops as CPU kernels (the references), visible to has_kernel, the GEMM counted as
    available and the dequantize path as not; yields the call counts per op and of
    direct-route calls ("direct")."""
    calls = dict.fromkeys((*OPS, "direct"), 0)

    def quantize(x: torch.Tensor, gs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        calls["quantize_nvfp4"] += 1
        assert x.dim() == 2 and x.is_contiguous()
        return quantize_nvfp4_reference(x, gs, check_finite=False)

    def gemm(a, sa, b, sb, alpha):  # noqa: ANN001, ANN202
        calls["nvfp4_gemm"] += 1
        return nvfp4_gemm_reference(a, sa, b, sb, alpha)

    direct = NVFP4Linear._direct_forward

    def counted(self, x):  # noqa: ANN001, ANN202
        calls["direct"] += 1
        return direct(self, x)

    monkeypatch.setattr(NVFP4Linear, "_direct_forward", counted)
    lib = torch.library.Library("dcgen", "IMPL")
    lib.impl("quantize_nvfp4", quantize, "CPU")
    lib.impl("nvfp4_gemm", gemm, "CPU")
    monkeypatch.setattr(_extension, "_KERNELS", _extension._KERNELS | {(n, "CPU") for n in OPS})
    monkeypatch.setattr(gemm_mod, "kernel_available", lambda device, n, k: k % 32 == 0)
    monkeypatch.setattr(dq, "available", lambda device: False)
    monkeypatch.delenv("DCGEN_DISABLE_KERNELS", raising=False)
    try:
        yield calls
    finally:
        lib._destroy()


def _layer(k: int = 64, n: int = 40, bias: bool = True, **kw) -> NVFP4Linear:
    torch.manual_seed(0)
    lin = nn.Linear(k, n, bias=bias)
    return NVFP4Linear.from_linear(lin, "w4a4", **kw)


def _general(layer: NVFP4Linear, x: torch.Tensor, monkeypatch) -> torch.Tensor:
    with monkeypatch.context() as m:
        m.setattr(NVFP4Linear, "_direct", lambda self, x: False)
        return layer(x)


@pytest.mark.parametrize("static", [False, True])
@pytest.mark.parametrize("bias", [True, False])
def test_direct_route_gives_the_general_paths_bits(cpu_kernels, monkeypatch, bias, static):
    layer = _layer(bias=bias)
    if static:
        layer.input_scale.fill_(0.002)
    x = torch.randn(3, 5, 64).bfloat16()
    with torch.inference_mode():
        want = _general(layer, x, monkeypatch)
        assert cpu_kernels["direct"] == 0 and cpu_kernels["nvfp4_gemm"] == 1
        got = layer(x)
    assert cpu_kernels["direct"] == 1 and cpu_kernels["nvfp4_gemm"] == 2
    assert got.dtype == torch.bfloat16 and got.shape == (3, 5, 40)
    assert torch.equal(got, want)


def test_direct_route_splits_products_beyond_32_bit_indexing(cpu_kernels, monkeypatch):
    # Past the kernels' 32-bit indexing (limit lowered here) the direct route hands the GEMM to
    # the public op, which runs it over 128-row chunks: 300 rows -> 3 kernel calls, same bits.
    import dcgen.ops.nvfp4_gemm as g

    layer = _layer()
    x = torch.randn(3, 100, 64).bfloat16()
    with torch.inference_mode():
        whole = layer(x)
        assert cpu_kernels["direct"] == 1 and cpu_kernels["nvfp4_gemm"] == 1
        monkeypatch.setattr(g, "INDEX_LIMIT", 100 * 64)
        split = layer(x)
    assert cpu_kernels["direct"] == 2 and cpu_kernels["nvfp4_gemm"] == 4
    assert torch.equal(split, whole)


def test_static_scale_change_is_seen(cpu_kernels, monkeypatch):
    """The route caches the static scale's product with weight_scale_2; writing either buffer
    (or switching to the dynamic scale) must be picked up on the next call."""
    layer = _layer()
    x = torch.randn(4, 64).bfloat16()
    with torch.no_grad():
        for value in (0.002, 0.004, 0.0):
            layer.input_scale.fill_(value)
            assert torch.equal(layer(x), _general(layer, x, monkeypatch))
        layer.weight_scale_2.mul_(2)
        assert torch.equal(layer(x), _general(layer, x, monkeypatch))
    assert cpu_kernels["direct"] == 4


def test_non_contiguous_input(cpu_kernels, monkeypatch):
    layer = _layer()
    x = torch.randn(64, 6).bfloat16().t()  # [6, 64], not contiguous
    with torch.no_grad():
        assert torch.equal(layer(x), _general(layer, x.contiguous(), monkeypatch))
    assert cpu_kernels["direct"] == 1


@pytest.mark.parametrize(
    "case", ["w4a16", "rank", "smooth", "fp32 input", "fp32 bias", "grad", "disabled", "k % 32"]
)
def test_route_not_taken(cpu_kernels, monkeypatch, case):
    k = 48 if case == "k % 32" else 64
    kw = {"rank": 8} if case == "rank" else {}
    if case == "smooth":
        kw["smooth"] = torch.rand(k) + 0.5
    layer = _layer(k=k, **kw)
    if case == "w4a16":
        layer.mode = "w4a16"
    if case == "fp32 bias":
        layer.bias.data = layer.bias.data.float()
    if case == "disabled":
        monkeypatch.setenv("DCGEN_DISABLE_KERNELS", "1")
    x = torch.randn(4, k, dtype=torch.float32 if case == "fp32 input" else torch.bfloat16)
    if case == "grad":
        x.requires_grad_(True)
        layer(x).float().sum().backward()
        assert x.grad is not None
    else:
        with torch.no_grad():
            layer(x)
    assert cpu_kernels["direct"] == 0


def test_route_decided_again_after_env_and_device_changes(cpu_kernels, monkeypatch):
    layer = _layer()
    x = torch.randn(4, 64).bfloat16()
    with torch.no_grad():
        layer(x)
        monkeypatch.setenv("DCGEN_DISABLE_KERNELS", "1")
        layer(x)  # the general path's reference (kernels off)
        monkeypatch.delenv("DCGEN_DISABLE_KERNELS")
        layer(x)
        assert cpu_kernels["direct"] == 2
        layer.to("cpu")  # a device move drops the cached decision
        assert "_route" not in layer.__dict__
        layer(x)
    assert cpu_kernels["direct"] == 3


@pytest.mark.cuda
def test_cuda_direct_route_matches_general_path(monkeypatch):
    monkeypatch.setenv("DCGEN_NVFP4_SM90", "1")  # Hopper's native GEMMs are opt-in
    layer = _layer(k=256, n=128).cuda()
    x = torch.randn(2, 33, 256, device="cuda").bfloat16()
    with torch.inference_mode():  # (with grad mode on, the bias Parameter rules the route out)
        if not layer._direct(x):
            pytest.skip("no native NVFP4 GEMM for this GPU (Blackwell; Hopper: DCGEN_NVFP4_SM90=1)")
    entered = []
    direct = NVFP4Linear._direct_forward
    monkeypatch.setattr(
        NVFP4Linear, "_direct_forward", lambda self, x: entered.append(1) or direct(self, x)
    )
    with torch.inference_mode():
        for value in (0.0, 0.003):
            layer.input_scale.fill_(value)
            poison_cuda_allocator()  # an unwritten output element reads NaN
            got = layer(x)
            assert not got.isnan().any()
            torch.testing.assert_close(got, _general(layer, x, monkeypatch), rtol=0, atol=0)
    assert entered == [1, 1], "the direct route did not run"
