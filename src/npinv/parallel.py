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
import socket
import time
import warnings
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
    file lock, atomically, one row per key (its latest), in the caller's order). Every process merges when it
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
            # Only this process writes its own file; the others' are read as they are.
            rows = self.own.rows if path == self.own.path else ResultsFile(path, repair=False).rows
            for row in rows:
                self.done[row["key"]] = row  # a key written again (a redone edit) is its latest row

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
                for row in ResultsFile(path, repair=False).rows if path.exists() else []:
                    rows[row["key"]] = row  # the latest row of a key wins: parts are newer than the final file
            merged = sorted(rows.values(), key=order) if order else list(rows.values())
            remove_stale_temporaries(self.final)  # from a merge that was killed; the lock makes this the one writer
            with atomic_path(self.final) as tmp:
                tmp.write_text("".join(json.dumps(r) + "\n" for r in merged))
            for part in self._parts():
                if self.shard.world_size == 1 or part == self.own.path:
                    part.unlink(missing_ok=True)
        return merged


class FolderLock:
    """One job at a time in an output folder: ``FOLDER/.npinv.lock``, held while the job runs.

    The file holds who owns the folder (pid, host, start time, and for processes launched together
    by accelerate or torchrun the launch they belong to). Every process of the job keeps a shared
    ``flock`` on it, which the kernel drops when the process ends however it ends, so a crashed
    job never blocks the next: a lock file nobody holds is stale and is taken over, with a note.
    A process of another launch finds the lock held and is refused with the holder named; a
    sibling of the same launch joins it (the shards share the folder by design). The last process
    to leave removes the file. Taking, joining and leaving happen under the folder's short merge
    lock, so they are atomic with respect to each other. Across machines the folder's file system
    must support ``flock`` (as the results merge needs).
    """

    NAME = ".npinv.lock"

    def __init__(self, folder: str | Path, shard: Shard | None = None, *, what: str = "npinv edit-batch") -> None:
        self.folder = Path(folder)
        self.path = self.folder / self.NAME
        self.shard = shard or Shard()
        self.what = what
        self.launch = launch_id(self.shard)
        self._fd: int | None = None

    # -- who holds it --------------------------------------------------------------------------
    def _me(self) -> dict[str, Any]:
        return {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S %z"),
                "process_start": _process_start(os.getpid()), "launch": self.launch,
                "world_size": self.shard.world_size, "command": self.what}

    @staticmethod
    def describe(info: dict[str, Any]) -> str:
        if not info:
            return "a process that has not written its name yet"
        who = f"pid {info.get('pid', '?')}@{info.get('host', '?')}, since {info.get('since', '?')}"
        if (info.get("world_size") or 1) > 1:
            who += f", one of {info['world_size']} processes launched together"
        return f"{info.get('command') or 'another npinv run'} ({who})"

    def _refusal(self, info: dict[str, Any]) -> NpinvError:
        return NpinvError(f"{self.folder} is in use by {self.describe(info)}; wait for it to finish or use another "
                          f"--out (if no such process runs, remove {self.path})")

    # -- taking and leaving -------------------------------------------------------------------
    def check(self) -> None:
        """Raise if the folder is held by another job; takes nothing (a check before slow work)."""
        if not self.path.is_file():
            return
        with _locked(self.folder / ".results.lock"):
            try:
                fd = os.open(self.path, os.O_RDWR)
            except FileNotFoundError:
                return
            try:
                info = _read_info(fd)
                if _try_flock(fd, fcntl.LOCK_EX):
                    if _alive_here(info) and not self._mine(info):
                        raise self._refusal(info)  # alive, though its flock is not seen: trust the pid
                elif not self._mine(info):
                    raise self._refusal(info)
            finally:
                os.close(fd)

    def acquire(self) -> FolderLock:
        if self._fd is not None:
            return self
        self.folder.mkdir(parents=True, exist_ok=True)
        with _locked(self.folder / ".results.lock"):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o666)
            try:
                info = _read_info(fd)
                if _try_flock(fd, fcntl.LOCK_EX):
                    # Nobody holds it: a file left behind is a crashed (or killed) job's, unless its
                    # process still runs here (a file system whose flock this process cannot see).
                    if info and not self._mine(info):
                        if _alive_here(info):
                            raise self._refusal(info)
                        warnings.warn(f"{self.path} was left by {self.describe(info)}, which no longer runs; "
                                      "taking the folder over", _note_category(), stacklevel=2)
                    _write_info(fd, self._me())
                    fcntl.flock(fd, fcntl.LOCK_SH)  # under the merge lock: nobody can slip in between
                elif not self._mine(info) or not _try_flock(fd, fcntl.LOCK_SH):
                    raise self._refusal(info)
            except BaseException:
                os.close(fd)
                raise
            self._fd = fd
        return self

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            with _locked(self.folder / ".results.lock"):
                # The last process out (no other shared holder) removes the file.
                if _try_flock(fd, fcntl.LOCK_EX) and os.path.exists(self.path) and \
                        os.path.samestat(os.fstat(fd), os.stat(self.path)):
                    os.unlink(self.path)
        except OSError:
            pass  # the folder went away: nothing to release but the descriptor
        finally:
            os.close(fd)

    def _mine(self, info: dict[str, Any]) -> bool:
        """The file names a process of this launch (accelerate or torchrun): a sibling, not a rival.
        Two locks in one process (two jobs on one folder) are rivals too."""
        return self.launch is not None and info.get("launch") == self.launch

    def __enter__(self) -> FolderLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def launch_id(shard: Shard) -> str | None:
    """What the processes of one accelerate or torchrun launch share and another launch does not:
    the rendezvous (``MASTER_ADDR:MASTER_PORT``, ``TORCHELASTIC_RUN_ID``) and the world size, and
    where every process runs on this machine (a loopback master, or ``LOCAL_WORLD_SIZE`` equal to
    the world size) also the host: two machines that each launch on 127.0.0.1:29500 into one shared
    folder are two jobs. (One machine cannot run two launches on one port at once.) None for one
    process."""
    if shard.world_size <= 1:
        return None
    env = os.environ
    addr = env.get("MASTER_ADDR", "")
    parts = [addr, env.get("MASTER_PORT", ""), env.get("TORCHELASTIC_RUN_ID", ""), str(shard.world_size)]
    if addr in ("", "localhost", "127.0.0.1", "::1") or env.get("LOCAL_WORLD_SIZE") == str(shard.world_size):
        parts.append(socket.gethostname())
    return "/".join(parts)


def _note_category() -> type[Warning]:
    from npinv.model import NpinvWarning  # printed by the CLI as one line

    return NpinvWarning


def _try_flock(fd: int, kind: int) -> bool:
    try:
        fcntl.flock(fd, kind | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False


def _read_info(fd: int) -> dict[str, Any]:
    os.lseek(fd, 0, os.SEEK_SET)
    data = b""
    while chunk := os.read(fd, 65536):
        data += chunk
    try:
        info = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return {}
    return info if isinstance(info, dict) else {}


def _write_info(fd: int, info: dict[str, Any]) -> None:
    data = (json.dumps(info) + "\n").encode()
    os.ftruncate(fd, 0)
    os.pwrite(fd, data, 0)
    os.fsync(fd)


def _process_start(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (Linux), to tell a reused pid apart."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return int(stat.rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def _alive_here(info: dict[str, Any]) -> bool:
    """The process the lock file names runs on this host (same pid, and same start time where known)."""
    pid = info.get("pid")
    if not isinstance(pid, int) or pid <= 0 or info.get("host") != socket.gethostname() or pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # another user's process: it exists
    started, now = info.get("process_start"), _process_start(pid)
    return started is None or now is None or started == now


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    with path.open("a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)
