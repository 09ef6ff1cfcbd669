"""A private docker-registry (CNCF distribution, Debian's package) on a free loopback port, for the tests marked
``registry``: its own temporary config and storage, stopped by PID however the test ends.

`unavailable()` says why one cannot run here (cheap: it starts nothing); a
registry that then fails to start is reported through `missing_feature`, so
that under CI=true the test fails instead of skipping. With `users` the
registry asks for HTTP basic auth against an htpasswd file of bcrypt entries
(distribution reads no other hash), made with apache2-utils' `htpasswd -B`.

`FakeRegistry` is a small read-only registry in a thread, for the answers a
real one never gives (garbage, truncated or mismatching blobs, a bearer
token server, a slow blob to kill a pull in the middle of).
"""

from __future__ import annotations

import base64
import contextlib
import gzip
import hashlib
import http.server
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator

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
        """The access log's requests ("GET /v2/acme/app/blobs/sha256:..."), in order (method and path)."""
        found = []
        with open(self.log, errors="replace") as f:
            for line in f:
                m = re.search(r'"(GET|HEAD|PUT|POST|PATCH|DELETE) (/v2/\S*) HTTP/[0-9.]+" (\d+)', line)
                if m:
                    found.append(f"{m.group(1)} {m.group(2)} {m.group(3)}")
        return found

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


# -- a fake registry, for the answers a real one never gives (garbage, truncated or mismatching blobs) -------

MANIFEST_V2 = "application/vnd.docker.distribution.manifest.v2+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def image_blobs(layers: list[bytes], compress: str = "gzip", architecture: str = "amd64",
                created_by: str = "test") -> tuple[bytes, dict[str, bytes], str]:
    """An image as a registry holds it, from layer tars: (manifest, {digest: blob}, config digest)."""
    config = json.dumps({"architecture": architecture, "os": "linux", "config": {},
                         "rootfs": {"type": "layers", "diff_ids": [sha256(t) for t in layers]},
                         "history": [{"created_by": created_by} for _ in layers]}, sort_keys=True).encode()
    blobs = {sha256(config): config}
    descs = []
    for tar in layers:
        if compress == "gzip":
            blob, media = gzip.compress(tar, mtime=0), "application/vnd.docker.image.rootfs.diff.tar.gzip"
        elif compress == "zstd":
            blob = subprocess.run(["zstd", "-q", "-c"], input=tar, capture_output=True, check=True).stdout
            media = "application/vnd.oci.image.layer.v1.tar+zstd"
        else:
            blob, media = tar, "application/vnd.oci.image.layer.v1.tar"
        blobs[sha256(blob)] = blob
        descs.append({"mediaType": media, "size": len(blob), "digest": sha256(blob)})
    manifest = json.dumps({"schemaVersion": 2, "mediaType": MANIFEST_V2,
                           "config": {"mediaType": "application/vnd.docker.container.image.v1+json",
                                      "size": len(config), "digest": sha256(config)},
                           "layers": descs}).encode()
    return manifest, blobs, sha256(config)


class FakeRegistry:
    """A read-only registry in a thread of this process, on a free loopback port, serving `manifests`
    ({"repo:ref": (media type, bytes)}) and `blobs` ({digest: bytes}).

    `override(method, path)` may answer a request instead: (status, headers, body), or None. `rate`
    (bytes a second) slows blob bodies down; `sent` counts the blob bytes sent. `login` (user, password)
    makes it ask for a bearer token from its own token server (/token), as the distribution spec has it.
    """

    def __init__(self, manifests=None, blobs=None, login: tuple[str, str] | None = None):
        self.manifests = dict(manifests or {})
        self.blobs = dict(blobs or {})
        self.override: Callable | None = None
        self.rate: float | None = None
        self.sent = 0
        self.log: list[str] = []
        self.login = login
        self.tokens: set[str] = set()
        fake = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_HEAD(self):
                fake.handle(self, "HEAD")

            def do_GET(self):
                fake.handle(self, "GET")

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.host = f"127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def add(self, repo: str, ref: str, manifest: bytes, blobs: dict[str, bytes], media: str = MANIFEST_V2) -> None:
        self.manifests[f"{repo}:{ref}"] = (media, manifest)
        self.manifests[f"{repo}:{sha256(manifest)}"] = (media, manifest)
        self.blobs.update(blobs)

    def send(self, h, status, headers, body, method, slow=False):
        h.send_response(status)
        for k, v in headers.items():
            h.send_header(k, v)
        if "Content-Length" not in headers:
            h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        if method == "HEAD":
            return
        if not slow or not self.rate:
            h.wfile.write(body)
            self.sent += len(body) if slow else 0
            return
        step = max(1, int(self.rate / 20))
        for i in range(0, len(body), step):
            h.wfile.write(body[i:i + step])
            h.wfile.flush()
            self.sent += len(body[i:i + step])
            time.sleep(0.05)

    def handle(self, h, method):
        path = h.path.split("?", 1)[0]
        self.log.append(f"{method} {path}")
        try:
            if path == "/token":
                auth = h.headers.get("Authorization", "")
                want = "Basic " + base64.b64encode(f"{self.login[0]}:{self.login[1]}".encode()).decode()
                if auth != want:
                    return self.send(h, 401, {}, b'{"details":"bad login"}', method)
                token = f"t{len(self.tokens)}"
                self.tokens.add(token)
                return self.send(h, 200, {"Content-Type": "application/json"},
                                 json.dumps({"token": token}).encode(), method)
            if self.login and h.headers.get("Authorization", "").removeprefix("Bearer ") not in self.tokens:
                challenge = (f'Bearer realm="http://{self.host}/token",service="fake",'
                             f'scope="repository:acme/app:pull"')
                return self.send(h, 401, {"WWW-Authenticate": challenge, "Content-Type": "application/json"},
                                 b'{"errors":[{"code":"UNAUTHORIZED","message":"authentication required"}]}',
                                 method)
            answer = self.override(method, path) if self.override else None
            if answer is not None:
                return self.send(h, *answer, method, slow=True)
            if path == "/v2/":
                return self.send(h, 200, {}, b"{}", method)
            m = re.fullmatch(r"/v2/(.+)/(manifests|blobs)/([^/]+)", path)
            if m and m.group(2) == "manifests" and f"{m.group(1)}:{m.group(3)}" in self.manifests:
                media, body = self.manifests[f"{m.group(1)}:{m.group(3)}"]
                return self.send(h, 200, {"Content-Type": media, "Docker-Content-Digest": sha256(body)}, body,
                                 method)
            if m and m.group(2) == "blobs" and m.group(3) in self.blobs:
                return self.send(h, 200, {"Content-Type": "application/octet-stream"}, self.blobs[m.group(3)],
                                 method, slow=True)
            return self.send(h, 404, {"Content-Type": "application/json"},
                             b'{"errors":[{"code":"MANIFEST_UNKNOWN","message":"manifest unknown"}]}', method)
        except (BrokenPipeError, ConnectionResetError):
            pass

    def __enter__(self) -> FakeRegistry:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
