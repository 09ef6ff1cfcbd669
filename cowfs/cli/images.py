"""The image commands of the command line: import, pull, push, login, logout, images, history, inspect, tag,
save, rmi, commit, ps, rm, export, system.

`add_commands(subparsers)` adds them to the main parser's subparsers;
`run(args) -> exit code` runs the one chosen (args.command names it).

Every one of them ends in one of four ways (the EXIT_STATUS epilog of each
--help): 0 done; 1 refused or failed, with one line on stderr (`reporting`);
2 a usage error; 128+N when signal N (SIGINT, SIGTERM, SIGHUP) stopped it,
with the line `cowfs COMMAND: interrupted` and the store as it was, or as
after the change when the signal came once it was made (see
cowfs.images.interrupts). A damaged store is one line too (StoreDamaged).
"""

import argparse
import errno
import json
import os
import shlex
import sys
import traceback

from cowfs.cli import report
from cowfs.cli.report import reporting
from cowfs.errors import CowfsError, one_line, os_error
from cowfs.formatting import ago, docker_size, table
from cowfs.images import interrupts
from cowfs.images.catalog import (
    HISTORY_HEADER,
    IMAGES_HEADER,
    history_records,
    history_table_rows,
    image_records,
    image_size,
    image_table_rows,
    images_summary,
    inspect,
    lowerdir,
)
from cowfs.images.commit import commit
from cowfs.images.containers import (
    container_mounted_at,
    container_named,
    container_of_upper,
    images_in_use,
    inspect_container,
    list_containers,
    remove_container,
)
from cowfs.images.importer import import_archive
from cowfs.images.saving import export_container, output_file, save_images
from cowfs.images.store import Store, StoreDamaged, StoreError, default_store, normalise_ref, parse_time
from cowfs.overlay.stack import split_layers
from cowfs.overlay.usage import tree_size
from cowfs.overlay.whiteout import TRUSTED_PREFIX, USER_PREFIX

COMMANDS = ("import", "pull", "push", "login", "logout", "images", "history", "inspect", "tag", "save", "rmi",
            "commit", "ps", "rm", "export",
            "system")

STORE_HELP = ("layer store directory (default: $COWFS_STORE, else /var/lib/cowfs for root, "
              "else $XDG_DATA_HOME/cowfs or ~/.local/share/cowfs)")

EXIT_STATUS = """\
exit status: 0 done; 1 refused or failed (one line on stderr says what and why);
2 a usage error; 128+N stopped by signal N (130 Ctrl-C, 143 SIGTERM, 129 SIGHUP),
with the line `cowfs {name}: interrupted` and the store as it was.
"""

EPILOGS = {
    "import": """\
formats: docker save archives (manifest.json; plain or gzip), OCI image layouts
(a directory or a tar with oci-layout, index.json, blobs/), and bare layer
tarballs (plain, gzip, zstd when available). Every stated digest is checked;
a hostile or broken archive is refused with one line and changes nothing.
ARCHIVE - reads the archive from stdin (as docker load does); stdin or a pipe
is copied to the store's tmp/ first, and that copy goes however the import
ends. Names (--name, the archive's tags) must be valid Docker references.
Stopped by Ctrl-C, SIGTERM or SIGHUP, the import changes nothing; after
SIGKILL or a crash, the next command that opens the store removes what it
left (or completes it, if it was past its commit point).
Output: a line per layer (unpacked, or already stored), then "Loaded image:
NAME" per name ("Loaded image ID: sha256:..." for an unnamed image); -q
prints only those last lines, as docker load -q does.

examples:
  cowfs import my-final-image.tar
  docker save alpine:3.19 | gzip > alpine.tar.gz && cowfs import alpine.tar.gz
  docker save alpine:3.19 | cowfs import -
  cowfs import ./oci-dir --name acme/app:1.0
  cowfs import rootfs.tar.zst --name acme/rootfs:latest
""",
    "pull": """\
Fetches the image's manifest (from an image index, the one for this
machine's platform, or --platform), its config, and only the layers the
store lacks, several at once: each is unpacked while it downloads, with its
blob digest, its size and its diff ID checked. All or nothing: a pull that
fails or is stopped (SIGKILL too) leaves the store as it was. A second pull
of the same image downloads no layer. Output as docker pull's: one line per
layer (redrawn in place on a terminal, a line per change of status
otherwise), then the digest and the name pulled; -q prints only the name.
Registries on loopback (localhost, 127.0.0.0/8, [::1]) are spoken to in
plain HTTP, as Docker does; others in HTTPS unless --insecure is given, or
was given to `cowfs login` (the store's registries.json). Logins are those
of `cowfs login`.

examples:
  cowfs pull 127.0.0.1:5000/acme/app:1.0
  cowfs pull registry.example.com/acme/app@sha256:0123...cdef
  cowfs pull --platform linux/arm64 127.0.0.1:5000/acme/app:1.0
  cowfs pull --insecure build-host:5000/acme/app:1.0
""",
    "push": """\
Sends the image NAME:TAG names (tag it so first: cowfs tag IMAGE NAME:TAG)
to the registry NAME names: for each layer, nothing when the registry has
it (HEAD), a cross-repository mount when another repository of that
registry is known to hold it (the store remembers where it pulled and
pushed blobs: distribution.json), else the layer's tar compressed with gzip
by cowfs, deterministically (the same layer always gives the same blob).
Then the config and a Docker schema 2 manifest (OCI when the registry
refuses that). Output as docker push's: a line per layer, then
"TAG: digest: sha256:... size: N".

examples:
  cowfs tag acme/app:1.0 127.0.0.1:5000/acme/app:1.0
  cowfs push 127.0.0.1:5000/acme/app:1.0
""",
    "login": """\
Checks the user name and password against REGISTRY (HTTP basic auth, or a
bearer token from the registry's token server, as it asks) and stores them
in the store's auth.json (mode 0600, the format of Docker's config.json and
of containers' auth.json: skopeo --authfile reads it). The password is
asked on a terminal, or read from stdin with --password-stdin. --insecure
records REGISTRY as spoken to in plain HTTP (registries.json).

examples:
  cowfs login 127.0.0.1:5000 -u alice
  echo "$PASSWORD" | cowfs login registry.example.com -u alice --password-stdin
  cowfs login --insecure build-host:5000 -u ci --password-stdin < token
""",
    "logout": """\
Removes the login stored for REGISTRY (the store's auth.json).

examples:
  cowfs logout 127.0.0.1:5000
""",
    "images": """\
Images are listed newest first (by their created time; those without one
last), as docker images lists them; --json and -q keep that order.
SHARED SIZE counts the layers an image shares with another image; the last
line says how much storing each layer once saves.

--json prints one JSON list, a dict per row: Repository, Tag ("<none>" when
untagged), ID (sha256:...), Created (RFC 3339 or null), Size, SharedSize,
UniqueSize (bytes). -q prints the image IDs alone (12 hex digits; full with
--no-trunc), one per row as docker images -q prints them (an image with two
tags twice).
--format TEMPLATE prints each row through a Go template, as docker images
--format does: fields .ID .Repository .Tag .Digest .CreatedSince .CreatedAt
.Size .SharedSize .UniqueSize .Containers (as the columns show them);
"table TEMPLATE" adds a header row and aligns the \\t-separated columns;
"json" prints one JSON object per line.

examples:
  cowfs images
  cowfs images --json | jq -r '.[] | "\\(.Repository):\\(.Tag) \\(.Size)"'
  cowfs images --format 'table {{.Repository}}\\t{{.Tag}}\\t{{.ID}}\\t{{.Size}}'
  cowfs rmi $(cowfs images -q)
""",
    "history": """\
--json prints one JSON list, newest first, a dict per step: ID (the image's
on the newest step, else "<missing>"), Created (RFC 3339 or null), CreatedBy
(whole), Size (bytes), Comment, EmptyLayer (true for a step that made no
layer). -q prints the IDs column alone.
--format TEMPLATE prints each step through a Go template, as docker history
--format does: fields .ID .CreatedSince .CreatedAt (RFC 3339) .CreatedBy .Size
.Comment (as the columns show them); "table TEMPLATE" and "json" as for
cowfs images.

examples:
  cowfs history acme/my-final-image:1.0
  cowfs history --json acme/my-final-image:1.0
  cowfs history --format '{{.Size}}\\t{{.CreatedBy}}' acme/my-final-image:1.0
""",
    "inspect": """\
formats: json (the default, as docker image inspect: a JSON list of one
object with Id, RepoTags, Created, Author, Architecture, Os, Config, Size,
GraphDriver, RootFS), layers (RootFS.Layers as a JSON list), lowerdir (the
layer directories, topmost first, for cowfs mount -o lowerdir=...), id, or
a Go template (any FORMAT with {{ in it), as docker image inspect --format:
its fields are the JSON object's keys ({{.Id}}, {{json .RootFS.Layers}},
{{index .RepoTags 0}}, {{range .RootFS.Layers}}{{println .}}{{end}}).

examples:
  cowfs inspect acme/my-final-image:1.0
  cowfs inspect --format layers acme/my-final-image:1.0
  cowfs inspect --format '{{.Id}} {{json .Config.Cmd}}' acme/my-final-image:1.0
  cowfs mount -o lowerdir=$(cowfs inspect --format lowerdir acme/app:1.0),upperdir=U,workdir=W /mnt
""",
    "tag": """\
SOURCE is an image's NAME[:TAG], its ID or a unique prefix of it; TARGET a
valid Docker reference NAME[:TAG] (":latest" when no tag), which then names
that image (moved from another image it named). Prints nothing, as docker
tag does.

examples:
  cowfs tag acme/app:1.0 acme/app:latest
  cowfs tag 3b1c7e5a0d2f registry.example.com:5000/acme/app:1.0
""",
    "save": """\
Writes a docker save archive (as docker save 25+: manifest.json, repositories,
and an OCI image layout, index.json, oci-layout and blobs/sha256/, over the same
uncompressed blobs) that docker load and cowfs import read. Names given are
the archive's RepoTags; an image given by ID alone has none.
To FILE (written next to it and renamed: a refused save leaves no FILE), or to
stdout when it is not a terminal. The store keeps layers unpacked: each layer
tar is written back from it, and must give its recorded diff ID; a layer
imported from a tar in another form than cowfs writes cannot, and its image is
refused with one line (docker load would refuse a mismatching layer).

examples:
  cowfs save acme/app:1.0 -o app.tar
  cowfs save acme/app:1.0 acme/base:1.0 | gzip > images.tar.gz
  cowfs save acme/app:1.0 | docker load
""",
    "export": """\
Writes the container's root filesystem as one tar, as docker export: its
image's layers with its upper on top, whiteouts and opaque directories
applied, read from the layers without mounting (mounted or not). To FILE
(written next to it and renamed), or to stdout when it is not a terminal.

examples:
  cowfs export 0f3c9e21a7b4 -o rootfs.tar
  cowfs export 0f3c9e21a7b4 | tar -t
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

A mount with redirect_dir=on or metacopy=on is committed as Docker's overlay2
commits then (it cannot read such an upper directly): the changes cowfs diff
lists, each added or changed path as the mount shows it, each deleted one as a
.wh. entry of mode 0, no opaque markers.

MOUNTPOINT is a live cowfs mount: its upper and lower layers come from the
mount; when it is a container of an image (cowfs mount IMAGE MOUNTPOINT), that
image is the parent (as --from IMAGE), so --tag makes the image's layers plus
the new one, as docker commit does. A container's ID (or a unique prefix, as
cowfs ps lists it) or its upper directory (STORE/containers/ID/upper) works
the same, mounted or not. The new image's parent is recorded (history and
inspect show it) and its history row says what docker commit records for a
container of that image: the image's Cmd. Any other directory is refused,
so that a typo never archives /etc: give it with --upper-dir DIR to say it is
an overlay upper directory. Without -o or --tag, only the diff ID is printed
(to compare an upper with a stored layer) and stderr says nothing was written.

examples:
  cowfs commit /mnt/app --tag acme/app:1.1 -m "configured"
  cowfs commit 0f3c9e21a7b4 acme/app:1.1
  cowfs commit --upper-dir /c/upper --from acme/my-final-image:1.0 --tag acme/changed:1.0
  cowfs commit --upper-dir /c/upper --lower /img/l2 --lower /img/l1 -o layer.tar
  cowfs commit --upper-dir /c/upper --lower $(cowfs inspect --format lowerdir acme/app:1.0) --tag acme/app:2.0
""",
    "ps": """\
--json prints one JSON list, a dict per container: ID, Image (sha256:...),
ImageName (as the IMAGE column), Created (RFC 3339), Mounted (true/false),
MountedAt (the mount point, or null), Size (bytes in its upper), VirtualSize
(those and its image's, as SIZE shows them, "2B (virtual 1.98MB)" as docker ps
-s), UpperDir.
-q prints the container IDs alone (12 hex digits; full with --no-trunc).
--format TEMPLATE prints each container through a Go template, as docker ps
--format does: fields .ID .Image .Command (its image's entrypoint and command,
quoted) .CreatedAt .RunningFor .Status .Size (as the columns show them) .Names
(empty: containers have no names) .Mounts (the mount point, or empty);
"table TEMPLATE" and "json" as for cowfs images.

examples:
  cowfs ps
  cowfs rm $(cowfs ps -q)
  cowfs ps --format '{{.ID}} {{.Image}} {{.Mounts}}'
""",
    "rm": """\
A mounted container is refused: cowfs umount its mount point first.

examples:
  cowfs rm 0f3c9e21a7b4
""",
    "system": """\
`cowfs system SUBCOMMAND --help` says what each one does and prints.

examples:
  cowfs system df
  cowfs system prune --dry-run
  cowfs system check --repair
""",
    "system df": """\
Images: stored images, ACTIVE those a container was made from; SIZE their
layers (each once), RECLAIMABLE what removing the inactive ones would free.
Containers: ACTIVE the mounted ones; SIZE the data in their uppers.
Layers: ACTIVE those an image or a live mount uses.
Leftovers: entries of the store's tmp/, ACTIVE those of running commands;
the others were left by interrupted ones (the next command removes them).

--json prints one JSON list, a dict per row: Type, Total, Active, Size,
Reclaimable (bytes). -q prints what makes up RECLAIMABLE, by ID: images no
container uses, containers not mounted, unused layers, tmp/NAME leftovers.

examples:
  cowfs system df
  cowfs system df --json
""",
    "system prune": """\
Removes, and lists: what interrupted commands left in tmp/, dangling images
(untagged, and no container made from them; with -a every image no container
was made from), layers no remaining image uses, and with --containers the
containers that are not mounted (their changes are lost). Asks nothing;
--dry-run lists what would go. Never removes a layer a live mount stacks.

examples:
  cowfs system prune --dry-run
  cowfs system prune
  cowfs system prune -a --containers
""",
    "system check": """\
Verifies store.json, repositories.json (valid references to stored images),
each image (its file's sha256 is its ID; its layers are stored), each layer
(layer.json names its diff ID; diff/ is there, holds the recorded size, and
its content digest, recorded at import, still matches: a file changed, added
or removed shows), each container (its record, its image, upper/ and work/),
and tmp/ (leftovers of interrupted commands). One line per problem on stdout,
then a summary; exit 1 when there is a problem.

--repair fixes what can be fixed without deleting anything an image, a
container or a live mount uses: removes leftovers and unused layers,
completes a transaction stopped past its commit point, drops tags naming
missing images, re-creates missing empty directories and store.json; it says
what it could not fix (exit 1 then).

examples:
  cowfs system check
  cowfs system check --repair
""",
}


class UsageError(CowfsError):
    """Options that do not go together: `cowfs COMMAND: MESSAGE (see ...)`, exit 2."""


def _epilog(name):
    return EPILOGS[name] + "\n" + EXIT_STATUS.format(name=name)


def _parser(sub, name, help_text, description, epilog_name=None):
    p = sub.add_parser(name, help=help_text, description=description, epilog=_epilog(epilog_name or name),
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--store", metavar="DIR", help=STORE_HELP)
    return p


def _output_options(p, what, no_trunc=True):
    shown = p.add_mutually_exclusive_group()
    shown.add_argument("--json", action="store_true", help="one JSON document, for scripts (keys below)")
    shown.add_argument("-q", "--quiet", action="store_true", help=f"only {what}")
    if no_trunc:
        p.add_argument("--no-trunc", action="store_true", help="do not shorten IDs")
    return shown


def add_commands(subparsers):
    """Add the image subcommands to an argparse subparsers object (made with dest="command")."""
    p = _parser(subparsers, "import", "import images from a docker save archive, an OCI layout or a layer tar",
                "Import every image of ARCHIVE (- for stdin) into the layer store (all or nothing).")
    p.add_argument("archive", metavar="ARCHIVE")
    p.add_argument("--name", metavar="NAME:TAG", help="name the image (the archive must hold exactly one)")
    p.add_argument("-q", "--quiet", action="store_true",
                   help="only the 'Loaded image' lines: no line per layer, no progress lines on stderr")

    p = _parser(subparsers, "pull", "download an image from a registry (as docker pull)",
                "Pull an image from a registry into the layer store (all or nothing).")
    p.add_argument("reference", metavar="NAME[:TAG|@DIGEST]")
    p.add_argument("--platform", metavar="OS/ARCH[/VARIANT]",
                   help="the platform to pick from an image index (default: this machine's)")
    p.add_argument("--insecure", action="store_true", help="plain HTTP, not HTTPS")
    p.add_argument("-q", "--quiet", action="store_true", help="only the name pulled: no line per layer")

    p = _parser(subparsers, "push", "upload an image to a registry (as docker push)",
                "Push an image of the layer store to a registry: only what the registry lacks is sent.")
    p.add_argument("reference", metavar="NAME[:TAG]")
    p.add_argument("--insecure", action="store_true", help="plain HTTP, not HTTPS")
    p.add_argument("-q", "--quiet", action="store_true", help="only the digest line: no line per layer")

    p = _parser(subparsers, "login", "log in to a registry (the login is stored for pull and push)",
                "Log in to a registry: the user name and password are checked, then stored.")
    p.add_argument("registry", metavar="REGISTRY", help="HOST[:PORT]")
    p.add_argument("-u", "--username", metavar="USER")
    p.add_argument("-p", "--password", metavar="PASSWORD", help="(visible to other users: prefer --password-stdin)")
    p.add_argument("--password-stdin", action="store_true", help="read the password from stdin")
    p.add_argument("--insecure", action="store_true", help="plain HTTP, not HTTPS (remembered for REGISTRY)")

    p = _parser(subparsers, "logout", "forget the login stored for a registry",
                "Remove the login stored for a registry.")
    p.add_argument("registry", metavar="REGISTRY", help="HOST[:PORT]")

    p = _parser(subparsers, "images", "list the images in the layer store",
                "List the stored images, with how much of each is shared with other images.")
    p.add_argument("reference", nargs="?", metavar="REPOSITORY[:TAG]",
                   help="only the images this names (shell wildcards allowed: 'acme/*', 'app:1.*')")
    p.add_argument("-a", "--all", action="store_true",
                   help="also the untagged parents kept for their children (docker images -a)")
    _format_option(_output_options(p, "the image IDs"), "row")

    p = _parser(subparsers, "history", "show the history of an image",
                "Show the steps an image was made by, newest first, with the size of each layer.")
    p.add_argument("image", metavar="IMAGE")
    _format_option(_output_options(p, "the IDs column", no_trunc=False), "step")
    p.add_argument("--no-trunc", action="store_true", help="do not shorten CREATED BY and IDs")

    p = _parser(subparsers, "inspect", "show an image's details (layers, config)",
                "Show an image's details, as docker image inspect.")
    p.add_argument("image", metavar="IMAGE")
    p.add_argument("--format", "-f", default="json", choices=_NamedOrTemplate(("json", "layers", "lowerdir", "id")),
                   metavar="FORMAT", help="what to print: json (the default), layers, lowerdir, id, or a Go "
                   "template such as '{{.Id}}' (see below)")

    p = _parser(subparsers, "tag", "give an image another name (as docker tag)",
                "Make TARGET name the image SOURCE names.")
    p.add_argument("source", metavar="SOURCE", help="NAME[:TAG], an image ID or a unique prefix of one")
    p.add_argument("target", metavar="TARGET", help="NAME[:TAG]")

    p = _parser(subparsers, "save", "write images to a docker save archive (as docker save)",
                "Save one or more images to a tar archive (to stdout when not a terminal), as docker save.")
    p.add_argument("images", nargs="+", metavar="IMAGE")
    p.add_argument("-o", "--output", metavar="FILE", help="write to FILE instead of stdout")

    p = _parser(subparsers, "rmi", "remove an image (layers used by other images are kept)",
                "Untag and remove images; layers no remaining image uses are deleted.")
    p.add_argument("images", nargs="+", metavar="IMAGE")

    p = _parser(subparsers, "commit", "turn a mount's upper layer into a layer tar and optionally an image",
                "Write the changes in a cowfs mount's upper layer, a container's upper directory or an "
                "overlay upper directory (--upper-dir) as an OCI layer tar.")
    p.add_argument("upper", nargs="?", metavar="MOUNTPOINT|CONTAINER")
    p.add_argument("repository", nargs="?", metavar="REPOSITORY[:TAG]",
                   help="name the new image, as --tag (docker commit CONTAINER REPOSITORY[:TAG])")
    p.add_argument("--upper-dir", metavar="DIR",
                   help="commit DIR, an overlay upper directory that is no cowfs mount nor container's upper")
    p.add_argument("--lower", action="append", default=[], metavar="DIR",
                   help="a lower layer, topmost first (repeat, or colon-separate); needed to expand "
                        "redirected directories and for --tag without --from")
    p.add_argument("--from", dest="from_image", metavar="IMAGE", help="the image whose layers are the lowers")
    p.add_argument("--tag", "-t", metavar="NAME:TAG", help="add an image to the store: the lowers' layers + this one")
    p.add_argument("-o", "--output", metavar="OUT.tar", help="write the layer tar here")
    p.add_argument("-m", "--message", default="", help="history comment")
    p.add_argument("--created-by", metavar="TEXT", help="history CREATED BY text (default: the image's Cmd, as "
                   "docker commit records a container's command; else 'cowfs commit')")
    p.add_argument("--userxattr", action="store_true", help="the upper's markers are user.overlay.* xattrs")
    p.add_argument("--clamp-mtime", type=int, metavar="SECONDS",
                   help="cap every mtime at this time (as SOURCE_DATE_EPOCH), for archives independent of when")

    p = _parser(subparsers, "ps", "list the container layers (cowfs mount IMAGE MOUNTPOINT made them)",
                "List the containers of the layer store: their image, mount point, and whether they are mounted.")
    _format_option(_output_options(p, "the container IDs"), "container")

    p = _parser(subparsers, "rm", "remove container layers (refused while mounted)",
                "Delete containers' writable layers from the layer store.")
    p.add_argument("containers", nargs="+", metavar="CONTAINER", help="a container ID or a unique prefix of one")

    p = _parser(subparsers, "export", "write a container's filesystem as a tar (as docker export)",
                "Export a container's merged root filesystem as a tar archive (to stdout when not a terminal).")
    p.add_argument("container", metavar="CONTAINER", help="a container ID or a unique prefix of one")
    p.add_argument("-o", "--output", metavar="FILE", help="write to FILE instead of stdout")

    p = _parser(subparsers, "system", "the layer store itself: disk usage (df), prune, check [--repair]",
                "Look after the layer store: what it holds and could free (df), remove what nothing uses "
                "(prune), verify it (check).")
    system = p.add_subparsers(dest="system_command", metavar="SUBCOMMAND", required=True)
    df = _system_parser(system, "df", "show what the store holds and what could be freed",
                        "Show the store's images, containers, layers and leftovers: how many, how many are in "
                        "use, their size, and how much could be freed (as docker system df).")
    _output_options(df, "the IDs of what could be freed", no_trunc=False)
    pr = _system_parser(system, "prune", "remove unused layers, dangling images and leftovers",
                        "Remove what nothing uses: leftovers of interrupted commands, dangling images, unused "
                        "layers, and with --containers the containers that are not mounted.")
    pr.add_argument("-a", "--all", action="store_true", help="remove every image no container was made from, "
                    "not only untagged ones")
    pr.add_argument("--containers", action="store_true", help="also remove the containers that are not mounted "
                    "(their changes are lost)")
    pr.add_argument("-n", "--dry-run", action="store_true", help="only list what would be removed")
    ck = _system_parser(system, "check", "verify the store; --repair fixes what is safe to fix",
                        "Verify every part of the layer store and print one line per problem.")
    ck.add_argument("--repair", action="store_true", help="fix what can be fixed without deleting anything in use")


def _system_parser(system, name, help_text, description):
    p = system.add_parser(name, help=help_text, description=description, epilog=_epilog(f"system {name}"),
                          formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--store", metavar="DIR", default=argparse.SUPPRESS, help=STORE_HELP)
    p.add_argument("--debug", dest="show_traceback", action="store_true", default=argparse.SUPPRESS,
                   help=argparse.SUPPRESS)
    return p


def _store(args, create, heal=True, strict=True):
    root = args.store or default_store()
    if not create and not os.path.isdir(os.path.join(root, "layers")):
        raise StoreError(f"{root}: no layer store here (import an image first, or give --store)")
    return Store(root, create=create, heal=heal, strict=strict)


def _name(args):
    return f"cowfs {args.command}" + (f" {args.system_command}" if args.command == "system" else "")


def _debugging():
    debugging = getattr(report, "debugging", None)
    return bool(debugging()) if debugging is not None else False


def run(args, out=None, err=None):
    """Run the image command in `args`; errors are one line `cowfs COMMAND: ...` on stderr and exit 1, a usage
    error exit 2, a signal (INT, TERM, HUP) `cowfs COMMAND: interrupted` and exit 128+N."""
    out = out if out is not None else sys.stdout
    err = err if err is not None else sys.stderr
    name = _name(args)
    try:  # outside the block too: a signal may come as the handlers go in, before reporting() runs
        with interrupts.handling():
            return reporting(lambda: _run_checked(args, out, err), name, err)
    except interrupts.Interrupted as e:
        _say(err, f"{name}: {e}", show_traceback=True)
        return e.status
    except _Usage as e:
        _say(err, f"{name}: {e.args[0]} (see '{name} --help')")
        return 2


class _Usage(BaseException):
    """A UsageError passed by `reporting` (which makes every CowfsError exit 1)."""


def _run_checked(args, out, err):
    try:
        return _run(args, out, err)
    except UsageError as e:
        raise _Usage(str(e)) from None


def _say(stream, line, show_traceback=False):
    try:
        if show_traceback and _debugging():
            traceback.print_exc(file=stream)
        print(line, file=stream, flush=True)
    except (OSError, ValueError):
        pass  # stderr is gone (SIGHUP: the terminal closed): the exit status says it


def _json(out, value):
    print(json.dumps(value, indent=2), file=out)


def _run(args, out, err):
    cmd = args.command
    if cmd == "import":
        store = _store(args, create=True)
        import_archive(store, args.archive, name=args.name, out=out, err=err, progress=not args.quiet,
                       quiet=args.quiet)
    elif cmd in ("pull", "push", "login", "logout"):
        return _registry(args, out, err)
    elif cmd == "images":
        store = _store(args, create=False)
        rows, summary = image_records(store, all_images=args.all, reference=args.reference)
        if args.json:
            _json(out, rows)
        elif args.quiet:
            for r in rows:  # one per row, as docker images -q: an image with two tags shows twice
                print(r["ID"] if args.no_trunc else r["ID"][7:19], file=out)
        elif _templated(args):
            out.write(_images_formatted(store, rows, args.format, args.no_trunc))
        else:
            print(table(image_table_rows(rows, args.no_trunc), IMAGES_HEADER), file=out)
            print(images_summary(summary), file=out)
    elif cmd == "history":
        store = _store(args, create=False)
        records = history_records(store, store.resolve(args.image))
        if args.json:
            _json(out, records)
        elif args.quiet:
            for r in records:
                print(r["ID"] if args.no_trunc or r["ID"] == "<missing>" else r["ID"][7:19], file=out)
        elif _templated(args):
            out.write(_history_formatted(records, args.format, args.no_trunc))
        else:
            print(table(history_table_rows(records, args.no_trunc), HISTORY_HEADER), file=out)
    elif cmd == "inspect":
        store = _store(args, create=False)
        image_id, container = _image_or_container(store, args.image)
        data = inspect(store, image_id) if container is None else inspect_container(store, container)
        if args.format == "json":
            print(json.dumps([data], indent=4), file=out)
        elif args.format == "layers":
            print(json.dumps(store.image_layers(image_id)), file=out)
        elif args.format == "lowerdir":
            print(lowerdir(store, image_id), file=out)
        elif args.format == "id":
            print(data["Id"], file=out)
        else:
            out.write(_inspect_formatted(data, args.format, "image" if container is None else "container"))
    elif cmd == "tag":
        store = _store(args, create=False)
        store.tag(args.source, args.target)
    elif cmd == "save":
        store = _store(args, create=False)
        _write_out(args, out, lambda f: save_images(store, args.images, f))
    elif cmd == "export":
        store = _store(args, create=False)
        _write_out(args, out, lambda f: export_container(store, args.container, f))
    elif cmd == "rmi":
        return _rmi(args, out, err)
    elif cmd == "commit":
        _commit(args, out, err)
    elif cmd == "ps":
        _ps(args, out)
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
    elif cmd == "system":
        return _system(args, out)
    else:
        raise StoreError(f"unknown command {cmd!r}")
    return 0


def _registry(args, out, err):
    from cowfs.images import registry

    cmd = args.command
    if cmd == "pull":
        registry.pull(_store(args, create=True), args.reference, platform=args.platform, insecure=args.insecure,
                      out=out, quiet=args.quiet)
    elif cmd == "push":
        digest = registry.push(_store(args, create=False), args.reference, insecure=args.insecure, out=out,
                               quiet=args.quiet)
        if args.quiet:
            print(digest, file=out)
    elif cmd == "login":
        user, password = _login_prompt(args)
        registry.login(_store(args, create=True), args.registry, user, password, insecure=args.insecure)
        print("Login Succeeded", file=out)
    else:
        store = _store(args, create=False)
        if registry.forget_credentials(store, args.registry):
            print(f"Removing login credentials for {args.registry}", file=out)
        else:
            print(f"Not logged in to {args.registry}", file=out)
    return 0


def _login_prompt(args):
    """(user, password) from the options, stdin (--password-stdin) or the terminal."""
    import getpass

    if args.password is not None and args.password_stdin:
        raise UsageError("--password and --password-stdin do not go together")
    user = args.username
    if user is None:
        if args.password_stdin or not sys.stdin.isatty():
            raise UsageError("give the user name (-u USER)")
        user = input("Username: ").strip()
    if args.password_stdin:
        password = sys.stdin.readline().rstrip("\r\n")
    elif args.password is not None:
        password = args.password
    elif sys.stdin.isatty():
        password = getpass.getpass("Password: ")
    else:
        raise UsageError("no password: give --password-stdin (or run on a terminal)")
    if not user or not password:
        raise UsageError("empty user name or password")
    return user, password


def _write_out(args, out, write):
    """Run write(binary file) on -o FILE (written next to it, renamed into place) or on stdout; stdout must
    not be a terminal (a tar there is garbage), as docker save and export refuse."""
    if args.output is not None:
        if args.output == "":
            raise os_error(errno.ENOENT, args.output)
        if os.path.isdir(args.output):
            raise os_error(errno.EISDIR, args.output)
        with output_file(args.output) as f:
            write(f)
        return
    isatty = getattr(out, "isatty", None)
    if isatty is not None and isatty():
        raise StoreError("refusing to write a tar archive to a terminal: give -o FILE or redirect stdout")
    binary = getattr(out, "buffer", None)
    if binary is None:
        raise StoreError("stdout is not a binary stream: give -o FILE")
    out.flush()
    write(binary)
    binary.flush()


def _rmi(args, out, err):
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
            untagged, removed, layers = store.remove_image(ref, keep=used)
        except StoreError as e:
            print(f"cowfs rmi: {one_line(e)}", file=err)
            status = 1
            continue
        for t in untagged:
            print(f"Untagged: {t}", file=out)
        for image_id in removed:
            print(f"Deleted: {image_id}", file=out)
        for layer in layers:
            print(f"Deleted layer: {layer}", file=out)
    return status


def _ps(args, out):
    store = _store(args, create=False)
    records = []
    for r in list_containers(store):
        mounted = container_mounted_at(r)
        stored = store.has_image(r["Image"])
        tags = store.tags_of(r["Image"]) if stored else []
        size = tree_size(r["upper"])
        records.append({"ID": r["Id"], "Image": r["Image"], "ImageName": tags[0] if tags else r["Image"][7:19],
                        "Created": r.get("Created"), "Mounted": mounted is not None, "MountedAt": mounted,
                        "Size": size, "VirtualSize": size + (image_size(store, r["Image"]) if stored else 0),
                        "UpperDir": r["upper"]})
    if args.json:
        _json(out, records)
    elif args.quiet:
        for r in records:
            print(r["ID"] if args.no_trunc else r["ID"][:12], file=out)
    elif _templated(args):
        out.write(_ps_formatted(store, records, args.format, args.no_trunc))
    else:
        print(table([_ps_cells(r, args.no_trunc) for r in records], PS_HEADER), file=out)


PS_HEADER = ("CONTAINER ID", "IMAGE", "CREATED", "STATUS", "SIZE")


def _ps_cells(r, no_trunc):
    """A row of the ps table (and what --format's fields of the same name show)."""
    return (r["ID"] if no_trunc else r["ID"][:12], r["ImageName"], ago(parse_time(r["Created"])),
            f"mounted at {r['MountedAt']}" if r["Mounted"] else "not mounted",
            f"{docker_size(r['Size'])} (virtual {docker_size(r['VirtualSize'])})")


def _system(args, out):
    from cowfs.images import maintenance
    sub = args.system_command
    if sub == "df":
        store = _store(args, create=False, heal=False)
        if args.quiet:
            for item in maintenance.reclaimable_ids(store):
                print(item, file=out)
            return 0
        records = maintenance.disk_usage(store)
        if args.json:
            _json(out, records)
        else:
            print(table(maintenance.df_table_rows(records), maintenance.DF_HEADER), file=out)
        return 0
    if sub == "prune":
        store = _store(args, create=False, heal=False)
        maintenance.prune(store, all_images=args.all, containers=args.containers, dry_run=args.dry_run, out=out)
        return 0
    store = _store(args, create=False, heal=False, strict=False)
    return maintenance.run_check(store, repair=args.repair, out=out)


def _commit(args, out, err):
    """`cowfs commit MOUNTPOINT|CONTAINER-UPPER` or `--upper-dir DIR`: a live cowfs mount gives its upper and
    lowers; a container's upper gives its store and image (the parent, unless --from or --lower say otherwise);
    any other directory only when --upper-dir says it is an overlay upper."""
    from cowfs.daemon.mount import is_cowfs_mount
    from cowfs.overlay.stack import parse_options
    from cowfs.runtime import read_record
    if args.upper is not None and args.upper_dir is not None:
        raise UsageError("give MOUNTPOINT or --upper-dir DIR, not both")
    if args.upper is None and args.upper_dir is None:
        raise UsageError("give the MOUNTPOINT (or container upper directory) to commit, or --upper-dir DIR")
    if args.repository is not None:
        if args.tag is not None:
            raise UsageError("give the new image's name once: REPOSITORY[:TAG] or --tag, not both")
        args.tag = args.repository
    given = args.upper if args.upper is not None else args.upper_dir
    named = container_named(args.store or default_store(), given) if args.upper is not None else None
    if named is not None:  # a container ID (or unique prefix), as docker commit takes it
        given = named[1]["upper"]
    if not os.path.isdir(given):
        raise os_error(errno.ENOTDIR if os.path.exists(given) else errno.ENOENT, given)
    lowers = [p for value in args.lower for p in split_layers(value) if p]
    naive = None
    upper, userxattr, from_image, store_root = given, args.userxattr, args.from_image, args.store
    real = os.path.realpath(given)
    mount_lowers = None
    if args.upper is not None and is_cowfs_mount(real):
        record = read_record(real)
        if record is None:
            raise StoreError(f"{given}: a cowfs mount without a record in the runtime directory "
                             "(give its upper directory with --upper-dir instead)")
        stack = parse_options([record["options"]])
        if stack.upper is None:
            raise StoreError(f"{given}: a read-only mount has no upper layer to commit")
        upper, userxattr = stack.upper, userxattr or stack.userxattr
        mount_lowers = stack.lowers
        if stack.redirect_dir == "on" or stack.metacopy:  # as Docker's overlay2 then: its "naive" diff
            from cowfs.explore.diff import changes
            naive = [(kind, path) for kind, path, _ in changes(stack)]
    container_store, container = container_of_upper(upper)
    if args.upper is not None and mount_lowers is None and container is None:
        raise StoreError(f"{given}: neither a cowfs mount nor a container's upper directory; to commit it "
                         f"anyway as an overlay upper directory: cowfs commit --upper-dir {shlex.quote(given)}")
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
           message=args.message, created_by=args.created_by, out=out, changes=naive)
    if args.output is None and args.tag is None:
        _say(err, "cowfs commit: nothing written (only the diff ID above): give -o FILE or --tag NAME:TAG to "
                  "keep the layer")


# -- --format TEMPLATE (cowfs.cli.template): each command's rows with the fields docker's formatter has --------
#
# {field: its column's header}, as docker/cli names them: the header row of "table ..." and, where cowfs's
# table has that column, where a field's value is taken from (so that it shows what the column shows).
IMAGES_FIELDS = {"ID": "IMAGE ID", "Repository": "REPOSITORY", "Tag": "TAG", "Digest": "DIGEST",
                 "CreatedSince": "CREATED", "CreatedAt": "CREATED AT", "Size": "SIZE", "SharedSize": "SHARED SIZE",
                 "UniqueSize": "UNIQUE SIZE", "Containers": "CONTAINERS"}
HISTORY_FIELDS = {"ID": "IMAGE", "CreatedSince": "CREATED", "CreatedAt": "CREATED AT", "CreatedBy": "CREATED BY",
                  "Size": "SIZE", "Comment": "COMMENT"}
PS_FIELDS = {"ID": "CONTAINER ID", "Image": "IMAGE", "Command": "COMMAND", "CreatedAt": "CREATED AT",
             "RunningFor": "CREATED", "Status": "STATUS", "Size": "SIZE", "Names": "NAMES", "Mounts": "MOUNTS"}


class _NamedOrTemplate(tuple):
    """inspect --format's choices: the named formats (which --help and completion list), or any Go template."""

    def __contains__(self, value):
        return super().__contains__(value) or "{{" in value


def _format_option(shown, what):
    """--format TEMPLATE, in the group of --json and -q (one of the three at a time)."""
    shown.add_argument("--format", metavar="TEMPLATE",
                       help=f"print each {what} through a Go template, as docker's --format (fields below)")


def _templated(args):
    """Whether --format gives a template ("table" alone asks for the usual table, as it does of docker)."""
    return args.format is not None and args.format != "table"


def _row(kind, fields):
    """A row for a template: a struct (asking for a field it lacks is an error), its fields sorted as docker
    marshals a row for {{json .}}."""
    from cowfs.cli.template import Record
    return Record(kind, dict(sorted(fields.items())))


def _as_columns(fields, header, cells):
    """{field: the cell of its column} for the `fields` that the table (`header`, a row's `cells`) shows."""
    shown = dict(zip(header, cells))
    return {field: shown[column] for field, column in fields.items() if column in shown}


def _images_formatted(store, rows, fmt, no_trunc):
    from cowfs.cli.template import format_rows, go_time
    used = images_in_use(store)
    formatted = []
    for r, cells in zip(rows, image_table_rows(rows, no_trunc)):
        fields = _as_columns(IMAGES_FIELDS, IMAGES_HEADER, cells)
        fields.update(Digest="<none>", CreatedAt=go_time(parse_time(r["Created"])),
                      Containers=str(len(used.get(r["ID"], []))))
        formatted.append(_row("images row", fields))
    return format_rows(fmt, formatted, IMAGES_FIELDS)


def _history_formatted(records, fmt, no_trunc):
    from cowfs.cli.template import format_rows, go_time
    formatted = []
    for r, cells in zip(records, history_table_rows(records, no_trunc)):
        fields = _as_columns(HISTORY_FIELDS, HISTORY_HEADER, cells)
        fields.update(CreatedAt=go_time(parse_time(r["Created"]), rfc3339=True))
        formatted.append(_row("history row", fields))
    return format_rows(fmt, formatted, HISTORY_FIELDS)


def _ps_formatted(store, records, fmt, no_trunc):
    from cowfs.cli.template import format_rows, go_quote, go_time
    formatted = []
    for r in records:
        command = _container_command(store, r["Image"])
        if not no_trunc and len(command) > 20:
            command = command[:19] + "…"  # as docker ps shortens it
        fields = _as_columns(PS_FIELDS, PS_HEADER, _ps_cells(r, no_trunc))
        fields.update(Command=go_quote(command), CreatedAt=go_time(parse_time(r["Created"])), Names="",
                      Mounts=r["MountedAt"] or "")
        formatted.append(_row("ps row", fields))
    return format_rows(fmt, formatted, PS_FIELDS)


def _container_command(store, image_id):
    """What docker ps shows as the COMMAND of a container of the image: its Entrypoint and Cmd, space-joined
    ("" when the image is gone or has neither)."""
    if not store.has_image(image_id):
        return ""
    config = store.config(image_id).get("config") or {}
    return " ".join(str(word) for key in ("Entrypoint", "Cmd") if isinstance(config.get(key), list)
                    for word in config[key])


def _inspect_formatted(data, fmt, kind):
    """inspect --format TEMPLATE: the template run on the object --format json prints (GraphDriver, RootFS and
    State structs, as in docker's ImageInspect and ContainerJSON; Config a map), and a newline."""
    from cowfs.cli.template import Record, render
    structs = {key: Record(key, data[key]) for key in ("GraphDriver", "RootFS", "State")
               if isinstance(data.get(key), dict)}
    return render(fmt, Record(kind, dict(data, **structs))) + "\n"


def _image_or_container(store, ref):
    """(image ID, None) for an image's name, ID or prefix; else (its image ID, record) for a container's ID or
    unique prefix, as docker inspect takes either. Neither: the image lookup's one-line error."""
    try:
        return store.resolve(ref), None
    except StoreDamaged:
        raise
    except StoreError:
        named = container_named(store.root, ref)
        if named is None:
            raise
        return named[1]["Image"], named[1]
