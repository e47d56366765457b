// NVFP4 dequantization in one pass, for GPUs without FP4 tensor cores (Hopper, Ampere) and for
// checks anywhere: packed E2M1 uint8 [N, Kp/2] + E4M3 block scales (plain row-major [N, Kp/16],
// the ModelOpt checkpoint layout, or the 128x4 swizzled layout of the Blackwell GEMMs) + an fp32
// decode scale (device scalar, no host sync) -> bf16 / fp16 / fp32 [N, k] (k trims K padding).
// Spec: dcgen/ops/nvfp4_dequant.py's reference (dcgen/quant/nvfp4.py's dequantize_parts):
//   out = rne(e2m1 * float(block_scale) * global)   (two fp32 products in that order)
// so every element is bit-identical to the reference. With global = 1 the product
// e2m1 * e4m3 has at most 6 significant bits and lies in [2^-10, 2688]: exact in bf16 and fp16,
// which is what the Hopper NVFP4Linear path relies on (global scales go to the GEMM's alpha).
//
// One thread per 16-element block: one 8-byte load of codes, one scale byte, 32 (2-byte types)
// or 64 (fp32) bytes written with 16-byte stores when the row is whole (k == Kp).
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "nvfp4/quant_common.cuh"

namespace dcgen {
namespace {

using quant::from_e4m3;
using quant::from_float;

// E2M1 code (sign in bit 3) -> value, from the bits (no table in local memory): exponent
// field e = bits 2..1 (bias 1), mantissa m = bit 0; e = 0 is the subnormal 0 / 0.5. The sign
// is OR-ed in, so code 8 gives -0.0 like the reference's negated table.
__device__ __forceinline__ float e2m1_value(uint32_t code) {
  const uint32_t e = (code >> 1) & 3u, m = code & 1u;
  const uint32_t mag = e ? (((e + 126u) << 23) | (m << 22)) : (m ? 0x3F000000u : 0u);
  return __uint_as_float(mag | ((code & 8u) << 28));
}

template <typename T>
__global__ void nvfp4_dequantize_kernel(const uint8_t* __restrict__ packed,
                                        const uint8_t* __restrict__ scales,
                                        const float* __restrict__ global, T* __restrict__ out,
                                        int64_t n_rows, int64_t kb_count, int64_t k, bool swizzled,
                                        bool vec_load, bool vec_store) {
  const int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (t >= n_rows * kb_count) return;
  const int64_t row = t / kb_count;
  const int64_t kb = t - row * kb_count;
  int64_t soff = t;  // plain [N, Kp/16]: block t is scale t
  if (swizzled) soff = quant::swizzled_scale_offset(row, kb, (kb_count + 3) >> 2);
  const float s = from_e4m3(scales[soff]);
  const float gd = *global;
  // Codes of block t are bytes [8t, 8t + 8): rows are contiguous, Kp/2 = 8 * kb_count bytes.
  uint32_t word[2];
  if (vec_load) {
    const uint2 w = *reinterpret_cast<const uint2*>(packed + t * 8);
    word[0] = w.x, word[1] = w.y;
  } else {
    word[0] = word[1] = 0u;
#pragma unroll
    for (int i = 0; i < 8; ++i) word[i >> 2] |= static_cast<uint32_t>(packed[t * 8 + i]) << ((i & 3) * 8);
  }
  alignas(16) T v[16];
#pragma unroll
  for (int i = 0; i < 16; ++i) {
    const uint32_t code = (word[i >> 3] >> ((i & 7) * 4)) & 0xFu;
    v[i] = from_float<T>(__fmul_rn(__fmul_rn(e2m1_value(code), s), gd));
  }
  T* dst = out + row * k + kb * 16;
  if (vec_store) {
    constexpr int kPerStore = 16 / sizeof(T);
#pragma unroll
    for (int i = 0; i < 16; i += kPerStore) *reinterpret_cast<uint4*>(dst + i) = *reinterpret_cast<const uint4*>(v + i);
    return;
  }
  const int valid = quant::count_valid(k - kb * 16, 16);
#pragma unroll
  for (int i = 0; i < 16; ++i)
    if (i < valid) dst[i] = v[i];
}

int64_t swizzled_size(int64_t rows, int64_t kb) { return (rows + 127) / 128 * 128 * ((kb + 3) / 4 * 4); }

at::Tensor nvfp4_dequantize_cuda(const at::Tensor& packed, const at::Tensor& scales,
                                 const at::Tensor& global_scale, int64_t k, bool swizzled,
                                 at::ScalarType dtype) {
  TORCH_CHECK(packed.is_cuda(), "dcgen::nvfp4_dequantize (CUDA): expected packed on a CUDA device, got ",
              packed.device());
  TORCH_CHECK(packed.dim() == 2 && packed.scalar_type() == at::kByte && packed.is_contiguous(),
              "dcgen::nvfp4_dequantize: expected packed as contiguous uint8 [N, Kp/2], got ",
              packed.scalar_type(), " ", packed.sizes(), " strides ", packed.strides());
  const int64_t n_rows = packed.size(0), kp = packed.size(1) * 2;
  TORCH_CHECK(kp % 16 == 0 && kp > 0, "dcgen::nvfp4_dequantize: expected Kp = 2 * packed.size(1) to be a "
              "positive multiple of 16, got ", kp);
  TORCH_CHECK(k > kp - 16 && k <= kp, "dcgen::nvfp4_dequantize: expected k in (", kp - 16, ", ", kp,
              "] for packed ", packed.sizes(), ", got ", k);
  const int64_t kb_count = kp / 16;
  TORCH_CHECK(scales.scalar_type() == at::kFloat8_e4m3fn && scales.is_contiguous() &&
                  scales.device() == packed.device(),
              "dcgen::nvfp4_dequantize: expected contiguous float8_e4m3fn scales on ", packed.device(),
              ", got ", scales.scalar_type(), " on ", scales.device());
  if (swizzled) {
    TORCH_CHECK(scales.dim() == 1 && scales.numel() == swizzled_size(n_rows, kb_count),
                "dcgen::nvfp4_dequantize: expected swizzled scales as a flat buffer of ",
                swizzled_size(n_rows, kb_count), " (128x4 layout, ", n_rows, " rows, ", kb_count,
                " blocks), got ", scales.sizes());
  } else {
    TORCH_CHECK(scales.dim() == 2 && scales.size(0) == n_rows && scales.size(1) == kb_count,
                "dcgen::nvfp4_dequantize: expected plain scales of shape [", n_rows, ", ", kb_count,
                "], got ", scales.sizes());
  }
  TORCH_CHECK(global_scale.numel() == 1 && global_scale.scalar_type() == at::kFloat &&
                  global_scale.device() == packed.device(),
              "dcgen::nvfp4_dequantize: expected global_scale as one float32 on ", packed.device(),
              ", got ", global_scale.scalar_type(), " of shape ", global_scale.sizes(), " on ",
              global_scale.device());
  TORCH_CHECK(dtype == at::kBFloat16 || dtype == at::kHalf || dtype == at::kFloat,
              "dcgen::nvfp4_dequantize: expected dtype bfloat16, float16 or float32, got ", dtype);
  const c10::cuda::CUDAGuard guard(packed.device());
  at::Tensor out = at::empty({n_rows, k}, packed.options().dtype(dtype));
  if (n_rows == 0) return out;
  const at::Tensor gs = global_scale.reshape({1}).contiguous();
  const bool vec_load = reinterpret_cast<uintptr_t>(packed.const_data_ptr()) % 8 == 0;
  const bool vec_store = k == kp && reinterpret_cast<uintptr_t>(out.const_data_ptr()) % 16 == 0;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  constexpr int kThreads = 256;
  const int64_t blocks = (n_rows * kb_count + kThreads - 1) / kThreads;
  DCGEN_DISPATCH_QUANT_INPUT(dtype, "nvfp4_dequantize_cuda", [&] {
    using T = quant::device_t<scalar_t>;
    nvfp4_dequantize_kernel<T><<<blocks, kThreads, 0, stream>>>(
        packed.const_data_ptr<uint8_t>(), reinterpret_cast<const uint8_t*>(scales.const_data_ptr()),
        gs.const_data_ptr<float>(), reinterpret_cast<T*>(out.mutable_data_ptr()), n_rows, kb_count, k,
        swizzled, vec_load, vec_store);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace
}  // namespace dcgen

TORCH_LIBRARY_IMPL(dcgen, CUDA, m) { m.impl("nvfp4_dequantize", &dcgen::nvfp4_dequantize_cuda); }
