// Channel RMSNorm on the CPU: fp32 statistics, one rounding to the output dtype.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <vector>

#include "dcae/channel_rms_norm.h"

namespace dcgen {
namespace {

// NCHW: for a block of spatial positions, accumulate sum of squares channel by channel so the
// inner loop runs over contiguous memory.
template <typename T>
void norm_planes(const T* x, T* y, const float* w, const float* b, int64_t outer, int64_t C,
                 int64_t inner, float eps) {
  constexpr int64_t kChunk = 256;
  const int64_t chunks = (inner + kChunk - 1) / kChunk;
  at::parallel_for(0, outer * chunks, 1, [&](int64_t begin, int64_t end) {
    float inv[kChunk];
    for (int64_t task = begin; task < end; ++task) {
      const int64_t o = task / chunks;
      const int64_t s0 = (task % chunks) * kChunk;
      const int64_t n = std::min(kChunk, inner - s0);
      const T* xo = x + o * C * inner + s0;
      T* yo = y + o * C * inner + s0;
      for (int64_t s = 0; s < n; ++s) inv[s] = 0.f;
      for (int64_t c = 0; c < C; ++c) {
        const T* xc = xo + c * inner;
        for (int64_t s = 0; s < n; ++s) {
          const float v = static_cast<float>(xc[s]);
          inv[s] += v * v;
        }
      }
      for (int64_t s = 0; s < n; ++s) inv[s] = 1.f / std::sqrt(inv[s] / C + eps);
      for (int64_t c = 0; c < C; ++c) {
        const T* xc = xo + c * inner;
        T* yc = yo + c * inner;
        const float wc = w ? w[c] : 1.f;
        const float bc = b ? b[c] : 0.f;
        for (int64_t s = 0; s < n; ++s) yc[s] = static_cast<T>(static_cast<float>(xc[s]) * inv[s] * wc + bc);
      }
    }
  });
}

// channels_last: one contiguous row of C values per pixel.
template <typename T>
void norm_rows(const T* x, T* y, const float* w, const float* b, int64_t rows, int64_t C,
               float eps) {
  at::parallel_for(0, rows, 64, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const T* xr = x + r * C;
      T* yr = y + r * C;
      float acc = 0.f;
      for (int64_t c = 0; c < C; ++c) {
        const float v = static_cast<float>(xr[c]);
        acc += v * v;
      }
      const float inv = 1.f / std::sqrt(acc / C + eps);
      for (int64_t c = 0; c < C; ++c) {
        const float v = static_cast<float>(xr[c]) * inv * (w ? w[c] : 1.f) + (b ? b[c] : 0.f);
        yr[c] = static_cast<T>(v);
      }
    }
  });
}

at::Tensor channel_rms_norm_cpu(const at::Tensor& input, const std::optional<at::Tensor>& weight,
                                const std::optional<at::Tensor>& bias, double eps) {
  TORCH_CHECK(input.device().is_cpu(), "dcgen::channel_rms_norm (CPU): x is on ", input.device());
  TORCH_CHECK(eps > 0, "dcgen::channel_rms_norm: expected eps > 0, got ", eps);
  auto l = channel_norm_layout(input);
  const at::Tensor w = channel_param(weight, l.x, l.channels, "weight");
  const at::Tensor b = channel_param(bias, l.x, l.channels, "bias");
  at::Tensor out = at::empty_like(l.x);
  if (l.x.numel() == 0) return out;
  const float* wp = w.defined() ? w.data_ptr<float>() : nullptr;
  const float* bp = b.defined() ? b.data_ptr<float>() : nullptr;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, l.x.scalar_type(), "channel_rms_norm_cpu", [&] {
    if (l.rows) {
      norm_rows<scalar_t>(l.x.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(), wp, bp,
                          l.outer, l.channels, static_cast<float>(eps));
    } else {
      norm_planes<scalar_t>(l.x.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(), wp, bp,
                            l.outer, l.channels, l.inner, static_cast<float>(eps));
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(dcgen, CPU, m) { m.impl("channel_rms_norm", &channel_rms_norm_cpu); }

}  // namespace dcgen
