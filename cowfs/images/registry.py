"""Pulling images from and pushing them to a registry (the OCI distribution API, as Docker's registry speaks it).

`pull` fetches a manifest (following an image index to this machine's
platform, or `--platform`), the config, and only the layer blobs whose diff
IDs the store lacks, several at once, each unpacked while it streams in
(gzip, zstd or plain, as `import` reads them) with its blob digest, its size
and its diff ID checked; everything lands in one store transaction, so a pull
stopped anywhere (SIGKILL included) leaves the store as it was.

`push` sends what the registry lacks: for each layer a blob it already has
(HEAD), or one it can mount from another repository this store knows holds it
(`?mount=&from=`), or else the layer's tar gzip-compressed by cowfs
deterministically (level 6, gzip's and Docker's default; mtime 0, no file
name; 128 KiB blocks, a block whose samples do not compress stored as it is:
the same layer always gives the same blob), each sent while it is
compressed (a chunked PATCH, as docker push sends a layer), several at once;
then the config, then a Docker schema 2 manifest (an OCI one when the
registry refuses that).

What the store remembers of blobs is in distribution.json: per diff ID, the
compressed blobs known for it (digest, size, media type, whether cowfs makes
it, the registry repositories known to hold it). It is a cache: losing it
only costs a compression or an upload.

Registry settings live in the store too: auth.json holds the logins in the
format of Docker's config.json and of containers' auth.json ({"auths": {HOST:
{"auth": base64(user:password)}}}, mode 0600), so `skopeo --authfile` reads
it as well; registries.json lists the registries spoken to in plain HTTP
({"insecure": [HOST, ...]}), which `--insecure` on login adds to. Loopback
registries (localhost, 127.0.0.0/8, [::1]) are plain HTTP without asking, as
Docker takes them for insecure registries.

Authentication is the distribution spec's: a 401 with `WWW-Authenticate:
Basic` is answered with the stored login; one with `Bearer realm=...,
service=...,scope=...` sends the login (if any) to the realm for a token,
and the request is sent again with it.

Every failure is a `RegistryError` whose str() is one line naming the
reference and the reason.
"""

import base64
import concurrent.futures
import contextlib
import hashlib
import ipaddress
import json
import os
import queue
import re
import struct
import sys
import threading
import time
import zlib

from cowfs.errors import CowfsError
from cowfs.formatting import docker_size
from cowfs.images.archive import ArchiveError
from cowfs.images.reference import DEFAULT_DOMAINS, BadReference, _split, check_reference, normalise_ref
from cowfs.images.store import StoreError, machine_architecture

MANIFEST_V2 = "application/vnd.docker.distribution.manifest.v2+json"
MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
MANIFESTS = (MANIFEST_V2, OCI_MANIFEST)
INDEXES = (MANIFEST_LIST, OCI_INDEX)
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
DOCKER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"
OCI_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
LAYER_TYPES = {  # media type -> compression
    DOCKER_GZIP: "gzip", OCI_GZIP: "gzip",
    "application/vnd.oci.image.layer.v1.tar": "none",
    "application/vnd.oci.image.layer.v1.tar+zstd": "zstd",
    "application/vnd.docker.image.rootfs.diff.tar": "none",
}
MAX_JSON = 16 << 20  # a manifest or config larger than this is no manifest or config
GZIP_LEVEL = 6
CHUNK = 1 << 20
TIMEOUT = (10, 60)  # seconds to connect, and between two reads: a registry that stops answering is an error
WORKERS = 4  # layers transferred at once
HUB_API = "registry-1.docker.io"
CACHE_FILE = "distribution.json"
AUTH_FILE = "auth.json"
SETTINGS_FILE = "registries.json"


class RegistryError(CowfsError):
    """A pull, push or login that failed; str() is one line naming the reference and why."""

    def __init__(self, ref, reason):
        self.ref, self.reason = ref, reason
        super().__init__(f"{ref}: {reason}")


class _Cancelled(Exception):
    """Another layer's transfer failed: this one stops."""


# -- references ------------------------------------------------------------------------------------------

class Remote:
    """A reference split for the API: `domain` ("127.0.0.1:5000", "docker.io"), `repository` ("acme/app"),
    `tag` and `digest` (either may be None), `text` as the user gave it, `local` the name it gets here."""

    def __init__(self, text):
        try:
            check_reference(text)
        except BadReference as e:
            raise RegistryError(text, e.reason) from None
        name, tag, digest = _split(text)
        first, _, rest = name.partition("/")
        if rest and ("." in first or ":" in first or first == "localhost" or first.startswith("[")):
            domain, path = first, rest
        else:
            domain, path = "docker.io", name
        if domain in DEFAULT_DOMAINS:
            domain = "docker.io"
            if "/" not in path:
                path = "library/" + path
        self.text, self.domain, self.repository, self.digest = text, domain, path, digest
        self.tag = tag if tag is not None or digest is not None else "latest"
        self.name = normalise_ref((f"{domain}/{path}" if domain != "docker.io" else path) + ":x")[:-2]
        self.local = f"{self.name}:{self.tag}" if self.tag is not None else None

    @property
    def reference(self):
        """What the manifest URL names: the digest when given, else the tag."""
        return self.digest or self.tag

    def __str__(self):
        return self.text


def is_loopback(domain):
    host = domain.rsplit(":", 1)[0] if not domain.startswith("[") else domain[1:domain.index("]")]
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# -- the store's registry files ------------------------------------------------------------------------

def _load(store, rel, default):
    try:
        value = store.load_json(rel)
    except FileNotFoundError:
        return default
    return value if isinstance(value, type(default)) else default


def credentials(store, domain):
    """(user, password) stored for `domain`, or None."""
    auths = _load(store, AUTH_FILE, {}).get("auths")
    entry = auths.get(domain) if isinstance(auths, dict) else None
    if not isinstance(entry, dict) or not isinstance(entry.get("auth"), str):
        return None
    try:
        user, _, password = base64.b64decode(entry["auth"]).decode().partition(":")
    except (ValueError, UnicodeDecodeError):
        return None
    return user, password


def _write_private(store, rel, value):
    """Write a JSON file of the store 0600 (it holds passwords), atomically."""
    with store.locked():
        path = os.path.join(store.root, rel)
        tmp = f"{path}.{os.getpid()}.new"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(value, f, indent=1)
                f.write("\n")
                f.flush()
                os.fsync(f.fileno())
            os.rename(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise


def save_credentials(store, domain, user, password):
    data = _load(store, AUTH_FILE, {})
    if not isinstance(data.get("auths"), dict):
        data["auths"] = {}
    auths = data["auths"]
    auths[domain] = {"auth": base64.b64encode(f"{user}:{password}".encode()).decode()}
    _write_private(store, AUTH_FILE, data)


def forget_credentials(store, domain):
    """Remove the login for `domain`; True when there was one."""
    data = _load(store, AUTH_FILE, {})
    auths = data.get("auths") if isinstance(data.get("auths"), dict) else {}
    if domain not in auths:
        return False
    del auths[domain]
    _write_private(store, AUTH_FILE, data)
    return True


def insecure_registries(store):
    listed = _load(store, SETTINGS_FILE, {}).get("insecure", [])
    return {d for d in listed if isinstance(d, str)} if isinstance(listed, list) else set()


def remember_insecure(store, domain):
    data = _load(store, SETTINGS_FILE, {})
    listed = sorted(insecure_registries(store) | {domain})
    if data.get("insecure") != listed:
        data["insecure"] = listed
        with store.locked():
            store.write_file(SETTINGS_FILE, json.dumps(data, indent=1).encode() + b"\n")


class BlobCache:
    """distribution.json: {diff ID: [{"digest", "size", "mediaType", "cowfs": bool, "repos": [HOST/REPO]}]}."""

    def __init__(self, store):
        self.store = store
        self.data = _load(store, CACHE_FILE, {})
        self.lock = threading.Lock()
        self.dirty = False

    def blobs(self, diff_id):
        entries = self.data.get(diff_id)
        return [e for e in entries if isinstance(e, dict) and isinstance(e.get("digest"), str)] \
            if isinstance(entries, list) else []

    def note(self, diff_id, digest, size, media, repo=None, made=False):
        with self.lock:
            entries = self.data.setdefault(diff_id, [])
            if not isinstance(entries, list):
                entries = self.data[diff_id] = []
            for entry in entries:
                if entry.get("digest") == digest:
                    break
            else:
                entry = {"digest": digest, "size": size, "mediaType": media, "cowfs": made, "repos": []}
                entries.append(entry)
                self.dirty = True
            if made and not entry.get("cowfs"):
                entry["cowfs"] = self.dirty = True
            repos = entry.setdefault("repos", [])
            if repo is not None and repo not in repos:
                repos.append(repo)
                self.dirty = True

    def encoded(self, also=()):
        """The file's new content: entries of stored layers (and of `also`, layers about to be)."""
        known = set(self.store.layer_ids()) | set(also)
        kept = {d: e for d, e in self.data.items() if d in known}
        return json.dumps(kept, indent=1, sort_keys=True).encode() + b"\n"

    def save(self):
        if self.dirty:
            with self.store.locked():
                self.store.write_file(CACHE_FILE, self.encoded())
            self.dirty = False


# -- the HTTP client ---------------------------------------------------------------------------------------

def _cause(e):
    """The reason under a requests exception, short: 'Connection refused', 'timed out', ..."""
    seen = e
    while seen is not None:
        if isinstance(seen, OSError) and seen.strerror:
            return seen.strerror
        inner = seen.args[0] if seen.args and isinstance(seen.args[0], BaseException) else None
        seen = inner or seen.__cause__ or seen.__context__
    text = str(e)
    m = re.search(r"\[Errno -?\d+\] ([^'\")]+)", text) or re.search(r"(Connection refused|timed out|"
                                                                   r"Name or service not known)", text)
    return m.group(1).strip() if m else " ".join(text.split())[:160]


def _challenge(header):
    """(scheme, {param: value}) of a WWW-Authenticate header."""
    scheme, _, rest = header.strip().partition(" ")
    params = dict(re.findall(r'(\w+)="([^"]*)"', rest))
    return scheme.lower(), params


def _error_text(response):
    """The registry's own words for a failed request (its errors[].message), or ''."""
    try:
        body = response.json()
        errors = body.get("errors") if isinstance(body, dict) else None
        if errors and isinstance(errors[0], dict):
            code, message = errors[0].get("code", ""), errors[0].get("message", "")
            return " ".join(f"{code} {message}".split())[:200]
    except ValueError:
        pass
    return ""


class Client:
    """Requests to one repository of one registry, authenticated as the registry asks (see the module doc)."""

    def __init__(self, remote, insecure=False, login=None):
        import requests

        self.requests = requests
        self.remote = remote
        self.domain = remote.domain
        api = HUB_API if self.domain == "docker.io" else self.domain
        self.scheme = "http" if insecure or is_loopback(self.domain) else "https"
        self.base = f"{self.scheme}://{api}/v2/"
        self.login = login
        self.session = requests.Session()
        self.session.headers["User-Agent"] = "cowfs"
        self.auth = None  # the Authorization header that worked
        self.tokens = {}  # scope -> bearer token
        self.scheme_used = None  # "basic" or "bearer", once the registry said which
        self.lock = threading.Lock()

    def fail(self, reason):
        return RegistryError(self.remote.text, reason)

    def _authorization(self, scope):
        if self.scheme_used == "bearer":
            token = self.tokens.get(scope)
            return f"Bearer {token}" if token else None
        if self.scheme_used == "basic" and self.login:
            return "Basic " + base64.b64encode(f"{self.login[0]}:{self.login[1]}".encode()).decode()
        return None

    def request(self, method, path, scope=None, ok=(200,), stream=False, retry=True, **kw):
        """Send a request to base + `path` (or a full URL); a 401 is answered once as it asks (module doc).
        Returns the response when its status is in `ok`; else RegistryError."""
        url = path if path.startswith(("http://", "https://")) else self.base + path
        headers = dict(kw.pop("headers", {}))
        auth = self._authorization(scope)
        if auth:
            headers["Authorization"] = auth
        try:
            r = self.session.request(method, url, headers=headers, timeout=TIMEOUT, stream=stream, **kw)
        except self.requests.exceptions.SSLError as e:
            raise self.fail(f"TLS error talking to {self.domain} ({_cause(e)}); a registry without TLS needs "
                            f"--insecure") from None
        except self.requests.exceptions.RequestException as e:
            raise self.fail(f"cannot reach registry {self.domain} ({_cause(e)})") from None
        if r.status_code == 401 and retry:
            r.close()
            self.authenticate(r.headers.get("WWW-Authenticate", ""), scope)
            headers.pop("Authorization", None)
            return self.request(method, path, scope, ok, stream, retry=False, headers=headers, **kw)
        if r.status_code not in ok:
            self.refuse(r, method)
        return r

    def refuse(self, r, method):
        said = _error_text(r) if method != "HEAD" else ""
        words = f" ({said})" if said else ""
        r.close()
        if r.status_code == 401:
            hint = f"wrong user name or password for {self.domain}" if self.login else \
                f"authentication required (cowfs login {self.domain})"
            raise self.fail(f"401 unauthorized: {hint}{words}")
        if r.status_code == 403:
            raise self.fail(f"403 denied: not allowed to access {self.remote.repository}{words}")
        raise self.fail(f"registry {self.domain} answered {r.status_code} {r.reason or ''} to {method} "
                        f"{r.url.split('/v2/', 1)[-1]}{words}".replace("  ", " "))

    def authenticate(self, header, scope):
        scheme, params = _challenge(header)
        if scheme == "basic":
            if not self.login:
                raise self.fail(f"401 unauthorized: authentication required (cowfs login {self.domain})")
            self.scheme_used = "basic"
            return
        if scheme != "bearer" or "realm" not in params:
            raise self.fail(f"401 unauthorized, and the registry asks for no authentication cowfs knows "
                            f"({header or 'no WWW-Authenticate header'})")
        self.scheme_used = "bearer"
        query = [("service", params["service"])] if "service" in params else []
        for s in (scope or params.get("scope", "")).split(" "):
            if s:
                query.append(("scope", s))
        auth = self.login if self.login else None
        try:
            r = self.session.get(params["realm"], params=query, auth=auth, timeout=TIMEOUT)
        except self.requests.exceptions.RequestException as e:
            raise self.fail(f"cannot reach the token server {params['realm']} ({_cause(e)})") from None
        if r.status_code in (401, 403):
            hint = "wrong user name or password" if self.login else f"authentication required (cowfs login " \
                f"{self.domain})"
            raise self.fail(f"{r.status_code} unauthorized by the token server: {hint}")
        try:
            body = r.json()
            token = body.get("token") or body.get("access_token")
        except (ValueError, AttributeError):
            token = None
        if r.status_code != 200 or not isinstance(token, str) or not token:
            raise self.fail(f"the token server {params['realm']} gave no token (HTTP {r.status_code})")
        with self.lock:
            self.tokens[scope] = token

    def json_document(self, path, scope, accept=None, digest=None, what="manifest"):
        """(bytes, media type, digest) of a manifest or config, its digest checked when one is known."""
        headers = {"Accept": ", ".join(accept)} if accept else {}
        r = self.request("GET", path, scope, ok=(200, 404), headers=headers, stream=True)
        if r.status_code == 404:
            said = _error_text(r)
            r.close()
            if what == "manifest":
                raise self.fail(f"not found: no manifest {self.remote.reference} in {self.domain}/"
                                f"{self.remote.repository}" + (f" ({said})" if said else ""))
            raise self.fail(f"not found: {what} {digest} is not in {self.domain}/{self.remote.repository}")
        try:
            data = r.raw.read(MAX_JSON + 1, decode_content=True)
        except Exception as e:  # noqa: BLE001 - urllib3's read errors: a broken answer, said in one line
            raise self.fail(f"{what} could not be read ({_cause(e)})") from None
        finally:
            r.close()
        if len(data) > MAX_JSON:
            raise self.fail(f"the registry's {what} is larger than {docker_size(MAX_JSON)}: not a {what}")
        got = "sha256:" + hashlib.sha256(data).hexdigest()
        if digest is not None and got != digest:
            raise self.fail(f"digest mismatch: {what} {digest} has digest {got}")
        header = r.headers.get("Docker-Content-Digest")
        if digest is None and header and header.startswith("sha256:") and header != got:
            raise self.fail(f"digest mismatch: the registry says {what} {self.remote.reference} is {header}, "
                            f"its content is {got}")
        media = (r.headers.get("Content-Type") or "").split(";")[0].strip()
        return data, media, got


def _parse_json(client, data, what):
    try:
        value = json.loads(data)
    except ValueError:
        raise client.fail(f"the registry's answer is not a {what} (not JSON: {data[:40]!r})") from None
    if not isinstance(value, dict):
        raise client.fail(f"the registry's answer is not a {what} (not a JSON object)")
    return value


# -- progress: one line per layer, as docker pull and push show them ---------------------------------------

class Lines:
    """Per-layer status lines: redrawn in place on a terminal, else one plain line per change of status."""

    def __init__(self, out, quiet=False):
        self.out, self.quiet = out, quiet
        try:
            self.tty = out.isatty()
        except (AttributeError, ValueError):
            self.tty = False
        self.rows, self.order = {}, []
        self.lock = threading.Lock()
        self.drawn = 0
        self.last = 0.0

    def say(self, text):
        if not self.quiet:
            with self.lock:
                print(text, file=self.out, flush=True)
                self.drawn = 0

    def set(self, key, status, detail=""):
        if self.quiet:
            return
        with self.lock:
            old = self.rows.get(key)
            if key not in self.rows:
                self.order.append(key)
            self.rows[key] = (status, detail)
            if self.tty:
                now = time.monotonic()
                if detail and old and old[0] == status and now - self.last < 0.1:
                    return
                self.last = now
                self._redraw()
            elif old is None or old[0] != status:
                print(f"{key}: {status}", file=self.out, flush=True)

    def progress(self, key, status, done, total):
        """`set` with a progress bar, the bar drawn only when it would be shown (it is called per chunk)."""
        if self.quiet or (self.tty and self.rows.get(key, ("",))[0] == status
                          and time.monotonic() - self.last < 0.1):
            return
        if not self.tty and self.rows.get(key, ("",))[0] == status:
            return
        self.set(key, status, self.bar(done, total))

    def _redraw(self):
        out = [f"\x1b[{self.drawn}A"] if self.drawn else []
        for key in self.order:
            status, detail = self.rows[key]
            out.append(f"\x1b[2K{key}: {status}{' ' + detail if detail else ''}\n")
        self.out.write("".join(out))
        self.out.flush()
        self.drawn = len(self.order)

    def bar(self, done, total):
        if not total:
            return docker_size(done)
        width = 40
        filled = min(width, width * done // total)
        arrow = "=" * max(filled - 1, 0) + (">" if filled < width else "=") if filled else ""
        return f"[{arrow:<{width}}] {docker_size(done)}/{docker_size(total)}"


# -- pull ---------------------------------------------------------------------------------------------------

def _platform(text):
    """(os, architecture, variant or None) of --platform OS/ARCH[/VARIANT], or of this machine."""
    if text is None:
        arch = machine_architecture()
        return "linux", arch, "v8" if arch == "arm64" else None
    parts = text.split("/")
    if len(parts) not in (2, 3) or not all(parts):
        raise CowfsError(f"invalid platform {text!r}: expected OS/ARCH[/VARIANT] (linux/amd64, linux/arm/v7)")
    return parts[0], parts[1], parts[2] if len(parts) == 3 else None


def _pick(client, index, platform):
    """The descriptor of the manifest for `platform` in an image index."""
    want_os, want_arch, want_variant = platform
    candidates = []
    for desc in index.get("manifests") or []:
        plat = desc.get("platform") if isinstance(desc, dict) else None
        if not isinstance(plat, dict):
            continue
        if plat.get("os") == want_os and plat.get("architecture") == want_arch:
            variant = plat.get("variant")
            if want_variant is None or variant in (want_variant, None):
                candidates.append((variant != want_variant, desc))
    if not candidates:
        there = sorted({"/".join(str(v) for v in (d.get("platform", {}).get("os"),
                                                     d.get("platform", {}).get("architecture"),
                                                     d.get("platform", {}).get("variant")) if v)
                        for d in index.get("manifests") or [] if isinstance(d, dict)})
        raise client.fail(f"no manifest for platform {'/'.join(p for p in platform if p)} in the image index "
                          f"(it has: {', '.join(there) or 'none'})")
    candidates.sort(key=lambda c: c[0])
    return candidates[0][1]


class _BlobStream:
    """Reads a blob's response body: hashed, counted, shown, cut short when another transfer failed; a body
    that ends before its size is 'truncated', one longer than it a digest mismatch (checked by the caller)."""

    def __init__(self, client, response, desc, lines, key, cancel):
        self.client, self.r, self.desc = client, response, desc
        self.size = desc["size"]
        self.sha = hashlib.sha256()
        self.count = 0
        self.lines, self.key, self.cancel = lines, key, cancel

    def read(self, n=-1):
        if self.cancel.is_set():
            raise _Cancelled()
        want = CHUNK if n is None or n < 0 else n
        try:
            data = self.r.raw.read(want, decode_content=False)
        except Exception as e:  # noqa: BLE001 - urllib3's read errors (a cut connection, a timeout)
            raise self.truncated(_cause(e)) from None
        if data:
            self.sha.update(data)
            self.count += len(data)
            if self.count > self.size:
                raise self.client.fail(f"digest mismatch: blob {self.desc['digest']} is longer than its "
                                       f"{self.size} bytes")
            self.lines.progress(self.key, "Downloading", self.count, self.size)
        elif self.count < self.size:
            raise self.truncated("the connection ended")
        return data

    def truncated(self, why):
        return self.client.fail(f"truncated blob {self.desc['digest']}: got {self.count} of {self.size} bytes "
                                f"({why})")

    @property
    def digest(self):
        return "sha256:" + self.sha.hexdigest()


def _layer_desc(client, desc, where):
    if not isinstance(desc, dict):
        raise client.fail(f"{where}: a layer descriptor is not an object")
    media, digest, size = desc.get("mediaType"), desc.get("digest"), desc.get("size")
    if not isinstance(digest, str) or not re.fullmatch(r"sha256:[0-9a-f]{64}", digest):
        raise client.fail(f"{where}: layer digest {digest!r} is not sha256:<64 hex digits>")
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise client.fail(f"{where}: layer {digest[7:19]} has no size")
    if media not in LAYER_TYPES:
        kind = "a foreign (non-distributable) layer" if "foreign" in str(media) or "nondistributable" in \
            str(media) else "a layer of unknown media type"
        raise client.fail(f"{kind} {media!r} ({digest[7:19]})")
    return desc


def pull(store, ref, platform=None, insecure=False, out=None, quiet=False):
    """Pull image `ref` into `store` (all or nothing). Returns the image ID.

    On `out`, as docker pull: "TAG: Pulling from REPO", a line per layer, the
    digest, the status, and the name pulled; with `quiet` only the name.

    Raises:
        RegistryError: the registry could not be reached or refused, or sent something wrong (one line).
    """
    out = out if out is not None else sys.stdout
    remote = Remote(ref)
    plat = _platform(platform)
    insecure = insecure or remote.domain in insecure_registries(store)
    client = Client(remote, insecure, credentials(store, remote.domain))
    scope = f"repository:{remote.repository}:pull"
    lines = Lines(out, quiet)
    accept = [MANIFEST_V2, OCI_MANIFEST, MANIFEST_LIST, OCI_INDEX]
    data, media, digest = client.json_document(f"{remote.repository}/manifests/{remote.reference}", scope, accept,
                                               remote.digest)
    manifest = _parse_json(client, data, "manifest")
    media = manifest.get("mediaType") or media
    if media in INDEXES or (media not in MANIFESTS and "manifests" in manifest and "layers" not in manifest):
        desc = _pick(client, manifest, plat)
        want = desc.get("digest")
        if not isinstance(want, str) or not re.fullmatch(r"sha256:[0-9a-f]{64}", want):
            raise client.fail(f"the image index names manifest {want!r}, which is no sha256 digest")
        data, media, _ = client.json_document(f"{remote.repository}/manifests/{want}", scope, accept, want)
        manifest = _parse_json(client, data, "manifest")
        media = manifest.get("mediaType") or desc.get("mediaType") or media
    if media not in MANIFESTS:
        if manifest.get("schemaVersion") == 1:
            media = "application/vnd.docker.distribution.manifest.v1+json (schema 1, which cowfs does not read)"
        raise client.fail(f"manifest of unknown media type {media or 'none'!r}")
    config_desc = manifest.get("config")
    layers = manifest.get("layers")
    if not isinstance(config_desc, dict) or not isinstance(layers, list):
        raise client.fail("the manifest has no config or no layers list")
    config_digest = config_desc.get("digest")
    if not isinstance(config_digest, str) or not re.fullmatch(r"sha256:[0-9a-f]{64}", config_digest):
        raise client.fail(f"the manifest's config digest {config_digest!r} is not sha256:<64 hex digits>")
    layers = [_layer_desc(client, d, "manifest") for d in layers]
    if store.has_image(config_digest):  # the config is the image: stored already, nothing to fetch
        config_bytes = store.config_bytes(config_digest)
    else:
        config_bytes, _, _ = client.json_document(f"{remote.repository}/blobs/{config_digest}", scope, None,
                                                  config_digest, what="config")
    config = _parse_json(client, config_bytes, "image config")
    diff_ids = (config.get("rootfs") or {}).get("diff_ids") if isinstance(config.get("rootfs"), dict) else None
    if not isinstance(diff_ids, list) or len(diff_ids) != len(layers) or not all(
            isinstance(d, str) and re.fullmatch(r"sha256:[0-9a-f]{64}", d) for d in diff_ids):
        raise client.fail(f"the config's rootfs.diff_ids are not {len(layers)} sha256 digests, one per layer")
    image_id = "sha256:" + hashlib.sha256(config_bytes).hexdigest()
    shown_name = remote.local if remote.digest is None else f"{remote.name}@{remote.digest}"
    lines.say(f"{remote.reference}: Pulling from {remote.repository}")  # as docker pull says it
    cache = BlobCache(store)
    repo_key = f"{remote.domain}/{remote.repository}"
    refs = [remote.local] if remote.digest is None else []
    had_image = store.has_image(image_id) and all(store.repositories().get(r) == image_id for r in refs)
    cancel = threading.Event()
    with store.transaction() as txn:
        todo, seen = [], set()
        for desc, diff_id in zip(layers, diff_ids):
            key = desc["digest"][7:19]
            if txn.has_layer(diff_id) or diff_id in seen:
                lines.set(key, "Already exists")
                continue
            seen.add(diff_id)
            lines.set(key, "Pulling fs layer")
            todo.append((desc, diff_id))

        def fetch(desc, diff_id):
            key = desc["digest"][7:19]
            r = client.request("GET", f"{remote.repository}/blobs/{desc['digest']}", scope, ok=(200, 404),
                               stream=True)
            if r.status_code == 404:
                r.close()
                raise client.fail(f"not found: blob {desc['digest']} is not in {remote.domain}/"
                                  f"{remote.repository}")
            try:
                blob = _BlobStream(client, r, desc, lines, key, cancel)
                try:
                    txn.add_layer(blob, f"{remote.text} layer {desc['digest'][7:19]}", expected=diff_id)
                except ArchiveError as e:
                    if blob.digest != desc["digest"] and blob.count == blob.size:
                        raise client.fail(f"digest mismatch: blob {desc['digest']} has digest "
                                          f"{blob.digest}") from None
                    raise client.fail(f"layer {desc['digest'][7:19]}: {e.reason}") from None
                while blob.read(CHUNK):
                    pass
                if blob.digest != desc["digest"]:
                    raise client.fail(f"digest mismatch: blob {desc['digest']} has digest {blob.digest}")
            finally:
                r.close()
            cache.note(diff_id, desc["digest"], desc["size"], desc["mediaType"], repo_key)
            lines.set(key, "Pull complete")

        pool = concurrent.futures.ThreadPoolExecutor(max_workers=WORKERS, thread_name_prefix="pull")
        try:
            futures = [pool.submit(fetch, d, i) for d, i in todo]
            for f in concurrent.futures.as_completed(futures):
                error = f.exception()
                if error is not None and not isinstance(error, _Cancelled):
                    cancel.set()
                    raise error
        finally:
            cancel.set()
            pool.shutdown(wait=True, cancel_futures=True)
        for desc, diff_id in zip(layers, diff_ids):
            if not any(e["digest"] == desc["digest"] for e in cache.blobs(diff_id)):
                cache.note(diff_id, desc["digest"], desc["size"], desc["mediaType"], repo_key)
        try:
            txn.add_image(config_bytes, refs)
        except (StoreError, BadReference) as e:
            raise client.fail(str(e)) from None
        if cache.dirty:  # written with the layers, so that a pull stopped anywhere changes nothing
            txn.add_file(CACHE_FILE, cache.encoded(also=diff_ids))
        txn.commit()
    lines.say(f"Digest: {digest}")
    lines.say(f"Status: {'Image is up to date' if had_image else 'Downloaded newer image'} for {shown_name}")
    if quiet:
        print(shown_name, file=out, flush=True)
    else:
        lines.say(shown_name)
    return image_id


# -- push ---------------------------------------------------------------------------------------------------

class _HashingFile:
    """A file written through, its sha256 and size kept (the compressed blob's digest, in the same pass)."""

    def __init__(self, f):
        self.f, self.sha, self.size = f, hashlib.sha256(), 0

    def write(self, data):
        self.sha.update(data)
        self.size += len(data)
        return self.f.write(data)

    def flush(self):
        self.f.flush()


class _BlockGzip:
    """A deterministic gzip writer (mtime 0, no file name) that deflates its input in BLOCK-sized blocks, each
    primed with the 32 KiB before it (as pigz cuts its blocks), or stores a block as it is when samples of it
    do not compress (compressed or random data, on which zlib's deflate spends ten times as long as on text,
    for nothing). The choice depends on the bytes only: the same tar gives the same blob, one gzip member."""

    BLOCK = 128 << 10
    SAMPLE = 1 << 10  # two samples of this many bytes, at the start and the middle of a block
    HEADER = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff"

    def __init__(self, f):
        self.f = f
        self.pending = bytearray()
        self.window = b""  # the last 32 KiB written: the dictionary of the next block
        self.crc = 0
        self.size = 0
        self.f.write(self.HEADER)

    def write(self, data):
        self.crc = zlib.crc32(data, self.crc)
        self.size += len(data)
        self.pending += data
        if len(self.pending) >= self.BLOCK:
            view = memoryview(self.pending)
            done = 0
            while len(self.pending) - done >= self.BLOCK:
                self._block(bytes(view[done:done + self.BLOCK]))
                done += self.BLOCK
            view.release()
            del self.pending[:done]
        return len(data)

    def _incompressible(self, block):
        if len(block) < 2 * self.SAMPLE:
            return False
        for start in (0, len(block) // 2):
            probe = zlib.compressobj(1, zlib.DEFLATED, -10, 2)  # a 1 KiB window: cheap to set up
            if len(probe.compress(block[start:start + self.SAMPLE]) + probe.flush()) < self.SAMPLE * 0.97:
                return False
        return True

    def _block(self, block):
        if self._incompressible(block):
            for start in range(0, len(block), 0xFFFF):  # stored blocks (BFINAL 0): LEN, NLEN, the bytes
                part = block[start:start + 0xFFFF]
                self.f.write(struct.pack("<BHH", 0, len(part), len(part) ^ 0xFFFF) + part)
        else:
            c = zlib.compressobj(GZIP_LEVEL, zlib.DEFLATED, -15, zdict=self.window) if self.window else \
                zlib.compressobj(GZIP_LEVEL, zlib.DEFLATED, -15)
            self.f.write(c.compress(block) + c.flush(zlib.Z_SYNC_FLUSH))
        self.window = (self.window + block[-32768:])[-32768:]

    def close(self):
        if self.pending:
            self._block(bytes(self.pending))
            self.pending = bytearray()
        self.f.write(b"\x03\x00")  # an empty final block (fixed Huffman codes, end of block)
        self.f.write(struct.pack("<II", self.crc, self.size & 0xFFFFFFFF))

    def flush(self):
        pass


def _compress_layer(store, diff_id, image_id, out):
    """Write layer `diff_id` to `out` as a deterministic gzip blob, in one pass (tar, gzip, digest): (digest,
    size). The tar is the one imported, from its tar-split (read through first: the blob is sent as it is
    made, so a tar-split found broken half-way could not be dropped for the tree), as `cowfs save` writes
    it back; else the tar of the tree."""
    from cowfs.images.archive import (
        SPLIT_FILE,
        SplitCorrupt,
        SplitMismatch,
        check_split,
        write_layer,
        write_split_layer,
    )

    cannot = f"layer {diff_id[7:19]} of image {image_id[7:19]} cannot be written back as it was stored"
    split = os.path.join(store.layer_dir(diff_id), SPLIT_FILE)
    try:
        check_split(split)
    except (OSError, SplitCorrupt):
        split = None
    hashing = _HashingFile(out)
    gz = _BlockGzip(hashing)
    if split is not None:
        try:
            got = write_split_layer(store.layer_path(diff_id), split, gz)[0]
        except SplitMismatch as e:
            raise StoreError(f"{cannot} ({e})") from None
        except SplitCorrupt as e:  # changed since it was read through
            raise StoreError(f"{cannot} (its tar-split: {e})") from None
    else:
        got = write_layer(store.layer_path(diff_id), gz, prefix=store.prefix)[0]
    gz.close()
    if got != diff_id:
        raise StoreError(f"{cannot} (its tree gives {got[7:19]})")
    return "sha256:" + hashing.sha.hexdigest(), hashing.size


class _Pipe:
    """The writer a layer is compressed into, in a thread of its own, while the upload reads it (`chunks`):
    a few MiB at most in between. Once `stop` is set, writing raises _Cancelled (the upload ended)."""

    def __init__(self):
        self.queue = queue.Queue(maxsize=8)
        self.stop = threading.Event()
        self.buffer = bytearray()

    def _put(self, item):
        while True:
            if self.stop.is_set():
                raise _Cancelled()
            try:
                self.queue.put(item, timeout=0.2)
                return
            except queue.Full:
                continue

    def write(self, data):
        self.buffer += data
        if len(self.buffer) >= CHUNK:
            self._put(bytes(self.buffer))
            self.buffer = bytearray()
        return len(data)

    def flush(self):
        pass

    def close(self):
        """The end of the blob (or of what could be made of it)."""
        if self.buffer:
            self._put(bytes(self.buffer))
            self.buffer = bytearray()
        self._put(None)

    def chunks(self, cancel, progress):
        done = 0
        while not cancel.is_set():
            try:
                chunk = self.queue.get(timeout=0.2)
            except queue.Empty:
                continue
            if chunk is None:
                return
            done += len(chunk)
            progress(done)
            yield chunk


def _absolute(client, location):
    return location if not location.startswith("/") else client.base[:-len("/v2/")] + location


def _stream_upload(client, repository, scope, make, lines, key, cancel):
    """Upload the blob `make(out)` writes to `out` (returning its (digest, size)) as it is made: POST, a
    PATCH of its bytes (chunked, as docker push sends a layer), then PUT with the digest. Returns
    (digest, size)."""
    r = client.request("POST", f"{repository}/blobs/uploads/", scope, ok=(202,))
    location = r.headers.get("Location")
    r.close()
    if not location:
        raise client.fail("the registry started an upload but gave no Location")
    pipe, made = _Pipe(), {}

    def work():
        try:
            made["blob"] = make(pipe)
        except BaseException as e:  # noqa: BLE001 - handed to the uploading thread, which raises it
            made["error"] = e
        finally:
            with contextlib.suppress(_Cancelled):
                pipe.close()

    worker = threading.Thread(target=work, name=f"gzip-{key}", daemon=True)
    worker.start()
    try:
        body = pipe.chunks(cancel, lambda done: lines.progress(key, "Pushing", done, 0))
        r = client.request("PATCH", _absolute(client, location), scope, ok=(202,), data=body, retry=False,
                           headers={"Content-Type": "application/octet-stream"})
        location = r.headers.get("Location") or location
        r.close()
    finally:
        pipe.stop.set()
        worker.join()
    if "error" in made and not isinstance(made["error"], _Cancelled):
        raise made["error"]
    if cancel.is_set() or "blob" not in made:
        raise _Cancelled()
    digest, size = made["blob"]
    location = _absolute(client, location)
    sep = "&" if "?" in location else "?"
    client.request("PUT", f"{location}{sep}digest={digest}", scope, ok=(201,), data=b"",
                   headers={"Content-Length": "0"}).close()
    return digest, size


class _Upload:
    """A file body for a PUT that shows its progress."""

    def __init__(self, path, lines, key, cancel):
        self.f = open(path, "rb")
        self.size = os.fstat(self.f.fileno()).st_size
        self.done = 0
        self.lines, self.key, self.cancel = lines, key, cancel

    def __len__(self):
        return self.size

    def read(self, n=-1):
        if self.cancel.is_set():
            raise _Cancelled()
        data = self.f.read(n if n and n > 0 else CHUNK)
        self.done += len(data)
        self.lines.progress(self.key, "Pushing", self.done, self.size)
        return data

    def close(self):
        self.f.close()


def _upload(client, repository, scope, path, digest, lines, key, cancel):
    r = client.request("POST", f"{repository}/blobs/uploads/", scope, ok=(202,))
    location = r.headers.get("Location")
    r.close()
    if not location:
        raise client.fail("the registry started an upload but gave no Location")
    location = _absolute(client, location)
    sep = "&" if "?" in location else "?"
    body = _Upload(path, lines, key, cancel)
    try:
        r = client.request("PUT", f"{location}{sep}digest={digest}", scope, ok=(201,), data=body,
                           headers={"Content-Type": "application/octet-stream", "Content-Length": str(body.size)})
        r.close()
    finally:
        body.close()


def _has_blob(client, repository, scope, digest):
    r = client.request("HEAD", f"{repository}/blobs/{digest}", scope, ok=(200, 404))
    r.close()
    return r.status_code == 200


def push(store, ref, insecure=False, out=None, quiet=False):
    """Push the stored image `ref` names to the registry it names; returns the manifest digest.

    Raises:
        RegistryError: the registry could not be reached, refused, or answered something wrong (one line).
        StoreError: no such image, or a layer that cannot be written back.
    """
    out = out if out is not None else sys.stdout
    remote = Remote(ref)
    if remote.digest is not None:
        raise RegistryError(ref, "cannot push to a digest: give NAME[:TAG]")
    if remote.local not in store.repositories():
        raise RegistryError(ref, f"no such image in store {store.root}: tag an image {remote.local} first "
                            "(cowfs tag IMAGE " + remote.local + ")")
    image_id = store.resolve(remote.local)
    config_bytes = store.config_bytes(image_id)
    diff_ids = store.image_layers(image_id)
    for diff_id in diff_ids:
        store.layer_info(diff_id, used_by=image_id)
    insecure = insecure or remote.domain in insecure_registries(store)
    client = Client(remote, insecure, credentials(store, remote.domain))
    scope = f"repository:{remote.repository}:pull,push"
    lines = Lines(out, quiet)
    cache = BlobCache(store)
    repo_key = f"{remote.domain}/{remote.repository}"
    lines.say(f"The push refers to repository [{remote.name}]")
    cancel = threading.Event()
    pushed = {}  # diff ID -> descriptor

    def send(diff_id):
        key = diff_id[7:19]
        lines.set(key, "Preparing")
        # blobs known to be in this registry: here already, or mountable from another repository
        known = [e for e in cache.blobs(diff_id) if LAYER_TYPES.get(e.get("mediaType")) == "gzip"]
        for entry in known:
            here = [r for r in entry.get("repos", []) if r.startswith(remote.domain + "/")]
            if repo_key in here and _has_blob(client, remote.repository, scope, entry["digest"]):
                lines.set(key, "Layer already exists")
                return entry
        for entry in known:
            for source in entry.get("repos", []):
                if not source.startswith(remote.domain + "/") or source == repo_key:
                    continue
                src = source[len(remote.domain) + 1:]
                r = client.request("POST", f"{remote.repository}/blobs/uploads/?mount={entry['digest']}&from={src}",
                                   f"{scope} repository:{src}:pull", ok=(201, 202))
                r.close()
                if r.status_code == 201:
                    lines.set(key, f"Mounted from {src}")
                    cache.note(diff_id, entry["digest"], entry["size"], entry["mediaType"], repo_key)
                    return entry
                location = r.headers.get("Location")
                if location:  # not mounted: the upload it opened is not needed
                    with contextlib.suppress(RegistryError):
                        client.request("DELETE", location if not location.startswith("/") else
                                       client.base[:-len("/v2/")] + location, scope, ok=(204, 404, 405)).close()
        made = [e for e in known if e.get("cowfs")]
        if made and _has_blob(client, remote.repository, scope, made[0]["digest"]):
            cache.note(diff_id, made[0]["digest"], made[0]["size"], made[0]["mediaType"], repo_key)
            lines.set(key, "Layer already exists")
            return made[0]
        digest, size = _stream_upload(client, remote.repository, scope,
                                      lambda out: _compress_layer(store, diff_id, image_id, out), lines, key, cancel)
        lines.set(key, "Pushed")
        cache.note(diff_id, digest, size, DOCKER_GZIP, repo_key, made=True)
        return {"digest": digest, "size": size, "mediaType": DOCKER_GZIP}

    pool = concurrent.futures.ThreadPoolExecutor(max_workers=WORKERS, thread_name_prefix="push")
    try:
        unique = list(dict.fromkeys(diff_ids))
        futures = {pool.submit(send, d): d for d in reversed(unique)}
        for f in concurrent.futures.as_completed(futures):
            error = f.exception()
            if error is not None and not isinstance(error, _Cancelled):
                cancel.set()
                raise error
            pushed[futures[f]] = f.result()
    finally:
        cancel.set()
        pool.shutdown(wait=True, cancel_futures=True)
    if not _has_blob(client, remote.repository, scope, image_id):
        with store.staging("push") as staging:
            path = os.path.join(staging.path, "config")
            with open(path, "wb") as f:
                f.write(config_bytes)
            _upload(client, remote.repository, scope, path, image_id, Lines(out, True), "config", threading.Event())
    digest, size = _put_manifest(client, remote, scope, config_bytes, image_id, diff_ids, pushed)
    with contextlib.suppress(OSError, StoreError):  # what is where, kept once the push is done
        cache.save()
    lines.say(f"{remote.tag}: digest: {digest} size: {size}")
    return digest


def _manifest(kind, config_bytes, image_id, diff_ids, pushed):
    oci = kind == OCI_MANIFEST
    layer_type = {DOCKER_GZIP: OCI_GZIP} if oci else {OCI_GZIP: DOCKER_GZIP}
    layers = []
    for diff_id in diff_ids:
        blob = pushed[diff_id]
        media = layer_type.get(blob["mediaType"], blob["mediaType"])
        layers.append({"mediaType": media, "size": blob["size"], "digest": blob["digest"]})
    return json.dumps({"schemaVersion": 2, "mediaType": kind,
                       "config": {"mediaType": OCI_CONFIG if oci else DOCKER_CONFIG, "size": len(config_bytes),
                                  "digest": image_id},
                       "layers": layers}, indent=3).encode()


def _put_manifest(client, remote, scope, config_bytes, image_id, diff_ids, pushed):
    """PUT the manifest: Docker schema 2, or OCI when the registry refuses that media type."""
    for kind in (MANIFEST_V2, OCI_MANIFEST):
        body = _manifest(kind, config_bytes, image_id, diff_ids, pushed)
        r = client.request("PUT", f"{remote.repository}/manifests/{remote.tag}", scope, ok=(201, 400, 415),
                           data=body, headers={"Content-Type": kind})
        said = _error_text(r)
        r.close()
        if r.status_code == 201:
            digest = "sha256:" + hashlib.sha256(body).hexdigest()
            return digest, len(body)
        if kind == OCI_MANIFEST or not ("MANIFEST_INVALID" in said or "UNSUPPORTED" in said.upper()
                                        or r.status_code == 415):
            raise client.fail(f"the registry refused the manifest ({r.status_code}: {said or r.reason})")
    raise AssertionError("unreachable")


# -- login ---------------------------------------------------------------------------------------------------

def login(store, domain, user, password, insecure=False):
    """Check `user`/`password` against registry `domain` (GET /v2/, authenticated as it asks) and store them.

    Raises:
        RegistryError: unreachable, or the login is refused (one line).
    """
    remote = Remote(f"{domain}/cowfs-login")
    remote.text = domain
    client = Client(remote, insecure or domain in insecure_registries(store), (user, password))
    client.request("GET", "", None)
    save_credentials(store, domain, user, password)
    if insecure:
        remember_insecure(store, domain)


__all__ = ["BlobCache", "Client", "RegistryError", "Remote", "credentials", "forget_credentials", "login",
           "pull", "push", "save_credentials"]
