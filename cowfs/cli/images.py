"""The image commands of the command line: import, images, history, inspect, rmi, commit, ps, rm.

`add_commands(subparsers)` adds them to the main parser's subparsers;
`run(args) -> exit code` runs the one chosen (args.command names it).
"""

import argparse
import json
import os
import sys

from cowfs.cli.report import reporting
from cowfs.errors import one_line
from cowfs.explore.diff import tree_size
from cowfs.formatting import ago, docker_size, table
from cowfs.images.catalog import HISTORY_HEADER, IMAGES_HEADER, history_rows, inspect, list_images, lowerdir
from cowfs.images.commit import commit
from cowfs.images.containers import (
    container_mounted_at,
    container_of_upper,
    images_in_use,
    list_containers,
    remove_container,
)
from cowfs.images.importer import import_archive
from cowfs.images.store import Store, StoreError, default_store, normalise_ref, parse_time
from cowfs.overlay.stack import split_layers
from cowfs.overlay.whiteout import TRUSTED_PREFIX, USER_PREFIX

COMMANDS = ("import", "images", "history", "inspect", "rmi", "commit", "ps", "rm")

STORE_HELP = ("layer store directory (default: $COWFS_STORE, else /var/lib/cowfs for root, "
              "else $XDG_DATA_HOME/cowfs or ~/.local/share/cowfs)")

EPILOGS = {
    "import": """\
formats: docker save archives (manifest.json; plain or gzip), OCI image layouts
(a directory or a tar with oci-layout, index.json, blobs/), and bare layer
tarballs (plain, gzip, zstd when available). Every stated digest is checked;
a hostile or broken archive is refused with one line and changes nothing.

examples:
  cowfs import my-final-image.tar
  docker save alpine:3.19 | gzip > alpine.tar.gz && cowfs import alpine.tar.gz
  cowfs import ./oci-dir --name acme/app:1.0
  cowfs import rootfs.tar.zst --name acme/rootfs:latest
""",
    "images": """\
SHARED SIZE counts the layers an image shares with another image; the last
line says how much storing each layer once saves.

example:
  cowfs images
""",
    "history": """\
example:
  cowfs history acme/my-final-image:1.0
""",
    "inspect": """\
formats: json (the default, as docker image inspect), layers (RootFS.Layers
as a JSON list), lowerdir (the layer directories, topmost first, for
cowfs mount -o lowerdir=...), id.

examples:
  cowfs inspect acme/my-final-image:1.0
  cowfs inspect --format layers acme/my-final-image:1.0
  cowfs mount -o lowerdir=$(cowfs inspect --format lowerdir acme/app:1.0),upperdir=U,workdir=W /mnt
""",
    "rmi": """\
Layers still used by another image are kept. An image that a container
(cowfs mount IMAGE MOUNTPOINT) was made from is kept until `cowfs rm` removes it.

examples:
  cowfs rmi acme/my-base-image:1.0
  cowfs rmi 3b1c7e5a0d2f
""",
    "commit": """\
Whiteouts become .wh.NAME entries, opaque directories get .wh..wh..opq, and a
directory renamed with redirect_dir=on is written with its whole merged
content. Entries are sorted and owners numeric, so committing the same upper
twice gives the same bytes. Prints the layer's diff ID.

MOUNTPOINT is a live cowfs mount: its upper and lower layers come from the
mount; when it is a container of an image (cowfs mount IMAGE MOUNTPOINT), that
image is the parent (as --from IMAGE), so --tag makes the image's layers plus
the new one, as docker commit does.

examples:
  cowfs commit /mnt/app --tag acme/app:1.1 -m "configured"
  cowfs commit /c/upper --from acme/my-final-image:1.0 --tag acme/changed:1.0
  cowfs commit /c/upper --lower /img/l2 --lower /img/l1 -o layer.tar
  cowfs commit /c/upper --lower $(cowfs inspect --format lowerdir acme/app:1.0) --tag acme/app:2.0
""",
    "ps": """\
example:
  cowfs ps
""",
    "rm": """\
A mounted container is refused: cowfs umount its mount point first.

examples:
  cowfs rm 0f3c9e21a7b4
""",
}


def _parser(sub, name, help_text, description):
    p = sub.add_parser(name, help=help_text, description=description, epilog=EPILOGS[name],
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--store", metavar="DIR", help=STORE_HELP)
    return p


def add_commands(subparsers):
    """Add the image subcommands to an argparse subparsers object (made with dest="command")."""
    p = _parser(subparsers, "import", "import images from a docker save archive, an OCI layout or a layer tar",
                "Import every image of ARCHIVE into the layer store (all or nothing).")
    p.add_argument("archive", metavar="ARCHIVE")
    p.add_argument("--name", metavar="NAME:TAG", help="name the image (the archive must hold exactly one)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress lines on stderr")

    _parser(subparsers, "images", "list the images in the layer store",
            "List the stored images, with how much of each is shared with other images.")

    p = _parser(subparsers, "history", "show the history of an image",
                "Show the steps an image was made by, newest first, with the size of each layer.")
    p.add_argument("image", metavar="IMAGE")
    p.add_argument("--no-trunc", action="store_true", help="do not shorten CREATED BY and IDs")

    p = _parser(subparsers, "inspect", "show an image's details (layers, config)",
                "Show an image's details, as docker image inspect.")
    p.add_argument("image", metavar="IMAGE")
    p.add_argument("--format", "-f", default="json", choices=("json", "layers", "lowerdir", "id"),
                   help="what to print (default: json)")

    p = _parser(subparsers, "rmi", "remove an image (layers used by other images are kept)",
                "Untag and remove images; layers no remaining image uses are deleted.")
    p.add_argument("images", nargs="+", metavar="IMAGE")

    p = _parser(subparsers, "commit", "turn a mount's upper layer into a layer tar and optionally an image",
                "Write the changes in a cowfs mount's upper layer, or an overlay upper directory, as an OCI "
                "layer tar.")
    p.add_argument("upper", metavar="MOUNTPOINT|UPPERDIR")
    p.add_argument("--lower", action="append", default=[], metavar="DIR",
                   help="a lower layer, topmost first (repeat, or colon-separate); needed to expand "
                        "redirected directories and for --tag without --from")
    p.add_argument("--from", dest="from_image", metavar="IMAGE", help="the image whose layers are the lowers")
    p.add_argument("--tag", "-t", metavar="NAME:TAG", help="add an image to the store: the lowers' layers + this one")
    p.add_argument("-o", "--output", metavar="OUT.tar", help="write the layer tar here")
    p.add_argument("-m", "--message", default="", help="history comment")
    p.add_argument("--created-by", default="cowfs commit", help="history CREATED BY text (default: cowfs commit)")
    p.add_argument("--userxattr", action="store_true", help="the upper's markers are user.overlay.* xattrs")
    p.add_argument("--clamp-mtime", type=int, metavar="SECONDS",
                   help="cap every mtime at this time (as SOURCE_DATE_EPOCH), for archives independent of when")

    _parser(subparsers, "ps", "list the container layers (cowfs mount IMAGE MOUNTPOINT made them)",
            "List the containers of the layer store: their image, mount point, and whether they are mounted.")

    p = _parser(subparsers, "rm", "remove container layers (refused while mounted)",
                "Delete containers' writable layers from the layer store.")
    p.add_argument("containers", nargs="+", metavar="CONTAINER", help="a container ID or a unique prefix of one")


def _store(args, create):
    root = args.store or default_store()
    if not create and not os.path.isdir(os.path.join(root, "layers")):
        raise StoreError(f"{root}: no layer store here (import an image first, or give --store)")
    return Store(root, create=create)


def run(args, out=None, err=None):
    """Run the image command in `args`; errors are one line `cowfs COMMAND: ...` on stderr and exit 1."""
    out = out if out is not None else sys.stdout
    err = err if err is not None else sys.stderr
    return reporting(lambda: _run(args, out, err), f"cowfs {args.command}", err)


def _run(args, out, err):
    cmd = args.command
    if cmd == "import":
        store = _store(args, create=True)
        import_archive(store, args.archive, name=args.name, out=out, err=err, progress=not args.quiet)
    elif cmd == "images":
        store = _store(args, create=False)
        rows, summary = list_images(store)
        print(table(rows, IMAGES_HEADER), file=out)
        print(summary, file=out)
    elif cmd == "history":
        store = _store(args, create=False)
        print(table(history_rows(store, store.resolve(args.image), args.no_trunc), HISTORY_HEADER), file=out)
    elif cmd == "inspect":
        store = _store(args, create=False)
        image_id = store.resolve(args.image)
        if args.format == "json":
            print(json.dumps([inspect(store, image_id)], indent=4), file=out)
        elif args.format == "layers":
            print(json.dumps(store.image_layers(image_id)), file=out)
        elif args.format == "lowerdir":
            print(lowerdir(store, image_id), file=out)
        else:
            print(image_id, file=out)
    elif cmd == "rmi":
        store = _store(args, create=False)
        status = 0
        used = images_in_use(store)
        for ref in args.images:
            try:
                image_id = store.resolve(ref)
                by_name = ref in store.repositories() or normalise_ref(ref) in store.repositories()
                if image_id in used and not (by_name and len(store.tags_of(image_id)) > 1):
                    raise StoreError(f"{ref}: image is used by container {used[image_id][0][:12]} "
                                     "(cowfs rm it first)")
                untagged, removed, layers = store.remove_image(ref)
            except StoreError as e:
                print(f"cowfs rmi: {one_line(e)}", file=err)
                status = 1
                continue
            for t in untagged:
                print(f"Untagged: {t}", file=out)
            if removed:
                print(f"Deleted: {removed}", file=out)
            for layer in layers:
                print(f"Deleted layer: {layer}", file=out)
        return status
    elif cmd == "commit":
        _commit(args, out)
    elif cmd == "ps":
        store = _store(args, create=False)
        rows = []
        for r in list_containers(store):
            mounted = container_mounted_at(r)
            tags = store.tags_of(r["Image"]) if os.path.exists(
                os.path.join(store.root, "images", r["Image"][7:] + ".json")) else []
            rows.append((r["Id"][:12], tags[0] if tags else r["Image"][7:19], ago(parse_time(r.get("Created"))),
                         f"mounted at {mounted}" if mounted else "not mounted", docker_size(tree_size(r["upper"]))))
        print(table(rows, ("CONTAINER ID", "IMAGE", "CREATED", "STATUS", "SIZE")), file=out)
    elif cmd == "rm":
        store = _store(args, create=False)
        status = 0
        for ref in args.containers:
            try:
                print(remove_container(store, ref), file=out)
            except StoreError as e:
                print(f"cowfs rm: {one_line(e)}", file=err)
                status = 1
        return status
    else:
        raise StoreError(f"unknown command {cmd!r}")
    return 0


def _commit(args, out):
    """`cowfs commit MOUNTPOINT|UPPERDIR`: a live cowfs mount gives its upper and lowers; a container's upper
    gives its store and image (the parent, unless --from or --lower say otherwise)."""
    from cowfs.daemon.mount import is_cowfs_mount
    from cowfs.overlay.stack import parse_options
    from cowfs.runtime import read_record
    lowers = [p for value in args.lower for p in split_layers(value) if p]
    upper, userxattr, from_image, store_root = args.upper, args.userxattr, args.from_image, args.store
    real = os.path.realpath(args.upper)
    if is_cowfs_mount(real):
        record = read_record(real)
        if record is None:
            raise StoreError(f"{args.upper}: a cowfs mount without a record in the runtime directory "
                             "(give its UPPERDIR instead)")
        stack = parse_options([record["options"]])
        if stack.upper is None:
            raise StoreError(f"{args.upper}: a read-only mount has no upper layer to commit")
        upper, userxattr = stack.upper, userxattr or stack.userxattr
        mount_lowers = stack.lowers
    else:
        mount_lowers = None
    container_store, container = container_of_upper(upper)
    if container is not None and not lowers and from_image is None:
        if store_root is None or os.path.realpath(store_root) == os.path.realpath(container_store):
            store_root = container_store
            try:
                Store(store_root, create=False).resolve(container["Image"])
                from_image = container["Image"]
            except StoreError:
                pass  # the image is gone: fall back to the mount's lowers
    if from_image is None and not lowers and mount_lowers is not None:
        lowers = mount_lowers
    store = None
    if args.tag or from_image:
        store = Store(store_root, create=False) if store_root else _store(args, create=False)
    commit(upper, lowers, out_path=args.output, store=store, tag=args.tag, from_image=from_image,
           prefix=USER_PREFIX if userxattr else TRUSTED_PREFIX, clamp_mtime=args.clamp_mtime,
           message=args.message, created_by=args.created_by, out=out)
