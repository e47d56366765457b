// NVFP4 activation quantization in one pass: x [M, K] (bf16 / fp16 / fp32) + an fp32 decode
// scale (device scalar: static input_scale, or amax / 2688 computed beforehand) ->
//   packed E2M1 uint8 [M, Kp/2] (Kp = K padded to 16; even index in the low nibble) and
//   E4M3 block scales (one per 16 along K) written straight into the 128x4 swizzled layout that
//   Blackwell block-scaled GEMMs read (padding rows / blocks written as 0).
// Spec: dcgen/quant/nvfp4.py's recipe, op for op (fp32 products and IEEE divisions in the same
// order, the same tie rules), so codes and scales are bit-identical to the reference.
//
// One thread per two 16-element blocks: 64 contiguous input bytes, 16 output bytes, 2 scale
// bytes. A CTA covers (part of) one row: grid (rows incl. the 128-row padding, K-block chunks),
// so no thread divides its index. The arithmetic per element is a NaN-propagating max, a multiply by
// the block divisor's reciprocal with its guard, and the branch-free E2M1 encode (grid_round.h:
// about 17 SASS instructions instead of 40 with an IEEE division and threshold compares).
#include <algorithm>

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "nvfp4/quant_common.cuh"

namespace dcgen {
namespace {

using quant::e2m1_code;
using quant::load8;

// The 16 codes of a block's quotients, packed (even index in the low nibble).
__device__ __forceinline__ uint2 encode16(const float (&q)[16]) {
  uint32_t word[2] = {0u, 0u};
#pragma unroll
  for (int i = 0; i < 16; ++i) word[i >> 3] |= e2m1_code(q[i]) << ((i & 7) * 4);
  return make_uint2(word[0], word[1]);
}

// The block's codes from its input by IEEE divisions (the reference's arithmetic).
template <typename T>
__device__ __noinline__ uint2 encode_dividing(const T* __restrict__ src, int lo, int hi, bool vec,
                                              float denom) {
  float v[16];
  load8(src, lo, vec && lo == 8, v);
  load8(src + 8, hi, vec && hi == 8, v + 8);
#pragma unroll
  for (int i = 0; i < 16; ++i) v[i] = quant::div_rn(v[i], denom);
  return encode16(v);
}

// One 16-element block: its codes into *codes, its E4M3 scale byte returned. `valid` (0..16)
// of its elements exist; `vec`: the row is 16-byte aligned with K % 8 == 0.
template <typename T>
__device__ __forceinline__ uint8_t quantize_block(const T* __restrict__ src, int valid, bool vec,
                                                  float gd, uint2* codes) {
  const int lo = valid < 8 ? valid : 8, hi = valid > 8 ? valid - 8 : 0;
  float v[16];
  load8(src, lo, vec && lo == 8, v);
  load8(src + 8, hi, vec && hi == 8, v + 8);
  float amax = 0.f;
#pragma unroll
  for (int i = 0; i < 16; ++i) amax = quant::nan_abs_max(amax, v[i]);
  float denom;
  const uint8_t sb = quant::nvfp4_block_scale(amax, gd, &denom);
  *codes = make_uint2(0u, 0u);
  if (denom > 0.f) {  // false for an all-zero block and for a NaN scale: zero codes
    const quant::GridDivisor div(denom);
    // The 16 quotients as products, in place; if any of them could round differently from the
    // IEEE quotient (about 1 block in 2,000) or 1/denom is not normal, the block is encoded
    // again from its input with divisions, in a function of its own: inlined, its divisions'
    // slow-path calls made ptxas spill the hot path's registers.
    *codes = div.products(v) ? encode16(v) : encode_dividing(src, lo, hi, vec, denom);
  }
  return sb;
}

// Two neighbouring blocks (kb, kb + 1; kb even) per thread: the index math, the row's checks and
// the global scale load are paid once for both, and their two scale bytes are neighbours in
// the swizzled layout (kb % 4 is 0 or 2), written as one 16-bit store.
template <typename T>
__global__ void quantize_nvfp4_kernel(const T* __restrict__ x, const float* __restrict__ global,
                                      uint8_t* __restrict__ packed, uint8_t* __restrict__ scales,
                                      int64_t M, int64_t K, int kb_count, int kb_padded, bool vec) {
  const int64_t m = blockIdx.x;
  const int kb = 2 * static_cast<int>(blockIdx.y * blockDim.x + threadIdx.x);
  if (kb >= kb_padded) return;
  const int64_t off = quant::swizzled_scale_offset(m, kb, kb_padded >> 2);
  uint32_t sb2 = 0u;  // the two scale bytes, kb's in the low byte (0: padding)
  if (m < M && kb < kb_count) {
    const float gd = *global;
    const T* row = x + m * K;
    uint8_t* out = packed + m * kb_count * 8;
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      const int b = kb + j;
      if (j == 1 && b >= kb_count) break;  // kb_count odd: kb + 1 is padding
      const int64_t k0 = static_cast<int64_t>(b) * 16;
      uint2 codes;
      sb2 |= static_cast<uint32_t>(
                 quantize_block(row + k0, quant::count_valid(K - k0, 16), vec, gd, &codes))
             << (8 * j);
      *reinterpret_cast<uint2*>(out + static_cast<int64_t>(b) * 8) = codes;
    }
  }
  *reinterpret_cast<uint16_t*>(scales + off) = static_cast<uint16_t>(sb2);
}

std::tuple<at::Tensor, at::Tensor> quantize_nvfp4_cuda(const at::Tensor& x, const at::Tensor& global_scale) {
  TORCH_CHECK(x.is_cuda(), "dcgen::quantize_nvfp4 (CUDA): expected x on a CUDA device, got ", x.device());
  TORCH_CHECK(x.dim() == 2, "dcgen::quantize_nvfp4: expected x of shape [M, K], got ", x.sizes());
  TORCH_CHECK(x.is_contiguous(), "dcgen::quantize_nvfp4: expected a contiguous x, got strides ", x.strides());
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kHalf ||
                  x.scalar_type() == at::kFloat,
              "dcgen::quantize_nvfp4: expected x of dtype bfloat16, float16 or float32, got ",
              x.scalar_type());
  TORCH_CHECK(global_scale.numel() == 1 && global_scale.scalar_type() == at::kFloat,
              "dcgen::quantize_nvfp4: expected global_scale to be one float32 value, got ",
              global_scale.scalar_type(), " of shape ", global_scale.sizes());
  TORCH_CHECK(global_scale.device() == x.device(), "dcgen::quantize_nvfp4: global_scale is on ",
              global_scale.device(), " but x is on ", x.device());
  const int64_t M = x.size(0), K = x.size(1);
  TORCH_CHECK(K >= 1, "dcgen::quantize_nvfp4: expected K >= 1, got shape ", x.sizes());
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t kb_count = (K + 15) / 16;
  const int64_t kb_padded = (kb_count + 3) / 4 * 4;
  const int64_t m_padded = (M + 127) / 128 * 128;
  at::Tensor packed = at::empty({M, kb_count * 8}, x.options().dtype(at::kByte));
  at::Tensor scales = at::empty({m_padded * kb_padded}, x.options().dtype(at::kFloat8_e4m3fn));
  if (M == 0) return {packed, scales};
  const at::Tensor gs = global_scale.reshape({1}).contiguous();
  const bool vec = K % 8 == 0 && reinterpret_cast<uintptr_t>(x.const_data_ptr()) % 16 == 0;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  // A CTA per (row, chunk of up to 512 K blocks, two a thread); rows are grid.x (up to
  // 2^31 - 1). kb_padded is a multiple of 4, so the pairs never straddle its end.
  const int64_t pairs = kb_padded / 2;
  const int threads = static_cast<int>(std::min<int64_t>(256, (pairs + 31) / 32 * 32));
  TORCH_CHECK(m_padded < (int64_t{1} << 31) && (pairs + threads - 1) / threads <= 65535,
              "dcgen::quantize_nvfp4: x of shape ", x.sizes(), " is too large for the kernel's grid");
  const dim3 grid(static_cast<unsigned>(m_padded), static_cast<unsigned>((pairs + threads - 1) / threads));
  DCGEN_DISPATCH_QUANT_INPUT(x.scalar_type(), "quantize_nvfp4_cuda", [&] {
    using T = quant::device_t<scalar_t>;
    quantize_nvfp4_kernel<T><<<grid, threads, 0, stream>>>(
        reinterpret_cast<const T*>(x.const_data_ptr()), gs.const_data_ptr<float>(),
        packed.mutable_data_ptr<uint8_t>(), reinterpret_cast<uint8_t*>(scales.mutable_data_ptr()), M, K,
        static_cast<int>(kb_count), static_cast<int>(kb_padded), vec);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {packed, scales};
}

}  // namespace
}  // namespace dcgen

TORCH_LIBRARY_IMPL(dcgen, CUDA, m) { m.impl("quantize_nvfp4", &dcgen::quantize_nvfp4_cuda); }
