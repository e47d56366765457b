"""Sampling and shipping a pipeline folder: `generate` and `quantize`."""

from __future__ import annotations

import argparse
import json
import math
import time
from collections import Counter
from pathlib import Path
from typing import Any

import torch

from dcgen._json import dumps

from .common import DTYPES, CLIError, _device, check_out_path

# -- generate ---------------------------------------------------------------------------------

PIPELINE_CLASSES = (
    "DCGenFluxPipeline",
    "DCGenSanaPipeline",
    "BaseFluxPipeline",
    "DCGenToyPipeline",
)
# diffusers' own folders of the base models load into the dcgen class of the same structure:
# FLUX.1 (AutoencoderKL, 2x2 packing) and SANA (its DC-AE, 1x1), for base-vs-DC-Gen comparisons.
DIFFUSERS_CLASSES = {"FluxPipeline": "BaseFluxPipeline", "SanaPipeline": "DCGenSanaPipeline"}
EMBED_NAMES = ("prompt_embeds", "pooled_prompt_embeds", "prompt_attention_mask")


def _load_pipeline(folder: Path, dtype: torch.dtype) -> Any:
    """The pipeline of ``folder`` on the CPU: the callers encode the text and swap in quantized
    linears before moving it to the device, so the GPU never holds the text encoders and the
    transformer at once, nor a 16-bit transformer that a quantized one replaces (NVFP4 FLUX
    on a 32 GB card)."""
    return _pipeline_class(folder).from_pretrained(folder, dtype=dtype)


def _pipeline_class(folder: Path) -> Any:
    """The dcgen pipeline class that loads ``folder``, by its model_index.json."""
    import dcgen.pipelines as pipelines

    index = folder / "model_index.json"
    if not index.is_file():
        raise FileNotFoundError(f"{folder} is not a pipeline folder (no model_index.json)")
    try:
        data = json.loads(index.read_text())
    except ValueError as err:
        raise CLIError(f"{index}: not valid JSON ({err})") from err
    if not isinstance(data, dict):
        raise CLIError(
            f"{index}: expected a JSON object with _class_name, got {type(data).__name__}"
        )
    if not (folder / "transformer" / "config.json").is_file():
        raise CLIError(f"{folder}: no transformer/config.json: not a complete pipeline folder")
    name = data.get("_class_name")
    name = DIFFUSERS_CLASSES.get(name, name)
    if name not in PIPELINE_CLASSES:
        known = [*PIPELINE_CLASSES, *DIFFUSERS_CLASSES]
        raise CLIError(f"{index}: pipeline class {name!r} is not one of {known}")
    return getattr(pipelines, name)


def _batched(t: torch.Tensor, name: str, ndim: int) -> torch.Tensor:
    """Add the batch dimension to one caption's tensor; check the rank."""
    if t.ndim == ndim - 1:
        t = t.unsqueeze(0)
    if t.ndim != ndim:
        raise CLIError(f"{name}: expected {ndim - 1} or {ndim} dims, got shape {tuple(t.shape)}")
    if t.shape[0] != 1:  # one caption per file: rows would be sampled, then not saved
        raise CLIError(
            f"{name}: expected one caption, shape {tuple(t.shape[1:])} or "
            f"{(1, *t.shape[1:])}, got {tuple(t.shape)}"
        )
    return t


def _prompt_kwargs(args: argparse.Namespace) -> dict[str, torch.Tensor]:
    """Pipeline keyword arguments from --prompt-embeds (plain file or text-embeddings table)."""
    from safetensors import SafetensorError, safe_open

    from dcgen.train.prepare import TEXT_EMBEDDINGS_FORMAT, TextEmbeddingTable

    path = Path(args.prompt_embeds)
    if not path.is_file():
        raise FileNotFoundError(f"prompt-embeddings file {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
            plain = {k: f.get_tensor(k) for k in f.keys() if "/" not in k}
    except (SafetensorError, OSError) as err:
        raise CLIError(f"{path} is not a readable safetensors file: {err}") from err
    kwargs: dict[str, torch.Tensor] = {}
    if meta.get("format") == TEXT_EMBEDDINGS_FORMAT:
        table = TextEmbeddingTable(path)
        caption = args.caption
        if caption is None:
            if len(table) != 1:
                raise CLIError(f"{path} holds {len(table)} captions: pick one with --caption")
            caption = table.captions[0]
        for prefix, text in (("", caption), ("negative_", args.negative_caption)):
            if text is None:
                continue
            for name, t in table.get(text).items():
                kwargs[prefix + name] = t.unsqueeze(0)
    else:
        if args.caption is not None or args.negative_caption is not None:
            raise CLIError(f"--caption needs a text-embeddings table; {path} is a plain file")
        kwargs = dict(plain)
    if "prompt_embeds" not in kwargs:
        raise CLIError(f"{path}: no prompt_embeds tensor (keys: {sorted(kwargs)})")
    known = {p + n for p in ("", "negative_") for n in EMBED_NAMES}
    unknown = sorted(set(kwargs) - known)
    if unknown:
        raise CLIError(f"{path}: unexpected tensors {unknown}; expected some of {sorted(known)}")
    ranks = {"prompt_embeds": 3, "pooled_prompt_embeds": 2, "prompt_attention_mask": 2}
    return {k: _batched(v, k, ranks[k.removeprefix("negative_")]) for k, v in kwargs.items()}


def _read_prompt_file(path: Path) -> list[str]:
    """--prompt-file: one prompt per line, blank lines skipped."""
    if path.is_dir():
        raise CLIError(f"--prompt-file {path}: is a folder; expected a text file")
    if not path.is_file():
        raise FileNotFoundError(f"--prompt-file {path}: no such file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise CLIError(f"--prompt-file {path}: expected a UTF-8 text file ({err.reason})") from err
    prompts = [line.strip() for line in text.splitlines()]
    prompts = [p for p in prompts if p]
    if not prompts:
        raise CLIError(f"--prompt-file {path}: expected one prompt per line, found none")
    return prompts


def _read_image(path: Path, option: str = "--image") -> Any:
    """``option``'s FILE as an RGB PIL image, read before any model loads."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    from .._images import wide_gray_to_8bit

    try:
        with Image.open(path) as opened:
            # as the picture is shown: a phone portrait's EXIF rotation (and masks line up)
            image = ImageOps.exif_transpose(opened)
            # 16-bit or float grayscale: PIL's convert("RGB") would clip it at 255 (white)
            return wide_gray_to_8bit(image).convert("RGB")
    except FileNotFoundError as err:
        raise CLIError(f"{option} {path}: no such file") from err
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as err:
        raise CLIError(f"{option} {path}: not an image PIL can read ({err})") from err


def _default_cfg_scale(folder: Path) -> float:
    """The classifier-free guidance scale the model of ``folder`` samples with by default, read
    before it loads: its pipeline class's rule (model_cfg_scale: SANA 4.5, 1 for a
    guidance-distilled transformer) on the folder's transformer config.json."""
    try:
        cls = _pipeline_class(folder)
    except (OSError, ValueError):
        return 1.0  # not a loadable folder: _load_pipeline names the problem
    config = folder / "transformer" / "config.json"
    return cls.model_cfg_scale(json.loads(config.read_text()) if config.is_file() else {})


def _check_text_source(args: argparse.Namespace) -> str | None:
    """--prompt TEXT needs text encoders: the pipeline folder's own, or --text-encoders DIR's.
    Checked before a 12B model loads; the other text options go with --prompt only. Returns
    the folder's family with --prompt (None without, or for a folder _load_pipeline refuses)."""
    from dcgen.pipelines.text_encoders import (
        TextEncodersError,
        check_text_components,
        family_of_pipeline,
    )

    if args.prompt is None:
        given = [o for o, v in (("--text-encoders", args.text_encoders),
                                ("--max-sequence-length", args.max_sequence_length),
                                ("--negative-prompt", args.negative_prompt)) if v is not None]  # fmt: skip
        if given:
            raise CLIError(f"{', '.join(given)}: these go with --prompt TEXT")
        return None
    pipeline_dir = Path(args.pipeline)
    if not (pipeline_dir / "model_index.json").is_file():
        return None  # _load_pipeline names the problem
    family = family_of_pipeline(pipeline_dir)
    try:
        check_text_components(args.text_encoders or pipeline_dir, family)
    except TextEncodersError as err:
        hint = (
            ""
            if args.text_encoders
            else "; pass --text-encoders DIR (the base model's diffusers folder, e.g. "
            "FLUX.1-dev's) or export with --text-encoders"
        )
        raise CLIError(f"--prompt TEXT: {err}{hint}; or give --prompt-embeds FILE") from err
    return family


ENCODE_CHUNK = 8  # prompts per text-encoder call: a long --prompt-file fits T5-XXL's memory


def _encode_text(
    pipe: Any, args: argparse.Namespace, family: str, device: str, dtype: torch.dtype
) -> dict[str, torch.Tensor]:
    """Encode --prompt (one or several: a batch; and --negative-prompt, or "" under --true-cfg)
    once for every seed, on ``device``, ENCODE_CHUNK prompts a call, the results kept on the
    CPU (the pipeline moves each call's rows); the caller then drops the encoders (T5-XXL:
    9.5 GB) before the model moves."""
    from dcgen.pipelines.text_encoders import (
        TEXT_COMPONENTS,
        PipelineTextEncoder,
        load_text_components,
        text_encoder_dtype,
    )

    enc_dtype = text_encoder_dtype(dtype)  # bf16 under --dtype fp16
    if args.text_encoders:
        components = load_text_components(args.text_encoders, family, enc_dtype)
    else:
        components = {n: getattr(pipe, n) for n in TEXT_COMPONENTS[family]}
        for module in components.values():
            if isinstance(module, torch.nn.Module):
                module.to(enc_dtype)
    encoder = PipelineTextEncoder(
        family=family, components=components, device=device,
        max_sequence_length=args.max_sequence_length,
        complex_human_instruction=getattr(pipe.config, "complex_human_instruction", True),
    )  # fmt: skip
    kwargs: dict[str, torch.Tensor] = {}
    negative = None
    if args.true_cfg > 1.0:
        negative = "" if args.negative_prompt is None else args.negative_prompt
    prompts = args.prompt if isinstance(args.prompt, list) else [args.prompt]
    for prefix, texts in (("", prompts), ("negative_", None if negative is None else [negative])):
        if texts is None:
            continue
        parts: dict[str, list[torch.Tensor]] = {}
        for start in range(0, len(texts), ENCODE_CHUNK):
            chunk = texts[start : start + ENCODE_CHUNK]
            for name, t in encoder(chunk, negative=bool(prefix)).items():
                parts.setdefault(name, []).append(t.cpu())
        for name, ts in parts.items():
            t = torch.cat(ts)
            kwargs[prefix + name] = t if name.endswith("mask") else t.to(dtype)
    return kwargs


def _pipeline_and_prompt(
    args: argparse.Namespace, device: str, dtype: torch.dtype
) -> tuple[Any, dict[str, torch.Tensor], list[tuple[Path, str | None, float]]]:
    """The pipeline, still on the CPU and without text encoders, the prompt's pipeline
    keyword arguments (--prompt-embeds read, or --prompt encoded on ``device``), and the
    --lora files left to attach: none once fused; all with --quantized, whose linears replace
    the weights a fusion would change (the caller attaches them after the swap). Input errors
    are raised before the model loads."""
    family = _check_text_source(args)
    loras = _lora_files(args)
    kwargs = _prompt_kwargs(args) if args.prompt_embeds is not None else {}
    pipe = _load_pipeline(Path(args.pipeline), dtype)
    if loras and getattr(args, "quantized", None) is None:
        _fuse_loras(pipe, loras)  # before encoding: a LoRA may carry text-encoder layers too
        loras = []
    if family is not None:  # --prompt TEXT (the load above refused a folder without a family)
        kwargs = _encode_text(pipe, args, family, device, dtype)
    _drop_text_components(pipe)  # with --prompt-embeds, a folder's own encoders go unused
    return pipe, kwargs, loras


def _lora_files(args: argparse.Namespace) -> list[tuple[Path, str | None, float]]:
    """(folder or file, weight name, scale) per --lora, checked before any model loads."""
    paths, scales = args.lora or [], args.lora_scale
    if not paths:
        if scales:
            raise CLIError("--lora-scale goes with --lora PATH")
        return []
    if scales and len(scales) not in (1, len(paths)):
        raise CLIError(
            f"--lora-scale: expected one value or one per --lora ({len(paths)}), got {len(scales)}"
        )
    if not scales or len(scales) == 1:
        scales = (scales or [1.0]) * len(paths)
    out = []
    for path, scale in zip((Path(p) for p in paths), scales, strict=True):
        if path.is_dir():
            name = "pytorch_lora_weights.safetensors"
            out.append((path, name if (path / name).is_file() else None, scale))
        elif path.is_file():
            out.append((path.parent, path.name, scale))
        else:
            raise FileNotFoundError(f"--lora {path}: no such file or folder")
    return out


def _load_loras(
    pipe: Any, loras: list[tuple[Path, str | None, float]], on_quantized: bool = False
) -> list[str]:
    """Load each LoRA as its own adapter and weight them; returns the adapter names. Plain
    transformers take diffusers' load_lora_weights (the DC-Gen pipelines skip the latent-facing
    layers' entries); quantized ones dcgen.pipelines.lora.load_lora_on_quantized (unmerged)."""
    from dcgen.pipelines.lora import load_lora_on_quantized

    names = [f"lora{i}" for i in range(len(loras))]
    for name, (folder, weight_name, _) in zip(names, loras, strict=True):
        if on_quantized:
            load_lora_on_quantized(pipe, str(folder), name, weight_name)
        else:
            pipe.load_lora_weights(str(folder), weight_name=weight_name, adapter_name=name)
    pipe.set_adapters(names, [scale for _, _, scale in loras])
    return names


def _lora_list(loras: list[tuple[Path, str | None, float]]) -> str:
    return ", ".join(
        f"{(folder / (w or '')).as_posix().rstrip('/')} x {s:g}" for folder, w, s in loras
    )


def _fuse_loras(pipe: Any, loras: list[tuple[Path, str | None, float]]) -> None:
    """Load the LoRAs, fuse them into the weights and drop the adapter layers: sampling then
    costs what it costs without a LoRA."""
    names = _load_loras(pipe, loras)
    # every component that took LoRA layers: diffusers fuses the transformer alone by default,
    # and unload_lora_weights then dropped a LoRA's text-encoder part without a word
    loadable = getattr(pipe, "_lora_loadable_modules", ["transformer"])
    components = [c for c in loadable if getattr(pipe, c, None) is not None]
    pipe.fuse_lora(components=components, adapter_names=names)
    pipe.unload_lora_weights()
    print(f"fused {len(loras)} LoRA(s): {_lora_list(loras)}")


def _attach_loras(pipe: Any, loras: list[tuple[Path, str | None, float]]) -> None:
    """Load the LoRAs onto a transformer with quantized linears, unmerged (a delta cannot be
    folded into 4- or 8-bit weights without re-quantizing): each adapted layer adds its
    16-bit low-rank product, a few percent of the layer's work at the usual ranks."""
    _load_loras(pipe, loras, on_quantized=True)
    print(f"attached {len(loras)} LoRA(s) to the quantized transformer: {_lora_list(loras)}")


def _drop_text_components(pipe: Any) -> None:
    """Unregister the pipeline's text encoders and tokenizers (prompts are embeddings by now),
    so moving the pipeline to the GPU does not take them along."""
    from dcgen.pipelines.text_encoders import TEXT_COMPONENTS

    names = [n for ns in TEXT_COMPONENTS.values() for n in ns if getattr(pipe, n, None) is not None]
    if names:
        pipe.register_modules(**dict.fromkeys(names))


def _grid(images: list[Any], cols: int | None = None) -> Any:
    """The images pasted row by row, ``cols`` a row (default: about square)."""
    from PIL import Image

    cols = cols or math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / cols)
    w, h = images[0].size
    out = Image.new("RGB", (cols * w, rows * h), (255, 255, 255))
    for i, im in enumerate(images):
        out.paste(im, ((i % cols) * w, (i // cols) * h))
    return out


def _model_dtype(name: str | None, device: str) -> torch.dtype:
    """--dtype, or the default: bf16 on CUDA, fp32 on the CPU."""
    if name is not None:
        return DTYPES[name]
    return torch.bfloat16 if device == "cuda" else torch.float32


ACCELERATE_MODES = ("auto", "off", "attention", "blocks", "graphs")


def _accelerate(transformer: torch.nn.Module, mode: str, device: str) -> None:
    """dcgen.accelerate as ``--accelerate`` asks; "auto" is "blocks" on CUDA (fused attention
    and block glue) and "off" on the CPU, where dcgen's ops run their references anyway."""
    import dcgen

    if mode == "auto":
        mode = "blocks" if device == "cuda" else "off"
    if mode == "off":  # ("graphs" off CUDA was refused before the model loaded)
        return
    dcgen.accelerate(transformer, blocks=mode in ("blocks", "graphs"), cuda_graphs=mode == "graphs")
    print(f"dcgen.accelerate: {mode}")


def _cmd_generate(args: argparse.Namespace) -> int:
    from dcgen.train.distributed import launch_env

    device = _device(args.device)
    rank, world, local_rank = launch_env()  # torchrun: the (prompt, seeds) items are split
    if device == "cuda" and world > 1:
        torch.cuda.set_device(local_rank)  # "cuda" is then this process's GPU
    dtype = _model_dtype(args.dtype, device)
    if args.accelerate == "graphs" and device != "cuda":  # said before the model loads
        raise CLIError(
            f"--accelerate graphs replays CUDA graphs: it needs --device cuda, got {device}"
        )
    out = Path(args.out)
    if out.suffix.lower() != ".png":
        raise CLIError(f"--out {out}: expected a .png file name")
    check_out_path(out, "--out")
    quantized = Path(args.quantized) if args.quantized is not None else None
    if quantized is not None and not quantized.is_file():  # before loading a 12B model
        raise FileNotFoundError(f"--quantized {quantized}: no such file")
    if quantized is not None:  # its header too: a traceback after the model had loaded
        from safetensors import SafetensorError

        from dcgen.quant.api import read_metadata

        try:
            read_metadata(quantized)
        except (SafetensorError, OSError) as err:
            raise CLIError(
                f"--quantized {quantized}: not a readable safetensors file ({err})"
            ) from err
        except ValueError as err:
            raise CLIError(f"--quantized {quantized}: {err}") from err
    _gather_prompts(args)
    _check_sampling_numbers(args)
    n_prompts = len(args.prompt) if args.prompt is not None else 1
    items = _work_items(n_prompts, args.seed, args.batch_size)[rank::world]
    if not items:
        print(f"process {rank} of {world}: no image to sample")
        return 0
    # the rows this process encodes: its own prompts only (a long --prompt-file, 8 GPUs)
    mine = sorted({i for i, _ in items})
    if args.prompt is not None and world > 1:
        args.prompt = [args.prompt[i] for i in mine]
    image_kwargs = _image_kwargs(args)
    _check_outputs_spare_inputs(args, out, n_prompts)
    pipe, kwargs = _generate_pipeline(args, device, dtype, quantized)
    row_of = {i: r for r, i in enumerate(mine)}
    prompt_kwargs = {  # one prompt's rows of the batched encodings; a negative serves them all
        i: {k: v if k.startswith("negative_") or n_prompts == 1 else v[row_of[i] : row_of[i] + 1]
            for k, v in kwargs.items()}
        for i in mine
    }  # fmt: skip
    images = _sample_items(pipe, args, items, prompt_kwargs, image_kwargs, out, n_prompts, device)
    total = n_prompts * len(args.seed)
    if total == 1 or rank > 0:
        if total > 1:
            print(f"process {rank} of {world}: {len(images)} of {total} images (process 0 "
                  "writes the grid)")  # fmt: skip
        return 0
    if world > 1:  # the grid needs every process's images: read back as they are written
        images = _await_images([
            _image_path(out, n_prompts, len(args.seed), i, seed)
            for i in range(n_prompts) for seed in args.seed
        ])  # fmt: skip
    _save_png(_grid(images, cols=len(args.seed) if n_prompts > 1 else None), out)
    what = f"{n_prompts} prompts x {len(args.seed)} seeds" if n_prompts > 1 else f"{total} seeds"
    print(f"wrote {out} ({what} in a grid)")
    return 0


def _await_images(paths: list[Path], poll_s: float = 0.5) -> list[Any]:
    """The images at ``paths`` once every one exists. Each is renamed into place whole by the
    process that sampled it, so existing means complete; torchrun stops the job if a process
    fails, so the wait ends either way."""
    missing = [p for p in paths if not p.is_file()]
    if missing:
        print(f"waiting for {len(missing)} image(s) from the other processes for the grid")
    while missing:
        time.sleep(poll_s)
        missing = [p for p in missing if not p.is_file()]
    return [_read_image(p, "grid image") for p in paths]


def _gather_prompts(args: argparse.Namespace) -> None:
    """--prompt-file appended to --prompt; exactly one prompt source; --batch-size checked."""
    if args.prompt_file is not None:
        args.prompt = (args.prompt or []) + _read_prompt_file(Path(args.prompt_file))
    if (args.prompt is None) == (args.prompt_embeds is None):
        raise CLIError(
            "give the prompt as --prompt TEXT (encoded by the pipeline's text encoders or "
            "--text-encoders DIR) or as --prompt-embeds FILE, one of them"
        )
    if args.prompt is not None and (args.caption or args.negative_caption):
        raise CLIError("--caption and --negative-caption pick entries of --prompt-embeds tables")
    if args.batch_size < 1:
        raise CLIError(f"--batch-size: expected a positive integer, got {args.batch_size}")


def _check_sampling_numbers(args: argparse.Namespace) -> None:
    """--steps, --shift, --guidance, --true-cfg and the image size checked before any model
    loads (the size's multiple of the autoencoder factor needs the loaded pipeline)."""
    if args.steps < 1:
        raise CLIError(f"--steps: expected a positive integer, got {args.steps}")
    for option, value in (("--height", args.height), ("--width", args.width)):
        if value < 1:
            raise CLIError(f"{option}: expected a positive number of pixels, got {value}")
    if args.shift is not None and not (math.isfinite(args.shift) and args.shift > 0):
        raise CLIError(f"--shift: expected a positive number, got {args.shift:g}")
    for option, value in (("--guidance", args.guidance), ("--true-cfg", args.true_cfg)):
        if value is not None and not math.isfinite(value):
            raise CLIError(f"{option}: expected a finite number, got {value:g}")
    seeds = getattr(args, "seed", None) or []
    repeated = sorted({s for s in seeds if seeds.count(s) > 1})
    if repeated:  # the second image overwrote the first's file, and the grid showed it twice
        raise CLIError(f"--seed: expected each seed once, got {repeated} more than once")
    for seed in seeds:
        try:  # a generator's range, checked before the model loads rather than after
            torch.Generator().manual_seed(seed)
        except (RuntimeError, OverflowError, ValueError) as err:
            raise CLIError(f"--seed {seed}: not a seed a torch.Generator takes ({err})") from err


def _work_items(n_prompts: int, seeds: list[int], batch_size: int) -> list[tuple[int, list[int]]]:
    """(prompt index, seed batch) in output order: one pipeline call each. Under torchrun each
    process takes every world-th item."""
    return [(i, seeds[s : s + batch_size])
            for i in range(n_prompts) for s in range(0, len(seeds), batch_size)]  # fmt: skip


def _image_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The pipeline's image-to-image / inpainting arguments from --image, --strength, --mask and
    --mask-blur, checked (and the strength against --steps) before any model loads."""
    if args.image is None:
        if args.strength is not None or args.mask is not None or args.mask_blur is not None:
            raise CLIError("--strength, --mask and --mask-blur go with --image FILE")
        return {}
    from dcgen.pipelines.base import DEFAULT_STRENGTH, MAX_MASK_BLUR
    from dcgen.sampling.flow import strength_start

    kwargs: dict[str, Any] = {"image": _read_image(Path(args.image))}
    if args.mask_blur is not None and args.mask is None:
        raise CLIError("--mask-blur feathers --mask FILE: give the mask too")
    if args.mask_blur is not None and not 0 <= args.mask_blur <= MAX_MASK_BLUR:  # NaN, inf too
        raise CLIError(
            f"--mask-blur: expected pixels in [0, {MAX_MASK_BLUR:g}], got {args.mask_blur:g}"
        )
    if args.mask is not None:
        kwargs.update(mask_image=_read_image(Path(args.mask), "--mask"), mask_blur=args.mask_blur)
    kwargs["strength"] = DEFAULT_STRENGTH if args.strength is None else args.strength
    try:
        strength_start(args.steps, kwargs["strength"])
    except ValueError as err:
        raise CLIError(f"--strength: {err}") from err
    return kwargs


def _generate_pipeline(
    args: argparse.Namespace, device: str, dtype: torch.dtype, quantized: Path | None
) -> tuple[Any, dict[str, torch.Tensor]]:
    """The pipeline, on ``device`` and accelerated, with the encoded prompts; sets
    ``args.true_cfg`` (the model's default guidance where none was given and a negative
    prompt can be had)."""
    default_cfg = _default_cfg_scale(Path(args.pipeline)) if args.true_cfg is None else 1.0
    if args.true_cfg is None:  # the embeddings path decides once it sees a negative (below)
        args.true_cfg = default_cfg if args.prompt is not None else 1.0
    if args.negative_prompt is not None and args.true_cfg <= 1.0:
        raise CLIError(
            f"--negative-prompt is used by classifier-free guidance: give --true-cfg > 1 "
            f"(got {args.true_cfg:g})"
        )
    # A negative caption turns on the model's default CFG below; without one it would go unused.
    if args.negative_caption is not None and args.true_cfg <= 1.0 and default_cfg <= 1.0:
        raise CLIError(
            f"--negative-caption is used by classifier-free guidance: give --true-cfg > 1 "
            f"(got {args.true_cfg:g})"
        )
    pipe, kwargs, unfused_loras = _pipeline_and_prompt(args, device, dtype)
    if args.true_cfg > 1.0 and args.prompt is None and "negative_prompt_embeds" not in kwargs:
        raise CLIError(
            f"--true-cfg {args.true_cfg:g} needs a negative prompt: these embeddings have none "
            "(give a table with negative_* tensors, or --negative-caption NAME)"
        )
    if default_cfg > 1.0 and args.prompt is None:
        if "negative_prompt_embeds" in kwargs:
            args.true_cfg = default_cfg
        else:
            print(
                f"note: this model samples with classifier-free guidance {default_cfg:g}, "
                "which needs a negative prompt; these embeddings have none (negative_* tensors "
                "or --negative-caption), so this runs without guidance (--true-cfg 1)"
            )
    if args.true_cfg <= 1.0 and "negative_prompt_embeds" in kwargs:
        print("note: the negative_* embeddings are not used without --true-cfg > 1")
    if quantized is not None:
        from dcgen.quant import load_quantized

        layers = load_quantized(pipe.transformer, quantized)
        print(f"loaded {len(layers)} quantized linears from {quantized}")
        if unfused_loras:
            _attach_loras(pipe, unfused_loras)
    pipe.to(device)
    _accelerate(pipe.transformer, args.accelerate, device)
    pipe.set_progress_bar_config(disable=args.no_progress)
    return pipe, kwargs


def _sample_items(
    pipe: Any,
    args: argparse.Namespace,
    items: list[tuple[int, list[int]]],
    prompt_kwargs: dict[int, dict[str, torch.Tensor]],
    image_kwargs: dict[str, Any],
    out: Path,
    n_prompts: int,
    device: str,
) -> list[Any]:
    """One pipeline call per (prompt, seed batch), each image written as its call ends (a
    killed job keeps what it finished; --skip-existing reads those back instead of sampling).
    Returns this process's images in order."""
    out.parent.mkdir(parents=True, exist_ok=True)
    images: list[Any] = []
    for i, seeds in items:
        paths = [_image_path(out, n_prompts, len(args.seed), i, seed) for seed in seeds]
        if args.skip_existing and all(p.is_file() for p in paths):
            kept = [_read_image(p, "--skip-existing") for p in paths]
            for path, image in zip(paths, kept, strict=True):
                if image.size != (args.width, args.height):  # another job's image
                    raise CLIError(
                        f"--skip-existing: {path} is {image.size[0]}x{image.size[1]}, this run "
                        f"samples {args.width}x{args.height}; remove it or choose another --out"
                    )
            print(f"kept {', '.join(map(str, paths))} (--skip-existing)")
            images.extend(kept)
            continue
        started = time.perf_counter()
        sampled = _sample_call(pipe, args, seeds, {**image_kwargs, **prompt_kwargs[i]})
        # PIL images are on the host: the GPU work of the call is done
        seconds = time.perf_counter() - started
        first = " (the first call: warm-up included)" if not images and device == "cuda" else ""
        print(f"sampled seed(s) {', '.join(map(str, seeds))}"
              + (f" of prompt {i}" if n_prompts > 1 else "")
              + f" in {seconds:.2f} s{first}")  # fmt: skip
        for path, image in zip(paths, sampled, strict=True):
            _save_png(image, path)
            print(f"wrote {path}")
        images.extend(sampled)
    return images


def _sample_call(pipe: Any, args: argparse.Namespace, seeds: list[int], kwargs: dict) -> list:
    """One pipeline call for ``seeds`` as one batch, each image from its own generator's noise:
    the images one call per seed gives, up to the batch's float rounding."""
    generators = [torch.Generator(device="cpu").manual_seed(seed) for seed in seeds]
    return pipe(
        height=args.height,
        width=args.width,
        num_inference_steps=args.steps,
        guidance_scale=args.guidance,
        true_cfg_scale=args.true_cfg,
        num_images_per_prompt=len(seeds),
        generator=generators if len(seeds) > 1 else generators[0],
        shift=args.shift,
        sampler=args.sampler,
        **kwargs,
    ).images


def _check_outputs_spare_inputs(args: argparse.Namespace, out: Path, n_prompts: int) -> None:
    """No PNG this run writes (the grid, each image) may be its --image or --mask: --out
    photo.png overwrote the photo it started from (and --skip-existing kept it as a result)."""
    inputs = {
        Path(p).resolve(): o for o, p in (("--image", args.image), ("--mask", args.mask)) if p
    }
    if not inputs:
        return
    outputs = [out] + [
        _image_path(out, n_prompts, len(args.seed), i, seed)
        for i in range(n_prompts) for seed in args.seed
    ]  # fmt: skip
    for path in outputs:
        option = inputs.get(path.resolve())
        if option is not None:
            raise CLIError(f"--out {out}: this run writes {path}, which is its {option} file")


def _image_path(out: Path, n_prompts: int, n_seeds: int, prompt: int, seed: int) -> Path:
    """The PNG of one (prompt, seed): --out itself for a single image, else
    <out>-p<prompt>-seed<seed>.png (each part only when there are several)."""
    if n_prompts * n_seeds == 1:
        return out
    parts = ([f"p{prompt}"] if n_prompts > 1 else []) + ([f"seed{seed}"] if n_seeds > 1 else [])
    return out.with_name(f"{out.stem}-{'-'.join(parts)}{out.suffix}")


def _save_png(image: Any, path: Path) -> None:
    """Written beside ``path`` and renamed into place: a killed job leaves no half PNG."""
    from dcgen._files import atomic_write

    atomic_write(path, lambda tmp: image.save(tmp, format="PNG"))


QUANT_FORMATS = ("fp8-row", "fp8-block128", "nvfp4-w4a4", "nvfp4-w4a16")


def _quant_config(args: argparse.Namespace) -> Any:
    """The dcgen.quant config of ``dcgen quantize``'s options."""
    from dcgen.quant import FP8Config, NVFP4Config
    from dcgen.quant.api import DEFAULT_EXCLUDE

    include = tuple(args.include) or (r".*",)
    exclude = DEFAULT_EXCLUDE + tuple(args.exclude)
    if args.format.startswith("fp8-"):
        if args.rank or args.smoothing is not None:
            raise CLIError(f"--rank and --smoothing apply to the nvfp4 formats, got {args.format}")
        return FP8Config(
            granularity=args.format.removeprefix("fp8-"),
            include=include,
            exclude=exclude,
            fast_accum=args.fast_accum,
        )
    if args.fast_accum:
        raise CLIError(f"--fast-accum applies to fp8-row, got {args.format}")
    return NVFP4Config(
        mode=args.format.removeprefix("nvfp4-"),
        rank=args.rank,
        include=include,
        exclude=exclude,
        smoothing_alpha=args.smoothing,
    )


def _cmd_quantize(args: argparse.Namespace) -> int:
    from dcgen._files import atomic_write
    from dcgen.quant import save_quantized
    from dcgen.quant.pipeline_quant import (
        capture_transformer_inputs,
        needs_calibration,
        quantize_transformer,
        summarize_report,
    )

    device = _device(args.device)
    dtype = _model_dtype(args.dtype, device)
    out = Path(args.out)
    if out.suffix != ".safetensors":
        raise CLIError(f"--out {out}: expected a .safetensors file name")
    check_out_path(out, "--out")
    if args.caption is not None and args.prompt_embeds is None:  # (6)
        raise CLIError("--caption picks an entry of a --prompt-embeds table: give the table")
    if args.report is not None and args.no_report:
        raise CLIError("--report and --no-report: give one of them, not both")
    config = _quant_config(args)
    report = not args.no_report
    report_path = Path(args.report) if args.report else out.with_suffix(".quality.json")
    if report:  # checked before any work: the report is written after the checkpoint
        if report_path.resolve() == out.resolve():
            raise CLIError(f"--report {report_path}: expected another file than --out {out}")
        check_out_path(report_path, "--report")
    elif not needs_calibration(config) and (
        args.prompt is not None or args.prompt_embeds is not None
    ):
        raise CLIError(
            "--prompt / --prompt-embeds: nothing uses them with --no-report and no --smoothing "
            "(they calibrate the smoothing and feed the quality report); drop them"
        )
    needs_calls = report or needs_calibration(config)
    if args.prompt is not None and args.prompt_embeds is not None:
        raise CLIError(
            "give the calibration prompt as --prompt TEXT or --prompt-embeds FILE, not both"
        )
    if needs_calls and args.prompt is None and args.prompt_embeds is None:
        raise CLIError(
            "a prompt (--prompt TEXT or --prompt-embeds FILE) is needed to calibrate "
            "(--smoothing) and for the quality report (skip the report with --no-report)"
        )
    default_cfg = _default_cfg_scale(Path(args.pipeline))
    if args.prompt is not None and default_cfg > 1.0:
        # calibrate on what sampling runs: SANA's guided steps see the empty negative prompt
        # in half their batch (embeddings take part only if the file holds a negative)
        args.true_cfg = default_cfg
    pipe, kwargs, _ = _pipeline_and_prompt(args, device, dtype)  # (no --quantized: all fused)
    pipe.to(device)
    pipe.set_progress_bar_config(disable=args.no_progress)
    calls = None
    if needs_calls:  # (prompt embeddings given for nothing else are not sampled with)
        calls = capture_transformer_inputs(
            pipe, args.calibration_steps, args.height, args.width, seed=args.seed, **kwargs
        )
    names, rep = quantize_transformer(pipe.transformer, config, calls, report=report)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_quantized(pipe.transformer, out)
    print(f"quantized {len(names)} linears to {args.format}; wrote {out}")
    if rep is None:
        return 0
    summary = summarize_report(rep)
    o = summary["output"]
    print(
        f"transformer output vs {str(dtype).removeprefix('torch.')}: relative error "
        f"{o['rel_err']:.3g}, cosine {o['cosine']:.6f} ({len(calls)} calls recorded, "
        f"the middle one compared)"
    )
    for block in summary["worst_blocks"][:2]:
        print(f"  {block['name']}: relative error {block['rel_err']:.3g} (block output)")
    for layer in summary["worst_layers"][:3]:
        print(f"  {layer['name']}: relative error {layer['rel_err']:.3g} (isolated)")
    text = dumps({"format": args.format, "summary": summary, "report": rep}, indent=1)
    atomic_write(report_path, lambda tmp: Path(tmp).write_text(text))
    print(f"wrote {report_path}")
    return 0


def _cmd_convert_quantized(args: argparse.Namespace) -> int:
    from dcgen.quant import adopt_quantized, quantized_modules, save_quantized

    src, out = Path(args.src), Path(args.out)
    if not src.is_file():
        raise FileNotFoundError(f"{src}: no such checkpoint file")
    if out.suffix != ".safetensors":
        raise CLIError(f"--out {out}: expected a .safetensors file name")
    check_out_path(out, "--out")
    if out.resolve() == src.resolve():  # it replaced the source checkpoint
        raise CLIError(f"--out {out}: expected another file than the checkpoint it converts")
    report_path = out.with_name(out.stem + ".weights.json")
    if args.report:  # checked before the conversion, not after it
        check_out_path(report_path, "--report's file")
    pipeline = Path(args.pipeline)
    config = pipeline / "transformer" if (pipeline / "transformer").is_dir() else pipeline
    if not (config / "config.json").is_file():
        raise CLIError(
            f"--pipeline {pipeline}: expected a FLUX pipeline folder (transformer/config.json) "
            "or a transformer folder (config.json)"
        )
    try:
        import diffusers
        from diffusers.quantizers.quantization_config import BFLQuantizationConfig
    except ImportError as err:
        raise CLIError(f"this diffusers has no BFL quantization support ({err})") from err
    # the transformer class the folder names (FLUX.1's, FLUX.2's, ...): diffusers converts
    # BFL's single-file keys for the classes it knows
    name = json.loads((config / "config.json").read_text()).get("_class_name", "")
    cls = getattr(diffusers, name, None)
    if cls is not None and hasattr(cls, "from_single_file") and not name.startswith("Flux"):
        # a SANA folder failed inside diffusers with "error: pos_embed"
        raise CLIError(
            f"{config / 'config.json'}: expected a FLUX transformer (Black Forest Labs "
            f"checkpoints are FLUX's), got {name!r}"
        )
    if cls is None or not hasattr(cls, "from_single_file"):
        raise CLIError(
            f"{config / 'config.json'}: transformer class {name!r} has no single-file loader in "
            "this diffusers (BFL checkpoints load into FLUX transformers)"
        )
    dtype = DTYPES[args.dtype]
    reference = _weights_reader(config) if args.report else None  # its errors before the load
    model = cls.from_single_file(
        str(src), config=str(config), quantization_config=BFLQuantizationConfig(dtype),
        dtype=dtype,
    )  # fmt: skip
    names = adopt_quantized(model, nvfp4_mode=args.nvfp4_mode)
    kinds = Counter(type(layer).__name__ for layer in quantized_modules(model).values())
    save_quantized(model, out)
    if args.report:
        from dcgen._files import atomic_write
        from dcgen.quant.adopt import weight_errors

        report = weight_errors(model, reference)
        path = report_path
        atomic_write(path, lambda tmp: Path(tmp).write_text(dumps(report, indent=1)))
        sm = report["summary"]
        print(f"weights vs {config}: {sm['layers']} layers, relative error mean "
              f"{sm['mean_rel_err']:.4f} / max {sm['max_rel_err']:.4f}, min cosine "
              f"{sm['min_cosine']:.5f} -> {path}")  # fmt: skip
    print(
        f"{len(names)} quantized linears ("
        + ", ".join(f"{n} {k}" for k, n in sorted(kinds.items()))
        + f"; NVFP4 {args.nvfp4_mode}) -> {out} ({out.stat().st_size / 2**30:.2f} GiB)"
    )
    return 0


def _weights_reader(folder: Path) -> Any:
    """``name -> tensor or None`` over a diffusers model folder's safetensors (one file, or
    shards with their index), read one tensor at a time."""
    from safetensors import safe_open

    from ..autoencoders.checkpoint import CheckpointError, read_shard_index

    index = folder / "diffusion_pytorch_model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = read_shard_index(index)
        except CheckpointError as err:
            raise CLIError(f"--report: {err}") from err
    else:
        single = folder / "diffusion_pytorch_model.safetensors"
        if not single.is_file():
            raise CLIError(f"--report: no safetensors weights in {folder}")
        with safe_open(str(single), framework="pt") as f:
            weight_map = dict.fromkeys(f.keys(), single.name)
    opened: dict[str, Any] = {}  # one memory-mapped handle per shard, not one per tensor

    def read(name: str) -> Any:
        file = weight_map.get(name)
        if file is None:
            return None
        if file not in opened:
            opened[file] = safe_open(str(folder / file), framework="pt")
        return opened[file].get_tensor(name)

    return read
