"""A private docker-registry (CNCF distribution, Debian's package) on a free loopback port, for the tests marked
``registry``: its own temporary config and storage, stopped by PID however the test ends.

`unavailable()` says why one cannot run here (cheap: it starts nothing); a
registry that then fails to start is reported through `missing_feature`, so
that under CI=true the test fails instead of skipping. With `users` the
registry asks for HTTP basic auth against an htpasswd file of bcrypt entries
(distribution reads no other hash), made with apache2-utils' `htpasswd -B`.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator

import requests

BINARY = "docker-registry"
START_TIMEOUT = 15.0


def unavailable() -> str | None:
    """Why a private registry cannot be started here, or None."""
    if shutil.which(BINARY) is None:
        return f"no {BINARY} binary (Debian package docker-registry)"
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def htpasswd_line(user: str, password: str) -> str:
    """A bcrypt htpasswd entry, as distribution's htpasswd auth needs."""
    if shutil.which("htpasswd") is None:
        raise RuntimeError("no htpasswd command (Debian package apache2-utils)")
    out = subprocess.run(["htpasswd", "-nbB", "-C", "4", user, password], check=True, capture_output=True,
                         text=True, timeout=30).stdout
    return out.strip()


class Registry:
    """A running docker-registry: `host` is "127.0.0.1:PORT", `log` its log file (one line per request)."""

    def __init__(self, base: str, users: dict[str, str] | None = None):
        self.base = base
        self.port = free_port()
        self.host = f"127.0.0.1:{self.port}"
        self.storage = os.path.join(base, "storage")
        self.log = os.path.join(base, "registry.log")
        os.makedirs(self.storage, exist_ok=True)
        auth = ""
        if users:
            path = os.path.join(base, "htpasswd")
            with open(path, "w") as f:
                for user, password in users.items():
                    f.write(htpasswd_line(user, password) + "\n")
            auth = f"auth:\n  htpasswd:\n    realm: cowfs-test\n    path: {path}\n"
        self.config = os.path.join(base, "config.yml")
        with open(self.config, "w") as f:
            f.write("version: 0.1\nlog:\n  level: info\n  accesslog:\n    disabled: false\n"
                    f"storage:\n  filesystem:\n    rootdirectory: {self.storage}\n  delete:\n    enabled: true\n"
                    f"http:\n  addr: 127.0.0.1:{self.port}\n{auth}")
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen([BINARY, "serve", self.config], stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"docker-registry exited with {self.proc.returncode}: {self.log_tail()}")
            try:
                r = requests.get(f"http://{self.host}/v2/", timeout=2)
                if r.status_code in (200, 401):
                    return
            except requests.ConnectionError:
                pass
            time.sleep(0.05)
        raise RuntimeError(f"docker-registry did not answer on {self.host} in {START_TIMEOUT:.0f} s")

    def log_tail(self, n: int = 5) -> str:
        with contextlib.suppress(OSError), open(self.log, errors="replace") as f:
            return " | ".join(f.read().splitlines()[-n:])
        return ""

    def requests_logged(self) -> list[str]:
        """The access log's request lines ("GET /v2/... HTTP/1.1"), in order."""
        with open(self.log, errors="replace") as f:
            return [line.split('"')[1] for line in f if line.count('"') >= 2 and '"GET ' in line
                    or '"HEAD ' in line or '"PUT ' in line or '"POST ' in line or '"PATCH ' in line]

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


@contextlib.contextmanager
def private_registry(users: dict[str, str] | None = None, base: str | None = None) -> Iterator[Registry]:
    """A docker-registry on a free loopback port, stopped by PID and its directory removed however the block ends."""
    made = base is None
    base = base or tempfile.mkdtemp(prefix="cowfs-registry-")
    registry = Registry(base, users)
    try:
        registry.start()
        yield registry
    finally:
        registry.stop()
        if made:
            shutil.rmtree(base, ignore_errors=True)
