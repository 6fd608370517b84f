"""Batch throughput: images edited per minute by ``edit-batch`` at several ``--batch-size``.

Held-out scenes, one colour swap each, are written as PNGs and a manifest; each batch size runs
the whole manifest from scratch in its own folder (inversion and editing, files written), in the
same process, one after another, and the edits of every batch size are checked to agree. Seconds and
UNet calls are edit-batch's own report of the run (:class:`npinv.batch.BatchReport`).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from npinv.batch import read_manifest, run_batch
from npinv.bench.edit_shapes import HELD_OUT_SEED
from npinv.bench.results import markdown_table
from npinv.model import Model
from npinv.scenes import random_edit, random_scenes
from npinv.settings import EditSettings, InvertSettings


def write_scene_manifest(folder: Path, model: Model, n_images: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(HELD_OUT_SEED + 1)
    lines = []
    for i, scene in enumerate(random_scenes(HELD_OUT_SEED + 1, n_images)):
        scene.render(model.resolution).save(folder / f"scene{i:03d}.png")
        target = scene.edited(random_edit(scene, rng, "color"))
        lines.append(json.dumps({"image": f"scene{i:03d}.png", "source": scene.caption, "target": target.caption}))
    path = folder / "manifest.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def run_throughput(model: Model, out: str | Path, *, batch_sizes=(1, 2, 4, 8), n_images: int = 8, steps: int = 50,
                   guidance: float | None = None) -> dict:
    """``guidance``: None is the model's recommended editing guidance."""
    out = Path(out)
    guidance = model.edit_guidance if guidance is None else guidance
    manifest = write_scene_manifest(out / "data", model, n_images)
    rows = read_manifest(manifest, EditSettings(controller="replace", guidance=guidance), InvertSettings(steps=steps))
    results, reference = [], None
    for size in batch_sizes:
        folder = out / f"batch{size}"
        if folder.exists():
            for f in sorted(folder.rglob("*"), reverse=True):
                f.unlink() if f.is_file() else f.rmdir()
        report = run_batch(model, rows, folder, batch_size=size)
        seconds = report.seconds
        images = [np.asarray(Image.open(p), dtype=np.int16) for p in sorted((folder / "edits").glob("*.png"))]
        if reference is None:
            reference = images
        diff = max(int(np.abs(a - b).max()) for a, b in zip(images, reference, strict=True))
        results.append({"batch_size": size, "images": report.done_now, "seconds": seconds,
                        "images_per_minute": 60.0 * report.done_now / seconds, "unet_calls": report.unet_calls,
                        "max_pixel_difference_vs_batch_1": diff})
    summary = {"steps": steps, "guidance": guidance, "n_images": n_images, "rows": results}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def throughput_table(summary: dict) -> str:
    base = summary["rows"][0]["images_per_minute"]
    return markdown_table(
        ["batch size", "images", "seconds", "images / minute", "speed-up", "UNet calls", "max pixel diff vs batch 1"],
        [[r["batch_size"], r["images"], r["seconds"], r["images_per_minute"], r["images_per_minute"] / base,
          r["unet_calls"], r["max_pixel_difference_vs_batch_1"]] for r in summary["rows"]])
