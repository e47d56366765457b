"""csrc/nvfp4/rs_fragment.h on the host: the quad transpose of the register-operand Hopper NVFP4
GEMM (nvfp4_gemm_rs_sm90.cuh) gives every lane its wgmma A fragment.

The driver plays the four lanes of a quad on one weight row's 64-element K tile exactly as the
kernel does (each lane loads its 16-element block as two words, two byte-permute stages with
the partner lanes c ^ 1 and c ^ 2, then e2m1x8_to_bf16x8), with the header's selectors. wgmma's
register A fragment (m64 x k16, bf16) wants, for lane c and K block s, the code pairs
(16 s + 2c, + 1) in its first register of the row and (16 s + 8 + 2c, + 1) in its third.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import torch

from dcgen.quant.nvfp4 import e2m1_decode, unpack_e2m1
from tests.host_cxx import build_driver

DRIVER = r"""
#include <cstdio>
#include "nvfp4/rs_fragment.h"
using namespace dcgen::nvfp4;
int main() {
  unsigned w[8];  // one row's 32-byte chunk of a K tile, as words
  while (std::scanf("%x %x %x %x %x %x %x %x", &w[0], &w[1], &w[2], &w[3], &w[4], &w[5], &w[6],
                    &w[7]) == 8) {
    for (int h = 0; h < 2; ++h) {  // h = 0: the lanes' x words (2c), 1: their y words (2c + 1)
      uint32_t x[4], u[4];
      for (int c = 0; c < 4; ++c) x[c] = w[2 * c + h];
      for (int c = 0; c < 4; ++c) u[c] = byte_perm(x[c], x[c ^ 1], quad_stage1_selector(c));
      for (int c = 0; c < 4; ++c) {
        const uint32_t t = byte_perm(u[c], u[c ^ 2], quad_stage2_selector(c));
        uint32_t pairs[4];
        e2m1x8_to_bf16x8(t, pairs);  // pairs[s]: K block s
        std::printf("%08x %08x %08x %08x\n", pairs[0], pairs[1], pairs[2], pairs[3]);
      }
    }
  }
  return 0;
}
"""


@pytest.fixture(scope="module")
def quad_binary(tmp_path_factory) -> Path:
    return build_driver(tmp_path_factory, "rs_fragment", DRIVER)


def _bf16_bits(codes: torch.Tensor) -> torch.Tensor:
    return e2m1_decode(codes).to(torch.bfloat16).view(torch.int16).to(torch.int64) & 0xFFFF


def test_each_lane_gets_its_wgmma_a_fragment(quad_binary, rng):
    rows = torch.randint(0, 256, (64, 32), generator=rng, dtype=torch.int64)  # random chunks
    rows[0] = torch.arange(32)  # every byte distinct: a misplaced pair cannot match by chance
    words = rows.view(64, 8, 4)
    words = (words * torch.tensor([1, 1 << 8, 1 << 16, 1 << 24])).sum(-1)
    text = "\n".join(" ".join(f"{int(v):08x}" for v in r) for r in words.tolist())
    out = subprocess.run([str(quad_binary)], input=text, capture_output=True, text=True, check=True)
    got = torch.tensor([int(t, 16) for t in out.stdout.split()], dtype=torch.int64)
    got = got.view(64, 2, 4, 4)  # row, h (register 0 / 2), lane c, K block s

    codes = unpack_e2m1(rows.to(torch.uint8))  # (64, 64): code k of the row's tile
    bits = _bf16_bits(codes)
    c = torch.arange(4).view(4, 1)
    s = torch.arange(4).view(1, 4)
    for h in range(2):
        k = 16 * s + 8 * h + 2 * c  # (lane, block): the pair's even K index
        want = bits[:, k] | (bits[:, k + 1] << 16)
        assert torch.equal(got[:, h], want), f"register {2 * h} of the fragment"


EPILOGUE_DRIVER = r"""
#include <cstdio>
#include "nvfp4/rs_fragment.h"
using namespace dcgen::nvfp4;
// wgmma's accumulator layout (PTX ISA, m64nNk16 D fragment), for consumer thread tid of the
// two warpgroups: value i sits at row n and column m of the CTA's 128 x 256 D^T tile.
static void acc_coords(int tid, int i, int& n, int& m) {
  const int lane = tid % 32, g = lane / 4, c = lane % 4;
  n = 64 * (tid / 128) + 16 * ((tid % 128) / 32) + g + 8 * ((i / 2) % 2);
  m = 8 * (i / 4) + 2 * c + i % 2;
}
int main() {
  static int tag_n[256][128], tag_m[256][128], writes[256][128];
  for (int warp = 0; warp < 8; ++warp) {
    for (int jj = 0; jj < 16; ++jj) {
      for (int q = 0; q < 4; ++q) {
        for (int src = 0; src < 32; ++src) {
          for (int h = 0; h < 2; ++h) {
            // stmatrix .trans: element (row src / 4, column 2 (src % 4) + h) of matrix q goes
            // to position `row` of the memory row that lane 8 q + column addresses.
            const int row = src / 4, col = 2 * (src % 4) + h;
            int m_local, n_local;
            stmatrix_row_start(32 * warp + 8 * q + col, jj, m_local, n_local);
            int n, m;
            acc_coords(32 * warp + src, stmatrix_acc_index(jj, q) + h, n, m);
            tag_n[m_local][n_local + row] = n;
            tag_m[m_local][n_local + row] = m;
            ++writes[m_local][n_local + row];
          }
        }
      }
    }
  }
  int wrong = 0, unwritten = 0, twice = 0;
  for (int m = 0; m < 256; ++m)
    for (int n = 0; n < 128; ++n) {
      if (writes[m][n] == 0) ++unwritten;
      else if (writes[m][n] > 1) ++twice;
      else if (tag_n[m][n] != n || tag_m[m][n] != m) ++wrong;
    }
  std::printf("%d %d %d\n", wrong, unwritten, twice);
  return 0;
}
"""


def test_epilogue_stores_put_each_accumulator_at_its_d_element(tmp_path_factory):
    # The epilogue's index math (stmatrix_row_start, stmatrix_acc_index) with wgmma's
    # accumulator layout and stmatrix .trans's semantics modelled in the driver: every element
    # of the staged 256 x 128 tile (D's rows m, columns n) is written once, by the accumulator
    # of D^T's (n, m).
    exe = build_driver(tmp_path_factory, "rs_epilogue", EPILOGUE_DRIVER)
    out = subprocess.run([str(exe)], capture_output=True, text=True, check=True)
    wrong, unwritten, twice = map(int, out.stdout.split())
    assert (wrong, unwritten, twice) == (0, 0, 0)
