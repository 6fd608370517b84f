"""Does warm-starting null-text inversion from the previous video frame help? (README, "Edit a video")

DDIM inversion is deterministic from each frame, so the only state a video edit could carry from one
frame to the next is NTI's optimised negatives. This script inverts a synthetic moving-circle video
with the embedded model and reconstructs every frame with NTI twice: cold (the optimisation starts
from the null embedding, as ``npinv edit --method nti`` does) and warm (each step starts from the
previous frame's optimised negative for that step). It prints PSNR against the frame and the number
of inner optimisation iterations (each one a UNet forward and backward pass).

    python benchmarks/video_warm_start.py --steps 50 --frames 4
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from npinv import load_model
from npinv.guidance import CFG
from npinv.inversion import NullTextOptimisation, ddim_inversion
from npinv.io import image_to_tensor
from npinv.metrics import image_metrics, tensor_to_unit
from npinv.model import PromptEmbedding
from npinv.sampling import Branch, StepState, sample
from npinv.scenes import Scene

PROMPT = "a red circle on a blue background"


class WarmNullText(NullTextOptimisation):
    """NTI whose step ``i`` starts from a given embedding (the previous frame's ``N_i``)."""

    def __init__(self, *args, start: list[PromptEmbedding], **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.start = start

    def before_step(self, state: StepState) -> None:
        self.current = self.start[state.i]
        super().before_step(state)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--frames", type=int, default=4)
    parser.add_argument("--guidance", type=float, default=7.5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    model = load_model(None, device="cpu")
    frames = [Scene("circle", "red", "blue", 0.4, cx=0.3 + 0.04 * t, cy=0.5 + 0.02 * t).render(model.resolution)
              for t in range(args.frames)]
    previous: list[PromptEmbedding] | None = None
    rows: dict[str, list[dict]] = {"cold": [], "warm": []}
    for t, frame in enumerate(frames):
        x = image_to_tensor(frame)
        inv = ddim_inversion(model, x, PROMPT, steps=args.steps)
        negatives = {}
        for mode in ("cold", "warm") if previous is not None else ("cold",):
            cfg = CFG(args.guidance)
            hook = (NullTextOptimisation(model, inv, cfg) if mode == "cold"
                    else WarmNullText(model, inv, cfg, start=previous))
            branch = Branch(inv.source, [inv.null] * args.steps)
            start = time.perf_counter()
            result = sample(model, inv.noise, inv.schedule_for(model), [branch], cfg, hooks=[hook])
            seconds = time.perf_counter() - start
            psnr = image_metrics(tensor_to_unit(x), tensor_to_unit(model.decode(result.latents)))["psnr"]
            row = {"frame": t, "psnr": psnr, "iterations": sum(len(losses) for losses in hook.losses),
                   "seconds": seconds}
            print(json.dumps({"mode": mode, **row}), flush=True)
            if t > 0:
                rows[mode].append(row)
            negatives[mode] = list(branch.negatives)
        # A video run would chain the warm start: frame t starts from frame t-1's own result.
        previous = negatives.get("warm", negatives["cold"])
    print("\nframes 1.. | mean PSNR dB | min PSNR dB | mean inner iterations | mean seconds")
    for mode, items in rows.items():
        if items:
            print(f"{mode:10} | {statistics.fmean(r['psnr'] for r in items):12.2f} | "
                  f"{min(r['psnr'] for r in items):11.2f} | {statistics.fmean(r['iterations'] for r in items):21.1f} | "
                  f"{statistics.fmean(r['seconds'] for r in items):12.2f}")


if __name__ == "__main__":
    main()
