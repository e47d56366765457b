"""The three DC-Gen stages on tiny models: each does what docs/method.md says it should."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dcgen.adapters import adapter_for
from dcgen.train.cache import CacheError, LatentCache
from dcgen.train.config import ConfigError, TrainConfig, load_config
from dcgen.train.stages import (
    _embedder_rank,
    align_embedder,
    finetune_lora,
    load_latent_layers,
    load_transformer,
    readout_r2,
    run,
    train_output_layer,
)
from tests.train.stage_utils import (
    DCAE_CHANNELS,
    assert_lora_round_trip,
    config,
    fixed_loss,
    make_cache,
    save_adapted,
    save_base,
)


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("stages")


@pytest.fixture(scope="module")
def cache(root: Path) -> Path:
    return make_cache(root)


def test_stage1_aligns_embedder_and_reduces_feature_distance(root: Path, cache: Path) -> None:
    cfg = config(root, "align", save_base(root), cache, align_sgd_steps=4)
    summary = run(cfg, progress=False)
    mse = summary["align_mse"]
    # The random embedder is far off; the ridge fit explains most of the target variance.
    assert mse["ridge"] < 0.2 * mse["random"]
    assert mse["after"] < 0.2 * mse["random"]
    before, after = summary["feature_distance"]["before"], summary["feature_distance"]["after"]
    assert len(before) == len(after) == 2
    for b, a in zip(before, after):
        assert a < 0.25 * b, (before, after)
    # Targets lie in the span of the base embedder, so the aligned one cannot exceed its rank.
    base_rank = _embedder_rank(load_transformer(root / "base").x_embedder.weight.detach())
    assert summary["latent_channels"] == DCAE_CHANNELS
    assert 1 <= summary["embedder_rank"] <= min(DCAE_CHANNELS, base_rank)
    out = Path(cfg.out_dir)
    for name in ("latent_layers.safetensors", "log.jsonl", "loss.png", "config.json"):
        assert (out / name).is_file(), name
    # The saved transformer is the adapted one, and the latent-layer file rebuilds it on a base.
    adapted = load_transformer(out / "transformer")
    assert adapter_for(adapted).latent_channels == DCAE_CHANNELS
    base = load_transformer(root / "base")
    load_latent_layers(base, out / "latent_layers.safetensors")
    torch.testing.assert_close(base.x_embedder.weight, adapted.x_embedder.weight)
    assert TrainConfig.from_file(out / "config.json") == cfg


def test_stage1_ridge_head_fits_the_velocity(root: Path, cache: Path) -> None:
    base_file = save_base(root)
    zero = run(
        config(root, "align", base_file, cache, align_sgd_steps=0, out_dir=str(root / "s1z")),
        progress=False,
    )
    cfg = config(
        root, "align", base_file, cache, align_sgd_steps=0, align_head="ridge",
        out_dir=str(root / "s1r"),
    )  # fmt: skip
    summary = run(cfg, progress=False)
    head = summary["head"]
    assert zero["head"] == {"init": "zero"}
    assert head["init"] == "ridge" and head["tokens"] > 0
    # The closed-form readout explains part of the velocity; a zero head explains none.
    assert head["velocity_mse"] < head["target_variance"]
    zero_model = load_transformer(root / "s1z" / "transformer")
    ridge_model = load_transformer(root / "s1r" / "transformer")
    assert float(zero_model.proj_out.weight.abs().max()) == 0.0
    assert float(ridge_model.proj_out.weight.abs().max()) > 0.0
    # readout_r2 refits the same readout without touching the head: it must agree with the
    # fit stage 1 installed, and leave the weights as they were.
    cache_ds = LatentCache(cache)
    before = ridge_model.proj_out.weight.clone()
    r2 = readout_r2(ridge_model, cache_ds, cfg)
    assert r2 == pytest.approx(1 - head["velocity_mse"] / head["target_variance"], abs=1e-6)
    torch.testing.assert_close(ridge_model.proj_out.weight, before, rtol=0, atol=0)


def test_stage1_base_positions_scale_rope_by_the_downsample_factor(root: Path, cache: Path) -> None:
    cfg = config(
        root, "align", save_base(root), cache, align_sgd_steps=0, align_positions="base",
        out_dir=str(root / "s1pos"),
    )  # fmt: skip
    summary = run(cfg, progress=False)
    adapted = adapter_for(load_transformer(root / "s1pos" / "transformer"))
    assert adapted.position_scale == float(summary["downsample_factor"]) > 1.0
    # The default keeps the positions on the DC-AE token grid.
    grid = run(
        config(root, "align", save_base(root), cache, align_sgd_steps=0, out_dir=str(root / "s1g")),
        progress=False,
    )
    assert adapter_for(load_transformer(root / "s1g" / "transformer")).position_scale == 1.0
    assert grid["downsample_factor"] == summary["downsample_factor"]


def test_stage2_reduces_flow_matching_loss(root: Path, cache: Path) -> None:
    transformer = load_transformer(save_adapted(root))
    blocks_before = {k: v.clone() for k, v in transformer.transformer_blocks.state_dict().items()}
    before = fixed_loss(transformer, cache)
    cfg = config(root, "output", root / "adapted", cache, steps=20, out_dir=str(root / "s2"))
    train_output_layer(transformer, LatentCache(cache), cfg, progress=False)
    after = fixed_loss(transformer, cache)
    assert after < 0.8 * before, (before, after)
    # DiT blocks frozen in stage 2.
    for k, v in transformer.transformer_blocks.state_dict().items():
        assert torch.equal(v, blocks_before[k]), k


def test_stage3_lora_reduces_loss_and_round_trips(root: Path, cache: Path, tmp_path: Path) -> None:
    path = save_adapted(root)
    transformer = load_transformer(path)
    before = fixed_loss(transformer, cache)
    cfg = config(root, "finetune", path, cache, steps=20, out_dir=str(root / "s3"), ema_decay=0.5)
    finetune_lora(transformer, LatentCache(cache), cfg, progress=False)
    after = fixed_loss(transformer, cache)
    assert after < 0.8 * before, (before, after)
    assert_lora_round_trip(transformer, path, tmp_path, lambda m: fixed_loss(m, cache), after)


def test_config_paths_expand_the_home_folder(tmp_path: Path, monkeypatch) -> None:
    # a config file's "~/x" arrives as written (no shell): cache_dir was not found and out_dir
    # made a folder named "~" in the working directory
    monkeypatch.setenv("HOME", str(tmp_path))
    toml = tmp_path / "c.toml"
    toml.write_text('stage = "align"\ntransformer = "~/base"\ncache_dir = "~/cache"\n'
                    'out_dir = "~/runs/align"\ndcae = "dc-ae-f32c32-in-1.0"\n')  # fmt: skip
    cfg = load_config(toml)
    assert (cfg.transformer, cfg.cache_dir, cfg.out_dir) == (
        str(tmp_path / "base"),
        str(tmp_path / "cache"),
        str(tmp_path / "runs" / "align"),
    )
    assert cfg.dcae == "dc-ae-f32c32-in-1.0"  # a preset name is not a path
    assert cfg.with_overrides(["cache_dir=~/other"]).cache_dir == str(tmp_path / "other")


def test_config_files_and_overrides(tmp_path: Path) -> None:
    toml = tmp_path / "c.toml"
    toml.write_text(
        'stage = "3"\ntransformer = "t"\ncache_dir = "c"\nout_dir = "o"\n'
        "guidance_range = [2.0, 4.0]\nalign_feature_layers = [0, 5]\n"
    )
    cfg = load_config(toml)
    assert cfg.stage == "finetune" and cfg.guidance_range == (2.0, 4.0)
    assert cfg.align_feature_layers == (0, 5)
    cfg2 = cfg.with_overrides(["steps=7", "ema_decay=0.99", "lora_targets=attn"])
    assert (cfg2.steps, cfg2.ema_decay, cfg2.lora_targets) == (7, 0.99, "attn")
    assert TrainConfig.from_dict(cfg2.to_dict()) == cfg2
    with pytest.raises(ConfigError, match="unknown config field 'nope'"):
        cfg.with_overrides(["nope=1"])
    with pytest.raises(ConfigError, match="batch_size"):
        cfg.with_overrides(["batch_size=-1"])


@pytest.mark.parametrize(
    ("data", "field"),
    [
        ({"stage": "align", "transformer": "t", "cache_dir": "c"}, "out_dir"),
        ({"stage": "x", "transformer": "t", "cache_dir": "c", "out_dir": "o"}, "stage"),
        ({"stage": "1", "transformer": "t", "cache_dir": "c", "out_dir": "o", "steps": 0}, "steps"),
        ({"stage": "1", "transformer": "t", "cache_dir": "c", "out_dir": "o", "bogus": 1}, "bogus"),
        (
            {"stage": "1", "transformer": "t", "cache_dir": "c", "out_dir": "o",
             "mixed_precision": "fp8"},
            "mixed_precision",
        ),
        (
            {"stage": "1", "transformer": "t", "cache_dir": "c", "out_dir": "o",
             "align_positions": "scaled"},
            "align_positions",
        ),
    ],
)  # fmt: skip
def test_bad_config_names_the_field(data: dict, field: str) -> None:
    with pytest.raises(ConfigError, match=field):
        TrainConfig.from_dict(data)


@pytest.mark.parametrize(
    ("field", "value", "wanted"),
    [("lr", "abc", "a finite number > 0"), ("lr", float("nan"), "a finite number > 0"),
     ("weight_decay", "0.1", "a finite number >= 0"), ("grad_clip", None, "a finite number >= 0"),
     ("align_ridge_l2", -1.0, "a finite number >= 0"), ("ema_decay", "0.99", "in \\(0, 1\\)"),
     ("ema_decay", True, "in \\(0, 1\\)"), ("shift_constant", 0.0, "a finite number > 0"),
     ("align_eval_sigma", "0.5", "in \\[0, 1\\]"), ("lora_alpha", 0.0, "> 0 or null"),
     ("lora_alpha", "x", "> 0 or null"), ("sample_every", "100", "a positive integer"),
     ("guidance_range", [1.0, 2.0, 3.0], "\\[low, high\\]"),
     ("guidance_range", 5, "\\[low, high\\]"), ("guidance_range", [4.0, 1.0], "low <= high"),
     ("align_feature_layers", ["a"], "block indices"),
     ("align_feature_layers", [0, -1], "block indices"),
     ("lora_targets", "attn.(to_q", "not a valid regular expression"),
     ("lora_targets", 3, "a regular expression string"),
     ("lr", float("inf"), "a finite number > 0"), ("lora_alpha", float("inf"), "finite"),
     ("shift_constant", float("inf"), "finite"), ("align_head_samples", True, "a positive"),
     ("resume", "False", "true or false, got 'False'"),
     ("gradient_checkpointing", "no", "true or false"),
     ("train_embedder_in_stage2", 1, "true or false")],
)  # fmt: skip
def test_badly_typed_config_values_name_the_field(field: str, value: object, wanted: str) -> None:
    """Strings, nulls, NaN, bools and malformed lists give a ConfigError naming the field and
    what it takes, at load time (a bad LoRA regex not after the transformer has loaded)."""
    data = {"stage": "3", "transformer": "t", "cache_dir": "c", "out_dir": "o", field: value}
    with pytest.raises(ConfigError, match=f"^{field}: .*{wanted}"):
        TrainConfig.from_dict(data)


def test_cache_without_dcae_latent_is_a_clear_error(root: Path, tmp_path: Path) -> None:
    cache = make_cache(tmp_path, with_dcae=False)
    cfg = config(tmp_path, "output", save_adapted(tmp_path), cache)
    with pytest.raises(CacheError, match="dcae_latent"):
        run(cfg, progress=False)


def test_channel_mismatch_is_a_clear_error(root: Path, cache: Path) -> None:
    # A base (16-channel, 2x2) transformer cannot train on 4-channel DC-AE latents.
    cfg = config(root, "output", save_base(root), cache, out_dir=str(root / "bad1"))
    with pytest.raises(ValueError, match="4 channels but the transformer expects 16"):
        run(cfg, progress=False)
    # The DC-AE named in the config must be the one the cache was made with.
    cfg = config(root, "output", save_adapted(root), cache, dcae="dc-ae-f32c32-in-1.0")
    with pytest.raises(ValueError, match="32 latent channels"):
        run(cfg, progress=False)


def test_stage3_gradient_checkpointing_gives_the_same_training(root: Path, cache: Path) -> None:
    # Recomputing activations in the backward pass must not change the gradients: the same run
    # with and without checkpointing ends at the same weights (fp32, so only summation order
    # could differ).
    path = save_adapted(root)
    results = []
    for ckpt in (False, True):
        transformer = load_transformer(path)
        out = root / f"s3-ckpt-{ckpt}"
        cfg = config(root, "finetune", path, cache, steps=3, out_dir=str(out),
                     gradient_checkpointing=ckpt)  # fmt: skip
        finetune_lora(transformer, LatentCache(cache), cfg, progress=False)
        assert not transformer.is_gradient_checkpointing, "checkpointing must be switched off after"
        results.append(fixed_loss(transformer, cache))
    assert results[1] == pytest.approx(results[0], rel=1e-5)


def test_embedder_rank_counts_significant_singular_values() -> None:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 5, generator=g) @ torch.randn(5, 12, generator=g)  # rank 5
    assert _embedder_rank(w) == 5
    assert _embedder_rank(w + 1e-9 * torch.randn(64, 12, generator=g)) == 5
    assert _embedder_rank(torch.randn(64, 12, generator=g)) == 12
    assert _embedder_rank(torch.zeros(64, 12)) == 0


class _MixedSizes(torch.utils.data.Dataset):
    """Images in three buckets, two of them the same token count transposed."""

    sizes = [(16, 32), (32, 16), (16, 16)] * 4

    def __init__(self) -> None:
        g = torch.Generator().manual_seed(0)
        self.images = [
            torch.nn.functional.interpolate(torch.randn(1, 3, 4, 4, generator=g), size=s, mode="bilinear")[0]
            for s in self.sizes
        ]  # fmt: skip

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict:
        return {"image": self.images[i], "caption": f"caption {i}", "key": f"m{i}"}

    def fingerprint(self) -> str:
        return "mixed-sizes"


def test_stage1_on_a_bucketed_cache_aligns_every_bucket(root: Path, tmp_path: Path) -> None:
    """Stage 1 took the token grid of the first sample for every sample: transposed buckets
    were downsampled on the wrong grid (silently), other sizes crashed, and the ridge head's
    readout stacked samples of different sizes."""
    from dcgen.train import precompute
    from tests.train.stage_utils import base_encoder, dcae_encoder, text_encoder

    mixed = tmp_path / "cache"
    encoders = {"base_latent": base_encoder, "dcae_latent": dcae_encoder}
    precompute(_MixedSizes(), encoders, text_encoder, mixed, shard_size=4, batch_size=4,
               progress=False)  # fmt: skip
    cfg = config(root, "align", save_base(root), mixed, align_sgd_steps=2, align_head="ridge",
                 out_dir=str(tmp_path / "s1"))  # fmt: skip
    summary = run(cfg, progress=False)
    # Both encoders are linear maps of the same pixels: on the right grids the ridge embedder
    # explains most of the target (measured: MSE 1.56 random -> 0.076 ridge); downsampling a
    # transposed bucket on the first sample's grid mixes tokens of other places.
    mse = summary["align_mse"]
    assert summary["tokens"] == 4 * (32 + 32 + 16) and mse["ridge"] < 0.1 * mse["random"], mse
    assert summary["head"]["init"] == "ridge" and summary["head"]["tokens"] > 0


def test_stage2_keeps_an_ema_and_checkpoints_gradients(root: Path, cache: Path) -> None:
    # ema_decay and gradient_checkpointing were silently ignored by stage 2
    path = save_adapted(root)

    def train(out: str, **kw) -> tuple[torch.nn.Module, list[torch.Tensor], list[bool]]:
        transformer = load_transformer(path)
        head = adapter_for(transformer).latent_layers().head
        seen, checkpointing = [head.weight.detach().clone()], []

        def on_step(step: int, loss: float) -> None:
            seen.append(head.weight.detach().clone())
            checkpointing.append(transformer.is_gradient_checkpointing)

        cfg = config(root, "output", path, cache, steps=4, out_dir=str(root / out), **kw)
        train_output_layer(transformer, LatentCache(cache), cfg, progress=False, on_step=on_step)
        return transformer, seen, checkpointing

    _, raw, plain_ckpt = train("s2-raw")
    model, _, ckpt = train("s2-ema", ema_decay=0.5, ema_warmup=False, gradient_checkpointing=True)
    assert ckpt == [True] * 4 and plain_ckpt == [False] * 4
    assert not model.is_gradient_checkpointing  # switched off after
    # the saved head is the EMA of the raw trajectory (training itself is unchanged by both)
    expected = raw[0].clone()
    for w in raw[1:]:
        expected.lerp_(w, 0.5)
    got = adapter_for(model).latent_layers().head.weight
    assert not torch.allclose(raw[-1], expected)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    # With warmup (the default) the average starts at the weights after step 1 and its decay
    # ramps up as n / (9 + n) to ema_decay (diffusers' EMAModel): a 0.9999 average of a short
    # run was nearly the weights training started from.
    warm, _, _ = train("s2-ema-warm", ema_decay=0.25)
    expected = raw[1].clone()
    for n, w in enumerate(raw[2:], start=2):
        expected.lerp_(w, 1 - min(0.25, n / (9 + n)))
    got = adapter_for(warm).latent_layers().head.weight
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_stage1_names_the_settings_it_does_not_use(root: Path, cache: Path, caplog) -> None:
    cfg = config(root, "align", save_base(root), cache, align_sgd_steps=0, steps=50,
                 ema_decay=0.9, out_dir=str(root / "s1-unused"))  # fmt: skip
    with caplog.at_level("WARNING", logger="dcgen.train.stages"):
        run(cfg, progress=False)
    assert "does not use steps=50: it runs align_sgd_steps=0" in caplog.text
    assert "ema_decay=0.9 is not used" in caplog.text


@pytest.mark.parametrize(
    ("rank", "channels", "base_rank", "level"),
    [
        (16, 32, 16, "INFO"),  # all the base embedder can pass: a fact, nothing to act on
        (19, 32, 16, "INFO"),  # the toy demo's stage 1 (refinement went past the ridge span)
        (12, 32, 16, "WARNING"),  # less than reachable: the alignment dropped directions
        (3, 4, 16, "WARNING"),
        (4, 4, 16, None),  # every channel seen
    ],
)
def test_the_rank_note_warns_only_when_the_alignment_fell_short(
    caplog, rank, channels, base_rank, level
) -> None:
    # every toy run (and every latent wider than the base embedder's rank) got a warning that
    # no setting could change
    from dcgen.train.stages import _report_embedder_rank

    with caplog.at_level("INFO", logger="dcgen.train.stages"):
        _report_embedder_rank(rank, channels, base_rank)
    levels = [r.levelname for r in caplog.records if "aligned embedder" in r.getMessage()]
    assert levels == ([level] if level else [])


@pytest.mark.parametrize("stage", ["align", "finetune"])
def test_a_stage_gives_the_callers_random_streams_back(root: Path, cache: Path, stage: str) -> None:
    # Each stage seeded torch with cfg.seed and left it so: a program drawing after a stage got
    # the same numbers whatever its own seed.
    import random

    import numpy as np

    fn, base = {"align": (align_embedder, save_base), "finetune": (finetune_lora, save_adapted)}[
        stage
    ]
    path = base(root)
    for seed in (1, 2):
        torch.manual_seed(seed)
        random.seed(seed)
        np.random.seed(seed)
        want = (torch.rand(3), random.random(), np.random.rand())
        torch.manual_seed(seed)
        random.seed(seed)
        np.random.seed(seed)
        cfg = config(root, stage, path, cache, steps=1, align_sgd_steps=0,
                     out_dir=str(root / f"rng-{stage}-{seed}"))  # fmt: skip
        fn(load_transformer(path), LatentCache(cache), cfg, progress=False)
        assert torch.equal(torch.rand(3), want[0])
        assert (random.random(), np.random.rand()) == want[1:]


def test_a_resumed_run_gives_the_callers_random_streams_back(
    root: Path, cache: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # A resume restored the checkpoint's Python and numpy states into the calling program.
    import random

    import numpy as np

    out = str(root / "rng-resume")
    cfg = config(root, "output", save_adapted(root), cache, steps=4, checkpoint_every=1,
                 out_dir=out)  # fmt: skip

    def stop(step, *_, **__):  # noqa: ANN001, ANN002, ANN003, ANN202
        if step >= 2:
            raise RuntimeError("stopped")

    with pytest.raises(RuntimeError, match="stopped"):
        run(cfg, progress=False, on_step=stop)
    random.seed(7)
    np.random.seed(7)
    torch.manual_seed(7)
    want = (random.random(), np.random.rand(), torch.rand(2))
    random.seed(7)
    np.random.seed(7)
    torch.manual_seed(7)
    with caplog.at_level("INFO", logger="dcgen.train"):
        run(cfg, progress=False)
    assert "resumed at step" in caplog.text
    assert (random.random(), np.random.rand()) == want[:2]
    assert torch.equal(torch.rand(2), want[2])


def test_stage1_records_the_dcae_factor_and_later_stages_refuse_another(
    root: Path, cache: Path, tmp_path: Path
) -> None:
    """Same channels, another grid: an f8 cache passed every check of a model aligned to f4
    latents, and stage 2 trained on it silently (its channel count is all that was compared)."""
    import torch.nn.functional as F
    from safetensors import safe_open

    from dcgen.adapters.provenance import DCAE_FACTOR_KEY
    from dcgen.train import precompute
    from tests.train.stage_utils import ImageSet, base_encoder, text_encoder

    cfg = config(tmp_path, "align", save_base(tmp_path), cache, align_sgd_steps=0)
    aligned = Path(run(cfg, progress=False)["paths"]["transformer"])
    assert load_transformer(aligned).config[DCAE_FACTOR_KEY] == 4  # 16 px images, 4x4 latents
    with safe_open(str(Path(cfg.out_dir) / "latent_layers.safetensors"), "pt") as f:
        assert f.metadata()["dcae_factor"] == "4"
    w8 = torch.randn(DCAE_CHANNELS, 3, 8, 8, generator=torch.Generator().manual_seed(5)) / 8
    f8 = tmp_path / "cache_f8"
    encoders = {"base_latent": base_encoder, "dcae_latent": lambda x: F.conv2d(x, w8, stride=8)}
    precompute(ImageSet(8), encoders, text_encoder, f8, shard_size=4, batch_size=4,
               progress=False)  # fmt: skip
    for stage in ("output", "finetune"):
        bad = config(tmp_path, stage, aligned, f8, out_dir=str(tmp_path / f"bad-{stage}"))
        with pytest.raises(ConfigError, match=r"aligned to an f4 DC-AE.*cache_f8 is f8"):
            run(bad, progress=False)
    # the base transformer + the latent-layers file carry the record as well
    bad = config(tmp_path, "output", save_base(tmp_path), f8, out_dir=str(tmp_path / "bad-ll"),
                 latent_layers=str(Path(cfg.out_dir) / "latent_layers.safetensors"))  # fmt: skip
    with pytest.raises(ConfigError, match="aligned to an f4 DC-AE"):
        run(bad, progress=False)
    # aligning to the f8 latents is stage 1's job: it records that factor
    again = config(tmp_path, "align", save_base(tmp_path), f8, align_sgd_steps=0,
                   out_dir=str(tmp_path / "realign"))  # fmt: skip
    realigned = Path(run(again, progress=False)["paths"]["transformer"])
    assert load_transformer(realigned).config[DCAE_FACTOR_KEY] == 8


def test_a_dcae_of_another_factor_than_the_cache_is_refused(root: Path, cache: Path) -> None:
    from tests.adapters.tiny import tiny_dcae

    ae = tiny_dcae()  # f32: the cache's latents are f4
    folder = root / "dcae_f32"
    ae.save_pretrained(folder)
    c = ae.latent_channels
    w = torch.randn(c, 3, 4, 4, generator=torch.Generator().manual_seed(6)) / 4
    import torch.nn.functional as F

    from dcgen.train import precompute
    from tests.train.stage_utils import ImageSet, text_encoder

    f4 = root / f"cache_c{c}_f4"
    precompute(ImageSet(8), {"dcae_latent": lambda x: F.conv2d(x, w, stride=4)}, text_encoder,
               f4, shard_size=4, batch_size=4, progress=False)  # fmt: skip
    cfg = config(root, "output", save_adapted(root), f4, dcae=str(folder),
                 out_dir=str(root / "bad-factor"))  # fmt: skip
    with pytest.raises(ValueError, match=r"is f32 but the cache's dcae_latent is f4"):
        run(cfg, progress=False)


def test_a_stage_takes_the_previous_stages_run_folder_as_its_transformer(
    cache: Path, tmp_path: Path
) -> None:
    # as export does: the run folder's own config.json (the training config) was read as the
    # model's ("names class None, not a diffusers model")
    first = config(tmp_path, "align", save_base(tmp_path), cache, align_sgd_steps=0)
    run(first, progress=False)
    by_folder = config(tmp_path, "output", first.out_dir, cache, steps=2,
                       out_dir=str(tmp_path / "by_folder"))  # fmt: skip
    by_path = config(tmp_path, "output", Path(first.out_dir) / "transformer", cache, steps=2,
                     out_dir=str(tmp_path / "by_path"))  # fmt: skip
    a, b = run(by_folder, progress=False), run(by_path, progress=False)
    assert a["final_loss"] == b["final_loss"]
