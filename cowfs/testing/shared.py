"""A shared cowfs daemon for tests that mount a stack per example: a mount costs milliseconds, not a start.

    with SharedDaemon() as daemon:
        for example in examples:
            with daemon.mounted(lowers, upper, work, mountpoint, options=["redirect_dir=on"]):
                ...

`cowfs mount` starts a Python interpreter and imports the engine for every
mount (about 0.1 to 0.2 s); a property-based test that mounts a stack per
example spends most of its time there. The shared daemon
(cowfs.daemon.shared) is started once and serves every mount in a thread of
its own, with the same checks and the same engine. Each mount is unmounted
when its block ends, even on failure; closing the daemon unmounts whatever
is left and ends its process.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterable, Iterator

from cowfs.testing.mounts import MountError, StrPath, force_unmount, is_mounted, with_userxattr_unless_privileged

STOP_TIMEOUT = 30.0


def _option_string(lowers, upper, work, options):
    from cowfs.overlay.stack import lowerdir_option
    parts = [lowerdir_option([os.fspath(p) for p in lowers])]
    if upper is not None:
        parts += [f"upperdir={os.fspath(upper)}", f"workdir={os.fspath(work)}"]
    return ",".join(parts + list(options))


class SharedDaemon:
    """One cowfs daemon process serving many mounts (see the module docstring)."""

    def __init__(self, python: str | None = None) -> None:
        ours, theirs = socket.socketpair()
        self._sock = ours
        self._reader, self._writer = ours.makefile("rb"), ours.makefile("wb")
        self.process = subprocess.Popen([python or sys.executable, "-m", "cowfs.daemon.shared", str(theirs.fileno())],
                                        pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL)
        theirs.close()
        self.mounted_at: set[str] = set()

    def _ask(self, request: dict) -> None:
        try:
            self._writer.write(json.dumps(request).encode() + b"\n")
            self._writer.flush()
            line = self._reader.readline()
        except (OSError, ValueError):  # closed, or the daemon has gone
            line = b""
        if not line:
            raise MountError(f"the shared cowfs daemon (pid {self.process.pid}) has gone")
        answer = json.loads(line)
        if "error" in answer:
            raise MountError(f"shared cowfs daemon: {answer['error']}")

    def mount(self, lowers: Iterable[StrPath], upper: StrPath | None, work: StrPath | None, mountpoint: StrPath,
              options: Iterable[str] = ()) -> str:
        """Mount the stack (the kernel's option syntax) at `mountpoint`; returns once it is live.
        Raises MountError with the daemon's one-line reason."""
        mountpoint = os.path.realpath(os.fspath(mountpoint))
        self._ask({"op": "mount", "mountpoint": mountpoint, "options": _option_string(
            list(lowers), upper, work, with_userxattr_unless_privileged(options))})
        self.mounted_at.add(mountpoint)
        return mountpoint

    def unmount(self, mountpoint: StrPath) -> None:
        """Unmount, once the session has ended; on any failure, unmount by force and raise MountError."""
        mountpoint = os.path.realpath(os.fspath(mountpoint))
        self.mounted_at.discard(mountpoint)
        try:
            self._ask({"op": "umount", "mountpoint": mountpoint})
        except MountError:
            if is_mounted(mountpoint):
                force_unmount(mountpoint)
            raise

    @contextlib.contextmanager
    def mounted(self, lowers: Iterable[StrPath], upper: StrPath | None, work: StrPath | None, mountpoint: StrPath,
                options: Iterable[str] = ()) -> Iterator[str]:
        """The stack mounted for the block, unmounted after it whatever happens."""
        path = self.mount(lowers, upper, work, mountpoint, options)
        try:
            yield path
        finally:
            self.unmount(path)

    def close(self) -> None:
        """Unmount what is left, end the daemon (by closing its socket; killed if it does not end)."""
        for mountpoint in sorted(self.mounted_at, reverse=True):
            with contextlib.suppress(MountError):
                self.unmount(mountpoint)
        for f in (self._writer, self._reader, self._sock):
            with contextlib.suppress(OSError):
                f.close()
        try:
            self.process.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise MountError(f"the shared cowfs daemon did not end within {STOP_TIMEOUT:.0f}s (killed)") from None

    def __enter__(self) -> SharedDaemon:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


__all__ = ["SharedDaemon"]
