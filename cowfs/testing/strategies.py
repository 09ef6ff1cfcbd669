"""Hypothesis strategies for overlay layer stacks, and the code that writes a drawn stack to disk.

A drawn stack is a plain value (``StackSpec``) whose ``repr`` is valid
Python, so a failing example printed by Hypothesis can be pasted into a
regression test as it is::

    from cowfs.testing.strategies import StackSpec, Layer, File, Dir, Symlink, HardLink, Fifo, Whiteout

    spec = StackSpec(Layer(File('a', data=b'x'), Whiteout('b')), Layer(Dir('b'), File('b/c')))
    lowers = materialise(spec, tmp_path, userxattr=False)   # [.../l0, .../l1], topmost first

Names come from a tiny alphabet (``NAMES``) so that the same path shows up
in several layers with different types: that is where overlay behaviour is
interesting (whiteouts over directories, files hiding directories, merged
and opaque directories).  Whiteouts and opaque directories are written in
the kernel's format (a 0/0 character device; ``trusted.overlay.opaque=y``,
or ``user.overlay.opaque=y`` for a ``userxattr`` stack).

Every object in a materialised layer gets one old, fixed mtime/atime
(``PINNED_TIME_NS``) so that ``cowfs.testing.tree.snapshot`` compares the
times copy-up must keep exactly.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from hypothesis import strategies as st

from cowfs.testing.mounts import make_opaque, make_whiteout

NAMES = ("a", "b", "c")
PINNED_TIME_NS = 1_000_000_000 * 10**9  # 2001-09-09, below tree.FIXED_TIME_CUTOFF_NS
USER = 1000


class Oct(int):
    """An int that prints in octal (``0o4755``): modes stay readable in printed reproductions."""

    def __repr__(self):
        return oct(self)

    __str__ = __repr__


class Pattern(bytes):
    """*n* bytes of a fixed, non-repeating-per-page pattern that prints as ``Pattern(n)``."""

    def __new__(cls, n: int):
        obj = super().__new__(cls, bytes((i * 7 + i // 251) % 256 for i in range(n)))
        obj.n = n
        return obj

    def __repr__(self):
        return f"Pattern({self.n})"

    def __reduce__(self):
        return (Pattern, (self.n,))


FILE_MODES = tuple(Oct(m) for m in (0o644, 0o755, 0o600, 0o444, 0o000, 0o4755, 0o2755, 0o6711, 0o1644, 0o640))
DIR_MODES = tuple(Oct(m) for m in (0o755, 0o700, 0o1777, 0o555, 0o2775, 0o711))
OWNERS = ((0, 0), (USER, USER), (0, USER), (USER, 0))
SYMLINK_TARGETS = (
    "a", "b/c", "../a", "../../b", "..", ".", "nowhere", "a/nowhere",  # relative, some dangling
    "/a", "/b/c", "/etc/passwd", "/", "../../../../../../etc",          # absolute and pointing up and out
)
XATTR_NAMES = ("user.a", "user.b", "user.long.name")
XATTR_VALUES = (b"", b"1", b"value", b"\x00\xff")
DATA = (b"", b"x", b"hello\n", b"0123456789abcdef", Pattern(5000), Pattern(200_000))
HOLES = (0, 0, 0, (2 << 20) + 4096)  # holes the kernel's copy-up keeps too (see stacks())
SMALL_HOLES = (4096, 70_000, 1 << 20)


# --------------------------------------------------------------------------
# the values (repr only shows what differs from the defaults)

class _Spec:
    def __repr__(self):
        fields = dataclasses.fields(self)
        parts = []
        for i, f in enumerate(fields):
            value = getattr(self, f.name)
            if i == 0:
                parts.append(repr(value))
            elif value != f.default:
                parts.append(f"{f.name}={value!r}")
        return f"{type(self).__name__}({', '.join(parts)})"


@dataclasses.dataclass(frozen=True, repr=False)
class File(_Spec):
    """A regular file: *data*, then *hole* bytes never written (a real hole), then *tail*."""

    path: str
    data: bytes = b""
    hole: int = 0
    tail: bytes = b""
    mode: int = Oct(0o644)
    owner: tuple = (0, 0)
    xattrs: tuple = ()  # ((name, value), ...)

    def content_size(self):
        return len(self.data) + self.hole + len(self.tail)


@dataclasses.dataclass(frozen=True, repr=False)
class Dir(_Spec):
    path: str
    mode: int = Oct(0o755)
    owner: tuple = (0, 0)
    opaque: bool = False
    xattrs: tuple = ()


@dataclasses.dataclass(frozen=True, repr=False)
class Symlink(_Spec):
    path: str
    target: str = "nowhere"


@dataclasses.dataclass(frozen=True, repr=False)
class HardLink(_Spec):
    """A second name for a regular file of the same layer: the *nth* one (modulo their number)
    in the order they were written; an empty file of its own when the layer has no file yet."""

    path: str
    nth: int = 0


@dataclasses.dataclass(frozen=True, repr=False)
class Fifo(_Spec):
    path: str
    mode: int = Oct(0o644)


@dataclasses.dataclass(frozen=True, repr=False)
class Whiteout(_Spec):
    path: str


class Layer(tuple):
    """The entries of one layer, parents before children."""

    def __new__(cls, *entries):
        return super().__new__(cls, entries)

    def __repr__(self):
        return f"Layer({', '.join(repr(e) for e in self)})"


class StackSpec(tuple):
    """Lower layers, topmost first (the order of ``lowerdir=``)."""

    def __new__(cls, *layers):
        return super().__new__(cls, layers)

    def __repr__(self):
        return f"StackSpec({', '.join(repr(layer) for layer in self)})"

    def paths(self):
        """Every path named in any layer."""
        return sorted({e.path for layer in self for e in layer})


# --------------------------------------------------------------------------
# strategies

names = st.sampled_from(NAMES)
file_modes = st.sampled_from(FILE_MODES)
dir_modes = st.sampled_from(DIR_MODES)
owners = st.sampled_from(OWNERS)
xattr_sets = st.lists(st.tuples(st.sampled_from(XATTR_NAMES), st.sampled_from(XATTR_VALUES)),
                      max_size=2, unique_by=lambda kv: kv[0]).map(tuple)


def _file(path, small_holes=True):
    holes = HOLES + SMALL_HOLES if small_holes else HOLES
    return st.builds(File, st.just(path), data=st.sampled_from(DATA), hole=st.sampled_from(holes),
                     tail=st.sampled_from((b"", b"", b"end")), mode=file_modes, owner=owners, xattrs=xattr_sets)


def _leaf(path, small_holes=True):
    return st.one_of(
        _file(path, small_holes),
        _file(path, small_holes),
        st.builds(Symlink, st.just(path), st.sampled_from(SYMLINK_TARGETS)),
        st.builds(Whiteout, st.just(path)),
        st.builds(HardLink, st.just(path), st.integers(0, 3)),
        st.builds(Fifo, st.just(path), file_modes),
    )


@st.composite
def _subtree(draw, prefix: str, depth: int, max_depth: int, small_holes: bool = True):
    """Entries for the children of directory *prefix* ('' for the layer root)."""
    out = []
    for name in draw(st.lists(names, max_size=len(NAMES), unique=True)):
        path = f"{prefix}/{name}" if prefix else name
        if depth < max_depth and draw(st.booleans()):
            out.append(draw(st.builds(Dir, st.just(path), mode=dir_modes, owner=owners,
                                      opaque=st.sampled_from((False, False, True)), xattrs=xattr_sets)))
            out.extend(draw(_subtree(path, depth + 1, max_depth, small_holes)))
        else:
            out.append(draw(_leaf(path, small_holes)))
    return out


def layers(max_depth: int = 3, small_holes: bool = True) -> st.SearchStrategy[Layer]:
    """One lower layer: files (holes, user xattrs, odd modes, setuid), dirs (some opaque),
    symlinks, hard links, FIFOs and whiteouts, named from ``NAMES``, at most *max_depth* deep."""
    return _subtree("", 1, max_depth, small_holes).map(lambda entries: Layer(*entries))


def contributing_layers(spec: StackSpec, path: str) -> list[int]:
    """Indexes of the lower layers whose directory *path* is part of the merged directory *path*,
    as the kernel's lookup finds them (the root: every layer).  Empty when *path* is not a
    directory of the merged lower stack."""
    found = list(range(len(spec)))
    if not path:
        return found
    by_layer = [{e.path: e for e in layer} for layer in spec]
    prefix = ""
    for name in path.split("/"):
        prefix = f"{prefix}/{name}" if prefix else name
        below = []
        for i in found:
            entry = by_layer[i].get(prefix)
            if entry is None:
                continue
            if not isinstance(entry, Dir):
                break  # a whiteout or a non-directory ends the lookup
            below.append(i)
            if entry.opaque:
                break
        found = below
        if not found:
            break
    return found


def drop_unmerged_whiteouts(spec: StackSpec) -> StackSpec:
    """*spec* without the whiteouts that lie in a directory only one lower layer contributes to.

    The kernel lists such whiteouts in ``readdir`` (it reads a directory that is
    not merged straight from its layer) while ``lstat`` of the name fails with
    ENOENT; see ``KERNEL_QUIRKS`` in ``cowfs.testing.machine``.
    """
    out = []
    for i, layer in enumerate(spec):
        keep = []
        for e in layer:
            if isinstance(e, Whiteout) and "/" in e.path:
                if contributing_layers(spec, e.path.rsplit("/", 1)[0]) == [i]:
                    continue
            keep.append(e)
        out.append(Layer(*keep))
    return StackSpec(*out)


def stacks(min_layers: int = 1, max_layers: int = 6, max_depth: int = 3,
           unmerged_whiteouts: bool = True, small_holes: bool = True) -> st.SearchStrategy[StackSpec]:
    """A stack of *min_layers* to *max_layers* lower layers, topmost first.

    With *unmerged_whiteouts* false, whiteouts in directories that only one
    lower layer makes up are left out (``drop_unmerged_whiteouts``).  With
    *small_holes* false, files get only holes that cover a whole 1 MiB-aligned
    MiB: the kernel's copy-up copies data in 1 MiB chunks and writes zeros into
    any hole that does not span a whole chunk.
    """
    strategy = st.lists(layers(max_depth, small_holes), min_size=min_layers, max_size=max_layers).map(
        lambda ls: StackSpec(*ls))
    return strategy if unmerged_whiteouts else strategy.map(drop_unmerged_whiteouts)


# --------------------------------------------------------------------------
# writing a stack to disk

def materialise_layer(layer, root, userxattr: bool = False) -> None:
    """Write the entries of *layer* under the existing directory *root*."""
    root = Path(root)
    files: list[Path] = []
    dirs: list[Path] = []
    for entry in layer:
        path = root / entry.path
        if not path.parent.is_dir() or path.parent.is_symlink() or os.path.lexists(path):
            continue  # a hand-written layer may be inconsistent: skip what cannot be
        if isinstance(entry, File):
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                os.write(fd, entry.data)
                if entry.hole:
                    os.lseek(fd, entry.hole, os.SEEK_CUR)
                    if entry.tail:
                        os.write(fd, entry.tail)
                    else:
                        os.ftruncate(fd, entry.content_size())
                elif entry.tail:
                    os.write(fd, entry.tail)
            finally:
                os.close(fd)
            for name, value in entry.xattrs:
                os.setxattr(path, name, value)
            os.chown(path, *entry.owner)
            os.chmod(path, entry.mode)  # after chown, which clears setuid/setgid
            files.append(path)
        elif isinstance(entry, Dir):
            os.mkdir(path)
            for name, value in entry.xattrs:
                os.setxattr(path, name, value)
            if entry.opaque:
                make_opaque(path, userxattr=userxattr)
            os.chown(path, *entry.owner)
            dirs.append((path, entry.mode))
        elif isinstance(entry, Symlink):
            os.symlink(entry.target, path)
        elif isinstance(entry, HardLink):
            if files:
                os.link(files[entry.nth % len(files)], path)
            else:
                os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
                files.append(path)
        elif isinstance(entry, Fifo):
            os.mkfifo(path)
            os.chmod(path, entry.mode)
        elif isinstance(entry, Whiteout):
            make_whiteout(path)
        else:
            raise TypeError(f"not a layer entry: {entry!r}")
    for path, mode in reversed(dirs):  # last, so that a read-only dir could still be filled
        os.chmod(path, mode)


def pin_times(root, ns: int = PINNED_TIME_NS) -> None:
    """Give every object under *root* (and *root*) the same atime/mtime, children before parents."""
    for dirpath, dirnames, filenames in os.walk(root, topdown=False):
        for name in filenames + dirnames:
            os.utime(os.path.join(dirpath, name), ns=(ns, ns), follow_symlinks=False)
    os.utime(root, ns=(ns, ns))


def materialise(spec: StackSpec, base, userxattr: bool = False, prefix: str = "l") -> list[str]:
    """Write every layer of *spec* to ``base/l0``, ``base/l1``, ... and return those paths, topmost first.

    Times are pinned to ``PINNED_TIME_NS``.  Opaque markers use ``user.overlay.``
    when *userxattr* is true (for a ``userxattr`` mount), ``trusted.overlay.`` otherwise.
    """
    out = []
    for i, layer in enumerate(spec):
        d = os.path.join(os.fspath(base), f"{prefix}{i}")
        os.mkdir(d)
        os.chmod(d, 0o755)
        materialise_layer(layer, d, userxattr=userxattr)
        pin_times(d)
        out.append(d)
    return out


def describe(spec: StackSpec) -> str:
    """A short human summary of a stack (for progress output)."""
    kinds = {}
    for layer in spec:
        for e in layer:
            kinds[type(e).__name__] = kinds.get(type(e).__name__, 0) + 1
    return f"{len(spec)} layer(s): " + ", ".join(f"{n} {k}" for k, n in sorted(kinds.items()))


__all__ = [
    "NAMES", "PINNED_TIME_NS", "Oct", "Pattern", "File", "Dir", "Symlink", "HardLink", "Fifo", "Whiteout", "Layer",
    "StackSpec", "layers", "stacks", "contributing_layers", "drop_unmerged_whiteouts", "materialise",
    "materialise_layer", "pin_times", "describe",
]
