"""The on-disk markers of an overlay and their names: whiteouts, opaque dirs, redirects, OCI `.wh.` files.

They are in the kernel's format, so that either can mount the other's upper.

This is the only module that knows how deletions, opaque directories and
redirects are spelled: a whiteout is a character device 0/0; an opaque
directory and a redirect are xattrs in the overlay's namespace (`trusted.overlay.`,
or `user.overlay.` under `userxattr`); OCI layers instead use `.wh.NAME` files
and a `.wh..wh..opq` file, which cowfs reads in lower layers on request.
The one other name cowfs keeps on disk, the recorded attributes of images
unpacked without privilege (`user.containers.override_stat`), is override.py's.
"""

import errno
import os
import stat

TRUSTED_PREFIX = "trusted.overlay."
USER_PREFIX = "user.overlay."
PREFIXES = (TRUSTED_PREFIX, USER_PREFIX)  # either namespace: what a layer archive must never carry

OCI_PREFIX = ".wh."
OCI_OPAQUE = ".wh..wh..opq"

# The origin of a copied-up object: a file handle of the lower object in the
# kernel's `struct ovl_fb` (see handles.py), so that it keeps its st_ino.
KERNEL_ORIGIN = "origin"
# What cowfs recorded before it wrote the kernel's: the st_ino itself, still read
# so that uppers written then keep their numbers (never written now).
ORIGIN = "cowfs.origin"
NLINK = "nlink"  # index=on: the merged link count of an indexed file, "U%+d" from the upper inode's
UPPER = "upper"  # index=on: on the index directory, a handle of the upper root
UUID = "uuid"  # on the upper root: the overlay's own UUID (uuid=on)
OPAQUE = "opaque"
REDIRECT = "redirect"
METACOPY = "metacopy"  # on an upper file that holds only metadata: its data is still in a lower layer
# on an upper directory that holds copies or moved objects (not only new ones), as the kernel marks it: its
# readdir then looks each upper entry up, and leaves out those the lookup refuses (see lookup.py)
IMPURE = "impure"


def is_whiteout(st):
    """True when a stat result is a whiteout: a character device numbered 0/0."""
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == 0


def make_whiteout(path):
    """Create a whiteout at `path` (needs no privilege on Linux 5.8 and later)."""
    os.mknod(path, stat.S_IFCHR | 0o000, os.makedev(0, 0))


def get_marker(path, prefix, name):
    """The value of an overlay xattr on `path` as a string, or None when it is not set."""
    try:
        return os.getxattr(path, prefix + name, follow_symlinks=False).decode("utf-8", "surrogateescape")
    except OSError as e:
        if e.errno in (errno.ENODATA, errno.ENOTSUP, errno.EPERM, errno.ENOENT):
            return None
        raise


def set_marker(path, prefix, name, value):
    os.setxattr(path, prefix + name, value.encode("utf-8", "surrogateescape"), follow_symlinks=False)


def is_opaque(path, prefix):
    """True when the directory at `path` hides every lower directory of its path."""
    return get_marker(path, prefix, OPAQUE) == "y"


def set_opaque(path, prefix):
    set_marker(path, prefix, OPAQUE, "y")


def mark_impure(path, prefix):
    """Mark upper directory `path` impure, once (the kernel's ovl_set_impure)."""
    if get_marker(path, prefix, IMPURE) != "y":
        set_marker(path, prefix, IMPURE, "y")


def is_private_xattr(name, prefix):
    """Overlay xattrs belong to the filesystem: never copied up, nor shown through the mount as themselves."""
    return name.startswith(prefix)


# Since Linux 6.7 an overlay xattr set through the mount is stored escaped,
# `trusted.overlay.X` as `trusted.overlay.overlay.X`, so that overlays can nest;
# the real markers stay invisible.
ESCAPE = "overlay."


def escape_xattr(name, prefix):
    """The name on disk of an xattr named `name` through the mount."""
    return prefix + ESCAPE + name[len(prefix):] if name.startswith(prefix) else name


def unescape_xattr(name, prefix):
    """The name through the mount of an xattr named `name` on disk, or None when it is the overlay's own."""
    if not name.startswith(prefix):
        return name
    if name.startswith(prefix + ESCAPE):
        return prefix + name[len(prefix + ESCAPE):]
    return None


def oci_marker(name):
    """The OCI whiteout file name that deletes `name` in a lower layer."""
    return OCI_PREFIX + name


def is_oci_marker(name):
    """Whether `name` is an OCI marker file: a `.wh.NAME` whiteout, or the `.wh..wh..opq` opaque marker."""
    return name.startswith(OCI_PREFIX)


def oci_marked_name(marker):
    """The name an OCI whiteout file `.wh.NAME` deletes: NAME (the inverse of `oci_marker`)."""
    return marker[len(OCI_PREFIX):]


def is_aufs_metadata(name):
    """Whether `name` is AUFS metadata other than the opaque marker (`.wh..wh.plnk`, `.wh..wh.aufs`):
    layer tars may carry it, and it means nothing to an overlay (Docker skips it too)."""
    return name.startswith(OCI_PREFIX + OCI_PREFIX) and name != OCI_OPAQUE
