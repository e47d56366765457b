// Rounding onto the coarse grids of the quantize kernels (E2M1, E4M3) in few instructions, with
// results bit-identical to the references' IEEE division and threshold comparisons.
//
// Why: the first NVFP4 activation quantize spent about 40 SASS instructions per element (an IEEE
// division, ten instructions with its slow-path check, and seven threshold comparisons folded into
// a sum, twenty more), so at FLUX sizes it was instruction-bound rather than bandwidth-bound. Here
// an element takes one multiply, a three-instruction guard and a branch-free E2M1 encode.
//
// Host builds use the plain C++ operators (IEEE round-to-nearest-even on x86-64, no fast-math),
// so tests/ops/test_grid_round.py compiles this exact code with the host compiler and checks it
// exhaustively against the reference rules on a CPU.
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define DCGEN_GRID_FN __host__ __device__ __forceinline__
#else
#define DCGEN_GRID_FN inline
#endif

namespace dcgen::quant {

DCGEN_GRID_FN uint32_t float_bits(float v) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(v);
#else
  uint32_t u;
  std::memcpy(&u, &v, sizeof u);
  return u;
#endif
}

DCGEN_GRID_FN float bits_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float v;
  std::memcpy(&v, &u, sizeof v);
  return v;
#endif
}

// Correctly rounded fp32 operations (the device intrinsics keep the compiler from contracting
// them into FMAs, which would change the results).
DCGEN_GRID_FN float mul_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}

DCGEN_GRID_FN float add_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}

DCGEN_GRID_FN float div_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fdiv_rn(a, b);
#else
  return a / b;
#endif
}

DCGEN_GRID_FN float recip_rn(float d) {
#if defined(__CUDA_ARCH__)
  return __frcp_rn(d);
#else
  return 1.f / d;
#endif
}

DCGEN_GRID_FN float abs_min6(float v) {  // min(|v|, 6); NaN -> 6, as fminf
#if defined(__CUDA_ARCH__)
  return fminf(fabsf(v), 6.f);  // one FMNMX with an |operand|
#else
  const float a = bits_float(float_bits(v) & 0x7fffffffu);
  return a < 6.f ? a : 6.f;
#endif
}

DCGEN_GRID_FN uint32_t umax(uint32_t a, uint32_t b) { return a > b ? a : b; }

// E2M1 code of q (a value already divided by its block scale): round to nearest, ties to the
// even code, saturating at 6 (code 7); the sign (q's sign bit, -0 included) in bit 3. The same
// codes as comparing |q| with the midpoints 0.25 < 0.75 <= 1.25 < 1.75 <= 2.5 < 3.5 <= 5 <
// (dcgen.quant.nvfp4.e2m1_encode). NaN gives 7 here; the kernels never encode one (a block with
// a NaN has a NaN scale and is written as zero codes).
//
// Branch-free: on a's binade [2^e, 2^(e+1)), e >= 0, the E2M1 grid spacing is 2^(e-1), and below
// 1 it stays 0.5 (E2M1's subnormals). That is the fp32 spacing just above M = 2^(max(e,0)+22), so
// the fp32 sum a + M rounds a onto the grid, ties to even (an even multiple of the spacing is an
// even code), and its bit pattern counts grid steps above M. code = steps + 2 max(e, 0). a is
// capped at 6 first, the largest E2M1 value: everything above 5 is code 7 either way, and the
// cap keeps the code at 7 without a final min (an instruction per element; a cap at 8 let 7
// and up round to 8, code 8).
DCGEN_GRID_FN uint32_t e2m1_code(float q) {
  const uint32_t sign = (float_bits(q) >> 28) & 8u;
  const float a = abs_min6(q);
  const uint32_t binade = umax(float_bits(a) & 0x7f800000u, 0x3f800000u);  // 2^max(e, 0)
  const uint32_t m = binade + (22u << 23);                                // M = 2^(max(e,0)+22)
  const uint32_t steps = float_bits(add_rn(a, bits_float(m))) - m;
  // (binade >> 22) - 254 = 2 max(e, 0): the exponent field, doubled, less twice the bias
  return (steps + (binade >> 22) - 254u) | sign;
}

// x / d for a grid rounding, by a multiply with the reciprocal where that provably rounds the
// same as the IEEE division (__fdiv_rn), which callers run where it might not.
//
// Proof sketch: with r = RN(1/d), v r = (v/d)(1 + e), |e| <= 2^-24, less than one ulp of v/d,
// so q1 = RN(v r) and q = RN(v/d) are at most 3 fp32 steps apart (5 where they sit just below
// a power of two). A rounding onto the grid gives q1 and q different results only if one of
// the grid's decision points (a midpoint or threshold) lies between them, and every decision
// point of E2M1 and E4M3 (normal and subnormal), the 448 saturation included, is an fp32 value
// whose low 19 mantissa bits are zero. So q1 is decisive where its bit pattern is more than 8
// steps from every multiple of 2^19: all but about 1 value in 30,000 of a smooth distribution
// (exact zeros, and products with few significant bits such as a bf16 value times a power of
// two, are not; callers then divide, as the reference does). Below 2^-11 (all rounding to 0
// on both grids) and above 448 (saturated) q1 and q cannot round differently, so subnormal and
// huge quotients need no care; infinities and NaN have zero low bits and are never decisive.
// `usable`: d and 1/d are normal, so e is bounded as above (false for 0, Inf and NaN).
// `exact_reciprocal`: d is a power of two as well, so r = 1/d exactly and every product IS the quotient
// (the same real number, rounded once). Such products often have zero low bits (a bf16 value
// times a power of two, the zeros of an all-zero row whose FP8 scale is 1), which the bit test
// would send to the division path for nothing.
struct GridDivisor {
  float d;
  float r;
  bool usable;
  bool exact_reciprocal;

  DCGEN_GRID_FN explicit GridDivisor(float divisor)
      : d(divisor),
        r(recip_rn(divisor)),
        usable(divisor >= 0x1p-125f && divisor <= 0x1p125f),
        exact_reciprocal(usable && (float_bits(divisor) & 0x7fffffu) == 0u) {}

  DCGEN_GRID_FN float product(float v) const { return mul_rn(v, r); }
  // The low 19 bits of (bits + 8) above 16, i.e. bits more than 8 steps from a multiple of
  // 2^19: shifted to the top of the word, one multiply-add and one compare per product (the
  // mask form took an add, a mask and a compare).
  DCGEN_GRID_FN static bool decisive(float product) {
    return (float_bits(product) + 8u) << 13 > (16u << 13);
  }
  DCGEN_GRID_FN float exact(float v) const { return div_rn(v, d); }

  // v[i] <- its product, in place; whether every product is decisive (and the divisor usable)
  // or the reciprocal exact: the callers' one branch per group to the division path.
  template <int N>
  DCGEN_GRID_FN bool products(float (&v)[N]) const {
    bool all = usable;
#pragma unroll
    for (int i = 0; i < N; ++i) {
      v[i] = product(v[i]);
      all &= decisive(v[i]);
    }
    return all || exact_reciprocal;
  }
};

}  // namespace dcgen::quant
