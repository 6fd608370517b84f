"""Paired comparison of two edit-shapes runs (npinv.bench.paired)."""

from __future__ import annotations

import json
import math

import pytest

from npinv.bench.paired import compare_paired, load_edit_rows, mcnemar_exact, paired_table


def _rows(success, bg, inversion="ddim"):
    """Rows for scenes of three swaps each, in edit-shapes' format."""
    kinds = ("color", "shape", "background")
    return [{"scene": i // 3, "kind": kinds[i % 3], "target": f"t{i}", "method": "npi", "controller": "replace",
             "guidance": 1.5, "steps": 10, "inversion": inversion, "success": ok, "psnr_bg": b}
            for i, (ok, b) in enumerate(zip(success, bg, strict=True))]


def test_mcnemar_exact_matches_the_binomial_tail():
    assert mcnemar_exact(0, 0) == 1.0
    assert mcnemar_exact(3, 0) == pytest.approx(0.25)  # 2 * (1/2)^3
    assert mcnemar_exact(12, 1) == pytest.approx(2 * (1 + 13) / 2**13)
    assert mcnemar_exact(5, 5) == 1.0  # capped
    assert mcnemar_exact(2, 7) == mcnemar_exact(7, 2)


def test_identical_runs_differ_by_nothing():
    base = _rows([True, False, True] * 4, [30.0, 40.0, 35.0] * 4)
    c = compare_paired(base, _rows([True, False, True] * 4, [30.0, 40.0, 35.0] * 4, "anderson"))
    assert (c.n, c.scenes, c.both_ok, c.base_only, c.other_only) == (12, 4, 8, 0, 0)
    assert c.mcnemar_p == 1.0
    assert c.success_diff == 0 and c.success_ci == (0.0, 0.0)
    assert c.bg_diff == 0 and c.bg_ci == (0.0, 0.0)
    assert (c.base, c.other, c.steps) == ("ddim", "anderson", 10)


def test_differences_are_other_minus_base_with_scene_resampled_intervals():
    base = _rows([True] * 12, [30.0] * 12)
    # One scene loses all three edits; every case keeps 2 dB more background, one case is identical (+inf).
    other = _rows([False] * 3 + [True] * 9, [32.0] * 11 + [math.inf], "bdia")
    c = compare_paired(base, other)
    assert (c.base_only, c.other_only, c.both_ok) == (3, 0, 9)
    assert c.success_diff == pytest.approx(-0.25)
    assert -1.0 <= c.success_ci[0] <= -0.25 <= c.success_ci[1] <= 0.0
    assert c.success_ci[0] < c.success_ci[1]  # whole scenes resampled: the lost scene may appear 0 to 4 times
    assert c.bg_diff == pytest.approx(2.0) and c.bg_ci == pytest.approx((2.0, 2.0))  # the +inf case is left out
    table = paired_table([c])
    assert "| bdia | ddim | 10 | 12 (4) | 9 | 3 | 0 | 0.25 | -25.0%" in table


def test_only_shared_cases_are_compared_and_none_shared_is_an_error(tmp_path):
    base = _rows([True] * 6, [30.0] * 6)
    assert compare_paired(base, _rows([False] * 3, [20.0] * 3)).n == 3
    other = [dict(r, steps=50) for r in base]
    with pytest.raises(ValueError, match="share no edit case"):
        compare_paired(base, other)
    (tmp_path / "edit_results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in base) + "\n")
    assert load_edit_rows(tmp_path) == base
