"""The system's mount table: the one reader of /proc/self/mounts (and mountinfo), which every other module uses.

A mount point may have any bytes in its name, so the table is read as bytes,
the kernel's octal escapes (``\\040`` for a space, ``\\134`` for a backslash,
any ``\\NNN``) are undone, and each field is decoded with os.fsdecode, so a
name that is not UTF-8 comes back as the str that os functions take.
"""

import collections
import os
import re

Mount = collections.namedtuple("Mount", "source mountpoint fstype options")
MountInfo = collections.namedtuple("MountInfo", "mount_id parent_id major minor root mountpoint fstype source")

_ESCAPE = re.compile(rb"\\([0-3][0-7][0-7])")


def unescape(raw):
    """A field of the mount table (or of mountinfo) as a str: octal escapes undone, bytes kept."""
    return os.fsdecode(_ESCAPE.sub(lambda m: bytes([int(m.group(1), 8)]), raw))


def read(path="/proc/self/mounts"):
    """The mounts in the order they were made: [Mount(source, mountpoint, fstype, options)].

    `options` is the list of the comma-separated options, each unescaped (an
    overlay's own ``\\,`` and ``\\:`` escapes in layer paths are kept, as
    cowfs.overlay.stack.parse_options reads them).
    """
    with open(path, "rb") as f:
        data = f.read()
    rows = []
    for line in data.split(b"\n"):
        fields = line.split(b" ")
        if len(fields) >= 4:
            rows.append(Mount(unescape(fields[0]), unescape(fields[1]), unescape(fields[2]),
                              [unescape(opt) for opt in fields[3].split(b",")]))
    return rows


def read_info(path="/proc/self/mountinfo"):
    """The mounts with their device numbers, in the order they were made: [MountInfo(mount_id, parent_id,
    major, minor, root, mountpoint, fstype, source)], read without a stat (which could hang on a hung mount)."""
    with open(path, "rb") as f:
        data = f.read()
    rows = []
    for line in data.split(b"\n"):
        fields = line.split(b" ")
        if b"-" not in fields[6:]:
            continue
        tail = fields[fields.index(b"-", 6) + 1:]
        major, _, minor = fields[2].partition(b":")
        rows.append(MountInfo(int(fields[0]), int(fields[1]), int(major), int(minor), unescape(fields[3]),
                              unescape(fields[4]), unescape(tail[0]), unescape(tail[1]) if len(tail) > 1 else ""))
    return rows
