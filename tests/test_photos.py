"""A real photograph, stored the way phones store portrait shots (landscape pixels plus an EXIF
orientation tag), through ``npinv reconstruct``, ``edit`` and ``edit-batch`` on the SD 1.5-layout model.

The photo is scikit-image's ``chelsea`` (451x300, shipped in its wheel). With orientation 6 a
viewer turns it 90 degrees clockwise: 300x451, portrait. Fitted to 192 px with ``--resize fit`` it
must come out 128x192 (w x h); ignoring the tag would give 192x128.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from npinv.cli import main

STEPS = 3
SIZE = ["--size", "192", "--resize", "fit"]
PORTRAIT = (128, 192)  # w x h of the fitted, rotated photo
SOURCE = "a photo of a cat"
ORIENTATION = 0x0112


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main(["--quiet", *(str(a) for a in argv)])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def rotated_photo(tmp_path) -> Path:
    from skimage import data

    path = tmp_path / "cat.jpg"
    exif = Image.Exif()
    exif[ORIENTATION] = 6  # rotate 90 degrees clockwise to display
    Image.fromarray(data.chelsea()).save(path, quality=92, exif=exif)
    return path


def test_exif_orientation_is_applied(rotated_photo):
    from skimage import data

    from npinv.io import load_image

    with Image.open(rotated_photo) as raw:
        assert raw.size == (451, 300) and raw.getexif()[ORIENTATION] == 6
    img = load_image(rotated_photo)
    assert img.size == (300, 451) and img.mode == "RGB"
    upright = np.asarray(Image.fromarray(data.chelsea()).transpose(Image.Transpose.ROTATE_270), dtype=np.float32)
    assert np.abs(np.asarray(img, dtype=np.float32) - upright).mean() < 4  # JPEG error only


def test_reconstruct_rotated_photo(capsys, tmp_path, rotated_photo, sd15_layout_folder):
    out = tmp_path / "rec.png"
    code, stdout, err = run(capsys, "reconstruct", rotated_photo, "--prompt", SOURCE, "--steps", STEPS, *SIZE,
                            "--model", sd15_layout_folder, "--out", out, "--json")
    assert code == 0, err
    row = json.loads(stdout)
    assert {"method", "psnr", "ssim", "mse", "seconds", "unet_calls", "unet_rows", "out", "size"} <= row.keys()
    assert row["size"] == [PORTRAIT[1], PORTRAIT[0]]  # (h, w)
    assert row["unet_calls"] == 2 * STEPS - 1 and np.isfinite(row["psnr"])  # BDIA: sampling starts at z*[n-1]
    with Image.open(out) as img:
        assert img.size == PORTRAIT


def test_edit_rotated_photo(capsys, tmp_path, rotated_photo, sd15_layout_folder):
    out, maps = tmp_path / "edit.png", tmp_path / "maps"
    code, stdout, err = run(capsys, "edit", rotated_photo, "--source", SOURCE, "--target", "a photo of a hippopotamus",
                            "--controller", "replace", "--blend", "cat", "hippopotamus", "--steps", STEPS, *SIZE,
                            "--model", sd15_layout_folder, "--out", out, "--save-attention", maps, "--json")
    assert code == 0, err
    row = json.loads(stdout)
    assert {"method", "controller", "targets", "seconds", "unet_calls", "unet_rows", "outputs", "grid"} <= row.keys()
    assert (row["unet_calls"], row["unet_rows"]) == (2 * STEPS, STEPS + 3 * STEPS)
    with Image.open(out) as img:
        assert img.size == PORTRAIT
    assert len(row["attention_maps"]) == 10  # five words in each prompt
    with Image.open(row["attention_maps"][0]) as heat:
        assert heat.width * PORTRAIT[1] == heat.height * PORTRAIT[0]  # portrait too


def test_edit_batch_rotated_photo(capsys, tmp_path, rotated_photo, sd15_layout_folder):
    manifest = tmp_path / "manifest.jsonl"
    rows = [
        {"image": rotated_photo.name, "source": SOURCE, "targets": ["a photo of a tiger"], "controller": "replace",
         "blend": ["cat", "tiger"]},
        {"image": rotated_photo.name, "source": SOURCE, "target": "a photo of a sleepy hippopotamus"},  # refine
    ]
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"
    code, stdout, err = run(capsys, "edit-batch", manifest, "--out", out, "--steps", STEPS, *SIZE,
                            "--model", sd15_layout_folder, "--json")
    assert code == 0, err
    report = json.loads(stdout)
    assert report["edits"] == report["done_now"] == 2 and report["done_before"] == 0
    assert report["unet_calls"] == STEPS + 2 * STEPS  # one shared inversion, one edit call per setting
    results = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [r["controller"] for r in results] == ["replace", "refine"]
    for r in results:
        assert {"image", "target", "output", "seconds", "invert_seconds", "edit_seconds"} <= r.keys()
        with Image.open(r["output"]) as img:
            assert img.size == PORTRAIT
