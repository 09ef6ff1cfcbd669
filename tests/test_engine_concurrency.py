"""The engine under threads, as the multithreaded daemon drives it: a big copy-up must not stall
other callers, copies of one file must happen once, and a copy that races a change of
names or fails halfway leaves the upper and the workdir's staging directory (W/work) clean.

The layers are on the filesystem of tmp_path, which also holds the upper, so copies move
real data as they would on a real mount.
"""

import errno
import os
import stat
import threading
import time

import pytest

from cowfs.overlay import copyup
from cowfs.overlay.stack import Stack, check
from cowfs.overlay.union import Union

BIG = 512 << 20  # big enough that copying it takes far longer than any other call
CHUNK = 8 << 20
QUICK = 0.1  # seconds: what a call unrelated to the copy may take at most


class Layers:
    def __init__(self, tmp_path):
        self.lower = tmp_path / "lower"
        self.upper = tmp_path / "upper"
        self.work = tmp_path / "work"
        for p in (self.lower, self.upper, self.work):
            p.mkdir()
        self.unions = []

    @property
    def staging(self):
        return self.work / "work"

    def union(self, **options):
        union = Union(check(Stack(lowers=[str(self.lower)], upper=str(self.upper), work=str(self.work), **options)))
        self.unions.append(union)
        return union


@pytest.fixture
def layers(tmp_path):
    built = Layers(tmp_path)
    (built.lower / "d").mkdir()
    (built.lower / "d" / "small").write_bytes(b"small")
    (built.lower / "d2").mkdir()
    (built.lower / "d2" / "other").write_bytes(b"other")
    block = b"\x5a" * CHUNK  # real data, no holes: every byte is copied
    with open(built.lower / "big", "wb") as f:
        for _ in range(BIG // CHUNK):
            f.write(block)
    yield built
    for union in built.unions:
        union.close()
    assert os.listdir(built.staging) == []
    for layer in (built.lower, built.upper):  # not kept among pytest's last temporary directories
        if os.path.lexists(layer / "big"):
            os.unlink(layer / "big")


def in_thread(call, *args):
    """Start `call(*args)` in a thread; returns the thread and a list that gets its result or exception."""
    outcome = []

    def run():
        try:
            outcome.append(call(*args))
        except BaseException as e:  # handed to the test, which asserts on it
            outcome.append(e)
    thread = threading.Thread(target=run)
    thread.start()
    return thread, outcome


def wait_for_staging(layers, thread):
    """Wait until the copy has started (something is in W/work) or the thread is done."""
    while thread.is_alive() and not os.listdir(layers.staging):
        time.sleep(0.001)


def slowest_unrelated_calls(u, thread):
    """Time getattr, readdir and open of paths unrelated to the copy while `thread` runs; the slowest of each."""
    slowest = {"getattr": 0.0, "readdir": 0.0, "open": 0.0, "open for write": 0.0}
    rounds = 0
    while thread.is_alive():
        for name, call in (("getattr", lambda: u.getattr("/d/small")),
                           ("readdir", lambda: u.readdir("/d2")),
                           ("open", lambda: u.release(u.open("/d/small", os.O_RDONLY))),
                           ("open for write", lambda: u.release(u.open("/d2/other", os.O_WRONLY)))):
            started = time.perf_counter()
            call()
            slowest[name] = max(slowest[name], time.perf_counter() - started)
        u._changed()  # no cached answers: each round looks the paths up again
        rounds += 1
        time.sleep(0.005)
    return slowest, rounds


@pytest.mark.parametrize("metacopy", [False, True])
def test_calls_on_other_files_go_on_during_a_big_copy_up(layers, metacopy):
    u = layers.union(**({"metacopy": True, "redirect_dir": "on"} if metacopy else {}))
    if metacopy:
        u.chmod("/big", 0o600)  # a metadata-only copy: the data follows at the open below
    thread, outcome = in_thread(lambda: u.release(u.open("/big", os.O_WRONLY)))
    slowest, rounds = slowest_unrelated_calls(u, thread)
    thread.join()
    assert outcome == [None]
    assert all(seconds < QUICK for seconds in slowest.values()), slowest
    assert rounds >= 3, "the copy ended before the calls could be timed"
    st = os.lstat(layers.upper / "big")
    assert st.st_size == BIG and st.st_blocks * 512 >= BIG
    with open(layers.upper / "big", "rb") as f:
        f.seek(BIG - 3)
        assert f.read() == b"\x5a" * 3


def test_two_opens_for_write_of_one_big_file_copy_it_once(layers):
    u = layers.union()
    copies = []
    u.events.subscribe(lambda event: copies.append(event["path"]) if event["event"] == "copy_up" else None)
    barrier = threading.Barrier(2)

    def open_for_write():
        barrier.wait()
        return u.open("/big", os.O_RDWR)
    (t1, h1), (t2, h2) = in_thread(open_for_write), in_thread(open_for_write)
    t1.join()
    t2.join()
    h1, h2 = h1[0], h2[0]
    try:
        assert copies == ["/big"]
        upper = os.lstat(layers.upper / "big")
        assert os.path.samestat(os.fstat(h1.fd), upper) and os.path.samestat(os.fstat(h2.fd), upper)
        assert h1.lower_id is None and h2.lower_id is None
        u.write(h1, b"one", 0)
        assert u.read(h2, 3, 0) == b"one"
    finally:
        u.release(h1)
        u.release(h2)


def test_unlink_during_the_copy_up_wins_cleanly(layers):
    """The copy is prepared without the lock; the file's name goes meanwhile: the copy is discarded."""
    u = layers.union()
    thread, outcome = in_thread(u.open, "/big", os.O_WRONLY)
    wait_for_staging(layers, thread)
    u.unlink("/big")
    thread.join()
    result = outcome[0]
    if isinstance(result, OSError):
        assert result.errno == errno.ENOENT
    else:  # the copy-up won the race after all: the handle holds the unlinked copy
        assert os.fstat(result.fd).st_nlink == 0
        u.release(result)
    assert sorted(os.listdir(layers.upper)) == ["big"]
    st = os.lstat(layers.upper / "big")
    assert stat.S_ISCHR(st.st_mode) and st.st_rdev == 0


def test_failed_copy_leaves_nothing_and_the_next_one_works(layers, monkeypatch):
    u = layers.union()
    real_copy_data = copyup.copy_data

    def fail_halfway(src, dst, size):
        os.pwrite(dst, b"partial", 0)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(copyup, "copy_data", fail_halfway)
    with pytest.raises(OSError) as info:
        u.open("/d/small", os.O_WRONLY)
    assert info.value.errno == errno.ENOSPC
    assert os.listdir(layers.staging) == [] and not (layers.upper / "d" / "small").exists()
    monkeypatch.setattr(copyup, "copy_data", real_copy_data)
    u.release(u.open("/d/small", os.O_WRONLY))
    assert (layers.upper / "d" / "small").read_bytes() == b"small"
