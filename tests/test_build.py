"""dcgen._C build facts, and the promise that dcgen works without the extension."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import dcgen
from dcgen.ops import has_kernel


def test_build_info_matches_registered_kernels():
    info = dcgen.build_info()
    if not info["extension"]:
        pytest.skip(f"dcgen._C not built: {info['error']}")
    assert info["torch_version"].split("+")[0] == torch.__version__.split("+")[0], (
        "dcgen._C was built against another torch; rebuild it"
    )
    for entry in info["kernels"]:
        name, device = entry.split(":")
        assert has_kernel(name, device), f"build_info lists {entry} but no kernel is registered"
    if info["cuda"]:
        assert info["cuda_archs"], "a CUDA build must report its archs"
        assert any(k.endswith(":cuda") for k in info["kernels"])


def test_without_extension_every_op_falls_back_to_reference():
    # Blocking the import reproduces a machine where the extension was not built.
    code = """
import sys, json
sys.modules["dcgen._C"] = None
import torch, dcgen
from dcgen.ops import channel_rms_norm, channel_rms_norm_reference, has_kernel
x = torch.randn(2, 8, 4, 4); w = torch.randn(8); b = torch.randn(8)
assert not has_kernel("channel_rms_norm", "cpu")
assert torch.equal(channel_rms_norm(x, w, b), channel_rms_norm_reference(x, w, b))
print(json.dumps(dcgen.build_info()))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    info = json.loads(out.stdout.strip().splitlines()[-1])
    assert info["extension"] is False and info["error"]


# ----------------------------------------------------------------- libstdc++ linking

ROOT = Path(__file__).resolve().parents[1]
LIBSTDCXX_PY = ROOT / "cmake" / "libstdcxx.py"


def _libstdcxx_helper(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(LIBSTDCXX_PY), *args], capture_output=True, text=True
    )


def _extension_path() -> str:
    try:
        import dcgen._C as ext
    except ImportError as err:
        pytest.skip(f"dcgen._C not built: {err}")
    return ext.__file__


@pytest.mark.skipif(shutil.which("nm") is None, reason="no nm (binutils)")
def test_extension_carries_no_private_libstdcxx():
    # A private static libstdc++ inside _C turned every check that formats a number into a
    # crash on the GPU machine (cmake/libstdcxx.py): the build links the shared one.
    res = _libstdcxx_helper("check", _extension_path())
    assert res.returncode == 0, res.stderr


def test_check_message_formats_numbers():
    # What broke with a private libstdc++: the message stopped (or the process died) at the
    # first number. Here a C++-compiled CPU check must carry its numbers and sizes whole.
    _extension_path()
    if not has_kernel("channel_rms_norm", "cpu"):
        pytest.skip("no C++ channel_rms_norm kernel")
    x = torch.randn(2, 8, 4, 4)
    with pytest.raises(RuntimeError, match=r"expected weight of shape \(8\), got \[7\]"):
        torch.ops.dcgen.channel_rms_norm(x, torch.ones(7), torch.ones(8), 1e-5)


@pytest.mark.skipif(
    shutil.which("nm") is None or shutil.which("g++") is None, reason="no g++ or nm"
)
def test_libstdcxx_check_and_link_recipe(tmp_path):
    # A library linked with -static-libstdc++ (what the GPU machine's g++ did by default) is
    # flagged and, with --remove, deleted; naming the shared libstdc++ torch maps ahead of the
    # driver's own -lstdc++ (cmake/DcgenLibstdcxx.cmake's recipe) keeps the copy out.
    found = _libstdcxx_helper("find")
    assert found.returncode == 0, found.stderr
    shared = found.stdout.strip()
    if not shared:
        pytest.skip("this process maps no libstdc++.so")
    src = tmp_path / "fmt.cpp"
    src.write_text(
        "#include <sstream>\n#include <string>\n"
        "std::string dcgen_fmt(long n) { std::ostringstream s; s << n; return s.str(); }\n"
    )

    def link(name: str, *libs: str) -> Path:
        # CMake's order: objects, then the target's libraries, then the driver's own -lstdc++
        out = tmp_path / name
        cmd = ["g++", "-shared", "-fPIC", "-O1", str(src), *libs, "-static-libstdc++"]
        subprocess.run([*cmd, "-o", str(out)], check=True, capture_output=True)
        return out

    static = link("static.so")
    res = _libstdcxx_helper("check", str(static))
    assert res.returncode == 1 and "_ZNSo9_M_insertIlEERSoT_" in res.stderr, res.stderr
    fixed = link("fixed.so", shared)
    res = _libstdcxx_helper("check", str(fixed))
    assert res.returncode == 0, res.stderr
    res = _libstdcxx_helper("check", "--remove", str(static))
    assert res.returncode == 1 and not static.exists()


ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(not (ROOT / ".git").exists(), reason="needs the git checkout (file list)")
def test_the_source_distribution_can_build_the_extension(tmp_path):
    """The sdist carries every tracked CMake / C++ / CUDA file and the examples the CLI points
    to, and no build output (it held only the Python package before: `pip install` of it
    installed without the extension, saying nothing)."""
    import tarfile

    run = subprocess.run(
        [sys.executable, "setup.py", "-q", "egg_info", "--egg-base", str(tmp_path),
         "sdist", "--dist-dir", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    (sdist,) = tmp_path.glob("dcgen-*.tar.gz")
    with tarfile.open(sdist) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    tracked = subprocess.run(
        ["git", "ls-files", "CMakeLists.txt", "cmake", "csrc", "examples", "dcgen/assets"],
        cwd=ROOT, capture_output=True, text=True, check=True,
    ).stdout.split()  # fmt: skip
    assert tracked and not sorted(set(tracked) - names)
    assert "dcgen/py.typed" in names
    assert not [n for n in names if n.endswith(".so") or n.startswith("build/")]


def _setup_py():  # noqa: ANN202
    """setup.py as a module, its setup() call stubbed out."""
    import importlib.util
    from unittest import mock

    import setuptools

    with mock.patch.object(setuptools, "setup", lambda **kw: None):
        spec = importlib.util.spec_from_file_location("dcgen_setup_py", ROOT / "setup.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    return module


SWITCHES = ("DCGEN_CUDA", "DCGEN_BLACKWELL", "DCGEN_BUILD_DIR", "DCGEN_CUDA_ARCHS",
            "DCGEN_REQUIRE_EXTENSION")  # fmt: skip


def _configure_args(monkeypatch, tmp_path, **env: str) -> list[str]:  # noqa: ANN001
    """The cmake configure command setup.py runs under ``env``, with a CUDA toolkit present
    and nothing run."""
    import types

    pytest.importorskip("pybind11")
    setup_py = _setup_py()
    for name in SWITCHES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("DCGEN_BUILD_DIR", str(tmp_path / "build"))
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    (tmp_path / "cuda" / "bin").mkdir(parents=True, exist_ok=True)
    (tmp_path / "cuda" / "bin" / "nvcc").touch()
    monkeypatch.setattr(setup_py, "_cuda_home", lambda: str(tmp_path / "cuda"))
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    calls: list[list[str]] = []
    monkeypatch.setattr(setup_py.subprocess, "run", lambda cmd, **kw: calls.append(cmd))
    build = setup_py.CMakeBuild.__new__(setup_py.CMakeBuild)
    build.get_ext_fullpath = lambda name: str(tmp_path / "out" / "dcgen" / "_C.so")
    build._build(types.SimpleNamespace(name="dcgen._C"))
    return calls[0]


@pytest.mark.parametrize(
    ("value", "cuda"),
    [("no", "OFF"), ("OFF", "OFF"), (" 0", "OFF"), ("yes", "ON"), ("auto", "ON"), ("", "ON")],
)
def test_the_cuda_switch_takes_every_spelling_of_on_and_off(monkeypatch, tmp_path, value, cuda):
    # DCGEN_CUDA=no meant auto: a CUDA build
    args = _configure_args(monkeypatch, tmp_path, DCGEN_CUDA=value)
    assert f"-DDCGEN_WITH_CUDA={cuda}" in args


@pytest.mark.parametrize("name", ["DCGEN_CUDA", "DCGEN_BLACKWELL"])
def test_a_build_switch_refuses_a_value_it_does_not_know(monkeypatch, tmp_path, name):
    with pytest.raises(ValueError, match=rf"{name}: expected .*got 'cpu'"):
        _configure_args(monkeypatch, tmp_path, **{name: "cpu"})


def test_blackwell_no_and_the_arch_list_reset(monkeypatch, tmp_path):
    assert "-DDCGEN_BLACKWELL=OFF" in _configure_args(monkeypatch, tmp_path, DCGEN_BLACKWELL="no")
    # The arch list is a CMake cache variable of the persistent build folder: unset, it must
    # be cleared, or an earlier DCGEN_CUDA_ARCHS=90 build left every later one sm_90 only.
    assert "-UDCGEN_CUDA_ARCHS" in _configure_args(monkeypatch, tmp_path)
    assert "-DDCGEN_CUDA_ARCHS=90" in _configure_args(monkeypatch, tmp_path, DCGEN_CUDA_ARCHS="90")


def test_an_empty_build_dir_is_the_default_not_the_working_directory(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    args = _configure_args(monkeypatch, tmp_path, DCGEN_BUILD_DIR="")
    assert args[args.index("-B") + 1] == str(ROOT / "build" / "cmake")


@pytest.mark.parametrize("value", ["true", "yes", "ON"])
def test_require_extension_takes_every_spelling_of_on(monkeypatch, value):
    # Only "1" counted: DCGEN_REQUIRE_EXTENSION=true let a failed build install without _C.
    import types

    setup_py = _setup_py()
    monkeypatch.setenv("DCGEN_REQUIRE_EXTENSION", value)
    build = setup_py.CMakeBuild.__new__(setup_py.CMakeBuild)

    def failed(ext):  # noqa: ANN001, ANN202
        raise OSError("cmake failed")

    build._build = failed
    build._without_extension = lambda ext, why: pytest.fail(f"{value!r}: the failure passed")
    with pytest.raises(OSError, match="cmake failed"):
        build.build_extension(types.SimpleNamespace(name="dcgen._C"))
