"""A base pipeline folder's text encoders reused by dcgen (dcgen.pipelines.text_encoders):
loaded by the classes model_index.json names, copied or linked into another pipeline folder,
and encoding captions exactly as the pipelines encode a prompt."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from dcgen.pipelines import DCGenFluxPipeline, DCGenSanaPipeline
from dcgen.pipelines.text_encoders import (
    PipelineTextEncoder,
    TextEncodersError,
    copy_text_components,
    family_of_pipeline,
    has_text_components,
    load_text_components,
)

from .tiny_text import PROMPT, save_flux_pipeline, save_sana_pipeline

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("text_components")
    return {
        "flux": save_flux_pipeline(root / "flux", with_text=True),
        "flux_bare": save_flux_pipeline(root / "flux_bare", with_text=False),
        "sana": save_sana_pipeline(root / "sana", with_text=True),
    }


def _pipeline_encoding(cls, folder, prompt: str, max_len: int):  # noqa: ANN001
    """What the pipeline loaded from ``folder`` makes of ``prompt`` itself."""
    pipe = cls.from_pretrained(folder)
    with torch.no_grad():
        return pipe.encode_prompt([prompt], torch.device("cpu"), max_len)


def test_flux_encoder_matches_the_pipeline_and_loads_in_the_dtype_asked(folders):
    assert family_of_pipeline(folders["flux"]) == "flux"
    enc = PipelineTextEncoder(folders["flux"], max_sequence_length=16)
    out = enc([PROMPT, "a blue circle"])
    assert sorted(out) == ["pooled_prompt_embeds", "prompt_embeds"]
    assert out["prompt_embeds"].shape[:2] == (2, 16)
    embeds, pooled, mask = _pipeline_encoding(DCGenFluxPipeline, folders["flux"], PROMPT, 16)
    assert mask is None
    assert torch.equal(out["prompt_embeds"][:1], embeds)
    assert torch.equal(out["pooled_prompt_embeds"][:1], pooled)
    assert not torch.equal(out["prompt_embeds"][0], out["prompt_embeds"][1])
    assert PipelineTextEncoder(folders["flux"]).max_sequence_length == 512  # FLUX.1-dev's T5
    parts = load_text_components(folders["flux"], "flux", torch.bfloat16)
    assert parts["text_encoder"].dtype == parts["text_encoder_2"].dtype == torch.bfloat16
    assert not any(p.requires_grad for p in parts["text_encoder_2"].parameters())


def test_sana_encoder_returns_the_attention_mask(folders):
    enc = PipelineTextEncoder(folders["sana"], max_sequence_length=12)
    assert enc.family == "sana"
    out = enc([PROMPT])
    assert sorted(out) == ["prompt_attention_mask", "prompt_embeds"]
    embeds, pooled, mask = _pipeline_encoding(DCGenSanaPipeline, folders["sana"], PROMPT, 12)
    assert pooled is None
    assert torch.equal(out["prompt_embeds"], embeds)
    assert torch.equal(out["prompt_attention_mask"], mask)
    # kept: the first token, the prompt's words (and here the instruction's last token: the
    # budget assumes a tokenizer that adds BOS, as Gemma's does, this word-level one does not),
    # then the padding, masked
    mask = out["prompt_attention_mask"][0]
    assert mask.tolist() == [1] * 8 + [0] * 4


def test_encodings_equal_the_diffusers_pipelines(folders):
    """The reference recipe is diffusers' own: FluxPipeline.encode_prompt (CLIP pooled + T5)
    and SanaPipeline.encode_prompt (lower-cased prompt, the complex human instruction in front
    of positive prompts only, BOS + the last max_sequence_length - 1 positions)."""
    from diffusers import FluxPipeline, SanaPipeline

    from dcgen.pipelines.sana import sana_instruction

    cpu = torch.device("cpu")
    parts = load_text_components(folders["flux"], "flux")
    ref = FluxPipeline(scheduler=None, vae=None, transformer=None, **parts)
    with torch.no_grad():
        embeds, pooled, _ = ref.encode_prompt(PROMPT, device=cpu, max_sequence_length=16)
    ours = PipelineTextEncoder(family="flux", components=parts, max_sequence_length=16)([PROMPT])
    assert torch.equal(ours["prompt_embeds"], embeds)
    assert torch.equal(ours["pooled_prompt_embeds"], pooled)

    parts = load_text_components(folders["sana"], "sana")
    ref = SanaPipeline(vae=None, transformer=None, scheduler=None, **parts)
    instruction = sana_instruction()
    assert len(instruction) > 1 and instruction[0].startswith("Given a user prompt")
    prompt = "A Red Square on the left "  # lower-cased and stripped by both
    with torch.no_grad():
        e, m, ne, nm = ref.encode_prompt(
            prompt, negative_prompt="blue circle", device=cpu, max_sequence_length=12,
            complex_human_instruction=instruction,
        )  # fmt: skip
    enc = PipelineTextEncoder(family="sana", components=parts, max_sequence_length=12)
    ours, neg = enc([prompt]), enc(["blue circle"], negative=True)
    assert torch.equal(ours["prompt_embeds"], e) and torch.equal(ours["prompt_attention_mask"], m)
    assert torch.equal(neg["prompt_embeds"], ne) and torch.equal(neg["prompt_attention_mask"], nm)
    # without the instruction: another encoding, as diffusers gives with none
    plain = PipelineTextEncoder(
        family="sana", components=parts, max_sequence_length=12, complex_human_instruction=False
    )([prompt])
    with torch.no_grad():
        e0, _, _, _ = ref.encode_prompt(
            prompt, do_classifier_free_guidance=False, device=cpu, max_sequence_length=12
        )
    assert torch.equal(plain["prompt_embeds"], e0) and not torch.equal(e0, e)


def test_missing_components_are_named(folders, tmp_path):
    with pytest.raises(TextEncodersError, match="no model_index.json"):
        load_text_components(tmp_path, "flux")
    with pytest.raises(TextEncodersError, match=r"lacks the FLUX text components \['text_encoder'"):
        load_text_components(folders["flux_bare"], "flux")
    # a SANA folder has one text encoder, not FLUX's two
    with pytest.raises(TextEncodersError, match=r"\['text_encoder_2', 'tokenizer_2'\]"):
        load_text_components(folders["sana"], "flux")
    with pytest.raises(TextEncodersError, match="family: expected one of"):
        load_text_components(folders["flux"], "sd3")
    # registered but its folder is gone
    broken = tmp_path / "broken"
    shutil.copytree(folders["flux"], broken)
    shutil.rmtree(broken / "tokenizer_2")
    assert not has_text_components(broken, "flux")
    with pytest.raises(TextEncodersError, match=r"\['tokenizer_2'\]"):
        load_text_components(broken, "flux")


@pytest.mark.parametrize("link", [False, True])
def test_copy_makes_a_bare_pipeline_encode_text(folders, tmp_path, link):
    out = tmp_path / "pipe"
    shutil.copytree(folders["flux_bare"], out)
    assert not has_text_components(out, "flux")
    names = copy_text_components(folders["flux"], out, "flux", link=link)
    assert sorted(names) == ["text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2"]
    assert all((out / n).is_symlink() == link for n in names)
    index = json.loads((out / "model_index.json").read_text())
    assert index["text_encoder_2"] == ["transformers", "T5EncoderModel"]
    assert not list(out.glob(".*tmp"))
    pipe = DCGenFluxPipeline.from_pretrained(out)
    assert pipe._has_text_encoders()
    with torch.no_grad():
        got = pipe.encode_prompt([PROMPT], torch.device("cpu"), 16)
    want = _pipeline_encoding(DCGenFluxPipeline, folders["flux"], PROMPT, 16)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_an_interrupted_copy_registers_nothing_and_a_rerun_completes(
    folders, tmp_path, monkeypatch
):
    out = tmp_path / "pipe"
    shutil.copytree(folders["flux_bare"], out)
    before = (out / "model_index.json").read_text()
    real = shutil.copytree
    calls = []

    def dies_on_the_second(src, dst, **kw):  # noqa: ANN001, ANN202
        calls.append(dst)
        if len(calls) == 2:
            real(src, dst, **kw)  # half written, then the process "dies"
            raise KeyboardInterrupt
        return real(src, dst, **kw)

    monkeypatch.setattr(shutil, "copytree", dies_on_the_second)
    with pytest.raises(KeyboardInterrupt):
        copy_text_components(folders["flux"], out, "flux")
    assert (out / "model_index.json").read_text() == before  # nothing registered
    assert not has_text_components(out, "flux")
    monkeypatch.setattr(shutil, "copytree", real)
    copy_text_components(folders["flux"], out, "flux")  # leftovers replaced
    assert has_text_components(out, "flux") and not list(out.glob(".*tmp"))
    assert DCGenFluxPipeline.from_pretrained(out)._has_text_encoders()
    with pytest.raises(TextEncodersError, match="is its own source"):
        copy_text_components(out, out, "flux")  # would delete what it copies
    assert has_text_components(out, "flux")


def test_the_identity_is_the_settings_and_the_text_components_contents(folders, tmp_path):
    """Not the folder's path: a copy keeps the identity (a copied project refused its own
    cache), a text encoder rewritten in place changes it (it was taken for the old one)."""
    from safetensors.torch import load_file, save_file

    a = PipelineTextEncoder(folders["flux"], max_sequence_length=16)
    b = PipelineTextEncoder(folders["flux"], max_sequence_length=32)
    assert a.fingerprint_name != b.fingerprint_name
    assert str(folders["flux"].resolve()) not in a.fingerprint_name
    assert a.content_digest == b.content_digest
    copy = tmp_path / "copy"
    shutil.copytree(folders["flux"], copy)
    c = PipelineTextEncoder(copy, max_sequence_length=16)
    assert (c.fingerprint_name, c.content_digest) == (a.fingerprint_name, a.content_digest)
    weights = next((copy / "text_encoder_2").glob("*.safetensors"))
    state = load_file(str(weights))
    save_file({k: -v if v.is_floating_point() else v for k, v in state.items()}, str(weights))
    rewritten = PipelineTextEncoder(copy, max_sequence_length=16).content_digest
    assert rewritten != a.content_digest
    # the transformer is not part of it
    transformer_files = list((copy / "transformer").glob("*.safetensors"))
    assert transformer_files
    for f in transformer_files:
        f.write_bytes(f.read_bytes()[:-8] + bytes(8))
    assert PipelineTextEncoder(copy, max_sequence_length=16).content_digest == rewritten


def test_pipelines_default_to_their_models_text_length(folders, monkeypatch):
    """Called with a text prompt and no max_sequence_length, FLUX encodes 512 T5 tokens and
    SANA 300 Gemma tokens, as FluxPipeline and SanaPipeline do."""
    seen = []
    for cls, folder, want in ((DCGenFluxPipeline, "flux", 512), (DCGenSanaPipeline, "sana", 300)):
        real = cls.encode_prompt

        def spy(self, prompt, device, max_sequence_length, negative=False, _real=real):  # noqa: ANN001, ANN202
            seen.append(max_sequence_length)
            return _real(self, prompt, device, 12, negative)  # (encode short: a fast test)

        monkeypatch.setattr(cls, "encode_prompt", spy)
        pipe = cls.from_pretrained(folders[folder])
        pipe.set_progress_bar_config(disable=True)
        pipe(prompt=PROMPT, height=64, width=64, num_inference_steps=1, output_type="latent")
        assert seen[-1] == want
        monkeypatch.undo()


def test_a_failed_recopy_keeps_the_components_already_there(folders, tmp_path, monkeypatch):
    # each old component was deleted before its new copy was made: a full disk mid-copy left
    # the pipeline registering a text encoder whose folder was gone
    import errno

    out = tmp_path / "pipe"
    shutil.copytree(folders["flux_bare"], out)
    copy_text_components(folders["flux"], out, "flux")
    real = shutil.copytree

    def full_disk(src, dst, **kw):  # noqa: ANN001, ANN202
        if Path(src).name == "text_encoder_2":
            Path(dst).mkdir()
            (Path(dst) / "half").write_text("x")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(src, dst, **kw)

    monkeypatch.setattr(shutil, "copytree", full_disk)
    with pytest.raises(OSError, match=r"cannot write .*text_encoder_2: No space left"):
        copy_text_components(folders["flux"], out, "flux")
    assert has_text_components(out, "flux") and not list(out.glob(".*"))
    assert not (out / "text_encoder_2" / "half").exists()
    with torch.no_grad():
        got = DCGenFluxPipeline.from_pretrained(out).encode_prompt(
            [PROMPT], torch.device("cpu"), 16
        )
    want = _pipeline_encoding(DCGenFluxPipeline, folders["flux"], PROMPT, 16)
    assert torch.equal(got[0], want[0])
