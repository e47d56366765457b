"""accelerate(model, blocks=True): FLUX and SANA blocks with fused glue
(dcgen/attention/fused_blocks.py) and its ops (dcgen/ops/modulation.py) against diffusers' own
forwards and the fp64 math."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from diffusers.models.transformers.transformer_flux import (
    FluxSingleTransformerBlock,
    FluxTransformerBlock,
)
from torch import nn

from dcgen.attention import accelerate, fused_blocks, is_accelerated, unaccelerate
from dcgen.ops import (
    adaln_modulate,
    adaln_modulate_reference,
    gated_residual,
    gated_residual_reference,
    has_kernel,
)
from dcgen.ops._extension import compiled_op
from dcgen.quant import FP8Config, quantize_
from tests.conftest import cat_dims, poison_cuda_allocator

from .adapters.tiny import text, tiny_flux, tiny_sana
from .test_accelerate import flux_inputs

DIM, HEADS, HEAD_DIM = 64, 2, 32


def _rand(*shape, g, dtype=torch.float32):
    return torch.randn(*shape, generator=g).to(dtype)


# ------------------------------------------------------------------------------ ops: spec


def test_adaln_modulate_reference_is_layer_norm_then_modulation(rng):
    x = _rand(2, 7, 24, g=rng) * 3 + 5  # an offset mean: the variance must be taken about it
    shift, scale = _rand(2, 24, g=rng), _rand(2, 24, g=rng)
    got = adaln_modulate_reference(x, shift, scale, eps=1e-6)
    xd = x.double()
    mean = xd.mean(-1, keepdim=True)
    var = (xd - mean).pow(2).mean(-1, keepdim=True)
    want = (xd - mean) / (var + 1e-6).sqrt() * (1 + scale.double()[:, None]) + shift.double()[
        :, None
    ]
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    # the public op on the CPU, and a 2-D input (B = 1)
    torch.testing.assert_close(adaln_modulate(x, shift, scale), got)
    torch.testing.assert_close(
        adaln_modulate(x[0], shift[:1], scale[:1]),
        adaln_modulate_reference(x[:1], shift[:1], scale[:1])[0],
    )


def test_gated_residual_reference(rng):
    x, y, gate = _rand(3, 5, 16, g=rng), _rand(3, 5, 16, g=rng), _rand(3, 16, g=rng)
    want = x.double() + gate.double()[:, None] * y.double()
    torch.testing.assert_close(gated_residual(x, gate, y).double(), want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(gated_residual_reference(x, gate, y), gated_residual(x, gate, y))


def test_modulation_ops_broadcast_one_row_over_the_batch(rng):
    # diffusers' blocks broadcast a (1, D) modulation over B sequences: so do the ops.
    x, y, p = _rand(3, 5, 16, g=rng), _rand(3, 5, 16, g=rng), _rand(1, 16, g=rng)
    q = _rand(3, 16, g=rng)
    torch.testing.assert_close(adaln_modulate(x, p, q), adaln_modulate(x, p.expand(3, 16), q))
    torch.testing.assert_close(gated_residual(x, p, y), gated_residual(x, p.expand(3, 16), y))


def test_modulation_ops_reject_bad_inputs(rng):
    x, p = _rand(2, 3, 8, g=rng), _rand(2, 8, g=rng)
    with pytest.raises(ValueError, match=r"shift of shape \(2, 8\)"):
        adaln_modulate(x, _rand(3, 8, g=rng), p)
    with pytest.raises(ValueError, match="eps > 0"):
        adaln_modulate(x, p, p, eps=0.0)
    with pytest.raises(ValueError, match=r"gate of shape \(2, 8\)"):
        gated_residual(x, p[:, :4], x)
    with pytest.raises(ValueError, match="y of x's shape"):
        gated_residual(x, p, x[:, :2])
    with pytest.raises(TypeError, match="dtype"):
        gated_residual(x, p, x.double())
    with pytest.raises(ValueError, match="dims"):
        adaln_modulate(x[None], p, p)


# ------------------------------------------------------------------------------ ops: CUDA


def _need(op: str) -> None:
    if not has_kernel(op, "cuda"):
        pytest.skip(f"dcgen._C has no CUDA {op} kernel")


SHAPES = [(1, 1, 8), (2, 5, 24), (1, 7, 13), (3, 33, 3072), (2, 4, 1000)]


@pytest.mark.cuda
@pytest.mark.parametrize("param_dtype", ["same", "float32"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_modulation_kernels_match_reference(dtype, param_dtype, rng):
    _need("adaln_modulate")
    for b, s, d in SHAPES:
        pd = dtype if param_dtype == "same" else torch.float32
        x = (_rand(b, s, d, g=rng) * 2 + 1).to(dtype).cuda()
        y = _rand(b, s, d, g=rng).to(dtype).cuda()
        emb = _rand(b, 3 * d, g=rng).to(pd).cuda()
        shift, scale, gate = emb.chunk(3, dim=1)  # row stride 3d, as the blocks pass them
        poison_cuda_allocator()
        got = compiled_op("adaln_modulate")(x.reshape(b * s, d), shift, scale, s, 1e-6)
        want = adaln_modulate_reference(x.cpu(), shift.cpu(), scale.cpu(), 1e-6)
        assert not got.isnan().any(), (b, s, d)
        # fp32 math in another summation order, one rounding: at most one output ulp apart
        torch.testing.assert_close(
            got.reshape(b, s, d).cpu().float(), want.float(), rtol=1e-2, atol=2e-2
        )
        poison_cuda_allocator()
        got = compiled_op("gated_residual")(x.reshape(b * s, d), gate, y.reshape(b * s, d), s)
        want = gated_residual_reference(x.cpu(), gate.cpu(), y.cpu())
        assert not got.isnan().any(), (b, s, d)
        torch.testing.assert_close(
            got.reshape(b, s, d).cpu().float(), want.float(), rtol=1e-2, atol=1e-2
        )


@pytest.mark.cuda
def test_cuda_modulation_params_with_their_own_row_strides(rng):
    # shift / scale / gate from different tensors (row strides 5d, d and 0: a broadcast row),
    # through the public ops: each parameter is read with its own stride.
    _need("adaln_modulate")
    b, s, d = 3, 7, 264
    x = (_rand(b, s, d, g=rng) * 2 + 1).bfloat16().cuda()
    y = _rand(b, s, d, g=rng).bfloat16().cuda()
    shift = _rand(b, 5 * d, g=rng).bfloat16().cuda()[:, 2 * d : 3 * d]
    scale = _rand(b, d, g=rng).bfloat16().cuda()
    row = _rand(1, d, g=rng).bfloat16().cuda()
    for sh, sc in [(shift, scale), (scale, shift), (row, shift), (scale, row)]:
        poison_cuda_allocator()
        with torch.no_grad():
            got = adaln_modulate(x, sh, sc)
        want = adaln_modulate_reference(x.cpu(), sh.cpu().expand(b, d), sc.cpu().expand(b, d))
        torch.testing.assert_close(got.cpu().float(), want.float(), rtol=1e-2, atol=2e-2)
    for gate in (shift, row):
        poison_cuda_allocator()
        with torch.no_grad():
            got = gated_residual(x, gate, y)
        want = gated_residual_reference(x.cpu(), gate.cpu().expand(b, d), y.cpu())
        torch.testing.assert_close(got.cpu().float(), want.float(), rtol=1e-2, atol=1e-2)


@pytest.mark.cuda
def test_cuda_modulation_kernels_reject_bad_inputs():
    _need("adaln_modulate")
    x = torch.ones(6, 8, device="cuda", dtype=torch.bfloat16)
    p = torch.ones(2, 8, device="cuda", dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="rows_per_batch"):
        compiled_op("adaln_modulate")(x, p, p, 4, 1e-6)
    with pytest.raises(RuntimeError, match="shape"):
        compiled_op("gated_residual")(x, p[:1], x, 3)


# ------------------------------------------------------------------------------ blocks


def _block_inputs(batch=2, n_img=12, n_txt=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return dict(
        hidden_states=_rand(batch, n_img, DIM, g=g),
        encoder_hidden_states=_rand(batch, n_txt, DIM, g=g),
        temb=_rand(batch, DIM, g=g),
        image_rotary_emb=None,
    )


def _blocks():
    torch.manual_seed(0)
    return [
        FluxTransformerBlock(DIM, HEADS, HEAD_DIM).eval(),
        FluxSingleTransformerBlock(DIM, HEADS, HEAD_DIM).eval(),
    ]


@pytest.mark.parametrize("index", [0, 1], ids=["double", "single"])
def test_fused_block_matches_diffusers(index):
    block = _blocks()[index]
    inputs = _block_inputs()
    with torch.no_grad():
        want = block(**inputs)
        assert fused_blocks.install(block) == 1 and fused_blocks.is_installed(block)
        got = block(**inputs)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)
    assert fused_blocks.restore(block) == 1
    assert "forward" not in block.__dict__ and not fused_blocks.is_installed(block)


@pytest.mark.parametrize("index", [0, 1], ids=["double", "single"])
def test_fused_block_with_fp8_linears(index, monkeypatch):
    # FP8 linears: the MLP's GELU goes into the FP8 GEMM's scale epilogue ("tensor" route).
    monkeypatch.setenv("DCGEN_FP8_GEMM", "tensor")
    block = _blocks()[index].bfloat16()
    quantize_(block, FP8Config())
    inputs = {k: (v.bfloat16() if v is not None else v) for k, v in _block_inputs().items()}
    with torch.no_grad():
        want = block(**inputs)
        fused_blocks.install(block)
        got = block(**inputs)
    for g, w in zip(got, want):
        err = float((g.float() - w.float()).norm() / w.float().norm())
        assert err < 1e-2, err  # the same FP8 operands; bf16 roundings differ


@pytest.mark.parametrize("processor", ["stock", "dcgen"])
@pytest.mark.parametrize("index", [0, 1], ids=["double", "single"])
def test_fp8_block_inputs_quantized_by_the_modulation(index, processor, monkeypatch):
    # With FP8 linears, every modulated block input comes with its row quantization from the
    # modulation op (adaln_modulate_fp8) and the linears reading it take that instead of
    # quantizing it again: the quantize op then runs only for the other inputs (attention
    # outputs, the MLPs' second linears). Same bits as the block quantizing every input itself.
    import dcgen.quant.fp8_linear as fp8_linear

    # With dcgen's attention processor too (its joint q / k / v buffers call the image
    # projections, then the text ones, so the shared quantization still serves each input).
    block = _blocks()[index].bfloat16()
    quantize_(block, FP8Config())
    if processor == "dcgen":
        accelerate(block, blocks=True)
    else:
        fused_blocks.install(block)
    inputs = {k: (v.bfloat16() if v is not None else v) for k, v in _block_inputs().items()}
    quantized = []
    real_quantize = fp8_linear._qop.quantize_fp8

    def spy(x, granularity):  # noqa: ANN001, ANN202
        quantized.append(tuple(x.shape))
        return real_quantize(x, granularity)

    monkeypatch.setattr(fp8_linear._qop, "quantize_fp8", spy)
    with torch.no_grad():
        got = block(**inputs)
        offered_calls = len(quantized)
        monkeypatch.setattr(fused_blocks, "takes_fp8_rows", lambda layer: False)
        quantized.clear()
        want = block(**inputs)
    # double: to_out, to_add_out and the two MLPs' second linears; single: proj_out
    assert offered_calls == (4 if index == 0 else 1)
    # without offers: also the image and text q/k/v inputs and the two MLP inputs (single: the
    # one shared q/k/v + MLP input)
    assert len(quantized) == (8 if index == 0 else 2)
    for g, w in zip(got, want):
        assert torch.equal(g, w)


def test_offered_quantization_is_scoped_and_matched_by_identity(rng):
    from dcgen.quant.fp8_linear import FP8Linear, offered_quantization

    layer = FP8Linear.from_linear(nn.Linear(16, 8))
    x = _rand(3, 16, g=rng).bfloat16()
    marker = (torch.zeros(3, 16, dtype=torch.float8_e4m3fn), torch.ones(3, 1))
    with torch.no_grad():
        want = layer(x)
        with offered_quantization(x, marker):
            # all-zero codes: only the bias is left when the offer is taken
            torch.testing.assert_close(layer(x), layer.bias.expand(3, 8))
            assert torch.equal(layer(x.clone()), want)  # another tensor: quantized itself
            x.mul_(2)  # changed in place (version bump): the offer no longer matches it
            assert not torch.equal(layer(x), layer.bias.expand(3, 8))
            x.div_(2)  # exact: a power of two
        assert torch.equal(layer(x), want)  # the offer ended with the block
        with offered_quantization(x, marker), torch.enable_grad():
            assert torch.equal(layer(x), want)  # autograd never takes offers


def test_linear_gelu_keeps_wrapped_layers_exact(rng):
    # A layer that is not a plain nn.Linear / FP8Linear (a LoRA wrapper, say) keeps gelu(proj(x)).
    class Wrapped(nn.Module):
        def __init__(self):
            super().__init__()
            self.base, self.delta = nn.Linear(8, 4), nn.Linear(8, 4, bias=False)

        def forward(self, x):
            return self.base(x) + self.delta(x)

    proj, x = Wrapped(), _rand(3, 8, g=rng)
    with torch.no_grad():
        torch.testing.assert_close(
            fused_blocks.linear_gelu(proj, x), F.gelu(proj(x), approximate="tanh")
        )
        lin = nn.Linear(8, 4)
        torch.testing.assert_close(
            fused_blocks.linear_gelu(lin, x), F.gelu(lin(x), approximate="tanh")
        )


def test_single_block_proj_out_input_is_never_concatenated(monkeypatch):
    # In inference proj_out's [attention | MLP] input is never torch.cat-ed along features. A
    # plain nn.Linear proj_out runs one GEMM per half (linear_of_parts); one with a forward
    # hook (or any other layer) reads one buffer both halves were written into, and its hook
    # runs. With autograd on, or when the layers do not state their widths, the concatenation
    # stays. Same output every way.
    block = _blocks()[1]
    inputs = _block_inputs()
    with torch.no_grad():
        want = block(**inputs)
    fused_blocks.install(block)
    split_calls = []
    real_split = fused_blocks.linear_of_parts

    def spy(proj, parts):  # noqa: ANN001, ANN202
        split_calls.append([p.shape[-1] for p in parts])
        return real_split(proj, parts)

    monkeypatch.setattr(fused_blocks, "linear_of_parts", spy)
    dims = cat_dims(monkeypatch)
    with torch.no_grad():
        got = block(**inputs)
    assert [d in (2, -1) for d in dims] == [False]  # only the [text, image] sequence cat
    assert fused_blocks._joint_widths(block) == (DIM, block.proj_mlp.out_features)
    assert split_calls == [[DIM, block.proj_mlp.out_features]]
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)

    seen = []
    handle = block.proj_out.register_forward_hook(lambda m, i, o: seen.append(i[0].shape[-1]))
    dims.clear()
    with torch.no_grad():
        hooked = block(**inputs)
    handle.remove()
    assert [d in (2, -1) for d in dims] == [False] and len(split_calls) == 1
    assert seen == [DIM + block.proj_mlp.out_features]  # the joint buffer, through the hook
    for g, w in zip(hooked, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)

    dims.clear()
    trained = block(**inputs)  # grad mode: the concatenation
    assert [d in (2, -1) for d in dims] == [False, True]
    torch.testing.assert_close(trained[1].detach(), want[1], rtol=1e-5, atol=1e-5)
    monkeypatch.delattr(block.proj_mlp, "out_features")
    assert fused_blocks._joint_widths(block) is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_of_parts_is_the_linear_of_the_concatenation(dtype, rng):
    from dcgen.attention.linear_out import linear_of_parts, splits_over_parts

    lin = nn.Linear(48 + 80, 40).to(dtype)
    parts = [
        torch.randn(2, 7, 48, generator=rng).to(dtype),
        torch.randn(2, 7, 80, generator=rng).to(dtype),
    ]
    with torch.no_grad():
        assert splits_over_parts(lin, parts[0])
        got = linear_of_parts(lin, parts)
        want = lin(torch.cat(parts, dim=-1))
        assert got.shape == want.shape == (2, 7, 40) and got.dtype == dtype
        if dtype == torch.float32:
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)  # summation order
        else:  # one more bf16 rounding of the first part's partial sum
            err = float((got.float() - want.float()).norm() / want.float().norm())
            assert err < 1e-2, err
        with pytest.raises(ValueError, match="sum to in_features=128"):
            linear_of_parts(lin, parts[:1])
    assert not splits_over_parts(lin, parts[0])  # grad mode: the caller concatenates
    with torch.no_grad():
        assert not splits_over_parts(nn.Linear(128, 40, bias=False).to(dtype), parts[0])
        half = parts[0].half()  # fp16: a partial sum could overflow where the whole fits
        assert not splits_over_parts(lin.half(), half)


def test_chained_single_blocks_join_their_halves_without_cat(monkeypatch):
    # The (text, image) halves a single block returns are views of one buffer; the next single
    # block takes them as that buffer instead of concatenating them again (inference). Same
    # outputs as the stock blocks; the first block, fed separate tensors, still concatenates.
    torch.manual_seed(0)
    first, second = (FluxSingleTransformerBlock(DIM, HEADS, HEAD_DIM).eval() for _ in range(2))
    inputs = _block_inputs()
    temb = inputs["temb"]

    def chain():  # noqa: ANN202
        text, image = first(**inputs)
        return second(hidden_states=image, encoder_hidden_states=text, temb=temb)

    with torch.no_grad():
        want = chain()
    for block in (first, second):
        fused_blocks.install(block)
    dims = cat_dims(monkeypatch)
    with torch.no_grad():
        got = chain()
    sequence_cats = [d == 1 for d in dims]
    assert sequence_cats == [True]  # the first block's only
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)
    dims.clear()
    chain()  # autograd on: both blocks concatenate
    sequence_cats = [d == 1 for d in dims]
    assert sequence_cats.count(True) == 2


def test_adjacent_join_only_joins_what_lies_together(rng):
    buf = _rand(2, 7, 4, g=rng)
    text, image = buf[:, :3], buf[:, 3:]
    with torch.no_grad():
        joined = fused_blocks._adjacent_join(text, image)
        assert joined is not None and joined.data_ptr() == buf.data_ptr()
        assert torch.equal(joined, buf)
        assert fused_blocks._adjacent_join(image, text) is None  # wrong order
        assert fused_blocks._adjacent_join(text, image.clone()) is None  # another buffer
        assert fused_blocks._adjacent_join(buf[:, :2], image) is None  # a gap between them
        assert fused_blocks._adjacent_join(buf[:1, :3], buf[:1, 3:]) is not None  # batch 1
        wide = _rand(2, 7, 8, g=rng)[..., :4]  # rows with a stride past their width
        assert fused_blocks._adjacent_join(wide[:, :3], wide[:, 3:]) is None
    assert fused_blocks._adjacent_join(text, image) is None  # autograd: no aliasing views


@pytest.mark.parametrize("index", [0, 1], ids=["double", "single"])
def test_inference_calls_the_attention_processor_directly(index, monkeypatch):
    # FluxAttention.forward inspects the processor's signature on every call to filter keyword
    # arguments; with none to filter, the fused blocks call the processor themselves in
    # inference. A hook on the attention module or autograd keeps the module call (so do
    # keyword arguments, not exercised here). Same output every way.
    from diffusers.models.transformers.transformer_flux import FluxAttention

    block = _blocks()[index]
    inputs = _block_inputs()
    with torch.no_grad():
        want = block(**inputs)
    fused_blocks.install(block)
    calls = []
    real = FluxAttention.forward

    def counted(self, *a, **k):  # noqa: ANN001, ANN002, ANN003, ANN202
        calls.append(1)
        return real(self, *a, **k)

    monkeypatch.setattr(FluxAttention, "forward", counted)
    monkeypatch.setattr(fused_blocks, "_FLUX_ATTENTION_FORWARD", counted)
    with torch.no_grad():
        got = block(**inputs)
    assert calls == []
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)
    seen = []
    handle = block.attn.register_forward_hook(lambda m, a, o: seen.append(1))
    with torch.no_grad():
        hooked = block(**inputs)
    handle.remove()
    assert calls == [1] and seen == [1]
    block(**inputs)  # grad mode
    assert calls == [1, 1]
    for g, w in zip(hooked, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("index", [0, 1], ids=["double", "single"])
def test_fp8_blocks_call_the_processor_directly_in_the_sharing_scope(index, monkeypatch):
    # quantize_ puts FP8 input sharing's two hooks on every FluxAttention; with only those the
    # fused blocks still call the processor directly, inside the scope the hooks would open
    # (sharing depth one more than outside: the single block is itself a sharing module). Any
    # other hook keeps the module call. Same bits every way.
    from diffusers.models.transformers.transformer_flux import FluxAttention

    import dcgen.quant.fp8_linear as fp8_linear

    block = _blocks()[index].bfloat16()
    quantize_(block, FP8Config())
    assert fp8_linear.shared_quantization_scope(block.attn) is not None
    fused_blocks.install(block)
    inputs = {k: (v.bfloat16() if v is not None else v) for k, v in _block_inputs().items()}
    calls, depths = [], []
    real, processor = FluxAttention.forward, block.attn.processor

    def counted(self, *a, **k):  # noqa: ANN001, ANN002, ANN003, ANN202
        calls.append(1)
        return real(self, *a, **k)

    def spy(*a, **k):  # noqa: ANN002, ANN003, ANN202
        depths.append(fp8_linear._shared.depth)
        return processor(*a, **k)

    monkeypatch.setattr(FluxAttention, "forward", counted)
    monkeypatch.setattr(fused_blocks, "_FLUX_ATTENTION_FORWARD", counted)
    block.attn.processor = spy
    with torch.no_grad():
        got = block(**inputs)
        assert calls == [] and depths == [1 + index] and fp8_linear._shared.depth == 0
        monkeypatch.setattr(fused_blocks, "shared_quantization_scope", lambda m: None)
        want = block(**inputs)  # the module call, its hooks open the scope
        assert calls == [1] and depths == [1 + index] * 2
        monkeypatch.undo()
        monkeypatch.setattr(FluxAttention, "forward", counted)
        monkeypatch.setattr(fused_blocks, "_FLUX_ATTENTION_FORWARD", counted)
        handle = block.attn.register_forward_pre_hook(lambda m, a: None)
        assert fp8_linear.shared_quantization_scope(block.attn) is None
        hooked = block(**inputs)
        handle.remove()
    assert calls == [1, 1]
    for g, w, h in zip(got, want, hooked):
        assert torch.equal(g, w) and torch.equal(h, w)


def test_unfusable_blocks_are_left_alone():
    double, single = _blocks()
    double.norm2 = nn.LayerNorm(DIM)  # affine: not the layout the fused forward reads
    single.act_mlp = nn.GELU()  # exact GELU, not tanh
    assert not fused_blocks.fusable(double) and not fused_blocks.fusable(single)
    assert fused_blocks.install(nn.ModuleList([double, single])) == 0


def test_accelerate_blocks_on_a_transformer_and_undo():
    model = tiny_flux()
    inputs = flux_inputs()
    with torch.no_grad():
        want = model(**inputs)[0]
        accelerate(model, blocks=True)
        assert is_accelerated(model) and fused_blocks.is_installed(model)
        got = model(**inputs)[0]
        unaccelerate(model)
        assert not is_accelerated(model)
        again = model(**inputs)[0]
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(again, want)


def test_fused_blocks_keep_gradients():
    # Training through patched blocks: the ops fall back to their (differentiable) references.
    block = _blocks()[0]
    ref = copy.deepcopy(block)
    fused_blocks.install(block)
    inputs = _block_inputs()
    for m in (block, ref):
        out = m(**inputs)
        (out[0].square().mean() + out[1].square().mean()).backward()
    for (name, p), q in zip(block.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_fused_block_compiles_fullgraph():
    block = _blocks()[1]
    fused_blocks.install(block)
    inputs = _block_inputs()
    torch._dynamo.reset()
    compiled = torch.compile(block, fullgraph=True, backend="eager")
    with torch.no_grad():
        want, got = block(**inputs), compiled(**inputs)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)


@torch.no_grad()
def test_accelerate_blocks_on_sana_matches_stock():
    model = tiny_sana()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=g)
    embeds, _ = text(2, 6)
    mask = torch.ones(2, 6)
    mask[1, 3:] = 0
    kwargs = dict(encoder_hidden_states=embeds, encoder_attention_mask=mask,
                  timestep=torch.tensor([500.0, 20.0]), return_dict=False)  # fmt: skip
    want = model(x, **kwargs)[0]
    accelerate(model, blocks=True)
    assert fused_blocks.is_installed(model)
    assert sum("forward" in m.__dict__ for m in model.transformer_blocks) == 2
    got = model(x, **kwargs)[0]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.cuda
@pytest.mark.parametrize("fp8", [False, True], ids=["bf16", "fp8"])
@pytest.mark.parametrize("index", [0, 1], ids=["double", "single"])
@pytest.mark.parametrize("batch", [1, 2])
def test_cuda_fused_blocks_match_stock(batch, index, fp8):
    # On a GPU every fused piece runs its kernel: the modulation ops, cuBLAS's bias + GELU
    # epilogue (bf16) or the FP8 scale epilogue (fp8), with dcgen attention around them.
    # Batch 1 also writes the joint q / k / v in place (batch 2 copies them in).
    _need("adaln_modulate")
    block = _blocks()[index].cuda().bfloat16()
    if fp8:
        quantize_(block, FP8Config())
    g = torch.Generator().manual_seed(7)
    angles = torch.rand(9 + 40, HEAD_DIM // 2, generator=g) * 6.28  # RoPE, as pipelines pass it
    rope = tuple(t.repeat_interleave(2, 1).cuda() for t in (angles.cos(), angles.sin()))
    inputs = dict(
        hidden_states=_rand(batch, 40, DIM, g=g, dtype=torch.bfloat16).cuda(),
        encoder_hidden_states=_rand(batch, 9, DIM, g=g, dtype=torch.bfloat16).cuda(),
        temb=_rand(batch, DIM, g=g, dtype=torch.bfloat16).cuda(),
        image_rotary_emb=rope,
    )
    direct = []
    real = torch._addmm_activation

    def spy(*a, **k):  # noqa: ANN002, ANN003, ANN202
        direct.append("out" in k)
        return real(*a, **k)

    with torch.inference_mode():
        want = block(**inputs)
        accelerate(block, blocks=True)
        torch._addmm_activation = spy
        try:
            got = block(**inputs)
        finally:
            torch._addmm_activation = real
        again = block(**inputs)  # the kept joint norm weights (and FP8 routes) reused
    for a, b, c in zip(got, want, again, strict=True):
        err = float((a.float() - b.float()).norm() / b.float().norm())
        assert err < 1e-2, err  # bf16 roundings in another order; a broken kernel is O(1)
        rerun = float((c.float() - a.float()).norm() / a.float().norm())
        assert rerun < 1e-3, rerun  # the same kernels again (bits unless cuBLAS varies)
    # bf16: every GELU is cuBLAS's epilogue on a contiguous output (the single block's plain
    # proj_out runs one GEMM per half: linear_of_parts); fp8: dcgen's scale epilogue
    assert direct == ([] if fp8 else [False] * (1 if index == 1 else 2))


@pytest.mark.cuda
@pytest.mark.parametrize("masked", [False, True], ids=["", "caption-mask"])
@pytest.mark.parametrize("fp8", [False, True], ids=["bf16", "fp8"])
def test_cuda_fused_sana_blocks_match_stock(fp8, masked):
    # FP8: the modulation hands its quantization to the first linears (adaln_modulate_fp8);
    # a caption mask with padding goes to the cross-attention.
    _need("adaln_modulate")
    model = tiny_sana().cuda().bfloat16()
    if fp8:
        quantize_(model, FP8Config())
    g = torch.Generator().manual_seed(8)
    x = torch.randn(2, 4, 8, 8, generator=g).to("cuda", torch.bfloat16)
    embeds, _ = text(2, 6)
    kwargs = dict(encoder_hidden_states=embeds.to("cuda", torch.bfloat16),
                  timestep=torch.tensor([500.0, 20.0], device="cuda"), return_dict=False)  # fmt: skip
    if masked:
        mask = torch.ones(2, 6, device="cuda")
        mask[1, 4:] = 0  # the second caption is 4 tokens long
        kwargs["encoder_attention_mask"] = mask
    with torch.inference_mode():
        want = model(x, **kwargs)[0]
        accelerate(model, blocks=True)
        got = model(x, **kwargs)[0]
    err = float((got.float() - want.float()).norm() / want.float().norm())
    assert err < 2e-2, err
