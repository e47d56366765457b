// Hopper (sm_90a) flash-attention forward with the QK-RMSNorm + RoPE prologue: the portable
// kernel's algorithm (flash_fwd.cuh) on warpgroup MMAs. Spec: dcgen/ops/attention.py.
//
// One CTA = 2 warpgroups = 128 query rows of one (batch, head); warpgroup w owns rows
// [64 w, 64 w + 64). Per key tile of 64 rows:
//   1. all 256 threads load K (through the same register prologue as the portable kernel:
//      RMSNorm and RoPE cost one pass over K in registers, so a TMA load would still need a
//      pass through registers) and V into shared memory, in the 128-byte-swizzled layouts wgmma
//      reads: Q and K K-major (D contiguous), V MN-major (also D contiguous: it is the B operand
//      of P V with the keys as the reduction dimension);
//   2. S = Q K^T: wgmma m64n64k16, both operands from shared memory, fp32 accumulators;
//   3. scale (exp2 domain), mask (sequence tail, key padding) and the online-softmax update in
//      fp32 registers; row statistics are reduced over the 4 lanes that share a row;
//   4. P rounded to T into shared memory (K-major), then O += P V: wgmma m64nDk16.
// Written for correctness first: no TMA, no producer warpgroup, no overlap of the softmax with
// the next tile's MMAs (FlashAttention-3's ping-pong); those are the next steps once a GPU run
// has validated this one. Dispatch picks it on sm_90 when built and switched on
// (flash_attention_cuda.cpp).
//
// Accumulator layout of an m64nN wgmma (CuTe's CLayout_64xN): thread t of the warpgroup holds
// rows 16 (t / 32) + (t % 32) / 4 and that + 8; value i of its fragment sits in row slot
// (i / 2) % 2 (0: the first row, 1: the row + 8) and column 2 (t % 4) + (i % 2) + 8 (i / 4).
// The four lanes that share a row are adjacent (xor 1, 2 shuffles reduce a row).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cute/atom/mma_traits_sm90_gmma.hpp>
#include <cute/tensor.hpp>
#include <cutlass/numeric_types.h>

#include <cstdint>

#include "attention/flash_fwd.cuh"
#include "attention/flash_params.h"
#include "common/sm90_sync.cuh"

namespace dcgen::attention::sm90 {

using namespace cute;
using dcgen::sm90::fence_async_shared;
using dcgen::sm90::warpgroup_gemm;

template <typename T>
struct CuteElement;
template <>
struct CuteElement<__nv_bfloat16> {
  using type = cutlass::bfloat16_t;
};
template <>
struct CuteElement<__half> {
  using type = cutlass::half_t;
};

constexpr int kRows = 128;   // query rows per CTA
constexpr int kKeys = 64;    // key rows per tile
constexpr int kThreads = 256;

// Pieces shared with the warp-specialized kernel (flash_fwd_sm90_tma.cuh); both hold a
// warpgroup's accumulator rows in the m64nN layout described at the top of this file.

// Online-softmax statistics for one key tile: tile_max (this thread's maxima of its two rows,
// already including row_max) is reduced over the row's 4 lanes; returns via alpha / shift the
// rescale factor of the running sums and O, and the exponent shift for this tile.
__device__ __forceinline__ void update_row_stats(float (&tile_max)[2], float (&row_max)[2],
                                                 float (&row_sum)[2], float (&alpha)[2],
                                                 float (&shift)[2]) {
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    tile_max[r] = fmaxf(tile_max[r], __shfl_xor_sync(0xffffffffu, tile_max[r], 1));
    tile_max[r] = fmaxf(tile_max[r], __shfl_xor_sync(0xffffffffu, tile_max[r], 2));
    // A row with no valid key so far keeps max -inf: shift by 0 so exp2 gives 0, not NaN.
    shift[r] = tile_max[r] == -INFINITY ? 0.f : tile_max[r];
    alpha[r] = exp2f(row_max[r] - shift[r]);
    row_max[r] = tile_max[r];
    row_sum[r] *= alpha[r];
  }
}

// Normalise O by the row sums (per-thread partial sums, reduced over the row's 4 lanes here)
// and store the CTA's rows below seqlen_q. Rows with no valid key (everything masked) have
// sum 0 and write 0.
template <typename E, int kCtaRows, int D, class ThrMma, class Acc>
__device__ __forceinline__ void store_output(const ThrMma& thr_o, const Acc& acc_o,
                                             float (&row_sum)[2], void* o, const FlashParams& p,
                                             int row0) {
  float inv[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    row_sum[r] += __shfl_xor_sync(0xffffffffu, row_sum[r], 1);
    row_sum[r] += __shfl_xor_sync(0xffffffffu, row_sum[r], 2);
    inv[r] = row_sum[r] > 0.f ? 1.f / row_sum[r] : 0.f;
  }
  Tensor gO = make_tensor(make_gmem_ptr(reinterpret_cast<E*>(o) + row0 * p.o_row_stride),
                          make_shape(Int<kCtaRows>{}, Int<D>{}), make_stride(p.o_row_stride, _1{}));
  Tensor tOgO = thr_o.partition_C(gO);
  Tensor tOcO = thr_o.partition_C(make_identity_tensor(Shape<Int<kCtaRows>, Int<D>>{}));
#pragma unroll
  for (int i = 0; i < size(acc_o); ++i) {
    if (row0 + get<0>(tOcO(i)) < p.seqlen_q) tOgO(i) = E(acc_o(i) * inv[(i / 2) % 2]);
  }
}

template <typename T, int D>
struct Config {
  using E = typename CuteElement<T>::type;
  using SmemQ = decltype(tile_to_shape(GMMA::Layout_K_SW128_Atom<E>{}, Shape<Int<kRows>, Int<D>>{}));
  using SmemK = decltype(tile_to_shape(GMMA::Layout_K_SW128_Atom<E>{}, Shape<Int<kKeys>, Int<D>>{}));
  // V as the B operand of P V: (N = D, K = keys), D contiguous = MN-major.
  using SmemV = decltype(tile_to_shape(GMMA::Layout_MN_SW128_Atom<E>{}, Shape<Int<D>, Int<kKeys>>{}));
  using SmemP = decltype(tile_to_shape(GMMA::Layout_K_SW128_Atom<E>{}, Shape<Int<kRows>, Int<kKeys>>{}));
  using MmaS = decltype(make_tiled_mma(
      SM90::GMMA::ss_op_selector<E, E, float, Shape<_64, Int<kKeys>, Int<D>>, GMMA::Major::K,
                                 GMMA::Major::K>(),
      Layout<Shape<_2, _1, _1>>{}));
  using MmaO = decltype(make_tiled_mma(
      SM90::GMMA::ss_op_selector<E, E, float, Shape<_64, Int<D>, Int<kKeys>>, GMMA::Major::K,
                                 GMMA::Major::MN>(),
      Layout<Shape<_2, _1, _1>>{}));
  static constexpr int kElems =
      int(cosize_v<SmemQ> + cosize_v<SmemK> + cosize_v<SmemV> + cosize_v<SmemP>);
  // + 1 KiB for the 128-byte swizzle's alignment, + the key mask
  static constexpr int kSmemBytes = kElems * 2 + 1024 + kKeys;
};

template <typename T, int D>
__global__ void __launch_bounds__(kThreads, 1) flash_fwd_sm90_kernel(const FlashParams p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900 && defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using C = Config<T, D>;
  using E = typename C::E;
  extern __shared__ unsigned char smem_raw[];
  E* base = reinterpret_cast<E*>((reinterpret_cast<uintptr_t>(smem_raw) + 1023) & ~uintptr_t(1023));
  Tensor sQ = make_tensor(make_smem_ptr(base), typename C::SmemQ{});
  Tensor sK = make_tensor(make_smem_ptr(base + cosize_v<typename C::SmemQ>), typename C::SmemK{});
  E* v_base = base + cosize_v<typename C::SmemQ> + cosize_v<typename C::SmemK>;
  Tensor sV = make_tensor(make_smem_ptr(v_base), typename C::SmemV{});
  E* p_base = v_base + cosize_v<typename C::SmemV>;
  Tensor sP = make_tensor(make_smem_ptr(p_base), typename C::SmemP{});
  bool* keep = reinterpret_cast<bool*>(p_base + cosize_v<typename C::SmemP>);

  const int tid = threadIdx.x;
  const int m_block = blockIdx.x, h = blockIdx.y, b = blockIdx.z;
  const auto [q, k, v, o, mask] = head_slices<T>(p, b, h);

  typename C::MmaS mma_s;
  typename C::MmaO mma_o;
  auto thr_s = mma_s.get_slice(tid);
  auto thr_o = mma_o.get_slice(tid);
  Tensor tSrQ = thr_s.make_fragment_A(thr_s.partition_A(sQ));  // descriptors
  Tensor tSrK = thr_s.make_fragment_B(thr_s.partition_B(sK));
  Tensor tOrP = thr_o.make_fragment_A(thr_o.partition_A(sP));
  Tensor tOrV = thr_o.make_fragment_B(thr_o.partition_B(sV));
  Tensor tSsP = thr_s.partition_C(sP);  // where this thread's P values go
  Tensor tScS = thr_s.partition_C(make_identity_tensor(Shape<Int<kRows>, Int<kKeys>>{}));
  Tensor acc_o = partition_fragment_C(mma_o, Shape<Int<kRows>, Int<D>>{});
  clear(acc_o);

  // Q tile with its prologue.
  load_rows<T, D, kRows, kThreads>([&](int r, int col) { return &sQ(r, col); }, q,
                                   p.q_row_stride, m_block * kRows, p.seqlen_q, p.q_w0, p.q_w1,
                                   p.norm_split, p.eps, p.q_cos, p.q_sin);

  float row_max[2] = {-INFINITY, -INFINITY};
  float row_sum[2] = {0.f, 0.f};  // per thread (its columns); reduced over the quad at the end

  for (int n0 = 0; n0 < p.seqlen_k; n0 += kKeys) {
    __syncthreads();  // the last tile's wgmmas (waited for) are done with sK, sV, sP
    load_rows<T, D, kKeys, kThreads>([&](int r, int col) { return &sK(r, col); }, k,
                                     p.k_row_stride, n0, p.seqlen_k, p.k_w0, p.k_w1,
                                     p.norm_split, p.eps, p.k_cos, p.k_sin);
    load_rows<T, D, kKeys, kThreads>([&](int r, int col) { return &sV(col, r); }, v,
                                     p.v_row_stride, n0, p.seqlen_k, nullptr, nullptr, 0, 0.f,
                                     nullptr, nullptr);
    if (tid < kKeys) {
      const int key = n0 + tid;
      keep[tid] = key < p.seqlen_k && (mask == nullptr || mask[key]);
    }
    fence_async_shared();
    __syncthreads();

    // S = Q K^T (this warpgroup's 64 rows x 64 keys).
    Tensor acc_s = partition_fragment_C(mma_s, Shape<Int<kRows>, Int<kKeys>>{});
    clear(acc_s);
    warpgroup_gemm(mma_s, tSrQ, tSrK, acc_s);

    // Online softmax in the exp2 domain (fp32).
    float tile_max[2] = {row_max[0], row_max[1]};
#pragma unroll
    for (int i = 0; i < size(acc_s); ++i) {
      const float x = keep[get<1>(tScS(i))] ? acc_s(i) * p.scale_log2 : -INFINITY;
      acc_s(i) = x;
      tile_max[(i / 2) % 2] = fmaxf(tile_max[(i / 2) % 2], x);
    }
    float alpha[2], shift[2];
    update_row_stats(tile_max, row_max, row_sum, alpha, shift);
#pragma unroll
    for (int i = 0; i < size(acc_s); ++i) {
      const float e = exp2_approx(acc_s(i) - shift[(i / 2) % 2]);
      row_sum[(i / 2) % 2] += e;
      tSsP(i) = E(e);
    }
#pragma unroll
    for (int i = 0; i < size(acc_o); ++i) acc_o(i) *= alpha[(i / 2) % 2];
    fence_async_shared();
    __syncthreads();  // P complete (each warpgroup reads only its own rows; one barrier is simpler)

    // O += P V.
    warpgroup_gemm(mma_o, tOrP, tOrV, acc_o);
  }

  store_output<E, kRows, D>(thr_o, acc_o, row_sum, o, p, m_block * kRows);
#endif
}

}  // namespace dcgen::attention::sm90

namespace dcgen::attention {

template <typename T, int D>
void run_flash_fwd_sm90(const FlashParams& params, cudaStream_t stream) {
  using C = sm90::Config<T, D>;
  auto kernel = &sm90::flash_fwd_sm90_kernel<T, D>;
  cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, C::kSmemBytes);
  const dim3 grid((params.seqlen_q + sm90::kRows - 1) / sm90::kRows, params.heads, params.batch);
  kernel<<<grid, sm90::kThreads, C::kSmemBytes, stream>>>(params);
}

}  // namespace dcgen::attention
