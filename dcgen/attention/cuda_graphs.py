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
while another capture is running, with a non-tensor argument other than None / bool / int /
float / str / dtype / device (anything else could hold tensors a graph would bake in unseen),
or for a block whose own tensors are not all on CUDA or that carries an offloading hook
(accelerate / diffusers), the wrapped forward runs as it is. Autocast's state is part of the
signature. A graph replays what the block did when it was captured:

- parameters and buffers are read from their storage at capture time. The block's tensors are
  recorded at each capture (weakly: a graph never keeps a replaced layer alive) and checked
  before each replay: a tensor that is gone (its layer swapped, by ``quantize_`` say), moved
  (``model.to``, offloading, a ``.data`` rebind) or updated in place (``load_state_dict``; the
  version counter, so tensors derived from it in Python are rebuilt) drops the block's graphs,
  and the next call captures again. A new layer that replaced one still referenced elsewhere is
  not seen (call :func:`uninstall` / ``dcgen.unaccelerate`` after such surgery);
- settings read in Python during the forward (``DCGEN_*`` variables, the SDPA backend, hooks,
  LoRA scales) are frozen at capture: change them with the graphs uninstalled;
- the graphs of one :func:`install` share one side stream per device (captures and their
  warm-up run there), so they share one memory pool;
- a capture that fails (a host synchronisation inside the block, say) raises an error naming
  the block and the cause, leaves the caller's stream current, and every later call with that
  signature raises it again.
"""

from __future__ import annotations

import logging
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterator
from itertools import chain
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_unflatten

from dcgen._hooks import WeakForward, offload_hooked

logger = logging.getLogger(__name__)

#: block classes whose forward is graphed (diffusers names)
GRAPHED_BLOCKS = ("FluxTransformerBlock", "FluxSingleTransformerBlock", "SanaTransformerBlock")
_GRAPHS = "_dcgen_block_graphs"
WARMUP_CALLS = 2
MAX_SIGNATURES = 4


#: non-tensor arguments a graph may bake in: plain values that hold no tensor
_PLAIN_VALUES = (type(None), bool, int, float, str, torch.dtype, torch.device)


class _Unhashable(Exception):
    """A leaf a graph cannot take: its call runs eagerly."""


def _signature(leaf: Any) -> Any:
    if isinstance(leaf, torch.Tensor):
        return ("T", tuple(leaf.shape), leaf.stride(), leaf.dtype, leaf.device)
    if type(leaf) not in _PLAIN_VALUES:
        raise _Unhashable  # an object could carry tensors a graph would bake in unseen
    return ("V", type(leaf), leaf)


def _autocast_state() -> Any:
    """Autocast on CUDA changes what a block computes: part of every signature."""
    if torch.is_autocast_enabled("cuda"):
        return ("autocast", torch.get_autocast_dtype("cuda"))
    return None


def _stamp(t: torch.Tensor) -> tuple[int, int | None]:
    """Where a tensor lives and its in-place version (None for an inference tensor, which has
    no version counter)."""
    return t.data_ptr(), None if t.is_inference() else t._version


class _Entry:
    """One captured signature: static input leaves, the graph (or stand-in), static output."""

    def __init__(self, static: list[Any], graph: Any, output: Any) -> None:
        self.static, self.graph, self.output = static, graph, output


class GraphGroup:
    """What the graphs of one :func:`install` share: one memory pool (made at the first
    capture) and one side stream per device.

    It is device state, so it pickles empty; pickle's memo (one ``torch.save`` of a model, or a
    ``copy.deepcopy``) keeps it shared: the loaded model's blocks get one new group between
    them, and their graphs one pool again instead of one pool per block."""

    def __init__(self) -> None:
        self._pool: Any = None
        self.streams: dict[torch.device, Any] = {}

    @property
    def pool(self) -> Any:
        if self._pool is None and torch.cuda.is_available():
            self._pool = torch.cuda.graph_pool_handle()
        return self._pool

    def __getstate__(self) -> dict[str, Any]:
        return {}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__()  # type: ignore[misc]


class BlockGraphs:
    """Callable replacing one block's forward (module doc). ``inner`` is the forward it wraps,
    ``module`` the block (its tensors, recorded at each capture, are checked before each
    replay), ``group`` the memory pool and side streams shared by the model's graphs (a group
    of its own when None)."""

    def __init__(
        self,
        inner: Callable[..., Any],
        module: nn.Module | None = None,
        group: GraphGroup | None = None,
        name: str = "block",
    ) -> None:
        self.inner, self.name = inner, name
        self.group = GraphGroup() if group is None else group
        self._module = weakref.ref(module) if module is not None else None
        # (weak reference, stamp) of each block tensor at the last capture
        self._watched: list[tuple[weakref.ref, tuple[int, int | None]]] = []
        self.entries: OrderedDict[Any, _Entry | Exception] = OrderedDict()
        self.captures = 0  # how many signatures were captured (tests, diagnostics)
        self.replays = 0

    # -- pickling (torch.save of a whole model) ------------------------------------------------

    def __getstate__(self) -> dict[str, Any]:
        # The wrapped forward, the block, the group and the label; captured graphs and stamps
        # are device state (a weak reference does not pickle at all). A loaded model captures
        # afresh, its blocks sharing one new group (GraphGroup pickles empty, once per save).
        module = self._module() if self._module is not None else None
        return {"inner": self.inner, "module": module, "group": self.group, "name": self.name}

    def __setstate__(self, state: dict[str, Any]) -> None:
        group = state.get("group")  # absent in a model pickled before groups existed
        self.__init__(state["inner"], state["module"], group, state["name"])  # type: ignore[misc]

    @property
    def streams(self) -> dict[torch.device, Any]:
        """The side stream per device, shared by the group's graphs."""
        return self.group.streams

    @property
    def pool(self) -> Any:
        """The group's memory pool handle (None without CUDA)."""
        return self.group.pool

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

    def _block_tensors(self) -> list[torch.Tensor]:
        module = self._module() if self._module is not None else None
        if module is None:
            return []
        return list(chain(module.parameters(), module.buffers()))

    def _graphable_block(self, device: torch.device) -> bool:
        """The block's own tensors all on the inputs' (CUDA) device and no offloading hook on
        it or its children."""
        module = self._module() if self._module is not None else None
        if module is None:
            return True
        if any(offload_hooked(m) for m in module.modules()):  # they move weights per call
            return False
        return all(t.device == device for t in self._block_tensors())

    def _tensors_changed(self) -> bool:
        """Whether a tensor recorded at the last capture is gone, moved or updated in place
        (host time per call: about 0.3 us per tensor on this project's CPU)."""
        for ref, (ptr, version) in self._watched:
            t = ref()
            if t is None or t.data_ptr() != ptr or (version is not None and t._version != version):
                return True
        return False

    def _watch(self) -> None:
        self._watched = [(weakref.ref(t), _stamp(t)) for t in self._block_tensors()]

    # -- capture and replay (CUDA; tests substitute a stand-in) ---------------------------------

    def capture(self, run: Callable[[], Any], device: torch.device) -> tuple[Any, Any]:
        """Warm ``run`` up on the device's side stream, capture one call on it; returns
        (graph, output)."""
        with torch.cuda.device(device):
            if device not in self.streams:  # one per device, shared by the install's blocks
                self.streams[device] = torch.cuda.Stream(device)
            side = self.streams[device]
            caller = torch.cuda.current_stream()
            # torch.cuda.graph does not restore the caller's stream when the capture raises:
            # this outer context does
            with torch.cuda.stream(caller):
                side.wait_stream(caller)
                with torch.cuda.stream(side):
                    for _ in range(WARMUP_CALLS):
                        run()
                caller.wait_stream(side)
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
            key = (spec, tuple(_signature(leaf) for leaf in leaves), _autocast_state())
        except _Unhashable:
            return self.inner(*args, **kwargs)
        if self.entries and self._tensors_changed():
            logger.info("dcgen CUDA graphs: %s's tensors changed; capturing again", self.name)
            self.entries.clear()
        entry = self.entries.get(key)
        if isinstance(entry, Exception):
            raise entry
        if entry is None:
            device = next(t.device for t in leaves if isinstance(t, torch.Tensor))
            if not self._graphable_block(device):  # offloaded or elsewhere: eager
                return self.inner(*args, **kwargs)
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
                # torch.cuda.graph's own error ("operation failed due to a previous error
                # during capture") hides the block's: name the first cause
                cause = err.__context__ or err
                failure = RuntimeError(
                    f"dcgen CUDA graphs: capturing {self.name} failed ({type(cause).__name__}: "
                    f"{cause}); run without cuda_graphs to use it"
                )
                self.entries[key] = failure
                raise failure from err
        entry = self.entries[key] = _Entry(static, graph, output)
        self.captures += 1
        # the tensors this block's graphs read, as they are after the capture (a block that
        # updates a buffer in place does so on every replay too, unseen by the version counter)
        self._watch()
        return entry


def _blocks(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    for name, module in model.named_modules():
        if type(module).__name__ in GRAPHED_BLOCKS:
            yield name, module


def install(model: nn.Module, graphs_cls: type[BlockGraphs] = BlockGraphs) -> int:
    """Wrap every graphable block's current forward (idempotent); returns how many blocks are
    graphed now. ``graphs_cls`` lets tests run the bookkeeping with a CPU stand-in."""
    group = GraphGroup()  # one pool and side stream per device for this install's blocks
    count = 0
    for name, module in _blocks(model):
        if _GRAPHS not in module.__dict__:
            previous = module.__dict__.get("forward")  # an instance forward (fused glue) or None
            label = name or type(module).__name__
            # the class forward through a weak reference: the bound method, kept on the block,
            # would make the block hold itself (del model then freed no weight)
            inner = WeakForward(type(module).forward, module) if previous is None else previous
            graphs = graphs_cls(inner, module, group, label)
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
