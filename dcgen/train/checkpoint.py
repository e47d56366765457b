"""Training checkpoints that resume exactly, written so a crash never leaves a broken one.

Layout of ``directory``::

    step-00000100/
        model.safetensors    every module's state dict, keys "{module_name}/{param_name}"
        optimizer.pt         optimizer.state_dict()       (torch.save, loaded weights_only)
        scheduler.pt         scheduler.state_dict()       (only when a scheduler was given)
        rng.pt               python / numpy / torch CPU / CUDA generator states
        state.json           step, data_position, extra, versions; written last
    step-00000200/
    .tmp-step-00000300-xxxx/ a save in progress (or killed); never read, removed by the next save

A save writes everything into a hidden temp directory, fsyncs each file and the directory, then
renames it to ``step-XXXXXXXX`` (one atomic rename) and fsyncs the parent, so a checkpoint is
either fully there or not visible at all. Only then are checkpoints beyond ``keep_last``
deleted, oldest first. ``model.safetensors`` is plain safetensors, so trained adapters can be
read without dcgen.

Exact resume needs four things restored: weights, optimizer + scheduler state, every RNG the
step consumes, and the data order. The data order comes from ``BucketBatchSampler`` (seeded per
epoch, resumed by batch count), so the checkpoint stores the (epoch, position) pair in
``data_position``. Give the DataLoader its own ``generator`` too: otherwise creating its iterator
draws from the global torch RNG at a different moment in a resumed run.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import random
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ParamSpec, Protocol, TypeVar

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .._files import fsync_path, naming_write_errors, public_mode, safetensors_ready, swap_in

logger = logging.getLogger(__name__)

__all__ = [
    "Checkpoint",
    "CheckpointError",
    "Checkpointer",
    "RunState",
    "capture_rng_state",
    "checkpoint_step",
    "keeps_rng_state",
    "latest_checkpoint",
    "list_checkpoints",
    "load_checkpoint",
    "load_latest_checkpoint",
    "restore_rng_state",
    "save_checkpoint",
]

CHECKPOINT_FORMAT = "dcgen.train_checkpoint"
CHECKPOINT_VERSION = 1
_STEP_DIR = re.compile(r"^step-(\d{8,})$")
_SEP = "/"  # module/param separator; "." appears inside parameter names


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit; the message names the path."""


class Stateful(Protocol):
    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state_dict: dict[str, Any]) -> Any: ...


ModelState = (
    Mapping[str, torch.nn.Module | Mapping[str, torch.Tensor]]
    | Callable[[], Mapping[str, Mapping[str, torch.Tensor]]]
)


# ----------------------------------------------------------------------------------- RNG state


def capture_rng_state() -> dict[str, Any]:
    """Python, numpy (legacy global), torch CPU and (when present) all CUDA generator states."""
    np_state = np.random.get_state(legacy=False)
    state: dict[str, Any] = {
        "python": random.getstate(),
        # As tensors/ints so torch.load(weights_only=True) can read it back (no numpy pickles).
        "numpy": {
            "bit_generator": np_state["bit_generator"],
            "key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
            "pos": int(np_state["state"]["pos"]),
            "has_gauss": int(np_state["has_gauss"]),
            "gauss": float(np_state["gauss"]),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: Mapping[str, Any]) -> None:
    """Inverse of ``capture_rng_state``. CUDA states are restored when saved and CUDA exists."""
    py = state["python"]
    # torch.load returns lists where random.getstate() had tuples.
    random.setstate((py[0], tuple(py[1]), py[2]))
    npst = state["numpy"]
    np.random.set_state(
        {
            "bit_generator": npst["bit_generator"],
            "state": {"key": npst["key"].numpy().astype(np.uint32), "pos": int(npst["pos"])},
            "has_gauss": int(npst["has_gauss"]),
            "gauss": float(npst["gauss"]),
        }
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        cuda = state["cuda"]
        if len(cuda) != torch.cuda.device_count():
            logger.warning(
                "checkpoint has CUDA RNG states for %d devices, this process sees %d; restoring "
                "the common ones",
                len(cuda),
                torch.cuda.device_count(),
            )
        for i, s in enumerate(cuda[: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(s, i)


_P = ParamSpec("_P")
_R = TypeVar("_R")


def keeps_rng_state(fn: Callable[_P, _R]) -> Callable[_P, _R]:
    """``fn`` gives back the process's RNG states (Python, numpy, torch CPU and CUDA) as it
    found them, whatever it seeds or draws: a training stage seeds its own (``cfg.seed``) and
    a resume restores the checkpoint's, which reseeded the calling program's generators."""

    @functools.wraps(fn)
    def keeping(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        state = capture_rng_state()
        try:
            return fn(*args, **kwargs)
        finally:
            restore_rng_state(state)

    return keeping


# ------------------------------------------------------------------------------ saving/loading


@dataclass
class Checkpoint:
    """What ``load_checkpoint`` read (state dicts are already applied when objects were given)."""

    path: Path
    step: int
    model_state: dict[str, dict[str, torch.Tensor]]
    optimizer_state: dict[str, Any] | None
    scheduler_state: dict[str, Any] | None
    rng_state: dict[str, Any] | None
    data_position: Any
    extra: dict[str, Any]


def check_shapes(
    saved: Mapping[str, torch.Tensor], current: Mapping[str, torch.Tensor], what: str
) -> None:
    """CheckpointError naming the tensors whose saved shape is not the current one (a config
    change between runs) before any is copied: a bare size mismatch names none."""
    wrong = [
        (n, tuple(saved[n].shape), tuple(t.shape))
        for n, t in current.items()
        if n in saved and tuple(saved[n].shape) != tuple(t.shape)
    ]
    if wrong:
        listed = "; ".join(f"{n}: saved {s}, now {c}" for n, s, c in wrong[:3])
        raise CheckpointError(
            f"{what}: {len(wrong)} tensor(s) of another shape than the checkpoint's: {listed}"
        )


def list_checkpoints(directory: str | Path) -> list[Path]:
    """Finished checkpoints under ``directory``, oldest step first."""
    d = Path(directory)
    if not d.is_dir():
        return []
    found = []
    for p in d.iterdir():
        m = _STEP_DIR.match(p.name)
        if m and p.is_dir() and (p / "state.json").is_file():
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


def latest_checkpoint(directory: str | Path) -> Path | None:
    ckpts = list_checkpoints(directory)
    return ckpts[-1] if ckpts else None


def checkpoint_step(path: str | Path) -> int:
    """The optimizer step a checkpoint folder (``step-NNNNNNNN``) was saved at."""
    m = _STEP_DIR.match(Path(path).name)
    if m is None:
        raise CheckpointError(f"{path} is not a checkpoint folder (expected step-NNNNNNNN)")
    return int(m.group(1))


def _flatten_models(model_state: ModelState) -> dict[str, torch.Tensor]:
    states = model_state() if callable(model_state) else model_state
    flat: list[tuple[str, torch.Tensor]] = []
    for module_name, sd in states.items():
        if _SEP in module_name:
            raise ValueError(f"module name {module_name!r} must not contain {_SEP!r}")
        if isinstance(sd, torch.nn.Module):
            sd = sd.state_dict()
        for key, t in sd.items():
            if not isinstance(t, torch.Tensor):
                raise TypeError(
                    f"{module_name}.{key} is a {type(t).__name__}; model state must hold tensors "
                    "only (put other values in extra=)"
                )
            flat.append((f"{module_name}{_SEP}{key}", t.detach().to("cpu")))
    return safetensors_ready(flat)  # tied weights stored as copies of their repeats


def _remove_stale_temps(directory: Path) -> None:
    for p in directory.glob(".tmp-step-*"):
        logger.info("removing unfinished checkpoint %s", p)
        shutil.rmtree(p, ignore_errors=True)
    # A finished checkpoint moved aside for a re-save of its step (swap_in) by a process killed
    # before the new one took its place: it is the step's only copy, so it goes back.
    for aside in directory.glob(".step-*.old"):
        for kept in aside.glob("step-*"):
            if not (directory / kept.name).exists():
                logger.warning("restoring checkpoint %s from an interrupted re-save", kept.name)
                os.replace(kept, directory / kept.name)
        shutil.rmtree(aside, ignore_errors=True)


def _write_checkpoint_files(
    tmp: Path,
    model_state: ModelState,
    optimizer: Stateful | None,
    scheduler: Stateful | None,
    rng: Mapping[str, Any] | None,
    state_json: str,
) -> None:
    """One checkpoint's files into the folder ``tmp``, each fsynced."""
    files = {"model.safetensors"}
    save_file(_flatten_models(model_state), str(tmp / "model.safetensors"))
    if optimizer is not None:
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        files.add("optimizer.pt")
    if scheduler is not None:
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        files.add("scheduler.pt")
    if rng is not None:
        torch.save(dict(rng), tmp / "rng.pt")
        files.add("rng.pt")
    # state.json last: a directory with it is complete even without the rename guarantee.
    (tmp / "state.json").write_text(state_json)
    for name in sorted(files | {"state.json"}):
        public_mode(tmp / name)  # safetensors creates its file private (0600)
        with open(tmp / name, "rb+") as f:
            os.fsync(f.fileno())


def save_checkpoint(
    directory: str | Path,
    step: int,
    model_state: ModelState,
    optimizer: Stateful | None = None,
    scheduler: Stateful | None = None,
    data_position: Any = None,
    rng_state: Mapping[str, Any] | bool = True,
    extra: Mapping[str, Any] | None = None,
    keep_last: int | None = 3,
) -> Path:
    """Write checkpoint ``step`` atomically under ``directory``; return its path.

    ``model_state``: {name: module or state dict}, or a callable returning {name: state dict}
    (e.g. to gather FSDP shards, or peft's ``get_peft_model_state_dict`` for LoRA only).
    ``rng_state``: True captures the current states, False stores none, a mapping is stored as
    given (``capture_rng_state()`` taken earlier). ``data_position`` and ``extra`` must be
    JSON-serialisable. ``keep_last``: keep this many newest checkpoints (None keeps all).
    """
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if keep_last is not None and keep_last < 1:
        raise ValueError(f"keep_last must be >= 1 or None, got {keep_last}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    # None or an empty mapping stores no RNG state, like False: has_rng must say so
    rng = capture_rng_state() if rng_state is True else (rng_state or None)
    try:
        state_json = json.dumps(
            {
                "format": CHECKPOINT_FORMAT,
                "version": CHECKPOINT_VERSION,
                "step": step,
                "data_position": data_position,
                "extra": dict(extra or {}),
                "has_optimizer": optimizer is not None,
                "has_scheduler": scheduler is not None,
                "has_rng": rng is not None,
                "torch_version": torch.__version__,
                "time": time.time(),
            },
            indent=1,
        )
    except TypeError as err:
        raise TypeError(f"data_position and extra must be JSON-serialisable: {err}") from err

    _remove_stale_temps(directory)
    final = directory / f"step-{step:08d}"
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-step-{step:08d}-", dir=directory))
    public_mode(tmp, directory=True)  # mkdtemp's 0700 would stay on the renamed checkpoint
    try:
        with naming_write_errors(final, tmp):
            _write_checkpoint_files(tmp, model_state, optimizer, scheduler, rng, state_json)
            fsync_path(tmp)
            # Re-saving a step (e.g. after resuming): the old one is swapped out, never deleted
            # first, and comes back if the new one cannot take its place.
            swap_in([(tmp, final)])
        fsync_path(directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("saved checkpoint %s", final)

    if keep_last is not None:
        for old in list_checkpoints(directory)[:-keep_last]:
            if old == final:  # never the one just written, whatever higher steps lie about
                continue
            logger.info("removing old checkpoint %s", old)
            shutil.rmtree(old, ignore_errors=True)
    return final


def _torch_load(path: Path, map_location: str | torch.device) -> Any:
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # torch raises many types for a damaged zip/pickle
        raise CheckpointError(f"could not read {path}: {err}") from err


def load_checkpoint(
    path: str | Path,
    models: Mapping[str, torch.nn.Module] | None = None,
    optimizer: Stateful | None = None,
    scheduler: Stateful | None = None,
    *,
    restore_rng: bool = True,
    strict: bool = True,
    map_location: str | torch.device = "cpu",
) -> Checkpoint:
    """Read the checkpoint at ``path`` and load it into whatever objects are given.

    ``models`` maps the names used at save time to modules (``strict`` as in
    ``load_state_dict``; with strict, every saved module name must be given too). RNG states
    are restored last, so nothing done while loading disturbs them.
    """
    path = Path(path)
    state_path = path / "state.json"
    try:
        state = json.loads(state_path.read_text())
    except (OSError, ValueError) as err:
        raise CheckpointError(f"could not read {state_path}: {err}") from err
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{state_path} is not a {CHECKPOINT_FORMAT} file")
    version = state.get("version")
    if type(version) is not int or not 1 <= version <= CHECKPOINT_VERSION:
        # a newer layout read by these rules would load whatever its keys happen to match
        raise CheckpointError(
            f"{state_path}: expected {CHECKPOINT_FORMAT} version 1 to {CHECKPOINT_VERSION}, got "
            f"{version!r} (written by a newer dcgen?)"
        )
    missing = [k for k in ("step", "has_optimizer", "has_scheduler", "has_rng") if k not in state]
    if missing:
        raise CheckpointError(f"{state_path}: expected keys {missing} too, it has {sorted(state)}")
    try:
        flat = load_file(str(path / "model.safetensors"), device=str(map_location))
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"could not read {path / 'model.safetensors'}: {err}") from err
    model_state: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in flat.items():
        module_name, _, param = key.partition(_SEP)
        model_state.setdefault(module_name, {})[param] = t

    if models is not None:
        # A module without parameters or buffers leaves no key in the file: nothing to load.
        models = {n: m for n, m in models.items() if n in model_state or m.state_dict()}
        if strict and set(model_state) != set(models):
            raise CheckpointError(
                f"{path}: saved modules {sorted(model_state)}, given {sorted(models)}"
            )
        for name, module in models.items():
            if name not in model_state:
                raise CheckpointError(f"{path} has no module {name!r} (has {sorted(model_state)})")
            try:
                module.load_state_dict(model_state[name], strict=strict)
            except (KeyError, RuntimeError, ValueError) as err:
                raise CheckpointError(
                    f"{path}: {name!r} does not fit this run's model: {err} (was the config "
                    "changed since, e.g. lora_rank? resume = false starts over)"
                ) from err

    opt_state = _torch_load(path / "optimizer.pt", map_location) if state["has_optimizer"] else None
    sched_state = _torch_load(path / "scheduler.pt", "cpu") if state["has_scheduler"] else None
    rng = _torch_load(path / "rng.pt", "cpu") if state["has_rng"] else None
    if optimizer is not None:
        if opt_state is None:
            raise CheckpointError(f"{path} holds no optimizer state")
        optimizer.load_state_dict(opt_state)
    if scheduler is not None:
        if sched_state is None:
            raise CheckpointError(f"{path} holds no scheduler state")
        scheduler.load_state_dict(sched_state)
    if restore_rng and rng is not None:
        restore_rng_state(rng)
    logger.info("loaded checkpoint %s (step %d)", path, state["step"])
    return Checkpoint(
        path=path,
        step=int(state["step"]),
        model_state=model_state,
        optimizer_state=opt_state,
        scheduler_state=sched_state,
        rng_state=rng,
        data_position=state.get("data_position"),
        extra=state.get("extra", {}),
    )


def load_latest_checkpoint(
    directory: str | Path,
    models: Mapping[str, torch.nn.Module] | None = None,
    optimizer: Stateful | None = None,
    scheduler: Stateful | None = None,
    **kwargs: Any,
) -> Checkpoint | None:
    """``load_checkpoint`` of the newest finished checkpoint, or None when there is none."""
    path = latest_checkpoint(directory)
    if path is None:
        return None
    return load_checkpoint(path, models, optimizer, scheduler, **kwargs)


# ----------------------------------------------------------------------------- resume helper


@dataclass
class RunState:
    """Where a run is: optimizer steps taken and batches consumed in the current epoch."""

    step: int = 0
    epoch: int = 0
    position: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def advance(self) -> None:
        """Call once per optimizer step that consumed one batch from the sampler."""
        self.step += 1
        self.position += 1

    def next_epoch(self) -> None:
        self.epoch += 1
        self.position = 0

    def data_position(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}


class Checkpointer:
    """Save and resume one run with a few calls::

    ckpt = Checkpointer(out_dir, {"model": model}, optimizer, scheduler, keep_last=3)
    state = ckpt.resume()                      # RunState(step=0, ...) on a fresh run
    while state.step < total_steps:
        sampler.set_epoch(state.epoch, state.position)
        for batch in loader:
            ... one optimizer step ...
            state.advance()
            if state.step % every == 0:
                ckpt.save(state)
            if state.step == total_steps:
                break
        else:
            state.next_epoch()
    """

    def __init__(
        self,
        directory: str | Path,
        models: Mapping[str, torch.nn.Module],
        optimizer: Stateful | None = None,
        scheduler: Stateful | None = None,
        *,
        keep_last: int | None = 3,
        model_state: Callable[[], Mapping[str, Mapping[str, torch.Tensor]]] | None = None,
    ) -> None:
        self.directory = Path(directory)
        self.models = dict(models)
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.keep_last = keep_last
        self.model_state = model_state

    def save(self, state: RunState) -> Path:
        return save_checkpoint(
            self.directory,
            state.step,
            self.model_state if self.model_state is not None else self.models,
            self.optimizer,
            self.scheduler,
            data_position=state.data_position(),
            extra=state.extra,
            keep_last=self.keep_last,
        )

    def resume(self, **kwargs: Any) -> RunState:
        """Load the newest checkpoint into the models/optimizer/scheduler and RNGs; return the
        RunState to continue from (a fresh one when the directory has no checkpoint)."""
        ckpt = load_latest_checkpoint(
            self.directory, self.models, self.optimizer, self.scheduler, **kwargs
        )
        if ckpt is None:
            return RunState()
        pos = ckpt.data_position or {}
        return RunState(
            step=ckpt.step,
            epoch=int(pos.get("epoch", 0)),
            position=int(pos.get("position", 0)),
            extra=dict(ckpt.extra),
        )

    def start_fresh(self) -> RunState:
        """A run that does not resume (resume = false) where an earlier run left checkpoints:
        move them to ``<directory>.before-<time>``, kept, so they neither resume into this run
        later nor count as its newest when keep_last prunes (which would delete this run's
        own). Returns the RunState of step 0. One process calls it (rank 0)."""
        if list_checkpoints(self.directory):
            stamp = time.strftime("%Y%m%d-%H%M%S")
            aside = self.directory.with_name(f"{self.directory.name}.before-{stamp}")
            n = 1
            while aside.exists():
                aside, n = aside.with_name(f"{aside.name.rsplit('~', 1)[0]}~{n}"), n + 1
            os.replace(self.directory, aside)
            logger.warning("resume = false: the earlier run's checkpoints were moved to %s", aside)
        return RunState()
