"""dcgen's run-time environment switches: one reading rule (module doc of dcgen._env)."""

from __future__ import annotations

import types

import pytest
import torch

from dcgen._env import env_choice, env_flag


@pytest.mark.parametrize(
    ("raw", "want"),
    [("1", True), ("true", True), (" Yes ", True), ("ON", True),
     ("0", False), ("false", False), ("No", False), ("off ", False), ("", None)],
)  # fmt: skip
def test_an_on_off_switch_takes_every_spelling(monkeypatch, raw, want):
    monkeypatch.setenv("DCGEN_TEST_SWITCH", raw)
    for default in (True, False):  # empty: the default
        assert env_flag("DCGEN_TEST_SWITCH", default) is (default if want is None else want)


def test_a_value_a_switch_does_not_know_is_refused_as_it_was_set(monkeypatch):
    monkeypatch.setenv("DCGEN_TEST_SWITCH", " enabled")
    with pytest.raises(ValueError, match=r"DCGEN_TEST_SWITCH: expected 1 or 0 .*got ' enabled'"):
        env_flag("DCGEN_TEST_SWITCH", False)
    monkeypatch.setenv("DCGEN_TEST_SWITCH", " KERNEL")
    with pytest.raises(ValueError, match=r"expected one of \('a', 'kernels'\), got ' KERNEL'"):
        env_choice("DCGEN_TEST_SWITCH", ("a", "kernels"), "a")
    monkeypatch.setenv("DCGEN_TEST_SWITCH", " Kernels")
    assert env_choice("DCGEN_TEST_SWITCH", ("a", "kernels"), "a") == "kernels"
    monkeypatch.setenv("DCGEN_TEST_SWITCH", "")
    assert env_choice("DCGEN_TEST_SWITCH", ("a", "kernels"), "a") == "a"


@pytest.mark.parametrize(("raw", "want"), [("true", True), ("yes", True), ("false", False)])
def test_the_kernel_and_hopper_switches_read_words(monkeypatch, raw, want):
    # `== "1"`: DCGEN_DISABLE_KERNELS=true left the kernels on in an A/B check, and
    # DCGEN_NVFP4_SM90=yes the Hopper GEMMs off.
    from dcgen.ops._extension import _disabled
    from dcgen.ops.nvfp4_gemm import hopper_enabled

    monkeypatch.setenv("DCGEN_DISABLE_KERNELS", raw)
    monkeypatch.setenv("DCGEN_NVFP4_SM90", raw)
    assert _disabled() is want and hopper_enabled() is want
    monkeypatch.setenv("DCGEN_DISABLE_KERNELS", "y")
    with pytest.raises(ValueError, match="DCGEN_DISABLE_KERNELS"):
        _disabled()


@pytest.mark.parametrize("raw", ["false", "off", "no", " 0"])
def test_the_cudnn_conv_relu_switch_turns_off_with_any_word_for_off(monkeypatch, raw):
    # `!= "0"`: DCGEN_DCAE_CUDNN_CONV_RELU=false kept the fused convolution
    from dcgen.autoencoders import blocks

    monkeypatch.setattr(torch.backends.cudnn, "is_available", lambda: True)
    conv = torch.nn.Conv2d(4, 4, 3, padding=1).half()
    x = types.SimpleNamespace(is_cuda=True, dtype=torch.float16)  # the rule's inputs only
    monkeypatch.setenv(blocks.CUDNN_CONV_RELU_ENV, "1")
    assert blocks._cudnn_conv_relu(x, conv)
    monkeypatch.setenv(blocks.CUDNN_CONV_RELU_ENV, raw)
    assert not blocks._cudnn_conv_relu(x, conv)
