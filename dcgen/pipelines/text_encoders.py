"""A base pipeline's own text encoders, reused by dcgen's commands.

A FLUX or SANA user already has the text encoders on disk, inside the diffusers pipeline folder
of the base model (FLUX.1: ``text_encoder`` = CLIP-L with ``tokenizer``, ``text_encoder_2`` =
T5-XXL with ``tokenizer_2``; SANA: ``text_encoder`` = Gemma-2 with ``tokenizer``), each
registered in ``model_index.json`` as ``[library, class]``. DC-Gen changes neither, so:

- :func:`load_text_components` loads them from such a folder (by the classes it names);
- :func:`copy_text_components` puts them into an exported DC-Gen pipeline folder (copied or
  linked), so the folder is self-contained and ``from_pretrained`` loads them;
- :class:`PipelineTextEncoder` encodes captions with them exactly as the pipelines do
  (``DCGenFluxPipeline.encode_prompt`` / ``DCGenSanaPipeline.encode_prompt``), for
  ``dcgen precompute`` and ``dcgen generate``.
"""

from __future__ import annotations

import importlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from .._files import naming_write_errors, swap_in
from .base import register_components
from .flux import DCGenFluxPipeline
from .sana import DCGenSanaPipeline
from .toy import DCGenToyPipeline

__all__ = [
    "TEXT_COMPONENTS",
    "DEFAULT_MAX_SEQUENCE_LENGTH",
    "TextEncodersError",
    "PipelineTextEncoder",
    "check_text_components",
    "copy_text_components",
    "family_of_pipeline",
    "has_text_components",
    "load_text_components",
]

#: model_index.json component names of each family's text encoding, encoders before tokenizers.
TEXT_COMPONENTS: dict[str, tuple[str, ...]] = {
    "flux": ("text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2"),
    "sana": ("text_encoder", "tokenizer"),
    # the toy world's one caption-level encoder (dcgen demo's pipeline folder)
    "toy": ("text_encoder",),
}
#: T5 tokens of FLUX.1-dev (schnell uses 256) and Gemma tokens of SANA: the pipelines' defaults.
DEFAULT_MAX_SEQUENCE_LENGTH: dict[str, int] = {
    "flux": DCGenFluxPipeline.default_max_sequence_length,
    "sana": DCGenSanaPipeline.default_max_sequence_length,
    "toy": DCGenToyPipeline.default_max_sequence_length,
}

_PIPELINE_FAMILIES = {
    "DCGenFluxPipeline": "flux",
    "BaseFluxPipeline": "flux",
    "FluxPipeline": "flux",
    "DCGenSanaPipeline": "sana",
    "SanaPipeline": "sana",
    "DCGenToyPipeline": "toy",
}


def text_encoder_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the text encoders run in for a model in ``dtype``: bf16 instead of fp16, in
    which T5 overflows (inf activations)."""
    return torch.bfloat16 if dtype == torch.float16 else dtype


class TextEncodersError(ValueError):
    """A folder without the text components a family needs; the message names the folder."""


def _model_index(folder: Path) -> dict[str, Any]:
    index = folder / "model_index.json"
    if not index.is_file():
        raise TextEncodersError(
            f"{folder} is not a diffusers pipeline folder (no model_index.json); the text "
            "encoders come from one, e.g. the base model's FLUX.1-dev or SANA folder"
        )
    try:
        return json.loads(index.read_text())
    except json.JSONDecodeError as err:
        raise TextEncodersError(f"{index} is not valid JSON: {err}") from err


def _entry(index: dict[str, Any], name: str) -> tuple[str, str] | None:
    value = index.get(name)
    if isinstance(value, list) and len(value) == 2 and all(isinstance(v, str) for v in value):
        return value[0], value[1]
    return None


def family_of_pipeline(folder: str | Path) -> str:
    """'flux', 'sana' or 'toy' for a pipeline folder: by its class, else by the components it
    has."""
    index = _model_index(Path(folder))
    family = _PIPELINE_FAMILIES.get(index.get("_class_name", ""))
    if family is not None:
        return family
    if _entry(index, "text_encoder_2") is not None:
        return "flux"
    if _entry(index, "text_encoder") is not None:
        return "sana"
    raise TextEncodersError(
        f"{folder}: pipeline class {index.get('_class_name')!r} is not FLUX or SANA and it "
        "registers no text encoder"
    )


def has_text_components(folder: str | Path, family: str) -> bool:
    """Whether ``folder`` holds every text component of ``family`` (see check_text_components)."""
    try:
        _checked_entries(Path(folder), family)
    except TextEncodersError:
        return False
    return True


def _components_digest(folder: Path, family: str) -> str:
    """A sampled content digest (dcgen._files.sampled_digest) of the family's text components
    in a pipeline folder: the files that make the embeddings, not the transformer's or VAE's."""
    import hashlib

    from .._files import sampled_digest

    h = hashlib.sha256()
    for name in _components(family):
        if (folder / name).exists():
            h.update(f"{name}:{sampled_digest(folder / name)};".encode())
    return h.hexdigest()


def _components(family: str) -> tuple[str, ...]:
    if family not in TEXT_COMPONENTS:
        raise TextEncodersError(
            f"family: expected one of {sorted(TEXT_COMPONENTS)}, got {family!r}"
        )
    return TEXT_COMPONENTS[family]


def _checked_entries(folder: Path, family: str) -> dict[str, tuple[str, str]]:
    index = _model_index(folder)
    entries = {name: _entry(index, name) for name in _components(family)}
    missing = [n for n, e in entries.items() if e is None or not (folder / n).is_dir()]
    if missing:
        raise TextEncodersError(
            f"{folder} lacks the {family.upper()} text components {missing} (expected "
            f"{list(_components(family))}, each registered in model_index.json and present as "
            "a subfolder)"
        )
    return entries  # type: ignore[return-value]


def check_text_components(folder: str | Path, family: str) -> None:
    """Raise TextEncodersError naming what is missing unless ``folder`` holds every text
    component of ``family`` (registered in model_index.json and present as a subfolder)."""
    _checked_entries(Path(folder), family)


def load_text_components(
    folder: str | Path, family: str, dtype: torch.dtype | None = None
) -> dict[str, Any]:
    """The text encoders and tokenizers of the pipeline folder ``folder``, by the classes its
    model_index.json names (``dtype`` for the encoders; the stored dtype when None)."""
    folder = Path(folder)
    out: dict[str, Any] = {}
    for name, (library, cls_name) in _checked_entries(folder, family).items():
        try:
            cls = getattr(importlib.import_module(library), cls_name)
        except (ImportError, AttributeError) as err:
            raise TextEncodersError(
                f"{folder / 'model_index.json'}: {name} is {library}.{cls_name}, which this "
                f"environment cannot import ({err})"
            ) from err
        kwargs = {"dtype": dtype} if dtype is not None and name.startswith("text_encoder") else {}
        component = cls.from_pretrained(folder / name, **kwargs)
        if name.startswith("text_encoder"):
            component.eval().requires_grad_(False)
        out[name] = component
    return out


def copy_text_components(
    source: str | Path, out: str | Path, family: str, link: bool = False
) -> list[str]:
    """Copy (``link``: symlink, saving T5-XXL's 9.5 GB) the text components of ``family`` from
    the pipeline folder ``source`` into the pipeline folder ``out`` and register them in its
    model_index.json. Every subfolder is copied under a temporary name first, then all are
    swapped in together (components already there are replaced only then, and come back if a
    rename fails), and the index is replaced atomically: an interrupted or failed copy leaves
    no half component registered and no registered component missing."""
    source, out = Path(source).resolve(), Path(out)
    if source == out.resolve():
        raise TextEncodersError(f"copy_text_components: {out} is its own source; nothing to copy")
    entries = _checked_entries(source, family)
    _model_index(out)  # a pipeline folder, or a clear error before anything is copied
    staged: list[tuple[Path, Path]] = []
    try:
        for name in entries:
            tmp = out / f".{name}.tmp"
            _remove(tmp)  # a killed earlier copy's
            staged.append((tmp, out / name))
            with naming_write_errors(out / name, tmp):
                if link:
                    os.symlink(source / name, tmp, target_is_directory=True)
                else:
                    shutil.copytree(source / name, tmp, symlinks=False)
        swap_in(staged)
    except BaseException:
        for tmp, _ in staged:
            _remove(tmp)
        raise
    register_components(out, {name: list(entry) for name, entry in entries.items()})
    return list(entries)


def _remove(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.exists():
        shutil.rmtree(path)


class PipelineTextEncoder:
    """``captions -> {"prompt_embeds": (B, T, D), "pooled_prompt_embeds": (B, D')}`` (FLUX) or
    ``{"prompt_embeds", "prompt_attention_mask"}`` (SANA, with its instruction prefix unless
    ``complex_human_instruction=False``), computed with the text components of a pipeline
    folder by the functions the dcgen pipelines encode a text prompt with. The callable
    ``dcgen precompute --text-encoders`` and ``dcgen generate --prompt`` use."""

    def __init__(
        self,
        folder: str | Path | None = None,
        family: str | None = None,
        *,
        components: dict[str, Any] | None = None,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | None = None,
        max_sequence_length: int | None = None,
        complex_human_instruction: bool = True,
    ) -> None:
        if (folder is None) == (components is None):
            raise TextEncodersError("PipelineTextEncoder: pass a folder or components, not both")
        if folder is not None:
            family = family or family_of_pipeline(folder)
            components = load_text_components(folder, family, dtype)
        if family is None:
            raise TextEncodersError("PipelineTextEncoder: family is needed with components")
        _components(family)
        if family == "toy" and max_sequence_length is not None:
            raise TextEncodersError(
                "max_sequence_length: the toy text encoder pads every caption to its own "
                f"length; leave it unset (got {max_sequence_length})"
            )
        self.family = family
        self.device = torch.device(device)
        self.max_sequence_length = max_sequence_length or DEFAULT_MAX_SEQUENCE_LENGTH[family]
        self.complex_human_instruction = family == "sana" and complex_human_instruction
        self.components = dict(components or {})
        for module in self.components.values():
            if isinstance(module, torch.nn.Module):
                module.to(self.device)
        # What the embeddings depend on, for a latent cache's identity (dcgen precompute): the
        # family, token count and instruction setting, and the text components' files by
        # sampled contents. The folder's absolute path named them before: a copied project
        # refused its own cache, and weights rewritten in place were taken for the old ones.
        settings = f"{self.family}:{self.max_sequence_length}" + (
            ":instruction" if self.complex_human_instruction else ""
        )
        source = "folder" if folder else "in-memory"
        self.fingerprint_name = f"pipeline-text-encoders:{source}:{settings}"
        self.content_digest = None if folder is None else _components_digest(Path(folder), family)
        #: the name caches made before the content digest were identified by
        self.legacy_fingerprint_name = (
            f"pipeline-text-encoders:{Path(folder).resolve() if folder else 'in-memory'}:"
            + settings
        )

    @torch.no_grad()
    def __call__(self, captions: list[str], negative: bool = False) -> dict[str, torch.Tensor]:
        """Embeddings of ``captions``; ``negative``: as negative prompts (SANA: no prefix)."""
        from .flux import encode_clip_t5
        from .sana import encode_gemma, prompt_instruction

        c, captions = self.components, list(captions)
        if self.family == "toy":  # one module, captions in (its own fixed length)
            embeds, pooled = c["text_encoder"](captions)
            return {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}
        if self.family == "flux":
            embeds, pooled = encode_clip_t5(
                c["tokenizer"], c["text_encoder"], c["tokenizer_2"], c["text_encoder_2"],
                captions, self.device, self.max_sequence_length,
            )  # fmt: skip
            return {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}
        embeds, mask = encode_gemma(
            c["tokenizer"], c["text_encoder"], captions, self.device, self.max_sequence_length,
            prompt_instruction(self.complex_human_instruction, negative),
        )  # fmt: skip
        return {"prompt_embeds": embeds, "prompt_attention_mask": mask}
