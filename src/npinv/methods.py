"""Inversion methods, one object each, and the registry every front end lists them from.

A method is a choice of inputs to the one sampling loop (:func:`npinv.sampling.sample`): the
negative embedding of each branch at each step, the guidance rule and its step hooks.

- ``npi``: the source embedding is the negative (one UNet row for the source branch), CFG;
- ``proxnpi``: NPI's negatives, proximal guidance, inversion guidance below ``recon_t``;
- ``proxnpi-noig``: the same without inversion guidance;
- ``nti``: per-step negatives optimised while reconstructing (null-text inversion), CFG;
- ``ddim``: the null embedding as negative, CFG (drifts for w > 1: what NPI and NTI fix);
- ``flowedit`` (flow models, edits only): FlowEdit (Kulikov et al. 2024), inversion-free; its own
  loop in :mod:`npinv.flowedit`.

On flow models (SD3, SD3.5, FLUX.1) each method means the same with velocities for noise predictions
and the pooled embedding beside the hidden states (docs/method.md, "Flow models").

Adding a method: subclass :class:`Method`, add an instance to :data:`METHODS`, and add its rows to
the tests of ``tests/test_methods.py``. Every front end (CLI choices, manifests, the web app's
menu, the benchmarks) lists methods from here.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from types import MappingProxyType
from typing import TYPE_CHECKING

import torch

from npinv.checks import check_guidance, lookup
from npinv.cost import Cost, Costed
from npinv.errors import NpinvError
from npinv.guidance import CFG, ProximalGuidance
from npinv.inversion import Inversion, NullTextOptimisation
from npinv.model import Model, PromptEmbedding
from npinv.sampling import Branch, Guidance, StepHook, StepState, sample

if TYPE_CHECKING:
    from npinv.settings import EditSettings


@dataclasses.dataclass(frozen=True)
class EditGroup:
    """One edited image in the loop's branch layout: its source branch, its target branches and its
    inversion trajectory (what a method's hooks pull toward)."""

    source: int
    targets: list[int]
    trajectory: torch.Tensor


class Method:
    """Base class: NPI's negatives with classifier-free guidance and no hooks; subclasses override."""

    name = ""
    summary = ""
    # The inversion scheme `npinv reconstruct` inverts with for this method unless told otherwise (the one
    # place this default lives: --help, README and docs/method.md read it from here): exact BDIA for the NPI
    # family, plain DDIM inversion for the published baselines.
    reconstruct_scheme = "bdia"
    # Whether the method may sample a BDIA inversion. BDIA's coupled step is exact only when sampling
    # reproduces the inversion's model outputs and amplifies any difference from them step after step.
    samples_bdia = True
    # Whether the method may sample with a second-order flow step (a midpoint or FireFlow inversion).
    samples_midpoint = True
    # Whether the method samples from an inversion at all (FlowEdit does not) and can reconstruct.
    needs_inversion = True
    # Only flow-matching models; UNet models refuse the method.
    flow_only = False

    def default_guidance(self, family: str | None) -> float | None:
        """The ``--guidance`` this method takes when none is given on a model of ``family`` ("sd", "sdxl",
        "sd3", "flux"); None: the model's recommended editing guidance (its npinv.json, else 7.5)."""
        return None

    def check_model(self, model: Model) -> None:
        """Refuse, in one line, a model this method cannot run on."""
        if self.flow_only and not getattr(model, "is_flow", False):
            raise NpinvError(f"method {self.name} is for flow-matching models (SD3, SD3.5, FLUX.1); {model.name} "
                             "is a UNet model")

    def check_reconstruct(self) -> None:
        """Refuse, in one line, a reconstruction with a method that only edits."""
        if not self.needs_inversion:
            raise NpinvError(f"method {self.name} edits without inverting: it has no reconstruction; use npinv edit")

    def negatives(self, inv: Inversion, guidance: float) -> list[PromptEmbedding] | None:
        """The negative at each step, or None when this inversion lacks what the method needs (NTI
        not yet optimised at this guidance): :meth:`optimiser` then makes it while reconstructing."""
        return [inv.source] * inv.steps

    def optimiser(self, model: Model, inv: Inversion, guidance: CFG, *,
                  inner_steps: int = 10) -> NullTextOptimisation | None:
        return None

    def guidance(self, scale: float, settings: EditSettings | None = None,
                 groups: Sequence[EditGroup] = ()) -> Guidance:
        return CFG(scale)

    def hooks(self, settings: EditSettings, groups: Sequence[EditGroup]) -> list[StepHook]:
        return []

    def __repr__(self) -> str:
        return f"<method {self.name}>"


class NPI(Method):
    name = "npi"
    summary = "negative-prompt inversion: the source prompt is the negative"


class DDIM(Method):
    name = "ddim"
    summary = "plain DDIM inversion: the null prompt is the negative"
    reconstruct_scheme = "ddim"
    samples_bdia = False  # its drift at w > 1, which BDIA amplifies: 6-8 dB where a DDIM inversion gives 19-31

    def negatives(self, inv: Inversion, guidance: float) -> list[PromptEmbedding]:
        return [inv.null] * inv.steps


class NullText(Method):
    name = "nti"
    summary = "null-text inversion: negatives optimised per step (slow; reused at the same guidance)"
    reconstruct_scheme = "ddim"  # the published baseline; on an exact inversion it starts from the source embedding
    samples_midpoint = False  # it optimises each Euler step's negative (one step through the model, differentiated)

    def negatives(self, inv: Inversion, guidance: float) -> list[PromptEmbedding] | None:
        # The one reuse rule: a saved or cached NTI result serves the guidance it was optimised for.
        if inv.negatives is not None and inv.nti and inv.nti.get("guidance") == guidance:
            return list(inv.negatives)
        return None

    def optimiser(self, model: Model, inv: Inversion, guidance: CFG, *,
                  inner_steps: int = 10) -> NullTextOptimisation:
        return NullTextOptimisation(model, inv, guidance, inner_steps=inner_steps)


class ProxNPI(Method):
    """ProxNPI (Han et al. 2023): NPI's negatives with proximal guidance and, unless ``-noig``,
    inversion guidance below ``recon_t``."""

    def __init__(self, inversion_guidance: bool) -> None:
        self.inversion_guidance = inversion_guidance
        self.name = "proxnpi" if inversion_guidance else "proxnpi-noig"
        self.summary = ("NPI with proximal guidance and inversion guidance" if inversion_guidance
                        else "NPI with proximal guidance, without inversion guidance")

    def guidance(self, scale: float, settings: EditSettings | None = None,
                 groups: Sequence[EditGroup] = ()) -> Guidance:
        quantile = 0.75 if settings is None else settings.prox_quantile
        # One quantile per edited image, so that batching images changes no image's result.
        rows = tuple((g.source, g.targets[-1] + 1) for g in groups) or None
        return ProximalGuidance(scale, quantile, groups=rows)

    def hooks(self, settings: EditSettings, groups: Sequence[EditGroup]) -> list[StepHook]:
        if not self.inversion_guidance:
            return []
        return [InversionGuidance([(g.targets, g.trajectory) for g in groups], settings.recon_t, settings.recon_lr)]


class InversionGuidance(StepHook):
    """ProxNPI's inversion guidance: below ``recon_t`` pull each target's unedited region (outside
    the step's proximal mask, ``state.guidance_mask``) toward its image's inversion trajectory by
    ``recon_lr`` (1 copies it)."""

    def __init__(self, groups: list[tuple[list[int], torch.Tensor]], recon_t: int, recon_lr: float) -> None:
        self.groups = groups  # (target branches, their trajectory)
        self.recon_t, self.recon_lr = recon_t, recon_lr

    def after_step(self, state: StepState) -> None:
        if state.t >= self.recon_t or state.guidance_mask is None:
            return
        k = state.schedule.steps - 1 - state.i
        z = state.z_next
        m = state.guidance_mask.to(z)
        for targets, trajectory in self.groups:
            ref = trajectory[k].to(z)
            z[targets] = z[targets] - self.recon_lr * (z[targets] - ref) * (1 - m[targets])


class FlowEditMethod(Method):
    """FlowEdit (Kulikov et al. 2024): an edit from the clean latent with no inversion (:mod:`npinv.flowedit`).
    The edit's ``--guidance`` is FlowEdit's target guidance (default: the paper's, 13.5 on SD3, 5.5 embedded
    on FLUX.1-dev), the source's is the paper's (3.5; 1.5 embedded); ``--steps`` its step count, with the
    paper's window ``n_max`` scaled to it. Attention controllers do not apply."""

    name = "flowedit"
    summary = "FlowEdit: inversion-free edits on flow models (edits only)"
    reconstruct_scheme = "ddim"
    needs_inversion = False
    flow_only = True

    def negatives(self, inv: Inversion, guidance: float) -> list[PromptEmbedding]:
        return [inv.source] * inv.steps  # never sampled: FlowEdit's loop takes no negatives from an inversion

    def default_guidance(self, family: str | None) -> float | None:
        """The paper's target guidance: a model's recommended editing guidance is tuned for sampling an
        inversion (NPI), where the scale means something else than FlowEdit's velocity difference."""
        from npinv.flowedit import PAPER_DEFAULTS

        return PAPER_DEFAULTS[family]["target_guidance"] if family in PAPER_DEFAULTS else None


# The registry, in the order front ends list the methods. Read-only: no module-level mutable state.
METHODS: Mapping[str, Method] = MappingProxyType(
    {m.name: m for m in (NPI(), ProxNPI(True), ProxNPI(False), NullText(), DDIM(), FlowEditMethod())})


def method_names() -> tuple[str, ...]:
    return tuple(METHODS)


def get_method(name: str | Method) -> Method:
    return name if isinstance(name, Method) else lookup(METHODS, name, "method")


def check_scheme(method: str | Method, scheme: str) -> None:
    """Refuse, in one line, a method that cannot sample an inversion made with ``scheme``."""
    from npinv.schemes import get_scheme

    method = get_method(method)
    if not method.needs_inversion:  # it samples no inversion: any scheme is as good (its work is wasted)
        return
    if get_scheme(scheme).sampler != "euler" and not method.samples_midpoint:
        why = "it optimises each Euler step's negative"
    elif get_scheme(scheme).pair_start and not method.samples_bdia:
        why = (f"its coupled step is exact only when sampling repeats the inversion's model outputs, and amplifies "
               f"{method.name}'s difference into noise")
    else:
        return
    raise NpinvError(f"method {method.name} cannot sample a {scheme} inversion: {why}; invert with --invert-scheme "
                     f"{_suggested_schemes(method)}")


def _suggested_schemes(method: Method) -> str:
    """The schemes a refusal suggests, in words: those every model takes (a check before loading knows no model)."""
    from npinv.schemes import SCHEMES

    names = [n for n in scheme_names_for(method) if not SCHEMES[n].flow_only]
    return ", ".join(names[:-1]) + f" or {names[-1]}" if len(names) > 1 else names[0]


def scheme_names_for(method: str | Method) -> tuple[str, ...]:
    """The inversion schemes ``method`` can sample, in the registry's order."""
    from npinv.schemes import SCHEMES

    method = get_method(method)
    return tuple(n for n, s in SCHEMES.items() if (method.samples_bdia or not s.pair_start)
                 and (method.samples_midpoint or s.sampler == "euler"))


def reconstruct_scheme_help() -> str:
    """The per-method default of `npinv reconstruct --invert-scheme`, in words, from the registry."""
    by_scheme: dict[str, list[str]] = {}
    for m in METHODS.values():
        if not m.needs_inversion:  # edits only (flowedit): it has no reconstruction
            continue
        by_scheme.setdefault(m.reconstruct_scheme, []).append(m.name)
    return "; ".join(f"{scheme} for {', '.join(names)}" for scheme, names in by_scheme.items())


@dataclasses.dataclass
class Reconstruction(Costed):
    """A method's reconstruction of an inverted image, and what it cost (the inversion excluded)."""

    method: str
    guidance: float
    latent: torch.Tensor
    image: torch.Tensor  # (1, 3, H, W) in [-1, 1]
    cost: Cost
    inversion: Inversion  # with NTI's optimised negatives when the method made them


def reconstruct(model: Model, inv: Inversion, method: str | Method, guidance: float = 7.5, *,
                progress: bool = False, nti_inner_steps: int = 10) -> Reconstruction:
    """Sample from ``z*[n]`` with the source prompt and the method's negatives at scale ``guidance``.

    For NTI the optimisation walk is the reconstruction, and the optimised negatives are stored
    on the returned inversion for later edits.
    """
    from npinv.cost import Meter

    method = get_method(method)
    method.check_reconstruct()
    method.check_model(model)
    check_guidance(guidance)
    check_scheme(method, inv.scheme_name)
    inv.check_sampled_by(method.name)
    meter = Meter(model)
    rule = method.guidance(guidance)
    negatives = method.negatives(inv, guidance)
    hooks: list[StepHook] = []
    optimiser = None
    if negatives is None:
        optimiser = method.optimiser(model, inv, CFG(guidance), inner_steps=nti_inner_steps)
        negatives, hooks = [inv.null] * inv.steps, [optimiser]
    branch = Branch(inv.source, list(negatives))
    result = sample(model, inv.noise, inv.schedule_for(model), [branch], rule, hooks=hooks,
                    progress=f"{method.name} sample" if progress else None, pair_start=inv.pair_start,
                    pair_gamma=inv.pair_gamma)
    if optimiser is not None:
        inv = dataclasses.replace(inv, negatives=branch.negatives,
                                  nti={"guidance": guidance, "inner_steps": nti_inner_steps, "losses": optimiser.losses})
    image = model.decode(result.latents)
    return Reconstruction(method.name, guidance, result.latents, image, meter.cost, inv)


def prepared_negatives(model: Model, method: Method, inv: Inversion, guidance: float) -> tuple[list, Inversion, Cost]:
    """The method's negatives for an edit at ``guidance``; NTI optimises first if it must (its cost)."""
    negatives = method.negatives(inv, guidance)
    if negatives is not None:
        return negatives, inv, Cost()
    rec = reconstruct(model, inv, method, guidance)
    negatives = method.negatives(rec.inversion, guidance)
    assert negatives is not None, f"{method.name} made no negatives"
    return negatives, rec.inversion, rec.cost
