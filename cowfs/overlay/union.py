"""The union engine: every filesystem operation on the merged view, as plain Python (no FUSE).

Assumptions (as in the kernel's overlayfs):
- lower layers are read-only and never change while mounted; only this
  engine writes the upper, so lookups are cached until it changes it;
- the upper and the workdir are on one filesystem: each change is built in
  the workdir and renamed into the upper in one atomic step (renameat2 with
  RENAME_NOREPLACE, RENAME_EXCHANGE or RENAME_WHITEOUT), so a crash leaves
  the upper either before or after an operation, never in between;
- deletion markers and xattrs are in the kernel's format (see whiteout.py),
  so the kernel can mount an upper written here and the other way round.

Paths are merged paths ("/a/b"). Failures raise OSError with the errno the
kernel's overlay would give. Methods that change the upper hold one lock, so
the engine can serve a multithreaded daemon; reads and writes on open
handles do not take it, and neither does the copy of a file's data (see
`Union._move_data`), so that one big copy-up does not stall every caller.
"""

import contextlib
import dataclasses
import errno
import functools
import os
import stat
import threading
import time

from cowfs.errors import os_error
from cowfs.overlay import acl, copyup, workdir
from cowfs.overlay.events import TRIGGERS, Events
from cowfs.overlay.lookup import Layers, join, parent_of, renamed_paths
from cowfs.overlay.syscalls import RENAME_EXCHANGE, RENAME_NOREPLACE, RENAME_WHITEOUT, rename2
from cowfs.overlay.whiteout import (
    METACOPY,
    ORIGIN,
    REDIRECT,
    escape_xattr,
    is_opaque,
    is_whiteout,
    make_whiteout,
    set_marker,
    set_opaque,
    unescape_xattr,
)


class _DataFirst(Exception):
    """Raised by a locked operation that needs a file's data in the upper: the outermost `locked`
    moves the data without the engine lock, then runs the operation again from the start.
    So an operation changes nothing before its copy-ups, or only what it can do twice."""

    def __init__(self, node):
        super().__init__(node.path)
        self.node = node


def locked(method):
    """Run a public operation under the engine's lock, remembering its name for events."""
    name = method.__name__

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        while True:
            with self._lock:
                outer, self._op = self._op, self._op or name
                if outer is None:
                    self.layers.start()
                try:
                    return method(self, *args, **kwargs)
                except _DataFirst as e:
                    if outer is not None:
                        raise
                    pending = e.node
                finally:
                    self._op = outer
            self._move_data(pending, name)
    return wrapper


@dataclasses.dataclass(frozen=True)
class Caller:
    """The process that asks, for answers that depend on it. Without CAP_SYS_ADMIN or CAP_FSETID
    the kernel answers differently; cowfs takes uid 0 as having them. None stands for root."""

    uid: int
    gid: int
    groups: tuple = ()

    def in_group(self, gid):
        return gid == self.gid or gid in self.groups


def _privileged(caller):
    return caller is None or caller.uid == 0


class _ObjectLocks:
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


LISTINGS_KEPT = 4096  # directories whose merged listing stays cached


class Handle:
    """An open file: the real descriptor and, while it reads a lower file, that file's identity."""

    __slots__ = ("fd", "lower_id")

    def __init__(self, fd, lower_id=None):
        self.fd = fd
        self.lower_id = lower_id


class Union:
    """A mounted stack of layers, usable in-process: `Union(check(stack)).getattr("/etc/hosts")`."""

    def __init__(self, stack):
        self.stack = stack
        self.layers = Layers(stack)
        self.prefix = stack.prefix
        self.writable = stack.writable
        self.work = None
        self._lock = threading.RLock()
        self._op = None  # the public operation running, for the "trigger" of copy-up events
        self.events = Events()
        self._listings = {}  # merged path -> readdir's answer, until the upper changes
        self._copied = set()  # identities of lower files copied up, to move open read handles over
        self._object_locks = _ObjectLocks()
        self._workdir = None
        if stack.upper is not None:
            self._workdir = workdir.claim(stack)
            self.work = self._workdir.work

    # -- setup -----------------------------------------------------------------------------------
    def close(self):
        """Release the workdir; the engine must not be used afterwards."""
        if self._workdir is not None:
            self._workdir.close()

    def hand_over(self):
        """After fork, in the parent: the child (the daemon) holds the locks now; this process lets go of them."""
        if self._workdir is not None:
            self._workdir.hand_over()

    # -- helpers ---------------------------------------------------------------------------------
    def _require_writable(self, path):
        if not self.writable:
            raise os_error(errno.EROFS, path)

    def _node(self, path):
        return self.layers.resolve_required(path)

    def _dir(self, path):
        node = self.layers.resolve_required(path)
        if not node.is_dir:
            raise os_error(errno.ENOTDIR, path)
        return node

    def _changed(self):
        self.layers.forget()
        self._listings.clear()

    def _copy_up(self, node, data=True):
        """Bring `node` and its parent directories into the upper; returns its upper node.

        With metacopy=on and `data` false (a change of metadata only), a regular
        file is copied without its data, which follows at the first `data` copy-up.
        A copy that needs a file's data raises _DataFirst (see `locked`).
        """
        if node.in_upper:
            if data and node.data is not None:
                raise _DataFirst(node)
            return node
        self._require_writable(node.path)
        meta_only = self.stack.metacopy and not data and stat.S_ISREG(node.st.st_mode)
        if stat.S_ISREG(node.st.st_mode) and not meta_only:
            raise _DataFirst(node)
        parent_real = self._upper_dir(parent_of(node.path)[0])
        tmp = copyup.temp_name(self.work)
        started = time.perf_counter()
        try:
            self._build(node, tmp, meta_only)
            self._install(node, tmp, parent_real, meta_only, started)
        except BaseException:
            copyup.discard(tmp)
            raise
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
                    tmp = copyup.temp_name(self.work)
                    started = time.perf_counter()
                    try:
                        self._build(node, tmp)
                        real = self._install(node, tmp, real, False, started)
                    except BaseException:
                        copyup.discard(tmp)
                        raise
            finally:
                self._changed()
        return real

    def _build(self, node, tmp, meta_only=False):
        """Build at `tmp` the copy of lower `node`."""
        origin = self.layers.origin_ino(node.st)
        if origin is not None and self.stack.userxattr and not (node.is_dir or stat.S_ISREG(node.st.st_mode)):
            self.layers.remembered[node.path] = origin  # no user.* xattr on this type: keep it in memory
        copyup.build_copy(node.real, node.st, tmp, self.prefix, origin, meta_only, sync=not self.stack.volatile)

    def _install(self, node, tmp, parent_real, meta_only, started):
        """Rename the finished copy of `node` into upper directory `parent_real`; returns its upper path."""
        target = self.layers.real(0, node.path[1:])  # an upper object sits at its merged path
        copyup.install(tmp, target, parent_real)
        regular = stat.S_ISREG(node.st.st_mode)
        if regular and not meta_only:
            self._copied.add((node.st.st_dev, node.st.st_ino))
        if self.events:
            self.events.emit("copy_up", node.path, layer=node.layer, kind=_kind(node.st.st_mode),
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
            with self._locked_for(op):
                if not _same_object(node, self.layers.resolve(node.path)):
                    return  # done meanwhile, or the name has changed: the operation looks again
                if fill:
                    fd = os.open(node.real, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
                else:
                    tmp = copyup.temp_name(self.work)
            started = time.perf_counter()
            if fill:
                try:
                    copyup.fill_data(node.data, fd, sync=not self.stack.volatile)
                    with self._locked_for(op):
                        self._data_filled(node, fd, started)
                finally:
                    os.close(fd)
                return
            try:
                self._build(node, tmp)
                with self._locked_for(op):
                    if _same_object(node, self.layers.resolve(node.path)):
                        try:
                            self._install(node, tmp, self._upper_dir(parent_of(node.path)[0]), False, started)
                        finally:
                            self._changed()
            finally:
                copyup.discard(tmp)  # nothing there once installed

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

    @contextlib.contextmanager
    def _locked_for(self, op):
        """The engine lock, taken again by `_move_data` on behalf of operation `op`."""
        with self._lock:
            self._op = op
            try:
                yield
            finally:
                self._op = None

    def _upper_parent(self, path):
        """The upper directory that will hold `path`, copied up if needed; and the name in it."""
        parent_path, name = parent_of(path)
        self._upper_dir(parent_path)
        return self.layers.resolve_required(parent_path), name

    def _whiteout_in_place(self, real):
        """Turn the upper entry at `real` into a whiteout; returns the staging path now holding the entry."""
        tmp = copyup.temp_name(self.work)
        try:
            rename2(real, tmp, RENAME_WHITEOUT)
        except OSError as e:
            if e.errno not in (errno.EINVAL, errno.EOPNOTSUPP):
                raise
            make_whiteout(tmp)
            rename2(tmp, real, RENAME_EXCHANGE)
        return tmp

    def _new_owner(self, parent, owner):
        uid, gid = owner if owner is not None else (os.geteuid(), os.getegid())
        st = os.lstat(parent.real)
        setgid = bool(st.st_mode & stat.S_ISGID)
        return uid, (st.st_gid if setgid else gid), setgid

    def _place_new(self, path, make, mode, owner, kind, umask=0):
        """Create a new object at merged `path`: built in the workdir, then renamed into the upper.

        `make(tmp)` creates the bare object and may return an open descriptor.
        A directory made where a whiteout stands, or in a merged directory,
        is made opaque so that old lower entries do not come back. The umask
        applies unless the directory has a default ACL, which is inherited.
        """
        self._require_writable(path)
        parent = self._dir(parent_of(path)[0])
        if self.layers.resolve(path) is not None:
            raise os_error(errno.EEXIST, path)
        uid, gid, setgid = self._new_owner(parent, owner)
        upper_parent, name = self._upper_parent(path)
        target = upper_parent.real + "/" + name
        tmp = copyup.temp_name(self.work)
        fd = None
        try:
            fd = make(tmp)
            os.chown(tmp, uid, gid, follow_symlinks=False)
            if kind != stat.S_IFLNK:
                mode, acls = acl.for_new(upper_parent.real, mode, umask, kind == stat.S_IFDIR)
                if kind == stat.S_IFDIR and setgid:
                    mode |= stat.S_ISGID
                os.chmod(tmp, stat.S_IMODE(mode))
                for name, value in acls.items():  # after chmod, which would rewrite the ACL's mask
                    os.setxattr(tmp, name, value, follow_symlinks=False)
            try:
                existing = os.lstat(target)
            except FileNotFoundError:
                existing = None
            opaque = kind == stat.S_IFDIR and (existing is not None or upper_parent.has_lower)
            if opaque:
                set_opaque(tmp, self.prefix)
            if existing is None:
                rename2(tmp, target, RENAME_NOREPLACE)
            elif not is_whiteout(existing):
                raise os_error(errno.EEXIST, path)
            elif kind == stat.S_IFDIR:
                rename2(tmp, target, RENAME_EXCHANGE)
                os.unlink(tmp)  # the whiteout, swapped out
            else:
                os.rename(tmp, target)  # replaces the whiteout in one step
        except BaseException:
            if fd is not None:
                os.close(fd)
            copyup.discard(tmp)
            raise
        finally:
            self._changed()
        if self.events:
            if existing is not None:
                self.events.emit("whiteout_removed", path)
            self.events.emit("create", path, kind=_kind(kind))
            if opaque:
                self.events.emit("opaque", path)
        return fd

    # -- attributes ------------------------------------------------------------------------------
    @locked
    def getattr(self, path):
        """The merged attributes of `path` as a dict of st_* fields (times in ns). Raises ENOENT, ENOTDIR."""
        return self._attrs(self._node(path))

    def _attrs(self, node):
        st = os.lstat(node.real)  # cached nodes hold where an object is, not its current attributes
        nlink = 1 if node.is_dir and len(node.parts) > 1 else st.st_nlink  # as the kernel does for merged dirs
        attrs = _stat_dict(st, self.layers.ino(node), nlink)
        if node.data is not None:
            attrs["st_blocks"] = os.lstat(node.data).st_blocks  # the blocks are still the lower file's
        if not node.in_upper and not node.is_dir and st.st_nlink > 1:
            # A lower hard link: a copy-up will break it, so the kernel overlay gives each of its
            # names an inode of its own; a FUSE adapter does the same.
            attrs["lower_link"] = True
        return attrs

    def fgetattr(self, handle, path=None):
        """Attributes of an open file, also once its name is gone (st_nlink 0 then, as on the kernel);
        one opened on a lower file that has since been copied up shows the copy, as `read` does."""
        if handle.lower_id is not None and handle.lower_id in self._copied and path is not None:
            self._follow_copy_up(handle, path)
        st = os.fstat(handle.fd)
        try:
            ino = int(os.getxattr(handle.fd, self.prefix + ORIGIN))
        except OSError:
            ino = self.layers.map_ino(st)
        return _stat_dict(st, ino, st.st_nlink)

    # Changes through an open file act on the handle's own object, also once its name is gone.
    # A handle on a lower file first gets a copy of its own (see `_own_copy`): use them on such
    # a handle only when its name is gone; while it is there, the path's operation copies up.
    def fchmod(self, handle, mode):
        os.fchmod(self._own_fd(handle), stat.S_IMODE(mode))

    def fchown(self, handle, uid, gid):
        """Change owner; -1 leaves a field as it is."""
        os.fchown(self._own_fd(handle), uid, gid)

    def futimens(self, handle, atime_ns=None, mtime_ns=None):
        """Set times in ns; None keeps a time as it is (UTIME_OMIT)."""
        fd = self._own_fd(handle)
        st = os.fstat(fd)
        os.utime(fd, ns=(st.st_atime_ns if atime_ns is None else atime_ns,
                         st.st_mtime_ns if mtime_ns is None else mtime_ns))

    def fsetxattr(self, handle, name, value, flags=0):
        os.setxattr(self._own_fd(handle), escape_xattr(name, self.prefix), value, flags)

    def fremovexattr(self, handle, name):
        real_name = escape_xattr(name, self.prefix)
        os.getxattr(handle.fd, real_name)  # ENODATA before any copy, as the kernel
        os.removexattr(self._own_fd(handle), real_name)

    def _own_fd(self, handle):
        if handle.lower_id is not None:
            self._own_copy(handle)
        return handle.fd

    def _own_copy(self, handle):
        """Move a handle on a lower file whose name is gone to a copy of that file in the workdir,
        whose name goes at once: its descriptor keeps it, as the kernel's overlay keeps the copy-up
        of an unlinked file, and the workdir stays empty. Needs no engine lock: nothing is shared."""
        self._require_writable(None)
        with self._object_locks.hold(("own",) + handle.lower_id):
            if handle.lower_id is None:
                return  # another thread did it
            st = os.fstat(handle.fd)
            tmp = copyup.temp_name(self.work)
            try:
                copyup.build_copy(handle.fd, st, tmp, self.prefix, self.layers.origin_ino(st), sync=False)
                fd = os.open(tmp, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
            finally:
                copyup.discard(tmp)
            try:
                os.dup2(fd, handle.fd)
            finally:
                os.close(fd)
            handle.lower_id = None


    @locked
    def readdir(self, path):
        """[(name, st_ino, st_mode type bits)] of the merged directory, "." and ".." first.

        Kept until the upper next changes (as lookups are): find and ls list the same
        directories again and again."""
        entries = self._listings.get(path)
        if entries is None:
            if len(self._listings) >= LISTINGS_KEPT:
                self._listings.clear()
            entries = self._listings[path] = self._read_dir(path)
        return entries

    def _read_dir(self, path):
        node = self._dir(path)
        parent = node if path == "/" else self._node(parent_of(path)[0])
        entries = [(".", self.layers.ino(node), stat.S_IFDIR), ("..", self.layers.ino(parent), stat.S_IFDIR)]
        devs = {layer: os.lstat(self.layers.real(layer, rel)).st_dev for layer, rel in node.parts}
        for name, layer, entry in self.layers.list_dir(node):
            # the type from d_type and the number from d_ino: no syscall per entry below the upper
            if entry.is_dir(follow_symlinks=False):
                kind = stat.S_IFDIR
            elif entry.is_file(follow_symlinks=False):
                kind = stat.S_IFREG
            elif entry.is_symlink():
                kind = stat.S_IFLNK
            else:
                try:
                    kind = stat.S_IFMT(entry.stat(follow_symlinks=False).st_mode)
                except FileNotFoundError:
                    continue
            entries.append((name, self.layers.entry_ino(layer, entry, join(path, name), devs[layer]), kind))
        return entries

    @locked
    def readlink(self, path):
        node = self._node(path)
        if not stat.S_ISLNK(node.st.st_mode):
            raise os_error(errno.EINVAL, path)
        return os.readlink(node.real)

    @locked
    def access(self, path, mode):
        node = self._node(path)
        if mode & os.W_OK and not self.writable and stat.S_IFMT(node.st.st_mode) in (
                stat.S_IFREG, stat.S_IFDIR, stat.S_IFLNK):
            raise os_error(errno.EROFS, path)
        return 0

    @locked
    def statfs(self):
        """The filesystem statistics of the upper (of the top lower on a read-only mount)."""
        sv = os.statvfs(self.stack.upper if self.stack.upper is not None else self.stack.lowers[0])
        return {key: getattr(sv, key) for key in (
            "f_bsize", "f_frsize", "f_blocks", "f_bfree", "f_bavail", "f_files", "f_ffree", "f_favail",
            "f_flag", "f_namemax")}

    # -- changes of attributes (each copies up first) --------------------------------------------
    @locked
    def chmod(self, path, mode):
        node = self._node(path)
        if stat.S_ISLNK(node.st.st_mode):
            raise os_error(errno.EOPNOTSUPP, path)
        self._require_writable(path)
        node = self._copy_up(node, data=False)
        os.chmod(node.real, stat.S_IMODE(mode))

    @locked
    def chown(self, path, uid, gid):
        """Change owner; -1 leaves a field as it is."""
        self._require_writable(path)
        node = self._copy_up(self._node(path), data=False)
        os.chown(node.real, uid, gid, follow_symlinks=False)

    @locked
    def utimens(self, path, atime_ns=None, mtime_ns=None):
        """Set times in ns; None keeps a time as it is (UTIME_OMIT)."""
        self._require_writable(path)
        node = self._copy_up(self._node(path), data=False)
        st = os.lstat(node.real)
        os.utime(node.real, ns=(st.st_atime_ns if atime_ns is None else atime_ns,
                                st.st_mtime_ns if mtime_ns is None else mtime_ns), follow_symlinks=False)

    @locked
    def truncate(self, path, length, caller=None):
        """truncate(2) by `caller` (None: root), who may lose the file's set-id bits (see `_drop_set_id`)."""
        node = self._node(path)
        if node.is_dir:
            raise os_error(errno.EISDIR, path)
        self._require_writable(path)
        node = self._copy_up(node)
        fd = os.open(node.real, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            os.ftruncate(fd, length)
            _drop_set_id(fd, caller)
        finally:
            os.close(fd)

    # -- xattrs ----------------------------------------------------------------------------------
    # The overlay's own xattrs never show; one named like them through the
    # mount is stored escaped, as Linux 6.7 and later do (see whiteout.py).
    @locked
    def getxattr(self, path, name):
        return os.getxattr(self._node(path).real, escape_xattr(name, self.prefix), follow_symlinks=False)

    @locked
    def listxattr(self, path, caller=None):
        """The xattr names; trusted.* ones only for a privileged caller, as the kernel lists them."""
        names = (unescape_xattr(n, self.prefix) for n in os.listxattr(self._node(path).real, follow_symlinks=False))
        return [n for n in names if n is not None and (_privileged(caller) or not n.startswith("trusted."))]

    @locked
    def setxattr(self, path, name, value, flags=0):
        self._require_writable(path)
        node = self._copy_up(self._node(path), data=False)
        os.setxattr(node.real, escape_xattr(name, self.prefix), value, flags, follow_symlinks=False)

    @locked
    def removexattr(self, path, name):
        self._require_writable(path)
        node = self._node(path)
        real_name = escape_xattr(name, self.prefix)
        if not node.in_upper:
            os.getxattr(node.real, real_name, follow_symlinks=False)  # ENODATA before any copy-up, as the kernel
        node = self._copy_up(node, data=False)
        os.removexattr(node.real, real_name, follow_symlinks=False)

    # -- files -----------------------------------------------------------------------------------
    @locked
    def open(self, path, flags, caller=None):
        """Open a file for `caller` (None: root); opening for writing or with O_TRUNC copies it up first,
        and O_TRUNC may drop set-id bits (see `_drop_set_id`). Returns a Handle."""
        node = self._node(path)
        writing = (flags & os.O_ACCMODE) != os.O_RDONLY or flags & os.O_TRUNC
        if node.is_dir and writing:
            raise os_error(errno.EISDIR, path)
        if writing:
            self._require_writable(path)
            node = self._copy_up(node)
        # No O_DIRECT: the kernel side of FUSE decides direct I/O, and our buffers are not aligned for it.
        real_flags = (flags & ~(os.O_CREAT | os.O_EXCL | os.O_NOCTTY | os.O_DIRECT)) | os.O_NOFOLLOW | os.O_CLOEXEC
        fd = os.open(node.data or node.real, real_flags)  # a metadata-only copy reads from its lower data
        if flags & os.O_TRUNC:
            try:
                _drop_set_id(fd, caller)
            except BaseException:
                os.close(fd)
                raise
        lower_id = None
        if node.data is not None:
            data_st = os.fstat(fd)
            lower_id = (data_st.st_dev, data_st.st_ino)
        elif not node.in_upper:
            lower_id = (node.st.st_dev, node.st.st_ino)
        return Handle(fd, lower_id)

    @locked
    def create(self, path, mode, flags, owner=None, umask=0):
        """Create and open a regular file; an existing one is opened (EEXIST with O_EXCL)."""
        self._require_writable(path)
        self._dir(parent_of(path)[0])
        if self.layers.resolve(path) is not None:
            if flags & os.O_EXCL:
                raise os_error(errno.EEXIST, path)
            return self.open(path, flags & ~os.O_CREAT)
        keep = flags & (os.O_ACCMODE | os.O_APPEND | os.O_SYNC | os.O_DSYNC | os.O_NONBLOCK)

        def make(tmp):
            return os.open(tmp, keep | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        return Handle(self._place_new(path, make, mode, owner, stat.S_IFREG, umask))

    def read(self, handle, size, offset, path=None):
        """Read from an open file. A handle opened on a lower file that has since been
        copied up reads the upper copy, as on Linux 4.19 and later."""
        return os.pread(self.read_fd(handle, path), size, offset)

    def read_fd(self, handle, path=None):
        """The descriptor a read of `handle` must use (see `read`), for callers that read it themselves."""
        if handle.lower_id is not None and handle.lower_id in self._copied and path is not None:
            self._follow_copy_up(handle, path)
        return handle.fd

    @locked
    def _follow_copy_up(self, handle, path):
        node = self.layers.resolve(path)
        if node is not None and node.in_upper and node.data is None and handle.lower_id is not None:
            fd = os.open(node.real, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
            os.dup2(fd, handle.fd)
            os.close(fd)
            handle.lower_id = None

    def write_fd(self, handle):
        """The descriptor a write to `handle` goes to, for callers that write it themselves
        (who then call `wrote`)."""
        return handle.fd

    def wrote(self, handle, caller):
        """After a write by `caller` through `write_fd`: set-id bits go as with `write`.
        True when the file's mode changed."""
        return _drop_set_id(handle.fd, caller)

    def write(self, handle, data, offset, caller=None):
        """Write at `offset`; by an unprivileged `caller`, set-id bits go as with truncate."""
        written = os.pwrite(handle.fd, data, offset)
        _drop_set_id(handle.fd, caller)
        return written

    def ftruncate(self, handle, length, caller=None):
        os.ftruncate(handle.fd, length)
        _drop_set_id(handle.fd, caller)

    def fsync(self, handle, datasync=False):
        if not self.stack.volatile:
            (os.fdatasync if datasync else os.fsync)(handle.fd)

    def release(self, handle):
        os.close(handle.fd)

    # -- creating names --------------------------------------------------------------------------
    @locked
    def mkdir(self, path, mode, owner=None, umask=0):
        self._place_new(path, lambda tmp: os.mkdir(tmp, 0o700), mode, owner, stat.S_IFDIR, umask)

    @locked
    def symlink(self, path, target, owner=None):
        """Create a symlink at `path` pointing to `target` (the order of ln -s reversed, as in FUSE)."""
        self._place_new(path, lambda tmp: os.symlink(target, tmp), 0o777, owner, stat.S_IFLNK)

    @locked
    def mknod(self, path, mode, rdev=0, owner=None, umask=0):
        """Create a FIFO, socket, device node (as root) or empty regular file."""
        kind = stat.S_IFMT(mode) or stat.S_IFREG
        if kind == stat.S_IFDIR:
            raise os_error(errno.EINVAL, path)
        if kind == stat.S_IFCHR and rdev == 0:
            raise os_error(errno.EPERM, path)  # a whiteout cannot be made through the mount
        self._place_new(path, lambda tmp: os.mknod(tmp, kind | 0o600, rdev), mode, owner, kind, umask)

    @locked
    def link(self, old, new):
        """Hard link: the source is copied up and linked inside the upper."""
        self._require_writable(new)
        src = self._node(old)
        if src.is_dir:
            raise os_error(errno.EPERM, old)
        self._dir(parent_of(new)[0])
        if self.layers.resolve(new) is not None:
            raise os_error(errno.EEXIST, new)
        if self.stack.metacopy and stat.S_ISREG(src.st.st_mode) and (src.data is not None or not src.in_upper):
            # A metadata-only copy stays one: an absolute redirect on the shared inode lets
            # every name of it find the data (the kernel uses the origin file handle instead).
            data_path = "/" + next(rel for layer, rel in src.parts if layer > 0)
            src = self._copy_up(src, data=False)
            if src.redirect != data_path:
                set_marker(src.real, self.prefix, REDIRECT, data_path)
                self._changed()
        else:
            src = self._copy_up(src)
        upper_parent, name = self._upper_parent(new)
        target = upper_parent.real + "/" + name
        over_whiteout = os.path.lexists(target)
        try:
            if over_whiteout:  # link beside it, then replace it in one step
                tmp = copyup.temp_name(self.work)
                os.link(src.real, tmp, follow_symlinks=False)
                try:
                    os.rename(tmp, target)
                except BaseException:
                    copyup.discard(tmp)
                    raise
            else:
                os.link(src.real, target, follow_symlinks=False)
        finally:
            self._changed()
        if self.events:
            if over_whiteout:
                self.events.emit("whiteout_removed", new)
            self.events.emit("create", new, kind="hard link", to=old)

    # -- removing names --------------------------------------------------------------------------
    @locked
    def unlink(self, path):
        """Remove a non-directory; a name a lower layer has becomes a whiteout."""
        self._require_writable(path)
        node = self._node(path)
        if node.is_dir:
            raise os_error(errno.EISDIR, path)
        self._remove(node)

    @locked
    def rmdir(self, path):
        """Remove an empty (in the merged view) directory, with the whiteouts inside its upper part."""
        self._require_writable(path)
        node = self._node(path)
        if not node.is_dir:
            raise os_error(errno.ENOTDIR, path)
        if path == "/":
            raise os_error(errno.EBUSY, path)
        if self.layers.list_dir(node):
            raise os_error(errno.ENOTEMPTY, path)
        self._remove(node)

    def _remove(self, node):
        """Remove `node` from the merged view (an open descriptor keeps an upper file alive, unnamed)."""
        self.layers.remembered.pop(node.path, None)
        parent_path, name = parent_of(node.path)
        needs_whiteout = self.layers.lower_positive(self.layers.resolve_required(parent_path), name)
        if self.events:
            if node.in_upper:
                self.events.emit("remove", node.path, kind=_kind(node.st.st_mode))
            if needs_whiteout:
                self.events.emit("whiteout", node.path)
        try:
            if node.in_upper:
                if needs_whiteout:
                    tmp = self._whiteout_in_place(node.real)
                elif node.is_dir:
                    tmp = copyup.temp_name(self.work)
                    os.rename(node.real, tmp)
                else:
                    os.unlink(node.real)
                    return
                copyup.discard(tmp)
            else:
                upper_parent, name = self._upper_parent(node.path)
                tmp = copyup.temp_name(self.work)
                make_whiteout(tmp)
                try:
                    rename2(tmp, upper_parent.real + "/" + name, RENAME_NOREPLACE)
                except BaseException:
                    copyup.discard(tmp)
                    raise
        finally:
            self._changed()

    # -- renaming --------------------------------------------------------------------------------
    @locked
    def rename(self, old, new, flags=0):
        """Rename within the merged view, with renameat2's NOREPLACE or EXCHANGE; a name a lower layer
        still shows is left as a whiteout (RENAME_WHITEOUT), in the same step.

        A directory with a lower part moves only with redirect_dir=on (it gets a
        redirect xattr); otherwise EXDEV, and tools such as mv copy instead.
        """
        if flags & ~(RENAME_NOREPLACE | RENAME_EXCHANGE) or flags == RENAME_NOREPLACE | RENAME_EXCHANGE:
            raise os_error(errno.EINVAL, old)
        self._require_writable(old)
        src = self._node(old)
        old_parent_path, old_name = parent_of(old)
        new_parent_path, new_name = parent_of(new)
        self._dir(new_parent_path)
        dst = self.layers.resolve(new)
        if flags & RENAME_NOREPLACE and dst is not None:
            raise os_error(errno.EEXIST, new)
        if flags & RENAME_EXCHANGE:
            if dst is None:
                raise os_error(errno.ENOENT, new)
            return self._exchange(src, dst)
        if old == new:
            return False
        if src.is_dir and (new + "/").startswith(old + "/"):
            raise os_error(errno.EINVAL, new)
        if dst is not None:  # the checks the VFS makes before the overlay is asked
            if src.is_dir and not dst.is_dir:
                raise os_error(errno.ENOTDIR, new)
            if dst.is_dir and not src.is_dir:
                raise os_error(errno.EISDIR, new)
            if src.in_upper and dst.in_upper and os.path.samestat(src.st, dst.st):
                return False  # two links to one file: rename(2) does nothing
        if not self._can_move(src):
            raise os_error(errno.EXDEV, old)
        if dst is not None and dst.is_dir and self.layers.list_dir(dst):
            raise os_error(errno.ENOTEMPTY, new)

        needs_whiteout = self.layers.lower_positive(self.layers.resolve_required(old_parent_path), old_name)
        try:
            src, upper_parent = self._prepare_move(src, new)
            target = upper_parent.real + "/" + new_name
            try:
                existing = os.lstat(target)
            except FileNotFoundError:
                existing = None
            if existing is not None and stat.S_ISDIR(existing.st_mode):
                self._empty_upper_dir(target)
            if existing is not None and src.is_dir and is_whiteout(existing):
                rename2(src.real, target, RENAME_EXCHANGE)  # the whiteout lands at the old name
                if not needs_whiteout:
                    os.unlink(src.real)
            else:
                rename2(src.real, target, RENAME_WHITEOUT if needs_whiteout else 0)
        finally:
            self._changed()
        self._move_remembered(old, new)
        if self.events:
            self.events.emit("rename", old, to=new)
            if existing is not None and is_whiteout(existing):
                self.events.emit("whiteout_removed", new)
            if needs_whiteout:
                self.events.emit("whiteout", old)

    def _exchange(self, a, b):
        """renameat2(RENAME_EXCHANGE): both names stay, so no whiteout; each side is marked for its new place."""
        if a.path == b.path:
            return
        if (b.path + "/").startswith(a.path + "/") or (a.path + "/").startswith(b.path + "/"):
            raise os_error(errno.EINVAL, b.path)
        if a.in_upper and b.in_upper and os.path.samestat(a.st, b.st):
            return
        for node in (a, b):
            if not self._can_move(node):
                raise os_error(errno.EXDEV, node.path)
        old, new = a.path, b.path
        try:
            a, _ = self._prepare_move(a, new)
            b, _ = self._prepare_move(self.layers.resolve_required(new), old)
            rename2(self.layers.resolve_required(old).real, b.real, RENAME_EXCHANGE)
        finally:
            self._changed()
        self._move_remembered(old, new, exchange=True)
        if self.events:
            self.events.emit("rename", old, to=new)
            self.events.emit("rename", new, to=old)

    def _can_move(self, node):
        """A directory with a lower part can change its name only by getting a redirect."""
        return not (node.is_dir and node.has_lower) or self.stack.create_redirects

    def _prepare_move(self, node, to):
        """Copy `node` up and mark it to read the same at path `to`; returns it and the upper parent of `to`.

        A directory with lower parts (or, under metacopy, a file whose data
        stays below) gets a redirect to where its lower part lies; a new
        directory landing where lower directories merge is made opaque.
        """
        from_parent, from_name = parent_of(node.path)
        to_parent, _ = parent_of(to)
        redirect = None
        moves_data_ref = self.stack.metacopy and stat.S_ISREG(node.st.st_mode) and (
            node.data is not None or not node.in_upper)  # a metadata-only copy finds its data by name
        if (node.is_dir and node.has_lower) or moves_data_ref:
            if from_parent == to_parent:
                redirect = node.redirect or from_name
            else:
                redirect = "/" + next(rel for layer, rel in node.parts if layer > 0)
        node = self._copy_up(node, data=False)
        upper_parent, _ = self._upper_parent(to)
        if redirect is not None and redirect != node.redirect:
            set_marker(node.real, self.prefix, REDIRECT, redirect)
            if self.events:
                self.events.emit("redirect", to, value=redirect)
        elif node.is_dir and not node.has_lower and upper_parent.has_lower and not is_opaque(node.real, self.prefix):
            set_opaque(node.real, self.prefix)
            if self.events:
                self.events.emit("opaque", to)
        return node, upper_parent

    def _move_remembered(self, old, new, exchange=False):
        remembered = self.layers.remembered
        moves = renamed_paths(list(remembered), old, new, exchange)
        taken = {p: remembered.pop(p) for p, _ in moves}
        for p, q in moves:
            remembered[q] = taken[p]

    def _empty_upper_dir(self, real):
        """Make an upper directory about to be replaced really empty (it may hold whiteouts),
        by swapping in an empty opaque copy, so the merged view never shows lower entries."""
        if not os.listdir(real):
            return
        tmp = copyup.temp_name(self.work)
        os.mkdir(tmp, 0o700)
        try:
            set_opaque(tmp, self.prefix)
            rename2(tmp, real, RENAME_EXCHANGE)
        finally:
            copyup.discard(tmp)


def _drop_set_id(fd, caller):
    """What a truncate or write by `caller` does to the file's set-id bits when the caller lacks
    CAP_FSETID, as Linux 6.x does: S_ISUID goes; S_ISGID goes when group-exec is set or
    the caller is not in the file's group."""
    if _privileged(caller):
        return False
    st = os.fstat(fd)
    drop = st.st_mode & stat.S_ISUID
    if st.st_mode & stat.S_ISGID and (st.st_mode & stat.S_IXGRP or not caller.in_group(st.st_gid)):
        drop |= stat.S_ISGID
    if drop:
        os.fchmod(fd, stat.S_IMODE(st.st_mode) & ~drop)
    return bool(drop)


def _same_object(node, now):
    """True when `now`, the same path looked up again, is still `node`'s object in the same state."""
    return now is not None and now.layer == node.layer and os.path.samestat(now.st, node.st) and now.data == node.data


def _kind(mode):
    return {stat.S_IFREG: "file", stat.S_IFDIR: "dir", stat.S_IFLNK: "symlink", stat.S_IFIFO: "fifo",
            stat.S_IFCHR: "char device", stat.S_IFBLK: "block device", stat.S_IFSOCK: "socket"}.get(
                stat.S_IFMT(mode) or mode, "object")


def _stat_dict(st, ino, nlink):
    return {
        "st_mode": st.st_mode, "st_ino": ino, "st_nlink": nlink,
        "st_uid": st.st_uid, "st_gid": st.st_gid, "st_size": st.st_size, "st_rdev": st.st_rdev,
        "st_blocks": st.st_blocks, "st_blksize": st.st_blksize,
        "st_atime": st.st_atime_ns, "st_mtime": st.st_mtime_ns, "st_ctime": st.st_ctime_ns,
    }

