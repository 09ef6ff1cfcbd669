#!/usr/bin/env python3
"""Benchmark cowfs side by side with fuse-overlayfs and the kernel's overlayfs.

Builds layer stacks in a scratch directory, mounts each stack three ways
(cowfs, fuse-overlayfs, kernel overlay), runs every workload on every backend
(one warm-up, then several repetitions), and reports the median per workload
and backend with the ratios cowfs/fuse-overlayfs and cowfs/kernel.

    .venv/bin/python scripts/bench.py [--quick] [--out DIR] [--only WORKLOAD...]
                                      [--backends cowfs,fuse-overlayfs,kernel]

An optional group, pull_registry and push_registry, times cowfs pull and
push of a ~100 MiB image against a private loopback docker-registry beside
skopeo copy of the same image (skipped, with a line saying why, when
docker-registry or skopeo is missing): --only '*_registry' runs it alone.
Pulls are also timed against skopeo copy into containers-storage's overlay
driver, which unpacks the layers as cowfs pull does (as root only).

Needs root (kernel overlay mounts, dropping the page cache). Stdout: the
table. Stderr: one progress line per step. The out dir gets bench.json (every
repetition and the environment), bench.txt (the table) and bench.png (the
ratios, when matplotlib is importable). Every mount is unmounted on the way
out, also on Ctrl-C or failure; a backend that fails shows as 'failed: ...'.
"""

from __future__ import annotations

import argparse
import contextlib
import fnmatch
import hashlib
import io
import json
import math
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import sysconfig
import tarfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from cowfs.testing.mounts import is_mounted, mounts_under, pids_with_argument
from cowfs.testing.mounts import pid_alive as process_alive

REPO = Path(__file__).resolve().parent.parent
BACKENDS = ("cowfs", "fuse-overlayfs", "kernel")
MOUNT_TIMEOUT = 60  # seconds for a mount command to come back
COMMAND_TIMEOUT = 1800  # seconds for one timed command
DEEP_PATH = "/".join(f"d{i}" for i in range(8))  # the stat workloads' deep directory
WIDE_DIR = "wide"  # the lookup workloads' directory: in every layer, its names in the bottom one
OWN_NAMES = 3  # names of its own each layer has in WIDE_DIR
START = time.perf_counter()


class BenchError(Exception):
    """A step failed; the message is the reason shown in the table."""


# --------------------------------------------------------------------------- sizes


@dataclass(frozen=True)
class Sizes:
    """Everything that differs between a full run and --quick."""

    reps: int
    tree_files: int  # the metadata tree (find, ls -lR, memory)
    bigdir_entries: int  # one flat directory (ls -l)
    big_file_mib: int  # sequential read and copy-up
    chown_files: int  # chown -R over large files ...
    chown_file_mib: int  # ... of this size each
    create_files: int  # small files created through the mount
    untar_max_files: int  # files of the stdlib copied into the tarball
    rm_tree_files: int  # lower tree removed with rm -rf
    layer_counts: tuple[int, ...]  # stat deep in the tree under this many lowers
    stat_calls: int  # repeated stats per repetition (capped at ~1 s)
    lookup_names: int  # names (bottom layer only) stat'ed by the lookup workloads
    bigtree_files: int  # the large tree of the memory workload


FULL = Sizes(
    reps=5, tree_files=20_000, bigdir_entries=10_000, big_file_mib=1024,
    chown_files=8, chown_file_mib=64, create_files=10_000, untar_max_files=3000,
    rm_tree_files=5000, layer_counts=(1, 16, 128, 500), stat_calls=2000,
    lookup_names=2000, bigtree_files=200_000,
)
QUICK = Sizes(
    reps=3, tree_files=500, bigdir_entries=500, big_file_mib=16,
    chown_files=4, chown_file_mib=2, create_files=300, untar_max_files=200,
    rm_tree_files=200, layer_counts=(1, 16, 128, 500), stat_calls=200,
    lookup_names=200, bigtree_files=2000,
)


# --------------------------------------------------------------------------- small helpers


def log(message: str) -> None:
    """One progress line on stderr, stamped with the time since start."""
    print(f"[{time.perf_counter() - START:7.1f}s] {message}", file=sys.stderr, flush=True)


def tail(text: str, limit: int = 160) -> str:
    """The last non-empty line of a command's output, for error messages."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return (lines[-1] if lines else "no output")[:limit]


def run(cmd: list[str], timeout: float = COMMAND_TIMEOUT, **kwargs) -> subprocess.CompletedProcess:
    """Run a command with stdout discarded; raise BenchError with its stderr on failure."""
    proc = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                          text=True, timeout=timeout, **kwargs)
    if proc.returncode != 0:
        raise BenchError(f"{Path(cmd[0]).name} exit {proc.returncode}: {tail(proc.stderr)}")
    return proc


def timed(cmd: list[str], **kwargs) -> float:
    """Wall-clock seconds of one command (its output goes to /dev/null)."""
    t0 = time.perf_counter()
    run(cmd, **kwargs)
    return time.perf_counter() - t0


def write_file(path: str, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def write_data_file(path: Path, mib: int) -> None:
    """A file of real (allocated, non-zero) data: one random MiB repeated."""
    block = os.urandom(1 << 20)
    with open(path, "wb", buffering=0) as f:
        for _ in range(mib):
            f.write(block)


def remove_tree(path: Path) -> None:
    if path.exists() or path.is_symlink():
        shutil.rmtree(path)


def can_drop_caches() -> bool:
    return os.access("/proc/sys/vm/drop_caches", os.W_OK)


def drop_caches() -> None:
    """Flush dirty data and drop page, dentry and inode caches (needs root)."""
    os.sync()
    if can_drop_caches():
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")


def command_output(cmd: list[str]) -> str:
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"unavailable ({e})"
    return (proc.stdout + proc.stderr).strip()


# --------------------------------------------------------------------------- layer stacks


@dataclass
class Stack:
    """Read-only lower layers under one root directory, topmost first."""

    root: Path
    lowers: list[str]  # names relative to root, leftmost is topmost (as lowerdir=)


def build_tree(layers: list[Path], rel: str, n_files: int, per_dir: int = 50) -> None:
    """n_files small files in leaf directories two levels deep under rel.

    Every directory exists in every layer and the files alternate between the
    layers, so each directory is a merged one (as in container images).
    """
    n_leaves = max(1, math.ceil(n_files / per_dir))
    fan = max(1, math.ceil(math.sqrt(n_leaves)))
    data = b"cowfs benchmark file\n" * 4
    made = set()
    for i in range(n_files):
        top, sub = divmod(i // per_dir, fan)
        leaf = f"{rel}/d{top:03d}/s{sub:03d}"
        if leaf not in made:
            for layer in layers:
                os.makedirs(layer / leaf, exist_ok=True)
            made.add(leaf)
        write_file(f"{layers[i % len(layers)]}/{leaf}/f{i:06d}", data)


def build_main_stack(root: Path, sizes: Sizes) -> Stack:
    """Two lower layers: the metadata tree, a flat dir, big files, a tree to delete."""
    top, bottom = root / "lower0", root / "lower1"
    for layer in (top, bottom):
        layer.mkdir(parents=True)
    build_tree([top, bottom], "tree", sizes.tree_files)
    build_tree([top, bottom], "rmtree", sizes.rm_tree_files)
    (bottom / "bigdir").mkdir()
    for i in range(sizes.bigdir_entries):
        write_file(f"{bottom}/bigdir/entry{i:06d}", b"x\n")
    write_data_file(bottom / "big.bin", sizes.big_file_mib)
    (bottom / "chown").mkdir()
    for i in range(sizes.chown_files):
        write_data_file(bottom / "chown" / f"large{i}.bin", sizes.chown_file_mib)
    return Stack(root, ["lower0", "lower1"])


def build_layer_pool(root: Path, max_layers: int, n_names: int) -> None:
    """max_layers-1 small layers plus 'bottom', each holding the same deep chain and WIDE_DIR.

    Every layer has DEEP_PATH (so every directory on the way is merged across
    all layers) and a file of its own; only 'bottom' holds DEEP_PATH/target.
    Every layer has WIDE_DIR with OWN_NAMES names of its own; only 'bottom'
    holds the n_names names the lookup workloads stat (small files of their
    own, not hard links, which overlays may treat specially; the pool builds
    in a second or two even for 500 layers).
    """
    names = [f"L{i:03d}" for i in range(max_layers - 1)] + ["bottom"]
    for name in names:
        deep = root / name / DEEP_PATH
        deep.mkdir(parents=True)
        write_file(str(root / name / f"top-{name}"), b"layer\n")
        write_file(str(deep / f"leaf-{name}"), b"layer\n")
        (root / name / WIDE_DIR).mkdir()
        for j in range(OWN_NAMES):
            write_file(str(root / name / WIDE_DIR / f"own-{name}-{j}"), b"layer\n")
    write_file(str(root / "bottom" / DEEP_PATH / "target"), b"target\n")
    for i in range(n_names):
        write_file(str(root / "bottom" / WIDE_DIR / lookup_name(i)), b"name\n")


def lookup_name(i: int) -> str:
    return f"n{i:05d}"


def layer_stack(root: Path, n_layers: int) -> Stack:
    """The top n-1 pool layers above 'bottom' (short relative names fit the kernel's one-page option limit)."""
    return Stack(root, [f"L{i:03d}" for i in range(n_layers - 1)] + ["bottom"])


def build_bigtree_stack(root: Path, sizes: Sizes) -> Stack:
    top, bottom = root / "lower0", root / "lower1"
    for layer in (top, bottom):
        layer.mkdir(parents=True)
    build_tree([top, bottom], "tree", sizes.bigtree_files)
    return Stack(root, ["lower0", "lower1"])


def build_tarball(path: Path, max_files: int) -> int:
    """A tarball of the Python stdlib sources (no network); returns its file count."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    count = 0
    with tarfile.open(path, "w") as tar:
        for dirpath, dirnames, filenames in os.walk(stdlib):
            dirnames[:] = sorted(d for d in dirnames if d not in ("__pycache__", "site-packages"))
            for name in sorted(filenames):
                full = Path(dirpath, name)
                if count >= max_files or not full.is_file() or full.is_symlink():
                    continue
                tar.add(full, arcname=str(full.relative_to(stdlib.parent)))
                count += 1
    return count


class Stacks:
    """Builds each stack the first time a workload asks for it."""

    def __init__(self, scratch: Path, sizes: Sizes):
        self.scratch, self.sizes = scratch, sizes
        self._built: dict[str, Stack] = {}
        self.tarball = scratch / "untar-src.tar"
        self.tarball_files = 0

    def get(self, name: str) -> Stack:
        if name not in self._built:
            t0 = time.perf_counter()
            log(f"building stack '{name}'")
            self._built[name] = self._build(name)
            log(f"built stack '{name}' in {time.perf_counter() - t0:.1f} s")
        return self._built[name]

    def _build(self, name: str) -> Stack:
        root = self.scratch / "stacks"
        if name == "main":
            return build_main_stack(root / "main", self.sizes)
        if name == "bigtree":
            return build_bigtree_stack(root / "bigtree", self.sizes)
        if name.startswith("layers"):
            pool = root / "layers"
            if not pool.exists():
                build_layer_pool(pool, max(self.sizes.layer_counts), self.sizes.lookup_names)
            return layer_stack(pool, int(name[len("layers"):]))
        raise KeyError(name)

    def ensure_tarball(self) -> Path:
        if not self.tarball.exists():
            self.tarball_files = build_tarball(self.tarball, self.sizes.untar_max_files)
            log(f"built tarball of {self.tarball_files} stdlib files")
        return self.tarball


# --------------------------------------------------------------------------- mounting


@dataclass
class Mount:
    """A live mount: the backend, the merged directory and the daemon's pids."""

    backend: str
    path: Path
    pids: list[int] = field(default_factory=list)


ACTIVE: dict[Path, Mount] = {}  # everything mounted and not yet unmounted


def daemon_pids(mountpoint: Path) -> list[int]:
    """Live processes (other than ours) with the mountpoint as one of their arguments."""
    return sorted(pids_with_argument(mountpoint))


def peak_memory(pids: list[int], field: str = "VmHWM") -> int:
    """The largest VmHWM (peak resident set; or another /proc/PID/status field) among the daemon's processes, in bytes."""
    peaks = []
    for pid in pids:
        try:
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith(f"{field}:"):
                        peaks.append(int(line.split()[1]) * 1024)
        except OSError:
            continue
    if not peaks:
        raise BenchError("daemon process not found")
    return max(peaks)


def mount_command(backend: str, stack: Stack, upper: Path, work: Path, mnt: Path,
                  volatile: bool = False) -> list[str]:
    """The command that mounts stack on mnt; the kernel gets lowers relative to stack.root.

    volatile: cowfs and the kernel skip syncing the upper, as fuse-overlayfs always does."""
    if backend == "kernel":
        lowers = ":".join(stack.lowers)
    else:
        lowers = ":".join(str(stack.root / name) for name in stack.lowers)
    opts = f"lowerdir={lowers},upperdir={upper},workdir={work}"
    if volatile and backend != "fuse-overlayfs":
        opts += ",volatile"
    if backend == "cowfs":
        return [sys.executable, "-m", "cowfs", "mount", "-o", opts, str(mnt)]
    if backend == "fuse-overlayfs":
        return ["fuse-overlayfs", "-o", opts, str(mnt)]
    return ["mount", "-t", "overlay", "overlay", "-o", opts, str(mnt)]


def cowfs_env() -> dict[str, str]:
    """Run cowfs from this checkout, whether or not it is installed in the interpreter."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env


def fresh_rundir(rundir: Path) -> None:
    """Empty upper and work dirs and a mountpoint (the deletions are flushed by the caller's sync)."""
    for d in (rundir / "upper", rundir / "work"):
        remove_tree(d)
        d.mkdir(parents=True)
    (rundir / "mnt").mkdir(parents=True, exist_ok=True)


def mount(backend: str, stack: Stack, rundir: Path, volatile: bool = False) -> Mount:
    """Mount stack on rundir/mnt (upper, work made by fresh_rundir); raise BenchError if it does not come up."""
    upper, work, mnt = rundir / "upper", rundir / "work", rundir / "mnt"
    cmd = mount_command(backend, stack, upper, work, mnt, volatile)
    errfile = rundir / "mount.err"
    # stderr to a file, not a pipe: a daemon that keeps the pipe open would block us.
    with open(errfile, "w") as err:
        try:
            proc = subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err,
                                  cwd=stack.root, timeout=MOUNT_TIMEOUT,
                                  env=cowfs_env() if backend == "cowfs" else None)
        except subprocess.TimeoutExpired:
            proc = None
    m = Mount(backend, mnt)
    if is_mounted(mnt):
        ACTIVE[mnt] = m
    if backend != "kernel":
        m.pids = daemon_pids(mnt)
    reason = tail(errfile.read_text(errors="replace")).removeprefix(f"{cmd[0]}: ")
    if proc is None:
        unmount(m)
        raise BenchError(f"mount timed out after {MOUNT_TIMEOUT} s: {reason}")
    if proc.returncode != 0 or mnt not in ACTIVE:
        unmount(m)
        raise BenchError(f"mount: {reason} (exit {proc.returncode})" if proc.returncode else
                         f"mount exited 0 but {mnt} is not mounted: {reason}")
    return m


def unmount(m: Mount) -> None:
    """Unmount politely, then lazily; wait for (and at last end) the daemon we started."""
    fusermount = shutil.which("fusermount3") or shutil.which("fusermount") or "fusermount"
    attempts = {
        "cowfs": [[sys.executable, "-m", "cowfs", "umount", str(m.path)], [fusermount, "-u", str(m.path)]],
        "fuse-overlayfs": [[fusermount, "-u", str(m.path)]],
        "kernel": [["umount", str(m.path)]],
    }[m.backend] + [["umount", "-l", str(m.path)]]
    for cmd in attempts:
        if not is_mounted(m.path):
            break
        with contextlib.suppress(OSError, subprocess.TimeoutExpired):
            subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL, timeout=30,
                           env=cowfs_env() if m.backend == "cowfs" else None)
    still = is_mounted(m.path)
    stop_daemon(m.pids)
    if not still:
        ACTIVE.pop(m.path, None)
    else:
        log(f"WARNING: {m.path} is still mounted")


def stop_daemon(pids: list[int], grace: float = 10.0) -> None:
    """Wait for the daemon to exit after unmount; SIGTERM, then SIGKILL, if it hangs on."""
    deadline = time.monotonic() + grace
    for sig in (None, signal.SIGTERM, signal.SIGKILL):
        if sig is not None:
            for pid in pids:
                if process_alive(pid):
                    log(f"daemon {pid} did not exit; sending {sig.name}")
                    with contextlib.suppress(OSError):
                        os.kill(pid, sig)
            deadline = time.monotonic() + 5
        while any(process_alive(p) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.02)
        if not any(process_alive(p) for p in pids):
            return


@contextlib.contextmanager
def mounted(backend: str, stack: Stack, rundir: Path, volatile: bool = False):
    m = mount(backend, stack, rundir, volatile)
    try:
        yield m
    finally:
        unmount(m)


def unmount_all() -> None:
    for m in list(ACTIVE.values()):
        unmount(m)


def unmount_leftovers(scratch: Path) -> None:
    """Lazily unmount anything below scratch (untracked, or from a crashed earlier run)."""
    for path, _ in sorted(mounts_under(scratch), key=lambda m: len(m[0]), reverse=True):
        log(f"unmounting leftover {path}")
        pids = daemon_pids(Path(path))
        subprocess.run(["umount", "-l", path], stderr=subprocess.DEVNULL, check=False)
        stop_daemon(pids)
    for path, _ in sorted(mounts_under(scratch)):
        log(f"WARNING: still mounted: {path}")


# --------------------------------------------------------------------------- workloads


@dataclass
class Workload:
    name: str
    fn: Callable  # fn(mount, ctx) -> seconds | bytes | {metric: value}
    stack: str
    unit: str = "s"  # 's' or 'B'
    fresh: bool = False  # a fresh mount (fresh upper) for every repetition
    cold: bool = False  # drop caches before each of those mounts
    warmup: bool = True
    max_reps: int | None = None
    kernel: bool = True  # meaningful for the kernel too
    volatile: bool = False  # mount cowfs and the kernel with volatile (fuse-overlayfs never syncs anyway)
    cycle: bool = False  # fn(backend, stack, rundir, ctx) mounts and unmounts itself, timing both


WORKLOADS: list[Workload] = []


def workload(name: str, stack: str = "main", **kwargs):
    def register(fn):
        WORKLOADS.append(Workload(name, fn, stack, **kwargs))
        return fn
    return register


@dataclass
class Ctx:
    sizes: Sizes
    stacks: Stacks


@workload("tree_find_cold", fresh=True, cold=True)
def tree_find_cold(m: Mount, ctx: Ctx) -> float:
    """`find` over the merged tree (20,000 files in 421 directories) right after dropping caches and mounting."""
    return timed(["find", str(m.path / "tree")])


@workload("tree_find_warm")
def tree_find_warm(m: Mount, ctx: Ctx) -> float:
    """`find` over the merged tree (20,000 files in 421 directories) again on the same mount (caches warm)."""
    return timed(["find", str(m.path / "tree")])


@workload("tree_lsR_cold", fresh=True, cold=True)
def tree_ls_r_cold(m: Mount, ctx: Ctx) -> float:
    """`ls -lR` (readdir + stat of every entry) over the 20k tree, caches dropped."""
    return timed(["ls", "-lR", str(m.path / "tree")])


@workload("tree_lsR_warm")
def tree_ls_r_warm(m: Mount, ctx: Ctx) -> float:
    """`ls -lR` over the 20k tree again on the same mount (caches warm)."""
    return timed(["ls", "-lR", str(m.path / "tree")])


@workload("bigdir_ls")
def bigdir_ls(m: Mount, ctx: Ctx) -> float:
    """`ls -l` of one directory of 10,000 entries (warm)."""
    return timed(["ls", "-l", str(m.path / "bigdir")])


@workload("read_cold", fresh=True, cold=True)
def read_cold(m: Mount, ctx: Ctx) -> float:
    """Sequential read (dd bs=4M) of the 1 GiB lower file from disk."""
    return timed(["dd", f"if={m.path / 'big.bin'}", "of=/dev/null", "bs=4M", "status=none"])


@workload("read_warm")
def read_warm(m: Mount, ctx: Ctx) -> float:
    """Sequential read of the 1 GiB lower file again (lower file in the page cache)."""
    return timed(["dd", f"if={m.path / 'big.bin'}", "of=/dev/null", "bs=4M", "status=none"])


@workload("copyup_first_write", fresh=True)
def copyup_first_write(m: Mount, ctx: Ctx) -> float:
    """Copy-up latency: open O_WRONLY, write 1 byte, close, on the 1 GiB lower file."""
    path = m.path / "big.bin"
    t0 = time.perf_counter()
    fd = os.open(path, os.O_WRONLY)
    try:
        os.write(fd, b"!")
    finally:
        os.close(fd)
    return time.perf_counter() - t0


@workload("chown_R", fresh=True)
def chown_r(m: Mount, ctx: Ctx) -> float:
    """`chown -R` over a tree of large lower files (8 x 64 MiB): whole-file copy-ups."""
    return timed(["chown", "-R", "1000:1000", str(m.path / "chown")])


# The same two with volatile: cowfs and the kernel sync every copy-up before renaming it into place
# (so that a crash cannot leave an empty file over a lower one); fuse-overlayfs never syncs.
WORKLOADS.append(Workload("copyup_volatile", copyup_first_write, "main", fresh=True, volatile=True))
WORKLOADS.append(Workload("chown_R_volatile", chown_r, "main", fresh=True, volatile=True))


@workload("create_files", fresh=True)
def create_files(m: Mount, ctx: Ctx) -> float:
    """Create 10,000 small files (open O_CREAT, write 100 bytes, close) in a new directory."""
    target = m.path / "created"
    target.mkdir()
    data = b"c" * 100
    t0 = time.perf_counter()
    for i in range(ctx.sizes.create_files):
        write_file(f"{target}/new{i:06d}", data)
    return time.perf_counter() - t0


@workload("untar", fresh=True)
def untar(m: Mount, ctx: Ctx) -> float:
    """`tar -xf` of a few thousand stdlib source files into a new directory in the mount."""
    tarball = ctx.stacks.ensure_tarball()
    target = m.path / "untar"
    target.mkdir()
    return timed(["tar", "-xf", str(tarball), "-C", str(target)])


@workload("rm_rf", fresh=True)
def rm_rf(m: Mount, ctx: Ctx) -> float:
    """`rm -rf` of a merged lower tree of 5,000 files: one whiteout per name."""
    return timed(["rm", "-rf", str(m.path / "rmtree")])


def stat_deep(m: Mount, ctx: Ctx, n_layers: int) -> dict[str, float]:
    """stat of d0/../d7/target (bottom layer only) right after mount, and per call when repeated.

    Every layer has the d0..d7 chain, so each directory on the way is merged
    across all layers. The kernel caches dentries, hence both numbers.
    """
    path = str(m.path / DEEP_PATH / "target")
    t0 = time.perf_counter()
    os.stat(path)
    first = time.perf_counter() - t0
    calls, t0 = 0, time.perf_counter()
    while calls < ctx.sizes.stat_calls and (calls < 10 or time.perf_counter() - t0 < 1.0):
        os.stat(path)
        calls += 1
    repeat = (time.perf_counter() - t0) / calls
    return {f"stat_{n_layers}L_first": first, f"stat_{n_layers}L_repeat": repeat}


def lookups(m: Mount, ctx: Ctx, n_layers: int) -> dict[str, float]:
    """2,000 first stats of names in a directory every layer has, names in the bottom layer only; then again.

    `first`: the names one after the other right after mount (a fresh mount
    per repetition; the lower layers' own caches are as the previous
    repetition left them, nothing is dropped), each a lookup through all the
    layers above the bottom one. `repeat`: the same stats again on the same
    mount (second pass, straight after the first). Both are the time of the
    whole pass; the layers have the directory (wide/) with 3 names of their own.
    """
    paths = [str(m.path / WIDE_DIR / lookup_name(i)) for i in range(ctx.sizes.lookup_names)]
    passes = []
    for _ in range(2):
        t0 = time.perf_counter()
        for path in paths:
            os.stat(path)
        passes.append(time.perf_counter() - t0)
    return {f"lookup_{n_layers}L_first": passes[0], f"lookup_{n_layers}L_repeat": passes[1]}


def register_stat_workloads(layer_counts: tuple[int, ...]) -> None:
    """One stat and one lookup workload per layer count, listed before the memory workloads."""
    at = next((i for i, wl in enumerate(WORKLOADS) if wl.name.startswith("mem_")), len(WORKLOADS))
    for make, name in ((lookups, "lookup"), (stat_deep, "stat")):
        for n in reversed(layer_counts):
            fn = lambda m, ctx, n=n, make=make: make(m, ctx, n)  # noqa: E731
            fn.__doc__ = make.__doc__
            WORKLOADS.insert(at, Workload(f"{name}_{n}L", fn, f"layers{n}", fresh=True))


def depth_rows(results: dict, layer_counts: tuple[int, ...]) -> dict:
    """results with lookup_{first,repeat}_<max>L/<min>L rows after the lookup rows: per backend,
    the median at the deepest stack over the median at the shallowest (the target: repeat <= 1.2)."""
    lo, hi = min(layer_counts), max(layer_counts)
    if lo == hi:
        return results
    derived = {}
    for kind in ("first", "repeat"):
        deep, shallow = results.get(f"lookup_{hi}L_{kind}", {}), results.get(f"lookup_{lo}L_{kind}", {})
        row = {}
        for backend, cell in deep.items():
            other = shallow.get(backend)
            if cell.median is not None and other is not None and other.median:
                row[backend] = Cell("x", [cell.median / other.median])
            else:
                row[backend] = Cell("x", error=cell.error or (other.error if other else None) or "-")
        if row:
            derived[f"lookup_{kind}_{hi}L/{lo}L"] = row
    if not derived:
        return results
    last = max(i for i, metric in enumerate(results) if metric.startswith("lookup_"))
    items = list(results.items())
    return dict(items[:last + 1] + list(derived.items()) + items[last + 1:])


@workload("mount_cycle", stack="layers1", cycle=True)
def mount_cycle(backend: str, stack: Stack, rundir: Path, ctx: Ctx) -> float:
    """Mount a one-layer stack, stat a file in it, unmount: the whole cycle, as a test's fixture does it.

    The commands a user runs: `cowfs mount -o ...` and `cowfs umount` (the CLI,
    Python's start-up included), `fuse-overlayfs -o ...` and `fusermount3 -u`,
    `mount -t overlay` and `umount`; timed until the unmount command returns.
    """
    upper, work, mnt = rundir / "upper", rundir / "work", rundir / "mnt"
    cmd = mount_command(backend, stack, upper, work, mnt)
    fusermount = shutil.which("fusermount3") or shutil.which("fusermount") or "fusermount"
    umount_cmd = {"cowfs": [sys.executable, "-m", "cowfs", "umount", str(mnt)],
                  "fuse-overlayfs": [fusermount, "-u", str(mnt)],
                  "kernel": ["umount", str(mnt)]}[backend]
    env = cowfs_env() if backend == "cowfs" else None
    errfile = rundir / "cycle.err"
    m = Mount(backend, mnt)
    ACTIVE[mnt] = m  # unmounted on the way out whatever happens below
    try:
        # stderr to a file, not a pipe: the daemon keeps it open (see mount()).
        with open(errfile, "w") as err:
            t0 = time.perf_counter()
            mounted_rc = subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err,
                                        cwd=stack.root, env=env, timeout=MOUNT_TIMEOUT).returncode
            if mounted_rc == 0:
                os.stat(mnt / f"top-{stack.lowers[-1]}")
            t1 = time.perf_counter()
            if mounted_rc != 0:
                raise BenchError(f"mount exit {mounted_rc}: {tail(errfile.read_text(errors='replace'))}")
            if backend != "kernel":
                m.pids = daemon_pids(mnt)  # untimed: only to wait for the daemon's exit below
            t2 = time.perf_counter()
            umounted_rc = subprocess.run(umount_cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                         stderr=err, env=env, timeout=MOUNT_TIMEOUT).returncode
            t3 = time.perf_counter()
        if umounted_rc != 0 or is_mounted(mnt):
            raise BenchError(f"unmount exit {umounted_rc}: {tail(errfile.read_text(errors='replace'))}")
    finally:
        unmount(m)  # nothing to do when unmounted but wait for the daemon to exit
    return (t1 - t0) + (t3 - t2)


_SHARED: list = []  # the shared cowfs daemon of mount_cycle_shared, started at its first use


@workload("mount_cycle_shared", stack="layers1", cycle=True)
def mount_cycle_shared(backend: str, stack: Stack, rundir: Path, ctx: Ctx) -> float:
    """The same cycle when cowfs's test toolkit keeps one daemon for every mount (cowfs.testing.shared).

    What a property-based test that mounts a stack per example pays per mount
    with `SharedDaemon`: mount, stat, unmount, each answered by the running
    daemon. fuse-overlayfs and the kernel have no such daemon: their cycle is
    mount_cycle's.
    """
    if backend != "cowfs":
        return mount_cycle(backend, stack, rundir, ctx)
    from cowfs.testing.shared import SharedDaemon
    if not _SHARED:
        _SHARED.append(SharedDaemon())
    daemon = _SHARED[0]
    upper, work, mnt = rundir / "upper", rundir / "work", rundir / "mnt"
    t0 = time.perf_counter()
    daemon.mount([stack.root / name for name in stack.lowers], upper, work, mnt)
    try:
        os.stat(mnt / f"top-{stack.lowers[-1]}")
    finally:
        daemon.unmount(mnt)
    return time.perf_counter() - t0


def memory_after_walk(m: Mount, tree: Path) -> int:
    run(["find", str(tree)])
    run(["ls", "-lR", str(tree)])
    return peak_memory(m.pids)


@workload("mem_tree", fresh=True, warmup=False, unit="B", kernel=False)
def mem_tree(m: Mount, ctx: Ctx) -> int:
    """Daemon peak RSS (VmHWM) after `find` + `ls -lR` over the 20k-file tree."""
    return memory_after_walk(m, m.path / "tree")


@workload("mem_bigtree", stack="bigtree", fresh=True, warmup=False, unit="B", kernel=False, max_reps=1)
def mem_bigtree(m: Mount, ctx: Ctx) -> dict[str, float]:
    """Daemon peak RSS (VmHWM) after `ls -lR` of the 200k-file tree, and its growth per file.

    `mem_bigtree`: the peak over the daemon's processes right after `ls -lR`
    on a fresh mount (one rep: slow, and a peak barely varies);
    `mem_bigtree_per_file`: (that peak - the resident size right after
    mount) / number of files, in bytes.
    """
    start = peak_memory(m.pids, "VmRSS")
    run(["ls", "-lR", str(m.path / "tree")])
    peak = peak_memory(m.pids)
    return {"mem_bigtree": peak, "mem_bigtree_per_file": (peak - start) / ctx.sizes.bigtree_files}


# --------------------------------------------------------------------------- running


@dataclass
class Cell:
    """One metric on one backend: every repetition, or why there is none."""

    unit: str
    values: list[float] = field(default_factory=list)
    warmup: list[float] = field(default_factory=list)
    error: str | None = None

    @property
    def median(self) -> float | None:
        return statistics.median(self.values) if self.values and not self.error else None


def as_metrics(name: str, value) -> dict[str, float]:
    return value if isinstance(value, dict) else {name: value}


def record(results: dict, backend: str, wl: Workload, value, is_warmup: bool, label: str) -> None:
    for metric, v in as_metrics(wl.name, value).items():
        cell = results.setdefault(metric, {}).setdefault(backend, Cell(wl.unit))
        (cell.warmup if is_warmup else cell.values).append(v)
        log(f"{backend:<14} {metric:<22} {label:<8} {fmt(v, wl.unit)}")


def settle(rundir: Path, cold: bool) -> None:
    """Fresh upper/work, then sync (and drop caches) so that neither the previous
    repetition's writeback nor its deletions (discards) land in the next timing."""
    fresh_rundir(rundir)
    if cold:
        drop_caches()
    else:
        os.sync()


def run_workload(wl: Workload, backend: str, ctx: Ctx, rundir: Path, results: dict) -> None:
    """Warm-up and repetitions of one workload on one backend."""
    stack = ctx.stacks.get(wl.stack)
    reps = min(ctx.sizes.reps, wl.max_reps or ctx.sizes.reps)
    plan = ([("warm-up", True)] if wl.warmup else []) + [(f"rep {i + 1}/{reps}", False) for i in range(reps)]
    if wl.cycle:
        for label, is_warmup in plan:
            settle(rundir, wl.cold)
            record(results, backend, wl, wl.fn(backend, stack, rundir, ctx), is_warmup, label)
    elif wl.fresh:
        for label, is_warmup in plan:
            settle(rundir, wl.cold)
            with mounted(backend, stack, rundir, wl.volatile) as m:
                record(results, backend, wl, wl.fn(m, ctx), is_warmup, label)
    else:
        settle(rundir, wl.cold)
        with mounted(backend, stack, rundir, wl.volatile) as m:
            for label, is_warmup in plan:
                record(results, backend, wl, wl.fn(m, ctx), is_warmup, label)


def mark(results: dict, wl: Workload, backend: str, error: str, ctx: Ctx) -> None:
    """Record a workload's failure (or n/a) on every metric it would have produced."""
    metrics = [name for name in results if name == wl.name or name.startswith(wl.name + "_")]
    if not metrics:
        metrics = ([f"{wl.name}_first", f"{wl.name}_repeat"] if wl.name.startswith(("stat_", "lookup_"))
                   else [wl.name, f"{wl.name}_per_file"] if wl.name == "mem_bigtree" else [wl.name])
    for metric in metrics:
        cell = results.setdefault(metric, {}).setdefault(backend, Cell(wl.unit))
        cell.error = error


def run_all(workloads: list[Workload], backends: list[str], ctx: Ctx, scratch: Path) -> dict:
    results: dict[str, dict[str, Cell]] = {}
    dead: dict[str, str] = {}  # backends whose mount hung: skip the rest
    for wl in workloads:
        for backend in backends:
            if backend == "kernel" and not wl.kernel:
                mark(results, wl, backend, "n/a", ctx)
                continue
            if backend in dead:
                mark(results, wl, backend, dead[backend], ctx)
                continue
            log(f"{backend:<14} {wl.name}")
            try:
                run_workload(wl, backend, ctx, scratch / "run" / backend, results)
            except (BenchError, OSError, subprocess.SubprocessError) as e:
                reason = f"failed: {e}"
                log(f"{backend:<14} {wl.name}: {reason}")
                mark(results, wl, backend, reason, ctx)
                if "timed out" in str(e):
                    dead[backend] = reason
    return results


# --------------------------------------------------------------------------- registry rows (optional group)

REGISTRY_IMAGE_MIB = 100  # the image pulled and pushed: four layers, half random half text
REGISTRY_TOOLS = ("cowfs", "skopeo")
STORAGE_TOOL = "skopeo-storage"  # skopeo copy into containers-storage (overlay driver): it unpacks, as cowfs does


def storage_pull(ref: str, target: Path) -> float:
    """Seconds of skopeo copy of `ref` into a fresh containers-storage under `target` (overlay driver, its
    own storage.conf); the mounts the driver leaves under `target` are unmounted and the tree removed."""
    target.mkdir(parents=True)
    conf = target / "storage.conf"
    conf.write_text(f'[storage]\ndriver = "overlay"\ngraphroot = "{target}/root"\nrunroot = "{target}/run"\n')
    env = dict(os.environ, CONTAINERS_STORAGE_CONF=str(conf))
    try:
        return timed(["skopeo", "copy", "-q", "--src-tls-verify=false", f"docker://{ref}",
                      f"containers-storage:[overlay@{target}/root+{target}/run]bench/app:1"], env=env)
    finally:
        with open("/proc/self/mounts") as f:
            mounted = [line.split()[1].replace("\\040", " ") for line in f]
        for point in sorted((m for m in mounted if m.startswith(f"{target}/")), key=len, reverse=True):
            subprocess.run(["umount", point], stderr=subprocess.DEVNULL, check=False)
        remove_tree(target)


def registry_missing() -> str | None:
    """Why the registry rows cannot run (docker-registry or skopeo missing), or None."""
    from cowfs.testing.registry import unavailable

    return unavailable() or (None if shutil.which("skopeo") else "no skopeo")


def registry_layer(path: Path, index: int, mib: int) -> None:
    """A layer tar of `mib` MiB: files of random bytes (incompressible) and of text (compressible)."""
    text = b"".join(b"line %d of a text file in layer %d, as configuration and scripts are\n" % (i, index)
                    for i in range(4096))
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tf:
        for i in range(mib):
            data = os.urandom(1 << 19) + (text * 8)[: 1 << 19]
            info = tarfile.TarInfo(f"layer{index}/file{i:04d}")
            info.size, info.mtime, info.mode = len(data), 1_000_000_000, 0o644
            tf.addfile(info, io.BytesIO(data))


def registry_rows(scratch: Path, reps: int, quick: bool) -> dict[str, dict[str, Cell]]:
    """pull_registry and push_registry: cowfs pull/push of a ~100 MiB image against a private loopback
    docker-registry, side by side with skopeo copy of the same image (to an OCI layout; from the
    docker save archive cowfs save writes, whose layers skopeo compresses as cowfs does). The ratio is on
    skopeo's download to an OCI layout; as root, pulls are also timed into containers-storage's overlay
    driver (skopeo-storage), which unpacks each layer as cowfs does."""
    from cowfs.testing.registry import private_registry

    mib = 8 if quick else REGISTRY_IMAGE_MIB
    root = scratch / "registry"
    remove_tree(root)
    root.mkdir(parents=True)
    cowfs = [sys.executable, "-m", "cowfs"]
    layers = []
    for i in range(4):
        path = root / f"layer{i}.tar"
        registry_layer(path, i, mib // 4)
        layers.append(path)
    # a docker save archive of the layers, imported into the store the pushes start from
    diff_ids = ["sha256:" + hashlib.sha256(p.read_bytes()).hexdigest() for p in layers]
    config = json.dumps({"architecture": "amd64", "os": "linux", "config": {},
                         "rootfs": {"type": "layers", "diff_ids": diff_ids},
                         "history": [{"created_by": f"layer {i}"} for i in range(4)]}).encode()
    archive = root / "image.tar"
    with tarfile.open(archive, "w") as tf:
        for i, p in enumerate(layers):
            tf.add(str(p), f"l{i}.tar")
        info = tarfile.TarInfo("config.json")
        info.size = len(config)
        tf.addfile(info, io.BytesIO(config))
        manifest = json.dumps([{"Config": "config.json", "RepoTags": ["bench/app:1"],
                                "Layers": [f"l{i}.tar" for i in range(4)]}]).encode()
        info = tarfile.TarInfo("manifest.json")
        info.size = len(manifest)
        tf.addfile(info, io.BytesIO(manifest))
    source = root / "source-store"
    run(cowfs + ["import", "-q", str(archive), "--store", str(source)])
    results: dict[str, dict[str, Cell]] = {"pull_registry": {}, "push_registry": {}}
    for tool in REGISTRY_TOOLS:
        for metric in results:
            results[metric][tool] = Cell("s")
    with_storage = os.geteuid() == 0
    if with_storage:
        results["pull_registry"][STORAGE_TOOL] = Cell("s")
    plan = [("warm-up", True)] + [(f"rep {i + 1}/{reps}", False) for i in range(reps)]
    for label, is_warmup in plan:
        with private_registry(base=str(root / "reg")) as reg:
            # push: into an empty registry, nothing cached (cowfs compresses every layer, as skopeo does)
            with contextlib.suppress(FileNotFoundError):
                (source / "distribution.json").unlink()
            ref = f"{reg.host}/bench/app:1"
            run(cowfs + ["tag", "bench/app:1", ref, "--store", str(source)])
            for tool, cmd in (("cowfs", cowfs + ["push", "-q", ref, "--store", str(source)]),
                              ("skopeo", ["skopeo", "copy", "-q", "--dest-tls-verify=false",
                                          f"docker-archive:{archive}", f"docker://{reg.host}/bench/sk:1"])):
                os.sync()
                took = timed(cmd)
                cell = results["push_registry"][tool]
                (cell.warmup if is_warmup else cell.values).append(took)
                log(f"{tool:<14} push_registry          {label:<8} {fmt(took, 's')}")
            # pull: into an empty store, an empty OCI layout
            for tool in REGISTRY_TOOLS:
                target = root / f"pulled-{tool}"
                remove_tree(target)
                cmd = (cowfs + ["pull", "-q", ref, "--store", str(target)] if tool == "cowfs" else
                       ["skopeo", "copy", "-q", "--src-tls-verify=false", f"docker://{ref}", f"oci:{target}:x"])
                os.sync()
                took = timed(cmd)
                cell = results["pull_registry"][tool]
                (cell.warmup if is_warmup else cell.values).append(took)
                log(f"{tool:<14} pull_registry          {label:<8} {fmt(took, 's')}")
                remove_tree(target)
            if with_storage:
                target = root / "pulled-storage"
                remove_tree(target)
                os.sync()
                took = storage_pull(ref, target)
                cell = results["pull_registry"][STORAGE_TOOL]
                (cell.warmup if is_warmup else cell.values).append(took)
                log(f"{STORAGE_TOOL:<14} pull_registry          {label:<8} {fmt(took, 's')}")
        remove_tree(root / "reg")
    return results


def registry_table(rows: dict[str, dict[str, Cell]]) -> str:
    lines = [f"{'registry (median)':<20}{'cowfs':>10}{'skopeo':>10}{'cowfs/skopeo':>14}"
             f"{'skopeo-storage':>16}{'cowfs/storage':>15}"]
    for metric, row in rows.items():
        r = ratio(row, "cowfs", "skopeo")
        rs = ratio(row, "cowfs", STORAGE_TOOL)
        storage = cell_text(row[STORAGE_TOOL]) if STORAGE_TOOL in row else "-"
        lines.append(f"{metric:<20}{cell_text(row['cowfs']):>10}{cell_text(row['skopeo']):>10}"
                     f"{(f'{r:.2f}' if r is not None else '-'):>14}{storage:>16}"
                     f"{(f'{rs:.2f}' if rs is not None else '-'):>15}")
    return "\n".join(lines)


# --------------------------------------------------------------------------- reporting


def fmt(value: float | None, unit: str) -> str:
    if value is None:
        return "-"
    if unit == "x":
        return f"{value:.2f}x"
    if unit == "B":
        return f"{value / 2**20:.1f} MiB" if abs(value) >= 2**20 else f"{value:.0f} B"
    for scale, suffix in ((1, "s"), (1e-3, "ms"), (1e-6, "us")):
        if value >= scale or suffix == "us":
            return f"{value / scale:.3g} {suffix}"
    return str(value)


def ratio(results_row: dict[str, Cell], a: str, b: str) -> float | None:
    ca, cb = results_row.get(a), results_row.get(b)
    if not ca or not cb or ca.median is None or not cb.median:
        return None
    return ca.median / cb.median


def cell_text(cell: Cell | None) -> str:
    if cell is None:
        return "-"
    if cell.error:
        return cell.error if len(cell.error) <= 60 else cell.error[:57] + "..."
    return fmt(cell.median, cell.unit)


def table(results: dict, backends: list[str]) -> str:
    header = ["workload (median)"] + backends + ["cowfs/fuse-ovl", "cowfs/kernel"]
    rows = [header]
    for metric, row in results.items():
        ratios = [ratio(row, "cowfs", "fuse-overlayfs"), ratio(row, "cowfs", "kernel")]
        rows.append([metric] + [cell_text(row.get(b)) for b in backends]
                    + [f"{r:.2f}" if r is not None else "-" for r in ratios])
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
             for r in rows]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def legend(results: dict, workloads: list[Workload]) -> str:
    """What each row measures: the first line of its workload's description."""
    lines = []
    for wl in workloads:
        metrics = [m for m in results if m == wl.name or m.startswith(wl.name + "_")]
        if metrics:
            names = wl.name if metrics == [wl.name] else ", ".join(metrics)
            lines.append(f"{names}: {(wl.fn.__doc__ or '').strip().splitlines()[0]}")
    lines += [f"{m}: each backend's median at the deepest stack over its median at the shallowest"
              for m in results if "/" in m]
    return "\n".join(lines)


def environment(scratch: Path) -> dict:
    params = {}
    pdir = Path("/sys/module/overlay/parameters")
    if pdir.is_dir():
        for p in sorted(pdir.iterdir()):
            with contextlib.suppress(OSError):
                params[p.name] = p.read_text().strip()
    return {
        "kernel": platform.release(),
        "python": sys.version.split()[0],
        "python_executable": sys.executable,
        "cpu_count": os.cpu_count(),
        "fuse_overlayfs": [line for line in command_output(["fuse-overlayfs", "--version"]).splitlines()
                           if "version" in line and "unknown argument" not in line],
        "cowfs_git": command_output(["git", "-C", str(REPO), "describe", "--always", "--dirty"]),
        "overlay_module_parameters": params,
        "scratch_fs": command_output(["findmnt", "-no", "FSTYPE,OPTIONS", "-T", str(scratch)]),
        "drop_caches": can_drop_caches(),
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def write_json(path: Path, results: dict, env: dict, sizes: Sizes, workloads: list[Workload],
               argv: list[str], total: float, stacks: Stacks, registry: dict | None = None) -> None:
    doc = {
        "command": " ".join(argv),
        "environment": env,
        "sizes": asdict(sizes),
        "tarball_files": stacks.tarball_files,
        "workloads": {wl.name: (wl.fn.__doc__ or "").strip() for wl in workloads},
        "results": {metric: {b: asdict(c) | {"median": c.median} for b, c in row.items()}
                    for metric, row in results.items()},
        "ratios": {metric: {"cowfs/fuse-overlayfs": ratio(row, "cowfs", "fuse-overlayfs"),
                            "cowfs/kernel": ratio(row, "cowfs", "kernel")}
                   for metric, row in results.items()},
        "registry": {metric: {t: asdict(c) | {"median": c.median} for t, c in row.items()}
                     | {"cowfs/skopeo": ratio(row, "cowfs", "skopeo"),
                        "cowfs/skopeo-storage": ratio(row, "cowfs", STORAGE_TOOL)}
                     for metric, row in (registry or {}).items()},
        "total_seconds": total,
    }
    path.write_text(json.dumps(doc, indent=2) + "\n")


def plot(path: Path, results: dict) -> str:
    """Horizontal bars of both ratios per metric (log scale); a one-line note either way."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "plot skipped: matplotlib is not importable"
    metrics = list(results)
    vs_fo = [ratio(results[m], "cowfs", "fuse-overlayfs") or math.nan for m in metrics]
    vs_k = [ratio(results[m], "cowfs", "kernel") or math.nan for m in metrics]
    if all(math.isnan(r) for r in vs_fo + vs_k):
        return "plot skipped: no ratios to plot"
    fig, ax = plt.subplots(figsize=(8, 0.35 * len(metrics) + 1.5))
    ys = range(len(metrics))
    ax.barh([y - 0.2 for y in ys], vs_fo, height=0.4, label="cowfs / fuse-overlayfs")
    ax.barh([y + 0.2 for y in ys], vs_k, height=0.4, label="cowfs / kernel")
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.set_xscale("log")
    ax.set_yticks(list(ys), metrics)
    ax.invert_yaxis()
    ax.set_xlabel("ratio of medians (lower is better for cowfs)")
    ax.legend(loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=2, frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return f"plot: {path}"


# --------------------------------------------------------------------------- main


def interrupt(signum, frame) -> None:
    """SIGINT/SIGTERM: unwind through every finally, which unmounts."""
    raise KeyboardInterrupt


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes and 3 repetitions (under a minute)")
    p.add_argument("--out", type=Path, default=REPO / "scratch" / "bench-out", help="where results go")
    p.add_argument("--scratch", type=Path, default=REPO / "scratch" / "bench",
                   help="layers, uppers and mountpoints (emptied first)")
    p.add_argument("--only", nargs="+", metavar="WORKLOAD", help="workload names or globs (e.g. 'stat_*')")
    p.add_argument("--backends", default=",".join(BACKENDS), help="comma-separated subset of: " + ",".join(BACKENDS))
    p.add_argument("--reps", type=int, help="repetitions per workload (default 5, --quick 3)")
    p.add_argument("--list", action="store_true", help="list the workloads and exit")
    return p.parse_args(argv)


REGISTRY_ROWS = ("pull_registry", "push_registry")


def registry_wanted(patterns: list[str] | None) -> bool:
    return not patterns or any(fnmatch.fnmatchcase(n, p) for p in patterns for n in REGISTRY_ROWS)


def select(workloads: list[Workload], patterns: list[str] | None) -> list[Workload]:
    if not patterns:
        return workloads
    chosen = [wl for wl in workloads if any(fnmatch.fnmatchcase(wl.name, p) for p in patterns)]
    if not chosen and not registry_wanted(patterns):
        raise SystemExit(f"bench: no workload matches {' '.join(patterns)} (see --list)")
    return chosen


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    sizes = QUICK if args.quick else FULL
    if args.reps:
        sizes = Sizes(**(asdict(sizes) | {"reps": args.reps}))
    register_stat_workloads(sizes.layer_counts)
    if args.list:
        for wl in WORKLOADS:
            print(f"{wl.name:<20} {(wl.fn.__doc__ or '').strip().splitlines()[0]}")
        for name in REGISTRY_ROWS:
            print(f"{name:<20} cowfs {name.split('_')[0]} of a {REGISTRY_IMAGE_MIB} MiB image from a local registry, "
                  "beside skopeo copy (optional: needs docker-registry and skopeo)")
        return 0
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    if unknown := set(backends) - set(BACKENDS):
        raise SystemExit(f"bench: unknown backend {', '.join(sorted(unknown))}")
    workloads = select(WORKLOADS, args.only)
    scratch, out = args.scratch.resolve(), args.out.resolve()

    signal.signal(signal.SIGINT, interrupt)  # also when started in the background (SIGINT ignored)
    signal.signal(signal.SIGTERM, interrupt)
    unmount_leftovers(scratch)
    remove_tree(scratch)
    scratch.mkdir(parents=True)
    out.mkdir(parents=True, exist_ok=True)
    if not can_drop_caches():
        log("WARNING: cannot write /proc/sys/vm/drop_caches (not root?): 'cold' runs are only remounted")
    ctx = Ctx(sizes, Stacks(scratch, sizes))
    results, interrupted = {}, False
    registry: dict[str, dict[str, Cell]] = {}
    registry_note = ""
    try:
        results = run_all(workloads, backends, ctx, scratch)
        if registry_wanted(args.only):
            missing = registry_missing()
            if missing:
                registry_note = f"registry rows skipped: {missing}"
                log(registry_note)
            else:
                try:
                    registry = registry_rows(scratch, sizes.reps, args.quick)
                except (BenchError, OSError, subprocess.SubprocessError, RuntimeError) as e:
                    registry_note = f"registry rows failed: {e}"
                    log(registry_note)
    except KeyboardInterrupt:
        interrupted = True
        log("interrupted: unmounting")
    finally:
        for daemon in _SHARED:
            daemon.close()
        unmount_all()
        unmount_leftovers(scratch)  # e.g. a mount that came up just as Ctrl-C arrived
    total = time.perf_counter() - START
    if interrupted:
        return 130

    results = depth_rows(results, sizes.layer_counts)
    text = table(results, backends) + "\n\n" + legend(results, workloads) if results else ""
    if registry:
        text += ("\n\n" if text else "") + registry_table(registry) + "\n" + (registry_rows.__doc__ or "").strip()
    elif registry_note:
        text += ("\n\n" if text else "") + registry_note
    notes = (f"{'quick run (smaller sizes than the descriptions say: see sizes in bench.json)' if args.quick else 'full run'}, "
             f"median of {sizes.reps} repetitions after a warm-up; "
             f"ratios < 1 mean cowfs is faster. Total time {total:.0f} s.")
    print(text)
    print(notes)
    write_json(out / "bench.json", results, environment(scratch), sizes, workloads,
               [Path(sys.executable).name, "scripts/bench.py", *argv], total, ctx.stacks, registry)
    (out / "bench.txt").write_text(text + "\n" + notes + "\n")
    print(f"raw numbers: {out / 'bench.json'}")
    print(plot(out / "bench.png", results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
