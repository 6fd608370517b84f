"""Does warm-starting null-text inversion from the previous video frame help? (README, "Edit a video")

DDIM inversion is deterministic from each frame, so the only state a video edit could carry from one
frame to the next is NTI's optimised negatives. This script inverts a synthetic moving-circle video
with the embedded model and reconstructs every frame with NTI twice: cold (the optimisation starts
from the null embedding, as ``npinv edit --method nti`` does) and warm (each step starts from the
previous frame's optimised negative for that step). It prints PSNR against the frame and the number
of inner optimisation iterations (each one a UNet forward and backward pass), and the seconds of
each reconstruction (its :class:`npinv.cost.Cost`, decoding included).

    python benchmarks/video_warm_start.py --steps 50 --frames 4
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch

from npinv import load_model
from npinv.inversion import NullTextOptimisation
from npinv.methods import NullText, reconstruct
from npinv.metrics import image_metrics, tensor_to_unit
from npinv.model import PromptEmbedding
from npinv.sampling import StepState
from npinv.scenes import Scene
from npinv.service import invert_one, prepare_picture
from npinv.settings import InvertSettings

PROMPT = "a red circle on a blue background"


class WarmNullText(NullTextOptimisation):
    """NTI whose step ``i`` starts from a given embedding (the previous frame's ``N_i``)."""

    def __init__(self, *args, start: list[PromptEmbedding], **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.start = start

    def before_step(self, state: StepState) -> None:
        self.current = self.start[state.i]
        super().before_step(state)


class WarmStartNTI(NullText):
    """NTI as a method (not in the registry) whose optimisation starts from ``start``, step by step."""

    name = "nti-warm"
    summary = "null-text inversion warm-started from given negatives"

    def __init__(self, start: list[PromptEmbedding]) -> None:
        self.start = start

    def optimiser(self, model, inv, guidance, *, inner_steps: int = 10) -> WarmNullText:
        return WarmNullText(model, inv, guidance, inner_steps=inner_steps, start=self.start)


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
    settings = InvertSettings(steps=args.steps)
    previous: list[PromptEmbedding] | None = None
    rows: dict[str, list[dict]] = {"cold": [], "warm": []}
    for t, frame in enumerate(frames):
        source = prepare_picture(frame, model, settings, name=f"frame{t}")
        inv = invert_one(model, source, PROMPT, settings).inversion
        negatives = {}
        for mode in ("cold", "warm") if previous is not None else ("cold",):
            # Cold: the registry's NTI (from the null embedding); warm: from the previous frame's negatives.
            rec = reconstruct(model, inv, "nti" if mode == "cold" else WarmStartNTI(previous), args.guidance)
            psnr = image_metrics(tensor_to_unit(source.image), tensor_to_unit(rec.image))["psnr"]
            row = {"frame": t, "psnr": psnr, "iterations": sum(len(losses) for losses in rec.inversion.nti["losses"]),
                   "seconds": rec.cost.seconds}
            print(json.dumps({"mode": mode, **row}), flush=True)
            if t > 0:
                rows[mode].append(row)
            negatives[mode] = list(rec.inversion.negatives)
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
