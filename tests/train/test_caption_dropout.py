"""Caption dropout (stages 2-3): a configured fraction of samples trains on the empty prompt's
text, the same rows on every run (drawn from the step's generator after the other draws), and
the empty prompt comes from the file precompute writes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dcgen.adapters import adapter_for
from dcgen.train.cache import LatentCache
from dcgen.train.config import ConfigError
from dcgen.train.loop import StepRandom
from dcgen.train.null_text import NULL_TEXT_NAME, drop_captions, load_null_text, save_null_text
from dcgen.train.stages import _flow_inputs, load_transformer, train_output_layer
from tests.train.stage_utils import config, make_cache, save_adapted, text_encoder


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("caption_dropout")


@pytest.fixture(scope="module")
def cache(root: Path) -> Path:
    out = make_cache(root)
    null = {k: v[0] for k, v in text_encoder([""]).items()}
    save_null_text(out, null, torch.float32)
    return out


def test_drop_captions_replaces_exactly_the_dropped_rows():
    g = torch.Generator().manual_seed(0)
    inputs = {"prompt_embeds": torch.randn(4, 3, 8, generator=g),
              "pooled_prompt_embeds": torch.randn(4, 8, generator=g), "x0": torch.zeros(4)}  # fmt: skip
    null = {"prompt_embeds": torch.randn(3, 8, generator=g), "pooled_prompt_embeds": torch.ones(8)}
    drop = torch.tensor([True, False, False, True])
    out = drop_captions(inputs, drop, null)
    for i in range(4):
        for name in ("prompt_embeds", "pooled_prompt_embeds"):
            want = null[name] if drop[i] else inputs[name][i]
            assert torch.equal(out[name][i], want), (i, name)
    assert out["x0"] is inputs["x0"] and out["prompt_embeds"] is not inputs["prompt_embeds"]
    # SANA: the mask of padded text tokens goes with its embeddings
    masked = {"prompt_embeds": inputs["prompt_embeds"], "attention_mask": torch.ones(4, 3).long()}
    null_mask = {
        "prompt_embeds": null["prompt_embeds"],
        "prompt_attention_mask": torch.tensor([1, 0, 0]),
    }
    out = drop_captions(masked, drop, null_mask)
    assert out["attention_mask"].tolist() == [[1, 0, 0], [1, 1, 1], [1, 1, 1], [1, 0, 0]]
    assert out["attention_mask"].dtype == torch.long
    with pytest.raises(ValueError, match=r"shape \(2, 8\), the batch's rows \(3, 8\)"):
        drop_captions(inputs, drop, {**null, "prompt_embeds": torch.zeros(2, 8)})
    with pytest.raises(ValueError, match="no 'pooled_prompt_embeds'"):
        drop_captions(inputs, drop, {"prompt_embeds": null["prompt_embeds"]})


def test_the_configured_fraction_is_dropped_the_same_way_every_run(root: Path, cache: Path):
    adapter = adapter_for(load_transformer(save_adapted(root)))
    null = load_null_text(cache / NULL_TEXT_NAME)
    cfg = config(root, "output", root / "adapted", cache, caption_dropout=0.25)
    make = _flow_inputs(adapter, cfg, null_text=null)
    n = 400
    g = torch.Generator().manual_seed(1)
    batch = {"dcae_latent": torch.randn(n, 2, 2, 2, generator=g),
             "prompt_embeds": torch.randn(n, 3, 32, generator=g) + 10,
             "pooled_prompt_embeds": torch.randn(n, 32, generator=g) + 10}  # fmt: skip

    def dropped(step: int) -> torch.Tensor:
        out = make(batch, StepRandom(cfg.seed, step, n, slice(None), torch.device("cpu")))
        rows = (out["prompt_embeds"] == null["prompt_embeds"]).flatten(1).all(1)
        assert torch.equal(
            rows, (out["pooled_prompt_embeds"] == null["pooled_prompt_embeds"]).all(1)
        )
        return rows

    first = dropped(3)
    assert 60 <= int(first.sum()) <= 140  # 100 expected; 4.6 standard deviations either side
    assert torch.equal(dropped(3), first)  # the step's generator decides: exact resume
    assert not torch.equal(dropped(4), first)
    # dropout drawn after the other draws: sigmas and noise as without it
    plain = _flow_inputs(adapter, cfg)(batch, StepRandom(cfg.seed, 3, n, slice(None), "cpu"))
    with_drop = make(batch, StepRandom(cfg.seed, 3, n, slice(None), "cpu"))
    assert torch.equal(plain["sigmas"], with_drop["sigmas"])
    assert torch.equal(plain["noise"], with_drop["noise"])


def test_stage2_trains_with_caption_dropout(root: Path, cache: Path, tmp_path: Path):
    transformer = load_transformer(save_adapted(root))
    cfg = config(root, "output", root / "adapted", cache, caption_dropout=0.5,
                 out_dir=str(tmp_path / "s2"))  # fmt: skip
    result = train_output_layer(transformer, LatentCache(cache), cfg, progress=False)
    assert result["steps"] == cfg.steps and torch.isfinite(torch.tensor(result["final_loss"]))
    # without the empty prompt's embeddings: a clear error naming the fix
    bare = make_cache(tmp_path / "bare")
    cfg = config(root, "output", root / "adapted", bare, caption_dropout=0.5,
                 out_dir=str(tmp_path / "s2b"))  # fmt: skip
    with pytest.raises(FileNotFoundError, match="rerun `dcgen precompute` with the text encoders"):
        train_output_layer(transformer, LatentCache(bare), cfg, progress=False)


def test_caption_dropout_is_checked(root: Path, cache: Path):
    for bad in (1.0, -0.1, "0.1", True):
        with pytest.raises(ConfigError, match="caption_dropout: expected a finite number in"):
            config(root, "output", root / "adapted", cache, caption_dropout=bad).validate()
