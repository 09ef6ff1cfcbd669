"""Running things as a real unprivileged user: the user, a Python it can run with this checkout's cowfs, the commands.

A rootless test proves something only when what it runs really lacks root's
privileges, so the tests drop them for real rather than imitating an ordinary
user inside a root process:

``user()``
    The test user: ``$COWFS_TEST_USER`` (default ``cowfs-test``), made with
    ``useradd`` when missing and this process is root (``make rootless-setup``
    makes it beforehand).  When the tests themselves run as an ordinary user,
    that user is the one: nobody can switch users then.
``user_python()``
    A Python the user can run with this checkout's cowfs importable, wherever
    the checkout lives (CI may clone under /root, which the user cannot enter):
    a venv made with ``/usr/bin/python3 -m venv`` under
    ``/var/tmp/cowfs-user-venvs/<hash>`` (``$COWFS_TEST_VENV_DIR`` instead of
    /var/tmp), holding a copy of cowfs installed with pip (not editable, so the
    sources are copied in; mfusepy, xattr and pytest from the machine's
    configured index).  The hash covers the cowfs sources, setup.cfg,
    pyproject.toml and what is installed with them, so a change rebuilds it; it
    is built once, under a lock (parallel runs wait for the one building), and
    reused.  ``last_build`` says how long the build or the reuse took.
``run_as_user(argv)``
    A subprocess as the user (``setpriv --reuid --regid --init-groups``, no
    capabilities), with a clean environment (HOME, PATH with the venv's bin
    first, LANG=C.UTF-8, ...) and a directory it can enter; with
    ``userns=True`` inside a new user and mount namespace of its own, where
    the user is root (see below).  ``run_python_as_user`` runs a snippet or a
    module with the user's Python.
``readiness()`` / ``require()``
    What is missing for that, each with its reason: the user, setpriv, the
    Python, /dev/fuse usable by the user (its mode or ACL), unprivileged user
    namespaces, subordinate ids.  ``require()`` skips the running test with
    the reasons, or fails it under ``CI=true`` (the suite's rule,
    ``cowfs.testing.mounts.require``).

The kernel side of a rootless comparison, and the user namespace
----------------------------------------------------------------
Only root may mount a kernel overlay in the initial namespace, so an ordinary
user compares cowfs with the kernel from inside a user namespace it owns, with
a mount namespace: there it is root, the kernel mounts overlayfs with
``userxattr`` (FS_USERNS_MOUNT) and libfuse mounts FUSE directly (also
FS_USERNS_MOUNT, since Linux 4.18), so the test process sees both sides.  The
whole test process runs inside (``run_as_user(..., userns=True)``; by hand:
``unshare -Urm python -m pytest ...``), and the fixtures of
``cowfs.testing.plugin`` know where they are (``mounts.privileged()``).  What
stays out of reach there: trusted.* xattrs (they need CAP_SYS_ADMIN in the
initial namespace, so only the ``userxattr`` mode applies), device nodes other
than whiteouts, and owners outside the namespace's id map (chown to one fails
with EINVAL, on both sides alike).

``unshare -Urm`` maps the user alone (to root), so layers owned by anybody
else (the scenarios' uid 1000) cannot be written.  ``userns=True`` therefore
maps, as rootless podman does, the user to root and the user's subordinate
ids (/etc/subuid, /etc/subgid) to 1..N: root writes the maps itself (what the
setuid ``newuidmap`` would do after checking /etc/subuid), an ordinary user
through ``newuidmap``/``newgidmap`` when installed, or else maps itself alone.
Nothing of it is visible outside: the namespace's mounts go away with its
last process, and ``run_as_user`` kills any process left in it (and says so in
``result.lingering``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import functools
import grp
import hashlib
import os
import pwd
import select
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from cowfs.testing.mounts import in_ci, in_user_namespace

USER_ENV = "COWFS_TEST_USER"
DEFAULT_USER = "cowfs-test"
VENV_DIR_ENV = "COWFS_TEST_VENV_DIR"
SYSTEM_PYTHON = "/usr/bin/python3"
MIN_PYTHON = (3, 11)
CHECKOUT = Path(__file__).resolve().parents[2]  # the directory holding setup.cfg and cowfs/
SYSTEM_PATH = "/usr/local/bin:/usr/bin:/bin:/usr/local/sbin:/usr/sbin:/sbin"
DEFAULT_TIMEOUT = 120.0
BUILD_TIMEOUT = 900.0
STALE_VENV_DAYS = 7  # venvs of other source versions unused that long are removed at the next build
KEEP_VENVS = 3  # ... and beyond this many, those unused for an hour


class Unavailable(RuntimeError):
    """Running as the unprivileged user is impossible here; the message says why."""


# --------------------------------------------------------------------------
# the user

@dataclasses.dataclass(frozen=True)
class UnprivilegedUser:
    """An ordinary user: its ids, home, and subordinate id ranges ((first, count), or None)."""

    name: str
    uid: int
    gid: int
    home: str
    subuids: tuple[int, int] | None = None
    subgids: tuple[int, int] | None = None

    @property
    def is_me(self) -> bool:
        """True when this process already runs as the user (no switch needed)."""
        return os.geteuid() == self.uid


def can_switch_users() -> bool:
    """True for root of the initial user namespace, which can become any user."""
    return os.geteuid() == 0 and not in_user_namespace()


def user_name() -> str:
    """The test user's name: ``$COWFS_TEST_USER``, or ``cowfs-test``."""
    return os.environ.get(USER_ENV) or DEFAULT_USER


def subordinate_ids(name: str, uid: int, path: str) -> tuple[int, int] | None:
    """The first subordinate id range of user *name* (or *uid*) in *path* (/etc/subuid, /etc/subgid)."""
    try:
        with open(path) as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    for line in lines:
        parts = line.strip().split(":")
        if len(parts) == 3 and parts[0] in (name, str(uid)) and parts[1].isdigit() and parts[2].isdigit():
            return int(parts[1]), int(parts[2])
    return None


def _from_passwd(entry: pwd.struct_passwd) -> UnprivilegedUser:
    return UnprivilegedUser(entry.pw_name, entry.pw_uid, entry.pw_gid, entry.pw_dir,
                            subordinate_ids(entry.pw_name, entry.pw_uid, "/etc/subuid"),
                            subordinate_ids(entry.pw_name, entry.pw_uid, "/etc/subgid"))


def create_user(name: str) -> None:
    """``useradd`` *name* (with a home, its own group, and subordinate ids where useradd gives them)."""
    useradd = shutil.which("useradd", path=SYSTEM_PATH)
    if useradd is None:
        raise Unavailable(f"user {name} does not exist and useradd is missing (install passwd)")
    res = subprocess.run([useradd, "--create-home", "--user-group", "--shell", "/bin/sh",
                          "--comment", "cowfs rootless tests", name], capture_output=True, text=True, timeout=60)
    try:
        pwd.getpwnam(name)
    except KeyError:
        raise Unavailable(f"useradd {name} failed: {res.stderr.strip()}") from None


@functools.cache
def user() -> UnprivilegedUser:
    """The unprivileged test user (made when missing and we are root).

    Raises:
        Unavailable: there is none to be had (see the message).
    """
    if not can_switch_users():
        if os.geteuid() == 0:
            raise Unavailable("this process is root of a user namespace: it cannot become an ordinary user")
        return _from_passwd(pwd.getpwuid(os.geteuid()))  # an ordinary user already: that one
    name = user_name()
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        create_user(name)
        entry = pwd.getpwnam(name)
    if entry.pw_uid == 0 or entry.pw_gid == 0:
        raise Unavailable(f"{USER_ENV}={name} has uid {entry.pw_uid}, gid {entry.pw_gid}: not an unprivileged user")
    return _from_passwd(entry)


# --------------------------------------------------------------------------
# a Python the user can run, with this checkout's cowfs

def _source_files() -> list[Path]:
    """The files the user's copy of cowfs is built from (relative to the checkout)."""
    files = [Path(p) for p in ("setup.cfg", "pyproject.toml")]
    for path in sorted((CHECKOUT / "cowfs").rglob("*")):
        rel = path.relative_to(CHECKOUT)
        if path.is_file() and "__pycache__" not in rel.parts and path.suffix not in (".pyc", ".pyo"):
            files.append(rel)
    return files


def _extra_requirements() -> list[str]:
    """What is installed next to cowfs: the pytest of this run (the same version), for tests run as the user."""
    try:
        import pytest
        return [f"pytest=={pytest.__version__}"]
    except ImportError:  # pragma: no cover
        return ["pytest"]


def source_hash() -> str:
    """A short hash of the cowfs sources, setup.cfg, pyproject.toml and the extra requirements."""
    if not (CHECKOUT / "setup.cfg").is_file():
        raise Unavailable(f"cowfs is not run from a checkout ({CHECKOUT} has no setup.cfg): nothing to install")
    digest = hashlib.sha256()
    for rel in _source_files():
        digest.update(str(rel).encode() + b"\0")
        digest.update((CHECKOUT / rel).read_bytes() + b"\0")
    digest.update(" ".join(_extra_requirements()).encode())
    return digest.hexdigest()[:16]


def venv_base() -> Path:
    """The directory holding the users' venvs: ``$COWFS_TEST_VENV_DIR`` or /var/tmp, then cowfs-user-venvs."""
    return Path(os.environ.get(VENV_DIR_ENV) or "/var/tmp") / "cowfs-user-venvs"


@dataclasses.dataclass
class BuildReport:
    """What ``user_python()`` did last: "built" or "reused", the venv, and the seconds it took."""

    action: str = ""
    venv: str = ""
    seconds: float = 0.0


last_build = BuildReport()


def _check_own_dir(path: Path) -> None:
    """*path* must be a real directory of ours that nobody else can write to (others run what is inside)."""
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o022:
        raise Unavailable(f"{path}: not a directory of uid {os.geteuid()} closed to others' writes "
                          f"(mode {stat.S_IMODE(st.st_mode):04o}, uid {st.st_uid}); remove it, or set {VENV_DIR_ENV}")


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _system_python_problem() -> str | None:
    if not os.access(SYSTEM_PYTHON, os.X_OK):
        return f"{SYSTEM_PYTHON} is missing: the user needs a Python of its own (install python3)"
    res = subprocess.run([SYSTEM_PYTHON, "-c", "import sys, venv, ensurepip; print(*sys.version_info[:2])"],
                         capture_output=True, text=True, timeout=60)
    if res.returncode != 0:
        return f"{SYSTEM_PYTHON} cannot make a venv (install python3-venv): {res.stderr.strip()[-300:]}"
    version = tuple(int(x) for x in res.stdout.split())
    if version < MIN_PYTHON:
        return (f"{SYSTEM_PYTHON} is Python {'.'.join(map(str, version))}; cowfs needs "
                f"{'.'.join(map(str, MIN_PYTHON))} or newer")
    return None


def _run_build(argv: list[str], what: str) -> None:
    res = subprocess.run(argv, capture_output=True, text=True, timeout=BUILD_TIMEOUT, stdin=subprocess.DEVNULL,
                         env=dict(os.environ, PIP_NO_INPUT="1", PIP_DISABLE_PIP_VERSION_CHECK="1"))
    if res.returncode != 0:
        raise Unavailable(f"{what} failed (exit {res.returncode}): {(res.stderr or res.stdout).strip()[-800:]}")


def _prune(base: Path, keep: Path) -> None:
    """Remove the venvs of other source versions (each edit of cowfs makes one, some 45 MB): those unused
    (stamp untouched) for STALE_VENV_DAYS, and beyond the KEEP_VENVS last used those unused for an hour."""
    now = time.time()
    others = []
    for venv in base.iterdir():
        if venv == keep or not venv.is_dir() or venv.is_symlink() or venv.name.startswith("."):
            continue
        try:
            used = (venv / ".complete").stat().st_mtime
        except FileNotFoundError:
            used = venv.stat().st_mtime  # an interrupted build
        others.append((used, venv))
    others.sort(reverse=True)
    for i, (used, venv) in enumerate(others):
        if used < now - STALE_VENV_DAYS * 86400 or (i >= KEEP_VENVS and used < now - 3600):
            shutil.rmtree(venv, ignore_errors=True)


def build_venv(venv: Path, digest: str) -> None:
    """Make *venv* with cowfs (copied from this checkout) and the extra requirements installed."""
    if venv.exists():
        shutil.rmtree(venv)  # an interrupted build: start again
    old_umask = os.umask(0o022)  # everything readable by the user
    try:
        with tempfile.TemporaryDirectory(prefix=".stage-", dir=venv.parent) as stage:
            for rel in _source_files() + [Path("README.rst")]:  # README.rst: setup.cfg reads it
                if (CHECKOUT / rel).is_file():
                    (Path(stage) / rel).parent.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(CHECKOUT / rel, Path(stage) / rel)
            _run_build([SYSTEM_PYTHON, "-m", "venv", str(venv)], f"{SYSTEM_PYTHON} -m venv {venv}")
            _run_build([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", stage, *_extra_requirements()],
                       f"pip install of cowfs into {venv}")
        _run_build([str(venv / "bin" / "python"), "-c", "import cowfs.cli.main, cowfs.testing.plugin, mfusepy, pytest"],
                   f"importing cowfs in {venv}")
        (venv / ".complete").write_text(digest + "\n")
    finally:
        os.umask(old_umask)


@functools.cache
def user_python() -> str:
    """The path of a Python the test user can run, with this checkout's cowfs (and pytest) importable.

    An ordinary user running the tests gets this interpreter (with the checkout on
    PYTHONPATH, see ``user_env``); root gets the cached venv, built when missing.

    Raises:
        Unavailable: no such Python can be had (the reason says why).
    """
    if not can_switch_users():
        return sys.executable
    started = time.monotonic()
    digest = source_hash()
    base = venv_base()
    old_umask = os.umask(0o022)
    try:
        base.mkdir(mode=0o755, parents=True, exist_ok=True)
    finally:
        os.umask(old_umask)
    _check_own_dir(base)
    venv = base / digest
    python = venv / "bin" / "python"
    with _locked(base / ".lock"):
        if (venv / ".complete").is_file() and python.exists():
            os.utime(venv / ".complete")
            action = "reused"
        else:
            problem = _system_python_problem()
            if problem:
                raise Unavailable(problem)
            build_venv(venv, digest)
            _prune(base, venv)
            action = "built"
    last_build.action, last_build.venv, last_build.seconds = action, str(venv), time.monotonic() - started
    return str(python)


# --------------------------------------------------------------------------
# running as the user

def user_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The clean environment a command as the user gets: HOME, PATH (the user's Python's bin first),
    LANG=C.UTF-8, USER, LOGNAME, SHELL, and CI passed on; *extra* on top."""
    u = user()
    python = user_python()
    env = {
        "HOME": u.home if os.path.isdir(u.home) else "/tmp",
        "PATH": os.path.dirname(python) + ":" + SYSTEM_PATH,
        "LANG": "C.UTF-8",
        "USER": u.name,
        "LOGNAME": u.name,
        "SHELL": "/bin/sh",
    }
    if not can_switch_users():  # this interpreter: the checkout may not be installed in it
        env["PYTHONPATH"] = str(CHECKOUT)
    if "CI" in os.environ:
        env["CI"] = os.environ["CI"]
    env.update(extra or {})
    return env


def user_cwd() -> str:
    """A directory the user can enter: its home, or /tmp."""
    home = user().home
    return home if os.path.isdir(home) and _user_can_enter(home) else "/tmp"


def _user_can_enter(path: str) -> bool:
    u = user()
    st = os.stat(path)
    if st.st_uid == u.uid:
        return bool(st.st_mode & stat.S_IXUSR)
    return bool(st.st_mode & stat.S_IXOTH)


def drop_privileges_argv(argv: Sequence[str]) -> list[str]:
    """*argv* run as the user: through ``setpriv`` (no capabilities) when we are root, as it is otherwise."""
    argv = [os.fspath(a) for a in argv]
    if not can_switch_users():
        return argv
    u = user()
    setpriv = shutil.which("setpriv", path=SYSTEM_PATH)
    if setpriv is None:
        raise Unavailable("setpriv is missing (install util-linux)")
    return [setpriv, f"--reuid={u.uid}", f"--regid={u.gid}", "--init-groups", "--inh-caps=-all", "--", *argv]


# Run as the user: enter a new user and mount namespace, tell the parent (which writes the id maps),
# wait for its go, make every mount private, enter the directory, then exec the command (as root there).
_USERNS_LAUNCHER = r"""
import ctypes, os, sys
ready, go = int(sys.argv[1]), int(sys.argv[2])
libc = ctypes.CDLL(None, use_errno=True)
CLONE_NEWUSER, CLONE_NEWNS, MS_REC, MS_PRIVATE = 0x10000000, 0x00020000, 0x4000, 0x40000
if libc.unshare(CLONE_NEWUSER | CLONE_NEWNS) != 0:
    sys.exit(f"unshare(CLONE_NEWUSER|CLONE_NEWNS): {os.strerror(ctypes.get_errno())}")
os.write(ready, b"u")
os.close(ready)
if os.read(go, 1) != b"g":
    sys.exit("the id maps were not written")
os.close(go)
os.setresgid(0, 0, 0)
os.setresuid(0, 0, 0)
if libc.mount(b"none", b"/", None, MS_REC | MS_PRIVATE, None) != 0:
    sys.exit(f"mount --make-rprivate /: {os.strerror(ctypes.get_errno())}")
os.chdir(sys.argv[3])
os.execvp(sys.argv[4], sys.argv[4:])
"""


def id_maps(u: UnprivilegedUser) -> tuple[str, str]:
    """The (uid_map, gid_map) of the user's namespace: the user as root, its subordinate ids as 1..N."""
    maps = []
    for own, sub in ((u.uid, u.subuids), (u.gid, u.subgids)):
        lines = f"0 {own} 1\n"
        if sub is not None and (can_switch_users() or shutil.which("newuidmap")):
            lines += f"1 {sub[0]} {sub[1]}\n"
        maps.append(lines)
    return maps[0], maps[1]


def _write_id_maps(pid: int, u: UnprivilegedUser) -> None:
    uid_map, gid_map = id_maps(u)
    if can_switch_users():  # root may write any map (newuidmap would check it against /etc/subuid first)
        Path(f"/proc/{pid}/uid_map").write_text(uid_map)
        Path(f"/proc/{pid}/gid_map").write_text(gid_map)
    elif uid_map.count("\n") > 1:  # an ordinary user: the setuid helpers check and write the ranges
        for tool, text in (("newuidmap", uid_map), ("newgidmap", gid_map)):
            subprocess.run([tool, str(pid), *text.split()], check=True, capture_output=True, timeout=30)
    else:  # itself alone, as unshare -U --map-root-user
        Path(f"/proc/{pid}/setgroups").write_text("deny")
        Path(f"/proc/{pid}/uid_map").write_text(uid_map)
        Path(f"/proc/{pid}/gid_map").write_text(gid_map)


def _namespace_pids(ns: str) -> list[int]:
    """The processes in mount namespace *ns* (a /proc/PID/ns/mnt link's text)."""
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):
                if os.readlink(f"/proc/{entry}/ns/mnt") == ns:
                    pids.append(int(entry))
    return pids


def run_as_user(argv: Sequence[str | os.PathLike], *, cwd: str | os.PathLike | None = None,
                env: Mapping[str, str] | None = None, input: str | None = None,
                timeout: float = DEFAULT_TIMEOUT, userns: bool = False) -> subprocess.CompletedProcess[str]:
    """Run *argv* as the test user and return the CompletedProcess (text output captured).

    *env* is added to ``user_env()``; *cwd* (entered as the user) defaults to ``user_cwd()``.  With
    *userns*, the command runs as root of a new user and mount namespace of
    the user's own (see the module doc); any process left in it afterwards is
    killed and listed in ``result.lingering``.  Past *timeout* seconds the
    whole process group is killed and subprocess.TimeoutExpired raised.

    Raises:
        Unavailable: the user, its Python or setpriv cannot be had.
    """
    u = user()
    full_env = user_env(env)
    cwd = os.fspath(cwd) if cwd is not None else user_cwd()
    shown = [os.fspath(a) for a in argv]  # what the result says was run
    fds: list[int] = []
    if userns:
        ready_r, ready_w = os.pipe()
        go_r, go_w = os.pipe()
        fds = [ready_r, ready_w, go_r, go_w]
        argv = [SYSTEM_PYTHON if can_switch_users() else sys.executable, "-c", _USERNS_LAUNCHER,
                str(ready_w), str(go_r), cwd, *shown]
        pass_fds: tuple[int, ...] = (ready_w, go_r)
    else:
        pass_fds = ()
        # enter the directory as the user: root may not (a FUSE mount of the user's refuses others)
        argv = [shutil.which("env", path=SYSTEM_PATH) or "env", "--chdir", cwd, *shown]
    lingering: list[int] = []
    try:
        proc = subprocess.Popen(drop_privileges_argv(argv), cwd="/", env=full_env, text=True,
                                stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, pass_fds=pass_fds,
                                start_new_session=True)
        ns = None
        try:
            if userns:
                os.close(ready_w)
                os.close(go_r)
                fds = [ready_r, go_w]
                if select.select([ready_r], [], [], 60)[0] and os.read(ready_r, 1) == b"u":
                    _write_id_maps(proc.pid, u)
                    ns = os.readlink(f"/proc/{proc.pid}/ns/mnt")
                    os.write(go_w, b"g")
                for fd in fds:
                    os.close(fd)
                fds = []
            stdout, stderr = proc.communicate(input, timeout=timeout)
        except BaseException:
            with contextlib.suppress(OSError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            raise
        finally:
            if ns is not None:
                lingering = _namespace_pids(ns)
                for pid in lingering:
                    with contextlib.suppress(OSError):
                        os.kill(pid, signal.SIGKILL)
    finally:
        for fd in fds:
            with contextlib.suppress(OSError):
                os.close(fd)
    result = subprocess.CompletedProcess(shown, proc.returncode, stdout, stderr)
    result.lingering = lingering  # type: ignore[attr-defined]
    return result


def run_python_as_user(code: str | None = None, *, module: str | None = None, args: Sequence[str] = (),
                       **kwargs: Any) -> subprocess.CompletedProcess[str]:
    """Run a Python snippet (*code*) or *module* with ``user_python()`` as the user; *args* follow it,
    *kwargs* go to ``run_as_user``."""
    if (code is None) == (module is None):
        raise ValueError("give code or module, not both")
    head = ["-c", code] if code is not None else ["-m", module]
    return run_as_user([user_python(), *head, *args], **kwargs)


def cowfs_argv(*args: str | os.PathLike) -> list[str]:
    """``cowfs ARGS`` as the user runs it (its Python, ``-m cowfs``)."""
    return [user_python(), "-m", "cowfs", *[os.fspath(a) for a in args]]


# --------------------------------------------------------------------------
# readiness

def _check_user() -> str | None:
    try:
        user()
    except Unavailable as e:
        return str(e)
    return None


def _check_setpriv() -> str | None:
    if can_switch_users() and not shutil.which("setpriv", path=SYSTEM_PATH):
        return "setpriv is missing (install util-linux)"
    return None


def _check_python() -> str | None:
    try:
        user_python()
    except (Unavailable, OSError, subprocess.SubprocessError) as e:
        return f"no Python for the user: {e}"
    return None


def _probe(argv: list[str]) -> subprocess.CompletedProcess[str]:
    if can_switch_users():
        u = user()
        argv = [shutil.which("setpriv", path=SYSTEM_PATH) or "setpriv", f"--reuid={u.uid}", f"--regid={u.gid}",
                "--init-groups", "--", *argv]
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, cwd="/", stdin=subprocess.DEVNULL,
                          env={"PATH": SYSTEM_PATH, "LANG": "C.UTF-8"})


def _check_fuse() -> str | None:
    u = user()
    try:
        st = os.stat("/dev/fuse")
    except OSError as e:
        return f"/dev/fuse: {e.strerror}"
    if _probe(["sh", "-c", "exec 3<>/dev/fuse"]).returncode != 0:
        owner = f"{pwd.getpwuid(st.st_uid).pw_name}:{grp.getgrgid(st.st_gid).gr_name}"
        return (f"/dev/fuse is mode {stat.S_IMODE(st.st_mode):04o} {owner} and {u.name} cannot open it (neither "
                "the mode nor an ACL lets it), so it cannot mount FUSE; as root: chmod 0666 /dev/fuse (Debian's "
                "default; make rootless-setup does it)")
    fusermount = shutil.which("fusermount3", path=SYSTEM_PATH) or shutil.which("fusermount", path=SYSTEM_PATH)
    if fusermount is None:
        return "fusermount3 is missing (install fuse3)"
    fst = os.stat(fusermount)
    if not (fst.st_mode & stat.S_ISUID and fst.st_uid == 0):
        return f"{fusermount} is not setuid root: an ordinary user cannot mount FUSE outside a user namespace"
    return None


def _check_userns() -> str | None:
    unshare = shutil.which("unshare", path=SYSTEM_PATH)
    if unshare is None:
        return "unshare is missing (install util-linux)"
    res = _probe([unshare, "-Urm", "true"])
    if res.returncode != 0:
        return (f"{user().name} cannot make a user namespace (unshare -Urm true: {res.stderr.strip()}); see "
                "sysctl user.max_user_namespaces, kernel.unprivileged_userns_clone, "
                "kernel.apparmor_restrict_unprivileged_userns")
    return None


def _check_subids() -> str | None:
    u = user()
    missing = [path for path, sub in (("/etc/subuid", u.subuids), ("/etc/subgid", u.subgids))
               if sub is None or sub[1] < 65536]
    if missing:
        return (f"{u.name} has no range of 65536 subordinate ids in {' and '.join(missing)} (a namespace mapping "
                f"only the user cannot hold files of other owners); as root: usermod --add-subuids "
                f"100000-165535 --add-subgids 100000-165535 {u.name} (make rootless-setup does it)")
    if not can_switch_users() and not (shutil.which("newuidmap") and shutil.which("newgidmap")):
        return "newuidmap/newgidmap are missing (install uidmap): an ordinary user cannot map its subordinate ids"
    return None


CHECKS = {"user": _check_user, "setpriv": _check_setpriv, "python": _check_python, "fuse": _check_fuse,
          "userns": _check_userns, "subids": _check_subids}
NEEDS_USER = ("setpriv", "python", "fuse", "userns", "subids")  # checks that need the user first


@functools.cache
def readiness(feature: str) -> str | None:
    """None when *feature* (a key of CHECKS) is ready, else the reason it is not."""
    if feature not in CHECKS:
        raise ValueError(f"unknown feature {feature!r}; known: {sorted(CHECKS)}")
    if feature in NEEDS_USER:
        problem = readiness("user")
        if problem:
            return problem
    try:
        return CHECKS[feature]()
    except (Unavailable, OSError, subprocess.SubprocessError) as e:
        return f"{feature}: {e}"


def require(*features: str) -> UnprivilegedUser:
    """The test user, when every one of *features* (default: user, setpriv, python, fuse) is ready;
    else skip the running pytest test with the reasons, or fail it under ``CI=true``."""
    import pytest

    features = features or ("user", "setpriv", "python", "fuse")
    reasons = list(dict.fromkeys(r for r in map(readiness, features) if r))
    if reasons:
        reason = "; ".join(reasons)
        if in_ci():
            pytest.fail(f"required under CI=true but missing: {reason}", pytrace=False)
        pytest.skip(reason)
    return user()


__all__ = [
    "CHECKOUT", "DEFAULT_USER", "SYSTEM_PYTHON", "USER_ENV", "VENV_DIR_ENV", "BuildReport", "Unavailable",
    "UnprivilegedUser", "build_venv", "can_switch_users", "cowfs_argv", "create_user", "drop_privileges_argv",
    "id_maps", "last_build", "readiness", "require", "run_as_user", "run_python_as_user", "source_hash",
    "subordinate_ids", "user", "user_cwd", "user_env", "user_name", "user_python", "venv_base",
]
