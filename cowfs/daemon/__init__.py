"""The FUSE daemon: the kernel's requests mapped onto the union engine.

`libfuse` (the ctypes binding of libfuse 3's low-level API), `inodes` (the
kernel's inode numbers and their lifetimes), `operations` (one method per
request) and `mount` (starting, recording and stopping a daemon).
"""
