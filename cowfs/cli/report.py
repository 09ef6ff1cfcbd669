"""How a command ends when cowfs refuses or a system call fails: one line `cowfs: ...` on stderr, exit 1.

Every command runs under `reporting`, the one place the command line
catches `CowfsError` (and OSError): no traceback, one line, exit status 1.
A reader that stopped reading (`cowfs history IMAGE | head`) is not an error.
`paths_as_bytes` lets a path that is not UTF-8 (a mount point, a layer) be
printed as the bytes it is, whatever the locale, instead of a traceback.
"""

import os
import sys

from cowfs.errors import CowfsError, one_line


def paths_as_bytes():
    """Make stdout and stderr write a str from os.fsdecode (surrogate escapes) back as its original bytes."""
    for stream in (sys.stdout, sys.stderr):
        if getattr(stream, "errors", None) == "strict" and hasattr(stream, "reconfigure"):
            try:
                stream.reconfigure(errors="surrogateescape")
            except (AttributeError, ValueError, OSError):
                pass


def reporting(run, prefix="cowfs", err=None):
    """`run()` -> its exit code; a CowfsError or OSError it raises -> `PREFIX: message` on `err` (default
    stderr), exit 1; a BrokenPipeError (the reader went away) -> exit 0, nothing printed."""
    try:
        return run()
    except BrokenPipeError:
        try:  # the interpreter flushes stdout at exit: into the void, not into the closed pipe
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except (OSError, ValueError):
            pass
        return 0
    except (CowfsError, OSError) as e:
        print(f"{prefix}: {one_line(e)}", file=err if err is not None else sys.stderr)
        return 1
