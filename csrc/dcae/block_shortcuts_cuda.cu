// DC-AE up/down blocks: main path (optionally pixel-(un)shuffled) + the residual-autoencoding
// shortcut, added in one pass (spec: dcgen/ops/block_shortcuts.py).
//
// One thread per output element, walked in the output's memory order (NCHW or channels_last),
// so the writes are fully coalesced; y and x are read through their strides, so any input
// layout works without a copy. The shortcut is computed on the fly from x (duplicated channel
// k of the up shortcut is input channel k / repeats; the down shortcut averages `group`
// consecutive space-to-channel channels), never materialised. Math in fp32, one rounding.
// The work is pure data movement: 32-bit index math whenever the output has < 2^31 elements.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>

#include "dcae/output_order.cuh"

namespace dcgen {
namespace {

using output_order::decode;
using output_order::prefers_channels_last;
using output_order::Strides4;
using output_order::strides_of;

template <typename T, typename I, bool CL>
__global__ void up_shortcut_kernel(const T* __restrict__ y, const T* __restrict__ x,
                                   T* __restrict__ out, I total, I C, I OH, I OW, I repeats,
                                   bool shuffle_y, Strides4 ys, Strides4 xs) {
  for (I idx = static_cast<I>(blockIdx.x) * blockDim.x + threadIdx.x; idx < total;
       idx += static_cast<I>(gridDim.x) * blockDim.x) {
    I b, c, oh, ow;
    decode<I, CL>(idx, C, OH, OW, b, c, oh, ow);
    const I h = oh >> 1, w = ow >> 1;
    // Channel before depth-to-space: pixel_shuffle reads channel 4c + 2i + j for sub-pixel (i, j).
    const I k = 4 * c + 2 * (oh & 1) + (ow & 1);
    const int64_t yo = shuffle_y ? b * ys.s[0] + k * ys.s[1] + h * ys.s[2] + w * ys.s[3]
                                 : b * ys.s[0] + c * ys.s[1] + oh * ys.s[2] + ow * ys.s[3];
    const int64_t xo = b * xs.s[0] + (k / repeats) * xs.s[1] + h * xs.s[2] + w * xs.s[3];
    out[idx] = static_cast<T>(static_cast<float>(y[yo]) + static_cast<float>(x[xo]));
  }
}

template <typename T, typename I, bool CL>
__global__ void down_shortcut_kernel(const T* __restrict__ y, const T* __restrict__ x,
                                     T* __restrict__ out, I total, I C, I OH, I OW, I group,
                                     bool unshuffle_y, Strides4 ys, Strides4 xs) {
  for (I idx = static_cast<I>(blockIdx.x) * blockDim.x + threadIdx.x; idx < total;
       idx += static_cast<I>(gridDim.x) * blockDim.x) {
    I b, c, oh, ow;
    decode<I, CL>(idx, C, OH, OW, b, c, oh, ow);
    // pixel_unshuffle: output channel m holds input channel m / 4 at sub-pixel ((m/2)%2, m%2).
    const int64_t yo =
        unshuffle_y
            ? b * ys.s[0] + (c >> 2) * ys.s[1] + (2 * oh + ((c >> 1) & 1)) * ys.s[2] +
                  (2 * ow + (c & 1)) * ys.s[3]
            : b * ys.s[0] + c * ys.s[1] + oh * ys.s[2] + ow * ys.s[3];
    float acc = 0.f;
    for (I g = 0; g < group; ++g) {
      const I m = c * group + g;
      acc += static_cast<float>(x[b * xs.s[0] + (m >> 2) * xs.s[1] + (2 * oh + ((m >> 1) & 1)) * xs.s[2] +
                                  (2 * ow + (m & 1)) * xs.s[3]]);
    }
    out[idx] = static_cast<T>(static_cast<float>(y[yo]) + acc / static_cast<float>(group));
  }
}

void check_pair(const char* op, const at::Tensor& y, const at::Tensor& x) {
  TORCH_CHECK(y.is_cuda() && x.device() == y.device(), "dcgen::", op,
              " (CUDA): expected y and x on one CUDA device, got y on ", y.device(), ", x on ",
              x.device());
  TORCH_CHECK(y.dim() == 4 && x.dim() == 4, "dcgen::", op, ": expected 4-d y and x, got ", y.dim(),
              " and ", x.dim(), " dims");
  TORCH_CHECK(y.scalar_type() == x.scalar_type(), "dcgen::", op,
              ": expected x and y of one dtype, got y ", y.scalar_type(), ", x ", x.scalar_type());
  const auto st = y.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kHalf || st == at::kBFloat16, "dcgen::", op,
              ": expected dtype float32, float16 or bfloat16, got ", st);
  TORCH_CHECK(x.size(0) == y.size(0), "dcgen::", op, ": expected one batch size, got y ",
              y.size(0), ", x ", x.size(0));
}

at::Tensor up_block_shortcut_cuda(const at::Tensor& y, const at::Tensor& x, bool shuffle_y) {
  check_pair("up_block_shortcut", y, x);
  const int64_t cin = x.size(1), h = x.size(2), w = x.size(3);
  int64_t cout;
  if (shuffle_y) {
    TORCH_CHECK(y.size(1) % 4 == 0 && y.size(2) == h && y.size(3) == w,
                "dcgen::up_block_shortcut: with shuffle_y expected y of shape (B, 4*Cout, ", h, ", ",
                w, "), got ", y.sizes());
    cout = y.size(1) / 4;
  } else {
    TORCH_CHECK(y.size(2) == 2 * h && y.size(3) == 2 * w,
                "dcgen::up_block_shortcut: without shuffle_y expected y of spatial size ", 2 * h,
                "x", 2 * w, ", got ", y.sizes());
    cout = y.size(1);
  }
  TORCH_CHECK(cin > 0 && (4 * cout) % cin == 0, "dcgen::up_block_shortcut: 4*Cout=", 4 * cout,
              " is not a multiple of x's ", cin, " channels");
  const c10::cuda::CUDAGuard guard(y.device());
  const bool cl = prefers_channels_last(y);
  at::Tensor out = at::empty({y.size(0), cout, 2 * h, 2 * w}, y.options(),
                             cl ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous);
  if (out.numel() == 0) return out;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const Strides4 ys = strides_of(y), xs = strides_of(x);
  const int64_t total = out.numel();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(), "up_block_shortcut_cuda", [&] {
    output_order::dispatch(out.numel(), cl, [&](auto index, auto layout) {
      using I = decltype(index);
      constexpr bool CL = decltype(layout)::value;
      up_shortcut_kernel<scalar_t, I, CL><<<output_order::grid(total), output_order::kThreads, 0, stream>>>(
          y.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(),
          static_cast<I>(total), static_cast<I>(cout), static_cast<I>(2 * h), static_cast<I>(2 * w),
          static_cast<I>(4 * cout / cin), shuffle_y, ys, xs);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return out;
}

at::Tensor down_block_shortcut_cuda(const at::Tensor& y, const at::Tensor& x, bool unshuffle_y) {
  check_pair("down_block_shortcut", y, x);
  const int64_t cin = x.size(1), h = x.size(2), w = x.size(3);
  TORCH_CHECK(h % 2 == 0 && w % 2 == 0,
              "dcgen::down_block_shortcut: x's spatial size must be even, got ", h, "x", w);
  int64_t cout;
  if (unshuffle_y) {
    TORCH_CHECK(y.size(2) == h && y.size(3) == w,
                "dcgen::down_block_shortcut: with unshuffle_y expected y of shape (B, Cout/4, ", h,
                ", ", w, "), got ", y.sizes());
    cout = 4 * y.size(1);
  } else {
    TORCH_CHECK(y.size(2) == h / 2 && y.size(3) == w / 2,
                "dcgen::down_block_shortcut: without unshuffle_y expected y of spatial size ", h / 2,
                "x", w / 2, ", got ", y.sizes());
    cout = y.size(1);
  }
  TORCH_CHECK(cout > 0 && (4 * cin) % cout == 0, "dcgen::down_block_shortcut: x's 4*Cin=", 4 * cin,
              " channels are not a multiple of Cout=", cout);
  const c10::cuda::CUDAGuard guard(y.device());
  const bool cl = prefers_channels_last(y);
  at::Tensor out = at::empty({y.size(0), cout, h / 2, w / 2}, y.options(),
                             cl ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous);
  if (out.numel() == 0) return out;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const Strides4 ys = strides_of(y), xs = strides_of(x);
  const int64_t total = out.numel();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(), "down_block_shortcut_cuda", [&] {
    output_order::dispatch(out.numel(), cl, [&](auto index, auto layout) {
      using I = decltype(index);
      constexpr bool CL = decltype(layout)::value;
      down_shortcut_kernel<scalar_t, I, CL><<<output_order::grid(total), output_order::kThreads, 0, stream>>>(
          y.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(),
          static_cast<I>(total), static_cast<I>(cout), static_cast<I>(h / 2), static_cast<I>(w / 2),
          static_cast<I>(4 * cin / cout), unshuffle_y, ys, xs);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(dcgen, CUDA, m) {
  m.impl("up_block_shortcut", &up_block_shortcut_cuda);
  m.impl("down_block_shortcut", &down_block_shortcut_cuda);
}

}  // namespace dcgen
