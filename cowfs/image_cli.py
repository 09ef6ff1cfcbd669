"""The image commands of the command line: import, images, history, inspect, rmi, commit.

`add_commands(subparsers)` adds them to the main parser's subparsers;
`run(args) -> exit code` runs the one chosen (args.command names it).
"""

import argparse
import json
import os
import sys

from .archive import ArchiveError
from .images import (HISTORY_HEADER, IMAGES_HEADER, commit, history_rows, import_archive, inspect, list_images,
                     lowerdir, table)
from .layerstore import Store, StoreError, default_store
from .whiteout import TRUSTED_PREFIX, USER_PREFIX

COMMANDS = ("import", "images", "history", "inspect", "rmi", "commit")

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
Layers still used by another image are kept.

examples:
  cowfs rmi acme/my-base-image:1.0
  cowfs rmi 3b1c7e5a0d2f
""",
    "commit": """\
Whiteouts become .wh.NAME entries, opaque directories get .wh..wh..opq, and a
directory renamed with redirect_dir=on is written with its whole merged
content. Entries are sorted and owners numeric, so committing the same upper
twice gives the same bytes. Prints the layer's diff ID.

examples:
  cowfs commit /c/upper --from acme/my-final-image:1.0 --tag acme/changed:1.0
  cowfs commit /c/upper --lower /img/l2 --lower /img/l1 -o layer.tar
  cowfs commit /c/upper --lower $(cowfs inspect --format lowerdir acme/app:1.0) --tag acme/app:2.0
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

    p = _parser(subparsers, "commit", "turn an upper directory into a layer tar and optionally an image",
                "Write the changes in an overlay upper directory as an OCI layer tar.")
    p.add_argument("upper", metavar="UPPERDIR")
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


def _store(args, create):
    root = args.store or default_store()
    if not create and not os.path.isdir(os.path.join(root, "layers")):
        raise StoreError(f"{root}: no layer store here (import an image first, or give --store)")
    return Store(root, create=create)


def run(args, out=None, err=None):
    """Run the image command in `args`; errors are one line on stderr and exit 1."""
    out = out if out is not None else sys.stdout
    err = err if err is not None else sys.stderr
    try:
        return _run(args, out, err)
    except (ArchiveError, StoreError) as e:
        print(f"cowfs {args.command}: {e}", file=err)
        return 1
    except BrokenPipeError:  # `cowfs history IMAGE | head`: the reader has what it wanted
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except (OSError, ValueError):
            pass
        return 0
    except OSError as e:
        where = f"{e.filename}: " if e.filename else ""
        print(f"cowfs {args.command}: {where}{e.strerror or e}", file=err)
        return 1


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
        for ref in args.images:
            try:
                untagged, removed, layers = store.remove_image(ref)
            except StoreError as e:
                print(f"cowfs rmi: {e}", file=err)
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
        lowers = [p for value in args.lower for p in value.split(":") if p]
        store = None
        if args.tag or args.from_image:
            store = _store(args, create=False)
        commit(args.upper, lowers, out_path=args.output, store=store, tag=args.tag, from_image=args.from_image,
               prefix=USER_PREFIX if args.userxattr else TRUSTED_PREFIX, clamp_mtime=args.clamp_mtime,
               message=args.message, created_by=args.created_by, out=out)
    else:
        raise StoreError(f"unknown command {cmd!r}")
    return 0
