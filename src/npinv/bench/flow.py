"""The flow family's benchmarks (``make bench``'s flow section), on the embedded flow model.

- Reconstruction frontier on the held-out scenes of the UNet benchmark (same seed, same pictures):
  Euler inversion + NPI, exact inversions (fixed-point, Anderson, BDIA) + NPI, RF-Solver's midpoint
  scheme, FireFlow, the NTI analogue and decoder inversion; PSNR against model calls and seconds,
  with each picture's VAE round trip as the ceiling.
- Edit-shapes on the held-out cases: NPI-Flow + Prompt-to-Prompt word swap (with and without local
  blend, on Euler and exact inversions), the same edit on midpoint and FireFlow inversions, and
  FlowEdit at several target guidances; model calls counted with each method's inversion (FlowEdit
  needs none), and each against NPI + word swap + local blend case by case (:mod:`npinv.bench.paired`).
- The UNet model and the flow model side by side on the same scenes (a family column).
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

from npinv.bench.edit_shapes import run_edit_shapes
from npinv.bench.paired import EDIT_CASE, PairedComparison, compare_paired, load_edit_rows
from npinv.bench.reconstruct import run_reconstruct_bench
from npinv.bench.results import markdown_table
from npinv.io import atomic_path
from npinv.model import DEFAULT_SELF_REPLACE

# Reconstruction labels (npinv.bench.reconstruct): method@inversion.
FLOW_RECON_METHODS = ("ddim1", "ddim", "npi", "npi@fixed-point", "npi@anderson", "npi@bdia", "npi@midpoint",
                      "npi@fireflow", "nti", "npi@dec100")
# Rows of the family table: the labels both families run.
FAMILY_METHODS = ("ddim1", "ddim", "npi", "npi@fixed-point", "npi@anderson", "npi@bdia", "nti", "npi@dec100")


@dataclasses.dataclass(frozen=True)
class FlowEditRun:
    """One edit configuration of the flow table: ``label`` names it, the rest are run_edit_shapes's."""

    label: str
    method: str = "npi"
    invert_scheme: str = "ddim"
    blend: bool = True
    controller: str = "replace"
    guidance: float | None = None  # None: the model's recommended editing guidance
    self_replace: float = DEFAULT_SELF_REPLACE

    def folder(self, w: float) -> str:
        sr = "" if self.self_replace == DEFAULT_SELF_REPLACE else f"_sr{self.self_replace:g}"
        return f"flow_edit_{self.label.replace(' ', '_').replace('+', '')}_w{w:g}{sr}"


def flow_edit_runs(flowedit_guidances: tuple[float, ...],
                   self_replace: float = DEFAULT_SELF_REPLACE) -> tuple[FlowEditRun, ...]:
    """The edit table's runs; ``self_replace``: the model card's recommended share, run beside npinv's default."""
    tuned = (() if self_replace == DEFAULT_SELF_REPLACE else
             (FlowEditRun(f"npi + word swap + blend, self-replace {self_replace:g}", self_replace=self_replace),))
    return (
        FlowEditRun("npi + word swap + blend"),
        *tuned,
        FlowEditRun("npi + word swap", blend=False),
        FlowEditRun("npi + word swap + blend", invert_scheme="fixed-point"),
        FlowEditRun("npi + word swap + blend", invert_scheme="midpoint"),
        FlowEditRun("npi + word swap + blend", invert_scheme="fireflow"),
        *(FlowEditRun("flowedit", method="flowedit", blend=False, controller="none", guidance=w)
          for w in flowedit_guidances),
    )


def run_flow_reconstruct(model, out: Path, *, shapes: int, steps_list: list[int]) -> dict:
    return run_reconstruct_bench(model, out, shapes=shapes, steps_list=steps_list, methods=FLOW_RECON_METHODS)


def run_flow_edits(model, out: Path, *, n_scenes: int, steps: int, flowedit_guidances: tuple[float, ...],
                   self_replace: float = DEFAULT_SELF_REPLACE) -> dict:
    """Every run of :func:`flow_edit_runs` on the same cases, and each against the first, case by case."""
    rec_w = model.edit_guidance
    runs = []
    for run in flow_edit_runs(flowedit_guidances, self_replace):
        w = rec_w if run.guidance is None else run.guidance
        folder = out / f"{run.folder(w)}_{run.invert_scheme}_s{steps}"
        summary = run_edit_shapes(model, folder, n_scenes=n_scenes, methods=(run.method,), directs=(False,),
                                  controllers=(run.controller,), guidances=(w,), steps=steps, blend=run.blend,
                                  invert_scheme=run.invert_scheme, self_replace=run.self_replace)
        runs.append((run, w, folder, summary["rows"][0]))
    base_run, _, base_folder, _ = runs[0]
    base_rows = load_edit_rows(base_folder)
    paired = [compare_paired(base_rows, load_edit_rows(folder), fields=EDIT_CASE,
                             names=(_name(base_run), _name(run, w)))
              for run, w, folder, _ in runs[1:]]
    return {"steps": steps, "n_cases": 3 * n_scenes, "guidance": rec_w,
            "rows": [{"label": run.label, "method": run.method, "inversion": _inversion(run), "blend": run.blend,
                      "guidance": w, **_costs(row), "summary": row} for run, w, _, row in runs],
            "paired": [dataclasses.asdict(c) for c in paired]}


def _inversion(run: FlowEditRun) -> str:
    if run.method == "flowedit":
        return "none"
    return "euler" if run.invert_scheme == "ddim" else run.invert_scheme


def _name(run: FlowEditRun, w: float | None = None) -> str:
    name = run.label if run.method == "flowedit" else f"{run.label} ({_inversion(run)})"
    return name if w is None or run.method != "flowedit" else f"{name} w {w:g}"


def _costs(row: dict) -> dict:
    """Model calls and rows per edit, the inversion's included where the method needs one (each inversion
    call runs one row); FlowEdit inverts nothing."""
    invert = 0.0 if row["method"] == "flowedit" else row["invert_unet_calls_mean"]
    return {"calls": row["unet_calls_mean"] + invert, "rows": row["unet_rows_mean"] + invert,
            "invert_calls": invert}


def flow_recon_table(summary: dict) -> str:
    """PSNR (model calls) per method and step count, with the VAE round trip as the ceiling."""
    rows = summary["rows"]
    steps = sorted({r["steps"] for r in rows})
    methods = list(dict.fromkeys(r["method"] for r in rows))
    by = {(r["method"], r["steps"]): r for r in rows}
    ceiling = [f"{by[(methods[0], s)]['vae_psnr_mean']:.2f}" if (methods[0], s) in by else "" for s in steps]
    body = [["VAE round trip (ceiling)", *ceiling, "", ""]]
    for m in methods:
        cells = [f"{by[(m, s)]['psnr_mean']:.2f} ({by[(m, s)]['unet_calls_mean']:.0f})" if (m, s) in by else ""
                 for s in steps]
        last = by.get((m, steps[-1]))
        body.append([m, *cells, "" if last is None else f"{last['seconds_median']:.2f}",
                     "" if last is None else f"{last['vae_psnr_mean'] - last['psnr_mean']:.2f}"])
    header = ["method", *(f"{s} steps: PSNR (calls)" for s in steps), f"s at {steps[-1]} (median)",
              f"VAE - PSNR at {steps[-1]}"]
    return markdown_table(header, body)


def same_calls_table(summary: dict, budgets: tuple[int, ...] = (10, 20, 40, 100)) -> str:
    """Each method's best PSNR within a budget of model calls per image (inversion + reconstruction)."""
    rows = summary["rows"]
    methods = list(dict.fromkeys(r["method"] for r in rows))
    body = []
    for m in methods:
        cells = []
        for b in budgets:
            fits = [r for r in rows if r["method"] == m and r["unet_calls_mean"] <= b]
            best = max(fits, key=lambda r: r["psnr_mean"], default=None)
            cells.append("" if best is None else f"{best['psnr_mean']:.2f} ({best['steps']} steps)")
        body.append([m, *cells])
    return markdown_table(["method", *(f"<= {b} calls" for b in budgets)], body)


def family_table(unet: dict, flow: dict, steps_list: tuple[int, ...]) -> str:
    """The UNet model's and the flow model's rows for the labels both run, on the same held-out scenes."""
    body = []
    for family, summary in (("unet (npinv-shapes-64)", unet), ("flow (npinv-shapes-flow-64)", flow)):
        by = {(r["method"], r["steps"]): r for r in summary["rows"]}
        for s in steps_list:
            first = next((by[(m, s)] for m in FAMILY_METHODS if (m, s) in by), None)
            if first is None:
                continue
            body.append([family, s, "VAE round trip", first["vae_psnr_mean"], 0, math.nan])
            for m in FAMILY_METHODS:
                if (m, s) in by:
                    r = by[(m, s)]
                    body.append([family, s, m, r["psnr_mean"], r["unet_calls_mean"], r["seconds_median"]])
    return markdown_table(["family", "steps", "method", "PSNR", "model calls", "seconds (median)"], body)


def flow_edit_table(edits: dict) -> str:
    header = ["edit", "inversion", "w", "n", "success", "colour ok", "shape ok", "bg ok", "bg PSNR",
              "bg PSNR (successes)", "PSNR vs truth", "model calls", "model rows", "edit s (median)"]
    body = []
    for r in edits["rows"]:
        s = r["summary"]
        body.append([r["label"], r["inversion"], r["guidance"], s["n"], f"{s['all']['success']:.0%}",
                     f"{s['color']['success']:.0%}", f"{s['shape']['success']:.0%}",
                     f"{s['background']['success']:.0%}", s["all"]["psnr_bg"], s["all"]["psnr_bg_ok"],
                     s["all"]["psnr_gt"], r["calls"], r["rows"], s["seconds_median"]])
    return markdown_table(header, body)


def flow_paired_table(edits: dict) -> str:
    header = ["edit", "against", "cases (scenes)", "both succeed", "only the baseline", "only this one", "McNemar p",
              "success difference (95% CI)", "bg PSNR difference, dB (95% CI)"]
    body = []
    for c in (PairedComparison(**{**p, "success_ci": tuple(p["success_ci"]), "bg_ci": tuple(p["bg_ci"])})
              for p in edits["paired"]):
        body.append([c.other, c.base, f"{c.n} ({c.scenes})", c.both_ok, c.base_only, c.other_only,
                     f"{c.mcnemar_p:.2g}",
                     f"{c.success_diff:+.1%} ({c.success_ci[0]:+.1%} to {c.success_ci[1]:+.1%})",
                     f"{c.bg_diff:+.2f} ({c.bg_ci[0]:+.2f} to {c.bg_ci[1]:+.2f})"])
    return markdown_table(header, body)


def plot_calls(summary: dict, out: Path) -> Path | None:
    """PSNR against model calls per image, one line per method, the VAE ceiling dashed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    rows = summary["rows"]
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for m in dict.fromkeys(r["method"] for r in rows):
        mine = sorted((r for r in rows if r["method"] == m), key=lambda r: r["unet_calls_mean"])
        ax.plot([r["unet_calls_mean"] for r in mine], [r["psnr_mean"] for r in mine], marker="o", label=m)
    ceiling = max(r["vae_psnr_mean"] for r in rows)
    ax.axhline(ceiling, ls="--", color="k", lw=1, label="VAE round trip")
    ax.set_xscale("log")
    ax.set_xlabel("model calls per image (inversion + reconstruction)")
    ax.set_ylabel("PSNR (dB)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path = out / "psnr_vs_calls.png"
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return path
