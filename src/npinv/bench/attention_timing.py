"""Fused against explicit Prompt-to-Prompt attention on this machine, side by side in one process.

Each held-out scene is inverted once; then the same edit (NPI + word swap + local blend at the model's
recommended guidance) runs with ``attention="explicit"`` (npinv's path before fused attention, kept as
the oracle) and ``attention="fused"``, alternating which goes first, several times. The figures are
medians of the per-scene ratios, so a busy machine moves both sides alike; the edits are checked to
agree (largest pixel difference on the 0..255 scale).
"""

from __future__ import annotations

import dataclasses
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from npinv.bench.edit_shapes import HELD_OUT_SEED
from npinv.io import write_text
from npinv.model import Model
from npinv.scenes import random_edit, random_scenes
from npinv.service import edit, invert_one, prepare_picture
from npinv.settings import EditSettings, InvertSettings


def run_attention_timing(model: Model, out: str | Path, *, n_scenes: int = 6, steps: int = 50,
                         repeats: int = 3) -> dict:
    invert_settings = InvertSettings(steps=steps)
    rng = np.random.default_rng(HELD_OUT_SEED + 2)
    rows = []
    for n, scene in enumerate(random_scenes(HELD_OUT_SEED + 2, n_scenes)):
        change = random_edit(scene, rng, "color")
        target = scene.edited(change)
        source = prepare_picture(scene.render(model.resolution), model, invert_settings, name=f"scene{n:03d}")
        inverted = invert_one(model, source, scene.caption, invert_settings)
        base = EditSettings(controller="replace", blend=change.words(scene), guidance=model.edit_guidance)
        seconds: dict[str, list[float]] = {"explicit": [], "fused": []}
        images = {}
        for r in range(repeats):
            order = ("explicit", "fused") if (n + r) % 2 == 0 else ("fused", "explicit")
            for kind in order:
                start = time.perf_counter()
                done = edit(model, [(inverted, [target.caption])], dataclasses.replace(base, attention=kind))[0]
                seconds[kind].append(time.perf_counter() - start)
                images[kind] = done.images
        diff = float((images["fused"] - images["explicit"]).abs().max() * 127.5)
        explicit, fused = statistics.median(seconds["explicit"]), statistics.median(seconds["fused"])
        rows.append({"scene": n, "explicit_seconds": explicit, "fused_seconds": fused, "fused_over_explicit": fused / explicit,
                     "max_pixel_difference": diff})
    summary = {"steps": steps, "n_scenes": n_scenes, "repeats": repeats, "threads": torch.get_num_threads(),
               "explicit_seconds_median": statistics.median(r["explicit_seconds"] for r in rows),
               "fused_seconds_median": statistics.median(r["fused_seconds"] for r in rows),
               "fused_over_explicit_median": statistics.median(r["fused_over_explicit"] for r in rows),
               "max_pixel_difference": max(r["max_pixel_difference"] for r in rows), "rows": rows}
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_text(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    return summary


def attention_timing_table(summary: dict) -> str:
    return ("| attention | median seconds per edit | fused / explicit (median of per-scene ratios) | largest pixel difference |\n"
            "|---|---|---|---|\n"
            f"| explicit (the oracle; npinv's path before this round) | {summary['explicit_seconds_median']:.2f} | | |\n"
            f"| fused (the default) | {summary['fused_seconds_median']:.2f} | {summary['fused_over_explicit_median']:.2f} "
            f"| {summary['max_pixel_difference']:.2f} of 255 |\n")
