"""Train the toy world's models from scratch (the recipe behind ``dcgen/assets/toy``).

    python scripts/train_toy_assets.py --out dcgen/assets/toy            # everything
    python scripts/train_toy_assets.py --out DIR --parts flux,manifest   # redo some parts

Parts, in dependency order (a part reads the folders of the parts before it from ``--out``):

- ``vae``:       f8c4 AutoencoderKL, L1 + MSE + a small KL on random 64x64 crops; then its latent
                 shift and scale are set from the training images (FLUX's convention).
- ``evaluator``: per-quadrant attribute classifiers on fresh dataset images, augmented with
                 blur, noise and colour jitter so they read decoded images as well as real ones.
- ``dcae``:      f32c32 DC-AE, L1 + MSE on full images; scaling_factor = 1 / latent std.
- ``flux``:      FLUX transformer + text encoder, jointly, flow matching on VAE latents of a fixed
                 training set (2x2 packing, the FLUX shift rule, guidance values as conditioning),
                 weights averaged by EMA.
- ``manifest``:  measures every model (reconstruction PSNR, evaluator accuracy on real images and
                 on noise, base prompt accuracy) and writes ``manifest.json`` (the folder is
                 complete once it exists).

Each part checkpoints every CHECKPOINT_EVERY steps (``--out``/.partial, removed once the part is
saved). ``--resume`` keeps the parts an earlier (killed) run finished in ``--out`` and continues
the interrupted one from its checkpoint, exactly (``part_checkpoint``); ``--device cuda`` trains
on a GPU.

Every part is seeded. At the shipped thread count (1, the ``--threads`` default) a rerun on
the same CPU reproduces the shipped files bit for bit (measured for the VAE, base transformer
and text encoder); on a CPU whose kernels round differently every part lands within noise of
the shipped one instead (all five measured; README, "The toy world"). Another thread count
changes the floating-point summation order: in one 2-thread run the VAE reached 20.9 dB instead
of 23.5 and the base model 0.13 prompt accuracy instead of 0.54. Steps scale with ``--scale``
(0.01 for a smoke test).
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import signal
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from dcgen._files import atomic_write
from dcgen._json import dumps
from dcgen.train.interrupt import StopRequest, TrainingInterrupted

from . import assets as A
from .evaluator import ShapeEvaluator, evaluator_loss, label_accuracy, score_prompts
from .images import psnr
from .part_checkpoint import PartCheckpoint, partial_state_path
from .shapes import ShapesWorld, noise_images
from .text import ToyTextEncoder

logger = logging.getLogger(__name__)

Device = torch.device | str

PARTS = ("vae", "evaluator", "dcae", "flux", "manifest")
# Steps at --scale 1 (about an hour in all on 2 CPU cores).
STEPS = {"vae": 3000, "evaluator": 1200, "dcae": 3000, "flux": 4000}
# Optional multi-resolution base (--low-res-every N, off for the shipped assets): every N-th step
# is a batch of the same images at half size (a 4x4 token grid instead of 8x8), as FLUX.1 learns
# several resolutions. A single-resolution base reads a DC-AE grid as the corner of a larger
# image unless the positions are rescaled (TrainConfig.align_positions="base").
FLUX_TRAIN_IMAGES = 10_000
FLUX_BATCH = 32
SAMPLING_STEPS = 20
GUIDANCE = 3.5
# Steps between the in-part checkpoints (part_checkpoint): what a killed part loses at most.
CHECKPOINT_EVERY = 250


def _progress(it: range, desc: str, enabled: bool) -> Iterator[int]:
    if not enabled:
        yield from it
        return
    from tqdm.auto import tqdm

    yield from tqdm(it, desc=desc, dynamic_ncols=True)


def _cosine(total: int, warmup: int) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        t = (step - warmup) / max(total - warmup, 1)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))

    return factor


def _update(loss: torch.Tensor, opt: Any, sched: Any, clip_params: Any = None) -> float:
    """One optimizer step on ``loss`` (gradient norm clipped to 1 over ``clip_params`` if
    given); returns the loss value."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if clip_params is not None:
        torch.nn.utils.clip_grad_norm_(clip_params, 1.0)
    opt.step()
    sched.step()
    return loss.item()


def _optimizer(params: Any, lr: float, total: int, warmup: int) -> tuple[Any, Any]:
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0, betas=(0.9, 0.99))
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, _cosine(total, warmup))


def _random_crops(x: torch.Tensor, size: int, g: torch.Generator) -> torch.Tensor:
    n, _, h, w = x.shape
    ys = torch.randint(0, h - size + 1, (n,), generator=g).tolist()
    xs = torch.randint(0, w - size + 1, (n,), generator=g).tolist()
    return torch.stack(
        [x[i, :, y : y + size, c : c + size] for i, (y, c) in enumerate(zip(ys, xs))]
    )


# ------------------------------------------------------------------------------------ parts


def train_vae(
    steps: int,
    progress: bool,
    device: Device = "cpu",
    *,
    ckpt_dir: Path | None = None,
    resume: bool = False,
    stop: StopRequest | None = None,
) -> tuple[nn.Module, dict]:
    """The f8c4 VAE. With ``ckpt_dir``, a checkpoint every CHECKPOINT_EVERY steps there;
    ``resume`` continues from it (exactly: see part_checkpoint)."""
    torch.manual_seed(0)
    vae = A.build_vae().to(device).train()
    world = ShapesWorld(A.TRAIN_SEED, A.IMAGE_SIZE, length=10**9)
    g = torch.Generator().manual_seed(0)
    opt, sched = _optimizer(vae.parameters(), 1e-3, steps, 100)
    ckpt = PartCheckpoint(ckpt_dir, "vae", CHECKPOINT_EVERY, {"vae": vae}, opt, sched, g, stop=stop)
    first, losses = ckpt.start(steps, resume)
    batches = world.iter_batches(8, start=2_000_000 + 8 * first)
    for step in _progress(range(first, steps), "vae", progress):
        x = _random_crops(next(batches)[0], 64, g).to(device)
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.sample()).sample
        kl = post.kl().mean() / x[0].numel()
        loss = F.l1_loss(rec, x) + F.mse_loss(rec, x) + 1e-4 * kl
        losses.append(_update(loss, opt, sched, vae.parameters()))
        ckpt.step_done(step + 1, steps, losses)
    vae.eval()
    # FLUX's latent convention: z_scaled = (z - shift) * scale with unit variance overall.
    with torch.no_grad():
        z = torch.cat(
            [
                vae.encode(world.batch(i, 32)[0].to(device)).latent_dist.mean
                for i in range(0, 256, 32)
            ]
        )
    shift, scale = float(z.mean()), float(1.0 / z.std())
    vae.register_to_config(shift_factor=shift, scaling_factor=scale)
    return vae.cpu(), {
        "steps": steps,
        "final_loss": sum(losses[-50:]) / len(losses[-50:]),
        "shift_factor": shift,
        "scaling_factor": scale,
    }


def _augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Blur, noise and colour jitter per image, so the evaluator reads decoded images too."""
    n = x.shape[0]
    out = []
    for i in range(n):
        img = x[i : i + 1]
        r = torch.rand(4, generator=g).tolist()
        if r[0] < 0.5:
            k = 5
            sigma = 0.3 + 1.2 * r[1]
            t = torch.arange(k) - k // 2
            w = torch.exp(-(t.float() ** 2) / (2 * sigma**2))
            w = w / w.sum()
            img = F.conv2d(
                F.pad(img, (2, 2, 0, 0), mode="replicate"),
                w.view(1, 1, 1, k).repeat(3, 1, 1, 1),
                groups=3,
            )
            img = F.conv2d(
                F.pad(img, (0, 0, 2, 2), mode="replicate"),
                w.view(1, 1, k, 1).repeat(3, 1, 1, 1),
                groups=3,
            )
        if r[2] < 0.5:
            img = img + 0.08 * r[3] * torch.randn(img.shape, generator=g)
        gain = 1 + 0.1 * (torch.rand(1, 3, 1, 1, generator=g) - 0.5)
        out.append(img * gain)
    return torch.cat(out).clamp(-1, 1)


def train_evaluator(
    steps: int,
    progress: bool,
    device: Device = "cpu",
    *,
    ckpt_dir: Path | None = None,
    resume: bool = False,
    stop: StopRequest | None = None,
) -> tuple[ShapeEvaluator, dict]:
    """The attribute classifiers (checkpoints as :func:`train_vae`)."""
    torch.manual_seed(0)
    model = ShapeEvaluator().to(device).train()
    world = ShapesWorld(A.TRAIN_SEED, A.IMAGE_SIZE, length=10**9)
    g = torch.Generator().manual_seed(1)
    opt, sched = _optimizer(model.parameters(), 2e-3, steps, 50)
    ckpt = PartCheckpoint(
        ckpt_dir, "evaluator", CHECKPOINT_EVERY, {"ev": model}, opt, sched, g, stop=stop
    )
    first, losses = ckpt.start(steps, resume)
    batches = world.iter_batches(32, start=4_000_000 + 32 * first)
    for step in _progress(range(first, steps), "evaluator", progress):
        x, _, labels = next(batches)
        labels = labels.to(device)
        loss = evaluator_loss(model(_augment(x, g).to(device)), labels)
        losses.append(_update(loss, opt, sched))
        ckpt.step_done(step + 1, steps, losses)
    model.eval()
    return model.cpu(), {"steps": steps, "final_loss": sum(losses[-50:]) / len(losses[-50:])}


def train_dcae(
    steps: int,
    progress: bool,
    device: Device = "cpu",
    *,
    ckpt_dir: Path | None = None,
    resume: bool = False,
    stop: StopRequest | None = None,
) -> tuple[nn.Module, dict]:
    """The f32c32 DC-AE (checkpoints as :func:`train_vae`)."""
    torch.manual_seed(0)
    dcae = A.build_dcae().to(device).train()
    world = ShapesWorld(A.TRAIN_SEED, A.IMAGE_SIZE, length=10**9)
    opt, sched = _optimizer(dcae.parameters(), 1e-3, steps, 100)
    ckpt = PartCheckpoint(ckpt_dir, "dcae", CHECKPOINT_EVERY, {"dcae": dcae}, opt, sched, stop=stop)
    first, losses = ckpt.start(steps, resume)
    batches = world.iter_batches(8, start=6_000_000 + 8 * first)
    for step in _progress(range(first, steps), "dcae", progress):
        x = next(batches)[0].to(device)
        rec = dcae.decode(dcae.encode(x))
        loss = F.l1_loss(rec, x) + F.mse_loss(rec, x)
        losses.append(_update(loss, opt, sched, dcae.parameters()))
        ckpt.step_done(step + 1, steps, losses)
    dcae.eval()
    with torch.no_grad():
        z = torch.cat([dcae.encode(world.batch(i, 32)[0].to(device)) for i in range(0, 256, 32)])
    scale = float(1.0 / z.std())
    dcae.config = dcae.config.replace(scaling_factor=scale)
    return dcae.cpu(), {
        "steps": steps,
        "final_loss": sum(losses[-50:]) / len(losses[-50:]),
        "scaling_factor": scale,
    }


@torch.no_grad()
def encode_training_set(
    vae: nn.Module, count: int, progress: bool, low_res: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None, list[str]]:
    """VAE latents of the training images (on the VAE's device), at half size too (2x2 area
    average) if ``low_res`` (else None), and their captions (the same for both sizes: positions
    are quadrants)."""
    device = next(vae.parameters()).device
    world = ShapesWorld(A.TRAIN_SEED, A.IMAGE_SIZE, length=count)
    lats, low, caps = [], [], []
    for start in _progress(range(0, count, 64), "encode", progress):
        x, c, _ = world.batch(start, min(64, count - start))
        x = x.to(device)
        lats.append(A.vae_encode(vae, x))
        if low_res:
            low.append(A.vae_encode(vae, F.avg_pool2d(x, 2)))
        caps += c
    return torch.cat(lats), torch.cat(low) if low_res else None, caps


def train_flux(
    latents: torch.Tensor,
    captions: list[str],
    steps: int,
    progress: bool,
    low_res_latents: torch.Tensor | None = None,
    low_res_every: int = 3,
    *,
    ckpt_dir: Path | None = None,
    resume: bool = False,
    stop: StopRequest | None = None,
) -> tuple[nn.Module, ToyTextEncoder, dict]:
    """The base transformer and text encoder, jointly, with EMA weights (checkpoints as
    :func:`train_vae`, the EMA copies included)."""
    from dcgen.adapters import adapter_for
    from dcgen.sampling.shift import resolve_shift
    from dcgen.train.losses import flow_matching_loss, guidance_values, sample_timesteps

    torch.manual_seed(0)
    device = latents.device  # trains where the latents are
    transformer = A.build_transformer().to(device).train()
    text = ToyTextEncoder().to(device).train()
    adapter = adapter_for(transformer)
    params = list(transformer.parameters()) + list(text.parameters())
    opt, sched = _optimizer(params, 5e-4, steps, 200)
    ema_models = [
        copy.deepcopy(transformer).requires_grad_(False),
        copy.deepcopy(text).requires_grad_(False),
    ]
    decay = 0.999
    g = torch.Generator().manual_seed(2)
    _, c, h, w = latents.shape
    shift = resolve_shift("flux", adapter.num_tokens(h, w), c)
    sizes = [(latents, shift)]
    if low_res_latents is not None:
        lh, lw = low_res_latents.shape[-2:]
        sizes.append((low_res_latents, resolve_shift("flux", adapter.num_tokens(lh, lw), c)))
    modules = {"transformer": transformer, "text": text}
    modules.update({"ema_transformer": ema_models[0], "ema_text": ema_models[1]})
    ckpt = PartCheckpoint(ckpt_dir, "flux", CHECKPOINT_EVERY, modules, opt, sched, g, stop=stop)
    first, losses = ckpt.start(steps, resume)
    for step in _progress(range(first, steps), "flux", progress):
        low = len(sizes) > 1 and step % low_res_every == low_res_every - 1
        source, shift = sizes[1] if low else sizes[0]
        idx = torch.randint(0, len(source), (FLUX_BATCH,), generator=g)
        x0 = source[idx.to(device)]
        # The random draws stay on the CPU generator: the same numbers on every device.
        sigmas = sample_timesteps(FLUX_BATCH, g, mode="logit_normal", shift=shift).to(device)
        noise = torch.randn(x0.shape, generator=g).to(device)
        guidance = guidance_values(FLUX_BATCH, g, low=1.0, high=5.0).to(device)
        embeds, pooled = text([captions[i] for i in idx.tolist()])

        def model_fn(
            x_t: torch.Tensor, s: torch.Tensor, e=embeds, p=pooled, g=guidance
        ) -> torch.Tensor:
            return adapter.predict(x_t, s, e, p, g)

        value = _update(flow_matching_loss(model_fn, x0, sigmas, noise=noise), opt, sched, params)
        d = min(decay, (step + 1) / (step + 10))  # warm EMA: early weights do not linger
        with torch.no_grad():
            for live, avg in zip([transformer, text], ema_models):
                for p, q in zip(live.parameters(), avg.parameters()):
                    q.lerp_(p, 1 - d)
        if not low:  # the reported loss is the full-size one
            losses.append(value)
        if progress and step % 500 == 0 and losses:
            logger.info("flux step %d loss %.4f", step, sum(losses[-100:]) / len(losses[-100:]))
        ckpt.step_done(step + 1, steps, losses)
    transformer_ema, text_ema = ema_models
    return (
        transformer_ema.cpu().eval(),
        text_ema.cpu().eval(),
        {
            "steps": steps,
            "batch_size": FLUX_BATCH,
            "train_images": len(latents),
            "shift": sizes[0][1],
            "low_res_every": low_res_every if low_res_latents is not None else None,
            "low_res_shift": sizes[1][1] if len(sizes) > 1 else None,
            "final_loss": sum(losses[-100:]) / len(losses[-100:]),
        },
    )


@torch.no_grad()
def sample_base(
    transformer: nn.Module,
    text: ToyTextEncoder,
    vae: nn.Module,
    captions: list[str],
    seed: int,
    steps: int = SAMPLING_STEPS,
    batch_size: int = 64,
) -> torch.Tensor:
    """Images from the base model (FLUX pipeline semantics: Euler, FLUX shift, guidance 3.5)."""
    from dcgen.adapters import adapter_for
    from dcgen.sampling.flow import flow_sigmas, sample_euler
    from dcgen.sampling.shift import resolve_shift

    adapter = adapter_for(transformer)
    device = next(transformer.parameters()).device
    lat = A.IMAGE_SIZE // 8
    c = adapter.latent_channels
    shift = resolve_shift("flux", adapter.num_tokens(lat, lat), c)
    sigmas = flow_sigmas(steps, shift, device=device)
    images = []
    for start in range(0, len(captions), batch_size):
        caps = captions[start : start + batch_size]
        g = torch.Generator().manual_seed(seed + start)
        noise = torch.randn(len(caps), c, lat, lat, generator=g).to(device)
        embeds, pooled = text(caps)
        guidance = torch.full((len(caps),), GUIDANCE, device=device)

        def model_fn(
            x: torch.Tensor, s: torch.Tensor, e=embeds, p=pooled, g=guidance
        ) -> torch.Tensor:
            return adapter.predict(x, s, e, p, g)

        images.append(A.vae_decode(vae, sample_euler(model_fn, noise, sigmas)).cpu())
    return torch.cat(images)


@torch.no_grad()
def measure(assets: A.ToyAssets, count: int = 256) -> dict[str, Any]:
    """The numbers the manifest records (also the asset tests' expectations)."""
    world = ShapesWorld(A.EVAL_SEED, A.IMAGE_SIZE, length=count)
    x, caps, labels = world.batch(0, count)
    device = next(assets.evaluator.parameters()).device
    x64 = x[:64].to(device)

    def predict(images: torch.Tensor) -> torch.Tensor:
        return assets.evaluator.predict(images.to(device)).cpu()

    vae_rec = A.vae_decode(assets.vae, A.vae_encode(assets.vae, x64)).cpu()
    dcae_rec = assets.dcae.decode(assets.dcae.encode(x64)).cpu()
    real = score_prompts(predict(x), caps)
    noise = score_prompts(predict(noise_images(count, A.IMAGE_SIZE)), caps)
    base_images = sample_base(
        assets.transformer, assets.text_encoder, assets.vae, caps[:128], seed=0
    )
    base = score_prompts(predict(base_images), caps[:128])
    return {
        "vae_psnr_db": psnr(vae_rec, x[:64]),
        "dcae_psnr_db": psnr(dcae_rec, x[:64]),
        "evaluator_label_accuracy_real": label_accuracy(predict(x), labels),
        "evaluator_prompt_accuracy_real": real["prompt_accuracy"],
        "evaluator_prompt_accuracy_noise": noise["prompt_accuracy"],
        "evaluator_attribute_accuracy_noise": {
            k: v for k, v in noise.items() if k != "prompt_accuracy"
        },
        "vae_decoded_prompt_accuracy": score_prompts(predict(vae_rec), caps[:64])[
            "prompt_accuracy"
        ],
        "dcae_decoded_prompt_accuracy": score_prompts(predict(dcae_rec), caps[:64])[
            "prompt_accuracy"
        ],
        "base_prompt_accuracy": base["prompt_accuracy"],
        "base_attribute_accuracy": {k: v for k, v in base.items() if k != "prompt_accuracy"},
        "measured_on": f"{count} held-out images (seed {A.EVAL_SEED}); base: 128 prompts, {SAMPLING_STEPS} Euler steps",
    }


# ---------------------------------------------------------------------------------- driver


def _load_part(out: Path, part: str, device: Device = "cpu") -> Any:
    loaded = _read_part(out, part)
    if isinstance(loaded, tuple):
        return tuple(m.to(device) for m in loaded)
    return loaded.to(device)


def _read_part(out: Path, part: str) -> Any:
    from diffusers import AutoencoderKL

    from dcgen.autoencoders import DCAE
    from dcgen.train.stages import load_transformer

    if part == "vae":
        return AutoencoderKL.from_pretrained(str(out / A.FOLDERS["vae"])).eval()
    if part == "dcae":
        return DCAE.from_pretrained(out / A.FOLDERS["dcae"]).eval()
    if part == "evaluator":
        return ShapeEvaluator.from_pretrained(out / A.FOLDERS["evaluator"])
    if part == "flux":
        return (
            load_transformer(out / A.FOLDERS["transformer"]).eval(),
            ToyTextEncoder.from_pretrained(out / A.FOLDERS["text_encoder"]),
        )
    raise KeyError(part)


def _write_log(out: Path, part: str, info: dict, seconds: float, device: Device = "cpu") -> None:
    log = out / "training.json"
    data = json.loads(log.read_text()) if log.is_file() else {}
    data[part] = {**info, "seconds": round(seconds, 1), "threads": torch.get_num_threads()}
    if str(device) != "cpu":
        data[part]["device"] = str(device)
    # Atomic: a part counts as finished (resume) only once its entry is here in full.
    atomic_write(log, lambda tmp: Path(tmp).write_text(dumps(data, indent=1)))


def _finished(out: Path, part: str, steps: int) -> bool:
    """Whether ``out`` holds ``part`` trained for ``steps`` steps: its training.json entry is
    written only after the part's folder is saved."""
    log = out / "training.json"
    if not log.is_file():
        return False
    entry = json.loads(log.read_text()).get(part)
    return entry is not None and entry.get("steps") == steps


def train(
    out: str | Path,
    parts: tuple[str, ...] = PARTS,
    scale: float = 1.0,
    progress: bool = True,
    low_res_every: int = 0,
    device: Device = "cpu",
    resume: bool = False,
) -> dict:
    """Train ``parts`` into ``out``; with ``resume``, parts already finished there at the same
    step count are kept and an interrupted part continues from its last checkpoint (a killed
    run loses at most CHECKPOINT_EVERY steps)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if low_res_every < 0:
        raise ValueError(f"low_res_every: expected >= 0 (0 = off), got {low_res_every}")
    unknown = [p for p in parts if p not in PARTS]
    if unknown:
        raise ValueError(f"unknown part(s) {unknown}; expected some of {PARTS}")

    def steps(part: str) -> int:
        return max(2, int(STEPS[part] * scale))

    # Ctrl-C / SIGTERM: the part in training checkpoints at its current step and stops (a
    # part that had just finished is saved first); --resume continues there.
    with StopRequest("toy assets") as stop:
        _train_parts(out, parts, steps, progress, low_res_every, scale, device, resume, stop)

    if "manifest" not in parts:
        return {}
    transformer, text = _load_part(out, "flux", device)
    assets = A.ToyAssets(
        _load_part(out, "vae", device), _load_part(out, "dcae", device), transformer, text,
        _load_part(out, "evaluator", device), {}, out,
    )  # fmt: skip
    metrics = measure(assets)
    training = (
        json.loads((out / "training.json").read_text()) if (out / "training.json").is_file() else {}
    )
    manifest = {
        "format": "dcgen-toy-assets/1",
        "image_size": A.IMAGE_SIZE,
        "train_seed": A.TRAIN_SEED,
        "eval_seed": A.EVAL_SEED,
        "sampling_steps": SAMPLING_STEPS,
        "guidance": GUIDANCE,
        "parameters": {
            "vae": A.count_parameters(assets.vae),
            "dcae": A.count_parameters(assets.dcae),
            "transformer": A.count_parameters(assets.transformer),
            "text_encoder": A.count_parameters(assets.text_encoder),
            "evaluator": A.count_parameters(assets.evaluator),
        },
        "scale": scale,
        "training": training,
        "metrics": metrics,
        "command": f"python scripts/train_toy_assets.py --out {out} --scale {scale}"
        + (f" --device {device}" if str(device) != "cpu" else ""),
    }
    text = dumps(manifest, indent=1)
    atomic_write(out / A.MANIFEST, lambda tmp: Path(tmp).write_text(text))
    return manifest


def _train_parts(
    out: Path,
    parts: tuple[str, ...],
    steps: Callable[[str], int],
    progress: bool,
    low_res_every: int,
    scale: float,
    device: Device,
    resume: bool,
    stop: StopRequest,
) -> None:
    for part in PARTS[:-1]:
        if part not in parts:
            continue
        if resume and _finished(out, part, steps(part)):
            logger.info("%s: already trained in %s (training.json), kept", part, out)
            continue
        t0 = time.perf_counter()
        if part == "vae":
            vae, info = train_vae(
                steps("vae"), progress, device, ckpt_dir=out, resume=resume, stop=stop
            )
            vae.save_pretrained(str(out / A.FOLDERS["vae"]))
        elif part == "evaluator":
            ev, info = train_evaluator(
                steps("evaluator"), progress, device, ckpt_dir=out, resume=resume, stop=stop
            )
            ev.save_pretrained(out / A.FOLDERS["evaluator"])
        elif part == "dcae":
            dcae, info = train_dcae(
                steps("dcae"), progress, device, ckpt_dir=out, resume=resume, stop=stop
            )
            dcae.save_pretrained(out / A.FOLDERS["dcae"])
        else:
            vae = _load_part(out, "vae", device)
            count = max(256, int(FLUX_TRAIN_IMAGES * min(scale * 10, 1.0)))
            latents, low_res, captions = encode_training_set(
                vae, count, progress, low_res=low_res_every > 0
            )
            transformer, text, info = train_flux(
                latents, captions, steps("flux"), progress, low_res, max(low_res_every, 1),
                ckpt_dir=out, resume=resume, stop=stop,
            )  # fmt: skip
            transformer.save_pretrained(str(out / A.FOLDERS["transformer"]))
            text.save_pretrained(out / A.FOLDERS["text_encoder"])
        _write_log(out, part, info, time.perf_counter() - t0, device)
        # Only now, with the part saved and logged, is its in-part checkpoint not needed.
        partial_state_path(out, part).unlink(missing_ok=True)
        logger.info("%s done in %.0f s: %s", part, time.perf_counter() - t0, info)
        if stop.requested:
            raise TrainingInterrupted(
                part, steps(part), steps(part), out, stop.signum or signal.SIGTERM
            )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Train the dcgen toy world (dcgen/assets/toy).")
    p.add_argument("--out", required=True, help="output folder (dcgen/assets/toy to ship)")
    p.add_argument("--parts", default=",".join(PARTS), help=f"comma list of {PARTS}")
    p.add_argument("--scale", type=float, default=1.0, help="multiply every step count")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (default 1, as the shipped files were trained: another count "
        "changes the summation order and the results)",
    )
    p.add_argument(
        "--low-res-every",
        type=int,
        default=0,
        help="train the base on half-size images every N-th step (0: single resolution)",
    )
    p.add_argument(
        "--device",
        default="cpu",
        help="cpu (default; at one thread bit for bit on the same CPU type) or cuda[:N] (not "
        "yet timed on a GPU; other kernels, so the results differ from the shipped files, "
        "as they do on another CPU (within noise there)",
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="keep the parts already finished in --out (same step counts), continue the "
        "interrupted one from its checkpoint, train the rest",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.threads < 1:
        p.error(f"--threads: expected a positive integer, got {args.threads}")
    try:
        device = torch.device(args.device)
    except RuntimeError:
        p.error(f"--device: expected cpu or cuda[:N], got {args.device!r}")
    if device.type not in ("cpu", "cuda"):
        p.error(f"--device: expected cpu or cuda[:N], got {args.device!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: this torch sees no CUDA GPU (use --device cpu)")
    torch.set_num_threads(args.threads)
    parts = tuple(s.strip() for s in args.parts.split(",") if s.strip())
    try:
        manifest = train(
            args.out,
            parts,
            args.scale,
            progress=not args.quiet,
            low_res_every=args.low_res_every,
            device=device,
            resume=args.resume,
        )
    except TrainingInterrupted as stop:
        print(f"{stop} (to continue: the same command with --resume)", file=sys.stderr)
        return stop.exit_status
    if manifest:
        print(dumps(manifest["metrics"], indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
