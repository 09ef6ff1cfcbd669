"""Owner mapping between the IDs on disk and the IDs the mount shows: fuse-overlayfs's `uidmapping`,
`gidmapping`, `squash_to_root`, `squash_to_uid` and `squash_to_gid`, with the same syntax and meaning.

`uidmapping=ID:HOSTID:LEN[:ID2:HOSTID2:LEN2...]`: an owner ID..ID+LEN-1 on disk
shows as HOSTID..HOSTID+LEN-1 through the mount; an owner in no range shows as
the kernel's overflow ID (65534). A chown, and a new object's owner, go the
other way. The squash options replace every owner the mount shows (uid and
gid N win over root), and change nothing that is written.
"""

from __future__ import annotations

import dataclasses

MAX_ID = (1 << 32) - 1
OVERFLOW_DEFAULT = 65534


def parse_mapping(value):
    """The ((ID, HOSTID, LEN), ...) of a mapping option's value. Raises ValueError for a malformed one.

    As fuse-overlayfs: colon-separated triples of 32-bit unsigned numbers; empty parts are skipped."""
    parts = [p for p in value.split(":") if p]
    if not parts or len(parts) % 3:
        raise ValueError("not ID:HOSTID:LEN triples")
    if not all(p.isascii() and p.isdigit() and int(p) <= MAX_ID for p in parts):
        raise ValueError("not ID:HOSTID:LEN triples of unsigned 32-bit numbers")
    numbers = [int(p) for p in parts]
    return tuple(tuple(numbers[i:i + 3]) for i in range(0, len(numbers), 3))


def mapping_value(mapping):
    """The option value of a parsed mapping (the inverse of `parse_mapping`)."""
    return ":".join(f"{a}:{b}:{n}" for a, b, n in mapping)


def parse_id(value):
    """A squash_to_uid/squash_to_gid value. Raises ValueError."""
    if not (value.isascii() and value.isdigit() and int(value) <= MAX_ID):
        raise ValueError("not an unsigned 32-bit number")
    return int(value)


def _overflow(kind):
    try:
        with open(f"/proc/sys/kernel/overflow{kind}") as f:
            return int(f.read())
    except (OSError, ValueError):
        return OVERFLOW_DEFAULT


def _find(id_, mapping, shown, overflow):
    if not mapping:
        return id_
    for disk, host, length in mapping:
        if shown:
            if disk <= id_ < disk + length:
                return host + (id_ - disk)
        elif host <= id_ < host + length:
            return disk + (id_ - host)
    return overflow


@dataclasses.dataclass(frozen=True)
class IdMap:
    """The owner mapping of one mount; false when no option asks for any."""

    uidmapping: tuple = ()
    gidmapping: tuple = ()
    squash_to_root: bool = False
    squash_to_uid: int | None = None
    squash_to_gid: int | None = None
    overflow_uid: int = OVERFLOW_DEFAULT
    overflow_gid: int = OVERFLOW_DEFAULT

    @classmethod
    def of(cls, stack):
        """The mapping a stack's options ask for; the kernel's overflow IDs are read once, here."""
        given = cls(stack.uidmapping, stack.gidmapping, stack.squash_to_root, stack.squash_to_uid,
                    stack.squash_to_gid)
        if not given.uidmapping and not given.gidmapping:
            return given
        return dataclasses.replace(given, overflow_uid=_overflow("uid"), overflow_gid=_overflow("gid"))

    def __bool__(self):
        return bool(self.uidmapping or self.gidmapping or self.squash_to_root or self.squash_to_uid is not None
                    or self.squash_to_gid is not None)

    def shown_uid(self, uid):
        """The owner the mount shows for `uid` on disk."""
        if self.squash_to_uid is not None:
            return self.squash_to_uid
        if self.squash_to_root:
            return 0
        return _find(uid, self.uidmapping, True, self.overflow_uid)

    def shown_gid(self, gid):
        if self.squash_to_gid is not None:
            return self.squash_to_gid
        if self.squash_to_root:
            return 0
        return _find(gid, self.gidmapping, True, self.overflow_gid)

    def disk_uid(self, uid):
        """The owner written on disk for `uid` given through the mount (-1, "no change", stays)."""
        return uid if uid == -1 else _find(uid, self.uidmapping, False, self.overflow_uid)

    def disk_gid(self, gid):
        return gid if gid == -1 else _find(gid, self.gidmapping, False, self.overflow_gid)

    def show(self, attrs):
        """Map the owner of `attrs` (a getattr dict) in place, and return it."""
        if self:
            attrs["st_uid"], attrs["st_gid"] = self.shown_uid(attrs["st_uid"]), self.shown_gid(attrs["st_gid"])
        return attrs
