"""ReLU linear attention (DC-AE's LiteMLA; the same form serves SANA's self-attention).

Input is the per-head interleaved qkv map the fused 1x1 conv produces, viewed as
(B, heads, 3*d, N): rows [0, d) are q, [d, 2d) k, [2d, 3d) v, N tokens. Per head, in fp32:

    q, k = relu(q), relu(k)
    vk   = [v; 1] k^T                  ((d+1) x d, a reduction over all N tokens)
    o    = vk q                        ((d+1) x N)
    out  = o[:d] / (o[d] + eps)

The sums over N are why fp32 matters: at 4K token counts they overflow fp16.

Layouts: the CUDA kernel reads qkv through its strides, token-fastest (a plain tensor) or
channel-fastest (:func:`token_major`: LiteMLA's (B, heads, 3d, H*W) view of a channels_last
conv output), and writes its output in the same order, so that LiteMLA's (B, heads*d, H, W)
view of it is channels_last again. Neither layout is copied.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._extension import compiled_op, has_kernel
from ._validate import FLOAT_DTYPES, check_tensor

MAX_KERNEL_HEAD_DIM = 32  # the CUDA kernel keeps a (d+1) x d fp32 tile per head in shared memory


def token_major(qkv: torch.Tensor) -> bool:
    """Whether (B, heads, 3d, N) ``qkv`` is channel-fastest (each token's channels contiguous,
    as in a view of a channels_last map), the layout the CUDA kernel reads in place and gives
    its output: (B, heads, d, N) with strides (N*heads*d, d, 1, heads*d)."""
    return qkv.stride(2) == 1 and qkv.shape[3] > 1 and qkv.stride(3) != 1


def relu_linear_attention_reference(qkv: torch.Tensor, eps: float = 1e-15) -> torch.Tensor:
    """Pure-PyTorch spec; returns (B, heads, d, N) in qkv's dtype."""
    d = qkv.shape[2] // 3
    q, k, v = qkv.float().split(d, dim=2)
    q, k = F.relu(q), F.relu(k)
    v = F.pad(v, (0, 0, 0, 1), mode="constant", value=1.0)
    vk = torch.matmul(v, k.transpose(-1, -2))
    out = torch.matmul(vk, q)
    return (out[:, :, :-1] / (out[:, :, -1:] + eps)).to(qkv.dtype)


def relu_linear_attention(qkv: torch.Tensor, eps: float = 1e-15) -> torch.Tensor:
    """ReLU linear attention of an interleaved (B, heads, 3*d, N) qkv tensor -> (B, heads, d, N).

    The CUDA kernel (d <= 32) runs when built, the tensor is on a GPU and no gradient is
    needed; otherwise the reference. The kernel's output is channel-fastest where qkv is
    (:func:`token_major`), else contiguous; the reference's is contiguous.
    """
    check_tensor("relu_linear_attention: qkv", qkv, ndim=4, dtypes=(*FLOAT_DTYPES, torch.float64))
    if qkv.shape[2] % 3 or qkv.shape[2] == 0:
        raise ValueError(
            "relu_linear_attention: expected dim 2 = 3*head_dim with head_dim >= 1 (interleaved "
            "q|k|v per head), "
            f"got shape {tuple(qkv.shape)}"
        )
    if not eps > 0:
        raise ValueError(f"relu_linear_attention: expected eps > 0, got {eps}")
    use_kernel = (
        not (torch.is_grad_enabled() and qkv.requires_grad)
        and qkv.dtype in FLOAT_DTYPES
        and qkv.numel() > 0
        and qkv.shape[2] // 3 <= MAX_KERNEL_HEAD_DIM
    )
    if use_kernel and has_kernel("relu_linear_attention", qkv.device):
        return compiled_op("relu_linear_attention")(qkv, float(eps))
    return relu_linear_attention_reference(qkv, eps)
