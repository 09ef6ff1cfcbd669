"""Recording what operations did, as comparable ``(label, value)`` outcomes: the result, or ``("errno", NAME)``.

``Recorder`` is the plain recorder both differential harnesses use (the
fixed scenarios through ``Session``, the parity machine's chroot-ed helper
through ``Recorder.do``); ``Session`` adds the filesystem operations the
fixed scenarios are written in.  Raw inode and device numbers are never
recorded: they legitimately differ between two mounts of one stack.
"""

from __future__ import annotations

import errno
import os
import pickle
import traceback
from collections.abc import Callable
from typing import Any

from cowfs.testing.tree import describe_stat, file_digest

Outcome = Any  # a value, or ("errno", NAME)


def errno_name(e: OSError) -> str:
    """The symbolic name of *e*'s errno (``"ENOENT"``), or its number when it has none."""
    return errno.errorcode.get(e.errno, str(e.errno))


def errno_outcome(e: OSError) -> tuple[str, str]:
    """The outcome recorded for a failed operation: ``("errno", NAME)``."""
    return ("errno", errno_name(e))


def is_errno(outcome: Outcome) -> bool:
    """True when *outcome* records a failure (``("errno", NAME)``)."""
    return isinstance(outcome, tuple) and len(outcome) == 2 and outcome[0] == "errno"


def show(outcome: Outcome) -> str:
    """A short text for one outcome: the errno name, a long bytes value cut short, or the repr."""
    if is_errno(outcome):
        return outcome[1]
    if isinstance(outcome, bytes) and len(outcome) > 40:
        return f"{len(outcome)} bytes {outcome[:20]!r}..."
    return repr(outcome)


def diff_outcomes(a: list[tuple[str, Outcome]], b: list[tuple[str, Outcome]], a_name: str = "a",
                  b_name: str = "b") -> str:
    """A line per position where two outcome lists differ ("" when they are the same)."""
    lines = []
    for i in range(max(len(a), len(b))):
        oa = a[i] if i < len(a) else ("<missing>", None)
        ob = b[i] if i < len(b) else ("<missing>", None)
        if oa != ob:
            if oa[0] == ob[0] and isinstance(oa[1], dict) and isinstance(ob[1], dict):
                keys = sorted(k for k in set(oa[1]) | set(ob[1])
                              if oa[1].get(k, "<absent>") != ob[1].get(k, "<absent>"))
                detail = ", ".join(f"{k}: {a_name}={oa[1].get(k, '<absent>')!r} {b_name}={ob[1].get(k, '<absent>')!r}"
                                   for k in keys)
                lines.append(f"  #{i} {oa[0]}: {detail}")
            elif oa[0] == ob[0]:
                lines.append(f"  #{i} {oa[0]}: {a_name}={oa[1]!r}  {b_name}={ob[1]!r}")
            else:
                lines.append(f"  #{i} {a_name}: {oa!r} / {b_name}: {ob!r}")
    return "\n".join(lines)


class Recorder:
    """Runs operations and records each outcome as ``(label, value)``: the result, or ``("errno", NAME)``."""

    def __init__(self) -> None:
        self.outcomes: list[tuple[str, Outcome]] = []

    def check(self, label: str, value: Any) -> Any:
        """Record *value* as it is (a fact the caller computed)."""
        self.outcomes.append((label, value))
        return value

    def do(self, label: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Call *fn*; record its result, or the errno name of the OSError it raised.
        Returns the result (None after an error); other exceptions propagate."""
        try:
            value = fn(*args, **kwargs)
        except OSError as e:
            self.outcomes.append((label, errno_outcome(e)))
            return None
        self.outcomes.append((label, value))
        return value


class Session(Recorder):
    """Runs a fixed scenario's operations under one mount root and records each outcome.

    Every method takes paths relative to the mount root, records
    ``(label, value)`` where value is the result or ``("errno", NAME)``, and
    returns the value (None after an error).
    """

    def __init__(self, root: str, remount: Callable[[], None] | None, readonly: bool) -> None:
        super().__init__()
        self.root = root
        self._remount = remount
        self.readonly = readonly
        self._fds: set[int] = set()

    # -- plumbing
    def p(self, rel: str) -> str:
        return os.path.join(self.root, rel) if rel else self.root

    def ino(self, rel: str) -> int | None:
        """Raw st_ino, for comparisons inside one mount only (never record it)."""
        try:
            return os.lstat(self.p(rel)).st_ino
        except OSError:
            return None

    # -- reading
    def stat(self, rel: str) -> dict | None:
        return self.do(f"lstat {rel}", lambda: describe_stat(os.lstat(self.p(rel))))

    def stat_follow(self, rel: str) -> dict | None:
        return self.do(f"stat {rel}", lambda: describe_stat(os.stat(self.p(rel))))

    def exists(self, rel: str) -> bool:
        return self.check(f"exists {rel}", os.path.lexists(self.p(rel)))

    def read(self, rel: str, size: int = -1, offset: int = 0) -> bytes | None:
        def go():
            fd = os.open(self.p(rel), os.O_RDONLY)
            try:
                if size < 0:
                    return os.pread(fd, os.fstat(fd).st_size + 1, offset)
                return os.pread(fd, size, offset)
            finally:
                os.close(fd)
        return self.do(f"read {rel}[{offset}:{size}]", go)

    def digest(self, rel: str) -> str | None:
        return self.do(f"sha256 {rel}", file_digest, self.p(rel))

    def listdir(self, rel: str = "") -> dict | None:
        def go():
            names = os.listdir(self.p(rel))
            return {"names": sorted(names), "duplicates": len(names) != len(set(names))}
        return self.do(f"listdir {rel or '.'}", go)

    def scandir(self, rel: str = "") -> list | None:
        def go():
            with os.scandir(self.p(rel)) as it:
                return sorted(
                    (e.name, e.is_dir(follow_symlinks=False), e.is_file(follow_symlinks=False),
                     e.is_symlink()) for e in it
                )
        return self.do(f"scandir {rel or '.'}", go)

    def readlink(self, rel: str) -> str | None:
        return self.do(f"readlink {rel}", os.readlink, self.p(rel))

    def access(self, rel: str, mode: int) -> bool | None:
        return self.do(f"access {rel} {mode}", os.access, self.p(rel), mode)

    def getxattr(self, rel: str, name: str) -> bytes | None:
        return self.do(f"getxattr {rel} {name}", os.getxattr, self.p(rel), name, follow_symlinks=False)

    def listxattr(self, rel: str) -> list[str] | None:
        return self.do(f"listxattr {rel}", lambda: sorted(os.listxattr(self.p(rel), follow_symlinks=False)))

    # -- changing
    def write(self, rel: str, data: bytes, flags: int = os.O_WRONLY | os.O_CREAT | os.O_TRUNC,
              offset: int | None = None, mode: int = 0o644) -> int | None:
        def go():
            fd = os.open(self.p(rel), flags, mode)
            try:
                return os.write(fd, data) if offset is None else os.pwrite(fd, data, offset)
            finally:
                os.close(fd)
        return self.do(f"write {rel} flags={flags:o} off={offset} {len(data)}B", go)

    def create(self, rel: str, flags: int = os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode: int = 0o644) -> bool | None:
        def go():
            os.close(os.open(self.p(rel), flags, mode))
            return True
        return self.do(f"create {rel} flags={flags:o} mode={mode:o}", go)

    def unlink(self, rel: str) -> None:
        return self.do(f"unlink {rel}", os.unlink, self.p(rel))

    def rmdir(self, rel: str) -> None:
        return self.do(f"rmdir {rel}", os.rmdir, self.p(rel))

    def mkdir(self, rel: str, mode: int = 0o755) -> None:
        return self.do(f"mkdir {rel}", os.mkdir, self.p(rel), mode)

    def rename(self, a: str, b: str) -> None:
        return self.do(f"rename {a} -> {b}", os.rename, self.p(a), self.p(b))

    def link(self, a: str, b: str) -> None:
        return self.do(f"link {a} -> {b}", os.link, self.p(a), self.p(b), follow_symlinks=False)

    def symlink(self, target: str, rel: str) -> None:
        return self.do(f"symlink {rel} -> {target}", os.symlink, target, self.p(rel))

    def chmod(self, rel: str, mode: int) -> None:
        return self.do(f"chmod {rel} {mode:o}", os.chmod, self.p(rel), mode)

    def chown(self, rel: str, uid: int, gid: int, follow: bool = False) -> None:
        return self.do(f"chown {rel} {uid}:{gid}", os.chown, self.p(rel), uid, gid, follow_symlinks=follow)

    def utime(self, rel: str, ns: tuple[int, int], follow: bool = False) -> None:
        return self.do(f"utime {rel}", os.utime, self.p(rel), ns=ns, follow_symlinks=follow)

    def truncate(self, rel: str, length: int) -> None:
        return self.do(f"truncate {rel} {length}", os.truncate, self.p(rel), length)

    def setxattr(self, rel: str, name: str, value: bytes, flags: int = 0) -> None:
        return self.do(f"setxattr {rel} {name} flags={flags}", os.setxattr, self.p(rel), name, value, flags,
                       follow_symlinks=False)

    def removexattr(self, rel: str, name: str) -> None:
        return self.do(f"removexattr {rel} {name}", os.removexattr, self.p(rel), name, follow_symlinks=False)

    def mkfifo(self, rel: str, mode: int = 0o644) -> None:
        return self.do(f"mkfifo {rel}", os.mkfifo, self.p(rel), mode)

    def mknod(self, rel: str, mode: int, device: int = 0) -> None:
        return self.do(f"mknod {rel} {mode:o}", os.mknod, self.p(rel), mode, device)

    # -- file descriptors (closed automatically at the end and before a remount)
    def open(self, rel: str, flags: int, mode: int = 0o644) -> int | None:
        try:
            fd = os.open(self.p(rel), flags, mode)
        except OSError as e:
            self.outcomes.append((f"open {rel} {flags:o}", errno_outcome(e)))
            return None
        self._fds.add(fd)
        self.outcomes.append((f"open {rel} {flags:o}", "fd"))
        return fd

    def pread(self, fd: int | None, size: int, offset: int, label: str = "") -> bytes | None:
        return self.do(f"pread {label} {size}@{offset}", os.pread, fd, size, offset)

    def pwrite(self, fd: int | None, data: bytes, offset: int, label: str = "") -> int | None:
        return self.do(f"pwrite {label} {len(data)}@{offset}", os.pwrite, fd, data, offset)

    def fd_write(self, fd: int | None, data: bytes, label: str = "") -> int | None:
        return self.do(f"write {label} {len(data)}", os.write, fd, data)

    def fstat(self, fd: int | None, label: str = "") -> dict | None:
        return self.do(f"fstat {label}", lambda: describe_stat(os.fstat(fd)))

    def close(self, fd: int | None, label: str = "") -> Any:
        if fd is None:
            return self.check(f"close {label}", "no fd")
        self._fds.discard(fd)
        return self.do(f"close {label}", os.close, fd)

    def close_all(self) -> None:
        for fd in list(self._fds):
            try:
                os.close(fd)
            except OSError:
                pass
        self._fds.clear()

    # -- harness hooks
    def remount(self) -> None:
        """Unmount and mount the same stack again (open fds are closed first)."""
        self.close_all()
        self._remount()
        self.check("remount", True)

    def as_user(self, uid: int, gid: int, ops: Callable[[Session], Any]) -> None:
        """Run *ops* in a forked child with uid/gid switched (real, effective and saved)."""
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # child: never return into pytest
            code = 0
            try:
                os.close(r)
                child = type(self)(self.root, None, self.readonly)
                try:
                    os.setgroups([])
                    os.setresgid(gid, gid, gid)
                    os.setresuid(uid, uid, uid)
                    ops(child)
                    child.close_all()
                except Exception:
                    child.outcomes.append(("child exception", traceback.format_exc(limit=3)))
                with os.fdopen(w, "wb") as f:
                    f.write(pickle.dumps(child.outcomes))
            except BaseException:
                code = 1
            finally:
                os._exit(code)
        os.close(w)
        with os.fdopen(r, "rb") as f:
            data = f.read()
        os.waitpid(pid, 0)
        child_outcomes = pickle.loads(data) if data else [("child", "crashed")]
        self.outcomes.extend((f"[uid {uid}] {label}", value) for label, value in child_outcomes)


__all__ = ["Outcome", "Recorder", "Session", "diff_outcomes", "errno_name", "errno_outcome", "is_errno", "show"]
