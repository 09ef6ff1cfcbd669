"""The inodes the kernel knows: node ids, the names each was found under, and lookup counts.

One node id per merged object (keyed by its merged st_ino and type, as the
kernel overlay keys its inodes), so every name of a hard-linked file is one
kernel inode. The merged path the engine needs is rebuilt from the names, so
depth and renames of parents cost nothing here. Pure bookkeeping: no FUSE
calls and no engine calls, one short lock around each change.
"""

import contextlib
import errno
import itertools
import os
import stat
import threading

ROOT_ID = 1


_KINDS = {kind: kind for kind in (stat.S_IFREG, stat.S_IFDIR, stat.S_IFLNK, stat.S_IFCHR, stat.S_IFBLK,
                                  stat.S_IFIFO, stat.S_IFSOCK)}


class Inode:
    """One kernel inode. Its names are the first one (`parent`, `name`) and, for a file with
    several, the others in `more`; `kids` maps the names found inside a directory."""

    __slots__ = ("id", "key", "kind", "nlookup", "parent", "name", "more", "kids", "handles")

    def __init__(self, node_id, key, kind):
        self.id = node_id
        self.key = key          # see key_of, or None once the object may be gone
        self.kind = _KINDS.get(kind, kind)  # the file type bits, one shared int per type: an inode never
                                # changes kind (the kernel would take it for a bad one and fail every use
                                # of it with EIO)
        self.nlookup = 0        # lookups the kernel has not forgotten
        self.parent = None      # first name, by which the engine's path is built (None: no name left)
        self.name = None
        self.more = None        # [(parent Inode, name)] of further names of a hard-linked file
        self.kids = None        # {name: Inode} of the names known inside this directory
        self.handles = None     # the set of open file handles (fh) on this inode, once there is one

    def names(self):
        first = [] if self.parent is None else [(self.parent, self.name)]
        return first + (self.more or [])


def identity(attrs):
    """The merged number and type: the same object, whatever name it is reached by."""
    return attrs["st_ino"], stat.S_IFMT(attrs["st_mode"])


def key_of(attrs, parent=None, name=None):
    """What makes two names one inode: the merged number and type, as the kernel overlay hashes its
    inodes; a lower hard link, which a copy-up breaks, is one inode per name."""
    if attrs.get("lower_link"):
        return (*identity(attrs), parent.id, name)
    return identity(attrs)


def _shared(attrs):
    """Whether another name may lead to this object: only a hard-linked file of the upper."""
    return attrs["st_nlink"] > 1 and not attrs.get("lower_link") and not stat.S_ISDIR(attrs["st_mode"])


class InodeTable:
    def __init__(self):
        self.lock = threading.Lock()
        self.root = Inode(ROOT_ID, None, stat.S_IFDIR)
        self.root.nlookup = 1
        self._by_id = {ROOT_ID: self.root}
        self._by_key = {}  # key -> Inode, for hard-linked files only (see _shared)
        self._ids = itertools.count(ROOT_ID + 1)
        self.generation = 0  # moves of names so far, counted at their start and at their end
        self.moving = 0  # moves under way: a path read now may be out of date
        self._moved = threading.Condition(threading.Lock())
        self._mover = threading.local()  # set while this thread moves names

    @contextlib.contextmanager
    def moving_names(self):
        """Bracket a change of names in the engine and here: a path read meanwhile is worth a retry."""
        with self._moved:
            self.moving += 1
            self.generation += 1
        self._mover.active = True
        try:
            yield
        finally:
            self._mover.active = False
            with self._moved:
                self.moving -= 1
                self.generation += 1
                self._moved.notify_all()

    def settled(self, generation, timeout):
        """True when names moved since `generation` was read (waiting, up to `timeout`, for a move
        that was under way then to end): a path read at `generation` is worth reading again."""
        others = self.moving - (1 if getattr(self._mover, "active", False) else 0)  # never wait on oneself
        with self._moved:
            if self.generation == generation and others > 0:
                self._moved.wait_for(lambda: self.generation != generation, timeout)
            return self.generation != generation

    def __len__(self):
        return len(self._by_id)

    def get(self, node_id):
        inode = self._by_id.get(node_id)
        if inode is None:
            raise OSError(errno.ESTALE, os.strerror(errno.ESTALE))  # a node id we never gave, or forgot
        return inode

    # -- paths -----------------------------------------------------------------------------------
    def path(self, inode):
        """The merged path of `inode` by its first name; None when it has no name left (unlinked)."""
        parts = []
        with self.lock:
            while inode is not self.root:
                if inode.parent is None:
                    return None
                parts.append(inode.name)
                inode = inode.parent
        return "/" + "/".join(reversed(parts))

    def child_path(self, parent, name):
        base = self.path(parent)
        if base is None:
            raise OSError(errno.ENOENT, os.strerror(errno.ENOENT))  # the directory was removed
        return base + name if base == "/" else base + "/" + name

    def at_path(self, path):
        """The inode the kernel knows at merged `path`, or None."""
        inode = self.root
        with self.lock:
            for name in path.strip("/").split("/") if path != "/" else ():
                inode = inode.kids.get(name) if inode.kids else None
                if inode is None:
                    return None
        return inode

    # -- what the kernel learns and forgets ------------------------------------------------------
    def found(self, parent, name, attrs, inode=None):
        """`name` in `parent` is the object with `attrs` (known to be `inode`, for a new hard link):
        its inode, with one more lookup counted."""
        key = key_of(attrs, parent, name)
        shared = _shared(attrs)
        with self.lock:
            old = parent.kids.get(name) if parent.kids else None
            if inode is None and old is not None and old.key == key:
                inode = old
            if inode is None and shared:
                inode = self._by_key.get(key)
            if inode is None:
                inode = Inode(next(self._ids), key, stat.S_IFMT(attrs["st_mode"]))
                self._by_id[inode.id] = inode
            if shared and inode.key == key:
                self._by_key[key] = inode
            if old is not inode:
                if old is not None:
                    self._drop_name(old, parent, name)
                self._add_name(inode, parent, name)
            inode.nlookup += 1
        return inode

    def forget(self, inode, count):
        with self.lock:
            inode.nlookup -= count
            self._release(inode)

    def forget_id(self, node_id, count):
        inode = self._by_id.get(node_id)
        if inode is not None:
            self.forget(inode, count)

    # -- changes made through the mount ----------------------------------------------------------
    def removed(self, parent, name):
        """`name` is gone from `parent` (unlink, rmdir): its inode may live on through open handles."""
        with self.lock:
            inode = parent.kids.get(name) if parent.kids else None
            if inode is not None:
                self._drop_name(inode, parent, name)
                if inode.parent is None:
                    self._unkey(inode)  # its number may come back for a new object
                self._release(inode)

    def changed(self, inode, parent, name, attrs):
        """The object at `name` was copied up and may have a new identity (a lower hard link broken
        off). The inode keeps it when this is its only name, as the kernel overlay's does; otherwise
        the name is let go (True: the kernel must drop its cached entry)."""
        key = key_of(attrs, parent, name)
        with self.lock:
            if key == inode.key:
                return False
            if inode.key is None or len(inode.key) == 2 or key[1] != inode.key[1]:
                return False  # not a broken lower link: a concurrent change the kernel hears of by itself
            if inode.names() == [(parent, name)] and key not in self._by_key:
                self._unkey(inode)
                inode.key = key
                if _shared(attrs):
                    self._by_key[key] = inode
                return False
        self.removed(parent, name)
        return True

    def renamed(self, parent, name, new_parent, new_name, exchange=False):
        with self.lock:
            moving = parent.kids.get(name) if parent.kids else None
            there = new_parent.kids.get(new_name) if new_parent.kids else None
            if moving is not None:
                self._drop_name(moving, parent, name)
            if there is not None:
                self._drop_name(there, new_parent, new_name)
                if exchange:
                    self._add_name(there, parent, name)
                elif there.parent is None:
                    self._unkey(there)
                self._release(there)
            if moving is not None:
                self._add_name(moving, new_parent, new_name)

    def add_handle(self, inode, fh):
        """Under the lock: `fh` is open on `inode`."""
        if inode.handles is None:
            inode.handles = set()
        inode.handles.add(fh)

    def drop_handle(self, inode, fh):
        with self.lock:
            if inode.handles is not None:
                inode.handles.discard(fh)
            self._release(inode)

    # -- internals (under the lock) --------------------------------------------------------------
    def _add_name(self, inode, parent, name):
        if inode.parent is None:
            inode.parent, inode.name = parent, name
        else:
            inode.more = (inode.more or []) + [(parent, name)]
        if parent.kids is None:
            parent.kids = {}
        parent.kids[name] = inode

    def _drop_name(self, inode, parent, name):
        if inode.parent is parent and inode.name == name:
            inode.parent = inode.name = None
            if inode.more:  # the next name becomes the first
                (inode.parent, inode.name), inode.more = inode.more[0], inode.more[1:] or None
        elif inode.more and (parent, name) in inode.more:
            inode.more = [n for n in inode.more if n != (parent, name)] or None
        else:
            return
        if parent.kids.get(name) is inode:
            del parent.kids[name]
            if not parent.kids:
                parent.kids = None
        self._release(parent)

    def _unkey(self, inode):
        if inode.key is not None and self._by_key.get(inode.key) is inode:
            del self._by_key[inode.key]
        inode.key = None

    def _release(self, inode):
        """Drop `inode` once the kernel has forgotten it and nothing here needs its names."""
        while (inode is not self.root and inode.nlookup <= 0 and not inode.kids and not inode.handles
               and inode.id in self._by_id):
            del self._by_id[inode.id]
            self._unkey(inode)
            names = inode.names()
            inode.parent = inode.name = inode.more = None
            parents = []
            for parent, name in names:
                if parent.kids and parent.kids.get(name) is inode:
                    del parent.kids[name]
                    if not parent.kids:
                        parent.kids = None
                parents.append(parent)
            for parent in parents[1:]:
                self._release(parent)
            if not parents:
                return
            inode = parents[0]
