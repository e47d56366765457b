// One configuration of the portable flash-attention forward: fp16, head dim 128.
#include "attention/flash_fwd.cuh"

namespace dcgen::attention {
template void run_flash_fwd<__half, 128>(const FlashParams&, cudaStream_t);
}  // namespace dcgen::attention
