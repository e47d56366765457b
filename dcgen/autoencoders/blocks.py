"""DC-AE building blocks (docs/method.md section 3), numerically matching diffusers' AutoencoderDC.

Parameter names are dcgen's own; checkpoint.py maps them to diffusers' and to the original
mit-han-lab names. The one layout difference that matters: LiteMLA keeps the original fused
1x1 ``qkv`` conv (per-head interleaved [q_h | k_h | v_h] channels), where diffusers stores its
three contiguous thirds as ``to_q`` / ``to_k`` / ``to_v`` (which are therefore NOT the queries,
keys and values).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from dcgen._hooks import has_forward_hooks
from dcgen.ops import (
    bias_act_,
    channel_duplicate_to_space,
    down_block_shortcut,
    glu_depthwise_conv,
    has_kernel,
    relu_linear_attention,
    space_to_channel_average,
    up_block_shortcut,
)
from dcgen.ops._validate import kernel_layout
from dcgen.ops.linear_attention import token_major

from .._env import env_flag
from .fused import can_modify_in_place, use_fused
from .norms import (
    ChannelRMSNorm,
    apply_act_inplace,
    fold_batchnorm_into_conv,
    folded_conv_bn_weights,
    fusable_act_name,
    make_act,
    make_norm,
)
from .row_bands import conv3x3_rows, overwrite_bands, row_bands

logger = logging.getLogger(__name__)

LINEAR_ATTENTION_EPS = 1e-15


def _bias_act_kernel(x: torch.Tensor) -> bool:
    """Whether the blocks hand their convolutions' bias (with the activation or the residual)
    to bias_act_: on the fused path and only where its kernel exists (its reference would add
    fp32 temporaries of a full map where the plain path adds in place)."""
    return use_fused(x, "bias_act_") and has_kernel("bias_act_", x.device)


#: ResBlocks whose activation is ReLU run conv1 + bias + ReLU as one cuDNN fused convolution
#: (torch.cudnn_convolution_relu) instead of the convolution then a bias_act_ pass; "0" in
#: this variable turns it off. Default since the H200 run of 2026-11-28 checked both
#: conditions: NaN-safe (torch passes the op's own fresh output as cuDNN's z input scaled by
#: 0, and 0 * NaN is NaN if cuDNN reads it: tests/ops/test_bias_act.py poisons the allocator
#: and saw no NaN), and faster (benchmarks/test_dcae_fused.py: 7.06 ms against 7.87 ms for
#: conv + bias_act_ at (1, 256, 2048, 2048) channels_last bf16). f64c128's 4K decode runs 15
#: such conv1s, whose bias_act_ passes took 13.9 ms in the same run's profile.
CUDNN_CONV_RELU_ENV = "DCGEN_DCAE_CUDNN_CONV_RELU"


def _cudnn_conv_relu(x: torch.Tensor, conv: nn.Conv2d) -> bool:
    """Whether conv1 + bias + ReLU runs as one cuDNN fused convolution (see
    CUDNN_CONV_RELU_ENV): not opted out, a CUDA input in 16 bits with cuDNN on, a plain
    zero-padded convolution with a bias of the input's dtype."""
    return (
        x.is_cuda
        and x.dtype in (torch.float16, torch.bfloat16)
        and torch.backends.cudnn.is_available()
        and torch.backends.cudnn.enabled
        and conv.padding_mode == "zeros"
        and isinstance(conv.padding, tuple)
        and conv.bias is not None
        and conv.bias.dtype == x.dtype
        and conv.weight.dtype == x.dtype
        and env_flag(CUDNN_CONV_RELU_ENV, True)
    )


def _split_conv_bias(x: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """Whether a fused block runs a convolution without its bias and adds the bias itself with
    bias_act_ (one vectorized pass in place; PyTorch's own add after a cuDNN convolution is a
    broadcast add that does not vectorize)."""
    return bias is not None and can_modify_in_place() and _bias_act_kernel(x)


def _shortcut_writes_out(x: torch.Tensor) -> bool:
    """Whether a fused up block hands its conv bias (and, banded, its output rows) to
    up_block_shortcut's out kernel: where that kernel exists, it adds the bias while it
    shuffles and writes the rows in place, instead of a bias_act_ pass over the conv output and
    a copy of each band (the 4K decodes' banded up blocks: about 13 GB of f64c128's and 30 GB
    of SANA's memory traffic, by count of bytes)."""
    return has_kernel("up_block_shortcut_out", x.device)


def _residual_norm(x: torch.Tensor, norm: nn.Module, h: torch.Tensor) -> torch.Tensor:
    """x + norm(h), the ending of ResBlock, LiteMLA and GLUMBConv. Fused path: RMSNorm and the
    add in one op, or (norm folded away) an in-place add into the fresh h."""
    if isinstance(norm, ChannelRMSNorm):
        if use_fused(x, "channel_rms_norm_fused"):
            return norm.fused(h, residual=x)
    elif (
        isinstance(norm, nn.Identity)
        and can_modify_in_place()
        and use_fused(x, "channel_rms_norm_fused")
    ):
        return h.add_(x)
    return x + norm(h)


def nearest_up_conv_as_subpixel(
    weight: torch.Tensor, bias: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Weights of a conv on x whose pixel_shuffle(., 2) equals conv3x3(nearest_x2(x)).

    Output sub-pixel (i, j) of input pixel (h, w) sees upsampled rows 2h+i-1 .. 2h+i+1, i.e.
    input rows {h-1: w[-1], h: w[0]+w[1]} for i = 0 and {h: w[-1]+w[0], h+1: w[1]} for i = 1
    (the same for columns), so each phase is a 3x3 conv of x with summed taps; zero padding
    maps to zero padding. Result: (4*Cout, Cin, 3, 3) in pixel_shuffle's channel order
    4*c + 2*i + j, and the bias repeated per phase. Same FLOPs as the original conv but it never
    materialises the 4x larger upsampled input. Sums run in fp32 and are rounded once.
    """
    cout, cin = weight.shape[:2]
    w = weight.to(torch.promote_types(weight.dtype, torch.float32))
    # rows[i]: the 3 row taps of phase i on input rows h-1, h, h+1 (then the same for columns)
    zero = torch.zeros_like(w[:, :, :1])
    rows = [
        torch.cat([w[:, :, :1], w[:, :, 1:2] + w[:, :, 2:3], zero], dim=2),
        torch.cat([zero, w[:, :, :1] + w[:, :, 1:2], w[:, :, 2:3]], dim=2),
    ]
    phases = []
    for r in rows:
        zc = torch.zeros_like(r[..., :1])
        phases.append(torch.cat([r[..., :1], r[..., 1:2] + r[..., 2:3], zc], dim=3))  # j = 0
        phases.append(torch.cat([zc, r[..., :1] + r[..., 1:2], r[..., 2:3]], dim=3))  # j = 1
    # (4 phases, Cout, Cin, 3, 3) -> channel 4*c + phase
    sub = torch.stack(phases, dim=1).reshape(4 * cout, cin, 3, 3).to(weight.dtype)
    sub_bias = None if bias is None else bias.repeat_interleave(4)
    return sub, sub_bias


def _version_key(*tensors: torch.Tensor | None) -> tuple | None:
    """Changes whenever any tensor is replaced, updated in place, cast or re-laid out. None
    when one is an inference tensor: it has no version counter, so nothing derived from it can
    be cached (the caller recomputes). Writes through ``.data`` bypass the version counter too:
    after those, call ``DCAE.clear_caches()``."""
    present = [t for t in tensors if t is not None]
    if any(t.is_inference() for t in present):
        return None
    return tuple((t.data_ptr(), t._version, t.dtype, t.stride()) for t in present)


def _layout_of(y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``y`` in ``x``'s memory format: CUDA's pixel_(un)shuffle returns NCHW even for NHWC
    input (CPU keeps NHWC), and the next conv and residual would each convert it back."""
    if not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return y.contiguous(memory_format=torch.channels_last)
    return y


def _cached(
    slot: tuple[tuple, Any] | None, key: tuple | None, make: Callable[[], Any]
) -> tuple[tuple[tuple, Any] | None, Any]:
    """(the new cache slot, the value): ``slot``'s value while its key is ``key``, else
    ``make()``; uncacheable (``key`` None) values are returned without being kept."""
    if key is None:
        return None, make()
    if slot is None or slot[0] != key:
        slot = (key, make())
    return slot, slot[1]


def _fold_norm(conv: nn.Conv2d, norm: nn.Module) -> tuple[nn.Conv2d, nn.Module, bool]:
    """(conv, norm, whether folded): a BatchNorm folded into the conv before it, unless the
    folded weights overflow the conv's dtype (then both are kept, with a warning)."""
    if not isinstance(norm, nn.BatchNorm2d):
        return conv, norm, False
    folded = fold_batchnorm_into_conv(conv, norm)
    if folded is None:
        logger.warning(
            "fold_batchnorm: kept a BatchNorm whose folded weights overflow %s (extreme running "
            "statistics); its block runs the norm instead",
            conv.weight.dtype,
        )
        return conv, norm, False
    return folded, nn.Identity(), True


class ResBlock(nn.Module):
    """x + norm(conv3x3_nobias(act(conv3x3(x))))."""

    def __init__(self, channels: int, norm_type: str, act_fn: str) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.act = make_act(act_fn)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.norm = make_norm(norm_type, channels)
        self._folded: tuple[tuple, tuple[torch.Tensor, torch.Tensor]] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fused = use_fused(x, "channel_rms_norm_fused")
        bias_act = fused and can_modify_in_place() and _bias_act_kernel(x)
        h = self._conv1_act(x) if bias_act else None
        if h is None:
            h = self.conv1(x)
            if can_modify_in_place() and fused:
                h = apply_act_inplace(self.act, h)  # no second conv1-sized buffer
            else:
                h = self.act(h)
        folded = self._folded_norm() if fused else None
        if fused and (folded is not None or isinstance(self.norm, (ChannelRMSNorm, nn.Identity))):
            bands = overwrite_bands(self, x)
            if bands is not None:
                return self._conv2_into_input(x, h, bands, folded)
        if folded is not None:
            # BatchNorm folded into conv2 on the fly: no norm pass, and the residual lands in
            # place in conv2's fresh output. The module keeps its BatchNorm (and its checkpoint
            # format); the folded weights are cached until any of them changes.
            weight, bias = folded
            if bias_act:  # the folded bias and the residual in one pass (bias_act_)
                h = F.conv2d(h, weight, None, padding=1)
                return bias_act_(h, h, bias, "none", x)
            h = F.conv2d(h, weight, bias, padding=1)
            return h.add_(x)
        h = self.conv2(h)  # rebinding frees conv1's output before the norm allocates its own
        return _residual_norm(x, self.norm, h)

    def _conv1_act(self, x: torch.Tensor) -> torch.Tensor | None:
        """act(conv1(x)) with conv1 run without its bias, and the bias and the activation
        applied in place by one bias_act_ pass (PyTorch's own bias add after a cuDNN
        convolution is a broadcast add that never vectorizes); None where that form does not
        apply (no bias, or an activation bias_act_ lacks)."""
        conv, act = self.conv1, fusable_act_name(self.act)
        if act is None or conv.bias is None:
            return None
        if act == "relu" and _cudnn_conv_relu(x, conv):
            # one cuDNN pass (see CUDNN_CONV_RELU_ENV): conv + bias + ReLU in fp32,
            # rounded once (the two-kernel form rounds the convolution first: 1 bf16 ulp apart)
            return torch.cudnn_convolution_relu(
                x, conv.weight, conv.bias, conv.stride, conv.padding, conv.dilation, conv.groups
            )
        h = conv._conv_forward(x, conv.weight, None)
        return bias_act_(h, h, conv.bias, act)

    def _conv2_into_input(
        self,
        x: torch.Tensor,
        h: torch.Tensor,
        bands: list[tuple[int, int, int]],
        folded: tuple[torch.Tensor, torch.Tensor] | None,
    ) -> torch.Tensor:
        """The residual ending written into x, one band of conv2's output rows at a time
        (row_bands.py): x and act(conv1(x)) plus one band alive, instead of three full maps.
        Same rounding as the unbanded path: conv2's output is rounded, then normalised with the
        residual in one op (RMSNorm) or added to x (BatchNorm folded into conv2, or none)."""
        weight, bias = folded if folded is not None else (self.conv2.weight, self.conv2.bias)
        rms = isinstance(self.norm, ChannelRMSNorm)
        for i, a, b in bands:
            xb = x[i : i + 1, :, a:b]
            if not rms and _split_conv_bias(x, bias):
                # the bias and the residual in one pass, written into x's band (bias_act_)
                t = conv3x3_rows(h[i : i + 1], weight, None, a, b)
                bias_act_(xb, t, bias, "none", xb)
                del t
                continue
            t = conv3x3_rows(h[i : i + 1], weight, bias, a, b)
            if rms:
                self.norm.fused(t, residual=xb, out=xb)  # written into x's band, no copy
            else:
                xb.add_(t)
            del t
        return x

    def _folded_norm(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """conv2's weights with the BatchNorm folded in, where folding changes nothing but
        rounding: inference with BatchNorm's running statistics (training, or recording
        gradients, keeps the BatchNorm), and folded weights that fit conv2's dtype."""
        bn = self.norm
        if (
            isinstance(bn, nn.BatchNorm2d)
            and not bn.training
            and bn.running_mean is not None
            and can_modify_in_place()
        ):
            return self._folded_conv2()
        return None

    def _folded_conv2(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """conv2's weight and bias with the BatchNorm folded in (cached), or None where they
        overflow conv2's dtype."""
        bn, conv = self.norm, self.conv2
        key = _version_key(
            conv.weight, conv.bias, bn.weight, bn.bias, bn.running_mean, bn.running_var
        )

        def make() -> tuple[torch.Tensor, torch.Tensor] | None:
            folded = folded_conv_bn_weights(conv, bn)
            if folded is None:
                return None
            weight, bias = folded
            if conv.weight.is_contiguous(memory_format=torch.channels_last):
                weight = weight.contiguous(memory_format=torch.channels_last)
            return weight, bias

        self._folded, value = _cached(self._folded, None if key is None else key + (bn.eps,), make)
        return value

    def clear_fused_cache(self) -> None:
        self._folded = None

    def fold_batchnorm(self) -> bool:
        self.conv2, self.norm, folded = _fold_norm(self.conv2, self.norm)
        self._folded = None
        return folded


class QKVAggregator(nn.Module):
    """Multi-scale branch: depthwise kxk over all q/k/v channels, then a 1x1 conv grouped per
    (head, q|k|v) slice, so every new head mixes only its own source head's channels."""

    def __init__(self, qkv_channels: int, groups: int, kernel_size: int) -> None:
        super().__init__()
        self.depthwise = nn.Conv2d(
            qkv_channels,
            qkv_channels,
            kernel_size,
            padding=kernel_size // 2,
            groups=qkv_channels,
            bias=False,
        )
        self.grouped = nn.Conv2d(qkv_channels, qkv_channels, 1, groups=groups, bias=False)

    def forward(self, qkv: torch.Tensor) -> torch.Tensor:
        return self.grouped(self.depthwise(qkv))


def _attention_map(o: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """A (B, heads, d, N) attention output as the (B, heads*d, H, W) map, without a copy: the
    kernel's channel-fastest output (linear_attention.py) becomes channels_last with the
    canonical strides (a plain reshape gives a one-image batch another stride, and torch.cat
    then falls back to NCHW), a contiguous one NCHW."""
    b = o.shape[0]
    if token_major(o):
        return o.permute(0, 3, 1, 2).reshape(b, h, w, -1).permute(0, 3, 1, 2)
    return o.reshape(b, -1, h, w)


class LiteMLA(nn.Module):
    """ReLU linear attention with optional multi-scale q/k/v aggregation, plus residual.

    Heads: channels // head_dim (diffusers' rule). The fused qkv output, and each aggregated
    copy of it, is read as heads of 3*head_dim consecutive channels [q | k | v]; every kernel
    size in ``kernel_sizes`` adds as many heads again.
    """

    def __init__(self, channels: int, head_dim: int, kernel_sizes: tuple[int, ...], norm_type: str):
        super().__init__()
        self.head_dim = head_dim
        heads = channels // head_dim
        inner = heads * head_dim
        self.qkv = nn.Conv2d(channels, 3 * inner, 1, bias=False)
        self.aggregators = nn.ModuleList(
            QKVAggregator(3 * inner, 3 * heads, k) for k in kernel_sizes
        )
        self.proj = nn.Conv2d(inner * (1 + len(kernel_sizes)), channels, 1, bias=False)
        self.norm = make_norm(norm_type, channels)

    def _quadratic(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        # Used (like the reference) when a map has no more pixels than head_dim, where the
        # N x N form is cheaper. All in fp32 and rounded once, as the linear form: the scores
        # are sums of head_dim products and overflow fp16 (NaN after the normalisation) where
        # the activations are in the hundreds (diffusers multiplies them in 16 bits).
        scores = torch.matmul(k.float().transpose(-1, -2), q.float())
        scores = scores / (scores.sum(dim=2, keepdim=True) + LINEAR_ATTENTION_EPS)
        return torch.matmul(v.float(), scores).to(v.dtype)

    def _attend(self, qkv: torch.Tensor) -> torch.Tensor:
        b, _, h, w = qkv.shape
        qkv = qkv.reshape(b, -1, 3 * self.head_dim, h * w)
        if h * w > self.head_dim:
            # O(N) form in fp32 (dcgen.ops: CUDA kernel when built, else the reference).
            return relu_linear_attention(qkv, LINEAR_ATTENTION_EPS)
        q, k, v = qkv.split(self.head_dim, dim=2)
        return self._quadratic(F.relu(q), F.relu(k), v)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        qkv = self.qkv(x)
        if len(self.aggregators) and use_fused(x, "relu_linear_attention"):
            # Heads are independent: attend per scale and concatenate the (3x smaller) outputs
            # instead of a (1 + scales)x copy of qkv. Each output's (B, heads*d, H, W) view is
            # channels_last where the kernel read a channels_last qkv, and so is their cat.
            outs = [self._attend(qkv)] + [self._attend(agg(qkv)) for agg in self.aggregators]
            del qkv
            out = torch.cat([_attention_map(o, h, w) for o in outs], dim=1)
        else:
            if len(self.aggregators):
                qkv = torch.cat([qkv] + [agg(qkv) for agg in self.aggregators], dim=1)
            out = _attention_map(self._attend(qkv), h, w)
        out = out.to(x.dtype)
        if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
            # Keep the channels_last run unbroken so the projection conv does not fall back to
            # cuDNN's NCHW path: a no-op after the CUDA kernel, which reads the channels_last
            # qkv in place and writes its output channels_last (linear_attention.py); a copy
            # after the reference or the quadratic form.
            out = out.contiguous(memory_format=torch.channels_last)
        return _residual_norm(x, self.norm, self.proj(out))

    def fold_batchnorm(self) -> bool:
        self.proj, self.norm, folded = _fold_norm(self.proj, self.norm)
        return folded


class GLUMBConv(nn.Module):
    """Gated inverted bottleneck: 1x1 C->8C (+SiLU), depthwise 3x3, x * SiLU(gate), 1x1 4C->C,
    RMSNorm, residual."""

    def __init__(self, channels: int, expand_ratio: int = 4) -> None:
        super().__init__()
        hidden = expand_ratio * channels
        self.expand = nn.Conv2d(channels, 2 * hidden, 1)
        self.depthwise = nn.Conv2d(2 * hidden, 2 * hidden, 3, padding=1, groups=2 * hidden)
        self.project = nn.Conv2d(hidden, channels, 1, bias=False)
        self.norm = make_norm("rms_norm", channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if use_fused(x, "glu_depthwise_conv"):
            # depthwise + gate in one op, so neither the 8C-channel depthwise output nor its
            # gated half is ever stored
            t = self._expand_act(x)
            y = glu_depthwise_conv(t, self.depthwise.weight, self.depthwise.bias)
            del t
        else:
            y = self.depthwise(F.silu(self.expand(x)))
            y, gate = y.chunk(2, dim=1)
            y = y * F.silu(gate)
        return _residual_norm(x, self.norm, self.project(y))

    def _expand_act(self, x: torch.Tensor) -> torch.Tensor:
        """silu(expand(x)), the depthwise kernel's input. Where bias_act_ has a kernel, the
        conv runs without its bias and one bias_act_ pass adds it and applies SiLU in place:
        PyTorch's bias add after a cuDNN convolution is a broadcast add that does not
        vectorize, then SiLU is a second pass (the f64c128 4K decode on the H200, 2026-11-27:
        8 adds of about 1.0 ms and 8 SiLU passes of 0.47 ms on its EfficientViT stages' largest
        maps).

        Not glu_depthwise_conv's expand_bias (bias and SiLU applied by the depthwise kernel as
        it loads, which saves this pass's read and write of the 8C-channel map): that kernel
        form computes the SiLU for every load of a value, three per value, and measured 2.5x
        slower than this pass plus the plain kernel on the H200 (2026-11-28,
        benchmarks/test_dcae_fused.py's "glumbconv expand bias+silu" group at (1, 4096, 512,
        512) channels_last bf16: 11.59 ms against 4.56 ms; the plain kernel alone 3.09 ms)."""
        conv = self.expand
        if _split_conv_bias(x, conv.bias):
            t = conv._conv_forward(x, conv.weight, None)
            return bias_act_(t, t, conv.bias, "silu")
        return F.silu(conv(x), inplace=can_modify_in_place())


class EfficientViTBlock(nn.Module):
    """LiteMLA (global context) then GLUMBConv (local mixing), each with its own residual."""

    def __init__(
        self, channels: int, head_dim: int, kernel_sizes: tuple[int, ...], norm_type: str
    ) -> None:
        super().__init__()
        self.attn = LiteMLA(channels, head_dim, kernel_sizes, norm_type)
        self.mlp = GLUMBConv(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.attn(x))


def make_block(
    block_type: str,
    channels: int,
    head_dim: int,
    norm_type: str,
    act_fn: str,
    kernel_sizes: tuple[int, ...],
) -> nn.Module:
    if block_type == "ResBlock":
        return ResBlock(channels, norm_type, act_fn)
    if block_type == "EfficientViTBlock":
        return EfficientViTBlock(channels, head_dim, kernel_sizes, norm_type)
    raise ValueError(f"block type: expected 'ResBlock' or 'EfficientViTBlock', got {block_type!r}")


class DownBlock(nn.Module):
    """Halve the resolution: main path conv3x3 + pixel_unshuffle(2) (``pixel_unshuffle``) or a
    stride-2 conv3x3 (``conv``); optional residual-autoencoding shortcut = space-to-channel, then
    averaging groups of channels (non-parametric)."""

    def __init__(self, in_channels: int, out_channels: int, mode: str, shortcut: bool) -> None:
        super().__init__()
        self.mode = mode
        self.out_channels = out_channels
        self.shortcut = shortcut
        if mode == "pixel_unshuffle":
            self.conv = nn.Conv2d(in_channels, out_channels // 4, 3, padding=1)
        elif mode == "conv":
            self.conv = nn.Conv2d(in_channels, out_channels, 3, stride=2, padding=1)
        else:
            raise ValueError(f"downsample type: expected pixel_unshuffle or conv, got {mode!r}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        unshuffle = self.mode == "pixel_unshuffle"
        if self.shortcut and use_fused(x, "down_block_shortcut"):
            # Main path (un)shuffle + averaged space-to-channel shortcut in one pass.
            return down_block_shortcut(y, x, unshuffle)
        if unshuffle:
            y = _layout_of(F.pixel_unshuffle(y, 2), x)
        if self.shortcut:
            y = y + space_to_channel_average(x, self.out_channels, 2)
        return y


class UpBlock(nn.Module):
    """Double the resolution: conv3x3 + pixel_shuffle(2) (``pixel_shuffle``) or nearest x2 then
    conv3x3 (``interpolate``); optional shortcut = duplicate channels, then depth-to-space."""

    def __init__(self, in_channels: int, out_channels: int, mode: str, shortcut: bool) -> None:
        super().__init__()
        self.mode = mode
        self.out_channels = out_channels
        self.shortcut = shortcut
        if mode == "pixel_shuffle":
            self.conv = nn.Conv2d(in_channels, 4 * out_channels, 3, padding=1)
        elif mode == "interpolate":
            self.conv = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        else:
            raise ValueError(f"upsample type: expected pixel_shuffle or interpolate, got {mode!r}")
        self._subpixel: tuple[tuple, tuple[torch.Tensor, torch.Tensor | None]] | None = None

    def _subpixel_conv(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """:func:`nearest_up_conv_as_subpixel` of the conv, in the conv weight's memory format,
        rebuilt only when the weights change (storage, in-place version, dtype or layout)."""
        w, b = self.conv.weight, self.conv.bias
        if torch.is_grad_enabled() and (w.requires_grad or (b is not None and b.requires_grad)):
            return nearest_up_conv_as_subpixel(w, b)  # differentiable, so never cached

        def make() -> tuple[torch.Tensor, torch.Tensor | None]:
            with torch.no_grad():
                weight, bias = nearest_up_conv_as_subpixel(w.detach(), b)
            if w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous():
                weight = weight.contiguous(memory_format=torch.channels_last)
            return weight, bias

        self._subpixel, value = _cached(self._subpixel, _version_key(w, b), make)
        return value

    def clear_fused_cache(self) -> None:
        self._subpixel = None

    def _shortcut_in_bands(
        self,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        bands: list[tuple[int, int, int]],
    ) -> torch.Tensor:
        """The fused path one band of input rows at a time into one preallocated output
        (row_bands.py): x + the output + one band of the conv output alive, instead of x + the
        full conv output + the output. Where up_block_shortcut's out kernel runs, it adds the
        conv bias and writes each band into the output itself; otherwise each band is made
        apart and copied in."""
        n, _, height, width = x.shape
        out: torch.Tensor | None = None
        into = _shortcut_writes_out(x)
        split = not into and _split_conv_bias(x, bias)
        for i, a, b in bands:
            y = conv3x3_rows(x[i : i + 1], weight, None if split or into else bias, a, b)
            if out is None:
                fmt = kernel_layout(y)
                shape = (n, self.out_channels, 2 * height, 2 * width)
                out = torch.empty(shape, dtype=y.dtype, device=y.device, memory_format=fmt)
            rows = out[i : i + 1, :, 2 * a : 2 * b]
            if into:
                up_block_shortcut(y, x[i : i + 1, :, a:b], True, bias=bias, out=rows)
                continue
            if split:
                bias_act_(y, y, bias, "none")
            band = up_block_shortcut(y, x[i : i + 1, :, a:b], True)
            del y
            rows.copy_(band)
            del band
        assert out is not None
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shuffle = self.mode == "pixel_shuffle"
        # the fused form calls F.conv2d on the conv's weight: a hook on the conv (or a wrapped
        # forward, such as an offloading hook's) must see its call, so it keeps the plain form
        if self.shortcut and use_fused(x, "up_block_shortcut") and not has_forward_hooks(self.conv):
            # Depth-to-space of the conv output + duplicated-channel shortcut in one pass. The
            # interpolate mode runs as the equivalent sub-pixel conv on x, so the 4x larger
            # upsampled input is never built.
            if shuffle:
                weight, bias = self.conv.weight, self.conv.bias
            else:
                weight, bias = self._subpixel_conv()
            bands = None
            if can_modify_in_place():
                row_bytes = 4 * self.out_channels * x.shape[3] * x.element_size()
                bands = row_bands(x, row_bytes)
            if bands is not None:
                return self._shortcut_in_bands(x, weight, bias, bands)
            if _shortcut_writes_out(x):  # the bias added by the shortcut kernel
                y = F.conv2d(x, weight, None, padding=1)
                return up_block_shortcut(y, x, True, bias=bias)
            split = _split_conv_bias(x, bias)
            y = F.conv2d(x, weight, None if split else bias, padding=1)
            if split:
                bias_act_(y, y, bias, "none")
            return up_block_shortcut(y, x, True)
        if shuffle:
            y = _layout_of(F.pixel_shuffle(self.conv(x), 2), x)
        else:
            y = self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))
        if self.shortcut:
            y = y + channel_duplicate_to_space(x, self.out_channels, 2)
        return y
