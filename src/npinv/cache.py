"""A bounded least-recently-used cache of inversions.

The web app keeps one per browser session (in ``gr.State``), so nobody is ever served an inversion
of someone else's image; edit-batch and the benchmarks keep one per run. Keys are
:class:`npinv.service.InversionKey`: everything that changes an inversion, so any change to one of
them inverts again.
"""

from __future__ import annotations

import copy
import dataclasses
import threading
from collections import OrderedDict
from collections.abc import Hashable
from typing import Any

import torch


@dataclasses.dataclass(frozen=True)
class CacheStats:
    entries: int
    bytes: int
    hits: int
    misses: int
    evictions: int
    max_entries: int
    max_bytes: int


class _Lock:
    """A mutex that copies as a new, unlocked one: Gradio deep-copies and ``asdict``s state values."""

    def __init__(self) -> None:
        self._lock = threading.Lock()

    def __enter__(self) -> None:
        self._lock.acquire()

    def __exit__(self, *exc) -> None:
        self._lock.release()

    def __deepcopy__(self, memo: dict) -> _Lock:
        return _Lock()


@dataclasses.dataclass
class _Entry:
    value: Any
    nbytes: int


@dataclasses.dataclass(eq=False)  # identity: two sessions' caches are never "equal"
class InversionCache:
    """LRU cache bounded by entry count and by the bytes of the tensors it holds.

    A value larger than ``max_bytes`` on its own is not kept (the caller still has it). Thread
    safe; a deep copy (which Gradio makes of a session's initial state) is an independent cache.
    """

    max_entries: int = 4
    max_bytes: int = 256 * 2**20
    hits: int = 0
    misses: int = 0
    evictions: int = 0
    _entries: OrderedDict[Hashable, _Entry] = dataclasses.field(default_factory=OrderedDict, repr=False)
    _lock: _Lock = dataclasses.field(default_factory=_Lock, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.max_entries < 1:
            raise ValueError("max_entries must be at least 1")
        if self.max_bytes < 1:
            raise ValueError("max_bytes must be at least 1")

    def get(self, key: Hashable) -> Any | None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                self.misses += 1
                return None
            self._entries.move_to_end(key)
            self.hits += 1
            return entry.value

    def put(self, key: Hashable, value: Any, nbytes: int | None = None) -> bool:
        """Store ``value`` (replacing an entry with the same key); evict the least recently used
        entries until both bounds hold. Returns whether the value was kept."""
        size = tensor_bytes(value) if nbytes is None else int(nbytes)
        with self._lock:
            self._entries.pop(key, None)
            if size > self.max_bytes:
                return False
            self._entries[key] = _Entry(value, size)
            while len(self._entries) > self.max_entries or self._total() > self.max_bytes:
                self._entries.popitem(last=False)
                self.evictions += 1
            return True

    def __contains__(self, key: object) -> bool:
        with self._lock:
            return key in self._entries

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def keys(self) -> list[Hashable]:
        """Keys from least to most recently used."""
        with self._lock:
            return list(self._entries)

    @property
    def nbytes(self) -> int:
        with self._lock:
            return self._total()

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()

    def stats(self) -> CacheStats:
        with self._lock:
            return CacheStats(len(self._entries), self._total(), self.hits, self.misses, self.evictions,
                              self.max_entries, self.max_bytes)

    def _total(self) -> int:
        return sum(e.nbytes for e in self._entries.values())

    def __deepcopy__(self, memo: dict) -> InversionCache:
        # Copied under the lock, so a copy never sees an entry half put; it gets a lock of its own.
        with self._lock:
            entries = copy.deepcopy(self._entries, memo)
        return InversionCache(self.max_entries, self.max_bytes, self.hits, self.misses, self.evictions, entries)


def tensor_bytes(obj: Any, _seen: set[int] | None = None) -> int:
    """Bytes of the tensors reachable from ``obj`` through dataclasses, dicts, lists and tuples,
    each tensor storage counted once (NPI reuses one embedding at every step)."""
    seen = set() if _seen is None else _seen
    if isinstance(obj, torch.Tensor):
        storage = obj.untyped_storage()
        if storage.data_ptr() in seen:
            return 0
        seen.add(storage.data_ptr())
        return storage.nbytes()
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return sum(tensor_bytes(getattr(obj, f.name), seen) for f in dataclasses.fields(obj))
    if isinstance(obj, dict):
        return sum(tensor_bytes(v, seen) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v, seen) for v in obj)
    return 0
