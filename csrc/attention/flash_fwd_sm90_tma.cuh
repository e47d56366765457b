// Hopper (sm_90a) flash-attention forward, warp-specialized: a producer warp streams K and V
// tiles with TMA into a ring of shared-memory stages while two consumer warpgroups run the
// wgmma + online-softmax loop of flash_fwd_sm90.cuh. Spec: dcgen/ops/attention.py.
//
// Why a second Hopper kernel: the first one (flash_fwd_sm90.cuh) loads every K / V tile through
// registers with all threads and then waits, so load latency, the K prologue and the MMAs never
// overlap; on the H200 it ran at about 0.26x of cuDNN (session-7 run). Here:
//   - K and V arrive by TMA (one elected thread issues them; mbarriers with transaction counts
//     say when a stage is full, consumer arrivals say when it is free again), kStages deep, so
//     the next tiles load while the current one is multiplied; 128 x 128 tiles, with the
//     registers moved from the producer warpgroup to the consumers (setmaxnreg);
//   - P stays in registers: the P V product is an RS wgmma (A from registers), so there is no
//     shared-memory round trip and no CTA-wide barrier inside the loop. Each tile's P V is
//     issued right after the next tile's Q K^T, and that tile's softmax runs while P V is on
//     the tensor cores; the two consumer warpgroups also take turns issuing (ping-pong). Both
//     are FlashAttention-3's schedule;
//   - K must arrive ready: the wrapper runs K's RMSNorm + RoPE once up front (the standalone
//     qk_norm_rope kernel) when they are on. Q's prologue stays fused: each CTA loads its Q
//     tile once, through registers (load_rows), as the first kernel does.
//
// Layout facts used below (CuTe's GMMA layouts, PTX ISA "wgmma register fragments"):
//   - the fp32 accumulator of an m64nN wgmma holds, for thread t of the warpgroup, value i at
//     row 16 (t / 32) + (t % 32) / 4 + 8 ((i / 2) % 2) and column 2 (t % 4) + (i % 2) + 8 (i / 4);
//   - the register A operand of an m64nNk16 wgmma (16-bit) holds value v = a + 2 b + 4 c at row
//     16 (t / 32) + (t % 32) / 4 + 8 b and column 2 (t % 4) + a + 8 c of its 16-wide K block.
//   So k block j of P (keys 16 j .. 16 j + 15) is accumulator values 8 j .. 8 j + 7 in order:
//   P's A fragment is the S accumulator converted element by element, no shuffles.
//
// Sequence tails: TMA zero-fills rows past seqlen_k (scores are masked to -inf there anyway,
// and zero V rows keep 0 * V finite); Q rows past seqlen_q are zero and never stored.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

// cute/tensor.hpp first: the TMA traits need Copy_Atom declared.
#include <cute/tensor.hpp>
#include <cute/atom/copy_traits_sm90_tma.hpp>
#include <cute/atom/mma_traits_sm90_gmma.hpp>
#include <cutlass/arch/barrier.h>
#include <cutlass/arch/reg_reconfig.h>
#include <cutlass/numeric_types.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "attention/flash_fwd.cuh"
#include "attention/flash_fwd_sm90.cuh"
#include "attention/flash_params.h"
#include "common/sm90_sync.cuh"

namespace dcgen::attention::sm90_tma {

using namespace cute;
using dcgen::sm90::fence_async_shared;

constexpr int kRows = 128;               // query rows per CTA: 64 per consumer warpgroup
constexpr int kKeys = 128;               // key rows per stage (FlashAttention-3's 128 x 128)
constexpr int kConsumerThreads = 256;    // two consumer warpgroups (threads 0 .. 255)
constexpr int kThreads = kConsumerThreads + 128;  // + the producer warpgroup (one warp works)
// Register split (setmaxnreg): 384 threads launch with 168 each; the producer warpgroup gives
// most of its share to the consumers, whose S (64), P (32) and O (64 at D = 128) fragments
// would spill at 168 (ptxas: 192 bytes of spill stores without the split, none with it).
// 128 x 24 + 256 x 240 = 64,512 of the SM's 65,536.
constexpr int kProducerRegs = 24;
constexpr int kConsumerRegs = 240;

template <typename T, int D>
struct Config {
  using E = typename sm90::CuteElement<T>::type;
  // Three stages: K and V of a stage share one pair of barriers and a stage is free only
  // after its P V, which round n + 1 waits for, so with two stages tile n + 1 could not load
  // ahead of its use. One CTA per SM: Q + 3 stages of K and V is 32 + 3 x 64 KiB = 225 KiB at
  // D = 128 (the limit is 227 KiB), 16 + 3 x 32 KiB at D = 64.
  static constexpr int kStages = 3;
  using SmemQ = decltype(tile_to_shape(GMMA::Layout_K_SW128_Atom<E>{},
                                       Shape<Int<kRows>, Int<D>>{}));
  using SmemK = decltype(tile_to_shape(GMMA::Layout_K_SW128_Atom<E>{},
                                       Shape<Int<kKeys>, Int<D>, Int<kStages>>{}));
  // V as the B operand of P V: (N = D, K = keys), D contiguous = MN-major. The 64 x 8 swizzle
  // atoms are stacked along the keys first, so one 64-column slab of D holds all the stage's
  // keys contiguously and TMA fills it with one box of 64 x kKeys (D-first stacking would
  // split the tile into 64 x 8 boxes of 1 KiB).
  using SmemV = decltype(tile_to_shape(GMMA::Layout_MN_SW128_Atom<E>{},
                                       Shape<Int<D>, Int<kKeys>, Int<kStages>>{},
                                       Step<_2, _1, _3>{}));
  using MmaS = decltype(make_tiled_mma(
      SM90::GMMA::ss_op_selector<E, E, float, Shape<_64, Int<kKeys>, Int<D>>, GMMA::Major::K,
                                 GMMA::Major::K>(),
      Layout<Shape<_2, _1, _1>>{}));
  // P from registers (K-major by construction), V from shared memory.
  using MmaO = decltype(make_tiled_mma(
      SM90::GMMA::rs_op_selector<E, E, float, Shape<_64, Int<D>, Int<kKeys>>, GMMA::Major::K,
                                 GMMA::Major::MN>(),
      Layout<Shape<_2, _1, _1>>{}));
  static constexpr int kStageBytes = 2 * kKeys * D * int(sizeof(E));  // K + V tile
  static constexpr int kQElems = int(cosize_v<SmemQ>);
  static constexpr int kKElems = int(cosize_v<SmemK>);
  static constexpr int kVElems = int(cosize_v<SmemV>);
  // Q, K, V (each a multiple of 1 KiB, so every tile starts 1 KiB aligned for the swizzle),
  // then the 2 x kStages mbarriers; + 1 KiB to align the dynamic shared-memory base.
  static constexpr int kBarrierOffset = (kQElems + kKElems + kVElems) * 2;
  static constexpr int kSmemBytes = kBarrierOffset + 2 * kStages * 8 + 1024;
  static_assert(kQElems * 2 % 1024 == 0 && kKElems * 2 % 1024 == 0, "1 KiB aligned tiles");
  static_assert(kSmemBytes <= 227 * 1024, "over Hopper's 227 KiB of shared memory per block");
};

// The global views the TMA descriptors are built from (host) and indexed with (device): K as
// (seqlen_k, D, heads, batch) and V as (D, seqlen_k, heads, batch), D contiguous in both.
template <typename E, int D>
__host__ __device__ auto k_view(const FlashParams& p) {
  return make_tensor(make_gmem_ptr(static_cast<const E*>(p.k)),
                     make_shape(p.seqlen_k, Int<D>{}, p.heads, p.batch),
                     make_stride(p.k_row_stride, _1{}, p.k_head_stride, p.k_batch_stride));
}

template <typename E, int D>
__host__ __device__ auto v_view(const FlashParams& p) {
  return make_tensor(make_gmem_ptr(static_cast<const E*>(p.v)),
                     make_shape(Int<D>{}, p.seqlen_k, p.heads, p.batch),
                     make_stride(_1{}, p.v_row_stride, p.v_head_stride, p.v_batch_stride));
}

template <typename T, int D, class TmaK, class TmaV>
__global__ void __launch_bounds__(kThreads, 1)
    flash_fwd_sm90_tma_kernel(const __grid_constant__ FlashParams p,
                              const __grid_constant__ TmaK tma_k,
                              const __grid_constant__ TmaV tma_v) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900 && defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using C = Config<T, D>;
  using E = typename C::E;
  using FullBarrier = cutlass::arch::ClusterTransactionBarrier;
  using EmptyBarrier = cutlass::arch::ClusterBarrier;
  constexpr int kStages = C::kStages;

  extern __shared__ unsigned char smem_raw[];
  unsigned char* smem = reinterpret_cast<unsigned char*>(
      (reinterpret_cast<uintptr_t>(smem_raw) + 1023) & ~uintptr_t(1023));
  E* base = reinterpret_cast<E*>(smem);
  Tensor sQ = make_tensor(make_smem_ptr(base), typename C::SmemQ{});
  Tensor sK = make_tensor(make_smem_ptr(base + C::kQElems), typename C::SmemK{});
  Tensor sV = make_tensor(make_smem_ptr(base + C::kQElems + C::kKElems), typename C::SmemV{});
  uint64_t* full = reinterpret_cast<uint64_t*>(smem + C::kBarrierOffset);  // TMA landed
  uint64_t* empty = full + kStages;  // all consumer threads are done reading the stage

  const int tid = threadIdx.x;
  const int m_block = blockIdx.x, h = blockIdx.y, b = blockIdx.z;
  const auto [q, k_unused, v_unused, o, mask] = head_slices<T>(p, b, h);
  (void)k_unused;
  (void)v_unused;
  const int n_tiles = (p.seqlen_k + kKeys - 1) / kKeys;

  dcgen::sm90::init_stage_barriers<kStages>(full, empty, kConsumerThreads);  // the roles split here

  if (tid >= kConsumerThreads) {
    cutlass::arch::warpgroup_reg_dealloc<kProducerRegs>();  // the whole warpgroup, first
    // Producer: one thread issues every TMA load (the first ones while the consumers load Q);
    // the rest of the warpgroup has nothing to do.
    if (tid == kConsumerThreads) {
      Tensor mK = tma_k.get_tma_tensor(shape(k_view<E, D>(p)));
      Tensor mV = tma_v.get_tma_tensor(shape(v_view<E, D>(p)));
      Tensor gK = local_tile(mK(_, _, h, b), Shape<Int<kKeys>, Int<D>>{},
                             make_coord(_, _0{}));  // (kKeys, D, n_tiles)
      Tensor gV = local_tile(mV(_, _, h, b), Shape<Int<D>, Int<kKeys>>{},
                             make_coord(_0{}, _));  // (D, kKeys, n_tiles)
      auto [tKgK, tKsK] = tma_partition(tma_k, Int<0>{}, Layout<_1>{}, group_modes<0, 2>(sK),
                                        group_modes<0, 2>(gK));
      auto [tVgV, tVsV] = tma_partition(tma_v, Int<0>{}, Layout<_1>{}, group_modes<0, 2>(sV),
                                        group_modes<0, 2>(gV));
      for (int n = 0; n < n_tiles; ++n) {
        const int s = n % kStages;
        // Reuse of stage s: wait until the consumers released tile n - kStages (phase
        // n / kStages - 1 of its empty barrier).
        if (n >= kStages) EmptyBarrier::wait(&empty[s], (n / kStages - 1) & 1);
        FullBarrier::arrive_and_expect_tx(&full[s], C::kStageBytes);
        copy(tma_k.with(full[s]), tKgK(_, n), tKsK(_, s));
        copy(tma_v.with(full[s]), tVgV(_, n), tVsV(_, s));
      }
    }
    return;
  }

  cutlass::arch::warpgroup_reg_alloc<kConsumerRegs>();
  // Q tile with its prologue, by the consumer threads (load_rows indexes by threadIdx.x), then
  // a barrier of the 256 consumer threads only (the producer does not take part).
  load_rows<T, D, kRows, kConsumerThreads>([&](int r, int col) { return &sQ(r, col); }, q,
                                           p.q_row_stride, m_block * kRows, p.seqlen_q, p.q_w0,
                                           p.q_w1, p.norm_split, p.eps, p.q_cos, p.q_sin);
  fence_async_shared();  // Q's generic-proxy stores become visible to wgmma
  cutlass::arch::NamedBarrier::arrive_and_wait(kConsumerThreads, 0);

  // Consumers: warpgroup tid / 128 owns query rows [64 (tid / 128), + 64).
  typename C::MmaS mma_s;
  typename C::MmaO mma_o;
  auto thr_s = mma_s.get_slice(tid);
  auto thr_o = mma_o.get_slice(tid);
  Tensor tSrQ = thr_s.make_fragment_A(thr_s.partition_A(sQ));  // descriptors
  Tensor tSrK = thr_s.make_fragment_B(thr_s.partition_B(sK));  // (MMA, N, K, stage)
  Tensor tOrV = thr_o.make_fragment_B(thr_o.partition_B(sV));  // (MMA, N, K, stage)
  Tensor tScS = thr_s.partition_C(make_identity_tensor(Shape<Int<kRows>, Int<kKeys>>{}));
  Tensor acc_o = partition_fragment_C(mma_o, Shape<Int<kRows>, Int<D>>{});
  Tensor acc_s = partition_fragment_C(mma_s, Shape<Int<kRows>, Int<kKeys>>{});
  // P as the register A operand: ((2, 2, 2), 1, kKeys / 16) values, compact, in S's order.
  Tensor tOrP = make_tensor<E>(partition_shape_A(mma_o, Shape<Int<kRows>, Int<kKeys>>{}));
  static_assert(decltype(size(acc_s))::value == decltype(size(tOrP))::value,
                "P's A fragment is the S accumulator, value for value");
  clear(acc_o);

  float row_max[2] = {-INFINITY, -INFINITY};
  float row_sum[2] = {0.f, 0.f};  // per thread (its columns); reduced over the quad at the end

  // Round n (1 <= n < n_tiles) issues two wgmma groups: S_n = Q K_n^T, then P_{n-1} V_{n-1}
  // (P waited in registers since the last softmax). It waits for the first only and runs S_n's
  // softmax while the tensor cores still work on P V (FlashAttention-3's intra-warpgroup
  // overlap); then it waits for P V, hands tile n - 1's stage back, rescales O and turns S_n
  // into P_n. Round 0 (S_0 only) and a last round (the last P V only) are peeled off the loop:
  // a wgmma under a data-dependent branch makes ptxas serialize every wgmma of the kernel
  // (its warning C7520). With ping-pong on, a warpgroup issues its groups only after the other
  // one has issued its own (named barrier kSched + wg, 256 arrivals: this warpgroup's sync
  // plus the other's arrive), so the tensor cores work for one warpgroup while the other is in
  // its softmax.
  const int wg = tid / 128;
  constexpr int kSched = 1;  // named barriers 1, 2 (0 is the consumers' Q barrier)
  const bool pingpong = p.pingpong;
  if (pingpong && wg == 1) {
    cutlass::arch::NamedBarrier::arrive(kConsumerThreads, kSched);  // warpgroup 0 goes first
  }
  auto my_turn = [&]() {
    if (pingpong) cutlass::arch::NamedBarrier::arrive_and_wait(kConsumerThreads, kSched + wg);
  };
  auto their_turn = [&]() {
    if (pingpong) cutlass::arch::NamedBarrier::arrive(kConsumerThreads, kSched + 1 - wg);
  };
  auto issue_s = [&](int s) {  // S = Q K^T from stage s (after clear(acc_s) and the fences)
#pragma unroll
    for (int kb = 0; kb < size<2>(tSrQ); ++kb) {
      cute::gemm(mma_s, tSrQ(_, _, kb), tSrK(_, _, kb, s), acc_s);
    }
  };
  auto issue_pv = [&](int s) {  // O += P V with V from stage s
#pragma unroll
    for (int kb = 0; kb < size<2>(tOrP); ++kb) {
      cute::gemm(mma_o, tOrP(_, _, kb), tOrV(_, _, kb, s), acc_o);
    }
  };
  // Scale into the exp2 domain, mask (sequence tail, key padding), online softmax in fp32; the
  // exponentials stay in acc_s (P V may still be reading tOrP). Returns O's rescale factors.
  // The key checks run only on tiles that need them (the last one, or all of them under a
  // key-padding mask), behind one tile-wide branch: inside the element loop they compiled to a
  // branch and a convergence barrier per element on every tile.
  auto softmax = [&](int n, float (&alpha)[2]) {
    const int n0 = n * kKeys;
#pragma unroll
    for (int i = 0; i < size(acc_s); ++i) acc_s(i) *= p.scale_log2;
    if (mask != nullptr || n0 + kKeys > p.seqlen_k) {
#pragma unroll
      for (int i = 0; i < size(acc_s); ++i) {
        const int key = n0 + get<1>(tScS(i));
        if (key >= p.seqlen_k || (mask != nullptr && !mask[key])) acc_s(i) = -INFINITY;
      }
    }
    float tile_max[2] = {row_max[0], row_max[1]};
#pragma unroll
    for (int i = 0; i < size(acc_s); ++i) {
      tile_max[(i / 2) % 2] = fmaxf(tile_max[(i / 2) % 2], acc_s(i));
    }
    float shift[2];
    sm90::update_row_stats(tile_max, row_max, row_sum, alpha, shift);
#pragma unroll
    for (int i = 0; i < size(acc_s); ++i) {
      const float e = exp2_approx(acc_s(i) - shift[(i / 2) % 2]);
      row_sum[(i / 2) % 2] += e;
      acc_s(i) = e;
    }
  };
  // O holds P_0 V_0 .. P_{n-1} V_{n-1}: bring it to tile n's max; P_n for the next round.
  auto rescale_and_make_p = [&](const float (&alpha)[2]) {
#pragma unroll
    for (int i = 0; i < size(acc_o); ++i) acc_o(i) *= alpha[(i / 2) % 2];
#pragma unroll
    for (int i = 0; i < size(acc_s); ++i) tOrP(i) = E(acc_s(i));  // rounded to T (reference)
  };

  // Round 0: S_0 only.
  {
    float alpha[2];
    FullBarrier::wait(&full[0], 0);
    my_turn();
    clear(acc_s);
    cute::warpgroup_fence_operand(acc_s);
    cute::warpgroup_arrive();
    issue_s(0);
    cute::warpgroup_commit_batch();
    their_turn();
    cute::warpgroup_wait<0>();
    cute::warpgroup_fence_operand(acc_s);
    softmax(0, alpha);
    rescale_and_make_p(alpha);
  }
  for (int n = 1; n < n_tiles; ++n) {
    const int s = n % kStages;
    const int prev = (n - 1) % kStages;  // the stage of tile n - 1
    float alpha[2];
    FullBarrier::wait(&full[s], (n / kStages) & 1);
    my_turn();
    clear(acc_s);
    cute::warpgroup_fence_operand(acc_o);
    cute::warpgroup_fence_operand(acc_s);
    cute::warpgroup_fence_operand(tOrP);
    cute::warpgroup_arrive();
    issue_s(s);
    cute::warpgroup_commit_batch();  // group 1: S_n
    issue_pv(prev);
    cute::warpgroup_commit_batch();  // group 2: P_{n-1} V_{n-1}
    their_turn();
    cute::warpgroup_wait<1>();  // S_n is complete; P V may still run (acc_o, tOrP untouched)
    cute::warpgroup_fence_operand(acc_s);
    softmax(n, alpha);
    cute::warpgroup_wait<0>();  // P_{n-1} V_{n-1} is complete
    cute::warpgroup_fence_operand(acc_o);
    cute::warpgroup_fence_operand(tOrP);
    EmptyBarrier::arrive(&empty[prev]);  // tile n - 1 fully read
    rescale_and_make_p(alpha);
  }
  // Last round: the last P V. Warpgroup 1 skips its arrive here: warpgroup 0 does not sync
  // again, and a barrier must not be left half-arrived at exit.
  {
    const int last = (n_tiles - 1) % kStages;
    my_turn();
    cute::warpgroup_fence_operand(acc_o);
    cute::warpgroup_fence_operand(tOrP);
    cute::warpgroup_arrive();
    issue_pv(last);
    cute::warpgroup_commit_batch();
    if (wg == 0) their_turn();
    cute::warpgroup_wait<0>();
    cute::warpgroup_fence_operand(acc_o);
    EmptyBarrier::arrive(&empty[last]);  // not awaited by anyone; keeps the counts whole
  }

  sm90::store_output<E, kRows, D>(thr_o, acc_o, row_sum, o, p, m_block * kRows);
#endif
}

}  // namespace dcgen::attention::sm90_tma

namespace dcgen::attention {

// K must carry no prologue here (p.k_w0 and p.k_cos null): the wrapper prepares it first.
// Returns false, launching nothing, when the build cannot run this kernel (the register count
// below); the caller then takes the wgmma kernel.
template <typename T, int D>
bool run_flash_fwd_sm90_tma(const FlashParams& params, cudaStream_t stream) {
  using namespace cute;
  using C = sm90_tma::Config<T, D>;
  using E = typename C::E;
  // Descriptors for this call's K and V (a few microseconds of host work; the tensors change
  // with every call).
  auto tma_k = make_tma_atom(SM90_TMA_LOAD{}, sm90_tma::k_view<E, D>(params),
                             typename C::SmemK{}(_, _, 0),
                             Shape<Int<sm90_tma::kKeys>, Int<D>>{});
  auto tma_v = make_tma_atom(SM90_TMA_LOAD{}, sm90_tma::v_view<E, D>(params),
                             typename C::SmemV{}(_, _, 0),
                             Shape<Int<D>, Int<sm90_tma::kKeys>>{});
  auto kernel = &sm90_tma::flash_fwd_sm90_tma_kernel<T, D, decltype(tma_k), decltype(tma_v)>;
  // setmaxnreg.inc waits for registers that setmaxnreg.dec released: the consumers get their
  // 240 only if the launch allocated 168 per thread (ptxas's count for this kernel today). If a
  // change ever made ptxas allocate fewer, the kernel would hang; refuse to launch instead.
  static const int regs = [&] {
    cudaFuncAttributes attr{};
    return cudaFuncGetAttributes(&attr, kernel) == cudaSuccess ? attr.numRegs : -1;
  }();
  constexpr int kProducerThreads = sm90_tma::kThreads - sm90_tma::kConsumerThreads;
  constexpr int kNeeded = (kProducerThreads * sm90_tma::kProducerRegs +
                           sm90_tma::kConsumerThreads * sm90_tma::kConsumerRegs) /
                          sm90_tma::kThreads;
  if (regs >= 0 && regs < kNeeded) return false;  // the caller warns and takes wgmma
  // Per call, not once: the shared-memory opt-in belongs to the current device.
  cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, C::kSmemBytes);
  const dim3 grid((params.seqlen_q + sm90_tma::kRows - 1) / sm90_tma::kRows, params.heads,
                  params.batch);
  kernel<<<grid, sm90_tma::kThreads, C::kSmemBytes, stream>>>(params, tma_k, tma_v);
  return true;
}

}  // namespace dcgen::attention
