// Channel RMSNorm shared between the CPU and CUDA implementations: argument checks and the
// (outer, channels, inner) view of the input. Spec: dcgen/ops/channel_rms_norm.py.
#pragma once

#include <ATen/core/Tensor.h>  // not ATen/ATen.h: every op's header, minutes of nvcc time
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>

#include <optional>
#include <string_view>

#include "dcae/elementwise.h"

namespace dcgen {

// How the kernels walk the tensor. NCHW-contiguous: `outer` images, channel stride `inner`
// (spatial size). channels_last: `outer` pixels, each a contiguous row of `channels`.
struct ChannelNormLayout {
  at::Tensor x;  // the input, made dense in one of the two layouts
  int64_t outer = 0;
  int64_t channels = 0;
  int64_t inner = 0;
  bool rows = false;  // channels_last: one contiguous row of channels per pixel
};

inline ChannelNormLayout channel_norm_layout(const at::Tensor& input) {
  TORCH_CHECK(input.dim() >= 2, "dcgen::channel_rms_norm: expected x with at least 2 dims (N, C, ...), got ",
              input.dim(), " dims");
  TORCH_CHECK(input.scalar_type() == at::kFloat || input.scalar_type() == at::kHalf ||
                  input.scalar_type() == at::kBFloat16,
              "dcgen::channel_rms_norm: expected x of dtype float32, float16 or bfloat16, got ",
              input.scalar_type());
  ChannelNormLayout l;
  l.channels = input.size(1);
  const auto mf = input.dim() == 4   ? at::MemoryFormat::ChannelsLast
                  : input.dim() == 5 ? at::MemoryFormat::ChannelsLast3d
                                     : at::MemoryFormat::Contiguous;
  // Channels-last input (dense, or a strided view such as a band of rows of an NHWC batch,
  // which suggest_memory_format still reports as channels-last) keeps its layout: the "rows"
  // kernels, at most one copy into dense NHWC, and an NHWC output, instead of a round trip
  // through NCHW that the next channels-last conv would undo.
  const bool channels_last =
      mf != at::MemoryFormat::Contiguous && !input.is_contiguous() &&
      (input.is_contiguous(mf) || input.suggest_memory_format() == mf);
  if (channels_last) {
    l.x = input.contiguous(mf);
    l.rows = true;
    l.outer = l.channels == 0 ? 0 : input.numel() / l.channels;
    l.inner = 1;
  } else {
    l.x = input.contiguous();
    l.outer = input.size(0);
    l.inner = (l.outer * l.channels) == 0 ? 0 : input.numel() / (l.outer * l.channels);
  }
  return l;
}

// Weight / bias as contiguous fp32 on x's device (they are tiny; the kernels read fp32).
inline at::Tensor channel_param(const std::optional<at::Tensor>& p, const at::Tensor& x,
                                int64_t channels, const char* what) {
  if (!p.has_value() || !p->defined()) return at::Tensor();
  TORCH_CHECK(p->dim() == 1 && p->size(0) == channels, "dcgen::channel_rms_norm: expected ", what,
              " of shape (", channels, "), got ", p->sizes());
  TORCH_CHECK(p->device() == x.device(), "dcgen::channel_rms_norm: ", what, " is on ", p->device(),
              " but x is on ", x.device());
  return p->to(at::kFloat).contiguous();
}

// `t` (the residual or out, named `what` in errors of `op`) has x's shape, dtype and device.
inline void check_like_x(const at::Tensor& t, const at::Tensor& input, const char* op, const char* what) {
  TORCH_CHECK(t.sizes() == input.sizes(), op, ": expected ", what, " of shape ", input.sizes(),
              " (x's), got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == input.scalar_type(), op, ": expected ", what, " of x's dtype ",
              input.scalar_type(), ", got ", t.scalar_type());
  TORCH_CHECK(t.device() == input.device(), op, ": ", what, " is on ", t.device(), " but x is on ",
              input.device());
}

// The residual in x's (dense) layout, or an undefined tensor.
inline at::Tensor channel_norm_residual(const std::optional<at::Tensor>& residual,
                                        const ChannelNormLayout& l, const at::Tensor& input) {
  if (!residual.has_value() || !residual->defined()) return at::Tensor();
  const at::Tensor& r = *residual;
  check_like_x(r, input, "dcgen::channel_rms_norm_fused", "residual");
  if (!l.rows) return r.contiguous();
  return r.contiguous(input.dim() == 4 ? at::MemoryFormat::ChannelsLast
                                       : at::MemoryFormat::ChannelsLast3d);
}

// What every channel RMSNorm entry point checks and prepares, in this order: eps, act, x's
// layout, weight / bias (fp32), the residual in x's layout.
struct NormArgs {
  ChannelNormLayout l;
  at::Tensor w, b, res;
  DcaeAct act = DcaeAct::kNone;
};

inline NormArgs prepare_norm(const at::Tensor& input, const std::optional<at::Tensor>& weight,
                             const std::optional<at::Tensor>& bias,
                             const std::optional<at::Tensor>& residual, std::string_view act, double eps) {
  TORCH_CHECK(eps > 0, "dcgen::channel_rms_norm: expected eps > 0, got ", eps);
  NormArgs a;
  a.act = parse_dcae_act(act, "dcgen::channel_rms_norm_fused");
  a.l = channel_norm_layout(input);
  a.w = channel_param(weight, a.l.x, a.l.channels, "weight");
  a.b = channel_param(bias, a.l.x, a.l.channels, "bias");
  a.res = channel_norm_residual(residual, a.l, input);
  return a;
}

// The out variant's destination: x's shape and dtype, on x's device, laid out as the kernels
// walk x (the strides of the dense view `l.x` on every dimension longer than 1: a band of rows
// of an NHWC image qualifies). out may be x itself or the residual: every element is read and
// then written by the same thread (CPU loop, GPU thread or warp), after the statistics.
inline void check_norm_out(const at::Tensor& out, const ChannelNormLayout& l, const at::Tensor& input) {
  check_like_x(out, input, "dcgen::channel_rms_norm_fused_out", "out");
  TORCH_CHECK(dense_as(out, l.x), "dcgen::channel_rms_norm_fused_out: expected out laid out as x (strides ",
              l.x.strides(), " where a dimension is longer than 1), got strides ", out.strides());
}

}  // namespace dcgen
