"""The demo: invert a bundled example once, reconstruct it with DDIM, NTI and NPI, show a grid."""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

from npinv import service
from npinv.io import image_grid, save_image, tensor_to_image, write_text
from npinv.model import Model
from npinv.settings import EditSettings, InvertSettings, ReconstructSettings

DEMO_METHODS = (ReconstructSettings("ddim", 1.0), ReconstructSettings("ddim", 7.5), ReconstructSettings("nti", 7.5),
                ReconstructSettings("npi", 7.5))


def bundled_examples() -> list[dict]:
    """The example images that ship with npinv: path, source prompt and suggested edits."""
    folder = resources.files("npinv") / "examples"
    items = json.loads((folder / "examples.json").read_text())
    for item in items:
        item["path"] = str(folder / item["image"])
    return items


def run_demo(model: Model, out_dir: Path, *, steps: int = 50, example: int = 0, progress: bool = True) -> list[dict]:
    item = bundled_examples()[example]
    invert_settings = InvertSettings(steps=steps)
    source = service.prepare_file(item["path"], model, invert_settings)
    scores = list(service.reconstruct_each(model, source, item["prompt"], DEMO_METHODS, invert_settings,
                                           progress=progress))
    # The shared inversion, for the edits (DDIM's reconstruction hands it back unchanged).
    first = scores[0]
    inverted = first.inverted
    rows = [{"method": sc.method, "guidance": sc.guidance, "psnr": sc.psnr, "ssim": sc.ssim,
             "seconds": sc.cost.seconds, "unet_calls": sc.cost.unet_calls} for sc in scores]
    tiles = [tensor_to_image(source.image)] + [tensor_to_image(sc.reconstruction.image) for sc in scores]
    out_dir.mkdir(parents=True, exist_ok=True)
    grid = save_image(image_grid([tiles], scale=4), out_dir / "demo_reconstruction.png")
    write_text(out_dir / "demo_reconstruction.json", json.dumps({"example": item["image"], "prompt": item["prompt"],
                                                                 "steps": steps, "rows": rows}, indent=2))
    print(f"\n{item['image']}: \"{item['prompt']}\", {steps} DDIM steps, model {model.name}")
    print(f"{'method':<12}{'PSNR dB':>9}{'SSIM':>8}{'seconds':>9}{'UNet calls':>12}")
    for r in rows:
        label = f"{r['method']} w={r['guidance']:g}"
        print(f"{label:<12}{r['psnr']:>9.2f}{r['ssim']:>8.3f}{r['seconds']:>9.2f}{r['unet_calls']:>12}")
    print(f"grid (input | DDIM w=1 | DDIM w=7.5 | NTI | NPI): {grid}")
    rows.append(_demo_edit(model, inverted, item, out_dir, progress))
    return rows


def _demo_edit(model: Model, inverted: service.Inverted, item: dict, out_dir: Path, progress: bool) -> dict:
    """Edit the same inversion toward each suggested target with NPI, word swap and local blend."""
    targets = item["edits"]
    src_words = item["prompt"].split()
    # Blend on the words that change (one word per edit of the bundled examples).
    changed = [next(w for w, v in zip(src_words, t.split(), strict=True) if w != v) for t in targets]
    done = None
    tiles = [tensor_to_image(inverted.image)]
    for target, word in zip(targets, changed, strict=True):
        new_word = target.split()[src_words.index(word)]
        # Guidance: the model's declared editing guidance (for the embedded model, from its card's sweep).
        settings = EditSettings(method="npi", controller="replace", blend=(word, new_word), guidance=None)
        done = service.edit(model, [(inverted, [target])], settings, progress=progress)[0]
        tiles.append(tensor_to_image(done.images))
    grid = save_image(image_grid([tiles], scale=4), out_dir / "demo_edit.png")
    cost = done.edit_cost
    print(f"edits of the same inversion (NPI + word swap + local blend, w={done.settings.guidance:g}, "
          f"{cost.unet_rows} UNet rows each, {cost.seconds:.2f} s for the last): {', '.join(repr(t) for t in targets)}")
    print(f"grid (input | edits): {grid}")
    return {"method": "npi-edit", "targets": targets, "seconds": cost.seconds, "unet_calls": cost.unet_calls}
