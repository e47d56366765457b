"""csrc/nvfp4/grid_round.h (the quantize kernels' E2M1 encode and reciprocal divisor) on the host.

The header is compiled with the host C++ compiler (IEEE fp32 round-to-nearest-even, no FMA
contraction, like the device intrinsics it calls there) and checked against the references:

- ``e2m1_code`` on every fp32 bit pattern from 0 to 16 (and every 7th negated) against the
  threshold rule of ``dcgen.quant.nvfp4.e2m1_encode`` transcribed in the driver, and on a
  sample (every threshold's neighbourhood, random values, signed zeros, Inf) against
  ``e2m1_encode`` itself;
- ``GridDivisor`` on quotients built to land next to every decision point of both grids: where
  it calls the product decisive, the product must give the same E2M1 code and the same E4M3 byte
  (torch's cast after the reference's clamp) as the IEEE quotient; and the product must never be
  more than 5 fp32 steps from the quotient (the bound its proof rests on).
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import torch

from dcgen.quant.nvfp4 import e2m1_encode
from tests.host_cxx import build_driver

DRIVER = r"""
#include <cmath>
#include <cstdio>
#include <cstring>
#include <random>
#include "nvfp4/grid_round.h"
using namespace dcgen::quant;

// The reference's rule (dcgen.quant.nvfp4.e2m1_encode): count the midpoints passed, > for the
// ones after an even code and >= after an odd one.
static uint32_t threshold_code(float q) {
  const float a = std::fabs(q);
  const uint32_t c = (a > 0.25f) + (a >= 0.75f) + (a > 1.25f) + (a >= 1.75f) + (a > 2.5f) +
                     (a >= 3.5f) + (a > 5.f);
  return c | (std::signbit(q) ? 8u : 0u);
}

int main(int argc, char** argv) {
  const char* mode = argc > 1 ? argv[1] : "";
  if (!std::strcmp(mode, "exhaustive")) {  // every pattern in [0, 16], every 7th negated
    unsigned long long bad = 0, n = 0;
    for (uint32_t b = 0; b <= 0x41800000u; ++b) {
      bad += e2m1_code(bits_float(b)) != threshold_code(bits_float(b));
      ++n;
      if (b % 7 == 0) {
        const float q = bits_float(b | 0x80000000u);
        bad += e2m1_code(q) != threshold_code(q);
        ++n;
      }
    }
    std::printf("%llu %llu\n", n, bad);
    return 0;
  }
  if (!std::strcmp(mode, "codes")) {  // stdin: hex fp32 patterns -> their codes
    unsigned b;
    while (std::scanf("%x", &b) == 1) std::printf("%u\n", e2m1_code(bits_float(b)));
    return 0;
  }
  if (!std::strcmp(mode, "divide")) {  // stdin: hex pairs v d -> product, decisive, quotient
    unsigned vb, db;
    while (std::scanf("%x %x", &vb, &db) == 2) {
      const GridDivisor div(bits_float(db));
      float q1[1] = {bits_float(vb)};
      const bool decisive = div.products(q1);
      std::printf("%08x %d %08x\n", float_bits(q1[0]), decisive,
                  float_bits(div.exact(bits_float(vb))));
    }
    return 0;
  }
  return 2;
}
"""


@pytest.fixture(scope="module")
def driver(tmp_path_factory) -> Path:
    return build_driver(tmp_path_factory, "grid_round", DRIVER)


def _bits(x: torch.Tensor) -> torch.Tensor:
    return x.float().view(torch.int32).to(torch.int64) & 0xFFFFFFFF


def _floats(bits: torch.Tensor) -> torch.Tensor:
    return bits.to(torch.int64).to(torch.int32).view(torch.float32)


def _run(exe: Path, mode: str, lines: list[str]) -> list[str]:
    out = subprocess.run(
        [str(exe), mode], input="\n".join(lines), capture_output=True, text=True, check=True
    )
    return out.stdout.split("\n")[:-1]


def test_e2m1_code_on_every_pattern_up_to_16(driver):
    out = subprocess.run([str(driver), "exhaustive"], capture_output=True, text=True, check=True)
    n, bad = (int(t) for t in out.stdout.split())
    assert n == 0x41800000 + 1 + 0x41800000 // 7 + 1
    assert bad == 0, f"{bad} of {n} fp32 values encode differently from the threshold rule"


def test_e2m1_code_matches_the_reference_encoder(driver):
    g = torch.Generator().manual_seed(0)
    mids = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.0, 0.5, 1.0, 2.0, 4.0, 8.0])
    near = (_bits(mids)[:, None] + torch.arange(-64, 65)[None, :]).flatten()
    rand = _bits(torch.rand(20000, generator=g) * 10)
    wide = _bits(torch.randn(5000, generator=g) * 1e4)
    special = _bits(torch.tensor([0.0, -0.0, float("inf"), -float("inf"), 1e-40, 3e38]))
    bits = torch.cat([near, rand, wide, special])
    bits = torch.cat([bits, bits | 0x80000000])  # and every value negated
    got = torch.tensor([int(t) for t in _run(driver, "codes", [f"{int(b):08x}" for b in bits])])
    want = e2m1_encode(_floats(bits)).to(torch.int64)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def _e4m3_decision_points() -> torch.Tensor:
    """Midpoints between consecutive non-negative E4M3 values, and the largest value (448)."""
    vals = torch.arange(0, 127, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    return torch.cat([(vals[1:] + vals[:-1]) / 2, torch.tensor([448.0])])


def _adversarial_pairs(g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(v, d) whose quotient v/d lies within a few steps of a decision point of either grid."""
    e2m1 = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0])
    points = torch.cat([e2m1, _e4m3_decision_points()])
    n_d = 400
    exps = torch.randint(-40, 41, (n_d,), generator=g).float()
    d = (1 + torch.rand(n_d, generator=g)) * torch.exp2(exps)
    # a few divisors with few significant bits (powers of two, E4M3 values times a power of two)
    d = torch.cat([d, torch.exp2(torch.arange(-20, 21).float()), 1.5 * torch.exp2(exps[:50])])
    t = points[torch.randint(0, len(points), (len(d), 64), generator=g)]
    v = (t * d[:, None]).float()  # RN(t d): its quotient sits next to t
    v = _bits(v)[:, :, None] + torch.arange(-4, 5)[None, None, :]  # and its 4 neighbours each way
    v = _floats(v.flatten())
    dd = d[:, None, None].expand(len(d), 64, 9).flatten()
    sign = torch.where(torch.rand(v.shape, generator=g) < 0.5, -1.0, 1.0)
    v = v * sign
    # bf16 inputs (the kernels' usual case): the same products rounded to bf16
    v16 = v.to(torch.bfloat16).float()
    return torch.cat([v, v16]), torch.cat([dd, dd])


def test_reciprocal_quotient_rounds_like_the_division(driver):
    g = torch.Generator().manual_seed(1)
    v, d = _adversarial_pairs(g)
    # and smooth random quotients, where almost every product should be decisive
    rv = torch.randn(40000, generator=g) * 3
    rd = torch.rand(40000, generator=g) * 2 + 0.01
    v, d = torch.cat([v, rv]), torch.cat([d, rd])
    lines = [f"{int(a):08x} {int(b):08x}" for a, b in zip(_bits(v), _bits(d), strict=True)]
    rows = [r.split() for r in _run(driver, "divide", lines)]
    q1 = _floats(torch.tensor([int(r[0], 16) for r in rows]))
    decisive = torch.tensor([r[1] == "1" for r in rows])
    q = _floats(torch.tensor([int(r[2], 16) for r in rows]))

    # the driver's division is IEEE's (torch's fp32 division agrees)
    torch.testing.assert_close(q, v / d, rtol=0, atol=0, equal_nan=True)
    # the proof's bound: within 5 fp32 steps wherever both are normal numbers
    normal = (q.abs() >= 2**-125) & (q1.abs() >= 2**-125) & q.isfinite() & q1.isfinite()
    steps = (_bits(q1.abs()) - _bits(q.abs())).abs()
    assert int(steps[normal].max()) <= 5

    def e4m3(x: torch.Tensor) -> torch.Tensor:
        return x.clamp(-448, 448).to(torch.float8_e4m3fn).view(torch.uint8)

    differs = (e2m1_encode(q1) != e2m1_encode(q)) | (e4m3(q1) != e4m3(q))
    # the construction reaches the cases the guard exists for: products that round differently
    assert int(differs.sum()) > 100
    # where the product is called decisive, it rounds like the quotient on both grids
    assert not bool((differs & decisive).any())
    assert int(decisive.sum()) > 50000 and int((~decisive).sum()) > 50000
    # smooth quotients: nearly all decisive (the kernels' fast path), and the divisor usable
    assert decisive[-40000:].float().mean() > 0.999
    # a power-of-two divisor: the reciprocal is exact, every product is the quotient itself and
    # counts as decisive, zero low bits or not
    pow2 = (_bits(d) & 0x7FFFFF) == 0
    assert int(pow2.sum()) > 1000
    assert bool(decisive[pow2].all())
    assert torch.equal(_bits(q1[pow2]), _bits(q[pow2]))


def test_zero_row_divisor_one(driver):
    """An all-zero FP8 row has scale 1: its products (+-0) are exact and decisive."""
    rows = [r.split() for r in _run(driver, "divide", ["00000000 3f800000", "80000000 3f800000"])]
    assert [r[1] for r in rows] == ["1", "1"]
    assert [r[0] for r in rows] == ["00000000", "80000000"]


@pytest.mark.parametrize("d", [0.0, float("inf"), float("nan"), 2.0**-127, 2.0**126])
def test_divisor_outside_the_normal_range_is_never_decisive(driver, d):
    dv = torch.tensor([d])
    rows = [r.split() for r in _run(driver, "divide", [f"3f9d70a4 {int(_bits(dv)[0]):08x}"])]
    assert rows[0][1] == "0"
