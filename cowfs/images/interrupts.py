"""SIGINT, SIGTERM and SIGHUP during an image command: one line, exit 128+N, the store as it was (or complete).

`handling()` turns the three signals into `Interrupted` (a BaseException, so
no `except Exception` swallows it) while a command runs; every cleanup made
for failures (`except BaseException`, `finally`, a Transaction's exit) then
runs for it too. After the first signal the others are ignored, so that a
second Ctrl-C cannot cut that cleanup short. A signal the command was
started with ignored (nohup, a background job of a script) stays ignored.

`deferred()` marks the few steps that must not stop half way, the renames
and writes that make a change visible (Transaction.commit, a removal): a
signal that comes inside waits until the section ends, and is raised then.
`changed()` notes that the store was changed, so that the line printed for a
later signal can say so (`interrupted (after ...)`) instead of claiming that
nothing happened.

SIGKILL cannot be caught: what it leaves in the store's tmp/ is removed (or,
for a transaction past its commit point, completed) by the next command that
opens the store; see cowfs.images.store.
"""

import contextlib
import signal
import threading

SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class Interrupted(BaseException):
    """A command stopped by a signal; `status` is the exit status (128 + the signal's number)."""

    def __init__(self, signum, changed=False):
        super().__init__(signum)
        self.signum, self.changed = signum, changed

    @property
    def status(self):
        return 128 + self.signum

    def __str__(self):
        return "interrupted (after the change to the store was made)" if self.changed else "interrupted"


class _State:
    def __init__(self):
        self.active = False  # handling() is in force
        self.deferring = 0  # depth of deferred() sections
        self.pending = None  # a signal that came inside one
        self.stopping = False  # Interrupted was raised: ignore the next signals
        self.changed = False  # the store was changed by this command


_state = _State()


def _handler(signum, frame):
    if _state.stopping:
        return
    if _state.deferring:
        if _state.pending is None:
            _state.pending = signum
        return
    _state.stopping = True
    raise Interrupted(signum, _state.changed)


@contextlib.contextmanager
def handling():
    """Within: SIGINT, SIGTERM and SIGHUP raise Interrupted (in the main thread; elsewhere nothing changes)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    global _state
    outer = _state
    _state = _State()
    _state.active = True
    old = {}
    try:
        for signum in SIGNALS:
            if signal.getsignal(signum) is not signal.SIG_IGN:  # nohup, or a script's background job: still ignored
                old[signum] = signal.signal(signum, _handler)
        yield
    finally:
        _state.stopping = True  # the command is over: a signal during the teardown is not an interruption
        for signum, handler in old.items():
            signal.signal(signum, handler)
        _state = outer


@contextlib.contextmanager
def deferred():
    """A section that a signal does not cut: one that comes inside is raised when it ends."""
    _state.deferring += 1
    try:
        yield
    finally:
        _state.deferring -= 1
    if not _state.deferring and _state.pending is not None and not _state.stopping:
        signum, _state.pending = _state.pending, None
        _state.stopping = True
        raise Interrupted(signum, _state.changed)


def changed():
    """Note that this command has changed the store (a signal from now on says so)."""
    _state.changed = True


__all__ = ["Interrupted", "SIGNALS", "changed", "deferred", "handling"]
