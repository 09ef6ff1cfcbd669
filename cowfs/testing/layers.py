"""Lower layers as plain values (``StackSpec``), and the one builder that writes them in the kernel's format.

A stack is a value whose ``repr`` is valid Python, so a failing example that
Hypothesis prints (``cowfs.testing.strategies`` draws these values) can be
pasted into a regression test as it is, and the fixed differential scenarios
write their layers with the same code::

    from cowfs.testing.layers import StackSpec, Layer, File, Dir, Symlink, HardLink, Fifo, Whiteout, materialise

    spec = StackSpec(Layer(File('a', data=b'x'), Whiteout('b')), Layer(Dir('b'), File('b/c')))
    lowers = materialise(spec, tmp_path, userxattr=False)   # [.../l0, .../l1], topmost first

Whiteouts and opaque directories are written in the kernel's format (a 0/0
character device; ``trusted.overlay.opaque=y``, or ``user.overlay.opaque=y``
for a ``userxattr`` stack).  An xattr named ``overlay.NAME`` in a spec is an
overlay xattr in the stack's flavour: ``trusted.overlay.NAME``, or
``user.overlay.NAME`` for a ``userxattr`` stack (crafted redirects, say).

Every object in a materialised layer gets one old, fixed mtime/atime
(``PINNED_TIME_NS``) so that ``cowfs.testing.tree.snapshot`` compares the
times copy-up must keep exactly.  Nothing here needs Hypothesis.

Written without root (``cowfs.testing.mounts.privileged()`` false): owner
``(0, 0)``, the default, stands for whoever writes the layer, so an ordinary
user's layer is its own and no chown is tried (root of a user namespace, the
user mapped to root, gives its files owner 0 there, which is the user on
disk).  Another owner needs that id mapped in the user namespace (a failure
names the entry).  What only root of the initial namespace can make is left
out, the same for every side that mounts the layers, and listed in
*left_out* when given: device nodes other than whiteouts (mknod needs
CAP_MKNOD there), xattrs named ``trusted.*`` (CAP_SYS_ADMIN) and ``security.*``
(``security.capability``: CAP_SETFCAP); an overlay
marker in the trusted flavour is not left out (it fails: use ``userxattr``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import stat
from collections.abc import Iterable, Iterator

from cowfs.testing.mounts import StrPath, privileged

PINNED_TIME_NS = 1_000_000_000 * 10**9  # 2001-09-09, below tree.FIXED_TIME_CUTOFF_NS
USER = 1000  # the unprivileged uid/gid that owns things in layers and runs permission checks


class Oct(int):
    """An int that prints in octal (``0o4755``): modes stay readable in printed reproductions."""

    def __repr__(self) -> str:
        return oct(self)

    __str__ = __repr__


class Pattern(bytes):
    """*n* bytes of a fixed, non-repeating-per-page pattern that prints as ``Pattern(n)``."""

    n: int

    def __new__(cls, n: int) -> Pattern:
        obj = super().__new__(cls, bytes((i * 7 + i // 251) % 256 for i in range(n)))
        obj.n = n
        return obj

    def __repr__(self) -> str:
        return f"Pattern({self.n})"

    def __reduce__(self):
        return (Pattern, (self.n,))


# --------------------------------------------------------------------------
# the values (repr only shows what differs from the defaults)

class _Spec:
    def __repr__(self) -> str:
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

    def content_size(self) -> int:
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
    """A second name for a regular file of the same layer: the file at *to* when given, else the
    *nth* one (modulo their number) in the order they were written; an empty file of its own when
    the layer has no file yet."""

    path: str
    nth: int = 0
    to: str = ""


@dataclasses.dataclass(frozen=True, repr=False)
class Fifo(_Spec):
    path: str
    mode: int = Oct(0o644)


@dataclasses.dataclass(frozen=True, repr=False)
class Device(_Spec):
    """A character device *major*/*minor* (0/0 is a whiteout: use ``Whiteout`` for that), or a block
    device when *block*."""

    path: str
    major: int = 1
    minor: int = 3
    mode: int = Oct(0o600)
    block: bool = False


@dataclasses.dataclass(frozen=True, repr=False)
class Socket(_Spec):
    """A unix socket's inode, as bind(2) leaves it (made with mknod, which any path length allows)."""

    path: str
    mode: int = Oct(0o755)


@dataclasses.dataclass(frozen=True, repr=False)
class Whiteout(_Spec):
    path: str


Entry = File | Dir | Symlink | HardLink | Fifo | Device | Socket | Whiteout


class Layer(tuple):
    """The entries of one layer, parents before children (a missing parent is made 0755, root's)."""

    def __new__(cls, *entries: Entry) -> Layer:
        return super().__new__(cls, entries)

    def __repr__(self) -> str:
        return f"Layer({', '.join(repr(e) for e in self)})"


class StackSpec(tuple):
    """Lower layers, topmost first (the order of ``lowerdir=``)."""

    def __new__(cls, *layers: Layer) -> StackSpec:
        return super().__new__(cls, layers)

    def __repr__(self) -> str:
        return f"StackSpec({', '.join(repr(layer) for layer in self)})"

    def paths(self) -> list[str]:
        """Every path named in any layer."""
        return sorted({e.path for layer in self for e in layer})

    def with_entries(self, *more: Iterable[Entry]) -> StackSpec:
        """This stack with more entries after those of its layers: ``more[0]`` to the topmost, and so on."""
        if len(more) > len(self):
            raise ValueError(f"{len(more)} groups of entries for {len(self)} layers")
        extra = list(more) + [()] * (len(self) - len(more))
        return StackSpec(*(Layer(*layer, *add) for layer, add in zip(self, extra)))


# --------------------------------------------------------------------------
# writing a stack to disk (through directory descriptors: a path may be longer than PATH_MAX)

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW


def overlay_xattr(name: str, userxattr: bool) -> str:
    """*name* as written: ``overlay.X`` becomes ``trusted.overlay.X`` (``user.overlay.X`` with *userxattr*)."""
    if name.startswith("overlay."):
        return ("user." if userxattr else "trusted.") + name
    return name


@contextlib.contextmanager
def _parent(root_fd: int, path: str, create: bool) -> Iterator[int | None]:
    """A descriptor of the directory holding *path* (relative to *root_fd*), making missing
    directories (0755) on the way when *create*; None when a component is not a directory."""
    fd: int | None = os.dup(root_fd)
    try:
        for name in path.split("/")[:-1]:
            try:
                nfd = os.open(name, _DIR_FLAGS, dir_fd=fd)
            except FileNotFoundError:
                if not create:
                    raise
                os.mkdir(name, 0o755, dir_fd=fd)
                os.chmod(name, 0o755, dir_fd=fd)
                nfd = os.open(name, _DIR_FLAGS, dir_fd=fd)
            except OSError:  # not a directory, or a symlink: a hand-written layer may be inconsistent
                os.close(fd)
                fd = None
                break
            os.close(fd)
            fd = nfd
        yield fd
    finally:
        if fd is not None:
            os.close(fd)


def _lexists(name: str, dir_fd: int) -> bool:
    try:
        os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        return True
    except FileNotFoundError:
        return False


def _set_xattrs(fd: int, entry: File | Dir, userxattr: bool, left_out: list[str] | None) -> None:
    for xname, value in entry.xattrs:
        # trusted.* needs CAP_SYS_ADMIN of the initial namespace; security.capability, CAP_SETFCAP there
        if xname.startswith(("trusted.", "security.")) and not privileged():
            if left_out is not None:
                left_out.append(f"{entry.path}: xattr {xname}")
            continue
        os.setxattr(fd, overlay_xattr(xname, userxattr), value)


def _chown(fd: int, entry: File | Dir) -> None:
    """Give the entry its owner; (0, 0) written by an ordinary user means the user itself (no chown)."""
    if tuple(entry.owner) == (0, 0) and os.geteuid() != 0:
        return
    try:
        os.fchown(fd, *entry.owner)
    except OSError as e:
        where = "in this user namespace" if os.geteuid() == 0 else f"for uid {os.geteuid()}"
        raise OSError(e.errno, f"layer entry {entry.path}: cannot give it owner {tuple(entry.owner)} {where} "
                      f"({e.strerror})") from None


def _write_file(entry: File, name: str, dir_fd: int, userxattr: bool, left_out: list[str] | None = None) -> None:
    fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600, dir_fd=dir_fd)
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
        _chown(fd, entry)  # before the xattrs: a chown drops security.capability
        _set_xattrs(fd, entry, userxattr, left_out)
        os.fchmod(fd, entry.mode)  # after chown, which clears setuid/setgid
    finally:
        os.close(fd)


def _make_dir(entry: Dir, name: str, dir_fd: int, userxattr: bool, left_out: list[str] | None = None) -> None:
    os.mkdir(name, 0o755, dir_fd=dir_fd)
    fd = os.open(name, _DIR_FLAGS, dir_fd=dir_fd)
    try:
        _set_xattrs(fd, entry, userxattr, left_out)
        if entry.opaque:
            os.setxattr(fd, overlay_xattr("overlay.opaque", userxattr), b"y")
        _chown(fd, entry)
    finally:
        os.close(fd)


def materialise_layer(layer: Iterable[Entry], root: StrPath, userxattr: bool = False,
                      left_out: list[str] | None = None) -> None:
    """Write the entries of *layer* under the existing directory *root*.

    Missing parent directories are made (0755, owned by the caller); an entry
    whose parent is not a directory, or whose path exists already, is skipped.
    Directory modes are set last, so that a read-only directory can still be filled.
    Without root, what needs root is left out (the module doc), and listed in *left_out* when given.
    """
    root_fd = os.open(os.fspath(root), os.O_RDONLY | os.O_DIRECTORY)
    try:
        files: list[str] = []
        dirs: list[tuple[str, int]] = []
        for entry in layer:
            name = entry.path.rsplit("/", 1)[-1]
            with _parent(root_fd, entry.path, create=True) as dir_fd:
                if dir_fd is None or _lexists(name, dir_fd):
                    continue
                if isinstance(entry, File):
                    _write_file(entry, name, dir_fd, userxattr, left_out)
                    files.append(entry.path)
                elif isinstance(entry, Dir):
                    _make_dir(entry, name, dir_fd, userxattr, left_out)
                    dirs.append((entry.path, entry.mode))
                elif isinstance(entry, Symlink):
                    os.symlink(entry.target, name, dir_fd=dir_fd)
                elif isinstance(entry, HardLink):
                    source = entry.to or (files[entry.nth % len(files)] if files else None)
                    if source is None:
                        os.close(os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644, dir_fd=dir_fd))
                        files.append(entry.path)
                    else:
                        with _parent(root_fd, source, create=False) as src_fd:
                            os.link(source.rsplit("/", 1)[-1], name, src_dir_fd=src_fd, dst_dir_fd=dir_fd,
                                    follow_symlinks=False)
                elif isinstance(entry, Fifo):
                    os.mkfifo(name, dir_fd=dir_fd)
                    os.chmod(name, entry.mode, dir_fd=dir_fd)
                elif isinstance(entry, Device):
                    if not privileged() and (entry.major, entry.minor) != (0, 0):  # mknod needs CAP_MKNOD
                        if left_out is not None:
                            left_out.append(f"{entry.path}: device {entry.major}/{entry.minor}")
                        continue
                    kind = stat.S_IFBLK if entry.block else stat.S_IFCHR
                    os.mknod(name, kind | 0o600, os.makedev(entry.major, entry.minor), dir_fd=dir_fd)
                    os.chmod(name, entry.mode, dir_fd=dir_fd)
                elif isinstance(entry, Socket):
                    os.mknod(name, stat.S_IFSOCK | 0o600, dir_fd=dir_fd)
                    os.chmod(name, entry.mode, dir_fd=dir_fd)
                elif isinstance(entry, Whiteout):
                    os.mknod(name, stat.S_IFCHR | 0o000, os.makedev(0, 0), dir_fd=dir_fd)
                else:
                    raise TypeError(f"not a layer entry: {entry!r}")
        for path, mode in reversed(dirs):
            with _parent(root_fd, path, create=False) as dir_fd:
                os.chmod(path.rsplit("/", 1)[-1], mode, dir_fd=dir_fd)
    finally:
        os.close(root_fd)


def pin_times(root: StrPath, ns: int = PINNED_TIME_NS) -> None:
    """Give every object under *root* (and *root*) the same atime/mtime, children before parents
    (through directory descriptors: a layer may hold paths longer than PATH_MAX)."""
    for _dirpath, dirnames, filenames, dirfd in os.fwalk(root, topdown=False):
        for name in filenames + dirnames:
            os.utime(name, ns=(ns, ns), dir_fd=dirfd, follow_symlinks=False)
    os.utime(root, ns=(ns, ns))


def materialise(spec: Iterable[Iterable[Entry]], base: StrPath, userxattr: bool = False,
                prefix: str = "l", left_out: list[str] | None = None) -> list[str]:
    """Write every layer of *spec* to ``base/l0``, ``base/l1``, ... and return those paths, topmost first.

    Times are pinned to ``PINNED_TIME_NS``.  Opaque markers and ``overlay.*`` xattrs use
    ``user.overlay.`` when *userxattr* is true (for a ``userxattr`` mount), ``trusted.overlay.`` otherwise.
    Without root, what needs root is left out (the module doc), and listed in *left_out* when given.
    """
    out = []
    for i, layer in enumerate(spec):
        d = os.path.join(os.fspath(base), f"{prefix}{i}")
        os.mkdir(d)
        os.chmod(d, 0o755)
        materialise_layer(layer, d, userxattr=userxattr, left_out=left_out)
        pin_times(d)
        out.append(d)
    return out


def describe(spec: Iterable[Iterable[Entry]]) -> str:
    """A short human summary of a stack (for progress output)."""
    kinds: dict[str, int] = {}
    layers = list(spec)
    for layer in layers:
        for e in layer:
            kinds[type(e).__name__] = kinds.get(type(e).__name__, 0) + 1
    return f"{len(layers)} layer(s): " + ", ".join(f"{n} {k}" for k, n in sorted(kinds.items()))


__all__ = [
    "PINNED_TIME_NS", "USER", "Oct", "Pattern", "File", "Dir", "Symlink", "HardLink", "Fifo", "Device", "Socket",
    "Whiteout",
    "Entry", "Layer", "StackSpec", "overlay_xattr", "materialise", "materialise_layer", "pin_times", "describe",
]
