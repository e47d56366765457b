import pytest
import torch
from diffusers import FluxPipeline, FluxTransformer2DModel, SanaTransformer2DModel

from dcgen.adapters import (
    FluxAdapter,
    SanaAdapter,
    adapter_for,
    channel_feature_index,
    pack_latents,
    unpack_latents,
)

from .tiny import text, tiny_flux, tiny_sana


def test_registry_and_base_facts():
    flux = adapter_for(tiny_flux())
    assert isinstance(flux, FluxAdapter)
    assert (flux.patch_size, flux.latent_channels, flux.inner_dim) == (2, 16, 32)
    sana = adapter_for(tiny_sana(patch_size=2))
    assert isinstance(sana, SanaAdapter)
    assert (sana.patch_size, sana.latent_channels) == (2, 4)
    with pytest.raises(TypeError, match="no dcgen adapter"):
        adapter_for(torch.nn.Linear(2, 2))


@pytest.mark.parametrize("p", [1, 2])
def test_pack_unpack_round_trip(p):
    x = torch.randn(2, 3, 4, 6)
    tokens = pack_latents(x, p)
    assert tokens.shape == (2, (4 // p) * (6 // p), 3 * p * p)
    torch.testing.assert_close(unpack_latents(tokens, 4, 6, p), x)
    if p == 1:  # 1x1: (B, C, H, W) -> (B, H*W, C)
        torch.testing.assert_close(tokens, x.flatten(2).transpose(1, 2))
    else:  # same layout as diffusers' FLUX pipeline
        torch.testing.assert_close(tokens, FluxPipeline._pack_latents(x, 2, 3, 4, 6))


def test_position_ids_match_flux_pipeline():
    ids = FluxAdapter.image_ids(3, 5)
    torch.testing.assert_close(
        ids, FluxPipeline._prepare_latent_image_ids(1, 3, 5, "cpu", torch.float32)
    )
    assert ids[7].tolist() == [0.0, 1.0, 2.0]  # token 7 = row 1, col 2


def test_flux_predict_on_base_equals_direct_call():
    model = tiny_flux()
    adapter = adapter_for(model)
    latents = torch.randn(2, 16, 4, 6)
    embeds, pooled = text(2)
    sigma = torch.tensor([0.3, 0.9])
    guidance = torch.full((2,), 3.5)
    with torch.no_grad():
        ours = adapter.predict(latents, sigma, embeds, pooled, guidance=guidance)
        direct = model(
            hidden_states=FluxPipeline._pack_latents(latents, 2, 16, 4, 6),
            encoder_hidden_states=embeds,
            pooled_projections=pooled,
            timestep=sigma,
            img_ids=FluxPipeline._prepare_latent_image_ids(2, 2, 3, "cpu", torch.float32),
            txt_ids=torch.zeros(5, 3),
            guidance=guidance,
            return_dict=False,
        )[0]
        expected = FluxPipeline._unpack_latents(direct, 32, 48, 8)
        # an all-ones text mask changes nothing
        masked = adapter.predict(
            latents, sigma, embeds, pooled, guidance=guidance, attention_mask=torch.ones(2, 5)
        )
    assert ours.shape == latents.shape
    torch.testing.assert_close(ours, expected)
    torch.testing.assert_close(masked, ours, atol=1e-5, rtol=1e-5)


def test_flux_predict_errors():
    adapter = adapter_for(tiny_flux())
    embeds, pooled = text(1)
    with pytest.raises(ValueError, match="guidance"):
        adapter.predict(torch.randn(1, 16, 4, 4), torch.tensor([0.5]), embeds, pooled)
    with pytest.raises(ValueError, match="16 latent channels, got 8"):
        adapter.predict(torch.randn(1, 8, 4, 4), 0.5, embeds, pooled, guidance=3.5)
    with pytest.raises(ValueError, match="multiples of the patch size 2"):
        adapter.predict(torch.randn(1, 16, 3, 4), 0.5, embeds, pooled, guidance=3.5)


def test_predict_names_bad_text_inputs_and_empty_latents():
    # each of these failed deep in the transformer (a matmul / torch.cat size mismatch, an
    # IndexError), or came back as an empty velocity
    flux = adapter_for(tiny_flux())
    embeds, pooled = text(2)  # (2, 5, 32), (2, 32)
    x = torch.randn(2, 16, 4, 4)
    kw = dict(guidance=3.5)
    cases = [
        ((x, 0.5, embeds[0], pooled), r"prompt_embeds: expected \(2, tokens, 32\).* got \(5, 32\)"),
        ((x, 0.5, embeds[..., :7], pooled), r"got \(2, 5, 7\)"),
        ((x, 0.5, embeds[:1], pooled[:1]), r"prompt_embeds: expected \(2, tokens, 32\)"),
        ((x, 0.5, embeds, pooled[:, :7]), r"pooled_prompt_embeds: expected \(2, 32\)"),
        ((torch.randn(2, 16, 0, 4), 0.5, embeds, pooled), "non-empty batch and grid"),
    ]
    for args, match in cases:
        with pytest.raises(ValueError, match=match):
            flux.predict(*args, **kw)
    for mask in (torch.ones(2, 4), torch.ones(5)):
        with pytest.raises(ValueError, match=r"attention_mask: expected \(2, 5\)"):
            flux.predict(x, 0.5, embeds, pooled, attention_mask=mask, **kw)
    sana = adapter_for(tiny_sana())
    y = torch.randn(2, 4, 4, 4)
    with pytest.raises(ValueError, match=r"prompt_embeds: expected \(2, tokens, 32\)"):
        sana.predict(y, 0.5, torch.randn(1, 6, 32))
    with pytest.raises(ValueError, match=r"attention_mask: expected \(2, 6\)"):
        sana.predict(y, 0.5, torch.randn(2, 6, 32), attention_mask=torch.ones(2, 5))
    for bad in (2.5, True, 0):
        with pytest.raises(ValueError, match="expected positive int latent_channels"):
            adapter_for(tiny_flux()).replace_latent_layers(bad)


_BAD_SIGMAS = [
    ("0.5", "str"),  # was "new(): invalid data type 'str'"
    (True, "bool"),  # was taken as 1.0
    (torch.tensor([True, False]), "torch.bool"),
    (torch.tensor(0.5 + 1j), "torch.complex64"),  # lost its imaginary part (a warning)
    (0.5 + 1j, "complex"),  # was "must be real number, not complex"
]


@pytest.mark.parametrize(
    "what, bad, got",
    [("sigma", None, "NoneType")]  # was "must be real number, not NoneType" (guidance may be None)
    + [(what, bad, got) for what in ("sigma", "guidance") for bad, got in _BAD_SIGMAS],
)
def test_predict_names_a_bad_sigma_or_guidance(what, bad, got):
    flux = adapter_for(tiny_flux())
    embeds, pooled = text(2)
    x = torch.randn(2, 16, 4, 4)
    kw = {"sigma": 0.5, "guidance": 3.5} | {what: bad}
    match = rf"^{what}: expected a real number or a real tensor of shape \(\) or \(2,\), got {got}"
    with torch.no_grad(), pytest.raises(TypeError, match=match):
        flux.predict(x, kw["sigma"], embeds, pooled, guidance=kw["guidance"])
    # numbers, integer / float tensors and lists are still taken
    with torch.no_grad():
        want = flux.predict(x, 0.5, embeds, pooled, guidance=3.0)
        for sigma, guidance in ((torch.tensor([0.5, 0.5]), 3), ([0.5, 0.5], torch.tensor(3))):
            got_out = flux.predict(x, sigma, embeds, pooled, guidance=guidance)
            assert torch.equal(got_out, want)


def test_flux_position_scale_spans_the_base_grid_and_round_trips(tmp_path):
    model = tiny_flux()
    adapter = adapter_for(model)
    adapter.replace_latent_layers(latent_channels=8, patch_size=1)
    assert adapter.position_scale == 1.0
    torch.testing.assert_close(adapter.token_ids(2, 3), FluxAdapter.image_ids(2, 3))
    latents = torch.randn(1, 8, 2, 3)
    embeds, pooled = text(1)
    with torch.no_grad():
        stock = adapter.predict(latents, 0.5, embeds, pooled, guidance=3.5)
    adapter.set_position_scale(2)
    ids = adapter.token_ids(2, 3)
    # Token (r, c) sits at the centre of the 2x2 base tokens it covers: 2r + 0.5, 2c + 0.5.
    assert ids[:, 0].eq(0).all()
    assert ids[:, 1].tolist() == [0.5, 0.5, 0.5, 2.5, 2.5, 2.5]
    assert ids[:, 2].tolist() == [0.5, 2.5, 4.5, 0.5, 2.5, 4.5]
    with torch.no_grad():
        scaled = adapter.predict(latents, 0.5, embeds, pooled, guidance=3.5)
    assert not torch.allclose(scaled, stock)  # the positions reach the attention
    model.save_pretrained(tmp_path)
    loaded = adapter_for(FluxTransformer2DModel.from_pretrained(tmp_path).eval())
    assert loaded.position_scale == 2.0
    with torch.no_grad():
        torch.testing.assert_close(
            loaded.predict(latents, 0.5, embeds, pooled, guidance=3.5), scaled
        )
    for bad in (0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="positive finite"):
            adapter.set_position_scale(bad)
    # New latent layers are a new token grid: the old grid's spacing does not carry over (it
    # survived a second replacement, so "grid" positions came out scaled).
    adapter.replace_latent_layers(latent_channels=4, patch_size=1)
    assert adapter.position_scale == 1.0
    torch.testing.assert_close(adapter.token_ids(2, 3), FluxAdapter.image_ids(2, 3))


def test_flux_replace_save_load_round_trip(tmp_path):
    model = tiny_flux()
    adapter = adapter_for(model)
    old = adapter.replace_latent_layers(latent_channels=8, patch_size=1)
    assert adapter.original_layers is old and old.embedder.in_features == 64
    assert (adapter.patch_size, adapter.latent_channels) == (1, 8)
    assert model.x_embedder.in_features == 8 and model.proj_out.out_features == 8
    latents = torch.randn(1, 8, 3, 5)
    embeds, pooled = text(1)
    tokens = adapter.embed_tokens(latents)
    assert tokens.shape == (1, 15, 32)
    with torch.no_grad():
        before = adapter.predict(latents, 0.5, embeds, pooled, guidance=3.5)
    model.save_pretrained(tmp_path)
    loaded = FluxTransformer2DModel.from_pretrained(tmp_path).eval()
    re = adapter_for(loaded)
    assert (re.patch_size, re.latent_channels) == (1, 8)
    for (k, a), (k2, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert k == k2 and torch.equal(a, b), k
    with torch.no_grad():
        torch.testing.assert_close(re.predict(latents, 0.5, embeds, pooled, guidance=3.5), before)


def test_capture_hidden_states():
    model = tiny_flux()
    adapter = adapter_for(model)
    embeds, pooled = text(1)
    with torch.no_grad(), adapter.capture_hidden_states([0, 1]) as feats:
        adapter.predict(torch.randn(1, 16, 4, 4), 0.5, embeds, pooled, guidance=3.5)
    assert sorted(feats) == [0, 1] and feats[1].shape == (1, 4, 32)
    assert not model.transformer_blocks[0]._forward_hooks  # hooks removed
    with pytest.raises(IndexError):
        with adapter.capture_hidden_states([5]):
            pass


def test_flux_structured_latents():
    model = tiny_flux()
    adapter = adapter_for(model)
    adapter.replace_latent_layers(latent_channels=4)
    adapter.enable_structured_latents()
    assert set(model.state_dict()) == set(tiny_flux(4).state_dict())  # names unchanged
    full = torch.randn(1, 4, 2, 3)
    part = full[:, :2]
    padded = torch.cat([part, torch.zeros_like(part)], dim=1)
    torch.testing.assert_close(adapter.embed_tokens(part), adapter.embed_tokens(padded))
    embeds, pooled = text(1)
    with torch.no_grad():
        v_part = adapter.predict(part, 0.5, embeds, pooled, guidance=3.5)
        v_pad = adapter.predict(padded, 0.5, embeds, pooled, guidance=3.5)
    assert v_part.shape == part.shape
    torch.testing.assert_close(v_part, v_pad[:, :2])


def test_channel_feature_index_layouts():
    # channel-major (C, k): channel 0 owns features 0..k-1
    assert channel_feature_index(3, 2, 4, True).tolist() == list(range(8))
    # channel-minor (k, C): channel 0 owns features 0, 3, 6, 9
    assert channel_feature_index(3, 1, 4, False).tolist() == [0, 3, 6, 9]


@pytest.mark.parametrize(
    "make", [tiny_flux, lambda: tiny_sana(patch_size=2)], ids=["flux-p2", "sana-p2"]
)
def test_the_head_tokens_of_a_velocity_are_what_predict_turns_back_into_it(make):
    # The stage-1 ridge head is fitted to pack_velocity(noise - x0): a head that emits exactly
    # those tokens must make predict return that velocity. SANA's head emits (p, p, C) per token,
    # not the (C, p, p) of its conv embedder.
    model = make()
    adapter = adapter_for(model)
    c = adapter.latent_channels
    velocity = torch.randn(2, c, 4, 6)
    tokens = adapter.pack_velocity(velocity)
    p = adapter.patch_size
    assert tokens.shape == (2, (4 // p) * (6 // p), c * p * p)
    head = adapter.latent_layers().head

    hook = head.register_forward_hook(lambda module, args, out: tokens)
    embeds, pooled = text(2)
    try:
        with torch.no_grad():
            if isinstance(adapter, FluxAdapter):
                out = adapter.predict(velocity, 0.5, embeds, pooled, guidance=torch.full((2,), 3.5))
            else:
                out = adapter.predict(velocity, 0.5, embeds[..., :32])
    finally:
        hook.remove()
    torch.testing.assert_close(out, velocity, rtol=0, atol=0)


def test_sana_predict_equals_direct_call_and_round_trip(tmp_path):
    model = tiny_sana(patch_size=2)
    adapter = adapter_for(model)
    latents = torch.randn(2, 4, 4, 6)
    embeds = torch.randn(2, 5, 32)
    mask = torch.ones(2, 5)
    with torch.no_grad():
        ours = adapter.predict(latents, torch.tensor([0.25, 0.75]), embeds, attention_mask=mask)
        direct = model(latents, embeds, timestep=torch.tensor([250.0, 750.0]),
                       encoder_attention_mask=mask, return_dict=False)[0]  # fmt: skip
    torch.testing.assert_close(ours, direct)
    torch.testing.assert_close(adapter.unpack(adapter.pack(latents), 4, 6), latents)
    assert adapter.embed_tokens(latents).shape == (2, 6, 16)

    adapter.replace_latent_layers(latent_channels=3, patch_size=1)
    assert model.config.patch_size == 1 and model.config.in_channels == 3
    new_latents = torch.randn(1, 3, 4, 4)
    with torch.no_grad():
        before = adapter.predict(new_latents, 0.5, embeds[:1])
    assert before.shape == new_latents.shape
    model.save_pretrained(tmp_path)
    loaded = adapter_for(SanaTransformer2DModel.from_pretrained(tmp_path).eval())
    with torch.no_grad():
        torch.testing.assert_close(loaded.predict(new_latents, 0.5, embeds[:1]), before)
    with torch.no_grad(), adapter.capture_hidden_states() as feats:
        adapter.predict(new_latents, 0.5, embeds[:1])
    assert sorted(feats) == [0, 1] and feats[0].shape == (1, 16, 16)


@pytest.mark.parametrize(("old", "new"), [(1, 2), (2, 1)])
def test_sana_sincos_positions_follow_a_new_patch_size(tmp_path, old, new):
    """A SANA model with sincos positions (interpolation_scale set) keeps a table for its
    sample_size grid, which diffusers recomputes only for inputs of another grid: after a
    patch-size change the table is rebuilt, so the native-size input runs and equals the
    saved-and-reloaded model's output at every size."""
    torch.manual_seed(0)
    model = SanaTransformer2DModel(
        patch_size=old, in_channels=4, out_channels=4, num_layers=1, num_attention_heads=2,
        attention_head_dim=8, num_cross_attention_heads=2, cross_attention_head_dim=8,
        cross_attention_dim=16, caption_channels=32, sample_size=8, interpolation_scale=1.0,
    ).eval()  # fmt: skip
    adapter = adapter_for(model)
    adapter.replace_latent_layers(latent_channels=6, patch_size=new)
    assert model.patch_embed.pos_embed.shape == (1, (8 // new) ** 2, 16)
    model.save_pretrained(tmp_path)
    loaded = adapter_for(SanaTransformer2DModel.from_pretrained(tmp_path).eval())
    embeds = torch.randn(1, 5, 32)
    for size in (8, 16):  # the sample_size grid (the stored table) and another (recomputed)
        latents = torch.randn(1, 6, size, size)
        with torch.no_grad():
            # measured: equal up to 2.4e-7 (the new layers' weights sit in other memory layouts)
            torch.testing.assert_close(adapter.predict(latents, 0.5, embeds),
                                       loaded.predict(latents, 0.5, embeds))  # fmt: skip


def test_sana_structured_latents():
    adapter = adapter_for(tiny_sana(in_channels=4, patch_size=2))
    adapter.enable_structured_latents()
    part = torch.randn(1, 2, 4, 4)
    padded = torch.cat([part, torch.zeros_like(part)], dim=1)
    embeds = torch.randn(1, 5, 32)
    with torch.no_grad():
        v_part = adapter.predict(part, 0.5, embeds)
        v_pad = adapter.predict(padded, 0.5, embeds)
    torch.testing.assert_close(v_part, v_pad[:, :2])


@pytest.mark.parametrize("bad", [0, -2, 1.5, True])
def test_flux_latent_patch_size_must_be_a_positive_int(bad):
    # 0 was a ZeroDivisionError; -2 was accepted and written into the transformer's config
    model = tiny_flux()
    with pytest.raises(
        ValueError, match=rf"latent_patch_size: expected a positive int, got {bad!r}"
    ):
        FluxAdapter(model, latent_patch_size=bad)
    assert FluxAdapter(model).patch_size == 2  # the config was left alone (stock default)


@pytest.mark.parametrize("make", [tiny_flux, tiny_sana], ids=["flux", "sana"])
def test_numpy_int_latent_layers_save_and_structured_zero_channels_are_refused(make, tmp_path):
    # numpy ints passed the checks and reached the config: save_pretrained then failed
    # ("Object of type int64 is not JSON serializable")
    import numpy as np

    adapter = adapter_for(make())
    adapter.replace_latent_layers(np.int64(8), patch_size=np.int64(2))
    config = adapter.transformer.config
    assert type(config.in_channels) is int and type(config.patch_size) is int
    adapter.transformer.save_pretrained(tmp_path)
    # a structured adapter took a 0-channel latent, then failed deep in the model
    adapter.enable_structured_latents()
    with pytest.raises(ValueError, match=r"structured: 1 to 8\), got 0"):
        adapter.check_latents(torch.randn(1, 0, 4, 4))


def test_adapter_for_a_torch_compiled_transformer_runs_the_compiled_forward():
    # diffusers documents `pipe.transformer = torch.compile(pipe.transformer)`; the wrapper's
    # type is OptimizedModule, which adapter_for refused ("no dcgen adapter").
    sana = torch.compile(tiny_sana(patch_size=2), backend="eager")
    assert isinstance(adapter_for(sana), SanaAdapter) and adapter_for(sana).transformer is sana
    model = tiny_flux().eval()
    traced = []

    def backend(graph, inputs):  # counts what dynamo compiles, runs it as traced
        traced.append(graph)
        return graph.forward

    compiled = torch.compile(model, backend=backend)
    adapter = adapter_for(compiled)
    assert isinstance(adapter, FluxAdapter) and adapter.transformer is compiled
    latents = torch.randn(1, 16, 4, 4)
    embeds, pooled = text(1)
    args = (latents, torch.tensor([0.5]), embeds, pooled)
    with torch.no_grad():
        ours = adapter.predict(*args, guidance=torch.full((1,), 3.5))
        plain = adapter_for(model).predict(*args, guidance=torch.full((1,), 3.5))
    assert traced, "predict did not run the compiled forward"
    torch.testing.assert_close(ours, plain)
    # Hooks added after compiling are not guarded by dynamo: the warm compiled graph ran without
    # them and capture_hidden_states recorded nothing (stage 1's feature distances failed).
    captured = {}
    for name, a in (("compiled", adapter), ("plain", adapter_for(model))):
        with torch.no_grad(), a.capture_hidden_states([0, 1]) as feats:
            a.predict(*args, guidance=torch.full((1,), 3.5))
        captured[name] = feats
    assert sorted(captured["compiled"]) == [0, 1]
    for i in (0, 1):
        torch.testing.assert_close(captured["compiled"][i], captured["plain"][i])
    assert adapter._model_to_call() is compiled  # after the capture, the compiled forward again


def _quantized(make, config_cls, dtype=torch.float32):
    from dcgen.quant import quantize_

    model = make().to(dtype)
    names = quantize_(model, config_cls(keep_latent_layers=False, exclude=()))
    assert "proj_out" in names
    return model


@pytest.mark.parametrize("config", ["fp8", "nvfp4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_replace_latent_layers_of_a_quantized_model_builds_float_layers(config, dtype):
    # _new_linear took old.weight.dtype: uint8 / float8 once quantized, and nn.Linear's init
    # failed (NotImplementedError / "only floating point tensors can require gradients")
    from dcgen.quant import FP8Config, NVFP4Config

    model = _quantized(tiny_flux, {"fp8": FP8Config, "nvfp4": NVFP4Config}[config], dtype)
    assert type(model.x_embedder).__name__ in ("FP8Linear", "NVFP4Linear")
    adapter = adapter_for(model)
    adapter.replace_latent_layers(latent_channels=4)
    for layer in (model.x_embedder, model.proj_out):
        assert type(layer) is torch.nn.Linear
        assert layer.weight.dtype == dtype and layer.weight.requires_grad  # the model's dtype
    embeds, pooled = text(1)
    with torch.no_grad():
        v = adapter.predict(torch.randn(1, 4, 2, 2), 0.5, embeds.to(dtype), pooled.to(dtype), 3.5)
    assert v.shape == (1, 4, 2, 2) and torch.isfinite(v).all()


def test_the_compute_dtype_of_a_quantized_layer_without_a_bias():
    from dcgen.adapters.base import DiTAdapter
    from dcgen.quant import FP8Linear, NVFP4Linear

    half = torch.nn.Linear(32, 16, bias=False).half()
    low_rank = NVFP4Linear.from_linear(half, rank=4, dtype=torch.float16)
    assert DiTAdapter._compute_dtype(low_rank) == torch.float16  # its low-rank factors'
    plain = FP8Linear.from_linear(half, dtype=torch.float16)
    assert DiTAdapter._compute_dtype(plain) == torch.bfloat16  # nothing to go by


@pytest.mark.parametrize("family", ["flux", "sana"])
def test_structured_latents_refuse_quantized_latent_layers_by_name(family):
    # StructuredLinear.from_linear assigned the uint8 / float8 weight buffer as a Parameter:
    # "cannot assign 'torch.ByteTensor' as parameter 'weight'", naming neither layer nor remedy
    from dcgen.quant import FP8Config, NVFP4Config

    make = tiny_flux if family == "flux" else tiny_sana
    for config_cls in (FP8Config, NVFP4Config):
        model = _quantized(make, config_cls)
        first = "x_embedder" if family == "flux" else "proj_out"
        kind = type(getattr(model, first)).__name__
        with pytest.raises(
            TypeError, match=rf"{first} is a quantized {kind} .*keep_latent_layers=True"
        ):
            adapter_for(model).enable_structured_latents()
        # refused before anything changed
        assert type(getattr(model, first)).__name__ == kind
        assert type(model.proj_out).__name__ in ("FP8Linear", "NVFP4Linear")
        if family == "sana":
            assert type(model.patch_embed.proj) is torch.nn.Conv2d


def test_structured_layers_refuse_a_layer_without_a_weight_parameter():
    from dcgen.adapters.structured import StructuredLinear
    from dcgen.quant import FP8Linear

    quantized = FP8Linear.from_linear(torch.nn.Linear(16, 8))
    with pytest.raises(
        TypeError, match=r"weight is a Parameter, got a FP8Linear with a torch\.float8"
    ):
        StructuredLinear.from_linear(quantized, 8, 1, "out", True)


@pytest.mark.parametrize("config", ["fp8", "nvfp4"])
def test_flux_predicts_with_a_quantized_embedder(config):
    # predict cast its inputs to x_embedder.weight.dtype: float8 / uint8 once quantized
    from dcgen.quant import FP8Config, NVFP4Config

    model = _quantized(tiny_flux, {"fp8": FP8Config, "nvfp4": NVFP4Config}[config], torch.bfloat16)
    assert type(model.x_embedder).__name__ in ("FP8Linear", "NVFP4Linear")
    embeds, pooled = text(1)
    with torch.no_grad():
        v = adapter_for(model).predict(torch.randn(1, 16, 4, 4), 0.5, embeds, pooled, 3.5)
    assert v.shape == (1, 16, 4, 4) and v.dtype == torch.bfloat16 and torch.isfinite(v).all()
