"""The toy text encoder: tokenizer and the two outputs FLUX needs."""

from __future__ import annotations

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
