"""The three network metrics of PIE-Bench: structure distance (DINO ViT-B/8), LPIPS (SqueezeNet), CLIP score.

Each network is read from a local folder/file or the Hugging Face cache; nothing is downloaded
unless ``allow_download=True`` is passed. A network that cannot be loaded is *unavailable*: its
fields are None and :attr:`NetworkMetrics.missing` holds one line that says why. Nothing is faked.

- Structure distance (Tumanyan et al.'s ``VitExtractor.get_keys_self_sim_from_input``, as the
  published PIE-Bench script uses it): the image is resized so its short side is 224 (long side at
  most 480; bilinear with antialias, as torchvision's ``Resize`` does), ImageNet normalised and run
  through DINO ViT-B/8; the keys of the last block's self-attention (all tokens, CLS included,
  heads concatenated, i.e. the key projection's output) give a tokens x tokens cosine
  self-similarity matrix; the distance is the mean squared difference of the two matrices.
  ``parity=True`` feeds 0-255 values to the normalisation (the published quirk), the default
  feeds [0, 1].
- LPIPS v0.1 with the SqueezeNet 1.1 backbone (plain torch, torchvision's layout), on [-1, 1]
  inputs. As published, both images are multiplied by ``1 - mask`` first (the edited region is
  black in both, so no edited pixel enters). ``parity=True`` averages each layer's distance map
  over the whole image, zeros included (the published figure); the default averages it over the
  unedited region only (the mask area-resized to each layer's grid as weights), the analogue of
  the runner's own PSNR/MSE. NaN when nothing is unedited.
- CLIP score (ViT-L/14) with the target prompt: ``100 * max(cos(image, text), 0)`` on the whole
  edited image and on the edited image multiplied by the mask (8-bit, as published). The
  preprocessing is CLIPImageProcessor's, by hand: short side resized to the model's image size
  (224) by bicubic with antialias and rounded to 8 bits (PIL's uint8 resize), centre crop, CLIP
  mean/std. ``clip_edited`` is NaN when the mask is empty.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import math
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

DINO_ID = "facebook/dino-vitb8"
CLIP_ID = "openai/clip-vit-large-patch14"
LPIPS_ENV = "NPINV_LPIPS_WEIGHTS"
NAMES = ("structure", "lpips", "clip")
FIELDS = ("structure", "lpips", "clip_whole", "clip_edited")
LABELS = {"structure": "structure distance (DINO ViT-B/8)", "lpips": "LPIPS (SqueezeNet)", "clip": "CLIP score (ViT-L/14)"}

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
LPIPS_SHIFT = (-0.030, -0.088, -0.188)  # lpips.ScalingLayer
LPIPS_SCALE = (0.458, 0.448, 0.450)
STRUCTURE_SIZE, STRUCTURE_MAX_SIZE = 224, 480  # the published Resize(224, max_size=480)
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class Unavailable(Exception):
    """A network that cannot be used; the message is the one line that says why."""


# -- image helpers -----------------------------------------------------------------------------
def _to_tensor(image) -> torch.Tensor:
    """(H, W, 3) array or tensor -> (1, 3, H, W) float32."""
    t = image if isinstance(image, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))
    if t.ndim != 3 or t.shape[-1] != 3:
        raise ValueError(f"expected an (H, W, 3) image, got shape {tuple(t.shape)}")
    return t.detach().float().permute(2, 0, 1).unsqueeze(0).contiguous()


def resize_short_side(x: torch.Tensor, size: int, mode: str, max_size: int | None = None) -> torch.Tensor:
    """Resize (B, C, H, W) so the short side is ``size`` (torchvision's ``Resize(size, max_size)`` rule)."""
    h, w = x.shape[-2:]
    short, long = min(h, w), max(h, w)
    new_short, new_long = size, int(size * long / short)
    if max_size is not None and new_long > max_size:
        new_short, new_long = int(max_size * new_short / new_long), max_size
    out = (new_short, new_long) if h <= w else (new_long, new_short)
    if out == (h, w):
        return x
    return F.interpolate(x, size=out, mode=mode, align_corners=False, antialias=True)


def _normalise(x: torch.Tensor, mean, std) -> torch.Tensor:
    m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x - m) / s


def structure_pixels(image, parity: bool = False) -> torch.Tensor:
    """DINO input (1, 3, h, w) from an (H, W, 3) image in [0, 1]: short side 224 (bilinear, antialias),
    ImageNet mean/std; ``parity`` scales to 0-255 first, as the published script (wrongly) does."""
    x = _to_tensor(image)
    if parity:
        x = x * 255.0
    x = resize_short_side(x, STRUCTURE_SIZE, "bilinear", STRUCTURE_MAX_SIZE)
    return _normalise(x, IMAGENET_MEAN, IMAGENET_STD)


def clip_pixels(image255, size: int = 224) -> torch.Tensor:
    """CLIPImageProcessor's preprocessing of an (H, W, 3) image in 0-255, by hand: short side to ``size``
    (bicubic, antialias, rounded to 8 bits like PIL), centre crop ``size``, /255, CLIP mean/std."""
    x = resize_short_side(_to_tensor(image255), size, "bicubic")
    x = x.round().clamp(0, 255)
    h, w = x.shape[-2:]
    top, left = (h - size) // 2, (w - size) // 2
    x = x[..., top: top + size, left: left + size]
    return _normalise(x / 255.0, CLIP_MEAN, CLIP_STD)


def cosine_self_similarity(x: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """(B, T, D) -> (B, T, T) cosine similarities (the reference's ``attn_cosine_sim``)."""
    norm = x.norm(dim=-1, keepdim=True)
    return (x @ x.transpose(-1, -2)) / torch.clamp(norm @ norm.transpose(-1, -2), min=eps)


def clip_score(image_emb: torch.Tensor, text_emb: torch.Tensor) -> torch.Tensor:
    """``100 * max(cos, 0)`` between (N, P) image and (1 or N, P) text embeddings -> (N,)."""
    cos = F.cosine_similarity(image_emb.float(), text_emb.float(), dim=-1)
    return 100.0 * cos.clamp(min=0.0)


# -- DINO keys ---------------------------------------------------------------------------------
def last_key_projection(vit: nn.Module) -> nn.Linear:
    """The key projection of the last transformer block (``k_proj``, or ``key`` in older transformers)."""
    keys = [m for name, m in vit.named_modules() if name.rsplit(".", 1)[-1] in ("k_proj", "key") and isinstance(m, nn.Linear)]
    if not keys:
        raise Unavailable(f"{type(vit).__name__} has no key projection (k_proj/key): not a ViT?")
    return keys[-1]


@torch.no_grad()
def keys_self_similarity(vit: nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    """(1, T, T) cosine self-similarity of the last block's keys (all tokens, heads concatenated)."""
    store: list[torch.Tensor] = []
    handle = last_key_projection(vit).register_forward_hook(lambda _m, _i, out: store.append(out))
    try:
        size = getattr(vit.config, "image_size", None)
        interpolate = tuple(pixels.shape[-2:]) != (size, size)
        vit(pixel_values=pixels, interpolate_pos_encoding=interpolate)
    finally:
        handle.remove()
    return cosine_self_similarity(store[-1].float())


# -- LPIPS (SqueezeNet 1.1 + v0.1 linear heads) ------------------------------------------------
class Fire(nn.Module):
    """torchvision's SqueezeNet Fire module (same attribute names, so its weights load)."""

    def __init__(self, inplanes: int, squeeze: int, expand1x1: int, expand3x3: int) -> None:
        super().__init__()
        self.squeeze = nn.Conv2d(inplanes, squeeze, kernel_size=1)
        self.squeeze_activation = nn.ReLU()
        self.expand1x1 = nn.Conv2d(squeeze, expand1x1, kernel_size=1)
        self.expand1x1_activation = nn.ReLU()
        self.expand3x3 = nn.Conv2d(squeeze, expand3x3, kernel_size=3, padding=1)
        self.expand3x3_activation = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.squeeze_activation(self.squeeze(x))
        return torch.cat([self.expand1x1_activation(self.expand1x1(x)), self.expand3x3_activation(self.expand3x3(x))], 1)


def squeezenet1_1_features() -> nn.Sequential:
    """``torchvision.models.squeezenet1_1().features``, module for module."""
    return nn.Sequential(
        nn.Conv2d(3, 64, kernel_size=3, stride=2), nn.ReLU(), nn.MaxPool2d(kernel_size=3, stride=2, ceil_mode=True),
        Fire(64, 16, 64, 64), Fire(128, 16, 64, 64), nn.MaxPool2d(kernel_size=3, stride=2, ceil_mode=True),
        Fire(128, 32, 128, 128), Fire(256, 32, 128, 128), nn.MaxPool2d(kernel_size=3, stride=2, ceil_mode=True),
        Fire(256, 48, 192, 192), Fire(384, 48, 192, 192), Fire(384, 64, 256, 256), Fire(512, 64, 256, 256),
    )


LPIPS_TAPS = (1, 4, 7, 9, 10, 11, 12)  # ends of lpips' slices 1..7 (relu1 .. relu7)
LPIPS_CHANNELS = (64, 128, 256, 384, 384, 512, 512)


class LPIPSSqueeze(nn.Module):
    """LPIPS v0.1 with SqueezeNet 1.1: state dict ``features.*`` (torchvision) + ``lin0..lin6.weight``."""

    def __init__(self) -> None:
        super().__init__()
        self.features = squeezenet1_1_features()
        for i, c in enumerate(LPIPS_CHANNELS):
            setattr(self, f"lin{i}", nn.Conv2d(c, 1, kernel_size=1, bias=False))
        self.register_buffer("shift", torch.tensor(LPIPS_SHIFT).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(LPIPS_SCALE).view(1, 3, 1, 1), persistent=False)

    def layer_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = (x - self.shift) / self.scale
        out = []
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in LPIPS_TAPS:
                out.append(x)
        return out

    def forward(self, in0: torch.Tensor, in1: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
        """Distance (B,) of two (B, 3, H, W) batches in [-1, 1]. Each layer's map is averaged over space
        (lpips' ``spatial_average``) or, given ``weight`` (B, 1, H, W), weighted by it area-resized to the layer."""
        total = torch.zeros(in0.shape[0], device=in0.device)
        for k, (f0, f1) in enumerate(zip(self.layer_features(in0), self.layer_features(in1), strict=True)):
            n0 = f0 / (f0.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            n1 = f1 / (f1.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            d = getattr(self, f"lin{k}")((n0 - n1) ** 2)
            if weight is None:
                total = total + d.mean(dim=(1, 2, 3))
            else:
                w = F.adaptive_avg_pool2d(weight.to(d.dtype), d.shape[-2:])
                total = total + (d * w).sum(dim=(1, 2, 3)) / w.sum(dim=(1, 2, 3))
        return total


def lpips_state_keys() -> list[str]:
    """The keys :class:`LPIPSSqueeze` needs (torchvision's names for the backbone)."""
    return list(LPIPSSqueeze().state_dict())


_LPIPS_RENAMES = (
    (r"(?:^|.*\.)slice\d+\.(\d+\..+)$", r"features.\1"),  # lpips: net.slice2.3.squeeze.weight
    (r"(?:^|.*\.)(features\.\d+\..+)$", r"\1"),  # torchvision (or any prefix before it)
    (r"(?:^|.*\.)(lin\d)\.model\.\d+\.weight$", r"\1.weight"),  # lpips: lin0.model.1.weight (Dropout, Conv)
    (r"(?:^|.*\.)(lin\d)\.weight$", r"\1.weight"),
)


def _lpips_key(key: str) -> str | None:
    """A key of torchvision's squeezenet1_1, lpips' LPIPS / v0.1 heads or torchmetrics' wrapper, in our names;
    '' for keys to ignore (classifier, scaling layer), None if unknown."""
    if "scaling_layer." in key or key.startswith("classifier.") or ".classifier." in key:
        return ""
    for pattern, repl in _LPIPS_RENAMES:
        if re.match(pattern, key):
            return re.sub(pattern, repl, key)
    return None


def read_lpips_state(paths: str | Path | Sequence[str | Path], allow_pickle: bool = False) -> dict[str, torch.Tensor]:
    """The LPIPS state dict from one file or several merged (e.g. torchvision's SqueezeNet and lpips' heads),
    in :class:`LPIPSSqueeze`'s names; raises :class:`Unavailable` with one line on any problem."""
    files = [Path(paths)] if isinstance(paths, (str, Path)) else [Path(p) for p in paths]
    state: dict[str, torch.Tensor] = {}
    for path in files:
        if not path.is_file():
            raise Unavailable(f"LPIPS weights file not found: {path}")
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            try:
                raw = load_file(str(path))
            except Exception as exc:  # noqa: BLE001 - any reader error makes the metric unavailable
                raise Unavailable(f"cannot read {path}: {_one_line(exc)}") from None
        elif not allow_pickle:
            raise Unavailable(f"{path} is not a .safetensors file; pickled weights (.pth) load only with allow_pickle=True")
        else:
            try:
                raw = torch.load(str(path), map_location="cpu", weights_only=True)
            except Exception as exc:  # noqa: BLE001
                raise Unavailable(f"cannot read {path}: {_one_line(exc)}") from None
            if isinstance(raw, dict) and isinstance(raw.get("state_dict"), dict):
                raw = raw["state_dict"]
            if not isinstance(raw, dict):
                raise Unavailable(f"{path} does not hold a state dict")
        unknown = []
        for key, value in raw.items():
            name = _lpips_key(key)
            if name is None:
                unknown.append(key)
            elif name:
                state[name] = value
        if unknown:
            raise Unavailable(f"{path} holds {len(unknown)} key(s) that are not SqueezeNet 1.1 / LPIPS weights "
                              f"(e.g. {unknown[0]!r})")
    missing = [k for k in lpips_state_keys() if k not in state]
    if missing:
        raise Unavailable(f"{', '.join(map(str, files))} lack(s) {len(missing)} of the {len(lpips_state_keys())} LPIPS "
                          f"weights (e.g. {missing[0]}): needs SqueezeNet 1.1 features and LPIPS v0.1 lin0..lin6")
    return state


def load_lpips(paths, device: torch.device | str = "cpu", allow_pickle: bool = False) -> LPIPSSqueeze:
    net = LPIPSSqueeze()
    try:
        net.load_state_dict(read_lpips_state(paths, allow_pickle))
    except RuntimeError as exc:  # shape mismatch
        raise Unavailable(f"LPIPS weights do not fit SqueezeNet 1.1: {_one_line(exc)}") from None
    return net.to(device).eval().requires_grad_(False)


# -- loading the transformers models -----------------------------------------------------------
def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return (text[:200] + "...") if len(text) > 200 else text or type(exc).__name__


def _source(spec: str | Path | None, default: str) -> tuple[str, bool]:
    """(what to pass to from_pretrained, whether it is a local path)."""
    spec = default if spec is None else spec
    path = Path(spec).expanduser()
    if path.exists():
        return str(path), True
    if isinstance(spec, str) and _HUB_ID.match(spec) and not spec.startswith("."):
        return spec, False
    raise Unavailable(f"{spec}: no such file or folder")


@contextlib.contextmanager
def _quiet_transformers():
    from transformers.utils import logging

    level, bars = logging.get_verbosity(), logging.is_progress_bar_enabled()
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        logging.set_verbosity(level)
        if bars:
            logging.enable_progress_bar()


def _pretrained(loader, source: str, local: bool, allow_download: bool, model: bool = True, **kwargs):
    """``loader(source)`` offline; a model must have every weight in the checkpoint (none left random)."""
    if model:
        kwargs["output_loading_info"] = True
    try:
        with _quiet_transformers():
            loaded = loader(source, local_files_only=not allow_download, **kwargs)
    except Exception as exc:  # noqa: BLE001 - a model that does not load is unavailable, with its reason
        if not local and not allow_download and not _in_cache(source):
            raise Unavailable(f"{source} is not in the Hugging Face cache (download it once, or give a local folder)") from None
        raise Unavailable(f"cannot load {source}: {_one_line(exc)}") from None
    if not model:
        return loaded
    net, info = loaded
    missing = sorted(info.get("missing_keys") or [])
    if missing:
        raise Unavailable(f"{source} lacks {len(missing)} weight(s) of {type(net).__name__} (e.g. {missing[0]}): "
                          "wrong checkpoint?")
    return net


def _in_cache(repo_id: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    except Exception:  # noqa: BLE001
        return False


def load_dino(spec=None, device="cpu", allow_download: bool = False):
    from transformers import ViTModel

    source, local = _source(spec, DINO_ID)
    vit = _pretrained(ViTModel.from_pretrained, source, local, allow_download, add_pooling_layer=False)
    last_key_projection(vit)
    return vit.to(device).float().eval().requires_grad_(False)


def load_clip(spec=None, device="cpu", allow_download: bool = False):
    from transformers import CLIPModel, CLIPTokenizer

    source, local = _source(spec, CLIP_ID)
    model = _pretrained(CLIPModel.from_pretrained, source, local, allow_download)
    tokenizer = _pretrained(CLIPTokenizer.from_pretrained, source, local, allow_download, model=False)
    return model.to(device).float().eval().requires_grad_(False), tokenizer


def _embedding(out) -> torch.Tensor:
    """transformers 5 returns an output object from get_*_features (projected pooler_output); 4.x a tensor."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


# -- the bundle ----------------------------------------------------------------------------------
@dataclasses.dataclass
class NetworkMetrics:
    """The loaded networks and, for each of ``structure``, ``lpips``, ``clip`` that is not, why (one line)."""

    dino: Any = None
    lpips: LPIPSSqueeze | None = None
    clip: Any = None
    clip_tokenizer: Any = None
    device: torch.device = dataclasses.field(default_factory=lambda: torch.device("cpu"))
    missing: dict[str, str] = dataclasses.field(default_factory=dict)
    _source_cache: dict = dataclasses.field(default_factory=dict, repr=False)

    @classmethod
    def load(cls, structure: str | Path | None | bool = None, lpips=None, clip: str | Path | None | bool = None,
             device: str | torch.device | None = None, *, allow_pickle: bool = False,
             allow_download: bool = False) -> NetworkMetrics:
        """Load what can be loaded. ``structure``/``clip``: a folder or hub id (None: the published model,
        from the cache); ``lpips``: a weights file or a list of files (None: ``$NPINV_LPIPS_WEIGHTS``, several
        separated by ``os.pathsep``); ``False`` skips a metric. Never raises for a missing network."""
        if device is None:
            from npinv.model import default_device

            device = default_device()
        metrics = cls(device=torch.device(device))
        if structure is False:
            metrics.missing["structure"] = "not requested"
        else:
            try:
                metrics.dino = load_dino(structure, metrics.device, allow_download)
            except Unavailable as exc:
                metrics.missing["structure"] = str(exc)
        if lpips is False:
            metrics.missing["lpips"] = "not requested"
        else:
            if lpips is None and os.environ.get(LPIPS_ENV):
                lpips = [p for p in os.environ[LPIPS_ENV].split(os.pathsep) if p]
            if not lpips:
                metrics.missing["lpips"] = (f"no weights file (a safetensors state dict of SqueezeNet 1.1 + LPIPS v0.1 "
                                            f"lin0..lin6): pass one or set {LPIPS_ENV}")
            else:
                try:
                    metrics.lpips = load_lpips(lpips, metrics.device, allow_pickle)
                except Unavailable as exc:
                    metrics.missing["lpips"] = str(exc)
        if clip is False:
            metrics.missing["clip"] = "not requested"
        else:
            try:
                metrics.clip, metrics.clip_tokenizer = load_clip(clip, metrics.device, allow_download)
            except Unavailable as exc:
                metrics.missing["clip"] = str(exc)
        return metrics

    @classmethod
    def none(cls, reason: str = "not requested") -> NetworkMetrics:
        return cls(missing=dict.fromkeys(NAMES, reason))

    @property
    def unavailable(self) -> list[str]:
        return [n for n in NAMES if n in self.missing]

    def note(self) -> str | None:
        """One line naming each metric that will not be computed and why; None if all are available."""
        if not self.missing:
            return None
        parts = "; ".join(f"{LABELS[n]}: {self.missing[n]}" for n in self.unavailable)
        return f"PIE-Bench network metrics not computed (null in the results): {parts}"

    # -- the metrics ---------------------------------------------------------------------------
    def structure_distance(self, source, edited, parity: bool = False) -> float:
        a = self._source_self_similarity(source, parity)
        b = keys_self_similarity(self.dino, structure_pixels(edited, parity).to(self.device))
        return float(((a - b) ** 2).mean())

    def _source_self_similarity(self, source, parity: bool) -> torch.Tensor:
        # The source is scored against every method's edit: keep its matrix for the next call.
        arr = source.detach().cpu().numpy() if isinstance(source, torch.Tensor) else np.asarray(source)
        key = (hashlib.sha1(np.ascontiguousarray(arr, dtype=np.float32).tobytes()).hexdigest(), arr.shape, parity)
        if key not in self._source_cache:
            self._source_cache.clear()
            self._source_cache[key] = keys_self_similarity(self.dino, structure_pixels(arr, parity).to(self.device))
        return self._source_cache[key]

    @torch.no_grad()
    def lpips_distance(self, source, edited, mask, parity: bool = False) -> float:
        keep = torch.from_numpy(~np.asarray(mask, dtype=bool)).float()[None, None]
        if not keep.any():
            return math.nan
        keep = keep.to(self.device)
        a = _to_tensor(source).to(self.device) * keep * 2 - 1
        b = _to_tensor(edited).to(self.device) * keep * 2 - 1
        return float(self.lpips(a, b, None if parity else keep)[0])

    @torch.no_grad()
    def text_embedding(self, prompt: str) -> torch.Tensor:
        limit = self.clip.config.text_config.max_position_embeddings
        tokens = self.clip_tokenizer([prompt], padding=True, truncation=True, max_length=limit, return_tensors="pt")
        return _embedding(self.clip.get_text_features(input_ids=tokens["input_ids"].to(self.device),
                                                      attention_mask=tokens["attention_mask"].to(self.device)))

    @torch.no_grad()
    def image_embeddings(self, images255: Sequence) -> torch.Tensor:
        size = self.clip.config.vision_config.image_size
        pixels = torch.cat([clip_pixels(im, size) for im in images255]).to(self.device)
        return _embedding(self.clip.get_image_features(pixel_values=pixels))

    def clip_scores(self, edited, mask, prompt: str) -> tuple[float, float]:
        """(whole edited image, edited image x mask) CLIP scores with ``prompt``; 8-bit images as published."""
        img = np.rint(np.asarray(edited, dtype=np.float64) * 255.0).clip(0, 255)
        m = np.asarray(mask, dtype=bool)
        scores = clip_score(self.image_embeddings([img, img * m[..., None]]), self.text_embedding(prompt))
        return float(scores[0]), float(scores[1]) if m.any() else math.nan

    def compute(self, source, edited, mask, target_prompt: str, parity: bool = False) -> dict[str, float | None]:
        """``structure``, ``lpips``, ``clip_whole``, ``clip_edited`` of two (H, W, 3) images in [0, 1] and
        the (H, W) edit mask (True = edited); None for each unavailable metric."""
        source, edited = np.asarray(source, dtype=np.float64), np.asarray(edited, dtype=np.float64)
        mask = np.asarray(mask, dtype=bool)
        if source.shape != edited.shape or source.shape[:2] != mask.shape:
            raise ValueError(f"shape mismatch: {source.shape}, {edited.shape}, mask {mask.shape}")
        out: dict[str, float | None] = dict.fromkeys(FIELDS)
        if self.dino is not None:
            out["structure"] = self.structure_distance(source, edited, parity)
        if self.lpips is not None:
            out["lpips"] = self.lpips_distance(source, edited, mask, parity)
        if self.clip is not None:
            out["clip_whole"], out["clip_edited"] = self.clip_scores(edited, mask, target_prompt)
        return out
