"""The pipeline folder `dcgen demo` writes (DCGenToyPipeline): it holds the trained DC-Gen model,
loads back, samples exactly as the demo's own sampler does, and `dcgen generate` runs on it."""

from __future__ import annotations

import copy
import json
import re

import numpy as np
import pytest
import torch
from PIL import Image

from dcgen.adapters import adapter_for
from dcgen.cli import main
from dcgen.pipelines import DCGenToyPipeline, PipelineTextEncoder
from dcgen.pipelines.text_encoders import TextEncodersError
from dcgen.toy import assets as A
from dcgen.toy.demo import _write_pipeline
from dcgen.toy.demo_sampling import generate, model_spaces

CAPTIONS = ["a large red circle top left", "a small blue square bottom right"]


@pytest.fixture(scope="module")
def assets():
    return A.load_toy_assets(None, torch.device("cpu"))


@pytest.fixture(scope="module")
def dcgen_model(assets):
    """A DC-Gen-shaped toy model: the base with random DC-AE latent layers, positions spaced."""
    torch.manual_seed(0)
    model = copy.deepcopy(assets.transformer)
    adapter = adapter_for(model)
    adapter.replace_latent_layers(int(assets.dcae.latent_channels), 1, init="random")
    adapter.set_position_scale(2)
    return model.eval().requires_grad_(False)


@pytest.fixture(scope="module")
def folder(tmp_path_factory, assets, dcgen_model):
    path = tmp_path_factory.mktemp("toy_pipeline") / "pipeline"
    _write_pipeline(path, dcgen_model, assets)
    return path


def test_the_folder_holds_the_model_and_loads_back(folder, dcgen_model):
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == "DCGenToyPipeline"
    assert index["text_encoder"] == ["dcgen.toy.text", "ToyTextEncoder"]
    assert index["vae"] == ["diffusers", "AutoencoderDC"]
    assert not list(folder.parent.glob(".*tmp"))  # written beside and renamed into place
    pipe = DCGenToyPipeline.from_pretrained(folder)
    saved = pipe.transformer.state_dict()
    for name, value in dcgen_model.state_dict().items():
        assert torch.equal(saved[name], value), name
    assert adapter_for(pipe.transformer).position_scale == 2.0
    assert pipe.text_encoder is not None and pipe.vae is not None
    pipe.to("cpu")  # diffusers' .to() reads every component's dtype and device
    assert pipe.text_encoder.dtype == torch.float32


@pytest.mark.parametrize("how", ["dtype", "per_component"])
def test_the_text_encoder_loads_in_the_pipelines_dtype(folder, how):
    # it stayed fp32 beside a bf16 transformer and VAE
    bf16 = torch.bfloat16
    kwargs = {"per_component": {"dtype": {"default": bf16}}}.get(how, {how: bf16})
    pipe = DCGenToyPipeline.from_pretrained(folder, **kwargs)
    assert pipe.text_encoder.dtype == pipe.transformer.dtype == bf16
    out = pipe("a red circle top left", height=128, width=128, num_inference_steps=2,
               output_type="pt", generator=torch.Generator().manual_seed(0)).images  # fmt: skip
    assert torch.isfinite(out).all()


def test_the_pipeline_samples_as_the_demo_does(folder, assets, dcgen_model):
    """Same weights, seeds and steps: the pipeline's images are the demo sampler's, bit for bit
    up to the [0, 1] conversion (both Euler on FLUX's shift rule, guidance 3.5)."""
    pipe = DCGenToyPipeline.from_pretrained(folder)
    seeds = [3, 11]
    out = pipe(
        prompt=CAPTIONS,
        height=assets.image_size,
        width=assets.image_size,
        num_inference_steps=3,
        generator=[torch.Generator().manual_seed(s) for s in seeds],
        output_type="pt",
    ).images
    space = model_spaces(assets, {"dcgen": dcgen_model})["dcgen"]
    with torch.no_grad():
        embeds, pooled = assets.text_encoder(CAPTIONS)
    ref = generate(space, embeds, pooled, seeds, 3, torch.device("cpu"))
    torch.testing.assert_close(out.float(), ref.clamp(-1, 1) / 2 + 0.5, atol=1e-6, rtol=0)


@pytest.mark.parametrize("prompt", [[], ["a red circle top left", None], 3])
def test_a_prompt_that_is_not_text_is_named(folder, prompt):
    # [] failed in a reshape inside the transformer, None in the tokenizer's .lower()
    pipe = DCGenToyPipeline.from_pretrained(folder)
    with pytest.raises(ValueError, match=r"^prompt: expected a string or a non-empty list of str"):
        pipe(prompt=prompt, height=128, width=128, num_inference_steps=1, output_type="latent")


def test_generate_command_samples_the_folder(folder, assets, tmp_path):
    png = tmp_path / "circle.png"
    code = main(
        ["generate", "--pipeline", str(folder), "--prompt", CAPTIONS[0], "--height", "128",
         "--width", "128", "--steps", "2", "--seed", "5", "--out", str(png), "--device", "cpu",
         "--dtype", "fp32", "--no-progress"]
    )  # fmt: skip
    assert code == 0
    pipe = DCGenToyPipeline.from_pretrained(folder)
    expected = pipe(
        prompt=CAPTIONS[0], height=128, width=128, num_inference_steps=2,
        generator=torch.Generator().manual_seed(5),
    ).images[0]  # fmt: skip
    assert np.array_equal(np.asarray(Image.open(png)), np.asarray(expected))


def test_max_sequence_length_is_refused_for_the_toy_encoder(folder, tmp_path, capsys):
    code = main(
        ["generate", "--pipeline", str(folder), "--prompt", CAPTIONS[0], "--height", "128",
         "--width", "128", "--steps", "1", "--max-sequence-length", "32",
         "--out", str(tmp_path / "x.png"), "--device", "cpu", "--no-progress"]
    )  # fmt: skip
    assert code != 0
    assert "max_sequence_length" in capsys.readouterr().err
    with pytest.raises(TextEncodersError, match="own length"):
        PipelineTextEncoder(folder, max_sequence_length=32)


def test_text_encoder_component_is_the_toy_family(folder):
    encode = PipelineTextEncoder(folder)
    assert encode.family == "toy"
    out = encode(CAPTIONS)
    assert out["prompt_embeds"].shape[0] == 2 and out["pooled_prompt_embeds"].shape[0] == 2


def test_bad_components_are_clear_errors(assets, dcgen_model, folder, tmp_path):
    with pytest.raises(TypeError, match="DCAE"):
        DCGenToyPipeline(dcgen_model, vae=assets.vae)
    with pytest.raises(TypeError, match="captions"):
        DCGenToyPipeline(dcgen_model, vae=assets.dcae, text_encoder="not a module")
    # A folder whose text encoder is some other class is refused by name, not imported.
    import shutil

    other = tmp_path / "other"
    shutil.copytree(folder, other)
    index = json.loads((other / "model_index.json").read_text())
    index["text_encoder"] = ["os", "system"]
    (other / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="DCGenToyPipeline loads only"):
        DCGenToyPipeline.from_pretrained(other)


def test_the_fast_demo_writes_its_dcgen_model(fast_run, assets):
    out, report = fast_run
    assert report["files"]["pipeline"] == "pipeline"
    pipe = DCGenToyPipeline.from_pretrained(out / report["files"]["pipeline"])
    adapter = adapter_for(pipe.transformer)
    assert adapter.latent_channels == assets.dcae.latent_channels
    assert adapter.patch_size == 1
    # Stage 3's LoRA is fused: a plain diffusers transformer, no peft layers left.
    assert not any("lora" in name for name, _ in pipe.transformer.named_parameters())


def test_generate_image_to_image(folder, tmp_path):
    """--image / --strength: the pipeline's image-to-image call, read from a PNG."""
    source = tmp_path / "source.png"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (128, 128, 3), dtype=np.uint8)).save(source)
    png = tmp_path / "edit.png"
    args = ["generate", "--pipeline", str(folder), "--prompt", CAPTIONS[1], "--height", "128",
            "--width", "128", "--steps", "4", "--seed", "2", "--device", "cpu", "--no-progress"]  # fmt: skip
    assert main([*args, "--image", str(source), "--strength", "0.5", "--out", str(png)]) == 0
    pipe = DCGenToyPipeline.from_pretrained(folder)
    expected = pipe(
        prompt=CAPTIONS[1], image=Image.open(source).convert("RGB"), strength=0.5, height=128,
        width=128, num_inference_steps=4, generator=torch.Generator().manual_seed(2),
    ).images[0]  # fmt: skip
    got = np.asarray(Image.open(png))
    assert np.array_equal(got, np.asarray(expected))
    plain = tmp_path / "plain.png"
    assert main([*args, "--out", str(plain)]) == 0
    assert not np.array_equal(got, np.asarray(Image.open(plain)))  # the image was used
    # --mask: inpainting, the pipeline's mask_image call
    mask = tmp_path / "mask.png"
    Image.fromarray(np.where(np.arange(128)[None, :] >= 64, 255, 0).astype(np.uint8).repeat(
        128, 0)).save(mask)  # fmt: skip
    inpainted = tmp_path / "inpainted.png"
    assert main([*args, "--image", str(source), "--mask", str(mask), "--out", str(inpainted)]) == 0
    expected = pipe(
        prompt=CAPTIONS[1], image=Image.open(source).convert("RGB"),
        mask_image=Image.open(mask).convert("RGB"), height=128, width=128,
        num_inference_steps=4, generator=torch.Generator().manual_seed(2),
    ).images[0]  # fmt: skip
    assert np.array_equal(np.asarray(Image.open(inpainted)), np.asarray(expected))
    # --mask-blur: the pixel composite; the left half, beyond 3 sigma of the mask, is the source
    blended = tmp_path / "blended.png"
    assert main([*args, "--image", str(source), "--mask", str(mask), "--mask-blur", "2",
                 "--out", str(blended)]) == 0  # fmt: skip
    got = np.asarray(Image.open(blended))
    assert np.array_equal(got[:, :58], np.asarray(Image.open(source))[:, :58])
    assert not np.array_equal(got[:, 64:], np.asarray(Image.open(source))[:, 64:])


@pytest.mark.parametrize(
    ("extra", "match"),
    [(["--strength", "0.5"], "--strength, --mask and --mask-blur go with --image"),
     (["--mask", "{png}"], "--strength, --mask and --mask-blur go with --image"),
     (["--image", "{png}", "--mask", "missing.png"], "--mask missing.png: no such file"),
     (["--image", "missing.png"], "no such file"),
     (["--image", "{not_png}"], "not an image"),
     (["--image", "{png}", "--strength", "1.5"], r"--strength: strength: expected a number"),
     (["--image", "{png}", "--mask-blur", "2"], "--mask-blur feathers --mask FILE"),
     (["--image", "{png}", "--mask", "{png}", "--mask-blur", "-1"], r"--mask-blur: expected pixels in \[0, 16384\]"),
     (["--image", "{png}", "--mask", "{png}", "--mask-blur", "nan"], r"--mask-blur: expected pixels in \[0, 16384\]"),
     (["--image", "{png}", "--mask", "{png}", "--mask-blur", "inf"], r"--mask-blur: expected pixels in \[0, 16384\]"),
     (["--image", "{png}", "--mask", "{png}", "--mask-blur", "1e9"], r"--mask-blur: expected pixels in \[0, 16384\]"),
     (["--mask-blur", "2"], "--strength, --mask and --mask-blur go with --image"),
     # the input photo was overwritten by the result
     (["--image", "{out}"], "this run writes .*x.png, which is its --image file"),
     (["--image", "{png}", "--mask", "{out}"], "which is its --mask file"),
     # a traceback (SafetensorError) after the model had loaded
     (["--quantized", "{not_png}"], "--quantized .*notes.txt: not a readable safetensors file"),
     (["--steps", "0"], "--steps: expected a positive integer, got 0"),
     (["--shift", "-1"], "--shift: expected a positive number"),
     (["--height", "0"], "--height: expected a positive number of pixels, got 0"),
     (["--width", "-32"], "--width: expected a positive number of pixels, got -32"),
     (["--guidance", "nan"], "--guidance: expected a finite number"),
     (["--out", "{dir_png}"], "expected a file path, it is a folder"),
     (["--out", "{png}/x.png"], "ok.png is a file, not a folder"),
     (["--prompt-file", "{png}"], "--prompt-file .*: expected a UTF-8 text file"),
     (["--prompt-file", "{tmp}"], "--prompt-file .*: is a folder")],
)  # fmt: skip
def test_generate_image_options_are_named(folder, tmp_path, capsys, extra, match):
    """Bad options are named before the pipeline loads (nothing is sampled, no traceback)."""
    not_png = tmp_path / "notes.txt"
    not_png.write_text("not an image")
    png = tmp_path / "ok.png"
    Image.new("RGB", (16, 16)).save(png)
    (tmp_path / "dir.png").mkdir()
    Image.new("RGB", (16, 16)).save(tmp_path / "x.png")  # --out itself, as an input
    extra = [e.format(not_png=not_png, png=png, tmp=tmp_path, dir_png=tmp_path / "dir.png",
                      out=tmp_path / "x.png") for e in extra]  # fmt: skip
    code = main(["generate", "--pipeline", str(folder), "--prompt", CAPTIONS[0],
                 "--out", str(tmp_path / "x.png"), "--device", "cpu", *extra])  # fmt: skip
    assert code != 0
    captured = capsys.readouterr()
    assert re.search(match, captured.err) and "Traceback" not in captured.err
    assert "sampled" not in captured.out


def test_sixteen_bit_grayscale_inputs_keep_their_values(tmp_path):
    # PIL's convert("RGB") clips 16-bit values at 255: 99.6% of a random 16-bit image became
    # white, silently, as an --image (or a --mask: nearly all repainted)
    from dcgen.cli.sample import _read_image

    values = np.random.default_rng(0).integers(0, 65536, (8, 8), dtype=np.uint16)
    Image.fromarray(values).save(tmp_path / "g16.png")
    rgb = np.asarray(_read_image(tmp_path / "g16.png"))
    assert rgb.shape == (8, 8, 3) and (rgb == rgb[..., :1]).all()
    np.testing.assert_array_equal(rgb[..., 0], np.rint(values / 65535 * 255).astype(np.uint8))


def test_image_inputs_are_read_as_shown_and_bombs_are_named(tmp_path, monkeypatch):
    # the EXIF rotation of a phone portrait was ignored (rotated, stretched, masks misplaced);
    # an image past PIL's pixel limit was a DecompressionBombError traceback
    from dcgen.cli import CLIError
    from dcgen.cli.sample import _read_image

    landscape = Image.new("RGB", (32, 16), (255, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    landscape.save(tmp_path / "portrait.jpg", exif=exif)
    assert _read_image(tmp_path / "portrait.jpg").size == (16, 32)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    with pytest.raises(CLIError, match="--image .*portrait.jpg: not an image PIL can read"):
        _read_image(tmp_path / "portrait.jpg")


def _generate_worker(rank: int, world: int, argv: list[str]) -> None:
    import os

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)  # two processes on two shared cores
    if main(argv) != 0:
        raise SystemExit(f"rank {rank}: generate failed")


def test_generate_under_torchrun_splits_the_images(folder, tmp_path):
    """Two processes (torchrun's environment) sample a 3 prompts x 2 seeds job between them:
    together the files one process writes, pixel for pixel, and process 0 the same grid once the
    other's images are there."""
    import torch.multiprocessing as mp

    def argv(out):
        return ["generate", "--pipeline", str(folder), "--prompt", CAPTIONS[0], "--prompt",
                CAPTIONS[1], "--prompt", "a small green triangle top right", "--seed", "1", "2",
                "--height", "128", "--width", "128", "--steps", "2", "--device", "cpu",
                "--no-progress", "--out", str(out)]  # fmt: skip

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each worker: the same summation order, the same pixels
    try:
        assert main(argv(tmp_path / "one" / "x.png")) == 0
    finally:
        torch.set_num_threads(threads)
    mp.spawn(_generate_worker, args=(2, argv(tmp_path / "two" / "x.png")), nprocs=2, join=True)
    one = {p.name for p in (tmp_path / "one").iterdir()}
    two = {p.name for p in (tmp_path / "two").iterdir()}
    assert one == two and len(two) == 7  # six images and the grid
    for name in two:
        a = np.asarray(Image.open(tmp_path / "one" / name))
        assert np.array_equal(np.asarray(Image.open(tmp_path / "two" / name)), a), name


def test_generate_skip_existing_samples_only_what_is_missing(folder, tmp_path, capsys):
    """A killed job's rerun: the PNGs already there are kept, the missing ones sampled (the
    same pixels a full run gives), and the grid is made from both."""
    out = tmp_path / "x.png"
    argv = ["generate", "--pipeline", str(folder), "--prompt", CAPTIONS[0], "--seed", "1", "2",
            "3", "--height", "128", "--width", "128", "--steps", "2", "--device", "cpu",
            "--no-progress", "--out", str(out), "--skip-existing"]  # fmt: skip
    assert main(argv) == 0
    full = {p.name: np.asarray(Image.open(p)) for p in tmp_path.glob("x*.png")}
    assert set(full) == {"x.png", "x-seed1.png", "x-seed2.png", "x-seed3.png"}
    (tmp_path / "x-seed2.png").unlink()
    (tmp_path / "x.png").unlink()
    capsys.readouterr()
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert printed.count("sampled seed(s)") == 1 and "sampled seed(s) 2 " in printed
    assert printed.count("(--skip-existing)") == 2
    for name, pixels in full.items():
        assert np.array_equal(np.asarray(Image.open(tmp_path / name)), pixels), name
    assert not list(tmp_path.glob(".*.tmp"))  # written atomically: no leftovers
    # another job's images (another size) were kept and pasted into a clipped grid
    Image.new("RGB", (64, 64)).save(tmp_path / "x-seed3.png")
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "--skip-existing: " in err and "x-seed3.png is 64x64, this run samples 128x128" in err


@pytest.mark.parametrize(
    ("seeds", "message"),
    [(["3", "3"], "expected each seed once, got [3] more than once"),
     (["99999999999999999999999"], "not a seed a torch.Generator takes")],
)  # fmt: skip
def test_generate_names_bad_seeds_before_loading(
    folder, tmp_path, capsys, monkeypatch, seeds, message
):
    # a repeated seed overwrote its own file and filled two grid cells; a huge one failed
    # only after the model had loaded
    monkeypatch.setattr(DCGenToyPipeline, "from_pretrained", None)  # loading would fail loudly
    argv = ["generate", "--pipeline", str(folder), "--prompt", CAPTIONS[0], "--seed", *seeds,
            "--height", "128", "--width", "128", "--device", "cpu", "--out", str(tmp_path / "s.png")]  # fmt: skip
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_generate_encodes_long_prompt_lists_in_chunks(folder, tmp_path, monkeypatch):
    """A long --prompt-file is encoded ENCODE_CHUNK prompts per text-encoder call (T5-XXL on
    thousands of prompts at once would not fit a GPU), the embeddings kept on the CPU; the
    images are the ones an all-at-once encoding gives."""
    import dcgen.cli.sample as sample

    prompts = [f"a {size} {colour} circle top left" for size in ("large", "small")
               for colour in ("red", "blue", "green", "yellow")][:7]  # fmt: skip
    (tmp_path / "prompts.txt").write_text("\n".join(prompts) + "\n")
    calls: list[int] = []
    encode = PipelineTextEncoder.__call__

    def spy(self, captions, negative=False):
        calls.append(len(captions))
        return encode(self, captions, negative)

    monkeypatch.setattr(PipelineTextEncoder, "__call__", spy)
    argv = ["generate", "--pipeline", str(folder), "--prompt-file", str(tmp_path / "prompts.txt"),
            "--height", "128", "--width", "128", "--steps", "1", "--device", "cpu",
            "--no-progress"]  # fmt: skip
    monkeypatch.setattr(sample, "ENCODE_CHUNK", 3)
    assert main([*argv, "--out", str(tmp_path / "a" / "x.png")]) == 0
    assert calls == [3, 3, 1]
    monkeypatch.setattr(sample, "ENCODE_CHUNK", 100)
    assert main([*argv, "--out", str(tmp_path / "b" / "x.png")]) == 0
    assert calls[3:] == [7]
    for i in range(7):
        a = np.asarray(Image.open(tmp_path / "a" / f"x-p{i}.png")).astype(int)
        b = np.asarray(Image.open(tmp_path / "b" / f"x-p{i}.png")).astype(int)
        assert np.abs(a - b).max() <= 1, i  # the same images (up to a rounding step)


def test_an_fp16_autoencoder_that_overflows_decodes_again_in_fp32(folder, caplog):
    # the toy DC-AE's GLU products pass fp16's 65,504 at 128 px: the pipeline wrote the NaN
    # image as a black PNG with no error
    pipe = DCGenToyPipeline.from_pretrained(folder)
    run = dict(prompt=CAPTIONS[:1], height=128, width=128, num_inference_steps=2)
    latents = pipe(**run, output_type="latent", generator=torch.Generator().manual_seed(2)).images
    with torch.no_grad():
        expected = pipe._decode_finite(latents, None, 0, None)
        pipe.vae.to(torch.float16)
        assert not torch.isfinite(pipe.decode_latents(latents, None, 0)).all()  # the overflow
        with caplog.at_level("WARNING", logger="dcgen.pipelines.base"):
            images = pipe(**run, output_type="pt", generator=torch.Generator().manual_seed(2))
    images = images.images
    assert "decoding again in float32" in caplog.text
    assert pipe.vae.dtype == torch.float16  # restored
    # the next call decodes in fp32 straight away (one decode, no second warning)
    caplog.clear()
    calls = []
    decode = pipe.decode_latents

    def counted(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        calls.append(pipe.vae.dtype)
        return decode(*args, **kwargs)

    pipe.decode_latents = counted
    with torch.no_grad(), caplog.at_level("WARNING", logger="dcgen.pipelines.base"):
        again = pipe._decode_finite(latents, None, 0, None)
    assert calls == [torch.float32] and not caplog.text
    torch.testing.assert_close(again, expected, atol=2e-3, rtol=0)
    # the retry runs the fp16-rounded weights in fp32: within 1e-3 of the fp32 model's image
    assert torch.isfinite(images).all()
    torch.testing.assert_close(images.float(), (expected / 2 + 0.5).clamp(0, 1), atol=1e-3, rtol=0)


def test_non_finite_latents_are_an_error_not_a_black_image(folder):
    pipe = DCGenToyPipeline.from_pretrained(folder)
    with pytest.raises(FloatingPointError, match="non-finite latents"):
        pipe._decode_finite(torch.full((1, 32, 4, 4), float("nan")), None, 0, None)
