"""Recorded attributes: the stat override xattr of containers/storage and fuse-overlayfs, its format and its use.

An unprivileged user cannot give a file another owner, nor make a device
node; an image holds both. containers/storage, unpacking a layer without
privilege, keeps the real owner, mode and type in `user.containers.override_stat`
on the object it could make, and fuse-overlayfs shows what the xattr says.
cowfs reads and writes the same xattr:

    UID:GID:MODE[:TYPE]

UID and GID decimal, MODE octal permission bits (set-id and sticky included,
no type bits), TYPE one of `file`, `dir`, `symlink`, `pipe`, `socket`,
`block-MAJ-MIN`, `char-MAJ-MIN` (the Rust fuse-overlayfs's `charMAJ:MIN` is
read too). Linux allows user.* xattrs only on regular
files and directories, so only those carry it: a device, FIFO or socket is
kept as an empty regular file whose TYPE says what it is.

A layer whose root directory carries the xattr is *marked*, as fuse-overlayfs
detects it per layer; a stack with a marked layer shows, for every regular
file and directory that carries the xattr, the recorded owner, mode and type
(and device number) instead of what is on disk. This module is the only one
that spells the xattr's name (the overlay's own markers are whiteout.py's).
"""

from __future__ import annotations

import dataclasses
import errno
import os
import re
import stat

NAME = "user.containers.override_stat"

TYPES = {"file": stat.S_IFREG, "dir": stat.S_IFDIR, "symlink": stat.S_IFLNK, "pipe": stat.S_IFIFO,
         "socket": stat.S_IFSOCK}
TYPE_NAMES = {kind: name for name, kind in TYPES.items()}
DEVICES = {"char": stat.S_IFCHR, "block": stat.S_IFBLK}
DEVICE_NAMES = {kind: name for name, kind in DEVICES.items()}
# The device number as containers/storage and the C fuse-overlayfs write it (`char-1-3`, written
# here) and as the Rust fuse-overlayfs reads it (`char1:3`): both are read.
_DEVICE = re.compile(r"(char|block)(?::?|-)([0-9]+)[:-]([0-9]+)")
_DECIMAL = re.compile(r"[0-9]+")
_OCTAL = re.compile(r"[0-7]+")
MAX_ID = (1 << 32) - 2  # (uid_t)-1 means "no change" to chown: never an owner
# What each type on disk may show as: a directory only as one; a regular file as
# anything the xattr stands in for, except a symlink (its target could not be read).
SHOWN_AS = {stat.S_IFDIR: {stat.S_IFDIR},
            stat.S_IFREG: {stat.S_IFREG, stat.S_IFIFO, stat.S_IFSOCK, stat.S_IFCHR, stat.S_IFBLK}}
ROOT = "0:0:0755:dir"  # a layer root as a privileged unpack leaves it


@dataclasses.dataclass(frozen=True)
class Override:
    """One recorded set of attributes. `kind` is the S_IFMT bits of TYPE, 0 when the value names no type."""

    uid: int
    gid: int
    mode: int
    kind: int = 0
    rdev: int = 0

    def changed(self, uid=-1, gid=-1, mode=None):
        """These attributes after a chown (-1 keeps a field) and a chmod (None keeps the mode)."""
        return dataclasses.replace(self, uid=self.uid if uid == -1 else uid, gid=self.gid if gid == -1 else gid,
                                   mode=self.mode if mode is None else stat.S_IMODE(mode))


def parse(value):
    """The Override a value (bytes or str) records. Raises ValueError for a malformed one."""
    if isinstance(value, bytes):
        value = value.decode("ascii")  # UnicodeDecodeError is a ValueError
    fields = value.split(":", 3)
    if len(fields) < 3:
        raise ValueError(f"{value!r}: not UID:GID:MODE[:TYPE]")
    uid, gid, mode = fields[:3]
    if not _DECIMAL.fullmatch(uid) or not _DECIMAL.fullmatch(gid) or int(uid) > MAX_ID or int(gid) > MAX_ID:
        raise ValueError(f"{value!r}: owner is not two decimal IDs")
    if not _OCTAL.fullmatch(mode) or int(mode, 8) > 0o7777:
        raise ValueError(f"{value!r}: mode is not octal permission bits")
    kind = rdev = 0
    if len(fields) == 4:
        name = fields[3]
        device = _DEVICE.fullmatch(name)
        if device:
            kind, rdev = DEVICES[device.group(1)], os.makedev(int(device.group(2)), int(device.group(3)))
        elif name in TYPES:
            kind = TYPES[name]
        else:
            raise ValueError(f"{value!r}: unknown type {name!r}")
    return Override(int(uid), int(gid), int(mode, 8), kind, rdev)


def type_field(kind, rdev=0):
    """TYPE for the S_IFMT bits `kind` (with its device number for a device)."""
    if kind in DEVICE_NAMES:  # containers/storage's spelling, which Debian's fuse-overlayfs reads
        return f"{DEVICE_NAMES[kind]}-{os.major(rdev)}-{os.minor(rdev)}"
    return TYPE_NAMES[kind]


def format_value(override):
    """The xattr value of an Override, as containers/storage writes it (a four-digit mode)."""
    text = f"{override.uid}:{override.gid}:{override.mode:04o}"
    return text + ":" + type_field(override.kind, override.rdev) if override.kind else text


def of_stat(st):
    """The attributes an lstat result shows, as an Override."""
    return Override(st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode), stat.S_IFMT(st.st_mode), st.st_rdev)


def carries(st_mode):
    """Whether an object of this type can carry the xattr (Linux allows user.* xattrs only there)."""
    return stat.S_ISREG(st_mode) or stat.S_ISDIR(st_mode)


def read(target, st_mode=None):
    """The Override on `target` (a path, never followed, or a descriptor), or None: not set, or malformed.

    A malformed value is ignored, as fuse-overlayfs ignores it: the object then shows its real
    attributes, stays usable, and the next chmod or chown through the mount writes a good value.
    With `st_mode`, a type the object cannot show as (a directory recorded as a file) is malformed too.
    """
    try:
        if isinstance(target, int):
            value = os.getxattr(target, NAME)
        else:
            value = os.getxattr(target, NAME, follow_symlinks=False)
    except OSError as e:
        if e.errno in (errno.ENODATA, errno.ENOTSUP, errno.EPERM, errno.ENOENT):
            return None
        raise
    try:
        found = parse(value)
    except ValueError:
        return None
    if st_mode is not None and found.kind and found.kind not in SHOWN_AS.get(stat.S_IFMT(st_mode), ()):
        return None
    return found


def write(target, override):
    """Record `override` on `target` (a path, never followed, or a descriptor)."""
    value = format_value(override).encode()
    if isinstance(target, int):
        os.setxattr(target, NAME, value)
    else:
        os.setxattr(target, NAME, value, follow_symlinks=False)


def is_marked(root):
    """Whether the layer at directory `root` has recorded attributes: its root carries the xattr."""
    try:
        os.getxattr(root, NAME, follow_symlinks=False)
        return True
    except OSError:
        return False


def mark(root, value=ROOT):
    """Mark the layer at directory `root` (see `is_marked`), with the attributes its root shows."""
    os.setxattr(root, NAME, value.encode() if isinstance(value, str) else value, follow_symlinks=False)


def root_value(root):
    """The raw xattr value on a marked layer root, for marking another layer the same (None if not marked)."""
    try:
        return os.getxattr(root, NAME, follow_symlinks=False)
    except OSError:
        return None


def present(attrs, target):
    """Apply the xattr on `target`, if any, to `attrs` (a getattr dict of st_* fields) in place:
    the owner, the mode and the type it records, and the device number for a device."""
    mode = attrs["st_mode"]
    if not carries(mode):
        return attrs
    found = read(target, mode)
    if found is not None:
        apply(attrs, found)
    return attrs


def apply(attrs, override):
    """`attrs` (a getattr dict) showing `override`: its type when it names one, else the object's own."""
    kind = override.kind or stat.S_IFMT(attrs["st_mode"])
    attrs["st_uid"], attrs["st_gid"] = override.uid, override.gid
    attrs["st_mode"] = kind | override.mode
    if kind in (stat.S_IFCHR, stat.S_IFBLK):
        attrs["st_rdev"] = override.rdev
    return attrs


def is_override(name):
    """Whether the xattr `name` is this one: it belongs to the filesystem and never shows through the mount."""
    return name == NAME
