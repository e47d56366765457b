// The plain C++ face of the NVFP4 GEMMs (CUTLASS on Blackwell, CuTe wgmma on Hopper): no torch
// and no CUTLASS types, so the CUTLASS translation units and the torch binding never include
// each other's headers.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>

namespace dcgen {

// D[M, N] (bf16, row-major) = alpha * sum_k (A[m, k] * SFA) * (B[n, k] * SFB), fp32 accumulate.
// a: packed E2M1 [M, K/2], b: packed E2M1 [N, K/2] (both K-major, like nn.Linear.weight);
// sfa / sfb: E4M3 block scales in the 128x4 swizzled layout; alpha: device fp32 scalar (the
// product of the two global decode scales). K % 32 == 0, N % 8 == 0.
struct Nvfp4GemmArgs {
  const void* a;
  const void* b;
  const void* sfa;
  const void* sfb;
  const float* alpha;
  void* d;
  int m, n, k;
};

// Workspace bytes the sm_100a kernel needs for these sizes.
size_t nvfp4_gemm_sm100_workspace(const Nvfp4GemmArgs& args);
// Returns an error message, or nullptr on success.
const char* nvfp4_gemm_sm100(const Nvfp4GemmArgs& args, void* workspace, cudaStream_t stream);

// The same GEMM for GeForce Blackwell (sm_120a, nvfp4_gemm_sm120.cu): same operands and layouts.
size_t nvfp4_gemm_sm120_workspace(const Nvfp4GemmArgs& args);
const char* nvfp4_gemm_sm120(const Nvfp4GemmArgs& args, void* workspace, cudaStream_t stream);

// Hopper (sm_90a, nvfp4_gemm_sm90.cu): the same GEMM with both operands dequantized to bf16 in
// the mainloop and bf16 wgmma (exact products; no workspace). K % 32 == 0.
const char* nvfp4_gemm_sm90(const Nvfp4GemmArgs& args, cudaStream_t stream);

// W4A16 on Hopper (nvfp4_gemm_w4a16_sm90.cu): D [M, N] bf16 = alpha * A B^T with A bf16 [M, K]
// row-major (16-byte aligned rows) and B, sfb as above. K % 32 == 0.
struct Nvfp4W4A16Args {
  const void* a;
  const void* b;
  const void* sfb;
  const float* alpha;
  void* d;
  int m, n, k;
};
const char* nvfp4_gemm_w4a16_sm90(const Nvfp4W4A16Args& args, cudaStream_t stream);

// The same product on Hopper with the weight as wgmma's register operand, the activation by TMA
// and a producer warp (nvfp4_gemm_rs_sm90.cu): the default sm_90a kernel of both ops (W4A4
// expands its activation to bf16 first). K % 32 == 0.
const char* nvfp4_gemm_rs_sm90(const Nvfp4W4A16Args& args, cudaStream_t stream);

}  // namespace dcgen
