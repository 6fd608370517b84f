"""A diffusers attention processor that hands a layer's attention to a controller.

It is installed only on the layers a controller needs (every cross-attention layer, and the
self-attention layers small enough to replace); the other layers keep their fused processors.
:func:`controlled_attention` restores the original processors on exit, error or not.

Two modes. ``explicit``: the probabilities (batch, heads, queries, keys) are materialised and
passed through ``hook.attention``. ``fused``: the hook computes the layer's output from the
queries, keys and values itself (:class:`FusedAttentionHook`, with
``scaled_dot_product_attention``), and probabilities are materialised only where it asks for them
(``hook.needs_probs``: the maps local blend or heat maps read).
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
from collections.abc import Hashable, Iterator
from typing import Protocol

import torch


@dataclasses.dataclass(frozen=True)
class LayerInfo:
    """Where an attention layer sits: its name, kind and the latent downscale of its queries."""

    name: str
    is_cross: bool
    downscale: int  # queries are ceil(latent_h / downscale) x ceil(latent_w / downscale)

    def map_size(self, latent_hw: tuple[int, ...]) -> tuple[int, int]:
        """The (h, w) of this layer's query map: the UNet's strided convolutions round up (43 -> 22 -> 11)."""
        return map_size(latent_hw, self.downscale)


def map_size(latent_hw: tuple[int, ...], downscale: int) -> tuple[int, int]:
    h, w = latent_hw[-2:]
    return -(-h // downscale), -(-w // downscale)


class AttentionHook(Protocol):
    def attention(self, probs: torch.Tensor, layer: LayerInfo) -> torch.Tensor:
        """Given probabilities (batch, heads, queries, keys), return the ones to use."""
        ...


class FusedAttentionHook(AttentionHook, Protocol):
    def needs_probs(self, layer: LayerInfo) -> bool:
        """Whether this call of ``layer`` must go through :meth:`attention` with explicit probabilities."""
        ...

    def attend(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, layer: LayerInfo,
               scale: float) -> torch.Tensor:
        """The layer's output (batch, heads, queries, head_dim) from (batch, heads, tokens, head_dim) inputs."""
        ...

    def graph_key(self, layer: LayerInfo, device: torch.device, dtype: torch.dtype) -> Hashable | None:
        """A hashable that changes whenever ``attend``'s launches at ``layer`` would, or None (eager)."""
        ...


ATTENTION_MODES = ("fused", "explicit")


def layer_infos(unet) -> dict[str, LayerInfo]:
    """Every attention layer of a UNet2DConditionModel, with its resolution derived from the config."""
    depth = len(unet.config.block_out_channels)
    infos = {}
    for key in unet.attn_processors:
        name = key.removesuffix(".processor")
        if m := re.match(r"down_blocks\.(\d+)\.", name):
            level = int(m.group(1))
        elif m := re.match(r"up_blocks\.(\d+)\.", name):
            level = depth - 1 - int(m.group(1))
        elif name.startswith("mid_block."):
            level = depth - 1
        else:
            continue
        infos[key] = LayerInfo(name, name.endswith("attn2"), 2**level)
    return infos


class ControlledAttnProcessor:
    """Attention under a hook: plain (unfused) attention with the probabilities passed through
    ``hook.attention``, or (``fused``) the hook's own fused computation except where it needs the
    probabilities. ``explicit_calls`` and ``fused_calls`` count the calls each way went."""

    def __init__(self, hook: AttentionHook, layer: LayerInfo, *, fused: bool = False,
                 device: torch.device | None = None, dtype: torch.dtype | None = None) -> None:
        self.hook = hook
        self.layer = layer
        self.fused = fused
        self.device, self.dtype = device, dtype  # the layer's (its values'), for graph_key
        self.explicit_calls = 0
        self.fused_calls = 0

    def graph_key(self) -> Hashable | None:
        """What decides this layer's launches now, for CUDA graphs (:mod:`npinv.graphs`): the fused
        hook's key; None (run the call eagerly) on the explicit path. The call counters count the
        calls this processor ran: a graph replay runs none."""
        hook_key = getattr(self.hook, "graph_key", None) if self.fused and self.device is not None else None
        return None if hook_key is None else hook_key(self.layer, self.device, self.dtype)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channel, height * width).transpose(1, 2)
        batch, seq_len, _ = hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape
        attention_mask = attn.prepare_attention_mask(attention_mask, seq_len, batch)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)
        # A mask (never passed by Stable Diffusion's UNets) takes the explicit path.
        if self.fused and attention_mask is None and not self.hook.needs_probs(self.layer):
            self.fused_calls += 1
            heads = attn.heads
            q, k, v = (x.view(batch, x.shape[1], heads, -1).transpose(1, 2) for x in (query, key, value))
            out = self.hook.attend(q, k, v, self.layer, attn.scale)  # type: ignore[attr-defined]
            hidden_states = out.transpose(1, 2).reshape(batch, out.shape[2], -1).to(query.dtype)
        else:
            self.explicit_calls += 1
            hidden_states = self._explicit(attn, query, key, value, attention_mask, batch)
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor

    def _explicit(self, attn, query, key, value, attention_mask, batch: int) -> torch.Tensor:
        key = attn.head_to_batch_dim(key)
        value = attn.head_to_batch_dim(value)
        probs = attn.get_attention_scores(attn.head_to_batch_dim(query), key, attention_mask)
        heads = attn.heads
        probs = probs.view(batch, heads, *probs.shape[1:])
        probs = self.hook.attention(probs, self.layer).reshape(batch * heads, *probs.shape[2:])
        return attn.batch_to_head_dim(torch.bmm(probs.to(value.dtype), value))


@contextlib.contextmanager
def controlled_attention(unet, hook: AttentionHook, *, self_min_downscale: float | None = None,
                         mode: str = "explicit") -> Iterator[dict]:
    """Route the cross-attention layers, and the self-attention layers whose queries are downscaled at
    least ``self_min_downscale`` times from the latent, through ``hook``; restore every processor after.
    ``mode`` "fused" needs a :class:`FusedAttentionHook`.

    google/prompt-to-prompt replaces self-attention up to 32x32 queries at 512 px (latent 64x64): downscale 2.
    """
    if mode not in ATTENTION_MODES:
        raise ValueError(f"attention mode {mode!r} is not one of {ATTENTION_MODES}")
    original = dict(unet.attn_processors)
    infos = layer_infos(unet)
    hooked = {
        key: info for key, info in infos.items()
        if info.is_cross or (self_min_downscale is not None and info.downscale >= self_min_downscale)
    }
    weight = next(unet.parameters())
    processors = {key: ControlledAttnProcessor(hook, hooked[key], fused=mode == "fused", device=weight.device,
                                               dtype=weight.dtype) if key in hooked else proc
                  for key, proc in original.items()}
    unet.set_attn_processor(processors)
    try:
        yield hooked
    finally:
        unet.set_attn_processor(original)

