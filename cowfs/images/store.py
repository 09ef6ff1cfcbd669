"""A content-addressed store of unpacked layers and the images made of them, and the config fields cowfs writes.

Layout of a store directory (as Docker's overlay2 and image store, simplified):

    layers/HEX/diff/        the layer unpacked, in the overlay's on-disk format
    layers/HEX/layer.json   {"diff_id", "size", "created"}; HEX is the diff ID's hex
    images/HEX.json         an image's config JSON, byte for byte; HEX (its sha256) is the image ID
    repositories.json       {"name:tag": "sha256:IMAGE-ID"}
    store.json              {"xattr_prefix": "trusted.overlay." | "user.overlay."}
    tmp/                    staging: everything new is built here, then renamed into place
    lock                    flock'ed by every change

A layer is stored once, whatever number of images use it. Changes happen
in a `Transaction`: layers are unpacked under tmp/, and only when all of
them are complete are they renamed into layers/ and the image and tag files
written (each by write-and-rename), so a failed import leaves the store as it was.
"""

import contextlib
import datetime
import fcntl
import hashlib
import json
import os
import platform
import re
import shutil
import tempfile
import time

from cowfs.errors import CowfsError
from cowfs.images.archive import unpack_layer
from cowfs.overlay.whiteout import TRUSTED_PREFIX, USER_PREFIX


class StoreError(CowfsError):
    """A store operation cowfs refuses; str() is the one-line message to show."""


def default_store():
    """$COWFS_STORE, else /var/lib/cowfs for root, else $XDG_DATA_HOME/cowfs (~/.local/share/cowfs)."""
    if os.environ.get("COWFS_STORE"):
        return os.environ["COWFS_STORE"]
    if os.geteuid() == 0:
        return "/var/lib/cowfs"
    data = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return os.path.join(data, "cowfs")


def check_digest(digest, what="digest"):
    """A "sha256:HEX" digest, checked so that it can name a file; returns HEX."""
    algo, _, hexpart = str(digest).partition(":")
    if algo != "sha256" or len(hexpart) != 64 or any(c not in "0123456789abcdef" for c in hexpart):
        raise StoreError(f"bad {what} {digest!r} (expected sha256:<64 hex digits>)")
    return hexpart


def normalise_ref(ref):
    """"name" -> "name:latest"; "name:tag" stays; a registry port ("host:5000/name") is not a tag."""
    name, _, tag = ref.rpartition(":")
    if not name or "/" in tag:
        return ref + ":latest"
    return ref


# -- the fields of an image config that cowfs writes and reads --------------------------------------

def now_rfc3339():
    """The time now as image configs and container records spell it: RFC 3339 in UTC, microseconds."""
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_time(text):
    """An RFC 3339 time as Docker writes it (up to nanoseconds, "Z" or an offset) -> seconds, or None."""
    if not text:
        return None
    m = re.match(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(\.\d+)?(Z|[+-]\d\d:\d\d)?$", text)
    if not m:
        return None
    base, frac, zone = m.groups()
    dt = datetime.datetime.fromisoformat(base + ((frac or ".") + "000000")[:7]
                                         + ("+00:00" if zone in (None, "Z") else zone))
    return dt.timestamp()


def machine_architecture():
    """This machine's architecture as OCI names it ("amd64", "arm64", ...)."""
    return {"x86_64": "amd64", "aarch64": "arm64"}.get(platform.machine(), platform.machine())


def _write_atomic(path, data):
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.rename(tmp, path)


class Store:
    def __init__(self, root, create=True):
        self.root = os.path.abspath(root)
        if create:
            for sub in ("layers", "images", "tmp"):
                os.makedirs(os.path.join(self.root, sub), exist_ok=True)
        elif not os.path.isdir(os.path.join(self.root, "layers")):
            raise StoreError(f"{self.root}: not a cowfs store")
        meta = os.path.join(self.root, "store.json")
        if os.path.exists(meta):
            with open(meta) as f:
                self.prefix = json.load(f)["xattr_prefix"]
        else:
            self.prefix = TRUSTED_PREFIX if os.geteuid() == 0 else USER_PREFIX
            if create:
                _write_atomic(meta, json.dumps({"xattr_prefix": self.prefix}).encode())

    # -- locking and staging ----------------------------------------------------------------------
    @contextlib.contextmanager
    def locked(self):
        with open(os.path.join(self.root, "lock"), "a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def transaction(self):
        return Transaction(self)

    # -- layers ------------------------------------------------------------------------------------
    def layer_dir(self, diff_id):
        return os.path.join(self.root, "layers", check_digest(diff_id, "diff ID"))

    def layer_path(self, diff_id):
        """The unpacked layer's directory, as a lowerdir."""
        return os.path.join(self.layer_dir(diff_id), "diff")

    def has_layer(self, diff_id):
        return os.path.exists(os.path.join(self.layer_dir(diff_id), "layer.json"))

    def layer_info(self, diff_id):
        with open(os.path.join(self.layer_dir(diff_id), "layer.json")) as f:
            return json.load(f)

    def layer_ids(self):
        out = []
        for name in os.listdir(os.path.join(self.root, "layers")):
            if os.path.exists(os.path.join(self.root, "layers", name, "layer.json")):
                out.append("sha256:" + name)
        return sorted(out)

    def diff_id_of_path(self, path):
        """The diff ID of a layer directory of this store (its diff/ directory), or None."""
        real = os.path.realpath(path)
        head, diff = os.path.split(real)
        layers, hexpart = os.path.split(head)
        if diff == "diff" and layers == os.path.realpath(os.path.join(self.root, "layers")):
            digest = "sha256:" + hexpart
            return digest if self.has_layer(digest) else None
        return None

    # -- images ------------------------------------------------------------------------------------
    def image_ids(self):
        return sorted("sha256:" + n[:-5] for n in os.listdir(os.path.join(self.root, "images"))
                      if n.endswith(".json") and len(n) == 69)

    def config_bytes(self, image_id):
        with open(os.path.join(self.root, "images", check_digest(image_id, "image ID") + ".json"), "rb") as f:
            return f.read()

    def config(self, image_id):
        return json.loads(self.config_bytes(image_id))

    def image_layers(self, image_id):
        return list(self.config(image_id).get("rootfs", {}).get("diff_ids", []))

    def repositories(self):
        try:
            with open(os.path.join(self.root, "repositories.json")) as f:
                return json.load(f)
        except FileNotFoundError:
            return {}

    def write_repositories(self, repos):
        _write_atomic(os.path.join(self.root, "repositories.json"),
                      json.dumps(dict(sorted(repos.items())), indent=1).encode() + b"\n")

    def tags_of(self, image_id, repos=None):
        repos = self.repositories() if repos is None else repos
        return sorted(ref for ref, iid in repos.items() if iid == image_id)

    def resolve(self, ref):
        """The image ID for a name[:tag], a full or short image ID ("sha256:" optional). Raises StoreError."""
        repos = self.repositories()
        if ref in repos:
            return repos[ref]
        full = normalise_ref(ref)
        if full in repos:
            return repos[full]
        hexpart = ref[len("sha256:"):] if ref.startswith("sha256:") else ref
        if len(hexpart) >= 4 and all(c in "0123456789abcdef" for c in hexpart):
            found = [i for i in self.image_ids() if i[7:].startswith(hexpart)]
            if len(found) == 1:
                return found[0]
            if len(found) > 1:
                raise StoreError(f"image ID {ref!r} is ambiguous ({len(found)} images start with it)")
        raise StoreError(f"no such image: {ref} (in store {self.root})")

    def remove_image(self, ref):
        """Untag `ref`; when the image has no tag left (or `ref` was an ID), remove it and every layer
        no other image uses. Returns (untagged refs, removed image ID or None, removed layer IDs)."""
        with self.locked():
            image_id = self.resolve(ref)
            repos = self.repositories()
            tags = self.tags_of(image_id, repos)
            by_name = ref in repos or normalise_ref(ref) in repos
            untagged = [normalise_ref(ref) if normalise_ref(ref) in repos else ref] if by_name else tags
            for t in untagged:
                repos.pop(t, None)
            if by_name and self.tags_of(image_id, repos):
                self.write_repositories(repos)
                return untagged, None, []
            self.write_repositories(repos)
            os.unlink(os.path.join(self.root, "images", image_id[7:] + ".json"))
            used = set()
            for other in self.image_ids():
                used.update(self.image_layers(other))
            removed = []
            for diff_id in self.layer_ids():
                if diff_id not in used:
                    self._remove_layer(diff_id)
                    removed.append(diff_id)
            return untagged, image_id, removed

    def _remove_layer(self, diff_id):
        """Rename out of layers/ first (atomic), then delete at leisure."""
        trash = tempfile.mkdtemp(prefix="rm-", dir=os.path.join(self.root, "tmp"))
        os.rename(self.layer_dir(diff_id), os.path.join(trash, "layer"))
        shutil.rmtree(trash, ignore_errors=True)


class Transaction:
    """New layers and images, made visible all together by `commit()`; dropped without a trace otherwise.

    Use as a context manager: leaving it by an exception removes the staging
    directory and anything this transaction had already renamed into place.
    """

    def __init__(self, store):
        self.store = store
        self.dir = tempfile.mkdtemp(prefix="txn-", dir=os.path.join(store.root, "tmp"))
        self.layers = {}  # diff_id -> staged layer directory
        self.images = []  # (config bytes, [refs])
        self.done = False
        self._count = 0

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *exc):
        shutil.rmtree(self.dir, ignore_errors=True)
        return False

    def has_layer(self, diff_id):
        return diff_id in self.layers or self.store.has_layer(diff_id)

    def add_layer(self, f, archive, expected=None, progress=None):
        """Unpack the layer tar read from `f` unless the store already has `expected`; returns its diff ID.

        Raises:
            ArchiveError: hostile, broken or mismatching archive (nothing is kept).
        """
        if expected is not None:
            check_digest(expected, "diff ID")
            if self.has_layer(expected):
                return expected
        self._count += 1
        staged = os.path.join(self.dir, f"layer{self._count}")
        os.mkdir(staged)
        os.mkdir(os.path.join(staged, "diff"))
        diff_id, size = unpack_layer(f, os.path.join(staged, "diff"), archive, expected=expected,
                                     prefix=self.store.prefix, progress=progress)
        if self.has_layer(diff_id):
            shutil.rmtree(staged)
            return diff_id
        with open(os.path.join(staged, "layer.json"), "w") as out:
            json.dump({"diff_id": diff_id, "size": size, "created": time.time()}, out)
        self.layers[diff_id] = staged
        return diff_id

    def add_image(self, config_bytes, refs=()):
        """Record an image (its config JSON, byte for byte) and the name:tags to point at it; returns its ID."""
        config = json.loads(config_bytes)
        for diff_id in config.get("rootfs", {}).get("diff_ids", []):
            if not self.has_layer(diff_id):
                raise StoreError(f"image config names layer {diff_id}, which is neither stored nor imported")
        image_id = "sha256:" + hashlib.sha256(config_bytes).hexdigest()
        self.images.append((config_bytes, [normalise_ref(r) for r in refs]))
        return image_id

    def commit(self):
        """Make every staged layer and image visible. A failure part way removes what was renamed."""
        store = self.store
        moved, written = [], []
        with store.locked():
            try:
                for diff_id, staged in self.layers.items():
                    target = store.layer_dir(diff_id)
                    if os.path.exists(target):
                        continue  # another import stored it meanwhile
                    os.rename(staged, target)
                    moved.append(target)
                repos = store.repositories()
                for config_bytes, refs in self.images:
                    hexpart = hashlib.sha256(config_bytes).hexdigest()
                    path = os.path.join(store.root, "images", hexpart + ".json")
                    if not os.path.exists(path):
                        _write_atomic(path, config_bytes)
                        written.append(path)
                    for ref in refs:
                        repos[ref] = "sha256:" + hexpart
                store.write_repositories(repos)
            except BaseException:
                for target in moved:
                    shutil.rmtree(target, ignore_errors=True)
                for path in written:
                    with contextlib.suppress(OSError):
                        os.unlink(path)
                raise
        self.done = True


__all__ = ["Store", "StoreError", "Transaction", "default_store", "normalise_ref", "check_digest", "now_rfc3339",
           "parse_time", "machine_architecture"]
