"""Feature-distance analysis (docs/method.md section 1, "Feature distance to the base model").

The paper compares, block by block, the hidden states of the base DiT (base VAE, 2x2 packing)
with those of the adapted DiT (DC-AE, 1x1 packing) for the same image: a naive re-initialised
embedder drifts away quickly with depth (0.24 at block 0, 345 at block 15), the aligned one
stays close (0.02 -> 12.5). This module captures the hidden states with forward hooks and
measures that distance. The base model's grid is finer (x2 per side for f32, x4 for f64), so
pass ``base_hw`` and ``factor`` to bring the base features onto the new grid with the same
:func:`~dcgen.train.align.downsample_tokens` used for stage 1.

Distance definition (``kind="sq_l2"``, the default): for features (B, N, D),

    d = mean over batch and tokens of  sum over channels (f_base - f_new)^2,

i.e. the squared L2 distance per token, averaged over tokens (an MSE per token summed over
channels). ``kind="mse"`` divides that by D (mean over channels too), and ``kind="relative"``
is sum ||f_base - f_new||^2 / sum ||f_base||^2 over all tokens (scale free, so it shows the
drift without the growth of the residual stream's magnitude with depth). The paper does not
say which it used; the growth 0.24 -> 345 suggests an unnormalised one, hence the default.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch
from torch import Tensor, nn

from dcgen.train.align import DownsampleMode, downsample_tokens

DistanceKind = Literal["sq_l2", "mse", "relative"]

__all__ = [
    "DistanceKind",
    "FeatureCapture",
    "block_list",
    "capture_features",
    "feature_distance",
    "feature_distances",
    "image_stream",
]


def image_stream(output: Any) -> Tensor:
    """Default selector: the image-token hidden states from a block's output.

    diffusers' FLUX blocks (double and single, diffusers >= 0.32) return
    ``(encoder_hidden_states, hidden_states)``: the image stream is the last element. SANA's
    blocks return the hidden-state tensor itself.
    """
    if isinstance(output, Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[-1], Tensor):
        return output[-1]
    raise TypeError(
        f"cannot find a hidden-state tensor in a block output of type {type(output).__name__}; "
        "pass select= to FeatureCapture"
    )


def block_list(transformer: nn.Module) -> list[nn.Module]:
    """The DiT's blocks in execution order, global index = position in this list: FLUX's
    ``transformer_blocks`` (double) then ``single_transformer_blocks``; SANA's
    ``transformer_blocks``."""
    blocks: list[nn.Module] = []
    for name in ("transformer_blocks", "single_transformer_blocks"):
        blocks.extend(getattr(transformer, name, None) or [])
    if not blocks:
        raise ValueError(f"{type(transformer).__name__} has no transformer_blocks")
    return blocks


class FeatureCapture:
    """Context manager: forward hooks on ``modules`` record each one's output.

    ``features[i]`` holds ``select(output)`` of ``modules[i]`` from the latest forward
    (detached, optionally moved to ``to_device`` and cast to ``dtype``); None if it did not run.
    Hooks are removed on exit, also when the body raises.
    """

    def __init__(
        self,
        modules: Sequence[nn.Module],
        select: Callable[[Any], Tensor] = image_stream,
        to_device: torch.device | str | None = None,
        dtype: torch.dtype | None = torch.float32,
    ) -> None:
        self.modules = list(modules)
        self.select = select
        self.to_device = to_device
        self.dtype = dtype
        self.features: list[Tensor | None] = [None] * len(self.modules)
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def _hook(self, index: int) -> Callable[..., None]:
        def hook(_module: nn.Module, _args: Any, output: Any) -> None:
            feat = self.select(output).detach()
            if self.to_device is not None or self.dtype is not None:
                feat = feat.to(device=self.to_device, dtype=self.dtype)
            self.features[index] = feat

        return hook

    def __enter__(self) -> FeatureCapture:
        self.features = [None] * len(self.modules)
        self._handles = [m.register_forward_hook(self._hook(i)) for i, m in enumerate(self.modules)]
        return self

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def __exit__(self, *exc: object) -> None:
        self.remove()


@torch.no_grad()
def capture_features(
    forward: Callable[[], Any],
    modules: Sequence[nn.Module],
    select: Callable[[Any], Tensor] = image_stream,
    to_device: torch.device | str | None = None,
) -> list[Tensor]:
    """Run ``forward()`` (a closure calling the model) and return the selected output of every
    module in ``modules`` (fp32, detached). Raises if a module did not run."""
    with FeatureCapture(modules, select=select, to_device=to_device) as cap:
        forward()
    missing = [i for i, f in enumerate(cap.features) if f is None]
    if missing:
        raise RuntimeError(f"modules at indices {missing} did not run during forward()")
    return [f for f in cap.features if f is not None]


def feature_distance(
    base: Tensor,
    new: Tensor,
    kind: DistanceKind = "sq_l2",
    base_hw: tuple[int, int] | None = None,
    factor: int = 1,
    mode: DownsampleMode = "avg",
) -> float:
    """Distance between base and new hidden states (B, N, D); see the module docstring.

    With ``factor > 1`` the base features, a (B, H*W, D) map on the base grid ``base_hw``, are
    first downsampled onto the new grid with :func:`downsample_tokens` (``mode``).
    """
    if factor > 1:
        base = downsample_tokens(base, base_hw, factor, mode)
    if base.shape != new.shape:
        raise ValueError(
            f"feature shapes differ: base {tuple(base.shape)} vs new {tuple(new.shape)} "
            "(pass base_hw and factor when the base model runs on a finer grid)"
        )
    b = base.double()
    diff_sq = (b - new.double()).square()
    if kind == "sq_l2":
        return float(diff_sq.sum(-1).mean())
    if kind == "mse":
        return float(diff_sq.mean())
    if kind == "relative":
        return float(diff_sq.sum() / b.square().sum().clamp_min(torch.finfo(b.dtype).tiny))
    raise ValueError(f"kind must be 'sq_l2', 'mse' or 'relative', got {kind!r}")


def feature_distances(
    base_feats: Sequence[Tensor],
    new_feats: Sequence[Tensor],
    kind: DistanceKind = "sq_l2",
    base_hw: tuple[int, int] | None = None,
    factor: int = 1,
    mode: DownsampleMode = "avg",
) -> list[float]:
    """:func:`feature_distance` per layer for two equally long lists of captured features."""
    if len(base_feats) != len(new_feats):
        raise ValueError(f"{len(base_feats)} base layers vs {len(new_feats)} new layers")
    return [
        feature_distance(b, n, kind=kind, base_hw=base_hw, factor=factor, mode=mode)
        for b, n in zip(base_feats, new_feats)
    ]
