"""Exact-inversion edits beyond `make bench`'s two rows: NPI + word swap + local blend on the embedded
model's held-out scenes, for each inversion scheme at each step count and guidance asked for. The
20-step and w = 2 / 2.5 figures in docs/method.md ("Exact inversion" edits) come from

    python benchmarks/exact_edit_sweep.py --steps 20 --schemes ddim anderson fixed-point
    python benchmarks/exact_edit_sweep.py --steps 10 --guidances 2 2.5 --schemes anderson ddim

Rows go to OUT/s{steps}_{scheme} (`bench edit-shapes` results folders); a rerun keeps them.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from npinv import load_model
from npinv.bench.edit_shapes import run_edit_shapes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenes", type=int, default=8)
    parser.add_argument("--steps", type=int, nargs="+", default=[10])
    parser.add_argument("--schemes", nargs="+", default=["ddim", "anderson"])
    parser.add_argument("--guidances", type=float, nargs="+", default=None,
                        help="default: the model's recommended editing guidance")
    parser.add_argument("--out", default="runs/exact_edit_sweep")
    args = parser.parse_args()
    model = load_model(device="cpu")
    guidances = tuple(args.guidances or (model.edit_guidance,))
    for steps in args.steps:
        for scheme in args.schemes:
            summary = run_edit_shapes(model, Path(args.out) / f"s{steps}_{scheme}", n_scenes=args.scenes,
                                      methods=("npi",), directs=(False,), guidances=guidances, steps=steps,
                                      invert_scheme=scheme)
            for row in summary["rows"]:
                a = row["all"]
                print(f"{steps} steps, {scheme}, w {row['guidance']:g}: success {a['success']:.0%}, background "
                      f"{a['psnr_bg']:.2f} dB ({a['psnr_bg_ok']:.2f} on the successes), n {a['n']}", flush=True)


if __name__ == "__main__":
    main()
