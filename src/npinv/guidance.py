"""Guidance rules: pure functions of the negative and conditional model outputs.

A rule sees every branch at once (shape ``(B, C, H, W)``), because proximal guidance thresholds
at a quantile taken over the whole batch.
"""

from __future__ import annotations

import dataclasses

import torch


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
