"""dcgen's reports and logs are JSON every parser reads: Python's json writes NaN and Infinity
by default, which jq and JavaScript's JSON.parse refuse (the whole file)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from dcgen._json import dumps, json_safe


def _strict(text: str) -> object:
    def refuse(token: str) -> None:
        raise AssertionError(f"{token} is not JSON")

    return json.loads(text, parse_constant=refuse)


def test_non_finite_floats_are_null_at_any_depth():
    obj = {"a": math.nan, "b": [1.5, math.inf, {"c": -math.inf}], "d": (2, "x", None, True)}
    assert _strict(dumps(obj)) == {
        "a": None,
        "b": [1.5, None, {"c": None}],
        "d": [2, "x", None, True],
    }


def test_numpy_and_torch_scalars_become_numbers():
    obj = {"np": np.float32(0.25), "npnan": np.float64("nan"), "i": np.int64(3),
           "t": torch.tensor(0.5), "tinf": torch.tensor(float("inf")), "b": np.bool_(True)}  # fmt: skip
    assert _strict(dumps(obj)) == {"np": 0.25, "npnan": None, "i": 3, "t": 0.5, "tinf": None,
                                   "b": True}  # fmt: skip


def test_default_runs_before_the_check_and_unknown_types_still_fail():
    class Odd:
        def __float__(self) -> float:
            return math.nan

    assert _strict(dumps({"x": Odd()}, default=float)) == {"x": None}
    with pytest.raises(TypeError, match="Odd"):
        dumps({"x": Odd()})


def test_json_safe_leaves_finite_values_alone():
    obj = {"x": [0.0, -1e300, 1e-300], "s": "NaN"}
    assert json_safe(obj) == obj
