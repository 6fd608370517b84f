"""The one denoising loop. Every method (DDIM, NTI, NPI, and the editing variants) is this loop
with other inputs: per-step negative embeddings for each branch, a guidance rule, an attention
controller and step hooks.

Rows are deduplicated by identity: a branch whose negative at step ``i`` *is* its condition
(NPI) costs one UNet row, and so does every branch when the guidance needs no negative (w = 1).

The loop reads nothing back from the device: its latents live there, rows are gathered by slices
(a list index would copy the indices over from the host), the UNet's non-finite checks are read
once when the loop ends (:meth:`Model.deferred_checks`), and every branch decision is made on
host values (step numbers, the row layout), never on a tensor's.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Protocol

import torch

from npinv.cost import Cost, Costed, Meter
from npinv.guidance import Guided
from npinv.model import Model, PromptEmbedding
from npinv.progress import Progress
from npinv.schedule import Schedule


@dataclasses.dataclass
class Branch:
    """One image being denoised: its condition and its negative embedding at each step."""

    cond: PromptEmbedding
    negatives: list[PromptEmbedding]

    @classmethod
    def constant(cls, cond: PromptEmbedding, negative: PromptEmbedding, steps: int) -> Branch:
        return cls(cond, [negative] * steps)


@dataclasses.dataclass(frozen=True)
class Row:
    """One UNet batch row: which branch's latent, with its condition or its negative."""

    branch: int
    kind: str  # "cond" | "neg"


@dataclasses.dataclass
class StepState:
    """What hooks and controllers see and may change during step ``i``.

    ``known`` holds outputs already computed for ``(branch, kind)`` (a hook that needed them);
    the loop does not compute those rows again. After the step, ``z_next`` holds the next latents
    and ``guidance_mask`` what the guidance rule reported of where it acted (ProxNPI), for hooks.
    """

    i: int
    t: int
    z: torch.Tensor
    branches: list[Branch]
    schedule: Schedule
    known: dict[tuple[int, str], torch.Tensor] = dataclasses.field(default_factory=dict)
    rows: list[Row] = dataclasses.field(default_factory=list)
    z_next: torch.Tensor | None = None
    guidance_mask: torch.Tensor | None = None
    z_prev: torch.Tensor | None = None  # BDIA sampling: each branch's latent before this one
    gamma: float = 1.0  # BDIA sampling: the inversion's damping factor

    def advance(self, eps: torch.Tensor, rows: slice = slice(None)) -> torch.Tensor:
        """The step's rule applied to the branches in ``rows`` with model output ``eps``: the DDIM
        step, or the BDIA step from the branches' last two latents (what hooks that optimise a step,
        like null-text inversion, must use)."""
        if self.z_prev is None:
            return self.schedule.denoise_step(self.z[rows], eps, self.i)
        return self.schedule.bdia_step(self.z[rows], self.z_prev[rows], eps, self.i, self.gamma)


class StepHook:
    """Base class of step hooks; both methods do nothing by default."""

    def before_step(self, state: StepState) -> None:  # noqa: B027 - optional override
        pass

    def after_step(self, state: StepState) -> None:  # noqa: B027 - optional override
        pass


class Guidance(Protocol):
    needs_negative: bool

    def guide(self, eps_neg: torch.Tensor, eps_cond: torch.Tensor) -> Guided: ...


class Controller(Protocol):
    """Attention control: told the step and the row layout before each UNet call."""

    def begin_step(self, state: StepState) -> None: ...

    def end_step(self, state: StepState) -> None: ...


@dataclasses.dataclass
class SampleResult(Costed):
    latents: torch.Tensor  # (B, C, h, w): each branch's final latent
    cost: Cost


def sample(
    model: Model,
    z_start: torch.Tensor,
    schedule: Schedule,
    branches: Sequence[Branch],
    guidance: Guidance,
    *,
    controller: Controller | None = None,
    hooks: Sequence[StepHook] = (),
    progress: str | None = None,
    pair_start: torch.Tensor | None = None,
    pair_gamma: float = 1.0,
) -> SampleResult:
    """Denoise ``z_start`` (one latent per branch, or one shared by all) from the top of the grid.

    ``pair_start`` (an inversion's ``z*[n-1]``, per branch or shared): BDIA sampling. The first step
    is not computed (every branch takes ``pair_start``: no UNet call, no hooks), and each later step
    is the BDIA step from the branch's last two latents (:meth:`Schedule.bdia_step`) with damping
    factor ``pair_gamma`` (the inversion's).

    A flow grid whose ``solver`` is ``midpoint`` or ``fireflow`` (:class:`npinv.flow_schedule.FlowSchedule`,
    set from a midpoint or FireFlow inversion's scheme) takes each step as the explicit midpoint step over
    the same guided rows: the guided velocity at the step's start (FireFlow: the previous step's midpoint
    one, after the first step), then at the midpoint, and the Euler move with the latter. Hooks run once a
    step; an attention controller sees both evaluations."""
    branches = list(branches)
    # The loop's state lives on the model's device (an inversion loaded from a file is on the CPU).
    z = _per_branch(z_start.to(model.device), len(branches))
    if pair_start is not None:
        pair_start = _per_branch(pair_start.to(model.device), len(branches))
    z_prev = None
    if len(branches) == 0 or z.shape[0] != len(branches):
        raise ValueError(f"{z.shape[0]} latents for {len(branches)} branches")
    for b in branches:
        if len(b.negatives) != schedule.steps:
            raise ValueError(f"a branch has {len(b.negatives)} negatives for {schedule.steps} steps")
    meter = Meter(model)
    embed_cache = _EmbeddingCache()
    # A flow grid may ask for a second-order step (an inversion made by the midpoint or FireFlow scheme).
    solver = getattr(schedule, "solver", "euler")
    if solver != "euler" and pair_start is not None:
        raise ValueError(f"BDIA sampling takes Euler steps, not {solver} steps")
    reused: Guided | None = None  # FireFlow: the previous step's guided midpoint velocity

    def guided_output(state: StepState, z: torch.Tensor, t: float) -> Guided:
        """Every branch's guided model output at latents ``z`` and timestep ``t``: the rows the layout
        needs in one call (none already known), then the guidance rule."""
        state.rows = _rows(branches, state.i, guidance.needs_negative, state.known)
        out = dict(state.known)
        if state.rows:
            embeds = [branches[r.branch].cond if r.kind == "cond" else branches[r.branch].negatives[state.i]
                      for r in state.rows]
            if controller is not None:
                controller.begin_step(state)
            try:
                with torch.no_grad():
                    batch = model.unet_output(gather_rows(z, [r.branch for r in state.rows]), t, embed_cache.cat(embeds))
            finally:
                if controller is not None:
                    controller.end_step(state)
            for k, r in enumerate(state.rows):
                out[(r.branch, r.kind)] = batch[k : k + 1]
        eps_cond = torch.cat([out[(b, "cond")] for b in range(len(branches))])
        # A shared negative (NPI) or a guidance without one reuses the condition's output.
        eps_neg = torch.cat([out.get((b, "neg"), out[(b, "cond")]) for b in range(len(branches))])
        return guidance.guide(eps_neg, eps_cond)

    with model.deferred_checks():
        for i, t in enumerate(Progress(schedule.timesteps, desc=progress, unit="step")):
            if pair_start is not None and i == 0:
                z_prev, z = z, pair_start
                continue
            state = StepState(i, t, z, branches, schedule, z_prev=z_prev if pair_start is not None else None,
                              gamma=pair_gamma)
            for hook in hooks:
                hook.before_step(state)
            guided = reused if reused is not None else guided_output(state, z, t)
            if solver == "euler":
                state.z_next = state.advance(guided.eps)
            else:
                # The explicit midpoint step on the guided velocity (RF-Solver; FireFlow keeps the midpoint
                # velocity as the next step's start): bit for bit flow_schedule.midpoint_step's arithmetic.
                state.known = {}  # a hook's rows were at the step's start, not at its midpoint
                guided = guided_output(state, schedule.half_denoise_step(z, guided.eps, i), schedule.midpoint_timestep(i))
                state.z_next = schedule.denoise_step(z, guided.eps, i)
                reused = guided if solver == "fireflow" else None
            state.guidance_mask = guided.mask
            for hook in hooks:
                hook.after_step(state)
            z_prev, z = z, state.z_next
    return SampleResult(z, meter.cost)


def _per_branch(z: torch.Tensor, n: int) -> torch.Tensor:
    z = z.to(torch.float32)
    return z.expand(n, *z.shape[1:]).clone() if z.shape[0] == 1 and n > 1 else z


def gather_rows(z: torch.Tensor, index: list[int]) -> torch.Tensor:
    """``z[index]`` from slices: each run of consecutive rows is a view, and several runs one
    concatenation (indexing with a list copies the list to the device first, a synchronisation)."""
    runs: list[tuple[int, int]] = []
    for b in index:
        if runs and runs[-1][1] == b:
            runs[-1] = (runs[-1][0], b + 1)
        else:
            runs.append((b, b + 1))
    parts = [z[start:stop] for start, stop in runs]
    return parts[0] if len(parts) == 1 else torch.cat(parts)


class _EmbeddingCache:
    """The rows' embeddings concatenated, made again only when the row layout's embeddings change: NPI's
    rows are the same embedding objects at every step (NTI's negatives are new objects each step)."""

    def __init__(self) -> None:
        self._embeds: list[PromptEmbedding] = []  # held, so that no id below is reused meanwhile
        self._cat: PromptEmbedding | None = None

    def cat(self, embeds: list[PromptEmbedding]) -> PromptEmbedding:
        same = len(embeds) == len(self._embeds) and all(a is b for a, b in zip(embeds, self._embeds, strict=True))
        if not same or self._cat is None:
            self._embeds, self._cat = list(embeds), PromptEmbedding.cat(embeds)
        return self._cat


def _shares(branch: Branch, i: int) -> bool:
    return branch.negatives[i] is branch.cond


def _rows(branches: list[Branch], i: int, needs_negative: bool, known: dict) -> list[Row]:
    rows = []
    for b, branch in enumerate(branches):
        if needs_negative and not _shares(branch, i) and (b, "neg") not in known:
            rows.append(Row(b, "neg"))
    for b in range(len(branches)):
        if (b, "cond") not in known:
            rows.append(Row(b, "cond"))
    return rows
