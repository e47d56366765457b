// E2M1 codes -> bf16 bit patterns with byte permutes, for the Hopper NVFP4 GEMM's mainloop.
//
// Why: the first sm_90a kernel decoded each code with shifts, selects and an fp32 multiply, about
// ten instructions per element, so its two consumer warpgroups spent longer dequantizing a K tile
// than the tensor cores spent multiplying it (0.15-0.2x of cuBLAS bf16 on the H200). Here eight
// codes (one 32-bit word, code i in nibble i: even index in the low nibble) become four bf16x2
// words with eight PRMT byte selects and a few logic ops: the code's three magnitude bits index
// two 8-byte tables (the low and the high byte of the bf16 pattern of 0, 0.5, 1, 1.5, 2, 3, 4, 6),
// the sign bits are moved onto the high bytes, and the two byte vectors are interleaved into
// bf16 pairs.
// The block scale is then one bf16x2 multiply per pair, exact: every E2M1 x E4M3 product has at
// most 6 significant bits and lies in [2^-10, 2688] (KERNELS.md, NVFP4).
//
// Host builds get a portable byte_perm with __byte_perm's documented semantics (result byte n =
// input byte (s >> 4n) & 7 of the 8 bytes x, y; the selector's upper 16 bits are ignored), so
// tests/ops/test_e2m1_bf16.py checks this exact code on a CPU against the reference decode.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define DCGEN_E2M1_FN __host__ __device__ __forceinline__
#else
#define DCGEN_E2M1_FN inline
#endif

namespace dcgen::nvfp4 {

DCGEN_E2M1_FN uint32_t byte_perm(uint32_t x, uint32_t y, uint32_t s) {
#if defined(__CUDA_ARCH__)
  return __byte_perm(x, y, s);
#else
  const uint64_t in = (static_cast<uint64_t>(y) << 32) | x;
  uint32_t r = 0;
  for (int n = 0; n < 4; ++n) {
    const uint32_t sel = (s >> (4 * n)) & 7u;
    r |= static_cast<uint32_t>((in >> (8 * sel)) & 0xFFu) << (8 * n);
  }
  return r;
#endif
}

// Byte b of the tables is the low / high byte of the bf16 pattern of magnitude code b:
//   0 -> 0x0000, 0.5 -> 0x3F00, 1 -> 0x3F80, 1.5 -> 0x3FC0, 2 -> 0x4000, 3 -> 0x4040,
//   4 -> 0x4080, 6 -> 0x40C0.
constexpr uint32_t kLowBytes03 = 0xC0800000u;   // codes 0-3: 00 00 80 C0
constexpr uint32_t kLowBytes47 = 0xC0804000u;   // codes 4-7: 00 40 80 C0
constexpr uint32_t kHighBytes03 = 0x3F3F3F00u;  // 00 3F 3F 3F
constexpr uint32_t kHighBytes47 = 0x40404040u;  // 40 40 40 40

// The eight codes of ``w`` as four bf16x2 words: out[j] holds code 2j in its low half and code
// 2j + 1 in its high half (memory order, little endian).
DCGEN_E2M1_FN void e2m1x8_to_bf16x8(uint32_t w, uint32_t (&out)[4]) {
  // The selectors read bits 2:0 of each nibble, i.e. a code's magnitude; nibbles 0-3 of the
  // low (then the high) half pick codes 0-3 (then 4-7).
  const uint32_t lo03 = byte_perm(kLowBytes03, kLowBytes47, w);
  uint32_t hi03 = byte_perm(kHighBytes03, kHighBytes47, w);
  const uint32_t lo47 = byte_perm(kLowBytes03, kLowBytes47, w >> 16);
  uint32_t hi47 = byte_perm(kHighBytes03, kHighBytes47, w >> 16);
  // Signs into bit 7 of each high byte. Code c's sign is bit 3 (even c) or 7 (odd c) of byte
  // c / 2 of w; u copies byte b of w into bytes 0 and 1 and byte b + 1 into bytes 2 and 3, so
  // the even codes' signs land on bit 7 of bytes 0 / 2 after a shift by 4 and the odd codes'
  // signs already sit on bit 7 of bytes 1 / 3.
  const uint32_t u03 = byte_perm(w, 0u, 0x1100u);
  const uint32_t u47 = byte_perm(w, 0u, 0x3322u);
  hi03 |= ((u03 << 4) & 0x00800080u) | (u03 & 0x80008000u);
  hi47 |= ((u47 << 4) & 0x00800080u) | (u47 & 0x80008000u);
  // Interleave: [lo(c0), hi(c0), lo(c1), hi(c1)] and [lo(c2), hi(c2), lo(c3), hi(c3)].
  out[0] = byte_perm(lo03, hi03, 0x5140u);
  out[1] = byte_perm(lo03, hi03, 0x7362u);
  out[2] = byte_perm(lo47, hi47, 0x5140u);
  out[3] = byte_perm(lo47, hi47, 0x7362u);
}

}  // namespace dcgen::nvfp4
