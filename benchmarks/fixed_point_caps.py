"""Fixed-point inversion against its iteration cap: mean NPI reconstruction PSNR and inversion UNet calls
on the embedded model's held-out scenes (the same 8 as `make bench`), with each step's residual.

    python benchmarks/fixed_point_caps.py --steps 10 --runs fixed-point:10,30,60 anderson:10,30
"""

from __future__ import annotations

import argparse
import statistics

from npinv import load_model, service
from npinv.bench.reconstruct import image_items
from npinv.settings import InvertSettings, ReconstructSettings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--scenes", type=int, default=8)
    parser.add_argument("--tol", type=float, default=1e-3)
    parser.add_argument("--runs", nargs="+", default=["fixed-point:10,30,60", "anderson:10,30"],
                        help="SCHEME:CAP,CAP,...")
    args = parser.parse_args()
    model = load_model(device="cpu")
    sources = [(load(), prompt) for _, load, prompt in image_items(model, None, args.scenes)]
    for run in args.runs:
        scheme, _, caps = run.partition(":")
        for cap in (int(c) for c in caps.split(",")):
            settings = InvertSettings(steps=args.steps, invert_scheme=scheme, invert_iters=cap, invert_tol=args.tol)
            psnrs, calls, worst_step = [], [], []
            for source, prompt in sources:
                inverted = service.invert_one(model, source, prompt, settings)
                psnrs.append(service.reconstruct_inverted(model, inverted, ReconstructSettings("npi", 7.5)).psnr)
                calls.append(inverted.cost.unet_calls)
                residuals = [r or 0.0 for r in inverted.inversion.scheme["residuals"]]
                worst_step.append((max(residuals), residuals.index(max(residuals))))
            print(f"{scheme} cap {cap}: PSNR {statistics.mean(psnrs):.3f} dB, inversion UNet calls "
                  f"{statistics.mean(calls):.1f}, worst step residual {max(worst_step)[0]:.4f} "
                  f"(step {max(worst_step)[1]})", flush=True)


if __name__ == "__main__":
    main()
