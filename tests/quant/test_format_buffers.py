"""The quantized linears' format buffers (uint8 / float8 weights, fp32 scales) follow every
``nn.Module._apply`` but a dtype cast: ``to_empty`` from meta, ``share_memory``, ``.half()``."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn

from dcgen.quant import FP8Linear, NVFP4Linear


def _nvfp4() -> NVFP4Linear:
    torch.manual_seed(0)
    smooth = torch.rand(64) + 0.5
    return NVFP4Linear.from_linear(nn.Linear(64, 32), "w4a4", rank=4, smooth=smooth)


def _fp8() -> FP8Linear:
    torch.manual_seed(0)
    return FP8Linear.from_linear(nn.Linear(64, 32))


LAYERS: dict[str, tuple[Callable[[], nn.Module], Callable[[], nn.Module]]] = {
    # (a quantized layer, an empty one of the same shape and kind)
    "nvfp4": (_nvfp4, lambda: NVFP4Linear(64, 32, True, "w4a4", rank=4, smooth=True)),
    "fp8": (_fp8, lambda: FP8Linear(64, 32)),
}


@pytest.mark.parametrize("kind", LAYERS)
def test_a_meta_built_layer_to_empty_then_loaded_equals_the_original(kind):
    # to_empty moved the held-aside format buffers with t.to(device): "Cannot copy out of meta
    # tensor", and the buffers were left None
    make, empty = LAYERS[kind]
    ref = make()
    with torch.device("meta"):
        layer = empty()
    layer.to_empty(device="cpu")
    state = layer.state_dict()
    assert all(t.device.type == "cpu" for t in state.values())
    assert {k: t.dtype for k, t in state.items()} == {
        k: t.dtype for k, t in ref.state_dict().items()
    }
    layer.load_state_dict(ref.state_dict(), strict=True)
    x = torch.randn(3, 64, dtype=torch.bfloat16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(layer(x), ref(x))


@pytest.mark.parametrize("kind", LAYERS)
def test_share_memory_shares_every_buffer(kind):
    # share_memory skipped the format buffers (weight / scales / smooth stayed process-private)
    layer = LAYERS[kind][0]()
    x = torch.randn(3, 64, dtype=torch.bfloat16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = layer(x)
        layer.share_memory()
        state = layer.state_dict()
        assert state and all(t.is_shared() for t in state.values()), [
            k for k, t in state.items() if not t.is_shared()
        ]
        assert torch.equal(layer(x), want)


@pytest.mark.parametrize("kind", LAYERS)
@pytest.mark.parametrize("cast", ["half", "bfloat16", "float", "double"])
def test_a_dtype_cast_keeps_the_format(kind, cast):
    layer = LAYERS[kind][0]()
    formats = {
        k: t.dtype
        for k, t in layer.state_dict().items()
        if t.dtype in (torch.uint8, torch.float8_e4m3fn, torch.float32)
        and "lora" not in k
        and k != "bias"
    }
    assert formats
    getattr(layer, cast)()
    got = layer.state_dict()
    assert {k: got[k].dtype for k in formats} == formats


@pytest.mark.parametrize("kind", LAYERS)
def test_a_failing_apply_leaves_no_buffer_none(kind):
    layer = LAYERS[kind][0]()
    names = [k for k, t in layer._buffers.items() if t is not None]

    def fail(t: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("no")

    with pytest.raises(RuntimeError, match="no"):
        layer._apply(fail)
    assert all(layer._buffers[k] is not None for k in names)
