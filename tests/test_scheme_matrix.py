"""Every method on every inversion scheme, through every front end: it works, or it is refused in one line.

The quality half runs on the embedded model's held-out scenes (what `make bench` measures): on an exact
inversion a method reconstructs at least as well as on a plain DDIM inversion (0.5 dB allowed).
"""

from __future__ import annotations

import json

import pytest
import torch

from npinv.bench.reconstruct import HELD_OUT_SEED
from npinv.cli import main
from npinv.errors import NpinvError
from npinv.methods import METHODS, check_scheme, get_method, reconstruct
from npinv.scenes import random_scenes
from npinv.schemes import SCHEMES
from npinv.service import invert_one, prepare_picture, reconstruct_inverted
from npinv.settings import InvertSettings, ReconstructSettings

PROMPT = "a red circle on a blue background"
# What the UNet models here take: the flow-only schemes (midpoint, fireflow) and methods (flowedit) are
# refused on them in one line (tests/test_flow_methods.py covers them on flow models).
UNET_METHODS = [m for m, method in METHODS.items() if not method.flow_only]
UNET_SCHEMES = [s for s, scheme in SCHEMES.items() if not scheme.flow_only]


def _refused(method: str, scheme: str) -> bool:
    try:
        check_scheme(method, scheme)
    except NpinvError:
        return True
    return False


REFUSED = {(m, s) for m in METHODS for s in SCHEMES if _refused(m, s)}


def test_the_refused_combinations():
    # Only plain DDIM sampling (null negative) cannot take BDIA's coupled step, and NTI (one Euler step
    # optimised) cannot take the flow schemes' second-order step; every other pair works.
    assert REFUSED == {("ddim", "bdia"), ("nti", "midpoint"), ("nti", "fireflow")}
    with pytest.raises(NpinvError, match="method ddim cannot sample a bdia inversion.*--invert-scheme ddim, "
                                         "fixed-point or anderson$"):
        check_scheme("ddim", "bdia")


@pytest.fixture(scope="module")
def embedded():
    from npinv import load_model

    return load_model(None, device="cpu")


@pytest.mark.slow
@pytest.mark.parametrize("steps", [10, 20])
def test_each_method_reconstructs_on_each_scheme_as_well_as_on_ddim_inversion(embedded, steps):
    """Held-out scenes at w 7.5: NPI's family and NTI lose at most 0.5 dB against their own figure on a
    plain DDIM inversion (NTI used to fall to 7-14 dB on BDIA and 0.8-3.3 dB below on fixed point at
    10 steps). DDIM sampling (null negative) drifts at w > 1 from any inversion, by how much depends on
    the scene (measured 15 to 31 dB here): at w 1 it is the round trip, NPI's reconstruction exactly."""
    for scene in random_scenes(HELD_OUT_SEED, 2):
        source = prepare_picture(scene.render(embedded.resolution), embedded, InvertSettings(), name="scene")
        psnr: dict[tuple[str, str], float] = {}
        for scheme in UNET_SCHEMES:
            inverted = invert_one(embedded, source, scene.caption, InvertSettings(steps=steps, invert_scheme=scheme))
            for method in UNET_METHODS:
                if (method, scheme) in REFUSED:
                    with pytest.raises(NpinvError, match="cannot sample"):
                        reconstruct_inverted(embedded, inverted, ReconstructSettings(method, 7.5))
                    continue
                if method == "ddim":
                    w1 = reconstruct(embedded, inverted.inversion, "ddim", 1.0).latent
                    assert torch.equal(w1, reconstruct(embedded, inverted.inversion, "npi", 7.5).latent), scheme
                    continue
                psnr[method, scheme] = reconstruct_inverted(embedded, inverted, ReconstructSettings(method, 7.5)).psnr
        for (method, scheme), value in psnr.items():
            assert value >= psnr[method, "ddim"] - 0.5, (scene.caption, steps, method, scheme, psnr)


def test_nti_on_an_exact_inversion_starts_from_the_source_and_keeps_it(sd_model, image_file):
    """On an exact inversion the source embedding lands every step on the trajectory, so NTI starts there
    and takes no Adam step that would move it: its reconstruction is NPI's, at 2 UNet calls a step."""
    from npinv.inversion import ddim_inversion
    from npinv.service import prepare_file

    x = prepare_file(image_file, sd_model, InvertSettings()).image
    for scheme in ("bdia", "fixed-point"):
        inv = ddim_inversion(sd_model, x, PROMPT, steps=6, scheme=scheme, tol=1e-5)
        npi, nti = reconstruct(sd_model, inv, "npi", 7.5), reconstruct(sd_model, inv, "nti", 7.5)
        assert torch.equal(nti.latent, npi.latent), scheme
        assert all(len(losses) == 1 for losses in nti.inversion.nti["losses"])  # stopped before any Adam step
        assert nti.cost.unet_calls == 2 * npi.cost.unet_calls


# -- the front ends --------------------------------------------------------------------------------
def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(["--quiet", *argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def one_line_refusal(code: int, err: str, *needles: str) -> None:
    assert code == 2 and err.count("\n") == 1 and err.startswith("npinv: error: "), err
    for needle in needles:
        assert needle in err, err


@pytest.mark.parametrize("scheme", list(SCHEMES))
@pytest.mark.parametrize("method", list(METHODS))
def test_reconstruct_and_edit_take_every_pair_or_refuse_it(capsys, tmp_path, sd_folder, image_file, method, scheme):
    model = ["--model", str(sd_folder)]
    out = tmp_path / "rec.png"
    code, stdout, err = run(capsys, "reconstruct", str(image_file), "--prompt", PROMPT, "--method", method,
                            "--invert-scheme", scheme, "--steps", "3", "--out", str(out), "--json", *model)
    edit = tmp_path / "edit.png"
    code_e, stdout_e, err_e = run(capsys, "edit", str(image_file), "--source", PROMPT, "--target",
                                  "a red square on a blue background", "--controller", "replace", "--method", method,
                                  "--invert-scheme", scheme, "--steps", "3", "--out", str(edit), "--json", *model)
    if (method, scheme) in REFUSED:
        one_line_refusal(code, err, f"method {method} cannot sample a {scheme} inversion")
        one_line_refusal(code_e, err_e, f"method {method} cannot sample a {scheme} inversion")
        assert sorted(p.name for p in tmp_path.iterdir()) == ["input.png"]
        return
    if method not in UNET_METHODS or scheme not in UNET_SCHEMES:  # flow models only: one line on a UNet model
        one_line_refusal(code, err, "flow")
        one_line_refusal(code_e, err_e, "for flow-matching models")
        assert sorted(p.name for p in tmp_path.iterdir()) == ["input.png"]
        return
    assert code == 0 and code_e == 0, err + err_e
    row, edited = json.loads(stdout), json.loads(stdout_e)
    assert row["method"] == method and row["invert_scheme"] == scheme and out.is_file()
    assert edited["method"] == method and edit.is_file()


def test_edit_with_a_saved_inversion_checks_its_scheme(capsys, tmp_path, sd_folder, image_file):
    """--inversion: the file's scheme is the edit's. A method that cannot sample it, or a scheme flag with
    another value than the file's (it would be ignored), is refused in one line; the file's own value is fine."""
    model = ["--model", str(sd_folder)]
    inv = tmp_path / "inv.safetensors"
    code, _, err = run(capsys, "reconstruct", str(image_file), "--prompt", PROMPT, "--steps", "3", "--out",
                       str(tmp_path / "rec.png"), "--save-inversion", str(inv), *model)
    assert code == 0, err
    edit = ["edit", str(image_file), "--inversion", str(inv), "--target", "a red square on a blue background",
            "--controller", "replace", "--out", str(tmp_path / "edit.png"), *model]
    one_line_refusal(*run(capsys, *edit, "--method", "ddim")[::2], "method ddim cannot sample a bdia inversion")
    one_line_refusal(*run(capsys, *edit, "--invert-scheme", "anderson")[::2],
                     "--invert-scheme anderson does not apply to --inversion", "made with invert-scheme bdia")
    one_line_refusal(*run(capsys, *edit, "--bdia-gamma", "0.9")[::2], "--bdia-gamma 0.9 does not apply")
    one_line_refusal(*run(capsys, *edit, "--decoder-steps", "5")[::2], "--decoder-steps 5 does not apply")
    assert not (tmp_path / "edit.png").exists()
    code, _, err = run(capsys, *edit, "--invert-scheme", "bdia", "--bdia-gamma", "1")
    assert code == 0 and err == "", err


@pytest.mark.parametrize(("flags", "needle"), [
    (["--invert-scheme", "ddim", "--bdia-gamma", "0.9"], "bdia-gamma applies to --invert-scheme bdia only, not ddim"),
    (["--invert-scheme", "anderson", "--bdia-gamma", "0.9"], "bdia-gamma applies to --invert-scheme bdia only"),
    (["--invert-scheme", "bdia", "--invert-iters", "5"], "invert-iters applies to --invert-scheme fixed-point and "
                                                         "anderson only, not bdia"),
    (["--invert-scheme", "ddim", "--invert-tol", "0.01"], "invert-tol applies to --invert-scheme fixed-point"),
    (["--method", "nti", "--invert-iters", "5"], "not ddim"),  # NTI's own default scheme is plain DDIM
])
@pytest.mark.parametrize("command", ["reconstruct", "edit", "edit-video", "edit-batch"])
def test_a_knob_the_scheme_does_not_use_is_refused(capsys, tmp_path, image_file, command, flags, needle):
    args = {"reconstruct": ["reconstruct", str(image_file), "--prompt", PROMPT, "--out", str(tmp_path / "r.png")],
            "edit": ["edit", str(image_file), "--source", PROMPT, "--target", PROMPT, "--out", str(tmp_path / "e.png")],
            "edit-video": ["edit-video", str(tmp_path / "clip.mp4"), "--source", PROMPT, "--target", PROMPT,
                           "--out", str(tmp_path / "v.mp4")],
            "edit-batch": ["edit-batch", str(tmp_path / "m.jsonl"), "--out", str(tmp_path / "edits")]}[command]
    code, out, err = run(capsys, *args, *flags)
    one_line_refusal(code, err, needle)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["input.png"]


def test_edit_batch_refuses_a_row_whose_method_cannot_sample_its_scheme(capsys, tmp_path, image_file):
    manifest = tmp_path / "m.jsonl"
    rows = [{"image": str(image_file), "source": PROMPT, "targets": [PROMPT]},
            {"image": str(image_file), "source": PROMPT, "targets": [PROMPT], "method": "ddim", "invert_scheme": "bdia"}]
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    code, _, err = run(capsys, "edit-batch", str(manifest), "--out", str(tmp_path / "edits"))
    one_line_refusal(code, err, "m.jsonl:2:", "method ddim cannot sample a bdia inversion")
    assert not (tmp_path / "edits").exists()


def test_bench_and_edit_video_refuse_the_pair_before_any_work(capsys, tmp_path, image_file):
    code, _, err = run(capsys, "bench", "reconstruct", "--shapes", "1", "--methods", "npi@bdia,ddim@bdia",
                       "--steps", "2", "--out", str(tmp_path / "bench"))
    one_line_refusal(code, err, "method ddim cannot sample a bdia inversion")
    assert not (tmp_path / "bench").exists()
    code, _, err = run(capsys, "edit-video", str(tmp_path / "clip.mp4"), "--source", PROMPT, "--target", PROMPT,
                       "--method", "ddim", "--invert-scheme", "bdia", "--out", str(tmp_path / "v.mp4"))
    one_line_refusal(code, err, "method ddim cannot sample a bdia inversion")


def test_the_web_app_refuses_the_pair_in_one_line(embedded, tmp_path, image_file):
    from npinv.webapp.engine import Engine, Limits

    engine = Engine(embedded, Limits(max_pixels=1_000_000, max_upload_mb=1, max_steps=50), files_dir=tmp_path / "f")
    try:
        cache = engine.new_cache()
        with pytest.raises(NpinvError, match="^method ddim cannot sample a bdia inversion") as err:
            engine.edit(cache, image_file, PROMPT, engine.edit_request("a red square on a blue background",
                                                                       method="ddim", controller="replace"),
                        steps=3, invert_scheme="bdia")
        assert "\n" not in str(err.value) and len(cache) == 0  # refused before inverting
        for method in UNET_METHODS:  # every other method edits a BDIA inversion
            if (method, "bdia") not in REFUSED:
                report = engine.edit(cache, image_file, PROMPT, engine.edit_request(
                    "a red square on a blue background", method=method, controller="replace"),
                    steps=3, invert_scheme="bdia")
                assert report.result.settings.method == method
    finally:
        engine.close()


def test_reconstruct_help_names_each_methods_default_scheme(capsys):
    with pytest.raises(SystemExit):
        main(["reconstruct", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(default bdia for npi, proxnpi, proxnpi-noig; ddim for nti, ddim)" in text
    assert {m.reconstruct_scheme for m in METHODS.values()} == {"bdia", "ddim"}
    assert get_method("nti").reconstruct_scheme == "ddim"


def test_a_flow_only_method_is_refused_on_a_unet_model_before_inverting(capsys, tmp_path, sd_folder, image_file,
                                                                         monkeypatch):
    import npinv.service

    def no_inversion(*args, **kwargs):
        raise AssertionError("inverted before refusing")

    monkeypatch.setattr(npinv.service, "invert", no_inversion)
    code, _, err = run(capsys, "edit", str(image_file), "--source", PROMPT, "--target", "a red square on a blue background",
                       "--method", "flowedit", "--steps", "3", "--model", str(sd_folder), "--out", str(tmp_path / "e.png"))
    one_line_refusal(code, err, "method flowedit is for flow-matching models")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["input.png"]
