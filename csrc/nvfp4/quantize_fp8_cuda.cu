// Dynamic FP8 (E4M3) activation quantization in one pass: x [M, K] (bf16 / fp16 / fp32) ->
// q float8_e4m3fn [M, K] and fp32 decode scales, one per row (block = 0) or per 1x128 block.
// Spec (followed op for op, so results are bit-identical for finite inputs):
// dcgen/ops/quantize_fp8.py: scale = amax * fp32(1/448) (1 where that is 0),
// q = e4m3(clamp(x / scale)).
//
// 1x128 blocks: 16 lanes (half a warp) per block, 8 elements each, amax by shuffles.
// Rows: one CTA per row. Up to 16,384 columns the row stays in registers (every load issued up
// front, one read of global memory); longer rows take a second pass that re-reads from L1/L2.
// 16-bit rows are kept as loaded (8 elements in one 16-byte word, 4 registers instead of 8
// floats) and widened again for the quantize: the kernel is latency-bound (load the row, reduce,
// then store), so registers decide how many rows an SM overlaps (at K = 12,288 the fp32 copy
// took 88 registers, 2 CTAs per SM, and ran at half the copy bandwidth on the H200).
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "nvfp4/fp8_row.cuh"
#include "nvfp4/quant_common.cuh"

namespace dcgen {
namespace {

using quant::load8;
using quant::nan_max;
using quant::fp8_scale;
using quant::row_amax;
using quant::store_q;

template <typename T>
__global__ void quantize_fp8_block128_kernel(const T* __restrict__ x, uint8_t* __restrict__ q,
                                             float* __restrict__ scales, int64_t M, int64_t K,
                                             int64_t nb, bool vec) {
  const int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t g = t >> 4;  // (row, block) handled by this half-warp
  const int lane = static_cast<int>(t & 15);
  const bool live = g < M * nb;
  const int64_t row = live ? g / nb : 0;
  const int64_t blk = live ? g - row * nb : 0;
  const int64_t k0 = blk * 128 + lane * 8;
  const int valid = live ? quant::count_valid(K - k0, 8) : 0;
  const bool v = vec && valid == 8;
  float vals[8];
  quant::load8(x + row * K + k0, valid, v, vals);
  float amax = 0.f;
#pragma unroll
  for (int i = 0; i < 8; ++i) amax = nan_max(amax, fabsf(vals[i]));
  // Every lane of the warp is alive here (no early return), so full-mask shuffles are safe.
#pragma unroll
  for (int off = 8; off > 0; off >>= 1) amax = nan_max(amax, __shfl_xor_sync(0xffffffffu, amax, off));
  if (!live) return;
  const float scale = fp8_scale(amax);
  if (valid > 0) {
    const T* src = x + row * K + k0;
    store_q(q + row * K + k0, vals, quant::GridDivisor(scale), valid, v,
            [&](float (&out)[8]) { load8(src, valid, v, out); });
  }
  if (lane == 0) scales[row * nb + blk] = scale;
}

template <typename T, int kThreads>
__global__ void quantize_fp8_row_kernel(const T* __restrict__ x, uint8_t* __restrict__ q,
                                        float* __restrict__ scales, int64_t K, bool vec) {
  const int64_t row = blockIdx.x;
  const T* xr = x + row * K;
  uint8_t* qr = q + row * K;
  float amax = 0.f;
  float vals[8];
  for (int64_t k0 = threadIdx.x * 8; k0 < K; k0 += kThreads * 8) {
    const int valid = quant::count_valid(K - k0, 8);
    load8(xr + k0, valid, vec && valid == 8, vals);
#pragma unroll
    for (int i = 0; i < 8; ++i) amax = nan_max(amax, fabsf(vals[i]));
  }
  const float scale = fp8_scale(row_amax<kThreads>(amax));
  const quant::GridDivisor divisor(scale);
  for (int64_t k0 = threadIdx.x * 8; k0 < K; k0 += kThreads * 8) {
    const int valid = quant::count_valid(K - k0, 8);
    const bool v = vec && valid == 8;
    load8(xr + k0, valid, v, vals);
    store_q(qr + k0, vals, divisor, valid, v, [&](float (&out)[8]) { load8(xr + k0, valid, v, out); });
  }
  if (threadIdx.x == 0) scales[row] = scale;
}

// Eight consecutive elements as they were loaded: fp32 as 8 floats, 16-bit types as the raw
// 16-byte word (zero bits where an element does not exist: +0 in bf16 and fp16 alike).
template <typename T, bool kWide = (sizeof(T) == 4)>
struct Raw8 {
  float v[8];
  __device__ __forceinline__ void load(const T* __restrict__ p, int valid, bool vec) {
    load8(p, valid, vec, v);
  }
  __device__ __forceinline__ void widen(float out[8]) const {
#pragma unroll
    for (int i = 0; i < 8; ++i) out[i] = v[i];
  }
  __device__ __forceinline__ void widen_again(float out[8]) const { widen(out); }
};

template <typename T>
struct Raw8<T, false> {
  uint4 w;
  __device__ __forceinline__ void load(const T* __restrict__ p, int valid, bool vec) {
    if (vec) {
      w = *reinterpret_cast<const uint4*>(p);
      return;
    }
    uint32_t h[4] = {0u, 0u, 0u, 0u};
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      if (i < valid) h[i >> 1] |= static_cast<uint32_t>(quant::bits16(p[i])) << ((i & 1) * 16);
    }
    w = make_uint4(h[0], h[1], h[2], h[3]);
  }
  __device__ __forceinline__ void widen(float out[8]) const { widen_word(w, out); }
  // The second widening, for the quantize: the words pass through an empty asm the compiler
  // cannot see into, so it widens them again instead of keeping the first widening's 8 floats
  // live across the row reduction (which it does for bf16, a shift per element: 90 registers
  // instead of 56 at 8 slots, sm_90 ptxas).
  __device__ __forceinline__ void widen_again(float out[8]) const {
    uint4 c = w;
    asm volatile("" : "+r"(c.x), "+r"(c.y), "+r"(c.z), "+r"(c.w));
    widen_word(c, out);
  }

 private:
  __device__ __forceinline__ static void widen_word(const uint4& word, float out[8]) {
    quant::unpack2<T>(word.x, out);
    quant::unpack2<T>(word.y, out + 2);
    quant::unpack2<T>(word.z, out + 4);
    quant::unpack2<T>(word.w, out + 6);
  }
};

// The row in registers: kIters x 8 elements per thread (iterations past K load nothing), all
// loads unrolled so they are in flight together; same arithmetic as the two-pass kernel.
// Occupancy is what this latency-bound kernel runs on, so for 16-bit rows the CTAs per SM are
// pinned to what they reached before the reciprocal quantize (56 / 48 / 40 / 32 registers at
// 8 / 6 / 4 / 2 slots, sm_90 ptxas), which left alone took 2-3 registers more and lost a CTA per
// SM. fp32 rows (twice the registers) are left to ptxas: pinned, they spill.
template <typename T, int kIters>
constexpr int row_regs_min_ctas() {
  if constexpr (sizeof(T) != 2) return 1;
  return kIters >= 8 ? 4 : kIters >= 6 ? 5 : kIters >= 4 ? 6 : 8;
}

template <typename T, int kThreads, int kIters>
__global__ void __launch_bounds__(kThreads, row_regs_min_ctas<T, kIters>()) quantize_fp8_row_regs_kernel(const T* __restrict__ x, uint8_t* __restrict__ q,
                                             float* __restrict__ scales, int64_t K, bool vec) {
  const int64_t row = blockIdx.x;
  const T* xr = x + row * K;
  uint8_t* qr = q + row * K;
  Raw8<T> raw[kIters];
  float amax = 0.f;
#pragma unroll
  for (int it = 0; it < kIters; ++it) {
    const int64_t k0 = (static_cast<int64_t>(it) * kThreads + threadIdx.x) * 8;
    const int valid = quant::count_valid(K - k0, 8);
    raw[it].load(xr + k0, valid, vec && valid == 8);
  }
#pragma unroll
  for (int it = 0; it < kIters; ++it) {
    float vals[8];
    raw[it].widen(vals);
#pragma unroll
    for (int i = 0; i < 8; ++i) amax = nan_max(amax, fabsf(vals[i]));
  }
  const float scale = fp8_scale(row_amax<kThreads>(amax));
  const quant::GridDivisor divisor(scale);
#pragma unroll
  for (int it = 0; it < kIters; ++it) {
    const int64_t k0 = (static_cast<int64_t>(it) * kThreads + threadIdx.x) * 8;
    const int valid = quant::count_valid(K - k0, 8);
    if (valid > 0) {
      float vals[8];
      raw[it].widen_again(vals);
      store_q(qr + k0, vals, divisor, valid, vec && valid == 8,
              [&](float (&out)[8]) { raw[it].widen_again(out); });
    }
  }
  if (threadIdx.x == 0) scales[row] = scale;
}

std::tuple<at::Tensor, at::Tensor> quantize_fp8_cuda(const at::Tensor& x, int64_t block) {
  TORCH_CHECK(x.is_cuda(), "dcgen::quantize_fp8 (CUDA): expected x on a CUDA device, got ", x.device());
  TORCH_CHECK(x.dim() == 2, "dcgen::quantize_fp8: expected x of shape [M, K], got ", x.sizes());
  TORCH_CHECK(x.is_contiguous(), "dcgen::quantize_fp8: expected a contiguous x, got strides ", x.strides());
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kHalf ||
                  x.scalar_type() == at::kFloat,
              "dcgen::quantize_fp8: expected x of dtype bfloat16, float16 or float32, got ",
              x.scalar_type());
  TORCH_CHECK(block == 0 || block == 128, "dcgen::quantize_fp8: expected block 0 (per row) or 128, got ",
              block);
  const int64_t M = x.size(0), K = x.size(1);
  TORCH_CHECK(K >= 1, "dcgen::quantize_fp8: expected K >= 1, got shape ", x.sizes());
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t nb = block == 0 ? 1 : (K + 127) / 128;
  at::Tensor q = at::empty({M, K}, x.options().dtype(at::kFloat8_e4m3fn));
  at::Tensor scales = at::empty({M, nb}, x.options().dtype(at::kFloat));
  if (M == 0) return {q, scales};
  const bool vec = K % 8 == 0 && reinterpret_cast<uintptr_t>(x.const_data_ptr()) % 16 == 0;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  auto* qp = reinterpret_cast<uint8_t*>(q.mutable_data_ptr());
  auto* sp = scales.mutable_data_ptr<float>();
  DCGEN_DISPATCH_QUANT_INPUT(x.scalar_type(), "quantize_fp8_cuda", [&] {
    using T = quant::device_t<scalar_t>;
    const T* xp = reinterpret_cast<const T*>(x.const_data_ptr());
    if (block == 0) {
      // One CTA per row: gridDim.x caps M (a larger grid would be cut short, rows unwritten).
      TORCH_CHECK(M <= 2147483647LL, "dcgen::quantize_fp8: expected at most 2^31 - 1 rows per "
                  "row-scaled call, got ", M);
      constexpr int kThreads = 256;
      const int64_t iters = (K + kThreads * 8 - 1) / (kThreads * 8);
      // The fewest register slots that hold the row: FLUX's K = 3,072 / 12,288 / 15,360 take
      // 2 / 6 / 8 (a slot past K costs its registers for nothing).
      if (iters <= 1) {
        quantize_fp8_row_regs_kernel<T, kThreads, 1><<<M, kThreads, 0, stream>>>(xp, qp, sp, K, vec);
      } else if (iters <= 2) {
        quantize_fp8_row_regs_kernel<T, kThreads, 2><<<M, kThreads, 0, stream>>>(xp, qp, sp, K, vec);
      } else if (iters <= 4) {
        quantize_fp8_row_regs_kernel<T, kThreads, 4><<<M, kThreads, 0, stream>>>(xp, qp, sp, K, vec);
      } else if (iters <= 6) {
        quantize_fp8_row_regs_kernel<T, kThreads, 6><<<M, kThreads, 0, stream>>>(xp, qp, sp, K, vec);
      } else if (iters <= 8) {
        quantize_fp8_row_regs_kernel<T, kThreads, 8><<<M, kThreads, 0, stream>>>(xp, qp, sp, K, vec);
      } else {
        quantize_fp8_row_kernel<T, kThreads><<<M, kThreads, 0, stream>>>(xp, qp, sp, K, vec);
      }
    } else {
      constexpr int kThreads = 256;
      const int64_t threads = M * nb * 16;
      const int64_t blocks = (threads + kThreads - 1) / kThreads;
      quantize_fp8_block128_kernel<T><<<blocks, kThreads, 0, stream>>>(xp, qp, sp, M, K, nb, vec);
    }
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {q, scales};
}

}  // namespace
}  // namespace dcgen

TORCH_LIBRARY_IMPL(dcgen, CUDA, m) { m.impl("quantize_fp8", &dcgen::quantize_fp8_cuda); }
