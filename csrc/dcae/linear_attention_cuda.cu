// ReLU linear attention on CUDA (spec: dcgen/ops/linear_attention.py).
//
// Two deterministic passes over the interleaved (B, heads, 3d, N) qkv tensor, fp32 throughout:
//  1. reduce: blocks (head, split) each sum [v;1] relu(k)^T over their slice of tokens into a
//     (d+1) x d partial in a workspace [BH, splits, d+1, d]; no atomics, so results do not
//     depend on scheduling.
//  2. apply: blocks (head, token tile) add the partials in a fixed order into shared memory,
//     then each thread takes one token: o = vk relu(q_n), out = o[:d] / (o[d] + eps).
// q, k and v are each read once per pass that needs them; the padded ones row is implicit.
// Channel-fastest qkv with d = 32 (every DC-AE and SANA head) takes a register-tiled reduce
// (linear_attention_reduce_tok32).
//
// Two layouts of qkv are read in place, through its strides:
//  - token-fastest (stride(3) == 1): a plain (B, heads, 3d, N) tensor; the output is the same
//    (B, heads, d, N), contiguous;
//  - channel-fastest (stride(2) == 1, TOK): the view LiteMLA takes of a channels_last conv
//    output (B, 3 heads d, H, W), where a token's channels are contiguous. The output is laid
//    out the same way, (B, heads, d, N) with strides (N heads d, d, 1, heads d), so its
//    (B, heads d, H, W) view is channels_last again. Both views are free: before, the kernel made
//    qkv contiguous (a transposing copy of the whole qkv map) and LiteMLA copied the output back
//    to channels_last, two layout copies per block.
// Any other layout is copied to the first.
#include <ATen/core/Tensor.h>  // not ATen/ATen.h: every op's header, minutes of nvcc time
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>

#include "dcae/elementwise.h"

namespace dcgen {
namespace {

constexpr int kMaxD = 32;
constexpr int kTile = 64;       // tokens staged in shared memory per step of the reduce
constexpr int kThreads = 256;

// Element strides of qkv (and of the output) as (B, heads, rows, N), and the head count.
struct Layout4 {
  int64_t sb, sh, sr, sn;
  int heads;
};

__device__ __forceinline__ int64_t head_offset(const Layout4& L, int64_t bh) {
  return (bh / L.heads) * L.sb + (bh % L.heads) * L.sh;
}

// D > 0: head dim known at compile time (the DC-AE / SANA value 32), so per-thread arrays stay
// in registers; D == 0: any d <= kMaxD at run time. TOK: channel-fastest layout (L.sr == 1),
// else token-fastest (L.sn == 1).
template <typename T, int D, bool TOK>
__global__ void linear_attention_reduce(const T* __restrict__ qkv, Layout4 L,
                                        float* __restrict__ partial, int d_rt, int64_t n,
                                        int64_t per_split, int splits) {
  constexpr int kPer = ((kMaxD + 1) * kMaxD + kThreads - 1) / kThreads;
  __shared__ float ks[kMaxD][kTile + 1];
  __shared__ float vs[kMaxD][kTile + 1];
  const int d = D > 0 ? D : d_rt;
  const int64_t bh = blockIdx.y;
  const int split = blockIdx.x;
  const T* base = qkv + head_offset(L, bh);
  const T* k = base + d * L.sr;
  const T* v = base + 2 * d * L.sr;
  const int64_t start = split * per_split;
  const int64_t stop = std::min<int64_t>(n, start + per_split);
  const int outputs = (d + 1) * d;  // row i = d is the "ones" row: sum_n k_j
  float acc[kPer];
#pragma unroll
  for (int r = 0; r < kPer; ++r) acc[r] = 0.f;

  for (int64_t t0 = start; t0 < stop; t0 += kTile) {
    const int len = static_cast<int>(std::min<int64_t>(kTile, stop - t0));
    for (int e = threadIdx.x; e < d * kTile; e += kThreads) {
      // consecutive threads read consecutive elements of the fastest dimension
      const int row = TOK ? e % d : e / kTile;
      const int col = TOK ? e / d : e % kTile;
      float kv = 0.f, vv = 0.f;
      if (col < len) {
        const int64_t off = TOK ? row + (t0 + col) * L.sn : row * L.sr + t0 + col;
        kv = fmaxf(static_cast<float>(k[off]), 0.f);
        vv = static_cast<float>(v[off]);
      }
      ks[row][col] = kv;
      vs[row][col] = vv;
    }
    __syncthreads();
#pragma unroll
    for (int r = 0; r < kPer; ++r) {
      const int o = threadIdx.x + r * kThreads;
      if (o < outputs) {
        const int i = o / d, j = o % d;
        float s = 0.f;
        if (i < d) {
          for (int c = 0; c < len; ++c) s += vs[i][c] * ks[j][c];
        } else {
          for (int c = 0; c < len; ++c) s += ks[j][c];
        }
        acc[r] += s;
      }
    }
    __syncthreads();
  }
  float* out = partial + (bh * splits + split) * outputs;
#pragma unroll
  for (int r = 0; r < kPer; ++r) {
    const int o = threadIdx.x + r * kThreads;
    if (o < outputs) out[o] = acc[r];
  }
}

// The reduce for channel-fastest qkv with d = 32 (every DC-AE and SANA head), register-tiled:
// the generic reduce above gives each thread whole dot products over the staged tile, two
// scalar shared-memory loads per FMA (ptxas sm_90: 465 LDS for 155 FFMA), which made it bound
// by shared memory. Here the tile is staged token-major (kT[c][j]: a token's 32 channels in a
// row), and thread (group, ti, tj) accumulates the 4x4 block [4 ti, 4 ti + 4) x [4 tj, 4 tj + 4)
// of [v;1] k^T (and the ones row's 4 columns) over its group's quarter of each tile's tokens:
// two 16-byte loads per 16 FMAs. The four groups' sums are added in a fixed order at the end.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    linear_attention_reduce_tok32(const T* __restrict__ qkv, Layout4 L, float* __restrict__ partial,
                                  int64_t n, int64_t per_split, int splits) {
  constexpr int D = 32;
  static_assert(kThreads % 64 == 0 && kTile % (kThreads / 64) == 0, "thread layout");
  constexpr int kGroups = kThreads / 64;      // token groups of 64 threads (8 x 8 blocks each)
  constexpr int kPerGroup = kTile / kGroups;  // tokens of a tile per group
  __shared__ __align__(16) float kT[kTile][D];
  __shared__ __align__(16) float vT[kTile][D];
  __shared__ float red[kGroups][D + 1][D];
  const int64_t bh = blockIdx.y;
  const int split = blockIdx.x;
  const T* base = qkv + head_offset(L, bh);
  const T* k = base + D;  // rows d .. 2d - 1 (channel stride 1)
  const T* v = base + 2 * D;
  const int64_t start = split * per_split;
  const int64_t stop = std::min<int64_t>(n, start + per_split);
  const int grp = threadIdx.x / 64, ti = (threadIdx.x % 64) / 8, tj = threadIdx.x % 8;
  float acc[4][4], ones[4];
#pragma unroll
  for (int a = 0; a < 4; ++a) {
    ones[a] = 0.f;
#pragma unroll
    for (int b = 0; b < 4; ++b) acc[a][b] = 0.f;
  }
  for (int64_t t0 = start; t0 < stop; t0 += kTile) {
    const int len = static_cast<int>(std::min<int64_t>(kTile, stop - t0));
    for (int e = threadIdx.x; e < D * kTile; e += kThreads) {
      const int j = e % D, c = e / D;  // consecutive threads: one token's consecutive channels
      float kv = 0.f, vv = 0.f;        // tokens past the tile's end count as zeros
      if (c < len) {
        const int64_t off = (t0 + c) * L.sn + j;
        kv = fmaxf(static_cast<float>(k[off]), 0.f);
        vv = static_cast<float>(v[off]);
      }
      kT[c][j] = kv;
      vT[c][j] = vv;
    }
    __syncthreads();
#pragma unroll 4
    for (int c = grp * kPerGroup; c < (grp + 1) * kPerGroup; ++c) {
      const float4 v4 = *reinterpret_cast<const float4*>(&vT[c][4 * ti]);
      const float4 k4 = *reinterpret_cast<const float4*>(&kT[c][4 * tj]);
      const float vv[4] = {v4.x, v4.y, v4.z, v4.w}, kk[4] = {k4.x, k4.y, k4.z, k4.w};
#pragma unroll
      for (int a = 0; a < 4; ++a) {
#pragma unroll
        for (int b = 0; b < 4; ++b) acc[a][b] += vv[a] * kk[b];
      }
#pragma unroll
      for (int b = 0; b < 4; ++b) ones[b] += kk[b];
    }
    __syncthreads();
  }
#pragma unroll
  for (int a = 0; a < 4; ++a) {
#pragma unroll
    for (int b = 0; b < 4; ++b) red[grp][4 * ti + a][4 * tj + b] = acc[a][b];
  }
  if (ti == 0) {
#pragma unroll
    for (int b = 0; b < 4; ++b) red[grp][D][4 * tj + b] = ones[b];
  }
  __syncthreads();
  float* out = partial + (bh * splits + split) * ((D + 1) * D);
  for (int o = threadIdx.x; o < (D + 1) * D; o += kThreads) {
    const int i = o / D, j = o % D;
    float s = red[0][i][j];
#pragma unroll
    for (int g = 1; g < kGroups; ++g) s += red[g][i][j];  // fixed order: deterministic
    out[o] = s;
  }
}

// The D values of one token as floats: 16-byte loads (vec: TOK, D == 32 and every address
// 16-byte aligned, checked on the host) or one load per element.
template <typename T, int D, bool TOK>
__device__ __forceinline__ void load_token(const T* __restrict__ p, int64_t stride, int d,
                                           bool vec, float* r) {
  constexpr int kQ = D > 0 ? D : kMaxD;
  if constexpr (TOK && D == 32) {
    if (vec) {
      constexpr int kChunks = D * sizeof(T) / 16;
      constexpr int kPerChunk = 16 / sizeof(T);
#pragma unroll
      for (int c = 0; c < kChunks; ++c) {
        const uint4 u = reinterpret_cast<const uint4*>(p)[c];
        const T* e = reinterpret_cast<const T*>(&u);
#pragma unroll
        for (int t = 0; t < kPerChunk; ++t) r[c * kPerChunk + t] = static_cast<float>(e[t]);
      }
      return;
    }
  }
#pragma unroll
  for (int j = 0; j < kQ; ++j) r[j] = j < d ? static_cast<float>(p[j * stride]) : 0.f;
}

template <typename T, int D, bool TOK>
__global__ void linear_attention_apply(const T* __restrict__ qkv, Layout4 L,
                                       const float* __restrict__ partial, T* __restrict__ y,
                                       Layout4 Y, int d_rt, int64_t n, int splits, float eps,
                                       bool vec) {
  __shared__ float vk[kMaxD + 1][kMaxD];
  const int d = D > 0 ? D : d_rt;
  const int64_t bh = blockIdx.y;
  const int outputs = (d + 1) * d;
  const float* p = partial + bh * splits * outputs;
  for (int o = threadIdx.x; o < outputs; o += kThreads) {
    float s = 0.f;
    for (int sp = 0; sp < splits; ++sp) s += p[sp * outputs + o];  // fixed order: deterministic
    vk[o / d][o % d] = s;
  }
  __syncthreads();
  const int64_t tok = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (tok >= n) return;
  constexpr int kQ = D > 0 ? D : kMaxD;
  float qr[kQ];
  load_token<T, D, TOK>(qkv + head_offset(L, bh) + tok * L.sn, L.sr, d, vec, qr);
#pragma unroll
  for (int j = 0; j < kQ; ++j) qr[j] = fmaxf(qr[j], 0.f);
  float den = 0.f;
#pragma unroll
  for (int j = 0; j < kQ; ++j) den += (j < d ? vk[d][j] : 0.f) * qr[j];
  const float inv = 1.f / (den + eps);
  T* out = y + head_offset(Y, bh) + tok * Y.sn;
  if constexpr (TOK && D == 32) {
    if (vec) {  // the token's D outputs are contiguous: 16-byte stores
      constexpr int kPerChunk = 16 / sizeof(T);
#pragma unroll
      for (int c = 0; c < D / kPerChunk; ++c) {
        uint4 u;
        T* e = reinterpret_cast<T*>(&u);
#pragma unroll
        for (int t = 0; t < kPerChunk; ++t) {
          const int i = c * kPerChunk + t;
          float s = 0.f;
#pragma unroll
          for (int j = 0; j < kQ; ++j) s += vk[i][j] * qr[j];
          e[t] = static_cast<T>(s * inv);
        }
        reinterpret_cast<uint4*>(out)[c] = u;
      }
      return;
    }
  }
  for (int i = 0; i < d; ++i) {
    float s = 0.f;
#pragma unroll
    for (int j = 0; j < kQ; ++j) s += (j < d ? vk[i][j] : 0.f) * qr[j];
    out[i * Y.sr] = static_cast<T>(s * inv);
  }
}

template <typename T, int D, bool TOK>
void launch(const at::Tensor& qkv, const Layout4& L, at::Tensor& partial, at::Tensor& y,
            const Layout4& Y, int d, int64_t bh, int64_t n, int64_t per_split, int splits,
            float eps, bool vec, cudaStream_t stream) {
  if constexpr (TOK && D == 32) {
    linear_attention_reduce_tok32<T><<<dim3(splits, bh), kThreads, 0, stream>>>(
        qkv.const_data_ptr<T>(), L, partial.mutable_data_ptr<float>(), n, per_split, splits);
  } else {
    linear_attention_reduce<T, D, TOK><<<dim3(splits, bh), kThreads, 0, stream>>>(
        qkv.const_data_ptr<T>(), L, partial.mutable_data_ptr<float>(), d, n, per_split, splits);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const int64_t tiles = (n + kThreads - 1) / kThreads;
  linear_attention_apply<T, D, TOK><<<dim3(tiles, bh), kThreads, 0, stream>>>(
      qkv.const_data_ptr<T>(), L, partial.const_data_ptr<float>(), y.mutable_data_ptr<T>(), Y, d,
      n, splits, eps, vec);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

Layout4 layout_of(const at::Tensor& t) {
  return Layout4{t.stride(0), t.stride(1), t.stride(2), t.stride(3), static_cast<int>(t.size(1))};
}

at::Tensor relu_linear_attention_cuda(const at::Tensor& qkv_in, double eps) {
  TORCH_CHECK(qkv_in.is_cuda(), "dcgen::relu_linear_attention (CUDA): qkv is on ", qkv_in.device());
  TORCH_CHECK(qkv_in.dim() == 4 && qkv_in.size(2) % 3 == 0,
              "dcgen::relu_linear_attention: expected qkv of shape (B, heads, 3*d, N), got ",
              qkv_in.sizes());
  const int64_t d64 = qkv_in.size(2) / 3;
  TORCH_CHECK(d64 >= 1 && d64 <= kMaxD, "dcgen::relu_linear_attention: head dim must be in [1, ",
              kMaxD, "], got ", d64);
  TORCH_CHECK(eps > 0, "dcgen::relu_linear_attention: expected eps > 0, got ", eps);
  const c10::cuda::CUDAGuard guard(qkv_in.device());
  const int64_t bh = qkv_in.size(0) * qkv_in.size(1);
  const int64_t n = qkv_in.size(3);
  TORCH_CHECK(bh <= 65535, "dcgen::relu_linear_attention: at most 65535 batch*heads, got ", bh);
  // Channel-fastest (the channels_last view) or token-fastest qkv is read in place; a token
  // count of 1 has no token stride to speak of and takes the plain layout.
  const bool tok = qkv_in.stride(2) == 1 && n > 1 && qkv_in.stride(3) != 1;
  const at::Tensor qkv = tok || qkv_in.stride(3) == 1 ? qkv_in : qkv_in.contiguous();
  const int d = static_cast<int>(d64);
  const int64_t batch = qkv.size(0), heads = qkv.size(1);
  // The output in qkv's order: (B, N, heads, d) memory viewed as (B, heads, d, N) when tok.
  at::Tensor y = tok ? at::empty({batch, n, heads, d64}, qkv.options()).permute({0, 2, 3, 1})
                     : at::empty({batch, heads, d64, n}, qkv.options());
  if (y.numel() == 0) return y;
  const Layout4 L = layout_of(qkv), Y = layout_of(y);
  // 16-byte token loads and stores: D = 32, every head's and token's start 16-byte aligned.
  const int64_t per16 = 16 / qkv.element_size();
  const bool vec = tok && d == 32 && aligned16(qkv.const_data_ptr()) &&
                   L.sb % per16 == 0 && L.sh % per16 == 0 && L.sn % per16 == 0 &&
                   Y.sb % per16 == 0 && Y.sh % per16 == 0 && Y.sn % per16 == 0;
  // Enough (head, split) blocks to fill the GPU several times over; each split >= one tile.
  int sms = 132;
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, qkv.get_device());
  const int64_t want = std::max<int64_t>(1, (4 * sms + bh - 1) / bh);
  const int splits = static_cast<int>(std::min<int64_t>({want, (n + kTile - 1) / kTile, 256}));
  const int64_t per_split = ((n + splits - 1) / splits + kTile - 1) / kTile * kTile;
  at::Tensor partial = at::empty({bh, splits, d64 + 1, d64}, qkv.options().dtype(at::kFloat));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const float e = static_cast<float>(eps);
  auto run = [&](auto tag) {
    using T = decltype(tag);
    if (tok) {
      if (d == 32) {
        launch<T, 32, true>(qkv, L, partial, y, Y, d, bh, n, per_split, splits, e, vec, stream);
      } else {
        launch<T, 0, true>(qkv, L, partial, y, Y, d, bh, n, per_split, splits, e, vec, stream);
      }
    } else if (d == 32) {
      launch<T, 32, false>(qkv, L, partial, y, Y, d, bh, n, per_split, splits, e, vec, stream);
    } else {
      launch<T, 0, false>(qkv, L, partial, y, Y, d, bh, n, per_split, splits, e, vec, stream);
    }
  };
  switch (qkv.scalar_type()) {
    case at::kFloat: run(float{}); break;
    case at::kHalf: run(at::Half{}); break;
    case at::kBFloat16: run(at::BFloat16{}); break;
    default:
      TORCH_CHECK(false, "dcgen::relu_linear_attention: expected float32, float16 or bfloat16, got ",
                  qkv.scalar_type());
  }
  return y;
}

}  // namespace

TORCH_LIBRARY_IMPL(dcgen, CUDA, m) { m.impl("relu_linear_attention", &relu_linear_attention_cuda); }

}  // namespace dcgen
