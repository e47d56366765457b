"""Fused DiT attention vs what diffusers runs today, same inputs.

Groups (each one baseline and one dcgen entry, TFLOP/s counted as 4 * S^2 * D * H * B):
- ``attention core S=... vs <backend>``: attention alone on already normalised q, k (dcgen with
  its prologue switched off) against SDPA's default backend (cuDNN on H100/H200) and, on GPU,
  SDPA's flash backend (FA2).
- ``norm+rope+attention S=...``: the whole step from (B, S, H, D) projections: diffusers' stock
  path (RMSNorm, apply_rotary_emb, SDPA) against dcgen.ops.fused_attention with the prologue
  (on GPU also with K's prologue forced into every tile load: ``... K fused``).
Each dcgen group comes per path: the portable flash kernel (no suffix), the Hopper ones
(``(sm90_tma)``, the Hopper default, with and without its ping-pong, and the first one,
``(wgmma)``) and fused_attention's default, the qk_norm_rope kernel + SDPA
(``(qk_norm_rope + SDPA)``).
GPU sizes are the issue's (S = 4,608 and 16,896; B = 1, 24 heads, D = 128, bf16); on CPU a small
fp32 case so CI runs every benchmark (the dcgen side is then the PyTorch reference).
"""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F
from _harness import DEVICE, ON_GPU, record_rel_err, rounds, time_it

from dcgen.ops import has_kernel
from dcgen.ops.attention import fused_attention

embeddings = pytest.importorskip("diffusers.models.embeddings")

HEADS, HEAD_DIM = (24, 128) if ON_GPU else (2, 64)
SEQS = [4608, 16896] if ON_GPU else [256]
DTYPE = torch.bfloat16 if ON_GPU else torch.float32


def _backend(name: str):  # noqa: ANN202
    if name == "default":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel({"flash": SDPBackend.FLASH_ATTENTION}[name])


def _projections(s: int) -> tuple[torch.Tensor, ...]:
    """q, k, v as a linear layer leaves them, (B, S, H, D) views of (B, S, H * D)."""
    g = torch.Generator().manual_seed(0)
    return tuple(
        torch.randn(1, s, HEADS * HEAD_DIM, generator=g)
        .to(DEVICE, DTYPE)
        .unflatten(-1, (HEADS, -1))
        for _ in range(3)
    )


def _rope(s: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(S, D) tables in float32, as diffusers 0.42.1's FluxPosEmbed hands them to the processors
    (its get_1d_rotary_pos_embed ends in .float()). Until 2026-11-27 they were float64 here,
    which made the stock baseline's RoPE compute in float64 and read about 15-20% slow at
    S = 4,608 by a byte count: the norm + RoPE + attention ratios measured before then are too
    high by about that."""
    g = torch.Generator().manual_seed(1)
    angles = torch.rand(s, HEAD_DIM // 2, generator=g) * 6.28
    cos, sin = angles.cos().repeat_interleave(2, 1), angles.sin().repeat_interleave(2, 1)
    return cos.to(DEVICE), sin.to(DEVICE)


def _label(benchmark, group: str, impl: str, baseline_name: str) -> None:  # noqa: ANN001
    # before timing: pytest-benchmark files the run under the group set at that point
    benchmark.group = group
    benchmark.extra_info.update(impl=impl, baseline_name=baseline_name)


def _tflops(benchmark, s: int) -> None:  # noqa: ANN001
    if benchmark.stats:
        flops = 4 * s * s * HEAD_DIM * HEADS
        benchmark.extra_info["tflops"] = flops / benchmark.stats.stats.median / 1e12


def _skip_without_kernel(impl: str) -> None:
    if impl == "dcgen" and ON_GPU and not has_kernel("fused_attention", DEVICE):
        pytest.skip("no compiled fused_attention kernel for this device")


BACKENDS = ["default", "flash"] if ON_GPU else ["default"]
# dcgen's kernels: the portable mma.sync one and, on Hopper, the first wgmma one
# (DCGEN_ATTENTION_SM90=wgmma) and the warp-specialized TMA one ("sm90_tma", the Hopper default
# for flash since the H100 run of 2026-11-27), with its ping-pong schedule off in
# "sm90_tma_no_pingpong". Each gets its own groups, with its own baseline run.
# "sdpa" is fused_attention's default path (qk_norm_rope kernel + torch SDPA; the module doc of
# dcgen.ops.attention says why), measured beside the flash kernels.
KERNELS = (
    ["portable", "wgmma", "sm90_tma", "sm90_tma_no_pingpong", "sdpa"] if ON_GPU else ["portable"]
)
SM90_CHOICE = {"wgmma": "wgmma", "sm90_tma": "tma", "sm90_tma_no_pingpong": "tma"}


def _select_kernel(kernel: str, monkeypatch) -> str:  # noqa: ANN001
    """Select dcgen's path (flash kernel, Hopper or portable, or the SDPA path); the group-name
    suffix of the choice."""
    monkeypatch.setenv("DCGEN_ATTENTION_KERNEL", "sdpa" if kernel == "sdpa" else "flash")
    monkeypatch.setenv("DCGEN_ATTENTION_SM90", SM90_CHOICE.get(kernel, "0"))
    monkeypatch.setenv("DCGEN_ATTENTION_PINGPONG", "0" if kernel.endswith("no_pingpong") else "1")
    if kernel == "portable":
        return ""
    if kernel == "sdpa":
        return " (qk_norm_rope + SDPA)"
    if torch.cuda.get_device_capability()[0] != 9:
        pytest.skip(f"the {kernel} attention kernel needs an sm_90 (Hopper) GPU")
    return f" ({kernel})"


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("s", SEQS)
@pytest.mark.parametrize("impl", ["baseline", "dcgen"])
def test_attention_core(benchmark, impl, s, backend, kernel, monkeypatch):
    if kernel == "sdpa":  # no prologue: fused_attention is F.scaled_dot_product_attention itself
        pytest.skip("the core with kernel=sdpa would time SDPA against itself")
    _skip_without_kernel(impl)
    suffix = _select_kernel(kernel, monkeypatch)
    q, k, v = (t.transpose(1, 2) for t in _projections(s))  # (B, H, S, D) views

    def ours():
        return fused_attention(q, k, v)

    def base():
        with _backend(backend):
            return F.scaled_dot_product_attention(q, k, v)

    fn = ours if impl == "dcgen" else base

    name = {"default": "SDPA default (cuDNN on GPU)", "flash": "SDPA flash (FA2)"}[backend]
    _label(benchmark, f"attention core S={s} vs {backend}{suffix}", impl, name)
    with torch.inference_mode():
        time_it(benchmark, fn, n_rounds=rounds(20, 2))
    _tflops(benchmark, s)
    if impl == "dcgen":
        record_rel_err(benchmark, ours, base)


# Where the kernel runs K's norm + RoPE (see csrc/attention/flash_attention_cuda.cpp): "auto"
# (the default policy) and, on GPU, "fused" into every K tile load, to measure the policy.
K_PROLOGUE = ["auto", "fused"] if ON_GPU else ["auto"]


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("k_prologue", K_PROLOGUE)
@pytest.mark.parametrize("s", SEQS)
@pytest.mark.parametrize("impl", ["baseline", "dcgen"])
def test_norm_rope_attention(benchmark, impl, s, k_prologue, kernel, monkeypatch):
    _skip_without_kernel(impl)
    if kernel == "sdpa" and k_prologue != "auto":
        pytest.skip("K's prologue placement is a flash-kernel setting")
    if kernel.startswith("sm90_tma") and k_prologue == "fused":
        # the TMA kernel loads prepared K tiles: its host code runs K's prologue as a pass
        pytest.skip("the TMA kernel ignores DCGEN_ATTENTION_K_PROLOGUE=fused")
    suffix = _select_kernel(kernel, monkeypatch)
    monkeypatch.setenv("DCGEN_ATTENTION_K_PROLOGUE", k_prologue)
    q, k, v = _projections(s)
    cos, sin = _rope(s)
    norm_q = torch.nn.RMSNorm(HEAD_DIM, eps=1e-6).to(DEVICE, DTYPE)
    norm_k = torch.nn.RMSNorm(HEAD_DIM, eps=1e-6).to(DEVICE, DTYPE)

    def ours():
        out = fused_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
            q_norm_weight=norm_q.weight, k_norm_weight=norm_k.weight, eps=1e-6,
            rope_cos=cos, rope_sin=sin,
        )  # fmt: skip
        return out.transpose(1, 2).flatten(2, 3)

    def base():
        # diffusers' FluxAttnProcessor: norm, RoPE on (B, S, H, D), SDPA on (B, H, S, D)
        qn = embeddings.apply_rotary_emb(norm_q(q), (cos, sin), sequence_dim=1)
        kn = embeddings.apply_rotary_emb(norm_k(k), (cos, sin), sequence_dim=1)
        out = F.scaled_dot_product_attention(
            qn.transpose(1, 2), kn.transpose(1, 2), v.transpose(1, 2)
        )
        return out.transpose(1, 2).flatten(2, 3)

    fn = ours if impl == "dcgen" else base

    group = f"norm+rope+attention S={s}" + ("" if k_prologue == "auto" else f" K {k_prologue}")
    group += suffix
    _label(benchmark, group, impl, "diffusers FLUX processor path")
    with torch.inference_mode():
        time_it(benchmark, fn, n_rounds=rounds(20, 2))
    _tflops(benchmark, s)
    if impl == "dcgen":
        record_rel_err(benchmark, ours, base)
