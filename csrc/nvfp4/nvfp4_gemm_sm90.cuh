// Hopper (sm_90a) NVFP4 GEMM with the dequantization in the mainloop: E2M1 codes and their E4M3
// block scales are read from global memory, turned into bf16 in registers and written to shared
// memory in the 128-byte-swizzled K-major layout that bf16 wgmma reads; the tensor cores
// accumulate in fp32 and the epilogue applies alpha (the global decode scales) once.
//
// Why this is exact: every E2M1 x E4M3 product has at most 6 significant bits and lies in
// [2^-10, 2688], so it is a bf16 value (docs KERNELS.md, NVFP4). The products the tensor cores
// form are therefore the reference's, and the result differs from the reference
// (dequantize-then-matmul in fp32) by fp32 summation order and the one bf16 rounding only.
//
// Shape of the kernel (one configuration, chosen for a first correct version; no TMA and no
// warp specialization yet): 256 threads = two consumer warpgroups, CTA tile 128 x 128 x 64, each
// warpgroup one 64 x 128 wgmma row band. Two shared-memory stages: while the tensor cores work
// on stage s, every thread loads the next K tile from global memory, dequantizes it and writes
// stage s ^ 1. Operand A is NVFP4 (W4A4) or bf16 (W4A16, copied as is); B is always NVFP4.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp8.h>
#include <cuda_runtime.h>

#include <cute/atom/mma_traits_sm90_gmma.hpp>
#include <cute/tensor.hpp>
#include <cutlass/cutlass.h>

#include <cstdint>

#include "common/sm90_sync.cuh"

namespace dcgen {
namespace sm90 {

using namespace cute;
using bf16 = cutlass::bfloat16_t;

constexpr int kBM = 128;
constexpr int kBN = 128;
constexpr int kBK = 64;
constexpr int kStages = 2;
constexpr int kThreads = 256;

using SmemLayoutA =
    decltype(tile_to_shape(GMMA::Layout_K_SW128_Atom<bf16>{}, Shape<Int<kBM>, Int<kBK>, Int<kStages>>{}));
using SmemLayoutB =
    decltype(tile_to_shape(GMMA::Layout_K_SW128_Atom<bf16>{}, Shape<Int<kBN>, Int<kBK>, Int<kStages>>{}));
// Two warpgroups stacked along M, each a 64 x 128 x 16 bf16 wgmma reading both operands from
// shared memory (K-major), fp32 accumulators.
using TiledMma = decltype(make_tiled_mma(SM90_64x128x16_F32BF16BF16_SS<GMMA::Major::K, GMMA::Major::K>{},
                                         Layout<Shape<_2, _1, _1>>{}));

// 1 KiB for the 128-byte swizzle's alignment (its pattern repeats every 1024 bytes).
constexpr int kSmemBytes =
    int(cosize_v<SmemLayoutA> + cosize_v<SmemLayoutB>) * int(sizeof(bf16)) + 1024;

struct Sm90GemmParams {
  const uint8_t* a_fp4;  // W4A4: packed E2M1 [M, K/2]
  const uint8_t* sfa;    // W4A4: E4M3 scales, 128x4 swizzled
  const bf16* a_bf16;    // W4A16: [M, K] row-major
  const uint8_t* b;      // packed E2M1 [N, K/2]
  const uint8_t* sfb;    // E4M3 scales, 128x4 swizzled
  const float* alpha;    // device scalar
  bf16* d;               // [M, N] row-major
  int m, n, k;
};

// Byte offset of scale (row, kb) in the 128x4 swizzled layout (kb = k / 16).
__device__ __forceinline__ int64_t swizzled_scale_offset(int row, int kb, int kb_total) {
  const int64_t kb_tiles = (kb_total + 3) / 4;
  return ((int64_t)(row / 128) * kb_tiles + kb / 4) * 512 + (row % 32) * 16 + ((row % 128) / 32) * 4 +
         kb % 4;
}

__device__ __forceinline__ float e4m3_to_float(uint8_t bits) {
  const __half_raw h = __nv_cvt_fp8_to_halfraw(static_cast<__nv_fp8_storage_t>(bits), __NV_E4M3);
  return __half2float(__half(h));
}

// bf16 bit pattern of one E2M1 code (sign, 2 exponent bits with bias 1, 1 mantissa bit):
// a normal code e > 0 is 2^(e-1) * (1 + m/2), so its bf16 exponent field is e + 126 and the
// mantissa's top bit is m; the subnormal code 0.5 is bf16 exponent 126, and 0 is 0.
__device__ __forceinline__ uint32_t e2m1_to_bf16_bits(uint32_t code) {
  const uint32_t sign = (code & 8u) << 12;
  const uint32_t e = (code >> 1) & 3u, m = code & 1u;
  const uint32_t mag = e ? (((e + 126u) << 7) | (m << 6)) : (m ? (126u << 7) : 0u);
  return sign | mag;
}

// 32 consecutive K elements of one row, as 16 bf16x2 words ready for shared memory.
struct Chunk32 {
  uint32_t w[16];
};

// Dequantize 16 packed bytes (32 codes, even index in the low nibble) with the two block scales
// of their 16-element blocks. The product is exact in fp32 and therefore in bf16.
__device__ __forceinline__ void dequant32(const uint4& q, float s0, float s1, Chunk32& out) {
  const uint32_t words[4] = {q.x, q.y, q.z, q.w};
#pragma unroll
  for (int i = 0; i < 16; ++i) {  // pair i = codes 2i (low nibble) and 2i + 1 (high nibble)
    const uint32_t byte = (words[i / 4] >> ((i % 4) * 8)) & 0xFFu;
    const float s = i < 8 ? s0 : s1;
    const float lo = __uint_as_float(e2m1_to_bf16_bits(byte & 0xFu) << 16) * s;
    const float hi = __uint_as_float(e2m1_to_bf16_bits(byte >> 4) << 16) * s;
    const __nv_bfloat162 pair = __floats2bfloat162_rn(lo, hi);  // exact: see the file comment
    out.w[i] = *reinterpret_cast<const uint32_t*>(&pair);
  }
}

// Thread t of the CTA owns row t / 2 and the K half (t % 2) * 32 of each 128 x 64 tile.
struct Fp4Loader {
  const uint8_t* packed;
  const uint8_t* scales;
  int rows, k;

  __device__ __forceinline__ void load(int row, int k0, Chunk32& out) const {
    if (row >= rows || k0 >= k) {  // outside the matrix: zeros (K % 32 == 0: whole chunks)
#pragma unroll
      for (int i = 0; i < 16; ++i) out.w[i] = 0u;
      return;
    }
    const uint4 q = *reinterpret_cast<const uint4*>(packed + (int64_t)row * (k / 2) + k0 / 2);
    // k0 is a multiple of 32, so kb is even and its pair of scales is two adjacent bytes.
    const int kb = k0 / 16;
    const uint8_t* sp = scales + swizzled_scale_offset(row, kb, (k + 15) / 16);
    dequant32(q, e4m3_to_float(sp[0]), e4m3_to_float(sp[1]), out);
  }
};

struct Bf16Loader {
  const bf16* data;
  int rows, k;

  __device__ __forceinline__ void load(int row, int k0, Chunk32& out) const {
    if (row >= rows || k0 >= k) {
#pragma unroll
      for (int i = 0; i < 16; ++i) out.w[i] = 0u;
      return;
    }
    const uint4* src = reinterpret_cast<const uint4*>(data + (int64_t)row * k + k0);
#pragma unroll
    for (int c = 0; c < 4; ++c) {
      const uint4 v = src[c];
      out.w[4 * c + 0] = v.x;
      out.w[4 * c + 1] = v.y;
      out.w[4 * c + 2] = v.z;
      out.w[4 * c + 3] = v.w;
    }
  }
};

// 32 bf16 of one row into a swizzled stage: four 16-byte stores (8 consecutive K elements stay
// contiguous under the 128-byte swizzle, which permutes 16-byte units within a row).
template <class SmemTensor>
__device__ __forceinline__ void store32(SmemTensor& s, int row, int k0, int stage, const Chunk32& c) {
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    uint4* dst = reinterpret_cast<uint4*>(&s(row, k0 + 8 * j, stage));
    *dst = make_uint4(c.w[4 * j], c.w[4 * j + 1], c.w[4 * j + 2], c.w[4 * j + 3]);
  }
}

template <class ALoader>
__global__ void __launch_bounds__(kThreads, 1)
    nvfp4_gemm_sm90_kernel(Sm90GemmParams p, ALoader a_loader, Fp4Loader b_loader) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900 && defined(__CUDA_ARCH_FEAT_SM90_ALL)
  extern __shared__ unsigned char smem_raw[];
  bf16* base = reinterpret_cast<bf16*>((reinterpret_cast<uintptr_t>(smem_raw) + 1023) & ~uintptr_t(1023));
  Tensor sA = make_tensor(make_smem_ptr(base), SmemLayoutA{});
  Tensor sB = make_tensor(make_smem_ptr(base + cosize_v<SmemLayoutA>), SmemLayoutB{});

  const int tid = threadIdx.x;
  const int m0 = blockIdx.y * kBM, n0 = blockIdx.x * kBN;
  const int my_row = tid / 2, my_k = (tid % 2) * 32;

  TiledMma tiled_mma;
  auto thr_mma = tiled_mma.get_slice(tid);
  Tensor tCsA = thr_mma.partition_A(sA);  // (MMA, MMA_M, MMA_K, stage)
  Tensor tCsB = thr_mma.partition_B(sB);
  Tensor tCrA = thr_mma.make_fragment_A(tCsA);  // shared-memory descriptors
  Tensor tCrB = thr_mma.make_fragment_B(tCsB);
  Tensor accum = partition_fragment_C(tiled_mma, Shape<Int<kBM>, Int<kBN>>{});
  clear(accum);

  const int k_tiles = (p.k + kBK - 1) / kBK;
  Chunk32 ca, cb;
  a_loader.load(m0 + my_row, my_k, ca);
  b_loader.load(n0 + my_row, my_k, cb);
  store32(sA, my_row, my_k, 0, ca);
  store32(sB, my_row, my_k, 0, cb);
  fence_async_shared();
  __syncthreads();

  for (int kt = 0; kt < k_tiles; ++kt) {
    const int stage = kt & 1;
    warpgroup_fence_operand(accum);
    warpgroup_arrive();
#pragma unroll
    for (int kb = 0; kb < size<2>(tCrA); ++kb) {
      cute::gemm(tiled_mma, tCrA(_, _, kb, stage), tCrB(_, _, kb, stage), accum);
    }
    warpgroup_commit_batch();
    // Overlap: the next tile's global loads and dequantization run while the wgmmas do. The
    // other stage was last read by the previous iteration's wgmmas, which every warpgroup has
    // waited for before the barrier that ended that iteration.
    if (kt + 1 < k_tiles) {
      const int k_next = (kt + 1) * kBK + my_k;
      a_loader.load(m0 + my_row, k_next, ca);
      b_loader.load(n0 + my_row, k_next, cb);
      store32(sA, my_row, my_k, stage ^ 1, ca);
      store32(sB, my_row, my_k, stage ^ 1, cb);
    }
    warpgroup_wait<0>();
    warpgroup_fence_operand(accum);
    fence_async_shared();
    __syncthreads();
  }

  // Epilogue: alpha once, bf16, predicated on the matrix edges.
  const float alpha = *p.alpha;
  Tensor mD = make_tensor(make_gmem_ptr(p.d), make_shape(p.m, p.n), make_stride(p.n, _1{}));
  Tensor cD = make_identity_tensor(make_shape(p.m, p.n));
  auto tile = Shape<Int<kBM>, Int<kBN>>{};
  Tensor tDgD = thr_mma.partition_C(local_tile(mD, tile, make_coord(blockIdx.y, blockIdx.x)));
  Tensor tDcD = thr_mma.partition_C(local_tile(cD, tile, make_coord(blockIdx.y, blockIdx.x)));
#pragma unroll
  for (int i = 0; i < size(accum); ++i) {
    if (get<0>(tDcD(i)) < p.m && get<1>(tDcD(i)) < p.n) tDgD(i) = bf16(alpha * accum(i));
  }
#endif
}

// Host side: launch configuration shared by both operand kinds. Returns an error message or
// nullptr.
template <class ALoader>
const char* launch(const Sm90GemmParams& p, const ALoader& a_loader, cudaStream_t stream) {
  if (p.m == 0 || p.n == 0) return nullptr;
  if (p.k % 32 != 0) return "the sm_90a NVFP4 GEMM needs K % 32 == 0";
  auto kernel = &nvfp4_gemm_sm90_kernel<ALoader>;
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmemBytes);
  if (err != cudaSuccess) return cudaGetErrorString(err);
  const Fp4Loader b_loader{p.b, p.sfb, p.n, p.k};
  const dim3 grid((p.n + kBN - 1) / kBN, (p.m + kBM - 1) / kBM);
  kernel<<<grid, kThreads, kSmemBytes, stream>>>(p, a_loader, b_loader);
  err = cudaGetLastError();
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

}  // namespace sm90
}  // namespace dcgen
