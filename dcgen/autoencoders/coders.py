"""DC-AE encoder and decoder stacks built from a DCAEConfig.

Module tree (dcgen names; checkpoint.py maps them to diffusers / original names):

    encoder.stem        conv3x3 in->C0, or (stage 0 empty) a DownBlock in->C1 without shortcut
    encoder.stages.i.j  blocks of stage i, then (j == depth, i < last) its DownBlock
    encoder.head        conv3x3 C_last->latent (+ channel-averaging shortcut in 1.0)
    decoder.stem        conv3x3 latent->C_last (+ channel-duplicating shortcut in 1.0)
    decoder.stages.i.j  (j == 0, i < last) UpBlock from stage i+1, then the blocks of stage i
    decoder.head_norm   RMSNorm, then the output activation
    decoder.head        conv3x3 ->in, or (stage 0 empty) an UpBlock ->in without shortcut
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from dcgen._hooks import has_forward_hooks, has_hook_callbacks, watched
from dcgen.ops import channel_duplicate_to_space, space_to_channel_average

from .banding import LocalStep, local_prefix, local_step, local_suffix, run_banded
from .blocks import DownBlock, UpBlock, make_block
from .config import DCAEConfig
from .fused import hooks_watching, use_fused
from .norms import ChannelRMSNorm, fusable_act_name, make_act
from .row_bands import overwrite_bands, owned_activations


def run_stages(
    stages: Iterable[nn.Module], h: torch.Tensor, owned: bool = True
) -> tuple[torch.Tensor, bool]:
    """The stages' layers one by one, rebinding h, so each input is freed as soon as the next
    layer has returned (a stage's Sequential would keep its input alive to the stage's end: 1-2
    GB at 4K); a layer may overwrite its input (row_bands.py) unless a hook saw that tensor
    (``owned`` False for the first: its producer is watched). A stage with forward hooks runs
    through its own call, so the hooks still fire, and none of its blocks may overwrite the
    input the hooks are given. Returns h and whether it may be overwritten in turn."""
    for stage in stages:
        if has_forward_hooks(stage):
            inner = any(watched(m) for m in stage)
            with owned_activations(False), hooks_watching(inner):
                h = stage(h)
            owned = False  # the stage's hooks were given this output
            continue
        for layer in stage:
            h, owned = run_layer(layer, h, owned)
    return h, owned


def run_layer(layer: nn.Module, h: torch.Tensor, owned: bool) -> tuple[torch.Tensor, bool]:
    """``layer(h)``, allowed to overwrite h when ``owned``, on the plain path when a hook
    watches it; returns the output and whether the next layer may overwrite it (not when a
    hook was given it)."""
    seen = watched(layer)
    with owned_activations(owned), hooks_watching(seen):
        h = layer(h)
    return h, not seen


class Encoder(nn.Module):
    def __init__(self, cfg: DCAEConfig) -> None:
        super().__init__()
        widths = cfg.encoder_block_out_channels
        depths = cfg.encoder_layers_per_block
        n = len(widths)
        self.latent_channels = cfg.latent_channels
        self.out_shortcut = cfg.encoder_out_shortcut
        if depths[0] > 0:
            self.stem: nn.Module = nn.Conv2d(cfg.in_channels, widths[0], 3, padding=1)
        else:
            self.stem = DownBlock(cfg.in_channels, widths[1], cfg.downsample_block_type, False)
        stages = []
        for i, (width, depth) in enumerate(zip(widths, depths)):
            layers: list[nn.Module] = [
                make_block(
                    cfg.encoder_block_types[i],
                    width,
                    cfg.attention_head_dim,
                    "rms_norm",  # the encoder always uses RMSNorm + SiLU
                    "silu",
                    cfg.encoder_qkv_multiscales[i],
                )
                for _ in range(depth)
            ]
            if i < n - 1 and depth > 0:
                layers.append(DownBlock(width, widths[i + 1], cfg.downsample_block_type, True))
            stages.append(nn.Sequential(*layers))
        self.stages = nn.ModuleList(stages)
        self.head = nn.Conv2d(widths[-1], cfg.latent_channels, 3, padding=1)

    def forward(
        self, x: torch.Tensor, channels: int | None = None, band_rows: int | None = None
    ) -> torch.Tensor:
        """Latents of ``x``; with ``channels=c`` only the first c latent channels are computed
        (DC-AE 1.5 structured latents: the head conv's weight is sliced to [:c]).

        ``band_rows``: run the local high-resolution head (the stem and every layer before the
        first attention block) about ``band_rows`` input rows at a time (banding.py: the same
        latents, a fraction of the peak memory)."""
        if band_rows is not None and has_hook_callbacks(self.stem, *self.stages):
            # bands run a stage's layers outside its call and a layer once per band: the
            # full frame, so hooks see what they would without bands (same output)
            band_rows = None
        if band_rows is None:
            h, _ = run_stages(self.stages, self.stem(x), owned=not watched(self.stem))
        else:
            h = self._banded_head(x, band_rows)
        c = self.latent_channels if channels is None else channels
        if c == self.latent_channels:
            z = self.head(h)
        else:
            bias = None if self.head.bias is None else self.head.bias[:c]
            z = F.conv2d(h, self.head.weight[:c], bias, padding=1)
        if self.out_shortcut:
            z = z + space_to_channel_average(h, self.latent_channels, 1)[:, :c]
        return z

    def _banded_head(self, x: torch.Tensor, band_rows: int) -> torch.Tensor:
        layers = [self.stem, *(m for stage in self.stages for m in stage)]
        k = local_prefix(layers)
        steps = [local_step(m) for m in layers[:k]]
        down = math.prod(st.down for st in steps)
        # band_rows counts input rows; the bands are cut at the head's output, down x smaller
        h = run_banded(steps, x, max(1, band_rows // down)) if steps else x
        owned = True
        for m in layers[k:]:
            h, owned = run_layer(m, h, owned)
        return h


class Decoder(nn.Module):
    def __init__(self, cfg: DCAEConfig) -> None:
        super().__init__()
        widths = cfg.decoder_block_out_channels
        depths = cfg.decoder_layers_per_block
        n = len(widths)
        self.latent_channels = cfg.latent_channels
        self.in_shortcut = cfg.decoder_in_shortcut
        self.stem = nn.Conv2d(cfg.latent_channels, widths[-1], 3, padding=1)
        stages = []
        for i, (width, depth) in enumerate(zip(widths, depths)):
            layers: list[nn.Module] = []
            if i < n - 1 and depth > 0:
                layers.append(UpBlock(widths[i + 1], width, cfg.upsample_block_type, True))
            layers.extend(
                make_block(
                    cfg.decoder_block_types[i],
                    width,
                    cfg.attention_head_dim,
                    cfg.decoder_norm_types[i],
                    cfg.decoder_act_fns[i],
                    cfg.decoder_qkv_multiscales[i],
                )
                for _ in range(depth)
            )
            stages.append(nn.Sequential(*layers))
        self.stages = nn.ModuleList(stages)
        out_width = widths[0] if depths[0] > 0 else widths[1]
        self.head_norm = ChannelRMSNorm(out_width)
        self.head_act = make_act(cfg.decoder_conv_act_fn)
        if depths[0] > 0:
            self.head: nn.Module = nn.Conv2d(out_width, cfg.in_channels, 3, padding=1)
        else:
            self.head = UpBlock(out_width, cfg.in_channels, cfg.upsample_block_type, False)

    def forward(self, z: torch.Tensor, band_rows: int | None = None) -> torch.Tensor:
        """Image from latents; z may carry only the first c <= latent_channels channels, which
        equals decoding z zero-padded to latent_channels (the stem conv weight is sliced).

        ``band_rows``: run the local high-resolution tail (everything after the last attention
        block) ``band_rows`` output rows at a time (banding.py: same result, a fraction of the
        peak memory)."""
        h = self._stem(z)
        owned = not watched(self.stem)
        if band_rows is not None and has_hook_callbacks(
            *self.stages, self.head_norm, self.head_act, self.head
        ):
            band_rows = None  # as in Encoder.forward: hooks see the full frame
        if band_rows is None:
            h, owned = run_stages(reversed(self.stages), h, owned)
            seen = watched(self.head_norm) or watched(self.head_act)
            with owned_activations(owned), hooks_watching(seen):
                h = self._head_in(h)  # rebinding frees the pre-norm map
            with hooks_watching(watched(self.head)):
                return self.head(h)
        layers = [m for stage in reversed(self.stages) for m in stage]
        k = local_suffix(layers)
        for m in layers[:k]:
            h, owned = run_layer(m, h, owned)
        steps = [local_step(m) for m in layers[k:]]
        head = local_step(self.head)  # the head conv or UpBlock; its norm + act are per pixel
        steps.append(LocalStep(self._head, head.radius, head.scale))
        return run_banded(steps, h, band_rows)

    def _stem(self, z: torch.Tensor) -> torch.Tensor:
        c = z.shape[1]
        if c == self.latent_channels:
            h = self.stem(z)
        else:
            bias = self.stem.bias
            h = F.conv2d(z, self.stem.weight[:, :c], bias, padding=1)
        if self.in_shortcut:
            if c < self.latent_channels:
                # The shortcut duplicates every latent channel; missing channels count as zero.
                z = F.pad(z, (0, 0, 0, 0, 0, self.latent_channels - c))
            h = h + channel_duplicate_to_space(z, h.shape[1], 1)
        return h

    def _head(self, h: torch.Tensor) -> torch.Tensor:
        return self.head(self._head_in(h))

    def _head_in(self, h: torch.Tensor) -> torch.Tensor:
        """act(head_norm(h)), the head conv's input: in place, band by band, where h may be
        overwritten (row_bands.py), else into a new map."""
        act = fusable_act_name(self.head_act)
        if act is None or not use_fused(h, "channel_rms_norm_fused"):
            return self.head_act(self.head_norm(h))
        bands = overwrite_bands(self.head_norm, h)
        if bands is None:
            return self.head_norm.fused(h, act=act)
        for i, a, b in bands:
            hb = h[i : i + 1, :, a:b]
            self.head_norm.fused(hb, act=act, out=hb)  # in place on h's band, no copy
        return h
