// Helpers shared by the DC-AE kernels that give one thread to each output element, walked in
// the output's own memory order (NCHW or channels_last) so writes coalesce, and read their
// inputs through strides so any input layout works without a copy.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <type_traits>

namespace dcgen {
namespace output_order {

struct Strides4 {
  int64_t s[4];
};

inline Strides4 strides_of(const at::Tensor& t) {
  Strides4 r;
  for (int d = 0; d < 4; ++d) r.s[d] = t.stride(d);
  return r;
}

// The outputs follow y's layout: channels_last when the input is (and is not also plain
// contiguous, as 1-channel or 1x1 maps are), else NCHW-contiguous.
inline bool prefers_channels_last(const at::Tensor& t) {
  return !t.is_contiguous() && t.is_contiguous(at::MemoryFormat::ChannelsLast);
}

// Output coordinates (b, c, oh, ow) of linear index `idx` in NCHW (CL false) or NHWC order.
template <typename I, bool CL>
__device__ __forceinline__ void decode(I idx, I C, I OH, I OW, I& b, I& c, I& oh, I& ow) {
  if (CL) {
    c = idx % C;
    idx /= C;
    ow = idx % OW;
    idx /= OW;
    oh = idx % OH;
    b = idx / OH;
  } else {
    ow = idx % OW;
    idx /= OW;
    oh = idx % OH;
    idx /= OH;
    c = idx % C;
    b = idx / C;
  }
}

constexpr int kThreads = 256;

// Grid-stride loops: cap the grid, the loop covers the rest.
inline int64_t grid(int64_t total) {
  return std::min<int64_t>((total + kThreads - 1) / kThreads, int64_t{1} << 20);
}

// Calls launch(I{}, std::integral_constant<bool, CL>{}) with I = uint32_t when every index
// (plus one grid stride) fits in 32 bits, which keeps the div/mod decoding cheap, else int64_t.
template <typename Launch>
void dispatch(int64_t numel, bool channels_last, Launch&& launch) {
  const bool small = numel < std::numeric_limits<int32_t>::max() / 2;
  if (small && channels_last) {
    launch(uint32_t{}, std::true_type{});
  } else if (small) {
    launch(uint32_t{}, std::false_type{});
  } else if (channels_last) {
    launch(int64_t{}, std::true_type{});
  } else {
    launch(int64_t{}, std::false_type{});
  }
}

}  // namespace output_order
}  // namespace dcgen
