"""Benchmark runners: resumable results, summaries and the edit-shapes regions."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from npinv.bench.edit_shapes import EditCase, edit_cases, keep_region, region_psnr, run_edit_shapes
from npinv.bench.paired import compare_paired, load_edit_rows
from npinv.bench.reconstruct import run_reconstruct_bench
from npinv.bench.results import ResultsFile, nanmean
from npinv.errors import NpinvError
from npinv.scenes import Edit, Scene


def test_results_file_resumes_and_drops_a_torn_line(tmp_path):
    path = tmp_path / "r.jsonl"
    res = ResultsFile(path)
    res.add({"key": "a", "v": 1})
    res.add({"key": "b", "v": 2})
    with path.open("a") as fh:
        fh.write('{"key": "c", "v"')  # killed mid-write
    again = ResultsFile(path)
    assert "a" in again and "b" in again and "c" not in again
    assert path.read_text().count("\n") == 2


def test_nanmean_skips_nan_and_none():
    assert nanmean([1.0, math.nan, None, 3.0]) == 2.0
    assert math.isnan(nanmean([math.nan]))


def test_reconstruct_bench_is_resumable(tmp_path, sd_model, monkeypatch):
    import npinv.service as rb

    clean = run_reconstruct_bench(sd_model, tmp_path / "clean", shapes=2, steps_list=(2, 3))
    rows = [json.loads(x) for x in (tmp_path / "clean" / "results.jsonl").read_text().splitlines()]
    assert len(rows) == 2 * 2 * 4
    by = {(r["image"], r["method"], r["steps"]): r for r in rows}
    # NPI reconstructs exactly as the guidance-1 DDIM round trip, at the same cost.
    assert by[("scene000", "npi", 3)]["psnr"] == by[("scene000", "ddim1", 3)]["psnr"]
    assert by[("scene000", "npi", 3)]["unet_calls"] == 6
    assert set(clean["nti_over_npi_time"]) == {"2", "3"}
    assert {"method", "steps", "guidance", "n", "psnr_mean", "ssim_mean", "seconds_mean",
            "unet_calls_mean"} <= clean["rows"][0].keys()
    for name in ("summary.json", "table.md", "psnr_vs_steps.png", "psnr_vs_seconds.png"):
        assert (tmp_path / "clean" / name).is_file()

    # A run killed after 5 rows, then rerun: the same rows as the clean run, none twice.
    real = rb.reconstruct
    count = {"n": 0}

    def dying(*args, **kwargs):
        count["n"] += 1
        if count["n"] > 5:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(rb, "reconstruct", dying)
    with pytest.raises(KeyboardInterrupt):
        run_reconstruct_bench(sd_model, tmp_path / "killed", shapes=2, steps_list=(2, 3))
    assert len((tmp_path / "killed" / "results.jsonl").read_text().splitlines()) == 5
    monkeypatch.setattr(rb, "reconstruct", real)
    run_reconstruct_bench(sd_model, tmp_path / "killed", shapes=2, steps_list=(2, 3))
    resumed = [json.loads(x) for x in (tmp_path / "killed" / "results.jsonl").read_text().splitlines()]
    assert sorted(r["key"] for r in resumed) == sorted(r["key"] for r in rows)
    strip = lambda r: {k: v for k, v in r.items() if "seconds" not in k}  # noqa: E731
    assert sorted(map(json.dumps, map(strip, resumed))) == sorted(map(json.dumps, map(strip, rows)))
    run_reconstruct_bench(sd_model, tmp_path / "killed", shapes=2, steps_list=(2, 3))  # nothing left to do
    assert len((tmp_path / "killed" / "results.jsonl").read_text().splitlines()) == len(rows)


def test_reconstruct_bench_scores_lpips_when_weights_are_given(tmp_path, sd_model, monkeypatch, capsys):
    from npinv.bench.netmetrics import LPIPS_ENV, NetworkMetrics
    from npinv.metrics import tensor_to_unit
    from test_netmetrics import build_lpips

    monkeypatch.delenv(LPIPS_ENV, raising=False)
    summary = run_reconstruct_bench(sd_model, tmp_path / "none", shapes=1, steps_list=(2,), methods=("npi",))
    assert "LPIPS not computed" in capsys.readouterr().out
    assert math.isnan(summary["rows"][0]["lpips_mean"])

    weights = build_lpips(tmp_path / "lpips.safetensors")
    summary = run_reconstruct_bench(sd_model, tmp_path / "with", shapes=1, steps_list=(2,), methods=("ddim1", "ddim"),
                                    lpips=weights)
    rows = {r["method"]: r for r in map(json.loads, (tmp_path / "with" / "results.jsonl").read_text().splitlines())}
    assert rows["ddim"]["lpips"] > 0 and summary["rows"][1]["lpips_mean"] == rows["ddim"]["lpips"]
    # The stored figure is LPIPS of the prepared input against the reconstruction, whole image.
    from npinv.bench.reconstruct import image_items
    from npinv.inversion import ddim_inversion
    from npinv.methods import reconstruct

    _, load, prompt = image_items(sd_model, None, 1)[0]
    image = load().image
    rec = reconstruct(sd_model, ddim_inversion(sd_model, image, prompt, steps=2), "ddim", 7.5)
    nets = NetworkMetrics.load(structure=False, lpips=weights, clip=False, device="cpu")
    a, b = tensor_to_unit(image), tensor_to_unit(rec.image)
    assert rows["ddim"]["lpips"] == pytest.approx(nets.lpips_distance(a, b, np.zeros(a.shape[:2], bool)), rel=1e-5)
    assert "LPIPS" in (tmp_path / "with" / "table.md").read_text()


def test_keep_regions():
    scene = Scene("circle", "red", "blue", 0.4)
    colour = keep_region(EditCase(0, scene, Edit("color", "green")), 64)
    assert colour[0, 0] and not colour[32, 32]  # the corner stays, the object changes
    background = keep_region(EditCase(0, scene, Edit("background", "white")), 64)
    assert background[32, 32] and not background[0, 0]
    a = np.zeros((4, 4, 3))
    b = a.copy()
    b[0, 0] = 0.1
    region = np.zeros((4, 4), bool)
    region[0, 0] = True
    assert region_psnr(a, b, region) == pytest.approx(20.0)
    assert math.isnan(region_psnr(a, b, np.zeros((4, 4), bool)))


def test_edit_cases_cover_every_kind():
    cases = edit_cases(4)
    assert len(cases) == 12 and {c.edit.kind for c in cases} == {"color", "shape", "background"}
    for c in cases:
        assert c.target != c.scene and c.target.caption.count(" ") == c.scene.caption.count(" ")


def test_edit_shapes_runs_and_resumes(tmp_path, sd_model):
    summary = run_edit_shapes(sd_model, tmp_path, n_scenes=1, methods=("npi", "ddim"), directs=(False,), steps=3)
    rows = (tmp_path / "edit_results.jsonl").read_text().splitlines()
    assert len(rows) == 2 * 3
    first = summary["rows"][0]
    assert {"all", "color", "shape", "background", "seconds_median", "unet_rows_mean"} <= first.keys()
    npi = next(r for r in summary["rows"] if r["method"] == "npi")
    assert npi["unet_rows_mean"] == 3 * 3  # 3 rows a step
    run_edit_shapes(sd_model, tmp_path, n_scenes=1, methods=("npi", "ddim"), directs=(False,), steps=3)
    assert (tmp_path / "edit_results.jsonl").read_text().splitlines() == rows
    assert all(0 <= json.loads(r)["blend_iou"] <= 1 for r in rows)
    assert {json.loads(r)["blend_maps"] for r in rows} == {"16x16"}  # the toy model's finest maps are 16x16


def test_edit_shapes_runs_pair_case_by_case(tmp_path, sd_model):
    """Two inversions' edit runs on the same scene compare swap by swap (benchmarks/run.py's paired table)."""
    for scheme in ("ddim", "bdia"):
        run_edit_shapes(sd_model, tmp_path / scheme, n_scenes=1, methods=("npi",), directs=(False,), steps=3,
                        invert_scheme=scheme)
    c = compare_paired(load_edit_rows(tmp_path / "ddim"), load_edit_rows(tmp_path / "bdia"))
    assert (c.base, c.other, c.steps, c.n, c.scenes) == ("ddim", "bdia", 3, 3, 1)
    assert c.both_ok + c.base_only + c.other_only <= 3


def test_edit_shapes_optimises_nti_once_per_guidance_and_reports_the_edit_alone(tmp_path, sd_model, monkeypatch):
    """NTI's negatives are optimised once per scene and guidance (kept in the scene's inversion cache);
    each NTI row's UNet calls and rows are the edit's alone, and its invert_seconds carry the optimisation."""
    import npinv.methods

    real = npinv.methods.reconstruct
    optimised = []

    def counting(model, inv, method, guidance=7.5, **kwargs):
        optimised.append(guidance)
        return real(model, inv, method, guidance, **kwargs)

    monkeypatch.setattr(npinv.methods, "reconstruct", counting)
    run_edit_shapes(sd_model, tmp_path, n_scenes=1, methods=("nti", "npi"), directs=(False, True),
                    guidances=(2.0, 7.5), steps=2)
    assert sorted(optimised) == [2.0, 7.5]
    rows = [json.loads(x) for x in (tmp_path / "edit_results.jsonl").read_text().splitlines()]
    assert len(rows) == 3 * 2 * 2 * 2
    nti = [r for r in rows if r["method"] == "nti"]
    npi = [r for r in rows if r["method"] == "npi"]
    assert {(r["unet_calls"], r["unet_rows"]) for r in nti} == {(2, 2 * 4)}  # source and target: 2 rows each a step
    assert {(r["unet_calls"], r["unet_rows"]) for r in npi} == {(2, 2 * 3)}
    for w in (2.0, 7.5):
        assert len({r["invert_seconds"] for r in nti if r["guidance"] == w}) == 1
        assert min(r["invert_seconds"] for r in nti if r["guidance"] == w) > max(r["invert_seconds"] for r in npi)
    with pytest.raises(NpinvError, match="^unknown method 'magic'"):
        run_edit_shapes(sd_model, tmp_path / "bad", methods=("magic",))
    assert not (tmp_path / "bad").exists()


def test_reconstruct_bench_methods_come_from_the_registry(tmp_path):
    from npinv.bench.reconstruct import method_labels, reconstruct_settings
    from npinv.methods import method_names
    from npinv.settings import ReconstructSettings

    assert method_labels() == ("ddim1", *method_names())
    assert reconstruct_settings("ddim1", 7.5) == ReconstructSettings("ddim", 1.0)  # DDIM's round trip at w = 1
    assert reconstruct_settings("nti", 3.0) == ReconstructSettings("nti", 3.0)
    with pytest.raises(NpinvError, match=r"^unknown benchmark method 'magic'; choose from ddim1, npi, "):
        run_reconstruct_bench(None, tmp_path / "x", methods=("ddim1", "magic"))
    assert not (tmp_path / "x").exists()


def test_edit_rows_name_an_inversion_by_its_settings():
    """An inversion's label names what makes it another inversion: BDIA's damping factor, an iterating
    scheme's tolerance; the defaults and settings a scheme ignores leave the bare name."""
    from npinv.bench.edit_shapes import inversion_label
    from npinv.settings import DEFAULT_INVERT_TOL

    assert inversion_label("ddim") == "ddim" and inversion_label("bdia", 1.0) == "bdia"
    assert inversion_label("bdia", 0.9) == "bdia-g0.9" and inversion_label("bdia", 1.0, 0.01) == "bdia"
    assert inversion_label("anderson", invert_tol=0.01) == "anderson-tol0.01"
    assert inversion_label("fixed-point", invert_tol=DEFAULT_INVERT_TOL) == "fixed-point"
    assert inversion_label("ddim", invert_tol=0.1) == "ddim"


def test_reconstruct_bench_labels_name_the_inversion():
    from npinv.bench.reconstruct import inversion_tag

    assert inversion_tag("") == {}
    assert inversion_tag("anderson+dec100") == {"invert_scheme": "anderson", "decoder_steps": 100}
    assert inversion_tag("bdia+g0.9") == {"invert_scheme": "bdia", "bdia_gamma": 0.9}
    with pytest.raises(NpinvError, match="unknown inversion scheme 'g2'"):
        inversion_tag("bdia+g2")


def test_edit_shapes_compares_blend_map_sizes(tmp_path, sd_model):
    summary = run_edit_shapes(sd_model, tmp_path, n_scenes=1, methods=("npi",), directs=(False,), steps=2,
                              blend_sizes=(None, 8))
    assert sorted(r["blend_maps"] for r in summary["rows"]) == ["16x16", "8x8"]
    assert all(0 <= r["all"]["blend_iou"] <= 1 for r in summary["rows"])


def test_blend_iou_against_the_edited_region():
    from npinv.bench.edit_shapes import edited_region, mask_iou

    case = EditCase(0, Scene("square", "red", "blue", 0.5), Edit("color", "green"))
    region = edited_region(case, 64)
    assert region.sum() == 32 * 32  # the square, before and after
    mask = torch.zeros(16, 16)
    mask[4:12, 4:12] = 1  # the same square at latent resolution
    assert mask_iou(mask, region) == 1.0
    assert mask_iou(torch.ones(16, 16), region) == 0.25
    background = EditCase(0, Scene("square", "red", "blue", 0.5), Edit("background", "green"))
    assert edited_region(background, 64).sum() == 64 * 64 - 32 * 32


def test_reconstruct_bench_shards_merge_to_the_one_process_result(tmp_path, sd_model):
    """Two shards (as two accelerate processes would run them) each take every other image, write
    their own part, and the merge equals a one-process run; a shard's rerun does nothing."""
    from npinv.parallel import Shard

    one = run_reconstruct_bench(sd_model, tmp_path / "one", shapes=3, steps_list=(2,), methods=("ddim1", "npi"))
    run_reconstruct_bench(sd_model, tmp_path / "two", shapes=3, steps_list=(2,), methods=("ddim1", "npi"),
                          shard=Shard(1, 2))
    part = [json.loads(x) for x in (tmp_path / "two" / "results.jsonl").read_text().splitlines()]
    assert sorted({r["image"] for r in part}) == ["scene001"]  # rank 1 of 2: the second image only
    two = run_reconstruct_bench(sd_model, tmp_path / "two", shapes=3, steps_list=(2,), methods=("ddim1", "npi"),
                                shard=Shard(0, 2))
    assert not list((tmp_path / "two").glob("results.part*"))
    rows = {p: sorted((json.loads(x) for x in (tmp_path / p / "results.jsonl").read_text().splitlines()),
                      key=lambda r: r["key"]) for p in ("one", "two")}
    strip = lambda r: {k: v for k, v in r.items() if "seconds" not in k}  # noqa: E731
    assert [strip(r) for r in rows["one"]] == [strip(r) for r in rows["two"]]
    assert [(r["method"], r["n"], r["psnr_mean"]) for r in one["rows"]] == \
        [(r["method"], r["n"], r["psnr_mean"]) for r in two["rows"]]


@pytest.mark.parametrize("shapes", ["0", "-3"])
def test_reconstruct_bench_refuses_no_scenes(tmp_path, capsys, shapes):
    """--shapes 0 ran the default 8 scenes (``shapes or 8``); None is the default, 0 or less an error."""
    from npinv.cli import main

    code = main(["--quiet", "bench", "reconstruct", "--shapes", shapes, "--steps", "2", "--out", str(tmp_path / "b")])
    err = capsys.readouterr().err
    assert code == 2 and err.strip() == f"npinv: error: --shapes must be at least 1, got {shapes}"
    assert not (tmp_path / "b").exists()
    from npinv.bench.reconstruct import image_items

    with pytest.raises(NpinvError, match="--shapes must be at least 1"):
        image_items(None, None, 0)  # the library refuses too


def test_a_results_folder_refuses_another_models_rows(tmp_path, sd_model, sd_v_folder):
    """Rerunning a bench on other weights re-measures instead of reporting the old model's rows."""
    from npinv import load_model
    from npinv.errors import NpinvError

    run_reconstruct_bench(sd_model, tmp_path / "r", shapes=1, steps_list=(2,), methods=("npi",))
    other = load_model(str(sd_v_folder), device="cpu")
    with pytest.raises(NpinvError, match="holds results of another model"):
        run_reconstruct_bench(other, tmp_path / "r", shapes=1, steps_list=(2,), methods=("npi",))
    with pytest.raises(NpinvError, match="holds results of another model"):
        run_edit_shapes(other, tmp_path / "r", n_scenes=1, methods=("npi",), directs=(False,), steps=2)
    (tmp_path / "r" / "model.json").unlink()  # rows from before the record existed
    with pytest.raises(NpinvError, match="unrecorded model"):
        run_reconstruct_bench(sd_model, tmp_path / "r", shapes=1, steps_list=(2,), methods=("npi",))
    run_reconstruct_bench(other, tmp_path / "fresh", shapes=1, steps_list=(2,), methods=("npi",))


def test_make_bench_measures_afresh_and_touches_nothing_else(tmp_path):
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("bench_run", Path(__file__).parent.parent / "benchmarks" / "run.py")
    run = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(run)
    for name in ("reconstruct", "edit_exact_bdia", "throughput/batch1", "mine"):
        (tmp_path / name).mkdir(parents=True)
        (tmp_path / name / "results.jsonl").write_text("{}\n")
    (tmp_path / "benchmarks.json").write_text("{}")
    (tmp_path / "notes.txt").write_text("keep")
    run.clear_outputs(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine", "notes.txt"]


@pytest.mark.parametrize("bench", ["reconstruct", "edit-shapes"])
def test_a_bench_folder_in_use_is_refused_naming_the_holder(tmp_path, sd_model, bench):
    """Two runs appending to one results folder would interleave their rows: the second is refused."""
    from locks import lock_holder
    from npinv.errors import NpinvError

    out = tmp_path / "out"
    holder = lock_holder(out)
    try:
        with pytest.raises(NpinvError, match=f"pid {holder.pid}@"):
            if bench == "reconstruct":
                run_reconstruct_bench(sd_model, out, shapes=1, steps_list=(2,), methods=("npi",))
            else:
                run_edit_shapes(sd_model, out, n_scenes=1, methods=("npi",), directs=(False,), steps=2)
        assert not any(out.glob("*.jsonl"))  # refused before any row
    finally:
        holder.stdin.close()
        holder.wait(timeout=60)
    run_reconstruct_bench(sd_model, out, shapes=1, steps_list=(2,), methods=("npi",))  # free again
    assert not (out / ".npinv.lock").exists()


def test_attention_timing_compares_the_two_paths_on_the_same_edits(tmp_path, sd_model):
    from npinv.bench.attention_timing import attention_timing_table, run_attention_timing

    summary = run_attention_timing(sd_model, tmp_path / "attn", n_scenes=2, steps=3, repeats=2)
    assert [r["scene"] for r in summary["rows"]] == [0, 1] and summary["max_pixel_difference"] < 0.5
    assert all(r["fused_over_explicit"] == r["fused_seconds"] / r["explicit_seconds"] for r in summary["rows"])
    assert json.loads((tmp_path / "attn" / "summary.json").read_text())["n_scenes"] == 2
    assert "| fused (the default) |" in attention_timing_table(summary)
