"""Image preparation, atomic writes and metrics against hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest
from PIL import Image

from npinv.errors import NpinvError
from npinv.io import atomic_path, load_image, prepare_image, save_image
from npinv.metrics import mse, psnr, ssim


def test_exif_orientation_is_applied(tmp_path):
    img = Image.new("RGB", (40, 20), (255, 0, 0))
    img.paste((0, 0, 255), (0, 0, 20, 20))  # left half blue
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    path = tmp_path / "rotated.jpg"
    img.save(path, exif=exif, quality=95)
    out = load_image(path)
    assert out.size == (20, 40)
    assert out.getpixel((10, 5))[2] > 200  # blue now on top


@pytest.mark.parametrize("mode", ["RGBA", "L", "P", "LA"])
def test_modes_become_rgb(tmp_path, mode):
    img = Image.new("RGBA", (8, 8), (10, 200, 30, 0)).convert(mode) if mode != "RGBA" else Image.new(
        "RGBA", (8, 8), (10, 200, 30, 0))
    path = tmp_path / f"x_{mode}.png"
    img.save(path)
    out = load_image(path)
    assert out.mode == "RGB" and out.size == (8, 8)
    if mode == "RGBA":
        assert out.getpixel((0, 0)) == (255, 255, 255)  # transparent composited on white


def test_sixteen_bit_grey_is_scaled_not_clipped(tmp_path):
    arr = np.full((8, 8), 32768, dtype=np.uint16)
    path = tmp_path / "grey16.png"
    Image.fromarray(arr).save(path)
    out = load_image(path)
    assert abs(out.getpixel((0, 0))[0] - 128) <= 1


def test_prepare_crop_and_fit():
    img = Image.new("RGB", (300, 200))
    assert prepare_image(img, 64).size == (64, 64)
    assert prepare_image(img, 64, mode="fit").size == (64, 40)
    fitted = prepare_image(Image.new("RGB", (333, 101)), 512, mode="fit")
    assert fitted.size[0] == 512 and fitted.size[1] % 8 == 0
    with pytest.raises(NpinvError):
        prepare_image(img, 64, mode="stretch")


@pytest.mark.parametrize("content,match", [(b"", "empty"), (b"not an image at all", "not an image")])
def test_bad_files(tmp_path, content, match):
    path = tmp_path / "bad.png"
    path.write_bytes(content)
    with pytest.raises(NpinvError, match=match):
        load_image(path)


def test_truncated_file(tmp_path):
    path = tmp_path / "full.png"
    Image.effect_noise((64, 64), 50).convert("RGB").save(path)
    cut = tmp_path / "cut.png"
    cut.write_bytes(path.read_bytes()[:300])
    with pytest.raises(NpinvError, match="cannot read"):
        load_image(cut)


def test_missing_file(tmp_path):
    with pytest.raises(NpinvError, match="no such file"):
        load_image(tmp_path / "nope.png")


def test_decompression_bomb(tmp_path, monkeypatch):
    path = tmp_path / "big.png"
    Image.new("RGB", (100, 100)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(NpinvError, match="too large"):
        load_image(path)


def test_atomic_write_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "out.png"
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_bytes(b"partial")
        raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []
    save_image(Image.new("RGB", (4, 4)), target)
    assert [p.name for p in tmp_path.iterdir()] == ["out.png"]


def test_metrics_hand_computed():
    a = np.zeros((4, 4, 3))
    b = np.full((4, 4, 3), 0.1)
    assert mse(a, b) == pytest.approx(0.01)
    assert psnr(a, b) == pytest.approx(20.0)
    assert psnr(a, a) == math.inf
    assert ssim(a, a) == pytest.approx(1.0)
    # Constant images: SSIM = (2*mx*my + c1) / (mx^2 + my^2 + c1) with zero variances.
    c1 = 0.01**2
    expected = (2 * 0.2 * 0.3 + c1) / (0.2**2 + 0.3**2 + c1)
    assert ssim(np.full((16, 16, 3), 0.2), np.full((16, 16, 3), 0.3)) == pytest.approx(expected)


def test_ssim_matches_scikit_image():
    from skimage.metrics import structural_similarity

    rng = np.random.default_rng(0)
    a = rng.random((40, 50, 3))
    b = np.clip(a + 0.1 * rng.standard_normal(a.shape), 0, 1)
    ref = structural_similarity(a, b, channel_axis=2, gaussian_weights=True, sigma=1.5, data_range=1.0)
    assert ssim(a, b) == pytest.approx(ref, abs=1e-9)


def test_outputs_get_the_umask_mode_and_replacing_keeps_the_mode(tmp_path):
    """atomic_path used mkstemp (0600 whatever the umask): outputs must get what open() would give."""
    import json
    import os
    import stat

    from npinv.bench.results import ResultsFile
    from npinv.io import write_text

    mode = lambda p: stat.S_IMODE(os.stat(p).st_mode)  # noqa: E731
    old = os.umask(0o022)
    try:
        img = Image.new("RGB", (8, 8), (1, 2, 3))
        save_image(img, tmp_path / "new.png")
        write_text(tmp_path / "new.json", "{}")
        assert mode(tmp_path / "new.png") == mode(tmp_path / "new.json") == 0o644
        os.umask(0o077)
        save_image(img, tmp_path / "private.png")
        assert mode(tmp_path / "private.png") == 0o600
        os.umask(0o022)
        for name, before in (("shared.png", 0o644), ("secret.png", 0o600), ("group.png", 0o664)):
            (tmp_path / name).write_bytes(b"old")
            os.chmod(tmp_path / name, before)
            save_image(img, tmp_path / name)  # replaced by a rename: the new file keeps the old one's mode
            assert mode(tmp_path / name) == before, name
            assert Image.open(tmp_path / name).size == (8, 8)
        # A results file rewritten without its torn last line keeps its mode too.
        results = tmp_path / "results.jsonl"
        results.write_text(json.dumps({"key": "a"}) + "\n" + '{"key": "b", "x"')
        os.chmod(results, 0o640)
        assert [r["key"] for r in ResultsFile(results).rows] == ["a"]
        assert mode(results) == 0o640 and results.read_text() == '{"key": "a"}\n'
    finally:
        os.umask(old)
    assert not list(tmp_path.glob(".*.tmp"))


def test_abandoned_temporaries_go_live_ones_stay(tmp_path):
    """A temporary whose writer is gone (killed mid-write) is removed; one a writer still holds is not:
    atomic_path locks its temporary for as long as it writes."""
    from npinv.io import remove_abandoned_temporaries

    out = tmp_path / "o.png"
    dead = tmp_path / ".o.png.deadbeef.tmp"
    dead.write_bytes(b"")
    other = tmp_path / ".other.png.deadbeef.tmp"  # another output's: not this path's to remove
    other.write_bytes(b"")
    with atomic_path(out) as live:
        assert remove_abandoned_temporaries(out) == [dead]
        assert live.exists()
        live.write_bytes(b"x")
    assert out.read_bytes() == b"x"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".other.png.deadbeef.tmp", "o.png"]
