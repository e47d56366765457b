"""The asset-training recipe runs (two steps per part) and writes loadable folders."""

from __future__ import annotations

import json

import torch

from dcgen.toy import assets as A
from dcgen.toy import train_assets as T


def test_every_training_part_runs_and_saves(tmp_path):
    torch.manual_seed(0)
    T.train(tmp_path, parts=("vae", "evaluator", "dcae", "flux"), scale=0.0005, progress=False)
    for folder in A.FOLDERS.values():
        assert (tmp_path / folder).is_dir(), folder
    log = json.loads((tmp_path / "training.json").read_text())
    assert set(log) == {"vae", "evaluator", "dcae", "flux"}
    vae = T._load_part(tmp_path, "vae")
    # The latent statistics were written into the config (FLUX's shift/scale convention).
    assert vae.config.scaling_factor != 1.0
    transformer, text = T._load_part(tmp_path, "flux")
    assert transformer.config["_dcgen_latent_patch_size"] == 2
    assert text.config.max_length == 16


def test_unknown_part_is_named(tmp_path):
    import pytest

    with pytest.raises(ValueError, match="unknown part"):
        T.train(tmp_path, parts=("vae", "gan"))
