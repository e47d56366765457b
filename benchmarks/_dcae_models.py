"""The DC-AE pair the decode and encode benchmarks time: dcgen.DCAE and
diffusers.AutoencoderDC with the same random weights (full width on a GPU, narrow on a CPU),
built once per preset and freed when another preset is asked for."""

from __future__ import annotations

import gc

import torch
from _harness import DEVICE, ON_GPU

from dcgen.autoencoders import DCAE
from dcgen.autoencoders.checkpoint import dcgen_to_diffusers
from dcgen.autoencoders.config import get_preset, reduced_config

DTYPE = torch.bfloat16 if ON_GPU else torch.float32

_cache: dict[str, tuple] = {}


def dcae_pair(preset: str, on_free=None) -> tuple:  # noqa: ANN001
    """(config, dcgen DCAE, diffusers AutoencoderDC) for ``preset``; ``on_free()`` runs when
    an earlier preset's pair is dropped (a caller's own per-preset caches)."""
    import diffusers

    if preset not in _cache:
        _cache.clear()
        if on_free is not None:
            on_free()
        gc.collect()
        if ON_GPU:
            torch.cuda.empty_cache()
        cfg = get_preset(preset) if ON_GPU else reduced_config(preset, width_divisor=16)
        torch.manual_seed(0)
        with torch.device(DEVICE):
            ours = DCAE(cfg).to(DTYPE).eval()
            theirs = diffusers.AutoencoderDC(**cfg.to_dict()).to(DTYPE).eval()
        theirs.load_state_dict(dcgen_to_diffusers(ours.state_dict()))
        _cache[preset] = (cfg, ours, theirs)
    return _cache[preset]
