"""Inversion schemes: how each DDIM inversion step finds the next latent.

DDIM inversion's only error is that step ``i`` evaluates the model at the latent it starts from,
``z_i``, while the denoising step that should undo it evaluates the model at the latent it lands
on, ``z_{i+1}``. The schemes:

- ``ddim``: the plain step, ``z_{i+1} = invert_step(z_i, e(z_i, t_i))``: one UNet call a step;
- ``fixed-point``: solve ``z = invert_step(z_i, e(z, t_i))`` by iterating from the plain step's
  result, checking after each UNet call how far the denoising step from the current ``z`` lands
  from ``z_i`` (relative to ``|z_i|``), and stopping below the tolerance (AIDI / fixed-point
  inversion). ``1 + k`` UNet calls for ``k`` iterations; at most ``1 + iters``;
- ``anderson``: the same fixed point with Anderson mixing;
- ``bdia``: bidirectional integration (BDIA-DDIM, Zhang et al. 2023): ``z*[k+1] = (z*[k-1] -
  D(z*[k]; down)) / gamma + D(z*[k]; up)``, one UNet call a step and exactly invertible by sampling
  with the mirrored step from the pair ``(z*[n], z*[n-1])`` (:attr:`InversionScheme.pair_start`);
  ``gamma`` (BDIA's damping factor, 1 by default) is recorded in the inversion, since sampling must use it;
- ``midpoint`` (flow models only): RF-Solver's second-order step (Wang et al. 2024), 2 calls a step; its
  inversions sample with the same midpoint step (:attr:`InversionScheme.sampler`);
- ``fireflow`` (flow models only): the midpoint step reusing the previous step's midpoint velocity as
  the next start velocity (Deng et al. 2024), ``n + 1`` calls for ``n`` steps; sampled the same way.

On flow models (:class:`npinv.flow_schedule.FlowSchedule`) ``ddim`` is the textbook Euler inversion,
``z_{i+1} = z_i + (sigma_{i+1} - sigma_i) v(z_i, sigma_i)`` (the velocity at the step's start, as
RF-Inversion and FireFlow's tables take it; :func:`start_timestep` says why), and the fixed point solves
the Euler sampler step's exact inverse ``y = z_i - (sigma_i - sigma_{i+1}) v(y, sigma_{i+1})``.

A scheme is one object in :data:`SCHEMES`; the CLI, manifests and the web app list them from there.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from types import MappingProxyType

import torch

from npinv.errors import NpinvError
from npinv.model import Model, PromptEmbedding
from npinv.progress import Progress
from npinv.schedule import Schedule


@dataclasses.dataclass
class InversionTrace:
    """A trajectory ``z*[0..n]`` and, per step, what the scheme did: the residual of the last checked
    iterate (relative error of its denoising step, the worst over a batch; None if never checked) and
    the extra UNet calls it made (beyond the plain step's one)."""

    trajectory: torch.Tensor  # (n + 1, B, C, h, w)
    residuals: list[float | None]
    iterations: list[int]


class InversionScheme:
    name = ""
    summary = ""
    # Sampling from this scheme's inversions starts from the pair (z*[n], z*[n-1]) and takes BDIA steps.
    pair_start = False
    # Each step iterates to a tolerance: the iteration cap and the tolerance apply.
    iterates = False
    # Sampling with the inversion's own model outputs lands on the trajectory (to the tolerance).
    exact = True
    # The step rule the sampling loop takes on this scheme's inversions (flow grids only; "euler" is the
    # pipelines' sampler, and a UNet's DDIM step): see npinv.flow_schedule.Solver.
    sampler = "euler"
    # Only flow-matching models (a second-order step in sigma); UNet models refuse the scheme.
    flow_only = False

    def check_model(self, model: Model) -> None:
        """Refuse, in one line and before any work, a model this scheme cannot invert."""
        if self.flow_only and not getattr(model, "is_flow", False):
            unet = ", ".join(n for n, s in SCHEMES.items() if not s.flow_only)
            raise NpinvError(f"--invert-scheme {self.name} is for flow-matching models (SD3, SD3.5, FLUX.1); "
                             f"{model.name} is a UNet model: use {unet}")

    def invert(self, model: Model, z0: torch.Tensor, schedule: Schedule, cond: PromptEmbedding, *,
               iters: int = 0, tol: float = 0.0, gamma: float = 1.0, progress: str | None = None) -> InversionTrace:
        z = z0.to(torch.float32)
        trajectory, residuals, iterations = [z], [], []
        with torch.no_grad(), model.deferred_checks():  # non-finite outputs: read once, at the end
            for i, t in enumerate(Progress(list(reversed(schedule.timesteps)), desc=progress, unit="step")):
                z_next = schedule.invert_step(z, model.unet_output(z, start_timestep(schedule, i, t), cond), i)
                z_next, residual, extra = self.refine(model, z, z_next, t, i, schedule, cond, iters, tol)
                trajectory.append(z_next)
                residuals.append(residual)
                iterations.append(extra)
                z = z_next
        return InversionTrace(torch.stack(trajectory), residuals, iterations)

    def refine(self, model: Model, z: torch.Tensor, z_next: torch.Tensor, t: int, i: int, schedule: Schedule,
               cond: PromptEmbedding, iters: int, tol: float) -> tuple[torch.Tensor, float | None, int]:
        """The plain step's ``z_next`` made better; the plain scheme keeps it."""
        return z_next, None, 0


def start_timestep(schedule: Schedule, i: int, t: float) -> float:
    """The timestep of inversion step ``i``'s plain (first) call: DDIM's destination level ``t`` on a UNet
    grid (prompt-to-prompt's and DDIMInverseScheduler's convention); on a flow grid the step's start,
    ``sigma_i`` (textbook Euler inversion, as RF-Inversion and FireFlow's baselines take it). Rectified
    flows move along nearly straight paths, so the velocity at the start point and time is nearly the one
    the sampler takes at the end; the destination's time at the start point is not (measured on tiny SD3:
    0.85x the round trip's squared error at 4-28 steps). The fixed-point iterations that follow evaluate at
    the destination, as the sampler does."""
    invert_timestep = getattr(schedule, "invert_timestep", None)
    return t if invert_timestep is None else invert_timestep(i)


class DDIMScheme(InversionScheme):
    name, summary = "ddim", "plain DDIM inversion: the model evaluated at the step's start (1 UNet call a step)"
    exact = False


class FixedPoint(InversionScheme):
    name, summary = "fixed-point", "fixed-point iteration per step until the step inverts exactly (1 + k calls)"
    iterates = True

    def refine(self, model: Model, z: torch.Tensor, z_next: torch.Tensor, t: int, i: int, schedule: Schedule,
               cond: PromptEmbedding, iters: int, tol: float) -> tuple[torch.Tensor, float | None, int]:
        residual = None
        norm = z.flatten(1).norm(dim=1).clamp_min(1e-12)
        for k in range(iters):
            out = model.unet_output(z_next, t, cond)
            back = schedule.denoise_step_to(z_next, out, i)  # what sampling will do from z_next
            # Whether to make another UNet call depends on this number: the one host read of an
            # iteration, data-dependent by nature (plain DDIM and BDIA inversions read nothing).
            residual = float(((back - z).flatten(1).norm(dim=1) / norm).max())
            if residual <= tol:
                return z_next, residual, k + 1
            z_next = schedule.invert_step_at(z, out, z_next, i)
        return z_next, residual, iters


class AndersonFixedPoint(InversionScheme):
    """The same fixed point, solved with Anderson mixing (memory ``m``): each new iterate combines the
    last ``m`` map outputs with weights that minimise the combined residual (least squares per image).
    It converges where plain iteration crawls (the contraction near 1 of large steps at low noise)."""

    name, summary = "anderson", "fixed point with Anderson mixing (faster where plain iteration crawls)"
    iterates = True
    memory = 3

    def refine(self, model: Model, z: torch.Tensor, z_next: torch.Tensor, t: int, i: int, schedule: Schedule,
               cond: PromptEmbedding, iters: int, tol: float) -> tuple[torch.Tensor, float | None, int]:
        residual = None
        norm = z.flatten(1).norm(dim=1).clamp_min(1e-12)
        gs: list[torch.Tensor] = []
        fs: list[torch.Tensor] = []
        for k in range(iters):
            out = model.unet_output(z_next, t, cond)
            back = schedule.denoise_step_to(z_next, out, i)
            residual = float(((back - z).flatten(1).norm(dim=1) / norm).max())  # one read an iteration, as above
            if residual <= tol:
                return z_next, residual, k + 1
            g = schedule.invert_step_at(z, out, z_next, i)
            gs.append(g.flatten(1))
            fs.append((g - z_next).flatten(1))
            gs, fs = gs[-self.memory - 1:], fs[-self.memory - 1:]
            if len(fs) == 1:
                z_next = g
                continue
            d_f = torch.stack([fs[j + 1] - fs[j] for j in range(len(fs) - 1)], dim=-1)  # (B, N, m)
            d_g = torch.stack([gs[j + 1] - gs[j] for j in range(len(gs) - 1)], dim=-1)
            gamma = mixing_weights(d_f, fs[-1].unsqueeze(-1))  # (B, m, 1)
            z_next = (gs[-1] - (d_g @ gamma).squeeze(-1)).view_as(z)
        return z_next, residual, iters


def mixing_weights(d_f: torch.Tensor, f: torch.Tensor, ridge: float = 1e-6) -> torch.Tensor:
    """Anderson's weights: argmin_g |f - d_f g| for each image (d_f (B, N, m), f (B, N, 1)), from the
    m x m normal equations with a ridge of ``ridge`` times the mean squared column norm.

    Why not ``torch.linalg.lstsq``: its CPU default (LAPACK gelsy) returns different weights from run
    to run, in one process, once the differences grow nearly collinear (late iterations), so inversions
    did not repeat. The ridge keeps the solve well posed there, and the result is the same on every
    device and in float32 (measured on 8 held-out scenes at 5, 10 and 50 steps: PSNR, UNet calls and
    residuals as gelsy's, within its own run-to-run spread)."""
    d_t = d_f.transpose(1, 2)
    gram = d_t @ d_f  # (B, m, m)
    scale = ridge * gram.diagonal(dim1=1, dim2=2).mean(-1).clamp_min(torch.finfo(gram.dtype).tiny)
    eye = torch.eye(gram.shape[-1], dtype=gram.dtype, device=gram.device)
    return torch.linalg.solve(gram + scale[:, None, None] * eye, d_t @ f)


class BDIA(InversionScheme):
    """Bidirectional integration: after a plain first step, each latent comes from the two below it with
    one UNet call, the exact inverse of BDIA sampling (which then needs no fixed point at all)."""

    name, summary = "bdia", "bidirectional integration: exact with one UNet call a step (sampling takes BDIA steps)"
    pair_start = True

    def invert(self, model: Model, z0: torch.Tensor, schedule: Schedule, cond: PromptEmbedding, *,
               iters: int = 0, tol: float = 0.0, gamma: float = 1.0, progress: str | None = None) -> InversionTrace:
        z = z0.to(torch.float32)
        trajectory = [z]
        with torch.no_grad(), model.deferred_checks():
            for i, t in enumerate(Progress(list(reversed(schedule.timesteps)), desc=progress, unit="step")):
                if i == 0:  # any map will do: sampling's last BDIA step gives z*[0] back from z*[1] and z*[2]
                    z = schedule.invert_step(z, model.unet_output(z, t, cond), 0)
                else:
                    k = i  # z*[k] is at level t_{k-1}
                    z = schedule.bdia_invert_step(trajectory[k - 1], z, model.unet_output(z, schedule.level(k), cond), k,
                                                  gamma)
                trajectory.append(z)
        n = schedule.steps
        return InversionTrace(torch.stack(trajectory), [None] * n, [0] * n)


class Midpoint(InversionScheme):
    """RF-Solver's second-order inversion (Wang et al. 2024, "Taming Rectified Flow for Inversion and
    Editing"): each step ``z + dt v(z + dt/2 v(z, s), s + dt/2)`` with the velocity at the step's start
    sigma, as the paper's Taylor step is (:func:`npinv.flow_schedule.midpoint_step`). Not exact: the
    sampler's midpoint step undoes it to second order. Its inversions sample with the same step."""

    name, summary = "midpoint", "flow models: RF-Solver's second-order midpoint step (2 calls a step; samples the same way)"
    exact = False
    sampler = "midpoint"
    flow_only = True
    reuse = False

    def invert(self, model: Model, z0: torch.Tensor, schedule: Schedule, cond: PromptEmbedding, *,
               iters: int = 0, tol: float = 0.0, gamma: float = 1.0, progress: str | None = None) -> InversionTrace:
        self.check_model(model)

        def velocity(z: torch.Tensor, t: float) -> torch.Tensor:
            return model.unet_output(z, t, cond)

        z = z0.to(torch.float32)
        trajectory, v_next = [z], None
        with torch.no_grad(), model.deferred_checks():
            for i in Progress(range(schedule.steps), desc=progress, unit="step"):
                step = schedule.midpoint_invert(velocity, z, i, v_start=v_next if self.reuse else None)
                z, v_next = step.z, step.v_mid
                trajectory.append(z)
        n = schedule.steps
        # "iterations" counts calls beyond one a step: the midpoint's second call (FireFlow's first step only).
        extra = [1] * n if not self.reuse else [1] + [0] * (n - 1)
        return InversionTrace(torch.stack(trajectory), [None] * n, extra)


class FireFlow(Midpoint):
    """FireFlow (Deng et al. 2024, "FireFlow: Fast Inversion of Rectified Flow for Image Semantic
    Editing"): the midpoint step whose start velocity is the previous step's midpoint velocity, so every
    step after the first costs one model call. Its inversions sample with the same reuse."""

    name, summary = "fireflow", "flow models: FireFlow, the midpoint step reusing the last midpoint velocity (~1 call a step)"
    sampler = "fireflow"
    reuse = True


SCHEMES: Mapping[str, InversionScheme] = MappingProxyType(
    {s.name: s for s in (DDIMScheme(), FixedPoint(), AndersonFixedPoint(), BDIA(), Midpoint(), FireFlow())})


def scheme_names() -> tuple[str, ...]:
    return tuple(SCHEMES)


def get_scheme(name: str) -> InversionScheme:
    from npinv.checks import lookup

    return lookup(SCHEMES, name, "inversion scheme")
