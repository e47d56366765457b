// One configuration of the warp-specialized TMA Hopper (sm_90a) flash-attention forward: fp16,
// head dim 64.
#include "attention/flash_fwd_sm90_tma.cuh"

namespace dcgen::attention {
template bool run_flash_fwd_sm90_tma<__half, 64>(const FlashParams&, cudaStream_t);
}  // namespace dcgen::attention
