"""The flow-matching schedule as data: the sigma grid and the Euler steps (forward and inverse), in fp32.

Rectified-flow models (SD3, SD3.5, FLUX.1) see ``x_sigma = (1 - sigma) x0 + sigma eps`` and predict the
velocity ``v ~ eps - x0``; diffusers' ``FlowMatchEulerDiscreteScheduler.step`` is ``x + (sigma_next -
sigma) v``. :class:`FlowSchedule` holds the grid the pipelines use, built by the scheduler itself
(its shift, FLUX's resolution-dependent ``mu``, terminal stretch or Karras options all included), so
that inversion walks the identical sigmas back.

Conventions, the same as :class:`npinv.schedule.Schedule`'s so the one loop and the inversion schemes
drive either: ``sigmas[0..n]`` in denoising order (``sigmas[n] = 0``); denoising step ``i`` goes from
``sigmas[i]`` to ``sigmas[i + 1]`` with the model called at ``timesteps[i] = sigmas[i] * 1000``; the
trajectory latent ``z*[k]`` lies at ``sigma(k) = sigmas[n - k]`` (``z*[0]`` clean, ``z*[n]`` noise);
inversion step ``i`` goes from ``z*[i]`` up to ``z*[i + 1]``; the plain (``ddim``) scheme's call is at
:meth:`FlowSchedule.invert_timestep`, the step's start (textbook Euler inversion), and the fixed-point
iterations call at the destination's timestep (``reversed(timesteps)[i]``), as the sampler does.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any, Literal

import torch

from npinv.errors import NpinvError

# How the pipeline asks the scheduler for its grid: "scheduler" = its own default (StableDiffusion3Pipeline
# passes no sigmas), "flux" = FluxPipeline's ``sigmas = linspace(1, 1/n, n)`` with ``mu``.
Grid = Literal["scheduler", "flux"]
# A velocity field: (latent, the model's timestep sigma * 1000) -> velocity, fp32.
Velocity = Callable[[torch.Tensor, float], torch.Tensor]
# How the one sampling loop takes a denoising step on this grid: "euler" (1 call a step, the pipelines'
# sampler), "midpoint" (RF-Solver's second order: 2 calls), "fireflow" (midpoint reusing the previous
# step's midpoint velocity: 1 call a step after the first). An inversion made by a scheme sets it
# (:attr:`npinv.schemes.InversionScheme.sampler`), so that its reconstructions and edits sample with the
# solver that inverted them.
Solver = Literal["euler", "midpoint", "fireflow"]
SOLVERS: tuple[str, ...] = ("euler", "midpoint", "fireflow")


@dataclasses.dataclass(frozen=True)
class FlowSchedule:
    """The sigmas (fp32, length ``steps + 1``, ending at 0) and the timesteps the model is called at."""

    sigmas: torch.Tensor
    timestep_values: torch.Tensor  # (steps,) fp32: the scheduler's ``timesteps``
    grid: Grid = "scheduler"
    shift: float = 1.0
    mu: float | None = None
    num_train_timesteps: int = 1000
    solver: Solver = "euler"

    @classmethod
    def from_scheduler_config(cls, config: Mapping[str, Any], steps: int, *, grid: Grid = "scheduler",
                              image_seq_len: int | None = None) -> FlowSchedule:
        """The grid a diffusers pipeline uses for ``steps`` steps (``pipe.scheduler.config``).

        ``grid="scheduler"`` is StableDiffusion3Pipeline's call, ``"flux"`` FluxPipeline's. With the config's
        ``use_dynamic_shifting`` the shift ``mu`` follows the image's token count ``image_seq_len`` (FLUX:
        packed 2x2 latent patches, ``(h // 2) * (w // 2)``; SD3: ``(h // p) * (w // p)``), by the
        pipelines' own ``calculate_shift``."""
        from diffusers import FlowMatchEulerDiscreteScheduler
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift

        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise NpinvError(f"steps must be a whole number of at least 1, got {steps!r}")
        scheduler = FlowMatchEulerDiscreteScheduler.from_config(dict(config))
        cfg = scheduler.config
        if cfg.get("stochastic_sampling") or cfg.get("invert_sigmas"):
            raise NpinvError("this flow scheduler samples stochastically or inverts its sigmas; npinv needs the "
                             "deterministic Euler sampler (stochastic_sampling and invert_sigmas off)")
        mu = None
        if cfg.get("use_dynamic_shifting"):
            if image_seq_len is None:
                raise ValueError("this scheduler shifts by resolution: pass image_seq_len")
            mu = float(calculate_shift(image_seq_len, cfg.get("base_image_seq_len", 256),
                                       cfg.get("max_image_seq_len", 4096), cfg.get("base_shift", 0.5),
                                       cfg.get("max_shift", 1.15)))
        sigmas = None
        if grid == "flux":
            import numpy as np

            sigmas = np.linspace(1.0, 1 / steps, steps)
        elif grid != "scheduler":
            raise ValueError(f"unknown grid {grid!r}")
        scheduler.set_timesteps(steps, device="cpu", sigmas=sigmas, **({} if mu is None else {"mu": mu}))
        return cls(scheduler.sigmas.to(torch.float32).clone(), scheduler.timesteps.to(torch.float32).clone(), grid,
                   float(scheduler.shift), mu, int(cfg.num_train_timesteps))

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> FlowSchedule:
        """The exact grid recorded by :meth:`to_dict` (an inversion's), whatever the model's config says now."""
        sigmas = torch.tensor(d["sigmas"], dtype=torch.float32)
        timesteps = torch.tensor(d["timesteps"], dtype=torch.float32)
        return cls(sigmas, timesteps, d.get("grid", "scheduler"), float(d.get("shift", 1.0)), d.get("mu"),
                   int(d.get("num_train_timesteps", 1000)))

    def __post_init__(self) -> None:
        s = self.sigmas
        if s.ndim != 1 or len(s) < 2 or len(self.timestep_values) != len(s) - 1:
            raise ValueError(f"{len(s)} sigmas for {len(self.timestep_values)} timesteps")
        if self.solver not in SOLVERS:
            raise ValueError(f"unknown flow solver {self.solver!r}")
        if float(s[-1]) != 0.0 or not bool((s[:-1] > s[1:]).all()):
            # Euler inversion walks the grid backwards: a repeated or rising sigma has no inverse step.
            raise NpinvError("the flow scheduler's sigmas must fall strictly to 0; this grid cannot be inverted")

    # -- the grid ---------------------------------------------------------------------------------
    @property
    def steps(self) -> int:
        return len(self.sigmas) - 1

    @property
    def timesteps(self) -> list[float]:
        """Denoising order: what the network is called with at step ``i`` (``sigmas[i] * 1000``, fp32 values)."""
        return [float(t) for t in self.timestep_values]

    def denoise_timestep(self, i: int) -> float:
        """Timestep of denoising step ``i`` (0 = the noisiest)."""
        return float(self.timestep_values[i])

    def sigma(self, k: int) -> torch.Tensor:
        """The sigma of trajectory latent ``z*[k]`` (``k = 0``: clean, 0; ``k = steps``: ``sigmas[0]``)."""
        return self.sigmas[self.steps - k]

    def level(self, k: int) -> float:
        """The timestep of trajectory latent ``z*[k]``: what the model is called with there (0 for ``z*[0]``)."""
        return 0.0 if k == 0 else self.denoise_timestep(self.steps - k)

    def invert_timestep(self, i: int) -> float:
        """The timestep at inversion step ``i``'s start (``z*[i]``'s): the textbook Euler inversion's
        ``v(z_i, sigma_i)``, what the plain scheme calls (:func:`npinv.schemes.start_timestep`); the
        fixed-point iterations call at the destination's, ``level(i + 1)``."""
        return self.level(i)

    def timestep_of(self, sigma: torch.Tensor | float) -> float:
        """The model's timestep for any sigma (on the grid or between), as the scheduler computes it (fp32)."""
        return float(torch.as_tensor(sigma, dtype=torch.float32) * self.num_train_timesteps)

    # -- steps (fp32) ---------------------------------------------------------------------------
    def denoise_step(self, z: torch.Tensor, v: torch.Tensor, i: int) -> torch.Tensor:
        """Denoising step ``i``: ``z + (sigmas[i + 1] - sigmas[i]) v``, bit for bit ``scheduler.step``'s (fp32)."""
        return euler_step(z, v, self.sigmas[i], self.sigmas[i + 1])

    def invert_step(self, z: torch.Tensor, v: torch.Tensor, i: int) -> torch.Tensor:
        """Inversion step ``i``: from ``z*[i]`` up to ``z*[i + 1]`` along the velocity ``v`` (taken at ``z``)."""
        return euler_step(z, v, self.sigma(i), self.sigma(i + 1))

    def invert_step_at(self, z: torch.Tensor, v: torch.Tensor, z_to: torch.Tensor, i: int) -> torch.Tensor:
        """Inversion step ``i`` with the velocity taken at the destination ``z_to`` (its timestep), as the
        denoising step from ``z_to`` will take it: the fixed-point iteration's map ``y = z - (sigma_i -
        sigma_{i+1}) v(y)``. A velocity needs no conversion with the latent, so ``z_to`` only names where
        ``v`` was taken."""
        return self.invert_step(z, v, i)

    def denoise_step_to(self, z: torch.Tensor, v: torch.Tensor, k: int) -> torch.Tensor:
        """The denoising step that undoes inversion step ``k`` (from ``z*[k + 1]``'s sigma down to ``z*[k]``'s)."""
        return self.denoise_step(z, v, self.steps - 1 - k)

    # -- BDIA (bidirectional integration, Zhang et al. 2023) carried to the Euler step ------------------
    def bdia_step(self, z: torch.Tensor, z_prev: torch.Tensor, v: torch.Tensor, i: int,
                  gamma: float = 1.0) -> torch.Tensor:
        """Denoising step ``i >= 1``: ``gamma (z_prev - E(z; up)) + E(z; down)`` with the Euler moves up to
        ``sigmas[i - 1]`` and down to ``sigmas[i + 1]`` from ``z`` at ``sigmas[i]`` (``z_prev``: the latent
        before ``z``); at ``gamma = 1``, ``z_prev + (sigmas[i + 1] - sigmas[i - 1]) v``."""
        up = euler_step(z, v, self.sigmas[i], self.sigmas[i - 1])
        down = euler_step(z, v, self.sigmas[i], self.sigmas[i + 1])
        if gamma == 1.0:
            return z_prev.to(torch.float32) - (up - down)
        return gamma * (z_prev.to(torch.float32) - up) + down

    def bdia_invert_step(self, z_before: torch.Tensor, z: torch.Tensor, v: torch.Tensor, k: int,
                         gamma: float = 1.0) -> torch.Tensor:
        """``z*[k+1] = (z*[k-1] - E(z*[k]; down)) / gamma + E(z*[k]; up)``: the exact inverse of
        :meth:`bdia_step` (``k >= 1``; ``v`` taken at ``z*[k]`` and ``level(k)``)."""
        up = euler_step(z, v, self.sigma(k), self.sigma(k + 1))
        down = euler_step(z, v, self.sigma(k), self.sigma(k - 1))
        if gamma == 1.0:
            return z_before.to(torch.float32) + (up - down)
        return (z_before.to(torch.float32) - down) / gamma + up

    # -- second-order steps (RF-Solver, FireFlow) ---------------------------------------------------
    def with_solver(self, solver: Solver) -> FlowSchedule:
        """The same grid sampled with another step rule (what the loop reads from :attr:`solver`)."""
        return self if solver == self.solver else dataclasses.replace(self, solver=solver)

    def midpoint_sigma(self, i: int) -> torch.Tensor:
        """Halfway between denoising step ``i``'s sigmas (fp32, as :func:`midpoint_step` computes it)."""
        s0, s1 = self.sigmas[i], self.sigmas[i + 1]
        return s0 + (s1 - s0) / 2

    def midpoint_timestep(self, i: int) -> float:
        """The model's timestep at denoising step ``i``'s midpoint (off the grid)."""
        return float(self.midpoint_sigma(i) * self.num_train_timesteps)

    def half_denoise_step(self, z: torch.Tensor, v: torch.Tensor, i: int) -> torch.Tensor:
        """The Euler move from ``sigmas[i]`` to the midpoint: where the midpoint velocity is taken."""
        return euler_step(z, v, self.sigmas[i], self.midpoint_sigma(i))

    def midpoint_denoise(self, velocity: Velocity, z: torch.Tensor, i: int,
                         v_start: torch.Tensor | None = None) -> MidpointStep:
        """Denoising step ``i`` by :func:`midpoint_step`."""
        return midpoint_step(velocity, z, self.sigmas[i], self.sigmas[i + 1], v_start=v_start,
                             num_train_timesteps=self.num_train_timesteps)

    def midpoint_invert(self, velocity: Velocity, z: torch.Tensor, i: int,
                        v_start: torch.Tensor | None = None) -> MidpointStep:
        """Inversion step ``i`` by :func:`midpoint_step`."""
        return midpoint_step(velocity, z, self.sigma(i), self.sigma(i + 1), v_start=v_start,
                             num_train_timesteps=self.num_train_timesteps)

    def to_dict(self) -> dict[str, Any]:
        # ``offset`` 0: flow grids have none; the key keeps the inversion format's check (offset >= 0) valid.
        return {"family": "flow", "steps": self.steps, "offset": 0, "grid": self.grid, "shift": self.shift,
                "mu": self.mu, "num_train_timesteps": self.num_train_timesteps,
                "sigmas": [float(s) for s in self.sigmas], "timesteps": self.timesteps}


def euler_step(z: torch.Tensor, v: torch.Tensor, sigma_from: torch.Tensor | float,
               sigma_to: torch.Tensor | float) -> torch.Tensor:
    """``z + (sigma_to - sigma_from) v`` in fp32, the difference taken in fp32 as the scheduler takes it."""
    dt = torch.as_tensor(sigma_to, dtype=torch.float32) - torch.as_tensor(sigma_from, dtype=torch.float32)
    return z.to(torch.float32) + dt * v.to(torch.float32)


@dataclasses.dataclass
class MidpointStep:
    """One midpoint step: the new latent, the velocity at the midpoint (FireFlow reuses it as the next
    step's start velocity) and the model calls it made."""

    z: torch.Tensor
    v_mid: torch.Tensor
    calls: int


def midpoint_step(velocity: Velocity, z: torch.Tensor, sigma_from: torch.Tensor | float,
                  sigma_to: torch.Tensor | float, *, v_start: torch.Tensor | None = None,
                  num_train_timesteps: int = 1000) -> MidpointStep:
    """The explicit midpoint step ``z + dt v(z + dt/2 v(z, s), s + dt/2)``, ``dt = sigma_to - sigma_from``.

    RF-Solver (Wang et al. 2024, "Taming Rectified Flow for Inversion and Editing") writes its second-order
    step as ``z + dt v + dt^2/2 v'`` with ``v' = (v(z + dt/2 v, s + dt/2) - v) / (dt/2)``: algebraically
    this midpoint step, 2 calls. FireFlow (Deng et al. 2024, "FireFlow: Fast Inversion of Rectified Flow
    for Image Semantic Editing") passes the previous step's midpoint velocity as ``v_start``, so each
    step after the first costs 1 call. Either direction: inversion when ``sigma_to > sigma_from``."""
    s0 = torch.as_tensor(sigma_from, dtype=torch.float32)
    s1 = torch.as_tensor(sigma_to, dtype=torch.float32)
    calls = 0
    if v_start is None:
        v_start = velocity(z, float(s0 * num_train_timesteps))
        calls += 1
    half = s0 + (s1 - s0) / 2
    v_mid = velocity(euler_step(z, v_start, s0, half), float(half * num_train_timesteps)).to(torch.float32)
    return MidpointStep(euler_step(z, v_mid, s0, s1), v_mid, calls + 1)


def midpoint_trajectory(velocity: Velocity, z: torch.Tensor, sigmas: torch.Tensor, *, reuse: bool = False,
                        num_train_timesteps: int = 1000) -> tuple[torch.Tensor, int]:
    """Midpoint steps along ``sigmas`` (rising: inversion; falling: sampling): the latents at each sigma,
    stacked, and the model calls. ``reuse``: FireFlow (each start velocity is the previous midpoint's,
    ``n + 1`` calls for ``n`` steps); otherwise RF-Solver's second order (``2 n`` calls)."""
    out, calls, v_next = [z.to(torch.float32)], 0, None
    for a, b in zip(sigmas[:-1], sigmas[1:], strict=True):
        step = midpoint_step(velocity, out[-1], a, b, v_start=v_next if reuse else None,
                             num_train_timesteps=num_train_timesteps)
        out.append(step.z)
        calls += step.calls
        v_next = step.v_mid
    return torch.stack(out), calls
