"""Mounting kernel overlayfs and cowfs over given layers, and always unmounting them; what this machine can mount.

Both mounts are objects with ``mount()``/``unmount()`` (so a test can remount
midway) and context managers (``kernel_overlay(...)``, ``cowfs_mount(...)``)
that unmount in ``finally`` whatever happened inside.  ``availability()`` says
what this machine can do (``docker_availability()`` whether a private dockerd
could run, for the tests marked ``docker``); ``require()`` turns a missing
feature into a pytest skip, or a failure under ``CI=true`` (the project rule:
nothing may skip in CI), as ``missing_feature(reason)`` does for one found
missing later (a dockerd that does not start).

``make_whiteout`` and ``make_opaque`` write the kernel's on-disk formats into
an existing tree (scripts use them); tests describe whole layers as values and
write them with ``cowfs.testing.layers.materialise``.  Neither is cowfs's
implementation.

Without root
------------
Everything here also works for an ordinary user: a cowfs mount is a FUSE
mount through the setuid ``fusermount3`` (/dev/fuse must be open to the user:
mode 0666, Debian's default), unmounted with ``fusermount3 -u``.  A kernel
overlay, which only root may mount in the initial namespace, then needs the
test process to run inside a user namespace with a mount namespace, where
the user is root (``unshare -Urm``, or ``cowfs.testing.unprivileged.run_as_user
(..., userns=True)``): there the kernel mounts overlayfs with ``userxattr``
and libfuse mounts FUSE itself, so both sides are visible to the test.
``privileged()`` tells root of the initial namespace (trusted.* xattrs, any
kernel overlay) from the rest, which must use ``userxattr``: both mounts add
it to their options then; ``in_user_namespace()`` tells the namespace's root
from real root.
"""

from __future__ import annotations

import contextlib
import ctypes.util
import functools
import os
import select
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Sequence

from cowfs import mounttable

StrPath = str | os.PathLike  # a path as str or path-like object

UNMOUNT_TIMEOUT = 15.0
MOUNT_TIMEOUT = 60.0


class MountError(RuntimeError):
    """A mount or unmount did not happen; the message carries the tool's stderr."""


# --------------------------------------------------------------------------
# layer-building helpers (the kernel's formats)

def make_whiteout(path: StrPath) -> None:
    """Create a whiteout at *path*: a character device 0/0, as the kernel writes it."""
    os.mknod(path, stat.S_IFCHR | 0o000, os.makedev(0, 0))


def make_opaque(path: StrPath, userxattr: bool = False) -> None:
    """Mark directory *path* opaque (``trusted.overlay.opaque=y``, or ``user.`` with *userxattr*)."""
    name = ("user" if userxattr else "trusted") + ".overlay.opaque"
    os.setxattr(path, name, b"y", follow_symlinks=False)


# --------------------------------------------------------------------------
# who we are

_IDENTITY_MAP = ["0", "0", "4294967295"]


@functools.cache
def in_user_namespace() -> bool:
    """True when this process runs in a user namespace other than the initial one (its uid map is not
    the identity over every id): its root is the root of that namespace only."""
    try:
        with open("/proc/self/uid_map") as f:
            return f.read().split() != _IDENTITY_MAP
    except OSError:
        return False


def privileged() -> bool:
    """True for root of the initial user namespace: trusted.* xattrs, any kernel overlay.  Anybody else
    (an ordinary user, or root of a user namespace) mounts with ``userxattr``."""
    return os.geteuid() == 0 and not in_user_namespace()


def with_userxattr_unless_privileged(options: Iterable[str]) -> list[str]:
    """*options* with ``userxattr`` added when this process is not ``privileged()``: trusted.* xattrs
    are out of its reach, and a kernel overlay mounted without them in a user namespace would only
    limp along (no whiteouts or opaque markers it can write)."""
    options = list(options)
    if not privileged() and "userxattr" not in ",".join(options).split(","):
        options.append("userxattr")
    return options


# --------------------------------------------------------------------------
# /proc/mounts helpers

def mounts_under(prefix: StrPath) -> list[tuple[str, str]]:
    """(mountpoint, fstype) of every mount at or below *prefix*."""
    prefix = os.path.realpath(os.fspath(prefix))
    return [(m.mountpoint, m.fstype) for m in mounttable.read()
            if m.mountpoint == prefix or m.mountpoint.startswith(prefix.rstrip("/") + "/")]


def is_mounted(mountpoint: StrPath) -> bool:
    """True when something is mounted exactly at *mountpoint*."""
    mountpoint = os.path.realpath(os.fspath(mountpoint))
    return any(mnt == mountpoint for mnt, _ in mounts_under(mountpoint))


def _run(cmd: list[str], timeout: float = MOUNT_TIMEOUT, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout, env=env)


def force_unmount(mountpoint: StrPath) -> None:
    """Unmount *mountpoint* by any means: ``fusermount -u``, ``umount``, then ``umount -l``.

    Raises:
        MountError: it is still mounted afterwards.
    """
    mountpoint = os.path.realpath(os.fspath(mountpoint))
    attempts = []
    fusermount = shutil.which("fusermount") or shutil.which("fusermount3")
    if fusermount:
        attempts.append([fusermount, "-u", mountpoint])
    attempts += [["umount", mountpoint], ["umount", "-l", mountpoint]]
    errors = []
    for cmd in attempts:
        if not is_mounted(mountpoint):
            return
        try:
            res = _run(cmd, timeout=30)
            if res.returncode != 0:
                errors.append(f"{' '.join(cmd)}: {res.stderr.strip()}")
        except subprocess.TimeoutExpired:
            errors.append(f"{' '.join(cmd)}: timed out")
    if is_mounted(mountpoint):
        raise MountError(f"could not unmount {mountpoint}: " + "; ".join(errors))


def _overlay_options(lowers: Sequence[StrPath], upper: StrPath | None, work: StrPath | None,
                     options: Iterable[str], data_only: int = 0) -> str:
    """The `-o` string of a stack; the last *data_only* lowers are data-only layers (`::`)."""
    parts = []
    paths = [os.path.abspath(os.fspath(p)) for p in lowers]
    for p in paths + [os.fspath(x) for x in (upper, work) if x is not None]:
        if any(c in p for c in ",:\\"):
            raise ValueError(f"layer path {p!r} contains a character the option syntax cannot carry")
    split = len(paths) - data_only
    parts.append("lowerdir=" + ":".join(paths[:split]) + "".join("::" + p for p in paths[split:]))
    if upper is not None:
        if work is None:
            raise ValueError("an upper directory needs a work directory")
        parts.append("upperdir=" + os.path.abspath(os.fspath(upper)))
        parts.append("workdir=" + os.path.abspath(os.fspath(work)))
    parts.extend(options)
    return ",".join(parts)


# --------------------------------------------------------------------------
# the two mounts

class KernelOverlay:
    """A kernel overlayfs mount (``mount -t overlay``); needs root, or root of a user namespace
    (where ``userxattr`` is added to the options, as ``with_userxattr_unless_privileged`` does)."""

    kind = "kernel"

    def __init__(self, lowers: Iterable[StrPath], upper: StrPath | None, work: StrPath | None, mountpoint: StrPath,
                 options: Iterable[str] = (), data_only: int = 0) -> None:
        self.lowers, self.upper, self.work = list(lowers), upper, work
        self.mountpoint = os.path.abspath(os.fspath(mountpoint))
        self.options = with_userxattr_unless_privileged(options)
        self.option_string = _overlay_options(self.lowers, upper, work, self.options, data_only)

    def mount(self) -> None:
        res = _run(["mount", "-t", "overlay", "overlay", "-o", self.option_string, self.mountpoint])
        if res.returncode != 0 or not is_mounted(self.mountpoint):
            detail = res.stderr.strip()
            with contextlib.suppress(Exception):
                tail = _run(["dmesg"]).stdout.strip().splitlines()[-3:]
                detail += " | dmesg: " + " / ".join(tail)
            raise MountError(f"kernel overlay mount -o {self.option_string} {self.mountpoint} failed: {detail}")

    def unmount(self) -> None:
        if is_mounted(self.mountpoint):
            res = _run(["umount", self.mountpoint], timeout=30)
            if res.returncode != 0:
                force_unmount(self.mountpoint)

    def __enter__(self) -> KernelOverlay:
        self.mount()
        return self

    def __exit__(self, *exc) -> bool:
        self.unmount()
        return False


def pid_alive(pid: int) -> bool:
    """True while *pid* runs; a zombie (exited, not yet reaped) counts as gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(") ")[2][:1] != "Z"
    except OSError:
        return False


def pids_with_argument(arg: StrPath) -> set[int]:
    """Live processes (other than this one) with *arg* as one argument: a cowfs daemon keeps its argv."""
    want = os.fsencode(str(arg))
    return _pids_where(lambda argv: want in argv)


def pids_under(prefix: StrPath, uid: int | None = None, dash: bool = False) -> set[int]:
    """Live processes (other than this one; of *uid* when given) with an argument at or below *prefix*,
    or, with *dash*, starting with *prefix*- (a mount point's daemon, a temp dir's siblings)."""
    want = os.fsencode(str(prefix)).rstrip(b"/")
    return _pids_where(lambda argv: any(a == want or a.startswith(want + b"/") or (dash and a.startswith(want + b"-"))
                                        for a in argv), uid)


def _pids_where(matches: Callable[[list[bytes]], bool], uid: int | None = None) -> set[int]:
    pids = set()
    me = os.getpid()
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == me:
            continue
        try:
            if uid is not None and os.stat(f"/proc/{entry}").st_uid != uid:
                continue
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        if matches(argv) and pid_alive(int(entry)):
            pids.add(int(entry))
    return pids


def wait_gone(pids: Iterable[int], timeout: float = 10.0) -> bool:
    """Wait until none of *pids* runs; False when some still do after *timeout* seconds.

    Woken by each process's pidfd as it exits (a daemon is gone a millisecond or two after its unmount, and
    a mount per Hypothesis example pays every sleep); polled without pidfds (Linux < 5.3)."""
    pids = list(pids)
    deadline = time.monotonic() + timeout
    fds = []
    try:
        for pid in pids:
            with contextlib.suppress(AttributeError, OSError):  # gone already, or no pidfds: polled below
                fds.append(os.pidfd_open(pid))
        for fd in fds:
            select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
    finally:
        for fd in fds:
            os.close(fd)
    while any(pid_alive(p) for p in pids):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.01)
    return True


def default_cowfs_cmd() -> list[str]:
    """``COWFS_CMD`` (split like a shell would) or ``python -m cowfs`` with this interpreter."""
    import shlex

    env = os.environ.get("COWFS_CMD")
    return shlex.split(env) if env else [sys.executable, "-m", "cowfs"]


class CowfsMount:
    """A cowfs FUSE mount started with ``cowfs mount -o ... MOUNTPOINT``.

    ``unmount()`` unmounts (``fusermount -u``, then ``umount -l``) and waits
    for the daemon to exit; a daemon that outlives its mount is terminated
    (it is a process this object started) and reported as an error.  Without
    root, ``userxattr`` is added to the options (``with_userxattr_unless_privileged``).
    """

    kind = "cowfs"

    def __init__(self, lowers: Iterable[StrPath], upper: StrPath | None, work: StrPath | None, mountpoint: StrPath,
                 options: Iterable[str] = (), cowfs_cmd: Sequence[str] | None = None, data_only: int = 0) -> None:
        self.lowers, self.upper, self.work = list(lowers), upper, work
        self.mountpoint = os.path.abspath(os.fspath(mountpoint))
        self.options = with_userxattr_unless_privileged(options)
        self.option_string = _overlay_options(self.lowers, upper, work, self.options, data_only)
        self.cowfs_cmd = list(cowfs_cmd) if cowfs_cmd else default_cowfs_cmd()
        self._daemon_pids: set[int] = set()

    @property
    def command(self) -> list[str]:
        return self.cowfs_cmd + ["mount", "-o", self.option_string, self.mountpoint]

    def mount(self) -> None:
        try:
            res = _run(self.command)
        except subprocess.TimeoutExpired as e:
            self._daemon_pids = pids_with_argument(self.mountpoint)
            self._cleanup()
            raise MountError(f"{' '.join(self.command)} did not return within {MOUNT_TIMEOUT}s: {e.stderr}")
        self._daemon_pids = pids_with_argument(self.mountpoint)
        if res.returncode != 0:
            self._cleanup()
            raise MountError(
                f"{' '.join(self.command)} failed (exit {res.returncode}): "
                f"{(res.stderr or res.stdout).strip()}"
            )
        if not is_mounted(self.mountpoint):
            self._cleanup()
            raise MountError(f"{' '.join(self.command)} exited 0 but {self.mountpoint} is not mounted")

    def _cleanup(self) -> list[str]:
        """Unmount and reap the daemon; return the problems seen (empty when all went well)."""
        problems = []
        try:
            force_unmount(self.mountpoint)
        except MountError as e:
            problems.append(str(e))
        wait_gone(self._daemon_pids, UNMOUNT_TIMEOUT)
        lingering = [p for p in self._daemon_pids if pid_alive(p)]
        if lingering:
            problems.append(f"cowfs daemon(s) {lingering} still running {UNMOUNT_TIMEOUT}s "
                            f"after unmounting {self.mountpoint}")
            for pid in lingering:
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGTERM)
            time.sleep(1)
            for pid in lingering:
                if pid_alive(pid):
                    with contextlib.suppress(OSError):
                        os.kill(pid, signal.SIGKILL)
        self._daemon_pids = set()
        return problems

    def abort(self) -> None:
        """Kill the daemon (a watchdog's last resort): every pending request then fails with ENOTCONN."""
        for pid in self._daemon_pids:
            if pid_alive(pid):
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)

    def unmount(self) -> None:
        """Raises MountError when unmounting failed or the daemon did not exit by itself."""
        problems = self._cleanup()
        if problems:
            raise MountError("; ".join(problems))

    def __enter__(self) -> CowfsMount:
        self.mount()
        return self

    def __exit__(self, exc_type, *exc) -> bool:
        problems = self._cleanup()
        if problems and exc_type is None:
            raise MountError("; ".join(problems))
        return False


@contextlib.contextmanager
def kernel_overlay(lowers: Iterable[StrPath], upper: StrPath | None, work: StrPath | None, mountpoint: StrPath,
                   options: Iterable[str] = ()) -> Iterator[KernelOverlay]:
    """Mount kernel overlayfs (leftmost lower topmost); unmount on exit whatever happened."""
    m = KernelOverlay(lowers, upper, work, mountpoint, options)
    m.mount()
    try:
        yield m
    finally:
        m.unmount()


@contextlib.contextmanager
def cowfs_mount(lowers: Iterable[StrPath], upper: StrPath | None, work: StrPath | None, mountpoint: StrPath,
                options: Iterable[str] = (), cowfs_cmd: Sequence[str] | None = None) -> Iterator[CowfsMount]:
    """Mount cowfs with the kernel's option syntax; unmount and wait for the daemon on exit.

    Raises:
        MountError: ``cowfs mount`` failed (message carries its stderr), or
            unmounting / daemon exit failed after a body that succeeded.
    """
    m = CowfsMount(lowers, upper, work, mountpoint, options, cowfs_cmd)
    with m:
        yield m


# --------------------------------------------------------------------------
# what this machine can do

def _check_fuse() -> str | None:
    if not os.path.exists("/dev/fuse"):
        return "/dev/fuse does not exist"
    try:
        os.close(os.open("/dev/fuse", os.O_RDWR))
    except OSError as e:
        return f"/dev/fuse cannot be opened: {e.strerror}"
    fusermount = shutil.which("fusermount3") or shutil.which("fusermount")
    if not fusermount:
        return "fusermount is not on PATH (install the fuse3 or fuse package)"
    if os.geteuid() != 0:  # an ordinary user mounts and unmounts through the setuid fusermount
        st = os.stat(fusermount)
        if not (st.st_mode & stat.S_ISUID and st.st_uid == 0):
            return f"{fusermount} is not setuid root: an ordinary user cannot mount FUSE"
    lib = ctypes.util.find_library("fuse3")
    if not lib:
        return "libfuse3.so.3 not found (install fuse3)"
    try:
        ctypes.CDLL(lib)
    except OSError as e:
        return f"libfuse ({lib}) cannot be loaded: {e}"
    return None


def _check_kernel_overlay() -> str | None:
    if os.geteuid() != 0:
        return ("kernel overlay mounts need root, or root of a user namespace: run the tests inside "
                "`unshare -Urm` (then the kernel mounts with userxattr)")
    with tempfile.TemporaryDirectory(prefix="cowfs-probe-") as tmp:
        dirs = {name: os.path.join(tmp, name) for name in ("l", "u", "w", "m")}
        for d in dirs.values():
            os.mkdir(d)
        try:
            with kernel_overlay([dirs["l"]], dirs["u"], dirs["w"], dirs["m"]):
                pass
        except (MountError, OSError, subprocess.TimeoutExpired) as e:
            return f"cannot mount a kernel overlay: {e}"
    return None


@functools.cache
def availability() -> dict[str, str | None]:
    """``{"fuse": reason-or-None, "kernel": reason-or-None}``: None means available."""
    return {"fuse": _check_fuse(), "kernel": _check_kernel_overlay()}


@functools.cache
def docker_availability() -> str | None:
    """Why the tests marked ``docker`` cannot run here (no dockerd, docker client or static busybox, not
    root), or None. Cheap: it starts nothing; a daemon that then fails to start is reported by the test's
    fixture through `missing_feature` (see cowfs.testing.docker). Kept out of `availability()`, which
    scripts check before mounting."""
    from cowfs.testing import docker

    return docker.unavailable()


@functools.cache
def registry_availability() -> str | None:
    """Why the tests marked ``registry`` cannot run here (no docker-registry binary), or None; a registry
    that then fails to start is reported by the test's fixture (cowfs.testing.registry)."""
    from cowfs.testing import registry

    return registry.unavailable()


def in_ci() -> bool:
    """True under ``CI=true``, where a missing feature fails a test instead of skipping it."""
    return os.environ.get("CI", "").lower() == "true"


def missing_feature(reason: str) -> None:
    """Skip the running pytest test (or fixture) because of *reason*; fail instead under ``CI=true``."""
    import pytest

    if in_ci():
        pytest.fail(f"required under CI=true but missing: {reason}", pytrace=False)
    pytest.skip(reason)


def require(*features: str) -> None:
    """Skip the running pytest test when a feature is missing; fail instead under ``CI=true``.

    Features: ``"fuse"`` (/dev/fuse, fusermount, libfuse3),
    ``"kernel"`` (mounting kernel overlayfs: as root, or as root of a user namespace with ``userxattr``) and
    ``"docker"`` (a private dockerd can be started: see `docker_availability`) and
    ``"registry"`` (a private docker-registry can be started: see `registry_availability`).
    """
    avail = dict(availability())
    if "docker" in features:
        avail["docker"] = docker_availability()
    if "registry" in features:
        avail["registry"] = registry_availability()
    missing = [f"{f}: {avail[f]}" for f in features if avail.get(f)]
    unknown = [f for f in features if f not in avail]
    if unknown:
        raise ValueError(f"unknown feature(s) {unknown}; known: {sorted(avail) + ['docker', 'registry']}")
    if missing:
        missing_feature("; ".join(missing))


# --------------------------------------------------------------------------
# a watchdog for hangs: a hung FUSE daemon leaves its callers in D state,
# which only aborting the connection through fusectl ends

FUSECTL = "/sys/fs/fuse/connections"


def fuse_connection(mountpoint: StrPath) -> int:
    """The fusectl connection number of the FUSE mount at *mountpoint* (its device minor)."""
    return _minor_of(mountpoint)


def _minor_of(mountpoint: StrPath) -> int:
    """The device minor of a mount, from /proc/self/mountinfo: a stat could hang on a hung mount."""
    want = os.path.realpath(os.fspath(mountpoint))
    found = None
    with open("/proc/self/mountinfo", "rb") as f:
        for line in f:
            fields = line.split()
            if mounttable.unescape(fields[4]) == want:
                found = int(fields[2].split(b":")[1])  # the last mount there is the one in use
    if found is None:
        raise MountError(f"{mountpoint}: not mounted")
    return found


def abort_connection(conn: int) -> None:
    """Abort FUSE connection *conn*: every request waiting on the daemon fails with ENOTCONN.
    fusectl is mounted for it when it is not, and unmounted again, so that nothing is left behind."""
    mounted_here = not any(mnt == FUSECTL for mnt, _ in mounts_under(FUSECTL))
    if mounted_here:
        subprocess.run(["mount", "-t", "fusectl", "fusectl", FUSECTL], check=True, capture_output=True)
    try:
        with open(os.path.join(FUSECTL, str(conn), "abort"), "w") as f:
            f.write("1")
    finally:
        if mounted_here:
            subprocess.run(["umount", FUSECTL], capture_output=True)


class Hung(AssertionError):
    """The body under `watchdog` ran past its limit; the connection was aborted to free it."""


@contextlib.contextmanager
def watchdog(mountpoint: StrPath, seconds: float, what: str = "the operations") -> Iterator[None]:
    """Run the body; if it takes longer than *seconds*, abort the FUSE connection of *mountpoint*
    (so nothing stays blocked) and raise Hung when the body returns."""
    import threading

    conn = fuse_connection(mountpoint)
    done = threading.Event()
    fired = []

    def guard():
        if not done.wait(seconds):
            fired.append(True)
            abort_connection(conn)

    thread = threading.Thread(target=guard, daemon=True)
    thread.start()
    try:
        yield
    except OSError:
        if not fired:
            raise
    finally:
        done.set()
        thread.join()
    if fired:
        raise Hung(f"{what} on {mountpoint} took longer than {seconds} s: the daemon hung "
                   "(connection aborted through fusectl)")


# --------------------------------------------------------------------------
# filesystems of their own, for what depends on the layers' filesystems (their UUIDs, inode numbers)

@contextlib.contextmanager
def scratch_filesystem(mountpoint: StrPath, uuid: str | None = None, size_mb: int = 32) -> Iterator[str]:
    """A filesystem of its own at *mountpoint* (made if missing) for the body, unmounted afterwards
    whatever happened: a tmpfs (the kernel gives it a random UUID), or with *uuid* an ext4 image
    (``clear``: the null UUID) in the file ``MOUNTPOINT.img``, on a loop device that the unmount
    frees. Needs root; a missing mkfs.ext4 fails the test (no skip)."""
    mountpoint = os.fspath(mountpoint)
    os.makedirs(mountpoint, exist_ok=True)
    if uuid is None:
        cmd = ["mount", "-t", "tmpfs", "-o", f"size={size_mb}m", "tmpfs", mountpoint]
    else:
        image = mountpoint + ".img"
        with open(image, "wb") as f:
            f.truncate(size_mb << 20)
        made = _run(["mkfs.ext4", "-q", "-F", "-U", uuid, image])
        if made.returncode != 0:
            raise MountError(f"mkfs.ext4 {image}: {made.stderr.strip()}")
        cmd = ["mount", "-o", "loop", image, mountpoint]
    res = _run(cmd)
    if res.returncode != 0:
        raise MountError(f"{' '.join(cmd)}: {res.stderr.strip()}")
    try:
        yield mountpoint
    finally:
        force_unmount(mountpoint)


def set_image_uuid(mountpoint: StrPath, uuid: str) -> None:
    """Give the ext4 image of a `scratch_filesystem` another UUID: unmounted, checked, changed, mounted again
    (the same inodes under another UUID)."""
    mountpoint = os.fspath(mountpoint)
    image = mountpoint + ".img"
    force_unmount(mountpoint)
    _run(["e2fsck", "-f", "-y", image])  # tune2fs wants a freshly checked filesystem; 1 means "fixed"
    for cmd in (["tune2fs", "-U", uuid, image], ["mount", "-o", "loop", image, mountpoint]):
        res = _run(cmd)
        if res.returncode != 0:
            raise MountError(f"{' '.join(cmd)}: {res.stderr.strip()}")
