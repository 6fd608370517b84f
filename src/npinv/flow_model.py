"""Flow-matching pipelines (SD3 / SD3.5, FLUX.1) behind the calls the sampling loop and the inversion
schemes make on :class:`npinv.model.Model`: the counted network call returns the velocity, fp32.

What differs from the UNet family is kept here: the transformer's inputs (pooled projections; FLUX's
2x2 packed tokens, RoPE ids, ``t / 1000`` and its guidance embedding), the prompt encoders (two CLIP
encoders + T5 for SD3, CLIP pooled + T5 for FLUX) and the grid (:class:`npinv.flow_schedule.FlowSchedule`).
Latents stay ``(B, C, h, w)`` outside this module for both families: FLUX's packing happens inside
:meth:`FlowModel.unet_output`, so trajectories, inversion files and hooks look as they do for UNets.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import warnings
from pathlib import Path
from typing import Any

import torch

from npinv.checks import SIZE_MULTIPLE
from npinv.errors import NpinvError
from npinv.finite import FiniteWatch
from npinv.flow_schedule import FlowSchedule
from npinv.model import DEFAULT_EDIT_GUIDANCE, DEFAULT_SELF_REPLACE, Model, NpinvWarning, PromptEmbedding, UNetCounter

# model_index.json's ``_class_name`` -> family. Only the text-to-image pipelines: img2img/inpaint folders
# hold the same parts, but npinv loads the base class.
FLOW_PIPELINES = {"StableDiffusion3Pipeline": "sd3", "FluxPipeline": "flux"}
# The pipelines' defaults: T5 tokens (SD3 256, FLUX 512) and FLUX.1-dev's embedded guidance.
MAX_SEQUENCE_LENGTH = {"sd3": 256, "flux": 512}
DEFAULT_EMBEDDED_GUIDANCE = 3.5


def flow_family(folder: str | Path) -> str | None:
    """``"sd3"`` or ``"flux"`` from a diffusers folder's ``model_index.json``; None for anything else."""
    path = Path(folder) / "model_index.json"
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return FLOW_PIPELINES.get(index.get("_class_name", "")) if isinstance(index, dict) else None


def pack(z: torch.Tensor) -> torch.Tensor:
    """FLUX's tokens from latents (B, C, h, w): 2x2 patches, channel-major, ``(B, h/2 * w/2, 4 C)``."""
    b, c, h, w = z.shape
    if h % 2 or w % 2:
        raise NpinvError(f"FLUX packs 2x2 latent patches: a {h}x{w} latent has an odd side")
    return z.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def unpack(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """The inverse of :func:`pack` for an ``h`` x ``w`` latent."""
    b, _, d = tokens.shape
    c = d // 4
    return tokens.reshape(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)


def image_ids(h: int, w: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """RoPE ids of FLUX's packed image tokens: ``(0, row, column)`` per 2x2 patch, row-major."""
    ids = torch.zeros(h // 2, w // 2, 3)
    ids[..., 1] = torch.arange(h // 2)[:, None]
    ids[..., 2] = torch.arange(w // 2)[None, :]
    return ids.reshape(-1, 3).to(device=device, dtype=dtype)


class FlowModel:
    """A loaded SD3/SD3.5 or FLUX.1 pipeline and the calls inversion and editing make on it.

    ``embedded_guidance`` (FLUX.1-dev only): the guidance-embedding value of every call, inversion and
    sampling alike, so NPI's identity holds at any true-CFG scale; ``None`` on models without one."""

    def __init__(self, pipe: Any, name: str, device: torch.device, dtype: torch.dtype, *,
                 edit_guidance: float = DEFAULT_EDIT_GUIDANCE,
                 edit_self_replace: float | tuple[float, float] = DEFAULT_SELF_REPLACE,
                 embedded_guidance: float | None = DEFAULT_EMBEDDED_GUIDANCE, max_sequence_length: int | None = None) -> None:
        cls = type(pipe).__name__
        if cls not in FLOW_PIPELINES:
            raise NpinvError(f"{name}: a {cls} is not a flow-matching pipeline npinv knows "
                             f"({', '.join(FLOW_PIPELINES)})")
        self.pipe = pipe
        self.name = name
        self.kind = FLOW_PIPELINES[cls]
        self.device = device
        self.dtype = dtype
        self.edit_guidance = edit_guidance  # what edits default to, as Model's
        self.edit_self_replace = edit_self_replace
        self.transformer = pipe.transformer
        self.vae = pipe.vae
        self.counter = UNetCounter()
        self.finite = FiniteWatch(dtype)  # the transformer's non-finite checks, deferred inside a run
        self.max_sequence_length = MAX_SEQUENCE_LENGTH[self.kind] if max_sequence_length is None else max_sequence_length
        guided = self.kind == "flux" and bool(self.transformer.config.get("guidance_embeds", False))
        self.embedded_guidance = float(embedded_guidance) if guided and embedded_guidance is not None else None
        if guided and embedded_guidance is None:
            raise NpinvError(f"{name} embeds its guidance: give it a value (FLUX.1-dev's default is 3.5)")
        for part in self._networks():
            part.requires_grad_(False)
            part.eval()
        self.vae_scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        self.known_words = None

    # -- facts ----------------------------------------------------------------------------------
    @property
    def family(self) -> str:
        return self.kind

    @property
    def is_flow(self) -> bool:
        return True

    @property
    def architecture(self) -> str:
        return "flow"

    @property
    def network(self) -> Any:
        """The denoising network the counted calls run (here the transformer)."""
        return self.transformer

    @property
    def edit_tokenizer(self) -> Any:
        """The tokenizer whose tokens Prompt-to-Prompt's word indices address: SD3's CLIP (the first 77
        text rows), FLUX's T5 (its only token sequence)."""
        return self.pipe.tokenizer_2 if self.kind == "flux" else self.pipe.tokenizer

    @property
    def timestep_distilled(self) -> bool:
        """FLUX.1-schnell (no guidance embedding): made for 1-4 steps; its inversion is reported not to work."""
        return self.kind == "flux" and self.embedded_guidance is None

    @property
    def patch(self) -> int:
        """Latent pixels per side of one image token (SD3: the patch size; FLUX: 2, its packing)."""
        return 2 if self.kind == "flux" else int(self.transformer.config.patch_size)

    @property
    def latent_channels(self) -> int:
        """Channels of the (unpacked) latent: the VAE's (FLUX's transformer sees 4 x as many per token)."""
        return int(self.vae.config.latent_channels)

    @property
    def resolution(self) -> int:
        """The side the model was trained at, in pixels (the pipelines' default size)."""
        return int(self.pipe.default_sample_size) * self.vae_scale_factor

    @property
    def size_multiple(self) -> int:
        """Image sides must be multiples of this many pixels: the VAE's downscale times the token patch."""
        return max(SIZE_MULTIPLE, self.vae_scale_factor * self.patch)

    @property
    def fingerprint(self) -> str:
        """Identifies the weights well enough to refuse reusing an inversion on another model (as Model's)."""
        h = hashlib.sha256()
        arch = {k: v for k, v in dict(self.transformer.config).items() if not k.startswith("_")}
        h.update(json.dumps(arch, sort_keys=True, default=str).encode())
        # The embedded guidance shapes every velocity, so an inversion made at another value is another model's.
        h.update(repr(self.embedded_guidance).encode())
        for part in self._networks():
            params = list(part.parameters())
            for p in params[:4] + params[-4:]:
                h.update(repr(float(p.detach().double().sum())).encode())
        return h.hexdigest()[:16]

    def _networks(self) -> list[Any]:
        names = ("transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3")
        return [p for p in (getattr(self.pipe, n, None) for n in names) if p is not None]

    def image_seq_len(self, latent_size: tuple[int, int]) -> int:
        """Image tokens of an ``h`` x ``w`` latent (what FLUX's dynamic shift ``mu`` follows)."""
        h, w = latent_size
        return (h // self.patch) * (w // self.patch)

    def schedule(self, steps: int, offset: int | None = None, *,
                 latent_size: tuple[int, int] | None = None) -> FlowSchedule:
        """The pipeline's grid for ``steps`` steps; a resolution-dependent shift (FLUX.1-dev) needs
        ``latent_size``, the latent's ``(h, w)``, and inversion and sampling must pass the same."""
        if offset not in (None, 0):
            raise NpinvError(f"flow models have no timestep offset; got offset {offset}")
        config = self.pipe.scheduler.config
        seq = None
        if config.get("use_dynamic_shifting"):
            if latent_size is None:
                raise ValueError(f"{self.name} shifts its sigmas by resolution: pass latent_size")
            seq = self.image_seq_len(latent_size)
        return FlowSchedule.from_scheduler_config(config, steps, grid="flux" if self.kind == "flux" else "scheduler",
                                                  image_seq_len=seq)

    # -- text -----------------------------------------------------------------------------------
    def encode_prompt(self, text: str) -> PromptEmbedding:
        """The transformer's text inputs: hidden states (SD3: CLIP-L + CLIP-G padded, then T5, or zeros
        without T5; FLUX: T5) and the pooled vector (SD3: both CLIPs' projections; FLUX: CLIP-L's pool)."""
        self._check_prompt(text)
        with torch.no_grad():
            if self.kind == "sd3":
                hidden, _, pooled, _ = self.pipe.encode_prompt(
                    text, None, None, device=self.device, num_images_per_prompt=1, do_classifier_free_guidance=False,
                    max_sequence_length=self.max_sequence_length)
            else:
                hidden, pooled, _ = self.pipe.encode_prompt(text, None, device=self.device, num_images_per_prompt=1,
                                                            max_sequence_length=self.max_sequence_length)
        return PromptEmbedding(hidden.float(), pooled.float())

    def null_embedding(self) -> PromptEmbedding:
        """The empty prompt's embedding, as both pipelines encode a missing negative prompt."""
        return self.encode_prompt("")

    def _check_prompt(self, text: str) -> None:
        tok = self.pipe.tokenizer
        n = len(tok(text, truncation=False).input_ids)
        if n > tok.model_max_length:
            warnings.warn(f"prompt has {n} tokens, over CLIP's limit of {tok.model_max_length}; the CLIP "
                          "encoders see it truncated", NpinvWarning, stacklevel=3)

    # -- images: the same VAE arithmetic as the UNet family ((z - shift_factor) * scaling_factor) ---------
    encode_image = Model.encode_image
    decode = Model.decode

    # -- the transformer --------------------------------------------------------------------------
    def deferred_checks(self) -> contextlib.AbstractContextManager:
        """A run of calls (the loop, an inversion): their non-finite checks are read once, at its end
        (:class:`npinv.finite.FiniteWatch`), as :meth:`Model.deferred_checks`."""
        return self.finite.run()

    def unet_output(self, z: torch.Tensor, t: float, cond: PromptEmbedding) -> torch.Tensor:
        """The velocity (fp32, shaped like ``z``) at timestep ``t`` (``sigma * 1000``) for each row of ``z``
        with ``cond``'s rows, exactly as the diffusers pipeline calls the transformer. Counted like a UNet call."""
        rows = z.shape[0]
        self.counter.calls += 1
        self.counter.rows += rows
        x = z.to(self.device, self.dtype)
        hidden = cond.hidden.to(self.device, self.dtype)
        pooled = cond.pooled.to(self.device, self.dtype)
        if self.kind == "sd3":
            timestep = torch.full((rows,), t, device=self.device, dtype=torch.float32)
            out = self.transformer(hidden_states=x, timestep=timestep, encoder_hidden_states=hidden,
                                   pooled_projections=pooled, return_dict=False)[0]
        else:
            h, w = z.shape[-2:]
            # FluxPipeline: the timestep in the latents' dtype, then / 1000; the guidance embedding in fp32.
            timestep = torch.full((rows,), t, device=self.device, dtype=torch.float32).to(self.dtype) / 1000
            guidance = (None if self.embedded_guidance is None else
                        torch.full((rows,), self.embedded_guidance, device=self.device, dtype=torch.float32))
            text_ids = torch.zeros(hidden.shape[1], 3, device=self.device, dtype=self.dtype)
            out = self.transformer(hidden_states=pack(x), timestep=timestep, guidance=guidance,
                                   pooled_projections=pooled, encoder_hidden_states=hidden, txt_ids=text_ids,
                                   img_ids=image_ids(h, w, self.device, self.dtype), return_dict=False)[0]
            out = unpack(out, h, w)
        out = out.float()
        self.finite.note(out, f"the transformer's output at timestep {t:g}")
        return out
