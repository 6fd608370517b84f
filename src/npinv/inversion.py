"""DDIM inversion and its result, :class:`Inversion` (saved and loaded as one safetensors file),
and null-text inversion's per-step optimisation (a step hook). The methods that turn an inversion
into inputs of the sampling loop are in :mod:`npinv.methods`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from npinv.checks import check_prompt
from npinv.errors import NpinvError
from npinv.guidance import CFG
from npinv.io import Stage, atomic_path, writing
from npinv.model import Model, PromptEmbedding
from npinv.sampling import StepHook, StepState
from npinv.schedule import Schedule
from npinv.settings import DEFAULT_INVERT_ITERS, DEFAULT_INVERT_TOL, check_bdia_gamma

FORMAT_VERSION = 1
SUFFIX = ".safetensors"
# Every tensor of an inversion file is float32 (save() writes nothing else); the names it may hold,
# "<embedding>.hidden" and "<embedding>.pooled" for the source, null and negatives embeddings.
FILE_DTYPE = torch.float32
_EMBEDDINGS = ("source", "null", "negatives")
TENSOR_NAMES = frozenset({"trajectory", *(f"{e}.{part}" for e in _EMBEDDINGS for part in ("hidden", "pooled"))})


def image_digest(image: torch.Tensor) -> str:
    """sha256 of a prepared image's 8-bit RGB pixels and their shape: what an inversion records of the
    picture it was made from. ``image``: (3, H, W) or (1, 3, H, W) in [-1, 1]. Pixels, not file bytes,
    so that the same picture in another file (a PNG saved again) is the same image."""
    x = image.detach()
    x = x[0] if x.ndim == 4 else x
    pixels = ((x.float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).contiguous()
    return hashlib.sha256(repr(tuple(pixels.shape)).encode() + pixels.numpy().tobytes()).hexdigest()


def check_inversion_path(path: str | Path, flag: str = "--save-inversion") -> Path:
    """An inversion file is safetensors and must say so: ``inv.png`` would hide it as an image."""
    path = Path(path)
    if path.suffix.lower() != SUFFIX:
        raise NpinvError(f"{flag} {path}: an inversion file must end in {SUFFIX}, not {path.suffix or 'nothing'!r}")
    return path


@dataclasses.dataclass
class Inversion:
    """A DDIM inversion of one image and everything needed to reuse it.

    ``trajectory[k]`` is ``z*[k]``: index 0 the clean latent, index ``steps`` the noise.
    ``negatives`` holds NTI's per-step negatives (denoising order) when they were optimised.
    """

    trajectory: torch.Tensor
    source_prompt: str
    source: PromptEmbedding
    null: PromptEmbedding
    schedule: dict[str, Any]
    model: dict[str, str]
    image_size: tuple[int, int]
    dtype: str
    negatives: list[PromptEmbedding] | None = None
    nti: dict[str, Any] | None = None
    # How it was made: {"name", "iters", "tol", "residuals", "iterations", "decoder_steps", "decoder_losses"},
    # and "gamma" for bdia;
    # None for files written before schemes existed (plain DDIM).
    scheme: dict[str, Any] | None = None
    # image_digest() of the prepared image it was made from; None in files written before it was recorded.
    image_digest: str | None = None

    @property
    def scheme_name(self) -> str:
        return (self.scheme or {}).get("name", "ddim")

    @property
    def exact(self) -> bool:
        """Whether the scheme inverts each step exactly (to its tolerance): sampling with the source's
        own outputs then lands on the trajectory."""
        from npinv.schemes import get_scheme

        return get_scheme(self.scheme_name).exact

    @property
    def encoded_only(self) -> bool:
        """Whether this holds only the clean latent ``z*[0]`` (made for an inversion-free method, FlowEdit,
        which needs nothing else): nothing to sample from, and nothing a file could hold."""
        return bool((self.scheme or {}).get("encoded_only"))

    def check_sampled_by(self, method: str) -> None:
        """Refuse, in one line, to sample an encoded-only inversion (it has no noise end)."""
        if self.encoded_only:
            raise NpinvError(f"method {method} samples from an inversion, but this one holds only the clean latent "
                             "(made for an inversion-free edit); invert the image")

    @property
    def pair_start(self) -> torch.Tensor | None:
        """``z*[n-1]`` when sampling from this inversion starts from a pair of latents (BDIA), else None."""
        from npinv.schemes import get_scheme

        return self.trajectory[-2:-1] if get_scheme(self.scheme_name).pair_start else None

    @property
    def pair_gamma(self) -> float:
        """BDIA's damping factor the inversion was made with (sampling must use the same; 1 otherwise)."""
        return float((self.scheme or {}).get("gamma", 1.0))

    def scheme_report(self) -> dict[str, Any]:
        """What reports print beside the UNet calls: the scheme, its iteration cap, the extra UNet calls
        it made, its worst step residual, and the decoder-inversion steps."""
        s = self.scheme or {}
        residuals = [r for r in s.get("residuals", []) if r is not None]
        return {"invert_scheme": self.scheme_name, "invert_iters": s.get("iters", 0),
                "invert_extra_calls": sum(s.get("iterations", [])),
                "invert_residual": max(residuals) if residuals else None, "decoder_steps": s.get("decoder_steps", 0),
                "bdia_gamma": self.pair_gamma}

    @property
    def steps(self) -> int:
        return int(self.schedule["steps"])

    @property
    def noise(self) -> torch.Tensor:
        return self.trajectory[-1:]

    @property
    def architecture(self) -> str:
        """``"flow"`` for an inversion made with a flow model (its schedule says so), else ``"unet"``."""
        return "flow" if self.schedule.get("family") == "flow" else "unet"

    def check_architecture(self, model: Model, *, architecture: str | None = None, name: str | None = None) -> None:
        """One line when the inversion's family is not the model's (a flow inversion on a UNet model).
        Before the load, ``architecture`` and ``name`` come from the model's configs instead."""
        architecture = architecture or model.architecture
        if self.architecture != architecture:
            names = {"flow": "a flow-matching model (SD3 / FLUX)", "unet": "a UNet model (Stable Diffusion 1.x/2.x/XL)"}
            raise NpinvError(f"the inversion was made with {names[self.architecture]} ({self.model.get('name')!r}), "
                             f"but {name or model.name!r} is {names[architecture]}; invert the image with this model")

    def schedule_for(self, model: Model) -> Schedule:
        from npinv.schemes import get_scheme

        self.check_architecture(model)

        if self.schedule.get("family") == "flow":
            # The recorded grid (FLUX's mu is the inversion's), sampled with the step rule that inverted it.
            from npinv.flow_schedule import FlowSchedule

            return FlowSchedule.from_dict(self.schedule).with_solver(get_scheme(self.scheme_name).sampler)
        return model.schedule(self.steps, int(self.schedule["offset"]))

    def check_compatible(self, model: Model, *, steps: int | None = None, size: tuple[int, int] | None = None) -> None:
        """Refuse reuse with another model, step count or image size (a clear error, not a blur)."""
        self.check_architecture(model)
        if self.model.get("fingerprint") != model.fingerprint:
            if self.model.get("name") == model.name:  # same name, other weights (retrained, or the file edited)
                raise NpinvError(f"the inversion was made with model {model.name!r} as it was then (weights "
                                 f"{self.model.get('fingerprint')!r}, now {model.fingerprint!r}); invert the image again")
            raise NpinvError(f"the inversion was made with model {self.model.get('name')!r}, not {model.name!r}")
        if steps is not None and steps != self.steps:
            raise NpinvError(f"the inversion has {self.steps} steps; asked for {steps}")
        if size is not None and tuple(size) != tuple(self.image_size):
            raise NpinvError(f"the inversion is of a {self.image_size[1]}x{self.image_size[0]} image, not {size[1]}x{size[0]}")
        # The file's own tensors against this model (a file edited by hand or by another tool).
        c, h, w = self.trajectory.shape[1:]
        want = (model.latent_channels, *(s // model.vae_scale_factor for s in self.image_size))
        if (c, h, w) != want:
            raise NpinvError(f"the inversion's latents are {c}x{h}x{w}, but this model makes {want[0]}x{want[1]}x{want[2]} "
                             f"latents of a {self.image_size[1]}x{self.image_size[0]} image; the file is damaged")
        ref = model.null_embedding()
        for what, mine, theirs in (("prompt embeddings", self.source.hidden, ref.hidden),
                                   ("pooled prompt embeddings", self.source.pooled, ref.pooled)):
            if (mine is None) != (theirs is None) or (mine is not None and mine.shape[1:] != theirs.shape[1:]):
                raise NpinvError(f"the inversion's {what} are {_shape(mine[0]) if mine is not None else 'absent'}, "
                                 f"but this model's are {_shape(theirs[0]) if theirs is not None else 'absent'}; "
                                 "the file is damaged")

    def check_image(self, image: torch.Tensor, name: str) -> None:
        """Refuse to edit ``image`` (as prepared) with an inversion of another picture; a file written
        before the digest was recorded has nothing to compare and is taken as it is."""
        if self.image_digest is not None and image_digest(image) != self.image_digest:
            h, w = image.shape[-2:]
            raise NpinvError(f"{name} is not the image this inversion was made from (their {w}x{h} prepared "
                             "pixels differ; same picture? give the --resize it was inverted with)")

    # -- persistence: one .safetensors file whose metadata holds the JSON settings ---------------
    def save(self, path: str | Path, *, stage: Stage | None = None) -> Path:
        """Write the inversion atomically (or into ``stage``'s temporary, see :func:`npinv.io.staged_outputs`)."""
        from safetensors.torch import save

        path = check_inversion_path(path, "inversion path")
        if self.encoded_only:
            raise NpinvError("an encoded-only inversion (the clean latent of an inversion-free edit) is not a file "
                             "npinv can reuse; invert the image to save one")

        tensors = {"trajectory": self.trajectory}
        tensors.update(_embedding_tensors("source", self.source))
        tensors.update(_embedding_tensors("null", self.null))
        if self.negatives is not None:
            tensors.update(_embedding_tensors("negatives", PromptEmbedding.cat(self.negatives)))
        meta = {
            "format": "npinv-inversion", "version": FORMAT_VERSION, "source_prompt": self.source_prompt,
            "schedule": self.schedule, "model": self.model, "image_size": list(self.image_size),
            "dtype": self.dtype, "nti": self.nti, "scheme": self.scheme, "image_digest": self.image_digest,
        }
        tensors = {k: v.detach().to("cpu", FILE_DTYPE).contiguous() for k, v in tensors.items()}
        # Serialised here and written by Python, so that a full disk is an OSError with its errno
        # (safetensors' own writer reports it as a SafetensorError with the errno in its text).
        data = save(tensors, metadata={"npinv": json.dumps(meta)})
        with writing(path):
            if stage is not None:
                stage(path).write_bytes(data)
            else:
                with atomic_path(path) as tmp:
                    tmp.write_bytes(data)
        return path

    @classmethod
    def load(cls, path: str | Path) -> Inversion:
        from safetensors import safe_open

        path = Path(path)
        if path.is_dir():
            raise NpinvError(f"{path} is a folder, not an inversion file (.safetensors)")
        if not path.is_file():
            raise NpinvError(f"no such inversion file: {path}")
        try:
            with safe_open(str(path), framework="pt") as fh:
                meta = json.loads((fh.metadata() or {}).get("npinv", "null"))
                tensors = {k: fh.get_tensor(k) for k in fh.keys()}
        except Exception as exc:
            raise NpinvError(f"{path.name} is not a readable inversion file ({exc})") from None
        if not isinstance(meta, dict) or meta.get("format") != "npinv-inversion":
            raise NpinvError(f"{path.name} is not an npinv inversion file")
        _check_file(path.name, meta, tensors)
        negatives = None
        if "negatives.hidden" in tensors:
            stacked = _embedding_from("negatives", tensors)
            negatives = [
                PromptEmbedding(stacked.hidden[k : k + 1], None if stacked.pooled is None else stacked.pooled[k : k + 1])
                for k in range(stacked.hidden.shape[0])
            ]
        return cls(
            trajectory=tensors["trajectory"], source_prompt=meta["source_prompt"],
            source=_embedding_from("source", tensors), null=_embedding_from("null", tensors),
            schedule=meta["schedule"], model=meta["model"], image_size=tuple(meta["image_size"]),
            dtype=meta["dtype"], negatives=negatives, nti=meta.get("nti"), scheme=meta.get("scheme"),
            image_digest=meta.get("image_digest"),
        )


def _whole(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _check_file(name: str, meta: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    """The file's metadata against its own tensors: a trajectory of ``steps + 1`` latents, one
    negative per step, embeddings of one shape, latents that divide the image size evenly."""
    def bad(what: str) -> NpinvError:
        return NpinvError(f"{name}: damaged inversion file ({what})")

    if meta.get("version") != FORMAT_VERSION:
        raise NpinvError(f"{name}: inversion format version {meta.get('version')!r}; this npinv reads {FORMAT_VERSION}")
    schedule, size = meta.get("schedule"), meta.get("image_size")
    if not isinstance(meta.get("source_prompt"), str) or not meta["source_prompt"].strip():
        raise bad("no source prompt")
    if not isinstance(meta.get("model"), dict) or not isinstance(meta.get("dtype"), str):
        raise bad("no model or dtype")
    if (not isinstance(schedule, dict) or not _whole(schedule.get("steps")) or schedule["steps"] < 1
            or not _whole(schedule.get("offset")) or schedule["offset"] < 0):
        raise bad(f"schedule {schedule!r}")
    if not (isinstance(size, list) and len(size) == 2 and all(_whole(v) and v > 0 for v in size)):
        raise bad(f"image size {size!r}")
    scheme = meta.get("scheme")
    if scheme is not None and not (isinstance(scheme, dict) and isinstance(scheme.get("name"), str)):
        raise bad(f"inversion scheme {scheme!r}")
    if schedule.get("family") == "flow":
        from npinv.flow_schedule import FlowSchedule

        try:
            grid = FlowSchedule.from_dict(schedule)
        except (NpinvError, ValueError, TypeError, KeyError, RuntimeError):
            raise bad("flow schedule") from None
        if grid.steps != schedule["steps"]:
            raise bad(f"a flow schedule of {grid.steps} sigma steps for {schedule['steps']} steps")
    gamma = (scheme or {}).get("gamma", 1.0)
    try:
        check_bdia_gamma(gamma, schedule["steps"])
    except NpinvError:
        raise bad(f"BDIA gamma {gamma!r}") from None
    digest = meta.get("image_digest")
    if digest is not None and not (isinstance(digest, str) and re.fullmatch(r"[0-9a-f]{64}", digest)):
        raise bad(f"image digest {digest!r}")
    for key in ("trajectory", "source.hidden", "null.hidden"):
        if key not in tensors:
            raise bad(f"no {key!r} tensor")
    for key, t in tensors.items():
        # A header that says I32 or U32 over the same bytes would otherwise read as numbers and edit into noise.
        if key not in TENSOR_NAMES:
            raise bad(f"an unexpected tensor {key!r}")
        if t.dtype != FILE_DTYPE:
            raise bad(f"{key!r} holds {_dtype_name(t.dtype)} values, not {_dtype_name(FILE_DTYPE)}")
        if 0 in t.shape:
            raise bad(f"{key!r} is empty ({_shape(t)})")
        if not torch.isfinite(t).all():
            raise bad(f"{key!r} holds NaN or infinite values")
    steps, traj = schedule["steps"], tensors["trajectory"]
    if traj.ndim != 4 or traj.shape[0] != steps + 1:
        raise bad(f"the metadata says {steps} steps, so {steps + 1} latents, but the trajectory is {_shape(traj)}")
    h, w = traj.shape[-2:]
    if size[0] % h or size[1] % w or size[0] // h != size[1] // w:
        raise bad(f"{h}x{w} latents cannot be of a {size[1]}x{size[0]} image")
    source, null = tensors["source.hidden"], tensors["null.hidden"]
    if source.ndim != 3 or source.shape[0] != 1 or null.shape != source.shape:
        raise bad(f"source and null embeddings of shapes {_shape(source)} and {_shape(null)}")
    if ("source.pooled" in tensors) != ("null.pooled" in tensors):
        raise bad("a pooled embedding for only one of source and null")
    pooled = tensors.get("source.pooled")
    if pooled is not None and (pooled.ndim != 2 or pooled.shape[0] != 1 or tensors["null.pooled"].shape != pooled.shape):
        raise bad(f"pooled source and null embeddings of shapes {_shape(pooled)} and {_shape(tensors['null.pooled'])}")
    if ("negatives.pooled" in tensors) and "negatives.hidden" not in tensors:
        raise bad("pooled negatives without negatives")
    if "negatives.hidden" in tensors:
        neg = tensors["negatives.hidden"]
        if neg.shape != (steps, *source.shape[1:]):
            raise bad(f"{neg.shape[0]} negatives of shape {tuple(neg.shape[1:])} for {steps} steps of "
                      f"{tuple(source.shape[1:])} embeddings")
        if ("negatives.pooled" in tensors) != (pooled is not None):
            raise bad("pooled negatives do not match the source embedding")
        if pooled is not None and tensors["negatives.pooled"].shape != (steps, *pooled.shape[1:]):
            raise bad(f"pooled negatives of shape {_shape(tensors['negatives.pooled'])} for {steps} steps of "
                      f"{_shape(pooled)} pooled embeddings")


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _shape(t: torch.Tensor) -> str:
    return "x".join(map(str, t.shape)) or "a scalar"


def _embedding_tensors(prefix: str, e: PromptEmbedding) -> dict[str, torch.Tensor]:
    out = {f"{prefix}.hidden": e.hidden}
    if e.pooled is not None:
        out[f"{prefix}.pooled"] = e.pooled
    return out


def _embedding_from(prefix: str, tensors: dict[str, torch.Tensor]) -> PromptEmbedding:
    return PromptEmbedding(tensors[f"{prefix}.hidden"], tensors.get(f"{prefix}.pooled"))


def ddim_inversion(
    model: Model, image: torch.Tensor, prompt: str, *, steps: int = 50, offset: int | None = None,
    progress: bool = False, scheme: str = "ddim", iters: int = DEFAULT_INVERT_ITERS, tol: float = DEFAULT_INVERT_TOL,
    gamma: float = 1.0, decoder_steps: int = 0,
) -> Inversion:
    """Encode ``image`` (1, 3, H, W) in [-1, 1] and invert it with DDIM under ``prompt``."""
    return ddim_inversion_batch(model, image, [prompt], steps=steps, offset=offset, progress=progress, scheme=scheme,
                                iters=iters, tol=tol, gamma=gamma, decoder_steps=decoder_steps)[0]


def ddim_inversion_batch(
    model: Model, images: torch.Tensor, prompts: list[str], *, steps: int = 50, offset: int | None = None,
    progress: bool = False, scheme: str = "ddim", iters: int = DEFAULT_INVERT_ITERS, tol: float = DEFAULT_INVERT_TOL,
    gamma: float = 1.0, decoder_steps: int = 0, encode_only: bool = False,
) -> list[Inversion]:
    """Invert several same-size images (B, 3, H, W), one prompt each, in one UNet batch per step.
    ``encode_only``: stop after the encoder (and the decoder fit): each result holds the clean latent
    alone, all an inversion-free method (FlowEdit) uses, at no UNet call (:attr:`Inversion.encoded_only`).

    ``scheme`` (:mod:`npinv.schemes`): ``ddim``, or ``fixed-point`` with at most ``iters`` extra UNet
    calls a step, stopping when a step inverts to ``tol``; ``bdia`` with damping factor ``gamma``.
    ``decoder_steps``: fit the clean latent to the image through the VAE decoder first (:mod:`npinv.decoder`)."""
    from npinv.decoder import invert_decoder
    from npinv.schemes import get_scheme

    if images.shape[0] != len(prompts):
        raise ValueError(f"{images.shape[0]} images for {len(prompts)} prompts")
    for p in prompts:
        check_prompt(p, "the source prompt")
    how = get_scheme(scheme)
    how.check_model(model)
    if model.timestep_distilled:
        from npinv.model import TIMESTEP_DISTILLED

        raise NpinvError(TIMESTEP_DISTILLED)
    if how.pair_start:
        check_bdia_gamma(gamma, steps)
    if getattr(model, "is_flow", False):  # FLUX.1-dev's grid shifts with the latent's size
        h, w = images.shape[-2:]
        schedule = model.schedule(steps, offset, latent_size=(h // model.vae_scale_factor, w // model.vae_scale_factor))
    else:
        schedule = model.schedule(steps, offset)
    sources = [model.encode_prompt(p) for p in prompts]
    z0 = model.encode_image(images)
    fit = invert_decoder(model, images, z0, decoder_steps, progress="decoder" if progress else None)
    if encode_only:
        trajectory, residuals, iterations = fit.latent[None], [], []
    else:
        trace = how.invert(model, fit.latent, schedule, PromptEmbedding.cat(sources), iters=iters, tol=tol,
                           gamma=gamma, progress="invert" if progress else None)
        trajectory, residuals, iterations = trace.trajectory, trace.residuals, trace.iterations
    null = model.null_embedding()
    # The cap and tolerance only where the scheme iterates: a BDIA or DDIM inversion made no iterations.
    record = {"name": how.name, "iters": iters if how.iterates else 0, "tol": tol if how.iterates else 0.0,
              "residuals": residuals, "iterations": iterations, "decoder_steps": decoder_steps,
              "decoder_losses": fit.losses[:1] + fit.losses[-1:]}  # first and last
    if encode_only:
        record |= {"encoded_only": True, "iters": 0, "tol": 0.0}
    if how.pair_start:
        record["gamma"] = gamma
    return [
        Inversion(
            trajectory=trajectory[:, b].contiguous(), source_prompt=prompt, source=source, null=null,
            schedule=schedule.to_dict(), model=_model_record(model),
            image_size=(images.shape[-2], images.shape[-1]), dtype=str(model.dtype).removeprefix("torch."),
            scheme=dict(record), image_digest=image_digest(images[b]),
        )
        for b, (prompt, source) in enumerate(zip(prompts, sources, strict=True))
    ]


def _model_record(model: Model) -> dict[str, Any]:
    """What an inversion file says of its model: the name and weights' fingerprint, and for flow models
    the family and the embedded guidance (FLUX.1-dev's; it is in the fingerprint as well)."""
    record: dict[str, Any] = {"name": model.name, "fingerprint": model.fingerprint}
    if model.is_flow:
        record |= {"family": model.family, "embedded_guidance": model.embedded_guidance}
    return record


class NullTextOptimisation(StepHook):
    """Null-text inversion as a hook on branch 0: before step ``i`` it optimises ``N_i`` so that the
    guided step from the current latent lands on ``z*[n-1-i]``, then hands the loop ``N_i`` and the
    conditional output it already computed (so that row is not evaluated twice).
    """

    def __init__(self, model: Model, inv: Inversion, guidance: CFG, *, inner_steps: int = 10,
                 lr: float = 1e-2, early_stop: float = 1e-5) -> None:
        self.model, self.inv, self.guidance = model, inv, guidance
        self.inner_steps, self.lr, self.early_stop = inner_steps, lr, early_stop
        # Flow transformers (SD3, FLUX) take the pooled text vector into every block's modulation (FLUX's
        # only CLIP input): the negative's pooled embedding is optimised with its hidden states. SDXL's
        # pooled embedding stays fixed, as null-text inversion's published recipe (SD 1.x: no pooled) keeps it.
        self.optimise_pooled = bool(getattr(model, "is_flow", False))
        # On an exact inversion the source embedding already lands every step on the trajectory (loss at
        # the scheme's tolerance): start there, as NPI observes, instead of at the null embedding, whose
        # few Adam steps a step cannot reach it, and whose errors a BDIA sampler amplifies.
        self.current = inv.source if inv.exact else inv.null
        self.losses: list[list[float]] = []
        # On the model's device once, not copied over from the host at every step (a file's is on the CPU).
        self.trajectory = inv.trajectory.to(model.device)

    def before_step(self, state: StepState) -> None:
        i, t, n = state.i, state.t, state.schedule.steps
        z = state.z[0:1]
        branch = state.branches[0]
        target = self.trajectory[n - 1 - i : n - i]
        with torch.no_grad():
            eps_cond = self.model.unet_output(z, t, branch.cond)
        hidden = self.current.hidden.detach().clone().float().requires_grad_(True)
        pooled = None if self.current.pooled is None else self.current.pooled.detach().clone().float()
        params = [hidden]
        if pooled is not None and self.optimise_pooled:
            params.append(pooled.requires_grad_(True))
        opt = torch.optim.Adam(params, lr=self.lr * (1.0 - i / 100.0))
        losses = []
        for _ in range(self.inner_steps):
            eps_neg = self.model.unet_output(z, t, PromptEmbedding(hidden, pooled))
            z_prev = state.advance(self.guidance(eps_neg, eps_cond), slice(0, 1))
            loss = F.mse_loss(z_prev, target)
            # The early stop's one host read of an inner step: whether the next UNet call happens depends
            # on it (a device-side stop would make every call and change NTI's call counts).
            losses.append(loss.item())
            landed = losses[-1] < self.early_stop + 2e-5 * i
            if landed and self.inv.exact:
                # Keep an embedding that already lands: the reference takes one more Adam step after reaching the
                # threshold, which moves every coordinate by about lr whatever the gradient's size. On plain DDIM
                # inversions npinv keeps the reference's order (its published figures).
                state.known[(0, "neg")] = eps_neg.detach()  # the embedding it came from is kept: no second call
                break
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if landed:
                break
        self.losses.append(losses)
        self.current = PromptEmbedding(hidden.detach(), None if pooled is None else pooled.detach())
        branch.negatives[i] = self.current
        state.known[(0, "cond")] = eps_cond
