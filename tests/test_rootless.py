"""Rootless cowfs, proven by really dropping privileges: what each test checks runs as an ordinary user.

The user, its Python (a venv with a copy of this checkout's cowfs, cached by
the sources' hash) and the switch (``setpriv``, no capabilities) come from
``cowfs.testing.unprivileged``; ``make rootless-setup`` prepares the machine.
Each test works in a fresh directory the user owns, and checks the user's
side for real: the daemon's uids, the owners of what it wrote, no trusted.*
xattr anywhere.  The kernel comparison runs ``tests/test_differential.py``
in ``userxattr`` mode as the user, as root of a user namespace of its own
(the module doc of ``cowfs.testing.unprivileged``).  Whatever a test mounts
is unmounted in ``finally`` (``fusermount3 -u``, ``umount``, ``umount -l``,
as root).  Missing pieces skip with the reason, or fail under ``CI=true``.

Run as root (the tests drop privileges themselves) or as an ordinary user
(then that user is the one, and the tests that need root to set up, such as
the ramfs upper, skip).
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import signal
import stat
import subprocess
import tempfile
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path

import pytest

from cowfs.testing import unprivileged
from cowfs.testing.harness import cleanup_base
from cowfs.testing.layers import Dir, File, Layer, StackSpec, Whiteout, materialise_layer
from cowfs.testing.mounts import in_ci, mounts_under, pids_under, pids_with_argument, wait_gone
from cowfs.testing.unprivileged import UnprivilegedUser, cowfs_argv, run_as_user

pytestmark = pytest.mark.fuse

TESTS = Path(__file__).resolve().parent
# what cowfs says on stderr when it picks userxattr itself (cowfs/cli/main.py); not an error line
USERXATTR_NOTICE = "cowfs: not privileged for trusted.* xattrs: mounting with userxattr (markers as user.overlay.*)"


# --------------------------------------------------------------------------
# fixtures and helpers

@pytest.fixture(scope="module")
def rootless() -> UnprivilegedUser:
    """The unprivileged user, with its Python, setpriv and /dev/fuse usable (else skip; fail under CI=true)."""
    return unprivileged.require("user", "setpriv", "python", "fuse")


def _give(path: Path, u: UnprivilegedUser) -> None:
    """Make everything under *path* the user's (when we are root; otherwise it is ours already)."""
    if not unprivileged.can_switch_users():
        return
    for dirpath, dirnames, filenames in os.walk(path):
        os.lchown(dirpath, u.uid, u.gid)
        for name in dirnames + filenames:
            os.lchown(os.path.join(dirpath, name), u.uid, u.gid)


@pytest.fixture
def space(rootless: UnprivilegedUser) -> Iterator[Path]:
    """A fresh directory of the user's (0755, under /tmp); afterwards whatever is still mounted
    below it is unmounted (as root: fusermount3 -u, umount, umount -l) and reported, and it is removed."""
    path = Path(tempfile.mkdtemp(prefix="cowfs-rootless-"))
    os.chmod(path, 0o755)
    _give(path, rootless)
    try:
        yield path
    finally:
        problems = cleanup_base(path)
        if path.exists() and not mounts_under(path):
            time.sleep(0.5)
            shutil.rmtree(path, ignore_errors=True)
            if path.exists():
                problems.append(f"{path} could not be removed")
        if not wait_gone(pids_under(path, dash=True), timeout=10):
            left = pids_under(path, dash=True)
            for pid in left:
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)
            problems.append(f"processes {left} (cowfs daemons?) outlived the test; killed")
        if problems:
            pytest.fail("; ".join(problems), pytrace=False)


def needs_root(what: str) -> None:
    """Skip (fail under CI=true) a test whose set-up needs root when the tests run as an ordinary user."""
    if not unprivileged.can_switch_users():
        if in_ci():
            pytest.fail(f"required under CI=true: {what} needs root", pytrace=False)
        pytest.skip(f"{what} needs root")


def make_layers(base: Path, spec: StackSpec, u: UnprivilegedUser) -> list[Path]:
    """*spec*'s layers as base/l1, base/l2, ... (topmost first), the user's own."""
    out = []
    for i, layer in enumerate(spec, 1):
        d = base / f"l{i}"
        d.mkdir()
        materialise_layer(layer, d)
        _give(d, u)
        out.append(d)
    return out


def cowfs(*args: object, cwd: Path, **kwargs) -> subprocess.CompletedProcess[str]:
    """``cowfs ARGS`` as the user."""
    return run_as_user(cowfs_argv(*map(str, args)), cwd=cwd, **kwargs)


def ok(result: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert result.returncode == 0, f"{result.args} exit {result.returncode}: {result.stderr.strip()}"
    return result


def errors(stderr: str) -> list[str]:
    """The lines of *stderr* other than cowfs's notice that it picked userxattr."""
    return [line for line in stderr.splitlines() if line != USERXATTR_NOTICE]


def daemon_uids(mountpoint: Path) -> set[int]:
    """The real, effective, saved and filesystem uids of the cowfs daemons serving *mountpoint*."""
    uids = set()
    for pid in pids_with_argument(mountpoint):
        with open(f"/proc/{pid}/status") as f:
            line = next(ln for ln in f if ln.startswith("Uid:"))
        uids |= {int(x) for x in line.split()[1:]}
    return uids


def paths_under(root: Path) -> set[str]:
    """Every path below *root* (nothing may be mounted there), for leftovers."""
    found = set()
    for dirpath, dirnames, filenames in os.walk(root):
        found |= {os.path.relpath(os.path.join(dirpath, n), root) for n in dirnames + filenames}
    return found


@pytest.fixture
def unmount_after(space: Path) -> Iterator[list[Path]]:
    """Mount points a test mounts (append them); unmounted in finally, as the user, whatever happened
    (``space`` then unmounts anything left as root)."""
    mounted: list[Path] = []
    yield mounted
    for mnt in mounted:
        if mounts_under(mnt):
            run_as_user(["fusermount3", "-u", str(mnt)], cwd=space)


# --------------------------------------------------------------------------
# mounting and using a stack, both syntaxes

STACK = StackSpec(
    Layer(  # l1, the top
        File("etc/issue", b"top\n"),
        Whiteout("bye"),  # a lower whiteout, made by the user
        File("app/hello.sh", b"echo hello\n", mode=0o755),
    ),
    Layer(  # l2, the bottom
        File("etc/hosts", b"hosts\n"),
        File("etc/motd", b"motd\n"),
        File("opq/gone", b"o\n"),
        File("opq/kept", b"keep\n"),
        File("bye", b"gone already\n"),
    ),
)
OPS = ('test "$(id -u)" != 0; echo more >> etc/hosts; rm etc/motd; rm -rf opq; mkdir opq; echo new > opq/kept; '
       "echo n > added; cat etc/issue; ls")
DIFF = """\
A /added
C /etc
C /etc/hosts
D /etc/motd
C /opq
D /opq/gone
C /opq/kept
"""


def check_upper(upper: Path, u: UnprivilegedUser) -> None:
    """The upper an unprivileged cowfs wrote: the user's, a real 0/0 whiteout, user.overlay.opaque, no trusted.*."""
    motd = os.lstat(upper / "etc/motd")
    assert stat.S_ISCHR(motd.st_mode) and motd.st_rdev == os.makedev(0, 0), "etc/motd is not a whiteout"
    assert os.getxattr(upper / "opq", "user.overlay.opaque") == b"y"
    assert (upper / "etc/hosts").read_bytes() == b"hosts\nmore\n"
    for rel in ["."] + sorted(paths_under(upper)):
        st = os.lstat(upper / rel)
        assert (st.st_uid, st.st_gid) == (u.uid, u.gid), f"upper/{rel} is owned by {st.st_uid}:{st.st_gid}"
        names = os.listxattr(upper / rel, follow_symlinks=False)  # root lists trusted.* too
        assert not [n for n in names if n.startswith("trusted.")], f"upper/{rel} has {names}"


@pytest.mark.parametrize("syntax", ["upper", "options"])
def test_a_user_mounts_uses_and_unmounts_a_stack(syntax, rootless, space, unmount_after):
    lowers = make_layers(space, STACK, rootless)
    mnt, upper = space / "merged", space / "upper"
    work = space / ("upper.work" if syntax == "upper" else "work")
    if syntax == "upper":  # cowfs makes the upper and its workdir
        args = [*lowers, "--upper", upper, mnt]
        made = []
    else:  # the kernel's spelling: the directories exist
        args = ["-o", f"lowerdir={lowers[0]}:{lowers[1]},upperdir={upper},workdir={work}", mnt]
        made = [upper, work]
    for d in [mnt, *made]:
        d.mkdir()
        _give(d, rootless)

    unmount_after.append(mnt)
    mounted = cowfs("mount", *args, cwd=space)
    assert mounted.returncode == 0, mounted.stderr
    assert mounted.stderr.splitlines() == [USERXATTR_NOTICE]
    assert daemon_uids(mnt) == {rootless.uid}, "the daemon does not run as the user alone"
    used = ok(run_as_user(["sh", "-ec", OPS], cwd=mnt))
    assert used.stdout.splitlines() == ["top", "added", "app", "etc", "opq"]

    assert ok(cowfs("diff", mnt, cwd=space)).stdout == DIFF
    hosts = ok(cowfs("explain", mnt / "etc/hosts", cwd=space)).stdout
    assert "in the upper, copied up from layer 2" in hosts, hosts  # (the trigger is in a trace only)
    motd = ok(cowfs("explain", mnt / "etc/motd", cwd=space)).stdout
    assert "deleted: a whiteout in upper" in motd, motd
    assert "its parent /opq is an opaque directory in upper" in ok(cowfs("explain", mnt / "opq/gone", cwd=space)).stdout
    status = ok(cowfs("status", mnt, cwd=space)).stdout
    assert str(mnt) in status and "userxattr" in status, status
    ok(cowfs("umount", mnt, cwd=space))
    assert not mounts_under(space)

    check_upper(upper, rootless)
    staging = os.lstat(work / "work")
    assert stat.S_IMODE(staging.st_mode) == 0o700 and staging.st_uid == rootless.uid
    # the diff of the upper at rest, and the kernel's reading of it, agree with the live one
    assert ok(cowfs("diff", upper, "-o", f"lowerdir={lowers[0]}:{lowers[1]},userxattr", cwd=space)).stdout == DIFF


# --------------------------------------------------------------------------
# README's "Exploring copy-up", as the user

TOUR = StackSpec(  # the demo's layers, topmost first
    Layer(File("app/hello.sh", b"#!/bin/sh\necho hello, world\n", mode=0o755)),  # 4-chmod
    Layer(Dir("app")),  # 3-copy-app
    Layer(File("etc/shells", b"/bin/sh\n/bin/dash\n/bin/bash\n/bin/rbash\n")),  # 2-bash
    Layer(File("etc/shells", b"/bin/sh\n/bin/dash\n"), File("etc/motd", b"welcome to the demo image\n")),  # 1-base
)


def test_the_copy_up_tour_as_a_user(rootless, space, unmount_after):
    lowers = make_layers(space, TOUR, rootless)
    t = space / "tour"
    merged, upper, trace = t / "merged", t / "upper", t / "trace.jsonl"
    ok(run_as_user(["mkdir", "-p", merged], cwd=space))
    before = paths_under(space)

    # README mounts with redirect_dir=on, which an unprivileged mount cannot have (it needs trusted.* xattrs)
    refused = cowfs("mount", *lowers, "--upper", upper, "-o", "redirect_dir=on", "--trace", trace, merged, cwd=space)
    assert refused.returncode == 1
    assert refused.stderr.splitlines() == ["cowfs: redirect_dir=on: needs trusted.* xattrs (CAP_SYS_ADMIN); an "
                                           "unprivileged mount uses userxattr, which excludes it"]
    assert paths_under(space) == before and not mounts_under(space)

    unmount_after.append(merged)
    ok(cowfs("mount", *lowers, "--upper", upper, "--trace", trace, merged, cwd=space))
    # mv of a lower directory without redirect_dir: EXDEV, and mv copies (as with the kernel)
    ok(run_as_user(["sh", "-ec", "echo /bin/zsh >> etc/shells; rm etc/motd; mv app srv"], cwd=merged))
    diff = ok(cowfs("diff", "--size", merged, cwd=space)).stdout.splitlines()
    assert [" ".join(line.split()[:2]) for line in diff[:-1]] == [
        "D /app", "C /etc", "D /etc/motd", "C /etc/shells", "A /srv", "A /srv/hello.sh"]
    assert diff[3].split()[2:] == ["48", "B"] and diff[-1].startswith("size: ")
    shells = ok(cowfs("explain", merged / "etc/shells", cwd=space)).stdout
    assert "in the upper, copied up from layer 3 on open for write" in shells, shells
    assert "hidden: it is a file in upper, which hides every layer below" in shells
    motd = ok(cowfs("explain", merged / "etc/motd", cwd=space)).stdout
    assert "deleted: a whiteout in upper" in motd and "hidden: it is deleted by a whiteout in upper" in motd
    status = ok(cowfs("status", merged, cwd=space)).stdout
    assert f"trace    {trace}" in status and "copied up (from the trace)" in status, status
    events = trace.read_text().splitlines()
    assert '"event": "copy_up", "path": "/etc"' in events[0] and '"path": "/etc/shells"' in events[1]
    ok(cowfs("umount", merged, cwd=space))
    assert os.stat(trace).st_uid == rootless.uid
    check = os.lstat(upper / "etc/motd")
    assert stat.S_ISCHR(check.st_mode) and check.st_rdev == 0 and check.st_uid == rootless.uid


# --------------------------------------------------------------------------
# the pytest fixtures and the kernel comparison, run by the user

def inner_pytest(u: UnprivilegedUser, space: Path, files: dict[str, str | Path], args: list[str], *,
                 userns: bool, ci: bool, timeout: float = 600) -> tuple[subprocess.CompletedProcess[str], dict]:
    """Run pytest as the user over *files* (name -> text or a file to copy) in a suite of its own
    (this checkout's setup.cfg); returns the result and {test name: (outcome, failure text)} from JUnit XML."""
    suite = space / "suite"
    (suite / "tests").mkdir(parents=True)
    shutil.copyfile(TESTS.parent / "setup.cfg", suite / "setup.cfg")
    for name, content in files.items():
        target = suite / "tests" / name
        if isinstance(content, Path):
            shutil.copyfile(content, target)
        else:
            target.write_text(content)
    for d in ("tmp", "basetemp", "run"):
        (space / d).mkdir(mode=0o700)
    _give(space, u)
    junit = space / "junit.xml"
    result = unprivileged.run_python_as_user(
        module="pytest", args=["-q", "-p", "no:cacheprovider", f"--basetemp={space / 'basetemp'}",
                               f"--junitxml={junit}", *args],
        cwd=suite, userns=userns, timeout=timeout,
        # cowfs's runtime directory: root of a user namespace would use /tmp/cowfs-0 (one name for every user)
        env={"TMPDIR": str(space / "tmp"), "XDG_RUNTIME_DIR": str(space / "run"), "CI": str(ci).lower()})
    assert not getattr(result, "lingering", []), f"processes left in the user namespace: {result.lingering}"
    assert junit.exists(), f"pytest as the user wrote no report: {result.stdout[-2000:]}{result.stderr[-2000:]}"
    assert junit.stat().st_uid == u.uid, "pytest did not run as the user"
    outcomes = {}
    for case in ET.parse(junit).getroot().iter("testcase"):
        outcome, text = "passed", ""
        for kind in ("failure", "error", "skipped"):
            element = case.find(kind)
            if element is not None:
                outcome, text = kind, (element.get("message") or "") + "\n" + (element.text or "")
        outcomes[case.get("name")] = (outcome, text)
    assert not paths_under(space / "tmp"), "the tests as the user left files in their TMPDIR"
    return result, outcomes


FIXTURE_TESTS = '''\
"""The plugin's fixtures, used by an unprivileged test process."""
import os

import pytest

from cowfs.testing import mounts
from cowfs.testing.layers import Dir, File, Layer, StackSpec, Whiteout
from cowfs.testing.plugin import mounted_stack
from cowfs.testing.tree import snapshot

SPEC = StackSpec(Layer(File("a", b"top"), Whiteout("gone"), Dir("opq", opaque=True), File("opq/new")),
                 Layer(File("gone", b"x"), File("opq/old"), File("b", b"bottom")))


def use(side):
    assert not mounts.privileged()
    assert "userxattr" in side.options
    m = side.mountpoint
    assert sorted(os.listdir(m)) == ["a", "b", "opq"] and os.listdir(m + "/opq") == ["new"]
    with open(m + "/b", "a") as f:
        f.write("more")
    os.unlink(m + "/a")
    os.mkdir(m + "/d")
    return snapshot(m)


@pytest.mark.cowfs_layers(SPEC)
def test_cowfs_stack(cowfs_stack):
    use(cowfs_stack)


@pytest.mark.cowfs_layers(SPEC)
def test_kernel_overlay(kernel_overlay):
    use(kernel_overlay)


def test_mounted_stack_kernel_and_cowfs_agree(tmp_path):
    mounts.require("kernel", "fuse")
    trees = {}
    for kind in ("kernel", "cowfs"):
        (tmp_path / kind).mkdir()
        with mounted_stack(SPEC, tmp_path / kind, kind) as side:
            trees[kind] = use(side)
        assert os.path.isdir(side.upper + "/d") and os.path.exists(side.upper + "/a")  # a whiteout
    assert trees["kernel"] == trees["cowfs"]
'''


@pytest.mark.parametrize("where", ["plain", "userns"])
def test_the_fixtures_work_for_an_ordinary_user(where, rootless, space):
    """cowfs_stack, kernel_overlay and mounted_stack in a test process run by the user: plainly (the kernel
    fixture then skips, saying why) and as root of the user's namespace (both sides mount, and agree)."""
    if where == "userns":
        unprivileged.require("userns")
    result, outcomes = inner_pytest(rootless, space, {"test_fixtures.py": FIXTURE_TESTS}, ["tests/test_fixtures.py"],
                                    userns=where == "userns", ci=False, timeout=300)
    assert outcomes["test_cowfs_stack"][0] == "passed", outcomes["test_cowfs_stack"][1] + result.stdout[-3000:]
    if where == "plain":
        for name in ("test_kernel_overlay", "test_mounted_stack_kernel_and_cowfs_agree"):
            outcome, text = outcomes[name]
            assert outcome == "skipped" and "unshare -Urm" in text, (name, outcome, text)
    else:
        assert {name: outcome for name, (outcome, _) in outcomes.items()} == dict.fromkeys(outcomes, "passed"), \
            result.stdout[-5000:]


# Where the kernel, mounted in a user namespace, differs from itself mounted by root (which cowfs follows):
# it cannot encode file handles there, so it writes an empty user.overlay.origin on copy-up, and a copied-up
# file's inode is then keyed by the lower inode for a name looked up before the copy-up and by the upper
# inode for names looked up after, and renaming one name of a hard-linked file onto another fails with
# ESTALE.  Each must fail with exactly this, and nothing else may fail.
KERNEL_IN_USERNS = {
    "test_differential[rename_hardlink_onto_itself-userxattr]":
        "#18 rename base2 -> base.txt: kernel=('errno', 'ESTALE')  cowfs=None",
}


def _problem_lines(text: str) -> list[str]:
    """The problems of a failed differential scenario, from its failure message
    ("AssertionError: scenario NAME [MODE]:", the problems, then pytest's "assert not [...]")."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("AssertionError: scenario ")) + 1
    end = next((i for i in range(start, len(lines)) if lines[i].startswith("assert not ")), len(lines))
    return [line.strip() for line in lines[start:end] if line.strip()]


def test_differential_scenarios_in_userxattr_mode_as_a_user(rootless, space):
    """tests/test_differential.py -k userxattr as the user, in its user namespace (kernel and cowfs both
    mounted by the user there), under CI=true so that nothing may skip."""
    unprivileged.require("userns", "subids")
    files = {"conftest.py": TESTS / "conftest.py", "test_differential.py": TESTS / "test_differential.py"}
    result, outcomes = inner_pytest(rootless, space, files, ["tests/test_differential.py", "-k", "userxattr"],
                                    userns=True, ci=True)
    ran = {name: outcome for name, (outcome, _) in outcomes.items() if name.startswith("test_differential[")}
    assert len(ran) >= 20, f"only {len(ran)} userxattr scenarios ran: {result.stdout[-3000:]}"
    print(f"{len(ran)} userxattr scenarios ran as {rootless.name}: "
          f"{sum(o == 'passed' for o in ran.values())} passed, {len(KERNEL_IN_USERNS)} known kernel-in-userns")
    unexpected = {name: outcomes[name][1][-3000:] for name, outcome in ran.items()
                  if (outcome == "passed") == (name in KERNEL_IN_USERNS)}
    assert not unexpected, f"unexpected outcomes (a new difference, or a known one gone): {unexpected}"
    for name, signature in KERNEL_IN_USERNS.items():
        problems = _problem_lines(outcomes[name][1])
        assert problems[-1] == signature and len(problems) == 2, (name, problems)


# --------------------------------------------------------------------------
# bad input: one line, exit status 1, nothing left behind

def refused(space: Path, args: list, mnt: Path, made_in_workdir: Path | None = None) -> str:
    """Run ``cowfs mount ARGS`` as the user; it must exit 1 with one error line, leaving no file and no mount
    (but WORKDIR/work in the workdir *made_in_workdir* given with -o: cowfs makes it, as the kernel does, before
    it probes the upper's xattrs)."""
    before, mounted = paths_under(space), mounts_under(space)
    result = cowfs("mount", *args, cwd=space)
    assert result.returncode == 1, (result.returncode, result.stderr)
    lines = errors(result.stderr)
    assert len(lines) == 1 and lines[0].startswith("cowfs: "), result.stderr
    assert mounts_under(space) == mounted and not pids_with_argument(mnt)
    allowed = {os.path.relpath(made_in_workdir / "work", space)} if made_in_workdir else set()
    assert paths_under(space) - allowed == before, f"left behind: {paths_under(space) - before}"
    return lines[0]


def test_a_layer_the_user_cannot_reach_is_refused(rootless, space):
    (space / "l1").mkdir()
    (space / "merged").mkdir()
    _give(space, rootless)
    hidden = space / "hidden"
    hidden.mkdir(mode=0o700)  # root's, closed
    (hidden / "layer").mkdir()
    if not unprivileged.can_switch_users():
        os.chmod(hidden, 0o000)
    try:
        for args in ([hidden / "layer", space / "l1", "--upper", space / "upper", space / "merged"],
                     ["-o", f"lowerdir={space / 'l1'}:{hidden / 'layer'},userxattr", space / "merged"]):
            line = refused(space, args, space / "merged")
            assert f"lowerdir {hidden / 'layer'}: " in line, line
    finally:
        os.chmod(hidden, 0o700)


def test_a_layer_the_user_cannot_reach_is_refused_as_permission_denied(rootless, space):
    (space / "merged").mkdir()
    _give(space, rootless)
    hidden = space / "hidden"
    hidden.mkdir(mode=0o700)
    (hidden / "layer").mkdir()
    if not unprivileged.can_switch_users():
        os.chmod(hidden, 0o000)
    try:
        line = refused(space, ["-o", f"lowerdir={hidden / 'layer'},userxattr", space / "merged"], space / "merged")
        assert line == f"cowfs: lowerdir {hidden / 'layer'}: Permission denied"
    finally:
        os.chmod(hidden, 0o700)


def test_an_upper_without_user_xattrs_is_refused(rootless, space):
    """An upper on ramfs, which has no xattrs at all: user.overlay.* markers cannot be written."""
    needs_root("mounting the ramfs")
    for name in ("l1", "merged", "ramfs"):
        (space / name).mkdir()
    _give(space, rootless)
    ramfs = space / "ramfs"
    subprocess.run(["mount", "-t", "ramfs", "ramfs", ramfs], check=True, capture_output=True, timeout=30)
    try:
        os.chown(ramfs, rootless.uid, rootless.gid)
        os.chmod(ramfs, 0o755)
        line = refused(space, [space / "l1", "--upper", ramfs / "upper", space / "merged"], space / "merged")
        assert line == f"cowfs: upperdir {ramfs / 'upper'}: cannot set user.overlay.* xattrs (Operation not supported)"
        (ramfs / "u").mkdir()
        (ramfs / "w").mkdir()
        _give(ramfs, rootless)
        line = refused(space, ["-o", f"lowerdir={space / 'l1'},upperdir={ramfs / 'u'},workdir={ramfs / 'w'}",
                               space / "merged"], space / "merged", made_in_workdir=ramfs / "w")
        assert line == f"cowfs: upperdir {ramfs / 'u'}: cannot set user.overlay.* xattrs (Operation not supported)"
        assert sorted(os.listdir(ramfs)) == ["u", "w"] and not os.listdir(ramfs / "u")
    finally:
        res = subprocess.run(["umount", ramfs], capture_output=True, timeout=30)
        if res.returncode != 0:
            subprocess.run(["umount", "-l", ramfs], capture_output=True, timeout=30)


def test_a_mount_point_of_another_user_is_refused(rootless, space):
    needs_root("making a directory of another user")
    (space / "l1").mkdir()
    _give(space, rootless)
    theirs = space / "theirs"
    theirs.mkdir(mode=0o755)  # root's
    for args in ([space / "l1", "--upper", space / "upper", theirs],
                 ["-o", f"lowerdir={space / 'l1'}", theirs]):
        line = refused(space, args, theirs)
        assert line.startswith(f"cowfs: mount point {theirs}: ") and "no write access" in line, line


# --------------------------------------------------------------------------
# cowfs shell

def shell_as_user(u: UnprivilegedUser, space: Path, *options: str) -> subprocess.CompletedProcess[str]:
    """``cowfs shell L1 OPTIONS`` as the user, fed a few commands on stdin; nothing may be left in /tmp."""
    (l1,) = make_layers(space, StackSpec(Layer(File("etc/hosts", b"hosts\n"))), u)

    def shell_dirs() -> set[str]:
        return {p for p in glob.glob("/tmp/cowfs-shell-*") if os.lstat(p).st_uid == u.uid}

    before = shell_dirs()
    result = run_as_user(cowfs_argv("shell", l1, *options), cwd=space, timeout=120,
                         input='test "$(id -u)" != 0 && echo hi > x; echo more >> etc/hosts; exit\n')
    left = shell_dirs() - before
    assert not any(mounts_under(p) for p in left) and not left, f"cowfs shell left {left}"
    assert not mounts_under(space) and not pids_under("/tmp/cowfs-shell", u.uid, dash=True)
    return result


def test_cowfs_shell_as_a_user_leaves_nothing(rootless, space):
    shell_as_user(rootless, space)  # userxattr picked by cowfs itself (the next test); nothing may be left
    shutil.rmtree(space / "l1")
    result = shell_as_user(rootless, space, "-o", "userxattr")
    assert result.returncode == 0, result.stderr
    summary = result.stdout.split("cowfs shell: the shell exited (status 0); changes in the upper:\n")
    assert len(summary) == 2, result.stdout
    assert [line.split()[:2] for line in summary[1].splitlines()[:3]] == [["C", "/etc"], ["C", "/etc/hosts"],
                                                                          ["A", "/x"]], result.stdout


def test_cowfs_shell_as_a_user_picks_userxattr_itself(rootless, space):
    result = shell_as_user(rootless, space)
    assert result.returncode == 0, result.stderr
    assert "mounting with userxattr" in result.stderr, result.stderr


# --------------------------------------------------------------------------
# the image commands, with the user's own store

def test_the_image_commands_as_a_user(rootless, space, unmount_after):
    """import, images, history, inspect, mount IMAGE, ps, diff, commit, umount, rm and rmi, as the user, with
    the store in the user's home ($HOME/.local/share/cowfs): each succeeds, and nothing is left behind."""
    (rootfs,) = make_layers(space, StackSpec(Layer(File("etc/hostname", b"box\n"), File("bin/tool", b"#!/bin/sh\n",
                                                                                           mode=0o755))), rootless)
    tar = space / "rootfs.tar"
    ok(run_as_user(["tar", "-C", str(rootfs), "-cf", str(tar), "."], cwd=space))
    store = Path(rootless.home) / ".local/share/cowfs"
    store_was_there = store.exists()
    try:
        ok(cowfs("import", tar, "--name", "box:1", cwd=space))
        assert "box" in ok(cowfs("images", cwd=space)).stdout
        ok(cowfs("history", "box:1", cwd=space))
        ok(cowfs("inspect", "box:1", cwd=space))
        mnt = space / "m"
        mnt.mkdir()
        _give(mnt, rootless)
        unmount_after.append(mnt)
        container = ok(cowfs("mount", "box:1", mnt, cwd=space)).stdout.split()[-1]
        assert daemon_uids(mnt) == {rootless.uid}
        # the image's root directory is root's (a layer's own root always is), etc/ the user's
        ok(run_as_user(["sh", "-c", "echo changed > etc/hostname; echo n > etc/new"], cwd=mnt))
        assert container[:12] in ok(cowfs("ps", cwd=space)).stdout
        assert ok(cowfs("diff", mnt, cwd=space)).stdout == "C /etc\nC /etc/hostname\nA /etc/new\n"
        ok(cowfs("commit", mnt, "--tag", "box:2", cwd=space))
        ok(cowfs("umount", mnt, cwd=space))
        assert not mounts_under(mnt)
        ok(cowfs("rm", container, cwd=space))
        assert container[:12] not in ok(cowfs("ps", cwd=space)).stdout
        for tag in ("box:2", "box:1"):
            ok(cowfs("rmi", tag, cwd=space))
        assert "box" not in ok(cowfs("images", cwd=space)).stdout
        for top in ("containers", "layers"):
            assert not os.listdir(store / top), f"{top} left in the store: {os.listdir(store / top)}"
        for dirpath, _, filenames in os.walk(store):
            for name in filenames:
                assert os.lstat(os.path.join(dirpath, name)).st_uid == rootless.uid
    finally:
        if not store_was_there:
            shutil.rmtree(store, ignore_errors=True)
