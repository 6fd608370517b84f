"""The model-facing half of the web app: read an upload, invert it (once per session and settings),
reconstruct it, edit it.

Plain functions over :mod:`npinv.pipeline` and :mod:`npinv.editing`, and an :class:`Engine` that
owns the one model of a server, the lock that serialises its use and the output files. Nothing here
imports Gradio, so all of it is tested and usable without a server.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
import math
import shutil
import tempfile
import threading
import time
import uuid
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError

from npinv.attention.maps import heat_image, word_maps
from npinv.checks import short_repr
from npinv.editing import CONTROLLERS, EDIT_METHODS, EditSettings, edit
from npinv.errors import NpinvError
from npinv.inversion import Inversion, ddim_inversion
from npinv.io import image_to_tensor, load_image, prepare_image, save_image, tensor_to_image
from npinv.metrics import image_metrics, tensor_to_unit
from npinv.model import DEFAULT_EDIT_GUIDANCE, Model
from npinv.pipeline import ReconstructReport, run_reconstruction
from npinv.webapp.cache import CacheKey, InversionCache, tensor_bytes

RESIZE_MODES = ("crop", "fit")
Stage = Callable[[str], None]


@dataclasses.dataclass(frozen=True)
class Limits:
    """What one server accepts and keeps: the guards against uploads and requests that would
    exhaust its memory, and the size of each session's inversion cache."""

    max_pixels: int = 40_000_000  # decoded RGB at 40 MP is 120 MB; Pillow's own bomb limit is 89 MP
    max_upload_mb: float = 20.0
    max_steps: int = 200
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


@dataclasses.dataclass(frozen=True)
class Upload:
    """An uploaded image prepared for the model, and the digest of its file for the cache key."""

    image: torch.Tensor  # (1, 3, H, W) in [-1, 1], cropped or fitted to the model's size
    digest: str  # sha256 of the file's bytes
    name: str  # the name the user gave it (messages never show server paths)
    original_size: tuple[int, int]  # (width, height) as uploaded


def read_upload(path: str | Path, model: Model, *, name: str | None = None, resize: str = "crop",
                max_pixels: int = Limits.max_pixels) -> Upload:
    """Check and prepare an upload; every bad file is one readable :class:`NpinvError` naming it."""
    path = Path(path)
    name = name or path.name
    if resize not in RESIZE_MODES:
        raise NpinvError(f"unknown resize mode {short_repr(resize)} (crop or fit)")
    if not path.is_file():
        raise NpinvError(f"the upload {name} is gone from the server; upload it again")
    if path.stat().st_size == 0:
        raise NpinvError(f"{name} is empty")
    digest = hashlib.sha256()
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
    prepared = prepare_image(img, model.resolution, mode=resize, multiple=max(8, model.vae_scale_factor))
    return Upload(image_to_tensor(prepared), digest.hexdigest(), name, (width, height))


def cache_key(model_fingerprint: str, upload: Upload, prompt: str, steps: int, offset: int | None,
              resize: str) -> CacheKey:
    return CacheKey(model_fingerprint, upload.digest, prompt, int(steps), offset, resize)


@dataclasses.dataclass
class CachedInversion:
    """What a session's cache holds: the inversion and the prepared image it was made from."""

    inversion: Inversion
    image: torch.Tensor

    @property
    def nbytes(self) -> int:
        return tensor_bytes(self)


@dataclasses.dataclass
class Lookup:
    """An inversion from the cache, or made now (``seconds`` and ``unet_calls`` are then its cost)."""

    entry: CachedInversion
    cached: bool
    seconds: float
    unet_calls: int


def invert_cached(model: Model, cache: InversionCache, key: CacheKey, upload: Upload, prompt: str, *,
                  steps: int, offset: int | None, progress: bool = False) -> Lookup:
    """The session's inversion for ``key``, inverting (and caching) only on a miss."""
    entry = cache.get(key)
    if entry is not None:
        return Lookup(entry, True, 0.0, 0)
    calls, start = model.counter.calls, time.perf_counter()
    inv = ddim_inversion(model, upload.image, prompt, steps=steps, offset=offset, progress=progress)
    entry = CachedInversion(inv, upload.image)
    cache.put(key, entry, entry.nbytes)
    return Lookup(entry, False, time.perf_counter() - start, model.counter.calls - calls)


def reconstruct_npi(model: Model, entry: CachedInversion, *, progress: bool = False) -> ReconstructReport:
    """NPI reconstruction of a cached inversion (the guidance-1 round trip, at any guidance)."""
    inv = entry.inversion
    return run_reconstruction(model, entry.image, inv.source_prompt, "npi", steps=inv.steps, inversion=inv,
                              progress=progress)


@dataclasses.dataclass(frozen=True)
class EditRequest:
    """One edit asked for in the form: a target prompt and the settings that shape it."""

    target: str
    settings: EditSettings


def parse_edit_request(target: str, *, method: str = "npi", controller: str = "refine", guidance: float | None = None,
                       cross_replace: float = 0.8, self_replace: float = 0.6, blend_source: str = "",
                       blend_target: str = "", reweight: str = "", direct: bool = False,
                       attention_maps: bool = False, default_guidance: float = DEFAULT_EDIT_GUIDANCE,
                       max_chars: int = Limits.max_prompt_chars) -> EditRequest:
    """Validate the form's values into :class:`EditSettings`; readable errors for each mistake.
    ``guidance`` None (or empty) is ``default_guidance``: :meth:`Engine.edit_request` passes the model's.

    The values may come from any client as raw JSON, not only from the page's widgets: every one is
    checked for its type, finiteness and range, and messages show at most a short piece of it."""
    target = text_field(target, "target prompt", max_chars)
    if not target:
        raise NpinvError("give a target prompt: the source prompt with the words you want changed")
    if method not in EDIT_METHODS:
        raise NpinvError(f"unknown method {short_repr(method)}; choose one of {', '.join(EDIT_METHODS)}")
    if controller not in CONTROLLERS:
        raise NpinvError(f"unknown controller {short_repr(controller)}; choose one of {', '.join(CONTROLLERS)}")
    guidance = default_guidance if guidance is None or guidance == "" else guidance
    guidance, cross_replace, self_replace = number(guidance, "guidance"), number(cross_replace, "cross-replace"), \
        number(self_replace, "self-replace")
    if not 0 <= guidance <= 30:
        raise NpinvError(f"guidance must lie in 0..30, got {guidance:g}")
    for label, value in (("cross-replace", cross_replace), ("self-replace", self_replace)):
        if not 0 <= value <= 1:
            raise NpinvError(f"{label} must be a fraction of the steps in 0..1, got {value:g}")
    blend_source = text_field(blend_source, "blend source word", max_chars)
    blend_target = text_field(blend_target, "blend target word", max_chars)
    if bool(blend_source) != bool(blend_target):
        raise NpinvError("local blend needs both words: one of the source prompt and one of the target prompt")
    weights = parse_reweight(text_field(reweight, "reweight", max_chars))
    if controller == "reweight" and not weights:  # EditSettings' own message names the command line's flag
        raise NpinvError("the reweight controller needs at least one WORD=SCALE in Reweight (Controller settings)")
    settings = EditSettings(
        method=method, controller=controller, guidance=guidance, cross_replace=cross_replace,
        self_replace=self_replace, blend=(blend_source, blend_target) if blend_source else None,
        reweight=weights, direct=flag(direct, "direct inversion"),
        keep_attention_maps=flag(attention_maps, "attention maps"))
    settings.validate()
    return EditRequest(target, settings)


REWEIGHT_LIMIT = 20.0  # |scale| of a reweighted word: generous for edits, far from a float overflow


def parse_reweight(text: str) -> dict[str, float]:
    """``"red=2, blue=0.5"`` -> ``{"red": 2.0, "blue": 0.5}``; each scale finite, within +-20."""
    out: dict[str, float] = {}
    for item in text.replace(",", " ").split():
        word, sep, value = item.partition("=")
        try:
            scale = float(value)
        except (ValueError, OverflowError):
            scale = None
        if not sep or not word or scale is None:
            raise NpinvError(f"reweight expects WORD=NUMBER items, got {short_repr(item)}")
        if not -REWEIGHT_LIMIT <= scale <= REWEIGHT_LIMIT:  # NaN fails too
            raise NpinvError(f"reweight scales must be finite numbers in -{REWEIGHT_LIMIT:g}..{REWEIGHT_LIMIT:g}, "
                             f"got {short_repr(item)}")
        out[word] = scale
    return out


# -- checks of a request's raw values (any client can send any JSON: strings, null, Infinity, NaN) --
def number(value, label: str) -> float:
    """A finite float from a number or a numeric string; booleans, lists, NaN and infinities are refused."""
    out = None
    if isinstance(value, (int, float, str)) and not isinstance(value, bool):
        try:
            out = float(value)
        except ValueError:  # "ten"
            out = None
        except OverflowError:  # an int too large for a float
            raise NpinvError(f"{label} is far out of range, got {short_repr(value)}") from None
    if out is None:
        raise NpinvError(f"{label} must be a number, got {short_repr(value)}")
    if not math.isfinite(out):
        raise NpinvError(f"{label} must be a finite number, got {short_repr(value)}")
    return out


def whole_number(value, label: str, low: int, high: int) -> int:
    """An integer in ``low..high`` (a float or numeric string with an integer value counts)."""
    try:
        out = number(value, label)
    except NpinvError:
        out = None
    if out is None or not out.is_integer() or not low <= out <= high:
        raise NpinvError(f"{label} must be a whole number in {low}..{high}, got {short_repr(value)}")
    return int(out)


def text_field(value, label: str, max_chars: int) -> str:
    """A form's text, stripped: None is empty; anything but a string, or a string over ``max_chars``,
    is refused with a message that gives its length, never its text."""
    if value is None:
        return ""
    if not isinstance(value, str):
        raise NpinvError(f"the {label} must be text, got {short_repr(value)}")
    value = value.strip()
    if len(value) > max_chars:
        raise NpinvError(f"the {label} is {len(value):,} characters long; this server accepts at most {max_chars:,}")
    return value


def flag(value, label: str) -> bool:
    if value is None:
        return False
    if not isinstance(value, bool):
        raise NpinvError(f"{label} must be true or false, got {short_repr(value)}")
    return value


def parse_offset(value) -> int | None:
    """The timestep offset as the page sends it ("default", "0" or "1") or as a number: None, 0 or 1."""
    if value is None or value in ("", "default"):
        return None
    try:
        return whole_number(value, "offset", 0, 1)
    except NpinvError:
        raise NpinvError(f"offset must be 0, 1 or default, got {short_repr(value)}") from None


@dataclasses.dataclass
class EditOutcome:
    """An edit of a cached inversion: the edited image, the source branch (the method's
    reconstruction) with its distance to the input, and the optional attention maps."""

    edited: Image.Image
    reconstruction: Image.Image
    psnr: float
    ssim: float
    maps: list[tuple[Image.Image, str]]
    seconds: float
    unet_calls: int
    unet_rows: int
    inversion: Inversion  # with NTI's optimised negatives when the method made them


def run_edit(model: Model, entry: CachedInversion, request: EditRequest, *, progress: bool = False) -> EditOutcome:
    inv = entry.inversion
    result = edit(model, inv, [request.target], request.settings, progress=progress)
    m = image_metrics(tensor_to_unit(entry.image), tensor_to_unit(result.source_image))
    maps = []
    if request.settings.keep_attention_maps:
        names = {0: "source"} | {k + 1: "target" for k in range(len(result.targets))}
        maps = [(heat_image(w.heat, scale=max(1, 128 // w.heat.shape[-1])), f"{names[w.branch]}: {w.word}")
                for w in word_maps(model, result, inv.source_prompt)]
    return EditOutcome(
        edited=tensor_to_image(result.images[:1]), reconstruction=tensor_to_image(result.source_image),
        psnr=m["psnr"], ssim=m["ssim"], maps=maps, seconds=result.seconds, unet_calls=result.unet_calls,
        unet_rows=result.unet_rows, inversion=result.inversion)


# -- the server's engine: one model, one lock, the output files ------------------------------------
@dataclasses.dataclass
class Timings:
    """What a request did and how long each part took (the app shows it as JSON)."""

    inversion_cached: bool
    read_seconds: float = 0.0
    invert_seconds: float = 0.0  # 0 when the inversion came from the cache
    reconstruct_seconds: float = 0.0
    edit_seconds: float = 0.0
    total_seconds: float = 0.0
    steps: int = 0
    unet_calls: int = 0
    cache_entries: int = 0
    cache_bytes: int = 0
    cache_hits: int = 0
    cache_misses: int = 0

    def as_dict(self) -> dict:
        return {k: round(v, 4) if isinstance(v, float) else v for k, v in dataclasses.asdict(self).items()}

    def line(self) -> str:
        inverted = "inversion cached" if self.inversion_cached else f"inversion {self.invert_seconds:.2f} s"
        parts = [inverted]
        if self.reconstruct_seconds:
            parts.append(f"reconstruction {self.reconstruct_seconds:.2f} s")
        if self.edit_seconds:
            parts.append(f"edit {self.edit_seconds:.2f} s")
        return f"{' · '.join(parts)} · total {self.total_seconds:.2f} s ({self.steps} steps, {self.unet_calls} UNet calls)"


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
    input_image: Image.Image
    outcome: EditOutcome
    edit_file: Path
    inversion_file: Path
    timings: Timings
    warnings: list[str]


class Engine:
    """One server's model and what guards it: a lock (the model and its attention processors are
    not thread safe), the limits, and a folder for the files the page offers for download."""

    def __init__(self, model: Model, limits: Limits | None = None, files_dir: str | Path | None = None) -> None:
        self.model = model
        self.limits = limits or Limits()
        self.fingerprint = model.fingerprint  # hashes weights: compute once, not per request
        self.lock = threading.Lock()
        self._own_dir = files_dir is None
        self.files_dir = Path(tempfile.mkdtemp(prefix="npinv-serve-")) if files_dir is None else Path(files_dir)
        self.files_dir.mkdir(parents=True, exist_ok=True)

    @property
    def edit_guidance(self) -> float:
        """The guidance edits default to: the model's declared one (its folder's npinv.json), else 7.5."""
        return self.model.edit_guidance

    def edit_request(self, target: str, **form) -> EditRequest:
        """:func:`parse_edit_request` with this model's editing guidance and this server's prompt limit."""
        return parse_edit_request(target, default_guidance=self.edit_guidance, max_chars=self.limits.max_prompt_chars,
                                  **form)

    def new_cache(self) -> InversionCache:
        return InversionCache(self.limits.cache_entries, int(self.limits.cache_mb * 2**20))

    def close(self) -> None:
        if self._own_dir:
            shutil.rmtree(self.files_dir, ignore_errors=True)

    # -- requests ---------------------------------------------------------------------------------
    def invert(self, cache: InversionCache, path: str | Path, prompt: str, *, name: str | None = None,
               steps: int = 50, offset: int | None = None, resize: str = "crop", stage: Stage | None = None,
               progress: bool = False) -> InvertReport:
        """Invert an upload (or take it from the session's cache) and reconstruct it with NPI."""
        start = time.perf_counter()
        prompt, steps, offset = self._check(prompt, steps, offset)
        with self._model_call() as caught:
            upload = read_upload(path, self.model, name=name, resize=resize, max_pixels=self.limits.max_pixels)
            read_s = time.perf_counter() - start
            _stage(stage, "inverting")
            calls0 = self.model.counter.calls
            lookup = invert_cached(self.model, cache, cache_key(self.fingerprint, upload, prompt, steps, offset, resize),
                                   upload, prompt, steps=steps, offset=offset, progress=progress)
            _stage(stage, "reconstructing")
            rec = reconstruct_npi(self.model, lookup.entry, progress=progress)
            calls = self.model.counter.calls - calls0
            inv_file = self._save_inversion(lookup.entry.inversion)
        timings = self._timings(cache, lookup, start, read_s, steps, calls, reconstruct_seconds=rec.seconds)
        return InvertReport(tensor_to_image(upload.image), tensor_to_image(rec.reconstruction.image), rec.psnr,
                            rec.ssim, inv_file, timings, caught)

    def edit(self, cache: InversionCache, path: str | Path, prompt: str, request: EditRequest, *,
             name: str | None = None, steps: int = 50, offset: int | None = None, resize: str = "crop",
             stage: Stage | None = None, progress: bool = False) -> EditReport:
        """Edit an upload toward ``request``, inverting it first only if this session has not yet."""
        start = time.perf_counter()
        prompt, steps, offset = self._check(prompt, steps, offset)
        with self._model_call() as caught:
            upload = read_upload(path, self.model, name=name, resize=resize, max_pixels=self.limits.max_pixels)
            read_s = time.perf_counter() - start
            key = cache_key(self.fingerprint, upload, prompt, steps, offset, resize)
            calls0 = self.model.counter.calls
            if key not in cache:
                _stage(stage, "inverting")
            lookup = invert_cached(self.model, cache, key, upload, prompt, steps=steps, offset=offset,
                                   progress=progress)
            _stage(stage, "editing")
            outcome = run_edit(self.model, lookup.entry, request, progress=progress)
            if outcome.inversion is not lookup.entry.inversion:
                # NTI optimised negatives for this guidance: keep them, the next NTI edit is fast.
                updated = CachedInversion(outcome.inversion, lookup.entry.image)
                cache.put(key, updated, updated.nbytes)
            calls = self.model.counter.calls - calls0
            folder = self._request_folder()
            edit_file = save_image(outcome.edited, folder / "edit.png")
            inv_file = self._save_inversion(outcome.inversion, folder)
        timings = self._timings(cache, lookup, start, read_s, steps, calls, edit_seconds=outcome.seconds)
        return EditReport(tensor_to_image(upload.image), outcome, edit_file, inv_file, timings, caught)

    # -- helpers ----------------------------------------------------------------------------------
    def _check(self, prompt: str, steps, offset) -> tuple[str, int, int | None]:
        """The request's source prompt, steps and offset, checked whatever JSON a client sent."""
        prompt = text_field(prompt, "source prompt", self.limits.max_prompt_chars)
        if not prompt:
            raise NpinvError("give a source prompt that describes the image")
        return prompt, whole_number(steps, "steps", 1, self.limits.max_steps), parse_offset(offset)

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

    def _timings(self, cache: InversionCache, lookup: Lookup, start: float, read_s: float, steps: int, calls: int,
                 **parts: float) -> Timings:
        stats = cache.stats()
        return Timings(inversion_cached=lookup.cached, read_seconds=read_s, invert_seconds=lookup.seconds,
                       total_seconds=time.perf_counter() - start, steps=steps, unet_calls=calls,
                       cache_entries=stats.entries, cache_bytes=stats.bytes, cache_hits=stats.hits,
                       cache_misses=stats.misses, **parts)

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


class QuietTruncation(logging.Filter):
    """Drops diffusers' "The following part of your input was truncated ...: [<the cut-off text>]",
    logged at every encoding of a prompt over the text encoder's limit: on a server that is a user's
    text, up to the whole prompt, in the log on every request. The page already warns about the
    truncation in one line (an :class:`~npinv.model.NpinvWarning`), and transformers' own tokenizer
    notice ("Token indices sequence length is longer ...") is one short line, once per tokenizer."""

    PREFIX = "The following part of your input was truncated"

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.PREFIX)

    @staticmethod
    @contextlib.contextmanager
    def on(model: Model) -> Iterator[None]:
        """Filter the loggers of the modules of the model's pipeline class (and its bases) meanwhile."""
        loggers = [logging.getLogger(c.__module__) for c in type(model.pipe).__mro__
                   if c.__module__.startswith("diffusers.")]
        quiet = QuietTruncation()
        for logger in loggers:
            logger.addFilter(quiet)
        try:
            yield
        finally:
            for logger in loggers:
                logger.removeFilter(quiet)


def _stage(stage: Stage | None, text: str) -> None:
    if stage is not None:
        stage(text)
