"""One daemon process serving many mounts, for test suites that mount a stack per example.

`cowfs mount` starts an interpreter and imports the engine and libfuse for
every mount; a suite that mounts hundreds of stacks pays that hundreds of
times. Here one process, started once (`cowfs.testing.shared.SharedDaemon`),
serves each mount's FUSE session in a thread of its own and takes requests,
one JSON line each, on the socket it is given:

    {"op": "mount", "options": "lowerdir=...,upperdir=...,workdir=...", "mountpoint": PATH}
    {"op": "umount", "mountpoint": PATH}

and answers each with one line, {"ok": true} or {"error": "one line"}. A
mount is checked as `cowfs mount` checks it, answered once it is live, and
an unmount once its session has ended. The mounts are the process's: when it
ends (its socket closes), it unmounts what is left.
"""

import json
import os
import socket
import sys
import threading

from cowfs.errors import CowfsError, one_line

START_TIMEOUT = 30.0  # seconds for a mount to come up
STOP_TIMEOUT = 30.0  # and for its session to end once unmounted


class _Mount:
    """A mount served by a thread of this process."""

    def __init__(self, stack, mountpoint):
        from cowfs.daemon.operations import serve
        from cowfs.overlay.union import Union

        self.mountpoint = mountpoint
        self.error = None
        self.ready = threading.Event()
        union = Union(stack)
        options = dict(allow_other=stack.allow_other if stack.allow_other is not None else os.geteuid() == 0,
                       read_only=not stack.writable, fsname=stack.fsname, mount_flags=stack.mount_flags)

        def run():
            try:
                serve(union, mountpoint, on_ready=self.ready.set, signals=False, **options)
            except BaseException as e:  # noqa: BLE001 - answered to the client
                self.error = e
            finally:
                union.close()
                self.ready.set()

        self.thread = threading.Thread(target=run, name=f"cowfs {mountpoint}", daemon=True)
        self.thread.start()

    def wait_live(self):
        if not self.ready.wait(START_TIMEOUT) or not self.thread.is_alive():
            error = self.error or "the session ended before the mount was live"
            raise CowfsError(f"mount point {self.mountpoint}: {str(error).removeprefix('fuse: ')}")

    def unmount(self):
        from cowfs.daemon.mount import force_unmount
        if not force_unmount(self.mountpoint):
            raise CowfsError(f"{self.mountpoint}: cannot be unmounted")
        self.thread.join(STOP_TIMEOUT)
        if self.thread.is_alive():
            raise CowfsError(f"{self.mountpoint}: unmounted, but its session did not end in {STOP_TIMEOUT:.0f}s")


def _mount(mounts, options, mountpoint):
    from cowfs.daemon.mount import unprivileged
    from cowfs.mounttable import read as mount_table
    from cowfs.overlay.stack import check, parse_options

    mountpoint = os.path.realpath(mountpoint)
    stack = check(unprivileged(parse_options([options]), quiet=True), mountpoint)
    if mountpoint in mounts or any(m.mountpoint == mountpoint for m in mount_table()):
        raise CowfsError(f"mount point {mountpoint}: busy (something is already mounted there)")
    mount = _Mount(stack, mountpoint)
    try:
        mount.wait_live()
    except BaseException:
        if mount.thread.is_alive():
            mount.unmount()
        raise
    mounts[mountpoint] = mount


def serve_requests(sock):
    """Answer mount and unmount requests on `sock` until it closes; then unmount what is left."""
    mounts = {}
    reader, writer = sock.makefile("rb"), sock.makefile("wb")
    try:
        for line in reader:
            try:
                request = json.loads(line)
                mountpoint = os.path.realpath(request["mountpoint"])
                if request["op"] == "mount":
                    _mount(mounts, request["options"], mountpoint)
                elif request["op"] == "umount":
                    mount = mounts.pop(mountpoint, None)
                    if mount is None:
                        raise CowfsError(f"{mountpoint}: not a mount of this daemon")
                    mount.unmount()
                else:
                    raise CowfsError(f"unknown request {request['op']!r}")
                answer = {"ok": True}
            except (CowfsError, OSError, ValueError, KeyError, TypeError) as e:
                answer = {"error": one_line(e)}
            writer.write(json.dumps(answer).encode() + b"\n")
            writer.flush()
    finally:
        for mount in mounts.values():
            try:
                mount.unmount()
            except CowfsError:
                pass


def main(argv):
    """python -m cowfs.daemon.shared FD: serve the requests of the socket open as FD."""
    sock = socket.socket(fileno=int(argv[1]))
    os.chdir("/")  # keep no filesystem busy
    serve_requests(sock)


if __name__ == "__main__":
    main(sys.argv)
