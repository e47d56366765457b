"""NVFP4Linear: an nn.Linear whose weight is stored in NVFP4 (reference path, runs anywhere).

Buffers follow the ModelOpt / vLLM checkpoint convention:

- ``weight`` uint8 [N, K/2], ``weight_scale`` float8_e4m3fn [N, K/16] (row-major),
  ``weight_scale_2`` fp32 scalar (the weight's decode scale), ``input_scale`` fp32 scalar
  (W4A4 static activation decode scale; 0 means dynamic: amax of each call's activations).
- ``bias`` (optional, bf16 by default).
- SVDQuant low-rank branch (``rank`` > 0): ``lora_down`` [r, K] and ``lora_up`` [N, r] in 16-bit.
- ``smooth`` [K] fp32 (optional): per-input-channel smoothing factors s.

Math (the reference; fp32 accumulation, one rounding to the input dtype):

    x' = x / s                                   (when smoothing; W' = W * s per column)
    W' = lora_up @ lora_down + R                 (rank-r SVD of W'; R = W' - the 16-bit L1 L2)
    y  = x' @ deq(R)^T + (x' @ lora_down^T) @ lora_up^T + bias
    w4a16: x' used as is;  w4a4: x' -> dequantize(quantize_nvfp4(x', input_scale or dynamic))

Smoothing rule (SmoothQuant / SVDQuant): ``s_j = max|x_j|^alpha / max|W_:,j|^(1 - alpha)``,
clamped to [1e-5, 1e5], 1 where a channel's activation or weight maximum is 0 (see
:func:`smoothing_factors`). It moves activation outliers into the weight, where the
low-rank branch can absorb them.

The direct W4A4 route (inference on a bf16 input, no low-rank branch or smoothing, native
NVFP4 GEMM built for the device: Blackwell, or Hopper with ``DCGEN_NVFP4_SM90=1``). A native
FP4 GEMM at FLUX's 4K shapes is tens of microseconds on an RTX 5090, while the general path
spent 50-100 us of Python per call on checks and path decisions with a static activation
scale (stubbed ops, this project's CPU: ``benchmarks/test_host_time.py``), so in eager mode
the host would set the pace. The route takes 1.7-2.2x less (28-50 us); with the dynamic
scale, whose amax and products are five more small ops per call, 1.1-1.45x less. The
decision is made once per (device, dtype, bias dtype, environment) and cached on the layer;
each call then runs the quantize kernel and the GEMM directly, with the static activation
scale's product with ``weight_scale_2`` computed once. Same ops, same arguments, same bits as
the general path.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from dcgen.ops import has_kernel
from dcgen.ops import nvfp4_gemm as _gemm
from dcgen.ops import quantize_nvfp4 as _qop

from . import dequant_path as _dequant_path
from .direct_route import direct_ops, takes_direct_route
from .format_buffers import apply_keeping_format, compute_dtype
from .nvfp4 import (
    BLOCK,
    dequantize_parts,
    global_decode_scale,
    quantize_nvfp4,
    swizzle_scales,
    unswizzle_scales,
)

MODES = ("w4a16", "w4a4")
_FORMAT_BUFFERS = ("weight_scale", "weight_scale_2", "input_scale", "smooth")
# What the direct route's decision depends on besides the layer and the input.
_ROUTE_ENV = ("DCGEN_DISABLE_KERNELS", _gemm.HOPPER_ENV)
_OPS = ("quantize_nvfp4", "nvfp4_gemm")


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"NVFP4: expected mode in {MODES}, got {mode!r}")
    return mode


def smoothing_factors(
    act_amax: torch.Tensor, weight: torch.Tensor, alpha: float = 0.5
) -> torch.Tensor:
    """``s_j = act_amax_j^alpha / max_i |W_ij|^(1-alpha)`` (fp32, [K]); see the module doc."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"smoothing_factors: expected alpha in [0, 1], got {alpha}")
    k = weight.shape[-1]
    if act_amax.shape != (k,):
        raise ValueError(
            f"smoothing_factors: expected act_amax of shape ({k},) to match the weight's "
            f"{k} input channels, got {tuple(act_amax.shape)}"
        )
    a = act_amax.detach().float()
    w = weight.detach().float().abs().amax(dim=0)
    s = a.pow(alpha) / w.pow(1.0 - alpha)
    ok = (a > 0) & (w > 0) & torch.isfinite(s)
    return torch.where(ok, s.clamp(1e-5, 1e5), torch.ones_like(s))


class _StraightThrough(torch.autograd.Function):
    """Forward: the rounded ``q``; backward: the gradient of ``x`` unchanged (rounding has no
    useful derivative), so layers before a W4A4 layer still train (LoRA on a quantized model)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, q: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
        return q.view_as(q)

    @staticmethod
    def backward(ctx, g: torch.Tensor):  # noqa: ANN001, ANN205
        return g, None


class NVFP4Linear(nn.Module):
    """Linear layer with an NVFP4 weight; build with :meth:`from_linear`.

    Like ``nn.Linear``, the layer does not check its input for NaN / Inf: that check costs a
    device synchronisation per call (W4A4 quantizes the input on every call). E2M1 cannot
    encode them, so a 16-element block holding one gives a non-finite or zero result there;
    :func:`dcgen.ops.quantize_nvfp4.quantize_nvfp4_activation` called directly does check.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        mode: str = "w4a16",
        rank: int = 0,
        smooth: bool = False,
        dtype: torch.dtype = torch.bfloat16,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        check_mode(mode)
        if in_features % BLOCK:
            raise ValueError(
                f"NVFP4Linear: expected in_features (K) to be a multiple of {BLOCK}, "
                f"got {in_features}"
            )
        if not 0 <= rank <= min(in_features, out_features):
            raise ValueError(
                f"NVFP4Linear: expected 0 <= rank <= min(K, N) = "
                f"{min(in_features, out_features)}, got {rank}"
            )
        self.in_features, self.out_features = in_features, out_features
        self.mode, self.rank = mode, rank
        k, n = in_features, out_features
        self.register_buffer("weight", torch.zeros(n, k // 2, dtype=torch.uint8, device=device))
        self.register_buffer(
            "weight_scale", torch.zeros(n, k // BLOCK, dtype=torch.float8_e4m3fn, device=device)
        )
        # fp32 whatever torch's default dtype (a bf16 default rounded the global scales)
        self.register_buffer("weight_scale_2", torch.ones((), dtype=torch.float32, device=device))
        self.register_buffer("input_scale", torch.zeros((), dtype=torch.float32, device=device))
        bias_param = nn.Parameter(torch.zeros(n, dtype=dtype, device=device)) if bias else None
        self.register_parameter("bias", bias_param)  # in _parameters even when None
        if rank:
            self.register_buffer("lora_down", torch.zeros(rank, k, dtype=dtype, device=device))
            self.register_buffer("lora_up", torch.zeros(n, rank, dtype=dtype, device=device))
        else:
            self.register_buffer("lora_down", None)
            self.register_buffer("lora_up", None)
        smooth_buffer = torch.ones(k, dtype=torch.float32, device=device) if smooth else None
        self.register_buffer("smooth", smooth_buffer)

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        mode: str = "w4a16",
        rank: int = 0,
        smooth: torch.Tensor | None = None,
        dtype: torch.dtype = torch.bfloat16,
    ) -> NVFP4Linear:
        """Quantize ``linear``. ``smooth``: per-input-channel factors s [K] (see
        :func:`smoothing_factors`), folded into the weight as W * s."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"NVFP4Linear.from_linear: expected nn.Linear, got {type(linear)}")
        w = linear.weight.detach().float()
        n, k = w.shape
        mod = cls(k, n, linear.bias is not None, mode, rank, smooth is not None, dtype, w.device)
        if smooth is not None:
            if smooth.shape != (k,):
                raise ValueError(
                    f"NVFP4Linear.from_linear: expected smooth of shape ({k},), "
                    f"got {tuple(smooth.shape)}"
                )
            s = smooth.detach().float().to(w.device)
            bad = int((~torch.isfinite(s) | (s == 0)).sum())
            if bad:  # a zero factor divides the activations by zero on every forward
                raise ValueError(
                    f"NVFP4Linear.from_linear: expected finite, non-zero smooth factors, got "
                    f"{bad} zero/NaN/Inf of {k}"
                )
            mod.smooth.copy_(s)
            w = w * s
        if rank:
            u, sv, vh = torch.linalg.svd(w, full_matrices=False)
            root = sv[:rank].sqrt()
            mod.lora_up.copy_(u[:, :rank] * root)
            mod.lora_down.copy_(root[:, None] * vh[:rank])
            # The residual absorbs the 16-bit rounding of the factors.
            w = w - mod.lora_up.float() @ mod.lora_down.float()
        q = quantize_nvfp4(w)
        mod.weight.copy_(q.packed)
        mod.weight_scale.copy_(q.scales)
        mod.weight_scale_2.copy_(q.global_scale)
        if linear.bias is not None:
            mod.bias.data.copy_(linear.bias.detach())
        return mod

    def _apply(self, fn, recurse=True):  # noqa: ANN001, ANN202
        # model.to(dtype) / .half() must not touch the format: the E4M3 scales and the fp32
        # scalars / smoothing factors only follow the device (the uint8 weight is never cast).
        # Every other fn (to_empty, share_memory, a device move) reaches them (format_buffers).
        self.__dict__.pop("_route", None)  # the direct route is decided again (device, bias)
        self.__dict__.pop("_memo_cache", None)  # derived from (and holding) the old buffers
        apply_keeping_format(
            self, _FORMAT_BUFFERS, fn, lambda: super(NVFP4Linear, self)._apply(fn, recurse)
        )
        return self

    def clear_cache(self) -> None:
        """Forget what was derived from the buffers (the calibrated-or-dynamic choice of
        ``input_scale``, the swizzled weight scales, the direct GEMM route). Writes through
        ``copy_`` / ``load_state_dict`` / ``.to`` are noticed on their own; call this after
        writing a buffer through ``.data`` (no version counter moves) or in inference mode."""
        self.__dict__.pop("_memo_cache", None)
        self.__dict__.pop("_route", None)

    def _memo(
        self, key: str, source: torch.Tensor | tuple[torch.Tensor, ...], make: Callable[[], Any]
    ) -> Any:
        """``make()``, computed again only when ``source`` (one tensor or several) changed: another
        tensor (``.to``, a deep copy, a buffer assigned or loaded with ``assign=True``) or an
        in-place write (``copy_``, ``load_state_dict``: its version counter). Keeps per-call
        work off the hot path: the swizzled weight scales (several small kernels) and the host
        read of ``input_scale`` (a device sync on every call otherwise). Skipped under
        torch.compile (it traces ``make``) and for inference-mode buffers (no version counter).

        The entry holds the source tensors themselves and compares them by identity: a tag of
        data pointers let a new buffer that the allocator placed at a freed one's address, with
        the same version count, pass for it and get the old buffer's derived value."""
        if torch.compiler.is_compiling():
            return make()
        sources = source if isinstance(source, tuple) else (source,)
        try:
            versions = tuple(t._version for t in sources)
        except RuntimeError:  # an inference tensor: no version counter to trust
            return make()
        memo = self.__dict__.setdefault("_memo_cache", {})
        hit = memo.get(key)
        if (
            hit is not None
            and len(hit[0]) == len(sources)
            and all(a is b for a, b in zip(hit[0], sources))
            and hit[1] == versions
        ):
            return hit[2]
        value = make()
        memo[key] = (sources, versions, value)
        return value

    def _swizzled_weight_scales(self) -> torch.Tensor:
        return self._memo("w_scales", self.weight_scale, lambda: swizzle_scales(self.weight_scale))

    @property
    def compute_dtype(self) -> torch.dtype:
        """The dtype this layer computes in (format_buffers.compute_dtype)."""
        return compute_dtype(self)

    def dequantized_weight(self) -> torch.Tensor:
        """The residual weight R (the whole W' when rank is 0), fp32 [N, K]."""
        return dequantize_parts(self.weight, self.weight_scale, self.weight_scale_2)

    def reference_main(self, xf: torch.Tensor, static: torch.Tensor | None) -> torch.Tensor:
        """The quantized product (no low-rank branch, no bias) by the pure-PyTorch spec, fp32:
        ``xf @ deq(R)^T`` (W4A16) or ``deq(quant(xf)) @ deq(R)^T`` (W4A4, the gradient passed
        straight through the activation rounding)."""
        if self.mode == "w4a4":
            xq = _StraightThrough.apply(xf, self._fake_quantize_input(xf, static))
            return xq @ self.dequantized_weight().t()
        return xf @ self.dequantized_weight().t()

    def _fake_quantize_input(self, xf: torch.Tensor, static: torch.Tensor | None) -> torch.Tensor:
        # dequantize(quantize_nvfp4(x)) through the activation-quantize op (the fused kernel
        # where built: swizzled scales, as a Blackwell GEMM would read them).
        x2 = xf.reshape(-1, xf.shape[-1])
        packed, swizzled, gs = _qop.quantize_nvfp4_activation(x2, static, check_finite=False)
        scales = unswizzle_scales(swizzled, x2.shape[0], x2.shape[1])
        return dequantize_parts(packed, scales, gs).reshape(xf.shape)

    def _native_w4a4(self, xs: torch.Tensor, static: torch.Tensor | None) -> torch.Tensor | None:
        # Blackwell (sm_100) with the compiled GEMM: quantize x once and multiply the packed
        # operands; the result matches x_q @ deq(R)^T up to fp32 summation order, rounded once
        # to bf16 by the GEMM, and is returned as the kernel gives it (bf16). None where the
        # kernel is not available (the reference runs).
        n, k = self.out_features, self.in_features
        if not _gemm.kernel_available(xs.device, n, k):
            return None
        if torch.is_grad_enabled() and xs.requires_grad:
            return None  # training through the layer: the paths with a straight-through grad
        x2 = xs.reshape(-1, k)
        packed, swizzled, gs = _qop.quantize_nvfp4_activation(x2, static, check_finite=False)
        w_scales = self._swizzled_weight_scales()
        y = _gemm.nvfp4_gemm(packed, swizzled, self.weight, w_scales, gs * self.weight_scale_2)
        return y.reshape(*xs.shape[:-1], n)

    def _finish_16bit(self, y16: torch.Tensor, x: torch.Tensor) -> torch.Tensor | None:
        """A native GEMM's bf16 result as the layer's output, the bias (if any) added in bf16,
        for a bf16 input without low-rank branch or smoothing; None otherwise (the general fp32
        form adds them). The fp32 form would widen the output and round it back: three more
        passes over it, which at FLUX shapes on Blackwell take longer than the FP4 GEMM itself.
        One more bf16 rounding (the bias add) than the fp32 reference, as the other 16-bit
        forms (dequant_path.py)."""
        bias = self.bias
        if self.rank or self.smooth is not None or y16.dtype != x.dtype:
            return None
        if bias is not None and bias.dtype != y16.dtype:
            return None
        return y16 if bias is None else y16.add_(bias)

    def _native_w4a16(self, x: torch.Tensor) -> torch.Tensor | None:
        # Hopper (sm_90a, opt-in: dcgen.ops.nvfp4_gemm) with a bf16 input and no smoothing:
        # the weight dequantized in the GEMM's mainloop, never materialised in 16 bits; the
        # bf16 result as the kernel returns it. None where that kernel does not apply (the
        # dequantize + cuBLAS path or the reference runs).
        n, k = self.out_features, self.in_features
        if x.dtype != torch.bfloat16 or self.smooth is not None:
            return None
        if not _gemm.w4a16_kernel_available(x.device, k):
            return None
        if torch.is_grad_enabled() and x.requires_grad:
            return None
        w_scales = self._swizzled_weight_scales()
        y = _gemm.nvfp4_gemm_w4a16(x.reshape(-1, k), self.weight, w_scales, self.weight_scale_2)
        return y.reshape(*x.shape[:-1], n)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        x = input  # nn.Linear's parameter name: a drop-in layer is also called as layer(input=x)
        if not isinstance(x, torch.Tensor) or x.shape[-1:] != (self.in_features,):
            got = f"shape {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(
                f"NVFP4Linear: expected input with last dim {self.in_features}, got {got}"
            )
        if not x.is_floating_point() or x.element_size() == 1:
            # an integer input came back as truncated integers (nn.Linear raises)
            raise TypeError(
                f"NVFP4Linear: expected a floating-point (16/32/64-bit) input, got {x.dtype}"
            )
        # Dispatch by device: the native NVFP4 GEMM where compiled (Blackwell block-scaled W4A4;
        # on Hopper, opt-in, the mainloop-dequantizing wgmma GEMMs for W4A4 and W4A16); else on
        # CUDA GPUs (Hopper, Ampere) the dequantize + cuBLAS path (dequant_path.py: a bf16
        # input runs in bf16 there, before any fp32 copy of x is made; with W4A4 + a low-rank
        # branch, from one read of x by the fused quantize); the pure-PyTorch reference
        # everywhere else.
        if self._direct(x):
            return self._direct_forward(x)
        y = None
        fast = _dequant_path.available(x.device)
        if self.mode == "w4a16":
            y16 = self._native_w4a16(x)
            if y16 is not None:
                out = self._finish_16bit(y16, x)
                if out is not None:
                    return out
                y = y16.float()
            if y is None and fast:
                out = _dequant_path.forward_16bit(self, x)
                if out is not None:
                    return out
        if self.mode == "w4a4" and self._fused_lowrank_applies(x, fast):
            return self._w4a4_fused_lowrank(x)
        # The activation operand: x itself without smoothing (quantizing a 16-bit x gives the
        # codes of its fp32 copy, so the paths below need no copy), else x / s in fp32.
        xs = x if self.smooth is None else x.float() / self.smooth
        static = self._activation_scale(x) if self.mode == "w4a4" else None
        if self.mode == "w4a4":
            y16 = self._native_w4a4(xs, static)
            if y16 is not None:
                out = self._finish_16bit(y16, x)
                if out is not None:
                    return out
                y = y16.float()
        if y is None and fast:
            if self.mode == "w4a4":  # inference on a 16-bit input: all in that dtype
                out = _dequant_path.forward_w4a4_16bit(self, x, xs, static)
                if out is not None:
                    return out
            y = _dequant_path.forward_main(self, x, xs, static)
        xf = xs.float()  # the reference's fp32 operand (no copy when xs already is fp32)
        if y is None:
            y = self.reference_main(xf, static)
        if self.rank:
            y = y + (xf @ self.lora_down.float().t()) @ self.lora_up.float().t()
        if self.bias is not None:
            y = y + self.bias.float()
        return y.to(x.dtype)

    def _direct(self, x: torch.Tensor) -> bool:
        """Whether this call takes the direct W4A4 route (module doc; the gate in
        direct_route.py): W4A4 without low-rank branch or smoothing, a bf16 input and bias, and
        the quantize kernel and a native GEMM built for the device."""
        bias = self._parameters.get("bias")  # not self.bias: nn.Module.__getattr__, ~1 us

        def decide() -> bool:
            return (
                self.mode == "w4a4"
                and not self.rank
                and self.smooth is None
                and x.dtype == torch.bfloat16
                and (bias is None or bias.dtype == x.dtype)
                and self.weight.is_contiguous()
                and has_kernel("quantize_nvfp4", x.device)
                and _gemm.kernel_available(x.device, self.out_features, self.in_features)
            )

        return takes_direct_route(
            self, x, self.in_features, bias, (self.smooth is None,), _ROUTE_ENV, decide
        )

    def _direct_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The quantize kernel and the native GEMM, as :meth:`_native_w4a4` and
        :meth:`_finish_16bit` run them, without their checks (done once by :meth:`_direct`)."""
        k, n = self.in_features, self.out_features
        x2 = x.reshape(-1, k)
        if not x2.is_contiguous():
            x2 = x2.contiguous()
        w_scales, gs, alpha = self._direct_constants(x)
        if gs is None:  # dynamic: this call's amax
            gs = global_decode_scale(x2)
            alpha = gs * self.weight_scale_2
        quantize, gemm = direct_ops(*_OPS)
        packed, swizzled = quantize(x2, gs)
        if x2.shape[0] * max(n, k) < _gemm.INDEX_LIMIT:
            y = gemm(packed, swizzled, self.weight, w_scales, alpha)
        else:  # beyond the kernels' 32-bit indexing: the public op splits the rows
            y = _gemm.nvfp4_gemm(packed, swizzled, self.weight, w_scales, alpha)
        bias = self._parameters.get("bias")
        if bias is not None:
            y.add_(bias)
        return y.reshape(*x.shape[:-1], n)

    def _direct_constants(
        self, x: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """(swizzled weight scales, static activation decode scale, its product with
        ``weight_scale_2``), the last two None for a dynamic scale; one memo over the three
        buffers they come from (inference-mode buffers, which have no version counter: the
        general path's per-call forms)."""
        s, ws2 = self.input_scale, self.weight_scale_2

        def make() -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
            static = self._activation_scale(x)
            alpha = None if static is None else static * ws2
            return self._swizzled_weight_scales(), static, alpha

        if s.is_inference():
            return make()
        return self._memo("direct", (self.weight_scale, s, ws2), make)

    def _activation_scale(self, x: torch.Tensor) -> torch.Tensor | None:
        """W4A4's activation decode scale: ``input_scale`` when calibrated (> 0), None for the
        dynamic one (computed per call by the quantize). Whether it is calibrated is a host
        read, cached per buffer version. An inference-mode buffer has no version counter, so
        there the choice is made on the device instead (the dynamic scale of ``x / s`` is
        computed and one of the two selected): one reduction over x more than a static layer
        needs, but no device sync per call, and no fp32 copy x / s."""
        s = self.input_scale
        if s.is_inference() and not torch.compiler.is_compiling():
            return torch.where(s > 0, s, _qop.smoothed_decode_scale(x, self.smooth))
        return s if self._memo("static", s, lambda: float(s) > 0) else None

    def _fused_lowrank_applies(self, x: torch.Tensor, dequant_path: bool) -> bool:
        """W4A4 inference with a low-rank branch on a bf16 input, where the fused quantize +
        down-projection kernel runs and a GEMM path takes its codes: the native NVFP4 GEMM
        (bf16 output) or the dequantize path."""
        if not self.rank or x.dtype != torch.bfloat16:  # fp16: see dequant_path._fits_16bit
            return False
        if self.lora_down.dtype != x.dtype or self.rank not in _qop.LOWRANK_KERNEL_RANKS:
            return False
        if self.bias is not None and self.bias.dtype != x.dtype:
            return False
        if torch.is_grad_enabled() and x.requires_grad:
            return False  # training through the layer: the straight-through paths
        if not has_kernel("quantize_nvfp4_lowrank", x.device):
            return False
        native = _gemm.kernel_available(x.device, self.out_features, self.in_features)
        return native or dequant_path

    def _w4a4_fused_lowrank(self, x: torch.Tensor) -> torch.Tensor:
        """W4A4 + low-rank branch in ``x``'s dtype from one read of ``x``: the fused kernel
        quantizes ``x / s`` and projects it onto ``lora_down`` (t, fp32); the branch
        ``t @ lora_up^T + bias`` is one 16-bit GEMM; the main product is the native NVFP4 GEMM
        (bf16, global scales applied inside) plus the branch, or on the dequantize path the
        16-bit GEMM of the exact operands, then scales and branch in one pass. One or two
        16-bit roundings more than the fp32 reference (t, the branch, the sum), as the other
        16-bit forms (dequant_path.py)."""
        k, n, dt = self.in_features, self.out_features, x.dtype
        x2 = x.reshape(-1, k)
        packed, swizzled, gs, t = _qop.quantize_nvfp4_lowrank(
            x2, self.lora_down, self._activation_scale(x), self.smooth, check_finite=False
        )
        branch = _dequant_path.lowrank_up_16bit(self, t.to(dt))
        if _gemm.kernel_available(x.device, n, k):
            w_scales = self._swizzled_weight_scales()
            y = _gemm.nvfp4_gemm(packed, swizzled, self.weight, w_scales, gs * self.weight_scale_2)
            out = y.add_(branch)
        else:
            y = _dequant_path.product_16bit(self, packed, swizzled, dt)
            out = _dequant_path.scaled_sum(y, gs * self.weight_scale_2, branch)
        return out.reshape(*x.shape[:-1], n)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, mode={self.mode}, rank={self.rank}, "
            f"smooth={self.smooth is not None}"
        )
