// Arguments of the portable flash-attention forward (flash_fwd.cuh), free of torch types so the
// per-configuration .cu files compile without torch's headers (minutes saved per file).
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace dcgen::attention {

constexpr int kFlashBlockM = 64;  // query rows per CTA (the wrapper's K-prologue policy uses it)

struct FlashParams {
  const void* q = nullptr;
  const void* k = nullptr;
  const void* v = nullptr;
  void* o = nullptr;
  // Strides in elements; the last dim is contiguous and every stride is a multiple of 8 so a
  // row chunk of 8 elements is one 16-byte load.
  int64_t q_batch_stride = 0, q_head_stride = 0, q_row_stride = 0;
  int64_t k_batch_stride = 0, k_head_stride = 0, k_row_stride = 0;
  int64_t v_batch_stride = 0, v_head_stride = 0, v_row_stride = 0;
  int64_t o_batch_stride = 0, o_head_stride = 0, o_row_stride = 0;
  int batch = 0, heads = 0, seqlen_q = 0, seqlen_k = 0;
  float scale_log2 = 0.f;  // softmax scale * log2(e): the kernel exponentiates with exp2

  // Prologue, applied to Q and K rows while a tile is loaded. Null pointers switch parts off.
  const float* q_w0 = nullptr;  // RMSNorm scale (D) for tokens < norm_split
  const float* q_w1 = nullptr;  // and for the others (== q_w0 with one weight row)
  const float* k_w0 = nullptr;
  const float* k_w1 = nullptr;
  int norm_split = 0;
  float eps = 1e-6f;
  const float* q_cos = nullptr;  // RoPE tables (S, D) fp32, row = token position
  const float* q_sin = nullptr;
  const float* k_cos = nullptr;  // the same tables, or null when K arrives already rotated
  const float* k_sin = nullptr;

  const bool* key_padding_mask = nullptr;  // (B, seqlen_k): true = attend
  int64_t mask_batch_stride = 0;

  // Fragment loads: ldmatrix (default) or plain shared loads (the first, simplest variant;
  // kept selectable with DCGEN_ATTENTION_PLAIN_LOADS=1 so a GPU run can check one against the
  // other).
  bool plain_loads = false;
  // The TMA Hopper kernel only: ping-pong the two consumer warpgroups with named barriers so
  // one's MMAs run while the other does its softmax (DCGEN_ATTENTION_PINGPONG=0 switches it off,
  // for a GPU run to compare or to rule it out).
  bool pingpong = true;
};

// T is __nv_bfloat16 or __half; D is 64 or 128. One explicit instantiation per .cu file.
template <typename T, int D>
void run_flash_fwd(const FlashParams& params, cudaStream_t stream);

// The Hopper (sm_90a, wgmma) kernel of flash_fwd_sm90.cuh: the same parameters and results
// (plain_loads is ignored). Built with the CUTLASS/CuTe headers only (DCGEN_ATTENTION_SM90).
template <typename T, int D>
void run_flash_fwd_sm90(const FlashParams& params, cudaStream_t stream);

// The warp-specialized TMA Hopper kernel of flash_fwd_sm90_tma.cuh: the same results, with K
// arriving prepared (k_w0 and k_cos null; the wrapper runs K's prologue first).
template <typename T, int D>
bool run_flash_fwd_sm90_tma(const FlashParams& params, cudaStream_t stream);

}  // namespace dcgen::attention
