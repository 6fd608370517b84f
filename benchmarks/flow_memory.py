"""Peak memory of an NPI reconstruction on the tiny flow layouts (issue 28, item 6), one process per layout.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/flow_memory.py [--size 32] [--steps 10]

For each tiny layout (tests/tiny_flow.py: SD3, SD3.5, FLUX.1-dev) it prints the weights' bytes and the
process's peak resident memory during a fixed-point NPI reconstruction above its resident memory after
the load (Linux: the peak is reset through /proc/self/clear_refs before the run). The tiny networks'
weights are a few MB, so the figure is the run's own working memory (activations, the trajectory,
the VAE at that size) plus allocator slack; docs/flow_models.md scales it to the real models.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _status(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def measure(folder: str, size: int, steps: int) -> dict:
    import npinv
    from npinv.scenes import Scene
    from npinv.service import invert_one, prepare_picture, reconstruct_inverted
    from npinv.settings import InvertSettings, ReconstructSettings

    model = npinv.load_model(folder, device="cpu")
    weights = sum(p.numel() * p.element_size() for net in model._networks() for p in net.parameters())
    settings = InvertSettings(steps=steps, size=size, invert_scheme="fixed-point")
    source = prepare_picture(Scene("circle", "red", "blue", 0.5).render(size), model, settings)
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak (VmHWM) to the current RSS
    before = _status("VmRSS")
    inverted = invert_one(model, source, "a red circle on a blue background", settings)
    rec = reconstruct_inverted(model, inverted, ReconstructSettings(method="npi", guidance=7.5))
    return {"layout": Path(folder).name, "size": size, "steps": steps, "weights_bytes": weights,
            "peak_above_load_bytes": _status("VmHWM") - before, "unet_calls": rec.cost.unet_calls}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)  # a child process: measure this folder
    args = p.parse_args()
    if args.one:
        print(json.dumps(measure(args.one, args.size, args.steps)))
        return
    sys.path.insert(0, str(ROOT / "tests"))
    from tiny_flow import build_flux, build_sd3

    with tempfile.TemporaryDirectory() as tmp:
        folders = [build_sd3(Path(tmp) / "sd3"), build_sd3(Path(tmp) / "sd35", sd35=True),
                   build_flux(Path(tmp) / "flux-dev")]
        for folder in folders:
            out = subprocess.run([sys.executable, __file__, "--one", str(folder), "--size", str(args.size),
                                  "--steps", str(args.steps)], capture_output=True, text=True, check=True)
            print(out.stdout.strip().splitlines()[-1], flush=True)


if __name__ == "__main__":
    main()
