"""The system's mount table: the one reader of /proc/self/mounts, which every other module uses.

A mount point may have any bytes in its name, so the table is read as bytes,
the kernel's octal escapes (``\\040`` for a space, ``\\134`` for a backslash,
any ``\\NNN``) are undone, and each field is decoded with os.fsdecode, so a
name that is not UTF-8 comes back as the str that os functions take.
"""

import collections
import os
import re

Mount = collections.namedtuple("Mount", "source mountpoint fstype options")

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
