"""Copy-up: bring a lower object into the upper, whole or not at all, as the kernel overlay does (copy_up.c).

Everything is built under the workdir (`staged`) and renamed into the upper
in one step, so a crash leaves either no copy or a complete one. Data moves
by the kernel (copy_file_range, then sendfile, then read/write of large
blocks), only over the data extents of the source, so holes stay holes.

The low-level helpers (`build_copy`, `fill_data`, `install`, `discard`) act
on paths; `CopyUp`, mixed into the engine, decides what to copy and when,
and copies a file's data without the engine lock (see `CopyUp._move_data`).
"""

import contextlib
import errno
import itertools
import os
import stat
import threading
import time

from cowfs.errors import os_error
from cowfs.formatting import kind_name
from cowfs.overlay import fileattr, handles, verity
from cowfs.overlay.events import TRIGGERS
from cowfs.overlay.locking import DataFirst, locked_for
from cowfs.overlay.lookup import parent_of
from cowfs.overlay.syscalls import RENAME_NOREPLACE, rename2
from cowfs.overlay.whiteout import (
    KERNEL_ORIGIN,
    METACOPY,
    NLINK,
    TRUSTED_PREFIX,
    get_marker,
    is_private_xattr,
    mark_impure,
    set_marker,
)

CHUNK = 1 << 30
CAPABILITY = "security.capability"
_names = itertools.count()


def temp_name(work):
    """A fresh name in the staging directory."""
    return f"{work}/#cowfs-{os.getpid()}-{next(_names)}"


@contextlib.contextmanager
def staged(work):
    """A fresh name in the staging directory `work` to build at; whatever is left at it when the
    block exits goes (see `discard`), so the workdir stays empty whatever happens."""
    tmp = temp_name(work)
    try:
        yield tmp
    finally:
        if os.path.lexists(tmp):  # most often renamed into place: one lstat, not a walk
            discard(tmp)


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
    """Copy a regular file's contents, holes kept, and set the exact size. A file already of that size
    (a metadata-only copy) is not truncated, so that with no data to copy its mtime stays, as the kernel's."""
    for offset, length in _extents(src, size):
        _copy_range(src, dst, offset, length)
    if os.fstat(dst).st_size != size:
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
        if is_private_xattr(name, prefix) or prefix == TRUSTED_PREFIX and name.startswith(TRUSTED_PREFIX):
            continue
        try:
            value = os.getxattr(src, name, **nofollow)
            os.setxattr(dst, name, value, follow_symlinks=False)
        except OSError as e:
            if e.errno not in (errno.ENOTSUP, errno.EPERM, errno.ENODATA):
                raise


def copy_owner(st, path):
    """The owner first: chown clears setuid/setgid and drops `security.capability`, so the
    mode (`copy_mode_and_times`) and the xattrs come after it."""
    os.chown(path, st.st_uid, st.st_gid, follow_symlinks=False)


def copy_mode_and_times(st, path):
    """Mode, then times (last: nothing after them may move them)."""
    if not stat.S_ISLNK(st.st_mode):
        os.chmod(path, stat.S_IMODE(st.st_mode))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns), follow_symlinks=False)


def build_copy(src, st, tmp, prefix, origin, metadata_only=False, sync=True, data=None, digest=None):
    """Build at `tmp` a full copy of the object at `src` (type, data, owner, mode, times, xattrs).

    `src` is a path, or for a regular file an open descriptor of it (a file
    open under a name that is gone). Directories are copied empty: their
    entries stay in the lower and merge. With `metadata_only` a regular file
    gets its size but no data (all hole) and the metacopy marker, as the
    kernel's metacopy=on does; `digest`, the fs-verity digest of its data, is
    then recorded in the marker (verity.py). `origin`, the lower object's file handle in the
    kernel's format (see handles.py), is recorded when given. `data` is the
    file that holds a lower metacopy file's data (its own is all hole). The data is synced before the copy is renamed
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
                _copy_into(data if data is not None else src, fd_out, st.st_size, sync)
        finally:
            os.close(fd_out)
    elif stat.S_ISDIR(mode):
        os.mkdir(tmp, 0o700)
    elif stat.S_ISLNK(mode):
        os.symlink(os.readlink(src), tmp)
    else:
        os.mknod(tmp, stat.S_IFMT(mode) | 0o600, st.st_rdev)
    # Owner, xattrs, mode, times, in that order (as the kernel's copy-up keeps them all): a
    # chown after the xattrs would drop `security.capability`, and one after the mode the
    # set-id bits; the mode comes after the xattrs, so that an ACL set there leaves it as it was.
    copy_owner(st, tmp)
    copy_xattrs(src, tmp, prefix)
    fileattr.copy_up_flags(src, st, tmp, prefix)
    if origin is not None and (stat.S_ISREG(mode) or stat.S_ISDIR(mode) or not prefix.startswith("user.")):
        os.setxattr(tmp, prefix + KERNEL_ORIGIN, origin, follow_symlinks=False)  # user.* only on files and dirs
    if metadata_only and stat.S_ISREG(mode):
        # after the origin, as the kernel's: on a filesystem that keeps the first xattrs in the inode and
        # the rest in a block, the marker is the one in the block, which goes with it at the data copy-up
        os.setxattr(tmp, prefix + METACOPY, verity.metacopy_value(digest), follow_symlinks=False)
    copy_mode_and_times(st, tmp)


def fill_data(src, fd_out, sync=True):
    """Complete a metadata-only copy open at `fd_out` with the data of file `src`. The caller
    removes the marker afterwards, so that until that last step reads still come from `src`.

    Writing to a file drops its `security.capability` (whoever writes), so the capability the
    metadata copy carries is set again after the data, as the kernel's copy-up does."""
    try:
        capability = os.getxattr(fd_out, CAPABILITY)
    except OSError as e:
        if e.errno not in (errno.ENODATA, errno.ENOTSUP):
            raise
        capability = None
    _copy_into(src, fd_out, os.fstat(fd_out).st_size, sync)
    if capability is not None:
        os.setxattr(fd_out, CAPABILITY, capability)
        if sync:
            os.fsync(fd_out)


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


def merged_nlink(real, prefix, st=None):
    """The link count the merged view shows for the upper file at `real`: an indexed file's nlink
    xattr ("U" and a signed difference from the upper inode's own count) when it has one."""
    st = st or os.lstat(real)
    value = get_marker(real, prefix, NLINK)
    if value and len(value) > 2 and value[0] == "U" and value[1] in "+-":
        try:
            nlink = st.st_nlink + int(value[1:])
        except ValueError:
            return st.st_nlink
        if nlink > 0:
            return nlink
    return st.st_nlink


def set_nlink(real, prefix, nlink):
    """Record `nlink` as the merged link count of the indexed upper file at `real` (see merged_nlink)."""
    set_marker(real, prefix, NLINK, f"U{nlink - os.lstat(real).st_nlink:+d}")


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


class ObjectLocks:
    """A lock per object whose data is being copied, so that copies of one file wait for
    each other (and copy once) while everything else goes on."""

    def __init__(self):
        self._mutex = threading.Lock()
        self._locks = {}  # key -> [lock, number of threads holding or waiting]

    @contextlib.contextmanager
    def hold(self, key):
        with self._mutex:
            entry = self._locks.setdefault(key, [threading.Lock(), 0])
            entry[1] += 1
        try:
            with entry[0]:
                yield
        finally:
            with self._mutex:
                entry[1] -= 1
                if not entry[1]:
                    del self._locks[key]


def same_object(node, now):
    """True when `now`, the same path looked up again, is still `node`'s object in the same state."""
    return now is not None and now.layer == node.layer and os.path.samestat(now.st, node.st) and now.data == node.data


class CopyUp:
    """Copy-up for the engine (mixed into `Union`): an object, its parent directories, and a file's
    data, each built in the workdir and renamed into the upper in one step.

    Uses the engine's `stack`, `layers`, `prefix`, `work`, `events`, `_copied` (identities of
    lower files copied up), `_object_locks` (an ObjectLocks), `_op`, `_lock`, `_dir`,
    `_changed` and `_require_writable`.
    """

    # How fs-verity digests are measured (verity.measure); tests put their own here.
    _measure_verity = staticmethod(verity.measure)

    def _copy_up(self, node, data=True):
        """Bring `node` and its parent directories into the upper; returns its upper node.

        With metacopy=on and `data` false (a change of metadata only), a regular
        file is copied without its data, which follows at the first `data` copy-up.
        A copy that needs a file's data raises DataFirst (see `locking.locked`).
        Under verity=on|require a metacopy file's data is checked first, as by the kernel before any copy-up.
        """
        self._verify_data(node)
        if node.in_upper:
            if data and node.data is not None:
                raise DataFirst(node)
            return node
        self._require_writable(node.path)
        if node.index is not None:  # another name of it is up: this one links to the same inode
            parent_real = self._upper_dir(parent_of(node.path)[0])
            try:
                self._link_up(node.index, self.layers.real(0, node.path[1:]), parent_real,
                              merged_nlink(node.index, self.prefix))
            finally:
                self._changed()
            node = self.layers.resolve_required(node.path)
            if data and node.data is not None:  # the indexed copy is metadata only: its data next, in place
                raise DataFirst(node)
            return node
        meta_only, digest = False, None
        if self.stack.metacopy and not data and stat.S_ISREG(node.st.st_mode):
            meta_only, digest = self._metacopy_digest(node)
        if stat.S_ISREG(node.st.st_mode) and not meta_only:
            raise DataFirst(node)
        parent_real = self._upper_dir(parent_of(node.path)[0])
        try:
            with staged(self.work) as tmp:
                started = time.perf_counter()
                self._build(node, tmp, meta_only, digest)
                self._install(node, tmp, parent_real, meta_only, started)
        finally:
            self._changed()
        return self.layers.resolve_required(node.path)

    def _upper_dir(self, path):
        """The upper path of merged directory `path`, copied up (with its missing ancestors,
        from the top down, without recursion) if needed."""
        missing = []
        node = self._dir(path)
        while not node.in_upper:
            missing.append(node)
            node = self.layers.resolve_required(parent_of(node.path)[0])
        real = node.real
        if missing:
            try:
                for node in reversed(missing):
                    with staged(self.work) as tmp:
                        started = time.perf_counter()
                        self._build(node, tmp)
                        real = self._install(node, tmp, real, False, started)
            finally:
                self._changed()
        return real

    def _upper_parent(self, path):
        """The upper directory that will hold `path`, copied up if needed; and the name in it."""
        parent_path, name = parent_of(path)
        self._upper_dir(parent_path)
        return self.layers.resolve_required(parent_path), name

    def _metacopy_digest(self, node):
        """For a metadata-only copy-up of lower regular file `node`: whether it may be one, and the fs-verity
        digest of its data to record. As the kernel's: under verity=on the digest when the data has one;
        under verity=require a file whose data has none is copied whole instead."""
        if self.stack.verity == "off":
            return True, None
        data = node.data or node.real
        try:
            digest = self._measure_verity(data)
        except FileNotFoundError:
            raise os_error(errno.ENOENT, node.path) from None
        return (digest is not None or self.stack.verity != "require"), digest

    def _stays_metadata_only(self, node):
        """metacopy=on: whether regular file `node` is a metadata-only copy, or becomes one when it is
        copied up for a change of metadata (see `_metacopy_digest`); its data then stays below, so that a
        new name of it needs a redirect. Not a name of an indexed copy that holds its data."""
        return node.data is not None or (not node.in_upper and node.index is None and self._metacopy_digest(node)[0])

    def _verify_data(self, node):
        """Before the data of metacopy file `node` is used, or the file is copied up: under verity=on|require,
        the digest its marker records checked against its data (verity.check), as the kernel's
        ovl_verify_lowerdata. Raises OSError EIO naming the reason; a file with its own data passes.

        As the kernel's, data in a data-only layer is reached (its blocks are the file's from then on) before
        the check, which may then fail: the error then has `attrs_changed` set, for the FUSE adapter."""
        if self.stack.verity == "off" or node.data is None:
            return
        if not os.path.lexists(node.data):  # data a data-only layer lacks: ENOENT first, as the kernel's lookup
            raise os_error(errno.ENOENT, node.path)
        reached = self.layers.data_unreached(node.data)
        if reached:
            self.layers.data_reached.add(node.data)
        try:
            value = os.getxattr(node.real, self.prefix + METACOPY, follow_symlinks=False)
            verity.check(self.stack.verity, value, node.data, node.path, self._measure_verity)
        except FileNotFoundError:
            raise os_error(errno.ENOENT, node.path) from None
        except OSError as e:
            e.attrs_changed = reached
            raise

    def _build(self, node, tmp, meta_only=False, digest=None):
        """Build at `tmp` the copy of lower `node` (with `digest` recorded when metadata only)."""
        if self.stack.userxattr and not (node.is_dir or stat.S_ISREG(node.st.st_mode)):
            number = self.layers.origin_ino(node.st)
            if number is not None:
                self.layers.remembered[node.path] = number  # no user.* xattr on this type: keep it in memory
        origin = self.layers.origin_handle(node.real, node.st, self._indexed(node))
        build_copy(node.real, node.st, tmp, self.prefix, origin, meta_only, sync=not self.stack.volatile,
                   data=node.data, digest=digest)

    def _indexed(self, node):
        """index=on: whether `node` is copied up through WORKDIR/index, as the kernel's ovl_need_index
        says: a lower non-directory with several links, so that its names stay one file."""
        return self.layers.index is not None and not node.in_upper and not node.is_dir and node.st.st_nlink > 1

    def _link_up(self, entry, target, parent_real, nlink):
        """Give the indexed inode at `entry` the upper name `target` (in `parent_real`, whose times stay);
        `nlink` is its link count in the merged view, kept in its nlink xattr as the kernel keeps it."""
        parent_st = os.lstat(parent_real)
        os.link(entry, target, follow_symlinks=False)
        restore_times(parent_real, parent_st)
        set_nlink(entry, self.prefix, nlink)
        mark_impure(parent_real, self.prefix)

    def _install(self, node, tmp, parent_real, meta_only, started):
        """Rename the finished copy of `node` into upper directory `parent_real`; returns its upper path.
        An indexed copy goes into the index first, then gets its name, as the kernel's."""
        target = self.layers.real(0, node.path[1:])  # an upper object sits at its merged path
        if self._indexed(node):
            origin = self.layers.origin_handle(node.real, node.st, indexed=True)
            entry = self.layers.index + "/" + handles.index_name(origin)
            rename2(tmp, entry, RENAME_NOREPLACE)
            self._link_up(entry, target, parent_real, node.st.st_nlink)
        else:
            install(tmp, target, parent_real)
        mark_impure(parent_real, self.prefix)  # as the kernel's copy-up, whatever it copied
        regular = stat.S_ISREG(node.st.st_mode)
        if regular and not meta_only:
            self._copied.add((node.st.st_dev, node.st.st_ino))
        if self.events:
            self.events.emit("copy_up", node.path, layer=node.layer, kind=kind_name(node.st.st_mode),
                             bytes=node.st.st_size if regular and not meta_only else 0,
                             seconds=time.perf_counter() - started,
                             trigger=self._trigger(), metadata_only=meta_only)
        return target

    def _move_data(self, node, op):
        """Copy the data of regular file `node` into the upper, for operation `op`, without the engine lock.

        A lower file is copied whole into the workdir, then renamed into the
        upper under the lock if its path still leads to the same lower file. A
        metadata-only copy gets its data in place, then loses its marker. Either
        way the upper changes in one step, after the data is synced. Copies of
        one file wait for each other: the second finds the work done.
        """
        fill = node.in_upper
        with self._object_locks.hold((fill, node.st.st_dev, node.st.st_ino)):
            with locked_for(self, op):
                if not same_object(node, self.layers.resolve(node.path)):
                    return  # done meanwhile, or the name has changed: the operation looks again
                if fill:
                    fd = os.open(node.real, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
            if fill:
                started = time.perf_counter()
                try:
                    fill_data(node.data, fd, sync=not self.stack.volatile)
                    with locked_for(self, op):
                        self._data_filled(node, fd, started)
                finally:
                    os.close(fd)
                return
            with staged(self.work) as tmp:
                started = time.perf_counter()
                self._build(node, tmp)
                with locked_for(self, op):
                    if same_object(node, self.layers.resolve(node.path)):
                        try:
                            self._install(node, tmp, self._upper_dir(parent_of(node.path)[0]), False, started)
                        finally:
                            self._changed()

    def _data_filled(self, node, fd, started):
        """The last step of a metadata-only copy's data copy-up: the marker goes, on the inode itself."""
        try:  # the file's times move, as the kernel's data copy-up leaves them
            os.removexattr(fd, self.prefix + METACOPY)
        finally:
            self._changed()
        data_st = os.lstat(node.data)
        self._copied.add((data_st.st_dev, data_st.st_ino))
        if self.events:
            self.events.emit("copy_up", node.path, layer=node.parts[-1][0], kind="file",
                             bytes=os.fstat(fd).st_size, seconds=time.perf_counter() - started,
                             trigger=self._trigger(), data_only=True)

    def _trigger(self):
        return TRIGGERS.get(self._op, self._op)
