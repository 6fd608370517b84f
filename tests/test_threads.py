"""Each npinv process's share of the cores (npinv.threads): the rule, as a pure function."""

from __future__ import annotations

import pytest

from npinv.errors import NpinvError
from npinv.threads import ThreadChoice, choose_threads, torch_threads


@pytest.mark.parametrize("requested,env,cpus,expected", [
    (None, {}, 8, ThreadChoice(8, "share")),  # alone: every CPU it may use
    (None, {"LOCAL_WORLD_SIZE": "4"}, 8, ThreadChoice(2, "share")),  # accelerate launch, 4 processes
    (None, {"LOCAL_WORLD_SIZE": "3"}, 8, ThreadChoice(2, "share")),  # rounded down: never oversubscribed
    (None, {"LOCAL_WORLD_SIZE": "16"}, 8, ThreadChoice(1, "share")),  # at least one
    (None, {"LOCAL_WORLD_SIZE": "junk"}, 4, ThreadChoice(4, "share")),
    (None, {"OMP_NUM_THREADS": "3", "LOCAL_WORLD_SIZE": "4"}, 8, ThreadChoice(None, "OMP_NUM_THREADS")),  # the user's
    (None, {"MKL_NUM_THREADS": "2"}, 8, ThreadChoice(None, "MKL_NUM_THREADS")),
    (None, {"NPINV_THREADS": "5", "OMP_NUM_THREADS": "3"}, 8, ThreadChoice(5, "NPINV_THREADS")),
    (2, {"NPINV_THREADS": "5", "OMP_NUM_THREADS": "3", "LOCAL_WORLD_SIZE": "4"}, 8, ThreadChoice(2, "--threads")),
    (None, {"OMP_NUM_THREADS": " "}, 2, ThreadChoice(2, "share")),  # set but empty: not a choice
])
def test_thread_count_rule(requested, env, cpus, expected):
    assert choose_threads(requested, env, cpus) == expected


@pytest.mark.parametrize("requested,env,match", [
    (0, {}, "--threads must be at least 1, got 0"),
    (None, {"NPINV_THREADS": "0"}, "NPINV_THREADS must be a whole number of at least 1, got '0'"),
    (None, {"NPINV_THREADS": "many"}, "NPINV_THREADS must be a whole number"),
])
def test_bad_thread_counts_are_refused(requested, env, match):
    with pytest.raises(NpinvError, match=match):
        choose_threads(requested, env, 4)


def test_torch_threads_set_and_restored():
    import torch

    before = torch.get_num_threads()
    with torch_threads(ThreadChoice(1, "--threads")):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    with torch_threads(ThreadChoice(None, "OMP_NUM_THREADS")):
        assert torch.get_num_threads() == before


@pytest.mark.parametrize("given,expected", [({}, "3000 -"), ({"OMP_WAIT_POLICY": "ACTIVE"}, "- ACTIVE"),
                                            ({"GOMP_SPINCOUNT": "10"}, "10 -")])
def test_import_npinv_bounds_the_spin_of_waiting_threads_unless_told(given, expected):
    """OpenMP reads its wait settings once, when torch loads it: ``import npinv`` bounds the spin before
    that (the default spin beside other work made runs 35x slower), keeping what the user chose."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")} | given
    code = "import os, npinv; print(os.environ.get('GOMP_SPINCOUNT', '-'), os.environ.get('OMP_WAIT_POLICY', '-'))"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == expected
