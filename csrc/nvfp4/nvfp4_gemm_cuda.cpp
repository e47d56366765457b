// torch binding of the NVFP4 GEMMs (dcgen::nvfp4_gemm: sm_100a, sm_120a and sm_90a;
// dcgen::nvfp4_gemm_w4a16: sm_90a): checks, allocation and capability dispatch. A C++ file (no
// CUTLASS headers): it only sees nvfp4_gemm.h.
#include <ATen/core/Tensor.h>  // not ATen/ATen.h: every op's header, minutes of nvcc time
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/ones.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include "nvfp4/nvfp4_gemm.h"

namespace dcgen {
namespace {

int64_t swizzled_size(int64_t rows, int64_t k) {
  const int64_t kb = (k + 15) / 16;
  return (rows + 127) / 128 * 128 * ((kb + 3) / 4 * 4);
}

void check_operand(const char* op, const char* name, const at::Tensor& q, const at::Tensor& sf, int64_t k) {
  TORCH_CHECK(q.is_cuda() && q.scalar_type() == at::kByte && q.dim() == 2 && q.is_contiguous(),
              op, ": expected ", name, " as contiguous packed uint8 [rows, K/2] on CUDA, got ",
              q.scalar_type(), " ", q.sizes(), " on ", q.device());
  TORCH_CHECK(reinterpret_cast<uintptr_t>(q.const_data_ptr()) % 16 == 0,
              op, ": expected ", name, " 16-byte aligned, got a data pointer at ",
              reinterpret_cast<uintptr_t>(q.const_data_ptr()) % 16, " bytes past a 16-byte boundary (",
              "storage offset ", q.storage_offset(), ": a view at an odd offset?)");
  TORCH_CHECK(q.size(1) * 2 == k, op, ": expected ", name, " with K/2 = ", k / 2,
              " columns, got ", q.sizes());
  TORCH_CHECK(sf.scalar_type() == at::kFloat8_e4m3fn && sf.is_contiguous() &&
                  sf.numel() == swizzled_size(q.size(0), k) && sf.device() == q.device(),
              op, ": expected ", name, "'s scales as ", swizzled_size(q.size(0), k),
              " contiguous float8_e4m3fn (128x4 swizzled) on ", q.device(), ", got ", sf.scalar_type(),
              " ", sf.sizes(), " on ", sf.device());
  // the kernels read scales in 4-byte words (sm_90a) or by TMA (Blackwell)
  TORCH_CHECK(reinterpret_cast<uintptr_t>(sf.const_data_ptr()) % 16 == 0,
              op, ": expected ", name, "'s scales 16-byte aligned, got a data pointer at ",
              reinterpret_cast<uintptr_t>(sf.const_data_ptr()) % 16, " bytes past a 16-byte boundary (",
              "storage offset ", sf.storage_offset(), ")");
  TORCH_CHECK(k > 0, op, ": expected K > 0, got K=", k);
}

void check_alpha(const char* op, const at::Tensor& alpha, const at::Tensor& a) {
  TORCH_CHECK(alpha.numel() == 1 && alpha.scalar_type() == at::kFloat && alpha.device() == a.device(),
              op, ": expected alpha as one float32 on ", a.device(), ", got ", alpha.scalar_type(), " ",
              alpha.sizes(), " on ", alpha.device());
}

int capability_major(const at::Tensor& t) {
  int major = 0;
  cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, t.get_device());
  return major;
}

// Arch-specific code (sm_90a, sm_100a, sm_120a) loads on exactly that capability: a 10.3 or
// 12.1 card has no image of these kernels.
void check_capability_minor(const char* op, const at::Tensor& t, int major) {
  int minor = 0;
  cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, t.get_device());
  TORCH_CHECK(minor == 0, op, ": built for sm_90a, sm_100a and sm_120a only (arch-specific code "
              "runs on exactly that capability), this GPU is sm_", major, minor);
}

// The kernels index with 32-bit ints (output offset m * N + n, activation offset m * K):
// dcgen.ops.nvfp4_gemm splits larger products into row chunks before they get here.
void check_index_range(const char* op, int64_t m, int64_t n, int64_t k) {
  TORCH_CHECK(m * std::max(n, k) < (int64_t(1) << 31), op,
              ": expected M x max(N, K) below 2^31 (32-bit indexing), got M=", m, " N=", n,
              " K=", k, "; call it through dcgen.ops, which splits the rows");
}

// Which Hopper kernel runs: the register-operand kernel (nvfp4_gemm_rs_sm90.cu, default) or the
// first one, which converts both operands into shared memory (DCGEN_NVFP4_SM90_KERNEL=mainloop).
// Read per call (a getenv next to a GEMM), so tests and benchmarks can compare the two.
bool sm90_mainloop_kernel() {
  const char* v = std::getenv("DCGEN_NVFP4_SM90_KERNEL");
  if (v == nullptr || *v == '\0' || std::strcmp(v, "rs") == 0) return false;
  TORCH_CHECK(std::strcmp(v, "mainloop") == 0,
              "DCGEN_NVFP4_SM90_KERNEL: expected 'rs' (default) or 'mainloop', got '", v, "'");
  return true;
}

// W4A4 through the register-operand kernel: the activation's codes times its block scales as
// bf16 (exact: each product is a bf16 value; the global scales stay in alpha), then the W4A16
// product. The bf16 copy costs one pass over the activation (M x K x 2.5 bytes of traffic).
at::Tensor w4a4_via_bf16_sm90(const at::Tensor& a, const at::Tensor& a_scales, const Nvfp4GemmArgs& args,
                              at::Tensor& d) {
  static const auto dequantize =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("dcgen::nvfp4_dequantize", "")
          .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t, bool,
                            at::ScalarType)>();
  const at::Tensor one = at::ones({1}, a.options().dtype(at::kFloat));
  const at::Tensor a16 =
      dequantize.call(a, a_scales.reshape({-1}), one, a.size(1) * 2, true, at::kBFloat16);
  const Nvfp4W4A16Args w{a16.const_data_ptr(), args.b, args.sfb, args.alpha, args.d,
                         args.m, args.n, args.k};
  const char* err = nvfp4_gemm_rs_sm90(w, c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == nullptr, "dcgen::nvfp4_gemm (sm_90a): ", err ? err : "");
  return d;
}

at::Tensor nvfp4_gemm_cuda(const at::Tensor& a, const at::Tensor& a_scales, const at::Tensor& b,
                           const at::Tensor& b_scales, const at::Tensor& alpha) {
  TORCH_CHECK(a.dim() == 2, "dcgen::nvfp4_gemm: expected a of shape [M, K/2], got ", a.sizes());
  const int64_t k = a.size(1) * 2;
  check_operand("dcgen::nvfp4_gemm", "a", a, a_scales, k);
  check_operand("dcgen::nvfp4_gemm", "b", b, b_scales, k);
  TORCH_CHECK(a.device() == b.device(), "dcgen::nvfp4_gemm: a is on ", a.device(), ", b on ", b.device());
  check_alpha("dcgen::nvfp4_gemm", alpha, a);
  const c10::cuda::CUDAGuard guard(a.device());
  const int major = capability_major(a);
  // Capability dispatch: datacenter Blackwell (sm_100a, UMMA), GeForce Blackwell (sm_120a,
  // warp-level block-scaled MMA) or Hopper (sm_90a, dequantization in the mainloop + bf16
  // wgmma): three kernels, one per file, same operands.
  TORCH_CHECK(major == 9 || major == 10 || major == 12,
              "dcgen::nvfp4_gemm: built for sm_90a, sm_100a and sm_120a only, this GPU is sm_", major, "x");
  check_capability_minor("dcgen::nvfp4_gemm", a, major);
  TORCH_CHECK(k % 32 == 0 && (major == 9 || b.size(0) % 8 == 0),
              "dcgen::nvfp4_gemm: expected K % 32 == 0 (and N % 8 == 0 on Blackwell: 16-byte TMA rows), "
              "got K=", k, " N=", b.size(0));
  check_index_range("dcgen::nvfp4_gemm", a.size(0), b.size(0), k);
  at::Tensor d = at::empty({a.size(0), b.size(0)}, a.options().dtype(at::kBFloat16));
  if (a.size(0) == 0 || b.size(0) == 0) return d;
  const at::Tensor al = alpha.reshape({1}).contiguous();
  Nvfp4GemmArgs args{a.const_data_ptr(), b.const_data_ptr(), a_scales.const_data_ptr(),
                     b_scales.const_data_ptr(), al.const_data_ptr<float>(), d.mutable_data_ptr(),
                     static_cast<int>(a.size(0)), static_cast<int>(b.size(0)), static_cast<int>(k)};
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  if (major == 9) {
    if (!sm90_mainloop_kernel()) return w4a4_via_bf16_sm90(a, a_scales, args, d);
    const char* err = nvfp4_gemm_sm90(args, stream);
    TORCH_CHECK(err == nullptr, "dcgen::nvfp4_gemm (sm_90a): ", err ? err : "");
    return d;
  }
#ifdef DCGEN_NO_BLACKWELL_GEMM
  TORCH_CHECK(false, "dcgen::nvfp4_gemm: this build left out the Blackwell kernels (DCGEN_BLACKWELL=0); "
              "rebuild without it for sm_", major, "x");
  return d;
#else
  const bool sm120 = major == 12;
  const size_t ws_bytes = sm120 ? nvfp4_gemm_sm120_workspace(args) : nvfp4_gemm_sm100_workspace(args);
  at::Tensor ws = at::empty({static_cast<int64_t>(ws_bytes)}, a.options().dtype(at::kByte));
  void* ws_ptr = ws.numel() ? ws.mutable_data_ptr() : nullptr;
  const char* err = sm120 ? nvfp4_gemm_sm120(args, ws_ptr, stream) : nvfp4_gemm_sm100(args, ws_ptr, stream);
  TORCH_CHECK(err == nullptr, "dcgen::nvfp4_gemm: ", err ? err : "");
  return d;
#endif
}

// W4A16 on Hopper: a bf16 activation times an NVFP4 weight, the weight dequantized in the
// mainloop (its 16-bit copy never exists in global memory).
at::Tensor nvfp4_gemm_w4a16_cuda(const at::Tensor& a, const at::Tensor& b, const at::Tensor& b_scales,
                                 const at::Tensor& alpha) {
  TORCH_CHECK(a.is_cuda() && a.scalar_type() == at::kBFloat16 && a.dim() == 2 && a.is_contiguous(),
              "dcgen::nvfp4_gemm_w4a16: expected a as contiguous bfloat16 [M, K] on CUDA, got ",
              a.scalar_type(), " ", a.sizes(), " on ", a.device());
  const int64_t k = a.size(1);
  check_operand("dcgen::nvfp4_gemm_w4a16", "b", b, b_scales, k);
  TORCH_CHECK(a.device() == b.device(), "dcgen::nvfp4_gemm_w4a16: a is on ", a.device(), ", b on ", b.device());
  TORCH_CHECK(k % 32 == 0, "dcgen::nvfp4_gemm_w4a16: expected K % 32 == 0, got K=", k);
  TORCH_CHECK(reinterpret_cast<uintptr_t>(a.const_data_ptr()) % 16 == 0,
              "dcgen::nvfp4_gemm_w4a16: expected a 16-byte aligned, got a data pointer at ",
              reinterpret_cast<uintptr_t>(a.const_data_ptr()) % 16,
              " bytes past a 16-byte boundary (storage offset ", a.storage_offset(),
              ": a view at an odd offset?)");
  check_alpha("dcgen::nvfp4_gemm_w4a16", alpha, a);
  const c10::cuda::CUDAGuard guard(a.device());
  const int major = capability_major(a);
  TORCH_CHECK(major == 9, "dcgen::nvfp4_gemm_w4a16: built for sm_90a only, this GPU is sm_", major, "x");
  check_capability_minor("dcgen::nvfp4_gemm_w4a16", a, major);
  check_index_range("dcgen::nvfp4_gemm_w4a16", a.size(0), b.size(0), k);
  at::Tensor d = at::empty({a.size(0), b.size(0)}, a.options());
  if (a.size(0) == 0 || b.size(0) == 0) return d;
  const at::Tensor al = alpha.reshape({1}).contiguous();
  Nvfp4W4A16Args args{a.const_data_ptr(), b.const_data_ptr(), b_scales.const_data_ptr(),
                      al.const_data_ptr<float>(), d.mutable_data_ptr(), static_cast<int>(a.size(0)),
                      static_cast<int>(b.size(0)), static_cast<int>(k)};
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const char* err = sm90_mainloop_kernel() ? nvfp4_gemm_w4a16_sm90(args, stream) : nvfp4_gemm_rs_sm90(args, stream);
  TORCH_CHECK(err == nullptr, "dcgen::nvfp4_gemm_w4a16 (sm_90a): ", err ? err : "");
  return d;
}

}  // namespace
}  // namespace dcgen

TORCH_LIBRARY_IMPL(dcgen, CUDA, m) {
  m.impl("nvfp4_gemm", &dcgen::nvfp4_gemm_cuda);
  m.impl("nvfp4_gemm_w4a16", &dcgen::nvfp4_gemm_w4a16_cuda);
}
