"""Whether someone is watching a module's forward: fast paths that skip a module's own call
(a fused epilogue) or overwrite its input (in-place bands) must not run under a hook, since the
hook would see other tensors than the module's plain forward gives it."""

from __future__ import annotations

from torch import nn
from torch.nn.modules import module as _module


def has_forward_hooks(module: nn.Module) -> bool:
    """True when ``module`` or every module (global hooks) has a forward or forward-pre hook."""
    return bool(
        module._forward_hooks
        or module._forward_pre_hooks
        or _module._global_forward_hooks
        or _module._global_forward_pre_hooks
    )
