"""Invert an image once, reconstruct it (NPI against null-text inversion and plain DDIM), then edit the
same inversion toward several targets: the library's calls behind ``npinv reconstruct`` and ``npinv edit``.

Runs on the embedded model with nothing to download::

    .venv/bin/python examples/invert_once_edit_many.py --out out-example

Any diffusers Stable Diffusion checkpoint works the same way (``--model`` takes a folder, a hub id or a
``.safetensors`` file), with your own picture, its prompt and targets that change a word or two::

    .venv/bin/python examples/invert_once_edit_many.py --model ./sd-v1-5 --image cat.jpg \
        --prompt "a cat sitting on a bench" --target "a dog sitting on a bench" --target "a fox sitting on a bench"
"""

from __future__ import annotations

import argparse
from pathlib import Path

import npinv
from npinv import service
from npinv.demo import bundled_examples
from npinv.io import image_grid, save_image, tensor_to_image
from npinv.settings import EditSettings, InvertSettings, ReconstructSettings


def changed_words(source: str, target: str) -> tuple[str, str] | None:
    """The one word a target swaps (local blend edits near it), or None when it changes more or fewer."""
    pairs = [(s, t) for s, t in zip(source.split(), target.split(), strict=False) if s != t]
    return pairs[0] if len(pairs) == 1 and len(source.split()) == len(target.split()) else None


def main(argv: list[str] | None = None) -> int:
    example = bundled_examples()[0]
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="model (default: the embedded one)")
    parser.add_argument("--image", default=example["path"])
    parser.add_argument("--prompt", default=example["prompt"], help="what the image shows")
    parser.add_argument("--target", action="append", help="an edit of the prompt (repeat for more)")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--out", default="out-example")
    args = parser.parse_args(argv)
    targets = args.target or example["edits"]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    model = npinv.load_model(args.model)
    settings = InvertSettings(steps=args.steps)
    source = service.prepare_file(args.image, model, settings)
    inverted = service.invert_one(model, source, args.prompt, settings)  # the one inversion everything reuses
    print(f"inverted {args.image} in {inverted.cost.seconds:.2f} s, {inverted.cost.unet_calls} UNet calls")

    print("method      PSNR dB  seconds  UNet calls (reconstruction only)")
    reconstructions = []
    for method, guidance in (("ddim", 7.5), ("nti", 7.5), ("npi", 7.5)):
        rec = service.reconstruct_inverted(model, inverted, ReconstructSettings(method, guidance))
        reconstructions.append(tensor_to_image(rec.reconstruction.image))
        cost = rec.reconstruction.cost
        print(f"{method:<6} w={guidance:<4g} {rec.psnr:6.2f}  {cost.seconds:7.2f}  {cost.unet_calls:10d}")

    edits = []
    for target in targets:
        # Word swap where the prompts align word for word, refine otherwise; the guidance and the
        # self-attention window are the model's recommended ones (its npinv.json), else 7.5 and 0.6.
        blend = changed_words(args.prompt, target)
        edit = EditSettings(controller="replace" if blend else "refine", blend=blend)
        done = service.edit(model, [(inverted, [target])], edit)[0]
        edits.append(tensor_to_image(done.images[:1]))
        print(f"{target!r}: {done.settings.controller}, w={done.settings.guidance:g}, "
              f"{done.edit_cost.seconds:.2f} s, {done.edit_cost.unet_rows} UNet rows")
    picture = tensor_to_image(source.image)
    scale = max(1, 256 // picture.width)
    save_image(image_grid([[picture, *reconstructions]], scale=scale), out / "reconstructions.png")
    save_image(image_grid([[picture, *edits]], scale=scale), out / "edits.png")
    inverted.inversion.save(out / "inversion.safetensors")  # `npinv edit --inversion` edits it again
    print(f"wrote {out / 'reconstructions.png'} (input | DDIM | NTI | NPI), {out / 'edits.png'}, "
          f"{out / 'inversion.safetensors'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
