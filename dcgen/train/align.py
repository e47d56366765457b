"""Stage 1 of DC-Gen: patch-embedder alignment (docs/method.md section 1, step 1).

For the same clean image x the target is the base model's token map, spatially downsampled to
the new (coarser) latent grid, e = Down(x_embedder_base(pack2x2(VAE_base(x)))), and the new
embedder's tokens are e' = x_embedder_new(pack1x1(DCAE(x))). The loss is MSE(e', e) with
everything but the new embedder frozen. The new embedder is one affine map, so the problem is
linear least squares: :class:`RidgeAccumulator` streams the sufficient statistics over as many
tokens as wanted and solves in closed form; :func:`refine_sgd` then polishes with SGD (useful
when the embedder is followed by something non-linear, or for the stage-2 joint training).

Everything here is generic: the caller supplies the token maps (or callables that make them),
so the per-family packing lives in ``dcgen.adapters``.

Conv2d patch embedders (SANA ``patch_embed.proj``, kernel = stride = p) are affine maps of
non-overlapping p x p patches: ``conv(x)`` equals ``F.linear(patchify(x, p), W.flatten(1), b)``
with :func:`patchify` below (channel-major (c, kh, kw) features, the order of
``conv.weight.flatten(1)``). So feed ``patchify(latent, p)`` to the accumulator as X and load
the solution with :func:`init_from_ridge`, which reshapes it back into the conv weight.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

logger = logging.getLogger(__name__)

DownsampleMode = Literal["avg", "bilinear", "area"]

__all__ = [
    "DownsampleMode",
    "RidgeAccumulator",
    "alignment_loss",
    "downsample_tokens",
    "init_from_ridge",
    "init_linear_from_ridge",
    "patchify",
    "refine_sgd",
]


def downsample_tokens(
    tokens: Tensor,
    from_hw: tuple[int, int] | None,
    factor: int,
    mode: DownsampleMode = "avg",
) -> Tensor:
    """Downsample a token map by ``factor`` per side onto the new latent grid.

    ``tokens`` is either packed, (B, H*W, D) in row-major order (token ``r*W + c`` sits at row
    r, column c, the order of FLUX's packing and of ``img_ids``), or spatial, (B, D, H, W).
    ``from_hw`` = (H, W) is required for packed input and checked against spatial input (pass
    None to take it from the tensor). The result has the input's layout: (B, h*w, D) or
    (B, D, h, w) with h = H // factor, w = W // factor, and the input's dtype (the arithmetic
    runs in fp32 at least).

    Modes (DC-Gen leaves the operator UNKNOWN; "avg" is the default):

    - ``"avg"``: average pooling with kernel = stride = factor. Each new token is the plain mean
      of the factor x factor block of base tokens it covers (the same image area). H and W must
      be divisible by ``factor``.
    - ``"area"``: ``F.interpolate(mode="area")`` (adaptive average pooling to (h, w)). Equal to
      "avg" when H and W are divisible by ``factor``; otherwise each output averages the
      (possibly overlapping) input bins ``[floor(i*H/h), ceil((i+1)*H/h))``.
    - ``"bilinear"``: ``F.interpolate(mode="bilinear", align_corners=False, antialias=False)``:
      samples the bilinear interpolant of the base map at each new token's centre, input
      coordinate ``(i + 0.5) * factor - 0.5``. For factor 2 that is the centre of the 2x2 block,
      so it equals "avg"; for factor 4 it is the mean of the central 2x2 of each 4x4 block (the
      outer ring gets weight 0), i.e. a point sample rather than an area average.
    """
    if factor < 1:
        raise ValueError(f"factor must be a positive integer, got {factor}")
    if mode not in ("avg", "bilinear", "area"):
        raise ValueError(f"mode must be 'avg', 'bilinear' or 'area', got {mode!r}")

    packed = tokens.ndim == 3
    if packed:
        if from_hw is None:
            raise ValueError("from_hw=(H, W) is required for packed (B, H*W, D) tokens")
        b, n, d = tokens.shape
        h_in, w_in = from_hw
        if h_in * w_in != n:
            raise ValueError(
                f"packed tokens have {n} tokens, expected H*W = {h_in}*{w_in} = {h_in * w_in}"
            )
        grid = tokens.reshape(b, h_in, w_in, d).permute(0, 3, 1, 2)
    elif tokens.ndim == 4:
        grid = tokens
        h_in, w_in = tokens.shape[-2:]
        if from_hw is not None and tuple(from_hw) != (h_in, w_in):
            raise ValueError(f"from_hw={tuple(from_hw)} does not match the map's {(h_in, w_in)}")
    else:
        raise ValueError(
            f"tokens must be (B, H*W, D) or (B, D, H, W), got shape {tuple(tokens.shape)}"
        )

    if factor == 1:
        return tokens
    if mode == "avg" and (h_in % factor or w_in % factor):
        raise ValueError(
            f"mode='avg' needs H and W divisible by factor={factor}, got {(h_in, w_in)}"
        )
    h_out, w_out = h_in // factor, w_in // factor
    if h_out < 1 or w_out < 1:
        raise ValueError(f"grid {(h_in, w_in)} is smaller than factor={factor}")

    # Pool in fp32: bf16 averaging of 16 values loses ~2 bits, and the target must be exact.
    work = grid.float() if grid.dtype in (torch.float16, torch.bfloat16) else grid
    if mode == "avg":
        out = F.avg_pool2d(work, kernel_size=factor, stride=factor)
    elif mode == "area":
        out = F.interpolate(work, size=(h_out, w_out), mode="area")
    else:
        out = F.interpolate(
            work, size=(h_out, w_out), mode="bilinear", align_corners=False, antialias=False
        )
    out = out.to(tokens.dtype)
    if packed:
        return out.permute(0, 2, 3, 1).reshape(out.shape[0], h_out * w_out, out.shape[1])
    return out


def patchify(latents: Tensor, patch_size: int) -> Tensor:
    """(B, C, H, W) -> (B, (H/p)*(W/p), C*p*p): the inputs a kernel=stride=p Conv2d sees.

    Features are channel-major (c, kh, kw), matching ``conv.weight.flatten(1)``; tokens are
    row-major over the patch grid, matching the conv output flattened as ``flatten(2).mT``.
    """
    if latents.ndim != 4:
        raise ValueError(f"latents must be (B, C, H, W), got shape {tuple(latents.shape)}")
    h, w = latents.shape[-2:]
    if h % patch_size or w % patch_size:
        raise ValueError(f"latent size {(h, w)} is not divisible by patch_size={patch_size}")
    return F.unfold(latents, kernel_size=patch_size, stride=patch_size).mT


class RidgeAccumulator:
    """Streaming ridge regression Y ~ X W^T + b over any number of token batches.

    Keeps, in ``dtype`` (fp64 by default), the count n, the means of X and Y, the centred
    cross-products C_xx = sum (x - mx)(x - mx)^T and C_xy = sum (x - mx)(y - my)^T, and the
    per-channel centred sum of squares of Y. Batches are merged with Chan et al.'s pairwise
    update, so the statistics equal those of one big batch without the cancellation that raw
    sums of x x^T suffer when the mean is large, and two accumulators (e.g. from two ranks) can
    be combined with :meth:`merge`.

    :meth:`solve` minimises  mean_tokens ||x W^T + b - y||^2 + l2 * ||W||_F^2: the bias is
    unpenalised (handled by centring), and ``l2`` is per token, so its meaning does not change
    with the number of tokens seen. Solution: W^T = (C_xx/n + l2 I)^-1 C_xy/n, b = my - mx W^T.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        dtype: torch.dtype = torch.float64,
        device: torch.device | str | None = None,
    ) -> None:
        self.in_features = in_features
        self.out_features = out_features
        self.dtype = dtype
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        z = dict(dtype=dtype, device=self.device)
        self.count = 0
        self.mean_x = torch.zeros(in_features, **z)
        self.mean_y = torch.zeros(out_features, **z)
        self.cxx = torch.zeros(in_features, in_features, **z)
        self.cxy = torch.zeros(in_features, out_features, **z)
        self.cyy = torch.zeros(out_features, **z)  # diagonal only: enough for the fit's MSE

    @torch.no_grad()
    def update(self, x: Tensor, y: Tensor) -> None:
        """Add tokens: x (..., in_features), y (..., out_features) with the same leading dims."""
        if x.shape[-1] != self.in_features or y.shape[-1] != self.out_features:
            raise ValueError(
                f"expected x (..., {self.in_features}) and y (..., {self.out_features}), "
                f"got {tuple(x.shape)} and {tuple(y.shape)}"
            )
        if x.shape[:-1] != y.shape[:-1]:
            raise ValueError(
                f"x and y must have the same leading dims, got {tuple(x.shape)}, {tuple(y.shape)}"
            )
        x = x.detach().reshape(-1, self.in_features).to(self.device, self.dtype)
        y = y.detach().reshape(-1, self.out_features).to(self.device, self.dtype)
        m = x.shape[0]
        if m == 0:
            return
        mx, my = x.mean(0), y.mean(0)
        xc, yc = x - mx, y - my
        self._merge_stats(m, mx, my, xc.T @ xc, xc.T @ yc, (yc * yc).sum(0))

    def merge(self, other: RidgeAccumulator) -> None:
        """Fold another accumulator's statistics into this one (e.g. after a gather)."""
        if (other.in_features, other.out_features) != (self.in_features, self.out_features):
            raise ValueError(
                f"cannot merge a ({other.in_features}->{other.out_features}) accumulator into "
                f"a ({self.in_features}->{self.out_features}) one"
            )
        if other.count == 0:
            return
        to = dict(device=self.device, dtype=self.dtype)
        self._merge_stats(
            other.count,
            other.mean_x.to(**to),
            other.mean_y.to(**to),
            other.cxx.to(**to),
            other.cxy.to(**to),
            other.cyy.to(**to),
        )

    def _merge_stats(
        self, m: int, mx: Tensor, my: Tensor, cxx: Tensor, cxy: Tensor, cyy: Tensor
    ) -> None:
        n = self.count
        total = n + m
        dx, dy = mx - self.mean_x, my - self.mean_y
        # Cross term of the pairwise (Chan) update: n*m/(n+m) * delta delta^T.
        k = n * m / total
        self.cxx += cxx + k * torch.outer(dx, dx)
        self.cxy += cxy + k * torch.outer(dx, dy)
        self.cyy += cyy + k * dy * dy
        self.mean_x += dx * (m / total)
        self.mean_y += dy * (m / total)
        self.count = total

    def state_dict(self) -> dict[str, Any]:
        return {
            "count": self.count,
            "mean_x": self.mean_x,
            "mean_y": self.mean_y,
            "cxx": self.cxx,
            "cxy": self.cxy,
            "cyy": self.cyy,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.count = int(state["count"])
        for name in ("mean_x", "mean_y", "cxx", "cxy", "cyy"):
            getattr(self, name).copy_(state[name])

    @torch.no_grad()
    def solve(self, l2: float = 0.0, fit_bias: bool = True) -> tuple[Tensor, Tensor]:
        """Return (weight (out, in), bias (out,)) in ``self.dtype``; see the class docstring.

        ``fit_bias=False`` fits W alone through the origin (bias returned as zeros). Cholesky of
        the (regularised) normal matrix is tried first; if it is not positive definite (rank
        deficient X with l2 = 0) the minimum-norm least-squares solution is used instead.
        """
        if self.count == 0:
            raise RuntimeError("RidgeAccumulator.solve() called before any update()")
        if l2 < 0:
            raise ValueError(f"l2 must be >= 0, got {l2}")
        n = self.count
        stats = (self.mean_x, self.mean_y, self.cxx, self.cxy)
        if not all(bool(torch.isfinite(t).all()) for t in stats):
            # one NaN / inf token spreads through the statistics; the solvers then failed with
            # a misleading "not positive definite" warning and a LAPACK parameter error
            raise ValueError(
                f"RidgeAccumulator.solve: the statistics of the {n} tokens hold NaN or inf: a "
                "non-finite input among them (check the cached latents and captured features)"
            )
        if fit_bias:
            a = self.cxx / n
            rhs = self.cxy / n
        else:
            # Uncentred second moments: E[x x^T] = C_xx/n + mx mx^T.
            a = self.cxx / n + torch.outer(self.mean_x, self.mean_x)
            rhs = self.cxy / n + torch.outer(self.mean_x, self.mean_y)
        a = a + l2 * torch.eye(self.in_features, dtype=self.dtype, device=self.device)
        # Symmetrise: the rank-1 updates leave asymmetry at the rounding level.
        a = 0.5 * (a + a.T)
        chol, info = torch.linalg.cholesky_ex(a)
        if int(info) == 0:
            w_t = torch.cholesky_solve(rhs, chol)
        else:
            logger.warning(
                "ridge normal matrix is not positive definite (l2=%g, %d tokens for %d inputs); "
                "falling back to minimum-norm lstsq",
                l2,
                n,
                self.in_features,
            )
            # gelsd (SVD based) handles rank deficiency; it exists on CPU only.
            w_t = torch.linalg.lstsq(a.cpu(), rhs.cpu(), driver="gelsd").solution.to(a.device)
        weight = w_t.T.contiguous()
        bias = self.mean_y - self.mean_x @ w_t if fit_bias else torch.zeros_like(self.mean_y)
        return weight, bias

    @torch.no_grad()
    def mse(self, weight: Tensor, bias: Tensor | None = None) -> float:
        """Exact mean squared error (over tokens and output channels) of ``x W^T + b`` on all
        accumulated tokens, from the statistics alone (no second pass over the data)."""
        w_t = weight.to(self.device, self.dtype).T
        b = (
            bias.to(self.device, self.dtype)
            if bias is not None
            else torch.zeros(self.out_features, dtype=self.dtype, device=self.device)
        )
        n = self.count
        # sum ||(x-mx)W^T - (y-my)||^2 + n ||mx W^T + b - my||^2
        centred = torch.sum((self.cxx @ w_t) * w_t) - 2 * torch.sum(self.cxy * w_t) + self.cyy.sum()
        offset = self.mean_x @ w_t + b - self.mean_y
        return float((centred + n * offset.square().sum()) / (n * self.out_features))

    @torch.no_grad()
    def target_variance(self) -> float:
        """Mean per-channel variance of Y: the MSE of predicting the mean, for R^2 logging."""
        return float(self.cyy.sum() / (self.count * self.out_features))


@torch.no_grad()
def init_linear_from_ridge(linear: nn.Linear, weight: Tensor, bias: Tensor | None) -> None:
    """Copy a ridge solution into an ``nn.Linear`` (cast to its dtype/device)."""
    if tuple(weight.shape) != tuple(linear.weight.shape):
        raise ValueError(
            f"weight shape {tuple(weight.shape)} does not match the Linear's "
            f"{tuple(linear.weight.shape)}"
        )
    linear.weight.copy_(weight.to(linear.weight))
    if linear.bias is not None:
        if bias is None:
            linear.bias.zero_()
        else:
            linear.bias.copy_(bias.to(linear.bias))
    elif bias is not None and bool(bias.abs().max() > 0):
        raise ValueError("the ridge solution has a non-zero bias but the Linear has no bias")


@torch.no_grad()
def init_from_ridge(module: nn.Module, weight: Tensor, bias: Tensor | None) -> None:
    """Like :func:`init_linear_from_ridge`, also for a kernel=stride Conv2d (fitted on
    :func:`patchify` features): the (out, C*p*p) weight is reshaped to (out, C, p, p)."""
    if isinstance(module, nn.Linear):
        init_linear_from_ridge(module, weight, bias)
        return
    if isinstance(module, nn.Conv2d):
        if module.kernel_size != module.stride or module.groups != 1 or module.padding != (0, 0):
            raise ValueError(
                "only kernel=stride, groups=1, padding=0 Conv2d embedders are affine in patches; "
                f"got kernel={module.kernel_size} stride={module.stride} "
                f"groups={module.groups} padding={module.padding}"
            )
        if weight.numel() != module.weight.numel() or weight.shape[0] != module.out_channels:
            raise ValueError(
                f"weight shape {tuple(weight.shape)} does not fit the Conv2d's "
                f"{tuple(module.weight.shape)} (expected (out, C*p*p))"
            )
        module.weight.copy_(weight.reshape(module.weight.shape).to(module.weight))
        if module.bias is not None:
            module.bias.copy_(bias.to(module.bias) if bias is not None else 0)
        return
    raise TypeError(f"expected nn.Linear or nn.Conv2d, got {type(module).__name__}")


def alignment_loss(pred: Tensor, target: Tensor) -> Tensor:
    """Stage-1 loss: MSE over tokens and channels, computed in fp32."""
    if pred.shape != target.shape:
        raise ValueError(
            f"pred and target shapes differ: {tuple(pred.shape)} vs {tuple(target.shape)}"
        )
    return F.mse_loss(pred.float(), target.float())


def _repeat(batches: Iterable[Any]) -> Iterator[Any]:
    """Re-iterate ``batches`` epoch after epoch (a list or a DataLoader restarts; a one-shot
    iterator simply ends). Unlike itertools.cycle this does not keep every batch alive."""
    while True:
        empty = True
        for batch in batches:
            empty = False
            yield batch
        if empty or iter(batches) is batches:
            return


def refine_sgd(
    embed_fn: Callable[[Any], Tensor],
    batches: Iterable[Any],
    target_fn: Callable[[Any], Tensor],
    params: Sequence[nn.Parameter] | Iterable[nn.Parameter],
    steps: int,
    lr: float,
    momentum: float = 0.0,
    optimizer: torch.optim.Optimizer | None = None,
    log_every: int = 0,
) -> list[float]:
    """SGD refinement of the embedder after the closed-form init.

    Each step takes the next batch (re-iterating ``batches`` as needed), computes the target
    ``target_fn(batch)`` without grad (e.g. the downsampled base token map), the prediction
    ``embed_fn(batch)`` (the new embedder's tokens), and takes one optimizer step on
    :func:`alignment_loss`. ``optimizer`` overrides the default ``SGD(params, lr, momentum)``.
    Because the loss is a mean over the D output channels too, full-batch gradient descent on
    this quadratic is stable for lr < D / lambda_max(E[x~ x~^T]) with x~ = [x, 1]; the closed
    form is already at the optimum, so keep lr well below that bound.
    Returns the loss of every step (before that step's update).
    """
    params = list(params)
    if optimizer is None:
        optimizer = torch.optim.SGD(params, lr=lr, momentum=momentum)
    losses: list[float] = []
    for step, batch in enumerate(_repeat(batches)):
        if step >= steps:
            break
        with torch.no_grad():
            target = target_fn(batch)
        loss = alignment_loss(embed_fn(batch), target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
        if log_every and (step % log_every == 0 or step == steps - 1):
            logger.info("align step %d/%d: loss %.6g", step + 1, steps, losses[-1])
    if len(losses) < steps:
        logger.warning("batches ran out after %d of %d refinement steps", len(losses), steps)
    return losses
