"""A process that holds an output folder's lock, for the tests of what a second run is told."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def lock_holder(folder: Path) -> subprocess.Popen:
    """Another process that holds FOLDER's lock (npinv.parallel.FolderLock) until its stdin closes;
    returned once it holds it."""
    code = ("import sys; from npinv.parallel import FolderLock\n"
            f"with FolderLock({str(folder)!r}):\n"
            "    print('held', flush=True); sys.stdin.read()\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.stdout.readline().strip() == "held"  # blocks until the lock is taken: no timing involved
    return proc
