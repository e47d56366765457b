// One configuration of the warp-specialized TMA Hopper (sm_90a) flash-attention forward: bf16,
// head dim 128.
#include "attention/flash_fwd_sm90_tma.cuh"

namespace dcgen::attention {
template bool run_flash_fwd_sm90_tma<__nv_bfloat16, 128>(const FlashParams&, cudaStream_t);
}  // namespace dcgen::attention
