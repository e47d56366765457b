// Channel RMSNorm on CUDA: fp32 statistics, one rounding to the output dtype.
//
// NCHW: one thread per pixel walks the channels; neighbouring threads read neighbouring pixels
// of the same channel plane, so every load is coalesced. channels_last: one warp per pixel row,
// lanes stride over the channels and reduce with shuffles.
#include <ATen/Dispatch.h>
// c10/cuda headers only: ATen/cuda/CUDAContext.h drags in cuBLAS/cuSPARSE headers.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "dcae/channel_rms_norm.h"

namespace dcgen {
namespace {

template <typename T>
__global__ void norm_planes_kernel(const T* __restrict__ x, T* __restrict__ y,
                                   const float* __restrict__ w, const float* __restrict__ b,
                                   int64_t outer, int64_t C, int64_t inner, float eps) {
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= outer * inner) return;
  const int64_t o = idx / inner;
  const int64_t s = idx - o * inner;
  const T* xp = x + o * C * inner + s;
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
    yp[c * inner] = static_cast<T>(v);
  }
}

template <typename T>
__global__ void norm_rows_kernel(const T* __restrict__ x, T* __restrict__ y,
                                 const float* __restrict__ w, const float* __restrict__ b,
                                 int64_t rows, int64_t C, float eps) {
  const int lane = threadIdx.x & 31;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * (blockDim.x / 32) + (threadIdx.x >> 5);
  if (row >= rows) return;  // whole warps exit together: rows are warp-uniform
  const T* xr = x + row * C;
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
    yr[c] = static_cast<T>(v);
  }
}

at::Tensor channel_rms_norm_cuda(const at::Tensor& input, const std::optional<at::Tensor>& weight,
                                 const std::optional<at::Tensor>& bias, double eps) {
  TORCH_CHECK(input.is_cuda(), "dcgen::channel_rms_norm (CUDA): x is on ", input.device());
  TORCH_CHECK(eps > 0, "dcgen::channel_rms_norm: expected eps > 0, got ", eps);
  const c10::cuda::CUDAGuard guard(input.device());
  auto l = channel_norm_layout(input);
  const at::Tensor w = channel_param(weight, l.x, l.channels, "weight");
  const at::Tensor b = channel_param(bias, l.x, l.channels, "bias");
  at::Tensor out = at::empty_like(l.x);
  if (l.x.numel() == 0) return out;
  const float* wp = w.defined() ? w.data_ptr<float>() : nullptr;
  const float* bp = b.defined() ? b.data_ptr<float>() : nullptr;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  constexpr int kThreads = 256;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, l.x.scalar_type(), "channel_rms_norm_cuda", [&] {
    if (l.rows) {
      const int64_t blocks = (l.outer + kThreads / 32 - 1) / (kThreads / 32);
      norm_rows_kernel<scalar_t><<<blocks, kThreads, 0, stream>>>(
          l.x.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(), wp, bp, l.outer,
          l.channels, static_cast<float>(eps));
    } else {
      const int64_t blocks = (l.outer * l.inner + kThreads - 1) / kThreads;
      norm_planes_kernel<scalar_t><<<blocks, kThreads, 0, stream>>>(
          l.x.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(), wp, bp, l.outer,
          l.channels, l.inner, static_cast<float>(eps));
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(dcgen, CUDA, m) { m.impl("channel_rms_norm", &channel_rms_norm_cuda); }

}  // namespace dcgen
