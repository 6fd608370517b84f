"""The model-facing half of the web app: check a request, read an upload, and call the service.

Every model call goes through :mod:`npinv.service` with the session's
:class:`~npinv.cache.InversionCache` (inversions, and NTI's optimised negatives, are reused there
under the one key rule); every setting is read and checked by :mod:`npinv.settings`, so a bad value
gets the same message as on the command line. The :class:`Engine` owns the one model of a server,
the lock that serialises its use and the output files. Nothing here imports Gradio, so all of it is
tested and usable without a server.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import shutil
import tempfile
import threading
import time
import uuid
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError

from npinv.attention.maps import heat_image, word_maps
from npinv.cache import InversionCache
from npinv.checks import short_repr
from npinv.cost import Cost
from npinv.editing import check_edit
from npinv.errors import NpinvError
from npinv.inversion import Inversion
from npinv.io import load_image, save_image, tensor_to_image
from npinv.methods import check_scheme, get_method
from npinv.model import Model, ModelSettings, QuietTruncation
from npinv.service import (
    Edited,
    InversionKey,
    Inverted,
    Source,
    invert_one,
    prepare_picture,
    reconstruct_inverted,
)
from npinv.service import edit as edit_inverted
from npinv.settings import (
    EditSettings,
    Flag,
    InvertSettings,
    Number,
    ReconstructSettings,
    check_value,
    default_of,
    flag_name,
    from_value,
    specs,
)

Stage = Callable[[str], None]

# The edit form's values, keyed by EditSettings' field names: the settings the page offers, and the
# output choice of per-word attention maps.
MAPS_FIELD = "keep_attention_maps"
FORM_FIELDS = tuple(f.name for f, spec in specs(EditSettings) if spec.web) + (MAPS_FIELD,)
# The inversion settings the page offers (InvertSettings' web fields; the size is the model's), with
# the schema's defaults, and those a server caps below the schema's bound (by a Limits field).
INVERT_FIELDS = tuple(f.name for f, spec in specs(InvertSettings) if spec.web)
INVERT_DEFAULTS = {f.name: default_of(f) for f, spec in specs(InvertSettings) if spec.web}
SERVER_CAPS = {"steps": "max_steps", "decoder_steps": "max_decoder_steps"}


@dataclasses.dataclass(frozen=True)
class Limits:
    """What one server accepts and keeps: the guards against uploads and requests that would
    exhaust its memory, and the size of each session's inversion cache."""

    max_pixels: int = 40_000_000  # decoded RGB at 40 MP is 120 MB; Pillow's own bomb limit is 89 MP
    max_upload_mb: float = 20.0
    max_steps: int = 200
    max_decoder_steps: int = 1000  # decoder inversion's Adam steps (each a VAE decode and its gradient); 0: none
    cache_entries: int = 4
    cache_mb: float = 256.0
    file_ttl_s: float = 600.0  # output files outlive the request only until Gradio has copied them
    # Prompts and the edit form's words: far above what a text encoder reads (77 tokens for SD), far
    # below what would slow the tokenizer or fill a message. Not a command-line flag.
    max_prompt_chars: int = 1000

    def __post_init__(self) -> None:
        for name in ("max_pixels", "max_upload_mb", "max_steps", "cache_entries", "cache_mb", "file_ttl_s"):
            if not getattr(self, name) > 0:
                flag = "--max-megapixels" if name == "max_pixels" else f"--{name.replace('_', '-')}"
                raise NpinvError(f"{flag} must be positive, got {getattr(self, name)}")
        if not self.max_prompt_chars > 0:
            raise NpinvError(f"max_prompt_chars must be positive, got {self.max_prompt_chars}")
        if not self.max_decoder_steps >= 0:
            raise NpinvError(f"--max-decoder-steps must be 0 or more, got {self.max_decoder_steps}")


def read_upload(path: str | Path, model: Model, settings: InvertSettings | None = None, *, name: str | None = None,
                max_pixels: int = Limits.max_pixels) -> Source:
    """Check an upload and prepare it exactly as the command line prepares the same file
    (:func:`npinv.service.prepare_file`: the same picture, the same digest of the file's bytes);
    every bad file is one readable :class:`NpinvError` naming it, never the server's path."""
    settings = settings or InvertSettings()
    settings.validate()
    path = Path(path)
    name = name or path.name
    if not path.is_file():
        raise NpinvError(f"the upload {name} is gone from the server; upload it again")
    if path.stat().st_size == 0:
        raise NpinvError(f"{name} is empty")
    digest = hashlib.sha256()  # of the file's bytes, as prepare_file's, read in chunks
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    # The header gives the size without decoding: refuse huge images before they take memory.
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                width, height = img.size
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise NpinvError(f"{name} is too large (over Pillow's {Image.MAX_IMAGE_PIXELS} pixel limit)") from None
    except UnidentifiedImageError:
        raise NpinvError(f"{name} is not an image file Pillow can read (upload a PNG, JPEG or WebP)") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise NpinvError(f"{name}: cannot read image ({exc})") from None
    if width * height > max_pixels:
        raise NpinvError(f"{name} is {width}x{height} pixels; this server accepts at most {max_pixels:,} pixels "
                         f"({max_pixels / 1e6:g} MP)")
    try:
        img = load_image(path)
    except NpinvError as exc:
        raise NpinvError(str(exc).replace(str(path), name)) from None
    return prepare_picture(img, model, settings, name=name, digest=digest.hexdigest())


# -- checks of a request's raw values: what the settings schema cannot know -------------------------
def text_field(value: Any, label: str, max_chars: int) -> str:
    """A prompt, stripped: None is empty; anything but a string, or a string over ``max_chars``, is
    refused with a message that gives its length, never its text."""
    if value is None:
        return ""
    if not isinstance(value, str):
        raise NpinvError(f"the {label} must be text, got {short_repr(value)}")
    value = value.strip()
    if len(value) > max_chars:
        raise NpinvError(f"the {label} is {len(value):,} characters long; this server accepts at most {max_chars:,}")
    return value


def check_length(value: Any, name: str, max_chars: int) -> None:
    """Refuse a huge value before the schema parses it: any client can send 100,000 characters (or a
    list of as many words) where the page has a short text box. Counts the characters of the strings
    and the items of the lists and dicts in ``value``."""
    if isinstance(value, str):
        if len(value) > max_chars:
            raise NpinvError(f"{flag_name(name)} is {len(value):,} characters long; this server accepts at most "
                             f"{max_chars:,}")
        return
    size, todo = 0, [value]
    while todo and size <= max_chars:
        item = todo.pop()
        if isinstance(item, str):
            size += len(item)
        elif isinstance(item, dict):
            size += len(item)
            todo.extend(item.keys())
            todo.extend(item.values())
        elif isinstance(item, (list, tuple)):
            size += len(item)
            todo.extend(item)
    if size > max_chars:
        raise NpinvError(f"{flag_name(name)} is too long; this server accepts at most {max_chars:,} characters")


@dataclasses.dataclass(frozen=True)
class EditRequest:
    """One edit asked for in the form: a target prompt and the settings that shape it."""

    target: str
    settings: EditSettings


def parse_edit_request(target: Any, form: dict[str, Any] | None = None, *,
                       defaults: Any = None, max_chars: int = Limits.max_prompt_chars) -> EditRequest:
    """The form's values (keyed by :data:`FORM_FIELDS`, EditSettings' field names, as any client may
    send them: numbers or text, ``blend="red green"``, ``reweight="green=2"``) read and checked by
    the settings schema (:func:`npinv.settings.from_value`), so every bad value gets the schema's one
    message. Here only what the schema cannot know: the target prompt, and every value's length.
    A guidance or self-replace of None (or empty, or "default") is the one ``defaults`` declares (a
    model or its :class:`~npinv.model.ModelSettings`; none: npinv's 7.5 and 0.6):
    :meth:`Engine.edit_request` passes the model."""
    target = text_field(target, "target prompt", max_chars)
    if not target:
        raise NpinvError("give a target prompt: the source prompt with the words you want changed")
    values = dict(form or {})
    unknown = [n for n in values if n not in FORM_FIELDS]
    if unknown:
        raise NpinvError(f"unknown setting {short_repr(unknown[0])} (known: {', '.join(FORM_FIELDS)})")
    for name, value in values.items():
        check_length(value, name, max_chars)
    maps = values.pop(MAPS_FIELD, False)
    maps = check_value(MAPS_FIELD, Flag(), Flag().from_value(maps))
    settings = from_value(EditSettings, values).resolved(ModelSettings() if defaults is None else defaults)
    # A float, whatever the client sent (3 or 3.0): the guidance names NTI's cached variant.
    settings = dataclasses.replace(settings, guidance=float(settings.guidance), keep_attention_maps=maps)
    return EditRequest(target, settings)


# -- the server's engine: one model, one lock, the output files ------------------------------------
@dataclasses.dataclass
class Timings:
    """What a request did and how long each part took (the app shows it as JSON). The model's parts
    are the service's results' costs; UNet calls and rows are the request's inversion (0 when cached)
    plus its reconstruction or edit. The ``invert_*`` and ``decoder_steps`` fields are the inversion's
    :meth:`~npinv.inversion.Inversion.scheme_report` (how it was made, also when it came from the cache)."""

    inversion_cached: bool
    read_seconds: float = 0.0
    invert_seconds: float = 0.0  # 0 when the inversion came from the cache
    reconstruct_seconds: float = 0.0
    edit_seconds: float = 0.0
    total_seconds: float = 0.0
    steps: int = 0
    unet_calls: int = 0
    unet_rows: int = 0
    cache_entries: int = 0
    cache_bytes: int = 0
    cache_hits: int = 0
    cache_misses: int = 0
    invert_scheme: str = "ddim"
    invert_iters: int = 0
    invert_extra_calls: int = 0
    invert_residual: float | None = None  # the worst step's relative residual (fixed-point); None: unchecked
    decoder_steps: int = 0
    bdia_gamma: float = 1.0

    def as_dict(self) -> dict:
        """Seconds to 0.1 ms; the residual (often far below that) to 4 significant digits."""
        return {k: (round(v, 4) if k.endswith("seconds") else float(f"{v:.4g}")) if isinstance(v, float) else v
                for k, v in dataclasses.asdict(self).items()}

    def line(self) -> str:
        inverted = "inversion cached" if self.inversion_cached else f"inversion {self.invert_seconds:.2f} s"
        parts = [inverted]
        if self.reconstruct_seconds:
            parts.append(f"reconstruction {self.reconstruct_seconds:.2f} s")
        if self.edit_seconds:
            parts.append(f"edit {self.edit_seconds:.2f} s")
        how = "" if self.invert_scheme == "ddim" else f" {self.invert_scheme}"
        decoder = f", {self.decoder_steps} decoder steps" if self.decoder_steps else ""
        return (f"{' · '.join(parts)} · total {self.total_seconds:.2f} s ({self.steps}{how} steps{decoder}, "
                f"{self.unet_calls} UNet calls)")


@dataclasses.dataclass
class InvertReport:
    input_image: Image.Image
    reconstruction: Image.Image
    psnr: float
    ssim: float
    inversion_file: Path
    timings: Timings
    warnings: list[str]


@dataclasses.dataclass
class EditReport:
    """An edit as the page shows it: the edited image, the source branch (the method's
    reconstruction) with its distance to the input, the optional attention maps, and the service's
    result (``result.inversion`` has NTI's optimised negatives when the method made them)."""

    input_image: Image.Image
    edited: Image.Image
    reconstruction: Image.Image
    psnr: float
    ssim: float
    maps: list[tuple[Image.Image, str]]
    result: Edited
    edit_file: Path
    inversion_file: Path | None  # None when the edit needed no inversion (FlowEdit on a fresh upload)
    timings: Timings
    warnings: list[str]


class Engine:
    """One server's model and what guards it: a lock (the model and its attention processors are
    not thread safe), the limits, and a folder for the files the page offers for download."""

    def __init__(self, model: Model, limits: Limits | None = None, files_dir: str | Path | None = None) -> None:
        self.model = model
        self.limits = limits or Limits()
        self.lock = threading.Lock()
        self._own_dir = files_dir is None
        self.files_dir = Path(tempfile.mkdtemp(prefix="npinv-serve-")) if files_dir is None else Path(files_dir)
        self.files_dir.mkdir(parents=True, exist_ok=True)

    @property
    def edit_guidance(self) -> float:
        """The guidance edits default to: the model's declared one (its folder's npinv.json), else 7.5."""
        return self.model.edit_guidance

    def edit_request(self, target: Any, **form: Any) -> EditRequest:
        """:func:`parse_edit_request` with this model's editing guidance and this server's text limit."""
        return parse_edit_request(target, form, defaults=self.model, max_chars=self.limits.max_prompt_chars)

    def invert_settings(self, **values: Any) -> InvertSettings:
        """The request's inversion settings (keyed by :data:`INVERT_FIELDS`, InvertSettings' web fields,
        as any client may send them; a missing one is the schema's default), read and checked by the
        schema, then within this server's caps (:data:`SERVER_CAPS`: steps, decoder steps)."""
        unknown = [n for n in values if n not in INVERT_FIELDS]
        if unknown:
            raise NpinvError(f"unknown setting {short_repr(unknown[0])} (known: {', '.join(INVERT_FIELDS)})")
        for name, value in values.items():
            check_length(value, name, self.limits.max_prompt_chars)
        settings = from_value(InvertSettings, values)
        kinds = {f.name: spec.kind for f, spec in specs(InvertSettings)}
        for name, limit in SERVER_CAPS.items():
            value, cap, kind = getattr(settings, name), getattr(self.limits, limit), kinds[name]
            if value > cap:
                what = "a whole number" if isinstance(kind, Number) and kind.integer else "a number"
                low = kind.low if isinstance(kind, Number) else 0
                raise NpinvError(f"{flag_name(name)} must be {what} in {low:g}..{cap} on this server, got {value}")
        return settings

    def new_cache(self) -> InversionCache:
        return InversionCache(self.limits.cache_entries, int(self.limits.cache_mb * 2**20))

    def close(self) -> None:
        if self._own_dir:
            shutil.rmtree(self.files_dir, ignore_errors=True)

    # -- requests ---------------------------------------------------------------------------------
    def invert(self, cache: InversionCache, path: str | Path, prompt: Any, *, name: str | None = None,
               stage: Stage | None = None, progress: bool = False, **settings: Any) -> InvertReport:
        """Invert an upload (or take it from the session's cache) and reconstruct it with NPI.
        ``settings``: the inversion settings by field name (:meth:`invert_settings`: steps, offset,
        resize, invert_scheme, invert_iters, invert_tol, bdia_gamma, decoder_steps; missing ones are the schema's
        defaults); they are the cache key's, so another scheme is another inversion."""
        prompt = self._source_prompt(prompt)
        settings = self.invert_settings(**settings)
        with self._model_call() as caught:
            source, read_s = self._read(path, name, settings)
            _stage(stage, "inverting")
            inverted = invert_one(self.model, source, prompt, settings, cache=cache, progress=progress)
            _stage(stage, "reconstructing")
            rec = reconstruct_inverted(self.model, inverted, ReconstructSettings(method="npi"), progress=progress)
            start = time.perf_counter()  # writing the file, not the model's work
            inv_file = self._save_inversion(inverted.inversion)
            save_s = time.perf_counter() - start
        timings = self._timings(cache, inverted, rec.cost, settings.steps, read_s, save_s,
                                reconstruct_seconds=rec.reconstruction.cost.seconds)
        return InvertReport(tensor_to_image(source.image), tensor_to_image(rec.reconstruction.image), rec.psnr,
                            rec.ssim, inv_file, timings, caught)

    def edit(self, cache: InversionCache, path: str | Path, prompt: Any, request: EditRequest, *,
             name: str | None = None, stage: Stage | None = None, progress: bool = False,
             **settings: Any) -> EditReport:
        """Edit an upload toward ``request``, inverting it first only if this session has not yet with
        these inversion ``settings`` (by field name, as :meth:`invert`'s), and optimising NTI's
        negatives only once per guidance: the service keeps them in the cache."""
        prompt = self._source_prompt(prompt)
        settings = self.invert_settings(**settings)
        # Before the inversion's cost: the method against the scheme and the model, the words.
        check_scheme(request.settings.method, settings.invert_scheme)
        check_edit(self.model, prompt, [request.target], settings.steps, request.settings)
        with self._model_call() as caught:
            source, read_s = self._read(path, name, settings)
            inverted_before = InversionKey.of(self.model, source, prompt, settings) in cache
            # An inversion-free method (FlowEdit) takes the session's inversion when there is one (its clean
            # latent is all it reads), else the image's latents alone, at no model call.
            encode_only = not inverted_before and not get_method(request.settings.method).needs_inversion
            if not inverted_before:
                _stage(stage, "encoding" if encode_only else "inverting")
            inverted = invert_one(self.model, source, prompt, settings, cache=cache, progress=progress,
                                  encode_only=encode_only)
            _stage(stage, "editing")
            done = edit_inverted(self.model, [(inverted, [request.target])], request.settings, cache=cache,
                        progress=progress)[0]
            metrics = done.source_metrics()
            maps = self._maps(done) if request.settings.keep_attention_maps else []
            edited = tensor_to_image(done.images[:1])
            start = time.perf_counter()  # writing the files, not the model's work
            folder = self._request_folder()
            edit_file = save_image(edited, folder / "edit.png")
            inv_file = None if done.inversion.encoded_only else self._save_inversion(done.inversion, folder)
            save_s = time.perf_counter() - start
        timings = self._timings(cache, inverted, done.cost, settings.steps, read_s, save_s,
                                edit_seconds=done.edit_cost.seconds)
        return EditReport(tensor_to_image(source.image), edited, tensor_to_image(done.result.source_image),
                          metrics["psnr"], metrics["ssim"], maps, done, edit_file, inv_file, timings, caught)

    # -- helpers ----------------------------------------------------------------------------------
    def _source_prompt(self, prompt: Any) -> str:
        prompt = text_field(prompt, "source prompt", self.limits.max_prompt_chars)
        if not prompt:
            raise NpinvError("give a source prompt that describes the image")
        return prompt

    def _read(self, path: str | Path, name: str | None, settings: InvertSettings) -> tuple[Source, float]:
        start = time.perf_counter()  # reading the file, not the model's work
        source = read_upload(path, self.model, settings, name=name, max_pixels=self.limits.max_pixels)
        return source, time.perf_counter() - start

    def _maps(self, done: Edited) -> list[tuple[Image.Image, str]]:
        """The per-word cross-attention maps as captioned heat images."""
        names = {0: "source"} | {k + 1: "target" for k in range(len(done.result.targets))}
        return [(heat_image(w.heat, scale=max(1, 128 // w.heat.shape[-1])), f"{names[w.branch]}: {w.word}")
                for w in word_maps(self.model, done.result, done.inversion.source_prompt)]

    @contextlib.contextmanager
    def _model_call(self) -> Iterator[list[str]]:
        """Hold the model; collect its one-line warnings (unknown words, truncated prompts) for the page,
        and keep the pipeline from logging the cut-off end of a long prompt (see :class:`QuietTruncation`)."""
        with self.lock, warnings.catch_warnings(record=True) as records, QuietTruncation.on(self.model):
            warnings.simplefilter("always")
            messages: list[str] = []
            try:
                yield messages
            finally:
                from npinv.model import NpinvWarning

                messages.extend(dict.fromkeys(str(r.message) for r in records if issubclass(r.category, NpinvWarning)))

    def _timings(self, cache: InversionCache, inverted: Inverted, cost: Cost, steps: int, read_s: float,
                 save_s: float, **parts: float) -> Timings:
        """``cost``: the request's model work, from the service's results (its inversion's, zero when
        cached, and its reconstruction's or edit's); the total adds reading the upload and writing files."""
        stats = cache.stats()
        return Timings(inversion_cached=inverted.cached, read_seconds=read_s, invert_seconds=inverted.cost.seconds,
                       total_seconds=read_s + cost.seconds + save_s, steps=steps,
                       unet_calls=cost.unet_calls, unet_rows=cost.unet_rows, cache_entries=stats.entries,
                       cache_bytes=stats.bytes, cache_hits=stats.hits, cache_misses=stats.misses,
                       **inverted.inversion.scheme_report(), **parts)

    def _request_folder(self) -> Path:
        self._prune()
        folder = self.files_dir / uuid.uuid4().hex
        folder.mkdir()
        return folder

    def _save_inversion(self, inv: Inversion, folder: Path | None = None) -> Path:
        folder = folder or self._request_folder()
        return inv.save(folder / "inversion.safetensors")

    def _prune(self) -> None:
        """Remove request folders older than the files' time to live (Gradio serves its own copies)."""
        cutoff = time.time() - self.limits.file_ttl_s
        for child in self.files_dir.iterdir():
            with contextlib.suppress(OSError):
                if child.is_dir() and child.stat().st_mtime < cutoff:
                    shutil.rmtree(child, ignore_errors=True)


def _stage(stage: Stage | None, text: str) -> None:
    if stage is not None:
        stage(text)
