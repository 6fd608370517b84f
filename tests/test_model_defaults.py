"""Model-declared defaults: a model folder's ``npinv.json`` {"edit_guidance": w, "edit_self_replace": f}
is the guidance and self-attention replace window every edit command (edit, edit-batch, edit-video,
serve) uses unless told otherwise; 7.5 and 0.6 without one. Reconstruction and generation keep 7.5."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from npinv.cli import build_parser, main
from npinv.errors import NpinvError
from npinv.model import DEFAULT_EDIT_GUIDANCE, SETTINGS_FILE, embedded_model_path, load_model, model_edit_guidance
from npinv.scenes import Scene
from videos import make_video

SOURCE = "a red circle on a blue background"
TARGET = "a green circle on a blue background"


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main(["--quiet", *(str(a) for a in argv)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def with_settings(sd_folder: Path, tmp_path: Path, text: str | None, name: str = "model") -> Path:
    """A copy of the session's tiny model (fixtures are shared) with ``text`` as its npinv.json."""
    folder = shutil.copytree(sd_folder, tmp_path / name)
    if text is not None:
        (folder / SETTINGS_FILE).write_text(text)
    return folder


@pytest.fixture
def declared(sd_folder, tmp_path) -> Path:
    return with_settings(sd_folder, tmp_path, json.dumps({"edit_guidance": 3.0, "edit_self_replace": 0.2}))


def one_error_line(code: int, stderr: str) -> str:
    lines = [ln for ln in stderr.strip().splitlines() if ln]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("npinv: error:"), stderr
    return lines[0]


# -- reading npinv.json -------------------------------------------------------------------------
def test_the_embedded_model_declares_its_model_cards_guidance():
    card = json.loads((embedded_model_path() / "model_card_figures.json").read_text())
    assert model_edit_guidance(None) == model_edit_guidance("default") == card["recommended_guidance"]
    assert card["recommended_guidance"] != DEFAULT_EDIT_GUIDANCE  # the card's sweep found a lower one


def test_folders_without_the_file_hub_ids_and_files_give_7_5(sd_folder, tmp_path):
    checkpoint = tmp_path / "model.safetensors"
    checkpoint.write_bytes(b"")
    for spec in (sd_folder, str(sd_folder), "org/some-model", checkpoint, tmp_path / "missing"):
        assert model_edit_guidance(spec) == DEFAULT_EDIT_GUIDANCE == 7.5


def test_a_declaring_folder_still_loads_with_diffusers(declared, sd_model):
    assert model_edit_guidance(declared) == 3.0
    model = load_model(str(declared), device="cpu")
    assert (model.edit_guidance, model.edit_self_replace) == (3.0, 0.2)
    assert (sd_model.edit_guidance, sd_model.edit_self_replace) == (7.5, 0.6)  # the same weights without npinv.json
    ours, theirs = model.unet.state_dict(), sd_model.unet.state_dict()
    assert all(ours[k].equal(theirs[k]) for k in theirs)


@pytest.mark.parametrize("text,match", [
    ("{edit_guidance: 2.5}", "not valid JSON"),
    ("", "not valid JSON"),
    ("[2.5]", "expected a JSON object"),
    ('{"edit_guidance": 0}', "positive finite number, got 0"),
    ('{"edit_guidance": -1.5}', "positive finite number, got -1.5"),
    ('{"edit_guidance": "2.5"}', "positive finite number, got '2.5'"),
    ('{"edit_guidance": true}', "positive finite number, got True"),
    ('{"edit_guidance": NaN}', "positive finite number, got nan"),
    ('{"edit_guidance": Infinity}', "positive finite number, got inf"),
    ('{"edit_self_replace": 1.5}', "'edit_self_replace' must be a fraction in 0..1 or a window"),
    ('{"edit_self_replace": -0.1}', "'edit_self_replace' must be a fraction in 0..1 or a window"),
    ('{"edit_self_replace": "0.2"}', "'edit_self_replace' must be a fraction .* got '0.2'"),
    ('{"edit_self_replace": [0.5, 0.2]}', r"with START <= END, got \[0.5, 0.2\]"),
    ('{"edit_self_replace": [0.1]}', r"'edit_self_replace' must be .* got \[0.1\]"),
    ('{"edit_self_replace": null}', "'edit_self_replace' must be .* got None"),
    ('{"edit_self_replace": true}', "'edit_self_replace' must be .* got True"),
    ('{"max_sequence_length": -1}', "integer in 0..512, got -1"),
    ('{"max_sequence_length": 600}', "integer in 0..512, got 600"),
    ('{"max_sequence_length": 1.5}', "integer in 0..512, got 1.5"),
    ('{"max_sequence_length": true}', "integer in 0..512, got True"),
])
def test_a_broken_file_is_one_error_naming_it(sd_folder, tmp_path, text, match):
    folder = with_settings(sd_folder, tmp_path, text)
    with pytest.raises(NpinvError, match=match) as err:
        model_edit_guidance(folder)
    assert str(folder / SETTINGS_FILE) in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(NpinvError, match=match):
        load_model(str(folder), device="cpu")  # before the (slow) load


def test_a_declared_window_is_read_as_the_flag_reads_it(sd_folder, tmp_path):
    from npinv.model import model_settings

    for text, want in (('{"edit_self_replace": [0.1, 0.3]}', (0.1, 0.3)), ('{"edit_self_replace": 0}', 0.0),
                       ('{"edit_self_replace": 1}', 1.0), ("{}", 0.6)):
        folder = with_settings(sd_folder, tmp_path, text, name=f"m{len(list(tmp_path.iterdir()))}")
        assert model_settings(folder).edit_self_replace == want


def test_unknown_keys_warn_and_are_ignored(sd_folder, tmp_path):
    from npinv.model import NpinvWarning

    folder = with_settings(sd_folder, tmp_path, '{"edit_guidence": 2.0}')
    with pytest.warns(NpinvWarning, match="unknown key"):
        assert model_edit_guidance(folder) == 7.5


def test_help_says_where_the_default_comes_from():
    from npinv.settings import EditSettings, ReconstructSettings

    assert EditSettings().guidance is None and ReconstructSettings().guidance == 7.5  # the paper's reconstruction setting
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices
    for command in ("edit", "edit-batch", "edit-video"):
        flag = next(a for a in sub[command]._actions if a.dest == "guidance")
        assert flag.help == ("guidance scale w (default: the model's recommended editing guidance, else 7.5; "
                             "flowedit: the paper's target guidance)")
        flag = next(a for a in sub[command]._actions if a.dest == "self_replace")
        assert flag.help.endswith("(default: the model's recommended window, else 0.6)")
    for command in ("reconstruct", "generate"):
        assert "(default 7.5)" in next(a for a in sub[command]._actions if a.dest == "guidance").help


# -- the commands ---------------------------------------------------------------------------------
def edit(capsys, tmp_path, model, image_file, *extra, name="edit.png"):
    return run(capsys, "edit", image_file, "--source", SOURCE, "--target", TARGET, "--controller", "replace",
               "--steps", 2, "--model", model, "--out", tmp_path / name, "--json", *extra)


def test_edit_uses_the_declared_guidance_and_the_flag_overrides_it(capsys, tmp_path, declared, sd_folder,
                                                                  image_file):
    code, stdout, stderr = edit(capsys, tmp_path, declared, image_file)
    assert code == 0, stderr
    assert (json.loads(stdout)["guidance"], json.loads(stdout)["self_replace"]) == (3.0, 0.2)
    code, stdout, _ = edit(capsys, tmp_path, declared, image_file, "--guidance", 4, "--self-replace", "0.1,0.5",
                           name="flag.png")
    assert code == 0 and (json.loads(stdout)["guidance"], json.loads(stdout)["self_replace"]) == (4.0, [0.1, 0.5])
    code, stdout, _ = edit(capsys, tmp_path, sd_folder, image_file, name="plain.png")
    assert code == 0 and (json.loads(stdout)["guidance"], json.loads(stdout)["self_replace"]) == (7.5, 0.6)
    # The declared values are the flags': the same pixels as the plain folder told them.
    code, _, _ = edit(capsys, tmp_path, sd_folder, image_file, "--guidance", 3, "--self-replace", 0.2, name="told.png")
    assert code == 0 and images_equal(tmp_path / "edit.png", tmp_path / "told.png")
    assert not images_equal(tmp_path / "edit.png", tmp_path / "plain.png")


def images_equal(a: Path, b: Path) -> bool:
    import numpy as np
    from PIL import Image

    return np.array_equal(np.asarray(Image.open(a)), np.asarray(Image.open(b)))


def test_reconstruct_keeps_7_5(capsys, tmp_path, declared, image_file):
    code, stdout, stderr = run(capsys, "reconstruct", image_file, "--prompt", SOURCE, "--steps", 2, "--model",
                               declared, "--out", tmp_path / "rec.png", "--json")
    assert code == 0, stderr
    assert json.loads(stdout)["guidance"] == 7.5


def test_edit_with_a_broken_file_exits_2_with_one_line(capsys, tmp_path, sd_folder, image_file):
    folder = with_settings(sd_folder, tmp_path, '{"edit_guidance": -1}')
    before = {p.name for p in tmp_path.iterdir()}
    code, stdout, stderr = edit(capsys, tmp_path, folder, image_file)
    line = one_error_line(code, stderr)
    assert str(folder / SETTINGS_FILE) in line and "positive finite number" in line
    assert stdout == "" and {p.name for p in tmp_path.iterdir()} == before  # nothing written
    # An explicit --guidance does not hide it: the model's folder is broken either way.
    code, _, stderr = edit(capsys, tmp_path, folder, image_file, "--guidance", 2)
    assert "positive finite number" in one_error_line(code, stderr)


@pytest.fixture
def manifest(tmp_path) -> Path:
    data = tmp_path / "data"
    data.mkdir()
    Scene("circle", "red", "blue", 0.5).render(32).save(data / "a.png")
    Scene("square", "red", "blue", 0.5).render(32).save(data / "b.png")
    rows = [{"image": "a.png", "source": SOURCE, "target": TARGET},
            {"image": "b.png", "source": "a red square on a blue background",
             "target": "a green square on a blue background", "guidance": 2.0, "self_replace": [0.1, 0.4]}]
    path = data / "manifest.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def results(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "results.jsonl").read_text().splitlines()]


def test_edit_batch_rows_without_guidance_take_the_models(capsys, tmp_path, declared, sd_folder, manifest):
    out = tmp_path / "out"
    args = ("edit-batch", manifest, "--out", out, "--model", declared, "--steps", 2, "--json")
    code, stdout, stderr = run(capsys, *args)
    assert code == 0, stderr
    assert json.loads(stdout)["default_guidance"] == 3.0 and json.loads(stdout)["default_self_replace"] == 0.2
    assert [r["guidance"] for r in results(out)] == [3.0, 2.0]  # the second row sets its own
    assert [r["self_replace"] for r in results(out)] == [0.2, [0.1, 0.4]]
    # Results are keyed by the resolved numbers: the same run with the flags spelled out resumes.
    code, stdout, _ = run(capsys, *args, "--guidance", 3, "--self-replace", 0.2)
    again = json.loads(stdout)
    assert code == 0 and again["done_before"] == 2 and again["done_now"] == 0 and again["unet_calls"] == 0

    flag = tmp_path / "flag"
    code, stdout, _ = run(capsys, "edit-batch", manifest, "--out", flag, "--model", declared, "--steps", 2,
                          "--guidance", 4, "--json")
    assert code == 0 and json.loads(stdout)["default_guidance"] == 4.0
    assert [r["guidance"] for r in results(flag)] == [4.0, 2.0]

    plain = tmp_path / "plain"
    code, stdout, _ = run(capsys, "edit-batch", manifest, "--out", plain, "--model", sd_folder, "--steps", 2,
                          "--json")
    assert code == 0 and json.loads(stdout)["default_guidance"] == 7.5
    assert [r["guidance"] for r in results(plain)] == [7.5, 2.0]
    assert [r["self_replace"] for r in results(plain)] == [0.6, [0.1, 0.4]]


def test_edit_batch_with_a_broken_file_exits_2_with_one_line(capsys, tmp_path, sd_folder, manifest):
    folder = with_settings(sd_folder, tmp_path, "not json")
    code, stdout, stderr = run(capsys, "edit-batch", manifest, "--out", tmp_path / "out", "--model", folder,
                               "--steps", 2, "--json")
    line = one_error_line(code, stderr)
    assert str(folder / SETTINGS_FILE) in line and "not valid JSON" in line
    assert stdout == "" and not (tmp_path / "out").exists()


def test_edit_video_uses_the_declared_guidance(capsys, tmp_path, declared):
    pytest.importorskip("av")
    video = make_video(tmp_path / "in.mp4", frames=2, rate=8)
    for extra, want in (((), (3.0, 0.2)), (("--guidance", 4, "--self-replace", 0.5), (4.0, 0.5))):
        code, stdout, stderr = run(capsys, "edit-video", video, "--source", SOURCE, "--target", TARGET, "--steps", 2,
                                   "--model", declared, "--out", tmp_path / f"out{want[0]:g}.mp4", "--json", *extra)
        assert code == 0, stderr
        assert (json.loads(stdout)["guidance"], json.loads(stdout)["self_replace"]) == want


# -- the web app ---------------------------------------------------------------------------------
def test_serve_starts_at_the_declared_guidance(declared, sd_model, tmp_path):
    from npinv.webapp.app import ServeOptions, build_app
    from npinv.webapp.engine import Engine, parse_edit_request

    for model, want, window in ((load_model(str(declared), device="cpu"), 3.0, 0.2), (sd_model, 7.5, 0.6)):
        engine = Engine(model, files_dir=tmp_path / f"files{want:g}")
        assert engine.edit_guidance == want
        settings = engine.edit_request(TARGET).settings  # the engine's defaults
        assert (settings.guidance, settings.self_replace) == (want, window)
        for empty in (None, "", "default"):  # the form's empty boxes, or a client's null
            settings = engine.edit_request(TARGET, guidance=empty, self_replace=empty).settings
            assert (settings.guidance, settings.self_replace) == (want, window)
        settings = engine.edit_request(TARGET, guidance=5, self_replace="0.1,0.3").settings
        assert (settings.guidance, settings.self_replace) == (5.0, (0.1, 0.3))
        demo = build_app(engine, ServeOptions(examples=False))
        controls = {getattr(b, "elem_id", None): b for b in demo.blocks.values()}
        assert controls["npinv-guidance"].value == want
        assert controls["npinv-self-replace"].value == f"{window:g}"  # the box shows the model's window
    settings = parse_edit_request(TARGET).settings
    assert (settings.guidance, settings.self_replace) == (7.5, 0.6)  # without a model: npinv's


def test_a_declared_t5_length_reaches_the_flow_model_and_the_default_stays_the_pipelines(sd3_no_t5_folder, tmp_path):
    from npinv.model import model_settings

    assert load_model(str(sd3_no_t5_folder)).max_sequence_length == 256  # StableDiffusion3Pipeline's default
    folder = with_settings(sd3_no_t5_folder, tmp_path, '{"max_sequence_length": 0, "edit_guidance": 3.5}')
    assert model_settings(folder).max_sequence_length == 0
    model = load_model(str(folder))
    assert model.max_sequence_length == 0 and model.edit_guidance == 3.5
    assert model.encode_prompt("a red circle").hidden.shape[1] == model.pipe.tokenizer.model_max_length


# -- every method and controller under the declared window (the library, as the front ends call it) ----
@pytest.fixture(scope="module")
def declared_model(sd_folder, tmp_path_factory):
    folder = with_settings(sd_folder, tmp_path_factory.mktemp("declared"),
                           json.dumps({"edit_guidance": 3.0, "edit_self_replace": 0.5}))
    return load_model(str(folder), device="cpu")


def _controller_settings(controller: str) -> tuple[dict, str]:
    """The controller's settings and a target it takes (reweight keeps the source's words)."""
    if controller == "reweight":
        return {"reweight": {"red": 2.0}}, SOURCE
    return ({"blend": ("red", "green")} if controller == "replace" else {}), TARGET


@pytest.mark.parametrize("method", ["npi", "proxnpi", "proxnpi-noig", "nti", "ddim"])
def test_every_method_and_controller_takes_the_declared_window(declared_model, sd_model, image_file, method):
    import torch

    from npinv.attention.controllers import controller_names
    from npinv.cache import InversionCache
    from npinv.service import edit_image, invert_one, prepare_file
    from npinv.settings import EditSettings, InvertSettings

    invert = InvertSettings(steps=4)
    cache = InversionCache()  # one inversion (and one NTI optimisation) for every edit below
    source = prepare_file(image_file, sd_model, invert)
    inverted = invert_one(sd_model, source, SOURCE, invert, cache=cache)

    def run(model, controller, **settings):
        extra, target = _controller_settings(controller)
        return edit_image(model, source, SOURCE, [target], EditSettings(
            method=method, controller=controller, **extra, **settings), invert, inversion=inverted, cache=cache)

    for controller in controller_names():
        left = run(declared_model, controller)
        assert (left.settings.guidance, left.settings.self_replace) == (3.0, 0.5)
        assert torch.equal(left.images, run(sd_model, controller, guidance=3.0, self_replace=0.5).images), controller
        if controller != "none":  # the window is used: 0.25 (1 of 4 steps) is not 0.5 (2 of 4)
            other = run(sd_model, controller, guidance=3.0, self_replace=0.25)
            assert not torch.equal(left.images, other.images), controller


def test_models_says_what_each_models_edits_default_to(capsys, declared):
    code, stdout, stderr = run(capsys, "models", "--json", "--model", declared)
    assert code == 0, stderr
    info = json.loads(stdout)
    assert (info["model"]["edit_guidance"], info["model"]["edit_self_replace"]) == (3.0, 0.2)
    flow = json.loads((embedded_model_path("shapes-flow") / SETTINGS_FILE).read_text())
    assert info["shapes-flow"]["edit_self_replace"] == flow["edit_self_replace"] != 0.6
    assert info["default"]["edit_self_replace"] == 0.6  # the UNet model declares none
    code, stdout, _ = run(capsys, "models", "--model", declared)
    assert code == 0 and "edits: guidance 3, self-replace 0.2" in stdout.splitlines()[-1]


# -- a method's own default guidance: FlowEdit's is the paper's target guidance ---------------------------
def test_flowedit_defaults_to_the_papers_target_guidance_on_every_front_end(capsys, tmp_path, sd3_folder,
                                                                          flux_dev_folder, image_file):
    from npinv.settings import EditSettings
    from npinv.webapp.app import method_guidance
    from npinv.webapp.engine import Engine

    declared = with_settings(sd3_folder, tmp_path, json.dumps({"edit_guidance": 3.5}))  # tuned for NPI edits
    sd3, flux = load_model(str(declared)), load_model(str(flux_dev_folder))
    assert EditSettings(method="flowedit").resolved(sd3).guidance == 13.5  # Kulikov et al.'s SD3 setting
    assert EditSettings(method="flowedit").resolved(flux).guidance == 5.5  # ... and FLUX.1-dev's (embedded)
    assert EditSettings(method="npi").resolved(sd3).guidance == 3.5  # the model's, for sampling an inversion
    assert EditSettings(method="flowedit", guidance=4.0).resolved(sd3).guidance == 4.0

    def edit_json(*extra) -> dict:
        code, stdout, stderr = run(capsys, "edit", image_file, "--source", SOURCE, "--target", TARGET, "--steps", 2,
                                   "--size", 32, "--model", declared, "--out", tmp_path / "e.png", "--json", *extra)
        assert code == 0, stderr
        return json.loads(stdout)

    assert edit_json("--method", "flowedit")["guidance"] == 13.5
    assert edit_json("--method", "flowedit", "--guidance", 4)["guidance"] == 4.0
    assert edit_json("--controller", "none")["guidance"] == 3.5
    # edit-batch: each row's method picks its default, whatever the flags' method.
    manifest = tmp_path / "rows.jsonl"
    manifest.write_text("".join(json.dumps({"image": str(image_file), "source": SOURCE, "target": TARGET, **r}) + "\n"
                                for r in ({"method": "flowedit"}, {"controller": "none"})))
    code, stdout, stderr = run(capsys, "edit-batch", manifest, "--out", tmp_path / "batch", "--model", declared,
                               "--steps", 2, "--size", 32, "--json")
    assert code == 0, stderr
    assert json.loads(stdout)["default_guidance"] == 3.5  # the flags' method (npi)
    assert [r["guidance"] for r in results(tmp_path / "batch")] == [13.5, 3.5]
    # The web app: a request without a guidance, and the slider moving with the method.
    engine = Engine(sd3, files_dir=tmp_path / "files")
    assert engine.edit_request(TARGET, method="flowedit").settings.guidance == 13.5
    assert (method_guidance(engine, "flowedit"), method_guidance(engine, "npi")) == (13.5, 3.5)
