"""Where cowfs keeps what lives as long as a mount: a record per mount and the locks on upper and work dirs.

Nothing here is on a layer's filesystem, so a daemon never keeps a layer busy.
"""

import fcntl
import json
import os
import stat

from cowfs import mounttable
from cowfs.errors import CowfsError

_held = set()  # the lock files this process holds


def runtime_dir():
    """/run/cowfs for root; $XDG_RUNTIME_DIR/cowfs for a user (or the root of a user namespace), or /tmp/cowfs-UID/cowfs
    without one."""
    if os.geteuid() == 0 and os.access("/run", os.W_OK):  # not the root of a user namespace: /run is not its own
        return "/run/cowfs"
    return os.path.join(os.environ.get("XDG_RUNTIME_DIR") or f"/tmp/cowfs-{os.geteuid()}", "cowfs")


def private_dir(path):
    """Make `path` (and a missing /tmp/cowfs-UID above it) a directory only this user can use, and return it.

    Another user could pre-create a predictable name in /tmp, or a symlink there, to read
    or forge mount records and locks: a directory that is a symlink, is not ours or is
    open to others is refused with one line, never used.
    """
    parent = os.path.dirname(path)
    if os.geteuid() != 0 and parent == f"/tmp/cowfs-{os.geteuid()}":
        _own_private(parent)
    else:
        os.makedirs(parent, mode=0o700, exist_ok=True)
    _own_private(path)
    return path


def _own_private(path):
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode):
        raise CowfsError(f"runtime directory {path}: not a directory (a symlink?); remove it, or set XDG_RUNTIME_DIR")
    if st.st_uid != os.geteuid():
        raise CowfsError(f"runtime directory {path}: owned by uid {st.st_uid}, not by you; remove it, "
                         "or set XDG_RUNTIME_DIR")
    if st.st_mode & 0o022:  # others may have put records or locks there
        raise CowfsError(f"runtime directory {path}: writable by other users (mode {stat.S_IMODE(st.st_mode):04o}); "
                         "remove it")
    if st.st_mode & 0o077:  # made by an older cowfs (0755): ours, and nobody else could write to it
        os.chmod(path, 0o700, follow_symlinks=False)


def record_path(mountpoint):
    """The record of the mount at `mountpoint` (pid, mount point, options), written by its daemon."""
    return os.path.join(runtime_dir(), mountpoint.strip("/").replace("%", "%25").replace("/", "%2F") + ".json")


def read_record(mountpoint):
    try:
        with open(record_path(mountpoint)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def records():
    """The records of the live cowfs mounts, as dicts, in mount point order."""
    live = {m.mountpoint for m in mounttable.read() if m.fstype == "fuse.cowfs"}
    return [record for record in map(read_record, sorted(live)) if record is not None]


def lock_path(directory):
    """The lock file of a directory, named by its device and inode so that every spelling of it agrees."""
    st = os.stat(directory)
    locks = private_dir(os.path.join(private_dir(runtime_dir()), "locks"))
    return os.path.join(locks, f"{st.st_dev}-{st.st_ino}.lock")


def take_lock(directory):
    """Lock `directory` for this process without waiting: the lock's (fd, path), or None when another mount holds it.

    The file goes away with the lock (`drop_lock`), so locks do not pile up; a
    file removed between our open and our lock is not the lock any more, and
    we open the new one.
    """
    path = lock_path(directory)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        try:
            if os.path.samestat(os.fstat(fd), os.stat(path)):
                _held.add(path)
                return fd, path
        except FileNotFoundError:
            pass
        os.close(fd)


def holds_lock(directory):
    """Whether this process holds the lock of `directory`."""
    return lock_path(directory) in _held


def drop_lock(lock):
    fd, path = lock
    try:
        os.unlink(path)  # while still holding it: nobody can take a file that is about to go
    except FileNotFoundError:
        pass
    _held.discard(path)
    os.close(fd)


def leave_lock(lock):
    """Close this process's descriptor of a lock a forked child goes on holding."""
    _held.discard(lock[1])
    os.close(lock[0])
