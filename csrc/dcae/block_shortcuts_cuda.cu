// DC-AE up/down blocks: main path (optionally pixel-(un)shuffled) + the residual-autoencoding
// shortcut, added in one pass (spec: dcgen/ops/block_shortcuts.py).
//
// Threads walk the output in its own memory order (NCHW or channels_last; see output_order.cuh),
// so the writes are fully coalesced; y and x are read through their strides, so any input
// layout works without a copy. The shortcut is computed on the fly from x (duplicated channel
// k of the up shortcut is input channel k / repeats; the down shortcut averages `group`
// consecutive space-to-channel channels), never materialised. Math in fp32, one rounding.
// The work is pure data movement, so index math is kept to two 32-bit divisions per thread;
// NCHW up blocks make two horizontally adjacent outputs per thread (one paired store);
// channels_last 16-bit up blocks with Cout % 8 == 0 take 8 channels of one input pixel per
// thread, with 16-byte loads and stores (up_shortcut_cl8_kernel).
//
// up_block_shortcut_out also adds the main-path conv's bias (per y channel, before the
// shuffle) and writes into a caller's tensor (a row band of the full map, say): the fused
// decoder runs its up-block convs without their bias, so neither a separate bias pass over y
// nor a copy of each band into the full output is needed.
#include <ATen/core/Tensor.h>  // not ATen/ATen.h: every op's header, minutes of nvcc time
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/MemoryOverlap.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <optional>
#include <vector>

#include "dcae/elementwise.h"
#include "dcae/output_order.cuh"

namespace dcgen {
namespace {

using output_order::coords;
using output_order::dispatch_layout;
using output_order::kThreads;
using output_order::launch_blocks;
using output_order::make_grid;
using output_order::OutputGrid;
using output_order::prefers_channels_last;
using output_order::Strides4;
using output_order::strides_of;

// Two adjacent outputs of one value type, stored together.
template <typename T>
struct alignas(2 * sizeof(T)) Pair {
  T v[2];
};

__device__ __forceinline__ int64_t at4(const Strides4& s, int64_t b, int64_t c, int64_t h, int64_t w) {
  return b * s.s[0] + c * s.s[1] + h * s.s[2] + w * s.s[3];
}

// NCHW output: each thread makes the output pair (oh, 2w), (oh, 2w + 1), i.e. sub-pixels
// j = 0, 1 of input pixel (h, w) = (oh / 2, w): its y channels 4c + 2i + {0, 1} (pixel_shuffle)
// and x channels (4c + 2i + {0, 1}) / repeats, read with coalesced loads along w.
// `bias` (nullable) is indexed by y's channel.
template <typename T>
__global__ void up_shortcut_pairs_kernel(const T* __restrict__ y, const T* __restrict__ x,
                                         const T* __restrict__ bias, T* __restrict__ out,
                                         OutputGrid g, uint32_t repeats, bool shuffle_y,
                                         Strides4 ys, Strides4 xs) {
  const uint32_t W = g.OW / 2;
  DCGEN_FOR_EACH_OUTPUT(g, row, col) {
    const uint32_t b = row / g.C, c = row - b * g.C;
    const uint32_t oh = col / W, w = col - oh * W;
    const uint32_t h = oh >> 1;
    const uint32_t k0 = 4 * c + 2 * (oh & 1);  // pre-shuffle channel of sub-pixel j = 0
    float m0, m1;
    if (shuffle_y) {
      m0 = static_cast<float>(y[at4(ys, b, k0, h, w)]);
      m1 = static_cast<float>(y[at4(ys, b, k0 + 1, h, w)]);
    } else {
      m0 = static_cast<float>(y[at4(ys, b, c, oh, 2 * w)]);
      m1 = static_cast<float>(y[at4(ys, b, c, oh, 2 * w + 1)]);
    }
    if (bias != nullptr) {
      m0 += static_cast<float>(bias[shuffle_y ? k0 : c]);
      m1 += static_cast<float>(bias[shuffle_y ? k0 + 1 : c]);
    }
    const float s0 = static_cast<float>(x[at4(xs, b, k0 / repeats, h, w)]);
    const float s1 = static_cast<float>(x[at4(xs, b, (k0 + 1) / repeats, h, w)]);
    Pair<T> p;
    p.v[0] = static_cast<T>(m0 + s0);
    p.v[1] = static_cast<T>(m1 + s1);
    // Row (plane) offset + oh * OW + 2w is even and out's pointer is pair-aligned (host gate).
    *reinterpret_cast<Pair<T>*>(out + static_cast<int64_t>(row) * (int64_t{g.OH} * g.OW) +
                                int64_t{oh} * g.OW + 2 * w) = p;
  }
}

// channels_last output: one thread per element, channels fastest.
template <typename T>
__global__ void up_shortcut_rows_kernel(const T* __restrict__ y, const T* __restrict__ x,
                                        const T* __restrict__ bias, T* __restrict__ out,
                                        OutputGrid g, uint32_t repeats, bool shuffle_y,
                                        Strides4 ys, Strides4 xs) {
  DCGEN_FOR_EACH_OUTPUT(g, row, col) {
    uint32_t b, c, oh, ow;
    coords<true>(g, row, col, b, c, oh, ow);
    const uint32_t h = oh >> 1, w = ow >> 1;
    const uint32_t k = 4 * c + 2 * (oh & 1) + (ow & 1);  // channel before depth-to-space
    float m = static_cast<float>(shuffle_y ? y[at4(ys, b, k, h, w)] : y[at4(ys, b, c, oh, ow)]);
    if (bias != nullptr) m += static_cast<float>(bias[shuffle_y ? k : c]);
    const float sc = static_cast<float>(x[at4(xs, b, k / repeats, h, w)]);
    out[static_cast<int64_t>(row) * g.cols + col] = static_cast<T>(m + sc);
  }
}

// channels_last 16-bit maps with y pixel-shuffled (the fused decoder path: both up-block modes
// run as conv + pixel_shuffle there), Cout % 8 == 0 and repeats R in {1, 2, 4}: a thread owns
// one input pixel and 8 output channels c0 .. c0 + 7. Their y channels 4c + s (s = the
// sub-pixel 2i + j) are 32 consecutive channels, and their shortcut channels (4c + s) / R are
// 32 / R consecutive x channels: 16-byte loads of both, then one 16-byte store per output
// pixel (2h + i, 2w + j). The per-element kernel above gathers y with a stride of 4 channels,
// one 2-byte load per output element.
// With a bias, its 32 channels 4 c0 .. 4 c0 + 31 come in four more 16-byte loads.
template <typename T, int R>
__global__ void up_shortcut_cl8_kernel(const T* __restrict__ y, const T* __restrict__ x,
                                       const T* __restrict__ bias, T* __restrict__ out,
                                       int64_t items, int groups, int H, int W, int cin,
                                       int cout) {
  const int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (t >= items) return;
  const int g = static_cast<int>(t % groups);
  const int64_t pix = t / groups;  // (b, h, w) of the input pixel, w fastest
  const int w = static_cast<int>(pix % W);
  const int64_t bh = pix / W;
  const int h = static_cast<int>(bh % H);
  const int64_t b = bh / H;
  const int c0 = 8 * g;
  // y: 32 channels from 4 c0; x: 32 / R channels from 4 c0 / R (16-byte aligned: c0 % 8 == 0).
  const uint4* yp = reinterpret_cast<const uint4*>(y + pix * (4 * static_cast<int64_t>(cout)) + 4 * c0);
  const uint4* xp = reinterpret_cast<const uint4*>(x + pix * static_cast<int64_t>(cin) + 4 * c0 / R);
  uint4 yv[4], xv[4 / R], bv[4];
#pragma unroll
  for (int q = 0; q < 4; ++q) yv[q] = yp[q];
#pragma unroll
  for (int q = 0; q < 4 / R; ++q) xv[q] = xp[q];
  if (bias != nullptr) {
    const uint4* bp = reinterpret_cast<const uint4*>(bias + 4 * c0);
#pragma unroll
    for (int q = 0; q < 4; ++q) bv[q] = bp[q];
  }
  const T* ye = reinterpret_cast<const T*>(yv);
  const T* xe = reinterpret_cast<const T*>(xv);
  const T* be = reinterpret_cast<const T*>(bv);
  const int64_t OW = 2 * static_cast<int64_t>(W);
  T* obase = out + ((b * 2 * H + 2 * h) * OW + 2 * w) * cout + c0;
#pragma unroll
  for (int s = 0; s < 4; ++s) {
    uint4 o;
    T* oe = reinterpret_cast<T*>(&o);
#pragma unroll
    for (int c = 0; c < 8; ++c) {
      const int k = 4 * c + s;  // y channel 4 (c0 + c) + s, relative to 4 c0
      float m = static_cast<float>(ye[k]);
      if (bias != nullptr) m += static_cast<float>(be[k]);
      oe[c] = static_cast<T>(m + static_cast<float>(xe[k / R]));
    }
    const int i = s >> 1, j = s & 1;
    *reinterpret_cast<uint4*>(obase + (i * OW + j) * cout) = o;
  }
}

// Whether the 8-channel kernel applies (see it); cl: y is channels_last; R = 4 Cout / Cin.
bool use_cl8_kernel(const at::Tensor& y, const at::Tensor& x, const at::Tensor* bias,
                    const at::Tensor& out, bool cl, bool shuffle_y, int64_t cout, int64_t repeats) {
  const auto st = y.scalar_type();
  return shuffle_y && (st == at::kHalf || st == at::kBFloat16) && cout % 8 == 0 &&
         (repeats == 1 || repeats == 2 || repeats == 4) && cl &&
         x.is_contiguous(at::MemoryFormat::ChannelsLast) && aligned16(y.const_data_ptr()) &&
         aligned16(x.const_data_ptr()) && aligned16(out.const_data_ptr()) &&
         (bias == nullptr || aligned16(bias->const_data_ptr()));
}

template <typename T>
void launch_cl8(const at::Tensor& y, const at::Tensor& x, const T* bp, at::Tensor& out,
                int64_t repeats, cudaStream_t stream) {
  const int64_t batch = x.size(0), cin = x.size(1), h = x.size(2), w = x.size(3);
  const int64_t cout = out.size(1), groups = cout / 8;
  const int64_t items = batch * h * w * groups;
  constexpr int kBlock = 256;
  const int64_t blocks = (items + kBlock - 1) / kBlock;
  TORCH_CHECK(blocks <= 2147483647LL && h < (int64_t{1} << 30) && w < (int64_t{1} << 30),
              "dcgen::up_block_shortcut: input too large: ", x.sizes());
  const auto* yp = reinterpret_cast<const T*>(y.const_data_ptr());
  const auto* xp = reinterpret_cast<const T*>(x.const_data_ptr());
  auto* op = reinterpret_cast<T*>(out.mutable_data_ptr());
  const dim3 grid(static_cast<unsigned>(blocks));
  const int gi = static_cast<int>(groups), hi = static_cast<int>(h), wi = static_cast<int>(w);
  const int ci = static_cast<int>(cin), co = static_cast<int>(cout);
  if (repeats == 1) {
    up_shortcut_cl8_kernel<T, 1><<<grid, kBlock, 0, stream>>>(yp, xp, bp, op, items, gi, hi, wi, ci, co);
  } else if (repeats == 2) {
    up_shortcut_cl8_kernel<T, 2><<<grid, kBlock, 0, stream>>>(yp, xp, bp, op, items, gi, hi, wi, ci, co);
  } else {
    up_shortcut_cl8_kernel<T, 4><<<grid, kBlock, 0, stream>>>(yp, xp, bp, op, items, gi, hi, wi, ci, co);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T, bool CL>
__global__ void down_shortcut_kernel(const T* __restrict__ y, const T* __restrict__ x,
                                     T* __restrict__ out, OutputGrid g, uint32_t group,
                                     bool unshuffle_y, Strides4 ys, Strides4 xs) {
  const float inv_group = 1.f / static_cast<float>(group);
  DCGEN_FOR_EACH_OUTPUT(g, row, col) {
    uint32_t b, c, oh, ow;
    coords<CL>(g, row, col, b, c, oh, ow);
    // pixel_unshuffle: output channel m holds input channel m / 4 at sub-pixel ((m/2)%2, m%2).
    const float m = static_cast<float>(
        unshuffle_y ? y[at4(ys, b, c >> 2, 2 * oh + ((c >> 1) & 1), 2 * ow + (c & 1))]
                    : y[at4(ys, b, c, oh, ow)]);
    float acc = 0.f;
    for (uint32_t k = c * group; k < (c + 1) * group; ++k) {
      acc += static_cast<float>(x[at4(xs, b, k >> 2, 2 * oh + ((k >> 1) & 1), 2 * ow + (k & 1))]);
    }
    // * (1/group) is / group exactly for powers of two (every DC-AE config), else within 1 ulp.
    out[static_cast<int64_t>(row) * g.cols + col] = static_cast<T>(m + acc * inv_group);
  }
}

void check_pair(const char* op, const at::Tensor& y, const at::Tensor& x) {
  TORCH_CHECK(y.is_cuda() && x.device() == y.device(), "dcgen::", op,
              " (CUDA): expected y and x on one CUDA device, got y on ", y.device(), ", x on ",
              x.device());
  TORCH_CHECK(y.dim() == 4 && x.dim() == 4, "dcgen::", op, ": expected 4-d y and x, got ", y.dim(),
              " and ", x.dim(), " dims");
  TORCH_CHECK(y.scalar_type() == x.scalar_type(), "dcgen::", op,
              ": expected x and y of one dtype, got y ", y.scalar_type(), ", x ", x.scalar_type());
  const auto st = y.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kHalf || st == at::kBFloat16, "dcgen::", op,
              ": expected dtype float32, float16 or bfloat16, got ", st);
  TORCH_CHECK(x.size(0) == y.size(0), "dcgen::", op, ": expected one batch size, got y ",
              y.size(0), ", x ", x.size(0));
}

// The checks of both up ops that need no device; returns Cout.
int64_t check_up(const char* op, const at::Tensor& y, const at::Tensor& x, bool shuffle_y) {
  check_pair(op, y, x);
  const int64_t cin = x.size(1), h = x.size(2), w = x.size(3);
  int64_t cout;
  if (shuffle_y) {
    TORCH_CHECK(y.size(1) % 4 == 0 && y.size(2) == h && y.size(3) == w, "dcgen::", op,
                ": with shuffle_y expected y of shape (B, 4*Cout, ", h, ", ", w, "), got ",
                y.sizes());
    cout = y.size(1) / 4;
  } else {
    TORCH_CHECK(y.size(2) == 2 * h && y.size(3) == 2 * w, "dcgen::", op,
                ": without shuffle_y expected y of spatial size ", 2 * h, "x", 2 * w, ", got ",
                y.sizes());
    cout = y.size(1);
  }
  TORCH_CHECK(cin > 0 && (4 * cout) % cin == 0, "dcgen::", op, ": 4*Cout=", 4 * cout,
              " is not a multiple of x's ", cin, " channels");
  return cout;
}

// The output the kernels walk: (B, Cout, 2H, 2W), channels_last when y is (output_order.cuh).
at::MemoryFormat up_out_format(const at::Tensor& y) {
  return prefers_channels_last(y) ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
}

std::vector<int64_t> up_out_sizes(const at::Tensor& y, const at::Tensor& x, int64_t cout) {
  return {y.size(0), cout, 2 * x.size(2), 2 * x.size(3)};
}

// Runs the kernel that fits into `out` (dense in up_out_format(y)); bias: nullable, y's channels.
void launch_up(const at::Tensor& y, const at::Tensor& x, const at::Tensor* bias, at::Tensor& out,
               bool shuffle_y, int64_t cout) {
  if (out.numel() == 0) return;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const bool cl = prefers_channels_last(y);
  const int64_t cin = x.size(1), h = x.size(2), w = x.size(3);
  const Strides4 ys = strides_of(y), xs = strides_of(x);
  const uint32_t repeats = static_cast<uint32_t>(4 * cout / cin);
  if (use_cl8_kernel(y, x, bias, out, cl, shuffle_y, cout, repeats)) {
    if (y.scalar_type() == at::kBFloat16) {
      using T = __nv_bfloat16;
      launch_cl8<T>(y, x, bias ? reinterpret_cast<const T*>(bias->const_data_ptr()) : nullptr,
                    out, repeats, stream);
    } else {
      using T = __half;
      launch_cl8<T>(y, x, bias ? reinterpret_cast<const T*>(bias->const_data_ptr()) : nullptr,
                    out, repeats, stream);
    }
    return;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(), "up_block_shortcut_cuda", [&] {
    const scalar_t* bp = bias ? bias->const_data_ptr<scalar_t>() : nullptr;
    if (cl) {
      const OutputGrid g = make_grid(out, true);
      up_shortcut_rows_kernel<scalar_t><<<launch_blocks(g), kThreads, 0, stream>>>(
          y.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(), bp,
          out.mutable_data_ptr<scalar_t>(), g, repeats, shuffle_y, ys, xs);
    } else {
      const OutputGrid g = make_grid(out, false, 2 * h * w);  // one thread per output pair
      up_shortcut_pairs_kernel<scalar_t><<<launch_blocks(g), kThreads, 0, stream>>>(
          y.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(), bp,
          out.mutable_data_ptr<scalar_t>(), g, repeats, shuffle_y, ys, xs);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

at::Tensor up_block_shortcut_cuda(const at::Tensor& y, const at::Tensor& x, bool shuffle_y) {
  const int64_t cout = check_up("up_block_shortcut", y, x, shuffle_y);
  const c10::cuda::CUDAGuard guard(y.device());
  at::Tensor out = at::empty(up_out_sizes(y, x, cout), y.options(), up_out_format(y));
  launch_up(y, x, nullptr, out, shuffle_y, cout);
  return out;
}

void up_block_shortcut_out_cuda(const at::Tensor& y, const at::Tensor& x, bool shuffle_y,
                                const std::optional<at::Tensor>& bias, at::Tensor& out) {
  constexpr const char* kOp = "up_block_shortcut_out";
  const int64_t cout = check_up(kOp, y, x, shuffle_y);
  if (bias.has_value()) {
    const at::Tensor& b = *bias;
    TORCH_CHECK(b.device() == y.device() && b.scalar_type() == y.scalar_type() && b.dim() == 1 &&
                    b.size(0) == y.size(1) && b.is_contiguous(),
                "dcgen::", kOp, ": expected a contiguous bias of y's ", y.size(1), " channels, dtype ",
                y.scalar_type(), " and device ", y.device(), ", got ", b.scalar_type(), " ",
                b.sizes(), " strides ", b.strides(), " on ", b.device());
  }
  TORCH_CHECK(out.device() == y.device() && out.scalar_type() == y.scalar_type(), "dcgen::", kOp,
              ": expected out of y's dtype ", y.scalar_type(), " on ", y.device(), ", got ",
              out.scalar_type(), " on ", out.device());
  const auto sizes = up_out_sizes(y, x, cout);
  const at::MemoryFormat fmt = up_out_format(y);
  // A meta tensor: the strides of the output the kernels walk, without memory.
  const at::Tensor like = at::empty(sizes, y.options().device(at::kMeta), fmt);
  TORCH_CHECK(dense_as(out, like), "dcgen::", kOp, ": expected out of shape ", like.sizes(),
              " with strides ", like.strides(), " (", fmt == at::MemoryFormat::ChannelsLast ?
              "channels_last, as y" : "NCHW, as y", "; dimensions of size 1 may differ), got ",
              out.sizes(), " / ", out.strides());
  // The paired NCHW stores need out's pointer aligned to two elements.
  TORCH_CHECK(fmt == at::MemoryFormat::ChannelsLast ||
                  reinterpret_cast<uintptr_t>(out.const_data_ptr()) % (2 * out.element_size()) == 0,
              "dcgen::", kOp, ": expected an NCHW out aligned to ", 2 * out.element_size(),
              " bytes, got storage offset ", out.storage_offset());
  at::assert_no_overlap(out, y);
  at::assert_no_overlap(out, x);
  const c10::cuda::CUDAGuard guard(y.device());
  launch_up(y, x, bias.has_value() ? &*bias : nullptr, out, shuffle_y, cout);
}

at::Tensor down_block_shortcut_cuda(const at::Tensor& y, const at::Tensor& x, bool unshuffle_y) {
  check_pair("down_block_shortcut", y, x);
  const int64_t cin = x.size(1), h = x.size(2), w = x.size(3);
  TORCH_CHECK(h % 2 == 0 && w % 2 == 0,
              "dcgen::down_block_shortcut: x's spatial size must be even, got ", h, "x", w);
  int64_t cout;
  if (unshuffle_y) {
    TORCH_CHECK(y.size(2) == h && y.size(3) == w,
                "dcgen::down_block_shortcut: with unshuffle_y expected y of shape (B, Cout/4, ", h,
                ", ", w, "), got ", y.sizes());
    cout = 4 * y.size(1);
  } else {
    TORCH_CHECK(y.size(2) == h / 2 && y.size(3) == w / 2,
                "dcgen::down_block_shortcut: without unshuffle_y expected y of spatial size ", h / 2,
                "x", w / 2, ", got ", y.sizes());
    cout = y.size(1);
  }
  TORCH_CHECK(cout > 0 && (4 * cin) % cout == 0, "dcgen::down_block_shortcut: x's 4*Cin=", 4 * cin,
              " channels are not a multiple of Cout=", cout);
  const c10::cuda::CUDAGuard guard(y.device());
  const bool cl = prefers_channels_last(y);
  at::Tensor out = at::empty({y.size(0), cout, h / 2, w / 2}, y.options(),
                             cl ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous);
  if (out.numel() == 0) return out;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const Strides4 ys = strides_of(y), xs = strides_of(x);
  const uint32_t group = static_cast<uint32_t>(4 * cin / cout);
  const OutputGrid g = make_grid(out, cl);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(), "down_block_shortcut_cuda", [&] {
    dispatch_layout(cl, [&](auto layout) {
      constexpr bool CL = decltype(layout)::value;
      down_shortcut_kernel<scalar_t, CL><<<launch_blocks(g), kThreads, 0, stream>>>(
          y.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(),
          g, group, unshuffle_y, ys, xs);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(dcgen, CUDA, m) {
  m.impl("up_block_shortcut", &up_block_shortcut_cuda);
  m.impl("up_block_shortcut_out", &up_block_shortcut_out_cuda);
  m.impl("down_block_shortcut", &down_block_shortcut_cuda);
}

}  // namespace dcgen
