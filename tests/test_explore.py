"""Exploring copy-up (README, "Exploring copy-up"): `cowfs mount --trace`, `cowfs diff`, `cowfs explain`,
`cowfs status`.

`cowfs diff` is checked against the kernel: the same operations run on a
kernel overlay and on cowfs, and the diff of each upper must be the same,
and the expected list. Tests that mount fail instead of skipping under CI=true.
"""

import json
import os
import subprocess
import sys

import pytest

import cowfs.cli.main as cli
from cowfs.runtime import record_path
from cowfs.testing.layers import File, Layer, StackSpec, Whiteout, materialise_layer
from cowfs.testing.mounts import cowfs_mount, kernel_overlay

COWFS = [sys.executable, "-m", "cowfs"]

# One scenario, as a shell script run inside the merged directory: change a lower
# file, delete one, rename a directory, replace a directory by a new one (opaque),
# add a file, add a directory under a lower one, chmod a lower file.
OPS = ("echo more >> etc/hosts; rm etc/motd; mv old new; rm -rf opq; mkdir opq; echo new > opq/kept; "
       "echo n > added; mkdir -p dir/sub/deeper; chmod 700 dir/sub/f")
EXPECTED = """\
A /added
C /dir
C /dir/sub
A /dir/sub/deeper
C /dir/sub/f
C /etc
C /etc/hosts
D /etc/motd
A /new
A /new/h
A /new/inner
A /new/inner/g
D /old
C /opq
D /opq/gone
C /opq/kept
"""


def run_cowfs(*args, check=True):
    result = subprocess.run(COWFS + [str(a) for a in args], capture_output=True, text=True, timeout=60,
                            stdin=subprocess.DEVNULL)
    if check:
        assert result.returncode == 0, result.stderr
    return result


LAYERS = StackSpec(
    Layer(  # l1, the top
        File("etc/issue", b"top\n"),
        File("deleted-below"),
        Whiteout("bye"),  # a whiteout in a lower layer hides l2's bye
    ),
    Layer(  # l2, the bottom (missing parents are made 0755)
        File("etc/hosts", b"hosts\n"),
        File("etc/motd", b"motd\n"),
        File("dir/sub/f", b"x\n"),
        File("old/inner/g", b"y\n"),
        File("old/h", b"z\n"),
        File("opq/gone", b"o\n"),
        File("opq/kept", b"keep\n"),
        File("bye", b"gone already\n"),
    ),
)


def build(tmp_path):
    """l1 (top) and l2 (bottom) for the scenario; returns dict of paths."""
    d = {n: tmp_path / n for n in ("l1", "l2", "ku", "kw", "km", "cu", "cw", "cm")}
    for p in d.values():
        p.mkdir()
    for layer, root in zip(LAYERS, (d["l1"], d["l2"])):
        materialise_layer(layer, root)
    return d


def run_ops(mountpoint, ops=OPS):
    subprocess.run(["sh", "-ec", ops], cwd=mountpoint, check=True, timeout=60)


@pytest.mark.fuse
@pytest.mark.kernel
def test_diff_of_a_kernel_upper_and_a_cowfs_upper_agree(tmp_path):
    d = build(tmp_path)
    lowers = [d["l1"], d["l2"]]
    with kernel_overlay(lowers, d["ku"], d["kw"], d["km"], options=["redirect_dir=on"]):
        run_ops(d["km"])
        live_kernel = run_cowfs("diff", d["km"]).stdout  # a kernel overlay mount point works too
    trace = tmp_path / "trace.jsonl"
    with cowfs_mount(lowers, d["cu"], d["cw"], d["cm"], options=["redirect_dir=on", f"trace={trace}"]):
        run_ops(d["cm"])
        live = run_cowfs("diff", d["cm"]).stdout
        by_upper = run_cowfs("diff", d["cu"]).stdout  # the upper of a live mount: its lowers come from the record
    kernel = run_cowfs("diff", d["ku"], "--lower", d["l1"], "--lower", d["l2"]).stdout
    ours = run_cowfs("diff", d["cu"], "-o", f"lowerdir={d['l1']}:{d['l2']}").stdout
    assert kernel == EXPECTED
    assert ours == EXPECTED
    assert live == live_kernel == by_upper == EXPECTED


def test_diff_leaves_out_directories_whose_only_change_is_their_times(tmp_path):
    """As Docker's overlay2 diff: a directory of the upper that a lower has too is a change when its
    type, mode or owner differ, or when something under it changes; its times (and size) are not
    (`touch -d 2020-01-01 m/home` copies /home up and changes nothing `docker diff` lists)."""
    lower, upper = tmp_path / "l", tmp_path / "u"
    for name in ("home/bob", "srv", "opt", "var/log", "tmp"):
        (lower / name).mkdir(parents=True)
    (lower / "home/bob/.profile").write_bytes(b"x\n")
    for name in ("home", "home/bob", "srv", "opt", "var", "tmp"):
        (upper / name).mkdir(parents=True)
        st = os.lstat(lower / name)
        os.chmod(upper / name, st.st_mode & 0o7777)
        os.chown(upper / name, st.st_uid, st.st_gid)
    os.utime(upper / "home", (1577836800, 1577836800))  # touch -d 2020-01-01 m/home
    os.utime(upper / "home/bob", (1577836800, 1577836800))
    os.utime(upper / "tmp", ns=(1, 1))
    os.chmod(upper / "srv", 0o700)  # chmod: listed
    os.chown(upper / "opt", 1234, 0)  # chown: listed
    (upper / "var/new").write_bytes(b"n\n")  # a change under a directory: its parent is listed
    (upper / "added").mkdir()  # a new directory: listed, however empty
    out = run_cowfs("diff", upper, "--lower", lower).stdout
    assert out == "A /added\nC /opt\nC /srv\nC /var\nA /var/new\n"


@pytest.mark.fuse
def test_diff_size_and_total(tmp_path):
    d = build(tmp_path)
    with cowfs_mount([d["l1"], d["l2"]], d["cu"], d["cw"], d["cm"]):
        (d["cm"] / "big").write_bytes(b"\0" * 12345)
        with open(d["cm"] / "etc/hosts", "a") as f:
            f.write("1234\n")
        out = run_cowfs("diff", "--size", d["cm"]).stdout.splitlines()
    assert out[0].split() == ["A", "/big", "12.3", "kB"]
    assert out[1] == "C /etc"
    assert out[2].split() == ["C", "/etc/hosts", "11", "B"]
    lower_bytes = sum(os.path.getsize(os.path.join(r, f)) for layer in ("l1", "l2")
                      for r, _, fs in os.walk(d[layer]) for f in fs if os.path.isfile(os.path.join(r, f)))
    assert out[-1] == f"size: 12.4 kB (virtual {(12345 + 11 + lower_bytes) / 1000:.1f} kB)"


@pytest.mark.fuse
def test_trace_records_each_event_as_a_json_line(tmp_path):
    d = build(tmp_path)
    trace = tmp_path / "t.jsonl"
    res = run_cowfs("mount", "--trace", trace, "-o",
                f"lowerdir={d['l1']}:{d['l2']},upperdir={d['cu']},workdir={d['cw']},redirect_dir=on", d["cm"])
    try:
        record = json.load(open(record_path(str(d["cm"]))))
        assert record["trace"] == str(trace)
        with open(d["cm"] / "etc/hosts", "a") as f:
            f.write("x")
            f.flush()
            events = [json.loads(line) for line in trace.read_text().splitlines()]  # flushed before write returns
        os.unlink(d["cm"] / "etc/motd")
        os.rename(d["cm"] / "old", d["cm"] / "new")
        (d["cm"] / "fresh").write_text("")
    finally:
        run_cowfs("umount", d["cm"])
    assert res.returncode == 0
    assert [(e["event"], e["path"]) for e in events] == [("copy_up", "/etc"), ("copy_up", "/etc/hosts")]
    hosts = events[1]
    assert hosts["layer"] == 2 and hosts["kind"] == "file" and hosts["bytes"] == 6
    assert hosts["trigger"] == "open for write" and 0 < hosts["seconds"] < 5
    later = [json.loads(line) for line in trace.read_text().splitlines()][2:]
    assert ("whiteout", "/etc/motd") in [(e["event"], e["path"]) for e in later]
    assert {"event": "redirect", "path": "/new", "value": "old"}.items() <= next(
        e for e in later if e["event"] == "redirect").items()
    assert ("create", "/fresh") in [(e["event"], e["path"]) for e in later]


@pytest.mark.fuse
def test_explain_says_where_a_path_comes_from_and_why_others_hide(tmp_path):
    d = build(tmp_path)
    trace = tmp_path / "t.jsonl"
    with cowfs_mount([d["l1"], d["l2"]], d["cu"], d["cw"], d["cm"], options=["redirect_dir=on", f"trace={trace}"]):
        run_ops(d["cm"])
        hosts = json.loads(run_cowfs("explain", "--json", d["cm"] / "etc/hosts").stdout)
        motd = run_cowfs("explain", d["cm"] / "etc/motd").stdout
        issue = json.loads(run_cowfs("explain", "--json", d["cm"] / "etc/issue").stdout)
        gone = run_cowfs("explain", d["cm"] / "opq/gone").stdout
        new_h = json.loads(run_cowfs("explain", "--json", d["cm"] / "new/h").stdout)
        bye = run_cowfs("explain", d["cm"] / "bye").stdout
        status = json.loads(run_cowfs("status", "--json", d["cm"]).stdout)
        status_text = run_cowfs("status").stdout
    assert hosts["provided_by"] == 0 and hosts["copied_up"] is True and hosts["copied_from"] == 2
    assert hosts["copy_up"]["trigger"] == "open for write"
    assert [(e["layer"], e["role"], e["size"]) for e in hosts["layers"]] == [(0, "provides", 11), (1, "absent", None),
                                                                             (2, "hidden", 6)]
    assert "on open for write" in cowfs_text_summary(hosts)
    assert "deleted: a whiteout in upper" in motd
    assert "hidden: it is deleted by a whiteout in upper" in motd
    assert issue["provided_by"] == 1 and issue["copied_up"] is False
    assert "its parent /opq is an opaque directory in upper" in gone
    assert new_h["provided_by"] == 2 and "redirect" in new_h["layers"][2]["reason"]
    assert "whiteout in layer 1" in bye
    assert len(status) == 1 and status[0]["lowers"] == [str(d["l1"]), str(d["l2"])]
    assert status[0]["trace"] == str(trace) and status[0]["copied_up_source"] == "trace"
    # copied up: etc/hosts, dir/sub/f (chmod); directories: etc, old, dir, dir/sub, opq (to delete in it)
    assert (status[0]["copied_up_files"], status[0]["copied_up_dirs"]) == (2, 5)
    assert str(d["cm"]) in status_text and "redirect_dir=on" in status_text


def cowfs_text_summary(info):
    return info["summary"]


@pytest.mark.fuse
def test_status_counts_copies_from_the_upper_without_a_trace(tmp_path):
    d = build(tmp_path)
    with cowfs_mount([d["l1"], d["l2"]], d["cu"], d["cw"], d["cm"]):
        run_ops(d["cm"], "echo more >> etc/hosts; chmod 700 dir/sub/f; echo n > added; rm -rf opq; mkdir opq; "
                         "echo new > opq/kept")
        info = json.loads(run_cowfs("status", "--json", d["cm"]).stdout)[0]
    assert info["trace"] is None and info["copied_up_source"] == "upper"
    assert info["copied_up_files"] == 2  # hosts and f; not added, not opq/kept (new in an opaque directory)


@pytest.mark.parametrize("argv, named, reason", [
    (["diff", "/nonexistent-dir"], "/nonexistent-dir", "No such file"),
    (["diff", "/etc/hostname"], "/etc/hostname", "Not a directory"),
    (["diff", "/tmp"], "/tmp", "give its lower layers with --lower"),
    (["diff", "/tmp", "--lower", "/nonexistent-l"], "/nonexistent-l", "No such file"),
    (["explain", "/tmp/x"], "/tmp/x", "not inside a cowfs mount"),
    (["status", "/tmp"], "/tmp", "not a cowfs mount"),
    (["shell"], "lowerdir", "give the lower layers"),
    (["shell", "/nonexistent-l"], "/nonexistent-l", "no such layer directory, and no such image"),
    (["mount", "--trace", "/nonexistent-dir/t", "/tmp", "/tmp/m"], None, None),
])
def test_refusals_are_one_line(argv, named, reason, capsys, tmp_path):
    if argv[0] == "mount":  # a trace in a missing directory, refused before mounting
        (tmp_path / "l").mkdir()
        (tmp_path / "m").mkdir()
        argv = ["mount", "--trace", "/nonexistent-dir/t", str(tmp_path / "l"), str(tmp_path / "m")]
        named, reason = "/nonexistent-dir/t", "No such directory"
    code = cli.main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert code != 0
    assert len(err) == 1 and named in err[0] and reason in err[0], err


@pytest.mark.parametrize("command", ["diff", "explain", "status", "shell", "mount"])
def test_help_has_an_example(command):
    out = run_cowfs(command, "--help").stdout
    assert "examples:" in out and f"cowfs {command}" in out.split("examples:")[1]
