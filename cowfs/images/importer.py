"""Importing images into the layer store: `docker save` archives, OCI image layouts and bare layer tarballs.

Formats read by `import_archive`:
- `docker save` archives: a tar (possibly gzip) with `manifest.json`, each
  image's config JSON (`rootfs.diff_ids`, `history`) and its layer tars
  (plain or gzip; the newer Docker layout with `blobs/sha256/` too);
- OCI image layouts, as a directory or a tar: `oci-layout`, `index.json`,
  `blobs/sha256/...`; indexes are followed to manifests (the one for this
  machine's platform when there are several), manifests to configs and layers;
- bare layer tarballs: plain, gzip, or zstd when the `zstandard` module or
  the `zstd` command is there.
ARCHIVE `-` is read from stdin, as `docker load` does; stdin, a pipe or a
FIFO is first copied to a file in the store's tmp/ (the formats need to
seek), which goes away however the import ends. A directory must be an OCI
layout or an unpacked docker save archive; image names are checked as Docker
checks them (cowfs.images.reference).
Every digest the archive states is checked: the diff IDs of the config
against the uncompressed layers, and OCI blob names against their content.
"""

import hashlib
import json
import os
import re
import stat
import sys
import tarfile

from cowfs.formatting import docker_size, plural
from cowfs.images.archive import (
    CHUNK,
    GZIP_MAGIC,
    ZSTD_MAGIC,
    ArchiveError,
    HashingReader,
    Progress,
    ProgressFile,
    zstd_available,
)
from cowfs.images.reference import BadReference, check_tag_reference
from cowfs.images.store import StoreError, check_digest, is_digest, machine_architecture, normalise_ref, now_rfc3339

INDEX_TYPES = ("application/vnd.oci.image.index.v1+json", "application/vnd.docker.distribution.manifest.list.v2+json")
MANIFEST_TYPES = ("application/vnd.oci.image.manifest.v1+json",
                  "application/vnd.docker.distribution.manifest.v2+json")
MAX_JSON = 64 << 20  # a manifest or config larger than this is not one


# -- sources: where the members of an archive come from -------------------------------------------

class _DirSource:
    """Members of an unpacked archive (an OCI layout directory); never followed out of the directory."""

    def __init__(self, root, progress):
        self.root = os.path.realpath(root)
        self.progress = progress
        self.done = 0

    def _path(self, name):
        parts = [p for p in name.split("/") if p not in ("", ".")]
        if name.startswith("/") or ".." in parts:
            raise ArchiveError(self.root, "member path leaves the archive", name)
        path = os.path.realpath(os.path.join(self.root, *parts))
        if not path.startswith(self.root + "/"):
            raise ArchiveError(self.root, "member path leaves the archive (through a symlink)", name)
        return path

    def exists(self, name):
        try:
            return os.path.isfile(self._path(name))
        except ArchiveError:
            return False

    def open(self, name):
        try:
            return _Counting(open(self._path(name), "rb"), self)
        except FileNotFoundError:
            raise ArchiveError(self.root, "missing from the archive", name) from None

    def close(self):
        pass


class _Counting:
    def __init__(self, f, source):
        self.f, self.source = f, source

    def read(self, n=-1):
        data = self.f.read(n)
        self.source.done += len(data)
        if self.source.progress:
            self.source.progress.update(self.source.done)
        return data

    def close(self):
        self.f.close()


class _TarSource:
    """Members of an archive tar, read by name; nothing of the outer tar is ever extracted to disk."""

    def __init__(self, tf, archive, fileobj):
        self.tf, self.archive, self.fileobj = tf, archive, fileobj
        self.members = {}
        for info in tf.getmembers():
            self.members.setdefault(_clean(info.name), info)

    def exists(self, name):
        info = self.members.get(_clean(name))
        return info is not None and (info.isfile() or info.issym() or info.islnk())

    def open(self, name):
        info = self.members.get(_clean(name))
        if info is None:
            raise ArchiveError(self.archive, "missing from the archive", name)
        try:
            f = self.tf.extractfile(info)
        except (KeyError, tarfile.TarError) as e:
            raise ArchiveError(self.archive, f"cannot be read ({e})", name) from None
        if f is None:
            raise ArchiveError(self.archive, "is not a file", name)
        return f

    def close(self):
        self.tf.close()
        self.fileobj.close()


def _clean(name):
    return "/".join(p for p in name.split("/") if p not in ("", "."))


def _read_json(source, name, archive, digest=None):
    f = source.open(name)
    try:
        data = f.read(MAX_JSON + 1)
    except (EOFError, tarfile.TarError, OSError) as e:
        raise ArchiveError(archive, f"truncated or corrupt archive ({e})", name) from None
    if len(data) > MAX_JSON:
        raise ArchiveError(archive, "too large for a JSON document", name)
    if digest is not None and "sha256:" + hashlib.sha256(data).hexdigest() != digest:
        raise ArchiveError(archive, f"digest mismatch: expected {digest}", name)
    try:
        return json.loads(data), data
    except ValueError as e:
        raise ArchiveError(archive, f"not valid JSON ({e})", name) from None


# -- import ------------------------------------------------------------------------------------------

def _platform_matches(desc):
    plat = desc.get("platform") or {}
    arch = machine_architecture()
    return plat.get("os", "linux") == "linux" and plat.get("architecture", arch) == arch


def _tree_bytes(root):
    """Bytes of the regular files under `root` (for progress lines); what cannot be read counts nothing."""
    total = 0
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            try:
                st = os.lstat(os.path.join(dirpath, name))
            except OSError:
                continue
            if stat.S_ISREG(st.st_mode):
                total += st.st_size
    return total


class _Importer:
    def __init__(self, store, archive, name, out, err, show_progress, quiet=False):
        self.store, self.name = store, name
        self.quiet = quiet  # only the "Loaded image" lines, as docker load -q
        self.archive = "stdin" if archive == "-" else archive  # how messages name it
        self.given = archive
        self.path = archive  # the file read: the archive, or its copy in tmp/
        self.out, self.err = out, err
        self.show_progress = show_progress
        self.progress = None

    def say(self, text):
        print(text, file=self.out, flush=True)

    def _diff_ids(self, config, layer_count, config_name):
        """The config's diff IDs, one per layer of the manifest, each a well-formed digest."""
        diff_ids = list(config.get("rootfs", {}).get("diff_ids", []))
        if len(diff_ids) != layer_count:
            raise ArchiveError(self.archive, f"config lists {plural(len(diff_ids), 'diff ID')} for "
                               f"{plural(layer_count, 'layer')}", config_name)
        for diff_id in diff_ids:
            try:
                check_digest(diff_id, "diff ID")
            except StoreError as e:
                raise ArchiveError(self.archive, str(e), config_name) from None
        return diff_ids

    def say_layer(self, text):
        """A line about one layer (stdout, as docker load's); none with quiet."""
        if not self.quiet:
            self.say(text)

    def needs_spool(self):
        """True when the archive is a stream (stdin, a pipe, a FIFO, a device): it is copied to a file first."""
        if self.given == "-":
            try:
                return not stat.S_ISREG(os.fstat(0).st_mode)
            except OSError:
                return True
        try:
            st = os.stat(self.given)
        except OSError:
            return False  # open_source says what is wrong
        return not (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode))

    def spool(self, directory):
        """Copy the stream to `directory`/archive; returns that path."""
        if self.given == "-":
            if os.isatty(0):
                raise ArchiveError(self.archive, "is a terminal: pipe an archive in (cowfs import - < IMAGE.tar)")
            src = os.fdopen(os.dup(0), "rb")
        else:
            try:
                src = open(self.given, "rb")
            except OSError as e:
                raise ArchiveError(self.archive, e.strerror or str(e)) from None
        progress = Progress(f"reading {self.archive}", None, self.err) if self.show_progress else None
        path = os.path.join(directory, "archive")
        done = 0
        with src, open(path, "wb") as out:
            for chunk in iter(lambda: src.read(CHUNK), b""):
                out.write(chunk)
                done += len(chunk)
                if progress:
                    progress.update(done)
        if progress:
            progress.finish(done)
        if done == 0:
            raise ArchiveError(self.archive, "empty: no archive was read")
        return path

    def open_source(self):
        """(kind, source) for the archive: kind is "docker", "oci" or "layer" (source None for a bare layer)."""
        path = self.path
        if self.given == "-" and path == "-":
            path = self.path = "/proc/self/fd/0"  # stdin is a regular file (cowfs import - < FILE)
        if os.path.isdir(path):
            source = _DirSource(path, None)
            if source.exists("manifest.json"):
                kind = "docker"
            elif source.exists("index.json") and source.exists("oci-layout"):
                kind = "oci"
            else:
                raise ArchiveError(path, "a directory, but neither an OCI image layout (oci-layout, index.json) "
                                   "nor an unpacked docker save archive (manifest.json)")
            if self.show_progress:
                self.progress = source.progress = Progress(f"importing {path}", _tree_bytes(path), self.err)
            return kind, source
        try:
            f = open(path, "rb")
        except OSError as e:
            raise ArchiveError(self.archive, e.strerror or str(e)) from None
        total = os.fstat(f.fileno()).st_size
        self.progress = Progress(f"importing {self.archive}", total, self.err) if self.show_progress else None
        if f.read(4) == ZSTD_MAGIC:
            f.close()
            return "layer", None
        f.seek(0)
        pf = ProgressFile(f, self.progress) if self.progress else f
        try:
            tf = tarfile.open(fileobj=pf, mode="r:*")
            source = _TarSource(tf, self.archive, f)
        except (tarfile.TarError, EOFError, OSError) as e:
            f.seek(0)
            compressed = f.read(6).startswith((GZIP_MAGIC, b"BZh", b"\xfd7zXZ"))
            f.close()
            reason = " ".join(str(e).split())
            if isinstance(e, tarfile.ReadError) and "could not be opened successfully" in reason:
                if not compressed:
                    raise ArchiveError(self.archive, "not a tar archive, an OCI image layout or a docker save "
                                       "archive") from None
                reason = "its compressed stream cannot be read"
            elif isinstance(e, tarfile.ReadError) and "empty" not in reason and "truncated" not in reason \
                    and "unexpected end" not in reason:
                raise ArchiveError(self.archive, "not a tar archive, an OCI image layout or a docker save "
                                   "archive") from None
            raise ArchiveError(self.archive, f"truncated or corrupt archive ({reason})") from None
        if source.exists("manifest.json"):
            return "docker", source
        if source.exists("index.json") and source.exists("oci-layout"):
            return "oci", source
        source.close()
        return "layer", None

    def checked_ref(self, ref, where):
        """An image name the archive gives, checked as Docker checks it."""
        try:
            return check_tag_reference(ref)
        except BadReference as e:
            raise ArchiveError(self.archive, str(e), where) from None

    def layer(self, txn, source, member, expected, blob_digest=None):
        """Unpack one layer from `source` (unless stored already), print a line about it, return its diff ID."""
        if expected is not None and txn.has_layer(expected):
            self.say_layer(f"{expected[7:19]}: already stored")
            return expected
        raw = HashingReader(source.open(member))
        label = f"{self.archive}:{member}" if member else self.archive
        diff_id = txn.add_layer(raw, label, expected=expected, progress=None)
        raw.drain()
        if blob_digest is not None and raw.digest != blob_digest:
            raise ArchiveError(self.archive, f"blob digest mismatch: expected {blob_digest}, got {raw.digest}", member)
        self.say_stored(txn, diff_id)
        return diff_id

    def say_stored(self, txn, diff_id):
        """One line about a layer just added: unpacked (with its size), or already stored."""
        if diff_id in txn.layers:
            with open(os.path.join(txn.layers[diff_id], "layer.json")) as f:
                size = json.load(f)["size"]
            self.say_layer(f"{diff_id[7:19]}: unpacked ({docker_size(size)})")
        else:
            self.say_layer(f"{diff_id[7:19]}: already stored")

    def run(self):
        spool = self.store.staging("stdin") if self.needs_spool() else None
        try:
            if spool is not None:
                self.path = self.spool(spool.path)
            return self.run_source()
        finally:
            if spool is not None:
                spool.close()

    def run_source(self):
        kind, source = self.open_source()
        images = []  # (config bytes, refs, parent image ID or None)
        try:
            with self.store.transaction() as txn:
                if kind == "docker":
                    images = self.docker(txn, source)
                elif kind == "oci":
                    images = self.oci(txn, source)
                else:
                    images = self.bare(txn)
                if self.name is not None:
                    if len(images) != 1:
                        raise ArchiveError(self.archive, f"holds {plural(len(images), 'image')}; --name needs "
                                           "exactly one")
                    images = [(images[0][0], [self.name], images[0][2])]
                ids = [(txn.add_image(config, refs, parent), refs) for config, refs, parent in _parents_first(
                    images, txn.store.has_image)]
                txn.commit()
        finally:
            if source is not None:
                source.close()
        if self.progress:
            self.progress.finish(self.progress.total or 0)
        for image_id, refs in ids:
            for ref in refs:
                self.say(f"Loaded image: {normalise_ref(ref)}")
            if not refs:
                self.say(f"Loaded image ID: {image_id}")
        return ids

    def docker(self, txn, source):
        manifest, _ = _read_json(source, "manifest.json", self.archive)
        if not isinstance(manifest, list) or not manifest:
            raise ArchiveError(self.archive, "manifest.json is not a list of images", "manifest.json")
        for entry in manifest:  # the names first: a bad one is refused before anything is unpacked
            tags = entry.get("RepoTags") or [] if isinstance(entry, dict) else []
            if not isinstance(tags, list):
                raise ArchiveError(self.archive, "RepoTags is not a list", "manifest.json")
            if self.name is None:
                for tag in tags:
                    self.checked_ref(tag, "manifest.json")
        images = []
        for entry in manifest:
            try:
                config_name, layer_names = entry["Config"], list(entry["Layers"])
            except (KeyError, TypeError):
                raise ArchiveError(self.archive, "an entry lacks Config or Layers", "manifest.json") from None
            config, config_bytes = _read_json(source, config_name, self.archive)
            diff_ids = self._diff_ids(config, len(layer_names), config_name)
            for member, diff_id in zip(layer_names, diff_ids):
                blob = None
                m = re.match(r"^blobs/sha256/([0-9a-f]{64})$", _clean(member))
                if m:
                    blob = "sha256:" + m.group(1)
                self.layer(txn, source, member, diff_id, blob)
            parent = entry.get("Parent")
            if parent is not None and not is_digest(parent):
                raise ArchiveError(self.archive, f"Parent {parent!r} is not an image ID", "manifest.json")
            images.append((config_bytes, list(entry.get("RepoTags") or []), parent))
        return images

    def oci(self, txn, source):
        layout, _ = _read_json(source, "oci-layout", self.archive)
        if not isinstance(layout, dict) or "imageLayoutVersion" not in layout:
            raise ArchiveError(self.archive, "not an OCI layout file", "oci-layout")
        index, _ = _read_json(source, "index.json", self.archive)
        images = []
        for desc in index.get("manifests", []):
            annotations = desc.get("annotations") or {}
            ref = annotations.get("io.containerd.image.name")
            tag = annotations.get("org.opencontainers.image.ref.name")
            if ref is None and tag and (":" in tag or "/" in tag):
                ref = tag
            if ref is not None and self.name is None:
                ref = self.checked_ref(ref, "index.json")
            manifest_desc = self.pick_manifest(source, desc)
            config_bytes = self.oci_image(txn, source, manifest_desc)
            images.append((config_bytes, [ref] if ref else [], None))
        if not images:
            raise ArchiveError(self.archive, "index.json lists no image", "index.json")
        return images

    def blob_name(self, desc, where):
        try:
            return "blobs/sha256/" + check_digest(desc.get("digest"), "blob digest")
        except (StoreError, AttributeError) as e:
            raise ArchiveError(self.archive, str(e), where) from None

    def pick_manifest(self, source, desc, depth=0):
        if desc.get("mediaType") in INDEX_TYPES:
            if depth > 4:
                raise ArchiveError(self.archive, "indexes nested too deep", "index.json")
            name = self.blob_name(desc, "index.json")
            nested, _ = _read_json(source, name, self.archive, desc["digest"])
            candidates = [d for d in nested.get("manifests", []) if _platform_matches(d)] or nested.get("manifests", [])
            if not candidates:
                raise ArchiveError(self.archive, "index lists no manifest", name)
            return self.pick_manifest(source, candidates[0], depth + 1)
        return desc

    def oci_image(self, txn, source, desc):
        name = self.blob_name(desc, "index.json")
        manifest, _ = _read_json(source, name, self.archive, desc["digest"])
        if manifest.get("mediaType", MANIFEST_TYPES[0]) not in MANIFEST_TYPES or "config" not in manifest:
            raise ArchiveError(self.archive, "not an image manifest", name)
        config_name = self.blob_name(manifest["config"], name)
        config, config_bytes = _read_json(source, config_name, self.archive, manifest["config"]["digest"])
        layers = manifest.get("layers", [])
        diff_ids = self._diff_ids(config, len(layers), config_name)
        for layer_desc, diff_id in zip(layers, diff_ids):
            media = layer_desc.get("mediaType", "")
            if "zstd" in media and not zstd_available():
                raise ArchiveError(self.archive, "zstd layer, and neither the zstandard module nor the zstd "
                                   "command is installed", self.blob_name(layer_desc, name))
            self.layer(txn, source, self.blob_name(layer_desc, name), diff_id, layer_desc["digest"])
        return config_bytes

    def bare(self, txn):
        f = open(self.path, "rb")
        pf = ProgressFile(f, self.progress) if self.progress else f
        try:
            diff_id = txn.add_layer(pf, self.archive, progress=None)
        finally:
            f.close()
        self.say_stored(txn, diff_id)
        now = now_rfc3339()
        config = {
            "architecture": machine_architecture(),
            "os": "linux", "created": now, "config": {},
            "rootfs": {"type": "layers", "diff_ids": [diff_id]},
            "history": [{"created": now, "created_by": f"cowfs import {os.path.basename(self.given)}"}],
        }
        return [(json.dumps(config, sort_keys=True).encode(), [], None)]


def _parents_first(images, stored):
    """`images` [(config bytes, refs, parent)] ordered so that a parent comes before its children, as docker
    load needs it there; a parent neither stored nor in the archive is dropped (docker save leaves out the
    link to a parent it did not save, so only a hand-made manifest has one)."""
    ids = ["sha256:" + hashlib.sha256(config).hexdigest() for config, _, _ in images]
    pending = [(i, (config, refs, parent if parent in ids or stored(parent) else None))
               for i, (config, refs, parent) in zip(ids, images)]
    ordered, placed = [], set()
    while pending:
        ready = [(i, image) for i, image in pending if image[2] is None or image[2] not in ids or image[2] in placed]
        if not ready:  # a cycle: no order makes them parents, so none is
            ready = [(i, (c, r, None)) for i, (c, r, _) in pending]
        ordered += [image for _, image in ready]
        placed.update(i for i, _ in ready)
        pending = [(i, image) for i, image in pending if i not in placed]
    return ordered


def import_archive(store, archive, name=None, out=None, err=None, progress=True, quiet=False):
    """Import every image of `archive` into `store`, all or nothing. Returns [(image ID, refs)].

    On `out`, a line per layer, then "Loaded image: NAME" per name (or "Loaded image ID: sha256:..."
    for an image without one); with `quiet`, only the latter, as `docker load -q`. `progress` is
    whether long reads print progress lines on `err`.

    Raises:
        ArchiveError: hostile, broken or mismatching archive (the store is unchanged).
    """
    out = out if out is not None else sys.stdout
    err = err if err is not None else sys.stderr
    if name is not None:
        name = normalise_ref(check_tag_reference(name))
    return _Importer(store, archive, name, out, err, progress, quiet).run()
