"""The filesystems under a stack, as the kernel overlay numbers them: the high bits of inode numbers (`xino=`),
which UUID origin file handles carry and when one is believed (`uuid=`), the overlay's own UUID.

The kernel gives the upper's filesystem the number 0 (kept for it even on a
mount without an upper) and every other filesystem of a layer the next one,
in layer order. When the layers span several filesystems, st_ino is the real
inode number with that number above its bits: from bit 33 up when every layer
gives the 32-bit handles of a filesystem without its own handle encoder
(ext4), else in the fewest top bits that hold the numbers (tmpfs, btrfs).
The kernel's `xino=off` shows the real number with a device number per
layer instead, which a FUSE mount cannot (one st_dev for all): cowfs keeps
the numbers unique under every `xino=`.

An origin file handle carries the UUID of the lower object's filesystem,
and is only followed into a layer on a filesystem with that UUID; with
`uuid=off` (all layers on the upper's filesystem) it carries the null UUID
and only a null one is followed. `uuid=on`, and `uuid=auto` on a new upper,
keep a random UUID of the overlay in `overlay.uuid` on the upper root (see
`settle_uuid`); the kernel derives its statfs f_fsid from it, which FUSE
has no way to pass on.
"""

import errno
import os
import uuid as uuidlib

from cowfs import mounttable
from cowfs.overlay import handles
from cowfs.overlay.whiteout import IMPURE, UUID

# Filesystems with 8-byte INO32_GEN handles from an encoder of their own: the kernel does not trust their
# inode numbers to stay below 32 bits.
OWN_HANDLE_ENCODER = {"xfs"}
FALLBACK_SHIFT = 56  # for a filesystem the stack did not name (a mount inside a layer): bits above any layer's


class Filesystems:
    """The filesystems of a stack's layers: their numbers, inode number bits and UUID rules."""

    def __init__(self, stack):
        self.uuid_mode = stack.uuid or "auto"  # settled further by `settle_uuid` on a mount with an upper
        self.warnings = []
        self._fsid = {}  # st_dev -> the kernel's number of that filesystem
        self._root = {}  # st_dev -> a layer root on it
        if stack.upper is not None:
            dev = os.stat(stack.upper).st_dev
            self._fsid[dev], self._root[dev] = 0, stack.upper
        count = 1  # number 0 stays the upper's even without one
        self._bad_uuid = set()  # numbers of lower filesystems whose UUID does not tell them apart
        lower_fsids = set()
        self._uuids = {}
        for root in list(stack.lowers) + list(stack.data_lowers):
            dev = os.stat(root).st_dev
            if dev not in self._fsid:
                self._fsid[dev], self._root[dev] = count, root
                if stack.upper is not None:
                    self._check_lower_uuid(stack, dev, lower_fsids)
                count += 1
            lower_fsids.add(self._fsid[dev])
        self.count = count
        self.one_fs = count - (stack.upper is None) == 1
        if self.uuid_mode == "off" and count > 1:
            self.uuid_mode = "null"
            self.warnings.append("uuid=off: the layers are not all on the upper's filesystem; going on "
                                 "with uuid=null")
        self.xino_bits = 0 if self.one_fs else self._xino_bits()
        self._next = count

    def _check_lower_uuid(self, stack, dev, lower_fsids):
        """As the kernel's ovl_lower_uuid_ok: a lower filesystem whose UUID is null (unless the stack uses
        a feature that forbids changing lowers offline) or shared with an earlier lower one cannot be
        told by its UUID, and origins are not followed into it (nor into the earlier one)."""
        uuid = self.uuid(dev)
        if stack.allow_offline_changes and stack.xino != "on" and uuid == handles.NULL_UUID:
            self._bad_uuid.add(self._fsid[dev])
            return
        for other, fsid in self._fsid.items():
            if fsid in lower_fsids and fsid != self._fsid[dev] and self.uuid(other) == uuid:
                self._bad_uuid.update((fsid, self._fsid[dev]))
                return

    @property
    def uuids_ambiguous(self):
        """Whether some lower filesystem cannot be told by its UUID (the kernel then turns index=on off)."""
        return bool(self._bad_uuid)

    def _xino_bits(self):
        """The high bits the kernel keeps for filesystem numbers: 32 when every layer's inode numbers fit
        in 32 bits, else just enough for the numbers (and one more, for its own overflow range)."""
        types = {(m.major, m.minor): m.fstype for m in mounttable.read_info()}
        for dev, root in self._root.items():
            try:
                kind, data = handles.file_handle(root)
            except OSError:
                kind, data = None, b""
            if kind != handles.FILEID_INO32_GEN or len(data) != 8 or \
                    types.get((os.major(dev), os.minor(dev))) in OWN_HANDLE_ENCODER:
                return (self.count - 1).bit_length() + 1  # ilog2(count - 1) + 2
        return 32

    def fsid(self, dev):
        """The kernel's number of the filesystem of device `dev`; one the layers did not name gets the next."""
        number = self._fsid.get(dev)
        if number is None:
            number = self._fsid[dev] = self._next
            self._next += 1
        return number

    def map_ino(self, dev, ino):
        """st_ino as the merged view shows an object of inode number `ino` on device `dev`."""
        number = self.fsid(dev)
        if number >= self.count:  # a filesystem no layer named: clear of theirs
            return ino | (number << FALLBACK_SHIFT)
        if not number or self.one_fs:
            return ino
        shift = 64 - self.xino_bits
        if ino >> shift:
            return ino  # the kernel's overflow: no room for the filesystem's number
        return ino | (number << (shift + 1))

    def uuid(self, dev):
        """The UUID of the filesystem of device `dev` (one of the layers')."""
        uuid = self._uuids.get(dev)
        if uuid is None:
            uuid = self._uuids[dev] = handles.fs_uuid(self._root[dev])
        return uuid

    @property
    def origin_uuid(self):
        """Whether origin file handles carry their filesystem's UUID (else the null UUID: uuid=off)."""
        return self.uuid_mode != "off"

    def handle_uuid(self, dev):
        """The UUID an origin file handle of an object on device `dev` carries."""
        return self.uuid(dev) if self.origin_uuid else handles.NULL_UUID

    def follows(self, dev, uuid):
        """Whether an origin handle carrying `uuid` is followed into the layer on device `dev`."""
        if self._fsid.get(dev) in self._bad_uuid:
            return False
        return uuid == self.uuid(dev) if self.origin_uuid else uuid == handles.NULL_UUID


def settle_uuid(filesystems, upper, prefix):
    """The overlay's UUID, as the kernel's ovl_init_uuid_xattr settles it at mount: with uuid=on or auto,
    `overlay.uuid` of the upper root if it holds one; else a new random one stored there, except that
    uuid=auto on an upper already used (its root is impure) goes on as uuid=null. A value that cannot be
    read or stored also means uuid=null, with a warning. Returns the UUID (None for null)."""
    if filesystems.uuid_mode not in ("on", "auto"):
        return None
    name, action = prefix + UUID, "get"
    try:
        held = os.getxattr(upper, name, follow_symlinks=False)
    except OSError as e:
        if e.errno != errno.ENODATA:
            return _no_uuid(filesystems, upper, action, e.strerror)
        held = None
    if held is not None:
        if len(held) == 16:
            return held
        return _no_uuid(filesystems, upper, action, f"{len(held)} bytes, not 16")
    if filesystems.uuid_mode == "auto":
        try:
            impure = os.getxattr(upper, prefix + IMPURE, follow_symlinks=False)
        except OSError as e:
            if e.errno != errno.ENODATA:
                return _no_uuid(filesystems, upper, action, e.strerror)
            filesystems.uuid_mode = "on"  # a new overlay
        else:
            if impure:
                filesystems.uuid_mode = "null"  # an overlay mounted before without one
                return None
    value, action = uuidlib.uuid4().bytes, "set"
    try:
        os.setxattr(upper, name, value, follow_symlinks=False)
    except OSError as e:
        return _no_uuid(filesystems, upper, action, e.strerror)
    return value


def _no_uuid(filesystems, upper, action, reason):
    filesystems.uuid_mode = "null"
    filesystems.warnings.append(f"upperdir {upper}: cannot {action} the overlay's uuid ({reason}); going on "
                                "with uuid=null")
    return None
