"""Text prompts through the commands: `export --text-encoders`, `generate --prompt` (the pipeline
folder's text encoders or --text-encoders DIR's) and `precompute --text-encoders`, each against
the same tiny encoders run by hand (tests/pipelines/tiny_text.py; nothing downloaded)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from dcgen.cli import main
from dcgen.pipelines.text_encoders import PipelineTextEncoder
from dcgen.train import LatentCache
from dcgen.train.null_text import load_null_text

from .adapters.tiny import tiny_dcae, tiny_flux
from .pipelines.tiny_text import PROMPT, save_flux_pipeline, save_sana_pipeline
from .test_cli_train import CAPTIONS, _error_line, _precompute, assets  # noqa: F401 (fixture)

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

SIZE = ["--height", "64", "--width", "64", "--steps", "2", "--no-progress", "--device", "cpu"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli_text")
    return {
        "base": save_flux_pipeline(root / "base", with_text=True),  # stands in for FLUX.1-dev
        "bare": save_flux_pipeline(root / "bare", with_text=False),
        "sana": save_sana_pipeline(root / "sana", with_text=True),
    }


def _pixels(path) -> np.ndarray:  # noqa: ANN001
    return np.asarray(Image.open(path), dtype=np.int16)


def _embeds_file(folder, prompt: str, path, max_len: int = 16):  # noqa: ANN001, ANN202
    """--prompt-embeds file with the encoders of ``folder`` run by hand."""
    out = PipelineTextEncoder(folder, max_sequence_length=max_len)([prompt])
    save_file({k: v.contiguous() for k, v in out.items()}, str(path))
    return path


def test_generate_from_text_equals_generate_from_its_embeddings(folders, tmp_path):
    by_text, by_embeds = tmp_path / "text.png", tmp_path / "embeds.png"
    argv = ["generate", "--pipeline", str(folders["base"]), *SIZE]
    text = ["--max-sequence-length", "16", "--prompt"]
    assert main([*argv, *text, PROMPT, "--out", str(by_text)]) == 0
    emb = _embeds_file(folders["base"], PROMPT, tmp_path / "e.safetensors")
    assert main([*argv, "--prompt-embeds", str(emb), "--out", str(by_embeds)]) == 0
    assert np.array_equal(_pixels(by_text), _pixels(by_embeds))
    other = tmp_path / "other.png"
    assert main([*argv, *text, "a blue circle", "--out", str(other)]) == 0
    assert not np.array_equal(_pixels(other), _pixels(by_text)), "the text must reach the model"


def test_generate_with_text_encoders_of_another_folder(folders, tmp_path):
    """A pipeline folder without text encoders borrows the base model's (--text-encoders)."""
    # same transformer weights as "base" (tiny_flux is seeded), so the same image
    out, want = tmp_path / "bare.png", tmp_path / "base.png"
    common = [*SIZE, "--max-sequence-length", "16", "--prompt", PROMPT]
    assert main(["generate", "--pipeline", str(folders["base"]), *common, "--out", str(want)]) == 0
    argv = ["generate", "--pipeline", str(folders["bare"]), "--text-encoders",
            str(folders["base"]), *common, "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    assert np.array_equal(_pixels(out), _pixels(want))


def test_generate_true_cfg_encodes_the_negative_prompt(folders, tmp_path):
    argv = ["generate", "--pipeline", str(folders["base"]), *SIZE, "--max-sequence-length", "16",
            "--prompt", PROMPT, "--true-cfg", "3"]  # fmt: skip
    assert main([*argv, "--out", str(tmp_path / "empty.png")]) == 0  # negative "" by default
    assert main([*argv, "--negative-prompt", "blue circle", "--out", str(tmp_path / "n.png")]) == 0
    assert not np.array_equal(_pixels(tmp_path / "empty.png"), _pixels(tmp_path / "n.png"))


def test_generate_text_errors_exit_2_before_loading(folders, tmp_path, capsys):
    base = ["generate", *SIZE, "--out", str(tmp_path / "x.png")]
    cases = [
        (["--pipeline", str(folders["bare"]), "--prompt", PROMPT],
         "lacks the FLUX text components ['text_encoder', 'text_encoder_2', 'tokenizer', "
         "'tokenizer_2']"),
        (["--pipeline", str(folders["bare"]), "--prompt", PROMPT], "pass --text-encoders DIR"),
        (["--pipeline", str(folders["bare"]), "--prompt", PROMPT, "--text-encoders",
          str(folders["sana"])], "lacks the FLUX text components ['text_encoder_2', "
         "'tokenizer_2']"),
        (["--pipeline", str(folders["base"]), "--prompt-embeds", "e.safetensors",
          "--max-sequence-length", "8"], "--max-sequence-length: these go with --prompt"),
        (["--pipeline", str(folders["base"])], "--prompt TEXT"),
        (["--pipeline", str(folders["base"]), "--prompt", PROMPT, "--prompt-embeds",
          str(tmp_path / "e.safetensors")], "one of them"),
        (["--pipeline", str(folders["base"]), "--prompt", PROMPT, "--negative-prompt", "x"],
         "give --true-cfg > 1"),
    ]  # fmt: skip
    for extra, message in cases:
        assert main([*base, *extra]) == 2, extra
        assert message in _error_line(capsys), extra
    assert not (tmp_path / "x.png").exists()


@pytest.mark.parametrize("link", [False, True])
def test_export_with_text_encoders_makes_a_folder_that_takes_text(folders, tmp_path, link):
    from dcgen.adapters import adapter_for
    from dcgen.train.export import save_latent_layers

    model = tiny_flux()
    model.save_pretrained(tmp_path / "transformer")
    adapter = adapter_for(model)
    adapter.replace_latent_layers(tiny_dcae().latent_channels)
    save_latent_layers(adapter, tmp_path / "ll.safetensors")
    tiny_dcae().save_pretrained(tmp_path / "dcae")
    out = tmp_path / "pipe"
    argv = ["export", "--transformer", str(tmp_path / "transformer"), "--latent-layers",
            str(tmp_path / "ll.safetensors"), "--dcae", str(tmp_path / "dcae"), "--out", str(out),
            "--dtype", "fp32", "--text-encoders", str(folders["base"])]  # fmt: skip
    assert main([*argv, *(["--link-text-encoders"] if link else [])]) == 0
    index = json.loads((out / "model_index.json").read_text())
    assert index["text_encoder"] == ["transformers", "CLIPTextModel"]
    assert (out / "text_encoder_2").is_symlink() == link
    img = tmp_path / "x.png"
    gen = ["generate", "--pipeline", str(out), *SIZE]
    assert main([*gen, "--max-sequence-length", "16", "--prompt", PROMPT, "--out", str(img)]) == 0
    emb = _embeds_file(folders["base"], PROMPT, tmp_path / "e.safetensors")
    assert main([*gen, "--prompt-embeds", str(emb), "--out", str(tmp_path / "y.png")]) == 0
    assert np.array_equal(_pixels(img), _pixels(tmp_path / "y.png"))


def test_export_refuses_a_folder_without_the_family_text_encoders(folders, tmp_path, capsys):
    model = tiny_flux(in_channels=tiny_dcae().latent_channels)
    model.save_pretrained(tmp_path / "transformer")
    tiny_dcae().save_pretrained(tmp_path / "dcae")
    argv = ["export", "--transformer", str(tmp_path / "transformer"), "--dcae",
            str(tmp_path / "dcae"), "--out", str(tmp_path / "pipe"), "--text-encoders",
            str(folders["sana"])]  # fmt: skip
    assert main(argv) == 2
    assert "--text-encoders:" in (line := _error_line(capsys)) and "text_encoder_2" in line
    assert not (tmp_path / "pipe").exists()  # checked before anything is written
    # the output folder as its own source (which a copy would first delete) is refused
    argv[argv.index("--text-encoders") + 1] = str(tmp_path / "pipe")
    assert main(argv) == 2
    assert "is the output folder itself" in _error_line(capsys)


@pytest.mark.parametrize("family", ["base", "sana"])
def test_precompute_with_the_base_text_encoders(assets, folders, tmp_path, family):  # noqa: F811
    out = tmp_path / "cache"
    argv = (
        "--text-encoders",
        str(folders[family]),
        "--max-sequence-length",
        "12",
        "--dtype",
        "fp32",
    )
    assert _precompute(assets, out, *argv) == 0
    cache = LatentCache(out)
    encoder = PipelineTextEncoder(folders[family], max_sequence_length=12)
    names = {"base": ["pooled_prompt_embeds", "prompt_embeds"],
             "sana": ["prompt_attention_mask", "prompt_embeds"]}[family]  # fmt: skip
    assert sorted(n for n in cache.tensor_names if n != "dcae_latent") == names
    for i in range(len(cache)):
        sample = cache[i]
        want = encoder([sample["caption"]])
        for name in names:
            torch.testing.assert_close(sample[name].float(), want[name][0].float(), rtol=0, atol=0)
    assert sorted(cache[i]["caption"] for i in range(len(cache))) == sorted(CAPTIONS.values())
    # the empty prompt, encoded as the pipelines encode the default negative (caption dropout)
    null = load_null_text(out / "null_text.safetensors")
    want = encoder([""], negative=True)
    assert sorted(null) == names
    for name in names:
        torch.testing.assert_close(null[name].float(), want[name][0].float(), rtol=0, atol=0)
    # the encoders are part of the cache's identity: another length is refused
    assert _precompute(assets, out, *argv[:3], "16", *argv[4:]) == 2


def test_precompute_knows_text_encoders_by_contents(assets, folders, tmp_path, capsys):  # noqa: F811
    """A copy of the text-encoder folder keeps the finished cache (its absolute path was the
    identity: refused); the same folder with its weights rewritten is refused (it was accepted,
    the old shards kept beside a null_text from the new encoder)."""
    from safetensors.torch import load_file, save_file

    out, base = tmp_path / "cache", tmp_path / "base"
    shutil.copytree(folders["base"], base)
    argv = ("--text-encoders", str(base), "--max-sequence-length", "12", "--dtype", "fp32")
    assert _precompute(assets, out, *argv) == 0
    index = (out / "index.json").read_text()
    copy = tmp_path / "copy"
    shutil.copytree(base, copy)
    assert _precompute(assets, out, "--text-encoders", str(copy), *argv[2:]) == 0
    assert (out / "index.json").read_text() == index
    null = (out / "null_text.safetensors").read_bytes()
    weights = next((base / "text_encoder").glob("*.safetensors"))
    state = load_file(str(weights))
    save_file({k: -v if v.is_floating_point() else v for k, v in state.items()}, str(weights))
    capsys.readouterr()
    assert _precompute(assets, out, *argv) == 2
    assert "other data or settings" in _error_line(capsys)
    assert (out / "null_text.safetensors").read_bytes() == null


def test_a_cache_named_by_text_encoder_paths_is_kept(assets, folders, tmp_path, monkeypatch):  # noqa: F811
    import dcgen.train.prepare as prepare

    argv = ("--text-encoders", str(folders["base"]), "--max-sequence-length", "12")
    digests: list[str] = []
    real = prepare._identity_digest
    monkeypatch.setattr(
        prepare, "_identity_digest", lambda i: digests.append(real(i)) or digests[-1]
    )
    monkeypatch.setattr(prepare, "_cache_data_fingerprint", lambda out: "another cache")
    assert _precompute(assets, tmp_path / "a", *argv) == 0
    current, _, by_path = digests  # now, before 2026-11-29, before the contents counted
    assert by_path != current
    monkeypatch.setattr(prepare, "_cache_data_fingerprint", lambda out: by_path)
    assert _precompute(assets, tmp_path / "b", *argv) == 0
    made = json.loads((tmp_path / "b" / "index.json").read_text())
    assert made["dataset_fingerprint"] == by_path


def test_precompute_text_option_errors(assets, folders, tmp_path, capsys):  # noqa: F811
    assert _precompute(assets, tmp_path / "c", "--max-sequence-length", "12") == 2
    assert "goes with --text-encoders" in _error_line(capsys)
    assert _precompute(assets, tmp_path / "c", "--text-encoders", str(folders["bare"])) == 2
    assert "no model_index.json" not in (line := _error_line(capsys)) and "text_encoder" in line
    with pytest.raises(SystemExit):  # argparse: the two text encoders exclude each other
        _precompute(assets, tmp_path / "c", "--text-encoders", str(folders["base"]),
                    "--text-encoder", "tests.test_cli_train:fake_text_encoder")  # fmt: skip


def test_quantize_calibrates_on_a_text_prompt_as_on_its_embeddings(folders, tmp_path):
    from safetensors.torch import load_file

    argv = ["quantize", "--pipeline", str(folders["base"]), "--format", "nvfp4-w4a4",
            "--smoothing", "0.5", "--height", "64", "--width", "64", "--calibration-steps", "2",
            "--device", "cpu", "--no-progress", "--max-sequence-length", "16"]  # fmt: skip
    by_text, by_embeds = tmp_path / "t.safetensors", tmp_path / "e.safetensors"
    assert main([*argv, "--prompt", PROMPT, "--out", str(by_text)]) == 0
    emb = _embeds_file(folders["base"], PROMPT, tmp_path / "p.safetensors")
    argv = [a for a in argv if a not in ("--max-sequence-length", "16")]
    assert main([*argv, "--prompt-embeds", str(emb), "--out", str(by_embeds)]) == 0
    a, b = load_file(str(by_text)), load_file(str(by_embeds))
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    # smoothing takes its statistics from the prompt: another prompt, other smoothing factors
    other = tmp_path / "o.safetensors"
    argv_o = [
        *argv,
        "--max-sequence-length",
        "16",
        "--prompt",
        "a blue circle",
        "--out",
        str(other),
    ]
    assert main(argv_o) == 0
    c = load_file(str(other))
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_generate_moves_to_the_device_without_text_encoders_and_after_quantizing(
    folders, tmp_path, monkeypatch
):
    """Order on a GPU: text encoded, encoders dropped, quantized linears swapped in (on the
    CPU), and only then the pipeline moved: the GPU never holds T5 beside the transformer, nor
    the 16-bit linears a quantized checkpoint replaces. Spied here at the move itself."""
    from dcgen.pipelines.base import FlowTextToImagePipeline
    from dcgen.quant import quantized_modules

    ckpt = tmp_path / "q.safetensors"
    argv = ["quantize", "--pipeline", str(folders["base"]), "--format", "fp8-row", "--no-report",
            "--device", "cpu", "--no-progress", "--out", str(ckpt)]  # fmt: skip
    assert main(argv) == 0
    seen = []
    real = FlowTextToImagePipeline.to

    def spy(self, *args, **kwargs):  # noqa: ANN001, ANN202
        seen.append(
            (self.text_encoder, self.text_encoder_2, len(quantized_modules(self.transformer)))
        )
        return real(self, *args, **kwargs)

    monkeypatch.setattr(FlowTextToImagePipeline, "to", spy)
    gen = ["generate", "--pipeline", str(folders["base"]), *SIZE, "--quantized", str(ckpt),
           "--out", str(tmp_path / "x.png")]  # fmt: skip
    assert main([*gen, "--max-sequence-length", "16", "--prompt", PROMPT]) == 0
    emb = _embeds_file(folders["base"], PROMPT, tmp_path / "e.safetensors")
    assert main([*gen, "--prompt-embeds", str(emb)]) == 0
    assert len(seen) == 2
    for te, te2, n_quantized in seen:
        assert te is None and te2 is None and n_quantized > 0


def test_sana_samples_with_classifier_free_guidance_by_default(folders, tmp_path, capsys, caplog):
    """As diffusers' SanaPipeline (guidance 4.5); FLUX.1-dev-style models are distilled: off.
    No guidance-embedding warning unless --guidance is given (its 3.5 default made each run
    warn that a value it never asked for was not used)."""
    base = ["generate", "--pipeline", str(folders["sana"]), *SIZE, "--max-sequence-length", "12",
            "--prompt", PROMPT]  # fmt: skip

    def run(name: str, *extra: str):  # noqa: ANN202
        assert main([*base, *extra, "--out", str(tmp_path / name)]) == 0
        return _pixels(tmp_path / name)

    default, cfg, off = (
        run("d.png"),
        run("c.png", "--true-cfg", "4.5"),
        run("o.png", "--true-cfg", "1"),
    )
    assert np.array_equal(default, cfg) and not np.array_equal(default, off)
    assert "guidance_scale" not in caplog.text
    caplog.clear()
    assert np.array_equal(run("g35.png", "--guidance", "3.5"), default)  # named as not used
    assert "guidance_scale=3.5 is not used" in caplog.text
    # embeddings without a negative: no guidance, and the command says so
    emb = _embeds_file(folders["sana"], PROMPT, tmp_path / "e.safetensors", max_len=12)
    capsys.readouterr()
    argv = ["generate", "--pipeline", str(folders["sana"]), *SIZE, "--prompt-embeds", str(emb)]
    assert main([*argv, "--out", str(tmp_path / "e.png")]) == 0
    assert "runs without guidance" in capsys.readouterr().out
    assert np.array_equal(_pixels(tmp_path / "e.png"), off)
    # ... and asked for guidance, an error in the command's terms (not the pipeline's keywords)
    assert main([*argv, "--true-cfg", "4.5", "--out", str(tmp_path / "g.png")]) == 2
    assert "--true-cfg 4.5 needs a negative prompt" in _error_line(capsys)
    assert not (tmp_path / "g.png").exists()
    # FLUX: off by default
    flux = ["generate", "--pipeline", str(folders["base"]), *SIZE, "--max-sequence-length", "16",
            "--prompt", PROMPT]  # fmt: skip
    assert main([*flux, "--out", str(tmp_path / "f.png")]) == 0
    assert main([*flux, "--true-cfg", "1", "--out", str(tmp_path / "f1.png")]) == 0
    assert np.array_equal(_pixels(tmp_path / "f.png"), _pixels(tmp_path / "f1.png"))


def test_generate_several_prompts_one_load(folders, tmp_path, capsys):
    """--prompt repeated: the prompts encoded as one batch, each sampled at every seed; the
    images equal single-prompt runs, the grid has a row per prompt."""
    base = ["generate", "--pipeline", str(folders["base"]), *SIZE, "--max-sequence-length", "16"]
    grid = tmp_path / "g.png"
    argv = [*base, "--prompt", PROMPT, "--prompt", "a blue circle", "--seed", "0", "1",
            "--out", str(grid)]  # fmt: skip
    assert main(argv) == 0
    assert "2 prompts x 2 seeds in a grid" in capsys.readouterr().out
    assert Image.open(grid).size == (2 * 64, 2 * 64)
    for i, prompt in enumerate([PROMPT, "a blue circle"]):
        for seed in (0, 1):
            single = tmp_path / f"s{i}{seed}.png"
            assert main([*base, "--prompt", prompt, "--seed", str(seed), "--out", str(single)]) == 0
            got = _pixels(tmp_path / f"g-p{i}-seed{seed}.png")
            # batch-2 vs batch-1 text encoding may round differently on some CPUs: 1 level
            assert np.abs(got - _pixels(single)).max() <= 1, (i, seed)
    assert not np.array_equal(
        _pixels(tmp_path / "g-p0-seed0.png"), _pixels(tmp_path / "g-p1-seed0.png")
    )


def test_quantize_calibrates_sana_under_its_guidance(folders, tmp_path, monkeypatch):
    """SANA samples with CFG: its calibration runs see the negative prompt too (one batch of
    negative and positive), so the activation statistics cover both halves of a step."""
    import dcgen.quant.pipeline_quant as pq

    batches = []
    real = pq.capture_transformer_inputs

    def spy(pipe, *args, **kwargs):  # noqa: ANN001, ANN202
        calls = real(pipe, *args, **kwargs)
        batches.extend(c.kwargs["hidden_states"].shape[0] for c in calls)
        return calls

    monkeypatch.setattr(pq, "capture_transformer_inputs", spy)
    argv = ["quantize", "--pipeline", str(folders["sana"]), "--format", "fp8-row", "--height",
            "64", "--width", "64", "--calibration-steps", "2", "--device", "cpu",
            "--no-progress", "--max-sequence-length", "12", "--prompt", PROMPT,
            "--out", str(tmp_path / "s.safetensors")]  # fmt: skip
    assert main(argv) == 0
    assert batches == [2, 2]  # negative and positive prompt, one call a step


@pytest.mark.parametrize("folder", ["base", "sana"])
def test_generate_batches_seeds(folders, tmp_path, capsys, folder):
    """--batch-size N: N seeds in one call, each image from its own seed's noise: the images of
    one call per seed (FLUX; and SANA, whose CFG then runs a batch of 2N)."""
    max_len = "16" if folder == "base" else "12"
    base = ["generate", "--pipeline", str(folders[folder]), *SIZE, "--max-sequence-length",
            max_len, "--prompt", PROMPT, "--seed", "3", "4", "5"]  # fmt: skip
    assert main([*base, "--out", str(tmp_path / "one.png")]) == 0
    capsys.readouterr()
    assert main([*base, "--batch-size", "2", "--out", str(tmp_path / "two.png")]) == 0
    printed = capsys.readouterr().out  # each call's wall time
    assert "sampled seed(s) 3, 4 in " in printed and "sampled seed(s) 5 in " in printed
    for seed in (3, 4, 5):
        a, b = (_pixels(tmp_path / f"{n}-seed{seed}.png") for n in ("one", "two"))
        assert np.abs(a - b).max() <= 1, seed  # batched GEMMs may round differently: 1 level
    assert not np.array_equal(
        _pixels(tmp_path / "two-seed3.png"), _pixels(tmp_path / "two-seed4.png")
    )
    capsys.readouterr()
    assert main([*base, "--batch-size", "0", "--out", str(tmp_path / "x.png")]) == 2
    assert "--batch-size: expected a positive integer, got 0" in capsys.readouterr().err


def test_generate_prompt_file(folders, tmp_path, capsys):
    """--prompt-file: one prompt per line, as repeated --prompt (blank lines skipped)."""
    base = ["generate", "--pipeline", str(folders["base"]), *SIZE, "--max-sequence-length", "16"]
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(f"{PROMPT}\n\n  a blue circle  \n")
    assert main([*base, "--prompt-file", str(prompts), "--out", str(tmp_path / "f.png")]) == 0
    argv = [
        *base,
        "--prompt",
        PROMPT,
        "--prompt",
        "a blue circle",
        "--out",
        str(tmp_path / "r.png"),
    ]
    assert main(argv) == 0
    for i in (0, 1):
        assert np.array_equal(_pixels(tmp_path / f"f-p{i}.png"), _pixels(tmp_path / f"r-p{i}.png"))
    capsys.readouterr()
    (tmp_path / "empty.txt").write_text("\n \n")
    for path, message in ((tmp_path / "none.txt", "no such file"),
                          (tmp_path / "empty.txt", "expected one prompt per line, found none")):  # fmt: skip
        assert main([*base, "--prompt-file", str(path), "--out", str(tmp_path / "x.png")]) == 2
        assert message in capsys.readouterr().err
