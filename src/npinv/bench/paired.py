"""Paired comparison of two edit-shapes runs on the same cases (one inversion against another).

Both runs edit the same held-out scenes with the same swaps, so each case is a pair. Success is
compared by its discordant pairs (the cases only one run gets right) with McNemar's exact test, and
both the success rate and the background PSNR by their mean paired difference with a 95 % bootstrap
interval that resamples whole scenes (a scene's three swaps share one inversion, so they are not
independent draws).
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np

from npinv.bench.results import markdown_table


@dataclasses.dataclass(frozen=True)
class PairedComparison:
    """``other`` against ``base`` on ``n`` shared cases from ``scenes`` scenes (differences: other - base)."""

    base: str
    other: str
    steps: int
    n: int
    scenes: int
    both_ok: int
    base_only: int  # cases only the base run edits successfully
    other_only: int
    mcnemar_p: float  # exact two-sided test of base_only against other_only
    success_diff: float
    success_ci: tuple[float, float]
    bg_diff: float  # mean paired background PSNR difference (dB), every case
    bg_ci: tuple[float, float]


def load_edit_rows(folder: str | Path) -> list[dict]:
    """The rows an edit-shapes run wrote (``edit_results.jsonl``)."""
    path = Path(folder) / "edit_results.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# What makes two rows the same case: by default also the same method, controller and guidance (one
# inversion against another); ``EDIT_CASE`` alone compares two methods on the same swaps.
CASE_FIELDS = ("scene", "kind", "target", "method", "controller", "guidance", "steps")
EDIT_CASE = ("scene", "kind", "target", "steps")


def _case(row: dict, fields: tuple[str, ...] = CASE_FIELDS) -> tuple:
    return tuple(row[f] for f in fields)


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value for ``b`` and ``c`` discordant pairs (binomial, p = 1/2)."""
    n = b + c
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, k) for k in range(min(b, c) + 1)) / 2**n
    return min(1.0, 2 * tail)


def compare_paired(base_rows: list[dict], other_rows: list[dict], *, resamples: int = 4000,
                   seed: int = 0, fields: tuple[str, ...] = CASE_FIELDS,
                   names: tuple[str, str] | None = None) -> PairedComparison:
    """Compare two runs on the cases they share (rows equal on ``fields``); raises ValueError when they
    share none. ``names``: the two runs' labels (default: their inversion schemes)."""
    base = {_case(r, fields): r for r in base_rows}
    other = {_case(r, fields): r for r in other_rows}
    keys = sorted(base.keys() & other.keys(), key=str)
    if not keys:
        raise ValueError("the two runs share no edit case")
    ok_b = np.array([base[k]["success"] for k in keys], dtype=float)
    ok_o = np.array([other[k]["success"] for k in keys], dtype=float)
    bg_b = np.array([base[k]["psnr_bg"] for k in keys], dtype=float)
    bg_o = np.array([other[k]["psnr_bg"] for k in keys], dtype=float)
    finite = np.isfinite(bg_b) & np.isfinite(bg_o)  # a case whose kept region is empty or matches exactly
    scene_of = np.array([k[0] for k in keys])
    scenes = np.unique(scene_of)
    members = [np.flatnonzero(scene_of == s) for s in scenes]
    d_ok, d_bg = ok_o - ok_b, np.where(finite, bg_o - bg_b, np.nan)

    rng = np.random.default_rng(seed)
    ok_means, bg_means = np.empty(resamples), np.empty(resamples)
    for i in range(resamples):
        idx = np.concatenate([members[j] for j in rng.integers(0, len(scenes), len(scenes))])
        ok_means[i] = d_ok[idx].mean()
        bg_means[i] = np.nanmean(d_bg[idx]) if np.isfinite(d_bg[idx]).any() else np.nan

    def interval(values: np.ndarray) -> tuple[float, float]:
        lo, hi = np.nanpercentile(values, [2.5, 97.5])
        return float(lo), float(hi)

    base_only = int(((ok_b == 1) & (ok_o == 0)).sum())
    other_only = int(((ok_b == 0) & (ok_o == 1)).sum())
    first_b, first_o = base[keys[0]], other[keys[0]]
    return PairedComparison(
        base=names[0] if names else first_b.get("inversion", "ddim"),
        other=names[1] if names else first_o.get("inversion", "ddim"), steps=int(first_b["steps"]),
        n=len(keys), scenes=len(scenes), both_ok=int(((ok_b == 1) & (ok_o == 1)).sum()), base_only=base_only,
        other_only=other_only, mcnemar_p=mcnemar_exact(base_only, other_only), success_diff=float(d_ok.mean()),
        success_ci=interval(ok_means), bg_diff=float(np.nanmean(d_bg)), bg_ci=interval(bg_means))


def paired_table(comparisons: list[PairedComparison]) -> str:
    header = ["inversion", "against", "steps", "cases (scenes)", "both succeed", "only the baseline", "only this one",
              "McNemar p", "success difference (95% CI)", "bg PSNR difference, dB (95% CI)"]
    rows = [[c.other, c.base, c.steps, f"{c.n} ({c.scenes})", c.both_ok, c.base_only, c.other_only, f"{c.mcnemar_p:.2g}",
             f"{c.success_diff:+.1%} ({c.success_ci[0]:+.1%} to {c.success_ci[1]:+.1%})",
             f"{c.bg_diff:+.2f} ({c.bg_ci[0]:+.2f} to {c.bg_ci[1]:+.2f})"] for c in comparisons]
    return markdown_table(header, rows)
