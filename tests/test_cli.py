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
    pids_with_argument,
    require,
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
def fuse():
    require("fuse")


@pytest.fixture
def kernel():
    require("kernel")


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

class TestOptionErrors:
    @pytest.mark.parametrize("option, named, reason", [
        ("upperdir={u},workdir={w}", "lowerdir", "missing"),
        ("lowerdir={l1},upperdir={u}", "workdir", "missing"),
        ("lowerdir={l1},workdir={w}", "upperdir", "missing"),
        ("lowerdir={l1},bogus=1", "bogus", "unknown option"),
        ("lowerdir={l1},index=on", "index", "unknown option"),
        ("lowerdir={l1},upperdir={u},workdir={w},redirect_dir=maybe", "redirect_dir", "bad value|invalid"),
        ("lowerdir={l1},upperdir={u},workdir={w},userxattr,redirect_dir=on", "userxattr",
         "conflict|incompatible|not allowed"),
        ("lowerdir={l1}::{l2}", "lowerdir", "empty"),
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

@pytest.mark.usefixtures("fuse")
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

    @pytest.mark.usefixtures("kernel")
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

@pytest.mark.usefixtures("fuse")
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
            deadline = time.monotonic() + 30
            while not is_mounted(dirs["m"]):
                assert proc.poll() is None, f"exited {proc.returncode}: {err_path.read_text()}"
                assert time.monotonic() < deadline, "not mounted within 30 s"
                time.sleep(0.05)
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


@pytest.mark.usefixtures("fuse", "kernel")
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
    mark.rmdir()
    res = run_cowfs("mount", "-o", opts(dirs), dirs["m"])
    try:
        assert res.returncode == 0, res.stderr
        assert (dirs["m"] / "data").read_bytes()[:2] == b"yx"
    finally:
        unmount_quietly(dirs["m"])


@pytest.mark.usefixtures("fuse")
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
