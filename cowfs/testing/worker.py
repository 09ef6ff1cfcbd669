"""A helper process ``chroot``-ed into one mount that runs named operations on request and records their outcomes.

Running operations chroot-ed into the merged view keeps symlinks in the
layers (absolute ones, or ``../../..`` pointing out of the stack) inside
it: they resolve in the merged view and never touch the host.  The
operations are a table ``{name: function(*args)}`` built in the child by
the function the caller gives; each outcome is recorded as
``cowfs.testing.outcomes.Recorder`` records it (the value, or
``("errno", NAME)``).
"""

from __future__ import annotations

import contextlib
import os
import pickle
import select
import signal
import struct
import time
from collections.abc import Callable
from typing import Any

from cowfs.testing.outcomes import Recorder

Ops = dict[str, Callable[..., Any]]


def _send(fd: int, obj: Any) -> None:
    data = pickle.dumps(obj)
    data = struct.pack("!I", len(data)) + data
    while data:
        data = data[os.write(fd, data):]


def _recv(fd: int, timeout: float | None) -> Any:
    def read_exact(n):
        buf = b""
        while len(buf) < n:
            if timeout is not None:
                ready, _, _ = select.select([fd], [], [], timeout)
                if not ready:
                    raise TimeoutError
            chunk = os.read(fd, n - len(buf))
            if not chunk:
                raise EOFError
            buf += chunk
        return buf
    (size,) = struct.unpack("!I", read_exact(4))
    return pickle.loads(read_exact(size))


class Worker:
    """A child process chroot-ed into *root* (a live mount) that performs operations on request.

    *make_ops* runs in the child (after the chroot) and returns the operation table.
    """

    def __init__(self, root: str, make_ops: Callable[[], Ops]) -> None:
        req_r, req_w = os.pipe()
        resp_r, resp_w = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child never returns into the caller
            code = 1
            try:
                keep = {0, 1, 2, req_r, resp_w}
                for name in os.listdir("/proc/self/fd"):
                    fd = int(name)
                    if fd not in keep:
                        with contextlib.suppress(OSError):
                            os.close(fd)
                signal.signal(signal.SIGINT, signal.SIG_IGN)
                os.chroot(root)
                os.chdir("/")
                os.umask(0o022)
                ops = make_ops()
                recorder = Recorder()
                while True:
                    try:
                        request = _recv(req_r, None)
                    except EOFError:
                        break
                    if request is None:
                        break
                    name, args = request
                    try:
                        recorder.do(name, ops[name], *args)
                        reply = ("ok", recorder.outcomes.pop()[1])
                    except Exception as e:  # a harness bug: report it, do not die
                        reply = ("exception", f"{type(e).__name__}: {e}")
                    _send(resp_w, reply)
                code = 0
            finally:
                os._exit(code)
        os.close(req_r)
        os.close(resp_w)
        self.pid: int | None = pid
        self._req, self._resp = req_w, resp_r

    def call(self, name: str, *args: Any, timeout: float | None = None) -> tuple[str, Any]:
        """``("ok", outcome)`` (the value, or ``("errno", NAME)``) or ``("exception", text)`` for a
        harness bug; raises TimeoutError when no answer comes within *timeout* seconds."""
        _send(self._req, (name, args))
        return _recv(self._resp, timeout)

    def stop(self) -> None:
        """Ask the child to exit (killed after 10 s) and reap it."""
        if self.pid is None:
            return
        with contextlib.suppress(OSError):
            _send(self._req, None)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            pid, _ = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                break
            time.sleep(0.01)
        else:
            with contextlib.suppress(OSError):
                os.kill(self.pid, signal.SIGKILL)
            os.waitpid(self.pid, 0)
        for fd in (self._req, self._resp):
            with contextlib.suppress(OSError):
                os.close(fd)
        self.pid = None


__all__ = ["Ops", "Worker"]
