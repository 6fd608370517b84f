"""The DDIM schedule as data: the timestep grid and the deterministic (eta = 0) forward and
inverse steps, in fp32 whatever dtype the UNet runs in.

Conventions (see docs/method.md): leading spacing ``t_i = i * D + offset`` with ``D = T // n``;
denoising step ``i`` goes from level ``t_i`` to ``t_i - D`` (``final_alpha`` below zero);
inversion step ``i`` goes from ``t_i - D`` up to ``t_i`` with the model evaluated at the
destination ``t_i``, as prompt-to-prompt and diffusers' ``DDIMInverseScheduler`` do. A v-prediction
output is converted to epsilon with the alpha of the step's source level, as diffusers does.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Literal

import torch

from npinv.errors import NpinvError

PredictionType = Literal["epsilon", "v_prediction"]


@dataclasses.dataclass(frozen=True)
class Schedule:
    """``alphas_cumprod`` (fp32, length T), the grid and the prediction type of one model."""

    alphas_cumprod: torch.Tensor
    steps: int
    offset: int
    final_alpha: float
    prediction_type: PredictionType = "epsilon"

    @classmethod
    def from_scheduler_config(cls, config, steps: int, offset: int | None = None) -> Schedule:
        """Build from a diffusers scheduler config (``pipe.scheduler.config``).

        ``offset=None`` takes the config's ``steps_offset``; published tables use 0.
        """
        from diffusers import DDIMScheduler

        # from_config keeps the model's betas, set_alpha_to_one and prediction type.
        ddim = DDIMScheduler.from_config(config)
        offset = ddim.config.steps_offset if offset is None else offset
        pred = ddim.config.prediction_type
        if pred not in ("epsilon", "v_prediction"):
            raise NpinvError(f"prediction type {pred!r} is not supported (epsilon or v_prediction)")
        final = 1.0 if ddim.config.set_alpha_to_one else float(ddim.alphas_cumprod[0])
        return cls(ddim.alphas_cumprod.to(torch.float32), steps, offset, final, pred)

    def __post_init__(self) -> None:
        T = len(self.alphas_cumprod)
        if not 1 <= self.steps <= T:
            raise NpinvError(f"steps must lie in 1..{T}, got {self.steps}")
        top = (self.steps - 1) * self.stride + self.offset
        if self.offset < 0 or top >= T:
            fix = "use offset 0 (--offset 0) or fewer steps" if self.offset > 0 else "use fewer steps"
            raise NpinvError(f"{self.steps} steps with offset {self.offset} reach timestep {top}, past the model's "
                             f"{T} training timesteps (0..{T - 1}); {fix}")

    @property
    def stride(self) -> int:
        return len(self.alphas_cumprod) // self.steps

    @property
    def timesteps(self) -> list[int]:
        """Denoising order: t_{n-1}, ..., t_0."""
        return [i * self.stride + self.offset for i in reversed(range(self.steps))]

    def alpha(self, t: int) -> torch.Tensor:
        """The cumulative alpha at level ``t`` (``t < 0``: the final alpha), a 0-dim fp32 tensor on the CPU:
        a host number to the device's kernels, so the steps read nothing back and copy nothing over."""
        return self.alphas_cumprod[t] if t >= 0 else self._final_alpha

    @functools.cached_property
    def _final_alpha(self) -> torch.Tensor:
        # Made once, not at every last step (a frozen dataclass still has a __dict__ for the cache).
        return torch.tensor(self.final_alpha, dtype=torch.float32)

    def to_epsilon(self, output: torch.Tensor, z: torch.Tensor, level: int) -> torch.Tensor:
        """Epsilon from a model output at noise level ``level`` (identity for epsilon models)."""
        output = output.to(torch.float32)
        if self.prediction_type == "epsilon":
            return output
        a = self.alpha(level)
        return a.sqrt() * output + (1 - a).sqrt() * z.to(torch.float32)

    def denoise_timestep(self, i: int) -> int:
        """Timestep of denoising step ``i`` (0 = the noisiest)."""
        return (self.steps - 1 - i) * self.stride + self.offset

    def denoise_step(self, z: torch.Tensor, output: torch.Tensor, i: int) -> torch.Tensor:
        """Denoising step ``i``: from level ``t`` to ``t - D`` given the model output at ``t``."""
        t = self.denoise_timestep(i)
        return ddim_step(z, self.to_epsilon(output, z, t), self.alpha(t), self.alpha(t - self.stride))

    def invert_step(self, z: torch.Tensor, output: torch.Tensor, i: int) -> torch.Tensor:
        """Inversion step ``i``: from level ``t_i - D`` up to ``t_i``, output taken at ``t_i``."""
        t = i * self.stride + self.offset
        s = t - self.stride
        return ddim_step(z, self.to_epsilon(output, z, s), self.alpha(s), self.alpha(t))

    def invert_step_at(self, z: torch.Tensor, output: torch.Tensor, z_to: torch.Tensor, i: int) -> torch.Tensor:
        """Inversion step ``i`` with the model output taken at the destination latent ``z_to`` (level
        ``t_i``), as the denoising step from ``z_to`` will take it: the fixed-point iteration's map.
        For v-prediction the output becomes epsilon with ``z_to``'s level, as :meth:`denoise_step` does."""
        t = i * self.stride + self.offset
        s = t - self.stride
        return ddim_step(z, self.to_epsilon(output, z_to, t), self.alpha(s), self.alpha(t))

    def denoise_step_to(self, z: torch.Tensor, output: torch.Tensor, k: int) -> torch.Tensor:
        """The denoising step that undoes inversion step ``k`` (from level ``t_k`` down to ``t_k - D``)."""
        return self.denoise_step(z, output, self.steps - 1 - k)

    # -- BDIA (bidirectional integration, Zhang et al. 2023): one UNet call a step, invertible exactly --
    def bdia_ends(self, z: torch.Tensor, output: torch.Tensor, level: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``D(z; level -> level + D)`` and ``D(z; level -> level - D)``: the DDIM steps up and down from
        ``z`` at ``level`` with the one model output there."""
        e = self.to_epsilon(output, z, level)
        a = self.alpha(level)
        return ddim_step(z, e, a, self.alpha(level + self.stride)), ddim_step(z, e, a, self.alpha(level - self.stride))

    def bdia_step(self, z: torch.Tensor, z_prev: torch.Tensor, output: torch.Tensor, i: int,
                  gamma: float = 1.0) -> torch.Tensor:
        """Denoising step ``i >= 1``: ``z_{k-1} = gamma (z_{k+1} - D(z_k; up)) + D(z_k; down)``, ``z_prev`` =
        ``z_{k+1}`` (BDIA's damping factor ``gamma``; 1 is the plain BDIA step)."""
        up, down = self.bdia_ends(z, output, self.denoise_timestep(i))
        if gamma == 1.0:
            return z_prev.to(torch.float32) - (up - down)
        return gamma * (z_prev.to(torch.float32) - up) + down

    def bdia_invert_step(self, z_before: torch.Tensor, z: torch.Tensor, output: torch.Tensor, k: int,
                         gamma: float = 1.0) -> torch.Tensor:
        """``z*[k+1] = (z*[k-1] - D(z*[k]; down)) / gamma + D(z*[k]; up)``: the exact inverse of
        :meth:`bdia_step` (``k >= 1``, the output taken at ``z*[k]``'s own level ``(k - 1) * D + offset``).
        It divides by ``gamma`` every step: exact in exact arithmetic, rounding grows as ``gamma**-n``."""
        up, down = self.bdia_ends(z, output, self.level(k))
        if gamma == 1.0:
            return z_before.to(torch.float32) + (up - down)
        return (z_before.to(torch.float32) - down) / gamma + up

    def level(self, k: int) -> int:
        """The noise level of trajectory latent ``z*[k]`` (``k = 0``: below the grid, the final alpha)."""
        return (k - 1) * self.stride + self.offset

    def to_dict(self) -> dict:
        return {"steps": self.steps, "offset": self.offset, "final_alpha": self.final_alpha,
                "prediction_type": self.prediction_type}


def ddim_step(z: torch.Tensor, eps: torch.Tensor, a_from: torch.Tensor, a_to: torch.Tensor) -> torch.Tensor:
    """Move ``z`` from cumulative alpha ``a_from`` to ``a_to`` along the DDIM ODE (fp32)."""
    z = z.to(torch.float32)
    eps = eps.to(torch.float32)
    x0 = (z - (1 - a_from).sqrt() * eps) / a_from.sqrt()
    return a_to.sqrt() * x0 + (1 - a_to).sqrt() * eps
