"""Quantized layers keep the dtypes their format fixes, whatever torch's default dtype, and the
16-bit parts in the model's own dtype."""

from __future__ import annotations

import pytest
import torch

from dcgen.quant import FP8Config, NVFP4Config, load_quantized, quantize_, save_quantized

from ..adapters.tiny import tiny_flux
from .test_quantize_api import flux_inputs


def _flux() -> torch.nn.Module:
    return tiny_flux(in_channels=16, guidance_embeds=False)


def _calibrate(model: torch.nn.Module) -> None:
    with torch.no_grad():
        model(**flux_inputs())


@pytest.mark.parametrize("default", [torch.bfloat16, torch.float64])
@pytest.mark.parametrize("config", [FP8Config(), NVFP4Config()], ids=["fp8", "nvfp4"])
def test_scales_stay_fp32_under_another_default_dtype(default, config):
    # The scale buffers were made in the default dtype: a bf16 default rounded NVFP4's global
    # scales and broke FP8's _scaled_mm ("Invalid scaling configuration").
    model = _flux()
    torch.set_default_dtype(default)
    try:
        quantize_(model, config, calibrate=_calibrate if isinstance(config, NVFP4Config) else None)
    finally:
        torch.set_default_dtype(torch.float32)
    scales = [
        (name, getattr(layer, name))
        for layer in model.modules()
        for name in ("weight_scale", "weight_scale_2", "input_scale", "smooth")
        if isinstance(getattr(layer, name, None), torch.Tensor)
    ]
    assert scales
    for name, t in scales:
        assert t.dtype in (torch.float32, torch.float8_e4m3fn), (name, t.dtype)
    with torch.no_grad():
        assert torch.isfinite(model(**flux_inputs())[0]).all()


def test_a_file_loads_as_saved_under_a_bf16_default(tmp_path):
    model = _flux().bfloat16()
    quantize_(model, NVFP4Config(), calibrate=_calibrate)
    save_quantized(model, tmp_path / "q.safetensors")
    torch.set_default_dtype(torch.bfloat16)
    try:
        loaded = _flux().bfloat16()
        load_quantized(loaded, tmp_path / "q.safetensors")
    finally:
        torch.set_default_dtype(torch.float32)
    got = loaded.state_dict()
    for name, want in model.state_dict().items():
        assert got[name].dtype == want.dtype and torch.equal(got[name], want), name


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(
    "config", [FP8Config(), NVFP4Config(mode="w4a16", rank=4, smoothing_alpha=None)],
    ids=["fp8", "nvfp4-rank4"],
)  # fmt: skip
def test_biases_and_low_rank_factors_keep_the_models_dtype(dtype, config):
    # from_linear's bf16 default rounded an fp32 or fp16 model's biases (and NVFP4's low-rank
    # factors) to bf16, where fp8.py says quantize_ keeps each bias in the model's dtype.
    model = _flux().to(dtype)
    bias = model.transformer_blocks[0].attn.to_q.bias.detach().clone()
    quantize_(model, config)
    layer = model.transformer_blocks[0].attn.to_q
    assert layer.bias.dtype == dtype and torch.equal(layer.bias, bias)
    for name in ("lora_up", "lora_down"):
        factor = getattr(layer, name, None)
        assert factor is None or factor.dtype == dtype, name
