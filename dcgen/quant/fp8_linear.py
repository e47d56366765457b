"""FP8Linear: an nn.Linear with an FP8 (E4M3) weight and dynamically quantized activations.

Buffers (the vLLM / compressed-tensors FP8 convention, scales as *decode* scales):

- ``weight`` float8_e4m3fn [N, K]
- ``weight_scale`` fp32 [N, 1] (granularity "row") or [N, ceil(K/128)] ("block128")
- ``bias`` (optional) 16-bit parameter, like NVFP4Linear's

Forward: activations [..., K] are quantized per row (token) or per 1x128 block on the fly
(:func:`dcgen.ops.quantize_fp8`: the fused CUDA kernel when built), then
:func:`dcgen.quant.fp8.fp8_gemm` (torch._scaled_mm or the exact reference). The pure-PyTorch
spec of the whole layer is :meth:`FP8Linear.reference_forward`.

The direct route (inference, bf16, row scales, kernels built: every FLUX / SANA linear in a
quantized pipeline). A GEMM at FLUX's 4K shapes takes about 0.1 ms on an H200 in FP8, while
the general path spent 40-90 us of Python per call on checks and route decisions (measured
with stubbed ops on this project's CPU: ``benchmarks/test_host_time.py``), on top of three op
dispatches, so the host, not the GPU, set the pace. The route decision is made once per
(device, dtype, environment) and cached on the layer; each call then runs, directly, the
quantize kernel and the GEMM route :func:`dcgen.quant.fp8.row_gemm_route` picks: "tensor",
``torch._scaled_mm`` with unit scales then the scale epilogue kernel, or "rowwise",
``torch._scaled_mm`` with the row scales and the bias (then GELU where asked). Same ops, same
arguments, same bits as the general path. On the "tensor" route two variants serve the fused
DiT blocks: ``forward_into`` (the epilogue writes into part of a caller's buffer) and
``forward_quantized`` (the epilogue also returns its output's FP8 row quantization, for the next
FP8 linear); on "rowwise" ``forward_into`` copies the output in, and ``forward_quantized``
with GELU runs GELU and the quantization in one epilogue kernel pass at unit scales (without
GELU it returns no quantization: there is no pass to save).

Gradients (LoRA on a quantized base, QLoRA style): the weight is frozen; the input gradient is
the straight-through one, ``dx = dy @ deq(W)`` (rounding has no useful derivative), and the
bias gets ``dy`` summed when it requires grad.
"""

from __future__ import annotations

import contextlib
import threading
import weakref

import torch
from torch import nn

from dcgen._hooks import forward_wrapped
from dcgen.ops import has_kernel
from dcgen.ops import quantize_fp8 as _qop
from dcgen.ops.fp8_epilogue import kernel_rows

from . import fp8 as _fp8
from .direct_route import direct_ops, takes_direct_route
from .format_buffers import apply_keeping_format, compute_dtype
from .fp8 import fp8_gemm, fp8_linear_reference, quantize_fp8_weight

_FORMAT_BUFFERS = ("weight", "weight_scale")


class _SharedInputQuantization(threading.local):
    """Quantize an activation once when several FP8 linears read it.

    Its state (scope depth, the remembered quantization, the offers) is per thread: two
    threads serving two models at once each see their own (shared, one thread's cached
    quantization was returned for the other's input: wrong outputs).

    A FLUX double block's to_q / to_k / to_v read one tensor, a single block's projections and
    its MLP input another; they run one after another, so remembering the last (input,
    granularity) saves all but the first quantize pass. The reuse is scoped: it is only on
    inside the forward of a module registered with :func:`share_input_quantization`, module
    types whose code never modifies that input in place between the projections, and it ends
    with that forward. Inside, the input matches by identity (weak reference), storage, shape,
    strides and, where torch tracks it (not for inference-mode tensors), the in-place version.
    Off while compiling (Inductor deduplicates the traced quantizations) and under autograd.

    Offers (:meth:`offered`): code that produced an activation together with its row
    quantization (dcgen.ops.adaln_modulate_fp8: the fused FLUX blocks) hands it over for the
    span of a ``with`` block; the linears reading that exact tensor (same match) take it
    instead of quantizing, in or out of a registered module's forward."""

    def __init__(self) -> None:
        self.depth = 0
        self._offers: list[tuple[weakref.ref, tuple, tuple[torch.Tensor, torch.Tensor]]] = []
        self.clear()

    def clear(self) -> None:
        self._ref: weakref.ref | None = None
        self._key: tuple = ()
        self._value: tuple[torch.Tensor, torch.Tensor] | None = None

    @staticmethod
    def _key_of(x: torch.Tensor, granularity: str) -> tuple:
        version = None if x.is_inference() else x._version
        return (version, x.data_ptr(), granularity, x.shape, x.stride())

    def offered(self, x: torch.Tensor, quantized: tuple[torch.Tensor, torch.Tensor]) -> _Offer:
        """While the block runs, ``quantized`` = (codes of x's shape, row scales
        ``(*x.shape[:-1], 1)``), exactly ``quantize_fp8(x, "row")``, stands for x's row
        quantization (a context manager)."""
        return _Offer(self, (weakref.ref(x), self._key_of(x, "row"), quantized))

    def _offer_for(self, x: torch.Tensor, granularity: str) -> tuple | None:
        if not self._offers or granularity != "row":
            return None
        for ref, key, value in self._offers:
            # identity first: the key (a tuple of five tensor properties) only for a candidate
            if ref() is x and key == self._key_of(x, granularity):
                return value
        return None

    def quantize(self, x: torch.Tensor, granularity: str) -> tuple[torch.Tensor, torch.Tensor]:
        if torch.compiler.is_compiling() or torch.is_grad_enabled():
            return _qop.quantize_fp8(x, granularity)
        offer = self._offer_for(x, granularity)
        if offer is not None:
            return offer
        if self.depth == 0:
            return _qop.quantize_fp8(x, granularity)
        return self._reuse(x, granularity, lambda: _qop.quantize_fp8(x, granularity))

    def quantize_rows_direct(self, x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The direct route's quantize (checks done by the caller): the row kernel on x as
        [M, K], shared like :meth:`quantize`; returns ([M, K] codes, [M, 1] scales)."""
        if torch.is_grad_enabled():  # as quantize: no reuse under autograd
            return direct_ops(*_OPS)[0](x.reshape(-1, k).contiguous(), 0)
        offer = self._offer_for(x, "row")
        if offer is not None:
            return offer[0].reshape(-1, k), offer[1].reshape(-1, 1)
        if self.depth == 0:
            return direct_ops(*_OPS)[0](x.reshape(-1, k).contiguous(), 0)
        q, sc = self._reuse(
            x, "row", lambda: direct_ops(*_OPS)[0](x.reshape(-1, k).contiguous(), 0)
        )
        return q.reshape(-1, k), sc.reshape(-1, 1)

    def _reuse(self, x: torch.Tensor, granularity: str, make) -> tuple[torch.Tensor, torch.Tensor]:  # noqa: ANN001
        if self._ref is not None and self._ref() is x and self._key == self._key_of(x, granularity):
            assert self._value is not None
            return self._value
        self._value = make()
        self._ref, self._key = weakref.ref(x), self._key_of(x, granularity)
        return self._value

    def enter(self, *_: object) -> None:
        self.depth += 1

    def leave(self, *_: object) -> None:
        self.depth = max(0, self.depth - 1)
        if self.depth == 0:
            self.clear()  # nothing outlives the scope, not even the last quantized tensor


class _Offer:
    """The context of :meth:`_SharedInputQuantization.offered`: a plain class, not a
    contextlib generator (that costs a generator and its wrapper per use, a few microseconds;
    a fused FP8 double block opens four per call)."""

    __slots__ = ("_owner", "_entry")

    def __init__(self, owner: _SharedInputQuantization, entry: tuple) -> None:
        self._owner, self._entry = owner, entry

    def __enter__(self) -> None:
        self._owner._offers.append(self._entry)

    def __exit__(self, *_: object) -> None:
        # by identity: list.remove would compare other entries' tensors with ==
        entry = self._entry
        self._owner._offers = [e for e in self._owner._offers if e is not entry]


_shared = _SharedInputQuantization()
_NOTHING_OFFERED = contextlib.nullcontext()


def offered_quantization(
    x: torch.Tensor, quantized: tuple[torch.Tensor, torch.Tensor] | None
) -> contextlib.AbstractContextManager:
    """``with offered_quantization(x, (q, scales)):`` the FP8 linears reading x take (q,
    scales) as its row quantization (:meth:`_SharedInputQuantization.offered`). ``quantized``
    None: a shared no-op context (the 16-bit path pays no generator per block input)."""
    return _NOTHING_OFFERED if quantized is None else _shared.offered(x, quantized)


def takes_fp8_rows(layer: nn.Module | None) -> bool:
    """Whether ``layer`` quantizes its input per row as an FP8Linear, directly or as the base
    layer of a wrapper (peft's LoRA layers keep it as ``base_layer``)."""
    while layer is not None and not isinstance(layer, FP8Linear):
        layer = getattr(layer, "base_layer", None)
    return layer is not None and layer.granularity == "row"


# diffusers modules whose forward feeds one input to several linears and never modifies it in
# place in between (FLUX attention: q/k/v and the text q/k/v; FLUX single block: q/k/v + MLP;
# the generic Attention that SANA uses).
SHARED_INPUT_MODULES = ("FluxAttention", "FluxSingleTransformerBlock", "Attention")
_HOOKED = "_dcgen_shared_quantization"


# The hooks are module-level functions, not bound methods of _shared: copy.deepcopy and pickle
# (torch.save of a whole model) take a function by reference but would copy the object a bound
# method holds, leaving a copied model's hooks counting scopes on a private _SharedInputQuantization
# that the linears (which use the global) never consult: reuse silently off in the copy.
def _enter_shared_scope(*_: object) -> None:
    _shared.enter()


def _leave_shared_scope(*_: object) -> None:
    _shared.leave()


def share_input_quantization(model: nn.Module) -> int:
    """Turn on quantize reuse (:class:`_SharedInputQuantization`) inside every module of
    ``model`` whose type is in SHARED_INPUT_MODULES and that holds FP8 linears; returns how many
    were registered (idempotent)."""
    count = 0
    for module in model.modules():
        if type(module).__name__ not in SHARED_INPUT_MODULES or hasattr(module, _HOOKED):
            continue
        if not any(isinstance(m, FP8Linear) for m in module.modules()):
            continue
        handles = (
            module.register_forward_pre_hook(_enter_shared_scope),
            module.register_forward_hook(_leave_shared_scope, always_call=True),
        )
        setattr(module, _HOOKED, handles)
        count += 1
    return count


class _SharedScope:
    """What the hooks of :func:`share_input_quantization` do around a module's forward, as a
    reusable context manager (no generator per use): for callers that skip the module call."""

    def __enter__(self) -> None:
        _shared.enter()

    def __exit__(self, *_: object) -> None:
        _shared.leave()


_SHARED_SCOPE = _SharedScope()


def shared_quantization_scope(module: nn.Module) -> contextlib.AbstractContextManager | None:
    """For a caller that would call ``module``'s forward code directly, skipping the module
    call (and with it diffusers' per-call signature inspection, about 20 us of host time: the
    fused FLUX blocks' attention): a context that stands in for its hooks when the only hooks
    it has are the two :func:`share_input_quantization` registered (checked by handle id, no
    global hooks, forward not wrapped); None otherwise (the caller makes the module call)."""
    handles = module.__dict__.get(_HOOKED)
    if handles is None or torch.compiler.is_compiling():
        # Under torch.compile the host time saved is moot, and reading the hook handles (made
        # outside the traced code) broke the graph at every attention (fullgraph failed).
        return None
    pre, post = handles
    if (
        module._forward_pre_hooks.keys() != {pre.id}
        or module._forward_hooks.keys() != {post.id}
        or forward_wrapped(module)
    ):
        return None
    return _SHARED_SCOPE


def unshare_input_quantization(model: nn.Module) -> int:
    """Undo :func:`share_input_quantization` on ``model``; returns how many modules it left."""
    count = 0
    for module in model.modules():
        handles = module.__dict__.pop(_HOOKED, None)
        if handles is not None:
            for handle in handles:
                handle.remove()
            count += 1
    return count


_ROUTE_ENV = ("DCGEN_FP8_GEMM", "DCGEN_DISABLE_KERNELS")
_ACTS = ("none", "gelu_tanh")
_OPS = ("quantize_fp8", "fp8_scale_epilogue")


def _forward(x: torch.Tensor, layer: FP8Linear, gemm: bool, act: str = "none") -> torch.Tensor:
    """[..., K] -> [M, N] in x's dtype; ``gemm`` False runs the pure reference end to end;
    ``act`` (GEMM path) is applied in the GEMM's epilogue where the route has one."""
    x2 = x.reshape(-1, layer.in_features)
    if gemm:
        xq, xs = _shared.quantize(x, layer.granularity)
        # explicit scale columns: -1 is ambiguous for an empty batch (0 rows)
        xq, xs = xq.reshape(-1, layer.in_features), xs.reshape(x2.shape[0], xs.shape[-1])
        return fp8_gemm(
            xq, xs, layer.weight, layer.weight_scale, layer.bias, x.dtype, layer.granularity, act,
            layer.fast_accum,
        )  # fmt: skip
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
        fast_accum: bool = False,
    ) -> None:
        super().__init__()
        _qop.check_granularity(granularity)
        _fp8.check_fast_accum(granularity, fast_accum)
        if in_features < 1 or out_features < 1:
            raise ValueError(
                f"FP8Linear: expected positive in/out features, got {in_features}, {out_features}"
            )
        self.in_features, self.out_features = in_features, out_features
        self.granularity = granularity
        # GEMMs accumulate without fp32 promotion (dcgen.quant.fp8 module doc); a plain
        # attribute, so it can be switched on a loaded model
        self.fast_accum = fast_accum
        n, k = out_features, in_features
        s = _qop.fp8_scale_count(k, granularity)
        self.register_buffer("weight", torch.zeros(n, k, dtype=torch.float8_e4m3fn, device=device))
        # fp32 whatever torch's default dtype (a bf16 default broke _scaled_mm's scales)
        self.register_buffer("weight_scale", torch.ones(n, s, dtype=torch.float32, device=device))
        bias_param = nn.Parameter(torch.zeros(n, dtype=dtype, device=device)) if bias else None
        self.register_parameter("bias", bias_param)  # in _parameters even when None

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        granularity: str = "row",
        dtype: torch.dtype = torch.bfloat16,
        fast_accum: bool = False,
    ) -> FP8Linear:
        """Quantize ``linear`` (its weight must be finite)."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"FP8Linear.from_linear: expected nn.Linear, got {type(linear)}")
        w = linear.weight.detach()
        n, k = w.shape
        mod = cls(k, n, linear.bias is not None, granularity, dtype, w.device, fast_accum)
        q, s = quantize_fp8_weight(w, granularity)
        mod.weight.copy_(q)
        mod.weight_scale.copy_(s)
        if linear.bias is not None:
            mod.bias.data.copy_(linear.bias.detach())
        return mod

    def __setattr__(self, name: str, value: object) -> None:
        if name in _FORMAT_BUFFERS:  # a new weight or scale buffer: drop the views of the old
            self.__dict__.pop("_rowwise_views", None)  # (they would keep its memory alive)
        super().__setattr__(name, value)

    def _apply(self, fn, recurse=True):  # noqa: ANN001, ANN202
        # model.to(dtype) / .half() must not touch the format: the e4m3 weight and fp32 scales
        # only follow the device (float8 counts as floating point, so .to(bf16) would cast it).
        # Every other fn (to_empty, share_memory, a device move) reaches them (format_buffers).
        self.__dict__.pop("_route", None)  # the direct route is decided again (device, bias)
        self.__dict__.pop("_rowwise_views", None)  # views of the old buffers
        apply_keeping_format(
            self, _FORMAT_BUFFERS, fn, lambda: super(FP8Linear, self)._apply(fn, recurse)
        )
        return self

    @property
    def compute_dtype(self) -> torch.dtype:
        """The dtype this layer computes in (format_buffers.compute_dtype)."""
        return compute_dtype(self)

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

    def _direct(self, x: torch.Tensor) -> bool:
        """Whether this call takes the direct route (module doc; the gate in direct_route.py):
        row scales, a bf16 input, and the kernels and GEMM route it calls available."""
        bias = self._parameters.get("bias")  # not self.bias: nn.Module.__getattr__ costs ~1 us
        return takes_direct_route(
            self, x, self.in_features, bias, (_fp8.route_generation(),), _ROUTE_ENV,
            lambda: self._decide_direct(x, bias),
        )  # fmt: skip

    def _decide_direct(self, x: torch.Tensor, bias: torch.Tensor | None) -> bool:
        """The direct route's decision, made when its key changes: which GEMM route it calls
        ("tensor" or "rowwise", kept as ``_direct_kind``), or none; and whether its rowwise
        GEMM may write a column block of a wider buffer (``_strided_out``, for forward_into:
        a device property, decided here rather than on every call)."""
        kind = ""
        if self.granularity == "row":
            kind = _fp8.direct_row_route(
                x.device, x.dtype, self.out_features, self.in_features, bias
            )
        self.__dict__["_direct_kind"] = kind
        self.__dict__["_strided_out"] = kind == "rowwise" and _fp8.rowwise_writes_strided_rows(
            x.device
        )
        return bool(kind)

    def _direct_epilogue(self, x: torch.Tensor) -> bool:
        """Whether this call takes the direct route with the unit-scale GEMM, whose scale
        epilogue kernels the fused forms (forward_into, forward_quantized) build on."""
        return self._direct(x) and self.__dict__.get("_direct_kind") == "tensor"

    def _unit_scale_product(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The direct route's first two kernels: x quantized per row (shared or offered), then
        the unit-scale ``_scaled_mm``: (bf16 product [M, N], row scales [M, 1]); None when
        ``_scaled_mm`` rejects the case (recorded: the general path takes over from then on).
        Each direct form adds its own scale epilogue."""
        xq, xs = _shared.quantize_rows_direct(x, self.in_features)
        y = _fp8.unit_scale_gemm(xq, self.weight, torch.bfloat16, self.fast_accum)
        return None if y is None else (y, xs)

    def _rowwise_product(
        self, x: torch.Tensor, out: torch.Tensor | None = None
    ) -> torch.Tensor | None:
        """The "rowwise" direct route's two kernels: x quantized per row (shared or offered),
        then the row-scaled ``_scaled_mm`` with the bias fused: the bf16 [M, N] output (written
        into ``out``, an [M, N] view, where given); None when ``_scaled_mm`` rejects the
        case."""
        xq, xs = _shared.quantize_rows_direct(x, self.in_features)
        wq_t, w_scale_row = self._rowwise_operands()
        return _fp8.rowwise_gemm(
            xq, xs, wq_t, w_scale_row, self._parameters.get("bias"), self.fast_accum, out
        )

    def _rowwise_operands(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The weight as ``_scaled_mm`` takes it ([K, N] transposed view) and its scales as a
        [1, N] view, made once per weight: kept while the buffers are the same tensors
        (in-place updates show through the views; a new buffer, or a device move, makes new
        ones). Two views fewer per call: about 3 us of host time on this project's CPU."""
        w, s = self._buffers["weight"], self._buffers["weight_scale"]
        kept = self.__dict__.get("_rowwise_views")
        if kept is None or kept[0] is not w or kept[1] is not s:
            kept = (w, s, w.t(), s.reshape(1, -1))
            self.__dict__["_rowwise_views"] = kept
        return kept[2], kept[3]

    def _shaped(
        self, x: torch.Tensor, out: torch.Tensor, q: torch.Tensor, q_scales: torch.Tensor
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """forward_quantized's result from an [M, N] output and its row quantization, in x's
        leading shape."""
        lead = x.shape[:-1]
        shape = (*lead, self.out_features)
        return out.reshape(shape), (q.reshape(shape), q_scales.reshape(*lead, 1))

    def _direct_forward(self, x: torch.Tensor, act: str) -> torch.Tensor | None:
        """As :func:`dcgen.quant.fp8.fp8_gemm` runs them: quantize kernel -> unit-scale
        ``_scaled_mm`` -> scale epilogue kernel ("tensor"), or quantize kernel -> row-scaled
        ``_scaled_mm`` with the bias -> GELU ("rowwise"); None when ``_scaled_mm`` rejects the
        case."""
        if self.__dict__.get("_direct_kind") == "rowwise":
            y = self._rowwise_product(x)
            if y is None:
                return None
            if act == "gelu_tanh":
                y = torch.nn.functional.gelu(y, approximate="tanh")
        else:
            product = self._unit_scale_product(x)
            if product is None:
                return None
            y = direct_ops(*_OPS)[1](*product, self.weight_scale, self.bias, act)
        return y.reshape(*x.shape[:-1], self.out_features)

    def forward(self, input: torch.Tensor, act: str = "none") -> torch.Tensor:
        """``act(x W^T + b)``; ``act`` "none" or "gelu_tanh" (fused into the GEMM epilogue on
        the kernel route, the fused FLUX MLP's first linear uses it). The input's name is
        nn.Linear's, so a drop-in layer is also called as ``layer(input=x)``."""
        x = input
        if act in _ACTS and self._direct(x):
            y = self._direct_forward(x, act)
            if y is not None:
                return y
        self._check(x)
        lead = x.shape[:-1]
        bias = self.bias
        if torch.is_grad_enabled() and (
            x.requires_grad or (bias is not None and bias.requires_grad)
        ):
            y = _FP8LinearFn.apply(x.reshape(-1, self.in_features), bias, self)
            if act == "gelu_tanh":
                y = torch.nn.functional.gelu(y, approximate="tanh")
            elif act != "none":
                raise ValueError(f"FP8Linear: expected act 'none' or 'gelu_tanh', got {act!r}")
        else:
            y = _forward(x, self, gemm=True, act=act)  # x itself: the quantize reuse keys on it
        return y.reshape(*lead, self.out_features)

    def forward_into(self, x: torch.Tensor, out: torch.Tensor, act: str = "none") -> None:
        """``out[...] = self(x, act)`` for ``out`` a [..., N] view of a larger buffer
        (inference; the module is not called, so forward hooks do not run: callers with hooked
        layers call it instead). On the direct route the result is written there, not copied:
        by the scale epilogue (``dcgen::fp8_scale_epilogue_into``, "tensor" route) or by the
        GEMM itself (``_scaled_mm(out=)``, "rowwise" route; GELU then runs in place, the same
        kernel as the out-of-place one). Otherwise the output is copied in."""
        rows = None
        if act in _ACTS and out.dtype == torch.bfloat16 and self._direct(x):
            # a view the kernels write, on x's device (else copied in, as the public
            # fp8_scale_epilogue_into does)
            rows = kernel_rows(out, self.out_features)
            if rows is not None and (
                rows.shape[0] != x.numel() // self.in_features or out.device != x.device
            ):
                rows = None
        if rows is not None:
            kind = self.__dict__.get("_direct_kind")
            # GELU in place gives the out-of-place bits on CUDA (one scalar functor for every
            # layout); on the CPU only on contiguous rows (a strided row's tail takes the
            # scalar loop, whose tanh may differ in the last bit from the vector one)
            contiguous = rows.is_contiguous()
            in_place = (act == "none" or x.is_cuda or contiguous) and (
                contiguous or self.__dict__.get("_strided_out", False)
            )
            if kind == "rowwise" and in_place:
                if self._rowwise_product(x, rows) is not None:
                    if act == "gelu_tanh":
                        torch.ops.aten.gelu_.default(rows, approximate="tanh")
                    return
            elif kind == "tensor" and has_kernel("fp8_scale_epilogue_into", x.device):
                product = self._unit_scale_product(x)
                if product is not None:
                    epilogue_into = direct_ops("fp8_scale_epilogue_into")[0]
                    epilogue_into(*product, self.weight_scale, self.bias, act, rows)
                    return
        out.copy_(self(x, act=act))

    def forward_quantized(
        self, x: torch.Tensor, act: str = "none"
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
        """``(self(x, act), its FP8 row quantization or None)`` (inference; the module is not
        called, so forward hooks do not run: callers with hooked layers call it instead). On
        the direct "tensor" route the scale epilogue also writes its output's row quantization
        (``dcgen::fp8_scale_epilogue_fp8``), exactly ``quantize_fp8(out, "row")``, for the next
        FP8 linear (:func:`offered_quantization`); on the direct "rowwise" route with GELU the
        same kernel at unit scales applies GELU and quantizes (its GELU, not PyTorch's: equal
        within one bf16 rounding); otherwise only the output."""
        if (
            act in _ACTS
            and self._direct_epilogue(x)
            and has_kernel("fp8_scale_epilogue_fp8", x.device)
        ):
            product = self._unit_scale_product(x)
            if product is not None:
                epilogue_fp8 = direct_ops("fp8_scale_epilogue_fp8")[0]
                return self._shaped(x, *epilogue_fp8(*product, self.weight_scale, self.bias, act))
        if (
            act == "gelu_tanh"
            and self._direct(x)
            and self.__dict__.get("_direct_kind") == "rowwise"
            and has_kernel("fp8_scale_epilogue_fp8", x.device)
        ):
            result = self._rowwise_gelu_quantized(x)
            if result is not None:
                return result
        return self(x, act=act), None

    def _rowwise_gelu_quantized(
        self, x: torch.Tensor
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]] | None:
        """forward_quantized on the "rowwise" route with GELU: the quantize kernel, the
        row-scaled ``_scaled_mm`` with the bias, then one ``fp8_scale_epilogue_fp8`` pass at
        unit scales (exact: y * 1 * 1) for GELU and its output's row quantization, instead of
        a GELU pass and the next linear's quantize pass over the same [M, N] output (FLUX's
        MLP: 4,608 x 12,288 at 4K). Without GELU there is no pass to save: not used. None when
        ``_scaled_mm`` rejects the case."""
        y = self._rowwise_product(x)
        if y is None:
            return None
        m, n = y.shape
        epilogue_fp8 = direct_ops("fp8_scale_epilogue_fp8")[0]
        ones_m, ones_n = _fp8.unit_column(y.device, m), _fp8.unit_column(y.device, n)
        return self._shaped(x, *epilogue_fp8(y, ones_m, ones_n, None, "gelu_tanh"))

    def reference_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The layer's spec in pure PyTorch: reference quantize, exact dequantize, fp32 matmul."""
        self._check(x)
        y = _forward(x.reshape(-1, self.in_features), self, gemm=False)
        return y.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, granularity={self.granularity}"
            + (", fast_accum=True" if self.fast_accum else "")
        )
