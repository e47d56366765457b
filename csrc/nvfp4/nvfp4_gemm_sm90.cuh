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
// Shape of the kernel (one configuration; no TMA and no warp specialization yet): 256 threads =
// two consumer warpgroups, CTA tile 128 x 128 x 64, each warpgroup one 64 x 128 wgmma row band.
// Two shared-memory stages: while the tensor cores work on stage s, every thread converts the
// next K tile and writes stage s ^ 1. Operand A is NVFP4 (W4A4) or bf16 (W4A16, copied as is); B
// is always NVFP4.
//
// Since the first version (0.15-0.2x of cuBLAS bf16 on the H200, where converting a tile took
// longer than multiplying it, and every tile's global loads were waited for at once; 1,068 SASS
// instructions per W4A4 K tile, now 342: benchmarks/sass_loops.py):
//   - the E2M1 decode is e2m1_bf16.h's byte permutes (about 3 instructions per element instead
//     of about 10) and the block scale one bf16x2 multiply per pair (exact, see above);
//   - the raw bytes of tile k + 2 are loaded into registers before tile k + 1 is converted, so a
//     tile's load latency hides behind a whole iteration;
//   - per-thread cursors replace the per-tile index math, and the shared-memory stores go to
//     precomputed 32-bit addresses (cute's generic pointers had made them generic stores).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp8.h>
#include <cuda_runtime.h>

#include <cute/atom/mma_traits_sm90_gmma.hpp>
#include <cute/tensor.hpp>
#include <cutlass/cutlass.h>

#include <cstdint>

#include "common/sm90_sync.cuh"
#include "nvfp4/e2m1_bf16.h"
#include "nvfp4/scale_layout.h"

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

using nvfp4::swizzled_scale_offset;  // nvfp4/scale_layout.h

__device__ __forceinline__ float e4m3_to_float(uint8_t bits) {
  const __half_raw h = __nv_cvt_fp8_to_halfraw(static_cast<__nv_fp8_storage_t>(bits), __NV_E4M3);
  return __half2float(__half(h));
}

// 32 consecutive K elements of one row, as 16 bf16x2 words ready for shared memory.
struct Chunk32 {
  uint32_t w[16];
};

__device__ __forceinline__ __nv_bfloat162 e4m3_to_bf16x2(uint32_t bits) {
  return __bfloat162bfloat162(__float2bfloat16_rn(e4m3_to_float(static_cast<uint8_t>(bits))));
}

// The raw bytes of one row's 32-element K chunk: 16 bytes of codes and the two E4M3 scales of
// its two 16-element blocks (byte 0: elements 0-15, byte 1: elements 16-31).
struct Fp4Raw {
  uint4 q;
  uint32_t scales;
};

// Thread t of the CTA owns row t / 2 and the K half (t % 2) * 32 of each 128 x 64 tile. A cursor
// holds that row's pointers at K tile 0; tile kt is a fixed offset from them (the codes 32 bytes
// further per tile, the swizzled scales one 512-byte 128x4 block further), so the mainloop does
// no index arithmetic.
struct Fp4Loader {
  using Raw = Fp4Raw;
  const uint8_t* packed;
  const uint8_t* scales;
  int rows, k;

  struct Cursor {
    const uint8_t* codes;
    const uint8_t* sf;
    int k0;
    bool valid;
  };

  __device__ __forceinline__ Cursor cursor(int row, int k0) const {
    const bool valid = row < rows;
    const int r = valid ? row : 0;  // never dereferenced when invalid
    // k0 is a multiple of 32, so kb is even and its pair of scales is two adjacent bytes; kb
    // advances by 4 per K tile, i.e. one 128x4 block of the swizzled layout.
    const int kb = k0 / 16;
    return {packed + (int64_t)r * (k / 2) + k0 / 2,
            scales + swizzled_scale_offset(r, kb, (k + 15) / 16), k0, valid};
  }

  // Outside the matrix: zero codes and scales, which convert to zeros (K % 32 == 0: whole
  // chunks).
  __device__ __forceinline__ Raw load(const Cursor& c, int kt) const {
    Raw r{make_uint4(0u, 0u, 0u, 0u), 0u};
    if (c.valid && c.k0 + kt * kBK < k) {
      r.q = *reinterpret_cast<const uint4*>(c.codes + kt * (kBK / 2));
      const uint8_t* sp = c.sf + kt * 512;
      r.scales = uint32_t(sp[0]) | (uint32_t(sp[1]) << 8);
    }
    return r;
  }

  // 32 codes times their block scales, as bf16. Each product is exact (file comment), so the
  // bf16x2 multiply gives the reference's values.
  __device__ __forceinline__ static void convert(const Raw& r, Chunk32& out) {
    const __nv_bfloat162 s0 = e4m3_to_bf16x2(r.scales & 0xFFu);
    const __nv_bfloat162 s1 = e4m3_to_bf16x2((r.scales >> 8) & 0xFFu);
    const uint32_t words[4] = {r.q.x, r.q.y, r.q.z, r.q.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {  // word i: codes 8i .. 8i + 7
      uint32_t pairs[4];
      nvfp4::e2m1x8_to_bf16x8(words[i], pairs);
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const __nv_bfloat162 v =
            __hmul2(*reinterpret_cast<const __nv_bfloat162*>(&pairs[j]), i < 2 ? s0 : s1);
        out.w[4 * i + j] = *reinterpret_cast<const uint32_t*>(&v);
      }
    }
  }
};

struct Bf16Loader {
  using Raw = Chunk32;
  const bf16* data;
  int rows, k;

  struct Cursor {
    const bf16* src;
    int k0;
    bool valid;
  };

  __device__ __forceinline__ Cursor cursor(int row, int k0) const {
    const bool valid = row < rows;
    return {data + (int64_t)(valid ? row : 0) * k + k0, k0, valid};
  }

  __device__ __forceinline__ Raw load(const Cursor& c, int kt) const {
    Raw out;
    if (!c.valid || c.k0 + kt * kBK >= k) {
#pragma unroll
      for (int i = 0; i < 16; ++i) out.w[i] = 0u;
      return out;
    }
    const uint4* src = reinterpret_cast<const uint4*>(c.src + kt * kBK);
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      const uint4 v = src[q];
      out.w[4 * q + 0] = v.x;
      out.w[4 * q + 1] = v.y;
      out.w[4 * q + 2] = v.z;
      out.w[4 * q + 3] = v.w;
    }
    return out;
  }

  __device__ __forceinline__ static void convert(const Raw& r, Chunk32& out) { out = r; }
};

// Where a thread's 32 bf16 of one row go in a swizzled stage: four 16-byte units (8 consecutive
// K elements stay contiguous under the 128-byte swizzle, which permutes 16-byte units within a
// row), as 32-bit shared-memory addresses for stage 0, and the distance to stage 1. Computed once:
// the generic pointers of cute's tensor would cost 64-bit address math and generic stores in
// every iteration.
struct StageSlots {
  uint32_t addr[4];
  uint32_t stage_bytes;
};

template <class SmemTensor>
__device__ __forceinline__ StageSlots stage_slots(SmemTensor& s, int row, int k0) {
  StageSlots slots;
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    slots.addr[j] = static_cast<uint32_t>(__cvta_generic_to_shared(&s(row, k0 + 8 * j, 0)));
  }
  slots.stage_bytes =
      static_cast<uint32_t>(__cvta_generic_to_shared(&s(row, k0, 1))) - slots.addr[0];
  return slots;
}

__device__ __forceinline__ void store32(const StageSlots& slots, int stage, const Chunk32& c) {
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const uint32_t addr = slots.addr[j] + stage * slots.stage_bytes;
    asm volatile("st.shared.v4.b32 [%0], {%1, %2, %3, %4};\n" ::"r"(addr), "r"(c.w[4 * j]),
                 "r"(c.w[4 * j + 1]), "r"(c.w[4 * j + 2]), "r"(c.w[4 * j + 3])
                 : "memory");
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
  const auto a_cur = a_loader.cursor(m0 + my_row, my_k);
  const auto b_cur = b_loader.cursor(n0 + my_row, my_k);
  const StageSlots a_slots = stage_slots(sA, my_row, my_k);
  const StageSlots b_slots = stage_slots(sB, my_row, my_k);
  Chunk32 ca, cb;
  typename ALoader::Raw ra = a_loader.load(a_cur, 0);
  Fp4Raw rb = b_loader.load(b_cur, 0);
  ALoader::convert(ra, ca);
  Fp4Loader::convert(rb, cb);
  store32(a_slots, 0, ca);
  store32(b_slots, 0, cb);
  // ra / rb hold the raw bytes of the next tile from here on (zeros past K).
  ra = a_loader.load(a_cur, 1);
  rb = b_loader.load(b_cur, 1);
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
    // Overlap: while the wgmmas run, issue tile kt + 2's global loads, then convert tile kt + 1
    // (loaded one iteration ago) into the other stage. That stage was last read by the
    // previous iteration's wgmmas, which every warpgroup has waited for before the barrier
    // that ended that iteration.
    if (kt + 1 < k_tiles) {
      const typename ALoader::Raw ra_after = a_loader.load(a_cur, kt + 2);
      const Fp4Raw rb_after = b_loader.load(b_cur, kt + 2);
      ALoader::convert(ra, ca);
      Fp4Loader::convert(rb, cb);
      store32(a_slots, stage ^ 1, ca);
      store32(b_slots, stage ^ 1, cb);
      ra = ra_after;
      rb = rb_after;
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
