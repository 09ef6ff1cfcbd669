"""Hypothesis strategies that draw overlay layer stacks (``StackSpec`` values, see ``cowfs.testing.layers``).

A drawn stack is a plain value whose ``repr`` is valid Python, so a failing
example printed by Hypothesis can be pasted into a regression test as it is::

    from cowfs.testing.strategies import StackSpec, Layer, File, Dir, Symlink, HardLink, Fifo, Device, Socket, Whiteout

    spec = StackSpec(Layer(File('a', data=b'x'), Whiteout('b')), Layer(Dir('b'), File('b/c')))
    lowers = materialise(spec, tmp_path, userxattr=False)   # [.../l0, .../l1], topmost first

Names come from a tiny alphabet (``NAMES``) so that the same path shows up
in several layers with different types: that is where overlay behaviour is
interesting (whiteouts over directories, files hiding directories, merged
and opaque directories).  The values and the builder (``materialise``) live
in ``cowfs.testing.layers``, which needs no Hypothesis; they are re-exported
here so that printed reproductions import from one place.
"""

from __future__ import annotations

try:
    from hypothesis import strategies as st
except ModuleNotFoundError as e:  # the values and the builder need no Hypothesis: cowfs.testing.layers
    raise ImportError("cowfs.testing.strategies needs Hypothesis, which comes with cowfs's test extra: "
                      "pip install 'cowfs[test]' (or import StackSpec and materialise from cowfs.testing.layers, "
                      "which need no Hypothesis)", name=e.name) from e

from cowfs.testing.layers import (
    PINNED_TIME_NS,
    USER,
    Device,
    Dir,
    Fifo,
    File,
    HardLink,
    Layer,
    Oct,
    Pattern,
    Socket,
    StackSpec,
    Symlink,
    Whiteout,
    describe,
    materialise,
    materialise_layer,
    pin_times,
)

LONG_NAME = "l" * 250 + "-long"  # 255 bytes, NAME_MAX: copy-up, whiteouts and staging names must fit
NAMES = ("a", "b", "c", LONG_NAME)
FILE_MODES = tuple(Oct(m) for m in (0o644, 0o755, 0o600, 0o444, 0o000, 0o4755, 0o2755, 0o6711, 0o1644, 0o640))
DIR_MODES = tuple(Oct(m) for m in (0o755, 0o700, 0o1777, 0o555, 0o2775, 0o711))
OWNERS = ((0, 0), (USER, USER), (0, USER), (USER, 0))
SYMLINK_TARGETS = (
    "a", "b/c", "../a", "../../b", "..", ".", "nowhere", "a/nowhere",  # relative, some dangling
    "/a", "/b/c", "/etc/passwd", "/", "../../../../../../etc",          # absolute and pointing up and out
)
XATTR_NAMES = ("user.a", "user.b", "user.long.name")
# `setcap cap_net_raw+ep`: a VFS_CAP_REVISION_2 struct (a chown or a write drops it; copy-up keeps it)
CAPABILITY = ("security.capability", bytes.fromhex("01000002" "00200000" "00000000" "00000000" "00000000"))
DEVICES = ((1, 3), (1, 5), (0, 1), (0, 7), (0, 255), (5, 1), (7, 0), (8, 1), (259, 65536))  # 0/N: no whiteout
XATTR_VALUES = (b"", b"1", b"value", b"\x00\xff")
DATA = (b"", b"x", b"hello\n", b"0123456789abcdef", Pattern(5000), Pattern(200_000))
HOLES = (0, 0, 0, (2 << 20) + 4096)  # holes the kernel's copy-up keeps too (see stacks())
SMALL_HOLES = (4096, 70_000, 1 << 20)


# --------------------------------------------------------------------------
# strategies

names = st.sampled_from(NAMES)
file_modes = st.sampled_from(FILE_MODES)
dir_modes = st.sampled_from(DIR_MODES)
owners = st.sampled_from(OWNERS)
xattr_sets = st.lists(st.tuples(st.sampled_from(XATTR_NAMES), st.sampled_from(XATTR_VALUES)),
                      max_size=2, unique_by=lambda kv: kv[0]).map(tuple)
file_xattr_sets = st.one_of(xattr_sets, xattr_sets, xattr_sets, xattr_sets.map(lambda xs: (*xs, CAPABILITY)))


def _file(path, small_holes=True):
    holes = HOLES + SMALL_HOLES if small_holes else HOLES
    return st.builds(File, st.just(path), data=st.sampled_from(DATA), hole=st.sampled_from(holes),
                     tail=st.sampled_from((b"", b"", b"end")), mode=file_modes, owner=owners,
                     xattrs=file_xattr_sets)


def _device(path):
    return st.sampled_from(DEVICES).flatmap(lambda numbers: st.builds(
        Device, st.just(path), st.just(numbers[0]), st.just(numbers[1]), mode=file_modes, block=st.booleans()))


def _leaf(path, small_holes=True):
    return st.one_of(
        _file(path, small_holes),
        _file(path, small_holes),
        st.builds(Symlink, st.just(path), st.sampled_from(SYMLINK_TARGETS)),
        st.builds(Whiteout, st.just(path)),
        st.builds(HardLink, st.just(path), st.integers(0, 3)),
        st.builds(Fifo, st.just(path), file_modes),
        _device(path),
        st.builds(Socket, st.just(path), file_modes),
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
    """One lower layer: files (holes, user xattrs, file capabilities, odd modes, setuid), dirs (some
    opaque), symlinks, hard links, FIFOs, character and block devices (major 0 among them), sockets and
    whiteouts, named from ``NAMES`` (one of them 255 bytes long), at most *max_depth* deep."""
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
    ENOENT; see ``KNOWN_DIFFERENCES["unmerged_whiteouts"]`` in ``cowfs.testing.harness``.
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


__all__ = [
    "NAMES", "PINNED_TIME_NS", "USER", "Oct", "Pattern", "File", "Dir", "Symlink", "HardLink", "Fifo", "Device",
    "Socket", "Whiteout", "Layer", "StackSpec", "layers", "stacks", "contributing_layers", "drop_unmerged_whiteouts",
    "materialise", "materialise_layer", "pin_times", "describe",
]
