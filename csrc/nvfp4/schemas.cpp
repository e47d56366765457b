// Op schemas of the low-precision family (FP8 / NVFP4 activation quantization). Kept apart from
// csrc/bindings.cpp so this family owns its ops; compiled in every build (C++-only included),
// so torch.ops.dcgen.* exist everywhere and only the CUDA kernels are optional.
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(dcgen, m) {
  // bf16/fp16/fp32 [M, K] -> (float8_e4m3fn [M, K], fp32 decode scales [M, ceil(K/block)]);
  // block = 0 means one scale per row. Spec: dcgen/ops/quantize_fp8.py.
  m.def("quantize_fp8(Tensor x, int block) -> (Tensor, Tensor)");
  // bf16/fp16/fp32 [M, K] + fp32 scalar decode scale -> (packed E2M1 uint8 [M, Kp/2],
  // float8_e4m3fn block scales in the 128x4 swizzled layout, flat). Spec:
  // dcgen/ops/quantize_nvfp4.py (the recipe of dcgen/quant/nvfp4.py).
  m.def("quantize_nvfp4(Tensor x, Tensor global_scale) -> (Tensor, Tensor)");
}
