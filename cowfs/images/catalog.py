"""Images in a layer store: import (docker save, OCI layouts, bare layers), list, history, inspect, rmi, commit.

Formats read by `import_archive`:
- `docker save` archives: a tar (possibly gzip) with `manifest.json`, each
  image's config JSON (`rootfs.diff_ids`, `history`) and its layer tars
  (plain or gzip; the newer Docker layout with `blobs/sha256/` too);
- OCI image layouts, as a directory or a tar: `oci-layout`, `index.json`,
  `blobs/sha256/...`; indexes are followed to manifests (the one for this
  machine's platform when there are several), manifests to configs and layers;
- bare layer tarballs: plain, gzip, or zstd when the `zstandard` module or
  the `zstd` command is there.
Every digest the archive states is checked: the diff IDs of the config
against the uncompressed layers, and OCI blob names against their content.
"""

import datetime
import hashlib
import json
import os
import platform
import re
import sys
import tarfile
import tempfile

from cowfs.images.archive import (
    ZSTD_MAGIC,
    ArchiveError,
    HashingReader,
    HashingWriter,
    Progress,
    ProgressFile,
    human_size,
    write_layer,
)
from cowfs.images.store import StoreError, check_digest, normalise_ref
from cowfs.overlay.whiteout import TRUSTED_PREFIX

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

def _now_rfc3339():
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


def _platform_matches(desc):
    plat = desc.get("platform") or {}
    arch = {"x86_64": "amd64", "aarch64": "arm64"}.get(platform.machine(), platform.machine())
    return plat.get("os", "linux") == "linux" and plat.get("architecture", arch) == arch


class _Importer:
    def __init__(self, store, archive, name, out, err, show_progress):
        self.store, self.archive, self.name = store, archive, name
        self.out, self.err = out, err
        self.show_progress = show_progress
        self.progress = None

    def say(self, text):
        print(text, file=self.out, flush=True)

    def open_source(self):
        """(kind, source) for the archive: kind is "docker", "oci" or "layer" (source None for a bare layer)."""
        path = self.archive
        if os.path.isdir(path):
            total = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)
            self.progress = Progress(f"importing {path}", total, self.err) if self.show_progress else None
            source = _DirSource(path, self.progress)
            if source.exists("manifest.json"):
                return "docker", source
            if source.exists("index.json") and source.exists("oci-layout"):
                return "oci", source
            raise ArchiveError(path, "directory is neither an OCI image layout (oci-layout, index.json) "
                               "nor an unpacked docker save archive (manifest.json)")
        try:
            f = open(path, "rb")
        except OSError as e:
            raise ArchiveError(path, e.strerror or str(e)) from None
        total = os.fstat(f.fileno()).st_size
        self.progress = Progress(f"importing {path}", total, self.err) if self.show_progress else None
        if f.read(4) == ZSTD_MAGIC:
            f.close()
            return "layer", None
        f.seek(0)
        pf = ProgressFile(f, self.progress) if self.progress else f
        try:
            tf = tarfile.open(fileobj=pf, mode="r:*")
            source = _TarSource(tf, path, f)
        except (tarfile.TarError, EOFError, OSError) as e:
            f.close()
            if isinstance(e, tarfile.ReadError) and "empty" not in str(e) and "truncated" not in str(e) \
                    and "unexpected end" not in str(e):
                raise ArchiveError(path, "not a tar archive, an OCI image layout or a docker save archive") from None
            raise ArchiveError(path, f"truncated or corrupt archive ({e})") from None
        if source.exists("manifest.json"):
            return "docker", source
        if source.exists("index.json") and source.exists("oci-layout"):
            return "oci", source
        source.close()
        return "layer", None

    def layer(self, txn, source, member, expected, blob_digest=None):
        """Unpack one layer from `source` (unless stored already), print a line about it, return its diff ID."""
        if expected is not None and txn.has_layer(expected):
            self.say(f"{expected[7:19]}: already stored")
            return expected
        raw = HashingReader(source.open(member))
        label = f"{self.archive}:{member}" if member else self.archive
        diff_id = txn.add_layer(raw, label, expected=expected, progress=None)
        raw.drain()
        if blob_digest is not None and raw.digest != blob_digest:
            raise ArchiveError(self.archive, f"blob digest mismatch: expected {blob_digest}, got {raw.digest}", member)
        if diff_id in txn.layers:
            size = json.load(open(os.path.join(txn.layers[diff_id], "layer.json")))["size"]
            self.say(f"{diff_id[7:19]}: unpacked ({human_size(size)})")
        else:
            self.say(f"{diff_id[7:19]}: already stored")
        return diff_id

    def run(self):
        kind, source = self.open_source()
        images = []  # (config bytes, refs)
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
                        raise ArchiveError(self.archive, f"holds {len(images)} images; --name needs exactly one")
                    images = [(images[0][0], [self.name])]
                ids = [(txn.add_image(config, refs), refs) for config, refs in images]
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
        images = []
        for entry in manifest:
            try:
                config_name, layer_names = entry["Config"], list(entry["Layers"])
            except (KeyError, TypeError):
                raise ArchiveError(self.archive, "an entry lacks Config or Layers", "manifest.json") from None
            config, config_bytes = _read_json(source, config_name, self.archive)
            diff_ids = list(config.get("rootfs", {}).get("diff_ids", []))
            if len(diff_ids) != len(layer_names):
                raise ArchiveError(self.archive, f"config lists {len(diff_ids)} diff IDs for "
                                   f"{len(layer_names)} layers", config_name)
            for member, diff_id in zip(layer_names, diff_ids):
                try:
                    check_digest(diff_id, "diff ID")
                except StoreError as e:
                    raise ArchiveError(self.archive, str(e), config_name) from None
                blob = None
                m = re.match(r"^blobs/sha256/([0-9a-f]{64})$", _clean(member))
                if m:
                    blob = "sha256:" + m.group(1)
                self.layer(txn, source, member, diff_id, blob)
            images.append((config_bytes, list(entry.get("RepoTags") or [])))
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
            manifest_desc = self.pick_manifest(source, desc)
            config_bytes = self.oci_image(txn, source, manifest_desc)
            images.append((config_bytes, [ref] if ref else []))
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
        diff_ids = list(config.get("rootfs", {}).get("diff_ids", []))
        layers = manifest.get("layers", [])
        if len(diff_ids) != len(layers):
            raise ArchiveError(self.archive, f"config lists {len(diff_ids)} diff IDs for {len(layers)} layers",
                               config_name)
        for layer_desc, diff_id in zip(layers, diff_ids):
            try:
                check_digest(diff_id, "diff ID")
            except StoreError as e:
                raise ArchiveError(self.archive, str(e), config_name) from None
            media = layer_desc.get("mediaType", "")
            if "zstd" in media and not _zstd_ok():
                raise ArchiveError(self.archive, "zstd layer, and neither the zstandard module nor the zstd "
                                   "command is installed", self.blob_name(layer_desc, name))
            self.layer(txn, source, self.blob_name(layer_desc, name), diff_id, layer_desc["digest"])
        return config_bytes

    def bare(self, txn):
        f = open(self.archive, "rb")
        pf = ProgressFile(f, self.progress) if self.progress else f
        try:
            diff_id = txn.add_layer(pf, self.archive, progress=None)
        finally:
            f.close()
        if diff_id in txn.layers:
            size = json.load(open(os.path.join(txn.layers[diff_id], "layer.json")))["size"]
            self.say(f"{diff_id[7:19]}: unpacked ({human_size(size)})")
        else:
            self.say(f"{diff_id[7:19]}: already stored")
        now = _now_rfc3339()
        config = {
            "architecture": {"x86_64": "amd64", "aarch64": "arm64"}.get(platform.machine(), platform.machine()),
            "os": "linux", "created": now, "config": {},
            "rootfs": {"type": "layers", "diff_ids": [diff_id]},
            "history": [{"created": now, "created_by": f"cowfs import {os.path.basename(self.archive)}"}],
        }
        return [(json.dumps(config, sort_keys=True).encode(), [])]


def _zstd_ok():
    from cowfs.images.archive import zstd_available
    return zstd_available()


def import_archive(store, archive, name=None, out=None, err=None, progress=True):
    """Import every image of `archive` into `store`, all or nothing. Returns [(image ID, refs)].

    Raises:
        ArchiveError: hostile, broken or mismatching archive (the store is unchanged).
    """
    out = out if out is not None else sys.stdout
    err = err if err is not None else sys.stderr
    if name is not None:
        name = normalise_ref(name)
    return _Importer(store, archive, name, out, err, progress).run()


# -- what is stored ---------------------------------------------------------------------------------

def human_duration(seconds):
    """As Docker's units.HumanDuration: "Less than a second", "3 minutes", "7 weeks", ..."""
    s = int(seconds)
    if s < 1:
        return "Less than a second"
    if s == 1:
        return "1 second"
    if s < 60:
        return f"{s} seconds"
    m = s // 60
    if m == 1:
        return "About a minute"
    if m < 60:
        return f"{m} minutes"
    h = round(s / 3600)
    if h == 1:
        return "About an hour"
    if h < 48:
        return f"{h} hours"
    if h < 24 * 7 * 2:
        return f"{h // 24} days"
    if h < 24 * 30 * 2:
        return f"{h // 24 // 7} weeks"
    if h < 24 * 365 * 2:
        return f"{h // 24 // 30} months"
    return f"{h // 24 // 365} years"


def ago(created, now=None):
    t = parse_time(created)
    if t is None:
        return "N/A"
    return human_duration((now or datetime.datetime.now().timestamp()) - t) + " ago"


def table(rows, header):
    widths = [max(len(str(r[i])) for r in [header] + rows) for i in range(len(header))]
    lines = []
    for r in [header] + rows:
        lines.append("   ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip())
    return "\n".join(lines)


def image_size(store, image_id):
    return sum(store.layer_info(d)["size"] for d in store.image_layers(image_id) if store.has_layer(d))


def list_images(store):
    """Rows for `cowfs images` and the sharing summary line."""
    repos = store.repositories()
    users = {}
    for image_id in store.image_ids():
        for diff_id in set(store.image_layers(image_id)):
            users[diff_id] = users.get(diff_id, 0) + 1
    sizes = {d: store.layer_info(d)["size"] for d in store.layer_ids()}
    rows = []
    for image_id in store.image_ids():
        config = store.config(image_id)
        layers = set(store.image_layers(image_id))
        size = sum(sizes.get(d, 0) for d in layers)
        shared = sum(sizes.get(d, 0) for d in layers if users.get(d, 0) > 1)
        for ref in store.tags_of(image_id, repos) or ["<none>:<none>"]:
            repo, _, tag = ref.rpartition(":")
            rows.append((repo, tag, image_id[7:19], ago(config.get("created")), human_size(size),
                         human_size(shared), human_size(size - shared)))
    stored = sum(sizes.values())
    unshared = sum(sizes.get(d, 0) * n for d, n in users.items())
    summary = (f"{len(sizes)} layers stored once: {human_size(stored)}; the images use {human_size(unshared)} "
               f"in all, so sharing saves {human_size(unshared - stored)}")
    return rows, summary


IMAGES_HEADER = ("REPOSITORY", "TAG", "IMAGE ID", "CREATED", "SIZE", "SHARED SIZE", "UNIQUE SIZE")
HISTORY_HEADER = ("IMAGE", "CREATED", "CREATED BY", "SIZE", "COMMENT")


def history_rows(store, image_id, no_trunc=False):
    """Newest first, as `docker image history`: the image's ID on the top row, `<missing>` below it."""
    config = store.config(image_id)
    diff_ids = store.image_layers(image_id)
    entries = config.get("history") or [{"created": config.get("created"), "created_by": ""} for _ in diff_ids]
    rows = []
    layer_index = 0
    for entry in entries:
        size = 0
        if not entry.get("empty_layer"):
            if layer_index < len(diff_ids) and store.has_layer(diff_ids[layer_index]):
                size = store.layer_info(diff_ids[layer_index])["size"]
            layer_index += 1
        created_by = (entry.get("created_by") or "").replace("\n", " ").replace("\t", " ")
        if not no_trunc and len(created_by) > 45:
            created_by = created_by[:44] + "…"
        rows.append(["<missing>", ago(entry.get("created")), created_by, human_size(size), entry.get("comment", "")])
    rows.reverse()
    if rows:
        rows[0][0] = image_id if no_trunc else image_id[7:19]
    return rows


def inspect(store, image_id):
    """The image as `docker image inspect` shows it (the fields that mean something here)."""
    config = store.config(image_id)
    diff_ids = store.image_layers(image_id)
    return {
        "Id": image_id,
        "RepoTags": store.tags_of(image_id),
        "Created": config.get("created"),
        "Author": config.get("author", ""),
        "Architecture": config.get("architecture"),
        "Os": config.get("os"),
        "Config": config.get("config", {}),
        "Size": image_size(store, image_id),
        "GraphDriver": {"Name": "cowfs", "Data": {"LowerDir": lowerdir(store, image_id)}},
        "RootFS": {"Type": "layers", "Layers": diff_ids},
    }


def lowerdir(store, image_id):
    """The image's layer directories as a lowerdir= value: topmost first, colon-separated."""
    return ":".join(store.layer_path(d) for d in reversed(store.image_layers(image_id)))


# -- commit ------------------------------------------------------------------------------------------

def _parent_for(store, lowers):
    """The stored image whose layers are exactly `lowers` (store layer directories, topmost first), or None."""
    diff_ids = [store.diff_id_of_path(p) for p in lowers]
    if any(d is None for d in diff_ids):
        return None, None
    wanted = list(reversed(diff_ids))
    for image_id in store.image_ids():
        if store.image_layers(image_id) == wanted:
            return image_id, wanted
    return None, wanted


def commit(upper, lowers=(), out_path=None, store=None, tag=None, from_image=None, prefix=TRUSTED_PREFIX,
           clamp_mtime=None, message="", created_by="cowfs commit", out=None):
    """Write the upper directory as a layer tar; with `tag`, add an image (parent layers + it) to `store`.

    Returns (diff_id, image_id or None).

    Raises:
        ArchiveError: the upper cannot be archived (a redirect without lowers, unreadable files).
        StoreError: the parent image cannot be found, or the lowers are not store layers.
    """
    out = out if out is not None else sys.stdout
    if not os.path.isdir(upper):
        raise ArchiveError(upper, "not a directory")
    lowers = list(lowers)
    parent_id = None
    parent_layers = None
    if from_image is not None:
        parent_id = store.resolve(from_image)
        parent_layers = store.image_layers(parent_id)
        image_lowers = [store.layer_path(d) for d in reversed(parent_layers)]
        if lowers and [os.path.realpath(p) for p in lowers] != [os.path.realpath(p) for p in image_lowers]:
            raise StoreError(f"--lower and --from {from_image} name different layers")
        lowers = image_lowers
    elif tag is not None:
        parent_id, parent_layers = _parent_for(store, lowers)
        if parent_layers is None:
            raise StoreError("--tag needs the lowers from the store: use --from IMAGE, or --lower paths printed "
                             "by `cowfs inspect --format lowerdir IMAGE`")
    for p in lowers:
        if not os.path.isdir(p):
            raise ArchiveError(p, "lower layer is not a directory")
    tmp_tar = None
    try:
        if out_path is not None:
            target = out_path
        elif tag is not None:
            fd, tmp_tar = tempfile.mkstemp(prefix="commit-", suffix=".tar", dir=os.path.join(store.root, "tmp"))
            os.close(fd)
            target = tmp_tar
        else:
            target = None
        if target is None:
            diff_id, _ = write_layer(upper, None, lowers, prefix, clamp_mtime)
        else:
            partial = target + ".partial" if target != tmp_tar else target
            try:
                with open(partial, "wb") as f:
                    diff_id, _ = write_layer(upper, f, lowers, prefix, clamp_mtime)
                if partial != target:
                    os.rename(partial, target)
            except BaseException:
                if partial != target and os.path.exists(partial):
                    os.unlink(partial)
                raise
        print(diff_id, file=out)
        image_id = None
        if tag is not None:
            now = _now_rfc3339()
            if parent_id is not None:
                config = store.config(parent_id)
            else:
                config = {"architecture": {"x86_64": "amd64", "aarch64": "arm64"}.get(platform.machine(),
                                                                                     platform.machine()),
                          "os": "linux", "config": {}, "rootfs": {"type": "layers", "diff_ids": []},
                          "history": [{"created": now, "created_by": ""}
                                      for d in parent_layers]}
            config["created"] = now
            config["rootfs"] = {"type": "layers", "diff_ids": list(parent_layers) + [diff_id]}
            entry = {"created": now, "created_by": created_by}
            if message:
                entry["comment"] = message
            config["history"] = list(config.get("history") or []) + [entry]
            config_bytes = json.dumps(config, sort_keys=True, separators=(",", ":")).encode()
            with store.transaction() as txn:
                with open(target, "rb") as f:
                    txn.add_layer(f, target, expected=diff_id)
                image_id = txn.add_image(config_bytes, [tag])
                txn.commit()
            print(f"Tagged {normalise_ref(tag)} as {image_id}", file=out)
        return diff_id, image_id
    finally:
        if tmp_tar is not None and os.path.exists(tmp_tar):
            os.unlink(tmp_tar)


# -- containers: a thin writable layer over an image, kept in the store until removed -----------------

CONTAINERS = "containers"
CONTAINER_FILE = "container.json"


def looks_like_image(store_root, ref):
    """The image ID `ref` names in the store at `store_root`, or None (no store there, or no such image).

    A path that exists is never taken for an image: `cowfs mount DIR MNT` keeps meaning a one-layer mount.
    """
    if os.path.exists(ref) or not os.path.isdir(os.path.join(store_root, "layers")):
        return None
    from cowfs.images.store import Store
    try:
        return Store(store_root, create=False).resolve(ref)
    except (StoreError, ValueError):
        return None


def image_stack_options(store, image_id):
    """The -o strings for an image's layers (topmost first), userxattr when the store keeps user.overlay.*."""
    from cowfs.overlay.stack import _escape
    from cowfs.overlay.whiteout import USER_PREFIX
    opts = ["lowerdir=" + ":".join(_escape(store.layer_path(d)) for d in reversed(store.image_layers(image_id)))]
    if store.prefix == USER_PREFIX:
        opts.append("userxattr")
    return opts


def create_container(store, image_id, ref, mountpoint):
    """A new container layer of `image_id`: STORE/containers/ID/{upper,work,container.json}. Returns the record."""
    import secrets
    root = os.path.join(store.root, CONTAINERS)
    os.makedirs(root, exist_ok=True)
    cid = secrets.token_hex(32)
    staged = tempfile.mkdtemp(prefix="ctr-", dir=os.path.join(store.root, "tmp"))
    try:
        for sub in ("upper", "work"):
            os.mkdir(os.path.join(staged, sub), 0o755)
        record = {"Id": cid, "Image": image_id, "ImageRef": ref, "Created": _now_rfc3339(),
                  "Mountpoint": os.path.realpath(mountpoint)}
        with open(os.path.join(staged, CONTAINER_FILE), "w") as f:
            json.dump(record, f, indent=1)
        os.rename(staged, os.path.join(root, cid))
    except BaseException:
        import shutil
        shutil.rmtree(staged, ignore_errors=True)
        raise
    return dict(record, upper=os.path.join(root, cid, "upper"), work=os.path.join(root, cid, "work"))


def container_of_upper(upper):
    """(store root, container record) when `upper` is a container's upper directory, else (None, None)."""
    upper = os.path.realpath(upper)
    cdir = os.path.dirname(upper)
    if os.path.basename(upper) != "upper" or os.path.basename(os.path.dirname(cdir)) != CONTAINERS:
        return None, None
    try:
        with open(os.path.join(cdir, CONTAINER_FILE)) as f:
            record = json.load(f)
    except (OSError, ValueError):
        return None, None
    return os.path.dirname(os.path.dirname(cdir)), dict(record, upper=upper, work=os.path.join(cdir, "work"))


def list_containers(store):
    """Every container record of the store, oldest first."""
    root = os.path.join(store.root, CONTAINERS)
    found = []
    for name in sorted(os.listdir(root)) if os.path.isdir(root) else []:
        _, record = container_of_upper(os.path.join(root, name, "upper"))
        if record is not None:
            found.append(record)
    return sorted(found, key=lambda r: r.get("Created", ""))


def resolve_container(store, ref):
    """The container record for a full or unique short container ID. Raises StoreError."""
    found = [r for r in list_containers(store) if ref and r["Id"].startswith(ref)]
    if len(found) == 1:
        return found[0]
    if found:
        raise StoreError(f"container ID {ref!r} is ambiguous ({len(found)} containers start with it)")
    raise StoreError(f"no such container: {ref} (in store {store.root})")


def container_mounted_at(record):
    """The mount point of a live cowfs mount using the container's upper, or None."""
    from cowfs.daemon import mount as mounting
    from cowfs.overlay.stack import parse_options
    for rec in mounting.records():
        try:
            stack = parse_options([rec.get("options", "")])
        except Exception:  # noqa: BLE001 - a record we cannot read is not this container's
            continue
        if stack.upper and os.path.realpath(stack.upper) == os.path.realpath(record["upper"]):
            return rec.get("mountpoint")
    return None


def remove_container(store, ref):
    """Delete a container layer; refused while it is mounted. Returns its ID."""
    import shutil
    record = resolve_container(store, ref)
    mounted = container_mounted_at(record)
    if mounted:
        raise StoreError(f"container {record['Id'][:12]} is mounted at {mounted} (cowfs umount it first)")
    cdir = os.path.dirname(record["upper"])
    trash = tempfile.mkdtemp(prefix="rm-", dir=os.path.join(store.root, "tmp"))
    os.rename(cdir, os.path.join(trash, "container"))
    shutil.rmtree(trash, ignore_errors=True)
    return record["Id"]


def images_in_use(store):
    """image ID -> [container IDs] of the containers made from it."""
    used = {}
    for record in list_containers(store):
        used.setdefault(record["Image"], []).append(record["Id"])
    return used


__all__ = ["import_archive", "list_images", "history_rows", "inspect", "lowerdir", "commit", "human_duration",
           "parse_time", "IMAGES_HEADER", "HISTORY_HEADER", "table", "HashingWriter", "create_container",
           "container_of_upper", "list_containers", "resolve_container", "remove_container", "looks_like_image",
           "image_stack_options", "images_in_use"]
