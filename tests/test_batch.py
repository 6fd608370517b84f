"""npinv edit-batch: manifest checks, resume after a kill, sharing inversions, batching, and
several processes under accelerate giving what one process gives."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from locks import lock_holder
from npinv.cli import main
from npinv.scenes import Scene

STEPS = "3"
SCENES = [("circle", "red", "blue"), ("square", "red", "yellow"), ("circle", "green", "blue"),
          ("square", "green", "yellow")]


def caption(shape, colour, bg):
    return f"a {colour} {shape} on a {bg} background"


@pytest.fixture
def manifest(tmp_path) -> Path:
    """Four images, five rows: one image edited under two settings, one row with two targets."""
    folder = tmp_path / "data"
    folder.mkdir()
    rows = []
    for n, (shape, colour, bg) in enumerate(SCENES):
        Scene(shape, colour, bg, 0.5).render(32).save(folder / f"img{n}.png")
        other = "yellow" if colour == "red" else "red"
        rows.append({"image": f"img{n}.png", "source": caption(shape, colour, bg),
                     "targets": [caption(shape, other, bg)] + ([caption("square", colour, bg)] if n == 0 else [])})
    rows.append({"image": "img0.png", "source": caption(*SCENES[0]), "target": caption("circle", "yellow", "blue"),
                 "controller": "replace", "blend": ["red", "yellow"], "guidance": 3.0})
    path = folder / "manifest.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main(["--quiet", *(str(a) for a in argv)])
    out, err = capsys.readouterr()
    return code, out, err


def results(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "results.jsonl").read_text().splitlines()]


def stable(rows: list[dict]) -> list[dict]:
    """A results row without what depends on the run (timings, rank, batch size and the UNet work it shared)."""
    drop = {"seconds", "invert_seconds", "edit_seconds", "rank", "batch_images", "unet_calls", "unet_rows"}
    return [{k: v for k, v in r.items() if k not in drop} for r in rows]


def pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)


def test_edit_batch_writes_every_edit_and_reruns_do_nothing(tmp_path, manifest, sd_folder, capsys):
    out = tmp_path / "out"
    code, stdout, err = run(capsys, "edit-batch", manifest, "--out", out, "--model", sd_folder, "--steps", STEPS,
                            "--guidance", "2.5", "--json")
    assert code == 0, err
    report = json.loads(stdout)
    assert report["edits"] == report["done_now"] == 6 and report["done_before"] == 0
    assert report["images_per_minute"] == pytest.approx(60 * 6 / report["seconds"])
    rows = results(out)
    assert [(r["line"], r["target_index"]) for r in rows] == [(1, 0), (1, 1), (2, 0), (3, 0), (4, 0), (5, 0)]
    assert {"image", "target", "output", "seconds"} <= rows[0].keys()
    for r in rows:
        assert Image.open(r["output"]).size == (32, 32)
    assert rows[-1]["controller"] == "replace" and rows[-1]["guidance"] == 3.0 and rows[0]["guidance"] == 2.5
    # Rows 1 and 5 share an inversion: four inversions and, with NPI, five edit calls (one per image
    # and setting) of 3 steps each: (4 + 5) * 3 UNet calls.
    assert report["unet_calls"] == (4 + 5) * int(STEPS)
    code, stdout, _ = run(capsys, "edit-batch", manifest, "--out", out, "--model", sd_folder, "--steps", STEPS,
                          "--guidance", "2.5", "--json")
    again = json.loads(stdout)
    assert code == 0 and again["done_now"] == 0 and again["done_before"] == 6 and again["unet_calls"] == 0
    assert again["images_per_minute"] is None  # nothing made
    assert results(out) == rows


def test_batch_size_shares_unet_calls_and_keeps_results(tmp_path, manifest, sd_folder, capsys):
    one, two = tmp_path / "one", tmp_path / "two"
    for out, size in ((one, "1"), (two, "4")):
        code, stdout, err = run(capsys, "edit-batch", manifest, "--out", out, "--model", sd_folder, "--steps", STEPS,
                                "--guidance", "2.5", "--batch-size", size, "--json")
        assert code == 0, err
        if out == two:
            # One batched inversion of all four images and two edit calls (the two settings).
            assert json.loads(stdout)["unet_calls"] == (1 + 2) * int(STEPS)
    assert stable(results(one)) == stable([{**r, "output": r["output"].replace(str(two), str(one))}
                                           for r in results(two)])
    assert max(r["batch_images"] for r in results(two)) == 4
    for r in results(one):
        a, b = pixels(r["output"]), pixels(r["output"].replace(str(one), str(two)))
        assert np.abs(a - b).max() <= 1  # float rounding of a larger batch at most


@pytest.mark.parametrize("line, message", [
    ('{"image": "img0.png", "source": "a", "target": "b"', "manifest.jsonl:2: not valid JSON"),
    ('{"image": "img0.png", "target": "b"}', "manifest.jsonl:2: 'source' must be a non-empty string"),
    ('{"image": "img0.png", "source": "a"}', "manifest.jsonl:2: give 'targets' (a list) or 'target'"),
    ('{"image": "img0.png", "source": "a", "targets": []}', "manifest.jsonl:2: 'targets' must be a non-empty list"),
    ('{"image": "img0.png", "source": "a", "target": "b", "colour": 1}', "manifest.jsonl:2: unknown key 'colour'"),
    ('{"image": "img0.png", "source": "a", "target": "b", "steps": 0}',
     "manifest.jsonl:2: steps must be a whole number in 1..1000, got 0"),
    ('{"image": "img0.png", "source": "a", "target": "b", "method": "x"}',
     "manifest.jsonl:2: method must be one of npi, proxnpi, proxnpi-noig, nti, ddim, flowedit, got 'x'"),
    ('{"image": "img0.png", "source": "a", "target": "b", "self_replace": [0.8, 0.2]}', "manifest.jsonl:2: self-replace"),
    ('{"image": "img0.png", "source": "a", "target": "b", "cross_replace": [0.8, 0.2]}', "manifest.jsonl:2: cross-replace"),
    ('{"image": "img0.png", "source": "a", "target": "b", "blend_start": 2}',
     "manifest.jsonl:2: blend-start must be a number in 0..1, got 2"),
    ('{"image": "img0.png", "source": "a", "target": "b", "blend_res": 0}',
     "manifest.jsonl:2: blend-res must be a whole number in 1..4096 (or none), got 0"),
    ('{"image": "img0.png", "source": "a", "target": "b", "self_replace_size": 0}',
     "manifest.jsonl:2: self-replace-size must be a number in (0, 1], got 0"),
    ('{"image": "nope.png", "source": "a", "target": "b"}', "manifest.jsonl:2: no such file"),
    ('{"image": "bad.png", "source": "a", "target": "b"}', "not an image file Pillow can read"),
    ('["img0.png", "a", "b"]', "manifest.jsonl:2: a row must be a JSON object"),
])
def test_bad_manifest_rows_stop_everything(tmp_path, sd_folder, capsys, line, message):
    Scene("circle", "red", "blue", 0.5).render(32).save(tmp_path / "img0.png")
    (tmp_path / "bad.png").write_text("not a png")
    manifest = tmp_path / "manifest.jsonl"
    good = '{"image": "img0.png", "source": "a red circle on a blue background", "target": "a red square on a blue background"}'
    manifest.write_text(good + "\n" + line + "\n" + good + "\n")
    before = manifest.read_bytes()
    code, stdout, err = run(capsys, "edit-batch", manifest, "--out", tmp_path / "out", "--model", sd_folder)
    assert code == 2 and stdout == ""
    assert len(err.strip().splitlines()) == 1 and "manifest.jsonl:2: " in err and message in err, err
    assert not (tmp_path / "out").exists() and manifest.read_bytes() == before


def test_word_errors_name_the_line_before_any_model_work(tmp_path, manifest, sd_folder, capsys):
    rows = manifest.read_text().splitlines()
    bad = json.loads(rows[1]) | {"blend": ["purple", "yellow"]}
    manifest.write_text("\n".join([rows[0], json.dumps(bad)] + rows[2:]) + "\n")
    code, _, err = run(capsys, "edit-batch", manifest, "--out", tmp_path / "out", "--model", sd_folder)
    assert code == 2 and "line 2:" in err and "purple" in err
    assert not (tmp_path / "out").exists()


def test_csv_manifest_rows_share_an_inversion(tmp_path, sd_folder, capsys):
    Scene("circle", "red", "blue", 0.5).render(32).save(tmp_path / "img0.png")
    src = caption("circle", "red", "blue")
    (tmp_path / "m.csv").write_text("image,source,target,guidance\n"
                                    f"img0.png,{src},{caption('circle', 'green', 'blue')},2\n"
                                    f"img0.png,{src},{caption('square', 'red', 'blue')},2\n")
    code, stdout, err = run(capsys, "edit-batch", tmp_path / "m.csv", "--out", tmp_path / "out", "--model", sd_folder,
                            "--steps", STEPS, "--json")
    assert code == 0, err
    # One inversion and one edit call carrying both targets.
    assert json.loads(stdout)["unet_calls"] == 2 * int(STEPS)
    assert [r["guidance"] for r in results(tmp_path / "out")] == [2.0, 2.0]
    (tmp_path / "bad.csv").write_text("image,source,target\nimg0.png,a,b,extra\n")
    code, _, err = run(capsys, "edit-batch", tmp_path / "bad.csv", "--out", tmp_path / "o2", "--model", sd_folder)
    assert code == 2 and "bad.csv:2: more cells than columns" in err


def test_a_rows_per_word_cross_replace_keeps_the_runs_cross_replace(tmp_path, sd_folder, capsys):
    """A row's per-word window (either spelling) over the run's --cross-replace for every other word:
    the same pixels as `npinv edit` with both flags, not the schema's 0.8."""
    image = tmp_path / "img0.png"
    Scene("circle", "red", "blue", 0.5).render(32).save(image)
    src, tgt = caption("circle", "red", "blue"), caption("square", "red", "blue")

    def batch(window: dict) -> np.ndarray:  # one row a run: an edit call of its own, as `npinv edit` makes
        name = next(iter(window))
        (tmp_path / f"{name}.jsonl").write_text(json.dumps({"image": "img0.png", "source": src, "target": tgt,
                                                            **window}) + "\n")
        code, _, err = run(capsys, "edit-batch", tmp_path / f"{name}.jsonl", "--out", tmp_path / name,
                           "--model", sd_folder, "--steps", STEPS, "--guidance", "2.5", "--cross-replace", "0.2")
        assert code == 0, err
        return pixels(results(tmp_path / name)[0]["output"])

    def single(window: str) -> np.ndarray:
        out = tmp_path / f"single-{window}.png"
        code, _, err = run(capsys, "edit", image, "--source", src, "--target", tgt, "--model", sd_folder,
                           "--steps", STEPS, "--guidance", "2.5", "--cross-replace", window,
                           "--cross-replace-word", "square=0.5", "--out", out)
        assert code == 0, err
        return pixels(out)

    expected = single("0.2")
    assert np.array_equal(batch({"cross_replace": {"square": 0.5}}), expected)
    assert np.array_equal(batch({"cross_replace_words": {"square": 0.5}}), expected)
    assert not np.array_equal(single("0.8"), expected)  # the window tells


def test_a_changed_manifest_is_not_mixed_into_old_results(tmp_path, manifest, sd_folder, capsys):
    out = tmp_path / "out"
    assert run(capsys, "edit-batch", manifest, "--out", out, "--model", sd_folder, "--steps", STEPS)[0] == 0
    rows = manifest.read_text().splitlines()
    changed = json.loads(rows[2]) | {"guidance": 4.0}
    manifest.write_text("\n".join(rows[:2] + [json.dumps(changed)] + rows[3:]) + "\n")
    code, _, err = run(capsys, "edit-batch", manifest, "--out", out, "--model", sd_folder, "--steps", STEPS)
    assert code == 2 and "line 3 changed" in err


def _cli(*argv):
    return [sys.executable, "-m", "npinv", *map(str, argv)]


def test_killed_run_resumes_to_the_clean_result(tmp_path, manifest, sd_folder):
    """A subprocess killed (SIGKILL) after its first finished edit, then rerun, ends with the same
    results and images as one clean run, each edit once."""
    args = ["--quiet", "edit-batch", manifest, "--model", sd_folder, "--steps", "12"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(_cli(*args, "--out", tmp_path / "clean"), check=True, env=env, capture_output=True)
    killed = tmp_path / "killed"
    proc = subprocess.Popen(_cli(*args, "--out", killed), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if (killed / "results.jsonl").is_file() and (killed / "results.jsonl").read_text().count("\n") >= 1:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.01)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    partial = results(killed)
    assert 1 <= len(partial) < 6
    # SIGKILL may land mid-write and leave a temporary file (never a partial output): the rerun removes it.
    pending = [r for r in results(tmp_path / "clean") if r["key"] not in {p["key"] for p in partial}]
    Path(pending[0]["output"].replace(str(tmp_path / "clean"), str(killed))).parent.joinpath(
        f".{Path(pending[0]['output']).name}.x1y2z3.tmp").write_bytes(b"half a png")
    subprocess.run(_cli(*args, "--out", killed), check=True, env=env, capture_output=True)
    assert not list(killed.rglob(".*.tmp"))  # no temporary files left
    clean_rows, resumed = results(tmp_path / "clean"), results(killed)
    assert len({r["key"] for r in resumed}) == len(resumed) == 6
    # Each edit was done once: rows recorded before the kill come back unchanged (their timings too).
    by_key = {r["key"]: r for r in resumed}
    assert all(by_key[p["key"]] == p for p in partial)
    strip = lambda rows, root: [{**r, "output": r["output"].replace(str(root), "")} for r in stable(rows)]  # noqa: E731
    assert strip(resumed, killed) == strip(clean_rows, tmp_path / "clean")
    for r in clean_rows:
        assert np.array_equal(pixels(r["output"]), pixels(r["output"].replace(str(tmp_path / "clean"), str(killed))))


@pytest.mark.skipif(shutil.which("accelerate", path=os.path.dirname(sys.executable)) is None,
                    reason="accelerate is not installed")
def test_two_processes_under_accelerate_equal_one(tmp_path, manifest, sd_folder):
    """accelerate launch with 2 CPU processes (gloo): each takes every other source image, writes its
    own part, and the merged results and images equal a one-process run's."""
    args = ["--quiet", "edit-batch", manifest, "--model", sd_folder, "--steps", STEPS, "--guidance", "2.5"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(_cli(*args, "--out", tmp_path / "one"), check=True, env=env, capture_output=True)
    accelerate = Path(sys.executable).parent / "accelerate"
    proc = subprocess.run([str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                           "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "npinv", *map(str, args),
                           "--out", str(tmp_path / "two")], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    one, two = results(tmp_path / "one"), results(tmp_path / "two")
    assert sorted(r["rank"] for r in two) != [0] * len(two)  # both processes did work
    assert not list((tmp_path / "two").glob("results.part*"))
    strip = lambda rows, root: [{**r, "output": r["output"].replace(str(root), "")} for r in stable(rows)]  # noqa: E731
    assert strip(two, tmp_path / "two") == strip(one, tmp_path / "one")
    for r in one:
        assert np.array_equal(pixels(r["output"]), pixels(r["output"].replace(str(tmp_path / "one"), str(tmp_path / "two"))))


def test_throughput_benchmark_counts_and_agrees(tmp_path, sd_model):
    from npinv.bench.throughput import run_throughput, throughput_table

    summary = run_throughput(sd_model, tmp_path, batch_sizes=(1, 3), n_images=3, steps=2)
    one, three = summary["rows"]
    assert one["images"] == three["images"] == 3
    # Batched: one inversion call and one edit call a step for all three images instead of three.
    assert one["unet_calls"] == 3 * three["unet_calls"] == 3 * 2 * 2
    assert three["max_pixel_difference_vs_batch_1"] <= 1 and one["images_per_minute"] > 0
    assert "images / minute" in throughput_table(summary)


def test_a_second_run_on_a_held_folder_is_refused_naming_the_holder(tmp_path, manifest, sd_folder, capsys):
    import socket

    out = tmp_path / "out"
    holder = lock_holder(out)
    try:
        code, stdout, err = run(capsys, "edit-batch", manifest, "--out", out, "--model", sd_folder, "--steps", STEPS)
        assert code == 2 and stdout == ""
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("npinv: error: "), err
        assert f"pid {holder.pid}@{socket.gethostname()}, since " in lines[0] and str(out) in lines[0]
        assert not (out / "results.jsonl").exists() and not (out / "edits").exists()  # refused before any work
        # The library entry point refuses too (a run that got past the CLI's early check).
        from npinv import load_model
        from npinv.batch import read_manifest, run_batch
        from npinv.settings import InvertSettings
        with pytest.raises(Exception, match=f"pid {holder.pid}@"):
            run_batch(load_model(str(sd_folder), device="cpu"), read_manifest(manifest, invert_defaults=InvertSettings(steps=2)),
                      out)
    finally:
        holder.stdin.close()
        holder.wait(timeout=60)
    assert holder.returncode == 0 and not (out / ".npinv.lock").exists()  # released on exit
    code, stdout, err = run(capsys, "edit-batch", manifest, "--out", out, "--model", sd_folder, "--steps", STEPS,
                            "--json")
    assert code == 0, err
    assert json.loads(stdout)["done_now"] == 6 and not (out / ".npinv.lock").exists()


def test_a_lock_left_by_a_dead_process_is_taken_over(tmp_path, manifest, sd_folder, capsys):
    import socket

    out = tmp_path / "out"
    out.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # its pid names no running process now
    (out / ".npinv.lock").write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname(),
                                                 "since": "2024-01-01 00:00:00 +0000", "launch": None,
                                                 "world_size": 1, "command": "npinv edit-batch"}) + "\n")
    code, stdout, err = run(capsys, "edit-batch", manifest, "--out", out, "--model", sd_folder, "--steps", STEPS,
                            "--json")
    assert code == 0, err
    notes = [ln for ln in err.splitlines() if ln]
    assert len(notes) == 1 and notes[0].startswith("npinv: warning: ") and f"pid {dead.pid}@" in notes[0]
    assert "no longer runs" in notes[0]
    assert json.loads(stdout)["done_now"] == 6 and not (out / ".npinv.lock").exists()


def test_a_lock_is_released_when_the_run_fails(tmp_path, manifest, sd_folder, monkeypatch, capsys):
    import npinv.batch

    def boom(*a, **k):
        raise KeyboardInterrupt  # Ctrl-C in the middle of the work

    monkeypatch.setattr(npinv.batch, "_run_chunk", boom)
    out = tmp_path / "out"
    code, _, err = run(capsys, "edit-batch", manifest, "--out", out, "--model", sd_folder, "--steps", STEPS)
    assert code == 130 and not (out / ".npinv.lock").exists()


def test_siblings_of_one_launch_share_the_folder_and_strangers_do_not(tmp_path, monkeypatch):
    from npinv.errors import NpinvError
    from npinv.parallel import FolderLock, Shard

    for k, v in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500", "TORCHELASTIC_RUN_ID": "none",
                 "LOCAL_WORLD_SIZE": "2"}.items():
        monkeypatch.setenv(k, v)
    out = tmp_path / "out"
    rank0, rank1 = FolderLock(out, Shard(0, 2)), FolderLock(out, Shard(1, 2))
    with rank0, rank1:
        with pytest.raises(NpinvError, match="one of 2 processes launched together"):
            FolderLock(out).acquire()  # an independent single-process run
        monkeypatch.setenv("MASTER_PORT", "29501")
        with pytest.raises(NpinvError, match="in use by"):
            FolderLock(out, Shard(0, 2)).acquire()  # another launch
        monkeypatch.setenv("MASTER_PORT", "29500")
        rank0.release()  # the first to finish leaves the file to the sibling still working
        assert (out / ".npinv.lock").exists()
        with pytest.raises(NpinvError):
            FolderLock(out).check()
    assert not (out / ".npinv.lock").exists()  # the last one out removed it
    FolderLock(out).check()


def test_resume_counts_add_up_after_a_torn_line_and_a_lost_output(tmp_path, sd_folder, capsys):
    """Eight edits; the last results row torn mid-write and another edit's image deleted: the rerun
    redoes exactly those two and the counts add up to eight."""
    folder = tmp_path / "data"
    folder.mkdir()
    rows = []
    for n in range(8):
        shape, colour, bg = SCENES[n % 4]
        Scene(shape, colour, bg, 0.3 + 0.05 * n).render(32).save(folder / f"img{n}.png")
        rows.append({"image": f"img{n}.png", "source": caption(shape, colour, bg),
                     "target": caption(shape, "yellow" if colour == "red" else "red", bg)})
    manifest = folder / "manifest.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"
    args = ("edit-batch", manifest, "--out", out, "--model", sd_folder, "--steps", "2", "--json")
    code, stdout, err = run(capsys, *args)
    assert code == 0, err
    assert json.loads(stdout)["done_now"] == 8
    first = results(out)
    first[2]["seconds"] = -1.0  # marks the lost edit's old row: the redone edit's row must replace it
    text = "".join(json.dumps(r) + "\n" for r in first)
    (out / "results.jsonl").write_text(text[: len(text) - 40])  # the last row torn mid-write
    Path(first[2]["output"]).unlink()  # and one finished edit's image lost
    code, stdout, err = run(capsys, *args)
    assert code == 0, err
    report = json.loads(stdout)
    assert (report["edits"], report["done_before"], report["done_now"]) == (8, 6, 2)
    assert report["done_before"] + report["done_now"] == report["edits"]
    final = results(out)
    assert len(final) == len({r["key"] for r in final}) == 8 and all(Path(r["output"]).is_file() for r in final)
    assert all(r["seconds"] >= 0 for r in final)  # one row per edit: the latest, not the stale one
    code, stdout, _ = run(capsys, *args)
    assert (json.loads(stdout)["done_before"], json.loads(stdout)["done_now"]) == (8, 0)
