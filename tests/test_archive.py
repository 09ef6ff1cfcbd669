"""The layer archive code's small parts in-process (cowfs.images.archive): the readers and writers an
unpack and a save stream through, the member-name check, the progress lines and the error message.

tests/test_images.py unpacks and writes whole layers; these pin what each part promises, so that a
change no layer happens to show (a tail kept too short, a read past the peeked bytes) is caught here.
"""

import errno
import gzip
import hashlib
import io
import os
import shutil
import signal
import stat
import struct
import subprocess
import sys
import tarfile
import threading
import types

import pytest

from cowfs.images import archive
from cowfs.images.archive import (
    ArchiveError,
    HashingReader,
    HashingWriter,
    Progress,
    ProgressFile,
    decompressed,
    normalise_name,
    unpack_layer,
)

DATA = bytes(range(256)) * 40  # 10240 bytes, no run of equal bytes


class Reads(io.BytesIO):
    """A BytesIO that records the size of every read asked of it."""

    def __init__(self, data):
        super().__init__(data)
        self.asked = []

    def read(self, n=-1):
        self.asked.append(n)
        return super().read(n)


# ---------------------------------------------------------------------------------------------
# the error

def test_archive_error_names_the_archive_and_the_member():
    e = ArchiveError("img.tar", "'..' in a member name", "a/../b")
    assert str(e) == "img.tar: member 'a/../b': '..' in a member name"
    assert (e.archive, e.reason, e.member) == ("img.tar", "'..' in a member name", "a/../b")
    e = ArchiveError("img.tar", "truncated archive")
    assert str(e) == "img.tar: truncated archive"
    assert e.member is None
    assert str(ArchiveError("img.tar", "bad", "")) == "img.tar: member '': bad"  # an empty name is still named


# ---------------------------------------------------------------------------------------------
# member names

@pytest.mark.parametrize("name,rel", [
    ("a", "a"), ("./a/b", "a/b"), ("a//b/", "a/b"), ("./", ""), (".", ""), ("a/./b/.", "a/b"), ("..a/b..", "..a/b.."),
])
def test_normalise_name(name, rel):
    assert normalise_name(name, "x.tar") == rel


@pytest.mark.parametrize("name,reason", [
    ("/etc/passwd", "absolute path in a layer"),
    ("a/../../b", "'..' in a member name"),
    ("..", "'..' in a member name"),
    ("a/b\0c", "NUL byte in a member name"),
])
def test_normalise_name_refuses(name, reason):
    with pytest.raises(ArchiveError) as e:
        normalise_name(name, "x.tar")
    assert (e.value.archive, e.value.reason, e.value.member) == ("x.tar", reason, name)


# ---------------------------------------------------------------------------------------------
# reading: hashing, peeking, decompressing

def test_hashing_reader_counts_hashes_and_keeps_the_tail():
    r = HashingReader(io.BytesIO(DATA))
    assert r.read(700) == DATA[:700]
    assert r.tail == DATA[:700]
    assert r.read(700) == DATA[700:1400]
    assert r.tail == DATA[1400 - 1024:1400]  # the last 1024 bytes, across reads
    assert r.count == 1400
    r.drain()
    assert r.count == len(DATA)
    assert r.tail == DATA[-1024:]
    assert r.read(10) == b""
    assert r.count == len(DATA) and r.tail == DATA[-1024:]
    assert r.digest == "sha256:" + hashlib.sha256(DATA).hexdigest()


def test_hashing_reader_drains_in_chunks(monkeypatch):
    monkeypatch.setattr(archive, "CHUNK", 4096)
    f = Reads(DATA)
    r = HashingReader(f)
    r.drain()
    assert f.asked == [4096, 4096, 4096, 4096]
    assert r.count == len(DATA)


def test_hashing_reader_of_nothing():
    r = HashingReader(io.BytesIO(b""))
    assert r.read() == b""
    assert (r.count, r.tail) == (0, b"")
    assert r.digest == "sha256:" + hashlib.sha256(b"").hexdigest()


def test_hashing_writer():
    out = io.BytesIO()
    w = HashingWriter(out)
    assert w.write(b"abc") == 3
    assert w.write(b"") == 0
    assert w.write(b"de") == 2
    w.flush()
    assert out.getvalue() == b"abcde"
    assert w.count == w.tell() == 5
    assert w.digest == "sha256:" + hashlib.sha256(b"abcde").hexdigest()
    nowhere = HashingWriter()
    assert nowhere.write(b"abcde") == 5
    nowhere.flush()
    assert nowhere.tell() == 5 and nowhere.digest == w.digest


def test_hashing_writer_flushes_its_file():
    class Flushed(io.BytesIO):
        flushes = 0

        def flush(self):
            self.flushes += 1
    out = Flushed()
    HashingWriter(out).flush()
    assert out.flushes == 1


def test_prefixed_gives_the_head_back_first():
    rest = Reads(b"6789")
    p = archive._Prefixed(b"012345", rest)
    assert p.read(2) == b"01"
    assert rest.asked == []  # served from the head alone
    assert p.read(6) == b"234567"  # the head's end, then the rest
    assert rest.asked == [2]
    assert p.read(1) == b"8"
    assert p.read(-1) == b"9"
    assert p.read(5) == b""


@pytest.mark.parametrize("n", [-1, None])
def test_prefixed_reads_all(n):
    p = archive._Prefixed(b"0123", io.BytesIO(b"456"))
    assert p.read(n) == b"0123456"
    assert p.read(n) == b""


@pytest.mark.parametrize("n,first,then", [(4, b"0123", b"45"), (0, b"", b"012345")])
def test_prefixed_read_of_exactly_the_head_or_of_nothing(n, first, then):
    """Neither asks the rest for anything; nothing read keeps the head for later."""
    rest = Reads(b"45")
    p = archive._Prefixed(b"0123", rest)
    assert p.read(n) == first
    assert rest.asked == []
    assert p.read() == then


def test_decompressed_plain():
    f = decompressed(io.BytesIO(DATA), "x.tar")
    assert f.read() == DATA
    assert decompressed(io.BytesIO(b"ab"), "x.tar").read() == b"ab"  # shorter than any magic


def test_decompressed_gzip():
    f = decompressed(io.BytesIO(gzip.compress(DATA)), "x.tar.gz")
    assert f.read() == DATA


def zstd_compress(data):
    assert shutil.which("zstd"), "make venv installs the zstd package; the test needs its command"
    return subprocess.run(["zstd", "-q", "-c"], input=data, stdout=subprocess.PIPE, check=True).stdout


def test_decompressed_zstd_by_the_command(monkeypatch):
    """Without the zstandard module, the zstd command decompresses, fed from a thread."""
    monkeypatch.setitem(sys.modules, "zstandard", None)  # import zstandard fails

    class Compressed(io.BytesIO):
        asked = []

        def read(self, n=-1):
            self.asked.append(n)
            return super().read(n)

    f = decompressed(Compressed(zstd_compress(DATA) * 2), "x.tar.zst")  # two frames: both are read
    assert isinstance(f, archive._ZstdProcess)
    got = b""
    while chunk := f.read(3000):
        got += chunk
    assert got == DATA * 2
    assert f.read(10) == b""
    f.close()
    assert f.proc.returncode == 0
    # the blob is fed in pieces, never read whole into memory
    assert Compressed.asked and all(0 < n <= archive.CHUNK for n in Compressed.asked)


def test_zstd_command_failure_is_an_eof_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "zstandard", None)
    f = decompressed(io.BytesIO(zstd_compress(DATA)[:-8] + b"garbage!"), "x.tar.zst")
    with pytest.raises(EOFError) as e:
        while f.read(4096):
            pass
    assert str(e.value).startswith("zstd: ")
    assert len(str(e.value)) > len("zstd: ")  # the command's own message
    f.close()


def test_zstd_command_closed_early(monkeypatch):
    """A reader that stops early ends the command at once (killed: it may be waiting for input that is slow
    to come), and the feeding thread."""
    monkeypatch.setitem(sys.modules, "zstandard", None)
    data = os.urandom(4 << 20)
    f = decompressed(io.BytesIO(zstd_compress(data)), "x.tar.zst")
    assert f.read(10) == data[:10]  # the command is now blocked writing more than a pipe holds
    closer = threading.Thread(target=f.close)
    closer.start()
    closer.join(30)
    if closer.is_alive():
        f.proc.kill()
        closer.join()
        pytest.fail("close() waited for a zstd command that was still running")
    assert f.proc.returncode == -signal.SIGKILL
    assert not f.thread.is_alive()


def test_zstd_available(monkeypatch):
    monkeypatch.setitem(sys.modules, "zstandard", None)
    assert archive.zstd_available() is bool(shutil.which("zstd")) is True  # make venv installs the command
    monkeypatch.setitem(sys.modules, "zstandard", types.ModuleType("zstandard"))
    monkeypatch.setattr(archive.shutil, "which", lambda name: None)
    assert archive.zstd_available() is True  # the module alone will do


def test_zstd_missing_altogether(monkeypatch):
    monkeypatch.setitem(sys.modules, "zstandard", None)
    monkeypatch.setattr(archive.shutil, "which", lambda name: None)
    with pytest.raises(ArchiveError) as e:
        decompressed(io.BytesIO(archive.ZSTD_MAGIC + b"\0" * 20), "x.tar.zst")
    assert str(e.value) == ("x.tar.zst: zstd-compressed, and neither the zstandard module nor the zstd command "
                            "is installed")
    assert archive.zstd_available() is False


# ---------------------------------------------------------------------------------------------
# progress

class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


@pytest.fixture
def clock(monkeypatch):
    c = Clock()
    monkeypatch.setattr(archive.time, "monotonic", c)
    return c


def test_progress_a_line_a_second(clock):
    out = io.StringIO()
    p = Progress("unpacking", total=3_000_000, stream=out)
    assert p.interval == Progress.INTERVAL == 1.0
    clock.now += 0.99
    p.update(1_000_000)
    assert out.getvalue() == ""  # too soon
    clock.now += 0.01
    p.update(1_500_000)
    assert out.getvalue() == "cowfs: unpacking: 1.5MB of 3MB (50%)\n"
    clock.now += 0.5
    p.update(2_000_000)
    assert out.getvalue().count("\n") == 1  # a second since the last line, not since the start
    clock.now += 0.5
    p.update(2_999_999)
    assert out.getvalue().splitlines()[-1] == "cowfs: unpacking: 3MB of 3MB (99%)"
    clock.now = 102.5
    p.finish(3_000_000)
    assert out.getvalue().splitlines()[-1] == "cowfs: unpacking: 3MB in 2.50 s"


def test_progress_without_a_total(clock):
    out = io.StringIO()
    p = Progress("reading", stream=out)
    clock.now += 2
    p.update(42)
    assert out.getvalue() == "cowfs: reading: 42B\n"


def test_progress_of_a_one_byte_total(clock):
    out = io.StringIO()
    p = Progress("reading", total=1, stream=out)
    clock.now += 1
    p.update(1)
    assert out.getvalue() == "cowfs: reading: 1B of 1B (100%)\n"


def test_progress_lines_are_flushed(clock):
    """stderr may be a pipe, block-buffered: each line goes out when it is printed."""
    class Stream(io.StringIO):
        flushed = ""

        def flush(self):
            self.flushed = self.getvalue()
    out = Stream()
    p = Progress("reading", total=10, stream=out)
    clock.now += 1
    p.update(5)
    assert out.flushed == "cowfs: reading: 5B of 10B (50%)\n"
    p.finish(10)
    assert out.flushed.endswith("cowfs: reading: 10B in 1.00 s\n")


def test_progress_silent_for_a_short_read(clock):
    out = io.StringIO()
    p = Progress("reading", total=10, stream=out)
    clock.now += 0.5
    p.update(10)
    p.finish(10)
    assert out.getvalue() == ""


def test_progress_goes_to_stderr_by_default(clock, capsys):
    p = Progress("reading", total=0)
    clock.now += 1
    p.update(5)
    captured = capsys.readouterr()
    assert captured.err == "cowfs: reading: 5B\n" and captured.out == ""  # a total of 0 is no total


def test_progress_file_reports_its_position(clock):
    out = io.StringIO()
    f = ProgressFile(io.BytesIO(DATA), Progress("x", total=len(DATA), stream=out))
    clock.now += 1
    assert f.read(5120) == DATA[:5120]
    assert out.getvalue() == "cowfs: x: 5.12kB of 10.2kB (50%)\n"
    assert f.tell() == 5120
    assert f.seek(10) == 10
    assert f.read(2) == DATA[10:12]
    f.close()
    assert f.f.closed


# ---------------------------------------------------------------------------------------------
# the tar-split's records

def split_file(tmp_path, body, magic=archive.SPLIT_MAGIC):
    path = tmp_path / "tar-split.gz"
    path.write_bytes(gzip.compress(magic + body))
    return path


def raw(data):
    return b"R" + struct.pack(">I", len(data)) + data


def file_record(size, rel):
    return b"F" + struct.pack(">QH", size, len(rel)) + rel


def end(length, digest=b"d" * 32):
    return b"E" + struct.pack(">Q", length) + digest


def records(path):
    with open(path, "rb") as f:
        return list(archive._split_records(f))


def test_split_records_read_back(tmp_path):
    path = split_file(tmp_path, raw(b"head") + file_record(7, b"a/b") + raw(b"") + end(11, b"s" * 32))
    assert records(path) == [("raw", b"head"), ("file", 7, b"a/b"), ("raw", b""), ("end", 11, b"s" * 32)]
    archive.check_split(path)


def test_split_records_read_lengths_unsigned(tmp_path):
    """Sizes and lengths past the signed range and a path longer than 32 KiB read back as written."""
    long_path = b"/".join([b"d" * 200] * 165)  # 33,164 bytes
    path = split_file(tmp_path, file_record(2**63 + 5, long_path) + end(2**64 - 1))
    assert records(path) == [("file", 2**63 + 5, long_path), ("end", 2**64 - 1, b"d" * 32)]


def test_split_records_name_an_error_without_a_message(tmp_path):
    class Failing(io.RawIOBase):
        def readinto(self, b):
            raise OSError()  # no errno, no text

    with pytest.raises(archive.SplitCorrupt) as e:
        list(archive._split_records(Failing()))
    assert str(e.value) == "OSError"


@pytest.mark.parametrize("body,magic,reason", [
    (end(0), b"cowfs-tar-split\x02", "not a cowfs tar-split"),
    (raw(b"x") + b"X", archive.SPLIT_MAGIC, "unknown record b'X'"),
    (raw(b"x"), archive.SPLIT_MAGIC, "truncated"),  # no end record
    (b"R\0\0\0\x09short", archive.SPLIT_MAGIC, "truncated"),
    (end(0)[:20], archive.SPLIT_MAGIC, "truncated"),
    (end(0) + b"!", archive.SPLIT_MAGIC, "data after the end record"),
    (file_record(1, b"") + end(1), archive.SPLIT_MAGIC, "bad path b''"),
    (file_record(1, b"a//b") + end(1), archive.SPLIT_MAGIC, "bad path b'a//b'"),
    (file_record(1, b"a/../b") + end(1), archive.SPLIT_MAGIC, "bad path b'a/../b'"),
    (file_record(1, b"./b") + end(1), archive.SPLIT_MAGIC, "bad path b'./b'"),
    (file_record(1, b"a\0b") + end(1), archive.SPLIT_MAGIC, "bad path b'a\\x00b'"),
])
def test_split_records_refused(tmp_path, body, magic, reason):
    path = split_file(tmp_path, body, magic)
    with pytest.raises(archive.SplitCorrupt) as e:
        records(path)
    assert str(e.value) == reason
    with pytest.raises(archive.SplitCorrupt):
        archive.check_split(path)


def test_split_that_is_not_gzip(tmp_path):
    path = tmp_path / "tar-split.gz"
    path.write_bytes(b"plain bytes, no gzip")
    with pytest.raises(archive.SplitCorrupt) as e:
        archive.check_split(path)
    assert str(e.value) == "Not a gzipped file (b'pl')"


def test_check_split_adds_up_the_lengths(tmp_path):
    archive.check_split(split_file(tmp_path, raw(b"abc") + file_record(5, b"f") + raw(b"de") + end(10)))
    with pytest.raises(archive.SplitCorrupt) as e:
        archive.check_split(split_file(tmp_path, raw(b"abc") + file_record(5, b"f") + raw(b"de") + end(11)))
    assert str(e.value) == "records 10 bytes, its end 11"


# -- unpacking member by member: each refusal and each kind, as root and recording attributes --

MTIME = 1_000_000_000
KINDS = {"file": tarfile.REGTYPE, "dir": tarfile.DIRTYPE, "symlink": tarfile.SYMTYPE, "link": tarfile.LNKTYPE,
         "fifo": tarfile.FIFOTYPE, "chr": tarfile.CHRTYPE, "blk": tarfile.BLKTYPE}
OVERRIDE = "user.containers.override_stat"


def item(name, kind="file", data=b"", mode=0o644, owner=(0, 0), target="", dev=(0, 0), pax=None):
    """One member of `tar_of`: (TarInfo, data); `kind` a KINDS key or a raw tar type."""
    info = tarfile.TarInfo(name)
    info.type, info.mode, info.mtime, info.linkname = KINDS.get(kind, kind), mode, MTIME, target
    info.uid, info.gid = owner
    info.devmajor, info.devminor = dev
    info.pax_headers = pax or {}
    info.size = len(data)
    return info, data


def tar_of(*items):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for info, data in items:
            tf.addfile(info, io.BytesIO(data) if data else None)
    return buf.getvalue()


def unpack_into(tmp_path, *items, record=False):
    dest = tmp_path / "layer"
    dest.mkdir()
    unpack_layer(io.BytesIO(tar_of(*items)), str(dest), "l.tar", record=record)
    return dest


def recorded_value(path):
    return os.getxattr(path, OVERRIDE, follow_symlinks=False).decode()


@pytest.fixture
def umask():
    """Set the umask for one test (the session's is 022): what is made must not depend on it."""
    old = os.umask(0o022)
    yield os.umask
    os.umask(old)


@pytest.fixture
def chmods(monkeypatch):
    """Every chmod as it happens: [(path, the mode before, the mode given)]."""
    done, real = [], os.chmod

    def chmod(path, mode, *args, **kwargs):
        done.append((str(path), stat.S_IMODE(os.lstat(path).st_mode), mode))
        real(path, mode, *args, **kwargs)

    monkeypatch.setattr(os, "chmod", chmod)
    return done


OVER_IMPLICIT = "conflicts with an earlier member (a whiteout or a directory made for its children)"
DUPLICATE = "duplicate entry (an earlier member has the same path)"
UNPACK_REFUSALS = {
    # case: (members, record, the member named, the reason)
    "root-not-a-directory": ([item(".", data=b"x")], False, ".", "the layer root is not a directory"),
    "through-a-file": ([item("f"), item("f/x")], False, "f/x", "goes through 'f', which is not a directory"),
    "through-a-deeper-file": ([item("a/f"), item("a/f/x/y")], False, "a/f/x/y",
                              "goes through 'a/f', which is not a directory"),
    "dir-over-a-file": ([item("a"), item("a", "dir")], False, "a", DUPLICATE),
    "file-over-a-file": ([item("a"), item("a")], False, "a", DUPLICATE),
    "link-over-a-file": ([item("b"), item("a"), item("a", "link", target="b")], False, "a", DUPLICATE),
    "fifo-over-a-file": ([item("a"), item("a", "fifo")], False, "a", DUPLICATE),
    "device-over-a-file": ([item("a"), item("a", "chr", dev=(1, 3))], True, "a", DUPLICATE),
    "opaque-twice": ([item("d", "dir"), item("d/.wh..wh..opq"), item("d/.wh..wh..opq")], False, "d/.wh..wh..opq",
                     DUPLICATE),
    "whiteout-of-a-member": ([item("a"), item(".wh.a")], False, ".wh.a", "whiteout for a member of the same layer"),
    "file-over-an-implicit-dir": ([item("a/x"), item("a")], False, "a", OVER_IMPLICIT),
    "symlink-over-an-implicit-dir": ([item("a/x"), item("a", "symlink", target="x")], False, "a", OVER_IMPLICIT),
    "link-over-an-implicit-dir": ([item("b"), item("a/x"), item("a", "link", target="b")], False, "a",
                                  OVER_IMPLICIT),
    "fifo-over-an-implicit-dir": ([item("a/x"), item("a", "fifo")], False, "a", OVER_IMPLICIT),
    "device-over-an-implicit-dir": ([item("a/x"), item("a", "chr", dev=(1, 3))], True, "a", OVER_IMPLICIT),
    "whiteout-of-an-implicit-dir": ([item("a/x"), item(".wh.a")], False, ".wh.a", OVER_IMPLICIT),
    "volume-label": ([item("label", b"V")], False, "label", "unsupported member type b'V'"),
}


@pytest.mark.parametrize("case", sorted(UNPACK_REFUSALS))
def test_each_unpack_refusal_is_one_line_naming_the_member(tmp_path, case):
    members, record, bad, reason = UNPACK_REFUSALS[case]
    with pytest.raises(ArchiveError) as e:
        unpack_into(tmp_path, *members, record=record)
    assert str(e.value) == f"l.tar: member {bad!r}: {reason}"


@pytest.mark.parametrize("record", [False, True])
def test_directories_made_for_their_children(tmp_path, umask, record):
    """A member's missing parents are made 0755 whatever the umask (Docker's daemon runs under umask 022),
    recorded as root's; a directory member may come after its children and then gives its own attributes."""
    umask(0o077)
    dest = unpack_into(tmp_path, item("a/b/c/f", data=b"deep"), item("a/b", "dir", mode=0o750, owner=(7, 8)),
                       record=record)
    assert (dest / "a/b/c/f").read_bytes() == b"deep"
    modes = {rel: stat.S_IMODE(os.lstat(dest / rel).st_mode) for rel in ("a", "a/b", "a/b/c")}
    assert modes == {"a": 0o755, "a/b": 0o750 | (0o700 if record else 0), "a/b/c": 0o755}
    if record:
        assert {rel: recorded_value(dest / rel) for rel in modes} == {
            "a": "0:0:0755:dir", "a/b": "7:8:0750:dir", "a/b/c": "0:0:0755:dir"}
    else:
        assert all(os.listxattr(dest / rel) == [] for rel in modes)


@pytest.mark.parametrize("record", [False, True])
def test_nothing_is_open_to_others_before_its_attributes_are_set(tmp_path, umask, chmods, record):
    """Every object is made for its owner alone (a file being written, a directory being filled), then
    given its mode: no one else can open or enter it meanwhile, whatever the umask."""
    umask(0)
    members = [item("d", "dir", mode=0o755), item("d/f", data=b"data", mode=0o644), item("d/p", "fifo", mode=0o666),
               item("i/x", data=b"x", mode=0o644)]
    if record or os.geteuid() == 0:
        members.append(item("d/null", "chr", mode=0o666, dev=(1, 3)))
    dest = unpack_into(tmp_path, *members, record=record)
    made = {os.path.relpath(path, dest): before for path, before, _ in chmods}
    assert sorted(made) == sorted(["d", "d/f", "d/p", "i", "i/x"] + (["d/null"] if len(members) == 5 else []))
    assert {rel: before & 0o077 for rel, before in made.items()} == dict.fromkeys(made, 0)


def test_directories_get_their_attributes_deepest_first(tmp_path, chmods):
    """Without privilege a parent given a mode without search permission (here 0600) would keep its owner
    from reaching the directories inside: each directory's attributes come after those below it."""
    dest = unpack_into(tmp_path, item("a", "dir", mode=0o600), item("a/b", "dir", mode=0o500),
                       item("a/b/c", "dir", mode=0o700), item("a/d", "dir", mode=0o750), item("z", "dir", mode=0o711))
    order = [os.path.relpath(path, dest) for path, _, _ in chmods]
    assert sorted(order) == ["a", "a/b", "a/b/c", "a/d", "z"]
    for i, rel in enumerate(order):
        assert not any(later.startswith(rel + "/") for later in order[i + 1:]), order
    assert {rel: stat.S_IMODE(os.lstat(dest / rel).st_mode) for rel in order} == {
        "a": 0o600, "a/b": 0o500, "a/b/c": 0o700, "a/d": 0o750, "z": 0o711}


def test_recorded_attributes_keep_the_owners_access_on_disk(tmp_path):
    """Recording, an object keeps on disk what its owner (the user) needs: a directory rwx, a file rw, a
    device's or FIFO's empty stand-in 0600 only; its own owner, mode and type go to the xattr. A char
    device 0/0 is a whiteout, made as such (anyone may make one) with the member's mode and time."""
    dest = unpack_into(tmp_path, item("d", "dir", mode=0o510, owner=(1000, 100)), item("f", data=b"f", mode=0o440),
                       item("p", "fifo", mode=0o644), item("null", "chr", mode=0o666, dev=(1, 3)),
                       item("b00", "blk", mode=0o640, owner=(0, 6)), item("gone", "chr", mode=0o640), record=True)
    disk = {rel: stat.S_IMODE(os.lstat(dest / rel).st_mode) for rel in ("d", "f", "p", "null", "b00")}
    assert disk == {"d": 0o710, "f": 0o640, "p": 0o600, "null": 0o600, "b00": 0o600}
    assert all(stat.S_ISREG(os.lstat(dest / rel).st_mode) for rel in ("f", "p", "null", "b00"))
    assert {rel: recorded_value(dest / rel) for rel in disk} == {
        "d": "1000:100:0510:dir", "f": "0:0:0440:file", "p": "0:0:0644:pipe", "null": "0:0:0666:char-1-3",
        "b00": "0:6:0640:block-0-0"}
    gone = os.lstat(dest / "gone")
    assert (stat.S_ISCHR(gone.st_mode), gone.st_rdev, stat.S_IMODE(gone.st_mode), gone.st_mtime) == (
        True, 0, 0o640, MTIME)
    assert recorded_value(dest) == "0:0:0755:dir"  # the layer's mark


@pytest.mark.parametrize("record", [False, True])
def test_hard_links_to_every_kind_of_earlier_member(tmp_path, record):
    """A hard link may name an earlier file, hard link, symlink (linked itself, never followed), FIFO or
    device, and is that object under a second name."""
    members = [item("f", data=b"f"), item("h1", "link", target="f"), item("h2", "link", target="h1"),
               item("s", "symlink", target="f"), item("hs", "link", target="s"), item("p", "fifo"),
               item("hp", "link", target="p")]
    if record or os.geteuid() == 0:
        members += [item("c", "chr", dev=(1, 3)), item("hc", "link", target="c")]
    dest = unpack_into(tmp_path, *members, record=record)
    pairs = [("f", "h1"), ("f", "h2"), ("s", "hs"), ("p", "hp")] + ([("c", "hc")] if len(members) == 9 else [])
    for first, second in pairs:
        assert os.lstat(dest / first).st_ino == os.lstat(dest / second).st_ino, second
    assert os.readlink(dest / "hs") == "f"
    assert stat.S_ISFIFO(os.lstat(dest / "hp").st_mode) == (not record)  # recorded, a FIFO is a stand-in file


def test_xattrs_of_members_are_kept_as_bytes_and_never_set_through_a_symlink(tmp_path):
    """A pax xattr is set byte for byte (values need not be UTF-8, as a file capability is not), whatever
    other pax keys come before it; on a symlink, which takes no user.* xattr, it is skipped, never set
    on what the symlink points to."""
    outside = tmp_path / "outside"
    outside.write_bytes(b"not the layer's")
    binary = b"\xff\xfe\x80 binary".decode("utf-8", "surrogateescape")
    dest = unpack_into(tmp_path, item("d", "dir", pax={"SCHILY.xattr.user.dir": "on a directory"}),
                       item("f", data=b"f", pax={"LIBARCHIVE.creationtime": "1", "SCHILY.xattr.user.bin": binary}),
                       item("s", "symlink", target=str(outside), pax={"SCHILY.xattr.user.link": "skipped"}))
    assert os.getxattr(dest / "d", "user.dir") == b"on a directory"
    assert os.getxattr(dest / "f", "user.bin") == b"\xff\xfe\x80 binary"
    assert os.readlink(dest / "s") == str(outside)
    assert os.listxattr(outside) == []


@pytest.mark.skipif(os.geteuid() != 0, reason="only root gives an object another owner")
def test_a_whiteout_takes_its_members_owner_as_root(tmp_path):
    dest = tmp_path / "layer"
    dest.mkdir()
    unpack_layer(io.BytesIO(tar_of(item(".wh.gone", owner=(1234, 5678)))), str(dest), "l.tar", record=False)
    gone = os.lstat(dest / "gone")
    assert stat.S_ISCHR(gone.st_mode) and gone.st_rdev == 0
    assert (gone.st_uid, gone.st_gid) == (1234, 5678)
    assert (os.lstat(dest).st_uid, os.lstat(dest).st_gid) == (0, 0)  # the layer root is not the member's


class Zeros(io.RawIOBase):
    """A layer tar of one file of `size` zero bytes, made as it is read (it is never whole in memory)."""

    def __init__(self, size):
        info = tarfile.TarInfo("big")
        info.size, info.mtime = size, MTIME
        self.head = info.tobuf(tarfile.PAX_FORMAT)
        self.zeros = size + -size % 512 + 1024  # the data, its padding, the end-of-archive blocks

    def readable(self):
        return True

    def readinto(self, b):
        if self.head:
            n = min(len(b), len(self.head))
            b[:n], self.head = self.head[:n], self.head[n:]
        else:
            n = min(len(b), self.zeros)
            b[:n], self.zeros = bytes(n), self.zeros - n
        return n


@pytest.mark.filterwarnings("error")
def test_a_big_file_is_copied_in_bounded_pieces_and_silently(tmp_path):
    """Memory stays bounded (CHUNK at a time) whatever a file's size, and nothing is printed on the way."""
    import tracemalloc

    size = 64 << 20
    dest = tmp_path / "layer"
    dest.mkdir()
    tracemalloc.start()
    try:
        _, got = unpack_layer(io.BufferedReader(Zeros(size)), str(dest), "l.tar", record=False)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert got == size and os.path.getsize(dest / "big") == size
    assert peak < 16 << 20, peak


# ---------------------------------------------------------------------------------------------
# the tar given back from the tar-split and the tree

def layer_tar(files, owner=(0, 0), modes=(0o755, 0o644)):
    """A tar of `files`, (name, bytes or None for a directory), each with `owner` and the directory's or
    the file's mode of `modes`."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for name, data in files:
            info = tarfile.TarInfo(name)
            info.uid, info.gid = owner
            if data is None:
                info.type, info.mode = tarfile.DIRTYPE, modes[0]
                tf.addfile(info)
            else:
                info.size, info.mode = len(data), modes[1]
                tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


@pytest.fixture
def unpacked(tmp_path):
    """A layer unpacked with its tar-split: (the tar, diff/, the tar-split's path)."""
    data = layer_tar([("d", None), ("d/a", b"A" * 3000), ("d/e", b""), ("top", b"T" * 700)])
    diff, split = tmp_path / "diff", tmp_path / "tar-split.gz"
    diff.mkdir()
    unpack_layer(io.BytesIO(data), str(diff), "l.tar", split=str(split), record=False)
    return data, diff, split


def test_the_tar_given_back_byte_for_byte(unpacked):
    data, diff, split = unpacked
    out = io.BytesIO()
    assert archive.write_split_layer(str(diff), str(split), out) == (
        "sha256:" + hashlib.sha256(data).hexdigest(), len(data))
    assert out.getvalue() == data
    assert split.stat().st_size < 3000  # the files' data is in diff/, not in the tar-split


@pytest.mark.parametrize("change,message", [
    (lambda diff: os.unlink(diff / "d/a"), "d/a is missing from its tree"),
    (lambda diff: (os.unlink(diff / "d/a"), os.symlink("../top", diff / "d/a")),
     "d/a (or a directory above it) is a symlink or not what was imported"),
    (lambda diff: (os.rename(diff / "d", diff / "d2"), os.symlink("d2", diff / "d")),
     "d/a (or a directory above it) is a symlink or not what was imported"),
    (lambda diff: (os.unlink(diff / "d/a"), os.mkfifo(diff / "d/a")),
     "d/a in its tree is not a regular file (changed since it was imported)"),
    (lambda diff: (diff / "d/a").write_bytes(b"short"), "d/a in its tree holds 5 bytes, 3000 when imported"),
    # a FIFO where a directory was: refused at once, never opened for reading (which would wait for a writer)
    (lambda diff: (shutil.rmtree(diff / "d"), os.mkfifo(diff / "d")),
     "d/a (or a directory above it) is a symlink or not what was imported"),
])
def test_the_tar_is_not_given_back_from_a_changed_tree(unpacked, change, message):
    _, diff, split = unpacked
    change(diff)

    def waited(signum, frame):
        raise AssertionError("write_split_layer waited 10 s on an object of the tree")

    previous = signal.signal(signal.SIGALRM, waited)
    signal.alarm(10)
    try:
        with pytest.raises(archive.SplitMismatch) as e:
            archive.write_split_layer(str(diff), str(split), io.BytesIO())
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    assert str(e.value) == message


def test_a_tree_file_that_cannot_be_opened_is_named_with_the_reason(tmp_path):
    with pytest.raises(archive.SplitMismatch) as e:
        archive._copy_tree_file(str(tmp_path), b"n" * 300, 0, io.BytesIO())
    assert str(e.value) == "n" * 300 + ": File name too long"


def test_a_tree_file_that_shrinks_while_read(unpacked, monkeypatch):
    """The file is read to the size it had when opened; ending sooner is a mismatch, not a short tar."""
    _, diff, split = unpacked
    real_fstat = os.fstat

    def grown(fd):  # as if the file had been 3000 bytes longer when opened
        st = list(real_fstat(fd))
        st[stat.ST_SIZE] += 3000 if stat.S_ISREG(st[stat.ST_MODE]) else 0
        return os.stat_result(st)

    monkeypatch.setattr(archive.os, "fstat", grown)
    with pytest.raises(archive.SplitMismatch) as e:
        archive._copy_tree_file(str(diff), b"d/a", 6000, io.BytesIO())
    assert str(e.value) == "d/a in its tree shrank while being read"


def test_the_tar_is_not_given_back_from_changed_bytes(unpacked):
    _, diff, split = unpacked
    (diff / "top").write_bytes(b"t" * 700)
    out = io.BytesIO()
    with pytest.raises(archive.SplitMismatch) as e:
        archive.write_split_layer(str(diff), str(split), out)
    given = hashlib.sha256(out.getvalue()).hexdigest()
    assert str(e.value) == f"its tree gives a tar of sha256:{given[:12]}, not the one imported (changed since)"


def test_no_tar_split_to_give_back(tmp_path):
    with pytest.raises(archive.SplitCorrupt) as e:
        archive.write_split_layer(str(tmp_path), str(tmp_path / "none.gz"), io.BytesIO())
    assert str(e.value) == "tar-split.gz: No such file or directory"


# ---------------------------------------------------------------------------------------------
# writing an upper as a layer tar

def members(data):
    with tarfile.open(fileobj=io.BytesIO(data)) as tf:
        return {m.name: m for m in tf.getmembers()}


def test_write_layer_member_by_member(tmp_path):
    upper = tmp_path / "upper"
    (upper / "d/sub").mkdir(parents=True)
    os.chmod(upper / "d", 0o751)
    os.chown(upper / "d", 11, 12)
    f = upper / "d/f"
    f.write_bytes(b"data")
    os.chown(f, 21, 22)
    os.chmod(f, 0o4640)  # after chown, which drops set-id bits
    os.setxattr(f, "user.note", b"hi")
    os.setxattr(f, "trusted.kept", b"t")
    os.setxattr(f, "trusted.overlay.origin", b"never")
    os.setxattr(f, "user.overlay.x", b"never")
    os.link(f, upper / "d/hard")
    os.symlink("/elsewhere", upper / "d/link")
    os.mkfifo(upper / "d/fifo")
    os.chmod(upper / "d/fifo", 0o620)
    os.mknod(upper / "d/dev", stat.S_IFCHR | 0o600, os.makedev(4, 5))
    os.mknod(upper / "d/blk", stat.S_IFBLK | 0o600, os.makedev(7, 1))
    os.mknod(upper / "d/sock", stat.S_IFSOCK | 0o600)
    os.mknod(upper / "d/sub/gone", stat.S_IFCHR, os.makedev(0, 0))
    os.chown(upper / "d/sub/gone", 31, 32, follow_symlinks=False)
    os.setxattr(upper / "d/sub", "trusted.overlay.opaque", b"y")
    os.chmod(upper / "d/sub", 0o705)
    for path in upper.rglob("*"):
        os.utime(path, (5000, 5000), follow_symlinks=False)
    os.utime(f, (9000, 9000))
    out = io.BytesIO()
    digest, size = archive.write_layer(str(upper), out, clamp_mtime=6000)
    data = out.getvalue()
    assert (digest, size) == ("sha256:" + hashlib.sha256(data).hexdigest(), len(data))
    m = members(data)
    assert list(m) == ["d", "d/blk", "d/dev", "d/f", "d/fifo", "d/hard", "d/link", "d/sub", "d/sub/.wh..wh..opq",
                       "d/sub/.wh.gone"]  # sorted, the socket left out, each directory's markers after it
    assert (m["d"].type, m["d"].mode, m["d"].uid, m["d"].gid) == (tarfile.DIRTYPE, 0o751, 11, 12)
    file = m["d/f"]
    assert (file.type, file.mode, file.uid, file.gid, file.size) == (tarfile.REGTYPE, 0o4640, 21, 22, 4)
    assert file.mtime == 6000  # clamped
    assert m["d"].mtime == 5000  # under the clamp: as it is
    assert (file.uname, file.gname) == ("", "")
    assert {k: v for k, v in file.pax_headers.items() if k.startswith("SCHILY.")} == {
        "SCHILY.xattr.trusted.kept": "t", "SCHILY.xattr.user.note": "hi"}
    assert (m["d/hard"].type, m["d/hard"].linkname) == (tarfile.LNKTYPE, "d/f")
    assert not [k for k in m["d/hard"].pax_headers if k.startswith("SCHILY.")]
    assert (m["d/link"].type, m["d/link"].linkname) == (tarfile.SYMTYPE, "/elsewhere")
    assert (m["d/fifo"].type, m["d/fifo"].mode) == (tarfile.FIFOTYPE, 0o620)
    assert (m["d/dev"].type, m["d/dev"].devmajor, m["d/dev"].devminor) == (tarfile.CHRTYPE, 4, 5)
    assert (m["d/blk"].type, m["d/blk"].devmajor, m["d/blk"].devminor) == (tarfile.BLKTYPE, 7, 1)
    opq, wh = m["d/sub/.wh..wh..opq"], m["d/sub/.wh.gone"]
    assert (opq.type, opq.mode, opq.mtime, opq.size) == (tarfile.REGTYPE, 0o705, 0, 0)  # its directory's mode
    assert (wh.type, wh.mode, wh.mtime, wh.uid, wh.gid) == (tarfile.REGTYPE, 0o600, 0, 31, 32)
    assert (wh.uname, wh.gname, opq.uname, opq.gname) == ("", "", "", "")
    with tarfile.open(fileobj=io.BytesIO(data)) as tf:
        assert tf.extractfile("d/f").read() == b"data"
    # the same upper, the same bytes
    again = io.BytesIO()
    archive.write_layer(str(upper), again, clamp_mtime=6000)
    assert again.getvalue() == data
    # without a clamp, the file's own time
    unclamped = io.BytesIO()
    archive.write_layer(str(upper), unclamped)
    assert members(unclamped.getvalue())["d/f"].mtime == 9000


def test_write_changes_as_dockers_naive_diff(tmp_path):
    """Each added or changed path as the merged view shows it, each deleted one a `.wh.` entry of mode 0,
    in path order whatever the order given; no opaque markers."""
    from cowfs.overlay.lookup import Layers
    from cowfs.overlay.stack import Stack
    lower, upper = tmp_path / "lower", tmp_path / "upper"
    (lower / "d").mkdir(parents=True)
    (lower / "d/f").write_bytes(b"old")
    (lower / "d/gone").write_bytes(b"")
    (lower / "x").write_bytes(b"")
    (upper / "d").mkdir(parents=True)
    (upper / "d/f").write_bytes(b"changed")
    os.chmod(upper / "d/f", 0o640)
    (upper / "new").write_bytes(b"n")
    for path in (upper / "d/f", upper / "new"):
        os.utime(path, (9000, 9000))
    merged = Layers(Stack(lowers=[str(lower)], upper=str(upper)))
    out = io.BytesIO()
    digest, size = archive.write_changes(merged, [("A", "/new"), ("D", "/x"), ("C", "/d/f"), ("D", "/d/gone")],
                                         out, clamp_mtime=6000)
    data = out.getvalue()
    assert (digest, size) == ("sha256:" + hashlib.sha256(data).hexdigest(), len(data))
    m = members(data)
    assert list(m) == ["d/f", "d/.wh.gone", "new", ".wh.x"]  # by merged path: /d/f, /d/gone, /new, /x
    for name in ("d/.wh.gone", ".wh.x"):
        wh = m[name]
        assert (wh.type, wh.mode, wh.uid, wh.gid, wh.mtime, wh.size) == (tarfile.REGTYPE, 0, 0, 0, 0, 0)
    f = m["d/f"]
    assert (f.type, f.mode, f.size, f.mtime) == (tarfile.REGTYPE, 0o640, 7, 6000)
    with tarfile.open(fileobj=io.BytesIO(data)) as tf:
        assert tf.extractfile("d/f").read() == b"changed"
        assert tf.extractfile("new").read() == b"n"


def test_write_changes_takes_metadata_only_data_from_below_and_keeps_xattrs(tmp_path):
    """A metadata-only copy in the upper is written with its lower data and the upper's attributes; user and
    security xattrs go into the member, the overlay's own do not; names that end in X are not cut, names that
    are not UTF-8 keep their bytes."""
    from cowfs.overlay.lookup import Layers
    from cowfs.overlay.stack import Stack
    lower, upper = tmp_path / "lower", tmp_path / "upper"
    lower.mkdir()
    upper.mkdir()
    (lower / "metaX").write_bytes(b"lower data")
    (lower / "goneX").write_bytes(b"")
    meta = upper / "metaX"
    meta.write_bytes(b"")
    os.truncate(meta, len(b"lower data"))  # a metadata-only copy has the size, not the data
    os.setxattr(meta, "trusted.overlay.metacopy", b"")
    os.setxattr(meta, "user.note", b"kept")
    os.chmod(meta, 0o600)
    os.utime(meta, (7000, 7000))
    with open(os.path.join(os.fsencode(upper), b"not utf-8 \xff"), "wb") as f:
        f.write(b"bytes")
    merged = Layers(Stack(lowers=[str(lower)], upper=str(upper), redirect_dir="follow", metacopy=True))
    out = io.BytesIO()
    archive.write_changes(merged, [("D", "/goneX"), ("C", "/metaX"), ("A", os.fsdecode(b"/not utf-8 \xff"))], out)
    m = members(out.getvalue())
    assert list(m) == [".wh.goneX", "metaX", os.fsdecode(b"not utf-8 \xff")]  # the name's bytes as on disk
    f = m["metaX"]
    assert (f.mode, f.size, f.mtime) == (0o600, len(b"lower data"), 7000)
    assert f.pax_headers.get("SCHILY.xattr.user.note") == "kept"
    assert not any("overlay" in key for key in f.pax_headers)
    with tarfile.open(fileobj=io.BytesIO(out.getvalue())) as tf:
        assert tf.extractfile("metaX").read() == b"lower data"


def test_write_layer_of_recorded_attributes(tmp_path):
    """A recorded object is written as its record says, its other xattrs kept; a record of a type the
    object cannot be (a directory recorded as a file) is ignored, as a mount ignores it."""
    upper = tmp_path / "upper"
    upper.mkdir()
    f = upper / "f"
    f.write_bytes(b"x")
    os.setxattr(f, "user.containers.override_stat", b"5:6:4755:file")
    os.setxattr(f, "user.zz", b"kept")
    os.setxattr(f, "user.aa", b"kept too")
    (upper / "dir").mkdir()
    os.chmod(upper / "dir", 0o711)
    os.setxattr(upper / "dir", "user.containers.override_stat", b"7:8:0700:file")
    m = members(_written(upper))
    assert (m["f"].type, m["f"].uid, m["f"].gid, m["f"].mode) == (tarfile.REGTYPE, 5, 6, 0o4755)
    assert {k: v for k, v in m["f"].pax_headers.items() if k.startswith("SCHILY.")} == {
        "SCHILY.xattr.user.aa": "kept too", "SCHILY.xattr.user.zz": "kept"}
    assert (m["dir"].type, m["dir"].uid, m["dir"].mode) == (tarfile.DIRTYPE, 0, 0o711)


def _written(upper, **options):
    out = io.BytesIO()
    archive.write_layer(str(upper), out, **options)
    return out.getvalue()


def test_write_layer_expands_a_redirected_directory_in_name_order(tmp_path):
    """A redirected directory is written whole, from every layer, its entries by name (not upper first);
    without its lower layers it cannot be."""
    lower, upper = tmp_path / "lower", tmp_path / "upper"
    (lower / "src").mkdir(parents=True)
    (lower / "src/a").write_bytes(b"a")
    (upper / "dst").mkdir(parents=True)
    os.setxattr(upper / "dst", "trusted.overlay.redirect", b"/src")
    (upper / "dst/z").write_bytes(b"z")
    m = members(_written(upper, lowers=[str(lower)]))
    assert list(m) == ["dst", "dst/.wh..wh..opq", "dst/a", "dst/z"]
    with pytest.raises(ArchiveError) as e:
        _written(upper)
    assert str(e.value) == f"{upper}: has a redirected directory: give its lower layers (--lower) to expand it"


def test_write_layer_of_names_not_in_ascii(tmp_path):
    upper = tmp_path / "upper"
    upper.mkdir()
    (upper / "caf\u00e9").write_bytes(b"x")
    with open(os.path.join(os.fsencode(upper), b"not utf-8 \xff"), "wb"):
        pass
    assert list(members(_written(upper))) == ["caf\u00e9", os.fsdecode(b"not utf-8 \xff")]  # bytes as on disk


def test_write_layer_skips_the_overlays_own_xattrs_and_keeps_the_later_ones(tmp_path):
    """The record of attributes, the overlay's markers and xattrs outside user/security/trusted (an ACL in
    system.*) are not archived as xattrs, and the names that sort after them still are."""
    upper = tmp_path / "upper"
    upper.mkdir()
    f = upper / "f"
    f.write_bytes(b"x")
    os.chmod(f, 0o640)
    acl = struct.pack("<I", 2) + b"".join(struct.pack("<HHI", tag, perm, ident) for tag, perm, ident in (
        (0x01, 6, 0xFFFFFFFF), (0x02, 4, 1234), (0x04, 4, 0xFFFFFFFF), (0x10, 4, 0xFFFFFFFF), (0x20, 0, 0xFFFFFFFF)))
    os.setxattr(f, "system.posix_acl_access", acl)  # user 1234 may read
    os.setxattr(f, "trusted.overlay.impure", b"y")
    os.setxattr(f, "trusted.zz", b"after the overlay's")
    os.setxattr(f, "user.containers.override_stat", b"0:0:0640:file")
    os.setxattr(f, "user.zz", b"after the record")
    xattrs = {k for k in members(_written(upper))["f"].pax_headers if k.startswith("SCHILY.xattr.")}
    assert xattrs == {"SCHILY.xattr.trusted.zz", "SCHILY.xattr.user.zz"}


def test_write_layer_skips_an_xattr_gone_before_it_is_read_and_keeps_the_rest(tmp_path, monkeypatch):
    """An xattr removed between listing and reading (the upper may be in use) is left out; the names after
    it are still archived."""
    upper = tmp_path / "upper"
    upper.mkdir()
    (upper / "f").write_bytes(b"x")
    os.setxattr(upper / "f", "user.aa", b"gone")
    os.setxattr(upper / "f", "user.zz", b"kept")
    getxattr = os.getxattr

    def racing(path, name, *args, **kwargs):
        if name == "user.aa":
            raise OSError(errno.ENODATA, os.strerror(errno.ENODATA), path)
        return getxattr(path, name, *args, **kwargs)

    monkeypatch.setattr(os, "getxattr", racing)
    headers = members(_written(upper))["f"].pax_headers
    assert {k: v for k, v in headers.items() if k.startswith("SCHILY.xattr.")} == {"SCHILY.xattr.user.zz": "kept"}


def test_write_layer_passes_other_permission_errors_through(tmp_path, monkeypatch):
    """Only the stack's refusal to follow a marker (EPERM, lowers given) becomes the one-line refusal; any
    other PermissionError of the walk is the error it is."""
    lower, upper = tmp_path / "lower", tmp_path / "upper"
    lower.mkdir()
    upper.mkdir()
    for code, lowers in ((errno.EACCES, [str(lower)]), (errno.EPERM, [])):
        def refused(self, path, rel, code=code):
            raise PermissionError(code, os.strerror(code), "/d")

        monkeypatch.setattr(archive._Writer, "upper_dir", refused)
        with pytest.raises(PermissionError) as e:
            _written(upper, lowers=lowers)
        assert type(e.value) is PermissionError and e.value.errno == code


def test_write_layer_refusal_names_a_directory_whatever_its_first_letter(tmp_path):
    """The refused directory is named by its path in the upper, its merged path's leading slash
    dropped and nothing else."""
    lower, upper = tmp_path / "lower", tmp_path / "upper"
    (lower / "src").mkdir(parents=True)
    (upper / "X").mkdir(parents=True)
    os.setxattr(upper / "X", "user.overlay.redirect", b"/src")
    with pytest.raises(ArchiveError) as e:
        _written(upper, lowers=[str(lower)], prefix=archive.USER_PREFIX)
    assert str(e.value).startswith(f"{upper / 'X'}: is a redirect")


def test_write_layer_reads_a_metadata_only_copys_data_below(tmp_path):
    """metacopy: a copy holding only metadata, in a redirected directory too, is written with the data of
    the lower file it stands for."""
    lower, upper = tmp_path / "lower", tmp_path / "upper"
    (lower / "src").mkdir(parents=True)
    (lower / "src/f").write_bytes(b"data")
    (lower / "g").write_bytes(b"gggg")
    (upper / "dst").mkdir(parents=True)
    os.setxattr(upper / "dst", "trusted.overlay.redirect", b"/src")
    for copy in (upper / "dst/f", upper / "g"):
        with open(copy, "wb") as f:
            f.truncate(4)  # as large as its data, all hole
        os.setxattr(copy, "trusted.overlay.metacopy", b"")
    with tarfile.open(fileobj=io.BytesIO(_written(upper, lowers=[str(lower)]))) as tf:
        assert tf.extractfile("dst/f").read() == b"data"
        assert tf.extractfile("g").read() == b"gggg"


def test_write_layer_with_lowers_writes_only_the_uppers_changes(tmp_path):
    """Lowers given, a directory that is not redirected is written as its upper holds it, not merged."""
    lower, upper = tmp_path / "lower", tmp_path / "upper"
    (lower / "d").mkdir(parents=True)
    (lower / "d/old").write_bytes(b"o")
    (upper / "d").mkdir(parents=True)
    (upper / "d/new").write_bytes(b"n")
    assert list(members(_written(upper, lowers=[str(lower)]))) == ["d", "d/new"]


def test_write_layer_of_a_userxattr_upper_with_a_redirect_is_refused_in_one_line(tmp_path):
    """An overlay with userxattr follows no redirect (nor metacopy), as the kernel's: such an upper is not
    written as if it did, and the refusal names the directory."""
    lower, upper = tmp_path / "lower", tmp_path / "upper"
    (lower / "src").mkdir(parents=True)
    (lower / "src/a").write_bytes(b"a")
    (upper / "dst").mkdir(parents=True)
    os.setxattr(upper / "dst", "user.overlay.redirect", b"/src")
    with pytest.raises(ArchiveError) as e:
        _written(upper, lowers=[str(lower)], prefix=archive.USER_PREFIX)
    assert str(e.value) == (f"{upper / 'dst'}: is a redirect or metadata-only copy, which an overlay with "
                            "userxattr does not follow")
    os.setxattr(upper / "dst", "trusted.overlay.redirect", b"/src")  # the same with trusted.* is followed
    os.removexattr(upper / "dst", "user.overlay.redirect")
    assert list(members(_written(upper, lowers=[str(lower)]))) == ["dst", "dst/.wh..wh..opq", "dst/a"]


def test_write_layer_keeps_xattrs_as_bytes_and_none_of_a_symlink(tmp_path):
    """An xattr value that is not UTF-8 keeps its bytes; a symlink's own xattrs are not archived."""
    upper = tmp_path / "upper"
    upper.mkdir()
    (upper / "f").write_bytes(b"x")
    os.setxattr(upper / "f", "user.bin", b"\xff\x00\x80")
    os.symlink("f", upper / "link")
    os.setxattr(upper / "link", "trusted.mark", b"on the link itself", follow_symlinks=False)
    m = members(_written(upper))
    assert m["f"].pax_headers["SCHILY.xattr.user.bin"].encode("utf-8", "surrogateescape") == b"\xff\x00\x80"
    assert not any(key.startswith("SCHILY.xattr.") for key in m["link"].pax_headers)


def test_a_metadata_only_copy_needs_its_lowers(tmp_path):
    upper = tmp_path / "upper"
    upper.mkdir()
    (upper / "f").write_bytes(b"")
    os.setxattr(upper / "f", "trusted.overlay.metacopy", b"")
    with pytest.raises(ArchiveError) as e:
        _written(upper)
    assert str(e.value) == (f"{upper / 'f'}: is a metadata-only copy (metacopy): give the lower layers (--lower) "
                            "that hold its data")


# ---------------------------------------------------------------------------------------------
# recording a tar-split while reading

def recorded(tmp_path, monkeypatch, steps, window=16):
    """Run a _SplitRecorder over 200 bytes with a `window`-byte window: `steps` are ("read", n) and
    ("ref", offset, size, rel); returns the records written, or None when none were."""
    monkeypatch.setattr(archive._SplitRecorder, "WINDOW", window)
    data = bytes(range(200))
    path = tmp_path / "tar-split.gz"
    r = archive._SplitRecorder(io.BytesIO(data), str(path))
    for step in steps:
        if step[0] == "read":
            r.read(step[1])
        else:
            r.reference(*step[1:])
    while r.read(7):
        pass
    r.finish(hashlib.sha256(data).digest())
    r.close()
    return records(path) if path.exists() else None


def test_split_recorder_leaves_referenced_data_out(tmp_path, monkeypatch):
    got = recorded(tmp_path, monkeypatch, [("ref", 50, 30, "a"), ("read", 10), ("ref", 120, 5, "b/c")])
    data = bytes(range(200))
    joined = []  # raw records are cut where the window was written out: join them
    for rec in got:
        if rec[0] == "raw" and joined and joined[-1][0] == "raw":
            joined[-1] = ("raw", joined[-1][1] + rec[1])
        else:
            joined.append(rec)
    assert joined == [("raw", data[:50]), ("file", 30, b"a"), ("raw", data[80:120]), ("file", 5, b"b/c"),
                      ("raw", data[125:]), ("end", 200, hashlib.sha256(data).digest())]


def test_split_recorder_writes_raw_records_of_at_most_a_mebibyte(tmp_path, monkeypatch):
    monkeypatch.setattr(archive, "_SPLIT_RAW_MAX", 64)
    got = recorded(tmp_path, monkeypatch, [], window=1000)  # all written at the end, in one go
    assert [len(rec[1]) for rec in got if rec[0] == "raw"] == [64, 64, 64, 8]


@pytest.mark.parametrize("steps", [
    [("read", 100), ("ref", 10, 5, "late")],  # its bytes already written as raw ones
    [("ref", 50, 30, "a"), ("ref", 60, 5, "overlaps")],
    [("ref", 50, 30, "a"), ("ref", 40, 5, "before")],
])
def test_split_recorder_gives_up_rather_than_record_wrongly(tmp_path, monkeypatch, steps):
    assert recorded(tmp_path, monkeypatch, steps) is None
    assert not (tmp_path / "tar-split.gz").exists()


def test_split_recorder_keeps_at_most_two_windows(tmp_path, monkeypatch):
    monkeypatch.setattr(archive._SplitRecorder, "WINDOW", 16)
    r = archive._SplitRecorder(io.BytesIO(bytes(200)), str(tmp_path / "s.gz"))
    for _ in range(20):
        r.read(5)
        assert len(r.pending) <= 32 and r.pos - r.done == len(r.pending)
    assert r.pos == 100 and r.done >= r.pos - 32  # written out as it goes
    r.close()
    assert not (tmp_path / "s.gz").exists()  # not finished: dropped


def test_write_layer_links_each_name_to_its_own_inode(tmp_path):
    upper = tmp_path / "upper"
    upper.mkdir()
    for name in ("a", "b"):
        (upper / name).write_bytes(name.encode())
        os.link(upper / name, upper / (name + "2"))
    m = members(_written(upper))
    assert [(n, m[n].type, m[n].linkname) for n in m] == [
        ("a", tarfile.REGTYPE, ""), ("a2", tarfile.LNKTYPE, "a"), ("b", tarfile.REGTYPE, ""),
        ("b2", tarfile.LNKTYPE, "b")]


def test_write_layer_keeps_a_file_capability(tmp_path):
    upper = tmp_path / "upper"
    upper.mkdir()
    (upper / "ping").write_bytes(b"x")
    cap = struct.pack("<5I", 0x02000001, 1 << 13, 0, 0, 0)  # revision 2, effective; cap_net_raw permitted
    os.setxattr(upper / "ping", "security.capability", cap)
    headers = members(_written(upper))["ping"].pax_headers
    assert headers["SCHILY.xattr.security.capability"].encode("utf-8", "surrogateescape") == cap


# ---------------------------------------------------------------------------------------------
# -- unpack_layer's refusals and the tar-split recorder at its edges --

def unpacking(tmp_path, data, archive_name="t.tar", **options):
    """unpack_layer of `data` (bytes, or a reader) into a fresh directory: (its result, the directory)."""
    dest = tmp_path / f"dest{len(list(tmp_path.iterdir()))}"
    dest.mkdir()
    f = io.BytesIO(data) if isinstance(data, bytes) else data
    return unpack_layer(f, str(dest), archive_name, **options), dest


def refusal(tmp_path, data, archive_name="t.tar", **options):
    """The message of the ArchiveError that unpack_layer of `data` raises."""
    with pytest.raises(ArchiveError) as e:
        unpacking(tmp_path, data, archive_name, **options)
    return str(e.value)


def test_decompressed_zstd_by_the_module(monkeypatch):
    """With the zstandard module, its stream reader reads the blob from its first byte (the peeked magic
    given back) across all its frames: by default it would stop at the end of the first one."""
    readers = []

    class Decompressor:  # zstandard's API: stream_reader(source, read_size=..., read_across_frames=False, ...)
        def stream_reader(self, source, read_size=131075, read_across_frames=False, closefd=True):
            readers.append((source, read_across_frames))
            return source

    module = types.ModuleType("zstandard")
    module.ZstdDecompressor = Decompressor
    monkeypatch.setitem(sys.modules, "zstandard", module)
    blob = archive.ZSTD_MAGIC + b"two frames"
    f = decompressed(io.BytesIO(blob), "x.tar.zst")
    [(source, across)] = readers
    assert across is True
    assert f is source and f.read() == blob


def test_unpack_without_zstd_names_the_archive(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "zstandard", None)
    monkeypatch.setattr(archive.shutil, "which", lambda name: None)
    assert refusal(tmp_path, archive.ZSTD_MAGIC + bytes(1020), "l.tar.zst") == (
        "l.tar.zst: zstd-compressed, and neither the zstandard module nor the zstd command is installed")


OWNED = [("d", None), ("d/f", b"data")]  # owned by 1234:5678 in owned_layer()


def owned_layer():
    return layer_tar(OWNED, owner=(1234, 5678), modes=(0o750, 0o640))


@pytest.mark.parametrize("euid,record,recorded", [
    (1000, None, True),  # a user's unpack records by default
    (1000, False, False),  # told not to, it neither records nor gives owners (only root may)
    (0, True, True),  # root's, told to record, records and gives no owner either
])
def test_unpack_records_or_gives_owners_by_who_runs_it(tmp_path, monkeypatch, euid, record, recorded):
    me = os.geteuid(), os.getegid()
    monkeypatch.setattr(os, "geteuid", lambda: euid)
    _, dest = unpacking(tmp_path, owned_layer(), record=record)
    monkeypatch.undo()
    f = dest / "d/f"
    assert (os.lstat(f).st_uid, os.lstat(f).st_gid) == me  # the member's owner is not given
    assert archive.override.is_marked(str(dest)) is recorded
    if recorded:
        assert archive.override.read(str(f)) == archive.override.Override(1234, 5678, 0o640, stat.S_IFREG)
        assert archive.override.read(str(dest / "d")) == archive.override.Override(1234, 5678, 0o750, stat.S_IFDIR)
    else:
        assert archive.override.read(str(f)) is None
        assert stat.S_IMODE(os.lstat(f).st_mode) == 0o640


def test_docker_s_empty_layer_unpacks(tmp_path):
    """1024 zero bytes, the end-of-archive blocks alone: the layer of a Dockerfile step that changes no file."""
    (diff_id, size), dest = unpacking(tmp_path, bytes(1024))
    assert diff_id == "sha256:5f70bf18a086007016e948b04aed3b82103a36bea41755b6cddfaf10ace3c6ef"
    assert size == 0 and os.listdir(dest) == []


@pytest.mark.parametrize("data,message", [
    # the tar ends within a member's data: the member is named
    (layer_tar([("f", b"F" * 3000)])[:1500],
     "t.tar: member 'f': truncated or corrupt archive (unexpected end of data)"),
    # nothing read as a member yet: none is named
    (bytes(100), "t.tar: truncated or corrupt archive (truncated header)"),
    (b"\x1f\x8b" + b"garbage!" * 100, "t.tar: truncated or corrupt archive (Unknown compression method)"),
    # the last member's end, and no end-of-archive blocks after it
    (layer_tar([("f", b"F" * 3000)])[:512 + 3072], "t.tar: truncated archive (no end-of-archive blocks)"),
])
def test_unpack_refuses_a_broken_archive_in_one_line(tmp_path, data, message):
    assert refusal(tmp_path, data) == message


def test_unpack_refuses_a_corrupt_end_after_the_last_member(tmp_path):
    """The gzip stream goes bad after the end-of-archive blocks (which the diff ID covers too): no member is
    named, the last one read being whole."""
    data = gzip.compress(layer_tar([("f", b"abc")]) + bytes(1 << 20)) + b"garbage!"
    assert refusal(tmp_path, data) == "t.tar: truncated or corrupt archive (Not a gzipped file (b'ga'))"


def test_unpack_names_an_error_without_a_message(tmp_path):
    class Failing(io.BytesIO):
        def read(self, n=-1):
            data = super().read(n)
            if not data:
                raise EOFError()  # no text
            return data

    data = Failing(layer_tar([("f", b"F" * 3000)])[:1500])
    assert refusal(tmp_path, data) == "t.tar: member 'f': truncated or corrupt archive (EOFError)"


def test_unpack_refuses_what_the_filesystem_cannot_hold_naming_the_member(tmp_path):
    name = "d/" + "n" * 300
    assert refusal(tmp_path, layer_tar([(name, b"x")])) == f"t.tar: member {name!r}: cannot unpack: File name too long"


def test_unpack_refuses_a_digest_mismatch_naming_the_archive(tmp_path):
    expected = "sha256:" + "0" * 64
    assert refusal(tmp_path, bytes(1024), expected=expected) == (
        f"t.tar: digest mismatch: expected {expected}, got {'sha256:' + hashlib.sha256(bytes(1024)).hexdigest()}")


def test_unpack_tells_progress_what_it_read(tmp_path, monkeypatch):
    monkeypatch.setattr(archive, "TAR_BUFFER", 1024)

    class Seen:
        done = []

        def update(self, done):
            self.done.append(done)

    data = layer_tar([("a", b"A" * 3000), ("b", b"B" * 3000), ("c", b"C")])
    unpacking(tmp_path, data, progress=Seen())
    assert len(Seen.done) == 3 and all(isinstance(n, int) for n in Seen.done)
    assert 3000 < Seen.done[0] < Seen.done[1] < Seen.done[2] <= len(data)


def test_an_unpack_reads_its_layer_in_pieces(tmp_path, monkeypatch):
    """tarfile reads TAR_BUFFER at a time (not its 10 KiB records: a call less per 10 KiB through the readers),
    and what follows the end-of-archive blocks (hashed too) CHUNK at a time: never all at once."""
    monkeypatch.setattr(archive, "TAR_BUFFER", 2048)
    monkeypatch.setattr(archive, "CHUNK", 4096)
    data = layer_tar([("f", b"F" * 5000)]) + bytes(40 << 10)
    f = Reads(data)
    (diff_id, _), _ = unpacking(tmp_path, f)
    assert diff_id == "sha256:" + hashlib.sha256(data).hexdigest()
    assert f.asked[:2] == [4, 2048 - 4]  # the magic peeked, then the rest of tarfile's first read
    rest = f.asked[2:]
    drained = rest.index(4096)
    assert set(rest[:drained]) == {2048} and set(rest[drained:]) == {4096}


def test_unpack_ends_the_zstd_command_when_it_refuses(tmp_path, monkeypatch):
    """A refusal half-way through a zstd layer kills the command (blocked writing what no one will read) and
    waits for it."""
    monkeypatch.setitem(sys.modules, "zstandard", None)
    streams = []

    def kept(f, name, decompressed=archive.decompressed):
        streams.append(decompressed(f, name))
        return streams[-1]

    monkeypatch.setattr(archive, "decompressed", kept)
    data = layer_tar([("/abs", b""), ("f", os.urandom(4 << 20))])
    try:
        assert refusal(tmp_path, zstd_compress(data), "t.tar.zst") == (
            "t.tar.zst: member '/abs': absolute path in a layer")
        [stream] = streams
        assert stream.proc.returncode == -signal.SIGKILL
        assert not stream.thread.is_alive()
    finally:
        for stream in streams:
            if stream.proc.poll() is None:
                stream.close()


def test_a_tar_split_is_the_same_file_whenever_recorded(tmp_path):
    """No time in its gzip header: one layer gives one tar-split file, whenever and wherever imported."""
    data = layer_tar([("d", None), ("d/a", b"A" * 3000), ("top", b"T" * 700)])
    splits = []
    for i in range(2):
        split = tmp_path / f"split{i}" / archive.SPLIT_FILE
        split.parent.mkdir()
        unpacking(tmp_path, data, split=str(split), record=False)
        splits.append(split.read_bytes())
    assert splits[0][4:8] == bytes(4)  # the gzip header's MTIME
    assert splits[0] == splits[1]


def test_a_tar_split_that_cannot_be_finished_is_not_left(tmp_path, monkeypatch):
    """Its last flush failing (a full disk), the unpack fails in one line and leaves no tar-split, not a
    truncated one."""
    class FullAtClose:
        def __init__(self, f):
            self.f = f

        def close(self):
            self.f.close()
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    class Recorder(archive._SplitRecorder):
        def __init__(self, f, path):
            super().__init__(f, path)
            self.out.myfileobj = FullAtClose(self.out.myfileobj)

    monkeypatch.setattr(archive, "_SplitRecorder", Recorder)
    split = tmp_path / archive.SPLIT_FILE
    assert refusal(tmp_path, layer_tar([("f", b"F" * 3000)]), split=str(split), record=False) == (
        "t.tar: cannot unpack: No space left on device")
    assert not split.exists()


def test_split_recorder_writes_a_window_at_a_time(tmp_path, monkeypatch):
    """Nothing is written until more than two windows are pending, then all but the last window: few writes
    (and raw records) of a window or more, not one per read."""
    got = recorded(tmp_path, monkeypatch, [("read", 16)] * 12, window=16)  # then reads of 7: 7 and 1 bytes
    assert [len(rec[1]) for rec in got if rec[0] == "raw"] == [32, 32, 32, 32, 32, 23, 17]


@pytest.mark.parametrize("steps,files", [
    ([("ref", 0, 5, "first")], [("file", 5, b"first")]),  # data from the very first byte
    ([("ref", 50, 30, "a"), ("ref", 80, 5, "b")], [("file", 30, b"a"), ("file", 5, b"b")]),  # back to back
    ([("read", 40), ("ref", 24, 5, "at")], [("file", 5, b"at")]),  # the first byte not written yet
    ([("ref", 150, 40, "long/" * 6600 + "f")], [("file", 40, os.fsencode("long/" * 6600 + "f"))]),  # > 32 KiB
])
def test_split_recorder_takes_a_reference_in_time(tmp_path, monkeypatch, steps, files):
    got = recorded(tmp_path, monkeypatch, steps)
    assert [rec for rec in got if rec[0] == "file"] == files
    assert sum(len(rec[1]) if rec[0] == "raw" else rec[1] for rec in got[:-1]) == got[-1][1] == 200


@pytest.mark.parametrize("steps", [
    [("ref", 10, 50, "a"), ("read", 40), ("ref", 30, 5, "in a")],  # within data already in a file record
    [("ref", 250, 10, "past")],  # past the end: the tar ended before the file's data
])
def test_split_recorder_gives_up_on_a_reference_it_cannot_keep(tmp_path, monkeypatch, steps):
    assert recorded(tmp_path, monkeypatch, steps) is None
    assert not (tmp_path / "tar-split.gz").exists()


def test_split_recorder_that_gave_up_keeps_and_writes_nothing_more(tmp_path, monkeypatch):
    monkeypatch.setattr(archive._SplitRecorder, "WINDOW", 16)
    r = archive._SplitRecorder(io.BytesIO(bytes(range(200))), str(tmp_path / "s.gz"))
    r.read(100)
    r.reference(10, 5, "late")
    written = r.out.tell()
    while r.read(7):
        pass
    assert not r.pending and r.out.tell() == written
    r.close()
    assert not (tmp_path / "s.gz").exists()
