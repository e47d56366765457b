"""Latent-facing layers that run on the first c channels of a structured (DC-AE 1.5) latent.

DC-AE 1.5 trains its decoder on channel prefixes, so latents[:, :c] is a valid coarser latent.
A DiT can follow: its embedder uses only the weight columns of the first c channels (identical to
zero-padding the missing channels) and its head emits only those channels' rows. The classes
subclass the plain torch layers, so parameter names, shapes and saved files are unchanged: a
checkpoint saved with them loads into a stock diffusers model and vice versa.

Each latent channel owns ``patch_area`` consecutive-or-strided features: FLUX packs a p x p
patch channel-major ((C, p, p) flattened), SANA's head emits channel-minor ((p, p, C)).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def channel_feature_index(
    num_channels: int, active: int, patch_area: int, channel_major: bool
) -> torch.Tensor:
    """Indices of the features that belong to channels [0, active) among num_channels * patch_area
    features."""
    if not 1 <= active <= num_channels:
        raise ValueError(f"active channels must be in [1, {num_channels}], got {active}")
    grid = torch.arange(num_channels * patch_area)
    grid = (
        grid.view(num_channels, patch_area)
        if channel_major
        else grid.view(patch_area, num_channels).T
    )
    return grid[:active].T.reshape(-1) if not channel_major else grid[:active].reshape(-1)


def _check_plain(layer: nn.Module) -> None:
    """The wrapped layer's weight must be a Parameter: a quantized layer's uint8 / float8
    weight buffer failed to assign as one ("cannot assign ... as parameter")."""
    weight = getattr(layer, "weight", None)
    if not isinstance(weight, nn.Parameter):
        got = weight.dtype if isinstance(weight, torch.Tensor) else type(weight).__name__
        raise TypeError(
            f"expected a layer whose weight is a Parameter, got a {type(layer).__name__} with "
            f"a {got} weight (a quantized layer cannot run on a channel prefix)"
        )


class StructuredLinear(nn.Linear):
    """nn.Linear over per-channel feature groups that can run on a channel prefix.

    As an embedder (``side="in"``) the active channel count comes from the input width; as a
    head (``side="out"``) from ``active_channels`` (None = all), which the adapter sets per call.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        num_channels: int,
        patch_area: int = 1,
        side: str = "in",
        channel_major: bool = True,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        if side not in ("in", "out"):
            raise ValueError(f"side: expected 'in' or 'out', got {side!r}")
        features = in_features if side == "in" else out_features
        if features != num_channels * patch_area:
            raise ValueError(
                f"StructuredLinear: {side}_features {features} != num_channels {num_channels} x "
                f"patch_area {patch_area}"
            )
        self.num_channels, self.patch_area = num_channels, patch_area
        self.side, self.channel_major = side, channel_major
        self.active_channels: int | None = None

    @classmethod
    def from_linear(
        cls, linear: nn.Linear, num_channels: int, patch_area: int, side: str, channel_major: bool
    ) -> StructuredLinear:
        """Wrap an existing Linear, sharing its parameters (no copy)."""
        _check_plain(linear)
        new = cls(
            linear.in_features,
            linear.out_features,
            num_channels,
            patch_area,
            side,
            channel_major,
            bias=linear.bias is not None,
            device="meta",
        )
        new.weight, new.bias = linear.weight, linear.bias
        return new

    def _index(self, active: int) -> torch.Tensor:
        idx = channel_feature_index(self.num_channels, active, self.patch_area, self.channel_major)
        return idx.to(self.weight.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.side == "in":
            if x.shape[-1] == self.in_features:
                return super().forward(x)
            if x.shape[-1] % self.patch_area:
                raise ValueError(
                    f"StructuredLinear: input width {x.shape[-1]} is not a multiple of the patch "
                    f"area {self.patch_area}"
                )
            idx = self._index(x.shape[-1] // self.patch_area)
            return F.linear(x, self.weight.index_select(1, idx), self.bias)
        active = self.active_channels
        if active is None or active == self.num_channels:
            return super().forward(x)
        idx = self._index(active)
        bias = None if self.bias is None else self.bias.index_select(0, idx)
        return F.linear(x, self.weight.index_select(0, idx), bias)


class StructuredConv2d(nn.Conv2d):
    """Patch-embedding Conv2d (SANA ``patch_embed.proj``) that accepts the first c <= C input
    channels by slicing weight[:, :c] (same as zero-padding the missing channels)."""

    @classmethod
    def from_conv(cls, conv: nn.Conv2d) -> StructuredConv2d:
        _check_plain(conv)
        new = cls(
            conv.in_channels,
            conv.out_channels,
            conv.kernel_size,
            stride=conv.stride,
            padding=conv.padding,
            bias=conv.bias is not None,
            device="meta",
        )
        new.weight, new.bias = conv.weight, conv.bias
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = x.shape[1]
        if c == self.in_channels:
            return super().forward(x)
        if c > self.in_channels:
            raise ValueError(
                f"StructuredConv2d: expected at most {self.in_channels} channels, got {c}"
            )
        return self._conv_forward(x, self.weight[:, :c], self.bias)
