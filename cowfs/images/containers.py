"""Containers: a thin writable layer over an image, kept in the store (STORE/containers/ID) until removed.

`cowfs mount IMAGE MOUNTPOINT` makes one (`create_container`); `cowfs ps`
lists them, `cowfs rm` removes one that is not mounted, `cowfs commit` finds
the image a container's upper came from (`container_of_upper`).
"""

import json
import os
import secrets

from cowfs import runtime
from cowfs.errors import CowfsError
from cowfs.images import interrupts
from cowfs.images.catalog import lowerdir
from cowfs.images.store import Store, StoreDamaged, StoreError, is_digest, now_rfc3339
from cowfs.overlay import override
from cowfs.overlay.stack import parse_options
from cowfs.overlay.usage import tree_size

CONTAINERS = "containers"
CONTAINER_FILE = "container.json"


def create_container(store, image_id, ref, mountpoint):
    """A new container layer of `image_id`: STORE/containers/ID/{upper,work,container.json}. Returns the record.

    Over an image with recorded attributes (layers unpacked without privilege, see
    cowfs/overlay/override.py) the upper is marked too, with the root its topmost such
    layer shows: a change made through the mount is then recorded as well.
    """
    root = os.path.join(store.root, CONTAINERS)
    os.makedirs(root, exist_ok=True)
    cid = secrets.token_hex(32)
    marks = (override.root_value(store.layer_path(d)) for d in reversed(store.image_layers(image_id)))
    mark = next((value for value in marks if value is not None), None)
    with store.staging("ctr") as staging:  # built in tmp/, renamed into place whole
        staged = os.path.join(staging.path, "container")
        os.mkdir(staged, 0o755)
        for sub in ("upper", "work"):
            os.mkdir(os.path.join(staged, sub), 0o755)
        if mark is not None:
            override.mark(os.path.join(staged, "upper"), mark)
        record = {"Id": cid, "Image": image_id, "ImageRef": ref, "Created": now_rfc3339(),
                  "Mountpoint": os.path.realpath(mountpoint)}
        with open(os.path.join(staged, CONTAINER_FILE), "w") as f:
            json.dump(record, f, indent=1)
        os.rename(staged, os.path.join(root, cid))
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


def read_container(store, cid):
    """The record of container directory `cid` (with its upper and work). StoreDamaged when container.json
    is missing or not as cowfs writes it."""
    cdir = os.path.join(store.root, CONTAINERS, cid)
    what = f"container {cid[:12]}"
    try:
        record = store.load_json(os.path.join(CONTAINERS, cid, CONTAINER_FILE))
    except FileNotFoundError:
        raise store.damaged(what, f"{CONTAINER_FILE} is missing") from None
    except StoreDamaged as e:
        raise store.damaged(what, f"{CONTAINER_FILE}: {e.problem}") from None
    if not isinstance(record, dict) or record.get("Id") != cid or not is_digest(record.get("Image")):
        raise store.damaged(what, f"{CONTAINER_FILE} lacks its Id or Image")
    return dict(record, upper=os.path.join(cdir, "upper"), work=os.path.join(cdir, "work"))


def container_dirs(store):
    """The names (container IDs) of the directories in STORE/containers."""
    root = os.path.join(store.root, CONTAINERS)
    return sorted(os.listdir(root)) if os.path.isdir(root) else []


def list_containers(store):
    """Every container record of the store, oldest first. StoreDamaged for a container.json that is not
    as cowfs writes it."""
    found = [read_container(store, cid) for cid in container_dirs(store)]
    return sorted(found, key=lambda r: str(r.get("Created", "")))


def resolve_container(store, ref):
    """The container record for a full or unique short container ID. Raises StoreError."""
    found = [r for r in list_containers(store) if ref and r["Id"].startswith(ref)]
    if len(found) == 1:
        return found[0]
    if found:
        raise StoreError(f"container ID {ref!r} is ambiguous ({len(found)} containers start with it)")
    raise StoreError(f"no such container: {ref} (in store {store.root})")


def container_named(store_root, ref):
    """(store, record) of the container `ref` (a full or unique short container ID) names in the store at
    `store_root`, or None: when `ref` is an existing path (a path always wins), no store is there, or no
    container has that ID. An ambiguous prefix raises StoreError."""
    if os.path.lexists(ref) or not os.path.isdir(os.path.join(store_root, CONTAINERS)):
        return None
    if not ref or not all(c in "0123456789abcdef" for c in ref):
        return None
    store = Store(store_root, create=False)
    if not any(cid.startswith(ref) for cid in container_dirs(store)):
        return None
    return store, resolve_container(store, ref)


def inspect_container(store, record):
    """A container as `docker inspect` shows one (the fields that mean something here): where its layers are
    (GraphDriver.Data, MergedDir its mount point when mounted), whether it is mounted, its upper's size."""
    mounted = container_mounted_at(record)
    return {
        "Id": record["Id"],
        "Created": record.get("Created"),
        "Image": record["Image"],
        "Config": {"Image": record.get("ImageRef") or record["Image"]},
        "State": {"Status": "mounted" if mounted else "created", "Mounted": mounted is not None},
        "GraphDriver": {"Name": "cowfs", "Data": {
            "LowerDir": lowerdir(store, record["Image"]) if store.has_image(record["Image"]) else "",
            "UpperDir": record["upper"], "WorkDir": record["work"], "MergedDir": mounted or ""}},
        "SizeRw": tree_size(record["upper"]),
    }


def container_mounted_at(record):
    """The mount point of a live cowfs mount using the container's upper, or None."""
    for rec in runtime.records():
        try:
            stack = parse_options([rec.get("options", "")])
        except (CowfsError, ValueError, TypeError, AttributeError):  # a record we cannot read is not this one
            continue
        if stack.upper and os.path.realpath(stack.upper) == os.path.realpath(record["upper"]):
            return rec.get("mountpoint")
    return None


def remove_container(store, ref):
    """Delete a container layer; refused while it is mounted. Returns its ID."""
    record = resolve_container(store, ref)
    mounted = container_mounted_at(record)
    if mounted:
        raise StoreError(f"container {record['Id'][:12]} is mounted at {mounted} (cowfs umount it first)")
    cdir = os.path.dirname(record["upper"])
    with store.staging("rm") as trash:
        with interrupts.deferred():
            os.rename(cdir, os.path.join(trash.path, "container"))
            interrupts.changed()
    return record["Id"]


def images_in_use(store):
    """image ID -> [container IDs] of the containers made from it."""
    used = {}
    for record in list_containers(store):
        used.setdefault(record["Image"], []).append(record["Id"])
    return used
