"""The loops of compiled CUDA kernels, read from their SASS: size and instruction mix, no GPU.

For kernels whose speed is set by how many instructions a loop iteration issues (a mainloop
that converts its operands, a softmax between two GEMMs), the loop's SASS says before any GPU
run whether a change made the iteration shorter. A loop here is a backward branch: the
instructions from its target up to the branch. Each kernel's innermost-first loops are listed
with their length and the instruction counts by opcode (modifiers dropped: HGMMA.64x128x16 ...
counts as HGMMA), e.g.

    python benchmarks/sass_loops.py build/cmake/CMakeFiles/_C.dir/csrc/nvfp4/nvfp4_gemm_sm90.cu.o
    python benchmarks/sass_loops.py OBJ --kernel tma --top 12

``cuobjdump`` comes from CUDA_HOME/bin or, as on this project's CPU machines, from the copy
that the triton package ships. Counts are static: a branch inside a loop body (a masked tile,
say) is counted whether or not it is taken.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

_FUNCTION = re.compile(r"^\s*Function : (\S+)")
_INSTR = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P[0-9T]\s+)?([A-Z][A-Z0-9_.]*)([^;]*);")
_BRANCH_TARGET = re.compile(r"\b0x([0-9a-f]+)")


@dataclass
class Loop:
    start: int  # byte address of the loop's first instruction (the branch target)
    end: int  # byte address of the backward branch
    ops: Counter = field(default_factory=Counter)

    @property
    def instructions(self) -> int:
        return sum(self.ops.values())


@dataclass
class Kernel:
    name: str
    instructions: list[tuple[int, str, str]] = field(default_factory=list)  # (addr, op, rest)

    def loops(self) -> list[Loop]:
        found = []
        for addr, op, rest in self.instructions:
            if not op.startswith("BRA") or "BRA.U.ANY" in op:
                continue  # BRA.U.ANY: the spin of a warp-synchronous primitive, not a loop
            m = _BRANCH_TARGET.search(rest)
            if m is None:
                continue
            target = int(m.group(1), 16)
            if target < addr:
                loop = Loop(target, addr)
                for a, o, _ in self.instructions:
                    if target <= a <= addr:
                        loop.ops[o.split(".")[0]] += 1
                found.append(loop)
        return sorted(found, key=lambda lp: lp.end - lp.start)


def find_cuobjdump() -> str:
    """cuobjdump from CUDA_HOME/bin, PATH, or the triton package's copy; FileNotFoundError
    naming the places looked at when there is none."""
    looked = []
    cuda_home = os.environ.get("CUDA_HOME", "/usr/local/cuda")
    candidates = [str(Path(cuda_home) / "bin" / "cuobjdump"), shutil.which("cuobjdump")]
    try:
        import triton

        candidates.append(str(Path(triton.__file__).parent / "backends/nvidia/bin/cuobjdump"))
    except ImportError:
        pass
    for c in candidates:
        if c and Path(c).is_file() and os.access(c, os.X_OK):
            return c
        looked.append(str(c))
    raise FileNotFoundError(f"sass_loops: no cuobjdump found (looked at {looked})")


def parse_sass(text: str) -> list[Kernel]:
    kernels: list[Kernel] = []
    for line in text.splitlines():
        m = _FUNCTION.match(line)
        if m:
            kernels.append(Kernel(m.group(1)))
            continue
        m = _INSTR.search(line)
        if m and kernels:
            kernels[-1].instructions.append((int(m.group(1), 16), m.group(2), m.group(3)))
    return kernels


def read_kernels(obj: str | Path) -> list[Kernel]:
    """The kernels of a CUDA object file (or cubin) with their SASS."""
    path = Path(obj)
    if not path.is_file():
        raise FileNotFoundError(f"sass_loops: expected a CUDA object file, got {str(obj)!r}")
    out = subprocess.run(
        [find_cuobjdump(), "-sass", str(path)], capture_output=True, text=True, check=False
    )
    if out.returncode != 0:
        raise RuntimeError(f"sass_loops: cuobjdump failed on {path}: {out.stderr.strip()[:500]}")
    return parse_sass(out.stdout)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("objects", nargs="+", help="CUDA object files (.cu.o) or cubins")
    ap.add_argument("--kernel", default="", help="only kernels whose mangled name contains this")
    ap.add_argument("--top", type=int, default=8, help="opcodes listed per loop")
    args = ap.parse_args()
    for obj in args.objects:
        for k in read_kernels(obj):
            if args.kernel not in k.name:
                continue
            print(f"{k.name[:140]}: {len(k.instructions)} instructions")
            for lp in k.loops():
                mix = ", ".join(f"{op} {n}" for op, n in lp.ops.most_common(args.top))
                print(f"  loop 0x{lp.start:x}-0x{lp.end:x}: {lp.instructions} ({mix})")


if __name__ == "__main__":
    main()
