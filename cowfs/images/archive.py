"""Layer tar archives, read and written safely: OCI `.wh.` markers <-> the overlay's on-disk markers.

Reading (`unpack_layer`) turns an OCI/Docker layer tar into a directory in the
overlay's format, as Docker's overlay2 driver does: `.wh.NAME` becomes a
whiteout (char device 0/0) and `.wh..wh..opq` makes its directory opaque.
The diff ID (sha256 of the uncompressed tar) is computed while reading and
checked against the expected one when it is known.

Every member is checked before anything is written for it, and the caller
unpacks into a fresh staging directory that it throws away on failure, so a
hostile or broken archive changes nothing. Refused, with `ArchiveError`
naming the archive and the member:
- absolute names and `..` components;
- an entry whose path goes *through* a symlink of the layer (a symlink's
  target is only content: absolute targets are fine, as Docker allows);
- hard links whose target is absolute, has `..`, or is not an earlier
  regular member of the same archive;
- duplicate entries (two members for one path, after `./` and `/`
  normalisation): tar would let the later one win, but a layer never needs
  that, and it is the classic way to swap a checked entry for a hostile one;
  a directory entry for a directory that earlier members created implicitly
  is not a duplicate;
- device nodes when attributes are not recorded (see below) and not running
  as root; unknown member types; overlay xattrs (`trusted.overlay.*`,
  `user.overlay.*`) or the recorded-attributes xattr smuggled in pax headers;
- a diff ID or blob digest that does not match; a truncated or corrupt archive
  (including a tar that stops without its end-of-archive blocks).

Without privilege (not root), an unpack cannot give an entry its owner nor
make a device node, so it *records* the attributes instead, as containers/storage
does (see cowfs/overlay/override.py): each entry is made as far as the user
can (owned by the user, its mode applied with the user's own access kept), a
regular file or directory carries its real uid, gid, mode and type in the
`user.containers.override_stat` xattr, and a device node, FIFO or socket is
an empty regular file whose xattr says what it is. The layer root is always
marked, which tells a mount that the layer has recorded attributes. A symlink
cannot carry a user.* xattr: its owner is lost (it is the user's).

Writing (`write_layer`) turns an upper directory back into a layer tar:
whiteouts become `.wh.NAME` (mode 0600, as Docker writes them), opaque
directories get `.wh..wh..opq` (with the directory's mode), and a
directory with a redirect is written with its whole merged content (its lower
part is found through the redirect, which a layer tar cannot express) and an
opaque marker. An object with recorded attributes is written as they say (a
device as a device entry), never with the xattr itself, so that a layer
unpacked without privilege and written back is the layer it was. The output
is reproducible: entries sorted, numeric owners without names, no
atime/ctime, pax headers only for what needs them.

Giving the tar back (`write_split_layer`): `write_layer` gives the bytes of
a layer tar only when it was in that canonical form, so an unpack can also
record the layer's *tar-split* (as Docker keeps tar-split.json.gz per
layer): every byte of the uncompressed tar except the data of the regular
files that land in the tree unchanged, which are referred to by their path.
The tar is then rebuilt from it and the tree, byte for byte, whatever wrote
it (headers, names, padding, end blocks and anything after them). Hard
links, `.wh.` markers, sparse and empty files keep what data they have in
the tar-split. The file is gzip-compressed; inside, the magic
`cowfs-tar-split\\x01` and then records, big-endian:

    R  u32 N, N bytes            N bytes of the tar, as they were
    F  u64 SIZE, u16 N, N bytes  SIZE bytes of the tar: the data of the file at this path under diff/
    E  u64 LENGTH, 32 bytes      the end: the tar's length and sha256 (the diff ID), nothing after it

A file's data is read by its path without following any symlink, and
must have the size recorded; the whole must give the diff ID.
"""

import contextlib
import errno
import gzip
import hashlib
import os
import shutil
import stat
import struct
import subprocess
import sys
import tarfile
import threading
import time
import zlib

from cowfs.errors import CowfsError
from cowfs.formatting import docker_size, human_seconds
from cowfs.overlay import override
from cowfs.overlay.whiteout import (
    METACOPY,
    OCI_OPAQUE,
    PREFIXES,
    REDIRECT,
    TRUSTED_PREFIX,
    USER_PREFIX,
    get_marker,
    is_aufs_metadata,
    is_oci_marker,
    is_opaque,
    is_whiteout,
    make_whiteout,
    oci_marked_name,
    oci_marker,
    set_opaque,
)

CHUNK = 1 << 20
TAR_BUFFER = 256 << 10  # what tarfile reads at once; less than _SplitRecorder.WINDOW (see there)
GZIP_MAGIC = b"\x1f\x8b"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
XATTR_PAX = "SCHILY.xattr."
# The mode of a `.wh.NAME` entry: Docker's overlay2 writes every whiteout as a regular file 0600, whatever
# the mode of the character device in the upper (the kernel makes it 0000); an opaque marker takes its
# directory's mode.
WHITEOUT_MODE = 0o600


class ArchiveError(CowfsError):
    """A layer or image archive that cowfs refuses; str() is the one-line message to show."""

    def __init__(self, archive, reason, member=None):
        self.archive, self.reason, self.member = archive, reason, member
        where = f"{archive}: member {member!r}: " if member is not None else f"{archive}: "
        super().__init__(where + reason)


# -- streams ------------------------------------------------------------------------------------

class HashingReader:
    """Reads through `f`, keeping the sha256, the byte count and the last 1024 bytes of what was read."""

    def __init__(self, f):
        self.f = f
        self.sha = hashlib.sha256()
        self.count = 0
        self.tail = b""

    def read(self, n=-1):
        data = self.f.read(n)
        if data:
            self.sha.update(data)
            self.count += len(data)
            self.tail = (self.tail + data[-1024:])[-1024:]
        return data

    def drain(self):
        while self.read(CHUNK):
            pass

    @property
    def digest(self):
        return "sha256:" + self.sha.hexdigest()


class HashingWriter:
    """Writes through to `f` (or nowhere when None), keeping the sha256 and the size of what was written."""

    def __init__(self, f=None):
        self.f = f
        self.sha = hashlib.sha256()
        self.count = 0

    def write(self, data):
        self.sha.update(data)
        self.count += len(data)
        if self.f is not None:
            self.f.write(data)
        return len(data)

    def tell(self):
        return self.count

    def flush(self):
        if self.f is not None:
            self.f.flush()

    @property
    def digest(self):
        return "sha256:" + self.sha.hexdigest()


class _Prefixed:
    """A reader that gives back `head` before the rest of `f` (after peeking at magic bytes)."""

    def __init__(self, head, f):
        self.head, self.f = head, f

    def read(self, n=-1):
        if self.head:
            if n is None or n < 0:
                data, self.head = self.head + self.f.read(), b""
                return data
            data, self.head = self.head[:n], self.head[n:]
            if len(data) < n:
                data += self.f.read(n - len(data))
            return data
        return self.f.read(n)


class _ZstdProcess:
    """Decompress with the `zstd` binary, fed from a thread (for when the zstandard module is missing)."""

    def __init__(self, f, binary):
        self.proc = subprocess.Popen([binary, "-dcq"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE)

        def feed():
            try:
                for chunk in iter(lambda: f.read(CHUNK), b""):
                    self.proc.stdin.write(chunk)
            except (OSError, ValueError):  # the reader stopped early, or a broken pipe: zstd then sees
                pass  # its input end short, and read() raises with zstd's own message
            finally:
                try:
                    self.proc.stdin.close()
                except OSError:
                    pass

        self.thread = threading.Thread(target=feed, daemon=True)
        self.thread.start()

    def read(self, n=-1):
        data = self.proc.stdout.read(n)
        if not data:
            rc = self.proc.wait()
            self.thread.join()
            if rc != 0:
                raise EOFError("zstd: " + os.fsdecode(self.proc.stderr.read()).strip())
        return data

    def close(self):
        self.proc.kill()  # first: it may be waiting for input that is slow to come (does nothing once it ended)
        self.proc.stdout.close()
        self.proc.wait()
        self.thread.join()


def zstd_available():
    try:
        import zstandard  # noqa: F401
        return True
    except ImportError:
        return shutil.which("zstd") is not None


def decompressed(f, archive):
    """A reader of `f` uncompressed: gzip and zstd are recognised by their magic bytes, anything else is plain."""
    head = f.read(4)
    raw = _Prefixed(head, f)
    if head.startswith(GZIP_MAGIC):
        return gzip.GzipFile(fileobj=raw, mode="rb")
    if head == ZSTD_MAGIC:
        try:
            import zstandard
            return zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True)
        except ImportError:
            binary = shutil.which("zstd")
            if binary is None:
                raise ArchiveError(archive, "zstd-compressed, and neither the zstandard module "
                                   "nor the zstd command is installed")
            return _ZstdProcess(raw, binary)
    return raw


class Progress:
    """One line on stderr about every second while a long read goes on (nothing for short ones)."""

    INTERVAL = 1.0  # seconds between two lines

    def __init__(self, label, total=None, stream=None):
        self.label, self.total = label, total
        self.stream = stream if stream is not None else sys.stderr
        self.interval = self.INTERVAL
        self.start = self.last = time.monotonic()
        self.shown = False

    def update(self, done):
        now = time.monotonic()
        if now - self.last < self.interval:
            return
        self.last = now
        self.shown = True
        of = f" of {docker_size(self.total)} ({100 * done // max(self.total, 1)}%)" if self.total else ""
        print(f"cowfs: {self.label}: {docker_size(done)}{of}", file=self.stream, flush=True)

    def finish(self, done):
        if self.shown:
            took = time.monotonic() - self.start
            print(f"cowfs: {self.label}: {docker_size(done)} in {human_seconds(took)}", file=self.stream, flush=True)


class ProgressFile:
    """A seekable file whose reads report the position to a Progress."""

    def __init__(self, f, progress):
        self.f, self.progress = f, progress

    def read(self, n=-1):
        data = self.f.read(n)
        self.progress.update(self.f.tell())
        return data

    def seek(self, *args):
        return self.f.seek(*args)

    def tell(self):
        return self.f.tell()

    def close(self):
        self.f.close()


# -- reading a layer ------------------------------------------------------------------------------

def normalise_name(name, archive):
    """The member's path relative to the layer root ("" for the root itself); refuses absolute and `..` names."""
    if name.startswith("/"):
        raise ArchiveError(archive, "absolute path in a layer", name)
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise ArchiveError(archive, "'..' in a member name", name)
    if "\0" in name:
        raise ArchiveError(archive, "NUL byte in a member name", name)
    return "/".join(parts)


class _Unpacker:
    """The state of one layer being unpacked into `dest` (a fresh directory)."""

    def __init__(self, dest, archive, prefix, allow_devices, same_owner, record=False):
        self.dest, self.archive, self.prefix = dest, archive, prefix
        self.allow_devices, self.same_owner = allow_devices, same_owner
        self.record = record  # keep owners, modes and types in the override xattr (see the module docstring)
        self.explicit = {}   # rel -> type of the member that created it
        self.implicit = set()  # directories created only as parents of later members
        self.dir_attrs = []  # (rel, member) applied at the end, deepest first
        self.on_data = None  # called (offset of the data in the tar, size, rel) before a file's data is copied
        self.size = 0
        self.hashes = {}  # rel (bytes) -> sha256 hex of the data written: the tree digest need not read it again

    def fail(self, reason, member):
        raise ArchiveError(self.archive, reason, member)

    def real(self, rel):
        return os.path.join(self.dest, rel) if rel else self.dest

    def parent_dir(self, rel, member):
        """Make sure every directory above `rel` is a real directory of the layer (creating missing ones)."""
        parts = rel.split("/")[:-1]
        for i in range(len(parts)):
            sub = "/".join(parts[:i + 1])
            path = self.real(sub)
            try:
                st = os.lstat(path)
            except FileNotFoundError:
                os.mkdir(path, 0o700)  # no one else's until its mode is given, as every object
                os.chmod(path, 0o755)  # whatever the umask: Docker's daemon unpacks under umask 022
                self.implicit.add(sub)
                if self.record:  # owned by root, as a privileged unpack makes it
                    override.write(path, override.Override(0, 0, stat.S_IMODE(os.lstat(path).st_mode),
                                                           stat.S_IFDIR))
                continue
            if stat.S_ISLNK(st.st_mode):
                self.fail(f"goes through the symlink {sub!r} of the layer", member)
            if not stat.S_ISDIR(st.st_mode):
                self.fail(f"goes through {sub!r}, which is not a directory", member)

    def claim(self, rel, kind, member):
        """Refuse a second member for one path; a directory may name an implicitly created directory."""
        if rel in self.explicit:
            self.fail("duplicate entry (an earlier member has the same path)", member)
        exists = os.path.lexists(self.real(rel))
        if exists and not (kind == "dir" and rel in self.implicit):
            self.fail("conflicts with an earlier member (a whiteout or a directory made for its children)", member)
        self.explicit[rel] = kind
        self.implicit.discard(rel)

    def xattrs(self, info, rel, member):
        items = []
        for key, value in sorted(info.pax_headers.items()):
            if not key.startswith(XATTR_PAX):
                continue
            name = key[len(XATTR_PAX):]
            if name.startswith(PREFIXES):
                self.fail(f"carries the overlay's own xattr {name!r}", member)
            if override.is_override(name):
                self.fail(f"carries the recorded-attributes xattr {name!r} (only an unpack may write it)", member)
            items.append((name, value.encode("utf-8", "surrogateescape")))
        return items

    @staticmethod
    def set_xattrs(path, xattrs):
        """Set a member's xattrs; a namespace the filesystem or our privileges refuse is skipped."""
        for name, value in xattrs:
            try:
                os.setxattr(path, name, value, follow_symlinks=False)
            except OSError as e:
                if e.errno not in (errno.ENOTSUP, errno.EPERM):
                    raise

    def apply_attrs(self, path, info, xattrs, is_link=False, kind=None, rdev=0):
        """Give the object at `path` the attributes of member `info`; when recording, `kind` (S_IFMT
        bits) is what it stands for: its owner, mode and type go to the override xattr, and on disk
        it keeps its owner (the user) and the user's own access.

        The order is Docker's and umoci's: owner, xattrs, mode, times. chown drops a file's
        `security.capability` and its set-id bits, so both are given after it; the mode last,
        so that it is the member's whatever an ACL among the xattrs did to it."""
        if self.same_owner:
            os.lchown(path, info.uid, info.gid)
        self.set_xattrs(path, xattrs)
        mode = info.mode & 0o7777
        if self.record and kind is not None:
            if kind == stat.S_IFDIR:
                os.chmod(path, mode | 0o700)
            elif kind == stat.S_IFREG:
                os.chmod(path, mode | 0o600)
            else:
                os.chmod(path, 0o600)  # an empty stand-in for a device, FIFO or socket
            override.write(path, override.Override(info.uid, info.gid, mode, kind, rdev))
        elif not is_link:
            os.chmod(path, mode)
        os.utime(path, ns=(int(info.mtime * 1e9),) * 2, follow_symlinks=False)

    def stand_in(self, path):
        """An empty regular file at `path`, for an object recorded as another type."""
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600))

    def add(self, tf, info):
        member = info.name
        rel = normalise_name(member, self.archive)
        base = rel.rpartition("/")[2]
        if not rel:  # the layer root ("./"): its attributes are the mount's business
            if not info.isdir():
                self.fail("the layer root is not a directory", member)
            return
        xattrs = self.xattrs(info, rel, member)
        self.parent_dir(rel, member)
        parent = rel.rpartition("/")[0]
        if base == OCI_OPAQUE:
            if rel in self.explicit:
                self.fail("duplicate entry (an earlier member has the same path)", member)
            self.explicit[rel] = "opaque"  # no object on disk: the marker is an xattr of its directory
            set_opaque(self.real(parent), self.prefix)
            return
        if is_aufs_metadata(base):
            return  # Docker skips it too
        if is_oci_marker(base):
            target = (parent + "/" if parent else "") + oci_marked_name(base)
            if target in self.explicit:
                self.fail("whiteout for a member of the same layer", member)
            self.claim(target, "whiteout", member)
            make_whiteout(self.real(target))
            if self.same_owner:
                os.lchown(self.real(target), info.uid, info.gid)
            return
        path = self.real(rel)
        if info.isdir():
            self.claim(rel, "dir", member)
            if not os.path.lexists(path):
                os.mkdir(path, 0o700)
            self.set_xattrs(path, xattrs)
            self.dir_attrs.append((rel, info))
            return
        if info.isreg():
            self.claim(rel, "file", member)
            if self.on_data is not None and info.size and not info.issparse():
                self.on_data(info.offset_data, info.size, rel)  # its data lands in diff/REL unchanged
            src = tf.extractfile(info)
            sha = hashlib.sha256()
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
            with os.fdopen(fd, "wb", buffering=0) as out:
                while data := src.read(CHUNK):
                    sha.update(data)
                    out.write(data)
            self.hashes[os.fsencode(rel)] = sha.hexdigest()
            self.size += info.size
            kind, rdev = stat.S_IFREG, 0
        elif info.issym():
            self.claim(rel, "symlink", member)
            os.symlink(info.linkname, path)
            self.apply_attrs(path, info, xattrs, is_link=True)
            return
        elif info.islnk():
            target = info.linkname
            if target.startswith("/"):
                self.fail(f"hard link to an absolute path {target!r} (out of the layer)", member)
            try:
                trel = normalise_name(target, self.archive)
            except ArchiveError:
                self.fail(f"hard link out of the layer ({target!r})", member)
            if self.explicit.get(trel) not in ("file", "fifo", "device", "symlink"):
                self.fail(f"hard link to {target!r}, which is not an earlier file of this archive", member)
            self.claim(rel, "file", member)
            os.link(self.real(trel), path, follow_symlinks=False)
            return  # a hard link shares its target's attributes
        elif info.isfifo():
            self.claim(rel, "fifo", member)
            kind, rdev = stat.S_IFIFO, 0
            # Recorded, a FIFO is a regular file: user.* xattrs exist only on files and directories,
            # so a real FIFO could not keep its owner and mode. The mount shows it as a FIFO, and
            # the kernel runs a FIFO's pipe itself, so the stand-in's (empty) content never shows.
            if self.record:
                self.stand_in(path)
            else:
                os.mkfifo(path, 0o600)
        elif info.ischr() or info.isblk():
            if not self.allow_devices and not self.record:
                self.fail("device node (only root may create one)", member)
            self.claim(rel, "device", member)
            kind = stat.S_IFCHR if info.ischr() else stat.S_IFBLK
            rdev = os.makedev(info.devmajor, info.devminor)
            if self.record and kind == stat.S_IFCHR and rdev == 0:
                make_whiteout(path)  # what a privileged unpack makes of it too (any user may make this one)
                self.apply_attrs(path, info, xattrs)  # its owner is the user's: a whiteout's means nothing
                return
            if self.record:  # only root may make a device node: an empty file records it
                self.stand_in(path)
            else:
                os.mknod(path, kind | 0o600, rdev)
        else:
            self.fail(f"unsupported member type {info.type!r}", member)
        self.apply_attrs(path, info, xattrs, kind=kind, rdev=rdev)

    def finish(self):
        for rel, info in sorted(self.dir_attrs, key=lambda item: item[0].count("/"), reverse=True):
            self.apply_attrs(self.real(rel), info, [], kind=stat.S_IFDIR)
        if self.record:  # the mark of a layer with recorded attributes, as a privileged unpack leaves its root
            override.mark(self.dest)


def unpack_layer(f, dest, archive, expected=None, prefix=TRUSTED_PREFIX, allow_devices=None, progress=None,
                 record=None, split=None, hashes=None):
    """Unpack the layer tar read from `f` (plain, gzip or zstd) into the empty directory `dest`.

    Returns (diff_id, size): the sha256 of the uncompressed tar as "sha256:HEX"
    and the bytes the layer's objects hold. `dest` is left half-written when
    ArchiveError is raised: the caller unpacks into a staging directory.
    `record` (default: when not root) records owners, modes and types in the
    override xattr instead of making them (see the module docstring).
    `split`, a file path, gets the layer's tar-split (see "Giving the tar
    back" in the module docstring); it is not written if the recording
    fails, which only makes the layer's save fall back to `write_layer`.
    `hashes`, a dict, gets the sha256 (hex) of each regular file written, by
    its path (bytes) under `dest`: `layer_content` then reads none again.

    Raises:
        ArchiveError: a hostile, broken or mismatching archive (see the module docstring).
    """
    if allow_devices is None:
        allow_devices = os.geteuid() == 0
    if record is None:
        record = os.geteuid() != 0
    stream = decompressed(f, archive)
    hashed = HashingReader(stream)
    unpacker = _Unpacker(dest, archive, prefix, allow_devices, same_owner=os.geteuid() == 0 and not record,
                         record=record)
    reader = hashed
    if split is not None:
        reader = _SplitRecorder(hashed, split)
        unpacker.on_data = reader.reference
    member = None
    try:
        # reads of TAR_BUFFER, not tarfile's 10 KiB records: a Python call less per 10 KiB through the readers
        with tarfile.open(fileobj=reader, mode="r|", errorlevel=2, bufsize=TAR_BUFFER) as tf:
            for info in tf:
                member = info.name
                unpacker.add(tf, info)
                if progress is not None:
                    progress.update(hashed.count)
            member = None
            unpacker.finish()
        while reader.read(CHUNK):  # what follows the end-of-archive blocks (the diff ID covers it)
            pass
        if reader is not hashed:
            reader.finish(hashed.sha.digest())
    except (EOFError, tarfile.TarError, zlib.error, gzip.BadGzipFile) as e:
        reason = str(e) or type(e).__name__
        raise ArchiveError(archive, f"truncated or corrupt archive ({reason})", member) from None
    except OSError as e:
        raise ArchiveError(archive, f"cannot unpack: {e.strerror or e}", member) from None
    finally:
        close = getattr(stream, "close", None)
        if close is not None:
            close()
        if reader is not hashed:
            reader.close()
    if hashed.count % 512 or hashed.tail != bytes(len(hashed.tail)) or hashed.count < 1024:
        raise ArchiveError(archive, "truncated archive (no end-of-archive blocks)")
    if expected is not None and hashed.digest != expected:
        raise ArchiveError(archive, f"digest mismatch: expected {expected}, got {hashed.digest}")
    if hashes is not None:
        hashes.update(unpacker.hashes)
    return hashed.digest, unpacker.size


# -- giving the tar back: the tar-split ----------------------------------------------------------------

SPLIT_FILE = "tar-split.gz"  # next to a stored layer's diff/
SPLIT_MAGIC = b"cowfs-tar-split\x01"
_RAW, _FILE, _END = b"R", b"F", b"E"
_SPLIT_RAW_MAX = 1 << 20  # a raw record holds at most this many bytes


class SplitCorrupt(CowfsError):
    """A tar-split that cannot be read (truncated, not one, a bad record): the layer has none, in effect."""


class SplitMismatch(CowfsError):
    """The tree of a layer no longer holds what its tar-split refers to; str() says what (one line)."""


class _SplitRecorder:
    """A reader through `f` (the uncompressed tar, as hashed) that writes the tar-split of what is read to the
    file `path`: the bytes themselves, except the data that `reference` names, which is in diff/ already.

    tarfile's stream reads ahead of the member it is at (at most its buffer, TAR_BUFFER), so a byte is written
    only when it is WINDOW bytes old: the unpacker names a member's data (`reference`) before reading it,
    hence before its first byte is written. Memory: at most 2 * WINDOW. Should a reference come too late
    (never, with tarfile as it is), the recording stops and no tar-split is written: never a wrong one."""

    WINDOW = 1 << 20

    def __init__(self, f, path):
        self.f, self.path = f, path
        self.out = gzip.GzipFile(path, "wb", compresslevel=6, mtime=0)
        self.out.write(SPLIT_MAGIC)
        self.pos = 0  # bytes read
        self.done = 0  # bytes before this are in the tar-split (raw, or in a file record)
        self.pending = bytearray()  # the bytes [done, pos)
        self.refs = []  # (offset, size, rel) named and not reached yet, in order
        self.skip_to = 0  # the end of the data of the file record written last
        self.broken = False

    def read(self, n=-1):
        data = self.f.read(n)
        if data and not self.broken:
            self.pending += data
            self.pos += len(data)
            if len(self.pending) > 2 * self.WINDOW:
                self._write(self.pos - self.WINDOW)
        return data

    def reference(self, offset, size, rel):
        """The `size` bytes at `offset` in the tar are the data of the file diff/`rel`, which the unpacker
        copies there unchanged."""
        if offset < max(self.done, self.skip_to, self.refs[-1][0] + self.refs[-1][1] if self.refs else 0):
            self.broken = True  # already written as raw bytes (or overlapping): give up, see the class docstring
            self.pending = bytearray()
            return
        self.refs.append((offset, size, os.fsencode(rel)))

    def _write(self, upto):
        out = self.out
        while self.done < upto:
            if self.done < self.skip_to:
                n = min(upto, self.skip_to) - self.done
            elif self.refs and self.refs[0][0] == self.done:
                offset, size, rel = self.refs.pop(0)
                out.write(_FILE + struct.pack(">QH", size, len(rel)) + rel)
                self.skip_to = offset + size
                continue
            else:
                n = min(upto, self.refs[0][0] if self.refs else upto, self.done + _SPLIT_RAW_MAX) - self.done
                out.write(_RAW + struct.pack(">I", n))
                out.write(memoryview(self.pending)[:n])
            del self.pending[:n]
            self.done += n

    def finish(self, sha256):
        """Write what is left and the end record (the tar's length and sha256); an error or a broken recording
        leaves no file."""
        try:
            if not self.broken:
                self._write(self.pos)
                if self.refs or self.done != self.pos:
                    self.broken = True
            if not self.broken:
                self.out.write(_END + struct.pack(">Q", self.pos) + sha256)
            self.out.close()
        except OSError:
            self.broken = True
            raise
        finally:
            if self.broken:
                self.close()

    def close(self):
        """Drop the file unless `finish` completed it."""
        if self.broken or not self.out.closed:
            self.out.close()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)


def _split_records(f):
    """The records of the tar-split read from `f` (binary, gzip-compressed): ("raw", bytes), ("file", size, rel)
    and at last ("end", length, sha256 bytes); SplitCorrupt for anything else."""
    def exactly(n):
        data = g.read(n)
        if len(data) != n:
            raise SplitCorrupt("truncated")
        return data

    try:
        with gzip.GzipFile(fileobj=f) as g:
            if g.read(len(SPLIT_MAGIC)) != SPLIT_MAGIC:
                raise SplitCorrupt("not a cowfs tar-split")
            while True:
                kind = exactly(1)
                if kind == _RAW:
                    (n,) = struct.unpack(">I", exactly(4))
                    yield "raw", exactly(n)
                elif kind == _FILE:
                    size, n = struct.unpack(">QH", exactly(10))
                    rel = exactly(n)
                    parts = rel.split(b"/")
                    if not rel or any(p in (b"", b".", b"..") or b"\0" in p for p in parts):
                        raise SplitCorrupt(f"bad path {rel!r}")
                    yield "file", size, rel
                elif kind == _END:
                    length, digest = struct.unpack(">Q32s", exactly(40))
                    if g.read(1):
                        raise SplitCorrupt("data after the end record")
                    yield "end", length, digest
                    return
                else:
                    raise SplitCorrupt(f"unknown record {kind!r}")
    except (OSError, EOFError, zlib.error, struct.error) as e:  # gzip.BadGzipFile is an OSError
        raise SplitCorrupt(str(e) or type(e).__name__) from None


def check_split(path):
    """Read the tar-split at `path` through; SplitCorrupt when it cannot be, OSError when it cannot be opened."""
    with open(path, "rb") as f:
        total = 0
        for record in _split_records(f):
            if record[0] == "raw":
                total += len(record[1])
            elif record[0] == "file":
                total += record[1]
            elif record[1] != total:
                raise SplitCorrupt(f"records {total} bytes, its end {record[1]}")


def _open_beneath(root, rel):
    """A read-only fd of the regular file `rel` (bytes) under the directory `root`, following no symlink."""
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        parts = rel.split(b"/")
        for part in parts[:-1]:
            sub = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
            os.close(fd)
            fd = sub
        return os.open(parts[-1], os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=fd)
    finally:
        os.close(fd)


def write_split_layer(diff, split, out):
    """Write the layer tar that was unpacked into `diff`, byte for byte, from its tar-split (the file `split`)
    and the files of `diff`, to `out`. Returns (diff_id, size in bytes of the tar).

    Raises:
        SplitCorrupt: the tar-split cannot be read (or opened).
        SplitMismatch: a file it refers to is not in the tree as it was unpacked (one line saying which).
    """
    hashed = HashingWriter(out)
    try:
        f = open(split, "rb")
    except OSError as e:
        raise SplitCorrupt(f"{SPLIT_FILE}: {e.strerror}") from None
    with f:
        for record in _split_records(f):
            if record[0] == "raw":
                hashed.write(record[1])
            elif record[0] == "file":
                _copy_tree_file(diff, record[2], record[1], hashed)
            elif (record[1], record[2]) != (hashed.count, hashed.sha.digest()):
                raise SplitMismatch(f"its tree gives a tar of sha256:{hashed.sha.hexdigest()[:12]}, "
                                    f"not the one imported (changed since)")
    return hashed.digest, hashed.count


def _copy_tree_file(diff, rel, size, out):
    name = os.fsdecode(rel)
    try:
        fd = _open_beneath(diff, rel)
    except OSError as e:
        if e.errno == errno.ENOENT:
            raise SplitMismatch(f"{name} is missing from its tree") from None
        if e.errno in (errno.ELOOP, errno.ENOTDIR):
            raise SplitMismatch(f"{name} (or a directory above it) is a symlink or not what was imported") from None
        raise SplitMismatch(f"{name}: {e.strerror}") from None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise SplitMismatch(f"{name} in its tree is not a regular file (changed since it was imported)")
        if st.st_size != size:
            raise SplitMismatch(f"{name} in its tree holds {st.st_size} bytes, {size} when imported")
        left = size
        while left:
            data = f.read(min(left, CHUNK))
            if not data:
                raise SplitMismatch(f"{name} in its tree shrank while being read")
            out.write(data)
            left -= len(data)


# -- writing a layer ------------------------------------------------------------------------------

class _Writer:
    """Emits the entries of one layer tar in a fixed order with normalised metadata."""

    def __init__(self, tf, prefix, layers, clamp_mtime, recorded=False):
        self.tf, self.prefix, self.layers = tf, prefix, layers
        self.clamp = clamp_mtime
        self.recorded = recorded  # the upper is marked: its whiteouts' owners are this user's, not the layer's
        self.links = {}  # (st_dev, st_ino) -> name of the first member for that inode

    def mtime(self, st):
        t = int(st.st_mtime)
        return min(t, self.clamp) if self.clamp is not None else t

    def xattrs(self, path):
        """(pax headers of the xattrs to archive, the recorded attributes or None) of the object at `path`."""
        try:
            names = os.listxattr(path, follow_symlinks=False)
        except OSError:
            return {}, None
        out = {}
        recorded = None
        for name in sorted(names):
            if override.is_override(name):  # written as the member's attributes, never as itself
                recorded = override.read(path, os.lstat(path).st_mode)
                continue
            if name.startswith(PREFIXES):
                continue
            if not name.startswith(("user.", "security.", "trusted.")):
                continue
            try:
                value = os.getxattr(path, name, follow_symlinks=False)
            except OSError:
                continue
            out[XATTR_PAX + name] = value.decode("utf-8", "surrogateescape")
        return out, recorded

    def shown(self, path, st):
        """(uid, gid, mode) of a directory as its member says them: recorded, or as on disk."""
        recorded = self.xattrs(path)[1] if stat.S_ISDIR(st.st_mode) else None
        if recorded is not None:
            return recorded.uid, recorded.gid, recorded.mode
        return st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)

    def marker(self, name, mode, uid, gid):
        info = tarfile.TarInfo(name)
        info.type = tarfile.REGTYPE
        info.mode = mode & 0o777
        info.uid, info.gid = uid, gid
        info.uname = info.gname = ""
        info.mtime = 0  # as Docker writes its whiteout markers
        self.tf.addfile(info)

    def entry(self, name, path, st, data=None):
        """One object as a member named `name` (hard links to an inode already written become links); a
        metadata-only copy (metacopy) reads its data from `data`, the lower file holding it."""
        info = tarfile.TarInfo(name)
        info.mode = stat.S_IMODE(st.st_mode)
        info.uid, info.gid = st.st_uid, st.st_gid
        info.uname = info.gname = ""
        info.mtime = self.mtime(st)
        info.pax_headers, recorded = self.xattrs(path) if not stat.S_ISLNK(st.st_mode) else ({}, None)
        fmt = stat.S_IFMT(st.st_mode)
        if recorded is not None:
            info.uid, info.gid, info.mode = recorded.uid, recorded.gid, recorded.mode
            fmt = recorded.kind or fmt
        if fmt != stat.S_IFDIR and st.st_nlink > 1:
            key = (st.st_dev, st.st_ino)
            if key in self.links:
                info.type, info.linkname = tarfile.LNKTYPE, self.links[key]
                info.pax_headers = {}
                self.tf.addfile(info)
                return
            self.links[key] = name
        if fmt == stat.S_IFREG:
            info.type, info.size = tarfile.REGTYPE, st.st_size
            with open(data or path, "rb") as src:
                self.tf.addfile(info, src)
            return
        if fmt == stat.S_IFDIR:
            info.type = tarfile.DIRTYPE
        elif fmt == stat.S_IFLNK:
            info.type, info.linkname = tarfile.SYMTYPE, os.readlink(path)
        elif fmt == stat.S_IFIFO:
            info.type = tarfile.FIFOTYPE
        elif fmt in (stat.S_IFCHR, stat.S_IFBLK):
            info.type = tarfile.CHRTYPE if fmt == stat.S_IFCHR else tarfile.BLKTYPE
            rdev = recorded.rdev if recorded is not None else st.st_rdev
            info.devmajor, info.devminor = os.major(rdev), os.minor(rdev)
        else:
            return  # sockets are not archived (tar cannot hold them)
        self.tf.addfile(info)

    def upper_dir(self, real, rel):
        """The upper directory `real` (merged path `rel`, "" for the root): its changes as OCI entries."""
        for name in sorted(os.listdir(real)):
            path = os.path.join(real, name)
            child = f"{rel}/{name}" if rel else name
            st = os.lstat(path)
            if is_whiteout(st):
                head = rel + "/" if rel else ""
                # in a marked upper the whiteout is the unprivileged user's: root's, as root would make it
                owner = (0, 0) if self.recorded else (st.st_uid, st.st_gid)
                self.marker(head + oci_marker(name), WHITEOUT_MODE, *owner)
                continue
            data = None
            if stat.S_ISREG(st.st_mode) and get_marker(path, self.prefix, METACOPY) is not None:
                if self.layers is None:  # its data is in a lower layer
                    raise ArchiveError(path, "is a metadata-only copy (metacopy): give the lower layers (--lower) "
                                       "that hold its data")
                data = self.layers.resolve_required("/" + child).data
            self.entry(child, path, st, data)
            if not stat.S_ISDIR(st.st_mode):
                continue
            uid, gid, mode = self.shown(path, st)
            if get_marker(path, self.prefix, REDIRECT) and self.layers is not None:
                self.marker(child + "/" + OCI_OPAQUE, mode, uid, gid)
                self.merged_dir("/" + child, child)
            else:
                if is_opaque(path, self.prefix):
                    self.marker(child + "/" + OCI_OPAQUE, mode, uid, gid)
                self.upper_dir(path, child)

    def merged_dir(self, merged, rel):
        """Everything the merged view shows under `merged`, from whichever layer (for a redirected directory)."""
        node = self.layers.resolve_required(merged)
        for name, _, _entry in sorted(self.layers.list_dir(node)):  # names are unique: sorted by name
            child_merged = merged + "/" + name
            child = self.layers.resolve_required(child_merged)
            st = os.lstat(child.real)
            self.entry(f"{rel}/{name}", child.real, st, child.data)
            if stat.S_ISDIR(st.st_mode):
                self.merged_dir(child_merged, f"{rel}/{name}")


def write_layer(upper, out, lowers=(), prefix=TRUSTED_PREFIX, clamp_mtime=None):
    """Write the changes recorded in the overlay upper directory `upper` as a layer tar to `out`.

    `lowers` (topmost first) are needed only to expand redirected directories;
    a redirect with no lowers given is an error. `clamp_mtime` caps every
    mtime (as SOURCE_DATE_EPOCH does) for archives that must not depend on
    when things happened. Returns (diff_id, size in bytes of the tar).
    """
    from cowfs.overlay.lookup import Layers
    from cowfs.overlay.stack import Stack

    layers = None
    if lowers:
        layers = Layers(Stack(lowers=[os.path.abspath(p) for p in lowers], upper=os.path.abspath(upper),
                              redirect_dir="follow", metacopy=True, userxattr=prefix == USER_PREFIX))
    elif _has_redirect(upper, prefix):
        raise ArchiveError(upper, "has a redirected directory: give its lower layers (--lower) to expand it")
    hashed = HashingWriter(out)
    with tarfile.open(fileobj=hashed, mode="w", format=tarfile.PAX_FORMAT, encoding="utf-8") as tf:
        try:
            _Writer(tf, prefix, layers, clamp_mtime, override.is_marked(upper)).upper_dir(upper, "")
        except PermissionError as e:
            if e.errno != errno.EPERM or layers is None:
                raise
            # the stack refused to follow a redirect or metacopy marker, as the kernel does under userxattr
            raise ArchiveError(os.path.join(upper, e.filename.lstrip("/")),
                               "is a redirect or metadata-only copy, which an overlay with userxattr does not "
                               "follow") from None
    return hashed.digest, hashed.count


def write_changes(merged, changes, out, clamp_mtime=None):
    """Write a list of changes between two views as a layer tar to `out`, as Docker's overlay2 does when it
    cannot read its upper directly (redirect_dir or metacopy on: its "naive" diff): in path order, each added
    or changed path as the merged view shows it (`merged`: a Layers over the whole stack), each deleted one
    as a `.wh.NAME` entry of mode 0, and no opaque markers (the entries a directory hides are deletions).
    `changes` is [(kind "A" | "C" | "D", merged path)]. Returns (diff_id, size in bytes of the tar)."""
    hashed = HashingWriter(out)
    with tarfile.open(fileobj=hashed, mode="w", format=tarfile.PAX_FORMAT, encoding="utf-8") as tf:
        writer = _Writer(tf, None, None, clamp_mtime)  # it reads no upper: names come from `merged`
        for kind, path in sorted(changes, key=lambda change: change[1]):  # Docker sorts them as strings
            head, _, name = path.strip("/").rpartition("/")
            if kind == "D":
                writer.marker((head + "/" if head else "") + oci_marker(name), 0, 0, 0)
                continue
            node = merged.resolve_required(path)
            writer.entry(path.strip("/"), node.real, os.lstat(node.real), node.data)
    return hashed.digest, hashed.count


def _has_redirect(upper, prefix):
    for dirpath, dirnames, _ in os.walk(upper):
        for name in dirnames:
            if get_marker(os.path.join(dirpath, name), prefix, REDIRECT):
                return True
    return False
