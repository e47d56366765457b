// Hopper pieces shared by dcgen's wgmma kernels (csrc/attention, csrc/nvfp4), which stage their
// operands in shared memory with ordinary stores (after a register prologue or dequantization)
// rather than TMA.
#pragma once

#include <cute/atom/mma_traits_sm90_gmma.hpp>
#include <cute/tensor.hpp>
#include <cutlass/arch/barrier.h>

#include <cstdint>

namespace dcgen::sm90 {

// Generic-proxy writes to shared memory become visible to wgmma (the async proxy); follow it
// with a barrier. Same instruction as cutlass::arch::fence_view_async_shared, plus a "memory"
// clobber so the compiler cannot sink the preceding shared stores below it.
__device__ __forceinline__ void fence_async_shared() {
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
}

// acc += A B over every K block of the partitioned operands (shared-memory descriptors), as
// one wgmma batch, waited for before returning.
template <class TiledMma, class FragA, class FragB, class Acc>
__device__ __forceinline__ void warpgroup_gemm(TiledMma& mma, const FragA& a, const FragB& b,
                                               Acc& acc) {
  cute::warpgroup_fence_operand(acc);
  cute::warpgroup_arrive();
#pragma unroll
  for (int kb = 0; kb < cute::size<2>(a); ++kb) {
    cute::gemm(mma, a(cute::_, cute::_, kb), b(cute::_, cute::_, kb), acc);
  }
  cute::warpgroup_commit_batch();
  cute::warpgroup_wait<0>();
  cute::warpgroup_fence_operand(acc);
}

// The mbarriers of a TMA producer / wgmma consumer ring (the TMA kernels): full[s] completes on
// the producer's arrive_and_expect_tx plus the stage's TMA bytes, empty[s] on
// `consumer_arrivals` arrivals of the threads that read the stage. Every thread of the block
// calls it: thread 0 initialises, and the block barrier at the end makes the barriers visible
// before the roles split.
template <int kStages>
__device__ __forceinline__ void init_stage_barriers(uint64_t* full, uint64_t* empty,
                                                    int consumer_arrivals) {
  if (threadIdx.x == 0) {
#pragma unroll
    for (int s = 0; s < kStages; ++s) {
      cutlass::arch::ClusterTransactionBarrier::init(&full[s], 1);
      cutlass::arch::ClusterBarrier::init(&empty[s], consumer_arrivals);
    }
    cutlass::arch::fence_barrier_init();
  }
  __syncthreads();
}

}  // namespace dcgen::sm90
