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


__all__ = ["__version__", "build_info"]
