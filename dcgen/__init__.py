"""dcgen: pretrained diffusion transformers in deep-compression latent spaces (DC-Gen)."""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"


def build_info() -> dict[str, Any]:
    """How dcgen._C was built: torch version it was compiled against, CUDA version and archs,
    and which kernels it contains. ``{"extension": False, "error": ...}`` when not built."""
    from dcgen.ops import _extension

    if not _extension.extension_loaded():
        return {"extension": False, "error": _extension.extension_error()}
    info = dict(_extension._C.build_info())
    info["extension"] = True
    info["kernels"] = [k for k in info.get("kernels", "").split(",") if k]
    info["cuda_archs"] = [a for a in info.get("cuda_archs", "").split(";") if a]
    return info


def __getattr__(name: str) -> Any:
    # dcgen.accelerate / dcgen.unaccelerate import torch and the attention processors on first
    # use, so `import dcgen` stays cheap for the CLI and build checks.
    if name in ("accelerate", "unaccelerate"):
        from dcgen import attention

        return getattr(attention, name)
    raise AttributeError(f"module 'dcgen' has no attribute {name!r}")


__all__ = ["__version__", "accelerate", "build_info", "unaccelerate"]
