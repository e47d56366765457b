// Standalone fused per-head RMSNorm + RoPE of q and k (spec: dcgen/ops/attention.py,
// qk_norm_rope_reference), for use in front of any attention kernel.
//
// One warp per (b, h, s) row: lanes stride over interleaved pairs with 32-bit loads (coalesced
// along the row), reduce the sum of squares with shuffles, then re-read the row (an L1 hit) and
// write norm + RoPE in fp32 with one rounding. Rows are taken token-major, (b, s, h): the warps
// of a CTA read neighbouring heads of one token, which lie side by side in a DiT's (B, S, H, D)
// projections, and share its RoPE row.
// Output layout: the qk_norm_rope op writes (B, H, S, D) tensors with (B, S, H, D) memory, the
// projections' own layout, in which torch's SDPA (cuDNN, FlashAttention) returns its output in
// the same layout, so the (B, S, H * D) tokens after it are a view rather than a copy. The flash
// wrapper's K preparation keeps contiguous (B, H, S, D) (norm_rope_one's `token_major` false).
#include <ATen/core/Tensor.h>  // not ATen/ATen.h: every op's header, minutes of nvcc time
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <torch/library.h>

#include <cstdlib>
#include <tuple>

#include "attention/prologue.h"
#include "common/env_switch.h"

namespace dcgen::attention {
namespace {

template <typename T>
struct Pair;
template <>
struct Pair<at::BFloat16> {
  using V = __nv_bfloat162;
  static __device__ float2 load(const V& v) { return __bfloat1622float2(v); }
  static __device__ V make(float a, float b) { return __floats2bfloat162_rn(a, b); }
};
template <>
struct Pair<at::Half> {
  using V = __half2;
  static __device__ float2 load(const V& v) { return __half22float2(v); }
  static __device__ V make(float a, float b) { return __floats2half2_rn(a, b); }
};

template <typename T>
__global__ void qk_norm_rope_kernel(const T* __restrict__ x, T* __restrict__ y, int64_t rows,
                                    int heads, int seqlen, int d, int64_t sb, int64_t sh,
                                    int64_t ss, int64_t ysb, int64_t ysh, int64_t yss,
                                    const float* __restrict__ w0,
                                    const float* __restrict__ w1, int norm_split, float eps,
                                    const float* __restrict__ cos,
                                    const float* __restrict__ sin) {
  using V = typename Pair<T>::V;
  const int lane = threadIdx.x % 32;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32;
  if (row >= rows) return;  // warp-uniform
  const int h = static_cast<int>(row % heads);
  const int64_t bs = row / heads;
  const int s = static_cast<int>(bs % seqlen);
  const int64_t b = bs / seqlen;
  const V* xr = reinterpret_cast<const V*>(x + b * sb + h * sh + s * ss);
  V* yr = reinterpret_cast<V*>(y + b * ysb + h * ysh + s * yss);
  const int pairs = d / 2;
  float inv = 1.f;
  if (w0 != nullptr) {
    float acc = 0.f;
    for (int i = lane; i < pairs; i += 32) {
      const float2 v = Pair<T>::load(xr[i]);
      acc += v.x * v.x + v.y * v.y;
    }
    for (int off = 16; off > 0; off >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, off);
    inv = rsqrtf(acc / static_cast<float>(d) + eps);
  }
  const float* w = s < norm_split ? w0 : w1;
  for (int i = lane; i < pairs; i += 32) {
    float2 v = Pair<T>::load(xr[i]);
    if (w0 != nullptr) {
      v.x = v.x * inv * w[2 * i];
      v.y = v.y * inv * w[2 * i + 1];
    }
    if (cos != nullptr) {
      const float2 c = reinterpret_cast<const float2*>(cos + static_cast<int64_t>(s) * d)[i];
      const float2 n = reinterpret_cast<const float2*>(sin + static_cast<int64_t>(s) * d)[i];
      v = make_float2(v.x * c.x - v.y * n.x, v.y * c.y + v.x * n.y);
    }
    yr[i] = Pair<T>::make(v.x, v.y);
  }
}

// The same for head dims of 64, 128 and 256 with 16-byte rows pieces: kLanes = D / 8 lanes per
// row, each holding 8 values in registers from one 16-byte load (no second read of the row),
// the sum of squares reduced over the row's lanes, 16-byte stores. Why: the pair kernel above
// moved q and k at about 1.2 TB/s on the H200 (session 18's step profile: 95 us for q and k of
// 4,608 x 3,072 each), a quarter of the card's bandwidth; 4-byte accesses and the re-read kept
// it from streaming. Same arithmetic per element, in the same order.
template <typename T, int kLanes>
__global__ void qk_norm_rope_vec_kernel(const T* __restrict__ x, T* __restrict__ y, int64_t rows,
                                        int heads, int seqlen, int64_t sb, int64_t sh, int64_t ss,
                                        int64_t ysb, int64_t ysh, int64_t yss,
                                        const float* __restrict__ w0,
                                        const float* __restrict__ w1, int norm_split, float eps,
                                        const float* __restrict__ cos,
                                        const float* __restrict__ sin) {
  using V = typename Pair<T>::V;
  constexpr int d = kLanes * 8;
  const int part = threadIdx.x % kLanes;  // this lane's 8 columns: 8 part .. 8 part + 7
  const int64_t row =
      static_cast<int64_t>(blockIdx.x) * (blockDim.x / kLanes) + threadIdx.x / kLanes;
  // Rows past the end still take part in the shuffles (a row's lanes are one aligned group of
  // kLanes, so a whole group is in or out), then skip their loads and stores.
  const bool live = row < rows;
  const int64_t r = live ? row : 0;
  const int h = static_cast<int>(r % heads);
  const int64_t bs = r / heads;
  const int s = static_cast<int>(bs % seqlen);
  const int64_t b = bs / seqlen;
  uint4 raw = make_uint4(0u, 0u, 0u, 0u);
  if (live) raw = *reinterpret_cast<const uint4*>(x + b * sb + h * sh + s * ss + 8 * part);
  const V* pv = reinterpret_cast<const V*>(&raw);
  float2 v[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) v[i] = Pair<T>::load(pv[i]);
  float inv = 1.f;
  if (w0 != nullptr) {
    float acc = 0.f;
#pragma unroll
    for (int i = 0; i < 4; ++i) acc += v[i].x * v[i].x + v[i].y * v[i].y;
#pragma unroll
    for (int off = kLanes / 2; off > 0; off >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, off);
    inv = rsqrtf(acc / static_cast<float>(d) + eps);
    const float4* w = reinterpret_cast<const float4*>((s < norm_split ? w0 : w1) + 8 * part);
    const float4 wa = w[0], wb = w[1];
    const float ws[8] = {wa.x, wa.y, wa.z, wa.w, wb.x, wb.y, wb.z, wb.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      v[i].x = v[i].x * inv * ws[2 * i];
      v[i].y = v[i].y * inv * ws[2 * i + 1];
    }
  }
  if (cos != nullptr) {
    const float4* cp = reinterpret_cast<const float4*>(cos + static_cast<int64_t>(s) * d + 8 * part);
    const float4* sp = reinterpret_cast<const float4*>(sin + static_cast<int64_t>(s) * d + 8 * part);
    const float4 ca = cp[0], cb = cp[1], sa = sp[0], sb2 = sp[1];
    const float2 c[4] = {{ca.x, ca.y}, {ca.z, ca.w}, {cb.x, cb.y}, {cb.z, cb.w}};
    const float2 n[4] = {{sa.x, sa.y}, {sa.z, sa.w}, {sb2.x, sb2.y}, {sb2.z, sb2.w}};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      v[i] = make_float2(v[i].x * c[i].x - v[i].y * n[i].x, v[i].y * c[i].y + v[i].x * n[i].y);
    }
  }
  if (!live) return;
  uint4 out;
  V* po = reinterpret_cast<V*>(&out);
#pragma unroll
  for (int i = 0; i < 4; ++i) po[i] = Pair<T>::make(v[i].x, v[i].y);
  *reinterpret_cast<uint4*>(y + b * ysb + h * ysh + s * yss + 8 * part) = out;
}

template <typename T, int kLanes>
void launch_vec(const at::Tensor& x, at::Tensor& y, int64_t rows, const NormWeights& w,
                const float* cos, const float* sin, int64_t norm_split, double eps,
                cudaStream_t stream) {
  constexpr int kThreads = 256;
  constexpr int kRowsPerBlock = kThreads / kLanes;
  const int64_t blocks = (rows + kRowsPerBlock - 1) / kRowsPerBlock;
  qk_norm_rope_vec_kernel<T, kLanes><<<blocks, kThreads, 0, stream>>>(
      x.const_data_ptr<T>(), y.mutable_data_ptr<T>(), rows, x.size(1), x.size(2), x.stride(0),
      x.stride(1), x.stride(2), y.stride(0), y.stride(1), y.stride(2), w.w0(), w.w1(),
      norm_split, static_cast<float>(eps), cos, sin);
}

// The 16-byte kernel's configuration for head dim d (64, 128 or 256).
template <typename T>
void launch_vec_for_dim(int64_t d, const at::Tensor& x, at::Tensor& y, int64_t rows,
                        const NormWeights& w, const float* cos, const float* sin,
                        int64_t norm_split, double eps, cudaStream_t stream) {
  if (d == 64) {
    launch_vec<T, 8>(x, y, rows, w, cos, sin, norm_split, eps, stream);
  } else if (d == 128) {
    launch_vec<T, 16>(x, y, rows, w, cos, sin, norm_split, eps, stream);
  } else {
    launch_vec<T, 32>(x, y, rows, w, cos, sin, norm_split, eps, stream);
  }
}

bool aligned16(const void* p) { return p == nullptr || reinterpret_cast<uintptr_t>(p) % 16 == 0; }

}  // namespace

at::Tensor norm_rope_one(const at::Tensor& x_in, const NormWeights& w, const RopeTables& rope,
                         int64_t norm_split, double eps, bool token_major) {
  // 32-bit pair loads need an even stride everywhere and a 4-byte aligned base.
  at::Tensor x = x_in;
  const bool pairs_ok = x.stride(3) == 1 && x.stride(0) % 2 == 0 && x.stride(1) % 2 == 0 &&
                        x.stride(2) % 2 == 0 &&
                        reinterpret_cast<uintptr_t>(x.const_data_ptr()) % 4 == 0;
  // a clone: contiguous() would return a contiguous view at an odd offset as itself
  if (!pairs_ok) x = x.clone(at::MemoryFormat::Contiguous);
  // (B, H, S, D) sizes; memory (B, S, H, D) when token_major, else contiguous.
  at::Tensor y = token_major
                     ? at::empty({x.size(0), x.size(2), x.size(1), x.size(3)}, x.options())
                           .transpose(1, 2)
                     : at::empty(x.sizes(), x.options());
  const int64_t rows = x.size(0) * x.size(1) * x.size(2);
  if (rows == 0 || x.size(3) == 0) return y;
  constexpr int kThreads = 256;
  const int64_t blocks = (rows + kThreads / 32 - 1) / (kThreads / 32);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const float* cos = rope.cos.defined() ? rope.cos.const_data_ptr<float>() : nullptr;
  const float* sin = rope.sin.defined() ? rope.sin.const_data_ptr<float>() : nullptr;
  // 16-byte pieces: head dim 64 / 128 / 256, every row start and table row 16-byte aligned.
  // DCGEN_QK_NORM_ROPE_VEC=0 keeps the pair kernel (a rollback until a GPU run has validated
  // the 16-byte one).
  const int64_t d = x.size(3);
  const bool vec = dcgen::env_switch("DCGEN_QK_NORM_ROPE_VEC", true) && (d == 64 || d == 128 || d == 256) && x.stride(0) % 8 == 0 &&
                   x.stride(1) % 8 == 0 && x.stride(2) % 8 == 0 && aligned16(x.const_data_ptr()) &&
                   aligned16(y.const_data_ptr()) && aligned16(w.w0()) && aligned16(w.w1()) &&
                   aligned16(cos) && aligned16(sin);
  if (vec) {
    AT_DISPATCH_SWITCH(x.scalar_type(), "dcgen::qk_norm_rope",
                       AT_DISPATCH_CASE(at::kBFloat16, [&] {
                         launch_vec_for_dim<scalar_t>(d, x, y, rows, w, cos, sin, norm_split, eps, stream);
                       }) AT_DISPATCH_CASE(at::kHalf, [&] {
                         launch_vec_for_dim<scalar_t>(d, x, y, rows, w, cos, sin, norm_split, eps, stream);
                       }));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return y;
  }
  AT_DISPATCH_SWITCH(x.scalar_type(), "dcgen::qk_norm_rope",
                     AT_DISPATCH_CASE(at::kBFloat16, [&] {
                       qk_norm_rope_kernel<scalar_t><<<blocks, kThreads, 0, stream>>>(
                           x.const_data_ptr<scalar_t>(), y.mutable_data_ptr<scalar_t>(), rows,
                           x.size(1), x.size(2), x.size(3), x.stride(0), x.stride(1), x.stride(2),
                           y.stride(0), y.stride(1), y.stride(2), w.w0(), w.w1(), norm_split,
                           static_cast<float>(eps), cos, sin);
                     }) AT_DISPATCH_CASE(at::kHalf, [&] {
                       qk_norm_rope_kernel<scalar_t><<<blocks, kThreads, 0, stream>>>(
                           x.const_data_ptr<scalar_t>(), y.mutable_data_ptr<scalar_t>(), rows,
                           x.size(1), x.size(2), x.size(3), x.stride(0), x.stride(1), x.stride(2),
                           y.stride(0), y.stride(1), y.stride(2), w.w0(), w.w1(), norm_split,
                           static_cast<float>(eps), cos, sin);
                     }));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return y;
}

namespace {

std::tuple<at::Tensor, at::Tensor> qk_norm_rope_cuda(
    const at::Tensor& q, const at::Tensor& k, const std::optional<at::Tensor>& q_weight,
    const std::optional<at::Tensor>& k_weight, double eps, const std::optional<at::Tensor>& cos,
    const std::optional<at::Tensor>& sin, int64_t norm_split) {
  constexpr const char* op = "dcgen::qk_norm_rope";
  for (const at::Tensor* t : {&q, &k}) {
    TORCH_CHECK(t->is_cuda(), op, " (CUDA): got a tensor on ", t->device());
    TORCH_CHECK(t->dim() == 4, op, ": expected (B, H, S, D) tensors, got shape ", t->sizes());
    TORCH_CHECK(t->scalar_type() == at::kBFloat16 || t->scalar_type() == at::kHalf, op,
                ": expected bfloat16 or float16, got ", t->scalar_type());
    TORCH_CHECK(t->size(3) % 2 == 0, op, ": expected an even head dim, got ", t->size(3));
  }
  TORCH_CHECK(q.device() == k.device() && q.scalar_type() == k.scalar_type() &&
                  q.size(3) == k.size(3),
              op, ": expected q and k on one device with one dtype and head dim, got ",
              q.device(), "/", k.device(), ", ", q.scalar_type(), "/", k.scalar_type(), ", ",
              q.size(3), "/", k.size(3));
  TORCH_CHECK(eps > 0, op, ": expected eps > 0, got ", eps);
  const c10::cuda::CUDAGuard guard(q.device());
  check_arch(q, op);
  const NormWeights qw = norm_weights(q_weight, q, op, "q_weight");
  const NormWeights kw = norm_weights(k_weight, k, op, "k_weight");
  const bool rope_on = cos.has_value() && cos->defined();
  TORCH_CHECK(!rope_on || q.size(2) == k.size(2), op,
              ": RoPE needs q and k of one sequence length, got ", q.size(2), " and ", k.size(2));
  const RopeTables rope = rope_tables(cos, sin, q.size(2), q.size(3), q, op);
  return {norm_rope_one(q, qw, rope, norm_split, eps, /*token_major=*/true),
          norm_rope_one(k, kw, rope, norm_split, eps, /*token_major=*/true)};
}

}  // namespace

TORCH_LIBRARY_IMPL(dcgen, CUDA, m) { m.impl("qk_norm_rope", &qk_norm_rope_cuda); }

}  // namespace dcgen::attention
