// dcgen._C: op schemas (TORCH_LIBRARY) and the pybind11 module that reports build facts.
// Kernels register their implementations per dispatch key in their own files
// (TORCH_LIBRARY_IMPL), so a CPU-only build simply has no CUDA kernels.
#include <pybind11/pybind11.h>
#include <torch/library.h>

#include "build_info.h"

TORCH_LIBRARY(dcgen, m) {
  // RMSNorm over dim 1 with fp32 statistics; spec: dcgen/ops/channel_rms_norm.py.
  m.def("channel_rms_norm(Tensor x, Tensor? weight, Tensor? bias, float eps) -> Tensor");
  // ReLU linear attention of interleaved (B, heads, 3d, N) qkv; spec: dcgen/ops/linear_attention.py.
  m.def("relu_linear_attention(Tensor qkv, float eps) -> Tensor");
  // channel_rms_norm then act ('none'|'relu'|'silu') then + residual, one rounding; same spec file.
  m.def("channel_rms_norm_fused(Tensor x, Tensor? weight, Tensor? bias, Tensor? residual, str act, float eps) -> Tensor");
  // the same written into out (x's shape, dtype and layout; may be x or the residual)
  m.def("channel_rms_norm_fused_out(Tensor x, Tensor? weight, Tensor? bias, Tensor? residual, str act, float eps, Tensor(a!) out) -> ()");
  // DC-AE up/down block main path + shortcut in one pass; spec: dcgen/ops/block_shortcuts.py.
  m.def("up_block_shortcut(Tensor y, Tensor x, bool shuffle_y) -> Tensor");
  // the up block's with y's conv bias added, written into out (a row band of the full map, say)
  m.def("up_block_shortcut_out(Tensor y, Tensor x, bool shuffle_y, Tensor? bias, Tensor(a!) out) -> ()");
  m.def("down_block_shortcut(Tensor y, Tensor x, bool unshuffle_y) -> Tensor");
  // GLUMBConv depthwise 3x3 + SiLU gate; spec: dcgen/ops/glu_depthwise.py.
  // expand_bias: x is the expand conv's output without its bias; silu(x + expand_bias), rounded
  // to x's dtype, is the depthwise input
  m.def("glu_depthwise_conv(Tensor x, Tensor weight, Tensor? bias, Tensor? expand_bias=None) -> Tensor");
  // A conv output's bias, act ('none'|'relu'|'silu') and residual in one pass, written into out
  // (which may be x or the residual); spec: dcgen/ops/bias_act.py.
  m.def("bias_act_(Tensor(a!) out, Tensor x, Tensor bias, str act, Tensor? residual) -> ()");
}

namespace py = pybind11;

PYBIND11_MODULE(_C, m) {
  m.doc() = "dcgen compiled kernels (ops live in torch.ops.dcgen)";
  m.def("build_info", [] {
    py::dict d;
    d["torch_version"] = DCGEN_BUILT_TORCH_VERSION;
    d["cuda"] = static_cast<bool>(DCGEN_BUILT_WITH_CUDA);
    d["cuda_version"] = DCGEN_BUILT_CUDA_VERSION;
    d["cuda_archs"] = DCGEN_BUILT_CUDA_ARCHS;
    d["kernels"] = DCGEN_BUILT_KERNELS;
    d["cutlass_include"] = DCGEN_BUILT_CUTLASS_INCLUDE;
    d["cxx_compiler"] = DCGEN_BUILT_CXX_COMPILER;
    return d;
  });
}
