"""Starting and stopping a cowfs daemon: checks first, then a background process that returns once the mount is live.

Each live mount leaves a small record (pid, mount point, options) in a
runtime directory, so that `cowfs umount` can wait for its daemon to exit
and tools can list the mounts.
"""

import json
import os
import select
import signal
import sys
import time

from cowfs import mounttable
from cowfs.errors import StackError
from cowfs.runtime import private_dir, read_record, record_path, runtime_dir

# The engine (cowfs.overlay), libfuse, logging and subprocess are imported where used: `cowfs umount` needs
# none of them, and every `cowfs mount`/`umount` pays for what is imported at start.

READY = b"\0cowfs-ready\n"
START_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0


def make_dirs(path):
    """Make `path` and its missing parents, as os.makedirs; return the directories made, parents first
    (none left behind when one cannot be made). For a mount that makes its upper and workdir."""
    missing = []
    while not os.path.lexists(path):
        missing.insert(0, path)
        path = os.path.dirname(path)
    made = []
    try:
        for d in missing:
            os.mkdir(d)
            made.append(d)
    except BaseException:
        remove_made(made)
        raise
    return made


def remove_made(made):
    """After a refused or finished mount: remove the directories `make_dirs` made (`made`, parents first:
    removed deepest first), with the staging directory a workdir got; one holding anything else stays."""
    from cowfs.overlay.workdir import WORK_SUBDIR
    for d in reversed(made):
        for path in (os.path.join(d, WORK_SUBDIR), d):
            try:
                os.rmdir(path)
            except OSError:
                pass


def unprivileged(stack, quiet=False):
    """The stack as this process can mount it: without CAP_SYS_ADMIN, with userxattr, as the kernel requires of
    an unprivileged overlay (said once on stderr, unless `quiet`); options userxattr excludes are refused."""
    from cowfs.overlay.credentials import may_use_trusted_xattrs
    from cowfs.overlay.stack import with_userxattr
    if stack.userxattr or may_use_trusted_xattrs():
        return stack
    stack = with_userxattr(stack)
    if not quiet:
        print("cowfs: not privileged for trusted.* xattrs: mounting with userxattr (markers as user.overlay.*)",
              file=sys.stderr)
    return stack


def _write_record(mountpoint, stack, trace=None):
    private_dir(runtime_dir())
    path = record_path(mountpoint)
    tmp = path + f".{os.getpid()}.tmp"
    record = {"pid": os.getpid(), "mountpoint": mountpoint, "options": stack.option_string()}
    if trace:
        record["trace"] = trace
    with open(tmp, "w") as f:
        json.dump(record, f)
    os.replace(tmp, path)


def _remove_record(mountpoint):
    try:
        with open(record_path(mountpoint)) as f:
            if json.load(f).get("pid") != os.getpid():
                return
        os.unlink(record_path(mountpoint))
    except (OSError, ValueError):
        pass


def is_cowfs_mount(mountpoint):
    """Whether a cowfs mount is at `mountpoint` (a real path), by the mount table."""
    return any(m.mountpoint == mountpoint and m.fstype == "fuse.cowfs" for m in mounttable.read())


def _setup_logging(foreground, debug):
    import logging
    import logging.handlers
    logger = logging.getLogger("cowfs")
    logger.setLevel(logging.DEBUG if debug else logging.WARNING)
    if foreground:
        handler = logging.StreamHandler(sys.stderr)
    elif os.path.exists("/dev/log"):
        handler = logging.handlers.SysLogHandler(address="/dev/log")
    else:
        handler = logging.NullHandler()
    handler.setFormatter(logging.Formatter("cowfs[%(process)d]: %(message)s"))
    logger.addHandler(handler)


def _open_trace(trace, human):
    """The events writer of a traced mount; a trace file that cannot be written is refused before mounting."""
    from cowfs.daemon.trace import TraceWriter
    for path in (trace, human):
        if path is None:
            continue
        parent = os.path.dirname(path) or "."
        if not os.path.isdir(parent):
            raise StackError(f"trace {path}: No such directory {parent}")
        if os.path.isdir(path):
            raise StackError(f"trace {path}: Is a directory")
    try:
        return TraceWriter(trace, human)
    except OSError as e:
        raise StackError(f"trace {trace}: {e.strerror}") from None


def mount(stack, mountpoint, *, foreground=False, debug=False, trace=None, human_trace=None):
    """Check the stack, mount it at `mountpoint`, and return once the mount is live (or serve, in the foreground).

    With `trace`, every layer-changing event is appended to that file as one
    JSON line (and, with `human_trace`, as one human line to that file, which
    is what `cowfs shell` shows); the trace's path goes into the mount's record.

    Raises StackError with a one-line reason when anything is refused; then
    no mount and no daemon are left behind.
    """
    from cowfs.daemon.operations import serve  # imports libfuse: only when really mounting
    from cowfs.overlay.stack import check, is_within
    from cowfs.overlay.union import Union

    stack = check(unprivileged(stack), mountpoint)
    mountpoint = os.path.realpath(mountpoint)
    if is_within(runtime_dir(), mountpoint):
        raise StackError(f"mount point {mountpoint}: would hide cowfs's runtime directory {runtime_dir()} "
                         "(the daemon would reach it through its own mount)")
    private_dir(runtime_dir())  # a runtime directory another user could reach is refused before anything
    if any(m.mountpoint == mountpoint for m in mounttable.read()):
        raise StackError(f"mount point {mountpoint}: busy (something is already mounted there)")
    if not os.path.exists("/dev/fuse"):
        raise StackError("/dev/fuse: missing (load the fuse module, or install fuse3)")
    allow_other = stack.allow_other if stack.allow_other is not None else os.geteuid() == 0
    if trace is not None:
        trace = os.path.abspath(trace)
        human_trace = os.path.abspath(human_trace) if human_trace else None
        if is_within(trace, mountpoint) or (human_trace and is_within(human_trace, mountpoint)):
            raise StackError(f"trace {trace}: inside the mount point {mountpoint} (it would trace its own writes)")
        for role, layer in [("lowerdir", p) for p in stack.lowers] + [("upperdir", stack.upper),
                                                                       ("workdir", stack.work)]:
            if layer is not None and is_within(trace, layer):
                raise StackError(f"trace {trace}: inside {role} {layer} (a trace is never written into a layer)")
        writer = _open_trace(trace, human_trace)
    else:
        writer = None
    try:
        union = Union(stack)
    except BaseException:
        if writer is not None:
            writer.close()
        raise
    for warning in union.warnings:  # what the mount does otherwise than asked, as the kernel says in its log
        print(f"cowfs: {warning}", file=sys.stderr)
    if writer is not None:
        union.events.subscribe(writer)
    options = dict(foreground=True, debug=debug, allow_other=allow_other, read_only=not stack.writable,
                   fsname=stack.fsname, mount_flags=stack.mount_flags)
    if foreground or debug:
        _setup_logging(True, debug)
        _write_record(mountpoint, stack, trace)
        try:
            serve(union, mountpoint, **options)
        finally:
            _remove_record(mountpoint)
        return
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the daemon
        os.close(read_end)
        os.setsid()
        os.chdir("/")  # keep no filesystem busy
        os.dup2(write_end, 2)  # libfuse's own complaints reach the parent through the pipe

        def ready():
            _write_record(mountpoint, stack, trace)
            os.write(write_end, READY)
            devnull = os.open(os.devnull, os.O_RDWR)
            for fd in (0, 1, 2):
                os.dup2(devnull, fd)
            os.close(devnull)
            os.close(write_end)

        code = 0
        try:
            _setup_logging(False, False)
            serve(union, mountpoint, on_ready=ready, **options)
        except BaseException as e:  # noqa: BLE001 - the parent reports it
            if not isinstance(e, RuntimeError):  # mfusepy's RuntimeError only repeats libfuse's complaint
                try:
                    os.write(2, f"{e}\n".encode())
                except OSError:
                    pass
            code = 1
        finally:
            _remove_record(mountpoint)
        os._exit(code)
    os.close(write_end)
    try:
        union.hand_over()  # the daemon holds the workdir lock now
        if writer is not None:
            writer.close()  # and the trace
        output = _read_until_ready(read_end, pid)
    except BaseException:  # Ctrl-C while the daemon starts: stop it, and leave nothing mounted
        _stop_daemon(pid, mountpoint)
        raise
    finally:
        os.close(read_end)
    if READY in output:
        return
    _reap(pid)
    if is_cowfs_mount(mountpoint):  # mounted but broken: leave nothing behind
        force_unmount(mountpoint)
    lines = [line.strip() for line in output.decode(errors="replace").splitlines() if line.strip()]
    reason = lines[-1] if lines else "the daemon exited before the mount was live"
    raise StackError(f"mount point {mountpoint}: {reason.removeprefix('fuse: ')}")


def _read_until_ready(fd, pid):
    output = b""
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 0.5)
        if ready:
            chunk = os.read(fd, 4096)
            if not chunk:
                break
            output += chunk
            if READY in output:
                break
    else:
        os.kill(pid, signal.SIGTERM)
        output += b"timed out waiting for the mount to come up\n"
    return output


def _reap(pid):
    """Reap the daemon child `pid`, killing it when it has not exited within 5 s."""
    if not _wait_exit(pid, 5.0):
        os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)


def _stop_daemon(pid, mountpoint):
    """Stop a daemon that is starting (SIGTERM: libfuse unmounts and it exits), and undo what it got to:
    the mount, its record."""
    try:
        os.kill(pid, signal.SIGTERM)
    except OSError:
        pass
    _reap(pid)
    if is_cowfs_mount(mountpoint):
        force_unmount(mountpoint)
    record = read_record(mountpoint)
    if record is not None and record.get("pid") == pid:
        try:
            os.unlink(record_path(mountpoint))
        except OSError:
            pass


def _run_tool(cmd):
    """Run `cmd` (looked up in PATH), its output discarded: (exit status, its stderr), or None when there is
    no such program. posix_spawn, not subprocess: `cowfs umount` need not import subprocess."""
    read_end, write_end = os.pipe()
    try:
        pid = os.posix_spawnp(cmd[0], cmd, os.environ, file_actions=[
            (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
            (os.POSIX_SPAWN_OPEN, 1, os.devnull, os.O_WRONLY, 0),
            (os.POSIX_SPAWN_DUP2, write_end, 2)])
    except FileNotFoundError:
        os.close(read_end)
        return None
    finally:
        os.close(write_end)
    with open(read_end, "rb") as f:
        err = f.read()
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), err.decode(errors="replace")


def force_unmount(mountpoint):
    """Unmount `mountpoint` by any means (fusermount -u, umount, umount -l): True when one of them did."""
    for cmd in (["fusermount", "-u", mountpoint], ["umount", mountpoint], ["umount", "-l", mountpoint]):
        result = _run_tool(cmd)
        if result is not None and result[0] == 0:
            return True
    return False


def umount(mountpoint):
    """Unmount a cowfs mount and wait until its daemon has exited. Raises StackError when it cannot."""
    real = os.path.realpath(mountpoint)
    if not is_cowfs_mount(real):
        raise StackError(f"{mountpoint}: not a cowfs mount")
    record = read_record(real)
    pid = record.get("pid") if record else None
    pidfd = _pidfd(pid)  # before unmounting: the daemon's pid cannot be another process's by the time we wait
    try:
        errors = []
        for cmd in (["fusermount", "-u", real], ["umount", real]):
            result = _run_tool(cmd)
            if result is None:
                continue
            code, stderr = result
            if code == 0:
                break
            errors.append(stderr.strip().splitlines()[-1] if stderr.strip() else f"{cmd[0]} failed")
        else:
            raise StackError(f"{mountpoint}: cannot unmount: {errors[-1] if errors else 'no fusermount or umount'}")
        _wait_exit(pid, STOP_TIMEOUT, pidfd)
    finally:
        if pidfd is not None:
            os.close(pidfd)


def _alive(pid):
    """True while `pid` runs; a zombie waiting for its parent to reap it has exited."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(") ")[2][:1] != "Z"
    except OSError:
        return False


def _pidfd(pid):
    """A pidfd of `pid`, readable once the process has exited; None when it is gone already, or without pidfds
    (before Linux 5.3: then `_wait_exit` polls)."""
    if not pid:
        return None
    try:
        return os.pidfd_open(pid)
    except (AttributeError, OSError):
        return None


def _wait_exit(pid, timeout=STOP_TIMEOUT, pidfd=None):
    """Wait up to `timeout` seconds until `pid` has exited (a zombie has): True when it has.

    Woken by the process's pidfd (`pidfd`, or one opened here) as it exits, not by polling."""
    if not pid:
        return True
    fd = pidfd if pidfd is not None else _pidfd(pid)
    if fd is not None:
        try:
            return bool(select.select([fd], [], [], timeout)[0])
        finally:
            if pidfd is None:
                os.close(fd)
    deadline = time.monotonic() + timeout  # no pidfd: gone already (ESRCH), or an old kernel
    while _alive(pid):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.005)
    return True
