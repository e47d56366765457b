"""What a DiT family must tell dcgen: the latent-facing layers, packing, positions, timesteps.

An adapter wraps one diffusers transformer (it holds no weights of its own) and exposes one
calling convention for every family:

    velocity = adapter.predict(latents (B, C, H, W), sigma (B,), prompt_embeds, ...)

with sigma in [0, 1] (flow matching, x_t = (1 - sigma) x0 + sigma noise, v = noise - x0).
Each family converts sigma to its own timestep scale and packs latents its own way. A new
family is one subclass that fills in the abstract methods and registers itself with
:func:`register_adapter`.
"""

from __future__ import annotations

import abc
import contextlib
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from .._checks import is_int
from .._compiled import unwrap_compiled

logger = logging.getLogger(__name__)

# The dtypes a latent layer computes in (a quantized layer stores its weight in 8 bits).
_COMPUTE_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)

# Set (a nesting count) on a transformer while capture_hidden_states records its blocks.
_CAPTURING = "_dcgen_capturing_hidden_states"


def pack_latents(latents: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, (H/p) * (W/p), C * p * p), row-major tokens, channel-major features."""
    b, c, h, w = latents.shape
    p = patch_size
    x = latents.view(b, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // p) * (w // p), c * p * p)


def unpack_latents(tokens: torch.Tensor, height: int, width: int, patch_size: int) -> torch.Tensor:
    """Inverse of :func:`pack_latents` for latent size (height, width)."""
    b, n, f = tokens.shape
    p = patch_size
    if n != (height // p) * (width // p) or f % (p * p):
        raise ValueError(
            f"unpack_latents: {n} tokens of {f} features do not fit a {height}x{width} latent "
            f"with patch size {p}"
        )
    c = f // (p * p)
    x = tokens.view(b, height // p, width // p, c, p, p).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, c, height, width)


@dataclass
class LatentLayers:
    """The two latent-facing layers of a DiT: token embedder and output head."""

    embedder: nn.Module
    head: nn.Module


class DiTAdapter(abc.ABC):
    """Base class: one instance per transformer (``adapter_for(transformer)``)."""

    #: diffusers class names this adapter handles (matched against the transformer's MRO)
    transformer_class_names: ClassVar[tuple[str, ...]] = ()
    #: predict()'s keyword for the transformer's attention kwargs (diffusers names it per model:
    #: FLUX ``joint_attention_kwargs``, SANA ``attention_kwargs``; ``{"scale": s}`` scales LoRAs)
    attention_kwargs_name: ClassVar[str] = "attention_kwargs"

    def __init__(self, transformer: nn.Module) -> None:
        self.transformer = transformer
        #: the layers replaced by the last ``replace_latent_layers`` (stage-1 alignment targets)
        self.original_layers: LatentLayers | None = None

    # -- facts about the model -------------------------------------------------------------------

    @property
    def config(self) -> Any:
        return self.transformer.config

    @property
    def inner_dim(self) -> int:
        return int(self.config.num_attention_heads * self.config.attention_head_dim)

    @property
    @abc.abstractmethod
    def latent_channels(self) -> int:
        """C of the (B, C, H, W) latents ``predict`` takes (before packing)."""

    @property
    @abc.abstractmethod
    def patch_size(self) -> int:
        """Side of the latent patch one token covers (FLUX.1 base: 2, DC-Gen: 1)."""

    @abc.abstractmethod
    def latent_layers(self) -> LatentLayers:
        """The current embedder and head modules."""

    # -- packing: (B, C, H, W) latents <-> (B, tokens, features) -------------------------------

    def pack(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents as the tokens the embedder takes (:func:`pack_latents`: patch_size x
        patch_size patches, row-major; FLUX's and SANA's layout). Part of every adapter (the
        stage-1 readout packs velocities with it): a family with another layout overrides
        both this and :meth:`unpack`."""
        return pack_latents(latents, self.patch_size)

    def unpack(self, tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """Inverse of :meth:`pack` for a latent of (height, width)."""
        return unpack_latents(tokens, height, width, self.patch_size)

    def pack_velocity(self, velocity: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) velocity as the head's output tokens from which :meth:`predict` returns
        it: the target of a readout fitted to the head (stage 1's ridge head). The embedder's
        and the head's feature orders can differ (SANA's). Only the velocity's features: a
        learned-sigma head emits as many again."""
        return self.pack(velocity)

    def replace_latent_layers(
        self, latent_channels: int, patch_size: int = 1, init: str = "random"
    ) -> LatentLayers:
        """Swap in a new embedder and head for ``latent_channels``-channel latents in
        ``patch_size`` patches, update the transformer config so save_pretrained /
        from_pretrained round-trip, and return the old layers (also kept in
        ``self.original_layers``). ``init="zero_head"`` zeroes the new head, so the initial
        velocity is 0 (a common DiT start for fine-tuning)."""
        if (
            not (is_int(latent_channels) and is_int(patch_size))
            or latent_channels < 1
            or patch_size < 1
        ):
            # 2.5 failed inside torch.empty, True built a 1-channel embedder
            raise ValueError(
                f"replace_latent_layers: expected positive int latent_channels and patch_size, "
                f"got {latent_channels!r}, {patch_size!r}"
            )
        if init not in ("random", "zero_head"):
            raise ValueError(f"init: expected 'random' or 'zero_head', got {init!r}")
        # plain ints: a numpy int reached the config, which save_pretrained's JSON refused
        latent_channels, patch_size = int(latent_channels), int(patch_size)
        old = self.latent_layers()
        self._install_latent_layers(old, latent_channels, patch_size)
        if init == "zero_head":
            head = self.latent_layers().head
            nn.init.zeros_(head.weight)
            if head.bias is not None:
                nn.init.zeros_(head.bias)
        self.original_layers = old
        return old

    @abc.abstractmethod
    def _install_latent_layers(
        self, old: LatentLayers, latent_channels: int, patch_size: int
    ) -> None:
        """Family part of replace_latent_layers: build the new embedder and head (dtype and
        device of ``old``) and update the transformer config."""

    @abc.abstractmethod
    def embed_tokens(self, latents: torch.Tensor) -> torch.Tensor:
        """Embedder output token map (B, tokens, inner_dim) for (B, C, H, W) latents."""

    @abc.abstractmethod
    def predict(
        self,
        latents: torch.Tensor,
        sigma: torch.Tensor,
        prompt_embeds: torch.Tensor,
        pooled_prompt_embeds: torch.Tensor | None = None,
        guidance: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Velocity (B, C, H, W) for noisy latents at noise level sigma (B,) in [0, 1]."""

    @abc.abstractmethod
    def blocks(self) -> list[nn.Module]:
        """Transformer blocks in execution order (FLUX: double then single blocks)."""

    @abc.abstractmethod
    def _image_hidden_states(self, block_output: Any) -> torch.Tensor:
        """The image-token hidden states (B, tokens, inner_dim) in one block's output."""

    @abc.abstractmethod
    def enable_structured_latents(self) -> None:
        """Replace embedder/head with weight-slicing versions (same parameters) so ``predict``
        and ``embed_tokens`` accept latents[:, :c] for any c <= latent_channels."""

    # -- shared helpers ------------------------------------------------------------------------

    def num_tokens(self, latent_height: int, latent_width: int) -> int:
        return (latent_height // self.patch_size) * (latent_width // self.patch_size)

    def check_latents(self, latents: torch.Tensor, what: str = "latents") -> torch.Tensor:
        if not isinstance(latents, torch.Tensor) or latents.ndim != 4:
            shape = tuple(latents.shape) if isinstance(latents, torch.Tensor) else type(latents)
            raise ValueError(f"{what}: expected a (B, C, H, W) tensor, got {shape}")
        b, c, h, w = latents.shape
        if not (b and h and w):  # an empty grid came back as an empty velocity, batch 0 failed
            raise ValueError(
                f"{what}: expected a non-empty batch and grid, got {tuple(latents.shape)}"
            )
        p = self.patch_size
        if h % p or w % p:
            raise ValueError(
                f"{what}: latent height and width must be multiples of the patch size {p}, "
                f"got {h}x{w}"
            )
        if c != self.latent_channels and not (self.structured and 1 <= c < self.latent_channels):
            raise ValueError(
                f"{what}: the transformer expects {self.latent_channels} latent channels"
                + (f" (structured: 1 to {self.latent_channels})" if self.structured else "")
                + f", got {c} (shape {tuple(latents.shape)})"
                + ("" if self.structured else "; enable_structured_latents() accepts c < C")
            )
        return latents

    @property
    def structured(self) -> bool:
        layers = self.latent_layers()
        from .structured import StructuredConv2d, StructuredLinear

        return isinstance(layers.embedder, StructuredLinear | StructuredConv2d)

    @staticmethod
    def image_ids(
        height: int,
        width: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> torch.Tensor:
        """Position ids (height * width, 3) = (0, row, col), row-major over the token grid: the
        FLUX RoPE convention (axis 0 is reserved for text / reference images)."""
        rows = torch.arange(height, device=device).repeat_interleave(width)
        cols = torch.arange(width, device=device).repeat(height)
        ids = torch.stack([torch.zeros_like(rows), rows, cols], dim=-1)
        return ids.to(dtype)

    @contextlib.contextmanager
    def capture_hidden_states(
        self, block_indices: Sequence[int] | None = None
    ) -> Iterator[dict[int, torch.Tensor]]:
        """Record the image hidden states after the given blocks (all blocks if None) during the
        calls made inside the ``with``: ``{block_index: (B, tokens, inner_dim)}`` (the last call
        wins). Used for the per-layer feature distance between base and adapted models."""
        blocks = self.blocks()
        indices = range(len(blocks)) if block_indices is None else list(block_indices)
        for i in indices:
            if not -len(blocks) <= i < len(blocks):
                raise IndexError(f"block index {i} out of range for {len(blocks)} blocks")
        captured: dict[int, torch.Tensor] = {}
        handles = []

        def make_hook(index: int) -> Callable[..., None]:
            def hook(module: nn.Module, args: Any, output: Any) -> None:
                captured[index] = self._image_hidden_states(output).detach()

            return hook

        for i in indices:
            handles.append(blocks[i].register_forward_hook(make_hook(i)))
        inner = unwrap_compiled(self.transformer)
        inner.__dict__[_CAPTURING] = inner.__dict__.get(_CAPTURING, 0) + 1
        try:
            yield captured
        finally:
            for handle in handles:
                handle.remove()
            if inner.__dict__[_CAPTURING] == 1:
                del inner.__dict__[_CAPTURING]
            else:
                inner.__dict__[_CAPTURING] -= 1

    def _model_to_call(self) -> nn.Module:
        """The transformer ``predict`` calls: a ``torch.compile`` wrapper as given, except while
        ``capture_hidden_states`` records, when the module it wraps runs instead: dynamo does not
        guard on forward hooks added to submodules after compiling, so the compiled graph would
        run without them and capture nothing."""
        inner = unwrap_compiled(self.transformer)
        return inner if inner.__dict__.get(_CAPTURING) else self.transformer

    @staticmethod
    def check_text(
        prompt_embeds: torch.Tensor,
        attention_mask: torch.Tensor | None,
        batch: int,
        width: int,
        pooled: torch.Tensor | None = None,
        pooled_width: int | None = None,
    ) -> None:
        """The text inputs of ``predict`` against the latents' batch and the transformer's text
        widths: a 2-D embedding, another width or batch, or a mask of another length each
        failed deep in the transformer (a matmul or a torch.cat of mismatched sizes)."""

        def shape(t: object) -> object:
            return tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__

        e = prompt_embeds
        if (
            not isinstance(e, torch.Tensor)
            or e.ndim != 3
            or e.shape[0] != batch
            or e.shape[2] != width
        ):
            raise ValueError(
                f"prompt_embeds: expected ({batch}, tokens, {width}) (the latents' batch, the "
                f"transformer's text width), got {shape(e)}"
            )
        m = attention_mask
        if m is not None and (
            not isinstance(m, torch.Tensor) or tuple(m.shape) != (batch, e.shape[1])
        ):
            raise ValueError(
                f"attention_mask: expected ({batch}, {e.shape[1]}) (one entry per text token), "
                f"got {shape(m)}"
            )
        if pooled is not None and (
            not isinstance(pooled, torch.Tensor) or tuple(pooled.shape) != (batch, pooled_width)
        ):
            raise ValueError(
                f"pooled_prompt_embeds: expected ({batch}, {pooled_width}), got {shape(pooled)}"
            )

    @staticmethod
    def _check_sigma(
        sigma: torch.Tensor | float, batch: int, like: torch.Tensor, what: str = "sigma"
    ) -> torch.Tensor:
        """A (B,) float tensor on ``like``'s device; scalars are broadcast."""
        expected = f"{what}: expected a real number or a real tensor of shape () or ({batch},)"
        # a bool is not a noise level (True became 1.0), a complex one lost its imaginary part,
        # and None / a str failed in torch without naming the argument
        if sigma is None or isinstance(sigma, bool | complex | str):
            raise TypeError(f"{expected}, got {type(sigma).__name__} {sigma!r}")
        try:
            value = torch.as_tensor(sigma)  # tensors, numbers, lists, numpy arrays as before
        except (TypeError, ValueError, RuntimeError) as e:
            raise TypeError(f"{expected}, got {type(sigma).__name__} ({e})") from e
        if value.dtype == torch.bool or value.is_complex():
            raise TypeError(f"{expected}, got {value.dtype}")
        sigma = value.to(device=like.device, dtype=torch.float32)
        if sigma.ndim == 0:
            sigma = sigma.expand(batch)
        if sigma.shape != (batch,):
            raise ValueError(
                f"{what}: expected a scalar or shape ({batch},), got {tuple(sigma.shape)}"
            )
        return sigma

    @staticmethod
    def _compute_dtype(old: nn.Module) -> torch.dtype:
        """The floating dtype ``old`` computes in: a quantized layer's own ``compute_dtype``
        (its weight is a uint8 / float8 buffer), else its weight's."""
        return getattr(old, "compute_dtype", None) or old.weight.dtype

    @classmethod
    def _new_linear(cls, old: nn.Module, in_features: int, out_features: int) -> nn.Linear:
        # not old.weight.dtype: a quantized layer's is uint8 / float8, which nn.Linear's
        # initialisation refused (or gave a weight that cannot require grad)
        return nn.Linear(
            in_features, out_features, device=old.weight.device, dtype=cls._compute_dtype(old)
        )

    @staticmethod
    def _check_structurable(**layers: nn.Module) -> None:
        """Refuse quantized latent layers before enable_structured_latents changes anything:
        their weight is a uint8 / float8 buffer, which the weight-slicing layers cannot hold
        (torch's "cannot assign ... as parameter" named neither the layer nor the way out)."""
        for name, layer in layers.items():
            weight = getattr(layer, "weight", None)
            if isinstance(weight, torch.Tensor) and weight.dtype not in _COMPUTE_DTYPES:
                raise TypeError(
                    f"enable_structured_latents: {name} is a quantized {type(layer).__name__} "
                    f"({weight.dtype} weight), which cannot run on a channel prefix: quantize "
                    f"with keep_latent_layers=True (or dequantize it first)"
                )


_REGISTRY: list[type[DiTAdapter]] = []


def register_adapter(cls: type[DiTAdapter]) -> type[DiTAdapter]:
    """Class decorator: make ``adapter_for`` know this family."""
    if not cls.transformer_class_names:
        raise ValueError(f"{cls.__name__} must set transformer_class_names")
    _REGISTRY.append(cls)
    return cls


def adapter_for(transformer: nn.Module, **kwargs: Any) -> DiTAdapter:
    """The adapter for a diffusers transformer, chosen by its class (or a base class) name.

    A ``torch.compile(transformer)`` wrapper (diffusers' documented way to compile a pipeline's
    transformer) is matched by the module it wraps and kept: the adapter calls the compiled
    forward, and attribute reads (``x_embedder``, ``config``) reach the wrapped module."""
    names = [klass.__name__ for klass in type(unwrap_compiled(transformer)).__mro__]
    for cls in _REGISTRY:
        if any(name in cls.transformer_class_names for name in names):
            return cls(transformer, **kwargs)
    known = sorted(n for cls in _REGISTRY for n in cls.transformer_class_names)
    raise TypeError(f"no dcgen adapter for {type(transformer).__name__}; known: {known}")
