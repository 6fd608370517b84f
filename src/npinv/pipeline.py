"""End-to-end operations on files that the CLI, the app and the benchmarks share."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from npinv.checks import check_guidance, check_prompt, check_seed, check_size
from npinv.guidance import CFG
from npinv.inversion import Inversion, Reconstruction, ddim_inversion, reconstruct
from npinv.io import image_to_tensor, load_image, prepare_image
from npinv.metrics import image_metrics, tensor_to_unit
from npinv.model import Model
from npinv.sampling import Branch, StepHook, sample


@dataclasses.dataclass
class ReconstructReport:
    """A reconstruction with its cost and its distance to the prepared input."""

    method: str
    steps: int
    guidance: float
    offset: int
    psnr: float
    ssim: float
    mse: float
    seconds: float
    invert_seconds: float
    unet_calls: int
    unet_rows: int
    reconstruction: Reconstruction
    input_image: torch.Tensor

    def summary(self) -> dict:
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in ("reconstruction", "input_image")}


def load_input(path: str | Path, model: Model, size: int | None = None, resize: str = "crop") -> torch.Tensor:
    check_size(size, model.size_multiple)  # before the image is decoded
    img = prepare_image(load_image(path), size or model.resolution, mode=resize, multiple=model.size_multiple)
    return image_to_tensor(img)


def run_reconstruction(
    model: Model, image: torch.Tensor, prompt: str, method: str, *, steps: int = 50, guidance: float = 7.5,
    offset: int | None = None, progress: bool = False, inversion: Inversion | None = None,
) -> ReconstructReport:
    """Invert (unless ``inversion`` is given) and reconstruct one image; time and count both parts."""
    return next(invert_and_reconstruct_each(model, image, prompt, [(method, guidance)], steps=steps, offset=offset,
                                            progress=progress, inversion=inversion))


def invert_and_reconstruct_each(
    model: Model, image: torch.Tensor, prompt: str, settings: list[tuple[str, float]], *, steps: int = 50,
    offset: int | None = None, progress: bool = False, inversion: Inversion | None = None,
) -> Iterator[ReconstructReport]:
    """Invert ``image`` once (unless ``inversion`` is given), then reconstruct it with each
    ``(method, guidance)``, timed side by side. Each report's ``seconds``, ``unet_calls`` and
    ``unet_rows`` include the shared inversion, as if the method had run alone. A generator, so
    that a caller can keep each result before the next method runs."""
    for _, w in settings:
        check_guidance(w)
    if inversion is None:
        check_prompt(prompt, "the source prompt")
    calls0, rows0 = model.counter.calls, model.counter.rows
    start = time.perf_counter()
    inv = inversion or ddim_inversion(model, image, prompt, steps=steps, offset=offset, progress=progress)
    invert_s = time.perf_counter() - start
    invert_calls, invert_rows = model.counter.calls - calls0, model.counter.rows - rows0
    for method, w in settings:
        start, calls, rows = time.perf_counter(), model.counter.calls, model.counter.rows
        rec = reconstruct(model, inv, method, w, progress=progress)
        seconds = time.perf_counter() - start
        m = image_metrics(tensor_to_unit(image), tensor_to_unit(rec.image))
        yield ReconstructReport(
            method=method, steps=inv.steps, guidance=w, offset=int(inv.schedule["offset"]), psnr=m["psnr"],
            ssim=m["ssim"], mse=m["mse"], seconds=invert_s + seconds, invert_seconds=invert_s,
            unet_calls=invert_calls + model.counter.calls - calls, unet_rows=invert_rows + model.counter.rows - rows,
            reconstruction=rec, input_image=image,
        )


def generate(model: Model, prompt: str, *, seed: int = 0, guidance: float = 7.5, steps: int = 50,
             size: int | None = None, offset: int | None = None, progress: bool = False,
             estimate: Callable[[float, float], None] | None = None) -> torch.Tensor:
    """Text-to-image sampling with classifier-free guidance against the null prompt; (1, 3, H, W).

    ``estimate(first_step_seconds, estimated_total_seconds)`` is called once the first step is
    done (the sampling loop's total: the first step's time times the steps). ``size`` must be a
    multiple of ``model.size_multiple`` (refused, not rounded)."""
    check_prompt(prompt)
    check_seed(seed)
    check_guidance(guidance)
    check_size(size, model.size_multiple)
    side = (size or model.resolution) // model.vae_scale_factor
    channels = model.unet.config.in_channels
    noise = torch.randn((1, channels, side, side), generator=torch.Generator().manual_seed(seed))
    schedule = model.schedule(steps, offset)
    branch = Branch.constant(model.encode_prompt(prompt), model.null_embedding(), steps)
    hooks = [FirstStepTimer(steps, estimate)] if estimate is not None else []
    result = sample(model, noise, schedule, [branch], CFG(guidance), hooks=hooks,
                    progress="generate" if progress else None)
    return model.decode(result.latents)


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
