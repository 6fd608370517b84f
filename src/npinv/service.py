"""The one service every front end calls: prepare an image, invert it (or load an inversion, or take
it from a cache under the one key rule), reconstruct, edit one or many images, generate.

Every result carries its own :class:`~npinv.cost.Cost` (seconds, UNet calls and rows), so the CLI,
edit-batch, edit-video, the web app, the demo and the benchmarks only choose inputs and write or
show outputs. Settings come typed and checked from :mod:`npinv.settings`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import torch
from PIL import Image

from npinv.cache import InversionCache
from npinv.checks import check_prompt, check_seed, check_size
from npinv.cost import Cost, Meter
from npinv.editing import EditJob, EditResult, edit_batch
from npinv.errors import NpinvError
from npinv.guidance import CFG
from npinv.inversion import Inversion, ddim_inversion_batch
from npinv.io import image_to_tensor, load_image, prepare_image
from npinv.methods import Reconstruction, get_method, reconstruct
from npinv.metrics import image_metrics, tensor_to_unit
from npinv.model import Model
from npinv.sampling import Branch, StepHook, sample
from npinv.settings import EditSettings, InvertSettings, ReconstructSettings


# -- inputs ----------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Source:
    """An input image prepared for the model, and what identifies it for caches and resume keys."""

    image: torch.Tensor  # (1, 3, H, W) in [-1, 1]
    digest: str  # sha256 of the file's bytes, or of the picture's pixels
    name: str


def prepare_picture(img: Image.Image, model: Model, settings: InvertSettings, *, name: str = "image",
                    digest: str | None = None) -> Source:
    """A picture (an upload, a video frame, a rendered scene) cropped or fitted to the model's size."""
    check_size(settings.size, model.size_multiple)
    prepared = prepare_image(img, settings.size or model.resolution, mode=settings.resize,
                             multiple=model.size_multiple)
    if digest is None:
        digest = hashlib.sha256(img.convert("RGB").tobytes() + repr(img.size).encode()).hexdigest()
    return Source(image_to_tensor(prepared), digest, name)


def prepare_file(path: str | Path, model: Model, settings: InvertSettings, *, name: str | None = None) -> Source:
    path = Path(path)
    check_size(settings.size, model.size_multiple)  # before the image is decoded
    img = load_image(path)
    return prepare_picture(img, model, settings, name=name or path.name,
                           digest=hashlib.sha256(path.read_bytes()).hexdigest())


# -- inversion -------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class InversionKey:
    """The one cache-key rule: everything that changes an inversion. ``prepared`` names a method's
    variant of it (NTI's negatives optimised at one guidance): ``""`` is the plain inversion."""

    model: str  # the model's fingerprint
    image: str  # the source's digest
    prompt: str
    steps: int
    offset: int | None  # None: the model's configured offset
    resize: str = "crop"
    size: int | None = None
    exact: tuple = ()  # the inversion scheme and decoder inversion (InvertSettings.scheme_key())
    prepared: str = ""

    @classmethod
    def of(cls, model: Model, source: Source, prompt: str, settings: InvertSettings) -> InversionKey:
        return cls.of_file(model.fingerprint, source.digest, prompt, settings)

    @classmethod
    def of_file(cls, fingerprint: str, digest: str, prompt: str, settings: InvertSettings) -> InversionKey:
        return cls(fingerprint, digest, prompt, settings.steps, settings.offset, settings.resize, settings.size,
                   settings.scheme_key())

    def variant(self, method: str, guidance: float) -> InversionKey:
        return dataclasses.replace(self, prepared=f"{method}@{float(guidance)!r}")


@dataclasses.dataclass
class Inverted:
    """An inversion and the prepared image it is of. ``cost``: what inverting cost (the whole
    batched call's when several images were inverted together: ``batch`` of them); zero when it
    came from the cache or a file."""

    inversion: Inversion
    image: torch.Tensor
    cost: Cost = Cost()
    cached: bool = False
    key: InversionKey | None = None
    batch: int = 1


def invert(model: Model, sources: Sequence[Source], prompts: Sequence[str], settings: InvertSettings, *,
           cache: InversionCache | None = None, progress: bool = False, encode_only: bool = False) -> list[Inverted]:
    """DDIM inversions of ``sources`` (one prompt each); cache hits are reused, misses of one size
    are inverted together, one UNet batch per step. ``encode_only``: the clean latents alone, for an
    inversion-free method (FlowEdit), at no UNet call (cached apart from full inversions)."""
    settings.validate()
    if len(sources) != len(prompts):
        raise ValueError(f"{len(sources)} images for {len(prompts)} prompts")
    for p in prompts:
        check_prompt(p, "the source prompt")
    out: list[Inverted | None] = [None] * len(sources)
    misses: dict[tuple, list[int]] = {}
    fingerprint = model.fingerprint if cache is not None else ""  # hashes weights: once per call
    keys = [InversionKey.of_file(fingerprint, src.digest, prompt, settings) if cache is not None else None
            for src, prompt in zip(sources, prompts, strict=True)]
    if encode_only:
        keys = [None if k is None else dataclasses.replace(k, prepared="encoded") for k in keys]
    for n, (src, key) in enumerate(zip(sources, keys, strict=True)):
        hit = cache.get(key) if cache is not None else None
        if hit is not None:
            out[n] = Inverted(hit, src.image, Cost(), True, key)
        else:
            misses.setdefault(tuple(src.image.shape), []).append(n)
    for group in misses.values():
        meter = Meter(model)
        inversions = ddim_inversion_batch(model, torch.cat([sources[n].image for n in group]),
                                          [prompts[n] for n in group], steps=settings.steps, offset=settings.offset,
                                          progress=progress, encode_only=encode_only, **settings.scheme_kwargs())
        cost = meter.cost
        for n, inv in zip(group, inversions, strict=True):
            out[n] = Inverted(inv, sources[n].image, cost, False, keys[n], len(group))
            if cache is not None:
                cache.put(keys[n], inv)
    return [o for o in out if o is not None]


def invert_one(model: Model, source: Source, prompt: str, settings: InvertSettings, *,
               cache: InversionCache | None = None, progress: bool = False, encode_only: bool = False) -> Inverted:
    return invert(model, [source], [prompt], settings, cache=cache, progress=progress, encode_only=encode_only)[0]


def load_inversion(path: str | Path, model: Model, source: Source, *, steps: int | None = None,
                   source_prompt: str | None = None) -> Inverted:
    """A saved inversion, checked against the model, the prepared image (its size, then its pixels: an
    inversion of another picture would edit that picture), the step count and the source prompt when
    they are given."""
    inv = Inversion.load(path)
    if source_prompt and source_prompt != inv.source_prompt:
        raise NpinvError(f"the inversion was made with source prompt {inv.source_prompt!r}, not {source_prompt!r}")
    # Same model and image size imply the same latent size: one check covers both.
    inv.check_compatible(model, steps=steps, size=tuple(source.image.shape[-2:]))
    inv.check_image(source.image, source.name)
    return Inverted(inv, source.image)


# -- reconstruction --------------------------------------------------------------------------------
@dataclasses.dataclass
class Reconstructed:
    """A reconstruction with its distance to the prepared input. ``cost`` includes the inversion's
    (as if the method had run alone), ``invert_cost`` is that part."""

    method: str
    steps: int
    guidance: float
    offset: int
    psnr: float
    ssim: float
    mse: float
    cost: Cost
    invert_cost: Cost
    reconstruction: Reconstruction
    inverted: Inverted  # what was reconstructed (NTI's negatives are on ``reconstruction.inversion``)

    @property
    def input_image(self) -> torch.Tensor:
        return self.inverted.image

    def summary(self) -> dict:
        return {"method": self.method, "steps": self.steps, "guidance": self.guidance, "offset": self.offset,
                "psnr": self.psnr, "ssim": self.ssim, "mse": self.mse, "seconds": self.cost.seconds,
                "invert_seconds": self.invert_cost.seconds, "unet_calls": self.cost.unet_calls,
                "unet_rows": self.cost.unet_rows, **self.inverted.inversion.scheme_report()}


def reconstruct_inverted(model: Model, inverted: Inverted, settings: ReconstructSettings, *,
                         progress: bool = False) -> Reconstructed:
    settings.validate()
    rec = reconstruct(model, inverted.inversion, settings.method, settings.guidance, progress=progress)
    m = image_metrics(tensor_to_unit(inverted.image), tensor_to_unit(rec.image))
    inv = inverted.inversion
    return Reconstructed(method=rec.method, steps=inv.steps, guidance=settings.guidance,
                         offset=int(inv.schedule["offset"]), psnr=m["psnr"], ssim=m["ssim"], mse=m["mse"],
                         cost=inverted.cost + rec.cost, invert_cost=inverted.cost, reconstruction=rec,
                         inverted=inverted)


def reconstruct_each(model: Model, source: Source, prompt: str, settings: Sequence[ReconstructSettings],
                     invert_settings: InvertSettings, *, progress: bool = False) -> Iterator[Reconstructed]:
    """Invert once, then reconstruct with each setting, side by side. A generator, so that a caller
    can keep each result before the next method runs."""
    for s in settings:
        s.validate()
    inverted = invert_one(model, source, prompt, invert_settings, progress=progress)
    for s in settings:
        yield reconstruct_inverted(model, inverted, s, progress=progress)


# -- editing ---------------------------------------------------------------------------------------
@dataclasses.dataclass
class Edited:
    """One image's edit. ``cost``: its inversion's plus the edit call's (the whole batch's when several
    images edited together); ``edit_cost`` the edit call's alone, ``prepare_cost`` the part of it a
    method spent preparing (NTI's optimisation)."""

    result: EditResult
    inverted: Inverted
    cost: Cost
    edit_cost: Cost
    prepare_cost: Cost
    batch: int  # images in the edit call

    @property
    def images(self) -> torch.Tensor:
        return self.result.images

    @property
    def inversion(self) -> Inversion:
        return self.result.inversion

    @property
    def settings(self) -> EditSettings:
        return self.result.settings

    def source_metrics(self) -> dict[str, float]:
        """The source branch (the method's reconstruction) against the input."""
        return image_metrics(tensor_to_unit(self.inverted.image), tensor_to_unit(self.result.source_image))


def edit(model: Model, items: Sequence[tuple[Inverted, Sequence[str]]], settings: EditSettings, *,
         cache: InversionCache | None = None, progress: bool = False) -> list[Edited]:
    """Edit inverted images (same steps and size) toward their targets, every image in one UNet batch
    per step. A method's prepared variant of an inversion (NTI's negatives at this guidance) is taken
    from ``cache`` when it holds one, and kept there when the edit made one."""
    settings = settings.resolved(model)
    settings.validate()
    method = get_method(settings.method)
    jobs = []
    for inverted, targets in items:
        inv = inverted.inversion
        if method.negatives(inv, settings.guidance) is None and cache is not None and inverted.key is not None:
            inv = cache.get(inverted.key.variant(method.name, settings.guidance)) or inv
        jobs.append(EditJob(inv, list(targets)))
    results = edit_batch(model, jobs, settings, progress=progress)
    out = []
    for (inverted, _), job, result in zip(items, jobs, results, strict=True):
        if result.inversion is not job.inversion and cache is not None and inverted.key is not None:
            cache.put(inverted.key.variant(method.name, settings.guidance), result.inversion)
        out.append(Edited(result, inverted, inverted.cost + result.cost, result.cost, result.prepare_cost,
                          len(items)))
    return out


def edit_image(model: Model, source: Source, prompt: str, targets: Sequence[str], settings: EditSettings,
               invert_settings: InvertSettings, *, inversion: Inverted | None = None,
               cache: InversionCache | None = None, progress: bool = False,
               encode_only: bool | None = None) -> Edited:
    """Invert one image (unless ``inversion`` is given or cached) and edit it toward ``targets``.
    ``encode_only`` (default: when the method needs no inversion, FlowEdit): encode the image only."""
    settings = settings.resolved(model)
    settings.validate()  # before the inversion's cost
    if encode_only is None:
        encode_only = not get_method(settings.method).needs_inversion
    inverted = inversion or invert_one(model, source, prompt, invert_settings, cache=cache, progress=progress,
                                       encode_only=encode_only)
    return edit(model, [(inverted, targets)], settings, cache=cache, progress=progress)[0]


# -- generation ------------------------------------------------------------------------------------
@dataclasses.dataclass
class Generated:
    image: torch.Tensor  # (1, 3, H, W) in [-1, 1]
    cost: Cost


def generate(model: Model, prompt: str, *, seed: int = 0, guidance: float = 7.5, steps: int = 50,
             size: int | None = None, offset: int | None = None, progress: bool = False,
             estimate: Callable[[float, float], None] | None = None) -> Generated:
    """Text-to-image sampling with classifier-free guidance against the null prompt.

    ``estimate(first_step_seconds, estimated_total_seconds)`` is called once the first step is
    done (the sampling loop's total: the first step's time times the steps). ``size`` must be a
    multiple of ``model.size_multiple`` (refused, not rounded)."""
    check_prompt(prompt)
    check_seed(seed)
    ReconstructSettings(guidance=guidance).validate()
    check_size(size, model.size_multiple)
    meter = Meter(model)
    side = (size or model.resolution) // model.vae_scale_factor
    noise = torch.randn((1, model.latent_channels, side, side), generator=torch.Generator().manual_seed(seed))
    schedule = model.schedule(steps, offset, latent_size=(side, side))
    branch = Branch.constant(model.encode_prompt(prompt), model.null_embedding(), steps)
    hooks = [FirstStepTimer(steps, estimate)] if estimate is not None else []
    result = sample(model, noise, schedule, [branch], CFG(guidance), hooks=hooks,
                    progress="generate" if progress else None)
    image = model.decode(result.latents)
    return Generated(image, meter.cost)


class FirstStepTimer(StepHook):
    """Times the first step of a sampling loop and reports the whole loop's estimated time."""

    def __init__(self, steps: int, report: Callable[[float, float], None]) -> None:
        self.steps, self.report, self._t0 = steps, report, None

    def before_step(self, state) -> None:
        if state.i == 0:
            self._t0 = time.perf_counter()

    def after_step(self, state) -> None:
        if state.i == 0 and self._t0 is not None:
            first = time.perf_counter() - self._t0
            self.report(first, first * self.steps)
