"""The union engine: overlayfs's semantics as plain Python, with no FUSE in it.

`stack` (the layers and mount options), `lookup` (a path through the layers),
`whiteout` (the on-disk markers), `copyup`, `workdir` (claiming and probing the
work directory) and `union` (every operation on the merged view).
"""
