"""Test support for cowfs: the differential harness that compares cowfs with kernel overlayfs, and its parts.

Never imported by the filesystem itself.  The modules, each named after what it owns:

``harness``     the modes, the known differences, a mounted side (kernel or cowfs) and a pair of them
``layers``      lower layers as values (``StackSpec``) and the one builder that writes them
``outcomes``    recording what operations did: ``(label, value or ("errno", NAME))``
``mounts``      mounting kernel overlayfs and cowfs, always unmounting, what this machine can mount
``tree``        comparable snapshots of a tree, and their differences
``worker``      a helper process chroot-ed into a mount that runs operations on request
``strategies``  Hypothesis strategies that draw stacks (needs Hypothesis)
``machine``     the Hypothesis parity state machine's rules (needs Hypothesis)
``plugin``      the pytest plugin: mounted stacks as fixtures, Hypothesis profiles
``unprivileged`` running things as a real unprivileged user (its Python, user namespaces), for rootless tests

Nothing imported here needs Hypothesis.
"""

from cowfs.testing.harness import KNOWN_DIFFERENCES, MODES, Divergence, KnownDifference, Mode, Pair, Side
from cowfs.testing.layers import StackSpec, materialise
from cowfs.testing.mounts import (
    CowfsMount,
    KernelOverlay,
    MountError,
    availability,
    cowfs_mount,
    force_unmount,
    in_user_namespace,
    kernel_overlay,
    make_opaque,
    make_whiteout,
    mounts_under,
    privileged,
    require,
)
from cowfs.testing.outcomes import Recorder, Session
from cowfs.testing.tree import diff_snapshots, snapshot

__all__ = [
    "KNOWN_DIFFERENCES", "MODES", "CowfsMount", "Divergence", "KernelOverlay", "KnownDifference", "Mode",
    "MountError", "Pair", "Recorder", "Session", "Side", "StackSpec", "availability", "cowfs_mount",
    "diff_snapshots", "force_unmount", "in_user_namespace", "kernel_overlay", "make_opaque", "make_whiteout",
    "materialise", "mounts_under", "privileged", "require", "snapshot",
]
