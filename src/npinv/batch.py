"""Edit many images from a manifest, resumably, in one process or several.

A manifest is JSON Lines, one object per image::

    {"image": "cat.png", "source": "a cat", "targets": ["a dog", "a fox"], "guidance": 2.5}

(``target`` for a single one; optional ``name`` and any setting of :mod:`npinv.settings` by name),
or CSV with the columns ``image,source,target`` and optional settings columns. Image paths are
relative to the manifest. The whole manifest is checked before any model work: a bad row is
reported with its line number and nothing runs.

Every (row, target) is one edit with a stable key; ``OUT/results.jsonl`` gets one row per
finished edit, written after its image, so a rerun skips what is done and a killed run loses no
finished edit. Rows that share an image, source prompt and schedule share one inversion; edits
with the same settings are batched, ``batch_size`` images per UNet call. Under accelerate or
torchrun each process takes every N-th source image (see :mod:`npinv.parallel`).
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from npinv.cache import InversionCache
from npinv.cost import Meter
from npinv.editing import check_edit
from npinv.errors import NpinvError
from npinv.io import load_image, remove_stale_temporaries, save_image, tensor_to_image
from npinv.methods import check_scheme, get_method
from npinv.model import Model
from npinv.parallel import FolderLock, Shard, ShardedResults
from npinv.service import InversionKey, Source, edit, invert, prepare_file
from npinv.settings import EditSettings, InvertSettings, as_json, from_text, from_value, specs

ROW_KEYS = {"image", "source", "target", "targets", "name"}
EDIT_KEYS = tuple(f.name for f, _ in specs(EditSettings))
INVERT_KEYS = tuple(f.name for f, _ in specs(InvertSettings))


@dataclasses.dataclass(frozen=True)
class ManifestRow:
    line: int
    image: Path
    source: str
    targets: tuple[str, ...]
    edit: EditSettings
    invert: InvertSettings
    name: str
    image_sha256: str


@dataclasses.dataclass(frozen=True)
class EditItem:
    """One edit: a row's ``k``-th target, with the keys of the inversion and the edit call it shares."""

    row: ManifestRow
    k: int
    key: str
    output: Path
    inv_key: str
    set_key: str

    @property
    def target(self) -> str:
        return self.row.targets[self.k]


@dataclasses.dataclass
class BatchReport:
    total: int
    done_before: int
    done_now: int
    results: Path
    seconds: float
    unet_calls: int
    shard: str


# -- the manifest -------------------------------------------------------------------------------
def read_manifest(path: str | Path, edit_defaults: EditSettings | None = None,
                  invert_defaults: InvertSettings | None = None) -> list[ManifestRow]:
    """Parse and check a whole manifest; the first bad row raises with its line number. A row's
    settings override the defaults (the command line's flags), key by key."""
    path = Path(path)
    if not path.is_file():
        raise NpinvError(f"no such manifest: {path}")
    edit_defaults = edit_defaults or EditSettings()
    invert_defaults = invert_defaults or InvertSettings()
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise NpinvError(f"{path}: cannot read the manifest ({exc})") from None
    is_csv = path.suffix.lower() == ".csv"
    raw = _csv_rows(text) if is_csv else _jsonl_rows(path, text)
    rows, errors = [], []
    for line, obj in raw:
        try:
            rows.append(_check_row(obj, line, path.parent, edit_defaults, invert_defaults, text=is_csv))
        except NpinvError as exc:
            errors.append(f"{path.name}:{line}: {exc}")
    if errors:
        more = f" (and {len(errors) - 1} more bad row{'s' if len(errors) > 2 else ''})" if len(errors) > 1 else ""
        raise NpinvError(errors[0] + more)
    if not rows:
        raise NpinvError(f"{path}: the manifest has no rows")
    return rows


def _jsonl_rows(path: Path, text: str) -> list[tuple[int, Any]]:
    out = []
    for line, content in enumerate(text.splitlines(), start=1):
        if not content.strip():
            continue
        try:
            out.append((line, json.loads(content)))
        except json.JSONDecodeError as exc:
            raise NpinvError(f"{path.name}:{line}: not valid JSON ({exc.msg})") from None
    return out


def _csv_rows(text: str) -> list[tuple[int, Any]]:
    """CSV cells are text, read by each setting's own text rule (as the command line's flags)."""
    reader = csv.DictReader(text.splitlines())
    out = []
    for row in reader:
        obj: dict[str, Any] = {}
        for key, value in row.items():
            if key is None:
                obj["__extra__"] = value
            elif value not in (None, ""):
                obj[key] = value
        out.append((reader.line_num, obj))
    return out


def _check_row(obj: Any, line: int, base: Path, edit_defaults: EditSettings, invert_defaults: InvertSettings, *,
               text: bool = False) -> ManifestRow:
    if not isinstance(obj, dict):
        raise NpinvError("a row must be a JSON object")
    if "__extra__" in obj:
        raise NpinvError("more cells than columns")
    known = ROW_KEYS | set(EDIT_KEYS) | set(INVERT_KEYS)
    unknown = sorted(set(obj) - known)
    if unknown:
        raise NpinvError(f"unknown key {unknown[0]!r} (known: {', '.join(sorted(known))})")
    for key in ("image", "source"):
        if not isinstance(obj.get(key), str) or not obj[key].strip():
            raise NpinvError(f"{key!r} must be a non-empty string")
    if ("target" in obj) == ("targets" in obj):
        raise NpinvError("give 'targets' (a list) or 'target' (one prompt)")
    targets = obj["targets"] if "targets" in obj else [obj["target"]]
    if not isinstance(targets, list) or not targets or not all(isinstance(t, str) and t.strip() for t in targets):
        raise NpinvError("'targets' must be a non-empty list of non-empty strings")
    edit_values = {k: v for k, v in obj.items() if k in EDIT_KEYS}
    cross = edit_values.get("cross_replace")
    if isinstance(cross, dict):  # {word: window, "default_": window}: per-word windows, as the reference writes them
        words = dict(cross)
        edit_values.pop("cross_replace")
        if "default_" in words:
            edit_values["cross_replace"] = words.pop("default_")
        edit_values["cross_replace_words"] = words
    read = from_text if text else from_value
    edit_settings = read(EditSettings, edit_values, edit_defaults)
    invert_settings = read(InvertSettings, {k: v for k, v in obj.items() if k in INVERT_KEYS}, invert_defaults)
    check_scheme(edit_settings.method, invert_settings.invert_scheme)
    image = Path(obj["image"]).expanduser()
    image = image if image.is_absolute() else base / image
    load_image(image)  # a bad image fails here, before any model work
    name = obj.get("name") or image.stem
    if not isinstance(name, str):
        raise NpinvError("'name' must be a string")
    return ManifestRow(line, image, obj["source"], tuple(targets), edit_settings, invert_settings, _safe_name(name),
                       hashlib.sha256(image.read_bytes()).hexdigest())


def _safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip(".")[:60] or "image"


def check_words(model: Model, rows: list[ManifestRow]) -> None:
    """Prompt-level checks that need the tokenizer (blend and reweight words, replace word counts):
    the first failing row raises with its line number, still before any UNet call."""
    for row in rows:
        try:
            check_edit(model, row.source, list(row.targets), row.invert.steps, row.edit)
        except NpinvError as exc:
            raise NpinvError(f"line {row.line}: {exc}") from None


def check_schedules(rows: list[ManifestRow], scheduler_config: Any, size_multiple: int = 8) -> None:
    """Each row's steps and offset against the model's scheduler (``steps: 1000`` needs ``offset: 0``),
    its size against the model's VAE: the first bad row raises with its line number. The CLI calls it
    with the configs read before the model loads; :func:`run_batch` again with the loaded model's."""
    from npinv.checks import check_size
    from npinv.model import check_grid

    grids: dict[tuple, str | None] = {}
    for row in rows:
        s = row.invert
        try:
            check_size(s.size, size_multiple)
            if scheduler_config is None:
                continue
            key = (s.steps, s.offset)
            if key not in grids:
                try:
                    check_grid(scheduler_config, s.steps, s.offset)  # a DDIM or a flow grid
                    grids[key] = None
                except NpinvError as exc:
                    grids[key] = str(exc)
            if grids[key] is not None:
                raise NpinvError(grids[key])
        except NpinvError as exc:
            raise NpinvError(f"line {row.line}: {exc}") from None


# -- planning -------------------------------------------------------------------------------------
def _digest(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def inversion_key(row: ManifestRow, fingerprint: str) -> str:
    """The service's key of the row's inversion (:class:`npinv.service.InversionKey`), as text."""
    return _digest(dataclasses.astuple(InversionKey.of_file(fingerprint, row.image_sha256, row.source, row.invert)))


def settings_key(row: ManifestRow, model: Any) -> str:
    """The row's edit settings with the model's declared values filled in, so a row that leaves the
    guidance or self-replace to the model and one that spells out the same numbers share results."""
    return _digest(as_json(row.edit.resolved(model)))


def plan(rows: list[ManifestRow], out: Path, model: Model) -> list[EditItem]:
    items = []
    fingerprint = model.fingerprint  # hashes weights: once, not per row
    for row in rows:
        inv_key, set_key = inversion_key(row, fingerprint), settings_key(row, model)
        for k, target in enumerate(row.targets):
            key = f"L{row.line}T{k}:" + _digest(inv_key, set_key, target, fingerprint)
            items.append(EditItem(row, k, key, out / "edits" / f"{row.line:05d}-{k}-{row.name}.png", inv_key, set_key))
    return items


def _check_same_manifest(items: list[EditItem], results: ShardedResults) -> None:
    current = {it.key.split(":")[0]: it.key for it in items}
    for key in results.done:
        slot = key.split(":")[0]
        if slot in current and current[slot] != key:
            line = slot[1:].split("T")[0]
            raise NpinvError(f"{results.final.parent} holds results of a different manifest or model (line {line} "
                             "changed); use another --out or remove it")


# -- the run ----------------------------------------------------------------------------------------
def run_batch(model: Model, rows: list[ManifestRow], out: str | Path, *, batch_size: int = 1, shard: Shard | None = None,
              progress: Callable[[str], None] | None = None) -> BatchReport:
    if batch_size < 1:
        raise NpinvError("--batch-size must be at least 1")
    shard = shard or Shard()
    check_words(model, rows)
    check_schedules(rows, model.pipe.scheduler.config, model.size_multiple)
    out = Path(out)
    # One job at a time in a folder (the processes of one accelerate launch are one job).
    with FolderLock(out, shard):
        return _run_locked(model, rows, out, batch_size, shard, progress)


def _run_locked(model: Model, rows: list[ManifestRow], out: Path, batch_size: int, shard: Shard,
                progress: Callable[[str], None] | None) -> BatchReport:
    (out / "edits").mkdir(parents=True, exist_ok=True)
    items = plan(rows, out, model)
    results = ShardedResults(out, shard)
    _check_same_manifest(items, results)
    order = {it.key: n for n, it in enumerate(items)}
    # Done means recorded and on disk: an edit whose row was torn or whose file is gone runs again,
    # so done_before + done_now adds up to the edits. (done_before counts the whole manifest; with
    # several processes each one's done_now counts only its own share.)
    done_before = sum(1 for it in items if _finished(it, results))

    # Deal source images (one inversion each) to processes. This process inverts its pending
    # images batch_size at a time (equal steps, offset and size), then edits each such chunk with
    # one edit call per setting: images sharing a setting share the UNet batch.
    sources = list(dict.fromkeys(it.inv_key for it in items))
    mine = {key for n, key in enumerate(sources) if shard.owns(n)}
    # An edit call with a missing target reruns its finished targets too (same batch, so the same
    # pixels as an uninterrupted run), keeping their files and rows.
    calls: dict[tuple[str, str], list[EditItem]] = {}
    for it in items:
        if it.inv_key in mine:
            calls.setdefault((it.inv_key, it.set_key), []).append(it)
    pending: dict[str, list[EditItem]] = {}
    for (inv_key, _), its in calls.items():
        if any(not _finished(it, results) for it in its):
            pending.setdefault(inv_key, []).extend(its)

    meter = Meter(model)
    done_now = 0
    for chunk in _chunks(pending, model, batch_size):
        done_now += _run_chunk(model, chunk, results, progress)
    results.merge(order=lambda r: order.get(r["key"], len(order)))
    return BatchReport(total=len(items), done_before=done_before, done_now=done_now, results=results.final,
                       seconds=meter.cost.seconds, unet_calls=meter.cost.unet_calls, shard=shard.label)


def _finished(item: EditItem, results: ShardedResults) -> bool:
    return item.key in results and item.output.is_file()


@dataclasses.dataclass
class _Source:
    items: list[EditItem]  # every edit of this image that runs now
    source: Source


def _chunks(pending: dict[str, list[EditItem]], model: Model, batch_size: int):
    """Source images ``batch_size`` at a time among those of equal steps, offset and prepared size."""
    buckets: dict[tuple, list[_Source]] = {}
    for its in pending.values():
        row = its[0].row
        source = prepare_file(row.image, model, row.invert)
        shape_key = (row.invert.key(), tuple(source.image.shape))
        bucket = buckets.setdefault(shape_key, [])
        bucket.append(_Source(its, source))
        if len(bucket) == batch_size:
            yield buckets.pop(shape_key)
    yield from (b for b in buckets.values() if b)


def _run_chunk(model: Model, chunk: list[_Source], results: ShardedResults, progress) -> int:
    row = chunk[0].items[0].row
    # The chunk's inversions, and a method's variants of them (NTI's negatives serve every setting
    # with the same guidance), live in one cache for the chunk.
    cache = InversionCache(max_entries=4 * len(chunk) + 4, max_bytes=2**62)
    # Only the clean latents when every edit of the chunk is inversion-free (FlowEdit).
    encode_only = all(not get_method(it.row.edit.method).needs_inversion for src in chunk for it in src.items)
    inverted = invert(model, [src.source for src in chunk], [src.items[0].row.source for src in chunk], row.invert,
                      cache=cache, encode_only=encode_only)
    invert_cost = inverted[0].cost
    # One edit call per setting, over every image of the chunk that has edits with it.
    calls: dict[str, list[tuple[int, list[EditItem]]]] = {}
    for n, src in enumerate(chunk):
        per_setting: dict[str, list[EditItem]] = {}
        for it in src.items:
            per_setting.setdefault(it.set_key, []).append(it)
        for set_key, its in per_setting.items():
            calls.setdefault(set_key, []).append((n, its))
    n_edits = sum(len(src.items) for src in chunk)
    count = 0
    for jobs in calls.values():
        settings = jobs[0][1][0].row.edit
        edited = edit(model, [(inverted[n], [it.target for it in its]) for n, its in jobs], settings, cache=cache)
        edit_s = edited[0].edit_cost.seconds
        call_edits = sum(len(its) for _, its in jobs)
        for (_, its), result in zip(jobs, edited, strict=True):
            for j, it in enumerate(its):
                if _finished(it, results):
                    continue
                remove_stale_temporaries(it.output)  # a killed run's half-written copy; this process owns the output
                save_image(tensor_to_image(result.images[j : j + 1]), it.output)
                s = result.settings
                results.add({
                    "key": it.key, "line": it.row.line, "target_index": it.k, "image": str(it.row.image),
                    "source": it.row.source, "target": it.target, "output": str(it.output),
                    "seconds": invert_cost.seconds / n_edits + edit_s / call_edits,
                    "invert_seconds": invert_cost.seconds / len(chunk), "edit_seconds": edit_s / call_edits,
                    "batch_images": len(jobs), "method": s.method, "controller": s.controller,
                    "guidance": s.guidance, "self_replace": as_json(s)["self_replace"], "steps": it.row.invert.steps,
                    "direct": s.direct,
                    # The inversion and edit calls this edit was part of (shared with the images batched with it).
                    "unet_calls": result.cost.unet_calls, "unet_rows": result.cost.unet_rows,
                    **result.inverted.inversion.scheme_report(), "rank": results.shard.rank})
                count += 1
        if progress:
            progress(f"{call_edits} edit(s) of {len(jobs)} image(s) in {edit_s:.1f} s "
                     f"(inversion of {len(chunk)} image(s): {invert_cost.seconds:.1f} s)")
    return count
