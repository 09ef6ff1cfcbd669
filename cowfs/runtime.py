"""Where cowfs keeps what lives as long as a mount: a record per mount and the locks on upper and work dirs.

Nothing here is on a layer's filesystem, so a daemon never keeps a layer busy.
"""

import fcntl
import os


def runtime_dir():
    if os.geteuid() == 0:
        return "/run/cowfs"
    return os.path.join(os.environ.get("XDG_RUNTIME_DIR") or f"/tmp/cowfs-{os.geteuid()}", "cowfs")


def lock_path(directory):
    """The lock file of a directory, named by its device and inode so that every spelling of it agrees."""
    st = os.stat(directory)
    locks = os.path.join(runtime_dir(), "locks")
    os.makedirs(locks, mode=0o700, exist_ok=True)
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
                return fd, path
        except FileNotFoundError:
            pass
        os.close(fd)


def drop_lock(lock):
    fd, path = lock
    try:
        os.unlink(path)  # while still holding it: nobody can take a file that is about to go
    except FileNotFoundError:
        pass
    os.close(fd)


def leave_lock(lock):
    """Close this process's descriptor of a lock a forked child goes on holding."""
    os.close(lock[0])
