"""Text-guided editing of an inverted image with Prompt-to-Prompt attention control.

Branch 0 is the source (its prompt, starting from ``z*[n]``); branches 1.. are the targets.
Several images edit in one UNet batch (:func:`edit_batch`) as branch groups, each edited from its
own source; :func:`edit` is the one-image case. Each inversion method only chooses the negatives:
NPI gives every branch the source embedding (so the source branch costs one row and the whole step
1 + 2T rows instead of 2 + 2T), NTI the optimised per-step embeddings, DDIM the null embedding.
ProxNPI is NPI with proximal guidance, with (``proxnpi``) or without (``proxnpi-noig``) inversion
guidance. Direct inversion is a hook that pins the source branch to the inversion trajectory; it
combines with every method.
"""

from __future__ import annotations

import dataclasses
import math
import time

import torch

from npinv.attention.align import (
    as_window,
    cross_replace_alpha,
    find_word,
    refine_mapper,
    replace_mapper,
    reweight_vector,
)
from npinv.attention.control import BlendWords, BranchGroup, CrossEdit, EditController, LocalBlend
from npinv.attention.processor import controlled_attention, layer_infos, map_size
from npinv.checks import check_guidance, check_prompt, finite
from npinv.errors import NpinvError
from npinv.guidance import CFG, ProximalGuidance
from npinv.inversion import Inversion, reconstruct
from npinv.model import Model, PromptEmbedding
from npinv.sampling import Branch, StepHook, StepState, sample

EDIT_METHODS = ("npi", "proxnpi", "proxnpi-noig", "nti", "ddim")
CONTROLLERS = ("replace", "refine", "reweight", "none")


@dataclasses.dataclass
class EditSettings:
    """Everything that shapes an edit besides the prompts."""

    method: str = "npi"
    controller: str = "refine"
    guidance: float = 7.5
    # A fraction f (the first f of the steps), a window (start, end), or per-word values with "default_".
    cross_replace: float | tuple[float, float] | dict[str, float | tuple[float, float]] = 0.8
    self_replace: float | tuple[float, float] = 0.6
    # Self-attention is replaced in layers whose query maps are at most this fraction of the latent's
    # side: 0.5 is 32x32 at 512 px, as google/prompt-to-prompt (diffusers' community pipeline: 0.25).
    self_replace_size: float = 0.5
    blend: tuple[str, str] | None = None
    blend_threshold: float = 0.3
    blend_start: float = 0.2  # local blend acts from step int(blend_start * steps), as the null-text notebook
    # Side (longer, in cells) of the cross-attention maps local blend reads; None: the layers whose maps
    # are closest to 16 cells (the reference's 16x16 layers at 512 px).
    blend_res: int | None = None
    reweight: dict[str, float] = dataclasses.field(default_factory=dict)
    direct: bool = False
    prox_quantile: float = 0.75
    recon_t: int = 400
    recon_lr: float = 1.0
    keep_attention_maps: bool = False

    def validate(self) -> None:
        if self.method not in EDIT_METHODS:
            raise NpinvError(f"unknown method {self.method!r}; choose one of {', '.join(EDIT_METHODS)}")
        if self.controller not in CONTROLLERS:
            raise NpinvError(f"unknown controller {self.controller!r}; choose one of {', '.join(CONTROLLERS)}")
        # Every number once here, for every front end: NaN and infinities pass comparisons unnoticed.
        check_guidance(self.guidance)
        finite(self.blend_threshold, "blend-threshold")
        for word, scale in self.reweight.items():
            finite(scale, f"reweight scale of {word!r}")
        if not 0.0 <= finite(self.prox_quantile, "prox-quantile") <= 1.0:
            raise NpinvError(f"prox-quantile must be a fraction in [0, 1], got {self.prox_quantile}")
        finite(self.recon_lr, "recon-lr")
        finite(self.recon_t, "recon-t")
        as_window(self.self_replace, "self-replace")
        for value in (self.cross_replace.values() if isinstance(self.cross_replace, dict) else [self.cross_replace]):
            as_window(value, "cross-replace")
        if not 0.0 < self.self_replace_size <= 1.0:
            raise NpinvError(f"self-replace-size must be a fraction in (0, 1], got {self.self_replace_size}")
        if not 0.0 <= self.blend_start <= 1.0:
            raise NpinvError(f"blend-start must be a fraction in [0, 1], got {self.blend_start}")
        if self.blend_res is not None and self.blend_res < 1:
            raise NpinvError(f"blend-res must be a positive number of cells, got {self.blend_res}")
        if self.controller == "reweight" and not self.reweight:
            raise NpinvError("the reweight controller needs at least one --reweight WORD=SCALE")

    @property
    def self_window(self) -> tuple[float, float]:
        return as_window(self.self_replace, "self-replace")


@dataclasses.dataclass
class EditResult:
    """Edited images (one per target, in order) and the source branch's image, with their cost."""

    images: torch.Tensor  # (T, 3, H, W) in [-1, 1]
    source_image: torch.Tensor  # (1, 3, H, W): the source branch (a reconstruction)
    latents: torch.Tensor  # (1 + T, C, h, w): final latents, source first
    targets: list[str]
    seconds: float
    unet_calls: int
    unet_rows: int
    inversion: Inversion
    controller: EditController | None
    blend_mask: torch.Tensor | None
    first_branch: int = 0  # this image's source branch in the controller (several images in one batch)


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


class InversionGuidance(StepHook):
    """ProxNPI's inversion guidance: below ``recon_t`` pull each target's unedited region (outside
    the proximal mask) toward its image's inversion trajectory by ``recon_lr`` (1 copies it)."""

    def __init__(self, guidance: ProximalGuidance, groups: list[tuple[list[int], torch.Tensor]], recon_t: int,
                 recon_lr: float) -> None:
        self.guidance, self.groups = guidance, groups  # (target branches, their trajectory)
        self.recon_t, self.recon_lr = recon_t, recon_lr

    def after_step(self, state: StepState) -> None:
        if state.t >= self.recon_t or self.guidance.last_mask is None:
            return
        k = state.schedule.steps - 1 - state.i
        z = state.z_next
        m = self.guidance.last_mask.to(z)
        for targets, trajectory in self.groups:
            ref = trajectory[k].to(z)
            z[targets] = z[targets] - self.recon_lr * (z[targets] - ref) * (1 - m[targets])


def _negatives(method: str, inv: Inversion, model: Model, guidance: float) -> tuple[list, list, Inversion]:
    """(source negatives, target negatives, inversion) for a method; NTI optimises if it must."""
    if method in ("npi", "proxnpi", "proxnpi-noig"):
        return [inv.source] * inv.steps, [inv.source] * inv.steps, inv
    if method == "ddim":
        return [inv.null] * inv.steps, [inv.null] * inv.steps, inv
    if inv.negatives is None or not inv.nti or inv.nti.get("guidance") != guidance:
        inv = reconstruct(model, inv, "nti", guidance).inversion
    return list(inv.negatives), list(inv.negatives), inv


BLEND_SIDE = 16  # the reference reads the 16x16 cross-attention layers of SD at 512 px


def blend_downscale(unet, latent_hw: tuple[int, int], side: int | None = None) -> int:
    """The downscale of the cross-attention layers local blend reads: those whose maps' longer side is
    closest to ``side`` cells (default 16, the reference's layers at 512 px), the finer on a tie."""
    want = side or BLEND_SIDE
    scales = sorted({i.downscale for i in layer_infos(unet).values() if i.is_cross})
    return min(scales, key=lambda s: (abs(math.log2(max(map_size(latent_hw, s)) / want)), s))


def edit(model: Model, inv: Inversion, targets: list[str], settings: EditSettings, *,
         source_rows: str = "shared", progress: bool = False) -> EditResult:
    """Edit an inverted image toward each of ``targets`` in one batched run.

    ``source_rows="separate"`` gives NPI's source branch a copy of its embedding as the negative,
    reproducing the reference code's 4-rows-a-step layout (for tests and comparisons).
    """
    return edit_batch(model, [EditJob(inv, list(targets))], settings, source_rows=source_rows, progress=progress)[0]


def _cross_edit(tok, source_prompt: str, targets: list[str], steps: int, settings: EditSettings) -> CrossEdit | None:
    if settings.controller == "none":
        return None
    cross = CrossEdit(cross_replace_alpha(tok, targets, steps, settings.cross_replace))
    if settings.controller == "replace":
        cross.replace = torch.stack([replace_mapper(tok, source_prompt, t) for t in targets])
    elif settings.controller == "refine":
        cross.refine = [refine_mapper(tok, source_prompt, t) for t in targets]
    if settings.reweight:
        cross.reweight = torch.stack([reweight_vector(tok, t, settings.reweight) for t in targets])
    return cross


def edit_batch(model: Model, jobs: list[EditJob], settings: EditSettings, *, source_rows: str = "shared",
               progress: bool = False) -> list[EditResult]:
    """Edit several inverted images (same model, schedule and latent size) with the same settings,
    every image's source and targets in one UNet batch per step. Each image's result is the one
    :func:`edit` gives for it alone (up to float rounding of a larger batch). ``seconds`` and the
    UNet counts of each result are the whole batch's.
    """
    settings.validate()
    if not jobs:
        raise NpinvError("nothing to edit")
    for job in jobs:
        if not job.targets:
            raise NpinvError("give at least one target prompt")
        for target in job.targets:
            check_prompt(target, "the target prompt")
    first = jobs[0].inversion
    for job in jobs[1:]:
        inv = job.inversion
        if (inv.schedule != first.schedule or inv.trajectory.shape != first.trajectory.shape
                or inv.model != first.model):
            raise NpinvError("images edited in one batch need the same model, steps, offset and size")
    tok = model.pipe.tokenizer
    steps = first.steps
    hw = tuple(first.trajectory.shape[-2:])

    # Branch layout: image j's source, then its targets; groups record where each image sits.
    groups: list[BranchGroup] = []
    blend_words: list[BlendWords] = []
    offset = 0
    for job in jobs:
        source_prompt, n = job.inversion.source_prompt, len(job.targets)
        group = BranchGroup(offset, list(range(offset + 1, offset + 1 + n)),
                            _cross_edit(tok, source_prompt, job.targets, steps, settings))
        groups.append(group)
        if settings.blend is not None:
            src_word, tgt_word = settings.blend
            blend_words.append(BlendWords(offset, find_word(tok, source_prompt, src_word),
                                          [(b, find_word(tok, t, tgt_word)) for b, t in zip(group.targets, job.targets,
                                                                                             strict=True)]))
        offset += 1 + n
    controller = EditController(
        steps, groups, settings.self_window if settings.controller != "none" else (0.0, 0.0),
        blend_downscale=blend_downscale(model.unet, hw, settings.blend_res) if blend_words else None,
        keep_maps=settings.keep_attention_maps)

    start = time.perf_counter()
    calls0, rows0 = model.counter.calls, model.counter.rows
    branches: list[Branch] = []
    inversions: list[Inversion] = []
    for job in jobs:
        src_neg, tgt_neg, inv = _negatives(settings.method, job.inversion, model, settings.guidance)
        inversions.append(inv)
        if source_rows == "separate":
            src_neg = [PromptEmbedding(e.hidden.clone(), None if e.pooled is None else e.pooled.clone())
                       if e is inv.source else e for e in src_neg]
        branches.append(Branch(inv.source, list(src_neg)))
        branches += [Branch(model.encode_prompt(t), list(tgt_neg)) for t in job.targets]
    hooks: list[StepHook] = []
    if settings.method.startswith("proxnpi"):
        guidance = ProximalGuidance(settings.guidance, settings.prox_quantile,
                                    groups=[(g.source, g.targets[-1] + 1) for g in groups])
        if settings.method == "proxnpi":
            pulls = [(g.targets, inv.trajectory) for g, inv in zip(groups, inversions, strict=True)]
            hooks.append(InversionGuidance(guidance, pulls, settings.recon_t, settings.recon_lr))
    else:
        guidance = CFG(settings.guidance)
    if settings.direct:
        hooks.append(DirectInversion([(g.source, inv.trajectory) for g, inv in zip(groups, inversions, strict=True)]))
    blend = None
    if blend_words:
        blend = LocalBlend(controller, blend_words, threshold=settings.blend_threshold, start=settings.blend_start)
        hooks.append(blend)
    z_start = torch.cat([inv.noise.expand(1 + len(job.targets), *inv.noise.shape[1:])
                         for inv, job in zip(inversions, jobs, strict=True)])
    with controlled_attention(model.unet, controller, self_min_downscale=1 / settings.self_replace_size):
        result = sample(model, z_start, first.schedule_for(model), branches, guidance, controller=controller,
                        hooks=hooks, progress="edit" if progress else None)
    images = model.decode(result.latents)
    seconds = time.perf_counter() - start
    calls, rows = model.counter.calls - calls0, model.counter.rows - rows0
    return [
        EditResult(
            images=images[g.targets[0] : g.targets[-1] + 1], source_image=images[g.source : g.source + 1],
            latents=result.latents[g.source : g.targets[-1] + 1], targets=list(job.targets), seconds=seconds,
            unet_calls=calls, unet_rows=rows, inversion=inv, controller=controller,
            blend_mask=None if blend is None else blend.last_masks[j], first_branch=g.source)
        for j, (g, job, inv) in enumerate(zip(groups, jobs, inversions, strict=True))
    ]
