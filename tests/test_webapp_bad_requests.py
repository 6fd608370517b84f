"""Bad requests to the web app, as any client can send them (raw JSON: Infinity, NaN, strings, null,
100,000-character prompts): each is one short line in the page, never a traceback or a prompt in
the server's log. First through the app's own handlers (what Gradio calls), then over HTTP."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import gradio as gr
import httpx
import pytest
import torch
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError

from npinv.checks import short_repr
from npinv.demo import bundled_examples
from npinv.errors import NpinvError
from npinv.schemes import scheme_names
from npinv.settings import DEFAULT_INVERT_ITERS, DEFAULT_INVERT_TOL, FLOWEDIT_KNOBS
from npinv.webapp.app import ServeOptions, build_app, launch, page_message
from npinv.webapp.engine import FORM_FIELDS, INVERT_DEFAULTS, INVERT_FIELDS, QuietTruncation
from test_webapp import engine, free_port, model  # noqa: F401  (the app tests' server fixtures)

EXAMPLE = bundled_examples()[0]  # a red circle on a blue background
TARGET = "a green circle on a blue background"
HUGE = ("a red circle on a blue background " * 3000)[:99_999] + "."  # 100,000 characters
LONG = "a red circle on a blue background " * 26  # 883 characters: under the app's cap, far over 32 tokens
LOG_BUDGET = 600  # characters a bad request may add to the server's log (at most transformers' one notice)


@pytest.fixture(scope="module")
def handlers(engine, tmp_path_factory):
    """The page's invert and edit handlers as Gradio calls them, and an upload record they accept."""
    uploads = tmp_path_factory.mktemp("uploads")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("GRADIO_TEMP_DIR", str(uploads))
        demo = build_app(engine, ServeOptions(examples=False))
    image = {"path": str(shutil.copy(EXAMPLE["path"], uploads / "red_circle.png")), "orig_name": "red_circle.png"}
    fns = {f.api_name: f.fn for f in demo.fns.values()}
    return fns["invert"], fns["edit"], image


@pytest.fixture(scope="module")
def server(engine):
    options = ServeOptions(port=free_port(), queue_size=8, examples=False)
    demo = build_app(engine, options)
    url = launch(demo, engine, options)
    yield url
    demo.close()


class _Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))  # with its traceback, if it has one


@pytest.fixture
def server_log(capfd):
    """What the server's process writes meanwhile: its stdout and stderr, and every log record,
    including diffusers' and transformers' (their loggers do not propagate to the root)."""
    handler = _Lines()
    loggers = [logging.getLogger(), logging.getLogger("diffusers"), logging.getLogger("transformers")]
    for logger in loggers:
        logger.addHandler(handler)

    def read() -> str:
        out, err = capfd.readouterr()
        text = "\n".join([*handler.lines, out, err]).strip()
        handler.lines.clear()
        return text

    yield read
    for logger in loggers:
        logger.removeHandler(handler)


def assert_quiet(log: str) -> None:
    assert "Traceback" not in log and "internal error" not in log, log
    assert "blue background a red circle" not in log, log[:500]  # no prompt echoed
    assert len(log) <= LOG_BUDGET, log[:500]


def assert_one_line(message: str, match: str) -> None:
    assert match in message, message
    assert "\n" not in message and len(message) <= 200 and "--" not in message, message
    assert "Traceback" not in message and "internal error" not in message, message


# -- the page's handlers, as Gradio calls them ----------------------------------------------------
# The settings' messages are the schema's (npinv.settings), the same on the command line and in manifests.
STEPS = "steps must be a whole number in 1..1000, got "
OFFSET = "offset must be one of 0, 1, default, got "
RESIZE = "resize must be one of crop, fit, got "
GUIDANCE = "guidance must be a number in 0..30 (or none), got "
WINDOW = "must be a fraction in 0..1 or a window START,END of fractions with START <= END, got "
REWEIGHT = "reweight must be WORD=NUMBER items with numbers in -20..20, got "
BLEND = "blend must be two words, SOURCE_WORD TARGET_WORD (or none), got "
SCHEME = f"invert-scheme must be one of {', '.join(scheme_names())}, got "  # the registry's schemes
ITERS = "invert-iters must be a whole number in 1..100, got "
TOL = "invert-tol must be a number in 0..1, got "
GAMMA = "bdia-gamma must be a number in (0, 1], got "
DECODER = "decoder-steps must be a whole number in 0..10000, got "

INVERT_CASES = [  # (field, value, the message's start)
    *[("steps", v, STEPS + short_repr(v)) for v in
      (float("inf"), float("-inf"), float("nan"), 2.5, 0, 1001, True, None, [4], {"value": 4})],
    *[("steps", v, STEPS + m) for v, m in (("Infinity", "inf"), ("NaN", "nan"), ("ten", "'ten'"), (10**400, "1000"),
                                            (10**5000, "a int too long"))],
    ("steps", 51, "steps must be a whole number in 1..50 on this server, got 51"),  # the server's own limit
    ("steps", "4" * 100_000, "steps is 100,000 characters long; this server accepts at most 1,000"),
    *[("offset", v, OFFSET + short_repr(v)) for v in (float("inf"), float("nan"), 0.5, 2, -1, True, "2", [0])],
    ("offset", "x" * 100_000, "offset is 100,000 characters long"),
    *[("resize", v, RESIZE + short_repr(v)) for v in ("stretch", 5, None, ["crop"])],
    ("resize", "x" * 100_000, "resize is 100,000 characters long"),
    *[("invert_scheme", v, SCHEME + short_repr(v)) for v in ("x", "DDIM", None, 1, ["ddim"])],
    ("invert_scheme", "x" * 100_000, "invert-scheme is 100,000 characters long"),
    *[("invert_iters", v, ITERS + m) for v, m in
      ((0, "0"), (101, "101"), (2.5, "2.5"), (float("nan"), "nan"), ("Infinity", "inf"), (True, "True"), (None, "None"))],
    *[("invert_tol", v, TOL + m) for v, m in ((-0.1, "-0.1"), (2, "2.0"), (float("inf"), "inf"), ("tight", "'tight'"))],
    *[("bdia_gamma", v, GAMMA + m) for v, m in ((0, "0.0"), (1.5, "1.5"), (float("nan"), "nan"), ("soft", "'soft'"))],
    *[("decoder_steps", v, DECODER + m) for v, m in ((-1, "-1"), (10001, "10001"), (0.5, "0.5"), ("lots", "'lots'"))],
    ("decoder_steps", 1001, "decoder-steps must be a whole number in 0..1000 on this server, got 1001"),  # the server's
    ("source_prompt", HUGE, "the source prompt is 100,000 characters long; this server accepts at most 1,000"),
    ("source_prompt", 42, "the source prompt must be text"),
    ("source_prompt", ["a", "red", "circle"], "the source prompt must be text"),
    ("source_prompt", None, "give a source prompt"),
]

EDIT_CASES = [
    *[("guidance", v, GUIDANCE + m) for v, m in
      ((float("inf"), "inf"), (float("-inf"), "-inf"), (float("nan"), "nan"), ("Infinity", "inf"), ("NaN", "nan"),
       ("1e400", "inf"), (10**400, "1000"), (True, "True"), ([2.5], "[2.5]"), ("lots", "'lots'"), (31, "31"),
       (-0.5, "-0.5"))],
    ("guidance", "x" * 100_000, "guidance is 100,000 characters long"),
    *[("cross_replace", v, "cross-replace " + WINDOW + m) for v, m in
      ((float("nan"), "nan"), (float("inf"), "inf"), (1.5, "1.5"), ("0.9,0.2", "(0.9, 0.2)"), ("", "''"))],
    *[("self_replace", v, "self-replace " + WINDOW.replace(", got", " (or none), got") + m) for v, m in
      ((float("-inf"), "-inf"), ("0.7,0.1", "(0.7, 0.1)"), (2, "2"))],  # empty is the model's window
    ("cross_replace_words", "green=2", "cross-replace-words must be WORD=FRACTION or WORD=START,END items"),
    ("self_replace_size", 0, "self-replace-size must be a number in (0, 1], got 0"),
    ("blend_res", 0.5, "blend-res must be a whole number in 1..4096 (or none), got 0.5"),
    ("recon_t", "soon", "recon-t must be a whole number in 0..1000, got 'soon'"),
    *[("reweight", v, REWEIGHT + m) for v, m in
      (("green=nan", "{'green': nan}"), ("green=inf", "{'green': inf}"), ("green=-inf", "{'green': -inf}"),
       ("green=1e400", "{'green': inf}"), ("green=50", "{'green': 50.0}"), ("green", "'green'"), (5, "5"))],
    ("reweight", "green=" + "9" * 100_000, "reweight is 100,006 characters long"),
    ("reweight", ["green=2"] * 2000, "reweight is too long; this server accepts at most 1,000 characters"),
    ("controller", "reweight", "the reweight controller needs at least one WORD=SCALE in the Reweight box"),
    ("direct", "maybe", "direct must be true or false, got 'maybe'"),
    ("direct", 1, "direct must be true or false, got 1"),
    ("keep_attention_maps", "maybe", "keep-attention-maps must be true or false, got 'maybe'"),
    ("method", None, "method must be one of npi, proxnpi, proxnpi-noig, nti, ddim, flowedit, got None"),
    ("method", "x" * 100_000, "method is 100,000 characters long"),
    ("controller", ["refine"], "controller must be one of refine, replace, reweight, none, got ['refine']"),
    ("target_prompt", HUGE, "the target prompt is 100,000 characters long; this server accepts at most 1,000"),
    ("target_prompt", 7, "the target prompt must be text"),
    ("blend", HUGE, "blend is 100,000 characters long"),
    ("blend", {"word": "green"}, BLEND + "{'word': 'green'}"),
    ("blend", "red", BLEND + "('red',)"),
    ("steps", float("inf"), STEPS + "inf"),  # the edit checks them too
    ("offset", float("nan"), OFFSET + "nan"),
    ("invert_scheme", "x", SCHEME + "'x'"),
    ("invert_iters", 0, ITERS + "0"),
    ("decoder_steps", 1001, "decoder-steps must be a whole number in 0..1000 on this server, got 1001"),
]


def case_id(value) -> str:
    return value[:24] if isinstance(value, str) else short_repr(value, 24)


POSITIONAL = dict(source_prompt=EXAMPLE["prompt"], target_prompt=TARGET)
SETTINGS = dict(steps=2, offset="default", resize="crop", invert_scheme="ddim", invert_iters=DEFAULT_INVERT_ITERS,
                invert_tol=DEFAULT_INVERT_TOL, bdia_gamma=1.0,
                decoder_steps=0)  # the page's inversion settings, as its controls send them
FORM = dict(method="npi", controller="replace", guidance=2.5, cross_replace="0.8", self_replace="0.6", blend="",
            reweight="", direct=False, keep_attention_maps=False)


def call_invert(invert, image, cache, **changes):
    """The invert handler as Gradio calls it: the upload and prompt, then the settings by field name."""
    values = dict(source_prompt=EXAMPLE["prompt"], **SETTINGS) | changes
    return invert(image, values.pop("source_prompt"), cache, **values)


def call_edit(edit, image, cache, **changes):
    """The edit handler as Gradio calls it: the upload and prompts, then the settings and the form by field name."""
    positional, form = dict(POSITIONAL), dict(SETTINGS) | FORM
    for name, value in changes.items():
        (positional if name in positional else form)[name] = value
    return edit(image, positional["source_prompt"], positional["target_prompt"], cache, **form)


@pytest.mark.parametrize("field,value,match", INVERT_CASES, ids=case_id)
def test_invert_handler_refuses_bad_values_in_one_line(handlers, engine, caplog, field, value, match):
    invert, _, image = handlers
    cache = engine.new_cache()
    with pytest.raises(gr.Error) as err:
        call_invert(invert, image, cache, **{field: value})
    assert_one_line(err.value.message, match)
    assert len(cache) == 0  # refused before the model ran
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


@pytest.mark.parametrize("field,value,match", EDIT_CASES, ids=case_id)
def test_edit_handler_refuses_bad_values_in_one_line(handlers, engine, caplog, field, value, match):
    _, edit, image = handlers
    cache = engine.new_cache()
    with pytest.raises(gr.Error) as err:
        call_edit(edit, image, cache, **{field: value})
    assert_one_line(err.value.message, match)
    assert len(cache) == 0  # refused before the model ran
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_numbers_as_the_api_may_send_them_are_accepted(engine):
    cache = engine.new_cache()
    report = engine.invert(cache, EXAMPLE["path"], EXAMPLE["prompt"], steps="2", offset="1")
    assert report.timings.steps == 2 and len(cache) == 1
    again = engine.invert(cache, EXAMPLE["path"], EXAMPLE["prompt"], steps=2.0, offset=1)
    assert again.timings.inversion_cached  # the same key: 2, "2" and 2.0 are one request
    request = engine.edit_request(TARGET, controller="replace", guidance="2.5", cross_replace="0.8", reweight="green=2",
                                  blend="red green", direct="false", blend_res=16.0)
    assert request.settings.guidance == 2.5 and request.settings.reweight == {"green": 2.0}
    assert request.settings.blend == ("red", "green") and request.settings.direct is False
    assert request.settings.blend_res == 16


def test_a_good_form_through_the_handler_edits(handlers, engine):
    _, edit, image = handlers
    cache = engine.new_cache()
    out = call_edit(edit, image, cache, blend="red green", guidance=None)  # None: the model's guidance
    assert out[-2].startswith("**Edited**") and len(cache) == 1


def test_a_long_prompt_is_not_echoed_into_the_log(engine, server_log):
    """A prompt over the text encoder's limit (but under the app's cap): the page gets one warning,
    the log at most transformers' one short notice, never the prompt's cut-off text (diffusers
    logs it at every encoding)."""
    server_log()
    report = engine.invert(engine.new_cache(), EXAMPLE["path"], LONG, steps=2)
    assert any("over the tokenizer's limit" in w for w in report.warnings)
    edit = engine.edit(engine.new_cache(), EXAMPLE["path"], LONG, engine.edit_request(LONG + " green"), steps=2)
    assert any("over the tokenizer's limit" in w for w in edit.warnings)
    assert_quiet(server_log())
    pipeline_logger = logging.getLogger(type(engine.model.pipe).__module__)
    assert not [f for f in pipeline_logger.filters if isinstance(f, QuietTruncation)]  # only while the model runs


# -- messages written for the command line, as the page shows them ---------------------------------
HALF_PRECISION = [  # npinv.model's messages for a half-precision overflow, written for the command line
    "the decoded image has non-finite values in float16 (a half-precision overflow); rerun with --dtype fp32 (or bf16)",
    "the UNet's output at timestep 981 has non-finite values in bfloat16 (a half-precision overflow); "
    "rerun with --dtype fp32",
]


def test_cli_flags_in_shared_messages_become_the_page_controls(model):
    with pytest.raises(NpinvError) as decoded:
        model.decode(torch.full((1, 4, 8, 8), float("nan")))
    with pytest.raises(NpinvError) as unet:
        model.unet_output(torch.full((1, 4, 8, 8), float("nan")), 500, model.encode_prompt(EXAMPLE["prompt"]))
    for text in (str(decoded.value), str(unet.value), *HALF_PRECISION):
        shown = page_message(text)
        assert "--" not in shown and "\n" not in shown, shown
    for text in HALF_PRECISION:
        assert page_message(text).endswith("(a half-precision overflow); try a lower guidance or another image "
                                           "(or ask the server's operator to serve the model in fp32)")
    swap = page_message("replace needs prompts with equal word counts (7 vs 8): 'a' -> 'b'; use the refine controller")
    assert swap.endswith("; choose refine under Attention control (it aligns prompts of any length)")
    for text in ("the reweight controller needs at least one --reweight WORD=SCALE",
                 "the reweight controller needs at least one reweight WORD=SCALE"):  # the schema's
        assert page_message(text) == \
            "the reweight controller needs at least one WORD=SCALE in the Reweight box (Controller settings)"
    assert page_message("bad thing; use --some-new-flag 3") == "bad thing; use the server's some-new-flag setting 3"
    long = page_message("x" * 5000 + "\n; choose refine")
    assert len(long) <= 500 and "\n" not in long and long.endswith("; choose refine")


# -- over HTTP: gradio_client and raw JSON ---------------------------------------------------------
def _call(url: str, api: str, body: str) -> str:
    """POST a raw JSON body (Python's json writes Infinity and NaN; gradio_client refuses to) and read the answer."""
    response = httpx.post(f"{url}gradio_api/call/{api}", content=body, headers={"content-type": "application/json"},
                          timeout=30)
    assert response.status_code == 200, response.text
    return httpx.get(f"{url}gradio_api/call/{api}/{response.json()['event_id']}", timeout=60).text


def test_raw_json_infinity_and_nan_are_one_line_errors(server, server_log):
    server_log()
    upload = httpx.post(f"{server}gradio_api/upload", timeout=30,
                        files={"files": ("red_circle.png", Path(EXAMPLE["path"]).read_bytes(), "image/png")}).json()[0]
    image = {"path": upload, "meta": {"_type": "gradio.FileData"}, "orig_name": "red_circle.png"}
    assert list(SETTINGS) == list(INVERT_FIELDS)
    assert {k: v for k, v in SETTINGS.items() if k not in ("steps", "offset")} == \
        {k: v for k, v in INVERT_DEFAULTS.items() if k not in ("steps", "offset")}  # the page's defaults
    settings = list(SETTINGS.values())[1:]  # the API's order after the steps: the schema's
    invert = [image, EXAMPLE["prompt"], 2, *settings]
    form = {"method": "npi", "controller": "replace", "guidance": 2.5, "cross_replace": "0.8",
            "cross_replace_words": "", "self_replace": "0.6", "self_replace_size": 0.5, "blend": "",
            "blend_threshold": 0.3, "blend_start": 0.2, "blend_res": None, "reweight": "", "direct": False,
            "prox_quantile": 0.75, "recon_t": 400, "recon_lr": 1.0, "attention": "fused",
            "keep_attention_maps": False}
    # The API's order: the schema's (a UNet model's page has no FlowEdit knobs).
    assert list(form) == [n for n in FORM_FIELDS if n not in FLOWEDIT_KNOBS]

    def edit(**changes) -> list:
        return [*invert, TARGET, *(form | changes).values()]

    inf, nan = float("inf"), float("nan")  # json.dumps writes them as Infinity and NaN
    for api, data, match in [
        ("invert", [image, EXAMPLE["prompt"], inf, *settings], "steps must be a whole number in 1..1000, got inf"),
        ("invert", [image, EXAMPLE["prompt"], nan, *settings], "steps must be a whole number in 1..1000, got nan"),
        ("invert", [image, EXAMPLE["prompt"], 2, -inf, *settings[1:]], "offset must be one of 0, 1, default, got -inf"),
        ("invert", [*invert[:-3], nan, 1.0, 0], "invert-tol must be a number in 0..1, got nan"),
        ("invert", [*invert[:-2], nan, 0], "bdia-gamma must be a number in (0, 1], got nan"),
        ("invert", [*invert[:-1], inf], "decoder-steps must be a whole number in 0..10000, got inf"),
        ("edit", edit(guidance=nan), "guidance must be a number in 0..30 (or none), got nan"),
        ("edit", edit(cross_replace=inf), "cross-replace must be a fraction in 0..1 or a window"),
        ("edit", edit(blend_res=-inf), "blend-res must be a whole number in 1..4096 (or none), got -inf"),
        ("invert", [image, EXAMPLE["prompt"], "1e999", *settings], "steps must be a whole number in 1..1000, got inf"),
    ]:
        body = json.dumps({"data": data}).replace('"1e999"', "1e999")  # a number too large for a float
        answer = _call(server, api, body)
        assert "event: error" in answer and match in answer, (body, answer)
        assert "internal error" not in answer and "Traceback" not in answer, answer
    assert_quiet(server_log())


def test_gradio_client_bad_numbers_and_huge_prompts(server, tmp_path, server_log):
    server_log()
    c = Client(server, verbose=False, analytics_enabled=False, download_files=str(tmp_path))
    image = handle_file(EXAMPLE["path"])
    cases = [
        (dict(api_name="/invert", source_prompt=EXAMPLE["prompt"], steps="Infinity"), "steps must be a whole number"),
        (dict(api_name="/invert", source_prompt=HUGE, steps=2), "the source prompt is 100,000 characters long"),
        (dict(api_name="/invert", source_prompt=EXAMPLE["prompt"], steps=2, invert_scheme="x"),
         SCHEME + "'x'"),
        (dict(api_name="/invert", source_prompt=EXAMPLE["prompt"], steps=2, invert_iters=0),
         "invert-iters must be a whole number in 1..100, got 0"),
        (dict(api_name="/edit", source_prompt=EXAMPLE["prompt"], steps=2, target_prompt=TARGET, decoder_steps=1001),
         "decoder-steps must be a whole number in 0..1000 on this server, got 1001"),
        (dict(api_name="/edit", source_prompt=EXAMPLE["prompt"], steps=2, target_prompt=HUGE),
         "the target prompt is 100,000 characters long"),
        (dict(api_name="/edit", source_prompt=EXAMPLE["prompt"], steps=2, target_prompt=TARGET, guidance="NaN"),
         "guidance must be a number in 0..30 (or none), got nan"),
        (dict(api_name="/edit", source_prompt=EXAMPLE["prompt"], steps=2, target_prompt=TARGET, blend="red"),
         "blend must be two words"),
        (dict(api_name="/edit", source_prompt=EXAMPLE["prompt"], steps=2, controller="replace",
              target_prompt="a big green circle on a blue background"),
         "; choose refine under Attention control"),
    ]
    for kwargs, match in cases:
        with pytest.raises(AppError) as err:
            c.predict(image=image, **kwargs)
        message = str(err.value)
        assert match in message and len(message) <= 300 and "--" not in message, message
        assert "blue background a red circle" not in message
    # Over the text encoder's limit but under the cap: it runs, and the log stays short all the same.
    shown = c.predict(image=image, source_prompt=LONG, steps=2, api_name="/invert")
    assert shown[-1].startswith("**Inverted**")
    assert_quiet(server_log())
