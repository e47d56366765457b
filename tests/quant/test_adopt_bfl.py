"""adopt_quantized: Black Forest Labs' FP8 / NVFP4 checkpoints, as diffusers loads them, become
dcgen's quantized layers with the same bytes.

The checkpoint is made here the way BFL ships one: a FLUX transformer's state dict in BFL's own
key names (fused qkv, single blocks' linear1 / linear2), some linears quantized with diffusers'
BFL reference quantizers (diffusers.quantizers.bfl.utils), loaded through the user's path,
``FluxTransformer2DModel.from_single_file(..., quantization_config=BFLQuantizationConfig())``.
FLUX's single-file converter assumes FLUX's width (3072), so the model is full width with one
double and one single block (530M parameters, about 10 s on this CPU)."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import FluxTransformer2DModel
from torch import nn

from dcgen.quant import FP8Linear, NVFP4Linear, adopt_quantized, load_quantized, save_quantized

bfl = pytest.importorskip("diffusers.quantizers.bfl.utils")
BFLQuantizationConfig = pytest.importorskip(
    "diffusers.quantizers.quantization_config"
).BFLQuantizationConfig

CONFIG = dict(patch_size=1, in_channels=64, num_layers=1, num_single_layers=1,
              attention_head_dim=128, num_attention_heads=24, joint_attention_dim=64,
              pooled_projection_dim=32, guidance_embeds=True, axes_dims_rope=(16, 56, 56))  # fmt: skip
# BFL key -> the diffusers linears it holds (fused ones split along the output dimension)
QUANTIZED = {"double_blocks.0.img_attn.qkv": ("transformer_blocks.0.attn.to_q",
                                              "transformer_blocks.0.attn.to_k",
                                              "transformer_blocks.0.attn.to_v"),
             "single_blocks.0.linear1": ("single_transformer_blocks.0.attn.to_q",
                                         "single_transformer_blocks.0.attn.to_k",
                                         "single_transformer_blocks.0.attn.to_v",
                                         "single_transformer_blocks.0.proj_mlp")}  # fmt: skip
INPUT_SCALE = 0.02
originals: dict[str, torch.Tensor] = {}  # the 16-bit weights of the quantized layers (fixture)


def _bfl_state_dict(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A diffusers FLUX state dict in BFL's original key names (the inverse of diffusers'
    convert_flux_transformer_checkpoint_to_diffusers)."""
    out: dict[str, torch.Tensor] = {}

    def linear(src: str, dst: str) -> None:
        for p in ("weight", "bias"):
            out[f"{dst}.{p}"] = sd[f"{src}.{p}"]

    def fused(srcs: list[str], dst: str) -> None:
        for p in ("weight", "bias"):
            out[f"{dst}.{p}"] = torch.cat([sd[f"{s}.{p}"] for s in srcs])

    tt = "time_text_embed."
    for ours, theirs in (("timestep_embedder", "time_in"), ("text_embedder", "vector_in"),
                         ("guidance_embedder", "guidance_in")):  # fmt: skip
        linear(f"{tt}{ours}.linear_1", f"{theirs}.in_layer")
        linear(f"{tt}{ours}.linear_2", f"{theirs}.out_layer")
    linear("context_embedder", "txt_in")
    linear("x_embedder", "img_in")
    b, d = "transformer_blocks.0.", "double_blocks.0."
    linear(b + "norm1.linear", d + "img_mod.lin")
    linear(b + "norm1_context.linear", d + "txt_mod.lin")
    fused([b + f"attn.to_{x}" for x in "qkv"], d + "img_attn.qkv")
    fused([b + f"attn.add_{x}_proj" for x in "qkv"], d + "txt_attn.qkv")
    for side, q, k in (("img", "norm_q", "norm_k"), ("txt", "norm_added_q", "norm_added_k")):
        out[d + f"{side}_attn.norm.query_norm.scale"] = sd[b + f"attn.{q}.weight"]
        out[d + f"{side}_attn.norm.key_norm.scale"] = sd[b + f"attn.{k}.weight"]
    for side, ff in (("img", "ff"), ("txt", "ff_context")):
        linear(b + f"{ff}.net.0.proj", d + f"{side}_mlp.0")
        linear(b + f"{ff}.net.2", d + f"{side}_mlp.2")
    linear(b + "attn.to_out.0", d + "img_attn.proj")
    linear(b + "attn.to_add_out", d + "txt_attn.proj")
    s, sb = "single_transformer_blocks.0.", "single_blocks.0."
    linear(s + "norm.linear", sb + "modulation.lin")
    fused([s + "attn.to_q", s + "attn.to_k", s + "attn.to_v", s + "proj_mlp"], sb + "linear1")
    out[sb + "norm.query_norm.scale"] = sd[s + "attn.norm_q.weight"]
    out[sb + "norm.key_norm.scale"] = sd[s + "attn.norm_k.weight"]
    linear(s + "proj_out", sb + "linear2")
    linear("proj_out", "final_layer.linear")
    for p in ("weight", "bias"):  # diffusers' norm_out is (scale, shift); BFL's (shift, scale)
        scale, shift = sd[f"norm_out.linear.{p}"].chunk(2)
        out[f"final_layer.adaLN_modulation.1.{p}"] = torch.cat([shift, scale])
    return out


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """(config folder, BFL-format NVFP4 checkpoint) of a random full-width FLUX."""
    torch.manual_seed(0)
    model = FluxTransformer2DModel(**CONFIG)
    folder = tmp_path_factory.mktemp("flux_config")
    model.save_config(folder)
    originals.update({f"{n}.weight": model.get_submodule(n).weight.detach().clone()
                      for names in QUANTIZED.values() for n in names})  # fmt: skip
    state = _bfl_state_dict(model.state_dict())
    for key in QUANTIZED:
        w, ws, ws2 = bfl.quantize_nvfp4(state[key + ".weight"])
        state.update({f"{key}.weight": w, f"{key}.weight_scale": ws,
                      f"{key}.weight_scale_2": ws2,
                      f"{key}.input_scale": torch.tensor(INPUT_SCALE)})  # fmt: skip
    return folder, state


def _load(checkpoint) -> FluxTransformer2DModel:
    folder, state = checkpoint
    model = FluxTransformer2DModel.from_single_file(
        dict(state), config=str(folder), quantization_config=BFLQuantizationConfig(torch.float32),
        dtype=torch.float32,
    )  # fmt: skip
    return model.eval()


def _inputs(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return dict(
        hidden_states=torch.randn(1, 12, 64, generator=g),
        encoder_hidden_states=torch.randn(1, 5, 64, generator=g),
        pooled_projections=torch.randn(1, 32, generator=g),
        timestep=torch.tensor([0.7]),
        guidance=torch.tensor([3.5]),
        img_ids=torch.stack(
            torch.meshgrid(torch.zeros(1), torch.arange(3.0), torch.arange(4.0), indexing="ij"), -1
        ).reshape(12, 3),  # fmt: skip
        txt_ids=torch.zeros(5, 3),
    )


@torch.no_grad()
def _run(model: nn.Module, seed: int = 0) -> torch.Tensor:
    return model(**_inputs(seed), return_dict=False)[0]


def test_every_bfl_linear_becomes_a_dcgen_layer_with_the_same_bytes(checkpoint):
    model = _load(checkpoint)
    bfl_layers = {n: m for n, m in model.named_modules() if type(m).__name__ == "BFLNVFP4Linear"}
    assert set(bfl_layers) == {n for names in QUANTIZED.values() for n in names}
    raw = {n: (m.weight.clone(), m.weight_scale.clone(), m.weight_scale_2.clone())
           for n, m in bfl_layers.items()}  # fmt: skip
    names = adopt_quantized(model)
    assert set(names) == set(bfl_layers)
    for name in names:
        layer = model.get_submodule(name)
        assert isinstance(layer, NVFP4Linear) and layer.mode == "w4a4" and layer.rank == 0
        codes, scales, global_scale = raw[name]
        assert torch.equal(layer.weight, codes)  # the same E2M1 bytes, nibble order included
        assert torch.equal(layer.weight_scale.view(torch.uint8), scales.view(torch.uint8))
        assert torch.equal(layer.weight_scale_2, global_scale.reshape(()))
        # and the same values (the two multiply the three factors in another order)
        want = bfl.dequantize_nvfp4(codes, scales, global_scale)
        torch.testing.assert_close(layer.dequantized_weight(), want, rtol=1e-6, atol=0)
        assert layer.input_scale.item() == pytest.approx(INPUT_SCALE)
    assert model.hf_quantizer is None and not model.is_quantized
    assert not any("BFL" in type(m).__name__ for m in model.modules())
    model.to(torch.bfloat16)  # diffusers refuses dtype casts of a quantized model; dcgen's keep
    assert model.get_submodule(names[0]).weight.dtype == torch.uint8  # their format


def test_w4a16_adoption_computes_what_diffusers_computes(checkpoint):
    """diffusers' BFL layers off Blackwell: dequantize, then a 16/32-bit matmul (W4A16);
    dcgen's w4a16 layers compute the same up to fp32 summation order."""
    reference = _load(checkpoint)
    want = _run(reference)
    adopt_quantized(reference, nvfp4_mode="w4a16")
    got = _run(reference)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_w4a4_adoption_quantizes_activations_with_the_calibrated_scale(checkpoint):
    w4a16, w4a4 = _load(checkpoint), _load(checkpoint)
    adopt_quantized(w4a16, nvfp4_mode="w4a16")
    adopt_quantized(w4a4)
    a, b = _run(w4a16), _run(w4a4)
    rel = ((a - b).norm() / a.norm()).item()
    assert 0 < rel < 0.1  # activations rounded to E2M1 blocks: close, not equal


def test_adopted_model_saves_and_loads_as_a_dcgen_checkpoint(checkpoint, tmp_path):
    model = _load(checkpoint)
    adopt_quantized(model)
    path = tmp_path / "flux-bfl-nvfp4.safetensors"
    save_quantized(model, path)
    fresh = FluxTransformer2DModel.from_config(FluxTransformer2DModel.load_config(checkpoint[0]))
    loaded = load_quantized(fresh.eval(), path)
    assert set(loaded) == {n for names in QUANTIZED.values() for n in names}
    torch.testing.assert_close(_run(fresh, seed=1), _run(model, seed=1), rtol=0, atol=0)


def _bfl_fp8_layer(n: int = 48, k: int = 64) -> nn.Module:
    torch.manual_seed(3)
    layer = bfl.BFLFP8RLinear(k, n, bias=True, compute_dtype=torch.float32)
    weight, scale = bfl.quantize_fp8r(torch.randn(n, k))
    layer.weight = nn.Parameter(weight, requires_grad=False)
    layer.weight_scale = scale
    layer.bias.data.normal_()
    return layer


def test_fp8_rows_adopt_and_compute_bfls_fp8_gemm():
    """BFL's FP8 layer on an FP8 GPU: rows of x quantized with amax / 448, then the scaled GEMM
    with the weight's row scales. dcgen's FP8Linear computes that (fp32 accumulation)."""
    holder = nn.Sequential(_bfl_fp8_layer())
    bfl_layer = holder[0]
    w = bfl.dequantize_fp8r(bfl_layer.weight, bfl_layer.weight_scale)
    bias = bfl_layer.bias.detach().clone()
    assert adopt_quantized(holder) == ["0"]
    layer = holder[0]
    assert isinstance(layer, FP8Linear) and layer.granularity == "row"
    assert torch.equal(layer.dequantized_weight(), w)
    x = torch.randn(7, 64, generator=torch.Generator().manual_seed(4))
    x_scale = (x.abs().amax(dim=1, keepdim=True) / 448.0).clamp(min=1e-12)
    x_q = (x / x_scale).clamp(-448, 448).to(torch.float8_e4m3fn).float() * x_scale
    with torch.no_grad():
        torch.testing.assert_close(layer(x), x_q @ w.T + bias, rtol=1e-5, atol=1e-5)


def test_errors_are_named(checkpoint):
    with pytest.raises(ValueError, match="found no diffusers BFL"):
        adopt_quantized(nn.Sequential(nn.Linear(16, 16)))
    with pytest.raises(ValueError, match="NVFP4: expected mode"):
        adopt_quantized(nn.Sequential(_bfl_fp8_layer()), nvfp4_mode="w8a8")
    model = _load(checkpoint)
    # (a new tensor: the layers split from one fused BFL weight share their scale tensors)
    model.transformer_blocks[0].attn.to_k.input_scale = torch.zeros(())
    with pytest.raises(ValueError, match=r"attn\.to_k has no calibrated input_scale"):
        adopt_quantized(model)
    # checked before any swap: the model is left as it was
    assert type(model.transformer_blocks[0].attn.to_q).__name__ == "BFLNVFP4Linear"
    assert adopt_quantized(model, nvfp4_mode="w4a16")  # w4a16 needs no activation scale


def test_convert_quantized_command_writes_a_dcgen_checkpoint(checkpoint, tmp_path, capsys):
    from safetensors.torch import save_file

    from dcgen.cli import main

    folder, state = checkpoint
    src = tmp_path / "flux1-bfl-nvfp4.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, src)
    out = tmp_path / "dcgen.safetensors"
    args = ["convert-quantized", str(src), "--pipeline", str(folder), "--out", str(out),
            "--dtype", "fp32"]  # fmt: skip
    assert main(args) == 0
    assert "7 quantized linears (7 NVFP4Linear; NVFP4 w4a4)" in capsys.readouterr().out
    fresh = FluxTransformer2DModel.from_config(FluxTransformer2DModel.load_config(folder)).eval()
    load_quantized(fresh, out)
    adopted = _load(checkpoint)
    adopt_quantized(adopted)
    torch.testing.assert_close(_run(fresh, seed=2), _run(adopted, seed=2), rtol=0, atol=0)
    # --out the source replaced it; a --report file that cannot be written failed after the
    # whole conversion: both named before any work
    before = src.read_bytes()
    assert main([*args[:4], "--out", str(src)]) == 2
    assert "expected another file than the checkpoint" in capsys.readouterr().err
    assert src.read_bytes() == before
    (tmp_path / "other.weights.json").mkdir()
    other = tmp_path / "other.safetensors"
    assert main([*args[:4], "--out", str(other), "--report"]) == 2
    assert "--report's file" in capsys.readouterr().err and not other.exists()
    # a SANA folder failed inside diffusers with "error: pos_embed"
    from ..adapters.tiny import tiny_sana

    tiny_sana().save_pretrained(tmp_path / "sana")
    assert main(["convert-quantized", str(src), "--pipeline", str(tmp_path / "sana"), "--out",
                 str(other)]) == 2  # fmt: skip
    assert "expected a FLUX transformer" in capsys.readouterr().err
    # bad inputs, named
    assert main([*args[:1], str(tmp_path / "missing.safetensors"), *args[2:]]) != 0
    assert "no such checkpoint" in capsys.readouterr().err
    assert main([*args[:3], str(tmp_path), *args[4:]]) != 0
    assert "expected a FLUX pipeline folder" in capsys.readouterr().err
    other = tmp_path / "sd3"
    other.mkdir()
    (other / "config.json").write_text('{"_class_name": "NoSuchTransformer"}')
    assert main([*args[:3], str(other), *args[4:]]) != 0
    assert "'NoSuchTransformer' has no single-file loader" in capsys.readouterr().err
    # the BFL file itself given where a dcgen checkpoint goes: the error says what to do
    with pytest.raises(ValueError, match="convert it with `dcgen convert-quantized"):
        load_quantized(fresh, src)


def test_weight_errors_compare_with_the_16bit_weights(checkpoint):
    """NVFP4 (E2M1 with E4M3 block scales) of a random Gaussian weight: a few percent of
    relative error, cosine near 1; a missing reference is listed, not guessed."""
    from dcgen.quant.adopt import weight_errors

    model = _load(checkpoint)
    adopt_quantized(model)
    report = weight_errors(model, originals.get)
    assert set(report["layers"]) == {n for names in QUANTIZED.values() for n in names}
    for name, e in report["layers"].items():
        assert 0.01 < e["rel_err"] < 0.2 and e["cosine"] > 0.98, (name, e)
    assert report["summary"]["missing_reference"] == []
    partial = weight_errors(model, lambda key: originals.get(key) if "to_q" in key else None)
    assert len(partial["layers"]) == 2 and len(partial["summary"]["missing_reference"]) == 5
    with pytest.raises(ValueError, match="the reference weight has shape"):
        weight_errors(model, lambda key: torch.zeros(3, 3))


def _bfl_file_and_reference_folder(checkpoint, tmp_path):
    """The BFL checkpoint as a file, and a transformer folder (config.json only) for --report."""
    from safetensors.torch import save_file

    folder, state = checkpoint
    src = tmp_path / "bfl.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, src)
    ref = tmp_path / "transformer"
    ref.mkdir()
    (ref / "config.json").write_text((folder / "config.json").read_text())
    return src, ref


def test_convert_quantized_report_reads_the_pipeline_weights(checkpoint, tmp_path, capsys):
    from safetensors.torch import save_file

    from dcgen.cli import main

    src, ref = _bfl_file_and_reference_folder(checkpoint, tmp_path)
    key = "transformer_blocks.0.attn.to_q.weight"
    save_file({key: originals[key].to(torch.bfloat16)}, ref / "diffusion_pytorch_model.safetensors")
    out = tmp_path / "dcgen.safetensors"
    assert main(["convert-quantized", str(src), "--pipeline", str(ref), "--out", str(out),
                 "--dtype", "fp32", "--report"]) == 0  # fmt: skip
    report = json.loads((tmp_path / "dcgen.weights.json").read_text())
    assert list(report["layers"]) == ["transformer_blocks.0.attn.to_q"]
    assert len(report["summary"]["missing_reference"]) == 6
    assert "weights vs" in capsys.readouterr().out


def test_convert_quantized_report_names_a_broken_shard_index(checkpoint, tmp_path, capsys):
    """An index without a weight_map (a truncated download) is reported as that file, before
    the checkpoint is loaded; it printed only "error: 'weight_map'"."""
    from dcgen.cli import main

    src, ref = _bfl_file_and_reference_folder(checkpoint, tmp_path)
    index = ref / "diffusion_pytorch_model.safetensors.index.json"
    index.write_text('{"metadata": {}}')
    out = tmp_path / "dcgen.safetensors"
    assert main(["convert-quantized", str(src), "--pipeline", str(ref), "--out", str(out),
                 "--report"]) == 2  # fmt: skip
    err = capsys.readouterr().err
    assert "--report: could not read shard index" in err and str(index) in err, err
    assert not out.exists()


def test_weight_errors_divide_smoothing_out_and_refuse_low_rank_layers():
    from dcgen.quant import NVFP4Config, quantize_
    from dcgen.quant.adopt import weight_errors

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.Linear(32, 16))
    ref = {f"{n}.weight": layer.weight.detach().clone() for n, layer in model.named_children()}
    x = torch.randn(8, 64) * torch.linspace(0.1, 10, 64)  # outlier channels: strong smoothing
    config = NVFP4Config("w4a16", smoothing_alpha=0.5, include=(r".*",))
    quantize_(model, config, calibrate=lambda m: m(x))
    assert model[0].smooth is not None
    errors = weight_errors(model, ref.get)["layers"]
    assert all(e["rel_err"] < 0.2 and e["cosine"] > 0.98 for e in errors.values()), errors
    low_rank = nn.Sequential(nn.Linear(64, 32))
    quantize_(low_rank, NVFP4Config("w4a16", rank=4, include=(r".*",)))
    with pytest.raises(ValueError, match="low-rank branch"):
        weight_errors(low_rank, lambda key: torch.zeros(32, 64))
