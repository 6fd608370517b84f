"""Text-guided editing of an inverted image with Prompt-to-Prompt attention control.

Branch 0 is the source (its prompt, starting from ``z*[n]``); branches 1.. are the targets.
Several images edit in one UNet batch (:func:`edit_batch`) as branch groups, each edited from its
own source; :func:`edit` is the one-image case. The method (:mod:`npinv.methods`) chooses the
negatives, the guidance rule and its hooks: NPI gives every branch the source embedding (so the
source branch costs one row and the whole step 1 + 2T rows instead of 2 + 2T). The controller
(:mod:`npinv.attention.controllers`) builds the targets' attention. Direct inversion is a hook that
pins the source branch to the inversion trajectory; it combines with every method.
"""

from __future__ import annotations

import dataclasses

import torch

from npinv.attention.align import find_word
from npinv.attention.control import BlendWords, BranchGroup, CrossEdit, EditController, LocalBlend
from npinv.attention.controllers import get_controller
from npinv.attention.install import BLEND_SIDE, attention_control, blend_downscale, edit_tokens
from npinv.checks import check_prompt
from npinv.cost import Cost, Costed, Meter
from npinv.errors import NpinvError
from npinv.inversion import Inversion
from npinv.methods import EditGroup, check_scheme, get_method, prepared_negatives
from npinv.model import Model, PromptEmbedding
from npinv.sampling import Branch, StepHook, StepState, sample
from npinv.settings import EditSettings, flag_name

__all__ = ["EditSettings", "EditResult", "EditJob", "edit", "edit_batch", "cross_edit", "blend_tokens",
           "check_edit_words", "check_edit", "blend_downscale", "edit_tokens", "BLEND_SIDE"]


@dataclasses.dataclass
class EditResult(Costed):
    """Edited images (one per target, in order) and the source branch's image, with their cost."""

    images: torch.Tensor  # (T, 3, H, W) in [-1, 1]
    source_image: torch.Tensor  # (1, 3, H, W): the source branch (a reconstruction)
    latents: torch.Tensor  # (1 + T, C, h, w): final latents, source first
    targets: list[str]
    cost: Cost  # the whole call's (every image of a batch), NTI's optimisation included
    inversion: Inversion  # with NTI's optimised negatives when the method made them
    controller: EditController | None
    blend_mask: torch.Tensor | None
    settings: EditSettings  # as run (the guidance resolved)
    first_branch: int = 0  # this image's source branch in the controller (several images in one batch)
    prepare_cost: Cost = Cost()  # the part of ``cost`` spent preparing negatives (NTI's optimisation)


@dataclasses.dataclass
class EditJob:
    """One image to edit in a batch: its inversion and its target prompts."""

    inversion: Inversion
    targets: list[str]


class DirectInversion(StepHook):
    """Direct inversion (Ju et al. 2023): after each step every source branch is put back on its
    image's inversion trajectory (``z_src += z*[k] - z_src``), so it reproduces it exactly."""

    def __init__(self, sources: list[tuple[int, torch.Tensor]]) -> None:
        self.sources = sources  # (source branch, its trajectory)

    def after_step(self, state: StepState) -> None:
        k = state.schedule.steps - 1 - state.i
        for branch, trajectory in self.sources:
            state.z_next[branch] = trajectory[k].to(state.z_next)


def edit(model: Model, inv: Inversion, targets: list[str], settings: EditSettings, *,
         source_rows: str = "shared", progress: bool = False) -> EditResult:
    """Edit an inverted image toward each of ``targets`` in one batched run.

    ``source_rows="separate"`` gives NPI's source branch a copy of its embedding as the negative,
    reproducing the reference code's 4-rows-a-step layout (for tests and comparisons).
    """
    return edit_batch(model, [EditJob(inv, list(targets))], settings, source_rows=source_rows, progress=progress)[0]


def cross_edit(tokenizer, source_prompt: str, targets: list[str], steps: int,
               settings: EditSettings) -> CrossEdit | None:
    """The cross-attention edit of one image's targets under ``settings`` (None: no control)."""
    return get_controller(settings.controller).cross_edit(tokenizer, source_prompt, targets, steps, settings)


def blend_tokens(tokenizer, source_prompt: str, targets: list[str], blend: tuple[str, str]) -> tuple[list, list]:
    """Local blend's token positions: the source word's, and the target word's in each target."""
    src_word, tgt_word = blend
    return find_word(tokenizer, source_prompt, src_word), [find_word(tokenizer, t, tgt_word) for t in targets]


def check_edit_words(tokenizer, source_prompt: str, targets: list[str], steps: int, settings: EditSettings) -> None:
    """An edit's checks that need only the tokenizer (reweight, blend and per-word cross-replace words,
    word-swap counts, words past the token limit): the front ends call it before any model work, so a
    bad word is refused before the inversion's cost and before any warning about the prompts."""
    cross_edit(tokenizer, source_prompt, list(targets), steps, settings)
    if settings.blend is not None:
        blend_tokens(tokenizer, source_prompt, list(targets), settings.blend)


def check_edit(model: Model, source_prompt: str, targets: list[str], steps: int, settings: EditSettings) -> None:
    """Everything about an edit that can be known before the inversion: the method against the model
    (FlowEdit on a UNet) and its inversion scheme, then the words against the rows the edit addresses
    (:func:`edit_tokens`: SD3's CLIP and T5 rows, FLUX's T5 pieces)."""
    get_method(settings.method).check_model(model)
    check_layer_knobs(model, settings)
    check_edit_words(edit_tokens(model), source_prompt, targets, steps, settings)


# Settings that pick UNet attention layers by their map size; a flow transformer's blocks all see the
# latent at one patch grid, so on a flow model they would change nothing: refused rather than ignored.
UNET_LAYER_KNOBS = ("self_replace_size", "blend_res")


def check_layer_knobs(model: Model, settings: EditSettings) -> None:
    """Refuse, in one line, a layer-size knob set (away from its default) for a flow model."""
    if not getattr(model, "is_flow", False):
        return
    defaults = EditSettings()
    for name in UNET_LAYER_KNOBS:
        if getattr(settings, name) != getattr(defaults, name):
            raise NpinvError(f"--{flag_name(name)} picks UNet attention layers by map size; every block of the flow "
                             f"model {model.name} sees the latent at one patch grid, so it has no effect there: "
                             "leave it out")


def edit_batch(model: Model, jobs: list[EditJob], settings: EditSettings, *, source_rows: str = "shared",
               progress: bool = False) -> list[EditResult]:
    """Edit several inverted images (same model, schedule and latent size) with the same settings,
    every image's source and targets in one UNet batch per step. Each image's result is the one
    :func:`edit` gives for it alone (up to float rounding of a larger batch). The cost of each
    result is the whole call's. A settings guidance of None is the model's recommended one.
    """
    settings = settings.resolved(model)
    settings.validate()
    method = get_method(settings.method)
    if not jobs:
        raise NpinvError("nothing to edit")
    for job in jobs:
        if not job.targets:
            raise NpinvError("give at least one target prompt")
        for target in job.targets:
            check_prompt(target, "the target prompt")
    method.check_model(model)
    check_layer_knobs(model, settings)
    if not method.needs_inversion:  # FlowEdit: its own loop from each image's clean latent
        from npinv.flowedit import edit_jobs

        return edit_jobs(model, jobs, settings, progress=progress)
    first = jobs[0].inversion
    check_scheme(method, first.scheme_name)
    for job in jobs:
        job.inversion.check_sampled_by(method.name)
    for job in jobs[1:]:
        inv = job.inversion
        if (inv.schedule != first.schedule or inv.trajectory.shape != first.trajectory.shape
                or inv.model != first.model or (inv.pair_start is None) != (first.pair_start is None)
                or inv.pair_gamma != first.pair_gamma):
            raise NpinvError("images edited in one batch need the same model, steps, offset, size and inversion scheme")
    tok = edit_tokens(model)  # the rows word positions address, per family
    steps = first.steps
    hw = tuple(first.trajectory.shape[-2:])
    meter = Meter(model)

    # Branch layout: image j's source, then its targets; groups record where each image sits.
    groups: list[BranchGroup] = []
    blend_words: list[BlendWords] = []
    offset = 0
    for job in jobs:
        source_prompt, n = job.inversion.source_prompt, len(job.targets)
        group = BranchGroup(offset, list(range(offset + 1, offset + 1 + n)),
                            cross_edit(tok, source_prompt, job.targets, steps, settings))
        groups.append(group)
        if settings.blend is not None:
            src_tokens, tgt_tokens = blend_tokens(tok, source_prompt, job.targets, settings.blend)
            blend_words.append(BlendWords(offset, src_tokens, list(zip(group.targets, tgt_tokens, strict=True))))
        offset += 1 + n
    controlled = get_controller(settings.controller).edits_attention
    controller = EditController(
        steps, groups, settings.self_window if controlled else (0.0, 0.0),
        blend_downscale=blend_downscale(model, hw, settings.blend_res) if blend_words else None,
        keep_maps=settings.keep_attention_maps)

    branches: list[Branch] = []
    inversions: list[Inversion] = []
    prepare_cost = Cost()
    for job in jobs:
        negatives, inv, cost = prepared_negatives(model, method, job.inversion, settings.guidance)
        prepare_cost += cost
        inversions.append(inv)
        source_negatives = negatives
        if source_rows == "separate":
            source_negatives = [PromptEmbedding(e.hidden.clone(), None if e.pooled is None else e.pooled.clone())
                                if e is inv.source else e for e in negatives]
        branches.append(Branch(inv.source, list(source_negatives)))
        branches += [Branch(model.encode_prompt(t), list(negatives)) for t in job.targets]
    # Trajectories on the model's device once: the hooks that read them each step copy nothing over.
    edit_groups = [EditGroup(g.source, g.targets, inv.trajectory.to(model.device))
                   for g, inv in zip(groups, inversions, strict=True)]
    guidance = method.guidance(settings.guidance, settings, edit_groups)
    hooks: list[StepHook] = method.hooks(settings, edit_groups)
    if settings.direct:
        hooks.append(DirectInversion([(g.source, g.trajectory) for g in edit_groups]))
    blend = None
    if blend_words:
        blend = LocalBlend(controller, blend_words, threshold=settings.blend_threshold, start=settings.blend_start)
        hooks.append(blend)
    z_start = torch.cat([inv.noise.expand(1 + len(job.targets), *inv.noise.shape[1:])
                         for inv, job in zip(inversions, jobs, strict=True)])
    pair_start = None
    if first.pair_start is not None:  # BDIA inversions: every branch starts from its image's pair
        pair_start = torch.cat([inv.pair_start.expand(1 + len(job.targets), *inv.noise.shape[1:])
                                for inv, job in zip(inversions, jobs, strict=True)])
    with attention_control(model, controller, self_replace_size=settings.self_replace_size, mode=settings.attention):
        result = sample(model, z_start, first.schedule_for(model), branches, guidance, controller=controller,
                        hooks=hooks, progress="edit" if progress else None, pair_start=pair_start,
                        pair_gamma=first.pair_gamma)
    images = model.decode(result.latents)
    cost = meter.cost
    return [
        EditResult(
            images=images[g.targets[0] : g.targets[-1] + 1], source_image=images[g.source : g.source + 1],
            latents=result.latents[g.source : g.targets[-1] + 1], targets=list(job.targets), cost=cost,
            inversion=inv, controller=controller, blend_mask=None if blend is None else blend.last_masks[j],
            settings=settings, first_branch=g.source, prepare_cost=prepare_cost)
        for j, (g, job, inv) in enumerate(zip(groups, jobs, inversions, strict=True))
    ]
