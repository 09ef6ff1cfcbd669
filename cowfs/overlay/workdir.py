"""Claiming a workdir for one mount: the locks on upper and work directories, the staging directory, the volatile mark.

What a mount must settle before it serves a single request: that no other
mount (cowfs or the kernel's) uses the upper or workdir, that an earlier
volatile mount did not leave the upper in doubt, that leftovers of an
interrupted mount are gone, and that the upper takes the overlay's xattrs.
Nothing in the workdir is followed out of it: it is worked on through
directory descriptors, and a symlink is removed, never followed.
"""

import errno
import os
import shlex
import shutil
import stat
import time

from cowfs import mounttable
from cowfs.errors import StackError
from cowfs.overlay import acl, copyup, handles
from cowfs.overlay.filesystems import Filesystems, settle_uuid
from cowfs.overlay.stack import parse_options, unescape
from cowfs.overlay.whiteout import KERNEL_ORIGIN, OPAQUE, UPPER, set_marker
from cowfs.runtime import drop_lock, holds_lock, leave_lock, records, take_lock

INDEX_SUBDIR = "index"  # index=on: the kernel's index of copied-up lower hard links, by origin file handle
WORK_SUBDIR = "work"  # the same staging directory the kernel uses, so either cleans the other's leftovers
VOLATILE_MARK = "incompat/volatile"  # in WORK_SUBDIR: left by a volatile mount, refused by the next one
LOCK_WAIT = 5.0  # seconds a mount waits for a lock whose holder's mount is gone (its daemon still exiting)
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC


class Workdir:
    """The claimed work directory of a mount: `work` is where changes are staged."""

    def __init__(self, stack):
        self.stack = stack
        self.work = stack.work + "/" + WORK_SUBDIR
        self.index = None  # WORKDIR/index once index=on is set up
        self.warnings = []  # what the mount does otherwise than asked, one line each (index=on turned off)
        self.uuid = None  # the overlay's UUID (uuid=on, or auto on a new upper), as its upper root keeps it
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


def claim(stack, filesystems=None):
    """Lock the upper and work directories for this mount, clear what an interrupted one left in the workdir,
    and settle the overlay's UUID (`filesystems`: the stack's, see filesystems.py)."""
    claimed = Workdir(stack)
    try:
        _claim(claimed, stack, filesystems or Filesystems(stack))
    except BaseException:
        claimed.close()
        raise
    return claimed


def _claim(claimed, stack, filesystems):
    _refuse_kernel_overlay_users(stack)
    for role, path in (("upperdir", stack.upper), ("workdir", stack.work)):
        claimed._locks.append(_lock(role, path))
    staging = _empty_staging(stack.work)
    try:
        if stack.volatile:
            incompat, volatile = VOLATILE_MARK.split("/")  # both mode 000 as the kernel makes them (see _staging_mode)
            os.mkdir(incompat, _staging_mode(), dir_fd=staging)
            fd = os.open(incompat, _DIR_FLAGS | os.O_NOFOLLOW, dir_fd=staging)
            try:
                os.mkdir(volatile, _staging_mode(), dir_fd=fd)
            finally:
                os.close(fd)
    finally:
        os.close(staging)
    probe = copyup.temp_name(claimed.work)
    os.mkdir(probe, 0o700)
    try:
        set_marker(probe, stack.prefix, OPAQUE, "y")
    except OSError as e:
        raise StackError(f"upperdir {stack.upper}: cannot set {stack.prefix}* xattrs ({e.strerror})"
                         + ("" if stack.userxattr else "; try the userxattr option")) from None
    finally:
        os.rmdir(probe)
    claimed.uuid = settle_uuid(filesystems, stack.upper, stack.prefix)
    claimed.warnings.extend(filesystems.warnings)
    if stack.index:
        _set_up_index(claimed, stack, filesystems)


def _set_up_index(claimed, stack, filesystems):
    """index=on, as the kernel mounts it: the upper root records the top lower root as its origin (a
    different one refuses the mount: the index would name other files), WORKDIR/index exists and
    records the upper root as its `upper`. Without file handles on every layer, index stays off
    with a warning, as the kernel's."""
    if not all(handles.supports_handles(p) for p in (stack.upper, *stack.lowers)):
        claimed.warnings.append("index=on: a layer's filesystem gives no file handles; going on with index=off")
        return
    if filesystems.uuids_ambiguous:
        claimed.warnings.append("index=on: two lower filesystems have the same UUID; going on with index=off")
        return
    lower_root = stack.lowers[0]
    origin = handles.encode(lower_root, filesystems.handle_uuid(os.stat(lower_root).st_dev))
    _verify_or_set(stack.upper, stack.prefix + KERNEL_ORIGIN, origin,
                   f"upperdir {stack.upper}: its origin is not lowerdir {lower_root} (made over other lower "
                   "layers); index=on refuses it, as the kernel does (ESTALE)")
    index = stack.work + "/" + INDEX_SUBDIR
    try:
        os.mkdir(index, _staging_mode())
    except FileExistsError:
        if not stat.S_ISDIR(os.lstat(index).st_mode):
            raise StackError(f"workdir {stack.work}: {INDEX_SUBDIR} is not a directory") from None
    upper = handles.encode(stack.upper, filesystems.handle_uuid(os.stat(stack.upper).st_dev), upper=True)
    _verify_or_set(index, stack.prefix + UPPER, upper,
                   f"workdir {stack.work}: its index belongs to another upperdir than {stack.upper}; index=on "
                   "refuses it, as the kernel does (ESTALE)")
    claimed.index = index


def _verify_or_set(path, name, value, mismatch):
    """Set xattr `name` of `path` to `value`, or check that it holds it already (StackError `mismatch` if not)."""
    try:
        held = os.getxattr(path, name, follow_symlinks=False)
    except OSError as e:
        if e.errno != errno.ENODATA:
            raise
        os.setxattr(path, name, value, follow_symlinks=False)
        return
    if held != value:
        raise StackError(mismatch)


def _refuse_kernel_overlay_users(stack):
    """Refuse an upper or workdir that a kernel overlay uses (as its upper or workdir), however either spells it."""
    ours = [(role, path, os.stat(path)) for role, path in (("upperdir", stack.upper), ("workdir", stack.work))]
    for m in mounttable.read():
        if m.fstype != "overlay":
            continue
        for key, _, value in (opt.partition("=") for opt in m.options):
            if key not in ("upperdir", "workdir") or not value.startswith("/"):
                continue
            try:
                theirs = os.stat(unescape(value))
            except OSError:
                continue  # not reachable from here: not ours
            for role, path, st in ours:
                if os.path.samestat(st, theirs):
                    raise StackError(f"{role} {path}: already in use by the kernel overlay at {m.mountpoint}")


def _lock(role, path):
    """Lock `path` for this mount. A holder with a live cowfs mount is refused at once; a holder whose
    mount is already gone (its daemon still exiting) or not yet up is waited for, LOCK_WAIT seconds at most."""
    deadline = time.monotonic() + LOCK_WAIT
    while True:
        lock = take_lock(path)
        if lock is not None:
            return lock
        mountpoint = _cowfs_mount_using(path)
        if mountpoint is not None:
            raise StackError(f"{role} {path}: already in use by the cowfs mount at {mountpoint}")
        if holds_lock(path) or time.monotonic() > deadline:
            raise StackError(f"{role} {path}: already in use by another cowfs mount")
        time.sleep(0.02)


def _cowfs_mount_using(path):
    """The mount point of the live cowfs mount whose upper or workdir is `path`, or None."""
    st = os.stat(path)
    for record in records():
        try:
            stack = parse_options([record["options"]])
        except (KeyError, StackError):
            continue
        for used in (stack.upper, stack.work):
            try:
                if used is not None and os.path.samestat(os.stat(used), st):
                    return record["mountpoint"]
            except OSError:
                continue
    return None


def _empty_staging(work):
    """Make WORK_SUBDIR of `work` an empty directory of its own and return a descriptor of it.

    Nothing there is followed: a symlink or any other non-directory in its
    place is removed and a directory made instead, as the kernel does, and its
    leftovers are removed through directory descriptors (a symlink among them
    goes, not what it points to). A volatile mount's mark refuses the mount.
    As the kernel's, it keeps no ACL and no set-group-ID bit that it inherited
    from the workdir: whiteouts and copies are made in it.
    """
    parent = os.open(work, _DIR_FLAGS)
    try:
        try:
            if not stat.S_ISDIR(os.lstat(WORK_SUBDIR, dir_fd=parent).st_mode):
                os.unlink(WORK_SUBDIR, dir_fd=parent)
        except FileNotFoundError:
            pass
        try:
            os.mkdir(WORK_SUBDIR, _staging_mode(), dir_fd=parent)
        except FileExistsError:
            pass
        staging = os.open(WORK_SUBDIR, _DIR_FLAGS | os.O_NOFOLLOW, dir_fd=parent)
    finally:
        os.close(parent)
    try:  # as the kernel's: nothing built here takes an ACL or a group from the workdir
        for name in (acl.DEFAULT, acl.ACCESS):
            try:
                os.removexattr(staging, name)
            except OSError as e:
                if e.errno not in (errno.ENODATA, errno.EOPNOTSUPP):
                    raise
        os.fchmod(staging, _staging_mode())  # also clears a set-group-ID bit it inherited
    except BaseException:
        os.close(staging)
        raise
    try:
        if _lexists_at(staging, VOLATILE_MARK):  # as the kernel: after a volatile mount, the upper may be damaged
            mark = f"{work}/{WORK_SUBDIR}/{VOLATILE_MARK}"
            raise StackError(f"workdir {work}: a volatile mount used it, so a crash may have lost data "
                             f"in the upper (if you know it did not: rm -r {shlex.quote(mark)})")
        for entry in list(os.scandir(staging)):
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.name, dir_fd=staging)
            else:
                os.unlink(entry.name, dir_fd=staging)
    except BaseException:
        os.close(staging)
        raise
    return staging


def _staging_mode():
    """The kernel makes W/work mode 000: only a caller that passes every permission check (root)
    can use it. An unprivileged mount needs it 0700, which keeps it as private."""
    return 0o000 if os.geteuid() == 0 else 0o700


def _lexists_at(dir_fd, relative):
    """Whether `relative` exists below the directory open at `dir_fd`, following no symlink on the way."""
    *dirs, name = relative.split("/")
    fd = os.dup(dir_fd)
    try:
        for d in dirs:
            try:
                sub = os.open(d, _DIR_FLAGS | os.O_NOFOLLOW, dir_fd=fd)
            except OSError:  # missing, or not a directory (a symlink is not followed)
                return False
            os.close(fd)
            fd = sub
        try:
            os.lstat(name, dir_fd=fd)
        except FileNotFoundError:
            return False
        return True
    finally:
        os.close(fd)
