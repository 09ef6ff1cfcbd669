"""The errors cowfs raises on purpose: `CowfsError` and its one-line message; engine failures are OSError.

Engine failures are plain OSError with an errno (`os_error`), as the system
calls they stand for would raise. Everything cowfs refuses on purpose (a bad
stack or option, a store operation, a hostile archive) is a `CowfsError`
subclass whose str() is the one line the command line prints after `cowfs: `.
"""

import os


def os_error(code, path=None):
    """An OSError with the errno `code`, its standard message, and the path it concerns."""
    return OSError(code, os.strerror(code), path) if path is not None else OSError(code, os.strerror(code))


class CowfsError(Exception):
    """Something cowfs refuses on purpose; str() is the one-line message to show."""


class StackError(CowfsError):
    """A stack or option the user gave that cowfs refuses; str() is the one-line message to show."""


def one_line(error):
    """The one line to print for an error a command stopped on (without the `cowfs: ` prefix).

    A CowfsError is its message; an OSError is `PATH: strerror` (the path when it names one).
    """
    if isinstance(error, OSError) and not isinstance(error, CowfsError):
        where = f"{error.filename}: " if error.filename else ""
        text = f"{where}{error.strerror or error}"
    else:
        text = str(error)
    # a name may hold a newline (`cowfs rm $'a\nb'`): shown escaped, so one error stays one line
    return text.replace("\n", "\\n").replace("\r", "\\r")
