"""Several processes over one job: which share of the work is this process's, and results files
that each process writes alone and that are merged when it finishes.

Launch with Hugging Face accelerate (``accelerate launch --num_processes N -m npinv ...``) or
torchrun: both set ``WORLD_SIZE``; accelerate's :class:`~accelerate.PartialState` then gives the
rank and this process's device (``cuda:LOCAL_RANK`` on a GPU node, the CPU otherwise). Work is
dealt by index (``index % world_size == rank``), so every process knows its share without talking
to the others, and nothing waits on a barrier that could time out while a slow rank finishes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from npinv.bench.results import ResultsFile
from npinv.errors import NpinvError
from npinv.io import atomic_path, remove_stale_temporaries


@dataclasses.dataclass(frozen=True)
class Shard:
    """This process's place among ``world_size`` processes, and the device it should use."""

    rank: int = 0
    world_size: int = 1
    device: str | None = None

    def owns(self, index: int) -> bool:
        return index % self.world_size == self.rank

    @property
    def label(self) -> str:
        return f"rank {self.rank} of {self.world_size}"


def current_shard() -> Shard:
    """One process unless launched by accelerate or torchrun (``WORLD_SIZE`` > 1)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Shard()
    import torch
    from accelerate import PartialState

    # Without a GPU, accelerate treats a multi-process launch as one process unless told "cpu".
    state = PartialState(cpu=not torch.cuda.is_available())
    if state.num_processes != world:
        raise NpinvError(f"launched as {world} processes but accelerate sees {state.num_processes}")
    device = state.device
    return Shard(state.process_index, state.num_processes, None if device.type == "cpu" else str(device))


class ShardedResults:
    """``FOLDER/NAME.jsonl`` written by one or several processes.

    One process appends to ``NAME.jsonl`` itself; with several, each appends to its own
    ``NAME.partR-of-N.jsonl`` and :meth:`merge` folds every part into ``NAME.jsonl`` (under a
    file lock, atomically, one row per key, in the caller's order). Every process merges when it
    finishes, so the last one to finish leaves the complete file; a killed process's finished
    rows stay in its part and count as done on the next run, whatever its number of processes.
    """

    def __init__(self, folder: str | Path, shard: Shard | None = None, name: str = "results") -> None:
        self.folder = Path(folder)
        self.shard = shard = shard or Shard()
        self.final = self.folder / f"{name}.jsonl"
        self.name = name
        own = self.final if shard.world_size == 1 else self.folder / f"{name}.part{shard.rank}-of-{shard.world_size}.jsonl"
        self.own = ResultsFile(own)
        self.done: dict[str, dict[str, Any]] = {}
        for path in [self.final, *self._parts()]:
            rows = self.own.rows if path == self.own.path else ResultsFile(path).rows
            for row in rows:
                self.done.setdefault(row["key"], row)

    def _parts(self) -> list[Path]:
        return sorted(self.folder.glob(f"{self.name}.part*-of-*.jsonl"))

    def __contains__(self, key: str) -> bool:
        return key in self.done

    def add(self, row: dict[str, Any]) -> None:
        self.own.add(row)
        self.done[row["key"]] = self.own.rows[-1]

    def merge(self, order: Callable[[dict[str, Any]], Any] | None = None) -> list[dict[str, Any]]:
        """Fold every part into the final file; returns its rows. A single process also removes
        parts left by an earlier multi-process run (it owns the folder); several remove only their own."""
        with _locked(self.folder / f".{self.name}.lock"):
            rows: dict[str, dict[str, Any]] = {}
            for path in [self.final, *self._parts()]:
                for row in ResultsFile(path).rows if path.exists() else []:
                    rows.setdefault(row["key"], row)
            merged = sorted(rows.values(), key=order) if order else list(rows.values())
            remove_stale_temporaries(self.final)  # from a merge that was killed; the lock makes this the one writer
            with atomic_path(self.final) as tmp:
                tmp.write_text("".join(json.dumps(r) + "\n" for r in merged))
            for part in self._parts():
                if self.shard.world_size == 1 or part == self.own.path:
                    part.unlink(missing_ok=True)
        return merged


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    with path.open("a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)
