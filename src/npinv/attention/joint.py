"""Prompt-to-Prompt on joint attention (SD3 / SD3.5 MMDiT, FLUX.1 double- and single-stream blocks).

One softmax covers image and text keys. The "cross-attention map" of an image query is its row of
the image-query x text-key block renormalised over the text keys; word swap, refinement and
reweighting replace that distribution with the edited one and keep the query's text mass
(``m_t``, the share of its attention on text keys) and its image-key row as they are:

    P'_t[img, txt] = m_t * E(C_src, C_t),  P'_t[img, img] = P_t[img, img],  C = P[img, txt] / m

(docs/method.md "Prompt-to-Prompt on joint attention"). The self-attention analogue (``--self-replace``)
injects the source's image queries and keys into its targets. Text queries are never edited: the
target's text stream attends with its own queries (docs/method.md says why).

Two modes as for UNets: ``explicit`` materialises the hooked blocks' probabilities and edits them;
``fused`` computes the same output with ``scaled_dot_product_attention`` calls: the target's image
queries over all keys with the own-weighted text values and one extra value channel that is 1 on the
text keys (which returns ``m_t``), plus ``m_t`` times the source's image queries over the source's
text keys alone (a softmax over the text keys is ``C_src``) with the edit's map folded into the values.
Probabilities are materialised only for recorded maps (local blend, heat maps), and then only the
image x text block, as a softmax over the text keys.

The processors take diffusers' projections and layouts as they are (``JointAttnProcessor2_0``,
``FluxAttnProcessor``) and hand the hook queries, keys and values as (B, H, S, d) with the image and
text slices of S; installed with ``set_attn_processor`` and restored on exit (:func:`joint_attention`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch.nn.functional import scaled_dot_product_attention as sdpa

from npinv.attention.processor import ATTENTION_MODES, LayerInfo

# Zero channels appended to the queries and keys (scores unchanged) so the values can carry the text
# indicator and keep a head size the fused kernels take (multiples of 8).
_PAD = 8


@dataclasses.dataclass(frozen=True)
class JointLayout:
    """Where one call's image and text tokens sit along the sequence."""

    image: slice
    text: slice

    @property
    def has_text(self) -> bool:
        return self.text.stop > self.text.start


@dataclasses.dataclass
class _Step:
    """One step's plan, the same for every hooked block (built once per step on the CPU; its index and
    weight tensors are moved to each device once, by :meth:`on`, not at every block)."""

    inject_to: torch.Tensor | None  # target rows taking their source's image queries and keys
    inject_from: torch.Tensor | None
    edited: list[int]  # target rows whose cross-attention is edited
    sources: list[int]  # ... and their source rows
    base: torch.Tensor | None  # (n, K, K): weights of the source's renormalised text map on the values
    uses_base: list[bool]
    own: torch.Tensor | None  # (n, K): weights of the row's own text attention
    cond_rows: dict[int, int]
    groups: list[tuple[Any, int, list[tuple[int, int]]]]  # (CrossEdit, source row, [(target index, row)])
    linear: bool  # every edit has a linear form (else the fused mode computes edited blocks explicitly)
    _moved: dict = dataclasses.field(default_factory=dict)

    def on(self, device: torch.device, dtype: torch.dtype, rows: int) -> dict[str, torch.Tensor | None]:
        key = (device, dtype, rows)
        if key not in self._moved:
            pick = [n for n, used in enumerate(self.uses_base) if used]
            others = [r for r in range(rows) if r not in set(self.edited)]

            def index(values: list[int]) -> torch.Tensor | None:
                return torch.tensor(values, device=device) if values else None

            self._moved[key] = {
                "inject_to": None if self.inject_to is None else self.inject_to.to(device),
                "inject_from": None if self.inject_from is None else self.inject_from.to(device),
                "edited": index(self.edited), "others": index(others),
                "own": None if self.own is None else self.own.to(device, dtype),
                "at": index(pick), "src": index([self.sources[n] for n in pick]),
                "base": self.base[pick].to(device, dtype) if pick else None,
            }
        return self._moved[key]


class JointSession:
    """One installation: the controller, the mode, the text length (FLUX's single-stream blocks are not
    told it), and the per-step plan and the edits' linear forms, built once and shared by every block."""

    def __init__(self, hook: Any, mode: str, text_len: int | None) -> None:
        self.hook = hook
        self.fused = mode == "fused"
        self.text_len = text_len
        self._step: tuple[Any, _Step | None] | None = None
        self._linear: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.explicit_calls = 0
        self.fused_calls = 0

    # -- the plan ---------------------------------------------------------------------------------
    def plan(self) -> _Step | None:
        state = getattr(self.hook, "state", None)
        if state is None:
            return None
        key = (id(state), state.i)
        if self._step is None or self._step[0] != key:
            self._step = (key, self._make_plan(state))
        return self._step[1]

    def _make_plan(self, state) -> _Step:
        hook = self.hook
        cond_rows = {r.branch: k for k, r in enumerate(state.rows) if r.kind == "cond"}
        inject: list[tuple[int, int]] = []
        edited, sources, bases, owns, uses_base = [], [], [], [], []
        groups = []
        linear = True
        in_self = hook.self_steps[0] <= state.i < hook.self_steps[1]
        for group in hook.groups:
            present = [(j, cond_rows[b]) for j, b in enumerate(group.targets) if b in cond_rows]
            if group.source not in cond_rows or not present:
                continue
            src = cond_rows[group.source]
            if in_self:
                inject += [(row, src) for _, row in present]
            cross = group.cross
            if cross is None:
                continue
            groups.append((cross, src, present))
            if not callable(getattr(cross.edit, "linear", None)):
                linear = False
                continue
            base, own = self._weights(cross, state.i)
            for j, row in present:
                # A target outside its window (no source term, own weights 1) is left alone.
                if base[j].any() or not bool(own[j].eq(1).all()):
                    edited.append(row)
                    sources.append(src)
                    bases.append(base[j])
                    owns.append(own[j])
                    uses_base.append(bool(base[j].any()))
        return _Step(
            torch.tensor([r for r, _ in inject]) if inject else None,
            torch.tensor([s for _, s in inject]) if inject else None,
            edited, sources, torch.stack(bases) if bases else None, uses_base,
            torch.stack(owns) if owns else None, cond_rows, groups, linear)

    def _weights(self, cross, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``CrossEdit.apply`` at ``step`` as (base (T, K, K), own (T, K)): edited = C_src @ base + C_t * own."""
        if id(cross) not in self._linear:
            targets, keys = cross.alpha.shape[1:]
            self._linear[id(cross)] = cross.edit.linear(targets, keys)
        base, own = self._linear[id(cross)]
        a = cross.alpha[min(step, len(cross.alpha) - 1)].detach().cpu().float()
        return base * a[:, None, :], own * a + (1 - a)

    # -- the processors' call -------------------------------------------------------------------------
    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: LayerInfo,
               lay: JointLayout) -> torch.Tensor:
        """The block's attention output (B, H, S, d) from (B, H, S, d) queries, keys and values."""
        plan = self.plan()
        if plan is None:  # a call outside the loop's steps (e.g. NTI's optimisation): unedited
            return sdpa(q, k, v) if self.fused else explicit_attention(q, k, v)
        hook, state = self.hook, self.hook.state
        moved = plan.on(q.device, v.dtype, q.shape[0])
        if plan.inject_to is not None:
            to, frm = moved["inject_to"], moved["inject_from"]
            q, k = q.clone(), k.clone()
            q[to, :, lay.image] = q[frm, :, lay.image]
            k[to, :, lay.image] = k[frm, :, lay.image]
            hook._saw("self_replaced", layer, state)
        if not lay.has_text:
            return self._plain(q, k, v)
        if plan.groups:
            hook._saw("cross_edited", layer, state)
        record = hook.keep_maps or layer.downscale == hook.blend_downscale
        if not self.fused or not plan.linear:
            self.explicit_calls += 1
            out, maps = _explicit_edit(q, k, v, lay, plan, state.i)
            if record:
                hook._record(maps, layer, plan.cond_rows, state)
            return out
        self.fused_calls += 1
        if record:
            with torch.no_grad():
                hook._record(_edited_maps(q, k, lay, plan, state.i), layer, plan.cond_rows, state)
        if not plan.edited:
            return sdpa(q, k, v)
        return _fused_edit(q, k, v, lay, moved)

    def _plain(self, q, k, v) -> torch.Tensor:
        if self.fused:
            self.fused_calls += 1
            return sdpa(q, k, v)
        self.explicit_calls += 1
        return explicit_attention(q, k, v)


def explicit_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return _probs(q, k) @ v


def _probs(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    return (q @ k.transpose(-1, -2) * (1 / math.sqrt(q.shape[-1]))).softmax(dim=-1)


def _edit_maps(maps: torch.Tensor, plan: _Step, step: int) -> torch.Tensor:
    """The renormalised image->text maps (B, H, Ni, Nt) with every target's replaced by its edit."""
    out = maps.clone()
    for cross, src, present in plan.groups:
        rows = [row for _, row in present]
        out[rows] = cross.apply(maps[src], maps[rows], step).to(out.dtype)
    return out


def _explicit_edit(q, k, v, lay: JointLayout, plan: _Step, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference form: probabilities over all keys, the image->text block of each target replaced by
    its query's text mass times the edited renormalised map. Returns the output and the edited maps."""
    probs = _probs(q, k)
    block = probs[:, :, lay.image, lay.text]
    mass = block.sum(-1, keepdim=True)
    maps = _edit_maps(block / mass, plan, step)
    for _, _, present in plan.groups:
        for _, row in present:
            probs[row, :, lay.image, lay.text] = maps[row] * mass[row]
    return probs @ v, maps


def _edited_maps(q, k, lay: JointLayout, plan: _Step, step: int) -> torch.Tensor:
    """The recorded maps without the full probabilities: a softmax over the text keys alone is the
    renormalised image->text block."""
    maps = _probs(q[:, :, lay.image].float(), k[:, :, lay.text].float())
    return _edit_maps(maps, plan, step)


def _fused_edit(q, k, v, lay: JointLayout, moved: dict[str, torch.Tensor | None]) -> torch.Tensor:
    """:func:`_explicit_edit`'s output with SDPA calls (module doc): unedited rows and every row's text
    queries as diffusers computes them; the edited rows' image queries from the two terms."""
    d = v.shape[-1]
    edited, others = moved["edited"], moved["others"]
    out = torch.empty_like(v)
    if others is not None:
        out.index_copy_(0, others, sdpa(q.index_select(0, others), k.index_select(0, others),
                                        v.index_select(0, others)))
    qe, ke, ve = q.index_select(0, edited), k.index_select(0, edited), v.index_select(0, edited)
    rows = torch.empty_like(ve)
    rows[:, :, lay.text] = sdpa(qe[:, :, lay.text], ke, ve)  # the text stream: the target's own attention
    values = ve.clone()
    values[:, :, lay.text] = ve[:, :, lay.text] * moved["own"][:, None, :, None]
    indicator = torch.zeros(*ve.shape[:3], _PAD, device=v.device, dtype=v.dtype)
    indicator[:, :, lay.text, 0] = 1
    wide = sdpa(F.pad(qe[:, :, lay.image], (0, _PAD)), F.pad(ke, (0, _PAD)), torch.cat([values, indicator], -1),
                scale=1 / math.sqrt(q.shape[-1]))
    image_out, mass = wide[..., :d], wide[..., d : d + 1]
    at, src = moved["at"], moved["src"]
    if at is not None:
        mapped = torch.einsum("nkj,nhjd->nhkd", moved["base"], ve.index_select(0, at)[:, :, lay.text])
        from_source = sdpa(q.index_select(0, src)[:, :, lay.image], k.index_select(0, src)[:, :, lay.text], mapped)
        image_out = image_out.index_add(0, at, mass.index_select(0, at) * from_source)
    rows[:, :, lay.image] = image_out
    return out.index_copy(0, edited, rows)


# -- the processors -----------------------------------------------------------------------------------
class JointControlledProcessor:
    """diffusers' ``JointAttnProcessor2_0`` (``kind="sd3"``: image tokens first; SD3.5's image-only
    ``attn2`` too) or ``FluxAttnProcessor`` (``"flux"``: text first; single-stream blocks get the
    concatenated sequence) with the attention itself handed to a :class:`JointSession`."""

    def __init__(self, session: JointSession, layer: LayerInfo, kind: str, original: Any) -> None:
        self.session = session
        self.layer = layer
        self.kind = kind
        self.original = original

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        if attention_mask is not None:  # never passed by npinv's calls: leave such a call to diffusers
            extra = {"image_rotary_emb": image_rotary_emb} if self.kind == "flux" else {}
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, **extra)
        if self.kind == "sd3":
            return self._sd3(attn, hidden_states, encoder_hidden_states)
        return self._flux(attn, hidden_states, encoder_hidden_states, image_rotary_emb)

    def _sd3(self, attn, hidden_states, encoder_hidden_states):
        batch = hidden_states.shape[0]
        query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        head_dim = key.shape[-1] // attn.heads

        def heads(x):
            return x.view(batch, -1, attn.heads, head_dim).transpose(1, 2)

        query, key, value = heads(query), heads(key), heads(value)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        n_img = query.shape[2]
        if encoder_hidden_states is not None:
            eq, ek, ev = (heads(p(encoder_hidden_states)) for p in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj))
            if attn.norm_added_q is not None:
                eq = attn.norm_added_q(eq)
            if attn.norm_added_k is not None:
                ek = attn.norm_added_k(ek)
            query, key, value = torch.cat([query, eq], 2), torch.cat([key, ek], 2), torch.cat([value, ev], 2)
        lay = JointLayout(slice(0, n_img), slice(n_img, query.shape[2]))
        out = self.session.attend(query, key, value, self.layer, lay)
        out = out.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).to(query.dtype)
        text = None
        if encoder_hidden_states is not None:
            out, text = out[:, :n_img], out[:, n_img:]
            if not attn.context_pre_only:
                text = attn.to_add_out(text)
        out = attn.to_out[1](attn.to_out[0](out))
        return out if encoder_hidden_states is None else (out, text)

    def _flux(self, attn, hidden_states, encoder_hidden_states, image_rotary_emb):
        from diffusers.models.embeddings import apply_rotary_emb
        from diffusers.models.transformers.transformer_flux import _get_qkv_projections

        query, key, value, eq, ek, ev = _get_qkv_projections(attn, hidden_states, encoder_hidden_states)
        query, key, value = (x.unflatten(-1, (-1, attn.head_dim)) for x in (query, key, value))
        query, key = attn.norm_q(query), attn.norm_k(key)
        if attn.added_kv_proj_dim is not None and encoder_hidden_states is not None:
            eq, ek, ev = (x.unflatten(-1, (-1, attn.head_dim)) for x in (eq, ek, ev))
            eq, ek = attn.norm_added_q(eq), attn.norm_added_k(ek)
            query, key, value = torch.cat([eq, query], 1), torch.cat([ek, key], 1), torch.cat([ev, value], 1)
            n_txt = encoder_hidden_states.shape[1]
            if self.session.text_len not in (None, n_txt):  # the single-stream blocks would split wrongly
                raise ValueError(f"text of {n_txt} tokens, but the edit addresses {self.session.text_len}")
        else:  # a single-stream block: the sequence is [text; image] already, of the session's text length
            n_txt = self.session.text_len or 0
        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)
        lay = JointLayout(slice(n_txt, query.shape[1]), slice(0, n_txt))
        out = self.session.attend(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), self.layer, lay)
        out = out.transpose(1, 2).flatten(2, 3).to(query.dtype)
        if encoder_hidden_states is None:
            return out
        text, out = out.split_with_sizes([n_txt, out.shape[1] - n_txt], dim=1)
        out = attn.to_out[1](attn.to_out[0](out.contiguous()))
        return out, attn.to_add_out(text.contiguous())


def joint_layers(transformer, kind: str, patch: int) -> dict[str, LayerInfo]:
    """Every attention layer of an SD3 / FLUX transformer: joint and single-stream layers see text
    (``is_cross``); SD3.5's ``attn2`` layers are image-only. All share one map size (latent / patch)."""
    infos = {}
    for key in transformer.attn_processors:
        name = key.removesuffix(".processor")
        infos[key] = LayerInfo(name, not name.endswith(".attn2"), patch)
    return infos


@contextlib.contextmanager
def joint_attention(transformer, hook: Any, *, kind: str, patch: int, text_len: int | None,
                    mode: str = "explicit", self_replace: bool = True,
                    blocks: Callable[[str], bool] | None = None) -> Iterator[JointSession]:
    """Route a transformer's joint-attention layers (and, with ``self_replace``, SD3.5's image-only
    ``attn2`` layers) through ``hook``, an :class:`~npinv.attention.control.EditController`; ``blocks``
    picks layers by name (default all). Every processor is restored on exit, error or not."""
    if mode not in ATTENTION_MODES:
        raise ValueError(f"attention mode {mode!r} is not one of {ATTENTION_MODES}")
    if kind not in ("sd3", "flux"):
        raise ValueError(f"no joint attention for the {kind!r} family")
    original = dict(transformer.attn_processors)
    session = JointSession(hook, mode, text_len)
    processors = {}
    for key, info in joint_layers(transformer, kind, patch).items():
        hooked = (info.is_cross or self_replace) and (blocks is None or blocks(info.name))
        processors[key] = JointControlledProcessor(session, info, kind, original[key]) if hooked else original[key]
    transformer.set_attn_processor(processors)
    try:
        yield session
    finally:
        transformer.set_attn_processor(original)
