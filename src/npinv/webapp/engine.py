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

    def __post_init__(self) -> None:
        for name in ("max_pixels", "max_upload_mb", "max_steps", "cache_entries", "cache_mb", "file_ttl_s"):
            if not getattr(self, name) > 0:
                flag = "--max-megapixels" if name == "max_pixels" else f"--{name.replace('_', '-')}"
                raise NpinvError(f"{flag} must be positive, got {getattr(self, name)}")


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
        raise NpinvError(f"unknown resize mode {resize!r} (crop or fit)")
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
                       attention_maps: bool = False, default_guidance: float = DEFAULT_EDIT_GUIDANCE) -> EditRequest:
    """Validate the form's values into :class:`EditSettings`; readable errors for each mistake.
    ``guidance`` None (or empty) is ``default_guidance``: :meth:`Engine.edit_request` passes the model's."""
    target = (target or "").strip()
    if not target:
        raise NpinvError("give a target prompt: the source prompt with the words you want changed")
    if method not in EDIT_METHODS:
        raise NpinvError(f"unknown method {method!r}; choose one of {', '.join(EDIT_METHODS)}")
    if controller not in CONTROLLERS:
        raise NpinvError(f"unknown controller {controller!r}; choose one of {', '.join(CONTROLLERS)}")
    guidance = default_guidance if guidance in (None, "") else guidance
    guidance, cross_replace, self_replace = _number(guidance, "guidance"), _number(cross_replace, "cross-replace"), \
        _number(self_replace, "self-replace")
    if not 0 <= guidance <= 30:
        raise NpinvError(f"guidance must lie in 0..30, got {guidance:g}")
    for label, value in (("cross-replace", cross_replace), ("self-replace", self_replace)):
        if not 0 <= value <= 1:
            raise NpinvError(f"{label} must be a fraction of the steps in 0..1, got {value:g}")
    blend_source, blend_target = (blend_source or "").strip(), (blend_target or "").strip()
    if bool(blend_source) != bool(blend_target):
        raise NpinvError("local blend needs both words: one of the source prompt and one of the target prompt")
    settings = EditSettings(
        method=method, controller=controller, guidance=guidance, cross_replace=cross_replace,
        self_replace=self_replace, blend=(blend_source, blend_target) if blend_source else None,
        reweight=parse_reweight(reweight or ""), direct=bool(direct), keep_attention_maps=bool(attention_maps))
    settings.validate()
    return EditRequest(target, settings)


def parse_reweight(text: str) -> dict[str, float]:
    """``"red=2, blue=0.5"`` -> ``{"red": 2.0, "blue": 0.5}``."""
    out: dict[str, float] = {}
    for item in text.replace(",", " ").split():
        word, sep, value = item.partition("=")
        try:
            scale = float(value)
        except ValueError:
            scale = None
        if not sep or not word or scale is None:
            raise NpinvError(f"reweight expects WORD=NUMBER items, got {item!r}")
        out[word] = scale
    return out


def _number(value, label: str) -> float:
    try:
        out = float(value)
    except (TypeError, ValueError):
        raise NpinvError(f"{label} must be a number, got {value!r}") from None
    if out != out:  # NaN
        raise NpinvError(f"{label} must be a number, got NaN")
    return out


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
        """:func:`parse_edit_request` with this model's editing guidance as the default."""
        return parse_edit_request(target, default_guidance=self.edit_guidance, **form)

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
        prompt, steps = self._check(prompt, steps, offset)
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
        prompt, steps = self._check(prompt, steps, offset)
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
    def _check(self, prompt: str, steps, offset) -> tuple[str, int]:
        prompt = (prompt or "").strip()
        if not prompt:
            raise NpinvError("give a source prompt that describes the image")
        try:
            steps_i = int(steps)
        except (TypeError, ValueError):
            raise NpinvError(f"steps must be a whole number, got {steps!r}") from None
        if steps_i != steps or not 1 <= steps_i <= self.limits.max_steps:
            raise NpinvError(f"steps must be a whole number in 1..{self.limits.max_steps}, got {steps}")
        if offset not in (None, 0, 1):
            raise NpinvError(f"offset must be 0, 1 or the model's default, got {offset!r}")
        return prompt, steps_i

    @contextlib.contextmanager
    def _model_call(self) -> Iterator[list[str]]:
        """Hold the model; collect its one-line warnings (unknown words, truncated prompts) for the page."""
        with self.lock, warnings.catch_warnings(record=True) as records:
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


def _stage(stage: Stage | None, text: str) -> None:
    if stage is not None:
        stage(text)
