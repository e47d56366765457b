"""The EMA's decay schedule: warmup as diffusers' EMAModel, the step number (not a count of
updates) driving it, so a resumed run continues the same schedule."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dcgen.train.ema import EMA, warmup_decay


def test_warmup_decay_ramps_to_the_configured_decay():
    assert warmup_decay(0.999, 1) == 0.0  # the average starts at the first trained weights
    assert warmup_decay(0.999, 2) == pytest.approx(2 / 11)
    assert warmup_decay(0.999, 91) == pytest.approx(0.91)
    assert warmup_decay(0.999, 10**6) == 0.999
    steps = [warmup_decay(0.9999, n) for n in range(1, 5000)]
    assert steps == sorted(steps)


def test_the_shadow_follows_the_schedule_given_by_the_step():
    p = nn.Parameter(torch.zeros(3))
    ema = EMA({"p": p}, 0.5, warmup=True)
    expected = torch.zeros(3)
    for step in (1, 2, 3, 7):  # 4-6 skipped (non-finite steps): the step number still counts
        with torch.no_grad():
            p.fill_(float(step))
        ema.update(step)
        expected.lerp_(
            torch.full((3,), float(step)), 1 - min(0.5, 0 if step == 1 else step / (9 + step))
        )
        torch.testing.assert_close(ema.shadow["p"], expected)
    plain = EMA({"p": p}, 0.5)
    assert plain.decay_at(1) == plain.decay_at(100) == 0.5


def test_a_mismatched_state_names_missing_and_unexpected_keys():
    ema = EMA({"p": nn.Parameter(torch.zeros(3))}, 0.5)
    with pytest.raises(KeyError, match=r"missing \[\] \(0\), unexpected \['extra'\] \(1\)"):
        ema.load_state_dict({"p": torch.ones(3), "extra": torch.zeros(1)})
    with pytest.raises(KeyError, match=r"missing \['p'\] \(1\), unexpected \['q'\] \(1\)"):
        ema.load_state_dict({"q": torch.ones(3)})
    assert torch.equal(ema.shadow["p"], torch.zeros(3))  # refused states change nothing
    ema.load_state_dict({"extra": torch.zeros(1)}, strict=False)  # lenient: what matches loads
    ema.load_state_dict({"p": torch.ones(3)})
    assert torch.equal(ema.shadow["p"], torch.ones(3))
