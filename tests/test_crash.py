"""Crash test: kill -9 the cowfs daemon mid-workload, in every mode, and check the remount (scripts/crash.py).

A bounded sample of ``make crash``: five kills per mode, all four modes, well
under 90 seconds.  The seed is fixed, so a failure reruns with the command
its message prints; ``COWFS_CRASH_SEED`` picks another seed.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "crash.py"
ROUNDS = 5
SEED = os.environ.get("COWFS_CRASH_SEED", "20240601")


def _load_runner():
    spec = importlib.util.spec_from_file_location("cowfs_crash_runner", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


crash = _load_runner()


@pytest.mark.fuse
@pytest.mark.kernel
@pytest.mark.parametrize("mode", list(crash.MODES))
def test_kill_daemon_mid_workload(mode, capsys):
    """After each kill: lowers intact, every object before or after its operation, W/work cleared on
    remount, and the kernel sees in the upper what cowfs shows."""
    figures = crash.run_mode(mode, SEED, ROUNDS, 0, workers=6, max_delay=0.25, keep=False, log=lambda _: None)
    with capsys.disabled():
        crash.report({mode: figures}, SEED)
    assert figures.rounds == ROUNDS
    assert figures.ops and figures.checks
    assert not figures.failures, f"seed {SEED}:\n" + "\n\n".join(figures.failures)


def test_a_write_cut_short_by_the_kill_keeps_the_data_and_takes_the_times():
    """The state a killed daemon may leave for a write in flight: the file's data and size as before the
    write, its mtime as after; nothing else of the state changes, and nothing else is accepted for it."""
    before = {"f": {"type": "file", "size": 10, "sha256": "old", "mtime": 1_000_000_000},
              "d": {"type": "dir", "mode": 0o755},
              "g": {"type": "file", "size": 1, "sha256": "g", "mtime": 5}}
    after = {"f": {"type": "file", "size": 12, "sha256": "new", "mtime": "recent"},
             "d": {"type": "dir", "mode": 0o755},
             "g": {"type": "file", "size": 1, "sha256": "g", "mtime": 5}}
    cut = crash.write_cut_short(before, after)
    assert cut == {"f": {"type": "file", "size": 10, "sha256": "old", "mtime": "recent"},
                   "d": before["d"], "g": before["g"]}
    assert before["f"]["mtime"] == 1_000_000_000  # the states themselves are left as they were
    assert crash.write_cut_short(before, before) == before
