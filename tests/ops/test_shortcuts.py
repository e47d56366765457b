"""DC-AE shortcut references: their defining properties, checked independently."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dcgen.ops import channel_duplicate_to_space, space_to_channel_average


def test_space_to_channel_average_by_definition(rng):
    x = torch.randn(2, 8, 6, 4, generator=rng)
    y = space_to_channel_average(x, out_channels=16)  # 8*4 = 32 channels, groups of 2
    assert y.shape == (2, 16, 3, 2)
    u = F.pixel_unshuffle(x, 2)
    torch.testing.assert_close(y[:, 3], (u[:, 6] + u[:, 7]) / 2)


def test_channel_duplicate_to_space_by_definition(rng):
    x = torch.randn(1, 4, 3, 3, generator=rng)
    y = channel_duplicate_to_space(x, out_channels=2)  # 2*4 = 8 channels: each input twice
    assert y.shape == (1, 2, 6, 6)
    # out channel 0 covers duplicated channels 0..3 = inputs 0,0,1,1 in the 2x2 sub-pixels
    torch.testing.assert_close(y[0, 0, 0::2, 0::2], x[0, 0])
    torch.testing.assert_close(y[0, 0, 0::2, 1::2], x[0, 0])
    torch.testing.assert_close(y[0, 0, 1::2, 0::2], x[0, 1])
    torch.testing.assert_close(y[0, 1, 1::2, 1::2], x[0, 3])


def test_factor_one_is_pure_channel_op(rng):
    x = torch.randn(2, 6, 3, 3, generator=rng)
    torch.testing.assert_close(
        space_to_channel_average(x, 3, factor=1), x.view(2, 3, 2, 3, 3).mean(2)
    )
    torch.testing.assert_close(
        channel_duplicate_to_space(x, 12, factor=1), x.repeat_interleave(2, 1)
    )


def test_shortcut_errors():
    with pytest.raises(ValueError, match="divisible by 2, got 5x4"):
        space_to_channel_average(torch.randn(1, 4, 5, 4), 4)
    with pytest.raises(ValueError, match="not a multiple of out_channels=5"):
        space_to_channel_average(torch.randn(1, 4, 4, 4), 5)
    with pytest.raises(ValueError, match="not a multiple"):
        channel_duplicate_to_space(torch.randn(1, 3, 4, 4), 4)


@pytest.mark.parametrize(
    ("fn", "kwargs", "match"),
    [(space_to_channel_average, {"out_channels": 0}, "expected out_channels a positive int, got 0"),
     (space_to_channel_average, {"out_channels": 4, "factor": 0}, "expected factor a positive int"),
     (space_to_channel_average, {"out_channels": -4}, "expected out_channels a positive int"),
     (channel_duplicate_to_space, {"out_channels": -1}, "expected out_channels a positive int"),
     (channel_duplicate_to_space, {"out_channels": 4, "factor": 0}, "expected factor a positive"),
     (channel_duplicate_to_space, {"out_channels": 4, "factor": True}, "got True")],
)  # fmt: skip
def test_shortcut_sizes_are_checked(fn, kwargs, match):
    # factor 0 returned the input unchanged, a negative one a 1-channel map, out_channels 0 a
    # ZeroDivisionError
    with pytest.raises(ValueError, match=match):
        fn(torch.randn(1, 4, 4, 4), **kwargs)
    with pytest.raises(ValueError, match="at least one channel, got shape \\(1, 0, 4, 4\\)"):
        fn(torch.randn(1, 0, 4, 4), 4)


def test_empty_batches_keep_the_shortcut_shapes():
    # torch's pixel_unshuffle hands an empty input back unchanged (wrong shape)
    from dcgen.ops import down_block_shortcut_reference

    assert space_to_channel_average(torch.empty(0, 4, 4, 4), 16).shape == (0, 16, 2, 2)
    assert space_to_channel_average(torch.empty(2, 4, 0, 0), 8).shape == (2, 8, 0, 0)
    assert channel_duplicate_to_space(torch.empty(0, 8, 2, 2), 4).shape == (0, 4, 4, 4)
    y, x = torch.empty(0, 2, 4, 4), torch.empty(0, 4, 4, 4)
    assert down_block_shortcut_reference(y, x).shape == (0, 8, 2, 2)
