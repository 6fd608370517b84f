"""The web app (``npinv serve``): its model-facing engine, then a real server on a free localhost
port driven over HTTP by ``gradio_client`` (several clients at once), then the command itself."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError
from PIL import Image

from npinv.demo import bundled_examples
from npinv.errors import NpinvError
from npinv.inversion import Inversion
from npinv.model import ModelSettings
from npinv.schemes import SCHEMES, scheme_names
from npinv.service import prepare_file
from npinv.settings import (
    DEFAULT_INVERT_ITERS,
    DEFAULT_INVERT_TOL,
    FLOWEDIT_KNOBS,
    EditSettings,
    InvertSettings,
    flag_name,
    from_value,
    specs,
)
from npinv.webapp.app import ServeOptions, build_app, is_loopback, launch
from npinv.webapp.engine import (
    FORM_FIELDS,
    INVERT_DEFAULTS,
    INVERT_FIELDS,
    Engine,
    Limits,
    parse_edit_request,
    read_upload,
)

STEPS = 10  # the embedded 64x64 model: about 0.1 s a step on one core
EXAMPLE = bundled_examples()[0]  # a red circle on a blue background


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def primary_ip() -> str | None:
    """This machine's address on its default route, if it has one (a UDP connect sends nothing)."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("10.255.255.255", 1))
            return s.getsockname()[0]
    except OSError:
        return None


@pytest.fixture(scope="module")
def model():
    from npinv import load_model

    return load_model(None, device="cpu")


@pytest.fixture(scope="module")
def engine(model, tmp_path_factory):
    engine = Engine(model, Limits(max_pixels=1_000_000, max_upload_mb=1, max_steps=50),
                    files_dir=tmp_path_factory.mktemp("files"))
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def server(engine):
    options = ServeOptions(port=free_port(), queue_size=8)
    demo = build_app(engine, options)
    url = launch(demo, engine, options)
    yield url
    demo.close()


def client(url: str, tmp_path: Path) -> Client:
    # A new Client is a new session (its own session hash), like a new browser tab.
    return Client(url, verbose=False, analytics_enabled=False, download_files=str(tmp_path))


def bad_files(tmp_path: Path) -> dict[str, Path]:
    files = {}
    files["text"] = tmp_path / "notes.png"
    files["text"].write_text("not a picture")
    files["empty"] = tmp_path / "empty.png"
    files["empty"].write_bytes(b"")
    Image.effect_noise((64, 64), 40).convert("RGB").save(tmp_path / "full.png")
    files["truncated"] = tmp_path / "cut.png"
    files["truncated"].write_bytes((tmp_path / "full.png").read_bytes()[:300])
    files["huge"] = tmp_path / "huge.png"
    Image.new("RGB", (1100, 1000), "white").save(files["huge"])  # 1.1 MP, over the 1 MP limit
    return files


BAD_MESSAGES = {"text": "notes.png is not an image file Pillow can read", "empty": "empty.png is empty",
                "truncated": "cut.png: cannot read image", "huge": "huge.png is 1100x1000 pixels"}


# -- the engine, without a server ----------------------------------------------------------------
@pytest.mark.parametrize("case", list(BAD_MESSAGES))
def test_bad_uploads_are_one_readable_line(model, tmp_path, case):
    path = bad_files(tmp_path)[case]
    with pytest.raises(NpinvError) as err:
        read_upload(path, model, name=path.name, max_pixels=1_000_000)
    message = str(err.value)
    assert message.startswith(BAD_MESSAGES[case]), message
    assert str(tmp_path) not in message and "\n" not in message  # no server paths, one line


def test_decompression_bomb_is_refused(model, tmp_path, monkeypatch):
    path = tmp_path / "bomb.png"
    Image.new("RGB", (200, 200)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 5000)
    with pytest.raises(NpinvError, match="bomb.png is too large"):
        read_upload(path, model, max_pixels=10**9)


def test_upload_is_prepared_for_the_model(model, tmp_path):
    path = tmp_path / "wide.png"
    Image.effect_noise((300, 100), 60).convert("RGB").save(path)
    crop = read_upload(path, model, name="wide.png")
    assert tuple(crop.image.shape) == (1, 3, 64, 64) and crop.name == "wide.png"
    fit = read_upload(path, model, InvertSettings(resize="fit"))
    assert tuple(fit.image.shape[-2:]) == (24, 64)  # aspect kept, sides multiples of 8
    (tmp_path / "copy.png").write_bytes(path.read_bytes())
    assert read_upload(tmp_path / "copy.png", model).digest == crop.digest  # the key is the bytes, not the name
    for settings, upload in ((InvertSettings(), crop), (InvertSettings(resize="fit"), fit)):
        cli = prepare_file(path, model, settings)  # what the command line gets for the same file
        assert cli.digest == upload.digest and cli.image.equal(upload.image)


def test_engine_inverts_once_per_key(engine, tmp_path):
    cache = engine.new_cache()
    first = engine.invert(cache, EXAMPLE["path"], EXAMPLE["prompt"], steps=4)
    assert not first.timings.inversion_cached and first.timings.unet_calls == 8  # 4 inversion + 4 NPI sampling
    assert first.timings.unet_rows == 8  # one row a step each: NPI's source branch is its own negative
    assert first.psnr > 15 and first.input_image.size == first.reconstruction.size == (64, 64)
    assert Inversion.load(first.inversion_file).steps == 4
    request = parse_edit_request(EXAMPLE["edits"][0], {"controller": "replace"})
    again = engine.edit(cache, EXAMPLE["path"], EXAMPLE["prompt"], request, steps=4)
    assert again.timings.inversion_cached and again.timings.invert_seconds == 0.0
    assert again.timings.unet_calls == 4  # the edit only: one batched call a step
    assert again.timings.unet_rows == 4 * 3  # the source branch's row and the target's two
    assert again.result.cost.unet_calls == 4 and again.result.edit_cost.unet_calls == 4
    for change in ({"steps": 5}, {"offset": 0}, {"resize": "fit"}):
        report = engine.edit(cache, EXAMPLE["path"], EXAMPLE["prompt"], request, **({"steps": 4} | change))
        assert not report.timings.inversion_cached, change
    report = engine.edit(cache, EXAMPLE["path"], "a red circle on a black background", request, steps=4)
    assert not report.timings.inversion_cached
    assert len(cache) == engine.limits.cache_entries  # five keys, four kept


def test_fixed_point_inversion_is_its_own_cache_entry(engine):
    """The scheme is a setting like the steps: reported, paid for in UNet calls, and part of the key."""
    cache = engine.new_cache()
    ddim = engine.invert(cache, EXAMPLE["path"], EXAMPLE["prompt"], steps=4)
    assert ddim.timings.invert_scheme == "ddim" and ddim.timings.invert_extra_calls == 0
    assert ddim.timings.unet_calls == 8 and ddim.timings.invert_residual is None
    fixed = engine.invert(cache, EXAMPLE["path"], EXAMPLE["prompt"], steps=4, invert_scheme="fixed-point",
                          invert_iters=3)
    t = fixed.timings
    assert not t.inversion_cached and len(cache) == 2  # same image, prompt and steps, another scheme: a miss
    assert (t.invert_scheme, t.invert_iters) == ("fixed-point", 3)
    assert 4 <= t.invert_extra_calls <= 4 * 3  # at least one check a step, at most iters
    assert t.unet_calls == 8 + t.invert_extra_calls > ddim.timings.unet_calls
    assert t.invert_residual is not None and t.invert_residual >= 0
    shown = json.loads(json.dumps(t.as_dict()))  # what the page shows
    assert {k: shown[k] for k in ("invert_scheme", "invert_iters", "invert_extra_calls", "decoder_steps")} == \
        {"invert_scheme": "fixed-point", "invert_iters": 3, "invert_extra_calls": t.invert_extra_calls,
         "decoder_steps": 0}
    assert "fixed-point steps" in t.line()
    assert Inversion.load(fixed.inversion_file).scheme_name == "fixed-point"
    # Each is served from its own entry; the tolerance is part of the fixed-point key, not of DDIM's.
    request = parse_edit_request(EXAMPLE["edits"][0], {"controller": "replace"})
    again = engine.edit(cache, EXAMPLE["path"], EXAMPLE["prompt"], request, steps=4, invert_scheme="fixed-point",
                        invert_iters=3)
    assert again.timings.inversion_cached and again.timings.invert_scheme == "fixed-point"
    assert again.timings.invert_extra_calls == t.invert_extra_calls and again.timings.unet_calls == 4
    # A tolerance does nothing to a DDIM inversion: refused rather than ignored, in one line.
    with pytest.raises(NpinvError, match="^invert-tol applies to --invert-scheme fixed-point and anderson only, not ddim$"):
        engine.invert(cache, EXAMPLE["path"], EXAMPLE["prompt"], steps=4, invert_tol=0.5)
    other = engine.invert(cache, EXAMPLE["path"], EXAMPLE["prompt"], steps=4, invert_scheme="fixed-point",
                          invert_iters=3, invert_tol=0.5)
    assert not other.timings.inversion_cached and len(cache) == 3


def test_decoder_steps_reach_the_inversion(engine):
    cache = engine.new_cache()
    report = engine.invert(cache, EXAMPLE["path"], EXAMPLE["prompt"], steps=2, decoder_steps=2)
    assert report.timings.decoder_steps == 2 and not report.timings.inversion_cached
    assert "2 decoder steps" in report.timings.line()
    assert Inversion.load(report.inversion_file).scheme_report()["decoder_steps"] == 2
    assert not engine.invert(cache, EXAMPLE["path"], EXAMPLE["prompt"], steps=2).timings.inversion_cached


def test_invert_settings_are_the_schemas_web_fields(engine):
    assert INVERT_FIELDS == ("steps", "offset", "resize", "invert_scheme", "invert_iters", "invert_tol",
                             "bdia_gamma", "decoder_steps")  # the size is the model's: not on the page
    assert engine.invert_settings() == InvertSettings()  # the schema's defaults
    assert INVERT_DEFAULTS == {f.name: getattr(InvertSettings(), f.name) for f, spec in specs(InvertSettings)
                               if spec.web}
    values = {"steps": "8", "offset": "1", "resize": "fit", "invert_scheme": "fixed-point", "invert_iters": 4.0,
              "invert_tol": "0.01", "decoder_steps": 5}
    assert engine.invert_settings(**values) == from_value(InvertSettings, values)
    for values, message in [
        ({"invert_iters": 0}, "invert-iters must be a whole number in 1..100, got 0"),
        ({"invert_scheme": "x"}, f"invert-scheme must be one of {', '.join(scheme_names())}, got 'x'"),
        ({"invert_tol": 2}, "invert-tol must be a number in 0..1, got 2.0"),
        ({"decoder_steps": 1001}, "decoder-steps must be a whole number in 0..1000 on this server, got 1001"),
        ({"decoder_steps": 10001}, "decoder-steps must be a whole number in 0..10000, got 10001"),  # the schema's
        ({"steps": 51}, "steps must be a whole number in 1..50 on this server, got 51"),
        ({"size": 64}, "unknown setting 'size' (known: steps, offset, resize, invert_scheme, invert_iters, "),
    ]:
        with pytest.raises(NpinvError) as err:
            engine.invert_settings(**values)
        assert str(err.value).startswith(message), str(err.value)
        assert "\n" not in str(err.value)


def test_nti_edit_keeps_its_optimised_negatives(engine):
    cache = engine.new_cache()
    request = parse_edit_request(EXAMPLE["edits"][0], {"method": "nti", "controller": "replace", "guidance": 7.5})
    first = engine.edit(cache, EXAMPLE["path"], EXAMPLE["prompt"], request, steps=3)
    assert first.result.inversion.negatives is not None and first.result.prepare_cost.unet_calls > 0
    second = engine.edit(cache, EXAMPLE["path"], EXAMPLE["prompt"], request, steps=3)
    assert second.timings.inversion_cached and second.timings.unet_calls == 3  # no optimisation this time
    assert Inversion.load(second.inversion_file).negatives is not None


def test_model_warnings_reach_the_page(engine):
    report = engine.invert(engine.new_cache(), EXAMPLE["path"], "a zebra on a blue background", steps=2)
    assert len(report.warnings) == 1 and "zebra" in report.warnings[0]  # shown as a gr.Warning toast


def test_example_rows_swap_the_changed_word():
    from npinv.model import model_edit_guidance
    from npinv.webapp.app import example_rows

    row = example_rows()[0]
    assert row == [EXAMPLE["path"], EXAMPLE["prompt"], "a green circle on a blue background", "replace",
                   model_edit_guidance(None), "red green"]
    request = parse_edit_request(row[2], {"controller": row[3], "guidance": row[4], "blend": row[5]})
    assert request.settings.blend == ("red", "green")  # the example fills the form with values it takes


@pytest.mark.parametrize("form,message", [
    ({"method": "magic"}, "method must be one of npi, proxnpi, proxnpi-noig, nti, ddim, flowedit, got 'magic'"),
    ({"controller": "magic"}, "controller must be one of refine, replace, reweight, none, got 'magic'"),
    ({"guidance": "lots"}, "guidance must be a number in 0..30 (or none), got 'lots'"),
    ({"guidance": 40}, "guidance must be a number in 0..30 (or none), got 40"),
    ({"cross_replace": 1.5}, "cross-replace must be a fraction in 0..1 or a window START,END of fractions with "
                             "START <= END, got 1.5"),
    ({"blend": "red"}, "blend must be two words, SOURCE_WORD TARGET_WORD (or none), got ('red',)"),
    ({"reweight": "green"}, "reweight must be WORD=NUMBER items with numbers in -20..20, got 'green'"),
    ({"controller": "reweight"}, "the reweight controller needs at least one reweight WORD=SCALE"),
    ({"colour": "red"}, "unknown setting 'colour'"),
])
def test_edit_request_errors_are_the_schemas(form, message):
    with pytest.raises(NpinvError) as err:
        parse_edit_request("a green circle on a blue background", form)
    assert str(err.value).startswith(message), str(err.value)
    if "colour" not in form:  # the very message the schema gives the command line and manifests
        with pytest.raises(NpinvError) as schema:
            from_value(EditSettings, form)
        assert str(err.value) == str(schema.value)


@pytest.mark.parametrize("target", [" ", None, ""])
def test_edit_request_needs_a_target(target):
    with pytest.raises(NpinvError, match="give a target prompt"):
        parse_edit_request(target)


def test_edit_request_reads_the_forms_text_as_the_schema_does():
    form = {"reweight": "green=2, blue=0.5", "blend": "red green", "cross_replace": "0.2,0.9",
            "cross_replace_words": "green=0.5", "self_replace": 0.4, "direct": True, "blend_res": "",
            "controller": "reweight", "method": "proxnpi", "recon_t": 300.0, "keep_attention_maps": True}
    declared = ModelSettings(edit_guidance=3.0, edit_self_replace=0.2)
    settings = parse_edit_request("a green circle", form | {"guidance": ""}, defaults=declared).settings
    assert settings.reweight == {"green": 2.0, "blue": 0.5} and settings.blend == ("red", "green")
    assert settings.cross_replace == (0.2, 0.9) and settings.cross_replace_words == {"green": 0.5}
    assert settings.blend_res is None and settings.recon_t == 300 and settings.keep_attention_maps
    schema = from_value(EditSettings, {k: v for k, v in form.items() if k != "keep_attention_maps"})
    assert settings == dataclasses.replace(schema, guidance=3.0, keep_attention_maps=True)  # the form's 0.4 kept
    # What the form leaves empty is the model's; without a model, npinv's defaults.
    empty = parse_edit_request("a green circle", {"self_replace": "", "guidance": "default"}, defaults=declared)
    assert empty.settings == EditSettings(guidance=3.0, self_replace=0.2)
    assert parse_edit_request("a green circle").settings == EditSettings(guidance=7.5, self_replace=0.6)


def test_the_edit_form_is_derived_from_the_schema(engine):
    import gradio as gr

    demo = build_app(engine, ServeOptions(examples=False))
    by_id = {b.elem_id: b for b in demo.blocks.values() if getattr(b, "elem_id", None)}
    more = by_id["npinv-more-settings"]
    for f, spec in specs(EditSettings):
        if f.name in FLOWEDIT_KNOBS:  # FlowEdit's, on a flow model's page only (tests/test_flow_frontends.py)
            assert f"npinv-{flag_name(f.name)}" not in by_id
            continue
        control = by_id[f"npinv-{flag_name(f.name)}"]
        assert control.label == spec.label, f.name
        inside = [more.children, *(getattr(c, "children", []) for c in more.children)]
        assert spec.advanced == any(control in children for children in inside), f.name
    assert by_id["npinv-controller"].value == "refine"  # the schema's default
    assert [c[1] for c in by_id["npinv-method"].choices] == ["npi", "proxnpi", "proxnpi-noig", "nti", "ddim"]
    assert isinstance(by_id["npinv-blend"], gr.Textbox) and isinstance(by_id["npinv-direct"], gr.Checkbox)
    assert isinstance(by_id["npinv-blend-threshold"], gr.Slider) and by_id["npinv-cross-replace"].value == "0.8"
    # The inversion settings too: InvertSettings' web fields, the steps and decoder steps to the server's caps.
    accordion = by_id["npinv-invert-settings"]
    inside = [c for child in accordion.children for c in [child, *getattr(child, "children", [])]]
    for f, spec in specs(InvertSettings):
        control = by_id.get(f"npinv-{flag_name(f.name)}")
        assert (control is not None) == spec.web, f.name
        if control is not None:
            assert control.label == spec.label and control in inside, f.name
    steps, decoder = by_id["npinv-steps"], by_id["npinv-decoder-steps"]
    assert isinstance(steps, gr.Slider) and (steps.minimum, steps.maximum, steps.value) == (1, 50, 50)
    assert isinstance(decoder, gr.Slider) and (decoder.maximum, decoder.value) == (engine.limits.max_decoder_steps, 0)
    assert isinstance(by_id["npinv-offset"], gr.Radio) and by_id["npinv-offset"].value == "default"
    assert [c[1] for c in by_id["npinv-offset"].choices] == ["0", "1", "default"]
    assert isinstance(by_id["npinv-resize"], gr.Radio) and by_id["npinv-resize"].value == "crop"
    scheme = by_id["npinv-invert-scheme"]
    # The UNet model is offered the schemes it runs (midpoint and fireflow are for flow models).
    assert isinstance(scheme, (gr.Radio, gr.Dropdown)) and [c[1] for c in scheme.choices] == \
        [s for s in scheme_names() if not SCHEMES[s].flow_only] == ["ddim", "fixed-point", "anderson", "bdia"]
    assert scheme.value == "ddim" and scheme.info
    assert by_id["npinv-invert-iters"].value == DEFAULT_INVERT_ITERS  # the defaults, not snapped
    assert by_id["npinv-invert-tol"].value == DEFAULT_INVERT_TOL
    fns = {d.api_name: d for d in demo.fns.values()}
    assert fns["invert"].input_parameter_names == ["image", "source_prompt", "session", *INVERT_FIELDS]
    assert fns["edit"].input_parameter_names == ["image", "source_prompt", *INVERT_FIELDS, "target_prompt",
                                                 "session", *(n for n in FORM_FIELDS if n not in FLOWEDIT_KNOBS)]


def test_limits_and_options_refuse_nonsense():
    with pytest.raises(NpinvError, match="--cache-mb"):
        Limits(cache_mb=0)
    with pytest.raises(NpinvError, match="--port"):
        ServeOptions(port=70000)
    with pytest.raises(NpinvError, match="--max-decoder-steps must be 0 or more, got -1"):
        Limits(max_decoder_steps=-1)
    assert ServeOptions().host == "127.0.0.1"
    assert is_loopback("127.0.0.1") and is_loopback("localhost") and is_loopback("::1")
    assert not is_loopback("0.0.0.0")


# -- a real server, real HTTP clients ------------------------------------------------------------
def test_invert_then_edit_twice_served_from_the_cache(server, tmp_path):
    c = client(server, tmp_path)
    shown, rec, psnr, timings, inv_file, status = c.predict(
        handle_file(EXAMPLE["path"]), EXAMPLE["prompt"], STEPS, "default", "crop", api_name="/invert")
    assert Image.open(shown).size == Image.open(rec).size == (64, 64)
    assert psnr > 25 and f"PSNR {psnr:.2f} dB" in status
    assert timings["inversion_cached"] is False and timings["invert_seconds"] > 0
    assert timings["unet_calls"] == 2 * STEPS and timings["cache_entries"] == 1
    inv = Inversion.load(inv_file)
    assert (inv.steps, inv.source_prompt) == (STEPS, EXAMPLE["prompt"])

    edit_args = {"image": handle_file(EXAMPLE["path"]), "source_prompt": EXAMPLE["prompt"], "steps": STEPS,
                 "target_prompt": "a green circle on a blue background", "controller": "replace", "guidance": 2.5,
                 "blend": "red green", "keep_attention_maps": True}
    out = c.predict(**edit_args, api_name="/edit")
    shown, edited, rec, psnr2, maps, timings, edit_file, inv_file, status = out
    assert timings["inversion_cached"] is True and timings["invert_seconds"] == 0.0
    assert timings["unet_calls"] == STEPS  # no inversion: only the batched edit calls
    assert timings["unet_rows"] == 3 * STEPS
    assert "inversion cached" in status
    edited_px = np.asarray(Image.open(edited).convert("RGB"), dtype=float)
    input_px = np.asarray(Image.open(shown).convert("RGB"), dtype=float)
    assert edited_px.shape == (64, 64, 3)
    red, green, _ = edited_px[24:40, 22:38].mean((0, 1))
    assert green > 100 > red  # the red circle turned green
    assert np.abs(edited_px[:8, :8] - input_px[:8, :8]).mean() < 10  # the background stayed (local blend)
    assert np.array_equal(np.asarray(Image.open(edit_file).convert("RGB")), edited_px.astype(np.uint8))
    assert psnr2 == pytest.approx(psnr, abs=0.01)  # NPI's source branch is the reconstruction
    captions = [m["caption"] for m in maps]
    assert len(maps) == 14 and "source: red" in captions and "target: green" in captions
    assert timings["invert_scheme"] == "ddim" and timings["invert_extra_calls"] == 0

    out = c.predict(**(edit_args | {"target_prompt": "a red square on a blue background", "blend": "circle square",
                                    "keep_attention_maps": False}), api_name="/edit")
    assert out[5]["inversion_cached"] is True and out[5]["cache_hits"] == 2
    assert out[4] == []  # no attention maps asked for


def test_the_inversion_scheme_over_the_api(server, tmp_path):
    """The API's parameters are the settings' field names: a client asks for fixed-point inversion."""
    c = client(server, tmp_path)
    args = dict(image=handle_file(EXAMPLE["path"]), source_prompt=EXAMPLE["prompt"], steps=3)
    plain = c.predict(**args, api_name="/invert")[3]
    fixed = c.predict(**args, invert_scheme="fixed-point", invert_iters=2, api_name="/invert")[3]
    assert fixed["inversion_cached"] is False and fixed["cache_entries"] == 2  # another key, another inversion
    assert (fixed["invert_scheme"], fixed["invert_iters"]) == ("fixed-point", 2)
    assert fixed["unet_calls"] == plain["unet_calls"] + fixed["invert_extra_calls"] > plain["unet_calls"]
    edited = c.predict(**args, invert_scheme="fixed-point", invert_iters=2, target_prompt=EXAMPLE["edits"][0],
                       controller="replace", api_name="/edit")[5]
    assert edited["inversion_cached"] is True and edited["invert_scheme"] == "fixed-point"
    with pytest.raises(AppError, match="invert-iters must be a whole number in 1..100, got 0"):
        c.predict(**args, invert_scheme="fixed-point", invert_iters=0, api_name="/invert")


def test_sessions_never_share_inversions(server, tmp_path):
    args = (handle_file(EXAMPLE["path"]), EXAMPLE["prompt"], 6, "default", "crop")
    alice, bob = client(server, tmp_path / "a"), client(server, tmp_path / "b")
    assert alice.predict(*args, api_name="/invert")[3]["inversion_cached"] is False
    assert alice.predict(*args, api_name="/invert")[3]["inversion_cached"] is True
    bob_timings = bob.predict(*args, api_name="/invert")[3]
    assert bob_timings["inversion_cached"] is False and bob_timings["cache_entries"] == 1


def test_bad_requests_give_readable_errors(server, tmp_path):
    c = client(server, tmp_path)
    for case, path in bad_files(tmp_path).items():
        with pytest.raises(AppError) as err:
            c.predict(handle_file(str(path)), "a red circle", STEPS, api_name="/invert")
        message = str(err.value)
        assert message.startswith(BAD_MESSAGES[case]), message
        assert "Traceback" not in message and "/tmp" not in message
    for args, match in [((None, "a red circle"), "upload an image"),
                        ((handle_file(EXAMPLE["path"]), "  "), "give a source prompt")]:
        with pytest.raises(AppError, match=match):
            c.predict(*args, STEPS, api_name="/invert")
    with pytest.raises(AppError, match=re.escape("steps must be a whole number in 1..50 on this server, got 500")):
        c.predict(handle_file(EXAMPLE["path"]), EXAMPLE["prompt"], 500, api_name="/invert")
    with pytest.raises(AppError, match="equal word counts"):
        c.predict(image=handle_file(EXAMPLE["path"]), source_prompt=EXAMPLE["prompt"], steps=STEPS,
                  target_prompt="a big green circle on a blue background", controller="replace", api_name="/edit")
    # Uploads over the size limit are refused by the server itself, whatever the client checks.
    big = os.urandom(int(1.5 * 2**20))
    response = httpx.post(f"{server}gradio_api/upload", files={"files": ("big.png", big, "image/png")}, timeout=30)
    assert response.status_code == 413 and "maximum allowed size" in response.text


def test_clients_cannot_read_server_files(server):
    """A request naming a server path instead of an upload is refused, as a file record or a bare string."""
    for image, match in [({"path": "/etc/hostname", "meta": {"_type": "gradio.FileData"}}, "not uploaded by a user"),
                         ({"path": EXAMPLE["path"]}, "must be an uploaded file"),
                         (EXAMPLE["path"], "")]:  # Gradio's own validation refuses a bare string
        data = [image, EXAMPLE["prompt"], 2, "default", "crop", *list(INVERT_DEFAULTS.values())[3:]]
        event = httpx.post(f"{server}gradio_api/call/invert", json={"data": data}, timeout=30).json()["event_id"]
        answer = httpx.get(f"{server}gradio_api/call/invert/{event}", timeout=60).text
        assert "event: error" in answer and match in answer and "Inverted" not in answer, answer


def test_concurrent_clients_all_complete(server, tmp_path):
    """Three sessions at once: the queue serialises the model, every request finishes."""
    results, errors = {}, []

    def run(k: int) -> None:
        try:
            c = client(server, tmp_path / str(k))
            out = c.predict(image=handle_file(bundled_examples()[k]["path"]), source_prompt=bundled_examples()[k]["prompt"],
                            steps=6, target_prompt=bundled_examples()[k]["edits"][0], controller="replace",
                            api_name="/edit")
            results[k] = out
        except Exception as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(k,)) for k in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=240)
    assert not errors, errors
    assert sorted(results) == [0, 1, 2]
    for out in results.values():
        assert Image.open(out[1]).size == (64, 64) and out[5]["inversion_cached"] is False


def test_queue_is_bounded(engine, tmp_path):
    """Room for one waiting request: while one runs, one of three more waits and two are told 'queue full'."""
    from gradio_client.utils import Status

    options = ServeOptions(port=free_port(), queue_size=1, examples=False)
    demo = build_app(engine, options)
    url = launch(demo, engine, options)
    try:
        clients = [client(url, tmp_path / str(k)) for k in range(4)]
        args = (handle_file(EXAMPLE["path"]), EXAMPLE["prompt"], 30)
        running = clients[0].submit(*args, api_name="/invert")
        busy = (Status.PROCESSING, Status.PROGRESS)
        deadline = time.monotonic() + 60
        while running.status().code not in busy and not running.done() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert running.status().code in busy  # the queue is empty again, the model busy
        burst = [c.submit(*args, api_name="/invert") for c in clients[1:]]
        outcomes = []
        for job in [running, *burst]:
            try:
                job.result(timeout=120)
                outcomes.append("ok")
            except Exception as exc:
                outcomes.append("full" if "Queue is full" in str(exc) else repr(exc))
        assert sorted(outcomes) == ["full", "full", "ok", "ok"], outcomes
    finally:
        demo.close()


def test_page_and_config(server, tmp_path):
    assert httpx.get(server, timeout=30).status_code == 200
    config = httpx.get(f"{server}config", timeout=30).json()
    assert config["title"] == "npinv: invert once, edit many"
    assert {d.get("api_name") for d in config["dependencies"]} >= {"invert", "edit"}
    # The edit endpoint's parameters are the form's: EditSettings' field names, for any client (a UNet
    # model's page has no FlowEdit knobs).
    api = client(server, tmp_path).view_api(return_format="dict", print_info=False)
    names = [p["parameter_name"] for p in api["named_endpoints"]["/edit"]["parameters"]]
    form = [n for n in FORM_FIELDS if n not in FLOWEDIT_KNOBS]
    assert names == ["image", "source_prompt", *INVERT_FIELDS, "target_prompt", *form]
    names = [p["parameter_name"] for p in api["named_endpoints"]["/invert"]["parameters"]]
    assert names == ["image", "source_prompt", *INVERT_FIELDS]


# -- the command ---------------------------------------------------------------------------------
def test_serve_command_runs_and_stops_on_ctrl_c(tmp_path):
    port = free_port()
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    log = tmp_path / "serve.log"  # a file, not a pipe: a full pipe would stall the server
    with log.open("w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "npinv", "serve", "--port", str(port), "--device", "cpu"],
                                stdout=subprocess.DEVNULL, stderr=err, env=env)
    try:
        deadline = time.monotonic() + 120
        while "serving" not in log.read_text() and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.2)
        assert f"serving npinv-shapes-64 on http://127.0.0.1:{port}/" in log.read_text(), log.read_text()
        other = primary_ip()
        if other is not None and not is_loopback(other):  # bound to loopback only: not reachable from outside
            with socket.socket() as s, pytest.raises(OSError):
                s.settimeout(5)
                s.connect((other, port))
        c = client(f"http://127.0.0.1:{port}/", tmp_path)
        timings = c.predict(handle_file(EXAMPLE["path"]), EXAMPLE["prompt"], 4, api_name="/invert")[3]
        assert timings["unet_calls"] == 8
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 0
        assert "Traceback" not in log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.parametrize("argv,match", [
    (["--port", "70000"], "--port must lie in 1..65535"),
    (["--cache-entries", "0"], "--cache-entries must be positive"),
    (["--max-megapixels", "0"], "--max-megapixels must be positive"),
])
def test_serve_command_errors(capsys, argv, match):
    from npinv.cli import main

    assert main(["serve", *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("npinv: error:") and match in err[0], err


def test_serve_reports_a_busy_port(engine):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        options = ServeOptions(port=busy.getsockname()[1], examples=False)
        demo = build_app(engine, options)
        with pytest.raises(NpinvError, match="cannot listen on 127.0.0.1"):
            launch(demo, engine, options)


def test_timings_are_json(engine):
    cache = engine.new_cache()
    report = engine.invert(cache, EXAMPLE["path"], EXAMPLE["prompt"], steps=2)
    assert json.loads(json.dumps(report.timings.as_dict()))["steps"] == 2
