"""PIE-Bench runner: reader, masks, unedited-region metrics, summaries and the resumable run."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

import npinv.bench.piebench as pb
from npinv.bench.netmetrics import NetworkMetrics
from npinv.bench.piebench import (
    decode_mask,
    load_piebench,
    mask_for,
    piebench_table,
    run_piebench,
    select_items,
    ssim_map,
    strip_brackets,
    summarize_piebench,
    unedited_metrics,
    write_csv,
)
from npinv.errors import NpinvError
from npinv.metrics import ssim
from npinv.scenes import Scene

C1, C2 = 0.01**2, 0.03**2


def encode_rle(mask: np.ndarray) -> list[int]:
    """Row-major runs [start, length, ...] of the True pixels."""
    flat = np.concatenate([[False], mask.ravel(), [False]]).astype(np.int8)
    edges = np.flatnonzero(np.diff(flat))
    starts, ends = edges[::2], edges[1::2]
    return [int(v) for pair in zip(starts, ends - starts, strict=True) for v in pair]


def masks512() -> dict[str, np.ndarray]:
    square = np.zeros((512, 512), bool)
    square[128:384, 128:384] = True
    left = np.zeros((512, 512), bool)
    left[:, :256] = True
    return {"000000000000": square, "600000000001": left, "111000000002": np.ones((512, 512), bool)}


ENTRIES = {
    "000000000000": ("0_random_140/000000000000.jpg", "a photo of a [cat]", "a photo of a [dog]", "cat dog", "0",
                     Scene("circle", "red", "blue", 0.5)),
    "600000000001": ("6_change_attribute_color_40/600000000001.jpg", "a [red] circle on blue background",
                     "a  [blue] circle on blue background", "", "6", Scene("circle", "red", "blue", 0.4)),
    # "[circle]," leaves "circle," as the word: blend and reweight are skipped, not an error.
    "111000000002": ("1_change_object_80/1_artificial/1_animal/111000000002.png", "the [square] on red background",
                     "the [circle], on red background", "square circle", "1", Scene("square", "blue", "red", 0.5)),
}


def make_bench(root, *, images: bool = True) -> dict:
    masks = masks512()
    mapping = {}
    for key, (rel, src, tgt, blend, type_id, scene) in ENTRIES.items():
        mapping[key] = {"image_path": rel, "original_prompt": src, "editing_prompt": tgt,
                        "editing_instruction": "make it so", "editing_type_id": type_id, "blended_word": blend,
                        "mask": encode_rle(masks[key])}
        if images:
            path = root / "annotation_images" / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            scene.render(32).save(path)
    root.mkdir(parents=True, exist_ok=True)
    (root / "mapping_file.json").write_text(json.dumps(mapping))
    return mapping


# -- reader ------------------------------------------------------------------------------------
def test_reader_strips_brackets_and_splits_blend_words(tmp_path):
    make_bench(tmp_path)
    items = {it.id: it for it in load_piebench(tmp_path)}
    assert list(items) == sorted(ENTRIES)
    cat = items["000000000000"]
    assert (cat.source_prompt, cat.target_prompt) == ("a photo of a cat", "a photo of a dog")
    assert (cat.source_words, cat.target_words, cat.blend) == (("cat",), ("dog",), ("cat", "dog"))
    assert cat.image_path.is_file() and cat.relative_path == "0_random_140/000000000000.jpg"
    assert cat.editing_type_id == "0" and cat.instruction == "make it so"
    colour = items["600000000001"]
    assert colour.blend is None and colour.target_prompt == "a blue circle on blue background"
    shape = items["111000000002"]
    assert shape.target_prompt == "the circle, on red background" and shape.target_words == ("circle",)
    assert pb.edit_words(shape, 2.0) == (None, {})  # "circle," is not the word "circle"
    assert pb.edit_words(cat, 2.0) == (("cat", "dog"), {"dog": 2.0})
    assert strip_brackets("a [black cat] on [] a mat") == ("a black cat on a mat", ("black", "cat"))
    with pytest.raises(ValueError):
        strip_brackets("a [cat on a mat")


def _broken(tmp_path, key, **change):
    mapping = make_bench(tmp_path)
    mapping[key].update(change)
    for field, value in change.items():
        if value is None:
            del mapping[key][field]
    (tmp_path / "mapping_file.json").write_text(json.dumps(mapping))


@pytest.mark.parametrize("change, message", [
    ({"mask": [1, 2, 3]}, "000000000000: mask: odd number"),
    ({"mask": [1, -2]}, "000000000000: mask: values must be non-negative"),
    ({"original_prompt": "a [cat"}, "000000000000: original_prompt has unbalanced brackets"),
    ({"editing_prompt": None}, "000000000000: missing 'editing_prompt'"),
    ({"blended_word": "cat dog bird"}, "000000000000: blended_word must be"),
    ({"editing_type_id": "x"}, "000000000000: editing_type_id must be a number"),
    ({"image_path": "../elsewhere.jpg"}, "000000000000: image_path"),
])
def test_reader_names_the_malformed_entry(tmp_path, change, message):
    _broken(tmp_path, "000000000000", **change)
    with pytest.raises(NpinvError, match=message):
        load_piebench(tmp_path)


def test_reader_errors(tmp_path):
    with pytest.raises(NpinvError, match="PIE-Bench folder not found"):
        load_piebench(tmp_path / "nowhere")
    with pytest.raises(NpinvError, match="no mapping_file.json"):
        load_piebench(tmp_path)
    (tmp_path / "mapping_file.json").write_text("{not json")
    with pytest.raises(NpinvError, match="not valid JSON"):
        load_piebench(tmp_path)
    (tmp_path / "mapping_file.json").write_text("[]")
    with pytest.raises(NpinvError, match="non-empty JSON object"):
        load_piebench(tmp_path)
    (tmp_path / "mapping_file.json").write_text('{"000000000000": "a cat"}')
    with pytest.raises(NpinvError, match="entry 000000000000: not an object"):
        load_piebench(tmp_path)
    make_bench(tmp_path / "noimages", images=False)
    with pytest.raises(NpinvError, match=r"3 image file\(s\) missing .*000000000000 \(0_random_140/000000000000.jpg\)"):
        load_piebench(tmp_path / "noimages")


def test_select_items(tmp_path):
    make_bench(tmp_path)
    items = load_piebench(tmp_path)
    assert [it.id for it in select_items(items, [6, "0"], None)] == ["000000000000", "600000000001"]
    assert [it.id for it in select_items(items, None, 1)] == ["000000000000"]
    with pytest.raises(NpinvError, match="no PIE-Bench entries of editing type 9"):
        select_items(items, ["9"], None)


# -- masks -------------------------------------------------------------------------------------
def test_decode_mask_runs_clipping_and_border():
    rle = [1, 2, 6, 1, 14, 5]  # the last run goes past the end: clipped
    expected = np.zeros(16, bool)
    expected[[1, 2, 6, 14, 15]] = True
    np.testing.assert_array_equal(decode_mask(rle, 4, parity_border=False), expected.reshape(4, 4))
    bordered = np.ones((4, 4), bool)
    bordered[1:3, 1:3] = False
    bordered[1, 2] = True  # flat index 6 is the only interior pixel set
    np.testing.assert_array_equal(decode_mask(rle, 4), bordered)
    assert decode_mask([], (2, 3), parity_border=False).shape == (2, 3)
    with pytest.raises(NpinvError, match="odd number"):
        decode_mask([1], 4)
    for key, mask in masks512().items():
        np.testing.assert_array_equal(decode_mask(encode_rle(mask), parity_border=False), mask, err_msg=key)


def test_mask_for_resizes_then_applies_the_border(tmp_path):
    make_bench(tmp_path)
    item = load_piebench(tmp_path)[0]
    expected = np.zeros((32, 32), bool)
    expected[8:24, 8:24] = True
    np.testing.assert_array_equal(mask_for(item, 32, 32, parity_border=False), expected)
    expected[0, :] = expected[-1, :] = expected[:, 0] = expected[:, -1] = True
    np.testing.assert_array_equal(mask_for(item, 32, 32), expected)
    np.testing.assert_array_equal(mask_for(item, 512, 512), decode_mask(item.mask))


# -- metrics -----------------------------------------------------------------------------------
def _left_half_mask() -> np.ndarray:
    mask = np.zeros((32, 32), bool)
    mask[:, :16] = True
    mask[0, :] = mask[-1, :] = mask[:, 0] = mask[:, -1] = True
    return mask  # unedited: rows 1..30 x columns 16..30 = 450 pixels


def test_unedited_metrics_both_conventions():
    a = np.full((32, 32, 3), 0.5)
    b = a + 0.1
    mask = _left_half_mask()
    constant_ssim = (2 * 0.5 * 0.6 + C1) / (0.5**2 + 0.6**2 + C1)
    own = unedited_metrics(a, b, mask)
    assert own["mse"] == pytest.approx(0.01)
    assert own["psnr"] == pytest.approx(20.0)
    assert own["ssim"] == pytest.approx(constant_ssim, rel=1e-9)
    par = unedited_metrics(a, b, mask, parity=True)
    assert par["mse"] == pytest.approx(0.01 * 450 / 1024)
    assert par["psnr"] == pytest.approx(10 * math.log10(1024 / (0.01 * 450)))
    keep = (~mask)[..., None]
    assert par["ssim"] == pytest.approx(ssim(a * keep, b * keep))

    # Differences inside the edited region only: the unedited region is untouched.
    c = a.copy()
    c[mask] = 0.0
    for parity in (False, True):
        m = unedited_metrics(a, c, mask, parity=parity)
        assert (m["psnr"], m["mse"]) == (math.inf, 0.0)
        assert m["ssim"] == pytest.approx(1.0)

    # Nothing unedited: NaN in both conventions.
    for parity in (False, True):
        assert all(math.isnan(v) for v in unedited_metrics(a, b, np.ones((32, 32), bool), parity=parity).values())
    # Unedited pixels but no whole SSIM window inside them: PSNR defined, own SSIM NaN.
    small = np.ones((32, 32), bool)
    small[10:13, 10:13] = False
    m = unedited_metrics(a, b, small)
    assert m["psnr"] == pytest.approx(20.0) and math.isnan(m["ssim"])


def test_ssim_map_mean_is_the_project_ssim():
    rng = np.random.default_rng(0)
    a, b = rng.random((24, 20, 3)), rng.random((24, 20, 3))
    smap, window = ssim_map(a, b)
    assert window == 11 and smap.shape == (3, 14, 10)
    assert float(smap.mean()) == pytest.approx(ssim(a, b), rel=1e-12)


# -- summaries ---------------------------------------------------------------------------------
def _row(id_, method, type_id, psnr, mse, ssim_):
    return {"key": f"{id_}|{method}", "id": id_, "method": method, "editing_type_id": type_id, "psnr": psnr,
            "mse": mse, "ssim": ssim_, "structure": None, "lpips": None, "clip_whole": None, "clip_edited": None,
            "seconds": 1.0, "invert_seconds": 0.5, "unet_calls": 3, "unet_rows": 9, "blend": None,
            "reweight_words": ["dog"], "image_path": f"x/{id_}.jpg"}


def test_summary_skips_nan_and_scales_the_table(tmp_path):
    rows = [_row("a", "npi", "0", 20.0, 0.01, 0.9), _row("b", "npi", "0", math.nan, math.nan, math.nan),
            _row("c", "npi", "1", 30.0, 0.001, 0.8), _row("a", "ddim", "0", 10.0, 0.1, 0.5)]
    summary = summarize_piebench(rows)
    npi = next(r for r in summary["methods"] if r["method"] == "npi")
    assert npi["n"] == 3 and npi["psnr"] == 25.0 and npi["mse"] == pytest.approx(0.0055)
    assert math.isnan(npi["structure"]) and math.isnan(npi["clip_whole"])
    types = {(r["method"], r["editing_type_id"]): r for r in summary["by_type"]}
    assert types[("npi", "0")]["psnr"] == 20.0 and types[("npi", "0")]["n"] == 2
    table = piebench_table(summary)
    assert "| npi | all | 3 | n/a | 25.00 | n/a | 55.00 | 85.00 |" in table
    assert "| npi | 1 change object | 1 |" in table
    write_csv(rows, tmp_path / "r.csv")
    lines = (tmp_path / "r.csv").read_text().splitlines()
    assert lines[0].startswith("id,method,editing_type_id,image_path,structure,psnr")
    assert len(lines) == 5 and lines[1].startswith("a,ddim,0,x/a.jpg,,10.0,")


# -- the runner --------------------------------------------------------------------------------
def _rows(folder):
    return [json.loads(x) for x in (folder / "results.jsonl").read_text().splitlines()]


def test_run_piebench_end_to_end_and_resumable(tmp_path, sd_model, monkeypatch, capsys):
    data = tmp_path / "pie"
    make_bench(data)
    kw = {"methods": ("npi", "ddim"), "steps": 3}
    inversions = {"n": 0}
    real_inversion = pb.invert_one

    def counting_inversion(*args, **kwargs):
        inversions["n"] += 1
        return real_inversion(*args, **kwargs)

    monkeypatch.setattr(pb, "invert_one", counting_inversion)
    # The default networks are looked up in the (offline) cache; here they are missing whatever the cache holds.
    monkeypatch.delenv("NPINV_LPIPS_WEIGHTS", raising=False)
    real_load = NetworkMetrics.load
    missing = lambda **_: real_load(structure=tmp_path / "no-dino", clip=tmp_path / "no-clip")  # noqa: E731
    monkeypatch.setattr(pb.NetworkMetrics, "load", staticmethod(missing))
    clean_dir = tmp_path / "clean"
    summary = run_piebench(sd_model, data, clean_dir, **kw)
    assert inversions["n"] == 3  # one inversion per image, shared by both methods
    err = capsys.readouterr().err
    assert err.count("network metrics not computed") == 1 and err.count("\n") == 1
    assert "no-dino" in err and "NPINV_LPIPS_WEIGHTS" in err and "no-clip" in err
    for method in kw["methods"]:
        for rel, *_ in ENTRIES.values():
            out = clean_dir / method / "annotation_images" / rel.rsplit(".", 1)[0]
            assert out.with_suffix(".png").is_file()
    rows = _rows(clean_dir)
    assert sorted(r["key"] for r in rows) == sorted(f"{k}|{m}" for k in ENTRIES for m in kw["methods"])
    by = {r["key"]: r for r in rows}
    cat = by["000000000000|npi"]
    assert cat["blend"] == ["cat", "dog"] and cat["reweight_words"] == ["dog"]
    assert by["111000000002|npi"]["blend"] is None and by["111000000002|npi"]["reweight_words"] == []
    assert all(cat[k] is None for k in ("structure", "lpips", "clip_whole", "clip_edited"))
    assert cat["unavailable"] == ["structure", "lpips", "clip"]
    assert cat["unet_calls"] == 3 and by["000000000000|ddim"]["unet_calls"] == 3
    assert cat["unet_rows"] == 3 * 3 and by["000000000000|ddim"]["unet_rows"] == 3 * 4
    assert 0 < cat["mse"] < 1 and 0 < cat["psnr"] < math.inf
    assert math.isnan(cat["ssim"])  # the unedited ring is 7 px wide at 32 px: no whole 11 px SSIM window
    assert -1 <= by["600000000001|npi"]["ssim"] <= 1
    assert math.isnan(by["111000000002|npi"]["psnr"])  # everything is to be edited
    assert cat["editing_type_id"] == "0" and cat["steps"] == 3 and cat["offset"] == 0
    # The row's metrics are those of the saved file.
    from PIL import Image

    saved = np.asarray(Image.open(clean_dir / "npi/annotation_images/0_random_140/000000000000.png")) / 255.0
    source = np.asarray(Image.open(data / "annotation_images/0_random_140/000000000000.jpg")) / 255.0
    item = load_piebench(data)[0]
    assert unedited_metrics(source, saved, mask_for(item, 32, 32))["mse"] == pytest.approx(cat["mse"])
    assert {r["method"] for r in summary["methods"]} == {"npi", "ddim"}
    for name in ("summary.json", "table.md", "results.csv", "settings.json"):
        assert (clean_dir / name).is_file()

    # A second run has nothing to do.
    run_piebench(sd_model, data, clean_dir, **kw)
    assert len(_rows(clean_dir)) == 6 and inversions["n"] == 3
    with pytest.raises(NpinvError, match="other settings"):
        run_piebench(sd_model, data, clean_dir, methods=("npi",), steps=2)

    # Killed after 3 edits, then rerun: the same rows as the clean run, none twice.
    real_edit = pb.edit
    calls = {"n": 0}

    def dying(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] > 3:
            raise KeyboardInterrupt
        return real_edit(*args, **kwargs)

    monkeypatch.setattr(pb, "edit", dying)
    killed_dir = tmp_path / "killed"
    with pytest.raises(KeyboardInterrupt):
        run_piebench(sd_model, data, killed_dir, **kw)
    assert len(_rows(killed_dir)) == 3
    monkeypatch.setattr(pb, "edit", real_edit)
    run_piebench(sd_model, data, killed_dir, **kw)
    resumed = _rows(killed_dir)
    strip = lambda r: {k: v for k, v in r.items() if "seconds" not in k}  # noqa: E731
    assert sorted(map(json.dumps, map(strip, resumed))) == sorted(map(json.dumps, map(strip, rows)))


def test_run_piebench_with_network_metrics(tmp_path, sd_model, capsys):
    from test_netmetrics import build_clip, build_dino, build_lpips

    nets = NetworkMetrics.load(structure=build_dino(tmp_path / "dino"), lpips=build_lpips(tmp_path / "lpips.safetensors"),
                               clip=build_clip(tmp_path / "clip"), device="cpu")
    make_bench(tmp_path / "pie")
    rows = {}
    for parity in (False, True):
        out = tmp_path / f"out{parity}"
        run_piebench(sd_model, tmp_path / "pie", out, steps=2, limit=2, parity=parity, metrics=nets)
        rows[parity] = {r["key"]: r for r in _rows(out)}
    assert "not computed" not in capsys.readouterr().err
    for parity, by in rows.items():
        assert len(by) == 2
        for r in by.values():
            assert r["unavailable"] == [] and r["parity"] is parity
            assert r["structure"] > 0 and 0 <= r["clip_whole"] <= 100 and 0 <= r["clip_edited"] <= 100
        assert by["000000000000|npi"]["lpips"] > 0
        assert math.isnan(by["111000000002|npi"]["lpips"])  # everything is to be edited: nothing to compare
    # The rows score the saved files, as compute() does.
    from PIL import Image

    item = load_piebench(tmp_path / "pie")[0]
    saved = np.asarray(Image.open(tmp_path / "outFalse/npi/annotation_images/0_random_140/000000000000.png")) / 255.0
    source = np.asarray(Image.open(item.image_path)) / 255.0
    again = nets.compute(source, saved, mask_for(item, 32, 32), item.target_prompt)
    row = rows[False]["000000000000|npi"]
    for name in ("structure", "lpips", "clip_whole", "clip_edited"):
        assert again[name] == pytest.approx(row[name], rel=1e-5), name
    # Parity changes the structure input range and LPIPS averaging, not the CLIP score.
    par = rows[True]["000000000000|npi"]
    assert par["structure"] != pytest.approx(row["structure"]) and par["lpips"] != pytest.approx(row["lpips"])
    assert par["clip_whole"] == pytest.approx(row["clip_whole"])
    summary = json.loads((tmp_path / "outFalse/summary.json").read_text())
    assert summary["methods"][0]["lpips"] == pytest.approx(row["lpips"])  # the NaN row is skipped


def test_piebench_command(tmp_path, sd_folder, capsys):
    from npinv.cli import main

    make_bench(tmp_path / "data")
    out = tmp_path / "out"
    code = main(["--quiet", "bench", "piebench", "--data", str(tmp_path / "data"), "--steps", "2", "--model",
                 str(sd_folder), "--out", str(out), "--limit", "1"])
    assert code == 0
    assert (out / "results.jsonl").is_file() and "| npi" in capsys.readouterr().out
    code = main(["--quiet", "bench", "piebench", "--data", str(tmp_path / "nothing"), "--out", str(out)])
    assert code == 2


def test_piebench_on_a_flow_model_inverts_only_for_methods_that_sample_an_inversion(tmp_path, sd3_folder, capsys):
    from npinv.cli import main

    make_bench(tmp_path / "data")
    for methods, invert_calls in (("flowedit", 0), ("npi,flowedit", 2)):
        out = tmp_path / methods.replace(",", "_")
        code = main(["--quiet", "bench", "piebench", "--data", str(tmp_path / "data"), "--steps", "2", "--model",
                     str(sd3_folder), "--out", str(out), "--limit", "1", "--methods", methods])
        assert code == 0, capsys.readouterr().err
        rows = _rows(out)
        assert sorted(r["method"] for r in rows) == sorted(methods.split(","))
        assert {r["invert_unet_calls"] for r in rows} == {invert_calls}  # FlowEdit alone: the latents, no calls
        # Each method at its published guidance: the diffusion papers' 7.5, FlowEdit's 13.5 on SD3.
        published = {"npi": 7.5, "flowedit": 13.5}
        assert {r["method"]: r["guidance"] for r in rows} == {m: published[m] for m in methods.split(",")}
