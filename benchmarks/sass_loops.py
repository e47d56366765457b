"""The loops of compiled CUDA kernels, read from their SASS: size and instruction mix, no GPU.

For kernels whose speed is set by how many instructions a loop iteration issues (a mainloop
that converts its operands, a softmax between two GEMMs), the loop's SASS says before any GPU
run whether a change made the iteration shorter. A loop here is a backward branch: the
instructions from its target up to the branch. Each kernel's innermost-first loops are listed
with their length and the instruction counts by opcode (modifiers dropped: HGMMA.64x128x16 ...
counts as HGMMA), e.g.

    python benchmarks/sass_loops.py build/cmake/CMakeFiles/_C.dir/csrc/nvfp4/nvfp4_gemm_sm90.cu.o
    python benchmarks/sass_loops.py OBJ --kernel tma --top 12

Kernels with wgmma also get a check of their register discipline (wgmma_register_hazards).

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


# wgmma (HGMMA in SASS) reads its register A operand and its accumulators asynchronously: until
# a WARPGROUP.DEPBAR retires its group, no other instruction may write them. ptxas keeps this
# for what PTX declares, but a kernel that double-buffers register fragments relies on the
# compiler's register assignment too, so this reads the final SASS.
_HGMMA_SHAPE = re.compile(r"HGMMA\.64x(\d+)x")
_REG = re.compile(r"^R(\d+)$")
# Opcodes whose first operand is not a destination register.
_NO_DEST = ("ST", "RED", "ATOM", "BRA", "BAR", "SYNCS", "WARPGROUP", "EXIT", "RET", "CALL",
            "NOP", "ISETP", "FSETP", "HSETP", "DSETP", "UISETP", "PLOP3", "PSETP", "VOTEU",
            "ELECT", "FENCE", "MEMBAR", "ERRBAR", "CCTL", "DEPBAR", "BSSY", "BSYNC", "WARPSYNC",
            "NANOSLEEP", "UTMA", "UBLKCP", "STSM")  # fmt: skip


def _dest_registers(op: str, rest: str) -> set[int]:
    if op.startswith(_NO_DEST) or op.startswith("HGMMA"):
        return set()
    first = rest.strip().split(",")[0].strip()
    m = _REG.match(first)
    if m is None:
        return set()
    width = 4 if ".128" in op else (2 if ".64" in op or op.startswith("CS2R") else 1)
    return set(range(int(m.group(1)), int(m.group(1)) + width))


def _hgmma_registers(op: str, rest: str) -> set[int]:
    """The registers an HGMMA reads or accumulates asynchronously: its fp32 accumulators (N / 2
    for 64 x N) and, for a register A operand, the 4 registers of A."""
    # The instruction pattern stops the opcode at the shape's lowercase "x" (HGMMA.64 +
    # "x256x16.F32.BF16 R24, ..."): split the whole text at its first space instead.
    mnemonic, _, args = (op + rest).strip().partition(" ")
    operands = [o.strip() for o in args.split(",")]
    regs: set[int] = set()
    shape = _HGMMA_SHAPE.match(mnemonic)
    acc = _REG.match(operands[0]) if operands else None
    if shape and acc:
        regs |= set(range(int(acc.group(1)), int(acc.group(1)) + int(shape.group(1)) // 2))
    a = _REG.match(operands[1]) if len(operands) > 1 else None
    if a:
        regs |= set(range(int(a.group(1)), int(a.group(1)) + 4))
    return regs


def wgmma_register_hazards(kernel: Kernel) -> list[str]:
    """Writes to a register that an in-flight HGMMA group reads (its A fragment) or accumulates
    into, as "0xADDR: instruction" lines (empty: none found). A group closes at the HGMMA
    marked gsb0; WARPGROUP.DEPBAR.LE gsb0, N leaves only the N newest groups in flight. The
    kernel is scanned straight through, and each loop body twice in a row, so a write at the
    top of an iteration also meets the groups the previous iteration left in flight."""
    seqs = [kernel.instructions]
    for lp in kernel.loops():
        body = [i for i in kernel.instructions if lp.start <= i[0] <= lp.end]
        seqs.append(body + body)
    found: list[str] = []
    for seq in seqs:
        groups: list[set[int]] = []  # closed groups in flight, oldest first
        open_group: set[int] = set()
        for addr, op, rest in seq:
            if op.startswith("HGMMA"):
                open_group |= _hgmma_registers(op, rest)
                if "gsb0" in rest:
                    groups.append(open_group)
                    open_group = set()
                continue
            if op.startswith("WARPGROUP.DEPBAR"):
                keep = int(rest.split(",")[-1].strip(), 0)
                groups = groups[len(groups) - keep :] if keep else []
                continue
            busy = set().union(open_group, *groups)
            hit = _dest_registers(op, rest) & busy
            if hit:
                line = f"0x{addr:x}: {op}{rest}"
                if line not in found:
                    found.append(line)
    return found


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
            if any(op.startswith("HGMMA") for _, op, _ in k.instructions):
                hazards = wgmma_register_hazards(k)
                print(f"  wgmma register hazards: {len(hazards) or 'none'}")
                for h in hazards[:8]:
                    print(f"    {h}")


if __name__ == "__main__":
    main()
