"""Differential tests: the same operations on kernel overlayfs and on cowfs, over the same layers.

Each scenario writes its lower layers once (a ``StackSpec``, in the kernel's
on-disk format, by ``cowfs.testing.layers.materialise``), then runs its
operations on a kernel overlay mount and on a cowfs mount of those layers,
each with its own upper and work directory, and checks that
(``cowfs.testing.harness.compare_scenario``):

1. every operation had the same outcome (return value, or errno name);
2. the merged trees are the same (``cowfs.testing.tree.snapshot``);
3. the lower layers did not change at all;
4. the kernel, mounting cowfs's upper directory over the same lowers, shows
   the tree cowfs showed (cowfs's upper is in the kernel's format).

Every scenario runs with ``redirect_dir=off``, ``redirect_dir=on`` and
``metacopy=on``, and with ``metacopy=on`` under ``verity=require`` (also reading an upper written
with ``metacopy=on`` alone under ``verity=require``); those about copy-up also under ``verity=on``;
those about whiteouts, opaque directories and xattrs also with ``userxattr`` (which the kernel
accepts from root, and which excludes ``redirect_dir``); those that rename lower directories also write their upper
with ``redirect_dir=on`` and read it back, on a second mount of each side, with
``redirect_dir=follow`` and ``nofollow``.  The modes and the known differences (excused by name)
are the harness's: ``MODES`` and ``KNOWN_DIFFERENCES`` in
``cowfs.testing.harness``.

``COWFS_DIFF_BACKEND=kernel`` replaces cowfs with a second kernel mount,
to check the harness itself: every scenario must pass kernel-vs-kernel.
``COWFS_CMD`` overrides the command that runs cowfs (default:
``python -m cowfs`` with this interpreter).
"""

from __future__ import annotations

import ctypes
import dataclasses
import mmap
import os
import stat
import struct
from collections.abc import Callable

import pytest

from cowfs.testing.harness import BACKENDS, MODES, Pair, compare_scenario, failing_scenarios
from cowfs.testing.layers import (
    USER,
    Device,
    Dir,
    Fifo,
    File,
    HardLink,
    Layer,
    Oct,
    Pattern,
    StackSpec,
    Symlink,
    Whiteout,
    materialise,
    materialise_layer,
)
from cowfs.testing.outcomes import Session, diff_outcomes
from cowfs.testing.tree import describe_stat, diff_snapshots, snapshot

BACKEND = os.environ.get("COWFS_DIFF_BACKEND", "cowfs")
if BACKEND not in BACKENDS:
    raise RuntimeError(f"COWFS_DIFF_BACKEND must be 'cowfs' or 'kernel', not {BACKEND!r}")
OLD_TIME_NS = 1_200_000_000 * 10**9 + 123_456_789  # a time scenarios set on purpose
SCENARIO_TIMEOUT = float(os.environ.get("COWFS_DIFF_TIMEOUT", "120"))  # seconds per mount's scenario


# ---------------------------------------------------------------------------
# the lower layers (topmost first; cowfs.testing.layers makes missing parents 0755, root's)

BIG = Pattern(300_000)
SPARSE_SIZE = 4 << 20

STD = StackSpec(
    Layer(  # l0, the top layer
        File("file.txt", b"hello world\n", owner=(USER, USER)),
        File("exec.sh", b"#!/bin/sh\necho hi\n", mode=0o755),
        File("suid.bin", b"\x7fELF pretend binary\n", mode=0o4755),
        File("sgid.bin", b"setgid\n", mode=0o2775, owner=(0, USER)),
        File("ro.txt", b"read only\n", mode=0o444),
        File("rootonly.txt", b"secret\n", mode=0o600),
        Dir("dir", xattrs=(("user.dirattr", b"1"),)),
        File("dir/top_only.txt", b"top only\n"),
        Dir("emptydir", mode=0o700, owner=(USER, USER)),
        Symlink("link", "file.txt"),
        Symlink("dangling", "nowhere/at/all"),
        Symlink("dirlink", "dir"),
        File("hl1", b"hard linked\n", mode=0o640, owner=(USER, 0)),
        HardLink("hl2", to="hl1"),
        File("sparse.bin", b"start", hole=SPARSE_SIZE - 8, tail=b"end"),
        Fifo("fifo", mode=0o600),
        Device("nulldev", 1, 3, mode=0o600),
        File("xattr.txt", b"with xattrs\n", xattrs=(("user.foo", b"bar"), ("user.empty", b""))),
        File("dup/x", b"x from l0\n"),
        File("dup/z", b"z from l0\n"),
        File("big.bin", BIG),
        Dir("wdir"),
        Whiteout("wdir/a.txt"),
        Whiteout("wdir/b.txt"),
        File("dirsub/inner/l0.txt", b"l0 nested\n"),
    ),
    Layer(  # l1, the middle layer
        File("dir/shared.txt", b"shared from l1\n"),
        File("dir/mid_only.txt", b"middle only\n"),
        Whiteout("gone.txt"),
        Whiteout("gonedir"),
        Dir("opq", opaque=True),
        File("opq/new.txt", b"in opaque dir\n"),
        File("dup/x", b"x from l1\n"),
        File("dup/y", b"y from l1\n"),
        File("dup/only1", b"only in l1\n"),
        File("wdir/a.txt", b"a\n"),
        File("wdir/b.txt", b"b\n"),
        File("dirsub/inner/l1.txt", b"l1 nested\n"),
    ),
    Layer(  # l2, the bottom layer
        File("base.txt", b"base from l2\n"),
        File("file.txt", b"bottom version, hidden by l0\n"),
        File("dir/shared.txt", b"shared from l2\n"),
        File("dir/bottom_only.txt", b"bottom only\n"),
        Dir("deep"),
        Dir("deep/a", mode=0o750, owner=(USER, USER)),
        Dir("deep/a/b", mode=0o705),
        File("deep/a/b/c/file.txt", b"deep file\n", mode=0o640, owner=(USER, USER)),
        File("gone.txt", b"deleted by a whiteout in l1\n"),
        File("gonedir/inner.txt", b"inside a deleted dir\n"),
        File("opq/old.txt", b"hidden by opaque l1/opq\n"),
        File("dup/x", b"x from l2\n"),
        File("dup/only2", b"only in l2\n"),
        File("dirsub/inner/l2.txt", b"l2 nested\n"),
    ),
)
"""The standard three-layer stack most scenarios use."""


# ---------------------------------------------------------------------------
# scenarios

@dataclasses.dataclass(frozen=True)
class Scenario:
    name: str
    ops: Callable[[Session], None]
    layers: StackSpec = STD
    modes: tuple[str, ...] = ("redirect_off", "redirect_on", "metacopy")
    readonly: bool = False
    allow_other: bool = False  # cowfs needs allow_other for other uids to see the mount


SCENARIOS: dict[str, Scenario] = {}
# fs-verity over metacopy=on (MODES in cowfs.testing.harness): no file has fs-verity here, so verity=require
# copies whole, and fails digest-less metacopy files with EIO; verity=on makes the metacopy mode's copies, so
# only the scenarios about copy-up run in it
VERITY_MODES = ("verity_require", "verity_require_over_metacopy")
VERITY_ON_SCENARIOS = {
    "copyup_open_wronly", "copyup_open_trunc", "copyup_truncate", "copyup_chmod", "metadata_then_data", "copyup_chown",
    "copyup_utime", "copyup_setxattr", "copyup_link", "copyup_rename_lower_file", "rename_lower_file_elsewhere",
    "read_fd_across_copyup", "rename_exchange_kinds", "hardlink_counts"}


def scenario(*, layers: StackSpec = STD, userxattr: bool = False, readonly: bool = False, allow_other: bool = False,
             redirects: bool = False, verity: bool = True, also: tuple[str, ...] = ()):
    """Register a scenario; *redirects*: it renames lower directories, and the upper it writes with
    redirect_dir=on is also read back with redirect_dir=follow and nofollow; *verity* false: not in the
    VERITY_MODES (a long scenario about names only); *also*: more modes."""
    def register(fn):
        name = fn.__name__.removeprefix("sc_")
        assert name not in SCENARIOS, name
        modes = ("redirect_off", "redirect_on", "metacopy") + (VERITY_MODES if verity else ()) + (
            ("verity_on",) if name in VERITY_ON_SCENARIOS else ()) + (("userxattr",) if userxattr else ()) + (
            ("redirect_follow", "redirect_nofollow") if redirects else ()) + also
        SCENARIOS[name] = Scenario(name, fn, layers, modes, readonly, allow_other)
        return fn
    return register


INDEX_METACOPY = ("index_metacopy",)
"""For `scenario(also=...)`: a scenario of metadata-only copy-up, or of lower hard links, also with index=on and
metacopy=on (the standard stack's hl1 and hl2 are a lower hard link)."""

W, RW, CREAT, TRUNC, EXCL, APPEND, RD = (os.O_WRONLY, os.O_RDWR, os.O_CREAT, os.O_TRUNC, os.O_EXCL,
                                          os.O_APPEND, os.O_RDONLY)


# -- copy-up triggers ------------------------------------------------------

@scenario()
def sc_copyup_open_wronly(fs: Session):
    ino = fs.ino("file.txt")
    fs.write("file.txt", b"HE", W, offset=0)
    fs.read("file.txt")
    fs.stat("file.txt")
    fs.check("st_ino kept across copy-up", fs.ino("file.txt") == ino)


@scenario()
def sc_copyup_open_rdwr(fs: Session):
    fd = fs.open("file.txt", RW)
    fs.pread(fd, 5, 0)
    fs.pwrite(fd, b"-there", 5)
    fs.pread(fd, 100, 0)
    fs.close(fd)
    fs.read("file.txt")
    fs.stat("file.txt")


@scenario()
def sc_copyup_open_rdwr_no_write(fs: Session):
    """Opening for writing copies up even when nothing is written: data and mtime must survive."""
    fd = fs.open("big.bin", RW)
    fs.close(fd)
    fs.stat("big.bin")
    fs.digest("big.bin")


@scenario()
def sc_copyup_open_trunc(fs: Session):
    fd = fs.open("exec.sh", W | TRUNC)
    fs.fstat(fd)
    fs.close(fd)
    fs.stat("exec.sh")
    fs.write("exec.sh", b"new", W)
    fs.read("exec.sh")


@scenario(also=INDEX_METACOPY)
def sc_copyup_truncate(fs: Session):
    fs.truncate("file.txt", 5)
    fs.read("file.txt")
    fs.truncate("big.bin", 400_000)
    fs.stat("big.bin")
    fs.digest("big.bin")
    fs.truncate("dir/shared.txt", 0)
    fs.read("dir/shared.txt")
    fs.truncate("dir", 0)
    fs.truncate("gone.txt", 0)


@scenario(also=INDEX_METACOPY)
def sc_copyup_chmod(fs: Session):
    fs.chmod("file.txt", 0o600)
    fs.chmod("dir", 0o711)
    fs.chmod("deep/a/b/c/file.txt", 0o4750)
    fs.chmod("fifo", 0o600)
    fs.chmod("nulldev", 0o666)
    for rel in ("file.txt", "dir", "deep/a/b/c/file.txt", "deep/a", "deep/a/b", "fifo", "nulldev"):
        fs.stat(rel)
    fs.read("deep/a/b/c/file.txt")


@scenario(also=INDEX_METACOPY)
def sc_metadata_then_data(fs: Session):
    """The life of a metadata-only copy (metacopy=on): chmod, rename, link, remount, then data.
    In the other modes the same steps are ordinary copy-ups."""
    fs.chmod("big.bin", 0o600)
    fs.stat("big.bin")
    fs.digest("big.bin")
    fd = fs.open("sparse.bin", RD)
    fs.chown("sparse.bin", USER, USER)
    fs.pread(fd, 64, 0, "sparse.bin after a chown")
    fs.close(fd)
    fs.rename("big.bin", "dir/moved.bin")
    fs.rename("sparse.bin", "renamed.bin")
    fs.remount()
    fs.digest("dir/moved.bin")
    fs.stat("renamed.bin")
    fd = fs.open("renamed.bin", W)  # the data step alone, no write: the kernel lets the mtime move
    fs.close(fd)
    fs.stat("renamed.bin")
    fs.link("dir/moved.bin", "moved-link.bin")
    fs.stat("dir/moved.bin")
    fs.write("renamed.bin", b"DATA", W, offset=4096)
    fs.digest("renamed.bin")
    fs.truncate("dir/moved.bin", 10)
    fs.read("dir/moved.bin")
    fs.listdir("")
    fs.listdir("dir")


@scenario()
def sc_copyup_chown(fs: Session):
    fs.chown("file.txt", 1234, 5678)
    fs.chown("exec.sh", USER, -1)
    fs.chown("dup", USER, USER)
    fs.chown("link", 4321, 4321)  # lchown: the link itself
    for rel in ("file.txt", "exec.sh", "dup", "link"):
        fs.stat(rel)
    fs.listdir("dup")
    fs.readlink("link")


@scenario()
def sc_copyup_chown_clears_setuid(fs: Session):
    fs.chown("suid.bin", 0, 0)
    fs.chown("sgid.bin", USER, USER)
    fs.stat("suid.bin")
    fs.stat("sgid.bin")


@scenario()
def sc_copyup_utime(fs: Session):
    fs.utime("file.txt", (OLD_TIME_NS, OLD_TIME_NS))
    fs.utime("link", (OLD_TIME_NS, OLD_TIME_NS))
    fs.utime("dir/shared.txt", (OLD_TIME_NS, OLD_TIME_NS + 1))
    for rel in ("file.txt", "link", "dir/shared.txt"):
        fs.stat(rel)
    fs.read("dir/shared.txt")
    fs.utime("deep/a", (OLD_TIME_NS, OLD_TIME_NS))
    fs.do("mtime of deep/a", lambda: os.stat(fs.p("deep/a")).st_mtime_ns)
    fs.do("mtime of untouched deep/a/b", lambda: os.stat(fs.p("deep/a/b")).st_mtime_ns)
    fs.chmod("link", 0o640)  # follows the link: copies up file.txt
    fs.stat("file.txt")


@scenario(userxattr=True)
def sc_copyup_setxattr(fs: Session):
    fs.setxattr("file.txt", "user.new", b"value")
    fs.getxattr("file.txt", "user.new")
    fs.listxattr("file.txt")
    fs.setxattr("xattr.txt", "user.foo", b"changed", os.XATTR_REPLACE)
    fs.setxattr("xattr.txt", "user.foo", b"x", os.XATTR_CREATE)
    fs.setxattr("exec.sh", "user.gone", b"x", os.XATTR_REPLACE)
    fs.getxattr("xattr.txt", "user.foo")
    fs.listxattr("xattr.txt")
    fs.read("xattr.txt")
    fs.stat("xattr.txt")


@scenario(userxattr=True)
def sc_copyup_removexattr(fs: Session):
    fs.removexattr("xattr.txt", "user.foo")
    fs.removexattr("xattr.txt", "user.foo")
    fs.removexattr("file.txt", "user.none")
    fs.listxattr("xattr.txt")
    fs.getxattr("xattr.txt", "user.empty")
    fs.read("xattr.txt")


@scenario()
def sc_copyup_link(fs: Session):
    ino = fs.ino("file.txt")
    fs.link("file.txt", "file.link")
    fs.stat("file.txt")
    fs.stat("file.link")
    fs.check("link shares st_ino", fs.ino("file.txt") == fs.ino("file.link"))
    fs.check("st_ino kept across copy-up", fs.ino("file.txt") == ino)
    fs.read("file.link")
    fs.link("deep/a/b/c/file.txt", "dir/deeplink")
    fs.stat("deep/a/b/c/file.txt")
    fs.listdir("dir")


@scenario()
def sc_copyup_rename_lower_file(fs: Session):
    fs.rename("file.txt", "renamed.txt")
    fs.stat("file.txt")
    fs.stat("renamed.txt")
    fs.read("renamed.txt")
    fs.rename("dir/shared.txt", "dir/shared2.txt")
    fs.listdir("dir")
    fs.read("dir/shared2.txt")
    fs.listdir("")


@scenario()
def sc_copyup_create_in_lower_dir(fs: Session):
    fs.write("deep/a/b/c/new.txt", b"new\n", mode=0o600)
    fs.listdir("deep/a/b/c")
    for rel in ("deep", "deep/a", "deep/a/b", "deep/a/b/c", "deep/a/b/c/new.txt", "deep/a/b/c/file.txt"):
        fs.stat(rel)
    fs.mkdir("dup/newdir/", 0o700)
    fs.mkdir("dirsub/inner/more")
    fs.symlink("../x", "dirsub/inner/more/up")
    fs.listdir("dirsub/inner")
    fs.stat("dirsub/inner/more/up")


@scenario()
def sc_copyup_partial_write_keeps_rest(fs: Session):
    fs.write("big.bin", b"0123456789", W, offset=100_000)
    fs.write("big.bin", b"Z", W, offset=0)
    fs.write("big.bin", b"tail", W, offset=len(BIG) - 2)
    fs.stat("big.bin")
    fs.digest("big.bin")
    fs.read("big.bin", 30, 99_995)
    fs.read("big.bin", 10, len(BIG) - 6)


@scenario()
def sc_copyup_sparse_holes(fs: Session):
    fs.chmod("sparse.bin", 0o600)
    fs.stat("sparse.bin")  # includes "sparse": st_blocks * 512 < st_size
    fs.digest("sparse.bin")
    fs.read("sparse.bin", 8, 0)
    fs.read("sparse.bin", 8, SPARSE_SIZE - 8)


@scenario()
def sc_copyup_keeps_metadata(fs: Session):
    ino_dir = fs.ino("deep/a")
    fs.chmod("deep/a/b/c/file.txt", 0o600)
    fs.check("dir st_ino kept across copy-up", fs.ino("deep/a") == ino_dir)
    fs.stat("deep/a/b/c/file.txt")
    fs.chmod("xattr.txt", 0o600)
    fs.listxattr("xattr.txt")
    fs.getxattr("xattr.txt", "user.foo")
    fs.chmod("dir", 0o755)
    fs.getxattr("dir", "user.dirattr")
    fs.write("suid.bin", b"!", W, offset=0)
    fs.stat("suid.bin")


# -- deleting --------------------------------------------------------------

@scenario()
def sc_unlink_lower_file(fs: Session):
    fs.unlink("file.txt")
    fs.stat("file.txt")
    fs.read("file.txt")
    fs.listdir("")
    fs.unlink("dir/bottom_only.txt")
    fs.unlink("dir/shared.txt")
    fs.listdir("dir")
    fs.unlink("link")
    fs.unlink("fifo")
    fs.stat("link")


@scenario()
def sc_unlink_upper_only(fs: Session):
    fs.write("fresh.txt", b"fresh")
    fs.unlink("fresh.txt")
    fs.stat("fresh.txt")
    fs.mkdir("newdir")
    fs.write("newdir/f", b"f")
    fs.unlink("newdir/f")
    fs.rmdir("newdir")
    fs.listdir("")


@scenario()
def sc_unlink_copied_up(fs: Session):
    fs.chmod("file.txt", 0o600)
    fs.unlink("file.txt")
    fs.stat("file.txt")
    fs.write("dir/shared.txt", b"x", W)
    fs.unlink("dir/shared.txt")
    fs.listdir("dir")
    fs.create("file.txt")
    fs.read("file.txt")


@scenario()
def sc_rmdir_lower_empty(fs: Session):
    fs.rmdir("emptydir")
    fs.stat("emptydir")
    fs.listdir("")
    fs.rmdir("emptydir")


@scenario(userxattr=True)
def sc_rmdir_merged_looks_empty(fs: Session):
    fs.listdir("wdir")
    fs.rmdir("wdir")
    fs.stat("wdir")
    fs.listdir("")
    fs.mkdir("wdir")
    fs.listdir("wdir")
    fs.stat("wdir/a.txt")


@scenario()
def sc_rmdir_nonempty(fs: Session):
    fs.rmdir("dir")
    fs.rmdir("dup")
    fs.rmdir("deep/a/b")
    for name in ("top_only.txt", "shared.txt", "mid_only.txt"):
        fs.unlink(f"dir/{name}")
    fs.rmdir("dir")  # bottom_only.txt still there
    fs.unlink("dir/bottom_only.txt")
    fs.listdir("dir")
    fs.rmdir("dir")
    fs.stat("dir")
    fs.listdir("")


@scenario()
def sc_delete_wrong_type(fs: Session):
    fs.unlink("dir")
    fs.unlink("emptydir")
    fs.rmdir("file.txt")
    fs.rmdir("link")
    fs.rmdir("dirlink")
    fs.rmdir("fifo")
    fs.unlink("dirlink")
    fs.stat("dirlink")
    fs.stat("dir")


@scenario()
def sc_delete_missing(fs: Session):
    fs.unlink("missing")
    fs.rmdir("missing")
    fs.unlink("gone.txt")
    fs.rmdir("gonedir")
    fs.stat("gonedir/inner.txt")
    fs.unlink("missing/child")
    fs.unlink("file.txt/child")
    fs.read("missing")
    fs.chmod("gone.txt", 0o600)
    fs.listdir("")


@scenario(userxattr=True)
def sc_whiteout_recreate_file(fs: Session):
    fs.unlink("file.txt")
    fs.write("file.txt", b"recreated\n", mode=0o600)
    fs.read("file.txt")
    fs.stat("file.txt")
    fs.unlink("dir/shared.txt")
    fs.mkfifo("dir/shared.txt")
    fs.stat("dir/shared.txt")
    fs.listdir("dir")


@scenario(userxattr=True)
def sc_whiteout_recreate_dir_is_opaque(fs: Session):
    for name in ("top_only.txt", "shared.txt", "mid_only.txt", "bottom_only.txt"):
        fs.unlink(f"dir/{name}")
    fs.rmdir("dir")
    fs.mkdir("dir", 0o700)
    fs.listdir("dir")
    fs.stat("dir/shared.txt")
    fs.write("dir/new.txt", b"new")
    fs.listdir("dir")
    fs.stat("dir")
    fs.listxattr("dir")


@scenario(userxattr=True)
def sc_whiteout_type_changes(fs: Session):
    fs.unlink("file.txt")
    fs.mkdir("file.txt")
    fs.stat("file.txt")
    fs.listdir("file.txt")
    fs.rmdir("emptydir")
    fs.write("emptydir", b"now a file")
    fs.stat("emptydir")
    fs.write("gonedir", b"was whiteout in l1")
    fs.read("gonedir")
    fs.mkdir("gone.txt")
    fs.listdir("gone.txt")
    fs.listdir("")


@scenario(userxattr=True)
def sc_lower_whiteouts_three_layers(fs: Session):
    fs.listdir("")
    fs.stat("gone.txt")
    fs.stat("gonedir")
    fs.read("dir/shared.txt")
    fs.read("file.txt")
    fs.listdir("dir")
    fs.create("gone.txt")
    fs.mkdir("gonedir")
    fs.listdir("gonedir")
    fs.stat("gonedir/inner.txt")


@scenario(userxattr=True)
def sc_lower_opaque_three_layers(fs: Session):
    fs.listdir("opq")
    fs.stat("opq/old.txt")
    fs.read("opq/new.txt")
    fs.write("opq/added.txt", b"added")
    fs.listdir("opq")
    fs.listxattr("opq")
    fs.unlink("opq/new.txt")
    fs.listdir("opq")
    fs.rmdir("opq")
    fs.stat("opq")


# -- renames ---------------------------------------------------------------

@scenario()
def sc_rename_file_over_file(fs: Session):
    fs.rename("file.txt", "exec.sh")
    fs.stat("exec.sh")
    fs.read("exec.sh")
    fs.stat("file.txt")
    fs.write("up.txt", b"upper")
    fs.rename("up.txt", "ro.txt")
    fs.read("ro.txt")
    fs.rename("dir/top_only.txt", "dir/shared.txt")
    fs.listdir("dir")
    fs.read("dir/shared.txt")
    fs.rename("hl1", "hl2")
    fs.stat("hl2")
    fs.rename("link", "file.link")
    fs.readlink("file.link")


@scenario()
def sc_rename_lower_file_elsewhere(fs: Session):
    fs.rename("deep/a/b/c/file.txt", "moved.txt")
    fs.stat("moved.txt")
    fs.listdir("deep/a/b/c")
    fs.rename("dup/x", "opq/x")
    fs.listdir("dup")
    fs.read("dup/x")
    fs.read("opq/x")
    fs.rename("fifo", "dir/fifo")
    fs.stat("dir/fifo")
    fs.rename("nulldev", "dev2")
    fs.stat("dev2")


@scenario(userxattr=True)
def sc_rename_onto_whiteout(fs: Session):
    fs.unlink("exec.sh")
    fs.rename("file.txt", "exec.sh")
    fs.read("exec.sh")
    fs.listdir("")
    fs.rename("base.txt", "gone.txt")  # gone.txt is whited out in l1
    fs.read("gone.txt")
    fs.stat("base.txt")


@scenario(userxattr=True)
def sc_rename_dir_onto_whiteout_stays_opaque(fs: Session):
    for name in ("top_only.txt", "shared.txt", "mid_only.txt", "bottom_only.txt"):
        fs.unlink(f"dir/{name}")
    fs.rmdir("dir")
    fs.mkdir("newdir")
    fs.write("newdir/n.txt", b"n")
    fs.rename("newdir", "dir")
    fs.listdir("dir")
    fs.stat("dir/shared.txt")
    fs.mkdir("nd2")
    fs.rename("nd2", "gonedir")  # whited out in l1, l2 has content
    fs.listdir("gonedir")


@scenario(redirects=True)
def sc_rename_upper_only_dir(fs: Session):
    fs.mkdir("new")
    fs.mkdir("new/sub")
    fs.write("new/sub/f", b"f")
    fs.rename("new", "new2")
    fs.listdir("new2/sub")
    fs.stat("new")
    fs.rename("new2", "dir/new3")
    fs.listdir("dir/new3/sub")
    fs.rename("dir/new3", "emptydir")  # onto an empty lower directory
    fs.listdir("emptydir")
    fs.stat("emptydir")


@scenario(redirects=True)
def sc_rename_merged_dir(fs: Session):
    fs.rename("dir", "dir2")  # EXDEV with redirect_dir=off
    fs.listdir("dir2")
    fs.listdir("dir")
    fs.read("dir2/shared.txt")
    fs.listdir("")
    fs.write("dir2/added", b"added")
    fs.listdir("dir2")
    fs.getxattr("dir2", "user.dirattr")


@scenario(redirects=True)
def sc_rename_merged_dir_and_back(fs: Session):
    fs.rename("dir", "dir2")
    fs.rename("dir2", "dir")
    fs.listdir("dir")
    fs.stat("dir2")
    fs.read("dir/bottom_only.txt")
    fs.rename("dup", "dup_moved")
    fs.mkdir("dup")
    fs.listdir("dup")
    fs.listdir("dup_moved")
    fs.listdir("")


@scenario(redirects=True)
def sc_rename_nested_merged_dir(fs: Session):
    fs.rename("dirsub/inner", "moved_inner")  # redirect to an absolute path
    fs.listdir("moved_inner")
    fs.listdir("dirsub")
    fs.rename("deep/a/b", "deep/b")
    fs.listdir("deep/b/c")
    fs.listdir("deep/a")
    fs.rename("opq", "dir/opq")
    fs.listdir("dir/opq")


@scenario(redirects=True)
def sc_rename_into_opaque_dir(fs: Session):
    fs.rename("file.txt", "opq/file.txt")
    fs.listdir("opq")
    fs.rename("dup", "opq/dup")
    fs.listdir("opq")
    fs.rename("emptydir", "opq/emptydir")
    fs.listdir("opq")
    fs.listdir("")


@scenario()
def sc_rename_errors(fs: Session):
    fs.rename("file.txt", "dir")
    fs.rename("emptydir", "file.txt")
    fs.mkdir("nd")
    fs.rename("nd", "dup")  # onto a non-empty merged dir
    fs.rename("nd", "wdir")  # onto a dir that only looks empty
    fs.listdir("wdir")
    fs.rename("missing", "x")
    fs.rename("gone.txt", "x")
    fs.rename("dir", "dir/sub")
    fs.rename("file.txt", "missing/x")
    fs.rename("file.txt", "file.txt")
    fs.rename("hl1", "hl2")
    fs.listdir("")


# -- links -----------------------------------------------------------------

@scenario()
def sc_hardlink_counts(fs: Session):
    fs.link("exec.sh", "l1")
    fs.link("exec.sh", "dir/l2")
    for rel in ("exec.sh", "l1", "dir/l2"):
        fs.stat(rel)
    fs.unlink("l1")
    fs.stat("exec.sh")
    fs.link("file.txt", "exec.sh")
    fs.link("missing", "m2")
    fs.link("dir", "dir_link")
    fs.link("link", "link2")  # a hard link to a symlink
    fs.stat("link2")


@scenario(userxattr=True)
def sc_names_like_libfuse_hidden(fs: Session):
    """libfuse's high-level API once renamed an open file it was asked to unlink to .fuse_hidden*,
    and took any such name as its own: a user's file by that name was deleted."""
    hidden = ".fuse_hidden0000000100000001"
    fs.write("new.txt", b"mine\n")
    fs.rename("new.txt", hidden)
    fs.listdir("")
    fs.read(hidden)
    fs.rename("file.txt", "dir/.fuse_hidden0000000200000002")  # a lower file
    fs.listdir("dir")
    fd = fs.open("exec.sh", RD)
    fs.unlink("exec.sh")  # unlinked while open: no name of any kind shows for it
    fs.listdir("")
    fs.fstat(fd, "open after unlink")
    fs.close(fd)
    fs.listdir("")
    fs.remount()
    fs.listdir("")
    fs.listdir("dir")
    fs.read(hidden)


LOWER_LINKS = STD.with_entries((), (
    File("hl/one", b"one file, three names\n"),
    HardLink("hl/two", to="hl/one"),
    HardLink("hl/three", to="hl/one"),
))
"""The standard stack plus a file with three names in one lower layer."""


# -- index=on: a lower hard link stays one file across copy-up ----------------

INDEX_LINKS = LOWER_LINKS.with_entries((
    File("pair/a", b"two names in the top layer\n"),
    HardLink("pair/b", to="pair/a"),
), ())
"""LOWER_LINKS plus a two-name file in the top layer, for the index mode."""


def index_scenario(*modes):
    """A scenario of the index modes (index=on, with metacopy=off and on), on INDEX_LINKS; also in
    `modes`, e.g. with index=off, where the same operations break the links (the kernel's default)."""
    def register(fn):
        name = fn.__name__.removeprefix("sc_")
        assert name not in SCENARIOS, name
        SCENARIOS[name] = Scenario(name, fn, INDEX_LINKS, ("index", "index_metacopy") + modes)
        return fn
    return register


def _link_names(fs, names):
    for rel in names:
        fs.stat(rel)
        fs.check(f"same st_ino {rel} {names[0]}", fs.ino(rel) == fs.ino(names[0]))
        fs.read(rel)


# Each change goes through a name first looked up after a remount: FUSE hands the daemon an inode,
# not the name, and the daemon acts on the name the inode was first found by (the kernel links up
# the very name used; the merged view is the same either way, the upper would not be).

@index_scenario("redirect_on")
def sc_index_copyup_each_name(fs: Session):
    """Copy-up of each name in turn: with index=on every name stays the same inode, one data."""
    names = ("hl/one", "hl/two", "hl/three")
    ino = fs.ino("hl/one")
    fs.chmod("hl/one", 0o600)
    _link_names(fs, names)
    fs.remount()
    fs.utime("hl/two", (OLD_TIME_NS, OLD_TIME_NS))
    _link_names(fs, names)
    fs.remount()
    fs.setxattr("hl/three", "user.tag", b"3")
    _link_names(fs, names)
    fs.check("st_ino kept across copy-up", fs.ino("hl/one") == ino)
    fs.listdir("hl")


@index_scenario("redirect_on")
def sc_index_write_one_read_other(fs: Session):
    """Data written through one name shows through the others, copied up or not."""
    fs.write("hl/two", b"written through two\n", W | TRUNC)
    _link_names(fs, ("hl/two", "hl/one", "hl/three"))
    fs.write("pair/a", b"appended\n", W | APPEND)
    _link_names(fs, ("pair/a", "pair/b"))
    fs.remount()
    fs.write("hl/three", b"THREE", W, offset=0)
    _link_names(fs, ("hl/three", "hl/one", "hl/two"))


@index_scenario("redirect_on")
def sc_index_unlink_names(fs: Session):
    """Unlinking names one by one: the link count drops on every name left, the data stays."""
    fs.unlink("hl/one")
    _link_names(fs, ("hl/two", "hl/three"))
    fs.remount()
    fs.unlink("hl/three")
    _link_names(fs, ("hl/two",))
    fs.write("hl/two", b"last\n", W | APPEND)
    fs.read("hl/two")
    fs.unlink("hl/two")
    fs.listdir("hl")
    fs.unlink("pair/b")
    _link_names(fs, ("pair/a",))


@index_scenario()
def sc_index_rename_link(fs: Session):
    """Renames and new links of a lower hard link: one inode throughout."""
    fs.rename("pair/b", "pair/a")  # two names of one lower file: nothing happens, with index=on
    fs.listdir("pair")
    fs.rename("hl/one", "hl/uno")
    _link_names(fs, ("hl/uno", "hl/two", "hl/three"))
    fs.remount()
    fs.link("hl/two", "hl/four")
    _link_names(fs, ("hl/two", "hl/uno", "hl/three", "hl/four"))
    fs.remount()
    fs.rename("hl/three", "hl/two")  # two names of one file: nothing happens, with index=on
    fs.listdir("hl")
    fs.rename("pair/a", "hl/three")  # replaces a name of the other group
    _link_names(fs, ("hl/uno", "hl/two", "hl/four"))
    _link_names(fs, ("hl/three", "pair/b"))
    fs.listdir("hl")
    fs.listdir("pair")


@index_scenario()
def sc_index_link_up_other_name(fs: Session):
    """A change through a second name of an indexed file, the first still known to the mount: the
    kernel links up the name used, cowfs the one first found (KNOWN_DIFFERENCES: index_link_up_name)."""
    fs.chmod("hl/one", 0o600)
    fs.stat("hl/two")
    fs.utime("hl/two", (OLD_TIME_NS, OLD_TIME_NS))
    _link_names(fs, ("hl/one", "hl/two", "hl/three"))


@index_scenario()
def sc_index_meta_then_data(fs: Session):
    """With metacopy=on a change of metadata copies a lower hard link into the index without its data;
    a write through another name, after a remount, brings the data into that same inode, for every name.
    A descriptor opened on a lower name before its data came up reads the data of the upper inode."""
    fs.chmod("hl/one", 0o600)
    fs.chown("pair/a", USER, USER)
    _link_names(fs, ("hl/one", "hl/two", "hl/three"))
    _link_names(fs, ("pair/a", "pair/b"))
    fs.remount()
    fs.write("hl/two", b"TWO", W, offset=0)
    _link_names(fs, ("hl/two", "hl/one", "hl/three"))
    fd = fs.open("pair/b", RD)
    fs.pread(fd, 64, 0, "pair/b before the data")
    fs.truncate("pair/b", 4)  # the same name (cowfs would link up the name first found), linked up
    fs.pread(fd, 64, 0, "pair/b opened before the data")
    fs.close(fd)
    _link_names(fs, ("pair/a", "pair/b"))
    fs.remount()
    _link_names(fs, ("hl/three", "hl/one", "hl/two"))
    _link_names(fs, ("pair/b", "pair/a"))


@index_scenario()
def sc_index_meta_names(fs: Session):
    """Names of an indexed metadata-only copy come and go (the redirect a new name needs), then the data."""
    fs.utime("hl/one", (OLD_TIME_NS, OLD_TIME_NS))
    fs.rename("hl/one", "uno")  # into another directory: an absolute redirect to the data
    fs.unlink("hl/two")
    _link_names(fs, ("uno", "hl/three"))
    fs.remount()
    fs.link("hl/three", "pair/three")
    _link_names(fs, ("hl/three", "uno", "pair/three"))
    fs.rename("pair/b", "pair/c")  # not copied up before: metadata only, straight into the index
    _link_names(fs, ("pair/c", "pair/a"))
    fs.remount()
    fs.write("uno", b"data through uno\n", W | APPEND)
    _link_names(fs, ("uno", "hl/three", "pair/three"))
    fs.unlink("pair/c")
    fs.truncate("pair/a", 3)  # the last name, never copied up: data and all, in the index
    _link_names(fs, ("pair/a",))
    fs.listdir("hl")
    fs.listdir("pair")
    fs.listdir("")


# -- data-only lower layers (`lowerdir=A:B::D1::D2`): a composefs-style stack ----------------------

def _meta(path, size, redirect, mode=0o644):
    """A metacopy file of the metadata layer: `size` bytes of hole, its data at absolute `redirect`."""
    return File(path, hole=size, mode=Oct(mode),
                xattrs=(("overlay.metacopy", b""), ("overlay.redirect", redirect.encode())))


COMPOSEFS = StackSpec(
    Layer(  # the metadata layer
        _meta("etc/hosts", 12, "/ab/cdef"),
        _meta("bin/tool", 10, "/cd/0123", mode=0o755),
        _meta("shadowed", 8, "/ab/shadow"),
        _meta("in_lower", 16, "/objects/lowerdata"),
        _meta("missing", 5, "/zz/none"),
        _meta("big.img", 1_000_000, "/ab/sparse"),
        File("plain.txt", b"plain in the metadata layer\n"),
    ),
    Layer(  # a normal lower layer
        File("lower.txt", b"a normal lower file\n"),
        File("objects/lowerdata", b"data in a lower\n"),
    ),
    Layer(  # data-only
        File("ab/cdef", b"127.0.0.1 x\n"),
        File("ab/shadow", b"from d1\n"),
        File("never_by_name.txt", b"a data-only layer's names never show\n"),
        File("ab/sparse", hole=1_000_000),
    ),
    Layer(  # data-only
        File("ab/shadow", b"from d2\n"),
        File("cd/0123", b"tool data\n", mode=Oct(0o600)),
        File("plain.txt", b"hidden: data-only\n"),
    ),
)
"""Two lower layers (metacopy files with absolute redirects, and a normal one) over two data-only layers."""


def data_only_scenario(readonly=False):
    def register(fn):
        name = fn.__name__.removeprefix("sc_")
        assert name not in SCENARIOS, name
        SCENARIOS[name] = Scenario(name, fn, COMPOSEFS, ("data_only", "data_only_verity_require"), readonly)
        return fn
    return register


COMPOSED = ("etc/hosts", "bin/tool", "shadowed", "in_lower", "plain.txt", "lower.txt")


@data_only_scenario(readonly=True)
def sc_data_only_read(fs: Session):
    """Names come from the lower layers only; data through each redirect, from the first data layer
    that has it (or the normal lower below the metadata layer)."""
    fs.listdir("")
    for rel in ("etc", "bin", "ab", "cd", "never_by_name.txt", "objects"):
        fs.stat(rel)
    for rel in COMPOSED:
        fs.stat(rel)
        fs.read(rel)
    fs.stat("missing")
    fs.read("missing")
    fs.stat("big.img")  # the data not looked up yet: the kernel shows the size's pages as blocks
    fs.digest("big.img")
    fs.stat("big.img")  # now the data file's own (none: all hole)


@data_only_scenario()
def sc_data_only_copy_up(fs: Session):
    """Copy-up of metacopy files whose data is in a data-only layer: metadata only, then the data."""
    fs.chmod("etc/hosts", 0o600)
    fs.read("etc/hosts")
    fs.stat("etc/hosts")
    fs.write("bin/tool", b"TOOL", W, offset=0)
    fs.read("bin/tool")
    fs.rename("shadowed", "etc/moved")
    fs.read("etc/moved")
    fs.link("in_lower", "bin/also")
    fs.read("bin/also")
    fs.unlink("plain.txt")
    fs.listdir("")
    fs.remount()
    for rel in ("etc/hosts", "bin/tool", "etc/moved", "bin/also", "in_lower"):
        fs.stat(rel)
        fs.read(rel)
    fs.listdir("")
    fs.listdir("etc")


@scenario(layers=LOWER_LINKS, userxattr=True)
def sc_cached_attrs_follow_changes(fs: Session):
    """With attributes cached by the kernel, every change made through one name shows at once
    through every other name of the same file, and through descriptors opened before it."""
    names = ("exec.sh", "a1", "dir/a2")
    fs.link("exec.sh", "a1")
    fs.link("a1", "dir/a2")

    def stat_all(*rels):
        for rel in rels:
            fs.stat(rel)

    stat_all(*names, "hl/one", "hl/two", "hl/three", "dir", "")  # the kernel now caches all of them
    old_fd = os.open(fs.p("dir/a2"), os.O_RDONLY)
    try:
        fs.do("read before", os.pread, old_fd, 100, 0)
        fs.write("a1", b"a longer content than before\n", W | APPEND)
        fs.do("read after write through another name", os.pread, old_fd, 100, 0)
        fs.do("fstat after write through another name", lambda: describe_stat(os.fstat(old_fd)))
    finally:
        os.close(old_fd)
    stat_all(*names)
    fs.chmod("dir/a2", 0o700)
    stat_all(*names)
    fs.chown("exec.sh", 1000, 1000)
    stat_all(*names)
    fs.utime("a1", (10**18, 2 * 10**18))
    stat_all(*names)
    fs.do("truncate", os.truncate, fs.p("dir/a2"), 3)
    stat_all(*names)
    fs.link("exec.sh", "a3")
    stat_all(*names, "a3")
    fs.unlink("a3")
    stat_all(*names)
    fs.rename("base.txt", "a1")  # replaces one name: the others lose a link
    stat_all(*names)
    fs.mkdir("dir/sub")
    stat_all("dir")
    fs.rmdir("dir/sub")
    stat_all("dir")
    fs.write("hl/two", b"copied up", W | TRUNC)  # breaks the lower hard link: one of three names moves up
    stat_all("hl/one", "hl/two", "hl/three", "hl")
    fs.chmod("hl/three", 0o600)
    stat_all("hl/one", "hl/two", "hl/three")
    fs.read("hl/one")
    fs.check("hl/one and hl/three still one file", fs.ino("hl/one") == fs.ino("hl/three"))


@scenario(also=INDEX_METACOPY)
def sc_hardlink_modify_through_one(fs: Session):
    fs.link("file.txt", "other")
    fs.write("other", b"CHANGED", W, offset=0)
    fs.read("file.txt")
    fs.chmod("file.txt", 0o600)
    fs.stat("other")
    fs.unlink("file.txt")
    fs.stat("other")
    fs.read("other")


@scenario(also=INDEX_METACOPY)
def sc_lower_hardlink_pair_broken(fs: Session):
    fs.stat("hl1")
    fs.stat("hl2")
    fs.check("lower pair shares st_ino", fs.ino("hl1") == fs.ino("hl2"))
    fs.write("hl1", b"HL", W, offset=0)
    fs.read("hl1")
    fs.read("hl2")
    fs.stat("hl1")
    fs.stat("hl2")
    fs.check("after copy-up still shares st_ino", fs.ino("hl1") == fs.ino("hl2"))


@scenario()
def sc_symlinks(fs: Session):
    fs.symlink("file.txt", "new.link")
    fs.readlink("new.link")
    fs.stat("new.link")
    fs.stat_follow("new.link")
    fs.read("new.link")
    fs.symlink("x", "file.txt")
    fs.symlink("", "empty.link")
    fs.symlink("a" * 1000, "long.link")
    fs.readlink("long.link")
    fs.readlink("file.txt")
    fs.symlink("../../outside", "dir/out.link")
    fs.readlink("dir/out.link")


@scenario()
def sc_lower_symlinks(fs: Session):
    fs.readlink("link")
    fs.read("link")
    fs.stat_follow("link")
    fs.readlink("dangling")
    fs.read("dangling")
    fs.stat_follow("dangling")
    fs.listdir("dirlink")
    fs.write("link", b"through the link", W, offset=0)  # copies up file.txt, not the link
    fs.read("file.txt")
    fs.stat("link")
    fs.chown("dangling", 77, 88)
    fs.stat("dangling")
    fs.readlink("dangling")
    fs.chown("link", 99, 99, follow=True)
    fs.stat("file.txt")


# -- special files ---------------------------------------------------------

@scenario()
def sc_fifo_and_devices(fs: Session):
    fs.mkfifo("newfifo", 0o600)
    fs.stat("newfifo")
    fs.mkfifo("fifo")
    fs.mkfifo("file.txt")
    fs.mknod("zero", stat.S_IFCHR | 0o640, os.makedev(1, 5))
    fs.stat("zero")
    fs.read("zero", 4)
    fs.stat("nulldev")
    fs.read("nulldev", 4)
    fs.chown("fifo", USER, USER)
    fs.stat("fifo")
    fs.mknod("reg", stat.S_IFREG | 0o600)
    fs.stat("reg")


@scenario()
def sc_whiteout_device_through_mount(fs: Session):
    """mknod of a 0/0 character device (the whiteout format) through the mount."""
    fs.mknod("wh", stat.S_IFCHR | 0o600, os.makedev(0, 0))
    fs.stat("wh")
    fs.listdir("")
    fs.mknod("base.txt", stat.S_IFCHR | 0o600, os.makedev(0, 0))
    fs.unlink("base.txt")
    fs.mknod("base.txt", stat.S_IFCHR | 0o600, os.makedev(0, 0))
    fs.stat("base.txt")
    fs.listdir("")


MAJOR_ZERO_DEVICES = STD.with_entries(
    (Device("dev0_1", 0, 1), Device("base.txt", 0, 1), Device("dir/bottom_only.txt", 0, 255)),
    (Device("dup/y", 0, 7),),
)
"""Character devices of major 0 that are not 0/0: devices, not whiteouts, even over a lower file."""


@scenario(layers=MAJOR_ZERO_DEVICES)
def sc_major_zero_devices_are_not_whiteouts(fs: Session):
    fs.listdir("")
    fs.listdir("dir")
    fs.listdir("dup")
    for name in ("dev0_1", "base.txt", "dir/bottom_only.txt", "dup/y"):
        fs.stat(name)
    fs.chown("dev0_1", USER, USER)  # a copy-up of the device
    fs.stat("dev0_1")
    fs.unlink("base.txt")  # the lower file below it stays hidden
    fs.stat("base.txt")
    fs.rename("dup/y", "dup/y2")
    fs.listdir("dup")


SETGID_DIR = STD.with_entries(
    (Dir("sg", mode=0o2775, owner=(0, USER)), File("sg/copied", b"c\n"), File("sg/lower", b"l\n"),
     File("sg/moved", b"m\n")),
)
"""A set-group-ID directory of the user's group holding root's files."""


@scenario(layers=SETGID_DIR)
def sc_whiteouts_in_a_setgid_directory(fs: Session):
    """The kernel makes the whiteout of an unlinked upper file in its workdir (root's group), and leaves the
    one of a move or of an unlinked lower file in place; each whiteout's owner as the kernel's."""
    fs.chmod("sg/copied", 0o640)  # copied up, then unlinked: the upper file becomes a whiteout
    fs.unlink("sg/copied")
    fs.unlink("sg/lower")
    fs.rename("sg/moved", "sg/moved2")
    fs.write("sg/new", b"n")  # a new file takes the directory's group
    fs.listdir("sg")
    fs.stat("sg/new")


OCI_NAMES = STD.with_entries(
    (File(".wh.base.txt"), File("dup/.wh..wh..opq")),
    (File(".wh.file.txt", b"not a marker"),),
    (File("empty"),),
)
"""Layers holding names in the OCI whiteout spelling: without oci_whiteouts they are ordinary files."""


@scenario(layers=OCI_NAMES, userxattr=True)
def sc_oci_names_are_ordinary(fs: Session):
    fs.listdir("")
    fs.listdir("dup")
    fs.read("base.txt")
    fs.read(".wh.file.txt")
    fs.write(".wh.exec.sh", b"created through the mount")
    fs.mkdir(".wh..wh..opq")
    fs.listdir("")
    fs.stat("exec.sh")
    fs.unlink(".wh.base.txt")
    fs.listdir("")
    fs.chmod("empty", 0o600)
    fs.stat("empty")


# -- xattrs ----------------------------------------------------------------

@scenario(userxattr=True)
def sc_xattrs_lower_and_upper(fs: Session):
    fs.getxattr("xattr.txt", "user.foo")
    fs.getxattr("xattr.txt", "user.empty")
    fs.getxattr("xattr.txt", "user.missing")
    fs.listxattr("xattr.txt")
    fs.getxattr("dir", "user.dirattr")
    fs.write("up.txt", b"u")
    fs.setxattr("up.txt", "user.a", b"1")
    fs.setxattr("up.txt", "user.b", b"\x00\xff" * 100)
    fs.listxattr("up.txt")
    fs.getxattr("up.txt", "user.b")
    fs.removexattr("up.txt", "user.a")
    fs.listxattr("up.txt")
    fs.setxattr("dup", "user.d", b"dir xattr")
    fs.listxattr("dup")
    fs.listdir("dup")
    fs.setxattr("link", "user.onlink", b"x")


@scenario(userxattr=True)
def sc_xattrs_overlay_private_hidden(fs: Session):
    """The layers' own overlay xattrs are neither listed, read nor removable through the mount."""
    fs.listxattr("opq")
    fs.getxattr("opq", "trusted.overlay.opaque")
    fs.getxattr("opq", "user.overlay.opaque")
    fs.removexattr("opq", "trusted.overlay.opaque")
    fs.removexattr("opq", "user.overlay.opaque")
    fs.listdir("opq")
    fs.rmdir("emptydir")
    fs.mkdir("emptydir")  # opaque in the upper layer
    fs.listxattr("emptydir")
    fs.getxattr("emptydir", "trusted.overlay.opaque")
    fs.write("file.txt", b"copied up", W, offset=0)  # the kernel records an origin xattr
    fs.listxattr("file.txt")
    fs.setxattr("file.txt", "trusted.other", b"t")
    fs.listxattr("file.txt")


@scenario(userxattr=True)
def sc_xattrs_overlay_names_set_through_mount(fs: Session):
    """Setting an overlay xattr name through the mount never changes how the stack is merged."""
    fs.setxattr("file.txt", "trusted.overlay.opaque", b"y")
    fs.setxattr("file.txt", "user.overlay.opaque", b"y")
    fs.setxattr("dup", "trusted.overlay.opaque", b"y")
    fs.setxattr("dup", "user.overlay.opaque", b"y")
    fs.setxattr("dup", "user.overlay.redirect", b"/dir")
    fs.listdir("dup")
    fs.listxattr("file.txt")
    fs.listxattr("dup")
    fs.getxattr("dup", "trusted.overlay.opaque")
    fs.remount()
    fs.listdir("dup")
    fs.listxattr("dup")


# -- file descriptors across changes ----------------------------------------

@scenario()
def sc_read_fd_across_copyup(fs: Session):
    fd = fs.open("file.txt", RD)
    fs.pread(fd, 5, 0, "early reader")
    fs.write("file.txt", b"HELLO", W, offset=0)
    fs.pread(fd, 100, 0, "early reader after copy-up")
    fs.fstat(fd, "early reader")
    fs.close(fd)
    fd = fs.open("big.bin", RD)
    fs.truncate("big.bin", 10)
    fs.pread(fd, 20, 0, "early reader after truncate")
    fs.close(fd)


@scenario()
def sc_write_fd_across_rename_and_unlink(fs: Session):
    fd = fs.open("file.txt", RW)
    fs.rename("file.txt", "moved.txt")
    fs.pwrite(fd, b"AFTER", 0, "fd after rename")
    fs.close(fd)
    fs.read("moved.txt")
    fd = fs.open("exec.sh", W)
    fs.unlink("exec.sh")
    fs.pwrite(fd, b"x", 0, "fd after unlink")
    fs.fstat(fd, "unlinked")
    fs.listdir("")
    fs.close(fd)
    fs.listdir("")


@scenario()
def sc_ftruncate_and_fstat(fs: Session):
    fd = fs.open("big.bin", RW)
    fs.do("ftruncate", os.ftruncate, fd, 1000)
    fs.fstat(fd)
    fs.do("fsync", os.fsync, fd)
    fs.close(fd)
    fs.stat("big.bin")
    fs.digest("big.bin")


@scenario()
def sc_read_fd_across_unlink_and_rename(fs: Session):
    """An open file keeps working after its name goes away or moves (the kernel holds the inode)."""
    fd = fs.open("dir/shared.txt", RD)
    fs.unlink("dir/shared.txt")
    fs.pread(fd, 100, 0, "lower file after unlink")
    fs.fstat(fd, "lower file after unlink")
    fs.close(fd)
    fd = fs.open("dup/x", RD)
    fs.rename("dup/x", "dup/x2")
    fs.pread(fd, 100, 0, "after rename")
    fs.close(fd)
    fs.write("tmp.txt", b"upper file")
    fd = fs.open("tmp.txt", RW)
    fs.unlink("tmp.txt")
    fs.pwrite(fd, b"UP", 0, "upper file after unlink")
    fs.pread(fd, 100, 0, "upper file after unlink")
    fs.do("fchmod after unlink", os.fchmod, fd, 0o600)
    fs.fstat(fd, "upper file after unlink")
    fs.close(fd)
    fs.listdir("")


@scenario()
def sc_fd_across_parent_rename(fs: Session):
    fs.mkdir("p")
    fs.write("p/f", b"in p")
    fd = fs.open("p/f", RW)
    fs.rename("p", "q")
    fs.pwrite(fd, b"IN", 0, "after parent rename")
    fs.close(fd)
    fs.read("q/f")
    fd = fs.open("dir/top_only.txt", RD)
    fs.rename("dir", "dir_moved")  # EXDEV with redirect_dir=off
    fs.pread(fd, 100, 0, "lower file, parent renamed")
    fs.close(fd)
    fs.listdir("")


@scenario()
def sc_mmap_shared_write(fs: Session):
    import mmap

    def go():
        fd = os.open(fs.p("file.txt"), os.O_RDWR)
        try:
            with mmap.mmap(fd, 0, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE) as m:
                m[0:5] = b"MMAP!"
                m.flush()
                return bytes(m[:])
        finally:
            os.close(fd)
    fs.do("mmap write file.txt", go)
    fs.read("file.txt")
    fs.stat("file.txt")


def _renameat2(old: str, new: str, flags: int) -> None:
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    at_fdcwd = -100
    if libc.renameat2(at_fdcwd, os.fsencode(old), at_fdcwd, os.fsencode(new), flags) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), old)


@scenario()
def sc_rename_flags(fs: Session):
    noreplace, exchange = 1, 2
    fs.do("noreplace onto existing", _renameat2, fs.p("file.txt"), fs.p("exec.sh"), noreplace)
    fs.do("noreplace onto new", _renameat2, fs.p("file.txt"), fs.p("fresh.txt"), noreplace)
    fs.do("noreplace onto whiteout", _renameat2, fs.p("ro.txt"), fs.p("gone.txt"), noreplace)
    fs.do("exchange two files", _renameat2, fs.p("exec.sh"), fs.p("base.txt"), exchange)
    fs.read("exec.sh")
    fs.read("base.txt")
    fs.listdir("")


@scenario()
def sc_rename_exchange_kinds(fs: Session):
    """RENAME_EXCHANGE across kinds and places: lower and upper, file and directory, two directories."""
    noreplace, exchange = 1, 2
    fs.do("exchange file and lower dir", _renameat2, fs.p("exec.sh"), fs.p("dup"), exchange)
    fs.do("exchange upper dir and file", _renameat2, fs.p("emptydir"), fs.p("base.txt"), exchange)
    fs.do("exchange across dirs", _renameat2, fs.p("dir/shared.txt"), fs.p("deep/a/b/c/file.txt"), exchange)
    fs.do("exchange with missing", _renameat2, fs.p("ro.txt"), fs.p("nothing"), exchange)
    fs.do("exchange with whiteout", _renameat2, fs.p("ro.txt"), fs.p("gone.txt"), exchange)
    fs.do("exchange into own subdir", _renameat2, fs.p("dirsub"), fs.p("dirsub/inner"), exchange)
    fs.do("both flags", _renameat2, fs.p("ro.txt"), fs.p("suid.bin"), noreplace | exchange)
    fs.do("whiteout flag", _renameat2, fs.p("ro.txt"), fs.p("fresh"), 4)
    fs.do("noreplace dir onto dir", _renameat2, fs.p("emptydir"), fs.p("opq"), noreplace)
    fs.do("mkdir", os.mkdir, fs.p("newdir"))
    fs.do("exchange new dir and merged dir", _renameat2, fs.p("newdir"), fs.p("dirsub"), exchange)
    fs.do("exchange same file", _renameat2, fs.p("suid.bin"), fs.p("suid.bin"), exchange)
    for name in ("exec.sh", "emptydir", "newdir", "dir", "deep/a/b/c"):  # what is a directory now
        fs.listdir(name)
    for name in ("dup", "base.txt", "dir/shared.txt", "deep/a/b/c/file.txt"):
        fs.read(name)
    fs.listdir("")


LONG = "l" * 255
LONG_NAMES = STD.with_entries((), (File(f"{LONG}/{LONG}/f", b"deep\n"), File(f"{LONG}/short/f", b"short\n")), ())
"""Directories whose absolute path is longer than the kernel's longest redirect (redirect_max, 256)."""


@scenario(layers=LONG_NAMES)
def sc_rename_needs_too_long_redirect(fs: Session):
    """A move whose absolute redirect would pass 256 bytes fails with EXDEV (the tools then copy), after the
    copy-ups; a relative one (same directory) or a short absolute one does not."""
    fs.rename(f"{LONG}/{LONG}", "moved")  # "/" + 511 bytes: EXDEV under redirect_dir=on as off
    fs.do("exchange with a long one", _renameat2, fs.p("dir"), fs.p(f"{LONG}/{LONG}"), 2)
    fs.rename(f"{LONG}/{LONG}", f"{LONG}/again")  # relative: any length
    fs.rename(f"{LONG}/short", "short")  # "/" + 255 + "/short": 262 bytes, too long as well
    fs.rename("dirsub/inner", "inner")  # short and absolute
    for name in ("", LONG, "inner", "moved"):
        fs.listdir(name)


ODD_NAMES = STD.with_entries((), (File("caf\udce9.txt", b"a latin-1 name\n"),), (File("d\udcff/in", b"inside\n"),))
"""Names that are not valid UTF-8 (written with surrogate escapes, as os does for such bytes)."""


@scenario(layers=ODD_NAMES, userxattr=True)
def sc_names_not_utf8(fs: Session):
    """Names that are not UTF-8 pass byte for byte: listing, copy-up, rename, create, whiteout."""
    fs.listdir("")
    fs.read("caf\udce9.txt")
    fs.write("caf\udce9.txt", b"more\n", W | APPEND)
    fs.rename("caf\udce9.txt", "d\udcff/n\udce9w")
    fs.create("d\udcff/x\udcfe")
    fs.unlink("d\udcff/in")
    fs.listdir("d\udcff")
    fs.stat("d\udcff/n\udce9w")
    fs.read("d\udcff/n\udce9w")


def _many(i: int) -> str:
    return f"many/entry-{i:04d}-{'x' * (i % 40)}"


LARGE_DIR = STD.with_entries(
    [File(_many(i), b"%d" % i) for i in range(0, 400, 3)],
    [File(_many(i), b"%d" % i) for i in range(1, 400, 3)]
    + [Whiteout(_many(i)) for i in range(0, 400, 7) if i % 3 == 2]  # a name in l2: hide it from l1
    + [File("many/entry-0000-", b"shadowed")],
    [File(_many(i), b"%d" % i) for i in range(2, 400, 3)],
)


@scenario(layers=LARGE_DIR)
def sc_readdir_large_merged(fs: Session):
    """A listing that needs several getdents calls (offsets across layers) still merges exactly."""
    fs.listdir("many")
    for i in range(1, 400, 11):
        fs.unlink(f"many/entry-{i:04d}-{'x' * (i % 40)}")
    fs.listdir("many")
    fs.read("many/entry-0000-")
    fs.rmdir("many")


# -- permissions -----------------------------------------------------------

def _user_ops(fs: Session):
    fs.access("file.txt", os.R_OK | os.W_OK)
    fs.access("ro.txt", os.W_OK)
    fs.access("rootonly.txt", os.R_OK)
    fs.access("exec.sh", os.X_OK)
    fs.read("rootonly.txt")
    fs.read("file.txt")
    fs.write("file.txt", b"user wrote", W, offset=0)
    fs.write("exec.sh", b"x", W, offset=0)
    fs.create("newfile")
    fs.create("emptydir/mine")
    fs.listdir("emptydir")
    fs.listdir("deep/a")
    fs.stat("deep/a/b/c/file.txt")
    fs.chmod("exec.sh", 0o777)
    fs.chmod("file.txt", 0o600)
    fs.chown("file.txt", 0, 0)
    fs.unlink("base.txt")
    fs.rename("emptydir/mine", "emptydir/mine2")
    fs.setxattr("file.txt", "user.byuser", b"1")
    fs.setxattr("exec.sh", "user.byuser", b"1")


@scenario(allow_other=True)
def sc_permissions_non_root(fs: Session):
    fs.as_user(USER, USER, _user_ops)
    fs.as_user(2000, 2000, lambda u: (u.read("file.txt"), u.listdir("emptydir"), u.access("deep/a", os.X_OK)))
    fs.stat("file.txt")
    fs.stat("emptydir/mine2")
    fs.read("file.txt")


def posix_acl(*entries: tuple[int, int, int]) -> bytes:
    """A system.posix_acl_* value: (tag, perm, id) entries in the kernel's xattr format (version 2)."""
    import struct

    return struct.pack("<I", 2) + b"".join(struct.pack("<HHI", tag, perm, ident) for tag, perm, ident in entries)


ACL_USER_OBJ, ACL_USER, ACL_GROUP_OBJ, ACL_MASK, ACL_OTHER, NO_ID = 0x01, 0x02, 0x04, 0x10, 0x20, 0xFFFFFFFF


ACLS = STD.with_entries((), (
    Dir("acl", xattrs=(("system.posix_acl_default", posix_acl(
        (ACL_USER_OBJ, 7, NO_ID), (ACL_USER, 7, USER), (ACL_GROUP_OBJ, 5, NO_ID), (ACL_MASK, 7, NO_ID),
        (ACL_OTHER, 5, NO_ID))),)),
    File("acl/granted", b"root's, readable by USER through an ACL\n", mode=0o640, xattrs=(
        ("system.posix_acl_access", posix_acl(
            (ACL_USER_OBJ, 6, NO_ID), (ACL_USER, 4, USER), (ACL_GROUP_OBJ, 4, NO_ID), (ACL_MASK, 4, NO_ID),
            (ACL_OTHER, 0, NO_ID))),)),
    File("acl/refused", b"world-readable but not by USER\n", mode=0o644, xattrs=(
        ("system.posix_acl_access", posix_acl(
            (ACL_USER_OBJ, 6, NO_ID), (ACL_USER, 0, USER), (ACL_GROUP_OBJ, 4, NO_ID), (ACL_MASK, 4, NO_ID),
            (ACL_OTHER, 4, NO_ID))),)),
))


@scenario(layers=ACLS, allow_other=True)
def sc_posix_acls(fs: Session):
    """POSIX ACLs in a lower layer are enforced and survive copy-up; chmod rewrites the ACL's mask."""
    def as_user(u: Session):
        u.read("acl/granted")
        u.read("acl/refused")
        u.access("acl/granted", os.R_OK)
        u.access("acl/refused", os.R_OK)
    fs.as_user(USER, USER, as_user)
    for rel in ("acl/granted", "acl/refused"):
        fs.getxattr(rel, "system.posix_acl_access")
        fs.stat(rel)
    fs.chmod("acl/granted", 0o600)  # copies up; the ACL's mask becomes ---
    fs.getxattr("acl/granted", "system.posix_acl_access")
    fs.as_user(USER, USER, lambda u: u.read("acl/granted"))
    fs.setxattr("acl/refused", "system.posix_acl_access", posix_acl(
        (ACL_USER_OBJ, 6, NO_ID), (ACL_USER, 4, USER), (ACL_GROUP_OBJ, 4, NO_ID), (ACL_MASK, 4, NO_ID),
        (ACL_OTHER, 4, NO_ID)))
    fs.as_user(USER, USER, lambda u: u.read("acl/refused"))
    fs.stat("acl/refused")
    fs.create("acl/new", mode=0o666)  # inherits the directory's default ACL
    fs.mkdir("acl/newdir", 0o777)
    for rel in ("acl/new", "acl/newdir"):
        fs.stat(rel)
        fs.getxattr(rel, "system.posix_acl_access")
    fs.getxattr("acl/newdir", "system.posix_acl_default")
    fs.as_user(USER, USER, lambda u: u.write("acl/new", b"by USER", W, offset=0))

    def under_umask(mask, fn, *args):
        old = os.umask(mask)
        try:
            return fn(*args)
        finally:
            os.umask(old)
    fs.do("create under umask 027", under_umask, 0o027, lambda: os.close(os.open(fs.p("plain"), CREAT | W, 0o777)))
    fs.do("mkdir under umask 077", under_umask, 0o077, os.mkdir, fs.p("plaindir"), 0o777)
    fs.do("mkdir in acl dir under umask 077", under_umask, 0o077, os.mkdir, fs.p("acl/masked"), 0o777)
    for rel in ("plain", "plaindir", "acl/masked"):
        fs.stat(rel)


SHARED_DIRS = STD.with_entries(
    (Dir("locked", mode=0o555), File("locked/f", b"f", mode=0o666),
     File("groupw.txt", b"group writable", mode=0o664, owner=(0, USER))),
    (Dir("sticky", mode=0o1777), File("sticky/roots", b"root's", mode=0o666)),
    (File("sticky/users", b"user's", owner=(USER, USER)),),
)


@scenario(layers=SHARED_DIRS, allow_other=True)
def sc_permissions_sticky_and_groups(fs: Session):
    def as_user(u: Session):
        u.unlink("sticky/roots")
        u.rename("sticky/roots", "sticky/mine")
        u.unlink("sticky/users")
        u.create("sticky/new")
        u.write("locked/f", b"F", W, offset=0)
        u.create("locked/g")
        u.unlink("locked/f")
        u.write("groupw.txt", b"G", W, offset=0)
        u.listdir("sticky")
    fs.as_user(USER, USER, as_user)
    fs.as_user(3000, USER, lambda u: (u.write("groupw.txt", b"H", W, offset=1), u.chmod("groupw.txt", 0o666)))
    fs.listdir("sticky")
    fs.stat("sticky")
    fs.stat("sticky/new")
    fs.read("groupw.txt")
    fs.read("locked/f")
    fs.create("locked/root_can")


# -- directories and names ---------------------------------------------------

@scenario()
def sc_mkdir_rmdir_mkdir(fs: Session):
    fs.mkdir("x")
    fs.rmdir("x")
    fs.mkdir("x", 0o711)
    fs.stat("x")
    fs.mkdir("x")
    fs.mkdir("dir")
    fs.mkdir("file.txt")
    fs.mkdir("missing/child")
    fs.rmdir("emptydir")
    fs.mkdir("emptydir")
    fs.stat("emptydir")
    fs.listdir("")


@scenario()
def sc_create_excl_and_append(fs: Session):
    fs.create("file.txt")
    fs.create("dir/shared.txt")
    fs.create("gone.txt")
    fs.create("link")
    fs.create("dangling")  # O_EXCL never follows the symlink
    fs.write("file.txt", b"+appended\n", W | APPEND)
    fs.write("dir/mid_only.txt", b"+more\n", W | APPEND | CREAT)
    fs.read("file.txt")
    fs.read("dir/mid_only.txt")
    fs.write("new.txt", b"n", W | CREAT | EXCL, mode=0o640)
    fs.stat("new.txt")


@scenario()
def sc_open_flags_on_lower(fs: Session):
    fs.write("dir", b"x", W)
    fs.write("ro.txt", b"x", W, offset=0)  # root may write 0444
    fs.write("missing/x", b"x")
    fs.write("file.txt/x", b"x")
    fd = fs.open("dir", RD | os.O_DIRECTORY)
    fs.close(fd)
    fs.open("file.txt", RD | os.O_DIRECTORY)
    fs.open("link", RD | os.O_NOFOLLOW)
    fd = fs.open("dir/shared.txt", RD)
    fs.pread(fd, 100, 0)
    fs.close(fd)
    fs.stat("dir/shared.txt")
    fd = fs.open("exec.sh", RD | TRUNC)  # O_RDONLY|O_TRUNC truncates on Linux
    fs.close(fd)
    fs.stat("exec.sh")


@scenario()
def sc_readdir_merge_three_layers(fs: Session):
    fs.listdir("dup")
    fs.scandir("dup")
    fs.scandir("")
    fs.read("dup/x")
    fs.listdir("dir")
    fs.listdir("dirsub/inner")
    fs.listdir("deep/a/b/c")
    fs.unlink("dup/x")
    fs.listdir("dup")
    fs.read("dup/x")


@scenario()
def sc_remount_midway(fs: Session):
    fs.write("file.txt", b"changed before remount")
    fs.unlink("dir/shared.txt")
    fs.rename("dup", "dup2")
    fs.mkdir("fresh")
    fs.write("fresh/f", b"f")
    fs.chmod("exec.sh", 0o700)
    fs.link("hl1", "hl3")
    inos = {rel: fs.ino(rel) for rel in ("file.txt", "exec.sh", "base.txt", "fresh/f", "dup2", "dir")}
    fs.remount()
    for rel, ino in inos.items():
        fs.check(f"st_ino of {rel} kept across remount", fs.ino(rel) == ino)
    fs.read("file.txt")
    fs.listdir("dir")
    fs.listdir("dup2")
    fs.listdir("dup")
    fs.listdir("")
    fs.stat("exec.sh")
    fs.stat("hl1")
    fs.stat("hl3")
    fs.check("hard link survives remount", fs.ino("hl1") == fs.ino("hl3"))
    fs.unlink("fresh/f")
    fs.rmdir("fresh")
    fs.remount()
    fs.listdir("")


@scenario()
def sc_statvfs_sanity(fs: Session):
    def go():
        st = os.statvfs(fs.p(""))
        return {"bsize>0": st.f_bsize > 0, "blocks>0": st.f_blocks > 0, "bavail<=bfree": st.f_bavail <= st.f_bfree,
                "bfree<=blocks": st.f_bfree <= st.f_blocks, "namemax": st.f_namemax}
    fs.do("statvfs", go)
    fs.do("statvfs dir", lambda: os.statvfs(fs.p("dir")).f_namemax)
    fs.create("a" * 255)
    fs.create("b" * 256)


@scenario(readonly=True)
def sc_readonly_mount(fs: Session):
    fs.read("file.txt")
    fs.listdir("")
    fs.listdir("dup")
    fs.write("file.txt", b"x", W, offset=0)
    fs.write("new.txt", b"x")
    fs.truncate("file.txt", 0)
    fs.unlink("file.txt")
    fs.rmdir("emptydir")
    fs.mkdir("newdir")
    fs.rename("file.txt", "x")
    fs.link("file.txt", "x")
    fs.symlink("t", "x")
    fs.chmod("file.txt", 0o600)
    fs.chown("file.txt", 1, 1)
    fs.utime("file.txt", (OLD_TIME_NS, OLD_TIME_NS))
    fs.setxattr("file.txt", "user.x", b"1")
    fs.removexattr("xattr.txt", "user.foo")
    fs.mkfifo("f")
    fs.access("file.txt", os.W_OK)
    fs.access("file.txt", os.R_OK)
    fs.getxattr("xattr.txt", "user.foo")


@scenario()
def sc_long_session(fs: Session):
    """Many small steps on one name: each state must match the kernel's."""
    fs.write("cycle", b"1")
    fs.rename("cycle", "dir/cycle")
    fs.link("dir/cycle", "cycle")
    fs.unlink("dir/cycle")
    fs.mkdir("dir/cycle")
    fs.rename("dir/cycle", "dir/top_only.txt")
    fs.rename("dir/mid_only.txt", "cycle2")
    fs.rename("cycle2", "dir/mid_only.txt")
    fs.listdir("dir")
    fs.read("dir/mid_only.txt")
    fs.stat("dir/mid_only.txt")
    fs.truncate("cycle", 100)
    fs.stat("cycle")


def _listed_numbers_match(fs: Session, rel: str) -> None:
    """Each entry's d_ino in the listing of `rel` is the st_ino lstat shows: a cached listing must
    follow a copy-up that renumbers an entry."""
    def go():
        with os.scandir(fs.p(rel)) as it:
            listed = {e.name: e.inode() for e in it}
        return sorted(name for name, ino in listed.items() if ino != os.lstat(os.path.join(fs.p(rel), name)).st_ino)
    fs.do(f"entries of {rel or '.'} whose d_ino is not their st_ino", go)


def _dotdot_number_matches(fs: Session, rel: str) -> None:
    """The d_ino of ".." in the listing of `rel` is its parent's st_ino (read with getdents, which lists it)."""
    def go():
        fd = os.open(fs.p(rel), os.O_RDONLY | os.O_DIRECTORY)
        try:
            for name, ino in _getdents(fd):
                if name == "..":
                    return ino == os.lstat(os.path.dirname(fs.p(rel).rstrip("/"))).st_ino
        finally:
            os.close(fd)
        return None
    fs.do(f"'..' listed in {rel} is its parent", go)


def _getdents(fd: int):
    """(name, d_ino) of every entry of the open directory `fd`, "." and ".." included."""
    libc = ctypes.CDLL(None, use_errno=True)
    buf = ctypes.create_string_buffer(1 << 16)
    while True:
        n = libc.syscall(217, fd, buf, len(buf))  # getdents64 on x86-64
        if n < 0:
            raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))
        if n == 0:
            return
        pos = 0
        while pos < n:
            ino, _off, reclen = struct.unpack_from("QqH", buf.raw, pos)
            name = buf.raw[pos + 19:pos + reclen].split(b"\0", 1)[0]
            yield os.fsdecode(name), ino
            pos += reclen


@scenario(userxattr=True)
def sc_listing_after_change_through_other_path(fs: Session):
    """A listing read, then its directory changed through another path to it (a renamed parent,
    a rename from another directory), then read again at once: the kernel's cached listing goes."""
    fs.mkdir("p")
    fs.mkdir("p/q")
    fs.write("p/q/f", b"f")
    fs.listdir("p/q")
    fs.rename("p", "p2")  # the same directory, now reached by another path
    fs.write("p2/q/g", b"g")
    fs.listdir("p2/q")
    fs.unlink("p2/q/f")
    fs.scandir("p2/q")
    fs.listdir("dup")
    fs.rename("dir/shared.txt", "dup/shared.txt")  # a file from another, merged, directory
    fs.listdir("dup")
    fs.listdir("dir")
    fs.rename("p2/q/g", "dup/y")  # over a lower file
    fs.scandir("dup")
    fs.scandir("p2/q")
    fs.rename("p2/q", "dir/q")  # a directory to another parent: its ".." is another directory now
    _dotdot_number_matches(fs, "dir/q")
    fs.listdir("dir")
    fs.listdir("p2")


@scenario(userxattr=True)
def sc_listing_after_rmdir_mkdir(fs: Session):
    """List a merged directory, empty it, remove it and make it again: each listing read right
    after the change shows the change; the new directory is empty (opaque)."""
    fs.listdir("dirsub/inner")
    for name in ("l0.txt", "l1.txt", "l2.txt"):
        fs.unlink(f"dirsub/inner/{name}")
        fs.listdir("dirsub/inner")
    fs.rmdir("dirsub/inner")
    fs.listdir("dirsub")
    fs.mkdir("dirsub/inner")
    fs.listdir("dirsub/inner")
    fs.scandir("dirsub")
    fs.write("dirsub/inner/l1.txt", b"new")
    fs.listdir("dirsub/inner")
    fs.listdir("emptydir")
    fs.rmdir("emptydir")
    fs.mkdir("emptydir")
    fs.scandir("emptydir")
    fs.scandir("")


@scenario(userxattr=True)
def sc_listing_while_children_copied_up(fs: Session):
    """A listing cached, then entries in it copied up (a child directory, a lower hard link that
    copy-up renumbers): listed again at once, names, types and numbers are those stat shows."""
    fs.scandir("deep/a")
    _listed_numbers_match(fs, "deep/a")
    fs.chmod("deep/a/b", 0o755)  # copies deep, deep/a and deep/a/b up
    fs.scandir("deep/a")
    _listed_numbers_match(fs, "deep/a")
    fs.write("deep/a/b/c/new", b"new")
    fs.scandir("deep/a/b/c")
    _listed_numbers_match(fs, "deep/a/b/c")
    fs.scandir("")
    _listed_numbers_match(fs, "")
    fs.write("hl1", b"HL", W, offset=0)  # copies a lower hard link up
    fs.scandir("")
    _listed_numbers_match(fs, "")
    fs.chmod("dir/shared.txt", 0o600)
    _listed_numbers_match(fs, "dir")


# ---------------------------------------------------------------------------
# crafted redirect xattrs in the lower layers

CRAFTED_REDIRECTS = STD.with_entries(
    (Dir("t_chain", xattrs=(("overlay.redirect", b"/r_abs"),)),  # -> l1/r_abs, which redirects again -> l2/d2
     File("t_chain/own0", b"l0's own\n")),
    [entry for d, value in [("r_abs", b"/d2"), ("r_etc", b"/etc"), ("r_rel", b"d2"), ("r_nested", b"/sub/d3"),
                            ("r_missing", b"/nothere"), ("r_bad", b"a/b"), ("r_empty", b"")]
     for entry in (Dir(d, xattrs=(("overlay.redirect", value),)),
                   File(f"{d}/own", b"own entry of l1/" + d.encode() + b"\n"))]
    + [File("f_redir", b"a file with a redirect\n",
            xattrs=(("overlay.redirect", b"/d2"),))],  # not a directory: ignored (metacopy=off or not)
    (File("d2/in_d2", b"in l2/d2\n"), File("sub/d3/in_d3", b"in l2/sub/d3\n"),
     Dir("b_abs", xattrs=(("overlay.redirect", b"/d2"),)),  # bottom layer: ignored in every mode
     File("b_abs/ownb", b"bottom\n")),
)
"""Lower directories carrying redirect xattrs nobody made through a mount (``overlay.redirect`` is
written in the mode's flavour: trusted.overlay.redirect, or user.overlay.redirect with userxattr).

An absolute redirect is resolved from the root *of the overlay's lower layers*, never of
the host: "/etc" finds nothing (no layer has /etc) and the directory shows only its own
entries.  A redirect in the bottom layer is never read.  A relative one is a sibling name.
"""


@scenario(layers=CRAFTED_REDIRECTS, userxattr=True, redirects=True)
def sc_crafted_redirects(fs: Session):
    """Kernel 6.18 (redirect_always_follow=Y, so redirect_dir=off means "follow"):

    redirect_off / redirect_on / metacopy (follow):
      r_abs, r_rel -> {in_d2, own}; r_nested -> {in_d3, own}; r_etc, r_missing -> {own};
      t_chain -> {in_d2, own0} (chains are followed); b_abs -> {ownb}; f_redir plain file;
      r_bad ("a/b") and r_empty ("") -> EINVAL on lookup (dmesg "overlayfs: invalid redirect (a/b)",
      "invalid redirect ((null))"), the names still listed in the parent.
    userxattr (implies redirect_dir=nofollow): every valid redirect in a non-bottom layer -> EPERM on
      lookup (dmesg "overlayfs: refusing to follow redirect for (/r_abs)"); r_bad, r_empty -> EINVAL;
      b_abs and f_redir as above.
    On a kernel with redirect_always_follow=N, redirect_off behaves as userxattr does here (EPERM).
    """
    dirs = ("r_abs", "r_etc", "r_rel", "r_nested", "r_missing", "r_bad", "r_empty", "t_chain", "b_abs")
    fs.listdir("")
    for d in dirs:
        fs.stat(d)
        fs.listdir(d)
    fs.read("r_abs/in_d2")
    fs.read("t_chain/in_d2")
    fs.read("r_etc/own")
    fs.stat("r_etc/passwd")  # never the host's /etc
    fs.read("f_redir")
    fs.listxattr("r_abs")  # the redirect xattr itself is private
    fs.getxattr("r_abs", "trusted.overlay.redirect")
    # changes inside a redirected directory: copy-up (the upper copy gets no redirect xattr), whiteout
    fs.write("r_abs/new", b"new\n")
    fs.unlink("r_abs/in_d2")
    fs.listdir("r_abs")
    fs.listdir("d2")  # the redirect target itself is untouched
    fs.write("r_bad/x", b"x")
    fs.rmdir("r_etc")  # ENOTEMPTY when followed (own), EPERM when refused
    fs.remount()
    fs.listdir("r_abs")
    fs.listdir("t_chain")
    fs.stat("r_abs/new")


# ---------------------------------------------------------------------------
# renaming one name of a hard-linked file onto another name of the same file

@scenario(layers=LOWER_LINKS, userxattr=True, also=INDEX_METACOPY)
def sc_rename_hardlink_onto_itself(fs: Session):
    """POSIX: rename(a, b) when a and b are the same file does nothing and succeeds.

    Kernel, every mode: upper pair (made through the mount) -> both renames succeed, both names
    stay, d has nlink 2, after unlinking top_b nlink 1.  Lower pair: the first rename copies up
    (breaks the lower link, index=off), so the second is an ordinary replace: d disappears,
    top_b has nlink 1, the upper holds whiteouts for a and d. (A FUSE daemon that keeps its own
    record of which names share an inode must not take the no-op for a move.)
    """
    # upper hard links
    fs.write("d", b"x\n")
    fs.link("d", "a")
    fs.rename("a", "top_b")
    fs.stat("d")
    fs.stat("top_b")
    fs.rename("d", "top_b")  # same inode: no-op
    fs.unlink("top_b")
    fs.stat("d")  # one link left, at once
    fs.listdir("")
    fs.read("d")
    # same, names in two directories, and renameat2 flags on the same file
    fs.link("d", "dir/d2")
    fs.rename("dir/d2", "d")
    fs.listdir("dir")
    fs.stat("d")
    fs.do("noreplace onto same file", _renameat2, fs.p("d"), fs.p("dir/d2"), 1)
    fs.do("exchange same-file names", _renameat2, fs.p("d"), fs.p("dir/d2"), 2)
    fs.stat("dir/d2")
    # a lower file hard-linked through the mount (copied up first)
    fs.link("base.txt", "base2")
    fs.rename("base2", "base.txt")
    fs.stat("base.txt")
    fs.stat("base2")
    # lower pair, never copied up (hl1/hl2 in l0)
    fs.rename("hl2", "top_c")
    fs.stat("hl1")
    fs.stat("top_c")
    fs.rename("hl1", "top_c")
    fs.listdir("")
    fs.stat("top_c")
    fs.unlink("top_c")
    fs.stat("hl1")
    # lower triple with one name copied up first
    fs.chmod("hl/one", 0o600)
    fs.rename("hl/two", "hl/top")
    fs.rename("hl/one", "hl/top")
    fs.rename("hl/three", "hl/three")
    fs.listdir("hl")
    for rel in ("hl/top", "hl/three"):
        fs.stat(rel)
    fs.remount()
    fs.listdir("hl")
    fs.stat("d")


# ---------------------------------------------------------------------------
# which of S_ISUID / S_ISGID a non-owner's write, O_TRUNC and truncate clear

SETID_FILES = [("s6777", 0o6777, 0), ("s6767", 0o6767, 0), ("s2767", 0o2767, 0),
               ("g6767", 0o6767, USER), ("g2767", 0o2767, USER), ("s4777", 0o4777, 0)]
SETID = STD.with_entries([Dir("setid", mode=0o777)] + [
    File(f"setid/{name}_{op}", b"data", mode=mode, owner=(0, gid)) for name, mode, gid in SETID_FILES
    for op in ("trunc", "write", "write0", "truncate", "ftruncate", "open")])


def _setid_ops(u: Session, prefix: str):
    for name in ("s6777", "s6767", "s2767", "g6767", "g2767", "s4777"):
        base = f"{prefix}{name}"
        fd = u.open(f"{base}_trunc", W | TRUNC)
        u.close(fd)
        u.write(f"{base}_write", b"Z", W, offset=0)
        u.write(f"{base}_write0", b"", W, offset=0)
        u.truncate(f"{base}_truncate", 1)
        fd = u.open(f"{base}_ftruncate", W)
        if fd is not None:
            u.do(f"ftruncate {base}", os.ftruncate, fd, 2)
        u.close(fd)
        fd = u.open(f"{base}_open", W)  # opening for writing alone clears nothing
        u.close(fd)


@scenario(layers=SETID, allow_other=True)
def sc_setid_cleared_by_unprivileged_writes(fs: Session):
    """Kernel (6.18, setattr_should_drop_sgid rules), caller uid/gid 1000 not in group 0:

    open(O_TRUNC), write() of >= 1 byte, truncate(), ftruncate(): S_ISUID always cleared;
    S_ISGID cleared when group-exec is set OR the caller is not in the file's group (and lacks
    CAP_FSETID): 06767 root:root -> 0767, 02767 root:root -> 0767, but 06767 root:USER -> 02767 and
    02767 root:USER -> 02767.  A zero-length write and a plain open(O_WRONLY) clear nothing.
    Same for lower files (copied up) and upper files, in every mode. Through FUSE the kernel does
    not do this for an open with O_TRUNC, nor the not-in-group case of a write: the daemon must.
    """
    # upper copies, made by root
    for name, mode, gid in [("s6777", 0o6777, 0), ("s6767", 0o6767, 0), ("s2767", 0o2767, 0),
                            ("g6767", 0o6767, USER), ("g2767", 0o2767, USER), ("s4777", 0o4777, 0)]:
        for op in ("trunc", "write", "write0", "truncate", "ftruncate", "open"):
            rel = f"setid/up_{name}_{op}"
            fs.write(rel, b"data", mode=0o600)
            fs.chown(rel, 0, gid)
            fs.chmod(rel, mode)
    fs.as_user(USER, USER, lambda u: (_setid_ops(u, "setid/"), _setid_ops(u, "setid/up_")))
    for name in sorted(os.listdir(fs.p("setid"))):
        fs.stat(f"setid/{name}")
    # root (CAP_FSETID) clears nothing
    fd = fs.open("suid.bin", W | TRUNC)
    fs.close(fd)
    fs.write("sgid.bin", b"root", W, offset=0)
    fs.stat("suid.bin")
    fs.stat("sgid.bin")


# ---------------------------------------------------------------------------
# listxattr / getxattr of trusted.* by an unprivileged caller

TRUSTED_XATTRS = STD.with_entries(
    (File("tx.txt", b"trusted and user xattrs\n", xattrs=(
        ("trusted.t1", b"T"), ("user.u1", b"U"),
        # private in one flavour, ordinary in the other: trusted.overlay.foo is hidden from
        # everybody without userxattr, listed to root only with it; user.overlay.foo the reverse
        ("trusted.overlay.foo", b"F"), ("user.overlay.foo", b"F"))),),
    (Dir("txdir", xattrs=(("trusted.t2", b"T2"), ("user.u2", b"U2"))), File("txdir/f", b"f\n")),
)


def _trusted_user_ops(u: Session):
    for rel in ("tx.txt", "txdir", "opq"):
        u.listxattr(rel)
    u.getxattr("tx.txt", "trusted.t1")  # ENODATA (not EPERM)
    u.getxattr("tx.txt", "user.u1")
    u.getxattr("txdir", "trusted.t2")
    u.getxattr("opq", "trusted.overlay.opaque")
    u.getxattr("opq", "user.overlay.opaque")
    u.getxattr("tx.txt", "user.overlay.foo")
    u.setxattr("tx.txt", "trusted.byuser", b"x")  # EPERM
    u.removexattr("tx.txt", "trusted.t1")  # EPERM


@scenario(layers=TRUSTED_XATTRS, userxattr=True, allow_other=True)
def sc_trusted_xattrs_hidden_from_users(fs: Session):
    """Kernel: listxattr lists trusted.* only to a caller with CAP_SYS_ADMIN (ovl_can_list), never
    trusted.overlay.* (or user.overlay.* with userxattr; with userxattr the trusted.overlay.* names
    are ordinary trusted names: root sees them, users do not).  getxattr of trusted.* by a user
    gives ENODATA, setxattr/removexattr EPERM.  Same before and after copy-up.
    """
    fs.as_user(USER, USER, _trusted_user_ops)
    fs.listxattr("tx.txt")
    fs.listxattr("opq")
    fs.chmod("tx.txt", 0o644)  # copy-up
    fs.chmod("txdir", 0o755)
    fs.chmod("opq", 0o755)
    fs.as_user(USER, USER, _trusted_user_ops)
    fs.listxattr("tx.txt")
    fs.listxattr("txdir")


# ---------------------------------------------------------------------------
# O_DIRECT

def odirect_pwrite(fs: Session, rel: str, fill: bytes, size: int, offset: int, flags: int = W,
                   aligned: bool = True):
    """pwrite through an O_DIRECT descriptor from a page-aligned buffer (or a plain bytes one)."""
    def go():
        fd = os.open(fs.p(rel), flags | os.O_DIRECT, 0o644)
        try:
            if not aligned:
                return os.pwrite(fd, fill * size, offset)
            assert size % mmap.PAGESIZE == 0, "aligned O_DIRECT I/O needs whole pages"
            buf = mmap.mmap(-1, size)  # page-aligned memory
            try:
                buf.write(fill * size)
                return os.pwritev(fd, [buf], offset)
            finally:
                buf.close()
        finally:
            os.close(fd)
    return fs.do(f"O_DIRECT pwrite {rel} {size}@{offset} aligned={aligned}", go)


def odirect_pread(fs: Session, rel: str, size: int, offset: int):
    def go():
        fd = os.open(fs.p(rel), RD | os.O_DIRECT)
        try:
            assert size % mmap.PAGESIZE == 0, "aligned O_DIRECT I/O needs whole pages"
            buf = mmap.mmap(-1, size)
            try:
                n = os.preadv(fd, [buf], offset)
                return bytes(buf[:n])
            finally:
                buf.close()
        finally:
            os.close(fd)
    return fs.do(f"O_DIRECT pread {rel} {size}@{offset}", go)


@scenario()
def sc_odirect(fs: Session):
    """Kernel over ext4 (upper on /tmp): O_DIRECT opens and aligned I/O work, copy-up included:
    `dd if=/dev/zero of=m/existing bs=4096 count=1 conv=notrunc oflag=direct` succeeds and leaves
    the rest of the file.  Unaligned O_DIRECT writes fail with EINVAL (the upper fs's rule; tmpfs
    accepts O_DIRECT since 6.6).  O_DIRECT reads of a short lower file return the short count.
    The unaligned write is a known difference (KNOWN_DIFFERENCES).
    """
    odirect_pwrite(fs, "big.bin", b"\0", 4096, 0)  # the dd above, on a lower file: copy-up
    fs.stat("big.bin")
    fs.digest("big.bin")
    odirect_pwrite(fs, "big.bin", b"B", 8192, 4096)
    fs.read("big.bin", 8, 4092)
    odirect_pread(fs, "file.txt", 4096, 0)  # lower, short file
    odirect_pread(fs, "big.bin", 4096, 4096)
    odirect_pwrite(fs, "file.txt", b"C", 4096, 4096)  # past EOF of a lower file
    fs.stat("file.txt")
    fs.read("file.txt", 16, 0)
    fs.write("unaligned.bin", b"scratch")
    odirect_pwrite(fs, "unaligned.bin", b"x", 100, 1, aligned=False)  # EINVAL (ext4): a known difference
    fs.unlink("unaligned.bin")
    odirect_pwrite(fs, "new.bin", b"N", 4096, 0, flags=W | CREAT)
    fs.stat("new.bin")

    def set_direct_then_write():
        import fcntl
        fd = os.open(fs.p("exec.sh"), RW)
        try:
            fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) | os.O_DIRECT)
            buf = mmap.mmap(-1, 4096)
            try:
                buf.write(b"F" * 4096)
                return os.pwritev(fd, [buf], 0)
            finally:
                buf.close()
        finally:
            os.close(fd)
    fs.do("fcntl O_DIRECT then write", set_direct_then_write)
    fs.digest("exec.sh")


# ---------------------------------------------------------------------------
# very deep trees, and paths longer than PATH_MAX (only reachable with dir fds)

DEEP = 300  # levels made through the mount (the engine tests go to 1,050 in-process)
LOWER_DEEP = 200  # levels of a lower tree: snapshots and rmtree of the layers recurse
LONG_NAMES = [f"n{i:02d}" + "x" * 247 for i in range(20)]  # 20 x 250 bytes: 5,000+ bytes of path


def _mkdirs_at(root: str, names, mode: int = 0o755) -> int:
    """mkdir every level below *root* through dir fds; return a dir fd of the last one."""
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for n in names:
            try:
                os.mkdir(n, mode, dir_fd=fd)
            except FileExistsError:
                pass
            nfd = os.open(n, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
            os.close(fd)
            fd = nfd
        return fd
    except BaseException:
        os.close(fd)
        raise


def _walk_to(root: str, names) -> int:
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for n in names:
            nfd = os.open(n, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
            os.close(fd)
            fd = nfd
        return fd
    except BaseException:
        os.close(fd)
        raise


def _rm_tree_at(root: str, name: str) -> int:
    """rm -rf root/name with two fds at most (".." to climb): no recursion, no path length limit.
    Returns the number of objects removed."""
    removed = 0
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    stack = []
    try:
        nfd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
        os.close(fd)
        fd = nfd
        stack.append(name)
        while stack:
            sub = None
            for e in sorted(os.listdir(fd)):
                if stat.S_ISDIR(os.stat(e, dir_fd=fd, follow_symlinks=False).st_mode):
                    sub = e
                    break
                os.unlink(e, dir_fd=fd)
                removed += 1
            if sub is not None:
                nfd = os.open(sub, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
                os.close(fd)
                fd = nfd
                stack.append(sub)
            else:
                pfd = os.open("..", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
                os.close(fd)
                fd = pfd
                os.rmdir(stack.pop(), dir_fd=fd)
                removed += 1
        return removed
    finally:
        os.close(fd)


def fs_mkdirs_at(fs: Session, names, label: str):
    return fs.do(f"mkdirs {label}", lambda: os.close(_mkdirs_at(fs.root, names)) or len(names))


def fs_at(fs: Session, names, label: str, fn):
    """Run fn(dirfd) in the directory reached through *names* (one dir fd per level)."""
    def go():
        fd = _walk_to(fs.root, names)
        try:
            return fn(fd)
        finally:
            os.close(fd)
    return fs.do(label, go)


def fs_rm_tree(fs: Session, name: str):
    return fs.do(f"rm -rf {name[:20]}", _rm_tree_at, fs.root, name)


def _append_at(fd, name: str, data: bytes):
    f = os.open(name, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644, dir_fd=fd)
    try:
        os.write(f, data)
    finally:
        os.close(f)
    f = os.open(name, os.O_RDONLY, dir_fd=fd)
    try:
        return os.read(f, 1000)
    finally:
        os.close(f)


def _read_at(fd, name: str):
    f = os.open(name, os.O_RDONLY, dir_fd=fd)
    try:
        return os.read(f, 1000)
    finally:
        os.close(f)


def _stat_at(fd, name: str):
    return describe_stat(os.stat(name, dir_fd=fd, follow_symlinks=False))


DEEP_LOWER = STD.with_entries((), (File("/".join(["L"] * LOWER_DEEP) + "/f", b"lower deep\n"),))


LONG_LOWER = STD.with_entries((), (File("/".join(LONG_NAMES) + "/leaf", b"lower long\n"),))
"""A lower tree whose full path passes PATH_MAX (written through dir fds)."""


@scenario(layers=DEEP_LOWER, verity=False)
def sc_deep_tree_through_mount(fs: Session):
    """Kernel, every mode: DEEP levels of d/ created through the mount, appended to at the bottom
    (by full path and through dir fds) and removed; a LOWER_DEEP-level lower tree copied up at the
    bottom and removed.  All succeed (the kernel manages 1,000 levels as well)."""
    deep = ["d"] * DEEP
    fs_mkdirs_at(fs, deep, f"{DEEP} x d")
    def append_full_path():  # a 2,000-byte path: still under PATH_MAX
        fd = os.open(fs.p("/".join(deep) + "/file"), W | CREAT | APPEND, 0o644)
        try:
            return os.write(fd, b"x\n")
        finally:
            os.close(fd)
    fs.do("append at bottom by full path", append_full_path)
    fs_at(fs, deep, "append at bottom via dir fds", lambda fd: _append_at(fd, "file", b"y\n"))
    fs_at(fs, deep[:-1], "stat bottom dir", lambda fd: _stat_at(fd, "d")["type"])
    lower = ["L"] * LOWER_DEEP
    fs_at(fs, lower, "read lower bottom", lambda fd: _read_at(fd, "f"))
    fs_at(fs, lower, "append lower bottom (copies up 500 dirs)", lambda fd: _append_at(fd, "f", b"more\n"))
    fs_at(fs, lower[:-1], "mode of a copied-up parent", lambda fd: _stat_at(fd, "L")["mode"])
    fs_rm_tree(fs, "d")
    fs_rm_tree(fs, "L")
    fs.listdir("")


@scenario(layers=LONG_LOWER, verity=False)
def sc_path_longer_than_path_max(fs: Session):
    """Kernel, every mode: a merged path of 20 x 250-byte names (> 4096 bytes) can be created,
    stat-ed, appended to, copied up and deleted through dir fds; the full path gives ENAMETOOLONG
    (from the VFS, before overlayfs sees it).  getcwd() inside it works (returns 5,000+ bytes).
    """
    names = [f"c{i:02d}" + "y" * 247 for i in range(20)]
    fs_mkdirs_at(fs, names, "20 x 250-byte dirs")
    fs_at(fs, names, "create leaf", lambda fd: _append_at(fd, "leaf", b"leaf\n"))
    fs_at(fs, names, "stat leaf", lambda fd: _stat_at(fd, "leaf"))
    fs.do("stat by full path", lambda: describe_stat(os.stat(fs.p("/".join(names) + "/leaf"))))
    fs_at(fs, names, "append leaf", lambda fd: _append_at(fd, "leaf", b"more\n"))
    fs_at(fs, names, "listdir bottom", lambda fd: sorted(os.listdir(fd)))
    fs_at(fs, LONG_NAMES, "stat lower leaf", lambda fd: _stat_at(fd, "leaf"))
    fs_at(fs, LONG_NAMES, "append lower leaf (copy-up)", lambda fd: _append_at(fd, "leaf", b"more\n"))
    fs_at(fs, LONG_NAMES, "rename lower leaf", lambda fd: os.rename("leaf", "leaf2", src_dir_fd=fd, dst_dir_fd=fd))
    fs_at(fs, LONG_NAMES, "listdir lower bottom", lambda fd: sorted(os.listdir(fd)))

    def getcwd_len(fd):
        old = os.open(".", os.O_RDONLY)
        try:
            os.fchdir(fd)
            return len(os.getcwd()) - len(fs.root)
        finally:
            os.fchdir(old)
            os.close(old)
    fs_at(fs, names, "getcwd inside", getcwd_len)
    fs_rm_tree(fs, names[0])
    fs_rm_tree(fs, LONG_NAMES[0])
    fs.listdir("")


# ---------------------------------------------------------------------------
# running them (the harness: cowfs.testing.harness)

# the kernel is always the reference; FUSE is needed only when the tested side is cowfs
MOUNT_MARKS = [pytest.mark.kernel] + ([pytest.mark.fuse] if BACKEND == "cowfs" else [])
KNOWN_FAILING = failing_scenarios()  # whole scenarios cowfs cannot pass, as strict xfails
CASES = [pytest.param(name, mode, id=f"{name}-{mode}", marks=MOUNT_MARKS + (
             [pytest.mark.xfail(strict=True, reason=KNOWN_FAILING[name])]
             if name in KNOWN_FAILING and BACKEND == "cowfs" else []))
         for name, sc in SCENARIOS.items() for mode in sc.modes]


def test_enough_scenarios():
    assert len(SCENARIOS) >= 45, f"only {len(SCENARIOS)} scenarios"
    assert VERITY_ON_SCENARIOS <= set(SCENARIOS), VERITY_ON_SCENARIOS - set(SCENARIOS)


@pytest.mark.parametrize("name,mode", CASES)
def test_differential(name, mode, shared_tmp):
    sc = SCENARIOS[name]
    lowers = materialise(sc.layers, shared_tmp, userxattr=MODES[mode].userxattr)
    pair = Pair(shared_tmp, lowers, mode, BACKEND, readonly=sc.readonly,
                cowfs_options=["allow_other"] if sc.allow_other else [])
    problems, ref_out = compare_scenario(pair, sc.ops, name=name, timeout=SCENARIO_TIMEOUT)
    assert not problems, f"scenario {name} [{mode}]:\n" + "\n\n".join(problems)
    assert ref_out, "the scenario recorded no outcomes"


# ---------------------------------------------------------------------------
# the harness checks itself (plain directories, no mounts)

def test_snapshot_sees_what_matters(tmp_path):
    materialise_layer(Layer(
        File("f", b"data", mode=0o640, owner=(USER, USER), xattrs=(("user.k", b"v"),)),
        HardLink("g", to="f"),
        Symlink("s", "sub"),
        Dir("sub", mode=0o711),
        File("sub/inner", b"x"),
    ), tmp_path)
    before = snapshot(tmp_path)
    assert before["hardlinks"] == [["f", "g"]]
    assert before["entries"]["s"]["target"] == "sub"
    assert "s/inner" not in before["entries"]  # symlinks are not followed
    assert "size" not in before["entries"]["sub"]
    assert before["entries"]["f"]["xattrs"] == {"user.k": b"v"}
    assert before["entries"]["f"]["nlink"] == 2
    assert snapshot(tmp_path) == before and diff_snapshots(before, snapshot(tmp_path)) == ""

    os.setxattr(tmp_path / "f", "user.k", b"w")
    os.chmod(tmp_path / "sub", 0o755)
    os.unlink(tmp_path / "g")
    materialise_layer(Layer(File("g", b"data")), tmp_path)
    after = snapshot(tmp_path)
    report = diff_snapshots(before, after, "old", "new")
    assert "f: xattrs:" in report
    assert "sub: mode: old='0711' new='0755'" in report
    assert "hard-link groups" in report


def test_session_records_values_and_errno_names(tmp_path):
    fs = Session(str(tmp_path), None, False)
    fs.write("a", b"abc")
    fs.read("a")
    fs.rmdir("a")
    fs.unlink("missing")
    fs.check("flag", True)
    assert fs.outcomes == [
        ("write a flags=1101 off=None 3B", 3),
        ("read a[0:-1]", b"abc"),
        ("rmdir a", ("errno", "ENOTDIR")),
        ("unlink missing", ("errno", "ENOENT")),
        ("flag", True),
    ]
    report = diff_outcomes(fs.outcomes, fs.outcomes[:2] + [("rmdir a", None)], "k", "c")
    assert "#2 rmdir a: k=('errno', 'ENOTDIR')  c=None" in report and "#3" in report
