"""The images of a layer store as commands show them: `cowfs images`, `history`, `inspect`, and an image as a stack.

Import is in cowfs.images.importer, commit in cowfs.images.commit, containers
in cowfs.images.containers; how sizes, times and tables look is cowfs.formatting.
"""

import os

from cowfs.formatting import ago, docker_size
from cowfs.images.store import Store, StoreError, parse_time
from cowfs.overlay.stack import lowerdir_value
from cowfs.overlay.whiteout import USER_PREFIX


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
            rows.append((repo, tag, image_id[7:19], ago(parse_time(config.get("created"))), docker_size(size),
                         docker_size(shared), docker_size(size - shared)))
    stored = sum(sizes.values())
    unshared = sum(sizes.get(d, 0) * n for d, n in users.items())
    summary = (f"{len(sizes)} layers stored once: {docker_size(stored)}; the images use {docker_size(unshared)} "
               f"in all, so sharing saves {docker_size(unshared - stored)}")
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
        created = ago(parse_time(entry.get("created")))
        rows.append(["<missing>", created, created_by, docker_size(size), entry.get("comment", "")])
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
    """The image's layer directories as a lowerdir= value: topmost first, colon-separated (and escaped)."""
    return lowerdir_value(store.layer_path(d) for d in reversed(store.image_layers(image_id)))


def looks_like_image(store_root, ref):
    """The image ID `ref` names in the store at `store_root`, or None (no store there, or no such image).

    A path that exists is never taken for an image: `cowfs mount DIR MNT` keeps meaning a one-layer mount.
    """
    if os.path.exists(ref) or not os.path.isdir(os.path.join(store_root, "layers")):
        return None
    try:
        return Store(store_root, create=False).resolve(ref)
    except (StoreError, ValueError):
        return None


def image_stack_options(store, image_id):
    """The -o strings for an image's layers (topmost first), userxattr when the store keeps user.overlay.*."""
    opts = ["lowerdir=" + lowerdir(store, image_id)]
    if store.prefix == USER_PREFIX:
        opts.append("userxattr")
    return opts
