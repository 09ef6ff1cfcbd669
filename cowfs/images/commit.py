"""`cowfs commit`: an upper directory written as a layer tar, and optionally added to the store as an image.

The new image is its parent's layers plus the new one, with the parent's
config and a history entry for the commit, and the parent recorded as its
parent, as `docker commit` makes it.
An upper with recorded attributes (a container of an image a user imported,
see cowfs/overlay/override.py) is written with the owners, modes and types
it records, as root would have written the same image (archive.py's writer).
"""

import json
import os
import sys

from cowfs.images.archive import ArchiveError, write_changes, write_layer
from cowfs.images.reference import check_tag_reference
from cowfs.images.store import StoreError, machine_architecture, normalise_ref, now_rfc3339
from cowfs.overlay.lookup import Layers
from cowfs.overlay.stack import Stack
from cowfs.overlay.whiteout import TRUSTED_PREFIX, USER_PREFIX


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
           clamp_mtime=None, message="", created_by=None, out=None, changes=None):
    """Write the upper directory as a layer tar; with `tag`, add an image (parent layers + it) to `store`.

    Returns (diff_id, image_id or None). The history entry's CREATED BY is `created_by`, else what `docker
    commit` records for a container of the parent (its Config.Cmd joined by spaces), else "cowfs commit".
    With `changes` ([(kind, merged path)], as `cowfs diff` finds them), the layer is written from those, as
    Docker writes it when its overlay has redirects or metacopy on (see archive.write_changes).

    Raises:
        ArchiveError: the upper cannot be archived (a redirect without lowers, unreadable files).
        StoreError: the parent image cannot be found, or the lowers are not store layers.
        BadReference: `tag` is not a name Docker would accept.
    """
    out = out if out is not None else sys.stdout
    if tag is not None:
        check_tag_reference(tag)
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
    staging = tmp_tar = None
    try:
        if out_path is not None:
            target = out_path
        elif tag is not None:
            staging = store.staging("commit")  # removed however this ends (and by the next command after SIGKILL)
            target = tmp_tar = os.path.join(staging.path, "layer.tar")
        else:
            target = None
        if changes is not None:
            merged = Layers(Stack(lowers=[os.path.abspath(p) for p in lowers], upper=os.path.abspath(upper),
                                  redirect_dir="follow", metacopy=True, userxattr=prefix == USER_PREFIX))

            def write(f):
                return write_changes(merged, changes, f, clamp_mtime)
        else:
            def write(f):
                return write_layer(upper, f, lowers, prefix, clamp_mtime)
        if target is None:
            diff_id, _ = write(None)
        else:
            partial = target + ".partial" if target != tmp_tar else target
            try:
                with open(partial, "wb") as f:
                    diff_id, _ = write(f)
                if partial != target:
                    os.rename(partial, target)
            except BaseException:
                if partial != target and os.path.exists(partial):
                    os.unlink(partial)
                raise
        print(diff_id, file=out)
        image_id = None
        if tag is not None:
            now = now_rfc3339()
            if parent_id is not None:
                config = json.loads(store.config_bytes(parent_id))  # a copy: the store caches its own
            else:
                config = {"architecture": machine_architecture(), "os": "linux", "config": {},
                          "rootfs": {"type": "layers", "diff_ids": []},
                          "history": [{"created": now, "created_by": ""} for _ in parent_layers]}
            config["created"] = now
            config["rootfs"] = {"type": "layers", "diff_ids": list(parent_layers) + [diff_id]}
            if created_by is None:
                cmd = (config.get("config") or {}).get("Cmd") if parent_id is not None else None
                created_by = " ".join(cmd) if isinstance(cmd, list) and cmd else "cowfs commit"
            entry = {"created": now, "created_by": created_by}
            if message:
                entry["comment"] = message
            config["history"] = list(config.get("history") or []) + [entry]
            config_bytes = json.dumps(config, sort_keys=True, separators=(",", ":")).encode()
            with store.transaction() as txn:
                with open(target, "rb") as f:
                    txn.add_layer(f, target, expected=diff_id)
                image_id = txn.add_image(config_bytes, [tag], parent=parent_id)
                txn.commit()
            print(f"Tagged {normalise_ref(tag)} as {image_id}", file=out)
        return diff_id, image_id
    finally:
        if staging is not None:
            staging.close()
