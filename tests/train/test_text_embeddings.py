"""save_text_embeddings / TextEmbeddingTable: the precomputed-captions file format."""

from __future__ import annotations

import pytest
import torch

import dcgen.train.prepare as prepare
from dcgen.train.prepare import TextEmbeddingTable, save_text_embeddings


def _embeddings(seed: int) -> dict[str, dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return {
        c: {"prompt_embeds": torch.randn(3, 8, generator=g), "pooled_prompt_embeds": torch.randn(4, generator=g)}
        for c in ("a red square", "a blue circle")
    }  # fmt: skip


def test_round_trip_by_caption(tmp_path):
    want = _embeddings(0)
    table = TextEmbeddingTable(save_text_embeddings(tmp_path / "text.safetensors", want))
    got = table(["a blue circle", "a red square"])
    for i, caption in enumerate(["a blue circle", "a red square"]):
        for name, t in want[caption].items():
            assert torch.equal(got[name][i], t), (caption, name)


def test_a_killed_write_keeps_the_previous_file(tmp_path, monkeypatch):
    path = save_text_embeddings(tmp_path / "text.safetensors", _embeddings(0))

    def dies_midway(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"half a file")
        raise KeyboardInterrupt

    monkeypatch.setattr(prepare, "save_file", dies_midway)
    with pytest.raises(KeyboardInterrupt):
        save_text_embeddings(path, _embeddings(1))
    assert [p.name for p in tmp_path.iterdir()] == ["text.safetensors"]  # no temp file left
    got = TextEmbeddingTable(tmp_path)(["a red square"])
    assert torch.equal(got["prompt_embeds"][0], _embeddings(0)["a red square"]["prompt_embeds"])


def test_table_and_encoder_mix_and_must_agree(tmp_path):
    from dcgen.train.prepare import PrepareError, combine_text_sources

    want = _embeddings(0)
    table = TextEmbeddingTable(save_text_embeddings(tmp_path / "text.safetensors", want))

    def encoder(pad: int):  # noqa: ANN202
        def encode(captions: list[str]) -> dict[str, torch.Tensor]:
            n = len(captions)
            return {
                "prompt_embeds": torch.ones(n, 3 + pad, 8),
                "pooled_prompt_embeds": torch.ones(n, 4),
            }

        return encode

    # the table where it has the caption, the encoder for the rest, in the callers' order
    got = combine_text_sources(table, encoder(0))(["a green star", "a red square"])
    assert torch.equal(got["prompt_embeds"][0], torch.ones(3, 8))
    assert torch.equal(got["prompt_embeds"][1], want["a red square"]["prompt_embeds"])
    # an encoder with another token length (or other names) would make a cache whose samples
    # differ, or fail in a bare KeyError / stack error: named instead
    mixed = combine_text_sources(table, encoder(2))
    with pytest.raises(PrepareError, match=r"the text encoder gives tensors .*\(5, 8\).*\(3, 8\)"):
        mixed(["a green star", "a red square"])


def test_a_text_encoder_module_in_the_working_directory_is_found(tmp_path, monkeypatch):
    # `python -m dcgen` puts the working directory on sys.path, the installed `dcgen` command
    # does not: --text-encoder my_encoder:encode worked with one and not the other
    import sys

    from dcgen.train.prepare import PrepareError, load_entry_point

    (tmp_path / "dcgen_test_cwd_encoder.py").write_text("def encode(captions):\n    return 7\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    monkeypatch.delitem(sys.modules, "dcgen_test_cwd_encoder", raising=False)
    assert load_entry_point("dcgen_test_cwd_encoder:encode")(["x"]) == 7
    with pytest.raises(PrepareError, match="cannot import 'no_such_module_xyz'"):
        load_entry_point("no_such_module_xyz:encode")


def test_a_failed_text_encoder_import_leaves_sys_path_as_it_was(tmp_path, monkeypatch):
    # The retry from the working directory left it on sys.path when that import failed too
    import sys

    from dcgen.train.prepare import PrepareError, load_entry_point

    (tmp_path / "dcgen_test_broken_encoder.py").write_text("import dcgen_no_such_dependency\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    before = list(sys.path)
    for spec in ("dcgen_test_broken_encoder:encode", "dcgen_no_such_module_abc:encode"):
        with pytest.raises(PrepareError, match="cannot import"):
            load_entry_point(spec)
        assert sys.path == before
