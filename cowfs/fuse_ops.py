"""The FUSE adapter: a thin mfusepy (libfuse 3) layer that maps each call to the engine and owns the open file handles.

No overlay logic lives here. Errors are translated in one place,
`CowfsFUSE._wrapper`: an OSError becomes its errno; anything unexpected is
logged with its traceback and answered with EIO, never silently.

libfuse 3 and not fusepy's libfuse 2, because the kernel may cache
attributes only if it can be told when they change (`KernelCache`), and
because renameat2 flags reach us only through libfuse 3.
"""

import ctypes
import errno
import itertools
import logging
import os
import re
import stat
import threading
import time

_choice = os.environ.get("FUSE_LIBRARY_NAME")
os.environ["FUSE_LIBRARY_NAME"] = "fuse3"  # mfusepy would take libfuse 2 when both are installed
try:
    import mfusepy as fuse
finally:
    if _choice is None:
        del os.environ["FUSE_LIBRARY_NAME"]
    else:
        os.environ["FUSE_LIBRARY_NAME"] = _choice
if fuse.fuse_version_major != 3:
    raise ImportError(f"cowfs needs libfuse 3, found {fuse._libfuse._name} (install fuse3)")

from .lookup import join, renamed_paths
from .syscalls import RENAME_EXCHANGE

log = logging.getLogger("cowfs")

# libfuse (without hard_remove) renames an open file it is asked to unlink to this name
# ("%08x%08x" of node id and a counter), and unlinks that name at the last close.
LIBFUSE_HIDDEN = re.compile(r"\.fuse_hidden[0-9a-f]{16}")

UTIME_NOW = (1 << 30) - 1
UTIME_OMIT = (1 << 30) - 2

# How long the kernel may keep names and attributes without asking again. Every change made
# through the mount either updates the kernel's copy itself or is announced by KernelCache.
ENTRY_TIMEOUT = 1.0
ATTR_TIMEOUT = 1.0

_invalidate_path = fuse._libfuse.fuse_invalidate_path
_invalidate_path.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
_invalidate_path.restype = ctypes.c_int


class KernelCache:
    """Tells the kernel which cached attributes a change made stale, where it cannot know itself.

    libfuse's path-based API gives every name its own kernel inode, so when one
    name of a hard-linked file changes the file (write, chmod, link, unlink...),
    the kernel's inodes for its other names keep old attributes. This keeps, for
    files seen with more than one link, the names the kernel knows, and
    invalidates the others after each change. A copy-up may also change what a
    stat shows (st_ino and st_nlink of a hard-linked lower file, st_nlink of a
    directory that becomes merged), so each copied-up path is invalidated too.
    """

    def __init__(self):
        self.fuse = None  # struct fuse *, known from init on
        self._lock = threading.Lock()
        self._names = {}  # st_ino -> set of merged paths, for files seen with st_nlink > 1
        self._ino = {}    # merged path -> st_ino, the inverse
        self._pending = threading.local()  # paths copied up by the request this thread serves

    def invalidate(self, path):
        if self.fuse is not None:
            _invalidate_path(self.fuse, path.encode("utf-8", "surrogateescape"))  # -ENOENT when not cached

    def seen(self, path, attrs):
        """Remember `path` if it is one name of a hard-linked file."""
        if path is None or (attrs["st_nlink"] < 2 and path not in self._ino) or stat.S_ISDIR(attrs["st_mode"]):
            return
        ino = attrs["st_ino"]
        with self._lock:
            old = self._ino.get(path)
            if old == ino:
                return
            if old is not None:
                self._names[old].discard(path)
            self._ino[path] = ino
            self._names.setdefault(ino, set()).add(path)

    def changed(self, path, *, keep=None):
        """The file at `path` changed: invalidate its other names (and `path` itself unless it is `keep`)."""
        self.changed_ino(self._ino.get(path), keep)

    def changed_ino(self, ino, keep):
        if ino in self._names:
            with self._lock:
                names = [name for name in self._names[ino] if name != keep]
            for name in names:
                self.invalidate(name)

    def ino_of(self, path):
        return self._ino.get(path)

    def forget(self, path):
        """`path` no longer names its file: invalidate the file's other names, which lost a link."""
        with self._lock:
            ino = self._ino.pop(path, None)
            if ino is None:
                return
            names = self._names.get(ino, set())
            names.discard(path)
            if not names:
                self._names.pop(ino, None)
            rest = list(names)
        for name in rest:
            self.invalidate(name)

    def moved(self, old, new, exchange=False):
        """Rename the remembered paths at and under `old` (swap with `new` on exchange)."""
        with self._lock:
            moves = renamed_paths(list(self._ino), old, new, exchange)
            taken = {p: self._ino.pop(p) for p, _ in moves}
            for p, q in moves:
                ino = taken[p]
                names = self._names[ino]
                names.discard(p)
                names.add(q)
                self._ino[q] = ino

    def on_event(self, event):
        """A copy-up may change what stat shows: invalidate the path once the engine lets go of its lock."""
        if event["event"] == "copy_up":  # at open or truncate, never inside a write
            self._pending.__dict__.setdefault("paths", []).append(event["path"])

    def flush(self):
        """Send the invalidations the engine's events asked for in this thread (before the reply goes out)."""
        paths = self._pending.__dict__.pop("paths", None)
        if paths:
            for path in paths:
                self.invalidate(path)


class CowfsFUSE(fuse.FUSE):
    """mfusepy's FUSE with cowfs's error translation, raw utimens timespecs and renameat2 flags."""

    def _wrapper(self, func, *args, **kwargs):
        thread = threading.get_native_id()
        if thread not in _PINNED:
            _pin_thread_state(thread)
        try:
            return func(*args, **kwargs) or 0
        except OSError as e:
            return -(e.errno if isinstance(e.errno, int) and e.errno > 0 else errno.EIO)
        except Exception:
            log.exception("cowfs: unexpected failure in %s", func.__name__)
            return -errno.EIO
        except BaseException as e:  # mfusepy stops the session and re-raises it after the loop
            return super()._wrapper(_reraise, e)
        finally:
            self.operations.cache.flush()  # outside the engine's lock, before the kernel hears back

    def readdir_fuse_3(self, path, buf, filler, offset, fip, flags):
        """Entries with their offsets (so libfuse does not buffer the listing again), and, when the
        kernel asks for readdirplus, with their attributes, which saves it a LOOKUP per entry."""
        directory = path.decode(self.encoding, self.errors)
        ops = self.operations
        entries, plus = ops.readdir(directory, fip.contents.fh, offset, bool(flags & FUSE_READDIR_PLUS))
        short, full = fuse.c_stat(), fuse.c_stat()  # only st_ino and st_mode / everything
        short_ref, full_ref = ctypes.byref(short), ctypes.byref(full)
        for index in range(offset, len(entries)):
            name, encoded, ino, mode = entries[index]
            attrs = ops.entry_attrs(directory, name) if plus and index > 1 else None  # not "." and ".."
            if attrs is not None:
                _fill_stat(full, attrs)
                done = filler(buf, encoded, full_ref, index + 1, FUSE_FILL_DIR_PLUS)
            else:
                short.st_ino, short.st_mode = ino, mode
                done = filler(buf, encoded, short_ref, index + 1, 0)
            if done:
                break  # the kernel's buffer is full; it asks again from this offset
        return 0

    def read_buf(self, path, bufpp, size, offset, fip):
        """Reads by descriptor: libfuse reads the data itself, and none of it passes through Python."""
        fd = self.operations.read_buf(None if path is None else path.decode(self.encoding, self.errors),
                                      None, size, offset, fip.contents)
        vec = _libc.calloc(1, _BUFVEC_ALLOC)  # libfuse frees it with free()
        if not vec:
            return -errno.ENOMEM
        bufvec = _FuseBufvec.from_address(vec)
        bufvec.count = 1
        bufvec.buf[0].size = size
        bufvec.buf[0].flags = FUSE_BUF_IS_FD | FUSE_BUF_FD_SEEK
        bufvec.buf[0].fd = fd
        bufvec.buf[0].pos = offset
        ctypes.cast(bufpp, ctypes.POINTER(ctypes.c_void_p))[0] = vec
        return 0

    def getattr_fuse_3(self, path, buf, fip):
        fh = fip.contents if fip else None
        decoded = None if path is None else path.decode(self.encoding, self.errors)
        _fill_stat(buf.contents, self.operations.getattr(decoded, fh))
        return 0

    def utimens_fuse_3(self, path, buf, fip):
        times = None
        if buf:
            times = tuple((ts.tv_sec, ts.tv_nsec) for ts in (buf.contents.actime, buf.contents.modtime))
        return self.operations.utimens(None if path is None else path.decode(self.encoding, self.errors), times)

    def rename_fuse_3(self, old, new, flags):
        return self.operations.rename(old.decode(self.encoding, self.errors),
                                      new.decode(self.encoding, self.errors), flags)


# libfuse calls us from its own worker threads. For such a thread, each ctypes callback makes a new
# Python thread state and throws it away on return, which costs more than the rest of a GETATTR. One
# PyGILState_Ensure that is never released keeps the thread's state alive across callbacks.
_PINNED = set()
_gil_ensure = ctypes.pythonapi.PyGILState_Ensure
_gil_ensure.restype = ctypes.c_int


def _pin_thread_state(thread):
    _gil_ensure()
    _PINNED.add(thread)


class _FuseBuf(ctypes.Structure):  # struct fuse_buf (libfuse 3)
    _fields_ = [("size", ctypes.c_size_t), ("flags", ctypes.c_int), ("mem", ctypes.c_void_p),
                ("fd", ctypes.c_int), ("pos", ctypes.c_int64)]


class _FuseBufvec(ctypes.Structure):  # struct fuse_bufvec with its one inline buffer
    _fields_ = [("count", ctypes.c_size_t), ("idx", ctypes.c_size_t), ("off", ctypes.c_size_t),
                ("buf", _FuseBuf * 1)]


FUSE_BUF_IS_FD, FUSE_BUF_FD_SEEK = 1 << 1, 1 << 2
_BUFVEC_ALLOC = 2 * ctypes.sizeof(_FuseBufvec)  # room for fields later libfuse versions append, left zero
_libc = ctypes.CDLL(None)
_libc.calloc.restype = ctypes.c_void_p
_libc.calloc.argtypes = [ctypes.c_size_t, ctypes.c_size_t]


def _fill_stat(st, attrs):
    """Every field of `st` from the engine's attribute dict (times in ns); faster than mfusepy's generic loop."""
    st.st_mode, st.st_ino, st.st_nlink = attrs["st_mode"], attrs["st_ino"], attrs["st_nlink"]
    st.st_uid, st.st_gid, st.st_rdev = attrs["st_uid"], attrs["st_gid"], attrs["st_rdev"]
    st.st_size, st.st_blocks, st.st_blksize = attrs["st_size"], attrs["st_blocks"], attrs["st_blksize"]
    st.st_atimespec.tv_sec, st.st_atimespec.tv_nsec = divmod(attrs["st_atime"], 1_000_000_000)
    st.st_mtimespec.tv_sec, st.st_mtimespec.tv_nsec = divmod(attrs["st_mtime"], 1_000_000_000)
    st.st_ctimespec.tv_sec, st.st_ctimespec.tv_nsec = divmod(attrs["st_ctime"], 1_000_000_000)


def _reraise(e):
    raise e


def _time_ns(ts):
    sec, nsec = ts
    if nsec == UTIME_OMIT:
        return None
    if nsec == UTIME_NOW:
        return time.time_ns()
    return sec * 10**9 + nsec


class CowfsOperations(fuse.Operations):
    """mfusepy operations over a `Union` engine (raw_fi mode: open flags and fh come in fuse_file_info)."""

    use_ns = True

    def __init__(self, union, on_ready=None):
        self.union = union
        self.on_ready = on_ready
        self.handles = {}
        self.cache = KernelCache()
        self._handle_ino = {}  # fd -> st_ino, for files open under a hard-linked name
        self._listings = {}  # open directory handle -> its entries, read at offset 0
        self._plus_sent = {}  # directory -> when its entries last went out with their attributes
        self._encoded = {}  # directory -> (engine listing, its entries with names encoded once)
        self._dir_handles = itertools.count(1)  # next() is atomic: libfuse opens directories in many threads

    @staticmethod
    def _owner():
        uid, gid, _pid = fuse.fuse_get_context()
        return uid, gid

    @staticmethod
    def _umask():
        return fuse._libfuse.fuse_get_context().contents.umask  # passed to us, not applied (DONT_MASK)

    # -- lifecycle -------------------------------------------------------------------------------
    def init_with_config(self, conn, config):
        config.use_ino = 1
        config.entry_timeout = ENTRY_TIMEOUT
        config.negative_timeout = ENTRY_TIMEOUT
        config.attr_timeout = ATTR_TIMEOUT
        config.auto_cache = 1  # keep a file's pages across opens while its mtime and size stay the same
        if conn.capable & FUSE_CAP_POSIX_ACL:
            # the kernel checks and caches POSIX ACLs, as it does for the kernel overlay, instead of
            # asking us for system.posix_acl_access on every ls -l
            conn.want |= FUSE_CAP_POSIX_ACL
        if conn.capable & FUSE_CAP_DONT_MASK:
            conn.want |= FUSE_CAP_DONT_MASK  # the umask must not apply under a default ACL
        self.cache.fuse = fuse._libfuse.fuse_get_context().contents.fuse
        self.union.events.subscribe(self.cache.on_event)
        if self.on_ready is not None:
            self.on_ready()

    def destroy(self, path):
        self.union.events.unsubscribe(self.cache.on_event)
        for handle in list(self.handles.values()):
            self.union.release(handle)
        self.handles.clear()
        self.union.close()

    # -- attributes and names --------------------------------------------------------------------
    def getattr(self, path, fh=None):
        if fh is not None and fh.fh in self.handles:
            return self.union.fgetattr(self.handles[fh.fh], path)
        attrs = self.union.getattr(path)
        self.cache.seen(path, attrs)
        return attrs

    def opendir(self, path):
        return next(self._dir_handles)  # the listing is read at the first readdir

    def releasedir(self, path, fh):
        self._listings.pop(fh, None)
        return 0

    def readdir(self, path, fh, offset=0, plus=False):
        """The open directory's entries [(name, name as bytes, st_ino, type bits)], read at offset 0,
        and whether to send them with their attributes (readdirplus)."""
        if offset == 0 or fh not in self._listings:
            now = time.monotonic()
            if plus and now - self._plus_sent.get(path, -ENTRY_TIMEOUT) < ENTRY_TIMEOUT:
                plus = False  # the kernel still holds what the last readdirplus of this directory gave it
            if plus:
                if len(self._plus_sent) >= 4096:
                    self._plus_sent.clear()  # only a hint: forgetting costs one more full listing
                self._plus_sent[path] = now
            listing = self.union.readdir(path)  # the same list object while the engine keeps it
            encoded = self._encoded.get(path)
            if encoded is None or encoded[0] is not listing:
                if len(self._encoded) >= 4096:
                    self._encoded.clear()
                encoded = self._encoded[path] = (listing, [(name, os.fsencode(name), ino, mode)
                                                           for name, ino, mode in listing])
            self._listings[fh] = (encoded[1], plus)
        return self._listings[fh]

    def entry_attrs(self, directory, name):
        """getattr of one listed entry, at the moment it is sent (None if it has gone since)."""
        path = join(directory, name)
        try:
            attrs = self.union.getattr(path)
        except OSError:
            return None
        self.cache.seen(path, attrs)
        return attrs

    def readlink(self, path):
        return self.union.readlink(path)

    def access(self, path, amode):
        return self.union.access(path, amode)

    def statfs(self, path):
        return self.union.statfs()

    def chmod(self, path, mode):
        self.union.chmod(path, mode)
        self.cache.changed(path, keep=path)

    def chown(self, path, uid, gid):
        self.union.chown(path, uid, gid)
        self.cache.changed(path, keep=path)

    def utimens(self, path, times=None):
        if times is None:
            now = time.time_ns()
            self.union.utimens(path, now, now)
        else:
            self.union.utimens(path, _time_ns(times[0]), _time_ns(times[1]))
        self.cache.changed(path, keep=path)

    def truncate(self, path, length, fh=None):
        if fh is not None and fh.fh in self.handles:
            self.union.ftruncate(self.handles[fh.fh], length)
            self.cache.changed_ino(self._handle_ino.get(fh.fh), keep=path)
        else:
            self.union.truncate(path, length)
            self.cache.changed(path, keep=path)

    def mkdir(self, path, mode):
        return self.union.mkdir(path, mode, self._owner(), self._umask())

    def mknod(self, path, mode, dev):
        return self.union.mknod(path, mode, dev, self._owner(), self._umask())

    def symlink(self, target, source):
        return self.union.symlink(target, source, self._owner())

    def link(self, target, source):
        self.union.link(source, target)
        self.cache.changed(source, keep=source)
        self.cache.invalidate(source)  # its st_nlink grew

    def unlink(self, path):
        self.union.unlink(path)
        self.cache.forget(path)

    def rmdir(self, path):
        return self.union.rmdir(path)

    def rename(self, old, new, flags=0):
        if LIBFUSE_HIDDEN.fullmatch(os.path.basename(new)):
            self.union.hide(old, new)
            self.cache.moved(old, new)
            return
        exchange = bool(flags & RENAME_EXCHANGE)
        self.union.rename(old, new, flags)
        if not exchange:
            self.cache.forget(new)  # a file replaced there lost a name
        self.cache.moved(old, new, exchange)

    # -- xattrs ----------------------------------------------------------------------------------
    def getxattr(self, path, name, position=0):
        return self.union.getxattr(path, name)

    def listxattr(self, path):
        return self.union.listxattr(path)

    def setxattr(self, path, name, value, options, position=0):
        self.union.setxattr(path, name, value, options)
        self.cache.changed(path, keep=path)

    def removexattr(self, path, name):
        self.union.removexattr(path, name)
        self.cache.changed(path, keep=path)

    # -- open files ------------------------------------------------------------------------------
    def _keep(self, path, fi, handle):
        self.handles[handle.fd] = handle
        fi.fh = handle.fd
        ino = self.cache.ino_of(path)
        if ino is not None:
            self._handle_ino[handle.fd] = ino
        return 0

    def open(self, path, fi):
        handle = self.union.open(path, fi.flags)
        if fi.flags & os.O_TRUNC:
            self.cache.changed(path, keep=path)
        return self._keep(path, fi, handle)

    def create(self, path, mode, fi):
        return self._keep(path, fi, self.union.create(path, mode, fi.flags, self._owner(), self._umask()))

    def read(self, path, size, offset, fi):
        return self.union.read(self.handles[fi.fh], size, offset, path)

    def read_buf(self, path, bufpp, size, offset, fi):
        return self.union.read_fd(self.handles[fi.fh], path)

    def write(self, path, data, offset, fi):
        written = self.union.write(self.handles[fi.fh], data, offset)
        if fi.fh in self._handle_ino:  # never the writer's own name: the kernel holds its pages locked
            self.cache.changed_ino(self._handle_ino[fi.fh], keep=path)
        return written

    def flush(self, path, fi):
        return 0

    def fsync(self, path, datasync, fi):
        return self.union.fsync(self.handles[fi.fh], bool(datasync))

    def release(self, path, fi):
        handle = self.handles.pop(fi.fh, None)
        self._handle_ino.pop(fi.fh, None)
        if handle is not None:
            self.union.release(handle)
        return 0


FUSE_CAP_DONT_MASK = 1 << 6
FUSE_CAP_POSIX_ACL = 1 << 19
FUSE_READDIR_PLUS = 1  # enum fuse_readdir_flags
FUSE_FILL_DIR_PLUS = 2  # enum fuse_fill_dir_flags


def serve(union, mountpoint, *, foreground=True, debug=False, allow_other=False, read_only=False,
          fsname="cowfs", mount_flags=(), on_ready=None):
    """Mount `union` at `mountpoint` and serve it until unmounted (blocks)."""
    options = dict(
        fsname=fsname, subtype="cowfs", default_permissions=True,
        dev=os.geteuid() == 0, suid=os.geteuid() == 0,  # like the kernel overlay, when root may allow it
        max_threads=10,  # libfuse 3.14 reads an unset value as 2**32-1 and complains
    )
    if allow_other:
        options["allow_other"] = True
    if read_only:
        options["ro"] = True
    for flag in mount_flags:  # the user's generic flags (noatime, nosuid, ...) come last and win
        if flag != "rw" or not read_only:
            options.pop(flag, None)
            options[flag] = True
    CowfsFUSE(CowfsOperations(union, on_ready), mountpoint, raw_fi=True, foreground=foreground, debug=debug,
              nothreads=False, **options)
