"""The union engine: every filesystem operation on the merged view, as plain Python (no FUSE).

Assumptions (as in the kernel's overlayfs):
- lower layers are read-only and never change while mounted; only this
  engine writes the upper, so lookups are cached until it changes it;
- the upper and the workdir are on one filesystem: each change is built in
  the workdir and renamed into the upper in one atomic step (renameat2 with
  RENAME_NOREPLACE, RENAME_EXCHANGE or RENAME_WHITEOUT), so a crash leaves
  the upper either before or after an operation, never in between;
- deletion markers and xattrs are in the kernel's format (see whiteout.py),
  so the kernel can mount an upper written here and the other way round.

Paths are merged paths ("/a/b"). Failures raise OSError with the errno the
kernel's overlay would give. Methods that change the upper hold one lock, so
the engine can serve a multithreaded daemon; reads and writes on open
handles do not take it, and neither does the copy of a file's data (see
`CopyUp._move_data` in copyup.py), so that one big copy-up does not stall every caller.

`Union` is the facade: it holds the engine's state and the few helpers every
part uses; the operations live by concern, as in the kernel's fs/overlayfs:
namespace.py (names: create, link, remove, rename), attributes.py (getattr and
attribute and xattr changes by path), files.py (open files), readdir.py
(listings), copyup.py (copy-up), locking.py (the engine lock),
credentials.py (the caller and its privileges), fileattr.py (chattr flags), override.py (recorded owners,
modes and types of rootless images) and idmap.py (owner mapping options).
"""

from __future__ import annotations

import errno
import os
import threading

from cowfs.errors import os_error
from cowfs.overlay import workdir
from cowfs.overlay.attributes import Attributes
from cowfs.overlay.copyup import CopyUp, ObjectLocks
from cowfs.overlay.credentials import Caller
from cowfs.overlay.events import Events
from cowfs.overlay.fileattr import FileAttrs
from cowfs.overlay.files import Files, Handle
from cowfs.overlay.idmap import IdMap
from cowfs.overlay.locking import locked
from cowfs.overlay.lookup import Layers, Node
from cowfs.overlay.namespace import Namespace
from cowfs.overlay.readdir import Listing
from cowfs.overlay.stack import Stack

__all__ = ["Caller", "Handle", "Union"]


class Union(Namespace, Attributes, Files, FileAttrs, Listing, CopyUp):
    """A mounted stack of layers, usable in-process: `Union(check(stack)).getattr("/etc/hosts")`."""

    def __init__(self, stack: Stack) -> None:
        self.stack = stack
        self.layers = Layers(stack)
        self.prefix = stack.prefix
        self.writable = stack.writable
        self.idmap = IdMap.of(stack)  # the owners shown and given through the mount (false: as on disk)
        self.work = None
        self._lock = threading.RLock()
        self._op = None  # the public operation running, for the "trigger" of copy-up events
        self.events = Events()
        self._listings = {}  # merged path -> readdir's answer, until the upper changes
        self._listed = 0  # the entries in _listings (see readdir.LISTED_KEPT)
        self._copied = set()  # identities of lower files copied up, to move open read handles over
        self._object_locks = ObjectLocks()
        self._workdir = None
        if stack.upper is not None:
            self._workdir = workdir.claim(stack, self.layers.filesystems)
            self.work = self._workdir.work
            self.layers.index = self._workdir.index
        self.warnings = self._workdir.warnings if self._workdir is not None else []

    # -- setup -----------------------------------------------------------------------------------
    def close(self) -> None:
        """Release the workdir; the engine must not be used afterwards."""
        if self._workdir is not None:
            self._workdir.close()

    def hand_over(self) -> None:
        """After fork, in the parent: the child (the daemon) holds the locks now; this process lets go of them."""
        if self._workdir is not None:
            self._workdir.hand_over()

    @locked
    def statfs(self) -> dict[str, int]:
        """The filesystem statistics of the upper (of the top lower on a read-only mount)."""
        sv = os.statvfs(self.stack.upper if self.stack.upper is not None else self.stack.lowers[0])
        return {key: getattr(sv, key) for key in (
            "f_bsize", "f_frsize", "f_blocks", "f_bfree", "f_bavail", "f_files", "f_ffree", "f_favail",
            "f_flag", "f_namemax")}

    # -- helpers every part uses -----------------------------------------------------------------
    def _require_writable(self, path: str | None) -> None:
        if not self.writable:
            raise os_error(errno.EROFS, path)

    def _node(self, path: str) -> Node:
        return self.layers.resolve_required(path)

    def _dir(self, path: str) -> Node:
        node = self.layers.resolve_required(path)
        if not node.is_dir:
            raise os_error(errno.ENOTDIR, path)
        return node

    def _changed(self) -> None:
        """The upper changed: cached lookups and listings go."""
        self.layers.forget()
        self._listings.clear()
        self._listed = 0
