"""DC-AE checkpoint key conversion and file IO.

Three key layouts exist:

* ``dcgen``: this package's module tree (see coders.py); LiteMLA keeps one fused ``qkv`` conv.
* ``diffusers``: ``AutoencoderDC``. The fused qkv is stored as its three contiguous thirds
  ``to_q`` / ``to_k`` / ``to_v`` (Linear weights, not queries/keys/values!) and the attention
  output projection ``to_out`` is a Linear (2-D weight).
* ``original``: mit-han-lab efficientvit ``DCAE`` (``project_in``, ``stages.i.op_list.j.main``,
  ``context_module``, ``local_module``, ``qkv.conv``, ``aggreg.k.0/1``, ``proj.conv``, ...).

Renames are regex tables applied in order; the few tensors whose shape differs are reshaped by
dedicated functions next to the tables.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch

from .config import DCAEConfig

logger = logging.getLogger(__name__)

StateDict = dict[str, torch.Tensor]


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not match the model (names keys / paths)."""


# dcgen -> diffusers. Anchored prefixes first, then per-block fragments.
DCGEN_TO_DIFFUSERS: list[tuple[str, str]] = [
    (r"^encoder\.stem\.", "encoder.conv_in."),
    (r"^encoder\.stages\.", "encoder.down_blocks."),
    (r"^encoder\.head\.", "encoder.conv_out."),
    (r"^decoder\.stem\.", "decoder.conv_in."),
    (r"^decoder\.stages\.", "decoder.up_blocks."),
    (r"^decoder\.head_norm\.", "decoder.norm_out."),
    (r"^decoder\.head\.", "decoder.conv_out."),
    (r"\.mlp\.expand\.", ".conv_out.conv_inverted."),
    (r"\.mlp\.depthwise\.", ".conv_out.conv_depth."),
    (r"\.mlp\.project\.", ".conv_out.conv_point."),
    (r"\.mlp\.norm\.", ".conv_out.norm."),
    (r"\.attn\.aggregators\.(\d+)\.depthwise\.", r".attn.to_qkv_multiscale.\1.proj_in."),
    (r"\.attn\.aggregators\.(\d+)\.grouped\.", r".attn.to_qkv_multiscale.\1.proj_out."),
    (r"\.attn\.proj\.", ".attn.to_out."),
    (r"\.attn\.norm\.", ".attn.norm_out."),
]

# diffusers -> dcgen (the inverse table; to_q/to_k/to_v are fused separately).
DIFFUSERS_TO_DCGEN: list[tuple[str, str]] = [
    (r"^encoder\.conv_in\.", "encoder.stem."),
    (r"^encoder\.down_blocks\.", "encoder.stages."),
    (r"^encoder\.conv_out\.", "encoder.head."),
    (r"^decoder\.conv_in\.", "decoder.stem."),
    (r"^decoder\.up_blocks\.", "decoder.stages."),
    (r"^decoder\.norm_out\.", "decoder.head_norm."),
    (r"^decoder\.conv_out\.", "decoder.head."),
    (r"\.conv_out\.conv_inverted\.", ".mlp.expand."),
    (r"\.conv_out\.conv_depth\.", ".mlp.depthwise."),
    (r"\.conv_out\.conv_point\.", ".mlp.project."),
    (r"\.conv_out\.norm\.", ".mlp.norm."),
    (r"\.attn\.to_qkv_multiscale\.(\d+)\.proj_in\.", r".attn.aggregators.\1.depthwise."),
    (r"\.attn\.to_qkv_multiscale\.(\d+)\.proj_out\.", r".attn.aggregators.\1.grouped."),
    (r"\.attn\.to_out\.", ".attn.proj."),
    (r"\.attn\.norm_out\.", ".attn.norm."),
]

# original (after dropping the ``main.`` / ``op_list.`` wrapper segments) -> dcgen.
ORIGINAL_TO_DCGEN: list[tuple[str, str]] = [
    (r"^encoder\.project_in\.conv\.conv\.", "encoder.stem.conv."),
    # ``encoder.project_in.conv.`` depends on the config: see _original_stem_rule.
    (r"^encoder\.project_out\.0\.conv\.", "encoder.head."),
    (r"^decoder\.project_in\.conv\.", "decoder.stem."),
    (r"^decoder\.project_out\.0\.", "decoder.head_norm."),
    (r"^decoder\.project_out\.2\.conv\.conv\.", "decoder.head.conv."),
    (r"^decoder\.project_out\.2\.conv\.", "decoder.head."),
    (r"\.conv1\.conv\.", ".conv1."),
    (r"\.conv2\.conv\.", ".conv2."),
    (r"\.conv2\.norm\.", ".norm."),
    (r"\.context_module\.qkv\.conv\.", ".attn.qkv."),
    (r"\.context_module\.aggreg\.(\d+)\.0\.", r".attn.aggregators.\1.depthwise."),
    (r"\.context_module\.aggreg\.(\d+)\.1\.", r".attn.aggregators.\1.grouped."),
    (r"\.context_module\.proj\.conv\.", ".attn.proj."),
    (r"\.context_module\.proj\.norm\.", ".attn.norm."),
    (r"\.local_module\.inverted_conv\.conv\.", ".mlp.expand."),
    (r"\.local_module\.depth_conv\.conv\.", ".mlp.depthwise."),
    (r"\.local_module\.point_conv\.conv\.", ".mlp.project."),
    (r"\.local_module\.point_conv\.norm\.", ".mlp.norm."),
    # Resampling blocks wrap their conv in a ConvLayer (``conv.conv``); the stride-2 "Conv"
    # downsample is a bare ConvLayer (``conv``) and needs no rule.
    (r"^((?:en|de)coder\.stages\.\d+\.\d+)\.conv\.conv\.", r"\1.conv."),
]

_WRAPPER_SEGMENTS = re.compile(r"(^|\.)(?:(?:main|op_list)\.)+")
_QKV_PARTS = ("to_q", "to_k", "to_v")


def _rename(key: str, table: Iterable[tuple[str, str]]) -> str:
    for pattern, repl in table:
        key = re.sub(pattern, repl, key)
    return key


def diffusers_key(key: str) -> str:
    """The diffusers name of a dcgen key that is not a fused qkv weight (those split in three)."""
    return _rename(key, DCGEN_TO_DIFFUSERS)


def dcgen_to_diffusers(state_dict: Mapping[str, torch.Tensor]) -> StateDict:
    """dcgen state dict -> diffusers AutoencoderDC state dict."""
    out: StateDict = {}
    for key, value in state_dict.items():
        if key.endswith(".attn.qkv.weight"):
            # Fused (3*inner, C, 1, 1) conv -> three contiguous (inner, C) Linear weights.
            prefix = _rename(key[: -len("qkv.weight")], DCGEN_TO_DIFFUSERS)
            for part, chunk in zip(_QKV_PARTS, value.flatten(1).chunk(3, dim=0)):
                out[f"{prefix}{part}.weight"] = chunk.contiguous()
            continue
        new_key = diffusers_key(key)
        if key.endswith(".attn.proj.weight"):
            value = value.flatten(1)  # 1x1 conv -> Linear
        out[new_key] = value
    return out


def diffusers_to_dcgen(state_dict: Mapping[str, torch.Tensor]) -> StateDict:
    """diffusers AutoencoderDC state dict -> dcgen state dict.

    to_q / to_k / to_v are concatenated back, in that order, into the fused per-head
    interleaved qkv conv. A block with only some of the three keeps them under their diffusers
    names, so strict loading reports them (and the missing fused weight) by name.
    """
    out: StateDict = {}
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state_dict.items():
        m = re.match(r"^(.*\.attn\.)(to_q|to_k|to_v)\.weight$", key)
        if m:
            groups.setdefault(m.group(1), {})[m.group(2)] = value
            continue
        new_key = _rename(key, DIFFUSERS_TO_DCGEN)
        if new_key.endswith(".attn.proj.weight") and value.ndim == 2:
            value = value[:, :, None, None]
        out[new_key] = value
    for prefix, parts in groups.items():
        new_prefix = _rename(prefix, DIFFUSERS_TO_DCGEN)
        if all(p in parts for p in _QKV_PARTS):
            shapes = {p: tuple(parts[p].shape) for p in _QKV_PARTS}
            if len(set(shapes.values())) != 1:
                raise CheckpointError(
                    f"{prefix}to_q/to_k/to_v: expected three equal shapes, got {shapes}"
                )
            fused = torch.cat([parts[p].reshape(parts[p].shape[0], -1) for p in _QKV_PARTS])
            out[f"{new_prefix}qkv.weight"] = fused[:, :, None, None]
        else:
            for part, value in parts.items():
                out[f"{prefix}{part}.weight"] = value
    return out


def _original_stem_rule(config: DCAEConfig) -> tuple[str, str]:
    # depth0 > 0: project_in is a plain ConvLayer and our stem a Conv2d. depth0 == 0 with the
    # stride-2 "Conv" downsample: project_in is a bare ConvLayer but our stem is a DownBlock.
    target = "encoder.stem." if config.encoder_layers_per_block[0] > 0 else "encoder.stem.conv."
    return (r"^encoder\.project_in\.conv\.", target)


def original_to_dcgen(state_dict: Mapping[str, torch.Tensor], config: DCAEConfig) -> StateDict:
    """Original mit-han-lab (efficientvit) DCAE state dict -> dcgen state dict."""
    table = ORIGINAL_TO_DCGEN[:1] + [_original_stem_rule(config)] + ORIGINAL_TO_DCGEN[1:]
    out: StateDict = {}
    for key, value in state_dict.items():
        new_key = _rename(_WRAPPER_SEGMENTS.sub(r"\1", key), table)
        out[new_key] = value
    return out


def detect_layout(keys: Iterable[str]) -> str:
    """'dcgen', 'diffusers' or 'original', judged from characteristic key names."""
    keys = list(keys)
    if any(
        k.startswith(("encoder.project_in", "decoder.project_out")) or ".op_list." in k
        for k in keys
    ):
        return "original"
    if any(
        k.startswith(("encoder.conv_in", "decoder.conv_in", "encoder.down_blocks")) for k in keys
    ):
        return "diffusers"
    if any(k.startswith(("encoder.stem", "decoder.stem", "encoder.stages")) for k in keys):
        return "dcgen"
    sample = sorted(keys)[:5]
    raise CheckpointError(
        "could not recognise the checkpoint layout (expected diffusers AutoencoderDC keys such "
        f"as 'encoder.conv_in.weight' or original keys such as 'encoder.project_in...'), got "
        f"{len(keys)} keys starting with {sample}"
    )


def to_dcgen(state_dict: Mapping[str, torch.Tensor], config: DCAEConfig) -> tuple[StateDict, str]:
    """Any supported layout -> (dcgen state dict, layout name)."""
    layout = detect_layout(state_dict.keys())
    if layout == "diffusers":
        return diffusers_to_dcgen(state_dict), layout
    if layout == "original":
        return original_to_dcgen(state_dict, config), layout
    return dict(state_dict), layout


def _list_keys(keys: Iterable[str], limit: int = 20) -> str:
    keys = sorted(keys)
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def check_state_dict(
    expected: Mapping[str, torch.Tensor], got: Mapping[str, torch.Tensor], source: str
) -> None:
    """Strict key, shape and kind check (a floating-point weight needs a floating-point
    tensor); raises CheckpointError naming every offending key."""
    missing = set(expected) - set(got)
    unexpected = set(got) - set(expected)
    common = sorted(set(expected) & set(got))
    mismatched = [
        f"{k}: expected {tuple(expected[k].shape)}, got {tuple(got[k].shape)}"
        for k in common
        if tuple(expected[k].shape) != tuple(got[k].shape)
    ]
    kinds = [
        f"{k}: expected a floating-point tensor, got {got[k].dtype}"
        for k in common
        if expected[k].is_floating_point() and not got[k].is_floating_point()
    ]
    if not (missing or unexpected or mismatched or kinds):
        return
    parts = [f"checkpoint {source} does not match the DC-AE config"]
    if missing:
        parts.append(f"missing keys ({len(missing)}): {_list_keys(missing)}")
    if unexpected:
        parts.append(f"unexpected keys ({len(unexpected)}): {_list_keys(unexpected)}")
    if mismatched:
        shown = "; ".join(mismatched[:20])
        more = f"; ... ({len(mismatched) - 20} more)" if len(mismatched) > 20 else ""
        parts.append(f"shape mismatches ({len(mismatched)}): {shown}{more}")
    if kinds:
        more = f"; ... ({len(kinds) - 20} more)" if len(kinds) > 20 else ""
        parts.append(f"dtype mismatches ({len(kinds)}): {'; '.join(kinds[:20])}{more}")
    parts.append("(dcgen key names; pass the matching preset or config.json)")
    raise CheckpointError("\n  ".join(parts))


# ---------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
CONFIG_NAME = "config.json"
ORIGINAL_WEIGHT_NAMES = (
    "model.safetensors",
    "model.pt",
    "model.pth",
    "model.bin",
    "pytorch_model.bin",
)


def weights_name(variant: str | None, ext: str = "safetensors") -> str:
    """diffusers' weights file name: diffusion_pytorch_model[.variant].<ext>."""
    stem = WEIGHTS_NAME.rsplit(".", 1)[0]
    return f"{stem}{'.' + variant if variant else ''}.{ext}"


def index_name(variant: str | None, ext: str = "safetensors") -> str:
    """diffusers' shard index name (the variant goes before ``.json``)."""
    return f"{weights_name(None, ext)}.index{'.' + variant if variant else ''}.json"


def diffusers_weight_names(variant: str | None) -> list[str]:
    """The files a diffusers folder may hold its weights in, in diffusers' order of preference:
    safetensors before a torch pickle (``save_pretrained(safe_serialization=False)``), a shard
    index before a single file (diffusers reads the index whenever one is there)."""
    return [
        index_name(variant),
        weights_name(variant),
        index_name(variant, "bin"),
        weights_name(variant, "bin"),
    ]


def read_shard_index(index: Path) -> dict[str, str]:
    """The ``weight_map`` (tensor name -> shard file name) of a diffusers / transformers shard
    index (``*.safetensors.index.json``, ``*.bin.index.json``); an unreadable file or one that
    is not such an index raises CheckpointError naming it and what was wrong."""
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise CheckpointError(f"could not read shard index {index}: {err!r}") from err
    if not isinstance(weight_map, Mapping) or not all(
        isinstance(name, str) and isinstance(file, str) for name, file in weight_map.items()
    ):
        raise CheckpointError(
            f"could not read shard index {index}: expected its weight_map to map tensor names "
            f"to shard file names, got {type(weight_map).__name__} {str(weight_map)[:80]}"
        )
    return dict(weight_map)


def remove_stale_shards(folder: Path, variant: str | None, keep: Path) -> None:
    """Delete a shard index of ``variant`` (both formats) and the shards it lists, left by an
    earlier sharded save in ``folder``: diffusers prefers an index to the single file ``keep``
    just written, so a stale one would load the old weights."""
    for ext in ("safetensors", "bin"):
        index = folder / index_name(variant, ext)
        if not index.is_file():
            continue
        try:
            shards = set(read_shard_index(index).values())
        except CheckpointError:
            shards = set()  # unreadable: the index goes, its shards cannot be named
        # The index first: once it is gone no loader looks at the shards.
        index.unlink()
        for name in shards:
            shard = folder / str(name)
            if shard.parent == folder and shard != keep and shard.is_file():
                shard.unlink()


def read_safetensors(path: Path, device: str | torch.device = "cpu") -> StateDict:
    """Load a .safetensors file; unreadable / truncated files raise CheckpointError with the
    path instead of safetensors' bare error."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device=str(device))
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise CheckpointError(
            f"could not read safetensors file {path}: {err} (truncated or corrupt download?)"
        ) from err


def _unwrap(obj: object, path: Path) -> StateDict:
    # Training checkpoints nest the weights: {"state_dict": ...}, {"model": ...}, {"module": ...}.
    for key in ("state_dict", "model", "module", "ema"):
        if isinstance(obj, Mapping) and key in obj and isinstance(obj[key], Mapping):
            obj = obj[key]
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path}: expected a state dict of tensors, got {type(obj).__name__}")
    others = {k: type(v).__name__ for k, v in obj.items() if not isinstance(v, torch.Tensor)}
    if others:
        shown = ", ".join(f"{k!r} ({t})" for k, t in list(others.items())[:10])
        raise CheckpointError(
            f"{path}: expected a state dict of tensors, got {len(others)} other entries: {shown}"
        )
    return dict(obj)


def read_weights(path: Path, device: str | torch.device = "cpu") -> StateDict:
    """A state dict from .safetensors (preferred) or a torch pickle (.pt/.pth/.bin/.ckpt,
    loaded with weights_only=True so no code in it runs)."""
    if path.suffix == ".safetensors":
        return read_safetensors(path, device)
    if path.suffix == ".json" and (".safetensors.index" in path.name or ".bin.index" in path.name):
        shards = sorted(set(read_shard_index(path).values()))
        merged: StateDict = {}
        for shard in shards:
            shard_path = path.parent / str(shard)
            if not shard_path.is_file():
                raise CheckpointError(f"shard {shard_path} listed in {path} is missing")
            merged.update(read_weights(shard_path, device))
        return merged
    try:
        try:
            # mmap: the tensors stay in the file's pages until used (a read copied the whole
            # checkpoint into memory); files in torch's legacy (pre-zip) format cannot be
            # mapped and are read.
            obj = torch.load(str(path), map_location=device, weights_only=True, mmap=True)
        except RuntimeError as err:
            if "mmap" not in str(err):
                raise
            obj = torch.load(str(path), map_location=device, weights_only=True)
    except Exception as err:  # torch raises many types for a bad pickle / zip
        raise CheckpointError(f"could not read torch checkpoint {path}: {err}") from err
    return _unwrap(obj, path)


# safetensors' dtype codes (``get_slice(...).get_dtype()``), for reading a header's dtypes
# without loading a tensor.
SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}  # fmt: skip


def stored_dtype(state: StateDict) -> torch.dtype:
    """The dtype most of ``state``'s floating-point elements are stored in (float32 if none):
    a bf16 checkpoint's, whatever its fp32 BatchNorm statistics."""
    count: dict[torch.dtype, int] = {}
    for t in state.values():
        if t.is_floating_point():
            count[t.dtype] = count.get(t.dtype, 0) + t.numel()
    return max(count, key=count.__getitem__) if count else torch.float32


def read_config_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise CheckpointError(f"could not read config file {path}: {err}") from err
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data
