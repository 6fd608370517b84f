"""Does the embedded model's VAE decode a latent composite locally? Local blend mixes latents, so a
background swap keeps the object only if the object's latents decode to the object whatever lies
around them. For each held-out background swap (the edit-shapes cases), this composites the target
scene's latents outside the object with the source scene's inside it (the object is the same in both),
decodes, and scores the object against the truth; no diffusion, a perfect mask.

    python benchmarks/vae_composite.py --scenes 24
"""

from __future__ import annotations

import argparse
import statistics

import torch

from npinv import load_model
from npinv.bench.edit_shapes import edit_cases, keep_region, region_psnr
from npinv.io import image_to_tensor, tensor_to_image
from npinv.metrics import tensor_to_unit
from npinv.scenes import read_scene


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenes", type=int, default=24)
    args = parser.parse_args()
    model = load_model(device="cpu")
    res = model.resolution
    composite_psnr, own_psnr, read_right = [], [], []
    for case in edit_cases(args.scenes):
        if case.edit.kind != "background":
            continue
        source, target = image_to_tensor(case.scene.render(res)), image_to_tensor(case.target.render(res))
        with torch.no_grad():
            z_source, z_target = model.encode_image(source), model.encode_image(target)
            inside = torch.from_numpy(case.scene.mask(z_source.shape[-1]) > 0.5).to(z_source)[None, None]
            composite = model.decode(z_target * (1 - inside) + z_source * inside)
            own = model.decode(z_target)
        truth, keep = tensor_to_unit(target), keep_region(case, res)
        composite_psnr.append(region_psnr(tensor_to_unit(composite), truth, keep))
        own_psnr.append(region_psnr(tensor_to_unit(own), truth, keep))
        read_right.append(read_scene(tensor_to_image(composite)).matches(case.target))
        print(f"{case.scene.caption} -> {case.target.background}: object {composite_psnr[-1]:.1f} dB from the "
              f"composite, {own_psnr[-1]:.1f} dB from the target's own latents; read right: {read_right[-1]}")
    print(f"\n{len(read_right)} background swaps: object PSNR {statistics.mean(composite_psnr):.1f} dB from composites "
          f"(lowest {min(composite_psnr):.1f}), {statistics.mean(own_psnr):.1f} dB from the targets' own latents; "
          f"composites read right {sum(read_right)}/{len(read_right)}")


if __name__ == "__main__":
    main()
