"""Train several variants of the embedded model's config side by side and measure each one.

How the embedded model v2's config was chosen (the record is in the model card's history). The VAE
stage is shared: every variant must keep the base config's ``vae``, ``seed``, ``resolution``,
``train_scenes`` and ``captions``, so the VAE and the encoded training set are made once; each
variant then trains its text encoder and UNet in its own process (several share one GPU), saves a
diffusers folder and is measured on held-out scenes:
- ``object_iou`` / ``background_iou``: :func:`npinv.bench.localisation.attention_localisation`;
- ``samples``: the model card's sample accuracy (colour, shape and background right) at w 7.5.

    python benchmarks/train_sweep.py --variants sweep.json --out DIR [--device cuda] [--deadline-min 8]

``sweep.json`` maps a variant name to the config entries it changes (dotted paths), in priority
order: when the projected finish of the running variants passes the deadline, the last one still
running is stopped first, so the others get the device to themselves.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

SHARED_KEYS = ("vae", "seed", "resolution", "train_scenes", "captions")


def variant_config(base: dict, changes: dict) -> dict:
    cfg = copy.deepcopy(base)
    for path, value in changes.items():
        node = cfg
        *parents, leaf = path.split(".")
        for key in parents:
            node = node[key]
        node[leaf] = value
    if any(cfg.get(k) != base.get(k) for k in SHARED_KEYS):
        raise SystemExit(f"a variant may not change {', '.join(SHARED_KEYS)} (the shared VAE stage)")
    return cfg


def shared_stage(base: dict, out: Path, device: torch.device) -> None:
    from npinv import training as T

    run = out / "shared.run"
    run.mkdir(parents=True, exist_ok=True)
    log = T.TrainLog(run / "train_log.jsonl")
    parts = T.build_components(base, run / "tokenizer")
    T.train_vae(parts["vae"], base, run, log, device)
    parts["vae"].requires_grad_(False)
    data = T.encode_dataset(parts["vae"], base, run, device)
    log(stage="latents", scaling_factor=float(1.0 / data["mean"].std()), n=len(data["captions"]))


def train_variant(name: str, cfg: dict, out: Path, device: torch.device) -> None:
    from npinv import training as T

    run = out / f"{name}.run"
    run.mkdir(parents=True, exist_ok=True)
    shared = out / "shared.run"
    parts = T.build_components(cfg, run / "tokenizer")
    parts["vae"].load_state_dict(torch.load(shared / "vae.ckpt", weights_only=False, map_location="cpu")["model"])
    parts["vae"].requires_grad_(False).eval()
    data = torch.load(shared / "latents.pt", weights_only=False)
    parts["vae"].register_to_config(scaling_factor=round(float(1.0 / data["mean"].std()), 5))
    file_log = T.TrainLog(run / "train_log.jsonl")
    progress = out / f"{name}.progress"
    first: list[tuple[int, float]] = []  # the first logged step: the rate excludes start-up

    def log(**row) -> None:
        file_log(**row)
        if row.get("stage") == "unet":
            step, total, now = row["step"], cfg["unet"]["steps"], time.time()
            first[:] = first or [(step, now)]
            s0, t0 = first[0]
            rate = (now - t0) / (step - s0) if step > s0 else None
            progress.write_text(json.dumps({"step": step, "total": total, "s_per_step": rate,
                                            "finish": None if rate is None else now + rate * (total - step)}))

    file_log(stage="start", config=cfg, device=str(device), shared_vae=str(shared))
    T.train_unet(parts, data, cfg, run, log, device)
    T.save_model(parts, cfg, run, out / name)


def measure(model_dir: Path, n_iou: int, n_captions: int, device: str = "cpu") -> dict:
    from npinv.bench.localisation import attention_localisation
    from npinv.model import load_model
    from npinv.modelcard import HELD_OUT_SEED, sample_accuracy
    from npinv.scenes import random_scenes

    model = load_model(str(model_dir), device=device)
    t0 = time.time()
    loc = attention_localisation(model, list(random_scenes(HELD_OUT_SEED + 3, n_iou)), steps=20)
    samples = sample_accuracy(model, n_captions, 7.5, 50)
    samples.pop("images")
    samples.pop("captions")
    return {"object_iou": loc["object_iou"], "background_iou": loc["background_iou"], "iou_maps": loc["maps"],
            "samples": samples, "measure_s": round(time.time() - t0, 1), "measured_on": device}


def child(args) -> int:
    base = json.loads(Path(args.base).read_text())
    changes = json.loads(Path(args.variants).read_text())[args.one]
    cfg = variant_config(base, changes)
    out = Path(args.out)
    torch.set_num_threads(args.threads)
    train_variant(args.one, cfg, out, torch.device(args.device))
    result = {"name": args.one, "changes": changes, "trained": True}
    try:  # on the training device when it works there; else on the CPU, with fewer captions
        result |= measure(out / args.one, args.n_iou, args.n_captions, args.device)
    except Exception as exc:  # noqa: BLE001 - a measurement problem must not lose the trained model
        print(f"measuring on {args.device} failed ({exc!r}); measuring on the CPU", flush=True)
        result |= measure(out / args.one, args.n_iou, args.n_captions // 2 if args.device != "cpu" else args.n_captions)
    (out / f"{args.one}.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result), flush=True)
    return 0


def driver(args) -> int:
    t_start = time.time()
    base = json.loads(Path(args.base).read_text())
    variants = json.loads(Path(args.variants).read_text())
    for changes in variants.values():
        variant_config(base, changes)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device(args.device)
    shared_stage(base, out, device)
    print(f"shared VAE stage done in {time.time() - t_start:.0f} s", flush=True)
    deadline = t_start + args.deadline_min * 60
    procs = {}
    for name in variants:
        cmd = [sys.executable, __file__, "--one", name, "--base", args.base, "--variants", args.variants,
               "--out", str(out), "--device", args.device, "--threads", str(args.threads),
               "--n-iou", str(args.n_iou), "--n-captions", str(args.n_captions)]
        env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
        procs[name] = subprocess.Popen(cmd, stdout=open(out / f"{name}.out", "w"), stderr=subprocess.STDOUT, env=env)
    stopped = {}
    last_stop = 0.0
    while any(p.poll() is None for p in procs.values()):
        time.sleep(10)
        running = [n for n, p in procs.items() if p.poll() is None]
        finishes = {}
        for n in running:
            f = out / f"{n}.progress"
            try:
                finishes[n] = json.loads(f.read_text())
            except (OSError, ValueError):  # not written yet, or caught mid-write
                pass
        # Judge only on settled rates (300 steps in), and give a stop a minute to show in the others' rates.
        training = [n for n in running if n in finishes and finishes[n]["step"] < finishes[n]["total"]]
        settled = [n for n in training if finishes[n]["step"] >= 300 and finishes[n]["finish"]]
        late = [n for n in settled if finishes[n]["finish"] > deadline - args.measure_min * 60]
        if late and len(training) > 1 and time.time() - last_stop > 60:
            victim = training[-1]
            procs[victim].kill()
            last_stop = time.time()
            stopped[victim] = finishes[victim]
            print(f"stopped {victim} at step {finishes[victim]['step']} (projected to finish too late)", flush=True)
        if running and time.time() > t_start + args.hard_stop_min * 60:
            for n in running:
                procs[n].kill()
                stopped[n] = finishes.get(n, {})
            print("hard stop: killed", running, flush=True)
    results = {}
    for name in variants:
        f = out / f"{name}.json"
        results[name] = json.loads(f.read_text()) if f.exists() else {"name": name, "trained": False,
                                                                        "stopped": stopped.get(name),
                                                                        "returncode": procs[name].returncode}
        progress = out / f"{name}.progress"
        if progress.exists():
            results[name]["progress"] = json.loads(progress.read_text())
    summary = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
               "torch": torch.__version__, "seconds": round(time.time() - t_start, 1), "variants": results}
    (out / "sweep.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary, indent=2), flush=True)
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default="configs/shapes64.json")
    parser.add_argument("--variants", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--deadline-min", type=float, default=8.0, help="all training done by then (minutes from start)")
    parser.add_argument("--measure-min", type=float, default=1.5, help="time kept for measuring after training")
    parser.add_argument("--hard-stop-min", type=float, default=9.0)
    parser.add_argument("--n-iou", type=int, default=16)
    parser.add_argument("--n-captions", type=int, default=200)
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    return child(args) if args.one else driver(args)


if __name__ == "__main__":
    raise SystemExit(main())
