// What the DC-AE elementwise ops (channel_rms_norm_fused and its _out form, bias_act_) share:
// the activation codes of their schemas' `act` strings, the activations themselves (host and
// device; relu keeps NaN, as torch.relu and the ops' references do), and the layout rule for
// the tensors they write. Spec: dcgen/ops/channel_rms_norm.py, dcgen/ops/bias_act.py. The other
// DC-AE kernels use its activations and its test for 16-byte vector access too.
#pragma once

#include <ATen/core/Tensor.h>  // not ATen/ATen.h: every op's header, minutes of nvcc time
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/macros/Macros.h>

#include <cmath>
#include <cstdint>
#include <string>
#include <string_view>

namespace dcgen {

enum class DcaeAct : int { kNone = 0, kRelu = 1, kSilu = 2 };

// `op` names the op in the error: "<op>: expected act 'none', 'relu' or 'silu', got '...'".
inline DcaeAct parse_dcae_act(std::string_view act, const char* op) {
  if (act == "none") return DcaeAct::kNone;
  if (act == "relu") return DcaeAct::kRelu;
  if (act == "silu") return DcaeAct::kSilu;
  TORCH_CHECK(false, op, ": expected act 'none', 'relu' or 'silu', got '", std::string(act), "'");
  return DcaeAct::kNone;
}

C10_HOST_DEVICE inline float apply_dcae_act(float v, DcaeAct act) {
  if (act == DcaeAct::kRelu) return v < 0.f ? 0.f : v;  // NaN fails the compare: stays NaN
  if (act == DcaeAct::kSilu) return v / (1.f + expf(-v));
  return v;
}

// Whether a pointer allows the 16-byte vector loads and stores of the DC-AE kernels (a tensor
// with a storage offset may not).
inline bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// Same shape as `like` and the same strides on every dimension longer than 1 (a band of rows of
// a one-image NHWC batch has another batch stride, which no element's address uses).
inline bool dense_as(const at::Tensor& t, const at::Tensor& like) {
  if (t.sizes() != like.sizes()) return false;
  for (int64_t d = 0; d < t.dim(); ++d) {
    if (t.size(d) > 1 && t.stride(d) != like.stride(d)) return false;
  }
  return true;
}

}  // namespace dcgen
