"""Each model family's attention control behind one set of calls, so editing never branches on the family.

- :func:`edit_tokens`: the text rows an edit's word positions address (UNets: the CLIP tokenizer's 77;
  SD3: CLIP's 77 then T5's; FLUX: T5's), as :class:`~npinv.attention.align.TextTokens`.
- :func:`attention_control`: install a controller on the model's attention layers and restore them
  after (UNets: :func:`~npinv.attention.processor.controlled_attention`; flow transformers:
  :func:`~npinv.attention.joint.joint_attention`).
- :func:`blend_downscale`: the latent downscale of the maps local blend reads.

The family is read from the model (``is_flow`` and ``family``, the adapters' properties).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from typing import Any

from npinv.attention.align import TextSegment, TextTokens, segment
from npinv.attention.joint import joint_attention
from npinv.attention.processor import controlled_attention, layer_infos, map_size

BLEND_SIDE = 16  # the reference reads the 16x16 cross-attention layers of SD at 512 px


def is_flow(model: Any) -> bool:
    return bool(getattr(model, "is_flow", False))


def edit_tokens(model: Any) -> TextTokens:
    """The text sequence the model's attention keys cover, with the tokenizer of each part."""
    pipe = model.pipe
    if not is_flow(model):
        return TextTokens.of(pipe.tokenizer)
    t5_len = int(model.max_sequence_length)
    if model.family == "flux":
        return TextTokens((segment(pipe.tokenizer_2, t5_len),))
    clip = segment(pipe.tokenizer)
    t5 = getattr(pipe, "tokenizer_3", None)
    # Without T5 the pipeline fills T5's rows with zeros: they carry no words and map to themselves.
    rest = segment(t5, t5_len, clip.length) if t5 is not None else TextSegment(None, clip.length, t5_len, 0)
    return TextTokens((clip, rest))


@contextlib.contextmanager
def attention_control(model: Any, hook: Any, *, self_replace_size: float | None = None, mode: str = "explicit",
                      blocks: Callable[[str], bool] | None = None) -> Iterator[Any]:
    """Route the model's text-attending layers through ``hook`` (an
    :class:`~npinv.attention.control.EditController`), and the layers its self-attention replacement
    touches when ``self_replace_size`` is given; restore every processor after, error or not.

    UNets: the cross-attention layers, and self-attention layers whose maps are at most
    ``self_replace_size`` of the latent's side. Flow transformers: every joint-attention block (and
    single-stream block), SD3.5's image-only ``attn2`` layers too when ``self_replace_size`` is given;
    every block has the same map size, so the size rule does not apply. ``blocks`` (flow only) picks
    layers by name."""
    if not is_flow(model):
        self_min = None if self_replace_size is None else 1 / self_replace_size
        with controlled_attention(model.unet, hook, self_min_downscale=self_min, mode=mode) as hooked:
            yield hooked
        return
    with joint_attention(model.transformer, hook, kind=model.family, patch=model.patch,
                         text_len=edit_tokens(model).length, mode=mode, self_replace=self_replace_size is not None,
                         blocks=blocks) as session:
        yield session


def blend_downscale(model: Any, latent_hw: tuple[int, int], side: int | None = None) -> int:
    """The downscale of the cross-attention layers local blend reads: those whose maps' longer side is
    closest to ``side`` cells (default 16, the reference's layers at 512 px), the finer on a tie. A flow
    transformer's blocks all see the latent at its patch size: they are all read (averaged)."""
    if is_flow(model):
        return int(model.patch)
    want = side or BLEND_SIDE
    scales = sorted({i.downscale for i in layer_infos(model.unet).values() if i.is_cross})
    return min(scales, key=lambda s: (abs(math.log2(max(map_size(latent_hw, s)) / want)), s))
