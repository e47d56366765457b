"""``torch.compile(module)`` wrappers at the public API.

diffusers documents ``pipe.transformer = torch.compile(pipe.transformer)``, which hands dcgen an
``OptimizedModule``: its type is not the transformer's, and its module names and state_dict keys
carry an ``_orig_mod.`` prefix. Unseen, that refused the model ("no dcgen adapter"), let the
name-anchored quantization exclusions (``^x_embedder$``) miss and wrote files with prefixed keys
that a plain model cannot load. The public functions that read names or types therefore work on
the wrapped module; calls still go through the wrapper, so the compiled forward runs."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import Any, TypeVar

F = TypeVar("F", bound=Callable[..., Any])


def unwrap_compiled(module: Any) -> Any:
    """The module a ``torch.compile`` wrapper compiles, else ``module`` itself."""
    # Only torch.compile creates the wrapper, so its module is loaded whenever one exists (and is
    # not imported here: dynamo is slow to import).
    eval_frame = sys.modules.get("torch._dynamo.eval_frame")
    if eval_frame is not None and isinstance(module, eval_frame.OptimizedModule):
        return module._orig_mod
    return module


def sees_through_compile(fn: F) -> F:
    """Run ``fn`` (whose first argument is a model) on the module a compile wrapper wraps; a
    result that is that module comes back as the wrapper the caller passed."""

    @functools.wraps(fn)
    def wrapper(model: Any, *args: Any, **kwargs: Any) -> Any:
        inner = unwrap_compiled(model)
        out = fn(inner, *args, **kwargs)
        return model if out is inner and inner is not model else out

    return wrapper  # type: ignore[return-value]
