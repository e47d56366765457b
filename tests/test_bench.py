"""dcgen.bench: the speed table harness (tiny CPU run, quick-mode arithmetic, inputs, CLI)."""

from __future__ import annotations

import copy
import json
import os

import pytest
import torch
from diffusers import FluxTransformer2DModel, SanaTransformer2DModel
from PIL import Image

from dcgen.adapters import adapter_for
from dcgen.bench import (
    BenchSettings,
    dcae_preset_for,
    extrapolate_denoise,
    run_speed_bench,
    token_counts,
    write_report,
)
from dcgen.bench.report import COLUMNS, best_against_best, format_markdown
from dcgen.bench.speed import MODELS, SpeedBench, attention_label, dcae_factor
from dcgen.cli import BENCH_MODELS, main
from dcgen.pipelines import DCGenSanaPipeline
from dcgen.quant import quantized_modules
from tests.conftest import benchmark_script


class FakeClock:
    """Every mark is 1 ms after the previous one: each interval = marks between its ends."""

    def __init__(self) -> None:
        self.now = 0.0

    def mark(self) -> float:
        self.now += 1.0
        return self.now

    def sync(self) -> None:
        pass

    def elapsed_ms(self, start: float, end: float) -> float:
        return end - start


@pytest.fixture(scope="module")
def quick_report():
    settings = BenchSettings(model="tiny", resolutions=(64, 128), steps=20, quick=True, batch=2)
    return run_speed_bench(settings, clock=FakeClock())


def test_tiny_run_writes_table_json_png(tmp_path):
    report = run_speed_bench(BenchSettings(model="tiny", steps=2, resolutions=(64, 128)))
    paths = write_report(report, tmp_path)
    data = json.loads(paths["json"].read_text())
    assert [r["resolution"] for r in data["rows"]] == [64, 128]
    for r in data["rows"]:
        assert r["mode"] == "measured"
        for key in ("base", "dcgen"):
            part = r[key]
            assert part["measured_steps"] == 2
            assert part["total_ms"] == pytest.approx(part["denoise_ms"] + part["decode_ms"])
            assert part["denoise_ms"] > 0 and part["decode_ms"] > 0
        assert r["speedup"] == pytest.approx(r["base"]["total_ms"] / r["dcgen"]["total_ms"])
    md = paths["md"].read_text()
    assert "| 64px | 16 / 4 | f32c32-sana-1.1 | kernels |" in md
    assert "| 128px | 64 / 4 | f64c128-in-1.0 | kernels |" in md
    assert md.count("| measured |") == 2
    with Image.open(paths["png"]) as im:
        assert im.size[0] > 100 and im.size[1] > 100


def test_the_json_report_is_strict_json_with_non_finite_numbers(quick_report, tmp_path):
    # a row can carry a non-finite number (a ratio to a part that took no measurable time, a
    # quality error from an overflowing output): speed.json writes null, not NaN / Infinity
    report = copy.deepcopy(quick_report)
    report["rows"][0]["speedup"] = float("inf")
    report["rows"][1]["base"]["decode_ms"] = float("nan")
    paths = write_report(report, tmp_path, chart=False)

    def refuse(token: str) -> None:
        raise AssertionError(f"speed.json holds {token}, which is not JSON")

    data = json.loads(paths["json"].read_text(), parse_constant=refuse)
    assert data["rows"][0]["speedup"] is None and data["rows"][1]["base"]["decode_ms"] is None
    assert data["rows"][0]["resolution"] == quick_report["rows"][0]["resolution"]


def test_step_split_counts_the_call_overhead_once():
    from dcgen.bench.timing import split_step_time

    # a 2-step call of 30 ms whose transformer calls began at 8 and 18 ms: 10 ms a step, and
    # 10 ms of the call is fixed (latents, timesteps, the last step's scheduler update)
    assert split_step_time(30.0, [8.0, 18.0], 2) == pytest.approx((10.0, 10.0))
    # two transformer calls a step (unbatched guidance): the step is first call to first call
    assert split_step_time(50.0, [5.0, 12.0, 25.0, 32.0, 45.0, 52.0], 3) == pytest.approx(
        (20.0, 0.0)
    )
    assert split_step_time(30.0, [8.0], 1) is None  # one step: nothing to split
    assert split_step_time(30.0, [8.0, 12.0, 18.0], 2) is None  # uneven calls per step
    assert extrapolate_denoise(10.0, (2.0,), (1,), (3,), 4, fixed_ms=7.0) == pytest.approx(
        7.0 + (10.0 + 2 * 2.0) * 4
    )


def test_extrapolation_arithmetic():
    # 2 measured steps of a 1+1-block model; full depth 19 + 38 and 20 steps.
    got = extrapolate_denoise(10.0, (2.0, 1.5), (1, 1), (19, 38), 20)
    assert got == pytest.approx((10.0 + 18 * 2.0 + 37 * 1.5) * 20)
    assert extrapolate_denoise(5.0, (9.0, 9.0), (2, 2), (2, 2), 3) == pytest.approx(15.0)
    # SANA: one block list; under CFG each block runs twice a step.
    assert extrapolate_denoise(4.0, (3.0,), (1,), (20,), 20) == pytest.approx((4.0 + 19 * 3.0) * 20)
    got = extrapolate_denoise(4.0, (3.0,), (1,), (20,), 20, calls_per_step=2)
    assert got == pytest.approx((4.0 + 2 * 19 * 3.0) * 20)
    with pytest.raises(ValueError, match="calls_per_step: expected a positive int, got 0"):
        extrapolate_denoise(1.0, (1.0,), (1,), (2,), 1, calls_per_step=0)
    with pytest.raises(ValueError, match="exceed"):
        extrapolate_denoise(1.0, (1.0, 1.0), (3, 1), (2, 2), 1)
    with pytest.raises(ValueError, match="one block time and count per block list"):
        extrapolate_denoise(1.0, (1.0,), (1, 1), (2, 2), 1)


def test_quick_mode_with_fake_clock(quick_report):
    rows = quick_report["rows"]
    assert [r["mode"] for r in rows] == ["extrapolated", "extrapolated"]
    full_d, full_s = MODELS["tiny"].depth
    for r in rows:
        for key in ("base", "dcgen", "base_batch", "dcgen_batch"):
            part = r[key]
            # Every block interval is exactly 1 fake ms (two adjacent marks).
            assert part["double_block_ms"] == 1.0 and part["single_block_ms"] == 1.0
            assert part["measured_steps"] == 2
            step, fixed = part["measured_step_ms"], part["fixed_ms"]
            # fake marks: a step from one transformer call to the next spans the call's own
            # mark, the step's two block pairs and nothing else, so 5 fake ms; the rest of the
            # 2-step call is fixed cost, counted once
            assert step == pytest.approx(5.0) and fixed >= 0
            expected = fixed + (step + (full_d - 1) * 1.0 + (full_s - 1) * 1.0) * 20
            assert part["denoise_ms"] == pytest.approx(expected)
            assert part["total_ms"] == pytest.approx(expected + part["decode_ms"])
        tput = r["dcgen_batch"]["images_per_s"] / r["base_batch"]["images_per_s"]
        assert r["throughput_speedup"] == pytest.approx(tput)
        assert r["base_batch"]["images_per_s"] == pytest.approx(
            2 / (r["base_batch"]["total_ms"] / 1e3)
        )
    assert "x 20 steps" in quick_report["method"]


@pytest.mark.parametrize(
    ("resolution", "base", "dcgen_f32", "dcgen_f64"),
    [(1024, 4096, 1024, 256), (2048, 16384, 4096, 1024), (4096, 65536, 16384, 4096)],
)
def test_token_counts(resolution, base, dcgen_f32, dcgen_f64):
    assert token_counts(resolution, 32) == (base, dcgen_f32)
    assert token_counts(resolution, 64) == (base, dcgen_f64)


def test_paper_autoencoder_choice():
    flux = MODELS["flux"]
    assert dcae_factor(dcae_preset_for(flux, 1024)) == 32
    assert dcae_factor(dcae_preset_for(flux, 2048)) == 64
    assert dcae_factor(dcae_preset_for(flux, 4096)) == 64
    # 4K DC-Gen-f64 has the token count of base FLUX at 1K (docs/method.md section 1).
    assert token_counts(4096, 64)[1] == token_counts(1024, 64)[0] == 4096


def test_bad_inputs_have_clear_errors():
    with pytest.raises(ValueError, match="multiple of 64"):
        BenchSettings(model="flux", resolutions=(2000,)).resolved()
    with pytest.raises(ValueError, match="multiple of 32"):
        BenchSettings(model="flux", resolutions=(1000,)).resolved()
    with pytest.raises(ValueError, match="unknown model 'sana-9b'"):
        BenchSettings(model="sana-9b").resolved()
    with pytest.raises(ValueError, match="steps"):
        BenchSettings(model="tiny", steps=0).resolved()
    # inf passed, then every row failed in the pipeline after the models were built
    for cfg in (float("inf"), float("nan"), 0.5):
        with pytest.raises(ValueError, match="cfg: expected a finite number >= 1"):
            BenchSettings(model="tiny", cfg=cfg).resolved()
    with pytest.raises(ValueError, match="attention"):
        BenchSettings(model="tiny", attention="xformers").resolved()
    with pytest.raises(ValueError, match="quick_blocks"):
        BenchSettings(model="tiny", quick=True, quick_blocks=3).resolved()
    # SANA: base f32 (side 32) and DC-Gen f64 at every size -> multiples of 64.
    with pytest.raises(ValueError, match="multiple of 64"):
        BenchSettings(model="sana-1.6b", resolutions=(1056,)).resolved()
    with pytest.raises(ValueError, match="positive int"):
        BenchSettings(model="tiny", resolutions=(0,)).resolved()
    with pytest.raises(ValueError, match="each size once"):
        BenchSettings(model="tiny", resolutions=(64, 64)).resolved()
    with pytest.raises(ValueError, match="variants: expected names from"):
        BenchSettings(model="tiny", variants="stock,turbo").resolved()
    with pytest.raises(ValueError, match="each name once"):
        BenchSettings(model="tiny", attention="flash,flash").resolved()
    with pytest.raises(ValueError, match="fp8_granularity"):
        BenchSettings(model="tiny", fp8=True, fp8_granularity="tensor").resolved()
    with pytest.raises(ValueError, match="fp8_fast_accum: expected fp8_granularity 'row'"):
        BenchSettings(
            model="tiny", fp8=True, fp8_granularity="block128", fp8_fast_accum=True
        ).resolved()
    with pytest.raises(ValueError, match="fp8_fast_accum: expected a bool"):
        BenchSettings(model="tiny", fp8=True, fp8_fast_accum="yes").resolved()
    with pytest.raises(ValueError, match=r"nvfp4: expected names from \('w4a4', 'w4a16'\)"):
        BenchSettings(model="tiny", nvfp4="w4a8").resolved()
    with pytest.raises(ValueError, match="nvfp4_rank: expected an int >= 0, got -1"):
        BenchSettings(model="tiny", nvfp4="w4a4", nvfp4_rank=-1).resolved()
    with pytest.raises(ValueError, match="quick_blocks 3 exceeds"):
        BenchSettings(model="tiny-sana", quick=True, quick_blocks=3).resolved()
    with pytest.raises(
        ValueError, match=r"cfg: expected a finite number >= 1 \(1 = off\), got 0.5"
    ):
        BenchSettings(model="tiny", cfg=0.5).resolved()
    assert BenchSettings(model="tiny").resolved().cfg == 1.0  # FLUX.1-dev: guidance embedding


def test_pipelines_switch_latent_layers():
    bench = SpeedBench(BenchSettings(model="tiny", quick=True))
    assert bench.pipeline("baseline", 64).adapter.patch_size == 2
    dc = bench.pipeline("dcgen", 128)
    assert dc.adapter.patch_size == 1
    assert dc.adapter.latent_channels == dc.vae.latent_channels
    assert bench.pipeline("baseline", 64).adapter.latent_channels == 16
    with pytest.raises(ValueError, match="impl"):
        bench.pipeline("other", 64)
    bench.close()


def test_peak_memory_leaves_out_the_weights_a_row_does_not_use():
    # Resident beside a row's pipeline: the other resolutions' autoencoders (and under a
    # quantized row the bf16 blocks); counted, they made a row's peak depend on the rows
    # before it. _unused_bytes is what measure() takes off the allocator's peak on CUDA.
    from dcgen.bench.quantized import module_bytes

    bench = SpeedBench(BenchSettings(model="tiny", quick=True, resolutions=(64, 128)))
    base = bench.pipeline("baseline", 64)
    assert bench._unused_bytes(base) == 0  # nothing else built yet
    dc_f32 = bench.pipeline("dcgen", 64)  # tiny: f32c32 up to 64 px, f64c128 above
    dc_f64 = bench.pipeline("dcgen", 128)
    assert dc_f32.vae is not dc_f64.vae
    ae_bytes = {id(ae): module_bytes(ae) for ae in (bench.vae, dc_f32.vae, dc_f64.vae)}
    assert bench._unused_bytes(dc_f64) == ae_bytes[id(bench.vae)] + ae_bytes[id(dc_f32.vae)]
    assert (
        bench._unused_bytes(bench.pipeline("baseline", 128))
        == sum(ae_bytes.values()) - (ae_bytes[id(bench.vae)])
    )
    bench.build_quant("fp8")
    quant = bench.pipeline("dcgen", 128, "fp8")
    blocks = sum(module_bytes(getattr(bench.transformer, a)) for _, a, _ in bench.spec.blocks)
    assert bench._unused_bytes(quant) == blocks + ae_bytes[id(bench.vae)] + ae_bytes[id(dc_f32.vae)]
    bench.close()


def test_cuda_clock_marks_and_waits_on_its_device(monkeypatch):
    # The bench's device's stream, not the current device's (cuda:0 unless set): a row on
    # cuda:1 was timed by events on cuda:0's idle stream. Spied: no GPU needed.
    from dcgen.bench import CudaClock

    streams, syncs, recorded = [], [], []
    monkeypatch.setattr(torch.cuda, "current_stream", lambda d=None: streams.append(d) or f"s{d}")
    monkeypatch.setattr(torch.cuda, "synchronize", lambda d=None: syncs.append(d))

    class Event:
        def __init__(self, enable_timing: bool) -> None:
            pass

        def record(self, stream=None):  # noqa: ANN001, ANN202
            recorded.append(stream)

    monkeypatch.setattr(torch.cuda, "Event", Event)
    clock = CudaClock("cuda:1")
    clock.mark()
    clock.sync()
    assert streams == [torch.device("cuda:1")] and recorded == ["scuda:1"]
    assert syncs == [torch.device("cuda:1")]


def test_quick_method_states_the_one_step_fallback():
    from dcgen.bench.speed import _method

    bench = SpeedBench(BenchSettings(model="tiny", quick=True))
    two = _method(bench.settings, bench.spec, bench.measured_blocks)
    one = _method(
        BenchSettings(model="tiny", quick=True, quick_steps=1).resolved(),
        bench.spec, bench.measured_blocks,
    )  # fmt: skip
    assert "the call's fixed time +" in two and "counted in every step" not in two
    assert "counted in every step" in one and "the call's fixed time +" not in one
    bench.close()


def test_cli_bench(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["bench", "--help"])
    assert exc.value.code == 0
    assert "--quick" in capsys.readouterr().out
    out = tmp_path / "b"
    args = ["bench", "--model", "tiny", "--resolutions", "64", "--quick", "--out", str(out)]
    assert main([*args, "--device", "cpu", "--steps", "4"]) == 0
    assert "| 64px |" in capsys.readouterr().out
    for name in ("speed.md", "speed.json", "speed.png"):
        assert (out / name).exists()
    assert main(["bench", "--model", "tiny", "--resolutions", "96"]) == 2
    assert "multiple of 64" in capsys.readouterr().err


def test_a_failing_row_is_recorded_and_the_table_goes_on(tmp_path, monkeypatch, capsys):
    # One configuration raising (as the 2026-11-26 GPU run's first flash row did) must not lose
    # the rows before and after it; the CLI rewrites the report after every row and exits 1.
    measure = SpeedBench.measure

    def flaky(self, impl, resolution, *args, **kwargs):
        if resolution == 128 and impl == "dcgen":
            raise RuntimeError("No available kernel.  Aborting execution.\nmore detail")
        return measure(self, impl, resolution, *args, **kwargs)

    monkeypatch.setattr(SpeedBench, "measure", flaky)
    written = []
    real_write = write_report
    monkeypatch.setattr(
        "dcgen.bench.write_report",
        lambda report, out, chart=True: (
            written.append(len(report["rows"])) or real_write(report, out, chart)
        ),
    )
    out = tmp_path / "b"
    args = ["bench", "--model", "tiny", "--resolutions", "64,128,192", "--quick", "--steps", "2"]
    assert main([*args, "--device", "cpu", "--out", str(out)]) == 1
    report = json.loads((out / "speed.json").read_text())
    assert [r["resolution"] for r in report["rows"]] == [64, 192]
    assert report["errors"] == [
        {"resolution": 128, "attention": "default", "variant": "kernels",
         "precision": report["rows"][0]["precision"],
         "error": "RuntimeError: No available kernel.  Aborting execution."}
    ]  # fmt: skip
    assert written == [1, 1, 2, 2]  # after each of the 3 rows, then the final report
    md = (out / "speed.md").read_text()
    assert "Rows that failed" in md and "resolution 128" in md
    assert "1 row(s) failed" in capsys.readouterr().out


def test_fp8_quantize_failure_keeps_the_bf16_table(monkeypatch):
    monkeypatch.setattr(
        SpeedBench, "build_quant", lambda self, precision: (_ for _ in ()).throw(MemoryError())
    )
    settings = BenchSettings(model="tiny", resolutions=(64,), steps=2, quick=True, fp8=True)
    report = run_speed_bench(settings, clock=FakeClock())
    assert [r["precision"] for r in report["rows"]] == [report["rows"][0]["precision"]]
    assert report["errors"][0]["precision"] == "fp8"
    assert report["errors"][0]["error"].startswith("MemoryError")


# -- SANA ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "billions", "width"),
    [("sana-1.6b", 1.6, 2240), ("sana-4.8b", 4.8, 2240), ("flux", 11.9, 3072)],
)
def test_full_size_configs_have_the_published_sizes(name, billions, width):
    """The configs build (on the meta device: no memory) to the published parameter counts."""
    spec = MODELS[name]
    cls = FluxTransformer2DModel if spec.family == "flux" else SanaTransformer2DModel
    with torch.device("meta"):
        model = cls(**spec.transformer)
    params = sum(p.numel() for p in model.parameters()) / 1e9
    assert params == pytest.approx(billions, rel=0.06)
    assert adapter_for(model).inner_dim == width


def test_sana_specs():
    for name in ("sana-1.6b", "sana-4.8b"):
        spec = MODELS[name]
        assert spec.text_tokens == 300 and spec.text_dim == 2304  # Gemma-2 2B, 300 tokens
        assert spec.base_side == 32 and spec.base_latent_channels == 32
        assert spec.depth == ((20,) if name == "sana-1.6b" else (60,))
        # DC-Gen-SANA moves f32c32 -> f64c128 at every resolution.
        for r in (1024, 2048, 4096):
            assert dcae_preset_for(spec, r) == "dc-ae-f64c128-in-1.0"
    assert token_counts(4096, 64, MODELS["sana-1.6b"].base_side) == (16384, 4096)


@pytest.mark.parametrize(
    "cfg,one_batch,calls,batch", [(None, True, 1, 2), (None, False, 2, 1), (1.0, True, 1, 1)]
)
def test_sana_quick_mode_single_block_list(cfg, one_batch, calls, batch, monkeypatch):
    """SANA samples with CFG 4.5 by default: both predictions in one call of batch 2 (or, with
    cfg_in_one_batch off, two calls a step, both counted by the extrapolation)."""
    from dcgen.pipelines.base import FlowTextToImagePipeline

    monkeypatch.setattr(FlowTextToImagePipeline, "cfg_in_one_batch", one_batch)
    settings = BenchSettings(model="tiny-sana", resolutions=(64, 128), steps=20, quick=True,
                             cfg=cfg)  # fmt: skip
    bench = SpeedBench(settings, clock=FakeClock())
    seen = []
    hook = bench.transformer.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["hidden_states"].shape[0]),
        with_kwargs=True,
    )
    bench.measure("dcgen", 64, 1)
    hook.remove()
    assert seen == [batch] * calls * (2 + 2)  # a 2-step warm-up, one timed run of 2 steps
    assert bench.calls_per_step == calls
    assert ("negative_prompt_embeds" in bench.text(1)) == (cfg is None)
    report = run_speed_bench(settings, clock=FakeClock())
    (full,) = MODELS["tiny-sana"].depth
    assert report["settings"]["cfg"] == (4.5 if cfg is None else cfg)
    how = "in one batch" if one_batch else "as two transformer calls"
    guidance = f"guidance 4.5 (negative and positive prompt {how})"
    assert (guidance if cfg is None else "no classifier-free") in format_markdown(report)
    assert report["cfg_in_one_batch"] is one_batch
    assert report["model"]["family"] == "sana"
    assert "sana-block time" in report["method"]
    for r in report["rows"]:
        assert r["dcae"] == "dc-ae-f64c128-in-1.0"
        assert r["base_ae"].startswith("DC-AE f32c32")
        assert r["base_tokens"] == (r["resolution"] // 32) ** 2
        assert r["dcgen_tokens"] == (r["resolution"] // 64) ** 2
        for key in ("base", "dcgen"):
            part = r[key]
            assert part["sana_block_ms"] == 1.0 and "double_block_ms" not in part
            extra = calls * (full - 1) * 1.0
            expected = part["fixed_ms"] + (part["measured_step_ms"] + extra) * 20
            assert part["denoise_ms"] == pytest.approx(expected)


def test_sana_pipelines_switch_latent_layers():
    bench = SpeedBench(BenchSettings(model="tiny-sana", quick=True))
    base = bench.pipeline("baseline", 64)
    assert isinstance(base, DCGenSanaPipeline)
    assert (base.adapter.latent_channels, base.adapter.patch_size) == (2, 1)
    assert base.vae.spatial_compression_ratio == 32
    dc = bench.pipeline("dcgen", 64)
    assert dc.vae.spatial_compression_ratio == 64
    assert dc.adapter.latent_channels == dc.vae.latent_channels == 8
    text = bench.text(2)
    assert text["prompt_embeds"].shape == (2, 8, 32)
    assert text["prompt_attention_mask"].shape == (2, 8)
    assert "pooled_prompt_embeds" not in text
    bench.close()


# -- variants, attention backends, FP8 -----------------------------------------------------------


@pytest.fixture(scope="module")
def variant_report():
    settings = BenchSettings(
        model="tiny", resolutions=(64,), steps=2, quick=True, variants="stock,kernels",
        attention="default,math", fp8=True,
    )  # fmt: skip
    return run_speed_bench(settings, clock=FakeClock())


def test_variants_and_backends_each_get_rows(variant_report):
    rows = variant_report["rows"]
    got = [(r["attention"], r["variant"], r["precision"]) for r in rows]
    assert got == [
        ("default", "stock", "fp32"), ("default", "kernels", "fp32"), ("default", "kernels", "fp8"),
        ("math", "stock", "fp32"), ("math", "kernels", "fp32"), ("math", "kernels", "fp8"),
    ]  # fmt: skip
    for r in rows:
        for key in ("base", "dcgen"):
            used = r[key]["attention_used"]
            if r["variant"] == "stock":
                assert used == f"sdpa-{r['attention']}"
            else:  # dcgen's fused processors were installed (CPU: no kernel, fp32 reference)
                assert used == "dcgen-fused -> fp32 reference"
            # the backend torch's SDPA dispatch picked for the transformer's calls: the forced
            # one, or for "default" whatever torch chose (recorded, not assumed)
            chosen = r[key]["sdpa_chosen"]
            assert chosen and "unknown" not in chosen
            if r["attention"] == "math":
                assert chosen == ["math"]
    assert os.environ.get("DCGEN_DISABLE_KERNELS") is None  # restored after the stock rows


def test_fp8_rows_carry_quality_and_the_bf16_base(variant_report):
    rows = variant_report["rows"]
    for fp8 in (r for r in rows if r["precision"] == "fp8"):
        ref = next(
            r for r in rows
            if r["precision"] != "fp8" and r["variant"] == "kernels"
            and r["attention"] == fp8["attention"]
        )  # fmt: skip
        assert fp8["base"] == ref["base"] and fp8["base_from_row"]
        q = fp8["quality"]
        # 1 double + 1 single FLUX block: 10 + 4 block linears (norm linears stay 16-bit)
        assert q["linears"] == q["layers"] > 0
        assert 0.0 < q["rel_err"] < 0.1 and 0.99 < q["cosine"] <= 1.0 + 1e-6
        assert q["granularity"] == "row" and q["worst_layer"].startswith(
            ("transformer_blocks.", "single_transformer_blocks.")
        )
        assert fp8["speedup"] == pytest.approx(fp8["base"]["total_ms"] / fp8["dcgen"]["total_ms"])
    for r in rows:
        if r["precision"] != "fp8":
            assert r["quality"] is None


def test_fp8_blocks_are_copies_on_a_view():
    bench = SpeedBench(BenchSettings(model="tiny", quick=True))
    bench.pipeline("dcgen", 64)
    with pytest.raises(ValueError, match=r"call build_quant\('fp8'\) first"):
        bench.transformer_for("fp8")
    fp8 = bench.build_quant("fp8")
    view = bench.transformer_for("fp8")
    t = bench.transformer
    # The bf16 model is untouched; the view shares every non-block module.
    assert not quantized_modules(t)
    names = set(quantized_modules(view))
    assert len(names) == fp8.linears
    assert "single_transformer_blocks.0.proj_out" in names  # a block's own output linear
    assert not any(n.startswith(("x_embedder", "proj_out", "norm_out")) for n in names)
    assert view.x_embedder is t.x_embedder and view.proj_out is t.proj_out
    assert view.transformer_blocks is not t.transformer_blocks
    # A later latent-layer swap on the bf16 model reaches a freshly made view.
    dc = bench.pipeline("baseline", 64, precision="fp8")
    assert dc.transformer.x_embedder is t.x_embedder and dc.adapter.patch_size == 2
    with pytest.raises(ValueError, match="precision"):
        bench.transformer_for("int4")
    bench.close()


@pytest.fixture(scope="module")
def nvfp4_report():
    settings = BenchSettings(
        model="tiny", resolutions=(64,), steps=2, quick=True, variants="kernels", fp8=True,
        nvfp4="w4a4,w4a16", nvfp4_rank=4, warmup=0,
    )  # fmt: skip
    return run_speed_bench(settings, clock=FakeClock())


def test_nvfp4_rows_follow_the_fp8_row_with_their_quality(nvfp4_report):
    rows = nvfp4_report["rows"]
    assert [r["precision"] for r in rows] == ["fp32", "fp8", "nvfp4-w4a4", "nvfp4-w4a16"]
    ref, fp8, w4a4, w4a16 = rows
    for r in (fp8, w4a4, w4a16):
        assert r["base"] == ref["base"] and r["base_from_row"] and r["base_precision"] == "fp32"
        assert r["speedup"] == pytest.approx(r["base"]["total_ms"] / r["dcgen"]["total_ms"])
        q = r["quality"]
        assert q["linears"] == q["layers"] > 0 and 0.0 < q["rel_err"] < 0.1
    # Coarser formats err more on the same batch: E2M1 keeps 1 mantissa bit to E4M3's 3, and
    # W4A4 adds the activation's rounding to W4A16's weight rounding.
    assert fp8["quality"]["rel_err"] < w4a4["quality"]["rel_err"]
    assert w4a16["quality"]["rel_err"] < w4a4["quality"]["rel_err"]
    for r in (w4a4, w4a16):  # what ran, in the report (CPU: no NVFP4 kernel)
        assert r["quality"]["rank"] == 4 and r["quality"]["gemm"] == "PyTorch reference"
    assert fp8["quality"]["granularity"] == "row" and "rank" not in fp8["quality"]
    md = format_markdown(nvfp4_report)
    assert "Low-precision rows (fp8, nvfp4-w4a4, nvfp4-w4a16)" in md
    assert "NVFP4 GEMMs ran on: PyTorch reference." in md
    assert "NVFP4 W4A4, rank-4 16-bit branch" in nvfp4_report["method"]


def test_block_weights_are_reported_at_full_depth(nvfp4_report):
    # The quick model holds 1 of the tiny model's 2 blocks per list: the column doubles what
    # is resident. fp32 rows count the fp32 blocks, quantized rows their own blocks.
    bench = SpeedBench(BenchSettings(model="tiny", quick=True))
    t = bench.transformer
    per_block = sum(p.numel() for p in t.transformer_blocks.parameters()) + sum(
        p.numel() for p in t.single_transformer_blocks.parameters()
    )
    ref, fp8, w4a4, w4a16 = nvfp4_report["rows"]
    assert ref["block_weights_gb"] == pytest.approx(2 * 4 * per_block / 1e9)
    # Norms, biases and the rank-4 branch keep NVFP4 above 4.5 / 32 of fp32; in this fp32 model
    # they are fp32 (quantize_ keeps the model's dtype), which puts the tiny blocks near 0.54
    assert w4a4["block_weights_gb"] == w4a16["block_weights_gb"]
    assert 4.5 / 32 < w4a4["block_weights_gb"] / ref["block_weights_gb"] < 0.6
    # (NVFP4 against FP8 is no order here: the fp32 rank-4 branch outweighs 32-wide weights)
    assert max(w4a4["block_weights_gb"], fp8["block_weights_gb"]) < ref["block_weights_gb"]
    bench.close()


def test_one_quantized_set_is_resident_at_a_time():
    bench = SpeedBench(BenchSettings(model="tiny", quick=True, nvfp4="w4a16"))
    bench.pipeline("dcgen", 64)
    first = bench.build_quant("fp8")
    assert bench.build_quant("fp8") is first  # built once
    nv = bench.build_quant("nvfp4-w4a16")
    assert bench.quant is nv and nv.config.mode == "w4a16"
    with pytest.raises(ValueError, match=r"call build_quant\('fp8'\) first"):
        bench.transformer_for("fp8")
    names = quantized_modules(bench.transformer_for("nvfp4-w4a16"))
    assert len(names) == nv.linears and not quantized_modules(bench.transformer)
    with pytest.raises(ValueError, match="precision: expected one of"):
        bench.build_quant("nvfp4-w8a8")
    bench.drop_quant()
    assert bench.quant is None
    bench.close()


def test_report_fields(variant_report, tmp_path):
    paths = write_report(variant_report, tmp_path)
    md = paths["md"].read_text()
    header = next(line for line in md.splitlines() if line.startswith("| resolution"))
    assert [c.strip() for c in header.strip("|").split("|")] == list(COLUMNS)
    table = md.split("Best against best")[0]
    body = [line for line in table.splitlines() if line.startswith("| 64px")]
    assert len(body) == len(variant_report["rows"]) == 6
    assert all(len(line.strip("|").split("|")) == len(COLUMNS) for line in body)
    fp8_lines = [line for line in body if "| fp8 |" in line]
    assert len(fp8_lines) == 2 and all(" / 0.99" in line or " / 1.0" in line for line in fp8_lines)
    assert "Low-precision rows (fp8)" in md and "sdpa-math" in md and "Best against best" in md
    assert "| 64px | " in md.split("Best against best")[1]
    data = json.loads(paths["json"].read_text())
    assert {"settings", "model", "device", "torch", "method", "timer", "rows", "summary"} <= set(
        data
    )
    assert data["summary"] == best_against_best(data["rows"])
    assert data["settings"]["variants"] == ["stock", "kernels"]
    assert data["settings"]["attention"] == ["default", "math"]
    row_keys = {"resolution", "dcae", "base_ae", "base_tokens", "dcgen_tokens", "mode",
                "attention", "variant", "precision", "quality", "base", "dcgen", "speedup",
                "throughput_speedup"}  # fmt: skip
    assert all(row_keys <= set(r) for r in data["rows"])
    with Image.open(paths["png"]) as im:
        assert im.size[0] >= 70 + 110 * 6  # one bar group per row


def test_cli_bench_models_match_the_registry():
    assert tuple(sorted(MODELS)) == tuple(sorted(BENCH_MODELS))


def test_cli_bench_sana_variants_fp8(tmp_path, capsys):
    out = tmp_path / "s"
    args = ["bench", "--model", "tiny-sana", "--resolutions", "64", "--quick", "--steps", "2",
            "--variants", "stock,kernels", "--attention", "default,flash", "--fp8",
            "--fp8-fast-accum", "--device", "cpu", "--out", str(out)]  # fmt: skip
    assert main(args) == 0
    printed = capsys.readouterr().out
    table = printed.split("Best against best")[0]
    assert table.count("| 64px |") == 6  # 2 backends x (stock, kernels, kernels fp8)
    assert "sdpa-flash / sdpa-flash" in printed
    data = json.loads((out / "speed.json").read_text())
    assert data["model"]["name"] == "tiny-sana"
    quality = [r["quality"] for r in data["rows"] if r["quality"] is not None]
    assert len(quality) == 2 and all(q["fast_accum"] for q in quality)
    assert "fast accumulation" in data["method"]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--variants", "stock", "--no-kernels"], "--no-kernels is --variants stock"),
        (["--variants", "fast"], "variants: expected names from"),
        (["--attention", "flash,sage"], "attention: expected names from"),
        (["--resolutions", "64,x"], "comma-separated integers"),
        (["--model", "tiny-sana", "--resolutions", "96"], "multiple of 64"),
    ],
)
def test_cli_bench_bad_input(extra, message, capsys):
    args = ["bench", "--model", "tiny", "--resolutions", "64", "--device", "cpu"]
    assert main([*args, *extra]) == 2
    assert message in capsys.readouterr().err


def test_cli_bench_unknown_model(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["bench", "--model", "sana-9b"])
    assert exc.value.code == 2
    assert "invalid choice: 'sana-9b'" in capsys.readouterr().err


def _row(res, variant, attention, precision, base_ms, dcgen_ms):
    part = lambda ms: {"total_ms": ms, "attention_used": f"sdpa-{attention}"}  # noqa: E731
    return {
        "resolution": res, "variant": variant, "attention": attention, "precision": precision,
        "base": part(base_ms), "dcgen": part(dcgen_ms), "speedup": base_ms / dcgen_ms,
    }  # fmt: skip


def test_best_against_best():
    rows = [
        _row(1024, "stock", "flash", "bf16", 100.0, 10.0),
        _row(1024, "kernels", "default", "bf16", 80.0, 8.0),
        _row(1024, "kernels", "default", "fp8", 80.0, 5.0),
        _row(4096, "kernels", "default", "bf16", 900.0, 20.0),
    ]
    first, second = best_against_best(rows)
    assert first["resolution"] == 1024 and first["base_ms"] == 80.0
    assert first["speedup"] == pytest.approx(10.0)  # 80 / 8: FP8 not in the same-dtype ratio
    assert first["speedup_any"] == pytest.approx(16.0)  # 80 / 5 with the FP8 row
    assert first["dcgen_any_config"] == "kernels, sdpa-default, fp8"
    assert first["paper_setting_speedup"] == pytest.approx(10.0)  # the stock + flash row
    assert second["speedup"] == pytest.approx(45.0) and second["paper_setting_speedup"] is None


def test_attention_label_reports_the_flash_kernel(monkeypatch):
    """With a compiled fused-attention kernel, FLUX (head dim 128) runs dcgen's flash kernel on
    every attention module; SANA's 112-wide cross-attention heads fall back."""
    import dcgen.ops._extension as ext
    from dcgen import accelerate

    monkeypatch.setattr(ext, "has_kernel", lambda name, device: name == "fused_attention")
    monkeypatch.setenv("DCGEN_ATTENTION_KERNEL", "flash")
    cpu = torch.device("cpu")
    with torch.device("meta"):
        flux = FluxTransformer2DModel(**dict(MODELS["flux"].transformer, num_layers=1,
                                             num_single_layers=1))  # fmt: skip
        sana = SanaTransformer2DModel(**dict(MODELS["sana-1.6b"].transformer, num_layers=1))
    assert attention_label(flux, "flash", False, cpu, torch.bfloat16) == "sdpa-flash"
    assert attention_label(flux, "flash", True, cpu, torch.bfloat16) == "sdpa-flash"  # none fused
    accelerate(flux)
    accelerate(sana)
    assert attention_label(flux, "default", True, cpu, torch.bfloat16) == "dcgen-flash"
    assert attention_label(flux, "default", True, cpu, torch.float32) == (
        "dcgen-fused -> fp32 reference"
    )
    assert attention_label(sana, "default", True, cpu, torch.bfloat16) == (
        "dcgen-fused -> fp32 reference"
    )
    # the default policy: the qk_norm_rope kernel, then SDPA (dcgen.ops.attention: why)
    monkeypatch.delenv("DCGEN_ATTENTION_KERNEL")
    assert attention_label(flux, "flash", True, cpu, torch.bfloat16) == (
        "dcgen qk_norm_rope + sdpa-flash"
    )


def test_benchmark_summary_skips_a_cut_off_json(tmp_path, capsys):
    # device_check.sh summarizes every benchmark JSON; one left empty by a process killed at its
    # time cap must not take the other files' table down with it.
    summarize = benchmark_script("summarize")
    good = tmp_path / "good.json"
    rows = [
        {"group": "g", "stats": {"median": m}, "extra_info": {"impl": impl}}
        for impl, m in (("baseline", 2e-3), ("dcgen", 1e-3))
    ]
    good.write_text(json.dumps({"benchmarks": rows}))
    empty = tmp_path / "cut.json"
    empty.write_text("")
    entries, _ = summarize.load_entries([str(empty), str(good)])
    assert [e["impl"] for e in entries] == ["baseline", "dcgen"]
    assert "skipping" in capsys.readouterr().err
    assert summarize.main([str(empty), str(good)]) == 0
    assert "2.00x" in capsys.readouterr().out


def test_step_profile_writes_a_breakdown(tmp_path):
    # benchmarks/profile_step.py (run by device_check.sh on the GPU) on the tiny model: every
    # field of its report, for both precisions, and the kernel families named as intended.
    profile = benchmark_script("profile_step")
    assert profile.family_of("flash_fwd_sm90_tma_kernel<bf16>") == "attention"
    assert profile.family_of("cudnn_generated_fort_native_sdpa_sm90") == "attention"
    assert profile.family_of("sm90_xmma_gemm_bf16bf16_bf16f32") == "gemm"
    assert profile.family_of("nvjet_tst_128x256_64x4") == "gemm"
    assert profile.family_of("void dcgen::qk_norm_rope_kernel<bf16>") == "dcgen"
    assert profile.family_of("vectorized_elementwise_kernel<convert_fp8>") == "other"
    conv = "sm90_xmma_fprop_implicit_gemm_bf16bf16_bf16f32_f32_nhwckrsc_nhwc"
    assert profile.family_of(conv) == "conv"
    assert profile.family_of("void dcgen::relu_linear_attention_kernel") == "attention"
    argv = ["--model", "tiny", "--precision", "bf16,fp8", "--steps", "1", "--out", str(tmp_path)]
    assert profile.main([*argv, "--decode"]) == 0
    for precision in ("bf16", "fp8"):
        report = json.loads((tmp_path / f"profile_{precision}.json").read_text())
        assert report["precision"] == precision and report["steps"] == 1
        assert report["step"]["wall_ms"] > 0 and report["decode"]["wall_ms"] > 0
        assert report["blocks"] == {"double": 1, "single": 1}
        text = (tmp_path / f"profile_{precision}.txt").read_text()
        assert "== step ==" in text and "== decode ==" in text and "aten::" in text
        # the decode's call sites: ops by input shape, and by the Python lines that ran them
        by_shape = text.split("== decode, by shape ==")[1].split("== decode, by stack ==")[0]
        assert "Input Shape" in by_shape and "convolution" in by_shape
        assert "autoencoders/" in text.split("== decode, by stack ==")[1]
        assert "== step, by shape ==" in text and "== step, by stack ==" in text
        assert "table_by_shape" not in report["decode"]  # the tables went to the text file
    with pytest.raises(SystemExit):
        profile.main(["--model", "tiny", "--precision", "int3", "--out", str(tmp_path)])


def test_graphs_variant_captures_once_per_block(monkeypatch):
    # The graphs variant keeps its block graphs across the warm-up and every timed run, so each
    # block is captured once (CPU stand-in for the graph: tests/test_cuda_graphs.py).
    from dcgen.attention import cuda_graphs, is_accelerated

    from .test_cuda_graphs import StandInGraphs

    captures = []

    def capture(self, run, device=None):
        captures.append(self.name)
        return StandInGraphs.capture(self, run, device)

    replays = []

    def replay(self, entry):
        replays.append(self.name)
        StandInGraphs.replay(self, entry)

    monkeypatch.setattr(cuda_graphs.BlockGraphs, "applies", staticmethod(StandInGraphs.applies))
    monkeypatch.setattr(cuda_graphs.BlockGraphs, "capture", capture)
    monkeypatch.setattr(cuda_graphs.BlockGraphs, "replay", replay)
    settings = BenchSettings(
        model="tiny", resolutions=(64,), steps=2, quick=True, variants="graphs", warmup=0,
        repeats=2,
    )  # fmt: skip
    bench = SpeedBench(settings)
    res = bench.measure("dcgen", 64, 1, "graphs")
    assert sorted(captures) == ["single_transformer_blocks.0", "transformer_blocks.0"]
    assert res["denoise_ms"] > 0 and res["double_block_ms"] > 0
    assert not is_accelerated(bench.transformer)  # stock again afterwards
    assert settings.resolved().quant_variants == ("graphs",)
    # runners (pytest-benchmark): a graphs runner stays graphed across other variants' runs,
    # and a kernels run in between is not graphed
    run = bench.runner("dcgen", 64, 1, 2, "graphs")
    run()
    n_captures, n_replays = len(captures), len(replays)
    assert n_captures == 4 and n_replays > 0
    bench.measure("dcgen", 64, 1, "kernels")
    assert len(replays) == n_replays and len(captures) == n_captures
    run()
    assert len(captures) == n_captures + 2 and len(replays) > n_replays  # installed again
    report = run_speed_bench(settings)
    assert {r["variant"] for r in report["rows"]} == {"graphs"}
    # FP8 rows for both kernel variants, one quality check per resolution shared by them
    both = BenchSettings(
        model="tiny", resolutions=(64,), steps=2, quick=True, variants="stock,kernels,graphs",
        fp8=True,
    )  # fmt: skip
    assert both.resolved().quant_variants == ("kernels", "graphs")
    assert BenchSettings(model="tiny", variants="stock").resolved().quant_variants == ("stock",)
    checks = []
    real_quality = SpeedBench.quant_quality

    def counted(self, precision, res, variant, attention):
        checks.append((res, variant))
        return real_quality(self, precision, res, variant, attention)

    monkeypatch.setattr(SpeedBench, "quant_quality", counted)
    report = run_speed_bench(both)
    fp8 = [r for r in report["rows"] if r["precision"] == "fp8"]
    assert sorted(r["variant"] for r in fp8) == ["graphs", "kernels"]
    assert checks == [(64, "kernels")]  # graphs replay the same arithmetic: checked once
    assert fp8[0]["quality"] == fp8[1]["quality"] and "rel_err" in str(fp8[0]["quality"])


def test_cli_bench_sana_nvfp4(tmp_path, capsys):
    out = tmp_path / "n"
    args = ["bench", "--model", "tiny-sana", "--resolutions", "64", "--quick", "--steps", "2",
            "--nvfp4", "w4a16", "--nvfp4-rank", "2", "--device", "cpu", "--warmup", "0",
            "--out", str(out)]  # fmt: skip
    assert main(args) == 0
    data = json.loads((out / "speed.json").read_text())
    assert [r["precision"] for r in data["rows"]] == ["fp32", "nvfp4-w4a16"]
    assert data["rows"][1]["quality"]["rank"] == 2 and not data["errors"]
    assert "| nvfp4-w4a16 |" in capsys.readouterr().out
    with pytest.raises(SystemExit):  # argparse: --nvfp4-rank takes an int
        main(["bench", "--nvfp4", "w4a4", "--nvfp4-rank", "two"])
    assert main(["bench", "--model", "tiny", "--nvfp4", "w4a2", "--out", str(out)]) == 2


def test_sana_text_has_no_mask_for_the_flash_backend():
    # SDPA's flash backend takes no attention mask (the SANA table's paper-setting rows failed
    # on CUDA with one); the all-ones mask keeps every token, so leaving it out changes nothing
    bench = SpeedBench(BenchSettings(model="tiny-sana", quick=True))
    assert "prompt_attention_mask" in bench.text(1)
    flash = bench.text(1, "flash")
    assert "prompt_attention_mask" not in flash and flash["prompt_embeds"].shape[0] == 1
    pipe = bench.pipeline("dcgen", 64)
    with torch.inference_mode():
        a = bench._call(pipe, bench.text(1), 64, 2)
        b = bench._call(pipe, flash, 64, 2)
    torch.testing.assert_close(a, b)
    flux = SpeedBench(BenchSettings(model="tiny", quick=True))
    assert (
        set(flux.text(1, "flash")) == set(flux.text(1)) == {"prompt_embeds", "pooled_prompt_embeds"}
    )


def test_throw_probe_tells_a_crash_from_a_raise():
    # benchmarks/throw_probe.py (device_check.sh, GPU machine) runs each bad-input op call in its
    # own interpreter: a check that raises must read as rc 1 with its message, a segfault as
    # the signal, and the table must still come out after a crash.
    probe = benchmark_script("throw_probe")
    rc, err = probe.run_case("raise RuntimeError('expected x of shape [M, D], got [3]')", "")
    assert rc == 1 and "expected x of shape" in err
    rc, _ = probe.run_case("import os, signal\nos.kill(os.getpid(), signal.SIGSEGV)", "")
    assert rc == -11
    assert all(len(case) == 4 for case in probe.CASES)


SASS = """
        Function : _Z6kernelv
        /*0000*/                   MOV R1, c[0x0][0x28] ;
        /*0010*/                   LDG.E R2, desc[UR4][R4.64] ;
        /*0020*/                   FFMA R3, R2, R2, R3 ;
        /*0030*/              @!P0 BRA 0x10 ;
        /*0040*/                   BRA.U.ANY 0x40 ;
        /*0050*/                   EXIT ;
        Function : _Z5otherv
        /*0000*/                   EXIT ;
"""


def test_sass_loops_reads_backward_branches():
    # benchmarks/sass_loops.py: a loop is a backward branch (not a warp-sync spin), counted
    # from its target through the branch, opcodes without modifiers.
    tool = benchmark_script("sass_loops")
    kernels = tool.parse_sass(SASS)
    assert [k.name for k in kernels] == ["_Z6kernelv", "_Z5otherv"]
    loops = kernels[0].loops()
    assert len(loops) == 1 and (loops[0].start, loops[0].end) == (0x10, 0x30)
    assert loops[0].ops == {"LDG": 1, "FFMA": 1, "BRA": 1} and loops[0].instructions == 3
    assert kernels[1].loops() == []
    with pytest.raises(FileNotFoundError, match="expected a CUDA object file"):
        tool.read_kernels("/nonexistent.cu.o")


HGMMA_SASS = """
        Function : _Z2rsv
        /*0000*/                   MOV R1, c[0x0][0x28] ;
        /*0010*/                   WARPGROUP.ARRIVE ;
        /*0020*/                   HGMMA.64x16x16.F32.BF16 R24, R152, gdesc[UR4], R24, gsb0 ;
        /*0030*/                   HMUL2.BF16_V2 R156, R10, R11 ;
        /*0040*/                   IMAD.MOV.U32 R153, RZ, RZ, R9 ;
        /*0050*/                   WARPGROUP.ARRIVE ;
        /*0060*/                   HGMMA.64x16x16.F32.BF16 R24, R156, gdesc[UR4], R24, gsb0 ;
        /*0070*/                   WARPGROUP.DEPBAR.LE gsb0, 0x1 ;
        /*0080*/                   HMUL2.BF16_V2 R152, R10, R11 ;
        /*0090*/                   FMUL R30, R30, R2 ;
        /*00a0*/                   WARPGROUP.DEPBAR.LE gsb0, 0x0 ;
        /*00b0*/                   FMUL R31, R31, R2 ;
        /*00c0*/                   HMUL2.BF16_V2 R157, R10, R11 ;
        /*00d0*/                   EXIT ;
"""


def test_wgmma_register_hazards_follow_the_groups_in_flight():
    # An HGMMA group (closed by gsb0) keeps its A registers (4 from the second operand) and its
    # accumulators (N / 2 from the first) busy until a DEPBAR.LE leaves fewer groups in flight.
    tool = benchmark_script("sass_loops")
    (kernel,) = tool.parse_sass(HGMMA_SASS)
    hazards = tool.wgmma_register_hazards(kernel)
    # R153: the first group's A (R152-R155) in flight; R30: both groups' accumulators
    # (R24-R31) until the second DEPBAR. R156 before the second group and R152 / R157 after
    # the DEPBARs that retire their groups are fine.
    assert [h.split(":")[0] for h in hazards] == ["0x40", "0x90"]
    # A loop whose last group (A in R156-R159) is still in flight when it branches back: the
    # write to R156 at the top of the next iteration is found.
    looped = HGMMA_SASS.replace(
        "/*00d0*/                   EXIT ;",
        "/*00d0*/                   WARPGROUP.ARRIVE ;\n"
        "        /*00e0*/                   HGMMA.64x16x16.F32.BF16 R24, R156, gdesc[UR4], R24, gsb0 ;\n"
        "        /*00f0*/                   BRA 0x30 ;",
    )
    (kernel,) = tool.parse_sass(looped)
    assert "0x30" in [h.split(":")[0] for h in tool.wgmma_register_hazards(kernel)]


# The sm_90a kernels that issue wgmma with register operands or double-buffered fragments.
WGMMA_OBJECTS = [
    "nvfp4/nvfp4_gemm_rs_sm90",
    "nvfp4/nvfp4_gemm_sm90",
    "nvfp4/nvfp4_gemm_w4a16_sm90",
    "attention/flash_fwd_sm90_tma_bf16_d128",
    "attention/flash_fwd_sm90_bf16_d128",
]


@pytest.mark.parametrize("name", WGMMA_OBJECTS)
def test_built_wgmma_kernels_have_no_register_hazards(name):
    # The compiled objects of this checkout's build (CI builds them; skipped where the CUDA
    # sources were not compiled): no instruction writes a register an in-flight wgmma reads.
    from pathlib import Path

    tool = benchmark_script("sass_loops")
    root = Path(__file__).resolve().parents[1]
    obj = root / "build" / "cmake" / "CMakeFiles" / "_C.dir" / "csrc" / f"{name}.cu.o"
    if not obj.is_file():
        pytest.skip(f"{obj.relative_to(root)} not built (no CUDA build here)")
    try:
        kernels = tool.read_kernels(obj)
    except FileNotFoundError as err:
        pytest.skip(str(err))
    with_wgmma = [k for k in kernels if any(op.startswith("HGMMA") for _, op, _ in k.instructions)]
    assert with_wgmma, f"no HGMMA in {name}: the object is not an sm_90a build?"
    for k in with_wgmma:
        assert tool.wgmma_register_hazards(k) == [], k.name[:120]


def test_the_kernels_variant_runs_the_kernels_whatever_the_shell_set(monkeypatch):
    # An inherited DCGEN_DISABLE_KERNELS=1 stayed set inside kernels_enabled(True): the kernels
    # rows timed the references.
    from dcgen.bench.variants import kernels_enabled
    from dcgen.ops._extension import _disabled

    monkeypatch.setenv("DCGEN_DISABLE_KERNELS", "1")
    with kernels_enabled(True):
        assert not _disabled()
        with kernels_enabled(False):
            assert _disabled()
        assert not _disabled()
    assert _disabled()  # the shell's value is back
