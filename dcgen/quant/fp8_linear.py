"""FP8Linear: an nn.Linear with an FP8 (E4M3) weight and dynamically quantized activations.

Buffers (the vLLM / compressed-tensors FP8 convention, scales as *decode* scales):

- ``weight`` float8_e4m3fn [N, K]
- ``weight_scale`` fp32 [N, 1] (granularity "row") or [N, ceil(K/128)] ("block128")
- ``bias`` (optional) 16-bit parameter, like NVFP4Linear's

Forward: activations [..., K] are quantized per row (token) or per 1x128 block on the fly
(:func:`dcgen.ops.quantize_fp8`: the fused CUDA kernel when built), then
:func:`dcgen.quant.fp8.fp8_gemm` (torch._scaled_mm or the exact reference). The pure-PyTorch
spec of the whole layer is :meth:`FP8Linear.reference_forward`.

Gradients (LoRA on a quantized base, QLoRA style): the weight is frozen; the input gradient is
the straight-through one, ``dx = dy @ deq(W)`` (rounding has no useful derivative), and the
bias gets ``dy`` summed when it requires grad.
"""

from __future__ import annotations

import torch
from torch import nn

from dcgen.ops import quantize_fp8 as _qop

from .fp8 import fp8_gemm, fp8_linear_reference, quantize_fp8_weight

_FORMAT_BUFFERS = ("weight", "weight_scale")


def _forward(x2: torch.Tensor, layer: FP8Linear, gemm: bool) -> torch.Tensor:
    """[M, K] -> [M, N] in x2's dtype; ``gemm`` False runs the pure reference end to end."""
    if gemm:
        xq, xs = _qop.quantize_fp8(x2, layer.granularity)
        return fp8_gemm(
            xq, xs, layer.weight, layer.weight_scale, layer.bias, x2.dtype, layer.granularity
        )
    xq, xs = _qop.quantize_fp8_reference(x2, layer.granularity)
    return fp8_linear_reference(xq, xs, layer.weight, layer.weight_scale, layer.bias, x2.dtype)


class _FP8LinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x2: torch.Tensor, bias: torch.Tensor | None, layer: FP8Linear) -> torch.Tensor:  # noqa: ANN001
        ctx.layer = layer
        ctx.has_bias = bias is not None
        return _forward(x2, layer, gemm=True)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):  # noqa: ANN001, ANN205
        layer: FP8Linear = ctx.layer
        dx = None
        if ctx.needs_input_grad[0]:
            dx = (dy.float() @ layer.dequantized_weight()).to(dy.dtype)
        db = None
        if ctx.has_bias and ctx.needs_input_grad[1]:
            db = dy.float().sum(0).to(layer.bias.dtype)
        return dx, db, None


class FP8Linear(nn.Module):
    """Linear layer with an FP8 weight (W8A8); build with :meth:`from_linear`."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        granularity: str = "row",
        dtype: torch.dtype = torch.bfloat16,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        _qop.check_granularity(granularity)
        if in_features < 1 or out_features < 1:
            raise ValueError(
                f"FP8Linear: expected positive in/out features, got {in_features}, {out_features}"
            )
        self.in_features, self.out_features = in_features, out_features
        self.granularity = granularity
        n, k = out_features, in_features
        s = _qop.fp8_scale_count(k, granularity)
        self.register_buffer("weight", torch.zeros(n, k, dtype=torch.float8_e4m3fn, device=device))
        self.register_buffer("weight_scale", torch.ones(n, s, device=device))
        self.bias = nn.Parameter(torch.zeros(n, dtype=dtype, device=device)) if bias else None

    @classmethod
    def from_linear(
        cls, linear: nn.Linear, granularity: str = "row", dtype: torch.dtype = torch.bfloat16
    ) -> FP8Linear:
        """Quantize ``linear`` (its weight must be finite)."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"FP8Linear.from_linear: expected nn.Linear, got {type(linear)}")
        w = linear.weight.detach()
        n, k = w.shape
        mod = cls(k, n, linear.bias is not None, granularity, dtype, w.device)
        q, s = quantize_fp8_weight(w, granularity)
        mod.weight.copy_(q)
        mod.weight_scale.copy_(s)
        if linear.bias is not None:
            mod.bias.data.copy_(linear.bias.detach())
        return mod

    def _apply(self, fn, recurse=True):  # noqa: ANN001, ANN202
        # model.to(dtype) / .half() must not touch the format: the e4m3 weight and fp32 scales
        # only follow the device (float8 counts as floating point, so .to(bf16) would cast it).
        keep = {n: self._buffers[n] for n in _FORMAT_BUFFERS}
        for n in keep:
            self._buffers[n] = None
        try:
            super()._apply(fn, recurse)
        finally:
            # fn on a probe tells the target device (the bias may be absent).
            dev = fn(torch.zeros((), device=keep["weight_scale"].device)).device
            for n, t in keep.items():
                self._buffers[n] = t.to(dev)
        return self

    def dequantized_weight(self) -> torch.Tensor:
        """fp32 [N, K]: ``float(weight) * weight_scale`` (per row or 1x128 block)."""
        return _qop.dequantize_fp8(self.weight, self.weight_scale)

    def _check(self, x: torch.Tensor) -> None:
        if not isinstance(x, torch.Tensor) or x.shape[-1:] != (self.in_features,):
            got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(
                f"FP8Linear: expected input with last dim {self.in_features}, got {got}"
            )
        if not x.is_floating_point() or x.dtype == torch.float64 or x.element_size() == 1:
            raise TypeError(f"FP8Linear: expected a float32/float16/bfloat16 input, got {x.dtype}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check(x)
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        bias = self.bias
        if torch.is_grad_enabled() and (
            x.requires_grad or (bias is not None and bias.requires_grad)
        ):
            y = _FP8LinearFn.apply(x2, bias, self)
        else:
            y = _forward(x2, self, gemm=True)
        return y.reshape(*lead, self.out_features)

    def reference_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The layer's spec in pure PyTorch: reference quantize, exact dequantize, fp32 matmul."""
        self._check(x)
        y = _forward(x.reshape(-1, self.in_features), self, gemm=False)
        return y.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, granularity={self.granularity}"
        )
