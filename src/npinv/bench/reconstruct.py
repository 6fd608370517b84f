"""Reconstruction benchmark: methods x step counts over a folder of images or held-out scenes.

Methods: those of the registry (:mod:`npinv.methods`: ``ddim`` with the null negative, ``nti``,
``npi``, ... at w) and the benchmark's label ``ddim1`` (DDIM reconstructed at guidance 1). One DDIM
inversion per image and step count is shared by all methods (:func:`npinv.service.reconstruct_each`);
each method's ``seconds`` is that inversion plus its own reconstruction, measured side by side in
the same process, and ``unet_calls`` counts both (the results' :class:`~npinv.cost.Cost`).
A label may name how the image is inverted after ``@``: ``npi@fixed-point``, ``npi@anderson``
(:mod:`npinv.schemes`), ``npi@dec100`` (100 decoder-inversion steps first), ``npi@anderson+dec100``;
those rows share one inversion per image, step count and inversion tag. Every row also records the
image's VAE round trip ``decode(encode(x))`` (``vae_psnr``), the ceiling of plain encoding.
LPIPS (SqueezeNet, whole image) is scored when its weights are given (``lpips=`` or
``$NPINV_LPIPS_WEIGHTS``); otherwise it is null and one line says why.
"""

from __future__ import annotations

import json
import math
import re
import statistics
from pathlib import Path

import numpy as np

from npinv.bench.netmetrics import NetworkMetrics
from npinv.bench.results import claim_for_model, group, markdown_table, nanmean
from npinv.checks import short_repr
from npinv.errors import NpinvError
from npinv.io import IMAGE_SUFFIXES, atomic_path, write_text
from npinv.methods import check_scheme, get_method, method_names
from npinv.metrics import image_metrics, tensor_to_unit
from npinv.model import Model
from npinv.parallel import FolderLock, Shard, ShardedResults
from npinv.scenes import random_scenes
from npinv.schemes import get_scheme
from npinv.service import Source, prepare_file, prepare_picture, reconstruct_each
from npinv.settings import InvertSettings, ReconstructSettings

# The benchmark's own labels beside the registry's method names: DDIM's round trip at guidance 1.
PSEUDO_METHODS = {"ddim1": ReconstructSettings("ddim", 1.0)}
HELD_OUT_SEED = 515_151


def method_labels() -> tuple[str, ...]:
    """Every method label the benchmark takes: its pseudo-methods, then the registry's methods."""
    return (*PSEUDO_METHODS, *method_names())


def reconstruct_settings(label: str, guidance: float) -> ReconstructSettings:
    """What a benchmark label runs: a pseudo-method's fixed settings, else the method at ``guidance``
    (the part before ``@``). An unknown label is refused with one line naming the labels."""
    label, _, tag = label.partition("@") if isinstance(label, str) else (label, "", "")
    scheme = inversion_tag(tag).get("invert_scheme", "ddim")
    if isinstance(label, str) and label in PSEUDO_METHODS:
        return PSEUDO_METHODS[label]
    try:
        method = get_method(label)
    except NpinvError:
        raise NpinvError(f"unknown benchmark method {short_repr(label)}; choose from "
                         f"{', '.join(method_labels())} (optionally @SCHEME, @decN, @SCHEME+decN or @bdia+gGAMMA)") from None
    check_scheme(method, scheme)
    settings = ReconstructSettings(method.name, guidance)
    settings.validate()
    return settings


def inversion_tag(tag: str) -> dict:
    """``""`` (plain DDIM), ``SCHEME``, ``decN``, ``gGAMMA`` (BDIA's damping factor) or several joined
    by ``+`` (``bdia+g0.9+dec100``) -> InvertSettings fields."""
    out: dict = {}
    for part in filter(None, tag.split("+")):
        if part.startswith("dec") and part[3:].isdigit():
            out["decoder_steps"] = int(part[3:])
        elif re.fullmatch(r"g(0?\.\d+|1(\.0*)?)", part):
            out["bdia_gamma"] = float(part[1:])
        else:
            out["invert_scheme"] = get_scheme(part).name
    return out


# The labels, for front ends that list or check them (``npinv bench reconstruct --methods``).
def image_items(model: Model, images: str | None, shapes: int | None) -> list[tuple[str, object, str]]:
    """(name, loader, prompt) for each benchmark image; the loader returns the prepared :class:`Source`."""
    if images is None:
        if shapes is not None and (isinstance(shapes, bool) or shapes < 1):
            raise NpinvError(f"--shapes must be at least 1, got {shapes}")
        scenes = list(random_scenes(HELD_OUT_SEED, 8 if shapes is None else shapes))
        return [(f"scene{i:03d}", (lambda i=i, s=s: _scene_source(model, s, f"scene{i:03d}")), s.caption)
                for i, s in enumerate(scenes)]
    folder = Path(images)
    if not folder.is_dir():
        raise NpinvError(f"--images {folder} is not a folder")
    mapping = json.loads((folder / "prompts.json").read_text()) if (folder / "prompts.json").is_file() else {}
    items = []
    for path in sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES):
        sidecar = path.with_suffix(".txt")
        prompt = mapping.get(path.name) or (sidecar.read_text().strip() if sidecar.is_file() else None)
        if not prompt:
            raise NpinvError(f"no prompt for {path.name}: add {sidecar.name} or an entry in prompts.json")
        items.append((path.name, (lambda p=path: prepare_file(p, model, InvertSettings())), prompt))
    if not items:
        raise NpinvError(f"no images in {folder}")
    return items


def _scene_source(model: Model, scene, name: str) -> Source:
    """A held-out scene rendered at the model's side (prepared as is: no crop, no resize)."""
    return prepare_picture(scene.render(model.resolution), model, InvertSettings(), name=name)


def run_reconstruct_bench(model: Model, out_dir: str | Path, *, images: str | None = None, shapes: int | None = None,
                          methods=("ddim1", "ddim", "nti", "npi"), steps_list=(10, 20, 50, 100), guidance: float = 7.5,
                          offset: int | None = None, lpips=None, allow_pickle: bool = False,
                          progress: bool = False, shard: Shard | None = None) -> dict:
    chosen = {m: reconstruct_settings(m, guidance) for m in methods}  # refuses unknown labels, before any work
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with FolderLock(out, shard, what="npinv bench reconstruct"):  # one run at a time in a results folder
        claim_for_model(out, model)
        results = ShardedResults(out, shard)  # under accelerate: every N-th image, merged at the end
        items = image_items(model, images, shapes)
        nets = NetworkMetrics.load(structure=False, lpips=lpips, clip=False, device=model.device, allow_pickle=allow_pickle)
        if nets.lpips is None and lpips is not False:
            print(f"LPIPS not computed (null in the results): {nets.missing['lpips']}", flush=True)
        for n, (name, load, prompt) in enumerate(items):
            if not results.shard.owns(n):
                continue
            vae_psnr = None
            for steps in steps_list:
                todo = [m for m in methods if _key(name, m, steps, guidance) not in results]
                if not todo:
                    continue
                source = load()
                if vae_psnr is None:
                    vae_psnr = image_metrics(tensor_to_unit(source.image),
                                             tensor_to_unit(model.decode(model.encode_image(source.image))))["psnr"]
                # One inversion per tag, shared by its methods; each method's row is kept as soon as it is
                # scored: a killed run loses only the one in progress.
                tags = {m: m.partition("@")[2] for m in todo}
                for tag in dict.fromkeys(tags.values()):
                    labels = [m for m in todo if tags[m] == tag]
                    scores = reconstruct_each(model, source, prompt, [chosen[m] for m in labels],
                                              InvertSettings(steps=steps, offset=offset, **inversion_tag(tag)))
                    for m, sc in zip(labels, scores, strict=True):
                        lpips_value = None
                        if nets.lpips is not None:
                            a, b = tensor_to_unit(source.image), tensor_to_unit(sc.reconstruction.image)
                            lpips_value = nets.lpips_distance(a, b, np.zeros(a.shape[:2], dtype=bool))
                        report = sc.inverted.inversion.scheme_report()
                        # seconds and unet_calls: the shared inversion plus this method's reconstruction.
                        results.add({"key": _key(name, m, steps, guidance), "image": name, "prompt": prompt, "method": m,
                                     "steps": steps, "guidance": sc.guidance, "offset": sc.offset,
                                     "psnr": sc.psnr, "ssim": sc.ssim, "mse": sc.mse, "lpips": lpips_value,
                                     "seconds": sc.cost.seconds, "invert_seconds": sc.invert_cost.seconds,
                                     "unet_calls": sc.cost.unet_calls, "model": model.name, "vae_psnr": vae_psnr,
                                     "invert_residual": report["invert_residual"],
                                     "invert_extra_calls": report["invert_extra_calls"]})
                if progress:
                    print(f"{name} {steps} steps done", flush=True)
        summary = summarize(results.merge(), methods, steps_list)
        write_text(out / "summary.json", json.dumps(summary, indent=2, default=float))
        write_text(out / "table.md", reconstruct_table(summary))
        plot(summary, out)
        return summary


def _key(name: str, method: str, steps: int, guidance: float) -> str:
    return f"{name}|{method}|{steps}|{guidance:g}"


def summarize(rows: list[dict], methods, steps_list) -> dict:
    out = []
    grouped = group(rows, ("method", "steps"))
    for steps in steps_list:
        for m in methods:
            items = grouped.get((m, steps), [])
            if not items:
                continue
            out.append({"method": m, "steps": steps, "guidance": items[0]["guidance"], "n": len(items),
                        "psnr_mean": nanmean(r["psnr"] for r in items), "ssim_mean": nanmean(r["ssim"] for r in items),
                        "mse_mean": nanmean(r["mse"] for r in items),
                        "lpips_mean": nanmean(r.get("lpips") for r in items),
                        "seconds_mean": nanmean(r["seconds"] for r in items),
                        "seconds_median": statistics.median(r["seconds"] for r in items),
                        "unet_calls_mean": nanmean(r["unet_calls"] for r in items),
                        # Against each image's VAE round trip: the mean gap and the worst image's.
                        "vae_psnr_mean": nanmean(r.get("vae_psnr") for r in items),
                        "worst_vae_gap": max((r["vae_psnr"] - r["psnr"] for r in items if r.get("vae_psnr") is not None),
                                             default=math.nan),
                        "residual_mean": nanmean(r.get("invert_residual") for r in items)})
    ratio = {}
    by = {(r["method"], r["steps"]): r for r in out}
    for steps in steps_list:
        if ("nti", steps) in by and ("npi", steps) in by:
            ratio[str(steps)] = by[("nti", steps)]["seconds_median"] / by[("npi", steps)]["seconds_median"]
    return {"rows": out, "nti_over_npi_time": ratio}


def reconstruct_table(summary: dict) -> str:
    header = ["method", "steps", "w", "n", "PSNR", "SSIM", "MSE", "LPIPS", "seconds (median)", "UNet calls",
              "VAE - PSNR (worst image)", "fixed-point residual (mean)"]
    rows = [[r["method"], r["steps"], r["guidance"], r["n"], r["psnr_mean"], r["ssim_mean"], r["mse_mean"],
             r.get("lpips_mean", math.nan), r["seconds_median"], r["unet_calls_mean"],
             r.get("worst_vae_gap", math.nan), r.get("residual_mean", math.nan)] for r in summary["rows"]]
    text = markdown_table(header, rows)
    if summary["nti_over_npi_time"]:
        text += "\nNTI / NPI time (medians, same run): " + ", ".join(
            f"{s} steps: {v:.1f}x" for s, v in summary["nti_over_npi_time"].items()) + "\n"
    return text


def plot(summary: dict, out: Path) -> list[Path]:
    """PSNR vs steps and PSNR vs seconds per method (skipped when matplotlib is absent)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    written = []
    methods = list(dict.fromkeys(r["method"] for r in summary["rows"]))
    for x_key, name, label in (("steps", "psnr_vs_steps.png", "DDIM steps"),
                               ("seconds_median", "psnr_vs_seconds.png", "seconds per image (median)")):
        fig, ax = plt.subplots(figsize=(5, 3.5), dpi=120)
        for m in methods:
            rows = [r for r in summary["rows"] if r["method"] == m]
            ax.plot([r[x_key] for r in rows], [r["psnr_mean"] for r in rows], marker="o", label=m)
        ax.set_xlabel(label)
        ax.set_ylabel("PSNR (dB)")
        if x_key != "steps":
            ax.set_xscale("log")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        path = out / name
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png")
        plt.close(fig)
        written.append(path)
    return written
