// One configuration of the Hopper (sm_90a) flash-attention forward: fp16, head dim 64.
#include "attention/flash_fwd_sm90.cuh"

namespace dcgen::attention {
template void run_flash_fwd_sm90<__half, 64>(const FlashParams&, cudaStream_t);
}  // namespace dcgen::attention
