"""`cowfs diff` (an upper's changes, as `docker diff` lists them), the stack behind a mount, and an upper's size.

`cowfs diff` lists what an upper layer changes as A, C and D lines.

The answer compares two views of the same layers: *before*, the lower layers
alone, and *after*, the merged view with the upper on top, both resolved by
the engine's own lookup rules (`Layers`), so whiteouts, opaque directories
and redirects count exactly as a mount shows them. Only what the upper can
change is walked: a directory that comes from a lower layer unchanged is not
entered. The rules:

- a name in *after* whose object is in the upper: C when *before* has the name,
  else A (so a directory copied up because something in it changed is C);
  but not when the object shows as *before* showed it, as Docker's overlay2
  diff compares them (a tree walk of both views, `archive.ChangesDirs`): the
  same type, permission bits, owner, device number and file capability, and
  for a non-directory the same size and mtime (to the second when either
  side has no nanoseconds, as a tar gives none); for a directory, nothing
  under it listed either (its times and size are no change: `touch` on a
  lower directory copies it up and lists nothing, and so does a hard link
  made to a lower file, whose copy-up changes nothing shown);
- a name in *after* found in a lower layer at another path than *before*
  finds there (through a redirect: a renamed directory): A (or C), with its
  contents, as if it had been copied;
- a name in *before* and not in *after*: D, once (a deleted directory is one
  line, as in docker diff).

Also the helpers that find a stack from a mount point or an upper directory,
shared with `cowfs explain` and `cowfs status`, and what one upper object holds
(`object_size`); a whole upper's or layer's size is `cowfs.overlay.usage.tree_size`.
"""

import dataclasses
import json
import os
import stat
import sys

from cowfs import mounttable
from cowfs.errors import StackError
from cowfs.formatting import human_size
from cowfs.overlay import override
from cowfs.overlay.lookup import Layers, join
from cowfs.overlay.stack import Stack, lowerdir_option, parse_options
from cowfs.overlay.usage import tree_size
from cowfs.overlay.whiteout import is_whiteout
from cowfs.runtime import read_record, records

CAPABILITY = "security.capability"
KERNEL_KEYS = ("lowerdir", "upperdir", "workdir", "redirect_dir", "userxattr")


@dataclasses.dataclass
class Located:
    """A stack found for a command: its layers, and the mount (point, record) when it is mounted."""

    stack: Stack
    mountpoint: str = None
    record: dict = None
    kind: str = None  # "cowfs", "overlay" (the kernel's), or None for an unmounted upper

    @property
    def trace(self):
        return (self.record or {}).get("trace")


def mounted_stack(mountpoint):
    """The Located stack mounted exactly at `mountpoint` (cowfs or the kernel's overlay), or None."""
    real = os.path.realpath(mountpoint)
    top = {m.mountpoint: m for m in mounttable.read()}.get(real)  # the last mount there is the one in use
    fstype = top.fstype if top is not None else None
    if fstype == "fuse.cowfs":
        record = read_record(real)
        if record is None:
            raise StackError(f"{mountpoint}: a cowfs mount without a record in the runtime directory "
                             "(mounted by another user?)")
        return Located(parse_options([record["options"]]), real, record, "cowfs")
    if fstype == "overlay":
        kept = [o for o in top.options if o.partition("=")[0] in KERNEL_KEYS]
        return Located(parse_options([",".join(kept)]), real, None, "overlay")
    return None


def mount_containing(path):
    """The Located cowfs mount that holds `path` (the deepest one), and the merged path of `path` in it."""
    real = os.path.realpath(path)
    best = None
    for m in mounttable.read():
        mnt = m.mountpoint
        if m.fstype != "fuse.cowfs":
            continue
        if real == mnt or real.startswith(mnt.rstrip("/") + "/"):
            if best is None or len(mnt) > len(best):
                best = mnt
    if best is None:
        raise StackError(f"{path}: not inside a cowfs mount")
    located = mounted_stack(best)
    merged = "/" + real[len(best):].strip("/")
    return located, merged


def locate(target, lowers=(), options=()):
    """The stack to diff: `target` is a mount point, or an upper directory with its lowers
    (given, or found in the record of the live mount that uses it)."""
    if not os.path.lexists(target):
        raise StackError(f"{target}: No such file or directory")
    if not os.path.isdir(target):
        raise StackError(f"{target}: Not a directory (give a mount point or an upper directory)")
    if not lowers and not options:
        located = mounted_stack(target)
        if located is not None:
            if located.stack.upper is None:
                raise StackError(f"{target}: a read-only mount (no upper layer, so no changes)")
            return located
    upper = os.path.realpath(target)
    if not lowers and not any("lowerdir=" in o for o in options):
        for record in records():
            stack = parse_options([record["options"]])
            if stack.upper and os.path.realpath(stack.upper) == upper:
                return Located(stack, record["mountpoint"], record, "cowfs")
        raise StackError(f"{target}: not a mount point nor the upper of a live cowfs mount; "
                         "give its lower layers with --lower DIR (topmost first)")
    opts = list(options)
    if lowers:
        opts.insert(0, lowerdir_option(lowers))
    stack = parse_options(opts)
    if stack.upper is not None:
        raise StackError(f"{target}: give the upper directory as the argument, not as upperdir=")
    for layer in stack.lowers:
        if not os.path.isdir(layer):
            raise StackError(f"lowerdir {layer}: " + ("No such file or directory" if not os.path.lexists(layer)
                                                      else "Not a directory"))
    stack = dataclasses.replace(stack, lowers=[os.path.realpath(p) for p in stack.lowers], upper=upper)
    return Located(stack)


def _layers(stack):
    """The after and before views of a stack: with the upper on top, and the lowers alone."""
    return Layers(stack), Layers(dataclasses.replace(stack, upper=None))


def _shown_attrs(layers, node):
    """What Docker's overlay2 diff compares of an object (moby's `statDifferent` and the capability):
    its mode with the type, owner, device number and file capability, and for a non-directory its
    size and mtime; the recorded ones in a stack with recorded attributes (see override.py)."""
    st = node.st
    found = override.read(node.real, st.st_mode) if layers.marked else None
    if found is None:
        shown = (st.st_mode, st.st_uid, st.st_gid, st.st_rdev)
    else:
        shown = ((found.kind or stat.S_IFMT(st.st_mode)) | found.mode, found.uid, found.gid, found.rdev)
    try:
        capability = os.getxattr(node.real, CAPABILITY, follow_symlinks=False)
    except OSError:
        capability = None
    times = None if stat.S_ISDIR(shown[0]) else (st.st_size, st.st_mtime_ns)
    return shown, capability, times


def _same_time(a_ns, b_ns):
    """moby's sameFsTimeSpec: the same second, and the same nanoseconds unless either has none (a time
    from a tar has none)."""
    (a_s, a_n), (b_s, b_n) = divmod(a_ns, 10**9), divmod(b_ns, 10**9)
    return a_s == b_s and (a_n == b_n or a_n == 0 or b_n == 0)


def same_object(after, a, before, b):
    """Whether object `a` of the upper shows as `b` did before, as Docker's diff compares them: the
    same type, mode, owner, device number and capability; for non-directories the same size and mtime
    too. A directory's times and size are left out (they move with every change of its entries, and a
    copy-up for a child or a `touch` is no change of its own)."""
    shown_a, cap_a, times_a = _shown_attrs(after, a)
    shown_b, cap_b, times_b = _shown_attrs(before, b)
    if shown_a != shown_b or cap_a != cap_b:
        return False
    if times_a is None:
        return True
    return times_a[0] == times_b[0] and _same_time(times_a[1], times_b[1])


def same_dir(after, a, before, b):
    """Whether directory `a` of the upper shows as lower directory `b` did, times and size aside."""
    return same_object(after, a, before, b)


def changes(stack):
    """[(kind, path, upper_real_or_None)] in path order: kind is "A", "C" or "D"."""
    after, before = _layers(stack)
    found = []

    def walk(after_dir, before_dir):
        path = after_dir.path
        after_names = {name for name, _, _ in after.list_dir(after_dir)}
        before_names = set()
        if before_dir is not None and before_dir.is_dir:
            before_names = {name for name, _, _ in before.list_dir(before_dir)}
        for name in before_names - after_names:
            found.append(("D", join(path, name), None))
        for name in after_names:
            a = after.child(after_dir, name)
            b = before.child(before_dir, name) if name in before_names else None
            if a is None:
                continue
            if a.layer != 0 and b is not None and b.layer == a.layer and b.real == a.real:
                continue  # the lower object, at the path it always had
            if b is not None and not a.is_dir and not b.is_dir and a.layer == 0 and same_object(after, a, before, b):
                continue  # copied up, and shows as before (a hard link made to it; a chown to its owner)
            found.append(("A" if b is None else "C", a.path, a.real if a.layer == 0 else None))
            if a.is_dir:
                at = len(found)
                walk(a, b if b is not None and b.is_dir else None)
                if len(found) == at and b is not None and b.is_dir and same_dir(after, a, before, b):
                    found.pop()  # copied up for its times only (or for a change undone): not a change

    walk(after.root(), before.root())
    found.sort(key=lambda change: change[1].split("/"))
    return found


def object_size(real):
    """Bytes an upper object holds (None for a directory or a whiteout)."""
    try:
        st = os.lstat(real)
    except OSError:
        return None
    if stat.S_ISDIR(st.st_mode) or is_whiteout(st):
        return None
    return st.st_size


def format_changes(found, sizes=False):
    """The lines of `cowfs diff`: `C /etc/hosts`, with --size a right-aligned size column."""
    if not sizes:
        return [f"{kind} {path}" for kind, path, _ in found]
    width = max((len(path) for _, path, _ in found), default=0)
    lines = []
    for kind, path, real in found:
        size = object_size(real) if real else None
        lines.append(f"{kind} {path}" + (f"{'':{width - len(path)}}  {human_size(size):>8}" if size is not None
                                         else ""))
    return [line.rstrip() for line in lines]


def size_line(stack):
    upper = tree_size(stack.upper)
    virtual = upper + sum(tree_size(layer) for layer in stack.lowers)
    return f"size: {human_size(upper)} (virtual {human_size(virtual)})"


def diff_json(located, found, target, sizes=False):
    """What `cowfs diff --json` prints (keys documented in `cowfs diff --help`; always all of them)."""
    stack = located.stack
    upper_size = virtual = None
    if sizes:
        upper_size = tree_size(stack.upper)
        virtual = upper_size + sum(tree_size(layer) for layer in stack.lowers)
    return {"target": target, "upper": stack.upper, "lowers": list(stack.lowers),
            "changes": [{"kind": kind, "path": path, "size": object_size(real) if real else None}
                        for kind, path, real in found],
            "upper_size": upper_size, "virtual_size": virtual}


def run(args):
    located = locate(args.target, args.lower, args.options)
    try:
        found = changes(located.stack)
    except OSError as e:
        raise StackError(f"{e.filename or args.target}: {e.strerror}") from None
    if getattr(args, "json", False):
        print(json.dumps(diff_json(located, found, args.target, args.size), indent=2))
    elif getattr(args, "quiet", False):
        for _, path, _ in found:
            print(path)
    else:
        for line in format_changes(found, args.size):
            print(line)
        if args.size:
            print(size_line(located.stack))
    sys.stdout.flush()
    return 0
