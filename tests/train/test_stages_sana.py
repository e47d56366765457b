"""DC-Gen's three stages on a tiny SANA (base latent space: a DC-AE's, patch size 1), and SANA's
padded-caption mask reaching the model in every stage."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dcgen.adapters import adapter_for
from dcgen.train import precompute
from dcgen.train.cache import LatentCache
from dcgen.train.stages import (
    finetune_lora,
    load_latent_layers,
    load_transformer,
    run,
    train_output_layer,
)
from tests.adapters.tiny import tiny_sana
from tests.train.stage_utils import (
    DCAE_CHANNELS,
    ImageSet,
    assert_lora_round_trip,
    base_encoder,
    config,
    dcae_encoder,
    fixed_loss,
    make_cache,
    save_sana_adapted,
    save_sana_base,
    text_encoder,
)


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("stages_sana")


@pytest.fixture(scope="module")
def cache(root: Path) -> Path:
    return make_cache(root)


def test_stage1_aligns_the_sana_embedder(root: Path, cache: Path) -> None:
    cfg = config(root, "align", save_sana_base(root), cache, out_dir=str(root / "s1"))
    summary = run(cfg, progress=False)
    assert summary["downsample_factor"] == 4  # 16x16 base tokens onto the 4x4 DC-AE grid
    mse = summary["align_mse"]
    assert mse["ridge"] < 0.2 * mse["random"] and mse["after"] < 0.2 * mse["random"]
    before, after = summary["feature_distance"]["before"], summary["feature_distance"]["after"]
    assert len(before) == len(after) == 2
    for b, a in zip(before, after, strict=True):
        assert a < 0.25 * b, (before, after)
    adapted = load_transformer(root / "s1" / "transformer")
    assert adapter_for(adapted).latent_channels == DCAE_CHANNELS
    base = load_transformer(root / "sana_base")
    load_latent_layers(base, root / "s1" / "latent_layers.safetensors")
    torch.testing.assert_close(
        base.patch_embed.proj.weight, adapted.patch_embed.proj.weight, rtol=0, atol=0
    )


def test_a_sana_run_at_the_flux_shift_rule_is_warned_about(root: Path, cache: Path, caplog) -> None:
    # TrainConfig's default shift_rule is FLUX's resolution-dependent one; SANA samples at a
    # constant flow shift, so a SANA run left at the default trained at other noise levels
    kw = dict(align_sgd_steps=0)
    with caplog.at_level("WARNING"):
        run(config(root, "align", save_sana_base(root), cache, out_dir=str(root / "s1_flux"),
                   shift_rule="flux", **kw), progress=False)  # fmt: skip
    assert "shift_rule = 'flux' (the default) on a SANA transformer" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING"):
        run(config(root, "align", save_sana_base(root), cache, out_dir=str(root / "s1_const"),
                   shift_rule="constant", shift_constant=3.0, **kw), progress=False)  # fmt: skip
    assert "shift_rule" not in caplog.text


def test_stage2_trains_the_sana_head_with_blocks_frozen(root: Path, cache: Path) -> None:
    transformer = load_transformer(save_sana_adapted(root))
    blocks = {k: v.clone() for k, v in transformer.transformer_blocks.state_dict().items()}
    before = fixed_loss(transformer, cache)
    cfg = config(root, "output", root / "sana_adapted", cache, steps=20, lr=1e-2,
                 out_dir=str(root / "s2"))  # fmt: skip
    train_output_layer(transformer, LatentCache(cache), cfg, progress=False)
    assert fixed_loss(transformer, cache) < 0.8 * before
    for k, v in transformer.transformer_blocks.state_dict().items():
        assert torch.equal(v, blocks[k]), k


def test_stage3_sana_lora_reduces_loss_and_round_trips(
    root: Path, cache: Path, tmp_path: Path
) -> None:
    path = save_sana_adapted(root)
    transformer = load_transformer(path)
    before = fixed_loss(transformer, cache)
    cfg = config(root, "finetune", path, cache, steps=20, lr=1e-2, out_dir=str(root / "s3"))
    finetune_lora(transformer, LatentCache(cache), cfg, progress=False)
    after = fixed_loss(transformer, cache)
    assert after < 0.8 * before, (before, after)
    assert_lora_round_trip(transformer, path, tmp_path, lambda m: fixed_loss(m, cache), after)


def masked_text_encoder(captions: list[str]) -> dict[str, torch.Tensor]:
    """stage_utils' embeddings with SANA-style padding: the last of 3 tokens is padding."""
    out = text_encoder(captions)
    mask = torch.tensor([1.0, 1.0, 0.0]).expand(len(captions), 3).clone()
    return {"prompt_embeds": out["prompt_embeds"], "prompt_attention_mask": mask}


@pytest.mark.parametrize("stage", ["align", "output", "finetune"])
def test_every_stage_passes_the_caption_mask_to_the_model(
    root: Path, stage: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Stage 1's feature distances and head, stages 2-3's loss and their sample grids run the
    model as the pipelines sample it: with the padded tokens masked."""
    masked = root / "masked_cache"
    if not masked.exists():
        encoders = {"base_latent": base_encoder, "dcae_latent": dcae_encoder}
        precompute(ImageSet(8), encoders, masked_text_encoder, masked, shard_size=4,
                   batch_size=4, progress=False)  # fmt: skip
    transformer = save_sana_base(root) if stage == "align" else save_sana_adapted(root)
    cls = type(adapter_for(tiny_sana()))
    seen: list[torch.Tensor | None] = []
    real = cls.predict

    def recording(self, *args, attention_mask=None, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        seen.append(attention_mask)
        return real(self, *args, attention_mask=attention_mask, **kwargs)

    monkeypatch.setattr(cls, "predict", recording)
    extra = {} if stage == "align" else {"sample_every": 2, "sample_count": 2, "sample_steps": 1}
    cfg = config(root, stage, transformer, masked, steps=2, out_dir=str(root / f"m-{stage}"),
                 align_sgd_steps=1, align_head="ridge", **extra)  # fmt: skip
    run(cfg, progress=False)
    if extra:  # the training-time sample grid ran through the model too
        assert (root / f"m-{stage}" / "samples" / "step-00000002.png").is_file()
    assert seen and all(m is not None for m in seen)
    for m in seen:
        assert m.shape[-1] == 3 and torch.equal(m[:, 2].float(), torch.zeros(len(m)))
        assert torch.equal(m[:, :2].float(), torch.ones(len(m), 2))


def test_a_stage_keeps_its_base_pipelines_scheduler_for_export(root: Path, cache: Path) -> None:
    # The README's route exports from a stage's output folder, which had no scheduler/: a SANA
    # base sampling at flow shift 6 exported at the family default, 3.0, and previews (at the
    # configured shift) and exported samples differed
    import json

    from diffusers import DPMSolverMultistepScheduler

    from dcgen.train.export import export_pipeline
    from tests.train.stage_utils import tiny_dcae_f4

    base = root / "sana_pipeline"
    tiny_sana(in_channels=16).save_pretrained(base / "transformer")
    DPMSolverMultistepScheduler(flow_shift=6.0, use_flow_sigmas=True,
                                prediction_type="flow_prediction").save_pretrained(base / "scheduler")  # fmt: skip
    cfg = config(root, "align", base / "transformer", cache, out_dir=str(root / "s1_shift6"),
                 shift_rule="constant", shift_constant=6.0)  # fmt: skip
    summary = run(cfg, progress=False)
    assert summary["paths"]["scheduler"] == str(root / "s1_shift6" / "scheduler")
    out = export_pipeline(root / "s1_shift6" / "transformer", tiny_dcae_f4(),
                          root / "export_shift6")  # fmt: skip
    config_file = out / "scheduler" / "scheduler_config.json"
    saved = json.loads(config_file.read_text())
    assert saved["_class_name"] == "DPMSolverMultistepScheduler" and saved["flow_shift"] == 6.0


def test_the_velocity_readout_of_a_learned_sigma_sana_base(root: Path, cache: Path) -> None:
    # A learned-sigma head has 2 x C outputs per pixel; the readout fits the velocity's C (the
    # accumulator was sized to the head, and the first batch failed on the shape).
    from dcgen.train.stages import readout_r2

    base = tiny_sana(in_channels=16, out_channels=32)
    cfg = config(root, "align", save_sana_base(root), cache, align_head_samples=8)
    r2 = readout_r2(base, LatentCache(cache), cfg, latent_key="base_latent")
    assert 0.0 < r2 <= 1.0
