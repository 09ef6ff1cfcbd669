"""The errors cowfs raises: engine failures are plain OSError with an errno; refusals to mount carry a message."""

import os


def os_error(code, path=None):
    """An OSError with the errno `code`, its standard message, and the path it concerns."""
    return OSError(code, os.strerror(code), path) if path is not None else OSError(code, os.strerror(code))


class StackError(Exception):
    """A stack or option the user gave that cowfs refuses; str() is the one-line message to show."""
