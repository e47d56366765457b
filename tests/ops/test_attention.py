"""Fused DiT attention: the reference against diffusers (RoPE, RMSNorm) and written-out math,
dispatch, tracing, input errors; CUDA kernels against the reference (outputs poisoned)."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers.models.embeddings import apply_rotary_emb
from diffusers.models.transformers.transformer_flux import FluxPosEmbed

import dcgen
from dcgen.ops import has_kernel
from dcgen.ops.attention import (
    fused_attention,
    fused_attention_reference,
    qk_norm_rope,
    qk_norm_rope_reference,
    rms_norm_heads_reference,
    rope_reference,
)
from tests.conftest import poison_cuda_allocator


def flux_tables(n_text: int, side_h: int, side_w: int, axes=(16, 56, 56)) -> tuple:
    """FLUX's (S, D) RoPE tables for text then an h x w image grid, as the transformer builds
    them (3-axis ids, fp64 on CPU)."""
    txt = torch.zeros(n_text, 3)
    img = torch.zeros(side_h, side_w, 3)
    img[..., 1] = torch.arange(side_h)[:, None]
    img[..., 2] = torch.arange(side_w)[None, :]
    ids = torch.cat([txt, img.reshape(-1, 3)])
    return FluxPosEmbed(theta=10000, axes_dim=list(axes))(ids)


def explicit_attention(q, k, v, scale, mask=None):
    """softmax(q k^T * scale) v written out, fp64; masked-out keys get zero weight and a row
    with no key gives zeros."""
    s = torch.einsum("bhqd,bhkd->bhqk", q.double(), k.double()) * scale
    if mask is not None:
        s = s.masked_fill(~mask[:, None, None, :], float("-inf"))
    p = torch.softmax(s, dim=-1).nan_to_num(0.0)
    return torch.einsum("bhqk,bhkd->bhqd", p, v.double())


# ------------------------------------------------------------------------------ reference


@pytest.mark.parametrize("shape", [(1, 2, 9, 32), (2, 3, 20, 128), (1, 1, 1, 2)])
def test_rope_matches_diffusers(shape, rng):
    b, h, s, d = shape
    x = torch.randn(shape, generator=rng)
    cos, sin = torch.randn(s, d, generator=rng), torch.randn(s, d, generator=rng)
    torch.testing.assert_close(
        rope_reference(x, cos, sin), apply_rotary_emb(x, (cos, sin), sequence_dim=2)
    )


def test_rope_on_flux_tables_matches_diffusers_bshd(rng):
    # diffusers' FLUX processor applies RoPE on (B, S, H, D) with sequence_dim=1.
    cos, sin = flux_tables(5, 3, 4)
    x = torch.randn(2, cos.shape[0], 3, 128, generator=rng)
    want = apply_rotary_emb(x, (cos, sin), sequence_dim=1)
    got = rope_reference(x.transpose(1, 2), cos, sin).transpose(1, 2)
    torch.testing.assert_close(got, want)


def test_rms_norm_matches_torch_per_head_and_split(rng):
    x = torch.randn(2, 3, 7, 64, generator=rng) * 3
    w_text, w_img = torch.randn(64, generator=rng), torch.randn(64, generator=rng)

    def torch_norm(x, w):
        norm = torch.nn.RMSNorm(64, eps=1e-6)
        norm.weight.data.copy_(w)
        return norm(x)

    torch.testing.assert_close(rms_norm_heads_reference(x, w_img, 1e-6), torch_norm(x, w_img))
    got = rms_norm_heads_reference(x, torch.stack([w_text, w_img]), 1e-6, norm_split=3)
    want = torch.cat([torch_norm(x[:, :, :3], w_text), torch_norm(x[:, :, 3:], w_img)], dim=2)
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("sq,sk", [(7, 7), (1, 13), (33, 5)])
def test_reference_matches_explicit_math(sq, sk, masked, rng):
    b, h, d = 2, 3, 16
    q = torch.randn(b, h, sq, d, generator=rng)
    k = torch.randn(b, h, sk, d, generator=rng)
    v = torch.randn(b, h, sk, d, generator=rng)
    mask = None
    if masked:
        mask = torch.rand(b, sk, generator=rng) > 0.4
        mask[0, 0] = True
        mask[1] = False  # a batch element that sees no key: zeros
    got = fused_attention_reference(q, k, v, key_padding_mask=mask, scale=0.3)
    want = explicit_attention(q, k, v, 0.3, mask)
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)
    assert got.transpose(1, 2).is_contiguous()  # (B, Sq, H, D) memory, like the kernel


def test_reference_prologue_is_norm_then_rope(rng):
    cos, sin = flux_tables(4, 2, 3, axes=(8, 12, 12))
    s, d = cos.shape
    q, k, v = torch.randn(3, 1, 2, s, d, generator=rng).unbind(0)
    wq, wk = torch.randn(2, d, generator=rng), torch.randn(d, generator=rng)
    got = fused_attention_reference(
        q, k, v, q_norm_weight=wq, k_norm_weight=wk, rope_cos=cos, rope_sin=sin, norm_split=4
    )
    qn = rope_reference(rms_norm_heads_reference(q, wq, 1e-6, 4), cos, sin)
    kn = rope_reference(rms_norm_heads_reference(k, wk, 1e-6), cos, sin)
    want = explicit_attention(qn, kn, v, 1 / math.sqrt(d))
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)
    q2, k2 = qk_norm_rope_reference(
        q, k, q_norm_weight=wq, k_norm_weight=wk, rope_cos=cos, rope_sin=sin, norm_split=4
    )
    torch.testing.assert_close(q2, qn)
    torch.testing.assert_close(k2, kn)


def test_public_ops_run_the_reference_on_cpu_and_differentiate(rng):
    cos, sin = flux_tables(2, 2, 2, axes=(4, 6, 6))
    s, d = cos.shape
    q, k, v = (t.requires_grad_() for t in torch.randn(3, 1, 2, s, d, generator=rng).unbind(0))
    w = torch.ones(d, requires_grad=True)
    out = fused_attention(q, k, v, q_norm_weight=w, k_norm_weight=w, rope_cos=cos, rope_sin=sin)
    out.square().sum().backward()
    assert q.grad is not None and w.grad is not None and torch.isfinite(q.grad).all()
    qo, ko = qk_norm_rope(q, k, q_norm_weight=w, k_norm_weight=w, rope_cos=cos, rope_sin=sin)
    assert qo.transpose(1, 2).is_contiguous() and qo.shape == q.shape  # (B, S, H, D) memory


def test_compiles_without_graph_breaks_on_cpu(rng):
    cos, sin = flux_tables(2, 2, 2, axes=(4, 6, 6))
    s, d = cos.shape
    q, k, v = torch.randn(3, 2, 2, s, d, generator=rng).unbind(0)
    w = torch.randn(2, d, generator=rng)
    mask = torch.ones(2, s, dtype=torch.bool)

    def fn(q, k, v):
        return fused_attention(
            q, k, v, q_norm_weight=w, k_norm_weight=w, rope_cos=cos, rope_sin=sin,
            norm_split=2, key_padding_mask=mask,
        )  # fmt: skip

    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(q, k, v), fn(q, k, v))


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(q=torch.zeros(2, 3, 4)), r"fused_attention: q: expected a tensor with 4 dims"),
        (dict(k=torch.zeros(1, 2, 5, 8)), r"expected k and v of shape \(1, 2, Sk, 16\)"),
        (dict(v=torch.zeros(1, 2, 5, 16, dtype=torch.float16)), r"v of dtype torch.float32"),
        (dict(q_norm_weight=torch.ones(8)), r"q_norm_weight: expected shape \(16,\) or \(2, 16\)"),
        (dict(rope_cos=torch.ones(5, 16)), r"rope_cos and rope_sin both"),
        (
            dict(rope_cos=torch.ones(4, 16), rope_sin=torch.ones(4, 16)),
            r"expected rope_cos of shape \(5, 16\) \(S, D\), got \(4, 16\)",
        ),
        (dict(key_padding_mask=torch.ones(1, 5)), r"key_padding_mask: expected dtype"),
        (dict(key_padding_mask=torch.ones(1, 4, dtype=torch.bool)), r"\(1, 5\) \(B, Sk\)"),
        (dict(norm_split=9), r"expected 0 <= norm_split <= 5 \(Sq\), got 9"),
        (dict(eps=0.0), r"expected eps > 0, got 0.0"),
    ],
)
def test_input_errors_name_expected_and_got(kwargs, match):
    args = dict(q=torch.zeros(1, 2, 5, 16), k=torch.zeros(1, 2, 5, 16), v=torch.zeros(1, 2, 5, 16))
    args.update(kwargs)
    q, k, v = args.pop("q"), args.pop("k"), args.pop("v")
    with pytest.raises((ValueError, TypeError), match=match):
        fused_attention(q, k, v, **args)


def test_attention_kernel_switch(monkeypatch):
    """DCGEN_ATTENTION_KERNEL: "sdpa" by default, "flash" on request, anything else an error
    that names the variable and the choices."""
    from dcgen.ops.attention import flash_kernel_selected

    monkeypatch.delenv("DCGEN_ATTENTION_KERNEL", raising=False)
    assert not flash_kernel_selected()
    monkeypatch.setenv("DCGEN_ATTENTION_KERNEL", "Flash")
    assert flash_kernel_selected()
    monkeypatch.setenv("DCGEN_ATTENTION_KERNEL", "cudnn")
    with pytest.raises(ValueError, match="DCGEN_ATTENTION_KERNEL.*'sdpa', 'flash'.*'cudnn'"):
        flash_kernel_selected()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sdpa_path_matches_reference(dtype, rng):
    """The default CUDA path (qk_norm_rope, then torch SDPA; dcgen.ops.attention) run on the CPU:
    same math as the fp32 reference, key padding included (a batch row with no key at all
    returns zeros, not NaN)."""
    from dcgen.ops.attention import _sdpa_attention

    b, h, s, d = 2, 3, 37, 64
    q, k, v = (torch.randn(b, s, h, d, generator=rng).to(dtype).transpose(1, 2) for _ in "qkv")
    angles = torch.rand(s, d // 2, generator=rng) * 2 * math.pi
    args = dict(
        q_norm_weight=1 + 0.2 * torch.randn(2, d, generator=rng),
        k_norm_weight=1 + 0.2 * torch.randn(d, generator=rng),
        eps=1e-6, rope_cos=angles.cos().repeat_interleave(2, dim=1),
        rope_sin=angles.sin().repeat_interleave(2, dim=1), norm_split=5,
        key_padding_mask=torch.rand(b, s, generator=rng) > 0.3, scale=0.11,
    )  # fmt: skip
    args["key_padding_mask"][1] = False
    got = _sdpa_attention(q, k, v, *args.values())
    want = fused_attention_reference(q, k, v, **args)
    assert got.shape == want.shape and got.dtype == dtype
    assert got.transpose(1, 2).is_contiguous()  # (B, S, H, D) memory, like the kernels
    assert not got.isnan().any() and not got[1].any()
    tol = 1e-5 if dtype == torch.float32 else 2.5e-2
    torch.testing.assert_close(got.float(), want.float(), atol=tol, rtol=tol)


def test_rope_needs_equal_lengths():
    q, k = torch.zeros(1, 1, 3, 8), torch.zeros(1, 1, 4, 8)
    with pytest.raises(ValueError, match="one sequence length, got 3 and 4"):
        fused_attention(q, k, k, rope_cos=torch.ones(3, 8), rope_sin=torch.ones(3, 8))


# ------------------------------------------------------------------------------ CUDA kernels

# Tolerances against the fp32 reference: the kernel rounds the prologue's q, k and the
# softmax probabilities to the input dtype before the tensor-core products (as every flash
# attention does); outputs are O(1) (weighted means of unit-variance v).
TOL = {torch.float16: (4e-3, 4e-3), torch.bfloat16: (2.5e-2, 2.5e-2)}

# (B, H, Sq, Sk, D): S below one 64-row tile, odd S, exact tiles, cross-attention lengths.
CUDA_SHAPES = [
    (1, 1, 1, 1, 64),
    (2, 3, 7, 7, 128),
    (1, 2, 64, 64, 64),
    (1, 2, 65, 65, 128),
    (2, 2, 129, 129, 64),
    (1, 24, 333, 333, 128),
    (3, 2, 100, 37, 128),
    (2, 4, 17, 300, 64),
    (1, 2, 777, 777, 64),  # 7 key tiles of 128: the TMA kernel's 3-stage ring wraps twice
]


def _cuda_inputs(b, h, sq, sk, d, dtype, gen, bshd=True):
    """q, k, v as (B, H, S, D) views of (B, S, H, D) projections (what the processors pass)."""

    def make(s):
        x = torch.randn(b, s, h, d, generator=gen).to("cuda", dtype)
        return x.transpose(1, 2) if bshd else x.transpose(1, 2).contiguous()

    return make(sq), make(sk), make(sk)


def _prologue_args(variant, sq, d, gen):
    args = {}
    if variant in ("norm", "norm_rope"):
        args["q_norm_weight"] = (1 + 0.2 * torch.randn(2, d, generator=gen)).cuda()
        args["k_norm_weight"] = (1 + 0.2 * torch.randn(d, generator=gen)).cuda()
        args["norm_split"] = sq // 3
    if variant in ("rope", "norm_rope"):
        angles = torch.rand(sq, d // 2, generator=gen) * 2 * math.pi
        args["rope_cos"] = angles.cos().repeat_interleave(2, dim=1).cuda()
        args["rope_sin"] = angles.sin().repeat_interleave(2, dim=1).cuda()
    return args


def _to_cpu(args):
    return {k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in args.items()}


def _require(name):
    if not has_kernel(name, "cuda"):
        pytest.skip(f"dcgen._C has no CUDA kernel for {name}")


# Kernel variants: fragment loads (ldmatrix, the default, or plain shared loads) x where K's
# prologue runs (inside the tile loads, or once up front; "auto" picks by sequence length);
# "wgmma" is the first Hopper kernel (sm_90 only, DCGEN_ATTENTION_SM90=wgmma), "sm90_tma" the
# warp-specialized TMA one (DCGEN_ATTENTION_SM90=tma; it always prepares K up front, so "fused"
# also checks that the wrapper overrides that request), with and without its ping-pong.
KERNEL_MODES = [
    ("ldmatrix", "fused"),
    ("ldmatrix", "prepass"),
    ("plain_loads", "fused"),
    ("wgmma", "fused"),
    ("wgmma", "prepass"),
    ("sm90_tma", "fused"),
    ("sm90_tma", "auto"),
    ("sm90_tma_no_pingpong", "auto"),
    ("sdpa", "auto"),  # the default policy: qk_norm_rope kernel + torch SDPA
]


# test id -> DCGEN_ATTENTION_SM90 ("sm90_tma_no_pingpong": the TMA kernel, ping-pong off)
SM90_CHOICE = {"wgmma": "wgmma", "sm90_tma": "tma", "sm90_tma_no_pingpong": "tma"}


def _hopper_kernel_or_skip(loads, monkeypatch):
    """Select the path: "sdpa" (the default policy) or one of dcgen's flash kernels; the Hopper
    one needs an sm_90 GPU and a build with CUTLASS headers."""
    monkeypatch.setenv("DCGEN_ATTENTION_KERNEL", "sdpa" if loads == "sdpa" else "flash")
    monkeypatch.setenv("DCGEN_ATTENTION_SM90", SM90_CHOICE.get(loads, "0"))
    monkeypatch.setenv("DCGEN_ATTENTION_PINGPONG", "0" if loads.endswith("no_pingpong") else "1")
    if loads in SM90_CHOICE:
        if torch.cuda.get_device_capability()[0] != 9:
            pytest.skip(f"the {loads} attention kernel needs an sm_90 (Hopper) GPU")
        if "sm_90a" not in dcgen.build_info().get("cuda_archs", []):
            pytest.skip("dcgen._C was built without the sm_90a kernels (no CUTLASS headers)")


@pytest.mark.cuda
@pytest.mark.parametrize("loads,k_prologue", KERNEL_MODES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("variant", ["plain", "norm", "rope", "norm_rope"])
def test_cuda_fused_attention_matches_reference(
    dtype, variant, loads, k_prologue, rng, monkeypatch
):
    _require("fused_attention")
    _hopper_kernel_or_skip(loads, monkeypatch)
    monkeypatch.setenv("DCGEN_ATTENTION_PLAIN_LOADS", "1" if loads == "plain_loads" else "0")
    monkeypatch.setenv("DCGEN_ATTENTION_K_PROLOGUE", k_prologue)
    for b, h, sq, sk, d in CUDA_SHAPES:
        rope = variant in ("rope", "norm_rope")
        if rope and sq != sk:
            continue
        for masked in (False, True):
            q, k, v = _cuda_inputs(b, h, sq, sk, d, dtype, rng, bshd=(sq % 2 == 1))
            args = _prologue_args(variant, sq, d, rng)
            if masked:
                mask = torch.rand(b, sk, generator=rng) > 0.3
                mask[:, 0] = True
                if b > 1:
                    mask[-1] = False  # no key at all: zeros
                args["key_padding_mask"] = mask.cuda()
            poison_cuda_allocator()
            got = fused_attention(q, k, v, **args)
            want = fused_attention_reference(q.cpu(), k.cpu(), v.cpu(), **_to_cpu(args))
            where = f"{(b, h, sq, sk, d)} {variant} masked={masked}"
            assert got.shape == (b, h, sq, d) and got.dtype == dtype, where
            assert got.transpose(1, 2).is_contiguous(), where
            assert not got.isnan().any(), f"unwritten or NaN output: {where}"
            atol, rtol = TOL[dtype]
            torch.testing.assert_close(got.cpu().float(), want.float(), atol=atol, rtol=rtol,
                                       msg=where)  # fmt: skip


@pytest.mark.cuda
@pytest.mark.parametrize("loads", ["ldmatrix", "wgmma", "sm90_tma", "sdpa"])
def test_cuda_fused_attention_scale_and_flux_tables(loads, rng, monkeypatch):
    _require("fused_attention")
    _hopper_kernel_or_skip(loads, monkeypatch)
    cos, sin = flux_tables(31, 9, 11)  # 130 tokens, FLUX's axes (16, 56, 56), D = 128
    s = cos.shape[0]
    q, k, v = _cuda_inputs(1, 3, s, s, 128, torch.bfloat16, rng)
    w = (1 + 0.2 * torch.randn(2, 128, generator=rng)).cuda()
    args = dict(q_norm_weight=w, k_norm_weight=w.flip(0), rope_cos=cos.cuda(),
                rope_sin=sin.cuda(), norm_split=31, scale=0.05)  # fmt: skip
    poison_cuda_allocator()
    got = fused_attention(q, k, v, **args)
    want = fused_attention_reference(q.cpu(), k.cpu(), v.cpu(), **_to_cpu(args))
    torch.testing.assert_close(got.cpu().float(), want.float(), atol=2.5e-2, rtol=2.5e-2)


@pytest.mark.cuda
@pytest.mark.parametrize("layout", ["broadcast", "odd_unit_stride", "odd_offset"])
@pytest.mark.parametrize("loads", ["ldmatrix", "wgmma", "sm90_tma", "sdpa"])
def test_cuda_fused_attention_unusual_kv_strides(loads, layout, rng, monkeypatch):
    """K and V expanded over heads (stride 0; shared keys, as in multi-query attention), a
    batch of one whose batch stride is odd (PyTorch ignores a size-1 dim's stride, so
    contiguous() keeps it), or q, k, v contiguous but one element into their storage (2 bytes
    past a 16-byte boundary; contiguous() returns such a view as it is): the wrappers must copy
    what their loads cannot address (TMA descriptors reject all three)."""
    _require("fused_attention")
    _hopper_kernel_or_skip(loads, monkeypatch)
    h, s, d = 3, 150, 128
    b = 2 if layout == "broadcast" else 1
    q = torch.randn(b, h, s, d, generator=rng).to("cuda", torch.bfloat16)
    args = {}
    if layout == "odd_offset":

        def shifted():
            n = b * h * s * d
            store = torch.randn(n + 1, generator=rng).to("cuda", torch.bfloat16)
            return store[1:].view(b, h, s, d)

        q, k, v = shifted(), shifted(), shifted()
        assert q.is_contiguous() and q.data_ptr() % 16 == 2
        args = _prologue_args("norm_rope", s, d, rng)  # the sdpa path: the qk_norm_rope kernel
    elif layout == "broadcast":
        k, v = (torch.randn(b, 1, s, d, generator=rng).to("cuda", torch.bfloat16)
                .expand(b, h, s, d) for _ in range(2))  # fmt: skip
        assert k.stride(1) == 0
    else:
        k, v = (torch.empty_strided((1, h, s, d), (3, s * d, d, 1), device="cuda",
                                    dtype=torch.bfloat16)
                .copy_(torch.randn(1, h, s, d, generator=rng)) for _ in range(2))  # fmt: skip
        assert k.is_contiguous() and k.stride(0) == 3
    poison_cuda_allocator()
    got = fused_attention(q, k, v, **args)
    want = fused_attention_reference(q.cpu(), k.cpu(), v.cpu(), **_to_cpu(args))
    assert not got.isnan().any()
    torch.testing.assert_close(got.cpu().float(), want.float(), atol=2.5e-2, rtol=2.5e-2)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_unsupported_head_dim_takes_the_sdpa_path(dtype, rng):
    q, k, v = _cuda_inputs(2, 2, 50, 50, 80, dtype, rng)
    args = _prologue_args("norm_rope", 50, 80, rng)
    got = fused_attention(q, k, v, **args)
    want = fused_attention_reference(q.cpu(), k.cpu(), v.cpu(), **_to_cpu(args))
    torch.testing.assert_close(got.cpu().float(), want.float(), atol=3e-2, rtol=3e-2)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("d", [64, 128, 256, 80, 2])
def test_cuda_qk_norm_rope_matches_reference(dtype, d, rng):
    # 64 / 128 / 256: the 16-byte kernel (D / 8 lanes a row); 80 and 2: the pair kernel
    _require("qk_norm_rope")
    for b, h, s in [(1, 1, 1), (2, 3, 37), (1, 24, 300)]:
        for variant in ("norm", "rope", "norm_rope"):
            q, k, _ = _cuda_inputs(b, h, s, s, d, dtype, rng, bshd=(s % 2 == 1))
            args = _prologue_args(variant, s, d, rng)
            poison_cuda_allocator()
            gq, gk = qk_norm_rope(q, k, **args)
            wq, wk = qk_norm_rope_reference(q.cpu(), k.cpu(), **_to_cpu(args))
            for got, want in ((gq, wq), (gk, wk)):
                # (B, S, H, D) memory, like the reference
                assert got.transpose(1, 2).is_contiguous() and got.shape == want.shape
                assert not got.isnan().any(), (b, h, s, d, variant)
                # one rounding of an fp32 result: within one unit in the last place
                tol = 1e-2 if dtype == torch.bfloat16 else 2e-3
                torch.testing.assert_close(got.cpu().float(), want.float(), atol=tol, rtol=tol,
                                           msg=f"{(b, h, s, d)} {variant}")  # fmt: skip


def _assert_bf16_qk_norm_rope_matches_reference(q, k, args) -> None:
    poison_cuda_allocator()
    gq, gk = qk_norm_rope(q, k, **args)
    wq, wk = qk_norm_rope_reference(q.cpu(), k.cpu(), **_to_cpu(args))
    for got, want in ((gq, wq), (gk, wk)):
        assert not got.isnan().any()
        # one rounding of an fp32 result: within one bf16 unit in the last place
        torch.testing.assert_close(got.cpu().float(), want.float(), atol=1e-2, rtol=1e-2)


@pytest.mark.cuda
@pytest.mark.parametrize("vec", ["1", "0"], ids=["16-byte", "pair-forced"])
def test_cuda_qk_norm_rope_kernels_agree(vec, rng, monkeypatch):
    # DCGEN_QK_NORM_ROPE_VEC=0 forces the pair kernel at head dim 128 (the rollback): both
    # kernels give the reference's values.
    _require("qk_norm_rope")
    monkeypatch.setenv("DCGEN_QK_NORM_ROPE_VEC", vec)
    q, k, _ = _cuda_inputs(2, 3, 37, 37, 128, torch.bfloat16, rng)
    args = _prologue_args("norm_rope", 37, 128, rng)
    _assert_bf16_qk_norm_rope_matches_reference(q, k, args)


@pytest.mark.cuda
def test_cuda_launcher_switches_refuse_words(rng, monkeypatch):
    # The C++ launchers' 1 / 0 switches tested one character or `!= "0"`: "false" and "off"
    # meant on. Now anything but 1 or 0 is refused naming the switch.
    _require("qk_norm_rope")
    q, k, _ = _cuda_inputs(1, 2, 17, 17, 128, torch.bfloat16, rng)
    args = _prologue_args("norm_rope", 17, 128, rng)
    monkeypatch.setenv("DCGEN_QK_NORM_ROPE_VEC", "false")
    with pytest.raises(RuntimeError, match=r"DCGEN_QK_NORM_ROPE_VEC: expected 1 or 0, got 'false'"):
        qk_norm_rope(q, k, **args)
    monkeypatch.delenv("DCGEN_QK_NORM_ROPE_VEC")
    _require("fused_attention")
    v = torch.randn_like(q)
    monkeypatch.setenv("DCGEN_ATTENTION_KERNEL", "flash")
    monkeypatch.setenv("DCGEN_ATTENTION_PINGPONG", "off")
    with pytest.raises(RuntimeError, match=r"DCGEN_ATTENTION_PINGPONG: expected 1 or 0"):
        fused_attention(q, k, v)


@pytest.mark.cuda
@pytest.mark.parametrize("offset", [2, 1])
def test_cuda_qk_norm_rope_misaligned_rows_take_the_pair_kernel(offset, rng):
    # Head dim 128 but rows 4 bytes past a 16-byte boundary (a view 2 elements into its
    # storage): the 16-byte kernel cannot load them, the pair kernel must; same results. At
    # one element (2 bytes) not even the pair loads can: the op copies q once.
    _require("qk_norm_rope")
    b, h, s, d = 2, 3, 37, 128
    args = _prologue_args("norm_rope", s, d, rng)
    base = torch.randn(b * h * s * d + offset, generator=rng).cuda().bfloat16()
    q = base[offset:].view(b, h, s, d)
    k = torch.randn(b, h, s, d, generator=rng).cuda().bfloat16()
    assert q.data_ptr() % 16 == 2 * offset
    _assert_bf16_qk_norm_rope_matches_reference(q, k, args)


@pytest.mark.cuda
@pytest.mark.parametrize("path", ["flash", "sdpa"])
def test_cuda_compiled_op_traces(path, rng, monkeypatch):
    _require("fused_attention")
    monkeypatch.setenv("DCGEN_ATTENTION_KERNEL", path)
    # The portable kernel: the Hopper ones run in their own process (ids with wgmma / sm90).
    monkeypatch.setenv("DCGEN_ATTENTION_SM90", "0")
    q, k, v = _cuda_inputs(1, 2, 70, 70, 64, torch.bfloat16, rng)
    args = _prologue_args("norm_rope", 70, 64, rng)

    def fn(q, k, v):
        return fused_attention(q, k, v, **args)

    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True)
    torch.testing.assert_close(compiled(q, k, v), fn(q, k, v))
