"""Do the model's words attend to their object? Cross-attention localisation on held-out scenes.

Each scene is inverted with its caption and reconstructed with NPI while an attention controller
records the cross-attention maps at the layers local blend reads (:func:`npinv.attention.install.blend_downscale`).
The object's words (its colour and its shape) then give local blend's own mask
(:func:`npinv.attention.control.blend_mask`: summed over layers and steps, max-pooled, normalised by
the max, thresholded at 0.3), which is compared with the scene's true object mask (coverage > 0.5) at
image resolution: IoU per scene, and its mean. The background words' mask is compared with the rest.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from npinv.attention.align import find_word
from npinv.attention.control import EditController, blend_mask
from npinv.attention.install import attention_control, blend_downscale, edit_tokens
from npinv.methods import get_method
from npinv.model import Model
from npinv.sampling import Branch, sample
from npinv.scenes import Scene
from npinv.service import invert, prepare_picture
from npinv.settings import InvertSettings


def iou(a: torch.Tensor, b: torch.Tensor) -> float:
    union = (a | b).sum().item()
    return (a & b).sum().item() / union if union else 1.0


def attention_localisation(model: Model, scenes: Sequence[Scene], *, steps: int = 20, threshold: float = 0.3,
                           batch: int = 8) -> dict:
    """Mean and per-scene IoU of the object words' and the background words' blend masks with the truth."""
    settings = InvertSettings(steps=steps)
    npi = get_method("npi")
    tok = edit_tokens(model)
    res = model.resolution
    per_scene = []
    for start in range(0, len(scenes), batch):
        part = list(scenes[start : start + batch])
        sources = [prepare_picture(s.render(res), model, settings, name=f"scene{start + k}") for k, s in enumerate(part)]
        inverted = [r.inversion for r in invert(model, sources, [s.caption for s in part], settings)]
        hw = tuple(inverted[0].trajectory.shape[-2:])
        controller = EditController(steps, [], blend_downscale=blend_downscale(model, hw))
        branches = [Branch(inv.source, list(npi.negatives(inv, 1.0))) for inv in inverted]
        z = torch.cat([inv.noise for inv in inverted])
        with attention_control(model, controller):
            sample(model, z, inverted[0].schedule_for(model), branches, npi.guidance(1.0), controller=controller)
        for k, scene in enumerate(part):
            caption = scene.caption
            obj = find_word(tok, caption, scene.color) + find_word(tok, caption, scene.shape)
            bg = find_word(tok, caption, scene.background) + find_word(tok, caption, "background")
            truth = torch.from_numpy(scene.mask(res) > 0.5)
            masks = {}
            for name, tokens, want in (("object", obj, truth), ("background", bg, ~truth)):
                m = blend_mask(controller, k, tokens, hw, threshold).float().cpu()
                up = F.interpolate(m[None], size=(res, res), mode="nearest")[0, 0] > 0.5
                masks[name] = iou(up, want)
            per_scene.append({"caption": caption, "object_iou": masks["object"], "background_iou": masks["background"]})
    return {"n": len(per_scene), "steps": steps, "threshold": threshold,
            "maps": "x".join(map(str, controller.seen.get("blend_read", {(0, 0)}).pop())) if per_scene else None,
            "object_iou": statistics.mean(r["object_iou"] for r in per_scene),
            "background_iou": statistics.mean(r["background_iou"] for r in per_scene),
            "scenes": per_scene}
