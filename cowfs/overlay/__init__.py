"""The union engine: overlayfs's semantics as plain Python, with no FUSE in it.

Split as the kernel splits fs/overlayfs: `stack` (the layers and mount options,
as params.c), `lookup` (a path through the layers, namei.c), `whiteout` (the
on-disk markers), `copyup` (copy_up.c), `namespace` (names: dir.c),
`attributes` (inode.c), `files` (file.c), `readdir`, `workdir` (claiming the
work directory), `locking`, `credentials`, `events`, `acl`, `syscalls`, `verity`
(fs-verity digests of metacopy data); and
`union`, the `Union` facade every caller uses.
"""
