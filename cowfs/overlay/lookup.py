"""Resolving a path through the layers and merging directory listings, by the kernel overlay's rules.

Assumptions, as in the kernel: lower layers never change while mounted; the
upper changes only through this process. So where each name is found can be
cached until the next change of names in the upper (`Layers.forget`); the
attributes of an object are read afresh when asked for. And a lower
directory's names, read once, answer for good which of the lower layers a
merged directory spans can hold a name: a lookup asks only those (and the
upper and the bottom layer), so its cost does not grow with the depth of the
stack (as fuse-overlayfs reads each layer's directory once).

Lookup rules for one name, walking the layers from the upper down:
- a whiteout (char device 0/0, or an OCI `.wh.NAME` in a lower with
  `oci_whiteouts`) ends the walk: below it the name does not exist;
- a non-directory decides when it is found first, and ends the walk;
- directories merge until one is opaque, or a non-directory is met;
- a redirect xattr on a directory moves the walk, for the layers below it,
  to another lower path (absolute from the stack root, or a sibling name).
The daemon never follows a symlink found in a layer: each component is
looked up with lstat, and only directories are descended into.
"""

import dataclasses
import errno
import os
import stat

from cowfs.errors import os_error
from cowfs.overlay import handles, override
from cowfs.overlay.filesystems import Filesystems
from cowfs.overlay.whiteout import (
    IMPURE,
    KERNEL_ORIGIN,
    METACOPY,
    OCI_OPAQUE,
    ORIGIN,
    REDIRECT,
    get_marker,
    is_oci_marker,
    is_opaque,
    is_whiteout,
    oci_marked_name,
    oci_marker,
)

LONG_PATH = 3072  # bytes: a path this long goes through a directory descriptor (PATH_MAX is 4096)
PATH_CHUNK = 2048  # where long paths are cut, so that neighbours share a descriptor


@dataclasses.dataclass(frozen=True, slots=True)
class Node:
    """One name of the merged view: the entry that decides it and, for a directory, every part merged into it."""

    path: str           # merged path, "/" for the root
    layer: int          # the layer whose entry decides: 0 is the upper, 1..N the lowers
    real: str           # that entry's path on disk
    st: os.stat_result  # its lstat at lookup: type and identity hold; size, mode, times may have changed since
    parts: tuple        # ((layer, path relative to that layer's root), ...), top to bottom
    redirect: str = None  # the redirect xattr of the deciding directory (or metacopy file), if any
    data: str = None  # for a metadata-only copy (metacopy=on): the lower file that still holds the data
    index: str = None  # index=on, a lower hard link another name of which was copied up: its index entry,
    # the upper inode that `real` then is (the name is still the lower's)

    @property
    def is_dir(self):
        return stat.S_ISDIR(self.st.st_mode)

    @property
    def in_upper(self):
        return self.layer == 0

    @property
    def has_lower(self):
        """True when some lower layer contributes to this object ("merge or lower" in kernel terms)."""
        return any(layer > 0 for layer, _ in self.parts)


def renamed_paths(paths, old, new, exchange=False):
    """[(path, its new path)] for those of `paths` at or under `old` when `old` is renamed to `new`;
    with `exchange`, those at or under `new` go to `old` too."""
    moves = [(p, new + p[len(old):]) for p in paths if p == old or p.startswith(old + "/")]
    if exchange:
        moves += [(p, old + p[len(new):]) for p in paths if p == new or p.startswith(new + "/")]
    return moves


def _data_path(path, redirect):
    """Where a walk goes after `redirect` (for the data-only layers too): None until a redirect is absolute
    (only those lead there), then that path, a relative redirect replacing its last component."""
    if redirect.startswith("/"):
        return redirect.strip("/")
    if path is None:
        return None
    head = path.rpartition("/")[0]
    return (head + "/" if head else "") + redirect


def parent_of(path):
    head, _, name = path.rpartition("/")
    return (head or "/"), name


def join(path, name):
    return path + name if path.endswith("/") else path + "/" + name


class _WithUnlisted(dict):
    """An index of a directory some of whose layers could not be listed: those layers may hold any name."""

    def __init__(self, index, unlisted, order):
        super().__init__(index)
        self.unlisted, self.order = unlisted, order

    def get(self, name, default=()):
        found = super().get(name, ())
        return tuple(sorted(found + self.unlisted, key=self.order.__getitem__))


class Layers:
    """The layer roots of a stack and the lookup rules over them; answers are cached until `forget`."""

    CACHE_LIMIT = 20_000
    LISTING_LIMIT = 1_000_000  # names of lower directories kept in memory, in all (one directory may be more)
    LISTING_MIN_PARTS = 3  # a directory in fewer layers is looked up with lstat alone

    def __init__(self, stack):
        self.roots = [stack.upper] + list(stack.lowers) + list(stack.data_lowers)
        self.first_data = 1 + len(stack.lowers)  # the data-only layers: from here to the end, never by name
        self.prefix = stack.prefix
        self.oci = stack.oci_whiteouts
        self.follow_redirects = stack.follow_redirects
        self.metacopy = stack.metacopy
        self.filesystems = Filesystems(stack)  # their numbers (st_ino's high bits) and UUIDs
        # The layers with recorded attributes (see override.py), found once by their roots, as
        # fuse-overlayfs finds them; only a stack with one pays for reading the xattr.
        self.marked = frozenset(i for i, root in enumerate(self.roots) if root is not None and override.is_marked(root))
        self._cache = {}
        # Names of lower directories, read once each (lower layers never change): a lookup in a directory
        # many layers share asks only the layers that hold the name, whatever the depth of the stack.
        self._listings = {}  # (layer, rel of a directory) -> frozenset of its names, or None (unreadable)
        self._listed_names = 0
        self._indexes = {}  # the parts of a merged directory -> {name: the parts holding it} (see _candidates)
        self._indexed_names = 0
        self._dir_fds = {}  # layer -> {head of a long path: its directory's descriptor} (see real)
        self._retired = []  # upper descriptors still named by paths of the running operation
        # Numbers kept in memory for copies that cannot carry the origin xattr (symlinks and
        # special files under userxattr): merged path -> st_ino, as the kernel's cached inode keeps it.
        self.remembered = {}
        # Data in data-only layers that has been opened: the kernel looks such data up only when first
        # needed, and until then shows its blocks as the size rounded up to pages.
        self.data_reached = set()
        self.index = None  # WORKDIR/index with index=on (set by the engine once the workdir is claimed)
        self._origins = {}  # an origin xattr's value -> the st_ino it gives (None: not to be used)

    def forget(self):
        """Drop every cached answer: the upper has changed."""
        self._cache = {}
        if self._dir_fds.get(0):  # upper directories may have moved: their descriptors retire
            self._retired.extend(self._dir_fds.pop(0).values())

    def start(self):
        """An outermost operation begins: no path of an earlier one is in use, so the descriptors
        retired since can go."""
        while self._retired:
            os.close(self._retired.pop())

    def real(self, layer, rel):
        """The path of `rel` in `layer`, as the system calls take it.

        A path longer than PATH_MAX is reached, as the kernel reaches it, from
        a directory's descriptor: its head (at a fixed chunk boundary, so that
        neighbours share it) is opened one component at a time and named
        through /proc/self/fd, and the path stays short."""
        root = self.roots[layer]
        path = root + "/" + rel if rel else root
        if len(path) < LONG_PATH:
            return path
        cut = rel.rfind("/", 0, (len(rel) // PATH_CHUNK) * PATH_CHUNK)
        if cut <= 0:  # no head to cut within the path: from the layer's root, as the kernel has no limit
            return f"/proc/self/fd/{self._dir_fd(layer, '')}/{rel}"
        return f"/proc/self/fd/{self._dir_fd(layer, rel[:cut])}/{rel[cut + 1:]}"

    def _dir_fd(self, layer, head):
        fds = self._dir_fds.setdefault(layer, {})
        fd = fds.get(head)
        if fd is None:
            fd = fds[head] = os.open(self.real(layer, head) if head else self.roots[layer],
                                     os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        return fd

    # -- inode numbers -------------------------------------------------------------------------
    def map_ino(self, st):
        """A st_ino unique across the layers' filesystems, as the kernel's xino makes it."""
        return self.filesystems.map_ino(st.st_dev, st.st_ino)

    def map_dev_ino(self, dev, ino):
        return self.filesystems.map_ino(dev, ino)

    def ino(self, node):
        """st_ino as the merged view shows it: an upper copy keeps the number its lower origin had."""
        if node.in_upper and node.path != "/":  # the root shows its own, as the kernel's (index=on gives it an origin)
            if node.is_dir and node.has_lower:  # merged: its top lower's, found by name whatever its origin says
                return self.map_ino(os.lstat(self.real(*node.parts[1])))
            number = self.upper_origin_ino(node.real, node.path)
            if number is not None:
                return number
        elif node.index is not None:  # an indexed lower hard link: the number of its origin, as the kernel's
            return self.map_ino(os.lstat(self.real(*node.parts[0])))
        return self.map_ino(node.st)

    def upper_origin_ino(self, real, path=None):
        """The st_ino the upper object at `real` (merged `path`), or open at descriptor `real`, shows by
        its origin; None for its own."""
        nofollow = {} if isinstance(real, int) else {"follow_symlinks": False}
        try:
            value = os.getxattr(real, self.prefix + KERNEL_ORIGIN, **nofollow)
        except OSError as e:
            if e.errno not in (errno.ENODATA, errno.ENOTSUP, errno.EPERM, errno.ENOENT):
                raise
            value = None
        if value is not None:
            number = self._origins.get(value, False)
            if number is False:
                number = self._origins[value] = self._decode_origin(value)
            if number is not None:
                return number
        try:  # what cowfs recorded before it wrote the kernel's
            return int(os.getxattr(real, self.prefix + ORIGIN, **nofollow))
        except (OSError, ValueError):
            return self.remembered.get(path)

    def _decode_origin(self, value):
        """The st_ino an origin file handle gives, as the kernel finds it: in the first lower layer
        that holds it, on a filesystem of the handle's UUID (the null UUID with uuid=off); None when it is
        unknown or gone."""
        try:
            decoded = handles.decode(value)
        except ValueError:
            return None  # the kernel warns "invalid origin" and goes on without it
        if decoded is None:
            return None
        _, kind, uuid, data = decoded
        for layer in range(1, len(self.roots)):
            root = self.roots[layer]
            dev = os.stat(root).st_dev
            if not self.filesystems.follows(dev, uuid):
                continue
            try:
                fd = handles.open_handle(root, kind, data)
            except OSError as e:
                if e.errno == errno.EPERM:  # no CAP_DAC_READ_SEARCH: the number the handle carries
                    number = handles.handle_ino(kind, data)
                    return None if number is None else self.map_dev_ino(dev, number)
                if e.errno == errno.ESTALE:
                    continue  # not on this layer's filesystem: the next may hold it
                if e.errno in (errno.ENOENT, errno.EINVAL, errno.EOPNOTSUPP):
                    return None
                raise
            try:
                st = os.fstat(fd)
            finally:
                os.close(fd)
            # As the kernel: a lower hard link's number only for an indexed copy (it would be shared by
            # the names a copy-up without index broke apart)
            if stat.S_ISDIR(st.st_mode) or st.st_nlink == 1 or self.index is not None:
                return self.map_ino(st)
            return None
        return None

    def origin_handle(self, src, st, indexed=False):
        """The origin xattr value for a copy-up of lower object `src` (a path or descriptor) with lstat
        `st`: its file handle, as the kernel records it; None when none is recorded (a lower hard
        link, whose copy-up breaks it unless indexed; a filesystem without file handles)."""
        if not (stat.S_ISDIR(st.st_mode) or st.st_nlink == 1 or indexed):
            return None
        try:
            return handles.encode(src, self.filesystems.handle_uuid(st.st_dev))
        except KeyError:  # not on a layer's filesystem
            return None
        except OSError as e:
            if e.errno in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL, errno.EPERM):
                return None
            raise

    def origin_ino(self, st):
        """The number to keep in memory when a copy cannot carry the origin xattr (a symlink or special file
        under userxattr), or None when it must not be kept.

        As in the kernel with index=off, a lower hard link may be broken by copy-up,
        so a lower file with several links does not pass its number on.
        """
        if stat.S_ISDIR(st.st_mode) or st.st_nlink == 1:
            return self.map_ino(st)
        return None

    # -- lookup ----------------------------------------------------------------------------------
    def root(self):
        parts = tuple((layer, "") for layer, root in enumerate(self.roots[:self.first_data]) if root is not None)
        top = parts[0][0]
        real = self.roots[top]
        return Node("/", top, real, os.lstat(real), parts)

    def resolve(self, path):
        """The node at merged `path`, or None when nothing is there. Raises ENOTDIR through a non-directory.

        Walks down from the nearest cached ancestor, without recursion: paths may be thousands deep."""
        below = []  # the paths to look up, deepest first
        node = self._cache.get(path, False)
        while node is False and path != "/":
            below.append(path)
            path = parent_of(path)[0]
            node = self._cache.get(path, False)
        if node is False:
            node = self._keep("/", self.root())
        for path in reversed(below):
            if node is not None:
                if not node.is_dir:
                    raise os_error(errno.ENOTDIR, path)
                node = self.child(node, parent_of(path)[1])
            self._keep(path, node)
        return node

    def _keep(self, path, node):
        if len(self._cache) >= self.CACHE_LIMIT:
            self._cache = {}
        self._cache[path] = node
        return node

    def resolve_required(self, path):
        node = self.resolve(path)
        if node is None:
            raise os_error(errno.ENOENT, path)
        return node

    def _listing(self, layer, head):
        """The names in lower directory `head` of `layer`, read once and kept (within LISTING_LIMIT names
        in all, the oldest listings dropped first); None when it cannot be listed (then lstat decides)."""
        key = (layer, head)
        names = self._listings.get(key, False)
        if names is False:
            try:
                names = frozenset(os.listdir(self.real(layer, head)))
            except OSError:
                names = None
            while self._listings and self._listed_names + len(names or ()) > self.LISTING_LIMIT:
                dropped = self._listings.pop(next(iter(self._listings)))
                self._listed_names -= len(dropped or ())
            self._listings[key] = names
            self._listed_names += len(names or ())
        return names

    def _candidates(self, parent, name):
        """The parts of `parent` (its (layer, rel) pairs) that may hold `name`: the upper's, the lower ones whose
        directory lists it (or its OCI whiteout), and the bottom one, which is asked with one lstat rather
        than read whole. Only for a directory in LISTING_MIN_PARTS layers or more; else all of its parts."""
        parts = parent.parts
        if len(parts) < self.LISTING_MIN_PARTS:
            return parts
        index = self._indexes.get(parts)
        if index is None:
            index = self._index(parts)
        head = (parts[0],) if parts[0][0] == 0 else ()
        return head + index.get(name, ()) + (parts[-1],)

    def _index(self, parts):
        """name -> the middle lower parts holding it (or its OCI whiteout), top first, from their listings;
        a part that cannot be listed holds every name."""
        index = {}
        unlisted = []
        for part in parts[1 if parts[0][0] == 0 else 0:-1]:
            names = self._listing(*part)
            if names is None:
                unlisted.append(part)
                continue
            for entry in names:
                if self.oci and is_oci_marker(entry) and entry != OCI_OPAQUE:
                    entry = oci_marked_name(entry)
                found = index.get(entry)
                if found is None:
                    index[entry] = (part,)
                elif found[-1] != part:
                    index[entry] = found + (part,)
        if unlisted:  # every name may be there: keep the order of the layers
            order = {part: i for i, part in enumerate(parts)}
            index = _WithUnlisted(index, tuple(unlisted), order)
        while self._indexes and self._indexed_names + len(index) > self.LISTING_LIMIT:
            self._indexed_names -= len(self._indexes.pop(next(iter(self._indexes))))
        self._indexes[parts] = index
        self._indexed_names += len(index)
        return index

    def _oci_deleted(self, layer, rel):
        if layer == 0 or not self.oci:
            return False
        head, _, name = rel.rpartition("/")
        return os.path.lexists(self.real(layer, (head + "/" if head else "") + oci_marker(name)))

    def _opaque(self, layer, real):
        if is_opaque(real, self.prefix):
            return True
        return layer > 0 and self.oci and os.path.lexists(real + "/" + OCI_OPAQUE)

    def _above(self, parent, layer, rel, path):
        """How the walk of an absolute redirect's path `rel` goes through the directories above its last
        component in lower `layer`, as the kernel's lookup walks it: (reached, stop, moved).

        Not reached: a directory on the way is missing (the layers below are still looked in) or is not a
        directory (a whiteout, a file, a symlink: the lookup stops there). An opaque directory on the way
        stops the lookup after this layer. A redirect of a directory on the way changes the path that the
        layers below look for (`moved`, absolute); an absolute one lifts the stop of an opaque one above."""
        names = rel.split("/")
        current, real, stop, moved = list(names), self.roots[layer], False, None
        reads = self._reads_redirect(parent, layer)
        for depth, component in enumerate(names[:-1]):
            real += "/" + component
            try:
                st = os.lstat(real)
            except (FileNotFoundError, NotADirectoryError):
                return False, stop, moved
            if not stat.S_ISDIR(st.st_mode):
                return False, True, moved
            if not reads:
                continue
            if self._opaque(layer, real):
                stop = True
                continue
            redirect = get_marker(real, self.prefix, REDIRECT)
            if redirect is not None:
                self._check_redirect(redirect, path)
                post = names[depth + 1:]
                if redirect.startswith("/"):
                    current, stop = redirect.split("/")[1:] + post, False  # checked: no empty name
                else:  # in place of this component, in the path as it is now
                    at = len(current) - len(names) + depth
                    current = current[:at] + [redirect] + post
                moved = "/" + "/".join(current)
        return True, stop, moved

    def _through_dirs(self, layer, rel):
        """True when every component above the last of `rel` is a real directory in `layer`:
        a redirect is walked with lstat, never through a symlink found in a layer."""
        real = self.roots[layer]
        for component in rel.split("/")[:-1]:
            real += "/" + component
            try:
                if not stat.S_ISDIR(os.lstat(real).st_mode):
                    return False
            except (FileNotFoundError, NotADirectoryError):
                return False
        return True

    @staticmethod
    def _check_redirect(redirect, path):
        """Refuse a redirect that would leave the layers, as the kernel does."""
        if not redirect or (not redirect.startswith("/") and "/" in redirect):
            raise os_error(errno.EINVAL, path)  # a relative redirect is one name
        names = redirect[1:].split("/") if redirect.startswith("/") else (redirect,)
        if "" in names:
            raise os_error(errno.EINVAL, path)  # an absolute one has no empty name, nor a slash at its end
        if any(c in (".", "..") for c in names):
            raise os_error(errno.EACCES, path)  # as the kernel's lookup of "." or ".."

    def _targets(self, parent, name, candidates=None):
        """Yield (layer, rel) to look at for `name`, top to bottom; the walk sends back each redirect it meets.

        As in the kernel, a redirect replaces the last component of what is looked
        up: a relative one keeps the walk beside the name (or beside an earlier
        absolute redirect); an absolute one restarts it from the layer roots.
        """
        absolute, target = False, name
        parts = parent.parts if candidates is None else candidates  # those that may hold `name` itself
        pos, last = 0, -1
        while True:
            if absolute:
                layer = next((i for i in range(last + 1, self.first_data) if self.roots[i] is not None), None)
                if layer is None:
                    return
                rel = target
            else:
                while pos < len(parts) and parts[pos][0] <= last:
                    pos += 1
                if pos == len(parts):
                    return
                layer, prel = parts[pos]
                rel = (prel + "/" if prel else "") + target
            last = layer
            redirect = yield layer, rel
            while redirect is not None:  # each send is acknowledged; one layer may send two
                if redirect.startswith("/"):
                    absolute, target = True, redirect.strip("/")
                else:
                    head = target.rpartition("/")[0]
                    target = (head + "/" if head else "") + redirect
                    parts, pos = parent.parts, 0  # another name: every layer below may hold it
                redirect = yield None

    def _reads_redirect(self, parent, layer):
        """Whether the redirect of a directory found in `layer` is read, as the kernel's lookup does: when
        following redirects, in every layer but the bottom one (below it they lead nowhere); when not, only
        while the parent has a layer below `layer`, where the redirect would lead (and is refused)."""
        if self.follow_redirects:
            return layer < len(self.roots) - 1
        return parent.parts[-1][0] > layer

    def lookup_refused(self, parent, name):
        """True when the lookup of `name` in directory `parent` fails (see `refusing_lookups`)."""
        try:
            self.child(parent, name)
        except OSError:
            return True
        return False

    def _metacopy_refused(self, node):
        """Whether a listing of directory `node` must check its upper files for the metacopy marker: without
        metacopy=on their lookup fails (EPERM), and the kernel's readdir of an impure upper directory looks
        its entries up (see `refusing_lookups`)."""
        return (not self.metacopy and node.parts[0][0] == 0
                and get_marker(self.real(0, node.parts[0][1]), self.prefix, IMPURE) == "y")

    def refusing_lookups(self, node):
        """Whether a listing of directory `node` leaves out the upper entries whose lookup fails: not
        following redirects, in a merged directory whose upper is impure. The kernel's readdir looks the
        entries of an impure upper directory up for their inode numbers, and drops those it cannot (a
        lookup refused for a redirect, here or below); other modes leave it to the lookup."""
        return (not self.follow_redirects and node.parts[0][0] == 0 and self._reads_redirect(node, 0)
                and get_marker(self.real(0, node.parts[0][1]), self.prefix, IMPURE) == "y")

    def _data_redirect(self, real, parent, name):
        """The redirect of metadata-only file `real` (`name` in `parent`), checked: where the walk goes on
        to find its data; None without one."""
        redirect = get_marker(real, self.prefix, REDIRECT)
        if redirect:
            self._check_redirect(redirect, join(parent.path, name))
        return redirect or None

    def child(self, parent, name):
        """Look `name` up in the directory `parent`; None when it does not exist in the merged view."""
        found = []
        redirect_seen = None
        data_path = None  # after an absolute redirect: the path it leads to (walked from the layers' roots)
        data_wanted, data = False, None
        stop = False  # after this layer: an opaque directory above an absolute redirect's target
        walk = self._targets(parent, name, self._candidates(parent, name))
        for layer, rel in walk:
            if stop:
                break
            if layer > 0 and self.oci and is_oci_marker(name) and redirect_seen is None:
                continue  # OCI markers in lower layers never show in the merged view
            if data_path is not None and "/" in rel:
                reached, stop, moved = self._above(parent, layer, rel, join(parent.path, name))
                if moved is not None:  # for the layers below
                    redirect_seen, data_path = moved, _data_path(data_path, moved)
                    walk.send(moved)
                if not reached:
                    if stop:
                        break
                    continue
            real = self.real(layer, rel)
            try:
                st = os.lstat(real)
            except (FileNotFoundError, NotADirectoryError):
                if self._oci_deleted(layer, rel):
                    break
                continue
            if is_whiteout(st):
                break
            if data_wanted:  # below a metadata-only copy: the first regular file holds its data
                if stat.S_ISREG(st.st_mode):
                    found.append((layer, rel, real, st))
                    if get_marker(real, self.prefix, METACOPY) is None:
                        data = real
                        break
                    # itself metadata only (a lower layer that was once an upper, or a composefs-style
                    # metadata layer): its redirect leads on
                    redirect = self._data_redirect(real, parent, name)
                    if redirect:
                        redirect_seen, data_path = redirect, _data_path(data_path, redirect)
                        walk.send(redirect)
                    continue
                break
            if not stat.S_ISDIR(st.st_mode):
                if found:
                    break
                found.append((layer, rel, real, st))
                if stat.S_ISREG(st.st_mode) and get_marker(real, self.prefix, METACOPY) is not None:
                    if not self.metacopy:
                        raise os_error(errno.EPERM, join(parent.path, name))  # as the kernel without metacopy=on
                    data_wanted = True
                    redirect = self._data_redirect(real, parent, name)
                    if redirect:
                        redirect_seen, data_path = redirect, _data_path(data_path, redirect)
                        walk.send(redirect)
                    continue
                break
            found.append((layer, rel, real, st))
            if self._oci_deleted(layer, rel) or self._opaque(layer, real):
                break
            if self._reads_redirect(parent, layer):
                redirect = get_marker(real, self.prefix, REDIRECT)
                if redirect is not None:
                    self._check_redirect(redirect, join(parent.path, name))
                    if not self.follow_redirects:  # the kernel logs "refusing to follow redirect"
                        raise os_error(errno.EPERM, join(parent.path, name))
                    redirect_seen, data_path = redirect, _data_path(data_path, redirect)
                    stop = stop and not redirect.startswith("/")
                    walk.send(redirect)
        if not found:
            return None
        if data_wanted and data is None and data_path is not None and self.first_data < len(self.roots):
            # As the kernel, which looks in the data-only layers only when the data is first needed: the
            # name exists; reaching its data fails with ENOENT (the path where it was sought).
            data = self._data_only(data_path) or self.real(self.first_data, data_path)
        if data_wanted and data is None:
            raise os_error(errno.EIO, join(parent.path, name))  # a metadata-only copy whose data is gone
        layer, _, real, st = found[0]
        top_redirect = get_marker(real, self.prefix, REDIRECT) if layer == 0 and (
            stat.S_ISDIR(st.st_mode) or data_wanted) else None
        parts = tuple((i, r) for i, r, _, _ in found)
        if layer > 0 and self.index is not None and st.st_nlink > 1 and not stat.S_ISDIR(st.st_mode):
            entry = self.index_entry(real, st, join(parent.path, name))
            if entry is not None:  # another name of this lower file was copied up: this name is that inode
                if get_marker(entry, self.prefix, METACOPY) is None:
                    return Node(join(parent.path, name), layer, entry, os.lstat(entry), parts, index=entry)
                if not self.metacopy:  # the kernel refuses to follow a metadata-only index entry's origin
                    raise os_error(errno.EPERM, join(parent.path, name))
                # a metadata-only copy (metacopy=on): its data is still this lower file's
                return Node(join(parent.path, name), layer, entry, os.lstat(entry), parts,
                            get_marker(entry, self.prefix, REDIRECT), data or real, entry)
        return Node(join(parent.path, name), layer, real, st, parts, top_redirect, data)

    def data_unreached(self, data):
        """Whether `data` is in a data-only layer and not yet opened (see data_reached)."""
        return data not in self.data_reached and any(
            data.startswith(root + "/") for root in self.roots[self.first_data:])

    def _data_only(self, rel):
        """The data of a metacopy file whose absolute redirect leads to `rel`: the first regular file at
        `rel` in the data-only layers (no whiteout, opaque dir or symlink counts there), or None."""
        for layer in range(self.first_data, len(self.roots)):
            if not self._through_dirs(layer, rel):
                continue
            real = self.real(layer, rel)
            try:
                if stat.S_ISREG(os.lstat(real).st_mode):
                    return real
            except (FileNotFoundError, NotADirectoryError):
                continue
        return None

    def index_entry(self, real, st, path):
        """index=on: the path of the index entry of lower object `real` (lstat `st`, merged `path`) when it
        has one. EIO for an entry that is a whiteout or another kind of object, as the kernel's "bad index"."""
        origin = self.origin_handle(real, st, indexed=True)
        if origin is None:
            return None
        entry = self.index + "/" + handles.index_name(origin)
        try:
            entry_st = os.lstat(entry)
        except FileNotFoundError:
            return None
        if is_whiteout(entry_st) or stat.S_IFMT(entry_st.st_mode) != stat.S_IFMT(st.st_mode):
            raise os_error(errno.EIO, path)  # a lower name whose index says all its names are gone, or another object
        return entry

    def lower_positive(self, parent, name):
        """True when a lower layer shows `name` under `parent`: removing it from the upper needs a whiteout."""
        for layer, prel in self._candidates(parent, name):
            if layer == 0:
                continue
            rel = (prel + "/" if prel else "") + name
            if self.oci and is_oci_marker(name):
                return False
            try:
                st = os.lstat(self.real(layer, rel))
            except (FileNotFoundError, NotADirectoryError):
                if self._oci_deleted(layer, rel):
                    return False
                continue
            return not is_whiteout(st)
        return False

    # -- listing ---------------------------------------------------------------------------------
    def list_dir(self, node):
        """The merged listing of a directory: [(name, layer, DirEntry)], upper names first, each name once."""
        seen = set()
        entries = []
        refusing = self.refusing_lookups(node)
        unread_copies = self._metacopy_refused(node)
        for layer, rel in node.parts:
            hidden_below = []
            with os.scandir(self.real(layer, rel)) as it:
                for entry in it:
                    name = entry.name
                    if layer > 0 and self.oci and is_oci_marker(name):
                        if name != OCI_OPAQUE:
                            hidden_below.append(oci_marked_name(name))
                        continue
                    if name in seen:
                        continue
                    seen.add(name)
                    if not (entry.is_dir(follow_symlinks=False) or entry.is_file(follow_symlinks=False)
                            or entry.is_symlink()) and is_whiteout(entry.stat(follow_symlinks=False)):
                        continue
                    if refusing and layer == 0 and self.lookup_refused(node, name):
                        continue
                    if unread_copies and layer == 0 and entry.is_file(follow_symlinks=False) \
                            and get_marker(entry.path, self.prefix, METACOPY) is not None:
                        if len(node.parts) == 1:  # the kernel's readdir of an impure upper directory fails
                            raise os_error(errno.EPERM, node.path)
                        continue  # a merged one leaves it out
                    entries.append((name, layer, entry))
            seen.update(hidden_below)
        return entries

    def entry_ino(self, layer, entry, path, dev):
        """st_ino of an entry listed from a directory on device `dev`, the number getattr gives,
        at the cost of a syscall only in the upper."""
        if layer == 0:
            number = self.upper_origin_ino(entry.path, path)
            if number is not None:
                return number
        return self.map_dev_ino(dev, entry.inode())
