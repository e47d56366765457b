// GLUMBConv's middle on CUDA (spec: dcgen/ops/glu_depthwise.py): depthwise 3x3 conv
// (padding 1, optional bias) over 2*Ch channels, then out = a * SiLU(gate) with a the first Ch
// channels and gate the last Ch, in one pass; the 2*Ch-channel conv output never reaches memory.
//
// One thread per output element in the output's memory order (NCHW or channels_last, as the
// input; see output_order.cuh), reading its two 3x3 neighbourhoods through the input's strides;
// neighbouring threads share most of those reads, which L1 serves. Weights are read as fp32, accumulation is fp32,
// the result is rounded once.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>
#include <optional>

#include "dcae/output_order.cuh"

namespace dcgen {
namespace {

using output_order::coords;
using output_order::make_grid;
using output_order::OutputGrid;
using output_order::Strides4;
using output_order::strides_of;

template <typename T>
__device__ __forceinline__ float depthwise3x3(const T* __restrict__ plane, const float* __restrict__ w9,
                                              int64_t oh, int64_t ow, int64_t H, int64_t W, int64_t sh,
                                              int64_t sw) {
  float acc = 0.f;
#pragma unroll
  for (int dy = -1; dy <= 1; ++dy) {
    const int64_t r = oh + dy;
    if (r < 0 || r >= H) continue;  // zero padding
#pragma unroll
    for (int dx = -1; dx <= 1; ++dx) {
      const int64_t col = ow + dx;
      if (col < 0 || col >= W) continue;
      acc += static_cast<float>(plane[r * sh + col * sw]) * w9[(dy + 1) * 3 + (dx + 1)];
    }
  }
  return acc;
}

template <typename T, bool CL>
__global__ void glu_depthwise_kernel(const T* __restrict__ x, const float* __restrict__ weight,
                                     const float* __restrict__ bias, T* __restrict__ out,
                                     OutputGrid g, Strides4 xs) {
  DCGEN_FOR_EACH_OUTPUT(g, row, col) {
    uint32_t b, c, oh, ow;
    coords<CL>(g, row, col, b, c, oh, ow);
    const T* base = x + b * xs.s[0];
    const uint32_t gc = c + g.C;  // the gate channel
    float a = depthwise3x3<T>(base + c * xs.s[1], weight + c * 9, oh, ow, g.OH, g.OW, xs.s[2], xs.s[3]);
    float gate = depthwise3x3<T>(base + gc * xs.s[1], weight + gc * 9, oh, ow, g.OH, g.OW, xs.s[2], xs.s[3]);
    if (bias) {
      a += bias[c];
      gate += bias[gc];
    }
    // SiLU(g) = g * sigmoid(g); expf(-g) -> inf for very negative g gives g / inf = -0, fine.
    out[static_cast<int64_t>(row) * g.cols + col] = static_cast<T>(a * (gate / (1.f + expf(-gate))));
  }
}

at::Tensor glu_depthwise_conv_cuda(const at::Tensor& x, const at::Tensor& weight,
                                   const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.is_cuda(), "dcgen::glu_depthwise_conv (CUDA): x is on ", x.device());
  TORCH_CHECK(x.dim() == 4, "dcgen::glu_depthwise_conv: expected x of shape (B, 2*Ch, H, W), got ",
              x.sizes());
  const auto st = x.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kHalf || st == at::kBFloat16,
              "dcgen::glu_depthwise_conv: expected x of dtype float32, float16 or bfloat16, got ", st);
  const int64_t c2 = x.size(1);
  TORCH_CHECK(c2 % 2 == 0, "dcgen::glu_depthwise_conv: expected an even channel count (value and "
              "gate halves), got ", c2);
  TORCH_CHECK(weight.dim() == 4 && weight.size(0) == c2 && weight.size(1) == 1 && weight.size(2) == 3 &&
                  weight.size(3) == 3,
              "dcgen::glu_depthwise_conv: expected weight of shape (", c2, ", 1, 3, 3), got ",
              weight.sizes());
  TORCH_CHECK(weight.device() == x.device(), "dcgen::glu_depthwise_conv: weight is on ",
              weight.device(), " but x is on ", x.device());
  at::Tensor b;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == c2,
                "dcgen::glu_depthwise_conv: expected bias of shape (", c2, "), got ", bias->sizes());
    TORCH_CHECK(bias->device() == x.device(), "dcgen::glu_depthwise_conv: bias is on ",
                bias->device(), " but x is on ", x.device());
    b = bias->to(at::kFloat).contiguous();
  }
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor w = weight.to(at::kFloat).contiguous();
  const bool cl = output_order::prefers_channels_last(x);
  const int64_t ch = c2 / 2, h = x.size(2), wd = x.size(3);
  at::Tensor out = at::empty({x.size(0), ch, h, wd}, x.options(),
                             cl ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous);
  if (out.numel() == 0) return out;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const Strides4 xs = strides_of(x);
  const OutputGrid g = make_grid(out, cl);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, st, "glu_depthwise_conv_cuda", [&] {
    output_order::dispatch_layout(cl, [&](auto layout) {
      constexpr bool CL = decltype(layout)::value;
      glu_depthwise_kernel<scalar_t, CL><<<output_order::launch_blocks(g), output_order::kThreads, 0, stream>>>(
          x.const_data_ptr<scalar_t>(), w.const_data_ptr<float>(),
          b.defined() ? b.const_data_ptr<float>() : nullptr, out.mutable_data_ptr<scalar_t>(), g, xs);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(dcgen, CUDA, m) { m.impl("glu_depthwise_conv", &glu_depthwise_conv_cuda); }

}  // namespace dcgen
