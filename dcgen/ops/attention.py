"""Fused DiT attention: per-head QK-RMSNorm + RoPE + softmax attention (FLUX, SANA).

Layout. q, k and v are (B, H, S, D) tensors (batch, heads, tokens, head dim) with any strides
whose last dim is contiguous. The projections of a DiT come out as (B, S, H * D); pass
``x.unflatten(-1, (H, D)).transpose(1, 2)``, a view: the CUDA kernel reads it in place. The
attention output has shape (B, H, Sq, D) but (B, Sq, H, D)-contiguous memory, so
``out.transpose(1, 2).flatten(2)`` back to (B, Sq, H * D) tokens is free. The reference returns
the same layout.

Prologue (applied to q and k before the scores; every part optional):
  1. RMSNorm per head over D with fp32 statistics: x * rsqrt(mean(x^2) + eps) * weight.
     ``weight`` is (D,) for every token, or (2, D) for a joint sequence: tokens
     [0, norm_split) (FLUX's text tokens, which have their own norm) use row 0, the rest row 1.
  2. RoPE on interleaved pairs, as diffusers' ``apply_rotary_emb(use_real=True,
     use_real_unbind_dim=-1)`` (FLUX): for each pair (x[2i], x[2i+1]) at token s,
     out[2i] = x[2i] cos[s, 2i] - x[2i+1] sin[s, 2i], out[2i+1] = x[2i+1] cos[s, 2i+1] +
     x[2i] sin[s, 2i+1]. The (S, D) tables cover the whole joint sequence (text then image),
     exactly as FluxPosEmbed builds them.
Attention: softmax(scale * q k^T) v, scale = 1/sqrt(D) by default, with an optional boolean
key-padding mask (B, Sk), True = attend (SANA's cross-attention). A query row that sees no key
at all returns zeros.

Dispatch on CUDA (bf16/fp16, no gradient). ``DCGEN_ATTENTION_KERNEL`` picks between the two
fast paths: ``sdpa`` (the default) runs the standalone qk_norm_rope kernel (one pass over q and
k, written in (B, S, H, D) memory, in which SDPA then also writes its output: torch's cuDNN
attention allocates its output in q's layout, and the contiguous (B, H, S, D) q of earlier
versions made it a copy per call) and then torch's SDPA, which picks cuDNN / FlashAttention on
the card; ``flash`` runs dcgen's
flash kernel with the prologue fused into its tile loads (D in (64, 128)). The default follows
the measurement: on an H100 (benchmarks/test_attention.py, 2026-11-27) dcgen's fastest flash
kernel, the warp-specialized TMA one that sm_90 takes, ran the attention core at S = 4,608 in
0.82-0.88 ms against cuDNN SDPA's 0.45 (0.5-0.6x), and the whole norm + RoPE + attention step
in 0.91-0.94 ms against 0.65 ms for this default path, so fusing the prologue (which saves one
pass over q and k) cannot pay for the slower core yet.

Numerics: the reference runs everything in fp32 and rounds once to the input dtype. The CUDA
kernel keeps softmax statistics and accumulators in fp32 but, like every flash attention,
rounds the prologue's q, k and the probabilities to bf16/fp16 before the tensor-core products.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .._env import env_choice
from ._extension import compiled_op, has_kernel, has_schema
from ._validate import FLOAT_DTYPES, check_same_device, check_tensor

KERNEL_DTYPES = (torch.float16, torch.bfloat16)
KERNEL_HEAD_DIMS = (64, 128)  # compiled configurations of the flash kernel
#: "sdpa" (default: qk_norm_rope kernel + torch SDPA) or "flash" (dcgen's fused flash kernel)
ATTENTION_KERNEL_ENV = "DCGEN_ATTENTION_KERNEL"
ATTENTION_KERNELS = ("sdpa", "flash")
_TABLE_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


# ---------------------------------------------------------------------------------------------
# Reference (the spec)
# ---------------------------------------------------------------------------------------------


def rms_norm_heads_reference(
    x: torch.Tensor, weight: torch.Tensor, eps: float, norm_split: int = 0
) -> torch.Tensor:
    """fp32 RMSNorm of (B, H, S, D) over D; weight (D,) or (2, D) split at token norm_split."""
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + eps)
    w = weight.float()
    if w.ndim == 1:
        return y * w
    seq = torch.arange(x.shape[2], device=x.device)
    per_token = torch.where((seq < norm_split)[:, None], w[0], w[1])  # (S, D)
    return y * per_token


def rope_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """fp32 RoPE on interleaved pairs of (B, H, S, D) with (S, D) tables (diffusers' FLUX)."""
    xf = x.float()
    pairs = xf.unflatten(-1, (-1, 2))
    rotated = torch.stack([-pairs[..., 1], pairs[..., 0]], dim=-1).flatten(-2)
    return xf * cos.float() + rotated * sin.float()


def _prologue(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    eps: float,
    cos: torch.Tensor | None,
    sin: torch.Tensor | None,
    norm_split: int,
) -> torch.Tensor:
    y = x.float()
    if weight is not None:
        y = rms_norm_heads_reference(y, weight, eps, norm_split)
    if cos is not None:
        y = rope_reference(y, cos, sin)
    return y


def qk_norm_rope_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    q_norm_weight: torch.Tensor | None = None,
    k_norm_weight: torch.Tensor | None = None,
    eps: float = 1e-6,
    rope_cos: torch.Tensor | None = None,
    rope_sin: torch.Tensor | None = None,
    norm_split: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Spec of qk_norm_rope: fp32 norm then RoPE, one rounding; (B, H, S, D) out with
    (B, S, H, D) memory (:func:`qk_norm_rope`)."""
    qo = _prologue(q, q_norm_weight, eps, rope_cos, rope_sin, norm_split)
    ko = _prologue(k, k_norm_weight, eps, rope_cos, rope_sin, norm_split)
    return _token_major(qo.to(q.dtype)), _token_major(ko.to(k.dtype))


def _token_major(x: torch.Tensor) -> torch.Tensor:
    """(B, H, S, D) with (B, S, H, D)-contiguous memory (a copy unless it already is)."""
    return x.transpose(1, 2).contiguous().transpose(1, 2)


def fused_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    q_norm_weight: torch.Tensor | None = None,
    k_norm_weight: torch.Tensor | None = None,
    eps: float = 1e-6,
    rope_cos: torch.Tensor | None = None,
    rope_sin: torch.Tensor | None = None,
    norm_split: int = 0,
    key_padding_mask: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """Spec of fused_attention, unfused PyTorch in fp32 (autograd differentiates it)."""
    d = q.shape[-1]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    qf = _prologue(q, q_norm_weight, eps, rope_cos, rope_sin, norm_split)
    kf = _prologue(k, k_norm_weight, eps, rope_cos, rope_sin, norm_split)
    mask = None if key_padding_mask is None else key_padding_mask[:, None, None, :]
    # fp32 SDPA is plain softmax(q k^T * scale) v (tests check it against the written-out
    # math) and does not materialise S x S scores on CUDA.
    out = F.scaled_dot_product_attention(qf, kf, v.float(), attn_mask=mask, scale=scale)
    if key_padding_mask is not None:
        # Rows that see no key: zeros (SDPA's answer for an all-False row varies by backend).
        seen = key_padding_mask.any(dim=-1)[:, None, None, None]
        out = torch.where(seen, out, torch.zeros((), dtype=out.dtype, device=out.device))
    # (B, Sq, H, D) memory, like the kernel's output.
    return out.transpose(1, 2).to(q.dtype).contiguous().transpose(1, 2)


# ---------------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------------


def _check_norm_weight(name: str, w: torch.Tensor | None, d: int) -> None:
    if w is None:
        return
    check_tensor(name, w, ndim=(1, 2), dtypes=(*FLOAT_DTYPES, torch.float64))
    if tuple(w.shape) not in ((d,), (2, d)):
        raise ValueError(f"{name}: expected shape ({d},) or (2, {d}), got {tuple(w.shape)}")


def _check_prologue(
    op: str,
    q: torch.Tensor,
    k: torch.Tensor,
    q_norm_weight: torch.Tensor | None,
    k_norm_weight: torch.Tensor | None,
    eps: float,
    rope_cos: torch.Tensor | None,
    rope_sin: torch.Tensor | None,
    norm_split: int,
) -> None:
    d = q.shape[-1]
    _check_norm_weight(f"{op}: q_norm_weight", q_norm_weight, d)
    _check_norm_weight(f"{op}: k_norm_weight", k_norm_weight, d)
    if not eps > 0:
        raise ValueError(f"{op}: expected eps > 0, got {eps}")
    if not 0 <= norm_split <= q.shape[2]:
        raise ValueError(f"{op}: expected 0 <= norm_split <= {q.shape[2]} (Sq), got {norm_split}")
    if (rope_cos is None) != (rope_sin is None):
        raise ValueError(f"{op}: expected rope_cos and rope_sin both given or both None")
    if rope_cos is not None:
        if q.shape[2] != k.shape[2]:
            raise ValueError(
                f"{op}: RoPE needs q and k of one sequence length, got {q.shape[2]} and "
                f"{k.shape[2]}"
            )
        if d % 2:
            raise ValueError(f"{op}: RoPE needs an even head dim, got {d}")
        for name, t in (("rope_cos", rope_cos), ("rope_sin", rope_sin)):
            check_tensor(f"{op}: {name}", t, ndim=2, dtypes=_TABLE_DTYPES)
            if tuple(t.shape) != (q.shape[2], d):
                raise ValueError(
                    f"{op}: expected {name} of shape ({q.shape[2]}, {d}) (S, D), "
                    f"got {tuple(t.shape)}"
                )


def _check_qkv(op: str, **tensors: torch.Tensor) -> None:
    first = None
    for name, t in tensors.items():
        check_tensor(f"{op}: {name}", t, ndim=4, dtypes=(*FLOAT_DTYPES, torch.float64))
        if first is not None and t.dtype != first.dtype:
            raise TypeError(f"{op}: expected {name} of dtype {first.dtype} like q, got {t.dtype}")
        first = first if first is not None else t


@torch.compiler.assume_constant_result  # a device property: a constant to torch.compile
def _arch_ok(device_type: str, index: int | None) -> bool:
    """The CUDA kernels use sm_80 instructions (bf16 mma.sync): Ampere or newer."""
    if device_type != "cuda":
        return True
    return torch.cuda.get_device_capability(index)[0] >= 8  # ints: Dynamo-safe (see quant/fp8)


@torch.compiler.assume_constant_result  # a process setting: a constant to torch.compile
def flash_kernel_selected() -> bool:
    """Whether fused_attention may run dcgen's flash kernel (``DCGEN_ATTENTION_KERNEL=flash``)
    rather than qk_norm_rope + SDPA (``sdpa``, the default; module doc: why)."""
    return env_choice(ATTENTION_KERNEL_ENV, ATTENTION_KERNELS, "sdpa") == "flash"


def _needs_grad(*tensors: torch.Tensor | None) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


# ---------------------------------------------------------------------------------------------
# Public ops
# ---------------------------------------------------------------------------------------------


def qk_norm_rope(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    q_norm_weight: torch.Tensor | None = None,
    k_norm_weight: torch.Tensor | None = None,
    eps: float = 1e-6,
    rope_cos: torch.Tensor | None = None,
    rope_sin: torch.Tensor | None = None,
    norm_split: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-head RMSNorm + interleaved RoPE of q and k (B, H, S, D) in one pass each.

    Returns (q, k) as (B, H, S, D) tensors in the input dtype with (B, S, H, D) memory (a DiT's
    projections' own layout: torch's SDPA then returns its output in that layout too, so the
    tokens after attention are a view, not a copy), ready for any attention kernel. Runs the
    CUDA kernel for bf16/fp16 inputs when no gradient is needed, the fp32 reference otherwise.
    See the module docstring for the layout and the math.
    """
    op = "qk_norm_rope"
    _check_qkv(op, q=q, k=k)
    if q.shape[:2] != k.shape[:2] or q.shape[-1] != k.shape[-1]:
        raise ValueError(
            f"{op}: expected k of shape ({q.shape[0]}, {q.shape[1]}, S, {q.shape[3]}) like q, "
            f"got {tuple(k.shape)}"
        )
    _check_prologue(op, q, k, q_norm_weight, k_norm_weight, eps, rope_cos, rope_sin, norm_split)
    check_same_device(q=q, k=k, q_norm_weight=q_norm_weight, k_norm_weight=k_norm_weight,
                      rope_cos=rope_cos, rope_sin=rope_sin)  # fmt: skip
    return _qk_norm_rope_checked(q, k, q_norm_weight, k_norm_weight, eps, rope_cos, rope_sin,
                                 norm_split)  # fmt: skip


def _qk_norm_rope_checked(
    q: torch.Tensor,
    k: torch.Tensor,
    q_norm_weight: torch.Tensor | None,
    k_norm_weight: torch.Tensor | None,
    eps: float,
    rope_cos: torch.Tensor | None,
    rope_sin: torch.Tensor | None,
    norm_split: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`qk_norm_rope`'s dispatch for arguments already validated (by it, or by
    :func:`fused_attention`, whose checks cover the same ones): the kernel or the reference."""
    use_kernel = (
        q.dtype in KERNEL_DTYPES
        and q.shape[-1] % 2 == 0
        and not _needs_grad(q, k, q_norm_weight, k_norm_weight)
        and has_kernel("qk_norm_rope", q.device)
        and _arch_ok(q.device.type, q.device.index)
    )
    if use_kernel:
        return compiled_op("qk_norm_rope")(
            q, k, q_norm_weight, k_norm_weight, float(eps), rope_cos, rope_sin, int(norm_split)
        )
    return qk_norm_rope_reference(
        q,
        k,
        q_norm_weight=q_norm_weight,
        k_norm_weight=k_norm_weight,
        eps=eps,
        rope_cos=rope_cos,
        rope_sin=rope_sin,
        norm_split=norm_split,
    )


def fused_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    q_norm_weight: torch.Tensor | None = None,
    k_norm_weight: torch.Tensor | None = None,
    eps: float = 1e-6,
    rope_cos: torch.Tensor | None = None,
    rope_sin: torch.Tensor | None = None,
    norm_split: int = 0,
    key_padding_mask: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """softmax(scale * P(q) P(k)^T) v with P = optional per-head RMSNorm then RoPE.

    q: (B, H, Sq, D); k, v: (B, H, Sk, D); norm weights (D,) or (2, D) (see ``norm_split``);
    RoPE tables (Sq, D) (needs Sq == Sk); key_padding_mask: bool (B, Sk), True = attend.
    Returns (B, H, Sq, D) with (B, Sq, H, D)-contiguous memory. On CUDA in bf16/fp16: the
    qk_norm_rope kernel + torch SDPA, or (``DCGEN_ATTENTION_KERNEL=flash``, D in (64, 128), no
    gradient needed) dcgen's flash kernel with the prologue fused into its tile loads; the fp32
    reference elsewhere.
    """
    op = "fused_attention"
    _check_qkv(op, q=q, k=k, v=v)
    b, h, _, d = q.shape
    if k.shape[:2] != (b, h) or k.shape[-1] != d or v.shape != k.shape:
        raise ValueError(
            f"{op}: expected k and v of shape ({b}, {h}, Sk, {d}) (same as each other), got "
            f"{tuple(k.shape)} and {tuple(v.shape)}"
        )
    _check_prologue(op, q, k, q_norm_weight, k_norm_weight, eps, rope_cos, rope_sin, norm_split)
    if key_padding_mask is not None:
        check_tensor(f"{op}: key_padding_mask", key_padding_mask, ndim=2, dtypes=(torch.bool,))
        if tuple(key_padding_mask.shape) != (b, k.shape[2]):
            raise ValueError(
                f"{op}: expected key_padding_mask of shape ({b}, {k.shape[2]}) (B, Sk), got "
                f"{tuple(key_padding_mask.shape)}"
            )
    check_same_device(q=q, k=k, v=v, q_norm_weight=q_norm_weight, k_norm_weight=k_norm_weight,
                      rope_cos=rope_cos, rope_sin=rope_sin,
                      key_padding_mask=key_padding_mask)  # fmt: skip
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    use_kernel = (
        q.dtype in KERNEL_DTYPES
        and d in KERNEL_HEAD_DIMS
        and not _needs_grad(q, k, v, q_norm_weight, k_norm_weight)
        and has_kernel(op, q.device)
        and _arch_ok(q.device.type, q.device.index)
        and flash_kernel_selected()
    )
    if use_kernel:
        return compiled_op(op)(
            q, k, v, q_norm_weight, k_norm_weight, float(eps), rope_cos, rope_sin,
            int(norm_split), key_padding_mask, scale,
        )  # fmt: skip
    if q.is_cuda and q.dtype in KERNEL_DTYPES:
        # The default (see the module doc), and the path for head dims without a flash
        # configuration or when a gradient is needed: qk_norm_rope + SDPA.
        return _sdpa_attention(
            q, k, v, q_norm_weight, k_norm_weight, eps, rope_cos, rope_sin, norm_split,
            key_padding_mask, scale,
        )  # fmt: skip
    return fused_attention_reference(
        q,
        k,
        v,
        q_norm_weight=q_norm_weight,
        k_norm_weight=k_norm_weight,
        eps=eps,
        rope_cos=rope_cos,
        rope_sin=rope_sin,
        norm_split=norm_split,
        key_padding_mask=key_padding_mask,
        scale=scale,
    )


def _sdpa_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_norm_weight: torch.Tensor | None,
    k_norm_weight: torch.Tensor | None,
    eps: float,
    rope_cos: torch.Tensor | None,
    rope_sin: torch.Tensor | None,
    norm_split: int,
    key_padding_mask: torch.Tensor | None,
    scale: float,
) -> torch.Tensor:
    """qk_norm_rope (kernel when built) + SDPA in the input dtype, same output layout. The
    arguments were validated by :func:`fused_attention`: the prologue is not checked again."""
    if q_norm_weight is not None or k_norm_weight is not None or rope_cos is not None:
        q, k = _qk_norm_rope_checked(
            q, k, q_norm_weight, k_norm_weight, eps, rope_cos, rope_sin, norm_split
        )
    mask = None
    if key_padding_mask is not None:
        # A query that sees no key returns zeros (the spec). Rather than a pass over the output
        # (Sq rows), such batch elements attend every key of a zeroed v: both fixes touch only
        # (B, Sk)-sized data, small next to the output in SANA's cross-attention.
        seen = key_padding_mask.any(dim=-1)
        mask = (key_padding_mask | ~seen[:, None])[:, None, None, :]
        v = v * seen[:, None, None, None].to(v.dtype)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    # (B, S, H, D) memory; no copy where SDPA already wrote it so (q's layout, above)
    return _token_major(out)


# ---------------------------------------------------------------------------------------------
# Fake (meta) implementations: torch.compile traces the compiled ops without running them.
# Registered here (not in _fake.py) so this family stays in one module; only when dcgen._C is
# loaded and was built with these schemas.
# ---------------------------------------------------------------------------------------------


if has_schema("fused_attention") and has_schema("qk_norm_rope"):

    @torch.library.register_fake("dcgen::qk_norm_rope")
    def _qk_norm_rope_fake(q, k, q_weight, k_weight, eps, cos, sin, norm_split):  # noqa: ANN001
        # the kernel's layout: (B, H, S, D) sizes, (B, S, H, D) memory
        return tuple(t.new_empty((t.shape[0], t.shape[2], t.shape[1], t.shape[3])).transpose(1, 2)
                     for t in (q, k))  # fmt: skip

    @torch.library.register_fake("dcgen::fused_attention")
    def _fused_attention_fake(q, k, v, q_weight, k_weight, eps, cos, sin, norm_split, mask, scale):  # noqa: ANN001
        b, h, s, d = q.shape
        return q.new_empty((b, s, h, d)).transpose(1, 2)
