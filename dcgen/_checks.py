"""Type tests shared by the argument checks of the public API: numpy scalars count as numbers
(a value read from an array or a config should pass), a bool does not (True is not a count)."""

from __future__ import annotations

import numbers


def is_real(value: object) -> bool:
    """A real number (Python or numpy, NaN and infinities included), not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def is_int(value: object) -> bool:
    """An integer (Python or numpy), not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)
