"""A private Docker daemon, and the images built in it, for the tests that take real Docker as the oracle.

Why: cowfs's image commands (import, images, history, inspect, commit, diff,
ps, save, export) claim to do what Docker does with the same images.  The
only trustworthy statement of what Docker does is Docker, so the tests marked
``docker`` (tests/test_docker.py) build images in a real Docker daemon, move
them into cowfs with ``docker save | cowfs import -``, apply the same changes
to a Docker container and to a cowfs container, and compare what both show,
point by point.

The daemon is private: ``Dockerd`` starts ``dockerd`` (Debian's ``docker.io``;
``/usr/bin/docker`` is its client) with its own data-root, exec-root, pidfile,
socket and config file in a temporary directory, the overlay2 storage driver
with its defaults (no ``redirect_dir``, no ``metacopy``), and no network
set-up on the host (no bridge, no iptables, no masquerading); containers run
with ``--network none``.  Its socket path must stay short (a unix socket path
is at most 107 bytes), hence ``/tmp/cowfs-dkr-XXXXXXXX``.  Stopping it (in a
``finally``) ends dockerd by its PID (SIGTERM, then SIGKILL), ends any process
still running from its directory (its containerd and shims), unmounts what it
left mounted below its directory (the overlay mounts of containers, the
data-root bind mount, netns and shm mounts) with ``umount -l``, and removes
the directory.

The images (built once per test session, with BuildKit and ``--network=none``
from a ``FROM scratch`` root filesystem of the host's static busybox):

``build_walkthrough``
    Docker's storage-driver walkthrough: ``acme/my-base-image:1.0`` (a busybox
    root filesystem and a layer that adds ``/bin/bash``, as ``apk add bash``
    does) and ``acme/my-final-image:1.0`` (``FROM`` it, ``COPY . /app``,
    ``RUN chmod +x /app/hello.sh``, ``CMD /app/hello.sh``).
``build_rich``
    ``acme/rich:1``, ``FROM`` the final image: what layer tars can hold and an
    implementation can get wrong. Hard links, a FIFO, set-id files and a sticky
    directory, files and a directory owned by uid 1000, a file with a
    ``security.capability`` xattr (``ADD`` of a tar that carries it: Docker's
    ``ADD`` keeps it, ``COPY`` of a file that has it in the build context does
    not), a non-ASCII name, a 150-character path, relative, absolute and
    dangling symlinks, an empty directory; then a layer that deletes files and
    a directory, replaces a directory with a file, a file with a directory, and
    a directory with a new one (an opaque directory).

Nothing here imports pytest; tests turn a ``DockerError`` from starting the
daemon into a skip (a failure under ``CI=true``) with
``cowfs.testing.mounts.missing_feature``.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import signal
import subprocess
import tarfile
import tempfile
import time
from collections.abc import Iterator

from cowfs.testing.mounts import StrPath, mounts_under, pid_alive, pids_under, wait_gone

DOCKERD = "/usr/sbin/dockerd"
DOCKER = "/usr/bin/docker"  # Debian's client, of dockerd's version (/usr/local/bin/docker may be another)
BUSYBOX = "/bin/busybox"  # busybox-static: runs in a FROM scratch image
START_TIMEOUT = 60.0
STOP_TIMEOUT = 20.0
COMMAND_TIMEOUT = 300.0

BASE_IMAGE = "acme/my-base-image:1.0"
FINAL_IMAGE = "acme/my-final-image:1.0"
RICH_IMAGE = "acme/rich:1"

# The client's environment: only what it needs, so that a DOCKER_CONTEXT, DOCKER_TLS_VERIFY or
# ~/.docker/config.json of the host's never points it elsewhere.
_KEEP_ENV = ("PATH", "LANG", "LC_ALL", "TMPDIR")


class DockerError(RuntimeError):
    """dockerd did not start or stop, or a docker command failed; the message says which and why."""


def _dynamically_linked(path: str) -> bool:
    """True when the ELF file at *path* names a program interpreter (PT_INTERP): it needs shared
    libraries, which a FROM scratch image does not have."""
    import struct

    with open(path, "rb") as f:
        head = f.read(64)
        if head[:4] != b"\x7fELF" or head[4] != 2:  # only 64-bit ELF is read here; anything else: assume static
            return False
        endian = "<" if head[5] == 1 else ">"
        phoff, = struct.unpack_from(endian + "Q", head, 0x20)
        phentsize, phnum = struct.unpack_from(endian + "HH", head, 0x36)
        f.seek(phoff)
        table = f.read(phentsize * phnum)
    return any(struct.unpack_from(endian + "I", table, i * phentsize)[0] == 3 for i in range(phnum))


def unavailable() -> str | None:
    """Why Docker cannot run here (a missing program, not root), or None; cheap: starts nothing.

    Whether the daemon really starts is only known by starting it (``Dockerd.start``)."""
    if os.geteuid() != 0:
        return "a private dockerd needs root"
    for path, package in ((DOCKERD, "docker.io"), (DOCKER, "docker.io"), (BUSYBOX, "busybox-static")):
        if not os.access(path, os.X_OK):
            return f"{path} is missing (install the Debian package {package})"
    if _dynamically_linked(BUSYBOX):
        return f"{BUSYBOX} is dynamically linked: the images need busybox-static's (install busybox-static)"
    return None


class Dockerd:
    """A private dockerd under the directory *base* (made and removed by ``start``/``stop``).

    ``docker(*args, input=None)`` runs the client against it and returns the
    ``CompletedProcess`` (text by default; ``binary=True`` for bytes), raising
    ``DockerError`` with stderr when it fails and *check* is true.
    """

    def __init__(self, base: StrPath) -> None:
        self.base = os.path.realpath(os.fspath(base))
        self.data_root = os.path.join(self.base, "data")
        self.exec_root = os.path.join(self.base, "exec")
        self.pidfile = os.path.join(self.base, "pid")
        self.socket = os.path.join(self.base, "sock")
        self.config_file = os.path.join(self.base, "daemon.json")
        self.log_path = os.path.join(self.base, "dockerd.log")
        self.client_config = os.path.join(self.base, "client")
        self.proc: subprocess.Popen | None = None
        if len("unix://" + self.socket) > 107:
            raise DockerError(f"{self.socket}: too long for a unix socket path (107 bytes at most)")

    @property
    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k in _KEEP_ENV}
        env.setdefault("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
        env.update(DOCKER_HOST="unix://" + self.socket, DOCKER_BUILDKIT="1", DOCKER_CONFIG=self.client_config,
                   HOME=self.base)
        return env

    def log_tail(self, lines: int = 15) -> str:
        try:
            with open(self.log_path, errors="replace") as f:
                return "".join(f.readlines()[-lines:]).rstrip()
        except OSError as e:
            return f"(no log: {e.strerror})"

    def start(self, timeout: float = START_TIMEOUT) -> None:
        """Start dockerd and wait (at most *timeout* seconds) until it answers; DockerError otherwise."""
        reason = unavailable()
        if reason:
            raise DockerError(reason)
        for d in (self.data_root, self.exec_root, self.client_config):
            os.makedirs(d, mode=0o700, exist_ok=True)
        with open(self.config_file, "w") as f:
            f.write("{}\n")  # not /etc/docker/daemon.json: the host's settings stay out
        cmd = [DOCKERD, "--data-root", self.data_root, "--exec-root", self.exec_root, "--pidfile", self.pidfile,
               "-H", "unix://" + self.socket, "--config-file", self.config_file, "--storage-driver", "overlay2",
               "--iptables=false", "--ip6tables=false", "--bridge=none", "--ip-masq=false"]
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                         env=self.env, start_new_session=True)
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise DockerError(f"dockerd exited with status {self.proc.returncode} while starting; "
                                  f"its log ends:\n{self.log_tail()}")
            if os.path.exists(self.socket):
                res = self.docker("version", "--format", "{{.Server.Version}}", check=False, timeout=10)
                if res.returncode == 0:
                    return
                last = res.stderr.strip()
            time.sleep(0.1)
        raise DockerError(f"dockerd did not answer within {timeout:.0f} s ({last or 'no socket'}); "
                          f"its log ends:\n{self.log_tail()}")

    def docker(self, *args: StrPath, input: str | bytes | None = None, check: bool = True, binary: bool = False,
               timeout: float = COMMAND_TIMEOUT) -> subprocess.CompletedProcess:
        """Run ``docker ARGS`` against this daemon."""
        argv = [DOCKER, *[os.fspath(a) for a in args]]
        try:
            res = subprocess.run(argv, input=input, capture_output=True, text=not binary, env=self.env,
                                 timeout=timeout, stdin=subprocess.DEVNULL if input is None else None)
        except subprocess.TimeoutExpired as e:
            raise DockerError(f"{' '.join(argv)}: no answer within {timeout:.0f} s") from e
        if check and res.returncode != 0:
            err = res.stderr if isinstance(res.stderr, str) else res.stderr.decode(errors="replace")
            raise DockerError(f"{' '.join(argv[:6])}{' ...' if len(argv) > 6 else ''}: exit {res.returncode}: "
                              f"{err.strip()[-2000:]}")
        return res

    def json(self, *args: StrPath) -> object:
        """The JSON a docker command prints (inspect, or --format '{{json .}}' of one object)."""
        return json.loads(self.docker(*args).stdout)

    def json_lines(self, *args: StrPath) -> list:
        """One JSON value per line of output (``--format '{{json .}}'`` of a list command)."""
        return [json.loads(line) for line in self.docker(*args).stdout.splitlines() if line.strip()]

    def stop(self) -> None:
        """Stop dockerd by its PID (SIGTERM, then SIGKILL), end what it left running, unmount what it left
        mounted below its directory, and remove the directory. DockerError when something stays."""
        problems = []
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                problems.append(f"dockerd (pid {self.proc.pid}) ignored SIGTERM for {STOP_TIMEOUT:.0f} s: killed")
                self.proc.kill()
                self.proc.wait()
        # containerd and its shims run with arguments below base: started by this dockerd, so ours to end
        left = pids_under(self.base)
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pid in left:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
            if wait_gone(left, 5.0):
                break
        left = {p for p in left if pid_alive(p)}
        if left:
            problems.append(f"processes {sorted(left)} still run")
        for mnt, _ in sorted(mounts_under(self.base), key=lambda m: m[0].count("/"), reverse=True):
            subprocess.run(["umount", "-l", mnt], capture_output=True, timeout=30)
        still = mounts_under(self.base)
        if still:
            problems.append(f"still mounted: {still}")
        else:
            shutil.rmtree(self.base, ignore_errors=True)
        self.proc = None
        if problems:
            raise DockerError(f"stopping the dockerd of {self.base}: " + "; ".join(problems))

    def __enter__(self) -> Dockerd:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> bool:
        self.stop()
        return False


@contextlib.contextmanager
def private_dockerd() -> Iterator[Dockerd]:
    """A started ``Dockerd`` in a fresh ``/tmp/cowfs-dkr-*`` directory, stopped and removed on exit."""
    base = tempfile.mkdtemp(prefix="cowfs-dkr-", dir="/tmp")
    os.chmod(base, 0o711)
    with Dockerd(base) as d:
        yield d


# -- build contexts and images --------------------------------------------------------------------

def busybox_rootfs(root: StrPath) -> None:
    """A root filesystem at *root*: ``bin/busybox`` (the host's static one) and a symlink per applet, as
    ``busybox --install -s /bin`` makes them (absolute targets), and an ``etc/`` with a few files."""
    root = os.fspath(root)
    bindir = os.path.join(root, "bin")
    os.makedirs(bindir)
    shutil.copy2(BUSYBOX, os.path.join(bindir, "busybox"))
    applets = subprocess.run([BUSYBOX, "--list"], capture_output=True, text=True, check=True).stdout.split()
    for name in applets:
        if name != "busybox" and "/" not in name:
            os.symlink("/bin/busybox", os.path.join(bindir, name))
    os.makedirs(os.path.join(root, "etc"))
    for name, data in (("os-release", "ID=busybox\nNAME=\"BusyBox stand-in for Alpine\"\n"),
                       ("motd", "Welcome to the storage-driver walkthrough\n"), ("shells", "/bin/sh\n")):
        with open(os.path.join(root, "etc", name), "w") as f:
            f.write(data)
    os.makedirs(os.path.join(root, "root"), mode=0o700)
    os.makedirs(os.path.join(root, "tmp"))
    os.chmod(os.path.join(root, "tmp"), 0o1777)


def busybox_tar(path: StrPath) -> None:
    """A minimal root filesystem tar (``bin/busybox``, ``bin/sh``) for ``docker import``."""
    with tarfile.open(path, "w") as tf:
        tf.add(BUSYBOX, "bin/busybox")
        link = tarfile.TarInfo("bin/sh")
        link.type, link.linkname = tarfile.SYMTYPE, "busybox"
        tf.addfile(link)


def _write(path: str, text: str, mode: int = 0o644) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)
    os.chmod(path, mode)


def build(d: Dockerd, context: StrPath, tag: str) -> str:
    """``docker build --network=none -t TAG CONTEXT`` (BuildKit); returns the image ID.

    Started at the turn of a second, so that two images built one after the other (in less than a
    second each) are created in different seconds: ``docker images`` sorts by whole seconds and leaves
    ties in no set order."""
    time.sleep(1 - time.time() % 1)
    d.docker("build", "--network=none", "-t", tag, context)
    return d.docker("image", "inspect", "--format", "{{.Id}}", tag).stdout.strip()


BASE_DOCKERFILE = """\
FROM scratch
ADD rootfs /
RUN ln -s /bin/busybox /bin/bash && echo /bin/bash >> /etc/shells
CMD ["/bin/sh"]
"""

FINAL_DOCKERFILE = f"""\
FROM {BASE_IMAGE}
COPY . /app
RUN chmod +x /app/hello.sh
CMD /app/hello.sh
"""

HELLO = '#!/bin/sh\necho "Hello world"\n'


def build_walkthrough(d: Dockerd, workdir: StrPath) -> dict[str, str]:
    """Build ``acme/my-base-image:1.0`` and ``acme/my-final-image:1.0`` (see the module docstring) from
    contexts made under *workdir*; returns {tag: image ID}."""
    base_ctx = os.path.join(os.fspath(workdir), "base")
    busybox_rootfs(os.path.join(base_ctx, "rootfs"))
    _write(os.path.join(base_ctx, "Dockerfile"), BASE_DOCKERFILE)
    final_ctx = os.path.join(os.fspath(workdir), "final")
    _write(os.path.join(final_ctx, "Dockerfile"), FINAL_DOCKERFILE)
    _write(os.path.join(final_ctx, "hello.sh"), HELLO, 0o644)
    return {BASE_IMAGE: build(d, base_ctx, BASE_IMAGE), FINAL_IMAGE: build(d, final_ctx, FINAL_IMAGE)}


# The capability a file of the rich image carries: cap_net_raw+ep, as `setcap cap_net_raw+ep` writes it
# (VFS_CAP_REVISION_2, effective flag, permitted bit 13).
CAPABILITY = bytes.fromhex("01000002" "00200000" "00000000" "00000000" "00000000")

LONG_DIR = "rich/long/" + "/".join(["d" * 30] * 4)
LONG_PATH = LONG_DIR + "/" + "f" * (150 - len(LONG_DIR) - 1)  # 150 characters, without the leading /
UNICODE_NAME = "rich/naïve-файл-名前.txt"

RICH_POPULATE = f"""\
set -e
mkdir -p /rich/empty /rich/tree/sub /rich/opaque/old-dir /rich/dir-to-file/inner /rich/owned /rich/sticky
printf 'shared data\\n' > /rich/linked-a
ln /rich/linked-a /rich/linked-b
ln /rich/linked-a /rich/tree/linked-c
mkfifo /rich/fifo
printf 'set-uid\\n' > /rich/suid && chmod 4755 /rich/suid
printf 'set-gid\\n' > /rich/sgid && chmod 2711 /rich/sgid
mkdir /rich/sgid-dir && chmod 2775 /rich/sgid-dir
chmod 1777 /rich/sticky
printf 'a user file\\n' > /rich/owned/file
chown -R 1000:1000 /rich/owned
printf 'group only\\n' > /rich/group-only && chown 0:1000 /rich/group-only && chmod 640 /rich/group-only
printf 'ünïcödé\\n' > '/{UNICODE_NAME}'
mkdir -p /{LONG_DIR}
printf 'deep\\n' > /{LONG_PATH}
ln -s linked-a /rich/rel-link
ln -s ../app/hello.sh /rich/up-link
ln -s /bin/busybox /rich/abs-link
ln -s /nonexistent/target /rich/dangling-abs
ln -s missing-file /rich/dangling-rel
printf 'x\\n' > /rich/dir-to-file/inner/x
printf 'a file\\n' > /rich/file-to-dir
printf 'gone\\n' > /rich/gone
printf 'gone too\\n' > /rich/tree/sub/gone
mkdir /rich/gone-dir && printf 'y\\n' > /rich/gone-dir/y
printf 'old\\n' > /rich/opaque/old
printf 'sparse' | dd of=/rich/sparse bs=1 seek=100000 2>/dev/null
printf 'set-uid too\\n' > /rich/suid-kept && chmod 4755 /rich/suid-kept
mkdir -p /rich/to-symlink/sub && printf 'z\\n' > /rich/to-symlink/sub/z
touch -d '2001-02-03 04:05:06' /rich/linked-a /rich/suid
"""

RICH_REPLACE = """\
set -e
rm /rich/gone /rich/tree/sub/gone
rm -r /rich/gone-dir
rm -r /rich/dir-to-file && printf 'now a file\\n' > /rich/dir-to-file
rm /rich/file-to-dir && mkdir /rich/file-to-dir && printf 'inside\\n' > /rich/file-to-dir/inside
rm -r /rich/opaque && mkdir /rich/opaque && printf 'new\\n' > /rich/opaque/new
"""


def _oneline(script: str) -> str:
    """A shell script as one RUN line (the Dockerfile continues lines ending in a backslash)."""
    lines = [line for line in script.splitlines() if line.strip() and line.strip() != "set -e"]
    return "set -e; " + "; ".join(lines)


def capability_tar(path: StrPath) -> None:
    """A tar with ``caps/capfile`` carrying ``security.capability`` as a PAX ``SCHILY.xattr`` record (as
    ``tar --xattrs --xattrs-include=security.capability`` writes it), for ``ADD`` to unpack."""
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tf:
        d = tarfile.TarInfo("caps")
        d.type, d.mode, d.mtime = tarfile.DIRTYPE, 0o755, 1_000_000_000
        tf.addfile(d)
        data = b"#!/bin/sh\necho capable\n"
        f = tarfile.TarInfo("caps/capfile")
        f.size, f.mode, f.mtime = len(data), 0o755, 1_000_000_000
        f.pax_headers = {"SCHILY.xattr.security.capability": CAPABILITY.decode("latin-1")}
        tf.addfile(f, io.BytesIO(data))


def build_rich(d: Dockerd, workdir: StrPath) -> dict[str, str]:
    """Build ``acme/rich:1`` (see the module docstring) FROM the final image of ``build_walkthrough``, which
    must be built first; returns {tag: image ID}."""
    ctx = os.path.join(os.fspath(workdir), "rich")
    os.makedirs(ctx)
    capability_tar(os.path.join(ctx, "caps.tar"))
    _write(os.path.join(ctx, "Dockerfile"), f"""\
FROM {FINAL_IMAGE}
ADD caps.tar /
RUN {_oneline(RICH_POPULATE)}
RUN {_oneline(RICH_REPLACE)}
CMD ["/bin/sh"]
""")
    return {RICH_IMAGE: build(d, ctx, RICH_IMAGE)}
