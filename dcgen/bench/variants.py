"""What a ``dcgen bench`` row runs under: its variant (stock diffusers, dcgen's kernels, CUDA
graphs), its SDPA backend, and the label of what its softmax attention actually ran on."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn


@contextlib.contextmanager
def build_context(device: torch.device, dtype: torch.dtype) -> Iterator[None]:
    """Parameters are created on ``device`` in ``dtype`` directly (no fp32 CPU init + copy)."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            yield
    finally:
        torch.set_default_dtype(old)


@contextlib.contextmanager
def kernels_enabled(enabled: bool) -> Iterator[None]:
    """DCGEN_DISABLE_KERNELS=1 while ``enabled`` is False (dcgen ops fall back to references),
    unset while it is True: a value inherited from the shell made the kernels rows time the
    references."""
    old = os.environ.get("DCGEN_DISABLE_KERNELS")
    if enabled:
        os.environ.pop("DCGEN_DISABLE_KERNELS", None)
    else:
        os.environ["DCGEN_DISABLE_KERNELS"] = "1"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("DCGEN_DISABLE_KERNELS", None)
        else:
            os.environ["DCGEN_DISABLE_KERNELS"] = old


def attention_backend(name: str) -> contextlib.AbstractContextManager:
    """torch SDPA backend selection (diffusers' default attention goes through SDPA), for the
    denoising loop only: the autoencoders decode with torch's own choice. (The FLUX VAE's
    mid-block attention has one 512-wide head, which the flash backend rejects: measured on
    the H200, "No available kernel" ended the first FLUX table when the choice also covered
    the decode.)"""
    if name == "default":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = {
        "flash": SDPBackend.FLASH_ATTENTION,
        "efficient": SDPBackend.EFFICIENT_ATTENTION,
        "cudnn": SDPBackend.CUDNN_ATTENTION,
        "math": SDPBackend.MATH,
    }[name]
    return sdpa_kernel(backend)


_SDPA_NAMES = {0: "math", 1: "flash", 2: "efficient", 3: "cudnn", 4: "overrideable"}


class SdpaChoices(torch.overrides.TorchFunctionMode):
    """Records which SDPA backend torch picks for each ``scaled_dot_product_attention`` call
    inside it (torch's own dispatch rule, ``torch._fused_sdp_choice``, asked with the call's
    arguments under the backend flags in force), for a row's report: "default" means
    different kernels on different inputs (the H200's 1K DC-Gen rows ran 1.87 s with the
    default against 1.26 s with the flash backend forced, unexplained), so the JSON says which
    one ran. Host-side only; used on the first warm-up call of a measurement."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: set[str] = set()

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        kwargs = kwargs or {}
        if func is torch.nn.functional.scaled_dot_product_attention:
            self.seen.add(_sdpa_choice(*args, **kwargs))
        return func(*args, **kwargs)


_SDPA_ARGS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal")


def _sdpa_choice(*args: Any, **kwargs: Any) -> str:
    """The backend torch's SDPA dispatch picks for these call arguments (positional or by
    name, as diffusers passes them); "unknown" if the private query fails (it never stops the
    measured call)."""
    try:
        named = dict(zip(_SDPA_ARGS, args, strict=False)) | kwargs
        q, k, v = named.pop("query"), named.pop("key"), named.pop("value")
        choice = torch._fused_sdp_choice(
            q, k, v, named.get("attn_mask"), named.get("dropout_p", 0.0),
            named.get("is_causal", False), scale=named.get("scale"),
            enable_gqa=named.get("enable_gqa", False),
        )  # fmt: skip
    except Exception:  # noqa: BLE001 (a private API: absent, changed, or rejecting the args)
        return "unknown"
    return _SDPA_NAMES.get(int(choice), f"backend {int(choice)}")


def uses_kernels(variant: str) -> bool:
    """Whether ``variant`` runs dcgen's kernels and fused processors (every variant but stock)."""
    return variant != "stock"


@contextlib.contextmanager
def graphed_blocks(transformer: nn.Module, variant: str) -> Iterator[None]:
    """The scope of a ``graphs`` measurement: the graphed blocks that ``SpeedBench._contexts``
    installs on each call (captured on first use) stay across every call inside it, and go on
    exit with the rest of ``dcgen.accelerate`` (stock again). Other variants: nothing (their
    processors are set and removed per call by :func:`attention_processors`)."""
    if variant != "graphs":
        yield
        return
    from .. import unaccelerate

    try:
        yield
    finally:
        unaccelerate(transformer)


@contextlib.contextmanager
def attention_processors(transformer: nn.Module, fused: bool) -> Iterator[None]:
    """dcgen's fused attention processors and fused FLUX block glue installed while ``fused``
    (``dcgen.accelerate(blocks=True)``), diffusers' stock ones otherwise; stock again on exit."""
    from .. import accelerate, unaccelerate
    from ..attention import cuda_graphs

    if fused:
        cuda_graphs.uninstall(transformer)  # a graphs variant's blocks must not leak into this one
        accelerate(transformer, blocks=True)
    else:
        unaccelerate(transformer)
    try:
        yield
    finally:
        unaccelerate(transformer)


def _head_dim(module: nn.Module) -> int | None:
    d = getattr(module, "head_dim", None)
    if d is None and getattr(module, "heads", None):
        d = getattr(module, "inner_dim", 0) // module.heads
    return d


def attention_label(
    transformer: nn.Module, backend: str, fused: bool, device: torch.device, dtype: torch.dtype
) -> str:
    """What the transformer's softmax attention runs on (SANA's linear self-attention is not
    softmax attention and is not counted): ``sdpa-<backend>``, ``dcgen-flash`` (dcgen's fused
    flash kernel on every attention module, DCGEN_ATTENTION_KERNEL=flash), ``dcgen
    qk_norm_rope + sdpa-<backend>`` (the default fused path), a mix, or the fallback."""
    from ..attention.install import _ORIGINAL
    from ..ops._extension import has_kernel
    from ..ops.attention import KERNEL_DTYPES, KERNEL_HEAD_DIMS, _arch_ok, flash_kernel_selected

    sdpa = f"sdpa-{backend}"
    if not fused:
        return sdpa
    modules = [m for m in transformer.modules() if _ORIGINAL in m.__dict__]
    if not modules:
        return sdpa
    kernel = (
        has_kernel("fused_attention", device)
        and dtype in KERNEL_DTYPES
        and _arch_ok(device.type, device.index)
    )
    if kernel and not flash_kernel_selected():  # the default: qk_norm_rope kernel + SDPA
        return f"dcgen qk_norm_rope + {sdpa}"
    n_flash = sum(1 for m in modules if kernel and _head_dim(m) in KERNEL_HEAD_DIMS)
    if n_flash == len(modules):
        return "dcgen-flash"
    fallback = sdpa if device.type == "cuda" and dtype in KERNEL_DTYPES else "fp32 reference"
    if n_flash == 0:
        return f"dcgen-fused -> {fallback}"
    return f"dcgen-flash ({n_flash}/{len(modules)}) + {fallback}"
