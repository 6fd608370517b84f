"""Progress output: bars on a terminal only, rare plain lines in a log, and generate's time estimate."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from npinv.cli import main

PROMPT = "a red circle on a blue background"


def generate(capsys, tmp_path, sd_folder, *flags) -> tuple[int, str, str]:
    code = main([*flags, "generate", "--prompt", PROMPT, "--steps", "3", "--size", "32", "--model", str(sd_folder),
                 "--out", str(tmp_path / "g.png")])
    out, err = capsys.readouterr()
    return code, out, err


def test_a_log_gets_no_carriage_return_noise(tmp_path, sd_folder):
    """stderr redirected to a file (a CI log, ``2> log``): no bar redraws, nothing for a short run."""
    log = tmp_path / "log"
    with log.open("w") as fh:
        proc = subprocess.run([sys.executable, "-m", "npinv", "generate", "--prompt", PROMPT, "--steps", "3",
                               "--size", "32", "--model", str(sd_folder), "--out", str(tmp_path / "g.png")],
                              stdout=subprocess.PIPE, stderr=fh, text=True,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0
    text = log.read_text()
    assert "\r" not in text and "generate:" not in text and "%|" not in text, text


def test_plain_lines_instead_of_a_bar(tmp_path, capsys, monkeypatch, sd_folder):
    monkeypatch.setenv("NPINV_PROGRESS_INTERVAL", "0")  # a line at every step (30 s apart by default)
    code, _, err = generate(capsys, tmp_path, sd_folder)
    assert code == 0 and "\r" not in err
    lines = [ln for ln in err.splitlines() if ln.startswith("generate:")]
    assert lines[0].startswith("generate: 1/3 step, ") and lines[0].endswith(" s left")
    assert lines[-1].startswith("generate: 3/3 step, ")


def test_a_terminal_still_gets_the_bar(tmp_path, capsys, monkeypatch, sd_folder):
    import npinv.progress

    monkeypatch.setattr(npinv.progress, "stderr_is_terminal", lambda: True)
    code, _, err = generate(capsys, tmp_path, sd_folder)
    assert code == 0 and "generate:" in err and "/3 [" in err and "\r" in err  # tqdm draws (and clears) it
    code, _, err = generate(capsys, tmp_path, sd_folder, "--quiet")
    assert code == 0 and err == ""


def test_generate_estimates_a_long_run_after_its_first_step(tmp_path, capsys, monkeypatch, sd_folder):
    import npinv.cli

    code, _, err = generate(capsys, tmp_path, sd_folder)
    assert code == 0 and "about" not in err  # a short run: no estimate
    monkeypatch.setattr(npinv.cli, "LONG_RUN_SECONDS", 0.0)  # every run is "long"
    code, _, err = generate(capsys, tmp_path, sd_folder)
    lines = [ln for ln in err.splitlines() if ln.startswith("npinv: generate")]
    assert code == 0 and len(lines) == 1, err
    assert lines[0].startswith("npinv: generate 32x32 px, 3 steps on cpu: about ") and "for the first step" in lines[0]
    code, _, err = generate(capsys, tmp_path, sd_folder, "--quiet")
    assert code == 0 and err == ""
    # The estimate is the first step's time times the steps.
    from npinv import load_model
    from npinv.service import generate as sample_image

    seen = []
    model = load_model(str(sd_folder), device="cpu")
    sample_image(model, PROMPT, steps=4, size=32, estimate=lambda first, total: seen.append((first, total)))
    assert len(seen) == 1 and seen[0][1] == pytest.approx(4 * seen[0][0])
