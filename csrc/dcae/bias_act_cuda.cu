// A convolution's bias, activation and residual in one pass over its output:
//     out = act(x + bias[c]) (+ residual),   act: 'none' | 'relu' | 'silu'
// in fp32, rounded once. Spec: dcgen/ops/bias_act.py.
//
// Why it exists: PyTorch's cuDNN convolution adds its bias afterwards as a broadcast add_, and
// a broadcast never takes TensorIterator's vectorized path: on the H200 run of 2026-11-27 that
// non-vectorized add took 82 of the f64c128 4K decode's 392 ms (121 calls), before a separate
// activation pass and a residual add. The DC-AE blocks now run their convolutions without the
// bias and call this.
//
// Layouts: x dense in channels_last or in NCHW (the channel of element e is e % C or
// (e / (H W)) % C); out and residual have x's shape and strides. out may be x itself or the
// residual: every element is read and then written by the same thread, nothing else touches it.
// One thread: 8 consecutive elements, 16-byte accesses where aligned and the 8 share one
// channel pattern (channels_last: C % 8 == 0; NCHW: H W % 8 == 0).
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>
#include <optional>
#include <string_view>

#include "dcae/elementwise.h"
#include "nvfp4/quant_common.cuh"

namespace dcgen {
namespace {

constexpr int kThreads = 256;

// kCl: channels_last (channel = e % C) or NCHW (channel = (e / hw) % C).
// The channel index costs one 64-bit division per thread on the vector path, not one per
// element: with 8 divisions a thread the kernel was bound by its index arithmetic (1.90 ms for
// a (1, 256, 2048, 2048) channels_last map on the H200, 2.26 TB/s against a 3.8 TB/s copy).
template <typename T, DcaeAct kAct, bool kCl>
__global__ void bias_act_kernel(const T* __restrict__ x, const T* __restrict__ bias,
                                const T* residual, T* out, int64_t numel, int64_t C,
                                int64_t hw, bool vec) {
  const int64_t e0 = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) * 8;
  if (e0 >= numel) return;
  const int valid = quant::count_valid(numel - e0, 8);
  const bool v = vec && valid == 8;
  float vals[8];
  quant::load8(x + e0, valid, v, vals);
  float res[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
  if (residual != nullptr) quant::load8(residual + e0, valid, v, res);
  float b[8];
  if (v) {
    // The vector path's condition (launch) makes the 8 elements share one channel pattern:
    // channels_last with C % 8 == 0 puts them at channels c0 .. c0 + 7 of one pixel (e0 and C
    // are multiples of 8); NCHW with H W % 8 == 0 puts them in one channel plane.
    if constexpr (kCl) {
      const int64_t c0 = e0 % C;
#pragma unroll
      for (int i = 0; i < 8; ++i) b[i] = quant::to_float(bias[c0 + i]);
    } else {
      const float bc = quant::to_float(bias[(e0 / hw) % C]);
#pragma unroll
      for (int i = 0; i < 8; ++i) b[i] = bc;
    }
  } else {
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      const int64_t e = e0 + i;
      const int64_t c = kCl ? e % C : (e / hw) % C;
      b[i] = i < valid ? quant::to_float(bias[c]) : 0.f;
    }
  }
#pragma unroll
  for (int i = 0; i < 8; ++i) vals[i] = apply_dcae_act(vals[i] + b[i], kAct) + res[i];
  quant::store8(out + e0, vals, valid, v);
}

template <typename T>
void launch(const at::Tensor& out, const at::Tensor& x, const at::Tensor& bias,
            const std::optional<at::Tensor>& residual, DcaeAct act, bool cl) {
  const int64_t numel = x.numel(), C = x.size(1), hw = x.size(2) * x.size(3);
  const T* xp = reinterpret_cast<const T*>(x.const_data_ptr());
  const T* bp = reinterpret_cast<const T*>(bias.const_data_ptr());
  const T* rp = residual ? reinterpret_cast<const T*>(residual->const_data_ptr()) : nullptr;
  T* op = reinterpret_cast<T*>(out.mutable_data_ptr());
  const bool vec = (cl ? C % 8 == 0 : hw % 8 == 0) && aligned16(xp) && aligned16(op) &&
                   (rp == nullptr || aligned16(rp));
  const int64_t blocks = (numel + 8LL * kThreads - 1) / (8LL * kThreads);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
#define DCGEN_BIAS_ACT(ACT)                                                                  \
  if (cl) {                                                                                  \
    bias_act_kernel<T, ACT, true><<<blocks, kThreads, 0, stream>>>(xp, bp, rp, op, numel, C, \
                                                                    hw, vec);                \
  } else {                                                                                   \
    bias_act_kernel<T, ACT, false><<<blocks, kThreads, 0, stream>>>(xp, bp, rp, op, numel,   \
                                                                     C, hw, vec);            \
  }
  if (act == DcaeAct::kRelu) {
    DCGEN_BIAS_ACT(DcaeAct::kRelu)
  } else if (act == DcaeAct::kSilu) {
    DCGEN_BIAS_ACT(DcaeAct::kSilu)
  } else {
    DCGEN_BIAS_ACT(DcaeAct::kNone)
  }
#undef DCGEN_BIAS_ACT
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void bias_act_cuda(const at::Tensor& out, const at::Tensor& x, const at::Tensor& bias,
                   std::string_view act, const std::optional<at::Tensor>& residual) {
  TORCH_CHECK(x.is_cuda() && out.device() == x.device() && bias.device() == x.device() &&
                  (!residual || residual->device() == x.device()),
              "dcgen::bias_act_ (CUDA): expected out, x, bias and residual on one CUDA device, "
              "got x on ", x.device(), ", out on ", out.device(), ", bias on ", bias.device());
  TORCH_CHECK(x.dim() == 4, "dcgen::bias_act_: expected a 4-d x (N, C, H, W), got ", x.dim(),
              " dims");
  const auto st = x.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kHalf || st == at::kBFloat16,
              "dcgen::bias_act_: expected dtype float32, float16 or bfloat16, got ", st);
  TORCH_CHECK(out.scalar_type() == st && bias.scalar_type() == st &&
                  (!residual || residual->scalar_type() == st),
              "dcgen::bias_act_: expected out, bias and residual of x's dtype ", st, ", got out ",
              out.scalar_type(), ", bias ", bias.scalar_type());
  TORCH_CHECK(bias.dim() == 1 && bias.size(0) == x.size(1) && bias.is_contiguous(),
              "dcgen::bias_act_: expected a contiguous bias of shape (", x.size(1), "), got ",
              bias.sizes());
  const bool cl = x.is_contiguous(at::MemoryFormat::ChannelsLast);
  TORCH_CHECK(cl || x.is_contiguous(),
              "dcgen::bias_act_: expected x dense in channels_last or NCHW, got strides ",
              x.strides());
  TORCH_CHECK(dense_as(out, x) && (!residual || dense_as(*residual, x)),
              "dcgen::bias_act_: expected out and residual with x's shape ", x.sizes(),
              " and strides ", x.strides(), ", got out ", out.sizes(), " / ", out.strides());
  const DcaeAct a = parse_dcae_act(act, "dcgen::bias_act_");
  if (x.numel() == 0) return;
  TORCH_CHECK(x.numel() / 8 / kThreads < 2147483647LL,
              "dcgen::bias_act_: x too large for one launch, got ", x.numel(), " elements");
  const c10::cuda::CUDAGuard guard(x.device());
  if (st == at::kBFloat16) {
    launch<__nv_bfloat16>(out, x, bias, residual, a, cl);
  } else if (st == at::kHalf) {
    launch<__half>(out, x, bias, residual, a, cl);
  } else {
    launch<float>(out, x, bias, residual, a, cl);
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(dcgen, CUDA, m) { m.impl("bias_act_", &bias_act_cuda); }

}  // namespace dcgen
