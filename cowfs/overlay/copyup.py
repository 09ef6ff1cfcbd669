"""Copy-up: bring a lower object into the upper, whole or not at all, as the kernel overlay does.

Everything is built under the workdir and renamed into the upper in one
step, so a crash leaves either no copy or a complete one. Data moves by the
kernel (copy_file_range, then sendfile, then read/write of large blocks),
only over the data extents of the source, so holes stay holes.
"""

import errno
import itertools
import os
import stat

from cowfs.overlay.syscalls import RENAME_NOREPLACE, rename2
from cowfs.overlay.whiteout import METACOPY, ORIGIN, is_private_xattr, set_marker

CHUNK = 1 << 30
_names = itertools.count()


def temp_name(work):
    """A fresh name in the staging directory."""
    return f"{work}/#cowfs-{os.getpid()}-{next(_names)}"


def _extents(fd, size):
    """Yield (offset, length) of the data extents of a file, skipping holes."""
    offset = 0
    while offset < size:
        try:
            start = os.lseek(fd, offset, os.SEEK_DATA)
        except OSError as e:
            if e.errno == errno.ENXIO:
                return  # only a hole is left
            if e.errno == errno.EINVAL:  # no SEEK_DATA on this filesystem: one extent
                yield offset, size - offset
                return
            raise
        end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
        yield start, end - start
        offset = end


def _copy_range(src, dst, offset, length):
    """Copy `length` bytes at `offset` from src to dst, letting the kernel move the data."""
    done = 0
    strategy = "copy_file_range"
    while done < length:
        want = min(length - done, CHUNK)
        pos = offset + done
        if strategy == "copy_file_range":
            try:
                n = os.copy_file_range(src, dst, want, pos, pos)
            except OSError as e:
                if e.errno not in (errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL):
                    raise
                strategy = "sendfile"
                continue
        elif strategy == "sendfile":
            try:
                os.lseek(dst, pos, os.SEEK_SET)
                n = os.sendfile(dst, src, pos, want)
            except OSError as e:
                if e.errno not in (errno.EINVAL, errno.ENOSYS):
                    raise
                strategy = "read"
                continue
        else:
            data = os.pread(src, min(want, 1 << 20), pos)
            n = os.pwrite(dst, data, pos) if data else 0
        if n == 0:
            break  # the source got shorter than its stat said
        done += n


def copy_data(src, dst, size):
    """Copy a regular file's contents, holes kept, and set the exact size."""
    for offset, length in _extents(src, size):
        _copy_range(src, dst, offset, length)
    os.ftruncate(dst, size)


def copy_xattrs(src, dst, prefix):
    """Copy the user-visible xattrs of `src` (a path, or a descriptor); the overlay's own are never carried over."""
    nofollow = {} if isinstance(src, int) else {"follow_symlinks": False}
    try:
        names = os.listxattr(src, **nofollow)
    except OSError as e:
        if e.errno in (errno.ENOTSUP, errno.EPERM):
            return
        raise
    for name in names:
        if is_private_xattr(name, prefix) or name.startswith("trusted.overlay.") and prefix == "trusted.overlay.":
            continue
        try:
            value = os.getxattr(src, name, **nofollow)
            os.setxattr(dst, name, value, follow_symlinks=False)
        except OSError as e:
            if e.errno not in (errno.ENOTSUP, errno.EPERM, errno.ENODATA):
                raise


def copy_attrs(st, path):
    """Owner, then mode (chown clears setuid), then times: the order that keeps every bit."""
    os.chown(path, st.st_uid, st.st_gid, follow_symlinks=False)
    if not stat.S_ISLNK(st.st_mode):
        os.chmod(path, stat.S_IMODE(st.st_mode))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns), follow_symlinks=False)


def build_copy(src, st, tmp, prefix, origin_ino, metadata_only=False, sync=True):
    """Build at `tmp` a full copy of the object at `src` (type, data, owner, mode, times, xattrs).

    `src` is a path, or for a regular file an open descriptor of it (a file
    open under a name that is gone). Directories are copied empty: their
    entries stay in the lower and merge. With `metadata_only` a regular file
    gets its size but no data (all hole) and the metacopy marker, as the
    kernel's metacopy=on does. The data is synced before the copy is renamed
    into place (unless `sync` is false, for volatile mounts), so a crash never
    leaves an empty file over a lower one.
    """
    mode = st.st_mode
    if stat.S_ISREG(mode):
        fd_out = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            if metadata_only:
                os.ftruncate(fd_out, st.st_size)
            else:
                _copy_into(src, fd_out, st.st_size, sync)
        finally:
            os.close(fd_out)
        if metadata_only:
            set_marker(tmp, prefix, METACOPY, "")
    elif stat.S_ISDIR(mode):
        os.mkdir(tmp, 0o700)
    elif stat.S_ISLNK(mode):
        os.symlink(os.readlink(src), tmp)
    else:
        os.mknod(tmp, stat.S_IFMT(mode) | 0o600, st.st_rdev)
    copy_xattrs(src, tmp, prefix)
    if origin_ino is not None and (stat.S_ISREG(mode) or stat.S_ISDIR(mode) or not prefix.startswith("user.")):
        set_marker(tmp, prefix, ORIGIN, str(origin_ino))  # user.* xattrs exist only on files and directories
    copy_attrs(st, tmp)


def fill_data(src, fd_out, sync=True):
    """Complete a metadata-only copy open at `fd_out` with the data of file `src`. The caller
    removes the marker afterwards, so that until that last step reads still come from `src`."""
    _copy_into(src, fd_out, os.fstat(fd_out).st_size, sync)


def _copy_into(src, fd_out, size, sync):
    """Copy `size` bytes of file `src` (a path, or a descriptor) into `fd_out`, and sync it unless told not to."""
    if isinstance(src, int):  # a descriptor of its own, so that the caller's file offset stays
        fd_in = os.open(f"/proc/self/fd/{src}", os.O_RDONLY | os.O_CLOEXEC)
    else:
        fd_in = os.open(src, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        copy_data(fd_in, fd_out, size)
        if sync:
            os.fsync(fd_out)
    finally:
        os.close(fd_in)


def install(tmp, dst, parent):
    """Rename a finished copy into place at `dst`, in directory `parent`, which keeps its times
    as in the kernel."""
    parent_st = os.lstat(parent)
    rename2(tmp, dst, RENAME_NOREPLACE)
    restore_times(parent, parent_st)


def restore_times(path, st):
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns), follow_symlinks=False)


def discard(path):
    """Remove a staging leftover of any type, a whole tree for a directory.

    The tree is walked through directory descriptors, never through a symlink,
    and without recursion or full paths, so that any depth goes.
    """
    head, name = os.path.split(path)
    parent = os.open(head or ".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        remove_at(parent, name)
    finally:
        os.close(parent)


_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def remove_at(dir_fd, name):
    """Remove entry `name` of the directory open at `dir_fd`, a whole tree for a directory (see `discard`)."""
    try:
        os.unlink(name, dir_fd=dir_fd)
        return
    except FileNotFoundError:
        return
    except IsADirectoryError:
        pass
    fd = os.open(name, _DIR_FLAGS, dir_fd=dir_fd)
    # One open directory at a time; for each level: its name and the subdirectories left to remove.
    levels = [(name, None)]
    try:
        while True:
            _, subdirs = levels[-1]
            if subdirs is None:
                subdirs = []
                with os.scandir(fd) as entries:
                    for entry in entries:
                        if entry.is_dir(follow_symlinks=False):
                            subdirs.append(entry.name)
                        else:
                            os.unlink(entry.name, dir_fd=fd)
                levels[-1] = (levels[-1][0], subdirs)
            if subdirs:
                sub = subdirs.pop()
                down = os.open(sub, _DIR_FLAGS, dir_fd=fd)
                os.close(fd)
                fd = down
                levels.append((sub, None))
                continue
            done, _ = levels.pop()
            if not levels:
                break
            up = os.open("..", _DIR_FLAGS, dir_fd=fd)
            os.close(fd)
            fd = up
            os.rmdir(done, dir_fd=fd)
    finally:
        os.close(fd)
    os.rmdir(name, dir_fd=dir_fd)
