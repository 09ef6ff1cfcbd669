"""How much data a layer or an upper directory holds: the one count every command shows.

As Docker counts a container's or a layer's size: the apparent size (st_size,
not blocks: a sparse file counts its length) of each regular file and symlink
(a symlink holds its target's length), a file with several hard links once,
directories and whiteouts nothing. `cowfs diff --size`, `status`, `ps` and
the store's `system df`/`prune` all count with `tree_size`.
"""

import os
import stat

from cowfs.overlay.whiteout import is_whiteout


def tree_size(path):
    """Bytes of data under `path` (an upper, a layer, or a single object)."""
    try:
        st = os.lstat(path)
    except OSError:
        return 0
    if not stat.S_ISDIR(st.st_mode):
        return 0 if is_whiteout(st) else st.st_size
    total, seen = 0, set()
    for dirpath, dirnames, filenames in os.walk(path):
        for name in filenames + [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]:
            try:
                st = os.lstat(os.path.join(dirpath, name))
            except OSError:
                continue
            if is_whiteout(st) or stat.S_ISDIR(st.st_mode):
                continue
            if st.st_nlink > 1:
                if (st.st_dev, st.st_ino) in seen:
                    continue
                seen.add((st.st_dev, st.st_ino))
            total += st.st_size
    return total
