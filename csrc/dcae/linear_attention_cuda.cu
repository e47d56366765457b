// ReLU linear attention on CUDA (spec: dcgen/ops/linear_attention.py).
//
// Two deterministic passes over the interleaved (BH, 3d, N) qkv tensor, fp32 throughout:
//  1. reduce: blocks (head, split) each sum [v;1] relu(k)^T over their slice of tokens into a
//     (d+1) x d partial in a workspace [BH, splits, d+1, d]; no atomics, so results do not
//     depend on scheduling.
//  2. apply: blocks (head, token tile) add the partials in a fixed order into shared memory,
//     then each thread takes one token: o = vk relu(q_n), out = o[:d] / (o[d] + eps).
// q, k and v are each read once per pass that needs them; the padded ones row is implicit.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>

namespace dcgen {
namespace {

constexpr int kMaxD = 32;
constexpr int kTile = 64;       // tokens staged in shared memory per step of the reduce
constexpr int kThreads = 256;

// D > 0: head dim known at compile time (the DC-AE / SANA value 32), so per-thread arrays stay
// in registers; D == 0: any d <= kMaxD at run time.
template <typename T, int D>
__global__ void linear_attention_reduce(const T* __restrict__ qkv, float* __restrict__ partial,
                                        int d_rt, int64_t n, int64_t per_split, int splits) {
  constexpr int kPer = ((kMaxD + 1) * kMaxD + kThreads - 1) / kThreads;
  __shared__ float ks[kMaxD][kTile + 1];
  __shared__ float vs[kMaxD][kTile + 1];
  const int d = D > 0 ? D : d_rt;
  const int64_t bh = blockIdx.y;
  const int split = blockIdx.x;
  const T* k = qkv + (bh * 3 * d + d) * n;
  const T* v = qkv + (bh * 3 * d + 2 * d) * n;
  const int64_t start = split * per_split;
  const int64_t stop = std::min<int64_t>(n, start + per_split);
  const int outputs = (d + 1) * d;  // row i = d is the "ones" row: sum_n k_j
  float acc[kPer];
#pragma unroll
  for (int r = 0; r < kPer; ++r) acc[r] = 0.f;

  for (int64_t t0 = start; t0 < stop; t0 += kTile) {
    const int len = static_cast<int>(std::min<int64_t>(kTile, stop - t0));
    for (int e = threadIdx.x; e < d * kTile; e += kThreads) {
      const int row = e / kTile, col = e % kTile;
      float kv = 0.f, vv = 0.f;
      if (col < len) {
        kv = fmaxf(static_cast<float>(k[row * n + t0 + col]), 0.f);
        vv = static_cast<float>(v[row * n + t0 + col]);
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

template <typename T, int D>
__global__ void linear_attention_apply(const T* __restrict__ qkv, const float* __restrict__ partial,
                                       T* __restrict__ y, int d_rt, int64_t n, int splits,
                                       float eps) {
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
  const T* q = qkv + bh * 3 * d * n + tok;
  constexpr int kQ = D > 0 ? D : kMaxD;
  float qr[kQ];
#pragma unroll
  for (int j = 0; j < kQ; ++j) qr[j] = j < d ? fmaxf(static_cast<float>(q[j * n]), 0.f) : 0.f;
  float den = 0.f;
#pragma unroll
  for (int j = 0; j < kQ; ++j) den += (j < d ? vk[d][j] : 0.f) * qr[j];
  const float inv = 1.f / (den + eps);
  T* out = y + bh * d * n + tok;
  for (int i = 0; i < d; ++i) {
    float s = 0.f;
#pragma unroll
    for (int j = 0; j < kQ; ++j) s += (j < d ? vk[i][j] : 0.f) * qr[j];
    out[i * n] = static_cast<T>(s * inv);
  }
}

template <typename T, int D>
void launch(const at::Tensor& qkv, at::Tensor& partial, at::Tensor& y, int d, int64_t bh, int64_t n,
            int64_t per_split, int splits, float eps, cudaStream_t stream) {
  linear_attention_reduce<T, D><<<dim3(splits, bh), kThreads, 0, stream>>>(
      qkv.const_data_ptr<T>(), partial.mutable_data_ptr<float>(), d, n, per_split, splits);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const int64_t tiles = (n + kThreads - 1) / kThreads;
  linear_attention_apply<T, D><<<dim3(tiles, bh), kThreads, 0, stream>>>(
      qkv.const_data_ptr<T>(), partial.const_data_ptr<float>(), y.mutable_data_ptr<T>(), d, n,
      splits, eps);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
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
  const at::Tensor qkv = qkv_in.contiguous();
  const int d = static_cast<int>(d64);
  const int64_t bh = qkv.size(0) * qkv.size(1);
  const int64_t n = qkv.size(3);
  TORCH_CHECK(bh <= 65535, "dcgen::relu_linear_attention: at most 65535 batch*heads, got ", bh);
  at::Tensor y = at::empty({qkv.size(0), qkv.size(1), d64, n}, qkv.options());
  if (y.numel() == 0) return y;
  // Enough (head, split) blocks to fill the GPU several times over; each split >= one tile.
  int sms = 132;
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, qkv.get_device());
  const int64_t want = std::max<int64_t>(1, (4 * sms + bh - 1) / bh);
  const int splits = static_cast<int>(std::min<int64_t>({want, (n + kTile - 1) / kTile, 256}));
  const int64_t per_split = ((n + splits - 1) / splits + kTile - 1) / kTile * kTile;
  at::Tensor partial = at::empty({bh, splits, d64 + 1, d64}, qkv.options().dtype(at::kFloat));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  auto run = [&](auto tag) {
    using T = decltype(tag);
    if (d == 32) {
      launch<T, 32>(qkv, partial, y, d, bh, n, per_split, splits, static_cast<float>(eps), stream);
    } else {
      launch<T, 0>(qkv, partial, y, d, bh, n, per_split, splits, static_cast<float>(eps), stream);
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
