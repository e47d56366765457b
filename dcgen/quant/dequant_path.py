"""NVFP4Linear on GPUs without native FP4 GEMMs (Hopper sm_90, Ampere sm_80, and W4A16 anywhere):
dequantize to 16-bit, then a cuBLAS GEMM with fp32 accumulation and an fp32 result.

This is dcgen's first Hopper NVFP4 path: exact, memory-light at rest (the weight stays 4-bit;
its 16-bit copy lives only during the call), not yet fast. Its successor, wgmma GEMMs whose
mainloop dequantizes the 4-bit tiles in registers (no 16-bit weight in HBM; CUTLASS's
mixed-input mainloop cannot take 16-element scale groups, so the mainloop is dcgen's own:
csrc/nvfp4/nvfp4_gemm_sm90.cuh), is correct on an H200 but slower than this path (0.2x vs
0.4-0.6x of cuBLAS bf16 for W4A16, measured 2026-11-26), so it is opt-in
(``DCGEN_NVFP4_SM90=1``) and this path stays the default on Hopper.

Why it is exact: :func:`dcgen.ops.nvfp4_dequant.nvfp4_dequantize` with a unit global scale gives
``e2m1 * e4m3`` values that are exact in bf16 / fp16 (6 significant bits, within [2^-10, 2688]);
W4A4 activations dequantized the same way are exact too, and a 16-bit activation (W4A16) is
itself. The GEMM multiplies exact operands with fp32 accumulation into an fp32 result
(``torch.mm(..., out_dtype=torch.float32)``), and the global decode scales multiply that result
once (``alpha``). So the output equals the reference (fp32 dequantize-then-matmul) up to fp32
summation order and the fp32 rounding of where ``alpha`` is applied. The one case computed in
fp32 operands instead: W4A16 with an fp32 input or with smoothing (``x / s`` is not a 16-bit
value); it stays exact, at fp32 GEMM speed.

That general form (:func:`forward_main`) returns fp32. With a 16-bit input the layer runs whole
in that dtype instead (:func:`forward_16bit`, :func:`forward_w4a4_16bit`): the same exact
products, the fp32 result and its passes skipped, at the cost of one or two 16-bit roundings
(W4A16's ``x / s`` among them). The fp32 form stays for fp32 inputs, for torch.compile and
where autograd cannot save the layer's (inference-mode) buffers.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from dcgen.ops import has_kernel
from dcgen.ops import nvfp4_dequant as _dq
from dcgen.ops import quantize_nvfp4 as _qop

if TYPE_CHECKING:
    from .linear import NVFP4Linear

_HALF = (torch.bfloat16, torch.float16)


@torch.compiler.assume_constant_result  # a device property: a constant to torch.compile
def _capability_major(index: int | None) -> int:
    return torch.cuda.get_device_capability(index)[0]


def available(device: torch.device) -> bool:
    """Whether the dequantize kernel path runs for a layer on ``device`` (CUDA, sm_80+ for bf16
    GEMMs, dcgen._C built with the dequantize kernel)."""
    if device.type != "cuda" or not has_kernel("nvfp4_dequantize", device):
        return False
    return _capability_major(device.index) >= 8


def _mm_fp32(a: torch.Tensor, b_t: torch.Tensor) -> torch.Tensor:
    """``a @ b_t.T`` with fp32 accumulation and an fp32 result. 16-bit operands on CUDA use
    cuBLAS's out_dtype GEMM (no 16-bit rounding of the result); elsewhere fp32 operands."""
    if a.is_cuda and a.dtype in _HALF:
        return torch.mm(a, b_t.t(), out_dtype=torch.float32)
    return a.float() @ b_t.float().t()


class _ExactLinear(torch.autograd.Function):
    """``_mm_fp32(a, w) * alpha`` with the gradient for ``x`` only: the operand ``a`` is ``x``
    itself or its dequantized NVFP4 quantization (W4A4), ``w`` a transient dequantized frozen
    weight. ``dx = (dy * grad_scale) @ w`` is the straight-through gradient (rounding has no
    useful derivative), ``grad_scale`` the weight's global scale (``w * grad_scale`` is W)."""

    @staticmethod
    def forward(ctx, x, a, w, alpha, grad_scale):  # noqa: ANN001, ANN205
        ctx.save_for_backward(w, grad_scale)
        ctx.x_dtype = x.dtype
        return _mm_fp32(a, w) * alpha

    @staticmethod
    def backward(ctx, dy: torch.Tensor):  # noqa: ANN001, ANN205
        w, grad_scale = ctx.saved_tensors
        dx = None
        if ctx.needs_input_grad[0]:
            if dy.dtype == w.dtype:  # 16-bit dy: the 16-bit GEMM is exact, the scale after it
                dx = _mm_fp32(dy, w.t()) * grad_scale
            else:  # an fp32 dy keeps its bits (a bf16 rounding of it was a 0.3% gradient error)
                dx = (dy.float() * grad_scale) @ w.float()
            dx = dx.to(ctx.x_dtype)
        return dx, None, None, None, None


def _unit(like: torch.Tensor) -> torch.Tensor:
    return torch.ones((), dtype=torch.float32, device=like.device)


def weight_16bit(layer: NVFP4Linear, dtype: torch.dtype) -> torch.Tensor:
    """The residual weight R without its global scale, as ``dtype`` [N, K] (exact for 16-bit
    dtypes: see the module doc). One kernel pass; transient."""
    return _dq.nvfp4_dequantize(
        layer.weight, layer.weight_scale, _unit(layer.weight), layer.in_features, dtype
    )


def _fits_16bit(layer: NVFP4Linear, x: torch.Tensor) -> bool:
    """A bf16 input and a bias (if any) of its dtype: the 16-bit forms below apply. Not fp16:
    their GEMMs multiply unit-scale operands (up to 6 * 448 = 2688 each, the global scales
    applied after), whose sums overflow fp16's 65,504 (a W4A4 layer at K = 96 already gave
    mostly Inf); fp16 inputs take the fp32 form."""
    return x.dtype == torch.bfloat16 and (layer.bias is None or layer.bias.dtype == x.dtype)


def _activation_16bit(
    x2: torch.Tensor, static: torch.Tensor | None, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """W4A4's activation: NVFP4-quantized, dequantized with a unit global scale (exact in 16
    bits), and its global scale. No NaN/Inf check: that is a device sync (NVFP4Linear doc)."""
    packed, swizzled, gs = _qop.quantize_nvfp4_activation(x2, static, check_finite=False)
    return _dequant_activation(packed, swizzled, x2.shape[-1], dtype), gs


def _dequant_activation(
    packed: torch.Tensor, swizzled: torch.Tensor, k: int, dtype: torch.dtype
) -> torch.Tensor:
    """A quantized activation (packed codes, swizzled block scales) with a unit global scale:
    exact in 16 bits."""
    return _dq.nvfp4_dequantize(packed, swizzled, _unit(packed), k, dtype, swizzled=True)


def product_16bit(
    layer: NVFP4Linear, packed: torch.Tensor, swizzled: torch.Tensor, dtype: torch.dtype
) -> torch.Tensor:
    """W4A4's main product without its global scales, from the quantized activation (packed
    codes, swizzled block scales): both operands dequantized with unit global scales (exact in
    ``dtype``), one GEMM with fp32 accumulation rounded once to ``dtype``, [M, N]."""
    xq = _dequant_activation(packed, swizzled, layer.in_features, dtype)
    return torch.mm(xq, weight_16bit(layer, dtype).t())


def scaled_sum(y: torch.Tensor, scale: torch.Tensor, add: torch.Tensor | None) -> torch.Tensor:
    """``add + y * scale`` (``scale`` a device scalar) in one pass; ``y`` is consumed."""
    return torch.addcmul(add, y, scale) if add is not None else y.mul_(scale)


def _needs_grad(*tensors: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def _any_inference(*tensors: torch.Tensor | None) -> bool:
    return any(t is not None and t.is_inference() for t in tensors)


def _branch_16bit(layer: NVFP4Linear, a: torch.Tensor, dt: torch.dtype) -> torch.Tensor | None:
    """The low-rank branch plus the bias, ``(a @ down^T) @ up^T + bias``, in the 16-bit ``dt``:
    two GEMMs with fp32 accumulation, each rounded once to ``dt`` (the bias folded into the
    second's epilogue). ``a`` is the layer's (smoothed) input, 16-bit or fp32; the first GEMM
    runs in ``dt`` only where ``a`` and ``lora_down`` already are ``dt`` (exact operands),
    else in fp32. Just the bias (or None) for a rank-0 layer."""
    if not layer.rank:
        return layer.bias
    down = layer.lora_down
    if a.dtype == down.dtype == dt:
        t = a @ down.t()
    else:
        t = (a.float() @ down.float().t()).to(dt)
    return lowrank_up_16bit(layer, t)


def lowrank_up_16bit(layer: NVFP4Linear, t: torch.Tensor) -> torch.Tensor:
    """``t @ lora_up^T + bias`` in ``t``'s 16-bit dtype, the bias in the GEMM's epilogue: the
    second half of the low-rank branch, from its down-projection ``t`` [M, r]."""
    up = layer.lora_up.to(t.dtype).t()
    return torch.addmm(layer.bias, t, up) if layer.bias is not None else t @ up


def forward_16bit(layer: NVFP4Linear, x: torch.Tensor) -> torch.Tensor | None:
    """The whole W4A16 layer in ``x``'s dtype (16-bit input; a bias, if any, of that dtype and
    low-rank factors of that dtype); None otherwise.

    Plain layer: ``addmm(bias, x, R16^T, alpha=global scale)``, fp32 accumulation of the exact
    products, the global scale and the bias applied in fp32 in cuBLAS's epilogue, one rounding
    to ``x``'s dtype: the numbers of :func:`forward_main` + bias + cast up to where those fp32
    roundings fall. It skips the fp32 result and the three passes over it (scale, bias, cast)
    of the general form: at FLUX's 4,608 x 12,288 outputs they move about 1 GB, more time than
    the GEMM's own epilogue and the weight dequantization together.

    Smoothing: ``x / s`` is rounded to ``x``'s dtype once (the fp32 form keeps it in fp32 and
    pays an fp32 GEMM, 10-20x slower on tensor-core GPUs). Low-rank branch: computed in 16 bits
    (:func:`_branch_16bit`) and added in the main GEMM's epilogue (``beta = 1``). Each is one
    16-bit rounding more than the fp32 form, far below the weight's own 4-bit error.

    The global scale is read to the host once per weight version (``_memo``). Where that cannot
    be cached (an inference-mode buffer has no version counter, so every call would
    synchronise) the scale stays on the device and multiplies the 16-bit product in one pass
    with the branch and bias, one more rounding (as W4A4's form below). Under torch.compile,
    which would break the graph at the host read, the general form runs.
    """
    if layer.mode != "w4a16" or not _fits_16bit(layer, x) or torch.compiler.is_compiling():
        return None
    dt = x.dtype
    gs = layer.weight_scale_2
    buffers = (gs, layer.smooth, layer.lora_down, layer.lora_up)
    if _needs_grad(x) and _any_inference(*buffers):
        return None  # autograd cannot save an inference tensor; the general form runs
    k = layer.in_features
    x2 = x.reshape(-1, k)
    if layer.smooth is not None:
        x2 = (x2.float() / layer.smooth).to(dt)
    add = _branch_16bit(layer, x2, dt)
    w = weight_16bit(layer, dt)
    if gs.is_inference():  # no version counter: a host copy could not be kept up to date
        y = scaled_sum(torch.mm(x2, w.t()), gs, add)
        return y.reshape(*x.shape[:-1], layer.out_features)
    alpha = layer._memo("alpha_host", gs, lambda: float(gs))
    if add is not None:
        y = torch.addmm(add, x2, w.t(), alpha=alpha)
    else:  # beta = 0: the (scalar) input is not read, the GEMM writes alpha * x w^T
        y = torch.addmm(x2.new_zeros(()), x2, w.t(), beta=0, alpha=alpha)
    return y.reshape(*x.shape[:-1], layer.out_features)


def forward_w4a4_16bit(
    layer: NVFP4Linear, x: torch.Tensor, xs: torch.Tensor, static: torch.Tensor | None
) -> torch.Tensor | None:
    """W4A4 inference with a 16-bit input: the whole layer (low-rank branch and bias
    included) in ``x``'s dtype; None where it does not apply (a gradient is needed, an fp32
    input, a bias of another dtype).

    ``xs``: the activation to quantize, ``x`` itself without smoothing (the quantize reads 16-bit
    inputs and gives the codes of their fp32 copy: no fp32 copy of ``x`` is made), ``x / s`` in
    fp32 with it. The GEMM of the exact 16-bit operands rounds its fp32 sums to ``x``'s dtype
    once, before the global scales (a device value: the activation's is computed per call)
    multiply it in the one pass that also adds the low-rank branch and the bias
    (:func:`_branch_16bit`). That is one or two more 16-bit roundings than the fp32 form of
    :func:`forward_main`, which is the same trade FP8's tensor route makes, and far below
    W4A4's own activation quantization error. It skips the fp32 result and its passes (about
    1 GB at FLUX's 4,608 x 12,288 outputs).
    """
    if layer.mode != "w4a4" or not _fits_16bit(layer, x) or _needs_grad(x, xs):
        return None
    dt = x.dtype
    x2 = xs.reshape(-1, layer.in_features)
    xq, gs = _activation_16bit(x2, static, dt)
    y = torch.mm(xq, weight_16bit(layer, dt).t())
    out = scaled_sum(y, gs * layer.weight_scale_2, _branch_16bit(layer, x2, dt))
    return out.reshape(*x.shape[:-1], layer.out_features)


def forward_main(
    layer: NVFP4Linear, x: torch.Tensor, xs: torch.Tensor, static: torch.Tensor | None
) -> torch.Tensor:
    """The quantized product of the layer (no low-rank branch, no bias), fp32 [..., N].

    ``x``: the layer's input; ``xs``: the activation the reference multiplies, ``x`` itself
    without smoothing, else ``x / s`` in fp32; ``static``: the W4A4 activation decode scale, or
    None (dynamic).
    """
    k = layer.in_features
    gs_w = layer.weight_scale_2
    if layer.mode == "w4a4":
        x2 = xs.reshape(-1, k)
        # bf16 holds every dequantized value exactly (fp16 too); bf16 GEMMs are the fast ones.
        xq, gs = _activation_16bit(x2, static, torch.bfloat16)
        y = _ExactLinear.apply(x2, xq, weight_16bit(layer, torch.bfloat16), gs * gs_w, gs_w)
    else:
        exact_16bit = xs.dtype in _HALF  # x itself (x / s is fp32)
        a = xs.reshape(-1, k) if exact_16bit else xs.float().reshape(-1, k)
        y = _ExactLinear.apply(a, a, weight_16bit(layer, a.dtype), gs_w, gs_w)
    return y.reshape(*xs.shape[:-1], layer.out_features)
