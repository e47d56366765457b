// Op schemas of the low-precision family (FP8 / NVFP4 activation quantization). Kept apart from
// csrc/bindings.cpp so this family owns its ops; compiled in every build (C++-only included),
// so torch.ops.dcgen.* exist everywhere and only the CUDA kernels are optional.
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(dcgen, m) {
  // bf16/fp16/fp32 [M, K] -> (float8_e4m3fn [M, K], fp32 decode scales [M, ceil(K/block)]);
  // block = 0 means one scale per row. Spec: dcgen/ops/quantize_fp8.py.
  m.def("quantize_fp8(Tensor x, int block) -> (Tensor, Tensor)");
  // The FP8 GEMM's scale epilogue: bf16/fp16 y [M, N] (a unit-scale FP8 product), fp32 row
  // scales [M] and column scales [N], optional bias [N] -> act(y * rs * cs + bias) in y's dtype;
  // act "none" or "gelu_tanh". Spec: dcgen/ops/fp8_epilogue.py.
  m.def("fp8_scale_epilogue(Tensor y, Tensor row_scale, Tensor col_scale, Tensor? bias, str act) -> Tensor");
  // The same, written into out: y's shape and dtype, unit column stride, any row stride >= N.
  m.def(
      "fp8_scale_epilogue_into(Tensor y, Tensor row_scale, Tensor col_scale, Tensor? bias, "
      "str act, Tensor(a!) out) -> ()");
  // The same epilogue and its output's FP8 row quantization, as quantize_fp8(out, 0) gives it:
  // (out [M, N], q float8_e4m3fn [M, N], q_scales fp32 [M, 1]).
  m.def(
      "fp8_scale_epilogue_fp8(Tensor y, Tensor row_scale, Tensor col_scale, Tensor? bias, "
      "str act) -> (Tensor, Tensor, Tensor)");
  // bf16/fp16/fp32 [M, K] + fp32 scalar decode scale -> (packed E2M1 uint8 [M, Kp/2],
  // float8_e4m3fn block scales in the 128x4 swizzled layout, flat). Spec:
  // dcgen/ops/quantize_nvfp4.py (the recipe of dcgen/quant/nvfp4.py).
  m.def("quantize_nvfp4(Tensor x, Tensor global_scale) -> (Tensor, Tensor)");
  // quantize_nvfp4 fused with the SVDQuant down-projection: bf16/fp16 x [M, K], fp32 scalar
  // decode scale, optional fp32 smoothing factors [K] (x / smooth is quantized), 16-bit
  // down [r, K] -> (packed, swizzled scales as quantize_nvfp4, fp32 t = xs @ down^T [M, r]).
  // Spec: dcgen/ops/quantize_nvfp4.py (quantize_nvfp4_lowrank_reference).
  m.def(
      "quantize_nvfp4_lowrank(Tensor x, Tensor global_scale, Tensor? smooth, Tensor down) -> "
      "(Tensor, Tensor, Tensor)");
  // Block-scaled NVFP4 x NVFP4 GEMM, D [M, N] bf16 = alpha * A B^T with A, B packed E2M1
  // [rows, K/2] and swizzled E4M3 scales; alpha an fp32 device scalar. Spec:
  // dcgen/ops/nvfp4_gemm.py. CUDA kernels: CUTLASS sm_100a and sm_120a, CuTe wgmma sm_90a.
  m.def("nvfp4_gemm(Tensor a, Tensor a_scales, Tensor b, Tensor b_scales, Tensor alpha) -> Tensor");
  // W4A16: D [M, N] bf16 = alpha * A B^T with A bf16 [M, K] and B as in nvfp4_gemm. Spec:
  // dcgen/ops/nvfp4_gemm.py. CUDA kernel: Hopper sm_90a (mainloop dequantization, wgmma).
  m.def("nvfp4_gemm_w4a16(Tensor a, Tensor b, Tensor b_scales, Tensor alpha) -> Tensor");
  // Packed E2M1 uint8 [N, Kp/2] + float8_e4m3fn block scales (plain [N, Kp/16] or, swizzled,
  // the flat 128x4 layout) + fp32 scalar decode scale -> dtype [N, k] (k trims the K padding).
  // Spec: dcgen/ops/nvfp4_dequant.py. The Hopper / Ampere NVFP4Linear path.
  m.def(
      "nvfp4_dequantize(Tensor packed, Tensor scales, Tensor global_scale, int k, bool swizzled, "
      "ScalarType dtype) -> Tensor");
}
