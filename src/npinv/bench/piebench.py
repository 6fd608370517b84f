"""PIE-Bench runner: real-image inversion + Prompt-to-Prompt editing on a PIE-Bench-format folder.

The data set (``annotation_images/`` and ``mapping_file.json``, see ``docs/piebench.md``)
is read by :func:`load_piebench`; every entry is checked up front, with one-line errors that name
the entry. :func:`run_piebench` inverts each image once (DDIM, source prompt, seed 1234), edits
it with each method under the published settings (refine, cross-replace 0.4, self-replace 0.6,
local blend from ``blended_word``, reweight x2 of the target's bracketed words), saves each edit
as ``<out>/<method>/annotation_images/<input's relative path>.png`` and appends one row per
(image, method) to ``<out>/results.jsonl`` (resumable: a rerun skips finished rows).

Conventions where the published description leaves room (all in this module):

- Masks. The 512x512 run-length mask is decoded (1 = region to edit), resized to the evaluated
  size by nearest neighbour (pixel centres), and *then* the outermost rows and columns are set to
  1 (the published border rule, applied at the evaluated size so that it survives downscaling;
  at 512 px this is the published mask exactly). The runner applies the border rule in both
  metric conventions, so they differ only in how the metrics are aggregated.
- Images. Metrics compare the prepared input (:func:`npinv.service.prepare_file`: centre crop,
  resize to the model's side) with the edit as saved, both as 8-bit images scaled to [0, 1]: rescoring the saved files
  reproduces the rows. Inputs must be square (PIE-Bench's are 512x512), else the mask would not
  line up after the crop.
- ``parity=True`` (the published script): both images are multiplied by ``1 - mask`` and PSNR
  (data range 1), MSE and SSIM are computed over the whole image, zeros included.
- ``parity=False`` (default): PSNR and MSE over the unedited pixels only; SSIM is the mean of the
  SSIM map over the windows that lie entirely in the unedited region (so no edited pixel enters
  it); NaN when no such window exists, even if PSNR is defined.
- SSIM is :func:`npinv.metrics.ssim`'s (Gaussian 11 / 1.5, valid windows, scikit-image's sample
  covariance); the published script used torchmetrics, whose covariance normalisation differs,
  so its figures may differ in the last digits.
- All three are NaN when the unedited region is empty; means skip NaN (and, like
  :func:`npinv.bench.results.nanmean`, the infinite PSNR of an untouched region).
- Blend and reweight words are matched as whole space-separated words of the prompts with the
  brackets stripped (as the reference code does); a word that is not found (e.g. "dog," with its
  comma) is skipped and the row records what was used (``blend``, ``reweight_words``).
- Network metrics (structure distance with DINO ViT-B/8, LPIPS SqueezeNet, CLIP ViT-L/14) come from
  :mod:`npinv.bench.netmetrics` (``metrics=``; by default the published networks from the Hugging Face
  cache and LPIPS weights from ``$NPINV_LPIPS_WEIGHTS``, never downloaded). Those that cannot be loaded
  are null in the rows, ``unavailable`` names them, and one stderr line per run says why. With
  ``parity`` the structure distance gets 0-255 input and LPIPS averages over the whole masked image
  (both as published); by default [0, 1] input and LPIPS averaged over the unedited region.
- One output folder holds one set of settings (``settings.json``); other methods, types or a
  larger ``limit`` may be added to it later, other settings need another folder.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import re
import sys
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from npinv.bench.netmetrics import NetworkMetrics
from npinv.bench.results import group, markdown_table, nanmean
from npinv.errors import NpinvError
from npinv.io import save_image, tensor_to_image, write_text
from npinv.methods import get_method
from npinv.metrics import mse as _mse
from npinv.metrics import psnr as _psnr
from npinv.metrics import ssim as _ssim
from npinv.metrics import ssim_map
from npinv.model import Model
from npinv.parallel import Shard, ShardedResults
from npinv.service import edit, invert_one, prepare_file
from npinv.settings import EditSettings, InvertSettings

MASK_SIZE = 512
SEED = 1234
TYPE_NAMES = {
    "0": "random", "1": "change object", "2": "add object", "3": "delete object", "4": "change content",
    "5": "change pose", "6": "change color", "7": "change material", "8": "change background", "9": "change style",
}
METRICS = ("structure", "psnr", "lpips", "mse", "ssim", "clip_whole", "clip_edited")
_BRACKETED = re.compile(r"\[([^\[\]]*)\]")


# -- the data set ------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class PieItem:
    id: str
    image_path: Path  # absolute
    relative_path: str  # relative to annotation_images/
    source_prompt: str  # brackets stripped
    target_prompt: str
    source_words: tuple[str, ...]  # the words inside the brackets
    target_words: tuple[str, ...]
    blend: tuple[str, str] | None  # blended_word as (source word, target word)
    editing_type_id: str
    mask: list[int]  # run-length encoding [start, length, ...] over the flattened 512x512 image
    instruction: str = ""


def strip_brackets(text: str) -> tuple[str, tuple[str, ...]]:
    """("a [black cat] here" -> ("a black cat here", ("black", "cat"))); ValueError if unbalanced."""
    words = tuple(w for span in _BRACKETED.findall(text) for w in span.split())
    rest = _BRACKETED.sub("", text)
    if "[" in rest or "]" in rest:
        raise ValueError("unbalanced brackets")
    return " ".join(text.replace("[", "").replace("]", "").split()), words


def load_piebench(data_dir: str | Path) -> list[PieItem]:
    """The entries of a PIE-Bench folder, sorted by id, each checked (a clear error names the bad one)."""
    root = Path(data_dir)
    if not root.is_dir():
        raise NpinvError(f"PIE-Bench folder not found: {root}")
    mapping_path = root / "mapping_file.json"
    if not mapping_path.is_file():
        raise NpinvError(f"{root} has no mapping_file.json: is this a PIE-Bench folder?")
    try:
        mapping = json.loads(mapping_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise NpinvError(f"{mapping_path} is not valid JSON ({exc})") from None
    if not isinstance(mapping, dict) or not mapping:
        raise NpinvError(f"{mapping_path} must be a non-empty JSON object keyed by image id")
    images = root / "annotation_images"
    items = [_item(str(key), entry, images) for key, entry in sorted(mapping.items())]
    missing = [it for it in items if not it.image_path.is_file()]
    if missing:
        shown = ", ".join(f"{it.id} ({it.relative_path})" for it in missing[:3])
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise NpinvError(f"{len(missing)} image file(s) missing under {images}: {shown}{more}")
    return items


def _item(key: str, entry, images: Path) -> PieItem:
    def bad(why: str) -> NpinvError:
        return NpinvError(f"mapping_file.json entry {key}: {why}")

    if not isinstance(entry, dict):
        raise bad("not an object")
    for field in ("image_path", "original_prompt", "editing_prompt", "editing_type_id", "mask"):
        if field not in entry:
            raise bad(f"missing {field!r}")
    rel = entry["image_path"]
    if not isinstance(rel, str) or not rel.strip():
        raise bad("image_path must be a non-empty string")
    rel_path = Path(rel)
    if rel_path.is_absolute() or ".." in rel_path.parts:
        raise bad(f"image_path {rel!r} must be relative to annotation_images/")
    prompts = []
    for field in ("original_prompt", "editing_prompt"):
        if not isinstance(entry[field], str):
            raise bad(f"{field} must be a string")
        try:
            prompts.append(strip_brackets(entry[field]))
        except ValueError:
            raise bad(f"{field} has unbalanced brackets: {entry[field]!r}") from None
    type_id = str(entry["editing_type_id"]).strip()
    if not type_id.isdigit():
        raise bad(f"editing_type_id must be a number, not {entry['editing_type_id']!r}")
    blended = entry.get("blended_word") or ""
    if not isinstance(blended, str):
        raise bad("blended_word must be a string")
    blend_words = blended.split()
    if blend_words and len(blend_words) != 2:
        raise bad(f"blended_word must be 'SOURCE TARGET' (two words) or empty, not {blended!r}")
    mask = entry["mask"]
    try:
        _check_rle(mask)
    except ValueError as exc:
        raise bad(f"mask: {exc}") from None
    instruction = entry.get("editing_instruction") or ""
    return PieItem(
        id=key, image_path=(images / rel_path).resolve(), relative_path=rel_path.as_posix(),
        source_prompt=prompts[0][0], target_prompt=prompts[1][0], source_words=prompts[0][1],
        target_words=prompts[1][1], blend=(blend_words[0], blend_words[1]) if blend_words else None,
        editing_type_id=type_id, mask=[int(v) for v in mask], instruction=str(instruction))


def _check_rle(rle) -> None:
    if not isinstance(rle, list):
        raise ValueError("must be a list [start, length, ...]")
    if len(rle) % 2:
        raise ValueError(f"odd number of values ({len(rle)}): expected [start, length, ...] pairs")
    for v in rle:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v != int(v) or v < 0:
            raise ValueError(f"values must be non-negative integers, found {v!r}")


# -- masks -------------------------------------------------------------------------------------
def decode_mask(rle: list[int], size: int | tuple[int, int] = MASK_SIZE, parity_border: bool = True) -> np.ndarray:
    """Bool (H, W) mask from row-major runs ``[start, length, ...]`` (True = region to edit).

    Runs past the end are clipped, as in the published script; with ``parity_border`` the
    outermost rows and columns are set to True, as the published script does.
    """
    try:
        _check_rle(rle)
    except ValueError as exc:
        raise NpinvError(f"bad run-length mask: {exc}") from None
    h, w = (size, size) if isinstance(size, int) else size
    flat = np.zeros(h * w, dtype=bool)
    for start, length in zip(rle[::2], rle[1::2], strict=True):
        flat[int(start): int(start) + int(length)] = True
    mask = flat.reshape(h, w)
    return _with_border(mask) if parity_border else mask


def _with_border(mask: np.ndarray) -> np.ndarray:
    mask = mask.copy()
    mask[0, :] = mask[-1, :] = True
    mask[:, 0] = mask[:, -1] = True
    return mask


def mask_for(item: PieItem, height: int, width: int, parity_border: bool = True) -> np.ndarray:
    """The item's edit mask at the evaluated size: nearest-neighbour resize of the 512x512 mask,
    then (``parity_border``) the outermost rows and columns of the result set to True."""
    full = decode_mask(item.mask, MASK_SIZE, parity_border=False)
    rows = np.minimum(((np.arange(height) + 0.5) * MASK_SIZE / height).astype(int), MASK_SIZE - 1)
    cols = np.minimum(((np.arange(width) + 0.5) * MASK_SIZE / width).astype(int), MASK_SIZE - 1)
    mask = full[rows][:, cols]
    return _with_border(mask) if parity_border else mask


# -- metrics -----------------------------------------------------------------------------------
def unedited_metrics(source: np.ndarray, edited: np.ndarray, mask: np.ndarray, *, parity: bool = False) -> dict[str, float]:
    """PSNR, MSE and SSIM of two (H, W, 3) images in [0, 1] on the region outside ``mask``
    (True = edited); see the module docstring for the two conventions. NaN if nothing is unedited."""
    a = np.asarray(source, dtype=np.float64)
    b = np.asarray(edited, dtype=np.float64)
    keep = ~np.asarray(mask, dtype=bool)
    if a.shape != b.shape or a.shape[:2] != keep.shape:
        raise ValueError(f"shape mismatch: {a.shape}, {b.shape}, mask {keep.shape}")
    if not keep.any():
        return {"psnr": math.nan, "mse": math.nan, "ssim": math.nan}
    if parity:
        k = keep[..., None].astype(np.float64)
        am, bm = a * k, b * k
        return {"psnr": _psnr(am, bm), "mse": _mse(am, bm), "ssim": _ssim(am, bm)}
    err = float(((a - b) ** 2)[keep].mean())
    smap, window = ssim_map(a, b)
    inside = F.conv2d(torch.from_numpy(keep.astype(np.float64))[None, None],
                      torch.ones(1, 1, window, window, dtype=torch.float64))[0, 0].numpy() > window * window - 0.5
    ssim_value = float(smap[:, inside].mean()) if inside.any() else math.nan
    return {"psnr": math.inf if err == 0 else 10.0 * math.log10(1.0 / err), "mse": err, "ssim": ssim_value}


# -- the runner --------------------------------------------------------------------------------
def edit_words(item: PieItem, reweight: float) -> tuple[tuple[str, str] | None, dict[str, float]]:
    """The blend pair and reweight dict the published settings ask for, minus words not found
    as whole words in the prompts (they are skipped, not an error)."""
    src_words, tgt_words = item.source_prompt.split(), item.target_prompt.split()
    blend = item.blend if item.blend and item.blend[0] in src_words and item.blend[1] in tgt_words else None
    weights = {w: reweight for w in item.target_words if w in tgt_words} if reweight != 1.0 else {}
    return blend, weights


def run_piebench(model: Model, data_dir: str | Path, out_dir: str | Path, *, methods=("npi",), steps: int = 50,
                 guidance: float | None = None, offset: int | None = 0, controller: str = "refine", cross_replace: float = 0.4,
                 self_replace: float = 0.6, reweight: float = 2.0, types: Iterable[int | str] | None = None,
                 limit: int | None = None, parity: bool = False, progress: bool = False,
                 metrics: NetworkMetrics | None = None, shard: Shard | None = None) -> dict:
    """Invert and edit every selected PIE-Bench image with each method; returns the summary.

    ``guidance`` None: each method's published setting, :data:`PIEBENCH_GUIDANCE` (7.5) for the methods
    that sample an inversion and FlowEdit's paper target guidance for it (each row records its own).

    ``metrics``: the networks for structure, LPIPS and CLIP (default: :meth:`NetworkMetrics.load` on the
    model's device, from the local cache only)."""
    methods = tuple(get_method(m).name for m in methods)  # an unknown name is refused with one line
    if not methods:
        raise NpinvError("give at least one method")
    invert_settings = InvertSettings(steps=steps, offset=offset)
    invert_settings.validate()
    items = select_items(load_piebench(data_dir), types, limit)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    settings = {"steps": steps, "guidance": guidance, "offset": offset, "controller": controller,
                "cross_replace": cross_replace, "self_replace": self_replace, "reweight": reweight, "parity": parity,
                "seed": SEED, "model": model.name, "model_fingerprint": model.fingerprint}
    _check_settings(out / "settings.json", settings)
    results = ShardedResults(out, shard)  # under accelerate: every N-th image, merged at the end
    if metrics is None:
        metrics = NetworkMetrics.load(device=model.device)
    note = metrics.note()
    if note:
        print(f"npinv: note: {note}", file=sys.stderr)
    for n, item in enumerate(items):
        if not results.shard.owns(n):
            continue
        todo = [m for m in methods if _key(item, m) not in results]
        if not todo:
            continue
        with Image.open(item.image_path) as img:
            if img.width != img.height:
                raise NpinvError(f"{item.image_path}: PIE-Bench images are square, this one is {img.width}x{img.height}")
        prepared = prepare_file(item.image_path, model, invert_settings)
        source = _unit(prepared.image)
        mask = mask_for(item, source.shape[0], source.shape[1])
        blend, weights = edit_words(item, reweight)
        torch.manual_seed(SEED)
        # Only the clean latents when every method still to run is inversion-free (FlowEdit).
        encode_only = all(not get_method(m).needs_inversion for m in todo)
        inverted = invert_one(model, prepared, item.source_prompt, invert_settings, progress=progress,
                              encode_only=encode_only)
        for method in todo:
            torch.manual_seed(SEED)
            es = EditSettings(method=method, controller=controller, guidance=method_guidance(method, guidance, model),
                              cross_replace=cross_replace,
                              self_replace=self_replace, blend=blend, reweight=dict(weights))
            done = edit(model, [(inverted, [item.target_prompt])], es, progress=progress)[0]
            result = done.result
            picture = tensor_to_image(result.images[:1])
            save_image(picture, output_path(out, method, item))
            edited = np.asarray(picture, dtype=np.float64) / 255.0
            scores = unedited_metrics(source, edited, mask, parity=parity)
            network = metrics.compute(source, edited, mask, item.target_prompt, parity=parity)
            row = {
                "key": _key(item, method), "id": item.id, "method": method, "editing_type_id": item.editing_type_id,
                "image_path": item.relative_path, "source_prompt": item.source_prompt,
                "target_prompt": item.target_prompt, "blend": list(blend) if blend else None,
                "reweight_words": sorted(weights), **scores, **network,
                "unavailable": metrics.unavailable, "parity": parity, "unedited_fraction": float((~mask).mean()),
                # The edit call (NTI's optimisation included) and the image's one inversion, from their costs.
                "seconds": done.edit_cost.seconds, "invert_seconds": inverted.cost.seconds,
                "unet_calls": done.edit_cost.unet_calls, "unet_rows": done.edit_cost.unet_rows,
                "invert_unet_calls": inverted.cost.unet_calls, **_row_settings(settings), "guidance": es.guidance,
            }
            results.add(row)
    rows = results.merge()
    summary = summarize_piebench(rows)
    write_text(out / "summary.json", json.dumps(summary, indent=2, default=float))
    write_text(out / "table.md", piebench_table(summary))
    write_csv(rows, out / "results.csv")
    return summary


# The published PIE-Bench runs' guidance for the diffusion methods (NTI, NPI and ProxNPI papers).
PIEBENCH_GUIDANCE = 7.5


def method_guidance(method: str, guidance: float | None, model: Model) -> float:
    """The guidance an image is edited with: ``guidance`` when given, else the method's published setting."""
    if guidance is not None:
        return guidance
    own = get_method(method).default_guidance(getattr(model, "family", None))
    return PIEBENCH_GUIDANCE if own is None else own


def select_items(items: list[PieItem], types: Iterable[int | str] | None, limit: int | None) -> list[PieItem]:
    if types is not None:
        wanted = {str(t).strip() for t in types}
        items = [it for it in items if it.editing_type_id in wanted]
        if not items:
            raise NpinvError(f"no PIE-Bench entries of editing type {', '.join(sorted(wanted))}")
    if limit is not None:
        if limit < 1:
            raise NpinvError("limit must be at least 1")
        items = items[:limit]
    return items


def output_path(out: Path, method: str, item: PieItem) -> Path:
    path = out / method / "annotation_images" / Path(item.relative_path).with_suffix(".png")
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def _unit(image: torch.Tensor) -> np.ndarray:
    """(1, 3, H, W) in [-1, 1] -> (H, W, 3) in [0, 1] through 8 bits, as a saved file reads."""
    return np.asarray(tensor_to_image(image), dtype=np.float64) / 255.0


def _key(item: PieItem, method: str) -> str:
    return f"{item.id}|{method}"


def _row_settings(settings: dict) -> dict:
    return {k: settings[k] for k in ("steps", "guidance", "offset", "controller", "cross_replace", "self_replace",
                                     "reweight")}


def _check_settings(path: Path, settings: dict) -> None:
    if path.is_file():
        try:
            old = json.loads(path.read_text())
        except json.JSONDecodeError:
            old = None
        if old is not None and old != json.loads(json.dumps(settings)):
            diff = ", ".join(f"{k} {old.get(k)!r} -> {v!r}" for k, v in settings.items() if old.get(k) != v)
            raise NpinvError(f"{path.parent} holds a PIE-Bench run with other settings ({diff}); use another folder")
    write_text(path, json.dumps(settings, indent=2))


# -- summaries ---------------------------------------------------------------------------------
def _means(rows: list[dict]) -> dict:
    entry = {"n": len(rows)}
    for name in (*METRICS, "seconds", "invert_seconds", "unet_calls", "unet_rows"):
        entry[name] = nanmean(r.get(name) for r in rows)
    return entry


def summarize_piebench(rows: list[dict]) -> dict:
    """Per method, and per method x editing type: means that skip NaN (and null)."""
    by_method = []
    for (method,), items in sorted(group(rows, ("method",)).items()):
        by_method.append({"method": method, **_means(items)})
    by_type = []
    for (method, type_id), items in sorted(group(rows, ("method", "editing_type_id")).items(),
                                           key=lambda kv: (kv[0][0], int(kv[0][1]))):
        by_type.append({"method": method, "editing_type_id": type_id, **_means(items)})
    return {"methods": by_method, "by_type": by_type}


def piebench_table(summary: dict) -> str:
    """Markdown table at the published scales (structure and LPIPS x1e3, MSE x1e4, SSIM x1e2)."""
    header = ["method", "type", "n", "structure x1e3", "PSNR", "LPIPS x1e3", "MSE x1e4", "SSIM x1e2", "CLIP whole",
              "CLIP edited", "edit s", "UNet rows"]

    def line(r: dict, type_name: str) -> list:
        return [r["method"], type_name, r["n"], r["structure"] * 1e3, r["psnr"], r["lpips"] * 1e3, r["mse"] * 1e4,
                r["ssim"] * 1e2, r["clip_whole"], r["clip_edited"], r["seconds"], r["unet_rows"]]

    rows = [line(r, "all") for r in summary["methods"]]
    rows += [line(r, f"{r['editing_type_id']} {TYPE_NAMES.get(r['editing_type_id'], '')}".strip())
             for r in summary["by_type"]]
    return markdown_table(header, rows)


CSV_COLUMNS = ("id", "method", "editing_type_id", "image_path", *METRICS, "seconds", "invert_seconds", "unet_calls",
               "unet_rows", "steps", "guidance", "offset", "controller", "blend", "reweight_words")


def write_csv(rows: list[dict], path: str | Path) -> Path:
    """One line per image and method (sorted by id, then method); empty cells for null values."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for r in sorted(rows, key=lambda r: (r["id"], r["method"])):
        writer.writerow([_cell(r.get(c)) for c in CSV_COLUMNS])
    return write_text(path, buf.getvalue())


def _cell(v) -> str:
    if v is None:
        return ""
    if isinstance(v, list):
        return " ".join(map(str, v))
    return str(v)
