"""Who asks, and the privilege rules that change the kernel's answer for them (as Linux's cred.h).

Without CAP_SYS_ADMIN or CAP_FSETID the kernel lists xattrs and treats set-id
bits differently; the attribute and file operations share these rules.
"""

import dataclasses
import os
import stat

CAP_CHOWN = 0  # the capability bit giving a file another owner needs
CAP_SYS_ADMIN = 21  # the capability bit trusted.* xattrs need


def _capable(bit):
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("CapEff:"):
                    return bool(int(line.split()[1], 16) >> bit & 1)
    except (OSError, ValueError, IndexError):
        pass
    return os.geteuid() == 0


def may_use_trusted_xattrs():
    """Whether this process has CAP_SYS_ADMIN in the initial user namespace, which trusted.* xattrs (the
    overlay's default markers) need: the root of a user namespace has it there, not on the host's files."""
    return _in_initial_user_namespace() and _capable(CAP_SYS_ADMIN)


def _in_initial_user_namespace():
    """The initial user namespace maps every id to itself; any other maps only a part."""
    try:
        with open("/proc/self/uid_map") as f:
            return f.read().split() == ["0", "0", "4294967295"]
    except OSError:
        return True


def may_chown():
    """Whether this process has CAP_CHOWN: without it, a file of its own cannot be given to another owner."""
    return _capable(CAP_CHOWN)


@dataclasses.dataclass(frozen=True)
class Caller:
    """The process that asks, for answers that depend on it. Without CAP_SYS_ADMIN or CAP_FSETID
    the kernel answers differently; cowfs takes uid 0 as having them. None stands for root."""

    uid: int
    gid: int
    groups: tuple = ()

    def in_group(self, gid):
        return gid == self.gid or gid in self.groups


def privileged(caller):
    return caller is None or caller.uid == 0


def drop_set_id(fd, caller):
    """What a truncate or write by `caller` does to the file's set-id bits when the caller lacks
    CAP_FSETID, as Linux 6.x does: S_ISUID goes; S_ISGID goes when group-exec is set or
    the caller is not in the file's group."""
    if privileged(caller):
        return False
    st = os.fstat(fd)
    drop = st.st_mode & stat.S_ISUID
    if st.st_mode & stat.S_ISGID and (st.st_mode & stat.S_IXGRP or not caller.in_group(st.st_gid)):
        drop |= stat.S_ISGID
    if drop:
        os.fchmod(fd, stat.S_IMODE(st.st_mode) & ~drop)
    return bool(drop)
