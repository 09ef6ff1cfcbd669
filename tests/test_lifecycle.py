"""A mount's life around the daemon: what it refuses before mounting, what it may touch, and when it lets go.

- a layer inside the mount point is refused (the daemon would look it up
  through its own mount, and hang);
- an upper freshly unmounted can be mounted again at once, though its old
  daemon has not let go yet;
- nothing in the workdir is followed out of it (a symlink at W/work or in it);
- a mount whose path is not UTF-8 breaks no command;
- an upper used by a kernel overlay is noticed whatever path spells it.

Every test that mounts unmounts in finally; anything that could hang runs
under a timeout, and a hung cowfs mount is aborted through fusectl.
"""

import contextlib
import os
import re
import signal
import subprocess
import sys
import threading
import time

import pytest

from cowfs import mounttable
from cowfs.runtime import drop_lock, take_lock
from cowfs.testing import mounts
from cowfs.testing.mounts import force_unmount, mounts_under, pids_with_argument, wait_gone

COWFS = [sys.executable, "-m", "cowfs"]
pytestmark = pytest.mark.fuse


def run_cowfs(*args, timeout=30):
    return subprocess.run(COWFS + [os.fsdecode(a) for a in args], stdin=subprocess.DEVNULL, check=False,
                          capture_output=True, text=True, timeout=timeout, errors="replace")


def is_mounted(path):
    """Whether `path` (a real path) is a mount point; never looks at the mount itself, which may hang."""
    return os.fspath(path) in [m.mountpoint for m in mounttable.read()]


def abort_connection(mountpoint):
    """Fail every pending and future request of the FUSE mount at `mountpoint`, without touching the mount."""
    try:
        connection = mounts.fuse_connection(mountpoint)
    except mounts.MountError:
        return
    with contextlib.suppress(OSError):
        mounts.abort_connection(connection)


def cleanup(*mountpoints):
    """Unmount whatever is left (aborting it first: it may be hung) and wait for the daemons."""
    for mnt in mountpoints:
        daemons = pids_with_argument(os.fspath(mnt))
        for pid in daemons:
            os.kill(pid, signal.SIGCONT)
        if is_mounted(mnt):
            abort_connection(mnt)
            force_unmount(mnt)
        wait_gone(daemons)


def assert_refused(result, *named, reason):
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode != 0, f"accepted; stderr: {result.stderr!r}"
    assert len(lines) == 1, f"expected one stderr line, got {lines!r}"
    for text in named:
        assert os.fsdecode(text) in lines[0], f"{text!r} not named in {lines[0]!r}"
    assert re.search(reason, lines[0], re.IGNORECASE), f"reason /{reason}/ not in {lines[0]!r}"


@pytest.fixture
def T(tmp_path):
    for name in ("l", "u", "w", "m", "m2"):
        (tmp_path / name).mkdir()
    (tmp_path / "l" / "f").write_text("lower")
    yield tmp_path
    left = mounts_under(tmp_path)
    cleanup(*sorted((mnt for mnt, _ in left), reverse=True))
    assert not left, f"test left mounts behind (now unmounted): {left}"


def opts(T, lower=None, upper=None, work=None):
    return f"lowerdir={lower or T / 'l'},upperdir={upper or T / 'u'},workdir={work or T / 'w'}"


# ---------------------------------------------------------------------------------------------
# 1. a layer inside the mount point


def _bind(source, target):
    subprocess.run(["mount", "--bind", str(source), str(target)], check=True, capture_output=True)


@pytest.mark.parametrize("spelling", ["lower", "lower via symlink", "lower via bind mount", "upper and work"])
def test_layer_inside_the_mount_point_is_refused(T, spelling):
    (T / "m" / "inner").mkdir()
    (T / "m" / "u").mkdir()
    (T / "m" / "w").mkdir()
    os.symlink(T / "m", T / "link")
    (T / "bound").mkdir()
    layer, o = {
        "lower": (T / "m" / "inner", lambda: opts(T, lower=T / "m" / "inner")),
        "lower via symlink": (T / "link" / "inner", lambda: opts(T, lower=T / "link" / "inner")),
        "lower via bind mount": (T / "bound" / "inner", lambda: opts(T, lower=T / "bound" / "inner")),
        "upper and work": (T / "m" / "u", lambda: opts(T, upper=T / "m" / "u", work=T / "m" / "w")),
    }[spelling]
    if spelling == "lower via bind mount":
        _bind(T / "m", T / "bound")
    watchdog = threading.Timer(20.0, abort_connection, (T / "m",))  # the old bug: anything touching it hangs
    watchdog.start()
    try:
        result = run_cowfs("mount", "-o", o(), T / "m")
        mounted = is_mounted(T / "m")
    finally:
        watchdog.cancel()
        cleanup(T / "m")
        if spelling == "lower via bind mount":
            force_unmount(T / "bound")
    assert_refused(result, layer, T / "m", reason="inside the mount point")
    assert not mounted
    assert sorted(os.listdir(T / "m")) == ["inner", "u", "w"], "the failed mount created something"


# ---------------------------------------------------------------------------------------------
# 2. an upper freshly unmounted can be mounted again at once


def _daemon_of(mnt):
    pids = pids_with_argument(os.fspath(mnt))
    assert len(pids) == 1, pids
    return pids.pop()


def test_remount_at_once_waits_for_the_old_daemon_to_let_go(T):
    """The old daemon is stopped, so it holds its locks after its mount is gone; the new mount waits for it."""
    assert run_cowfs("mount", "-o", opts(T), T / "m").returncode == 0
    old = _daemon_of(T / "m")
    wake = threading.Timer(1.0, os.kill, (old, signal.SIGCONT))
    try:
        os.kill(old, signal.SIGSTOP)
        subprocess.run(["umount", "-c", str(T / "m")], check=True, timeout=10)  # -c: no stat of the stopped mount
        wake.start()
        result = run_cowfs("mount", "-o", opts(T), T / "m")
        assert result.returncode == 0, result.stderr
        assert (T / "m" / "f").read_text() == "lower"
    finally:
        wake.cancel()
        os.kill(old, signal.SIGCONT)
        cleanup(T / "m")
    assert wait_gone({old})


def test_upper_of_a_live_cowfs_mount_is_refused_at_once_naming_it(T):
    assert run_cowfs("mount", "-o", opts(T), T / "m").returncode == 0
    try:
        start = time.monotonic()
        result = run_cowfs("mount", "-o", opts(T), T / "m2")
        took = time.monotonic() - start
    finally:
        cleanup(T / "m2", T / "m")
    assert_refused(result, T / "u", T / "m", reason="already in use by the cowfs mount at")
    assert took < 2.0, f"waited {took:.1f}s for a lock whose mount is live"


def test_a_holder_that_never_lets_go_is_waited_for_a_bounded_time(T):
    lock = take_lock(str(T / "u"))  # this process: a holder without a mount
    try:
        start = time.monotonic()
        result = run_cowfs("mount", "-o", opts(T), T / "m")
        took = time.monotonic() - start
    finally:
        drop_lock(lock)
        cleanup(T / "m")
    assert_refused(result, T / "u", reason="already in use by another cowfs mount")
    assert 1.0 < took < 15.0


def test_a_holder_without_a_mount_that_lets_go_soon_is_waited_for(T):
    lock = take_lock(str(T / "u"))
    release = threading.Timer(1.0, drop_lock, (lock,))
    release.start()
    try:
        result = run_cowfs("mount", "-o", opts(T), T / "m")
        assert result.returncode == 0, result.stderr
    finally:
        release.join()
        cleanup(T / "m")


# ---------------------------------------------------------------------------------------------
# 3. nothing in the workdir is followed out of it


@pytest.fixture
def victim(tmp_path):
    """A directory full of files that a mount must never touch."""
    v = tmp_path / "victim"
    (v / "sub").mkdir(parents=True)
    for name in ("a", "b", "sub/c"):
        (v / name).write_text(name)
    return v


def _victim_intact(v):
    return sorted(str(p.relative_to(v)) for p in v.rglob("*")) == ["a", "b", "sub", "sub/c"]


@pytest.mark.parametrize("where", ["W/work is a symlink", "W/work is a file", "symlinks inside W/work"])
def test_nothing_in_the_workdir_is_followed(T, victim, where):
    work = T / "w" / "work"
    if where == "W/work is a symlink":
        os.symlink(victim, work)
    elif where == "W/work is a file":
        work.write_text("junk")
    else:
        (work / "#leftover").mkdir(parents=True)
        os.symlink(victim, work / "link")
        os.symlink(victim, work / "#leftover" / "link")
        os.symlink(victim / "sub", work / "#leftover" / "sub")
    try:
        result = run_cowfs("mount", "-o", opts(T), T / "m")
        assert result.returncode == 0, result.stderr
        (T / "m" / "new").write_text("staged in W/work, renamed into the upper")
        (T / "m" / "f").write_text("copied up")
    finally:
        cleanup(T / "m")
    assert _victim_intact(victim), f"the mount followed a symlink into {victim}: {list(victim.rglob('*'))}"
    assert work.is_dir() and not work.is_symlink()
    assert (T / "u" / "new").is_file() and (T / "u" / "f").read_text() == "copied up"


# ---------------------------------------------------------------------------------------------
# 4. a mount whose path is not UTF-8


def test_mount_table_undoes_every_escape(tmp_path):
    table = tmp_path / "mounts"
    table.write_bytes(b"src\\040a /mnt/a\\040b\\011c\\012d\\134e\\377 fuse.cowfs rw,x=1\\054y 0 0\n"
                      b"overlay /o overlay lowerdir=/l\\134:x\\134\\054y,upperdir=/u 0 0\n")
    rows = mounttable.read(str(table))
    assert rows[0] == ("src a", os.fsdecode(b"/mnt/a b\tc\nd\\e\xff"), "fuse.cowfs", ["rw", "x=1,y"])
    assert rows[1].options == ["lowerdir=/l\\:x\\,y", "upperdir=/u"]
    assert os.fsencode(rows[0].mountpoint) == b"/mnt/a b\tc\nd\\e\xff"
    info = tmp_path / "mountinfo"
    info.write_bytes(b"36 35 0:52 / /mnt/a\\040b\\377 rw,nosuid shared:1 master:2 - fuse.cowfs src\\040a rw,user_id=0\n"
                     b"37 36 0:53 /sub /o rw - overlay overlay rw,lowerdir=/l\n")
    rows = mounttable.read_info(str(info))
    assert rows[0] == (36, 35, 0, 52, "/", os.fsdecode(b"/mnt/a b\xff"), "fuse.cowfs", "src a")
    assert (rows[1].minor, rows[1].root, rows[1].mountpoint, rows[1].fstype) == (53, "/sub", "/o", "overlay")


def test_a_mount_whose_path_is_not_utf8_breaks_no_command(T):
    odd = os.fsencode(T) + b"/odd\xff dir"
    os.mkdir(odd)
    subprocess.run([b"mount", b"-t", b"tmpfs", b"cowfs-test", odd], check=True, capture_output=True)
    try:
        assert os.fsdecode(odd) in [m.mountpoint for m in mounttable.read()]
        status = run_cowfs("status")
        assert status.returncode == 0 and "Traceback" not in status.stderr, status.stderr
        mounted = run_cowfs("mount", "-o", opts(T), T / "m")
        assert mounted.returncode == 0, mounted.stderr
        assert run_cowfs("status", T / "m").returncode == 0
        unmounted = run_cowfs("umount", T / "m")
        assert unmounted.returncode == 0, unmounted.stderr
    finally:
        cleanup(T / "m")
        subprocess.run([b"umount", odd], check=False, capture_output=True)
    assert not is_mounted(T / "m")


# ---------------------------------------------------------------------------------------------
# 5. an upper used by a kernel overlay, whatever path spells it


@pytest.mark.kernel
@pytest.mark.parametrize("role", ["upperdir", "workdir"])
def test_upper_of_a_kernel_overlay_spelled_through_a_symlink_is_refused(T, role):
    os.symlink(T, T / "via")
    kernel_dirs = {"upperdir": T / "via" / "u", "workdir": T / "via" / "w"}
    (T / "ku").mkdir()
    (T / "kw").mkdir()
    kernel_opts = f"lowerdir={T / 'l'}," + ",".join(
        f"{r}={kernel_dirs[r] if r == role else T / ('k' + r[0])}" for r in ("upperdir", "workdir"))
    subprocess.run(["mount", "-t", "overlay", "overlay", "-o", kernel_opts, str(T / "m2")], check=True,
                   capture_output=True)
    try:
        result = run_cowfs("mount", "-o", opts(T), T / "m")
    finally:
        cleanup(T / "m")
        subprocess.run(["umount", str(T / "m2")], check=False, capture_output=True)
    assert_refused(result, T / "m2", reason="already in use by the kernel overlay at")


def test_a_refused_mount_removes_the_directories_it_made(T):
    """`--upper U` makes U and U.work when missing; a refusal takes them away again."""
    (T / "m" / "inner").mkdir()
    result = run_cowfs("mount", T / "m" / "inner", "--upper", T / "new" / "upper", T / "m")
    cleanup(T / "m")
    assert_refused(result, T / "m" / "inner", reason="inside the mount point")
    assert not (T / "new").exists(), f"left behind: {sorted(map(str, (T / 'new').rglob('*')))}"


def test_a_mount_point_over_the_runtime_directory_is_refused(T, monkeypatch):
    """The daemon writes its record there once the mount is live: through its own mount, it would wait forever."""
    from cowfs.daemon import mount as mounting
    from cowfs.errors import StackError
    from cowfs.overlay.stack import parse_options

    monkeypatch.setattr(mounting, "runtime_dir", lambda: str(T / "m" / "run" / "cowfs"))
    with pytest.raises(StackError, match="would hide cowfs's runtime directory"):
        mounting.mount(parse_options([opts(T)]), str(T / "m"))
    assert not is_mounted(T / "m") and os.listdir(T / "m") == []
