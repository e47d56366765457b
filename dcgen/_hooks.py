"""Whether someone is watching a module's forward: fast paths that skip a module's own call
(a fused epilogue) or overwrite its input (in-place bands) must not run under a hook, since the
hook would see other tensors than the module's plain forward gives it."""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

from torch import nn
from torch.nn.modules import module as _module

#: attributes of accelerate's and diffusers' hooks, which wrap the forward itself (offloading
#: moves the weights onto the device inside it) instead of registering a torch hook. Neither
#: hook object is an nn.Module, so both land in the module's __dict__: looked up there, not
#: with hasattr (a miss goes through nn.Module.__getattr__ and an exception, microseconds on a
#: path called several times per block).
_WRAPPING_HOOKS = ("_hf_hook", "_diffusers_hook")


def offload_hooked(module: nn.Module) -> bool:
    """Whether accelerate or diffusers has wrapped ``module``'s forward with its hooks."""
    attrs = module.__dict__
    return _WRAPPING_HOOKS[0] in attrs or _WRAPPING_HOOKS[1] in attrs


def forward_wrapped(module: nn.Module) -> bool:
    """Whether something other than ``module``'s own forward hooks watches its call: global
    forward hooks, or its forward wrapped (an accelerate / diffusers hook, or any forward set
    on the instance)."""
    return bool(
        _module._global_forward_hooks
        or _module._global_forward_pre_hooks
        or "forward" in module.__dict__
        or offload_hooked(module)
    )


def has_forward_hooks(module: nn.Module) -> bool:
    """True when ``module`` or every module (global hooks) has a forward or forward-pre hook,
    or ``module``'s forward is wrapped (an accelerate / diffusers hook, or any forward set on
    the instance): a fast path that skips the module's call would skip that too."""
    return bool(module._forward_hooks or module._forward_pre_hooks or forward_wrapped(module))


def watched(module: nn.Module) -> bool:
    """Whether a hook on ``module`` or on a module inside it may hold on to a tensor of its
    call (its input, or an output that is ``module``'s own): such tensors must not be
    overwritten afterwards."""
    return any(has_forward_hooks(m) for m in module.modules())


def has_hook_callbacks(*modules: nn.Module) -> bool:
    """Whether a torch forward hook (global, or on any of ``modules`` or inside them) will be
    called: unlike :func:`watched`, forward wrappers (accelerate's and diffusers' offloading)
    do not count. Paths that only change how often or on what part of a map a module runs
    (row bands) must not run under such a hook; offloading moves weights and does not mind."""
    if _module._global_forward_hooks or _module._global_forward_pre_hooks:
        return True
    return any(m._forward_hooks or m._forward_pre_hooks for mod in modules for m in mod.modules())


class WeakForward:
    """``fn(module, *args, **kwargs)`` as a forward set on ``module`` itself, holding the module
    by a weak reference: a bound method or a partial of the module, stored in the module's own
    __dict__, is a reference cycle, and ``del model`` then freed none of its weights (GPU
    memory included) until Python's cycle collector happened to run. Pickles and deep-copies
    with the module (the module is memoised before its __dict__ is, so the cycle is rebuilt)."""

    __slots__ = ("fn", "_module", "__weakref__")

    def __init__(self, fn: Callable[..., Any], module: nn.Module) -> None:
        self.fn = fn
        self._module = weakref.ref(module)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        module = self._module()
        if module is None:
            raise ReferenceError(f"{getattr(self.fn, '__name__', self.fn)}: its module is gone")
        return self.fn(module, *args, **kwargs)

    def __reduce__(self) -> tuple:
        return (WeakForward, (self.fn, self._module()))
