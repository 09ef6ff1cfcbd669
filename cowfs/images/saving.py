"""Images and containers out of the store: `cowfs save` (a docker save archive) and `cowfs export` (a rootfs tar).

`save_images` writes what `docker save` (25 and later) writes, which `docker
load` of any version and `cowfs import` read:

    manifest.json            [{"Config": "blobs/sha256/C", "RepoTags": [...], "Layers": ["blobs/sha256/L", ...],
                               "Parent": "sha256:P" when the image's parent is saved too}]
    repositories             {"name": {"tag": "L of the top layer"}} for older loaders
    blobs/sha256/C           the image config, byte for byte (C is the image ID's hex)
    blobs/sha256/L           each layer tar, uncompressed (L is its diff ID's hex)
    blobs/sha256/M           an OCI image manifest per image
    index.json, oci-layout   the OCI image layout over the same blobs

The store keeps a layer unpacked, not its tar: an imported layer's tar is
rebuilt byte for byte from its tar-split (the tar's bytes but its files'
data, recorded when the layer was stored: `write_split_layer`) and the files
of its tree. A layer with none (stored by an older cowfs) or whose tar-split
cannot be read is written back with `write_layer` (entries sorted, numeric
owners, pax headers only where needed), which gives the original bytes only
when the original tar was in that canonical form (a layer `cowfs commit`
made, for one). A layer that does not give back its diff ID (no usable
tar-split and a tar in another form, or a tree changed since) is refused,
with one line naming it: its image's config (and so its ID) names the
original, and an archive whose layers do not match their diff IDs is one
`docker load` refuses. Every layer is written and checked before anything
goes to the output; a file output is written next to FILE and renamed into
place, so a refused or interrupted save leaves no FILE.

`export_container` writes a container's merged view (its image's layers with
its upper on top, whiteouts and opaque directories applied) as one tar, as
`docker export`: walked with the engine's lookup over the layers, read-only,
without mounting.
"""

import contextlib
import hashlib
import json
import os
import stat
import tarfile
import tempfile

from cowfs.images.archive import SPLIT_FILE, SplitCorrupt, SplitMismatch, _Writer, write_layer, write_split_layer
from cowfs.images.containers import resolve_container
from cowfs.images.store import StoreError, normalise_ref
from cowfs.overlay import override
from cowfs.overlay.whiteout import USER_PREFIX

MANIFEST_MEDIA = "application/vnd.oci.image.manifest.v1+json"
CONFIG_MEDIA = "application/vnd.oci.image.config.v1+json"
LAYER_MEDIA = "application/vnd.oci.image.layer.v1.tar"


def _blob(hexpart):
    return f"blobs/sha256/{hexpart}"


def _add_bytes(tf, name, data):
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = len(data), 0o644, 0
    info.uname = info.gname = ""
    tf.addfile(info, _BytesReader(data))


class _BytesReader:
    def __init__(self, data):
        self.data, self.pos = data, 0

    def read(self, n=-1):
        end = len(self.data) if n is None or n < 0 else self.pos + n
        chunk = self.data[self.pos:end]
        self.pos += len(chunk)
        return chunk


def _add_dir(tf, name):
    info = tarfile.TarInfo(name)
    info.type, info.mode, info.mtime = tarfile.DIRTYPE, 0o755, 0
    info.uname = info.gname = ""
    tf.addfile(info)


def _plan(store, refs):
    """[(image ID, [RepoTags])] in the order given, each image once; the tags are those the refs named (an ID
    alone names none, as docker save does)."""
    repos = store.repositories()
    images = {}
    for ref in refs:
        image_id = store.resolve(ref)
        tags = images.setdefault(image_id, [])
        name = ref if ref in repos else normalise_ref(ref)
        if repos.get(name) == image_id and name not in tags:
            tags.append(name)
    return list(images.items())


def _reference(tag):
    """(repository, tag) of a NAME:TAG."""
    name, _, t = tag.rpartition(":")
    return name, t


def _write_layer_back(store, diff_id, image_id, path):
    """Write the tar of layer `diff_id` to the file `path`: from its tar-split when it has one (readable),
    else with `write_layer`; StoreError (one line) when that does not give the diff ID back."""
    split = os.path.join(store.layer_dir(diff_id), SPLIT_FILE)
    cannot = f"layer {diff_id[7:19]} of image {image_id[7:19]} cannot be written back as it was imported"
    with open(path, "wb") as f:
        if os.path.lexists(split):
            try:
                got, _ = write_split_layer(store.layer_path(diff_id), split, f)
            except SplitMismatch as e:
                raise StoreError(f"{cannot} ({e})") from None
            except SplitCorrupt:
                f.seek(0)
                f.truncate()
            else:
                if got != diff_id:
                    raise StoreError(f"{cannot} (its tree gives {got[7:19]}: changed since)")
                return
        got, _ = write_layer(store.layer_path(diff_id), f, prefix=store.prefix)
    if got != diff_id:
        raise StoreError(f"{cannot} (its tar was not in canonical form, and the store keeps the unpacked "
                         f"tree, which gives {got[7:19]}, with no readable {SPLIT_FILE})")


def save_images(store, refs, out):
    """Write the images `refs` name as a docker save archive to the binary stream `out`. Returns the image IDs.

    Raises:
        StoreError: no such image, or a layer that cannot be written back as its diff ID says.
    """
    plan = _plan(store, refs)
    with store.staging("save") as staging:
        layers = {}  # diff ID -> the written tar
        for image_id, _ in plan:
            for diff_id in store.image_layers(image_id):
                if diff_id in layers:
                    continue
                store.layer_info(diff_id, used_by=image_id)
                path = os.path.join(staging.path, diff_id[7:])
                _write_layer_back(store, diff_id, image_id, path)
                layers[diff_id] = path
        with tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT, encoding="utf-8") as tf:
            _add_dir(tf, "blobs")
            _add_dir(tf, "blobs/sha256")
            written = set()
            manifest, index, repositories = [], [], {}
            saved = {image_id for image_id, _ in plan}
            parents = store.parents()
            for image_id, tags in plan:
                config = store.config_bytes(image_id)
                diff_ids = store.image_layers(image_id)
                if image_id[7:] not in written:
                    _add_bytes(tf, _blob(image_id[7:]), config)
                    written.add(image_id[7:])
                descs = []
                for diff_id in diff_ids:
                    size = os.path.getsize(layers[diff_id])
                    if diff_id[7:] not in written:
                        info = tarfile.TarInfo(_blob(diff_id[7:]))
                        info.size, info.mode, info.mtime = size, 0o644, 0
                        info.uname = info.gname = ""
                        with open(layers[diff_id], "rb") as f:
                            tf.addfile(info, f)
                        written.add(diff_id[7:])
                    descs.append({"mediaType": LAYER_MEDIA, "digest": diff_id, "size": size})
                oci = json.dumps({"schemaVersion": 2, "mediaType": MANIFEST_MEDIA,
                                  "config": {"mediaType": CONFIG_MEDIA, "digest": image_id, "size": len(config)},
                                  "layers": descs}, separators=(",", ":")).encode()
                oci_hex = hashlib.sha256(oci).hexdigest()
                if oci_hex not in written:
                    _add_bytes(tf, _blob(oci_hex), oci)
                    written.add(oci_hex)
                item = {"Config": _blob(image_id[7:]), "RepoTags": tags or None,
                        "Layers": [_blob(d[7:]) for d in diff_ids]}
                parent = store.parent(image_id, parents)
                if parent is not None and parent in saved:  # as docker save: a link only to an image it saves
                    item["Parent"] = parent
                manifest.append(item)
                desc = {"mediaType": MANIFEST_MEDIA, "digest": "sha256:" + oci_hex, "size": len(oci)}
                for tag in tags or [None]:
                    annotations = {}
                    if tag is not None:
                        annotations = {"io.containerd.image.name": tag,
                                       "org.opencontainers.image.ref.name": _reference(tag)[1]}
                        if diff_ids:
                            repositories.setdefault(_reference(tag)[0], {})[_reference(tag)[1]] = diff_ids[-1][7:]
                    index.append(dict(desc, annotations=annotations) if annotations else desc)
            _add_bytes(tf, "index.json", json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image."
                                                     "index.v1+json", "manifests": index}).encode())
            _add_bytes(tf, "manifest.json", json.dumps(manifest).encode())
            _add_bytes(tf, "oci-layout", json.dumps({"imageLayoutVersion": "1.0.0"}).encode())
            if repositories:
                _add_bytes(tf, "repositories", json.dumps(repositories).encode())
    return [image_id for image_id, _ in plan]


@contextlib.contextmanager
def output_file(path):
    """A binary file written next to `path` and renamed onto it when the block ends without an exception."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".part", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644 & ~_umask())
        os.rename(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


# -- export: a container's merged view as one tar ---------------------------------------------------------

def export_container(store, ref, out):
    """Write the merged view of container `ref` (a full or unique short ID) as a tar to the binary stream
    `out`. Returns the container's record.

    Raises:
        StoreError: no such container (or an ambiguous prefix), or its image is gone.
    """
    from cowfs.overlay.lookup import Layers, join
    from cowfs.overlay.stack import Stack

    record = resolve_container(store, ref)
    if not store.has_image(record["Image"]):
        raise StoreError(f"container {record['Id'][:12]}: its image {record['Image'][7:19]} is not stored")
    lowers = [store.layer_path(d) for d in reversed(store.image_layers(record["Image"]))]
    for path in lowers:
        if not os.path.isdir(path):
            raise store.damaged(f"layer {os.path.basename(os.path.dirname(path))[:12]}", "missing")
    userxattr = store.prefix == USER_PREFIX
    if lowers:
        stack = Stack(lowers=lowers, upper=record["upper"], redirect_dir="follow", metacopy=True,
                      userxattr=userxattr)
    else:
        stack = Stack(lowers=[record["upper"]], userxattr=userxattr)
    layers = Layers(stack)
    with tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT, encoding="utf-8") as tf:
        writer = _Writer(tf, store.prefix, layers, None, override.is_marked(record["upper"]))

        def walk(merged, rel):
            node = layers.resolve_required(merged)
            for name, _, _entry in sorted(layers.list_dir(node), key=lambda item: item[0]):
                child_merged = join(merged, name)
                child = layers.resolve_required(child_merged)
                st = os.lstat(child.real)
                writer.entry(f"{rel}{name}", child.real, st, child.data)  # a metacopy's data from below
                if stat.S_ISDIR(st.st_mode):
                    walk(child_merged, f"{rel}{name}/")

        walk("/", "")
    return record


__all__ = ["export_container", "output_file", "save_images"]
