"""The test toolkit's shared daemon (cowfs.testing.shared): many mounts served by one process.

Each mount behaves as a `cowfs mount` of the same stack does, which here
means as the kernel overlay does: the same operations on both give the same
merged tree and the same upper directory. Refusals are one line and leave
the daemon serving; closing it unmounts what is left and ends its process.
"""

from __future__ import annotations

import os
import shutil

import pytest

from cowfs.testing.harness import upper_snapshot
from cowfs.testing.mounts import MountError, is_mounted, kernel_overlay, privileged
from cowfs.testing.shared import SharedDaemon
from cowfs.testing.tree import diff_snapshots, snapshot

pytestmark = pytest.mark.fuse


def _layers(base):
    lower = os.path.join(base, "lower")
    os.makedirs(os.path.join(lower, "dir", "sub"))
    for rel, data in (("file", b"lower file\n"), ("dir/a", b"a"), ("dir/sub/b", b"b")):
        with open(os.path.join(lower, rel), "wb") as f:
            f.write(data)
    return lower


def _change(root):
    with open(os.path.join(root, "file"), "ab") as f:  # copy-up
        f.write(b"appended\n")
    os.unlink(os.path.join(root, "dir", "a"))  # a whiteout
    os.rename(os.path.join(root, "dir", "sub", "b"), os.path.join(root, "moved"))
    os.mkdir(os.path.join(root, "new"))
    with open(os.path.join(root, "new", "c"), "wb") as f:
        f.write(b"c")


def _fresh(base, name):
    upper, work, mnt = (os.path.join(base, f"{name}-{part}") for part in ("upper", "work", "mnt"))
    for d in (upper, work, mnt):
        shutil.rmtree(d, ignore_errors=True)
        os.mkdir(d)
    return upper, work, mnt


@pytest.mark.kernel
def test_each_mount_of_the_shared_daemon_behaves_as_the_kernel_overlay(shared_tmp):
    lower = _layers(shared_tmp)
    k_upper, k_work, k_mnt = _fresh(shared_tmp, "kernel")
    with kernel_overlay([lower], k_upper, k_work, k_mnt):
        _change(k_mnt)
        kernel_tree = snapshot(k_mnt)
    with SharedDaemon() as daemon:
        for i in range(12):  # one daemon, many mounts: each like the kernel's
            upper, work, mnt = _fresh(shared_tmp, "shared")
            with daemon.mounted([lower], upper, work, mnt) as path:
                assert is_mounted(path)
                _change(path)
                assert diff_snapshots(kernel_tree, snapshot(path), "kernel", f"shared mount {i}") == ""
            assert not is_mounted(mnt)
            userxattr = not privileged()
            assert diff_snapshots(upper_snapshot(k_upper, userxattr), upper_snapshot(upper, userxattr),
                                  "kernel upper", "shared upper") == ""
        pid = daemon.process.pid
    assert daemon.process.returncode == 0 and not os.path.exists(f"/proc/{pid}/status")


def test_a_refused_mount_is_one_line_and_the_daemon_goes_on(shared_tmp):
    lower = _layers(shared_tmp)
    upper, work, mnt = _fresh(shared_tmp, "a")
    with SharedDaemon() as daemon:
        with pytest.raises(MountError) as info:
            daemon.mount([os.path.join(shared_tmp, "missing")], upper, work, mnt)
        assert "missing: No such file or directory" in str(info.value) and "\n" not in str(info.value)
        with daemon.mounted([lower], upper, work, mnt):
            with pytest.raises(MountError) as info:  # the same mount point again
                daemon.mount([lower], *(_fresh(shared_tmp, "b")[:2]), mnt)
            assert "busy" in str(info.value)
            with open(os.path.join(mnt, "file"), "rb") as f:
                assert f.read() == b"lower file\n"
        assert not is_mounted(mnt)


def test_closing_unmounts_what_is_left(shared_tmp):
    lower = _layers(shared_tmp)
    daemon = SharedDaemon()
    try:
        mounts = []
        for name in ("x", "y"):
            upper, work, mnt = _fresh(shared_tmp, name)
            mounts.append(daemon.mount([lower], upper, work, mnt))
        assert all(is_mounted(m) for m in mounts)
    finally:
        daemon.close()
    assert not any(is_mounted(m) for m in mounts)
    assert daemon.process.returncode == 0
    with pytest.raises(MountError):  # after close, a request fails: it is not silently lost
        daemon.mount([lower], *_fresh(shared_tmp, "z"))
