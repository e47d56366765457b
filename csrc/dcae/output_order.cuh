// Helpers shared by the DC-AE kernels that give each thread one output element (or a few),
// walked in the output's own memory order (NCHW or channels_last) so writes coalesce, and read
// their inputs through strides so any input layout works without a copy.
#pragma once

#include <ATen/core/Tensor.h>  // not ATen/ATen.h: every op's header, minutes of nvcc time
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>

#include <algorithm>
#include <cstdint>
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

// The output seen as rows x cols in its own memory order: NCHW rows are the B*C planes
// (cols = OH*OW), channels_last rows are the B*OH pixel rows (cols = OW*C). Rows come from
// blockIdx.y, cols from blockIdx.x*blockDim.x + threadIdx.x (both grid-stride), so a thread
// decodes its coordinates with two 32-bit divisions and writes out[row * cols + col].
struct OutputGrid {
  uint32_t C = 0, OH = 0, OW = 0;
  uint32_t rows = 0, cols = 0;
};

// `cols_per_row` overrides the columns per row (kernels that handle several outputs per thread).
inline OutputGrid make_grid(const at::Tensor& out, bool channels_last, int64_t cols_per_row = -1) {
  const int64_t b = out.size(0), c = out.size(1), oh = out.size(2), ow = out.size(3);
  const int64_t rows = channels_last ? b * oh : b * c;
  const int64_t cols = cols_per_row >= 0 ? cols_per_row : (channels_last ? ow * c : oh * ow);
  TORCH_CHECK(rows < (int64_t{1} << 31) && cols < (int64_t{1} << 31) && c < (int64_t{1} << 31),
              "dcgen: output ", out.sizes(), " is too large for 32-bit row/column indexing");
  OutputGrid g;
  g.C = static_cast<uint32_t>(c);
  g.OH = static_cast<uint32_t>(oh);
  g.OW = static_cast<uint32_t>(ow);
  g.rows = static_cast<uint32_t>(rows);
  g.cols = static_cast<uint32_t>(cols);
  return g;
}

constexpr int kThreads = 256;

inline dim3 launch_blocks(const OutputGrid& g) {
  const int64_t x = std::min<int64_t>((int64_t{g.cols} + kThreads - 1) / kThreads, int64_t{1} << 16);
  const int64_t y = std::min<int64_t>(g.rows, 65535);
  return dim3(static_cast<unsigned>(std::max<int64_t>(x, 1)), static_cast<unsigned>(std::max<int64_t>(y, 1)));
}

// (b, c, oh, ow) of output element (row, col).
template <bool CL>
__device__ __forceinline__ void coords(const OutputGrid& g, uint32_t row, uint32_t col, uint32_t& b,
                                       uint32_t& c, uint32_t& oh, uint32_t& ow) {
  if (CL) {
    b = row / g.OH;
    oh = row - b * g.OH;
    ow = col / g.C;
    c = col - ow * g.C;
  } else {
    b = row / g.C;
    c = row - b * g.C;
    oh = col / g.OW;
    ow = col - oh * g.OW;
  }
}

// Loops of a kernel over its (row, col) pairs.
#define DCGEN_FOR_EACH_OUTPUT(g, row, col)                                                       \
  for (uint32_t row = blockIdx.y; row < (g).rows; row += gridDim.y)                               \
    for (uint32_t col = blockIdx.x * blockDim.x + threadIdx.x; col < (g).cols;                    \
         col += gridDim.x * blockDim.x)

// Calls launch(std::integral_constant<bool, CL>{}) for the output layout.
template <typename Launch>
void dispatch_layout(bool channels_last, Launch&& launch) {
  if (channels_last) {
    launch(std::true_type{});
  } else {
    launch(std::false_type{});
  }
}

}  // namespace output_order
}  // namespace dcgen
