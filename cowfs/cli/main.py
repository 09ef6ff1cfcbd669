"""The cowfs command line: its parser, mount and umount, and `main(argv) -> exit code` (callable in-process)."""

import argparse
import os
import sys

from cowfs import __version__
from cowfs.cli import images as image_cli
from cowfs.cli.report import paths_as_bytes, reporting
from cowfs.errors import CowfsError, StackError
from cowfs.overlay.stack import (
    lowerdir_option,
    parse_options,
    split_options,
    unescape,
    upperdir_option,
)

DESCRIPTION = """\
cowfs stacks read-only layer directories under a writable upper directory,
exactly as Linux overlayfs (Docker's overlay2) does, as a FUSE filesystem.
A file is copied up to the upper on its first change; a deleted lower file
leaves a whiteout there. The upper stays readable by the kernel's overlay.
"""

MOUNT_EPILOG = """\
options (-o, comma-separated, as the kernel's overlay takes them):
  lowerdir=A:B:C      read-only layers, leftmost is topmost (required)
  upperdir=U          the writable layer (without it: a read-only mount)
  workdir=W           an empty directory on U's filesystem, for atomic steps
  redirect_dir=on|off rename directories that have lower parts (default off: EXDEV)
  metacopy=on         chmod/chown/utimes/rename copy metadata only; data follows at
                      the first write (implies redirect_dir=on)
  userxattr           keep overlay markers in user.overlay.* instead of trusted.overlay.*
  oci_whiteouts       read OCI .wh.NAME / .wh..wh..opq markers in lower layers
  volatile            never sync the upper (copy-ups, fsync): faster, but after a crash
                      throw the upper away; the next mount of W is refused until
                      W/work/incompat/volatile is removed, as with the kernel
  ro                  mount read-only; every change fails with EROFS
  allow_other         let other users in (the default when mounted by root)
  trace=FILE          the same as --trace FILE
  generic mount flags (rw, nosuid, nodev, noexec, noatime, sync, ...) apply to the
  mount; defaults, auto, _netdev, x-* and the like are accepted and ignored.

examples:
  cowfs mount -o lowerdir=/img/l2:/img/l1,upperdir=/c/upper,workdir=/c/work /mnt/merged
  cowfs mount /img/l2 /img/l1 --upper /c/upper /mnt/merged    (workdir made beside upper)
  mount -t fuse.cowfs cowfs /mnt/merged -o lowerdir=/img/l1,upperdir=/c/upper,workdir=/c/work
  cowfs mount /img/l1 --upper /c/upper --trace /tmp/events.jsonl /mnt/merged
        (one JSON line per copy-up, whiteout, ...)
  cowfs umount /mnt/merged

images (see cowfs import): IMAGE is NAME[:TAG] or an image ID of the layer store.
`cowfs mount IMAGE MOUNTPOINT` mounts the image's layers under a new container layer
kept in the store (STORE/containers/ID/upper), prints the container's ID, and keeps
the layer after unmounting: `cowfs commit MOUNTPOINT --tag NAME:TAG` makes it an
image, `cowfs rm ID` deletes it.
  cowfs mount acme/app:1.0 /mnt/app
  cowfs mount --store ./store 3b1c7e5a0d2f /mnt/app
"""

TOP_EPILOG = """\
examples:
  cowfs mount -o lowerdir=/img/l2:/img/l1,upperdir=/c/upper,workdir=/c/work /mnt/merged
  cowfs mount /img/l2 /img/l1 --upper /c/upper /mnt/merged
  cowfs umount /mnt/merged
  cowfs shell /img/l2 /img/l1                 a throwaway stack; every copy-up is shown as it happens
  cowfs diff --size /mnt/merged               the upper's changes, as docker diff lists them
  cowfs explain /mnt/merged/etc/hosts         which layer a file comes from, and why
  cowfs status                                the live mounts

`cowfs mount --help` lists the options (lowerdir, upperdir, workdir, redirect_dir, ...).
"""

COMMANDS = ("mount", "umount")  # the rest are added by build_parser(); see parser.commands

DIFF_EPILOG = """\
Each line is a change of the merged view against the lower layers alone, as
`docker diff` prints a container's: A added, C changed, D deleted. A deleted
directory is one D line; an added directory lists what it holds; a directory
renamed with redirect_dir=on is the new path (A, with its entries) and the old
one (D); an opaque directory over a lower one is C, with the lower entries it
hides as D. Upper directories that exist below are C (something in them changed).

examples:
  cowfs diff /mnt/merged                         a live cowfs (or kernel overlay) mount
  cowfs diff --size /mnt/merged                  with the bytes each change holds in the upper, and totals
  cowfs diff /c/upper --lower /img/l2 --lower /img/l1      an upper directory, lowers topmost first
  cowfs diff /c/upper -o lowerdir=/img/l2:/img/l1           the same, in the kernel's spelling
"""

EXPLAIN_EPILOG = """\
Layers are numbered as the stack lists them: 0 is the upper, 1..N the lowers,
topmost first (lowerdir=A:B: A is layer 1).

examples:
  cowfs explain /mnt/merged/etc/hosts
  cowfs explain --json /mnt/merged/app | jq .provided_by
"""

STATUS_EPILOG = """\
The number of copied-up objects comes from the mount's trace (cowfs mount
--trace) when there is one, else from the upper: non-directories there that a
lower layer also holds.

examples:
  cowfs status                   every live cowfs mount
  cowfs status /mnt/merged --json
"""

SHELL_EPILOG = """\
The stack is mounted with a trace in a temporary directory; each event
(copy-up, whiteout, ...) is printed as one line just before the next prompt,
so it never lands in the middle of what you type. On exit, the changes are
listed as `cowfs diff --size` lists them, the stack is unmounted and the
temporary directory removed (with --keep: the upper and the trace stay).
$SHELL (default /bin/sh) is started: bash, and POSIX shells such as dash, get
the prompt "(cowfs) DIR$ "; other shells get COWFS_SHELL=1 in the environment.

examples:
  cowfs shell scratch/demo/layers/4-chmod scratch/demo/layers/3-copy-app \\
              scratch/demo/layers/2-bash scratch/demo/layers/1-base
  cowfs shell -o lowerdir=/img/l2:/img/l1,redirect_dir=on
  cowfs shell /img/l1 --upper /tmp/my-upper --keep
  cowfs shell acme/app:1.0                   an image of the layer store (see cowfs import)
"""


def build_parser():
    parser = argparse.ArgumentParser(prog="cowfs", description=DESCRIPTION, epilog=TOP_EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"cowfs {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    m = sub.add_parser("mount", help="mount a stack of layers", description="Mount a stack of layers. "
                       "Returns once the mount is live; the daemon runs in the background.",
                       epilog=MOUNT_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    m.add_argument("-o", dest="options", action="append", default=[], metavar="OPTIONS",
                   help="mount options, as the kernel's overlay takes them (see below)")
    m.add_argument("-f", dest="foreground", action="store_true", help="stay in the foreground")
    m.add_argument("-d", dest="debug", action="store_true", help="FUSE debug output (implies -f)")
    m.add_argument("--upper", metavar="DIR", help="writable layer (created if missing)")
    m.add_argument("--work", metavar="DIR", help="workdir (default: UPPER.work beside the upper, created if missing)")
    m.add_argument("--trace", metavar="FILE", help="append every layer-changing event (copy-up, whiteout, opaque, "
                   "redirect, create, remove, rename) to FILE, one JSON line each")
    m.add_argument("--human-trace", dest="human_trace", metavar="FILE", help=argparse.SUPPRESS)  # cowfs shell's
    m.add_argument("--store", metavar="DIR", help="the layer store, for `cowfs mount IMAGE MOUNTPOINT` "
                   "(default: $COWFS_STORE, else /var/lib/cowfs for root, else ~/.local/share/cowfs)")
    m.add_argument("paths", nargs="+", metavar="LOWER... MOUNTPOINT",
                   help="lower layers, topmost first (or use -o lowerdir=), then the mount point; or an IMAGE "
                   "of the layer store (NAME:TAG or image ID) and the mount point")

    u = sub.add_parser("umount", help="unmount a cowfs mount and wait for its daemon to exit",
                       description="Unmount a cowfs mount (fusermount -u and umount work as well).")
    u.add_argument("mountpoint", metavar="MOUNTPOINT")
    _add_explore_parsers(sub)
    image_cli.add_commands(sub)
    parser.commands = tuple(sub.choices)
    return parser, m


def _add_explore_parsers(sub):
    """diff, explain, status, shell: looking at what copy-up did (cowfs/diff.py, explain.py, shell.py)."""
    raw = argparse.RawDescriptionHelpFormatter
    d = sub.add_parser("diff", help="the changes in the upper layer, as docker diff lists them", epilog=DIFF_EPILOG,
                       description="List what the upper layer changes: A added, C changed, D deleted.",
                       formatter_class=raw)
    d.add_argument("target", metavar="MOUNTPOINT|UPPERDIR")
    d.add_argument("--lower", action="append", default=[], metavar="DIR",
                   help="a lower layer of UPPERDIR, topmost first (repeat)")
    d.add_argument("-o", dest="options", action="append", default=[], metavar="OPTIONS",
                   help="the stack of UPPERDIR in the kernel's spelling: lowerdir=A:B[,userxattr][,oci_whiteouts]")
    d.add_argument("-s", "--size", action="store_true",
                   help="show the bytes each change holds in the upper, and the upper's total (as docker ps -s)")

    e = sub.add_parser("explain", help="which layer a path comes from, and why the others are hidden",
                       epilog=EXPLAIN_EPILOG, formatter_class=raw,
                       description="Explain where PATH, inside a mounted cowfs, comes from: the layer that provides "
                       "it, the layers that hold the name and why they are hidden, and whether it was copied up.")
    e.add_argument("path", metavar="PATH")
    e.add_argument("--json", action="store_true", help="one JSON object, for scripts")

    st = sub.add_parser("status", help="the live cowfs mounts, their layers, upper size and copy-ups",
                        epilog=STATUS_EPILOG, formatter_class=raw,
                        description="Show the live cowfs mounts (or one): layers, options, trace, the upper's size "
                        "and how many objects were copied up.")
    st.add_argument("mountpoint", nargs="?", metavar="MOUNTPOINT")
    st.add_argument("--json", action="store_true", help="a JSON list, for scripts")

    sh = sub.add_parser("shell", help="a throwaway stack and a shell inside it that shows every copy-up",
                        epilog=SHELL_EPILOG, formatter_class=raw,
                        description="Mount LAYERS (topmost first) over a fresh upper in a temporary directory and "
                        "start a shell in the merged view; each copy-up, whiteout, ... is shown as it happens.")
    sh.add_argument("layers", nargs="*", metavar="LAYER", help="lower layers, topmost first (or -o lowerdir=)")
    sh.add_argument("-o", dest="options", action="append", default=[], metavar="OPTIONS",
                    help="mount options, as for cowfs mount (lowerdir=..., redirect_dir=on, ...)")
    sh.add_argument("--upper", metavar="DIR", help="use this upper directory (kept) instead of a fresh one")
    sh.add_argument("--keep", action="store_true", help="keep the temporary upper and trace on exit")
    sh.add_argument("--store", metavar="DIR", help="the layer store, for `cowfs shell IMAGE`")


def _run_module(name, function="run"):
    """A runner that imports its module only when its command is used."""
    def run(args):
        import importlib
        return getattr(importlib.import_module(f"cowfs.explore.{name}"), function)(args)
    return run


# Commands other than mount and umount: name -> runner(args) -> exit code.
RUNNERS = {"diff": _run_module("diff"), "explain": _run_module("explain"),
           "status": _run_module("explain", "run_status"), "shell": _run_module("shell")}


def _mount_helper_form(argv, commands=COMMANDS):
    """`cowfs SOURCE MOUNTPOINT -o OPTS` as run by mount.fuse; rewritten to the mount command."""
    if not argv or argv[0] in commands or argv[0].startswith("-"):
        return argv
    positional = [a for i, a in enumerate(argv) if not a.startswith("-") and (i == 0 or argv[i - 1] != "-o")]
    if len(positional) != 2:
        return argv
    source, mountpoint = positional
    rest = [a for a in argv if a not in (source, mountpoint)]
    return ["mount", *rest, "--fsname-from-helper", source, mountpoint]


def _stack_from_args(args, parser):
    """The Stack, mount point and the directories made for it, from either spelling: `-o lowerdir=... MNT`,
    or `LOWER... --upper U MNT` (which makes U and its workdir when missing; deepest first in the list)."""
    paths = list(args.paths)
    if args.upper is None:
        if len(paths) != 1 and args.options:
            parser.error("with -o lowerdir=..., give only the mount point")
        if not args.options:
            if len(paths) < 2:
                parser.error("give -o lowerdir=... or LOWER... MOUNTPOINT")
            args.options = [lowerdir_option(paths[:-1])]
        return parse_options(args.options), paths[-1], []
    if len(paths) < 2:
        parser.error("give at least one LOWER and the MOUNTPOINT")
    upper = os.path.abspath(args.upper)
    work = os.path.abspath(args.work) if args.work else upper.rstrip("/") + ".work"
    opts = [lowerdir_option(paths[:-1]), upperdir_option(upper, work)]
    stack = parse_options(opts + args.options)
    made = _make_dirs(upper) + _make_dirs(work)
    return stack, paths[-1], made[::-1]


def _make_dirs(path):
    """Make `path` and its missing parents, as os.makedirs; return the directories made, parents first."""
    missing = []
    while not os.path.lexists(path):
        missing.insert(0, path)
        path = os.path.dirname(path)
    for d in missing:
        os.mkdir(d)
    return missing


def _remove_made(made):
    """After a refused mount: remove the (still empty) directories it made, and the staging directory a
    workdir got; a directory with anything else in it stays."""
    from cowfs.overlay.workdir import WORK_SUBDIR
    for d in made:
        for path in (os.path.join(d, WORK_SUBDIR), d):
            try:
                os.rmdir(path)
            except OSError:
                pass


def _image_form(args):
    """(store, image ID, ref) when the mount command reads `IMAGE MOUNTPOINT`, else None.

    Only with exactly two positionals, no -o lowerdir/upperdir/workdir and no --upper, and a first
    positional that is not an existing path but names an image of the store."""
    if len(args.paths) != 2 or args.upper is not None or args.work is not None:
        return None
    keys = {opt.partition("=")[0] for text in args.options for opt in split_options(text)}
    if keys & {"lowerdir", "upperdir", "workdir"}:
        return None
    from cowfs.images.catalog import looks_like_image
    from cowfs.images.store import Store, default_store
    root = args.store or default_store()
    image_id = looks_like_image(root, args.paths[0])
    if image_id is None:
        if args.store is not None and not os.path.exists(args.paths[0]):
            raise StackError(f"{args.paths[0]}: no such image in store {os.path.abspath(root)}, and no such layer "
                             "directory")
        return None
    return Store(root, create=False), image_id, args.paths[0]


def _mount_image(args, found, mounting):
    """`cowfs mount IMAGE MOUNTPOINT`: a new container layer in the store over the image's layers."""
    import shutil

    from cowfs.images.catalog import image_stack_options
    from cowfs.images.containers import create_container
    store, image_id, ref = found
    mountpoint = args.paths[1]
    opts = image_stack_options(store, image_id) + args.options
    mounting.unprivileged(parse_options(opts), quiet=True)  # refuse bad options before making anything
    if not os.path.isdir(mountpoint):
        raise StackError(f"mount point {mountpoint}: No such directory")
    record = create_container(store, image_id, ref, mountpoint)
    try:
        stack = parse_options(opts + [upperdir_option(record["upper"], record["work"])])
        if args.foreground or args.debug:
            print(record["Id"], flush=True)
        mounting.mount(stack, mountpoint, foreground=args.foreground, debug=args.debug, trace=args.trace,
                       human_trace=args.human_trace)
    except BaseException:
        if not (args.foreground or args.debug) or not os.listdir(record["upper"]):
            shutil.rmtree(os.path.dirname(record["upper"]), ignore_errors=True)
        raise
    if not (args.foreground or args.debug):
        print(record["Id"])


def _take_trace_option(args):
    """Move `trace=FILE` out of the -o strings (the stack knows nothing of it) into args.trace."""
    kept = []
    for text in args.options:
        parts = []
        for opt in split_options(text):
            key, has_value, value = opt.partition("=")
            if key == "trace" and has_value:
                if not value:
                    raise StackError("option 'trace' needs a value")
                args.trace = unescape(value)
            else:
                parts.append(opt)
        kept.append(",".join(parts))
    args.options = [k for k in kept if k]


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    paths_as_bytes()
    helper_source = None
    parser, mount_parser = build_parser()
    rewritten = _mount_helper_form(argv, parser.commands)
    if "--fsname-from-helper" in rewritten:
        i = rewritten.index("--fsname-from-helper")
        helper_source = rewritten[i + 1]
        del rewritten[i:i + 2]
    if rewritten and rewritten[0] == "mount":  # options may stand between LOWER... and MOUNTPOINT
        args = mount_parser.parse_intermixed_args(rewritten[1:])
        args.command = "mount"
    else:
        args = parser.parse_args(rewritten)
    if args.command is None:
        parser.print_help()
        return 2
    if args.command in image_cli.COMMANDS:
        return image_cli.run(args)
    return reporting(lambda: _run(args, mount_parser, helper_source))


def _run(args, mount_parser, helper_source):
    """Run mount, umount or an explore command; what it refuses is raised (CowfsError, OSError) for `reporting`."""
    from cowfs.daemon import mount as mounting
    if args.command == "mount":
        _take_trace_option(args)
        found = _image_form(args)
        if found is not None:
            _mount_image(args, found, mounting)
            return 0
        stack, mountpoint, made = _stack_from_args(args, mount_parser)
        if helper_source and helper_source != "cowfs" and "fsname=" not in ",".join(args.options):
            stack.fsname = helper_source
        try:
            mounting.mount(stack, mountpoint, foreground=args.foreground, debug=args.debug, trace=args.trace,
                           human_trace=args.human_trace)
        except (CowfsError, OSError):
            _remove_made(made)
            raise
    elif args.command == "umount":
        mounting.umount(args.mountpoint)
    else:
        return RUNNERS[args.command](args)
    return 0
