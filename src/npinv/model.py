"""Load any Stable Diffusion family through diffusers and expose what inversion needs:
prompt and image encoding, decoding, and one counted UNet call.

Specs: ``None`` (the embedded shapes model), a local diffusers folder, a single-file
``.safetensors`` checkpoint, or a hub id (from the local cache, or the network when there is one).
Pickle checkpoints (``.ckpt``, ``.bin``, ``.pt``, ``.pth``) can run code when loaded, so they are
refused unless ``allow_pickle=True``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import warnings
from pathlib import Path
from typing import Any

import torch

from npinv.errors import NpinvError
from npinv.schedule import Schedule

PICKLE_SUFFIXES = (".ckpt", ".bin", ".pt", ".pth")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")
# A model folder may declare npinv's defaults for it in this file beside model_index.json (diffusers
# ignores it): {"edit_guidance": 2.5}. Without it (and for hub ids and single files) editing uses 7.5.
SETTINGS_FILE = "npinv.json"
DEFAULT_EDIT_GUIDANCE = 7.5


class NpinvWarning(UserWarning):
    """A warning the CLI prints as one line (truncated prompt, unknown words, ...)."""


def embedded_model_path() -> Path:
    """Folder of the model that ships inside the package."""
    return Path(__file__).parent / "models" / "shapes64"


def _is_embedded(spec: str | Path | None) -> bool:
    return spec is None or str(spec) in ("default", "shapes64")


def model_edit_guidance(spec: str | Path | None = None) -> float:
    """The editing guidance a model declares (``"edit_guidance"`` in its folder's ``npinv.json``),
    else 7.5. Reads only that small file, so the CLI resolves its defaults before the slow load;
    hub ids and single checkpoint files declare nothing. A malformed file raises :class:`NpinvError`."""
    folder = embedded_model_path() if _is_embedded(spec) else Path(str(spec)).expanduser()
    path = folder / SETTINGS_FILE
    if not folder.is_dir() or not path.is_file():
        return DEFAULT_EDIT_GUIDANCE
    try:
        settings = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise NpinvError(f"{path}: cannot read the model's settings ({exc})") from None
    except json.JSONDecodeError as exc:
        raise NpinvError(f"{path}: not valid JSON ({exc.msg}, line {exc.lineno})") from None
    if not isinstance(settings, dict):
        raise NpinvError(f'{path}: expected a JSON object like {{"edit_guidance": 2.5}}')
    unknown = sorted(set(settings) - {"edit_guidance"})
    if unknown:
        warnings.warn(f"{path}: ignoring unknown key(s) {', '.join(map(repr, unknown))} (known: 'edit_guidance')",
                      NpinvWarning, stacklevel=1)  # one location: the CLI's early read and the load warn once
    value = settings.get("edit_guidance", DEFAULT_EDIT_GUIDANCE)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < float("inf"):
        raise NpinvError(f"{path}: 'edit_guidance' must be a positive finite number, got {value!r}")
    return float(value)


@dataclasses.dataclass
class PromptEmbedding:
    """Text conditioning of one or more rows: hidden states and, for SDXL, pooled embeddings."""

    hidden: torch.Tensor
    pooled: torch.Tensor | None = None

    @staticmethod
    def cat(items: list[PromptEmbedding]) -> PromptEmbedding:
        pooled = [e.pooled for e in items]
        return PromptEmbedding(
            torch.cat([e.hidden for e in items]),
            None if pooled[0] is None else torch.cat(pooled),  # type: ignore[arg-type]
        )

    def detach(self) -> PromptEmbedding:
        return PromptEmbedding(self.hidden.detach(), None if self.pooled is None else self.pooled.detach())


@dataclasses.dataclass
class UNetCounter:
    """Exact cost accounting: forward calls and the batch rows they carried."""

    calls: int = 0
    rows: int = 0


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype:
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise NpinvError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def default_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


class Model:
    """A loaded pipeline's parts plus the calls inversion and editing make on them."""

    def __init__(self, pipe: Any, name: str, device: torch.device, dtype: torch.dtype, *,
                 edit_guidance: float = DEFAULT_EDIT_GUIDANCE) -> None:
        self.pipe = pipe
        self.name = name
        self.edit_guidance = edit_guidance  # the guidance edits default to (the folder's npinv.json, else 7.5)
        self.device = device
        self.dtype = dtype
        self.unet = pipe.unet
        self.vae = pipe.vae
        self.is_sdxl = getattr(pipe, "text_encoder_2", None) is not None
        self.counter = UNetCounter()
        for part in (pipe.unet, pipe.vae, pipe.text_encoder, getattr(pipe, "text_encoder_2", None)):
            if part is not None:
                part.requires_grad_(False)
                part.eval()
        self.vae_scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        self.known_words = _read_vocabulary(pipe)

    # -- facts ----------------------------------------------------------------------------------
    @property
    def family(self) -> str:
        return "sdxl" if self.is_sdxl else "sd"

    @property
    def prediction_type(self) -> str:
        return self.pipe.scheduler.config.get("prediction_type", "epsilon")

    @property
    def resolution(self) -> int:
        """The side the model was trained at, in pixels."""
        return int(self.unet.config.sample_size) * self.vae_scale_factor

    @property
    def fingerprint(self) -> str:
        """Identifies the weights well enough to refuse reusing an inversion on another model."""
        h = hashlib.sha256()
        h.update(json.dumps(dict(self.unet.config), sort_keys=True, default=str).encode())
        for p in list(self.unet.parameters())[:4] + list(self.unet.parameters())[-4:]:
            h.update(repr(float(p.detach().double().sum())).encode())
        return h.hexdigest()[:16]

    def schedule(self, steps: int, offset: int | None = None) -> Schedule:
        return Schedule.from_scheduler_config(self.pipe.scheduler.config, steps, offset)

    # -- text -----------------------------------------------------------------------------------
    def encode_prompt(self, text: str) -> PromptEmbedding:
        self._check_prompt(text)
        with torch.no_grad():
            if self.is_sdxl:
                hidden, _, pooled, _ = self.pipe.encode_prompt(
                    text, device=self.device, num_images_per_prompt=1, do_classifier_free_guidance=False
                )
                return PromptEmbedding(hidden.float(), pooled.float())
            hidden, _ = self.pipe.encode_prompt(text, self.device, 1, False)
            return PromptEmbedding(hidden.float())

    def null_embedding(self) -> PromptEmbedding:
        """The unconditional embedding diffusers uses for an empty negative prompt."""
        empty = self.encode_prompt("")
        if self.is_sdxl and self.pipe.config.get("force_zeros_for_empty_prompt", True):
            return PromptEmbedding(torch.zeros_like(empty.hidden), torch.zeros_like(empty.pooled))
        return empty

    def _check_prompt(self, text: str) -> None:
        tok = self.pipe.tokenizer
        n = len(tok(text, truncation=False).input_ids)
        if n > tok.model_max_length:
            warnings.warn(
                f"prompt has {n} tokens, over the tokenizer's limit of {tok.model_max_length}; "
                "the end is truncated", NpinvWarning, stacklevel=3)
        if self.known_words is not None:
            unknown = [w for w in re.findall(r"[a-z]+", text.lower()) if w not in self.known_words]
            if unknown:
                warnings.warn(
                    f"words outside {self.name}'s vocabulary: {', '.join(dict.fromkeys(unknown))} "
                    "(they still tokenize, but the model never saw them)", NpinvWarning, stacklevel=3)

    # -- images ---------------------------------------------------------------------------------
    def encode_image(self, image: torch.Tensor) -> torch.Tensor:
        """Latent of images in [-1, 1] (B, 3, H, W): posterior mean times the scaling factor, fp32."""
        with torch.no_grad():
            x = image.to(self.device, self.vae.dtype)
            z = self.vae.encode(x).latent_dist.mean.float()
        shift = self.vae.config.get("shift_factor") or 0.0
        z = (z - shift) * self.vae.config.scaling_factor
        _check_finite(z, "the encoded latent")
        return z

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] (fp32) from latents."""
        shift = self.vae.config.get("shift_factor") or 0.0
        with torch.no_grad():
            x = self.vae.decode((z / self.vae.config.scaling_factor + shift).to(self.device, self.vae.dtype)).sample
        x = x.float()
        _check_finite(x, "the decoded image")
        return x.clamp(-1, 1)

    # -- the UNet -------------------------------------------------------------------------------
    def unet_output(self, z: torch.Tensor, t: int, cond: PromptEmbedding) -> torch.Tensor:
        """Raw model output (epsilon or v) for each row of ``z`` with ``cond``'s rows, in fp32.

        Gradients flow to ``cond`` when it requires grad (null-text optimisation).
        """
        rows = z.shape[0]
        self.counter.calls += 1
        self.counter.rows += rows
        kwargs: dict[str, Any] = {}
        if self.is_sdxl:
            h, w = (s * self.vae_scale_factor for s in z.shape[-2:])
            time_ids = torch.tensor([[h, w, 0, 0, h, w]], device=self.device, dtype=self.dtype).expand(rows, -1)
            kwargs["added_cond_kwargs"] = {"text_embeds": cond.pooled.to(self.device, self.dtype),
                                           "time_ids": time_ids}
        timestep = torch.full((rows,), t, device=self.device, dtype=torch.long)
        out = self.unet(z.to(self.device, self.dtype), timestep,
                        encoder_hidden_states=cond.hidden.to(self.device, self.dtype), **kwargs).sample
        out = out.float()
        if not torch.isfinite(out).all():
            raise NpinvError(
                f"the UNet returned non-finite values at timestep {t} in {str(self.dtype).removeprefix('torch.')}; "
                "rerun with --dtype fp32 (or bf16)")
        return out


def _check_finite(x: torch.Tensor, what: str) -> None:
    if not torch.isfinite(x).all():
        raise NpinvError(f"{what} has non-finite values (a half-precision overflow?); rerun with --dtype fp32")


def _read_vocabulary(pipe: Any) -> frozenset[str] | None:
    path = getattr(pipe.tokenizer, "name_or_path", None)
    if not path:
        return None
    words = Path(path) / "vocabulary_words.txt"
    return frozenset(words.read_text().split()) if words.is_file() else None


def load_model(
    spec: str | Path | None = None,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    *,
    allow_pickle: bool = False,
    config: str | Path | None = None,
) -> Model:
    """Load a Stable Diffusion family model (SD 1.x, SD 2.x, SDXL) for inversion and editing.

    ``dtype`` sets the UNet's and text encoders' type (fp32 default); the VAE stays fp32 when its
    config asks for upcasting, and the schedule's arithmetic is always fp32. ``config`` is the
    diffusers folder or hub id whose configs a single-file checkpoint uses (needed offline).
    """
    from diffusers.utils import logging as dlogging

    torch_dtype = parse_dtype(dtype)
    dev = torch.device(device) if device is not None else default_device()
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise NpinvError("--device cuda was asked for, but torch sees no CUDA device")
    edit_guidance = model_edit_guidance(spec)  # a malformed npinv.json fails before the slow load
    if _is_embedded(spec):
        path, name = embedded_model_path(), "npinv-shapes-64"
        if not (path / "model_index.json").is_file():
            raise NpinvError(f"the embedded model is missing from {path}; reinstall npinv")
        spec = str(path)
    else:
        name = str(spec)
        path = Path(spec).expanduser()
    from transformers.utils import logging as tlogging

    verbosity = dlogging.get_verbosity()
    # diffusers' and transformers' load chatter and bars would drown our one-line messages.
    dlogging.set_verbosity_error()
    dlogging.disable_progress_bar()
    tlogging.disable_progress_bar()
    try:
        pipe = _load_pipeline(str(spec), path, allow_pickle, config)
        vae_dtype = torch.float32 if pipe.vae.config.get("force_upcast", True) else torch_dtype
        parts = [(pipe.unet, torch_dtype), (pipe.text_encoder, torch_dtype), (pipe.vae, vae_dtype),
                 (getattr(pipe, "text_encoder_2", None), torch_dtype)]
        for part, wanted in parts:
            if part is not None and (part.dtype != wanted or part.device != dev):
                part.to(dev, wanted)
    finally:
        dlogging.set_verbosity(verbosity)
        dlogging.enable_progress_bar()
        tlogging.enable_progress_bar()
    pipe.set_progress_bar_config(disable=True)
    return Model(pipe, name, dev, torch_dtype, edit_guidance=edit_guidance)


def _pipeline_class(is_xl: bool):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    return StableDiffusionXLPipeline if is_xl else StableDiffusionPipeline


def _load_pipeline(spec: str, path: Path, allow_pickle: bool, config: str | Path | None):
    common = {"safety_checker": None, "requires_safety_checker": False}
    if path.is_dir():
        index = path / "model_index.json"
        if not index.is_file():
            raise NpinvError(f"{path} is not a diffusers model folder (no model_index.json)")
        is_xl = "XL" in json.loads(index.read_text()).get("_class_name", "")
        return _call(lambda: _pipeline_class(is_xl).from_pretrained(path, **({} if is_xl else common)), spec)
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix in PICKLE_SUFFIXES and not allow_pickle:
            raise NpinvError(
                f"{path.name} is a pickle checkpoint, which can run arbitrary code when loaded; "
                "convert it to .safetensors, or pass --allow-pickle (allow_pickle=True) if you trust it")
        if suffix != ".safetensors" and suffix not in PICKLE_SUFFIXES:
            raise NpinvError(f"{path.name}: unsupported checkpoint type {suffix!r} (use .safetensors or a folder)")
        is_xl = _single_file_is_xl(path) if suffix == ".safetensors" else False
        kwargs: dict[str, Any] = {} if is_xl else dict(common)
        if config is not None:
            kwargs["config"] = str(config)
            kwargs["local_files_only"] = Path(config).is_dir()
        return _call(lambda: _pipeline_class(is_xl).from_single_file(str(path), **kwargs), spec)
    if path.suffix.lower() in (".safetensors", *PICKLE_SUFFIXES) or spec.startswith((".", "/", "~")):
        raise NpinvError(f"no such model file or folder: {spec}")
    if not _HUB_ID.match(spec):
        raise NpinvError(f"unknown model {spec!r}: not a folder, a checkpoint file or a hub id (org/name)")
    from diffusers import DiffusionPipeline

    def from_hub():
        pipe = DiffusionPipeline.from_pretrained(spec, safety_checker=None, requires_safety_checker=False)
        if not hasattr(pipe, "unet") or not hasattr(pipe, "vae"):
            raise NpinvError(f"{spec} is not a Stable Diffusion model (no UNet/VAE)")
        return pipe

    return _call(from_hub, spec)


def _single_file_is_xl(path: Path) -> bool:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as fh:
            return any(k.startswith("conditioner.embedders.1") for k in fh.keys())
    except Exception as exc:  # corrupt header: report it as the user's file problem
        raise NpinvError(f"{path.name} is not a readable safetensors file ({exc})") from None


def _call(load, spec: str):
    try:
        return load()
    except NpinvError:
        raise
    except (OSError, ValueError, KeyError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise NpinvError(f"cannot load model {spec!r}: {first}") from None
