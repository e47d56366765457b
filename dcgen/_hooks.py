"""Whether someone is watching a module's forward: fast paths that skip a module's own call
(a fused epilogue) or overwrite its input (in-place bands) must not run under a hook, since the
hook would see other tensors than the module's plain forward gives it."""

from __future__ import annotations

from torch import nn
from torch.nn.modules import module as _module

#: attributes of accelerate's and diffusers' hooks, which wrap the forward itself (offloading
#: moves the weights onto the device inside it) instead of registering a torch hook
_WRAPPING_HOOKS = ("_hf_hook", "_diffusers_hook")


def has_forward_hooks(module: nn.Module) -> bool:
    """True when ``module`` or every module (global hooks) has a forward or forward-pre hook,
    or ``module``'s forward is wrapped (an accelerate / diffusers hook, or any forward set on
    the instance): a fast path that skips the module's call would skip that too."""
    return bool(
        module._forward_hooks
        or module._forward_pre_hooks
        or _module._global_forward_hooks
        or _module._global_forward_pre_hooks
        or "forward" in module.__dict__
        or any(hasattr(module, h) for h in _WRAPPING_HOOKS)
    )
