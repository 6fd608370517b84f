"""The one denoising loop. Every method (DDIM, NTI, NPI, and the editing variants) is this loop
with other inputs: per-step negative embeddings for each branch, a guidance rule, an attention
controller and step hooks.

Rows are deduplicated by identity: a branch whose negative at step ``i`` *is* its condition
(NPI) costs one UNet row, and so does every branch when the guidance needs no negative (w = 1).
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
) -> SampleResult:
    """Denoise ``z_start`` (one latent per branch, or one shared by all) from the top of the grid."""
    branches = list(branches)
    z = z_start.to(torch.float32)
    if z.shape[0] == 1 and len(branches) > 1:
        z = z.expand(len(branches), *z.shape[1:]).clone()
    if z.shape[0] != len(branches):
        raise ValueError(f"{z.shape[0]} latents for {len(branches)} branches")
    for b in branches:
        if len(b.negatives) != schedule.steps:
            raise ValueError(f"a branch has {len(b.negatives)} negatives for {schedule.steps} steps")
    meter = Meter(model)
    for i, t in enumerate(Progress(schedule.timesteps, desc=progress, unit="step")):
        state = StepState(i, t, z, branches, schedule)
        for hook in hooks:
            hook.before_step(state)
        state.rows = _rows(branches, i, guidance.needs_negative, state.known)
        out = dict(state.known)
        if state.rows:
            embeds = [branches[r.branch].cond if r.kind == "cond" else branches[r.branch].negatives[i] for r in state.rows]
            if controller is not None:
                controller.begin_step(state)
            try:
                with torch.no_grad():
                    batch = model.unet_output(z[[r.branch for r in state.rows]], t, PromptEmbedding.cat(embeds))
            finally:
                if controller is not None:
                    controller.end_step(state)
            for k, r in enumerate(state.rows):
                out[(r.branch, r.kind)] = batch[k : k + 1]
        eps_cond = torch.cat([out[(b, "cond")] for b in range(len(branches))])
        # A shared negative (NPI) or a guidance without one reuses the condition's output.
        eps_neg = torch.cat([out.get((b, "neg"), out[(b, "cond")]) for b in range(len(branches))])
        guided = guidance.guide(eps_neg, eps_cond)
        state.guidance_mask = guided.mask
        state.z_next = schedule.denoise_step(z, guided.eps, i)
        for hook in hooks:
            hook.after_step(state)
        z = state.z_next
    return SampleResult(z, meter.cost)


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
