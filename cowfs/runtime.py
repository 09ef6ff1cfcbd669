"""Where cowfs keeps what lives as long as a mount: a record per mount and the locks on upper and work dirs.

Nothing here is on a layer's filesystem, so a daemon never keeps a layer busy.
"""

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
