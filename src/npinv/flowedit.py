"""FlowEdit (Kulikov et al. 2024, "FlowEdit: Inversion-Free Text-Based Editing Using Pre-Trained Flow
Models"): an edit of a flow model's image with no inversion at all.

From the clean source latent ``x_src``, for each step ``i`` of the window ``n_max > steps - i >= n_min``
(counted from the noisy end), with fresh noise ``eps`` (``n_avg`` draws averaged)::

    z_src = (1 - sigma_i) x_src + sigma_i eps          # the source, noised directly
    z_tar = z_fe + (z_src - x_src)                     # the edit, noised by the same offset
    z_fe  = z_fe + (sigma_{i+1} - sigma_i) (V(z_tar, target) - V(z_src, source))

``V`` is the guided velocity (CFG with the null prompt as negative; the source at ``source_guidance``,
each target at ``target_guidance``). The last ``n_min`` steps, if any, sample the edit plainly from
``z_fe`` noised once more. The source branch needs no inversion and no trajectory.

Where npinv differs from the reference code: the source's rows are shared by every target of a call
(one batch of ``2 + 2T`` rows a step: the source's null and prompt rows, then each target's); on FLUX.1-dev
the paper passes its guidances (1.5, 5.5) as the embedded guidance with no negative row, and npinv does
the same by calling the source and the targets apart (2 calls a step, 1 + T rows). The noise is drawn
from a seeded generator on the CPU, so a result repeats on every device.

FlowEdit's identity: with target = source and equal guidances, both velocities are the same rows on the
same latents, their difference is exactly 0 and the result is ``x_src`` itself.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator

import torch

from npinv.cost import Cost, Costed, Meter
from npinv.errors import NpinvError
from npinv.flow_schedule import FlowSchedule, euler_step
from npinv.guidance import CFG
from npinv.model import PromptEmbedding
from npinv.progress import Progress


@dataclasses.dataclass(frozen=True)
class FlowEditSettings:
    """FlowEdit's knobs. The paper's defaults: SD3 50 steps, ``n_max`` 33, ``n_min`` 0, ``n_avg`` 1,
    guidance 3.5 (source) and 13.5 (target); FLUX.1-dev 28 steps, ``n_max`` 24, ``n_min`` 0, ``n_avg`` 1,
    embedded guidance 1.5 and 5.5. ``n_max`` None: the paper's fraction of the steps (33/50, 24/28)."""

    n_max: int | None = None
    n_min: int = 0
    n_avg: int = 1
    source_guidance: float | None = None
    target_guidance: float | None = None
    seed: int = 0

    def resolved(self, family: str, steps: int) -> FlowEditSettings:
        paper = PAPER_DEFAULTS[family]
        n_max = self.n_max if self.n_max is not None else round(paper["n_max"] * steps / paper["steps"])
        out = dataclasses.replace(
            self, n_max=min(n_max, steps),
            source_guidance=paper["source_guidance"] if self.source_guidance is None else self.source_guidance,
            target_guidance=paper["target_guidance"] if self.target_guidance is None else self.target_guidance)
        if not (0 <= out.n_min < out.n_max <= steps) or out.n_avg < 1:
            raise NpinvError(f"FlowEdit needs 0 <= n_min < n_max <= steps and n_avg >= 1; got n_min {out.n_min}, "
                             f"n_max {out.n_max}, n_avg {out.n_avg} for {steps} steps")
        return out


PAPER_DEFAULTS = {
    "sd3": {"steps": 50, "n_max": 33, "source_guidance": 3.5, "target_guidance": 13.5},
    "flux": {"steps": 28, "n_max": 24, "source_guidance": 1.5, "target_guidance": 5.5},
}


def model_calls(settings: FlowEditSettings, family: str, steps: int) -> int:
    """Transformer calls of one FlowEdit run (any number of targets): ``n_avg (n_max - n_min)`` window
    steps (1 call each on SD3, 2 on FLUX.1-dev) and ``n_min`` plain steps (1 call each)."""
    s = settings.resolved(family, steps)
    window = s.n_avg * (s.n_max - s.n_min)
    return (2 if family == "flux" else 1) * window + s.n_min


@dataclasses.dataclass
class FlowEditResult(Costed):
    latents: torch.Tensor  # (T, C, h, w): each target's edited clean latent
    cost: Cost
    settings: FlowEditSettings  # as run (defaults resolved)


def flowedit(model, x_src: torch.Tensor, source: PromptEmbedding, targets: list[PromptEmbedding],
             schedule: FlowSchedule, settings: FlowEditSettings = FlowEditSettings(), *,
             progress: str | None = None) -> FlowEditResult:
    """Edit the clean latent ``x_src`` (1, C, h, w) from ``source`` toward each of ``targets``."""
    if not getattr(model, "is_flow", False):
        raise NpinvError(f"FlowEdit is for flow-matching models (SD3, SD3.5, FLUX.1); {model.name} is a UNet model")
    if not targets:
        raise NpinvError("give at least one target prompt")
    embedded = getattr(model, "embedded_guidance", None) is not None
    s = settings.resolved(model.family, schedule.steps)
    meter = Meter(model)
    n, t_count = schedule.steps, len(targets)
    x_src = x_src.to(model.device, torch.float32)
    null = model.null_embedding()
    src_rule, tar_rule = CFG(s.source_guidance), CFG(s.target_guidance)
    generator = torch.Generator().manual_seed(s.seed)

    def noise() -> torch.Tensor:
        return torch.randn(x_src.shape, generator=generator).to(x_src.device)

    def velocities(z_src: torch.Tensor | None, z_tar: torch.Tensor, t: float) -> tuple[torch.Tensor | None, torch.Tensor]:
        """The source's guided velocity (None: not needed) and each target's, in as few calls as the model allows."""
        if embedded:  # FLUX.1-dev: the guidances are the embedded ones, no negative rows
            v_src = None
            if z_src is not None:
                with _embedded_guidance(model, s.source_guidance):
                    v_src = model.unet_output(z_src, t, source)
            with _embedded_guidance(model, s.target_guidance):
                return v_src, model.unet_output(z_tar, t, PromptEmbedding.cat(targets))
        if z_src is None:
            out = model.unet_output(torch.cat([z_tar, z_tar]), t, PromptEmbedding.cat([null] * t_count + list(targets)))
            return None, tar_rule(out[:t_count], out[t_count:])
        # One call: the source's null and prompt rows, then the targets' null rows and prompt rows.
        out = model.unet_output(torch.cat([z_src, z_src, z_tar, z_tar]), t,
                                PromptEmbedding.cat([null, source] + [null] * t_count + list(targets)))
        return src_rule(out[0:1], out[1:2]), tar_rule(out[2 : 2 + t_count], out[2 + t_count :])

    z_fe = x_src.expand(t_count, *x_src.shape[1:]).clone()
    z_tar_plain = None
    with torch.no_grad(), model.deferred_checks():
        for i in Progress(range(n), desc=progress, unit="step"):
            left = n - i  # steps from here to the clean end, this one included
            if left > s.n_max:
                continue
            t = schedule.denoise_timestep(i)
            sigma, sigma_next = schedule.sigmas[i], schedule.sigmas[i + 1]
            if left > s.n_min:
                delta = torch.zeros_like(z_fe)
                for _ in range(s.n_avg):
                    z_src = (1 - sigma) * x_src + sigma * noise()
                    # z_fe - x_src is exactly 0 while nothing has changed: the target rows then equal the source's.
                    z_tar = z_src + (z_fe - x_src)
                    v_src, v_tar = velocities(z_src, z_tar, t)
                    delta = delta + (v_tar - v_src) / s.n_avg
                z_fe = euler_step(z_fe, delta, sigma, sigma_next)
            else:
                if z_tar_plain is None:  # the first plain step: noise the edit once more, as the source
                    z_src = (1 - sigma) * x_src + sigma * noise()
                    z_tar_plain = z_fe + (z_src - x_src)
                _, v_tar = velocities(None, z_tar_plain, t)
                z_tar_plain = euler_step(z_tar_plain, v_tar, sigma, sigma_next)
    latents = z_fe if z_tar_plain is None else z_tar_plain
    return FlowEditResult(latents, meter.cost, s)


@contextlib.contextmanager
def _embedded_guidance(model, value: float) -> Iterator[None]:
    """FLUX.1-dev's embedded guidance set to ``value`` for the calls inside (the model's own value after)."""
    kept = model.embedded_guidance
    model.embedded_guidance = float(value)
    try:
        yield
    finally:
        model.embedded_guidance = kept


def edit_jobs(model, jobs: list, settings, *, progress: bool = False) -> list:
    """``npinv.editing.edit_batch`` for ``--method flowedit``: each image edited from its clean latent
    ``z*[0]`` (an inversion's first latent: the encoder's, or the decoder-fitted one) toward its targets,
    with ``settings.guidance`` as the target guidance, ``settings.flowedit_*`` as FlowEdit's other knobs
    and noise from FlowEdit's default seed. The source
    image is the VAE round trip of ``z*[0]``; there is no attention controller or blend mask."""
    from npinv.editing import EditResult

    meter = Meter(model)
    results = []
    for job in jobs:
        inv = job.inversion
        schedule = inv.schedule_for(model).with_solver("euler")
        targets = [model.encode_prompt(t) for t in job.targets]
        x_src = inv.trajectory[0:1]
        done = flowedit(model, x_src, inv.source, targets, schedule,
                        FlowEditSettings(n_max=settings.flowedit_n_max, n_min=settings.flowedit_n_min,
                                         n_avg=settings.flowedit_n_avg, source_guidance=settings.flowedit_source_guidance,
                                         target_guidance=settings.guidance),
                        progress="flowedit" if progress else None)
        latents = torch.cat([x_src.to(done.latents), done.latents])
        images = model.decode(latents)
        results.append((job, inv, latents, images))
    cost = meter.cost
    return [EditResult(images=images[1:], source_image=images[:1], latents=latents, targets=list(job.targets),
                       cost=cost, inversion=inv, controller=None, blend_mask=None, settings=settings)
            for job, inv, latents, images in results]
