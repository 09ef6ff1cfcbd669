#!/usr/bin/env python3
"""`make stress`: many processes hammer one cowfs mount at once, under a watchdog.

The differential tests run one operation at a time; the daemon serves
requests on many threads, so races (two copy-ups of one file, appends through
two hard-link names of one file, a rename racing an unlink) only show under
concurrency.  This runner builds lower layers in the kernel's format, mounts
cowfs over them, and runs --procs worker processes for --seconds, each doing
random create/write/append/rename/unlink/mkdir/rmdir/chmod/link/readdir/stat/
truncate on a small set of shared names, so that they collide.  Then the same
workload runs on a kernel overlay, for comparison and as a check of the
harness (the kernel must show no unexpected errno either).

    python scripts/stress.py [--seconds 300] [--procs 16] [--seed N] [--op-timeout 30]
                             [--kernel-seconds S] [--backends cowfs,kernel] [--skip KIND,...]
                             [--freeze-daemon-after S]

A run fails when:

* an operation fails with an errno outside ALLOWED_ERRNOS (EIO, ESTALE,
  ENOTCONN...);
* one operation takes longer than --op-timeout: the parent, which watches
  every worker's current operation, then aborts the FUSE connection through
  fusectl, kills the workers and unmounts, so a deadlocked daemon can never
  hang CI;
* a line appended through a hard-link name is lost, doubled or torn;
* after the run the daemon does not exit, W/work is not empty, or the kernel
  mounting the same lowers and this upper sees another tree.

Each worker draws its operations from its own generator, seeded with --seed
and its index, and independent of outcomes: a seed replays the same sequence
of operations per worker (only their interleaving differs).  Exit status 0
when every backend passed, 1 otherwise.  Needs root and FUSE.  Scratch
directories and mounts live under /tmp/stressA; every mount is unmounted on
the way out, also on failure.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import dataclasses
import errno
import multiprocessing
import os
import random
import shutil
import signal
import sys
import tempfile
import time
from collections import Counter

from cowfs.testing.layers import Dir, File, HardLink, Layer, StackSpec, Whiteout, materialise
from cowfs.testing.mounts import (
    CowfsMount,
    KernelOverlay,
    MountError,
    abort_connection,
    force_unmount,
    fuse_connection,
    mounts_under,
    pid_alive,
    pids_with_argument,
)
from cowfs.testing.tree import diff_snapshots, snapshot

SCRATCH = "/tmp/stressA"
KERNEL_OPTIONS = ["index=off", "redirect_dir=off", "metacopy=off"]  # the kernel's defaults, spelled out
ALLOWED_ERRNOS = frozenset({errno.ENOENT, errno.EEXIST, errno.ENOTEMPTY, errno.EXDEV, errno.ENOTDIR,
                            errno.EISDIR, errno.EINVAL, errno.EPERM})  # EINVAL: dir into itself; EPERM: link a dir
DESC_SIZE = 200  # bytes of a worker's current-operation description the watchdog can read
GRACE = 5.0  # seconds the workers get to stop after the deadline or an abort, before SIGKILL
MAX_LISTED = 40  # unexpected errors listed per backend (all are counted)

# The shared names: a few directories (lower, merged, new) and a few names in each.
DIRS = ["d", "n", "shared", "shared/a", "shared/a/b"]
NAMES = ["f0", "f1", "x", "sub"]
POOL = DIRS + [f"{d}/{n}" if d else n for d in [""] + DIRS for n in NAMES] + ["d/big.bin"]
BIG = ["big.bin", "d/big.bin"]  # lower files of a few MB: copied up by several workers at once
# Hard-link groups, only ever appended to (never renamed or unlinked): "links" is made through the
# mount before the workers start (an upper file with two names), "hl" is hard-linked in a lower.
GROUPS = {"links": ["links/a", "links/b"], "hl": ["hl/x", "hl/y"]}
GROUP_HEAD = {"links": b"upper\n", "hl": b"lower\n"}
GROUP_PATHS = frozenset(p for paths in GROUPS.values() for p in paths)


MIX = {"create": 8, "write": 5, "append": 6, "read": 5, "rename": 8, "unlink": 7, "mkdir": 5, "rmdir": 4,
       "chmod": 3, "link": 5, "readdir": 4, "stat": 6, "truncate": 3, "copyup": 1, "group-append": 12,
       "group-meta": 3, "rmtree": 1}  # kinds of operation, with their weights


@dataclasses.dataclass(frozen=True)
class Config:
    """One run's parameters; *seed* and *procs* (with *skip*) fix every worker's sequence of operations."""
    seconds: float = 45.0
    procs: int = 8
    seed: str = "0"
    op_timeout: float = 30.0  # the watchdog's limit for one operation
    kernel_seconds: float | None = None  # workload time on the kernel (default: seconds)
    backends: tuple[str, ...] = ("cowfs", "kernel")
    skip: frozenset[str] = frozenset()  # kinds of operation (MIX) left out
    freeze_after: float | None = None  # SIGSTOP the cowfs daemon after this many seconds (tests the watchdog)

    def replay(self) -> str:
        extra = f" --kernel-seconds {self.kernel_seconds:g}" if self.kernel_seconds is not None else ""
        extra += f" --skip {','.join(sorted(self.skip))}" if self.skip else ""
        return (f"python scripts/stress.py --seed {self.seed} --procs {self.procs} --seconds {self.seconds:g}"
                f" --op-timeout {self.op_timeout:g} --backends {','.join(self.backends)}{extra}")


# --------------------------------------------------------------------------- layers

def put(path: str, data: bytes) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)


def lower_layers() -> StackSpec:
    """Three lower layers, topmost first: files, dirs, a whiteout, an opaque dir, a hard-linked pair and two
    files of a few MB."""
    big = random.Random(0).randbytes(1 << 20)
    return StackSpec(
        Layer(File("x", b"l0 x\n"), File("shared/sub/f0", b"l0 shared/sub/f0\n"), Dir("n")),
        Layer(File("d/x", b"l1 d/x\n"), File("f1", b"l1 f1\n"), File("shared/a/b/x", b"l1 leaf x\n"),
              File("hl/x", GROUP_HEAD["hl"]), HardLink("hl/y", to="hl/x"), Whiteout("d/f1"),
              Dir("shared/x", opaque=True)),
        Layer(File("big.bin", big * 4), File("d/big.bin", big * 2), File("f0", b"l2 f0\n"),
              File("d/f0", b"l2 d/f0\n"), File("d/f1", b"l2 d/f1\n"), File("d/sub/deep", b"l2 deep\n"),
              File("shared/a/b/f0", b"l2 leaf\n"), File("shared/a/f1", b"l2 shared/a/f1\n"),
              File("shared/x/old", b"l2 hidden by opaque\n")),
    )


def make_groups(root: str) -> None:
    """Through the mount: the upper hard-link group (one file, two names)."""
    os.mkdir(f"{root}/links")
    put(f"{root}/links/a", GROUP_HEAD["links"])
    os.link(f"{root}/links/a", f"{root}/links/b")


# --------------------------------------------------------------------------- operations
# Every operation takes the mount root and arguments drawn in advance, so that a worker's
# sequence of operations depends on the seed only.

def _write_file(path: str, flags: int, data: bytes, offset: int | None = None) -> None:
    fd = os.open(path, flags, 0o644)
    try:
        if offset is None:
            os.write(fd, data)
        else:
            os.pwrite(fd, data, offset)
    finally:
        os.close(fd)


def op_create(root, path, data):
    _write_file(f"{root}/{path}", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, data)


def op_write(root, path, data, offset):
    _write_file(f"{root}/{path}", os.O_WRONLY, data, offset)


def op_append(root, path, data):
    _write_file(f"{root}/{path}", os.O_WRONLY | os.O_APPEND, data)


def op_read(root, path):
    with open(f"{root}/{path}", "rb") as f:
        while f.read(1 << 20):
            pass


def op_rename(root, old, new):
    os.rename(f"{root}/{old}", f"{root}/{new}")


def op_unlink(root, path):
    os.unlink(f"{root}/{path}")


def op_mkdir(root, path):
    os.mkdir(f"{root}/{path}")


def op_rmdir(root, path):
    os.rmdir(f"{root}/{path}")


def op_rmtree(root, path):
    """``rm -rf``: keeps directory renames from nesting the tree ever deeper.  Entries that vanish
    meanwhile (another worker) are skipped; any other failure is the operation's outcome."""
    def gone_ok(fn, target):
        try:
            fn(target)
        except FileNotFoundError:
            pass

    top = f"{root}/{path}"
    for dirpath, dirnames, filenames in os.walk(top, topdown=False):
        for name in filenames:
            gone_ok(os.unlink, os.path.join(dirpath, name))
        for name in dirnames:
            target = os.path.join(dirpath, name)
            gone_ok(os.unlink if os.path.islink(target) else os.rmdir, target)
    gone_ok(os.rmdir, top)


def op_chmod(root, path, mode):
    os.chmod(f"{root}/{path}", mode)


def op_link(root, old, new):
    os.link(f"{root}/{old}", f"{root}/{new}")


def op_readdir(root, path):
    with os.scandir(f"{root}/{path}") as it:
        for entry in it:
            entry.is_dir(follow_symlinks=False)


def op_stat(root, path):
    os.lstat(f"{root}/{path}")


def op_truncate(root, path, size):
    os.truncate(f"{root}/{path}", size)


OPS = {name[3:]: fn for name, fn in globals().items() if name.startswith("op_")}


def record(wid: int, seq: int) -> bytes:
    """The line appended to a hard-link group: unique per worker and operation."""
    return b"w%d.%d\n" % (wid, seq)


def draw(rng: random.Random, wid: int, seq: int, skip: frozenset[str]) -> tuple[str, tuple]:
    """The *seq*-th operation of worker *wid*: (name, arguments).  Every worker starts by copying
    up the same big lower file, then by creating a file under the same lower directories."""
    pick = lambda: rng.choice(POOL)  # noqa: E731
    data = lambda n: (b"w%d.%d;" % (wid, seq) * (n // 4 + 1))[:n]  # noqa: E731
    if seq == 0 and "copyup" not in skip:
        return "write", (BIG[0], data(64), rng.randrange(4 << 20))
    if seq == 1 and "create" not in skip:
        return "create", (f"shared/a/b/{rng.choice(NAMES)}", data(100))
    kind = rng.choices(list(MIX), weights=[0 if k in skip else w for k, w in MIX.items()])[0]
    if kind == "create":
        return kind, (pick(), data(rng.choice([0, 10, 5000, 70000])))
    if kind == "write":
        return kind, (pick(), data(rng.randrange(1, 9000)), rng.randrange(200000))
    if kind == "append":
        return kind, (pick(), data(rng.randrange(1, 300)))
    if kind in ("read", "unlink", "mkdir", "rmdir", "stat", "rmtree"):
        return kind, (pick(),)
    if kind in ("rename", "link"):
        return kind, (pick(), pick())
    if kind == "chmod":
        return kind, (pick(), rng.choice([0o644, 0o600, 0o755, 0o700]))
    if kind == "readdir":
        return kind, (rng.choice([""] + DIRS),)
    if kind == "truncate":
        return kind, (pick(), rng.choice([0, 1, 4096, 3 << 20]))
    if kind == "copyup":
        return "write", (rng.choice(BIG), data(16), rng.randrange(2 << 20))
    group = rng.choice(sorted(GROUPS))
    name = rng.choice(GROUPS[group])
    if kind == "group-append":
        return "append", (name, record(wid, seq))
    return rng.choice([("chmod", (name, rng.choice([0o644, 0o600]))), ("stat", (name,)), ("read", (name,))])


# --------------------------------------------------------------------------- workers

@dataclasses.dataclass
class Slot:
    """What a worker shares with the watchdog: when its current operation began (0: none) and what it is."""
    started: ctypes.c_double
    desc: ctypes.Array


def describe(name: str, args: tuple) -> str:
    shown = [a if isinstance(a, str) else f"<{len(a)} bytes>" if isinstance(a, bytes) else oct(a)
             if name == "chmod" and isinstance(a, int) else str(a) for a in args]
    return " ".join([name] + shown)


def worker(wid, root, config, seconds, slot, stop, barrier, results):
    """Run operations until *seconds* pass or *stop* is set; put the worker's figures on *results*."""
    rng = random.Random(f"{config.seed}:{wid}")
    errnos: Counter = Counter()
    unexpected: list[str] = []
    appended: list[bytes] = []
    slowest = (0.0, "")
    seq = 0
    barrier.wait()
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and not stop.is_set():
        name, args = draw(rng, wid, seq, config.skip)
        desc = describe(name, args)
        slot.desc.value = desc.encode()[:DESC_SIZE - 1]
        t0 = time.monotonic()
        slot.started.value = t0
        try:
            OPS[name](root, *args)
            outcome = 0
        except OSError as e:
            outcome = e.errno
        except Exception as e:  # noqa: BLE001 - not an errno, so never expected
            outcome = -1
            unexpected.append(f"{type(e).__name__}: {e} in {desc}")
        elapsed = time.monotonic() - t0
        slot.started.value = 0.0
        errnos[errno.errorcode.get(outcome, "OK" if outcome == 0 else str(outcome))] += 1
        if outcome > 0 and outcome not in ALLOWED_ERRNOS:
            unexpected.append(f"{errno.errorcode.get(outcome, outcome)}: {desc}")
        if outcome == 0 and name == "append" and args[0] in GROUP_PATHS:
            appended.append(args[1])
        if elapsed > slowest[0]:
            slowest = (elapsed, desc)
        seq += 1
    results.put({"wid": wid, "ops": seq, "errnos": errnos, "unexpected": unexpected, "appended": appended,
                 "slowest": slowest})


# --------------------------------------------------------------------------- one backend

@dataclasses.dataclass
class Result:
    """The figures and failures of one backend's run."""
    backend: str
    procs: int
    ops: int = 0
    seconds: float = 0.0
    slowest: tuple[float, str] = (0.0, "")
    errnos: Counter = dataclasses.field(default_factory=Counter)
    unexpected: list[str] = dataclasses.field(default_factory=list)
    hang: str | None = None
    problems: list[str] = dataclasses.field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.unexpected or self.hang or self.problems)

    @property
    def ops_per_second(self) -> float:
        return self.ops / self.seconds if self.seconds else 0.0

    def figures(self) -> str:
        errs = ", ".join(f"{k}={v}" for k, v in sorted(self.errnos.items(), key=lambda kv: -kv[1]))
        return (f"{self.backend}: {self.procs} processes, {self.ops} operations in {self.seconds:.1f}s = "
                f"{self.ops_per_second:.0f} ops/s; slowest {self.slowest[0]:.3f}s ({self.slowest[1]}); {errs}")

    def failures(self) -> list[str]:
        out = [f"HANG: {self.hang}"] if self.hang else []
        out += [f"unexpected: {u}" for u in self.unexpected[:MAX_LISTED]]
        if len(self.unexpected) > MAX_LISTED:
            out.append(f"... and {len(self.unexpected) - MAX_LISTED} more unexpected errors")
        return out + self.problems


def run_workload(result: Result, root: str, config: Config, seconds: float, conn: str | None,
                 freeze: tuple[float, list[int]] | None) -> list[bytes]:
    """Run the workers on *root* with the parent as watchdog; fill *result*, return the appended lines.

    On an operation slower than the configured limit, abort the FUSE connection *conn* (kernel mounts have
    none), stop and kill the workers.  *freeze* = (after, pids) stops those processes (the daemon)
    with SIGSTOP after that many seconds: a real hang, to test the watchdog.
    """
    ctx = multiprocessing.get_context("fork")
    slots = [Slot(ctx.Value("d", 0.0, lock=False), ctx.Array(ctypes.c_char, DESC_SIZE, lock=False))
             for _ in range(result.procs)]
    stop, barrier, results = ctx.Event(), ctx.Barrier(result.procs + 1), ctx.Queue()
    procs = [ctx.Process(target=worker, args=(i, root, config, seconds, slots[i], stop, barrier, results),
                         name=f"stress-{i}", daemon=True) for i in range(result.procs)]
    for p in procs:
        p.start()
    reports = []
    op_timeout = config.op_timeout
    try:
        barrier.wait(timeout=60)
        start = time.monotonic()
        hard_end = start + seconds + op_timeout + GRACE
        while len(reports) < len(procs) and time.monotonic() < hard_end:
            with contextlib.suppress(Exception):
                reports.append(results.get(timeout=0.2))
            now = time.monotonic()
            if freeze and now - start >= freeze[0]:
                for pid in freeze[1]:
                    os.kill(pid, signal.SIGSTOP)
                freeze = None
            if result.hang is None:
                began = [(s.started.value, s) for s in slots]  # read once: the worker resets it to 0
                slow = [(now - t, s.desc.value.decode(errors="replace"))
                        for t, s in began if t and now - t > op_timeout]
                if slow:
                    took, desc = max(slow)
                    result.hang = (f"'{desc}' under {root} still running after {took:.0f}s "
                                   f"(limit {op_timeout:g}s); {len(slow)} operation(s) stuck")
                    if conn is not None:
                        abort_connection(conn)
                        result.hang += (f"; FUSE connection aborted (fusectl connection {conn}), "
                                        "ENOTCONN afterwards not listed")
                    stop.set()
                    hard_end = min(hard_end, now + GRACE)
        result.seconds = time.monotonic() - start
        if len(reports) < len(procs) and result.hang is None:
            result.hang = f"{len(procs) - len(reports)} worker(s) never finished (no single slow operation seen)"
    finally:
        stop.set()
        for p in procs:
            p.join(timeout=0.5 if result.hang else GRACE)
            if p.is_alive():
                p.kill()
                p.join(timeout=GRACE)
        alive = [p.pid for p in procs if p.is_alive()]
        if alive:
            result.problems.append(f"worker processes {alive} survive SIGKILL (stuck in the kernel)")
    appended = []
    for r in reports:
        result.ops += r["ops"]
        result.errnos.update(r["errnos"])
        result.unexpected += [u for u in r["unexpected"] if not (conn and result.hang and u.startswith("ENOTCONN:"))]
        result.slowest = max(result.slowest, r["slowest"])
        appended += r["appended"]
    return appended


def check_groups(root: str, appended: list[bytes]) -> list[str]:
    """Every line appended through a hard-link name is in the group's files exactly once, none torn."""
    problems = []
    contents: dict[int, bytes] = {}
    for path in sorted(GROUP_PATHS):
        try:
            st = os.lstat(f"{root}/{path}")
            with open(f"{root}/{path}", "rb") as f:
                contents[st.st_ino] = f.read()
        except OSError as e:
            problems.append(f"hard-link group file {path}: {errno.errorcode.get(e.errno, e.errno)}")
    lines = Counter(line + b"\n" for data in contents.values() for line in data.split(b"\n")[:-1])
    for line in appended:
        if lines[line] != 1:
            problems.append(f"appended line {line!r} found {lines[line]} times in the hard-link groups")
    heads = set(GROUP_HEAD.values())
    torn = [line for line in lines if line not in heads and not line.startswith(b"w")]
    if torn or any(data and not data.endswith(b"\n") for data in contents.values()):
        problems.append(f"torn appends in the hard-link groups: {torn[:5]!r}")
    return problems[:MAX_LISTED]


def run_backend(backend: str, base: str, lowers: list[str], config: Config) -> Result:
    """Mount *backend* over *lowers*, run the workload, unmount, and check what it left."""
    result = Result(backend, config.procs)
    seconds = config.seconds if backend == "cowfs" or config.kernel_seconds is None else config.kernel_seconds
    upper, work, mnt, check_work, check_mnt = (os.path.join(base, f"{backend}-{name}")
                                               for name in ("upper", "work", "mnt", "check-work", "check-mnt"))
    for d in (upper, work, mnt, check_work, check_mnt):
        os.mkdir(d)
    if backend == "cowfs":
        mount = CowfsMount(lowers, upper, work, mnt)
    else:
        mount = KernelOverlay(lowers, upper, work, mnt, KERNEL_OPTIONS)
    mount.mount()
    daemons: list[int] = []
    try:
        conn = fuse_connection(mnt) if backend == "cowfs" else None
        daemons = sorted(pids_with_argument(mnt))
        make_groups(mnt)
        freeze = (config.freeze_after, daemons) if config.freeze_after is not None and daemons else None
        appended = run_workload(result, mnt, config, seconds, conn, freeze)
        if result.hang:
            return result
        tree = snapshot(mnt)
        result.problems += check_groups(mnt, appended)
    finally:
        if result.hang:
            for pid in daemons:
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGCONT)
        try:
            mount.unmount()
        except MountError as e:
            result.problems.append(f"unmount: {e}")
        with contextlib.suppress(MountError):
            force_unmount(mnt)
    left = [p for p in pids_with_argument(mnt) if pid_alive(p)]
    if left:
        result.problems.append(f"processes still running with {mnt} in their arguments: {left}")
    # the kernel keeps its shared whiteout inode there (#N, linked to every whiteout); cowfs must not
    leftovers = sorted(os.listdir(os.path.join(work, "work"))) if backend == "cowfs" else []
    if leftovers:
        result.problems.append(f"{work}/work is not empty after unmounting: {leftovers[:10]}")
    with contextlib.ExitStack() as stack:
        check = KernelOverlay(lowers, upper, check_work, check_mnt, KERNEL_OPTIONS)
        check.mount()
        stack.callback(check.unmount)
        diff = diff_snapshots(tree, snapshot(check_mnt), backend, "kernel-over-its-upper")
    if diff:
        result.problems.append(f"the kernel mounting {backend}'s upper sees another tree:\n{diff}")
    return result


# --------------------------------------------------------------------------- the run

def run(config: Config, scratch: str = SCRATCH) -> list[Result]:
    """Build the layers, run every backend in turn; return their results.

    The scratch directory is removed when every backend passed and kept (its path printed) otherwise.
    """
    os.makedirs(scratch, exist_ok=True)
    base = tempfile.mkdtemp(prefix="run-", dir=scratch)
    os.chmod(base, 0o755)
    old_umask = os.umask(0o022)
    results = []
    try:
        lowers = materialise(lower_layers(), base)  # base/l0, l1, l2
        for backend in config.backends:
            results.append(run_backend(backend, base, lowers, config))
    finally:
        os.umask(old_umask)
        for mnt, _ in sorted(mounts_under(base), reverse=True):
            with contextlib.suppress(MountError):
                force_unmount(mnt)
        still = mounts_under(base)
        if still:
            raise MountError(f"left mounted: {still}")
        if results and all(r.ok for r in results) and len(results) == len(config.backends):
            shutil.rmtree(base)
        else:
            print(f"stress: scratch kept in {base}", file=sys.stderr)
    return results


def report(results: list[Result], config: Config) -> str:
    """The figures of every backend, then the failures, with the command that replays the seed."""
    lines = [r.figures() for r in results]
    for r in results:
        if not r.ok:
            lines.append(f"{r.backend} FAILED:")
            lines += ["  " + line.replace("\n", "\n    ") for line in r.failures()]
    lines.append(f"seed {config.seed}; replay: {config.replay()}")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=300, help="workload time per backend (default 300)")
    ap.add_argument("--procs", type=int, default=16, help="worker processes (default 16)")
    ap.add_argument("--seed", default=None, help="default: a fresh random one, printed")
    ap.add_argument("--op-timeout", type=float, default=30, help="watchdog limit for one operation (default 30 s)")
    ap.add_argument("--kernel-seconds", type=float, default=None,
                    help="workload time on the kernel (default --seconds)")
    ap.add_argument("--backends", default="cowfs,kernel", help="comma-separated, of cowfs,kernel (default both)")
    ap.add_argument("--skip", default="", help=f"comma-separated kinds of operation to leave out, of {','.join(MIX)}")
    ap.add_argument("--freeze-daemon-after", type=float, default=None, metavar="S",
                    help="SIGSTOP the cowfs daemon after S seconds, to check that the watchdog fires")
    args = ap.parse_args(argv)
    backends = tuple(b for b in args.backends.split(",") if b)
    skip = frozenset(k for k in args.skip.split(",") if k)
    if set(backends) - {"cowfs", "kernel"}:
        ap.error("--backends takes cowfs and/or kernel")
    if skip - set(MIX):
        ap.error(f"--skip takes kinds of {','.join(MIX)}")
    config = Config(args.seconds, args.procs, args.seed or str(random.randrange(1 << 32)), args.op_timeout,
                    args.kernel_seconds, backends, skip, args.freeze_daemon_after)
    print(f"stress: seed {config.seed}, {config.procs} processes, {config.seconds:g}s per backend "
          f"({','.join(backends)})", flush=True)
    results = run(config)
    print(report(results, config))
    return 0 if all(r.ok for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
