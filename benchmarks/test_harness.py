"""The harness's output check (record_rel_err): it must catch a wrong result, compare the two
functions on the same inputs when they change them in place, and leave those inputs as found.
Plain tests (no timing); they run with the benchmark suite, on any machine."""

from __future__ import annotations

import pytest
import torch
from _harness import record_rel_err, relative_error


class _Benchmark:  # the one attribute of pytest-benchmark's fixture that the check uses
    def __init__(self) -> None:
        self.extra_info: dict = {}


def test_a_wrong_result_fails_its_row_and_is_recorded():
    x = torch.randn(64)
    bench = _Benchmark()
    with pytest.raises(AssertionError, match="relative error"):
        record_rel_err(bench, lambda: x * 1.1, lambda: x)
    assert bench.extra_info["rel_err"] == pytest.approx(0.1, rel=1e-5)


def test_a_close_result_passes_and_record_only_never_fails():
    x = torch.randn(64)
    bench = _Benchmark()
    assert record_rel_err(bench, lambda: x + 1e-4 * x, lambda: x) == pytest.approx(1e-4, rel=1e-3)
    assert record_rel_err(bench, lambda: -x, lambda: x, limit=None) == pytest.approx(2.0)
    assert bench.extra_info["rel_err"] == pytest.approx(2.0)


def test_in_place_functions_see_the_same_inputs_and_leave_them_as_found():
    x = torch.randn(8, 8)
    before = x.clone()

    def ours():  # both add one in place: each must start from `before`
        return x.add_(1.0)

    def base():
        x.add_(1.0)
        return x * 1.0

    bench = _Benchmark()
    assert record_rel_err(bench, ours, base, restore=(x,)) == 0.0
    assert torch.equal(x, before)


def test_tuples_take_the_worst_output_and_shapes_must_match():
    a, b = torch.ones(4), torch.ones(4)
    assert relative_error((a, 2 * b), (a, b)) == pytest.approx(1.0)
    with pytest.raises(AssertionError, match=r"baseline's shape \(4,\)"):
        relative_error(torch.ones(2, 2), torch.ones(4))
    with pytest.raises(AssertionError, match="expected 2 outputs"):
        relative_error((a,), (a, b))
