"""Resumable results: one JSON object per line, keyed; a rerun skips keys already written.

Each row is appended and flushed to disk before the next one starts, so a killed run loses at
most the row in progress; a torn last line (killed mid-write) is ignored on reading.
"""

from __future__ import annotations

import json
import math
import os
import statistics
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from npinv.errors import NpinvError
from npinv.io import atomic_path, write_text


class ResultsFile:
    """``repair``: rewrite the file without a torn line (and with its last line ended), so that
    appends start on a line of their own; only the file's one writer may (another process's file
    is read as it is, its torn line skipped)."""

    def __init__(self, path: str | Path, *, repair: bool = True) -> None:
        self.path = Path(path)
        self.rows: list[dict[str, Any]] = []
        if self.path.exists():
            text = self.path.read_text()
            lines = text.splitlines()
            good = []
            for line in lines:
                try:
                    self.rows.append(json.loads(line))
                    good.append(line)
                except json.JSONDecodeError:
                    continue  # torn write of a killed run
            # A last line without its newline would run into the next appended row.
            if repair and (len(good) != len(lines) or (text and not text.endswith("\n"))):
                with atomic_path(self.path) as tmp:  # atomically, keeping the file's mode
                    tmp.write_text("".join(g + "\n" for g in good))
        self.done = {row["key"] for row in self.rows}

    def __contains__(self, key: str) -> bool:
        return key in self.done

    def add(self, row: dict[str, Any]) -> None:
        if "key" not in row:
            raise ValueError("a result row needs a key")
        line = json.dumps(row, default=_jsonable)
        with self.path.open("a") as fh:
            fh.write(line + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        self.rows.append(json.loads(line))
        self.done.add(row["key"])


def _jsonable(value: Any) -> Any:
    if hasattr(value, "item"):
        return value.item()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def nanmean(values: Iterable[float | None]) -> float:
    """Mean that skips NaN and None (and +inf PSNR of identical images); NaN if nothing is left."""
    kept = [float(v) for v in values if v is not None and not math.isnan(float(v)) and not math.isinf(float(v))]
    return statistics.mean(kept) if kept else math.nan


def group(rows: list[dict], keys: tuple[str, ...]) -> dict[tuple, list[dict]]:
    out: dict[tuple, list[dict]] = {}
    for row in rows:
        out.setdefault(tuple(row[k] for k in keys), []).append(row)
    return out


def markdown_table(header: list[str], rows: list[list[Any]]) -> str:
    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return "n/a" if math.isnan(v) else f"{v:.2f}" if abs(v) >= 0.1 or v == 0 else f"{v:.4f}"
        return str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


MODEL_FILE = "model.json"  # which model a results folder's rows were measured on


def claim_for_model(folder: str | Path, model) -> None:
    """A results folder holds one model's rows: a rerun on other weights would otherwise skip their
    keys and report the old model's figures as its own. Refuses a folder of another model, or one
    with rows but no record of its model (written before this check), in one error line."""
    folder = Path(folder)
    path = folder / MODEL_FILE
    want = {"model": model.name, "fingerprint": model.fingerprint}
    if path.is_file():
        try:
            old = json.loads(path.read_text())
        except json.JSONDecodeError:
            old = {}
        if old != want:
            raise NpinvError(f"{folder} holds results of another model ({old.get('model')!r}, fingerprint "
                             f"{old.get('fingerprint')!r}; now {want['fingerprint']!r}): use another folder or delete it")
    elif any(folder.glob("*.jsonl")):
        raise NpinvError(f"{folder} holds results of an unrecorded model: use another folder or delete it")
    else:
        write_text(path, json.dumps(want) + "\n")
