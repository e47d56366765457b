"""dcgen.attention: fused processors against diffusers' stock ones on tiny FLUX / SANA
(reference path on CPU, kernels on CUDA), install / undo, pipelines, torch.compile."""

from __future__ import annotations

import io

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.models.transformers.transformer_flux import FluxAttention, FluxAttnProcessor

from dcgen.adapters import adapter_for
from dcgen.attention import (
    FluxFusedAttnProcessor,
    SanaFusedCrossAttnProcessor,
    SanaFusedLinearAttnProcessor,
    accelerate,
    is_accelerated,
    unaccelerate,
)
from dcgen.attention.processors import clear_joint_norm_cache
from dcgen.pipelines import DCGenFluxPipeline, DCGenSanaPipeline

from .adapters.tiny import text, tiny_dcae, tiny_flux, tiny_sana


def flux_inputs(batch: int = 2, h: int = 4, w: int = 5, n_text: int = 5, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.zeros(h, w, 3)
    ids[..., 1] = torch.arange(h)[:, None]
    ids[..., 2] = torch.arange(w)[None, :]
    embeds, pooled = text(batch, n_text, seed)
    return dict(
        hidden_states=torch.randn(batch, h * w, 64, generator=g),
        encoder_hidden_states=embeds,
        pooled_projections=pooled,
        timestep=torch.full((batch,), 0.7),
        img_ids=ids.reshape(-1, 3),
        txt_ids=torch.zeros(n_text, 3),
        guidance=torch.full((batch,), 3.5),
        return_dict=False,
    )


def processors(model: torch.nn.Module) -> list[str]:
    return [type(m.processor).__name__ for m in model.modules() if hasattr(m, "processor")]


@torch.no_grad()
def test_flux_matches_stock_and_undoes():
    model = tiny_flux(layers=2)
    kwargs = flux_inputs()
    want = model(**kwargs)[0]
    assert accelerate(model) is model
    assert processors(model).count("FluxFusedAttnProcessor") == 4  # 2 double + 2 single
    assert is_accelerated(model)
    accelerate(model)  # idempotent
    got = model(**kwargs)[0]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    unaccelerate(model)
    assert not is_accelerated(model) and set(processors(model)) == {"FluxAttnProcessor"}
    torch.testing.assert_close(model(**kwargs)[0], want, atol=0, rtol=0)


@torch.no_grad()
def test_flux_fused_projections_match_stock():
    model = tiny_flux()
    kwargs = flux_inputs(batch=1)
    want = model(**kwargs)[0]
    model.fuse_qkv_projections()
    accelerate(model)
    torch.testing.assert_close(model(**kwargs)[0], want, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_flux_processor_uses_fused_op_per_block():
    # The fused path must really run: perturb the op and see the output move.
    import dcgen.attention.processors as procs

    model = accelerate(tiny_flux())
    kwargs = flux_inputs(batch=1)
    base = model(**kwargs)[0]
    original = procs.fused_attention
    calls = []

    def scaled(*args, **kw):
        calls.append(kw.get("norm_split"))
        return original(*args, **kw) * 1.01

    procs.fused_attention = scaled
    try:
        moved = model(**kwargs)[0]
    finally:
        procs.fused_attention = original
    assert calls == [5, 0]  # double block: 5 text tokens in their own norm; single: one sequence
    assert not torch.allclose(moved, base)


@pytest.mark.parametrize(
    "options", [{"blocks": True}, {"cuda_graphs": True}, {"blocks": True, "cuda_graphs": True}]
)
def test_accelerated_model_saves_loads_and_copies_whole(options):
    """torch.save / torch.load of a whole accelerated model (fused block forwards, CUDA-graph
    wrappers) and copy.deepcopy give a model that runs like the original, still accelerated,
    with its wrappers bound to its own blocks."""
    import copy

    model = tiny_flux(layers=2)
    accelerate(model, **options)
    kwargs = flux_inputs()
    with torch.no_grad():
        want = model(**kwargs)[0]
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    for other in (torch.load(buf, weights_only=False), copy.deepcopy(model)):
        assert is_accelerated(other)
        with torch.no_grad():
            torch.testing.assert_close(other(**kwargs)[0], want, rtol=0, atol=0)
        if options.get("cuda_graphs"):  # each wrapper watches the copy's block, not the original
            from dcgen.attention.cuda_graphs import graphs_of

            assert graphs_of(other)[0]._module() is other.transformer_blocks[0]
        unaccelerate(other)
        assert not is_accelerated(other)


def test_processors_set_after_accelerate_are_respected():
    """A processor set by other code after accelerate (set_attn_processor: a user's, an
    IP-Adapter's, a reset to stock) is not overwritten by unaccelerate, and accelerate after a
    reset to stock installs the fused processors again."""
    model = tiny_flux()

    class Mine(FluxAttnProcessor):
        pass

    accelerate(model)
    model.set_attn_processor(Mine())
    assert not is_accelerated(model)
    unaccelerate(model)
    assert set(processors(model)) == {"Mine"}
    accelerate(model)
    assert set(processors(model)) == {"Mine"}  # custom: left alone
    model.set_attn_processor(FluxAttnProcessor())  # a reset to stock
    accelerate(model)
    assert set(processors(model)) == {"FluxFusedAttnProcessor"} and is_accelerated(model)
    unaccelerate(model)
    assert set(processors(model)) == {"FluxAttnProcessor"}


def test_accelerate_names_what_it_needs():
    # None / a pipeline was a bare AttributeError ('... has no attribute modules')
    from dcgen import accelerate, unaccelerate

    class Pipe:
        transformer = None

    for fn in (accelerate, unaccelerate):
        with pytest.raises(TypeError, match="expected a torch.nn.Module .* got NoneType"):
            fn(None)
        with pytest.raises(TypeError, match=r"got Pipe \(a pipeline: pass pipe.transformer\)"):
            fn(Pipe())


def test_custom_processors_are_left_alone():
    model = tiny_flux()

    class Custom(FluxAttnProcessor):
        pass

    model.transformer_blocks[0].attn.set_processor(Custom())
    accelerate(model)
    assert type(model.transformer_blocks[0].attn.processor) is Custom
    assert type(model.single_transformer_blocks[0].attn.processor) is FluxFusedAttnProcessor


@torch.no_grad()
def test_sana_cross_attention_defers_to_stock_where_no_kernel_runs(monkeypatch):
    # On CPU (and on CUDA without the flash kernel or with SANA's 32-wide heads) the fused path
    # would only put mask conversion in front of the same SDPA call: the stock processor runs.
    import dcgen.attention.processors as procs

    monkeypatch.setattr(procs, "fused_attention", lambda *a, **k: pytest.fail("fused path ran"))
    model = tiny_sana()
    accelerate(model)
    attn = model.transformer_blocks[0].attn2
    g = torch.Generator().manual_seed(0)
    hs, ctx = torch.randn(2, 16, 16, generator=g), torch.randn(2, 6, 16, generator=g)
    got = attn.processor(attn, hs, ctx, None)
    torch.testing.assert_close(got, attn.processor._stock(attn, hs, ctx, None))


@torch.no_grad()
def test_sana_cross_attention_matches_stock_with_padding(monkeypatch):
    monkeypatch.setattr(SanaFusedCrossAttnProcessor, "always_fused", True)
    model = tiny_sana()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=g)
    embeds, _ = text(2, 6)
    mask = torch.ones(2, 6)
    mask[1, 3:] = 0
    kwargs = dict(encoder_hidden_states=embeds, timestep=torch.tensor([500.0, 20.0]),
                  return_dict=False)  # fmt: skip
    want = model(x, encoder_attention_mask=mask, **kwargs)[0]
    unmasked = model(x, **kwargs)[0]
    accelerate(model)
    assert processors(model).count("SanaFusedCrossAttnProcessor") == 2
    got = model(x, encoder_attention_mask=mask, **kwargs)[0]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(got[1], unmasked[1], atol=1e-4)  # the mask really acts
    torch.testing.assert_close(model(x, **kwargs)[0], unmasked, atol=1e-5, rtol=1e-5)


def _flux_attention(joint: bool, dim: int = 32, heads: int = 2) -> FluxAttention:
    torch.manual_seed(0)
    attn = FluxAttention(
        query_dim=dim,
        heads=heads,
        dim_head=dim // heads,
        added_kv_proj_dim=dim if joint else None,
        pre_only=not joint,
        bias=True,
        eps=1e-6,
    )
    for norm in [m for m in attn.modules() if isinstance(m, torch.nn.RMSNorm)]:
        torch.nn.init.normal_(norm.weight, 1.0, 0.2)  # not the identity
    return attn.eval()


def _rope(n: int, d: int) -> tuple[torch.Tensor, torch.Tensor]:
    angles = torch.rand(n, d // 2, generator=torch.Generator().manual_seed(1)) * 6.28
    return angles.cos().repeat_interleave(2, 1), angles.sin().repeat_interleave(2, 1)


@pytest.mark.parametrize("batch", [1, 2])
def test_joint_projections_write_one_buffer(batch, monkeypatch):
    # In inference the joint [text, image] q / k / v are one buffer per projection that the
    # GEMMs write their rows of (batch 1: six addmm with out=, no sequence torch.cat; batch 2:
    # rows of one element are not one block, so each result is copied in). Same bits as the
    # concatenation the processor does under autograd.
    attn = _flux_attention(joint=True)
    attn.set_processor(FluxFusedAttnProcessor())
    g = torch.Generator().manual_seed(3)
    image, text = torch.randn(batch, 11, 32, generator=g), torch.randn(batch, 4, 32, generator=g)
    rope = _rope(15, 16)
    with torch.enable_grad():  # nothing requires grad: the same values, through torch.cat
        want = attn(hidden_states=image, encoder_hidden_states=text, image_rotary_emb=rope)
    calls = []
    real_cat, real_addmm = torch.cat, torch.addmm

    def cat(tensors, dim=0, **kw):  # noqa: ANN001, ANN003, ANN202
        calls.append(f"cat{dim}")
        return real_cat(tensors, dim=dim, **kw)

    def addmm(*args, **kw):  # noqa: ANN002, ANN003, ANN202
        calls.append("addmm-out" if "out" in kw else "addmm")
        return real_addmm(*args, **kw)

    monkeypatch.setattr(torch, "cat", cat)
    monkeypatch.setattr(torch, "addmm", addmm)
    with torch.no_grad():
        got = attn(hidden_states=image, encoder_hidden_states=text, image_rotary_emb=rope)
    assert "cat1" not in calls
    assert calls.count("addmm-out") == (6 if batch == 1 else 0)
    for a, b in zip(got, want):
        assert torch.equal(a, b.detach())


def test_joint_projections_copy_what_cannot_write_in_place(rng):
    # A hooked layer (its hook must see the call) is called and copied in; a layer that states
    # no width is concatenated. The result is the concatenation either way.
    from dcgen.attention.processors import _joint_projections

    lin, other = torch.nn.Linear(8, 6), torch.nn.Linear(8, 6)
    seen = []
    other.register_forward_hook(lambda *a: seen.append(1))
    text, image = torch.randn(1, 3, 8, generator=rng), torch.randn(1, 5, 8, generator=rng)
    with torch.no_grad():
        want = torch.cat([other(text), lin(image)], dim=1)
        seen.clear()
        (got,) = _joint_projections((other,), (lin,), text, image)
        assert torch.equal(got, want) and seen == [1]
        unstated = torch.nn.Sequential(lin)  # no out_features: concatenated
        (got,) = _joint_projections((unstated,), (lin,), text, image)
        assert torch.equal(got, torch.cat([lin(text), lin(image)], dim=1))


def test_wrapped_forwards_count_as_hooks():
    # accelerate's / diffusers' offloading wraps a module's forward (moving its weights in)
    # instead of registering a torch hook: the fast paths that skip a module's call must see
    # that too, and call the module instead.
    from dcgen._hooks import has_forward_hooks
    from dcgen.attention.linear_out import linear_into

    lin = torch.nn.Linear(8, 4)
    assert not has_forward_hooks(lin)
    calls = []
    plain = lin.forward
    lin.forward = lambda x: calls.append(1) or plain(x)
    assert has_forward_hooks(lin)
    x, out = torch.randn(2, 8), torch.empty(2, 4)
    with torch.no_grad():
        linear_into(lin, x, out)
    assert calls == [1] and torch.equal(out, plain(x))
    offloaded = torch.nn.Linear(8, 4)
    offloaded._hf_hook = object()
    assert has_forward_hooks(offloaded)


def test_joint_norm_weights_are_kept_until_they_change(monkeypatch):
    # The (2, D) [text, image] norm weights are stacked once per module in inference and kept
    # while the weights stay the same tensors, unchanged; an in-place update is seen.
    attn = _flux_attention(joint=True)
    attn.set_processor(FluxFusedAttnProcessor())
    g = torch.Generator().manual_seed(4)
    image, text = torch.randn(1, 6, 32, generator=g), torch.randn(1, 3, 32, generator=g)
    rope = _rope(9, 16)
    stacks = []
    real_stack = torch.stack

    def stack(tensors, dim=0, **kw):  # noqa: ANN001, ANN003, ANN202
        if tensors[0].dim() == 1:  # norm weights (the CPU reference's RoPE stacks too)
            stacks.append(len(tensors))
        return real_stack(tensors, dim=dim, **kw)

    def run():  # noqa: ANN202
        return attn(hidden_states=image, encoder_hidden_states=text, image_rotary_emb=rope)

    monkeypatch.setattr(torch, "stack", stack)
    with torch.no_grad():
        first = run()
        assert len(stacks) == 2  # q and k
        assert all(torch.equal(a, b) for a, b in zip(run(), first)) and len(stacks) == 2
        attn.norm_added_q.weight.mul_(2)  # in place: the cache must notice
        moved = run()
        assert len(stacks) == 3 and not torch.equal(moved[1], first[1])  # text queries
        attn.norm_added_q.weight.div_(2)
        assert all(torch.equal(a, b) for a, b in zip(run(), first)) and len(stacks) == 4
    run()  # autograd: stacked on every call, differentiable
    assert len(stacks) == 6
    # a write through .data bypasses the version counter: clear_joint_norm_cache forgets
    with torch.no_grad():
        attn.norm_added_q.weight.data.mul_(2)
        clear_joint_norm_cache()
        assert not torch.equal(run()[1], first[1]) and len(stacks) == 8


def test_accelerated_attention_pickles_after_inference():
    # The norm-weight cache lives outside the module: torch.save of a whole model (or pipeline)
    # after an inference call must not meet its weak references.
    attn = _flux_attention(joint=True)
    attn.set_processor(FluxFusedAttnProcessor())
    g = torch.Generator().manual_seed(4)
    image, text = torch.randn(1, 6, 32, generator=g), torch.randn(1, 3, 32, generator=g)
    with torch.no_grad():
        want = attn(hidden_states=image, encoder_hidden_states=text, image_rotary_emb=_rope(9, 16))
    buf = io.BytesIO()
    torch.save(attn, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    with torch.no_grad():
        got = loaded(hidden_states=image, encoder_hidden_states=text, image_rotary_emb=_rope(9, 16))
    assert all(torch.equal(a, b) for a, b in zip(got, want))


@pytest.mark.parametrize("joint", [True, False])
def test_processor_compiles_without_graph_breaks(joint):
    attn = _flux_attention(joint)
    g = torch.Generator().manual_seed(0)
    hs = torch.randn(2, 12, 32, generator=g)
    ehs = torch.randn(2, 4, 32, generator=g) if joint else None
    cos, sin = _rope(16 if joint else 12, 16)
    proc = FluxFusedAttnProcessor()

    def fn(hs, ehs, cos, sin):
        return proc(attn, hs, ehs, None, (cos, sin))

    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True, backend="eager")
    with torch.no_grad():
        got, want = (
            compiled(hs, ehs, cos, sin),
            FluxAttnProcessor()(attn, hs, ehs, None, (cos, sin)),
        )
    for a, b in zip(got if joint else [got], want if joint else [want]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_sana_processor_compiles_without_graph_breaks(monkeypatch):
    monkeypatch.setattr(SanaFusedCrossAttnProcessor, "always_fused", True)
    model = tiny_sana()
    attn = model.transformer_blocks[0].attn2
    g = torch.Generator().manual_seed(0)
    hs, ctx = torch.randn(2, 16, 16, generator=g), torch.randn(2, 6, 16, generator=g)
    bias = torch.zeros(2, 1, 6)
    bias[1, :, 4:] = -10000.0
    proc = SanaFusedCrossAttnProcessor()
    torch._dynamo.reset()
    compiled = torch.compile(lambda a, b, m: proc(attn, a, b, m), fullgraph=True, backend="eager")
    with torch.no_grad():
        torch.testing.assert_close(compiled(hs, ctx, bias), attn.processor(attn, hs, ctx, bias))


def test_dcgen_flux_pipeline_unchanged_by_accelerate():
    ae = tiny_dcae()
    model = tiny_flux()
    adapter_for(model).replace_latent_layers(ae.latent_channels)
    pipe = DCGenFluxPipeline(model, ae, FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True))
    pipe.set_progress_bar_config(disable=True)
    embeds, pooled = text(1)
    kwargs = dict(prompt_embeds=embeds, pooled_prompt_embeds=pooled, height=64, width=96,
                  num_inference_steps=2, output_type="pt")  # fmt: skip
    want = pipe(generator=torch.Generator().manual_seed(0), **kwargs).images
    accelerate(pipe.transformer)
    got = pipe(generator=torch.Generator().manual_seed(0), **kwargs).images
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_dcgen_sana_pipeline_unchanged_by_accelerate():
    ae = tiny_dcae()
    model = tiny_sana()
    adapter_for(model).replace_latent_layers(ae.latent_channels)
    pipe = DCGenSanaPipeline(model, ae, FlowMatchEulerDiscreteScheduler(shift=3.0))
    pipe.set_progress_bar_config(disable=True)
    mask = torch.ones(1, 5)
    mask[0, 3:] = 0
    kwargs = dict(prompt_embeds=torch.randn(1, 5, 32, generator=torch.Generator().manual_seed(2)),
                  prompt_attention_mask=mask, height=64, width=64, num_inference_steps=2,
                  output_type="pt")  # fmt: skip
    want = pipe(generator=torch.Generator().manual_seed(0), **kwargs).images
    accelerate(pipe.transformer)
    got = pipe(generator=torch.Generator().manual_seed(0), **kwargs).images
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.cuda
@pytest.mark.parametrize("kernel", ["sdpa", "flash"])
@pytest.mark.parametrize("joint", [True, False])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("batch", [1, 2])
def test_cuda_flux_attention_matches_stock(batch, joint, dtype, kernel, monkeypatch):
    # FLUX's head dim (128): the processor's whole step (joint text + image, QK norms, RoPE) on
    # the default path (qk_norm_rope kernel + SDPA) and on dcgen's flash kernel (the portable
    # one: the Hopper kernels' tests run in their own process). Batch 1 writes the joint
    # q / k / v projections in place (addmm(out=)), batch 2 copies them in.
    monkeypatch.setenv("DCGEN_ATTENTION_KERNEL", kernel)
    monkeypatch.setenv("DCGEN_ATTENTION_SM90", "0")
    attn = _flux_attention(joint, dim=256, heads=2).to("cuda", dtype)
    g = torch.Generator().manual_seed(0)
    n_img, n_txt = 300, 77
    hs = torch.randn(batch, n_img, 256, generator=g).to("cuda", dtype)
    ehs = torch.randn(batch, n_txt, 256, generator=g).to("cuda", dtype) if joint else None
    cos, sin = _rope(n_img + (n_txt if joint else 0), 128)
    rope = (cos.cuda(), sin.cuda())
    with torch.no_grad():
        want = FluxAttnProcessor()(attn, hs, ehs, None, rope)
        got = FluxFusedAttnProcessor()(attn, hs, ehs, None, rope)
    tol = 3e-2 if dtype == torch.bfloat16 else 5e-3
    for a, b in zip(got if joint else [got], want if joint else [want]):
        assert not a.isnan().any()
        torch.testing.assert_close(a.float(), b.float(), atol=tol, rtol=tol)
        # the outputs are small (std about 0.05): also bound the relative error as a whole,
        # which a one-token offset or a wrong softmax scale exceeds in bf16 too
        err = float((a.float() - b.float()).norm() / b.float().norm())
        assert err < (1.5e-2 if dtype == torch.bfloat16 else 4e-3), err


def test_accelerated_flux_blocks_compile_without_graph_breaks():
    model = accelerate(tiny_flux())
    g = torch.Generator().manual_seed(0)
    hs, ehs = torch.randn(1, 12, 32, generator=g), torch.randn(1, 5, 32, generator=g)
    temb = torch.randn(1, 32, generator=g)
    cos, sin = (t.double() for t in _rope(17, 16))  # FluxPosEmbed's float64 tables
    for block in (model.transformer_blocks[0], model.single_transformer_blocks[0]):

        def fn(hs, ehs, temb, cos, sin, block=block):
            return block(hs, ehs, temb, image_rotary_emb=(cos, sin))

        torch._dynamo.reset()
        compiled = torch.compile(fn, fullgraph=True, backend="eager")
        with torch.no_grad():
            for a, b in zip(compiled(hs, ehs, temb, cos, sin), fn(hs, ehs, temb, cos, sin)):
                torch.testing.assert_close(a, b)


@torch.no_grad()
def test_sana_linear_self_attention_matches_stock():
    # accelerate also swaps SANA's ReLU linear self-attention onto dcgen's op.
    model = tiny_sana()
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 4, 8, 8, generator=g)
    embeds, _ = text(2, 6)
    kwargs = dict(encoder_hidden_states=embeds, timestep=torch.tensor([300.0, 900.0]),
                  return_dict=False)  # fmt: skip
    want = model(x, **kwargs)[0]
    accelerate(model)
    assert processors(model).count("SanaFusedLinearAttnProcessor") == 2
    torch.testing.assert_close(model(x, **kwargs)[0], want, atol=1e-5, rtol=1e-5)
    attn = model.transformer_blocks[0].attn1
    hs = torch.randn(2, 16, attn.to_q.in_features, generator=g)
    # another key length or a mask: the stock processor answers, exactly
    other = torch.randn(2, 9, attn.to_q.in_features, generator=g)
    stock = attn.processor._stock
    torch.testing.assert_close(attn.processor(attn, hs, other), stock(attn, hs, other))
    unaccelerate(model)
    assert processors(model).count("SanaFusedLinearAttnProcessor") == 0


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_sana_linear_attention_matches_stock(dtype):
    model = tiny_sana().cuda().to(dtype)
    attn = model.transformer_blocks[0].attn1
    g = torch.Generator().manual_seed(4)
    hs = torch.randn(2, 300, attn.to_q.in_features, generator=g).to("cuda", dtype)
    with torch.no_grad():
        want = attn.processor(attn, hs)
        got = SanaFusedLinearAttnProcessor()(attn, hs)
    torch.testing.assert_close(got.float(), want.float(), atol=2e-2, rtol=2e-2)


@pytest.mark.cuda
def test_cuda_sana_cross_attention_flash_path_matches_stock(monkeypatch):
    # 64-wide cross-attention heads and DCGEN_ATTENTION_KERNEL=flash: the one case where the
    # processor runs dcgen's kernel (with the caption's key padding); elsewhere it defers.
    from diffusers.models.attention_processor import Attention
    from diffusers.models.transformers.sana_transformer import SanaAttnProcessor2_0

    import dcgen.attention.processors as procs

    monkeypatch.setenv("DCGEN_ATTENTION_KERNEL", "flash")
    monkeypatch.setenv("DCGEN_ATTENTION_SM90", "0")  # the portable kernel in this process
    torch.manual_seed(0)
    attn = Attention(query_dim=128, cross_attention_dim=96, heads=2, dim_head=64, bias=True,
                     processor=SanaAttnProcessor2_0()).to("cuda", torch.bfloat16).eval()  # fmt: skip
    g = torch.Generator().manual_seed(6)
    hs = torch.randn(2, 70, 128, generator=g).to("cuda", torch.bfloat16)
    ctx = torch.randn(2, 9, 96, generator=g).to("cuda", torch.bfloat16)
    bias = torch.zeros(2, 1, 9, device="cuda", dtype=torch.bfloat16)
    bias[1, :, 5:] = -10000.0
    calls = []
    original = procs.fused_attention
    monkeypatch.setattr(
        procs, "fused_attention", lambda *a, **k: calls.append(1) or original(*a, **k)
    )
    with torch.no_grad():
        want = attn.processor(attn, hs, ctx, bias)
        got = SanaFusedCrossAttnProcessor()(attn, hs, ctx, bias)
    assert calls, "the fused path did not run"
    torch.testing.assert_close(got.float(), want.float(), atol=2e-2, rtol=2e-2)


def test_sana_linear_processor_compiles_without_graph_breaks():
    model = tiny_sana()
    attn = model.transformer_blocks[0].attn1
    hs = torch.randn(2, 16, attn.to_q.in_features, generator=torch.Generator().manual_seed(5))
    proc = SanaFusedLinearAttnProcessor()
    torch._dynamo.reset()
    compiled = torch.compile(lambda x: proc(attn, x), fullgraph=True, backend="eager")
    with torch.no_grad():
        torch.testing.assert_close(compiled(hs), attn.processor(attn, hs), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("how", ["blocks", "cuda_graphs", "both"])
def test_del_frees_an_accelerated_model_without_the_cycle_collector(how):
    # The fused blocks' forward (a partial of the block) and the CUDA-graph wrapper (the
    # block's bound forward), both kept on the block itself, were reference cycles: `del
    # model` freed no weight (GPU memory included) until Python's cycle collector ran.
    import gc
    import weakref

    from dcgen.attention import cuda_graphs

    model = tiny_flux()
    if how in ("blocks", "both"):
        accelerate(model, blocks=True)
    if how in ("cuda_graphs", "both"):
        cuda_graphs.install(model)  # the wrappers only (graphs are captured on CUDA inputs)
    weight = weakref.ref(model.transformer_blocks[0].attn.to_q.weight)
    enabled = gc.isenabled()
    gc.disable()
    try:
        del model
        assert weight() is None
    finally:
        if enabled:
            gc.enable()
