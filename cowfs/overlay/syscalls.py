"""renameat2(2), which the standard library lacks: its flags make whiteouts and exchanges atomic."""

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
