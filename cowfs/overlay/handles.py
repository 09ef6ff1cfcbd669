"""File handles in the kernel overlay's format: the `origin` of a copied-up object, the names of the index.

The kernel records where an upper object was copied up from as a file handle
of the lower object (name_to_handle_at) wrapped in its `struct ovl_fb`:
version 0, magic 0xfb, total length, flags, handle type, the 16-byte UUID of
the lower filesystem, then the handle's bytes. The same bytes, in lower-case
hex, name the object's entry in WORKDIR/index. Writing and reading exactly
this lets the kernel mount a cowfs upper and cowfs mount the kernel's, each
showing the other's inode numbers. The standard library has neither
name_to_handle_at nor open_by_handle_at: ctypes calls them here, and only here.
"""

import ctypes
import errno
import fcntl
import os
import struct

FB_MAGIC = 0xFB
FB_VERSION = 0
FB_HEADER = struct.Struct("<BBBBB16s")  # version, magic, len, flags, type, uuid
FLAG_BIG_ENDIAN = 1 << 0
FLAG_ANY_ENDIAN = 1 << 1
FLAG_PATH_UPPER = 1 << 2  # the handle is of an upper object (the index directory's `upper` xattr)
FLAGS_ALL = FLAG_BIG_ENDIAN | FLAG_ANY_ENDIAN | FLAG_PATH_UPPER
MAX_HANDLE_SZ = 128
FILEID_INO32_GEN = 1  # ext4, tmpfs, ...: a 32-bit inode number then its generation
FILEID_INO32_GEN_PARENT = 2
AT_EMPTY_PATH = 0x1000
FS_IOC_GETFSUUID = 0x80111500  # _IOR(0x15, 0, struct fsuuid2 {u8 len; u8 uuid[16]})
NULL_UUID = bytes(16)

_libc = ctypes.CDLL(None, use_errno=True)


class _FileHandle(ctypes.Structure):
    _fields_ = [("handle_bytes", ctypes.c_uint), ("handle_type", ctypes.c_int),
                ("f_handle", ctypes.c_ubyte * MAX_HANDLE_SZ)]


_name_to_handle_at = _libc.name_to_handle_at
_name_to_handle_at.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.POINTER(_FileHandle),
                               ctypes.POINTER(ctypes.c_int), ctypes.c_int]
_name_to_handle_at.restype = ctypes.c_int
_open_by_handle_at = _libc.open_by_handle_at
_open_by_handle_at.argtypes = [ctypes.c_int, ctypes.POINTER(_FileHandle), ctypes.c_int]
_open_by_handle_at.restype = ctypes.c_int


def _raise(path):
    code = ctypes.get_errno()
    raise OSError(code, os.strerror(code), path)


def file_handle(path):
    """(handle type, handle bytes) of the object at `path` (its last component not followed), or
    of the one open at descriptor `path`."""
    fh = _FileHandle(handle_bytes=MAX_HANDLE_SZ)
    mount_id = ctypes.c_int()
    if isinstance(path, int):
        dirfd, name, flags = path, b"", AT_EMPTY_PATH
    else:
        dirfd, name, flags = -100, os.fsencode(path), 0
    if _name_to_handle_at(dirfd, name, ctypes.byref(fh), ctypes.byref(mount_id), flags) != 0:
        _raise(path)
    return fh.handle_type, bytes(fh.f_handle[:fh.handle_bytes])


def open_handle(mount_path, handle_type, data):
    """An O_PATH descriptor of the object a handle names, on the filesystem of directory `mount_path` (needs
    CAP_DAC_READ_SEARCH). Raises OSError: ESTALE when the object is gone."""
    fh = _FileHandle(handle_bytes=len(data), handle_type=handle_type)
    ctypes.memmove(fh.f_handle, data, len(data))
    mount_fd = os.open(mount_path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)  # not O_PATH: EBADF
    try:
        fd = _open_by_handle_at(mount_fd, ctypes.byref(fh), os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
        if fd < 0:
            _raise(mount_path)
        return fd
    finally:
        os.close(mount_fd)


def fs_uuid(path):
    """The UUID of the filesystem holding `path`, as the kernel's super block has it (the null UUID
    when the filesystem tells none)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | (os.O_DIRECTORY if os.path.isdir(path) else 0))
    try:
        buf = bytearray(17)
        try:
            fcntl.ioctl(fd, FS_IOC_GETFSUUID, buf)
        except OSError as e:
            if e.errno in (errno.ENOTTY, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOSYS):
                return NULL_UUID
            raise
        return bytes(buf[1:1 + min(buf[0], 16)]).ljust(16, b"\0")
    finally:
        os.close(fd)


def supports_handles(path):
    """Whether the filesystem of `path` gives file handles (the kernel's index needs them)."""
    try:
        file_handle(path)
    except OSError as e:
        if e.errno in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
            return False
        raise
    return True


def encode(path, uuid, upper=False):
    """The `struct ovl_fb` bytes of the object at `path` (or open at descriptor `path`), on a
    filesystem of UUID `uuid`."""
    kind, data = file_handle(path)
    flags = FLAG_PATH_UPPER if upper else 0
    return FB_HEADER.pack(FB_VERSION, FB_MAGIC, FB_HEADER.size + len(data), flags, kind, uuid) + data


def decode(value):
    """(flags, handle type, uuid, handle bytes) of an `ovl_fb` value, or None for a value the kernel
    would read as "origin unknown" (empty, another version or unknown flags, another byte order).
    Raises ValueError for a malformed one."""
    if not value:
        return None
    if len(value) < FB_HEADER.size:
        raise ValueError("short file handle")
    version, magic, length, flags, kind, uuid = FB_HEADER.unpack_from(value)
    if magic != FB_MAGIC or length > len(value) or length < FB_HEADER.size:
        raise ValueError("bad file handle")
    if version > FB_VERSION or flags & ~FLAGS_ALL:
        return None
    if not flags & FLAG_ANY_ENDIAN and flags & FLAG_BIG_ENDIAN:
        return None
    return flags, kind, uuid, value[FB_HEADER.size:length]


def index_name(value):
    """The name of an object's entry in WORKDIR/index: its origin's `ovl_fb`, in lower-case hex."""
    return value.hex()


def handle_ino(kind, data):
    """The inode number an INO32_GEN handle carries, or None for another type: what an unprivileged
    process (no open_by_handle_at) can still learn of an origin."""
    if kind in (FILEID_INO32_GEN, FILEID_INO32_GEN_PARENT) and len(data) >= 4:
        return struct.unpack_from("<I", data)[0]
    return None
