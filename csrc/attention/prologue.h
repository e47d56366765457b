// Argument checks shared by the CUDA wrappers of qk_norm_rope and fused_attention: the RMSNorm
// weights and RoPE tables, converted to the fp32 contiguous form the kernels read.
// Spec: dcgen/ops/attention.py (the Python face validates first; these checks are the backstop
// for direct torch.ops.dcgen calls).
#pragma once

#include <ATen/core/Tensor.h>  // not ATen/ATen.h: every op's header, minutes of nvcc time
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAException.h>
#include <cuda_runtime_api.h>

#include <optional>

namespace dcgen::attention {

struct NormWeights {
  at::Tensor w;  // (rows, D) fp32 contiguous, undefined when the norm is off
  const float* w0() const { return w.defined() ? w.const_data_ptr<float>() : nullptr; }
  const float* w1() const {
    if (!w.defined()) return nullptr;
    return w.size(0) == 2 ? w.const_data_ptr<float>() + w.size(1) : w0();
  }
};

inline NormWeights norm_weights(const std::optional<at::Tensor>& w, const at::Tensor& x,
                                const char* op, const char* what) {
  NormWeights out;
  if (!w.has_value() || !w->defined()) return out;
  const int64_t d = x.size(-1);
  const bool ok = (w->dim() == 1 && w->size(0) == d) ||
                  (w->dim() == 2 && w->size(0) == 2 && w->size(1) == d);
  TORCH_CHECK(ok, op, ": expected ", what, " of shape (", d, ",) or (2, ", d, "), got ",
              w->sizes());
  TORCH_CHECK(w->device() == x.device(), op, ": ", what, " is on ", w->device(), " but q is on ",
              x.device());
  out.w = w->to(at::kFloat).reshape({-1, d}).contiguous();
  return out;
}

struct RopeTables {
  at::Tensor cos, sin;  // (S, D) fp32 contiguous, undefined when RoPE is off
};

inline RopeTables rope_tables(const std::optional<at::Tensor>& cos,
                              const std::optional<at::Tensor>& sin, int64_t seqlen, int64_t d,
                              const at::Tensor& x, const char* op) {
  RopeTables out;
  const bool has_cos = cos.has_value() && cos->defined();
  const bool has_sin = sin.has_value() && sin->defined();
  TORCH_CHECK(has_cos == has_sin, op, ": expected cos and sin both given or both None");
  if (!has_cos) return out;
  for (const at::Tensor* tab : {&*cos, &*sin}) {
    TORCH_CHECK(tab->dim() == 2 && tab->size(0) == seqlen && tab->size(1) == d, op,
                ": expected RoPE tables of shape (", seqlen, ", ", d, "), got ", tab->sizes());
    TORCH_CHECK(tab->device() == x.device(), op, ": RoPE table is on ", tab->device(),
                " but q is on ", x.device());
  }
  out.cos = cos->to(at::kFloat).contiguous();
  out.sin = sin->to(at::kFloat).contiguous();
  return out;
}

// Per-head RMSNorm + RoPE of one (B, H, S, D) bf16/fp16 tensor into a new one, fp32 math and one
// rounding (qk_norm_rope_cuda.cu): contiguous, or with (B, S, H, D) memory when `token_major`
// (the qk_norm_rope op). The flash wrapper uses it (contiguous) to prepare K once.
at::Tensor norm_rope_one(const at::Tensor& x, const NormWeights& w, const RopeTables& rope,
                         int64_t norm_split, double eps, bool token_major = false);

// The kernels use sm_80 instructions (bf16 mma.sync, bf16x2 conversions); older cards get a
// clear error instead of "no kernel image" (dcgen.ops dispatch never sends them here).
// Returns the compute capability's major number (the wrappers dispatch on it).
inline int check_arch(const at::Tensor& x, const char* op) {
  int major = 0, minor = 0;
  const int dev = x.get_device();
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev));
  TORCH_CHECK(major >= 8, op, ": expected a GPU of compute capability 8.0 or newer, got ", major,
              ".", minor, " (use the dcgen.ops Python functions, which fall back to PyTorch)");
  return major;
}

}  // namespace dcgen::attention
