"""The cowfs command line: its parser, mount and umount, and `main(argv) -> exit code` (callable in-process)."""

import argparse
import os
import sys

from cowfs import __version__
from cowfs.cli.report import paths_as_bytes, reporting, stopping_on_signals
from cowfs.errors import StackError

# Imported where used, not here: the image commands (cowfs.cli.images and the store behind it) and the engine
# (cowfs.overlay.stack), which `cowfs umount` never needs and `cowfs mount` needs only in part; each
# `cowfs mount`/`umount` pays for every module imported at start.

DESCRIPTION = """\
cowfs stacks read-only layer directories under a writable upper directory,
exactly as Linux overlayfs (Docker's overlay2) does, as a FUSE filesystem.
A file is copied up to the upper on its first change; a deleted lower file
leaves a whiteout there. The upper stays readable by the kernel's overlay.
"""

MOUNT_EPILOG = """\
options (-o, comma-separated, as the kernel's overlay takes them):
  lowerdir=A:B:C      read-only layers, leftmost is topmost (required)
  lowerdir+=A         one read-only layer, as it is spelt (no escapes; repeat it,
                      topmost first); not after lowerdir=
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
  verity=on|require   with metacopy=on: record the fs-verity digest of a lower file's
                      data in its metadata-only copy, and check it before the data
                      is used (EIO if it differs); require: a metacopy file without
                      a digest fails with EIO, and a file whose data has none is
                      copied whole
  uuid=on|off|null|auto
                      as the kernel: the UUID origins carry (off: null, all layers
                      on one filesystem) and overlay.uuid on the upper root (on;
                      auto: on a new upper)
  xino=on|off|auto    inode numbers over several filesystems: the kernel's xino
                      numbers (off too: FUSE has one st_dev for all files)
  nfs_export=off      accepted; nfs_export=on is refused
  ro                  mount read-only; every change fails with EROFS
  allow_other         let other users in (the default when mounted by root)
  trace=FILE          the same as --trace FILE
  generic mount flags (rw, nosuid, nodev, noexec, noatime, sync, ...) apply to the
  mount; defaults, auto, _netdev, x-* and the like are accepted and ignored.

The layers are given in one of two spellings, not both: the kernel's
(-o lowerdir=...[,upperdir=U,workdir=W] MOUNTPOINT), or LOWER... [--upper U
[--work W]] MOUNTPOINT. Every other option (ro, redirect_dir=on, ...) goes
with either. Refused: LOWER... with -o lowerdir= (or upperdir=, workdir=),
--upper with -o upperdir=, --work without --upper, the same layer twice.

examples:
  cowfs mount /img/l2 /img/l1 --upper /c/upper /mnt/merged    (workdir made beside upper)
  cowfs mount -o lowerdir=/img/l2:/img/l1,upperdir=/c/upper,workdir=/c/work /mnt/merged
  cowfs mount /img/l2 /img/l1 -o ro /mnt/merged                (a read-only view)
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

COMMANDS = ("mount", "umount")  # the rest are added by build_parser(); see parser.commands

DIFF_EPILOG = """\
Each line is a change of the merged view against the lower layers alone, as
`docker diff` prints a container's: A added, C changed, D deleted. A deleted
directory is one D line; an added directory lists what it holds; a directory
renamed with redirect_dir=on is the new path (A, with its entries) and the old
one (D); an opaque directory over a lower one is C, with the lower entries it
hides as D. Upper directories that exist below are C (something in them changed).

--json prints one JSON object, with these keys always:
  target        the MOUNTPOINT|UPPERDIR given
  upper         the upper directory
  lowers        the lower layers, topmost first
  changes       a list of {"kind": "A"|"C"|"D", "path": "/etc/hosts", "size": BYTES or null},
                size being what the upper holds for it (null for directories and deletions)
  upper_size    with --size: the upper's bytes (else null)
  virtual_size  with --size: the upper's and the lowers' bytes (else null)
-q prints the changed paths alone, one a line.

examples:
  cowfs diff /mnt/merged                         a live cowfs (or kernel overlay) mount
  cowfs diff --size /mnt/merged                  with the bytes each change holds in the upper, and totals
  cowfs diff /c/upper --lower /img/l2 --lower /img/l1      an upper directory, lowers topmost first
  cowfs diff /c/upper -o lowerdir=/img/l2:/img/l1           the same, in the kernel's spelling
  cowfs diff 0f3c9e21a7b4                        a container of the layer store (cowfs ps), as docker diff
"""

EXPLAIN_EPILOG = """\
Layers are numbered as the stack lists them: 0 is the upper, 1..N the lowers,
topmost first (lowerdir=A:B: A is layer 1).

--json prints one JSON object, with these keys always:
  path, mountpoint  the merged path, and the mount it is in
  exists            whether the merged view shows it
  provided_by       the layer number it is read from (null when it does not exist)
  kind              file, dir, symlink, ... (null when it does not exist)
  copied_up         whether the upper holds a copy of a lower object
  copied_from       the layer it was copied up from (or null)
  copy_up           the trace's copy-up event (or null)
  history           the trace's events about the path (a list; empty without a trace)
  summary           the line the text output starts with
  layers            one object per layer: layer, name, root, entry (its path there, or null),
                    kind, size, role (provides, merged, hidden, whiteout, absent), reason (or null)

examples:
  cowfs explain /mnt/merged/etc/hosts
  cowfs explain --json /mnt/merged/app | jq .provided_by
"""

STATUS_EPILOG = """\
The number of copied-up objects comes from the mount's trace (cowfs mount
--trace) when there is one, else from the upper: non-directories there that a
lower layer also holds.

--json prints a list with one object per mount, with these keys always:
  mountpoint, pid, upper, work, lowers, options, trace, and, for the upper's
  sake (null for a read-only mount): upper_size (bytes), copied_up_files,
  copied_up_dirs (null when counted without a trace), copied_up_source ("trace" or "upper").
-q prints the mount points alone, one a line.

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


COMPLETION_EPILOG = """\
The script completes the commands, their options, directories where a
command takes a directory, files where it takes a file, live cowfs mounts for
umount, and the images of the layer store where a command takes an IMAGE
(asked of `cowfs __complete images`, which reads the store's index only).

examples:
  cowfs completion bash > /etc/bash_completion.d/cowfs
  source <(cowfs completion bash)            in ~/.bashrc
  source <(cowfs completion zsh)             in ~/.zshrc
"""

# How `cowfs --help` groups the commands: as a user thinks of them. The image commands are whatever
# cowfs/cli/images.py registers (image_cli.COMMANDS), except the maintenance ones named here.
MAINTENANCE = ("system", "completion")
GROUPS = (("mounts", ("mount", "umount")), ("exploring", ("diff", "explain", "status", "shell")))

# The example shown for a command in `cowfs --help`; other commands show the first of their --help's examples.
EXAMPLES = {
    "mount": "cowfs mount /img/l2 /img/l1 --upper /c/upper /mnt/merged",
    "umount": "cowfs umount /mnt/merged",
    "diff": "cowfs diff --size /mnt/merged",
    "explain": "cowfs explain /mnt/merged/etc/hosts",
    "status": "cowfs status",
    "shell": "cowfs shell /img/l2 /img/l1",
    "completion": "source <(cowfs completion bash)",
}

EXIT_STATUS = """\
exit status: 0 done; 1 refused or failed (one line on stderr says what and why);
2 a usage error; 128+N killed by signal N (130: interrupted, Ctrl-C).
`cowfs COMMAND --help` shows a command's options and examples; `cowfs mount --help`
the mount options (lowerdir, upperdir, workdir, redirect_dir, ...)."""


def _one_line(text):
    return " ".join(str(text).split()) if "\n" in str(text) or "\r" in str(text) else str(text)


class UsageError(Exception):
    """A command line that cannot be run as given; main() prints its one line and returns 2."""


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors are one line on stderr (`cowfs mount: MESSAGE (...)`), exit 2."""

    def error(self, message):
        raise UsageError(f"{self.prog}: {_one_line(message)} (see '{self.prog} --help')")


class TopParser(Parser):
    """The `cowfs` parser: its --help lists the commands in groups, each with an example."""

    def format_help(self):
        sub = self.commands_action
        helps = {a.dest: a.help for a in sub._choices_actions}
        lines = ["usage: cowfs [--debug] COMMAND [ARGS...]",
                 "       cowfs SOURCE MOUNTPOINT -o OPTIONS     (as mount -t fuse.cowfs runs it)", "",
                 DESCRIPTION.rstrip(), ""]
        width = max(len(name) for name in helps) + 2
        for title, names in command_groups(self):
            lines.append(f"{title}:")
            for name in names:
                lines.append(f"  {name:<{width}}{helps.get(name) or ''}")
                example = command_example(self, name)
                if example:
                    lines.append(f"  {'':<{width}}  {example}")
            lines.append("")
        lines += ["options:",
                  "  -h, --help    show this help and exit",
                  "  --version     show the version and exit",
                  "  --debug       on an error, also show the Python traceback (as COWFS_DEBUG=1 does)", "",
                  EXIT_STATUS, ""]
        return "\n".join(lines)


def command_groups(parser):
    """[(title, [command, ...])] as `cowfs --help` lists them; every command of the parser is in one group."""
    from cowfs.cli import images as image_cli
    names = list(parser.commands)
    groups = [(title, [n for n in members if n in names]) for title, members in GROUPS]
    images = [n for n in image_cli.COMMANDS if n in names and n not in MAINTENANCE]
    grouped = {n for _, members in groups for n in members} | set(images)
    maintenance = [n for n in MAINTENANCE if n in names] + [n for n in names if n not in grouped
                                                             and n not in MAINTENANCE]
    return groups + [("images", images), ("maintenance", maintenance)]


def command_example(parser, name):
    """One example line for `name`: EXAMPLES, else the first `cowfs NAME ...` line of its --help's examples."""
    if name in EXAMPLES:
        return EXAMPLES[name]
    epilog = parser.commands_action.choices[name].epilog or ""
    in_examples = False
    for line in epilog.splitlines():
        if line.strip().lower() in ("example:", "examples:"):
            in_examples = True
        elif in_examples and line.strip().startswith(f"cowfs {name}") and not line.rstrip().endswith("\\"):
            return line.strip().split("   ")[0].rstrip()
    return None


def build_parser(only_mounts=False):
    """(the `cowfs` parser, its `mount` subparser); parser.commands lists the command names.

    With `only_mounts`, the parser has the mount and umount commands alone (what `cowfs mount ...` and
    `cowfs umount ...` parse with): the others' parsers, and the image commands' imports, cost every mount."""
    parser = TopParser(prog="cowfs", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"cowfs {__version__}")
    parser.add_argument("--debug", dest="show_traceback", action="store_true",
                        help="on an error, also show the Python traceback (as COWFS_DEBUG=1 does)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    parser.commands_action = sub

    m = sub.add_parser("mount", help="mount a stack of layers", description="Mount a stack of layers. "
                       "Returns once the mount is live; the daemon runs in the background.",
                       epilog=MOUNT_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    m.add_argument("-o", dest="options", action="append", default=[], metavar="OPTIONS",
                   help="mount options, as the kernel's overlay takes them (see below)")
    m.add_argument("-f", dest="foreground", action="store_true", help="stay in the foreground")
    m.add_argument("-d", dest="debug", action="store_true", help="FUSE debug output (implies -f)")
    m.add_argument("--upper", metavar="DIR", help="writable layer (created if missing)")
    m.add_argument("--work", metavar="DIR", help="workdir (default: UPPER.work beside the upper, created if "
                   "missing); only with --upper")
    m.add_argument("--trace", metavar="FILE", help="append every layer-changing event (copy-up, whiteout, opaque, "
                   "redirect, create, remove, rename) to FILE, one JSON line each")
    m.add_argument("--human-trace", dest="human_trace", metavar="FILE", help=argparse.SUPPRESS)  # cowfs shell's
    m.add_argument("--store", metavar="DIR", help="the layer store, for `cowfs mount IMAGE MOUNTPOINT` "
                   "(default: $COWFS_STORE, else /var/lib/cowfs for root, else ~/.local/share/cowfs)")
    m.add_argument("paths", nargs="+", metavar="LOWER... MOUNTPOINT",
                   help="lower layers, topmost first (or use -o lowerdir=), then the mount point; or an IMAGE "
                   "of the layer store (NAME:TAG or image ID) and the mount point")

    u = sub.add_parser("umount", help="unmount a cowfs mount and wait for its daemon to exit",
                       description="Unmount a cowfs mount (fusermount -u and umount work as well).",
                       epilog="example:\n  cowfs umount /mnt/merged\n",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    u.add_argument("mountpoint", metavar="MOUNTPOINT")
    if not only_mounts:
        from cowfs.cli import images as image_cli
        _add_explore_parsers(sub)
        image_cli.add_commands(sub)
        c = sub.add_parser("completion", help="print a shell completion script (bash, zsh)",
                           description="Print a script that makes the shell complete cowfs's commands, options, "
                           "paths and image names.", epilog=COMPLETION_EPILOG,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        c.add_argument("shell", choices=("bash", "zsh"), help="the shell to complete in")
    parser.commands = tuple(sub.choices)
    for command in sub.choices.values():  # `cowfs COMMAND ... --debug` works too (shown in `cowfs --help`)
        if "--debug" not in command._option_string_actions:
            command.add_argument("--debug", dest="show_traceback", action="store_true", help=argparse.SUPPRESS)
    return parser, m


def _add_explore_parsers(sub):
    """diff, explain, status, shell: looking at what copy-up did (cowfs/diff.py, explain.py, shell.py)."""
    raw = argparse.RawDescriptionHelpFormatter
    d = sub.add_parser("diff", help="the changes in the upper layer, as docker diff lists them", epilog=DIFF_EPILOG,
                       description="List what the upper layer changes: A added, C changed, D deleted.",
                       formatter_class=raw)
    d.add_argument("target", metavar="MOUNTPOINT|UPPERDIR|CONTAINER")
    d.add_argument("--store", metavar="DIR", help="the layer store of CONTAINER (default: $COWFS_STORE, else the "
                   "user's store, as for the image commands)")
    d.add_argument("--lower", action="append", default=[], metavar="DIR",
                   help="a lower layer of UPPERDIR, topmost first (repeat)")
    d.add_argument("-o", dest="options", action="append", default=[], metavar="OPTIONS",
                   help="the stack of UPPERDIR in the kernel's spelling: lowerdir=A:B[,userxattr][,oci_whiteouts]")
    d.add_argument("-s", "--size", action="store_true",
                   help="show the bytes each change holds in the upper, and the upper's total (as docker ps -s)")
    shown = d.add_mutually_exclusive_group()
    shown.add_argument("--json", action="store_true", help="one JSON object, for scripts (keys below)")
    shown.add_argument("-q", "--quiet", action="store_true", help="the changed paths alone, one a line")

    e = sub.add_parser("explain", help="which layer a path comes from, and why the others are hidden",
                       epilog=EXPLAIN_EPILOG, formatter_class=raw,
                       description="Explain where PATH, inside a mounted cowfs, comes from: the layer that provides "
                       "it, the layers that hold the name and why they are hidden, and whether it was copied up.")
    e.add_argument("path", metavar="PATH")
    e.add_argument("--json", action="store_true", help="one JSON object, for scripts (keys below)")

    st = sub.add_parser("status", help="the live cowfs mounts, their layers, upper size and copy-ups",
                        epilog=STATUS_EPILOG, formatter_class=raw,
                        description="Show the live cowfs mounts (or one): layers, options, trace, the upper's size "
                        "and how many objects were copied up.")
    st.add_argument("mountpoint", nargs="?", metavar="MOUNTPOINT")
    shown = st.add_mutually_exclusive_group()
    shown.add_argument("--json", action="store_true", help="a JSON list, for scripts (keys below)")
    shown.add_argument("-q", "--quiet", action="store_true", help="the mount points alone, one a line")

    sh = sub.add_parser("shell", help="a throwaway stack and a shell inside it that shows every copy-up",
                        epilog=SHELL_EPILOG, formatter_class=raw,
                        description="Mount LAYERS (topmost first) over a fresh upper in a temporary directory and "
                        "start a shell in the merged view; each copy-up, whiteout, ... is shown as it happens. "
                        "Exits with the shell's exit status.")
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


def _run_completion(args):
    from cowfs.cli.completion import script
    sys.stdout.write(script(build_parser()[0], args.shell))
    sys.stdout.flush()
    return 0


# Commands other than mount, umount and the image commands: name -> runner(args) -> exit code.
def _run_diff(args):
    """diff of a MOUNTPOINT or UPPERDIR, or of a container by ID (as docker diff): its mount point when
    mounted, else its upper over its image's layers."""
    from cowfs.images.containers import container_mounted_at, container_named
    from cowfs.images.store import default_store
    named = None
    if not args.lower and not args.options:
        named = container_named(args.store or default_store(), args.target)
    if named is not None:
        from cowfs.images.catalog import image_stack_options
        store, record = named
        mounted = container_mounted_at(record)
        if mounted is not None:
            args.target = mounted
        else:
            args.target, args.options = record["upper"], image_stack_options(store, record["Image"])
    return _run_module("diff")(args)


RUNNERS = {"diff": _run_diff, "explain": _run_module("explain"),
           "status": _run_module("explain", "run_status"), "shell": _run_module("shell"),
           "completion": _run_completion}


# -- the command line's two shapes: `cowfs COMMAND ...` and mount(8)'s `cowfs SOURCE MOUNTPOINT -o OPTS` -------

def _gives_options(argv):
    """Whether `argv` has a -o (as `-o OPTS` or `-oOPTS`), as mount(8)'s helper call always has."""
    return any(a == "-o" or (a.startswith("-o") and not a.startswith("--")) for a in argv)


def _mount_helper_form(argv, commands=COMMANDS):
    """`cowfs SOURCE MOUNTPOINT -o OPTS` as mount.fuse runs it, rewritten to the mount command; else None.

    Taken only when it looks like mount(8)'s call: a first word that is no command, exactly two words
    besides the options, and a -o."""
    if not argv or argv[0] in commands or argv[0].startswith("-") or not _gives_options(argv):
        return None
    positional = [a for i, a in enumerate(argv) if not a.startswith("-") and (i == 0 or argv[i - 1] != "-o")]
    if len(positional) != 2:
        return None
    source, mountpoint = positional
    rest = [a for a in argv if a not in (source, mountpoint)]
    return ["mount", *rest, "--fsname-from-helper", source, mountpoint]


def _not_a_command(word, commands):
    """`cowfs WORD ...` where WORD is no command: one line naming the closest command, exit 2."""
    import difflib
    close = difflib.get_close_matches(word, commands, n=1, cutoff=0.6)
    hint = f"did you mean '{close[0]}'?" if close else "see 'cowfs --help'"
    raise UsageError(f"cowfs: '{_one_line(word)}' is not a cowfs command; {hint}")


# -- mount's command line ------------------------------------------------------------------------

LAYER_KEYS = ("lowerdir", "upperdir", "workdir")


def _option_keys(options):
    """The keys of the -o strings, in order, with repeats (`lowerdir`, `ro`, ...)."""
    from cowfs.overlay.stack import split_options
    return [opt.partition("=")[0] for text in options for opt in split_options(text) if opt]


def _check_mount_spelling(args, parser):
    """Refuse, as a usage error, a mount command line that mixes the two spellings of the layers or gives
    something twice or to no purpose: it would otherwise drop or ignore what the user said."""
    keys = _option_keys(args.options)
    for key in LAYER_KEYS + ("trace",):
        if keys.count(key) > 1:
            parser.error(f"option '{key}' given twice")
    given = {k for k in keys if k in LAYER_KEYS} | ({"lowerdir"} if "lowerdir+" in keys else set())
    if args.trace is not None and "trace" in keys:
        parser.error("the trace is given twice: --trace and -o trace=; give one")
    if args.upper is not None and "upperdir" in given:
        parser.error("the upper directory is given twice: --upper and -o upperdir=; give one")
    if args.work is not None and "workdir" in given:
        parser.error("the workdir is given twice: --work and -o workdir=; give one")
    if args.work is not None and args.upper is None:
        parser.error("--work needs --upper: a workdir belongs to an upper directory")
    if args.upper is not None and "workdir" in given:
        parser.error("-o workdir= goes with -o upperdir=; with --upper, give the workdir as --work")
    if "lowerdir" in given:
        if len(args.paths) != 1:
            parser.error("the lower layers are given twice: as LOWER... and as -o lowerdir=; with -o "
                         "lowerdir=, give only the mount point")
    else:
        if len(args.paths) < 2:
            parser.error("missing lowerdir: give the lower layers as LOWER... MOUNTPOINT, IMAGE MOUNTPOINT or "
                         "-o lowerdir=... MOUNTPOINT")
        if given & {"upperdir", "workdir"}:
            parser.error("with LOWER... MOUNTPOINT, give the upper as --upper DIR (and --work DIR), not as "
                         "-o upperdir=/workdir=")
    if args.store is not None and (len(args.paths) != 2 or given or args.upper is not None):
        parser.error("--store is only for `cowfs mount IMAGE MOUNTPOINT`")


def _stack_from_args(args):
    """The Stack, mount point and the directories made for it, from either spelling: `-o lowerdir=... MNT`,
    or `LOWER... [--upper U [--work W]] MNT` (which makes U and its workdir when missing; parents first in
    the list). Other -o options go with either spelling."""
    from cowfs.overlay.stack import lowerdir_option, parse_options, upperdir_option
    paths = list(args.paths)
    mountpoint = paths.pop()
    opts = list(args.options)
    if paths:
        opts.insert(0, lowerdir_option(paths))
    if args.upper is None:
        return parse_options(opts), mountpoint, []
    upper = os.path.abspath(args.upper)
    work = os.path.abspath(args.work) if args.work else upper.rstrip("/") + ".work"
    stack = parse_options(opts + [upperdir_option(upper, work)])
    _precheck(stack, mountpoint)
    from cowfs.daemon.mount import make_dirs, remove_made
    made = make_dirs(upper)
    try:
        made += make_dirs(work)
    except BaseException:
        remove_made(made)
        raise
    return stack, mountpoint, made


def _precheck(stack, mountpoint):
    """Before making an upper and a workdir: refuse what would be refused anyway (the lowers, the mount point,
    options an unprivileged mount cannot have), so that a refused mount makes nothing."""
    import dataclasses

    from cowfs.daemon.mount import unprivileged
    from cowfs.overlay.stack import check
    check(unprivileged(dataclasses.replace(stack, upper=None, work=None), quiet=True), mountpoint)


def _image_form(args):
    """(store, image ID, ref) when the mount command reads `IMAGE MOUNTPOINT`, else None.

    Only with exactly two positionals, no -o lowerdir/upperdir/workdir and no --upper, and a first
    positional that is not an existing path but names an image of the store. A first positional that is
    neither is refused, naming both places it was looked for."""
    if len(args.paths) != 2 or args.upper is not None or args.work is not None:
        return None
    if set(_option_keys(args.options)) & set(LAYER_KEYS + ("lowerdir+",)):
        return None
    from cowfs.images.catalog import looks_like_image
    from cowfs.images.store import Store, default_store
    root = args.store or default_store()
    ref = args.paths[0]
    if os.path.lexists(ref):
        if args.store is not None:
            raise StackError(f"{ref}: a directory, not an image (--store is only for `cowfs mount IMAGE "
                             "MOUNTPOINT`)")
        return None
    image_id = looks_like_image(root, ref)
    if image_id is None:
        raise StackError(f"{ref}: no such layer directory, and no such image in store {os.path.abspath(root)}")
    return Store(root, create=False), image_id, ref


def _mount_image(args, found, mounting):
    """`cowfs mount IMAGE MOUNTPOINT`: a new container layer in the store over the image's layers."""
    import shutil

    from cowfs.images.catalog import image_stack_options
    from cowfs.images.containers import create_container
    from cowfs.overlay.stack import parse_options, upperdir_option
    store, image_id, ref = found
    mountpoint = args.paths[1]
    opts = image_stack_options(store, image_id) + args.options
    if not os.path.isdir(mountpoint):
        raise StackError(f"mount point {mountpoint}: No such directory")
    _precheck(parse_options(opts), mountpoint)  # bad options, a mount point over the layers: before any container
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
    from cowfs.overlay.stack import split_options, unescape
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


# -- main --------------------------------------------------------------------------------------------

def main(argv=None):
    """Run the cowfs command line `argv` (default sys.argv[1:]); returns the exit status (0 done, 1 refused or
    failed, 2 usage, 130 interrupted). --help and --version raise SystemExit(0), as argparse does."""
    from cowfs.cli.report import set_debug
    argv = list(sys.argv[1:] if argv is None else argv)
    paths_as_bytes()
    set_debug(None)
    while argv and argv[0] == "--debug":  # the global flag; `cowfs COMMAND ... --debug` works too
        set_debug(True)
        argv.pop(0)
    with stopping_on_signals():
        return reporting(lambda: _main(argv))


def _main(argv):
    try:
        return _parse_and_run(argv)
    except UsageError as e:
        sys.stderr.write(f"{e}\n")
        return 2


def _parse_and_run(argv):
    if argv[:1] == ["__complete"]:  # the completion script's helper: never in --help
        from cowfs.cli.completion import complete
        return complete(argv[1:])
    parser, mount_parser = build_parser(only_mounts=argv[:1] in (["mount"], ["umount"]))
    helper_source = None
    if argv and not argv[0].startswith("-") and argv[0] not in parser.commands:
        rewritten = _mount_helper_form(argv, parser.commands)
        if rewritten is None:
            _not_a_command(argv[0], parser.commands)
        i = rewritten.index("--fsname-from-helper")
        helper_source = rewritten[i + 1]
        argv = rewritten[:i] + rewritten[i + 2:]
    if argv and argv[0] == "mount":  # options may stand between LOWER... and MOUNTPOINT
        args = mount_parser.parse_intermixed_args(argv[1:])
        args.command = "mount"
    else:
        args = parser.parse_args(argv)
    if getattr(args, "show_traceback", False):
        from cowfs.cli.report import set_debug
        set_debug(True)
    if args.command is None:
        parser.print_help()
        raise UsageError("cowfs: give a command (the list above, or 'cowfs --help')")
    if args.command == "mount":
        _check_mount_spelling(args, mount_parser)
    elif args.command == "diff" and args.quiet and args.size:
        parser.commands_action.choices["diff"].error("-q lists paths alone: it takes no --size")
    if args.command not in COMMANDS:
        from cowfs.cli import images as image_cli
        if args.command in image_cli.COMMANDS:
            return image_cli.run(args)
    return _run(args, helper_source)


def _run(args, helper_source):
    """Run mount, umount or another command; what it refuses is raised (CowfsError, OSError) for `reporting`."""
    from cowfs.daemon import mount as mounting
    if args.command == "mount":
        _take_trace_option(args)
        found = _image_form(args)
        if found is not None:
            _mount_image(args, found, mounting)
            return 0
        stack, mountpoint, made = _stack_from_args(args)
        if helper_source and helper_source != "cowfs" and "fsname=" not in ",".join(args.options):
            stack.fsname = helper_source
        try:
            mounting.mount(stack, mountpoint, foreground=args.foreground, debug=args.debug, trace=args.trace,
                           human_trace=args.human_trace)
        except BaseException:
            mounting.remove_made(made)
            raise
    elif args.command == "umount":
        mounting.umount(args.mountpoint)
    else:
        return RUNNERS[args.command](args)
    return 0
