"""Prompt-to-Prompt's attention edits as small composable classes, and the controllers users name.

An :class:`AttentionEdit` builds the targets' cross-attention from the source's (word swap,
refinement, reweighting of another edit, or the source's maps as they are); :class:`CrossEdit` in
:mod:`npinv.attention.control` mixes it in over its step window, and local blend
(:class:`~npinv.attention.control.LocalBlend`) is a step hook beside it.

A :class:`Controller` is what ``--controller`` names: it builds the edit for a source prompt and its
targets. Adding one: subclass :class:`Controller` (and :class:`AttentionEdit` if the maths is new),
add an instance to :data:`CONTROLLERS`; the CLI, manifests and web app list it from there.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

import torch

from npinv.attention.align import RefineMap, cross_replace_alpha, refine_mapper, replace_mapper, reweight_vector
from npinv.attention.control import CrossEdit

if TYPE_CHECKING:
    from npinv.settings import EditSettings


class AttentionEdit:
    """``base`` (H, Q, K): the source's cross-attention; ``target`` (T, H, Q, K): the targets' own.
    Returns the targets' edited attention (T, H, Q, K), before the step window's mixing.

    Every edit is linear in the maps: ``edited[t] = base @ A[t] + target[t] * d[t]`` with
    :meth:`linear`'s ``A`` (T, K, K) and ``d`` (T, K); the fused attention path computes the edit
    from that form without materialising the maps (an edit without ``linear`` keeps the explicit one).
    """

    def __call__(self, base: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return base.unsqueeze(0).expand_as(target)  # the source's maps as they are

    def linear(self, targets: int, keys: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, d): the edit as ``base @ A[t] + target[t] * d[t]`` (float32, on the CPU)."""
        return torch.eye(keys).expand(targets, keys, keys), torch.zeros(targets, keys)


@dataclasses.dataclass
class WordSwap(AttentionEdit):
    """Word swap (``replace``): each target token reads the source tokens its (K, K) mapper names."""

    mappers: torch.Tensor  # (T, K, K)

    def __call__(self, base: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return torch.einsum("hqk,tkj->thqj", base, self.mappers.to(base))

    def linear(self, targets: int, keys: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.mappers.float(), torch.zeros(targets, keys)


@dataclasses.dataclass
class Refinement(AttentionEdit):
    """Refinement (``refine``): aligned tokens take the source's maps, new tokens keep their own."""

    maps: list[RefineMap]

    def __call__(self, base: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return torch.stack([
            base[..., m.index.to(base.device)] * m.alpha.to(base) + target[t] * (1 - m.alpha.to(base))
            for t, m in enumerate(self.maps)
        ])

    def linear(self, targets: int, keys: int) -> tuple[torch.Tensor, torch.Tensor]:
        # base[..., index] * alpha is base @ A with A[index[j], j] = alpha[j].
        a = torch.zeros(targets, keys, keys)
        for t, m in enumerate(self.maps):
            a[t, m.index, torch.arange(keys)] = m.alpha.float()
        return a, torch.stack([1 - m.alpha.float() for m in self.maps])


@dataclasses.dataclass
class Reweighting(AttentionEdit):
    """Another edit's result with each target token's attention scaled (T, K)."""

    inner: AttentionEdit
    scales: torch.Tensor

    def __call__(self, base: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.inner(base, target) * self.scales.to(base)[:, None, None, :]

    def linear(self, targets: int, keys: int) -> tuple[torch.Tensor, torch.Tensor]:
        a, d = self.inner.linear(targets, keys)
        s = self.scales.float()
        return a * s[:, None, :], d * s


class Controller:
    """A named controller: builds the targets' cross-attention edit, and says whether it replaces
    self-attention too. The base class is the source's maps as they are (with any reweighting)."""

    name = ""
    summary = ""
    edits_attention = True  # False: no cross- or self-attention edit at all ("none")

    def attention_edit(self, tokenizer: Any, source: str, targets: list[str]) -> AttentionEdit:
        return AttentionEdit()

    def cross_edit(self, tokenizer: Any, source: str, targets: list[str], steps: int,
                   settings: EditSettings) -> CrossEdit | None:
        """The whole cross-attention edit of one image: this controller's edit, reweighted when the
        settings reweight words, mixed in over the cross-replace windows."""
        if not self.edits_attention:
            return None
        edit = self.attention_edit(tokenizer, source, targets)
        if settings.reweight:
            edit = Reweighting(edit, torch.stack([reweight_vector(tokenizer, t, settings.reweight) for t in targets]))
        return CrossEdit(cross_replace_alpha(tokenizer, targets, steps, settings.cross_windows), edit)


class Replace(Controller):
    name, summary = "replace", "word swap: target tokens read the swapped source tokens' maps"

    def attention_edit(self, tokenizer: Any, source: str, targets: list[str]) -> AttentionEdit:
        return WordSwap(torch.stack([replace_mapper(tokenizer, source, t) for t in targets]))


class Refine(Controller):
    name, summary = "refine", "refinement: shared words keep the source's maps, new words their own"

    def attention_edit(self, tokenizer: Any, source: str, targets: list[str]) -> AttentionEdit:
        return Refinement([refine_mapper(tokenizer, source, t) for t in targets])


class Reweight(Controller):
    name, summary = "reweight", "the source's maps with the reweight words scaled"


class NoControl(Controller):
    name, summary = "none", "no attention control (plain guided sampling of each target)"
    edits_attention = False


CONTROLLERS: Mapping[str, Controller] = MappingProxyType(
    {c.name: c for c in (Refine(), Replace(), Reweight(), NoControl())})


def controller_names() -> tuple[str, ...]:
    return tuple(CONTROLLERS)


def get_controller(name: str) -> Controller:
    from npinv.checks import lookup

    return lookup(CONTROLLERS, name, "controller")
