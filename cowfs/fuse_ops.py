"""The FUSE adapter: a thin fusepy layer that maps each call to the engine and owns the open file handles.

No overlay logic lives here. Errors are translated in one place, `__call__`:
an OSError becomes its errno; anything unexpected is logged with its
traceback and answered with EIO, never silently.
"""

import errno
import logging
import os
import re

import fuse

log = logging.getLogger("cowfs")

# libfuse (without hard_remove) renames an open file it is asked to unlink to this name
# ("%08x%08x" of node id and a counter), and unlinks that name at the last close.
LIBFUSE_HIDDEN = re.compile(r"\.fuse_hidden[0-9a-f]{16}")

UTIME_NOW = (1 << 30) - 1
UTIME_OMIT = (1 << 30) - 2


class CowfsFUSE(fuse.FUSE):
    """fusepy's FUSE, passing utimens its raw timespecs so that UTIME_NOW and UTIME_OMIT survive."""

    def utimens(self, path, buf):
        times = None
        if buf:
            times = tuple((ts.tv_sec, ts.tv_nsec) for ts in (buf.contents.actime, buf.contents.modtime))
        return self.operations("utimens", path.decode(self.encoding), times)


def _time_ns(ts):
    sec, nsec = ts
    if nsec == UTIME_OMIT:
        return None
    if nsec == UTIME_NOW:
        return fuse_now_ns()
    return sec * 10**9 + nsec


def fuse_now_ns():
    import time
    return time.time_ns()


class CowfsOperations(fuse.Operations):
    """fusepy operations over a `Union` engine (fusepy's raw_fi mode: open flags and fh come in fuse_file_info)."""

    use_ns = True
    flag_nullpath_ok = 1  # reads, writes and fstat on a file whose name is gone (path None)
    flag_utime_omit_ok = 1  # pass UTIME_NOW / UTIME_OMIT through to utimens

    def __init__(self, union, on_ready=None):
        self.union = union
        self.on_ready = on_ready
        self.handles = {}

    def __call__(self, op, *args):
        try:
            return getattr(self, op)(*args)
        except fuse.FuseOSError:
            raise
        except OSError as e:
            raise fuse.FuseOSError(e.errno or errno.EIO) from None
        except Exception:
            log.exception("cowfs: unexpected failure in %s(%s)", op, args[0] if args else "")
            raise fuse.FuseOSError(errno.EIO) from None

    @staticmethod
    def _owner():
        uid, gid, _pid = fuse.fuse_get_context()
        return uid, gid

    # -- lifecycle -------------------------------------------------------------------------------
    def init(self, path):
        if self.on_ready is not None:
            self.on_ready()

    def destroy(self, path):
        for handle in list(self.handles.values()):
            self.union.release(handle)
        self.handles.clear()
        self.union.close()

    # -- attributes and names --------------------------------------------------------------------
    def getattr(self, path, fh=None):
        if path is None and fh is not None and fh.fh in self.handles:
            return self.union.fgetattr(self.handles[fh.fh])
        return self.union.getattr(path)

    def readdir(self, path, fh):
        return [(name, {"st_ino": ino, "st_mode": mode}, 0) for name, ino, mode in self.union.readdir(path)]

    def readlink(self, path):
        return self.union.readlink(path)

    def access(self, path, amode):
        return self.union.access(path, amode)

    def statfs(self, path):
        return self.union.statfs()

    def chmod(self, path, mode):
        return self.union.chmod(path, mode)

    def chown(self, path, uid, gid):
        return self.union.chown(path, uid, gid)

    def utimens(self, path, times=None):
        if times is None:
            now = fuse_now_ns()
            return self.union.utimens(path, now, now)
        return self.union.utimens(path, _time_ns(times[0]), _time_ns(times[1]))

    def truncate(self, path, length, fh=None):
        if fh is not None:
            return self.union.ftruncate(self.handles[fh.fh], length)
        return self.union.truncate(path, length)

    def mkdir(self, path, mode):
        return self.union.mkdir(path, mode, self._owner())

    def mknod(self, path, mode, dev):
        return self.union.mknod(path, mode, dev, self._owner())

    def symlink(self, target, source):
        return self.union.symlink(target, source, self._owner())

    def link(self, target, source):
        return self.union.link(source, target)

    def unlink(self, path):
        return self.union.unlink(path)

    def rmdir(self, path):
        return self.union.rmdir(path)

    def rename(self, old, new):
        if LIBFUSE_HIDDEN.fullmatch(os.path.basename(new)):
            return self.union.hide(old, new)
        return self.union.rename(old, new)

    # -- xattrs ----------------------------------------------------------------------------------
    def getxattr(self, path, name, position=0):
        return self.union.getxattr(path, name)

    def listxattr(self, path):
        return self.union.listxattr(path)

    def setxattr(self, path, name, value, options, position=0):
        return self.union.setxattr(path, name, value, options)

    def removexattr(self, path, name):
        return self.union.removexattr(path, name)

    # -- open files ------------------------------------------------------------------------------
    def _keep(self, fi, handle):
        self.handles[handle.fd] = handle
        fi.fh = handle.fd
        return 0

    def open(self, path, fi):
        return self._keep(fi, self.union.open(path, fi.flags))

    def create(self, path, mode, fi):
        return self._keep(fi, self.union.create(path, mode, fi.flags, self._owner()))

    def read(self, path, size, offset, fi):
        return self.union.read(self.handles[fi.fh], size, offset, path)

    def write(self, path, data, offset, fi):
        return self.union.write(self.handles[fi.fh], data, offset)

    def flush(self, path, fi):
        return 0

    def fsync(self, path, datasync, fi):
        return self.union.fsync(self.handles[fi.fh], bool(datasync))

    def release(self, path, fi):
        handle = self.handles.pop(fi.fh, None)
        if handle is not None:
            self.union.release(handle)
        return 0


def serve(union, mountpoint, *, foreground=True, debug=False, allow_other=False, read_only=False,
          fsname="cowfs", mount_flags=(), on_ready=None):
    """Mount `union` at `mountpoint` and serve it until unmounted (blocks)."""
    options = dict(
        fsname=fsname, subtype="cowfs", default_permissions=True, use_ino=True,
        nonempty=True, attr_timeout=0, entry_timeout=1, negative_timeout=1,
        dev=os.geteuid() == 0, suid=os.geteuid() == 0,  # like the kernel overlay, when root may allow it
        big_writes=True, max_write=131072, max_read=131072,  # 128 KiB per request, not 4 KiB
        auto_cache=True,  # keep a file's pages across opens while its mtime and size stay the same
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
