"""Stage-3 LoRA through peft on a tiny diffusers FLUX (and SANA for the targets)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("peft")
diffusers = pytest.importorskip("diffusers")

from dcgen.train.lora import (  # noqa: E402
    LORA_WEIGHT_NAME,
    add_lora,
    fuse_lora,
    load_lora,
    lora_parameters,
    lora_target_names,
    save_lora,
)

from ..adapters.tiny import tiny_flux as shared_tiny_flux  # noqa: E402


def tiny_flux() -> torch.nn.Module:
    return shared_tiny_flux(in_channels=8, guidance_embeds=False)


def flux_inputs(seed: int = 0, h: int = 4, w: int = 4, txt: int = 3) -> dict:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.stack(torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij"), -1)
    img_ids = torch.cat([torch.zeros(h * w, 1), ids.reshape(-1, 2).float()], dim=1)
    return dict(
        hidden_states=torch.randn(2, h * w, 8, generator=gen),
        encoder_hidden_states=torch.randn(2, txt, 32, generator=gen),
        pooled_projections=torch.randn(2, 32, generator=gen),
        timestep=torch.tensor([0.3, 0.8]),
        img_ids=img_ids,
        txt_ids=torch.zeros(txt, 3),
        return_dict=False,
    )


@torch.no_grad()
def run(model: torch.nn.Module) -> torch.Tensor:
    return model(**flux_inputs())[0]


@torch.no_grad()
def randomise_lora_b(model: torch.nn.Module, seed: int = 1) -> None:
    """peft initialises B to zero; give it values so the adapter actually changes the output."""
    gen = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.copy_(0.1 * torch.randn(p.shape, generator=gen))


def test_targets_flux_single_proj_out_but_not_head():
    model = tiny_flux()
    names = lora_target_names(model)
    assert "proj_out" not in names
    assert "single_transformer_blocks.0.proj_out" in names
    expected = {
        "transformer_blocks.0.attn.to_q",
        "transformer_blocks.0.attn.to_out.0",
        "transformer_blocks.0.attn.add_k_proj",
        "transformer_blocks.0.attn.to_add_out",
        "transformer_blocks.0.ff.net.0.proj",
        "transformer_blocks.0.ff.net.2",
        "transformer_blocks.0.ff_context.net.2",
        "single_transformer_blocks.0.attn.to_v",
        "single_transformer_blocks.0.proj_mlp",
    }
    assert expected <= set(names)
    assert not any(n in names for n in ("x_embedder", "context_embedder", "norm_out.linear"))
    assert len(names) == 12 + 5  # 12 per double block, 5 per single block

    add_lora(model, rank=4)
    assert type(model.proj_out).__name__ == "Linear"  # the head stays a plain Linear
    assert hasattr(model.single_transformer_blocks[0].proj_out, "lora_A")


def test_only_lora_params_trainable_and_zero_b_is_base():
    model = tiny_flux()
    base_out = run(model)
    add_lora(model, rank=4, alpha=8)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert len(trainable) == 2 * 17  # lora_A and lora_B per target
    torch.testing.assert_close(run(model), base_out, rtol=0, atol=0)

    # Stage 3 also trains the new embedder and head fully.
    other = add_lora(tiny_flux(), rank=4, train_modules=("x_embedder", "proj_out"))
    extra = {n for n, p in other.named_parameters() if p.requires_grad and "lora_" not in n}
    assert extra == {"x_embedder.weight", "x_embedder.bias", "proj_out.weight", "proj_out.bias"}
    with pytest.raises(KeyError, match="nope"):
        add_lora(tiny_flux(), rank=4, train_modules=("nope",))


def _trainable(model: torch.nn.Module) -> list[str]:
    return [n for n, p in model.named_parameters() if p.requires_grad]


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        # a typo among train_modules: found only after the adapter was injected and the model
        # frozen, so the corrected retry was refused ("already has a LoRA adapter")
        (dict(rank=4, train_modules=("x_embeder",)), KeyError, "no module named 'x_embeder'"),
        # a plain str was taken letter by letter ("no module named 'x'")
        (dict(rank=4, train_modules="x_embedder"), TypeError, r"a tuple.*got str 'x_embedder'"),
        (dict(rank=4, train_modules=(3,)), TypeError, "module names.*got int"),
        (dict(rank=4, train_modules=None), TypeError, "iterable of module names.*got NoneType"),
        # a float rank failed deep in torch with the model frozen; a str / None one on '<'
        (dict(rank=2.5), TypeError, "positive int rank, got float 2.5"),
        (dict(rank="4"), TypeError, "positive int rank, got str '4'"),
        (dict(rank=None), TypeError, "positive int rank, got NoneType"),
        (dict(rank=True), TypeError, "positive int rank, got bool"),
        (dict(rank=0), ValueError, "rank >= 1, got 0"),
    ],
)
def test_a_refused_add_lora_leaves_the_model_unchanged(kwargs, error, match):
    model = tiny_flux()
    before = _trainable(model)
    with pytest.raises(error, match=match):
        add_lora(model, **kwargs)
    assert _trainable(model) == before  # nothing frozen
    assert not getattr(model, "peft_config", {})  # no adapter injected
    assert not lora_parameters(model)
    add_lora(model, rank=4, train_modules=("x_embedder",))  # the corrected call goes through
    extra = {n for n in _trainable(model) if "lora_" not in n}
    assert extra == {"x_embedder.weight", "x_embedder.bias"}
    assert len(lora_parameters(model)) == 2 * 17


def test_save_load_roundtrip_diffusers_format(tmp_path):
    model = tiny_flux()
    fresh = copy.deepcopy(model)
    add_lora(model, rank=4, alpha=16)  # alpha != rank: a lost alpha would change the output
    randomise_lora_b(model)
    out = run(model)
    path = save_lora(model, tmp_path)
    assert path == tmp_path / LORA_WEIGHT_NAME

    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        keys = list(f.keys())
        meta = json.loads(f.metadata()["lora_adapter_metadata"])
    assert keys and all(k.startswith("transformer.") for k in keys)
    assert "transformer.single_transformer_blocks.0.proj_out.lora_A.weight" in keys
    assert not any(k.startswith("transformer.proj_out") for k in keys)
    assert meta["transformer.r"] == 4 and meta["transformer.lora_alpha"] == 16

    load_lora(fresh, tmp_path)
    assert not any(p.requires_grad for p in lora_parameters(fresh))
    torch.testing.assert_close(run(fresh), out, rtol=0, atol=0)
    assert sorted(p.name for p in tmp_path.iterdir()) == [LORA_WEIGHT_NAME]  # no temp left


def test_a_killed_lora_save_keeps_the_previous_file(tmp_path, monkeypatch):
    from diffusers.loaders.lora_base import LoraBaseMixin

    model = add_lora(tiny_flux(), rank=4)
    randomise_lora_b(model)
    before = save_lora(model, tmp_path).read_bytes()

    def killed(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        (Path(kwargs["save_directory"]) / LORA_WEIGHT_NAME).write_bytes(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(LoraBaseMixin, "write_lora_layers", staticmethod(killed))
    with pytest.raises(KeyboardInterrupt):
        save_lora(model, tmp_path)
    assert (tmp_path / LORA_WEIGHT_NAME).read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [LORA_WEIGHT_NAME]


def test_fused_equals_unfused():
    model = add_lora(tiny_flux(), rank=4, alpha=8)
    randomise_lora_b(model)
    out = run(model)
    fuse_lora(model)
    assert not any("lora_" in n for n, _ in model.named_parameters())
    torch.testing.assert_close(run(model), out, rtol=1e-4, atol=1e-5)


def test_sana_targets():
    torch.manual_seed(0)
    sana = diffusers.SanaTransformer2DModel(
        in_channels=8,
        out_channels=8,
        num_attention_heads=2,
        attention_head_dim=16,
        num_layers=1,
        num_cross_attention_heads=2,
        cross_attention_head_dim=16,
        cross_attention_dim=32,
        caption_channels=32,
        sample_size=8,
    )
    names = set(lora_target_names(sana))
    assert "transformer_blocks.0.attn1.to_q" in names
    assert "transformer_blocks.0.attn2.to_out.0" in names
    assert "transformer_blocks.0.ff.conv_inverted" in names
    assert "transformer_blocks.0.ff.conv_depth" not in names
    assert "proj_out" not in names and "patch_embed.proj" not in names
    add_lora(sana, rank=2)
    assert all("lora_" in n for n, p in sana.named_parameters() if p.requires_grad)


def test_lora_targets_may_not_wrap_a_fully_trained_module():
    # stage 3 ran to the end, then wrote latent layers (head.base_layer.*, head.lora_A.*) that
    # nothing could load
    from dcgen.train.lora import add_lora

    from ..adapters.tiny import tiny_flux

    with pytest.raises(ValueError, match=r"match \['proj_out'\], which are trained fully"):
        add_lora(
            tiny_flux(),
            rank=2,
            targets=r".*(to_q|proj_out)",
            train_modules=("x_embedder", "proj_out"),
        )
