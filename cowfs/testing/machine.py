"""The parity state machine: its rules run the same operations on kernel overlayfs and on cowfs, step by step.

``parity_machine(mode)`` returns a ``RuleBasedStateMachine`` class.  Each
example draws a layer stack (``cowfs.testing.strategies.stacks``), writes it
once (``cowfs.testing.layers.materialise``), and mounts the *same* lower
layers twice, kernel and cowfs, each with its own upper and work directory
(``cowfs.testing.harness.Pair``).  Every rule then performs one operation
(writing and copy-up, deleting and creating, renaming and linking, reading)
on both mounts and checks that

* the outcome is the same: the return value, or the errno name;
* the whole merged tree is the same (``cowfs.testing.tree.snapshot``: type,
  mode, owner, size, content, link target, user xattrs, link count, times
  set on purpose, and which names are hard links of each other);
* the lower layers did not change at all.

At the end (``teardown``, which always unmounts, whatever happened) both are
unmounted, and cowfs's upper is mounted by the kernel and the kernel's upper
by cowfs: each must show the tree its writer showed.

Operations run in a helper process that is ``chroot``-ed into the mount
(``cowfs.testing.worker``), so symlinks in the layers (absolute ones, or
``../../..`` pointing out of the stack) resolve inside the merged view and
never touch the host.

A failing example prints as pasteable Python (``state = RedirectOff()``,
``state.init_stack(stack=StackSpec(...))``, ``state.rename(src='a', dst='b')``
..., ``state.teardown()``); to replay it in a regression test, create the
class under the printed name with ``parity_machine`` and wrap the steps in
``try: ... finally: state.teardown()``.

Known differences from the kernel are kept out by name, not by loosening
comparisons (``cowfs.testing.harness.KNOWN_DIFFERENCES``): the machine
excuses those in its ``known_differences`` (``small_holes``), draws no stack
with whiteouts in unmerged lower directories (``unmerged_whiteouts``), and
its ``fstat`` records no link count (``fstat_nlink``); each that shows has a
strict-xfail regression test in tests/test_parity.py.
"""

from __future__ import annotations

import fcntl
import os
import struct
import tempfile

from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from cowfs.overlay.fileattr import FS_APPEND_FL, FS_IMMUTABLE_FL, FS_IOC_SETFLAGS, FS_NOATIME_FL, FS_SYNC_FL, real_flags
from cowfs.overlay.syscalls import (
    FALLOC_FL_KEEP_SIZE,
    FALLOC_FL_PUNCH_HOLE,
    FALLOC_FL_ZERO_RANGE,
    RENAME_EXCHANGE,
    RENAME_NOREPLACE,
    fallocate,
    rename2,
)
from cowfs.testing import strategies as S
from cowfs.testing.harness import (
    BACKENDS,
    MODES,
    PARITY,
    Divergence,
    Mode,
    Pair,
    Side,
    cleanup_base,
    excuse_tree,
    excuse_value,
    excused,
    upper_snapshot,
)
from cowfs.testing.layers import materialise
from cowfs.testing.outcomes import is_errno, show
from cowfs.testing.tree import describe_stat, diff_snapshots, snapshot
from cowfs.testing.worker import Ops

OP_TIMEOUT = float(os.environ.get("COWFS_PARITY_OP_TIMEOUT", "20"))  # seconds for one operation

CLASS_NAMES = {
    "redirect_off": "RedirectOff", "redirect_on": "RedirectOn", "userxattr": "UserXattr",
    "metacopy": "Metacopy", "many_layers": "ManyLayers", "many_layers_off": "ManyLayersOff",
    "redirect_follow": "RedirectFollow", "redirect_nofollow": "RedirectNofollow",
}


# --------------------------------------------------------------------------
# the values rules draw (all print as plain Python literals)

def _paths():
    one = list(S.NAMES)
    two = [f"{a}/{b}" for a in S.NAMES for b in S.NAMES]
    three = [f"{p}/{c}" for p in two for c in S.NAMES]
    return one, two, three


_ONE, _TWO, _THREE = _paths()
paths = st.one_of(st.sampled_from(_ONE), st.sampled_from(_TWO), st.sampled_from(_THREE))

OPEN_FLAGS = {
    "r": os.O_RDONLY,
    "w": os.O_WRONLY,
    "rw": os.O_RDWR,
    "creat": os.O_WRONLY | os.O_CREAT,
    "trunc": os.O_WRONLY | os.O_CREAT | os.O_TRUNC,
    "excl": os.O_WRONLY | os.O_CREAT | os.O_EXCL,
    "append": os.O_WRONLY | os.O_APPEND | os.O_CREAT,
    "rw_append": os.O_RDWR | os.O_APPEND,
    "rw_trunc": os.O_RDWR | os.O_TRUNC,
    "r_trunc": os.O_RDONLY | os.O_TRUNC,
}
WRITE_HOW = ("w", "rw", "creat", "trunc", "excl", "append", "rw_append", "rw_trunc")
write_data = st.sampled_from((b"W", b"written\n", b"", S.Pattern(6000)))
offsets = st.sampled_from((None, 0, 1, 5, 4096, 70_000))
lengths = st.sampled_from((0, 1, 5, 4096, 100_000))
file_modes = st.sampled_from(S.FILE_MODES)
dir_modes = st.sampled_from(S.DIR_MODES)
owners = st.sampled_from(S.OWNERS)
TIMES_NS = (1_200_000_000 * 10**9 + 123_456_789, 1_300_000_000 * 10**9)
XATTR_NAMES = ("user.a", "user.b", "user.new", "trusted.t", "trusted.overlay.opaque", "user.overlay.opaque",
               "trusted.overlay.x")
xattr_names = st.sampled_from(XATTR_NAMES)
xattr_values = st.sampled_from((b"v", b"", b"y", b"longer value"))
XATTR_FLAGS = {"any": 0, "create": os.XATTR_CREATE, "replace": os.XATTR_REPLACE}
NODE_KINDS = {"chr": 0o020000, "blk": 0o060000, "sock": 0o140000}  # stat.S_IFCHR, S_IFBLK, S_IFSOCK
fd_slots = st.integers(0, 3)


# --------------------------------------------------------------------------
# the operations, as the helper chroot-ed into each mount performs them

def operations() -> Ops:
    """The operations the rules run, by name (built in the helper, after its chroot)."""
    fds: dict[int, int] = {}

    def p(rel):
        return "/" + rel

    def write(path, how, offset, data):
        fd = os.open(p(path), OPEN_FLAGS[how] | os.O_NONBLOCK, 0o644)  # a FIFO: ENXIO, never a hang
        try:
            return os.write(fd, data) if offset is None else os.pwrite(fd, data, offset)
        finally:
            os.close(fd)

    def read(path):
        fd = os.open(p(path), os.O_RDONLY | os.O_NONBLOCK)
        try:
            return os.read(fd, 1 << 16)[:300]
        finally:
            os.close(fd)

    def open_fd(slot, path, how):
        fds[slot] = os.open(p(path), OPEN_FLAGS[how] | os.O_NONBLOCK, 0o644)
        return True

    def fstat(slot):  # no link count: KNOWN_DIFFERENCES["fstat_nlink"]
        info = describe_stat(os.fstat(fds[slot]))
        return {k: info[k] for k in ("type", "mode", "uid", "gid", "size") if k in info}

    def close(slot):
        os.close(fds.pop(slot))
        return True

    def xattr_flags(flags):
        return XATTR_FLAGS[flags]

    return {
        "write": write,
        "read": read,
        "truncate": lambda path, length: os.truncate(p(path), length),
        "unlink": lambda path: os.unlink(p(path)),
        "rmdir": lambda path: os.rmdir(p(path)),
        "mkdir": lambda path, mode: os.mkdir(p(path), mode),
        "mkfifo": lambda path, mode: os.mkfifo(p(path), mode),
        "mknod": lambda path, kind, numbers, mode: os.mknod(p(path), NODE_KINDS[kind] | mode, os.makedev(*numbers)),
        "rename": lambda src, dst: os.rename(p(src), p(dst)),
        "rename2": lambda src, dst, flags: rename2(p(src), p(dst), flags),
        "link": lambda src, dst: os.link(p(src), p(dst), follow_symlinks=False),
        "symlink": lambda target, path: os.symlink(target, p(path)),
        "chmod": lambda path, mode: os.chmod(p(path), mode),
        "chown": lambda path, owner, follow: os.chown(p(path), *owner, follow_symlinks=follow),
        "utime": lambda path, ns, follow: os.utime(p(path), ns=(ns, ns), follow_symlinks=follow),
        "setxattr": lambda path, name, value, flags: os.setxattr(p(path), name, value, xattr_flags(flags),
                                                               follow_symlinks=False),
        "removexattr": lambda path, name: os.removexattr(p(path), name, follow_symlinks=False),
        "getxattr": lambda path, name: os.getxattr(p(path), name, follow_symlinks=False),
        "listxattr": lambda path: sorted(os.listxattr(p(path), follow_symlinks=False)),
        "stat": lambda path: describe_stat(os.stat(p(path))),
        "listdir": lambda path: sorted(os.listdir(p(path))),
        "open_fd": open_fd,
        "pread": lambda slot, size, offset: os.pread(fds[slot], size, offset),
        "pwrite": lambda slot, data, offset: os.pwrite(fds[slot], data, offset),
        "fstat": fstat,
        "close": close,
        **_file_operations(p, fds),
    }


# fallocate modes and chattr flags the rules draw (the fsx test in tests/test_fileops.py draws more sequences)
FALLOCATE_MODES = (0, FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, FALLOC_FL_ZERO_RANGE,
                   FALLOC_FL_PUNCH_HOLE)  # the last: EOPNOTSUPP, a hole needs KEEP_SIZE
CHATTR_FLAGS = (0, FS_IMMUTABLE_FL, FS_APPEND_FL, FS_NOATIME_FL, FS_SYNC_FL, 0x40)  # 0x40: nodump
LSATTR_VISIBLE = 0x000BFFFF


def _excuse_protection_order(name, ref, got, names):
    """The protection_after_type rule: for a removal or rename, the kernel's EPERM where cowfs, through
    FUSE, gives the wrong-type errno that the VFS finds first."""
    if ("protection_after_type" in names and name in ("unlink", "rmdir", "rename", "rename2")
            and ref == ("errno", "EPERM") and got in (("errno", "ENOTDIR"), ("errno", "EISDIR"))):
        return ref
    return got


def _file_operations(p, fds) -> Ops:
    """fallocate through an open descriptor, and lsattr/chattr by path (not following a symlink)."""
    def getflags(path):
        fd = os.open(p(path), os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW)
        try:
            return real_flags(fd) & LSATTR_VISIBLE
        finally:
            os.close(fd)

    def setflags(path, add, remove):
        fd = os.open(p(path), os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW)
        try:
            fcntl.ioctl(fd, FS_IOC_SETFLAGS, struct.pack("=Q", (real_flags(fd) | add) & ~remove))
        finally:
            os.close(fd)

    return {
        "fallocate": lambda slot, mode, offset, length: fallocate(fds[slot], mode, offset, length),
        "getflags": getflags,
        "setflags": setflags,
    }


# --------------------------------------------------------------------------
# the machine

class ParityMachine(RuleBasedStateMachine):
    """Base class; use ``parity_machine(mode)`` to get one bound to a mode."""

    mode: Mode = MODES["redirect_off"]
    backend = "cowfs"  # "kernel": a second kernel mount instead of cowfs, to check the harness itself
    counters = {"examples": 0, "steps": 0}
    MAX_FDS = 4
    # the known differences (cowfs.testing.harness.KNOWN_DIFFERENCES) excused, by name (empty it to see them)
    known_differences = excused(PARITY)

    def __init__(self):
        super().__init__()
        self.base = tempfile.mkdtemp(prefix="cowfs-parity-")
        os.chmod(self.base, 0o755)
        self.pair: Pair | None = None
        self.fds: list[int] = []  # worker slots open on both sides
        self._next_slot = 0
        self._failed = False
        self._torn_down = False
        self._since_remount = 0

    # -- plumbing
    @property
    def kernel(self) -> Side:
        return self.pair.kernel

    @property
    def tested(self) -> Side:
        return self.pair.tested

    def _fail(self, message: str):
        self._failed = True
        raise Divergence(f"[{self.mode.name}] {message}")

    def _both(self, name: str, *args):
        """Run one operation on both sides; fail on differing outcomes; return the common outcome
        (the value, or ``("errno", NAME)``)."""
        type(self).counters["steps"] += 1
        self._since_remount += 1
        try:
            ref = self.kernel.call(name, *args, timeout=OP_TIMEOUT)
            got = self.tested.call(name, *args, timeout=OP_TIMEOUT)
        except BaseException:
            self._failed = True
            raise
        for side, reply in (("kernel", ref), (self.backend, got)):
            if reply[0] == "exception":
                self._fail(f"{name}{args!r} raised in the {side} helper: {reply[1]}")
        ref, got = ref[1], excuse_value(ref[1], got[1], self.known_differences)
        got = _excuse_protection_order(name, ref, got, self.known_differences)
        if ref != got:
            self._fail(f"{name}{args!r}: kernel -> {show(ref)}, {self.backend} -> {show(got)}")
        return ref

    def _start(self):
        self.pair.start(operations)

    def _stop(self) -> list[str]:
        problems = self.pair.stop() if self.pair is not None else []
        self.fds.clear()
        return problems

    # -- setup
    @initialize(stack=S.stacks(1, 3, unmerged_whiteouts=False))
    def init_stack(self, stack):
        self._setup(stack)

    def _setup(self, stack):
        """Write the drawn layers and mount them on both sides."""
        type(self).counters["examples"] += 1
        try:
            layer_base = os.path.join(self.base, "layers")
            os.mkdir(layer_base)
            os.chmod(layer_base, 0o755)
            lowers = materialise(stack, layer_base, userxattr=self.mode.userxattr)
            self.pair = Pair(self.base, lowers, self.mode, self.backend)
            self._start()
        except BaseException:
            self._failed = True
            raise

    # -- writing, attributes, xattrs, open files (every change copies up)
    @rule(path=paths, how=st.sampled_from(WRITE_HOW), offset=offsets, data=write_data)
    def write(self, path, how, offset, data):
        self._both("write", path, how, offset, data)

    @rule(path=paths, length=lengths)
    def truncate(self, path, length):
        self._both("truncate", path, length)

    @rule(path=paths, mode=file_modes)
    def chmod(self, path, mode):
        self._both("chmod", path, mode)

    @rule(path=paths, owner=owners, follow=st.booleans())
    def chown(self, path, owner, follow):
        self._both("chown", path, owner, follow)

    @rule(path=paths, ns=st.sampled_from(TIMES_NS), follow=st.booleans())
    def utime(self, path, ns, follow):
        self._both("utime", path, ns, follow)

    @rule(path=paths, name=xattr_names, value=xattr_values, flags=st.sampled_from(tuple(XATTR_FLAGS)))
    def setxattr(self, path, name, value, flags):
        self._both("setxattr", path, name, value, flags)

    @rule(path=paths, name=xattr_names)
    def removexattr(self, path, name):
        self._both("removexattr", path, name)

    @rule(path=paths, name=xattr_names)
    def getxattr(self, path, name):
        self._both("getxattr", path, name)

    @rule(path=paths)
    def listxattr(self, path):
        self._both("listxattr", path)

    # descriptors held open across copy-up
    @precondition(lambda self: len(self.fds) < self.MAX_FDS)
    @rule(path=paths, how=st.sampled_from(tuple(OPEN_FLAGS)))
    def open_fd(self, path, how):
        slot = self._next_slot
        self._next_slot += 1
        if not is_errno(self._both("open_fd", slot, path, how)):
            self.fds.append(slot)

    @precondition(lambda self: self.fds)
    @rule(fd=fd_slots, offset=st.sampled_from((0, 1, 4096)), size=st.sampled_from((1, 100, 70_000)))
    def fd_read(self, fd, offset, size):
        self._both("pread", self.fds[fd % len(self.fds)], size, offset)

    @precondition(lambda self: self.fds)
    @rule(fd=fd_slots, offset=st.sampled_from((0, 3, 5000)), data=write_data)
    def fd_write(self, fd, offset, data):
        self._both("pwrite", self.fds[fd % len(self.fds)], data, offset)

    @precondition(lambda self: self.fds)
    @rule(fd=fd_slots)
    def fd_fstat(self, fd):
        self._both("fstat", self.fds[fd % len(self.fds)])

    @precondition(lambda self: self.fds)
    @rule(fd=fd_slots)
    def fd_close(self, fd):
        slot = self.fds.pop(fd % len(self.fds))
        self._both("close", slot)

    # -- deleting (whiteouts), creating (opaque directories)
    @rule(path=paths)
    def unlink(self, path):
        self._both("unlink", path)

    @rule(path=paths)
    def rmdir(self, path):
        self._both("rmdir", path)

    @rule(path=paths, mode=dir_modes)
    def mkdir(self, path, mode):
        self._both("mkdir", path, mode)

    @rule(path=paths, mode=file_modes)
    def mkfifo(self, path, mode):
        self._both("mkfifo", path, mode)

    @rule(path=paths, kind=st.sampled_from(tuple(NODE_KINDS)), numbers=st.sampled_from(S.DEVICES), mode=file_modes)
    def mknod(self, path, kind, numbers, mode):
        self._both("mknod", path, kind, numbers, mode)

    @rule(link_target=st.sampled_from(S.SYMLINK_TARGETS), path=paths)
    def symlink(self, link_target, path):
        self._both("symlink", link_target, path)

    # -- renaming (redirects, EXDEV), hard links
    @rule(src=paths, dst=paths)
    def rename(self, src, dst):
        self._both("rename", src, dst)

    @rule(src=paths, dst=paths, flags=st.sampled_from((RENAME_NOREPLACE, RENAME_EXCHANGE)))
    def rename_flags(self, src, dst, flags):
        self._both("rename2", src, dst, flags)

    @rule(src=paths, dst=paths)
    def link(self, src, dst):
        self._both("link", src, dst)

    # -- reading (the tree is compared after every step anyway; these follow symlinks)
    @rule(path=paths)
    def stat(self, path):
        self._both("stat", path)

    @rule(path=paths)
    def read(self, path):
        self._both("read", path)

    # -- fallocate, file attribute flags
    @precondition(lambda self: self.fds)
    @rule(fd=fd_slots, mode=st.sampled_from(FALLOCATE_MODES), offset=st.sampled_from((0, 3, 5000, 70_000)),
          length=st.sampled_from((1, 4096, 100_000)))
    def fd_fallocate(self, fd, mode, offset, length):
        self._both("fallocate", self.fds[fd % len(self.fds)], mode, offset, length)

    @rule(path=paths, add=st.sampled_from(CHATTR_FLAGS), remove=st.sampled_from(CHATTR_FLAGS))
    def chattr(self, path, add, remove):
        self._both("setflags", path, add, remove)
        self._both("getflags", path)

    # -- remount (not more often than every REMOUNT_EVERY steps: it is the slowest step)
    REMOUNT_EVERY = 5

    @precondition(lambda self: self._since_remount >= self.REMOUNT_EVERY)
    @rule()
    def remount(self):
        type(self).counters["steps"] += 1
        self._since_remount = -1
        try:
            problems = self._stop()
            if problems:
                self._fail("remount: " + "; ".join(problems))
            self._start()
        except Divergence:
            raise
        except BaseException:
            self._failed = True
            raise

    # -- checks after every step
    @invariant()
    def trees_match(self):
        if self.pair is None or self._failed:
            return
        ref, got = snapshot(self.kernel.mountpoint), snapshot(self.tested.mountpoint)
        got = excuse_tree(ref, got, self.known_differences)
        if ref != got:
            self._fail("merged trees differ:\n" + diff_snapshots(ref, got, "kernel", self.backend))
        # and the upper directories on disk, as each side has written them so far
        ref = upper_snapshot(self.kernel.upper, self.mode.userxattr)
        got = excuse_tree(ref, upper_snapshot(self.tested.upper, self.mode.userxattr), self.known_differences)
        if ref != got:
            self._fail("upper directories differ:\n" + diff_snapshots(ref, got, "kernel", self.backend))

    @invariant()
    def lowers_unchanged(self):
        if self.pair is None or self._failed:
            return
        problems = self.pair.lower_changes()
        if problems:
            self._fail(problems[0])

    # -- the end: always unmount; then each must read the other's upper
    def teardown(self):
        if self._torn_down:
            return
        self._torn_down = True
        problems = []
        try:
            final = None
            if self.pair is not None and not self._failed:
                final = {s.label: snapshot(s.mountpoint) for s in self.pair.sides}
            problems += self._stop()
            if final is not None and not problems:
                problems += self._cross_check(final)
        finally:
            problems += cleanup_base(self.base)
        if problems and not self._failed:
            self._fail("teardown:\n" + "\n".join(problems))

    def _fresh_view(self, tag, kind, side, problems):
        """*kind* mounting *side*'s upper afresh (with its workdir under index=on, whose index holds data)."""
        upper = side.upper
        work = side.work if "index=on" in self.mode.kernel_options else None
        try:
            return self.pair.read_upper(tag, kind, upper, work)
        except Exception as e:
            problems.append(f"{kind} mounting {upper}: {e}")
            return None

    def _cross_check(self, final) -> list[str]:
        """Each side mounts the other's upper and must read it as its own: as the writer saw it live,
        or else exactly as a fresh mount of its own upper reads (a live kernel inode may keep a number
        that no xattr records, e.g. a symlink's origin under userxattr, which a remount forgets)."""
        problems = []
        pairs = [
            # (who mounts, whose upper, whose upper is its own)
            ("kernel", self.tested, self.kernel),
            (self.backend, self.kernel, self.tested),
        ]
        for i, (kind, writer, own) in enumerate(pairs):
            view = self._fresh_view(f"x{i}-{kind}", kind, writer, problems)
            if view is None or view == final[writer.label]:
                continue
            own_view = self._fresh_view(f"o{i}-{kind}", kind, own, problems)
            if own_view is not None and view != own_view:
                problems.append(f"{kind} reading {writer.label}'s upper sees another tree than its own upper:\n"
                                + diff_snapshots(own_view, view, f"{kind}-over-own-upper", f"{kind}-over-upper"))
        return problems


def parity_machine(mode: str | Mode = "redirect_off", backend: str = "cowfs",
                   name: str | None = None) -> type[ParityMachine]:
    """A ``RuleBasedStateMachine`` class comparing *backend* ("cowfs", or "kernel" to check the
    harness) with the kernel in *mode* (a key of ``MODES`` or a ``Mode``).

    The class is named after the mode (``RedirectOff``, ``RedirectOn``, ``UserXattr``,
    ``ManyLayers``...), which is the name Hypothesis prints in reproductions; each class
    counts its examples and steps in ``cls.counters``.
    """
    if isinstance(mode, str):
        mode = MODES[mode]
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, not {backend!r}")
    name = name or CLASS_NAMES.get(mode.name, "Parity_" + mode.name) + ("KernelSelf" if backend == "kernel" else "")

    def init_stack(self, stack):
        self._setup(stack)

    cls = type(name, (ParityMachine,), {
        "mode": mode,
        "backend": backend,
        "counters": {"examples": 0, "steps": 0},
        "init_stack": initialize(stack=S.stacks(mode.min_layers, mode.max_layers,
                                                unmerged_whiteouts=False))(init_stack),
        "__module__": __name__,
    })
    return cls


__all__ = ["CLASS_NAMES", "MODES", "OP_TIMEOUT", "Divergence", "Mode", "ParityMachine", "operations", "parity_machine"]
