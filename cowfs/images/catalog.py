"""The images of a layer store as commands show them: `cowfs images`, `history`, `inspect`, and an image as a stack.

Import is in cowfs.images.importer, commit in cowfs.images.commit, containers
in cowfs.images.containers; how sizes, times and tables look is cowfs.formatting.
"""

import fnmatch
import os

from cowfs.formatting import ago, docker_size, plural
from cowfs.images.reference import normalise_ref
from cowfs.images.store import Store, StoreDamaged, StoreError, parse_time
from cowfs.overlay.stack import lowerdir_value
from cowfs.overlay.whiteout import USER_PREFIX


def layer_sizes(store, image_id):
    """{diff ID: size} of an image's layers; StoreDamaged when one is missing or its layer.json is broken."""
    return {d: store.layer_info(d, used_by=image_id)["size"] for d in store.image_layers(image_id)}


def image_size(store, image_id):
    return sum(layer_sizes(store, image_id).values())


def created_time(config):
    """The config's created time in seconds, or None when it has none (or not RFC 3339)."""
    created = config.get("created")
    return parse_time(created) if isinstance(created, str) else None


def newest_first(store, image_ids):
    """`image_ids` in `docker images` order: by Created, newest first, images without a created time
    last (Docker counts them as created at time 0). Docker compares whole seconds and leaves ties in
    no set order; here they go by the exact time, then by image ID, so that the order is always one."""
    def key(image_id):
        t = created_time(store.config(image_id))
        return (t is None, -(t or 0.0), image_id)
    return sorted(image_ids, key=key)


def image_records(store, all_images=False, reference=None):
    """`cowfs images` as data: ([one dict per image and tag, as the table's rows], summary dict).

    Images come newest first (see `newest_first`), the rows of an image's tags together, by tag. As in
    `docker images`, an untagged image with children (a parent kept for them) is left out unless
    `all_images`; `reference` (REPOSITORY or REPOSITORY:TAG, with shell wildcards) keeps only the rows it
    matches.

    Row keys: Repository, Tag ("<none>" for an untagged image), ID (sha256:...),
    Created (the config's RFC 3339 time, or None), Size, SharedSize, UniqueSize
    (bytes). Summary keys: Layers (layers stored), Size (their bytes), UsedSize
    (the images' sizes added up), Saved (UsedSize - Size).
    """
    repos = store.repositories()
    image_ids = store.image_ids()
    users, sizes = {}, {}
    for image_id in image_ids:
        found = layer_sizes(store, image_id)
        sizes.update(found)
        for diff_id in found:
            users[diff_id] = users.get(diff_id, 0) + 1
    for diff_id in store.layer_ids():
        if diff_id not in sizes:
            sizes[diff_id] = store.layer_info(diff_id)["size"]
    rows = []
    parents = store.parents()
    matches = _matcher(reference) if reference is not None else None
    for image_id in newest_first(store, image_ids):
        tags = store.tags_of(image_id, repos)
        if not tags and not all_images and store.children(image_id, parents):
            continue
        config = store.config(image_id)
        layers = set(store.image_layers(image_id))
        size = sum(sizes[d] for d in layers)
        shared = sum(sizes[d] for d in layers if users.get(d, 0) > 1)
        created = config.get("created") if isinstance(config.get("created"), str) else None
        for ref in tags or ["<none>:<none>"]:
            repo, _, tag = ref.rpartition(":")
            if matches is not None and not matches(repo, tag):
                continue
            rows.append({"Repository": repo, "Tag": tag, "ID": image_id, "Created": created, "Size": size,
                         "SharedSize": shared, "UniqueSize": size - shared})
    stored = sum(sizes.values())
    used = sum(sizes[d] * n for d, n in users.items())
    return rows, {"Layers": len(sizes), "Size": stored, "UsedSize": used, "Saved": used - stored}


def _matcher(reference):
    """A test of (repo, tag) rows for REPOSITORY[:TAG] (shell wildcards allowed, as docker images takes it)."""
    name, _, want_tag = reference.rpartition(":")
    if not name or "/" in want_tag:  # no tag given (a ':' before the last '/' is a registry's port)
        name, want_tag = reference, None
    name = normalise_ref(name).rpartition(":")[0]  # as shown: docker.io/library/alpine is alpine
    return lambda repo, tag: (fnmatch.fnmatchcase(repo, name)
                              and (want_tag is None or fnmatch.fnmatchcase(tag, want_tag)))


def image_table_rows(rows, no_trunc=False):
    return [(r["Repository"], r["Tag"], r["ID"] if no_trunc else r["ID"][7:19], ago(parse_time(r["Created"])),
             docker_size(r["Size"]), docker_size(r["SharedSize"]), docker_size(r["UniqueSize"])) for r in rows]


def images_summary(summary):
    """The line under `cowfs images`: how much storing each layer once saves."""
    return (f"{plural(summary['Layers'], 'layer')} stored once: {docker_size(summary['Size'])}; the images use "
            f"{docker_size(summary['UsedSize'])} in all, so sharing saves {docker_size(summary['Saved'])}")


def list_images(store):
    """Rows for `cowfs images` and the sharing summary line."""
    rows, summary = image_records(store)
    return image_table_rows(rows), images_summary(summary)


IMAGES_HEADER = ("REPOSITORY", "TAG", "IMAGE ID", "CREATED", "SIZE", "SHARED SIZE", "UNIQUE SIZE")
HISTORY_HEADER = ("IMAGE", "CREATED", "CREATED BY", "SIZE", "COMMENT")


def history_records(store, image_id):
    """`cowfs history` as data, newest first: dicts with ID (the image's on the top row, its parent's on the
    next, and so on up its parents, as Docker fills them; "<missing>" past the last recorded parent),
    Created (RFC 3339 or None), CreatedBy, Size (bytes), Comment, EmptyLayer."""
    config = store.config(image_id)
    diff_ids = store.image_layers(image_id)
    entries = config.get("history")
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        entries = [{"created": config.get("created"), "created_by": ""} for _ in diff_ids]
    records = []
    layer_index = 0
    for entry in entries:
        size = 0
        empty = bool(entry.get("empty_layer"))
        if not empty:
            if layer_index < len(diff_ids):
                size = store.layer_info(diff_ids[layer_index], used_by=image_id)["size"]
            layer_index += 1
        created = entry.get("created") if isinstance(entry.get("created"), str) else None
        records.append({"ID": "<missing>", "Created": created, "CreatedBy": str(entry.get("created_by") or ""),
                        "Size": size, "Comment": str(entry.get("comment") or ""), "EmptyLayer": empty})
    records.reverse()
    chain, parents = image_id, store.parents()  # as docker history: the image, then each parent up
    for record in records:
        if chain is None:
            break
        record["ID"] = chain
        chain = store.parent(chain, parents)
    return records


def history_table_rows(records, no_trunc=False):
    rows = []
    for r in records:
        created_by = r["CreatedBy"].replace("\n", " ").replace("\t", " ")
        if not no_trunc and len(created_by) > 45:
            created_by = created_by[:44] + "…"
        shown_id = r["ID"] if no_trunc or r["ID"] == "<missing>" else r["ID"][7:19]
        rows.append([shown_id, ago(parse_time(r["Created"])), created_by, docker_size(r["Size"]), r["Comment"]])
    return rows


def history_rows(store, image_id, no_trunc=False):
    """Newest first, as `docker image history`: the image's ID on the top row, its parents' below it."""
    return history_table_rows(history_records(store, image_id), no_trunc)


def inspect(store, image_id):
    """The image as `docker image inspect` shows it (the fields that mean something here)."""
    config = store.config(image_id)
    diff_ids = store.image_layers(image_id)
    return {
        "Id": image_id,
        "RepoTags": store.tags_of(image_id),
        "Parent": store.parent(image_id) or "",
        "Created": config.get("created"),
        "Author": config.get("author", ""),
        "Architecture": config.get("architecture"),
        "Os": config.get("os"),
        "Config": docker_config(config.get("config")),
        "Size": image_size(store, image_id),
        "GraphDriver": {"Name": "cowfs", "Data": {"LowerDir": lowerdir(store, image_id)}},
        "RootFS": {"Type": "layers", "Layers": diff_ids},
    }


# The fields of Docker's container.Config, in its order, with what Docker prints when the image's config lacks
# one; OMIT marks those it leaves out when empty (json omitempty).
OMIT = object()
DOCKER_CONFIG_FIELDS = (("Hostname", ""), ("Domainname", ""), ("User", ""), ("AttachStdin", False),
                        ("AttachStdout", False), ("AttachStderr", False), ("ExposedPorts", OMIT), ("Tty", False),
                        ("OpenStdin", False), ("StdinOnce", False), ("Env", None), ("Cmd", None),
                        ("Healthcheck", OMIT), ("ArgsEscaped", OMIT), ("Image", ""), ("Volumes", None),
                        ("WorkingDir", ""), ("Entrypoint", None), ("NetworkDisabled", OMIT), ("MacAddress", OMIT),
                        ("OnBuild", None), ("Labels", None), ("StopSignal", OMIT), ("StopTimeout", OMIT),
                        ("Shell", OMIT))


def docker_config(config):
    """An image's config.config as `docker image inspect` prints it: every field of Docker's struct, in its
    order, absent ones as Docker prints them (fields Docker does not know are left out, as it drops them)."""
    if not isinstance(config, dict):
        return None
    shown = {}
    for name, default in DOCKER_CONFIG_FIELDS:
        value = config.get(name)
        if default is OMIT:
            if value not in (None, "", False, [], {}, 0):
                shown[name] = value
        else:
            shown[name] = default if value is None else value
    return shown


def lowerdir(store, image_id):
    """The image's layer directories as a lowerdir= value: topmost first, colon-separated (and escaped).
    StoreDamaged when one of them is missing."""
    paths = []
    seen = set()
    for diff_id in reversed(store.image_layers(image_id)):
        if diff_id in seen:  # the same layer again, lower down: everything it holds shows from above already,
            continue  # and the kernel, like cowfs, refuses one directory as two layers
        seen.add(diff_id)
        store.layer_info(diff_id, used_by=image_id)
        if not os.path.isdir(store.layer_path(diff_id)):
            raise store.damaged(f"layer {diff_id[7:19]}", f"its diff/ directory is missing, and image "
                                f"{image_id[7:19]} uses it")
        paths.append(store.layer_path(diff_id))
    return lowerdir_value(paths)


def looks_like_image(store_root, ref):
    """The image ID `ref` names in the store at `store_root`, or None (no store there, or no such image).

    A path that exists is never taken for an image: `cowfs mount DIR MNT` keeps meaning a one-layer mount.
    A damaged store raises StoreDamaged (one line saying what is wrong) rather than hide the image.
    """
    if os.path.exists(ref) or not os.path.isdir(os.path.join(store_root, "layers")):
        return None
    try:
        return Store(store_root, create=False).resolve(ref)
    except StoreDamaged:
        raise
    except StoreError:
        return None


def image_stack_options(store, image_id):
    """The -o strings for an image's layers (topmost first), userxattr when the store keeps user.overlay.*."""
    opts = ["lowerdir=" + lowerdir(store, image_id)]
    if store.prefix == USER_PREFIX:
        opts.append("userxattr")
    return opts
