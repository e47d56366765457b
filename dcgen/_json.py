"""JSON that every parser reads: non-finite floats are written as ``null``.

Python's ``json`` writes ``NaN`` and ``Infinity`` by default, which is not JSON: ``jq``,
JavaScript's ``JSON.parse`` and most other readers refuse the whole file. dcgen's reports and
logs carry measured numbers that can be non-finite (a diverged step's loss, a relative error
against an all-zero output, a ratio to a time that was not measured), so their writers go
through :func:`dumps`, which writes those as ``null`` and refuses to write anything else
that is not JSON.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["dumps", "json_safe"]


def _scalar(obj: Any) -> Any:
    """numpy and 0-d torch scalars as Python numbers; anything else unchanged."""
    item = getattr(obj, "item", None)
    shape = getattr(obj, "shape", None)
    if callable(item) and shape is not None and tuple(shape) == ():
        return item()
    return obj


def json_safe(obj: Any, default: Callable[[Any], Any] | None = None) -> Any:
    """A copy of ``obj`` with every non-finite float replaced by ``None``; numpy and 0-d torch
    scalars become Python numbers, other unknown objects go through ``default`` first."""
    obj = _scalar(obj)
    if isinstance(obj, bool) or obj is None or isinstance(obj, (int, str)):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Mapping):
        return {k: json_safe(v, default) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v, default) for v in obj]
    if default is not None:
        return json_safe(default(obj))
    return obj  # json.dumps names the type it cannot write


def dumps(obj: Any, *, default: Callable[[Any], Any] | None = None, **kwargs: Any) -> str:
    """``json.dumps`` of :func:`json_safe` ``(obj)``; strict (``allow_nan=False``)."""
    return json.dumps(json_safe(obj, default), allow_nan=False, **kwargs)
