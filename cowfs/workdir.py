"""Claiming a workdir for one mount: the locks on upper and work directories, the staging directory, the volatile mark.

What a mount must settle before it serves a single request: that no other
mount (cowfs or the kernel's) uses the upper or workdir, that an earlier
volatile mount did not leave the upper in doubt, that leftovers of an
interrupted mount are gone, and that the upper takes the overlay's xattrs.
"""

import os

from . import copyup
from .errors import StackError
from .runtime import drop_lock, leave_lock, take_lock
from .whiteout import OPAQUE, set_marker

WORK_SUBDIR = "work"  # the same staging directory the kernel uses, so either cleans the other's leftovers
VOLATILE_MARK = "incompat/volatile"  # in WORK_SUBDIR: left by a volatile mount, refused by the next one


class Workdir:
    """The claimed work directory of a mount: `work` is where changes are staged."""

    def __init__(self, stack):
        self.stack = stack
        self.work = stack.work + "/" + WORK_SUBDIR
        self._locks = []  # (fd, path) of the upper and work directories' locks

    def close(self):
        """Release the locks; the workdir must not be used afterwards."""
        for lock in self._locks:
            drop_lock(lock)
        self._locks = []

    def hand_over(self):
        """After fork, in the parent: the child (the daemon) holds the locks now; this process lets go of them."""
        for lock in self._locks:
            leave_lock(lock)
        self._locks = []


def claim(stack):
    """Lock the upper and work directories for this mount, and clear what an interrupted one left in the workdir."""
    claimed = Workdir(stack)
    try:
        _claim(claimed, stack)
    except BaseException:
        claimed.close()
        raise
    return claimed


def _claim(claimed, stack):
    for line in _read_mounts():
        fields = line.split()
        if len(fields) > 3 and fields[2] == "overlay":
            opts = fields[3].split(",")
            if f"upperdir={stack.upper}" in opts or f"workdir={stack.work}" in opts:
                raise StackError(f"upperdir {stack.upper}: already in use by the kernel overlay at {fields[1]}")
    for role, path in (("upperdir", stack.upper), ("workdir", stack.work)):
        lock = take_lock(path)
        if lock is None:
            raise StackError(f"{role} {path}: already in use by another cowfs mount")
        claimed._locks.append(lock)
    work = claimed.work
    volatile_mark = work + "/" + VOLATILE_MARK
    if os.path.lexists(volatile_mark):  # as the kernel: after a volatile mount, the upper may be damaged
        raise StackError(f"workdir {stack.work}: a volatile mount used it, so a crash may have lost data "
                         f"in the upper (remove {volatile_mark} if you know it did not)")
    if os.path.lexists(work):
        for name in os.listdir(work):
            copyup.discard(work + "/" + name)
    else:
        os.mkdir(work, 0o000)
    if stack.volatile:
        os.makedirs(volatile_mark, 0o700)
    probe = copyup.temp_name(work)
    os.mkdir(probe, 0o700)
    try:
        set_marker(probe, stack.prefix, OPAQUE, "y")
    except OSError as e:
        raise StackError(f"upperdir {stack.upper}: cannot set {stack.prefix}* xattrs ({e.strerror})"
                         + ("" if stack.userxattr else "; try the userxattr option")) from None
    finally:
        os.rmdir(probe)


def _read_mounts():
    try:
        with open("/proc/self/mounts") as f:
            return f.read().splitlines()
    except OSError:
        return []
