"""`cowfs system df`, `prune` and `check [--repair]`: what the store holds, what it can give back, what is wrong.

Nothing here ever deletes a layer that a stored image or a live mount uses
(a cowfs mount's record or a kernel overlay's lowerdir= in /proc/self/mounts),
an image that a container was made from, or a mounted container.

`check` verifies, for every part of the store:

- store.json: present, a JSON object with xattr_prefix trusted.overlay. or
  user.overlay.; layers/, images/ and tmp/ present;
- repositories.json: a JSON object of valid references to stored images;
- parents.json: a JSON object of image IDs, each child stored;
- each image: its file's sha256 is its ID (nothing truncated or changed), it
  is a JSON object with a list of diff IDs, and every one of its layers is
  stored;
- each layer: layer.json names the directory's diff ID and has a size, the
  diff/ directory is there, holds the recorded size, and its content digest
  (`cowfs.images.store.layer_content`, recorded at import; layers imported by
  an older cowfs have none, and get the size check alone) is what was
  recorded; its tar-split, when it has one, can be read through (else `cowfs
  save` can give its tar back only if it was canonical); a layer no image
  uses is a leftover of an interrupted rmi;
- each container: container.json readable, its image stored, upper/ and work/
  present;
- tmp/: entries left by interrupted commands (their process is gone).

`--repair` fixes what can be fixed without losing anything in use: it removes
leftovers and unused layers, completes a transaction stopped past its commit
point, drops a tag naming an image that is not stored (and the parent record
of one), re-creates missing
empty directories (layers/, images/, tmp/, a container's work/ or upper/, an
empty layer's diff/) and a damaged store.json. What it cannot fix it says.
"""

import json
import os
import re

from cowfs import mounttable, runtime
from cowfs.errors import CowfsError
from cowfs.formatting import docker_size, plural
from cowfs.images import interrupts
from cowfs.images.archive import SPLIT_FILE, SplitCorrupt, check_split
from cowfs.images.containers import (
    CONTAINER_FILE,
    CONTAINERS,
    container_dirs,
    container_mounted_at,
    list_containers,
    read_container,
    remove_container,
)
from cowfs.images.reference import BadReference, check_reference
from cowfs.images.store import (
    COMMIT_FILE,
    HEX64,
    IMAGE_FILE,
    Staging,
    StoreDamaged,
    StoreError,
    layer_content,
)
from cowfs.overlay.stack import parse_options, split_layers
from cowfs.overlay.usage import tree_size
from cowfs.overlay.whiteout import TRUSTED_PREFIX, USER_PREFIX

DF_HEADER = ("TYPE", "TOTAL", "ACTIVE", "SIZE", "RECLAIMABLE")


# -- what is in use ------------------------------------------------------------------------------

def layers_in_live_mounts(store):
    """The diff IDs (hex) of the store's layers that a live mount stacks: cowfs mounts (their records) and
    kernel overlays (lowerdir= in /proc/self/mounts)."""
    option_sets = []
    for record in runtime.records():
        option_sets.append(str(record.get("options", "")))
    try:
        for mount in mounttable.read():
            if mount.fstype == "overlay":
                option_sets.extend(opt for opt in mount.options if opt.startswith(("lowerdir=", "lowerdir+=")))
    except OSError:
        pass
    layers = os.path.realpath(os.path.join(store.root, "layers"))
    found = set()
    for options in option_sets:
        try:
            lowers = parse_options([options]).lowers if not options.startswith("lowerdir=") else \
                split_layers(options[len("lowerdir="):])
        except (CowfsError, ValueError):
            continue
        for path in lowers:
            head, diff = os.path.split(os.path.realpath(path))
            parent, hexpart = os.path.split(head)
            if diff == "diff" and parent == layers and HEX64.fullmatch(hexpart):
                found.add("sha256:" + hexpart)
    return found


def _mounted(containers):
    return {c["Id"]: container_mounted_at(c) for c in containers}


# -- df ------------------------------------------------------------------------------------------------

def disk_usage(store):
    """`cowfs system df` as data: one dict per type (Images, Containers, Layers, Leftovers) with Type, Total,
    Active, Size and Reclaimable (bytes), as `docker system df` counts them."""
    image_ids = store.image_ids()
    layers_of = {i: set(store.image_layers(i)) for i in image_ids}
    sizes = {d: store.layer_info(d)["size"] for d in store.layer_ids()}
    for image_id, layers in layers_of.items():
        for d in layers:
            if d not in sizes:
                sizes[d] = store.layer_info(d, used_by=image_id)["size"]
    containers = list_containers(store)
    mounted = _mounted(containers)
    active_images = {c["Image"] for c in containers} & set(image_ids)
    image_layers = set().union(*layers_of.values()) if layers_of else set()
    active_layers = set().union(*(layers_of[i] for i in active_images)) if active_images else set()
    images_size = sum(sizes[d] for d in image_layers)
    used_layers = image_layers | layers_in_live_mounts(store)
    container_sizes = {c["Id"]: tree_size(c["upper"]) for c in containers}
    leftovers = store.leftovers()
    return [
        {"Type": "Images", "Total": len(image_ids), "Active": len(active_images), "Size": images_size,
         "Reclaimable": images_size - sum(sizes[d] for d in active_layers)},
        {"Type": "Containers", "Total": len(containers), "Active": sum(1 for m in mounted.values() if m),
         "Size": sum(container_sizes.values()),
         "Reclaimable": sum(s for cid, s in container_sizes.items() if not mounted[cid])},
        {"Type": "Layers", "Total": len(sizes), "Active": len([d for d in sizes if d in used_layers]),
         "Size": sum(sizes.values()), "Reclaimable": sum(s for d, s in sizes.items() if d not in used_layers)},
        {"Type": "Leftovers", "Total": len(leftovers), "Active": sum(1 for _, live, _ in leftovers if live),
         "Size": sum(size for _, _, size in leftovers),
         "Reclaimable": sum(size for _, live, size in leftovers if not live)},
    ]


def reclaimable(size, part):
    """Docker's RECLAIMABLE column: "1.2MB (45%)"."""
    return f"{docker_size(part)} ({part * 100 // size}%)" if size else docker_size(part)


def df_table_rows(records):
    return [(r["Type"], r["Total"], r["Active"], docker_size(r["Size"]), reclaimable(r["Size"], r["Reclaimable"]))
            for r in records]


def reclaimable_ids(store):
    """What makes up df's RECLAIMABLE, by ID: images no container uses, containers not mounted, layers no
    image (nor live mount) uses, tmp/ entries of commands that are gone (as tmp/NAME)."""
    image_ids = store.image_ids()
    containers = list_containers(store)
    mounted = _mounted(containers)
    used_images = {c["Image"] for c in containers}
    used_layers = set().union(*(set(store.image_layers(i)) for i in image_ids)) | layers_in_live_mounts(store)
    return ([i for i in image_ids if i not in used_images] + [c["Id"] for c in containers if not mounted[c["Id"]]]
            + [d for d in store.layer_ids() if d not in used_layers]
            + [f"tmp/{name}" for name, live, _ in store.leftovers() if not live])


# -- prune ----------------------------------------------------------------------------------------------

def prune(store, all_images=False, containers=False, dry_run=False, out=None):
    """Remove dead leftovers, unused layers, dangling images (with `all_images`: every image no container
    uses) and, with `containers`, the containers that are not mounted; print each and the space freed.
    With `dry_run`, only print what would go. Returns the bytes freed (or that would be)."""
    def say(text):
        print(text, file=out, flush=True)

    total = 0
    sections = []

    if dry_run:
        leftovers = [(name, size, "completed" if os.path.isfile(os.path.join(store.root, "tmp", name, COMMIT_FILE))
                      else "removed") for name, live, size in store.leftovers() if not live]
    else:  # first, so that what a completed transaction adds is counted as the rest of the store is
        leftovers = store.heal()
        total += sum(size for _, size, how in leftovers if how == "removed")
    removed_containers = []
    all_containers = list_containers(store)
    mounted = _mounted(all_containers)
    if containers:
        removed_containers = [c for c in all_containers if not mounted[c["Id"]]]
    kept_containers = [c for c in all_containers if c not in removed_containers]
    used_images = {c["Image"] for c in kept_containers}
    repos = store.repositories()
    image_ids = store.image_ids()
    removed_images = _without_kept_children(store, [i for i in image_ids if i not in used_images
                                                    and (all_images or not store.tags_of(i, repos))])
    kept_images = [i for i in image_ids if i not in removed_images]
    used_layers = set().union(*(set(store.image_layers(i)) for i in kept_images)) | layers_in_live_mounts(store)
    removed_layers = [d for d in store.layer_ids() if d not in used_layers]
    layer_sizes = {d: store.layer_info(d)["size"] for d in removed_layers}

    if dry_run:
        total = (sum(size for _, size, how in leftovers if how == "removed")
                 + sum(tree_size(c["upper"]) for c in removed_containers) + sum(layer_sizes.values()))
    else:
        for c in removed_containers:
            size = tree_size(c["upper"])
            remove_container(store, c["Id"])
            total += size
        if removed_images or removed_layers:
            total += remove_unused(store, removed_images, removed_layers)
    verb = "Would delete" if dry_run else "Deleted"
    if removed_containers:
        sections.append((f"{verb} Containers:", [c["Id"] for c in removed_containers]))
    if removed_images:
        lines = []
        for image_id in removed_images:
            tags = store.tags_of(image_id, repos)
            if dry_run:
                lines.append(image_id + (f" ({', '.join(tags)})" if tags else ""))
            else:
                lines += [f"untagged: {t}" for t in tags] + [f"deleted: {image_id}"]
        sections.append((f"{verb} Images:", lines))
    if removed_layers:
        sections.append((f"{verb} Layers:", [f"{d} ({docker_size(layer_sizes[d])})" for d in removed_layers]))
    if any(how == "removed" for _, _, how in leftovers):
        sections.append((f"{verb} Leftovers:", [f"tmp/{name} ({docker_size(size)})" for name, size, how in leftovers
                                                if how == "removed"]))
    if any(how == "completed" for _, _, how in leftovers):
        sections.append(("Would complete:" if dry_run else "Completed:", [
            f"tmp/{name} (an import stopped past its commit point)" for name, _, how in leftovers
            if how == "completed"]))
    for title, lines in sections:
        say(title)
        for line in lines:
            say(line)
        say("")
    say(f"Total {'reclaimable' if dry_run else 'reclaimed'} space: {docker_size(total)}")
    return total


def _without_kept_children(store, image_ids):
    """`image_ids` less those with a child that stays: a parent goes only with its children, as in Docker."""
    parents = store.parents()
    removed = set(image_ids)
    while True:
        kept_parents = {p for c, p in parents.items() if c not in removed and store.has_image(c)}
        if not removed & kept_parents:
            return [i for i in image_ids if i in removed]
        removed -= kept_parents


def remove_unused(store, image_ids, diff_ids):
    """Remove images (and their tags) and layers, re-checking under the lock that no remaining image, container
    or live mount uses them. Returns the bytes of the layers removed."""
    total = 0
    trash = None
    try:
        with interrupts.deferred(), store.locked():
            used_images = {c["Image"] for c in list_containers(store)}
            image_ids = _without_kept_children(store, [i for i in image_ids if i not in used_images
                                                       and store.has_image(i)])
            repos = store.repositories()
            kept = {ref: i for ref, i in repos.items() if i not in image_ids}
            remaining = [i for i in store.image_ids() if i not in image_ids]
            used = set().union(*(set(store.image_layers(i)) for i in remaining)) | layers_in_live_mounts(store)
            diff_ids = [d for d in diff_ids if d not in used and os.path.isdir(store.layer_dir(d))]
            trash = Staging(store, "rm")
            if kept != repos:
                store.write_repositories(kept)
            store.forget_parents(store.parents(), image_ids)
            for image_id in image_ids:
                os.unlink(os.path.join(store.root, "images", image_id[7:] + ".json"))
            for diff_id in diff_ids:
                try:
                    total += store.layer_info(diff_id)["size"]
                except StoreError:
                    pass
                os.rename(store.layer_dir(diff_id), os.path.join(trash.path, diff_id[7:]))
            interrupts.changed()
    finally:
        if trash is not None:
            trash.close()
    return total


# -- check ---------------------------------------------------------------------------------------------

class Problem:
    """One thing wrong: `what` (where in the store), `text`, and `fix` (a callable returning what it did),
    or `hint` (what a person can do) when cowfs cannot fix it."""

    def __init__(self, what, text, fix=None, hint=None):
        self.what, self.text, self.fix, self.hint = what, text, fix, hint

    def line(self):
        if self.fix is not None:
            return f"{self.what}: {self.text} (--repair fixes it)"
        return f"{self.what}: {self.text}" + (f" ({self.hint})" if self.hint else "")


def guess_prefix(store):
    """The xattr prefix the layers were unpacked with: user.overlay. when a layer has recorded attributes
    (an unprivileged import) or user.overlay.* markers, trusted.overlay. when one has trusted markers; else
    what this user's new store would use."""
    for diff_id in store.layer_ids():
        path = store.layer_path(diff_id)
        for dirpath, dirnames, _ in os.walk(path):
            for d in [dirpath] + [os.path.join(dirpath, n) for n in dirnames]:
                try:
                    names = os.listxattr(d, follow_symlinks=False)
                except OSError:
                    continue
                if any(n.startswith(USER_PREFIX) or n == "user.containers.override_stat" for n in names):
                    return USER_PREFIX
                if any(n.startswith(TRUSTED_PREFIX) for n in names):
                    return TRUSTED_PREFIX
    return TRUSTED_PREFIX if os.geteuid() == 0 else USER_PREFIX


def _mkdir(path, what):
    def fix():
        os.makedirs(path, exist_ok=True)
        return f"re-created the empty {what}"
    return fix


def check(store):
    """Every problem of the store: [Problem]. The store may be opened with strict=False (a damaged
    store.json) and heal=False (so that leftovers are seen)."""
    problems = []
    root = store.root

    # the layout
    meta = os.path.join(root, "store.json")
    if store.problem is not None or not os.path.exists(meta):
        text = store.problem if store.problem is not None else "missing"

        def fix_meta():
            prefix = guess_prefix(store)
            with store.locked(heal=False):
                store.write_file("store.json", json.dumps({"xattr_prefix": prefix}).encode())
            store.prefix, store.problem = prefix, None
            return f"rewrote it with xattr_prefix {prefix} (as the layers show)"
        problems.append(Problem("store.json", text, fix_meta))
    for sub in ("layers", "images", "tmp"):
        if not os.path.isdir(os.path.join(root, sub)):
            problems.append(Problem(f"{sub}/", "missing", _mkdir(os.path.join(root, sub), f"{sub}/ directory")))

    # tmp/: what interrupted commands left
    for name, live, size in store.leftovers():
        if live:
            continue
        path = os.path.join(root, "tmp", name)
        if os.path.isfile(os.path.join(path, COMMIT_FILE)):
            text = f"a transaction stopped past its commit point ({docker_size(size)})"
        else:
            text = f"left by an interrupted command ({docker_size(size)})"
        problems.append(Problem(f"tmp/{name}", text, _heal_fix(store)))

    images_dir = os.path.join(root, "images")
    names = sorted(os.listdir(images_dir)) if os.path.isdir(images_dir) else []
    image_ids = ["sha256:" + n[:-5] for n in names if IMAGE_FILE.fullmatch(n)]
    for n in names:
        if not IMAGE_FILE.fullmatch(n):
            path = os.path.join(images_dir, n)
            if re.search(r"\.tmp\d+$", n) and os.path.isfile(path):
                problems.append(Problem(f"images/{n}", "left by an interrupted write", _unlink_fix(path)))
            else:
                problems.append(Problem(f"images/{n}", "not an image config (cowfs did not write it)",
                                        hint="remove it by hand"))

    # images and the layers they need
    layers_dir = os.path.join(root, "layers")
    layer_names = sorted(os.listdir(layers_dir)) if os.path.isdir(layers_dir) else []
    used = {}  # diff ID -> [image IDs]
    good_images = set()
    for image_id in image_ids:
        what = f"image {image_id[7:19]}"
        try:
            layers = store.image_layers(image_id)
        except StoreDamaged as e:
            problems.append(Problem(what, e.problem, hint=f"cowfs rmi {image_id[7:19]}, and import it again"))
            continue
        good_images.add(image_id)
        for diff_id in layers:
            used.setdefault(diff_id, []).append(image_id)
            if not os.path.isdir(store.layer_dir(diff_id)):
                problems.append(Problem(what, f"its layer {diff_id[7:19]} is missing",
                                        hint=f"cowfs rmi {image_id[7:19]}, and import it again"))
    live_layers = layers_in_live_mounts(store)
    damaged_images = len(good_images) < len(image_ids)  # then no layer can be called unused

    # repositories.json
    try:
        repos = store.repositories()
    except StoreDamaged as e:
        problems.append(Problem("repositories.json", e.problem,
                                hint="fix or remove it by hand: the images stay, untagged"))
        repos = {}
    for ref, image_id in sorted(repos.items()):
        if image_id not in image_ids:
            problems.append(Problem("repositories.json", f"{ref} names image {image_id[7:19]}, which is not stored",
                                    _drop_ref_fix(store, ref, image_id)))
        try:
            check_reference(ref)
        except BadReference as e:
            problems.append(Problem("repositories.json", str(e), hint="cowfs rmi it, and name the image again"))

    # parents.json
    try:
        parents = store.parents()
    except StoreDamaged as e:
        problems.append(Problem("parents.json", e.problem, hint="remove it by hand: history then shows "
                                "<missing> for the parents"))
        parents = {}
    for child in sorted(parents):
        if child not in image_ids:
            problems.append(Problem("parents.json", f"records the parent of image {child[7:19]}, which is not "
                                    "stored", _drop_parent_fix(store, child)))

    # layers
    for name in layer_names:
        path = os.path.join(layers_dir, name)
        if not HEX64.fullmatch(name) or not os.path.isdir(path):
            problems.append(Problem(f"layers/{name}", "not a layer (cowfs did not make it)", hint="remove it by hand"))
            continue
        diff_id = "sha256:" + name
        what = f"layer {name[:12]}"
        users = used.get(diff_id, [])
        in_use = bool(users) or diff_id in live_layers or damaged_images
        unused_fix = _remove_layer_fix(store, diff_id) if not in_use else None
        hint = (f"image {users[0][7:19]} uses it: cowfs rmi {users[0][7:19]}, and import it again" if users
                else "a live mount uses it" if diff_id in live_layers
                else "a damaged image may use it" if in_use else None)
        try:
            info = store.layer_info(diff_id)
        except StoreDamaged as e:
            problems.append(Problem(what, e.problem, unused_fix, hint))
            continue
        diff = store.layer_path(diff_id)
        if not os.path.isdir(diff):
            fix = unused_fix or _recreate_empty_layer_fix(store, diff_id, info)
            problems.append(Problem(what, "its diff/ directory is missing", fix, hint))
            continue
        try:
            content, size = layer_content(diff)
        except OSError as e:
            problems.append(Problem(what, f"cannot be read: {e.filename}: {e.strerror}", hint="check its permissions"))
            continue
        if size != info["size"] and size + _symlink_bytes(diff) == info["size"] and info.get("content") == content:
            problems.append(Problem(what, f"size recorded by an older cowfs ({info['size']}, counting symlinks; "
                                    f"{size} as Docker counts)", _resize_fix(store, diff_id, size)))
        elif size != info["size"]:
            problems.append(Problem(what, f"holds {plural(size, 'byte')}, {info['size']} when imported (changed since)",
                                    unused_fix, hint))
        elif info.get("content") not in (None, content) and info["content"] != _older_content(diff):
            problems.append(Problem(what, "content differs from what was imported (a file was changed, added or "
                                    "removed)", unused_fix, hint))
        elif not in_use:
            problems.append(Problem(what, f"used by no image ({docker_size(size)}, left by an interrupted rmi)",
                                    unused_fix, hint))
        split = os.path.join(store.layer_dir(diff_id), SPLIT_FILE)
        if os.path.lexists(split):
            try:
                check_split(split)
            except (OSError, SplitCorrupt) as e:
                problems.append(Problem(what, f"its {SPLIT_FILE} cannot be read ({getattr(e, 'strerror', None) or e}"
                                        "): cowfs save can give its tar back only if it was canonical"))

    # containers
    for cid in container_dirs(store):
        what = f"container {cid[:12]}"
        try:
            record = read_container(store, cid)
        except StoreDamaged as e:
            problems.append(Problem(what, e.problem, hint=f"remove {os.path.join(root, CONTAINERS, cid)} by hand "
                                    "if its changes are not needed"))
            continue
        except OSError as e:
            problems.append(Problem(what, f"{CONTAINER_FILE}: {e.strerror}", hint="check its permissions"))
            continue
        if record["Image"] not in image_ids:
            problems.append(Problem(what, f"its image {record['Image'][7:19]} is not stored",
                                    hint=f"import the image again, or cowfs rm {cid[:12]}"))
        elif record["Image"] not in good_images:
            problems.append(Problem(what, f"its image {record['Image'][7:19]} is damaged (see above)"))
        for sub in ("upper", "work"):
            if not os.path.isdir(record[sub]):
                lost = " (its changes are lost)" if sub == "upper" else ""
                problems.append(Problem(what, f"its {sub}/ directory is missing{lost}",
                                        _mkdir(record[sub], f"{sub}/ directory")))
    return problems


def _heal_fix(store):
    def fix():
        done = store.heal()
        return "completed it" if any(how == "completed" for _, _, how in done) else "removed it"
    return fix


def _unlink_fix(path):
    def fix():
        os.unlink(path)
        return "removed it"
    return fix


def _drop_ref_fix(store, ref, image_id):
    def fix():
        with interrupts.deferred(), store.locked():
            repos = store.repositories()
            if repos.get(ref) == image_id and not store.has_image(image_id):
                del repos[ref]
                store.write_repositories(repos)
        return f"removed the tag {ref}"
    return fix


def _symlink_bytes(root):
    """The bytes of the symlink targets under `root`, which layer sizes counted before they followed Docker."""
    total = 0
    for top, dirs, files in os.walk(root):
        for name in dirs + files:
            path = os.path.join(top, name)
            if os.path.islink(path):
                total += len(os.fsencode(os.readlink(path)))
    return total


def _resize_fix(store, diff_id, size):
    def fix():
        with interrupts.deferred(), store.locked():
            info = store.layer_info(diff_id)
            store.write_file(os.path.join("layers", diff_id[7:], "layer.json"),
                             json.dumps(dict(info, size=size)).encode())
        return f"recorded {size}"
    return fix


def _drop_parent_fix(store, child):
    def fix():
        with interrupts.deferred(), store.locked():
            if not store.has_image(child):
                store.forget_parents(store.parents(), [child])
        return "removed the record"
    return fix


def _remove_layer_fix(store, diff_id):
    def fix():
        with interrupts.deferred(), store.locked():
            for image_id in store.image_ids():
                try:
                    if diff_id in store.image_layers(image_id):
                        raise StoreError(f"image {image_id[7:19]} uses it now")
                except StoreDamaged:
                    continue
            if diff_id in layers_in_live_mounts(store):
                raise StoreError("a live mount uses it now")
            with Staging(store, "rm") as trash:
                os.rename(store.layer_dir(diff_id), os.path.join(trash.path, diff_id[7:]))
        return "removed it (no image uses it)"
    return fix


def _older_content(diff):
    """The content digest as earlier cowfs recorded it (whiteouts' times included), or None."""
    try:
        return layer_content(diff, whiteout_times=True)[0]
    except OSError:
        return None


def _recreate_empty_layer_fix(store, diff_id, info):
    """A missing diff/ of a layer that was empty when imported can be made again: made, then checked
    against the recorded content digest (and removed again when it does not match)."""
    if info.get("size") != 0 or not info.get("content"):
        return None

    def fix():
        path = store.layer_path(diff_id)
        os.mkdir(path, 0o755)
        if layer_content(path)[0] != info["content"]:
            os.rmdir(path)
            raise StoreError("an empty directory is not what was imported")
        return "re-created its empty diff/ directory"
    return fix


def run_check(store, repair=False, out=None):
    """Print one line per problem (with `repair`: and what was done about it) and a summary; returns the exit
    status: 0 when the store is sound (or every problem was fixed), else 1."""
    def say(text):
        print(text, file=out, flush=True)

    problems = check(store)
    if not repair:
        for p in problems:
            say(p.line())
        fixable = sum(1 for p in problems if p.fix is not None)
        if problems:
            say(f"{plural(len(problems), 'problem')}" + (f"; cowfs system check --repair fixes {fixable}"
                                                          if fixable else ""))
        else:
            say(f"no problems: {_counts(store)}")
        return 1 if problems else 0
    unfixed = 0
    for p in problems:
        if p.fix is None:
            unfixed += 1
            say(f"{p.what}: {p.text}: not fixed" + (f" ({p.hint})" if p.hint else ""))
            continue
        try:
            done = p.fix()
        except (CowfsError, OSError) as e:
            unfixed += 1
            reason = e.strerror if isinstance(e, OSError) and not isinstance(e, CowfsError) else str(e)
            say(f"{p.what}: {p.text}: not fixed ({reason})")
            continue
        say(f"{p.what}: {p.text}: {done}")
    if problems:
        say(f"{plural(len(problems), 'problem')}: {len(problems) - unfixed} fixed, {unfixed} not")
    else:
        say(f"no problems: {_counts(store)}")
    return 1 if unfixed else 0


def _counts(store):
    try:
        return (f"{plural(len(store.image_ids()), 'image')}, {plural(len(store.layer_ids()), 'layer')}, "
                f"{plural(len(container_dirs(store)), 'container')} checked")
    except (CowfsError, OSError):
        return "checked"


__all__ = ["DF_HEADER", "Problem", "check", "df_table_rows", "disk_usage", "layers_in_live_mounts", "prune",
           "reclaimable_ids", "remove_unused", "run_check"]

