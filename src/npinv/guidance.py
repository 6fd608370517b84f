"""Guidance rules: pure functions of the negative and conditional model outputs.

A rule sees every branch at once (shape ``(B, C, H, W)``), because proximal guidance thresholds
at a quantile taken over the whole batch. :meth:`guide` returns the guided output with whatever a
step hook needs of it (ProxNPI's mask), which the sampling loop puts in the step's state.
"""

from __future__ import annotations

import dataclasses

import torch


@dataclasses.dataclass(frozen=True)
class Guided:
    """A guidance rule's output for one step: the guided model output and, for proximal guidance,
    the mask of where the guidance acted (dilated, per channel)."""

    eps: torch.Tensor
    mask: torch.Tensor | None = None


@dataclasses.dataclass(frozen=True)
class CFG:
    """Classifier-free guidance ``e_neg + w * (e_cond - e_neg)``."""

    scale: float

    @property
    def needs_negative(self) -> bool:
        # At w = 1 the result is e_cond: skip the negative row rather than compute a + (b - a).
        return self.scale != 1.0

    def __call__(self, eps_neg: torch.Tensor, eps_cond: torch.Tensor) -> torch.Tensor:
        if not self.needs_negative:
            return eps_cond
        return eps_neg + self.scale * (eps_cond - eps_neg)

    def guide(self, eps_neg: torch.Tensor, eps_cond: torch.Tensor) -> Guided:
        return Guided(self(eps_neg, eps_cond))


@dataclasses.dataclass(frozen=True)
class ProximalGuidance:
    """Proximal guidance (ProxNPI, Han et al. 2023): soft-threshold the guidance direction
    ``d = e_cond - e_neg`` at the ``q``-quantile of ``|d|`` over the whole batch (source rows
    included, fp32, as the reference does), then ``e_neg + w * (d - clamp(d, -tau, tau))``.

    :meth:`guide` also returns the dilated per-channel mask ``|d_prox| > tau``, for the
    inversion-guidance hook. ``groups`` (row ranges, one per image edited in the same batch)
    takes one quantile per image, so batching images does not change any image's result.
    """

    scale: float
    quantile: float = 0.75
    dilate: int = 1
    groups: tuple[tuple[int, int], ...] | None = None
    needs_negative: bool = True

    def __call__(self, eps_neg: torch.Tensor, eps_cond: torch.Tensor) -> torch.Tensor:
        return self.guide(eps_neg, eps_cond).eps

    def guide(self, eps_neg: torch.Tensor, eps_cond: torch.Tensor) -> Guided:
        d = (eps_cond - eps_neg).float()
        tau = torch.empty((d.shape[0],) + (1,) * (d.ndim - 1), dtype=d.dtype, device=d.device)
        for start, stop in self.groups or [(0, d.shape[0])]:
            flat = d[start:stop].abs().flatten()
            # torch.quantile refuses very large inputs; kthvalue is exact and has no size limit.
            k = max(1, min(flat.numel(), int(round(self.quantile * (flat.numel() - 1))) + 1))
            tau[start:stop] = flat.kthvalue(k).values
        d_prox = d - torch.maximum(torch.minimum(d, tau), -tau)
        mask = (d_prox.abs() > tau).float()
        if self.dilate:
            size = 2 * self.dilate + 1
            mask = torch.nn.functional.max_pool2d(mask, size, stride=1, padding=self.dilate)
        return Guided(eps_neg + self.scale * d_prox, mask)
