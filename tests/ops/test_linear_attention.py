"""relu_linear_attention: the reference against the N x N definition, the CUDA kernel against the
reference (fresh random inputs, poisoned outputs, several head dims and token counts), and
input errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dcgen.ops import has_kernel, relu_linear_attention, relu_linear_attention_reference
from dcgen.ops._extension import compiled_op
from tests.conftest import poison_cuda_allocator

# (B, heads, d, N): DC-AE head dim 32, reduced-test head dims, N below / at / above a tile,
# odd N and a 4K-decoder-like token count.
CASES = [(1, 1, 32, 1), (2, 3, 32, 17), (1, 2, 32, 64), (1, 2, 32, 65), (2, 4, 8, 1000),
         (1, 2, 2, 130), (1, 4, 32, 4097), (1, 2, 16, 20000)]  # fmt: skip
TOL = {torch.float32: (1e-4, 1e-4), torch.float16: (2e-3, 2e-3), torch.bfloat16: (1.6e-2, 1.6e-2)}


def _qkv(b, h, d, n, dtype, device, gen):
    return torch.randn(b, h, 3 * d, n, generator=gen).to(dtype).to(device)


def test_reference_equals_quadratic_definition(rng):
    # out_n = sum_m v_m (k_m . q_n) / sum_m (k_m . q_n), with relu on q and k, in float64.
    qkv = torch.randn(2, 3, 3 * 4, 50, generator=rng, dtype=torch.float64)
    q, k, v = qkv.split(4, dim=2)
    q, k = F.relu(q), F.relu(k)
    scores = torch.einsum("bhdm,bhdn->bhmn", k, q)  # (m: keys, n: queries)
    want = torch.einsum("bhdm,bhmn->bhdn", v, scores) / (scores.sum(dim=2, keepdim=True) + 1e-15)
    # The spec computes in fp32 (a float64 input too): fp32 rounding of sums over 50 tokens,
    # which float64's default tolerance (1e-7) rejected for some random inputs.
    torch.testing.assert_close(relu_linear_attention_reference(qkv), want, atol=1e-5, rtol=1e-5)


def test_public_op_on_cpu_is_the_reference(rng):
    qkv = torch.randn(1, 2, 96, 40, generator=rng)
    torch.testing.assert_close(relu_linear_attention(qkv), relu_linear_attention_reference(qkv))


def test_fp16_input_keeps_fp32_sums(rng):
    # 70k tokens of magnitude ~3: the sums overflow fp16 (max 65504) unless kept in fp32.
    qkv = (torch.randn(1, 1, 96, 70000, generator=rng) * 3).half()
    out = relu_linear_attention(qkv)
    assert out.dtype == torch.float16 and torch.isfinite(out).all()


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cuda_kernel_matches_reference(dtype, rng):
    if not has_kernel("relu_linear_attention", "cuda"):
        pytest.skip("dcgen._C has no CUDA kernel for relu_linear_attention")
    kernel = compiled_op("relu_linear_attention")
    for b, h, d, n in CASES:
        qkv = _qkv(b, h, d, n, dtype, "cuda", rng)
        poison_cuda_allocator()
        got = kernel(qkv, 1e-15)
        want = relu_linear_attention_reference(qkv.double().cpu()).float()
        assert got.shape == (b, h, d, n) and got.dtype == dtype
        assert not got.isnan().any(), f"unwritten or NaN output at {(b, h, d, n)}"
        atol, rtol = TOL[dtype]
        # outputs are ratios of sums; compare relative to the output's own scale
        scale = want.abs().max().item() + 1e-6
        torch.testing.assert_close(got.float().cpu() / scale, want / scale, atol=atol, rtol=rtol,
                                   msg=f"{(b, h, d, n)} {dtype}")  # fmt: skip


@pytest.mark.cuda
def test_cuda_kernel_is_deterministic_and_traceable(rng):
    if not has_kernel("relu_linear_attention", "cuda"):
        pytest.skip("dcgen._C has no CUDA kernel for relu_linear_attention")
    qkv = _qkv(1, 8, 32, 100000, torch.bfloat16, "cuda", rng)
    a = relu_linear_attention(qkv)
    b = relu_linear_attention(qkv)
    assert torch.equal(a, b), "no atomics: the same input must give bit-identical output"
    torch.library.opcheck(
        torch.ops.dcgen.relu_linear_attention.default, (qkv[:, :2, :, :300].contiguous(), 1e-15),
        test_utils=("test_schema", "test_faketensor"),
    )  # fmt: skip


@pytest.mark.parametrize(
    "qkv, match",
    [
        (torch.randn(2, 96, 10), "expected a tensor with 4 dims"),
        (torch.randn(1, 2, 95, 10), "3\\*head_dim"),
    ],
)
def test_bad_input(qkv, match):
    with pytest.raises(ValueError, match=match):
        relu_linear_attention(qkv)
