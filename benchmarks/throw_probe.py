"""Which dcgen CUDA op checks crash the process instead of raising (GPU machine diagnostic).

    python benchmarks/throw_probe.py

On the H100 of 2026-11-27 two CUDA ops segfaulted when a test fed them bad input: in
``fp8_scale_epilogue`` a check whose message holds only strings raised cleanly, and the next
one, whose message formats integers, a device and sizes, crashed. This calls one op per case,
each in its own process, and prints per case where the check is compiled (nvcc: a .cu file;
g++: a .cpp file), what its message formats, the exit code and the first line of the error.
It ends with the libstdc++ the process maps after importing torch and dcgen._C, and the one
the extension was linked against. Nothing here runs without CUDA.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

PRELUDE = """
import sys, torch
sys.path.insert(0, {root!r})
import dcgen.ops  # loads dcgen._C
ops = torch.ops.dcgen
d = "cuda"
"""

# (name, compiled by, what the failing check's message formats, code)
CASES = [
    ("torch's own check", "torch", "ints", "torch.ones(3, device=d).view(4)"),
    (
        "fp8_scale_epilogue act",
        "nvcc (.cu)",
        "strings",
        "y = torch.ones(4, 8, device=d, dtype=torch.bfloat16)\n"
        "ops.fp8_scale_epilogue(y, torch.ones(4, device=d), torch.ones(8, device=d), None, 'relu')",
    ),
    (
        "fp8_scale_epilogue row_scale",
        "nvcc (.cu)",
        "ints, device, dtype, sizes",
        "y = torch.ones(4, 8, device=d, dtype=torch.bfloat16)\n"
        "ops.fp8_scale_epilogue(y, torch.ones(3, device=d), torch.ones(8, device=d), None, 'none')",
    ),
    (
        "adaln_modulate rows_per_batch",
        "nvcc (.cu)",
        "ints",
        "x = torch.ones(6, 8, device=d, dtype=torch.bfloat16)\n"
        "p = torch.ones(2, 8, device=d, dtype=torch.bfloat16)\n"
        "ops.adaln_modulate(x, p, p, 4, 1e-6)",
    ),
    (
        "adaln_modulate eps",
        "nvcc (.cu)",
        "a double",
        "x = torch.ones(6, 8, device=d, dtype=torch.bfloat16)\n"
        "p = torch.ones(2, 8, device=d, dtype=torch.bfloat16)\n"
        "ops.adaln_modulate(x, p, p, 3, -1.0)",
    ),
    (
        "nvfp4_gemm a dims",
        "g++ (.cpp)",
        "sizes",
        "a = torch.ones(8, device=d)\nops.nvfp4_gemm(a, a, a, a, torch.ones(1, device=d))",
    ),
    (
        "channel_rms_norm_fused act",
        "nvcc (.cu)",
        "strings (std::string)",
        "x = torch.ones(1, 4, 2, 2, device=d, dtype=torch.bfloat16)\n"
        "ops.channel_rms_norm_fused(x, None, None, None, 'tanh', 1e-5)",
    ),
]


CASE_TIMEOUT_S = 20


def run_case(code: str, prelude: str = PRELUDE) -> tuple[int, str]:
    """Exit code (1: raised, as it should; negative: killed by that signal) and the error line
    of ``code`` run after ``prelude`` in a fresh interpreter."""
    src = prelude.format(root=str(ROOT)) + code
    try:
        # 20 s a case (an import and one op call): the whole probe runs under device_check's
        # 90 s cap; -X faulthandler puts a crash's stack where the error line is read
        done = subprocess.run(
            [sys.executable, "-X", "faulthandler", "-c", src],
            capture_output=True,
            text=True,
            timeout=CASE_TIMEOUT_S,
        )
    except subprocess.TimeoutExpired:
        return 124, "timed out"
    err = [line for line in done.stderr.splitlines() if line.strip()]
    last = next((line for line in reversed(err) if "Error" in line or "Fatal" in line), "")
    return done.returncode, (last or (err[-1] if err else ""))[:160]


def libstdcxx() -> str:
    code = PRELUDE.format(root=str(ROOT)) + textwrap.dedent(
        """
        maps = open("/proc/self/maps").read().splitlines()
        print(sorted({line.split()[-1] for line in maps if "libstdc++" in line}))
        import dcgen._C as ext
        print(ext.__file__)
        """
    )
    try:
        done = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, timeout=CASE_TIMEOUT_S
        )
    except subprocess.TimeoutExpired:
        return "libstdc++ mapped: (timed out)"
    lines = done.stdout.splitlines()
    out = [f"libstdc++ mapped: {lines[0] if lines else done.stderr[-300:]}"]
    if len(lines) > 1:
        ldd = subprocess.run(["ldd", lines[1]], capture_output=True, text=True).stdout
        out.append(
            "extension links: " + "; ".join(x.strip() for x in ldd.splitlines() if "c++" in x)
        )
    return "\n".join(out)


def main() -> int:
    import torch

    if not torch.cuda.is_available():
        print("throw_probe: no CUDA device; only the library facts")
        print(libstdcxx())
        return 0
    print("| case | compiled by | message formats | rc | error |")
    print("|---|---|---|---|---|")
    crashed = 0
    for name, compiler, formats, code in CASES:
        rc, err = run_case(code)
        crashed += rc not in (0, 1)
        print(f"| {name} | {compiler} | {formats} | {rc} | {err.replace('|', '/')} |")
    print(libstdcxx())
    return 1 if crashed else 0


if __name__ == "__main__":
    sys.exit(main())
