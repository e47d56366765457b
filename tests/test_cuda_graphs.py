"""dcgen.attention.cuda_graphs: per-block CUDA graphs. The bookkeeping (signatures, static
buffers, install / undo, when graphs apply) runs on the CPU with a stand-in for the graph; the
real capture and replay are compared with the eager blocks on CUDA."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from torch.utils._pytree import tree_flatten

from dcgen.attention import accelerate, cuda_graphs, fused_blocks, is_accelerated, unaccelerate

from .adapters.tiny import tiny_flux, tiny_sana
from .conftest import HAS_CUDA
from .test_accelerate import flux_inputs


class StandInGraphs(cuda_graphs.BlockGraphs):
    """A CUDA graph's contract on the CPU: capture does not run the block's work for the caller
    (it returns output buffers), and replay recomputes from the static inputs into those same
    buffers. A wrapper that forgot to copy new inputs in, or returned fresh tensors instead of
    the static outputs, fails the comparisons below."""

    @staticmethod
    def applies(leaves):
        return not torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) for t in leaves)

    def capture(self, run, device=None):
        for _ in range(cuda_graphs.WARMUP_CALLS):  # the real capture warms up on the buffers
            run()
        output = run()
        for t in tree_flatten(output)[0]:
            if isinstance(t, torch.Tensor):
                t.fill_(float("nan"))  # a captured graph has not produced anything yet
        return run, output

    def replay(self, entry):
        fresh = tree_flatten(entry.graph())[0]
        for dst, src in zip(tree_flatten(entry.output)[0], fresh, strict=True):
            dst.copy_(src)


def _blocks(model):
    return list(model.transformer_blocks) + list(model.single_transformer_blocks)


@torch.no_grad()
@pytest.mark.parametrize("fused", [False, True])
def test_graphed_blocks_match_eager_and_recapture_per_shape(fused):
    model = tiny_flux(layers=2)
    accelerate(model, blocks=fused)
    a, b = flux_inputs(seed=0), flux_inputs(seed=1)
    other_shape = flux_inputs(h=3, w=3, seed=2)
    want = [model(**kw)[0].clone() for kw in (a, b, other_shape)]
    assert cuda_graphs.install(model, graphs_cls=StandInGraphs) == 4
    graphs = cuda_graphs.graphs_of(model)
    assert len(graphs) == 4 and is_accelerated(model)
    for _ in range(2):  # the second round replays the graphs captured by the first
        got = [model(**kw)[0].clone() for kw in (a, b, other_shape)]
        for g, w in zip(got, want, strict=True):
            torch.testing.assert_close(g, w, atol=0, rtol=0)
    assert [g.captures for g in graphs] == [2] * 4  # one per input shape
    assert [g.replays for g in graphs] == [6] * 4
    assert cuda_graphs.install(model, graphs_cls=StandInGraphs) == 4  # idempotent
    assert cuda_graphs.graphs_of(model) == graphs


@torch.no_grad()
def test_uninstall_restores_the_forward_underneath():
    model = tiny_flux(layers=1)
    accelerate(model, blocks=True)
    fused = [b.__dict__["forward"] for b in _blocks(model)]
    cuda_graphs.install(model, graphs_cls=StandInGraphs)
    assert all(isinstance(b.forward, StandInGraphs) for b in _blocks(model))
    assert cuda_graphs.uninstall(model) == 2
    assert [b.__dict__["forward"] for b in _blocks(model)] == fused  # fused glue still on
    plain = tiny_flux(layers=1)
    cuda_graphs.install(plain, graphs_cls=StandInGraphs)
    cuda_graphs.uninstall(plain)
    assert all("forward" not in b.__dict__ for b in _blocks(plain))  # the class forward again


@torch.no_grad()
def test_accelerate_drops_graphs_before_changing_what_they_replay():
    model = tiny_flux(layers=1)
    accelerate(model, cuda_graphs=True)
    assert len(cuda_graphs.graphs_of(model)) == 2 and not fused_blocks.is_installed(model)
    accelerate(model, cuda_graphs=True)  # nothing changes: the same graphs stay
    kept = cuda_graphs.graphs_of(model)
    accelerate(model, cuda_graphs=True)
    assert cuda_graphs.graphs_of(model) == kept
    # fusing the glue changes the blocks' forwards: the graphs go, new ones wrap the fused forward
    accelerate(model, blocks=True, cuda_graphs=True)
    now = cuda_graphs.graphs_of(model)
    assert len(now) == 2 and all(g not in kept for g in now)
    assert all(g.inner.fn in fused_blocks._FORWARDS.values() for g in now)
    unaccelerate(model)
    assert not cuda_graphs.graphs_of(model) and not is_accelerated(model)
    assert all("forward" not in b.__dict__ for b in _blocks(model))


def test_graphs_stay_out_of_cpu_autograd_and_sana():
    # on the CPU (and with autograd on anywhere) the real wrapper runs the block as it is
    model = tiny_flux(layers=1)
    kw = flux_inputs()
    with torch.no_grad():
        want = model(**kw)[0]
    accelerate(model, cuda_graphs=True)
    with torch.no_grad():
        torch.testing.assert_close(model(**kw)[0], want, atol=0, rtol=0)
    out = model(**kw)[0]
    assert out.requires_grad or not any(p.requires_grad for p in model.parameters())
    assert all(g.captures == 0 and g.replays == 0 for g in cuda_graphs.graphs_of(model))
    sana = tiny_sana()
    assert cuda_graphs.install(sana, graphs_cls=StandInGraphs) == len(sana.transformer_blocks)
    cuda_graphs.uninstall(sana)


class FluxTransformerBlock(torch.nn.Module):  # named like diffusers' block: it gets graphed
    """Updates its input in place, as dcgen's fused residual adds do without autograd."""

    def forward(self, x: torch.Tensor, scale: float) -> torch.Tensor:
        x.add_(1.0)
        return x * scale


@torch.no_grad()
def test_blocks_that_update_their_inputs_in_place():
    # the warm-up calls before a capture run on the static buffers: the first replay must not
    # see what they did to them
    block = torch.nn.Sequential(FluxTransformerBlock())
    x = torch.arange(6.0).reshape(2, 3)
    want = [block[0](x.clone(), 2.0), block[0](x.clone() + 5, 2.0), block[0](x.clone(), 3.0)]
    assert cuda_graphs.install(block, graphs_cls=StandInGraphs) == 1
    # (clones: a graph's output buffer is reused by its next replay, module doc)
    got = [block[0](x.clone(), s).clone() for x, s in ((x, 2.0), (x + 5, 2.0), (x, 3.0))]
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, atol=0, rtol=0)
    assert cuda_graphs.graphs_of(block)[0].captures == 2  # the scale is baked into each graph


def test_signature_separates_what_a_graph_bakes_in():
    sig = cuda_graphs._signature
    x = torch.zeros(2, 3)
    assert sig(x) == sig(torch.ones(2, 3))  # values are copied in, not baked
    assert sig(x) != sig(x.t()) and sig(x) != sig(x.half()) and sig(x) != sig(torch.zeros(3, 2))
    assert sig(4) != sig(5) and sig(None) == sig(None) and sig(1.0) != sig(2.0)
    with pytest.raises(cuda_graphs._Unhashable):
        sig({1, 2})  # a set is a leaf to pytree, and unhashable: its call runs eagerly


class SanaTransformerBlock(torch.nn.Module):  # named like diffusers' block: it gets graphed
    def __init__(self) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(3, 3)

    def forward(self, x: torch.Tensor, extra: object = None) -> torch.Tensor:
        return self.proj(x)


def _graphed(block: torch.nn.Module) -> cuda_graphs.BlockGraphs:
    holder = torch.nn.Sequential(block)
    assert cuda_graphs.install(holder, graphs_cls=StandInGraphs) == 1
    return cuda_graphs.graphs_of(holder)[0]


@torch.no_grad()
def test_signature_cache_is_bounded_and_unhashable_calls_run_eagerly():
    block = SanaTransformerBlock()
    graphs = _graphed(block)
    shapes = [(n, 3) for n in range(1, cuda_graphs.MAX_SIGNATURES + 2)]
    for shape in shapes:
        block(torch.ones(shape))
    assert graphs.captures == len(shapes) and len(graphs.entries) == cuda_graphs.MAX_SIGNATURES
    block(torch.ones(shapes[-1]))  # still cached
    block(torch.ones(shapes[0]))  # the least recently used went out: captured again
    assert graphs.captures == len(shapes) + 1
    replays = graphs.replays
    want = block.proj(torch.ones(2, 3))
    torch.testing.assert_close(block(torch.ones(2, 3), {1}), want)
    assert graphs.replays == replays  # the set argument: eager


def test_inference_mode_capture_then_no_grad_calls():
    # pipelines run under no_grad; a first call under inference_mode must not leave inference
    # tensors as the static buffers (copying into them outside inference_mode raises)
    block = SanaTransformerBlock()
    graphs = _graphed(block)
    x = torch.randn(2, 3)
    with torch.inference_mode():
        block(x)
    with torch.no_grad():
        got = block(x + 1).clone()
        torch.testing.assert_close(got, block.proj(x + 1))
    assert graphs.captures == 1 and graphs.replays == 2


def _captured_once() -> tuple[torch.nn.Module, cuda_graphs.BlockGraphs, torch.Tensor]:
    """A graphed block called twice with one input: one capture, then a replay."""
    block = SanaTransformerBlock()
    graphs = _graphed(block)
    x = torch.randn(2, 3)
    block(x)
    block(x)
    assert graphs.captures == 1
    return block, graphs, x


@torch.no_grad()
def test_moved_parameters_are_captured_again():
    block, graphs, x = _captured_once()
    block.proj.weight.data = block.proj.weight.data.clone()  # new storage, as .to() / offload do
    torch.testing.assert_close(block(x).clone(), block.proj(x))
    assert graphs.captures == 2


@torch.no_grad()
def test_swapped_layers_are_released_and_captured_again():
    # quantize_ after install swaps the block's linears: the graphs (which watch their tensors
    # weakly) must not keep the old weights alive, and the next call captures the new layers.
    import gc
    import weakref

    from dcgen.quant import FP8Config, quantize_

    model = tiny_flux(layers=1)
    kw = flux_inputs()
    cuda_graphs.install(model, graphs_cls=StandInGraphs)
    model(**kw)
    old = weakref.ref(model.transformer_blocks[0].attn.to_q.weight)
    quantize_(model, FP8Config())
    gc.collect()
    assert old() is None, "a graph kept a replaced layer's weight alive"
    got = model(**kw)[0].clone()
    graphs = cuda_graphs.graphs_of(model)
    assert all(g.captures == 2 for g in graphs)
    cuda_graphs.uninstall(model)
    torch.testing.assert_close(got, model(**kw)[0], atol=0, rtol=0)


@torch.no_grad()
def test_in_place_weight_updates_are_captured_again():
    # load_state_dict copies into the same storage: the graph would read the new weights, but
    # tensors derived from them in Python (stacked norm weights, scale layouts) would be stale
    block, graphs, x = _captured_once()
    state = {k: v * 2 for k, v in block.state_dict().items()}
    block.load_state_dict(state)
    torch.testing.assert_close(block(x).clone(), block.proj(x))
    assert graphs.captures == 2
    block(x)
    assert graphs.captures == 2  # nothing changed since: replayed


@torch.no_grad()
def test_what_runs_eagerly_and_what_is_part_of_the_signature(monkeypatch):
    block = SanaTransformerBlock()
    graphs = _graphed(block)
    x = torch.randn(2, 3)
    want = block.proj(x)
    # an object argument could carry tensors a graph would bake in: eager
    torch.testing.assert_close(block(x, object()), want)
    assert graphs.captures == 0
    # a block with an offloading hook (its weights move per call): eager
    block._hf_hook = object()
    torch.testing.assert_close(block(x), want)
    assert graphs.captures == 0
    del block._hf_hook
    # plain values and autocast's state are part of the signature
    block(x, 3)
    block(x, "a")
    assert graphs.captures == 2
    monkeypatch.setattr(torch, "is_autocast_enabled", lambda device_type=None: True)
    block(x, 3)
    assert graphs.captures == 3


def test_install_shares_one_stream_table():
    # one side stream per device for all the blocks of an install (made at the first capture):
    # graphs on different streams would not share their memory pool
    model = tiny_flux(layers=2)
    cuda_graphs.install(model, graphs_cls=StandInGraphs)
    graphs = cuda_graphs.graphs_of(model)
    assert len(graphs) == 4 and all(g.streams is graphs[0].streams for g in graphs)


@pytest.mark.parametrize("how", ["torch.save", "deepcopy"])
def test_a_loaded_model_keeps_one_group_for_its_blocks(how):
    # torch.save of an accelerated model used to give each loaded block a pool and stream
    # table of its own (activations paid once per block instead of once per model)
    model = tiny_flux(layers=2)
    cuda_graphs.install(model, graphs_cls=StandInGraphs)
    model.eval()
    with torch.no_grad():
        want = model(**flux_inputs(seed=0))[0]
    cuda_graphs.graphs_of(model)[0].streams["marker"] = object()  # device state: not carried
    if how == "torch.save":
        buf = io.BytesIO()
        torch.save(model, buf)
        buf.seek(0)
        loaded = torch.load(buf, weights_only=False)
    else:
        loaded = copy.deepcopy(model)
    graphs = cuda_graphs.graphs_of(loaded)
    assert len(graphs) == 4 and all(type(g) is StandInGraphs for g in graphs)
    assert all(g.group is graphs[0].group for g in graphs)
    assert all(g.streams is graphs[0].streams for g in graphs)
    assert graphs[0].group is not cuda_graphs.graphs_of(model)[0].group
    assert graphs[0].streams == {} and all(g.captures == 0 for g in graphs)
    with torch.no_grad():
        got = loaded(**flux_inputs(seed=0))[0]
    assert all(g.captures == 1 for g in graphs)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


@torch.no_grad()
def test_a_failed_capture_names_the_first_cause():
    # torch.cuda.graph reports "operation failed due to a previous error during capture"; the
    # message must carry the error that caused it
    class Failing(StandInGraphs):
        def capture(self, run, device=None):
            try:
                raise ValueError("cudaStreamSynchronize during capture")
            except ValueError:
                raise RuntimeError("previous error during capture") from None

    holder = torch.nn.Sequential(SanaTransformerBlock())
    cuda_graphs.install(holder, graphs_cls=Failing)
    with pytest.raises(RuntimeError, match=r"ValueError: cudaStreamSynchronize during capture"):
        holder[0](torch.ones(2, 3))


@torch.no_grad()
def test_a_failed_capture_names_the_block_and_is_not_retried():
    attempts = []

    class Failing(StandInGraphs):
        def capture(self, run, device=None):
            attempts.append(1)
            raise RuntimeError("operation not permitted when stream is capturing")

    holder = torch.nn.Sequential(SanaTransformerBlock())
    cuda_graphs.install(holder, graphs_cls=Failing)
    for _ in range(2):
        with pytest.raises(RuntimeError, match=r"capturing 0 failed .*not permitted"):
            holder[0](torch.ones(2, 3))
    assert attempts == [1]


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
@pytest.mark.parametrize("fused", [False, True])
def test_cuda_graphed_flux_matches_eager(fused):
    from .conftest import poison_cuda_allocator

    model = tiny_flux(layers=2).cuda().to(torch.bfloat16)
    accelerate(model, blocks=fused)
    inputs = []
    # 5 x 4 has 4 x 5's signature (20 tokens) but other RoPE tables: copied in, not baked
    cases = (flux_inputs(seed=0), flux_inputs(seed=1), flux_inputs(h=3, w=3, seed=2),
             flux_inputs(h=5, w=4, seed=3))  # fmt: skip
    for kw in cases:
        kw = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in kw.items()}
        for k in ("hidden_states", "encoder_hidden_states", "pooled_projections"):
            kw[k] = kw[k].to(torch.bfloat16)
        inputs.append(kw)
    with torch.inference_mode():
        want = [model(**kw)[0].clone() for kw in inputs]
    accelerate(model, blocks=fused, cuda_graphs=True)
    # eager allocations start as NaN (a graph's pool is fresh device memory, not poisoned: the
    # comparisons with the eager outputs catch what a replay leaves unwritten there)
    poison_cuda_allocator()
    # captured under inference_mode (as the bench runs), replayed under no_grad (as pipelines
    # run); two shapes share the model's memory pool
    for mode in (torch.inference_mode, torch.no_grad, torch.inference_mode):
        with mode():
            got = [model(**kw)[0].clone() for kw in inputs]
        for g, w in zip(got, want, strict=True):
            torch.testing.assert_close(g, w, atol=2e-2, rtol=2e-2)
    graphs = cuda_graphs.graphs_of(model)
    assert [g.captures for g in graphs] == [2] * 4  # two shapes
    assert [g.replays for g in graphs] == [12] * 4
    unaccelerate(model)


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
def test_cuda_graphed_fp8_flux_matches_eager():
    # FP8 linears keep state decided in Python (route, shared quantizations, the unit scale):
    # replays with new inputs must equal the eager FP8 model's outputs on the same inputs.
    from dcgen.quant import FP8Config, quantize_

    model = tiny_flux(layers=2).cuda().to(torch.bfloat16)
    quantize_(model, FP8Config())
    accelerate(model, blocks=True)
    cases = []
    for kw in (flux_inputs(seed=0), flux_inputs(seed=1), flux_inputs(h=5, w=4, seed=2)):
        kw = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in kw.items()}
        for k in ("hidden_states", "encoder_hidden_states", "pooled_projections"):
            kw[k] = kw[k].to(torch.bfloat16)
        cases.append(kw)
    with torch.inference_mode():
        want = [model(**kw)[0].clone() for kw in cases]
        accelerate(model, blocks=True, cuda_graphs=True)
        for _ in range(2):
            got = [model(**kw)[0].clone() for kw in cases]
            for g, w in zip(got, want, strict=True):  # (cuBLAS may pick other algorithms
                torch.testing.assert_close(g, w, atol=2e-2, rtol=2e-2)  # inside a capture)
    assert all(g.captures == 1 for g in cuda_graphs.graphs_of(model))
    unaccelerate(model)
