"""fs-verity digests of metacopy data (`verity=on|require`), in the kernel's on-disk format.

A metadata-only copy made under `verity=on|require` records, in its metacopy
xattr, the fs-verity digest of the lower file that holds its data (when that
file has one), and the data is checked against it before it is used: as the
kernel's overlay, so that a lower layer swapped or changed offline is caught.

The xattr value is the kernel's `struct ovl_metacopy`: version (0), len (the
header's 4 bytes plus the digest's), flags (0), digest_algo (the fs-verity
algorithm number, FS_VERITY_HASH_ALG_*), then the digest.  No digest is an
empty value, as a plain metacopy=on copy has.

Digests are measured by the kernel (FS_IOC_MEASURE_VERITY) for a file that
statx says has fs-verity, and only for one: any other file is never opened
(one the daemon may not read included), as the kernel opens only those.  A
filesystem or kernel without fs-verity has no file with it.
"""

import errno
import fcntl
import os
import struct

from cowfs.overlay.syscalls import STATX_ATTR_VERITY, statx_attributes

HEADER = struct.Struct("BBBB")  # version, len, flags, digest_algo
MAX_DIGEST = 64  # FS_VERITY_MAX_DIGEST_SIZE (SHA-512)
MAX_SIZE = HEADER.size + MAX_DIGEST  # OVL_METACOPY_MAX_SIZE

# _IOWR('f', 134, struct fsverity_digest {__u16 digest_algorithm; __u16 digest_size; __u8 digest[];})
FS_IOC_MEASURE_VERITY = (3 << 30) | (4 << 16) | (ord("f") << 8) | 134
_DIGEST_HEAD = struct.Struct("=HH")
# What FS_IOC_MEASURE_VERITY says for "no digest here": no fs-verity on this file (ENODATA), on this
# filesystem (ENOTTY, EOPNOTSUPP), or in this kernel (EOPNOTSUPP).
NO_VERITY = (errno.ENODATA, errno.ENOTTY, errno.EOPNOTSUPP)


def measure(path):
    """The fs-verity digest of regular file `path` as (algorithm number, digest bytes), or None when
    it has none. Opened (read-only, not through a symlink) only when statx says it has fs-verity."""
    if not statx_attributes(path) & STATX_ATTR_VERITY:
        return None
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    try:
        return measure_fd(fd)
    finally:
        os.close(fd)


def measure_fd(fd):
    """The fs-verity digest of the file open at `fd` (see `measure`), or None when it has none."""
    buf = bytearray(_DIGEST_HEAD.pack(0, MAX_DIGEST) + bytes(MAX_DIGEST))
    try:
        fcntl.ioctl(fd, FS_IOC_MEASURE_VERITY, buf, True)
    except OSError as e:
        if e.errno in NO_VERITY:
            return None
        raise
    algo, size = _DIGEST_HEAD.unpack_from(buf)
    return algo, bytes(buf[_DIGEST_HEAD.size:_DIGEST_HEAD.size + size])


def metacopy_value(digest):
    """The metacopy xattr value recording `digest` ((algorithm, bytes), as `measure` gives it), or the
    empty value for None, as the kernel writes it."""
    if digest is None:
        return b""
    algo, raw = digest
    if not raw or len(raw) > MAX_DIGEST:
        raise ValueError(f"an fs-verity digest has 1 to {MAX_DIGEST} bytes, not {len(raw)}")
    return HEADER.pack(0, HEADER.size + len(raw), 0, algo) + raw


def recorded_digest(value, path):
    """The digest (algorithm, bytes) a metacopy xattr `value` records, or None when it records none.

    A value the kernel would not take (too short, another version, a length byte that is not its
    size, too long) raises OSError EIO (ERANGE when too long) for merged path `path`, as the kernel's
    ovl_check_metacopy_xattr refuses it."""
    if not value:
        return None
    if len(value) > MAX_SIZE:
        raise _error(errno.ERANGE, path, f"metacopy xattr longer than {MAX_SIZE} bytes")
    if len(value) < HEADER.size:
        raise _error(errno.EIO, path, "metacopy xattr too small")
    version, length, _flags, algo = HEADER.unpack_from(value)
    if version != 0:
        raise _error(errno.EIO, path, f"metacopy xattr of unsupported version {version}")
    if length != len(value):
        raise _error(errno.EIO, path, f"metacopy xattr of invalid size ({len(value)} bytes, says {length})")
    if not algo:
        return None
    return algo, bytes(value[HEADER.size:])


def check(mode, value, data, path, measure_digest=measure):
    """Before the data of a metacopy file is used (opened, or copied up): with verity `mode` on or
    require, the digest its metacopy xattr `value` records must be the fs-verity digest of `data`,
    the lower file holding the data; under require, a metacopy file must record one.

    Raises OSError EIO for merged path `path` otherwise, naming the reason, as the kernel's
    ovl_validate_verity. `measure_digest` measures a file (`measure`; tests give their own)."""
    if mode == "off":
        return
    want = recorded_digest(value, path)
    if want is None:
        if mode == "require":
            raise _error(errno.EIO, path, "metacopy file has no fs-verity digest (verity=require)")
        return
    have = measure_digest(data)
    if have is None:
        raise _error(errno.EIO, path, "its lower data has no fs-verity digest")
    if have != want:
        raise _error(errno.EIO, path, "its lower data has the wrong fs-verity digest")


def _error(code, path, reason):
    return OSError(code, f"{os.strerror(code)} ({reason})", path)
