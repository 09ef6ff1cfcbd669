"""A content-addressed store of unpacked layers and the images made of them, and the config fields cowfs writes.

Layout of a store directory (as Docker's overlay2 and image store, simplified):

    layers/HEX/diff/        the layer unpacked, in the overlay's on-disk format
    layers/HEX/layer.json   {"diff_id", "size", "created", "content"}; HEX is the diff ID's hex
    layers/HEX/tar-split.gz the layer tar's bytes but its files' data (cowfs.images.archive), written by
                            `add_layer`: `cowfs save` gives the tar back from it and diff/; a layer stored
                            by an older cowfs has none (then only a canonical tar can be given back)
    images/HEX.json         an image's config JSON, byte for byte; HEX (its sha256) is the image ID
    repositories.json       {"name:tag": "sha256:IMAGE-ID"}
    parents.json            {"sha256:CHILD": "sha256:PARENT"}: what an image was committed from (Docker's
                            image parent: history and inspect show it; a parent is kept while it has children)
    store.json              {"xattr_prefix": "trusted.overlay." | "user.overlay."}
    containers/ID/          a container's upper, work and container.json (cowfs.images.containers)
    tmp/                    staging: everything new is built here, then renamed into place
    lock                    flock'ed by every change

A layer is stored once, whatever number of images use it. Its `size` counts
the data of its regular files, hard links once, as Docker sizes a layer (a
container's upper is sized as Docker sizes one, symlinks included: `tree_size`),
and its
`content` is `layer_content`'s digest of the unpacked tree, computed right
after unpacking: the diff ID is the digest of the tar, which an unpacked
directory cannot give back, so `cowfs system check` verifies the diff ID's
name, the size and this digest.

Changes happen in a `Transaction`: layers are unpacked under tmp/txn-*, and
only when all of them are complete are they renamed into layers/ and the
image and tag files written. Its commit point is one file, tmp/txn-*/COMMIT,
written (write-and-rename) with the whole plan before the first rename: a
transaction without it is dropped, one with it is completed. So whatever
stops an import, the store is as it was before or as after it, never in
between.

Every entry of tmp/ belongs to the process that made it, which holds an
flock on it as long as it lives (`Staging`); entries are made under the store
lock. A process stopped without cleaning up (SIGKILL, a crash, a power cut)
leaves its entry unlocked: the next command that opens the store (`heal`)
removes it, or completes it when it is a transaction past its commit point,
and never touches an entry whose process is alive (a concurrent import).
"""

import contextlib
import datetime
import errno
import fcntl
import hashlib
import itertools
import json
import os
import platform
import re
import shutil
import stat
import tempfile
import time

from cowfs.errors import CowfsError
from cowfs.images import interrupts
from cowfs.images.archive import SPLIT_FILE, unpack_layer
from cowfs.images.reference import check_tag_reference, normalise_ref
from cowfs.overlay.usage import tree_size
from cowfs.overlay.whiteout import PREFIXES, TRUSTED_PREFIX, USER_PREFIX

IMAGE_FILE = re.compile(r"[0-9a-f]{64}\.json")
HEX64 = re.compile(r"[0-9a-f]{64}")
COMMIT_FILE = "COMMIT"
PARENTS_FILE = "parents.json"


class StoreError(CowfsError):
    """A store operation cowfs refuses; str() is the one-line message to show."""


class StoreDamaged(StoreError):
    """The store holds something cowfs did not write (a truncated file, a missing layer): one line naming it."""

    def __init__(self, root, what, problem):
        self.root, self.what, self.problem = root, what, problem
        super().__init__(f"store {root}: {what}: {problem} (run cowfs system check)")


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
    if algo != "sha256" or not HEX64.fullmatch(hexpart):
        raise StoreError(f"bad {what} {digest!r} (expected sha256:<64 hex digits>)")
    return hexpart


def is_digest(value):
    return isinstance(value, str) and value.startswith("sha256:") and HEX64.fullmatch(value[7:]) is not None


# -- the fields of an image config that cowfs writes and reads --------------------------------------

def now_rfc3339():
    """The time now as image configs and container records spell it: RFC 3339 in UTC, microseconds."""
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_time(text):
    """An RFC 3339 time as Docker writes it (up to nanoseconds, "Z" or an offset) -> seconds, or None."""
    if not text or not isinstance(text, str):
        return None
    m = re.match(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(\.\d+)?(Z|[+-]\d\d:\d\d)?$", text)
    if not m:
        return None
    base, frac, zone = m.groups()
    try:
        dt = datetime.datetime.fromisoformat(base + ((frac or ".") + "000000")[:7]
                                             + ("+00:00" if zone in (None, "Z") else zone))
    except ValueError:
        return None
    return dt.timestamp()


def machine_architecture():
    """This machine's architecture as OCI names it ("amd64", "arm64", ...)."""
    return {"x86_64": "amd64", "aarch64": "arm64"}.get(platform.machine(), platform.machine())


# -- what a layer directory holds ------------------------------------------------------------------------

def _kept_xattr(name):
    """The xattrs a layer's content digest covers: all but security.* (relabelled by the system) and the
    overlay's own other than opaque (a kernel overlay may add origin, impure, ... to what it mounts)."""
    if name.startswith("security."):
        return False
    for prefix in PREFIXES:
        if name.startswith(prefix):
            return name[len(prefix):] == "opaque"
    return True


def layer_content(root, hashes=None, whiteout_times=False):
    """(content digest, size) of an unpacked layer directory.

    The digest is the sha256 of one record per object, in sorted path order:
    path, type, permission bits, owner, group, mtime (seconds; not the root's,
    nor a whiteout's: unpacked, Docker's overlay2 gives a whiteout the time it
    makes it, so its time is not the layer's), and the sha256 of a file's
    data, a symlink's target or a device's number, and the xattrs
    `_kept_xattr` keeps. The size counts regular files' data, once per inode,
    as the unpack recorded it and as Docker sizes a layer (the sizes in its
    tar headers: symlinks and hard links add nothing).

    `hashes` ({path (bytes): sha256 hex}) gives the data digests of files just
    written, as the unpack took them: those are not read again.
    `whiteout_times` covers whiteouts' times too: the digest as layers
    imported by earlier cowfs recorded it.
    """
    hashes = hashes or {}
    digest = hashlib.sha256()
    size = 0
    inodes = {}
    stack = [b""]
    broot = os.fsencode(root)
    while stack:
        rel = stack.pop()
        path = os.path.join(broot, rel) if rel else broot
        st = os.lstat(path)
        kind = stat.S_IFMT(st.st_mode)
        if stat.S_ISREG(kind):
            key = (st.st_dev, st.st_ino)
            if key not in inodes:
                if rel in hashes:
                    inodes[key] = hashes[rel]
                else:
                    h = hashlib.sha256()
                    with open(path, "rb") as f:
                        for chunk in iter(lambda: f.read(1 << 20), b""):
                            h.update(chunk)
                    inodes[key] = h.hexdigest()
                size += st.st_size
            data = inodes[key]
        elif stat.S_ISLNK(kind):
            data = hashlib.sha256(os.readlink(path)).hexdigest()
        elif stat.S_ISCHR(kind) or stat.S_ISBLK(kind):
            data = f"{os.major(st.st_rdev)},{os.minor(st.st_rdev)}"
        else:
            data = ""
        xattrs = []
        try:
            names = os.listxattr(path, follow_symlinks=False)
        except OSError as e:
            if e.errno not in (errno.ENOTSUP, errno.EPERM):
                raise
            names = []
        for name in sorted(n for n in names if _kept_xattr(n)):
            try:
                value = os.getxattr(path, name, follow_symlinks=False)
            except OSError as e:
                if e.errno in (errno.ENODATA, errno.ENOTSUP, errno.EPERM):
                    continue
                raise
            xattrs.append(f"{name}={value.hex()}")
        whiteout = stat.S_ISCHR(kind) and st.st_rdev == 0
        mtime = int(st.st_mtime) if rel and (whiteout_times or not whiteout) else 0
        record = [rel.hex(), f"{kind:o}", f"{stat.S_IMODE(st.st_mode):o}", str(st.st_uid), str(st.st_gid),
                  str(mtime), data, ",".join(xattrs)]
        digest.update(("\0".join(record) + "\n").encode())
        if stat.S_ISDIR(kind):
            names = sorted(os.listdir(path), reverse=True)  # popped in sorted order
            stack.extend((rel + b"/" + n) if rel else n for n in names)
    return "sha256:" + digest.hexdigest(), size


# -- staging: entries of tmp/ owned by a live process -----------------------------------------------------

_held_locks = {}  # store lock file -> [fd, depth]: the store lock is re-entrant within a process


def _owner_gone(path):
    """True when nothing holds the flock of tmp/ entry `path` (its process is gone); False when one does, or
    when it cannot be told (an entry we may not open is left alone)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK)
    except FileNotFoundError:
        return False
    except OSError as e:
        return e.errno == errno.ELOOP  # a symlink: nothing of ours, and nothing holds it
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    except OSError:
        return False
    finally:
        os.close(fd)
    return True


def _remove(path):
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


class Staging:
    """A directory tmp/KIND-PID-XXXX of this process, flock'ed while it lives; `close()` removes it."""

    def __init__(self, store, kind):
        self.path = None
        self._fd = None
        with store.locked():  # made and locked under the store lock: `heal` never sees it unowned
            self.path = tempfile.mkdtemp(prefix=f"{kind}-{os.getpid()}-", dir=os.path.join(store.root, "tmp"))
            try:
                self._fd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
                fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BaseException:
                self.close()
                raise

    def close(self):
        if self.path is not None:
            shutil.rmtree(self.path, ignore_errors=True)
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False


class Store:
    """A layer store at `root`. `create` makes it (else it must exist); `heal` removes or completes what
    interrupted commands left in tmp/; `strict=False` opens one with a damaged store.json (for check)."""

    def __init__(self, root, create=True, heal=True, strict=True):
        self.root = os.path.abspath(root)
        self._configs = {}
        self.problem = None  # with strict=False: what is wrong with store.json
        if create:
            for sub in ("layers", "images", "tmp"):
                os.makedirs(os.path.join(self.root, sub), exist_ok=True)
        elif not os.path.isdir(os.path.join(self.root, "layers")):
            raise StoreError(f"{self.root}: not a cowfs store")
        try:
            meta = self.load_json("store.json")
        except FileNotFoundError:
            meta = None
        except StoreDamaged as e:
            if strict:
                raise
            meta, self.problem = None, e.problem
        if meta is not None:
            prefix = meta.get("xattr_prefix") if isinstance(meta, dict) else None
            if prefix not in PREFIXES:
                problem = ("no xattr_prefix" if not isinstance(meta, dict) or "xattr_prefix" not in meta
                           else f"xattr_prefix {prefix!r} is neither {TRUSTED_PREFIX!r} nor {USER_PREFIX!r}")
                if strict:
                    raise StoreDamaged(self.root, "store.json", problem)
                self.problem = problem
                meta = None
        if meta is not None:
            self.prefix = meta["xattr_prefix"]
        else:
            self.prefix = TRUSTED_PREFIX if os.geteuid() == 0 else USER_PREFIX
            if create and self.problem is None:
                with self.locked(heal=False):
                    if not os.path.exists(os.path.join(self.root, "store.json")):
                        self.write_file("store.json", json.dumps({"xattr_prefix": self.prefix}).encode())
        if heal:
            self.heal()

    # -- reading what the store holds, checked ----------------------------------------------------------
    def damaged(self, what, problem):
        return StoreDamaged(self.root, what, problem)

    def load_json(self, rel):
        """The JSON document in file `rel` of the store; FileNotFoundError when missing, StoreDamaged when
        it is not JSON."""
        with open(os.path.join(self.root, rel), "rb") as f:
            data = f.read()
        try:
            return json.loads(data)
        except ValueError:
            raise self.damaged(rel, "not valid JSON" if data else "empty") from None

    # -- locking and staging ----------------------------------------------------------------------
    @contextlib.contextmanager
    def locked(self, heal=True):
        """The store lock (re-entrant within this process); taking it first heals tmp/ (see `heal`)."""
        path = os.path.join(self.root, "lock")
        held = _held_locks.get(path)
        if held is not None:
            held[1] += 1
            try:
                yield
            finally:
                held[1] -= 1
            return
        fd = os.open(path, os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC, 0o644)  # read-only: whoever made it, it serves
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            _held_locks[path] = [fd, 1]
            try:
                if heal:
                    self._heal_locked()
                yield
            finally:
                del _held_locks[path]
                fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)

    def transaction(self):
        return Transaction(self)

    def staging(self, kind):
        """A Staging directory in tmp/ (a context manager)."""
        return Staging(self, kind)

    def write_file(self, rel, data):
        """Write `data` to file `rel` of the store atomically (a file in tmp/, fsync'ed, renamed into place).
        Call it under the store lock: an unlocked file in tmp/ is taken for a leftover."""
        fd, tmp = tempfile.mkstemp(prefix=f".w-{os.getpid()}-", dir=os.path.join(self.root, "tmp"))
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, 0o644)
            os.rename(tmp, os.path.join(self.root, rel))
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise

    def _tmp_entries(self):
        """[(name, path)] of the entries of tmp/, by name ([] without tmp/)."""
        tmp = os.path.join(self.root, "tmp")
        try:
            return [(name, os.path.join(tmp, name)) for name in sorted(os.listdir(tmp))]
        except FileNotFoundError:
            return []

    def leftovers(self):
        """[(name, owner alive, bytes)] of the entries of tmp/."""
        return [(name, not _owner_gone(path), tree_size(path)) for name, path in self._tmp_entries()]

    def heal(self):
        """Remove what interrupted commands left in tmp/ (completing a transaction past its commit point);
        an entry whose process lives is left alone. Returns [(name, bytes, "removed" | "completed")].
        Nothing is done (nor locked) when tmp/ is empty, or when the store is not ours to write."""
        try:
            if not os.listdir(os.path.join(self.root, "tmp")):
                return []
            with self.locked(heal=False):
                return self._heal_locked()
        except (FileNotFoundError, PermissionError):
            return []
        except OSError as e:
            if e.errno == errno.EROFS:
                return []
            raise

    def _heal_locked(self):
        done = []
        for name, path in self._tmp_entries():
            if not _owner_gone(path):
                continue
            size = tree_size(path)
            how = "removed"
            if os.path.isfile(os.path.join(path, COMMIT_FILE)) and not os.path.islink(path):
                with interrupts.deferred():
                    self._apply(path, self._plan(path))
                how = "completed"
            _remove(path)
            done.append((name, size, how))
        return done

    def _plan(self, txn_dir):
        try:
            with open(os.path.join(txn_dir, COMMIT_FILE), "rb") as f:
                return json.loads(f.read())
        except ValueError:
            raise self.damaged(f"tmp/{os.path.basename(txn_dir)}/{COMMIT_FILE}", "not valid JSON") from None

    def _apply(self, txn_dir, plan, done=None):
        """Make the layers and images of a transaction's plan visible (idempotent: what is there stays)."""
        done = done if done is not None else []
        for diff_id, name in plan["layers"]:
            target = self.layer_dir(diff_id)
            staged = os.path.join(txn_dir, name)
            if os.path.exists(target) or not os.path.isdir(staged):
                continue  # stored meanwhile by another import, or moved before an interruption
            os.rename(staged, target)
            done.append(("layer", target, staged))
        for image in plan["images"]:
            rel = os.path.join("images", check_digest(image["id"], "image ID") + ".json")
            if not os.path.exists(os.path.join(self.root, rel)):
                with open(os.path.join(txn_dir, image["config"]), "rb") as f:
                    self.write_file(rel, f.read())
                done.append(("image", os.path.join(self.root, rel), None))
        for rel, name in plan.get("files", []):
            staged = os.path.join(txn_dir, name)
            if os.path.isfile(staged) and "/" not in rel and not rel.startswith("."):
                with open(staged, "rb") as f:
                    self.write_file(rel, f.read())
        links = {image["id"]: image["parent"] for image in plan["images"] if image.get("parent")}
        if links:
            parents = self.parents()
            if any(parents.get(c) != p for c, p in links.items()):
                parents.update(links)
                self.write_parents(parents)
        refs = {ref: image["id"] for image in plan["images"] for ref in image["refs"]}
        if refs:
            repos = self.repositories()
            if any(repos.get(ref) != image_id for ref, image_id in refs.items()):
                repos.update(refs)
                self.write_repositories(repos)
        return done

    # -- layers ------------------------------------------------------------------------------------
    def layer_dir(self, diff_id):
        return os.path.join(self.root, "layers", check_digest(diff_id, "diff ID"))

    def layer_path(self, diff_id):
        """The unpacked layer's directory, as a lowerdir."""
        return os.path.join(self.layer_dir(diff_id), "diff")

    def has_layer(self, diff_id):
        return os.path.exists(os.path.join(self.layer_dir(diff_id), "layer.json"))

    def layer_info(self, diff_id, used_by=None):
        """layer.json of a stored layer, checked. StoreDamaged when missing (`used_by`: the image needing it)
        or not as cowfs writes it."""
        what = f"layer {check_digest(diff_id, 'diff ID')[:12]}"
        try:
            info = self.load_json(os.path.join("layers", diff_id[7:], "layer.json"))
        except FileNotFoundError:
            used = f", and image {used_by[7:19]} uses it" if used_by else ""
            gone = "missing" if not os.path.isdir(self.layer_dir(diff_id)) else "layer.json is missing"
            raise self.damaged(what, gone + used) from None
        except StoreDamaged as e:
            raise self.damaged(what, f"layer.json: {e.problem}") from None
        if not isinstance(info, dict) or info.get("diff_id") != diff_id:
            raise self.damaged(what, "layer.json names another diff ID")
        if not isinstance(info.get("size"), int) or isinstance(info.get("size"), bool) or info["size"] < 0:
            raise self.damaged(what, "layer.json has no size")
        return info

    def layer_ids(self):
        out = []
        try:
            names = os.listdir(os.path.join(self.root, "layers"))
        except FileNotFoundError:
            raise self.damaged("layers", "missing") from None
        for name in names:
            if HEX64.fullmatch(name) and os.path.exists(os.path.join(self.root, "layers", name, "layer.json")):
                out.append("sha256:" + name)
        return sorted(out)

    def diff_id_of_path(self, path):
        """The diff ID of a layer directory of this store (its diff/ directory), or None."""
        real = os.path.realpath(path)
        head, diff = os.path.split(real)
        layers, hexpart = os.path.split(head)
        if diff == "diff" and layers == os.path.realpath(os.path.join(self.root, "layers")) \
                and HEX64.fullmatch(hexpart):
            digest = "sha256:" + hexpart
            return digest if self.has_layer(digest) else None
        return None

    # -- images ------------------------------------------------------------------------------------
    def image_ids(self):
        try:
            names = os.listdir(os.path.join(self.root, "images"))
        except FileNotFoundError:
            raise self.damaged("images", "missing") from None
        return sorted("sha256:" + n[:-5] for n in names if IMAGE_FILE.fullmatch(n))

    def has_image(self, image_id):
        return is_digest(image_id) and os.path.exists(os.path.join(self.root, "images", image_id[7:] + ".json"))

    def config_bytes(self, image_id):
        rel = os.path.join("images", check_digest(image_id, "image ID") + ".json")
        try:
            with open(os.path.join(self.root, rel), "rb") as f:
                data = f.read()
        except FileNotFoundError:
            raise self.damaged(rel, "missing") from None
        if hashlib.sha256(data).hexdigest() != image_id[7:]:
            raise self.damaged(rel, "truncated or changed (its sha256 is not the image ID)")
        return data

    def config(self, image_id):
        """An image's config, checked: the file's sha256 is the image ID, it is JSON, its diff IDs are digests."""
        if image_id in self._configs:
            return self._configs[image_id]
        data = self.config_bytes(image_id)
        rel = f"images/{image_id[7:]}.json"
        try:
            config = json.loads(data)
        except ValueError:
            raise self.damaged(rel, "not valid JSON") from None
        if not isinstance(config, dict):
            raise self.damaged(rel, "not an image config (a JSON object)")
        rootfs = config.get("rootfs", {})
        diff_ids = rootfs.get("diff_ids", []) if isinstance(rootfs, dict) else None
        if not isinstance(diff_ids, list) or not all(is_digest(d) for d in diff_ids):
            raise self.damaged(rel, "rootfs.diff_ids is not a list of sha256 digests")
        self._configs[image_id] = config
        return config

    def image_layers(self, image_id):
        return list(self.config(image_id).get("rootfs", {}).get("diff_ids", []))

    def repositories(self):
        try:
            repos = self.load_json("repositories.json")
        except FileNotFoundError:
            return {}
        if not isinstance(repos, dict):
            raise self.damaged("repositories.json", "not a map of NAME:TAG to image IDs")
        for ref, image_id in repos.items():
            if not is_digest(image_id):
                raise self.damaged("repositories.json", f"{ref} names {image_id!r}, which is not an image ID")
        return repos

    def write_repositories(self, repos):
        self.write_file("repositories.json", json.dumps(dict(sorted(repos.items())), indent=1).encode() + b"\n")

    def parents(self):
        """{child image ID: parent image ID}, as Docker records a committed (or loaded) image's parent."""
        try:
            parents = self.load_json(PARENTS_FILE)
        except FileNotFoundError:
            return {}
        if not isinstance(parents, dict) or not all(is_digest(k) and is_digest(v) for k, v in parents.items()):
            raise self.damaged(PARENTS_FILE, "not a map of image IDs to image IDs")
        return parents

    def write_parents(self, parents):
        self.write_file(PARENTS_FILE, json.dumps(dict(sorted(parents.items())), indent=1).encode() + b"\n")

    def parent(self, image_id, parents=None):
        """The stored image `image_id` was made from, or None (`parents`: parents() already read)."""
        found = (self.parents() if parents is None else parents).get(image_id)
        return found if found is not None and self.has_image(found) else None

    def children(self, image_id, parents=None):
        parents = self.parents() if parents is None else parents
        return sorted(c for c, p in parents.items() if p == image_id and self.has_image(c))

    def valid_parent(self, image_id, parent_id, configs=None):
        """Whether `parent_id` can be `image_id`'s parent, as docker load decides: its layers and history
        are the start of the child's (and shorter). `configs` maps IDs not stored yet to their configs."""
        configs = configs or {}
        child = configs.get(image_id) or self.config(image_id)
        parent = configs.get(parent_id) or self.config(parent_id)
        c_hist, p_hist = child.get("history") or [], parent.get("history") or []
        if c_hist or p_hist:
            if len(p_hist) >= len(c_hist) or c_hist[:len(p_hist)] != p_hist:
                return False
        c_layers = child.get("rootfs", {}).get("diff_ids", [])
        p_layers = parent.get("rootfs", {}).get("diff_ids", [])
        return len(p_layers) <= len(c_layers) and c_layers[:len(p_layers)] == p_layers

    def tags_of(self, image_id, repos=None):
        repos = self.repositories() if repos is None else repos
        return sorted(ref for ref, iid in repos.items() if iid == image_id)

    def resolve(self, ref):
        """The image ID for a name[:tag], a full or short image ID ("sha256:" optional). Raises StoreError."""
        repos = self.repositories()
        found = repos.get(ref) or repos.get(normalise_ref(ref))
        if found is not None:
            if not self.has_image(found):
                name = ref if ref in repos else normalise_ref(ref)
                raise self.damaged("repositories.json", f"{name} names image {found[7:19]}, which is not stored")
            return found
        hexpart = ref[len("sha256:"):] if ref.startswith("sha256:") else ref
        if len(hexpart) >= 4 and all(c in "0123456789abcdef" for c in hexpart):
            found = [i for i in self.image_ids() if i[7:].startswith(hexpart)]
            if len(found) == 1:
                return found[0]
            if len(found) > 1:
                raise StoreError(f"image ID {ref!r} is ambiguous ({len(found)} images start with it)")
        raise StoreError(f"no such image: {ref} (in store {self.root})")

    def tag(self, source, target):
        """Name image `source` (a name[:tag], a full or unique short image ID) `target` too, as docker tag:
        a tag already naming another image moves. Returns (image ID, the normalised target).

        Raises:
            BadReference: `target` is no valid NAME[:TAG].
            StoreError: no such image, or an ambiguous ID prefix.
        """
        target = normalise_ref(check_tag_reference(target))
        with interrupts.deferred(), self.locked():
            image_id = self.resolve(source)
            repos = self.repositories()
            if repos.get(target) != image_id:
                repos[target] = image_id
                self.write_repositories(repos)
                interrupts.changed()
        return image_id, target

    def remove_image(self, ref, keep=()):
        """Untag `ref`; when the image has no tag left (or `ref` was an ID), remove it, then its parents that
        are left untagged with no other child (unless in `keep`: images containers use), and every layer no
        remaining image uses, as docker rmi does. An image with children stays (untagged) when its last tag
        goes, and is refused by ID. Returns (untagged refs, [removed image IDs], [removed layer IDs])."""
        trash = None
        try:
            with interrupts.deferred(), self.locked():
                image_id = self.resolve(ref)
                repos = self.repositories()
                parents = self.parents()
                tags = self.tags_of(image_id, repos)
                by_name = ref in repos or normalise_ref(ref) in repos
                if not by_name and self.children(image_id, parents):
                    raise StoreError(f"conflict: unable to delete {image_id[7:19]} - image has dependent child "
                                     "images")
                untagged = [normalise_ref(ref) if normalise_ref(ref) in repos else ref] if by_name else tags
                for t in untagged:
                    repos.pop(t, None)
                if by_name and (self.tags_of(image_id, repos) or self.children(image_id, parents)):
                    self.write_repositories(repos)
                    interrupts.changed()
                    return untagged, [], []
                removed_images = [image_id]
                up = parents.get(image_id)
                while (up is not None and self.has_image(up) and up not in keep and not self.tags_of(up, repos)
                       and self.children(up, parents) == [removed_images[-1]]):
                    removed_images.append(up)
                    up = parents.get(up)
                used = set()
                for other in self.image_ids():
                    if other not in removed_images:
                        used.update(self.image_layers(other))
                removed = [d for d in self.layer_ids() if d not in used]
                trash = Staging(self, "rm")
                self.write_repositories(repos)
                self.forget_parents(parents, removed_images)
                for gone in removed_images:
                    os.unlink(os.path.join(self.root, "images", gone[7:] + ".json"))
                    self._configs.pop(gone, None)
                for diff_id in removed:  # renamed out of layers/ now (atomic), deleted below at leisure
                    os.rename(self.layer_dir(diff_id), os.path.join(trash.path, diff_id[7:]))
                interrupts.changed()
        finally:
            if trash is not None:
                trash.close()
        return untagged, removed_images, removed

    def forget_parents(self, parents, image_ids):
        """Drop the parent records of removed images (under the lock)."""
        kept = {c: p for c, p in parents.items() if c not in image_ids}
        if kept != parents:
            self.write_parents(kept)


class Transaction:
    """New layers and images, made visible all together by `commit()`; dropped without a trace otherwise.

    Use as a context manager: leaving it by an exception (or a signal) removes
    the staging directory. See the module docstring for its commit point.
    """

    def __init__(self, store):
        self.store = store
        self._staging = Staging(store, "txn")
        self.dir = self._staging.path
        self.layers = {}  # diff_id -> staged layer directory
        self.images = []  # (image ID, staged config file name, [refs], parent image ID or None)
        self.configs = {}  # image ID -> parsed config, of the images added
        self.files = []  # (store file, staged file name): written with the rest (`add_file`)
        self.done = False
        self._count = itertools.count(1)  # staged layer names; add_layer may run in several threads (pull)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *exc):
        self._staging.close()
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
        staged = os.path.join(self.dir, f"layer{next(self._count)}")
        os.mkdir(staged)
        os.mkdir(os.path.join(staged, "diff"))
        hashes = {}
        diff_id, size = unpack_layer(f, os.path.join(staged, "diff"), archive, expected=expected,
                                     prefix=self.store.prefix, progress=progress,
                                     split=os.path.join(staged, SPLIT_FILE), hashes=hashes)
        if self.has_layer(diff_id):
            shutil.rmtree(staged)
            return diff_id
        content, _ = layer_content(os.path.join(staged, "diff"), hashes)
        with open(os.path.join(staged, "layer.json"), "w") as out:
            json.dump({"diff_id": diff_id, "size": size, "created": time.time(), "content": content}, out)
        self.layers.setdefault(diff_id, staged)
        return diff_id

    def add_image(self, config_bytes, refs=(), parent=None):
        """Record an image (its config JSON, byte for byte), the name:tags to point at it, and the image it
        was made from (`parent`, stored or added before it); returns its ID.

        Raises:
            BadReference: a ref that Docker would refuse.
            StoreError: the config is not JSON, or names a layer neither stored nor added.
        """
        refs = [normalise_ref(check_tag_reference(r)) for r in refs]
        try:
            config = json.loads(config_bytes)
        except ValueError:
            raise StoreError("image config is not valid JSON") from None
        rootfs = config.get("rootfs", {}) if isinstance(config, dict) else None
        diff_ids = rootfs.get("diff_ids", []) if isinstance(rootfs, dict) else None
        if not isinstance(diff_ids, list) or not all(is_digest(d) for d in diff_ids):
            raise StoreError("image config: rootfs.diff_ids is not a list of sha256 digests")
        for diff_id in diff_ids:
            if not self.has_layer(diff_id):
                raise StoreError(f"image config names layer {diff_id}, which is neither stored nor imported")
        image_id = "sha256:" + hashlib.sha256(config_bytes).hexdigest()
        name = f"image{len(self.images) + 1}.json"
        with open(os.path.join(self.dir, name), "wb") as f:
            f.write(config_bytes)
        if parent is not None:
            if parent not in self.configs and not self.store.has_image(parent):
                raise StoreError(f"parent image {parent} is neither stored nor imported")
            if not self.store.valid_parent(image_id, parent, dict(self.configs, **{image_id: config})):
                raise StoreError(f"image {parent[7:19]} is not a valid parent for {image_id[7:19]} (its layers "
                                 "and history are not the start of the image's)")
        self.images.append((image_id, name, refs, parent))
        self.configs[image_id] = config
        return image_id

    def add_file(self, rel, data):
        """Write `data` to the store's file `rel` (a top-level JSON file: distribution.json) when, and only when,
        the transaction commits."""
        name = f"file{len(self.files) + 1}"
        with open(os.path.join(self.dir, name), "wb") as f:
            f.write(data)
        self.files.append((rel, name))

    def commit(self):
        """Make every staged layer and image visible, or (on an error) nothing. A signal waits until it is done;
        after SIGKILL, the next command that opens the store completes it (see the module docstring)."""
        store = self.store
        plan = {"layers": [[d, os.path.basename(p)] for d, p in self.layers.items()],
                "images": [{"id": i, "config": name, "refs": refs, "parent": parent}
                           for i, name, refs, parent in self.images],
                "files": [[rel, name] for rel, name in self.files]}
        marker = os.path.join(self.dir, COMMIT_FILE)
        with interrupts.deferred(), store.locked():
            with open(marker + ".new", "wb") as f:
                f.write(json.dumps(plan).encode())
                f.flush()
                os.fsync(f.fileno())
            os.rename(marker + ".new", marker)  # the commit point
            done = []
            try:
                store._apply(self.dir, plan, done)
            except BaseException:
                os.unlink(marker)
                for kind, path, staged in reversed(done):
                    with contextlib.suppress(OSError):
                        if kind == "layer":
                            os.rename(path, staged)
                        else:
                            os.unlink(path)
                raise
            interrupts.changed()
        self.done = True


__all__ = ["Staging", "Store", "StoreDamaged", "StoreError", "Transaction", "check_digest",
           "default_store", "is_digest", "layer_content", "machine_architecture", "normalise_ref", "now_rfc3339",
           "parse_time"]
