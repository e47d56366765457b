"""Diagnostics for the Hopper (sm_90a) kernels, run by device_check.sh before the test suite.

The tests say pass or fail; when a new kernel fails on the GPU machine, the next fix is made on
a machine without a GPU, so this script keeps the evidence: for a few tiny cases of each kernel
it prints the error and where it sits (which rows / columns are wrong, NaN = never written), and
saves inputs, output and reference to $OUT/hopper_debug_<family>.pt for offline analysis.
Structured cases (one-hot activations, uniform attention) make layout mistakes readable.

    python benchmarks/hopper_debug.py attention|tma|gemm  [--out DIR] [--max-cases N]

One family per process: an illegal access poisons the CUDA context of the process that made it.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root: dcgen, tests
from tests.conftest import poison_cuda_allocator  # noqa: E402  (NaN-poisoned free memory)


def _where(bad: torch.Tensor, dim: int) -> str:
    """Indices along ``dim`` (of a 2-D mask) holding any bad element, shortened."""
    idx = bad.any(dim=1 - dim).nonzero().flatten().tolist()
    if not idx:
        return "-"
    head = ",".join(map(str, idx[:12]))
    return f"{len(idx)} [{head}{',...' if len(idx) > 12 else ''}]"


def report(name: str, got: torch.Tensor, want: torch.Tensor, atol: float, rtol: float) -> bool:
    g = got.detach().float().cpu().reshape(-1, got.shape[-1])
    w = want.detach().float().cpu().reshape(-1, want.shape[-1])
    nan = g.isnan()
    err = (g - w).abs().nan_to_num(float("inf"))
    bad = err > atol + rtol * w.abs()
    rel = float((g.nan_to_num() - w).norm() / w.norm().clamp_min(1e-30))
    ok = not bool(bad.any())
    print(
        f"  {'ok  ' if ok else 'FAIL'} {name}: rel {rel:.2e}, max abs {float(err.max()):.3g}, "
        f"NaN {int(nan.sum())}/{g.numel()}, bad {int(bad.sum())}; "
        f"bad rows {_where(bad, 0)}; bad cols {_where(bad, 1)}",
        flush=True,
    )
    return ok


def attention_cases(saved: dict, max_cases: int, kernel: str = "wgmma") -> bool:
    """``kernel``: the DCGEN_ATTENTION_SM90 choice (wgmma, or tma: the warp-specialized one).
    The TMA kernel runs every case twice: ping-pong off first, then on, so a hang or a wrong
    result in the ping-pong schedule leaves the plain pipeline's verdict in the log."""
    ok = True
    for pingpong in ("0", "1") if kernel == "tma" else ("1",):
        os.environ["DCGEN_ATTENTION_PINGPONG"] = pingpong
        tag = f"{kernel}{'-pingpong' if pingpong == '1' and kernel == 'tma' else ''}"
        ok &= _attention_cases(saved, max_cases, kernel, tag)
    return ok


def _attention_cases(saved: dict, max_cases: int, kernel: str, tag: str) -> bool:
    from dcgen.ops.attention import fused_attention, fused_attention_reference

    os.environ["DCGEN_ATTENTION_SM90"] = kernel
    os.environ["DCGEN_ATTENTION_KERNEL"] = "flash"  # the default path is qk_norm_rope + SDPA
    g = torch.Generator().manual_seed(0)
    ok = True
    for dtype in (torch.bfloat16, torch.float16):
        for d in (64, 128):
            cases = ((128, "uniform"), (128, "random"), (64, "random"), (200, "random"),
                     (500, "random"))  # fmt: skip
            for s, kind in cases:
                if kind == "uniform":  # q = 0: every row is the mean of V, a layout probe
                    q = torch.zeros(1, 1, s, d)
                    k = torch.randn(1, 1, s, d, generator=g)
                    v = torch.arange(s * d, dtype=torch.float32).reshape(1, 1, s, d) / (s * d)
                else:
                    q, k, v = (torch.randn(1, 2, s, d, generator=g) for _ in range(3))
                q, k, v = (t.to(dtype) for t in (q, k, v))
                if len(saved) >= max_cases:
                    return ok
                name = f"attention-{tag} {str(dtype)[6:]} d{d} s{s} {kind}"
                poison_cuda_allocator()
                try:
                    got = fused_attention(q.cuda(), k.cuda(), v.cuda())
                    torch.cuda.synchronize()
                except Exception:  # noqa: BLE001  (report and keep the evidence)
                    traceback.print_exc()
                    print(f"  FAIL {name}: raised", flush=True)
                    return False
                want = fused_attention_reference(q, k, v)
                ok &= report(name, got, want, 2e-2, 2e-2)
                saved[name] = {"q": q, "k": k, "v": v, "got": got.cpu(), "want": want}
    return ok


def gemm_cases(saved: dict, max_cases: int) -> bool:
    from dcgen.ops.nvfp4_gemm import (
        nvfp4_gemm,
        nvfp4_gemm_reference,
        nvfp4_gemm_w4a16,
        nvfp4_gemm_w4a16_reference,
    )
    from dcgen.ops.quantize_nvfp4 import quantize_nvfp4_activation
    from dcgen.quant.nvfp4 import quantize_nvfp4, swizzle_scales

    os.environ["DCGEN_NVFP4_SM90"] = "1"
    g = torch.Generator().manual_seed(0)
    ok = True
    # The last case: two 256-row activation tiles, N past one 128-row weight tile and not a
    # multiple of 8, 2.5 K tiles (the register-operand kernel's ragged edges and even padding).
    for m, n, k, kind in ((128, 128, 64, "onehot"), (128, 128, 64, "random"),
                          (128, 128, 128, "random"), (200, 136, 96, "random"),
                          (300, 140, 160, "random")):  # fmt: skip
        if kind == "onehot":  # row i of A picks column i % K of W: output row i = W[:, i % K]
            x = torch.zeros(m, k)
            x[torch.arange(m), torch.arange(m) % k] = 1.0
        else:
            x = torch.randn(m, k, generator=g)
        w = torch.randn(n, k, generator=g) * 0.05
        xc = x.cuda()
        qw = quantize_nvfp4(w.cuda())
        b, sb = qw.packed, swizzle_scales(qw.scales)
        a, sa, ga = quantize_nvfp4_activation(xc)
        for op in ("w4a4", "w4a16"):
            if len(saved) >= max_cases:
                return ok
            name = f"nvfp4 {op} {m}x{n}x{k} {kind}"
            poison_cuda_allocator()
            try:
                if op == "w4a4":
                    alpha = ga * qw.global_scale
                    got = nvfp4_gemm(a, sa, b, sb, alpha)
                    want = nvfp4_gemm_reference(a, sa, b, sb, alpha)
                else:
                    got = nvfp4_gemm_w4a16(xc.bfloat16(), b, sb, qw.global_scale)
                    want = nvfp4_gemm_w4a16_reference(xc.bfloat16(), b, sb, qw.global_scale)
                torch.cuda.synchronize()
            except Exception:  # noqa: BLE001
                traceback.print_exc()
                print(f"  FAIL {name}: raised", flush=True)
                return False
            ok &= report(name, got, want, 1e-2, 1.6e-2)
            saved[name] = {"x": x, "w": w, "got": got.cpu(), "want": want.cpu()}
    return ok


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument(
        "family",
        choices=["attention", "tma", "gemm"],
        help="attention: the wgmma kernel; tma: the warp-specialized TMA one",
    )
    ap.add_argument("--out", default=os.environ.get("OUT", "/tmp/dcgen_out"))
    ap.add_argument("--max-cases", type=int, default=1000, help="stop after N cases")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] != 9:
        print("hopper_debug: needs an sm_90 GPU; nothing to do")
        return 0
    saved: dict = {}
    print(f"hopper_debug {args.family}:", flush=True)
    out = Path(args.out) / f"hopper_debug_{args.family}.pt"
    try:
        if args.family == "gemm":
            ok = gemm_cases(saved, args.max_cases)
        else:
            kernel = "tma" if args.family == "tma" else "wgmma"
            ok = attention_cases(saved, args.max_cases, kernel)
    finally:
        out.parent.mkdir(parents=True, exist_ok=True)
        if not out.exists():  # a sanitizer rerun keeps the first run's tensors
            torch.save(saved, out)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
