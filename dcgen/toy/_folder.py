"""Save / load of the toy world's own small modules (text encoder, evaluator) as a folder:
``config.json`` (the dataclass config) + ``model.safetensors``, like a diffusers model."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any, TypeVar

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .._files import atomic_write

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"

M = TypeVar("M", bound=nn.Module)


def save_module(module: nn.Module, config: Any, path: str | Path) -> None:
    """Weights first, then the config, each written atomically: a folder a killed save left
    behind holds either the old files or whole new ones, and without a config it does not
    load at all (:func:`load_module` checks for it first)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.contiguous() for k, v in module.state_dict().items()}
    atomic_write(path / WEIGHTS_NAME, lambda tmp: save_file(tensors, tmp))
    text = json.dumps(asdict(config), indent=1)
    atomic_write(path / CONFIG_NAME, lambda tmp: Path(tmp).write_text(text))


def load_module(cls: type[M], config_cls: type, path: str | Path, what: str) -> M:
    path = Path(path)
    if not (path / CONFIG_NAME).is_file():
        raise FileNotFoundError(f"{what}: no {CONFIG_NAME} in {path}")
    config = config_cls(**json.loads((path / CONFIG_NAME).read_text()))
    # Built without memory and without initialising (the weights are assigned next): a plain
    # build drew its random initial weights from torch's global generator, so loading a toy
    # pipeline changed the numbers a seeded program drew after it
    with torch.device("meta"):
        model = cls(config)
    model.load_state_dict(load_file(path / WEIGHTS_NAME), assign=True)
    left = [name for name, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise ValueError(f"{what}: {path / WEIGHTS_NAME} does not set {left}")
    return model.eval()
