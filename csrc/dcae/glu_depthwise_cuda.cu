// GLUMBConv's middle on CUDA (spec: dcgen/ops/glu_depthwise.py): depthwise 3x3 conv
// (padding 1, optional bias) over 2*Ch channels, then out = a * SiLU(gate) with a the first Ch
// channels and gate the last Ch, in one pass; the 2*Ch-channel conv output never reaches memory.
//
// Two kernels:
//   - channels_last 16-bit input with Ch % 4 == 0 (what the DC-AE decoders run on CUDA): a thread
//     owns 4 channels and a run of strips of kStrip output pixels along W. Its 72 weights sit
//     in its own slots of shared memory, loaded once per run (coalesced float4 loads), its 3x3
//     window of 4-channel vectors (8-byte loads, 256 contiguous bytes per warp) slides along
//     the strips, so each input vector is loaded once per output row that reads it instead of
//     once per tap. The first version (the kernel below) reached 302 GB/s on the SANA decoder's
//     (1, 4096, 512, 512) map on the H100, about a tenth of the memory bandwidth: 18 scalar
//     loads and 18 weight loads per output element; the strip kernel with its weights reloaded
//     for every strip, about 650 GB/s on the H200.
//   - anything else (NCHW, fp32, Ch % 4 != 0): one thread per output element in the output's
//     memory order (NCHW or channels_last, as the input; see output_order.cuh), reading its two
//     3x3 neighbourhoods through the input's strides; neighbouring threads share most of those
//     reads, which L1 serves.
// Both read the weights as fp32, accumulate in fp32 in the same order (taps row by row, then
// the bias) and round once.
//
// expand_bias (optional): x is then the expand 1x1 conv's output without its bias, and both
// kernels apply that conv's bias and SiLU to each input value as they load it, rounded to x's
// dtype: the values bias_act_ (the pass this replaces) would have stored, so the result is bit
// for bit the two-kernel one, without that pass's read and write of the 2*Ch-channel map.
#include <ATen/core/Tensor.h>  // not ATen/ATen.h: every op's header, minutes of nvcc time
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <optional>
#include <type_traits>

#include "dcae/elementwise.h"
#include "dcae/output_order.cuh"

namespace dcgen {
namespace {

using output_order::coords;
using output_order::make_grid;
using output_order::OutputGrid;
using output_order::Strides4;
using output_order::strides_of;

// silu(v + b) rounded to T: an expand conv output value as bias_act_ "silu" stores it.
template <typename T>
__device__ __forceinline__ float expand_act(float v, float b) {
  return static_cast<float>(static_cast<T>(apply_dcae_act(v + b, DcaeAct::kSilu)));
}

// `eb`: the channel's expand bias, applied (with SiLU) to each input when `expand`.
template <typename T>
__device__ __forceinline__ float depthwise3x3(const T* __restrict__ plane, const float* __restrict__ w9,
                                              int64_t oh, int64_t ow, int64_t H, int64_t W, int64_t sh,
                                              int64_t sw, bool expand, float eb) {
  float acc = 0.f;
#pragma unroll
  for (int dy = -1; dy <= 1; ++dy) {
    const int64_t r = oh + dy;
    if (r < 0 || r >= H) continue;  // zero padding (of the activated map)
#pragma unroll
    for (int dx = -1; dx <= 1; ++dx) {
      const int64_t col = ow + dx;
      if (col < 0 || col >= W) continue;
      float v = static_cast<float>(plane[r * sh + col * sw]);
      if (expand) v = expand_act<T>(v, eb);
      acc += v * w9[(dy + 1) * 3 + (dx + 1)];
    }
  }
  return acc;
}

template <typename T, bool CL>
__global__ void glu_depthwise_kernel(const T* __restrict__ x, const float* __restrict__ weight,
                                     const float* __restrict__ bias,
                                     const float* __restrict__ expand_bias, T* __restrict__ out,
                                     OutputGrid g, Strides4 xs) {
  const bool expand = expand_bias != nullptr;
  DCGEN_FOR_EACH_OUTPUT(g, row, col) {
    uint32_t b, c, oh, ow;
    coords<CL>(g, row, col, b, c, oh, ow);
    const T* base = x + b * xs.s[0];
    const uint32_t gc = c + g.C;  // the gate channel
    const float eba = expand ? expand_bias[c] : 0.f, ebg = expand ? expand_bias[gc] : 0.f;
    float a = depthwise3x3<T>(base + c * xs.s[1], weight + c * 9, oh, ow, g.OH, g.OW, xs.s[2],
                              xs.s[3], expand, eba);
    float gate = depthwise3x3<T>(base + gc * xs.s[1], weight + gc * 9, oh, ow, g.OH, g.OW,
                                 xs.s[2], xs.s[3], expand, ebg);
    if (bias) {
      a += bias[c];
      gate += bias[gc];
    }
    // SiLU(g) = g * sigmoid(g); expf(-g) -> inf for very negative g gives g / inf = -0, fine.
    out[static_cast<int64_t>(row) * g.cols + col] = static_cast<T>(a * (gate / (1.f + expf(-gate))));
  }
}

// ---------------------------------------------------------------- channels_last, 4 channels

constexpr int kStrip = 4;         // output pixels per strip along W
constexpr int kStripsPerThread = 8;  // consecutive strips a thread walks with one weight load
constexpr int kVecThreads = 128;  // 3 CTAs per SM: up to 170 registers, 36 KB shared memory each

// Two 16-bit values of one 32-bit word (the lower channel in the low half) to and from floats.
template <typename T>
__device__ __forceinline__ float2 pair_to_float2(uint32_t u) {
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    return __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&u));
  } else {
    return __half22float2(*reinterpret_cast<const __half2*>(&u));
  }
}

template <typename T>
__device__ __forceinline__ uint32_t float2_to_pair(float lo, float hi) {
  uint32_t u;
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    const __nv_bfloat162 p = __floats2bfloat162_rn(lo, hi);
    u = *reinterpret_cast<const uint32_t*>(&p);
  } else {
    const __half2 p = __floats2half2_rn(lo, hi);
    u = *reinterpret_cast<const uint32_t*>(&p);
  }
  return u;
}

// 4 consecutive channels of one pixel, raw (two 16-bit pairs); zeros outside the map (the
// conv's padding). Kept raw in the window and widened at use: half the registers of floats.
template <typename T>
__device__ __forceinline__ uint2 load4(const T* __restrict__ p, bool inside) {
  return inside ? *reinterpret_cast<const uint2*>(p) : make_uint2(0u, 0u);
}

template <typename T>
__device__ __forceinline__ float channel(const uint2& v, int i) {
  const float2 f = pair_to_float2<T>(i < 2 ? v.x : v.y);
  return (i & 1) ? f.y : f.x;
}

// A 16-byte shared-memory load the compiler may not hoist out of the strip loop (it would hoist
// plain loads of the loop-invariant weights back into 72 registers, and spill).
__device__ __forceinline__ float4 lds128(const float4* p) {
  float4 v;
  const unsigned addr = static_cast<unsigned>(__cvta_generic_to_shared(p));
  asm volatile("ld.shared.v4.f32 {%0, %1, %2, %3}, [%4];"
               : "=f"(v.x), "=f"(v.y), "=f"(v.z), "=f"(v.w)
               : "r"(addr));
  return v;
}

// expand_act of each of 4 raw channels, kept raw. The biases eb[0..3] are read from global
// memory (L1) at each use: kept in registers they pushed the kernel past its register budget.
template <typename T>
__device__ __forceinline__ uint2 expand_act4(const uint2& v, const float* __restrict__ eb) {
  float f[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) f[i] = apply_dcae_act(channel<T>(v, i) + __ldg(eb + i), DcaeAct::kSilu);
  return make_uint2(float2_to_pair<T>(f[0], f[1]), float2_to_pair<T>(f[2], f[3]));
}

// Thread t: channel group g = t % G (channels 4g .. 4g + 3 of each half, G = Ch / 4) and a run
// of kStripsPerThread consecutive strips (strip fastest, then the output row, then the image);
// consecutive threads take consecutive channel groups of the same pixels, so every load and
// store of a warp is one contiguous 256-byte run.
//
// The thread loads its 72 weights once for its whole run, as 18 float4 loads from the
// [half][tap][channel] copy `wt` (consecutive threads: consecutive 16 bytes). The first version
// loaded them for every strip of 4 pixels from the (channel, tap) layout, 72 scalar loads 36
// floats apart across a warp's threads: 32 cache lines per warp instruction, likely the reason
// it reached about 650 GB/s (docs/benchmark-log.md, H200, the (1, 4096, 512, 512) group) instead of the
// memory's 3-4 TB/s. A strip that continues the previous one in the same row keeps the window
// (its two first columns are the previous strip's two last).
// Expand: expand_bias is given (a template flag: the plain kernel keeps its registers).
template <typename T, bool Expand>
__global__ void __launch_bounds__(kVecThreads, 3)
    glu_depthwise_cl4_kernel(const T* __restrict__ x, const float4* __restrict__ wt,
                             const float* __restrict__ bias, const float* __restrict__ expand_bias,
                             T* __restrict__ out, int64_t strip_count, int groups, int strips, int H,
                             int W, int ch) {
  const int64_t t = static_cast<int64_t>(blockIdx.x) * kVecThreads + threadIdx.x;
  const int g = static_cast<int>(t % groups);
  const int64_t first = (t / groups) * kStripsPerThread;
  if (first >= strip_count) return;
  const int64_t last = first + kStripsPerThread < strip_count ? first + kStripsPerThread : strip_count;
  const int c0 = 4 * g;

  // Weights as fp32, wt[(half * 9 + k) * G + g] holding tap k of channels 4g .. 4g + 3: copied
  // once into this thread's own slots of shared memory (no other thread reads them, so no
  // barrier), read back as float4 per tap. In registers, 72 of them with the window and the
  // strip loop's state spilled (ptxas, sm_90).
  __shared__ float4 ws[18][kVecThreads];
#pragma unroll
  for (int k = 0; k < 18; ++k) ws[k][threadIdx.x] = wt[static_cast<int64_t>(k) * groups + g];
  // lds128 hides its address from the compiler: keep these stores ahead of every read of them
  asm volatile("" ::: "memory");
  float ba[4], bg[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    ba[i] = bias ? bias[c0 + i] : 0.f;
    bg[i] = bias ? bias[ch + c0 + i] : 0.f;
  }

  const int64_t pixel_stride = 2 * static_cast<int64_t>(ch);  // elements per input pixel
  // The window: [row dy][column slot], value and gate halves; slot 2 is the newest column.
  uint2 xa[3][3], xg[3][3];
  int64_t windowed = -1;  // the strip whose successor the window is ready for (-1: none)
  for (int64_t item = first; item < last; ++item) {
    const int strip = static_cast<int>(item % strips);
    const int64_t rest = item / strips;
    const int oh = static_cast<int>(rest % H);
    const int64_t b = rest / H;
    const int ow0 = strip * kStrip;
    const T* img = x + b * H * W * pixel_stride;
    auto load_column = [&](int slot, int col) {
#pragma unroll
      for (int dy = 0; dy < 3; ++dy) {
        const int r = oh + dy - 1;
        const bool inside = r >= 0 && r < H && col >= 0 && col < W;
        const T* p = img + (static_cast<int64_t>(r) * W + col) * pixel_stride + c0;
        xa[dy][slot] = load4(p, inside);
        xg[dy][slot] = load4(p + ch, inside);
        if (Expand && inside) {  // padding stays zero: it pads the activated map
          xa[dy][slot] = expand_act4<T>(xa[dy][slot], expand_bias + c0);
          xg[dy][slot] = expand_act4<T>(xg[dy][slot], expand_bias + ch + c0);
        }
      }
    };
    if (windowed != item - 1 || strip == 0) {  // a fresh row (or run): load the first columns
      load_column(0, ow0 - 1);
      load_column(1, ow0);
    }
    T* orow = out + ((b * H + oh) * static_cast<int64_t>(W)) * ch + c0;
    windowed = -1;
#pragma unroll
    for (int j = 0; j < kStrip; ++j) {
      const int ow = ow0 + j;
      if (ow >= W) break;
      load_column(2, ow + 1);
      // Per channel: the taps row by row, then the bias (the per-element kernel's order).
      float a[4] = {0.f, 0.f, 0.f, 0.f}, gate[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
      for (int dy = 0; dy < 3; ++dy) {
#pragma unroll
        for (int dx = 0; dx < 3; ++dx) {
          const float4 wa = lds128(&ws[dy * 3 + dx][threadIdx.x]);
          const float4 wg = lds128(&ws[9 + dy * 3 + dx][threadIdx.x]);
          const float wa4[4] = {wa.x, wa.y, wa.z, wa.w}, wg4[4] = {wg.x, wg.y, wg.z, wg.w};
#pragma unroll
          for (int i = 0; i < 4; ++i) {
            a[i] += channel<T>(xa[dy][dx], i) * wa4[i];
            gate[i] += channel<T>(xg[dy][dx], i) * wg4[i];
          }
        }
      }
      float res[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const float av = a[i] + ba[i], gv = gate[i] + bg[i];
        res[i] = av * (gv / (1.f + expf(-gv)));
      }
      *reinterpret_cast<uint2*>(orow + static_cast<int64_t>(ow) * ch) =
          make_uint2(float2_to_pair<T>(res[0], res[1]), float2_to_pair<T>(res[2], res[3]));
      // Slide the window one column right.
#pragma unroll
      for (int dy = 0; dy < 3; ++dy) {
        xa[dy][0] = xa[dy][1];
        xa[dy][1] = xa[dy][2];
        xg[dy][0] = xg[dy][1];
        xg[dy][1] = xg[dy][2];
      }
      if (j == kStrip - 1) windowed = item;  // all kStrip columns done: the window slid fully
    }
  }
}

// The 4-channel kernel applies: channels_last-contiguous 16-bit x, Ch % 4 == 0, 8-byte aligned.
bool use_cl4_kernel(const at::Tensor& x, bool cl) {
  const auto st = x.scalar_type();
  return cl && (st == at::kHalf || st == at::kBFloat16) && (x.size(1) / 2) % 4 == 0 &&
         reinterpret_cast<uintptr_t>(x.const_data_ptr()) % 8 == 0;
}

template <typename T>
void launch_cl4(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& b,
                const at::Tensor& eb, at::Tensor& out, cudaStream_t stream) {
  const int64_t batch = x.size(0), ch = x.size(1) / 2, h = x.size(2), wd = x.size(3);
  const int64_t groups = ch / 4, strips = (wd + kStrip - 1) / kStrip;
  const int64_t strip_count = batch * h * strips;
  const int64_t runs = (strip_count + kStripsPerThread - 1) / kStripsPerThread;
  const int64_t blocks = (runs * groups + kVecThreads - 1) / kVecThreads;
  TORCH_CHECK(blocks <= 2147483647LL && ch <= (int64_t{1} << 30) && h < (int64_t{1} << 31) &&
                  wd < (int64_t{1} << 31),
              "dcgen::glu_depthwise_conv: input too large: ", x.sizes());
  // (2 Ch, 1, 3, 3) -> fp32 [half][tap][channel] in one copy, read 4 channels at a time
  // (float4: the channel offsets 4g are 16-byte aligned in a fresh tensor)
  at::Tensor wt = at::empty({2, 9, ch}, weight.options().dtype(at::kFloat));
  wt.copy_(weight.reshape({2, ch, 9}).transpose(1, 2));
  auto kernel = eb.defined() ? glu_depthwise_cl4_kernel<T, true> : glu_depthwise_cl4_kernel<T, false>;
  kernel<<<static_cast<unsigned>(blocks), kVecThreads, 0, stream>>>(
      reinterpret_cast<const T*>(x.const_data_ptr()),
      reinterpret_cast<const float4*>(wt.const_data_ptr<float>()),
      b.defined() ? b.const_data_ptr<float>() : nullptr,
      eb.defined() ? eb.const_data_ptr<float>() : nullptr,
      reinterpret_cast<T*>(out.mutable_data_ptr()), strip_count, static_cast<int>(groups),
      static_cast<int>(strips), static_cast<int>(h), static_cast<int>(wd), static_cast<int>(ch));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor glu_depthwise_conv_cuda(const at::Tensor& x, const at::Tensor& weight,
                                   const std::optional<at::Tensor>& bias,
                                   const std::optional<at::Tensor>& expand_bias) {
  TORCH_CHECK(x.is_cuda(), "dcgen::glu_depthwise_conv (CUDA): x is on ", x.device());
  TORCH_CHECK(x.dim() == 4, "dcgen::glu_depthwise_conv: expected x of shape (B, 2*Ch, H, W), got ",
              x.sizes());
  const auto st = x.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kHalf || st == at::kBFloat16,
              "dcgen::glu_depthwise_conv: expected x of dtype float32, float16 or bfloat16, got ", st);
  const int64_t c2 = x.size(1);
  TORCH_CHECK(c2 % 2 == 0, "dcgen::glu_depthwise_conv: expected an even channel count (value and "
              "gate halves), got ", c2);
  TORCH_CHECK(weight.dim() == 4 && weight.size(0) == c2 && weight.size(1) == 1 && weight.size(2) == 3 &&
                  weight.size(3) == 3,
              "dcgen::glu_depthwise_conv: expected weight of shape (", c2, ", 1, 3, 3), got ",
              weight.sizes());
  TORCH_CHECK(weight.device() == x.device(), "dcgen::glu_depthwise_conv: weight is on ",
              weight.device(), " but x is on ", x.device());
  at::Tensor b;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == c2,
                "dcgen::glu_depthwise_conv: expected bias of shape (", c2, "), got ", bias->sizes());
    TORCH_CHECK(bias->device() == x.device(), "dcgen::glu_depthwise_conv: bias is on ",
                bias->device(), " but x is on ", x.device());
    b = bias->to(at::kFloat).contiguous();
  }
  at::Tensor eb;
  if (expand_bias.has_value() && expand_bias->defined()) {
    TORCH_CHECK(expand_bias->dim() == 1 && expand_bias->size(0) == c2,
                "dcgen::glu_depthwise_conv: expected expand_bias of shape (", c2, "), got ",
                expand_bias->sizes());
    TORCH_CHECK(expand_bias->device() == x.device(), "dcgen::glu_depthwise_conv: expand_bias is on ",
                expand_bias->device(), " but x is on ", x.device());
    eb = expand_bias->to(at::kFloat).contiguous();
  }
  const c10::cuda::CUDAGuard guard(x.device());
  const bool cl = output_order::prefers_channels_last(x);
  const int64_t ch = c2 / 2, h = x.size(2), wd = x.size(3);
  at::Tensor out = at::empty({x.size(0), ch, h, wd}, x.options(),
                             cl ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous);
  if (out.numel() == 0) return out;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  if (use_cl4_kernel(x, cl)) {
    if (st == at::kBFloat16) {
      launch_cl4<__nv_bfloat16>(x, weight, b, eb, out, stream);
    } else {
      launch_cl4<__half>(x, weight, b, eb, out, stream);
    }
    return out;
  }
  const at::Tensor w = weight.to(at::kFloat).contiguous();  // the per-element kernel's layout
  const Strides4 xs = strides_of(x);
  const OutputGrid g = make_grid(out, cl);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, st, "glu_depthwise_conv_cuda", [&] {
    output_order::dispatch_layout(cl, [&](auto layout) {
      constexpr bool CL = decltype(layout)::value;
      glu_depthwise_kernel<scalar_t, CL><<<output_order::launch_blocks(g), output_order::kThreads, 0, stream>>>(
          x.const_data_ptr<scalar_t>(), w.const_data_ptr<float>(),
          b.defined() ? b.const_data_ptr<float>() : nullptr,
          eb.defined() ? eb.const_data_ptr<float>() : nullptr, out.mutable_data_ptr<scalar_t>(), g, xs);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(dcgen, CUDA, m) { m.impl("glu_depthwise_conv", &glu_depthwise_conv_cuda); }

}  // namespace dcgen
