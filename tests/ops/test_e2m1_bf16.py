"""csrc/nvfp4/e2m1_bf16.h (the Hopper NVFP4 GEMM's E2M1 -> bf16 unpack) on the host.

The header's byte-permute decode is compiled with the host C++ compiler (its portable byte_perm
follows __byte_perm's documented semantics) and run on words that cover every code in every
nibble position, plus random words; each output must be the bf16 bit pattern of
dcgen.quant.nvfp4.e2m1_decode of the same codes.
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
#include "nvfp4/e2m1_bf16.h"
int main() {
  unsigned w;
  while (std::scanf("%x", &w) == 1) {
    uint32_t out[4];
    dcgen::nvfp4::e2m1x8_to_bf16x8(w, out);
    std::printf("%08x %08x %08x %08x\n", out[0], out[1], out[2], out[3]);
  }
  return 0;
}
"""


@pytest.fixture(scope="module")
def unpack_binary(tmp_path_factory) -> Path:
    return build_driver(tmp_path_factory, "e2m1", DRIVER)


def _run(exe: Path, words: torch.Tensor) -> torch.Tensor:
    text = "\n".join(f"{int(w):08x}" for w in words.tolist())
    out = subprocess.run([str(exe)], input=text, capture_output=True, text=True, check=True)
    vals = [int(t, 16) for t in out.stdout.split()]
    return torch.tensor(vals, dtype=torch.int64).reshape(len(words), 4)


def _expected(words: torch.Tensor) -> torch.Tensor:
    """bf16 pairs (low half = even code) of the reference decode, as unsigned 32-bit ints."""
    packed = torch.stack([(words >> (8 * i)) & 0xFF for i in range(4)], dim=1).to(torch.uint8)
    codes = unpack_e2m1(packed)  # (n, 8), code i from nibble i
    bits = e2m1_decode(codes).to(torch.bfloat16).view(torch.int16).to(torch.int64) & 0xFFFF
    return bits[:, 0::2] | (bits[:, 1::2] << 16)


def test_every_code_in_every_position(unpack_binary):
    # Each 16-bit pattern in both halves: all 16^4 code combinations of nibbles 0-3 and 4-7.
    v = torch.arange(1 << 16, dtype=torch.int64)
    words = v | (v << 16)
    torch.testing.assert_close(_run(unpack_binary, words), _expected(words), rtol=0, atol=0)


def test_random_words_and_signed_zeros(unpack_binary):
    g = torch.Generator().manual_seed(0)
    words = torch.randint(0, 1 << 32, (20000,), generator=g, dtype=torch.int64)
    # -0 (code 8) in every position, next to +0 and the largest magnitudes
    words = torch.cat([words, torch.tensor([0x88888888, 0x08080808, 0xF7F7F7F7, 0x7F7F7F7F])])
    got, want = _run(unpack_binary, words), _expected(words)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert int(got[-4, 0]) == 0x80008000  # -0 keeps its sign, as the reference does
