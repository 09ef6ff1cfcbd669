"""A fuzz of the command line: Hypothesis draws argument vectors from the real parser and runs them.

The commands, their options and how many arguments each takes are read from
the argparse parser that `cowfs.cli.main.build_parser` builds (nested
subcommands too, e.g. `system prune`), so a new command or option is fuzzed
without touching this file. Values come from small pools chosen by what an
argument names (its metavar): existing, missing and odd paths in a fresh
directory, image names and IDs of a small store, numbers, -o option strings,
junk (including bytes that are not UTF-8, as os.fsdecode gives them). Some
vectors are mount(8)'s helper form, an unknown word, or a global flag.

Every vector runs in-process through `main(argv)` with a guard: reaching the
daemon's mount (or umount) raises a CowfsError instead, so nothing is ever
mounted or forked and a few thousand examples take seconds. A smaller set
runs `python -m cowfs` for real in a subprocess (with the same guard), for
the real stdio, encodings and exit path. Each must:

- exit 0, 1 or 2;
- print no Python traceback and no "internal error" (a bug) on stderr;
- print at most one error line (`rmi`/`rm`: one per argument), exactly one when it fails;
- leave nothing behind: the directory tree as it was except where a command
  legitimately writes (the layer store it was given, commit's output file),
  no mount and no process under it, the temporary directory empty.

`make fuzz-cli` (FUZZ_CLI_ARGS="--examples N --seed S") runs many more.
COWFS_FUZZ_CLI_EXAMPLES sets the in-process count (default 150, derandomized).
"""

import argparse
import contextlib
import io
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from collections import Counter

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import cowfs.cli.main as cli
import cowfs.daemon.mount as mounting
from cowfs.errors import StackError
from cowfs.testing.mounts import mounts_under, pids_under

EXAMPLES = int(os.environ.get("COWFS_FUZZ_CLI_EXAMPLES", "150"))
SUBPROCESS_EXAMPLES = max(20, EXAMPLES // 6)
FUZZING = "COWFS_FUZZ_CLI_EXAMPLES" in os.environ  # make fuzz-cli: random, not the CI's fixed examples
USERXATTR_NOTICE = "cowfs: not privileged for trusted.* xattrs: mounting with userxattr (markers as user.overlay.*)"
GUARD_MESSAGE = "fuzz guard: not mounting"

# -- the pools -------------------------------------------------------------------------------------
# {name} is a path of the fresh directory (see `layout`); relative values are relative to it (the cwd).
# Nothing reaches above base/a (the directory is base/a/b/root): '..' and '../..' are the limits.
PATHS = ["{l1}", "{l2}", "{u}", "{w}", "{m}", "{upper}", "{file}", "{tar}", "{missing}", "{missing}/deeper",
         "{l1}/top", "{link}", "{store}", "{m}/", "l1", "l2", "m", "missing", ".", "..", "../..", "u/../l1"]
ODD = ["", "-", "--", ":", "a:b", "a,b", "x\\y", "=", "lowerdir=", "\n", " ", "%s", "{l1}:{l2}", "{l1},{l2}",
       "é", os.fsdecode(b"\xff\xfe"), "a" * 300, "-x", "--bogus", "-o", "nul\x01"]
IMAGES = ["acme/app:1", "acme/app", "nosuch:1", "{image}", "sha256:{image}", "busybox", "UPPER:Case", "a@b",
          ":", "sha256:", "{image}0", "acme/app:1@sha256:0"]
NUMBERS = ["0", "-1", "1", "99999999999999999999", "1.5", "0x10", "nan"]
CONTAINERS = ["0f3c9e21a7b4", "abc", "{image}"]
OPTION_PARTS = ["lowerdir={P}", "lowerdir={P}:{P}", "upperdir={P}", "workdir={P}", "ro", "rw", "redirect_dir=on",
                "redirect_dir=maybe", "metacopy=on", "userxattr", "oci_whiteouts", "volatile", "trace={P}",
                "allow_other", "noatime", "uidmapping=0:1000:1", "squash_to_uid=x", "fsname=x", "bogus", "",
                "x-foo", "defaults", "lowerdir=", "lowerdir={P}\\,x"]

DIR_KINDS = {"DIR", "UPPERDIR", "MOUNTPOINT|UPPERDIR", "LOWER", "LAYER", "LOWER... MOUNTPOINT", "MOUNTPOINT",
             "MOUNTPOINT|CONTAINER-UPPER"}
FILE_KINDS = {"FILE", "ARCHIVE", "PATH", "OUT.tar"}


def values_for(action):
    """A strategy for one value of `action` (an option's argument or a positional), by what it names."""
    junk = st.sampled_from(ODD + NUMBERS[:2])
    path = st.sampled_from(PATHS)
    if action.choices and not isinstance(action, argparse._SubParsersAction):
        return st.one_of(st.sampled_from(sorted(map(str, action.choices))), junk)
    if action.metavar == "OPTIONS":
        part = st.sampled_from(OPTION_PARTS).flatmap(
            lambda p: st.sampled_from(PATHS + ["", "a:b"]).map(lambda v: p.replace("{P}", v)))
        return st.one_of(st.lists(part, min_size=1, max_size=3).map(",".join), junk)
    if action.metavar in ("IMAGE", "NAME:TAG"):
        return st.one_of(st.sampled_from(IMAGES), junk, path)
    if action.metavar == "CONTAINER":
        return st.one_of(st.sampled_from(CONTAINERS), junk)
    if action.type is int or action.metavar == "SECONDS":
        return st.one_of(st.sampled_from(NUMBERS), junk)
    if action.metavar in DIR_KINDS or action.metavar in FILE_KINDS or action.dest in ("store", "trace"):
        return st.one_of(path, path, path, junk)
    return st.one_of(junk, path, st.sampled_from(IMAGES))


def _nargs_range(action):
    n = action.nargs
    if n is None:
        return 1, 1
    if isinstance(n, int):
        return n, n
    return {"?": (0, 1), "*": (0, 3), "+": (1, 3)}.get(n, (0, 2))


@st.composite
def command_for(draw, parser, words):
    """`words` (the command's path, e.g. ["system", "prune"]) and what follows them, drawn from `parser`."""
    units = []
    options = [a for a in parser._actions if a.option_strings and a.dest not in ("show_traceback",)]
    positionals = [a for a in parser._actions if not a.option_strings]
    chosen = [a for a in options if draw(st.integers(0, 3)) == 3]  # each option with a chance of 1 in 4
    chosen += [a for a in options if draw(st.integers(0, 15)) == 15]  # ... and sometimes twice
    for action in chosen:
        if isinstance(action, (argparse._HelpAction, argparse._VersionAction)) and draw(st.integers(0, 9)):
            continue  # --help rarely: it only prints
        flag = draw(st.sampled_from(action.option_strings))
        low, high = _nargs_range(action) if action.nargs != 0 else (0, 0)
        values = [draw(values_for(action)) for _ in range(draw(st.integers(low, high)))]
        if values and flag.startswith("--") and draw(st.integers(0, 5)) == 0:
            units.append([f"{flag}={values[0]}", *values[1:]])  # --store=DIR
        else:
            units.append([flag, *values])
    tail = []
    for action in positionals:
        if isinstance(action, argparse._SubParsersAction):
            name = draw(st.sampled_from(sorted(action.choices) + ["bogus"]))
            if name in action.choices:
                tail = draw(command_for(action.choices[name], [name]))
            else:
                tail = [name]
            break
        low, high = _nargs_range(action)
        odd = draw(st.integers(0, 9))  # sometimes one too few, or one too many
        count = max(0, low - 1) if odd == 0 else high + 1 if odd == 1 else draw(st.integers(low, high))
        units += [[draw(values_for(action))] for _ in range(count)]
    order = draw(st.permutations(units)) if units else []
    return [*words, *[word for unit in order for word in unit], *tail]


def command_lines():
    """Argument vectors for `cowfs`: mostly a real command, sometimes a helper-form call, an unknown word,
    a global flag, or nothing."""
    parser, _ = cli.build_parser()
    commands = parser.commands_action.choices
    real = st.sampled_from(list(commands)).flatmap(lambda name: command_for(commands[name], [name]))
    helper = st.tuples(st.sampled_from(["cowfs", "{l1}", "none"]), st.sampled_from(PATHS + ODD),
                       values_for(commands["mount"]._option_string_actions["-o"])).map(
        lambda t: [t[0], t[1], "-o", t[2]])
    unknown = st.tuples(st.sampled_from(["unmount", "pull", "mout", "moutn", "dif", "{l1}", "x"]),
                        st.lists(st.sampled_from(PATHS + ODD), max_size=3)).map(lambda t: [t[0], *t[1]])
    flags = st.sampled_from([[], ["--version"], ["--help"], ["--bogus"], ["-"], ["--"], ["--debug"]])
    return st.one_of(real, real, real, real, real, real, helper, unknown, flags)


# -- the directory every example runs in ------------------------------------------------------------

def _layer_tar(path):
    data = b"hello\n"
    with tarfile.open(path, "w") as tar:
        info = tarfile.TarInfo("etc")
        info.type, info.mode = tarfile.DIRTYPE, 0o755
        tar.addfile(info)
        info = tarfile.TarInfo("etc/hello")
        info.size, info.mode = len(data), 0o644
        tar.addfile(info, io.BytesIO(data))


@pytest.fixture(scope="module")
def template(tmp_path_factory):
    """A store holding one image (acme/app:1) and its layer tar, imported once; copied into each example."""
    base = tmp_path_factory.mktemp("fuzz-template")
    tar = base / "layer.tar"
    _layer_tar(tar)
    store = base / "store"
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main(["import", str(tar), "--name", "acme/app:1", "--store", str(store), "-q"])
    image = ""
    if code == 0 and (store / "repositories.json").exists():
        import json
        image = json.loads((store / "repositories.json").read_text())["acme/app:1"][7:19]
    else:
        print(f"note: the template store could not be made (exit {code}: {err.getvalue().strip()}); fuzzing "
              "without an image")
        store.mkdir(exist_ok=True)
    return {"tar": str(tar), "store": str(store), "image": image}


def layout(base, template):
    """base/a/b/root with two lowers, an upper with a change, a work dir, a mount point, a file, a layer
    tar, a symlink, the store and a temporary directory; returns {name: path}."""
    root = os.path.join(base, "a", "b", "root")
    d = {n: os.path.join(root, n) for n in ("l1", "l2", "u", "w", "m", "upper", "tmp")}
    for path in d.values():
        os.makedirs(path)
    for layer, names in (("l1", ("top", "dir/f")), ("l2", ("top", "bottom"))):
        for name in names:
            os.makedirs(os.path.dirname(os.path.join(d[layer], name)), exist_ok=True)
            with open(os.path.join(d[layer], name), "w") as f:
                f.write(layer)
    with open(os.path.join(d["upper"], "top"), "w") as f:
        f.write("changed")
    with open(os.path.join(root, "file"), "w") as f:
        f.write("just a file\n")
    shutil.copy(template["tar"], os.path.join(root, "layer.tar"))
    os.symlink(d["l1"], os.path.join(root, "link"))
    shutil.copytree(template["store"], os.path.join(root, "store"), symlinks=True)
    d.update(root=root, file=os.path.join(root, "file"), tar=os.path.join(root, "layer.tar"),
             link=os.path.join(root, "link"), store=os.path.join(root, "store"),
             missing=os.path.join(root, "missing"), image=template["image"] or "0123456789ab")
    return d


def fill(argv, d):
    """`argv` with each {name} replaced by the path (or value) of that name in `d`."""
    out = []
    for arg in argv:
        for key, value in d.items():
            arg = arg.replace("{" + key + "}", value)
        out.append(arg)
    return out


def snapshot(base):
    """{relative path: (kind, size, mtime, link target)} of everything under `base` (directories: kind only)."""
    found = {}
    for dirpath, dirnames, filenames in os.walk(base):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            st_ = os.lstat(path)
            rel = os.path.relpath(path, base)
            if os.path.islink(path):
                found[rel] = ("link", os.readlink(path))
            elif os.path.isdir(path):
                found[rel] = ("dir",)
            else:
                found[rel] = ("file", st_.st_size, st_.st_mtime_ns, st_.st_mode)
    return found


def allowed_writes(argv, d, parser):
    """Where the command may write: the default store, every --store it was given, the output file of the
    commands that write one (commit, save, export)."""
    roots = [d["store"]]
    words = list(argv)
    for i, word in enumerate(words):
        for flag in ("--store", "--output", "-o"):
            value = None
            if word == flag and i + 1 < len(words):
                value = words[i + 1]
            elif word.startswith(flag + "=") and flag.startswith("--"):
                value = word.split("=", 1)[1]
            if value is None or (flag == "-o" and words[:1] not in (["commit"], ["save"], ["export"])):
                continue
            roots.append(os.path.abspath(os.path.join(d["root"], value)) if value else d["root"] + "/\0")
    return roots


def _under(path, roots):
    return any(path == r or path.startswith(r.rstrip("/") + "/") for r in roots)


def check(argv, status, stdout, stderr, base, d, before, parser):
    """The properties every command line must have (see the module doc)."""
    shown = f"cowfs {' '.join(repr(a) for a in argv)}: exit {status}\nstderr: {stderr!r}"
    assert status in (0, 1, 2), shown
    assert "Traceback" not in stderr and "internal error" not in stderr, shown
    lines = [line for line in stderr.splitlines() if line.strip() and line != USERXATTR_NOTICE]
    per_argument = argv[:1] in (["rmi"], ["rm"])
    limit = max(1, len(argv)) if per_argument else 1
    assert len(lines) <= limit, shown
    if status != 0:
        assert len(lines) >= 1, shown
    assert not mounts_under(base), shown
    assert not pids_under(base), shown
    assert os.listdir(d["tmp"]) == [], f"{shown}\ntemporary files left: {os.listdir(d['tmp'])}"
    after = snapshot(base)
    roots = allowed_writes(argv, d, parser)
    changed = sorted(rel for rel in set(before) | set(after) if before.get(rel) != after.get(rel)
                     and not _under(os.path.join(base, rel), roots)
                     and not (after.get(rel) == ("dir",) and any(_under(r, [os.path.join(base, rel)])
                                                                 for r in roots)))  # a store's parents
    assert not changed, f"{shown}\nchanged outside the store and outputs: {changed[:10]}"


# -- running one command line -----------------------------------------------------------------------

def _refuse(*args, **kwargs):
    raise StackError(GUARD_MESSAGE)


@contextlib.contextmanager
def guarded(d):
    """In-process: the daemon's mount and umount refuse; cwd, stdin, environment and tempfile's directory
    are the example's; all restored after."""
    saved = (mounting.mount, mounting.umount, mounting.force_unmount)
    mounting.mount = mounting.umount = mounting.force_unmount = _refuse
    old_cwd, old_env, old_tmp = os.getcwd(), dict(os.environ), tempfile.tempdir
    stdin_fd = os.dup(0)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    old_stdin = sys.stdin
    try:
        os.chdir(d["root"])
        os.environ["COWFS_STORE"] = d["store"]
        os.environ.pop("COWFS_DEBUG", None)
        os.environ["TMPDIR"] = tempfile.tempdir = d["tmp"]
        sys.stdin = io.StringIO("")
        yield
    finally:
        mounting.mount, mounting.umount, mounting.force_unmount = saved
        os.chdir(old_cwd)
        os.environ.clear()
        os.environ.update(old_env)
        tempfile.tempdir = old_tmp
        sys.stdin = old_stdin
        os.dup2(stdin_fd, 0)
        os.close(stdin_fd)


def run_in_process(argv, d):
    out, err = io.StringIO(), io.StringIO()
    with guarded(d), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            status = cli.main(argv)
        except SystemExit as e:  # --help, --version
            status = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    return status, out.getvalue(), err.getvalue()


GUARDED_MAIN = f"""\
import sys
import cowfs.daemon.mount as mounting
from cowfs.errors import StackError
def refuse(*args, **kwargs):
    raise StackError({GUARD_MESSAGE!r})
mounting.mount = mounting.umount = mounting.force_unmount = refuse
from cowfs.cli.main import main
sys.exit(main(sys.argv[1:]))
"""


def run_subprocess(argv, d):
    env = {k: v for k, v in os.environ.items() if k != "COWFS_DEBUG"}
    env.update(COWFS_STORE=d["store"], TMPDIR=d["tmp"])
    res = subprocess.run([sys.executable, "-c", GUARDED_MAIN, *argv], cwd=d["root"], env=env,
                         stdin=subprocess.DEVNULL, capture_output=True, timeout=60)
    return res.returncode, os.fsdecode(res.stdout), os.fsdecode(res.stderr)


# -- the fuzz -------------------------------------------------------------------------------------

def _settings(examples):
    return settings(max_examples=examples, deadline=None, derandomize=not FUZZING, database=None,
                    print_blob=True, suppress_health_check=list(HealthCheck))


def _fuzz(template, runner, examples, label):
    parser, _ = cli.build_parser()
    stats = Counter()
    base = tempfile.mkdtemp(prefix="cowfs-fuzz-cli-")
    try:
        @_settings(examples)
        @given(argv=command_lines())
        def one(argv):
            shutil.rmtree(os.path.join(base, "a"), ignore_errors=True)
            d = layout(base, template)
            argv = fill(argv, d)
            before = snapshot(base)
            status, stdout, stderr = runner(argv, d)
            stats["examples"] += 1
            stats[f"exit {status}"] += 1
            stats["reached the mount (guarded)"] += GUARD_MESSAGE in stderr
            check(argv, status, stdout, stderr, base, d, before, parser)

        started = time.monotonic()
        one()
        took = time.monotonic() - started
    finally:
        for mnt, _ in sorted(mounts_under(base), reverse=True):
            subprocess.run(["umount", "-l", mnt], capture_output=True)
        for pid in pids_under(base):
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        shutil.rmtree(base, ignore_errors=True)
    summary = ", ".join(f"{k}: {v}" for k, v in sorted(stats.items()) if k != "examples")
    print(f"\n{label}: {stats['examples']} examples in {took:.1f} s ({summary})")
    assert stats["examples"] >= min(examples, 10)
    return stats


def test_command_line_fuzz_in_process(template):
    _fuzz(template, run_in_process, EXAMPLES, "cowfs command-line fuzz, in-process")


def test_command_line_fuzz_as_subprocesses(template):
    _fuzz(template, run_subprocess, SUBPROCESS_EXAMPLES, "cowfs command-line fuzz, python -m cowfs")


def test_the_drawn_vectors_cover_the_parser():
    """The strategy reaches every command and every option of the parser (so the fuzz says something)."""
    parser, _ = cli.build_parser()
    seen_words = set()

    @settings(max_examples=2000, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(argv=command_lines())
    def collect(argv):
        seen_words.update(w.split("=")[0] for w in argv)

    collect()
    missing = [name for name in parser.commands if name not in seen_words]
    assert not missing, f"commands never drawn: {missing}"
    never = [f"{name} {action.option_strings[0]}" for name in parser.commands
             for action in parser.commands_action.choices[name]._actions
             if action.option_strings and action.dest != "show_traceback" and action.help != argparse.SUPPRESS
             and not isinstance(action, argparse._HelpAction) and not set(action.option_strings) & seen_words]
    assert not never, f"options never drawn: {never}"
