"""The toy text encoder: tokenizer and the two outputs FLUX needs."""

from __future__ import annotations

import pytest
import torch

from dcgen.toy.text import VOCAB, ToyTextEncoder, tokenize


def test_tokenize_pads_and_marks_unknown_words():
    ids, mask = tokenize(["a red circle", "a zebra"], max_length=5)
    assert ids.shape == (2, 5) and mask.sum(1).tolist() == [3, 2]
    assert ids[1, 1] == VOCAB.index("<unk>")
    assert (ids[~mask] == 0).all()


def test_outputs_depend_only_on_the_words(tmp_path):
    torch.manual_seed(0)
    enc = ToyTextEncoder().eval()
    e, p = enc.encode(["a small red circle top left", "a large blue square bottom right"])
    assert e.shape == (2, enc.config.max_length, enc.config.dim)
    assert p.shape == (2, enc.config.pooled_dim)
    assert (e[:, 6:] == 0).all()  # padding positions are zero
    assert not torch.allclose(e[0], e[1])
    enc.save_pretrained(tmp_path / "te")
    again = ToyTextEncoder.from_pretrained(tmp_path / "te")
    e2, p2 = again.encode(["a small red circle top left", "a large blue square bottom right"])
    assert torch.equal(e, e2) and torch.equal(p, p2)


def test_empty_caption_is_finite_on_both_encoder_paths():
    """An empty caption masks every token. Under no_grad torch takes its fused encoder path,
    which returned NaN rows for a fully masked sequence (and the demo's true-CFG negative
    prompt and the stored null-text embeddings are exactly such captions)."""
    torch.manual_seed(0)
    enc = ToyTextEncoder().eval()
    captions = ["", "   ", "a red circle"]
    with torch.no_grad():
        e, p = enc(captions)
    assert torch.isfinite(e).all() and torch.isfinite(p).all()
    assert (e[:2] == 0).all()  # no words: the sequence is zero, the pool sees only its bias
    torch.testing.assert_close(p[:2], enc.pool.bias.detach().expand(2, -1))
    e_grad, p_grad = enc(captions)  # autograd path: the unfused encoder
    torch.testing.assert_close(e, e_grad.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(p, p_grad.detach(), rtol=1e-5, atol=1e-5)


def test_a_failed_save_leaves_the_previous_folder_whole(tmp_path, monkeypatch):
    import dcgen.toy._folder as folder

    torch.manual_seed(0)
    old = ToyTextEncoder().eval()
    old.save_pretrained(tmp_path / "te")
    before = sorted(p.name for p in (tmp_path / "te").iterdir())

    def dies_midway(tensors, filename, *args, **kwargs):
        with open(filename, "wb") as f:
            f.write(b"half a file")
        raise KeyboardInterrupt  # a kill during the weights' write

    monkeypatch.setattr(folder, "save_file", dies_midway)
    with pytest.raises(KeyboardInterrupt):
        ToyTextEncoder().save_pretrained(tmp_path / "te")
    assert sorted(p.name for p in (tmp_path / "te").iterdir()) == before  # no temp file left
    again = ToyTextEncoder.from_pretrained(tmp_path / "te")
    for k, v in old.state_dict().items():
        assert torch.equal(again.state_dict()[k], v), k
