// NVFP4 activation quantization fused with the SVDQuant low-rank down-projection: one read of
// x [M, K] (bf16 / fp16) gives
//   packed E2M1 uint8 [M, K/2] and E4M3 block scales in the 128x4 swizzled layout, exactly the
//   codes of dcgen::quantize_nvfp4 on x (or on x / smooth, fp32 IEEE division, when smoothing),
//   and t = xs @ down^T as fp32 [M, r]: xs (x / smooth rounded once to x's dtype, or x itself)
//   times the 16-bit factor with fp32 accumulation (tensor-core mma.sync, sm_80+).
// Spec: dcgen/ops/quantize_nvfp4.py, quantize_nvfp4_lowrank_reference. Without this kernel a
// W4A4 layer with a low-rank branch reads x twice (quantize, then the down-projection GEMM) and,
// with smoothing, first writes and reads an fp32 copy x / s.
//
// Layout: a CTA owns 16 rows and 4 warps; warp w takes the 16-column chunks w, w + 4, ... (so
// the four warps read 128 contiguous bytes of each row together). A chunk is one NVFP4 block
// per row and one m16n8k16 A fragment: lane (g = lane / 4, q = lane % 4) holds rows g and g + 8,
// columns 2q, 2q + 1, 2q + 8, 2q + 9. A block's amax is two shuffles among the four lanes of a
// row; its 8 code bytes are assembled with two more and stored by lane q = 0. The down
// projection accumulates per warp in registers (r / 8 mma tiles); the four warps' partial sums
// are added in shared memory in a fixed order (deterministic).
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include "nvfp4/quant_common.cuh"

namespace dcgen {
namespace {

constexpr int kWarps = 4;
constexpr int kRows = 16;

// d += a b (m16n8k16, A row-major, B column-major, fp32 accumulators).
template <typename T>
__device__ __forceinline__ void mma_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                          uint32_t b1) {
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
}

// Quantize one row's 16-element block held by the row's four lanes (v: this lane's columns
// 2q, 2q+1, 2q+8, 2q+9); lane q = 0 of a valid row stores the 8 code bytes and the scale.
__device__ __forceinline__ void quantize_block(const float (&v)[4], float gd, int q, bool store,
                                               uint8_t* __restrict__ packed_at,
                                               uint8_t* __restrict__ scale_at) {
  float amax = 0.f;
#pragma unroll
  for (int i = 0; i < 4; ++i) amax = quant::nan_max(amax, fabsf(v[i]));
  amax = quant::nan_max(amax, __shfl_xor_sync(0xffffffffu, amax, 1));
  amax = quant::nan_max(amax, __shfl_xor_sync(0xffffffffu, amax, 2));
  float denom;
  const uint8_t sb = quant::nvfp4_block_scale(amax, gd, &denom);
  uint32_t lo = 0u, hi = 0u;  // this lane's bytes: q (columns 2q, 2q+1) and 4 + q
  if (denom > 0.f) {
    // The quotients as products with the reciprocal, divided only where the two could round
    // differently (grid_round.h).
    const quant::GridDivisor div(denom);
    float q[4] = {v[0], v[1], v[2], v[3]};
    if (!div.products(q)) {
#pragma unroll
      for (int i = 0; i < 4; ++i) q[i] = div.exact(v[i]);
    }
    lo = quant::e2m1_code(q[0]) | quant::e2m1_code(q[1]) << 4;
    hi = quant::e2m1_code(q[2]) | quant::e2m1_code(q[3]) << 4;
  }
  lo <<= 8 * q;
  hi <<= 8 * q;
  lo |= __shfl_xor_sync(0xffffffffu, lo, 1);
  hi |= __shfl_xor_sync(0xffffffffu, hi, 1);
  lo |= __shfl_xor_sync(0xffffffffu, lo, 2);
  hi |= __shfl_xor_sync(0xffffffffu, hi, 2);
  if (store && q == 0) {
    *reinterpret_cast<uint2*>(packed_at) = make_uint2(lo, hi);
    *scale_at = sb;
  }
}

template <typename T, int NT>  // NT = r / 8 mma tiles of the down projection
__global__ void __launch_bounds__(kWarps * 32, 1)
    quantize_nvfp4_lowrank_kernel(const T* __restrict__ x, const float* __restrict__ global,
                                  const float* __restrict__ smooth, const T* __restrict__ down,
                                  uint8_t* __restrict__ packed, uint8_t* __restrict__ scales,
                                  float* __restrict__ t, int64_t M, int64_t K, int64_t kb4) {
  __shared__ float partial[kWarps - 1][NT * 4][32];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int g = lane >> 2, q = lane & 3;
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * kRows + g, row1 = row0 + 8;
  const bool ok0 = row0 < M, ok1 = row1 < M;
  const T* x0 = x + (ok0 ? row0 : 0) * K + 2 * q;
  const T* x1 = x + (ok1 ? row1 : 0) * K + 2 * q;
  const T* dn = down + static_cast<int64_t>(g) * K + 2 * q;
  const float gd = *global;
  const int chunks = static_cast<int>(K / 16);  // int: a 64-bit counter made ptxas spill
  float acc[NT][4];
#pragma unroll
  for (int j = 0; j < NT; ++j) acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.f;

#pragma unroll 2
  for (int c = warp; c < chunks; c += kWarps) {
    const int64_t k0 = static_cast<int64_t>(c) * 16;
    // Raw pairs: a[0] row g cols 2q..2q+1, a[1] row g+8, a[2] row g cols +8, a[3] row g+8 +8.
    uint32_t a[4];
    a[0] = ok0 ? *reinterpret_cast<const uint32_t*>(x0 + k0) : 0u;
    a[1] = ok1 ? *reinterpret_cast<const uint32_t*>(x1 + k0) : 0u;
    a[2] = ok0 ? *reinterpret_cast<const uint32_t*>(x0 + k0 + 8) : 0u;
    a[3] = ok1 ? *reinterpret_cast<const uint32_t*>(x1 + k0 + 8) : 0u;
    float v0[4], v1[4];  // rows g and g + 8, columns 2q, 2q+1, 2q+8, 2q+9
    quant::unpack2<T>(a[0], v0);
    quant::unpack2<T>(a[2], v0 + 2);
    quant::unpack2<T>(a[1], v1);
    quant::unpack2<T>(a[3], v1 + 2);
    if (smooth != nullptr) {  // xs = x / s in fp32 (the reference's division), then 16-bit
      const float* s = smooth + k0 + 2 * q;
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const float si = s[(i & 1) + (i >> 1) * 8];  // columns 2q, 2q+1, 2q+8, 2q+9
        v0[i] = __fdiv_rn(v0[i], si);
        v1[i] = __fdiv_rn(v1[i], si);
      }
      a[0] = quant::pack2<T>(v0[0], v0[1]);
      a[1] = quant::pack2<T>(v1[0], v1[1]);
      a[2] = quant::pack2<T>(v0[2], v0[3]);
      a[3] = quant::pack2<T>(v1[2], v1[3]);
    }
#pragma unroll
    for (int j = 0; j < NT; ++j) {
      const T* b = dn + static_cast<int64_t>(8 * j) * K + k0;
      mma_16816<T>(acc[j], a, *reinterpret_cast<const uint32_t*>(b),
                   *reinterpret_cast<const uint32_t*>(b + 8));
    }
    const int64_t pack_off = k0 / 2;  // byte offset of this block in a packed row
    quantize_block(v0, gd, q, ok0, packed + row0 * (K / 2) + pack_off,
                   scales + quant::swizzled_scale_offset(row0, c, kb4));
    quantize_block(v1, gd, q, ok1, packed + row1 * (K / 2) + pack_off,
                   scales + quant::swizzled_scale_offset(row1, c, kb4));
  }

  // The four warps' partial products, summed by warp 0 in warp order.
  if (warp > 0) {
#pragma unroll
    for (int j = 0; j < NT; ++j)
#pragma unroll
      for (int i = 0; i < 4; ++i) partial[warp - 1][j * 4 + i][lane] = acc[j][i];
  }
  __syncthreads();
  if (warp != 0) return;
  const int64_t r = NT * 8;
#pragma unroll
  for (int j = 0; j < NT; ++j) {
#pragma unroll
    for (int w = 0; w < kWarps - 1; ++w)
#pragma unroll
      for (int i = 0; i < 4; ++i) acc[j][i] += partial[w][j * 4 + i][lane];
    // C fragment: (row g, cols 2q, 2q+1) = acc[0..1], (row g + 8, same cols) = acc[2..3].
    const int64_t col = 8 * j + 2 * q;
    if (ok0) *reinterpret_cast<float2*>(t + row0 * r + col) = make_float2(acc[j][0], acc[j][1]);
    if (ok1) *reinterpret_cast<float2*>(t + row1 * r + col) = make_float2(acc[j][2], acc[j][3]);
  }
}

template <typename T, int NT>
void launch(const at::Tensor& x, const at::Tensor& gs, const c10::optional<at::Tensor>& smooth,
            const at::Tensor& down, at::Tensor& packed, at::Tensor& scales, at::Tensor& t,
            int64_t kb4, cudaStream_t stream) {
  const int64_t M = x.size(0), K = x.size(1);
  const int64_t blocks = (M + kRows - 1) / kRows;
  quantize_nvfp4_lowrank_kernel<T, NT><<<blocks, kWarps * 32, 0, stream>>>(
      reinterpret_cast<const T*>(x.const_data_ptr()), gs.const_data_ptr<float>(),
      smooth.has_value() ? smooth->const_data_ptr<float>() : nullptr,
      reinterpret_cast<const T*>(down.const_data_ptr()), packed.mutable_data_ptr<uint8_t>(),
      reinterpret_cast<uint8_t*>(scales.mutable_data_ptr()), t.mutable_data_ptr<float>(), M, K,
      kb4);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> quantize_nvfp4_lowrank_cuda(
    const at::Tensor& x, const at::Tensor& global_scale, const c10::optional<at::Tensor>& smooth,
    const at::Tensor& down) {
  constexpr const char* op = "dcgen::quantize_nvfp4_lowrank";
  TORCH_CHECK(x.is_cuda(), op, " (CUDA): expected x on a CUDA device, got ", x.device());
  TORCH_CHECK(x.dim() == 2, op, ": expected x of shape [M, K], got ", x.sizes());
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kHalf, op,
              ": expected x of dtype bfloat16 or float16, got ", x.scalar_type());
  TORCH_CHECK(down.dim() == 2 && down.size(1) == x.size(1), op,
              ": expected down of shape [r, K] with K = ", x.size(1), ", got ", down.sizes());
  TORCH_CHECK(down.scalar_type() == x.scalar_type(), op, ": expected down of x's dtype ",
              x.scalar_type(), ", got ", down.scalar_type());
  const int64_t M = x.size(0), K = x.size(1), r = down.size(0);
  TORCH_CHECK(K >= 16 && K % 16 == 0, op, ": expected K to be a positive multiple of 16, got ", K);
  TORCH_CHECK(r == 16 || r == 32 || r == 64 || r == 128, op,
              ": expected rank r in {16, 32, 64, 128}, got ", r);
  TORCH_CHECK(x.is_contiguous() && down.is_contiguous(), op,
              ": expected contiguous x and down, got strides ", x.strides(), " and ", down.strides());
  TORCH_CHECK(reinterpret_cast<uintptr_t>(x.const_data_ptr()) % 4 == 0 &&
                  reinterpret_cast<uintptr_t>(down.const_data_ptr()) % 4 == 0,
              op, ": expected x and down 4-byte aligned (element pairs are loaded as one word), got "
              "data pointers ", reinterpret_cast<uintptr_t>(x.const_data_ptr()) % 4, " and ",
              reinterpret_cast<uintptr_t>(down.const_data_ptr()) % 4,
              " bytes past a 4-byte boundary (storage offsets ", x.storage_offset(), " and ",
              down.storage_offset(), ")");
  TORCH_CHECK(global_scale.numel() == 1 && global_scale.scalar_type() == at::kFloat, op,
              ": expected global_scale to be one float32 value, got ", global_scale.scalar_type(),
              " of shape ", global_scale.sizes());
  TORCH_CHECK(global_scale.device() == x.device() && down.device() == x.device(), op,
              ": expected global_scale and down on x's device ", x.device(), ", got ",
              global_scale.device(), " and ", down.device());
  if (smooth.has_value()) {
    TORCH_CHECK(smooth->dim() == 1 && smooth->size(0) == K && smooth->is_contiguous() &&
                    smooth->scalar_type() == at::kFloat && smooth->device() == x.device(),
                op, ": expected smooth as a contiguous float32 [", K, "] on ", x.device(),
                ", got ", smooth->scalar_type(), " ", smooth->sizes(), " on ", smooth->device());
  }
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t kb_count = K / 16;
  const int64_t kb4 = (kb_count + 3) / 4;
  const int64_t m_padded = (M + 127) / 128 * 128;
  at::Tensor packed = at::empty({M, K / 2}, x.options().dtype(at::kByte));
  // Padding rows / blocks of the swizzled layout read as zero scales: zero-filled here, the
  // kernel writes every real block.
  at::Tensor scales = at::zeros({m_padded * kb4 * 4}, x.options().dtype(at::kFloat8_e4m3fn));
  at::Tensor t = at::empty({M, r}, x.options().dtype(at::kFloat));
  if (M == 0) return {packed, scales, t};
  const at::Tensor gs = global_scale.reshape({1}).contiguous();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  auto by_rank = [&](auto tag) {
    using T = decltype(tag);
    switch (r) {
      case 16: return launch<T, 2>(x, gs, smooth, down, packed, scales, t, kb4, stream);
      case 32: return launch<T, 4>(x, gs, smooth, down, packed, scales, t, kb4, stream);
      case 64: return launch<T, 8>(x, gs, smooth, down, packed, scales, t, kb4, stream);
      default: return launch<T, 16>(x, gs, smooth, down, packed, scales, t, kb4, stream);
    }
  };
  if (x.scalar_type() == at::kBFloat16) {
    by_rank(__nv_bfloat16{});
  } else {
    by_rank(__half{});
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {packed, scales, t};
}

}  // namespace
}  // namespace dcgen

TORCH_LIBRARY_IMPL(dcgen, CUDA, m) {
  m.impl("quantize_nvfp4_lowrank", &dcgen::quantize_nvfp4_lowrank_cuda);
}
