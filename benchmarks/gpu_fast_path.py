"""The GPU fast path measured in one run: the UNet call's floor (eager against CUDA-graph replay at
batch 1, 2, 3 and 8), and NPI inversion + reconstruction, NPI word-swap edits (1 and 4 targets), NTI,
NPI with BDIA at 10 steps and edit-batch's images per minute, each against its floor, with peak memory.

    python benchmarks/gpu_fast_path.py --device cuda --dtype fp16 --out bench/gpu_fast_path.json
    python benchmarks/gpu_fast_path.py --smoke --out /tmp/smoke.json   # the embedded model on the CPU

The model is benchmarks/sd15_timing.py's SD-1.5-shaped one with random weights (speed does not depend
on the weights); ``--smoke`` takes the small embedded model at its 64 px, few steps, and a stand-in
capture that replays eagerly (npinv.graphs.eager_capture), so that every line of this script runs
without a GPU. A workload's *floor* is the sum, over the UNet calls it made, of one graph-replayed
call's time at that call's batch (its forward passes and nothing else): ``ratio_to_floor`` 1.0 would be
a run with no host overhead, no VAE and no text encoder. Every workload runs once before it is timed
(a warm process: graphs captured), then ``--repeats`` times (the median is reported).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from npinv import service
from npinv.batch import read_manifest, run_batch
from npinv.graphs import GraphCache, eager_capture
from npinv.io import write_text
from npinv.methods import reconstruct
from npinv.model import Model, PromptEmbedding, load_model, parse_dtype
from npinv.settings import EditSettings, InvertSettings

FLOOR_BATCHES = (1, 2, 3, 8)
# Prompts of the SD-1.5-shaped model's small vocabulary (sd15_timing.WORDS), and of the embedded model's.
PROMPTS = {
    "sd15": ("a photo of a cat sitting on a bench",
             ["a photo of a dog sitting on a bench", "a photo of the dog sitting on a bench",
              "a photo of a dog sitting on the bench", "a photo of the cat sitting on the bench"]),
    "smoke": ("a red circle on a blue background",
              ["a green circle on a blue background", "a red square on a blue background",
               "a red circle on a green background", "a yellow circle on a blue background"]),
}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def call_log(model: Model) -> Iterator[list[int]]:
    """The batch (rows) of every UNet call made meanwhile."""
    rows: list[int] = []
    original = model.unet_output

    def logged(z, t, cond):
        rows.append(z.shape[0])
        return original(z, t, cond)

    model.unet_output = logged  # type: ignore[method-assign]
    try:
        yield rows
    finally:
        del model.unet_output


class Floors:
    """Per-call seconds of one UNet call at a batch, eager or graph-replayed, measured once each."""

    def __init__(self, model: Model, prompt: str, calls: int, repeats: int) -> None:
        self.model, self.calls, self.repeats = model, calls, repeats
        self.cond = model.encode_prompt(prompt)
        self.measured: dict[tuple[int, bool], float] = {}

    def per_call(self, batch: int, graphs: bool = True) -> float:
        if (batch, graphs) not in self.measured:
            self.measured[(batch, graphs)] = self._measure(batch, graphs)
        return self.measured[(batch, graphs)]

    def _measure(self, batch: int, graphs: bool) -> float:
        model = self.model
        side = model.unet.config.sample_size
        z = torch.randn(batch, model.unet.config.in_channels, side, side, device=model.device,
                        generator=torch.Generator(model.device).manual_seed(batch))
        cond = PromptEmbedding.cat([self.cond] * batch)
        times = []
        with using_graphs(model, graphs), torch.no_grad(), model.deferred_checks():
            model.unet_output(z, 500, cond)  # the capture (graphs) or a warm-up (eager)
            for _ in range(self.repeats):
                sync(model.device)
                start = time.perf_counter()
                for _ in range(self.calls):
                    model.unet_output(z, 500, cond)
                sync(model.device)
                times.append((time.perf_counter() - start) / self.calls)
        return statistics.median(times)

    def of(self, rows: list[int]) -> float:
        """A workload's floor: its calls, each at a graph replay's time at its batch."""
        return sum(self.per_call(b) for b in rows)


@contextlib.contextmanager
def using_graphs(model: Model, on: bool) -> Iterator[None]:
    before = model.graphs.enabled
    model.graphs.enabled = on
    try:
        yield
    finally:
        model.graphs.enabled = before


def timed(model: Model, run: Callable[[], object], repeats: int, *, graphs: bool = True,
          warm: bool = True) -> tuple[float, list[int]]:
    """Median seconds of ``run`` after one untimed run (``warm``), and the batches of one run's UNet calls."""
    with using_graphs(model, graphs):
        if warm:
            run()
        times: list[float] = []
        rows: list[int] = []
        for _ in range(repeats):
            sync(model.device)
            with call_log(model) as logged:
                start = time.perf_counter()
                run()
                sync(model.device)
                times.append(time.perf_counter() - start)
            rows = logged
    return statistics.median(times), rows


def build_model(args) -> tuple[Model, str]:
    if args.smoke:
        model = load_model(device=args.device or "cpu")
        if model.device.type != "cuda":  # no graphs to capture here: the stand-in runs the cache's every line
            model.graphs = GraphCache(enabled=True, capture=eager_capture)
        return model, "smoke"
    sys.path.insert(0, str(Path(__file__).parent))
    from sd15_timing import build

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    return build(device, parse_dtype(args.dtype)), "sd15"


def write_images(folder: Path, n: int, size: int, source: str, target: str) -> Path:
    """``n`` random images and a manifest editing each from ``source`` toward ``target``."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    lines = []
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(folder / f"img{i}.png")
        lines.append(json.dumps({"image": f"img{i}.png", "source": source, "target": target}))
    path = folder / "manifest.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default=None, help="default: cuda if there is one (the CPU with --smoke)")
    parser.add_argument("--dtype", default="fp16")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--floor-calls", type=int, default=20, help="UNet calls per floor measurement")
    parser.add_argument("--nti-inner", type=int, default=10, help="NTI inner iterations (published: 10)")
    parser.add_argument("--batch-images", type=int, default=8, help="edit-batch: images in the manifest")
    parser.add_argument("--batch-size", type=int, default=4, help="edit-batch --batch-size")
    parser.add_argument("--smoke", action="store_true", help="the embedded model, few steps (runs on the CPU)")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    floor_batches, bdia_steps = FLOOR_BATCHES, 10
    if args.smoke:  # every line once, in seconds
        args.steps, args.repeats, args.floor_calls, args.nti_inner = 2, 1, 1, 1
        args.batch_images, args.batch_size, floor_batches, bdia_steps = 2, 2, (1, 2), 2
    model, kind = build_model(args)
    device = model.device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    prompt, targets = PROMPTS[kind]
    size = model.resolution
    image = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(0)) * 2 - 1
    source = service.Source(image, "random", "random")
    floors = Floors(model, prompt, args.floor_calls, args.repeats)
    floor_table = {}
    for b in floor_batches:
        eager, graph = floors.per_call(b, graphs=False), floors.per_call(b)
        floor_table[str(b)] = {"eager_ms": 1e3 * eager, "graph_ms": 1e3 * graph, "eager_over_graph": eager / graph}

    steps = InvertSettings(steps=args.steps)
    inverted = service.invert_one(model, source, prompt, steps)
    edit_settings = EditSettings(method="npi", controller="replace", guidance=7.5)

    def npi_round_trip():
        again = service.invert_one(model, source, prompt, steps)
        reconstruct(model, again.inversion, "npi", 7.5)

    def nti_round_trip():
        again = service.invert_one(model, source, prompt, steps)
        reconstruct(model, again.inversion, "nti", 7.5, nti_inner_steps=args.nti_inner)

    def bdia_round_trip():
        bdia = service.invert_one(model, source, prompt, InvertSettings(steps=bdia_steps, invert_scheme="bdia"))
        reconstruct(model, bdia.inversion, "npi", 7.5)

    workloads: dict[str, dict] = {}

    def record(name: str, run: Callable[[], object], *, repeats: int = args.repeats, eager_too: bool = True,
               warm: bool = not args.smoke) -> None:
        seconds, rows = timed(model, run, repeats, warm=warm)
        floor = floors.of(rows)
        workloads[name] = {"seconds": seconds, "unet_calls": len(rows), "unet_rows": sum(rows),
                           "floor_seconds": floor, "ratio_to_floor": seconds / floor}
        if eager_too:  # the same work without graphs: what the fast path buys
            eager, _ = timed(model, run, repeats, graphs=False, warm=warm)
            workloads[name] |= {"eager_seconds": eager, "eager_over_graphs": eager / seconds}

    record("npi_invert_reconstruct", npi_round_trip)
    record("npi_edit_1_target", lambda: service.edit(model, [(inverted, targets[:1])], edit_settings))
    record("npi_edit_4_targets", lambda: service.edit(model, [(inverted, targets)], edit_settings))
    record("npi_bdia", bdia_round_trip)
    # Once, unwarmed (its one graphed call, the batch-1 condition, is captured by now): NTI's optimisation
    # calls need gradients, so they run eagerly either way.
    record("nti_invert_reconstruct", nti_round_trip, repeats=1, eager_too=False, warm=False)

    with tempfile.TemporaryDirectory() as tmp:
        manifest = write_images(Path(tmp) / "data", args.batch_images, size, prompt, targets[0])
        rows = read_manifest(manifest, edit_settings, steps)
        runs = iter(range(1 + args.repeats))  # a fresh folder each run (a rerun would resume: no work)

        def edit_batch_run():
            run_batch(model, rows, Path(tmp) / f"out{next(runs)}", batch_size=args.batch_size)

        record("edit_batch", edit_batch_run, eager_too=False)
    batch = workloads["edit_batch"]
    batch |= {"images": args.batch_images, "batch_size": args.batch_size,
              "images_per_minute": 60.0 * args.batch_images / batch["seconds"],
              "images_per_minute_at_floor": 60.0 * args.batch_images / batch["floor_seconds"]}

    result = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({platform.machine()})",
        "model": model.name, "smoke": args.smoke, "dtype": str(model.dtype).removeprefix("torch."), "size": size,
        "steps": args.steps, "bdia_steps": bdia_steps, "repeats": args.repeats, "torch": torch.__version__,
        "graph_backend": "cuda" if device.type == "cuda" else "eager stand-in (no GPU)",
        "floor_per_call": floor_table, "workloads": workloads,
        "nti_over_npi_time": workloads["nti_invert_reconstruct"]["seconds"] / workloads["npi_invert_reconstruct"]["seconds"],
        "graph_cache": vars(model.graphs.stats) | {"graphs_held": len(model.graphs)},
        "peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    write_text(args.out, json.dumps(result, indent=2))
    print(table(result))
    return result


def table(result: dict) -> str:
    lines = [f"{result['device']}, {result['dtype']}, {result['size']} px, {result['steps']} steps (BDIA: "
             f"{result['bdia_steps']}), torch {result['torch']}, graphs: {result['graph_backend']}",
             "", "| UNet call, batch | eager ms | graph ms | eager / graph |", "|---|---|---|---|"]
    for b, row in result["floor_per_call"].items():
        lines.append(f"| {b} | {row['eager_ms']:.2f} | {row['graph_ms']:.2f} | {row['eager_over_graph']:.2f} |")
    lines += ["", "| workload | seconds | UNet calls | floor s | / floor | eager s | eager / graphs |",
              "|---|---|---|---|---|---|---|"]
    for name, w in result["workloads"].items():
        eager = f"{w['eager_seconds']:.3f} | {w['eager_over_graphs']:.2f}" if "eager_seconds" in w else "- | -"
        lines.append(f"| {name} | {w['seconds']:.3f} | {w['unet_calls']} | {w['floor_seconds']:.3f} | "
                     f"{w['ratio_to_floor']:.2f} | {eager} |")
    batch = result["workloads"]["edit_batch"]
    lines += ["", f"edit-batch: {batch['images_per_minute']:.1f} images/min (floor {batch['images_per_minute_at_floor']:.1f}), "
              f"NTI / NPI time {result['nti_over_npi_time']:.1f}, peak memory "
              + (f"{result['peak_memory_gib']:.2f} GiB" if result["peak_memory_gib"] is not None else "n/a")]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
