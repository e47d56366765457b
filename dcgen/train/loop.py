"""The one training loop every DC-Gen stage runs (stage-1 refinement, stage 2, stage 3).

A stage supplies two things: a module whose ``forward(**inputs)`` returns the scalar loss of a
batch (its trainable parameters are those with ``requires_grad``), and ``make_inputs(batch,
rnd)`` that turns a collated batch of cached samples into those inputs, drawing noise, sigmas
and guidance values from ``rnd``. Everything else lives here, in order, in :func:`train_loop`:
AdamW, linear warmup + cosine decay, bf16 autocast, gradient clipping, optional EMA,
checkpoints through :class:`~dcgen.train.checkpoint.Checkpointer`, ``log.jsonl``, a tqdm bar.

Determinism: the batch order is a pure function of (seed, epoch) (BucketBatchSampler), and the
random numbers of step k come from a generator seeded by (seed, k) (:class:`StepRandom`), not
from global RNG state. So a resumed run replays exactly, and every rank of a multi-process run
draws the same global batch and the same random numbers, then keeps its shard of both.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import signal
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from .._files import atomic_write
from .._json import dumps
from .buckets import BucketBatchSampler
from .checkpoint import Checkpointer, CheckpointError, RunState, check_shapes
from .config import TrainConfig
from .data import collate_samples
from .distributed import DistContext, FSDPState
from .ema import EMA
from .interrupt import StopRequest, TrainingInterrupted
from .losses import guidance_values, sample_timesteps

logger = logging.getLogger(__name__)

__all__ = [
    "LOG_NAME",
    "LoopResult",
    "StepRandom",
    "TrainableState",
    "TrainingDivergedError",
    "bucket_ids_of",
    "read_log",
    "train_loop",
    "warmup_cosine",
]

LOG_NAME = "log.jsonl"
CHECKPOINT_DIR = "checkpoints"
#: consecutive steps with non-finite gradients after which a run stops (each one is skipped)
MAX_NONFINITE_STEPS = 10


class TrainingDivergedError(RuntimeError):
    """Too many consecutive steps had a non-finite loss or gradient (the weights, the
    checkpoints and the EMA were left as they were before the first of them)."""


class StepRandom:
    """The random numbers of one optimizer step, identical on every rank and after a resume.

    Each draw is made for the whole global batch from a CPU generator seeded by (seed, step),
    then sliced to this rank's ``shard`` and moved to ``device``. Draw in a fixed order.
    """

    def __init__(
        self, seed: int, step: int, global_size: int, shard: slice, device: torch.device
    ) -> None:
        # A large odd multiplier keeps (seed, step) pairs from colliding for realistic values.
        # Reduced into torch's seed range: a large seed (a date, 20240601120000) overflowed it.
        self.generator = torch.Generator().manual_seed((seed * 1_000_003 + step) % 2**63)
        self.global_size = global_size
        self.shard = shard
        self.device = device

    def randn(self, *sample_shape: int) -> torch.Tensor:
        # fp32 whatever torch's default dtype: the same stream and precision in every process
        x = torch.randn(
            (self.global_size, *sample_shape), generator=self.generator, dtype=torch.float32
        )
        return x[self.shard].to(self.device)

    def sigmas(self, mode: str = "logit_normal", shift: float = 1.0) -> torch.Tensor:
        s = sample_timesteps(self.global_size, self.generator, mode=mode, shift=shift)  # type: ignore[arg-type]
        return s[self.shard].to(self.device)

    def guidance(self, low: float, high: float) -> torch.Tensor:
        g = guidance_values(self.global_size, self.generator, low=low, high=high)
        return g[self.shard].to(self.device)

    def uniform(self) -> torch.Tensor:
        """One U[0, 1) value per sample (caption dropout)."""
        u = torch.rand(self.global_size, generator=self.generator, dtype=torch.float32)
        return u[self.shard].to(self.device)


class TrainableState:
    """The trainable parameters of a module as a state-dict provider for the Checkpointer: a
    12B DiT checkpoint then holds only the LoRA and latent layers, not the frozen blocks."""

    def __init__(self, module: nn.Module) -> None:
        self.params = {n: p for n, p in module.named_parameters() if p.requires_grad}
        if not self.params:
            raise ValueError(f"{type(module).__name__} has no parameter that requires grad")

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {n: p.detach() for n, p in self.params.items()}

    @torch.no_grad()
    def load_state_dict(self, state: Mapping[str, torch.Tensor], strict: bool = True) -> None:
        missing, unexpected = set(self.params) - set(state), set(state) - set(self.params)
        if strict and (missing or unexpected):
            raise KeyError(
                f"checkpoint does not match the trainable parameters: missing "
                f"{sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}"
            )
        check_shapes(state, self.params, "trainable parameters")
        for n, p in self.params.items():
            if n in state:
                p.copy_(state[n])


@dataclass
class LoopResult:
    steps: int
    start_step: int  # > 0 when the run resumed from a checkpoint
    final_loss: float
    losses: list[float] = field(default_factory=list)  # this process's steps (after resume)
    log_path: Path | None = None
    checkpoint_dir: Path | None = None


def warmup_cosine(total_steps: int, warmup_steps: int) -> Callable[[int], float]:
    """LR multiplier: linear warmup to 1 over ``warmup_steps``, then cosine decay to 0."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def bucket_ids_of(dataset: Any, key: str) -> list[Any]:
    """Batch-compatibility ids: the cache's buckets, else the shape of ``key`` per sample."""
    ids = getattr(dataset, "bucket_ids", None)
    if ids is not None:
        return list(ids)
    return [tuple(dataset[i][key].shape) for i in range(len(dataset))]


# Numbers a step logs that can be non-finite; everything else in an entry is always set.
_FLOAT_FIELDS = ("loss", "lr", "grad_norm")


def read_log(path: str | Path) -> list[dict[str, Any]]:
    """The log's entries. A non-finite loss or gradient norm is written as ``null`` (strict
    JSON, see dcgen._json) and read back as NaN, so the values stay floats."""
    return _read_log(Path(path))[0]


def _read_log(path: Path) -> tuple[list[dict[str, Any]], bool]:
    """(entries, whether the file ends in a cut-off line). A run killed, or out of disk space,
    in the middle of an append leaves its last line unfinished: that line is skipped (the
    step is replayed from the checkpoint) where it made every later resume fail to parse the
    log. Any other line that is not JSON is an error naming the file and the line."""
    if not path.is_file():
        return [], False
    text = path.read_text()
    torn = bool(text) and not text.endswith("\n")
    lines = text.splitlines()
    entries = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            entries.append(json.loads(line))
        except ValueError as err:
            if torn and number == len(lines):
                logger.warning("%s: its last line was cut off mid-write; it is ignored", path)
                continue
            raise ValueError(f"{path}: line {number} is not a log entry ({err})") from err
    for entry in entries:
        for key in _FLOAT_FIELDS:
            if key in entry and entry[key] is None:
                entry[key] = math.nan
    return entries, torn


def _load_batch(dataset: Any, indices: Sequence[int], device: torch.device) -> dict[str, Any]:
    batch = collate_samples([dataset[i] for i in indices])
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def _truncate_log(path: Path, tag: str, step: int) -> None:
    """Drop the entries a killed run wrote after its last checkpoint; they are replayed."""
    entries, torn = _read_log(path)
    kept = [e for e in entries if e.get("tag") != tag or e.get("step", 0) <= step]
    if torn or len(kept) != len(entries):  # torn: the next append must start a line
        text = "".join(dumps(e) + "\n" for e in kept)
        atomic_write(path, lambda tmp: Path(tmp).write_text(text))  # a kill here keeps the log


def _last_logged_loss(path: Path, tag: str) -> float:
    entries = [e for e in read_log(path) if e.get("tag") == tag]
    return float(entries[-1]["loss"]) if entries else float("nan")


@torch.no_grad()
def _unshard_for_saving(
    module: nn.Module, fsdp_state: FSDPState, originals: dict[str, nn.Parameter]
) -> None:
    """After FSDP training: gather the full trained values (collective) into the plain
    parameters kept from before sharding and register those again, so the stage's save code
    (save_pretrained, LoRA and latent-layer files) sees ordinary tensors. The FSDP hooks stay:
    the module is for saving now, not for more sharded forwards."""
    full = fsdp_state.full_trainable()
    for name, orig in originals.items():
        if name in full:
            orig.copy_(full[name].to(orig.device, orig.dtype))
        owner, _, leaf = name.rpartition(".")
        module.get_submodule(owner)._parameters[leaf] = orig


@contextlib.contextmanager
def _unsharded(root: nn.Module | None) -> Iterator[None]:
    """The FSDP root's own parameters (the embedder and head; the blocks are sharded units of
    their own) gathered while inside: a sampler calls the inner transformer, which skips the
    root's forward, where FSDP would gather them. Nothing to do without FSDP (``None``)."""
    if root is None:
        yield
        return
    root.unshard()  # type: ignore[operator]  # an FSDPModule after fully_shard
    try:
        yield
    finally:
        root.reshard()  # type: ignore[operator]


def train_loop(
    module: nn.Module,
    make_inputs: Callable[[dict[str, Any], StepRandom], dict[str, Any]],
    dataset: Any,
    cfg: TrainConfig,
    ctx: DistContext,
    run_dir: str | Path,
    *,
    steps: int,
    bucket_key: str = "dcae_latent",
    tag: str = "train",
    ema: EMA | None = None,
    progress: bool = True,
    on_step: Callable[[int, float], None] | None = None,
    on_sample: Callable[[int], Any] | None = None,
    stop_on_signal: bool = True,
) -> LoopResult:
    """Train ``module``'s trainable parameters for ``steps`` optimizer steps of ``cfg.batch_size``
    global samples (resuming from ``run_dir/checkpoints`` when ``cfg.resume``). ``on_step(step,
    loss)`` runs after each step (and its checkpoint), e.g. to stop a run early in tests.
    ``on_sample(step)`` runs every ``cfg.sample_every`` steps and at the last step, after the
    checkpoint and before ``on_step`` (e.g. :class:`~dcgen.train.samples.SampleWriter`).

    With ``stop_on_signal`` (from the main thread), Ctrl-C or SIGTERM stops the run after the
    step it is in, with a checkpoint at that step, by raising
    :class:`~dcgen.train.interrupt.TrainingInterrupted` (every rank stops at the same step)."""
    run_dir = Path(run_dir)
    device = ctx.device
    fsdp = ctx.enabled and cfg.parallel == "fsdp"
    originals: dict[str, nn.Parameter] = {}
    if fsdp:
        # fully_shard replaces the parameters; keep the plain ones to put back at the end.
        originals = dict(module.named_parameters())
        adapter = getattr(module, "adapter", None)
        blocks = list(adapter.blocks()) if adapter is not None else []
        model = ctx.wrap(module, "fsdp", blocks)
    else:
        model = ctx.wrap(module)
    params = [p for p in module.parameters() if p.requires_grad]
    low = sorted({str(p.dtype).removeprefix("torch.") for p in params if p.dtype.itemsize < 4})
    if low:
        # AdamW keeps its moments in the parameter's dtype, and a 16-bit weight does not move
        # by an update below its ulp (measured: 20% of a bf16 head's weights moved in 20 steps
        # at lr 1e-4, all of them in fp32)
        logger.warning(
            "%s: %d trainable tensors are %s: updates smaller than their rounding are lost; "
            "train fp32 weights (load the transformer in fp32; mixed_precision='bf16' computes "
            "in bf16 under autocast)", tag, sum(p.dtype.itemsize < 4 for p in params),
            " / ".join(low),
        )  # fmt: skip
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    fsdp_state = FSDPState(module, optimizer) if fsdp else None
    trainable: Any = fsdp_state if fsdp_state is not None else TrainableState(module)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(steps, cfg.warmup_steps))
    sampler = BucketBatchSampler(
        bucket_ids_of(dataset, bucket_key), cfg.batch_size, seed=cfg.seed, drop_last=True
    )
    if len(sampler) == 0:
        raise ValueError(
            f"no full batch of batch_size={cfg.batch_size} in {len(dataset)} samples (batches "
            "hold samples of one size bucket): lower batch_size or add data"
        )
    states: dict[str, Any] = {"trainable": trainable}
    if ema is not None:
        states["ema"] = ema
    ckpt_dir = run_dir / CHECKPOINT_DIR
    ckpt = Checkpointer(
        ckpt_dir,
        states,  # type: ignore[arg-type]  # duck-typed: state_dict / load_state_dict
        fsdp_state.optimizer if fsdp_state is not None else optimizer,
        scheduler,
        keep_last=cfg.keep_checkpoints,
        model_state=lambda: {name: obj.state_dict() for name, obj in states.items()},
    )
    if cfg.resume:
        state = ckpt.resume()
    else:
        state = ckpt.start_fresh() if ctx.is_main else RunState()
        ctx.barrier()  # the earlier run's checkpoints are out of the way on every rank
    if state.step > steps:
        raise CheckpointError(
            f"{ckpt_dir}: the newest checkpoint is at step {state.step}, past this run's "
            f"steps={steps}: raise steps to continue that run, or set resume = false to start "
            "over (its checkpoints are then moved aside)"
        )
    start = state.step
    if start:
        # The optimizer's state brought back the learning rate its run had reached, which is
        # this run's only while `steps` is the same (the cosine's length): set this schedule's
        # lr for the next step, as LambdaLR computes it (the same bits when nothing changed).
        for group, base, fn in zip(
            optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas, strict=True
        ):
            group["lr"] = base * fn(scheduler.last_epoch)
    log_path = run_dir / LOG_NAME
    if ctx.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        _truncate_log(log_path, tag, start)
    if start:
        logger.info("%s: resumed at step %d of %d", tag, start, steps)
    shard = ctx.shard(cfg.batch_size)
    autocast = torch.autocast(
        device_type=device.type, dtype=torch.bfloat16, enabled=cfg.mixed_precision == "bf16"
    )
    losses: list[float] = []
    nonfinite_in_a_row = 0
    bar = tqdm(total=steps, initial=start, desc=tag, disable=not (progress and ctx.is_main))
    model.train()
    t0 = time.perf_counter()
    stop = StopRequest(tag)
    with stop if stop_on_signal else contextlib.nullcontext():
        while state.step < steps:
            sampler.set_epoch(state.epoch, state.position)
            for indices in sampler:
                # ---- one optimizer step: this rank's shard of the global batch -----------------
                batch = _load_batch(dataset, indices[shard], device)
                rnd = StepRandom(cfg.seed, state.step, len(indices), shard, device)
                inputs = make_inputs(batch, rnd)
                with autocast:
                    loss = model(**inputs)
                loss.backward()  # DDP averages the gradients over ranks here
                if cfg.grad_clip > 0:
                    norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
                else:
                    norm = torch.nn.utils.clip_grad_norm_(params, float("inf"))
                grad_norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
                # A non-finite loss gives non-finite gradients; an optimizer step on them made every
                # weight NaN, and the run went on checkpointing NaN (pruning the good checkpoints).
                # Such a step is skipped: no update, no EMA update; the schedule and the data move
                # on as for any step. The norm is the global one (gradients already averaged over
                # ranks, FSDP's full tensor), so every rank decides the same.
                finite = math.isfinite(grad_norm)
                if finite:
                    optimizer.step()
                    nonfinite_in_a_row = 0
                else:
                    nonfinite_in_a_row += 1
                    logger.warning(
                        "%s step %d: non-finite loss or gradients (gradient norm %s): step skipped, "
                        "weights unchanged", tag, state.step + 1, grad_norm,
                    )  # fmt: skip
                    if nonfinite_in_a_row >= MAX_NONFINITE_STEPS:
                        raise TrainingDivergedError(
                            f"{tag}: {nonfinite_in_a_row} steps in a row up to step {state.step + 1} "
                            "had a non-finite loss or gradients (each skipped): the data (e.g. a "
                            "cached latent with inf / NaN) or the learning rate; the checkpoints "
                            f"in {ckpt_dir} hold the weights from before"
                        )
                lr = optimizer.param_groups[0]["lr"]  # this step's, before the schedule moves on
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                if ema is not None and finite:
                    ema.update(state.step + 1)
                state.advance()
                # ---- bookkeeping ---------------------------------------------------------------
                # A stop request counts when any rank has one, so that all stop at this step.
                value, stopping = ctx.mean_and_any(float(loss.detach()), stop.requested)
                losses.append(value)
                # The loss is set without a redraw, then update() draws at its rate limit: the
                # postfix's own redraw put a frame per step into a redirected log (nohup, SLURM)
                bar.set_postfix(loss=f"{value:.4g}", refresh=False)
                bar.update(1)
                if ctx.is_main:
                    entry = {
                        "tag": tag,
                        "step": state.step,
                        "loss": value,
                        "lr": lr,
                        "grad_norm": grad_norm,
                        "time_s": round(time.perf_counter() - t0, 3),
                    }
                    if not finite:
                        entry["skipped"] = True
                    with open(log_path, "a") as f:
                        f.write(dumps(entry) + "\n")
                    if state.step % cfg.log_every == 0 or state.step == steps:
                        logger.info("%s step %d/%d: loss %.5g", tag, state.step, steps, value)
                if stopping or state.step % cfg.checkpoint_every == 0 or state.step == steps:
                    if fsdp_state is not None:
                        fsdp_state.gather()  # collective: full CPU state on rank 0
                    if ctx.is_main:
                        ckpt.save(state)
                    ctx.barrier()  # nobody runs ahead of a checkpoint that may be resumed from
                every = cfg.sample_every
                sample_due = every and (state.step % every == 0 or state.step == steps)
                if on_sample is not None and sample_due:
                    with _unsharded(model if fsdp else None):
                        on_sample(state.step)
                if on_step is not None:
                    on_step(state.step, value)
                if stopping:
                    # The checkpoint is written first: a second signal or the scheduler's kill
                    # during the sample or on_step above loses nothing. Raised even at the last
                    # step, so that a caller running several stages does not go on.
                    bar.close()
                    model.eval()
                    raise TrainingInterrupted(
                        tag, state.step, steps, ckpt_dir, stop.signum or signal.SIGTERM
                    )
                if state.step >= steps:
                    break
            else:
                state.next_epoch()
    # A request that came after the last step's poll (during its checkpoint, sample or on_step)
    # still stops the caller; the handlers are back by now, and one more exchange makes every
    # rank act on it (the last step's checkpoint is written whenever the loop ends here)
    if ctx.mean_and_any(0.0, stop.requested)[1]:
        bar.close()
        model.eval()
        raise TrainingInterrupted(tag, state.step, steps, ckpt_dir, stop.signum or signal.SIGTERM)
    bar.close()
    model.eval()
    if fsdp_state is not None:
        _unshard_for_saving(module, fsdp_state, originals)
    return LoopResult(
        steps=state.step,
        start_step=start,
        final_loss=losses[-1] if losses else _last_logged_loss(log_path, tag),
        losses=losses,
        log_path=log_path,
        checkpoint_dir=ckpt_dir,
    )
