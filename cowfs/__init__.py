"""cowfs: Linux overlayfs, the filesystem under Docker's overlay2, as a FUSE daemon in Python."""

__version__ = "0.1.0"
