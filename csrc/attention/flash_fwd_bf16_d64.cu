// One configuration of the portable flash-attention forward: bf16, head dim 64.
#include "attention/flash_fwd.cuh"

namespace dcgen::attention {
template void run_flash_fwd<__nv_bfloat16, 64>(const FlashParams&, cudaStream_t);
}  // namespace dcgen::attention
