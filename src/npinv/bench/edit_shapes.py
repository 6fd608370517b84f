"""Ground-truth editing benchmark on the scene generator's pictures.

Each held-out scene gets a colour, a shape and a background swap whose true result is rendered
from the edited scene. Per method / controller / direct-inversion setting it reports:
- ``psnr_gt``, ``ssim_gt``: the edit against the true edited picture (whole image);
- ``psnr_bg``: the edit against the source on the region the edit must not touch (for colour and
  shape swaps: pixels at least 2 px away from the object before and after; for background swaps:
  pixels at least 2 px inside the object), PSNR of the mean squared error over those pixels;
- ``success``: the scene reader sees exactly the edited scene's colour, shape and background;
- ``blend_iou``: with local blend, the IoU of its last mask (upsampled to the image) with the region
  the edit is meant to change (:func:`edited_region`); ``blend_maps``: the size of the maps it read;
- ``word_iou``: with local blend, how well the source's object words attend to their object: local
  blend's mask rule applied to the source branch's maps of the object's colour and shape words, against
  the true object mask (see :mod:`npinv.bench.localisation`);
- ``seconds`` (edit, inversion excluded), ``invert_seconds`` and exact UNet calls and rows.

Each scene is inverted once and every edit of it goes through :func:`npinv.service.edit` with one
:class:`~npinv.cache.InversionCache` for the scene, so NTI optimises once per scene and guidance.
Costs come from the results (:class:`~npinv.cost.Cost`): a row's ``seconds``, ``unet_calls`` and
``unet_rows`` are the edit alone (NTI's optimisation excluded); ``invert_seconds`` is the scene's
inversion plus, for a method that prepares its negatives (NTI), that preparation at the row's guidance.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from npinv.attention.align import find_word
from npinv.attention.control import blend_mask
from npinv.attention.install import edit_tokens
from npinv.bench.results import claim_for_model, group, markdown_table, nanmean
from npinv.cache import InversionCache
from npinv.cost import Cost
from npinv.io import image_grid, image_to_tensor, save_image, tensor_to_image, write_text
from npinv.methods import get_method
from npinv.metrics import ssim, tensor_to_unit
from npinv.model import Model
from npinv.parallel import FolderLock, Shard, ShardedResults
from npinv.scenes import Edit, Scene, random_edit, random_scenes, read_scene
from npinv.schemes import get_scheme
from npinv.service import edit, invert_one, prepare_picture
from npinv.settings import DEFAULT_INVERT_TOL, EditSettings, InvertSettings

HELD_OUT_SEED = 424_242
KINDS = ("color", "shape", "background")


@dataclasses.dataclass(frozen=True)
class EditCase:
    index: int
    scene: Scene
    edit: Edit

    @property
    def target(self) -> Scene:
        return self.scene.edited(self.edit)

    @property
    def words(self) -> tuple[str, str]:
        return self.edit.words(self.scene)


def inversion_label(scheme: str, bdia_gamma: float = 1.0, invert_tol: float = DEFAULT_INVERT_TOL) -> str:
    """How rows, keys and results folders name an inversion: the scheme, ``bdia-g0.9`` for BDIA with a
    damping factor below 1, ``anderson-tol0.01`` for an iterating scheme's tolerance other than the default."""
    label = f"{scheme}-g{bdia_gamma:g}" if scheme == "bdia" and bdia_gamma != 1.0 else scheme
    if invert_tol != DEFAULT_INVERT_TOL and get_scheme(scheme).iterates:
        label += f"-tol{invert_tol:g}"
    return label


def edit_cases(n_scenes: int, seed: int = HELD_OUT_SEED) -> list[EditCase]:
    rng = np.random.default_rng(seed)
    out = []
    for i, scene in enumerate(random_scenes(seed, n_scenes)):
        out += [EditCase(i, scene, random_edit(scene, rng, kind)) for kind in KINDS]
    return out


def keep_region(case: EditCase, resolution: int, margin: int = 2) -> np.ndarray:
    """Boolean (H, W) mask of the pixels the edit must leave as they were."""
    before = torch.from_numpy(case.scene.mask(resolution))[None, None]
    after = torch.from_numpy(case.target.mask(resolution))[None, None]
    size = 2 * margin + 1
    if case.edit.kind == "background":
        inside = torch.minimum(before, after)
        eroded = -F.max_pool2d(-inside, size, stride=1, padding=margin)
        return (eroded[0, 0] > 0.99).numpy()
    touched = F.max_pool2d(torch.maximum(before, after), size, stride=1, padding=margin)
    return (touched[0, 0] < 0.01).numpy()


def edited_region(case: EditCase, resolution: int) -> np.ndarray:
    """Boolean (H, W) mask of the pixels the edit is meant to change: the object before and after a
    colour or shape swap, everything but the object for a background swap."""
    before, after = case.scene.mask(resolution) > 0.5, case.target.mask(resolution) > 0.5
    return ~(before & after) if case.edit.kind == "background" else before | after


def mask_iou(mask: torch.Tensor, region: np.ndarray) -> float:
    """IoU of a local-blend mask (h, w) at latent resolution, upsampled to the region's size, with the region."""
    up = F.interpolate(mask.float()[None, None], size=region.shape, mode="nearest")[0, 0].numpy() > 0.5
    union = (up | region).sum()
    return float((up & region).sum() / union) if union else math.nan


def region_psnr(a: np.ndarray, b: np.ndarray, region: np.ndarray) -> float:
    if not region.any():
        return math.nan
    err = float(((a - b) ** 2)[region].mean())
    return math.inf if err == 0 else 10 * math.log10(1.0 / err)


def run_edit_shapes(model: Model, out_dir: str | Path, *, n_scenes: int = 10, methods=("npi", "proxnpi", "nti", "ddim"),
                    directs=(False, True), controllers=("replace",), guidances=(7.5,), steps: int = 50,
                    blend: bool = True, cross_replace: float = 0.8, self_replace: float = 0.6,
                    blend_sizes: tuple[int | None, ...] = (None,), progress: bool = False, grid_cases: int = 6,
                    invert_scheme: str = "ddim", bdia_gamma: float = 1.0, invert_tol: float = DEFAULT_INVERT_TOL,
                    shard: Shard | None = None) -> dict:
    """``blend_sizes``: the local-blend map sizes to compare (None: npinv's rule, see ``blend_downscale``);
    ``invert_scheme``: how each scene is inverted (:mod:`npinv.schemes`), ``bdia_gamma`` BDIA's damping
    factor and ``invert_tol`` a fixed-point tolerance (rows name such inversions by ``inversion_label``)."""
    methods = tuple(get_method(m).name for m in methods)  # unknown names refused before any work
    invert_settings = InvertSettings(steps=steps, invert_scheme=invert_scheme, bdia_gamma=bdia_gamma,
                                     invert_tol=invert_tol)
    invert_settings.validate()
    label = inversion_label(invert_scheme, bdia_gamma, invert_tol)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with FolderLock(out, shard, what="npinv bench edit-shapes"):  # one run at a time in a results folder
        claim_for_model(out, model)
        results = ShardedResults(out, shard, name="edit_results")  # under accelerate: every N-th scene
        res = model.resolution
        cases = edit_cases(n_scenes)
        sizes = blend_sizes if blend else (None,)
        settings_list = list(itertools.product(methods, directs, controllers, guidances, sizes))
        grid_rows: dict[tuple, list] = {}
        by_scene = group([dataclasses.asdict(c) | {"case": c} for c in cases], ("index",))
        for n, ((index,), items) in enumerate(by_scene.items()):
            if not results.shard.owns(n):
                continue
            scene_cases = [it["case"] for it in items]
            scene = scene_cases[0].scene
            todo = [(c, s) for c in scene_cases for s in settings_list
                    if _key(c, s, steps, label) not in results]
            if not todo:
                continue
            picture = prepare_picture(scene.render(res), model, invert_settings, name=f"scene{index:03d}")
            image = picture.image
            # The scene's inversion and each method's prepared variant of it (NTI's negatives at each
            # guidance), kept for the whole scene: room for all of them, so that nothing is evicted.
            cache = InversionCache(max_entries=2 + len(methods) * len(guidances), max_bytes=2**62)
            inverted = invert_one(model, picture, scene.caption, invert_settings, cache=cache,
                                  encode_only=not any(get_method(m).needs_inversion for m in methods))
            prepared: dict[tuple[str, float], Cost] = {}  # what preparing each method's negatives cost (NTI)
            for case, (method, direct, controller, w, blend_res) in todo:
                src_word, tgt_word = case.words
                settings = EditSettings(method=method, controller=controller, guidance=w, cross_replace=cross_replace,
                                        self_replace=self_replace, blend=(src_word, tgt_word) if blend else None,
                                        direct=direct, blend_res=blend_res)
                done = edit(model, [(inverted, [case.target.caption])], settings, cache=cache)[0]
                result = done.result
                if done.prepare_cost != Cost():  # this edit prepared the method's negatives (NTI's first at w)
                    prepared[(method, w)] = done.prepare_cost
                edit_cost = done.edit_cost - done.prepare_cost  # the edit alone
                invert_cost = inverted.cost + prepared.get((method, w), Cost())
                edited = tensor_to_unit(result.images[:1])
                truth = tensor_to_unit(image_to_tensor(case.target.render(res)))
                source = tensor_to_unit(image)
                gt_err = float(((edited - truth) ** 2).mean())
                row = {
                    "key": _key(case, (method, direct, controller, w, blend_res), steps, label), "scene": index,
                    "inversion": label, "invert_unet_calls": inverted.cost.unet_calls,
                    "kind": case.edit.kind, "source": case.scene.caption, "target": case.target.caption, "method": method,
                    "direct": direct, "controller": controller, "guidance": w, "steps": steps, "blend": blend,
                    "blend_res": blend_res, "blend_maps": _blend_maps(result), "blend_iou": (
                        math.nan if result.blend_mask is None else mask_iou(result.blend_mask[0, 0], edited_region(case, res))),
                    "word_iou": _word_iou(model, result, case.scene),
                    "psnr_gt": 10 * math.log10(1.0 / gt_err) if gt_err > 0 else math.inf,
                    "ssim_gt": ssim(edited, truth), "psnr_bg": region_psnr(edited, source, keep_region(case, res)),
                    "success": bool(read_scene(tensor_to_image(result.images[:1])).matches(case.target)),
                    "seconds": edit_cost.seconds, "invert_seconds": invert_cost.seconds,
                    "unet_calls": edit_cost.unet_calls, "unet_rows": edit_cost.unet_rows,
                }
                results.add(row)
                if case.index * 3 + KINDS.index(case.edit.kind) < grid_cases:
                    grid_rows.setdefault((method, direct, controller, w, blend_res), []).append(
                        [tensor_to_image(image), tensor_to_image(result.images[:1]),
                         case.target.render(res)])
        summary = summarize(results.merge())
        write_text(out / "edit_summary.json", __import__("json").dumps(summary, indent=2, default=float))
        write_text(out / "edit_table.md", edit_table(summary))
        for (method, direct, controller, w, blend_res), rows in grid_rows.items():
            size = "" if blend_res is None else f"_blend{blend_res}"
            name = f"edits_{method}{'_direct' if direct else ''}_{controller}_w{w:g}{size}.png"
            save_image(image_grid(rows, scale=2), out / name)
        return summary


def _key(case: EditCase, setting: tuple, steps: int, invert_scheme: str = "ddim") -> str:
    method, direct, controller, w, blend_res = setting
    size = "" if blend_res is None else f"|blend{blend_res}"
    scheme = "" if invert_scheme == "ddim" else f"|{invert_scheme}"
    return (f"{case.index}|{case.edit.kind}|{case.edit.value}|{method}|{int(direct)}|{controller}|{w:g}|{steps}{size}"
            f"{scheme}")


def _word_iou(model: Model, result, scene: Scene) -> float:
    """IoU of the source's object words' blend mask with the scene's true object mask (nan without blend)."""
    controller = result.controller
    if controller is None or result.first_branch not in controller.blend_sum:
        return math.nan
    tok, caption = edit_tokens(model), scene.caption  # the rows the blend mask reads (SD3: CLIP and T5)
    tokens = find_word(tok, caption, scene.color) + find_word(tok, caption, scene.shape)
    hw = tuple(result.latents.shape[-2:])
    mask = blend_mask(controller, result.first_branch, tokens, hw).cpu()
    return mask_iou(mask[0], scene.mask(model.resolution) > 0.5)


def _blend_maps(result) -> str | None:
    seen = result.controller.seen.get("blend_read") if result.controller is not None else None
    return ",".join(f"{h}x{w}" for h, w in sorted(seen)) if seen else None


def summarize(rows: list[dict]) -> dict:
    out = []
    for (method, scheme, direct, controller, w, steps, maps), items in sorted(
            group([{"blend_maps": None, "inversion": "ddim", **r} for r in rows],
                  ("method", "inversion", "direct", "controller", "guidance", "steps", "blend_maps")).items(), key=str):
        entry = {"method": method, "inversion": scheme, "direct": direct, "controller": controller, "guidance": w,
                 "steps": steps, "blend_maps": maps, "n": len(items)}
        for kind in ("all", *KINDS):
            sel = items if kind == "all" else [r for r in items if r["kind"] == kind]
            entry[kind] = {
                "n": len(sel), "psnr_gt": nanmean(r["psnr_gt"] for r in sel),
                "ssim_gt": nanmean(r["ssim_gt"] for r in sel), "psnr_bg": nanmean(r["psnr_bg"] for r in sel),
                # A failed edit that changes nothing keeps the whole background: judge the kept region on
                # the edits that succeeded too.
                "psnr_bg_ok": nanmean(r["psnr_bg"] for r in sel if r["success"]),
                "success": nanmean(float(r["success"]) for r in sel),
                "blend_iou": nanmean(r.get("blend_iou", math.nan) for r in sel),
                "word_iou": nanmean(r.get("word_iou", math.nan) for r in sel),
            }
        entry["seconds_median"] = float(np.median([r["seconds"] for r in items]))
        entry["unet_calls_mean"] = nanmean(r["unet_calls"] for r in items)
        entry["unet_rows_mean"] = nanmean(r["unet_rows"] for r in items)
        entry["invert_unet_calls_mean"] = nanmean(r.get("invert_unet_calls") for r in items)
        out.append(entry)
    return {"rows": out}


def edit_table(summary: dict) -> str:
    header = ["method", "inversion", "direct", "controller", "w", "steps", "n", "PSNR vs truth", "SSIM vs truth",
              "bg PSNR", "bg PSNR (successes)", "success", "colour swaps ok", "shape swaps ok", "bg swaps ok",
              "blend maps", "blend IoU", "word IoU", "edit s (median)", "UNet rows"]
    rows = [[r["method"], r.get("inversion", "ddim"), "yes" if r["direct"] else "no", r["controller"], r["guidance"],
             r["steps"], r["n"],
             r["all"]["psnr_gt"], r["all"]["ssim_gt"], r["all"]["psnr_bg"], r["all"].get("psnr_bg_ok", math.nan),
             f"{r['all']['success']:.0%}",
             f"{r['color']['success']:.0%}", f"{r['shape']['success']:.0%}", f"{r['background']['success']:.0%}",
             r.get("blend_maps") or "none", r["all"].get("blend_iou", math.nan), r["all"].get("word_iou", math.nan),
             r["seconds_median"], r["unet_rows_mean"]] for r in summary["rows"]]
    return markdown_table(header, rows)
