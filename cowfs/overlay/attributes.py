"""Attributes by path: what the merged view says about an object, and changes to its attributes and xattrs.

As the kernel's inode.c: answers are read from the object where it lies now;
every change first copies the object up (only its metadata, with metacopy=on),
then acts on the upper copy.

In a stack with recorded attributes (override.py), an object's recorded owner,
mode and type are what it shows, and a chmod or chown changes the record
(`Attributes._record`) rather than the object on disk; the owner mapping
options (idmap.py) then apply to every owner shown, and back to every owner given.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat

from cowfs.errors import os_error
from cowfs.overlay import override
from cowfs.overlay.copyup import merged_nlink
from cowfs.overlay.credentials import Caller, drop_set_id, may_chown, privileged
from cowfs.overlay.fileattr import FS_IMMUTABLE_FL, PROT_FLAGS
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

    Uses the engine's `layers`, `prefix`, `writable`, `idmap`, `_node`, `_require_writable` and `_copy_up`.
    """

    @locked
    def getattr(self, path: str) -> dict[str, int]:
        """The merged attributes of `path` as a dict of st_* fields (times in ns). Raises ENOENT, ENOTDIR."""
        return self._attrs(self._node(path))

    def _attrs(self, node):
        st = os.lstat(node.real)  # cached nodes hold where an object is, not its current attributes
        nlink = 1 if node.is_dir and len(node.parts) > 1 else st.st_nlink  # as the kernel does for merged dirs
        if self.layers.index is not None and not node.is_dir and (node.in_upper or node.index is not None):
            nlink = merged_nlink(node.real, self.prefix, st)  # an indexed file: its recorded merged count
        attrs = stat_dict(st, self.layers.ino(node), nlink)
        if self.layers.marked:
            override.present(attrs, node.real)
        if self.idmap:
            self.idmap.show(attrs)
        if node.data is not None and self.layers.data_unreached(node.data):
            attrs["st_blocks"] = (st.st_size + 4095) // 4096 * 8  # the kernel's estimate (data not looked up yet)
        elif node.data is not None:
            with contextlib.suppress(FileNotFoundError):  # the data of a data-only layer may be missing
                attrs["st_blocks"] = os.lstat(node.data).st_blocks  # the blocks are still the lower file's
        if not node.in_upper and not node.is_dir and st.st_nlink > 1 and self.layers.index is None:
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
        self._check_protection(node, path)
        node = self._copy_up(node, data=False)
        if not self._record(node.real, mode=mode):
            os.chmod(node.real, stat.S_IMODE(mode))

    @locked
    def chown(self, path: str, uid: int, gid: int) -> None:
        """Change owner (as the mount shows owners: mapped back first); -1 leaves a field as it is."""
        self._require_writable(path)
        node = self._node(path)
        self._check_protection(node, path)
        node = self._copy_up(node, data=False)
        if self.idmap:
            uid, gid = self.idmap.disk_uid(uid), self.idmap.disk_gid(gid)
        if not self._record(node.real, uid, gid):
            os.chown(node.real, uid, gid, follow_symlinks=False)

    def _record(self, target, uid=-1, gid=-1, mode=None):
        """Make a chown or chmod of upper object `target` (a path, or a descriptor) a change of its
        recorded attributes; False when it is not one, and the change goes to the object on disk.

        It is one, as in fuse-overlayfs, for an object that carries recorded attributes, and for
        any regular file or directory of this process's own in a marked upper when the process
        cannot chown (an unprivileged mount): the record then starts from what the object shows.
        A chown drops the set-id bits of a non-directory, as chown(2) does (the kernel also sends
        the mode it wants then).
        """
        if not self.layers.marked:
            return False
        st = os.fstat(target) if isinstance(target, int) else os.lstat(target)
        if not override.carries(st.st_mode):
            return False
        current = override.read(target, st.st_mode)
        if current is None:
            if 0 not in self.layers.marked or st.st_uid != os.geteuid() or may_chown():
                return False
            current = override.of_stat(st)
        changed = current.changed(uid, gid, mode)
        if (uid != -1 or gid != -1) and not stat.S_ISDIR(st.st_mode):
            kill = stat.S_ISUID | (stat.S_ISGID if changed.mode & stat.S_IXGRP else 0)
            changed = changed.changed(mode=changed.mode & ~kill)
        override.write(target, changed)
        return True

    @locked
    def utimens(self, path: str, atime_ns: int | None = None, mtime_ns: int | None = None,
                touch: bool = False) -> None:
        """Set times in ns; None keeps a time as it is (UTIME_OMIT). A `touch` (both to now) is allowed
        on an append-only object, as the VFS allows it; explicit times are not."""
        self._require_writable(path)
        node = self._node(path)
        self._check_protection(node, path, FS_IMMUTABLE_FL if touch else PROT_FLAGS)
        node = self._copy_up(node, data=False)
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
        self._check_protection(node, path)
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
    # The recorded attributes' xattr never shows either, and cannot be set
    # through the mount: what it says is what stat shows (see override.py).
    @locked
    def getxattr(self, path: str, name: str) -> bytes:
        node = self._node(path)
        if override.is_override(name):
            raise os_error(errno.ENODATA, path)
        return os.getxattr(node.real, escape_xattr(name, self.prefix), follow_symlinks=False)

    @locked
    def listxattr(self, path: str, caller: Caller | None = None) -> list[str]:
        """The xattr names; trusted.* ones only for a privileged caller, as the kernel lists them."""
        names = (unescape_xattr(n, self.prefix) for n in os.listxattr(self._node(path).real, follow_symlinks=False))
        return [n for n in names if n is not None and (privileged(caller) or not n.startswith("trusted."))
                and not override.is_override(n)]

    @locked
    def setxattr(self, path: str, name: str, value: bytes, flags: int = 0) -> None:
        self._require_writable(path)
        node = self._node(path)
        if override.is_override(name):
            raise os_error(errno.EPERM, path)
        self._check_protection(node, path)
        # an indexed inode takes the xattr as it is, no name linked up; an upper one is not copied up (nor its
        # metacopy data checked under verity), as the kernel's
        if node.index is None and not node.in_upper:
            node = self._copy_up(node, data=False)
        os.setxattr(node.real, escape_xattr(name, self.prefix), value, flags, follow_symlinks=False)

    @locked
    def removexattr(self, path: str, name: str) -> None:
        self._require_writable(path)
        node = self._node(path)
        if override.is_override(name):
            raise os_error(errno.EPERM, path)
        self._check_protection(node, path)
        real_name = escape_xattr(name, self.prefix)
        if not node.in_upper:
            os.getxattr(node.real, real_name, follow_symlinks=False)  # ENODATA before any copy-up, as the kernel
        if node.index is None and not node.in_upper:  # as setxattr
            node = self._copy_up(node, data=False)
        os.removexattr(node.real, real_name, follow_symlinks=False)
