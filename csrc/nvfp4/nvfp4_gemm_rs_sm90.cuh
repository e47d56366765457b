// Hopper (sm_90a) NVFP4-weight GEMM with the weight as wgmma's register operand ("RS"): the
// tensor cores read the dequantized weight straight from registers, so the bf16 copy of a
// weight tile never goes through shared memory, and the activation (bf16) arrives by TMA.
//
// Why a second Hopper kernel: the first one (nvfp4_gemm_sm90.cuh) converts both operands into
// shared memory on the same threads that issue the wgmmas, with no TMA and a 128 x 128 tile; on
// the H200 it ran at 0.29-0.35x of cuBLAS bf16 (session 18). Its conversion work per K tile was
// larger than the tensor cores' time for the tile. Here (the layout CUTLASS's mixed-input
// collective uses for narrow weights):
//   - the GEMM is computed transposed, D^T = W A^T, so the weight is wgmma's A operand, the one
//     that may come from registers; each thread converts only the 32 weight elements its own
//     A fragment holds per 64-wide K tile (no shared-memory stores, no swizzle addressing);
//   - the activation tile is 256 rows wide, so one converted weight element feeds 256 MACs
//     (128 in the first kernel);
//   - a producer warp feeds the activation by TMA through a 4-stage mbarrier ring, and the
//     consumers convert tile k + 1 while the tensor cores run tile k (A fragments double
//     buffered; the loop body is written twice so every register index is static).
//
// Which bytes a thread needs: wgmma's register A fragment (m64 x k16, bf16) gives lane l of warp
// w rows g = 16 w + l / 4 and g + 8 and the K pairs 2c, 2c + 1 and 2c + 8, 2c + 9 (c = l % 4).
// Over a 64-wide K tile that is byte c of each of the row's eight 4-byte code words. Each lane
// loads 8 contiguous bytes (its own 16-element block, c) and a 4 x 4 byte transpose across the
// quad (two xor shuffles and two byte permutes per word) hands every lane its bytes. After the
// transpose, byte s of a lane's word is its pair for K block s, which e2m1x8_to_bf16x8 turns
// into the fragment register of K block s directly; the row's four E4M3 block scales are one
// 4-byte load (adjacent bytes of the 128x4 swizzled layout).
//
// Exactness is the first kernel's (file comment there): every E2M1 x E4M3 product is a bf16
// value, the tensor cores accumulate in fp32 and alpha (the global decode scales) is applied
// once in the epilogue. The result equals dequantize-then-matmul up to fp32 summation order.
//
// W4A4 runs here too: dcgen::nvfp4_gemm first expands the NVFP4 activation to bf16 (exact, the
// same values; nvfp4_dequantize), then calls this kernel.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp8.h>
#include <cuda_runtime.h>

// cute/tensor.hpp first: the TMA traits need Copy_Atom declared.
#include <cute/tensor.hpp>
#include <cute/atom/copy_traits_sm90_tma.hpp>
#include <cute/atom/mma_traits_sm90_gmma.hpp>
#include <cutlass/arch/barrier.h>
#include <cutlass/arch/reg_reconfig.h>
#include <cutlass/numeric_types.h>

#include <cstdint>

#include "common/sm90_sync.cuh"
#include "nvfp4/e2m1_bf16.h"
#include "nvfp4/scale_layout.h"
#include "nvfp4/rs_fragment.h"

namespace dcgen::sm90_rs {

using namespace cute;
using bf16 = cutlass::bfloat16_t;

constexpr int kTileN = 128;  // weight rows per CTA: 64 per consumer warpgroup (wgmma's M)
constexpr int kTileM = 256;  // activation rows per CTA (wgmma's N)
constexpr int kBK = 64;      // K per stage: one 128-byte swizzle row of bf16
constexpr int kStages = 4;
constexpr int kConsumerThreads = 256;
constexpr int kThreads = kConsumerThreads + 128;  // + the producer warpgroup (one thread works)
// Register split (setmaxnreg): 384 threads launch with 168 each; the producer warpgroup keeps
// 40, the consumers (128 fp32 accumulators, two 16-register A fragments, the prefetched raw
// bytes of two K tiles) get 232. 128 x 40 + 256 x 232 = 64,512 of the SM's 65,536.
constexpr int kProducerRegs = 40;
constexpr int kConsumerRegs = 232;

// Activation tiles: 256 rows x 64 K, K-major with the 128-byte swizzle (one swizzle row per
// activation row), kStages of them; TMA writes them, wgmma reads them as operand B.
using SmemLayoutB =
    decltype(tile_to_shape(GMMA::Layout_K_SW128_Atom<bf16>{}, Shape<Int<kTileM>, Int<kBK>, Int<kStages>>{}));
using TiledMma = decltype(make_tiled_mma(
    SM90::GMMA::rs_op_selector<bf16, bf16, float, Shape<_64, Int<kTileM>, Int<kBK>>, GMMA::Major::K,
                               GMMA::Major::K>(),
    Layout<Shape<_2, _1, _1>>{}));

constexpr int kStageBytes = kTileM * kBK * 2;
constexpr int kStageElems = int(cosize_v<SmemLayoutB>);
static_assert(kStageElems == kStages * kTileM * kBK, "compact stages");
// The epilogue reuses the stages to turn D^T's fragments into D rows: 256 rows of 128 bf16,
// padded by 8 (16 bytes) so the eight rows one stmatrix phase writes fall on distinct banks.
constexpr int kOutPitch = kTileN + 8;
static_assert(kTileM * kOutPitch * 2 <= kStageElems * 2, "the output tile fits in the stages");
constexpr int kBarrierOffset = kStageElems * 2;
constexpr int kSmemBytes = kBarrierOffset + 2 * kStages * 8 + 1024;  // + 1 KiB base alignment
static_assert(kSmemBytes <= 227 * 1024, "over Hopper's 227 KiB of shared memory per block");

struct Params {
  const uint8_t* w;       // packed E2M1 [N, K/2]
  const uint8_t* sfw;     // E4M3 block scales of w, 128x4 swizzled
  const float* alpha;     // device scalar
  bf16* d;                // [M, N] row-major
  int m, n, k;
  int k_tiles;            // K tiles the loop runs: ceil(K / 64) rounded up to even (zero tiles)
};

// The global view the activation's TMA descriptor is built from: [M, K] bf16, K contiguous.
__host__ __device__ inline auto activation_view(const bf16* a, int m, int k) {
  return make_tensor(make_gmem_ptr(a), make_shape(m, k), make_stride(int64_t(k), _1{}));
}

// The raw weight bytes of one K tile for this thread's two rows: its 16-element block (8 bytes
// of codes) of row g and of row g + 8, and each row's four block scales.
struct RawTile {
  uint2 codes_lo, codes_hi;  // rows g, g + 8
  uint32_t sf_lo, sf_hi;
};

// Per-thread cursor over the weight: the two rows' code and scale pointers. The loads are
// unconditional and clamped into the matrix (a branch around them made the compiler copy the
// loaded registers at the loop's end, which waits for the load and undoes the prefetch); what
// lies outside it is zeroed at conversion by the scale mask (zero scale, zero product: E2M1
// codes are always finite).
struct WeightCursor {
  const uint8_t* codes_lo;  // row g's codes
  const uint8_t* codes_hi;  // row g + 8's
  const uint8_t* sf_lo;     // row g's scales of K tile 0
  const uint8_t* sf_hi;
  int lane_code_offset;  // 8 c: this lane's block within a tile
  int last_code_offset;  // K / 2 - 8: the row's last 8-byte piece
  int last_tile;         // the last K tile holding any of K
  uint32_t row_mask_lo, row_mask_hi;  // 0 for rows past N
  int full_blocks;       // 16-element blocks in K

  __device__ __forceinline__ RawTile load(int kt) const {
    const int code_off = min(kt * (kBK / 2) + lane_code_offset, last_code_offset);
    const int sf_off = min(kt, last_tile) * 512;
    RawTile r;
    r.codes_lo = *reinterpret_cast<const uint2*>(codes_lo + code_off);
    r.codes_hi = *reinterpret_cast<const uint2*>(codes_hi + code_off);
    r.sf_lo = *reinterpret_cast<const uint32_t*>(sf_lo + sf_off);
    r.sf_hi = *reinterpret_cast<const uint32_t*>(sf_hi + sf_off);
    return r;
  }

  // Which of tile kt's four block scales are inside K (K % 32 == 0: all, the first two or
  // none), one byte each.
  __device__ __forceinline__ uint32_t k_mask(int kt) const {
    const int valid = full_blocks - 4 * kt;
    return valid >= 4 ? 0xFFFFFFFFu : (valid >= 2 ? 0x0000FFFFu : 0u);
  }
};

using nvfp4::swizzled_scale_offset;  // nvfp4/scale_layout.h

// The quad's 4 x 4 byte transpose: lane c of the quad passes its word x (bytes x[0..3]) and gets
// back (x_0[c], x_1[c], x_2[c], x_3[c]) where x_L is lane L's word. Two butterfly stages whose
// byte selectors (rs_fragment.h, checked on the host by tests/ops/test_nvfp4_rs_fragment.py)
// depend only on the lane.
struct QuadTranspose {
  uint32_t sel1, sel2;
  __device__ __forceinline__ explicit QuadTranspose(int c)
      : sel1(nvfp4::quad_stage1_selector(c)), sel2(nvfp4::quad_stage2_selector(c)) {}
  __device__ __forceinline__ uint32_t operator()(uint32_t x) const {
    const uint32_t u = nvfp4::byte_perm(x, __shfl_xor_sync(0xFFFFFFFFu, x, 1), sel1);
    return nvfp4::byte_perm(u, __shfl_xor_sync(0xFFFFFFFFu, u, 2), sel2);
  }
};

// Four E4M3 scales (byte s: K block s) as four bf16x2 words, each scale in both halves. Exact:
// every E4M3 value is a bf16 value.
__device__ __forceinline__ void scales_to_bf16x2(uint32_t sf, uint32_t (&out)[4]) {
  const __half2_raw h01 = __nv_cvt_fp8x2_to_halfraw2(static_cast<__nv_fp8x2_storage_t>(sf & 0xFFFFu), __NV_E4M3);
  const __half2_raw h23 = __nv_cvt_fp8x2_to_halfraw2(static_cast<__nv_fp8x2_storage_t>(sf >> 16), __NV_E4M3);
  const float2 f01 = __half22float2(__half2(h01));
  const float2 f23 = __half22float2(__half2(h23));
  const float f[4] = {f01.x, f01.y, f23.x, f23.y};
#pragma unroll
  for (int s = 0; s < 4; ++s) {
    const __nv_bfloat162 v = __float2bfloat162_rn(f[s]);
    out[s] = *reinterpret_cast<const uint32_t*>(&v);
  }
}

__device__ __forceinline__ uint32_t bf16x2_mul(uint32_t a, uint32_t b) {
  const __nv_bfloat162 r =
      __hmul2(*reinterpret_cast<const __nv_bfloat162*>(&a), *reinterpret_cast<const __nv_bfloat162*>(&b));
  return *reinterpret_cast<const uint32_t*>(&r);
}

// One K tile's A fragment from its raw bytes: ((2, 2, 2), 1, 4) bf16 values, compact, i.e. 16
// words where word 4 kb + r is register r of K block kb (r: 0 row g / K 2c, 1 row g + 8 / 2c,
// 2 row g / 2c + 8, 3 row g + 8 / 2c + 8: wgmma's register order).
template <class Frag>
__device__ __forceinline__ void convert_tile(const RawTile& raw, uint32_t mask_lo, uint32_t mask_hi,
                                             const QuadTranspose& qt, Frag& frag) {
  // Word h of a row after the transpose: byte s = codes (16 s + 8 h + 2c, + 1).
  const uint32_t t_lo0 = qt(raw.codes_lo.x), t_lo1 = qt(raw.codes_lo.y);
  const uint32_t t_hi0 = qt(raw.codes_hi.x), t_hi1 = qt(raw.codes_hi.y);
  uint32_t s_lo[4], s_hi[4];
  scales_to_bf16x2(raw.sf_lo & mask_lo, s_lo);
  scales_to_bf16x2(raw.sf_hi & mask_hi, s_hi);
  uint32_t v[4][4];  // [register][K block]
  nvfp4::e2m1x8_to_bf16x8(t_lo0, v[0]);
  nvfp4::e2m1x8_to_bf16x8(t_hi0, v[1]);
  nvfp4::e2m1x8_to_bf16x8(t_lo1, v[2]);
  nvfp4::e2m1x8_to_bf16x8(t_hi1, v[3]);
  Tensor words = recast<uint32_t>(frag);
#pragma unroll
  for (int kb = 0; kb < 4; ++kb) {
    words(4 * kb + 0) = bf16x2_mul(v[0][kb], s_lo[kb]);
    words(4 * kb + 1) = bf16x2_mul(v[1][kb], s_hi[kb]);
    words(4 * kb + 2) = bf16x2_mul(v[2][kb], s_lo[kb]);
    words(4 * kb + 3) = bf16x2_mul(v[3][kb], s_hi[kb]);
  }
}

// stmatrix .x4 .trans: four 8 x 8 bf16 matrices, lane l giving the shared address of row l % 8
// of matrix l / 8 as it lands in memory (the transpose of the register view).
__device__ __forceinline__ void stmatrix_x4_trans(uint32_t addr, uint32_t r0, uint32_t r1, uint32_t r2,
                                                  uint32_t r3) {
  asm volatile("stmatrix.sync.aligned.m8n8.x4.trans.shared.b16 [%0], {%1, %2, %3, %4};\n" ::"r"(addr),
               "r"(r0), "r"(r1), "r"(r2), "r"(r3)
               : "memory");
}

__device__ __forceinline__ uint32_t pack_bf16x2(float lo, float hi) {
  const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&v);
}

template <class TmaB>
__global__ void __launch_bounds__(kThreads, 1)
    nvfp4_gemm_rs_sm90_kernel(const __grid_constant__ Params p, const __grid_constant__ TmaB tma_b) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900 && defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using FullBarrier = cutlass::arch::ClusterTransactionBarrier;
  using EmptyBarrier = cutlass::arch::ClusterBarrier;

  extern __shared__ unsigned char smem_raw[];
  unsigned char* smem = reinterpret_cast<unsigned char*>(
      (reinterpret_cast<uintptr_t>(smem_raw) + 1023) & ~uintptr_t(1023));
  bf16* stage_base = reinterpret_cast<bf16*>(smem);
  Tensor sB = make_tensor(make_smem_ptr(stage_base), SmemLayoutB{});
  uint64_t* full = reinterpret_cast<uint64_t*>(smem + kBarrierOffset);  // TMA landed
  uint64_t* empty = full + kStages;  // every consumer thread is done reading the stage

  const int tid = threadIdx.x;
  const int n_block = blockIdx.x, m_block = blockIdx.y;

  dcgen::sm90::init_stage_barriers<kStages>(full, empty, kConsumerThreads);  // the roles split here

  if (tid >= kConsumerThreads) {
    cutlass::arch::warpgroup_reg_dealloc<kProducerRegs>();  // the whole warpgroup, first
    if (tid == kConsumerThreads) {
      // The TMA tensor's shape only generates coordinates; the descriptor holds the real
      // [M, K], and the hardware fills rows past M and the even-padding tile past K with zeros.
      Tensor mB = tma_b.get_tma_tensor(make_shape(p.m, p.k_tiles * kBK));
      Tensor gB = local_tile(mB, Shape<Int<kTileM>, Int<kBK>>{}, make_coord(m_block, _));
      auto [tBgB, tBsB] = tma_partition(tma_b, Int<0>{}, Layout<_1>{}, group_modes<0, 2>(sB),
                                        group_modes<0, 2>(gB));
      for (int kt = 0; kt < p.k_tiles; ++kt) {
        const int s = kt % kStages;
        if (kt >= kStages) EmptyBarrier::wait(&empty[s], (kt / kStages - 1) & 1);
        FullBarrier::arrive_and_expect_tx(&full[s], kStageBytes);
        copy(tma_b.with(full[s]), tBgB(_, kt), tBsB(_, s));
      }
    }
    return;
  }

  cutlass::arch::warpgroup_reg_alloc<kConsumerRegs>();

  TiledMma mma;
  auto thr = mma.get_slice(tid);
  Tensor tCrB = thr.make_fragment_B(thr.partition_B(sB));  // descriptors (MMA, N, K, stage)
  Tensor acc = partition_fragment_C(mma, Shape<Int<kTileN>, Int<kTileM>>{});
  Tensor frag0 = make_tensor<bf16>(partition_shape_A(mma, Shape<Int<kTileN>, Int<kBK>>{}));
  Tensor frag1 = make_tensor<bf16>(partition_shape_A(mma, Shape<Int<kTileN>, Int<kBK>>{}));
  static_assert(decltype(size(frag0))::value == 32, "32 weight values per thread and K tile");
  static_assert(decltype(size<2>(frag0))::value == 4, "four k16 blocks per K tile");
  clear(acc);

  // This thread's weight rows (wgmma's A fragment: warpgroup, warp, lane / 4) and K block.
  const int lane = tid % 32, c = lane % 4;
  const int row_lo = n_block * kTileN + nvfp4::fragment_row_base(tid) + lane / 4;
  const int row_hi = row_lo + 8;
  const int k_blocks = p.k / 16;
  const bool lo_valid = row_lo < p.n, hi_valid = row_hi < p.n;
  WeightCursor wc;
  wc.codes_lo = p.w + int64_t(lo_valid ? row_lo : 0) * (p.k / 2);
  wc.codes_hi = p.w + int64_t(hi_valid ? row_hi : 0) * (p.k / 2);
  wc.sf_lo = p.sfw + swizzled_scale_offset(lo_valid ? row_lo : 0, 0, k_blocks);
  wc.sf_hi = p.sfw + swizzled_scale_offset(hi_valid ? row_hi : 0, 0, k_blocks);
  wc.lane_code_offset = 8 * c;
  wc.last_code_offset = p.k / 2 - 8;
  wc.last_tile = (k_blocks + 3) / 4 - 1;
  wc.row_mask_lo = lo_valid ? 0xFFFFFFFFu : 0u;
  wc.row_mask_hi = hi_valid ? 0xFFFFFFFFu : 0u;
  wc.full_blocks = k_blocks;
  const QuadTranspose qt(c);

  // Prefetched raw bytes (zeros past K): on entry to the loop body for tile kt (even), raw0
  // holds tile kt + 1 and raw1 tile kt + 2. Each step refills the buffer it just converted with
  // the tile three ahead, so no raw value is ever copied between registers (a copy of a value
  // still in flight would wait for its load there).
  {
    const uint32_t km = wc.k_mask(0);
    convert_tile(wc.load(0), km & wc.row_mask_lo, km & wc.row_mask_hi, qt, frag0);
  }
  RawTile raw0 = wc.load(1);
  RawTile raw1 = wc.load(2);

  // Iteration kt: wait for the activation tile, issue its four wgmmas on fragment `use`, wait
  // until tile kt - 1's wgmmas are done (they read `fill` and the previous stage), hand that
  // stage back, then convert tile kt + 1 (from `raw`) into `fill` while tile kt's wgmmas run.
  // The fences keep `fill`'s old values live until the wait, so their registers are not reused
  // while the tensor cores may still read them.
  auto step = [&](int kt, auto& use, auto& fill, RawTile& raw) {
    const int s = kt % kStages;
    FullBarrier::wait(&full[s], (kt / kStages) & 1);
    warpgroup_fence_operand(acc);
    warpgroup_fence_operand(use);
    warpgroup_arrive();
#pragma unroll
    for (int kb = 0; kb < 4; ++kb) {
      cute::gemm(mma, use(_, _, kb), tCrB(_, _, kb, s), acc);
    }
    warpgroup_commit_batch();
    warpgroup_wait<1>();  // tile kt - 1 is complete
    warpgroup_fence_operand(fill);
    if (kt > 0) EmptyBarrier::arrive(&empty[(kt + kStages - 1) % kStages]);
    const uint32_t km = wc.k_mask(kt + 1);
    convert_tile(raw, km & wc.row_mask_lo, km & wc.row_mask_hi, qt, fill);
    raw = wc.load(kt + 3);
  };
  // k_tiles is even (the launcher pads it), so the loop body holds two iterations and the two
  // fragments keep fixed registers; no wgmma sits under a data-dependent branch (ptxas would
  // serialize every wgmma of the kernel, its warning C7520).
  for (int kt = 0; kt < p.k_tiles; kt += 2) {
    step(kt, frag0, frag1, raw0);
    step(kt + 1, frag1, frag0, raw1);
  }
  warpgroup_wait<0>();
  warpgroup_fence_operand(acc);

  // Epilogue. D^T's fragment (row: weight n, column: activation m) goes to shared memory as D
  // rows with stmatrix .trans, then out as 16-byte row pieces. Both consumer warpgroups must be
  // done with every stage first (their last wgmmas read them).
  cutlass::arch::NamedBarrier::arrive_and_wait(kConsumerThreads, 1);
  const float alpha = *p.alpha;
  const uint32_t out_base = static_cast<uint32_t>(__cvta_generic_to_shared(stage_base));
  {
    // Index math in rs_fragment.h (host-tested): one store writes 4 matrices of 8 x 8, each
    // register the bf16 pair of two neighbouring accumulators.
#pragma unroll
    for (int jj = 0; jj < kTileM / 16; ++jj) {
      int m_local, n_local;
      nvfp4::stmatrix_row_start(tid, jj, m_local, n_local);
      const uint32_t addr = out_base + uint32_t(m_local * kOutPitch + n_local) * 2u;
      uint32_t r[4];
#pragma unroll
      for (int q = 0; q < 4; ++q) {
        const int a = nvfp4::stmatrix_acc_index(jj, q);
        r[q] = pack_bf16x2(alpha * acc(a), alpha * acc(a + 1));
      }
      stmatrix_x4_trans(addr, r[0], r[1], r[2], r[3]);
    }
  }
  cutlass::arch::NamedBarrier::arrive_and_wait(kConsumerThreads, 1);
  const int n0 = n_block * kTileN, m0 = m_block * kTileM;
  const bool vector_rows = p.n % 8 == 0;  // 16-byte aligned D rows
  constexpr int kPieces = kTileN / 8;     // 16-byte pieces per output row
#pragma unroll 4
  for (int id = tid; id < kTileM * kPieces; id += kConsumerThreads) {
    const int row = id / kPieces, piece = id % kPieces;
    const int m = m0 + row, n = n0 + 8 * piece;
    if (m >= p.m || n >= p.n) continue;
    // A shared-space load (through the generic pointer it compiled to a generic LD).
    uint4 v;
    asm volatile("ld.shared.v4.b32 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
                 : "r"(out_base + uint32_t(row * kOutPitch + 8 * piece) * 2u));
    bf16* dst = p.d + int64_t(m) * p.n + n;
    if (vector_rows && n + 8 <= p.n) {
      *reinterpret_cast<uint4*>(dst) = v;
    } else {
      const bf16* e8 = reinterpret_cast<const bf16*>(&v);
#pragma unroll
      for (int e = 0; e < 8; ++e) {  // static indices: v stays in registers
        if (n + e < p.n) dst[e] = e8[e];
      }
    }
  }
#endif
}

}  // namespace dcgen::sm90_rs
