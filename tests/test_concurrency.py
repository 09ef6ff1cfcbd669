"""The daemon under concurrent use: workloads that once hung it for good or stalled it.

Each runs on a real cowfs mount under a watchdog that aborts the FUSE
connection through fusectl if the workload outlives its limit, so a
regression fails the test instead of leaving CI with processes in D state.
"""

from __future__ import annotations

import multiprocessing
import os
import time

import pytest

from cowfs.testing.mounts import CowfsMount, watchdog

pytestmark = pytest.mark.fuse

APPENDS = int(os.environ.get("COWFS_TEST_APPENDS", "20000"))


@pytest.fixture
def stack(shared_tmp):
    dirs = {name: os.path.join(shared_tmp, name) for name in ("l", "u", "w", "m")}
    for d in dirs.values():
        os.mkdir(d)
    dirs["mount"] = CowfsMount([dirs["l"]], dirs["u"], dirs["w"], dirs["m"])
    return dirs  # each test mounts in a with block; shared_tmp unmounts anything left


def _append(path, tag, count):
    fd = os.open(path, os.O_WRONLY | os.O_APPEND)
    try:
        for i in range(count):
            os.write(fd, b"%s %06d\n" % (tag, i))
    finally:
        os.close(fd)


def test_appends_through_two_hard_links_finish(stack):
    """Two processes appending through two names of one file once deadlocked the daemon: a write
    through one name invalidated the other name's pages while the other writer held them."""
    with stack["mount"] as mounted:
        a, b = os.path.join(mounted.mountpoint, "A"), os.path.join(mounted.mountpoint, "B")
        open(a, "w").close()
        os.link(a, b)
        with watchdog(mounted.mountpoint, 60, "two appenders through hard links"):
            writers = [multiprocessing.Process(target=_append, args=(path, tag, APPENDS))
                       for path, tag in ((a, b"A"), (b, b"B"))]
            for w in writers:
                w.start()
            for w in writers:
                w.join(90)
        with open(b, "rb") as f:
            lines = f.read().splitlines()
        assert len(lines) == 2 * APPENDS
        for tag in (b"A", b"B"):
            assert [ln for ln in lines if ln.startswith(tag)] == [b"%s %06d" % (tag, i) for i in range(APPENDS)]
        assert os.stat(a).st_nlink == os.stat(b).st_nlink == 2
        assert os.stat(a).st_size == os.stat(b).st_size == len(lines) * 9


def _open_for_write(path, finished):
    os.close(os.open(path, os.O_WRONLY))  # copies the whole file up
    finished.value = time.monotonic()


def _staging(work):
    """The copy being built in the workdir, if one is."""
    names = os.listdir(os.path.join(work, "work")) if os.path.isdir(os.path.join(work, "work")) else []
    return [n for n in names if n.startswith("#")]


def test_copy_up_does_not_stop_other_lookups(stack):
    """A copy-up of a big file once held the engine's lock for its whole length, so a stat of an
    unrelated file waited for it."""
    with open(os.path.join(stack["l"], "big"), "wb") as f:
        chunk = os.urandom(1 << 20)
        for _ in range(768):
            f.write(chunk)
    for i in range(50):
        open(os.path.join(stack["l"], f"other{i}"), "w").close()
    with stack["mount"] as mounted:
        os.sync()
        if os.geteuid() == 0:
            with open("/proc/sys/vm/drop_caches", "w") as f:
                f.write("3")  # the copy reads from the disk, as after a boot
        finished = multiprocessing.Value("d", 0.0)
        with watchdog(mounted.mountpoint, 120, "copy-up of 768 MiB"):
            copier = multiprocessing.Process(target=_open_for_write,
                                             args=(os.path.join(mounted.mountpoint, "big"), finished))
            copier.start()
            deadline = time.monotonic() + 30
            while not _staging(stack["w"]) and not finished.value and time.monotonic() < deadline:
                time.sleep(0.001)
            assert _staging(stack["w"]), "no copy-up was seen in the workdir"
            times = []
            for i in range(50):
                t = time.monotonic()
                os.stat(os.path.join(mounted.mountpoint, f"other{i}"))  # a first lookup: the daemon answers
                times.append(time.monotonic() - t)
            stats_done = time.monotonic()
            copier.join(120)
        assert copier.exitcode == 0
        assert max(times) < 0.2, f"a lookup took {max(times):.3f} s while a copy-up ran"
        assert finished.value > stats_done, "the copy-up ended before the lookups: too short to tell"
