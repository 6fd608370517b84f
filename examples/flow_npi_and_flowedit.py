"""NPI on a flow-matching transformer, against the flow baselines, on scenes whose true edits are known.

On the embedded flow model (an SD3-shaped MMDiT, ``--model shapes-flow``), for a few held-out scenes:
reconstruction from a plain Euler inversion and from an exact BDIA one (NPI at w 7.5 is the w 1 round trip
either way; BDIA brings it to the VAE's bound), then each scene's three edits (colour, shape, background)
with NPI + Prompt-to-Prompt word swap + local blend and with FlowEdit, scored as ``make bench`` scores
them: success (the edited picture reads as the target scene) and background PSNR (outside the edit)::

    .venv/bin/python examples/flow_npi_and_flowedit.py --scenes 4

The same calls run on SD3 / SD3.5 / FLUX.1 checkpoints (``--model``), where only the scoring is specific to
these synthetic scenes.
"""

from __future__ import annotations

import argparse
import statistics

import npinv
from npinv import service
from npinv.bench.edit_shapes import edit_cases, keep_region, region_psnr
from npinv.io import tensor_to_image
from npinv.metrics import tensor_to_unit
from npinv.scenes import read_scene
from npinv.settings import EditSettings, InvertSettings, ReconstructSettings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="shapes-flow")
    parser.add_argument("--scenes", type=int, default=4)
    parser.add_argument("--steps", type=int, default=50)
    args = parser.parse_args(argv)
    model = npinv.load_model(args.model)
    size = model.resolution
    cases = edit_cases(args.scenes)

    print("reconstruction (mean PSNR dB over the scenes; model calls: inversion + sampling)")
    for scheme in ("ddim", "bdia"):  # "ddim" is the Euler inversion on a flow model
        settings = InvertSettings(steps=args.steps, invert_scheme=scheme)
        psnrs, calls = [], 0
        for case in cases[::3]:  # one per scene
            source = service.prepare_picture(case.scene.render(size), model, settings, name="scene")
            rec = service.reconstruct_inverted(model, service.invert_one(model, source, case.scene.caption, settings),
                                               ReconstructSettings("npi", 7.5))
            psnrs.append(rec.psnr)
            calls = rec.cost.unet_calls
        print(f"  NPI w=7.5 on a {scheme} inversion: {statistics.mean(psnrs):.2f} dB, {calls} calls")

    # NPI + P2P at the model's declared guidance and self-replace window; FlowEdit at its paper's guidance.
    methods = {"npi + word swap + blend": lambda words: EditSettings(controller="replace", blend=words),
               "flowedit": lambda words: EditSettings(method="flowedit", controller="none")}
    settings = InvertSettings(steps=args.steps)
    print(f"edits ({len(cases)} cases: colour, shape and background swaps)")
    for name, make in methods.items():
        hits, background, calls = 0, [], []
        for case in cases:
            source = service.prepare_picture(case.scene.render(size), model, settings, name="scene")
            done = service.edit_image(model, source, case.scene.caption, [case.target.caption], make(case.words),
                                      settings)
            edited = tensor_to_unit(done.images[:1])
            hits += read_scene(tensor_to_image(done.images[:1])).matches(case.target)
            background.append(region_psnr(edited, tensor_to_unit(source.image), keep_region(case, size)))
            calls.append(done.cost.unet_calls)
        w = done.settings.guidance
        print(f"  {name:<24} w={w:<5g} success {hits}/{len(cases)}, background {statistics.mean(background):.2f} dB, "
              f"{statistics.mean(calls):.0f} calls an edit (inversion included)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
