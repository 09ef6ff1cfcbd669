"""The FUSE adapter in-process (cowfs.daemon.operations): its request methods called directly, without a mount.

The `fuse` fixture stands in for libfuse's side of a session: every reply
and notification function the adapter calls is replaced by a recorder (a
real one, handed a request that is not libfuse's, would crash the
interpreter); the functions that only fill memory (fuse_add_direntry,
fuse_add_direntry_plus, fuse_buf_size, fuse_buf_copy) are libfuse's own
(the first two behind checks of what they are given), so a listing is read
back from the bytes the kernel would get.  The engine under
the adapter is a real `Union` over layers in tmp_path.

What is checked is the adapter's contract with the kernel: each request is
answered exactly once; the engine's errno goes through (EIO for anything
unexpected); an entry carries the engine's attributes and the node id the
inode table gives, and counts a lookup that a forget takes back (or that an
interrupted answer never made); handles are kept until released; listings
continue from their offsets; and the kernel's caches are invalidated where
the module says.
"""

import ctypes
import errno
import logging
import os
import stat
import struct
import threading
import time
from pathlib import Path

import pytest

from cowfs.daemon import libfuse as ll
from cowfs.daemon import operations
from cowfs.daemon.operations import (
    ATTR_TIMEOUT,
    ENTRY_TIMEOUT,
    NEGATIVE_TIMEOUT,
    CowfsOperations,
    Notifier,
)
from cowfs.errors import StackError
from cowfs.overlay import copyup, fileattr
from cowfs.overlay.stack import Stack, check
from cowfs.overlay.syscalls import RENAME_EXCHANGE
from cowfs.overlay.union import Union

SESSION = 0x5E55  # what the adapter takes for its session: only ever handed to the recorders
ROOT = ll.ROOT_ID


# ---------------------------------------------------------------------------------------------
# libfuse's side, recorded

def _stat(st):
    """The fields of a struct stat the kernel reads, as a dict (times in ns)."""
    return {"st_ino": st.st_ino, "st_mode": st.st_mode, "st_nlink": st.st_nlink, "st_uid": st.st_uid,
            "st_gid": st.st_gid, "st_rdev": st.st_rdev, "st_size": st.st_size, "st_blocks": st.st_blocks,
            "st_blksize": st.st_blksize,
            "st_atime": st.st_atimespec.tv_sec * 10**9 + st.st_atimespec.tv_nsec,
            "st_mtime": st.st_mtimespec.tv_sec * 10**9 + st.st_mtimespec.tv_nsec,
            "st_ctime": st.st_ctimespec.tv_sec * 10**9 + st.st_ctimespec.tv_nsec}


def _entry(e):
    return {"ino": e.ino, "generation": e.generation, "attr": _stat(e.attr), "attr_timeout": e.attr_timeout,
            "entry_timeout": e.entry_timeout}


def _fi(fi):
    info = fi.contents
    return {"fh": info.fh, "keep_cache": info.keep_cache, "cache_readdir": info.cache_readdir}


class Fuse:
    """Records the answers and notifications the adapter sends, by request."""

    def __init__(self):
        self.replies = []  # (req, kind, *values)
        self.notices = []  # ("inode", session, node id, offset, length) / ("entry", session, parent id, name)
        self.ctx = ll.Ctx(uid=0, gid=0, pid=1, umask=0o022)
        self.groups = []
        self.groups_asked = []  # the sizes of the buffers req_getgroups was given
        self.result = 0  # what a reply returns: not 0 when the request was interrupted
        self.pinned = 0
        self.current = None  # the request being served
        self._filled = {}  # listing buffer -> bytes the entries added so far take
        self._reqs = iter(range(0x1000, 1 << 40))

    def _answer(self, req, kind, *values):
        self.replies.append((req, kind, *values))
        return self.result

    def reply_err(self, req, err):
        return self._answer(req, "err", err)

    def reply_none(self, req):
        self.replies.append((req, "none"))

    def reply_entry(self, req, e):
        return self._answer(req, "entry", _entry(e._obj))

    def reply_create(self, req, e, fi):
        return self._answer(req, "create", _entry(e._obj), _fi(fi))

    def reply_attr(self, req, st, timeout):
        return self._answer(req, "attr", _stat(st._obj), timeout)

    def reply_readlink(self, req, target):
        return self._answer(req, "readlink", target)

    def reply_open(self, req, fi):
        return self._answer(req, "open", _fi(fi))

    def reply_write(self, req, count):
        return self._answer(req, "write", count)

    def reply_buf(self, req, buf, size):
        return self._answer(req, "buf", bytes(buf[:size]) if buf is not None else None, size)

    def reply_data(self, req, vec, flags):
        b = vec._obj.buf[0]
        assert (vec._obj.count, vec._obj.idx, vec._obj.off) == (1, 0, 0)
        return self._answer(req, "data", os.pread(b.fd, b.size, b.pos), b.flags, flags)

    def reply_statfs(self, req, sv):
        return self._answer(req, "statfs", {name: getattr(sv._obj, name) for name, _ in ll.StatVfs._fields_
                                            if name.startswith("f_") and name != "f_fsid"})

    def reply_xattr(self, req, size):
        return self._answer(req, "xattr", size)

    def reply_ioctl(self, req, result, data, size):
        return self._answer(req, "ioctl", result, data, size)

    def req_ctx(self, req):
        assert req == self.current, "asked about another request"
        return ctypes.pointer(self.ctx)

    def req_getgroups(self, req, size, buf):
        assert req == self.current, "asked about another request"
        self.groups_asked.append(size)
        for i, gid in enumerate(self.groups[:size]):
            buf[i] = gid
        return len(self.groups)

    def notify_inval_inode(self, session, node_id, offset, length):
        self.notices.append(("inode", session, node_id, offset, length))
        return 0

    def notify_inval_entry(self, session, parent_id, name, size):
        assert size == len(name)
        self.notices.append(("entry", session, parent_id, name))
        return 0

    def pin_thread_state(self):
        self.pinned += 1

    def _entry_room(self, req, buf, size, name):
        """Checks libfuse's fuse_add_direntry(_plus) would not: the request, a name, and that `size` is
        the room left in the buffer after the entries that went in."""
        assert req == self.current and isinstance(name, bytes) and name
        whole = buf._obj
        assert size == ctypes.sizeof(whole) - self._filled.get(id(whole), 0), "not the room left"

    def _entry_added(self, buf, size, need):
        if need <= size:
            self._filled[id(buf._obj)] = self._filled.get(id(buf._obj), 0) + need

    def add_direntry(self, req, buf, size, name, st, offset):
        self._entry_room(req, buf, size, name)
        assert isinstance(st._obj, ll.Stat)
        need = REAL["add_direntry"](req, buf, size, name, st, offset)
        self._entry_added(buf, size, need)
        return need

    def add_direntry_plus(self, req, buf, size, name, e, offset):
        self._entry_room(req, buf, size, name)
        assert isinstance(e._obj, ll.EntryParam)
        need = REAL["add_direntry_plus"](req, buf, size, name, e, offset)
        self._entry_added(buf, size, need)
        return need

    # -- requests --------------------------------------------------------------------------------
    def call(self, method, *args):
        """Send one request to `method`; its one answer, as (kind, *values)."""
        req = self.current = next(self._reqs)
        self._filled = {}
        before = len(self.replies)
        pinned = self.pinned
        assert method(req, *args) is None
        answers = self.replies[before:]
        assert [a[0] for a in answers] == [req], f"{method.__name__} answered {answers}"
        assert self.pinned == pinned + 1  # a libfuse thread's Python state is kept
        return answers[0][1:]

    def invalidated(self):
        """The notifications sent since the last call, then forgotten."""
        notices, self.notices = self.notices, []
        return notices


PATCHED = ["reply_err", "reply_none", "reply_entry", "reply_create", "reply_attr", "reply_readlink", "reply_open",
           "reply_write", "reply_buf", "reply_data", "reply_statfs", "reply_xattr", "reply_ioctl", "req_ctx",
           "req_getgroups", "notify_inval_inode", "notify_inval_entry", "pin_thread_state", "add_direntry",
           "add_direntry_plus"]
REAL = {"add_direntry": ll.add_direntry, "add_direntry_plus": ll.add_direntry_plus}  # they only fill memory


@pytest.fixture
def fuse(monkeypatch):
    f = Fuse()
    for name in PATCHED:
        monkeypatch.setattr(ll, name, getattr(f, name))
    # bound to libfuse's own reply_err when the module was imported
    monkeypatch.setattr(operations, "OK", operations.Reply(ll.reply_err, 0))
    return f


# ---------------------------------------------------------------------------------------------
# the adapter over a real engine

class Adapter:
    def __init__(self, tmp_path, fuse):
        self.fuse = fuse
        self.lower = tmp_path / "lower"
        self.upper = tmp_path / "upper"
        self.work = tmp_path / "work"
        for p in (self.lower, self.upper, self.work):
            p.mkdir()
        self.ops = None

    def start(self, read_only=False):
        stack = (Stack(lowers=[str(self.lower)]) if read_only
                 else Stack(lowers=[str(self.lower)], upper=str(self.upper), work=str(self.work)))
        self.union = Union(check(stack))
        self.ops = CowfsOperations(self.union)
        assert self.ops.session is None and self.ops.notifier is None  # until serve has mounted
        self.ops.session = SESSION
        self.ops.notifier = Notifier(SESSION)
        return self.ops

    def stop(self):
        if self.ops is not None:
            self.ops.notifier.stop()
            self.ops.close()
            self.ops = None

    def __getattr__(self, name):
        """ad.lookup(...): send the request `name` and return its answer."""
        ops = self.__dict__.get("ops")
        if ops is None:
            raise AttributeError(name)
        return lambda *args: self.fuse.call(getattr(ops, name), *args)

    # -- shortcuts -------------------------------------------------------------------------------
    def node(self, path):
        """Look every name of `path` up, as the kernel would: the node id."""
        node_id = ROOT
        for name in path.strip("/").split("/"):
            kind, e = self.lookup(node_id, name.encode())
            assert kind == "entry" and e["ino"], (path, name)
            node_id = e["ino"]
        return node_id

    def open_fh(self, node_id, flags=os.O_RDONLY):
        kind, info = self.open(node_id, fi(flags))
        assert kind == "open"
        return info["fh"]


@pytest.fixture
def ad(tmp_path, fuse):
    a = Adapter(tmp_path, fuse)
    yield a
    a.stop()
    for name in os.listdir(tmp_path):
        copyup.discard(str(tmp_path / name))


def fi(flags=0, fh=0):
    return ctypes.pointer(ll.FileInfo(flags=flags, fh=fh))


NO_FI = ctypes.POINTER(ll.FileInfo)()


def put(root, rel, data=b"", mode=None):
    p = Path(root, rel)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(data)
    if mode is not None:
        os.chmod(p, mode)
    return p


def engine_attrs(ad, path):
    return ad.union.getattr(path)


def entry_attr(attrs):
    """The attributes an entry carries: the engine's, as the kernel reads them back."""
    return {k: attrs[k] for k in ("st_ino", "st_mode", "st_nlink", "st_uid", "st_gid", "st_rdev", "st_size",
                                  "st_blocks", "st_blksize", "st_atime", "st_mtime", "st_ctime")}


def memory(data):
    """What the kernel's WRITE brings: a buffer vector over `data` in memory (fuse_buf_copy consumes it)."""
    buf = ctypes.create_string_buffer(data, len(data))
    vec = ll.BufVec(count=1)
    vec.buf[0].size, vec.buf[0].mem = len(data), ctypes.cast(buf, ctypes.c_void_p)
    vec._data = buf
    return ctypes.pointer(vec)


def dirents(data):
    """[(name, ino, type, next offset)] of a READDIR answer, as the kernel parses it."""
    out, pos = [], 0
    while pos < len(data):
        ino, off, namelen, kind = struct.unpack_from("=QQII", data, pos)
        name = data[pos + 24:pos + 24 + namelen].decode()
        out.append((name, ino, kind, off))
        pos += (24 + namelen + 7) & ~7
    assert pos == len(data)
    return out


def direntplus(data):
    """[(name, node id, generation, entry timeout, attr timeout, attr dict, ino, type, next offset)] of a
    READDIRPLUS answer."""
    out, pos = [], 0
    while pos < len(data):
        nodeid, generation, entry_valid, attr_valid, entry_nsec, attr_nsec = struct.unpack_from("=QQQQII", data, pos)
        (a_ino, a_size, a_blocks, a_atime, a_mtime, a_ctime, a_atimensec, a_mtimensec, a_ctimensec, a_mode,
         a_nlink, a_uid, a_gid, a_rdev, a_blksize, _flags) = struct.unpack_from("=6Q10I", data, pos + 40)
        attr = {"st_ino": a_ino, "st_size": a_size, "st_blocks": a_blocks, "st_mode": a_mode, "st_nlink": a_nlink,
                "st_uid": a_uid, "st_gid": a_gid, "st_rdev": a_rdev, "st_blksize": a_blksize,
                "st_atime": a_atime * 10**9 + a_atimensec, "st_mtime": a_mtime * 10**9 + a_mtimensec,
                "st_ctime": a_ctime * 10**9 + a_ctimensec}
        ino, off, namelen, kind = struct.unpack_from("=QQII", data, pos + 128)
        name = data[pos + 152:pos + 152 + namelen].decode()
        out.append((name, nodeid, generation, entry_valid + entry_nsec / 1e9, attr_valid + attr_nsec / 1e9,
                    attr, ino, kind, off))
        pos += (152 + namelen + 7) & ~7
    assert pos == len(data)
    return out


# ---------------------------------------------------------------------------------------------
# lookups, entries and forgets

def test_lookup_answers_the_engines_attributes_with_a_new_node_id(ad):
    put(ad.lower, "d/f", b"hello")
    ops = ad.start()
    kind, e = ad.lookup(ROOT, b"d")
    assert kind == "entry"
    assert e == {"ino": 2, "generation": 0, "attr": entry_attr(engine_attrs(ad, "/d")),
                 "attr_timeout": ATTR_TIMEOUT, "entry_timeout": ENTRY_TIMEOUT}
    kind, f = ad.lookup(2, b"f")
    assert f["ino"] == 3 and f["attr"] == entry_attr(engine_attrs(ad, "/d/f"))
    assert f["attr"]["st_size"] == 5 and stat.S_ISREG(f["attr"]["st_mode"])
    assert ops.table.path(ops.table.get(3)) == "/d/f"
    assert ad.fuse.invalidated() == []  # a lookup changes nothing the kernel holds


def test_a_lookup_of_a_missing_name_is_a_negative_entry_kept_a_short_while(ad):
    ad.start()
    kind, e = ad.lookup(ROOT, b"nothing")
    assert kind == "entry"
    assert (e["ino"], e["entry_timeout"], e["attr_timeout"]) == (0, NEGATIVE_TIMEOUT, 0)
    assert len(ad.ops.table) == 1


def test_lookups_are_counted_and_forgotten(ad):
    put(ad.lower, "f")
    ops = ad.start()
    ids = {ad.lookup(ROOT, b"f")[1]["ino"] for _ in range(3)}
    assert ids == {2}
    inode = ops.table.get(2)
    assert inode.nlookup == 3
    assert ad.forget(2, 2) == ("none",)
    assert inode.nlookup == 1
    assert ad.forget(2, 1) == ("none",)
    assert ad.getattr(2, NO_FI) == ("err", errno.ESTALE)  # forgotten: the id is gone
    assert ad.forget(2, 1) == ("none",)  # a forget of an id no longer known is no error


def test_forget_multi_forgets_each(ad):
    put(ad.lower, "a")
    put(ad.lower, "b")
    ops = ad.start()
    a, b = ad.node("a"), ad.node("b")
    ad.lookup(ROOT, b"b")
    forgets = (ll.ForgetData * 2)(ll.ForgetData(a, 1), ll.ForgetData(b, 1))
    assert ad.forget_multi(2, forgets) == ("none",)
    assert ad.getattr(a, NO_FI) == ("err", errno.ESTALE)
    assert ops.table.get(b).nlookup == 1
    forgets = (ll.ForgetData * 1)(ll.ForgetData(b, 1))
    assert ad.forget_multi(1, forgets) == ("none",)
    assert ad.getattr(b, NO_FI) == ("err", errno.ESTALE)


def test_an_entry_the_kernel_never_got_is_not_counted(ad):
    put(ad.lower, "f")
    ops = ad.start()
    ad.fuse.result = -errno.ENOENT  # the request was interrupted: the answer went nowhere
    kind, e = ad.lookup(ROOT, b"f")
    assert e["ino"] == 2
    assert len(ops.table) == 1  # the inode is gone again
    ad.fuse.result = 0
    node = ad.node("f")
    ad.fuse.result = -errno.ENOENT
    ad.lookup(ROOT, b"f")
    assert ops.table.get(node).nlookup == 1


# ---------------------------------------------------------------------------------------------
# errors

def test_the_engines_errno_is_the_answer(ad):
    put(ad.lower, "f")
    ad.start()
    f = ad.node("f")
    assert ad.lookup(f, b"x") == ("err", errno.ENOTDIR)
    assert ad.lookup(99, b"x") == ("err", errno.ESTALE)
    assert ad.mkdir(ROOT, b"f", 0o755) == ("err", errno.EEXIST)
    assert ad.readlink(f) == ("err", errno.EINVAL)
    assert ad.rmdir(ROOT, b"f") == ("err", errno.ENOTDIR)


def test_anything_unexpected_is_eio_and_logged(ad, caplog, monkeypatch):
    put(ad.lower, "f")
    ad.start()

    def broken(path):
        raise ValueError("broken")
    monkeypatch.setattr(ad.union, "getattr", broken)
    with caplog.at_level(logging.ERROR, logger="cowfs"):
        assert ad.lookup(ROOT, b"f") == ("err", errno.EIO)
    assert [r.getMessage() for r in caplog.records] == ["cowfs: unexpected failure in lookup"]
    assert caplog.records[0].exc_info[0] is ValueError


@pytest.mark.parametrize("error", [OSError("no errno"), OSError(0, "zero"), OSError(-5, "negative"),
                                   OSError("EPERM", "not a number")])
def test_an_oserror_without_a_real_errno_is_eio(ad, monkeypatch, error):
    ad.start()

    def broken(path):
        raise error
    monkeypatch.setattr(ad.union, "getattr", broken)
    assert ad.lookup(ROOT, b"f") == ("err", errno.EIO)


def test_a_failure_after_the_answer_was_made_is_logged_and_the_answer_still_goes(ad, caplog, monkeypatch):
    put(ad.lower, "f")
    ops = ad.start()

    def broken():
        raise ValueError("settle")
    monkeypatch.setattr(ops, "_settle", broken)
    with caplog.at_level(logging.ERROR, logger="cowfs"):
        kind, e = ad.lookup(ROOT, b"f")
    assert kind == "entry" and e["ino"] == 2
    assert [r.getMessage() for r in caplog.records] == ["cowfs: unexpected failure after lookup"]


# ---------------------------------------------------------------------------------------------
# getattr and setattr

def test_getattr_by_name_and_through_a_handle_once_the_name_is_gone(ad):
    put(ad.lower, "f", b"abc")
    ad.start()
    f = ad.node("f")
    assert ad.getattr(f, NO_FI) == ("attr", entry_attr(engine_attrs(ad, "/f")), ATTR_TIMEOUT)
    assert ad.getattr(ROOT, NO_FI) == ("attr", entry_attr(engine_attrs(ad, "/")), ATTR_TIMEOUT)
    fh = ad.open_fh(f, os.O_RDWR)
    before = engine_attrs(ad, "/f")
    assert ad.unlink(ROOT, b"f") == ("err", 0)
    kind, attrs, _ = ad.getattr(f, fi(fh=fh))
    assert kind == "attr" and attrs["st_size"] == 3 and attrs["st_ino"] == before["st_ino"]
    kind, borrowed, _ = ad.getattr(f, NO_FI)  # no handle given: one of the inode's own
    assert borrowed == attrs
    assert ad.release(f, fi(fh=fh)) == ("err", 0)
    assert ad.getattr(f, NO_FI) == ("err", errno.ENOENT)  # the kernel still holds the inode
    ad.forget(f, 1)
    assert ad.getattr(f, NO_FI) == ("err", errno.ESTALE)


def test_an_unlinked_inode_without_handles_has_no_attributes(ad):
    put(ad.lower, "f")
    ops = ad.start()
    f = ad.node("f")
    ad.unlink(ROOT, b"f")
    assert ops.table.path(ops.table.get(f)) is None
    assert ad.getattr(f, NO_FI) == ("err", errno.ENOENT)
    assert ad.setattr(f, ctypes.pointer(ll.Stat(st_mode=0o600)), ll.SET_ATTR_MODE, NO_FI) == ("err", errno.ENOENT)


def test_an_object_of_another_kind_at_the_name_is_not_the_inode(ad):
    """Changed behind the adapter's back: answering with the new object would make the kernel take its
    inode for a bad one."""
    put(ad.lower, "f")
    ad.start()
    f = ad.node("f")
    ad.union.unlink("/f")
    ad.union.mkdir("/f", 0o755)
    assert ad.getattr(f, NO_FI) == ("err", errno.ENOENT)
    ad.union.rmdir("/f")
    ad.union.mknod("/f", stat.S_IFREG | 0o644)  # the same kind, another number: a copy-up does that too
    kind, attrs, _ = ad.getattr(f, NO_FI)
    assert kind == "attr" and attrs == entry_attr(engine_attrs(ad, "/f"))


def set_attrs(ad, node_id, to_set, fh=None, **fields):
    st = ll.Stat()
    for key, value in fields.items():
        if key in ("atime", "mtime"):
            ts = getattr(st, f"st_{key}spec")
            ts.tv_sec, ts.tv_nsec = divmod(value, 10**9)
        else:
            setattr(st, key, value)
    return ad.setattr(node_id, ctypes.pointer(st), to_set, NO_FI if fh is None else fi(fh=fh))


T1, T2 = 1_111_111_111_222_333_444, 1_222_222_222_555_666_777


def test_setattr_sets_what_to_set_says_and_answers_the_new_attributes(ad):
    put(ad.lower, "f", b"0123456789", mode=0o644)
    ad.start()
    f = ad.node("f")
    up = ad.upper / "f"
    kind, attrs, timeout = set_attrs(ad, f, ll.SET_ATTR_MODE, st_mode=stat.S_IFREG | 0o600, st_uid=7, st_size=1)
    assert (kind, timeout) == ("attr", ATTR_TIMEOUT)
    assert attrs == entry_attr(engine_attrs(ad, "/f"))
    assert stat.S_IMODE(up.stat().st_mode) == 0o600 and up.stat().st_uid == 0 and up.stat().st_size == 10
    set_attrs(ad, f, ll.SET_ATTR_UID, st_uid=7, st_gid=8)
    assert (up.stat().st_uid, up.stat().st_gid) == (7, 0)
    set_attrs(ad, f, ll.SET_ATTR_GID, st_uid=9, st_gid=8)
    assert (up.stat().st_uid, up.stat().st_gid) == (7, 8)
    kind, attrs, _ = set_attrs(ad, f, ll.SET_ATTR_UID | ll.SET_ATTR_GID, st_uid=5, st_gid=6)
    assert (up.stat().st_uid, up.stat().st_gid) == (5, 6) == (attrs["st_uid"], attrs["st_gid"])
    kind, attrs, _ = set_attrs(ad, f, ll.SET_ATTR_SIZE, st_size=4)
    assert up.read_bytes() == b"0123" and attrs["st_size"] == 4
    set_attrs(ad, f, ll.SET_ATTR_ATIME | ll.SET_ATTR_MTIME, atime=T1, mtime=T2)
    assert (up.stat().st_atime_ns, up.stat().st_mtime_ns) == (T1, T2)
    set_attrs(ad, f, ll.SET_ATTR_ATIME, atime=T2, mtime=T1)
    assert (up.stat().st_atime_ns, up.stat().st_mtime_ns) == (T2, T2)  # mtime left alone
    set_attrs(ad, f, ll.SET_ATTR_MTIME, atime=T1, mtime=T1)
    assert (up.stat().st_atime_ns, up.stat().st_mtime_ns) == (T2, T1)
    start = time.time_ns()
    set_attrs(ad, f, ll.SET_ATTR_ATIME | ll.SET_ATTR_ATIME_NOW | ll.SET_ATTR_MTIME, atime=T1, mtime=T2)
    assert up.stat().st_atime_ns >= start - 10**7 and up.stat().st_mtime_ns == T2
    set_attrs(ad, f, ll.SET_ATTR_ATIME | ll.SET_ATTR_MTIME | ll.SET_ATTR_MTIME_NOW, atime=T1, mtime=T2)
    assert up.stat().st_atime_ns == T1 and up.stat().st_mtime_ns >= start - 10**7
    set_attrs(ad, f, ll.SET_ATTR_ATIME | ll.SET_ATTR_MTIME, atime=T1, mtime=T1)
    kind, attrs, _ = set_attrs(ad, f, ll.SET_ATTR_ATIME | ll.SET_ATTR_MTIME | ll.SET_ATTR_ATIME_NOW
                             | ll.SET_ATTR_MTIME_NOW, atime=T2, mtime=T2)
    assert attrs["st_atime"] >= start - 10**7 and attrs["st_mtime"] >= start - 10**7
    assert attrs["st_atime"] == up.stat().st_atime_ns
    kind, attrs, _ = set_attrs(ad, f, 0, st_mode=0o777, st_size=0, atime=T1, mtime=T1)
    assert attrs == entry_attr(engine_attrs(ad, "/f")) and up.read_bytes() == b"0123"


def test_setattr_through_a_handle(ad):
    put(ad.lower, "f", b"0123456789", mode=0o644)
    ad.start()
    f = ad.node("f")
    fh = ad.open_fh(f, os.O_RDWR)
    ad.unlink(ROOT, b"f")  # only the handle leads to it now
    kind, attrs, _ = set_attrs(ad, f, ll.SET_ATTR_SIZE | ll.SET_ATTR_MODE | ll.SET_ATTR_UID | ll.SET_ATTR_GID,
                             fh=fh, st_size=3, st_mode=0o600, st_uid=3, st_gid=4)
    handle = ad.ops.handles[fh].handle
    st = os.fstat(handle.fd)
    assert (st.st_size, stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (3, 0o600, 3, 4)
    assert (attrs["st_size"], attrs["st_uid"], attrs["st_gid"]) == (3, 3, 4)
    set_attrs(ad, f, ll.SET_ATTR_ATIME | ll.SET_ATTR_MTIME, fh=fh, atime=T1, mtime=T2)
    st = os.fstat(handle.fd)
    assert (st.st_atime_ns, st.st_mtime_ns) == (T1, T2)
    kind, attrs, _ = set_attrs(ad, f, ll.SET_ATTR_SIZE | ll.SET_ATTR_MODE, st_size=1, st_mode=0o640)  # borrowed
    st = os.fstat(handle.fd)
    assert (st.st_size, stat.S_IMODE(st.st_mode)) == (1, 0o640) == (attrs["st_size"], stat.S_IMODE(attrs["st_mode"]))


def test_a_truncate_by_name_of_a_file_open_elsewhere(ad):
    put(ad.lower, "f", b"0123456789")
    ad.start()
    f = ad.node("f")
    fh = ad.open_fh(f, os.O_RDWR)
    set_attrs(ad, f, ll.SET_ATTR_SIZE, fh=fh, st_size=2)
    assert (ad.upper / "f").read_bytes() == b"01"
    set_attrs(ad, f, ll.SET_ATTR_SIZE, st_size=1)
    assert (ad.upper / "f").read_bytes() == b"0"


# ---------------------------------------------------------------------------------------------
# making and removing names

def test_mkdir_mknod_symlink_answer_as_a_lookup_with_the_callers_owner_and_umask(ad):
    ops = ad.start()
    ad.fuse.ctx = ll.Ctx(uid=1234, gid=5678, pid=1, umask=0o027)
    kind, d = ad.mkdir(ROOT, b"d", 0o777)
    assert kind == "entry" and d["ino"] == 2
    assert d["attr"] == entry_attr(engine_attrs(ad, "/d"))
    st = (ad.upper / "d").stat()
    assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o750, 1234, 5678)
    kind, n = ad.mknod(2, b"fifo", stat.S_IFIFO | 0o666, 0)
    st = (ad.upper / "d/fifo").lstat()
    assert stat.S_ISFIFO(st.st_mode) and (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o640, 1234, 5678)
    assert n["ino"] == 3 and n["attr"] == entry_attr(engine_attrs(ad, "/d/fifo"))
    kind, s = ad.symlink(b"../target", 2, b"link")
    assert s["ino"] == 4 and s["attr"] == entry_attr(engine_attrs(ad, "/d/link"))
    assert (ad.upper / "d/link").lstat().st_uid == 1234
    assert os.readlink(ad.upper / "d/link") == "../target"
    assert ad.readlink(4) == ("readlink", b"../target")
    assert [ops.table.get(i).nlookup for i in (2, 3, 4)] == [1, 1, 1]
    assert ops.table.path(ops.table.get(4)) == "/d/link"


def test_a_hard_link_is_the_same_inode(ad):
    put(ad.lower, "f", b"x")
    ops = ad.start()
    f = ad.node("f")
    kind, e = ad.link(f, ROOT, b"g")
    assert kind == "entry" and e["ino"] == f
    assert e["attr"]["st_nlink"] == 2 and e["attr"] == entry_attr(engine_attrs(ad, "/g"))
    assert ops.table.get(f).nlookup == 2
    kind, e = ad.link(f, ROOT, b"h")
    assert e["ino"] == f and ops.table.get(f).nlookup == 3
    assert ad.link(f, ROOT, b"h") == ("err", errno.EEXIST)
    ad.unlink(ROOT, b"f")
    ad.unlink(ROOT, b"g")
    ad.unlink(ROOT, b"h")
    assert ad.link(f, ROOT, b"again") == ("err", errno.ENOENT)  # no name left to link from


def test_a_link_to_a_name_that_is_now_another_object_is_a_new_inode(ad, monkeypatch):
    put(ad.lower, "f", b"x")
    put(ad.lower, "other", b"y")
    ops = ad.start()
    f = ad.node("f")
    real = ad.union.link
    monkeypatch.setattr(ad.union, "link", lambda old, new: real("/other", new))
    kind, e = ad.link(f, ROOT, b"g")
    assert e["ino"] not in (f, ROOT) and e["attr"]["st_ino"] == engine_attrs(ad, "/other")["st_ino"]
    assert ops.table.get(f).nlookup == 1


def test_a_change_the_kernel_sees_drops_no_listing_but_a_failed_one_does(ad):
    put(ad.lower, "d/x")
    ad.start()
    d = ad.node("d")
    ad.fuse.invalidated()
    assert ad.mkdir(d, b"new", 0o755)[0] == "entry"
    # the parent was copied up on the way: its attributes (st_nlink of a merged directory) and its
    # parent's listing (another number for it) go; its own listing the kernel drops itself
    assert ad.fuse.invalidated() == [("inode", SESSION, d, -1, 0), ("inode", SESSION, ROOT, 0, 0)]
    assert ad.mkdir(d, b"new", 0o755) == ("err", errno.EEXIST)
    assert ad.fuse.invalidated() == [("inode", SESSION, d, 0, 0)]  # the kernel keeps its listing on failure
    assert ad.unlink(d, b"nothing") == ("err", errno.ENOENT)
    assert ad.fuse.invalidated() == [("inode", SESSION, d, 0, 0)]
    assert ad.unlink(d, b"new") == ("err", errno.EISDIR)
    assert ad.fuse.invalidated() == [("inode", SESSION, d, 0, 0)]
    assert ad.rmdir(d, b"new") == ("err", 0)
    assert ad.fuse.invalidated() == []


def test_a_change_whose_answer_was_lost_drops_the_listing(ad):
    ops = ad.start()
    ad.fuse.result = -errno.ENOENT
    kind, e = ad.mkdir(ROOT, b"d", 0o755)
    assert kind == "entry" and (ad.upper / "d").is_dir()
    assert ad.fuse.invalidated() == [("inode", SESSION, ROOT, 0, 0)]
    assert len(ops.table) == 1  # and the lookup is not counted


def test_unlink_and_rmdir_let_the_name_go(ad):
    put(ad.lower, "d/f")
    put(ad.lower, "e/g")
    ops = ad.start()
    f, e = ad.node("d/f"), ad.node("e")
    assert ad.unlink(ops.table.get(f).parent.id, b"f") == ("err", 0)
    assert ops.table.get(f).parent is None  # the kernel still holds it: no name
    assert (ad.upper / "d/f").is_char_device()  # a whiteout hides the lower file
    assert ad.rmdir(ROOT, b"e") == ("err", errno.ENOTEMPTY)
    ad.unlink(e, b"g")
    assert ad.rmdir(ROOT, b"e") == ("err", 0)
    assert ops.table.at_path("/e") is None
    assert ad.lookup(ROOT, b"e")[1]["ino"] == 0


def test_rename_moves_the_name_in_the_table(ad):
    put(ad.lower, "d/f", b"f")
    put(ad.lower, "e/g", b"g")
    ops = ad.start()
    d, e, f, g = ad.node("d"), ad.node("e"), ad.node("d/f"), ad.node("e/g")
    ad.fuse.invalidated()
    assert ad.rename(d, b"f", e, b"h", 0) == ("err", 0)
    assert ops.table.path(ops.table.get(f)) == "/e/h"
    assert (ad.upper / "e/h").read_bytes() == b"f"
    # copied up on the way (both parents and the file), and the moved name may be another object now
    assert ad.fuse.invalidated() == [("inode", SESSION, i, -1, 0) for i in (d, e, f)] + [
        ("inode", SESSION, i, 0, 0) for i in (ROOT, d, e)]
    assert ad.rename(e, b"h", e, b"g", RENAME_EXCHANGE) == ("err", 0)
    assert ops.table.path(ops.table.get(f)) == "/e/g" and ops.table.path(ops.table.get(g)) == "/e/h"
    assert ad.rename(e, b"nothing", d, b"x", 0) == ("err", errno.ENOENT)


def test_a_directory_moved_to_another_parent_has_its_listing_dropped(ad):
    ad.start()
    a, b = ad.mkdir(ROOT, b"a", 0o755)[1]["ino"], ad.mkdir(ROOT, b"b", 0o755)[1]["ino"]
    sub, other = ad.mkdir(a, b"sub", 0o755)[1]["ino"], ad.mkdir(b, b"other", 0o755)[1]["ino"]
    y = ad.mknod(b, b"y", stat.S_IFREG | 0o644, 0)[1]["ino"]
    ad.fuse.invalidated()

    def notices(attrs_of, relisted):
        return [("inode", SESSION, attrs_of, -1, 0)] + [("inode", SESSION, i, 0, 0) for i in relisted]
    assert ad.rename(a, b"sub", b, b"sub", 0) == ("err", 0)
    # its ".." is another directory now; and the new name's parent's listing, as after any rename
    assert ad.fuse.invalidated() == notices(sub, [sub, b])
    assert ad.rename(b, b"sub", b, b"sub2", 0) == ("err", 0)  # the same parent: the same ".."
    assert ad.fuse.invalidated() == notices(sub, [b])
    assert ad.rename(b, b"y", a, b"y", 0) == ("err", 0)  # a file: no listing of its own
    assert ad.fuse.invalidated() == notices(y, [a])
    assert ad.rename(b, b"sub2", a, b"y", RENAME_EXCHANGE) == ("err", 0)  # the directory goes to a
    assert ad.fuse.invalidated() == notices(sub, [sub, a])
    assert ad.rename(a, b"y", b, b"other", RENAME_EXCHANGE) == ("err", 0)  # both directories move
    assert ad.fuse.invalidated() == notices(sub, [sub, other, b])


# ---------------------------------------------------------------------------------------------
# open files

def test_open_read_write_release(ad):
    put(ad.lower, "f", b"hello world")
    ops = ad.start()
    f = ad.node("f")
    kind, info = ad.open(f, fi(os.O_RDONLY))
    assert kind == "open" and info == {"fh": 1, "keep_cache": 1, "cache_readdir": 0}
    assert ops.handles[1].inode is ops.table.get(f) and ops.table.get(f).handles == {1}
    assert ad.read(f, 5, 6, fi(fh=1)) == ("data", b"world", ll.BUF_IS_FD | ll.BUF_FD_SEEK, 0)
    assert ad.read(f, 100, 0, fi(fh=1)) == ("data", b"hello world", ll.BUF_IS_FD | ll.BUF_FD_SEEK, 0)
    w = ad.open_fh(f, os.O_WRONLY)
    assert w == 2
    assert ad.write_buf(f, memory(b"WORLD"), 6, fi(fh=w)) == ("write", 5)
    assert (ad.upper / "f").read_bytes() == b"hello WORLD"
    assert ad.read(f, 100, 0, fi(fh=1)) == ("data", b"hello WORLD", ll.BUF_IS_FD | ll.BUF_FD_SEEK, 0)  # copied up
    fd = ops.handles[w].handle.fd
    assert ad.release(f, fi(fh=w)) == ("err", 0)
    assert w not in ops.handles and ops.table.get(f).handles == {1}
    with pytest.raises(OSError) as e:
        os.fstat(fd)
    assert e.value.errno == errno.EBADF  # closed
    assert ad.read(f, 1, 0, fi(fh=w)) == ("err", errno.EBADF)
    assert ad.write_buf(f, memory(b"x"), 0, fi(fh=w)) == ("err", errno.EBADF)
    assert ad.release(f, fi(fh=w)) == ("err", 0)  # twice: nothing left to do
    ad.release(f, fi(fh=1))
    assert ops.handles == {} and not ops.table.get(f).handles


def test_a_write_that_drops_set_id_bits_tells_the_kernel(ad):
    put(ad.lower, "f", b"x", mode=0o6755)
    ad.start()
    f = ad.node("f")
    fh = ad.open_fh(f, os.O_WRONLY)
    ad.fuse.invalidated()
    ad.fuse.ctx = ll.Ctx(uid=1000, gid=1000, pid=1, umask=0o022)
    assert ad.write_buf(f, memory(b""), 0, fi(fh=fh)) == ("write", 0)
    assert stat.S_IMODE((ad.upper / "f").stat().st_mode) == 0o6755  # nothing written: nothing dropped
    assert ad.fuse.invalidated() == []
    assert ad.write_buf(f, memory(b"y"), 0, fi(fh=fh)) == ("write", 1)
    assert stat.S_IMODE((ad.upper / "f").stat().st_mode) == 0o755
    assert ad.fuse.invalidated() == [("inode", SESSION, f, -1, 0)]
    assert ad.write_buf(f, memory(b"y"), 0, fi(fh=fh)) == ("write", 1)
    assert ad.fuse.invalidated() == []  # nothing left to drop


def test_a_failed_write_is_its_errno(ad):
    put(ad.lower, "f", b"x")
    ad.start()
    f = ad.node("f")
    fh = ad.open_fh(f, os.O_RDONLY)  # not open for writing: the descriptor refuses
    assert ad.write_buf(f, memory(b"y"), 0, fi(fh=fh)) == ("err", errno.EBADF)


def test_an_open_the_kernel_never_heard_of_is_closed_again(ad):
    put(ad.lower, "f", b"x")
    ops = ad.start()
    f = ad.node("f")
    ad.fuse.result = -errno.ENOENT
    kind, info = ad.open(f, fi(os.O_RDONLY))
    assert kind == "open" and info["fh"] == 1
    assert ops.handles == {} and not ops.table.get(f).handles


def test_open_of_a_name_that_is_another_kind_now(ad):
    put(ad.lower, "f", b"x")
    ops = ad.start()
    f = ad.node("f")
    ad.union.unlink("/f")
    ad.union.mkdir("/f", 0o755)
    assert ad.open(f, fi(os.O_RDONLY)) == ("err", errno.ENOENT)
    assert ops.handles == {}
    assert ad.open(ROOT, fi(os.O_WRONLY)) == ("err", errno.EISDIR)


def test_opening_data_reached_for_the_first_time_drops_the_attributes(ad, monkeypatch):
    put(ad.lower, "f", b"x")
    ops = ad.start()
    f = ad.node("f")
    real = ad.union.open

    def reached(*args):
        handle = real(*args)
        handle.attrs_changed = True
        return handle
    monkeypatch.setattr(ad.union, "open", reached)
    ad.fuse.invalidated()
    ad.open(f, fi(os.O_RDONLY))
    assert ad.fuse.invalidated() == [("inode", SESSION, f, -1, 0)]
    assert len(ops.handles) == 1


def test_create_answers_the_entry_and_the_handle(ad):
    ops = ad.start()
    ad.fuse.ctx = ll.Ctx(uid=1234, gid=5678, pid=1, umask=0o077)
    kind, e, info = ad.create(ROOT, b"new", stat.S_IFREG | 0o666, fi(os.O_WRONLY | os.O_CREAT))
    assert kind == "create"
    assert e["ino"] == 2 and e["attr"] == entry_attr(engine_attrs(ad, "/new"))
    assert (e["attr_timeout"], e["entry_timeout"]) == (ATTR_TIMEOUT, ENTRY_TIMEOUT)
    assert info == {"fh": 1, "keep_cache": 1, "cache_readdir": 0}
    st = (ad.upper / "new").stat()
    assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o600, 1234, 5678)
    assert ops.handles[1].inode is ops.table.get(2) and ops.table.get(2).nlookup == 1
    assert ad.create(ROOT, b"new", stat.S_IFREG | 0o666, fi(os.O_WRONLY | os.O_CREAT | os.O_EXCL)) == (
        "err", errno.EEXIST)


def test_a_create_the_kernel_never_heard_of_is_undone_in_the_table(ad):
    ops = ad.start()
    ad.fuse.result = -errno.ENOENT
    kind, e, info = ad.create(ROOT, b"new", stat.S_IFREG | 0o644, fi(os.O_WRONLY | os.O_CREAT))
    assert ops.handles == {} and len(ops.table) == 1
    assert ad.fuse.invalidated() == [("inode", SESSION, ROOT, 0, 0)]


def test_a_create_whose_attributes_cannot_be_read_closes_its_handle(ad, monkeypatch):
    ops = ad.start()
    released = []
    real = ad.union.release
    monkeypatch.setattr(ad.union, "getattr", lambda path: (_ for _ in ()).throw(OSError(errno.EIO, "no")))
    monkeypatch.setattr(ad.union, "release", lambda handle: (released.append(handle), real(handle)))
    assert ad.create(ROOT, b"new", stat.S_IFREG | 0o644, fi(os.O_WRONLY | os.O_CREAT)) == ("err", errno.EIO)
    assert len(released) == 1 and ops.handles == {}


def test_fallocate_and_fsync(ad):
    put(ad.lower, "f", b"x", mode=0o6755)
    ad.start()
    f = ad.node("f")
    fh = ad.open_fh(f, os.O_RDWR)
    ad.fuse.invalidated()
    assert ad.fallocate(f, 0, 0, 4096, fi(fh=fh)) == ("err", 0)
    assert (ad.upper / "f").stat().st_size == 4096
    assert ad.fuse.invalidated() == []  # root keeps the set-id bits
    ad.fuse.ctx = ll.Ctx(uid=1000, gid=1000, pid=1, umask=0o022)
    assert ad.fallocate(f, 0, 0, 8192, fi(fh=fh)) == ("err", 0)
    assert stat.S_IMODE((ad.upper / "f").stat().st_mode) == 0o755
    assert ad.fuse.invalidated() == [("inode", SESSION, f, -1, 0)]
    assert ad.fallocate(f, 0, 0, 1, fi(fh=99)) == ("err", errno.EBADF)
    assert ad.fsync(f, 0, fi(fh=fh)) == ("err", 0)
    assert ad.fsync(f, 1, fi(fh=fh)) == ("err", 0)
    assert ad.fsync(f, 1, fi(fh=99)) == ("err", errno.EBADF)
    assert ad.fsyncdir(ROOT, 0, fi()) == ("err", 0)


def test_fsync_passes_datasync_on(ad, monkeypatch):
    put(ad.lower, "f", b"x")
    ad.start()
    f = ad.node("f")
    fh = ad.open_fh(f, os.O_RDWR)
    asked = []
    monkeypatch.setattr(ad.union, "fsync", lambda handle, datasync: asked.append(datasync))
    ad.fsync(f, 0, fi(fh=fh))
    ad.fsync(f, 7, fi(fh=fh))
    assert asked == [False, True]


def test_a_handle_borrowed_while_released_is_closed_by_the_borrower(ad, monkeypatch):
    put(ad.lower, "f", b"x")
    ops = ad.start()
    f = ad.node("f")
    fh = ad.open_fh(f, os.O_RDWR)
    ad.unlink(ROOT, b"f")
    inode = ops.table.get(f)
    fd = ops.handles[fh].handle.fd
    real = ad.union.fgetattr

    def release_meanwhile(handle, path):
        ops._drop(fh)  # the kernel closes it while getattr borrows it
        os.fstat(fd)  # still open
        return real(handle, path)
    monkeypatch.setattr(ad.union, "fgetattr", release_meanwhile)
    kind, attrs, _ = ad.getattr(f, NO_FI)
    assert kind == "attr" and attrs["st_size"] == 1
    with pytest.raises(OSError):
        os.fstat(fd)
    assert fh not in ops.handles and not inode.handles


# ---------------------------------------------------------------------------------------------
# directories

DT_DIR, DT_REG, DT_LNK = stat.S_IFDIR >> 12, stat.S_IFREG >> 12, stat.S_IFLNK >> 12


def test_opendir_answers_enosys_once_the_kernel_can_do_without(ad):
    ops = ad.start()
    kind, info = ad.opendir(ROOT, fi(fh=5))
    assert kind == "open" and info == {"fh": 0, "keep_cache": 1, "cache_readdir": 1}
    assert ad.opendir(42, fi()) == ("err", errno.ESTALE)
    ops.opendir_needed = False
    assert ad.opendir(ROOT, fi()) == ("err", errno.ENOSYS)


def test_readdir_lists_dot_dotdot_and_the_merged_names_with_their_numbers_and_types(ad):
    put(ad.lower, "d/f", b"x")
    os.symlink("f", ad.lower / "d/l")
    (ad.lower / "d/sub").mkdir()
    ad.start()
    d = ad.node("d")
    kind, data, size = ad.readdir(d, 4096, 0, fi())
    assert kind == "buf" and size == len(data)
    entries = dirents(data)
    listing = ad.union.readdir("/d")
    assert [(name, ino, kind) for name, ino, kind, _ in entries] == [
        (name, ino, mode >> 12) for name, ino, mode in listing]
    assert [(name, kind) for name, _, kind, _ in entries[:2]] == [(".", DT_DIR), ("..", DT_DIR)]
    assert sorted((name, kind) for name, _, kind, _ in entries[2:]) == [("f", DT_REG), ("l", DT_LNK), ("sub", DT_DIR)]
    assert entries[0][1] == engine_attrs(ad, "/d")["st_ino"] and entries[1][1] == engine_attrs(ad, "/")["st_ino"]
    listing_id = entries[0][3] >> 32
    assert listing_id > 0
    assert [off for *_, off in entries] == [listing_id << 32 | i for i in range(1, 6)]
    assert ad.readdir(d, 4096, entries[-1][3], fi()) == ("buf", b"", 0)  # the end


def test_readdir_goes_on_from_an_offset_and_stops_where_the_buffer_is_full(ad):
    for i in range(10):
        put(ad.lower, f"d/file{i}")
    ad.start()
    d = ad.node("d")
    whole = dirents(ad.readdir(d, 4096, 0, fi())[1])
    assert len(whole) == 12
    got, offset = [], 0
    while True:
        kind, data, size = ad.readdir(d, 100, offset, fi())  # room for 2 or 3 entries
        assert size <= 100
        if not size:
            break
        page = dirents(data)
        got += page
        offset = page[-1][3]
    assert got == whole
    kind, data, size = ad.readdir(d, 32, 0, fi())  # exactly one "." (24 + 1, padded to 32)
    assert [e[0] for e in dirents(data)] == ["."] and size == 32
    assert ad.readdir(d, 31, 0, fi()) == ("buf", b"", 0)
    assert ad.readdir(99, 4096, 0, fi()) == ("err", errno.ESTALE)


def test_a_reader_goes_on_through_the_listing_it_started_with(ad):
    put(ad.lower, "d/a")
    put(ad.lower, "d/b")
    put(ad.lower, "e/x")
    ops = ad.start()
    d, e = ad.node("d"), ad.node("e")
    first = dirents(ad.readdir(d, 4096, 0, fi())[1])
    middle = first[1][3]  # after ".."
    assert ad.mknod(d, b"c", stat.S_IFREG | 0o644, 0)[0] == "entry"
    rest = dirents(ad.readdir(d, 4096, middle, fi())[1])
    assert sorted(x[0] for x in rest) == ["a", "b"]
    assert [x[3] >> 32 for x in rest] == [middle >> 32] * 2
    fresh = dirents(ad.readdir(d, 4096, 0, fi())[1])
    assert sorted(x[0] for x in fresh[2:]) == ["a", "b", "c"] and fresh[0][3] >> 32 != middle >> 32
    new_id = fresh[0][3] >> 32
    # an offset into another directory's listing, or one no longer kept, reads the current one
    other = dirents(ad.readdir(e, 4096, 0, fi())[1])
    assert [x[0] for x in dirents(ad.readdir(d, 4096, other[1][3], fi())[1])] == [x[0] for x in fresh[2:]]
    assert [x[0] for x in dirents(ad.readdir(e, 4096, middle, fi())[1])] == ["x"]
    unknown = (0x7FFFFFF0 << 32) | 2
    assert [x[3] >> 32 for x in dirents(ad.readdir(d, 4096, unknown, fi())[1])] == [new_id] * 3
    assert len(ops._replaced) == 1


def test_readdirplus_sends_entries_with_attributes_and_counts_their_lookups(ad):
    put(ad.lower, "d/f", b"abc")
    (ad.lower / "d/sub").mkdir()
    ops = ad.start()
    d = ad.node("d")
    kind, data, size = ad.readdirplus(d, 4096, 0, fi())
    entries = {e[0]: e for e in direntplus(data)}
    assert list(entries)[:2] == [".", ".."]
    for name in (".", ".."):
        _, node_id, generation, entry_t, attr_t, attr, ino, kind, _ = entries[name]
        assert (node_id, entry_t, attr_t, kind) == (0, 0, 0, DT_DIR)  # the kernel looks those up itself
        assert attr["st_ino"] == ino and attr["st_mode"] == stat.S_IFDIR
    for name in ("f", "sub"):
        _, node_id, generation, entry_t, attr_t, attr, ino, kind, _ = entries[name]
        inode = ops.table.get(node_id)
        assert ops.table.path(inode) == f"/d/{name}" and inode.nlookup == 1 and generation == 0
        assert (entry_t, attr_t) == (ENTRY_TIMEOUT, ATTR_TIMEOUT)
        want = engine_attrs(ad, f"/d/{name}")
        assert attr == {k: want[k] for k in attr} and ino == want["st_ino"]
    # again at once: the kernel still holds those, they go out bare (and count no lookup)
    again = direntplus(ad.readdirplus(d, 4096, 0, fi())[1])
    assert [(e[0], e[1]) for e in again] == [(e[0], 0) for e in entries.values()]
    assert ops.table.get(entries["f"][1]).nlookup == 1
    # a reader going on from an offset into the listing that went out with attributes gets them
    half = direntplus(ad.readdirplus(d, 4096, again[1][8], fi())[1])
    assert [e[1] for e in half] == [entries[e[0]][1] for e in half]
    assert ops.table.get(entries["f"][1]).nlookup == 2


def test_readdirplus_after_the_resend_window_sends_attributes_again(ad, monkeypatch):
    put(ad.lower, "d/f")
    ops = ad.start()
    d = ad.node("d")
    clock = [1000.0]
    monkeypatch.setattr(operations.time, "monotonic", lambda: clock[0])
    first = direntplus(ad.readdirplus(d, 4096, 0, fi())[1])
    assert first[2][1] != 0
    clock[0] = 1000.0 + operations.PLUS_RESEND - 0.001
    assert direntplus(ad.readdirplus(d, 4096, 0, fi())[1])[2][1] == 0
    clock[0] = 1000.0 + operations.PLUS_RESEND  # exactly that long after: again
    again = direntplus(ad.readdirplus(d, 4096, 0, fi())[1])
    assert again[2][1] == first[2][1] and ops.table.get(first[2][1]).nlookup == 2
    # a reader that started with attributes goes on with them
    clock[0] += operations.PLUS_RESEND
    start = direntplus(ad.readdirplus(d, 48 + 152, 0, fi())[1])  # room for "." only
    assert [e[0] for e in start] == ["."]
    rest = direntplus(ad.readdirplus(d, 4096, start[0][8], fi())[1])
    assert [e[0] for e in rest] == ["..", "f"] and rest[1][1] == first[2][1]
    assert ops.table.get(first[2][1]).nlookup == 3


def test_an_entry_that_did_not_fit_is_no_lookup(ad):
    put(ad.lower, "d/f")
    ops = ad.start()
    d = ad.node("d")
    data = ad.readdirplus(d, 2 * 160, 0, fi())[1]  # "." and "..": the third does not fit
    assert [e[0] for e in direntplus(data)] == [".", ".."]
    assert ops.table.at_path("/d/f") is None
    rest = direntplus(ad.readdirplus(d, 4096, direntplus(data)[1][8], fi())[1])
    assert [e[0] for e in rest] == ["f"]  # with its attributes, as the reader started
    assert ops.table.get(rest[0][1]).nlookup == 1  # this one lookup: the first did not go out


def test_readdirplus_skips_a_name_gone_since_the_listing_and_sends_a_bare_entry_that_fails(ad, monkeypatch):
    put(ad.lower, "d/gone")
    put(ad.lower, "d/bad")
    put(ad.lower, "d/good")
    ad.start()
    d = ad.node("d")
    real = ad.union.getattr

    def getattr_(path):
        if path == "/d/gone":
            raise FileNotFoundError(errno.ENOENT, "gone")
        if path == "/d/bad":
            raise OSError(errno.EIO, "bad")
        return real(path)
    ad.union.readdir("/d")
    monkeypatch.setattr(ad.union, "getattr", getattr_)
    entries = {e[0]: e for e in direntplus(ad.readdirplus(d, 4096, 0, fi())[1])}
    assert sorted(entries) == [".", "..", "bad", "good"]
    assert entries["bad"][1] == 0 and entries["bad"][7] == DT_REG  # name, number and type only
    assert entries["good"][1] != 0


def test_readdirplus_of_the_root(ad):
    put(ad.lower, "f")
    ops = ad.start()
    entries = direntplus(ad.readdirplus(ROOT, 4096, 0, fi())[1])
    assert [e[0] for e in entries] == [".", "..", "f"]
    assert ops.table.path(ops.table.get(entries[2][1])) == "/f"


# ---------------------------------------------------------------------------------------------
# the filesystem's attributes, access, xattrs, ioctls

def test_statfs_is_the_uppers(ad, monkeypatch):
    ad.start()
    kind, sv = ad.statfs(ROOT)
    assert kind == "statfs"
    real = os.statvfs(ad.upper)
    for key in ("f_bsize", "f_frsize", "f_blocks", "f_files", "f_flag", "f_namemax"):
        assert sv[key] == getattr(real, key), key
    given = dict(ad.union.statfs())  # every field passed on as the engine gives it (the free counts move)
    monkeypatch.setattr(ad.union, "statfs", lambda *args, **kwargs: dict(given))
    assert ad.statfs(ROOT) == ("statfs", given | {"f_type": 0})


def test_access(ad):
    put(ad.lower, "f")
    ad.start()
    f = ad.node("f")
    assert ad.access(f, os.R_OK | os.W_OK) == ("err", 0)
    ad.union.unlink("/f")
    assert ad.access(f, os.F_OK) == ("err", errno.ENOENT)


def test_access_on_a_read_only_mount(ad):
    put(ad.lower, "f")
    ad.start(read_only=True)
    f = ad.node("f")
    assert ad.access(f, os.W_OK) == ("err", errno.EROFS)
    assert ad.access(f, os.R_OK) == ("err", 0)


def test_xattrs_and_their_size_probes(ad):
    put(ad.lower, "f")
    ops = ad.start()
    f = ad.node("f")
    value = ctypes.create_string_buffer(b"value\0with nul", 14)
    assert ad.setxattr(f, b"user.a", value, 14, 0) == ("err", 0)
    assert os.getxattr(ad.upper / "f", "user.a") == b"value\0with nul"
    assert ad.setxattr(f, b"user.a", value, 3, os.XATTR_CREATE) == ("err", errno.EEXIST)
    assert ad.setxattr(f, b"user.a", value, 5, os.XATTR_REPLACE) == ("err", 0)
    assert ad.getxattr(f, b"user.a", 0) == ("xattr", 5)  # the size, when asked for it
    assert ad.getxattr(f, b"user.a", 4) == ("err", errno.ERANGE)
    assert ad.getxattr(f, b"user.a", 5) == ("buf", b"value", 5)
    assert ad.getxattr(f, b"user.a", 100) == ("buf", b"value", 5)
    assert ad.getxattr(f, b"user.none", 100) == ("err", errno.ENODATA)
    ad.setxattr(f, b"user.bb", value, 0, 0)
    assert ad.getxattr(f, b"user.bb", 0) == ("xattr", 0)
    names = b"user.a\0user.bb\0"
    assert ad.listxattr(f, 0) == ("xattr", len(names))
    assert ad.listxattr(f, len(names) - 1) == ("err", errno.ERANGE)
    kind, listed, size = ad.listxattr(f, len(names))
    assert kind == "buf" and sorted(listed.split(b"\0")) == sorted(names.split(b"\0")) and size == len(names)
    assert ad.removexattr(f, b"user.a") == ("err", 0)
    assert ad.removexattr(f, b"user.a") == ("err", errno.ENODATA)
    assert ad.listxattr(f, 100) == ("buf", b"user.bb\0", 8)
    ad.unlink(ROOT, b"f")
    assert ad.getxattr(f, b"user.bb", 100) == ("err", errno.ENOENT)
    assert ops.table.get(f).nlookup == 1


def test_xattrs_of_an_unlinked_open_file_go_through_its_handle(ad):
    put(ad.lower, "f")
    ops = ad.start()
    f = ad.node("f")
    fh = ad.open_fh(f, os.O_RDWR)
    ad.unlink(ROOT, b"f")
    fd = ops.handles[fh].handle.fd
    value = ctypes.create_string_buffer(b"v", 1)
    assert ad.setxattr(f, b"user.x", value, 1, 0) == ("err", 0)
    assert os.getxattr(fd, "user.x") == b"v"
    assert ad.removexattr(f, b"user.x") == ("err", 0)
    assert "user.x" not in os.listxattr(fd)
    ad.release(f, fi(fh=fh))
    assert ad.setxattr(f, b"user.x", value, 1, 0) == ("err", errno.ENOENT)
    assert ad.removexattr(f, b"user.x") == ("err", errno.ENOENT)


def test_listxattr_hides_from_an_unprivileged_caller_what_it_may_not_see(ad):
    put(ad.lower, "f")
    ad.start()
    f = ad.node("f")
    os.setxattr(ad.lower / "f", "trusted.mine", b"x")
    assert b"trusted.mine\0" in ad.listxattr(f, 1000)[1]
    ad.fuse.ctx = ll.Ctx(uid=1000, gid=1000, pid=1, umask=0o022)
    assert b"trusted.mine" not in ad.listxattr(f, 1000)[1]


def test_ioctl_flags(ad):
    put(ad.lower, "f")
    ad.start()
    f = ad.node("f")
    ad.fuse.invalidated()
    real = fileattr.real_flags(str(ad.lower / "f"))
    for cmd in (fileattr.FS_IOC_GETFLAGS, fileattr.FS_IOC32_GETFLAGS):
        kind, result, data, size = ad.ioctl(f, cmd, None, fi(), 0, None, 0, 8)
        assert (kind, result, size) == ("ioctl", 0, 4) and len(data) == 4
        flags = struct.unpack("=I", data)[0]
        assert flags == ad.union.getflags("/f") == real
        assert ad.ioctl(f, cmd, None, fi(), 0, None, 0, 2) == ("ioctl", 0, data, 2)  # as much as asked for
    buf = ctypes.create_string_buffer(struct.pack("=I", real | fileattr.FS_NOATIME_FL), 4)
    assert ad.ioctl(f, fileattr.FS_IOC_SETFLAGS, None, fi(), 0, buf, 4, 0) == ("ioctl", 0, None, 0)
    assert ad.union.getflags("/f") & fileattr.FS_NOATIME_FL
    # its ctime changed (then, copied up on the way: its attributes again and its parent's listing)
    assert ad.fuse.invalidated() == [("inode", SESSION, f, -1, 0), ("inode", SESSION, f, -1, 0),
                                     ("inode", SESSION, ROOT, 0, 0)]
    buf = ctypes.create_string_buffer(struct.pack("=I", real), 4)
    assert ad.ioctl(f, fileattr.FS_IOC32_SETFLAGS, None, fi(), 0, buf, 4, 0) == ("ioctl", 0, None, 0)
    assert not ad.union.getflags("/f") & fileattr.FS_NOATIME_FL
    assert ad.fuse.invalidated() == [("inode", SESSION, f, -1, 0)]
    assert ad.ioctl(f, fileattr.FS_IOC_SETFLAGS, None, fi(), 0, buf, 3, 0) == ("err", errno.ENOTTY)
    assert ad.ioctl(f, 0x5401, None, fi(), 0, None, 0, 0) == ("err", errno.ENOTTY)  # TCGETS
    assert ad.fuse.invalidated() == []


def test_ioctl_fsxattr(ad):
    put(ad.lower, "f")
    ad.start()
    f = ad.node("f")
    kind, result, data, size = ad.ioctl(f, fileattr.FS_IOC_FSGETXATTR, None, fi(), 0, None, 0, 28)
    assert (kind, result, size) == ("ioctl", 0, 28) and data == ad.union.fsgetxattr("/f")
    assert ad.ioctl(f, fileattr.FS_IOC_FSGETXATTR, None, fi(), 0, None, 0, 10) == ("ioctl", 0, data, 10)
    xflags = fileattr.FSXATTR.unpack(data)[0]
    new = fileattr.FSXATTR.pack(xflags | 0x40, *fileattr.FSXATTR.unpack(data)[1:])  # FS_XFLAG_NOATIME
    buf = ctypes.create_string_buffer(new, len(new))
    ad.fuse.invalidated()
    assert ad.ioctl(f, fileattr.FS_IOC_FSSETXATTR, None, fi(), 0, buf, len(new), 0) == ("ioctl", 0, None, 0)
    assert fileattr.FSXATTR.unpack(ad.union.fsgetxattr("/f"))[0] & 0x40
    assert ad.fuse.invalidated() == [("inode", SESSION, f, -1, 0), ("inode", SESSION, f, -1, 0),
                                     ("inode", SESSION, ROOT, 0, 0)]
    assert ad.ioctl(f, fileattr.FS_IOC_FSSETXATTR, None, fi(), 0, buf, len(new) - 1, 0) == ("err", errno.ENOTTY)
    ad.union.unlink("/f")
    assert ad.ioctl(f, fileattr.FS_IOC_GETFLAGS, None, fi(), 0, None, 0, 4) == ("err", errno.ENOENT)


# ---------------------------------------------------------------------------------------------
# the mount's lifetime: init, destroy, the operations table, serve

ALL_CAPS = ll.CAP_POSIX_ACL | ll.CAP_DONT_MASK | ll.CAP_IOCTL_DIR | ll.CAP_NO_OPENDIR_SUPPORT


def init(ops, capable, want):
    conn = ll.ConnInfo(capable=capable, want=want)
    assert ops.init(None, ctypes.pointer(conn)) is None
    return conn.want


def test_init_asks_for_acls_the_umask_and_directory_ioctls_and_never_splice(ad):
    ops = ad.start()
    ready = []
    ops.on_ready = lambda: ready.append(True)
    splice = ll.CAP_SPLICE_READ | ll.CAP_SPLICE_WRITE | ll.CAP_SPLICE_MOVE
    everything = ALL_CAPS | splice | ll.CAP_READDIRPLUS
    assert init(ops, everything, splice | ll.CAP_READDIRPLUS) == (
        ll.CAP_POSIX_ACL | ll.CAP_DONT_MASK | ll.CAP_IOCTL_DIR | ll.CAP_READDIRPLUS)
    assert ops.opendir_needed is False and ready == [True] and ad.fuse.pinned == 1
    for cap in (ll.CAP_POSIX_ACL, ll.CAP_DONT_MASK, ll.CAP_IOCTL_DIR):
        assert init(ops, cap | splice, splice) == cap  # only what the kernel offers
    assert ops.opendir_needed is True
    assert init(ops, 0, 0) == 0
    assert ready == [True] * 5
    ops.on_ready = None
    assert init(ops, ll.CAP_NO_OPENDIR_SUPPORT, 0) == 0 and ops.opendir_needed is False


def test_destroy_releases_every_handle_and_the_workdir(ad):
    put(ad.lower, "f")
    ops = ad.start()
    f = ad.node("f")
    fds = [ops.handles[ad.open_fh(f)].handle.fd for _ in range(2)]
    with pytest.raises(StackError, match="already in use"):
        Union(check(Stack(lowers=[str(ad.lower)], upper=str(ad.upper), work=str(ad.work))))
    pinned = ad.fuse.pinned
    assert ops.destroy(None) is None
    assert ad.fuse.pinned == pinned + 1
    assert ops.handles == {}
    for fd in fds:
        with pytest.raises(OSError):
            os.fstat(fd)
    Union(check(Stack(lowers=[str(ad.lower)], upper=str(ad.upper), work=str(ad.work)))).close()  # free again


def test_the_groups_of_a_caller_are_read_only_when_asked_with_room_for_all(fuse):
    fuse.groups = list(range(100, 140))  # more than the first buffer holds
    fuse.current = 0x77
    groups = operations._Groups(0x77)
    assert fuse.groups_asked == []
    assert 139 in groups and 100 in groups and 99 not in groups and 140 not in groups
    assert fuse.groups_asked == [32, 40]
    fuse.groups = [5]
    fuse.current = 0x78
    groups = operations._Groups(0x78)
    assert 5 in groups and 6 not in groups
    assert fuse.groups_asked == [32, 40, 32]  # read once
    fuse.groups = list(range(32))
    fuse.current = 0x79
    assert 31 in operations._Groups(0x79) and fuse.groups_asked[-1] == 32
    fuse.req_getgroups = lambda req, size, buf: -errno.ENOSYS  # unknown: no supplementary groups
    ll.req_getgroups = fuse.req_getgroups
    assert 0 not in operations._Groups(0x79)


def test_a_write_keeps_the_set_group_id_bit_for_a_caller_in_the_files_group_by_its_supplementary_groups(ad):
    put(ad.lower, "f", b"x", mode=0o2644)
    os.chown(ad.lower / "f", 1000, 2000)
    ad.start()
    f = ad.node("f")
    fh = ad.open_fh(f, os.O_WRONLY)
    ad.fuse.ctx = ll.Ctx(uid=1000, gid=1000, pid=1, umask=0o022)
    ad.fuse.groups = [10, 2000]
    assert ad.write_buf(f, memory(b"y"), 0, fi(fh=fh)) == ("write", 1)
    assert stat.S_IMODE((ad.upper / "f").stat().st_mode) == 0o2644
    ad.fuse.groups = [10]
    assert ad.write_buf(f, memory(b"y"), 0, fi(fh=fh)) == ("write", 1)
    assert stat.S_IMODE((ad.upper / "f").stat().st_mode) == 0o644


def test_the_operations_table_points_at_the_methods_and_leaves_the_rest_to_libfuse(ad):
    put(ad.lower, "f")
    ops = ad.start()
    table = operations._ops_struct(ops)
    filled = []
    for name, kind in ll.OPS_FIELDS:
        value = getattr(table, name)
        if kind is not ctypes.c_void_p and hasattr(ops, name):
            assert value, name
            filled.append(name)
        else:
            assert not value, name
    assert {"lookup", "getattr", "readdirplus", "write_buf", "forget_multi", "init"} <= set(filled)
    assert {"flush", "write", "releasedir", "getlk", "poll"}.isdisjoint(filled)
    address = lambda f: ctypes.cast(f, ctypes.c_void_p).value  # noqa: E731
    assert [address(f) for f in table._kept] == [address(getattr(table, name)) for name in filled]
    table.lookup(0x99, ROOT, b"f")  # through libfuse's calling convention
    assert ad.fuse.replies[-1][:2] == (0x99, "entry") and ad.fuse.replies[-1][2]["ino"] == 2


class Session:
    """libfuse's session calls, recorded, for `serve`."""

    def __init__(self, monkeypatch, fuse, new=0x5E55, mount=0, lookup=None):
        self.calls = []
        self.argv = None
        self.lookup = lookup
        self.fuse = fuse
        self._new, self._mount = new, mount
        for name in ("session_new", "session_mount", "set_signal_handlers", "remove_signal_handlers",
                     "loop_cfg_create", "loop_cfg_set_max_threads", "loop_cfg_set_idle_threads", "session_loop_mt",
                     "loop_cfg_destroy", "session_unmount", "session_destroy"):
            monkeypatch.setattr(ll, name, getattr(self, name))
        self.signals = []
        monkeypatch.setattr(operations.signal, "signal", lambda sig, handler: self.signals.append((sig, handler)))

    def session_new(self, args, table, size, userdata):
        args = args._obj
        self.argv = [args.argv[i] for i in range(args.argc)]
        assert args.argv[args.argc] is None and size == ctypes.sizeof(ll.LowlevelOps)
        self.table = table._obj
        self.calls.append("new")
        return self._new

    def session_mount(self, session, mountpoint):
        self.calls.append(("mount", session, mountpoint))
        return self._mount

    def set_signal_handlers(self, session):
        self.calls.append(("signals", session))
        return 0

    def remove_signal_handlers(self, session):
        self.calls.append(("unsignals", session))

    def loop_cfg_create(self):
        self.calls.append("cfg")
        return 0xCF6

    def loop_cfg_set_max_threads(self, config, n):
        self.calls.append(("max", config, n))

    def loop_cfg_set_idle_threads(self, config, n):
        self.calls.append(("idle", config, n))

    def session_loop_mt(self, session, config):
        self.calls.append(("loop", session, config))
        # requests come through the table, to an adapter that knows its session by now
        assert self.table.init and self.table.lookup and self.table.setattr and self.table.link
        self.table.init(None, ctypes.pointer(ll.ConnInfo()))
        if self.lookup is not None:
            self.fuse.current = 0x42
            self.table.lookup(0x42, ROOT, self.lookup)
            self.fuse.current = 0x43
            self.table.setattr(0x43, 2, ctypes.pointer(ll.Stat(st_mode=0o600)), ll.SET_ATTR_MODE, None)
            self.fuse.current = 0x44
            self.table.lookup(0x44, ROOT, b"g")
            self.fuse.current = 0x45
            self.table.link(0x45, 3, ROOT, b"c")  # the lower link broken: "g" is dropped by the notifier
        return 0

    def loop_cfg_destroy(self, config):
        self.calls.append(("uncfg", config))

    def session_unmount(self, session):
        self.calls.append(("unmount", session))

    def session_destroy(self, session):
        self.calls.append(("destroy", session))


def test_serve_mounts_with_the_options_runs_the_loop_and_tears_down(ad, monkeypatch):
    put(ad.lower, "f")
    os.link(ad.lower / "f", ad.lower / "g")
    union = Union(check(Stack(lowers=[str(ad.lower)], upper=str(ad.upper), work=str(ad.work))))
    s = Session(monkeypatch, ad.fuse, lookup=b"f")
    ready = []
    operations.serve(union, "/mnt/x", fsname="a,b\\c", allow_other=True, mount_flags=("noatime", "rw"),
                     on_ready=lambda: ready.append(1))
    assert s.argv == [b"cowfs", b"-o", b"fsname=a\\,b\\\\c,subtype=cowfs,default_permissions,dev,suid,allow_other,"
                      b"noatime,rw"]
    assert s.calls == ["new", ("signals", SESSION), ("mount", SESSION, b"/mnt/x"), "cfg",
                       ("max", 0xCF6, operations.THREADS), ("idle", 0xCF6, operations.THREADS),
                       ("loop", SESSION, 0xCF6), ("uncfg", 0xCF6), ("unmount", SESSION), ("unsignals", SESSION),
                       ("destroy", SESSION)]
    assert ready == [1]
    assert [r[1] for r in ad.fuse.replies] == ["entry", "attr", "entry", "entry"]
    assert ad.fuse.notices[:2] == [("inode", SESSION, 2, -1, 0), ("inode", SESSION, ROOT, 0, 0)]  # the copy-up
    assert sorted(ad.fuse.notices[2:]) == [("entry", SESSION, ROOT, b"g"), ("inode", SESSION, ROOT, 0, 0)]
    assert stat.S_IMODE((ad.upper / "f").stat().st_mode) == 0o600
    assert [sig for sig, _ in s.signals] == [operations.signal.SIGINT, operations.signal.SIGTERM,
                                             operations.signal.SIGHUP]
    assert {handler for _, handler in s.signals} == {operations.signal.SIG_DFL}
    Union(check(Stack(lowers=[str(ad.lower)], upper=str(ad.upper), work=str(ad.work)))).close()  # released


def test_serve_read_only_debug_in_a_process_serving_several(ad, monkeypatch):
    union = Union(check(Stack(lowers=[str(ad.lower)])))
    s = Session(monkeypatch, ad.fuse)
    monkeypatch.setattr(operations.os, "geteuid", lambda: 1000)
    operations.serve(union, "/m", debug=True, read_only=True, mount_flags=("rw", "nosuid"), signals=False)
    assert s.argv == [b"cowfs", b"-o", b"fsname=cowfs,subtype=cowfs,default_permissions,ro,nosuid", b"-d"]
    assert s.signals == [] and ("signals", SESSION) not in s.calls and ("unsignals", SESSION) not in s.calls
    assert s.calls[-1] == ("destroy", SESSION)


def test_serve_fails_in_one_line_when_libfuse_cannot(ad, monkeypatch):
    union = Union(check(Stack(lowers=[str(ad.lower)])))
    s = Session(monkeypatch, ad.fuse, new=None)
    with pytest.raises(RuntimeError) as e:
        operations.serve(union, "/m")
    assert str(e.value) == "fuse: cannot start a session"
    assert s.calls == ["new"]
    s = Session(monkeypatch, ad.fuse, mount=-1)
    with pytest.raises(RuntimeError) as e:
        operations.serve(union, "/m")
    assert str(e.value) == "fuse: mount failed"
    assert s.calls == ["new", ("signals", SESSION), ("mount", SESSION, b"/m"), ("unsignals", SESSION),
                       ("destroy", SESSION)]


def test_the_notifier_drops_names_from_its_own_thread(fuse):
    seen = []
    real = fuse.notify_inval_entry

    def record(session, parent_id, name, size):
        seen.append(threading.current_thread().name)
        return real(session, parent_id, name, size)
    ll.notify_inval_entry = record
    notifier = Notifier(SESSION)
    assert notifier._thread.daemon
    notifier.forget_name(5, "näme")
    notifier.forget_name(7, "x")
    notifier.stop()
    assert not notifier._thread.is_alive()
    assert fuse.notices == [("entry", SESSION, 5, "näme".encode()), ("entry", SESSION, 7, b"x")]
    assert seen == ["cowfs-notifier"] * 2


# ---------------------------------------------------------------------------------------------
# copy-ups and moves under way

def test_a_lower_hard_link_that_gets_another_name_drops_its_old_entry(ad):
    put(ad.lower, "a", b"x")
    os.link(ad.lower / "a", ad.lower / "b")
    ops = ad.start()
    a, b = ad.node("a"), ad.node("b")
    assert a != b  # a lower hard link is one inode per name
    ad.fuse.invalidated()
    kind, e = ad.link(a, ROOT, b"c")
    ops.notifier.stop()  # waits for the notifier's thread to send what it was given
    # the copy-up broke "a" off the lower link: it is the object "c" names now, another inode; the
    # kernel must drop its entry for "a" (from the notifier's thread) and its listing of "/"
    assert kind == "entry" and e["ino"] not in (ROOT, a, b)
    assert sorted(ad.fuse.invalidated()) == [("entry", SESSION, ROOT, b"a"), ("inode", SESSION, ROOT, 0, 0)]
    assert ops.table.get(a).parent is None
    assert ad.lookup(ROOT, b"a")[1]["ino"] == e["ino"]
    assert ad.lookup(ROOT, b"b")[1]["ino"] == b


def rename_meanwhile(ad, old, new):
    """Another request's rename of `old` in / to `new`, as the adapter brackets it."""
    table = ad.ops.table
    with table.moving_names():
        ad.union.rename("/" + old, "/" + new)
        table.renamed(table.root, old, table.root, new)


def asked_paths(ad, monkeypatch, before_first=None):
    """Record the paths the engine's getattr is asked for (the list returned); `before_first` runs while
    the first is being answered, as another request racing it would."""
    real, paths, once = ad.union.getattr, [], [before_first] if before_first else []

    def recorded(path):
        paths.append(path)
        if once:
            once.pop()()
        return real(path)
    monkeypatch.setattr(ad.union, "getattr", recorded)
    return paths


def test_a_path_a_rename_made_out_of_date_is_read_again(ad, monkeypatch):
    ops = ad.start()
    d = ad.mkdir(ROOT, b"d", 0o755)[1]["ino"]
    f = ad.mknod(d, b"f", stat.S_IFREG | 0o644, 0)[1]["ino"]
    paths = asked_paths(ad, monkeypatch, lambda: rename_meanwhile(ad, "d", "e"))
    kind, attrs, _ = ad.getattr(f, NO_FI)
    assert kind == "attr" and paths == ["/d/f", "/e/f"]
    paths.clear()
    assert ad.lookup(d, b"nothing")[1]["ino"] == 0  # nothing moved: no second try
    assert paths == ["/e/nothing"]
    assert ops.table.path(ops.table.get(f)) == "/e/f"


def test_a_path_out_of_date_under_a_file_is_read_again_too(ad, monkeypatch):
    ad.start()
    d = ad.mkdir(ROOT, b"d", 0o755)[1]["ino"]
    f = ad.mknod(d, b"f", stat.S_IFREG | 0o644, 0)[1]["ino"]

    def meanwhile():
        rename_meanwhile(ad, "d", "e")
        ad.union.mknod("/d", stat.S_IFREG | 0o644)  # now a file where the directory was
    paths = asked_paths(ad, monkeypatch, meanwhile)
    assert ad.getattr(f, NO_FI)[0] == "attr" and paths == ["/d/f", "/e/f"]


def test_paths_that_stay_out_of_date_give_up_after_so_many_tries(ad, monkeypatch):
    ad.start()
    d = ad.mkdir(ROOT, b"d", 0o755)[1]["ino"]
    f = ad.mknod(d, b"f", stat.S_IFREG | 0o644, 0)[1]["ino"]
    real, paths = ad.union.getattr, []
    names = iter(["e", "d"] * 20)

    def racing(path):
        paths.append(path)
        rename_meanwhile(ad, path.split("/")[1], next(names))
        return real(path)
    monkeypatch.setattr(ad.union, "getattr", racing)
    assert ad.getattr(f, NO_FI) == ("err", errno.ENOENT)
    assert len(paths) == operations.RETRIES


@pytest.mark.parametrize("other", ["directory", "file"])
def test_another_object_met_during_a_move_is_read_again(ad, monkeypatch, other):
    """The name a node had now holds another object (of another kind, or another number): read again."""
    ad.start()
    f = ad.mknod(ROOT, b"f", stat.S_IFREG | 0o644, 0)[1]["ino"]
    if other == "directory":
        ad.mkdir(ROOT, b"g", 0o755)
    else:
        ad.mknod(ROOT, b"g", stat.S_IFREG | 0o644, 0)
    real, paths = ad.union.getattr, []

    def racing(path):
        paths.append(path)
        if len(paths) == 1:  # "f" was renamed to "h" and "g" to "f" just now
            attrs = real("/g")
            rename_meanwhile(ad, "f", "h")
            rename_meanwhile(ad, "g", "f")
            return attrs
        return real(path)
    monkeypatch.setattr(ad.union, "getattr", racing)
    kind, attrs, _ = ad.getattr(f, NO_FI)
    assert kind == "attr" and stat.S_ISREG(attrs["st_mode"]) and paths == ["/f", "/h"]
    assert attrs["st_ino"] == real("/h")["st_ino"] != real("/f")["st_ino"]


def test_a_move_under_way_is_waited_for(ad, monkeypatch):
    ops = ad.start()
    d = ad.mkdir(ROOT, b"d", 0o755)[1]["ino"]
    f = ad.mknod(d, b"f", stat.S_IFREG | 0o644, 0)[1]["ino"]
    started, go = threading.Event(), threading.Event()

    def mover():
        with ops.table.moving_names():
            started.set()
            go.wait(10)
            ad.union.rename("/d", "/e")
            ops.table.renamed(ops.table.root, "d", ops.table.root, "e")

    def meanwhile():
        go.set()  # the move ends while this request fails
        while os.path.exists(ad.upper / "d"):
            time.sleep(0.001)
        time.sleep(0.01)
    thread = threading.Thread(target=mover)
    thread.start()
    started.wait(10)
    paths = asked_paths(ad, monkeypatch, meanwhile)
    try:
        kind, attrs, _ = ad.getattr(f, NO_FI)
    finally:
        go.set()
        thread.join(10)
    assert kind == "attr" and paths == ["/d/f", "/e/f"]


def test_a_directory_listed_twice_by_a_failed_request_is_dropped_once(ad):
    ad.start()
    d = ad.mkdir(ROOT, b"d", 0o755)[1]["ino"]
    ad.fuse.invalidated()
    assert ad.rename(d, b"nothing", d, b"else", 0) == ("err", errno.ENOENT)
    assert ad.fuse.invalidated() == [("inode", SESSION, d, 0, 0)]
    assert ad.rename(d, b"nothing", ROOT, b"else", 0) == ("err", errno.ENOENT)
    assert ad.fuse.invalidated() == [("inode", SESSION, d, 0, 0), ("inode", SESSION, ROOT, 0, 0)]


def test_an_unchanged_directory_keeps_its_listing_and_its_id(ad):
    put(ad.lower, "d/a")
    ops = ad.start()
    d = ad.node("d")
    first = dirents(ad.readdir(d, 4096, 0, fi())[1])
    again = dirents(ad.readdir(d, 4096, 0, fi())[1])
    assert again == first
    assert ops._replaced == {} and list(ops._encoded) == [d]
    assert ops._encoded_entries == 3


def test_directories_whose_entries_went_with_attributes_are_remembered_within_a_bound(ad, monkeypatch):
    for name in "abc":
        put(ad.lower, f"{name}/f")
    ops = ad.start()
    a, b, c = ad.node("a"), ad.node("b"), ad.node("c")
    monkeypatch.setattr(operations, "PLUS_SENT_KEPT", 2)

    def with_attrs(node):
        return direntplus(ad.readdirplus(node, 4096, 0, fi())[1])[2][1] != 0
    assert with_attrs(a) and with_attrs(b)
    assert not with_attrs(a)  # remembered
    assert with_attrs(c)  # the third: the others are forgotten
    assert set(ops._plus_sent) == {c}
    assert with_attrs(a)


def test_encoded_listings_are_kept_within_a_bound_oldest_first(ad, monkeypatch):
    for name in "abc":
        put(ad.lower, f"{name}/f")
        put(ad.lower, f"{name}/g")
    ops = ad.start()
    a, b, c = ad.node("a"), ad.node("b"), ad.node("c")
    monkeypatch.setattr(operations, "ENCODED_KEPT", 8)  # two listings of four
    for node in (a, b):
        ad.readdir(node, 4096, 0, fi())
    assert list(ops._encoded) == [a, b] and ops._encoded_entries == 8
    offset = dirents(ad.readdir(a, 4096, 0, fi())[1])[0][3]
    ad.readdir(c, 4096, 0, fi())
    assert list(ops._encoded) == [b, c] and ops._encoded_entries == 8
    # a reader of the listing let go goes on in the current one, read again under a new id
    rest = dirents(ad.readdir(a, 4096, offset, fi())[1])
    assert rest[0][0] == ".." and sorted(e[0] for e in rest[1:]) == ["f", "g"]
    assert rest[0][3] >> 32 != offset >> 32
    assert list(ops._encoded) == [c, a] and ops._encoded_entries == 8
    ad.mknod(c, b"h", stat.S_IFREG | 0o644, 0)
    ad.readdir(c, 4096, 0, fi())  # five entries now: only this one is kept
    assert list(ops._encoded) == [c] and ops._encoded_entries == 5


def test_replaced_listings_are_kept_within_a_bound(ad, monkeypatch):
    ops = ad.start()
    d = ad.mkdir(ROOT, b"d", 0o755)[1]["ino"]
    monkeypatch.setattr(operations, "REPLACED_KEPT", 2)
    offsets = []
    for i in range(4):
        ad.mknod(d, f"f{i}".encode(), stat.S_IFREG | 0o644, 0)
        offsets.append(dirents(ad.readdir(d, 4096, 0, fi())[1])[0][3])
    ad.mknod(d, b"last", stat.S_IFREG | 0o644, 0)
    current = dirents(ad.readdir(d, 4096, 0, fi())[1])[0][3] >> 32
    assert len(ops._replaced) == 2
    for offset, kept in zip(offsets, [False, False, True, True]):
        listed = dirents(ad.readdir(d, 4096, offset, fi())[1])
        assert [e[3] >> 32 for e in listed][0] == (offset >> 32 if kept else current)


def test_readdirplus_looks_a_name_up_again_when_the_directorys_path_moved(ad, monkeypatch):
    ops = ad.start()
    d = ad.mkdir(ROOT, b"d", 0o755)[1]["ino"]
    ad.mknod(d, b"f", stat.S_IFREG | 0o644, 0)
    ad.union.readdir("/d")
    paths = asked_paths(ad, monkeypatch, lambda: rename_meanwhile(ad, "d", "e"))
    entries = direntplus(ad.readdirplus(d, 4096, 0, fi())[1])
    assert paths == ["/d/f", "/e/f"]
    assert ops.table.path(ops.table.get(entries[2][1])) == "/e/f"


def test_a_move_that_does_not_end_in_time_is_waited_for_no_longer(ad, monkeypatch):
    ops = ad.start()
    started, go = threading.Event(), threading.Event()

    def mover():
        with ops.table.moving_names():
            started.set()
            go.wait(2)  # far longer than the wait allowed below
    thread = threading.Thread(target=mover)
    thread.start()
    started.wait(10)
    monkeypatch.setattr(operations, "MOVE_WAIT", 0.05)
    paths = asked_paths(ad, monkeypatch)
    try:
        start = time.monotonic()
        assert ad.lookup(ROOT, b"nothing")[1]["ino"] == 0
        waited = time.monotonic() - start
    finally:
        go.set()
        thread.join(10)
    assert paths == ["/nothing"] and 0.05 <= waited < 1.5


def test_a_copy_up_outside_any_request_is_no_concern_of_the_adapter(ad):
    put(ad.lower, "f", mode=0o644)
    ad.start()
    failures = []

    def elsewhere():  # a thread that never served a request: nothing to settle
        try:
            ad.union.chmod("/f", 0o600)
        except Exception as e:  # noqa: BLE001 (reported below)
            failures.append(e)
    thread = threading.Thread(target=elsewhere)
    thread.start()
    thread.join(10)
    assert failures == [] and stat.S_IMODE((ad.upper / "f").stat().st_mode) == 0o600


def test_an_unmount_waits_for_a_stuck_notifier_no_longer_than_its_bound(fuse, monkeypatch):
    release = threading.Event()

    def stuck(session, parent_id, name, size):  # a kernel that does not answer
        release.wait(2)
        return 0
    ll.notify_inval_entry = stuck
    monkeypatch.setattr(operations, "STOP_WAIT", 0.05)
    notifier = Notifier(SESSION)
    notifier.forget_name(1, "x")
    start = time.monotonic()
    notifier.stop()
    waited = time.monotonic() - start
    alive = notifier._thread.is_alive()
    release.set()
    assert alive and waited < 1.5


def test_another_kind_met_during_a_move_that_does_not_end_in_time_is_no_answer(ad, monkeypatch):
    ops = ad.start()
    f = ad.mknod(ROOT, b"f", stat.S_IFREG | 0o644, 0)[1]["ino"]
    ad.mkdir(ROOT, b"g", 0o755)
    started, go = threading.Event(), threading.Event()

    def mover():
        with ops.table.moving_names():
            started.set()
            go.wait(2)
    thread = threading.Thread(target=mover)
    thread.start()
    started.wait(10)
    monkeypatch.setattr(operations, "MOVE_WAIT", 0.05)
    real, paths = ad.union.getattr, []
    monkeypatch.setattr(ad.union, "getattr", lambda path: (paths.append(path), real("/g"))[1])
    try:
        answer = ad.getattr(f, NO_FI)
    finally:
        go.set()
        thread.join(10)
    assert answer == ("err", errno.ENOENT) and paths == ["/f"]


def test_the_right_object_during_an_unrelated_move_is_the_answer_at_once(ad, monkeypatch):
    ad.start()
    f = ad.mknod(ROOT, b"f", stat.S_IFREG | 0o644, 0)[1]["ino"]
    ad.mknod(ROOT, b"other", stat.S_IFREG | 0o644, 0)
    real, paths = ad.union.getattr, []

    def racing(path):
        paths.append(path)
        rename_meanwhile(ad, "other" if len(paths) % 2 else "moved", "moved" if len(paths) % 2 else "other")
        return real(path)
    monkeypatch.setattr(ad.union, "getattr", racing)
    kind, attrs, _ = ad.getattr(f, NO_FI)
    assert kind == "attr" and paths == ["/f"]


def test_a_copied_up_path_that_cannot_be_read_back_does_not_stop_the_others(ad, monkeypatch):
    put(ad.lower, "d/f", mode=0o644)
    ad.start()
    d, f = ad.node("d"), ad.node("d/f")
    real = ad.union.getattr
    monkeypatch.setattr(ad.union, "getattr", lambda path: real(path) if path != "/d" else (_ for _ in ()).throw(
        OSError(errno.EIO, "unreadable")))
    ad.fuse.invalidated()
    assert set_attrs(ad, f, ll.SET_ATTR_MODE, st_mode=0o600)[0] == "attr"  # copies up "/d", then "/d/f"
    assert ad.fuse.invalidated() == [("inode", SESSION, f, -1, 0), ("inode", SESSION, ROOT, 0, 0),
                                     ("inode", SESSION, d, 0, 0)]


def test_readdirplus_asks_the_engine_by_merged_paths(ad, monkeypatch):
    put(ad.lower, "f")
    put(ad.lower, "d/g")
    ad.start()
    d = ad.node("d")
    paths = asked_paths(ad, monkeypatch)
    ad.readdirplus(ROOT, 4096, 0, fi())
    ad.readdirplus(d, 4096, 0, fi())
    assert sorted(paths) == ["/d", "/d/g", "/f"]


def test_readdirplus_goes_on_past_a_name_gone_since_the_listing(ad, monkeypatch):
    for name in "abcde":
        put(ad.lower, f"d/{name}")
    ad.start()
    d = ad.node("d")
    first = ad.union.readdir("/d")[2][0]  # whichever comes first
    real = ad.union.getattr
    monkeypatch.setattr(ad.union, "getattr", lambda path: real(path) if path != "/d/" + first else (
        _ for _ in ()).throw(FileNotFoundError(errno.ENOENT, "gone")))
    entries = direntplus(ad.readdirplus(d, 4096, 0, fi())[1])
    assert sorted(e[0] for e in entries[2:]) == sorted(set("abcde") - {first})
    assert all(e[1] for e in entries[2:])


def test_an_entry_that_did_not_fit_leaves_the_kernels_own_lookups(ad):
    put(ad.lower, "d/f")
    ops = ad.start()
    d, f = ad.node("d"), ad.node("d/f")
    data = ad.readdirplus(d, 2 * 160, 0, fi())[1]  # "." and "..": "f" does not fit
    assert [e[0] for e in direntplus(data)] == [".", ".."]
    assert ops.table.get(f).nlookup == 1  # the kernel's lookup of it stays counted


def test_a_listing_read_again_replaces_its_old_one_in_place_of_the_oldest(ad, monkeypatch):
    ops = ad.start()
    a = ad.mkdir(ROOT, b"a", 0o755)[1]["ino"]
    b = ad.mkdir(ROOT, b"b", 0o755)[1]["ino"]
    ad.readdir(a, 4096, 0, fi())
    ad.readdir(b, 4096, 0, fi())
    assert list(ops._encoded) == [a, b] and ops._encoded_entries == 4
    ad.mknod(a, b"x", stat.S_IFREG | 0o644, 0)
    ad.readdir(a, 4096, 0, fi())
    assert list(ops._encoded) == [b, a] and ops._encoded_entries == 5  # the newest last, counted once
