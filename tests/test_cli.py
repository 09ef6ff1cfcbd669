"""The `cowfs` command line: refusals, help, the friendly spelling, and foreground mode.

Every refusal (a bad option, a missing or overlapping layer, an upper or
work directory in use, a busy mount point) must be ONE line on stderr
naming the path (or option) and the reason, a non-zero exit, and leave no
mount, no daemon and no runtime record behind: a script or mount(8) sees
why at once, and a failed mount never leaves a half-started one to clean up.
Pure option errors are checked in-process through `cowfs.cli.main`;
everything that gets as far as checking paths or mounting runs
`python -m cowfs` as a subprocess.

Tests that mount need FUSE (and some the kernel overlay, or root for a
tmpfs): they skip with a reason when it is missing, and fail under CI=true.
"""

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time

import pytest

import cowfs.cli.main as cli
import cowfs.daemon.mount as mounting
from cowfs.runtime import record_path
from cowfs.testing.mounts import (
    force_unmount,
    in_ci,
    is_mounted,
    mounts_under,
    pid_alive,
    pids_under,
    pids_with_argument,
    wait_gone,
)

COWFS = [sys.executable, "-m", "cowfs"]


# ---------------------------------------------------------------------------------------------
# helpers


def run_cowfs(*args, timeout=60, **kwargs):
    return subprocess.run(COWFS + [str(a) for a in args], stdin=subprocess.DEVNULL, capture_output=True,
                          text=True, timeout=timeout, **kwargs)


def fstype(path):
    path = os.path.realpath(path)
    return next((t for mnt, t in mounts_under(path) if mnt == path), None)




def record_of(mountpoint):
    path = record_path(os.path.realpath(mountpoint))
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None






def unmount_quietly(mountpoint):
    """Last-resort cleanup for a finally block: fusermount -u, umount, umount -l; then wait for its daemons."""
    daemons = pids_with_argument(os.path.realpath(mountpoint)) | pids_with_argument(mountpoint)
    if is_mounted(mountpoint):
        force_unmount(mountpoint)
    wait_gone(daemons)


def assert_refused(result, mountpoint, *must_contain, reason):
    """One clear stderr line naming what is wrong, non-zero exit, and nothing left behind."""
    assert result.returncode != 0, f"accepted (exit 0); stderr: {result.stderr!r}"
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one stderr line, got {lines!r}"
    line = lines[0]
    for text in must_contain:
        assert str(text) in line, f"{text!r} not named in {line!r}"
    assert re.search(reason, line, re.I), f"reason /{reason}/ not in {line!r}"
    assert "Traceback" not in result.stderr
    assert result.stdout == ""
    if mountpoint is not None:
        assert not is_mounted(mountpoint), f"{mountpoint} left mounted"
        assert wait_gone(pids_with_argument(mountpoint) | pids_with_argument(os.path.realpath(mountpoint)), 3.0), \
            "a daemon was left running"
        assert record_of(mountpoint) is None, "a runtime record was left behind"


# ---------------------------------------------------------------------------------------------
# fixtures

def _need_root(what):
    if os.geteuid() != 0:
        if in_ci():
            pytest.fail(f"required under CI=true but missing: {what} needs root", pytrace=False)
        pytest.skip(f"{what} needs root")


@pytest.fixture
def dirs(tmp_path):
    """l1, l2 (lowers, l1 on top), u, w, m, m2 under tmp_path; nothing may stay mounted below it."""
    names = ("l1", "l2", "u", "w", "m", "m2")
    d = {n: tmp_path / n for n in names}
    for p in d.values():
        p.mkdir()
    (d["l1"] / "top").write_text("l1")
    (d["l2"] / "top").write_text("l2")
    (d["l2"] / "bottom").write_text("l2")
    d["tmp"] = tmp_path
    yield d
    left = mounts_under(tmp_path)
    for mnt, _ in sorted(left, reverse=True):
        try:
            unmount_quietly(mnt)
        except Exception:  # noqa: BLE001 - reported below
            pass
    still = mounts_under(tmp_path)
    assert not still, f"could not unmount {still}"
    assert not left, f"test left mounts behind (now unmounted): {left}"


def opts(d, upper="u", work="w", lowers=("l1", "l2"), extra=""):
    s = "lowerdir=" + ":".join(str(d[x]) for x in lowers)
    if upper:
        s += f",upperdir={d[upper]},workdir={d[work]}"
    return s + ("," + extra if extra else "")


@pytest.fixture
def never_mounts(monkeypatch):
    """In-process tests of option errors: reaching the mount step is a failure in itself."""
    def refuse(*args, **kwargs):
        raise AssertionError("mounting.mount reached for an invalid command line")
    monkeypatch.setattr(mounting, "mount", refuse)


# =============================================================================================
# option errors, in-process

def wait_mounted(proc, mountpoint, err_path, timeout=30):
    """Wait until a foreground cowfs `proc` has mounted `mountpoint` (failing with its stderr if it exits)."""
    deadline = time.monotonic() + timeout
    while not is_mounted(mountpoint):
        assert proc.poll() is None, f"exited {proc.returncode}: {err_path.read_text()}"
        assert time.monotonic() < deadline, f"not mounted within {timeout} s"
        time.sleep(0.05)


class TestOptionErrors:
    @pytest.mark.parametrize("option, named, reason", [
        ("upperdir={u},workdir={w}", "lowerdir", "missing"),
        ("lowerdir={l1},upperdir={u}", "workdir", "missing"),
        ("lowerdir={l1},workdir={w}", "upperdir", "missing"),
        ("lowerdir={l1},bogus=1", "bogus", "unknown option"),
        ("lowerdir={l1},index=maybe", "index", "bad value"),
        ("lowerdir={l1},upperdir={u},workdir={w},redirect_dir=maybe", "redirect_dir", "bad value|invalid"),
        ("lowerdir={l1},upperdir={u},workdir={w},userxattr,redirect_dir=on", "userxattr",
         "conflict|incompatible|not allowed"),
        ("lowerdir={l1}:::{l2}", "lowerdir", "empty"),
        ("lowerdir={l1}::{l2}:{l1}", "lowerdir", "cannot follow data"),
        ("lowerdir=", "lowerdir", "value|empty|missing"),
    ])
    def test_refused_in_one_line(self, dirs, capsys, never_mounts, option, named, reason):
        option = option.format(**{k: v for k, v in dirs.items()})
        rc = cli.main(["mount", "-o", option, str(dirs["m"])])
        out, err = capsys.readouterr()
        assert rc != 0
        lines = [line for line in err.splitlines() if line.strip()]
        assert len(lines) == 1, lines
        assert named in lines[0]
        assert re.search(reason, lines[0], re.I), lines[0]
        assert out == ""
        assert not is_mounted(dirs["m"])

    def test_redirect_dir_on_and_userxattr_alone_are_fine(self, dirs, capsys, monkeypatch):
        seen = []
        monkeypatch.setattr(mounting, "mount", lambda stack, mnt, **kw: seen.append(stack))
        assert cli.main(["mount", "-o", opts(dirs, extra="redirect_dir=on"), str(dirs["m"])]) == 0
        assert cli.main(["mount", "-o", opts(dirs, extra="userxattr"), str(dirs["m"])]) == 0
        assert [s.redirect_dir for s in seen] == ["on", "off"]
        assert [s.userxattr for s in seen] == [False, True]
        assert seen[0].lowers == [str(dirs["l1"]), str(dirs["l2"])]  # leftmost is topmost

    def test_kernel_escapes_in_layer_paths(self, tmp_path, capsys, monkeypatch):
        seen = []
        monkeypatch.setattr(mounting, "mount", lambda stack, mnt, **kw: seen.append(stack))
        weird = tmp_path / "a:b,c"
        assert cli.main(["mount", "-o", "lowerdir=" + str(weird).replace(":", "\\:").replace(",", "\\,")
                               + ":" + str(tmp_path / "x"), str(tmp_path / "m")]) == 0
        assert seen[0].lowers == [str(weird), str(tmp_path / "x")]

    def test_umount_of_something_not_mounted(self, dirs, capsys):
        rc = cli.main(["umount", str(dirs["m"])])
        out, err = capsys.readouterr()
        assert rc != 0
        lines = [line for line in err.splitlines() if line.strip()]
        assert len(lines) == 1 and str(dirs["m"]) in lines[0] and "not" in lines[0], lines


# =============================================================================================
# help

class TestHelp:
    def test_top_level_help(self):
        res = run_cowfs("--help")
        assert res.returncode == 0
        assert "mount" in res.stdout and "umount" in res.stdout
        assert "lowerdir" in res.stdout

    def test_mount_help(self):
        res = run_cowfs("mount", "--help")
        assert res.returncode == 0
        for word in ("lowerdir", "upperdir", "workdir", "redirect_dir", "userxattr", "oci_whiteouts", "-f"):
            assert word in res.stdout, word

    def test_help_in_process(self, capsys):
        with pytest.raises(SystemExit) as info:
            cli.main(["mount", "--help"])
        assert info.value.code == 0
        assert "lowerdir" in capsys.readouterr().out


# =============================================================================================
# refusals that get as far as the paths or the mount (subprocess)

@pytest.mark.fuse
class TestRefusals:
    def test_lower_missing(self, dirs):
        missing = dirs["tmp"] / "nope"
        res = run_cowfs("mount", "-o", f"lowerdir={missing},upperdir={dirs['u']},workdir={dirs['w']}", dirs["m"])
        assert_refused(res, dirs["m"], missing, reason="no such file")

    def test_lower_is_a_file(self, dirs):
        f = dirs["tmp"] / "file"
        f.write_text("x")
        res = run_cowfs("mount", "-o", f"lowerdir={dirs['l1']}:{f},upperdir={dirs['u']},workdir={dirs['w']}",
                        dirs["m"])
        assert_refused(res, dirs["m"], f, reason="not a directory")

    def test_upper_missing(self, dirs):
        missing = dirs["tmp"] / "no-upper"
        res = run_cowfs("mount", "-o", f"lowerdir={dirs['l1']},upperdir={missing},workdir={dirs['w']}", dirs["m"])
        assert_refused(res, dirs["m"], missing, reason="no such file")

    def test_mountpoint_missing(self, dirs):
        missing = dirs["tmp"] / "no-mnt"
        res = run_cowfs("mount", "-o", opts(dirs), missing)
        assert_refused(res, None, missing, reason="no such file")
        assert not os.path.exists(missing)

    def test_upper_inside_lower(self, dirs):
        inner = dirs["l2"] / "upper"
        inner.mkdir()
        res = run_cowfs("mount", "-o", f"lowerdir={dirs['l1']}:{dirs['l2']},upperdir={inner},workdir={dirs['w']}",
                        dirs["m"])
        assert_refused(res, dirs["m"], inner, reason="overlap|inside")

    def test_work_inside_upper(self, dirs):
        inner = dirs["u"] / "work"
        inner.mkdir()
        res = run_cowfs("mount", "-o", f"lowerdir={dirs['l1']},upperdir={dirs['u']},workdir={inner}", dirs["m"])
        assert_refused(res, dirs["m"], inner, reason="overlap|inside")

    def test_lower_inside_lower(self, dirs):
        inner = dirs["l1"] / "sub"
        inner.mkdir()
        res = run_cowfs("mount", "-o", f"lowerdir={dirs['l1']}:{inner},upperdir={dirs['u']},workdir={dirs['w']}",
                        dirs["m"])
        assert_refused(res, dirs["m"], inner, reason="overlap|inside")

    def test_upper_equals_work(self, dirs):
        res = run_cowfs("mount", "-o", f"lowerdir={dirs['l1']},upperdir={dirs['u']},workdir={dirs['u']}", dirs["m"])
        assert_refused(res, dirs["m"], dirs["u"], reason="overlap|same|inside")

    @pytest.mark.parametrize("layer", ["l2", "u", "w"])
    def test_mountpoint_inside_a_layer(self, dirs, layer):
        mnt = dirs[layer] / "mnt"
        mnt.mkdir()
        res = run_cowfs("mount", "-o", opts(dirs), mnt)
        assert_refused(res, mnt, mnt, reason="inside|overlap")

    def test_workdir_on_another_filesystem(self, dirs):
        _need_root("mounting a tmpfs")
        t = dirs["tmp"] / "tmpfs"
        t.mkdir()
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(t)], check=True)
        try:
            work = t / "w"
            work.mkdir()
            res = run_cowfs("mount", "-o", f"lowerdir={dirs['l1']},upperdir={dirs['u']},workdir={work}", dirs["m"])
            assert_refused(res, dirs["m"], work, reason="filesystem")
            assert os.listdir(work) == []
        finally:
            subprocess.run(["umount", str(t)], capture_output=True)
            if is_mounted(t):
                subprocess.run(["umount", "-l", str(t)], capture_output=True)

    def test_upper_and_work_already_used_by_another_cowfs_mount(self, dirs):
        first = run_cowfs("mount", "-o", opts(dirs), dirs["m"])
        try:
            assert first.returncode == 0, first.stderr
            res = run_cowfs("mount", "-o", opts(dirs), dirs["m2"])
            assert_refused(res, dirs["m2"], dirs["u"], reason="in use|busy|already")
            assert (dirs["m"] / "top").read_text() == "l1"  # the first mount is unharmed
        finally:
            unmount_quietly(dirs["m2"])
            unmount_quietly(dirs["m"])

    def test_upper_already_used_by_another_cowfs_mount_with_other_workdir(self, dirs):
        w2 = dirs["tmp"] / "w2"
        w2.mkdir()
        first = run_cowfs("mount", "-o", opts(dirs), dirs["m"])
        try:
            assert first.returncode == 0, first.stderr
            res = run_cowfs("mount", "-o", f"lowerdir={dirs['l1']},upperdir={dirs['u']},workdir={w2}", dirs["m2"])
            assert_refused(res, dirs["m2"], dirs["u"], reason="in use|busy|already")
        finally:
            unmount_quietly(dirs["m2"])
            unmount_quietly(dirs["m"])

    @pytest.mark.kernel
    @pytest.mark.parametrize("same_work", [True, False])
    def test_upper_used_by_a_kernel_overlay(self, dirs, same_work):
        k = dirs["tmp"] / "k"
        k.mkdir()
        subprocess.run(["mount", "-t", "overlay", "overlay", "-o", opts(dirs), str(k)], check=True,
                       capture_output=True)
        try:
            w = dirs["w"]
            if not same_work:
                w = dirs["tmp"] / "w2"
                w.mkdir()
            res = run_cowfs("mount", "-o", f"lowerdir={dirs['l1']},upperdir={dirs['u']},workdir={w}", dirs["m"])
            assert_refused(res, dirs["m"], dirs["u"], reason="in use|busy|already")
            assert (k / "top").read_text() == "l1"
        finally:
            unmount_quietly(dirs["m"])
            subprocess.run(["umount", str(k)], capture_output=True)
            if is_mounted(k):
                subprocess.run(["umount", "-l", str(k)], capture_output=True)

    def test_busy_mountpoint(self, dirs):
        first = run_cowfs("mount", "-o", opts(dirs), dirs["m"])
        try:
            assert first.returncode == 0, first.stderr
            u2, w2 = dirs["tmp"] / "u2", dirs["tmp"] / "w2"
            u2.mkdir()
            w2.mkdir()
            res = run_cowfs("mount", "-o", f"lowerdir={dirs['l2']},upperdir={u2},workdir={w2}", dirs["m"])
            assert res.returncode != 0
            lines = [line for line in res.stderr.splitlines() if line.strip()]
            assert len(lines) == 1 and str(dirs["m"]) in lines[0] and re.search("busy|already", lines[0]), lines
            assert [t for mnt, t in mounts_under(dirs["m"])] == ["fuse.cowfs"], "stacked a second mount"
            assert (dirs["m"] / "top").read_text() == "l1"
            assert os.listdir(u2) == []
        finally:
            unmount_quietly(dirs["m"])


# =============================================================================================
# mounting through the command line

@pytest.mark.fuse
class TestMount:
    def test_option_form_mounts_and_umount_stops_the_daemon(self, dirs):
        res = run_cowfs("mount", "-o", opts(dirs), dirs["m"])
        try:
            assert res.returncode == 0, res.stderr
            assert res.stderr == ""
            assert fstype(dirs["m"]) == "fuse.cowfs"
            assert (dirs["m"] / "top").read_text() == "l1"
            assert (dirs["m"] / "bottom").read_text() == "l2"
            record = record_of(dirs["m"])
            assert record and pid_alive(record["pid"])
            (dirs["m"] / "top").write_text("changed")
            assert (dirs["u"] / "top").read_text() == "changed"
            assert (dirs["l1"] / "top").read_text() == "l1"
            out = run_cowfs("umount", dirs["m"])
            assert out.returncode == 0, out.stderr
            assert not is_mounted(dirs["m"])
            assert wait_gone({record["pid"]})
            assert record_of(dirs["m"]) is None
        finally:
            unmount_quietly(dirs["m"])

    def test_daemon_keeps_no_layer_busy(self, dirs):
        """Found by unionmount-testsuite: right after `umount MNT` returns, the upper's filesystem
        must be unmountable (the kernel overlay holds nothing either)."""
        _need_root("mounting a tmpfs")
        t = dirs["tmp"] / "layerfs"
        t.mkdir()
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(t)], check=True)
        try:
            for name in ("u", "w"):
                (t / name).mkdir()
            res = run_cowfs("mount", "-o", f"lowerdir={dirs['l1']},upperdir={t / 'u'},workdir={t / 'w'}", dirs["m"])
            assert res.returncode == 0, res.stderr
            (dirs["m"] / "top").write_text("changed")
            subprocess.run(["umount", str(dirs["m"])], check=True)
            busy = subprocess.run(["umount", str(t)], capture_output=True, text=True)
            assert busy.returncode == 0, busy.stderr
        finally:
            unmount_quietly(dirs["m"])
            if is_mounted(t):
                subprocess.run(["umount", "-l", str(t)], capture_output=True)

    def test_read_only_mount_without_upper(self, dirs):
        res = run_cowfs("mount", "-o", opts(dirs, upper=None), dirs["m"])
        try:
            assert res.returncode == 0, res.stderr
            assert (dirs["m"] / "bottom").read_text() == "l2"
            with pytest.raises(OSError) as info:
                (dirs["m"] / "new").write_text("x")
            assert info.value.errno == 30  # EROFS
        finally:
            unmount_quietly(dirs["m"])

    @pytest.mark.parametrize("order", ["upper-between", "upper-first"])
    def test_friendly_form_makes_the_workdir_beside_the_upper(self, dirs, order):
        upper = dirs["tmp"] / "fresh-upper"
        if order == "upper-between":
            res = run_cowfs("mount", dirs["l1"], dirs["l2"], "--upper", upper, dirs["m"])
        else:
            res = run_cowfs("mount", "--upper", upper, dirs["l1"], dirs["l2"], dirs["m"])
        try:
            assert res.returncode == 0, res.stderr
            assert fstype(dirs["m"]) == "fuse.cowfs"
            assert os.path.isdir(upper)
            assert os.path.isdir(str(upper) + ".work"), os.listdir(dirs["tmp"])
            assert (dirs["m"] / "top").read_text() == "l1"  # first LOWER is topmost
            assert (dirs["m"] / "bottom").read_text() == "l2"
            (dirs["m"] / "new").write_text("n")
            assert (upper / "new").read_text() == "n"
            out = run_cowfs("umount", dirs["m"])
            assert out.returncode == 0, out.stderr
            assert not is_mounted(dirs["m"])
        finally:
            unmount_quietly(dirs["m"])

    def test_friendly_form_with_explicit_work(self, dirs):
        res = run_cowfs("mount", "--upper", dirs["u"], "--work", dirs["w"], dirs["l2"], dirs["m"])
        try:
            assert res.returncode == 0, res.stderr
            assert (dirs["m"] / "top").read_text() == "l2"
            assert os.path.isdir(dirs["w"] / "work")
            assert not os.path.exists(str(dirs["u"]) + ".work")
        finally:
            unmount_quietly(dirs["m"])

    def test_foreground(self, dirs):
        err_path = dirs["tmp"] / "stderr"
        with open(err_path, "w") as err:
            proc = subprocess.Popen(COWFS + ["mount", "-f", "-o", opts(dirs), str(dirs["m"])],
                                    stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err)
        try:
            wait_mounted(proc, dirs["m"], err_path)
            assert (dirs["m"] / "top").read_text() == "l1"
            assert proc.poll() is None  # still serving in the foreground
            res = subprocess.run(["fusermount", "-u", str(dirs["m"])], capture_output=True, text=True)
            assert res.returncode == 0, res.stderr
            assert proc.wait(timeout=15) == 0, err_path.read_text()
            assert record_of(dirs["m"]) is None
        finally:
            unmount_quietly(dirs["m"])
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()

    def test_mount_point_given_relative(self, dirs):
        res = run_cowfs("mount", "-o", opts(dirs), "m", cwd=dirs["tmp"])
        try:
            assert res.returncode == 0, res.stderr
            assert is_mounted(dirs["m"])
            out = run_cowfs("umount", "m", cwd=dirs["tmp"])
            assert out.returncode == 0, out.stderr
            assert not is_mounted(dirs["m"])
        finally:
            unmount_quietly(dirs["m"])


@pytest.mark.fuse
@pytest.mark.kernel
def test_volatile_marks_the_workdir_and_the_next_mount_is_refused_as_by_the_kernel(dirs):
    """volatile skips every sync to the upper, so, as the kernel does, it leaves work/incompat/volatile
    behind and any later mount of that workdir is refused until the user removes it."""
    (dirs["l2"] / "data").write_bytes(b"x" * 100_000)
    res = run_cowfs("mount", "-o", opts(dirs, extra="volatile"), dirs["m"])
    try:
        assert res.returncode == 0, res.stderr
        with open(dirs["m"] / "data", "r+b") as f:  # a copy-up, not synced
            f.write(b"y")
            os.fsync(f.fileno())
        assert (dirs["u"] / "data").read_bytes() == b"y" + b"x" * 99_999
    finally:
        unmount_quietly(dirs["m"])
    mark = dirs["w"] / "work" / "incompat" / "volatile"
    assert mark.is_dir()
    res = run_cowfs("mount", "-o", opts(dirs), dirs["m"])
    assert_refused(res, dirs["m"], dirs["w"], mark, reason="volatile")
    kernel = subprocess.run(["mount", "-t", "overlay", "overlay", "-o", opts(dirs), str(dirs["m2"])],
                            capture_output=True, text=True)
    if kernel.returncode == 0:
        unmount_quietly(dirs["m2"])
    assert kernel.returncode != 0, "the kernel mounted a workdir a volatile mount had used"
    command = res.stderr.strip().split("if you know it did not: ")[1].rstrip(")")
    assert subprocess.run(["sh", "-c", command]).returncode == 0  # the command the message gives
    assert not mark.exists()
    res = run_cowfs("mount", "-o", opts(dirs), dirs["m"])
    try:
        assert res.returncode == 0, res.stderr
        assert (dirs["m"] / "data").read_bytes()[:2] == b"yx"
    finally:
        unmount_quietly(dirs["m"])


@pytest.mark.fuse
def test_locks_go_with_the_mount(dirs):
    """The upper's and workdir's lock files exist while mounted and are gone after unmount."""
    from cowfs.runtime import lock_path

    locks = [lock_path(dirs["u"]), lock_path(dirs["w"])]
    res = run_cowfs("mount", "-o", opts(dirs), dirs["m"])
    try:
        assert res.returncode == 0, res.stderr
        assert all(os.path.exists(p) for p in locks)
        again = run_cowfs("mount", "-o", opts(dirs), dirs["m2"])  # the lock is held by the daemon, not the parent
        assert_refused(again, dirs["m2"], dirs["u"], reason="in use")
    finally:
        unmount_quietly(dirs["m"])
    assert not any(os.path.exists(p) for p in locks)


# =============================================================================================
# "A command line people trust": every refusal of the command line, as root and as a user
#
# One table: the command line (placeholders name paths of a fresh directory), the exit status, and the
# one stderr line it must print. Each row runs twice, as root and as the unprivileged test user in a
# directory the user owns, and must leave nothing behind: the directory tree as it was, no mount, no
# daemon, no layer store. The userxattr notice cowfs prints as a user is not an error line.

USERXATTR_NOTICE = "cowfs: not privileged for trusted.* xattrs: mounting with userxattr (markers as user.overlay.*)"

REFUSALS = [
    # 1. a word that is no command: mount(8)'s helper form only with -o
    ("unknown-command", ["unmount", "{m}"], 2, r"^cowfs: 'unmount' is not a cowfs command; did you mean 'umount'\?$"),
    ("unknown-command-2", ["run", "alpine"], 2, r"^cowfs: 'run' is not a cowfs command; see 'cowfs --help'$"),
    ("unknown-command-3", ["mout", "{l1}", "{m}"], 2,
     r"^cowfs: 'mout' is not a cowfs command; did you mean 'mount'\?$"),
    ("unknown-option", ["--bogus"], 2, r"^cowfs: unrecognized arguments: --bogus \(see 'cowfs --help'\)$"),
    ("unknown-mount-option", ["mount", "{l1}", "{m}", "--bogus"], 2,
     r"^cowfs mount: unrecognized arguments: --bogus \(see 'cowfs mount --help'\)$"),
    # 2. conflicting or meaningless combinations
    ("layers-twice", ["mount", "{l1}", "--upper", "{newu}", "-o", "lowerdir={l2}", "{m}"], 2,
     r"^cowfs mount: the lower layers are given twice: as LOWER\.\.\. and as -o lowerdir=; with -o lowerdir=, "
     r"give only the mount point \(see 'cowfs mount --help'\)$"),
    ("work-without-upper", ["mount", "{l1}", "--work", "{neww}", "{m}"], 2,
     r"^cowfs mount: --work needs --upper: a workdir belongs to an upper directory \(see 'cowfs mount --help'\)$"),
    ("upper-twice", ["mount", "{l1}", "--upper", "{newu}", "-o", "upperdir={u},workdir={w}", "{m}"], 2,
     r"^cowfs mount: the upper directory is given twice: --upper and -o upperdir=; give one"),
    ("work-twice", ["mount", "{l1}", "--upper", "{newu}", "--work", "{neww}", "-o", "workdir={w}", "{m}"], 2,
     r"^cowfs mount: the workdir is given twice: --work and -o workdir=; give one"),
    ("workdir-option-with-upper", ["mount", "--upper", "{newu}", "-o", "workdir={w}", "{l1}", "{m}"], 2,
     r"^cowfs mount: -o workdir= goes with -o upperdir=; with --upper, give the workdir as --work"),
    ("upperdir-option-with-layers", ["mount", "{l1}", "-o", "upperdir={u},workdir={w}", "{m}"], 2,
     r"^cowfs mount: with LOWER\.\.\. MOUNTPOINT, give the upper as --upper DIR \(and --work DIR\), not as "
     r"-o upperdir=/workdir="),
    ("lowerdir-twice", ["mount", "-o", "lowerdir={l1}", "-o", "lowerdir={l2}", "{m}"], 2,
     r"^cowfs mount: option 'lowerdir' given twice"),
    ("trace-twice", ["mount", "{l1}", "--trace", "{file}", "-o", "trace={file}", "{m}"], 2,
     r"^cowfs mount: the trace is given twice: --trace and -o trace=; give one"),
    ("no-layers", ["mount", "{m}"], 2, r"^cowfs mount: missing lowerdir: give the lower layers as LOWER\.\.\. "
     r"MOUNTPOINT, IMAGE MOUNTPOINT or -o lowerdir=\.\.\. MOUNTPOINT \(see 'cowfs mount --help'\)$"),
    ("nothing", ["mount"], 2, r"^cowfs mount: the following arguments are required: LOWER\.\.\. MOUNTPOINT"),
    ("store-with-layers", ["mount", "{l1}", "{l2}", "--store", "{store}", "{m}"], 2,
     r"^cowfs mount: --store is only for `cowfs mount IMAGE MOUNTPOINT`"),
    ("store-with-a-directory", ["mount", "{l1}", "--store", "{store}", "{m}"], 1,
     r"^cowfs: \S+/l1: a directory, not an image \(--store is only for `cowfs mount IMAGE MOUNTPOINT`\)$"),
    ("shell-layers-twice", ["shell", "{l1}", "-o", "lowerdir={l2}"], 1,
     r"^cowfs: shell: the lower layers are given twice: as LAYER\.\.\. and as -o lowerdir=; give one$"),
    ("diff-quiet-size", ["diff", "-q", "-s", "{u}"], 2,
     r"^cowfs diff: -q lists paths alone: it takes no --size \(see 'cowfs diff --help'\)$"),
    ("status-quiet-json", ["status", "-q", "--json"], 2,
     r"^cowfs status: argument --json: not allowed with argument -q/--quiet"),
    ("completion-fish", ["completion", "fish"], 2, r"^cowfs completion: argument shell: invalid choice: 'fish'"),
    # 4. the same directory as two layers: the kernel's "conflicting lowerdir path"
    ("same-lower-twice", ["mount", "{l1}", "{l1}", "{m}"], 1,
     r"^cowfs: lowerdir \S+/l1: conflicting lowerdir path: the same directory as lowerdir \S+/l1 "),
    ("same-lower-twice-by-option", ["mount", "-o", "lowerdir={l1}:{l2}:{l1}", "{m}"], 1,
     r"^cowfs: lowerdir \S+/l1: conflicting lowerdir path: the same directory as lowerdir \S+/l1 "),
    ("same-lower-by-another-path", ["mount", "{l1}", "{l1link}", "{m}"], 1,
     r"^cowfs: lowerdir \S+/l1link: conflicting lowerdir path: the same directory as lowerdir \S+/l1 "),
    ("upper-is-a-lower", ["mount", "{l1}", "--upper", "{l1}", "{m}"], 1,
     r"^cowfs: upperdir \S+/l1: conflicting lowerdir path: the same directory as lowerdir \S+/l1 "),
    ("upper-is-a-lower-by-option", ["mount", "-o", "lowerdir={l1},upperdir={l1},workdir={w}", "{m}"], 1,
     r"^cowfs: upperdir \S+/l1: conflicting lowerdir path: the same directory as lowerdir \S+/l1 "),
    # 5. neither a layer directory nor an image
    ("neither-layer-nor-image", ["mount", "nosuch:1", "{m}"], 1,
     r"^cowfs: nosuch:1: no such layer directory, and no such image in store \S+/store$"),
    ("shell-neither-layer-nor-image", ["shell", "nosuch:1"], 1,
     r"^cowfs: nosuch:1: no such layer directory, and no such image in store \S+/store$"),
    # 7. a volatile mount's mark: the message gives a command that removes it (run below)
    ("volatile-mark", ["mount", "-o", "lowerdir={l1},upperdir={u},workdir={w}", "{m}"], 1,
     r"^cowfs: workdir \S+/w: a volatile mount used it, so a crash may have lost data in the upper "
     r"\(if you know it did not: rm -r \S+/w/work/incompat/volatile\)$"),
    # refusals after the command line: each names what and why
    ("lower-missing", ["mount", "-o", "lowerdir={missing}", "{m}"], 1,
     r"^cowfs: lowerdir \S+/missing: No such file or directory$"),
    ("mountpoint-missing", ["mount", "{l1}", "--upper", "{newu}", "{missing}"], 1,
     r"^cowfs: mount point \S+/missing: No such file or directory$"),
    ("bad-option-value", ["mount", "{l1}", "--upper", "{newu}", "-o", "redirect_dir=maybe", "{m}"], 1,
     r"^cowfs: bad value for redirect_dir: 'maybe'"),
    ("lower-is-a-file", ["mount", "{file}", "{m}"], 1, r"^cowfs: lowerdir \S+/file: Not a directory$"),
    ("umount-not-mounted", ["umount", "{m}"], 1, r"^cowfs: \S+/m: not a cowfs mount$"),
    ("diff-missing", ["diff", "{missing}"], 1, r"^cowfs: \S+/missing: No such file or directory$"),
    ("explain-outside", ["explain", "{l1}"], 1, r"^cowfs: \S+/l1: not inside a cowfs mount$"),
    ("status-not-mounted", ["status", "{m}"], 1, r"^cowfs: \S+/m: not a cowfs mount$"),
]


def _paths_under(root):
    found = set()
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            found.add((os.path.relpath(path, root), os.path.islink(path) or os.path.isdir(path)))
    return found


class Who:
    """Runs `cowfs ARGS` (and a shell command) as root, or as the unprivileged test user."""

    def __init__(self, name):
        self.name = name
        self.user = None
        if name == "user":
            from cowfs.testing import unprivileged
            self.user = unprivileged.require("user", "setpriv", "python", "fuse")

    def give(self, path):
        from cowfs.testing import unprivileged
        if self.user is None or not unprivileged.can_switch_users():
            return
        for dirpath, dirnames, filenames in os.walk(path):
            os.lchown(dirpath, self.user.uid, self.user.gid)
            for name in dirnames + filenames:
                os.lchown(os.path.join(dirpath, name), self.user.uid, self.user.gid)

    def cowfs(self, args, cwd, env=None):
        if self.user is None:
            full = {k: v for k, v in os.environ.items() if k != "COWFS_DEBUG"}
            return subprocess.run(COWFS + [str(a) for a in args], cwd=cwd, env=dict(full, **(env or {})),
                                  stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60)
        from cowfs.testing.unprivileged import cowfs_argv, run_as_user
        return run_as_user(cowfs_argv(*[str(a) for a in args]), cwd=cwd, env=env, timeout=60)

    def sh(self, command, cwd):
        if self.user is None:
            return subprocess.run(["sh", "-c", command], cwd=cwd, capture_output=True, text=True, timeout=60)
        from cowfs.testing.unprivileged import run_as_user
        return run_as_user(["sh", "-c", command], cwd=cwd, timeout=60)


@pytest.fixture(params=["root", "user"])
def who(request):
    if request.param == "root" and os.geteuid() != 0:
        _need_root("running the table as root")
    return Who(request.param)


@pytest.fixture
def place(who):
    """A fresh directory the runner owns (0755, under /tmp): l1, l2, u, w, m, a file and a symlink to l1."""
    import shutil
    import tempfile
    root = tempfile.mkdtemp(prefix="cowfs-cli-")
    os.chmod(root, 0o755)
    d = {name: os.path.join(root, name) for name in ("l1", "l2", "u", "w", "m")}
    for path in d.values():
        os.mkdir(path)
    with open(os.path.join(d["l1"], "top"), "w") as f:
        f.write("l1")
    with open(os.path.join(root, "file"), "w") as f:
        f.write("x")
    os.symlink(d["l1"], os.path.join(root, "l1link"))
    d.update(root=root, file=os.path.join(root, "file"), l1link=os.path.join(root, "l1link"),
             missing=os.path.join(root, "missing"), newu=os.path.join(root, "new-upper"),
             neww=os.path.join(root, "new-work"), store=os.path.join(root, "store"))
    who.give(root)
    try:
        yield d
    finally:
        left = mounts_under(root)
        for mnt, _ in sorted(left, reverse=True):
            unmount_quietly(mnt)
        shutil.rmtree(root, ignore_errors=True)
        assert not left, f"left mounted: {left}"


@pytest.mark.parametrize("args, status, line", [row[1:] for row in REFUSALS], ids=[row[0] for row in REFUSALS])
def test_every_refusal_is_one_line_and_leaves_nothing(who, place, args, status, line):
    if "workdir={w}" in " ".join(args) and "volatile" in line:  # as a kernel volatile mount leaves it
        mark = os.path.join(place["w"], "work", "incompat", "volatile")
        os.makedirs(mark)
        open(os.path.join(mark, "dirty"), "w").close()
        who.give(place["w"])
    argv = [a.format(**place) for a in args]
    before = _paths_under(place["root"])
    result = who.cowfs(argv, cwd=place["root"], env={"COWFS_STORE": place["store"]})
    lines = [ln for ln in result.stderr.splitlines() if ln.strip() and ln != USERXATTR_NOTICE]
    assert result.returncode == status, f"exit {result.returncode}, stderr {result.stderr!r}"
    assert len(lines) == 1, f"expected one stderr line, got {lines!r}"
    assert re.search(line, lines[0]), f"{lines[0]!r} does not match {line!r}"
    assert "Traceback" not in result.stderr and result.stdout == ""
    assert _paths_under(place["root"]) == before, "a refused command changed the directory"
    assert not mounts_under(place["root"]), "a refused command left a mount"
    assert not pids_under(place["root"]), "a refused command left a process (a daemon?)"
    assert not os.path.exists(place["store"]), "a refused command made a layer store"
    if "rm -r" in line:  # the command the message gives works, and then the mount does
        command = lines[0].split("if you know it did not: ")[1].rstrip(")")
        done = who.sh(command, cwd=place["root"])
        assert done.returncode == 0, done.stderr
        assert not os.path.exists(os.path.join(place["w"], "work", "incompat", "volatile"))


@pytest.mark.fuse
@pytest.mark.parametrize("options, writable", [(["-o", "ro"], False), (["-o", "oci_whiteouts"], False),
                                              (["-o", "ro,noatime"], False)])
def test_other_options_go_with_positional_layers(dirs, options, writable):
    res = run_cowfs("mount", dirs["l1"], dirs["l2"], *options, dirs["m"])
    try:
        assert res.returncode == 0, res.stderr
        assert res.stderr == ""
        assert (dirs["m"] / "top").read_text() == "l1" and (dirs["m"] / "bottom").read_text() == "l2"
        with pytest.raises(OSError) as info:
            (dirs["m"] / "new").write_text("x")
        assert info.value.errno == 30  # EROFS: no upper, or ro
    finally:
        unmount_quietly(dirs["m"])


def test_mount_helper_form_needs_an_option_string():
    assert cli._mount_helper_form(["cowfs", "/mnt", "-o", "lowerdir=/l"]) == [
        "mount", "-o", "lowerdir=/l", "--fsname-from-helper", "cowfs", "/mnt"]
    assert cli._mount_helper_form(["cowfs", "/mnt", "-olowerdir=/l"]) is not None
    assert cli._mount_helper_form(["unmount", "/mnt"]) is None
    assert cli._mount_helper_form(["pull", "alpine"]) is None
    assert cli._mount_helper_form(["a", "b", "c", "-o", "ro"]) is None


@pytest.mark.fuse
@pytest.mark.kernel
def test_the_kernel_refuses_the_same_layer_twice_as_cowfs_does(dirs):
    """What cowfs follows: the kernel (6.18) refuses lowerdir=A:B:A and upper == lower with ELOOP,
    'overlayfs: conflicting lowerdir path'."""
    for options in (f"lowerdir={dirs['l1']}:{dirs['l2']}:{dirs['l1']}",
                    f"lowerdir={dirs['l1']},upperdir={dirs['l1']},workdir={dirs['w']}"):
        kernel = subprocess.run(["mount", "-t", "overlay", "overlay", "-o", options, str(dirs["m2"])],
                                capture_output=True, text=True)
        if kernel.returncode == 0:
            unmount_quietly(dirs["m2"])
        assert kernel.returncode != 0, f"the kernel mounted {options}"
        ours = run_cowfs("mount", "-o", options, dirs["m"])
        assert_refused(ours, dirs["m"], reason="conflicting lowerdir path")


# ---------------------------------------------------------------------------------------------
# 6. cowfs shell's exit status; libfuse says nothing in the foreground

@pytest.mark.fuse
@pytest.mark.parametrize("script, status", [("exit 0", 0), ("exit 3", 3), ("false", 1), ("kill -KILL $$", 137)])
def test_shell_exits_with_the_shells_status(dirs, script, status):
    tmp = dirs["tmp"] / "tmpdir"
    tmp.mkdir()
    env = dict(os.environ, SHELL="/bin/sh", TMPDIR=str(tmp))
    env.pop("ENV", None)
    res = subprocess.run(COWFS + ["shell", str(dirs["l1"]), str(dirs["l2"])], input=script + "\n", env=env,
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == status, res.stderr
    assert f"the shell exited (status {status})" in res.stdout
    assert "Traceback" not in res.stderr
    assert os.listdir(tmp) == [], "the shell's temporary directory was left behind"
    assert not mounts_under(dirs["tmp"])


@pytest.mark.fuse
@pytest.mark.parametrize("flag", ["-f", "-d"])
def test_foreground_mount_prints_nothing_of_libfuse(dirs, flag):
    err_path = dirs["tmp"] / "stderr"
    with open(err_path, "w") as err:
        proc = subprocess.Popen(COWFS + ["mount", flag, str(dirs["l1"]), "--upper", str(dirs["u"]),
                                         "--work", str(dirs["w"]), str(dirs["m"])],
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err)
    try:
        wait_mounted(proc, dirs["m"], err_path)
        assert (dirs["m"] / "top").read_text() == "l1"
        assert subprocess.run(["fusermount", "-u", str(dirs["m"])], capture_output=True).returncode == 0
        assert proc.wait(timeout=15) == 0
    finally:
        unmount_quietly(dirs["m"])
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = err_path.read_text()
    assert "max threads" not in text and "Ignoring" not in text, text
    if flag == "-f":
        assert text == "", text


# ---------------------------------------------------------------------------------------------
# 9. exit statuses: Ctrl-C is `cowfs: interrupted`, 130; --debug / COWFS_DEBUG=1 show the traceback

# Runs cowfs with one function replaced by one that says so (touching FLAG) and then sleeps: a SIGINT
# then lands at a known place.  SIGHUP starts at its default, as a terminal's shell starts a command (a
# test run under nohup would otherwise hand the ignored SIGHUP on, which cowfs rightly leaves ignored).
HANG = """\
import importlib, os, signal, sys, time
signal.signal(signal.SIGHUP, signal.SIG_DFL)
flag, module, name, *argv = sys.argv[1:]
mod = importlib.import_module(module)
real = getattr(mod, name)
def hang(*args, **kwargs):
    out = real(*args, **kwargs) if name == "_read_until_ready" else None
    with open(flag, "w") as f:
        f.write(str(args[1]) if name == "_read_until_ready" else "")
    time.sleep(60)
    return out
setattr(mod, name, hang)
from cowfs.cli.main import main
sys.exit(main(argv))
"""


def _interrupt(argv, flag, module, name, signum=signal.SIGINT):
    proc = subprocess.Popen([sys.executable, "-c", HANG, str(flag), module, name, *map(str, argv)],
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while not os.path.exists(flag):
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline
            time.sleep(0.02)
        time.sleep(0.1)
        proc.send_signal(signum)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc.returncode, out, err


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP])
def test_a_signal_is_one_line_and_128_plus_n(dirs, signum):
    flag = dirs["tmp"] / "flag"
    status, out, err = _interrupt(["diff", dirs["u"], "--lower", dirs["l1"]], flag, "cowfs.explore.diff", "changes",
                                  signum)
    assert (status, err) == (128 + signum, "cowfs: interrupted\n"), err


@pytest.mark.fuse
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_while_mounting_leaves_nothing(dirs, signum):
    """SIGINT or SIGTERM after the daemon mounted but before `cowfs mount` returned: the daemon is stopped,
    the mount and its record are gone, and the upper and workdir it made are removed."""
    flag = dirs["tmp"] / "flag"
    upper = dirs["tmp"] / "fresh"
    status, out, err = _interrupt(["mount", dirs["l1"], "--upper", upper, dirs["m"]], flag,
                                  "cowfs.daemon.mount", "_read_until_ready", signum)
    daemon = int(flag.read_text())
    assert (status, err) == (128 + signum, "cowfs: interrupted\n"), err
    assert wait_gone({daemon}, 10), "the daemon still runs"
    assert not is_mounted(dirs["m"])
    assert record_of(dirs["m"]) is None
    assert not upper.exists() and not os.path.exists(f"{upper}.work")


def test_debug_shows_the_traceback(tmp_path):
    missing = tmp_path / "missing"
    env = {k: v for k, v in os.environ.items() if k != "COWFS_DEBUG"}
    plain = run_cowfs("diff", missing, env=env)
    assert (plain.returncode, plain.stderr) == (1, f"cowfs: {missing}: No such file or directory\n")
    for args, extra in ((["--debug", "diff", missing], {}), (["diff", missing, "--debug"], {}),
                        (["diff", missing], {"COWFS_DEBUG": "1"})):
        res = run_cowfs(*args, env=dict(env, **extra))
        assert res.returncode == 1
        assert res.stderr.startswith("Traceback (most recent call last):"), res.stderr
        assert res.stderr.splitlines()[-1] == f"cowfs: {missing}: No such file or directory"


def test_a_bug_is_one_line_too(monkeypatch, capsys):
    import cowfs.explore.diff as diff

    def broken(args):
        raise ValueError("boom\nsecond line")
    monkeypatch.setattr(diff, "run", broken)
    monkeypatch.delenv("COWFS_DEBUG", raising=False)
    assert cli.main(["diff", "/tmp"]) == 1
    err = capsys.readouterr().err
    assert err == ("cowfs: internal error: ValueError: boom second line (a bug in cowfs; COWFS_DEBUG=1 shows "
                   "where)\n")


# ---------------------------------------------------------------------------------------------
# 10. --json and -q; a reader that stops reading is no error

def _upper_with_changes(tmp_path, files=3):
    lower, upper = tmp_path / "lower", tmp_path / "upper"
    (lower / "etc").mkdir(parents=True)
    (lower / "etc" / "hosts").write_text("hosts\n")
    (lower / "gone").write_text("x")
    (upper / "etc").mkdir(parents=True)
    (upper / "etc" / "hosts").write_text("hosts\nmore\n")
    if os.geteuid() == 0:  # a whiteout: /gone is deleted
        os.mknod(upper / "gone", 0o600 | 0o020000, os.makedev(0, 0))
    for i in range(files):
        (upper / f"added-{i:06d}-{'x' * 40}").write_text("y")
    return lower, upper


def test_diff_json_and_quiet(tmp_path):
    lower, upper = _upper_with_changes(tmp_path)
    text = run_cowfs("diff", upper, "--lower", lower)
    quiet = run_cowfs("diff", "-q", upper, "--lower", lower)
    as_json = run_cowfs("diff", "--json", upper, "--lower", lower)
    sized = run_cowfs("diff", "--json", "--size", upper, "--lower", lower)
    for res in (text, quiet, as_json, sized):
        assert res.returncode == 0 and res.stderr == "", res.stderr
    assert quiet.stdout.splitlines() == [line.split(" ", 1)[1] for line in text.stdout.splitlines()]
    info = json.loads(as_json.stdout)
    assert set(info) == {"target", "upper", "lowers", "changes", "upper_size", "virtual_size"}
    assert info["lowers"] == [str(lower)] and info["upper_size"] is None and info["virtual_size"] is None
    assert [f"{c['kind']} {c['path']}" for c in info["changes"]] == text.stdout.splitlines()
    assert all(set(c) == {"kind", "path", "size"} for c in info["changes"])
    assert {c["path"]: c["size"] for c in info["changes"]}["/etc/hosts"] == 11
    assert {c["path"]: c["size"] for c in info["changes"]}["/etc"] is None
    sizes = json.loads(sized.stdout)
    assert sizes["upper_size"] == 11 + 3 and sizes["virtual_size"] == 11 + 3 + 6 + 1


def test_diff_into_a_closed_pipe_exits_0_quietly(tmp_path):
    lower, upper = _upper_with_changes(tmp_path, files=4000)  # far more than a pipe holds
    command = " ".join(COWFS) + f" diff {upper} --lower {lower} | head -1; echo \"status=${{PIPESTATUS[0]}}\" >&2"
    res = subprocess.run(["bash", "-c", command], capture_output=True, text=True, timeout=60)
    assert res.stdout.startswith(("A /added-000000", "C /etc")), res.stdout
    assert res.stderr == "status=0\n", res.stderr


@pytest.mark.fuse
def test_explain_and_status_json_and_quiet(dirs):
    res = run_cowfs("mount", "-o", opts(dirs), dirs["m"])
    try:
        assert res.returncode == 0, res.stderr
        (dirs["m"] / "top").write_text("changed")
        keys = {"path", "mountpoint", "exists", "provided_by", "kind", "copied_up", "copied_from", "copy_up",
                "history", "summary", "layers"}
        for path in ("top", "bottom", "nothing-here"):
            info = json.loads(run_cowfs("explain", "--json", dirs["m"] / path).stdout)
            assert set(info) == keys, path
            assert all(set(e) == {"layer", "name", "root", "entry", "kind", "size", "role", "reason"}
                       for e in info["layers"]), path
        piped = subprocess.run(["bash", "-c", " ".join(COWFS) + f" explain --json {dirs['m'] / 'top'} | head -1; "
                                "echo \"status=${PIPESTATUS[0]}\" >&2"], capture_output=True, text=True, timeout=60)
        assert (piped.stdout, piped.stderr) == ("{\n", "status=0\n")
        status = json.loads(run_cowfs("status", "--json", dirs["m"]).stdout)
        assert set(status[0]) == {"mountpoint", "pid", "upper", "work", "lowers", "options", "trace", "upper_size",
                                  "copied_up_files", "copied_up_dirs", "copied_up_source"}
        quiet = run_cowfs("status", "-q")
        assert str(dirs["m"]) in quiet.stdout.splitlines() and quiet.stderr == ""
        assert run_cowfs("status", "-q", dirs["m"]).stdout == f"{dirs['m']}\n"
    finally:
        unmount_quietly(dirs["m"])


# ---------------------------------------------------------------------------------------------
# 11. cowfs --help: the commands in groups, each with an example

def test_top_help_groups_every_command_with_an_example():
    from cowfs.cli import images as image_cli
    res = run_cowfs("--help")
    assert res.returncode == 0 and res.stderr == ""
    parser, _ = cli.build_parser()
    titles = ["mounts:", "exploring:", "images:", "maintenance:"]
    lines = res.stdout.splitlines()
    assert [line for line in lines if line in titles] == titles
    groups, current = {}, None
    for i, line in enumerate(lines):
        if line in titles:
            current = line[:-1]
        elif current and line.startswith("  ") and not line.startswith("    "):
            name = line.split()[0]
            groups.setdefault(current, []).append(name)
            example = lines[i + 1].strip()
            assert example.startswith(f"cowfs {name}") or "cowfs completion" in example, (name, example)
        elif not line.strip():
            current = None
    assert groups["mounts"] == ["mount", "umount"]
    assert groups["exploring"] == ["diff", "explain", "status", "shell"]
    assert groups["images"] == [c for c in image_cli.COMMANDS if c not in cli.MAINTENANCE]
    assert "completion" in groups["maintenance"]
    assert sorted(n for names in groups.values() for n in names) == sorted(parser.commands)
    assert "exit status: 0 done; 1 refused or failed" in res.stdout and "130" in res.stdout


# ---------------------------------------------------------------------------------------------
# 12. shell completion

def _complete(script, *words, env=None):
    """COMPREPLY after completing the last of `words` (the word being typed) with the sourced script."""
    quoted = " ".join(shlex.quote(w) for w in words)
    program = (f"source {shlex.quote(str(script))}\nCOMP_WORDS=({quoted})\nCOMP_CWORD=$((${{#COMP_WORDS[@]}} - 1))\n"
               "_cowfs\nprintf '%s\\n' \"${COMPREPLY[@]}\"\n")
    path = os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "/usr/bin:/bin")
    res = subprocess.run(["bash", "-c", program], capture_output=True, text=True, timeout=60,
                         env=dict(os.environ, PATH=path, **(env or {})))
    assert res.returncode == 0, res.stderr
    return [line for line in res.stdout.splitlines() if line]


@pytest.fixture(scope="module")
def bash_script(tmp_path_factory):
    res = run_cowfs("completion", "bash")
    assert res.returncode == 0 and res.stderr == ""
    path = tmp_path_factory.mktemp("completion") / "cowfs.bash"
    path.write_text(res.stdout)
    assert subprocess.run(["bash", "-n", str(path)]).returncode == 0
    return path


def test_completion_of_commands_and_options(bash_script):
    parser, _ = cli.build_parser()
    assert _complete(bash_script, "cowfs", "") == list(parser.commands) + ["--help", "--version", "--debug"]
    assert _complete(bash_script, "cowfs", "u") == ["umount"]
    assert _complete(bash_script, "cowfs", "--debug", "ex") == ["explain", "export"]
    assert _complete(bash_script, "cowfs", "mount", "--u") == ["--upper"]
    assert _complete(bash_script, "cowfs", "diff", "-") == ["-h", "--help", "--store", "--lower", "-o", "-s", "--size",
                                                           "--json", "-q", "--quiet"]
    assert _complete(bash_script, "cowfs", "mount", "-o", "low") == ["lowerdir="]
    assert _complete(bash_script, "cowfs", "completion", "") == ["bash", "zsh"]
    assert _complete(bash_script, "cowfs", "inspect", "--format", "l") == ["layers", "lowerdir"]


def test_completion_of_directories(bash_script, tmp_path):
    for name in ("layer-a", "layer-b", "mnt"):
        (tmp_path / name).mkdir()
    (tmp_path / "layer-file").write_text("")
    prefix = str(tmp_path / "la")
    dirs_only = [str(tmp_path / "layer-a"), str(tmp_path / "layer-b")]
    assert sorted(_complete(bash_script, "cowfs", "mount", prefix)) == dirs_only
    assert sorted(_complete(bash_script, "cowfs", "mount", "--upper", prefix)) == dirs_only
    assert sorted(_complete(bash_script, "cowfs", "mount", "-o", "lowerdir", "=", prefix)) == dirs_only
    assert sorted(_complete(bash_script, "cowfs", "diff", "--lower", prefix)) == dirs_only
    assert sorted(_complete(bash_script, "cowfs", "explain", prefix)) == dirs_only + [str(tmp_path / "layer-file")]


def test_completion_of_image_names(bash_script, tmp_path):
    store = tmp_path / "store"
    (store / "layers").mkdir(parents=True)
    (store / "repositories.json").write_text(json.dumps({"acme/app:1.0": "sha256:" + "a" * 64,
                                                         "acme/app:2.0": "sha256:" + "b" * 64,
                                                         "busybox:latest": "sha256:" + "c" * 64}))
    by_env = {"COWFS_STORE": str(store)}
    assert _complete(bash_script, "cowfs", "rmi", "", env=by_env) == ["acme/app:1.0", "acme/app:2.0",
                                                                       "busybox:latest"]
    assert _complete(bash_script, "cowfs", "history", "--store", str(store), "bu") == ["busybox:latest"]
    # bash splits NAME:TAG at the colon: the reply completes the part after it
    assert _complete(bash_script, "cowfs", "rmi", "acme/app", ":", "", env=by_env) == ["1.0", "2.0"]
    assert _complete(bash_script, "cowfs", "mount", "acme/a", env=by_env) == ["acme/app:1.0", "acme/app:2.0"]
    listed = run_cowfs("__complete", "images", "--store", store)
    assert (listed.returncode, listed.stdout) == (0, "acme/app:1.0\nacme/app:2.0\nbusybox:latest\n")
    nothing = run_cowfs("__complete", "images", "--store", tmp_path / "no-store")
    assert (nothing.returncode, nothing.stdout, nothing.stderr) == (0, "", "")


def test_zsh_completion_wraps_the_bash_one():
    res = run_cowfs("completion", "zsh")
    assert res.returncode == 0
    assert res.stdout.startswith("#compdef cowfs") and "bashcompinit" in res.stdout
    assert "complete -F _cowfs cowfs" in res.stdout


# ---------------------------------------------------------------------------------------------
# 8. the test extra, and make's arguments

def test_strategies_without_hypothesis_say_how_to_install_it():
    code = ("import sys; sys.modules['hypothesis'] = None\n"
            "try:\n    import cowfs.testing.strategies\nexcept ImportError as e:\n    print(type(e).__name__, e)\n"
            "import cowfs.testing.layers  # StackSpec needs no Hypothesis\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("ImportError cowfs.testing.strategies needs Hypothesis")
    assert "pip install 'cowfs[test]'" in res.stdout


def test_make_passes_bench_args():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    res = subprocess.run(["make", "-n", "-C", root, "bench", "BENCH_ARGS=--quick --only copyup"],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert "scripts/bench.py --quick --only copyup" in res.stdout
