"""How a command ends when cowfs refuses, fails or is interrupted: one line on stderr and a documented exit status.

Every command runs under `reporting`, the one place the command line turns
an exception into an exit status:

- a `CowfsError` or OSError: `cowfs: MESSAGE` (one line), exit 1;
- Ctrl-C (SIGINT, KeyboardInterrupt): `cowfs: interrupted`, exit 130 (128 + SIGINT); SIGTERM and SIGHUP
  (under `stopping_on_signals`) the same line, exit 128 + N, after the same cleanup as for an error;
- a reader that stopped reading (`cowfs diff MNT | head -1`): nothing, exit 0;
- anything else is a bug: `cowfs: internal error: TYPE: MESSAGE ...`, exit 1.

`--debug` (`set_debug`) or COWFS_DEBUG=1 in the environment adds the Python
traceback above that line. `paths_as_bytes` lets a path that is not UTF-8
(a mount point, a layer) be printed as the bytes it is, whatever the
locale, instead of a traceback.
"""

import contextlib
import os
import signal
import sys
import threading
import traceback

from cowfs.errors import CowfsError, one_line

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
EXIT_INTERRUPTED = 128 + signal.SIGINT

_debug = None  # set by --debug; None: COWFS_DEBUG decides


def set_debug(on):
    """--debug: show tracebacks (True), or leave it to COWFS_DEBUG (None)."""
    global _debug
    _debug = on


def debugging():
    """Whether a traceback is wanted: --debug, or COWFS_DEBUG set to anything but '', '0', 'no', 'false'."""
    if _debug:
        return True
    return os.environ.get("COWFS_DEBUG", "").strip().lower() not in ("", "0", "no", "false", "off")


class Stopped(BaseException):
    """SIGTERM or SIGHUP while a command runs (see `stopping_on_signals`); exit 128 + signum."""

    def __init__(self, signum):
        super().__init__(signum)
        self.signum = signum


def _stop(signum, frame):
    raise Stopped(signum)


@contextlib.contextmanager
def stopping_on_signals(signals=(signal.SIGTERM, signal.SIGHUP)):
    """Within: SIGTERM and SIGHUP raise `Stopped`, as Ctrl-C raises KeyboardInterrupt, so that what a command
    made is undone as for an error (a starting daemon, the directories made for a mount). A signal someone
    else handles (not SIG_DFL) is left alone; the handlers are restored on the way out."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = {}
    try:
        for signum in signals:
            if signal.getsignal(signum) == signal.SIG_DFL:
                old[signum] = signal.signal(signum, _stop)
        yield
    finally:
        for signum, handler in old.items():
            signal.signal(signum, handler)


def paths_as_bytes():
    """Make stdout and stderr write a str from os.fsdecode (surrogate escapes) back as its original bytes."""
    for stream in (sys.stdout, sys.stderr):
        if getattr(stream, "errors", None) == "strict" and hasattr(stream, "reconfigure"):
            try:
                stream.reconfigure(errors="surrogateescape")
            except (AttributeError, ValueError, OSError):
                pass


def _silence_stdout():
    """After a BrokenPipeError: the interpreter flushes stdout at exit, into the void, not into the closed pipe."""
    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):
        pass


def _say(stream, line):
    if debugging():
        traceback.print_exc(file=stream)
    try:  # a newline in a path must not make a second line
        print(line.replace("\n", "\\n").replace("\r", "\\r"), file=stream, flush=True)
    except (OSError, ValueError):
        pass  # stderr itself is gone: the exit status still says it


def reporting(run, prefix="cowfs", err=None):
    """`run()` -> its exit code; what it raises -> one line on `err` (default stderr) and an exit status:
    CowfsError/OSError `PREFIX: message`, exit 1; KeyboardInterrupt `cowfs: interrupted`, exit 130 (Stopped:
    128 + its signal);
    BrokenPipeError (the reader went away) nothing, exit 0; any other Exception `PREFIX: internal error:
    ...`, exit 1. With --debug or COWFS_DEBUG=1, the traceback comes first."""
    try:
        return run()
    except BrokenPipeError:
        _silence_stdout()
        return EXIT_OK
    except KeyboardInterrupt:
        _say(err if err is not None else sys.stderr, "cowfs: interrupted")
        return EXIT_INTERRUPTED
    except Stopped as e:
        _say(err if err is not None else sys.stderr, "cowfs: interrupted")
        return 128 + e.signum
    except (CowfsError, OSError) as e:
        _say(err if err is not None else sys.stderr, f"{prefix}: {one_line(e)}")
        return EXIT_FAILED
    except Exception as e:  # noqa: BLE001 - a bug: one line, not a traceback (unless asked for)
        text = " ".join(str(e).split()) or "(no message)"
        _say(err if err is not None else sys.stderr,
             f"{prefix}: internal error: {type(e).__name__}: {text} (a bug in cowfs; COWFS_DEBUG=1 shows where)")
        return EXIT_FAILED
