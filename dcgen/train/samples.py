"""Sample grids during training (``TrainConfig.sample_every``).

Every ``sample_every`` optimizer steps, and once at the end, the main process writes
``out_dir/samples/step-XXXXXXXX.png``: ``sample_count`` images side by side, each drawn with
the DC-Gen pipeline (``sample_steps`` steps: Euler for FLUX, SANA's DPM-Solver++) from a fixed
seed (``cfg.seed + i``) and the text embeddings of the i-th usable sample of the training data,
so grids of successive steps are directly comparable.

- The run's own transformer is used, switched to eval mode under ``torch.no_grad`` and put back
  in the mode it was in afterwards. The noise comes from per-image CPU generators and the global
  RNG state is forked around the call, so sampling never changes what training draws: a run with
  sampling ends with the same weights as one without.
- Images are decoded with the run's DC-AE when one can be loaded: ``cfg.dcae`` as a diffusers /
  original folder with weights (``DCAE.from_pretrained``). A preset name alone has no weights,
  so it (like no ``cfg.dcae`` at all, or a folder that fails to load) gives no decoder; the grid
  then shows a *latent visualisation* instead: the first three latent channels as RGB (channel
  0 repeated when there are fewer), each image normalised by its own per-channel mean and three
  standard deviations, upscaled with nearest-neighbour to at least 64 pixels. The file name and
  layout are the same either way; the PNG's ``dcgen:decoded`` text chunk says which it is.
- Under FSDP the forward is collective, so every rank samples and only rank 0 writes; under DDP
  (or one process) only rank 0 samples, on the unwrapped module.
- Models sampled with classifier-free guidance (SANA: the pipeline's ``default_true_cfg_scale``)
  are previewed with it, against the empty prompt's embeddings, when precompute wrote them
  (``null_text``, dcgen.train.null_text): unguided SANA images say little about the run.
  Without them (or for guidance-distilled FLUX) the previews are unguided.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .._files import atomic_write
from .config import TrainConfig
from .null_text import load_null_text, null_text_path

logger = logging.getLogger(__name__)

__all__ = ["SAMPLES_DIR", "SampleWriter", "latent_preview", "load_sample_dcae"]

SAMPLES_DIR = "samples"


def load_sample_dcae(spec: str | None, device: torch.device) -> Any:
    """The DC-AE to decode samples with, or None (no spec, a preset without weights, or a folder
    that does not load: logged, never raised)."""
    if spec is None:
        return None
    path = Path(spec)
    if not path.exists():
        logger.info("samples: dcae %r is not a folder with weights: showing latents", spec)
        return None
    try:
        from dcgen.autoencoders import DCAE

        return DCAE.from_pretrained(path, device=device).eval()
    except Exception as err:  # noqa: BLE001 - sampling must never stop a training run
        logger.warning("samples: could not load dcae %s (%s): showing latents", spec, err)
        return None


def latent_preview(latents: torch.Tensor, min_size: int = 64) -> torch.Tensor:
    """(B, C, h, w) latents -> (B, 3, H, W) images in [-1, 1] (see the module docstring)."""
    x = latents.detach().float().cpu()
    if x.shape[1] >= 3:
        x = x[:, :3]
    else:
        x = torch.cat([x, x[:, :1].expand(-1, 3 - x.shape[1], -1, -1)], dim=1)
    mean = x.mean(dim=(2, 3), keepdim=True)
    std = x.std(dim=(2, 3), keepdim=True).clamp_min(1e-6) if x[0, 0].numel() > 1 else 1.0
    x = ((x - mean) / (3 * std)).clamp(-1, 1)
    scale = max(1, -(-min_size // max(x.shape[-2:])))
    return F.interpolate(x, scale_factor=scale, mode="nearest") if scale > 1 else x


class SampleWriter:
    """``writer(step)`` samples the grid of ``step`` and (on rank 0) saves it; see module doc."""

    def __init__(
        self,
        transformer: nn.Module,
        dataset: Any,
        cfg: TrainConfig,
        run_dir: str | Path,
        *,
        is_main: bool = True,
        collective: bool = False,
        device: torch.device | str = "cpu",
    ) -> None:
        self.transformer = transformer
        self.cfg = cfg
        self.dir = Path(run_dir) / SAMPLES_DIR
        self.is_main = is_main
        self.collective = collective
        self.device = torch.device(device)
        self.dcae = None
        self._dcae_loaded = False
        # Fixed prompts: the first samples that share the first sample's latent shape.
        first = dataset[0]
        shape = tuple(first["dcae_latent"].shape)
        picked = []
        for i in range(min(len(dataset), 64)):
            s = dataset[i]
            if tuple(s["dcae_latent"].shape) == shape:
                picked.append(s)
            if len(picked) == cfg.sample_count:
                break
        self.latent_shape = shape
        self.prompt_embeds = torch.stack([s["prompt_embeds"].float() for s in picked])
        pooled = [s.get("pooled_prompt_embeds") for s in picked]
        self.pooled = None if pooled[0] is None else torch.stack([p.float() for p in pooled])
        # SANA's padded captions: sampled with their mask, as the pipelines are used
        masks = [s.get("prompt_attention_mask") for s in picked]
        self.mask = None if masks[0] is None else torch.stack(masks)
        null_path = null_text_path(cfg)
        self.null = load_null_text(null_path) if null_path.is_file() else None

    @property
    def active(self) -> bool:
        return self.is_main or self.collective

    def due(self, step: int, total: int) -> bool:
        every = self.cfg.sample_every
        return every is not None and (step % every == 0 or step == total)

    def path(self, step: int) -> Path:
        return self.dir / f"step-{step:08d}.png"

    def _pipeline(self) -> Any:
        from dcgen.adapters import adapter_for
        from dcgen.pipelines import DCGenFluxPipeline, DCGenSanaPipeline

        if not self._dcae_loaded:
            self.dcae = load_sample_dcae(self.cfg.dcae, self.device)
            self._dcae_loaded = True
        adapter = adapter_for(self.transformer)
        cls = DCGenSanaPipeline if type(adapter).__name__.lower().startswith("sana") else None
        cls = cls or DCGenFluxPipeline
        shift_rule = self.cfg.shift_rule
        extra = {}
        if cls is DCGenSanaPipeline:  # the solver SANA is sampled with (dcgen.sampling.dpm)
            from .export import default_scheduler

            extra["scheduler"] = default_scheduler("sana")
        pipe = _LatentOK.make(cls)(self.transformer, vae=self.dcae, shift_rule=shift_rule, **extra)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    @torch.no_grad()
    def __call__(self, step: int) -> Path | None:
        if not self.active:
            return None
        t = self.transformer
        was_training = t.training
        t.eval()
        try:
            with torch.random.fork_rng(devices=[]):
                images, decoded = self._sample()
        finally:
            t.train(was_training)
        if not self.is_main:
            return None
        from PIL.PngImagePlugin import PngInfo

        from dcgen.toy.images import side_by_side, to_pil

        pils = [to_pil(x) for x in images]
        labels = [f"seed {self.cfg.seed + i}" for i in range(len(pils))]
        grid = side_by_side(pils, labels)
        self.dir.mkdir(parents=True, exist_ok=True)
        info = PngInfo()
        info.add_text("dcgen:decoded", "dcae" if decoded else "latent-preview")
        info.add_text("dcgen:step", str(step))
        out = self.path(step)
        # a failed save left a visible step-N.tmp.png behind
        atomic_write(out, lambda tmp: grid.save(tmp, format="PNG", pnginfo=info))
        return out

    def _sample(self) -> tuple[torch.Tensor, bool]:
        pipe = self._pipeline()
        c, h, w = self.latent_shape
        f = pipe.ae_factor
        n = self.prompt_embeds.shape[0]
        gens = [torch.Generator().manual_seed(self.cfg.seed + i) for i in range(n)]
        noise = torch.stack([torch.randn(c, h, w, generator=g) for g in gens])
        shift = self.cfg.shift_constant if self.cfg.shift_rule == "constant" else None
        decoded = self.dcae is not None
        out = pipe(
            prompt_embeds=self.prompt_embeds.to(self.device),
            pooled_prompt_embeds=None if self.pooled is None else self.pooled.to(self.device),
            prompt_attention_mask=None if self.mask is None else self.mask.to(self.device),
            height=h * f,
            width=w * f,
            num_inference_steps=self.cfg.sample_steps,
            latents=noise.to(self.device),
            shift=shift,
            output_type="pt" if decoded else "latent",
            **self._guidance(n),
        ).images
        if decoded:
            return out.float().cpu() * 2 - 1, True  # "pt" images are in [0, 1]
        return latent_preview(out), False

    def _guidance(self, n: int) -> dict[str, Any]:
        """With the empty prompt's embeddings: them as the negative prompt, the CFG scale left
        to the pipeline's default (SANA 4.5, guidance-distilled FLUX none). Without: unguided
        (SANA's default would warn at every grid for want of a negative)."""
        if self.null is None:
            return {"true_cfg_scale": 1.0}
        names = {"prompt_embeds": "negative_prompt_embeds",
                 "pooled_prompt_embeds": "negative_pooled_prompt_embeds",
                 "prompt_attention_mask": "negative_prompt_attention_mask"}  # fmt: skip
        out: dict[str, Any] = {}
        for name, t in self.null.items():
            if name in names:
                value = t.float() if t.is_floating_point() else t
                out[names[name]] = value.unsqueeze(0).expand(n, *t.shape).to(self.device)
        return out


class _LatentOK:
    """Pipeline subclasses that run without a vae when asked for latents only (the DC-Gen
    pipelines insist on one in check_components)."""

    _cache: dict[type, type] = {}

    @classmethod
    def make(cls, base: type) -> type:
        if base not in cls._cache:

            def check_components(self: Any) -> None:
                if self.vae is not None:
                    base.check_components(self)

            cls._cache[base] = type(
                f"_Sample{base.__name__}", (base,), {"check_components": check_components}
            )
        return cls._cache[base]
