// The byte selectors of the register-operand Hopper NVFP4 GEMM's quad transpose
// (nvfp4_gemm_rs_sm90.cuh), host-compilable so tests/ops/test_nvfp4_rs_fragment.py can check on
// a CPU that the four lanes of a quad end up with wgmma's A fragment.
//
// Lane c of a quad (the four lanes that share a weight row) loads K block c of a 64-wide K tile:
// bytes 8c .. 8c + 7 of the row's 32-byte chunk, as the words x = chunk word 2c and y = 2c + 1.
// Its fragment needs byte c of every chunk word (codes 8w + 2c, + 1 of word w). Transposing the
// quad's four x words (and then the four y words) as a 4 x 4 byte matrix gives lane c the words
// T0 = (x_0[c], x_1[c], x_2[c], x_3[c]) and T1 likewise from y, where byte s of T0 is the code
// pair (16 s + 2c, + 1) and byte s of T1 the pair (16 s + 8 + 2c, + 1): K block s's first and
// second fragment register of that row.
//
// Stage 1 exchanges words with lane c ^ 1 and keeps the 2 x 2 byte blocks this lane will own
// after stage 2: even lanes bytes 0 and 2 of both rows, [own0, part0, own2, part2]; odd lanes
// bytes 1 and 3, [part1, own1, part3, own3]. Stage 2 exchanges with lane c ^ 2: lanes 0 and 1
// take the low halves [own, part], lanes 2 and 3 the high halves [part, own].
#pragma once

#include <cstdint>

#include "nvfp4/e2m1_bf16.h"

namespace dcgen::nvfp4 {

// byte_perm(own, partner, selector): bytes 0-3 are own's, 4-7 the partner's.
DCGEN_E2M1_FN uint32_t quad_stage1_selector(int c) { return (c & 1) ? 0x3715u : 0x6240u; }
DCGEN_E2M1_FN uint32_t quad_stage2_selector(int c) { return (c & 2) ? 0x3276u : 0x5410u; }

// The first of the 16 weight rows (CTA-local) whose wgmma fragments consumer thread `tid`
// (0..255) holds: 64 per warpgroup, 16 per warp; its lane adds lane / 4 (and + 8).
DCGEN_E2M1_FN int fragment_row_base(int tid) { return 64 * (tid / 128) + 16 * ((tid % 128) / 32); }

// The epilogue's stmatrix .x4 .trans stores (csrc/nvfp4/nvfp4_gemm_rs_sm90.cuh). The fp32
// accumulators of D^T (wgmma's 64 x N fragment of a consumer warpgroup: row = weight n,
// column = activation m) hold, at value i, v0 = i % 2 (column + 1), v1 = (i / 2) % 2 (row + 8)
// and j = i / 4 (column + 8 j), i.e. rows n = 16 w + g + 8 v1 and columns m = 8 j + 2c + v0 for
// lane 4 g + c of warp w. Store jj writes four 8 x 8 matrices, matrix q holding v1 = q % 2 and
// j = 2 jj + q / 2; .trans puts a matrix's columns (m) in the memory rows, so a memory row is
// 8 consecutive n of one m: the staged tile is D's rows.

// The accumulator index of the low half of matrix q's register in store jj (the high half is
// the next index).
DCGEN_E2M1_FN int stmatrix_acc_index(int jj, int q) { return 4 * (2 * jj + q / 2) + 2 * (q % 2); }

// The staged-tile element (activation row m, weight column n, both CTA-local) at which the
// address of consumer thread `tid` (0..255) points in store jj: lane l names memory row l % 8 of
// matrix l / 8.
DCGEN_E2M1_FN void stmatrix_row_start(int tid, int jj, int& m_local, int& n_local) {
  const int lane = tid % 32, q = lane / 8;
  n_local = fragment_row_base(tid) + 8 * (q % 2);
  m_local = 8 * (2 * jj + q / 2) + lane % 8;
}

}  // namespace dcgen::nvfp4
