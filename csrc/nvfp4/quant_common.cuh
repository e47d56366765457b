// Shared device helpers of the quantize kernels: 8-element loads in fp32 and the NaN rules of
// the PyTorch references (torch.amax and torch.clamp propagate NaN; fmaxf / fminf would drop it).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>

#include <ATen/core/Tensor.h>  // not ATen/ATen.h: every op's header, minutes of nvcc time
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/Dispatch.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <type_traits>

#include "nvfp4/grid_round.h"

// The three input dtypes of the quantize ops (no double: the references run those).
#define DCGEN_DISPATCH_QUANT_INPUT(TYPE, NAME, ...)                  \
  AT_DISPATCH_SWITCH(TYPE, NAME,                                     \
                     AT_DISPATCH_CASE(at::ScalarType::Float, __VA_ARGS__) \
                     AT_DISPATCH_CASE(at::ScalarType::Half, __VA_ARGS__)  \
                     AT_DISPATCH_CASE(at::ScalarType::BFloat16, __VA_ARGS__))

namespace dcgen {
namespace quant {

// torch's element type -> the CUDA type the kernels load.
template <typename S>
using device_t = std::conditional_t<std::is_same_v<S, c10::BFloat16>, __nv_bfloat16,
                                    std::conditional_t<std::is_same_v<S, c10::Half>, __half, S>>;

template <typename T>
__device__ __forceinline__ float to_float(T v) {
  return static_cast<float>(v);
}
template <>
__device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 v) {
  return __bfloat162float(v);
}
template <>
__device__ __forceinline__ float to_float<__half>(__half v) {
  return __half2float(v);
}

// How many of `cap` elements exist when `remaining` are left before the end (0..cap).
__device__ __forceinline__ int count_valid(int64_t remaining, int cap) {
  return remaining <= 0 ? 0 : (remaining >= cap ? cap : static_cast<int>(remaining));
}

// max that returns NaN when either operand is NaN (torch.amax semantics).
__device__ __forceinline__ float nan_max(float a, float b) { return (a > b || a != a) ? a : b; }

// max(a, |v|), NaN if either is NaN, in one instruction (sm_80's max.NaN; ptxas folds the abs
// into its operand). The NaN it returns is the canonical one, not v's payload: for amaxes that
// only become E4M3 scales (any NaN encodes as 0x7f) or are tested for > 0.
__device__ __forceinline__ float nan_abs_max(float a, float v) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  float r;
  asm("max.NaN.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(fabsf(v)));
  return r;
#else
  return nan_max(a, fabsf(v));
#endif
}

// Round-to-nearest-even to E4M3, saturating at +-448 (torch.clamp(v, -448, 448) then the cast:
// the same byte for every v; NaN stays NaN).
__device__ __forceinline__ uint8_t to_e4m3(float v) {
  return static_cast<uint8_t>(__nv_cvt_float_to_fp8(v, __NV_SATFINITE, __NV_E4M3));
}

__device__ __forceinline__ float from_e4m3(uint8_t b) {
  __nv_fp8_e4m3 f;
  f.__x = b;
  return static_cast<float>(f);
}

// fp32 -> the output element type, round to nearest even (the inverse of to_float).
template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) {
  return v;
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}
template <>
__device__ __forceinline__ __half from_float<__half>(float v) {
  return __float2half_rn(v);
}

// The recipe's block scale from a 16-element block's amax and the fp32 decode scale gd:
// E4M3(min(amax / (6 gd), 448)) (NaN kept), and the block's divisor E4M3 * gd (> 0 unless the
// block is all zero or non-finite; such a block is written as zero codes).
__device__ __forceinline__ uint8_t nvfp4_block_scale(float amax, float gd, float* denom) {
  float s = __fdiv_rn(amax, __fmul_rn(6.f, gd));
  s = s > 448.f ? 448.f : s;  // clamp(max=448), NaN kept
  const uint8_t sb = to_e4m3(s);
  *denom = __fmul_rn(from_e4m3(sb), gd);
  return sb;
}

// Byte offset of block scale (m, kb) in the 128x4 swizzled layout, `kb4` = ceil(K/16 / 4):
// ((m/128) * kb4 + kb/4) * 512 + (m%32) * 16 + ((m%128)/32) * 4 + kb%4.
__device__ __forceinline__ int64_t swizzled_scale_offset(int64_t m, int64_t kb, int64_t kb4) {
  return ((m >> 7) * kb4 + (kb >> 2)) * 512 + (m & 31) * 16 + ((m & 127) >> 5) * 4 + (kb & 3);
}

// Load 8 consecutive elements starting at p as fp32; `valid` (0..8) of them exist, the rest
// read as 0 (the zero padding of the references). `vec`: p is 16-byte aligned and all 8 exist.
template <typename T>
__device__ __forceinline__ void load8(const T* __restrict__ p, int valid, bool vec, float out[8]) {
  if (vec) {
    if constexpr (std::is_same_v<T, __nv_bfloat16>) {
      // bf16 is fp32's top half: each 32-bit word gives its low element by a shift and its
      // high one by a mask (one instruction each; the per-element conversion took a byte
      // permute and a shift for the high one)
      const uint4 raw = *reinterpret_cast<const uint4*>(p);
      const uint32_t w[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        out[2 * i] = __uint_as_float(w[i] << 16);
        out[2 * i + 1] = __uint_as_float(w[i] & 0xffff0000u);
      }
    } else if constexpr (sizeof(T) == 2) {
      const uint4 raw = *reinterpret_cast<const uint4*>(p);
      const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
      for (int i = 0; i < 8; ++i) out[i] = to_float(e[i]);
    } else {
      const float4 a = *reinterpret_cast<const float4*>(p);
      const float4 b = *reinterpret_cast<const float4*>(p + 4);
      out[0] = a.x, out[1] = a.y, out[2] = a.z, out[3] = a.w;
      out[4] = b.x, out[5] = b.y, out[6] = b.z, out[7] = b.w;
    }
    return;
  }
#pragma unroll
  for (int i = 0; i < 8; ++i) out[i] = i < valid ? to_float(p[i]) : 0.f;
}

// The bits of a 16-bit value, and two values in one register (the lower index in the low
// half, as memory and the mma fragments order them). Bit moves only: a local array would go
// through the stack (local memory).
__device__ __forceinline__ uint16_t bits16(__nv_bfloat16 v) { return __bfloat16_as_ushort(v); }
__device__ __forceinline__ uint16_t bits16(__half v) { return __half_as_ushort(v); }

template <typename T>
__device__ __forceinline__ T from_bits16(uint16_t b) {
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    return __ushort_as_bfloat16(b);
  } else {
    return __ushort_as_half(b);
  }
}

template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi) {
  return static_cast<uint32_t>(bits16(from_float<T>(lo))) |
         static_cast<uint32_t>(bits16(from_float<T>(hi))) << 16;
}

template <typename T>
__device__ __forceinline__ void unpack2(uint32_t word, float* out) {
  out[0] = to_float(from_bits16<T>(static_cast<uint16_t>(word & 0xffffu)));
  out[1] = to_float(from_bits16<T>(static_cast<uint16_t>(word >> 16)));
}

// Store 8 fp32 values at p as T, rounded to nearest even; `valid` (0..8) of them exist. `vec`:
// p is 16-byte aligned and all 8 exist (one 16-byte store for 16-bit T, packed in registers).
template <typename T>
__device__ __forceinline__ void store8(T* __restrict__ p, const float v[8], int valid, bool vec) {
  if constexpr (sizeof(T) == 2) {
    if (vec) {
      const uint4 w = make_uint4(pack2<T>(v[0], v[1]), pack2<T>(v[2], v[3]),
                                 pack2<T>(v[4], v[5]), pack2<T>(v[6], v[7]));
      *reinterpret_cast<uint4*>(p) = w;
      return;
    }
  }
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    if (i < valid) p[i] = from_float<T>(v[i]);
  }
}

}  // namespace quant
}  // namespace dcgen
