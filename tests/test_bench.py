"""dcgen.bench: the speed table harness (tiny CPU run, quick-mode arithmetic, inputs, CLI)."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from dcgen.bench import (
    BenchSettings,
    dcae_preset_for,
    extrapolate_denoise,
    run_speed_bench,
    token_counts,
    write_report,
)
from dcgen.bench.speed import MODELS, SpeedBench, dcae_factor
from dcgen.cli import main


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
    assert "| 64px | 16 / 4 | f32c32-sana-1.1 |" in md
    assert "| 128px | 64 / 4 | f64c128-in-1.0 |" in md
    assert md.count("| measured |") == 2
    with Image.open(paths["png"]) as im:
        assert im.size[0] > 100 and im.size[1] > 100


def test_extrapolation_arithmetic():
    # 2 measured steps of a 1+1-block model; full depth 19 + 38 and 20 steps.
    got = extrapolate_denoise(10.0, 2.0, 1.5, (1, 1), (19, 38), 20)
    assert got == pytest.approx((10.0 + 18 * 2.0 + 37 * 1.5) * 20)
    assert extrapolate_denoise(5.0, 9.0, 9.0, (2, 2), (2, 2), 3) == pytest.approx(15.0)
    with pytest.raises(ValueError, match="exceed"):
        extrapolate_denoise(1.0, 1.0, 1.0, (3, 1), (2, 2), 1)


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
            step = part["measured_step_ms"]
            expected = (step + (full_d - 1) * 1.0 + (full_s - 1) * 1.0) * 20
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
    # 4K DC-Gen-f64 has the token count of base FLUX at 1K (METHOD.md section 1).
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
    with pytest.raises(ValueError, match="attention"):
        BenchSettings(model="tiny", attention="xformers").resolved()
    with pytest.raises(ValueError, match="quick_blocks"):
        BenchSettings(model="tiny", quick=True, quick_blocks=3).resolved()


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
