"""cowfs through the system's mount machinery: `mount -t fuse.cowfs`, an fstab line, and the three ways to unmount.

mount(8) runs `/sbin/mount.fuse SOURCE MNT -o OPTS -t fuse.cowfs`, which runs
`cowfs SOURCE MNT -o OPTS` through /bin/sh, adding generic options such as
`rw`, `dev`, `suid`.  util-linux's mount drops PATH from the environment of
its helpers, so /bin/sh searches only its default PATH
(/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin): prepending
the venv's bin directory to PATH reaches /sbin/mount.fuse but not mount(8).
So:
- `mount.fuse` itself is run here with the venv's bin directory first on PATH;
- `mount -t fuse.cowfs` and `mount --fstab` run inside a private mount
  namespace (unshare/nsenter) in which a directory holding only this venv's
  `cowfs` is bind-mounted over /usr/local/sbin, so that nothing outside the
  test changes.  The test reads that namespace's mounts and files through
  /proc/PID/mounts and /proc/PID/root.

Needs FUSE and root: skips with a reason elsewhere, fails under CI=true.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from cowfs import mounttable
from cowfs.runtime import record_path
from cowfs.testing.mounts import force_unmount, in_ci, mounts_under, pid_alive, pids_with_argument, require, wait_gone

VENV_BIN = os.path.dirname(sys.executable)
DAEMON_EXIT_TIMEOUT = 5.0
FUSERMOUNT = shutil.which("fusermount") or shutil.which("fusermount3") or "fusermount"


def _unavailable(reason):
    if in_ci():
        pytest.fail(f"required under CI=true but missing: {reason}", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(autouse=True)
def _needs_fuse_and_root():
    require("fuse")
    if os.geteuid() != 0:
        _unavailable("mount(8) with a FUSE helper and private mount namespaces need root")


def cowfs_executable():
    """This venv's `cowfs` console script (what `pip install` puts on PATH)."""
    path = os.path.join(VENV_BIN, "cowfs")
    if not os.access(path, os.X_OK):
        _unavailable(f"{path} missing: run `make venv`")
    return path


def helper_env():
    env = dict(os.environ)
    env["PATH"] = VENV_BIN + os.pathsep + env.get("PATH", "/usr/bin:/bin")
    return env








def record_of(mountpoint):
    try:
        with open(record_path(str(mountpoint))) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def daemon_pids(mountpoint):
    """The daemon of a mount: the pid in its /run/cowfs record, and any process with the mount point in its argv."""
    pids = pids_with_argument(mountpoint)
    record = record_of(mountpoint)
    if record and record.get("pid"):
        pids.add(int(record["pid"]))
    return {p for p in pids if pid_alive(p)}


def reap(pids):
    """Daemons these tests started that outlived their mount: terminate them (by pid) and report it."""
    left = [p for p in pids if pid_alive(p)]
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in left:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        if wait_gone(left, 2.0):
            break
    return left


@pytest.fixture
def layers(tmp_path):
    d = {n: tmp_path / n for n in ("l1", "l2", "u", "w", "m")}
    for p in d.values():
        p.mkdir()
    (d["l1"] / "top").write_text("l1")
    (d["l2"] / "top").write_text("l2")
    (d["l2"] / "bottom").write_text("l2")
    d["tmp"] = tmp_path
    d["opts"] = f"lowerdir={d['l1']}:{d['l2']},upperdir={d['u']},workdir={d['w']}"
    return d


class Namespace:
    """A private mount namespace, held open by a `sleep` this test started, with this venv's cowfs in /usr/local/sbin."""

    def __init__(self, tmp_path):
        self.tmp = tmp_path
        self.proc = subprocess.Popen(["unshare", "--mount", "--propagation", "private", "sleep", "600"],
                                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        self.pid = self.proc.pid
        mine = os.readlink("/proc/self/ns/mnt")
        deadline = time.monotonic() + 10
        while True:
            try:
                if os.readlink(f"/proc/{self.pid}/ns/mnt") != mine and \
                        open(f"/proc/{self.pid}/comm").read().strip() == "sleep":
                    break
            except OSError:
                pass
            if self.proc.poll() is not None:
                raise RuntimeError(f"unshare failed: {self.proc.stderr.read().decode()}")
            if time.monotonic() > deadline:
                raise RuntimeError("unshare did not enter a new mount namespace")
            time.sleep(0.02)
        self.bin = tmp_path / "sbin"
        self.bin.mkdir()
        os.symlink(cowfs_executable(), self.bin / "cowfs")
        res = self.run(["mount", "--bind", str(self.bin), "/usr/local/sbin"])
        assert res.returncode == 0, res.stderr

    def run(self, cmd, timeout=60):
        return subprocess.run(["nsenter", "-t", str(self.pid), "-m", "--"] + [str(c) for c in cmd],
                              stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout,
                              env=helper_env())

    def mounts(self):
        """(mountpoint, fstype, options) of the mounts in the namespace."""
        return [(m.mountpoint, m.fstype, m.options) for m in mounttable.read(f"/proc/{self.pid}/mounts")]

    def mount_of(self, path):
        return next(((t, o) for mnt, t, o in self.mounts() if mnt == str(path)), None)

    def path(self, path):
        """`path` as seen inside the namespace."""
        return f"/proc/{self.pid}/root{path}"

    def close(self):
        """Unmount what is left below tmp (fusermount -u, then umount -l) and end the holder process."""
        left = [mnt for mnt, _, _ in self.mounts() if mnt.startswith(str(self.tmp) + "/")]
        for mnt in sorted(left, reverse=True):
            if self.mount_of(mnt):
                self.run([FUSERMOUNT, "-u", mnt])
            if self.mount_of(mnt):
                self.run(["umount", "-l", mnt])
        self.proc.terminate()
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc.stderr.close()
        return left


@pytest.fixture
def ns(tmp_path):
    for tool in ("unshare", "nsenter"):
        if not shutil.which(tool):
            _unavailable(f"{tool} (util-linux) is not installed")
    namespace = Namespace(tmp_path)
    try:
        yield namespace
    finally:
        left = namespace.close()
        assert not left, f"test left mounts behind in its namespace (now unmounted): {left}"


@pytest.fixture
def no_leftovers(tmp_path):
    """After the test: nothing mounted below tmp_path here, and no daemon with a path below it in its argv."""
    yield
    left = mounts_under(tmp_path)
    for mnt, _ in sorted(left, reverse=True):
        try:
            force_unmount(mnt)
        except Exception:  # noqa: BLE001 - reported below
            pass
    assert not left, f"test left mounts behind (now unmounted): {left}"


def assert_daemon_exits(pids, how):
    assert pids, "no daemon found (no /run/cowfs record, no process with the mount point in its argv)"
    gone = wait_gone(pids, DAEMON_EXIT_TIMEOUT)
    lingering = reap(pids) if not gone else []
    assert gone, f"daemon {lingering} still running {DAEMON_EXIT_TIMEOUT}s after {how}"


# =============================================================================================
# the helper as mount.fuse runs it

@pytest.mark.usefixtures("no_leftovers")
class TestHelperForm:
    def test_mount_fuse_with_cowfs_on_path(self, layers):
        """/sbin/mount.fuse SOURCE MNT -o OPTS -t fuse.cowfs, exactly as mount(8) calls it."""
        cowfs_executable()
        helper = shutil.which("mount.fuse", path="/sbin:/usr/sbin") or shutil.which("mount.fuse3",
                                                                                       path="/sbin:/usr/sbin")
        if helper is None:
            _unavailable("/sbin/mount.fuse is not installed (package fuse3)")
        mnt = layers["m"]
        res = subprocess.run([helper, "cowfs", str(mnt), "-o", layers["opts"] + ",rw,dev,suid,noatime",
                              "-t", "fuse.cowfs"], stdin=subprocess.DEVNULL, capture_output=True, text=True,
                             timeout=60, env=helper_env())
        pids = daemon_pids(mnt)
        try:
            assert res.returncode == 0, res.stderr
            assert [t for m, t in mounts_under(mnt) if m == str(mnt)] == ["fuse.cowfs"]
            assert (mnt / "top").read_text() == "l1"
            assert (mnt / "bottom").read_text() == "l2"
        finally:
            r = subprocess.run([FUSERMOUNT, "-u", str(mnt)], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        assert_daemon_exits(pids, "fusermount -u")

    def test_source_mountpoint_form_directly(self, layers):
        """`cowfs SOURCE MNT -o OPTS` with the generic options mount.fuse adds."""
        mnt = layers["m"]
        res = subprocess.run([cowfs_executable(), "cowfs", str(mnt), "-o",
                              "rw,nosuid,nodev,noatime," + layers["opts"] + ",dev,suid"],
                             stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60)
        pids = daemon_pids(mnt)
        try:
            assert res.returncode == 0, res.stderr
            assert (mnt / "top").read_text() == "l1"
            (mnt / "new").write_text("n")
            assert (layers["u"] / "new").read_text() == "n"
        finally:
            r = subprocess.run([FUSERMOUNT, "-u", str(mnt)], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        assert_daemon_exits(pids, "fusermount -u")

    def test_source_names_the_mount(self, layers):
        """The SOURCE field of mount(8) is what /proc/mounts shows as the device."""
        mnt = layers["m"]
        res = subprocess.run([cowfs_executable(), "myimage", str(mnt), "-o", layers["opts"]],
                             stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60)
        pids = daemon_pids(mnt)
        try:
            assert res.returncode == 0, res.stderr
            assert [m.source for m in mounttable.read() if m.mountpoint == str(mnt)] == ["myimage"]
        finally:
            subprocess.run([FUSERMOUNT, "-u", str(mnt)], capture_output=True)
        assert_daemon_exits(pids, "fusermount -u")


# =============================================================================================
# mount(8) and fstab, in a private mount namespace

class TestMountCommand:
    @pytest.mark.parametrize("how", ["umount", "fusermount -u", "cowfs umount"])
    def test_mount_t_fuse_cowfs_then_unmount(self, ns, layers, how):
        mnt = layers["m"]
        res = ns.run(["mount", "-t", "fuse.cowfs", "cowfs", mnt, "-o", layers["opts"] + ",rw,dev,suid,noatime"])
        assert res.returncode == 0, res.stderr
        assert ns.mount_of(mnt) is not None and ns.mount_of(mnt)[0] == "fuse.cowfs"
        assert mounts_under(mnt) == [], "the mount leaked out of the test's namespace"
        assert open(ns.path(f"{mnt}/top")).read() == "l1"
        assert open(ns.path(f"{mnt}/bottom")).read() == "l2"
        with open(ns.path(f"{mnt}/top"), "w") as f:
            f.write("changed")
        assert (layers["u"] / "top").read_text() == "changed"
        assert (layers["l1"] / "top").read_text() == "l1"
        pids = daemon_pids(mnt)
        assert pids, "no daemon found for the mount"

        cmd = {"umount": ["umount", mnt], "fusermount -u": [FUSERMOUNT, "-u", mnt],
               "cowfs umount": [sys.executable, "-m", "cowfs", "umount", mnt]}[how]
        out = ns.run(cmd)
        assert out.returncode == 0, out.stderr
        assert out.stderr == ""
        assert ns.mount_of(mnt) is None
        assert_daemon_exits(pids, how)
        assert record_of(mnt) is None, "the daemon left its /run/cowfs record"

    def test_generic_options_through_mount(self, ns, layers):
        mnt = layers["m"]
        res = ns.run(["mount", "-t", "fuse.cowfs", "-o", "rw,dev,suid,exec,noatime,nodiratime,async", "cowfs", mnt,
                      "-o", layers["opts"]])
        try:
            assert res.returncode == 0, res.stderr
            assert open(ns.path(f"{mnt}/top")).read() == "l1"
        finally:
            ns.run(["umount", mnt])

    @pytest.mark.parametrize("flag", ["noatime", "nosuid", "nodev", "noexec"])
    def test_generic_flag_is_applied(self, ns, layers, flag):
        mnt = layers["m"]
        res = ns.run(["mount", "-t", "fuse.cowfs", "cowfs", mnt, "-o", layers["opts"] + "," + flag])
        try:
            assert res.returncode == 0, res.stderr
            assert flag in ns.mount_of(mnt)[1]
        finally:
            ns.run(["umount", mnt])

    def test_read_only_through_mount(self, ns, layers):
        mnt = layers["m"]
        res = ns.run(["mount", "-t", "fuse.cowfs", "-o", "ro", "cowfs", mnt, "-o", layers["opts"]])
        try:
            assert res.returncode == 0, res.stderr
            assert open(ns.path(f"{mnt}/top")).read() == "l1"
            with pytest.raises(OSError) as info:
                open(ns.path(f"{mnt}/new"), "w").close()
            assert info.value.errno == 30  # EROFS
            assert os.listdir(layers["u"]) == []
        finally:
            ns.run(["umount", mnt])

    def test_fstab_line(self, ns, layers):
        mnt = layers["m"]
        fstab = layers["tmp"] / "fstab"
        fstab.write_text("# a test fstab\n"
                         f"cowfs  {mnt}  fuse.cowfs  {layers['opts']},noatime,nofail  0  0\n")
        res = ns.run(["mount", "--fstab", fstab, mnt])
        assert res.returncode == 0, res.stderr
        try:
            assert ns.mount_of(mnt)[0] == "fuse.cowfs"
            assert open(ns.path(f"{mnt}/top")).read() == "l1"
            assert open(ns.path(f"{mnt}/bottom")).read() == "l2"
            pids = daemon_pids(mnt)
        finally:
            out = ns.run(["umount", mnt])
        assert out.returncode == 0, out.stderr
        assert ns.mount_of(mnt) is None
        assert_daemon_exits(pids, "umount")

    def test_refusal_through_mount_is_one_line(self, ns, layers):
        mnt = layers["m"]
        missing = layers["tmp"] / "nope"
        res = ns.run(["mount", "-t", "fuse.cowfs", "cowfs", mnt, "-o",
                      f"lowerdir={missing},upperdir={layers['u']},workdir={layers['w']}"])
        assert res.returncode != 0
        lines = [line for line in res.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and str(missing) in lines[0], lines
        assert ns.mount_of(mnt) is None
        assert not pids_with_argument(mnt)
