"""A stack of layers and its mount options: parsed as the kernel parses them, checked before anything is mounted.

Layer 0 is the upper (writable, or None for a read-only mount); layers 1..N
are the lowers, topmost first, exactly as `lowerdir=A:B:C` lists them.

This module also owns how a path is spelt inside an option (`\\,` `\\:` `\\\\`):
every other module builds option strings with `escape_layer_path`,
`lowerdir_value`, `lowerdir_option` and `upperdir_option`, and splits them
with `split_options`, `split_layers` and `unescape`.
"""

import dataclasses
import os

from cowfs.errors import StackError
from cowfs.overlay.idmap import mapping_value, parse_id, parse_mapping
from cowfs.overlay.whiteout import TRUSTED_PREFIX, USER_PREFIX

# Generic mount(8) options that mount.fuse and fstab pass along; they mean
# nothing to an overlay (or are the default) and are accepted silently.
GENERIC_OPTIONS = {
    "rw", "dev", "nodev", "suid", "nosuid", "exec", "noexec", "auto", "noauto",
    "user", "nouser", "users", "async", "sync", "atime", "noatime", "relatime",
    "norelatime", "strictatime", "nodiratime", "diratime", "defaults", "_netdev",
    "nofail", "lazytime", "nolazytime", "silent", "loud", "default_permissions",
}
# Of those, the VFS mount flags that libfuse applies to the mount, passed on in order.
FUSE_MOUNT_FLAGS = {"rw", "suid", "nosuid", "dev", "nodev", "exec", "noexec", "async", "sync",
                    "atime", "noatime", "dirsync"}
REDIRECT_MODES = ("on", "off", "follow", "nofollow")
OWNER_OPTIONS = ("uidmapping", "gidmapping", "squash_to_uid", "squash_to_gid")  # with values, as fuse-overlayfs
# The kernel's options that cowfs accepts with these values (a bad value is refused as the kernel refuses it);
# KERNEL_REFUSED names the values it cannot honour, with why. See `_kernel_option`.
KERNEL_VALUES = {"xino": ("on", "off", "auto"), "uuid": ("on", "off", "null", "auto"), "nfs_export": ("on", "off"),
                 "verity": ("on", "off", "require")}
KERNEL_REFUSED = {
    "nfs_export=on": "a FUSE mount cannot be exported over NFS by the kernel's overlay export code "
                     "(and the kernel needs index=on for it, which cowfs does not have)",
}


@dataclasses.dataclass
class Stack:
    """What to mount: the layers and the overlay options that change behaviour."""

    lowers: list
    upper: str = None
    # Data-only lower layers (`lowerdir=A::D1::D2`, `datadir+=D`), below every lower: never looked up
    # by name, only for the data of a metacopy file whose redirect is absolute.
    data_lowers: tuple = ()
    work: str = None
    redirect_dir: str = "off"
    userxattr: bool = False
    metacopy: bool = False
    oci_whiteouts: bool = False
    volatile: bool = False  # no sync to the upper (copy-ups, fsync), as the kernel's option
    index: bool = False  # index=on: lower hard links stay one file after copy-up (WORKDIR/index)
    read_only: bool = False
    allow_other: bool = None
    fsname: str = "cowfs"
    mount_flags: tuple = ()
    # The owners the mount shows, as fuse-overlayfs's options of the same names (see idmap.py).
    uidmapping: tuple = ()  # ((ID on disk, HOSTID shown, LEN), ...)
    gidmapping: tuple = ()
    squash_to_root: bool = False
    squash_to_uid: int = None
    squash_to_gid: int = None
    # fs-verity digests of metacopy data (verity.py): "off", "on" (recorded when the lower data has one,
    # checked where recorded) or "require" (every metacopy file must record one). As in Linux 6.16 and later,
    # independent of metacopy: without metacopy=on no metacopy file is made or followed, and it does nothing.
    verity: str = "off"
    # None: the kernel's default (xino=off here, uuid=auto); what each does is filesystems.py's.
    xino: str = None
    uuid: str = None

    @property
    def prefix(self):
        """The xattr namespace of the overlay's own markers."""
        return USER_PREFIX if self.userxattr else TRUSTED_PREFIX

    @property
    def writable(self):
        return self.upper is not None and not self.read_only

    @property
    def create_redirects(self):
        return self.redirect_dir == "on"

    @property
    def allow_offline_changes(self):
        """As the kernel's ovl_allow_offline_changes: without redirects, metacopy or index (or
        xino, which cowfs does not have), lower layers may be changed while unmounted, so the
        overlay leaves no marker that would hide what a lower gains meanwhile (no opaque mkdir)."""
        return not self.metacopy and self.redirect_dir != "on" and not self.index

    @property
    def follow_redirects(self):
        """As the kernel: redirect_dir=off still follows (redirect_always_follow), and userxattr,
        which unprivileged mounts need, never does."""
        return self.redirect_dir != "nofollow" and not self.userxattr

    def option_string(self):
        """The stack as the kernel's `-o` option string (for /proc/mounts-like reports and re-mounting)."""
        opts = [lowerdir_option(self.lowers) + "".join("::" + escape_layer_path(p) for p in self.data_lowers)]
        if self.upper is not None:
            opts.append(upperdir_option(self.upper, self.work))
        if self.redirect_dir != "off":
            opts.append("redirect_dir=" + self.redirect_dir)
        if self.metacopy:
            opts.append("metacopy=on")
        if self.index:
            opts.append("index=on")
        if self.verity != "off":
            opts.append("verity=" + self.verity)
        opts += [name for name in ("userxattr", "oci_whiteouts", "volatile") if getattr(self, name)]
        opts += [f"{name}={mapping_value(getattr(self, name))}" for name in ("uidmapping", "gidmapping")
                 if getattr(self, name)]
        if self.squash_to_root:
            opts.append("squash_to_root")
        opts += [f"{name}={getattr(self, name)}" for name in ("squash_to_uid", "squash_to_gid")
                 if getattr(self, name) is not None]
        opts += [f"{name}={getattr(self, name)}" for name in ("xino", "uuid") if getattr(self, name) is not None]
        if self.read_only:
            opts.append("ro")
        return ",".join(opts)


def with_userxattr(stack):
    """`stack` with userxattr, as an unprivileged mount needs (trusted.* xattrs need CAP_SYS_ADMIN);
    an option userxattr excludes is refused with the reason, as the kernel refuses the pair."""
    if stack.userxattr:
        return stack
    for option, given in (("metacopy=on", stack.metacopy), ("redirect_dir=on", stack.redirect_dir == "on")):
        if given:
            raise StackError(f"{option}: needs trusted.* xattrs (CAP_SYS_ADMIN); an unprivileged mount uses "
                             "userxattr, which excludes it")
    return dataclasses.replace(stack, userxattr=True)


def escape_layer_path(path):
    """`path` spelt for an option value (lowerdir=, upperdir=, workdir=): `\\`, `:` and `,` backslash-escaped,
    as the kernel reads them; `unescape` and `split_layers` undo it."""
    return path.replace("\\", "\\\\").replace(":", "\\:").replace(",", "\\,")


def lowerdir_value(paths):
    """The value of a `lowerdir=` option for layer directories `paths`, topmost first: each escaped, colon-joined."""
    return ":".join(escape_layer_path(p) for p in paths)


def lowerdir_option(paths):
    """The `lowerdir=A:B:C` option for layer directories `paths`, topmost first, each escaped."""
    return "lowerdir=" + lowerdir_value(paths)


def upperdir_option(upper, work):
    """The `upperdir=U,workdir=W` options for an upper directory and its workdir, each escaped."""
    return f"upperdir={escape_layer_path(upper)},workdir={escape_layer_path(work)}"


def split_escaped(text, sep, keep_escapes=False):
    """Split `text` on `sep`, honouring backslash escapes as the kernel does for `\\:` and `\\,`;
    with `keep_escapes` the parts keep their backslashes, for a second split."""
    parts, cur, i = [], [], 0
    while i < len(text):
        ch = text[i]
        if ch == "\\" and i + 1 < len(text):
            cur.append(text[i:i + 2] if keep_escapes else text[i + 1])
            i += 2
            continue
        if ch == sep:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
        i += 1
    parts.append("".join(cur))
    return parts


def split_options(text):
    """The options of one `-o` string, split on unescaped commas; each keeps its escapes (`\\,` `\\:`)."""
    return split_escaped(text, ",", keep_escapes=True)


def split_layers(value):
    """The layer paths of a `lowerdir=` value, split on unescaped colons and unescaped."""
    return split_escaped(value, ":")


def parse_options(option_strings):
    """Build a Stack from one or more `-o` strings. Raises StackError naming the bad option."""
    values = {}
    flags = []
    added = []  # the layers of lowerdir+= options, topmost first
    for text in option_strings:
        for opt in split_options(text):
            if not opt:
                continue
            key, has_value, value = opt.partition("=")
            if key in ("lowerdir", "lowerdir+") or key in KERNEL_VALUES:
                _kernel_option(key, has_value, value, values, added)
                continue
            if key in FUSE_MOUNT_FLAGS and not has_value:
                flags.append(key)
                continue
            if key in GENERIC_OPTIONS or key.startswith("x-") or key == "comment":
                continue
            if key in ("upperdir", "workdir", "redirect_dir", "metacopy", "index", "fsname") + OWNER_OPTIONS:
                if not has_value or not value:
                    raise StackError(f"option '{key}' needs a value")
                values[key] = value
            elif key == "datadir+":
                if not has_value or not value:
                    raise StackError(f"option '{key}' needs a value")
                values.setdefault(key, []).append(value)
            elif key in ("userxattr", "oci_whiteouts", "volatile", "ro", "allow_other", "squash_to_root") \
                    and not has_value:
                values[key] = True
            else:
                raise StackError(f"unknown option '{opt}'")
    if "lowerdir" not in values and not added:
        raise StackError("missing 'lowerdir'")
    if added:  # lowerdir+= layers, then datadir+= ones below them, each taken as it is spelt
        lowers, data_lowers = list(added), list(values.get("datadir+", ()))
    else:
        lowers, data_lowers = _lower_layers(values["lowerdir"])
        if "datadir+" in values:  # as the kernel: data layers append after lowerdir+ layers, not after lowerdir=
            raise StackError("conflicting options: datadir+ cannot follow lowerdir= (use lowerdir+=, or "
                             "lowerdir=A::DATA)")
    upper = unescape(values["upperdir"]) if "upperdir" in values else None
    work = unescape(values["workdir"]) if "workdir" in values else None
    if upper is not None and work is None:
        raise StackError("missing 'workdir' (an upperdir needs a workdir on the same filesystem)")
    if work is not None and upper is None:
        raise StackError("missing 'upperdir' (a workdir is only used with an upperdir)")
    metacopy = values.get("metacopy", "off")
    if metacopy not in ("on", "off"):
        raise StackError(f"bad value for metacopy: '{metacopy}' (on or off)")
    metacopy = metacopy == "on"
    # As in the kernel: metacopy=on needs redirects (a renamed file finds its data by one) and implies them.
    redirect = values.get("redirect_dir", "on" if metacopy else "off")
    if redirect not in REDIRECT_MODES:
        raise StackError(f"bad value for redirect_dir: '{redirect}' (one of: {', '.join(REDIRECT_MODES)})")
    if metacopy and redirect != "on":
        if upper is not None or redirect not in ("off", "follow"):
            raise StackError(f"conflicting options: metacopy=on,redirect_dir={redirect}")
        redirect = "on"  # as the kernel: without an upper (where redirects are made), following them is "on"
    if values.get("userxattr") and metacopy:
        raise StackError("conflicting options: userxattr,metacopy=on")
    if values.get("userxattr") and redirect == "on":
        raise StackError("conflicting options: userxattr,redirect_dir=on")
    index = values.get("index", "off")
    if index not in ("on", "off"):
        raise StackError(f"bad value for index: '{index}' (on or off)")
    owners = {key: _owner_option(key, values[key]) for key in OWNER_OPTIONS if key in values}
    return Stack(
        lowers=lowers, data_lowers=tuple(data_lowers), upper=upper, work=work, redirect_dir=redirect, metacopy=metacopy,
        userxattr=bool(values.get("userxattr")), oci_whiteouts=bool(values.get("oci_whiteouts")),
        volatile=bool(values.get("volatile")) and upper is not None,  # the kernel ignores it without an upper
        index=index == "on" and upper is not None,  # the kernel's index needs an upper (it is in the workdir)
        read_only=bool(values.get("ro")), allow_other=True if values.get("allow_other") else None,
        fsname=values.get("fsname", "cowfs"), mount_flags=tuple(flags),
        squash_to_root=bool(values.get("squash_to_root")), xino=values.get("xino"), uuid=values.get("uuid"),
        verity=values.get("verity", "off"),
        **owners,
    )


def _lower_layers(value):
    """The lower layers and the data-only layers of a `lowerdir=` value: `A:B::D1::D2`, each data-only
    layer after a double colon, below every lower, as the kernel reads it (and refuses otherwise)."""
    parts = split_layers(value)
    lowers, data, after_double = [], [], False
    for i, part in enumerate(parts):
        if not part:
            if i == 0 or i == len(parts) - 1 or not parts[i - 1]:
                raise StackError(f"empty layer in lowerdir={value!r}" + (
                    " (data-only layers need a lower layer above them)" if i == 0 and len(parts) > 2 else ""))
            after_double = True
            continue
        if after_double:
            if parts[i - 1]:
                raise StackError(f"lowerdir={value!r}: regular lower layers cannot follow data lower layers")
            data.append(part)
        else:
            lowers.append(part)
    return lowers, data


def _kernel_option(key, has_value, value, values, added):
    """One `lowerdir=`, `lowerdir+=` or KERNEL_VALUES option, into `values` (and `added`), as the kernel
    reads it. `lowerdir+=DIR` names one layer, taken as it is spelt (no `\\` escapes: a `:` is part of
    the path), topmost first in the order given; `lowerdir=` replaces the layers named before it, and no
    `lowerdir+=` may follow it."""
    if not has_value or not value:
        raise StackError(f"option '{key}' needs a value")
    if key == "lowerdir+":
        if "lowerdir" in values:
            raise StackError(f"lowerdir+={value}: lowerdir+ cannot follow lowerdir (as the kernel refuses it)")
        if "datadir+" in values:
            raise StackError(f"lowerdir+={value}: regular lower layers cannot follow data layers (as the kernel "
                             "refuses it)")
        added.append(value)
    elif key == "lowerdir":
        added.clear()
        values[key] = value
    elif value not in KERNEL_VALUES[key]:
        raise StackError(f"bad value for {key}: '{value}' (one of: {', '.join(KERNEL_VALUES[key])})")
    elif f"{key}={value}" in KERNEL_REFUSED:
        raise StackError(f"{key}={value}: not supported: {KERNEL_REFUSED[f'{key}={value}']}")
    elif key in ("xino", "uuid", "verity"):
        values[key] = value


def _owner_option(key, value):
    """The parsed value of a uid/gid mapping or squash option; a malformed one is refused, naming it."""
    try:
        return parse_mapping(value) if key.endswith("mapping") else parse_id(value)
    except ValueError:
        expected = "ID:HOSTID:LEN[:ID2:HOSTID2:LEN2...]" if key.endswith("mapping") else "a numeric ID"
        raise StackError(f"bad value for {key}: '{value}' ({expected}, unsigned 32-bit numbers)") from None


def unescape(path):
    """A path as an option spells it (`\\,` `\\:` `\\\\`), without its backslash escapes."""
    return split_escaped(path, "\0")[0]


def _is_within(inner, outer):
    return inner == outer or inner.startswith(outer.rstrip("/") + "/")


def is_within(path, directory):
    """Whether `path` is `directory` or below it: by real path, and by device and inode, so that
    every spelling of the same place (a symlink, a bind mount) is caught."""
    path, directory = os.path.realpath(path), os.path.realpath(directory)
    if _is_within(path, directory):
        return True
    try:
        target = os.stat(directory)
    except OSError:
        return False
    while True:
        try:
            if os.path.samestat(os.stat(path), target):
                return True
        except OSError:
            pass  # not there (yet): its parents may be
        parent = os.path.dirname(path)
        if parent == path:
            return False
        path = parent


def check(stack, mountpoint=None):
    """Resolve and check every path of the stack; returns it with absolute real paths.

    Raises StackError for a missing or non-directory layer, overlapping layers,
    a workdir on another filesystem than the upper, a mount point inside a layer,
    or a layer inside the mount point (its daemon would reach it through its own
    mount, and wait for itself forever); with a mount point, also for a directory
    used as two layers, as the kernel refuses it.
    """
    def real_dir(path, role):
        try:
            os.lstat(path)
        except OSError as e:  # missing, or behind a directory the caller cannot search (EACCES)
            raise StackError(f"{role} {path}: {e.strerror}") from None
        real = os.path.realpath(path)
        if not os.path.isdir(real):
            raise StackError(f"{role} {path}: Not a directory")
        return real

    lowers = [real_dir(p, "lowerdir") for p in stack.lowers]
    data_lowers = tuple(real_dir(p, "data-only lowerdir") for p in stack.data_lowers)
    named = [(f"lowerdir {p}", r) for p, r in zip(stack.lowers + list(stack.data_lowers), lowers + list(data_lowers))]
    upper = work = None
    if stack.upper is not None:
        upper = real_dir(stack.upper, "upperdir")
        work = real_dir(stack.work, "workdir")
        if os.stat(upper).st_dev != os.stat(work).st_dev:
            raise StackError(f"workdir {stack.work}: not on the same filesystem as upperdir {stack.upper}")
        named += [(f"upperdir {stack.upper}", upper), (f"workdir {stack.work}", work)]
    if mountpoint is not None:
        mnt = real_dir(mountpoint, "mount point")
        for name, real in named:
            if is_within(mnt, real):
                raise StackError(f"mount point {mountpoint}: inside {name}")
            if is_within(real, mnt):
                raise StackError(f"{name}: inside the mount point {mountpoint} "
                                 "(the daemon would reach it through its own mount)")
    # A mount, as the kernel's: a directory used as two layers (by any path: it compares the inodes), two
    # lowers or a lower and the upper, is refused with "overlayfs: conflicting lowerdir path" (ELOOP, as of
    # Linux 6.18; a layer inside another is "overlapping"). The engine alone (no mount point) serves the same
    # lower twice: the second is wholly hidden by the first.
    ids = [os.stat(real) for _, real in named]
    for i, (name_a, a) in enumerate(named):
        for j in range(i + 1, len(named)):
            name_b, b = named[j]
            if mountpoint is None and a == b and name_a.startswith("lowerdir") and name_b.startswith("lowerdir"):
                continue
            if os.path.samestat(ids[i], ids[j]):
                what = "conflicting lowerdir path: " if name_a.startswith("lowerdir") else ""
                raise StackError(f"{name_b}: {what}the same directory as {name_a} (a directory may be one "
                                 "layer only, as the kernel requires)")
            if _is_within(a, b) or _is_within(b, a):
                raise StackError(f"{name_a}: overlaps {name_b}")
    return dataclasses.replace(stack, lowers=lowers, data_lowers=data_lowers, upper=upper, work=work)
