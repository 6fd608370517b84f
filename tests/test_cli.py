"""The command line with real files in and out, and every bad-input path."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from npinv.cli import main

KEYS = {"method", "steps", "guidance", "psnr", "ssim", "mse", "seconds", "unet_calls", "out"}


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(["--quiet", *argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize("method,calls,scheme", [("npi", 7, "bdia"), ("ddim", 8, "ddim"), ("nti", None, "ddim")])
def test_reconstruct_writes_image_and_json(capsys, tmp_path, sd_folder, image_file, method, calls, scheme):
    out = tmp_path / "rec.png"
    code, stdout, stderr = run(capsys, "reconstruct", str(image_file), "--prompt", "a red circle on a blue background",
                               "--method", method, "--steps", "4", "--model", str(sd_folder), "--out", str(out), "--json")
    assert code == 0, stderr
    row = json.loads(stdout)
    assert KEYS <= row.keys()
    assert row["method"] == method and row["steps"] == 4 and row["out"] == str(out)
    # Each method's own default scheme: BDIA for NPI (4 inversion calls + 3 sampling calls: its sampling takes
    # the first step from the inversion), plain DDIM for the baselines (4 + 4).
    assert row["invert_scheme"] == scheme
    if calls is not None:
        assert row["unet_calls"] == calls
    with Image.open(out) as img:
        assert img.size == (32, 32)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["input.png", "rec.png"]


def test_reconstruct_human_output_and_saved_inversion(capsys, tmp_path, sd_folder, image_file):
    from npinv import Inversion

    out, inv = tmp_path / "rec.jpg", tmp_path / "inv.safetensors"
    code, stdout, _ = run(capsys, "reconstruct", str(image_file), "--prompt", "a cat", "--steps", "3", "--model",
                          str(sd_folder), "--out", str(out), "--save-inversion", str(inv), "--offset", "0")
    assert code == 0
    assert "PSNR" in stdout and "UNet calls" in stdout
    assert Inversion.load(inv).schedule["offset"] == 0


def test_long_prompt_warns_and_truncates(capsys, tmp_path, sd_folder, image_file):
    out = tmp_path / "rec.png"
    code, _, stderr = run(capsys, "reconstruct", str(image_file), "--prompt", " ".join(["cat"] * 100), "--steps", "2",
                          "--model", str(sd_folder), "--out", str(out))
    assert code == 0
    assert "npinv: warning: prompt has 102 tokens, over the tokenizer's limit of 77" in stderr
    assert out.exists()


def snapshot(folder: Path) -> dict[str, tuple[bytes, int] | None]:
    """Everything under ``folder``: relative path -> (bytes, mtime in ns) for a file, None for a folder."""
    return {str(p.relative_to(folder)): None if p.is_dir() else (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*"))}


def _assert_clean_error(code: int, stderr: str, folder: Path, before: set[str] | dict, match: str, *,
                        may_add: frozenset[str] = frozenset()) -> None:
    """Exit 2, exactly one ``npinv: error:`` line containing ``match``, no traceback, and nothing
    written: ``before`` is the folder's names, or its :func:`snapshot` (then no file or folder added,
    removed, or changed in bytes or mtime, at any depth: no output, no ``.*.tmp`` left; only the
    paths in ``may_add`` may appear)."""
    assert code == 2, stderr
    assert stderr.endswith("\n") and stderr.count("\n") == 1, stderr  # exactly one line
    lines = stderr.splitlines()
    assert lines[0].startswith("npinv: error:"), stderr
    assert match in lines[0], stderr
    assert "Traceback" not in stderr
    if isinstance(before, dict):
        after = snapshot(folder)
        assert sorted(after.keys() - before.keys() - may_add) == [], "written"
        assert sorted(before.keys() - after.keys()) == [], "removed"
        assert [k for k in before if before[k] != after[k]] == [], "changed"
    else:
        assert {p.name for p in folder.iterdir()} == before  # nothing written


@pytest.mark.parametrize("case,match", [
    ("missing", "no such file"),
    ("empty", "empty"),
    ("text", "not an image"),
    ("truncated", "cannot read"),
    ("same-as-input", "is the input file"),
    ("no-folder", "does not exist"),
    ("folder-is-file", "does not exist"),
    ("bad-suffix", "unsupported output image type"),
    ("method", "method must be one of npi, proxnpi"),
    ("model", "no such model"),
    ("unknown-model", "unknown model"),
    ("pickle", "pickle checkpoint"),
    ("steps", "steps must be a whole number in 1..1000, got 0"),
])
def test_bad_input_one_line_exit_2_nothing_written(capsys, tmp_path, sd_folder, image_file, case, match):
    image, out = str(image_file), str(tmp_path / "out.png")
    extra: list[str] = []
    model = str(sd_folder)
    if case == "missing":
        image = str(tmp_path / "nope.png")
    elif case == "empty":
        (tmp_path / "empty.png").write_bytes(b"")
        image = str(tmp_path / "empty.png")
    elif case == "text":
        (tmp_path / "notes.png").write_text("hello")
        image = str(tmp_path / "notes.png")
    elif case == "truncated":
        Image.effect_noise((64, 64), 40).convert("RGB").save(tmp_path / "full.png")
        (tmp_path / "cut.png").write_bytes((tmp_path / "full.png").read_bytes()[:200])
        image = str(tmp_path / "cut.png")
    elif case == "same-as-input":
        out = image
    elif case == "no-folder":
        out = str(tmp_path / "missing" / "out.png")
    elif case == "folder-is-file":
        out = str(image_file / "out.png")
    elif case == "bad-suffix":
        out = str(tmp_path / "out.txt")
    elif case == "method":
        extra = ["--method", "magic"]
    elif case == "model":
        model = str(tmp_path / "nothing.safetensors")
    elif case == "unknown-model":
        model = "not a model"
    elif case == "pickle":
        (tmp_path / "weights.ckpt").write_bytes(b"\x80\x04")
        model = str(tmp_path / "weights.ckpt")
    elif case == "steps":
        extra = ["--steps", "0"]
    before = {p.name for p in tmp_path.iterdir()}
    input_bytes = Path(image_file).read_bytes()
    code, _, stderr = run(capsys, "reconstruct", image, "--prompt", "a cat", "--steps", "2", "--model", model,
                          "--out", out, *extra)
    _assert_clean_error(code, stderr, tmp_path, before, match)
    assert Path(image_file).read_bytes() == input_bytes  # the input is never changed


def test_decompression_bomb_is_refused(capsys, tmp_path, sd_folder, monkeypatch):
    path = tmp_path / "big.png"
    Image.new("RGB", (200, 200)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 5000)
    before = {p.name for p in tmp_path.iterdir()}
    code, _, stderr = run(capsys, "reconstruct", str(path), "--prompt", "x", "--model", str(sd_folder), "--out",
                          str(tmp_path / "o.png"))
    _assert_clean_error(code, stderr, tmp_path, before, "too large")


def test_entry_point_subprocess(tmp_path):
    """The installed module runs as a program; a bad call exits 2 with one line, no traceback."""
    proc = subprocess.run([sys.executable, "-m", "npinv", "reconstruct", str(tmp_path / "x.png"), "--prompt", "p",
                           "--out", str(tmp_path / "o.png")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"npinv: error: no such file: {tmp_path / 'x.png'}"]
    proc = subprocess.run([sys.executable, "-m", "npinv", "models", "--json"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0
    info = json.loads(proc.stdout)
    assert {"name", "path"} <= info["default"].keys()


def test_edit_writes_edits_grid_and_json(capsys, tmp_path, sd_folder, image_file):
    out = tmp_path / "edit.png"
    inv = tmp_path / "inv.safetensors"
    code, stdout, stderr = run(
        capsys, "edit", str(image_file), "--source", "a red circle on a blue background",
        "--target", "a blue circle on a blue background", "--target", "a red square on a blue background",
        "--controller", "replace", "--steps", "3", "--model", str(sd_folder), "--out", str(out),
        "--save-inversion", str(inv), "--save-attention", str(tmp_path / "maps"), "--json")
    assert code == 0, stderr
    row = json.loads(stdout)
    assert {"method", "controller", "targets", "seconds", "unet_calls", "unet_rows", "outputs"} <= row.keys()
    assert row["outputs"] == [str(tmp_path / "edit_0.png"), str(tmp_path / "edit_1.png")]
    assert row["unet_calls"] == 6 and row["unet_rows"] == 3 + 3 * 5  # inversion + (1 + 2*2) rows a step
    for path in row["outputs"] + [row["grid"]]:
        assert Path(path).is_file()
    assert len(list((tmp_path / "maps").glob("*.png"))) == 3 * 7
    # Invert once, edit again from the saved inversion: no inversion calls this time.
    code, stdout, _ = run(capsys, "edit", str(image_file), "--inversion", str(inv), "--target",
                          "a red circle on a red background", "--blend", "blue", "red", "--model", str(sd_folder),
                          "--out", str(tmp_path / "again.png"), "--json")
    assert code == 0
    assert json.loads(stdout)["unet_calls"] == 3


@pytest.mark.parametrize("extra,match", [
    (["--controller", "replace", "--target", "a big red square on a blue background"], "equal word counts"),
    (["--target", "a red square on a blue background", "--blend", "dog", "square"], "blend word 'dog'"),
    (["--target", "a red square on a blue background", "--reweight", "cat=2"], "reweight word 'cat'"),
    (["--target", "a red square on a blue background", "--reweight", "square"], "WORD=NUMBER"),
    (["--target", "a red square on a blue background", "--self-replace", "0.9,0.1"], "self-replace"),
    (["--target", "a red square on a blue background", "--cross-replace", "0.9,0.1"], "cross-replace"),
    (["--target", "a red square on a blue background", "--cross-replace", "most"],
     "cross-replace must be a fraction in 0..1 or a window START,END"),
    (["--target", "a red square on a blue background", "--self-replace-size", "0"], "self-replace-size"),
    (["--target", "a red square on a blue background", "--blend-start", "1.5"], "blend-start"),
    (["--target", "a red square on a blue background", "--blend-res", "0"], "blend-res"),
    (["--target", "a red square on a blue background " + "very " * 80 + "red", "--reweight", "red=2"],
     "77-token limit"),
])
def test_edit_errors(capsys, tmp_path, sd_folder, image_file, extra, match):
    before = {p.name for p in tmp_path.iterdir()}
    code, _, stderr = run(capsys, "edit", str(image_file), "--source", "a red circle on a blue background",
                          "--steps", "2", "--model", str(sd_folder), "--out", str(tmp_path / "e.png"), *extra)
    _assert_clean_error(code, stderr, tmp_path, before, match)


def test_edit_refuses_a_mismatched_inversion(capsys, tmp_path, sd_folder, sd_v_folder, image_file):
    inv = tmp_path / "inv.safetensors"
    assert run(capsys, "reconstruct", str(image_file), "--prompt", "a cat", "--steps", "2", "--model", str(sd_folder),
               "--out", str(tmp_path / "r.png"), "--save-inversion", str(inv))[0] == 0
    for extra, match in ([["--model", str(sd_v_folder)], "made with model"],
                         [["--model", str(sd_folder), "--steps", "3"], "steps"],
                         [["--model", str(sd_folder), "--size", "64"], "image"],
                         [["--model", str(sd_folder), "--source", "a dog"], "source prompt"]):
        before = {p.name for p in tmp_path.iterdir()}
        code, _, stderr = run(capsys, "edit", str(image_file), "--inversion", str(inv), "--target", "a dog",
                              "--out", str(tmp_path / "e.png"), *extra)
        _assert_clean_error(code, stderr, tmp_path, before, match)


def test_edit_refuses_an_inversion_of_another_image(capsys, tmp_path, sd_folder, image_file):
    """An inversion of picture A applied to picture B would edit A: refused in one line, nothing written.
    The same picture in other bytes is the same image; a file saved before the digest was recorded is
    taken as it is (nothing to compare)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from npinv.scenes import Scene

    inv = tmp_path / "inv.safetensors"
    assert run(capsys, "reconstruct", str(image_file), "--prompt", "a cat", "--steps", "2", "--model", str(sd_folder),
               "--out", str(tmp_path / "r.png"), "--save-inversion", str(inv))[0] == 0
    other = tmp_path / "other.png"
    Scene("square", "yellow", "green", 0.5).render(32).save(other)
    same = tmp_path / "same.png"
    Image.open(image_file).save(same, compress_level=0)

    def edit(image: Path, inversion: Path, out: str) -> tuple[int, str, str]:
        return run(capsys, "edit", str(image), "--inversion", str(inversion), "--target", "a dog",
                   "--model", str(sd_folder), "--out", str(tmp_path / out))

    before = {p.name for p in tmp_path.iterdir()}
    code, _, stderr = edit(other, inv, "e.png")
    _assert_clean_error(code, stderr, tmp_path, before, "other.png is not the image this inversion was made from")
    code, _, stderr = edit(same, inv, "e-same.png")
    assert code == 0, stderr
    with safe_open(str(inv), "pt") as fh:
        meta = json.loads(fh.metadata()["npinv"])
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    del meta["image_digest"]
    save_file(tensors, str(tmp_path / "old.safetensors"), metadata={"npinv": json.dumps(meta)})
    code, _, stderr = edit(other, tmp_path / "old.safetensors", "e-old.png")
    assert code == 0, stderr


def test_unwritable_output_folder(capsys, tmp_path, sd_folder, image_file, monkeypatch):
    # Root ignores permission bits, so simulate the folder's answer to the access check.
    import os

    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if mode == os.W_OK else real(p, mode))
    before = {p.name for p in tmp_path.iterdir()}
    code, _, stderr = run(capsys, "reconstruct", str(image_file), "--prompt", "x", "--model", str(sd_folder),
                          "--out", str(tmp_path / "o.png"))
    _assert_clean_error(code, stderr, tmp_path, before, "not writable")


def test_generate_writes_an_image(capsys, tmp_path, sd_folder):
    out = tmp_path / "gen.png"
    code, stdout, stderr = run(capsys, "generate", "--prompt", "a red circle", "--seed", "3", "--steps", "3",
                               "--model", str(sd_folder), "--out", str(out), "--json")
    assert code == 0, stderr
    row = json.loads(stdout)
    assert row["unet_calls"] == 3 and row["seed"] == 3
    first = out.read_bytes()
    assert run(capsys, "generate", "--prompt", "a red circle", "--seed", "3", "--steps", "3", "--model", str(sd_folder),
               "--out", str(out))[0] == 0
    assert out.read_bytes() == first  # same seed, same picture


def test_prompt_to_prompt_settings_reach_the_edit(capsys, tmp_path, sd_folder, image_file):
    """--blend-start 1 never blends (same pixels as no blend); a cross-replace window and the self-replace
    size change the edit; each run exits 0."""
    common = ["edit", str(image_file), "--source", "a red circle on a blue background", "--target",
              "a red square on a blue background", "--controller", "replace", "--steps", "4", "--model", str(sd_folder)]

    def pixels(name, *extra):
        code, _, stderr = run(capsys, *common, "--out", str(tmp_path / name), *extra)
        assert code == 0, stderr
        return Image.open(tmp_path / name).tobytes()

    plain = pixels("plain.png")
    # A high threshold: the random test model's attention is nearly flat, so at 0.3 its mask may cover everything.
    blend = ["--blend", "circle", "square", "--blend-threshold", "0.95"]
    assert pixels("late.png", *blend, "--blend-start", "1") == plain
    assert pixels("blend.png", *blend, "--blend-start", "0") != plain
    assert pixels("window.png", "--cross-replace", "0.5,1") != plain
    assert pixels("size.png", "--self-replace-size", "1") != plain


# -- the parser: help, --version, options after the sub-command ------------------------------------------
def _parsers():
    """(command name, parser) of npinv and every sub-command, nested ones included."""
    import argparse

    from npinv.cli import build_parser

    found, todo = [], [("npinv", build_parser())]
    while todo:
        name, parser = todo.pop()
        found.append((name, parser))
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                todo += [(f"{name} {sub}", p) for sub, p in action.choices.items()]
    return found


def test_every_option_of_every_command_has_help():
    """--help says what every flag and argument does (hidden refusals, help=SUPPRESS, aside)."""
    import argparse

    missing = [f"{name} {action.option_strings or action.dest}" for name, parser in _parsers()
               for action in parser._actions
               if not isinstance(action, argparse._SubParsersAction) and not action.help]
    assert missing == []


def test_quiet_and_threads_after_every_command():
    """-q / --quiet and --threads are taken after every sub-command as well as before it."""
    commands = [(name, parser) for name, parser in _parsers() if name != "npinv"]
    assert len(commands) >= 13
    for name, parser in commands:
        options = {s for a in parser._actions for s in a.option_strings}
        assert {"--quiet", "-q", "--threads"} <= options, name
    from npinv.cli import build_parser

    base = ["reconstruct", "x.png", "--prompt", "p", "--out", "o.png"]
    assert build_parser().parse_args([*base, "-q", "--threads", "3"]).quiet is True
    assert build_parser().parse_args(["-q", *base]).quiet is True  # an unset flag after does not undo it
    assert build_parser().parse_args(base).quiet is False
    assert build_parser().parse_args(["--threads", "2", *base]).threads == 2
    assert build_parser().parse_args([*base, "--threads", "3"]).threads == 3


def test_version_and_the_command_list(capsys):
    from importlib.metadata import version

    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out == f"npinv {version('npinv')}\n"
    from npinv.cli import build_parser

    text = build_parser().format_help()
    assert "benchmarks: reconstruct, edit-shapes, piebench" in text


def test_bench_methods_help_documents_method_at_scheme():
    from npinv.schemes import scheme_names

    bench = dict(_parsers())["npinv bench reconstruct"]
    methods = next(a for a in bench._actions if "--methods" in a.option_strings)
    assert "METHOD@SCHEME" in methods.help and all(f"@{s}" in methods.help for s in scheme_names())
    assert "@decN" in methods.help and "gGAMMA" in methods.help


def test_decoder_steps_print_progress_lines_in_a_log(capsys, tmp_path, sd_folder, image_file, monkeypatch):
    """Where stderr is a log (not a terminal), decoder inversion prints the periodic progress line as the
    other loops do (NPINV_PROGRESS_INTERVAL 0: every step)."""
    monkeypatch.setenv("NPINV_PROGRESS_INTERVAL", "0")
    code = main(["reconstruct", str(image_file), "--prompt", "a red circle on a blue background", "--steps", "1",
                 "--decoder-steps", "3", "--model", str(sd_folder), "--out", str(tmp_path / "rec.png")])
    stderr = capsys.readouterr().err
    assert code == 0, stderr
    assert [line for line in stderr.splitlines() if line.startswith("decoder: ")][-1].startswith("decoder: 3/3 step")
    code = main(["reconstruct", str(image_file), "--prompt", "a red circle on a blue background", "--steps", "1",
                 "--decoder-steps", "3", "--model", str(sd_folder), "--out", str(tmp_path / "rec.png"), "-q"])
    assert code == 0 and "decoder: " not in capsys.readouterr().err  # --quiet after the command silences it


def test_threads_reach_torch_in_a_cli_process(tmp_path, sd_folder):
    """--threads N (here after the command) sets torch's thread count in the process: the JSON row
    says what torch ran with, against the OMP_NUM_THREADS=1 of the environment."""
    import os

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("NPINV_THREADS", None)
    proc = subprocess.run([sys.executable, "-m", "npinv", "generate", "--prompt", "a red circle", "--steps", "1",
                           "--model", str(sd_folder), "--out", str(tmp_path / "g.png"), "--json", "--threads", "3"],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["threads"] == 3
