// Hopper (sm_90a) NVFP4-weight GEMM, weight as the register operand (nvfp4_gemm_rs_sm90.cuh):
// D [M, N] bf16 = alpha * A W^T with A bf16 [M, K]. dcgen::nvfp4_gemm_w4a16 calls it directly,
// dcgen::nvfp4_gemm (W4A4) after expanding its NVFP4 activation to bf16.
#include "nvfp4/nvfp4_gemm.h"
#include "nvfp4/nvfp4_gemm_rs_sm90.cuh"

namespace dcgen {

const char* nvfp4_gemm_rs_sm90(const Nvfp4W4A16Args& args, cudaStream_t stream) {
  using namespace cute;
  namespace k = sm90_rs;
  if (args.m == 0 || args.n == 0) return nullptr;
  if (args.k % 32 != 0) return "the sm_90a NVFP4 GEMM needs K % 32 == 0";
  // Descriptor for this call's activation (a few microseconds of host work: it changes with
  // every call). Rows past M and K past the end read as zeros.
  const auto* a = static_cast<const k::bf16*>(args.a);
  auto tma_b = make_tma_atom(SM90_TMA_LOAD{}, k::activation_view(a, args.m, args.k),
                             k::SmemLayoutB{}(_, _, 0), Shape<Int<k::kTileM>, Int<k::kBK>>{});
  auto kernel = &k::nvfp4_gemm_rs_sm90_kernel<decltype(tma_b)>;
  // setmaxnreg.inc waits for registers that setmaxnreg.dec released: the consumers get their
  // 232 only if the launch allocated 168 per thread. If ptxas ever allocated fewer, the kernel
  // would hang; refuse instead.
  static const int regs = [&] {
    cudaFuncAttributes attr{};
    return cudaFuncGetAttributes(&attr, kernel) == cudaSuccess ? attr.numRegs : -1;
  }();
  constexpr int kNeeded = ((k::kThreads - k::kConsumerThreads) * k::kProducerRegs +
                           k::kConsumerThreads * k::kConsumerRegs) /
                          k::kThreads;
  if (regs >= 0 && regs < kNeeded) {
    return "the sm_90a register-operand NVFP4 GEMM was compiled with too few registers per thread "
           "for its register split; set DCGEN_NVFP4_SM90_KERNEL=mainloop";
  }
  // Per call, not once: the shared-memory opt-in belongs to the current device.
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, k::kSmemBytes);
  if (err != cudaSuccess) return cudaGetErrorString(err);
  const int k_tiles = (args.k + k::kBK - 1) / k::kBK;
  const k::Params p{static_cast<const uint8_t*>(args.b), static_cast<const uint8_t*>(args.sfb), args.alpha,
                    static_cast<k::bf16*>(args.d), args.m, args.n, args.k, k_tiles + (k_tiles & 1)};
  const dim3 grid((args.n + k::kTileN - 1) / k::kTileN, (args.m + k::kTileM - 1) / k::kTileM);
  kernel<<<grid, k::kThreads, k::kSmemBytes, stream>>>(p, tma_b);
  err = cudaGetLastError();
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

}  // namespace dcgen
