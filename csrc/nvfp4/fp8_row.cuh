// The FP8 (E4M3) row quantization's device steps, shared by dcgen::quantize_fp8 and the kernels
// that quantize their own output on the way out (dcgen::adaln_modulate_fp8), so both give the
// same bytes: the scale from the row's amax, the CTA-wide amax, and the 8-element encode.
// Spec: dcgen/ops/quantize_fp8.py (scale = amax * fp32(1/448), 1 where that is 0;
// q = e4m3(clamp(x / scale))).
#pragma once

#include <cstdint>

#include "nvfp4/quant_common.cuh"

namespace dcgen {
namespace quant {

constexpr float kE4M3Max = 448.f;

__device__ __forceinline__ float fp8_scale(float amax) {
  // A product with the fp32 reciprocal, as PyTorch on CUDA and Inductor compute amax / 448:
  // the spec every backend reproduces bit for bit (quantize_fp8.py). 1 where the product is 0:
  // an all-zero row, or a subnormal amax whose product underflows (x / 0 would give NaN codes).
  const float s = __fmul_rn(amax, 1.f / kE4M3Max);
  return s == 0.f ? 1.f : s;
}

// The CTA-wide amax of every thread's partial amax (NaN-propagating), returned to all threads.
// Once per kernel: its shared slots are not guarded against a second call's writes.
template <int kThreads>
__device__ __forceinline__ float row_amax(float amax) {
  __shared__ float warp_max[kThreads / 32];
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) amax = nan_max(amax, __shfl_xor_sync(0xffffffffu, amax, off));
  if ((threadIdx.x & 31) == 0) warp_max[threadIdx.x >> 5] = amax;
  __syncthreads();
  amax = warp_max[0];
#pragma unroll
  for (int w = 1; w < kThreads / 32; ++w) amax = nan_max(amax, warp_max[w]);
  return amax;
}

struct Floats8 {
  float v[8];
};

// The IEEE quotients, out of line: inlined, the divisions' slow-path calls cost the row kernels
// registers around every group of 8. static: each translation unit keeps its own copy.
static __device__ __noinline__ Floats8 divide8(Floats8 x, float d) {
#pragma unroll
  for (int i = 0; i < 8; ++i) x.v[i] = div_rn(x.v[i], d);
  return x;
}

// x / scale for the E4M3 rounding: the 8 products with the reciprocal, or, where one of them
// could round differently from the IEEE quotient (grid_round.h; about 1 group in 4,000), the 8
// divisions. One branch per 8 elements: a branch per element costs as much as it saves. The
// reference's clamp to +-448 is the conversion's saturation (satfinite: the same byte for
// every quotient, NaN included).
// The products overwrite v, and the rare division path gets the inputs again from `reload`
// (from registers or L1/L2): keeping them alive beside the products cost the row kernels a CTA
// per SM in registers.
template <typename Reload>
__device__ __forceinline__ void store_q(uint8_t* __restrict__ out, float (&q)[8],
                                        const GridDivisor& scale, int valid, bool vec,
                                        Reload&& reload) {
  if (!scale.products(q)) {
    Floats8 x;
    reload(x.v);
    x = divide8(x, scale.d);
#pragma unroll
    for (int i = 0; i < 8; ++i) q[i] = x.v[i];
  }
  // The 8 codes packed in two registers as they are made (a byte array would live in local
  // memory).
  uint32_t w[2] = {0u, 0u};
#pragma unroll
  for (int i = 0; i < 8; ++i) w[i >> 2] |= static_cast<uint32_t>(to_e4m3(q[i])) << ((i & 3) * 8);
  if (vec) {
    *reinterpret_cast<uint2*>(out) = make_uint2(w[0], w[1]);
  } else {
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      if (i < valid) out[i] = static_cast<uint8_t>(w[i >> 2] >> ((i & 3) * 8));
    }
  }
}

// A kernel's output row and its FP8 row quantization, written by one CTA of kThreads threads:
// `values(k0, valid, vec, o)` computes the 8 output values at column k0 (0 past n) already
// rounded to T, once per k0. Pass 1 stores the row and reduces its amax; pass 2 reads the
// stored row back (each thread the columns it wrote itself, so no fence is needed; from L2)
// and encodes it as quantize_fp8 (block 0) encodes a stored row: same bytes by construction.
// Reading back rather than computing the values again: the H200 run of 2026-11-27 timed the
// GELU epilogue that recomputed (two tanh per element) at 0.31 ms for 4,608 x 12,288 bf16,
// slower than the epilogue and quantize_fp8 as two kernels (0.19 ms). `vec`: the 16-byte path
// of out (n % 8 == 0, aligned); `qvec`: the 8-byte path of q.
template <int kThreads, typename T, typename Values>
__device__ __forceinline__ void store_row_and_quantize(T* __restrict__ out_row,
                                                       uint8_t* __restrict__ q_row,
                                                       float* __restrict__ q_scale, int64_t n,
                                                       bool vec, bool qvec, Values&& values) {
  float amax = 0.f;
  for (int64_t k0 = threadIdx.x * 8; k0 < n; k0 += kThreads * 8) {
    const int valid = count_valid(n - k0, 8);
    const bool v = vec && valid == 8;
    float o[8];
    values(k0, valid, v, o);
    store8<T>(out_row + k0, o, valid, v);
#pragma unroll
    for (int i = 0; i < 8; ++i) amax = nan_max(amax, fabsf(o[i]));  // 0 past n
  }
  const float scale = fp8_scale(row_amax<kThreads>(amax));
  const GridDivisor divisor(scale);
  for (int64_t k0 = threadIdx.x * 8; k0 < n; k0 += kThreads * 8) {
    const int valid = count_valid(n - k0, 8);
    const bool v = vec && valid == 8;
    float o[8];
    load8<T>(out_row + k0, valid, v, o);
    store_q(q_row + k0, o, divisor, valid, qvec && valid == 8,
            [&](float (&again)[8]) { load8<T>(out_row + k0, valid, v, again); });
  }
  if (threadIdx.x == 0) *q_scale = scale;
}

}  // namespace quant
}  // namespace dcgen
