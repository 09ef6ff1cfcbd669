"""`cowfs shell`: a throwaway stack, a shell inside it, and every copy-up shown as it happens.

How events reach the screen without garbling what the user types: the daemon
writes each event, as it happens, as one human line to a file beside the
trace (`events.txt`, one write(2) a line). The shell prints the lines it has
not shown yet just before each prompt (bash: PROMPT_COMMAND; POSIX shells
such as dash: a command substitution in PS1 that writes to stderr), so
they appear between a command's output and the next prompt, never while the
user is typing. Every event of a command is written before the command's
system call returns, so the next prompt always shows all of them.
"""

import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile

from cowfs import mounttable
from cowfs.daemon import mount as mounting
from cowfs.errors import StackError
from cowfs.explore.diff import changes, format_changes, size_line
from cowfs.overlay.stack import check, lowerdir_option, parse_options, split_options, upperdir_option

PREFIX = "[cowfs] "

HOOK = r"""
__cowfs_events() {
    __cowfs_n=$(wc -c < "$COWFS_EVENTS" 2>/dev/null) || return 0
    __cowfs_seen=$(cat "$COWFS_EVENTS.seen" 2>/dev/null) || __cowfs_seen=0
    if [ "${__cowfs_n:-0}" -gt "${__cowfs_seen:-0}" ]; then
        tail -c +$((__cowfs_seen + 1)) "$COWFS_EVENTS" | head -c $((__cowfs_n - __cowfs_seen)) | sed 's/^/%(prefix)s/'
        echo "$__cowfs_n" > "$COWFS_EVENTS.seen"
    fi
}
__cowfs_where() {
    case $PWD in
        "$COWFS_MERGED") echo /;;
        "$COWFS_MERGED"/*) echo "${PWD#"$COWFS_MERGED"}";;
        *) echo "$PWD (outside the stack)";;
    esac
}
"""

BASH_RC = """\
[ -f ~/.bashrc ] && . ~/.bashrc
. %(hook)s
PS1='(cowfs) $(__cowfs_where)\\$ '
PROMPT_COMMAND=__cowfs_events
"""

SH_ENV = """\
[ -n "$COWFS_USER_ENV" ] && [ -f "$COWFS_USER_ENV" ] && . "$COWFS_USER_ENV"
. %(hook)s
PS1='$(__cowfs_events >&2)(cowfs) $(__cowfs_where)$ '
"""


def _image_options(args):
    """The -o strings of `cowfs shell IMAGE` (one positional, not a path, an image of the store), else None."""
    if len(args.layers) != 1 or any("lowerdir=" in opt for opt in args.options):
        return None
    from cowfs.images.catalog import image_stack_options, looks_like_image
    from cowfs.images.store import Store, default_store
    root = getattr(args, "store", None) or default_store()
    image_id = looks_like_image(root, args.layers[0])
    if image_id is None:
        if not os.path.lexists(args.layers[0]):
            raise StackError(f"{args.layers[0]}: no such layer directory, and no such image in store "
                             f"{os.path.abspath(root)}")
        return None
    store = Store(root, create=False)
    print(f"cowfs shell: image {args.layers[0]} ({image_id[7:19]}) from the store {store.root}, "
          "under a throwaway container layer")
    return image_stack_options(store, image_id) + list(args.options)


def _stack(args):
    image = _image_options(args)
    if image is not None:
        if any("upperdir=" in opt or "workdir=" in opt for opt in image):
            raise StackError("shell: give an upper directory with --upper DIR, not -o upperdir=")
        return image
    options = list(args.options)
    keys = [opt.partition("=")[0] for text in options for opt in split_options(text)]
    if args.layers and "lowerdir" in keys:
        raise StackError("shell: the lower layers are given twice: as LAYER... and as -o lowerdir=; give one")
    if keys.count("lowerdir") > 1:
        raise StackError("shell: option 'lowerdir' given twice")
    if args.layers:
        options.insert(0, lowerdir_option(os.path.abspath(p) for p in args.layers))
    if not any(opt.startswith("lowerdir=") or ",lowerdir=" in opt for opt in options):
        raise StackError("shell: give the lower layers: LAYER... (topmost first) or -o lowerdir=A:B")
    if any("upperdir=" in opt or "workdir=" in opt for opt in options):
        raise StackError("shell: give an upper directory with --upper DIR, not -o upperdir=")
    return options


def _write_hooks(tmp):
    hook = os.path.join(tmp, "hook.sh")
    with open(hook, "w") as f:
        f.write(HOOK % {"prefix": PREFIX.replace("/", "\\/")})
    bashrc = os.path.join(tmp, "bashrc")
    with open(bashrc, "w") as f:
        f.write(BASH_RC % {"hook": shlex.quote(hook)})
    shenv = os.path.join(tmp, "shenv")
    with open(shenv, "w") as f:
        f.write(SH_ENV % {"hook": shlex.quote(hook)})
    return bashrc, shenv


def _shell_command(shell, bashrc, shenv, env):
    name = os.path.basename(shell)
    if name == "bash":
        return [shell, "--rcfile", bashrc, "-i"]
    if name in ("sh", "dash", "ash", "ksh", "mksh", "busybox", "yash"):
        if env.get("ENV"):
            env["COWFS_USER_ENV"] = env["ENV"]
        env["ENV"] = shenv
        return [shell, "-i"]
    return [shell]  # another shell: no live events, the summary still comes at exit


def _run_shell(merged, tmp, events):
    shell = os.environ.get("SHELL") or "/bin/sh"
    if not shutil.which(shell):
        raise StackError(f"shell {shell}: not found (set SHELL)")
    bashrc, shenv = _write_hooks(tmp)
    env = dict(os.environ, COWFS_SHELL="1", COWFS_MERGED=merged, COWFS_EVENTS=events)
    command = _shell_command(shell, bashrc, shenv, env)
    child = subprocess.Popen(command, cwd=merged, env=env)
    old = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGQUIT, signal.SIGTSTP)}
    try:
        status = child.wait()
        return 128 - status if status < 0 else status  # killed by signal N: 128+N, as a shell says it
    except BaseException:  # cowfs itself was stopped (SIGTERM, SIGHUP): hang up on the shell first
        child.send_signal(signal.SIGHUP)
        try:
            child.wait(timeout=5)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
        raise
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)


def _still_mounted(path):
    real = os.path.realpath(path)
    return any(m.mountpoint == real or m.mountpoint.startswith(real + "/") for m in mounttable.read())


def run(args):
    """Mount, run the shell, list the changes, unmount and clean up; the exit status is the shell's."""
    options = _stack(args)
    status = 0
    tmp = tempfile.mkdtemp(prefix="cowfs-shell-")
    merged = os.path.join(tmp, "merged")
    trace = os.path.join(tmp, "trace.jsonl")
    events = os.path.join(tmp, "events.txt")
    mounted = served = False  # served: the stack was mounted, so --keep has something to keep
    made = []  # the directories made for --upper: removed again when the mount does not happen
    try:
        if args.upper:
            check(mounting.unprivileged(parse_options(options), quiet=True))  # refuse before making anything
            upper = os.path.abspath(args.upper)
            work = upper.rstrip("/") + ".work"
            made = mounting.make_dirs(upper)
            made += mounting.make_dirs(work)
        else:
            upper, work = os.path.join(tmp, "upper"), os.path.join(tmp, "work")
            os.mkdir(upper)
            os.mkdir(work)
        os.mkdir(merged)
        open(events, "w").close()
        stack = check(parse_options(options + [upperdir_option(upper, work)]))
        mounting.mount(stack, merged, trace=trace, human_trace=events)
        mounted = served = True
        made = []
        try:
            print(f"cowfs shell: {len(stack.lowers)} lower layer{'s' if len(stack.lowers) != 1 else ''} "
                  f"under the upper {upper}, mounted at {merged}")
            for i, layer in enumerate(stack.lowers, 1):
                print(f"  layer {i}: {layer}")
            print(f"Each change to the layers is shown as a '{PREFIX.strip()}' line before the next prompt. "
                  "Type exit to finish.", flush=True)
            status = _run_shell(merged, tmp, events)
            found = changes(stack)
            print(f"\ncowfs shell: the shell exited (status {status}); changes in the upper:")
            for line in format_changes(found, sizes=True) or ["(no changes)"]:
                print("  " + line)
            print("  " + size_line(stack))
        finally:
            mounting.umount(merged)
            mounted = False
    finally:
        mounting.remove_made(made)
        if mounted or _still_mounted(merged):
            try:
                mounting.umount(merged)
            except StackError:
                mounting.force_unmount(merged)
        if _still_mounted(tmp):
            print(f"cowfs: {tmp}: still mounted; left in place", file=sys.stderr)
        elif args.keep and served and not args.upper:
            for name in ("merged", "events.txt", "events.txt.seen", "hook.sh", "bashrc", "shenv"):
                path = os.path.join(tmp, name)
                if os.path.isdir(path):
                    os.rmdir(path)
                elif os.path.exists(path):
                    os.unlink(path)
            print(f"cowfs shell: kept the upper {os.path.join(tmp, 'upper')} and the trace {trace}")
        else:
            if args.keep and served:
                keep_trace = args.upper.rstrip("/") + ".trace.jsonl"
                if os.path.exists(trace):
                    shutil.move(trace, keep_trace)
                    print(f"cowfs shell: kept the trace {keep_trace}")
            shutil.rmtree(tmp, ignore_errors=True)
    return status
