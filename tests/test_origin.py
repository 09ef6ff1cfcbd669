"""The kernel's origin file handle and index=on, both ways: an upper one side made, mounted by the other.

With every layer on one filesystem the kernel's rule is deterministic: a
copied-up object shows its lower origin's st_ino (a directory, a file with
one link, or any indexed file). cowfs and the kernel must show the same
numbers over an upper either of them wrote; the engine-only tests check the
format itself (handles.py) and what index=on refuses.
"""

from __future__ import annotations

import errno
import os
import shutil
import struct
import tempfile

import pytest

from cowfs.errors import StackError
from cowfs.overlay import handles
from cowfs.overlay.filesystems import Filesystems, settle_uuid
from cowfs.overlay.stack import Stack, check, parse_options
from cowfs.overlay.union import Union
from cowfs.testing.harness import upper_snapshot
from cowfs.testing.mounts import CowfsMount, KernelOverlay, MountError, scratch_filesystem, set_image_uuid

TRUSTED = "trusted.overlay."


def _layers(base):
    lower, upper, work = (os.path.join(base, name) for name in ("lower", "upper", "work"))
    for d in (lower, upper, work, lower + "/d"):
        os.makedirs(d)
    for name, data in (("single", b"one name\n"), ("d/inner", b"inner\n"), ("hl1", b"linked\n")):
        with open(os.path.join(lower, name), "wb") as f:
            f.write(data)
    os.link(lower + "/hl1", lower + "/hl2")
    return lower, upper, work


def _union(lower, upper, work, *options):
    return Union(check(parse_options([",".join((f"lowerdir={lower},upperdir={upper},workdir={work}",) + options)])))


# -- the format ----------------------------------------------------------------------------------

def test_origin_is_the_kernels_file_handle(tmp_path):
    lower, upper, work = _layers(tmp_path)
    u = _union(lower, upper, work)
    try:
        ino = u.getattr("/single")["st_ino"]
        u.chmod("/single", 0o600)
        assert u.getattr("/single")["st_ino"] == ino == os.lstat(lower + "/single").st_ino
        value = os.getxattr(upper + "/single", TRUSTED + "origin")
        version, magic, length, flags, kind, uuid = struct.unpack_from("<BBBBB16s", value)
        assert (version, magic, length, flags) == (0, 0xFB, len(value), 0)
        assert (kind, value[21:]) == handles.file_handle(lower + "/single")
        assert uuid == handles.fs_uuid(lower)
        u.chmod("/hl1", 0o600)  # index=off: a lower hard link is broken by copy-up, and gets no origin
        with pytest.raises(OSError) as e:
            os.getxattr(upper + "/hl1", TRUSTED + "origin")
        assert e.value.errno == errno.ENODATA
        assert u.getattr("/hl1")["st_ino"] == os.lstat(upper + "/hl1").st_ino != os.lstat(lower + "/hl1").st_ino
    finally:
        u.close()


def test_decode_refuses_malformed_and_skips_unknown():
    assert handles.decode(b"") is None
    with pytest.raises(ValueError):
        handles.decode(b"\x00\xfa" + bytes(19))
    assert handles.decode(bytes([1, 0xFB, 21, 0, 1]) + bytes(16)) is None  # a later version: origin unknown
    assert handles.decode(bytes([0, 0xFB, 21, 1, 1]) + bytes(16)) is None  # big endian
    assert handles.decode(bytes([0, 0xFB, 25, 0, 1]) + bytes(16) + b"abcd") == (0, 1, bytes(16), b"abcd")


def test_decode_checks_each_field(tmp_path, monkeypatch):
    header = struct.Struct("<BBBBB16s")
    ok = header.pack(0, 0xFB, 25, 0, 1, bytes(16)) + b"abcd"
    assert handles.decode(ok) == (0, 1, bytes(16), b"abcd")
    for bad in (header.pack(0, 0xFA, 25, 0, 1, bytes(16)) + b"abcd",  # another magic, the length right
                header.pack(0, 0xFB, 26, 0, 1, bytes(16)) + b"abcd",  # longer than the value
                header.pack(0, 0xFB, 20, 0, 1, bytes(16)) + b"abcd"):  # shorter than its header
        with pytest.raises(ValueError) as e:
            handles.decode(bad)
        assert str(e.value) == "bad file handle"
    with pytest.raises(ValueError) as e:
        handles.decode(b"\x00\xfb\x15")
    assert str(e.value) == "short file handle"
    upper = header.pack(0, 0xFB, 21, handles.FLAG_PATH_UPPER, 1, bytes(16))
    assert handles.decode(upper) == (handles.FLAG_PATH_UPPER, 1, bytes(16), b"")
    assert handles.decode(header.pack(0, 0xFB, 21, 8, 1, bytes(16))) is None  # a flag this version does not know
    (tmp_path / "f").write_bytes(b"")
    assert handles.encode(str(tmp_path / "f"), bytes(16), upper=True)[3] == handles.FLAG_PATH_UPPER
    assert handles.encode(str(tmp_path / "f"), bytes(16))[3] == 0
    monkeypatch.chdir(tmp_path)
    assert handles.file_handle("f") == handles.file_handle(str(tmp_path / "f"))  # relative to the working directory


def test_a_handle_of_a_removed_file_is_stale(tmp_path):
    (tmp_path / "f").write_bytes(b"")
    kind, data = handles.file_handle(str(tmp_path / "f"))
    fd = handles.open_handle(str(tmp_path), kind, data)
    os.close(fd)
    os.unlink(tmp_path / "f")
    with pytest.raises(OSError) as e:
        handles.open_handle(str(tmp_path), kind, data)
    assert (e.value.errno, e.value.filename) == (errno.ESTALE, str(tmp_path))


def test_file_handle_errors_name_the_path(tmp_path):
    missing = str(tmp_path / "missing")
    with pytest.raises(OSError) as e:
        handles.file_handle(missing)
    assert (e.value.errno, e.value.strerror, e.value.filename) == (errno.ENOENT, os.strerror(errno.ENOENT), missing)
    assert handles.supports_handles(str(tmp_path)) is True
    with pytest.raises(OSError) as e:
        handles.supports_handles(missing)  # only "no handles here" answers False
    assert e.value.errno == errno.ENOENT


def test_fs_uuid_as_the_filesystem_tells_it(tmp_path, monkeypatch):
    """FS_IOC_GETFSUUID's answer (a length, then the bytes), padded to 16; the null UUID from a filesystem
    that has no such ioctl, as the kernel's super block then holds."""
    answers = []

    def ioctl(fd, request, buf):
        assert request == handles.FS_IOC_GETFSUUID and len(buf) == 17
        answer = answers.pop(0)
        if isinstance(answer, int):
            raise OSError(answer, os.strerror(answer))
        buf[:len(answer)] = answer
        return 0
    monkeypatch.setattr(handles.fcntl, "ioctl", ioctl)
    answers[:] = [bytes([16]) + bytes(range(1, 17)), bytes([8]) + b"abcdefgh" + b"junk", errno.ENOTTY,
                  errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS, errno.EIO]
    assert handles.fs_uuid(str(tmp_path)) == bytes(range(1, 17))
    assert handles.fs_uuid(str(tmp_path)) == b"abcdefgh" + bytes(8)
    for _ in range(4):
        assert handles.fs_uuid(str(tmp_path)) == handles.NULL_UUID
    with pytest.raises(OSError) as e:
        handles.fs_uuid(str(tmp_path))
    assert e.value.errno == errno.EIO
    (tmp_path / "f").write_bytes(b"")
    answers[:] = [bytes([16]) + bytes(range(16))]
    assert handles.fs_uuid(str(tmp_path / "f")) == bytes(range(16))  # a file as well as a directory


def test_no_file_handles_is_no_index(tmp_path, monkeypatch):
    def refuse(path):
        raise OSError(errno.EOPNOTSUPP, "no handles", path)
    monkeypatch.setattr(handles, "file_handle", refuse)
    assert handles.supports_handles(str(tmp_path)) is False


def test_handle_ino_reads_ino32_gen_handles():
    data = struct.pack("<II", 123456, 7)
    assert handles.handle_ino(handles.FILEID_INO32_GEN, data) == 123456
    assert handles.handle_ino(handles.FILEID_INO32_GEN_PARENT, data + struct.pack("<II", 2, 1)) == 123456
    assert handles.handle_ino(handles.FILEID_INO32_GEN, struct.pack("<I", 99)) == 99
    assert handles.handle_ino(handles.FILEID_INO32_GEN, struct.pack("<II", 0xFFFFFFF0, 1)) == 0xFFFFFFF0  # unsigned
    assert handles.handle_ino(handles.FILEID_INO32_GEN, b"abc") is None
    assert handles.handle_ino(0x81, data) is None  # another filesystem's format


def test_origin_number_without_open_by_handle(tmp_path, monkeypatch):
    """A process without CAP_DAC_READ_SEARCH cannot open a handle: the number an INO32_GEN handle carries is
    the origin's (ext4's handles are of that type)."""
    lower, upper, work = _layers(tmp_path)
    u = _union(lower, upper, work)
    try:
        u.chmod("/single", 0o600)
        ino = os.lstat(lower + "/single").st_ino
    finally:
        u.close()

    def no_capability(mount_path, kind, data):
        raise OSError(errno.EPERM, "Operation not permitted", mount_path)
    monkeypatch.setattr(handles, "open_handle", no_capability)
    u = _union(lower, upper, work)
    try:
        kind, _ = handles.file_handle(lower + "/single")
        expected = ino if kind in (handles.FILEID_INO32_GEN, handles.FILEID_INO32_GEN_PARENT) else os.lstat(
            upper + "/single").st_ino
        assert u.getattr("/single")["st_ino"] == expected
    finally:
        u.close()


@pytest.fixture
def two_filesystems(tmp_path):
    """Copies up of `f`, from a lower on a tmpfs (/dev/shm), and of `g`, from a lower below it on the upper's
    filesystem: (lowerdir value, upper, work, the two lowers)."""
    other = tempfile.mkdtemp(dir="/dev/shm")
    try:
        lower, upper, work = _layers(tmp_path)
        with open(other + "/f", "wb") as f:
            f.write(b"f\n")
        with open(lower + "/g", "wb") as f:
            f.write(b"g\n")
        assert os.stat(other).st_dev != os.stat(lower).st_dev
        u = _union(f"{other}:{lower}", upper, work)
        try:
            u.chmod("/f", 0o600)
            u.chmod("/g", 0o600)
        finally:
            u.close()
        yield f"{other}:{lower}", upper, work, (other, lower)
    finally:
        shutil.rmtree(other)


def test_origins_followed_into_the_lower_of_their_filesystem(two_filesystems):
    """As the kernel: an origin is sought in the lower layers, first to last, on the filesystem its UUID
    names; a layer on another filesystem is passed over, and the upper is no place an origin leads."""
    lowers, upper, work, (other, lower) = two_filesystems
    u = _union(lowers, upper, work)
    try:
        for name, layer in (("f", other), ("g", lower)):
            shown = u.getattr("/" + name)["st_ino"]
            assert shown == u.layers.map_ino(os.lstat(f"{layer}/{name}")), name
            assert shown != u.layers.map_ino(os.lstat(f"{upper}/{name}")), name
    finally:
        u.close()


def test_origin_handles_that_carry_no_number_without_open_by_handle(two_filesystems, monkeypatch):
    """Without CAP_DAC_READ_SEARCH, an origin handle of a type that carries no inode number gives none:
    the copy shows its own number (on a stack of two filesystems, with their numbers in the high bits)."""
    lowers, upper, work, _ = two_filesystems

    def no_capability(mount_path, kind, data):
        raise OSError(errno.EPERM, "Operation not permitted", mount_path)
    monkeypatch.setattr(handles, "open_handle", no_capability)
    monkeypatch.setattr(handles, "handle_ino", lambda kind, data: None)
    u = _union(lowers, upper, work)
    try:
        for name in ("f", "g"):
            assert u.getattr("/" + name)["st_ino"] == u.layers.map_ino(os.lstat(f"{upper}/{name}")), name
    finally:
        u.close()


@pytest.mark.parametrize("error,followed", [(errno.ESTALE, True), (errno.ENOENT, False), (errno.EINVAL, False)])
def test_an_origin_that_a_layer_cannot_open(tmp_path, monkeypatch, error, followed):
    """A handle stale in one lower layer (another filesystem of the same UUID) is sought in the next; one
    that names nothing there or cannot be decoded leaves the copy its own number, as the kernel's."""
    lower, upper, work = _layers(tmp_path)
    top = str(tmp_path / "top")
    os.mkdir(top)
    u = _union(f"{top}:{lower}", upper, work)
    try:
        u.chmod("/single", 0o600)
    finally:
        u.close()
    opened, open_handle = [], handles.open_handle

    def failing_in_top(mount_path, kind, data):
        opened.append(mount_path)
        if mount_path == top:
            raise OSError(error, os.strerror(error), mount_path)
        return open_handle(mount_path, kind, data)
    monkeypatch.setattr(handles, "open_handle", failing_in_top)
    u = _union(f"{top}:{lower}", upper, work)
    try:
        shown = u.getattr("/single")["st_ino"]
    finally:
        u.close()
    assert shown == os.lstat((lower if followed else upper) + "/single").st_ino
    assert opened == ([top, lower] if followed else [top])


def test_an_origin_is_opened_once(tmp_path, monkeypatch):
    """The number an origin gives is kept (lower layers never change): getattr and readdir do not open its
    handle again."""
    lower, upper, work = _layers(tmp_path)
    u = _union(lower, upper, work)
    try:
        u.chmod("/single", 0o600)
    finally:
        u.close()
    opened, open_handle = [], handles.open_handle
    monkeypatch.setattr(handles, "open_handle", lambda *args: opened.append(args[0]) or open_handle(*args))
    u = _union(lower, upper, work)
    try:
        ino = os.lstat(lower + "/single").st_ino
        assert u.getattr("/single")["st_ino"] == u.getattr("/single")["st_ino"] == ino
        assert {name: number for name, number, _ in u.readdir("/")}["single"] == ino
    finally:
        u.close()
    assert opened == [lower]


@pytest.mark.parametrize("error", [errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL, errno.EPERM])
def test_a_copy_up_without_a_file_handle_records_no_origin(tmp_path, monkeypatch, error):
    """A lower filesystem that gives no file handle (or a process not allowed one): the copy-up goes on
    without an origin, as the kernel's, and the copy shows its own number; another error fails it."""
    lower, upper, work = _layers(tmp_path)

    def refusing(code):
        def encode(path, uuid, upper=False):
            raise OSError(code, os.strerror(code), path)
        return encode
    monkeypatch.setattr(handles, "encode", refusing(error))
    u = _union(lower, upper, work)
    try:
        u.chmod("/single", 0o600)
        assert TRUSTED + "origin" not in os.listxattr(upper + "/single")
        assert u.getattr("/single")["st_ino"] == os.lstat(upper + "/single").st_ino
        monkeypatch.setattr(handles, "encode", refusing(errno.EIO))
        with pytest.raises(OSError) as info:
            u.chmod("/d/inner", 0o600)
        assert info.value.errno == errno.EIO
        assert not os.path.exists(upper + "/d/inner")
    finally:
        u.close()


def test_old_cowfs_origin_still_read(tmp_path):
    """An upper written before cowfs wrote the kernel's origin keeps its numbers."""
    lower, upper, work = _layers(tmp_path)
    with open(upper + "/single", "wb") as f:
        f.write(b"copied earlier\n")
    os.setxattr(upper + "/single", TRUSTED + "cowfs.origin", b"4242")
    u = _union(lower, upper, work)
    try:
        assert u.getattr("/single")["st_ino"] == 4242
    finally:
        u.close()


# -- index=on in the engine ----------------------------------------------------------------------

def test_index_keeps_a_lower_hard_link_one_file(tmp_path):
    lower, upper, work = _layers(tmp_path)
    u = _union(lower, upper, work, "index=on")
    try:
        ino = os.lstat(lower + "/hl1").st_ino
        assert u.getattr("/hl2")["st_ino"] == ino
        h = u.open("/hl1", os.O_WRONLY | os.O_APPEND)
        u.write(h, b"more\n", 0)
        u.release(h)
        assert [u.getattr(p)["st_ino"] for p in ("/hl1", "/hl2")] == [ino, ino]
        assert [u.getattr(p)["st_nlink"] for p in ("/hl1", "/hl2")] == [2, 2]
        h = u.open("/hl2", os.O_RDONLY)
        assert u.read(h, 100, 0) == b"linked\nmore\n"  # the other name reads the copy, from the index
        u.release(h)
        entries = os.listdir(work + "/index")
        origin = os.getxattr(upper + "/hl1", TRUSTED + "origin")
        assert entries == [origin.hex()]
        assert os.path.samestat(os.lstat(work + "/index/" + entries[0]), os.lstat(upper + "/hl1"))
        assert os.getxattr(upper + "/hl1", TRUSTED + "nlink") == b"U+0"
        u.unlink("/hl1")
        assert u.getattr("/hl2")["st_nlink"] == 1
        u.unlink("/hl2")
        assert os.listdir(work + "/index") == []  # no name left: the entry goes
        assert os.getxattr(upper, TRUSTED + "origin") == handles.encode(lower, handles.fs_uuid(lower))
        assert os.getxattr(work + "/index", TRUSTED + "upper") == handles.encode(
            upper, handles.fs_uuid(upper), upper=True)
    finally:
        u.close()


def test_index_link_counts(tmp_path):
    """As the kernel: an indexed copy shows its merged count (a lower name deleted since counts no more,
    though the upper inode still has its index link); a merged directory shows 1; a lower file shows its own
    count, whatever nlink marker it carries."""
    lower, upper, work = _layers(tmp_path)
    with open(lower + "/marked", "wb") as f:
        f.write(b"x")
    os.setxattr(lower + "/marked", TRUSTED + "nlink", b"U+5")
    os.mkdir(upper + "/d")
    u = _union(lower, upper, work, "index=on")
    try:
        h = u.open("/hl1", os.O_WRONLY | os.O_APPEND)
        u.release(h)
        u.unlink("/hl2")
        assert os.lstat(upper + "/hl1").st_nlink == 2  # its name and its index entry
        counts = {p: u.getattr(p)["st_nlink"] for p in ("/hl1", "/d", "/marked", "/single")}
        assert counts == {"/hl1": 1, "/d": 1, "/marked": 1, "/single": 1}
    finally:
        u.close()


def test_index_refuses_an_upper_made_over_other_lowers(tmp_path):
    lower, upper, work = _layers(tmp_path)
    _union(lower, upper, work, "index=on").close()
    other = tmp_path / "other"
    other.mkdir()
    with pytest.raises(StackError, match="origin is not lowerdir"):
        _union(other, upper, work, "index=on")
    _union(other, upper, work).close()  # without index nothing is checked, as the kernel


# -- both ways through real mounts ---------------------------------------------------------------

def _mounted(kind, lower, upper, work, mnt, options):
    cls = KernelOverlay if kind == "kernel" else CowfsMount
    m = cls([lower], upper, work, mnt, options)
    m.mount()
    return m


def _inos(mnt, names):
    return {name: os.lstat(os.path.join(mnt, name)).st_ino for name in names}


@pytest.mark.kernel
@pytest.mark.fuse
@pytest.mark.parametrize("uuid", ["auto", "on", "off", "null"])
@pytest.mark.parametrize("writer,reader", [("kernel", "cowfs"), ("cowfs", "kernel")])
@pytest.mark.parametrize("options", [("redirect_dir=on",), ("index=on", "redirect_dir=on")], ids=["noindex", "index"])
def test_st_ino_the_same_over_the_others_upper(shared_tmp, writer, reader, options, uuid):
    """One side copies up (a file, a directory, a file in it, a lower hard link); the other side,
    mounting that upper (with the same workdir: index=on keeps data in it) with the same uuid=,
    shows the same numbers, and with every layer on one filesystem they are the lower objects' own.
    The layers are on a tmpfs, whose UUID is not null: uuid=off writes and expects the null one."""
    with scratch_filesystem(os.path.join(shared_tmp, "fs")) as fs:
        lower, upper, work = _layers(fs)
        mnt = os.path.join(shared_tmp, "mnt")
        os.mkdir(mnt)
        names = ("single", "d", "d/inner", "hl1", "hl2")
        index = "index=on" in options
        options = (*options, f"uuid={uuid}")
        m = _mounted(writer, lower, upper, work, mnt, ["index=off", *options] if writer == "kernel" else options)
        try:
            for name in ("single", "d/inner", "hl1"):
                os.chmod(os.path.join(mnt, name), 0o640)
            written = _inos(mnt, names)
        finally:
            m.unmount()
        m = _mounted(reader, lower, upper, work, mnt, ["index=off", *options] if reader == "kernel" else options)
        try:
            read = _inos(mnt, names)
            assert os.lstat(os.path.join(mnt, "hl2")).st_nlink == 2  # the lower file, or the indexed one
        finally:
            m.unmount()
        assert read == written
        lower_inos = _inos(lower, names)
        same = ("single", "d", "d/inner", "hl2") + (("hl1",) if index else ())
        assert {n: read[n] for n in same} == {n: lower_inos[n] for n in same}
        if not index:
            assert read["hl1"] == os.lstat(upper + "/hl1").st_ino  # a broken lower hard link: its own number
        carried = handles.NULL_UUID if uuid == "off" else handles.fs_uuid(fs)
        assert carried != handles.NULL_UUID or uuid == "off"
        assert [_origin_uuid(upper + "/" + n) for n in ("single", "d", "d/inner")] == [carried] * 3
        assert _has_uuid(upper) == (uuid in ("on", "auto"))


def test_index_off_without_file_handles(tmp_path, monkeypatch):
    """A layer whose filesystem gives no file handles: index=on goes on as index=off, with a warning."""
    lower, upper, work = _layers(tmp_path)
    monkeypatch.setattr(handles, "supports_handles", lambda path: path != lower)
    u = _union(lower, upper, work, "index=on")
    try:
        assert u.layers.index is None and not os.path.exists(work + "/index")
        assert u.warnings == ["index=on: a layer's filesystem gives no file handles; going on with index=off"]
        u.chmod("/hl1", 0o600)
        assert u.getattr("/hl2")["st_ino"] != u.getattr("/hl1")["st_ino"]  # broken, as with index=off
    finally:
        u.close()


def test_index_off_when_lower_uuids_are_ambiguous(tmp_path, monkeypatch):
    """A lower filesystem that cannot be told by its UUID (see test_two_lower_filesystems_of_one_uuid for
    the real thing): index=on goes on as index=off, with the one-line warning the mount prints."""
    from cowfs.overlay import filesystems
    lower, upper, work = _layers(tmp_path)
    monkeypatch.setattr(filesystems.Filesystems, "uuids_ambiguous", property(lambda self: True))
    u = _union(lower, upper, work, "index=on")
    try:
        assert u.layers.index is None and not os.path.exists(work + "/index")
        assert u.warnings == ["index=on: two lower filesystems have the same UUID; going on with index=off"]
    finally:
        u.close()


# -- data-only lower layers ----------------------------------------------------------------------

@pytest.mark.parametrize("value,lowers,data", [
    ("a:b::c::d", ["a", "b"], ("c", "d")),
    ("a::c", ["a"], ("c",)),
    ("a\\::b", ["a:", "b"], ()),
])
def test_data_only_layers_parsed(value, lowers, data):
    stack = parse_options([f"lowerdir={value},metacopy=on"])
    assert (stack.lowers, stack.data_lowers) == (lowers, data)
    assert stack.option_string().startswith(f"lowerdir={value},")


@pytest.mark.parametrize("value,message", [
    ("::c", "need a lower layer above them"),
    ("a::c:d", "regular lower layers cannot follow data lower layers"),
    ("a:::c", "empty layer"),
    ("a::", "empty layer"),
])
def test_data_only_layers_refused(value, message):
    with pytest.raises(StackError, match=message):
        parse_options([f"lowerdir={value}"])


def test_datadir_needs_lowerdir_plus():
    """As the kernel: datadir+= appends after lowerdir+= layers, never after a lowerdir= list."""
    with pytest.raises(StackError, match="datadir\\+ cannot follow lowerdir="):
        parse_options(["lowerdir=/a,datadir+=/d"])
    with pytest.raises(StackError, match="needs a value"):
        parse_options(["lowerdir=/a,datadir+="])


def test_datadir_after_lowerdir_plus():
    """datadir+= layers go below the lowerdir+= ones, in order; a lowerdir+= after a datadir+= is refused
    ("regular lower layers cannot follow data layers", as the kernel says in dmesg)."""
    stack = parse_options(["lowerdir+=/a,lowerdir+=/b:c,datadir+=/d1", "datadir+=/d2,metacopy=on"])
    assert list(stack.lowers) == ["/a", "/b:c"]
    assert list(stack.data_lowers) == ["/d1", "/d2"]
    with pytest.raises(StackError, match="regular lower layers cannot follow data layers"):
        parse_options(["lowerdir+=/a,datadir+=/d,lowerdir+=/b"])


def test_data_only_reached_by_absolute_redirect_only(tmp_path):
    meta, data = tmp_path / "meta", tmp_path / "data"
    (data / "objects").mkdir(parents=True)
    (data / "objects/abc").write_bytes(b"the data\n")
    (data / "shown").write_bytes(b"never by name\n")
    meta.mkdir()
    f = meta / "file"
    f.write_bytes(b"")
    os.truncate(f, 9)
    os.setxattr(f, TRUSTED + "metacopy", b"")
    os.setxattr(f, TRUSTED + "redirect", b"/objects/abc")
    u = Union(check(parse_options([f"lowerdir={meta}::{data},metacopy=on"])))
    h = u.open("/file", os.O_RDONLY)
    assert u.read(h, 100, 0) == b"the data\n"
    u.release(h)
    assert sorted(name for name, *_ in u.readdir("/")) == [".", "..", "file"]
    for path in ("/shown", "/objects"):
        with pytest.raises(OSError) as e:
            u.getattr(path)
        assert e.value.errno == errno.ENOENT
    assert u.getattr("/file")["st_ino"] == os.lstat(f).st_ino  # the metadata file's number, not the data's


def test_blocks_of_data_not_reached_yet(tmp_path):
    """A metacopy file whose data is in a data-only layer shows the kernel's estimate of its blocks until
    the data is first reached (its size in 4 KiB pages, rounded up, counted in 512-byte blocks), then the
    data's own blocks (here a sparse file's: none); a file with no separate data shows its own. Data
    reached, then gone from its layer, leaves the metadata to answer."""
    size = (1 << 30) + 1
    meta, data = tmp_path / "meta", tmp_path / "data"
    (data / "objects").mkdir(parents=True)
    with open(data / "objects/abc", "wb") as f:
        f.truncate(size)
    meta.mkdir()
    f = meta / "file"
    f.write_bytes(b"")
    os.truncate(f, size)
    os.setxattr(f, TRUSTED + "metacopy", b"")
    os.setxattr(f, TRUSTED + "redirect", b"/objects/abc")
    (meta / "plain").write_bytes(b"p" * 5000)
    u = Union(check(parse_options([f"lowerdir={meta}::{data},metacopy=on"])))
    assert u.getattr("/plain")["st_blocks"] == os.lstat(meta / "plain").st_blocks
    assert u.getattr("/file")["st_blocks"] == ((1 << 30) // 4096 + 1) * 8
    h = u.open("/file", os.O_RDONLY)
    assert u.read(h, 10, 0) == b"\0" * 10
    u.release(h)
    assert u.getattr("/file")["st_blocks"] == os.lstat(data / "objects/abc").st_blocks == 0
    os.unlink(data / "objects/abc")
    assert u.getattr("/file")["st_size"] == size


def test_verity_require_over_data_only_data(tmp_path):
    """verity=require, data in a data-only layer: the data is reached (its blocks shown from then on) before
    the missing digest fails the open with EIO, the first failure telling the adapter the attributes
    changed; data gone after the lookup, or the metadata file gone, is ENOENT naming the merged path."""
    size = 1 << 20
    meta, data = tmp_path / "meta", tmp_path / "data"
    for name in ("a", "b", "c"):
        _write(str(data / "objects" / name), size=size)
        _metacopy_file(str(meta / name), size, redirect="/objects/" + name)
    u = Union(check(parse_options([f"lowerdir={meta}::{data},metacopy=on,verity=require"])))
    estimate = size // 4096 * 8
    assert u.getattr("/a")["st_blocks"] == estimate
    for changed in (True, False):
        with pytest.raises(OSError) as e:
            u.open("/a", os.O_RDONLY)
        assert e.value.errno == errno.EIO and e.value.attrs_changed is changed
    assert u.getattr("/a")["st_blocks"] == os.lstat(data / "objects/a").st_blocks == 0  # the data's own
    u.getattr("/b")
    u.getattr("/c")  # looked up, then their data or their metadata file goes from under the stack
    os.unlink(data / "objects/b")
    os.unlink(meta / "c")
    for path in ("/b", "/c"):
        with pytest.raises(OSError) as e:
            u.open(path, os.O_RDONLY)
        assert (e.value.errno, e.value.filename) == (errno.ENOENT, path)


def _new_dirs(base, prefix):
    """New directories BASE/PREFIXupper, PREFIXwork and PREFIXmnt for one mount."""
    made = [os.path.join(base, prefix + x) for x in ("upper", "work", "mnt")]
    for d in made:
        os.mkdir(d)
    return made


def _metacopy_file(path, size, redirect=None):
    """A metadata-only file of a metadata layer: `size` bytes of hole, its data where `redirect` leads."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.truncate(size)
    os.setxattr(path, TRUSTED + "metacopy", b"")
    if redirect is not None:
        os.setxattr(path, TRUSTED + "redirect", redirect.encode())


def _write(path, data=b"", size=None):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)
        if size is not None:
            f.truncate(size)


def test_data_only_layers_searched_in_order(tmp_path):
    """The data of a metacopy file is the first regular file at its absolute redirect in the data-only
    layers (a symlink on the way or a directory there does not count); a relative redirect met later in
    a metacopy lower replaces the last component. Until opened, such data's blocks are the kernel's
    estimate (the size in pages); the first open says the attributes changed."""
    meta, mid, d1, d2 = (str(tmp_path / n) for n in ("meta", "mid", "d1", "d2"))
    _metacopy_file(meta + "/hosts", 12, "/ab/cdef")
    _metacopy_file(meta + "/tool", 10, "/cd/0123")
    _metacopy_file(meta + "/dirdata", 6, "/ef/dir")
    _metacopy_file(meta + "/missing", 5, "/zz/none")
    _metacopy_file(meta + "/big", 1_000_000, "/ab/sparse")
    _metacopy_file(meta + "/chain", 7, "/x/a")
    _metacopy_file(meta + "/in_lower", 8, "/objects/low")
    _metacopy_file(meta + "/xnamed", 3, "/Xo/dX")
    _metacopy_file(meta + "/second", 3, "/ab/in2")
    _metacopy_file(meta + "/deep", 4, "/p/q/a")
    _metacopy_file(meta + "/top", 4, "/t")
    _metacopy_file(mid + "/x/a", 7, "b")  # a metadata-only lower (a lower that once was an upper)
    _metacopy_file(mid + "/p/q/a", 4, "b")
    _metacopy_file(mid + "/t", 4, "gone")
    _write(mid + "/objects/low", b"lowdata\n")
    _write(d1 + "/ab/cdef", b"127.0.0.1 x\n")
    _write(d1 + "/ab/sparse", size=1_000_000)
    os.makedirs(d1 + "/real")
    _write(d1 + "/real/0123", b"not this!\n")
    os.symlink("real", d1 + "/cd")
    os.makedirs(d1 + "/ef/dir")
    _write(d1 + "/x/b", b"chained")
    _write(d2 + "/cd/0123", b"tool data\n")
    _write(d2 + "/ef/dir", b"a file")
    _write(d2 + "/ab/cdef", b"shadowed by d1\n")
    _write(d1 + "/Xo/dX", b"xxx")
    _write(d1 + "/o/d", b"not")
    _write(d2 + "/ab/in2", b"two")  # d1 has the directory, not the file
    _write(d1 + "/p/q/b", b"deep")
    _write(d1 + "/p/b", b"not!")
    u = Union(check(parse_options([f"lowerdir={meta}:{mid}::{d1}::{d2},metacopy=on"])))

    def read(path):
        h = u.open(path, os.O_RDONLY)
        try:
            return u.read(h, 100, 0), h.attrs_changed
        finally:
            u.release(h)
    assert u.getattr("/big")["st_blocks"] == (1_000_000 + 4095) // 4096 * 8
    assert u.getattr("/hosts")["st_blocks"] == 8
    assert read("/hosts") == (b"127.0.0.1 x\n", True)
    assert read("/hosts") == (b"127.0.0.1 x\n", False)  # reached once: no change since
    assert read("/tool") == (b"tool data\n", True)
    assert read("/dirdata") == (b"a file", True)
    assert read("/chain") == (b"chained", True)
    assert read("/xnamed") == (b"xxx", True)
    assert read("/second") == (b"two", True)
    assert read("/deep") == (b"deep", True)  # "b" beside "/p/q/a"
    with pytest.raises(OSError) as e:
        u.open("/top", os.O_RDONLY)  # "gone" beside "/t", at the top of the data-only layers
    assert (e.value.errno, e.value.filename) == (errno.ENOENT, d1 + "/gone")
    assert read("/in_lower") == (b"lowdata\n", False)  # a normal lower: nothing to reach
    assert u.getattr("/in_lower")["st_blocks"] == os.lstat(mid + "/objects/low").st_blocks
    assert read("/big") == (bytes(100), True)
    assert u.getattr("/big")["st_blocks"] == 0 == os.lstat(d1 + "/ab/sparse").st_blocks
    assert u.getattr("/missing")["st_size"] == 5
    with pytest.raises(OSError) as e:
        u.open("/missing", os.O_RDONLY)
    assert (e.value.errno, e.value.filename) == (errno.ENOENT, d1 + "/zz/none")


def test_metacopy_without_an_absolute_redirect_never_reaches_data_only_layers(tmp_path):
    meta, d1 = str(tmp_path / "meta"), str(tmp_path / "d1")
    _metacopy_file(meta + "/rel", 4, "sib")
    _metacopy_file(meta + "/bad", 4, "a/b")  # a relative redirect is one name: refused
    _metacopy_file(meta + "/none", 4)
    _write(d1 + "/sib", b"data")
    _write(d1 + "/none", b"data")
    u = Union(check(parse_options([f"lowerdir={meta}::{d1},metacopy=on"])))
    for path in ("/rel", "/none"):
        with pytest.raises(OSError) as e:
            u.getattr(path)
        assert e.value.errno == errno.EIO, path
    with pytest.raises(OSError) as e:
        u.getattr("/bad")
    assert (e.value.errno, e.value.filename) == (errno.EINVAL, "/bad")


def _impure_dirs(upper):
    found = []
    for top, dirs, _ in os.walk(upper):
        for d in [top] + [os.path.join(top, x) for x in dirs]:
            try:
                if os.getxattr(d, TRUSTED + "impure") == b"y":
                    found.append(os.path.relpath(d, upper))
            except OSError:
                pass
    return sorted(set(found))


@pytest.mark.kernel
@pytest.mark.fuse
def test_impure_dirs_as_the_kernels_and_its_readdir_d_ino(shared_tmp):
    """Copy-up marks the upper parent "impure", and so does a rename of an object with an origin into
    another directory, on both; the kernel reading cowfs's upper then lists each entry with the
    d_ino its stat shows."""
    lower = os.path.join(shared_tmp, "lower")
    os.makedirs(lower + "/d")
    with open(lower + "/d/inner", "wb") as f:
        f.write(b"x\n")
    impure = {}
    for kind in ("kernel", "cowfs"):
        upper, work, mnt = _new_dirs(shared_tmp, f"{kind}-")
        m = _mounted(kind, lower, upper, work, mnt, ["redirect_dir=on"])
        try:
            os.makedirs(mnt + "/newdir/sub")
            os.chmod(mnt + "/d/inner", 0o600)
            os.rename(mnt + "/d/inner", mnt + "/newdir/inner")
            os.rename(mnt + "/newdir/sub", mnt + "/d/sub")
        finally:
            m.unmount()
        impure[kind] = _impure_dirs(upper)
    assert impure["cowfs"] == impure["kernel"] == [".", "d", "newdir"]
    m = _mounted("kernel", lower, upper, work, mnt, ["redirect_dir=on"])
    try:
        for d in ("", "d", "newdir"):
            for entry in os.scandir(os.path.join(mnt, d)):
                assert entry.inode() == os.lstat(entry.path).st_ino, entry.path
    finally:
        m.unmount()


@pytest.mark.kernel
@pytest.mark.fuse
def test_index_refusal_matches_the_kernels(shared_tmp):
    """An index=on upper mounted over other lower layers: the kernel refuses it (ESTALE, "failed to
    verify upper root origin"), and so does cowfs, in one line."""
    from cowfs.testing.mounts import MountError
    lower, upper, work = _layers(shared_tmp)
    other, mnt = os.path.join(shared_tmp, "other"), os.path.join(shared_tmp, "mnt")
    os.mkdir(other)
    os.mkdir(mnt)
    _mounted("cowfs", lower, upper, work, mnt, ["index=on"]).unmount()
    for kind in ("kernel", "cowfs"):
        with pytest.raises(MountError) as e:
            _mounted(kind, other, upper, work, mnt, ["index=on"])
        assert ("Stale file handle" if kind == "kernel" else "origin is not lowerdir") in str(e.value)
    _mounted("kernel", lower, upper, work, mnt, ["index=on"]).unmount()  # its own lower: both mount it
    _mounted("cowfs", lower, upper, work, mnt, ["index=on"]).unmount()


def test_an_indexed_copy_mounted_without_index_shows_its_own_number(tmp_path):
    """As the kernel with index=off: the origin of a lower hard link is not used (the copy may be one of
    several broken apart), so the upper's own number shows."""
    lower, upper, work = _layers(tmp_path)
    u = _union(lower, upper, work, "index=on")
    try:
        u.chmod("/hl1", 0o600)
        assert u.getattr("/hl1")["st_ino"] == os.lstat(lower + "/hl1").st_ino
    finally:
        u.close()
    u = _union(lower, upper, work)
    try:
        assert u.getattr("/hl1")["st_ino"] == os.lstat(upper + "/hl1").st_ino
    finally:
        u.close()


# -- uuid=: the UUID origins carry, the overlay's own -------------------------------------------

UUID_VALUES = ("on", "off", "null", "auto")
FAKE_UUID = bytes(range(1, 17))


def _origin_uuid(path, prefix=TRUSTED):
    return handles.decode(os.getxattr(path, prefix + "origin"))[2]


def _has_uuid(path, prefix=TRUSTED):
    try:
        return len(os.getxattr(path, prefix + "uuid")) == 16
    except OSError as e:
        assert e.errno == errno.ENODATA
        return False


@pytest.mark.parametrize("value", UUID_VALUES)
def test_uuid_in_origins_and_on_the_upper_root(tmp_path, monkeypatch, value):
    """On one filesystem (of a non-null UUID here): uuid=off writes the null UUID into origins, every
    other value the filesystem's; on and auto (a new upper) store the overlay's UUID on the upper root,
    and keep it over later mounts."""
    monkeypatch.setattr(handles, "fs_uuid", lambda path: FAKE_UUID)
    lower, upper, work = _layers(tmp_path)
    u = _union(lower, upper, work, f"uuid={value}")
    try:
        u.chmod("/single", 0o600)
        assert u.getattr("/single")["st_ino"] == os.lstat(lower + "/single").st_ino
    finally:
        u.close()
    assert _origin_uuid(upper + "/single") == (handles.NULL_UUID if value == "off" else FAKE_UUID)
    assert _has_uuid(upper) == (value in ("on", "auto"))
    if value in ("on", "auto"):
        kept = os.getxattr(upper, TRUSTED + "uuid")
        _union(lower, upper, work, f"uuid={value}").close()
        assert os.getxattr(upper, TRUSTED + "uuid") == kept


def test_uuid_auto_on_an_upper_used_before_stays_null(tmp_path):
    """uuid=auto on an upper whose root is impure (mounted before, without a UUID): no UUID is stored;
    uuid=on stores one."""
    lower, upper, work = _layers(tmp_path)
    u = _union(lower, upper, work, "uuid=null")
    u.chmod("/single", 0o600)
    u.close()
    assert os.getxattr(upper, TRUSTED + "impure") == b"y" and not _has_uuid(upper)
    u = _union(lower, upper, work)
    assert u.layers.filesystems.uuid_mode == "null"
    u.close()
    assert not _has_uuid(upper)
    _union(lower, upper, work, "uuid=on").close()
    assert _has_uuid(upper)


def test_a_bad_overlay_uuid_means_uuid_null_with_a_warning(tmp_path):
    lower, upper, work = _layers(tmp_path)
    os.setxattr(upper, TRUSTED + "uuid", b"12345678")
    u = _union(lower, upper, work, "uuid=on")
    try:
        assert u.layers.filesystems.uuid_mode == "null"
        assert u.warnings == [f"upperdir {upper}: cannot get the overlay's uuid (8 bytes, not 16); going on "
                              "with uuid=null"]
    finally:
        u.close()
    assert os.getxattr(upper, TRUSTED + "uuid") == b"12345678"  # left as it is, as the kernel


def _settled(layers, value):
    """settle_uuid over a stack of `_layers` with uuid=VALUE: (its answer, the mode the mount goes on with, its
    warnings)."""
    lower, upper, work = layers
    fs = Filesystems(check(Stack(lowers=[lower], upper=upper, work=work, uuid=value)))
    return settle_uuid(fs, upper, TRUSTED), fs.uuid_mode, fs.warnings


@pytest.mark.parametrize("value", ["on", "auto"])
def test_the_overlay_uuid_made_then_read_back(tmp_path, value):
    """uuid=on, or auto on a new upper: a random UUID is made and stored on the upper root, and the mount goes
    on as uuid=on; a later mount reads the same one back."""
    layers = _layers(tmp_path)
    made, mode, warnings = _settled(layers, value)
    assert (len(made), mode, warnings) == (16, "on", [])
    assert os.getxattr(layers[1], TRUSTED + "uuid") == made
    assert _settled(layers, value) == (made, value, [])
    assert _settled(layers, "null") == (None, "null", [])  # null: none, whatever the upper holds


@pytest.mark.parametrize("failing, value, action", [
    ("uuid", "on", "get"), ("uuid", "auto", "get"), ("impure", "auto", "get"), ("set", "on", "set"),
])
def test_an_overlay_uuid_that_cannot_be_read_or_stored(tmp_path, monkeypatch, failing, value, action):
    """Reading the stored UUID (or, for auto, whether the upper was used before) or storing a new one fails
    otherwise than with ENODATA: uuid=null, with one line naming the upper, what failed and why."""
    layers = _layers(tmp_path)
    upper = layers[1]
    real_getxattr, real_setxattr = os.getxattr, os.setxattr

    def getxattr(path, name, *args, **kwargs):
        if name == TRUSTED + failing:
            raise OSError(errno.EACCES, os.strerror(errno.EACCES), path)
        return real_getxattr(path, name, *args, **kwargs)

    def setxattr(path, name, *args, **kwargs):
        if failing == "set" and name == TRUSTED + "uuid":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
        return real_setxattr(path, name, *args, **kwargs)

    monkeypatch.setattr(os, "getxattr", getxattr)
    monkeypatch.setattr(os, "setxattr", setxattr)
    reason = os.strerror(errno.ENOSPC if failing == "set" else errno.EACCES)
    assert _settled(layers, value) == (None, "null", [
        f"upperdir {upper}: cannot {action} the overlay's uuid ({reason}); going on with uuid=null"])
    monkeypatch.undo()
    with pytest.raises(OSError) as e:
        os.getxattr(upper, TRUSTED + "uuid")
    assert e.value.errno == errno.ENODATA


@pytest.mark.parametrize("written,read,followed", [
    ("off", "off", True), ("off", "null", False), ("off", "on", False),
    ("on", "off", False), ("on", "null", True), ("null", "auto", True),
])
def test_uuid_decides_which_origins_are_followed(tmp_path, monkeypatch, written, read, followed):
    """An origin is followed only if it carries the UUID the mount expects: the filesystem's, or the null
    UUID with uuid=off; otherwise the copy shows its own number (and index=on refuses the upper)."""
    monkeypatch.setattr(handles, "fs_uuid", lambda path: FAKE_UUID)
    lower, upper, work = _layers(tmp_path)
    u = _union(lower, upper, work, f"uuid={written}", "index=on")
    u.chmod("/single", 0o600)
    u.close()
    u = _union(lower, upper, work, f"uuid={read}")
    try:
        shown = u.getattr("/single")["st_ino"]
    finally:
        u.close()
    assert shown == os.lstat((lower if followed else upper) + "/single").st_ino
    if followed:
        _union(lower, upper, work, f"uuid={read}", "index=on").close()
    else:
        with pytest.raises(StackError, match="origin is not lowerdir"):
            _union(lower, upper, work, f"uuid={read}", "index=on")


# -- index=on with metacopy=on: a lower hard link copied up metadata only, into the index -------------

def test_index_with_metacopy_copies_metadata_only(tmp_path):
    """A change of metadata copies a lower hard link into the index without its data (as the kernel's);
    the other name shows that inode and reads the lower data; a write through it fills the same inode."""
    lower, upper, work = _layers(tmp_path)
    u = _union(lower, upper, work, "index=on", "metacopy=on", "redirect_dir=on")
    try:
        u.chmod("/hl1", 0o600)
        entry = work + "/index/" + os.getxattr(upper + "/hl1", TRUSTED + "origin").hex()
        assert os.path.samestat(os.lstat(entry), os.lstat(upper + "/hl1"))
        assert os.getxattr(entry, TRUSTED + "metacopy") == b"" and os.lstat(entry).st_size == 7
        fd = os.open(entry, os.O_RDONLY)
        try:
            with pytest.raises(OSError) as e:
                os.lseek(fd, 0, os.SEEK_DATA)  # no data of its own: all hole
            assert e.value.errno == errno.ENXIO
        finally:
            os.close(fd)
        assert os.getxattr(entry, TRUSTED + "nlink") == b"U+0"
        assert u.getattr("/hl2")["st_mode"] & 0o777 == 0o600 and u.getattr("/hl2")["st_nlink"] == 2
        h = u.open("/hl2", os.O_RDONLY)
        assert u.read(h, 100, 0) == b"linked\n"  # the data is still the lower file's
        u.release(h)
        h = u.open("/hl2", os.O_WRONLY | os.O_APPEND)  # the name is linked up, then the data comes in place
        u.write(h, b"more\n", 0)
        u.release(h)
        assert os.path.samestat(os.lstat(entry), os.lstat(upper + "/hl2"))
        assert TRUSTED + "metacopy" not in os.listxattr(entry)
        assert os.getxattr(entry, TRUSTED + "nlink") == b"U-1"  # three upper links, two names
        for name in ("/hl1", "/hl2"):
            h = u.open(name, os.O_RDONLY)
            assert u.read(h, 100, 0) == b"linked\nmore\n"
            u.release(h)
        with open(lower + "/hl1", "rb") as f:
            assert f.read() == b"linked\n"  # the lower stays as it was
    finally:
        u.close()


def test_index_metacopy_entry_without_metacopy_refused(tmp_path):
    """Mounted without metacopy=on, a metadata-only index entry is refused (EPERM) by every name, as the
    kernel refuses to follow its origin."""
    lower, upper, work = _layers(tmp_path)
    u = _union(lower, upper, work, "index=on", "metacopy=on", "redirect_dir=on")
    try:
        u.chmod("/hl1", 0o600)
    finally:
        u.close()
    u = _union(lower, upper, work, "index=on", "redirect_dir=on")
    try:
        for name in ("/hl1", "/hl2"):
            with pytest.raises(OSError) as e:
                u.getattr(name)
            assert (e.value.errno, e.value.filename) == (errno.EPERM, name)
        assert u.getattr("/single")["st_nlink"] == 1
    finally:
        u.close()


INDEX_METACOPY = ("index=on", "metacopy=on", "redirect_dir=on")


def _outcome(fn, *args):
    try:
        return fn(*args)
    except OSError as e:
        return errno.errorcode[e.errno]


@pytest.mark.kernel
@pytest.mark.fuse
def test_uuid_off_on_several_filesystems_is_null(shared_tmp):
    """uuid=off needs every layer on the upper's filesystem: with the lower on a tmpfs it is uuid=null, on
    the kernel (a warning in its log) and on cowfs (a warning at mount): origins carry the tmpfs's UUID."""
    with scratch_filesystem(os.path.join(shared_tmp, "fs")) as fs:
        lower = _layers(fs)[0]
        uppers = {}
        for kind in ("kernel", "cowfs"):
            upper, work, mnt = _new_dirs(shared_tmp, f"{kind}-")
            m = _mounted(kind, lower, upper, work, mnt, ["uuid=off"] + (["index=off"] if kind == "kernel" else []))
            try:
                _change_through(mnt)
            finally:
                m.unmount()
            uppers[kind] = upper_snapshot(upper, userxattr=False, origins=True)
        assert uppers["cowfs"] == uppers["kernel"]
        carried = handles.fs_uuid(fs)
        assert carried != handles.NULL_UUID
        shown = uppers["kernel"]["entries"]["single"]["xattrs"][TRUSTED + "origin"]
        assert shown == f"<origin on uuid {carried.hex()}>"


def _change_through(mnt):
    """A copy-up of a file, of a directory and a file in it, and a new directory."""
    for name in ("single", "d/inner"):
        os.chmod(os.path.join(mnt, name), 0o640)
    os.mkdir(os.path.join(mnt, "new"))


@pytest.mark.kernel
@pytest.mark.fuse
@pytest.mark.parametrize("writer,reader", [("kernel", "cowfs"), ("cowfs", "kernel")])
def test_index_metacopy_over_the_others_upper(shared_tmp, writer, reader):
    """One side copies lower hard links up metadata only into the index (a change of mode, a rename); the
    other, over that upper and workdir, shows the same files and brings their data up through another name;
    the first reads that back. Then both, mounted without metacopy=on, refuse the same names alike."""
    lower, upper, work = _layers(shared_tmp)
    os.link(lower + "/single", lower + "/d/third")  # a second group: single, d/third
    mnt = os.path.join(shared_tmp, "mnt")
    os.mkdir(mnt)

    def view():
        names = ("hl1", "hl2", "moved", "d/third", "d/inner")
        return {n: (_outcome(lambda p: oct(os.lstat(p).st_mode), os.path.join(mnt, n)),
                    _outcome(lambda p: os.lstat(p).st_nlink, os.path.join(mnt, n)),
                    _outcome(lambda p: open(p, "rb").read(), os.path.join(mnt, n))) for n in names}

    m = _mounted(writer, lower, upper, work, mnt, ["index=off", *INDEX_METACOPY] if writer == "kernel"
                 else INDEX_METACOPY)
    try:
        os.chmod(os.path.join(mnt, "hl1"), 0o600)
        os.rename(os.path.join(mnt, "single"), os.path.join(mnt, "moved"))
        written = view()
    finally:
        m.unmount()
    assert TRUSTED + "metacopy" in os.listxattr(upper + "/hl1")
    assert TRUSTED + "metacopy" in os.listxattr(upper + "/moved")
    m = _mounted(reader, lower, upper, work, mnt, ["index=off", *INDEX_METACOPY] if reader == "kernel"
                 else INDEX_METACOPY)
    try:
        assert view() == written
        with open(os.path.join(mnt, "hl2"), "ab") as f:
            f.write(b"via hl2\n")
        with open(os.path.join(mnt, "d/third"), "ab") as f:
            f.write(b"via third\n")
        changed = view()
    finally:
        m.unmount()
    assert changed["hl1"][2] == b"linked\nvia hl2\n" and changed["moved"][2] == b"one name\nvia third\n"
    m = _mounted(writer, lower, upper, work, mnt, ["index=off", *INDEX_METACOPY] if writer == "kernel"
                 else INDEX_METACOPY)
    try:
        assert view() == changed
    finally:
        m.unmount()
    for name in os.listdir(work + "/index"):
        assert TRUSTED + "metacopy" not in os.listxattr(work + "/index/" + name)


@pytest.mark.kernel
@pytest.mark.fuse
@pytest.mark.parametrize("uuid,userxattr", [(value, False) for value in UUID_VALUES] + [("auto", True), ("off", True)])
def test_upper_with_each_uuid_value_as_the_kernels(shared_tmp, uuid, userxattr):
    """The same changes through the kernel and cowfs, each with uuid=VALUE, every layer on a tmpfs (a
    UUID that is not null): the uppers are the same on disk, with the overlay's UUID on the root or not
    (`user.overlay.uuid` under userxattr), and the same filesystem UUID in each origin (compared, as the
    snapshot's `origins` keeps it)."""
    prefix = "user.overlay." if userxattr else TRUSTED
    options = [f"uuid={uuid}"] + (["userxattr"] if userxattr else [])
    with scratch_filesystem(os.path.join(shared_tmp, "fs")) as fs:
        lower = _layers(fs)[0]
        uppers, fsids = {}, {}
        for kind in ("kernel", "cowfs"):
            upper, work, mnt = _new_dirs(fs, f"{kind}-")
            m = _mounted(kind, lower, upper, work, mnt, options + (["index=off"] if kind == "kernel" else []))
            try:
                _change_through(mnt)
                fsids[kind] = os.statvfs(mnt).f_fsid
            finally:
                m.unmount()
            uppers[kind] = upper_snapshot(upper, userxattr=userxattr, origins=True)
        assert uppers["cowfs"] == uppers["kernel"]
        # The kernel's fsid: from the overlay's UUID, or the upper's filesystem's. FUSE's statfs reply has none.
        assert fsids["kernel"] != 0 and fsids["cowfs"] == 0
        entries = uppers["kernel"]["entries"]
        carried = (handles.NULL_UUID if uuid == "off" else handles.fs_uuid(fs)).hex()
        assert entries["single"]["xattrs"][prefix + "origin"] == f"<origin on uuid {carried}>"
        assert (prefix + "uuid" in entries["."].get("xattrs", {})) == (uuid in ("on", "auto"))


@pytest.mark.kernel
@pytest.mark.fuse
@pytest.mark.parametrize("written,read", [("on", "off"), ("off", "null"), ("off", "on"), ("null", "off")])
def test_an_upper_mounted_with_another_uuid_value_as_the_kernel(shared_tmp, written, read):
    """An upper made with one uuid= value, mounted with another by the kernel, then by cowfs: the same
    numbers (an origin of the wrong UUID is not followed: the copy's own number), and with index=on
    both refuse it or both mount it."""
    with scratch_filesystem(os.path.join(shared_tmp, "fs")) as fs:
        lower, upper, work = _layers(fs)
        mnt = os.path.join(fs, "mnt")
        os.mkdir(mnt)
        _mounted("kernel", lower, upper, work, mnt, [f"uuid={written}", "index=on"]).unmount()
        m = _mounted("kernel", lower, upper, work, mnt, [f"uuid={written}", "index=off"])
        try:
            _change_through(mnt)
        finally:
            m.unmount()
        shown = {}
        for kind in ("kernel", "cowfs"):
            m = _mounted(kind, lower, upper, work, mnt, [f"uuid={read}"] + (["index=off"] if kind == "kernel" else []))
            try:
                shown[kind] = _inos(mnt, ("single", "d", "d/inner"))
            finally:
                m.unmount()
        assert shown["cowfs"] == shown["kernel"]
        followed = (written == "off") == (read == "off")
        assert shown["kernel"]["single"] == os.lstat((lower if followed else upper) + "/single").st_ino
        refused = {}
        for kind in ("kernel", "cowfs"):
            try:
                _mounted(kind, lower, upper, work, mnt, [f"uuid={read}", "index=on"]).unmount()
                refused[kind] = False
            except MountError:
                refused[kind] = True
        assert refused == {"kernel": not followed, "cowfs": not followed}


@pytest.mark.kernel
@pytest.mark.fuse
def test_a_lower_filesystem_given_another_uuid(shared_tmp):
    """The lower's filesystem (an ext4 image) gets another UUID between mounts, its inodes unchanged:
    origins written before are not followed, by the kernel nor by cowfs (the copies show their own
    numbers), and index=on refuses the upper (the kernel: ESTALE)."""
    with scratch_filesystem(os.path.join(shared_tmp, "img"), uuid="11111111-2222-3333-4444-555555555555") as img:
        lower = _layers(img)[0]
        uppers = {}
        for name in ("plain", "indexed"):
            upper, work, mnt = _new_dirs(shared_tmp, f"{name}-")
            m = _mounted("kernel", lower, upper, work, mnt, ["index=on" if name == "indexed" else "index=off"])
            try:
                _change_through(mnt)
            finally:
                m.unmount()
            uppers[name] = (upper, work, mnt)
            assert _origin_uuid(upper + "/single") == bytes.fromhex("11111111222233334444555555555555")
        shown = {}
        for when in ("before", "after"):
            if when == "after":
                set_image_uuid(img, "99999999-2222-3333-4444-555555555555")
            for kind in ("kernel", "cowfs"):  # xino: numbers of the two filesystems told apart alike
                m = _mounted(kind, lower, *uppers["plain"], ["xino=auto"] + (["index=off"] if kind == "kernel" else []))
                try:
                    shown[when, kind] = _inos(m.mountpoint, ("single", "d"))
                finally:
                    m.unmount()
            assert shown[when, "cowfs"] == shown[when, "kernel"], when
        own = os.lstat(uppers["plain"][0] + "/single").st_ino
        assert shown["before", "kernel"]["single"] != own == shown["after", "kernel"]["single"]
        for kind in ("kernel", "cowfs"):
            with pytest.raises(MountError, match="Stale file handle" if kind == "kernel" else "origin is not lowerdir"):
                _mounted(kind, lower, *uppers["indexed"], ["index=on"])


@pytest.mark.kernel
@pytest.mark.fuse
@pytest.mark.parametrize("options", [(), ("redirect_dir=on", "xino=auto"), ("xino=on",)],
                         ids=["default", "redirect", "xino"])
def test_a_lower_filesystem_of_null_uuid(shared_tmp, options):
    """A lower on another filesystem than the upper, whose UUID is null (an ext4 image made so): as the
    kernel, origins into it are not followed unless the stack uses a feature that forbids changing
    lowers offline (redirect_dir=on, xino=on, ...); the copy shows the same number on both (given
    xino: the kernel's default on this machine is xino=off, whose per-layer st_dev FUSE cannot show)."""
    with scratch_filesystem(os.path.join(shared_tmp, "img"), uuid="clear") as img:
        lower = _layers(img)[0]
        assert handles.fs_uuid(lower) == handles.NULL_UUID
        upper, work, mnt = _new_dirs(shared_tmp, "")
        m = _mounted("kernel", lower, upper, work, mnt, ["index=off", *options])
        try:
            os.chmod(mnt + "/single", 0o600)
        finally:
            m.unmount()
        shown = {}
        for kind in ("kernel", "cowfs"):
            m = _mounted(kind, lower, upper, work, mnt, list(options) + (["index=off"] if kind == "kernel" else []))
            try:
                shown[kind] = os.lstat(mnt + "/single").st_ino
            finally:
                m.unmount()
        assert shown["cowfs"] == shown["kernel"]
        own = os.lstat(upper + "/single").st_ino
        assert (shown["kernel"] == own) == (options == ())


@pytest.mark.kernel
@pytest.mark.fuse
def test_two_lower_filesystems_of_one_uuid(shared_tmp):
    """Two lowers on two ext4 images of the same UUID: neither can be told by its UUID, so, as the kernel,
    index=on goes on as index=off and no origin into them is followed (the copies show their own numbers)."""
    same = "12121212-3434-5656-7878-909090909090"
    with scratch_filesystem(os.path.join(shared_tmp, "a"), uuid=same) as a, \
            scratch_filesystem(os.path.join(shared_tmp, "b"), uuid=same) as b:
        lower = _layers(a)[0]
        other = os.path.join(b, "lower")
        os.mkdir(other)
        shown = {}
        for kind in ("kernel", "cowfs"):
            upper, work, mnt = _new_dirs(shared_tmp, f"{kind}-")
            m = KernelOverlay if kind == "kernel" else CowfsMount
            for _ in range(2):  # the copy-up, then a fresh mount that reads its origins
                mount = m([lower, other], upper, work, mnt, ["index=on"])
                mount.mount()
                try:
                    os.chmod(mnt + "/single", 0o600)
                    os.chmod(mnt + "/hl1", 0o600)
                    inos = _inos(mnt, ("single", "hl1"))
                finally:
                    mount.unmount()
            shown[kind] = (inos, _inos(upper, ("single", "hl1")), os.path.exists(work + "/index"))
        for kind, (inos, own, indexed) in shown.items():
            assert inos == own and not indexed, kind


@pytest.mark.kernel
@pytest.mark.fuse
@pytest.mark.parametrize("writer", ["kernel", "cowfs"])
def test_metacopy_upper_read_without_metacopy_as_the_kernel(shared_tmp, writer):
    """An index=on upper with metadata-only copies, mounted with metacopy=off: the names of an indexed
    metadata-only file fail with EPERM, a merged impure directory leaves its own such files out of its
    listing, and the listing of an impure upper-only directory that holds one fails with EPERM."""
    lower, upper, work = _layers(shared_tmp)
    mnt = os.path.join(shared_tmp, "mnt")
    os.mkdir(mnt)
    m = _mounted(writer, lower, upper, work, mnt, ["index=off", *INDEX_METACOPY] if writer == "kernel"
                 else INDEX_METACOPY)
    try:
        os.chmod(os.path.join(mnt, "hl1"), 0o600)
        os.chmod(os.path.join(mnt, "d/inner"), 0o600)
        os.mkdir(os.path.join(mnt, "new"))
        os.rename(os.path.join(mnt, "single"), os.path.join(mnt, "new/single"))
    finally:
        m.unmount()
    seen = {}
    for kind in ("kernel", "cowfs"):
        options = ["index=on", "metacopy=off", "redirect_dir=on"]
        m = _mounted(kind, lower, upper, work, mnt, ["index=off", *options] if kind == "kernel" else options)
        try:
            seen[kind] = {
                "listings": [_outcome(lambda p: sorted(os.listdir(p)), os.path.join(mnt, d)) for d in ("", "d", "new")],
                "stats": [_outcome(lambda p: oct(os.lstat(p).st_mode), os.path.join(mnt, n))
                          for n in ("hl1", "hl2", "d/inner", "new/single", "new")],
            }
        finally:
            m.unmount()
    assert seen["cowfs"] == seen["kernel"]
    assert seen["kernel"]["stats"][:2] == ["EPERM", "EPERM"]


@pytest.mark.parametrize("metacopy", [(), ("metacopy=on",)], ids=["full", "metacopy"])
def test_index_handle_on_a_lower_name_follows_the_copy_up(tmp_path, metacopy):
    """A descriptor opened on a name of a lower hard link, whose data another name then copies up (its own
    name still the lower's, shown through the index), reads the copy, as the kernel's (one inode)."""
    lower, upper, work = _layers(tmp_path)
    u = _union(lower, upper, work, "index=on", "redirect_dir=on", *metacopy)
    try:
        u.chmod("/hl1", 0o600)
        reader = u.open("/hl2", os.O_RDONLY)
        h = u.open("/hl1", os.O_WRONLY | os.O_APPEND)
        u.write(h, b"more\n", 0)
        u.release(h)
        assert not os.path.lexists(upper + "/hl2")  # hl2 is still a lower name
        assert u.read(reader, 100, 0, "/hl2") == b"linked\nmore\n"
        u.release(reader)
    finally:
        u.close()
