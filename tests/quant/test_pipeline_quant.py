"""Quantizing a pipeline's transformer from its own sampling (dcgen.quant.pipeline_quant) and the
`dcgen quantize` / `dcgen generate --quantized` commands, on a tiny FLUX pipeline (CPU)."""

from __future__ import annotations

import copy
import json
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from PIL import Image
from safetensors.torch import save_file

from dcgen.adapters import adapter_for
from dcgen.cli import main
from dcgen.pipelines import DCGenFluxPipeline
from dcgen.quant import FP8Config, NVFP4Config, load_quantized, quantized_modules, save_quantized
from dcgen.quant.fp8_linear import FP8Linear
from dcgen.quant.linear import NVFP4Linear
from dcgen.quant.pipeline_quant import (
    CallRecorder,
    capture_transformer_inputs,
    quantize_transformer,
    summarize_report,
)

from ..adapters.tiny import text, tiny_dcae, tiny_flux

SIZE = 64  # pixels: a 2 x 2 latent grid for the f32 DC-AE


def _pipe() -> DCGenFluxPipeline:
    ae, model = tiny_dcae(), tiny_flux()
    adapter_for(model).replace_latent_layers(ae.latent_channels)
    pipe = DCGenFluxPipeline(model, ae, FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _prompt() -> dict[str, torch.Tensor]:
    embeds, pooled = text(1)
    return {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}


def _pixels(path) -> torch.Tensor:  # noqa: ANN001
    return torch.from_numpy(np.array(Image.open(path).convert("RGB"))).float()


def _out(model: torch.nn.Module, kwargs: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(**kwargs)[0]


def test_capture_records_every_step_and_replays_exactly():
    pipe = _pipe()
    calls = capture_transformer_inputs(pipe, 3, SIZE, SIZE, **_prompt())
    assert len(calls) == 3  # guidance-distilled FLUX: one transformer call per step
    timesteps = [float(c.kwargs["timestep"].flatten()[0]) for c in calls]
    assert timesteps == sorted(timesteps, reverse=True) and len(set(timesteps)) == 3
    # the recorded inputs are copies: replaying one reproduces what the pipeline computed
    recorder = CallRecorder(pipe.transformer)
    try:
        first = _out(pipe.transformer, calls[0].kwargs)
    finally:
        recorder.remove()
    assert len(recorder.calls) == 1
    torch.testing.assert_close(
        _out(pipe.transformer, recorder.calls[0].kwargs), first, rtol=0, atol=0
    )


def test_capture_rejects_bad_steps():
    with pytest.raises(ValueError, match="calibration steps: expected a positive integer, got 0"):
        capture_transformer_inputs(_pipe(), 0, SIZE, SIZE, **_prompt())


def test_recorder_replays_positional_and_nested_arguments():
    """SANA's blocks are called positionally, FLUX's get a (cos, sin) tuple: both replay."""
    block = torch.nn.Bilinear(4, 4, 3)
    recorder = CallRecorder(block, limit=1)
    x, y = torch.randn(2, 4), torch.randn(2, 4)
    try:
        first = block(x, y)
        block(y, x)  # past the limit: not recorded
    finally:
        recorder.remove()
    (call,) = recorder.calls
    x.zero_()  # the recording holds copies
    torch.testing.assert_close(call.run(block), first, rtol=0, atol=0)
    pair = TransformerPair()
    rec = CallRecorder(pair)
    try:
        out = pair(torch.ones(3), rope=(torch.ones(3), torch.full((3,), 2.0)))
    finally:
        rec.remove()
    torch.testing.assert_close(rec.calls[0].run(pair), out, rtol=0, atol=0)
    assert isinstance(rec.calls[0].kwargs["rope"], tuple)


class TransformerPair(torch.nn.Module):
    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        return x * rope[0] + rope[1]


@pytest.mark.parametrize(
    "config, kind, bound",
    [
        (FP8Config(), FP8Linear, 0.05),
        (NVFP4Config(mode="w4a4", rank=4, smoothing_alpha=0.5), NVFP4Linear, 0.1),
    ],
    ids=["fp8-row", "nvfp4-w4a4-svdquant"],
)
def test_quantize_transformer_reports_against_a_16bit_copy(config, kind, bound):
    pipe = _pipe()
    calls = capture_transformer_inputs(pipe, 2, SIZE, SIZE, **_prompt())
    before = _out(pipe.transformer, calls[1].kwargs)
    names, rep = quantize_transformer(pipe.transformer, config, calls)
    mods = quantized_modules(pipe.transformer)
    assert sorted(mods) == sorted(names) and names
    assert all(isinstance(m, kind) for m in mods.values())
    if isinstance(config, NVFP4Config):  # smoothing took statistics from the recorded calls
        assert all(m.smooth is not None for m in mods.values())
    # the report compares with the 16-bit model as it was: the same output error, recomputed
    after = _out(pipe.transformer, calls[1].kwargs)
    err = float((after - before).norm() / before.norm())
    assert rep["output"]["rel_err"] == pytest.approx(err, rel=1e-4)
    assert 0 < err < bound
    assert set(rep["layers"]) == set(names) and not rep["unreached"]
    summary = summarize_report(rep, worst=2)
    assert len(summary["worst_layers"]) == 2
    worst = max(v["rel_err"] for v in rep["layers"].values())
    assert summary["worst_layers"][0]["rel_err"] == worst


def test_sana_pipeline_calibrates_and_quantizes():
    from dcgen.pipelines import DCGenSanaPipeline

    from ..adapters.tiny import tiny_sana

    ae, model = tiny_dcae(), tiny_sana()
    adapter_for(model).replace_latent_layers(ae.latent_channels)
    pipe = DCGenSanaPipeline(model, ae, FlowMatchEulerDiscreteScheduler(shift=3.0))
    pipe.set_progress_bar_config(disable=True)
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0, 0.0]])  # padded caption: the mask is recorded too
    calls = capture_transformer_inputs(
        pipe, 2, SIZE, SIZE, prompt_embeds=torch.randn(1, 5, 32), prompt_attention_mask=mask
    )
    assert len(calls) == 2 and calls[0].kwargs["encoder_attention_mask"] is not None
    names, rep = quantize_transformer(pipe.transformer, FP8Config(), calls)
    assert names and set(rep["layers"]) == set(names)
    assert 0 < rep["output"]["rel_err"] < 0.1  # FP8 on 16-wide layers: a few % per layer


@pytest.mark.parametrize(
    "config",
    [
        NVFP4Config(mode="w4a4", rank=4, smoothing_alpha=0.5),
        FP8Config(include=(r"^single_transformer_blocks\.",)),
    ],
    ids=["nvfp4-svdquant", "fp8-single-blocks-only"],
)
def test_block_by_block_report_quantizes_as_the_whole_model_would(config, monkeypatch):
    """The report quantizes one block at a time (patterns on whole-model names, smoothing
    statistics from the 16-bit model): the same layers and weights as quantizing at once, and
    never a copy of more than one block."""
    import dcgen.quant.pipeline_quant as pq

    pipe = _pipe()
    calls = capture_transformer_inputs(pipe, 2, SIZE, SIZE, **_prompt())
    at_once = copy.deepcopy(pipe.transformer)
    quantize_transformer(at_once, config, calls, report=False)
    copied: list[str] = []
    real = copy.deepcopy
    spy = types.SimpleNamespace(deepcopy=lambda m: copied.append(type(m).__name__) or real(m))
    monkeypatch.setattr(pq, "copy", spy)
    names, rep = quantize_transformer(pipe.transformer, config, calls)
    assert names == sorted(quantized_modules(at_once))
    block_types = {type(b).__name__ for b in adapter_for(pipe.transformer).blocks()}
    assert copied and set(copied) <= block_types  # block copies only, never the transformer
    for key, value in at_once.state_dict().items():
        assert torch.equal(value, pipe.transformer.state_dict()[key]), key
    # a report entry for exactly the blocks that hold quantized layers
    holding = {b for b in rep["blocks"] if any(n.startswith(b + ".") for n in names)}
    assert holding == set(rep["blocks"])
    assert all(any(n.startswith(b + ".") for b in rep["blocks"]) for n in names)
    assert all(0 < v["rel_err"] < 0.5 and v["cosine"] > 0.9 for v in rep["blocks"].values())
    if isinstance(config, FP8Config):
        assert names and all(n.startswith("single_transformer_blocks.") for n in names)
        assert set(rep["blocks"]) == {"single_transformer_blocks.0"}


def test_quantize_transformer_bad_input():
    pipe = _pipe()
    smoothing = NVFP4Config(mode="w4a4", smoothing_alpha=0.5)
    with pytest.raises(ValueError, match="NVFP4 smoothing needs recorded transformer calls"):
        quantize_transformer(pipe.transformer, smoothing, None, report=False)
    with pytest.raises(ValueError, match="the quality report needs recorded transformer calls"):
        quantize_transformer(pipe.transformer, FP8Config(), [])
    with pytest.raises(ValueError, match="no linear matched"):
        quantize_transformer(pipe.transformer, FP8Config(include=("^nothing$",)), report=False)
    with pytest.raises(TypeError, match="expected an NVFP4Config or FP8Config, got dict"):
        quantize_transformer(pipe.transformer, {}, report=False)


def test_saved_checkpoint_reproduces_the_quantized_transformer(tmp_path):
    pipe = _pipe()
    calls = capture_transformer_inputs(pipe, 2, SIZE, SIZE, **_prompt())
    quantize_transformer(pipe.transformer, NVFP4Config(mode="w4a4", rank=4), calls, report=False)
    path = tmp_path / "q.safetensors"
    save_quantized(pipe.transformer, path)
    assert [p.name for p in tmp_path.iterdir()] == ["q.safetensors"]  # no temp file left
    fresh = _pipe().transformer  # the same random 16-bit weights, unquantized
    load_quantized(fresh, path)
    torch.testing.assert_close(
        _out(fresh, calls[0].kwargs), _out(pipe.transformer, calls[0].kwargs), rtol=0, atol=0
    )


def test_interrupted_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    import dcgen.quant.api as api

    model = tiny_flux()
    quantize_transformer(model, FP8Config(), report=False)
    path = tmp_path / "q.safetensors"
    save_quantized(model, path)
    old = path.read_bytes()

    def broken(tensors, filename, metadata=None):  # noqa: ANN001, ANN202
        Path(filename).write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(api, "save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        save_quantized(model, path)
    assert path.read_bytes() == old
    assert [p.name for p in tmp_path.iterdir()] == ["q.safetensors"]


# -- the commands ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("quant_pipe")
    pipe = _pipe()
    pipe.save_pretrained(root)
    save_file(_prompt(), str(root / "prompt.safetensors"))
    return root


def _quantize_argv(pipeline_dir, out, *extra: str) -> list[str]:
    return ["quantize", "--pipeline", str(pipeline_dir), "--out", str(out), "--height", str(SIZE),
            "--width", str(SIZE), "--calibration-steps", "2", "--device", "cpu", "--no-progress",
            *extra]  # fmt: skip


def test_quantize_command_then_generate(pipeline_dir, tmp_path, capsys):
    prompt = str(pipeline_dir / "prompt.safetensors")
    out = tmp_path / "nvfp4.safetensors"
    argv = _quantize_argv(pipeline_dir, out, "--format", "nvfp4-w4a4", "--rank", "4",
                          "--smoothing", "0.5", "--prompt-embeds", prompt)  # fmt: skip
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert f"wrote {out}" in printed and "relative error" in printed
    report = json.loads((tmp_path / "nvfp4.quality.json").read_text())
    assert report["format"] == "nvfp4-w4a4"
    assert 0 < report["summary"]["output"]["rel_err"] < 0.1
    assert report["summary"]["layers"] == len(report["report"]["layers"]) > 0
    # generate mounts the checkpoint on a freshly loaded pipeline
    gen = ["generate", "--pipeline", str(pipeline_dir), "--prompt-embeds", prompt, "--height",
           str(SIZE), "--width", str(SIZE), "--steps", "2", "--device", "cpu", "--no-progress"]  # fmt: skip
    assert main([*gen, "--quantized", str(out), "--out", str(tmp_path / "q.png")]) == 0
    n = report["summary"]["layers"]
    assert f"loaded {n} quantized linears" in capsys.readouterr().out
    assert main([*gen, "--out", str(tmp_path / "bf16.png")]) == 0
    q, ref = (_pixels(tmp_path / name) for name in ("q.png", "bf16.png"))
    assert q.shape == ref.shape == (SIZE, SIZE, 3)
    diff = (q - ref).abs().mean()
    assert 0 < diff < 8  # out of 255: the same image up to W4A4's error, but not identical


def test_quantize_command_without_report(pipeline_dir, tmp_path, capsys):
    out = tmp_path / "fp8.safetensors"
    assert main(_quantize_argv(pipeline_dir, out, "--format", "fp8-block128", "--no-report")) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fp8.safetensors"]
    fresh = DCGenFluxPipeline.from_pretrained(pipeline_dir).transformer
    names = load_quantized(fresh, out)
    mods = quantized_modules(fresh)
    assert sorted(mods) == sorted(names) and names
    assert all(isinstance(m, FP8Linear) and m.granularity == "block128" for m in mods.values())


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--format", "fp8-row", "--out-suffix", ".pt"], "expected a .safetensors file name"),
        (["--format", "fp8-row"], "--prompt-embeds FILE) is needed"),
        (
            ["--format", "nvfp4-w4a4", "--smoothing", "0.5", "--no-report"],
            "--prompt-embeds FILE) is needed",
        ),
        (["--format", "fp8-row", "--prompt", "a", "--prompt-embeds", "p"], "not both"),
        (["--format", "fp8-row", "--text-encoders", "d", "--no-report"], "go with --prompt TEXT"),
        (["--format", "fp8-row", "--rank", "4", "--no-report"], "--rank and --smoothing apply"),
        (
            ["--format", "nvfp4-w4a16", "--fast-accum", "--no-report"],
            "--fast-accum applies to fp8-row",
        ),
        (["--format", "fp8-row", "--report", "r.json", "--no-report"], "give one of them"),
        (
            ["--format", "nvfp4-w4a4", "--smoothing", "2", "--no-report"],
            "smoothing_alpha in [0, 1]",
        ),
        (["--format", "fp8-row", "--include", "(", "--no-report"], "invalid regex"),
        # the prompt was encoded for nothing
        (["--format", "fp8-row", "--prompt", "a", "--no-report"], "nothing uses them"),
    ],
)
def test_quantize_command_bad_input(pipeline_dir, tmp_path, capsys, extra, message):
    out = tmp_path / "q.safetensors"
    if "--out-suffix" in extra:
        i = extra.index("--out-suffix")
        out = tmp_path / f"q{extra[i + 1]}"
        extra = extra[:i] + extra[i + 2 :]
    assert main(_quantize_argv(pipeline_dir, out, *extra)) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "dcgen quantize: error:" in err
    assert message in err
    assert not out.exists()


def test_generate_quantized_missing_file(pipeline_dir, tmp_path, capsys):
    argv = ["generate", "--pipeline", str(pipeline_dir), "--prompt-embeds",
            str(pipeline_dir / "prompt.safetensors"), "--steps", "1", "--device", "cpu",
            "--quantized", str(tmp_path / "none.safetensors"), "--out", str(tmp_path / "x.png")]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "--quantized" in err and "no such file" in err and "Traceback" not in err


def test_quantize_checks_the_report_path_before_any_work(pipeline_dir, tmp_path, capsys):
    # --report equal to --out overwrote the checkpoint with the JSON and exited 0; a folder or
    # a path under a file failed after the whole run, leaving the checkpoint and a temp name
    out = tmp_path / "q.safetensors"
    prompt = str(pipeline_dir / "prompt.safetensors")
    (tmp_path / "a.png").write_bytes(b"x")
    for report, message in ((out, "expected another file than --out"),
                            (tmp_path, "expected a file path, it is a folder"),
                            (tmp_path / "a.png" / "r.json", "is a file, not a folder")):  # fmt: skip
        argv = _quantize_argv(pipeline_dir, out, "--format", "fp8-row", "--prompt-embeds", prompt,
                              "--report", str(report))  # fmt: skip
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert "Traceback" not in err and message in err, err
        assert not out.exists()
