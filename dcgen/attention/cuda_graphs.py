"""CUDA graphs per DiT block: each block's kernels replayed from one captured graph.

A FLUX block in eager mode launches a few dozen kernels, each after a trip through Python and
the dispatcher; at 1K (about 1,500 tokens) and with FP8 linears (three ops per linear) that host
work takes as long as the GPU's, which then waits. A CUDA graph launches the whole block at once.

:func:`install` wraps the forward of every FLUX double / single and SANA block (whatever forward
it has at that moment: diffusers' own or dcgen's fused one) in a :class:`BlockGraphs`:

- per input signature (the nesting of the arguments, each tensor's shape, strides, dtype and
  device, every non-tensor value), the first call clones the inputs into static buffers, runs
  the block twice on the model's side stream (lazy initialisation, cuBLAS / cuDNN workspaces),
  captures one call into a graph on that stream, then copies the inputs in and replays it;
- every later call with that signature copies its tensors into the static buffers and replays.
  The return value is the graph's static output: valid until the same block runs again with
  the same signature, which is what a transformer's forward needs (each block's output feeds
  the next block or the output head before the block runs again); callers that keep a block's
  output across calls must clone it;
- graphs of one model share one memory pool (they run one after another, in capture order),
  so intermediate activations cost what one block needs, not one block's worth per block;
- at most :data:`MAX_SIGNATURES` signatures per block are kept (least recently used out): each
  holds a copy of the block's inputs and its outputs (about 57 MB per FLUX block at 4,608
  tokens in bf16).

Only CUDA inference calls are graphed: with autograd on, on the CPU, while torch.compile traces,
while another capture is running, or with a non-tensor argument that cannot be hashed, the
wrapped forward runs as it is. A graph replays what the block did when it was captured:

- parameters and buffers are read from their storage at capture time. A block whose tensors
  moved (``model.to``, offloading, a ``.data`` rebind) has its graphs dropped and captured again
  on the next call; a new Parameter object assigned to the module is not seen (call
  :func:`uninstall` / ``dcgen.unaccelerate`` after such surgery);
- settings read in Python during the forward (``DCGEN_*`` variables, the SDPA backend, hooks,
  LoRA scales) are frozen at capture: change them with the graphs uninstalled;
- a capture that fails (a host synchronisation inside the block, say) raises an error naming
  the block, and so does every later call with that signature.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable, Iterator
from itertools import chain
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_unflatten

logger = logging.getLogger(__name__)

#: block classes whose forward is graphed (diffusers names)
GRAPHED_BLOCKS = ("FluxTransformerBlock", "FluxSingleTransformerBlock", "SanaTransformerBlock")
_GRAPHS = "_dcgen_block_graphs"
WARMUP_CALLS = 2
MAX_SIGNATURES = 4


class _Unhashable(Exception):
    pass


def _signature(leaf: Any) -> Any:
    if isinstance(leaf, torch.Tensor):
        return ("T", tuple(leaf.shape), leaf.stride(), leaf.dtype, leaf.device)
    try:
        hash(leaf)
    except TypeError as err:
        raise _Unhashable from err  # its contents would be baked in unseen: not graphed
    return ("V", type(leaf), leaf)


class _Entry:
    """One captured signature: static input leaves, the graph (or stand-in), static output."""

    def __init__(self, static: list[Any], graph: Any, output: Any) -> None:
        self.static, self.graph, self.output = static, graph, output


class BlockGraphs:
    """Callable replacing one block's forward (module doc). ``inner`` is the forward it wraps,
    ``module`` the block (its parameters' storage is checked before each replay), ``pool`` and
    ``stream`` the memory pool and side stream shared by the model's graphs."""

    def __init__(
        self,
        inner: Callable[..., Any],
        module: nn.Module | None = None,
        pool: Any = None,
        stream: Any = None,
        name: str = "block",
    ) -> None:
        self.inner, self.pool, self.stream, self.name = inner, pool, stream, name
        self._tensors = list(chain(module.parameters(), module.buffers())) if module else []
        self._storage: list[int] = []
        self.entries: OrderedDict[Any, _Entry | Exception] = OrderedDict()
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

    def _storage_moved(self) -> bool:
        now = [t.data_ptr() for t in self._tensors]
        moved = now != self._storage
        self._storage = now
        return moved

    # -- capture and replay (CUDA; tests substitute a stand-in) ---------------------------------

    def capture(self, run: Callable[[], Any], device: torch.device) -> tuple[Any, Any]:
        """Warm ``run`` up on the side stream, capture one call on it; returns (graph,
        output)."""
        with torch.cuda.device(device):
            side = self.stream or torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(WARMUP_CALLS):
                    run()
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool, stream=side):
                output = run()
        return graph, output

    def replay(self, entry: _Entry) -> None:
        entry.graph.replay()

    # -- the call -------------------------------------------------------------------------------

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        leaves, spec = tree_flatten((args, kwargs))
        if not self.applies(leaves):
            return self.inner(*args, **kwargs)
        try:
            key = (spec, tuple(_signature(leaf) for leaf in leaves))
        except _Unhashable:
            return self.inner(*args, **kwargs)
        if self._storage_moved() and self.entries:
            logger.info("dcgen CUDA graphs: %s's tensors moved; capturing again", self.name)
            self.entries.clear()
        entry = self.entries.get(key)
        if isinstance(entry, Exception):
            raise entry
        if entry is None:
            entry = self._capture(key, leaves, spec)
        self.entries.move_to_end(key)
        # Also right after a capture: the warm-up calls ran on the static buffers and a block
        # may update its inputs in place (fused residual adds without autograd).
        for dst, src in zip(entry.static, leaves, strict=True):
            if isinstance(src, torch.Tensor) and dst is not src:
                dst.copy_(src)
        self.replay(entry)
        self.replays += 1
        return entry.output

    def _capture(self, key: Any, leaves: list[Any], spec: Any) -> _Entry:
        while len(self.entries) >= MAX_SIGNATURES:
            self.entries.popitem(last=False)  # least recently used
        # Normal tensors (static inputs, and the outputs the graph writes) even when the first
        # call runs under inference_mode: later calls under no_grad copy into them, and their
        # callers may update outputs in place, which inference tensors refuse outside it.
        with torch.inference_mode(False), torch.no_grad():
            static = [leaf.clone() if isinstance(leaf, torch.Tensor) else leaf for leaf in leaves]
            s_args, s_kwargs = tree_unflatten(static, spec)
            device = next(t.device for t in static if isinstance(t, torch.Tensor))
            try:
                graph, output = self.capture(lambda: self.inner(*s_args, **s_kwargs), device)
            except Exception as err:
                failure = RuntimeError(
                    f"dcgen CUDA graphs: capturing {self.name} failed ({type(err).__name__}: "
                    f"{err}); run without cuda_graphs to use it"
                )
                self.entries[key] = failure
                raise failure from err
        entry = self.entries[key] = _Entry(static, graph, output)
        self.captures += 1
        return entry


def _blocks(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    for name, module in model.named_modules():
        if type(module).__name__ in GRAPHED_BLOCKS:
            yield name, module


def install(model: nn.Module, graphs_cls: type[BlockGraphs] = BlockGraphs) -> int:
    """Wrap every graphable block's current forward (idempotent); returns how many blocks are
    graphed now. ``graphs_cls`` lets tests run the bookkeeping with a CPU stand-in."""
    pool = stream = None
    if torch.cuda.is_available():
        pool = torch.cuda.graph_pool_handle()
        device = next((p.device for p in model.parameters() if p.is_cuda), None)
        if device is not None:
            stream = torch.cuda.Stream(device)
    count = 0
    for name, module in _blocks(model):
        if _GRAPHS not in module.__dict__:
            previous = module.__dict__.get("forward")  # an instance forward (fused glue) or None
            graphs = graphs_cls(module.forward, module, pool, stream, name or type(module).__name__)
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
