// dcgen::fused_attention on CUDA: checks, strides and dispatch to the compiled configurations
// of the portable flash-attention forward (flash_fwd.cuh; one .cu per dtype x head dim) or of
// the Hopper ones (flash_fwd_sm90.cuh, flash_fwd_sm90_tma.cuh: sm90_kernel).
// Spec: dcgen/ops/attention.py (fused_attention_reference).
#include <ATen/core/Tensor.h>  // not ATen/ATen.h: every op's header, minutes of nvcc time
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <torch/library.h>

#include <cmath>
#include <cstdlib>
#include <string>

#include "attention/flash_params.h"
#include "attention/prologue.h"
#include "common/env_switch.h"

namespace dcgen::attention {
namespace {

constexpr const char* kOp = "dcgen::fused_attention";

// The kernel reads 16-byte row chunks: last dim contiguous, other strides multiples of 8
// elements and a 16-byte aligned base. Anything else is copied once (rare: projections and
// their transposed views already qualify). A clone, not contiguous(): a contiguous view at an
// odd element offset would come back as itself, its base still unaligned.
at::Tensor vector_ready(const at::Tensor& x) {
  const bool ok = x.stride(3) == 1 && x.stride(0) % 8 == 0 && x.stride(1) % 8 == 0 &&
                  x.stride(2) % 8 == 0 &&
                  reinterpret_cast<uintptr_t>(x.const_data_ptr()) % 16 == 0;
  return ok ? x : x.clone(at::MemoryFormat::Contiguous);
}

// The TMA kernel's descriptors need every stride a positive multiple of 16 bytes, size-1
// dimensions included: PyTorch leaves their strides arbitrary (contiguous() keeps a tensor
// whose only odd strides are there), and a broadcast view has stride 0. cuTensorMapEncodeTiled
// would fail, which CuTe only reports on stderr. Such tensors are copied once into standard
// contiguous strides.
at::Tensor tma_ready(const at::Tensor& x) {
  // the descriptor's global address must be 16-byte aligned as well
  if (reinterpret_cast<uintptr_t>(x.const_data_ptr()) % 16 != 0) {
    return x.clone(at::MemoryFormat::Contiguous);
  }
  for (int64_t d = 0; d < 3; ++d) {
    if (x.stride(d) <= 0 || x.stride(d) % 8 != 0) return x.clone(at::MemoryFormat::Contiguous);
  }
  return x;
}

// Where K's norm + RoPE runs. "fused": inside the kernel's K tile loads (K makes one trip from
// memory, but the prologue and its fp32 table reads repeat for every 64-row query block);
// "prepass": once, by the standalone kernel, into a rotated copy of K (one extra write and read
// of K). Both round the prepared K to T once, as the kernel's shared-memory tile does. Default
// ("auto"): fused while there are at most kMaxFusedQueryBlocks query blocks.
// DCGEN_ATTENTION_K_PROLOGUE=fused|prepass overrides it (benchmarks, tests).
constexpr int64_t kMaxFusedQueryBlocks = 2;

bool fuse_k_prologue(int64_t seqlen_q) {
  const char* env = std::getenv("DCGEN_ATTENTION_K_PROLOGUE");
  const std::string mode = env == nullptr ? "auto" : env;
  if (mode == "fused") return true;
  if (mode == "prepass") return false;
  TORCH_CHECK(mode == "auto", kOp, ": expected DCGEN_ATTENTION_K_PROLOGUE in fused, prepass, ",
              "auto, got '", mode, "'");
  return (seqlen_q + kFlashBlockM - 1) / kFlashBlockM <= kMaxFusedQueryBlocks;
}

// Which Hopper kernel runs on sm_90 (when built: CUTLASS headers found). DCGEN_ATTENTION_SM90:
//   unset, "1" or "tma" (the default): flash_fwd_sm90_tma.cuh, warp-specialized with TMA K / V
//     loads and P kept in registers. On an H100 (2026-11-27) its diagnostics (40 cases) and
//     tests pass, and it ran 1.9-2.4x faster than the wgmma kernel (0.82-0.88 vs 1.64 ms at
//     S = 4,608, 8.6-8.9 vs 20.8 ms at S = 16,896; B = 1, 24 heads, D = 128). It takes the
//     wgmma kernel when the build cannot run it (run_flash_fwd_sm90_tma returns false);
//   "wgmma": flash_fwd_sm90.cuh (validated on the H200 on 2026-11-26 and the H100 since);
//   "0": the portable mma.sync kernel.
enum class Sm90Kernel { kNone, kWgmma, kTma };

Sm90Kernel sm90_kernel(int major) {
#ifdef DCGEN_ATTENTION_SM90
  if (major != 9) return Sm90Kernel::kNone;
  const char* env = std::getenv("DCGEN_ATTENTION_SM90");
  const std::string mode = env == nullptr ? "tma" : env;
  if (mode == "0") return Sm90Kernel::kNone;
  if (mode == "wgmma") return Sm90Kernel::kWgmma;
  TORCH_CHECK(mode == "1" || mode == "tma", kOp,
              ": expected DCGEN_ATTENTION_SM90 in 0, 1, tma, wgmma, got '", mode, "'");
  return Sm90Kernel::kTma;
#else
  (void)major;
  return Sm90Kernel::kNone;
#endif
}

template <typename T>
void dispatch_head_dim(const FlashParams& p, int64_t d, Sm90Kernel sm90, cudaStream_t stream) {
#ifdef DCGEN_ATTENTION_SM90
  if (sm90 == Sm90Kernel::kTma) {
    const bool ran = d == 64 ? run_flash_fwd_sm90_tma<T, 64>(p, stream)
                             : run_flash_fwd_sm90_tma<T, 128>(p, stream);
    if (ran) return;
    // Asked for by name (diagnostics, tests, benchmarks): fail rather than time another kernel.
    const char* env = std::getenv("DCGEN_ATTENTION_SM90");
    TORCH_CHECK(env == nullptr || std::string(env) != "tma", kOp,
                " (DCGEN_ATTENTION_SM90=tma): this build's TMA Hopper kernel has fewer registers "
                "per thread than its setmaxnreg split needs; use DCGEN_ATTENTION_SM90=wgmma");
    // The default: K and V are prepared for TMA (prologue applied, aligned), which the wgmma
    // kernel takes too.
    TORCH_WARN_ONCE(kOp, ": this build's TMA Hopper kernel has fewer registers per thread than "
                    "its setmaxnreg split needs; running the wgmma kernel instead");
    sm90 = Sm90Kernel::kWgmma;
  }
  if (sm90 == Sm90Kernel::kWgmma) {
    if (d == 64) {
      run_flash_fwd_sm90<T, 64>(p, stream);
    } else {
      run_flash_fwd_sm90<T, 128>(p, stream);
    }
    return;
  }
#endif
  (void)sm90;
  if (d == 64) {
    run_flash_fwd<T, 64>(p, stream);
  } else {
    run_flash_fwd<T, 128>(p, stream);
  }
}

at::Tensor fused_attention_cuda(const at::Tensor& q_in, const at::Tensor& k_in,
                                const at::Tensor& v_in, const std::optional<at::Tensor>& q_weight,
                                const std::optional<at::Tensor>& k_weight, double eps,
                                const std::optional<at::Tensor>& cos,
                                const std::optional<at::Tensor>& sin, int64_t norm_split,
                                const std::optional<at::Tensor>& key_padding_mask, double scale) {
  for (const at::Tensor* t : {&q_in, &k_in, &v_in}) {
    TORCH_CHECK(t->is_cuda(), kOp, " (CUDA): got a tensor on ", t->device());
    TORCH_CHECK(t->dim() == 4, kOp, ": expected (B, H, S, D) tensors, got shape ", t->sizes());
    TORCH_CHECK(t->scalar_type() == q_in.scalar_type() && t->device() == q_in.device(), kOp,
                ": expected q, k, v of one dtype on one device, got ", t->scalar_type(), " on ",
                t->device(), " and ", q_in.scalar_type(), " on ", q_in.device());
  }
  TORCH_CHECK(q_in.scalar_type() == at::kBFloat16 || q_in.scalar_type() == at::kHalf, kOp,
              ": expected bfloat16 or float16, got ", q_in.scalar_type());
  const int64_t B = q_in.size(0), H = q_in.size(1), Sq = q_in.size(2), D = q_in.size(3);
  const int64_t Sk = k_in.size(2);
  TORCH_CHECK(D == 64 || D == 128, kOp, ": expected head dim 64 or 128, got ", D);
  TORCH_CHECK(k_in.size(0) == B && k_in.size(1) == H && k_in.size(3) == D &&
                  v_in.sizes() == k_in.sizes(),
              kOp, ": expected k and v of shape (", B, ", ", H, ", Sk, ", D, "), got ",
              k_in.sizes(), " and ", v_in.sizes());
  TORCH_CHECK(eps > 0, kOp, ": expected eps > 0, got ", eps);
  TORCH_CHECK(Sq < (1LL << 30) && Sk < (1LL << 30), kOp,
              ": expected query and key lengths below 2^30, got Sq=", Sq, " and Sk=", Sk);
  const c10::cuda::CUDAGuard guard(q_in.device());
  const int major = check_arch(q_in, kOp);

  const at::Tensor q = vector_ready(q_in);
  at::Tensor v = vector_ready(v_in);
  at::Tensor k = vector_ready(k_in);
  const NormWeights qw = norm_weights(q_weight, q, kOp, "q_weight");
  NormWeights kw = norm_weights(k_weight, k, kOp, "k_weight");
  const bool rope_on = cos.has_value() && cos->defined();
  TORCH_CHECK(!rope_on || Sq == Sk, kOp, ": RoPE needs q and k of one sequence length, got ", Sq,
              " and ", Sk);
  const RopeTables rope = rope_tables(cos, sin, Sq, D, q, kOp);
  bool k_rope = rope.cos.defined();
  const Sm90Kernel sm90 = sm90_kernel(major);
  // The TMA kernel copies K tiles straight into shared memory, so K must arrive prepared.
  const bool fuse_k = sm90 != Sm90Kernel::kTma && fuse_k_prologue(Sq);
  if ((kw.w.defined() || k_rope) && Sk > 0 && !fuse_k) {
    k = norm_rope_one(k, kw, rope, norm_split, eps);  // contiguous, already normed and rotated
    kw = NormWeights{};
    k_rope = false;
  }
  if (sm90 == Sm90Kernel::kTma) {
    k = tma_ready(k);
    v = tma_ready(v);
  }
  at::Tensor mask;
  if (key_padding_mask.has_value() && key_padding_mask->defined()) {
    mask = *key_padding_mask;
    TORCH_CHECK(mask.scalar_type() == at::kBool && mask.dim() == 2 && mask.size(0) == B &&
                    mask.size(1) == Sk,
                kOp, ": expected a bool key_padding_mask of shape (", B, ", ", Sk, "), got ",
                mask.scalar_type(), " ", mask.sizes());
    TORCH_CHECK(mask.device() == q.device(), kOp, ": key_padding_mask is on ", mask.device());
    mask = mask.contiguous();
  }

  // Output memory (B, Sq, H, D): the caller's transpose(1, 2).flatten(2) back to tokens is free.
  at::Tensor out_bshd = at::empty({B, Sq, H, D}, q.options());
  at::Tensor out = out_bshd.permute({0, 2, 1, 3});
  if (out.numel() == 0) return out;
  if (Sk == 0) return out.zero_();

  FlashParams p;
  p.q = q.const_data_ptr();
  p.k = k.const_data_ptr();
  p.v = v.const_data_ptr();
  p.o = out.mutable_data_ptr();
  p.q_batch_stride = q.stride(0), p.q_head_stride = q.stride(1), p.q_row_stride = q.stride(2);
  p.k_batch_stride = k.stride(0), p.k_head_stride = k.stride(1), p.k_row_stride = k.stride(2);
  p.v_batch_stride = v.stride(0), p.v_head_stride = v.stride(1), p.v_row_stride = v.stride(2);
  p.o_batch_stride = out.stride(0), p.o_head_stride = out.stride(1);
  p.o_row_stride = out.stride(2);
  p.batch = static_cast<int>(B);
  p.heads = static_cast<int>(H);
  p.seqlen_q = static_cast<int>(Sq);
  p.seqlen_k = static_cast<int>(Sk);
  p.scale_log2 = static_cast<float>(scale * M_LOG2E);
  p.q_w0 = qw.w0(), p.q_w1 = qw.w1();
  p.k_w0 = kw.w0(), p.k_w1 = kw.w1();
  p.norm_split = static_cast<int>(norm_split);
  p.eps = static_cast<float>(eps);
  if (rope.cos.defined()) {
    p.q_cos = rope.cos.const_data_ptr<float>();
    p.q_sin = rope.sin.const_data_ptr<float>();
  }
  if (k_rope) {
    p.k_cos = p.q_cos;
    p.k_sin = p.q_sin;
  }
  if (mask.defined()) {
    p.key_padding_mask = mask.const_data_ptr<bool>();
    p.mask_batch_stride = mask.stride(0);
  }
  p.plain_loads = dcgen::env_switch("DCGEN_ATTENTION_PLAIN_LOADS", false);
  p.pingpong = dcgen::env_switch("DCGEN_ATTENTION_PINGPONG", true);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  if (q.scalar_type() == at::kBFloat16) {
    dispatch_head_dim<__nv_bfloat16>(p, D, sm90, stream);
  } else {
    dispatch_head_dim<__half>(p, D, sm90, stream);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(dcgen, CUDA, m) { m.impl("fused_attention", &fused_attention_cuda); }

}  // namespace dcgen::attention
