// One configuration of the portable flash-attention forward: bf16, head dim 128.
#include "attention/flash_fwd.cuh"

namespace dcgen::attention {
template void run_flash_fwd<__nv_bfloat16, 128>(const FlashParams&, cudaStream_t);
}  // namespace dcgen::attention
