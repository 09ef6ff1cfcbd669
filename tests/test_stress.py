"""Concurrency stress test of the cowfs daemon: a bounded sample of ``make stress`` (scripts/stress.py).

8 worker processes hammer one cowfs mount for about 45 s (then a kernel
overlay, for comparison and as a check of the harness) on a few shared names,
hard links included; any unexpected errno, lost append, hung operation or
leftover fails the test.  The watchdog itself is checked by freezing the
daemon: it must abort the FUSE connection and leave nothing mounted or running.

``COWFS_STRESS_SEED`` replays a seed (printed in every failure), and
``COWFS_STRESS_SECONDS`` changes the length of the cowfs run.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import random
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

from cowfs.testing.mounts import mounts_under

_spec = importlib.util.spec_from_file_location("cowfs_stress", Path(__file__).parent.parent / "scripts" / "stress.py")
stress = sys.modules[_spec.name] = importlib.util.module_from_spec(_spec)  # dataclasses look it up there
_spec.loader.exec_module(stress)

SECONDS = float(os.environ.get("COWFS_STRESS_SECONDS", "45"))
KERNEL_SECONDS = 15.0


def _seed() -> str:
    return os.environ.get("COWFS_STRESS_SEED") or str(random.randrange(1 << 32))


@pytest.fixture
def scratch():
    """This test's own directory under scripts/stress.py's scratch; nothing may stay mounted below it.
    It is removed when empty: a failed run keeps its layers there for inspection."""
    os.makedirs(stress.SCRATCH, exist_ok=True)
    path = tempfile.mkdtemp(prefix="pytest-", dir=stress.SCRATCH)
    yield path
    left = mounts_under(path)
    assert not left, f"left mounted: {left}"
    with contextlib.suppress(OSError):
        os.rmdir(path)


@pytest.mark.fuse
@pytest.mark.kernel
def test_stress_cowfs_and_kernel(scratch):
    config = stress.Config(seconds=SECONDS, procs=8, seed=_seed(), kernel_seconds=KERNEL_SECONDS)
    results = stress.run(config, scratch)
    print(stress.report(results, config))
    assert [r.backend for r in results] == ["cowfs", "kernel"]
    assert all(r.ops > 0 for r in results), stress.report(results, config)
    assert all(r.ok for r in results), "stress run failed:\n" + stress.report(results, config)


@pytest.mark.fuse
@pytest.mark.kernel
def test_watchdog_aborts_a_frozen_daemon(scratch):
    """A daemon stopped with SIGSTOP hangs every request: the watchdog must abort and clean up."""
    config = stress.Config(seconds=30, procs=4, seed=_seed(), op_timeout=3, backends=("cowfs",), freeze_after=1)
    results = stress.run(config, scratch)
    (result,) = results
    assert result.hang and "FUSE connection aborted" in result.hang, stress.report(results, config)
    assert result.seconds < 15, f"the watchdog took {result.seconds:.0f}s to stop the run"
    # problems would name a daemon or worker still running, or a failed unmount
    assert not result.problems, "cleanup after the abort failed:\n" + stress.report(results, config)
    shutil.rmtree(scratch)  # the run failed as it should: nothing to inspect
