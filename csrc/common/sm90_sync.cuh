// Hopper pieces shared by dcgen's wgmma kernels (csrc/attention, csrc/nvfp4), which stage their
// operands in shared memory with ordinary stores (after a register prologue or dequantization)
// rather than TMA.
#pragma once

#include <cute/atom/mma_traits_sm90_gmma.hpp>
#include <cute/tensor.hpp>

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

}  // namespace dcgen::sm90
