"""Open files: `Handle`, and opening, creating, reading, writing and changing a file through its handle.

As the kernel's file.c: a handle holds a real descriptor, of the upper copy or
of a lower file; reads and writes go to it without the engine lock, and a
handle on a lower file follows the file once it is copied up.
"""

from __future__ import annotations

import errno
import os
import stat

from cowfs.errors import os_error
from cowfs.overlay import copyup, override, syscalls
from cowfs.overlay.attributes import stat_dict
from cowfs.overlay.credentials import Caller, drop_set_id
from cowfs.overlay.fileattr import FS_APPEND_FL, FS_IMMUTABLE_FL
from cowfs.overlay.locking import locked
from cowfs.overlay.lookup import parent_of
from cowfs.overlay.whiteout import escape_xattr


class Handle:
    """An open file: the real descriptor and, while it reads a lower file, that file's identity."""

    __slots__ = ("fd", "lower_id", "attrs_changed")

    def __init__(self, fd, lower_id=None):
        self.fd = fd
        self.lower_id = lower_id
        self.attrs_changed = False  # opening it changed the file's attributes (data-only data reached)


class Files:
    """The open-file operations of the engine (mixed into `Union`).

    Uses the engine's `stack`, `layers`, `prefix`, `work`, `idmap`, `_copied`, `_object_locks`, `_node`,
    `_dir`, `_require_writable`, `_copy_up`, `_place_new` and `_record`.
    """

    @locked
    def open(self, path: str, flags: int, caller: Caller | None = None) -> Handle:
        """Open a file for `caller` (None: root); opening for writing or with O_TRUNC copies it up first,
        and O_TRUNC may drop set-id bits (see `drop_set_id`). Returns a Handle."""
        node = self._node(path)
        writing = (flags & os.O_ACCMODE) != os.O_RDONLY or flags & os.O_TRUNC
        if node.is_dir and writing:
            raise os_error(errno.EISDIR, path)
        unreached = node.data is not None and self.layers.data_unreached(node.data)
        self._verify_data(node)  # verity=on|require: a metacopy file's data is checked first (and reached)
        if writing:
            self._require_writable(path)
            appending = flags & os.O_APPEND and not flags & os.O_TRUNC  # all an append-only file allows
            self._check_protection(node, path, FS_IMMUTABLE_FL | (0 if appending else FS_APPEND_FL))
            node = self._copy_up(node)
        # No O_DIRECT: the kernel side of FUSE decides direct I/O, and our buffers are not aligned for it.
        real_flags = (flags & ~(os.O_CREAT | os.O_EXCL | os.O_NOCTTY | os.O_DIRECT)) | os.O_NOFOLLOW | os.O_CLOEXEC
        fd = os.open(node.data or node.real, real_flags)  # a metadata-only copy reads from its lower data
        reached = node.data is not None and (unreached or self.layers.data_unreached(node.data))
        if reached:
            self.layers.data_reached.add(node.data)  # its blocks are the data's from now on (see Layers)
        if flags & os.O_TRUNC:
            try:
                drop_set_id(fd, caller)
            except BaseException:  # the descriptor is nobody's yet
                os.close(fd)
                raise
        lower_id = None
        if node.data is not None:
            data_st = os.fstat(fd)
            lower_id = (data_st.st_dev, data_st.st_ino)
        elif not node.in_upper:
            lower_id = (node.st.st_dev, node.st.st_ino)
        handle = Handle(fd, lower_id)
        handle.attrs_changed = reached
        return handle

    @locked
    def create(self, path: str, mode: int, flags: int, owner: tuple[int, int] | None = None,
               umask: int = 0) -> Handle:
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

    def read(self, handle: Handle, size: int, offset: int, path: str | None = None) -> bytes:
        """Read from an open file. A handle opened on a lower file that has since been
        copied up reads the upper copy, as on Linux 4.19 and later."""
        return os.pread(self.read_fd(handle, path), size, offset)

    def read_fd(self, handle: Handle, path: str | None = None) -> int:
        """The descriptor a read of `handle` must use (see `read`), for callers that read it themselves."""
        if handle.lower_id is not None and handle.lower_id in self._copied and path is not None:
            self._follow_copy_up(handle, path)
        return handle.fd

    @locked
    def _follow_copy_up(self, handle, path):
        node = self.layers.resolve(path)
        upper = node is not None and (node.in_upper or node.index is not None)  # an index entry is upper too
        if upper and node.data is None and handle.lower_id is not None:
            fd = os.open(node.real, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
            os.dup2(fd, handle.fd)
            os.close(fd)
            handle.lower_id = None

    def write_fd(self, handle: Handle) -> int:
        """The descriptor a write to `handle` goes to, for callers that write it themselves
        (who then call `wrote`)."""
        return handle.fd

    def wrote(self, handle: Handle, caller: Caller | None) -> bool:
        """After a write by `caller` through `write_fd`: set-id bits go as with `write`.
        True when the file's mode changed."""
        return drop_set_id(handle.fd, caller)

    def write(self, handle: Handle, data: bytes, offset: int, caller: Caller | None = None) -> int:
        """Write at `offset`; by an unprivileged `caller`, set-id bits go as with truncate."""
        written = os.pwrite(handle.fd, data, offset)
        drop_set_id(handle.fd, caller)
        return written

    def ftruncate(self, handle: Handle, length: int, caller: Caller | None = None) -> None:
        os.ftruncate(handle.fd, length)
        drop_set_id(handle.fd, caller)

    def fallocate(self, handle: Handle, mode: int, offset: int, length: int, caller: Caller | None = None) -> bool:
        """fallocate(2) through a handle open for writing, so on the upper copy (opening it copied the file
        up), as the kernel's overlay passes it to the upper file: every mode the upper takes, its errno for
        the rest. Set-id bits go as with `write`; True when the file's mode changed."""
        syscalls.fallocate(handle.fd, mode, offset, length)
        return drop_set_id(handle.fd, caller)

    def fsync(self, handle: Handle, datasync: bool = False) -> None:
        if not self.stack.volatile:
            (os.fdatasync if datasync else os.fsync)(handle.fd)

    def release(self, handle: Handle) -> None:
        os.close(handle.fd)

    # -- attributes through an open file ----------------------------------------------------------
    def fgetattr(self, handle: Handle, path: str | None = None) -> dict[str, int]:
        """Attributes of an open file, also once its name is gone (st_nlink 0 then, as on the kernel);
        one opened on a lower file that has since been copied up shows the copy, as `read` does."""
        if handle.lower_id is not None and handle.lower_id in self._copied and path is not None:
            self._follow_copy_up(handle, path)
        st = os.fstat(handle.fd)
        ino = self.layers.upper_origin_ino(handle.fd) if handle.lower_id is None else None
        if ino is None:
            ino = self.layers.map_ino(st)
        attrs = stat_dict(st, ino, st.st_nlink)
        if self.layers.marked:
            override.present(attrs, handle.fd)
        if self.idmap:
            self.idmap.show(attrs)
        return attrs

    # Changes through an open file act on the handle's own object, also once its name is gone.
    # A handle on a lower file first gets a copy of its own (see `_own_copy`): use them on such
    # a handle only when its name is gone; while it is there, the path's operation copies up.
    def fchmod(self, handle: Handle, mode: int) -> None:
        fd = self._own_fd(handle)
        if not self._record(fd, mode=mode):
            os.fchmod(fd, stat.S_IMODE(mode))

    def fchown(self, handle: Handle, uid: int, gid: int) -> None:
        """Change owner (as the mount shows owners: mapped back first); -1 leaves a field as it is."""
        fd = self._own_fd(handle)
        if self.idmap:
            uid, gid = self.idmap.disk_uid(uid), self.idmap.disk_gid(gid)
        if not self._record(fd, uid, gid):
            os.fchown(fd, uid, gid)

    def futimens(self, handle: Handle, atime_ns: int | None = None, mtime_ns: int | None = None) -> None:
        """Set times in ns; None keeps a time as it is (UTIME_OMIT)."""
        fd = self._own_fd(handle)
        st = os.fstat(fd)
        os.utime(fd, ns=(st.st_atime_ns if atime_ns is None else atime_ns,
                         st.st_mtime_ns if mtime_ns is None else mtime_ns))

    def fsetxattr(self, handle: Handle, name: str, value: bytes, flags: int = 0) -> None:
        if override.is_override(name):
            raise os_error(errno.EPERM)
        os.setxattr(self._own_fd(handle), escape_xattr(name, self.prefix), value, flags)

    def fremovexattr(self, handle: Handle, name: str) -> None:
        if override.is_override(name):
            raise os_error(errno.EPERM)
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
            with copyup.staged(self.work) as tmp:
                copyup.build_copy(handle.fd, st, tmp, self.prefix, self.layers.origin_handle(handle.fd, st), sync=False)
                fd = os.open(tmp, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
            try:
                os.dup2(fd, handle.fd)
            finally:
                os.close(fd)
            handle.lower_id = None
