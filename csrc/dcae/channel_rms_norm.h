// Channel RMSNorm shared between the CPU and CUDA implementations: argument checks and the
// (outer, channels, inner) view of the input. Spec: dcgen/ops/channel_rms_norm.py.
#pragma once

#include <ATen/ATen.h>

#include <optional>

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
  if (!input.is_contiguous() && mf != at::MemoryFormat::Contiguous && input.is_contiguous(mf)) {
    l.x = input;
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

}  // namespace dcgen
