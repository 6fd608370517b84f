"""How many CPU threads torch uses in one ``npinv`` process, and how they wait: the CLI's defaults.

torch's default is one thread per core of the machine, whatever else runs on it, and its OpenMP
threads spin while they wait for each other. Beside other work on the same cores (a second npinv
process, ``accelerate launch`` on a CPU, a server beside a batch job, anything) a thread waits for
one the kernel has descheduled, spinning: a 20-step reconstruct of the embedded model took 67-131 s
instead of 2.3-2.9 s on a 2-core machine (docs/batch.md). Either fix alone removes that here: one
thread per process, or waiting threads that sleep. So the CLI

- gives each process the CPUs it may use (``os.sched_getaffinity``) divided by the processes launched
  together (accelerate's and torchrun's ``LOCAL_WORLD_SIZE``), at least one: ``--threads N`` or
  ``NPINV_THREADS`` set the number; an ``OMP_NUM_THREADS`` or ``MKL_NUM_THREADS`` the user exported is
  left to torch, which reads it;
- and ``import npinv`` bounds how long a waiting OpenMP thread spins before it sleeps
  (``GOMP_SPINCOUNT=3000``) unless the user set it or ``OMP_WAIT_POLICY``, or torch is already loaded
  (OpenMP reads them once, when torch loads it): that covers the work npinv cannot see (another launch,
  another program). Sleeping at once (``OMP_WAIT_POLICY=PASSIVE``) doubles an idle machine's times.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Iterator, Mapping

from npinv.errors import NpinvError

# Variables torch reads for its thread count: a user who set one chose it.
TORCH_THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")


@dataclasses.dataclass(frozen=True)
class ThreadChoice:
    """``threads``: what to give torch, or None to leave torch's own setting; ``source``: why."""

    threads: int | None
    source: str


def _whole(text: str, what: str) -> int:
    try:
        value = int(text.strip())
    except ValueError:
        value = 0
    if value < 1:
        raise NpinvError(f"{what} must be a whole number of at least 1, got {text!r}")
    return value


def choose_threads(requested: int | None, env: Mapping[str, str], cpus: int) -> ThreadChoice:
    """The thread count for a process that may use ``cpus`` CPUs: ``--threads`` (``requested``), else
    ``NPINV_THREADS``, else the user's ``OMP_NUM_THREADS``/``MKL_NUM_THREADS`` (left to torch), else
    ``cpus`` divided by ``LOCAL_WORLD_SIZE`` (the processes launched together; 1 when unset), at least 1."""
    if requested is not None:
        if requested < 1:
            raise NpinvError(f"--threads must be at least 1, got {requested}")
        return ThreadChoice(requested, "--threads")
    if env.get("NPINV_THREADS", "").strip():
        return ThreadChoice(_whole(env["NPINV_THREADS"], "NPINV_THREADS"), "NPINV_THREADS")
    for name in TORCH_THREAD_VARIABLES:
        if env.get(name, "").strip():
            return ThreadChoice(None, name)
    try:
        processes = max(1, int(env.get("LOCAL_WORLD_SIZE", "1")))
    except ValueError:  # not ours to refuse: accelerate and torchrun set it
        processes = 1
    return ThreadChoice(max(1, cpus // processes), "share")


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity mask: a container's or taskset's limit)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # macOS, Windows
        return os.cpu_count() or 1


@contextlib.contextmanager
def torch_threads(choice: ThreadChoice) -> Iterator[None]:
    """torch's intra-op thread count set to ``choice`` meanwhile (restored after: the CLI also runs
    in-process, from tests and scripts)."""
    if choice.threads is None:
        yield
        return
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(choice.threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)
