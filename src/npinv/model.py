"""Load any Stable Diffusion family through diffusers and expose what inversion needs:
prompt and image encoding, decoding, and one counted UNet call.

Specs: ``None`` (the embedded shapes model), a local diffusers folder, a single-file
``.safetensors`` checkpoint, or a hub id (from the local cache, or the network when there is one).
Pickle checkpoints (``.ckpt``, ``.bin``, ``.pt``, ``.pth``) can run code when loaded, so they are
refused unless ``allow_pickle=True``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import re
import unicodedata
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from npinv.checks import SIZE_MULTIPLE
from npinv.errors import NpinvError
from npinv.finite import FiniteWatch
from npinv.finite import check_finite as _check_finite
from npinv.graphs import GraphCache, processors_key
from npinv.schedule import Schedule

PICKLE_SUFFIXES = (".ckpt", ".bin", ".pt", ".pth")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")
# A model folder may declare npinv's editing defaults for it in this file beside model_index.json
# (diffusers ignores it): {"edit_guidance": 2.5, "edit_self_replace": 0.2}. Without it (and for hub ids
# and single files) edits use guidance 7.5 and self-replace 0.6 (google/prompt-to-prompt's settings).
SETTINGS_FILE = "npinv.json"
DEFAULT_EDIT_GUIDANCE = 7.5
DEFAULT_SELF_REPLACE = 0.6
# The download command of the installed huggingface_hub: its only console script is `hf` (no `huggingface-cli`).
HUB_DOWNLOAD = "hf download"


class NpinvWarning(UserWarning):
    """A warning the CLI prints as one line (truncated prompt, unknown words, ...)."""


class QuietTruncation(logging.Filter):
    """Drops diffusers' "The following part of your input was truncated ...: [<the cut-off text>]",
    logged at every encoding of a prompt over the text encoder's limit: up to the whole prompt, on a
    server in the log on every request, on the command line a second, unasked-for line. npinv already
    says the truncation in one line (an :class:`NpinvWarning`); transformers' own tokenizer notice
    ("Token indices sequence length is longer ...") is kept out by its verbosity (error)."""

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


@dataclasses.dataclass(frozen=True)
class EmbeddedModel:
    """A model that ships inside the package, selected by one of its short names."""

    name: str  # the model's own name (its card's title)
    folder: str  # under npinv/models/
    family: str  # "unet" or "flow"
    aliases: tuple[str, ...]

    @property
    def path(self) -> Path:
        return Path(__file__).parent / "models" / self.folder


# The first is the default model (no --model).
EMBEDDED_MODELS = (
    EmbeddedModel("npinv-shapes-64", "shapes64", "unet", ("default", "shapes", "shapes64", "npinv-shapes-64")),
    EmbeddedModel("npinv-shapes-flow-64", "shapes_flow64", "flow",
                  ("shapes-flow", "shapes-flow64", "shapes-flow-64", "npinv-shapes-flow-64")),
)


def embedded_model(spec: str | Path | None) -> EmbeddedModel | None:
    """The embedded model ``spec`` names (None: the default), else None. A folder of that name in the
    working directory is not shadowed by it only when given as a path (``./shapes64``)."""
    if spec is None:
        return EMBEDDED_MODELS[0]
    return next((m for m in EMBEDDED_MODELS if str(spec) in m.aliases), None)


def embedded_model_path(spec: str | Path | None = None) -> Path:
    """Folder of an embedded model (default: the default model)."""
    found = embedded_model(spec)
    if found is None:
        raise ValueError(f"{spec!r} is not an embedded model")
    return found.path


def _is_embedded(spec: str | Path | None) -> bool:
    return embedded_model(spec) is not None


@dataclasses.dataclass(frozen=True)
class ModelSettings:
    """What a model folder's ``npinv.json`` declares: its editing guidance and self-attention replace
    window (what edits use unless told otherwise) and, for a flow model whose prompts carry no T5 rows,
    the T5 sequence length its transformer was trained with."""

    edit_guidance: float = DEFAULT_EDIT_GUIDANCE
    edit_self_replace: float | tuple[float, float] = DEFAULT_SELF_REPLACE
    max_sequence_length: int | None = None
    # Not from npinv.json: the model's family when the caller read it from the configs (``model_facts``),
    # for a method's own default guidance (EditSettings.resolved); None when unknown.
    family: str | None = None


SETTINGS_KEYS = ("edit_guidance", "edit_self_replace", "max_sequence_length")


def model_settings(spec: str | Path | None = None) -> ModelSettings:
    """The settings a model declares in its folder's ``npinv.json`` (defaults where it declares none).
    Reads only that small file, so the CLI resolves its defaults before the slow load; hub ids and
    single checkpoint files declare nothing. A malformed file raises :class:`NpinvError`."""
    folder = embedded_model_path(spec) if _is_embedded(spec) else Path(str(spec)).expanduser()
    path = folder / SETTINGS_FILE
    if not folder.is_dir() or not path.is_file():
        return ModelSettings()
    try:
        settings = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise NpinvError(f"{path}: cannot read the model's settings ({exc})") from None
    except json.JSONDecodeError as exc:
        raise NpinvError(f"{path}: not valid JSON ({exc.msg}, line {exc.lineno})") from None
    if not isinstance(settings, dict):
        raise NpinvError(f'{path}: expected a JSON object like {{"edit_guidance": 2.5}}')
    unknown = sorted(set(settings) - set(SETTINGS_KEYS))
    if unknown:
        warnings.warn(f"{path}: ignoring unknown key(s) {', '.join(map(repr, unknown))} "
                      f"(known: {', '.join(map(repr, SETTINGS_KEYS))})",
                      NpinvWarning, stacklevel=1)  # one location: the CLI's early read and the load warn once
    value = settings.get("edit_guidance", DEFAULT_EDIT_GUIDANCE)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < float("inf"):
        raise NpinvError(f"{path}: 'edit_guidance' must be a positive finite number, got {value!r}")
    length = settings.get("max_sequence_length")
    if length is not None and (isinstance(length, bool) or not isinstance(length, int) or not 0 <= length <= 512):
        raise NpinvError(f"{path}: 'max_sequence_length' must be an integer in 0..512, got {length!r}")
    return ModelSettings(float(value), _declared_window(path, settings.get("edit_self_replace", DEFAULT_SELF_REPLACE)),
                         length)


def _declared_window(path: Path, value: Any) -> float | tuple[float, float]:
    """``edit_self_replace`` read by the settings schema's own rule for ``--self-replace`` (a fraction,
    or [START, END]), so a declared window is exactly what the flag would accept."""
    from npinv.settings import Window

    kind = Window()
    window = kind.from_value(value) if not isinstance(value, str) else value  # JSON text is not a window
    if not kind.ok(window):
        raise NpinvError(f"{path}: 'edit_self_replace' must be {kind.what}, got {value!r}")
    return (float(window[0]), float(window[1])) if isinstance(window, tuple) else float(window)


def model_edit_guidance(spec: str | Path | None = None) -> float:
    """The editing guidance a model declares (``"edit_guidance"`` in its folder's ``npinv.json``), else 7.5."""
    return model_settings(spec).edit_guidance


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


def parse_device(device: str | torch.device | None) -> torch.device:
    """The torch device for ``--device`` (None: the best available), refusing unknown names and
    devices this machine does not have with one line, before anything loads."""
    if device is None:
        return default_device()
    if isinstance(device, torch.device):
        dev = device
    else:
        try:
            dev = torch.device(str(device).strip().lower())
        except (RuntimeError, ValueError):
            raise NpinvError(f"unknown device {device!r}; use cpu, cuda, cuda:N or mps") from None
    if dev.type == "cpu":
        return dev
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise NpinvError(f"--device {device} was asked for, but torch sees no CUDA device "
                             "(a CPU-only torch build, or no GPU here); use --device cpu")
        if dev.index is not None and dev.index >= count:
            raise NpinvError(f"--device {device}: torch sees {count} CUDA device(s), cuda:0..cuda:{count - 1}")
        return dev
    if dev.type == "mps":
        if getattr(torch.backends, "mps", None) is None or not torch.backends.mps.is_available():
            raise NpinvError(f"--device {device} was asked for, but MPS (Apple GPU) is not available here; "
                             "use --device cpu")
        return dev
    raise NpinvError(f"device {device!r} is not supported; use cpu, cuda, cuda:N or mps")


def default_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


class Model:
    """A loaded pipeline's parts plus the calls inversion and editing make on them."""

    def __init__(self, pipe: Any, name: str, device: torch.device, dtype: torch.dtype, *,
                 edit_guidance: float = DEFAULT_EDIT_GUIDANCE,
                 edit_self_replace: float | tuple[float, float] = DEFAULT_SELF_REPLACE, cuda_graphs: bool = True) -> None:
        self.pipe = pipe
        self.name = name
        # What edits default to (the folder's npinv.json, else 7.5 and 0.6): EditSettings.resolved reads them.
        self.edit_guidance = edit_guidance
        self.edit_self_replace = edit_self_replace
        self.device = device
        self.dtype = dtype
        self.unet = pipe.unet
        self.vae = pipe.vae
        self.is_sdxl = getattr(pipe, "text_encoder_2", None) is not None
        self.counter = UNetCounter()
        # UNet calls replayed as CUDA graphs (npinv.graphs), kept here so that every request a server or
        # an edit-batch run makes with this model reuses them; on the CPU and MPS every call is eager.
        self.graphs = GraphCache(enabled=cuda_graphs and device.type == "cuda")
        self.finite = FiniteWatch(dtype)  # the UNet's non-finite checks, deferred inside a run
        self._attention_layers: list[Any] | None = None
        for part in (pipe.unet, pipe.vae, pipe.text_encoder, getattr(pipe, "text_encoder_2", None)):
            if part is not None:
                part.requires_grad_(False)
                part.eval()
        self.vae_scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        self.known_words = _read_vocabulary(pipe)

    # -- facts ----------------------------------------------------------------------------------
    # The family interface (docs/architecture.md): what front ends read instead of the network itself;
    # :class:`npinv.flow_model.FlowModel` answers the same names for SD3 / FLUX.
    is_flow = False  # a flow-matching transformer (FlowModel) rather than a UNet
    embedded_guidance: float | None = None  # FLUX.1-dev's guidance embedding; UNets have none
    timestep_distilled = False  # made for a few steps only (FLUX.1-schnell): not invertible

    @property
    def family(self) -> str:
        return "sdxl" if self.is_sdxl else "sd"

    @property
    def architecture(self) -> str:
        """``"unet"`` or ``"flow"``: which kind of inversion file this model reads and writes."""
        return "flow" if self.is_flow else "unet"

    @property
    def network(self) -> Any:
        """The denoising network the counted calls run (the UNet; FlowModel: the transformer)."""
        return self.unet

    @property
    def latent_channels(self) -> int:
        """Channels of the latent the loop carries, (B, C, h, w)."""
        return int(self.unet.config.in_channels)

    @property
    def edit_tokenizer(self) -> Any:
        """The tokenizer whose tokens Prompt-to-Prompt's word indices address (CLIP's for SD / SDXL)."""
        return self.pipe.tokenizer

    @property
    def prediction_type(self) -> str:
        return self.pipe.scheduler.config.get("prediction_type", "epsilon")

    @property
    def resolution(self) -> int:
        """The side the model was trained at, in pixels."""
        return int(self.unet.config.sample_size) * self.vae_scale_factor

    @property
    def size_multiple(self) -> int:
        """Image sides must be multiples of this many pixels (the VAE's downscale, at least 8)."""
        return max(SIZE_MULTIPLE, self.vae_scale_factor)

    @property
    def fingerprint(self) -> str:
        """Identifies the weights well enough to refuse reusing an inversion on another model."""
        h = hashlib.sha256()
        # The architecture only: the config's private keys hold the folder's path and the diffusers version,
        # and an inversion must still load when the same weights move (another checkout, a copied folder).
        arch = {k: v for k, v in dict(self.unet.config).items() if not k.startswith("_")}
        h.update(json.dumps(arch, sort_keys=True, default=str).encode())
        # Every network that shapes an inversion: a swapped text encoder or VAE changes the latents too.
        parts = [self.unet, self.vae, self.pipe.text_encoder, getattr(self.pipe, "text_encoder_2", None)]
        for part in filter(None, parts):
            params = list(part.parameters())
            for p in params[:4] + params[-4:]:
                h.update(repr(float(p.detach().double().sum())).encode())
        return h.hexdigest()[:16]

    def schedule(self, steps: int, offset: int | None = None, *,
                 latent_size: tuple[int, int] | None = None) -> Schedule:
        """The DDIM grid for ``steps`` steps; ``latent_size`` is for the families whose grid depends on
        the resolution (FLUX) and is ignored here."""
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
            unknown = [w for w in prompt_words(text) if w not in self.known_words]
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
        _check_finite(z, "the encoded latent", self.vae.dtype)
        return z

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] (fp32) from latents."""
        shift = self.vae.config.get("shift_factor") or 0.0
        with torch.no_grad():
            x = self.vae.decode((z / self.vae.config.scaling_factor + shift).to(self.device, self.vae.dtype)).sample
        x = x.float()
        _check_finite(x, "the decoded image", self.vae.dtype)
        return x.clamp(-1, 1)

    # -- the UNet -------------------------------------------------------------------------------
    def deferred_checks(self):
        """A run of UNet calls (a sampling loop, an inversion): their non-finite checks are read once,
        at its end (:class:`npinv.finite.FiniteWatch`), not after every call."""
        return self.finite.run()

    def unet_output(self, z: torch.Tensor, t: int, cond: PromptEmbedding) -> torch.Tensor:
        """Raw model output (epsilon or v) for each row of ``z`` with ``cond``'s rows, in fp32.

        Gradients flow to ``cond`` when it requires grad (null-text optimisation). On CUDA the call is a
        graph replay where it can be (:mod:`npinv.graphs`); either way it reads nothing back to the host
        inside :meth:`deferred_checks`.
        """
        rows = z.shape[0]
        self.counter.calls += 1
        self.counter.rows += rows
        inputs = {"sample": z.to(self.device, self.dtype),
                  # A fill on the device, not a copy from the host: no synchronisation.
                  "timestep": torch.full((rows,), t, device=self.device, dtype=torch.long),
                  "hidden": cond.hidden.to(self.device, self.dtype)}
        if self.is_sdxl:
            inputs["text_embeds"] = cond.pooled.to(self.device, self.dtype)
            inputs["time_ids"] = _time_ids(z.shape, self.vae_scale_factor, self.device, self.dtype)
        out = self.graphs.run(inputs, self._unet_call, self._graph_key() if self.graphs.enabled else None)
        self.finite.note(out, f"the UNet's output at timestep {t}")
        return out

    def _unet_call(self, sample: torch.Tensor, timestep: torch.Tensor, hidden: torch.Tensor,
                   text_embeds: torch.Tensor | None = None, time_ids: torch.Tensor | None = None) -> torch.Tensor:
        kwargs: dict[str, Any] = {}
        if text_embeds is not None:
            kwargs["added_cond_kwargs"] = {"text_embeds": text_embeds, "time_ids": time_ids}
        return self.unet(sample, timestep, encoder_hidden_states=hidden, **kwargs).sample.float()

    def _graph_key(self) -> tuple | None:
        """What besides the inputs' shapes decides a call's kernels: the weights' storage (graphs read
        them in place) and the attention processors installed (None: one must run eagerly)."""
        if self._attention_layers is None:
            self._attention_layers = [m for m in self.unet.modules() if hasattr(m, "processor")
                                      and hasattr(m, "set_processor")]
        procs = processors_key(self._attention_layers)
        if procs is None:
            return None
        return next(self.unet.parameters()).data_ptr(), procs


def _time_ids(shape: torch.Size, scale: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """SDXL's size conditioning (original size, crop 0,0, target size) of latents of ``shape``, made by
    fills on the device (``torch.tensor`` of the numbers would copy from the host each call)."""
    h, w = (s * scale for s in shape[-2:])
    ids = torch.zeros((shape[0], 6), device=device, dtype=dtype)
    ids[:, 0::4].fill_(h)  # columns 0 and 4
    ids[:, 1::4].fill_(w)  # columns 1 and 5
    return ids


def prompt_words(text: str) -> list[str]:
    """Every word of a prompt, lower-cased, as the vocabulary check sees it: runs of letters and
    digits in any script (with their combining marks: "हिन्दी", "café"), and runs of symbols
    ("🔴", "👍🏽", "❤️", "©", "+"); spaces and punctuation separate them and are not words."""
    words: list[str] = []
    run, kind = "", None
    for c in unicodedata.normalize("NFC", text).lower():
        cat = unicodedata.category(c)
        if c.isspace() or cat[0] == "P" or cat == "Cc":
            here = None
        elif c.isalnum() or c == "_" or (cat[0] == "M" and kind == "word"):
            here = "word"
        else:  # symbols and emoji, with their modifiers, variation selectors and joiners
            here = "symbol"
        if here != kind and run:
            words.append(run)
            run = ""
        kind = here
        if here is not None:
            run += c
    if run:
        words.append(run)
    # A lone joiner or mark (a zero-width space, a stray accent) is not a word.
    return [w for w in words if any(ch.isalnum() or unicodedata.category(ch)[0] == "S" or unicodedata.category(ch)
                                    in ("Co", "Cn") for ch in w)]


def _read_vocabulary(pipe: Any) -> frozenset[str] | None:
    path = getattr(pipe.tokenizer, "name_or_path", None)
    if not path:
        return None
    words = Path(path) / "vocabulary_words.txt"
    return frozenset(words.read_text().split()) if words.is_file() else None


def check_offload(offload: bool, device: torch.device) -> None:
    """``--offload`` needs a CUDA device (diffusers' model CPU offload moves each network to it while it runs)."""
    if offload and device.type != "cuda":
        raise NpinvError(f"--offload moves the networks between CPU memory and a CUDA device; the device here is "
                         f"{device.type} (use --device cuda, or drop --offload)")


def load_model(
    spec: str | Path | None = None,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    *,
    allow_pickle: bool = False,
    config: str | Path | None = None,
    cuda_graphs: bool = True,
    offload: bool = False,
) -> Model:
    """Load a Stable Diffusion family model (SD 1.x, SD 2.x, SDXL: a :class:`Model`) or a flow-matching
    one (SD3 / SD3.5 / FLUX.1: a :class:`npinv.flow_model.FlowModel`, the same interface) for inversion
    and editing.

    ``dtype`` sets the UNet's and text encoders' type (fp32 default); the VAE stays fp32 when its
    config asks for upcasting, and the schedule's arithmetic is always fp32. ``config`` is the
    diffusers folder or hub id whose configs a single-file checkpoint uses (needed offline).
    ``cuda_graphs``: on a CUDA device, replay UNet calls as CUDA graphs (:mod:`npinv.graphs`; no
    effect elsewhere). ``offload``: keep the networks in CPU memory and move each to the CUDA device
    only while it runs (diffusers' ``enable_model_cpu_offload``: the text encoders, run once per
    prompt, leave the GPU to the denoiser); CUDA only, and it turns CUDA graphs off (the weights move).
    """
    from diffusers.utils import logging as dlogging

    torch_dtype = parse_dtype(dtype)
    dev = parse_device(device)
    check_offload(offload, dev)
    declared = model_settings(spec)  # a malformed npinv.json fails before the slow load
    edit_guidance = declared.edit_guidance
    embedded = embedded_model(spec)
    if embedded is not None:
        path, name = embedded.path, embedded.name
        if not (path / "model_index.json").is_file():
            raise NpinvError(f"the embedded model {name} is missing from {path}; reinstall npinv")
        spec = str(path)
    else:
        name = str(spec)
        path = Path(spec).expanduser()
    from transformers.utils import logging as tlogging

    verbosity, tverbosity = dlogging.get_verbosity(), tlogging.get_verbosity()
    # diffusers' and transformers' load chatter and bars would drown our one-line messages (the
    # pipeline's import of CLIPImageProcessor warns that torchvision is missing: npinv never uses it).
    dlogging.set_verbosity_error()
    tlogging.set_verbosity_error()
    dlogging.disable_progress_bar()
    tlogging.disable_progress_bar()
    try:
        pipe = _load_pipeline(str(spec), path, allow_pickle, config)
        vae_dtype = torch.float32 if pipe.vae.config.get("force_upcast", True) else torch_dtype
        network = getattr(pipe, "transformer", None) or pipe.unet
        parts = [(network, torch_dtype), (pipe.text_encoder, torch_dtype), (pipe.vae, vae_dtype),
                 (getattr(pipe, "text_encoder_2", None), torch_dtype),
                 (getattr(pipe, "text_encoder_3", None), torch_dtype)]
        home = torch.device("cpu") if offload else dev  # offloaded parts wait in CPU memory
        for part, wanted in parts:
            if part is not None and (part.dtype != wanted or part.device != home):
                part.to(home, wanted)
        if offload:
            pipe.enable_model_cpu_offload(device=dev)
    finally:
        dlogging.set_verbosity(verbosity)
        tlogging.set_verbosity(tverbosity)
        dlogging.enable_progress_bar()
        tlogging.enable_progress_bar()
    pipe.set_progress_bar_config(disable=True)
    from npinv.flow_model import FLOW_PIPELINES, FlowModel

    if type(pipe).__name__ in FLOW_PIPELINES:
        # Transformer calls run eagerly (no CUDA graphs yet for this family): cuda_graphs has no effect.
        return FlowModel(pipe, name, dev, torch_dtype, edit_guidance=edit_guidance,
                         edit_self_replace=declared.edit_self_replace, max_sequence_length=declared.max_sequence_length)
    return Model(pipe, name, dev, torch_dtype, edit_guidance=edit_guidance, edit_self_replace=declared.edit_self_replace,
                 cuda_graphs=cuda_graphs and not offload)


# -- reading a model's configs before its weights -------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class ModelFacts:
    """What a model's config files say, read (and checked) before any weights load: enough to refuse
    a step count, offset or image size the model cannot honour before the slow part."""

    scheduler: dict[str, Any] | None = None  # the scheduler config
    vae_scale_factor: int | None = None
    kind: str | None = None  # "sd3" / "flux" for flow models; None: a UNet model (or unknown)
    timestep_distilled: bool = False  # FLUX.1-schnell: generation only
    patch: int = 1  # latent pixels per image token (FLUX: 2)

    @property
    def architecture(self) -> str:
        return "flow" if self.kind is not None else "unet"

    @property
    def size_multiple(self) -> int:
        """As :attr:`Model.size_multiple`; 8 when the VAE's config could not be read."""
        return max(SIZE_MULTIPLE, (self.vae_scale_factor or 1) * self.patch)

    def check_grid(self, steps: int, offset: int | None) -> None:
        """Refuse a step count or offset the scheduler cannot make a grid of (nothing when unread)."""
        if self.scheduler is not None:
            check_grid(self.scheduler, steps, offset)

    def check_invertible(self) -> None:
        if self.timestep_distilled:
            raise NpinvError(TIMESTEP_DISTILLED)


TIMESTEP_DISTILLED = ("this model is timestep-distilled (FLUX.1-schnell: 1-4 steps, no guidance embedding) and its "
                      "inversion does not reconstruct; invert with FLUX.1-dev or SD3 (npinv generate works with it)")


def is_flow_scheduler(config: Any) -> bool:
    """Whether a scheduler config is a flow-matching one (FlowMatchEulerDiscreteScheduler's: a ``shift``
    and no betas); a loaded scheduler's config has no ``_class_name``, so the keys decide there."""
    name = str(config.get("_class_name") or "")
    if name:
        return name.startswith("FlowMatch")
    return "shift" in config and "beta_start" not in config and "beta_schedule" not in config


def check_grid(config: Any, steps: int, offset: int | None) -> None:
    """The step grid of either family from its scheduler config: one line if it cannot be made."""
    if is_flow_scheduler(config):
        from npinv.flow_schedule import FlowSchedule

        if offset not in (None, 0):
            raise NpinvError(f"flow models have no timestep offset; drop --offset {offset} (or give 0)")
        # The token count only moves a dynamic shift; any count tells whether the grid can be made.
        FlowSchedule.from_scheduler_config(config, steps, image_seq_len=256)
        return
    Schedule.from_scheduler_config(config, steps, offset)


# Components every Stable Diffusion folder needs (SDXL adds text_encoder_2 and tokenizer_2, checked when listed).
REQUIRED_COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
# Flow families: SD3's T5 (text_encoder_3) is optional (listed [null, null] when dropped); FLUX's T5 is
# text_encoder_2 and its only prompt encoder besides CLIP's pooled vector, so it is required.
FLOW_REQUIRED_COMPONENTS = {
    "sd3": ("transformer", "vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "scheduler"),
    "flux": ("transformer", "vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "scheduler"),
}
_MODEL_COMPONENTS = ("unet", "transformer", "vae", "text_encoder", "text_encoder_2")  # torch modules: config.json
# Components npinv never loads (it passes safety_checker=None); their folders may be absent.
_SKIPPED_COMPONENTS = ("safety_checker", "feature_extractor", "image_encoder")


def _read_json(path: Path, what: str = "config") -> dict[str, Any]:
    """A JSON object from ``path``, or one line naming the file and what is wrong with it."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise NpinvError(f"{path}: missing (the model's {what})") from None
    except UnicodeDecodeError:
        raise NpinvError(f"{path}: not a text file (the model's {what} must be JSON)") from None
    except OSError as exc:
        raise NpinvError(f"{path}: cannot read the model's {what} ({exc.strerror or exc})") from None
    except json.JSONDecodeError as exc:
        raise NpinvError(f"{path}: not valid JSON ({exc.msg}, line {exc.lineno} column {exc.colno})") from None
    if not isinstance(data, dict):
        raise NpinvError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def check_scheduler_config(config: dict[str, Any], where: str) -> dict[str, Any]:
    """Refuse a scheduler config npinv cannot build a DDIM (or flow) grid from, naming ``where`` it came from."""
    from npinv.checks import finite

    if is_flow_scheduler(config):
        try:
            check_grid(config, 1, None)
        except NpinvError as exc:
            raise NpinvError(f"{where}: {exc}") from None
        except Exception as exc:  # diffusers rejects other bad values in its own words
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise NpinvError(f"{where}: not a usable flow scheduler config ({first})") from None
        return config
    T = config.get("num_train_timesteps", 1000)
    if isinstance(T, bool) or not isinstance(T, int) or T < 1:
        raise NpinvError(f"{where}: num_train_timesteps must be a positive whole number, got {T!r}")
    offset = config.get("steps_offset", 0)
    if isinstance(offset, bool) or not isinstance(offset, int) or not 0 <= offset < T:
        raise NpinvError(f"{where}: steps_offset must be a whole number in 0..{T - 1}, got {offset!r}")
    for key in ("beta_start", "beta_end"):
        if key in config:
            try:
                finite(config[key], key)
            except NpinvError as exc:
                raise NpinvError(f"{where}: {exc}") from None
    pred = config.get("prediction_type", "epsilon")
    if pred not in ("epsilon", "v_prediction"):
        raise NpinvError(f"{where}: prediction type {pred!r} is not supported (epsilon or v_prediction)")
    try:
        from diffusers import DDIMScheduler

        DDIMScheduler.from_config(config)
    except Exception as exc:  # diffusers/torch reject other bad values in their own words
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise NpinvError(f"{where}: not a usable scheduler config ({first})") from None
    return config


def _flow_kind(index: dict[str, Any]) -> str | None:
    from npinv.flow_model import FLOW_PIPELINES

    return FLOW_PIPELINES.get(str(index.get("_class_name", "")))


def _listed(index: dict[str, Any]) -> set[str]:
    """The components a model_index.json lists with a library and class (``[null, null]``: dropped)."""
    return {k for k, v in index.items() if not k.startswith("_") and isinstance(v, list) and len(v) == 2
            and v[0] is not None and v[1] is not None}


def check_index(index: dict[str, Any], where: str) -> set[str]:
    """The components an index lists, refusing one that lacks a component its family needs (a FLUX
    model without its T5 encoder: one line, before any weights load)."""
    listed, kind = _listed(index), _flow_kind(index)
    if kind == "flux" and not {"text_encoder_2", "tokenizer_2"} <= listed:
        raise NpinvError(f"{where}: this FLUX model has no T5 text encoder (text_encoder_2 and tokenizer_2), "
                         "which FLUX needs for every prompt; use the complete model folder")
    required = FLOW_REQUIRED_COMPONENTS[kind] if kind else REQUIRED_COMPONENTS
    what = {"sd3": "a Stable Diffusion 3 model", "flux": "a FLUX model"}.get(kind or "", "a Stable Diffusion model")
    for name in required:
        if name not in listed:
            raise NpinvError(f"{where}: no {name!r} component listed ({what} needs {', '.join(required)})")
    return listed


def check_model_folder(path: Path) -> ModelFacts:
    """Check a diffusers folder's index and component configs (not the weights) and return its facts.

    Each problem is one line naming the file: ``model_index.json`` not JSON, a component the index
    lists but the folder lacks (``no unet/``), a component's ``config.json`` not JSON, a scheduler
    config that cannot make a grid (``num_train_timesteps: -5``), a FLUX folder without T5."""
    index_path = path / "model_index.json"
    if not index_path.is_file():
        raise NpinvError(f"{path} is not a diffusers model folder (no model_index.json)")
    index = _read_json(index_path, "index")
    listed = check_index(index, str(index_path))
    kind = _flow_kind(index)
    for name in sorted(listed - set(_SKIPPED_COMPONENTS)):
        if not (path / name).is_dir():
            if kind == "flux" and name in ("text_encoder_2", "tokenizer_2"):
                raise NpinvError(f"{path}: the folder has no {name}/, FLUX's T5 text encoder, which FLUX needs "
                                 "for every prompt; download the complete model")
            raise NpinvError(f"{path}: the folder has no {name}/ (model_index.json lists a {name!r} component)")
    configs = {}
    for name in _MODEL_COMPONENTS:
        if name in listed:
            configs[name] = _read_json(path / name / "config.json")
    scheduler_file = path / "scheduler" / "scheduler_config.json"
    scheduler = check_scheduler_config(_read_json(scheduler_file), str(scheduler_file))
    channels = configs["vae"].get("block_out_channels")
    if not isinstance(channels, list) or not channels:
        raise NpinvError(f"{path / 'vae' / 'config.json'}: block_out_channels must be a non-empty list")
    return _facts(scheduler, 2 ** (len(channels) - 1), kind, configs.get("transformer"))


def _facts(scheduler: dict[str, Any] | None, vae_scale_factor: int | None, kind: str | None,
           transformer: dict[str, Any] | None) -> ModelFacts:
    transformer = transformer or {}
    distilled = kind == "flux" and not transformer.get("guidance_embeds", True)
    patch = 2 if kind == "flux" else int(transformer.get("patch_size", 1) or 1) if kind else 1
    return ModelFacts(scheduler, vae_scale_factor, kind, distilled, patch)


def model_facts(spec: str | Path | None = None, config: str | Path | None = None) -> ModelFacts:
    """The facts of the model ``load_model(spec, config=config)`` would load, from its configs only
    (the embedded model, a folder, a single file's ``config`` folder, or a hub id's configs: cached, or
    fetched alone when there is a network). A broken folder raises :class:`NpinvError` now; what cannot
    be read without the weights or the network is None and is checked after the load instead."""
    folder = embedded_model_path(spec) if _is_embedded(spec) else Path(str(spec)).expanduser()
    if folder.is_dir():
        return check_model_folder(folder)
    if folder.is_file() and folder.suffix.lower() == ".safetensors":
        # The file's family (from its header) against its config's, as the load checks it: a FLUX.1-dev file
        # with a schnell config is refused for what it is, not as a schnell model that cannot be inverted.
        index = _spec_index(str(spec), folder, config)
        _check_single_file_family(folder, _single_file_keys(folder), _flow_kind(index), index, config)
    if folder.is_file() and config is not None and Path(config).expanduser().is_dir():
        return check_model_folder(Path(config).expanduser())
    repo = str(config) if folder.is_file() and config is not None else str(spec)
    if _HUB_ID.match(repo):
        return _hub_facts(repo)
    return ModelFacts()


def _hub_facts(repo: str) -> ModelFacts:
    """A hub model's scheduler and VAE configs: from the local cache, else, when there is a network,
    fetched alone (a few KB, into the cache the load reads), so that the step and size checks refuse a
    run before the weights' download, not after it. Offline and uncached there is nothing to read: the
    checks that need no config (sizes a multiple of 8, steps in 1..1000) have run, and the load refuses
    at once (not in the cache) before any other work."""
    try:
        import huggingface_hub
        from huggingface_hub import constants, try_to_load_from_cache
    except ImportError:
        return ModelFacts()
    found = {}
    for key, name in (("index", "model_index.json"), ("scheduler", "scheduler/scheduler_config.json"),
                      ("vae", "vae/config.json"), ("transformer", "transformer/config.json")):
        if key == "transformer" and _flow_kind(found.get("index", {})) is None:
            continue  # a UNet model's: no transformer config to read
        try:
            cached = try_to_load_from_cache(repo, name)
        except Exception:  # an odd id or cache layout: the load will say what is wrong
            cached = None
        if not (isinstance(cached, str) and Path(cached).is_file()) and not constants.HF_HUB_OFFLINE:
            try:
                cached = huggingface_hub.hf_hub_download(repo, name)
            except Exception:  # no such repo or file, gated, no network: the load will say what is wrong
                cached = None
        if isinstance(cached, str) and Path(cached).is_file():
            found[key] = _read_json(Path(cached))
    if "index" in found:
        check_index(found["index"], f"{repo}: model_index.json")
    scheduler = found.get("scheduler")
    if scheduler is not None:
        check_scheduler_config(scheduler, f"{repo}: scheduler/scheduler_config.json")
    channels = found.get("vae", {}).get("block_out_channels")
    vsf = 2 ** (len(channels) - 1) if isinstance(channels, list) and channels else None
    return _facts(scheduler, vsf, _flow_kind(found.get("index", {})), found.get("transformer"))


def _hub_index(repo: str) -> dict[str, Any]:
    """A hub model's model_index.json from the cache (or fetched alone when there is a network); {} if none."""
    try:
        import huggingface_hub
        from huggingface_hub import constants, try_to_load_from_cache

        cached = try_to_load_from_cache(repo, "model_index.json")
        if not (isinstance(cached, str) and Path(cached).is_file()) and not constants.HF_HUB_OFFLINE:
            cached = huggingface_hub.hf_hub_download(repo, "model_index.json")
    except Exception:  # not cached, no network, odd id: the load will say what is wrong
        return {}
    return _read_json(Path(cached), "index") if isinstance(cached, str) and Path(cached).is_file() else {}


def _spec_index(spec: str, path: Path, config: str | Path | None) -> dict[str, Any]:
    """The model_index.json of what ``spec`` (with ``config`` for a single file) names, {} if unknown:
    what decides the family before the weights load."""
    if path.is_dir():
        return _read_json(path / "model_index.json", "index") if (path / "model_index.json").is_file() else {}
    if path.is_file():
        if config is None:
            return {}
        folder = Path(config).expanduser()
        if folder.is_dir():
            return _read_json(folder / "model_index.json", "index") if (folder / "model_index.json").is_file() else {}
        return _hub_index(str(config)) if _HUB_ID.match(str(config)) else {}
    return _hub_index(spec) if _HUB_ID.match(spec) else {}


def _absent(index: dict[str, Any], cls: Any) -> dict[str, None]:
    """The components an index lists as ``[null, null]`` (SD3 saved without T5): ``from_pretrained``
    refuses such a folder unless each is passed as None again."""
    import inspect

    params = inspect.signature(cls.__init__).parameters
    return {k: None for k, v in index.items() if v == [None, None] and k in params}


def _load_flow_pipeline(spec: str, path: Path, kind: str, index: dict[str, Any], config: str | Path | None):
    """StableDiffusion3Pipeline / FluxPipeline from a folder, a hub id or a single file (with ``config``)."""
    from diffusers import FluxPipeline, StableDiffusion3Pipeline

    cls = FluxPipeline if kind == "flux" else StableDiffusion3Pipeline
    absent = _absent(index, cls)
    if path.is_dir():
        return _call(lambda: cls.from_pretrained(path, **absent), spec)
    if not path.is_file():  # a hub id
        return _call(lambda: cls.from_pretrained(spec, **absent), spec)
    local = config is not None and Path(config).expanduser().is_dir()
    source = str(Path(config).expanduser()) if local else str(config)
    if kind == "flux":
        # FLUX checkpoints hold the transformer only; the rest comes from the config's folder or hub id.
        from diffusers import FluxTransformer2DModel

        def load():
            transformer = FluxTransformer2DModel.from_single_file(str(path), config=source, subfolder="transformer",
                                                                  local_files_only=local)
            return cls.from_pretrained(source, transformer=transformer, local_files_only=local, **absent)

        return _call(load, spec)
    # diffusers takes a part an SD3 file lacks from the config only when it finds it under diffusers' weight
    # names, which transformers' text encoders never have, and always reads the VAE from the file: so each
    # part the file lacks (sd3_medium.safetensors: the text encoders) is loaded from the config here.
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import LDM_VAE_KEYS, is_clip_sd3_model, is_open_clip_sd3_model, is_t5_in_single_file
    from transformers import CLIPTextModelWithProjection, T5EncoderModel

    keys = _single_file_keys(path) if path.suffix.lower() == ".safetensors" else None  # a pickle: as diffusers reads it
    held = {"vae": (AutoencoderKL, lambda k: any(key.startswith(tuple(LDM_VAE_KEYS)) for key in k)),
            "text_encoder": (CLIPTextModelWithProjection, is_clip_sd3_model),
            "text_encoder_2": (CLIPTextModelWithProjection, is_open_clip_sd3_model),
            "text_encoder_3": (T5EncoderModel, is_t5_in_single_file)}

    def load_sd3():
        parts = {name: part.from_pretrained(source, subfolder=name, local_files_only=local)
                 for name, (part, in_file) in held.items() if keys is not None and name not in absent and not in_file(keys)}
        return cls.from_single_file(str(path), config=source, local_files_only=local, **absent, **parts)

    return _call(load_sd3, spec)


def _pipeline_class(is_xl: bool):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    return StableDiffusionXLPipeline if is_xl else StableDiffusionPipeline


def _load_pipeline(spec: str, path: Path, allow_pickle: bool, config: str | Path | None):
    common = {"safety_checker": None, "requires_safety_checker": False}
    if path.is_file():
        _check_checkpoint_file(path, allow_pickle)
    index = _spec_index(spec, path, config)
    kind = _flow_kind(index)
    if path.is_file() and path.suffix.lower() == ".safetensors":
        kind = _check_single_file_family(path, _single_file_keys(path), kind, index, config)
    if kind is not None:
        if path.is_dir():
            check_model_folder(path)
        elif index:  # empty: a single file's hub config, not cached (the load says what is missing)
            check_index(index, f"{config if path.is_file() else spec}: model_index.json")
        return _load_flow_pipeline(spec, path, kind, index, config)
    if path.is_dir():
        check_model_folder(path)  # a broken index or config: one line naming the file, before the weights
        is_xl = "XL" in str(_read_json(path / "model_index.json", "index").get("_class_name", ""))
        return _call(lambda: _pipeline_class(is_xl).from_pretrained(path, **({} if is_xl else common)), spec)
    if path.is_file():
        suffix = path.suffix.lower()
        is_xl = _single_file_is_xl(path) if suffix == ".safetensors" else False
        kwargs: dict[str, Any] = {} if is_xl else dict(common)
        if config is not None:
            if Path(config).expanduser().is_dir():
                check_model_folder(Path(config).expanduser())
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


def _check_checkpoint_file(path: Path, allow_pickle: bool) -> None:
    suffix = path.suffix.lower()
    if suffix in PICKLE_SUFFIXES and not allow_pickle:
        raise NpinvError(
            f"{path.name} is a pickle checkpoint, which can run arbitrary code when loaded; "
            "convert it to .safetensors, or pass --allow-pickle (allow_pickle=True) if you trust it")
    if suffix != ".safetensors" and suffix not in PICKLE_SUFFIXES:
        raise NpinvError(f"{path.name}: unsupported checkpoint type {suffix!r} (use .safetensors or a folder)")


_FLOW_NAMES = {"sd3": "Stable Diffusion 3", "flux": "FLUX"}
_FLOW_CONFIG_EXAMPLES = {"sd3": "stabilityai/stable-diffusion-3-medium-diffusers", "flux": "black-forest-labs/FLUX.1-dev"}


def _check_single_file_family(path: Path, keys: frozenset[str], kind: str | None, index: dict[str, Any],
                              config: str | Path | None) -> str | None:
    """The flow family a .safetensors file's transformer keys say (diffusers' own markers), checked against
    its config's: an SD3 or FLUX file holds neither configs, tokenizers nor scheduler, so it needs
    ``config``; a config of another family would fail deep inside diffusers. Returns the family to load."""
    from diffusers.loaders.single_file_utils import CHECKPOINT_KEY_NAMES

    marks = {"sd3": CHECKPOINT_KEY_NAMES["sd3"] + CHECKPOINT_KEY_NAMES["sd35_large"], "flux": CHECKPOINT_KEY_NAMES["flux"]}
    found = next((family for family, names in marks.items() if any(name in keys for name in names)), None)
    if found is None and any(k.startswith("single_transformer_blocks.") for k in keys):
        found = "flux"  # a FluxTransformer2DModel's own state dict (diffusers' layout), which diffusers also reads
    if found == kind:
        if kind == "flux" and config is not None:
            _check_flux_guidance(path, keys, config)
        return kind
    if found is not None and config is None:
        raise NpinvError(f"{path.name} is a single-file {_FLOW_NAMES[found]} checkpoint, which holds no configs, "
                         "tokenizers or scheduler: give --model-config (config=) the diffusers folder or hub id of "
                         f"its model (for example {_FLOW_CONFIG_EXAMPLES[found]})")
    if found is not None and Path(config).expanduser().is_dir():
        check_model_folder(Path(config).expanduser())  # a broken folder: one line naming the file
    if found is not None and not index:
        return found  # a hub config not cached: the load says what is missing
    if found is None:
        raise NpinvError(f"{path.name} holds no {_FLOW_NAMES[str(kind)]} transformer, which --model-config {config} "
                         f"(a {_FLOW_NAMES[str(kind)]} model) needs; give the checkpoint's own model as --model-config")
    theirs = f"a {_FLOW_NAMES[kind]} model" if kind else "a Stable Diffusion (UNet) model"
    raise NpinvError(f"{path.name} is a {_FLOW_NAMES[found]} checkpoint, but --model-config {config} is {theirs}; "
                     "give the checkpoint's own model as --model-config")


def _check_flux_guidance(path: Path, keys: frozenset[str], config: str | Path) -> None:
    """A FLUX.1-dev file (guidance embedding) needs a dev config and a schnell file (none) a schnell config:
    diffusers builds the transformer from the config, so a dev config fails on the schnell file's missing
    weights (a meta-tensor error) and a schnell config silently drops the dev file's (a schnell model)."""
    wants = _config_transformer(config)
    if wants is None:
        return  # a hub config not cached: nothing to compare before the load
    guided = bool(wants.get("guidance_embeds", False))  # FluxTransformer2DModel's default
    has = any(k.removeprefix("model.diffusion_model.").startswith(("guidance_in.", "time_text_embed.guidance_embedder."))
              for k in keys)  # BFL's / ComfyUI's names, or diffusers' own
    if has == guided:
        return
    if has:
        raise NpinvError(f"{path.name} is a FLUX.1-dev-like checkpoint with guidance embedding, but --model-config "
                         f"{config} is a FLUX.1-schnell-like model (its transformer has guidance_embeds: false); give "
                         "a FLUX.1-dev config as --model-config (black-forest-labs/FLUX.1-dev or its diffusers folder)")
    raise NpinvError(f"{path.name} is a FLUX.1-schnell-like checkpoint without guidance embedding, but --model-config "
                     f"{config} is a FLUX.1-dev-like model (its transformer has guidance_embeds: true); give a "
                     "FLUX.1-schnell config as --model-config (black-forest-labs/FLUX.1-schnell or its diffusers folder)")


def _config_transformer(config: str | Path) -> dict[str, Any] | None:
    """The transformer config of a single file's ``config``: a folder's, or a hub id's cached copy (read
    before the load: ``model_facts`` fetches it into the cache when there is a network); None if unknown."""
    folder = Path(config).expanduser()
    if folder.is_dir():
        found: Path | None = folder / "transformer" / "config.json"
    elif _HUB_ID.match(str(config)):
        try:
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(str(config), "transformer/config.json")
        except Exception:  # an odd id or cache layout: the load will say what is wrong
            cached = None
        found = Path(cached) if isinstance(cached, str) else None
    else:
        found = None
    return _read_json(found) if found is not None and found.is_file() else None


def _single_file_keys(path: Path) -> frozenset[str]:
    """The tensor names of a .safetensors file (its header only)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as fh:
            return frozenset(fh.keys())
    except Exception as exc:  # corrupt header: report it as the user's file problem
        raise NpinvError(f"{path.name} is not a readable safetensors file ({exc})") from None


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
    except (OSError, ValueError, KeyError, RuntimeError) as exc:  # RuntimeError: mismatched weight shapes
        text = str(exc).strip()
        if "not fully cached locally" in text or "outgoing traffic has been disabled" in text:
            raise NpinvError(
                f"cannot load model {spec!r}: it is not in the local Hugging Face cache and the Hub cannot be "
                "reached (no network, or HF_HUB_OFFLINE=1); download it where there is a network "
                f"({HUB_DOWNLOAD} {spec}) or give --model a local folder") from None
        first = text.splitlines()[0] if text else type(exc).__name__
        first = first.replace(" Please check out the root cause in the stacktrace above.", "")  # none is shown
        raise NpinvError(f"cannot load model {spec!r}: {first}") from None
