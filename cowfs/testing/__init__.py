"""Test support for cowfs: mount kernel overlayfs and cowfs side by side, snapshot and compare trees.

Used by the differential suite (``tests/test_differential.py``); never imported by the filesystem itself.
"""

from cowfs.testing.mounts import (
    CowfsMount,
    KernelOverlay,
    MountError,
    availability,
    cowfs_mount,
    force_unmount,
    kernel_overlay,
    make_opaque,
    make_whiteout,
    mounts_under,
    require,
)
from cowfs.testing.tree import diff_snapshots, snapshot

__all__ = [
    "CowfsMount", "KernelOverlay", "MountError", "availability", "cowfs_mount", "diff_snapshots",
    "force_unmount", "kernel_overlay", "make_opaque", "make_whiteout", "mounts_under", "require", "snapshot",
]
