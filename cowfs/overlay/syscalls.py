"""System calls the standard library lacks: renameat2(2), whose flags make whiteouts and exchanges atomic,
fallocate(2) with its modes (punching holes, zeroing ranges), and statx(2)'s attributes (immutable, append-only)."""

import ctypes
import os

RENAME_NOREPLACE = 1 << 0
RENAME_EXCHANGE = 1 << 1
RENAME_WHITEOUT = 1 << 2

AT_FDCWD = -100

# The C library the interpreter already has loaded: find_library would run `ldconfig -p` at every start.
_libc = ctypes.CDLL(None, use_errno=True)
_renameat2 = _libc.renameat2
_renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
_renameat2.restype = ctypes.c_int


def rename2(src, dst, flags=0):
    """Rename `src` to `dst` with renameat2 flags. Raises OSError (EEXIST for NOREPLACE, ENOENT for EXCHANGE, ...)."""
    if _renameat2(AT_FDCWD, os.fsencode(src), AT_FDCWD, os.fsencode(dst), flags) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code), src, None, dst)


# fallocate(2) modes (linux/falloc.h); os.posix_fallocate has no modes.
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_COLLAPSE_RANGE = 0x08
FALLOC_FL_ZERO_RANGE = 0x10
FALLOC_FL_INSERT_RANGE = 0x20
FALLOC_FL_UNSHARE_RANGE = 0x40

_fallocate = _libc.fallocate64
_fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
_fallocate.restype = ctypes.c_int


def fallocate(fd, mode, offset, length):
    """fallocate(2) on descriptor `fd` with `mode` (FALLOC_FL_*). Raises OSError with the kernel's errno."""
    if _fallocate(fd, mode, offset, length) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))


# statx(2)'s attributes, which os.stat does not give: whether an inode is immutable or append-only, read
# without opening it (as the VFS checks them), for any type of object.
STATX_ATTR_IMMUTABLE = 0x10
STATX_ATTR_APPEND = 0x20
STATX_ATTR_VERITY = 0x100000  # the file has fs-verity
AT_SYMLINK_NOFOLLOW = 0x100
_statx = _libc.statx
_statx.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_uint, ctypes.c_void_p]
_statx.restype = ctypes.c_int
_statx_buf = ctypes.c_uint64 * 32  # struct statx is 256 bytes; stx_attributes is its second 8-byte word


def statx_attributes(path):
    """The stx_attributes (STATX_ATTR_*) of `path`, not following a symlink. Raises OSError."""
    buf = _statx_buf()
    if _statx(AT_FDCWD, os.fsencode(path), AT_SYMLINK_NOFOLLOW, 0, buf) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code), path)
    return buf[1]
