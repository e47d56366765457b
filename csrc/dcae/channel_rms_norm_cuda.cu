// Channel RMSNorm on CUDA: fp32 statistics, one rounding to the output dtype.
//
// NCHW: one thread per pixel (or per V adjacent pixels with 16-byte vector loads when the plane
// size and pointers allow) walks the channels; neighbouring threads read neighbouring pixels of
// the same channel plane, so every load is coalesced. The second pass re-reads x, which is
// still in L2 for the block's pixels. channels_last: G lanes per pixel (G = min(32, C / V)),
// each holding P 16-byte packets of V channels in registers (one read of x, 16-byte loads and
// stores, the sum of squares reduced over the G lanes with shuffles) where C, the pointers and
// the weights allow; else one warp per pixel row, lanes striding over the channels with
// 2-byte accesses and reading x twice (about 1.5 TB/s for norm + residual at 4096^2 x 128 on
// the H200, half the NCHW kernel's rate). The fused variant (channel_rms_norm_fused) applies
// relu/silu to the affine result and adds a residual of x's shape before the one rounding;
// the plain op is the fused one with neither.
#include <ATen/Dispatch.h>
// c10/cuda headers only: ATen/cuda/CUDAContext.h drags in cuBLAS/cuSPARSE headers.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>
#include <utility>

#include "dcae/channel_rms_norm.h"

namespace dcgen {
namespace {

template <typename T>
__global__ void norm_planes_kernel(const T* __restrict__ x, T* __restrict__ y,
                                   const float* __restrict__ w, const float* __restrict__ b,
                                   const T* __restrict__ r, DcaeAct act, int64_t outer, int64_t C,
                                   int64_t inner, float eps) {
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= outer * inner) return;
  const int64_t o = idx / inner;
  const int64_t s = idx - o * inner;
  const T* xp = x + o * C * inner + s;
  const T* rp = r ? r + o * C * inner + s : nullptr;
  T* yp = y + o * C * inner + s;
  float acc = 0.f;
  for (int64_t c = 0; c < C; ++c) {
    const float v = static_cast<float>(xp[c * inner]);
    acc += v * v;
  }
  const float inv = rsqrtf(acc / static_cast<float>(C) + eps);
  for (int64_t c = 0; c < C; ++c) {
    float v = static_cast<float>(xp[c * inner]) * inv;
    if (w) v *= w[c];
    if (b) v += b[c];
    v = apply_dcae_act(v, act);
    if (rp) v += static_cast<float>(rp[c * inner]);
    yp[c * inner] = static_cast<T>(v);
  }
}

// V adjacent pixels per thread, moved as one 16-byte packet per channel.
template <typename T, int V>
struct alignas(sizeof(T) * V) Packet {
  T v[V];
};

template <typename T, int V>
__global__ void norm_planes_vec_kernel(const T* __restrict__ x, T* __restrict__ y,
                                       const float* __restrict__ w, const float* __restrict__ b,
                                       const T* __restrict__ r, DcaeAct act, int64_t outer,
                                       int64_t C, int64_t inner, float eps) {
  using P = Packet<T, V>;
  const int64_t groups = inner / V;
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= outer * groups) return;
  const int64_t o = idx / groups;
  const int64_t s = (idx - o * groups) * V;
  const T* xp = x + o * C * inner + s;
  const T* rp = r ? r + o * C * inner + s : nullptr;
  T* yp = y + o * C * inner + s;
  float acc[V];
#pragma unroll
  for (int j = 0; j < V; ++j) acc[j] = 0.f;
#pragma unroll 4
  for (int64_t c = 0; c < C; ++c) {
    const P p = *reinterpret_cast<const P*>(xp + c * inner);
#pragma unroll
    for (int j = 0; j < V; ++j) {
      const float v = static_cast<float>(p.v[j]);
      acc[j] += v * v;
    }
  }
  const float inv_c = 1.f / static_cast<float>(C);
#pragma unroll
  for (int j = 0; j < V; ++j) acc[j] = rsqrtf(acc[j] * inv_c + eps);
#pragma unroll 4
  for (int64_t c = 0; c < C; ++c) {
    const P p = *reinterpret_cast<const P*>(xp + c * inner);
    const float wc = w ? w[c] : 1.f;
    const float bc = b ? b[c] : 0.f;
    P rv;
    if (rp) rv = *reinterpret_cast<const P*>(rp + c * inner);
    P q;
#pragma unroll
    for (int j = 0; j < V; ++j) {
      float v = apply_dcae_act(static_cast<float>(p.v[j]) * acc[j] * wc + bc, act);
      if (rp) v += static_cast<float>(rv.v[j]);
      q.v[j] = static_cast<T>(v);
    }
    *reinterpret_cast<P*>(yp + c * inner) = q;
  }
}

template <typename T>
__global__ void norm_rows_kernel(const T* __restrict__ x, T* __restrict__ y,
                                 const float* __restrict__ w, const float* __restrict__ b,
                                 const T* __restrict__ r, DcaeAct act, int64_t rows, int64_t C,
                                 float eps) {
  const int lane = threadIdx.x & 31;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * (blockDim.x / 32) + (threadIdx.x >> 5);
  if (row >= rows) return;  // whole warps exit together: rows are warp-uniform
  const T* xr = x + row * C;
  const T* rr = r ? r + row * C : nullptr;
  T* yr = y + row * C;
  float acc = 0.f;
  for (int64_t c = lane; c < C; c += 32) {
    const float v = static_cast<float>(xr[c]);
    acc += v * v;
  }
  for (int offset = 16; offset > 0; offset >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, offset);
  const float inv = rsqrtf(acc / static_cast<float>(C) + eps);
  for (int64_t c = lane; c < C; c += 32) {
    float v = static_cast<float>(xr[c]) * inv;
    if (w) v *= w[c];
    if (b) v += b[c];
    v = apply_dcae_act(v, act);
    if (rr) v += static_cast<float>(rr[c]);
    yr[c] = static_cast<T>(v);
  }
}

// channels_last, 16-byte packets: G lanes per pixel row (a power of two <= 32; consecutive
// groups of lanes take consecutive pixels, so a warp's loads are 32 contiguous packets), each
// lane its P packets q = p * G + lane % G of V channels, kept in registers between the sum of
// squares and the output. The G lanes of a pixel exit together, and the shuffles use only
// their own lanes' mask.
template <typename T, int G, int P>
__global__ void norm_rows_vec_kernel(const T* __restrict__ x, T* __restrict__ y,
                                     const float* __restrict__ w, const float* __restrict__ b,
                                     const T* __restrict__ r, DcaeAct act, int64_t rows, int C,
                                     float eps) {
  constexpr int V = 16 / sizeof(T);
  using Pk = Packet<T, V>;
  const int lane = threadIdx.x & 31;
  const int sub = lane % G;
  const int64_t row = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / G;
  if (row >= rows) return;
  const unsigned mask = G == 32 ? 0xffffffffu : ((1u << G) - 1u) << (lane - sub);
  const Pk* xr = reinterpret_cast<const Pk*>(x + row * C);
  float v[P][V];
  float acc = 0.f;
#pragma unroll
  for (int p = 0; p < P; ++p) {
    const Pk pk = xr[p * G + sub];
#pragma unroll
    for (int i = 0; i < V; ++i) {
      v[p][i] = static_cast<float>(pk.v[i]);
      acc += v[p][i] * v[p][i];
    }
  }
#pragma unroll
  for (int offset = G / 2; offset > 0; offset >>= 1) acc += __shfl_xor_sync(mask, acc, offset);
  const float inv = rsqrtf(acc / static_cast<float>(C) + eps);
  const Pk* rr = r ? reinterpret_cast<const Pk*>(r + row * C) : nullptr;
  Pk* yr = reinterpret_cast<Pk*>(y + row * C);
#pragma unroll
  for (int p = 0; p < P; ++p) {
    const int q = p * G + sub;  // packet index: channels q * V .. q * V + V - 1
    float wv[V], bv[V];
#pragma unroll
    for (int i = 0; i < V; i += 4) {
      const float4 w4 = w ? reinterpret_cast<const float4*>(w + q * V)[i / 4] : make_float4(1.f, 1.f, 1.f, 1.f);
      const float4 b4 = b ? reinterpret_cast<const float4*>(b + q * V)[i / 4] : make_float4(0.f, 0.f, 0.f, 0.f);
      wv[i] = w4.x, wv[i + 1] = w4.y, wv[i + 2] = w4.z, wv[i + 3] = w4.w;
      bv[i] = b4.x, bv[i + 1] = b4.y, bv[i + 2] = b4.z, bv[i + 3] = b4.w;
    }
    Pk res;
    if (rr) res = rr[q];
    Pk out;
#pragma unroll
    for (int i = 0; i < V; ++i) {
      // the scalar kernels' operations in their order: * inv, * w, + b, act, + residual
      float o = v[p][i] * inv;
      if (w) o *= wv[i];
      if (b) o += bv[i];
      o = apply_dcae_act(o, act);
      if (rr) o += static_cast<float>(res.v[i]);
      out.v[i] = static_cast<T>(o);
    }
    yr[q] = out;
  }
}

// The packet kernel's (G, P) for C channels of V per packet, or G = 0 when it does not apply.
template <typename T>
std::pair<int, int> rows_vec_shape(int64_t C) {
  constexpr int V = 16 / sizeof(T);
  if (C % V) return {0, 0};
  const int64_t packets = C / V;
  if (packets >= 4 && packets < 32 && (packets & (packets - 1)) == 0) return {static_cast<int>(packets), 1};
  if (packets % 32 == 0 && packets / 32 <= 8 && ((packets / 32) & (packets / 32 - 1)) == 0)
    return {32, static_cast<int>(packets / 32)};
  return {0, 0};
}

template <typename T>
void launch_rows_vec(const T* x, T* y, const float* w, const float* b, const T* r, DcaeAct act,
                     int64_t rows, int64_t C, float eps, int G, int P, cudaStream_t stream) {
  constexpr int kThreads = 256;
  const int64_t blocks = (rows * G + kThreads - 1) / kThreads;
  TORCH_CHECK(blocks <= 2147483647LL, "dcgen::channel_rms_norm: input too large: ", rows, " rows");
  const dim3 grid(static_cast<unsigned>(blocks));
  const int c = static_cast<int>(C);
#define DCGEN_ROWS_VEC(GG, PP)                                                                    \
  norm_rows_vec_kernel<T, GG, PP><<<grid, kThreads, 0, stream>>>(x, y, w, b, r, act, rows, c, eps)
  if (G == 4) {
    DCGEN_ROWS_VEC(4, 1);
  } else if (G == 8) {
    DCGEN_ROWS_VEC(8, 1);
  } else if (G == 16) {
    DCGEN_ROWS_VEC(16, 1);
  } else if (P == 1) {
    DCGEN_ROWS_VEC(32, 1);
  } else if (P == 2) {
    DCGEN_ROWS_VEC(32, 2);
  } else if (P == 4) {
    DCGEN_ROWS_VEC(32, 4);
  } else {
    DCGEN_ROWS_VEC(32, 8);
  }
#undef DCGEN_ROWS_VEC
}

// act(norm(l.x)) (+ res) into out, which has l.x's layout (checked by the callers).
void launch_norm(const ChannelNormLayout& l, const at::Tensor& w, const at::Tensor& b,
                 const at::Tensor& res, DcaeAct act, double eps, const at::Tensor& out) {
  if (l.x.numel() == 0) return;
  const float* wp = w.defined() ? w.data_ptr<float>() : nullptr;
  const float* bp = b.defined() ? b.data_ptr<float>() : nullptr;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  constexpr int kThreads = 256;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, l.x.scalar_type(), "channel_rms_norm_cuda", [&] {
    const scalar_t* rp = res.defined() ? res.const_data_ptr<scalar_t>() : nullptr;
    scalar_t* op = reinterpret_cast<scalar_t*>(out.data_ptr());
    // Both packet kernels move x, out and the residual in 16-byte packets.
    const bool io16 = aligned16(l.x.const_data_ptr()) && aligned16(op) &&
                      (rp == nullptr || aligned16(rp));
    constexpr int V = 16 / sizeof(scalar_t);
    const auto [vg, vp] = rows_vec_shape<scalar_t>(l.channels);
    if (l.rows && vg > 0 && io16 && (wp == nullptr || aligned16(wp)) &&
        (bp == nullptr || aligned16(bp))) {  // the rows kernel reads w and b as float4 too
      launch_rows_vec<scalar_t>(l.x.const_data_ptr<scalar_t>(), op, wp, bp, rp, act, l.outer,
                                l.channels, static_cast<float>(eps), vg, vp, stream);
    } else if (l.rows) {
      const int64_t blocks = (l.outer + kThreads / 32 - 1) / (kThreads / 32);
      norm_rows_kernel<scalar_t><<<blocks, kThreads, 0, stream>>>(
          l.x.const_data_ptr<scalar_t>(), op, wp, bp, rp, act, l.outer, l.channels,
          static_cast<float>(eps));
    } else if (l.inner % V == 0 && io16) {  // the plane size a whole number of packets
      const int64_t blocks = (l.outer * (l.inner / V) + kThreads - 1) / kThreads;
      norm_planes_vec_kernel<scalar_t, V><<<blocks, kThreads, 0, stream>>>(
          l.x.const_data_ptr<scalar_t>(), op, wp, bp, rp, act, l.outer, l.channels, l.inner,
          static_cast<float>(eps));
    } else {
      const int64_t blocks = (l.outer * l.inner + kThreads - 1) / kThreads;
      norm_planes_kernel<scalar_t><<<blocks, kThreads, 0, stream>>>(
          l.x.const_data_ptr<scalar_t>(), op, wp, bp, rp, act, l.outer, l.channels, l.inner,
          static_cast<float>(eps));
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

at::Tensor channel_rms_norm_fused_cuda(const at::Tensor& input, const std::optional<at::Tensor>& weight,
                                       const std::optional<at::Tensor>& bias,
                                       const std::optional<at::Tensor>& residual,
                                       c10::string_view act_name, double eps) {
  TORCH_CHECK(input.is_cuda(), "dcgen::channel_rms_norm (CUDA): x is on ", input.device());
  const NormArgs a = prepare_norm(input, weight, bias, residual,
                                  std::string_view(act_name.data(), act_name.size()), eps);
  const c10::cuda::CUDAGuard guard(input.device());
  at::Tensor out = at::empty_like(a.l.x);
  launch_norm(a.l, a.w, a.b, a.res, a.act, eps, out);
  return out;
}

// The same into a caller's tensor (x itself or the residual included): no output allocation
// and no copy where the result belongs in place (the DC-AE ResBlocks' banded ending).
void channel_rms_norm_fused_out_cuda(const at::Tensor& input, const std::optional<at::Tensor>& weight,
                                     const std::optional<at::Tensor>& bias,
                                     const std::optional<at::Tensor>& residual,
                                     c10::string_view act_name, double eps, const at::Tensor& out) {
  TORCH_CHECK(input.is_cuda(), "dcgen::channel_rms_norm (CUDA): x is on ", input.device());
  const NormArgs a = prepare_norm(input, weight, bias, residual,
                                  std::string_view(act_name.data(), act_name.size()), eps);
  check_norm_out(out, a.l, input);  // before the guard: a bad call never touches the device
  const c10::cuda::CUDAGuard guard(input.device());
  launch_norm(a.l, a.w, a.b, a.res, a.act, eps, out);
}

at::Tensor channel_rms_norm_cuda(const at::Tensor& input, const std::optional<at::Tensor>& weight,
                                 const std::optional<at::Tensor>& bias, double eps) {
  return channel_rms_norm_fused_cuda(input, weight, bias, std::nullopt, "none", eps);
}

}  // namespace

TORCH_LIBRARY_IMPL(dcgen, CUDA, m) {
  m.impl("channel_rms_norm", &channel_rms_norm_cuda);
  m.impl("channel_rms_norm_fused_out", &channel_rms_norm_fused_out_cuda);
  m.impl("channel_rms_norm_fused", &channel_rms_norm_fused_cuda);
}

}  // namespace dcgen
