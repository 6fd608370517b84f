"""The Gradio page of ``npinv serve``: upload, invert (once per session and settings), edit many times.

Every model call goes through one queue slot (``concurrency_id="model"``, limit 1): the model is
not thread safe, and on a small machine parallel runs would only run out of memory. The queue
itself is bounded, so extra users wait or are told the server is busy. Each session keeps its own
inversion cache in ``gr.State``: nobody is served an inversion of someone else's image.
"""

from __future__ import annotations

import dataclasses
import functools
import ipaddress
import logging
import math
import re
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gradio as gr

from npinv.cache import InversionCache
from npinv.editing import UNET_LAYER_KNOBS
from npinv.errors import NpinvError
from npinv.settings import (
    FLOWEDIT_KNOBS,
    MODEL_DECLARED,
    Choice,
    EditSettings,
    Flag,
    InvertSettings,
    Number,
    Spec,
    Window,
    WordNumbers,
    WordPair,
    WordWindows,
    default_of,
    flag_name,
    specs,
)
from npinv.webapp.engine import FORM_FIELDS, INVERT_FIELDS, MAPS_FIELD, SERVER_CAPS, Engine

log = logging.getLogger("npinv.webapp")

# Choices shown under other words than their values (None: an optional choice's "default").
CHOICE_LABELS: dict[str, dict[Any, str]] = {
    "offset": {None: "model default", 0: "0 (published code)", 1: "1 (SD config)"},
}
RADIO_MAX = 3  # a choice of at most this many options is a row of radio buttons, a longer one a dropdown
# Small model outputs (64x64 for the embedded model) are shown filling their frames, pixels kept sharp.
CSS = ".npinv-pixels img { image-rendering: pixelated; width: 100%; height: 100%; object-fit: contain; }"


@dataclasses.dataclass(frozen=True)
class ServeOptions:
    """How the server listens and how much it holds at once."""

    host: str = "127.0.0.1"
    port: int = 7860
    queue_size: int = 16  # requests waiting beyond the one running; more are refused as "queue full"
    max_sessions: int = 64  # sessions whose state (inversion caches) is kept, least recently used first out
    session_ttl_s: float = 3600.0  # a session's cache is dropped this long after its last request
    examples: bool = True

    def __post_init__(self) -> None:
        if not 1 <= self.port <= 65535:
            raise NpinvError(f"--port must lie in 1..65535, got {self.port}")
        for name in ("queue_size", "max_sessions", "session_ttl_s"):
            if getattr(self, name) <= 0:
                raise NpinvError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")


def _spec(cls: type, name: str) -> Spec:
    return next(spec for f, spec in specs(cls) if f.name == name)


def _label(name: str, spec: Spec) -> str:
    return spec.label or flag_name(name)


# Messages written for the command line (shared with it) name its flags; the page names its own
# controls instead. Any other flag left in a message (a new one) becomes "the server's ... setting".
PAGE_WORDING = [
    (re.compile(r"; use the refine controller$"),
     f"; choose refine under {_label('controller', _spec(EditSettings, 'controller'))} "
     "(it aligns prompts of any length)"),
    (re.compile(r"at least one (?:--)?reweight WORD=SCALE"), "at least one WORD=SCALE in the Reweight box (Controller settings)"),
    (re.compile(r"; rerun with --dtype fp32( \(or bf16\))?"),
     "; try a lower guidance or another image (or ask the server's operator to serve the model in fp32)"),
    (re.compile(r"(?<![\w-])--([a-z][\w-]*)"), r"the server's \1 setting"),
]
MAX_MESSAGE_CHARS = 500


def page_message(text: str) -> str:
    """A message as the page shows it: its controls' names for command-line flags, on one line, and
    at most MAX_MESSAGE_CHARS long (the middle cut, so the advice at the end stays)."""
    for pattern, wording in PAGE_WORDING:
        text = pattern.sub(wording, text)
    text = " ".join(text.split())
    if len(text) > MAX_MESSAGE_CHARS:
        head = MAX_MESSAGE_CHARS * 2 // 3
        text = f"{text[:head]} ... {text[head + 5 - MAX_MESSAGE_CHARS:]}"
    return text


def _readable_errors(fn: Callable) -> Callable:
    """Turn every failure into a one-line message in the page (a gr.Error), never a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except gr.Error:
            raise
        except NpinvError as exc:
            raise gr.Error(page_message(str(exc)), print_exception=False) from None
        except MemoryError:
            raise gr.Error("out of memory: try fewer steps or a smaller image", print_exception=False) from None
        except Exception as exc:  # a bug, not bad input: full traceback in the server log only
            if type(exc).__name__ == "OutOfMemoryError":  # torch.OutOfMemoryError (GPU)
                raise gr.Error("the GPU ran out of memory: try fewer steps or a smaller image",
                               print_exception=False) from None
            log.exception("internal error in %s", fn.__name__)
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            raise gr.Error(page_message(f"internal error: {type(exc).__name__}: {first}"[:300]),
                           print_exception=False) from None

    return wrapper


def _upload_path(image: Any, upload_root: Path) -> tuple[str, str]:
    """(server path, user's file name) of an image input received without preprocessing.

    Only a file record inside Gradio's upload folder counts (uploads and the examples' copies
    live there). Gradio checks paths only in records that carry its type tag, so a record without
    one, or a bare string, would otherwise be any server path the client chose.
    """
    if not image:
        raise NpinvError("upload an image or pick one of the examples first")
    path = image.get("path") if isinstance(image, dict) else None
    try:
        inside = isinstance(path, str) and bool(path) and Path(path).resolve().is_relative_to(upload_root)
    except (OSError, ValueError):  # a NUL byte, a name too long
        inside = False
    if not inside:
        raise NpinvError("the image must be an uploaded file; upload it again")
    name = image.get("orig_name")
    name = name if isinstance(name, str) and name.strip() else Path(path).name
    name = " ".join(name.split())  # messages and the status quote it: one line, a readable length
    return str(path), name if len(name) <= 80 else name[:77] + "..."


def _psnr(value: float) -> float | None:
    return None if math.isinf(value) else round(value, 2)


def _show_warnings(messages: list[str]) -> None:
    for message in messages:
        gr.Warning(page_message(message))  # "words outside the vocabulary: ..." lists up to a whole prompt


def example_rows(guidance: float | None = None) -> list[list]:
    """The bundled examples as form rows: image, source and target prompts, controller, guidance and
    blend (:data:`EXAMPLE_FIELDS`): a word swap blended on the changed word ("red green") at ``guidance``
    (default: the embedded model's declared editing guidance, from its model card's sweep)."""
    from npinv.demo import bundled_examples
    from npinv.model import model_edit_guidance

    guidance = model_edit_guidance(None) if guidance is None else guidance

    rows = []
    for e in bundled_examples():
        target = e["edits"][0]
        changed = [(s, t) for s, t in zip(e["prompt"].split(), target.split(), strict=False) if s != t]
        blend = " ".join(changed[0]) if len(changed) == 1 else ""
        rows.append([e["path"], e["prompt"], target, "replace", guidance, blend])
    return rows


EXAMPLE_FIELDS = ("controller", "guidance", "blend")  # the edit form's fields an example row fills
# The inversion settings' layout: these at the top of "Inversion settings" as they are, the other
# web fields of InvertSettings (the scheme's) below them with their help.
INVERT_TOP = ("steps", "offset", "resize")
# The edit form's layout: these settings above, the other web settings in "Controller settings",
# the advanced ones (Spec.advanced) in "More settings". Every control is derived from the schema.
FORM_TOP = ("method", "controller", "guidance")


def setting_text(kind, value) -> str:
    """A setting's value as its text box shows it (what the schema's text rule reads back)."""
    if value is None:
        return ""
    if isinstance(kind, Window) and isinstance(value, tuple):
        return ",".join(f"{v:g}" for v in value)
    if isinstance(kind, WordWindows):
        return " ".join(f"{w}={setting_text(Window(), v)}" for w, v in value.items())
    if isinstance(kind, WordNumbers):
        return ", ".join(f"{w}={v:g}" for w, v in value.items())
    if isinstance(kind, WordPair):
        return " ".join(value)
    return f"{value:g}" if isinstance(value, float) else str(value)


def method_guidance(engine: Engine, method: str) -> float:
    """The guidance an edit with ``method`` defaults to on the engine's model (FlowEdit: the paper's
    target guidance; the others: the model's recommended one), where the page's slider moves to."""
    return EditSettings(method=method).resolved(engine.model).guidance


def runnable_choices(name: str, options: list, model) -> list:
    """The methods and inversion schemes this server's model runs (flow-only ones are not offered for a
    UNet model); every other setting's options as they are."""
    from npinv.methods import METHODS
    from npinv.schemes import SCHEMES

    registry = {"method": METHODS, "invert_scheme": SCHEMES}.get(name)
    if registry is None or model is None or getattr(model, "is_flow", False):
        return options
    return [c for c in options if c not in registry or not registry[c].flow_only]


def setting_control(field: dataclasses.Field, spec: Spec, *, guidance: float | None = None, high: float | None = None,
                    info: bool = False, model=None) -> gr.Component:
    """The page's control of one settings field (EditSettings' or InvertSettings'), from its schema
    kind, default and label. ``guidance``: the guidance slider's start (the model's); ``high``: this
    server's cap of a number below the schema's bound (:data:`~npinv.webapp.engine.SERVER_CAPS`). The
    control's value is sent as is (preprocess=False) and read by the schema, like a manifest's."""
    kind, default, label = spec.kind, default_of(field), _label(field.name, spec)
    if default is None and model is not None and field.name in MODEL_DECLARED:
        default = getattr(model, f"edit_{field.name}")  # the model's declared self-replace, shown as its number
    common = dict(label=label, elem_id=f"npinv-{flag_name(field.name)}", info=spec.help if info else None)
    if field.name == "guidance" and guidance is not None:
        # Starts at the model's recommended editing guidance (its npinv.json), else 7.5; the range and
        # step fit it, so the browser's slider does not snap it to another value.
        return gr.Slider(0, max(15, guidance), value=guidance, step=0.5 if (2 * guidance).is_integer() else 0.01,
                         **common)
    if isinstance(kind, Choice):
        labels = CHOICE_LABELS.get(field.name, {})
        options = runnable_choices(field.name, [*kind.choices(), *([None] if kind.optional else [])], model)
        choices = [(labels.get(c, "default" if c is None else str(c)), "default" if c is None else str(c))
                   for c in options]
        value = "default" if default is None else str(default)
        if len(choices) <= RADIO_MAX:
            return gr.Radio(choices, value=value, **common)
        return gr.Dropdown(choices, value=value, **common)
    if isinstance(kind, Flag):
        return gr.Checkbox(bool(default), **common)
    if isinstance(kind, Number) and not kind.optional:
        top = kind.high if high is None else min(kind.high, high)
        if kind.integer:
            return gr.Slider(kind.low, top, value=min(default, top), step=1, **common)
        if (100 * default).is_integer():
            step = 0.05 if (20 * default).is_integer() else 0.01
            low = kind.low + step if kind.low_open else kind.low
            return gr.Slider(low, top, value=min(default, top), step=step, **common)
        # A small default (a tolerance, 0.001): a slider's steps would snap it to 0; a number box keeps
        # it, its arrows stepping by the default's decimal place.
        return gr.Number(default, minimum=kind.low, maximum=top, step=10 ** math.floor(math.log10(default)),
                         **common)
    # Window, WordWindows, WordNumbers, WordPair, an optional Number (a box left empty is none: a gr.Number
    # cannot be empty and still have a default for API clients) and any other kind: its text, read by the
    # schema's text rule.
    return gr.Textbox(setting_text(kind, default), placeholder=spec.metavar or "", **common)


def build_app(engine: Engine, options: ServeOptions | None = None) -> gr.Blocks:
    """The page, bound to one engine (one model). Launch it with :func:`launch`."""
    options = options or ServeOptions()
    model, limits = engine.model, engine.limits
    cache_entries, cache_bytes = limits.cache_entries, int(limits.cache_mb * 2**20)
    upload_root = Path(gr.utils.get_upload_folder()).resolve()

    @_readable_errors
    def invert(image, source_prompt, session: InversionCache,
               progress=gr.Progress(track_tqdm=True), **settings):  # noqa: B008 (Gradio's documented pattern)
        """``settings``: the inversion settings' controls by InvertSettings field name (inputs_kwargs)."""
        path, name = _upload_path(image, upload_root)
        report = engine.invert(session, path, source_prompt, name=name, stage=lambda s: progress(0, desc=s),
                               progress=True, **settings)
        _show_warnings(report.warnings)
        status = (f"**Inverted** {name} ({report.timings.line()}). NPI reconstruction: PSNR "
                  f"{report.psnr:.2f} dB, SSIM {report.ssim:.3f}. Now edit it as often as you like.")
        return (report.input_image, report.reconstruction, _psnr(report.psnr), report.timings.as_dict(),
                str(report.inversion_file), status, session)

    @_readable_errors
    def edit(image, source_prompt, target_prompt, session: InversionCache,
             progress=gr.Progress(track_tqdm=True), **form):  # noqa: B008
        """``form``: the inversion settings' controls by InvertSettings field name and the edit form's
        by EditSettings field name (Gradio's inputs_kwargs)."""
        path, name = _upload_path(image, upload_root)
        settings = {n: form.pop(n) for n in INVERT_FIELDS if n in form}
        request = engine.edit_request(target_prompt, **form)
        report = engine.edit(session, path, source_prompt, request, name=name, stage=lambda s: progress(0, desc=s),
                             progress=True, **settings)
        _show_warnings(report.warnings)
        settings = request.settings
        status = (f"**Edited** toward \"{request.target}\" with {settings.method}, {settings.controller} "
                  f"({report.timings.line()}). Source branch: PSNR {report.psnr:.2f} dB to the input.")
        return (report.input_image, report.edited, report.reconstruction, _psnr(report.psnr), report.maps,
                report.timings.as_dict(), str(report.edit_file),
                None if report.inversion_file is None else str(report.inversion_file), status, session)

    side = model.resolution
    pixels = ["npinv-pixels"]
    with gr.Blocks(title="npinv: invert once, edit many", analytics_enabled=False,
                   delete_cache=(600, int(options.session_ttl_s))) as demo:
        # Each session gets a deep copy of this empty cache (a callable would add a public load endpoint).
        session = gr.State(InversionCache(cache_entries, cache_bytes), time_to_live=options.session_ttl_s,
                           delete_callback=lambda c: c.clear())
        gr.Markdown(
            f"## npinv: Negative-prompt Inversion editor\n"
            f"Model **{model.name}** ({side}x{side} px, {model.device.type}). Upload an image and describe it, "
            f"invert it once, then edit it as often as you like: edits of the same image reuse its inversion, "
            f"which is kept for this browser session only.")
        with gr.Row(equal_height=False):
            with gr.Column(scale=1, min_width=320):
                gr.Markdown("### 1. Invert")
                image = gr.Image(label="Image", type="filepath", sources=["upload", "clipboard"], height=220,
                                 elem_id="npinv-image", elem_classes=pixels)
                source_prompt = gr.Textbox(label="Source prompt (describes the image)", elem_id="npinv-source",
                                           placeholder="a red circle on a blue background",
                                           max_length=limits.max_prompt_chars)  # the server checks it too
                with gr.Accordion("Inversion settings", open=False, elem_id="npinv-invert-settings"):
                    # Derived from the schema as the edit form is; the steps and decoder steps go up to
                    # this server's caps (Limits).
                    inv_form: dict[str, gr.Component] = {}
                    for f, spec in specs(InvertSettings):
                        if spec.web:
                            cap = getattr(limits, SERVER_CAPS[f.name]) if f.name in SERVER_CAPS else None
                            inv_form[f.name] = setting_control(f, spec, high=cap, info=f.name not in INVERT_TOP,
                                                               model=engine.model)
                invert_btn = gr.Button("Invert", variant="primary", elem_id="npinv-invert")
            with gr.Column(scale=2, min_width=480):
                status = gr.Markdown("Upload an image or pick an example below.", label="Status", elem_id="npinv-status")
                with gr.Row():
                    input_view = gr.Image(label="Input (as the model sees it)", interactive=False, format="png",
                                          height=220, elem_id="npinv-input", elem_classes=pixels)
                    reconstruction = gr.Image(label="Reconstruction", interactive=False, format="png", height=220,
                                              elem_id="npinv-reconstruction", elem_classes=pixels)
                with gr.Row():
                    psnr = gr.Number(None, label="Reconstruction PSNR (dB)", interactive=False, elem_id="npinv-psnr")
                    inversion_file = gr.DownloadButton("Download inversion (.safetensors)", size="md",
                                                       elem_id="npinv-download-inversion")
        examples_slot = gr.Column()  # filled below, once the edit half's inputs exist
        with gr.Row(equal_height=False):
            with gr.Column(scale=1, min_width=320):
                gr.Markdown("### 2. Edit")
                target_prompt = gr.Textbox(label="Target prompt (the edit)", elem_id="npinv-target",
                                           placeholder="a green circle on a blue background",
                                           max_length=limits.max_prompt_chars)
                # The form's controls, derived from the settings schema (see setting_control).
                # A flow model's form leaves out the UNet layer-size knobs (refused there: no effect), a UNet
                # model's FlowEdit's (a flow-only method, not offered there).
                hidden = UNET_LAYER_KNOBS if getattr(engine.model, "is_flow", False) else FLOWEDIT_KNOBS
                web = [(f, spec) for f, spec in specs(EditSettings) if spec.web and f.name not in hidden]
                form: dict[str, gr.Component] = {}

                def controls(fields, info: bool = False) -> None:
                    for f, spec in fields:
                        form[f.name] = setting_control(f, spec, guidance=engine.edit_guidance, info=info,
                                                       model=engine.model)

                controls([(f, spec) for f, spec in web if f.name in FORM_TOP])
                with gr.Accordion("Controller settings", open=False, elem_id="npinv-controller-settings"):
                    controls([(f, spec) for f, spec in web if f.name not in FORM_TOP and not spec.advanced])
                    form[MAPS_FIELD] = gr.Checkbox(False, label="Show cross-attention maps per word",
                                                   elem_id="npinv-maps-toggle")
                with gr.Accordion("More settings", open=False, elem_id="npinv-more-settings"):
                    controls([(f, spec) for f, spec in web if f.name not in FORM_TOP and spec.advanced], info=True)
                edit_btn = gr.Button("Edit", variant="primary", elem_id="npinv-edit")
                # The guidance slider follows the method: its own default (FlowEdit's), else the model's.
                form["method"].change(functools.partial(method_guidance, engine), form["method"], form["guidance"],
                                      api_visibility="private", queue=False)
            with gr.Column(scale=2, min_width=480):
                with gr.Row():
                    edited = gr.Image(label="Edit", interactive=False, format="png", height=220,
                                      elem_id="npinv-edited", elem_classes=pixels)
                    with gr.Column():
                        edit_file = gr.DownloadButton("Download edit (PNG)", size="md", elem_id="npinv-download-edit")
                        timings = gr.JSON(label="Timings and cache", elem_id="npinv-timings")
                maps = gr.Gallery(label="Cross-attention maps per word", columns=7, height="auto", format="png",
                                  elem_id="npinv-maps", elem_classes=pixels)
        if options.examples:
            with examples_slot:
                gr.Examples(example_rows(engine.edit_guidance),
                            inputs=[image, source_prompt, target_prompt, *(form[n] for n in EXAMPLE_FIELDS)],
                            label="Bundled examples (64x64 shapes): pick one, then Invert and Edit",
                            elem_id="npinv-examples")

        # preprocess=False: the upload reaches engine.read_upload untouched, which gives readable
        # errors for files that are not images; Gradio's own preprocessing would fail with an opaque one.
        common = dict(concurrency_id="model", concurrency_limit=1, preprocess=False)
        # The settings reach the handlers as keyword arguments named by the schema's fields (also the API's
        # parameter names), after the image and the source prompt: InvertSettings' web fields in
        # INVERT_FIELDS' order, then for an edit the target prompt and EditSettings' in FORM_FIELDS' order.
        invert_settings = {n: inv_form[n] for n in INVERT_FIELDS}
        invert_btn.click(invert, [image, source_prompt, session],
                         [input_view, reconstruction, psnr, timings, inversion_file, status, session],
                         inputs_kwargs=invert_settings, api_name="invert", **common)
        edit_btn.click(edit, [image, source_prompt],
                       [input_view, edited, reconstruction, psnr, maps, timings, edit_file, inversion_file, status,
                        session], inputs_kwargs={**invert_settings, "target_prompt": target_prompt, "session": session,
                                                 **{n: form[n] for n in FORM_FIELDS if n in form}},
                       api_name="edit", **common)
    demo.queue(max_size=options.queue_size, default_concurrency_limit=1)
    return demo


def launch(demo: gr.Blocks, engine: Engine, options: ServeOptions) -> str:
    """Serve ``demo`` on ``options.host:port`` in background threads and return its URL once it
    listens: no share link, no analytics, bounded uploads and sessions. ``demo.close()`` stops it."""
    try:
        demo.launch(
            server_name=options.host, server_port=options.port, share=False, prevent_thread_lock=True,
            max_file_size=int(engine.limits.max_upload_mb * 2**20), state_session_capacity=options.max_sessions,
            quiet=True, ssr_mode=False, mcp_server=False, pwa=False, enable_monitoring=False, inbrowser=False,
            show_error=True, css=CSS)
    except OSError as exc:
        log.debug("launch failed: %s", exc)
        raise NpinvError(f"cannot listen on {options.host}:{options.port}: the port is in use or the address is not "
                         "this machine's; choose another --port or --host") from None
    return demo.local_url or f"http://{options.host}:{options.port}/"


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def serve(engine: Engine, options: ServeOptions) -> None:
    """Build and serve the page until interrupted (``npinv serve``)."""
    if not is_loopback(options.host):
        print(f"npinv: warning: serving on {options.host}: anyone who can reach this machine can use the app "
              "(there is no login)", file=sys.stderr)
    demo = build_app(engine, options)
    if threading.current_thread() is threading.main_thread():
        # Stop on Ctrl-C and on SIGTERM even when started from a shell that ignores SIGINT
        # (a background job), where Python would leave it ignored.
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, _interrupt)
    try:
        url = launch(demo, engine, options)
        print(f"npinv: serving {engine.model.name} on {url} (queue {options.queue_size}, uploads up to "
              f"{engine.limits.max_upload_mb:g} MB); Ctrl-C stops", file=sys.stderr, flush=True)
        try:
            while demo.is_running:
                time.sleep(0.5)
        except KeyboardInterrupt:
            print("npinv: stopping", file=sys.stderr)
    finally:
        demo.close()
        engine.close()
