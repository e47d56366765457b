"""Build dcgen._C with CMake.

The extension is compiled against the torch of the current environment, so install with
``pip install --no-build-isolation .`` (or ``-e .``). Environment switches:

- ``DCGEN_CUDA``: ``auto`` (default: build CUDA sources when nvcc and a CUDA torch are present),
  ``1`` (require them), ``0`` (C++ CPU ops only).
- ``DCGEN_REQUIRE_EXTENSION=1``: fail the install if the extension does not build (CI sets it).
  By default a failed build is reported and dcgen installs on its PyTorch references.
- ``DCGEN_CUDA_ARCHS``: override the generic kernels' arch list (e.g. ``"90"``); unset, the
  CMake default (``"80;90"``) applies again, whatever an earlier build in the folder was given.
- ``DCGEN_BLACKWELL=0``: leave out the sm_100a / sm_120a NVFP4 GEMMs (the slowest files), e.g.
  for a build that only ever runs on Hopper.
- ``MAX_JOBS``: parallel compile jobs (default: CPU count).
- ``DCGEN_BUILD_DIR``: persistent CMake build directory (default ``build/cmake``), so ccache and
  incremental builds survive reinstalls.

On / off switches take ``1 / on / true / yes`` and ``0 / off / false / no`` (any case); an
empty value is the default, anything else stops the install with the switch named.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


_ON, _OFF = ("1", "on", "true", "yes"), ("0", "off", "false", "no")


def _switch(name: str, default: str, extra: tuple[str, ...] = ()) -> str:
    """The environment switch ``name``: "on", "off" or one of ``extra``. A value it does not
    know is refused: DCGEN_CUDA=no used to mean auto (a CUDA build), DCGEN_REQUIRE_EXTENSION=true
    let a failed build pass."""
    raw = os.environ.get(name, "")
    value = (raw.strip() or default).lower()
    if value in _ON:
        return "on"
    if value in _OFF:
        return "off"
    if value in extra:
        return value
    raise ValueError(
        f"{name}: expected {' / '.join([*extra, '1', '0'])} (or on/off, true/false, yes/no), "
        f"got {raw!r}"
    )


def _extension_required() -> bool:
    return _switch("DCGEN_REQUIRE_EXTENSION", "0") == "on"


class CMakeExtension(Extension):
    def __init__(self, name: str) -> None:
        super().__init__(name, sources=[])


def _cmake_executable() -> str:
    # Prefer the PyPI cmake (4.x): Debian's 3.25 cannot set the CUDA C++20 dialect for nvcc 13.
    try:
        import cmake  # type: ignore

        exe = Path(cmake.CMAKE_BIN_DIR) / "cmake"
        if exe.exists():
            return str(exe)
    except ImportError:
        pass
    return shutil.which("cmake") or "cmake"


def _cuda_home() -> str | None:
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            return os.environ[var]
    if Path("/usr/local/cuda/bin/nvcc").exists():
        return "/usr/local/cuda"
    nvcc = shutil.which("nvcc")
    return str(Path(nvcc).resolve().parent.parent) if nvcc else None


def _cutlass_include() -> str:
    try:
        import cutlass_library  # type: ignore

        inc = Path(cutlass_library.__file__).parent / "source" / "include"
        return str(inc) if (inc / "cutlass").is_dir() else ""
    except ImportError:
        return ""


class CMakeBuild(build_ext):
    def build_extension(self, ext: Extension) -> None:
        try:
            self._build(ext)
        except ImportError as err:
            # torch or pybind11 missing where the build runs: pip's isolated build environment
            if _extension_required():
                raise ImportError(
                    f"dcgen._C: {err} in the build environment; install with "
                    "`pip install --no-build-isolation .` so the extension compiles against the "
                    "torch already installed"
                ) from err
            self._without_extension(ext, f"{err}; install with --no-build-isolation to build it")
        except (subprocess.CalledProcessError, OSError) as err:
            if _extension_required():
                raise
            self._without_extension(ext, str(err))

    def _without_extension(self, ext: Extension, why: str) -> None:
        # An extension left by an earlier build would otherwise be installed in its place.
        target = Path(self.get_ext_fullpath(ext.name))
        for old in target.parent.glob(target.name.split(".")[0] + ".*so"):
            old.unlink()
        print(
            f"WARNING: dcgen._C failed to build ({why}); dcgen installs without it and every "
            "op runs its PyTorch reference. Set DCGEN_REQUIRE_EXTENSION=1 to make this fatal.",
            file=sys.stderr,
        )

    def _build(self, ext: Extension) -> None:
        if not (ROOT / "CMakeLists.txt").is_file() or not (ROOT / "csrc").is_dir():
            raise OSError(
                f"the C++ sources (CMakeLists.txt, csrc/) are not in {ROOT}: build from a clone "
                "of the repository or a complete source distribution"
            )
        import pybind11
        import torch
        import torch.utils

        out_dir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        # empty is unset (Path("") is the working directory: an in-source build)
        build_dir = Path(os.environ.get("DCGEN_BUILD_DIR") or ROOT / "build" / "cmake").resolve()
        build_dir.mkdir(parents=True, exist_ok=True)

        want_cuda = _switch("DCGEN_CUDA", "auto", extra=("auto",))
        cuda_home = _cuda_home()
        have_cuda = (
            torch.version.cuda is not None
            and cuda_home is not None
            and Path(cuda_home, "bin", "nvcc").exists()
        )
        if want_cuda == "on" and not have_cuda:
            raise OSError(
                f"DCGEN_CUDA=1 but no usable CUDA: torch.version.cuda={torch.version.cuda}, "
                f"CUDA_HOME={cuda_home}"
            )
        use_cuda = have_cuda and want_cuda != "off"

        args = [
            f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path};{pybind11.get_cmake_dir()}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-DDCGEN_OUTPUT_DIR={out_dir}",
            f"-DDCGEN_WITH_CUDA={'ON' if use_cuda else 'OFF'}",
            f"-DDCGEN_CUTLASS_INCLUDE={_cutlass_include()}",
            "-DCMAKE_BUILD_TYPE=Release",
        ]
        if shutil.which("ninja"):
            args.append("-GNinja")
        if use_cuda:
            args += [
                f"-DCUDAToolkit_ROOT={cuda_home}",
                f"-DCUDA_TOOLKIT_ROOT_DIR={cuda_home}",
                f"-DCMAKE_CUDA_COMPILER={Path(cuda_home, 'bin', 'nvcc')}",
            ]
            blackwell = _switch("DCGEN_BLACKWELL", "1") == "on"
            args.append(f"-DDCGEN_BLACKWELL={'ON' if blackwell else 'OFF'}")
            # A CMake cache variable: unset, it is cleared, or the persistent build folder kept
            # an earlier build's list (DCGEN_CUDA_ARCHS=90 once, no sm_80 code ever after).
            archs = os.environ.get("DCGEN_CUDA_ARCHS", "").strip()
            args.append(f"-DDCGEN_CUDA_ARCHS={archs}" if archs else "-UDCGEN_CUDA_ARCHS")
        if shutil.which("ccache"):
            args.append("-DCMAKE_CXX_COMPILER_LAUNCHER=ccache")
            if use_cuda:
                args.append("-DCMAKE_CUDA_COMPILER_LAUNCHER=ccache")

        env = dict(os.environ)
        if use_cuda:
            env["CUDA_HOME"] = cuda_home  # torch's CMake config looks for the toolkit here
        cmake = _cmake_executable()
        jobs = os.environ.get("MAX_JOBS", str(os.cpu_count() or 1))
        subprocess.run([cmake, "-S", str(ROOT), "-B", str(build_dir), *args], check=True, env=env)
        subprocess.run([cmake, "--build", str(build_dir), "--parallel", jobs], check=True, env=env)


setup(ext_modules=[CMakeExtension("dcgen._C")], cmdclass={"build_ext": CMakeBuild})
