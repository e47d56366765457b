"""CUDA graphs per DiT block: each block's kernels replayed from one captured graph.

A FLUX block in eager mode launches a few dozen kernels, each after a trip through Python and
the dispatcher; at 1K (about 1,500 tokens) and with FP8 linears (three ops per linear) that host
work takes as long as the GPU's, which then waits. A CUDA graph launches the whole block at once.

:func:`install` wraps the forward of every FLUX double / single and SANA block (whatever forward
it has at that moment: diffusers' own or dcgen's fused one) in a :class:`BlockGraphs`:

- per input signature (the nesting of the arguments, each tensor's shape, strides, dtype and
  device, every non-tensor value), the first call clones the inputs into static buffers, runs
  the block twice on a side stream (lazy initialisation, cuBLAS / cuDNN workspaces), captures
  one call into a graph, then replays it;
- every later call with that signature copies its tensors into the static buffers and replays.
  The return value is the graph's static output: valid until the same block runs again with
  the same signature, which is what a transformer's forward needs (each block's output feeds
  the next block or the output head before the block runs again); callers that keep a block's
  output across calls must clone it;
- graphs of one model share one memory pool (they run one after another, in capture order),
  so intermediate activations cost what one block needs, not one block's worth per block.

Only CUDA inference calls are graphed: with autograd on, on the CPU, while torch.compile traces
or while another capture is running, the wrapped forward runs as it is. What a graph does not
see: new parameter tensors (assigning a new ``weight``; in-place updates such as
``load_state_dict`` are seen), Python-side branches on tensor values (none in these blocks), and
host synchronisations inside the block (which fail the capture: the error names the block).
:func:`uninstall` (and ``dcgen.unaccelerate``) drops every graph.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_unflatten

#: block classes whose forward is graphed (diffusers names)
GRAPHED_BLOCKS = ("FluxTransformerBlock", "FluxSingleTransformerBlock", "SanaTransformerBlock")
_GRAPHS = "_dcgen_block_graphs"
WARMUP_CALLS = 2


def _signature(leaf: Any) -> Any:
    if isinstance(leaf, torch.Tensor):
        return ("T", tuple(leaf.shape), leaf.stride(), leaf.dtype, leaf.device)
    try:
        hash(leaf)
    except TypeError:
        return ("id", id(leaf))  # unhashable non-tensor: baked into the graph, keyed by identity
    return ("V", type(leaf), leaf)


class _Entry:
    """One captured signature: static input leaves, the graph (or stand-in), static output."""

    def __init__(self, static: list[Any], graph: Any, output: Any) -> None:
        self.static, self.graph, self.output = static, graph, output


class BlockGraphs:
    """Callable replacing one block's forward (module doc). ``inner`` is the forward it wraps;
    ``pool`` the memory pool shared by the model's graphs."""

    def __init__(self, inner: Callable[..., Any], pool: Any, name: str = "block") -> None:
        self.inner, self.pool, self.name = inner, pool, name
        self.entries: dict[Any, _Entry] = {}
        self.captures = 0  # how many signatures were captured (tests, diagnostics)
        self.replays = 0

    # -- when to graph --------------------------------------------------------------------------

    @staticmethod
    def applies(leaves: list[Any]) -> bool:
        tensors = [t for t in leaves if isinstance(t, torch.Tensor)]
        return (
            bool(tensors)
            and all(t.device.type == "cuda" for t in tensors)
            and not torch.is_grad_enabled()
            and not torch.compiler.is_compiling()
            and not torch.cuda.is_current_stream_capturing()
        )

    # -- capture and replay (CUDA; tests substitute a stand-in) ---------------------------------

    def capture(self, run: Callable[[], Any]) -> tuple[Any, Any]:
        """Warm ``run`` up on a side stream, capture one call; returns (graph, output)."""
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(WARMUP_CALLS):
                run()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            output = run()
        return graph, output

    def replay(self, entry: _Entry) -> None:
        entry.graph.replay()

    # -- the call -------------------------------------------------------------------------------

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        leaves, spec = tree_flatten((args, kwargs))
        if not self.applies(leaves):
            return self.inner(*args, **kwargs)
        key = (spec, tuple(_signature(leaf) for leaf in leaves))
        entry = self.entries.get(key)
        if entry is None:
            static = [leaf.clone() if isinstance(leaf, torch.Tensor) else leaf for leaf in leaves]
            s_args, s_kwargs = tree_unflatten(static, spec)
            try:
                graph, output = self.capture(lambda: self.inner(*s_args, **s_kwargs))
            except Exception as err:
                raise RuntimeError(
                    f"dcgen CUDA graphs: capturing {self.name} failed ({type(err).__name__}: "
                    f"{err}); run without cuda_graphs to use it"
                ) from err
            entry = self.entries[key] = _Entry(static, graph, output)
            self.captures += 1
        # Also right after a capture: the warm-up calls ran on the static buffers and a block
        # may update its inputs in place (fused residual adds without autograd).
        for dst, src in zip(entry.static, leaves, strict=True):
            if isinstance(src, torch.Tensor) and dst is not src:
                dst.copy_(src)
        self.replay(entry)
        self.replays += 1
        return entry.output


def _blocks(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    for name, module in model.named_modules():
        if type(module).__name__ in GRAPHED_BLOCKS:
            yield name, module


def install(model: nn.Module, graphs_cls: type[BlockGraphs] = BlockGraphs) -> int:
    """Wrap every graphable block's current forward (idempotent); returns how many blocks are
    graphed now. ``graphs_cls`` lets tests run the bookkeeping with a CPU stand-in."""
    pool = torch.cuda.graph_pool_handle() if torch.cuda.is_available() else None
    count = 0
    for name, module in _blocks(model):
        if _GRAPHS not in module.__dict__:
            previous = module.__dict__.get("forward")  # an instance forward (fused glue) or None
            graphs = graphs_cls(module.forward, pool, name or type(module).__name__)
            module.__dict__[_GRAPHS] = (graphs, previous)
            module.forward = graphs
        count += 1
    return count


def uninstall(model: nn.Module) -> int:
    """Restore the forwards :func:`install` wrapped and drop their graphs; returns how many."""
    count = 0
    for _, module in _blocks(model):
        state = module.__dict__.pop(_GRAPHS, None)
        if state is None:
            continue
        _, previous = state
        if previous is None:
            del module.forward  # the class forward shows again
        else:
            module.forward = previous
        count += 1
    return count


def graphs_of(model: nn.Module) -> list[BlockGraphs]:
    """The installed :class:`BlockGraphs` of ``model``'s blocks, in module order."""
    return [m.__dict__[_GRAPHS][0] for _, m in _blocks(model) if _GRAPHS in m.__dict__]
