// Hopper (sm_90a) NVFP4-weight x bf16-activation GEMM (W4A16): the weight dequantized to bf16 in
// the mainloop, the activation copied as is, bf16 wgmma with fp32 accumulation (the kernel:
// nvfp4_gemm_sm90.cuh). The 16-bit weight never exists in global memory.
#include "nvfp4/nvfp4_gemm_sm90.cuh"
#include "nvfp4/nvfp4_gemm.h"

namespace dcgen {

const char* nvfp4_gemm_w4a16_sm90(const Nvfp4W4A16Args& args, cudaStream_t stream) {
  sm90::Sm90GemmParams p{nullptr, nullptr, static_cast<const sm90::bf16*>(args.a),
                         static_cast<const uint8_t*>(args.b), static_cast<const uint8_t*>(args.sfb),
                         args.alpha, static_cast<sm90::bf16*>(args.d), args.m, args.n, args.k};
  const sm90::Bf16Loader a_loader{p.a_bf16, p.m, p.k};
  return sm90::launch(p, a_loader, stream);
}

}  // namespace dcgen
