#!/usr/bin/env python3
"""`make crash`: kill -9 the cowfs daemon in the middle of a workload, then check what survived.

cowfs promises what the kernel's overlayfs promises on a crash: a copy-up is
whole or absent (it is staged in ``W/work`` and renamed into place), a rename
or a delete is either done or not, the lower layers are never written, and
the next mount clears what an interrupted one left in ``W/work``.  A FUSE
daemon's most common crash is being killed (the OOM killer, a container
runtime stopping it), so this kills it with SIGKILL while several processes
are copying up files of several MB, renaming files and merged directories,
creating and deleting, and checks those promises on the remount.

    python scripts/crash.py [--rounds 8] [--seed S] [--modes redirect_off,redirect_on,userxattr,metacopy]
                            [--start-round 0] [--workers 6] [--max-delay 0.25] [--keep]

Each round of a mode plans a random workload (seeded by seed, mode and round)
of operations on disjoint objects.  Each operation is a few syscalls; the
kernel's overlayfs runs the plan first, one syscall at a time, and the state
of the operation's paths after each syscall is recorded: those are the only
states cowfs may leave.  Then cowfs is mounted, worker processes run the plan
with a journal of every syscall started and finished, and the daemon is
killed after a random delay or the moment ``W/work`` holds a staged copy.
After unmounting the dead mount, the round checks that:

1. the lower layers are byte-identical to their manifest (paths, types, modes,
   owners, all xattrs, mtimes, content hashes);
2. every operation shows a state its journal allows (the state before a
   syscall that was in flight or the state after it; the state after every
   syscall that returned), and every untouched object is unchanged;
3. the remount leaves ``W/work`` empty;
4. the kernel's overlayfs, mounting the same upper over the same lowers, shows
   the same tree as the cowfs remount.

Everything lives under /tmp/crashB (mount points too) and is unmounted
whatever happens; a failing round's directory is kept for inspection.  Exit
status: 0 when every check held, 1 when one failed, 2 when this machine
cannot run the test (needs root, FUSE and kernel overlayfs).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import errno
import os
import random
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from cowfs.testing import harness
from cowfs.testing.harness import MODES
from cowfs.testing.layers import USER, Dir, Entry, File, HardLink, Layer, StackSpec, Symlink, Whiteout, materialise
from cowfs.testing.mounts import (
    CowfsMount,
    KernelOverlay,
    MountError,
    availability,
    force_unmount,
    mounts_under,
    pid_alive,
    pids_with_argument,
    wait_gone,
)
from cowfs.testing.tree import diff_snapshots, snapshot

SCRATCH = Path("/tmp/crashB")
KERNEL_COMMON = list(harness.KERNEL_COMMON)
MODES = {name: MODES[name] for name in ("redirect_off", "redirect_on", "userxattr", "metacopy")}
DEAD = (errno.ENOTCONN, errno.ECONNABORTED)  # what a request gets once the daemon is gone
WORKER_GRACE = 3.0  # seconds the workers get to notice the dead mount before SIGKILL
PAGE = 4096
MAX_PROBLEMS = 12  # listed per failing round; the rest are counted


# ---------------------------------------------------------------------------
# operations: a few syscalls each, on paths no other operation touches

Step = tuple[str, Callable[[str, dict], object]]


@dataclasses.dataclass
class Op:
    """One operation of the workload: its syscalls in order, and the paths whose state it may change."""

    name: str
    paths: tuple[str, ...]
    steps: tuple[Step, ...]


def _p(root: str, rel: str) -> str:
    return os.path.join(root, rel)


def s_open(rel: str, flags: int) -> Step:
    return f"open {rel}", lambda root, ctx: ctx.__setitem__("fd", os.open(_p(root, rel), flags, 0o644))


def s_write(data: bytes, offset: int | None = None) -> Step:
    """One write that stays inside one page of the file (see ``in_page``)."""
    assert len(data) <= PAGE

    def go(root, ctx):
        n = os.write(ctx["fd"], data) if offset is None else os.pwrite(ctx["fd"], data, offset)
        if n != len(data):
            raise OSError(errno.EIO, f"short write: {n} of {len(data)} bytes")
    return f"write {len(data)}B" + ("" if offset is None else f" at {offset}"), go


def in_page(rng: random.Random, offset: int) -> bytes:
    """Random data to write at *offset* without crossing a page boundary.

    A write that crosses one can be torn by the kill itself: the daemon's
    ``pwrite`` into the upper stops at a page boundary once SIGKILL is pending,
    as any killed writer's does.  Within one page it lands whole or not at all,
    so every state the check accepts stays a before or an after.
    """
    return rng.randbytes(rng.randint(1, PAGE - offset % PAGE))


def s_close() -> Step:
    return "close", lambda root, ctx: os.close(ctx.pop("fd"))


def s_call(label: str, fn, *rels: str, **kwargs) -> Step:
    """A syscall on paths under the mount root, e.g. ``s_call("unlink x", os.unlink, "x")``."""
    return label, lambda root, ctx: fn(*(_p(root, r) for r in rels), **kwargs)


def run_op(root: str, op: Op, hook: Callable[[str, int, str], None]) -> None:
    """Run *op*'s syscalls under *root*, calling ``hook(event, step, detail)`` around each.

    Events: ``S`` before a syscall, ``D`` after it returned, ``E`` (detail: the
    errno name) after it failed; the operation stops at its first failure.
    """
    ctx: dict = {}
    try:
        for i, (_, fn) in enumerate(op.steps):
            hook("S", i, "")
            try:
                fn(root, ctx)
            except OSError as e:
                hook("E", i, errno.errorcode.get(e.errno, str(e.errno)))
                if e.errno in DEAD:
                    raise
                return
            hook("D", i, "")
    finally:
        if "fd" in ctx:
            with contextlib.suppress(OSError):
                os.close(ctx["fd"])


# ---------------------------------------------------------------------------
# the lower layers

@dataclasses.dataclass
class Layout:
    """Names of the objects the workload may pick, by pool, and the sizes of the data files."""

    data: dict[str, int]  # data file -> size
    small: list[str]
    links: list[tuple[str, str, int]]  # lower hard-link pairs, and their size
    symlinks: list[str]
    merged_dirs: list[str]  # directories present in both lower layers
    lower_dirs: list[str]  # directories of the bottom layer only
    rm_dirs: dict[str, list[str]]  # directory -> its entries, to be emptied and removed


def lowers_spec(rng: random.Random) -> tuple[StackSpec, Layout]:
    """Two lower layers (top over bottom), their content drawn from *rng*; and what the workload may touch."""
    top: list[Entry] = []
    bottom: list[Entry] = []
    data = {}
    for i in range(20):
        if i < 5:  # a few of several MB, so that a copy-up takes a while
            size = rng.randint(3 << 20, 8 << 20)
        else:
            size = rng.choice([0, 1, 4095, 4096, 70_000, rng.randint(1, 400_000)])
        rel = f"data/f{i:02}"
        layer = top if i % 4 == 3 else bottom
        if layer is top:  # also a bottom version, hidden by the top one
            bottom.append(File(rel, b"hidden bottom version\n"))
        layer.append(File(rel, rng.randbytes(size), mode=rng.choice([0o644, 0o600, 0o755, 0o4755]),
                          owner=rng.choice([(0, 0), (USER, USER), (0, USER)]),
                          xattrs=(("user.origin", f"lower {i}".encode()),) if i % 3 == 0 else ()))
        data[rel] = size
    small = []
    for i in range(16):
        rel = f"small/s{i:02}"
        (top if i % 2 else bottom).append(File(rel, f"small file {i}\n".encode() * (i + 1)))
        small.append(rel)
    links = []
    for i in range(4):
        a, b = f"hl/h{i}", f"hl/h{i}.link"
        size = rng.randint(1, 1 << 20)
        bottom += [File(a, rng.randbytes(size), mode=0o640, owner=(USER, 0)), HardLink(b, to=a)]
        links.append((a, b, size))
    symlinks = []
    bottom.append(Dir("sym"))
    for i in range(6):
        rel = f"sym/k{i}"
        bottom.append(Symlink(rel, f"../small/s{i:02}" if i % 3 else "nowhere/at/all"))
        symlinks.append(rel)
    merged_dirs = []
    for i in range(4):
        d = f"mdir/d{i}"
        bottom += [File(f"{d}/low.txt", b"from the bottom layer\n"),
                   File(f"{d}/sub/deep.txt", b"deep in the bottom layer\n"),
                   File(f"{d}/gone.txt", b"hidden by a whiteout in the top layer\n"),
                   File(f"{d}/mid.bin", rng.randbytes(300_000))]
        top += [File(f"{d}/top.txt", b"from the top layer\n"), File(f"{d}/sub/top2.txt", b"also from the top layer\n"),
                Whiteout(f"{d}/gone.txt")]
        merged_dirs.append(d)
    lower_dirs = []
    for i in range(4):
        d = f"ldir/d{i}"
        bottom += [File(f"{d}/a/b/file", f"nested {i}\n".encode(), mode=0o640, owner=(USER, USER)),
                   File(f"{d}/big.bin", rng.randbytes(1 << 20)), Symlink(f"{d}/link", "a/b/file")]
        lower_dirs.append(d)
    rm_dirs = {}
    for i in range(3):
        d = f"rmd/d{i}"
        bottom.append(File(f"{d}/one", b"1\n"))
        top.append(File(f"{d}/two", b"2\n"))
        rm_dirs[d] = ["one", "two"]
    bottom.append(File("opq/hidden.txt", b"hidden by the opaque top directory\n"))
    top += [Dir("opq", opaque=True), File("opq/seen.txt", b"in the opaque directory\n")]
    bottom += [Dir("moved"), Dir("new"), Dir("churn")]
    return StackSpec(Layer(*top), Layer(*bottom)), Layout(data, small, links, symlinks, merged_dirs, lower_dirs,
                                                          rm_dirs)


def manifest(layer: Path) -> dict:
    """Everything about a raw layer directory that must never change: all xattrs, exact mtimes, content hashes."""
    return snapshot(layer, all_xattrs=True, exact_times=True)


# ---------------------------------------------------------------------------
# planning a round's workload

W, RW, CREAT, EXCL, TRUNC, APPEND = os.O_WRONLY, os.O_RDWR, os.O_CREAT, os.O_EXCL, os.O_TRUNC, os.O_APPEND


def _data_op(rng: random.Random, rel: str, size: int) -> Op:
    """A copy-up of a data file: by writing, truncating, metadata, renaming or linking."""
    kind = rng.choice(["append", "truncate", "patch", "overwrite", "chmod", "chown", "setxattr", "utime", "rename",
                       "link", "chmod_append"])
    if kind == "append":
        steps = (s_open(rel, W | APPEND), s_write(in_page(rng, size)), s_close())
    elif kind == "chmod_append":  # with metacopy=on: a metadata-only copy, then its data
        steps = (s_call(f"chmod {rel} 640", os.chmod, rel, mode=0o640), s_open(rel, W | APPEND),
                 s_write(in_page(rng, size)), s_close())
    elif kind == "truncate":
        length = rng.choice([0, rng.randint(0, size), size + rng.randint(1, 100_000)])
        steps = (s_call(f"truncate {rel} {length}", os.truncate, rel, length=length),)
    elif kind == "patch":
        steps = (s_open(rel, RW), s_write(rng.randbytes(PAGE), rng.randrange(0, size + 1, PAGE)), s_close())
    elif kind == "overwrite":
        steps = (s_open(rel, W | TRUNC), s_write(in_page(rng, 0)), s_close())
    elif kind == "chmod":
        mode = rng.choice([0o600, 0o640, 0o755, 0o700])
        steps = (s_call(f"chmod {rel} {mode:o}", os.chmod, rel, mode=mode),)
    elif kind == "chown":
        steps = (s_call(f"chown {rel}", os.chown, rel, uid=USER, gid=0, follow_symlinks=False),)
    elif kind == "setxattr":
        steps = (s_call(f"setxattr {rel}", os.setxattr, rel, attribute="user.crash", value=b"set",
                        follow_symlinks=False),)
    elif kind == "utime":
        ns = 1_200_000_000 * 10**9 + rng.randrange(10**9)
        steps = (s_call(f"utime {rel}", os.utime, rel, ns=(ns, ns), follow_symlinks=False),)
    elif kind == "rename":
        new = "moved/" + os.path.basename(rel)
        return Op(f"rename {rel} {new}", (rel, new), (s_call(f"rename {rel} {new}", os.rename, rel, new),))
    else:
        new = rel + ".hl"
        return Op(f"link {rel} {new}", (rel, new), (s_call(f"link {rel} {new}", os.link, rel, new),))
    return Op(f"{kind} {rel}", (rel,), steps)


def _small_op(rng: random.Random, rel: str, others: list[str]) -> Op:
    """Delete, recreate or rename a small lower file (onto another one when *others* has a spare)."""
    kind = rng.choice(["unlink", "recreate", "rename", "rename_over" if others else "rename", "chmod"])
    if kind == "unlink":
        return Op(f"unlink {rel}", (rel,), (s_call(f"unlink {rel}", os.unlink, rel),))
    if kind == "recreate":
        return Op(f"recreate {rel}", (rel,), (s_call(f"unlink {rel}", os.unlink, rel), s_open(rel, W | CREAT | EXCL),
                                              s_write(rng.randbytes(100)), s_close()))
    if kind == "chmod":
        return Op(f"chmod {rel}", (rel,), (s_call(f"chmod {rel}", os.chmod, rel, mode=0o400),))
    new = others.pop() if kind == "rename_over" else rel + ".renamed"
    return Op(f"rename {rel} {new}", (rel, new), (s_call(f"rename {rel} {new}", os.rename, rel, new),))


def plan_round(rng: random.Random, layout: Layout, touch: float = 0.75) -> list[Op]:
    """A shuffled workload touching about *touch* of every pool, never one object twice."""
    ops = []
    for rel, size in layout.data.items():
        if rng.random() < touch:
            ops.append(_data_op(rng, rel, size))
    spare = [s for s in layout.small if rng.random() > touch]
    for rel in [s for s in layout.small if s not in spare]:
        if rng.random() < touch:
            ops.append(_small_op(rng, rel, spare))
    for a, b, size in layout.links:
        if rng.random() < touch:
            ops.append(Op(f"append {a} (linked to {b})", (a, b),
                          (s_open(a, W | APPEND), s_write(in_page(rng, size)), s_close())))
    for rel in layout.symlinks:
        if rng.random() < touch:
            if rng.random() < 0.5:
                ops.append(Op(f"unlink {rel}", (rel,), (s_call(f"unlink {rel}", os.unlink, rel),)))
            else:
                new = rel + ".renamed"
                ops.append(Op(f"rename {rel} {new}", (rel, new), (s_call(f"rename {rel} {new}", os.rename, rel, new),)))
    for d in layout.merged_dirs + layout.lower_dirs:  # EXDEV without redirect_dir, in both filesystems
        if rng.random() < touch:
            new = rng.choice([d + ".moved", "moved/" + d.replace("/", "-")])
            ops.append(Op(f"rename dir {d} {new}", (d, new), (s_call(f"rename {d} {new}", os.rename, d, new),)))
    for d, names in layout.rm_dirs.items():
        if rng.random() < touch:
            steps = tuple(s_call(f"unlink {d}/{n}", os.unlink, f"{d}/{n}") for n in names)
            ops.append(Op(f"empty and rmdir {d}", (d,), steps + (s_call(f"rmdir {d}", os.rmdir, d),)))
    for i in range(rng.randint(2, 5)):
        n, r = f"new/n{i}", f"new/n{i}.r"
        ops.append(Op(f"mkdir tree {n}, rename to {r}", (n, r), (
            s_call(f"mkdir {n}", os.mkdir, n), s_call(f"mkdir {n}/sub", os.mkdir, f"{n}/sub"),
            s_open(f"{n}/sub/f", W | CREAT | EXCL), s_write(rng.randbytes(2000)), s_close(),
            s_call(f"rename {n} {r}", os.rename, n, r), s_call(f"unlink {r}/sub/f", os.unlink, f"{r}/sub/f"),
            s_call(f"rmdir {r}/sub", os.rmdir, f"{r}/sub"))))
    for i in range(rng.randint(2, 5)):
        c, b = f"churn/c{i}", f"churn/c{i}.b"
        ops.append(Op(f"create/unlink churn {c}", (c, b), (
            s_open(c, W | CREAT | EXCL), s_write(rng.randbytes(3000)), s_close(),
            s_call(f"rename {c} {b}", os.rename, c, b),
            s_open(c, W | CREAT | EXCL), s_write(b"second\n"), s_close(),
            s_call(f"unlink {b}", os.unlink, b))))
    paths = [p for op in ops for p in op.paths]
    assert not any(_under(p, set(paths) - {p}) for p in paths) and len(set(paths)) == len(paths), "ops overlap"
    rng.shuffle(ops)
    return ops


# ---------------------------------------------------------------------------
# states

def _state(entry: dict) -> dict:
    """An entry as an operation's state compares, without ``sparse``.

    The kernel writes zeros into small holes when it copies up (the known
    difference "small_holes" in cowfs.testing.harness), cowfs keeps them; the content
    hash still catches any copy that is not whole.
    """
    return {k: v for k, v in entry.items() if k != "sparse"}


def select(entries: dict, paths) -> dict:
    """The states of *paths* and what lies below them in a snapshot's entries; an absent path reads as ENOENT."""
    out = {}
    for p in paths:
        sub = {rel: _state(e) for rel, e in entries.items() if rel == p or rel.startswith(p + "/")}
        out.update(sub or {p: {"error": "ENOENT"}})
    return out


def snap_paths(root: str, paths) -> dict:
    """The states of *paths* under *root* and what lies below them, keyed as ``select`` keys them."""
    out = {}
    for p in paths:
        for rel, e in snapshot(_p(root, p))["entries"].items():
            out[p if rel == "." else f"{p}/{rel}"] = _state(e)
    return out


@dataclasses.dataclass
class Reference:
    """What the kernel showed: the whole tree before the workload, and each operation's states and outcomes."""

    initial: dict
    states: list[list[dict]]  # per op: state before, and after each step (repeated after a failed one)
    outcomes: list[list[str]]  # per op: "ok" or the errno name, per step run


def run_reference(ops: list[Op], lowers, base: Path, kernel_options) -> Reference:
    """Run *ops* one syscall at a time on a kernel overlay with its own upper, recording every state."""
    upper, work, mnt = (base / n for n in ("ref-upper", "ref-work", "ref-mnt"))
    for d in (upper, work, mnt):
        d.mkdir()
    ref_mount = KernelOverlay(lowers, upper, work, mnt, KERNEL_COMMON + kernel_options)
    ref_mount.mount()
    try:
        root = str(mnt)
        initial = snapshot(root)
        states, outcomes = [], []
        for op in ops:
            chain, results = [snap_paths(root, op.paths)], []

            def hook(event, step, detail, op=op, chain=chain, results=results):
                if event != "S":
                    results.append("ok" if event == "D" else detail)
                    chain.append(snap_paths(root, op.paths))
            run_op(root, op, hook)
            chain += [chain[-1]] * (len(op.steps) + 1 - len(chain))
            states.append(chain)
            outcomes.append(results)
    finally:
        ref_mount.unmount()
    shutil.rmtree(base / "ref-upper")
    shutil.rmtree(base / "ref-work")
    return Reference(initial, states, outcomes)


# ---------------------------------------------------------------------------
# the workload on cowfs, and the kill

def worker(root: str, ops: list[tuple[int, Op]], journal: str) -> None:
    """Run *ops* (index, op) in order, journalling each syscall; stop at the first sign of a dead mount."""
    fd = os.open(journal, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)

    for index, op in ops:
        def hook(event, step, detail, index=index):
            os.write(fd, f"{index} {event} {step} {time.monotonic_ns()} {detail}\n".encode())
        try:
            run_op(root, op, hook)
        except OSError:
            return


def start_workers(root: str, ops: list[Op], n: int, journal_dir: Path) -> list[int]:
    """Fork *n* worker processes sharing out *ops*; return their pids."""
    pids = []
    for w in range(n):
        share = [(i, op) for i, op in enumerate(ops) if i % n == w]
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                worker(root, share, str(journal_dir / f"w{w}"))
            except BaseException:
                code = 1
            finally:
                os._exit(code)
        pids.append(pid)
    return pids


def reap(pids: list[int], timeout: float) -> None:
    """Wait up to *timeout* seconds for *pids* to exit, then SIGKILL and reap those still running."""
    deadline = time.monotonic() + timeout
    left = set(pids)
    while left:
        for pid in list(left):
            if os.waitpid(pid, os.WNOHANG)[0]:
                left.discard(pid)
        if not left:
            return
        if time.monotonic() > deadline:
            for pid in left:
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)
            for pid in left:
                os.waitpid(pid, 0)
            return
        time.sleep(0.01)


def wait_for_kill_point(rng: random.Random, staging: str, journal_dir: Path, steps: int, pids: list[int],
                        max_delay: float) -> str:
    """Wait for the moment to kill, drawn from three kinds; return its description.

    ``timer``: a random delay.  ``progress``: once the workers have answered
    k syscalls, k random over the whole workload.  ``staging``: the k-th time
    W/work is seen holding a staged copy.  Waiting stops early once every
    worker has exited, and after *max_delay* three times over.
    """
    kind = rng.choice(["timer", "progress", "staging"])
    started = time.monotonic()
    if kind == "timer":
        delay = rng.uniform(0.0, max_delay)
        label, reached = f"timer {delay:.3f}s", lambda: time.monotonic() - started >= delay
    elif kind == "progress":
        wanted = rng.randint(1, steps)
        label, reached = f"after {wanted} of {steps} syscalls", lambda: _answered(journal_dir) >= wanted
    else:
        wanted, seen = rng.randint(1, 30), []

        def reached():
            with contextlib.suppress(OSError):
                if os.listdir(staging):
                    seen.append(1)
            return len(seen) >= wanted
        label = f"staging #{wanted}"
    while not reached():
        if all(not pid_alive(p) for p in pids) or time.monotonic() - started > 3 * max_delay:
            return label + " (not reached)"
        time.sleep(0.001)
    return label


def _answered(journal_dir: Path) -> int:
    """How many syscalls the journals show answered so far."""
    count = 0
    for f in journal_dir.iterdir():
        with contextlib.suppress(OSError):
            count += sum(1 for line in f.read_text().splitlines() if line.split(" ")[1] in "DE")
    return count


def read_journal(journal_dir: Path) -> dict[int, list[tuple[str, int, int, str]]]:
    """Per op index: its (event, step, monotonic_ns, detail) lines in order."""
    out: dict[int, list] = {}
    for f in journal_dir.iterdir():
        for line in f.read_text().splitlines():
            index, event, step, t, *detail = line.split(" ")
            out.setdefault(int(index), []).append((event, int(step), int(t), " ".join(detail)))
    return out


def allowed_states(events, kill_ns: int) -> tuple[set[int], bool]:
    """(the state indexes an op's journal allows, whether one of its syscalls was in flight at the kill).

    A syscall that returned is done; one that never returned, or failed after
    the kill (ENOTCONN, ECONNABORTED, EIO: the daemon may or may not have
    done it), may have happened or not; one that failed before the kill did
    not happen, and ended the op.
    """
    if not events:
        return {0}, False
    event, step, t, _ = events[-1]
    if event == "D":
        return {step + 1}, False
    if event == "E" and t <= kill_ns:
        return {step}, False
    started = next(t for e, _, t, _ in reversed(events) if e == "S")
    return {step, step + 1}, started <= kill_ns


def write_cut_short(before: dict, after: dict) -> dict:
    """The state a write in flight may leave when the daemon is killed inside its write(2): the filesystem
    updates the file's times before it copies the first page, and a fatal signal then ends the call with
    nothing written. So the data and size are as before, and the times are those of the write. The writer
    gets an error, so nothing it was told is written goes missing."""
    touched = dict(before)
    for rel, entry in after.items():
        if rel in before and before[rel] != entry and "mtime" in entry:
            touched[rel] = {**before[rel], "mtime": entry["mtime"]}
    return touched


# ---------------------------------------------------------------------------
# one round

@dataclasses.dataclass
class Figures:
    """What the rounds of one mode did and checked."""

    rounds: int = 0
    ops: int = 0
    done: int = 0
    interrupted: int = 0
    not_started: int = 0
    staged_at_kill: int = 0  # rounds where W/work held something when the daemon died
    checks: int = 0
    failures: list[str] = dataclasses.field(default_factory=list)


def run_round(mode: str, seed: str, index: int, lowers: list[Path], layout: Layout, manifests: list[dict],
              base: Path, workers: int, max_delay: float, figures: Figures) -> list[str]:
    """Plan, reference, crash, remount and check one round; return its problems."""
    kernel_options, cowfs_options = MODES[mode].options("kernel"), MODES[mode].options("cowfs")
    rng = random.Random(f"{seed}:{mode}:{index}")
    ops = plan_round(rng, layout)
    ref = run_reference(ops, lowers, base, kernel_options)
    upper, work, mnt, kmnt, journal_dir = (base / n for n in ("upper", "work", "mnt", "kmnt", "journal"))
    for d in (upper, work, mnt, kmnt, journal_dir):
        d.mkdir()
    staging = str(work / "work")
    problems = []

    mount = CowfsMount(lowers, upper, work, mnt, cowfs_options)
    mount.mount()
    pids = []
    try:
        pids = start_workers(str(mnt), ops, workers, journal_dir)
        point = wait_for_kill_point(rng, staging, journal_dir, sum(len(op.steps) for op in ops), pids,
                                    max_delay)
        daemons = pids_with_argument(mnt)
        kill_ns = time.monotonic_ns()
        mount.abort()
        if not wait_gone(daemons, 10):
            problems.append(f"daemon {daemons} still alive 10s after SIGKILL")
        reap(pids, WORKER_GRACE)
        pids = []
        try:
            os.statvfs(mnt)  # always asks the daemon, where a stat may be answered from the attribute cache
            problems.append("the mount still answers after the daemon was killed")
        except OSError as e:
            if e.errno not in DEAD:
                problems.append(f"the dead mount answers {errno.errorcode.get(e.errno)}, not ENOTCONN")
        figures.checks += 1
    finally:
        reap(pids, 0)
        mount.unmount()

    leftovers = sorted(os.listdir(staging)) if os.path.isdir(staging) else []
    figures.staged_at_kill += bool(leftovers)
    journal = read_journal(journal_dir)
    allowed, in_flight = {}, set()
    for i in range(len(ops)):
        events = journal.get(i, [])
        allowed[i], flying = allowed_states(events, kill_ns)
        if flying:
            in_flight.add(i)
        for event, step, t, detail in events:
            if event in "DE" and t <= kill_ns:  # a syscall answered before the kill answers as the kernel's did
                figures.checks += 1
                want = ref.outcomes[i][step] if step < len(ref.outcomes[i]) else "not run"
                if (detail or "ok") != want:
                    problems.append(f"op {ops[i].name!r} step {step} ({ops[i].steps[step][0]}): "
                                    f"cowfs {detail or 'ok'}, kernel {want}")
    figures.rounds += 1
    figures.ops += len(ops)
    figures.done += sum(1 for i, op in enumerate(ops) if allowed[i] == {len(op.steps)})
    figures.interrupted += len(in_flight)
    figures.not_started += sum(1 for i in range(len(ops)) if i not in journal)

    remount = CowfsMount(lowers, upper, work, mnt, cowfs_options)
    remount.mount()
    try:
        left_after = sorted(os.listdir(staging))
        tree = snapshot(mnt)
    finally:
        remount.unmount()
    figures.checks += 1
    if left_after:
        problems.append(f"W/work not emptied by the remount: {left_after} (before remount: {leftovers})")

    owned = set()
    for i, op in enumerate(ops):
        owned.update(op.paths)
        got = select(tree["entries"], op.paths)
        chain = ref.states[i]
        figures.checks += 1
        candidates = [chain[s] for s in allowed[i]]
        if i in in_flight:
            step = journal[i][-1][1]
            if op.steps[step][0].startswith("write") and step + 1 < len(chain):
                candidates.append(write_cut_short(chain[step], chain[step + 1]))
        if not any(got == state for state in candidates):
            matches = [s for s, state in enumerate(chain) if state == got]
            nearest = chain[max(allowed[i])]
            problems.append(
                f"op {op.name!r}: journal allows state(s) {sorted(allowed[i])} of 0..{len(op.steps)}, "
                f"found {'state ' + str(matches) if matches else 'a state of no step'}:\n"
                + _indent(diff_snapshots({"entries": nearest}, {"entries": got}, f"state{max(allowed[i])}", "cowfs")))
    untouched_ref = {r: e for r, e in ref.initial["entries"].items() if not _under(r, owned)}
    untouched_got = {r: e for r, e in tree["entries"].items() if not _under(r, owned)}
    figures.checks += len(untouched_ref)
    if untouched_ref != untouched_got:
        problems.append("untouched objects changed:\n"
                        + _indent(diff_snapshots({"entries": untouched_ref}, {"entries": untouched_got}, "before",
                                                 "cowfs")))

    for layer, before in zip(lowers, manifests):
        figures.checks += 1
        after = manifest(layer)
        if after != before:
            problems.append(f"lower layer {layer.name} changed:\n" + _indent(diff_snapshots(before, after, "manifest",
                                                                                           "now")))

    check = KernelOverlay(lowers, upper, work, kmnt, KERNEL_COMMON + kernel_options)
    figures.checks += 1
    try:
        check.mount()
    except MountError as e:
        problems.append(f"the kernel refuses cowfs's upper: {e}")
    else:
        try:
            kernel_view = snapshot(kmnt)
        finally:
            check.unmount()
        if kernel_view != tree:
            problems.append("the kernel over the same upper sees another tree:\n"
                            + _indent(diff_snapshots(tree, kernel_view, "cowfs", "kernel")))
    if len(problems) > MAX_PROBLEMS:
        problems[MAX_PROBLEMS:] = [f"... and {len(problems) - MAX_PROBLEMS} more problems"]
    if problems:
        interrupted = [ops[i].name for i in sorted(in_flight)]
        problems.insert(0, f"kill point: {point}; in flight: {interrupted}; W/work at the kill: {leftovers}")
    return problems


def _under(rel: str, paths) -> bool:
    return rel in paths or any(rel.startswith(p + "/") for p in paths)


def _indent(text: str, limit: int = 40) -> str:
    lines = text.splitlines()
    more = [f"... {len(lines) - limit} more lines"] if len(lines) > limit else []
    return "\n".join("    " + line for line in lines[:limit] + more)


# ---------------------------------------------------------------------------
# the run

def run_mode(mode: str, seed: str, rounds: int, start_round: int, workers: int, max_delay: float, keep: bool,
             log=print) -> Figures:
    """Build the lowers of *mode* once, then run its rounds; a failing round's directory is kept."""
    figures = Figures()
    SCRATCH.mkdir(exist_ok=True)
    top = Path(tempfile.mkdtemp(prefix=f"{mode}-", dir=SCRATCH))
    os.chmod(top, 0o755)
    try:
        spec, layout = lowers_spec(random.Random(f"{seed}:{mode}:layers"))
        lowers = [Path(d) for d in materialise(spec, top, userxattr=mode == "userxattr")]  # l0 (top), l1
        del spec  # tens of MB of content, written now
        manifests = [manifest(d) for d in lowers]
        for index in range(start_round, start_round + rounds):
            base = top / f"r{index:03}"
            base.mkdir()
            try:
                problems = run_round(mode, seed, index, lowers, layout, manifests, base, workers, max_delay, figures)
            except (MountError, OSError) as e:
                problems = [f"round aborted: {type(e).__name__}: {e}"]
            finally:
                for mnt, _ in sorted(mounts_under(base), reverse=True):
                    force_unmount(mnt)
            if problems:
                keep = True
                header = (f"FAIL [{mode}] round {index} (seed {seed}; reproduce: scripts/crash.py --seed {seed} "
                          f"--modes {mode} --start-round {index} --rounds 1); kept in {base}")
                figures.failures.append(header + "\n  " + "\n  ".join(problems))
                log(figures.failures[-1])
            else:
                shutil.rmtree(base)
    finally:
        for mnt, _ in sorted(mounts_under(top), reverse=True):
            force_unmount(mnt)
        if not keep and not mounts_under(top):
            shutil.rmtree(top)
    return figures


def report(summary: dict[str, Figures], seed: str, log=print) -> None:
    log(f"\n== crash summary (seed {seed}) ==")
    for mode, f in summary.items():
        log(f"{mode:13} {f.rounds:3} rounds {f.ops:5} ops: {f.done:4} done, {f.interrupted:3} interrupted, "
            f"{f.not_started:4} not started; W/work held a copy at {f.staged_at_kill} kill(s); "
            f"{f.checks:6} checks, {len(f.failures)} failing round(s)")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=8, help="kills per mode (default 8)")
    ap.add_argument("--seed", default=None, help="seed of the plans and kill points (default: random, printed)")
    ap.add_argument("--modes", default=",".join(MODES), help=f"comma-separated, of {', '.join(MODES)}")
    ap.add_argument("--start-round", type=int, default=0, help="first round number (to rerun one round of a seed)")
    ap.add_argument("--workers", type=int, default=6, help="workload processes (default 6)")
    ap.add_argument("--max-delay", type=float, default=0.25,
                    help="longest random delay before the kill, in s (default 0.25; a workload takes about 0.2)")
    ap.add_argument("--keep", action="store_true", help="keep the layers and rounds under /tmp/crashB")
    args = ap.parse_args(argv)
    modes = [m for m in args.modes.split(",") if m]
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        ap.error(f"unknown mode(s) {unknown}; known: {', '.join(MODES)}")
    missing = {k: v for k, v in availability().items() if v}
    if missing:
        print("crash: cannot run here: " + "; ".join(f"{k}: {v}" for k, v in missing.items()), file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unmount on the way out, as on Ctrl-C
    seed = args.seed or str(random.SystemRandom().randrange(10**9))
    print(f"crash: seed {seed}", flush=True)
    os.umask(0o022)
    summary = {}
    for mode in modes:
        started = time.monotonic()
        summary[mode] = run_mode(mode, seed, args.rounds, args.start_round, args.workers, args.max_delay, args.keep)
        print(f"{mode}: {summary[mode].rounds} rounds in {time.monotonic() - started:.1f}s", flush=True)
    report(summary, seed)
    return 1 if any(f.failures for f in summary.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
