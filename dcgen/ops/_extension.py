"""Loading dcgen._C and asking which compiled kernels exist.

Every op in dcgen.ops follows one pattern: a public Python function validates its inputs, then
calls the compiled op ``torch.ops.dcgen.<name>`` when the extension is built and has a kernel
for the tensors' device, and the pure-PyTorch reference otherwise. The reference is the spec.
"""

from __future__ import annotations

import functools
import logging
import os
from typing import Any

import torch

from .._env import env_choice, env_flag

logger = logging.getLogger(__name__)

_C: Any = None
_load_error: str | None = None
try:
    from dcgen import _C  # type: ignore[attr-defined,no-redef]  # registers torch.ops.dcgen.*
except ImportError as err:  # not built, or built against another torch
    _load_error = str(err)
    logger.debug("dcgen._C not available, using PyTorch references: %s", err)


def extension_loaded() -> bool:
    """True when dcgen._C was imported (its ops are registered with torch.ops.dcgen)."""
    return _C is not None


def extension_error() -> str | None:
    """Why dcgen._C could not be imported, or None."""
    return _load_error


# os.environ's own mapping (POSIX: bytes keys and values). os.environ.get goes through
# Mapping.get, __getitem__ and the key's encoding, about 0.7 us a read on this project's CPU;
# has_kernel reads DCGEN_DISABLE_KERNELS on every op call of an eager step.
_ENVIRON_DATA = getattr(os.environ, "_data", None) if os.name == "posix" else None
if not isinstance(_ENVIRON_DATA, dict):
    _ENVIRON_DATA = None


@functools.cache
def _encoded(names: tuple[str, ...]) -> tuple[bytes, ...]:
    return tuple(os.fsencode(name) for name in names)


def environment(names: tuple[str, ...]) -> tuple:
    """The values of the environment variables ``names`` (None where unset), for equality
    tests only: raw bytes where os.environ keeps them so, str elsewhere. Not for code that
    torch.compile traces (it knows os.environ, not its private mapping)."""
    if _ENVIRON_DATA is not None:
        return tuple(map(_ENVIRON_DATA.get, _encoded(names)))
    return tuple(map(os.environ.get, names))


def _disabled() -> bool:
    # DCGEN_DISABLE_KERNELS=1 forces every op onto its reference (debugging, A/B checks).
    # The usual values answered from the raw mapping (called on every op); the rest parsed.
    if _ENVIRON_DATA is not None and not torch.compiler.is_compiling():
        raw = _ENVIRON_DATA.get(b"DCGEN_DISABLE_KERNELS")
        if raw is None or raw == b"0":
            return False
        if raw == b"1":
            return True
    return env_flag("DCGEN_DISABLE_KERNELS", False)


def _registered_kernels() -> frozenset[tuple[str, str]]:
    """(op name, dispatch key) for every kernel dcgen._C registered. Read once at import, so
    has_kernel() is a plain set lookup that torch.compile traces without a graph break."""
    if _C is None:
        return frozenset()
    found = set()
    for qualname in torch._C._dispatch_get_all_op_names():
        if qualname.startswith("dcgen::"):
            for key in ("CPU", "CUDA"):
                if torch._C._dispatch_has_kernel_for_dispatch_key(qualname, key):
                    found.add((qualname.split("::", 1)[1], key))
    return frozenset(found)


_KERNELS = _registered_kernels()


_DISPATCH_KEYS = {"cpu": "CPU", "cuda": "CUDA"}


def has_kernel(name: str, device: torch.device | str) -> bool:
    """True when the compiled op ``dcgen::name`` has a kernel for this device type. Called by
    every op on every call: a torch.device is read as is (building a new one from it cost
    more than the rest of the check)."""
    if _C is None or _disabled():
        return False
    dev_type = device.type if isinstance(device, torch.device) else torch.device(device).type
    return (name, _DISPATCH_KEYS.get(dev_type)) in _KERNELS


COMPILE_OPS_ENV = "DCGEN_COMPILE_OPS"
COMPILE_OPS = ("inductor", "kernels")


@torch.compiler.assume_constant_result  # a process setting: a constant to torch.compile
def _compile_ops_choice() -> str:
    return env_choice(COMPILE_OPS_ENV, COMPILE_OPS, "inductor")


def inductor_fuses_instead() -> bool:
    """True while torch.compile traces and ``DCGEN_COMPILE_OPS`` is "inductor" (the default).

    Ops whose reference is elementwise work or a row reduction (the FP8 activation quantize, the
    FP8 scale epilogue) then trace their reference instead of the compiled kernel: an opaque
    custom op would cut Inductor's fusion, while the reference fuses into the neighbouring
    norm, modulation and residual code. ``DCGEN_COMPILE_OPS=kernels`` keeps the kernels."""
    return torch.compiler.is_compiling() and _compile_ops_choice() == "inductor"


def has_schema(name: str) -> bool:
    """True when dcgen._C is loaded and registered the op ``dcgen::name`` (an older build may
    lack it): the condition for registering the op's fake (meta) implementation."""
    if _C is None:
        return False
    try:
        getattr(torch.ops.dcgen, name)
    except (AttributeError, RuntimeError):
        return False
    return True


def compiled_op(name: str) -> Any:
    """The OpOverloadPacket torch.ops.dcgen.<name> (only call after has_kernel)."""
    return getattr(torch.ops.dcgen, name)
