// The FP8 GEMM's row/column scale epilogue as one pass: out = act(y * rs[m] * cs[n] + bias[n]).
//
// Why it exists: on Hopper, torch._scaled_mm with per-row scales runs a kernel far slower than
// cuBLAS's per-tensor FP8 GEMM (docs/ANCHORS.md: about 1,360 TFLOP/s per-tensor at the FLUX
// shapes, against the ~770 our row-scaled linears reached). So dcgen runs the GEMM with unit
// scales and applies the token and channel scales, the bias and the activation here, in one read
// and one write of the output. Spec, followed op for op: dcgen/ops/fp8_epilogue.py.
//
// One thread: 8 consecutive columns of one row, 16-byte loads and stores when aligned.
// fp8_scale_epilogue_into writes the same values into a given [M, N] view with any row stride
// (part of a wider or longer buffer); fp8_scale_epilogue_fp8 also writes the output's FP8 row
// quantization (one CTA per row).
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <string_view>
#include <tuple>
#include <type_traits>

#include "nvfp4/fp8_row.cuh"
#include "nvfp4/quant_common.cuh"

namespace dcgen {
namespace {

using quant::count_valid;
using quant::load8;
using quant::store8;
using quant::to_float;

constexpr int kNone = 0;
constexpr int kGeluTanh = 1;

__device__ __forceinline__ float gelu_tanh(float v) {
  // torch's approximate="tanh" form: 0.5 v (1 + tanh(sqrt(2/pi) (v + 0.044715 v^3))). Each
  // rounding pinned (no FMA contraction): the kernels give the same bits whatever nvcc fuses.
  const float cube = __fmul_rn(__fmul_rn(__fmul_rn(0.044715f, v), v), v);
  const float inner = __fmul_rn(0.7978845608028654f, __fadd_rn(v, cube));
  return __fmul_rn(__fmul_rn(0.5f, v), __fadd_rn(1.f, tanhf(inner)));
}

// act(y * r * c + b) of 8 consecutive columns (0 past N), as the epilogue kernels compute it.
template <typename T, typename B, int kAct>
__device__ __forceinline__ void epilogue8(const T* __restrict__ yr, float r,
                                          const float* __restrict__ cs, const B* __restrict__ bias,
                                          int64_t n0, int valid, bool vec, float vals[8]) {
  load8(yr + n0, valid, vec, vals);
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    if (i < valid) {
      float o = __fmul_rn(__fmul_rn(vals[i], r), cs[n0 + i]);
      if (bias != nullptr) o = __fadd_rn(o, to_float(bias[n0 + i]));
      if constexpr (kAct == kGeluTanh) o = gelu_tanh(o);
      vals[i] = o;
    } else {
      vals[i] = 0.f;
    }
  }
}

// B: the bias element type (T or float); nullptr = no bias.
template <typename T, typename B, int kAct>
__global__ void fp8_epilogue_kernel(const T* __restrict__ y, const float* __restrict__ rs,
                                    const float* __restrict__ cs, const B* __restrict__ bias,
                                    T* __restrict__ out, int64_t out_stride, int64_t M,
                                    int64_t N, int64_t groups, bool vec) {
  const int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (t >= M * groups) return;
  const int64_t row = t / groups;
  const int64_t n0 = (t - row * groups) * 8;
  const int valid = count_valid(N - n0, 8);
  const bool v = vec && valid == 8;
  float vals[8];
  epilogue8<T, B, kAct>(y + row * N, rs[row], cs, bias, n0, valid, v, vals);
  store8(out + row * out_stride + n0, vals, valid, v);
}

// The epilogue with the FP8 (E4M3) row quantization of its output, for an FP8 linear whose
// output feeds another (FLUX's MLP: the GELU'd hidden state is the next linear's input): one CTA
// per row writes the row as fp8_scale_epilogue does while reducing the amax of the rounded
// values, then reads the stored row back (L2) and encodes it as dcgen::quantize_fp8 (block 0)
// encodes it (quant::store_row_and_quantize).
constexpr int kRowThreads = 256;

template <typename T, typename B, int kAct>
__global__ void fp8_epilogue_quantize_kernel(const T* __restrict__ y, const float* __restrict__ rs,
                                             const float* __restrict__ cs,
                                             const B* __restrict__ bias, T* __restrict__ out,
                                             uint8_t* __restrict__ q, float* __restrict__ q_scales,
                                             int64_t N, bool vec, bool qvec) {
  const int64_t row = blockIdx.x;
  const T* yr = y + row * N;
  const float r = rs[row];
  quant::store_row_and_quantize<kRowThreads, T>(
      out + row * N, q + row * N, q_scales + row, N, vec, qvec,
      [&](int64_t n0, int valid, bool v, float (&o)[8]) {
        epilogue8<T, B, kAct>(yr, r, cs, bias, n0, valid, v, o);
#pragma unroll
        for (int i = 0; i < 8; ++i) o[i] = to_float(quant::from_float<T>(o[i]));
      });
}

template <typename T, typename B>
void launch(const at::Tensor& y, const at::Tensor& rs, const at::Tensor& cs, const B* bias,
            const at::Tensor& out, int act, int64_t groups, bool vec, int64_t blocks,
            cudaStream_t stream) {
  constexpr int kThreads = 256;
  const T* yp = reinterpret_cast<const T*>(y.const_data_ptr());
  T* op = reinterpret_cast<T*>(out.mutable_data_ptr());
  const float* rp = rs.const_data_ptr<float>();
  const float* cp = cs.const_data_ptr<float>();
  const int64_t M = y.size(0), N = y.size(1), ld = out.stride(0);
  if (act == kGeluTanh) {
    fp8_epilogue_kernel<T, B, kGeluTanh><<<blocks, kThreads, 0, stream>>>(yp, rp, cp, bias, op, ld,
                                                                           M, N, groups, vec);
  } else {
    fp8_epilogue_kernel<T, B, kNone><<<blocks, kThreads, 0, stream>>>(yp, rp, cp, bias, op, ld, M,
                                                                       N, groups, vec);
  }
}

// fn(bias pointer) with the bias read in its own dtype when that is y's or float32 (a module's
// 16-bit bias needs no conversion launch per call); any other floating dtype is converted to
// float32 first; no bias: a null float pointer.
template <typename T, typename Fn>
void with_bias(const std::optional<at::Tensor>& bias, at::ScalarType y_type, Fn&& fn) {
  if (!bias.has_value()) {
    fn(static_cast<const float*>(nullptr));
    return;
  }
  const at::Tensor b = bias->scalar_type() == y_type || bias->scalar_type() == at::kFloat
                           ? bias->contiguous()
                           : bias->to(at::kFloat).contiguous();
  if (b.scalar_type() == at::kFloat) {
    fn(b.const_data_ptr<float>());
  } else {
    fn(reinterpret_cast<const T*>(b.const_data_ptr()));
  }
}

template <typename T>
void launch_with_bias(const at::Tensor& y, const at::Tensor& rs, const at::Tensor& cs,
                      const std::optional<at::Tensor>& bias, const at::Tensor& out, int act,
                      int64_t groups, bool vec, int64_t blocks, cudaStream_t stream) {
  with_bias<T>(bias, y.scalar_type(), [&](auto bp) {
    using B = std::remove_cv_t<std::remove_pointer_t<decltype(bp)>>;
    launch<T, B>(y, rs, cs, bp, out, act, groups, vec, blocks, stream);
  });
}

// The checks both forms make (y, scales, bias, act); returns the activation code.
int check_epilogue(const char* op, const at::Tensor& y, const at::Tensor& row_scale,
                   const at::Tensor& col_scale, const std::optional<at::Tensor>& bias,
                   c10::string_view act_name) {
  const std::string_view name(act_name.data(), act_name.size());
  TORCH_CHECK(name == "none" || name == "gelu_tanh", "dcgen::", op,
              ": expected act 'none' or 'gelu_tanh', got '", name, "'");
  TORCH_CHECK(y.is_cuda(), "dcgen::", op, " (CUDA): expected y on a CUDA device, got ", y.device());
  TORCH_CHECK(y.dim() == 2, "dcgen::", op, ": expected y of shape [M, N], got ", y.sizes());
  TORCH_CHECK(y.is_contiguous(), "dcgen::", op, ": expected a contiguous y, got strides ",
              y.strides());
  TORCH_CHECK(y.scalar_type() == at::kBFloat16 || y.scalar_type() == at::kHalf, "dcgen::", op,
              ": expected y of dtype bfloat16 or float16, got ", y.scalar_type());
  const int64_t M = y.size(0), N = y.size(1);
  TORCH_CHECK(row_scale.scalar_type() == at::kFloat && row_scale.numel() == M &&
                  row_scale.is_contiguous() && row_scale.device() == y.device(),
              "dcgen::", op, ": expected a contiguous float32 row_scale of ", M, " elements on ",
              y.device(), ", got ", row_scale.scalar_type(), " ", row_scale.sizes(), " on ",
              row_scale.device());
  TORCH_CHECK(col_scale.scalar_type() == at::kFloat && col_scale.numel() == N &&
                  col_scale.is_contiguous() && col_scale.device() == y.device(),
              "dcgen::", op, ": expected a contiguous float32 col_scale of ", N, " elements on ",
              y.device(), ", got ", col_scale.scalar_type(), " ", col_scale.sizes(), " on ",
              col_scale.device());
  if (bias.has_value()) {
    // The kernel reads the bias as fp32 or as y's own type: any other dtype would be misread.
    TORCH_CHECK(bias->numel() == N && bias->device() == y.device() &&
                    (bias->scalar_type() == at::kFloat || bias->scalar_type() == y.scalar_type()),
                "dcgen::", op, ": expected a float32 or ", y.scalar_type(), " bias of ", N,
                " elements on ", y.device(), ", got ", bias->scalar_type(), " ", bias->sizes(),
                " on ", bias->device());
  }
  return name == "gelu_tanh" ? kGeluTanh : kNone;
}

// One launch into `out` (y's shape, unit column stride, any row stride); the caller holds the
// device guard.
void run_epilogue(const char* op, const at::Tensor& y, const at::Tensor& row_scale,
                  const at::Tensor& col_scale, const std::optional<at::Tensor>& bias, int act,
                  const at::Tensor& out) {
  if (y.numel() == 0) return;
  const int64_t M = y.size(0), N = y.size(1);
  const int64_t groups = (N + 7) / 8;
  const bool vec = N % 8 == 0 && out.stride(0) % 8 == 0 &&
                   reinterpret_cast<uintptr_t>(y.const_data_ptr()) % 16 == 0 &&
                   reinterpret_cast<uintptr_t>(out.const_data_ptr()) % 16 == 0;
  const int64_t blocks = (M * groups + 255) / 256;  // launch() runs 256 threads per block
  TORCH_CHECK(blocks <= 2147483647LL, "dcgen::", op, ": output too large: ", y.sizes());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  if (y.scalar_type() == at::kBFloat16) {
    launch_with_bias<__nv_bfloat16>(y, row_scale, col_scale, bias, out, act, groups, vec, blocks,
                                    stream);
  } else {
    launch_with_bias<__half>(y, row_scale, col_scale, bias, out, act, groups, vec, blocks, stream);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor fp8_scale_epilogue_cuda(const at::Tensor& y, const at::Tensor& row_scale,
                                   const at::Tensor& col_scale, const std::optional<at::Tensor>& bias,
                                   c10::string_view act_name) {
  const char* op = "fp8_scale_epilogue";
  const int act = check_epilogue(op, y, row_scale, col_scale, bias, act_name);
  const c10::cuda::CUDAGuard guard(y.device());
  at::Tensor out = at::empty_like(y);
  run_epilogue(op, y, row_scale, col_scale, bias, act, out);
  return out;
}

// The same epilogue written into `out`: y's shape, dtype and device, unit column stride, any row
// stride of at least N (a column block of a wider buffer, or rows of a longer one), so a layer's
// output lands where the next op reads it without a copy.
void fp8_scale_epilogue_into_cuda(const at::Tensor& y, const at::Tensor& row_scale,
                                  const at::Tensor& col_scale, const std::optional<at::Tensor>& bias,
                                  c10::string_view act_name, const at::Tensor& out) {
  const char* op = "fp8_scale_epilogue_into";
  const int act = check_epilogue(op, y, row_scale, col_scale, bias, act_name);
  TORCH_CHECK(out.device() == y.device() && out.scalar_type() == y.scalar_type() &&
                  out.dim() == 2 && out.size(0) == y.size(0) && out.size(1) == y.size(1),
              "dcgen::", op, ": expected out of y's shape ", y.sizes(), ", dtype ", y.scalar_type(),
              " and device ", y.device(), ", got ", out.sizes(), " ", out.scalar_type(), " on ",
              out.device());
  TORCH_CHECK(out.stride(1) == 1 && (out.size(0) <= 1 || out.stride(0) >= out.size(1)), "dcgen::",
              op, ": expected out rows with unit column stride, one row apart by at least ",
              out.size(1), " elements, got strides ", out.strides());
  const c10::cuda::CUDAGuard guard(y.device());
  run_epilogue(op, y, row_scale, col_scale, bias, act, out);
}

// (out [M, N] like y, q float8_e4m3fn [M, N], q_scales fp32 [M, 1]): out = the epilogue's
// output, (q, q_scales) = quantize_fp8(out, block 0), bit for bit.
std::tuple<at::Tensor, at::Tensor, at::Tensor> fp8_scale_epilogue_fp8_cuda(
    const at::Tensor& y, const at::Tensor& row_scale, const at::Tensor& col_scale,
    const std::optional<at::Tensor>& bias, c10::string_view act_name) {
  const char* op = "fp8_scale_epilogue_fp8";
  const int act = check_epilogue(op, y, row_scale, col_scale, bias, act_name);
  const int64_t M = y.size(0), N = y.size(1);
  TORCH_CHECK(M <= 2147483647LL, "dcgen::", op, ": expected at most 2^31 - 1 rows, got ", M);
  // quantize_fp8 has no scale for an empty row (it rejects K = 0): neither does this form
  TORCH_CHECK(N >= 1, "dcgen::", op, ": expected y with at least one column, got ", y.sizes());
  const c10::cuda::CUDAGuard guard(y.device());
  at::Tensor out = at::empty_like(y);
  at::Tensor q = at::empty({M, N}, y.options().dtype(at::kFloat8_e4m3fn));
  at::Tensor q_scales = at::empty({M, 1}, y.options().dtype(at::kFloat));
  if (y.numel() == 0) return {out, q, q_scales};
  const bool vec = N % 8 == 0 && reinterpret_cast<uintptr_t>(y.const_data_ptr()) % 16 == 0 &&
                   reinterpret_cast<uintptr_t>(out.const_data_ptr()) % 16 == 0;
  const bool qvec = N % 8 == 0;  // q rows start 8-byte aligned then (a fresh allocation)
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  auto run = [&](auto t) {
    using T = decltype(t);
    with_bias<T>(bias, y.scalar_type(), [&](auto bp) {
      using B = std::remove_cv_t<std::remove_pointer_t<decltype(bp)>>;
      const T* yp = reinterpret_cast<const T*>(y.const_data_ptr());
      T* outp = reinterpret_cast<T*>(out.mutable_data_ptr());
      auto* qp = reinterpret_cast<uint8_t*>(q.mutable_data_ptr());
      float* sp = q_scales.mutable_data_ptr<float>();
      const float* rp = row_scale.const_data_ptr<float>();
      const float* cp = col_scale.const_data_ptr<float>();
      if (act == kGeluTanh) {
        fp8_epilogue_quantize_kernel<T, B, kGeluTanh><<<M, kRowThreads, 0, stream>>>(
            yp, rp, cp, bp, outp, qp, sp, N, vec, qvec);
      } else {
        fp8_epilogue_quantize_kernel<T, B, kNone><<<M, kRowThreads, 0, stream>>>(
            yp, rp, cp, bp, outp, qp, sp, N, vec, qvec);
      }
    });
  };
  if (y.scalar_type() == at::kBFloat16) {
    run(__nv_bfloat16{});
  } else {
    run(__half{});
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {out, q, q_scales};
}

}  // namespace
}  // namespace dcgen

TORCH_LIBRARY_IMPL(dcgen, CUDA, m) {
  m.impl("fp8_scale_epilogue", &dcgen::fp8_scale_epilogue_cuda);
  m.impl("fp8_scale_epilogue_into", &dcgen::fp8_scale_epilogue_into_cuda);
  m.impl("fp8_scale_epilogue_fp8", &dcgen::fp8_scale_epilogue_fp8_cuda);
}
