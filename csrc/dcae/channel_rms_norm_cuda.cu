// Channel RMSNorm on CUDA: fp32 statistics, one rounding to the output dtype.
//
// NCHW: one thread per pixel (or per V adjacent pixels with 16-byte vector loads when the plane
// size and pointers allow) walks the channels; neighbouring threads read neighbouring pixels of
// the same channel plane, so every load is coalesced. The second pass re-reads x, which is
// still in L2 for the block's pixels. channels_last: one warp per pixel row, lanes stride over
// the channels and reduce with shuffles. The fused variant (channel_rms_norm_fused) applies
// relu/silu to the affine result and adds a residual of x's shape before the one rounding;
// the plain op is the fused one with neither.
#include <ATen/Dispatch.h>
// c10/cuda headers only: ATen/cuda/CUDAContext.h drags in cuBLAS/cuSPARSE headers.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>

#include "dcae/channel_rms_norm.h"

namespace dcgen {
namespace {

template <typename T>
__global__ void norm_planes_kernel(const T* __restrict__ x, T* __restrict__ y,
                                   const float* __restrict__ w, const float* __restrict__ b,
                                   const T* __restrict__ r, DcaeAct act, int64_t outer, int64_t C,
                                   int64_t inner, float eps) {
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= outer * inner) return;
  const int64_t o = idx / inner;
  const int64_t s = idx - o * inner;
  const T* xp = x + o * C * inner + s;
  const T* rp = r ? r + o * C * inner + s : nullptr;
  T* yp = y + o * C * inner + s;
  float acc = 0.f;
  for (int64_t c = 0; c < C; ++c) {
    const float v = static_cast<float>(xp[c * inner]);
    acc += v * v;
  }
  const float inv = rsqrtf(acc / static_cast<float>(C) + eps);
  for (int64_t c = 0; c < C; ++c) {
    float v = static_cast<float>(xp[c * inner]) * inv;
    if (w) v *= w[c];
    if (b) v += b[c];
    v = apply_dcae_act(v, act);
    if (rp) v += static_cast<float>(rp[c * inner]);
    yp[c * inner] = static_cast<T>(v);
  }
}

// V adjacent pixels per thread, moved as one 16-byte packet per channel.
template <typename T, int V>
struct alignas(sizeof(T) * V) Packet {
  T v[V];
};

template <typename T, int V>
__global__ void norm_planes_vec_kernel(const T* __restrict__ x, T* __restrict__ y,
                                       const float* __restrict__ w, const float* __restrict__ b,
                                       const T* __restrict__ r, DcaeAct act, int64_t outer,
                                       int64_t C, int64_t inner, float eps) {
  using P = Packet<T, V>;
  const int64_t groups = inner / V;
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= outer * groups) return;
  const int64_t o = idx / groups;
  const int64_t s = (idx - o * groups) * V;
  const T* xp = x + o * C * inner + s;
  const T* rp = r ? r + o * C * inner + s : nullptr;
  T* yp = y + o * C * inner + s;
  float acc[V];
#pragma unroll
  for (int j = 0; j < V; ++j) acc[j] = 0.f;
#pragma unroll 4
  for (int64_t c = 0; c < C; ++c) {
    const P p = *reinterpret_cast<const P*>(xp + c * inner);
#pragma unroll
    for (int j = 0; j < V; ++j) {
      const float v = static_cast<float>(p.v[j]);
      acc[j] += v * v;
    }
  }
  const float inv_c = 1.f / static_cast<float>(C);
#pragma unroll
  for (int j = 0; j < V; ++j) acc[j] = rsqrtf(acc[j] * inv_c + eps);
#pragma unroll 4
  for (int64_t c = 0; c < C; ++c) {
    const P p = *reinterpret_cast<const P*>(xp + c * inner);
    const float wc = w ? w[c] : 1.f;
    const float bc = b ? b[c] : 0.f;
    P rv;
    if (rp) rv = *reinterpret_cast<const P*>(rp + c * inner);
    P q;
#pragma unroll
    for (int j = 0; j < V; ++j) {
      float v = apply_dcae_act(static_cast<float>(p.v[j]) * acc[j] * wc + bc, act);
      if (rp) v += static_cast<float>(rv.v[j]);
      q.v[j] = static_cast<T>(v);
    }
    *reinterpret_cast<P*>(yp + c * inner) = q;
  }
}

template <typename T>
__global__ void norm_rows_kernel(const T* __restrict__ x, T* __restrict__ y,
                                 const float* __restrict__ w, const float* __restrict__ b,
                                 const T* __restrict__ r, DcaeAct act, int64_t rows, int64_t C,
                                 float eps) {
  const int lane = threadIdx.x & 31;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * (blockDim.x / 32) + (threadIdx.x >> 5);
  if (row >= rows) return;  // whole warps exit together: rows are warp-uniform
  const T* xr = x + row * C;
  const T* rr = r ? r + row * C : nullptr;
  T* yr = y + row * C;
  float acc = 0.f;
  for (int64_t c = lane; c < C; c += 32) {
    const float v = static_cast<float>(xr[c]);
    acc += v * v;
  }
  for (int offset = 16; offset > 0; offset >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, offset);
  const float inv = rsqrtf(acc / static_cast<float>(C) + eps);
  for (int64_t c = lane; c < C; c += 32) {
    float v = static_cast<float>(xr[c]) * inv;
    if (w) v *= w[c];
    if (b) v += b[c];
    v = apply_dcae_act(v, act);
    if (rr) v += static_cast<float>(rr[c]);
    yr[c] = static_cast<T>(v);
  }
}

// 16-byte packets need the plane size to be a multiple of the packet and both base pointers
// 16-byte aligned (a tensor with a storage offset may not be).
template <typename T>
bool vector_ok(const ChannelNormLayout& l, const at::Tensor& out, const at::Tensor& res) {
  constexpr int V = 16 / sizeof(T);
  return l.inner % V == 0 && reinterpret_cast<uintptr_t>(l.x.const_data_ptr()) % 16 == 0 &&
         reinterpret_cast<uintptr_t>(out.const_data_ptr()) % 16 == 0 &&
         (!res.defined() || reinterpret_cast<uintptr_t>(res.const_data_ptr()) % 16 == 0);
}

// act(norm(l.x)) (+ res) into out, which has l.x's layout (checked by the callers).
void launch_norm(const ChannelNormLayout& l, const at::Tensor& w, const at::Tensor& b,
                 const at::Tensor& res, DcaeAct act, double eps, const at::Tensor& out) {
  if (l.x.numel() == 0) return;
  const float* wp = w.defined() ? w.data_ptr<float>() : nullptr;
  const float* bp = b.defined() ? b.data_ptr<float>() : nullptr;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  constexpr int kThreads = 256;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, l.x.scalar_type(), "channel_rms_norm_cuda", [&] {
    const scalar_t* rp = res.defined() ? res.const_data_ptr<scalar_t>() : nullptr;
    scalar_t* op = reinterpret_cast<scalar_t*>(out.data_ptr());
    if (l.rows) {
      const int64_t blocks = (l.outer + kThreads / 32 - 1) / (kThreads / 32);
      norm_rows_kernel<scalar_t><<<blocks, kThreads, 0, stream>>>(
          l.x.const_data_ptr<scalar_t>(), op, wp, bp, rp, act, l.outer, l.channels,
          static_cast<float>(eps));
    } else if (vector_ok<scalar_t>(l, out, res)) {
      constexpr int V = 16 / sizeof(scalar_t);
      const int64_t blocks = (l.outer * (l.inner / V) + kThreads - 1) / kThreads;
      norm_planes_vec_kernel<scalar_t, V><<<blocks, kThreads, 0, stream>>>(
          l.x.const_data_ptr<scalar_t>(), op, wp, bp, rp, act, l.outer, l.channels, l.inner,
          static_cast<float>(eps));
    } else {
      const int64_t blocks = (l.outer * l.inner + kThreads - 1) / kThreads;
      norm_planes_kernel<scalar_t><<<blocks, kThreads, 0, stream>>>(
          l.x.const_data_ptr<scalar_t>(), op, wp, bp, rp, act, l.outer, l.channels, l.inner,
          static_cast<float>(eps));
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

at::Tensor channel_rms_norm_fused_cuda(const at::Tensor& input, const std::optional<at::Tensor>& weight,
                                       const std::optional<at::Tensor>& bias,
                                       const std::optional<at::Tensor>& residual,
                                       c10::string_view act_name, double eps) {
  TORCH_CHECK(input.is_cuda(), "dcgen::channel_rms_norm (CUDA): x is on ", input.device());
  const NormArgs a = prepare_norm(input, weight, bias, residual,
                                  std::string_view(act_name.data(), act_name.size()), eps);
  const c10::cuda::CUDAGuard guard(input.device());
  at::Tensor out = at::empty_like(a.l.x);
  launch_norm(a.l, a.w, a.b, a.res, a.act, eps, out);
  return out;
}

// The same into a caller's tensor (x itself or the residual included): no output allocation
// and no copy where the result belongs in place (the DC-AE ResBlocks' banded ending).
void channel_rms_norm_fused_out_cuda(const at::Tensor& input, const std::optional<at::Tensor>& weight,
                                     const std::optional<at::Tensor>& bias,
                                     const std::optional<at::Tensor>& residual,
                                     c10::string_view act_name, double eps, const at::Tensor& out) {
  TORCH_CHECK(input.is_cuda(), "dcgen::channel_rms_norm (CUDA): x is on ", input.device());
  const NormArgs a = prepare_norm(input, weight, bias, residual,
                                  std::string_view(act_name.data(), act_name.size()), eps);
  check_norm_out(out, a.l, input);  // before the guard: a bad call never touches the device
  const c10::cuda::CUDAGuard guard(input.device());
  launch_norm(a.l, a.w, a.b, a.res, a.act, eps, out);
}

at::Tensor channel_rms_norm_cuda(const at::Tensor& input, const std::optional<at::Tensor>& weight,
                                 const std::optional<at::Tensor>& bias, double eps) {
  return channel_rms_norm_fused_cuda(input, weight, bias, std::nullopt, "none", eps);
}

}  // namespace

TORCH_LIBRARY_IMPL(dcgen, CUDA, m) {
  m.impl("channel_rms_norm", &channel_rms_norm_cuda);
  m.impl("channel_rms_norm_fused_out", &channel_rms_norm_fused_out_cuda);
  m.impl("channel_rms_norm_fused", &channel_rms_norm_fused_cuda);
}

}  // namespace dcgen
