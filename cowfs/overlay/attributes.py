"""Attributes by path: what the merged view says about an object, and changes to its attributes and xattrs.

As the kernel's inode.c: answers are read from the object where it lies now;
every change first copies the object up (only its metadata, with metacopy=on),
then acts on the upper copy.
"""

from __future__ import annotations

import errno
import os
import stat

from cowfs.errors import os_error
from cowfs.overlay.credentials import Caller, drop_set_id, privileged
from cowfs.overlay.locking import locked
from cowfs.overlay.whiteout import escape_xattr, unescape_xattr


def stat_dict(st, ino, nlink):
    """`st` as the engine answers getattr: a dict of st_* fields, times in ns."""
    return {
        "st_mode": st.st_mode, "st_ino": ino, "st_nlink": nlink,
        "st_uid": st.st_uid, "st_gid": st.st_gid, "st_size": st.st_size, "st_rdev": st.st_rdev,
        "st_blocks": st.st_blocks, "st_blksize": st.st_blksize,
        "st_atime": st.st_atime_ns, "st_mtime": st.st_mtime_ns, "st_ctime": st.st_ctime_ns,
    }


class Attributes:
    """The attribute operations of the engine (mixed into `Union`), by merged path.

    Uses the engine's `layers`, `prefix`, `writable`, `_node`, `_require_writable` and `_copy_up`.
    """

    @locked
    def getattr(self, path: str) -> dict[str, int]:
        """The merged attributes of `path` as a dict of st_* fields (times in ns). Raises ENOENT, ENOTDIR."""
        return self._attrs(self._node(path))

    def _attrs(self, node):
        st = os.lstat(node.real)  # cached nodes hold where an object is, not its current attributes
        nlink = 1 if node.is_dir and len(node.parts) > 1 else st.st_nlink  # as the kernel does for merged dirs
        attrs = stat_dict(st, self.layers.ino(node), nlink)
        if node.data is not None:
            attrs["st_blocks"] = os.lstat(node.data).st_blocks  # the blocks are still the lower file's
        if not node.in_upper and not node.is_dir and st.st_nlink > 1:
            # A lower hard link: a copy-up will break it, so the kernel overlay gives each of its
            # names an inode of its own; a FUSE adapter does the same.
            attrs["lower_link"] = True
        return attrs

    @locked
    def readlink(self, path: str) -> str:
        node = self._node(path)
        if not stat.S_ISLNK(node.st.st_mode):
            raise os_error(errno.EINVAL, path)
        return os.readlink(node.real)

    @locked
    def access(self, path: str, mode: int) -> int:
        node = self._node(path)
        if mode & os.W_OK and not self.writable and stat.S_IFMT(node.st.st_mode) in (
                stat.S_IFREG, stat.S_IFDIR, stat.S_IFLNK):
            raise os_error(errno.EROFS, path)
        return 0

    # -- changes of attributes (each copies up first) --------------------------------------------
    @locked
    def chmod(self, path: str, mode: int) -> None:
        node = self._node(path)
        if stat.S_ISLNK(node.st.st_mode):
            raise os_error(errno.EOPNOTSUPP, path)
        self._require_writable(path)
        node = self._copy_up(node, data=False)
        os.chmod(node.real, stat.S_IMODE(mode))

    @locked
    def chown(self, path: str, uid: int, gid: int) -> None:
        """Change owner; -1 leaves a field as it is."""
        self._require_writable(path)
        node = self._copy_up(self._node(path), data=False)
        os.chown(node.real, uid, gid, follow_symlinks=False)

    @locked
    def utimens(self, path: str, atime_ns: int | None = None, mtime_ns: int | None = None) -> None:
        """Set times in ns; None keeps a time as it is (UTIME_OMIT)."""
        self._require_writable(path)
        node = self._copy_up(self._node(path), data=False)
        st = os.lstat(node.real)
        os.utime(node.real, ns=(st.st_atime_ns if atime_ns is None else atime_ns,
                                st.st_mtime_ns if mtime_ns is None else mtime_ns), follow_symlinks=False)

    @locked
    def truncate(self, path: str, length: int, caller: Caller | None = None) -> None:
        """truncate(2) by `caller` (None: root), who may lose the file's set-id bits (see `drop_set_id`)."""
        node = self._node(path)
        if node.is_dir:
            raise os_error(errno.EISDIR, path)
        self._require_writable(path)
        node = self._copy_up(node)
        fd = os.open(node.real, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            os.ftruncate(fd, length)
            drop_set_id(fd, caller)
        finally:
            os.close(fd)

    # -- xattrs ----------------------------------------------------------------------------------
    # The overlay's own xattrs never show; one named like them through the
    # mount is stored escaped, as Linux 6.7 and later do (see whiteout.py).
    @locked
    def getxattr(self, path: str, name: str) -> bytes:
        return os.getxattr(self._node(path).real, escape_xattr(name, self.prefix), follow_symlinks=False)

    @locked
    def listxattr(self, path: str, caller: Caller | None = None) -> list[str]:
        """The xattr names; trusted.* ones only for a privileged caller, as the kernel lists them."""
        names = (unescape_xattr(n, self.prefix) for n in os.listxattr(self._node(path).real, follow_symlinks=False))
        return [n for n in names if n is not None and (privileged(caller) or not n.startswith("trusted."))]

    @locked
    def setxattr(self, path: str, name: str, value: bytes, flags: int = 0) -> None:
        self._require_writable(path)
        node = self._copy_up(self._node(path), data=False)
        os.setxattr(node.real, escape_xattr(name, self.prefix), value, flags, follow_symlinks=False)

    @locked
    def removexattr(self, path: str, name: str) -> None:
        self._require_writable(path)
        node = self._node(path)
        real_name = escape_xattr(name, self.prefix)
        if not node.in_upper:
            os.getxattr(node.real, real_name, follow_symlinks=False)  # ENODATA before any copy-up, as the kernel
        node = self._copy_up(node, data=False)
        os.removexattr(node.real, real_name, follow_symlinks=False)
