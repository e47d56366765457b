// Op schemas of the DiT block glue (AdaLN modulation, gated residual). Kept apart from
// csrc/bindings.cpp so the family owns its ops; compiled in every build (C++-only included),
// so torch.ops.dcgen.* exist everywhere and only the CUDA kernels are optional.
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(dcgen, m) {
  // x [M, D] (rows of B sequences of rows_per_batch tokens), shift / scale [B, D] ->
  // LayerNorm(x, no affine, eps) * (1 + scale[b]) + shift[b]. Spec: dcgen/ops/modulation.py.
  m.def("adaln_modulate(Tensor x, Tensor shift, Tensor scale, int rows_per_batch, float eps) -> Tensor");
  // x, y [M, D], gate [B, D] -> x + gate[b] * y. Spec: dcgen/ops/modulation.py.
  m.def("gated_residual(Tensor x, Tensor gate, Tensor y, int rows_per_batch) -> Tensor");
  // adaln_modulate's output and its FP8 (E4M3) row quantization, as dcgen::quantize_fp8(out, 0)
  // gives it: (out [M, D], q float8_e4m3fn [M, D], q_scales fp32 [M, 1]).
  m.def("adaln_modulate_fp8(Tensor x, Tensor shift, Tensor scale, int rows_per_batch, float eps) -> (Tensor, Tensor, Tensor)");
}
