"""`cowfs shell` driven in tmux as a person would: type commands, read the screen.

Each test runs tmux on a private socket (-L), so it never touches the user's
tmux, and kills that server in finally; `cowfs shell` unmounts on exit, and
anything left mounted under the test's directories is reported as a failure.
"""

import glob
import os
import shutil
import subprocess
import sys
import time

import pytest

from cowfs.testing.mounts import force_unmount, in_ci, mounts_under

pytestmark = pytest.mark.fuse


def need_tmux():
    if not shutil.which("tmux"):
        if in_ci():
            pytest.fail("required under CI=true but missing: tmux", pytrace=False)
        pytest.skip("tmux is not installed")


class Screen:
    def __init__(self, name, command, env):
        self.args = ["tmux", "-L", name]
        subprocess.run(self.args + ["new-session", "-d", "-x", "160", "-y", "50", command], check=True, env=env)

    def type(self, text):
        subprocess.run(self.args + ["send-keys", "-l", text], check=True)
        subprocess.run(self.args + ["send-keys", "Enter"], check=True)

    def command(self, text, prompt="(cowfs) /", timeout=20):
        """Type a command and wait for the next prompt, as a person would before typing the next one."""
        count = self.text().count(prompt)
        self.type(text)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            screen = self.text()
            if screen.count(prompt) > count:
                return screen
            time.sleep(0.1)
        raise AssertionError(f"no prompt after {text!r}; the screen:\n{self.text()}")

    def text(self):
        return subprocess.run(self.args + ["capture-pane", "-p", "-S", "-200"], capture_output=True,
                              text=True).stdout

    def wait_for(self, needle, timeout=20):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            screen = self.text()
            if needle in screen:
                return screen
            time.sleep(0.1)
        raise AssertionError(f"{needle!r} never appeared; the screen:\n{self.text()}")

    def close(self):
        subprocess.run(self.args + ["kill-server"], capture_output=True)


@pytest.fixture
def layers(tmp_path):
    top, bottom = tmp_path / "top", tmp_path / "bottom"
    (bottom / "etc").mkdir(parents=True)
    (bottom / "etc/hosts").write_text("127.0.0.1 localhost\n" * 50)  # 1000 bytes
    (bottom / "etc/motd").write_text("hello\n")
    (bottom / "app/lib").mkdir(parents=True)
    (bottom / "app/lib/x").write_text("x\n")
    (top / "app").mkdir(parents=True)
    (top / "app/hello.sh").write_text("echo hello\n")
    yield top, bottom
    left = mounts_under(tmp_path)
    for mnt, _ in left:
        force_unmount(mnt)
    assert not left, f"left mounted: {left}"


@pytest.mark.parametrize("shell", ["/bin/bash", "/bin/sh"])
def test_a_person_in_cowfs_shell_sees_each_copy_up_and_the_summary(layers, tmp_path, shell):
    need_tmux()
    top, bottom = layers
    before = set(glob.glob("/tmp/cowfs-shell-*"))
    home = tmp_path / "home"
    home.mkdir()
    env = dict(os.environ, SHELL=shell, HOME=str(home), TERM="xterm")
    env.pop("TMUX", None)
    command = (f"{sys.executable} -m cowfs shell {top} {bottom} -o redirect_dir=on; "
               "echo COWFS-SHELL-EXITED=$?; sleep 600")
    screen = Screen(f"cowfs-test-{os.getpid()}", command, env)
    try:
        screen.wait_for("(cowfs) /$" if shell == "/bin/sh" else "(cowfs) /#" if os.geteuid() == 0 else "(cowfs) /$")
        screen.command("cat etc/motd")
        screen.command("echo more >> etc/hosts")
        shown = screen.wait_for("copy-up  etc/hosts  from layer 2")
        lines = shown.splitlines()
        copy = next(line for line in lines if "copy-up  etc/hosts" in line)
        assert copy == "[cowfs] copy-up  etc/hosts  from layer 2  (1.0 kB, " + copy.split("(1.0 kB, ")[1]
        assert copy.endswith(" ms) on open for write")
        # the event line comes after the command the person typed, and before the next prompt
        at = lines.index(copy)
        assert lines[at - 2].endswith("echo more >> etc/hosts")  # line at-1: the copy-up of etc/
        assert "copy-up  etc/  from layer 2" in lines[at - 1]
        assert lines[at + 1].startswith("(cowfs) /")
        # reading copies nothing: no event line between `cat` and the next command
        cat = next(i for i, line in enumerate(lines) if line.endswith("cat etc/motd"))
        assert lines[cat + 1] == "hello" and lines[cat + 2].startswith("(cowfs) /")
        screen.type("rm etc/motd; mv app application; cd application; pwd")
        screen.wait_for("redirect  application  -> app")
        shown = screen.wait_for("(cowfs) /application")
        assert "[cowfs] whiteout  etc/motd" in shown
        screen.type("exit")
        shown = screen.wait_for("COWFS-SHELL-EXITED=0")
        summary = shown.split("changes in the upper:")[1].splitlines()
        assert [line.split()[:2] for line in summary[1:8]] == [
            ["D", "/app"], ["A", "/application"], ["A", "/application/hello.sh"], ["A", "/application/lib"],
            ["A", "/application/lib/x"], ["C", "/etc"], ["C", "/etc/hosts"]]
        assert summary[7].split()[2:] == ["1.0", "kB"]
        assert summary[8].split() == ["D", "/etc/motd"]
        assert summary[9].strip().startswith("size: 1.0 kB (virtual ")
    finally:
        screen.close()
    time.sleep(0.2)
    leftovers = set(glob.glob("/tmp/cowfs-shell-*")) - before
    assert not any(mounts_under(p) for p in leftovers), "cowfs shell left its stack mounted"
    assert not leftovers, f"cowfs shell left {leftovers}"
    assert (bottom / "etc/motd").read_text() == "hello\n"  # the lower layers are untouched


def test_keep_leaves_the_upper_and_the_trace(layers, tmp_path):
    need_tmux()
    top, bottom = layers
    env = dict(os.environ, SHELL="/bin/sh", HOME=str(tmp_path))
    env.pop("TMUX", None)
    screen = Screen(f"cowfs-test-keep-{os.getpid()}", f"{sys.executable} -m cowfs shell {top} {bottom} --keep; "
                    "echo COWFS-SHELL-EXITED=$?; sleep 600", env)
    kept = None
    try:
        screen.wait_for("(cowfs) /$")
        screen.type("echo x > new-file; exit")
        shown = screen.wait_for("COWFS-SHELL-EXITED=0")
        line = next(ln for ln in shown.splitlines() if ln.startswith("cowfs shell: kept the upper "))
        kept = line.split("kept the upper ")[1].split(" and the trace ")[0]
        assert os.listdir(kept) == ["new-file"]
        assert os.path.exists(os.path.join(os.path.dirname(kept), "trace.jsonl"))
        assert not mounts_under(os.path.dirname(kept))
    finally:
        screen.close()
        if kept and not mounts_under(os.path.dirname(kept)):
            shutil.rmtree(os.path.dirname(kept), ignore_errors=True)
