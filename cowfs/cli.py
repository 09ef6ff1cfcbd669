"""The cowfs command line: `main(argv) -> exit code`, callable in-process from tests."""

import argparse
import os
import sys

from . import __version__
from .errors import StackError
from .stack import parse_options

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
  userxattr           keep overlay markers in user.overlay.* instead of trusted.overlay.*
  oci_whiteouts       read OCI .wh.NAME / .wh..wh..opq markers in lower layers
  ro                  mount read-only; every change fails with EROFS
  allow_other         let other users in (the default when mounted by root)
  generic options such as rw, dev, suid, noatime are accepted and ignored.

examples:
  cowfs mount -o lowerdir=/img/l2:/img/l1,upperdir=/c/upper,workdir=/c/work /mnt/merged
  cowfs mount /img/l2 /img/l1 --upper /c/upper /mnt/merged    (workdir made beside upper)
  mount -t fuse.cowfs cowfs /mnt/merged -o lowerdir=/img/l1,upperdir=/c/upper,workdir=/c/work
  cowfs umount /mnt/merged
"""

TOP_EPILOG = """\
examples:
  cowfs mount -o lowerdir=/img/l2:/img/l1,upperdir=/c/upper,workdir=/c/work /mnt/merged
  cowfs mount /img/l2 /img/l1 --upper /c/upper /mnt/merged
  cowfs umount /mnt/merged

`cowfs mount --help` lists the options (lowerdir, upperdir, workdir, redirect_dir, ...).
"""

COMMANDS = ("mount", "umount")


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
    m.add_argument("paths", nargs="+", metavar="LOWER... MOUNTPOINT",
                   help="lower layers, topmost first (or use -o lowerdir=), then the mount point")

    u = sub.add_parser("umount", help="unmount a cowfs mount and wait for its daemon to exit",
                       description="Unmount a cowfs mount (fusermount -u and umount work as well).")
    u.add_argument("mountpoint", metavar="MOUNTPOINT")
    return parser, m


def _mount_helper_form(argv):
    """`cowfs SOURCE MOUNTPOINT -o OPTS` as run by mount.fuse; rewritten to the mount command."""
    if not argv or argv[0] in COMMANDS or argv[0].startswith("-"):
        return argv
    positional = [a for i, a in enumerate(argv) if not a.startswith("-") and (i == 0 or argv[i - 1] != "-o")]
    if len(positional) != 2:
        return argv
    source, mountpoint = positional
    rest = [a for a in argv if a not in (source, mountpoint)]
    return ["mount", *rest, "--fsname-from-helper", source, mountpoint]


def _stack_from_args(args, parser):
    """The Stack and mount point from either spelling: `-o lowerdir=... MNT` or `LOWER... --upper U MNT`."""
    paths = list(args.paths)
    if args.upper is None:
        if len(paths) != 1 and args.options:
            parser.error("with -o lowerdir=..., give only the mount point")
        if not args.options:
            if len(paths) < 2:
                parser.error("give -o lowerdir=... or LOWER... MOUNTPOINT")
            args.options = ["lowerdir=" + ":".join(p.replace(":", "\\:") for p in paths[:-1])]
        return parse_options(args.options), paths[-1]
    if len(paths) < 2:
        parser.error("give at least one LOWER and the MOUNTPOINT")
    upper = os.path.abspath(args.upper)
    work = os.path.abspath(args.work) if args.work else upper.rstrip("/") + ".work"
    for d in (upper, work):
        os.makedirs(d, exist_ok=True)
    opts = ["lowerdir=" + ":".join(p.replace(":", "\\:") for p in paths[:-1]),
            f"upperdir={upper.replace(',', chr(92) + ',')},workdir={work.replace(',', chr(92) + ',')}"]
    return parse_options(opts + args.options), paths[-1]


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    helper_source = None
    rewritten = _mount_helper_form(argv)
    if "--fsname-from-helper" in rewritten:
        i = rewritten.index("--fsname-from-helper")
        helper_source = rewritten[i + 1]
        del rewritten[i:i + 2]
    parser, mount_parser = build_parser()
    if rewritten and rewritten[0] == "mount":  # options may stand between LOWER... and MOUNTPOINT
        args = mount_parser.parse_intermixed_args(rewritten[1:])
        args.command = "mount"
    else:
        args = parser.parse_args(rewritten)
    if args.command is None:
        parser.print_help()
        return 2
    from . import mount as mounting
    try:
        if args.command == "mount":
            stack, mountpoint = _stack_from_args(args, mount_parser)
            if helper_source and helper_source != "cowfs" and "fsname=" not in ",".join(args.options):
                stack.fsname = helper_source
            mounting.mount(stack, mountpoint, foreground=args.foreground, debug=args.debug)
        elif args.command == "umount":
            mounting.umount(args.mountpoint)
    except StackError as e:
        print(f"cowfs: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        where = f"{e.filename}: " if e.filename else ""
        print(f"cowfs: {where}{e.strerror or e}", file=sys.stderr)
        return 1
    return 0
