"""POSIX ACL inheritance: a new object takes its directory's default ACL, as the kernel's posix_acl_create does.

The kernel overlay gets this from the VFS; a FUSE filesystem that lets the
kernel check ACLs must do it itself, on the upper directory the object lands in.
"""

import errno
import os
import stat
import struct

ACCESS = "system.posix_acl_access"
DEFAULT = "system.posix_acl_default"
USER_OBJ, USER, GROUP_OBJ, GROUP, MASK, OTHER = 0x01, 0x02, 0x04, 0x08, 0x10, 0x20
_HEADER, _ENTRY = struct.Struct("<I"), struct.Struct("<HHI")
VERSION = 2


def parse(value):
    """[[tag, perm, id], ...] of an ACL in its xattr form."""
    body = len(value) - _HEADER.size
    if body < 0 or body % _ENTRY.size or _HEADER.unpack_from(value)[0] != VERSION:
        raise OSError(errno.EINVAL, "malformed POSIX ACL")
    return [list(_ENTRY.unpack_from(value, offset)) for offset in range(_HEADER.size, len(value), _ENTRY.size)]


def pack(entries):
    return _HEADER.pack(VERSION) + b"".join(_ENTRY.pack(*entry) for entry in entries)


def for_new(parent_real, mode, umask, is_dir):
    """The mode a new object in directory `parent_real` gets, and the ACL xattrs to set on it afterwards.

    Without a default ACL the umask applies. With one, the umask is ignored and
    the default ACL, masked by the requested mode, becomes the access ACL
    (posix_acl_create_masq); a directory also inherits the default ACL itself.
    """
    try:
        default = os.getxattr(parent_real, DEFAULT, follow_symlinks=False)
    except OSError as e:
        if e.errno in (errno.ENODATA, errno.ENOTSUP, errno.EOPNOTSUPP):
            return mode & ~umask, {}
        raise
    entries = parse(default)
    perms = stat.S_IMODE(mode) & 0o777
    group_obj = mask = None
    extended = False
    for entry in entries:
        tag = entry[0]
        if tag == USER_OBJ:
            entry[1] &= perms >> 6
            perms &= (entry[1] << 6) | 0o077
        elif tag in (USER, GROUP):
            extended = True
        elif tag == GROUP_OBJ:
            group_obj = entry
        elif tag == OTHER:
            entry[1] &= perms & 0o7
            perms &= entry[1] | 0o770
        elif tag == MASK:
            mask = entry
            extended = True
    limit = mask if mask is not None else group_obj
    if limit is None:
        raise OSError(errno.EIO, "POSIX ACL without a group entry", parent_real)
    limit[1] &= (perms >> 3) & 0o7
    perms &= (limit[1] << 3) | 0o707
    xattrs = {ACCESS: pack(entries)} if extended else {}
    if is_dir:
        xattrs[DEFAULT] = default
    return (mode & ~0o777) | perms, xattrs
