"""Build helper for CMakeLists.txt: keep a private copy of libstdc++ out of dcgen._C.

    python cmake/libstdcxx.py find               # the libstdc++ the running torch maps (Linux)
    python cmake/libstdcxx.py check LIB [NM]     # exit 1 if LIB carries libstdc++'s stream code
    python cmake/libstdcxx.py check --remove LIB [NM]   # ... and delete it (the build's check:
                                                 # no broken _C is left for dcgen to load)

Why: a toolchain whose g++ links libstdc++ statically (the GPU machine's GCC 13.3 in /opt/gcc,
H100 and H200 runs of 2026-11-27) put a second copy of the iostream and locale code into _C.
TORCH_CHECK builds its message with a std::ostringstream; formatting an integer in that copy
looks up the num_put facet with the copy's own facet ids in a locale the process's libstdc++
built, and the process died (SIGSEGV in std::ostream::_M_insert<long> inside _C) where a bad
input should have raised. Checks whose messages hold only strings raised cleanly.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

# Symbols only a linked-in libstdc++ defines (explicit instantiations and locale internals that
# headers never emit inline): the long formatter TORCH_CHECK calls, the classic locale and the
# iostream initializer.
MARKERS = ("_ZNSo9_M_insertIlEERSoT_", "_ZNSt6locale7classicEv", "_ZNSt8ios_base4InitC1Ev")


def mapped_libstdcxx() -> str | None:
    """The libstdc++ shared library this process runs with after importing torch."""
    import torch  # noqa: F401  (maps the libstdc++ torch was built to run with)

    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                path = line.split()[-1]
                if "/libstdc++.so" in path:
                    return path
    except OSError:
        pass
    return None


def private_copies(lib: str, nm: str | None = None) -> list[str]:
    """The MARKERS that ``lib`` defines (its symbol table and its dynamic one)."""
    nm = nm or shutil.which("nm")
    if nm is None:
        raise FileNotFoundError("nm (binutils) not found")
    found: set[str] = set()
    for extra in ([], ["-D"]):
        out = subprocess.run(
            [nm, "--defined-only", *extra, lib], capture_output=True, text=True
        ).stdout
        found.update(s for s in out.split() if s in MARKERS)
    return sorted(found)


def main(argv: list[str]) -> int:
    if argv[:1] == ["find"]:
        print(mapped_libstdcxx() or "")
        return 0
    remove = argv[1:2] == ["--remove"]
    args = argv[2:] if remove else argv[1:]
    if argv[:1] == ["check"] and len(args) in (1, 2):
        lib = args[0]
        nm = args[1] if len(args) == 2 and args[1] else None
        try:
            found = private_copies(lib, nm)
        except FileNotFoundError as err:
            print(f"dcgen: libstdc++ check skipped: {err}")
            return 0
        if found:
            print(
                f"dcgen: {lib} defines libstdc++'s own symbols {found}: it was linked "
                "with a private static libstdc++, whose integer formatting crashes torch's "
                "error messages. Link the shared libstdc++ (cmake/DcgenLibstdcxx.cmake)"
                + ("; removed it." if remove else "."),
                file=sys.stderr,
            )
            if remove:
                os.remove(lib)
            return 1
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
