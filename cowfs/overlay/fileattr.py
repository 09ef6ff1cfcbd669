"""File attribute flags (chattr, lsattr: FS_IOC_GETFLAGS/SETFLAGS, FS_IOC_FSGETXATTR/FSSETXATTR), kept as the
kernel's overlay keeps them.

An object's flags are those of the file where it lies (the upper copy if there
is one, else the lower), except append-only and immutable on an upper object:
those live in its `overlay.protattr` xattr ("a", "i" or "ai"), never on the
upper inode, which the overlay must still be able to rename, link and mark.
Setting flags copies the object up first; a copy-up carries the lower's sync
and noatime flags to the copy and its append-only and immutable ones to the
copy's protattr. An append-only or immutable object refuses changes (EPERM),
as the VFS refuses them on the kernel overlay's inode: FUSE does not know the
flags, so the engine checks (`_check_protection`).
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
import struct

from cowfs.errors import os_error
from cowfs.overlay import syscalls
from cowfs.overlay.locking import locked

FS_IOC_GETFLAGS, FS_IOC_SETFLAGS = 0x80086601, 0x40086602  # _IOR/_IOW('f', 1/2, long): the kernel moves an int
FS_IOC32_GETFLAGS, FS_IOC32_SETFLAGS = 0x80046601, 0x40046602  # the 32-bit spellings of the same
FS_IOC_FSGETXATTR, FS_IOC_FSSETXATTR = 0x801C581F, 0x401C5820  # struct fsxattr, 28 bytes
FSXATTR = struct.Struct("=IIIII8x")  # fsx_xflags, fsx_extsize, fsx_nextents, fsx_projid, fsx_cowextsize

FS_SYNC_FL, FS_IMMUTABLE_FL, FS_APPEND_FL, FS_NOATIME_FL = 0x08, 0x10, 0x20, 0x80
FS_XFLAG_IMMUTABLE, FS_XFLAG_APPEND, FS_XFLAG_SYNC, FS_XFLAG_NOATIME = 0x08, 0x10, 0x20, 0x40
PROT_FLAGS = FS_APPEND_FL | FS_IMMUTABLE_FL  # kept in protattr on an upper object
PROT_XFLAGS = FS_XFLAG_APPEND | FS_XFLAG_IMMUTABLE
COPY_FLAGS = FS_SYNC_FL | FS_NOATIME_FL  # copied to the upper inode at copy-up
PROTATTR = "protattr"


def _has_flags(mode):
    return stat.S_ISREG(mode) or stat.S_ISDIR(mode)


def _open(path):
    return os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)


def _ioctl(target, request, buf):
    """ioctl `request` on `target` (an open descriptor, or the path of a regular file or directory)."""
    if isinstance(target, int):
        fcntl.ioctl(target, request, buf)
        return buf
    fd = _open(target)
    try:
        fcntl.ioctl(fd, request, buf)
    finally:
        os.close(fd)
    return buf


def real_flags(target):
    """FS_IOC_GETFLAGS of a real file (a descriptor or a path)."""
    return struct.unpack_from("=I", _ioctl(target, FS_IOC_GETFLAGS, bytearray(8)))[0]


def _set_real_flags(target, flags):
    _ioctl(target, FS_IOC_SETFLAGS, bytearray(struct.pack("=Q", flags)))


def real_fsxattr(target):
    return list(FSXATTR.unpack(_ioctl(target, FS_IOC_FSGETXATTR, bytearray(FSXATTR.size))))


def read_protattr(target, prefix):
    """The FS_APPEND_FL/FS_IMMUTABLE_FL an upper object's protattr xattr holds (0 without one)."""
    try:
        value = os.getxattr(target, prefix + PROTATTR, follow_symlinks=False)
    except OSError as e:
        if e.errno in (errno.ENODATA, errno.ENOTSUP):
            return 0
        raise
    flags = 0
    for ch in value:
        if ch == ord("a"):
            flags |= FS_APPEND_FL
        elif ch == ord("i"):
            flags |= FS_IMMUTABLE_FL
        else:
            return 0  # a format this version does not know: as the kernel, ignore it
    return flags


def write_protattr(target, prefix, flags, had):
    """Record FS_APPEND_FL/FS_IMMUTABLE_FL of `flags` in protattr, in the kernel's spelling ("a" before
    "i"); with neither, remove the xattr when the object `had` one of them."""
    value = (b"a" if flags & FS_APPEND_FL else b"") + (b"i" if flags & FS_IMMUTABLE_FL else b"")
    if value:
        try:
            os.setxattr(target, prefix + PROTATTR, value, follow_symlinks=False)
        except OSError as e:
            if e.errno == errno.ENOTSUP:
                raise os_error(errno.EPERM) from None  # as the kernel, when the upper takes no xattrs
            raise
    elif had:
        try:
            os.removexattr(target, prefix + PROTATTR, follow_symlinks=False)
        except OSError as e:
            if e.errno not in (errno.ENODATA, errno.ENOTSUP):
                raise


def copy_up_flags(src, st, tmp, prefix):
    """At copy-up, before the copy `tmp` is renamed into place: the lower's sync and noatime flags to
    the copy, its append-only and immutable ones to the copy's protattr (as the kernel's copy-up)."""
    if not _has_flags(st.st_mode):
        return
    try:
        flags = real_flags(src)
    except OSError as e:
        if e.errno in (errno.ENOTTY, errno.EOPNOTSUPP, errno.EINVAL):
            return  # the lower filesystem has no flags
        raise
    if flags & PROT_FLAGS:
        write_protattr(tmp, prefix, flags, False)
    if flags & COPY_FLAGS:
        _set_real_flags(tmp, (real_flags(tmp) & ~COPY_FLAGS) | (flags & COPY_FLAGS))


# The flags a new object takes from its directory on ext4 (EXT4_FL_INHERITED, less those that cannot be
# set once the object exists): the kernel overlay makes a new object in its upper directory, cowfs makes it in
# the workdir, so they are given here. A directory also passes on DIRSYNC.
INHERITED = FS_SYNC_FL | FS_NOATIME_FL | 0x40  # FS_NODUMP_FL
INHERITED_BY_DIRS = INHERITED | 0x10000  # FS_DIRSYNC_FL


def inherit_flags(parent, tmp, kind):
    """Give new object `tmp` (built in the workdir) the flags it would have taken from upper directory
    `parent` had it been made there. Regular files and directories only: others cannot be opened."""
    if kind not in (stat.S_IFREG, stat.S_IFDIR):
        return
    try:
        wanted = real_flags(parent) & (INHERITED_BY_DIRS if kind == stat.S_IFDIR else INHERITED)
    except OSError:
        return  # no flags on that filesystem
    if wanted:
        _set_real_flags(tmp, real_flags(tmp) | wanted)


class FileAttrs:
    """The flag operations of the engine (mixed into `Union`), by merged path.

    Uses the engine's `prefix`, `_node`, `_require_writable` and `_copy_up`.
    """

    def _flagged(self, node, path):
        if not _has_flags(node.st.st_mode):
            raise os_error(errno.ENOTTY, path)

    @locked
    def getflags(self, path: str) -> int:
        """The FS_IOC_GETFLAGS answer for `path`: the real file's flags, with an upper one's protattr."""
        node = self._node(path)
        self._flagged(node, path)
        flags = real_flags(node.real)
        return flags | read_protattr(node.real, self.prefix) if node.in_upper else flags

    @locked
    def setflags(self, path: str, flags: int) -> None:
        """FS_IOC_SETFLAGS (the caller's rights are the kernel's to check): copy up, then append-only and
        immutable to protattr, the other flags to the upper file."""
        node = self._node(path)
        self._flagged(node, path)
        self._require_writable(path)
        node = self._copy_up(node, data=False)
        write_protattr(node.real, self.prefix, flags, read_protattr(node.real, self.prefix))
        _set_real_flags(node.real, flags & ~PROT_FLAGS)

    @locked
    def fsgetxattr(self, path: str) -> bytes:
        """The FS_IOC_FSGETXATTR answer (a struct fsxattr), with an upper object's protattr."""
        node = self._node(path)
        self._flagged(node, path)
        fsx = real_fsxattr(node.real)
        if node.in_upper:
            prot = read_protattr(node.real, self.prefix)
            fsx[0] |= (FS_XFLAG_APPEND if prot & FS_APPEND_FL else 0) | (
                FS_XFLAG_IMMUTABLE if prot & FS_IMMUTABLE_FL else 0)
        return FSXATTR.pack(*fsx)

    @locked
    def fssetxattr(self, path: str, value: bytes) -> None:
        """FS_IOC_FSSETXATTR: as `setflags`, with the flags spelt as xflags."""
        node = self._node(path)
        self._flagged(node, path)
        fsx = list(FSXATTR.unpack(value[:FSXATTR.size].ljust(FSXATTR.size, b"\0")))
        self._require_writable(path)
        node = self._copy_up(node, data=False)
        prot = (FS_APPEND_FL if fsx[0] & FS_XFLAG_APPEND else 0) | (
            FS_IMMUTABLE_FL if fsx[0] & FS_XFLAG_IMMUTABLE else 0)
        write_protattr(node.real, self.prefix, prot, read_protattr(node.real, self.prefix))
        fsx[0] &= ~PROT_XFLAGS
        _ioctl(node.real, FS_IOC_FSSETXATTR, bytearray(FSXATTR.pack(*fsx)))

    def _protection(self, node):
        """The append-only and immutable flags `node` shows (its real file's, and an upper one's protattr)."""
        try:
            attributes = syscalls.statx_attributes(node.real)  # one call, and nothing opened
        except OSError:
            attributes = 0  # gone meanwhile: the operation will say so
        flags = (FS_IMMUTABLE_FL if attributes & syscalls.STATX_ATTR_IMMUTABLE else 0) | (
            FS_APPEND_FL if attributes & syscalls.STATX_ATTR_APPEND else 0)
        if node.in_upper:
            flags |= read_protattr(node.real, self.prefix)
        return flags

    def _check_protection(self, node, path, mask=PROT_FLAGS):
        """EPERM when `node` is append-only or immutable (those of `mask`), as the VFS refuses a change."""
        if self._protection(node) & mask:
            raise os_error(errno.EPERM, path)
