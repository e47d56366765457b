// Schemas of the fused DiT attention ops (spec: dcgen/ops/attention.py). Kept in this family's
// own TORCH_LIBRARY_FRAGMENT so the CPU-only build registers them too; the CUDA kernels register
// their implementations in qk_norm_rope_cuda.cu and flash_attention_cuda.cpp.
//
// Shared arguments of both ops:
//   q_weight / k_weight  per-head RMSNorm scale, (D,) or (2, D); None switches the norm off.
//                        With 2 rows, tokens [0, norm_split) use row 0 and the rest row 1
//                        (FLUX's joint sequence: text tokens have their own norm weights).
//   cos / sin            RoPE tables (S, D) fp32 on interleaved pairs; None switches RoPE off.
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(dcgen, m) {
  // Per-head RMSNorm + RoPE of q and k (B, H, S, D); returns both as contiguous (B, H, S, D).
  m.def(
      "qk_norm_rope(Tensor q, Tensor k, Tensor? q_weight, Tensor? k_weight, float eps, "
      "Tensor? cos, Tensor? sin, int norm_split) -> (Tensor, Tensor)");
  // softmax(scale * norm_rope(q) norm_rope(k)^T, key padding) v for (B, H, S, D) inputs; the
  // output has shape (B, H, Sq, D) with (B, Sq, H, D)-contiguous memory.
  m.def(
      "fused_attention(Tensor q, Tensor k, Tensor v, Tensor? q_weight, Tensor? k_weight, "
      "float eps, Tensor? cos, Tensor? sin, int norm_split, Tensor? key_padding_mask, "
      "float scale) -> Tensor");
}
