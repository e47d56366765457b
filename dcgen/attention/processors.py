"""Attention processors that run dcgen.ops.fused_attention inside diffusers' attention modules.

They keep diffusers' processor call signatures and return values, so a transformer behaves
exactly as with the stock processors; only the norm + RoPE + attention step changes:

- FLUX (``FluxAttention``): the stock processor runs RMSNorm on q and k, concatenates text and
  image tokens, applies RoPE and calls SDPA, each a full pass over q and k. Here the norms
  (text tokens with ``norm_added_*``, image tokens with ``norm_*``, selected by ``norm_split``)
  and RoPE run inside the attention kernel's tile loads.
- SANA cross-attention (``Attention`` with ``SanaAttnProcessor2_0``): the caption padding mask,
  which SANA turns into an additive bias of 0 / -10000, becomes a boolean key-padding mask.
- SANA self-attention (``SanaLinearAttnProcessor2_0``, ReLU linear attention): diffusers runs
  it as transposes, an fp32 copy of q, k and v, a padded v and two fp32 matmuls; here q, k and v
  are packed once into the per-head [q | k | v] layout of :func:`dcgen.ops.relu_linear_attention`
  (the DC-AE's LiteMLA op: fp32 sums, one kernel pair).

Inputs the fused path does not cover go to the stock processor: FLUX with an attention mask,
SANA with a mask that is not one row per batch element.
"""

from __future__ import annotations

import weakref

import torch
from torch import nn

from dcgen.ops.attention import KERNEL_HEAD_DIMS, flash_kernel_selected, fused_attention
from dcgen.ops.linear_attention import relu_linear_attention

from .linear_out import linear_into

SANA_LINEAR_EPS = 1e-15  # diffusers' SanaLinearAttnProcessor2_0


def _norm_params(norm: torch.nn.Module, dim: int, like: torch.Tensor) -> tuple[torch.Tensor, float]:
    """(weight, eps) of a torch / diffusers RMSNorm; no affine weight acts as ones."""
    weight = getattr(norm, "weight", None)
    if weight is None:
        weight = torch.ones(dim, device=like.device, dtype=torch.float32)
    eps = getattr(norm, "eps", None)
    if eps is None:  # torch.nn.RMSNorm(eps=None) uses the input dtype's machine epsilon
        eps = torch.finfo(like.dtype).eps
    return weight, float(eps)


def _heads(x: torch.Tensor, head_dim: int) -> torch.Tensor:
    """(B, S, H * D) -> (B, S, H, D) view."""
    return x.unflatten(-1, (-1, head_dim))


def _joint_projections(
    text_projs: tuple[nn.Module, ...],
    image_projs: tuple[nn.Module, ...],
    text: torch.Tensor,
    image: torch.Tensor,
) -> list[torch.Tensor]:
    """``torch.cat([t(text), i(image)], dim=1)`` (B, T + S, N) for each pair of projections,
    each assembled in one buffer that the GEMMs write their rows of (inference). The image
    projections run first, then the text ones, as diffusers calls them (so an FP8 input
    quantized for one of them is reused by the next: fp8_linear's shared quantization). Layers
    that do not state one width, and autocast, are concatenated as before."""
    widths = [getattr(p, "out_features", None) for p in image_projs]
    same = all(
        isinstance(n, int) and getattr(t, "out_features", None) == n
        for n, t in zip(widths, text_projs, strict=True)
    )
    # under autocast the output dtype is autocast's, not the input's: let cat decide it
    if not same or torch.is_autocast_enabled(image.device.type):
        image_out = [p(image) for p in image_projs]
        text_out = [p(text) for p in text_projs]
        return [torch.cat(pair, dim=1) for pair in zip(text_out, image_out, strict=True)]
    b, t = text.shape[:2]
    outs = [image.new_empty(b, t + image.shape[1], n) for n in widths]
    for proj, out in zip(image_projs, outs, strict=True):
        linear_into(proj, image, out[:, t:])
    for proj, out in zip(text_projs, outs, strict=True):
        linear_into(proj, text, out[:, :t])
    return outs


# attention module -> {"q" / "k": cache entry}; outside the module so pickling a model (torch.save
# of a whole pipeline) never meets the entries' weak references, and gone with the module.
_JOINT_NORM_CACHE: weakref.WeakKeyDictionary[nn.Module, dict] = weakref.WeakKeyDictionary()


def _joint_norm_weight(
    attn: nn.Module, name: str, text_weight: torch.Tensor, image_weight: torch.Tensor
) -> torch.Tensor:
    """The (2, D) norm weight of a joint sequence, [text row, image row]. In inference it is
    kept on ``attn`` while both rows are the same tensors, at the same address and unchanged in
    place, instead of stacked on every call (a kernel launch and some microseconds of host time
    each, two per double block). A write through ``weight.data`` bypasses the version counter
    and is not seen: :func:`clear_joint_norm_cache` after such writes."""
    cacheable = not (
        torch.is_grad_enabled()
        or torch.compiler.is_compiling()
        or text_weight.is_inference()  # no version counter to tell an in-place update
        or image_weight.is_inference()
        # a CUDA graph being captured stacks them itself: its replays must not read a cached
        # tensor that clear_joint_norm_cache (or a new weight) may free
        or (image_weight.is_cuda and torch.cuda.is_current_stream_capturing())
    )
    if not cacheable:
        return torch.stack([text_weight.to(image_weight.dtype), image_weight])
    key = tuple((w.data_ptr(), w._version) for w in (text_weight, image_weight))
    cache = _JOINT_NORM_CACHE.setdefault(attn, {})
    hit = cache.get(name)
    if hit is not None and hit[0]() is text_weight and hit[1]() is image_weight and hit[2] == key:
        return hit[3]
    stacked = torch.stack([text_weight.to(image_weight.dtype), image_weight])
    cache[name] = (weakref.ref(text_weight), weakref.ref(image_weight), key, stacked)
    return stacked


def clear_joint_norm_cache() -> None:
    """Forget every stacked joint norm weight (after weights were written through ``.data``,
    which no version counter records)."""
    _JOINT_NORM_CACHE.clear()


class FluxFusedAttnProcessor:
    """Drop-in for diffusers' ``FluxAttnProcessor`` (double blocks: joint text + image; single
    blocks: one concatenated sequence) on dcgen's fused attention."""

    def __init__(self) -> None:
        from diffusers.models.transformers.transformer_flux import FluxAttnProcessor

        self._stock = FluxAttnProcessor()

    def __call__(
        self,
        attn: torch.nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if attention_mask is not None:  # arbitrary masks are not a key-padding mask
            return self._stock(
                attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb
            )
        d = attn.head_dim
        joint = encoder_hidden_states is not None and attn.added_kv_proj_dim is not None
        norm_split = 0
        if (
            joint
            and not attn.fused_projections
            and not torch.is_grad_enabled()
            and not torch.compiler.is_compiling()  # Inductor plans the concatenation itself
        ):
            # [text, image] rows of one buffer per projection, each GEMM writing its own rows
            # (linear_out.linear_into): no concatenation pass over q, k and v.
            q, k, v = _joint_projections(
                (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj),
                (attn.to_q, attn.to_k, attn.to_v),
                encoder_hidden_states,
                hidden_states,
            )
            q, k, v = _heads(q, d), _heads(k, d), _heads(v, d)
            norm_split = encoder_hidden_states.shape[1]  # the text tokens keep their own norms
        else:
            if attn.fused_projections:
                q, k, v = attn.to_qkv(hidden_states).chunk(3, dim=-1)
            else:
                q = attn.to_q(hidden_states)
                k, v = attn.to_k(hidden_states), attn.to_v(hidden_states)
            q, k, v = _heads(q, d), _heads(k, d), _heads(v, d)  # (B, S, H, D) views
            if joint:
                if attn.fused_projections:
                    eq, ek, ev = attn.to_added_qkv(encoder_hidden_states).chunk(3, dim=-1)
                else:
                    eq = attn.add_q_proj(encoder_hidden_states)
                    ek = attn.add_k_proj(encoder_hidden_states)
                    ev = attn.add_v_proj(encoder_hidden_states)
                eq, ek, ev = _heads(eq, d), _heads(ek, d), _heads(ev, d)
                # Text first, as diffusers concatenates; the text tokens keep their own norms.
                norm_split = eq.shape[1]
                q = torch.cat([eq, q], dim=1)
                k = torch.cat([ek, k], dim=1)
                v = torch.cat([ev, v], dim=1)

        q_weight, eps = _norm_params(attn.norm_q, d, q)
        k_weight, _ = _norm_params(attn.norm_k, d, k)
        if joint:
            aq, _ = _norm_params(attn.norm_added_q, d, q)
            ak, _ = _norm_params(attn.norm_added_k, d, k)
            q_weight = _joint_norm_weight(attn, "q", aq, q_weight)
            k_weight = _joint_norm_weight(attn, "k", ak, k_weight)

        cos = sin = None
        if image_rotary_emb is not None:
            cos, sin = image_rotary_emb
        out = fused_attention(
            q.transpose(1, 2),
            k.transpose(1, 2),
            v.transpose(1, 2),
            q_norm_weight=q_weight,
            k_norm_weight=k_weight,
            eps=eps,
            rope_cos=cos,
            rope_sin=sin,
            norm_split=norm_split,
        )
        hidden = out.transpose(1, 2).flatten(2, 3)  # (B, S, H * D); free: out is BSHD memory

        if encoder_hidden_states is not None:
            n_text = encoder_hidden_states.shape[1]
            encoder_out, hidden = hidden.split_with_sizes([n_text, hidden.shape[1] - n_text], dim=1)
            hidden = attn.to_out[1](attn.to_out[0](hidden.contiguous()))
            encoder_out = attn.to_add_out(encoder_out.contiguous())
            return hidden, encoder_out
        return hidden


def _sana_projections(
    attn: torch.nn.Module, hidden_states: torch.Tensor, context: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v of a SANA attention, q / k normed when configured (SANA's q/k norms span all
    heads: they stay in PyTorch, unfused)."""
    q = attn.to_q(hidden_states)
    k = attn.to_k(context)
    v = attn.to_v(context)
    if attn.norm_q is not None:
        q = attn.norm_q(q)
    if attn.norm_k is not None:
        k = attn.norm_k(k)
    return q, k, v


def _key_padding(mask: torch.Tensor, batch: int, keys: int) -> torch.Tensor | None:
    """SANA's (B, 1, Sk) additive bias (0 keep, -10000 drop) or a bool mask -> bool (B, Sk);
    None when the mask is not one key row per batch element."""
    if mask.ndim == 3 and mask.shape[1] == 1:
        mask = mask[:, 0]
    if mask.ndim != 2 or tuple(mask.shape) != (batch, keys):
        return None
    return mask if mask.dtype == torch.bool else mask > -1.0


class SanaFusedCrossAttnProcessor:
    """Drop-in for diffusers' ``SanaAttnProcessor2_0`` (SANA's cross-attention to the caption).

    SANA's q / k norms span all heads and it has no RoPE, so the only thing dcgen adds here is
    its flash kernel with a key-padding mask. Where that kernel would not run (not CUDA, the
    default ``DCGEN_ATTENTION_KERNEL=sdpa`` path, or a head dim without a flash configuration,
    such as SANA-1.6B's 32) the call goes straight to the stock processor: the fused path would
    only add the mask conversion and checks in front of the same SDPA call, a cost measured as
    host overhead at SANA's small token counts. ``always_fused = True`` takes the fused path
    anyway (tests: its mask handling on the reference).

    Differences of the fused path from the stock processor, both outside what SANA produces: a
    mask is read as key padding (bias entries > -1 attend), and a query that sees no key
    returns zeros where the stock additive -10000 bias would average over the padded keys.
    """

    always_fused = False

    def __init__(self) -> None:
        from diffusers.models.transformers.sana_transformer import SanaAttnProcessor2_0

        self._stock = SanaAttnProcessor2_0()

    def _fused_pays(self, attn: torch.nn.Module, hidden_states: torch.Tensor) -> bool:
        if self.always_fused:
            return True
        head_dim = getattr(attn, "inner_kv_dim", attn.inner_dim) // attn.heads
        return hidden_states.is_cuda and head_dim in KERNEL_HEAD_DIMS and flash_kernel_selected()

    def __call__(
        self,
        attn: torch.nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if not self._fused_pays(attn, hidden_states):
            return self._stock(attn, hidden_states, encoder_hidden_states, attention_mask)
        batch = hidden_states.shape[0]
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        keep = None
        if attention_mask is not None:
            keep = _key_padding(attention_mask, batch, context.shape[1])
            if keep is None:
                return self._stock(attn, hidden_states, encoder_hidden_states, attention_mask)

        q, k, v = _sana_projections(attn, hidden_states, context)
        d = k.shape[-1] // attn.heads
        out = fused_attention(
            _heads(q, d).transpose(1, 2),
            _heads(k, d).transpose(1, 2),
            _heads(v, d).transpose(1, 2),
            key_padding_mask=keep,
        )
        hidden = out.transpose(1, 2).flatten(2, 3).to(q.dtype)
        hidden = attn.to_out[1](attn.to_out[0](hidden))
        return hidden / attn.rescale_output_factor


class SanaFusedLinearAttnProcessor:
    """Drop-in for diffusers' ``SanaLinearAttnProcessor2_0`` (SANA's self-attention) on
    :func:`dcgen.ops.relu_linear_attention`. Inputs it does not cover (a mask, or keys of
    another length than the queries) go to the stock processor."""

    def __init__(self) -> None:
        from diffusers.models.attention_processor import SanaLinearAttnProcessor2_0

        self._stock = SanaLinearAttnProcessor2_0()

    def __call__(
        self,
        attn: torch.nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        if attention_mask is not None or context.shape[1] != hidden_states.shape[1]:
            return self._stock(attn, hidden_states, encoder_hidden_states, attention_mask)
        dtype = hidden_states.dtype
        q, k, v = _sana_projections(attn, hidden_states, context)
        b, n, c = q.shape
        h = attn.heads
        # (B, N, H, 3, d) -> (B, H, 3d, N): per head [q | k | v] rows over the N tokens.
        qkv = torch.stack([t.unflatten(-1, (h, -1)) for t in (q, k, v)], dim=3)
        qkv = qkv.permute(0, 2, 3, 4, 1).reshape(b, h, -1, n)
        out = relu_linear_attention(qkv, SANA_LINEAR_EPS)  # (B, H, d, N)
        hidden = out.flatten(1, 2).transpose(1, 2).to(dtype)  # (B, N, C)
        hidden = attn.to_out[1](attn.to_out[0](hidden))
        if dtype == torch.float16:
            hidden = hidden.clip(-65504, 65504)
        return hidden
