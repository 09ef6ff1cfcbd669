"""Comparable snapshots of a directory tree (what a user of a merged view can observe), and their differences.

A snapshot describes everything a user of a merged view can observe about
each object (type, permission bits, owner, size, content digest, link target,
``user.*`` xattrs, link count) without the things that legitimately differ
between two mounts of the same stack: raw inode and device numbers,
directory sizes and times, access and change times.  Hard links are kept as
groups of paths sharing one ``st_ino``, so they compare without numbers.

Symlinks are never followed (``lstat``, ``readlink``, ``follow_symlinks=False``).
"""

from __future__ import annotations

import errno
import hashlib
import os
import stat
from typing import Any

from cowfs.testing.mounts import StrPath

# Times before this instant are "fixed" (set on purpose by a test, or kept by
# copy-up from a lower layer whose times the harness pinned) and are compared
# exactly; later times are just "recent", since they depend on when the
# operation ran.
FIXED_TIME_CUTOFF_NS = 1_500_000_000 * 10**9

_TYPE_NAMES = {
    stat.S_IFREG: "file",
    stat.S_IFDIR: "dir",
    stat.S_IFLNK: "symlink",
    stat.S_IFIFO: "fifo",
    stat.S_IFCHR: "chardev",
    stat.S_IFBLK: "blockdev",
    stat.S_IFSOCK: "socket",
}


def type_name(st_mode: int) -> str:
    """``file``, ``dir``, ``symlink``, ``fifo``, ``chardev``, ``blockdev``, ``socket`` (or ``unknown-NNN``)."""
    return _TYPE_NAMES.get(stat.S_IFMT(st_mode), f"unknown-{stat.S_IFMT(st_mode):o}")


def describe_stat(st: os.stat_result, exact_times: bool = False) -> dict[str, Any]:
    """The comparable fields of one ``lstat`` result.

    Directories get no size, link count or mtime (they differ between two
    correct implementations); other objects get their mtime when it is a
    fixed one (see FIXED_TIME_CUTOFF_NS), else the word ``recent``.  With
    *exact_times* every object's mtime_ns is kept (for raw layer directories,
    which must not change at all).
    """
    kind = type_name(st.st_mode)
    out = {
        "type": kind,
        "mode": f"{stat.S_IMODE(st.st_mode):04o}",
        "uid": st.st_uid,
        "gid": st.st_gid,
    }
    if exact_times:
        out["mtime_ns"] = st.st_mtime_ns
    if kind != "dir":
        out["nlink"] = st.st_nlink
        if not exact_times:
            out["mtime"] = st.st_mtime_ns if st.st_mtime_ns < FIXED_TIME_CUTOFF_NS else "recent"
    if kind in ("file", "symlink"):
        out["size"] = st.st_size
    if kind == "file" and st.st_size > 0:
        out["sparse"] = st.st_blocks * 512 < st.st_size
    if kind in ("chardev", "blockdev"):
        out["rdev"] = (os.major(st.st_rdev), os.minor(st.st_rdev))
    return out


def file_digest(path: StrPath) -> str:
    """The sha256 hex digest of the file at *path*."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_xattrs(path: StrPath, all_namespaces: bool = False) -> dict[str, Any]:
    """xattrs of *path* (not following symlinks): ``user.*`` only unless *all_namespaces*."""
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError as e:
        return {"<listxattr error>": _errno_name(e)}
    out = {}
    for name in sorted(names):
        if not all_namespaces and not name.startswith("user."):
            continue
        try:
            out[name] = os.getxattr(path, name, follow_symlinks=False)
        except OSError as e:
            out[name] = f"<getxattr error {_errno_name(e)}>"
    return out


def _errno_name(e: OSError) -> str:
    return errno.errorcode.get(e.errno, str(e.errno))


def snapshot(root: StrPath, all_xattrs: bool = False, exact_times: bool = False) -> dict[str, Any]:
    """Describe the whole tree under *root* as a comparable dict.

    Returns ``{"entries": {relpath: fields}, "hardlinks": [sorted paths...]}``
    where relpath ``"."`` is *root* itself and ``hardlinks`` lists every group
    of two or more non-directory paths that share one ``st_ino``.  Unreadable
    objects are described by the errno name of the failure, so a difference
    there shows up as a difference, not a crash.
    """
    root = os.fspath(root)
    entries: dict[str, dict] = {}
    by_inode: dict[int, list[str]] = {}

    def visit(rel: str) -> None:
        path = root if rel == "." else os.path.join(root, rel)
        try:
            st = os.lstat(path)
        except OSError as e:
            entries[rel] = {"error": _errno_name(e)}
            return
        info = describe_stat(st, exact_times=exact_times)
        kind = info["type"]
        if kind == "file":
            try:
                info["sha256"] = file_digest(path)
            except OSError as e:
                info["sha256"] = f"<read error {_errno_name(e)}>"
        elif kind == "symlink":
            info["target"] = os.readlink(path)
        xattrs = read_xattrs(path, all_namespaces=all_xattrs) if kind != "symlink" or all_xattrs else {}
        if xattrs:
            info["xattrs"] = xattrs
        entries[rel] = info
        if kind != "dir":
            by_inode.setdefault(st.st_ino, []).append(rel)
            return
        try:
            names = sorted(os.listdir(path))
        except OSError as e:
            info["listdir_error"] = _errno_name(e)
            return
        for name in names:
            visit(name if rel == "." else os.path.join(rel, name))

    visit(".")
    hardlinks = sorted(sorted(paths) for paths in by_inode.values() if len(paths) > 1)
    return {"entries": entries, "hardlinks": hardlinks}


def diff_snapshots(a: dict, b: dict, a_name: str = "a", b_name: str = "b") -> str:
    """A readable, line-per-difference description of how two snapshots differ ("" if equal)."""
    lines = []
    ea, eb = a.get("entries", {}), b.get("entries", {})
    for rel in sorted(set(ea) | set(eb)):
        if rel not in eb:
            lines.append(f"only in {a_name}: {rel} {_short(ea[rel])}")
        elif rel not in ea:
            lines.append(f"only in {b_name}: {rel} {_short(eb[rel])}")
        elif ea[rel] != eb[rel]:
            fa, fb = ea[rel], eb[rel]
            for key in sorted(set(fa) | set(fb)):
                va, vb = fa.get(key, "<absent>"), fb.get(key, "<absent>")
                if va != vb:
                    lines.append(f"{rel}: {key}: {a_name}={va!r} {b_name}={vb!r}")
    ha, hb = a.get("hardlinks", []), b.get("hardlinks", [])
    if ha != hb:
        lines.append(f"hard-link groups: {a_name}={ha!r} {b_name}={hb!r}")
    return "\n".join(lines)


def _short(info: dict) -> str:
    keys = ("type", "mode", "uid", "gid", "size", "target", "error")
    return "{" + ", ".join(f"{k}={info[k]!r}" for k in keys if k in info) + "}"
