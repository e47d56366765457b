// The elementwise glue of a FLUX / SANA-style DiT block, one pass each instead of two or three:
//
//   adaln_modulate(x, shift, scale):  LayerNorm(x) * (1 + scale[b]) + shift[b]
//   gated_residual(x, gate, y):       x + gate[b] * y
//   adaln_modulate_fp8(x, shift, scale): adaln_modulate's output and its FP8 (E4M3) row
//                                     quantization (dcgen::quantize_fp8, block 0), one kernel
//
// x, y: [M, D] rows of B sequences of S tokens (b = row / S); shift, scale, gate: [B, D] with
// unit column stride and any row stride (they are chunks of the modulation linear's output).
// fp32 statistics and arithmetic, one rounding to x's dtype. Spec: dcgen/ops/modulation.py.
//
// adaln_modulate(_fp8): one CTA per row, the row staged once from global memory and re-read from
// L1 for the mean, the variance about it (two passes: no E[x^2] - E[x]^2 cancellation) and the
// output. gated_residual: one thread per 8 consecutive elements.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "nvfp4/fp8_row.cuh"
#include "nvfp4/quant_common.cuh"

namespace dcgen {
namespace {

using quant::count_valid;
using quant::from_float;
using quant::load8;
using quant::store8;
using quant::to_float;

constexpr int kRowThreads = 256;

__device__ __forceinline__ float block_sum(float v, float* shared) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  const int warp = threadIdx.x >> 5;
  __syncthreads();  // `shared` may still be read from the previous reduction
  if ((threadIdx.x & 31) == 0) shared[warp] = v;
  __syncthreads();
  float total = 0.f;
#pragma unroll
  for (int w = 0; w < kRowThreads / 32; ++w) total += shared[w];  // fixed order: deterministic
  return total;
}

// mean and 1 / sqrt(var + eps) of row xr (D elements), in fp32, returned to every thread: the
// row staged once from global memory and re-read from L1; the variance about the mean (two
// passes: no E[x^2] - E[x]^2 cancellation).
template <typename T>
__device__ __forceinline__ float2 row_mean_rstd(const T* __restrict__ xr, int64_t D, float eps,
                                                bool vec, float* partial) {
  float vals[8];
  float sum = 0.f;
  for (int64_t k0 = threadIdx.x * 8; k0 < D; k0 += kRowThreads * 8) {
    const int valid = count_valid(D - k0, 8);
    load8(xr + k0, valid, vec && valid == 8, vals);
#pragma unroll
    for (int i = 0; i < 8; ++i) sum += vals[i];  // absent elements load as 0
  }
  const float mean = block_sum(sum, partial) / static_cast<float>(D);

  float sq = 0.f;
  for (int64_t k0 = threadIdx.x * 8; k0 < D; k0 += kRowThreads * 8) {
    const int valid = count_valid(D - k0, 8);
    load8(xr + k0, valid, vec && valid == 8, vals);
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      const float d = i < valid ? vals[i] - mean : 0.f;
      sq += d * d;
    }
  }
  return make_float2(mean, rsqrtf(block_sum(sq, partial) / static_cast<float>(D) + eps));
}

// The 8 modulated values (x - mean) * rstd * (1 + scale) + shift at k0, 0 past D. Each rounding
// step is pinned (no contraction choice left to the compiler): adaln_modulate and
// adaln_modulate_fp8 give the same bits whatever nvcc fuses.
template <typename T, typename P>
__device__ __forceinline__ void modulate8(const T* __restrict__ xr, const P* __restrict__ sh,
                                          const P* __restrict__ sc, int64_t k0, int valid,
                                          bool vec, float2 stats, float o[8]) {
  load8(xr + k0, valid, vec, o);
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    if (i < valid) {
      const float n = __fmul_rn(__fsub_rn(o[i], stats.x), stats.y);
      o[i] = __fmaf_rn(n, __fadd_rn(1.f, to_float(sc[k0 + i])), to_float(sh[k0 + i]));
    } else {
      o[i] = 0.f;
    }
  }
}

// P: the parameter (shift / scale) element type.
template <typename T, typename P>
__global__ void adaln_modulate_kernel(const T* __restrict__ x, const P* __restrict__ shift,
                                      const P* __restrict__ scale, T* __restrict__ out, int64_t D,
                                      int64_t rows_per_batch, int64_t shift_stride,
                                      int64_t scale_stride, float eps, bool vec) {
  __shared__ float partial[kRowThreads / 32];
  const int64_t row = blockIdx.x;
  const int64_t b = row / rows_per_batch;
  const T* xr = x + row * D;
  T* orow = out + row * D;
  const P* sh = shift + b * shift_stride;  // each its own row stride (two chunks of one
  const P* sc = scale + b * scale_stride;  // embedding, or separate tensors, or 0: broadcast)
  const float2 stats = row_mean_rstd(xr, D, eps, vec, partial);
  for (int64_t k0 = threadIdx.x * 8; k0 < D; k0 += kRowThreads * 8) {
    const int valid = count_valid(D - k0, 8);
    const bool v = vec && valid == 8;
    float o[8];
    modulate8(xr, sh, sc, k0, valid, v, stats, o);
    store8<T>(orow + k0, o, valid, v);
  }
}

// adaln_modulate with the FP8 (E4M3) row quantization of its output on the way out: the row is
// written as adaln_modulate writes it while the CTA reduces the amax of the rounded values,
// then each thread reads its stored values back (L2) and encodes them as dcgen::quantize_fp8
// (block 0) encodes the stored row: same scale, same bytes (quant::store_row_and_quantize).
// Saves the quantize kernel's read of the row (4,608 x 3,072 bf16 per FLUX 4K block input).
template <typename T, typename P>
__global__ void adaln_modulate_fp8_kernel(const T* __restrict__ x, const P* __restrict__ shift,
                                          const P* __restrict__ scale, T* __restrict__ out,
                                          uint8_t* __restrict__ q, float* __restrict__ q_scales,
                                          int64_t D, int64_t rows_per_batch, int64_t shift_stride,
                                          int64_t scale_stride, float eps, bool vec, bool qvec) {
  __shared__ float partial[kRowThreads / 32];
  const int64_t row = blockIdx.x;
  const int64_t b = row / rows_per_batch;
  const T* xr = x + row * D;
  T* orow = out + row * D;
  const P* sh = shift + b * shift_stride;
  const P* sc = scale + b * scale_stride;
  const float2 stats = row_mean_rstd(xr, D, eps, vec, partial);
  // The stored element's value: the quantize reads the 16-bit output, not the fp32 one.
  quant::store_row_and_quantize<kRowThreads, T>(
      orow, q + row * D, q_scales + row, D, vec, qvec,
      [&](int64_t k0, int valid, bool v, float (&o)[8]) {
        modulate8(xr, sh, sc, k0, valid, v, stats, o);
#pragma unroll
        for (int i = 0; i < 8; ++i) o[i] = to_float(from_float<T>(o[i]));
      });
}

template <typename T, typename P>
__global__ void gated_residual_kernel(const T* __restrict__ x, const P* __restrict__ gate,
                                      const T* __restrict__ y, T* __restrict__ out, int64_t M,
                                      int64_t D, int64_t groups, int64_t rows_per_batch,
                                      int64_t param_stride, bool vec) {
  const int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (t >= M * groups) return;
  const int64_t row = t / groups;
  const int64_t k0 = (t - row * groups) * 8;
  const int valid = count_valid(D - k0, 8);
  const bool v = vec && valid == 8;
  const P* g = gate + (row / rows_per_batch) * param_stride + k0;
  float xv[8], yv[8], o[8];
  load8(x + row * D + k0, valid, v, xv);
  load8(y + row * D + k0, valid, v, yv);
#pragma unroll
  for (int i = 0; i < 8; ++i) o[i] = i < valid ? xv[i] + to_float(g[i]) * yv[i] : 0.f;
  store8<T>(out + row * D + k0, o, valid, v);
}

struct Rows {
  int64_t M, D, B, S;
};

// x [M, D] contiguous bf16 / fp16; a [B, D] parameter with unit column stride, same device.
Rows check_rows(const char* op, const at::Tensor& x, int64_t rows_per_batch) {
  TORCH_CHECK(x.is_cuda(), "dcgen::", op, " (CUDA): expected x on a CUDA device, got ", x.device());
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), "dcgen::", op,
              ": expected a contiguous x of shape [M, D], got ", x.sizes(), " strides ",
              x.strides());
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kHalf, "dcgen::", op,
              ": expected x of dtype bfloat16 or float16, got ", x.scalar_type());
  const int64_t M = x.size(0), D = x.size(1);
  TORCH_CHECK(rows_per_batch >= 1 && M % rows_per_batch == 0, "dcgen::", op,
              ": expected rows_per_batch >= 1 dividing M = ", M, ", got ", rows_per_batch);
  return {M, D, M / rows_per_batch, rows_per_batch};
}

void check_param(const char* op, const char* name, const at::Tensor& p, const at::Tensor& x,
                 const Rows& r) {
  TORCH_CHECK(p.device() == x.device(), "dcgen::", op, ": ", name, " is on ", p.device(),
              ", x on ", x.device());
  TORCH_CHECK(p.dim() == 2 && p.size(0) == r.B && p.size(1) == r.D && p.stride(1) == 1, "dcgen::",
              op, ": expected ", name, " of shape [", r.B, ", ", r.D,
              "] with unit column stride, got ", p.sizes(), " strides ", p.strides());
  TORCH_CHECK(p.scalar_type() == x.scalar_type() || p.scalar_type() == at::kFloat, "dcgen::", op,
              ": expected ", name, " of x's dtype or float32, got ", p.scalar_type());
}

// fn(T{}, P{}) for x's element type T (bf16 / fp16) and the parameter's P (T or float).
template <typename Fn>
void dispatch_types(const at::Tensor& x, const at::Tensor& param, Fn&& fn) {
  auto with_t = [&](auto t) {
    using T = decltype(t);
    if (param.scalar_type() == at::kFloat) {
      fn(t, float{});
    } else {
      fn(t, T{});
    }
  };
  if (x.scalar_type() == at::kBFloat16) {
    with_t(__nv_bfloat16{});
  } else {
    with_t(__half{});
  }
}

// The checks both adaln kernels make; returns the row shape.
Rows check_adaln(const char* op, const at::Tensor& x, const at::Tensor& shift,
                 const at::Tensor& scale, int64_t rows_per_batch, double eps) {
  const Rows r = check_rows(op, x, rows_per_batch);
  check_param(op, "shift", shift, x, r);
  check_param(op, "scale", scale, x, r);
  TORCH_CHECK(shift.scalar_type() == scale.scalar_type(), "dcgen::", op, ": shift is ",
              shift.scalar_type(), ", scale ", scale.scalar_type());
  TORCH_CHECK(eps > 0, "dcgen::", op, ": expected eps > 0, got ", eps);
  TORCH_CHECK(r.D >= 1, "dcgen::", op, ": expected D >= 1, got ", x.sizes());
  TORCH_CHECK(r.M <= 2147483647LL, "dcgen::", op, ": too many rows: ", r.M);
  return r;
}

bool aligned16(const at::Tensor& t) {
  return reinterpret_cast<uintptr_t>(t.const_data_ptr()) % 16 == 0;
}

at::Tensor adaln_modulate_cuda(const at::Tensor& x, const at::Tensor& shift, const at::Tensor& scale,
                               int64_t rows_per_batch, double eps) {
  const Rows r = check_adaln("adaln_modulate", x, shift, scale, rows_per_batch, eps);
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor out = at::empty_like(x);
  if (r.M == 0) return out;
  const bool vec = r.D % 8 == 0 && aligned16(x) && aligned16(out);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  dispatch_types(x, shift, [&](auto t, auto p) {
    using T = decltype(t);
    using P = decltype(p);
    adaln_modulate_kernel<T, P><<<r.M, kRowThreads, 0, stream>>>(
        reinterpret_cast<const T*>(x.const_data_ptr()),
        reinterpret_cast<const P*>(shift.const_data_ptr()),
        reinterpret_cast<const P*>(scale.const_data_ptr()),
        reinterpret_cast<T*>(out.mutable_data_ptr()), r.D, r.S, shift.stride(0), scale.stride(0),
        static_cast<float>(eps), vec);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

// (out [M, D] like x, q float8_e4m3fn [M, D], q_scales fp32 [M, 1]): out = adaln_modulate(...),
// (q, q_scales) = quantize_fp8(out, block 0), bit for bit.
std::tuple<at::Tensor, at::Tensor, at::Tensor> adaln_modulate_fp8_cuda(
    const at::Tensor& x, const at::Tensor& shift, const at::Tensor& scale, int64_t rows_per_batch,
    double eps) {
  const Rows r = check_adaln("adaln_modulate_fp8", x, shift, scale, rows_per_batch, eps);
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor out = at::empty_like(x);
  at::Tensor q = at::empty({r.M, r.D}, x.options().dtype(at::kFloat8_e4m3fn));
  at::Tensor q_scales = at::empty({r.M, 1}, x.options().dtype(at::kFloat));
  if (r.M == 0) return {out, q, q_scales};
  const bool vec = r.D % 8 == 0 && aligned16(x) && aligned16(out);
  const bool qvec = r.D % 8 == 0 && reinterpret_cast<uintptr_t>(q.const_data_ptr()) % 8 == 0;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  dispatch_types(x, shift, [&](auto t, auto p) {
    using T = decltype(t);
    using P = decltype(p);
    adaln_modulate_fp8_kernel<T, P><<<r.M, kRowThreads, 0, stream>>>(
        reinterpret_cast<const T*>(x.const_data_ptr()),
        reinterpret_cast<const P*>(shift.const_data_ptr()),
        reinterpret_cast<const P*>(scale.const_data_ptr()),
        reinterpret_cast<T*>(out.mutable_data_ptr()),
        reinterpret_cast<uint8_t*>(q.mutable_data_ptr()), q_scales.mutable_data_ptr<float>(), r.D,
        r.S, shift.stride(0), scale.stride(0), static_cast<float>(eps), vec, qvec);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {out, q, q_scales};
}

at::Tensor gated_residual_cuda(const at::Tensor& x, const at::Tensor& gate, const at::Tensor& y,
                               int64_t rows_per_batch) {
  const char* op = "gated_residual";
  const Rows r = check_rows(op, x, rows_per_batch);
  check_param(op, "gate", gate, x, r);
  TORCH_CHECK(y.device() == x.device() && y.sizes() == x.sizes() && y.is_contiguous() &&
                  y.scalar_type() == x.scalar_type(),
              "dcgen::gated_residual: expected a contiguous y like x (", x.sizes(), ", ",
              x.scalar_type(), ", ", x.device(), "), got ", y.sizes(), ", ", y.scalar_type(), ", ",
              y.device());
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor out = at::empty_like(x);
  if (x.numel() == 0) return out;
  const int64_t groups = (r.D + 7) / 8;
  const int64_t blocks = (r.M * groups + 255) / 256;
  TORCH_CHECK(blocks <= 2147483647LL, "dcgen::gated_residual: too large: ", x.sizes());
  const bool vec = r.D % 8 == 0 && aligned16(x) && aligned16(y) && aligned16(out);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  dispatch_types(x, gate, [&](auto t, auto p) {
    using T = decltype(t);
    using P = decltype(p);
    gated_residual_kernel<T, P><<<blocks, 256, 0, stream>>>(
        reinterpret_cast<const T*>(x.const_data_ptr()),
        reinterpret_cast<const P*>(gate.const_data_ptr()),
        reinterpret_cast<const T*>(y.const_data_ptr()), reinterpret_cast<T*>(out.mutable_data_ptr()),
        r.M, r.D, groups, r.S, gate.stride(0), vec);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace
}  // namespace dcgen

TORCH_LIBRARY_IMPL(dcgen, CUDA, m) {
  m.impl("adaln_modulate", &dcgen::adaln_modulate_cuda);
  m.impl("adaln_modulate_fp8", &dcgen::adaln_modulate_fp8_cuda);
  m.impl("gated_residual", &dcgen::gated_residual_cuda);
}
