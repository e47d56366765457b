"""Turn post-training outputs into one self-contained diffusers pipeline folder.

Inputs are what the stages write: a transformer folder (the base model, or the adapted one
stages 1-2 save), optionally a latent-layers file (the new embedder + head) and a LoRA folder
(stage 3). ``export_pipeline`` applies them in that order, fuses the LoRA into the base weights
(no peft needed at inference), and saves transformer + DC-AE + scheduler + model_index.json
through the pipeline's own ``save_pretrained``, so ``DCGenFluxPipeline.from_pretrained(out)``
(or ``DCGenSanaPipeline``) loads it.

Latent-layers file (``latent_layers.safetensors``)::

    tensors   "embedder.<param>"  the token embedder's state (FLUX x_embedder Linear,
                                  SANA patch_embed.proj Conv2d): "embedder.weight", "embedder.bias"
              "head.<param>"      the output head (proj_out Linear): "head.weight", "head.bias"
    metadata  {"format": "dcgen.latent_layers",
               "family": "FluxTransformer2DModel" | "SanaTransformer2DModel",
               "latent_channels": "<int>", "patch_size": "<int>", ...}  (all strings)

``family`` is the transformer class name, as ``dcgen.train.stages`` writes it (so the stages and
this module read each other's files); the short names "flux" / "sana" are accepted on reading.

The embedder/head live outside peft (docs/method.md section 5), so the LoRA file never holds them.
"""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path
from typing import Any

import torch

from .._files import atomic_folder
from ..adapters import adapter_for
from ..adapters.provenance import dcae_factor_mismatch
from .latent_layers import (
    LATENT_LAYERS_FORMAT,
    LATENT_LAYERS_NAME,
    TRANSFORMER_CLASSES,
    LatentLayersError,
    family_of,
    load_latent_layers,
    read_latent_layers_metadata,
    save_latent_layers,
)
from .stages import load_transformer as load_diffusers_transformer
from .stages import transformer_folder

logger = logging.getLogger(__name__)

__all__ = [
    "LATENT_LAYERS_FORMAT",
    "LATENT_LAYERS_NAME",
    "ExportError",
    "default_scheduler",
    "export_pipeline",
    "family_of",
    "load_latent_layers",
    "load_transformer",
    "read_latent_layers_metadata",
    "save_latent_layers",
]


class ExportError(LatentLayersError):
    """Inputs that cannot be combined into a pipeline; the message names the file."""


# -- transformer and scheduler ----------------------------------------------------------------


def _transformer_folder(path: Path) -> Path:
    """Accept the transformer folder itself, or a folder holding ``transformer/`` (a stage's
    out_dir or a diffusers pipeline folder)."""
    folder = transformer_folder(path)
    if (folder / "config.json").is_file():
        return folder
    if not path.exists():
        raise FileNotFoundError(f"transformer folder {path} does not exist")
    raise ExportError(
        f"{path} is not a diffusers transformer folder (no config.json, no transformer/config.json)"
    )


def _loaded_weight_files(folder: Path) -> list[Path]:
    """The safetensors files ``load_transformer`` reads (no variant): a shard index's shards,
    else the single file; a variant beside them (``*.fp16.safetensors``) is never loaded."""
    from ..autoencoders.checkpoint import (
        CheckpointError,
        index_name,
        read_shard_index,
        weights_name,
    )

    index = folder / index_name(None)
    if index.is_file():
        try:
            shards = read_shard_index(index).values()
        except CheckpointError as err:
            raise ExportError(str(err)) from err
        return sorted({folder / name for name in shards})
    single = folder / weights_name(None)
    # Neither (variant files only): every safetensors file there is the best guess left.
    return [single] if single.is_file() else sorted(folder.glob("*.safetensors"))


def _latent_layers_of_lora(
    lora_dir: str | Path | None, latent_layers: str | Path | None
) -> str | Path | None:
    """The latent-layers file to export: the one given, else the one a stage-3 folder keeps
    beside its LoRA. Stage 3 trains the embedder and head with the LoRA; without
    ``latent_layers`` the export paired that LoRA with the transformer folder's (stage 2's)
    layers, silently. A different file given explicitly is used, with a warning."""
    if lora_dir is None:
        return latent_layers
    beside = Path(lora_dir) / LATENT_LAYERS_NAME
    if not beside.is_file():
        return latent_layers
    if latent_layers is None:
        logger.info("latent layers: %s (trained with the LoRA)", beside)
        return beside
    if Path(latent_layers).resolve() != beside.resolve():
        logger.warning(
            "latent layers %s are not the ones trained with the LoRA (%s): the LoRA was fit "
            "to those; pass that file (or none) unless this pairing is intended",
            latent_layers, beside,
        )  # fmt: skip
    return latent_layers


def _stored_dtype(folder: Path) -> torch.dtype:
    """The dtype most of a transformer folder's floating-point weights are stored in (float32
    without safetensors files), from the safetensors headers: no tensor is read."""
    from safetensors import safe_open

    from ..autoencoders.checkpoint import SAFETENSORS_DTYPES, stored_dtype

    shapes: dict[str, torch.Tensor] = {}
    for file in _loaded_weight_files(folder):
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open has no __iter__)
                piece = f.get_slice(key)
                dtype = SAFETENSORS_DTYPES.get(piece.get_dtype())
                if dtype is not None and dtype.is_floating_point:  # meta: no memory
                    shapes[f"{file.name}:{key}"] = torch.empty(
                        piece.get_shape(), dtype=dtype, device="meta"
                    )
    return stored_dtype(shapes)


def load_transformer(
    path: str | Path, family: str | None = None, dtype: torch.dtype | None = None
) -> tuple[torch.nn.Module, str]:
    """Load a FLUX or SANA transformer folder (or a folder holding ``transformer/``); the family
    comes from config.json's _class_name unless given. Returns (transformer, family)."""
    folder = _transformer_folder(Path(path))
    config = json.loads((folder / "config.json").read_text())
    class_name = config.get("_class_name")
    if family is None:
        matches = [f for f, name in TRANSFORMER_CLASSES.items() if name == class_name]
        if not matches:
            raise ExportError(
                f"{folder}/config.json: _class_name {class_name!r} is not one of "
                f"{sorted(TRANSFORMER_CLASSES.values())}; pass family= (dcgen export --family) to force one"
            )
        family = matches[0]
    if family not in TRANSFORMER_CLASSES:
        raise ExportError(f"family: expected one of {sorted(TRANSFORMER_CLASSES)}, got {family!r}")
    model = load_diffusers_transformer(
        folder, dtype=dtype or torch.float32, class_name=TRANSFORMER_CLASSES[family]
    )
    logger.info("loaded %s from %s", type(model).__name__, folder)
    return model.eval(), family


def default_scheduler(
    family: str, source: str | Path | None = None, shift: float | None = None
) -> Any:
    """The scheduler of an exported pipeline (it sets the shift and, by its kind, the sampler).

    A ``scheduler/`` folder beside the source transformer folder (a diffusers pipeline folder
    such as FLUX.1-dev's or SANA's) is reused: an Euler one as is (unless ``shift`` is given), a
    SANA folder's DPM-Solver++ (flow sigmas) as is with ``shift`` as its flow_shift, so the
    DC-Gen model samples with its base model's solver (a DPM config dcgen's solver does not
    implement becomes an Euler scheduler with its flow shift). Otherwise FLUX gets FLUX.1's
    dynamic shifting (mu linear in the token count, 0.5 at 256 tokens to 1.15 at 4096: a 4K
    f64c128 model at 4096 tokens gets the shift base FLUX uses at 1K), SANA the DPM-Solver++
    its checkpoints ship, at flow shift ``shift`` (default 3.0 as SANA 1K ships). ``shift``
    for FLUX switches to a constant shift instead.
    """
    from diffusers import DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler

    # source is the transformer folder; a pipeline folder keeps scheduler/ beside it.
    cand = None if source is None else Path(source).parent / "scheduler"
    if cand is not None and (cand / "scheduler_config.json").is_file():
        config = json.loads((cand / "scheduler_config.json").read_text())
        kind = config.get("_class_name", "FlowMatchEulerDiscreteScheduler")
        if kind == "FlowMatchEulerDiscreteScheduler" and shift is None:
            logger.info("reusing scheduler config from %s", cand)
            return FlowMatchEulerDiscreteScheduler.from_pretrained(cand)
        if kind == "DPMSolverMultistepScheduler":
            from ..pipelines.base import scheduler_constant_shift
            from ..sampling.dpm import dpm_settings_from_config

            flow_shift = scheduler_constant_shift(config) if shift is None else float(shift)
            try:
                dpm_settings_from_config(config)
            except ValueError as err:
                # from_pretrained into an Euler class would drop flow_shift and keep 1.0
                logger.warning("%s: %s; exporting an Euler scheduler with flow shift %g",
                               cand, err, flow_shift)  # fmt: skip
                return FlowMatchEulerDiscreteScheduler(shift=flow_shift)
            logger.info("reusing the DPM-Solver++ scheduler of %s (flow shift %g)",
                        cand, flow_shift)  # fmt: skip
            return DPMSolverMultistepScheduler.from_pretrained(cand, flow_shift=flow_shift)
    if family == "sana":
        from ..pipelines.sana import SANA_FLOW_SHIFT

        # the scheduler SANA checkpoints ship and are sampled with (diffusers' SANA conversion)
        return DPMSolverMultistepScheduler(
            flow_shift=SANA_FLOW_SHIFT if shift is None else float(shift), use_flow_sigmas=True,
            prediction_type="flow_prediction",
        )  # fmt: skip
    if shift is None:
        return FlowMatchEulerDiscreteScheduler(
            use_dynamic_shifting=True,
            base_shift=0.5,
            max_shift=1.15,
            base_image_seq_len=256,
            max_image_seq_len=4096,
        )
    return FlowMatchEulerDiscreteScheduler(shift=float(shift))


# -- export -----------------------------------------------------------------------------------


def export_pipeline(
    transformer_dir: str | Path,
    dcae: str | Path | Any,
    out_dir: str | Path,
    lora_dir: str | Path | None = None,
    latent_layers: str | Path | None = None,
    dtype: torch.dtype | None = None,
    family: str | None = None,
    *,
    shift_rule: str = "auto",
    shift: float | None = None,
    lora_scale: float = 1.0,
    text_encoders: str | Path | None = None,
    link_text_encoders: bool = False,
) -> Path:
    """Write a complete pipeline folder to ``out_dir`` and return its path.

    ``dcae``: a DC-AE folder / original checkpoint, or a loaded ``DCAE``. ``latent_layers``: a
    latent-layers file (applied first, replacing the layers when the channel count differs).
    ``lora_dir``: a folder with ``pytorch_lora_weights.safetensors`` (loaded, then fused with
    ``lora_scale``); its ``latent_layers.safetensors`` (a stage-3 folder's) is the default
    ``latent_layers``. The transformer and DC-AE load in ``dtype`` (default float32), and
    fused weights are the float32 sum rounded once: a LoRA's float32 delta is added to weights
    stored in ``dtype``, or to a float32 load of weights stored wider, cast at the end. The
    transformer's latent channels must equal the DC-AE's. ``text_encoders``: a diffusers
    pipeline folder (the base model's) whose text encoders and tokenizers are copied into the
    output (symlinked with ``link_text_encoders``), so the pipeline encodes text prompts itself.
    """
    from ..autoencoders import DCAE
    from ..pipelines import DCGenFluxPipeline, DCGenSanaPipeline, DCGenToyPipeline
    from ..pipelines.text_encoders import (
        TextEncodersError,
        check_text_components,
        copy_text_components,
        family_of_pipeline,
    )
    from .lora import fuse_lora, load_lora

    target = dtype or torch.float32
    # Loaded in ``target`` (loading in float32 and casting at the end held twice a bf16 FLUX,
    # 48 GB, for weights that are only cast), except when a LoRA is fused into weights stored
    # wider: those are summed in float32 and rounded once at the end. Weights stored in
    # ``target`` are exact in it, and the fuse adds a float32 delta to them with one rounding.
    latent_layers = _latent_layers_of_lora(lora_dir, latent_layers)
    load_dtype = target
    stored = _stored_dtype(_transformer_folder(Path(transformer_dir)))
    if lora_dir is not None and stored != target:
        load_dtype = torch.float32
    transformer, family = load_transformer(transformer_dir, family=family, dtype=load_dtype)
    text_family = family
    if text_encoders is not None:
        if Path(text_encoders).resolve() == Path(out_dir).resolve():
            raise ExportError(f"--text-encoders {text_encoders} is the output folder itself")
        try:
            # the toy world's caption encoder serves its FLUX-architecture model
            if family == "flux" and family_of_pipeline(text_encoders) == "toy":
                text_family = "toy"
            check_text_components(text_encoders, text_family)
        except TextEncodersError as err:
            raise ExportError(f"--text-encoders: {err}") from err
    adapter = adapter_for(transformer)
    if latent_layers is not None:
        load_latent_layers(adapter, latent_layers)
    if lora_dir is not None:
        # float32 factors: the fuse adds their exact delta to the weights, one rounding
        load_lora(transformer, lora_dir, float32_factors=load_dtype != torch.float32)
        fuse_lora(transformer, scale=lora_scale)
        logger.info("fused LoRA from %s (scale %g)", lora_dir, lora_scale)

    if isinstance(dcae, DCAE):
        # a copy when it is to be cast: the caller's model keeps its dtype (the cast is lossy)
        vae = dcae if dtype is None or dcae.dtype == dtype else copy.deepcopy(dcae)
    else:
        vae = DCAE.from_pretrained(dcae, dtype=target)
    if adapter.latent_channels != vae.latent_channels:
        raise ExportError(
            f"the transformer takes {adapter.latent_channels}-channel latents but the DC-AE "
            f"{dcae if not isinstance(dcae, DCAE) else ''} has {vae.latent_channels}; pass the "
            "DC-AE the model was trained with (and --latent-layers for a base transformer)"
        )
    named = "the DC-AE" if isinstance(dcae, DCAE) else f"the DC-AE {dcae}"
    mismatch = dcae_factor_mismatch(transformer, vae.spatial_compression_ratio, named)
    if mismatch:  # same channels, another grid: the pipeline sampled on the wrong one
        raise ExportError(mismatch)
    if dtype is not None:
        transformer.to(dtype)
        vae.to(dtype)
    scheduler = default_scheduler(
        family, source=_transformer_folder(Path(transformer_dir)), shift=shift
    )
    classes = {"flux": DCGenFluxPipeline, "sana": DCGenSanaPipeline, "toy": DCGenToyPipeline}
    cls = classes[text_family]
    pipe = cls(transformer, vae=vae, scheduler=scheduler, shift_rule=shift_rule)
    out = Path(out_dir)

    def write(folder: Path) -> None:
        pipe.save_pretrained(folder)
        if text_encoders is not None:
            names = copy_text_components(text_encoders, folder, text_family,
                                         link=link_text_encoders)  # fmt: skip
            logger.info("%s text components %s from %s", "linked" if link_text_encoders else
                        "copied", names, text_encoders)  # fmt: skip

    # the whole folder is built beside out_dir and swapped in: an export killed half way leaves
    # the previous pipeline (or none), never a folder that loads with a missing component
    atomic_folder(out, write)
    logger.info("exported %s to %s", cls.__name__, out)
    return out
