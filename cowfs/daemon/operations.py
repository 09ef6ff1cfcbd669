"""The FUSE adapter: libfuse 3's low-level requests mapped to the engine; it owns node ids and open handles.

No overlay logic lives here. Every request is answered exactly once, by the
wrapper in `_request`: an OSError becomes its errno; anything unexpected is
logged with its traceback and answered with EIO, never silently.

Nothing here waits on the kernel while serving a request. The one
notification that can wait (dropping a cached name, which takes the
directory's lock in the kernel) goes through `Notifier`'s own thread; the
attribute-only invalidation a request may send takes no lock the kernel
could be holding for another request, so it cannot deadlock, and neither can
dropping a directory's cached listing (`_relist`, see there).

Directories need no open state: the kernel opens them without asking
(opendir answers ENOSYS) and keeps their listings in its page cache until they
change. A change made by a request on that directory (create, link, unlink,
rmdir, rename) drops the kernel's copy by itself; a change it cannot see (a
copy-up that gives an entry another number, the ``..`` of a directory moved
to another parent, a change whose request failed or whose answer was lost)
is announced by `_relist` before the answer goes out.
"""

import contextlib
import ctypes
import errno
import functools
import itertools
import logging
import os
import queue
import signal
import stat
import struct
import threading
import time

from cowfs.daemon import libfuse as ll
from cowfs.daemon.inodes import InodeTable
from cowfs.daemon.inodes import identity as _identity
from cowfs.overlay import fileattr
from cowfs.overlay.syscalls import RENAME_EXCHANGE
from cowfs.overlay.union import Caller

log = logging.getLogger("cowfs")

# How long the kernel may keep names and attributes without asking again. Every change made
# through the mount either updates the kernel's copy itself or is announced (`_settle`), so the
# limit only bounds how late a change behind the mount's back (to a layer) shows.
ENTRY_TIMEOUT = 3600.0
ATTR_TIMEOUT = 3600.0
NEGATIVE_TIMEOUT = 1.0
THREADS = 10
ENCODED_KEPT = 20_000  # entries of encoded listings kept, in all (one directory's may be more)
PLUS_SENT_KEPT = 4096  # directories whose last listing (and whether it went with attributes) is kept
PLUS_RESEND = 1.0  # seconds during which a directory's entries go out again without attributes
REPLACED_KEPT = 64  # listings a change replaced, kept for readers still in the middle of them
RETRIES = 10  # of an operation whose path a concurrent rename made out of date
MOVE_WAIT = 5.0  # seconds to wait for a rename or removal to finish before retrying
STOP_WAIT = 5.0  # seconds an unmount waits for the notifier's thread (a kernel that never answers it)


class Notifier:
    """Sends the kernel the notifications that may wait on its locks, from a thread of its own."""

    def __init__(self, session):
        self._session = session
        self._queue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="cowfs-notifier", daemon=True)
        self._thread.start()

    def forget_name(self, parent_id, name):
        self._queue.put((parent_id, os.fsencode(name)))

    def stop(self):
        self._queue.put(None)
        self._thread.join(timeout=STOP_WAIT)

    def _run(self):
        while (item := self._queue.get()) is not None:
            parent_id, name = item
            ll.notify_inval_entry(self._session, parent_id, name, len(name))  # -ENOENT when not cached


class Open:
    """An open file: the engine's handle, its inode, and how many threads borrow it right now."""

    __slots__ = ("handle", "inode", "uses", "released")

    def __init__(self, handle, inode):
        self.handle, self.inode, self.uses, self.released = handle, inode, 0, False


class Reply:
    """What a request answers, sent by the wrapper after the engine is done; `undo` runs if the kernel
    never got it (an interrupted request), so no lookup is counted that the kernel does not hold."""

    __slots__ = ("send", "args", "undo")

    def __init__(self, send, *args, undo=None):
        self.send, self.args, self.undo = send, args, undo


OK = Reply(ll.reply_err, 0)


def _request(method):
    """Wrap an operation into a libfuse callback that always answers exactly once."""
    @functools.wraps(method)
    def callback(self, req, *args):
        ll.pin_thread_state()
        self._pending.paths = []
        self._pending.dirs = []  # directories whose listing the request changes, as the kernel knows
        self._pending.stale = []  # directories whose listing changed in a way the kernel cannot see
        try:
            reply = method(self, req, *args)
        except OSError as e:
            reply = Reply(ll.reply_err, e.errno if isinstance(e.errno, int) and e.errno > 0 else errno.EIO)
            if getattr(e, "attrs_changed", False) and isinstance(e.filename, str):
                self._pending.paths.append(e.filename)  # its attributes moved before it failed (see _settle)
        except Exception:
            log.exception("cowfs: unexpected failure in %s", method.__name__)
            reply = Reply(ll.reply_err, errno.EIO)
        dirs = self._pending.dirs
        if reply.send is ll.reply_err and reply.args[0] != 0:
            self._pending.stale += dirs  # the kernel drops its listing on success only; a failure may
            # still have changed the directory (made the object, then failed to read it back)
        try:
            self._settle()  # a failed operation may have copied something up all the same
        except Exception:
            log.exception("cowfs: unexpected failure after %s", method.__name__)
        if reply.send(req, *reply.args) != 0:  # interrupted: the kernel never heard of the change
            if reply.undo is not None:
                reply.undo()
            self._relist(dirs)
    return callback


def _name(raw):
    return os.fsdecode(raw)


class CowfsOperations:
    """The low-level operations over a `Union` engine."""

    def __init__(self, union, on_ready=None):
        self.union = union
        self.on_ready = on_ready
        self.table = InodeTable()
        self.handles = {}  # fh -> Open
        self._plus_sent = {}  # directory node id -> (when its entries last went out with attributes, listing id)
        self._encoded = {}  # directory node id -> (engine listing, its entries with names encoded once, listing id)
        self._encoded_entries = 0  # the entries in _encoded, kept within ENCODED_KEPT
        self._replaced = {}  # listing id -> (directory node id, entries): listings a change replaced, newest last
        self._replaced_lock = threading.Lock()
        self._listing_ids = itertools.count(1)  # next() is atomic under the GIL
        self.opendir_needed = True  # until the kernel says it can open directories without asking
        self._fhs = iter(range(1, 1 << 62))  # next() is atomic under the GIL
        self._pending = threading.local()  # paths copied up by the request this thread serves
        self.notifier = None
        self.session = None
        union.events.subscribe(self._on_event)

    # -- helpers ---------------------------------------------------------------------------------
    def _on_event(self, event):
        if event["event"] == "copy_up":
            paths = getattr(self._pending, "paths", None)
            if paths is not None:
                paths.append(event["path"])

    def _settle(self):
        """After a copy-up, the kernel's inode for that name may hold old attributes (st_nlink of a
        directory that became merged), or the name may now be another object (a broken hard link),
        and its parent's cached listing an old number for it."""
        paths, self._pending.paths = self._pending.paths, []
        stale, self._pending.stale = self._pending.stale, []
        for path in paths:
            parent_path, _, name = path.rpartition("/")
            parent = self.table.at_path(parent_path or "/")
            if parent is not None:
                stale.append(parent)
            inode = self.table.at_path(path)
            if inode is None:
                continue
            try:
                attrs = self.union.getattr(path)
            except OSError:
                continue
            if parent is not None and self.table.changed(inode, parent, name, attrs):
                self.notifier.forget_name(parent.id, name)
            else:
                ll.notify_inval_inode(self.session, inode.id, -1, 0)  # attributes only: never waits
        self._relist(stale)

    def _relist(self, directories):
        """Drop the kernel's cached listings of `directories`, inline. This waits only for the lock
        of a page of a directory's listing, which the kernel holds while it copies cached entries
        to a reader (or adds entries it was sent), never while it waits for a request of ours;
        and, unlike dropping a name, it takes no directory lock. It also drops the attributes."""
        done = set()
        for inode in directories:
            if inode.id not in done:
                done.add(inode.id)
                ll.notify_inval_inode(self.session, inode.id, 0, 0)  # -ENOENT when not cached

    def _at(self, inode, operation, name=None, same=None):
        """Run `operation(path)` on the merged path of `inode` (or of `name` in it).

        A rename or removal racing with it can make the path out of date; then
        it runs again on the new one, once the move is done. With `same`, an
        answer about another object than `same` (attributes with another
        identity) counts as out of date too."""
        for _ in range(RETRIES):
            generation = self.table.generation
            path = self.table.path(inode) if name is None else self.table.child_path(inode, name)
            try:
                result = operation(path)
            except (FileNotFoundError, NotADirectoryError):
                if not self.table.settled(generation, MOVE_WAIT):
                    raise
                continue
            if same is None or _identity(result)[1] == same.kind and (
                    path is None or same.key is None or _identity(result)[0] == same.key[0]):
                return result
            if not self.table.settled(generation, MOVE_WAIT):
                if _identity(result)[1] == same.kind:
                    return result  # the same kind of object: a copy-up may have given it a new number
                # another kind: answering with it would make the kernel take its inode for a bad one
                raise OSError(errno.ENOENT, os.strerror(errno.ENOENT))
        raise OSError(errno.ENOENT, os.strerror(errno.ENOENT))

    def _entry(self, parent, name, attrs, inode=None):
        """The answer to a lookup: `name` in `parent` is the object with `attrs` (`inode`, if known)."""
        inode = self.table.found(parent, name, attrs, inode)
        return Reply(ll.reply_entry, ctypes.byref(_entry_param(inode, attrs)), undo=lambda: self.table.forget(inode, 1))

    def _attrs(self, inode, path, handle=None):
        """Attributes by name, or through an open handle once the name is gone."""
        if path is not None:
            return self.union.getattr(path)
        if handle is not None:
            return self.union.fgetattr(handle, None)
        with self._borrowed(inode) as handle:
            return self.union.fgetattr(handle, None)

    @contextlib.contextmanager
    def _borrowed(self, inode):
        """One of the open handles of `inode` (whose name is gone), kept open while it is used:
        another thread may be releasing it, and a closed descriptor's number is soon another file's."""
        with self.table.lock:
            opened = next((self.handles[fh] for fh in inode.handles or ()
                           if fh in self.handles and not self.handles[fh].released), None)
            if opened is None:
                raise OSError(errno.ENOENT, os.strerror(errno.ENOENT))
            opened.uses += 1
        try:
            yield opened.handle
        finally:
            with self.table.lock:
                opened.uses -= 1
                close = opened.released and not opened.uses
            if close:
                self.union.release(opened.handle)

    def _handle(self, fi, required=True):
        """The handle a request came with (the kernel keeps it open until the request is answered)."""
        opened = self.handles.get(fi.contents.fh) if fi else None
        if opened is None:
            if required:
                raise OSError(errno.EBADF, os.strerror(errno.EBADF))
            return None
        return opened.handle

    @staticmethod
    def _caller(req):
        ctx = ll.req_ctx(req).contents
        return Caller(ctx.uid, ctx.gid, _Groups(req))

    @staticmethod
    def _umask(req):
        return ll.req_ctx(req).contents.umask

    # -- lifecycle -------------------------------------------------------------------------------
    def init(self, userdata, conn):
        ll.pin_thread_state()
        conn = conn.contents
        for cap in (ll.CAP_POSIX_ACL, ll.CAP_DONT_MASK, ll.CAP_IOCTL_DIR):
            # the kernel checks and caches POSIX ACLs, as it does for the kernel overlay; the umask is
            # applied here, since it must not apply under a default ACL
            if conn.capable & cap:
                conn.want |= cap
        conn.want &= ~(ll.CAP_SPLICE_READ | ll.CAP_SPLICE_WRITE | ll.CAP_SPLICE_MOVE)
        self.opendir_needed = not conn.capable & ll.CAP_NO_OPENDIR_SUPPORT  # then opendir answers ENOSYS
        if self.on_ready is not None:
            self.on_ready()

    def destroy(self, userdata):
        ll.pin_thread_state()
        self.close()

    def close(self):
        """Release every handle and the workdir; the mount is gone."""
        for opened in list(self.handles.values()):
            self.union.release(opened.handle)
        self.handles.clear()
        self.union.close()

    # -- names -----------------------------------------------------------------------------------
    @_request
    def lookup(self, req, parent_id, name):
        parent, name = self.table.get(parent_id), _name(name)
        try:
            attrs = self._at(parent, self.union.getattr, name)
        except FileNotFoundError:
            e = ll.EntryParam(ino=0, entry_timeout=NEGATIVE_TIMEOUT)  # the kernel caches the absence
            return Reply(ll.reply_entry, ctypes.byref(e))
        return self._entry(parent, name, attrs)

    def forget(self, req, node_id, count):
        ll.pin_thread_state()
        self.table.forget_id(node_id, count)
        ll.reply_none(req)

    def forget_multi(self, req, count, forgets):
        ll.pin_thread_state()
        for i in range(count):
            self.table.forget_id(forgets[i].ino, forgets[i].nlookup)
        ll.reply_none(req)

    @_request
    def getattr(self, req, node_id, fi):
        inode = self.table.get(node_id)
        handle = self._handle(fi, required=False)
        return _attr_reply(self._at(inode, lambda path: self._attrs(inode, path, handle), same=inode))

    @_request
    def setattr(self, req, node_id, attr, to_set, fi):
        inode = self.table.get(node_id)
        given = self._handle(fi, required=False)
        caller = self._caller(req)
        a = attr.contents
        u = self.union

        def apply(path, handle):
            """Owner before mode: a chown of a set-id file asks for both (the kernel drops the set-id
            bits), and chown on the upper drops them itself, so a crash between the two steps leaves
            the file as after the change, never half-way. Then size and times."""
            if to_set & (ll.SET_ATTR_UID | ll.SET_ATTR_GID):
                owner = (a.st_uid if to_set & ll.SET_ATTR_UID else -1, a.st_gid if to_set & ll.SET_ATTR_GID else -1)
                u.chown(path, *owner) if path is not None else u.fchown(handle, *owner)
            if to_set & ll.SET_ATTR_MODE:
                u.chmod(path, a.st_mode) if path is not None else u.fchmod(handle, a.st_mode)
            if to_set & ll.SET_ATTR_SIZE:
                if handle is not None:
                    u.ftruncate(handle, a.st_size, caller)
                else:
                    u.truncate(path, a.st_size, caller)
            if to_set & (ll.SET_ATTR_ATIME | ll.SET_ATTR_MTIME):
                now = time.time_ns()
                atime = _when(to_set, ll.SET_ATTR_ATIME, ll.SET_ATTR_ATIME_NOW, a.st_atimespec, now)
                mtime = _when(to_set, ll.SET_ATTR_MTIME, ll.SET_ATTR_MTIME_NOW, a.st_mtimespec, now)
                touch = to_set & ll.SET_ATTR_ATIME_NOW and to_set & ll.SET_ATTR_MTIME_NOW
                u.utimens(path, atime, mtime, bool(touch)) if path is not None else u.futimens(handle, atime, mtime)
            return self._attrs(inode, path, handle)
        return _attr_reply(self._at(inode, lambda path: self._on_object(inode, path, given, apply), same=inode))

    def _on_object(self, inode, path, handle, operation):
        """`operation(path, handle)`, through a borrowed handle when the name is gone and the request
        brought none."""
        if path is not None or handle is not None:
            return operation(path, handle)
        with self._borrowed(inode) as borrowed:
            return operation(None, borrowed)

    @_request
    def readlink(self, req, node_id):
        inode = self.table.get(node_id)
        return Reply(ll.reply_readlink, os.fsencode(self._at(inode, lambda path: self.union.readlink(_named(path)))))

    def _create_entry(self, parent_id, name, make, source=None):
        """mknod, mkdir, symlink, link: make the object at the new path, then answer as a lookup would
        (for a hard link, with the inode of its `source` when the link is that same object)."""
        parent, name = self.table.get(parent_id), _name(name)
        self._pending.dirs.append(parent)

        def create(path):
            make(path)
            return self.union.getattr(path)
        attrs = self._at(parent, create, name)
        same = source is not None and source.key is not None and _identity(attrs) == source.key[:2]
        return self._entry(parent, name, attrs, source if same else None)

    @_request
    def mknod(self, req, parent_id, name, mode, rdev):
        caller = self._caller(req)
        return self._create_entry(parent_id, name, lambda path: self.union.mknod(
            path, mode, rdev, (caller.uid, caller.gid), self._umask(req)))

    @_request
    def mkdir(self, req, parent_id, name, mode):
        caller = self._caller(req)
        return self._create_entry(parent_id, name, lambda path: self.union.mkdir(
            path, mode, (caller.uid, caller.gid), self._umask(req)))

    @_request
    def symlink(self, req, target, parent_id, name):
        caller = self._caller(req)
        return self._create_entry(parent_id, name, lambda path: self.union.symlink(
            path, os.fsdecode(target), (caller.uid, caller.gid)))

    @_request
    def link(self, req, node_id, parent_id, name):
        inode = self.table.get(node_id)
        return self._create_entry(parent_id, name, lambda path: self.union.link(
            _named(self.table.path(inode)), path), source=inode)

    @_request
    def unlink(self, req, parent_id, name):
        return self._remove(parent_id, name, self.union.unlink)

    @_request
    def rmdir(self, req, parent_id, name):
        return self._remove(parent_id, name, self.union.rmdir)

    def _remove(self, parent_id, name, remove):
        parent, name = self.table.get(parent_id), _name(name)
        self._pending.dirs.append(parent)
        with self.table.moving_names():
            self._at(parent, remove, name)
            self.table.removed(parent, name)
        return OK

    @_request
    def rename(self, req, parent_id, name, new_parent_id, new_name, flags):
        parent, new_parent = self.table.get(parent_id), self.table.get(new_parent_id)
        name, new_name = _name(name), _name(new_name)
        self._pending.dirs += [parent, new_parent]
        with self.table.moving_names():
            new = self.table.child_path(new_parent, new_name)
            if self._at(parent, lambda old: self.union.rename(old, new, flags), name) is not False:
                self.table.renamed(parent, name, new_parent, new_name, exchange=bool(flags & RENAME_EXCHANGE))
                self._pending.paths.append(new)  # a lower hard link moved is a copy now (see _settle)
                if new_parent is not parent:  # a directory moved lists another "..": the kernel cannot know
                    moved = [(new_parent.kids or {}).get(new_name)] + (
                        [(parent.kids or {}).get(name)] if flags & RENAME_EXCHANGE else [])
                    self._pending.stale += [i for i in moved if i is not None and i.kind == stat.S_IFDIR]
        return OK

    # -- attributes of the filesystem, xattrs ----------------------------------------------------
    @_request
    def statfs(self, req, node_id):
        sv = ll.StatVfs()
        for key, value in self.union.statfs().items():
            setattr(sv, key, value)
        return Reply(ll.reply_statfs, ctypes.byref(sv))

    @_request
    def access(self, req, node_id, mask):
        self._at(self.table.get(node_id), lambda path: self.union.access(_named(path), mask))
        return OK

    @_request
    def setxattr(self, req, node_id, name, value, size, flags):
        inode, name = self.table.get(node_id), _name(name)
        data = ctypes.string_at(value, size)

        def set_it(path, handle):
            if path is None:
                return self.union.fsetxattr(handle, name, data, flags)
            return self.union.setxattr(path, name, data, flags)
        self._at(inode, lambda path: self._on_object(inode, path, None, set_it))
        return OK

    @_request
    def removexattr(self, req, node_id, name):
        inode, name = self.table.get(node_id), _name(name)

        def remove(path, handle):
            if path is None:
                return self.union.fremovexattr(handle, name)
            return self.union.removexattr(path, name)
        self._at(inode, lambda path: self._on_object(inode, path, None, remove))
        return OK

    @_request
    def getxattr(self, req, node_id, name, size):
        name = _name(name)
        return _sized(self._at(self.table.get(node_id), lambda path: self.union.getxattr(_named(path), name)), size)

    @_request
    def listxattr(self, req, node_id, size):
        caller = self._caller(req)
        names = self._at(self.table.get(node_id), lambda path: self.union.listxattr(_named(path), caller))
        return _sized(b"".join(os.fsencode(n) + b"\0" for n in names), size)

    @_request
    def ioctl(self, req, node_id, cmd, arg, fi, flags, in_buf, in_size, out_size):
        """The file attribute flags (chattr, lsattr): the kernel asks for them through a handle it opens
        itself (none for a directory), so they are read and set by name. Any other ioctl: ENOTTY, as on
        the kernel overlay."""
        inode = self.table.get(node_id)
        if cmd in (fileattr.FS_IOC_GETFLAGS, fileattr.FS_IOC32_GETFLAGS):
            data = struct.pack("=I", self._at(inode, lambda path: self.union.getflags(_named(path))))
            return Reply(ll.reply_ioctl, 0, data, min(len(data), out_size))
        if cmd == fileattr.FS_IOC_FSGETXATTR:
            data = self._at(inode, lambda path: self.union.fsgetxattr(_named(path)))
            return Reply(ll.reply_ioctl, 0, data, min(len(data), out_size))
        if cmd in (fileattr.FS_IOC_SETFLAGS, fileattr.FS_IOC32_SETFLAGS) and in_size >= 4:
            value = struct.unpack("=I", ctypes.string_at(in_buf, 4))[0]
            self._at(inode, lambda path: self.union.setflags(_named(path), value))
        elif cmd == fileattr.FS_IOC_FSSETXATTR and in_size >= fileattr.FSXATTR.size:
            value = ctypes.string_at(in_buf, in_size)
            self._at(inode, lambda path: self.union.fssetxattr(_named(path), value))
        else:
            raise OSError(errno.ENOTTY, os.strerror(errno.ENOTTY))
        ll.notify_inval_inode(self.session, node_id, -1, 0)  # its ctime changed: attributes only
        return Reply(ll.reply_ioctl, 0, None, 0)

    # -- files -----------------------------------------------------------------------------------
    def _keep(self, inode, handle, fi):
        fh = next(self._fhs)
        with self.table.lock:
            self.handles[fh] = Open(handle, inode)
            self.table.add_handle(inode, fh)
        fi.fh = fh
        # The kernel's page cache of this inode saw every change made through the mount, and there
        # is no other way to change the object, so its pages stay valid across opens.
        fi.keep_cache = 1
        return fh

    def _drop(self, fh):
        """The kernel closed `fh`: close it here too, once no borrower uses it."""
        with self.table.lock:
            opened = self.handles.pop(fh, None)
            if opened is None:
                return
            opened.released = True
            close = not opened.uses
        if close:
            self.union.release(opened.handle)
        self.table.drop_handle(opened.inode, fh)

    @_request
    def open(self, req, node_id, fi):
        inode = self.table.get(node_id)
        caller = self._caller(req)
        info = fi.contents
        def open_it(path):
            handle = self.union.open(_named(path), info.flags, caller)
            if stat.S_IFMT(os.fstat(handle.fd).st_mode) != inode.kind:
                self.union.release(handle)  # the name holds another kind of object now: a racing change
                raise OSError(errno.ENOENT, os.strerror(errno.ENOENT))
            return handle
        handle = self._at(inode, open_it)
        if handle.attrs_changed:
            ll.notify_inval_inode(self.session, node_id, -1, 0)  # attributes only: st_blocks moved
        fh = self._keep(inode, handle, info)
        return Reply(ll.reply_open, fi, undo=lambda: self._drop(fh))

    @_request
    def create(self, req, parent_id, name, mode, fi):
        parent, name = self.table.get(parent_id), _name(name)
        self._pending.dirs.append(parent)
        caller = self._caller(req)
        info = fi.contents

        def create(path):
            handle = self.union.create(path, mode, info.flags, (caller.uid, caller.gid), self._umask(req))
            try:
                return handle, self.union.getattr(path)
            except BaseException:
                self.union.release(handle)
                raise
        handle, attrs = self._at(parent, create, name)
        inode = self.table.found(parent, name, attrs)
        e = _entry_param(inode, attrs)
        fh = self._keep(inode, handle, info)

        def undo():
            self._drop(fh)
            self.table.forget(inode, 1)
        return Reply(ll.reply_create, ctypes.byref(e), fi, undo=undo)

    @_request
    def read(self, req, node_id, size, offset, fi):
        handle = self._handle(fi)
        path = self.table.path(self.handles[fi.contents.fh].inode)
        vec = ll.fd_bufvec(self.union.read_fd(handle, path), size, offset)
        return Reply(ll.reply_data, ctypes.byref(vec), 0)  # libfuse reads the data itself

    @_request
    def write_buf(self, req, node_id, src, offset, fi):
        handle = self._handle(fi)
        size = ll.buf_size(src)
        dst = ll.fd_bufvec(self.union.write_fd(handle), size, offset)
        written = ll.buf_copy(ctypes.byref(dst), src, 0)  # the data never passes through Python
        if written < 0:
            raise OSError(-written, os.strerror(-written))
        if written and self.union.wrote(handle, self._caller(req)):
            ll.notify_inval_inode(self.session, node_id, -1, 0)  # its set-id bits went: attributes only
        return Reply(ll.reply_write, written)

    @_request
    def fallocate(self, req, node_id, mode, offset, length, fi):
        """The kernel sends only the modes FUSE passes on (KEEP_SIZE, PUNCH_HOLE, ZERO_RANGE), through a
        handle open for writing; the size it learns from the answer, the mode (set-id bits) by a notice."""
        if self.union.fallocate(self._handle(fi), mode, offset, length, self._caller(req)):
            ll.notify_inval_inode(self.session, node_id, -1, 0)
        return OK

    @_request
    def fsync(self, req, node_id, datasync, fi):
        self.union.fsync(self._handle(fi), bool(datasync))
        return OK

    # No flush: every WRITE reaches the upper file before it is answered, so a close has nothing
    # to push. Left out, libfuse answers the first FLUSH with ENOSYS and the kernel sends no more:
    # one request less at every close.

    @_request
    def release(self, req, node_id, fi):
        self._drop(fi.contents.fh)
        return OK

    # -- directories -----------------------------------------------------------------------------
    @_request
    def opendir(self, req, node_id, fi):
        """A directory needs no open state (see `_list`). A kernel that can open directories without
        asking is told so (ENOSYS): it stops sending OPENDIR and RELEASEDIR, and keeps each listing
        in its page cache (as it does with the flags below) until a change drops it."""
        if not self.opendir_needed:
            raise OSError(errno.ENOSYS, os.strerror(errno.ENOSYS))
        self.table.get(node_id)
        info = fi.contents
        info.fh = 0
        info.cache_readdir = 1  # keep the listing in the kernel's page cache
        info.keep_cache = 1  # and do not drop it at this open
        return Reply(ll.reply_open, fi)

    @_request
    def fsyncdir(self, req, node_id, datasync, fi):
        return OK

    @_request
    def readdir(self, req, node_id, size, offset, fi):
        return self._list(req, node_id, size, offset, fi, plus=False)

    @_request
    def readdirplus(self, req, node_id, size, offset, fi):
        return self._list(req, node_id, size, offset, fi, plus=True)

    def _list(self, req, node_id, size, offset, fi, plus):
        """Entries from `offset` on, as many as fit. With `plus`, each goes with its attributes and
        counts as a lookup ("." and ".." do not): unless this directory's entries went out with
        their attributes less than PLUS_RESEND ago, since the kernel still holds those.

        There is no open state: an offset names the listing it points into (its id in the high
        32 bits) as well as the place, so a reader that started before a change goes on through
        the listing it started with, as long as it is kept (`REPLACED_KEPT`)."""
        inode = self.table.get(node_id)
        listing_id, start = offset >> 32, offset & 0xFFFFFFFF
        entries = None
        if offset:
            current = self._encoded.get(inode.id)
            if current is not None and current[2] == listing_id:
                entries = current[1]
            else:
                replaced = self._replaced.get(listing_id)
                if replaced is not None and replaced[0] == inode.id:
                    entries = replaced[1]
        if entries is None:  # a new reader, or one whose listing is no longer kept: the current one
            entries, listing_id = self._listing(inode)
        sent = self._plus_sent.get(inode.id)
        if offset == 0:
            now = time.monotonic()
            with_attrs = plus and (sent is None or now - sent[0] >= PLUS_RESEND)
            if with_attrs:
                if len(self._plus_sent) >= PLUS_SENT_KEPT:
                    self._plus_sent.clear()  # only a hint: forgetting costs one more full listing
                self._plus_sent[inode.id] = (now, listing_id)
        else:  # go on as the reader started
            with_attrs = plus and sent is not None and sent[1] == listing_id
        base = self.table.path(inode) if with_attrs else None
        if base is not None and not base.endswith("/"):
            base += "/"
        buf = ctypes.create_string_buffer(size)
        used = 0
        st, bare, full = ll.Stat(), ll.EntryParam(), ll.EntryParam(attr_timeout=ATTR_TIMEOUT,
                                                                     entry_timeout=ENTRY_TIMEOUT)
        for index in range(start, len(entries)):
            next_offset = listing_id << 32 | index + 1
            name, encoded, ino, mode = entries[index]
            if not plus:
                st.st_ino, st.st_mode = ino, mode
                need = ll.add_direntry(req, ctypes.byref(buf, used), size - used, encoded, ctypes.byref(st),
                                       next_offset)
                if used + need > size:
                    break
                used += need
                continue
            e, found = bare, None
            if base is not None and index >= 2:
                try:
                    try:
                        attrs = self.union.getattr(base + name)
                    except FileNotFoundError:  # gone, or a rename moved the directory meanwhile
                        attrs = self._at(inode, self.union.getattr, name)
                except FileNotFoundError:
                    continue  # gone since the listing was read
                except OSError:
                    attrs = None  # listed, but its lookup fails (a bad redirect): a bare entry
                if attrs is not None:
                    found = self.table.found(inode, name, attrs)
                    e = full
                    e.ino = found.id
                    ll.fill_stat(e.attr, attrs)
            if e is bare:  # no inode: the kernel only learns the name, number and type
                bare.attr.st_ino, bare.attr.st_mode = ino, mode
            need = ll.add_direntry_plus(req, ctypes.byref(buf, used), size - used, encoded, ctypes.byref(e),
                                        next_offset)
            if used + need > size:
                if found is not None:
                    self.table.forget(found, 1)  # did not go out
                break
            used += need
        return Reply(ll.reply_buf, buf, used)

    def _listing(self, inode):
        """The current listing of directory `inode` with its names encoded, and its id. The engine
        keeps a listing until the next change, and so is it kept here; the one it replaces is kept
        a while longer for readers in the middle of it."""
        listing = self._at(inode, lambda path: self.union.readdir(_named(path)))
        current = self._encoded.get(inode.id)
        if current is not None and current[0] is listing:
            return current[1], current[2]
        entries = [(name, os.fsencode(name), ino, mode) for name, ino, mode in listing]
        listing_id = next(self._listing_ids) & 0x7FFFFFFF  # offsets stay below 2**63
        with self._replaced_lock:  # (readers only .get() these; changes are made one thread at a time)
            old = self._encoded.pop(inode.id, None)
            kept = self._encoded_entries + len(entries) - (len(old[1]) if old is not None else 0)
            while self._encoded and kept > ENCODED_KEPT:  # the oldest first; the kernel caches listings itself
                kept -= len(self._encoded.pop(next(iter(self._encoded)))[1])
            self._encoded[inode.id] = (listing, entries, listing_id)
            self._encoded_entries = kept
            if current is not None:
                self._replaced[current[2]] = (inode.id, current[1])
                while len(self._replaced) > REPLACED_KEPT:
                    del self._replaced[next(iter(self._replaced))]
        return entries, listing_id


class _Groups:
    """The supplementary groups of a request's caller, read (from /proc, by libfuse) only if asked."""

    def __init__(self, req):
        self._req, self._groups = req, None

    def __contains__(self, gid):
        if self._groups is None:
            count = 32
            while True:
                buf = (ctypes.c_uint32 * count)()
                n = ll.req_getgroups(self._req, count, buf)
                if n <= count:
                    self._groups = set(buf[:max(n, 0)])
                    break
                count = n
        return gid in self._groups


def _named(path):
    """`path`, for operations that need a name (an unlinked file has none)."""
    if path is None:
        raise OSError(errno.ENOENT, os.strerror(errno.ENOENT))
    return path


def _entry_param(inode, attrs):
    e = ll.EntryParam(ino=inode.id, attr_timeout=ATTR_TIMEOUT, entry_timeout=ENTRY_TIMEOUT)
    ll.fill_stat(e.attr, attrs)
    return e


def _attr_reply(attrs):
    st = ll.Stat()
    ll.fill_stat(st, attrs)
    return Reply(ll.reply_attr, ctypes.byref(st), ATTR_TIMEOUT)


def _when(to_set, given, now_flag, ts, now):
    if to_set & now_flag:
        return now
    if to_set & given:
        return ts.tv_sec * 1_000_000_000 + ts.tv_nsec
    return None


def _sized(value, size):
    """The answer to getxattr/listxattr: the size when asked for it, ERANGE when it does not fit."""
    if size == 0:
        return Reply(ll.reply_xattr, len(value))
    if len(value) > size:
        raise OSError(errno.ERANGE, os.strerror(errno.ERANGE))
    return Reply(ll.reply_buf, value, len(value))


_OPS = [name for name, _ in ll.OPS_FIELDS]


def _ops_struct(ops):
    """The struct fuse_lowlevel_ops pointing at `ops`'s methods; the callbacks are kept on it."""
    table = ll.LowlevelOps()
    kept = []
    for name, kind in ll.OPS_FIELDS:
        method = getattr(ops, name, None)
        if method is None or kind is ctypes.c_void_p:
            continue
        callback = kind(method)
        kept.append(callback)
        setattr(table, name, callback)
    table._kept = kept
    return table


def _escape(value):
    return value.replace("\\", "\\\\").replace(",", "\\,")


def serve(union, mountpoint, *, foreground=True, debug=False, allow_other=False, read_only=False,
          fsname="cowfs", mount_flags=(), on_ready=None, signals=True):
    """Mount `union` at `mountpoint` and serve it until unmounted (blocks). Without `signals` (a session
    served in a thread of a process serving several, cowfs.daemon.shared) no signal handler is set."""
    options = [f"fsname={_escape(fsname)}", "subtype=cowfs", "default_permissions"]
    if os.geteuid() == 0:
        options += ["dev", "suid"]  # like the kernel overlay, when root may allow it
    if allow_other:
        options.append("allow_other")
    if read_only:
        options.append("ro")
    options += [flag for flag in mount_flags if flag != "rw" or not read_only]  # the user's come last and win
    argv = [b"cowfs", b"-o", ",".join(options).encode()]
    if debug:
        argv.append(b"-d")
    args, _keep_argv = ll.make_args(argv)
    ops = CowfsOperations(union, on_ready)
    table = _ops_struct(ops)
    session = ll.session_new(ctypes.byref(args), ctypes.byref(table), ctypes.sizeof(table), None)
    if not session:
        raise RuntimeError("fuse: cannot start a session")
    try:
        if signals:
            for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
                signal.signal(sig, signal.SIG_DFL)  # libfuse installs its own only over the default
            ll.set_signal_handlers(session)
        if ll.session_mount(session, os.fsencode(mountpoint)) != 0:
            raise RuntimeError("fuse: mount failed")
        ops.session = session
        ops.notifier = Notifier(session)
        config = ll.loop_cfg_create()
        ll.loop_cfg_set_max_threads(config, THREADS)
        ll.loop_cfg_set_idle_threads(config, THREADS)
        try:
            ll.session_loop_mt(session, config)
        finally:
            ops.close()  # the kernel has let go: the upper and workdir are free for the next mount at once
            ll.loop_cfg_destroy(config)
            ops.notifier.stop()
            ll.session_unmount(session)
    finally:
        if signals:
            ll.remove_signal_handlers(session)
        ll.session_destroy(session)  # calls destroy if the kernel had sent init
        ops.close()
