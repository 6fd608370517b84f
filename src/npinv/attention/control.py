"""Prompt-to-Prompt controllers (Hertz et al. 2022) over the sampling loop's row layout.

Branches come in groups, one per edited image: a source branch and its targets (one image:
branch 0 and 1..T). Several images edit in one UNet batch as several groups, each edited only
from its own source. Only the rows that carry a branch's *condition* are edited (negative rows
keep their own attention). Cross-attention maps
are kept only as running sums at one small resolution (for local blend) and, on request, per
word at the latent resolution (for heat maps): never the large self-attention maps.

The controller edits either the probabilities (:meth:`EditController.attention`, the explicit
path) or, as the same linear maps folded into the values, the fused attention's output
(:meth:`EditController.attend`, docs/method.md "Fused attention"); both give the same edit.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Hashable
from typing import Any

import torch
import torch.nn.functional as F
from torch.nn.functional import scaled_dot_product_attention as sdpa

from npinv.attention.processor import LayerInfo, map_size
from npinv.sampling import StepHook, StepState


@dataclasses.dataclass
class CrossEdit:
    """How each target's cross-attention is built from the source's: ``edit`` (an
    :class:`~npinv.attention.controllers.AttentionEdit`: word swap, refinement, reweighting) mixed in
    with weight ``alpha`` (steps, T, K) at each step (cross_replace_steps)."""

    alpha: torch.Tensor
    edit: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    _value_weights: ValueWeights | None = dataclasses.field(default=None, init=False, repr=False, compare=False)

    def apply(self, base: torch.Tensor, target: torch.Tensor, step: int) -> torch.Tensor:
        """base (H, Q, K) of the source; target (T, H, Q, K); returns the targets' new attention."""
        edited = self.edit(base, target)
        a = self.alpha[min(step, len(self.alpha) - 1)].to(base)[:, None, None, :]
        return edited * a + target * (1 - a)

    @property
    def is_linear(self) -> bool:
        """Whether the edit says its linear form (the fused path needs it)."""
        return callable(getattr(self.edit, "linear", None))

    def value_weights(self) -> ValueWeights:
        """:meth:`apply` at every step as weights on the targets' values (see :class:`ValueWeights`),
        computed once, on the CPU: the steps share a few distinct rows of the window table."""
        if self._value_weights is None:
            steps, targets, keys = self.alpha.shape
            rows, row_of_step = torch.unique(self.alpha.detach().cpu().float().flatten(1), dim=0, return_inverse=True)
            a = rows.view(-1, targets, keys)
            base, own = self.edit.linear(targets, keys)  # type: ignore[attr-defined]
            # edited * a + target * (1 - a), with edited = P_src @ base + P_tgt * own.
            base, own = base[None] * a[:, :, None, :], own[None] * a + (1 - a)
            self._value_weights = ValueWeights(
                tuple(row_of_step.tolist()), base, own, _flags(base.flatten(2).ne(0).any(2)),
                _flags(own.ne(0).any(2)), _flags(own.eq(1).all(2)))
        return self._value_weights


def _flags(t: torch.Tensor) -> tuple[tuple[bool, ...], ...]:
    return tuple(tuple(row) for row in t.tolist())


@dataclasses.dataclass(frozen=True)
class ValueWeights:
    """A :class:`CrossEdit` as weights on each target's values ``V`` (keys, head_dim), per distinct
    row ``u`` of its window table, on the CPU: at a step of row ``u`` target ``t``'s attention output
    is ``P_src @ (base[u, t] @ V) + P_t @ (own[u, t] * V)`` (P: probabilities), two fused attention
    calls, or one where a term vanishes (the flags say which, without reading the device)."""

    row_of_step: tuple[int, ...]
    base: torch.Tensor  # (U, T, K, K)
    own: torch.Tensor  # (U, T, K)
    uses_base: tuple[tuple[bool, ...], ...]  # [u][t]: the target reads the source's attention
    uses_own: tuple[tuple[bool, ...], ...]  # ... reads its own attention
    own_is_one: tuple[tuple[bool, ...], ...]  # ... unweighted

    def row(self, step: int) -> int:
        return self.row_of_step[min(step, len(self.row_of_step) - 1)]


def to_device(t: torch.Tensor, device: torch.device, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A CPU tensor on ``device`` without synchronising the host: on CUDA copied asynchronously from
    pinned memory (a plain copy from pageable memory waits for the GPU)."""
    t = t if dtype is None else t.to(dtype)
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


@dataclasses.dataclass(frozen=True)
class FusedPlan:
    """What every layer of one kind (self- or cross-attention) does at the steps of one plan key, as
    device index tensors and weights (None: nothing of that sort). Row ``r`` attends with the queries
    and keys of row ``reads[r]``; rows ``mapped`` take values ``mapped_weights @ V``, rows ``scaled``
    values ``scaled_weights * V``; rows ``own`` add their own attention to values ``own_weights * V``.
    Its launches depend only on the key: a CUDA graph captured under the key replays it."""

    reads: torch.Tensor | None = None
    mapped: torch.Tensor | None = None
    mapped_weights: torch.Tensor | None = None  # (n, K, K)
    scaled: torch.Tensor | None = None
    scaled_weights: torch.Tensor | None = None  # (n, K)
    own: torch.Tensor | None = None
    own_weights: torch.Tensor | None = None  # (n, K)

    def attend(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float) -> torch.Tensor:
        q, k, v = query, key, value
        if self.reads is not None:
            q, k = query.index_select(0, self.reads), key.index_select(0, self.reads)
        if self.mapped is not None:
            mapped = torch.einsum("nkj,nhjd->nhkd", self.mapped_weights, value.index_select(0, self.mapped))
            v = v.index_copy(0, self.mapped, mapped)
        if self.scaled is not None:
            v = v.index_copy(0, self.scaled, value.index_select(0, self.scaled) * self.scaled_weights[:, None, :, None])
        out = sdpa(q, k, v, scale=scale)
        if self.own is not None:
            rows = self.own
            own = sdpa(query.index_select(0, rows), key.index_select(0, rows),
                       value.index_select(0, rows) * self.own_weights[:, None, :, None], scale=scale)
            out = out.index_add(0, rows, own)
        return out


@dataclasses.dataclass
class BranchGroup:
    """One edited image: its source branch, its target branches and how their cross-attention is built."""

    source: int
    targets: list[int]
    cross: CrossEdit | None = None


class EditController:
    """Edits the target rows' attention during sampling and records what local blend and heat maps need."""

    def __init__(self, steps: int, groups: list[BranchGroup], self_window: tuple[float, float] = (0.0, 0.0),
                 *, blend_downscale: int | None = None, keep_maps: bool = False) -> None:
        self.steps = steps
        self.groups = groups
        self.self_steps = (int(self_window[0] * steps), int(self_window[1] * steps))
        self.blend_downscale = blend_downscale
        self.keep_maps = keep_maps
        self.state: StepState | None = None
        self.blend_sum: dict[int, torch.Tensor] = {}  # branch -> (side*side, K), summed over layers and steps
        self.map_sum: dict[int, torch.Tensor] = {}  # branch -> (latent_h, latent_w, K)
        self.map_count = 0
        # Query-map sizes (h, w) of the layers each rule touched: "cross_edited", "self_replaced", "blend_read".
        self.seen: dict[str, set[tuple[int, int]]] = {}
        # The fused path's plans by (plan key, device, dtype), its groups' value weights on the device,
        # and this step's plan key per kind of layer.
        self._plans: dict[tuple, FusedPlan] = {}
        self._tables: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
        self._keys: dict[bool, tuple[tuple, bool]] = {}

    # -- the loop's controller protocol --------------------------------------------------------
    def begin_step(self, state: StepState) -> None:
        self.state = state
        self._keys.clear()

    def end_step(self, state: StepState) -> None:
        self.state = None

    # -- the processors' hook -------------------------------------------------------------------
    def attention(self, probs: torch.Tensor, layer: LayerInfo) -> torch.Tensor:
        state = self.state
        if state is None:  # a UNet call outside the loop's step (e.g. NTI's optimisation)
            return probs
        cond_rows = {r.branch: k for k, r in enumerate(state.rows) if r.kind == "cond"}
        edited = None
        for group in self.groups:
            tgt = [cond_rows[b] for b in group.targets if b in cond_rows]
            if group.source not in cond_rows or not tgt:
                continue
            src = cond_rows[group.source]
            if layer.is_cross and group.cross is not None:
                edited = probs.clone() if edited is None else edited
                edited[tgt] = group.cross.apply(probs[src], probs[tgt], state.i)
                self._saw("cross_edited", layer, state)
            elif not layer.is_cross and self.self_steps[0] <= state.i < self.self_steps[1]:
                edited = probs.clone() if edited is None else edited
                edited[tgt] = probs[src].unsqueeze(0).expand(len(tgt), -1, -1, -1)
                self._saw("self_replaced", layer, state)
        out = probs if edited is None else edited
        if layer.is_cross:
            # The maps the targets actually used, as the reference's store sees them (it keeps a
            # reference to the tensor the controller then edits in place).
            self._record(out, layer, cond_rows, state)
        return out

    # -- the fused processors' hook ---------------------------------------------------------------
    def needs_probs(self, layer: LayerInfo) -> bool:
        """Only cross-attention edited by an edit without a linear form takes the explicit path."""
        if self.state is None or not layer.is_cross:
            return False
        return any(g.cross is not None and not g.cross.is_linear for g in self.groups)

    def attend(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, layer: LayerInfo,
               scale: float) -> torch.Tensor:
        """:meth:`attention`'s edit computed with fused attention: (B, H, Q, d) from (B, H, N, d)."""
        state = self.state
        if state is None:
            return sdpa(query, key, value, scale=scale)
        if self._records(layer):
            self._record_maps(query, key, layer, scale)
        return self._prepare(state, layer, value.device, value.dtype).attend(query, key, value, scale)

    def graph_key(self, layer: LayerInfo, device: torch.device, dtype: torch.dtype) -> Hashable | None:
        """What decides the fused path's launches at this layer and step (:mod:`npinv.graphs`): its plan
        key; None (run eagerly) where maps are recorded or the explicit path runs. The plan is built
        here, before the call (a capture then copies nothing from the host), and since a replay runs no
        Python the rules' bookkeeping is done here too."""
        state = self.state
        if state is None:
            return ("idle",)
        if self._records(layer) or self.needs_probs(layer):
            return None
        self._prepare(state, layer, device, dtype)
        return self._step_key(state, layer.is_cross)[0]

    def _prepare(self, state: StepState, layer: LayerInfo, device: torch.device, dtype: torch.dtype) -> FusedPlan:
        """This step's plan for ``layer`` (built at its key's first step), with the rules' bookkeeping."""
        plan_key, touched = self._step_key(state, layer.is_cross)
        if touched:
            self._saw("cross_edited" if layer.is_cross else "self_replaced", layer, state)
        full = (plan_key, device, dtype)
        if full not in self._plans:
            self._plans[full] = self._plan(state, layer.is_cross, plan_key[-1], device, dtype)
        return self._plans[full]

    def _records(self, layer: LayerInfo) -> bool:
        return layer.is_cross and (self.keep_maps or layer.downscale == self.blend_downscale)

    def _step_key(self, state: StepState, is_cross: bool) -> tuple[tuple, bool]:
        """This step's plan key for one kind of layer (the row layout and, per group, the window
        table's row or whether self-attention is replaced) and whether a rule applies, once a step."""
        if is_cross not in self._keys:
            present = self._present(state)
            if is_cross:
                rule: Hashable = tuple(None if g.cross is None else g.cross.value_weights().row(state.i)
                                       for g in self.groups)
                touched = any(p and g.cross is not None for g, p in zip(self.groups, present, strict=True))
            else:
                rule = self.self_steps[0] <= state.i < self.self_steps[1]
                touched = rule and any(present)
            layout = tuple((r.branch, r.kind) for r in state.rows)
            self._keys[is_cross] = ((is_cross, layout, rule), touched)
        return self._keys[is_cross]

    def _present(self, state: StepState) -> list[list[tuple[int, int]]]:
        """Per group, its targets (index j, batch row) edited this step: none unless the source's and
        the target's conditional rows are both in the batch."""
        cond_rows = {r.branch: k for k, r in enumerate(state.rows) if r.kind == "cond"}
        return [[(j, cond_rows[b]) for j, b in enumerate(g.targets) if b in cond_rows]
                if g.source in cond_rows else [] for g in self.groups]

    def _plan(self, state: StepState, is_cross: bool, rule: Any, device: torch.device,
              dtype: torch.dtype) -> FusedPlan:
        """The plan of one key, built once on the CPU: a target reads its source's queries and keys
        where the source's probabilities replace its own, and the edit's linear form weights its values
        (:class:`FusedPlan`)."""
        cond_rows = {r.branch: k for k, r in enumerate(state.rows) if r.kind == "cond"}
        reads = list(range(len(state.rows)))
        mapped: list[tuple[int, torch.Tensor]] = []
        scaled: list[tuple[int, torch.Tensor]] = []
        own: list[tuple[int, torch.Tensor]] = []
        for g, (group, present) in enumerate(zip(self.groups, self._present(state), strict=True)):
            if not present:
                continue
            src = cond_rows[group.source]
            if is_cross and group.cross is not None:
                w, u = group.cross.value_weights(), rule[g]
                base, own_w = self._table(g, device, dtype)
                for j, row in present:
                    if w.uses_base[u][j]:
                        reads[row] = src
                        mapped.append((row, base[u, j]))
                        if w.uses_own[u][j]:
                            own.append((row, own_w[u, j]))
                    elif not w.own_is_one[u][j]:
                        scaled.append((row, own_w[u, j]))
            elif not is_cross and rule:
                for _, row in present:
                    reads[row] = src

        def rows(pairs: list[tuple[int, torch.Tensor]]) -> tuple[torch.Tensor | None, torch.Tensor | None]:
            if not pairs:
                return None, None
            return to_device(torch.tensor([r for r, _ in pairs]), device), torch.stack([w for _, w in pairs])

        identity = reads == list(range(len(reads)))
        return FusedPlan(None if identity else to_device(torch.tensor(reads), device),
                         *rows(mapped), *rows(scaled), *rows(own))

    def _table(self, group: int, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """A group's value weights on the device, copied there once an edit."""
        key = (group, device, dtype)
        if key not in self._tables:
            w = self.groups[group].cross.value_weights()  # type: ignore[union-attr]
            self._tables[key] = (to_device(w.base, device, dtype), to_device(w.own, device, dtype))
        return self._tables[key]

    def _record_maps(self, query: torch.Tensor, key: torch.Tensor, layer: LayerInfo, scale: float) -> None:
        """The cross-attention maps local blend and heat maps read, materialised and edited (by
        :meth:`attention`) for the record only: the layer's output stays the fused one, so it does not
        depend on what is recorded."""
        with torch.no_grad():
            probs = (query.float() @ key.float().transpose(-1, -2) * scale).softmax(dim=-1)
            self.attention(probs, layer)

    def _saw(self, what: str, layer: LayerInfo, state: StepState) -> None:
        self.seen.setdefault(what, set()).add(layer.map_size(state.z.shape))

    def _record(self, probs: torch.Tensor, layer: LayerInfo, cond_rows: dict[int, int], state: StepState) -> None:
        with torch.no_grad():
            mean = probs.detach().float().mean(1)  # over heads: (B, Q, K)
            if layer.downscale == self.blend_downscale:
                self._saw("blend_read", layer, state)
                for b, row in cond_rows.items():
                    self.blend_sum[b] = self.blend_sum.get(b, 0) + mean[row]
            if self.keep_maps:
                h, w = layer.map_size(state.z.shape)
                lh, lw = state.z.shape[-2:]
                for b, row in cond_rows.items():
                    grid = mean[row].T.reshape(1, -1, h, w)
                    up = F.interpolate(grid, size=(lh, lw), mode="bilinear", align_corners=False)[0]
                    self.map_sum[b] = self.map_sum.get(b, 0) + up.permute(1, 2, 0)
                self.map_count += 1

    def word_maps(self, branch: int, positions: list[int]) -> torch.Tensor:
        """Mean cross-attention heat map (latent_h, latent_w) of the tokens at ``positions``."""
        total = self.map_sum[branch][..., positions].sum(-1)
        return total / max(1, self.map_count)


def blend_mask(controller: EditController, branch: int, tokens: list[int], latent_hw: tuple[int, int],
               threshold: float = 0.3) -> torch.Tensor:
    """Local blend's mask (1, h, w) of ``tokens`` in ``branch``: their maps at the blend layers, summed
    over layers and the steps so far, max-pooled (3x3), resized to the latent, normalised by the max
    and thresholded, as in the reference code."""
    flat = controller.blend_sum[branch][:, tokens].sum(-1)  # (side*side,)
    side_h, side_w = map_size(latent_hw, controller.blend_downscale or 1)
    m = flat.reshape(1, 1, side_h, side_w)
    m = F.max_pool2d(m, 3, stride=1, padding=1)
    m = F.interpolate(m, size=latent_hw)
    m = m / m.amax().clamp_min(1e-12)
    return (m > threshold)[0]


@dataclasses.dataclass
class BlendWords:
    """Local blend of one group: the source word's tokens and each target's word tokens."""

    source_branch: int
    source_tokens: list[int]
    targets: list[tuple[int, list[int]]]  # (target branch, its word's tokens)


class LocalBlend(StepHook):
    """Keep everything outside the blend words' attention from the source branch:
    ``z_tgt = z_src + m * (z_tgt - z_src)`` after the first ``start`` fraction of steps.

    The mask is the union of the source word's and the target word's maps at the controller's
    blend resolution, max-pooled (3x3), resized to the latent, normalised by its max and
    thresholded (0.3), as in the reference code.
    """

    def __init__(self, controller: EditController, groups: list[BlendWords], *, threshold: float = 0.3,
                 start: float = 0.2) -> None:
        self.controller = controller
        self.groups = groups
        self.threshold = threshold
        self.start = start
        self.last_masks: list[torch.Tensor | None] = [None] * len(groups)

    def mask(self, branch: int, tokens: list[int], latent_hw: tuple[int, int]) -> torch.Tensor:
        return blend_mask(self.controller, branch, tokens, latent_hw, self.threshold)

    def after_step(self, state: StepState) -> None:
        if state.i < int(self.start * state.schedule.steps) or not self.controller.blend_sum:
            return
        hw = tuple(state.z.shape[-2:])
        z = state.z_next
        for g, words in enumerate(self.groups):
            s = words.source_branch
            src = self.mask(s, words.source_tokens, hw)
            masks = []
            for t, tokens in words.targets:
                m = (src | self.mask(t, tokens, hw)).to(z.dtype)
                z[t] = z[s] + m * (z[t] - z[s])
                masks.append(m)
            self.last_masks[g] = torch.stack(masks)
