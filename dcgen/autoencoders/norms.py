"""Norms and activations used by the DC-AE blocks, and BatchNorm folding for inference."""

from __future__ import annotations

import torch
from torch import nn

from dcgen.ops import channel_rms_norm, channel_rms_norm_fused

RMS_EPS = 1e-5
BN_EPS = 1e-5


class ChannelRMSNorm(nn.Module):
    """RMSNorm over the channels of every pixel of an (N, C, H, W) map, with weight AND bias.

    Statistics and affine run in fp32 (dcgen.ops.channel_rms_norm), so bf16 activations do not
    lose the normalisation's precision.
    """

    def __init__(self, channels: int, eps: float = RMS_EPS) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return channel_rms_norm(x, self.weight, self.bias, self.eps)

    def fused(
        self,
        x: torch.Tensor,
        act: str = "none",
        residual: torch.Tensor | None = None,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """act(self(x)) + residual in one op (act "none", "relu" or "silu"), rounded once;
        written into ``out`` when given (x or the residual included)."""
        return channel_rms_norm_fused(x, self.weight, self.bias, self.eps, act, residual, out)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


class BatchNorm2dFP32(nn.BatchNorm2d):
    """BatchNorm2d whose parameters and running statistics stay fp32 when the model is cast to
    fp16 / bf16 (``.to(dtype)``, ``.half()``); its input and output keep the model's dtype
    (PyTorch's batch_norm takes 16-bit input with fp32 statistics, as under autocast).

    Why: a trained DC-AE's running variance can pass fp16's 65,504 (the toy world's f32 DC-AE
    has one of 1e9), so a plain ``.half()`` turned it into inf and the decode into NaN; in
    bf16 it would keep 3 significant digits of its statistics. They are made fp32 whatever
    torch's default dtype or the ``dtype`` passed (a 16-bit default made them 16-bit, so a
    loaded 1e9 variance became inf under fp16)."""

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,  # nn.BatchNorm2d's signature; the stats stay fp32
    ) -> None:
        super().__init__(
            num_features, eps, momentum, affine, track_running_stats, device, torch.float32
        )

    def _apply(self, fn, recurse=True):  # noqa: ANN001, ANN202
        def keep_fp32(t: torch.Tensor) -> torch.Tensor:
            out = fn(t)
            if t.is_floating_point() and out.dtype in (torch.float16, torch.bfloat16):
                if t.is_meta:  # no data to copy (to_empty of a meta-built model): fresh fp32
                    return torch.empty_like(out, dtype=torch.float32)
                return t.to(device=out.device, dtype=torch.float32)  # the move, not the cast
            return out

        return super()._apply(keep_fp32, recurse)


def make_norm(norm_type: str, channels: int) -> nn.Module:
    if norm_type == "rms_norm":
        return ChannelRMSNorm(channels)
    if norm_type == "batch_norm":
        return BatchNorm2dFP32(channels, eps=BN_EPS)
    raise ValueError(f"norm type: expected 'rms_norm' or 'batch_norm', got {norm_type!r}")


_ACTIVATIONS = {
    "relu": nn.ReLU,
    "silu": nn.SiLU,
    "swish": nn.SiLU,
    "gelu": nn.GELU,
    "mish": nn.Mish,
}


def fusable_act_name(act: nn.Module) -> str | None:
    """The channel_rms_norm_fused name of an activation module, or None when it has none."""
    if type(act) is nn.ReLU:
        return "relu"
    if type(act) is nn.SiLU:
        return "silu"
    if type(act) is nn.Identity:
        return "none"
    return None


def apply_act_inplace(act: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """act(x), overwriting x where the activation has an in-place form (inference only)."""
    if type(act) is nn.ReLU:
        return torch.relu_(x)
    if type(act) is nn.SiLU:
        return nn.functional.silu(x, inplace=True)
    if type(act) is nn.Mish:
        return nn.functional.mish(x, inplace=True)
    return act(x)


def make_act(name: str) -> nn.Module:
    try:
        return _ACTIVATIONS[name]()
    except KeyError:
        raise ValueError(
            f"activation: expected one of {sorted(_ACTIVATIONS)}, got {name!r}"
        ) from None


@torch.no_grad()
def folded_conv_bn_weights(
    conv: nn.Conv2d, bn: nn.BatchNorm2d
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The weight and bias of a conv computing bn(conv(x)) with BatchNorm's running statistics
    (eval semantics), in the conv weight's dtype and device (plain tensors, no module built, so
    no random initialisation draws from the global RNG):

    y = gamma * (conv(x) - mean) / sqrt(var + eps) + beta
      = conv'(x) with W' = W * s[:, None, None, None], b' = (b - mean) * s + beta,
    s = gamma / sqrt(var + eps). The arithmetic runs in fp64 and is rounded once.

    None where W' or b' does not fit the dtype (a large running mean over a small variance
    gives a b' past fp16's 65,504 while the unfolded block, its statistics in fp32
    (BatchNorm2dFP32), stays finite): the caller keeps the BatchNorm. Statistics that are
    themselves not finite fold as they are (the unfolded block is not finite either).
    """
    if bn.running_mean is None or bn.running_var is None:
        raise ValueError("fold_batchnorm: BatchNorm2d without running statistics cannot be folded")
    dtype = conv.weight.dtype
    var = bn.running_var.double()
    mean = bn.running_mean.double()
    gamma = bn.weight.double() if bn.weight is not None else torch.ones_like(var)
    beta = bn.bias.double() if bn.bias is not None else torch.zeros_like(var)
    scale = gamma / torch.sqrt(var + bn.eps)
    bias = conv.bias.double() if conv.bias is not None else torch.zeros_like(var)
    weight64 = conv.weight.double() * scale.view(-1, 1, 1, 1)
    bias64 = (bias - mean) * scale + beta
    weight, bias = weight64.to(dtype), bias64.to(dtype)
    if weight.is_meta:  # a memory plan on the meta device (no values): the fold's shapes
        return weight, bias
    overflowed = (torch.isinf(weight) & torch.isfinite(weight64)).any() | (
        torch.isinf(bias) & torch.isfinite(bias64)
    ).any()
    return None if bool(overflowed) else (weight, bias)


@torch.no_grad()
def fold_batchnorm_into_conv(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Conv2d | None:
    """A conv computing bn(conv(x)) (:func:`folded_conv_bn_weights`), built on the meta device
    and given the folded tensors, so building it draws nothing from the global RNG; None where
    the folded weights overflow the conv's dtype."""
    folded = folded_conv_bn_weights(conv, bn)
    if folded is None:
        return None
    weight, bias = folded
    fused = nn.Conv2d(
        conv.in_channels,
        conv.out_channels,
        conv.kernel_size,
        stride=conv.stride,
        padding=conv.padding,
        dilation=conv.dilation,
        groups=conv.groups,
        bias=True,
        padding_mode=conv.padding_mode,
        device="meta",
        dtype=weight.dtype,
    )
    fused.weight = nn.Parameter(weight, requires_grad=conv.weight.requires_grad)
    fused.bias = nn.Parameter(bias, requires_grad=conv.weight.requires_grad)
    return fused
