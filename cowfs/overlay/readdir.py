"""Listing a merged directory (the kernel's readdir.c): its entries, with the inode numbers the mount shows.

The merge itself is lookup.py's (`Layers.list_dir`); this module answers
readdir from it and keeps the answers until the upper changes.
"""

from __future__ import annotations

import os
import stat

from cowfs.overlay import override
from cowfs.overlay.locking import locked
from cowfs.overlay.lookup import join, parent_of

LISTED_KEPT = 20_000  # entries of merged listings kept cached, in all (one directory's may be more): the
# kernel keeps listings itself, so these serve a reader in the middle of one and a listing read again soon


class Listing:
    """readdir for the engine (mixed into `Union`). Uses the engine's `layers`, `_listings` and `_listed`
    (the entries in it; both emptied by `_changed`), `_node` and `_dir`."""

    @locked
    def readdir(self, path: str) -> list[tuple[str, int, int]]:
        """[(name, st_ino, st_mode type bits)] of the merged directory, "." and ".." first.

        Kept until the upper next changes (as lookups are): find and ls list the same
        directories again and again."""
        entries = self._listings.get(path)
        if entries is None:
            entries = self._read_dir(path)
            kept = self._listed + len(entries)
            while self._listings and kept > LISTED_KEPT:  # the oldest go first
                kept -= len(self._listings.pop(next(iter(self._listings))))
            self._listings[path] = entries
            self._listed = kept
        return entries

    def _read_dir(self, path):
        node = self._dir(path)
        parent = node if path == "/" else self._node(parent_of(path)[0])
        entries = [(".", self.layers.ino(node), stat.S_IFDIR), ("..", self.layers.ino(parent), stat.S_IFDIR)]
        devs = {layer: os.lstat(self.layers.real(layer, rel)).st_dev for layer, rel in node.parts}
        for name, layer, entry in self.layers.list_dir(node):
            # the type from d_type and the number from d_ino: no syscall per entry below the upper
            if entry.is_dir(follow_symlinks=False):
                kind = stat.S_IFDIR
            elif entry.is_file(follow_symlinks=False):
                kind = stat.S_IFREG
                if self.layers.marked:  # a device, FIFO or socket kept as a file shows its recorded type
                    recorded = override.read(entry.path, kind)
                    if recorded is not None and recorded.kind:
                        kind = recorded.kind
            elif entry.is_symlink():
                kind = stat.S_IFLNK
            else:
                try:
                    kind = stat.S_IFMT(entry.stat(follow_symlinks=False).st_mode)
                except FileNotFoundError:
                    continue
            entries.append((name, self.layers.entry_ino(layer, entry, join(path, name), devs[layer]), kind))
        return entries
