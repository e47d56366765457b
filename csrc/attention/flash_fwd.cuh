// Portable flash-attention forward (sm_80+, mma.sync m16n8k16) with the QK-RMSNorm + RoPE
// prologue applied while Q and K tiles are loaded. Spec: dcgen/ops/attention.py.
//
// One CTA = 4 warps = 64 query rows of one (batch, head); each warp owns 16 rows. Per key tile
// of 64 rows: all threads load K (with the prologue) and V into shared memory, each warp
// computes S = Q K^T (16 x 64) in registers, masks it (sequence tail, key padding), does the
// online-softmax update in fp32 (exp2 with a pre-multiplied log2(e) scale), and accumulates
// O += P V with P rounded to T. Written for clarity over speed:
//   - K and V fragments come from shared memory with ldmatrix.x4 (V with .trans), or, in the
//     fallback variant (params.plain_loads, env DCGEN_ATTENTION_PLAIN_LOADS=1), with plain
//     32-bit / 16-bit loads; the tests run both. Rows are padded by 8 elements, which keeps
//     ldmatrix and the Q/K fragment loads free of bank conflicts;
//   - no cp.async pipeline: the prologue has to pass K through registers anyway, and latency is
//     hidden by running several CTAs per SM;
//   - the prologue switches (norm on q, norm on k, RoPE on q, on k, key padding) are run-time
//     and uniform across the CTA, so one compiled configuration serves every combination.
//     The K prologue runs once per (query block, key tile): cheap for short sequences, but for
//     long ones it re-reads the fp32 RoPE tables from L2 for every query block, so the wrapper
//     then normalises K once up front instead (flash_attention_cuda.cpp).
//
// mma.sync.m16n8k16 fragment layouts (PTX ISA), g = lane / 4, t = lane % 4:
//   A (16x16, row-major) regs: {(g, 2t..2t+1), (g+8, 2t..), (g, 2t+8..), (g+8, 2t+8..)}
//   B (16x8, k x n)      regs: {(k=2t..2t+1, n=g), (k=2t+8..2t+9, n=g)}
//   C (16x8, fp32)            : c0,c1 = (g, 2t..2t+1), c2,c3 = (g+8, 2t..2t+1)
// A 32-bit register holds the lower-indexed element in its low 16 bits.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "attention/flash_params.h"

namespace dcgen::attention {

constexpr int kBlockM = kFlashBlockM;  // query rows per CTA
constexpr int kBlockN = 64;  // key rows per tile
constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;

template <typename T>
struct Element;

template <>
struct Element<__nv_bfloat16> {
  static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
    __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);  // .x (low half) = lo
    return *reinterpret_cast<uint32_t*>(&h);
  }
  static __device__ __forceinline__ float2 unpack(uint32_t u) {
    return __bfloat1622float2(*reinterpret_cast<__nv_bfloat162*>(&u));
  }
  static __device__ __forceinline__ void mma(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                             uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
};

template <>
struct Element<__half> {
  static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
    __half2 h = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&h);
  }
  static __device__ __forceinline__ float2 unpack(uint32_t u) {
    return __half22float2(*reinterpret_cast<__half2*>(&u));
  }
  static __device__ __forceinline__ void mma(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                             uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
};

// 2^x for the softmax's exponentials: one MUFU.EX2. exp2f also handles results below 2^-126
// (a compare, two multiplies and a select per element, measured in the sm_90a TMA kernel's SASS);
// those are probabilities that vanish next to the row's maximum, which contributes 1, and that
// bf16 P would not hold either, so they flush to zero here (FlashAttention does the same through
// fast math).
__device__ __forceinline__ float exp2_approx(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

// 32-bit word at element offset `off` (even) of a shared tile of 16-bit elements.
__device__ __forceinline__ uint32_t lds32(const uint16_t* tile, int off) {
  return *reinterpret_cast<const uint32_t*>(tile + off);
}

// Two 16-bit elements from different rows packed into one register (lo first).
__device__ __forceinline__ uint32_t pack16(uint16_t lo, uint16_t hi) {
  return static_cast<uint32_t>(lo) | (static_cast<uint32_t>(hi) << 16);
}

// ldmatrix.x4: lanes 8m..8m+7 give the row addresses of 8x8 matrix m; register m receives
// that matrix's (lane / 4, 2 (lane % 4) .. +1) pair, or with .trans its transpose's, i.e.
// rows 2 (lane % 4) .. +1 of column lane / 4.
__device__ __forceinline__ void ldsm_x4(uint32_t (&r)[4], const uint16_t* row_ptr) {
  const uint32_t addr = static_cast<uint32_t>(__cvta_generic_to_shared(row_ptr));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

__device__ __forceinline__ void ldsm_x4_trans(uint32_t (&r)[4], const uint16_t* row_ptr) {
  const uint32_t addr = static_cast<uint32_t>(__cvta_generic_to_shared(row_ptr));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

__device__ __forceinline__ uint32_t& word(uint4& v, int i) {
  return i == 0 ? v.x : i == 1 ? v.y : i == 2 ? v.z : v.w;
}

// The QK prologue on one row held by 4 adjacent lanes (thread `sub` holds the row's 16-byte
// chunks sub, sub + 4, ...; `raw` are its kChunks chunks). When w0 is set, the row is
// RMS-normalised in fp32 and scaled by w0 (row < norm_split) or w1; when cos is set, RoPE
// rotates interleaved pairs: (x0, x1) -> (x0 c0 - x1 s0, x1 c1 + x0 s1) with c, s taken from
// the token's table row at the pair's two columns. One rounding to T at the end. Every lane of
// the warp must call it (the norm's sum of squares is two shuffles). Shared by the portable and
// the Hopper kernels.
template <typename T, int D, int kChunks>
__device__ __forceinline__ void apply_prologue(uint4 (&raw)[kChunks], int row, bool inside,
                                               int sub, const float* w0, const float* w1,
                                               int norm_split, float eps, const float* cos,
                                               const float* sin) {
  constexpr int kThreadsPerRow = 4;
  static_assert(kChunks * kThreadsPerRow * 8 == D, "4 lanes x kChunks x 8 elements per row");
  if (w0 == nullptr && cos == nullptr) return;  // uniform across the CTA
  float inv = 1.f;
  if (w0 != nullptr) {
    float ss = 0.f;
#pragma unroll
    for (int c = 0; c < kChunks; ++c) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const float2 x = Element<T>::unpack(word(raw[c], e));
        ss += x.x * x.x + x.y * x.y;
      }
    }
    // every lane of the warp takes part: the four lanes of a row are adjacent
    ss += __shfl_xor_sync(0xffffffffu, ss, 1);
    ss += __shfl_xor_sync(0xffffffffu, ss, 2);
    inv = rsqrtf(ss / static_cast<float>(D) + eps);
  }
  const float* w = row < norm_split ? w0 : w1;
  const bool rope = cos != nullptr && inside;
#pragma unroll
  for (int c = 0; c < kChunks; ++c) {
    const int col0 = (c * kThreadsPerRow + sub) * 8;
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int col = col0 + 2 * e;
      float2 x = Element<T>::unpack(word(raw[c], e));
      if (w0 != nullptr) {
        x.x = x.x * inv * w[col];
        x.y = x.y * inv * w[col + 1];
      }
      if (rope) {
        const float2 cs = *reinterpret_cast<const float2*>(cos + row * D + col);
        const float2 sn = *reinterpret_cast<const float2*>(sin + row * D + col);
        x = make_float2(x.x * cs.x - x.y * sn.x, x.y * cs.y + x.x * sn.y);
      }
      word(raw[c], e) = Element<T>::pack(x.x, x.y);
    }
  }
}

// Loads rows [row0, row0 + kRowsTile) of a (seqlen, D) matrix (row stride `stride` elements)
// into shared memory with kCtaThreads threads, zero-filling rows past `seqlen`, with the
// prologue (apply_prologue) when w0 or cos is set. `at(r, col)` is the shared address of the
// 8 elements (one 16-byte unit) of tile row r from column col: a padded row-major tile here, a
// swizzled wgmma tile in the Hopper kernel.
//
// Four consecutive threads share a row (so the norm's sum of squares is two shuffles); thread
// `sub` takes 16-byte chunks sub, sub + 4, ... so the four together read contiguous 64 bytes.
template <typename T, int D, int kRowsTile, int kCtaThreads, class At>
__device__ __forceinline__ void load_rows(At at, const T* src, int64_t stride, int row0,
                                          int seqlen, const float* w0, const float* w1,
                                          int norm_split, float eps, const float* cos,
                                          const float* sin) {
  constexpr int kThreadsPerRow = 4;
  constexpr int kChunksPerThread = D / 8 / kThreadsPerRow;
  constexpr int kRowsPerPass = kCtaThreads / kThreadsPerRow;
  static_assert(kRowsTile % kRowsPerPass == 0, "whole passes");
  const int sub = threadIdx.x % kThreadsPerRow;
#pragma unroll
  for (int pass = 0; pass < kRowsTile / kRowsPerPass; ++pass) {
    const int r = pass * kRowsPerPass + threadIdx.x / kThreadsPerRow;
    const int row = row0 + r;
    const bool inside = row < seqlen;
    uint4 raw[kChunksPerThread];
#pragma unroll
    for (int c = 0; c < kChunksPerThread; ++c) {
      const int col = (c * kThreadsPerRow + sub) * 8;
      raw[c] = inside ? *reinterpret_cast<const uint4*>(src + row * stride + col)
                      : make_uint4(0u, 0u, 0u, 0u);
    }
    apply_prologue<T, D>(raw, row, inside, sub, w0, w1, norm_split, eps, cos, sin);
#pragma unroll
    for (int c = 0; c < kChunksPerThread; ++c) {
      *reinterpret_cast<uint4*>(at(r, (c * kThreadsPerRow + sub) * 8)) = raw[c];
    }
  }
}

// The portable kernel's 64-row tiles: row stride D + 8 elements in shared memory.
template <typename T, int D>
__device__ __forceinline__ void load_tile(uint16_t* dst, const T* src, int64_t stride, int row0,
                                          int seqlen, const float* w0, const float* w1,
                                          int norm_split, float eps, const float* cos,
                                          const float* sin) {
  constexpr int kLd = D + 8;
  load_rows<T, D, kBlockM, kThreads>([dst](int r, int col) { return dst + r * kLd + col; }, src,
                                     stride, row0, seqlen, w0, w1, norm_split, eps, cos, sin);
}

// One (batch, head)'s q, k, v, o rows and key mask (null when there is none).
template <typename T>
struct HeadSlices {
  const T* q;
  const T* k;
  const T* v;
  T* o;
  const bool* mask;
};

template <typename T>
__device__ __forceinline__ HeadSlices<T> head_slices(const FlashParams& p, int b, int h) {
  return {static_cast<const T*>(p.q) + b * p.q_batch_stride + h * p.q_head_stride,
          static_cast<const T*>(p.k) + b * p.k_batch_stride + h * p.k_head_stride,
          static_cast<const T*>(p.v) + b * p.v_batch_stride + h * p.v_head_stride,
          static_cast<T*>(p.o) + b * p.o_batch_stride + h * p.o_head_stride,
          p.key_padding_mask == nullptr ? nullptr
                                        : p.key_padding_mask + b * p.mask_batch_stride};
}

template <typename T, int D, bool kLdsm>
__global__ void __launch_bounds__(kThreads) flash_fwd_kernel(const FlashParams p) {
  static_assert(D % 32 == 0, "D must split into 8-element chunks over 4 threads");
  constexpr int kLd = D + 8;
  // Raw 16-bit storage: bf16/half have constructors, which __shared__ arrays do not allow.
  __shared__ alignas(16) uint16_t sK[kBlockN * kLd];
  __shared__ alignas(16) uint16_t sV[kBlockN * kLd];  // also stages the Q tile
  __shared__ bool sKeep[kBlockN];

  const int m_block = blockIdx.x;
  const int h = blockIdx.y;
  const int b = blockIdx.z;
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int g = lane / 4;
  const int t = lane % 4;
  const int lm = lane / 8;  // ldmatrix: which 8x8 matrix this lane addresses
  const int lr = lane % 8;  // and which of its rows

  const auto [q, k, v, o, mask] = head_slices<T>(p, b, h);

  // Q tile (with its prologue) -> shared -> this warp's 16 rows as A fragments in registers.
  load_tile<T, D>(sV, q, p.q_row_stride, m_block * kBlockM, p.seqlen_q, p.q_w0, p.q_w1,
                  p.norm_split, p.eps, p.q_cos, p.q_sin);
  __syncthreads();
  uint32_t qf[D / 16][4];
  {
    const uint16_t* sQ = sV + warp * 16 * kLd;
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      qf[kk][0] = lds32(sQ, g * kLd + kk * 16 + 2 * t);
      qf[kk][1] = lds32(sQ, (g + 8) * kLd + kk * 16 + 2 * t);
      qf[kk][2] = lds32(sQ, g * kLd + kk * 16 + 8 + 2 * t);
      qf[kk][3] = lds32(sQ, (g + 8) * kLd + kk * 16 + 8 + 2 * t);
    }
  }

  float acc[D / 8][4];
#pragma unroll
  for (int dn = 0; dn < D / 8; ++dn) acc[dn][0] = acc[dn][1] = acc[dn][2] = acc[dn][3] = 0.f;
  // Running max (in the exp2 domain) and partial row sums for rows g and g + 8. The sums are
  // per thread (a quarter of the row's columns) and reduced across the quad at the end.
  float row_max[2] = {-INFINITY, -INFINITY};
  float row_sum[2] = {0.f, 0.f};

  for (int n0 = 0; n0 < p.seqlen_k; n0 += kBlockN) {
    __syncthreads();  // everyone is done with sK / sV (and the Q staging) of the last round
    load_tile<T, D>(sK, k, p.k_row_stride, n0, p.seqlen_k, p.k_w0, p.k_w1, p.norm_split, p.eps,
                    p.k_cos, p.k_sin);
    load_tile<T, D>(sV, v, p.v_row_stride, n0, p.seqlen_k, nullptr, nullptr, 0, 0.f, nullptr,
                    nullptr);
    if (threadIdx.x < kBlockN) {
      const int key = n0 + threadIdx.x;
      sKeep[threadIdx.x] = key < p.seqlen_k && (mask == nullptr || mask[key]);
    }
    __syncthreads();

    // S = Q K^T for this warp's 16 rows x 64 keys: 8 n-tiles of 8 keys.
    float s[kBlockN / 8][4];
#pragma unroll
    for (int nt = 0; nt < kBlockN / 8; ++nt) s[nt][0] = s[nt][1] = s[nt][2] = s[nt][3] = 0.f;
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      if constexpr (kLdsm) {
        // Matrices: keys of n-tile nt (m = 0, 1) and nt + 1 (m = 2, 3), dims kk*16 + 0 / + 8.
#pragma unroll
        for (int nt = 0; nt < kBlockN / 8; nt += 2) {
          uint32_t r[4];
          ldsm_x4(r, sK + ((nt + lm / 2) * 8 + lr) * kLd + kk * 16 + (lm % 2) * 8);
          Element<T>::mma(s[nt], qf[kk], r[0], r[1]);
          Element<T>::mma(s[nt + 1], qf[kk], r[2], r[3]);
        }
      } else {
#pragma unroll
        for (int nt = 0; nt < kBlockN / 8; ++nt) {
          // B[k][n] = K[key n][dim k]: two consecutive dims of one key row are one word.
          const int base = (nt * 8 + g) * kLd + kk * 16 + 2 * t;
          Element<T>::mma(s[nt], qf[kk], lds32(sK, base), lds32(sK, base + 8));
        }
      }
    }

    // Scale into the exp2 domain, mask, and update the running max.
    float tile_max[2] = {row_max[0], row_max[1]};
#pragma unroll
    for (int nt = 0; nt < kBlockN / 8; ++nt) {
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int key = nt * 8 + 2 * t + (i & 1);
        const float x = sKeep[key] ? s[nt][i] * p.scale_log2 : -INFINITY;
        s[nt][i] = x;
        tile_max[i / 2] = fmaxf(tile_max[i / 2], x);
      }
    }
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      tile_max[r] = fmaxf(tile_max[r], __shfl_xor_sync(0xffffffffu, tile_max[r], 1));
      tile_max[r] = fmaxf(tile_max[r], __shfl_xor_sync(0xffffffffu, tile_max[r], 2));
    }
    float alpha[2];
    float base[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      // A row with no valid key so far keeps max -inf: use 0 as the base so exp2 gives 0,
      // not NaN from (-inf) - (-inf).
      base[r] = tile_max[r] == -INFINITY ? 0.f : tile_max[r];
      alpha[r] = exp2f(row_max[r] - base[r]);
      row_max[r] = tile_max[r];
      row_sum[r] *= alpha[r];
    }
#pragma unroll
    for (int nt = 0; nt < kBlockN / 8; ++nt) {
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const float e = exp2_approx(s[nt][i] - base[i / 2]);
        s[nt][i] = e;
        row_sum[i / 2] += e;
      }
    }
#pragma unroll
    for (int dn = 0; dn < D / 8; ++dn) {
      acc[dn][0] *= alpha[0];
      acc[dn][1] *= alpha[0];
      acc[dn][2] *= alpha[1];
      acc[dn][3] *= alpha[1];
    }

    // O += P V. The C fragments of n-tiles 2j and 2j+1 are exactly the A fragment of keys
    // [16j, 16j + 16). B[k][n] = V[key k][dim n]: the two keys of a register sit in different
    // rows, so they are two 16-bit loads.
#pragma unroll
    for (int j = 0; j < kBlockN / 16; ++j) {
      uint32_t a[4];
      a[0] = Element<T>::pack(s[2 * j][0], s[2 * j][1]);
      a[1] = Element<T>::pack(s[2 * j][2], s[2 * j][3]);
      a[2] = Element<T>::pack(s[2 * j + 1][0], s[2 * j + 1][1]);
      a[3] = Element<T>::pack(s[2 * j + 1][2], s[2 * j + 1][3]);
      if constexpr (kLdsm) {
        // Transposed matrices: keys j*16 + 0 / + 8 (m = 0, 1 / m % 2) of dims dn*8 (m < 2) and
        // (dn + 1)*8 (m >= 2); .trans hands each lane the (2t, 2t + 1) keys of dim g.
#pragma unroll
        for (int dn = 0; dn < D / 8; dn += 2) {
          uint32_t r[4];
          ldsm_x4_trans(r, sV + (j * 16 + (lm % 2) * 8 + lr) * kLd + (dn + lm / 2) * 8);
          Element<T>::mma(acc[dn], a, r[0], r[1]);
          Element<T>::mma(acc[dn + 1], a, r[2], r[3]);
        }
      } else {
        const int key = j * 16 + 2 * t;
#pragma unroll
        for (int dn = 0; dn < D / 8; ++dn) {
          const int col = dn * 8 + g;
          const uint32_t b0 = pack16(sV[key * kLd + col], sV[(key + 1) * kLd + col]);
          const uint32_t b1 = pack16(sV[(key + 8) * kLd + col], sV[(key + 9) * kLd + col]);
          Element<T>::mma(acc[dn], a, b0, b1);
        }
      }
    }
  }

  // Normalise and store. Rows with no valid key (everything masked) have sum 0 and write 0.
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    row_sum[r] += __shfl_xor_sync(0xffffffffu, row_sum[r], 1);
    row_sum[r] += __shfl_xor_sync(0xffffffffu, row_sum[r], 2);
  }
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int row = m_block * kBlockM + warp * 16 + g + 8 * r;
    if (row >= p.seqlen_q) continue;
    const float inv = row_sum[r] > 0.f ? 1.f / row_sum[r] : 0.f;
    T* out = o + row * p.o_row_stride;
#pragma unroll
    for (int dn = 0; dn < D / 8; ++dn) {
      *reinterpret_cast<uint32_t*>(out + dn * 8 + 2 * t) =
          Element<T>::pack(acc[dn][2 * r] * inv, acc[dn][2 * r + 1] * inv);
    }
  }
}

template <typename T, int D>
void run_flash_fwd(const FlashParams& params, cudaStream_t stream) {
  const dim3 grid((params.seqlen_q + kBlockM - 1) / kBlockM, params.heads, params.batch);
  if (params.plain_loads) {
    flash_fwd_kernel<T, D, false><<<grid, kThreads, 0, stream>>>(params);
  } else {
    flash_fwd_kernel<T, D, true><<<grid, kThreads, 0, stream>>>(params);
  }
}

}  // namespace dcgen::attention
