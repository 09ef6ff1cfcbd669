"""Containers: a thin writable layer over an image, kept in the store (STORE/containers/ID) until removed.

`cowfs mount IMAGE MOUNTPOINT` makes one (`create_container`); `cowfs ps`
lists them, `cowfs rm` removes one that is not mounted, `cowfs commit` finds
the image a container's upper came from (`container_of_upper`).
"""

import json
import os
import secrets
import shutil
import tempfile

from cowfs import runtime
from cowfs.images.store import StoreError, now_rfc3339
from cowfs.overlay import override
from cowfs.overlay.stack import parse_options

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
    staged = tempfile.mkdtemp(prefix="ctr-", dir=os.path.join(store.root, "tmp"))
    try:
        for sub in ("upper", "work"):
            os.mkdir(os.path.join(staged, sub), 0o755)
        if mark is not None:
            override.mark(os.path.join(staged, "upper"), mark)
        record = {"Id": cid, "Image": image_id, "ImageRef": ref, "Created": now_rfc3339(),
                  "Mountpoint": os.path.realpath(mountpoint)}
        with open(os.path.join(staged, CONTAINER_FILE), "w") as f:
            json.dump(record, f, indent=1)
        os.rename(staged, os.path.join(root, cid))
    except BaseException:
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
    for rec in runtime.records():
        try:
            stack = parse_options([rec.get("options", "")])
        except Exception:  # noqa: BLE001 - a record we cannot read is not this container's
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
