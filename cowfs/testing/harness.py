"""The differential harness: the modes, the known differences, and the kernel and cowfs sides mounted over one stack.

Both differential suites run on it: the fixed scenarios of
``tests/test_differential.py`` (``compare_scenario``) and the Hypothesis
parity machine of ``cowfs.testing.machine`` (``Pair`` with a chroot-ed
``Worker`` per side).  The pieces:

``MODES``
    Each mode's kernel options and cowfs options (and, for the parity
    machine, how many lower layers it draws).  The kernel always also gets
    ``KERNEL_COMMON`` (``index=off``).
``Side``
    One mounted stack, kernel or cowfs: its own upper, work directory and
    mount point over the given lowers; ``start()`` checks that the mount
    point shows the expected filesystem, ``stop()`` always unmounts (and
    reaps a cowfs daemon) and reports what went wrong instead of raising.
``Pair``
    The kernel (the reference) and the tested side (cowfs, or a second
    kernel mount to check the harness itself) over the same lowers, with
    the lowers' snapshot from before, and a fresh mount of any upper.
``KNOWN_DIFFERENCES``
    Every known difference between the kernel and cowfs, by name, each with
    a one-line reason, and where it is excused by name (never by loosening a
    comparison).  README.rst, "Differences from the kernel", says more.

Outcomes are recorded by ``cowfs.testing.outcomes``; layers are written by
``cowfs.testing.layers``; trees are compared by ``cowfs.testing.tree``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

from cowfs.overlay import handles
from cowfs.testing.mounts import (
    CowfsMount,
    KernelOverlay,
    MountError,
    StrPath,
    force_unmount,
    mounts_under,
    with_userxattr_unless_privileged,
)
from cowfs.testing.outcomes import Outcome, Session, diff_outcomes
from cowfs.testing.tree import diff_snapshots, snapshot
from cowfs.testing.worker import Ops, Worker

KERNEL_COMMON = ("index=off",)
BACKENDS = ("cowfs", "kernel")


# --------------------------------------------------------------------------
# the modes

@dataclasses.dataclass(frozen=True)
class Mode:
    """How both sides are mounted (and, for the parity machine, how many lower layers are drawn)."""

    name: str
    kernel_options: tuple[str, ...]
    cowfs_options: tuple[str, ...]
    userxattr: bool = False  # overlay xattrs in the layers are user.overlay.*, not trusted.overlay.*
    min_layers: int = 1
    max_layers: int = 3
    data_only: int = 0  # the last lower layers of a stack are data-only (`lowerdir=A::D`)
    # the mode the operations run in, when another: each side then unmounts and mounts again with this
    # mode's options, and what it shows is compared (an upper written with redirects, read without them)
    written_with: str | None = None

    def options(self, kind: str) -> list[str]:
        """The options a *kind* ("kernel" or "cowfs") side is mounted with in this mode
        (the kernel's ``KERNEL_COMMON`` are added by ``Side``)."""
        if kind not in BACKENDS:
            raise ValueError(f"kind must be one of {BACKENDS}, not {kind!r}")
        return list(self.kernel_options if kind == "kernel" else self.cowfs_options)


MODES: dict[str, Mode] = {m.name: m for m in (
    Mode("redirect_off", ("redirect_dir=off", "metacopy=off"), ("redirect_dir=off",)),
    Mode("redirect_on", ("redirect_dir=on", "metacopy=off"), ("redirect_dir=on",)),
    # the kernel refuses userxattr together with any redirect_dir option (and with metacopy=on)
    Mode("userxattr", ("userxattr", "metacopy=off"), ("userxattr",), userxattr=True),
    # metacopy=on implies redirect_dir=on in both; said explicitly
    Mode("metacopy", ("metacopy=on", "redirect_dir=on"), ("metacopy=on", "redirect_dir=on")),
    # index=on: lower hard links stay one file across copy-up (WORKDIR/index is compared too)
    Mode("index", ("index=on", "redirect_dir=on", "metacopy=off"), ("index=on", "redirect_dir=on")),
    # both: a lower hard link is copied up metadata only, into WORKDIR/index, its data at the first write
    Mode("index_metacopy", ("index=on", "metacopy=on", "redirect_dir=on"),
         ("index=on", "metacopy=on", "redirect_dir=on")),
    # the last two lower layers are data-only (`lowerdir=A:B::D1::D2`): reached by metacopy redirects only
    Mode("data_only", ("metacopy=on", "redirect_dir=on"), ("metacopy=on", "redirect_dir=on"), data_only=2),
    Mode("many_layers", ("redirect_dir=on", "metacopy=off"), ("redirect_dir=on",), min_layers=4, max_layers=6),
    Mode("many_layers_off", ("redirect_dir=off", "metacopy=off"), ("redirect_dir=off",), min_layers=4,
         max_layers=6),
    # an upper written with redirect_dir=on, read back without creating redirects: following them, or not
    # (then the kernel refuses a lookup through one with EPERM)
    Mode("redirect_follow", ("redirect_dir=follow", "metacopy=off"), ("redirect_dir=follow",),
         written_with="redirect_on"),
    Mode("redirect_nofollow", ("redirect_dir=nofollow", "metacopy=off"), ("redirect_dir=nofollow",),
         written_with="redirect_on"),
    # fs-verity digests of metacopy data. Since Linux 6.16 verity= neither implies nor needs metacopy=on, and
    # acts only with it, so both are given. No file has fs-verity on the test machines: verity=on makes the
    # same digest-less metacopy copies as metacopy=on, verity=require copies whole instead
    Mode("verity_on", ("verity=on", "metacopy=on", "redirect_dir=on"), ("verity=on", "metacopy=on", "redirect_dir=on")),
    Mode("verity_require", ("verity=require", "metacopy=on", "redirect_dir=on"),
         ("verity=require", "metacopy=on", "redirect_dir=on")),
    # an upper written with metacopy=on alone, read under verity=require: its metacopy files record no
    # digest, so reading their data fails with EIO
    Mode("verity_require_over_metacopy", ("verity=require", "metacopy=on", "redirect_dir=on"),
         ("verity=require", "metacopy=on", "redirect_dir=on"), written_with="metacopy"),
    # data-only layers under verity=require: the metadata layer's metacopy files record no digest
    Mode("data_only_verity_require", ("verity=require", "metacopy=on", "redirect_dir=on"),
         ("verity=require", "metacopy=on", "redirect_dir=on"), data_only=2),
)}


# --------------------------------------------------------------------------
# the known differences

SCENARIOS = "scenarios"  # the fixed scenarios of tests/test_differential.py
PARITY = "parity"  # the Hypothesis parity machine (cowfs.testing.machine)


@dataclasses.dataclass(frozen=True)
class KnownDifference:
    """One known way cowfs differs from the kernel, with a one-line reason.

    *excused_in* names the harnesses that take it back by name where it shows
    (``SCENARIOS``: at the fixed scenario *scenario*'s outcome *label*, or the
    whole scenario as a strict xfail when *label* is None; ``PARITY``: by the
    rule in ``excuse_value``/``excuse_tree``).  One excused nowhere is kept out
    of the comparisons as *kept_out* says, and has a strict-xfail regression
    test where that applies.
    """

    name: str
    reason: str
    excused_in: frozenset[str] = frozenset()
    scenario: str | None = None
    label: str | None = None
    kept_out: str = ""


KNOWN_DIFFERENCES: dict[str, KnownDifference] = {d.name: d for d in (
    KnownDifference(
        "unmerged_whiteouts",
        "the kernel lists the whiteouts of a directory that only one lower layer makes up (lstat of them: ENOENT); "
        "cowfs hides them",
        kept_out="not drawn (strategies.drop_unmerged_whiteouts); strict xfail in tests/test_parity.py"),
    KnownDifference(
        "small_holes",
        "the kernel's copy-up fills a hole smaller than its 1 MiB copy chunk, so the copy is no longer sparse; "
        "cowfs keeps every hole",
        excused_in=frozenset({PARITY}),
        kept_out="excused: a regular file sparse under cowfs and not under the kernel, nothing else"),
    KnownDifference(
        "odirect_unaligned",
        "the kernel overlay hands O_DIRECT to the upper fs, which refuses an unaligned write (EINVAL on ext4); "
        "cowfs gets the data through FUSE and writes it",
        excused_in=frozenset({SCENARIOS}),
        scenario="odirect", label="O_DIRECT pwrite unaligned.bin 100@1 aligned=False"),
    KnownDifference(
        "index_link_up_name",
        "index=on: FUSE hands the daemon an inode, not a name, so a change through a not yet linked name of an "
        "indexed lower hard link links up the name the mount first found (the kernel links the name used)",
        excused_in=frozenset({SCENARIOS, PARITY}), scenario="index_link_up_other_name",
        kept_out="excused in parity: an upper that differs only in which names of indexed files (nlink xattr) "
                 "are linked, and in the bare directories holding them; the other index scenarios change a file "
                 "through a name first looked up after a remount"),
    KnownDifference(
        "fallocate_shift",
        "FUSE passes no FALLOC_FL_COLLAPSE_RANGE or INSERT_RANGE to a daemon (EOPNOTSUPP); the kernel overlay "
        "hands them to the upper fs",
        kept_out="not in the scenarios or fsx draws; strict xfail in tests/test_fileops.py"),
    KnownDifference(
        "refused_options",
        "cowfs refuses nfs_export=on (a FUSE mount is not exported by the overlay's NFS code), which the kernel "
        "mounts without an upper",
        kept_out="tests/test_kernel_options.py expects this refusal"),
    KnownDifference(
        "protection_after_type",
        "rmdir of a non-directory, unlink of a directory or a rename onto another type, in or of an append-only "
        "or immutable object: the kernel overlay says EPERM; through FUSE the VFS finds the wrong type (ENOTDIR, "
        "EISDIR) before cowfs, which alone knows the flags, is asked",
        excused_in=frozenset({SCENARIOS, PARITY}),
        scenario="chattr_set_through_mount", label="rmdir dir/f.txt"),
    KnownDifference(
        "fstat_nlink",
        "FUSE reports 0 links on a descriptor of a file unlinked through the mount, even one with names left",
        kept_out="not recorded: the parity machine's fstat leaves the link count out"),
)}


def excused(harness: str) -> frozenset[str]:
    """The names of the known differences *harness* (``SCENARIOS`` or ``PARITY``) excuses by default."""
    return frozenset(d.name for d in KNOWN_DIFFERENCES.values() if harness in d.excused_in)


def failing_scenarios() -> dict[str, str]:
    """Fixed scenarios cowfs cannot pass as a whole (strict xfails, so that a fix shows up): name -> reason."""
    return {d.scenario: d.reason for d in KNOWN_DIFFERENCES.values()
            if SCENARIOS in d.excused_in and d.scenario and d.label is None}


def excuse_outcomes(scenario: str, outcomes: list[tuple[str, Outcome]],
                    names: Iterable[str]) -> list[tuple[str, Outcome]]:
    """*outcomes* of fixed scenario *scenario* with each one a known difference in *names* names
    replaced by ``"excluded: <reason>"`` (apply it to both sides' lists)."""
    at = {(d.scenario, d.label): d.reason for d in map(KNOWN_DIFFERENCES.__getitem__, names) if d.label}
    return [(label, "excluded: " + at[(scenario, label)]) if (scenario, label) in at else (label, value)
            for label, value in outcomes]


def _sparse_only_here(ref: Any, got: Any) -> bool:
    """The small_holes rule: *got* describes a regular file as sparse that *ref* describes as not sparse."""
    return (isinstance(ref, dict) and isinstance(got, dict) and ref.get("type") == got.get("type") == "file"
            and ref.get("sparse") is False and got.get("sparse") is True)


def excuse_value(ref: Outcome, got: Outcome, names: Iterable[str]) -> Outcome:
    """*got* (one operation's outcome) with the known differences in *names* from *ref* taken back."""
    if "small_holes" in set(names) and ref != got and _sparse_only_here(ref, got):
        return {**got, "sparse": False}
    return got


def excuse_tree(ref: dict, got: dict, names: Iterable[str]) -> dict:
    """*got* (a tree snapshot) with the known differences in *names* from *ref* taken back."""
    names = set(names)
    if "index_link_up_name" in names and got != ref and _without_indexed_names(got) == _without_indexed_names(ref):
        return ref  # the same upper but for which names of indexed files are linked up
    if "small_holes" not in names:
        return got
    entries = dict(got["entries"])
    for rel, info in got["entries"].items():
        if _sparse_only_here(ref["entries"].get(rel), info):
            entries[rel] = {**info, "sparse": False}
    return {**got, "entries": entries}


def _without_indexed_names(snap: dict) -> dict:
    """An upper snapshot less the names of indexed files (those with an overlay nlink xattr), and less
    the directories, marked by no overlay xattr (a lower one's own xattrs come up with it), that held
    only such names."""
    entries = {rel: info for rel, info in snap["entries"].items()
               if not any(k.endswith("overlay.nlink") for k in info.get("xattrs", {}))}
    for rel in sorted(entries, key=lambda r: -r.count("/")):  # deepest first
        if rel != "." and entries[rel].get("type") == "dir" \
                and not any(".overlay." in "." + k for k in entries[rel].get("xattrs", {})) \
                and not any(other.startswith(rel + "/") for other in entries):
            del entries[rel]
    return {"entries": entries}


# The overlay xattrs that identify objects rather than describe the merge: the kernel's origin file
# handles (and the "impure" and "uuid" marks that go with them), cowfs's own origin inode number.
# Their values are not compared as they are (see upper_snapshot for what is).
IDENTITY_XATTRS = ("origin", "impure", "uuid", "cowfs.origin")
UUID_SIZE = 16


def _identity_value(name: str, value: Any) -> Any:
    """What is compared of an identity xattr: the presence of the overlay's UUID (random, but
    16 bytes; another value as it is), and the filesystem UUID an origin file handle carries."""
    if not isinstance(value, bytes):
        return value  # an error reading it
    if name == "uuid":
        return f"<{UUID_SIZE} bytes>" if len(value) == UUID_SIZE else value
    try:
        decoded = handles.decode(value)
    except ValueError:
        return value
    return value if decoded is None else "<origin on uuid " + decoded[2].hex() + ">"


def upper_snapshot(upper: str, userxattr: bool, origins: bool = False) -> dict:
    """The upper directory *upper* as the overlay left it on disk, comparable between the kernel and
    cowfs: names, types, modes, owners, sizes, content, whiteouts, every xattr but IDENTITY_XATTRS,
    of which only the overlay's UUID is compared: whether it is there (its value is random), and,
    with *origins*, the filesystem UUID each origin file handle carries (not by default: where the
    kernel records an origin and where cowfs does differ without a difference either shows).

    A whiteout's link count is left out, and so is any hard-link group of whiteouts only: the kernel
    may share one whiteout inode between several names (a link to W/work's "whiteout"), cowfs
    makes one per name; either is the same whiteout to any reader."""
    prefix = "user.overlay." if userxattr else "trusted.overlay."
    kept = {prefix + "uuid"} | ({prefix + "origin"} if origins else set())
    private = {prefix + name for name in IDENTITY_XATTRS}
    snap = snapshot(upper, all_xattrs=True)
    whiteouts = set()
    for rel, info in snap["entries"].items():
        xattrs = {k: _identity_value(k[len(prefix):], v) if k in kept else v
                  for k, v in info.get("xattrs", {}).items() if k in kept or k not in private}
        if xattrs:
            info["xattrs"] = xattrs
        else:
            info.pop("xattrs", None)
        if prefix + "metacopy" in xattrs:  # no data of its own: st_blocks counts only an xattr block
            info.pop("sparse", None)
        if info.get("type") == "chardev" and tuple(info.get("rdev", ())) == (0, 0):
            whiteouts.add(rel)
            info.pop("nlink", None)
    snap["hardlinks"] = [group for group in snap["hardlinks"] if not set(group) <= whiteouts]
    return snap


class Divergence(AssertionError):
    """cowfs and the kernel disagreed."""


# --------------------------------------------------------------------------
# one side, and the pair

def _mkdir(base: str, name: str) -> str:
    d = os.path.join(base, name)
    os.mkdir(d)
    os.chmod(d, 0o755)
    return d


class Side:
    """One mounted stack, kernel or cowfs: its own upper, work directory and mount point over *lowers*.

    The directories are ``BASE/LABEL-upper``, ``-work`` and ``-mnt`` (no upper
    and work when *readonly*; an existing *upper* when given).  Without root,
    *options* get ``userxattr`` (``mounts.with_userxattr_unless_privileged``).  Use it as a
    context manager, or ``start()`` and ``stop()``; either way it is unmounted
    at the end whatever happened, and a cowfs daemon is waited for.
    """

    def __init__(self, base: StrPath, label: str, kind: str, lowers: Sequence[StrPath], options: Iterable[str] = (),
                 *, upper: StrPath | None = None, work: StrPath | None = None, readonly: bool = False,
                 cowfs_cmd: Sequence[str] | None = None, data_only: int = 0, read_options: Iterable[str] | None = None):
        if kind not in BACKENDS:
            raise ValueError(f"kind must be one of {BACKENDS}, not {kind!r}")
        base = os.fspath(base)
        self.label, self.kind = label, kind
        self.lowers: list[str] = [os.fspath(d) for d in lowers]
        self.options: list[str] = with_userxattr_unless_privileged(options)  # as its mount has them
        self.upper: str | None = None
        self.work: str | None = None
        if not readonly:
            self.upper = os.fspath(upper) if upper is not None else _mkdir(base, f"{label}-upper")
            self.work = os.fspath(work) if work is not None else _mkdir(base, f"{label}-work")
        self.mountpoint: str = _mkdir(base, f"{label}-mnt")
        self.cowfs_cmd, self.data_only = cowfs_cmd, data_only
        # the options of the mount that reads what this one wrote, when another (a mode's written_with)
        self.read_options: list[str] | None = None if read_options is None else list(read_options)
        self.mount: KernelOverlay | CowfsMount = self._mount_with(self.options)
        self.worker: Worker | None = None

    def _mount_with(self, options: list[str]) -> KernelOverlay | CowfsMount:
        if self.kind == "kernel":
            return KernelOverlay(self.lowers, self.upper, self.work, self.mountpoint, list(KERNEL_COMMON) + options,
                                 self.data_only)
        return CowfsMount(self.lowers, self.upper, self.work, self.mountpoint, options, self.cowfs_cmd, self.data_only)

    def remount_to_read(self) -> None:
        """Unmount, and mount again with ``read_options`` from now on (when set; else with the same)."""
        self.mount.unmount()
        if self.read_options is not None:
            self.options = with_userxattr_unless_privileged(self.read_options)
            self.mount = self._mount_with(self.options)
            self.read_options = None
        self.start()

    def __repr__(self) -> str:
        return f"<Side {self.label} ({self.kind}) at {self.mountpoint}>"

    # -- mounting
    def start(self) -> None:
        """Mount; raises MountError (leaving nothing mounted) unless the mount point then shows
        ``overlay`` (kernel) or ``fuse.*`` (cowfs)."""
        self.mount.mount()
        want = os.path.realpath(self.mountpoint)
        fstypes = [t for m, t in mounts_under(want) if m == want]
        expected = "overlay" if self.kind == "kernel" else "fuse."
        if not fstypes or not fstypes[-1].startswith(expected):
            problems = self.stop()
            raise MountError(f"{self.mountpoint} mounted as {fstypes}, not {expected}*" +
                             ("; " + "; ".join(problems) if problems else ""))

    def remount(self) -> None:
        """Unmount and mount the same stack again."""
        self.mount.unmount()
        self.mount.mount()

    def unmount(self) -> None:
        """Unmount; raises MountError when that failed (or a cowfs daemon outlived its mount)."""
        self.mount.unmount()

    def stop(self) -> list[str]:
        """Stop the worker and unmount, whatever happens; return the problems seen (empty when none)."""
        problems = []
        if self.worker is not None:
            try:
                self.worker.stop()
            except Exception as e:
                problems.append(f"{self.label}: stopping the worker: {e}")
            self.worker = None
        try:
            self.mount.unmount()
        except Exception as e:
            problems.append(f"{self.label}: unmount: {e}")
        return problems

    def __enter__(self) -> Side:
        self.start()
        return self

    def __exit__(self, exc_type, *exc) -> bool:
        problems = self.stop()
        if problems and exc_type is None:
            raise MountError("; ".join(problems))
        return False

    # -- running operations
    def attach(self, make_ops: Callable[[], Ops]) -> Worker:
        """Start a helper process chroot-ed into the mount that runs the operations *make_ops* returns."""
        self.worker = Worker(self.mountpoint, make_ops)
        return self.worker

    def call(self, name: str, *args: Any, timeout: float | None = None) -> tuple[str, Any]:
        """Run operation *name* in the worker: ``("ok", outcome)`` or ``("exception", text)``.
        Raises AssertionError (after killing a cowfs daemon, which frees the worker) on a timeout."""
        if self.worker is None:
            raise RuntimeError(f"{self}: no worker attached")
        try:
            return self.worker.call(name, *args, timeout=timeout)
        except TimeoutError:
            if isinstance(self.mount, CowfsMount):
                self.mount.abort()  # pending requests then fail with ENOTCONN and the worker can exit
            raise AssertionError(f"{self.label}: {name}{args!r} did not return within {timeout}s")

    @contextlib.contextmanager
    def time_limit(self, seconds: float, what: str) -> Iterator[None]:
        """Run the body; past *seconds*, kill a cowfs daemon (every pending request then fails with
        ENOTCONN, so nothing hangs) and raise AssertionError at the end.  A kernel side has no limit."""
        fired = threading.Event()
        timer = None
        if isinstance(self.mount, CowfsMount):
            mount = self.mount

            def abort():
                fired.set()
                mount.abort()
            timer = threading.Timer(seconds, abort)
            timer.daemon = True
            timer.start()
        try:
            yield
        finally:
            if timer is not None:
                timer.cancel()
            if fired.is_set():
                raise AssertionError(f"{what} ran over {seconds}s on {self.label}; daemon killed")


def lower_snapshots(lowers: Iterable[StrPath]) -> list[dict]:
    """Exact snapshots of raw layer directories (every xattr, exact times), to show they never change."""
    return [snapshot(d, all_xattrs=True, exact_times=True) for d in lowers]


def lower_changes(lowers: Sequence[StrPath], before: Sequence[dict]) -> list[str]:
    """A problem per lower layer that differs from its snapshot *before*."""
    problems = []
    for d, then in zip(lowers, before):
        now = snapshot(d, all_xattrs=True, exact_times=True)
        if now != then:
            problems.append(f"lower layer {os.path.basename(os.fspath(d))} changed:\n"
                            + diff_snapshots(then, now, "before", "after"))
    return problems


class Pair:
    """The kernel (the reference, ``kernel``) and the tested side (``tested``: cowfs, or a second
    kernel mount when *backend* is "kernel") over the same *lowers* in *mode*, under *base*.

    *cowfs_options* are added to a cowfs side's options only.  The lowers are
    snapshotted at once, for ``lower_changes()``.
    """

    def __init__(self, base: StrPath, lowers: Sequence[StrPath], mode: Mode | str, backend: str = "cowfs", *,
                 readonly: bool = False, cowfs_options: Iterable[str] = ()):
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, not {backend!r}")
        self.base = os.fspath(base)
        self.lowers = [os.fspath(d) for d in lowers]
        self.mode = MODES[mode] if isinstance(mode, str) else mode
        self.backend = backend
        self.readonly = readonly
        extra = list(cowfs_options) if backend == "cowfs" else []
        writing = MODES[self.mode.written_with] if self.mode.written_with else self.mode
        reading = self.mode.written_with is not None
        data_only = self.mode.data_only
        self.kernel = Side(self.base, "kernel", "kernel", self.lowers, writing.options("kernel"), readonly=readonly,
                           data_only=data_only, read_options=self.mode.options("kernel") if reading else None)
        self.tested = Side(self.base, "tested", backend, self.lowers, writing.options(backend) + extra,
                           readonly=readonly, data_only=data_only,
                           read_options=self.mode.options(backend) + extra if reading else None)
        self.lowers_before = lower_snapshots(self.lowers)

    @property
    def sides(self) -> tuple[Side, Side]:
        return (self.kernel, self.tested)

    def start(self, make_ops: Callable[[], Ops] | None = None) -> None:
        """Mount both sides (each with a worker running *make_ops*'s operations, when given)."""
        for side in self.sides:
            side.start()
            if make_ops is not None:
                side.attach(make_ops)

    def stop(self) -> list[str]:
        """Unmount both sides, whatever happens; return the problems seen."""
        problems = []
        for side in reversed(self.sides):
            problems += side.stop()
        return problems

    def lower_changes(self) -> list[str]:
        return lower_changes(self.lowers, self.lowers_before)

    def read_upper(self, tag: str, kind: str, upper: StrPath, work: StrPath | None = None) -> dict:
        """Mount *upper* over the lowers with a fresh *kind* side (``BASE/TAG-work``, ``-mnt``; or the
        workdir *work*, which an index=on upper needs: its index holds data), in this mode, and snapshot
        it; always unmounted.  Raises MountError when mounting or unmounting fails."""
        with Side(self.base, tag, kind, self.lowers, self.mode.options(kind), upper=upper, work=work,
                  data_only=self.mode.data_only) as side:
            return snapshot(side.mountpoint)


def cleanup_base(base: StrPath) -> list[str]:
    """Unmount whatever is still mounted under *base*, then remove it; return the problems seen."""
    base = os.fspath(base)
    problems = []
    left = mounts_under(base)
    for mnt, _ in sorted(left, reverse=True):
        try:
            force_unmount(mnt)
        except MountError as e:
            problems.append(str(e))
    if left:
        problems.append(f"still mounted at teardown (now unmounted): {left}")
    if not mounts_under(base):
        shutil.rmtree(base, ignore_errors=True)
    return problems


# --------------------------------------------------------------------------
# the fixed scenarios: every operation on one side, then on the other, then compare

def run_scenario(side: Side, ops: Callable[[Session], Any], *, name: str, readonly: bool,
                 timeout: float) -> tuple[list[tuple[str, Outcome]], dict]:
    """Mount *side*, run *ops* on a ``Session`` at its root, snapshot the merged tree, unmount.
    Returns (outcomes, tree).  A cowfs daemon that takes longer than *timeout* is killed.
    A side with ``read_options`` is mounted again with them before the snapshot."""
    with side.time_limit(timeout, f"scenario {name}"):
        side.start()
        try:
            session = Session(side.mountpoint, side.remount, readonly)
            try:
                ops(session)
            finally:
                session.close_all()
            if side.read_options is not None:
                side.remount_to_read()
            return session.outcomes, snapshot(side.mountpoint)
        finally:
            side.unmount()


def index_snapshot(work: str, userxattr: bool) -> dict:
    """WORKDIR/index of an index=on mount, less the kernel's temporary `#` entries (its shared whiteout)."""
    snap = upper_snapshot(os.path.join(work, "index"), userxattr)
    upper = ("user.overlay." if userxattr else "trusted.overlay.") + "upper"  # a handle of each side's own upper
    snap["entries"].get(".", {}).get("xattrs", {}).pop(upper, None)
    snap["entries"] = {rel: info for rel, info in snap["entries"].items() if not rel.startswith("#")}
    snap["hardlinks"] = [[rel for rel in group if not rel.startswith("#")] for group in snap["hardlinks"]]
    snap["hardlinks"] = [group for group in snap["hardlinks"] if len(group) > 1]
    return snap


def compare_scenario(pair: Pair, ops: Callable[[Session], Any], *, name: str,
                     timeout: float) -> tuple[list[str], list[tuple[str, Outcome]]]:
    """Run a fixed scenario on both sides of *pair* and compare: every outcome (less the known
    differences excused in ``SCENARIOS``), the merged trees, the lowers (unchanged), and the kernel's
    view of the tested side's upper (the same tree).  Returns (problems, the kernel's outcomes)."""
    ref_out, ref_tree = run_scenario(pair.kernel, ops, name=name, readonly=pair.readonly, timeout=timeout)
    got_out, got_tree = run_scenario(pair.tested, ops, name=name, readonly=pair.readonly, timeout=timeout)
    backend = pair.backend
    compared_tree = got_tree
    if backend == "cowfs":
        names = excused(SCENARIOS)
        ref_out, got_out = excuse_outcomes(name, ref_out, names), excuse_outcomes(name, got_out, names)
        compared_tree = excuse_tree(ref_tree, got_tree, names)

    problems = []
    if ref_out != got_out:
        problems.append(f"operation outcomes differ (kernel vs {backend}):\n"
                        f"{diff_outcomes(ref_out, got_out, 'kernel', backend)}")
    if ref_tree != compared_tree:
        problems.append("merged trees differ:\n" + diff_snapshots(ref_tree, compared_tree, "kernel", backend))
    problems += pair.lower_changes()
    if pair.tested.upper is not None:
        # the upper directories themselves, as each side left them on disk
        userxattr = "userxattr" in pair.kernel.options
        ref_upper = upper_snapshot(pair.kernel.upper, userxattr)
        got_upper = upper_snapshot(pair.tested.upper, userxattr)
        if backend == "cowfs":
            got_upper = excuse_tree(ref_upper, got_upper, names)
        if ref_upper != got_upper:
            problems.append(f"upper directories differ (kernel vs {backend}):\n"
                            + diff_snapshots(ref_upper, got_upper, "kernel", backend))
        # the kernel must read the upper directory the tested side wrote, and see the same tree
        if "index=on" in pair.kernel.options:  # the index, as each side left it (not the kernel's temp names)
            ref_index, got_index = (index_snapshot(side.work, userxattr) for side in (pair.kernel, pair.tested))
            if ref_index != got_index:
                problems.append(f"WORKDIR/index differs (kernel vs {backend}):\n"
                                + diff_snapshots(ref_index, got_index, "kernel", backend))
        kernel_view = pair.read_upper("check", "kernel", pair.tested.upper,
                                      pair.tested.work if "index=on" in pair.kernel.options else None)
        if kernel_view != got_tree:
            problems.append(f"kernel mounting {backend}'s upper sees another tree:\n"
                            + diff_snapshots(got_tree, kernel_view, backend, "kernel-over-upper"))
    return problems, ref_out


__all__ = [
    "BACKENDS", "KERNEL_COMMON", "KNOWN_DIFFERENCES", "MODES", "PARITY", "SCENARIOS", "Divergence",
    "KnownDifference", "Mode", "Pair", "Side", "cleanup_base", "compare_scenario", "excuse_outcomes",
    "excuse_tree", "excuse_value", "excused", "failing_scenarios", "lower_changes", "lower_snapshots",
    "run_scenario",
]
