"""Exact-inversion edits beyond `make bench`'s two rows: NPI + word swap + local blend on the embedded
model's held-out scenes, for each inversion scheme at each step count and guidance asked for. The
20-step and w = 2 / 2.5 figures in docs/method.md ("Exact inversion" edits) come from

    python benchmarks/exact_edit_sweep.py --steps 20 --schemes ddim anderson fixed-point
    python benchmarks/exact_edit_sweep.py --steps 10 --guidances 2 2.5 --schemes anderson ddim

and the self-attention windows (`--self-replace`) from

    python benchmarks/exact_edit_sweep.py --steps 50 --self-replace 0.2 0.4 --scenes 24

the 72-scene comparison from

    python benchmarks/exact_edit_sweep.py --steps 10 50 --schemes ddim anderson --scenes 72

and BDIA's damping factor (`--bdia-gamma`) from

    python benchmarks/exact_edit_sweep.py --steps 10 50 --schemes ddim bdia --bdia-gammas 1 0.9 0.8 --scenes 24

Rows go to OUT/s{steps}_{scheme} (`bench edit-shapes` results folders); a rerun keeps them.
"""

from __future__ import annotations

import argparse
import itertools
from pathlib import Path

from npinv import load_model
from npinv.bench.edit_shapes import inversion_label, run_edit_shapes
from npinv.bench.paired import compare_paired, load_edit_rows, paired_table
from npinv.schemes import get_scheme
from npinv.settings import DEFAULT_INVERT_TOL


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenes", type=int, default=8)
    parser.add_argument("--steps", type=int, nargs="+", default=[10])
    parser.add_argument("--schemes", nargs="+", default=["ddim", "anderson"])
    parser.add_argument("--guidances", type=float, nargs="+", default=None,
                        help="default: the model's recommended editing guidance")
    parser.add_argument("--self-replace", type=float, nargs="+", default=[0.6],
                        help="fractions of the steps with self-attention replaced (make bench: 0.6)")
    parser.add_argument("--bdia-gammas", type=float, nargs="+", default=[1.0],
                        help="BDIA's damping factors, for the scheme bdia (make bench: 1)")
    parser.add_argument("--invert-tols", type=float, nargs="+", default=[DEFAULT_INVERT_TOL],
                        help="fixed-point tolerances, for the schemes fixed-point and anderson (make bench: the default)")
    parser.add_argument("--out", default="runs/exact_edit_sweep")
    args = parser.parse_args()
    model = load_model(device="cpu")
    guidances = tuple(args.guidances or (model.edit_guidance,))
    # (scheme, gamma, tolerance, label): each BDIA damping factor and fixed-point tolerance is an inversion
    # of its own.
    inversions = [(s, g, tol, inversion_label(s, g, tol)) for s in args.schemes
                  for g in (args.bdia_gammas if s == "bdia" else [1.0])
                  for tol in (args.invert_tols if get_scheme(s).iterates else [DEFAULT_INVERT_TOL])]
    for steps, self_replace, (scheme, gamma, tol, label) in itertools.product(args.steps, args.self_replace,
                                                                              inversions):
        window = "" if self_replace == 0.6 else f"_self{self_replace:g}"
        summary = run_edit_shapes(model, Path(args.out) / f"s{steps}{window}_{label}", n_scenes=args.scenes,
                                  methods=("npi",), directs=(False,), guidances=guidances, steps=steps,
                                  invert_scheme=scheme, bdia_gamma=gamma, invert_tol=tol,
                                  self_replace=self_replace)
        for row in summary["rows"]:
            a = row["all"]
            print(f"{steps} steps, self-replace {self_replace:g}, {label}, w {row['guidance']:g}: success "
                  f"{a['success']:.0%}, background "
                  f"{a['psnr_bg']:.2f} dB ({a['psnr_bg_ok']:.2f} on the successes), n {a['n']}", flush=True)
    if "ddim" in args.schemes:  # each exact scheme case by case against plain inversion
        for steps, self_replace in itertools.product(args.steps, args.self_replace):
            window = "" if self_replace == 0.6 else f"_self{self_replace:g}"
            base = load_edit_rows(Path(args.out) / f"s{steps}{window}_ddim")
            print(f"\n{steps} steps, self-replace {self_replace:g}:\n" + paired_table(
                [compare_paired(base, load_edit_rows(Path(args.out) / f"s{steps}{window}_{label}"))
                 for *_, label in inversions if label != "ddim"]))


if __name__ == "__main__":
    main()
