"""The scripts in examples/ run as their docstrings say (few steps here) and print what they promise."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from PIL import Image

EXAMPLES = Path(__file__).parent.parent / "examples"


def run(script: str, *args) -> str:
    proc = subprocess.run([sys.executable, str(EXAMPLES / script), *map(str, args)], capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_invert_once_edit_many(tmp_path):
    out = run("invert_once_edit_many.py", "--steps", 4, "--out", tmp_path)
    rows = dict(re.findall(r"^(ddim|nti|npi) +w=7.5 +([\d.]+)", out, re.M))
    assert float(rows["npi"]) > float(rows["ddim"])  # NPI holds the image where DDIM at w 7.5 drifts
    assert re.search(r"^npi .* 4$", out, re.M)  # one UNet call a step, no optimisation
    assert out.count("UNet rows") == 2  # the bundled example's two edits, from the one inversion
    assert Image.open(tmp_path / "edits.png").size[0] > Image.open(tmp_path / "edits.png").size[1]
    assert (tmp_path / "reconstructions.png").is_file() and (tmp_path / "inversion.safetensors").is_file()


def test_flow_npi_and_flowedit():
    out = run("flow_npi_and_flowedit.py", "--scenes", 1, "--steps", 4)
    psnr = dict(re.findall(r"on a (ddim|bdia) inversion: ([\d.]+) dB", out))
    assert float(psnr["bdia"]) > float(psnr["ddim"])  # exact inversion reconstructs better than Euler's
    assert re.search(r"npi \+ word swap \+ blend +w=1\.5 .*success \d/3", out)  # the model's declared guidance
    assert re.search(r"flowedit +w=13\.5 .*success \d/3.* 3 calls an edit", out)  # no inversion: round(33/50*4)
