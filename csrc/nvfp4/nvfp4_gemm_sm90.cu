// Hopper (sm_90a) NVFP4 x NVFP4 GEMM (W4A4): both operands dequantized to bf16 in the mainloop,
// bf16 wgmma with fp32 accumulation (the kernel: nvfp4_gemm_sm90.cuh). Same operands and
// scale layout as the Blackwell kernels, so dcgen::nvfp4_gemm dispatches here on sm_90.
#include "nvfp4/nvfp4_gemm_sm90.cuh"
#include "nvfp4/nvfp4_gemm.h"

namespace dcgen {

const char* nvfp4_gemm_sm90(const Nvfp4GemmArgs& args, cudaStream_t stream) {
  sm90::Sm90GemmParams p{static_cast<const uint8_t*>(args.a), static_cast<const uint8_t*>(args.sfa),
                         nullptr, static_cast<const uint8_t*>(args.b),
                         static_cast<const uint8_t*>(args.sfb), args.alpha,
                         static_cast<sm90::bf16*>(args.d), args.m, args.n, args.k};
  const sm90::Fp4Loader a_loader{p.a_fp4, p.sfa, p.m, p.k};
  return sm90::launch(p, a_loader, stream);
}

}  // namespace dcgen
