"""The ctypes binding of libfuse 3's low-level (inode-based) API that the daemon runs on.

Why low-level: the kernel then has one inode per object, as with the kernel
overlay, so hard links share attributes and pages without cross-name
invalidation, an unlinked open file lives on by its node id (no hidden
renames into users' names), and no path table inside libfuse can race a
rename. mfusepy supplies the library and the platform's struct layouts
(`struct stat`, `statvfs`, `fuse_file_info`, `fuse_conn_info`); this module
declares the low-level calls on top of them.
"""

import ctypes
import os
import threading

_choice = os.environ.get("FUSE_LIBRARY_NAME")
os.environ["FUSE_LIBRARY_NAME"] = "fuse3"  # mfusepy would take libfuse 2 when both are installed
_path = os.environ.get("FUSE_LIBRARY_PATH")
if _path is None:  # by its soname, as the loader finds it: mfusepy's find_library would run `ldconfig -p`
    try:
        ctypes.CDLL("libfuse3.so.3")
        os.environ["FUSE_LIBRARY_PATH"] = "libfuse3.so.3"
    except OSError:
        pass  # not there by that name: mfusepy looks for it
try:
    import mfusepy
finally:
    if _choice is None:
        del os.environ["FUSE_LIBRARY_NAME"]
    else:
        os.environ["FUSE_LIBRARY_NAME"] = _choice
    if _path is None:
        os.environ.pop("FUSE_LIBRARY_PATH", None)
if mfusepy.fuse_version_major != 3 or mfusepy.fuse_version_minor < 12:
    raise ImportError(f"cowfs needs libfuse 3.12 or newer, found {mfusepy._libfuse_path} "
                      f"({mfusepy.fuse_version_major}.{mfusepy.fuse_version_minor}; install fuse3)")

lib = mfusepy._libfuse
Stat = mfusepy.c_stat
StatVfs = mfusepy.c_statvfs
FileInfo = mfusepy.fuse_file_info
ConnInfo = mfusepy.fuse_conn_info

ROOT_ID = 1

# fuse_common.h: capabilities asked for in init
CAP_DONT_MASK = 1 << 6
CAP_SPLICE_WRITE = 1 << 7
CAP_SPLICE_MOVE = 1 << 8
CAP_SPLICE_READ = 1 << 9
CAP_IOCTL_DIR = 1 << 11  # ioctls on directories reach the daemon (chattr, lsattr)
CAP_AUTO_INVAL_DATA = 1 << 12
CAP_READDIRPLUS = 1 << 13
CAP_READDIRPLUS_AUTO = 1 << 14
CAP_POSIX_ACL = 1 << 19
CAP_NO_OPENDIR_SUPPORT = 1 << 24  # the kernel opens a directory itself when opendir answers ENOSYS

# fuse_lowlevel.h: which attributes a SETATTR sets
SET_ATTR_MODE, SET_ATTR_UID, SET_ATTR_GID, SET_ATTR_SIZE = 1 << 0, 1 << 1, 1 << 2, 1 << 3
SET_ATTR_ATIME, SET_ATTR_MTIME, SET_ATTR_ATIME_NOW, SET_ATTR_MTIME_NOW = 1 << 4, 1 << 5, 1 << 7, 1 << 8

BUF_IS_FD, BUF_FD_SEEK = 1 << 1, 1 << 2


class EntryParam(ctypes.Structure):
    """struct fuse_entry_param: the answer to a lookup."""
    _fields_ = [("ino", ctypes.c_uint64), ("generation", ctypes.c_uint64), ("attr", Stat),
                ("attr_timeout", ctypes.c_double), ("entry_timeout", ctypes.c_double)]


class Ctx(ctypes.Structure):
    """struct fuse_ctx: who sent a request."""
    _fields_ = [("uid", ctypes.c_uint32), ("gid", ctypes.c_uint32), ("pid", ctypes.c_int32),
                ("umask", ctypes.c_uint32)]


class Buf(ctypes.Structure):
    _fields_ = [("size", ctypes.c_size_t), ("flags", ctypes.c_int), ("mem", ctypes.c_void_p),
                ("fd", ctypes.c_int), ("pos", ctypes.c_int64)]


class BufVec(ctypes.Structure):
    """struct fuse_bufvec with its one inline buffer."""
    _fields_ = [("count", ctypes.c_size_t), ("idx", ctypes.c_size_t), ("off", ctypes.c_size_t),
                ("buf", Buf * 1)]


def fd_bufvec(fd, size, pos):
    """A buffer vector that names `size` bytes of descriptor `fd` at `pos`: libfuse moves the data itself."""
    vec = BufVec(count=1)
    vec.buf[0].size, vec.buf[0].flags, vec.buf[0].fd, vec.buf[0].pos = size, BUF_IS_FD | BUF_FD_SEEK, fd, pos
    return vec


class Args(ctypes.Structure):
    """struct fuse_args."""
    _fields_ = [("argc", ctypes.c_int), ("argv", ctypes.POINTER(ctypes.c_char_p)), ("allocated", ctypes.c_int)]


class ForgetData(ctypes.Structure):
    _fields_ = [("ino", ctypes.c_uint64), ("nlookup", ctypes.c_uint64)]


req_t, ino_t, fi_p, st_p = ctypes.c_void_p, ctypes.c_uint64, ctypes.POINTER(FileInfo), ctypes.POINTER(Stat)
_name = ctypes.c_char_p
_f = ctypes.CFUNCTYPE

# struct fuse_lowlevel_ops, in the header's order; the slots cowfs leaves empty answer ENOSYS.
OPS_FIELDS = [
    ("init", _f(None, ctypes.c_void_p, ctypes.POINTER(ConnInfo))),
    ("destroy", _f(None, ctypes.c_void_p)),
    ("lookup", _f(None, req_t, ino_t, _name)),
    ("forget", _f(None, req_t, ino_t, ctypes.c_uint64)),
    ("getattr", _f(None, req_t, ino_t, fi_p)),
    ("setattr", _f(None, req_t, ino_t, st_p, ctypes.c_int, fi_p)),
    ("readlink", _f(None, req_t, ino_t)),
    ("mknod", _f(None, req_t, ino_t, _name, ctypes.c_uint32, ctypes.c_uint64)),
    ("mkdir", _f(None, req_t, ino_t, _name, ctypes.c_uint32)),
    ("unlink", _f(None, req_t, ino_t, _name)),
    ("rmdir", _f(None, req_t, ino_t, _name)),
    ("symlink", _f(None, req_t, _name, ino_t, _name)),
    ("rename", _f(None, req_t, ino_t, _name, ino_t, _name, ctypes.c_uint)),
    ("link", _f(None, req_t, ino_t, ino_t, _name)),
    ("open", _f(None, req_t, ino_t, fi_p)),
    ("read", _f(None, req_t, ino_t, ctypes.c_size_t, ctypes.c_int64, fi_p)),
    ("write", _f(None, req_t, ino_t, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int64, fi_p)),
    ("flush", _f(None, req_t, ino_t, fi_p)),
    ("release", _f(None, req_t, ino_t, fi_p)),
    ("fsync", _f(None, req_t, ino_t, ctypes.c_int, fi_p)),
    ("opendir", _f(None, req_t, ino_t, fi_p)),
    ("readdir", _f(None, req_t, ino_t, ctypes.c_size_t, ctypes.c_int64, fi_p)),
    ("releasedir", _f(None, req_t, ino_t, fi_p)),
    ("fsyncdir", _f(None, req_t, ino_t, ctypes.c_int, fi_p)),
    ("statfs", _f(None, req_t, ino_t)),
    ("setxattr", _f(None, req_t, ino_t, _name, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)),
    ("getxattr", _f(None, req_t, ino_t, _name, ctypes.c_size_t)),
    ("listxattr", _f(None, req_t, ino_t, ctypes.c_size_t)),
    ("removexattr", _f(None, req_t, ino_t, _name)),
    ("access", _f(None, req_t, ino_t, ctypes.c_int)),
    ("create", _f(None, req_t, ino_t, _name, ctypes.c_uint32, fi_p)),
    ("getlk", ctypes.c_void_p),
    ("setlk", ctypes.c_void_p),
    ("bmap", ctypes.c_void_p),
    ("ioctl", _f(None, req_t, ino_t, ctypes.c_uint, ctypes.c_void_p, fi_p, ctypes.c_uint, ctypes.c_void_p,
                 ctypes.c_size_t, ctypes.c_size_t)),
    ("poll", ctypes.c_void_p),
    ("write_buf", _f(None, req_t, ino_t, ctypes.POINTER(BufVec), ctypes.c_int64, fi_p)),
    ("retrieve_reply", ctypes.c_void_p),
    ("forget_multi", _f(None, req_t, ctypes.c_size_t, ctypes.POINTER(ForgetData))),
    ("flock", ctypes.c_void_p),
    ("fallocate", _f(None, req_t, ino_t, ctypes.c_int, ctypes.c_int64, ctypes.c_int64, fi_p)),
    ("readdirplus", _f(None, req_t, ino_t, ctypes.c_size_t, ctypes.c_int64, fi_p)),
    ("copy_file_range", ctypes.c_void_p),
    ("lseek", ctypes.c_void_p),
]


class LowlevelOps(ctypes.Structure):
    _fields_ = OPS_FIELDS


def _declare(name, restype, *argtypes):
    fn = getattr(lib, name)
    fn.restype, fn.argtypes = restype, list(argtypes)
    return fn


_int, _vp, _sz = ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t
reply_err = _declare("fuse_reply_err", _int, req_t, _int)
reply_none = _declare("fuse_reply_none", None, req_t)
reply_entry = _declare("fuse_reply_entry", _int, req_t, ctypes.POINTER(EntryParam))
reply_create = _declare("fuse_reply_create", _int, req_t, ctypes.POINTER(EntryParam), fi_p)
reply_attr = _declare("fuse_reply_attr", _int, req_t, st_p, ctypes.c_double)
reply_readlink = _declare("fuse_reply_readlink", _int, req_t, ctypes.c_char_p)
reply_open = _declare("fuse_reply_open", _int, req_t, fi_p)
reply_write = _declare("fuse_reply_write", _int, req_t, _sz)
reply_buf = _declare("fuse_reply_buf", _int, req_t, ctypes.c_char_p, _sz)
reply_data = _declare("fuse_reply_data", _int, req_t, ctypes.POINTER(BufVec), _int)
reply_statfs = _declare("fuse_reply_statfs", _int, req_t, ctypes.POINTER(StatVfs))
reply_xattr = _declare("fuse_reply_xattr", _int, req_t, _sz)
reply_ioctl = _declare("fuse_reply_ioctl", _int, req_t, _int, ctypes.c_char_p, _sz)
add_direntry = _declare("fuse_add_direntry", _sz, req_t, _vp, _sz, ctypes.c_char_p, st_p, ctypes.c_int64)
add_direntry_plus = _declare("fuse_add_direntry_plus", _sz, req_t, _vp, _sz, ctypes.c_char_p,
                             ctypes.POINTER(EntryParam), ctypes.c_int64)
req_ctx = _declare("fuse_req_ctx", ctypes.POINTER(Ctx), req_t)
req_getgroups = _declare("fuse_req_getgroups", _int, req_t, _int, ctypes.POINTER(ctypes.c_uint32))
buf_size = _declare("fuse_buf_size", _sz, ctypes.POINTER(BufVec))
buf_copy = _declare("fuse_buf_copy", ctypes.c_ssize_t, ctypes.POINTER(BufVec), ctypes.POINTER(BufVec), _int)

session_new = _declare("fuse_session_new", _vp, ctypes.POINTER(Args), ctypes.POINTER(LowlevelOps), _sz, _vp)
session_mount = _declare("fuse_session_mount", _int, _vp, ctypes.c_char_p)
session_unmount = _declare("fuse_session_unmount", None, _vp)
session_destroy = _declare("fuse_session_destroy", None, _vp)
session_exit = _declare("fuse_session_exit", None, _vp)
session_fd = _declare("fuse_session_fd", _int, _vp)
set_signal_handlers = _declare("fuse_set_signal_handlers", _int, _vp)
remove_signal_handlers = _declare("fuse_remove_signal_handlers", None, _vp)
loop_cfg_create = _declare("fuse_loop_cfg_create", _vp)
loop_cfg_destroy = _declare("fuse_loop_cfg_destroy", None, _vp)
loop_cfg_set_max_threads = _declare("fuse_loop_cfg_set_max_threads", None, _vp, ctypes.c_uint)
loop_cfg_set_idle_threads = _declare("fuse_loop_cfg_set_idle_threads", None, _vp, ctypes.c_uint)
session_loop_mt = _declare("fuse_session_loop_mt_312", _int, _vp, _vp)
notify_inval_inode = _declare("fuse_lowlevel_notify_inval_inode", _int, _vp, ino_t, ctypes.c_int64, ctypes.c_int64)
notify_inval_entry = _declare("fuse_lowlevel_notify_inval_entry", _int, _vp, ino_t, ctypes.c_char_p, _sz)


def make_args(argv):
    """A struct fuse_args over `argv` (bytes); the returned tuple keeps the strings alive."""
    array = (ctypes.c_char_p * (len(argv) + 1))(*argv, None)
    return Args(len(argv), array, 0), array


def fill_stat(st, attrs):
    """Every field of `st` from the engine's attribute dict (times in ns)."""
    st.st_mode, st.st_ino, st.st_nlink = attrs["st_mode"], attrs["st_ino"], attrs["st_nlink"]
    st.st_uid, st.st_gid, st.st_rdev = attrs["st_uid"], attrs["st_gid"], attrs["st_rdev"]
    st.st_size, st.st_blocks, st.st_blksize = attrs["st_size"], attrs["st_blocks"], attrs["st_blksize"]
    st.st_atimespec.tv_sec, st.st_atimespec.tv_nsec = divmod(attrs["st_atime"], 1_000_000_000)
    st.st_mtimespec.tv_sec, st.st_mtimespec.tv_nsec = divmod(attrs["st_mtime"], 1_000_000_000)
    st.st_ctimespec.tv_sec, st.st_ctimespec.tv_nsec = divmod(attrs["st_ctime"], 1_000_000_000)


# libfuse calls us from its own worker threads. For such a thread, each ctypes callback makes a new
# Python thread state and throws it away on return, which costs more than the rest of a GETATTR. One
# PyGILState_Ensure that is never released keeps the thread's state alive across callbacks.
_pinned = set()
_gil_ensure = ctypes.pythonapi.PyGILState_Ensure
_gil_ensure.restype = ctypes.c_int


def pin_thread_state():
    thread = threading.get_native_id()
    if thread not in _pinned:
        _gil_ensure()
        _pinned.add(thread)
