"""DiT block forwards with the elementwise glue fused (``accelerate(model, blocks=True)``).

diffusers' ``FluxTransformerBlock``, ``FluxSingleTransformerBlock`` and ``SanaTransformerBlock``
spend a large share of an eager step outside their GEMMs and attention: every AdaLN modulation
is a LayerNorm plus two passes, every gated residual two more, and FLUX's MLP tanh GELU one
more over its 4x-wide hidden state. These forwards compute the same function with

- :func:`dcgen.ops.adaln_modulate` for ``norm(x) * (1 + scale) + shift`` (one pass); where
  the linears that read the result are FP8 (row scales), :func:`dcgen.ops.adaln_modulate_fp8`
  instead, which also writes the result's FP8 row quantization, handed to those linears
  (``offered_quantization``) so that none runs its own quantize kernel over it (at 4K, 4,608 x
  3,072 values read once more per block input otherwise),
- :func:`dcgen.ops.gated_residual` for ``x + gate * y`` (one pass), both through their
  ``_trusted`` forms: these forwards build the arguments, so the kernels are called without
  the public functions' Python validation (host time counts in an eager step),
- the GELU in the MLP's first GEMM: cuBLAS's bias + GELU epilogue for a 16-bit nn.Linear
  (``torch._addmm_activation``), dcgen's FP8 scale epilogue for an FP8Linear (which, when the
  MLP's second linear is FP8 too, also writes the GELU output's FP8 row quantization for it:
  ``FP8Linear.forward_quantized``); any other layer (a LoRA wrapper, say) keeps
  ``gelu(proj(x))``;
- in inference, a single block's input ``[text, image]`` taken as it lies when the previous
  single block's output halves are passed in (views of one buffer), instead of ``torch.cat``;
- in inference, no ``torch.cat`` of the single block's ``proj_out`` input ``[attention, MLP]``
  (at 4K, 4,608 x 15,360 values read and written again per single block). A plain nn.Linear
  ``proj_out`` runs as one GEMM per half, each adding into the output (``linear_of_parts``:
  the MLP half keeps cuBLAS's fused bias + GELU, which a strided output would lose; one more
  rounding of a partial sum). Other layers (FP8, LoRA wrappers) get the two halves written
  into one buffer: the MLP's own epilogue writes its half (FP8Linear.forward_into) and
  attention is copied into the other; the same GEMM then reads it: same numbers;
- in inference, FLUX attention called through its processor directly when nothing else would
  run: diffusers' ``FluxAttention.forward`` takes ``inspect.signature`` of the processor on
  every call to filter keyword arguments (about 22 us of host time per call on this project's
  CPU, 57 calls per FLUX step), and with none to filter it only calls the processor.

Everything else (the modulation linears, attention through the module's own processor, the
output projections) is the module's own code. A block is only patched when its structure is
the one this code reads (``fusable``); ``restore`` puts the class forward back.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from dcgen._hooks import WeakForward, has_forward_hooks
from dcgen.ops import has_kernel
from dcgen.ops.modulation import (
    adaln_modulate_fp8_trusted,
    adaln_modulate_trusted,
    gated_residual_trusted,
)
from dcgen.quant.fp8_linear import (
    FP8Linear,
    offered_quantization,
    shared_quantization_scope,
    takes_fp8_rows,
)

from .linear_out import linear_gelu, linear_gelu_into, linear_of_parts, splits_over_parts

_PATCHED = "_dcgen_fused_block_forward"


def _plain_layer_norm(norm: nn.Module) -> bool:
    return isinstance(norm, nn.LayerNorm) and not norm.elementwise_affine and norm.bias is None


def _adaln_fusable(ada: nn.Module, chunks: int) -> bool:
    """AdaLayerNormZero(-Single) without its own timestep embedding, LayerNorm inside."""
    return (
        getattr(ada, "emb", None) is None
        and isinstance(getattr(ada, "linear", None), nn.Module)
        and _plain_layer_norm(getattr(ada, "norm", None))
        and getattr(ada.linear, "out_features", 0) % chunks == 0
    )


def _gelu_ff(ff: nn.Module) -> bool:
    """diffusers FeedForward with a tanh-GELU projection in front (FLUX's "gelu-approximate")."""
    net = getattr(ff, "net", None)
    if not isinstance(net, nn.ModuleList) or len(net) < 2:
        return False
    first = net[0]
    return (
        type(first).__name__ == "GELU"
        and getattr(first, "approximate", None) == "tanh"
        and isinstance(getattr(first, "proj", None), nn.Module)
    )


def fusable(block: nn.Module) -> bool:
    """Whether ``block`` is a FLUX double / single or SANA block in the layout these forwards
    read."""
    name = type(block).__name__
    if name == "FluxTransformerBlock":
        return (
            _adaln_fusable(block.norm1, 6)
            and _adaln_fusable(block.norm1_context, 6)
            and _plain_layer_norm(block.norm2)
            and _plain_layer_norm(block.norm2_context)
            and _gelu_ff(block.ff)
            and _gelu_ff(block.ff_context)
        )
    if name == "FluxSingleTransformerBlock":
        act = getattr(block, "act_mlp", None)
        return (
            _adaln_fusable(block.norm, 3) and isinstance(act, nn.GELU) and act.approximate == "tanh"
        )
    if name == "SanaTransformerBlock":
        table = getattr(block, "scale_shift_table", None)
        return (
            isinstance(table, torch.Tensor)
            and table.dim() == 2
            and table.shape[0] == 6
            and _plain_layer_norm(block.norm1)
            and _plain_layer_norm(block.norm2)
        )
    return False


def _feed_forward(ff: nn.Module, x: torch.Tensor) -> torch.Tensor:
    # ff.net is [GELU(proj), Dropout, Linear(, Dropout)]; not ff.net[1:], which builds a new
    # ModuleList (an nn.Module __init__) per call. An inactive Dropout (eval, or p = 0) is the
    # identity: skipped, it costs no module call.
    layers = [
        m for m in ff.net._modules.values()
        if not (isinstance(m, nn.Dropout) and (not m.training or m.p == 0))
    ]  # fmt: skip
    proj, rest = layers[0].proj, layers[1:]
    hq = None
    if (
        type(proj) is FP8Linear
        and not torch.is_grad_enabled()
        and not has_forward_hooks(proj)
        and any(takes_fp8_rows(layer) for layer in rest)
    ):
        # the second FP8 linear's input quantized by the first one's epilogue (module doc)
        h, hq = proj.forward_quantized(x, act="gelu_tanh")
    else:
        h = linear_gelu(proj, x)
    with offered_quantization(h, hq):
        for layer in rest:
            h = layer(h)
    return h


def _modulation(ada: nn.Module, temb: torch.Tensor, chunks: int) -> tuple[torch.Tensor, ...]:
    return ada.linear(ada.silu(temb)).chunk(chunks, dim=1)


def _modulate(
    reader: nn.Module | None, x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float
) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
    """``adaln_modulate(x, shift, scale)`` and, where ``reader`` (the first linear that reads
    it) is an FP8 row linear in inference, the result's row quantization from the same kernel,
    for :func:`offered_quantization`; None otherwise."""
    if (
        reader is not None
        and not torch.is_grad_enabled()
        and not torch.compiler.is_compiling()  # Inductor fuses the traced quantize itself
        and takes_fp8_rows(reader)
        # on a GPU only with the fused kernel: its reference is two passes of torch ops there
        and (not x.is_cuda or has_kernel("adaln_modulate_fp8", x.device))
    ):
        out, q, q_scales = adaln_modulate_fp8_trusted(x, shift, scale, eps)
        return out, (q, q_scales)
    return adaln_modulate_trusted(x, shift, scale, eps), None


def _first_projection(attn: nn.Module, context: bool = False) -> nn.Module | None:
    """The first linear a FLUX / SANA attention module applies to its (context) input."""
    if getattr(attn, "fused_projections", False):
        return getattr(attn, "to_added_qkv" if context else "to_qkv", None)
    return getattr(attn, "add_q_proj" if context else "to_q", None)


def _clip_fp16(x: torch.Tensor) -> torch.Tensor:
    return x.clip(-65504, 65504) if x.dtype == torch.float16 else x


def _flux_attention_forward() -> Any:
    """diffusers' FluxAttention.forward (None on a diffusers without that class)."""
    try:
        from diffusers.models.transformers.transformer_flux import FluxAttention
    except ImportError:  # pragma: no cover (older diffusers)
        return None
    return FluxAttention.forward


_FLUX_ATTENTION_FORWARD = _flux_attention_forward()
_NO_HOOKS = contextlib.nullcontext()  # the direct call's scope when nothing watches the module


def _attention(
    attn: nn.Module,
    hidden_states: torch.Tensor,
    encoder_hidden_states: torch.Tensor | None,
    image_rotary_emb: Any,
    kwargs: dict | None,
) -> Any:
    """``attn(...)`` as the stock block calls it; in inference with no keyword arguments, on a
    FluxAttention whose forward is the class's, the processor call that forward would make,
    without its per-call signature inspection (module doc), when it has no hooks or only FP8
    input sharing's two (then run in the scope they would open: quantized models have them on
    every FluxAttention, where the module call cost about 15 us of a double block's host time
    on this project's CPU)."""
    if (
        not kwargs
        and not torch.is_grad_enabled()
        and _FLUX_ATTENTION_FORWARD is not None
        and type(attn).forward is _FLUX_ATTENTION_FORWARD
        and "forward" not in attn.__dict__
    ):
        scope = _NO_HOOKS if not has_forward_hooks(attn) else shared_quantization_scope(attn)
        if scope is not None:
            with scope:
                return attn.processor(
                    attn, hidden_states, encoder_hidden_states, None, image_rotary_emb
                )
    extra = (
        {} if encoder_hidden_states is None else {"encoder_hidden_states": encoder_hidden_states}
    )
    return attn(
        hidden_states=hidden_states, image_rotary_emb=image_rotary_emb, **extra, **(kwargs or {})
    )


def double_block_forward(
    self: nn.Module,
    hidden_states: torch.Tensor,
    encoder_hidden_states: torch.Tensor,
    temb: torch.Tensor,
    image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
    joint_attention_kwargs: dict[str, Any] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """FluxTransformerBlock.forward (diffusers 0.42) with the glue fused (module doc)."""
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = _modulation(
        self.norm1, temb, 6
    )
    c_shift_msa, c_scale_msa, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = _modulation(
        self.norm1_context, temb, 6
    )
    norm_hidden, q_hidden = _modulate(
        _first_projection(self.attn), hidden_states, shift_msa, scale_msa, self.norm1.norm.eps
    )
    norm_context, q_context = _modulate(
        _first_projection(self.attn, context=True),
        encoder_hidden_states, c_shift_msa, c_scale_msa, self.norm1_context.norm.eps,
    )  # fmt: skip
    with offered_quantization(norm_hidden, q_hidden), offered_quantization(norm_context, q_context):
        outputs = _attention(
            self.attn, norm_hidden, norm_context, image_rotary_emb, joint_attention_kwargs
        )
    attn_output, context_attn_output = outputs[0], outputs[1]

    hidden_states = gated_residual_trusted(hidden_states, gate_msa, attn_output)
    norm_hidden, q_hidden = _modulate(
        self.ff.net[0].proj, hidden_states, shift_mlp, scale_mlp, self.norm2.eps
    )
    with offered_quantization(norm_hidden, q_hidden):
        ff_output = _feed_forward(self.ff, norm_hidden)
    hidden_states = gated_residual_trusted(hidden_states, gate_mlp, ff_output)
    if len(outputs) == 3:  # IP-Adapter output
        hidden_states = hidden_states + outputs[2]

    encoder_hidden_states = gated_residual_trusted(
        encoder_hidden_states, c_gate_msa, context_attn_output
    )
    norm_context, q_context = _modulate(
        self.ff_context.net[0].proj,
        encoder_hidden_states, c_shift_mlp, c_scale_mlp, self.norm2_context.eps,
    )  # fmt: skip
    with offered_quantization(norm_context, q_context):
        context_ff_output = _feed_forward(self.ff_context, norm_context)
    encoder_hidden_states = gated_residual_trusted(
        encoder_hidden_states, c_gate_mlp, context_ff_output
    )
    return _clip_fp16(encoder_hidden_states), hidden_states


def _joint_widths(block: nn.Module) -> tuple[int, int] | None:
    """(attention width, MLP width) of a single block's ``proj_out`` input, when its layers
    state them consistently (nn.Linear, FP8 / NVFP4 linears and peft's LoRA wrappers do)."""
    mlp = getattr(block.proj_mlp, "out_features", None)
    total = getattr(block.proj_out, "in_features", None)
    if not isinstance(mlp, int) or not isinstance(total, int) or not 0 < mlp < total:
        return None
    return total - mlp, mlp


def _adjacent_join(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor | None:
    """``torch.cat([first, second], dim=1)`` as a view, without a copy, when the two already
    lie one after the other in one buffer: the (text, image) halves a single block returns are
    views of its output, and the next single block joins them again (at 4K, 4,608 x 3,072
    values read and written per block for nothing). Inference only; None when they do not."""
    if torch.is_grad_enabled() or first.dim() != 3 or second.dim() != 3:
        return None
    b, t, d = first.shape
    if second.shape[0] != b or second.shape[2] != d or first.dtype != second.dtype:
        return None
    if first.device != second.device or first.stride() != second.stride():
        return None
    total = t + second.shape[1]
    if first.stride()[1:] != (d, 1) or (b > 1 and first.stride(0) != total * d):
        return None
    storage = first.untyped_storage()
    if storage.data_ptr() != second.untyped_storage().data_ptr():
        return None
    if second.storage_offset() != first.storage_offset() + t * d:
        return None
    return first.as_strided((b, total, d), (total * d, d, 1), first.storage_offset())


def single_block_forward(
    self: nn.Module,
    hidden_states: torch.Tensor,
    encoder_hidden_states: torch.Tensor,
    temb: torch.Tensor,
    image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
    joint_attention_kwargs: dict[str, Any] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """FluxSingleTransformerBlock.forward (diffusers 0.42) with the glue fused (module doc)."""
    text_len = encoder_hidden_states.shape[1]
    residual = _adjacent_join(encoder_hidden_states, hidden_states)
    if residual is None:
        residual = torch.cat([encoder_hidden_states, hidden_states], dim=1)
    shift, scale, gate = _modulation(self.norm, temb, 3)
    # the MLP reads the modulated input first, then q / k / v
    norm_hidden, q_hidden = _modulate(self.proj_mlp, residual, shift, scale, self.norm.norm.eps)
    with offered_quantization(norm_hidden, q_hidden):
        out = _single_block_mixing(self, norm_hidden, image_rotary_emb, joint_attention_kwargs)
    hidden_states = _clip_fp16(gated_residual_trusted(residual, gate, out))
    return hidden_states[:, :text_len], hidden_states[:, text_len:]


def _single_block_mixing(
    self: nn.Module,
    norm_hidden: torch.Tensor,
    image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None,
    joint_attention_kwargs: dict[str, Any] | None,
) -> torch.Tensor:
    """``proj_out([attention(x), gelu(proj_mlp(x))])`` of a FLUX single block, x modulated:
    with a plain proj_out one GEMM per half (linear_of_parts), else (FP8, LoRA wrappers) the
    two halves written into one [attention | MLP] buffer that proj_out reads whole."""
    attention_kwargs = joint_attention_kwargs or {}
    widths = _joint_widths(self)
    # A plain proj_out in inference: one GEMM per half (linear_of_parts), so the MLP half keeps
    # cuBLAS's fused bias + GELU and neither half is copied into a joint buffer.
    split = widths is not None and splits_over_parts(self.proj_out, norm_hidden)
    if split or torch.is_grad_enabled() or widths is None:  # autograd: out= has no derivative
        mlp_hidden = linear_gelu(self.proj_mlp, norm_hidden)
        attn_output = _attention(self.attn, norm_hidden, None, image_rotary_emb, attention_kwargs)
        if split:
            out = linear_of_parts(self.proj_out, (attn_output, mlp_hidden))
        else:
            out = self.proj_out(torch.cat([attn_output, mlp_hidden], dim=2))
    else:
        # [attention | MLP] assembled in one buffer (module doc); proj_out reads it whole.
        attn_width, mlp_width = widths
        joint = norm_hidden.new_empty(*norm_hidden.shape[:-1], attn_width + mlp_width)
        linear_gelu_into(self.proj_mlp, norm_hidden, joint[..., attn_width:])
        attn_output = _attention(self.attn, norm_hidden, None, image_rotary_emb, attention_kwargs)
        joint[..., :attn_width].copy_(attn_output)
        out = self.proj_out(joint)
    return out


def sana_block_forward(
    self: nn.Module,
    hidden_states: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    encoder_hidden_states: torch.Tensor | None = None,
    encoder_attention_mask: torch.Tensor | None = None,
    timestep: torch.Tensor | None = None,
    height: int | None = None,
    width: int | None = None,
) -> torch.Tensor:
    """SanaTransformerBlock.forward (diffusers 0.42) with the glue fused (module doc)."""
    b = hidden_states.shape[0]
    table = self.scale_shift_table[None] + timestep.reshape(b, 6, -1)
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = table.unbind(1)  # (B, D)
    norm_hidden, q_hidden = _modulate(
        _first_projection(self.attn1), hidden_states, shift_msa, scale_msa, self.norm1.eps
    )
    with offered_quantization(norm_hidden, q_hidden):
        attn_output = self.attn1(norm_hidden)
    hidden_states = gated_residual_trusted(hidden_states, gate_msa, attn_output)
    if self.attn2 is not None:
        attn_output = self.attn2(
            hidden_states,
            encoder_hidden_states=encoder_hidden_states,
            attention_mask=encoder_attention_mask,
        )
        hidden_states = attn_output + hidden_states
    norm_hidden = adaln_modulate_trusted(hidden_states, shift_mlp, scale_mlp, self.norm2.eps)
    # GLUMBConv on the token grid as an NCHW view of NHWC memory, as diffusers does.
    ff_output = self.ff(norm_hidden.unflatten(1, (height, width)).permute(0, 3, 1, 2))
    ff_output = ff_output.flatten(2, 3).permute(0, 2, 1)
    return gated_residual_trusted(hidden_states, gate_mlp, ff_output.to(hidden_states.dtype))


_FORWARDS = {
    "FluxTransformerBlock": double_block_forward,
    "FluxSingleTransformerBlock": single_block_forward,
    "SanaTransformerBlock": sana_block_forward,
}


def _unpatched(model: nn.Module) -> Iterator[nn.Module]:
    """The fusable DiT blocks of ``model`` that :func:`install` has not patched yet."""
    for module in model.modules():
        if type(module).__name__ in _FORWARDS and _PATCHED not in module.__dict__:
            if fusable(module):
                yield module


def install(model: nn.Module) -> int:
    """Patch every fusable DiT block of ``model`` (idempotent); returns how many."""
    count = 0
    for module in _unpatched(model):
        module.__dict__[_PATCHED] = True
        # not a bound method: a pickled bound method is looked up by name on the block at load
        # time (torch.save(model) wrote files torch.load could not read); a weak one, no
        # partial: the block would hold itself (del model then freed no weight)
        module.forward = WeakForward(_FORWARDS[type(module).__name__], module)
        count += 1
    return count


def pending(model: nn.Module) -> bool:
    """True when :func:`install` would patch at least one block of ``model``."""
    return next(_unpatched(model), None) is not None


def restore(model: nn.Module) -> int:
    """Undo :func:`install`; returns how many blocks it restored."""
    count = 0
    for module in model.modules():
        if module.__dict__.pop(_PATCHED, None):
            del module.forward  # the instance attribute; the class forward shows again
            count += 1
    return count


def is_installed(model: nn.Module) -> bool:
    return any(_PATCHED in m.__dict__ for m in model.modules())
