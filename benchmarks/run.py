"""Run the benchmarks on the embedded model and regenerate BENCHMARKS.md from this run's figures.

    python benchmarks/run.py --out bench        (make bench)

Every figure in BENCHMARKS.md comes from the summaries this script writes in the same run.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import time
from pathlib import Path

import torch

from npinv import load_model
from npinv.bench.attention_timing import attention_timing_table, run_attention_timing
from npinv.bench.edit_shapes import edit_table, inversion_label, run_edit_shapes
from npinv.bench.flow import (
    family_table,
    flow_edit_table,
    flow_paired_table,
    flow_recon_table,
    plot_calls,
    run_flow_edits,
    run_flow_reconstruct,
    same_calls_table,
)
from npinv.bench.paired import compare_paired, load_edit_rows, paired_table
from npinv.bench.reconstruct import reconstruct_table, run_reconstruct_bench
from npinv.bench.throughput import run_throughput, throughput_table
from npinv.io import write_text
from npinv.model import embedded_model_path
from npinv.settings import DEFAULT_INVERT_ITERS, DEFAULT_INVERT_TOL

ROOT = Path(__file__).resolve().parent.parent
BASE_METHODS = ("ddim1", "ddim", "nti", "npi")
# NPI on exact inversions (npinv.schemes) and with decoder inversion (npinv.decoder) first.
EXACT_METHODS = ("npi@fixed-point", "npi@anderson", "npi@bdia", "npi@bdia+g0.9", "npi@dec100", "npi@anderson+dec100",
                 "npi@bdia+dec100", "nti@fixed-point", "nti@anderson", "nti@bdia")
# (scheme, BDIA gamma): plain DDIM inversion first, the baseline the exact schemes' edits are held
# against in the same run.
EXACT_EDIT_INVERSIONS = (("ddim", 1.0), ("anderson", 1.0), ("bdia", 1.0), ("bdia", 0.9))
# The results folders main() writes (besides edit_exact_*), which a fresh run clears first.
OUTPUT_FOLDERS = ("reconstruct", "edit_shapes", "edit_guidance", "edit_blend", "edit_noblend", "edit_bare", "throughput",
                  "attention_timing", "flow")


def frontier_section(rec: dict) -> str:
    """One table a newcomer can read: quality against time for the plain and exact inversions."""
    by = {(r["method"], r["steps"]): r for r in rec["rows"]}
    picks = [("npi", 10), ("npi", 50), ("nti", 50), ("npi@fixed-point", 10), ("npi@anderson", 5), ("npi@anderson", 10),
             ("npi@anderson", 50), ("npi@bdia", 5), ("npi@bdia", 10), ("npi@bdia", 50), ("npi@dec100", 50),
             ("npi@anderson+dec100", 50), ("npi@bdia+dec100", 10), ("npi@bdia+dec100", 50)]
    rows = [by[k] for k in picks if k in by]
    if not rows:
        return ""
    vae = rows[0]["vae_psnr_mean"]
    lines = ["| reconstruction | steps | PSNR (dB) | vs VAE round trip | worst scene vs its VAE | seconds (median) "
             "| UNet calls |", "|---|---|---|---|---|---|---|",
             f"| VAE round trip `decode(encode(x))` | - | {vae:.2f} | 0 | 0 | - | 0 |"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['steps']} | {r['psnr_mean']:.2f} | {r['psnr_mean'] - vae:+.2f} | "
                     f"{-r['worst_vae_gap']:+.2f} | {r['seconds_median']:.2f} | {r['unet_calls_mean']:.0f} |")
    out = "\n".join(lines) + "\n"
    nti50 = by.get(("nti", 50))
    for scheme in ("fixed-point", "anderson"):
        r = by.get((f"npi@{scheme}", 10))
        if r and nti50:
            out += (f"\nNPI + `{scheme}` at 10 steps: {r['psnr_mean']:.3f} dB against NTI at 50 steps "
                    f"{nti50['psnr_mean']:.3f} dB, in {r['seconds_median'] / nti50['seconds_median']:.2f} of its median "
                    f"time; its worst scene is {r['worst_vae_gap']:.2f} dB below that scene's VAE round trip.\n")
    return out


def sd15_section(sd15: dict | None, steps: int) -> str:
    head = "## SD-1.5-shaped model (random weights, 256 px, CPU)\n\n"
    if sd15 is None:
        return head + "Not measured in this run (`--sd15-steps 0`).\n"
    s = sd15["seconds_median"]
    return head + (
        f"{sd15['device']}, {sd15['dtype']}, {sd15['steps']} steps. Speed does not depend on the weights.\n\n"
        "| part | seconds | UNet calls |\n|---|---|---|\n"
        + "".join(f"| {k} | {s[k]:.1f} | {sd15['unet_calls'][k]} |\n" for k in ("invert", "npi", "nti", "npi_edit"))
        + f"\nReconstruction including inversion: NPI {sd15['npi_total_s']:.1f} s, NTI {sd15['nti_total_s']:.1f} s "
        f"(NTI / NPI = {sd15['nti_over_npi_time']:.1f}x). GPU figures: run `benchmarks/gpu.sh` on a GPU machine.\n")


def flow_benchmarks(out: Path, args, unet_rec: dict) -> dict:
    """The flow section: the embedded flow model's reconstruction frontier and edits, and both families
    on the same held-out scenes (:mod:`npinv.bench.flow`)."""
    model = load_model("shapes-flow", device="cpu")
    rec_w = model.edit_guidance
    steps = [int(s) for s in args.flow_steps.split(",")]
    rec = run_flow_reconstruct(model, out / "flow" / "reconstruct", shapes=args.shapes, steps_list=steps)
    plot_calls(rec, out / "flow" / "reconstruct")
    guidances = tuple(dict.fromkeys((rec_w, *(float(w) for w in args.flowedit_guidances.split(",")))))
    # The self-replace share the model's card recommends (measured there), run beside npinv's default.
    card = embedded_model_path("shapes-flow") / "model_card_figures.json"
    sr = json.loads(card.read_text()).get("recommended_self_replace", 0.6) if card.is_file() else 0.6
    edits = run_flow_edits(model, out / "flow", n_scenes=args.flow_edit_scenes, steps=args.flow_edit_steps,
                           flowedit_guidances=guidances, self_replace=sr)
    common = tuple(s for s in steps if any(r["steps"] == s for r in unet_rec["rows"]))
    text = f"""## Flow models: the embedded flow model (npinv-shapes-flow-64)

An SD3-layout flow-matching model (MMDiT transformer, Euler flow schedule, shift 1) trained on the same
scenes and captions as the UNet model, on that model's VAE and text encoder (its card:
`src/npinv/models/shapes_flow64/MODEL_CARD.md`). Same held-out scenes as the UNet tables. Model calls
are exact counts per image (inversion included); seconds are medians on this machine.

### Reconstruction frontier ({args.shapes} held-out scenes, w = 7.5)

`npi` inverts with the Euler step (one call a step); `@fixed-point` and `@anderson` iterate each step
to {DEFAULT_INVERT_TOL:g}; `@bdia` is exact at one call a step; `@midpoint` is RF-Solver's second-order
step (2 calls a step, inversion and sampling), `@fireflow` FireFlow's midpoint with the velocity reused
(one call a step plus one); `nti` the null-text analogue (the pooled embedding optimised too);
`ddim` plain classifier-free guidance with the empty prompt; `ddim1` the round trip at w = 1;
`dec100` fits the clean latent through the VAE decoder first. Cells: PSNR (model calls per image).

{flow_recon_table(rec)}
Best PSNR within a budget of model calls per image (inversion + reconstruction):

{same_calls_table(rec)}
![PSNR vs model calls]({out}/flow/reconstruct/psnr_vs_calls.png)

### Editing: NPI-Flow + Prompt-to-Prompt against FlowEdit, RF-Solver (midpoint) and FireFlow

{edits["n_cases"]} held-out cases ({args.flow_edit_scenes} scenes x colour, shape and background swaps),
{args.flow_edit_steps} steps, scored as the UNet edit tables. NPI edits at the model's recommended guidance
(w = {rec_w:g}) with word swap (cross-replace 0.8, self-replace 0.6 through joint attention, and the share
the model card recommends, {sr:g}) and local blend on the swapped words; the midpoint and FireFlow rows
invert and edit with those solvers. FlowEdit (Kulikov et al. 2024) is inversion-free: w is its target
guidance (source guidance and n_max at the paper's SD3 values). Model calls and rows per edit include the
inversion where the method needs one.

{flow_edit_table(edits)}
Case by case against NPI + word swap + local blend on the Euler inversion (McNemar's exact test on the
cases only one gets right; mean paired differences with 95 % intervals resampling whole scenes):

{flow_paired_table(edits)}
### Both families on the same held-out scenes (w = 7.5)

{family_table(unet_rec, rec, common)}
"""
    return {"text": text, "reconstruct": rec, "edits": edits}


def clear_outputs(out: Path) -> None:
    """Remove what an earlier run wrote in ``out`` (and nothing else), so every figure is measured now."""
    import shutil

    for name in OUTPUT_FOLDERS:
        shutil.rmtree(out / name, ignore_errors=True)
    for path in out.glob("edit_exact_*"):
        shutil.rmtree(path, ignore_errors=True)
    for name in ("sd15_cpu.json", "benchmarks.json"):
        (out / name).unlink(missing_ok=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench")
    parser.add_argument("--shapes", type=int, default=8)
    parser.add_argument("--steps", default="5,10,20,50,100")
    parser.add_argument("--edit-scenes", type=int, default=4)
    parser.add_argument("--exact-edit-scenes", type=int, default=24,
                        help="held-out scenes for the exact-inversion edit comparison (at the recommended guidance only)")
    parser.add_argument("--exact-edit-steps", default="10,50", help="step counts of the exact-inversion edit comparison")
    parser.add_argument("--batch-images", type=int, default=8, help="images for the edit-batch throughput figure")
    parser.add_argument("--resume", action="store_true",
                        help="keep the rows an interrupted run of the same model left in --out (default: measure afresh)")
    parser.add_argument("--flow-steps", default="5,10,20,50", help="step counts of the flow reconstruction frontier")
    parser.add_argument("--flow-edit-scenes", type=int, default=24,
                        help="held-out scenes (x 3 swaps) of the flow edit comparison")
    parser.add_argument("--flow-edit-steps", type=int, default=50)
    parser.add_argument("--flowedit-guidances", default="7.5,13.5",
                        help="FlowEdit's target guidances (beside the flow model's recommended one)")
    parser.add_argument("--keep-timings", action="store_true",
                        help="with --resume: keep the throughput, attention and SD-1.5 timings of the earlier run "
                             "(its benchmarks.json) instead of measuring them again")
    parser.add_argument("--sd15-steps", type=int, default=5,
                        help="also time an SD-1.5-shaped random model at 256 px on this CPU (0: skip)")
    args = parser.parse_args()
    out = Path(args.out)
    if not args.resume:
        clear_outputs(out)
    start = time.perf_counter()
    model = load_model(device="cpu")
    rec_w = model.edit_guidance  # the model folder's recommended editing guidance (npinv.json)
    pair = tuple(dict.fromkeys((rec_w, 7.5)))
    steps = [int(s) for s in args.steps.split(",")]
    rec = run_reconstruct_bench(model, out / "reconstruct", shapes=args.shapes, steps_list=steps,
                                methods=(*BASE_METHODS, *EXACT_METHODS))
    edits = run_edit_shapes(model, out / "edit_shapes", n_scenes=args.edit_scenes)
    sweep = run_edit_shapes(model, out / "edit_guidance", n_scenes=args.edit_scenes, methods=("npi",),
                            directs=(False,), guidances=(1.5, 2.5, 4.0, 7.5))
    # Which cross-attention maps local blend reads: npinv's rule (maps closest to 16 cells: 16x16 here)
    # against the rule it replaced (a quarter of the latent: 4x4 here), 8x8, and no blend at all.
    blend_maps = run_edit_shapes(model, out / "edit_blend", n_scenes=args.edit_scenes, methods=("npi",),
                                 directs=(False,), guidances=pair, blend_sizes=(None, 8, 4))
    no_blend = run_edit_shapes(model, out / "edit_noblend", n_scenes=args.edit_scenes, methods=("npi",),
                               directs=(False,), guidances=pair, blend=False)
    bare = run_edit_shapes(model, out / "edit_bare", n_scenes=args.edit_scenes, methods=("npi",), directs=(False,),
                           controllers=("none",), guidances=(2.0, 7.5), blend=False)
    # Exact inversion + NPI + word swap + local blend at the model's recommended guidance, beside the same
    # edits on plain DDIM inversions, on more scenes than the other edit tables.
    # At 10 steps, where plain inversion's reconstruction error is largest, and at 50 like every other edit table.
    exact_steps = [int(s) for s in args.exact_edit_steps.split(",")]
    exact_edits = [run_edit_shapes(model, out / f"edit_exact_{inversion_label(scheme, gamma)}_s{steps}",
                                   n_scenes=args.exact_edit_scenes, methods=("npi",), directs=(False,),
                                   guidances=(rec_w,), steps=steps, invert_scheme=scheme, bdia_gamma=gamma)
                   for steps in exact_steps for scheme, gamma in EXACT_EDIT_INVERSIONS]
    # Each exact scheme against plain inversion case by case (same scenes, same swaps).
    paired = [compare_paired(load_edit_rows(out / f"edit_exact_ddim_s{steps}"),
                             load_edit_rows(out / f"edit_exact_{inversion_label(scheme, gamma)}_s{steps}"))
              for steps in exact_steps for scheme, gamma in EXACT_EDIT_INVERSIONS if scheme != "ddim"]
    kept = json.loads((out / "benchmarks.json").read_text()) if args.keep_timings else None
    if kept is None:
        throughput = run_throughput(model, out / "throughput", n_images=args.batch_images, guidance=rec_w)
        # Measured afresh on every run (a minute): fused against explicit attention, side by side.
        attention = run_attention_timing(model, out / "attention_timing")
    else:
        throughput, attention = kept["throughput"], kept["attention_timing"]
    flow = flow_benchmarks(out, args, rec)
    sd15 = None
    if kept is not None and (out / "sd15_cpu.json").is_file():
        sd15 = json.loads((out / "sd15_cpu.json").read_text())
    elif args.sd15_steps:
        import subprocess
        import sys

        target = out / "sd15_cpu.json"
        subprocess.run([sys.executable, str(ROOT / "benchmarks" / "sd15_timing.py"), "--device", "cpu", "--size", "256",
                        "--steps", str(args.sd15_steps), "--out", str(target)], check=True)
        sd15 = json.loads(target.read_text())
    minutes = (time.perf_counter() - start) / 60
    machine = f"{platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}, CPU"
    resumed = ("; resumed with `--resume`: rows an earlier run measured were kept, the throughput, attention and "
               "SD-1.5 timings measured afresh" if args.resume else "")
    if args.resume and kept is not None:
        resumed = ("; resumed with `--resume --keep-timings`: the UNet rows and the throughput, attention and SD-1.5 "
                   "timings are an earlier run's, the rows new to this run (the flow section) measured now")
    text = f"""# Benchmarks

Regenerated by `make bench` ({minutes:.0f} minutes on {machine}, {time.strftime('%Y-%m-%d')}){resumed}.
Model: the embedded npinv-shapes-64 (64x64 px). Seconds are medians per image measured side by side in
one process; UNet calls are exact counts (inversion included). Raw rows: `{out}/*/results.jsonl`.

## Reconstruction ({args.shapes} held-out scenes, w = 7.5; `ddim1` is DDIM at w = 1)

{reconstruct_table(rec)}
### Exact inversion: the frontier

`npi@fixed-point` and `npi@anderson` invert with `--invert-scheme fixed-point|anderson` (each step
iterated until its denoising step lands back within {DEFAULT_INVERT_TOL:g} of where it started, at most
{DEFAULT_INVERT_ITERS} extra UNet calls a step); `npi@bdia` with `--invert-scheme bdia` (bidirectional
integration: exact by construction, one UNet call a step; `+g0.9`: with BDIA's damping factor
`--bdia-gamma 0.9`); `dec100` fits the clean latent to the image through the VAE decoder first
(`--decoder-steps 100`). "vs VAE round trip": the mean PSNR minus the mean of `decode(encode(x))`.

{frontier_section(rec)}
![PSNR vs steps]({out}/reconstruct/psnr_vs_steps.png) ![PSNR vs seconds]({out}/reconstruct/psnr_vs_seconds.png)

## Editing against ground truth ({args.edit_scenes} held-out scenes x colour, shape and background swaps)

Prompt-to-Prompt word swap ("replace", cross-replace 0.8, self-replace 0.6) with local blend on the
swapped words, 50 steps. PSNR/SSIM vs truth: the edit against the true edited scene; bg PSNR: the
edit against the source on the region the edit must not touch; success: the scene reader
(`npinv.scenes.read_scene`) sees the edited scene's colour, shape and background. It takes each pixel's
nearest palette colour, the commonest on the border as the background, and the shape whose outline,
drawn in the object's bounding box, matches the object's silhouette best (holes filled, specks dropped,
disagreements within a pixel of the outline forgiven). UNet rows are per step x steps, edit only.

{edit_table(edits)}
### Guidance sweep (NPI + replace + local blend)

{edit_table(sweep)}
### Local blend: which attention maps it reads (NPI + replace)

Blend IoU: the final blend mask (upsampled to the image) against the region the edit is meant to
change, which the scene generator knows (the object before and after a colour or shape swap, the
background for a background swap). npinv reads the cross-attention layers whose maps are closest to
16 cells (the reference's 16x16 layers of SD at 512 px; 16x16 on this model); the rule it replaced
took a quarter of the latent side (4x4 here).

{edit_table(blend_maps)}
{edit_table(no_blend)}
### Without attention control (NPI, target as condition, source as negative, no blend)

{edit_table(bare)}
### Exact inversion + NPI + word swap + local blend

{args.exact_edit_scenes} held-out scenes x colour, shape and background swaps at the model's recommended
guidance (w = {rec_w:g}), at {" and ".join(map(str, exact_steps))} steps, each scene inverted with plain DDIM
(`ddim`), `--invert-scheme anderson`, `bdia`, or `bdia` with `--bdia-gamma 0.9` (`bdia-g0.9`).
"bg PSNR (successes)" averages the kept region over the edits that succeeded only: an edit that fails
by changing nothing keeps the whole background.

{edit_table({"rows": [r for e in exact_edits for r in e["rows"]]})}
Case by case against plain DDIM inversion: the edits only one of the two gets right, McNemar's exact
test of those counts, and the mean paired differences with 95 % intervals from resampling whole scenes
(`npinv.bench.paired`). An interval that spans 0 is a difference these cases cannot tell from chance.

{paired_table(paired)}
## Batch throughput (`npinv edit-batch --batch-size`, {args.batch_images} held-out scenes, colour swap)

NPI + word swap at w = {rec_w:g} (the model's recommended guidance), 50 steps; each batch size edits the
whole manifest from scratch (inversion, editing, PNGs and results rows written). Several images share one UNet call a step.

{throughput_table(throughput)}
## Fused against explicit Prompt-to-Prompt attention (CPU, same run)

NPI + word swap + local blend at w = {rec_w:g}, {attention['steps']} steps, on {attention['n_scenes']} held-out
scenes, each edit run {attention['repeats']} times per path, alternating which goes first
(`npinv.bench.attention_timing`). `explicit` is npinv's attention path before the fused one (kept as the
test oracle, `--attention explicit`); the edits agree to the pixel difference shown.

{attention_timing_table(attention)}
{flow["text"]}
{sd15_section(sd15, args.sd15_steps)}"""
    write_text(ROOT / "BENCHMARKS.md", text)
    write_text(out / "benchmarks.json", json.dumps({"reconstruct": rec, "edit": edits, "edit_guidance": sweep,
                                                    "edit_bare": bare, "edit_blend": blend_maps, "edit_noblend": no_blend,
                                                    "edit_exact": exact_edits,
                                                    "edit_exact_paired": [dataclasses.asdict(c) for c in paired],
                                                    "throughput": throughput, "attention_timing": attention,
                                                    "flow": {k: v for k, v in flow.items() if k != "text"},
                                                    "minutes": minutes}, indent=2, default=float))
    print(text)


if __name__ == "__main__":
    main()
